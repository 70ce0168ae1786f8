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
use std::hash::BuildHasher;

use rand_core::Rng;
use siphasher::sip::SipHasher13;

use crate::kvmsg::Uuid;

/// The secret key of the hash tables whose keys come from the network (uuids, which
/// clients choose). Whoever knows it can compute uuids that collide and make every
/// lookup scan a chain; so a server takes a fresh one per process: the daemon draws it
/// from OS randomness, the simulator from its world seed (core itself never reads
/// randomness). The tables are only looked up, never iterated; the one output the key
/// shapes is the id of each reign this server begins (`history::draw_reign_id`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey([u64; 2]);

impl HashKey {
    /// A key made of these 16 bytes (the daemon fills them from the OS).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let (low, high) = bytes.split_at(8);
        let word = |half: &[u8]| {
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(half);
            u64::from_le_bytes(buffer)
        };
        HashKey([word(low), word(high)])
    }

    /// The key's two words, for a keyed hasher.
    pub(crate) fn words(self) -> (u64, u64) {
        (self.0[0], self.0[1])
    }

    /// A key drawn from a seeded generator (tests, the simulator).
    pub fn from_rng(rng: &mut impl Rng) -> Self {
        HashKey([rng.next_u64(), rng.next_u64()])
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secret: a log line or a panic message must not give it away.
        f.write_str("HashKey(..)")
    }
}

/// Builds SipHash-1-3 hashers under a [`HashKey`] (the function std's `HashMap` uses,
/// keyed by the caller instead of by the OS). There is deliberately no `Default`: a
/// table keyed by input always gets the server's key.
#[derive(Clone, Copy)]
pub(crate) struct KeyedState(HashKey);

impl KeyedState {
    pub(crate) fn new(key: HashKey) -> Self {
        KeyedState(key)
    }
}

impl BuildHasher for KeyedState {
    type Hasher = SipHasher13;

    fn build_hasher(&self) -> SipHasher13 {
        let HashKey([key0, key1]) = self.0;
        SipHasher13::new_with_keys(key0, key1)
    }
}

/// The window's members. Only looked up, never iterated: its order is `oldest_first`'s.
type Members = HashSet<u128, KeyedState>;

/// Uuids are held as `u128`s. The set is searched on every update and changed twice per
/// published update (one in, the oldest out): a hash set does both in a few hundred
/// instructions, where an ordered set of 100 000 uuids took about 2 000.
///
/// Bounded by the window's count; each remembered uuid costs at most
/// [`SeenUpdates::BYTES_PER_UUID`], so the count bound is also its byte bound.
#[derive(Clone)]
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
    /// Heap bytes per remembered uuid, at most: 16 in the deque, and in the hash set 16
    /// plus one control byte, at a load factor no lower than 7/16 (hashbrown grows by
    /// doubling at 7/8 full), so at most 17 × 16 / 7 < 39; the deque's capacity at most
    /// doubles its length, so 32. 32 + 39 = 71, rounded up.
    pub(crate) const BYTES_PER_UUID: usize = 72;

    pub(crate) fn new(key: HashKey) -> Self {
        SeenUpdates {
            members: Members::with_hasher(KeyedState::new(key)),
            oldest_first: VecDeque::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.oldest_first.len()
    }

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
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    fn key(seed: u64) -> HashKey {
        HashKey::from_rng(&mut ChaCha8Rng::seed_from_u64(seed))
    }

    #[test]
    fn the_hash_of_a_uuid_depends_on_the_key() {
        let uuid = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
        let hashes: Vec<u64> = (0..4)
            .map(|seed| KeyedState::new(key(seed)).hash_one(uuid))
            .collect();
        for (index, hash) in hashes.iter().enumerate() {
            assert!(!hashes[index + 1..].contains(hash), "{hashes:x?}");
        }
        assert_eq!(
            KeyedState::new(key(1)).hash_one(uuid),
            KeyedState::new(key(1)).hash_one(uuid),
            "one key, one hash"
        );
    }

    #[test]
    fn a_key_from_bytes_uses_all_sixteen() {
        let base = HashKey::from_bytes([0; 16]);
        for index in 0..16 {
            let mut bytes = [0; 16];
            bytes[index] = 1;
            assert_ne!(HashKey::from_bytes(bytes), base, "byte {index}");
        }
        assert_eq!(format!("{base:?}"), "HashKey(..)");
    }

    #[test]
    fn the_window_forgets_the_oldest_first() {
        let mut seen = SeenUpdates::new(key(0));
        for n in 0..5u8 {
            seen.insert(Uuid::from_bytes([n; 16]), 3);
        }
        assert_eq!(seen.len(), 3);
        assert!(!seen.contains(&Uuid::from_bytes([1; 16])));
        assert!(seen.contains(&Uuid::from_bytes([2; 16])));
        assert!(seen.contains(&Uuid::from_bytes([4; 16])));
        seen.insert(Uuid::from_bytes([4; 16]), 3);
        assert!(
            seen.contains(&Uuid::from_bytes([2; 16])),
            "a repeat does not evict"
        );
        let oldest_first: Vec<Uuid> = seen.iter().collect();
        let expected: Vec<Uuid> = (2..5u8).map(|n| Uuid::from_bytes([n; 16])).collect();
        assert_eq!(oldest_first, expected);
        assert_eq!(format!("{seen:?}"), format!("{expected:?}"));
    }
}
