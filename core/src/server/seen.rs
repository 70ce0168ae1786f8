//! The uuids of updates a server has seen published, within a bounded window.
//!
//! A KVSET whose uuid is here was already published (by this server, or by the active it
//! followed) and is dropped as a duplicate: applying it again would put its key back to
//! an older value. Duplicates come from the dual-active resolution (a stepped-down backup
//! forwards updates the primary may already have), from a client's copy that arrives
//! after the echo, and from networks that duplicate. The window is bounded; an update
//! older than the window that comes again is indistinguishable from a new write, as it is
//! in the protocol itself (CHP carries no write order).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::BuildHasherDefault;

use crate::kvmsg::Uuid;

/// Hashing with a fixed (zero) SipHash key: deterministic, no OS randomness. For sets
/// and maps that are only looked up, never iterated, so that their order cannot reach
/// an output or a trace.
pub(crate) type FixedState = BuildHasherDefault<DefaultHasher>;

/// The window's members; its order is `oldest_first`'s.
type Members = HashSet<u128, FixedState>;

/// Uuids are held as `u128`s. The set is searched on every update and changed twice per
/// published update (one in, the oldest out): a hash set does both in a few hundred
/// instructions, where an ordered set of 100 000 uuids took about 2 000.
#[derive(Clone, Default)]
pub(crate) struct SeenUpdates {
    members: Members,
    oldest_first: VecDeque<u128>,
}

impl fmt::Debug for SeenUpdates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

fn as_int(uuid: &Uuid) -> u128 {
    u128::from_be_bytes(*uuid.as_bytes())
}

impl SeenUpdates {
    /// Remembers `uuid`, forgetting the oldest beyond `window`.
    pub(crate) fn insert(&mut self, uuid: Uuid, window: usize) {
        let uuid = as_int(&uuid);
        if !self.members.insert(uuid) {
            return;
        }
        self.oldest_first.push_back(uuid);
        while self.oldest_first.len() > window.max(1) {
            if let Some(oldest) = self.oldest_first.pop_front() {
                self.members.remove(&oldest);
            }
        }
    }

    pub(crate) fn contains(&self, uuid: &Uuid) -> bool {
        self.members.contains(&as_int(uuid))
    }

    /// The remembered uuids, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.oldest_first
            .iter()
            .map(|bits| Uuid::from_bytes(bits.to_be_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_forgets_the_oldest_first() {
        let mut seen = SeenUpdates::default();
        for n in 0..5u8 {
            seen.insert(Uuid::from_bytes([n; 16]), 3);
        }
        assert!(!seen.contains(&Uuid::from_bytes([1; 16])));
        assert!(seen.contains(&Uuid::from_bytes([2; 16])));
        assert!(seen.contains(&Uuid::from_bytes([4; 16])));
        seen.insert(Uuid::from_bytes([4; 16]), 3);
        assert!(
            seen.contains(&Uuid::from_bytes([2; 16])),
            "a repeat does not evict"
        );
    }
}
