//! The simulator's trace hash, shared by its worlds.

use std::hash::Hasher;

/// The trace hash: FxHash's mixing, a word at a time, over every traced event.
/// Deterministic across runs and builds (std's `DefaultHasher` promises neither) and a
/// fraction of SipHash's cost on the simulator's hottest path; it only has to tell two
/// runs of one seed apart, not resist an adversary.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TraceHasher(u64);

impl TraceHasher {
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for TraceHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(word);
            self.mix(u64::from_le_bytes(buffer));
        }
        let mut tail = [0u8; 8];
        let rest = words.remainder();
        if let Some(prefix) = tail.get_mut(..rest.len()) {
            prefix.copy_from_slice(rest);
        }
        self.mix(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 56));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
