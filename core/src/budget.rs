//! Count and byte budgets of the buffers that input fills.
//!
//! Every structure a peer or a client can grow (the server's pending list, sync backlog,
//! dedupe window, split log and snapshot streams; a client's update buffer and updates
//! in flight) is bounded twice: by entries and
//! by bytes. A structure's bytes are an upper estimate of the heap it holds: the
//! variable part of each entry (key, properties, body) plus a fixed overhead per entry
//! that covers its share of the indexes around it. Whether one more entry fits is
//! decided by `Budget::admits`, the one rule all of them use; what a structure does
//! when it does not fit (evict the oldest, start the sync over) is its own.
//!
//! [`BoundedStructure`] reports a structure's use next to its bounds, so that a host
//! (the simulator's oracle 7, a metrics endpoint) can check every one of them.

use std::fmt;

use crate::kvmsg::Limits;

/// Heap bytes a held message costs beyond its key, properties and body: its header,
/// its slots in the indexes around it (a hash map slot, ordered-map nodes), and
/// allocator rounding. An upper estimate, sized for the most indexed entry, a pending
/// client copy (three indexes at their emptiest: about 365 bytes, checked by a unit test
/// of the pending list); the other structures' entries cost less.
pub const ENTRY_OVERHEAD: usize = 384;

/// The bytes a message with these frame lengths is charged in a budget.
pub(crate) fn message_bytes(key: usize, properties: usize, body: usize) -> usize {
    ENTRY_OVERHEAD
        .saturating_add(key)
        .saturating_add(properties)
        .saturating_add(body)
}

/// The most one valid message can be charged: every frame at its limit.
pub(crate) fn largest_message_bytes(limits: &Limits) -> usize {
    message_bytes(
        limits.max_key_len,
        limits.max_properties_len,
        limits.max_body_len,
    )
}

/// A count bound and a byte bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    pub(crate) max_len: usize,
    pub(crate) max_bytes: usize,
}

impl Budget {
    /// Whether a structure holding `len` entries in `bytes` may take one more of
    /// `incoming` bytes and stay within both bounds.
    pub(crate) fn admits(&self, len: usize, bytes: usize, incoming: usize) -> bool {
        len < self.max_len && bytes.saturating_add(incoming) <= self.max_bytes
    }
}

/// Which structure a [`BoundedStructure`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Structure {
    /// The passive's pending list: client copies and early echoes.
    PendingList,
    /// What a passive buffers of the active's updates: before it is passive, and while
    /// its current sync attempt runs.
    SyncBacklog,
    /// What earlier sync attempts and earlier connections buffered, kept for a failover
    /// mid-sync.
    SyncSetAside,
    /// The uuids of published updates remembered to drop repeats.
    DedupeWindow,
    /// The uuids of the snapshot being adopted.
    SyncDedupeWindow,
    /// The keys an active backup changed, to forward after a split brain.
    SplitLog,
    /// Open snapshot streams and the per-client state around them.
    SnapshotStreams,
    /// The map's recent changes, kept to answer a peer that resumes.
    RecentChanges,
    /// The changes of a resume reply, held until its KTHXBAI.
    ResumeReply,
    /// A client's subscriber updates held while its snapshot is in progress.
    ClientUpdateBuffer,
    /// A client's own updates awaiting their echo.
    ClientInFlight,
}

impl Structure {
    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Structure::PendingList => "pending_list",
            Structure::SyncBacklog => "sync_backlog",
            Structure::SyncSetAside => "sync_set_aside",
            Structure::DedupeWindow => "dedupe_window",
            Structure::SyncDedupeWindow => "sync_dedupe_window",
            Structure::SplitLog => "split_log",
            Structure::SnapshotStreams => "snapshot_streams",
            Structure::RecentChanges => "recent_changes",
            Structure::ResumeReply => "resume_reply",
            Structure::ClientUpdateBuffer => "client_update_buffer",
            Structure::ClientInFlight => "client_in_flight",
        }
    }
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One bounded structure's use and its bounds ([`crate::server::Server::bounds`],
/// [`crate::client::Client::bounds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundedStructure {
    /// Which one.
    pub structure: Structure,
    /// Entries held now.
    pub len: usize,
    /// Most entries it may hold.
    pub max_len: usize,
    /// Bytes charged now.
    pub bytes: usize,
    /// Most bytes it may be charged.
    pub max_bytes: usize,
}

impl BoundedStructure {
    /// True when both the count and the bytes are within their bounds.
    pub fn within_bounds(&self) -> bool {
        self.len <= self.max_len && self.bytes <= self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_entry_fits_only_below_both_bounds() {
        let budget = Budget {
            max_len: 2,
            max_bytes: 1000,
        };
        assert!(budget.admits(0, 0, 1000));
        assert!(!budget.admits(0, 0, 1001), "too many bytes");
        assert!(!budget.admits(2, 0, 1), "too many entries");
        assert!(budget.admits(1, 999, 1));
        assert!(!budget.admits(1, usize::MAX, 1), "no overflow");
    }

    #[test]
    fn a_message_is_charged_its_frames_plus_the_overhead() {
        assert_eq!(message_bytes(3, 5, 7), ENTRY_OVERHEAD + 15);
        assert_eq!(message_bytes(usize::MAX, 1, 1), usize::MAX, "saturates");
        let limits = Limits::default();
        assert_eq!(
            largest_message_bytes(&limits),
            ENTRY_OVERHEAD + limits.max_key_len + limits.max_properties_len + limits.max_body_len
        );
    }

    #[test]
    fn a_structure_is_within_bounds_only_within_both() {
        let bound = |len, bytes| BoundedStructure {
            structure: Structure::SplitLog,
            len,
            max_len: 2,
            bytes,
            max_bytes: 100,
        };
        assert!(bound(2, 100).within_bounds(), "at both bounds");
        assert!(!bound(3, 100).within_bounds(), "one entry too many");
        assert!(!bound(2, 101).within_bounds(), "one byte too many");
        assert!(!bound(3, 101).within_bounds());
    }

    #[test]
    fn structures_have_distinct_snake_case_names() {
        let all = [
            Structure::PendingList,
            Structure::SyncBacklog,
            Structure::SyncSetAside,
            Structure::DedupeWindow,
            Structure::SyncDedupeWindow,
            Structure::SplitLog,
            Structure::SnapshotStreams,
            Structure::RecentChanges,
            Structure::ResumeReply,
            Structure::ClientUpdateBuffer,
            Structure::ClientInFlight,
        ];
        let names: std::collections::BTreeSet<&str> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), all.len(), "{names:?}");
        assert_eq!(Structure::PendingList.as_str(), "pending_list");
        for structure in all {
            let name = structure.as_str();
            assert!(
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert_eq!(structure.to_string(), name, "Display is the name");
        }
    }

    proptest! {
        /// Filling a structure by the rule, evicting the oldest until the newcomer
        /// fits, never leaves it past either bound.
        #[test]
        fn evicting_until_admitted_keeps_both_bounds(
            max_len in 1usize..50,
            max_bytes in 300usize..20_000,
            sizes in proptest::collection::vec(0usize..300, 0..200),
        ) {
            let budget = Budget { max_len, max_bytes };
            let mut held: std::collections::VecDeque<usize> = Default::default();
            let mut bytes = 0usize;
            for size in sizes {
                let size = message_bytes(0, 0, size).min(max_bytes);
                while !budget.admits(held.len(), bytes, size) {
                    let Some(oldest) = held.pop_front() else { break };
                    bytes -= oldest;
                }
                prop_assert!(budget.admits(held.len(), bytes, size));
                held.push_back(size);
                bytes += size;
                prop_assert!(held.len() <= max_len && bytes <= max_bytes);
            }
        }
    }
}
