//! The uuids of updates a server has seen published, within a bounded window.
//!
//! A KVSET whose uuid is here was already published (by this server, or by the active it
//! followed) and is dropped as a duplicate: applying it again would put its key back to
//! an older value. Duplicates come from the dual-active resolution (a stepped-down backup
//! forwards updates the primary may already have), from a client's copy that arrives
//! after the echo, and from networks that duplicate. The window is bounded; an update
//! older than the window that comes again is indistinguishable from a new write, as it is
//! in the protocol itself (CHP carries no write order).

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use crate::kvmsg::Uuid;

/// Hashing with a fixed function: deterministic, no OS randomness. For sets and maps
/// that are only looked up, never iterated, so that their order cannot reach an output
/// or a trace. Their keys are uuids, which clients choose (at random, normally).
pub(crate) type FixedState = BuildHasherDefault<UuidHasher>;

/// A multiply-and-rotate hash over 8-byte words (as rustc's `FxHasher`), finished by
/// SplitMix64's mixer so that every output bit depends on every input bit (hashbrown
/// takes its bucket from the low bits and its tag from the top seven). Uuids that
/// differ only in a few bytes (a counter, as in the benches) still spread evenly.
/// About a tenth of SipHash's cost for a 16-byte key; like SipHash under a fixed key,
/// its collisions can be computed by whoever reads this code (DECISIONS.md).
#[derive(Clone, Copy, Default)]
pub(crate) struct UuidHasher(u64);

impl UuidHasher {
    const MULTIPLIER: u64 = 0x517c_c1b7_2722_0a95;
}

impl Hasher for UuidHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in words.by_ref() {
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(word);
            self.write_u64(u64::from_le_bytes(buffer));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut buffer = [0u8; 8];
            if let Some(prefix) = buffer.get_mut(..rest.len()) {
                prefix.copy_from_slice(rest);
            }
            // The length tells "ab" from "ab\0".
            self.write_u64(u64::from_le_bytes(buffer) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::MULTIPLIER);
    }

    fn write_u128(&mut self, word: u128) {
        self.write_u64(word as u64);
        self.write_u64((word >> 64) as u64);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

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
    fn uuids_that_differ_in_one_byte_spread_over_the_buckets() {
        // A counter in the first eight bytes, as the benches make them: the low seven
        // bits (a bucket of 128) and the top seven (hashbrown's tag) must both spread.
        let hashes: Vec<u64> = (0..4096u64)
            .map(|n| {
                let mut hasher = UuidHasher::default();
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&n.to_be_bytes());
                hasher.write_u128(u128::from_be_bytes(bytes));
                hasher.finish()
            })
            .collect();
        let low: Vec<u64> = hashes.iter().map(|h| h & 127).collect();
        let top: Vec<u64> = hashes.iter().map(|h| h >> 57).collect();
        for bits in [low, top] {
            let mut counts = [0usize; 128];
            for value in bits {
                counts[value as usize] += 1;
            }
            // 32 expected per value; a weak mix leaves values empty or piled up.
            assert!(
                counts.iter().all(|&count| (8..=64).contains(&count)),
                "{counts:?}"
            );
        }
    }

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
