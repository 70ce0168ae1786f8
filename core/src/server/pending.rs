//! The passive server's pending list (PROTOCOL.md §6).
//!
//! A client sends every update to both servers. The passive holds its copy here, keyed
//! by uuid, until the active's published echo of the same uuid shows that the update
//! is safe. Either copy may arrive first: an echo that beats the client's copy is kept
//! (as [`Kind::Echo`]) to cancel that copy when it comes. At failover the remaining
//! client copies are replayed.
//!
//! Two hazards of the reference are closed here:
//! - the list is bounded by size (always) and by age (while the active is alive: an
//!   update the active has not echoed for that long will never be echoed), so echoes
//!   whose client copy never comes cannot pile up;
//! - a client copy is *superseded* when the active publishes a later update of the
//!   same key after the copy arrived, or when a full snapshot from the active, requested
//!   after the copy arrived, is installed (the snapshot states every key, present or
//!   absent, at a point the copy preceded); a superseded copy is still matched by its
//!   echo but never replayed, so a replay cannot overwrite a newer value or bring back
//!   a deleted key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::seen::FixedState;
use super::store::Key;
use crate::kvmsg::{KvMsg, Uuid};
use crate::time::{EpochMillis, Instant};

#[derive(Clone, Debug)]
enum Kind {
    /// A client's update that the active has not echoed yet.
    ClientCopy {
        update: KvMsg,
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

/// What became of a client's copy handed to [`PendingList::hold_client_copy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientCopyFate {
    /// Now held until its echo comes.
    Held,
    /// The active's echo had already come: the copy is dropped.
    CancelledByEcho,
    /// A copy with this uuid is already held.
    Duplicate,
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
type ByUuid = HashMap<Uuid, Held, FixedState>;

#[derive(Clone, Default)]
pub(crate) struct PendingList {
    by_uuid: ByUuid,
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
    pub(crate) fn len(&self) -> usize {
        self.by_uuid.len()
    }

    /// When the oldest entry was held.
    pub(crate) fn oldest_arrived_at(&self) -> Option<Instant> {
        let (_, uuid) = self.by_arrival.first_key_value()?;
        self.by_uuid.get(uuid).map(|held| held.arrived_at)
    }

    /// A client's update seen while not active. `update.uuid` must be set.
    pub(crate) fn hold_client_copy(
        &mut self,
        now: Instant,
        uuid: Uuid,
        update: KvMsg,
        expires_at: Option<EpochMillis>,
        max_len: usize,
    ) -> (ClientCopyFate, Evicted) {
        match self.by_uuid.get(&uuid).map(|held| &held.kind) {
            Some(Kind::Echo) => {
                self.cancel_published(&uuid, &update.key);
                return (ClientCopyFate::CancelledByEcho, Evicted::default());
            }
            Some(Kind::ClientCopy { .. }) => {
                return (ClientCopyFate::Duplicate, Evicted::default())
            }
            None => {}
        }
        let evicted = self.make_room(max_len);
        let arrival = self.next_arrival();
        match self.live_copies_by_key.get_mut(update.key.as_slice()) {
            Some(arrivals) => arrivals.push(arrival),
            None => {
                self.live_copies_by_key
                    .insert(Key::from(update.key.as_slice()), Arrivals::One(arrival));
            }
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
    /// the client copy still on its way. Client copies of the same key that are still
    /// held are superseded: the active ordered this update after them.
    pub(crate) fn observe_active_update(
        &mut self,
        now: Instant,
        uuid: Option<Uuid>,
        key: &[u8],
        remember_echo: bool,
        max_len: usize,
    ) -> Evicted {
        let mut evicted = Evicted::default();
        if let Some(uuid) = uuid {
            if self.by_uuid.contains_key(&uuid) {
                self.remove(&uuid);
            } else if remember_echo {
                evicted = self.make_room(max_len);
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
        }
        self.supersede(key);
        evicted
    }

    fn supersede(&mut self, key: &[u8]) {
        let Some(arrivals) = self.live_copies_by_key.remove(key) else {
            return;
        };
        for &arrival in arrivals.as_slice() {
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
    /// this leaves. Returns `(echoed, superseded)`.
    pub(crate) fn settle_against_snapshot(
        &mut self,
        mark: u64,
        stored_uuid: impl Fn(&[u8]) -> Option<Uuid>,
    ) -> (usize, usize) {
        let earlier: Vec<(Vec<u8>, u64)> = self
            .live_copies_by_key
            .iter()
            .flat_map(|(key, arrivals)| {
                arrivals
                    .as_slice()
                    .iter()
                    .filter(|&&arrival| arrival < mark)
                    .map(|&arrival| (key.to_vec(), arrival))
            })
            .collect();
        let (mut echoed, mut superseded_count) = (0, 0);
        for (key, arrival) in earlier {
            let Some(uuid) = self.by_arrival.get(&arrival).copied() else {
                continue;
            };
            if stored_uuid(&key) == Some(uuid) {
                self.remove(&uuid);
                echoed += 1;
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
        (echoed, superseded_count)
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
        *self = PendingList {
            next_arrival: self.next_arrival,
            ..PendingList::default()
        };
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
        self.by_arrival.insert(held.arrival, uuid);
        self.by_uuid.insert(uuid, held);
    }

    fn make_room(&mut self, max_len: usize) -> Evicted {
        let mut evicted = Evicted::default();
        while self.len() >= max_len.max(1) {
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
        let held = self.by_uuid.remove(uuid)?;
        self.by_arrival.remove(&held.arrival);
        if let Kind::ClientCopy { update, .. } = &held.kind {
            self.unlink_live_copy(&update.key, held.arrival);
        }
        Some(held.kind)
    }

    fn unlink_live_copy(&mut self, key: &[u8], arrival: u64) {
        if let Some(arrivals) = self.live_copies_by_key.get_mut(key) {
            if arrivals.remove(arrival) {
                self.live_copies_by_key.remove(key);
            }
        }
    }
}
