//! The passive server's pending list (PROTOCOL.md §6).
//!
//! A client sends every update to both servers. The passive holds its copy here, keyed
//! by uuid, until the active's published echo of the same uuid shows that the update
//! is safe. Either copy may arrive first: an echo that beats the client's copy is kept
//! (as [`Kind::Echo`]) to cancel that copy when it comes. At failover the remaining
//! client copies are replayed.
//!
//! Two hazards of the reference are closed here:
//! - the list is bounded by entries and bytes (always) and by age (while the active is
//!   alive: an update the active has not echoed for that long will never be echoed), so
//!   echoes whose client copy never comes cannot pile up;
//! - a client copy is *superseded* when the active publishes a later update of the
//!   same key after the copy arrived, or when a full snapshot from the active, requested
//!   after the copy arrived, is installed (the snapshot states every key, present or
//!   absent, at a point the copy preceded); a superseded copy is still matched by its
//!   echo but never replayed, so a replay cannot overwrite a newer value or bring back
//!   a deleted key. An installed snapshot that holds a copy's update is that copy's
//!   echo, whenever the copy arrived.

use std::collections::{btree_map, BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::seen::{HashKey, KeyedState};
use super::store::Key;
use crate::budget::{Budget, ENTRY_OVERHEAD};
use crate::kvmsg::{KvMsg, KvMsgRef, Properties, Uuid};
use crate::time::{EpochMillis, Instant};

/// A held client copy: its sequence frame, key, properties frame and body in one
/// allocation (a header of the sequence and the two lengths, then the bytes), instead of
/// an owned [`KvMsg`]'s two or three. Its uuid is the list's key. Turned back into a
/// [`KvMsg`] only to be replayed.
#[derive(Clone, PartialEq, Eq)]
struct HeldUpdate(Box<[u8]>);

/// Where each field of a [`HeldUpdate`]'s header lies.
mod header {
    use std::ops::Range;
    pub(super) const SEQUENCE: Range<usize> = 0..8;
    pub(super) const KEY_LEN: Range<usize> = 8..12;
    pub(super) const PROPERTIES_LEN: Range<usize> = 12..16;
    pub(super) const LEN: usize = 16;
}

impl HeldUpdate {
    /// The copy of `update`, with its properties frame as an owned [`KvMsg`] holds it
    /// (normalised to end in `\n`). The decoder bounds every frame far below 4 GiB; a
    /// longer key or properties frame could only come from a misconfigured limit and
    /// is then held empty rather than mis-split.
    fn new(update: &KvMsgRef) -> Self {
        let properties = update.normalized_properties();
        let (key_len, key) = match u32::try_from(update.key.len()) {
            Ok(len) => (len, update.key),
            Err(_) => (0, &[][..]),
        };
        let (properties_len, properties) = match u32::try_from(properties.len()) {
            Ok(len) => (len, &*properties),
            Err(_) => (0, &[][..]),
        };
        let mut bytes =
            Vec::with_capacity(header::LEN + key.len() + properties.len() + update.body.len());
        bytes.extend_from_slice(&update.sequence.to_be_bytes());
        bytes.extend_from_slice(&key_len.to_be_bytes());
        bytes.extend_from_slice(&properties_len.to_be_bytes());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(properties);
        bytes.extend_from_slice(update.body);
        HeldUpdate(bytes.into_boxed_slice())
    }

    fn field<const N: usize>(&self, range: std::ops::Range<usize>) -> [u8; N] {
        self.0
            .get(range)
            .and_then(|bytes| bytes.try_into().ok())
            .unwrap_or([0; N])
    }

    fn len_at(&self, range: std::ops::Range<usize>) -> usize {
        u32::from_be_bytes(self.field(range)) as usize
    }

    fn sequence(&self) -> i64 {
        i64::from_be_bytes(self.field(header::SEQUENCE))
    }

    fn key(&self) -> &[u8] {
        let end = header::LEN.saturating_add(self.len_at(header::KEY_LEN));
        self.0.get(header::LEN..end).unwrap_or_default()
    }

    fn properties(&self) -> &[u8] {
        let start = header::LEN.saturating_add(self.len_at(header::KEY_LEN));
        let end = start.saturating_add(self.len_at(header::PROPERTIES_LEN));
        self.0.get(start..end).unwrap_or_default()
    }

    fn body(&self) -> &[u8] {
        let start = header::LEN
            .saturating_add(self.len_at(header::KEY_LEN))
            .saturating_add(self.len_at(header::PROPERTIES_LEN));
        self.0.get(start..).unwrap_or_default()
    }

    /// The owned message, as [`KvMsgRef::to_kvmsg`] would have made it on arrival.
    fn to_kvmsg(&self, uuid: Uuid) -> KvMsg {
        KvMsg {
            key: self.key().to_vec(),
            sequence: self.sequence(),
            uuid: Some(uuid),
            properties: Properties::from_valid_frame(self.properties()),
            body: self.body().to_vec(),
        }
    }
}

impl fmt::Debug for HeldUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldUpdate")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("sequence", &self.sequence())
            .field("properties", &String::from_utf8_lossy(self.properties()))
            .field("body", &String::from_utf8_lossy(self.body()))
            .finish()
    }
}

#[derive(Clone, Debug)]
enum Kind {
    /// A client's update that the active has not echoed yet.
    ClientCopy {
        update: HeldUpdate,
        /// The ttl converted to an absolute time by our clock when the copy arrived.
        expires_at: Option<EpochMillis>,
        /// The active published a later update of the same key since this arrived.
        superseded: bool,
    },
    /// The active's echo arrived before the client's copy; it cancels that copy.
    Echo,
}

#[derive(Clone, Debug)]
struct Held {
    arrival: u64,
    arrived_at: Instant,
    kind: Kind,
}

impl Held {
    /// What a client copy is charged: its held bytes, its key once more (the index by
    /// key may hold it), and [`ENTRY_OVERHEAD`].
    fn client_copy_bytes(update: &HeldUpdate) -> usize {
        ENTRY_OVERHEAD
            .saturating_add(update.0.len())
            .saturating_add(update.key().len())
    }

    /// What this entry is charged in the list's byte budget.
    fn bytes(&self) -> usize {
        match &self.kind {
            Kind::ClientCopy { update, .. } => Held::client_copy_bytes(update),
            Kind::Echo => ENTRY_OVERHEAD,
        }
    }
}

/// What became of a client's copy handed to [`PendingList::hold_client_copy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientCopyFate {
    /// Now held until its echo comes.
    Held,
    /// The active's echo had already come: the copy is dropped.
    CancelledByEcho,
    /// A copy with this uuid is already held.
    Duplicate,
    /// The copy alone is larger than the list's byte budget: not held.
    TooLarge,
}

/// How many entries an eviction removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub(crate) client_copies: usize,
    pub(crate) echoes: usize,
}

impl Evicted {
    pub(crate) fn is_empty(&self) -> bool {
        self.client_copies == 0 && self.echoes == 0
    }

    fn count(&mut self, kind: &Kind) {
        match kind {
            Kind::ClientCopy { .. } => self.client_copies += 1,
            Kind::Echo => self.echoes += 1,
        }
    }
}

/// An update to replay at failover, in arrival order.
#[derive(Clone, Debug)]
pub(crate) struct Replay {
    pub(crate) update: KvMsg,
    pub(crate) expires_at: Option<EpochMillis>,
}

/// The held entries, by uuid. Only looked up, never iterated (arrival order is
/// `by_arrival`'s): a hash map finds and removes an entry far faster than an ordered
/// map whose nodes hold these large values.
type ByUuid = HashMap<Uuid, Held, KeyedState>;

/// Bounded by a [`Budget`] of entries and bytes: a new entry first evicts the oldest
/// until it fits ([`PendingList::make_room`]); `bytes` is the sum of
/// [`Held::bytes`] over the entries.
#[derive(Clone)]
pub(crate) struct PendingList {
    by_uuid: ByUuid,
    bytes: usize,
    /// Arrival number → uuid: oldest first, for eviction and replay order.
    by_arrival: BTreeMap<u64, Uuid>,
    /// Key → arrivals (ascending) of its client copies not superseded yet, to supersede
    /// by key. Looked up by `&[u8]`; short keys are stored inline and a key's first
    /// arrival needs no vector, so the per-update paths usually allocate nothing here.
    live_copies_by_key: BTreeMap<Key, Arrivals>,
    next_arrival: u64,
}

impl fmt::Debug for PendingList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // In arrival order, never the hash map's.
        let held: Vec<(&u64, Option<&Held>)> = self
            .by_arrival
            .iter()
            .map(|(arrival, uuid)| (arrival, self.by_uuid.get(uuid)))
            .collect();
        f.debug_struct("PendingList")
            .field("held", &held)
            .field("live_copies_by_key", &self.live_copies_by_key)
            .field("next_arrival", &self.next_arrival)
            .finish()
    }
}

/// The arrivals of one key's live client copies, ascending; almost always one.
#[derive(Clone, Debug)]
enum Arrivals {
    One(u64),
    Many(Vec<u64>),
}

impl Arrivals {
    fn push(&mut self, arrival: u64) {
        match self {
            Arrivals::One(first) => *self = Arrivals::Many(vec![*first, arrival]),
            Arrivals::Many(arrivals) => arrivals.push(arrival),
        }
    }

    fn as_slice(&self) -> &[u64] {
        match self {
            Arrivals::One(arrival) => std::slice::from_ref(arrival),
            Arrivals::Many(arrivals) => arrivals,
        }
    }

    /// Removes `arrival`; true when none is left.
    fn remove(&mut self, arrival: u64) -> bool {
        match self {
            Arrivals::One(only) => *only == arrival,
            Arrivals::Many(arrivals) => {
                arrivals.retain(|&other| other != arrival);
                arrivals.is_empty()
            }
        }
    }
}

impl PendingList {
    pub(crate) fn new(key: HashKey) -> Self {
        PendingList {
            by_uuid: ByUuid::with_hasher(KeyedState::new(key)),
            bytes: 0,
            by_arrival: BTreeMap::new(),
            live_copies_by_key: BTreeMap::new(),
            next_arrival: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_uuid.len()
    }

    /// Bytes charged for the held entries (see [`Held::bytes`]).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the oldest entry was held.
    pub(crate) fn oldest_arrived_at(&self) -> Option<Instant> {
        let (_, uuid) = self.by_arrival.first_key_value()?;
        self.by_uuid.get(uuid).map(|held| held.arrived_at)
    }

    /// A client's update seen while not active, under its `uuid` (which replay gives
    /// back as the update's uuid).
    pub(crate) fn hold_client_copy(
        &mut self,
        now: Instant,
        uuid: Uuid,
        update: &KvMsgRef,
        expires_at: Option<EpochMillis>,
        budget: Budget,
    ) -> (ClientCopyFate, Evicted) {
        match self.by_uuid.get(&uuid).map(|held| &held.kind) {
            Some(Kind::Echo) => {
                self.cancel_published(&uuid, update.key);
                return (ClientCopyFate::CancelledByEcho, Evicted::default());
            }
            Some(Kind::ClientCopy { .. }) => {
                return (ClientCopyFate::Duplicate, Evicted::default())
            }
            None => {}
        }
        let update = HeldUpdate::new(update);
        let incoming = Held::client_copy_bytes(&update);
        if incoming > budget.max_bytes {
            return (ClientCopyFate::TooLarge, Evicted::default());
        }
        let evicted = self.make_room(budget, incoming);
        let arrival = self.next_arrival();
        match Key::inline(update.key()) {
            Some(key) => match self.live_copies_by_key.entry(key) {
                btree_map::Entry::Occupied(mut arrivals) => arrivals.get_mut().push(arrival),
                btree_map::Entry::Vacant(vacant) => {
                    vacant.insert(Arrivals::One(arrival));
                }
            },
            None => match self.live_copies_by_key.get_mut(update.key()) {
                Some(arrivals) => arrivals.push(arrival),
                None => {
                    self.live_copies_by_key
                        .insert(Key::from(update.key()), Arrivals::One(arrival));
                }
            },
        }
        self.insert(
            uuid,
            Held {
                arrival,
                arrived_at: now,
                kind: Kind::ClientCopy {
                    update,
                    expires_at,
                    superseded: false,
                },
            },
        );
        (ClientCopyFate::Held, evicted)
    }

    /// An update published by the active. Removes the matching entry (its client copy,
    /// or a duplicate echo); otherwise, when `remember_echo`, keeps the echo to cancel
    /// the client copy still on its way. When `published_after_held` (a live KVPUB),
    /// client copies of the same key that are still held are superseded: the active
    /// ordered this update after them. A change read late from a resume reply may
    /// predate them, so it supersedes only the key's copies that arrived before its own
    /// copy, as a snapshot storing its uuid does
    /// ([`PendingList::settle_against_snapshot`]).
    pub(crate) fn observe_active_update(
        &mut self,
        now: Instant,
        uuid: Option<Uuid>,
        key: &[u8],
        remember_echo: bool,
        published_after_held: bool,
        budget: Budget,
    ) -> Evicted {
        let mut evicted = Evicted::default();
        if let Some(uuid) = uuid {
            let own_copy_arrival = self.by_uuid.get(&uuid).and_then(|held| match &held.kind {
                Kind::ClientCopy { update, .. } if update.key() == key => Some(held.arrival),
                _ => None,
            });
            match self.remove_unlinking(&uuid) {
                Some((Kind::ClientCopy { update, .. }, true)) if update.key() == key => {
                    // The echo of the key's only live copy (the usual case): nothing
                    // is left to supersede, so skip looking for it.
                    return evicted;
                }
                Some(_) => {}
                None if remember_echo => {
                    evicted = self.make_room(budget, ENTRY_OVERHEAD);
                    let arrival = self.next_arrival();
                    self.insert(
                        uuid,
                        Held {
                            arrival,
                            arrived_at: now,
                            kind: Kind::Echo,
                        },
                    );
                }
                None => {}
            }
            if let (false, Some(arrival)) = (published_after_held, own_copy_arrival) {
                self.supersede_arrived_before(key, arrival);
            }
        }
        if published_after_held {
            self.supersede(key);
        }
        evicted
    }

    /// Supersedes `key`'s live copies that arrived before `arrival`.
    fn supersede_arrived_before(&mut self, key: &[u8], arrival: u64) {
        let Some((owned_key, mut arrivals)) = self.remove_live_copies(key) else {
            return;
        };
        let older: Vec<u64> = arrivals
            .as_slice()
            .iter()
            .copied()
            .filter(|&other| other < arrival)
            .collect();
        let mut none_left = false;
        for other in older {
            none_left = arrivals.remove(other);
            self.mark_superseded(other);
        }
        if !none_left {
            self.live_copies_by_key.insert(owned_key, arrivals);
        }
    }

    fn supersede(&mut self, key: &[u8]) {
        let Some((_, arrivals)) = self.remove_live_copies(key) else {
            return;
        };
        for &arrival in arrivals.as_slice() {
            self.mark_superseded(arrival);
        }
    }

    /// Marks the client copy that arrived at `arrival` superseded (the caller unlinks
    /// it from its key's live copies).
    fn mark_superseded(&mut self, arrival: u64) {
        let held = self
            .by_arrival
            .get(&arrival)
            .and_then(|uuid| self.by_uuid.get_mut(uuid));
        if let Some(Held {
            kind: Kind::ClientCopy { superseded, .. },
            ..
        }) = held
        {
            *superseded = true;
        }
    }

    /// A client's copy of an update the active already published (its echo came
    /// first) arrived: forgets whatever is held for `uuid` (the early echo, or a copy),
    /// and supersedes the copies of `key` held now. They arrived before this copy, so
    /// the active ordered them before the update it published: replaying one would put
    /// the key back to an older value (swarm 90737: the echo came first, then an older
    /// and this newer copy from one client; the older was replayed at failover).
    pub(crate) fn cancel_published(&mut self, uuid: &Uuid, key: &[u8]) {
        self.remove(uuid);
        self.supersede(key);
    }

    /// A mark that orders later arrivals after this moment: see
    /// [`PendingList::settle_against_snapshot`].
    pub(crate) fn arrival_mark(&self) -> u64 {
        self.next_arrival
    }

    /// A full snapshot of the active's map, requested at `mark`, was installed. Every
    /// client copy that arrived before the request is settled by it: a copy whose uuid
    /// the snapshot stores for its key is its echo (removed); any other is older than
    /// what the snapshot shows for its key, present or absent (superseded). Found by the
    /// simulator: a restarted backup held a copy whose echo it never saw, re-synced
    /// past it, and replayed it at failover over a newer value. Copies a stepped-down
    /// backup forwarded are settled the same way (swarm 14014: the primary had already
    /// published and replaced the forwarded update, dropped the forward as a duplicate,
    /// and the backup replayed it at a later failover); see DECISIONS.md for the window
    /// this leaves.
    ///
    /// A copy that arrived after the request is settled only if the snapshot stores its
    /// uuid: the active published it before taking the snapshot, so the snapshot is its
    /// echo, and, as for an echo that comes before its copy
    /// ([`PendingList::cancel_published`]), the key's copies that arrived before it are
    /// superseded. Any other later copy may be newer than the snapshot and stays live.
    ///
    /// Only the keys the snapshot `covers` are settled: a snapshot cut short (the
    /// active died while sending it) shows nothing about the keys it did not reach.
    /// Returns how many copies were superseded.
    pub(crate) fn settle_against_snapshot(
        &mut self,
        mark: u64,
        covers: impl Fn(&[u8]) -> bool,
        stored_uuid: impl Fn(&[u8]) -> Option<Uuid>,
    ) -> usize {
        let live: Vec<(Vec<u8>, Vec<u64>)> = self
            .live_copies_by_key
            .iter()
            .filter(|(key, _)| covers(key))
            .map(|(key, arrivals)| (key.to_vec(), arrivals.as_slice().to_vec()))
            .collect();
        let mut superseded_count = 0;
        for (key, arrivals) in live {
            let stored = stored_uuid(&key);
            let published = arrivals.iter().copied().find(|arrival| {
                stored.is_some() && self.by_arrival.get(arrival).copied() == stored
            });
            for arrival in arrivals {
                let Some(uuid) = self.by_arrival.get(&arrival).copied() else {
                    continue;
                };
                if Some(arrival) == published {
                    self.remove(&uuid);
                    continue;
                }
                if arrival >= mark && published.is_none_or(|published| arrival > published) {
                    continue;
                }
                if let Some(Held {
                    kind: Kind::ClientCopy { superseded, .. },
                    ..
                }) = self.by_uuid.get_mut(&uuid)
                {
                    *superseded = true;
                    superseded_count += 1;
                    self.unlink_live_copy(&key, arrival);
                }
            }
        }
        superseded_count
    }

    /// Drops entries older than `max_age`.
    pub(crate) fn evict_older_than(&mut self, now: Instant, max_age: Duration) -> Evicted {
        let mut evicted = Evicted::default();
        while let Some(oldest) = self.oldest_arrived_at() {
            if now.saturating_duration_since(oldest) < max_age {
                break;
            }
            if let Some(kind) = self.pop_oldest() {
                evicted.count(&kind);
            }
        }
        evicted
    }

    /// Empties the list, returning the client copies to replay (arrival order) and the
    /// number skipped: superseded by the active, or followed by a later copy of the same
    /// key. Only the latest copy per key is replayed: earlier ones would be overwritten
    /// within the same replay, and publishing them first can put a key back to a value
    /// the old active had already replaced (found by the simulator, seed 22: copies A, B,
    /// delete of one key, where the old active had published B but not A; replaying all
    /// three published A, then B over it, then the delete).
    pub(crate) fn take_replay(&mut self) -> (Vec<Replay>, usize) {
        let mut latest: BTreeMap<Vec<u8>, (u64, Replay)> = BTreeMap::new();
        let mut skipped = 0;
        let by_arrival = std::mem::take(&mut self.by_arrival);
        for (arrival, uuid) in &by_arrival {
            if let Some(Held {
                kind:
                    Kind::ClientCopy {
                        update,
                        expires_at,
                        superseded,
                        ..
                    },
                ..
            }) = self.by_uuid.remove(uuid)
            {
                if superseded {
                    skipped += 1;
                    continue;
                }
                let update = update.to_kvmsg(*uuid);
                let key = update.key.clone();
                if latest
                    .insert(key, (*arrival, Replay { update, expires_at }))
                    .is_some()
                {
                    skipped += 1;
                }
            }
        }
        let mut replay: Vec<(u64, Replay)> = latest.into_values().collect();
        replay.sort_by_key(|(arrival, _)| *arrival);
        // A fresh table: a cleared one would keep its capacity.
        self.by_uuid = ByUuid::with_hasher(*self.by_uuid.hasher());
        self.bytes = 0;
        self.live_copies_by_key.clear();
        (
            replay.into_iter().map(|(_, replay)| replay).collect(),
            skipped,
        )
    }

    fn next_arrival(&mut self) -> u64 {
        let arrival = self.next_arrival;
        self.next_arrival = self.next_arrival.wrapping_add(1);
        arrival
    }

    fn insert(&mut self, uuid: Uuid, held: Held) {
        self.bytes = self.bytes.saturating_add(held.bytes());
        self.by_arrival.insert(held.arrival, uuid);
        self.by_uuid.insert(uuid, held);
    }

    /// The list's bound: evicts the oldest entries until one of `incoming` bytes fits
    /// within `budget` (entries and bytes).
    fn make_room(&mut self, budget: Budget, incoming: usize) -> Evicted {
        let mut evicted = Evicted::default();
        while !budget.admits(self.len(), self.bytes, incoming) {
            match self.pop_oldest() {
                Some(kind) => evicted.count(&kind),
                None => break,
            }
        }
        evicted
    }

    fn pop_oldest(&mut self) -> Option<Kind> {
        let (_, uuid) = self.by_arrival.pop_first()?;
        self.remove(&uuid)
    }

    fn remove(&mut self, uuid: &Uuid) -> Option<Kind> {
        self.remove_unlinking(uuid).map(|(kind, _)| kind)
    }

    /// Removes the entry for `uuid`; with it, whether it was a client copy whose key
    /// is left with no live copy in the index.
    fn remove_unlinking(&mut self, uuid: &Uuid) -> Option<(Kind, bool)> {
        let held = self.by_uuid.remove(uuid)?;
        self.bytes = self.bytes.saturating_sub(held.bytes());
        self.by_arrival.remove(&held.arrival);
        let key_left_without_copies = match &held.kind {
            Kind::ClientCopy { update, .. } => self.unlink_live_copy(update.key(), held.arrival),
            Kind::Echo => false,
        };
        Some((held.kind, key_left_without_copies))
    }

    /// Takes `arrival` off `key`'s live copies; true when the key has none left.
    fn unlink_live_copy(&mut self, key: &[u8], arrival: u64) -> bool {
        // One search whether or not others are left (almost always none are).
        match self.remove_live_copies(key) {
            Some((key, mut arrivals)) => {
                if arrivals.remove(arrival) {
                    true
                } else {
                    self.live_copies_by_key.insert(key, arrivals);
                    false
                }
            }
            None => true,
        }
    }

    /// Removes `key`'s entry from the index, looked up as a [`Key`] when it is short.
    fn remove_live_copies(&mut self, key: &[u8]) -> Option<(Key, Arrivals)> {
        match Key::inline(key) {
            Some(key) => self.live_copies_by_key.remove_entry(&key),
            None => self.live_copies_by_key.remove_entry(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmsg::Limits;

    #[test]
    fn a_held_copy_gives_back_the_message_an_owned_copy_would_have_been() {
        let uuid = Uuid::from_bytes([5; 16]);
        let cases: Vec<[Vec<u8>; 5]> = vec![
            KvMsg::kvset(b"/k".to_vec(), b"value".to_vec(), uuid).encode(),
            KvMsg::kvset_delete(b"/deleted".to_vec(), uuid).encode(),
            KvMsg::kvset(vec![b'x'; 200], vec![7; 1000], uuid)
                .with_ttl(Duration::from_secs(5))
                .with_sequence(-3)
                .encode(),
            // A last property record without its `\n`: held normalised, as KvMsg is.
            [
                b"/p".to_vec(),
                9i64.to_be_bytes().to_vec(),
                uuid.as_bytes().to_vec(),
                b"ttl=5\nowner=me".to_vec(),
                b"v".to_vec(),
            ],
        ];
        for frames in cases {
            let update = KvMsgRef::decode(&frames, &Limits::default()).expect("valid");
            let held = HeldUpdate::new(&update);
            assert_eq!(held.key(), update.key);
            assert_eq!(held.to_kvmsg(uuid), update.to_kvmsg());
        }
    }

    #[test]
    fn a_resume_change_supersedes_only_the_copies_of_its_key_that_arrived_before_its_own() {
        // Swarm 639914810480: a resume reply's delete echoed its copy by uuid; an older
        // copy of the key, arrived before it, stayed live and was replayed at failover
        // over the delete.
        let held = || holding(&[(1, b"/k"), (2, b"/k")]);
        let resumed = |list: &mut PendingList, n: u8| {
            list.observe_active_update(
                Instant::ZERO,
                Some(numbered_uuid(n)),
                b"/k",
                true,
                false,
                ROOMY,
            );
        };
        // The resume change of the second copy's update (not live: it may predate
        // copies that arrived after its own): the first copy arrived before it.
        let mut list = held();
        resumed(&mut list, 2);
        assert_eq!(replayed(&mut list), [], "the first copy is superseded");
        // The change of the first copy's update leaves the second, which may be newer.
        let mut list = held();
        resumed(&mut list, 1);
        assert_eq!(replayed(&mut list), [Some(numbered_uuid(2))]);
    }

    const ROOMY: Budget = Budget {
        max_len: 100,
        max_bytes: usize::MAX,
    };

    fn numbered_uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    /// A list holding, in this order, copy `n` of each `(n, key)`.
    fn holding(copies: &[(u8, &[u8])]) -> PendingList {
        let mut list = PendingList::new(HashKey::from_bytes([7; 16]));
        for &(n, key) in copies {
            let copy = KvMsg::kvset(key.to_vec(), vec![n], numbered_uuid(n));
            let (fate, _) = list.hold_client_copy(
                Instant::ZERO,
                numbered_uuid(n),
                &copy.as_msg_ref(),
                None,
                ROOMY,
            );
            assert!(matches!(fate, ClientCopyFate::Held));
        }
        list
    }

    fn replayed(list: &mut PendingList) -> Vec<Option<Uuid>> {
        let (replay, _) = list.take_replay();
        replay.iter().map(|entry| entry.update.uuid).collect()
    }

    #[test]
    fn the_key_index_forgets_a_key_once_its_last_live_copy_is_gone() {
        let mut list = holding(&[(1, b"/a"), (2, b"/b"), (3, b"/b")]);
        for (n, key) in [(1, &b"/a"[..]), (2, b"/b"), (3, b"/b")] {
            list.observe_active_update(
                Instant::ZERO,
                Some(numbered_uuid(n)),
                key,
                false,
                false,
                ROOMY,
            );
        }
        assert_eq!(list.len(), 0);
        assert!(list.live_copies_by_key.is_empty(), "{list:?}");
    }

    #[test]
    fn a_copy_that_fills_the_byte_budget_is_held_and_one_byte_more_is_refused() {
        let copy = KvMsg::kvset(b"/k".to_vec(), vec![1; 10], numbered_uuid(1));
        let size = Held::client_copy_bytes(&HeldUpdate::new(&copy.as_msg_ref()));
        let fate = |max_bytes: usize| {
            let mut list = PendingList::new(HashKey::from_bytes([7; 16]));
            let budget = Budget {
                max_len: 10,
                max_bytes,
            };
            let (fate, _) = list.hold_client_copy(
                Instant::ZERO,
                numbered_uuid(1),
                &copy.as_msg_ref(),
                None,
                budget,
            );
            fate
        };
        assert!(matches!(fate(size), ClientCopyFate::Held));
        assert!(matches!(fate(size - 1), ClientCopyFate::TooLarge));
    }

    #[test]
    fn an_update_published_under_a_copys_uuid_for_another_key_supersedes_by_its_own_key() {
        // A client reusing a uuid for another key: the update's key decides.
        let published = |published_after_held: bool| {
            let mut list = holding(&[(1, b"/b"), (2, b"/a")]);
            list.observe_active_update(
                Instant::ZERO,
                Some(numbered_uuid(2)),
                b"/b",
                true,
                published_after_held,
                ROOMY,
            );
            replayed(&mut list)
        };
        assert_eq!(
            published(true),
            [],
            "a live KVPUB of /b supersedes its copy"
        );
        assert_eq!(
            published(false),
            [Some(numbered_uuid(1))],
            "a resume change of /b: the copy under its uuid was of /a, so none of /b's \
             copies is known to be older"
        );
    }

    #[test]
    fn the_debug_form_lists_held_copies_in_arrival_order_whatever_the_hash_key() {
        // Traces print it: it must not depend on the hash table's order.
        let budget = Budget {
            max_len: 100,
            max_bytes: usize::MAX,
        };
        let described = |hash_key: u8| {
            let mut list = PendingList::new(HashKey::from_bytes([hash_key; 16]));
            for (n, key) in [(3u8, "/c"), (1, "/a"), (2, "/b")] {
                let uuid = Uuid::from_bytes([n; 16]);
                let copy = KvMsg::kvset(key.as_bytes().to_vec(), b"v".to_vec(), uuid);
                list.hold_client_copy(Instant::ZERO, uuid, &copy.as_msg_ref(), None, budget);
            }
            format!("{list:?}")
        };
        let text = described(1);
        let at = |key: &str| text.find(&format!("key: \"{key}\"")).unwrap_or(usize::MAX);
        assert!(
            at("/c") < at("/a") && at("/a") < at("/b") && at("/b") < usize::MAX,
            "{text}"
        );
        for hash_key in 2..20 {
            assert_eq!(described(hash_key), text);
        }
    }

    #[test]
    fn the_entry_overhead_covers_a_held_copys_bookkeeping_at_its_worst() {
        use std::mem::size_of;
        // The hash map's slot and control byte at hashbrown's lowest load (7/16, just
        // after it doubled); an ordered map's entry in a leaf at its lowest occupancy
        // (5 of 11), plus a tenth for the inner nodes; the held bytes' allocation header.
        let by_uuid = (size_of::<(Uuid, Held)>() + 1) * 16 / 7;
        let btree = |entry: usize| (11 * entry + 16) / 5 * 11 / 10;
        let by_arrival = btree(size_of::<(u64, Uuid)>());
        let by_key = btree(size_of::<(Key, Arrivals)>());
        let worst = by_uuid + by_arrival + by_key + 16;
        assert!(
            worst <= ENTRY_OVERHEAD,
            "{worst} bytes per held copy > {ENTRY_OVERHEAD}"
        );
    }
}
