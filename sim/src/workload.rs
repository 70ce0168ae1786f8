//! The clients' workload: sets, deletes and ephemeral sets over overlapping subtrees,
//! at a steady pace with occasional bursts.
//!
//! Every value written is unique (`c<client>.<n>` plus filler), so an oracle that sees a
//! value at a client can tell exactly which write it came from, and so whether a key went
//! back to an older value.

use std::time::Duration;

use clonekv_core::time::Instant;
use rand::RngExt;

use crate::options::WorkloadOptions;
use crate::SimRng;

/// Key groups: keys are `/k/<group>/<n>`, so subtrees can overlap in several ways.
const GROUPS: [&str; 3] = ["a", "b", "c"];

/// One write a client makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Set `key` to `value`, persistent or with a ttl.
    Set {
        /// The key.
        key: Vec<u8>,
        /// The (unique) value.
        value: Vec<u8>,
        /// The ttl of an ephemeral value.
        ttl: Option<Duration>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl Operation {
    /// The key written.
    pub fn key(&self) -> &[u8] {
        match self {
            Operation::Set { key, .. } | Operation::Delete { key } => key,
        }
    }
}

#[derive(Clone, Debug)]
struct ClientPlan {
    next_write: Instant,
    burst_left: usize,
    written: u64,
}

/// Generates the clients' writes from a seeded RNG.
#[derive(Debug)]
pub struct Workload {
    options: WorkloadOptions,
    rng: SimRng,
    clients: Vec<ClientPlan>,
    subtrees: Vec<Vec<u8>>,
    stopped: bool,
}

impl Workload {
    /// A workload for `options.clients` clients, writing from `start`.
    pub fn new(options: WorkloadOptions, mut rng: SimRng, start: Instant) -> Workload {
        let subtree_choices: [&[u8]; 6] = [b"", b"/k/", b"/k/a/", b"/k/b/", b"/k/a/1", b"/k/c/"];
        let subtrees = (0..options.clients)
            .map(|index| {
                // Drawn even when pinned: the rest of the workload's draws stay the same.
                let pick = rng.random_range(0..subtree_choices.len());
                let drawn = subtree_choices.get(pick).copied().unwrap_or(b"").to_vec();
                match options.subtrees.get(index) {
                    Some(Some(pinned)) => pinned.clone(),
                    _ => drawn,
                }
            })
            .collect();
        let mut workload = Workload {
            clients: Vec::new(),
            subtrees,
            stopped: false,
            options,
            rng,
        };
        for _ in 0..workload.options.clients {
            let first = start + workload.interval();
            workload.clients.push(ClientPlan {
                next_write: first,
                burst_left: 0,
                written: 0,
            });
        }
        workload
    }

    /// The subtree client `index` follows.
    pub fn subtree(&self, index: usize) -> &[u8] {
        self.subtrees.get(index).map_or(&[], Vec::as_slice)
    }

    /// No more writes (the healing phase).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// When the next write is due.
    pub fn next_due(&self) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        self.clients.iter().map(|plan| plan.next_write).min()
    }

    fn interval(&mut self) -> Duration {
        let mean = u64::try_from(self.options.write_interval.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.rng.random_range(0..=mean.saturating_mul(2)))
    }

    /// The next write due at or before `now`, as `(client, operation)`.
    pub fn poll(&mut self, now: Instant) -> Option<(usize, Operation)> {
        if self.stopped {
            return None;
        }
        let (client, _) = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, plan)| plan.next_write <= now)
            .min_by_key(|(index, plan)| (plan.next_write, *index))?;
        let operation = self.operation(client);
        let burst_starts = self.options.burst.sample(&mut self.rng);
        let burst_len = self.rng.random_range(1..=self.options.burst_len_max.max(1));
        let pause = self.interval();
        let quick = Duration::from_micros(self.rng.random_range(0..=1_000));
        let plan = self.clients.get_mut(client)?;
        plan.written += 1;
        if plan.burst_left == 0 && burst_starts {
            plan.burst_left = burst_len;
        }
        if plan.burst_left > 0 {
            plan.burst_left -= 1;
            plan.next_write = now + quick;
        } else {
            plan.next_write = now + pause;
        }
        Some((client, operation))
    }

    fn operation(&mut self, client: usize) -> Operation {
        let key_index = self.rng.random_range(0..self.options.keys.max(1));
        let group = GROUPS.get(key_index % GROUPS.len()).copied().unwrap_or("a");
        let key = format!("/k/{group}/{key_index}").into_bytes();
        let total =
            self.options.weight_set + self.options.weight_delete + self.options.weight_ephemeral;
        let draw = self.rng.random_range(0..total.max(1));
        if draw < self.options.weight_delete {
            return Operation::Delete { key };
        }
        let ttl = if draw < self.options.weight_delete + self.options.weight_ephemeral {
            let max = u64::try_from(self.options.ttl_max.as_millis()).unwrap_or(u64::MAX);
            Some(Duration::from_millis(self.rng.random_range(1..=max.max(1))))
        } else {
            None
        };
        let written = self.clients.get(client).map_or(0, |plan| plan.written);
        let mut value = format!("c{client}.{written}").into_bytes();
        let length = self
            .rng
            .random_range(value.len()..=self.options.value_len_max.max(value.len()));
        value.resize(length, b'~');
        Operation::Set { key, value, ttl }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derive_rng;
    use std::collections::BTreeSet;

    fn run(options: WorkloadOptions, seconds: u64) -> Vec<(Instant, usize, Operation)> {
        let mut workload = Workload::new(options, derive_rng(5, 4), Instant::ZERO);
        let end = Instant::from_millis(seconds * 1000);
        let mut out = Vec::new();
        while let Some(due) = workload.next_due().filter(|due| *due <= end) {
            while let Some((client, operation)) = workload.poll(due) {
                out.push((due, client, operation));
            }
        }
        out
    }

    #[test]
    fn every_value_written_is_unique() {
        let writes = run(WorkloadOptions::default(), 60);
        let values: Vec<&Vec<u8>> = writes
            .iter()
            .filter_map(|(_, _, operation)| match operation {
                Operation::Set { value, .. } => Some(value),
                Operation::Delete { .. } => None,
            })
            .collect();
        let distinct: BTreeSet<&Vec<u8>> = values.iter().copied().collect();
        assert!(values.len() > 100);
        assert_eq!(distinct.len(), values.len());
    }

    #[test]
    fn the_mix_follows_the_weights_and_a_zero_weight_never_happens() {
        let writes = run(
            WorkloadOptions {
                weight_delete: 0,
                ..WorkloadOptions::default()
            },
            60,
        );
        assert!(writes
            .iter()
            .all(|(_, _, op)| matches!(op, Operation::Set { .. })));
        assert!(writes
            .iter()
            .any(|(_, _, op)| matches!(op, Operation::Set { ttl: Some(_), .. })));
    }

    #[test]
    fn bursts_write_back_to_back() {
        let writes = run(
            WorkloadOptions {
                burst: crate::ratio::Ratio::ALWAYS,
                burst_len_max: 10,
                write_interval: Duration::from_secs(1),
                clients: 1,
                ..WorkloadOptions::default()
            },
            20,
        );
        let gaps = writes
            .windows(2)
            .filter(|pair| {
                pair[1].0.saturating_duration_since(pair[0].0) <= Duration::from_millis(1)
            })
            .count();
        assert!(gaps > writes.len() / 2, "{gaps} of {}", writes.len());
    }

    #[test]
    fn a_stopped_workload_writes_nothing() {
        let mut workload =
            Workload::new(WorkloadOptions::default(), derive_rng(1, 4), Instant::ZERO);
        workload.stop();
        assert_eq!(workload.next_due(), None);
        assert_eq!(workload.poll(Instant::from_millis(100_000)), None);
    }
}
