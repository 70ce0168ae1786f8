//! A passive server's sync with the active (PROTOCOL.md §4 and §13): what it holds while
//! it asks for a snapshot (or a resume) and follows the active's updates.
//!
//! Invariant: nothing the active published and this server received is let go before
//! the map holds it, except within a stated bound (each buffer's [`Budget`], counted
//! when it drops). Until a sync completes the map is untouched: the snapshot's entries
//! (or a resume's changes) and the active's updates are held beside it. A completed
//! sync installs the snapshot at its sequence (or this map with the resume's changes),
//! then applies the held updates numbered above it; a failover in the middle merges
//! everything held, connection by connection, newest per key (a resume's changes, which
//! replay older history, by sequence with what earlier connections brought), so that
//! what reached this server survives the takeover.

use super::{HashKey, SeenUpdates, Store};
use crate::budget::{message_bytes, Budget};
use crate::kvmsg::{KvMsg, KvMsgRef};
use crate::time::{EpochMillis, Instant};

/// Updates of the active received on one connection, in arrival order, each with its
/// absolute expiry.
pub(super) type Layer = Vec<(KvMsg, Option<EpochMillis>)>;

/// What one buffered update of the active is charged in a sync budget.
pub(super) fn buffered_bytes(update: &KvMsg) -> usize {
    message_bytes(
        update.key.len(),
        update.properties.as_frame().len(),
        update.body.len(),
    )
}

/// The bytes of a layer of buffered updates.
pub(super) fn layer_bytes(layer: &[(KvMsg, Option<EpochMillis>)]) -> usize {
    layer
        .iter()
        .map(|(update, _)| buffered_bytes(update))
        .fold(0, usize::saturating_add)
}

/// How a passive server follows the active.
#[derive(Clone, Debug)]
pub(super) enum Follow {
    /// Not passive: active, or still PRIMARY / BACKUP.
    Not,
    /// Passive, waiting for any message on the peer's publisher before asking for a
    /// snapshot, so that no update falls between the snapshot and the subscription (§4).
    AwaitingPublisher,
    /// Snapshot requested; its entries build a new map while the active's updates are
    /// buffered.
    Syncing(Box<SyncInProgress>),
    /// Applying the active's updates in sequence.
    Following,
}

/// Whether the history a sync follows goes on in its next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NextAttempt {
    /// The same history (a timeout, a misread reply): the current connection's
    /// updates came before the new request, and the snapshot will hold them.
    SameHistory,
    /// The peer began a new reign, numbered on its own: nothing held is part of it.
    NewReign,
}

#[derive(Clone, Debug)]
pub(super) struct SyncInProgress {
    pub(super) store: Store,
    pub(super) backlog: Vec<(KvMsg, Option<EpochMillis>)>,
    /// The bytes `backlog` is charged ([`buffered_bytes`]).
    pub(super) backlog_bytes: usize,
    /// How many of the backlog's first updates reached this server before the request
    /// left (the update that made it ask, and the rest of a backlog whose gap started
    /// this attempt). The peer published them before taking the snapshot, so the
    /// snapshot holds them, unless they belong to another history of the peer (read
    /// late from a connection since replaced, the peer having restarted). Either way a
    /// completed snapshot makes them moot; a failover mid-sync still merges them.
    /// Found by the simulator (the scripted scenario for swarm 16385's case): a paused
    /// backup read its restarted primary's old KVPUBs after the reconnect notice;
    /// applied after the new history's snapshot, each one's gap started another sync,
    /// which buffered them again, for ever.
    pub(super) before_request: usize,
    pub(super) backlog_overflowed: bool,
    /// What earlier attempts buffered before they timed out or were replaced (the peer
    /// began a new reign): older than this attempt's snapshot, one layer per subscriber
    /// connection, oldest first.
    pub(super) unconfirmed: Vec<Vec<(KvMsg, Option<EpochMillis>)>>,
    /// What this attempt buffered before the subscription reconnected, one layer per
    /// connection, oldest first; `backlog` is the current connection's.
    ///
    /// A completed snapshot makes all of it moot except the backlog: the snapshot was
    /// taken after `unconfirmed` (or belongs to a new history, the peer having
    /// restarted), and what it lacks of `reconnected` a gap in the backlog reveals, so
    /// another sync fetches it. Only a failover mid-sync merges it, connection by
    /// connection: sequences are compared only within one connection's layer, because
    /// across a reconnect they may number two histories (found by the simulator, swarm
    /// 42617).
    pub(super) reconnected: Vec<Vec<(KvMsg, Option<EpochMillis>)>>,
    pub(super) last_activity: Instant,
    /// While the subscription is the one the map was followed on (the sync began from
    /// following, or from a step-down ending a reign that began from following; no
    /// reconnect since): the sequence the map was followed through. An update numbered
    /// at or below it on that connection is a late copy of what the map already holds
    /// (found by the simulator, swarm 48374: a late HUGZ started a needless re-sync, late
    /// KVPUBs older than the adopted snapshot were buffered, and a failover mid-sync
    /// merged one over the newer value). A restarted active's new history comes on a
    /// new connection, which the host reports (`handle_peer_publisher_reconnected`).
    pub(super) stale_through: Option<i64>,
    /// Pending-list arrivals before this mark preceded the request.
    pub(super) pending_mark: u64,
    /// Uuids of the snapshot's entries: the history being adopted.
    pub(super) seen: SeenUpdates,
    /// Whether this attempt asked to resume, and what the reply brought so far.
    pub(super) resume: ResumeReply,
}

/// A sync attempt's resume, if it asked for one (see [`history`]).
#[derive(Clone, Debug)]
pub(super) enum ResumeReply {
    /// A full snapshot was asked for, or the peer answered the resume with one.
    Snapshot,
    /// Asked to resume after this sequence; no reply message yet. A HUGZ numbered so
    /// opens a resume reply; anything else is a full snapshot's.
    Asked { after: i64 },
    /// The changes after `after`, in order, as they arrived.
    Changes {
        after: i64,
        changes: Vec<(KvMsg, Option<EpochMillis>)>,
        /// The bytes `changes` is charged ([`buffered_bytes`]).
        bytes: usize,
    },
}

impl SyncInProgress {
    pub(super) fn new(now: Instant, hash_key: HashKey) -> Self {
        SyncInProgress {
            store: Store::default(),
            backlog: Vec::new(),
            backlog_bytes: 0,
            before_request: 0,
            backlog_overflowed: false,
            unconfirmed: Vec::new(),
            reconnected: Vec::new(),
            last_activity: now,
            stale_through: None,
            pending_mark: 0,
            seen: SeenUpdates::new(hash_key),
            resume: ResumeReply::Snapshot,
        }
    }

    /// The backlog's bound: buffers the active's `update` unless the backlog would pass
    /// `budget`; then it is emptied and marked overflowed (the next snapshot fetches
    /// what it held). Returns how many updates were let go.
    pub(super) fn buffer(
        &mut self,
        update: KvMsg,
        expires_at: Option<EpochMillis>,
        budget: Budget,
    ) -> usize {
        if self.backlog_overflowed {
            // Everything after the overflow is fetched by the next snapshot.
            return 1;
        }
        let incoming = buffered_bytes(&update);
        if budget.admits(self.backlog.len(), self.backlog_bytes, incoming) {
            self.backlog.push((update, expires_at));
            self.backlog_bytes = self.backlog_bytes.saturating_add(incoming);
            return 0;
        }
        let dropped = self.backlog.len() + 1;
        self.backlog = Vec::new();
        self.backlog_bytes = 0;
        self.before_request = 0;
        self.backlog_overflowed = true;
        dropped
    }

    /// Takes the backlog (and its bytes) away.
    pub(super) fn take_backlog(&mut self) -> Vec<(KvMsg, Option<EpochMillis>)> {
        self.backlog_bytes = 0;
        std::mem::take(&mut self.backlog)
    }

    /// The set-aside layers' bound: keeps the newest updates over all of them within
    /// `budget`, dropping from the oldest layer first. Returns how many were dropped.
    pub(super) fn bound_set_aside(&mut self, budget: Budget) -> usize {
        let mut len: usize = self.set_aside().map(|(layer, _)| layer.len()).sum();
        let mut bytes: usize = self.set_aside().map(|(_, bytes)| bytes).sum();
        let mut dropped = 0;
        for layers in [&mut self.unconfirmed, &mut self.reconnected] {
            while len > budget.max_len || bytes > budget.max_bytes {
                let Some(oldest) = layers.first_mut() else {
                    break;
                };
                if oldest.is_empty() {
                    layers.remove(0);
                    continue;
                }
                let (update, _) = oldest.remove(0);
                len -= 1;
                bytes = bytes.saturating_sub(buffered_bytes(&update));
                dropped += 1;
            }
        }
        dropped
    }

    /// The first message of a reply to a resume request decides what the reply is: a
    /// HUGZ numbered with the position asked opens a resume reply (and is consumed:
    /// returns true), anything else is a full snapshot's first message.
    pub(super) fn opens_resume_reply(&mut self, message: &KvMsgRef) -> bool {
        let ResumeReply::Asked { after } = self.resume else {
            return false;
        };
        if message.is_hugz() && message.sequence == after {
            self.resume = ResumeReply::Changes {
                after,
                changes: Vec::new(),
                bytes: 0,
            };
            return true;
        }
        self.resume = ResumeReply::Snapshot;
        false
    }

    /// Whether `kthxbai` ends the kind of reply this attempt took the reply for: a resume
    /// reply's is marked with the position its changes follow, a snapshot's is unmarked.
    /// A reply taken for the wrong kind (its first message was not the first sent) must
    /// not be installed: a resume's changes are not a map, nor a map's entries changes.
    pub(super) fn reply_ends_as_taken(&self, kthxbai: &KvMsgRef) -> bool {
        match (&self.resume, kthxbai.resumed()) {
            (ResumeReply::Changes { after, .. }, Some(marked)) => marked == Some(*after),
            (ResumeReply::Snapshot | ResumeReply::Asked { .. }, None) => true,
            (_, _) => false,
        }
    }

    /// Holds a change of a resume reply until its KTHXBAI: `Some(true)` when held,
    /// `Some(false)` when the reply outgrows `budget` (ask for a full snapshot instead),
    /// `None` when this reply is a full snapshot's.
    pub(super) fn hold_resume_change(
        &mut self,
        change: &KvMsgRef,
        expires_at: Option<EpochMillis>,
        budget: Budget,
    ) -> Option<bool> {
        let ResumeReply::Changes { changes, bytes, .. } = &mut self.resume else {
            return None;
        };
        let change = change.to_kvmsg();
        let incoming = buffered_bytes(&change);
        if !budget.admits(changes.len(), *bytes, incoming) {
            return Some(false);
        }
        changes.push((change, expires_at));
        *bytes = bytes.saturating_add(incoming);
        Some(true)
    }

    /// Everything this attempt holds of the active's publications, for the next attempt:
    /// the layers of earlier connections (set aside, oldest first), and what the current
    /// connection brought, which the next request goes out on (it becomes the next
    /// attempt's backlog, ahead of that request). What arrived of a resume reply joins
    /// the layer of the connection its request went out on, ahead of that connection's
    /// updates, so that a failover merges per key the newest of them by sequence: a
    /// resume's changes are a prefix of the history after the position, so an update
    /// received beside them may be newer. Returns the set-aside layers, the carried
    /// layer, and how many updates the carried layer let go to stay within `budget`
    /// (the oldest first).
    pub(super) fn into_next_attempt(self, budget: Budget) -> (Vec<Layer>, Layer, usize) {
        let SyncInProgress {
            mut unconfirmed,
            mut reconnected,
            mut backlog,
            resume,
            ..
        } = self;
        if let ResumeReply::Changes { mut changes, .. } = resume {
            let request_connection = reconnected.first_mut().unwrap_or(&mut backlog);
            changes.append(request_connection);
            *request_connection = changes;
        }
        unconfirmed.extend(reconnected);
        unconfirmed.retain(|layer| !layer.is_empty());
        let mut bytes = layer_bytes(&backlog);
        let mut dropped = 0;
        while backlog.len() > budget.max_len || bytes > budget.max_bytes {
            if backlog.is_empty() {
                break;
            }
            let (oldest, _) = backlog.remove(0);
            bytes = bytes.saturating_sub(buffered_bytes(&oldest));
            dropped += 1;
        }
        (unconfirmed, backlog, dropped)
    }

    /// Each set-aside layer, oldest first, with its bytes.
    pub(super) fn set_aside(
        &self,
    ) -> impl Iterator<Item = (&[(KvMsg, Option<EpochMillis>)], usize)> + '_ {
        self.unconfirmed
            .iter()
            .chain(&self.reconnected)
            .map(|layer| (layer.as_slice(), layer_bytes(layer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmsg::Uuid;

    fn sync() -> SyncInProgress {
        SyncInProgress::new(Instant::ZERO, HashKey::from_bytes([9; 16]))
    }

    fn update(key: &str, sequence: i64) -> KvMsg {
        KvMsg::kvset(
            key.as_bytes().to_vec(),
            b"v".to_vec(),
            Uuid::from_bytes([1; 16]),
        )
        .with_sequence(sequence)
    }

    fn sequences(layer: &[(KvMsg, Option<EpochMillis>)]) -> Vec<i64> {
        layer.iter().map(|(update, _)| update.sequence).collect()
    }

    const ROOMY: Budget = Budget {
        max_len: 100,
        max_bytes: usize::MAX,
    };

    #[test]
    fn only_a_hugz_at_the_position_asked_opens_a_resume_reply() {
        let mut asked = SyncInProgress {
            resume: ResumeReply::Asked { after: 5 },
            ..sync()
        };
        let mut other = asked.clone();
        let mut entry = asked.clone();
        assert!(asked.opens_resume_reply(&KvMsg::hugz(5).as_msg_ref()));
        assert!(matches!(
            asked.resume,
            ResumeReply::Changes { after: 5, .. }
        ));
        assert!(!other.opens_resume_reply(&KvMsg::hugz(4).as_msg_ref()));
        assert!(matches!(other.resume, ResumeReply::Snapshot));
        assert!(!entry.opens_resume_reply(&update("/a", 5).as_msg_ref()));
        assert!(matches!(entry.resume, ResumeReply::Snapshot));
        // Decided once: a later HUGZ of a full snapshot's reply opens nothing.
        assert!(!entry.opens_resume_reply(&KvMsg::hugz(5).as_msg_ref()));
        assert!(matches!(entry.resume, ResumeReply::Snapshot));
    }

    #[test]
    fn a_reply_is_installed_only_as_the_kind_its_kthxbai_marks() {
        let resumed = SyncInProgress {
            resume: ResumeReply::Changes {
                after: 5,
                changes: Vec::new(),
                bytes: 0,
            },
            ..sync()
        };
        let snapshot = sync();
        let unmarked = KvMsg::kthxbai(9, Vec::new());
        let marked = |after| KvMsg::kthxbai(9, Vec::new()).with_resumed(after);
        assert!(resumed.reply_ends_as_taken(&marked(5).as_msg_ref()));
        assert!(
            !resumed.reply_ends_as_taken(&marked(4).as_msg_ref()),
            "another position"
        );
        assert!(
            !resumed.reply_ends_as_taken(&unmarked.as_msg_ref()),
            "a snapshot taken for a resume"
        );
        assert!(snapshot.reply_ends_as_taken(&unmarked.as_msg_ref()));
        assert!(
            !snapshot.reply_ends_as_taken(&marked(5).as_msg_ref()),
            "a resume reply taken for a snapshot"
        );
        let mut garbled = KvMsg::kthxbai(9, Vec::new());
        assert!(garbled.properties.set(crate::kvmsg::RESUMED, b"x").is_ok());
        assert!(!resumed.reply_ends_as_taken(&garbled.as_msg_ref()));
        assert!(!snapshot.reply_ends_as_taken(&garbled.as_msg_ref()));
    }

    #[test]
    fn a_resume_reply_holds_its_changes_within_the_budget() {
        let mut full = sync();
        assert_eq!(
            full.hold_resume_change(&update("/a", 6).as_msg_ref(), None, ROOMY),
            None,
            "a full snapshot's entry is not a resume change"
        );
        let mut reply = SyncInProgress {
            resume: ResumeReply::Changes {
                after: 5,
                changes: Vec::new(),
                bytes: 0,
            },
            ..sync()
        };
        let one = Budget {
            max_len: 1,
            max_bytes: usize::MAX,
        };
        assert_eq!(
            reply.hold_resume_change(&update("/a", 6).as_msg_ref(), None, one),
            Some(true)
        );
        assert_eq!(
            reply.hold_resume_change(&update("/b", 7).as_msg_ref(), None, one),
            Some(false)
        );
        let ResumeReply::Changes { changes, bytes, .. } = &reply.resume else {
            panic!("still a resume reply");
        };
        assert_eq!(sequences(changes), [6]);
        assert_eq!(*bytes, layer_bytes(changes));
    }

    #[test]
    fn the_next_attempt_carries_the_current_connection_and_the_resume_ahead_of_it() {
        let attempt = SyncInProgress {
            unconfirmed: vec![vec![(update("/a", 1), None)]],
            backlog: vec![(update("/a", 9), None)],
            resume: ResumeReply::Changes {
                after: 5,
                changes: vec![(update("/a", 6), None), (update("/b", 7), None)],
                bytes: 0,
            },
            ..sync()
        };
        let (set_aside, carried, dropped) = attempt.clone().into_next_attempt(ROOMY);
        assert_eq!(
            set_aside.iter().map(|l| sequences(l)).collect::<Vec<_>>(),
            [[1]]
        );
        assert_eq!(sequences(&carried), [6, 7, 9]);
        assert_eq!(dropped, 0);

        // After a reconnect the request's connection is the first reconnected one.
        let reconnected = SyncInProgress {
            reconnected: vec![vec![(update("/c", 8), None)]],
            ..attempt.clone()
        };
        let (set_aside, carried, _) = reconnected.into_next_attempt(ROOMY);
        assert_eq!(
            set_aside.iter().map(|l| sequences(l)).collect::<Vec<_>>(),
            [vec![1], vec![6, 7, 8]]
        );
        assert_eq!(sequences(&carried), [9]);

        // Within the budget, the oldest go first.
        let two = Budget {
            max_len: 2,
            max_bytes: usize::MAX,
        };
        let (_, carried, dropped) = attempt.clone().into_next_attempt(two);
        assert_eq!(sequences(&carried), [7, 9]);
        assert_eq!(dropped, 1);

        // The byte bound alone drops too, and a layer exactly at it keeps everything.
        let one_update = buffered_bytes(&update("/a", 1));
        let bytes_of_two = Budget {
            max_len: 100,
            max_bytes: 2 * one_update,
        };
        let (_, carried, dropped) = attempt.into_next_attempt(bytes_of_two);
        assert_eq!(sequences(&carried), [7, 9]);
        assert_eq!(dropped, 1);
    }

    #[test]
    fn a_full_backlog_is_let_go_and_marked() {
        let mut attempt = sync();
        let one = Budget {
            max_len: 1,
            max_bytes: usize::MAX,
        };
        assert_eq!(attempt.buffer(update("/a", 1), None, one), 0);
        assert_eq!(attempt.buffer(update("/b", 2), None, one), 2);
        assert!(attempt.backlog_overflowed && attempt.backlog.is_empty());
        assert_eq!(attempt.buffer(update("/c", 3), None, one), 1);
    }

    fn layer(sequences: &[i64]) -> Layer {
        sequences
            .iter()
            .map(|&sequence| (update("/k", sequence), None))
            .collect()
    }

    fn set_aside_sequences(attempt: &SyncInProgress) -> Vec<i64> {
        attempt
            .set_aside()
            .flat_map(|(layer, _)| sequences(layer))
            .collect()
    }

    #[test]
    fn the_set_aside_layers_keep_their_newest_updates_within_the_count() {
        let mut attempt = SyncInProgress {
            unconfirmed: vec![layer(&[1, 2]), layer(&[3])],
            reconnected: vec![layer(&[4, 5])],
            ..sync()
        };
        let three = Budget {
            max_len: 3,
            max_bytes: usize::MAX,
        };
        assert_eq!(attempt.bound_set_aside(three), 2);
        // The oldest went first, whichever layer held them.
        assert_eq!(set_aside_sequences(&attempt), [3, 4, 5]);
        assert_eq!(
            attempt.bound_set_aside(three),
            0,
            "within bound: nothing more"
        );
    }

    #[test]
    fn the_set_aside_layers_keep_their_newest_updates_within_the_bytes() {
        let mut attempt = SyncInProgress {
            unconfirmed: vec![layer(&[1])],
            reconnected: vec![layer(&[2, 3])],
            ..sync()
        };
        let one_update = buffered_bytes(&update("/k", 1));
        let two_updates = Budget {
            max_len: 100,
            max_bytes: 2 * one_update,
        };
        assert_eq!(attempt.bound_set_aside(two_updates), 1);
        assert_eq!(set_aside_sequences(&attempt), [2, 3]);
        // Past the count alone (bytes within) it drops too: either bound is enough.
        let one = Budget {
            max_len: 1,
            max_bytes: usize::MAX,
        };
        assert_eq!(attempt.bound_set_aside(one), 1);
        assert_eq!(set_aside_sequences(&attempt), [3]);
    }
}
