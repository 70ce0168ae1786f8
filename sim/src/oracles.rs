//! The oracles of SIMULATION.md and the history they need.
//!
//! The workload writes a unique value every time, so "which write is this?" is answered
//! by the value itself, and "is it older?" by the order in which values were first
//! published by any active server ([`History::publication_index`]).
//!
//! What is recorded:
//! - every KVPUB an active publishes (publication order; per-server sequence order);
//! - (the servers' histories and reigns, the ground truth of oracles 1, 2, 9 and 10,
//!   are the model's: [`crate::model`]);
//! - for each server, the publication index of the value it holds per key, to check
//!   that an active never goes back to an older value and that a failover keeps
//!   everything the backup had received;
//! - ttl expectations of ephemeral values.

use std::collections::BTreeMap;
use std::fmt;

use clonekv_core::kvmsg::Uuid;
use clonekv_core::time::{EpochMillis, Instant};

/// The properties SIMULATION.md requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Oracle {
    /// 1. A server's published sequences strictly increase.
    SequencesIncrease,
    /// 2. A client's map after KTHXBAI equals the server's map at that sequence.
    SnapshotIsPointInTime,
    /// 3. No key goes back to an older value at a client or at the active server.
    NoRegression,
    /// 4. At most one active server while the two can hear each other.
    SingleActive,
    /// 5. An update that reached the backup is not lost by failover.
    FailoverKeepsUpdates,
    /// 6. Keys expire neither early nor (much) late.
    Ttl,
    /// 7. Every structure that input fills (a server's pending list, sync buffers,
    ///    dedupe windows, split log and snapshot streams; a client's update buffer and
    ///    updates in flight) stays within its count and its byte bounds.
    BoundedMemory,
    /// 8. Nothing panics.
    NoPanic,
    /// Safety 9: a server's map is its published history (the model's): an active's
    /// is its reign replayed, a passive's its peer's history at its sequence.
    MapIsHistory,
    /// Safety 10: every `Committed` names a publication of its uuid at its sequence.
    AcknowledgedWrites,
    /// After healing: one active, the passive in sync, every client in sync.
    Liveness,
}

impl Oracle {
    /// True for the liveness oracle (its own exit code).
    pub fn is_liveness(self) -> bool {
        self == Oracle::Liveness
    }
}

impl fmt::Display for Oracle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Oracle::SequencesIncrease => "safety 1: published sequences strictly increase",
            Oracle::SnapshotIsPointInTime => "safety 2: snapshot is the server's map at KTHXBAI",
            Oracle::NoRegression => "safety 3: no key goes back to an older value",
            Oracle::SingleActive => "safety 4: at most one active while the pair can talk",
            Oracle::FailoverKeepsUpdates => "safety 5: failover keeps what reached the backup",
            Oracle::Ttl => "safety 6: ttl expiry neither early nor late",
            Oracle::BoundedMemory => "safety 7: memory stays bounded",
            Oracle::NoPanic => "safety 8: nothing panics",
            Oracle::MapIsHistory => "safety 9: a server's map is its published history",
            Oracle::AcknowledgedWrites => "safety 10: a commit names a publication of its update",
            Oracle::Liveness => "liveness: after healing, one active and everyone in sync",
        })
    }
}

/// A broken oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which oracle.
    pub oracle: Oracle,
    /// What was seen.
    pub detail: String,
}

impl Violation {
    /// A violation of `oracle`.
    pub fn new(oracle: Oracle, detail: impl Into<String>) -> Violation {
        Violation {
            oracle,
            detail: detail.into(),
        }
    }
}

/// The order of first publication: larger is newer.
pub type PublicationIndex = u64;

/// One KVPUB: its own position in publication order, and the incarnation of the server
/// that sent it.
pub type Publication = (PublicationIndex, u32);

/// A point in a run: world time, and a counter that orders the steps of one instant
/// (several deliveries can share a nanosecond, and their order matters to oracle 5).
pub type Moment = (Instant, u64);

/// What a server holds for a key, in publication order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Publication index of the value or delete.
    pub index: PublicationIndex,
    /// False when the key was deleted.
    pub present: bool,
    /// The sequence it carried from the active it follows (or, for a value adopted from
    /// a snapshot, the snapshot's sequence): what a later snapshot already accounts for.
    pub sequence: i64,
    /// When the server received (or made) it.
    pub received_at: Moment,
    /// Received from the active it follows (not published by itself, not adopted from
    /// a snapshot): the incarnation of that active, whose history it belongs to.
    pub from_active: Option<u32>,
    /// For a KVPUB received from the active: that publication's own position in
    /// publication order ([`History::publication_at`]), to compare it with what the
    /// same incarnation of that server published later.
    pub publication: Option<PublicationIndex>,
}

/// A client's copy of an update, as a server that was not active received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientCopy {
    /// The update.
    pub update: UpdateId,
    /// When it arrived.
    pub arrived: Moment,
    /// Its expiry by the receiving server's clock, if it is ephemeral.
    pub expires_at: Option<EpochMillis>,
}

/// What a published ephemeral value promises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TtlExpectation {
    /// The value that must expire.
    pub value: Vec<u8>,
    /// Its uuid (an expiry delete carries it).
    pub uuid: Option<Uuid>,
    /// When it expires by the wall clock of the server that published it.
    pub expires_at: EpochMillis,
    /// The server that published it.
    pub publisher: usize,
    /// World time of the publication.
    pub published_at: Instant,
    /// World time at which another server applied the KVPUB: its relative ttl counts
    /// from then on that server (§5), so it expires that much later.
    pub followed_at: BTreeMap<usize, Instant>,
    /// True only for the publisher's own copy: once the value has passed through
    /// another server (which stores the expiry by its own clock), clock skew applies.
    pub exact: bool,
}

/// Everything the oracles remember about a run.
/// What identifies one update across republications: its uuid (unique per client
/// write) and whether it deletes. An expiry delete carries the uuid of the value it
/// deletes, so the flag tells them apart.
pub type UpdateId = (Option<Uuid>, bool);

/// Everything the oracles remember about a run.
#[derive(Debug, Default)]
pub struct History {
    first_published: BTreeMap<Vec<u8>, PublicationIndex>,
    by_update: BTreeMap<UpdateId, PublicationIndex>,
    next_index: PublicationIndex,
    /// Per server node: what it holds per key.
    pub held: BTreeMap<usize, BTreeMap<Vec<u8>, Held>>,
    /// Per server node: the updates it has seen published (by itself, by the active it
    /// followed, or in a snapshot). Re-publishing one of those over a newer value is a
    /// regression it could have avoided; a late copy of an update it never saw
    /// published is indistinguishable from a new write (CHP carries no write order).
    pub seen: BTreeMap<usize, std::collections::BTreeSet<UpdateId>>,
    /// Each KVPUB's own position in publication order, by (server, sequence, value).
    by_publication: BTreeMap<(usize, i64, Vec<u8>), Publication>,
    /// The same by (server, incarnation, sequence, value): deletes share the empty
    /// value, and a restarted server numbers its new history from the start again.
    by_incarnation: BTreeMap<(usize, u32, i64, Vec<u8>), PublicationIndex>,
    /// Per history (server, incarnation) and update: the position in publication order
    /// of that history's first publication of the update.
    by_history_update: BTreeMap<(usize, u32, UpdateId), PublicationIndex>,
    next_publication: PublicationIndex,
    /// Per (server, key): the ttl promise of the ephemeral value that server holds.
    /// Per server, because in a split brain each active holds its own publication.
    pub ttl: BTreeMap<(usize, Vec<u8>), TtlExpectation>,
    /// The promises `ttl` held for a server when it last crashed: the entries it sent
    /// before, merged by a passive that abandons its sync, still carry them.
    pub ttl_before_crash: BTreeMap<(usize, Vec<u8>), TtlExpectation>,
    /// Per key: the update published last, by any server, with that server's node and
    /// incarnation (whose history it belongs to).
    pub last_published_of_key: BTreeMap<Vec<u8>, (UpdateId, usize, u32)>,
    /// Per server node, per key: the latest client copy it received while not active
    /// (oracle 5 counts it; see `World::held_through_copies`).
    pub client_copies: BTreeMap<usize, BTreeMap<Vec<u8>, ClientCopy>>,
    /// Per ephemeral update: the earliest expiry any publication of it promised, and
    /// the servers that published it.
    pub ttl_publications: BTreeMap<Uuid, (EpochMillis, std::collections::BTreeSet<usize>)>,
}

impl History {
    /// `node` (in `incarnation`) began a reign from a map the model does not rebuild (a
    /// failover mid-sync merged the peer's updates): the map changed without a
    /// publication, so from then on a key's latest state in that history is its `base`
    /// entry (`Some(uuid)`), or its absence, not the update published before. A key
    /// whose base holds the very update published last keeps its publisher.
    pub fn adopt_unpublished_base(
        &mut self,
        node: usize,
        incarnation: u32,
        base: &BTreeMap<Vec<u8>, Option<Uuid>>,
    ) {
        self.last_published_of_key
            .retain(|key, (update, _, _)| base.contains_key(key) || update.1);
        for (key, uuid) in base {
            let update = (*uuid, false);
            let same = self
                .last_published_of_key
                .get(key)
                .is_some_and(|(last, _, _)| *last == update);
            if !same {
                self.last_published_of_key
                    .insert(key.clone(), (update, node, incarnation));
            }
        }
    }

    /// The publication index of `value`, if it was ever published.
    pub fn publication_index(&self, value: &[u8]) -> Option<PublicationIndex> {
        self.first_published.get(value).copied()
    }

    /// The publication index of the update `id`, if it was ever published.
    pub fn update_index(&self, id: UpdateId) -> Option<PublicationIndex> {
        self.by_update.get(&id).copied()
    }

    /// Records a publication of the update `id` setting `value` (a delete when empty)
    /// and returns its index: the index of its first publication when it was published
    /// before (a replay or a forward), else a new one. An expiry delete whose value was
    /// first published after it is the exception: it is a new update (see
    /// [`History::republished_index`]), and takes a new index.
    pub fn publish(&mut self, id: UpdateId, value: &[u8]) -> PublicationIndex {
        if let Some(index) = self.by_update.get(&id) {
            if !self.ends_a_later_value(id, *index) {
                return *index;
            }
        }
        self.next_index += 1;
        let index = self.next_index;
        self.by_update.insert(id, index);
        if !value.is_empty() {
            self.first_published.entry(value.to_vec()).or_insert(index);
        }
        index
    }

    /// The position in publication order that publishing `id` again puts its key at,
    /// if it was ever published: its first publication's, except for an expiry delete
    /// (a delete carrying the uuid of the value it removes) whose value was first
    /// published after it. A server that takes over deletes the older value of a key
    /// under the uuid of a newer client copy whose ttl ran out on its pending list; the
    /// other server can still publish that copy late, its ttl counted from arrival, and
    /// the value's own expiry is then a delete with the same uuid: not the first delete
    /// again, but the end of the value, just after it.
    pub fn republished_index(&self, id: UpdateId) -> Option<PublicationIndex> {
        let index = self.update_index(id)?;
        if self.ends_a_later_value(id, index) {
            return self.update_index((id.0, false));
        }
        Some(index)
    }

    /// True when `id` is a delete with a uuid, first published at `index`, and the value
    /// with that uuid was first published later.
    fn ends_a_later_value(&self, id: UpdateId, index: PublicationIndex) -> bool {
        let (Some(uuid), true) = id else {
            return false;
        };
        self.update_index((Some(uuid), false))
            .is_some_and(|value| value > index)
    }

    /// Numbers one KVPUB in publication order (every publication, republications too),
    /// sent by `incarnation` of `server`.
    pub fn number_publication(
        &mut self,
        server: usize,
        incarnation: u32,
        update: UpdateId,
        sequence: i64,
        value: &[u8],
    ) {
        self.next_publication += 1;
        self.by_history_update
            .entry((server, incarnation, update))
            .or_insert(self.next_publication);
        self.by_publication.insert(
            (server, sequence, value.to_vec()),
            (self.next_publication, incarnation),
        );
        self.by_incarnation.insert(
            (server, incarnation, sequence, value.to_vec()),
            self.next_publication,
        );
    }

    /// The position in publication order at which `incarnation` of `server` first
    /// published `update`, if it ever did.
    pub fn first_published_in(
        &self,
        server: usize,
        incarnation: u32,
        update: UpdateId,
    ) -> Option<PublicationIndex> {
        self.by_history_update
            .get(&(server, incarnation, update))
            .copied()
    }

    /// The position in publication order of the KVPUB `incarnation` of `server` sent
    /// at `sequence` with `value`.
    pub fn publication_of(
        &self,
        server: usize,
        incarnation: u32,
        sequence: i64,
        value: &[u8],
    ) -> Option<PublicationIndex> {
        self.by_incarnation
            .get(&(server, incarnation, sequence, value.to_vec()))
            .copied()
    }

    /// The position in publication order of the KVPUB `server` sent at `sequence`
    /// with `value`.
    pub fn publication_at(
        &self,
        server: usize,
        sequence: i64,
        value: &[u8],
    ) -> Option<PublicationIndex> {
        self.publication_by(server, sequence, value)
            .map(|(index, _)| index)
    }

    /// The position in publication order of the KVPUB `server` sent at `sequence` with
    /// `value`, and the incarnation of `server` that sent it.
    pub fn publication_by(
        &self,
        server: usize,
        sequence: i64,
        value: &[u8],
    ) -> Option<Publication> {
        self.by_publication
            .get(&(server, sequence, value.to_vec()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_republished_update_keeps_its_first_index() {
        let mut history = History::default();
        let (one, two) = (
            Some(Uuid::from_bytes([1; 16])),
            Some(Uuid::from_bytes([2; 16])),
        );
        let first = history.publish((one, false), b"v1");
        let delete = history.publish((two, true), b"");
        assert!(delete > first);
        assert_eq!(history.publish((one, false), b"v1"), first);
        assert_eq!(history.publish((two, true), b""), delete);
        assert_eq!(history.publication_index(b"v1"), Some(first));
        // An expiry delete carries its value's uuid but is another update.
        assert!(history.publish((one, true), b"") > delete);
    }

    #[test]
    fn an_expiry_delete_published_before_its_value_ends_it_when_published_again() {
        let mut history = History::default();
        let (older, late) = (
            Some(Uuid::from_bytes([1; 16])),
            Some(Uuid::from_bytes([2; 16])),
        );
        history.publish((older, false), b"older");
        // The late value's copy expired before it was published: its delete first.
        let first_delete = history.publish((late, true), b"");
        let value = history.publish((late, false), b"late");
        assert!(value > first_delete);
        // Publishing that delete again puts the key just after the value...
        assert_eq!(history.republished_index((late, true)), Some(value));
        // ... and records a new update, the value's end.
        let end = history.publish((late, true), b"");
        assert!(end > value);
        assert_eq!(history.republished_index((late, true)), Some(end));
        assert_eq!(history.publish((late, true), b""), end);
    }

    #[test]
    fn a_merged_base_is_each_keys_latest_state_in_its_history() {
        let mut history = History::default();
        let uuid = |byte| Some(Uuid::from_bytes([byte; 16]));
        let key = |name: &str| name.as_bytes().to_vec();
        // Published last: a delete of /a by server 1, a set of /b and /c by server 0,
        // a delete of /d by server 0.
        history
            .last_published_of_key
            .insert(key("/a"), ((uuid(1), true), 1, 0));
        history
            .last_published_of_key
            .insert(key("/b"), ((uuid(2), false), 0, 3));
        history
            .last_published_of_key
            .insert(key("/c"), ((uuid(3), false), 0, 3));
        history
            .last_published_of_key
            .insert(key("/d"), ((uuid(4), true), 0, 3));
        // Server 1 (incarnation 2) merged: /a holds the peer's value, /b the very
        // update published last, /c is gone, /e came from the merge alone.
        let base = BTreeMap::from([
            (key("/a"), uuid(5)),
            (key("/b"), uuid(2)),
            (key("/e"), uuid(6)),
        ]);
        history.adopt_unpublished_base(1, 2, &base);
        let latest = |name: &str| history.last_published_of_key.get(&key(name)).copied();
        assert_eq!(latest("/a"), Some(((uuid(5), false), 1, 2)));
        assert_eq!(
            latest("/b"),
            Some(((uuid(2), false), 0, 3)),
            "publisher kept"
        );
        assert_eq!(
            latest("/c"),
            None,
            "a set the base lacks is no latest state"
        );
        assert_eq!(
            latest("/d"),
            Some(((uuid(4), true), 0, 3)),
            "absent either way"
        );
        assert_eq!(latest("/e"), Some(((uuid(6), false), 1, 2)));
    }
}
