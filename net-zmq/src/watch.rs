//! The recent history of a client's map, for watches that resume where they left off.
//!
//! A watch names its position by the sequence of the last change it saw. [`History`]
//! keeps the latest changes in a bounded ring and answers whether a watch that saw
//! everything up to sequence N can be resumed from the ring, or must start again from a
//! snapshot of the map.
//!
//! # Invariants
//!
//! - `last` is the id of the latest change recorded (0 before any), and ids in the
//!   ring strictly increase.
//! - The ring holds every change with an id in `(resumable_from, last]`: a watch that
//!   saw everything up to N, `resumable_from <= N <= last`, misses nothing and sees
//!   nothing twice when it is sent the ring's changes above N.
//! - A change whose sequence is not above `last` (a re-sync that corrects the map after
//!   a failover: a value the new server never had, a delete it made while this client
//!   followed the other) cannot be placed in that order. It is sent to live watches
//!   with the id `last`, and the ring starts over above `last`: a watch at `last` may
//!   or may not have seen it, so it gets a snapshot.
//! - The entries of a first snapshot are the map's state, not changes: after it, the
//!   ring starts at the snapshot's sequence.

use std::collections::VecDeque;
use std::sync::Arc;

/// One committed change of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The sequence the server published it at.
    pub sequence: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The new value; `None` when the key was deleted (or expired).
    pub value: Option<Vec<u8>>,
}

/// Where a watch that saw everything up to a sequence starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Everything after it is in the ring: these changes (in order), then live ones.
    Replay(Vec<(i64, Arc<Change>)>),
    /// The sequence is above the latest change this client has seen: this client is
    /// behind, or the sequence belongs to a history it never followed.
    Ahead,
    /// The ring no longer holds (or never held) everything after it.
    Gone,
}

/// The bounded ring of recent changes; see the [module docs](self).
#[derive(Debug)]
pub struct History {
    ring: VecDeque<(i64, Arc<Change>)>,
    capacity: usize,
    ring_bytes: usize,
    max_bytes: usize,
    last: i64,
    resumable_from: Option<i64>,
}

impl History {
    /// An empty history that keeps at most `capacity` changes and `max_bytes` of keys
    /// and values.
    pub fn new(capacity: usize, max_bytes: usize) -> History {
        History {
            ring: VecDeque::new(),
            capacity,
            ring_bytes: 0,
            max_bytes,
            last: 0,
            resumable_from: None,
        }
    }

    /// The id of the latest change recorded (0 before any).
    pub fn last(&self) -> i64 {
        self.last
    }

    /// The most changes kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Notes a change that nobody can ask for (no ring, no watcher): the position moves
    /// as [`History::record`] would move it.
    pub fn skip(&mut self, sequence: i64) {
        if sequence > self.last {
            self.last = sequence;
            self.resumable_from = Some(sequence);
        } else {
            self.resumable_from = Some(self.last + 1);
        }
    }

    /// Records a change and returns the id to send it with.
    pub fn record(&mut self, change: Arc<Change>) -> i64 {
        if change.sequence <= self.last {
            self.ring.clear();
            self.ring_bytes = 0;
            self.resumable_from = Some(self.last + 1);
            return self.last;
        }
        let id = change.sequence;
        self.last = id;
        self.ring_bytes += size(&change);
        self.ring.push_back((id, change));
        while self.ring.len() > self.capacity || self.ring_bytes > self.max_bytes {
            let Some((evicted, change)) = self.ring.pop_front() else {
                break;
            };
            self.ring_bytes = self.ring_bytes.saturating_sub(size(&change));
            self.resumable_from = Some(evicted);
        }
        id
    }

    /// A snapshot at `sequence` replaced the map, after the changes it made were
    /// recorded. The first one is the starting point: nothing before it can be resumed.
    pub fn synced(&mut self, sequence: i64, first: bool) {
        if first {
            self.ring.clear();
            self.ring_bytes = 0;
            self.last = self.last.max(sequence);
            self.resumable_from = Some(self.last);
        } else if sequence > self.last {
            // The snapshot's changes are recorded; what it holds up to `sequence` is
            // the map now, so a watch anywhere in between has nothing left to miss
            // beyond the ring.
            self.last = sequence;
        }
    }

    /// Where a watch that saw everything up to `after` starts.
    pub fn resume(&self, after: i64) -> Resume {
        if after > self.last {
            return Resume::Ahead;
        }
        match self.resumable_from {
            Some(from) if from <= after => Resume::Replay(
                self.ring
                    .iter()
                    .filter(|(id, _)| *id > after)
                    .cloned()
                    .collect(),
            ),
            _ => Resume::Gone,
        }
    }
}

fn size(change: &Change) -> usize {
    change.key.len() + change.value.as_ref().map_or(0, Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(sequence: i64, key: &str) -> Arc<Change> {
        Arc::new(Change {
            sequence,
            key: key.as_bytes().to_vec(),
            value: Some(b"v".to_vec()),
        })
    }

    fn ids(resume: Resume) -> Vec<i64> {
        match resume {
            Resume::Replay(changes) => changes.into_iter().map(|(id, _)| id).collect(),
            other => panic!("expected a replay, got {other:?}"),
        }
    }

    #[test]
    fn a_watch_resumes_after_its_last_change_from_the_first_snapshot_on() {
        let mut history = History::new(10, 1 << 20);
        assert_eq!(history.resume(0), Resume::Gone);
        history.synced(5, true);
        assert_eq!(ids(history.resume(5)), Vec::<i64>::new());
        assert_eq!(history.resume(4), Resume::Gone);
        for sequence in 6..=9 {
            assert_eq!(history.record(change(sequence, "/k")), sequence);
        }
        assert_eq!(ids(history.resume(5)), vec![6, 7, 8, 9]);
        assert_eq!(ids(history.resume(7)), vec![8, 9]);
        assert_eq!(ids(history.resume(9)), Vec::<i64>::new());
        assert_eq!(history.resume(10), Resume::Ahead);
    }

    #[test]
    fn the_ring_forgets_its_oldest_changes_by_count_and_by_bytes() {
        let mut history = History::new(3, 1 << 20);
        history.synced(0, true);
        for sequence in 1..=5 {
            history.record(change(sequence, "/k"));
        }
        assert_eq!(history.resume(1), Resume::Gone);
        assert_eq!(ids(history.resume(2)), vec![3, 4, 5]);
        let mut small = History::new(100, 7);
        small.synced(0, true);
        for sequence in 1..=5 {
            small.record(change(sequence, "/k")); // 3 bytes each
        }
        assert_eq!(ids(small.resume(3)), vec![4, 5]);
        assert_eq!(small.resume(2), Resume::Gone);
    }

    #[test]
    fn a_correction_below_the_last_id_ends_every_resume_up_to_it() {
        let mut history = History::new(10, 1 << 20);
        history.synced(0, true);
        history.record(change(1, "/a"));
        history.record(change(2, "/b"));
        // A re-sync puts back /b's older value, written at 1 by the new server.
        assert_eq!(history.record(change(1, "/b")), 2);
        assert_eq!(history.resume(2), Resume::Gone);
        assert_eq!(history.record(change(3, "/c")), 3);
        assert_eq!(ids(history.resume(3)), Vec::<i64>::new());
        assert_eq!(history.resume(2), Resume::Gone);
    }

    #[test]
    fn a_later_snapshot_moves_the_last_id_without_breaking_resumes() {
        let mut history = History::new(10, 1 << 20);
        history.synced(3, true);
        history.record(change(4, "/a"));
        history.synced(6, false);
        assert_eq!(history.last(), 6);
        assert_eq!(ids(history.resume(4)), Vec::<i64>::new());
        assert_eq!(ids(history.resume(3)), vec![4]);
        history.record(change(7, "/b"));
        assert_eq!(ids(history.resume(6)), vec![7]);
    }
}
