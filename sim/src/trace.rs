//! The simulator's trace, shared by its worlds: a hash of every traced event (so that two
//! runs of one seed can be compared) and, by [`TraceMode`], the recent events kept for a
//! failure report or every event printed.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};

use crate::world::TraceMode;

/// A world's trace: the hash of every event, and the events kept or printed.
#[derive(Debug)]
pub(crate) struct Trace {
    mode: TraceMode,
    hasher: TraceHasher,
    recent: VecDeque<String>,
    keep: usize,
}

impl Trace {
    /// A trace in `mode` that keeps the last `keep` events for a report.
    pub(crate) fn new(mode: TraceMode, keep: usize) -> Trace {
        Trace {
            mode,
            hasher: TraceHasher::default(),
            recent: VecDeque::new(),
            keep,
        }
    }

    /// Records an event at `now`: hashed always; described (only when the mode needs it)
    /// for the recent events or printed.
    pub(crate) fn record<N: Hash + Debug, T: Hash + ?Sized>(
        &mut self,
        now: &N,
        describe: impl FnOnce() -> String,
        data: &T,
    ) {
        now.hash(&mut self.hasher);
        data.hash(&mut self.hasher);
        match self.mode {
            TraceMode::Hash => {}
            TraceMode::Recent => {
                if self.recent.len() == self.keep {
                    self.recent.pop_front();
                }
                self.recent.push_back(format!("{now:?} {}", describe()));
            }
            TraceMode::Print => println!("{now:?} {}", describe()),
        }
    }

    /// The trace hash and the recent events kept.
    pub(crate) fn finish(self) -> (u64, Vec<String>) {
        (self.hasher.finish(), self.recent.into_iter().collect())
    }
}

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
