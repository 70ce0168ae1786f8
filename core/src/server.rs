//! The clone server: one sans-IO state machine holding the map, the sequence, the
//! pending list, the ttl expiries and the Binary Star FSM (PROTOCOL.md §3–§7).
//!
//! # Inputs
//!
//! Raw frames go in exactly as the sockets deliver them; decoding happens here, and
//! anything malformed or unexpected is dropped, counted by [`InputSource`] and
//! [`DropReason`] (see [`Server::counters`]) and reported as [`Event::InputDropped`].
//! Nothing a peer or client sends can make a call fail or panic.
//!
//! | socket | call |
//! |--------|------|
//! | ROUTER at P (voter): ICANHAZ? | [`Server::handle_snapshot_request`] |
//! | SUB at P+2 (collector): KVSET | [`Server::handle_collected`] |
//! | SUB to the peer's P+1: KVPUB, HUGZ | [`Server::handle_peer_update`] |
//! | SUB for the peer's Binary Star state | [`Server::handle_peer_state`] |
//! | DEALER to the peer's P: KVSYNC, KTHXBAI | [`Server::handle_peer_snapshot`] |
//! | timer | [`Server::handle_timeout`] |
//!
//! Every call takes `now` (monotonic, for timers) and `wall` (Unix epoch milliseconds,
//! used only for ttl expiries). Core never reads a clock.
//!
//! # Outputs
//!
//! After every call, drain [`Server::poll_output`] until it returns `None`; outputs
//! come out in the order they were produced (one FIFO). Then sleep until
//! [`Server::poll_timeout`] (or the next input) and call [`Server::handle_timeout`].
//!
//! Snapshot replies are not queued as outputs: they are pulled. When a request is
//! accepted the server emits [`Output::SnapshotReady`] with the client's routing id;
//! the host then calls [`Server::poll_snapshot`] for that routing id while its ROUTER
//! has room, sending each message it gets, until it returns `None`. A message that the
//! socket refused (EAGAIN under `ZMQ_ROUTER_MANDATORY`) is the host's to retry later;
//! the stream does not advance until the host pulls again. A routing id that is gone
//! (EHOSTUNREACH) is closed with [`Server::cancel_snapshot`]; a client that takes no
//! message for [`Config::snapshot_stall_timeout`] is closed by the server. This way a
//! snapshot of any size is written at the pace of the client's connection, and never
//! copied: each stream reads a point-in-time clone of the persistent map.
//!
//! ```
//! use clonekv_core::kvmsg::{KvMsg, SnapshotRequest, Uuid, BstarState};
//! use clonekv_core::server::{Config, HashKey, Output, Server};
//! use clonekv_core::time::{EpochMillis, Instant};
//!
//! let (now, wall) = (Instant::ZERO, EpochMillis(1_700_000_000_000));
//! // A daemon draws the key from OS randomness; tests and the simulator from a seed.
//! let mut server = Server::new(now, wall, Config::primary(), HashKey::from_bytes([7; 16])).unwrap();
//! server.handle_peer_state(now, wall, &[BstarState::Backup.encode()]);
//! assert_eq!(server.state(), BstarState::Active);
//!
//! let set = KvMsg::kvset(b"/a".to_vec(), b"1".to_vec(), Uuid::from_bytes([1; 16]));
//! server.handle_collected(now, wall, &set.encode());
//! server.handle_snapshot_request(now, wall, b"client-1", &SnapshotRequest::new(vec![]).encode());
//! while let Some(output) = server.poll_output() {
//!     if let Output::SnapshotReady { routing_id } = output {
//!         while let Some(frames) = server.poll_snapshot(now, &routing_id) {
//!             // send [routing_id, frames...] on the ROUTER
//!             # let _ = frames;
//!         }
//!     }
//! }
//! assert_eq!(server.sequence(), 1);
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::bstar::{self, Bstar, Cause, Role, Verdict};
use crate::kvmsg::{
    BstarState, DecodeError, KvMsg, KvMsgRef, Limits, ResumePosition, SnapshotRequest, Ttl,
    TtlError, Uuid, FRAME_COUNT,
};
use crate::time::{EpochMillis, Instant};

/// Derefs, compares and orders a type with an `as_bytes(&self) -> &[u8]` exactly as
/// those bytes (the stored keys and the outgoing frames).
macro_rules! bytes_like {
    ($type:ty) => {
        impl std::ops::Deref for $type {
            type Target = [u8];
            fn deref(&self) -> &[u8] {
                self.as_bytes()
            }
        }

        impl PartialEq for $type {
            fn eq(&self, other: &Self) -> bool {
                self.as_bytes() == other.as_bytes()
            }
        }

        impl Eq for $type {}

        impl PartialOrd for $type {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $type {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.as_bytes().cmp(other.as_bytes())
            }
        }
    };
}
use bytes_like;

mod follow;
mod frame;
pub mod history;
mod pending;
pub mod persist;
mod seen;
mod snapshot;
mod store;

use crate::budget::{largest_message_bytes, Budget};
pub use crate::budget::{BoundedStructure, Structure, ENTRY_OVERHEAD};
use follow::{buffered_bytes, layer_bytes, Follow, NextAttempt, ResumeReply, SyncInProgress};
pub use frame::Frame;
use history::{draw_reign_id, Lineage, RecentChanges, Reign};
use pending::{ClientCopyFate, Evicted, PendingList};
use persist::{Change, History, Image, Record, Restored};
pub use seen::HashKey;
use seen::SeenUpdates;
use snapshot::Reply;
use snapshot::{Pulled, SnapshotStreams, MAX_ROUTING_ID_LEN};
pub use store::Entry;
use store::{uuid_frame, Key, MapFull, MapLimits, Store};

pub use crate::bstar::ConfigError;

/// The shortest time between two HUGZ that new subscribers pull forward
/// ([`Server::handle_subscriber_joined`]): a crowd of clients connecting at once costs one
/// heartbeat per interval, not one each.
pub const WELCOME_HUGZ_INTERVAL: Duration = Duration::from_millis(50);

/// The server's timers. Each deadline is computed in one place, `Server::deadline`;
/// `poll_timeout` is the earliest, and `handle_timeout` fires the due ones in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// Binary Star's heartbeat to the peer.
    BinaryStar,
    /// The next HUGZ on the publisher.
    Heartbeat,
    /// The next ttl expiry (active only).
    Expiry,
    /// The oldest pending client copy ages out (while the active is alive).
    PendingAge,
    /// A client stopped pulling its snapshot stream.
    SnapshotStall,
    /// A sync got no reply from the active.
    PeerSync,
}

impl Timer {
    const ALL: [Timer; 6] = [
        Timer::BinaryStar,
        Timer::Heartbeat,
        Timer::Expiry,
        Timer::PendingAge,
        Timer::SnapshotStall,
        Timer::PeerSync,
    ];
}

/// Server configuration. Defaults from PROTOCOL.md; every limit is a field so that the
/// simulator can push it to extremes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Role, heartbeat (also the HUGZ interval, 1 s) and peer expiry (2 beats).
    pub bstar: bstar::Config,
    /// Size limits on decoded messages (§2).
    pub limits: Limits,
    /// Most entries the pending list holds; the oldest is dropped to make room.
    pub pending_max_len: usize,
    /// Most bytes the pending list holds (each entry charged its frames plus
    /// [`ENTRY_OVERHEAD`]); the oldest entries are dropped to make room. At least one
    /// largest valid message.
    pub pending_max_bytes: usize,
    /// Entries older than this are dropped from the pending list while the active is
    /// alive: the active has had every chance to echo them.
    pub pending_max_age: Duration,
    /// Most snapshot streams open at once, over all clients. A request past the limit
    /// is refused without a reply (like a request Binary Star rejects), counted as
    /// [`DropReason::TooManySnapshotStreams`]; the client times out and asks again.
    pub max_snapshot_streams: usize,
    /// Entries a stream reads from its map per range scan. Affects speed only.
    pub snapshot_batch: usize,
    /// A client that has not pulled a message of its snapshot for this long loses its
    /// streams, so a stuck client cannot hold a slot (and an old map) forever.
    pub snapshot_stall_timeout: Duration,
    /// A passive server re-requests the peer's snapshot when no reply message came for
    /// this long (the peer may have refused or lost the request).
    pub peer_sync_timeout: Duration,
    /// Most updates from the active a syncing passive buffers until the snapshot ends;
    /// past it the snapshot is installed and a fresh one requested. The same bound
    /// applies to what it buffers before it is passive, and separately to what earlier
    /// attempts set aside for a failover mid-sync.
    pub sync_backlog_max: usize,
    /// The same bounds in bytes (each update charged its frames plus
    /// [`ENTRY_OVERHEAD`]). At least one largest valid message.
    pub sync_backlog_max_bytes: usize,
    /// Most keys a backup records while active and possibly split from the primary,
    /// to forward if it has to step down. Further keys are counted as lost, loudly.
    pub split_log_max: usize,
    /// How many uuids of published updates the server remembers to drop a KVSET that
    /// comes again (a forward after a split brain, a network duplicate).
    pub dedupe_window: usize,
    /// Report every change of the map as [`Output::Persist`] / [`Output::PersistImage`]
    /// (see [`persist`]), for a host that records them on disk.
    pub persistence: bool,
    /// Most recent changes kept to answer a peer that resumes (see [`history`]); a peer
    /// further behind gets a full snapshot. 0 keeps none.
    pub recent_changes_max: usize,
    /// The same bound in bytes (each change charged its message plus
    /// [`ENTRY_OVERHEAD`]). At least one largest valid message.
    pub recent_changes_max_bytes: usize,
    /// A passive asks the active to resume from its map's position (see [`history`])
    /// when it can; `false`: every sync is a full snapshot.
    pub resume: bool,
    /// Most keys the map holds: a client write of a new key past it is refused
    /// ([`DropReason::MapFullKeys`]). `None`: no bound. Enforced where writes are
    /// accepted (the active); a passive applies what the active published.
    pub max_keys: Option<usize>,
    /// Most bytes the map holds (each entry charged its key, header, properties, body
    /// and [`ENTRY_OVERHEAD`]): a client write past it is refused
    /// ([`DropReason::MapFullBytes`]); deletes are always accepted. `None`: no bound.
    pub max_map_bytes: Option<usize>,
}

impl Config {
    /// The defaults for the primary.
    pub fn primary() -> Self {
        Config {
            bstar: bstar::Config::primary(),
            limits: Limits::default(),
            pending_max_len: 100_000,
            pending_max_bytes: 96 << 20,
            pending_max_age: Duration::from_secs(30),
            max_snapshot_streams: 64,
            snapshot_batch: 256,
            snapshot_stall_timeout: Duration::from_secs(30),
            peer_sync_timeout: Duration::from_secs(5),
            sync_backlog_max: 100_000,
            sync_backlog_max_bytes: 64 << 20,
            split_log_max: 100_000,
            dedupe_window: 100_000,
            persistence: false,
            recent_changes_max: 100_000,
            recent_changes_max_bytes: 32 << 20,
            resume: true,
            max_keys: None,
            max_map_bytes: None,
        }
    }

    /// The defaults for the backup.
    pub fn backup() -> Self {
        Config {
            bstar: bstar::Config::backup(),
            ..Config::primary()
        }
    }

    /// Checks that the configuration is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.bstar.validate()?;
        let counts = [
            ("limits.max_key_len", self.limits.max_key_len),
            ("pending_max_len", self.pending_max_len),
            ("max_snapshot_streams", self.max_snapshot_streams),
            ("snapshot_batch", self.snapshot_batch),
            ("sync_backlog_max", self.sync_backlog_max),
            ("dedupe_window", self.dedupe_window),
        ];
        let durations = [
            ("pending_max_age", self.pending_max_age),
            ("snapshot_stall_timeout", self.snapshot_stall_timeout),
            ("peer_sync_timeout", self.peer_sync_timeout),
        ];
        let zero_count = counts.iter().find(|(_, value)| *value == 0);
        let zero_duration = durations.iter().find(|(_, value)| value.is_zero());
        if let (Some((field, _)), _) | (None, Some((field, _))) = (zero_count, zero_duration) {
            return Err(ConfigError::Zero { field });
        }
        let largest = largest_message_bytes(&self.limits);
        let byte_budgets = [
            ("pending_max_bytes", self.pending_max_bytes),
            ("sync_backlog_max_bytes", self.sync_backlog_max_bytes),
            ("recent_changes_max_bytes", self.recent_changes_max_bytes),
        ];
        if let Some((field, _)) = byte_budgets.iter().find(|(_, value)| *value < largest) {
            return Err(ConfigError::BelowLargestMessage {
                field,
                needed: largest,
            });
        }
        if self.max_keys == Some(0) {
            return Err(ConfigError::Zero { field: "max_keys" });
        }
        if self.max_map_bytes == Some(0) {
            return Err(ConfigError::Zero {
                field: "max_map_bytes",
            });
        }
        Ok(())
    }

    /// The pending list's bounds.
    fn pending_budget(&self) -> Budget {
        Budget {
            max_len: self.pending_max_len,
            max_bytes: self.pending_max_bytes,
        }
    }

    /// The bounds of each of a passive's sync buffers.
    fn sync_budget(&self) -> Budget {
        Budget {
            max_len: self.sync_backlog_max,
            max_bytes: self.sync_backlog_max_bytes,
        }
    }

    /// The bounds of the recent changes kept for resuming peers.
    fn recent_changes_budget(&self) -> Budget {
        Budget {
            max_len: self.recent_changes_max,
            max_bytes: self.recent_changes_max_bytes,
        }
    }

    /// The split log's bounds: its count, and in bytes what that many of the longest
    /// keys are charged.
    fn split_log_budget(&self) -> Budget {
        Budget {
            max_len: self.split_log_max,
            max_bytes: self
                .split_log_max
                .saturating_mul(split_change_bytes(self.limits.max_key_len)),
        }
    }

    fn map_limits(&self) -> MapLimits {
        MapLimits {
            max_keys: self.max_keys,
            max_bytes: self.max_map_bytes,
        }
    }
}

/// What one split log entry (a key and its latest change) is charged.
fn split_change_bytes(key_len: usize) -> usize {
    ENTRY_OVERHEAD.saturating_add(key_len)
}

/// Which input a dropped message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputSource {
    /// The ROUTER at P (ICANHAZ?).
    SnapshotRequest,
    /// The collector SUB at P+2 (KVSET).
    Collector,
    /// The SUB on the peer's publisher (KVPUB, HUGZ).
    PeerUpdate,
    /// The peer's Binary Star state.
    PeerState,
    /// The DEALER to the peer's ROUTER (KVSYNC, KTHXBAI).
    PeerSnapshot,
}

impl InputSource {
    /// A stable name for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InputSource::SnapshotRequest => "snapshot_request",
            InputSource::Collector => "collector",
            InputSource::PeerUpdate => "peer_update",
            InputSource::PeerState => "peer_state",
            InputSource::PeerSnapshot => "peer_snapshot",
        }
    }
}

impl fmt::Display for InputSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an input was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The frames do not decode.
    Malformed(DecodeError),
    /// A client tried to set `HUGZ` or `KTHXBAI`, or a command came where a key update
    /// belongs.
    ReservedKey,
    /// A passive's copy of a KVSET without a uuid (valid on the wire): it cannot be
    /// matched against the active's echo, so holding it could apply it twice at a
    /// failover. The passive relies on the active's KVPUB for it instead.
    UnmatchableCopy,
    /// The `ttl` property is not a valid number of seconds.
    InvalidTtl(TtlError),
    /// A passive server already holds a client update with this uuid.
    DuplicateUuid,
    /// A snapshot request that Binary Star rejected: this server is not active (or is
    /// passive while the peer is alive). No reply is sent.
    NotActive,
    /// A snapshot request past [`Config::max_snapshot_streams`]. No reply is sent.
    TooManySnapshotStreams,
    /// A KVPUB from the peer while this server is active (split brain, or a stale one).
    PeerUpdateWhileActive,
    /// An update from the active with a sequence this server already has.
    StaleSequence,
    /// A snapshot reply while no snapshot was requested.
    UnexpectedSnapshotMessage,
    /// The sequence reached `i64::MAX`; no further update can be numbered.
    SequenceExhausted,
    /// A write of a new key while the map holds [`Config::max_keys`]: refused. The
    /// writer's client sees no echo and reports the update as not committed.
    MapFullKeys,
    /// A write that would take the map past [`Config::max_map_bytes`]: refused, as
    /// [`DropReason::MapFullKeys`].
    MapFullBytes,
    /// A client copy larger on its own than [`Config::pending_max_bytes`] (possible only
    /// with limits that allow a larger message than the budget was checked against).
    TooLargeToHold,
    /// A snapshot request whose routing id is longer than libzmq's 255 bytes.
    RoutingIdTooLong,
}

impl DropReason {
    /// A stable name for counters and logs; decode errors use
    /// [`DecodeError::reason`].
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Malformed(error) => error.reason(),
            DropReason::ReservedKey => "reserved_key",
            DropReason::UnmatchableCopy => "unmatchable_copy",
            DropReason::InvalidTtl(_) => "invalid_ttl",
            DropReason::DuplicateUuid => "duplicate_uuid",
            DropReason::NotActive => "not_active",
            DropReason::TooManySnapshotStreams => "too_many_snapshot_streams",
            DropReason::PeerUpdateWhileActive => "peer_update_while_active",
            DropReason::StaleSequence => "stale_sequence",
            DropReason::UnexpectedSnapshotMessage => "unexpected_snapshot_message",
            DropReason::SequenceExhausted => "sequence_exhausted",
            DropReason::MapFullKeys => "map_full_keys",
            DropReason::MapFullBytes => "map_full_bytes",
            DropReason::TooLargeToHold => "too_large_to_hold",
            DropReason::RoutingIdTooLong => "routing_id_too_long",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Malformed(error) => write!(f, "malformed: {error}"),
            DropReason::InvalidTtl(error) => write!(f, "invalid ttl: {error}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Why a passive server (re)started following the active with a fresh snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncReason {
    /// This server just became passive.
    BecamePassive,
    /// The peer just became active (after dual passive, the primary took over).
    PeerBecameActive,
    /// An update or heartbeat from the active showed that updates were missed (the
    /// PUB dropped some, or the connection broke) or that the active's numbering moved.
    SequenceGap {
        /// The sequence this server expected next.
        expected: i64,
        /// The sequence it received.
        received: i64,
    },
    /// The previous request got no reply message for [`Config::peer_sync_timeout`].
    Timeout,
    /// More updates arrived during the snapshot than [`Config::sync_backlog_max`].
    BacklogOverflow,
    /// The subscription to the active's publisher reconnected: messages may have been
    /// lost with the old connection, and the active may have restarted with a new
    /// history whose numbers happen to continue ours.
    PublisherReconnected,
    /// The active's resume reply held more changes than a sync may buffer; a full
    /// snapshot is asked for instead.
    ResumeTooLarge,
    /// The reply's KTHXBAI said it was not what its first message made it look like (a
    /// resume reply marks its KTHXBAI with the position it follows, a snapshot does not):
    /// its messages arrived out of order, or the peer does not mark its resume replies.
    /// Nothing of it is installed; a full snapshot is asked for instead.
    ReplyMisread,
}

/// Why pending entries were dropped without being replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionReason {
    /// The list was at [`Config::pending_max_len`] or [`Config::pending_max_bytes`].
    Size,
    /// The entries were older than [`Config::pending_max_age`] while the active lived.
    Age,
}

/// Why a snapshot stream was closed before its KTHXBAI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbandonReason {
    /// The host called [`Server::cancel_snapshot`].
    Cancelled,
    /// The client took no message for [`Config::snapshot_stall_timeout`].
    Stalled,
    /// This server stopped being active; the client will look for the active one.
    NoLongerActive,
}

/// A fact for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An input was dropped (and counted).
    InputDropped {
        /// Where it came from.
        source: InputSource,
        /// Why.
        reason: DropReason,
    },
    /// The Binary Star state changed.
    StateChanged {
        /// The state before.
        from: BstarState,
        /// The state now.
        to: BstarState,
        /// Why.
        cause: Cause,
    },
    /// Both servers were active (a split brain healed). Log loudly.
    DualActive {
        /// True on the backup, which stepped down, forwards its split updates and
        /// re-syncs; false on the primary, which keeps serving.
        stepped_down: bool,
    },
    /// Both servers were passive. Log loudly.
    DualPassive {
        /// True on the primary, which became active.
        took_over: bool,
    },
    /// The peer announced the initial state of this server's own role: both servers
    /// are configured as `role`. One event per such state message (a peer heartbeat);
    /// rate-limit the log line. While both are undecided no client is served; say
    /// how to fix it (start one with the other role).
    RoleConflict {
        /// The role both servers have.
        role: Role,
    },
    /// A snapshot was requested from the peer (or will be, once its publisher is heard).
    SyncStarted {
        /// Why.
        reason: SyncReason,
    },
    /// The peer's snapshot arrived; this server now follows the active's updates.
    SyncCompleted {
        /// The snapshot's sequence (KTHXBAI).
        sequence: i64,
        /// Keys in the map after installing it.
        keys: usize,
        /// For a resume (no full snapshot): the sequence it resumed after and the
        /// number of changes applied.
        resumed: Option<(i64, usize)>,
    },
    /// A peer asked to resume from a position of this server's history: it gets the
    /// changes after it, or a full snapshot when they are not all kept.
    ResumeAnswered {
        /// The sequence the peer's map stands at.
        after: i64,
        /// The changes sent, or `None` when a full snapshot answered.
        changes: Option<usize>,
    },
    /// This server became active in the middle of a sync: what arrived of the snapshot
    /// and the buffered updates were merged into the map, newest per key.
    SyncAbandoned {
        /// Snapshot entries merged.
        merged_entries: usize,
        /// Buffered updates applied.
        applied_updates: usize,
    },
    /// On becoming active, the pending list was replayed.
    PendingReplayed {
        /// Updates replayed (each published with a new sequence).
        replayed: usize,
        /// Updates not replayed because the active had since published a later update
        /// of the same key, or a later copy of the same key was replayed instead.
        skipped_superseded: usize,
        /// Updates not replayed because their ttl ran out while they waited.
        skipped_expired: usize,
    },
    /// Pending entries were dropped without replay.
    PendingEvicted {
        /// Client updates the active never echoed.
        client_copies: usize,
        /// Echoes whose client copy never came.
        echoes: usize,
        /// Which bound.
        reason: EvictionReason,
    },
    /// After stepping down from dual active, the updates accepted while split were sent
    /// to the primary's collector. Log loudly.
    SplitUpdatesForwarded {
        /// Keys whose latest update was forwarded.
        forwarded: usize,
        /// Keys that could not be recorded ([`Config::split_log_max`]).
        lost: u64,
    },
    /// A passive let go of buffered updates of the active to stay within
    /// [`Config::sync_backlog_max`] and [`Config::sync_backlog_max_bytes`] (counted in
    /// [`Counters::sync_buffered_dropped`]). A completed sync fetches them again; only a
    /// failover mid-sync would have used them.
    SyncBufferDropped {
        /// Updates let go.
        dropped: usize,
    },
    /// A snapshot stream was closed before its end.
    SnapshotStreamAbandoned {
        /// The client.
        routing_id: Vec<u8>,
        /// Why.
        reason: AbandonReason,
    },
}

/// An effect for the host to carry out, or an event to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send these frames on the PUB at P+1 (KVPUB or HUGZ). A KVPUB's body is shared
    /// with the stored entry, not copied.
    Publish([Frame; FRAME_COUNT]),
    /// A snapshot stream for this routing id has messages: pull them with
    /// [`Server::poll_snapshot`].
    SnapshotReady {
        /// The client's routing id on the ROUTER at P.
        routing_id: Vec<u8>,
    },
    /// Send this one frame (our Binary Star state) to the peer.
    SendStateToPeer(Vec<u8>),
    /// Send this ICANHAZ? to the peer's ROUTER. Open a fresh DEALER for each request
    /// (as the reference does), so that replies to an abandoned request cannot be
    /// mistaken for replies to this one.
    RequestPeerSnapshot(Vec<Vec<u8>>),
    /// Send this KVSET to the peer's collector (P+2): an update this server accepted
    /// while split from the primary, forwarded after stepping down.
    ForwardToPeerCollector([Vec<u8>; FRAME_COUNT]),
    /// Record this change of the map (only with [`Config::persistence`]). It comes
    /// before every output that reveals the change: a host that makes it durable before
    /// carrying out the outputs after it never shows what a crash could take back.
    Persist(Record),
    /// The map was replaced as a whole (a sync installed, or merged at a takeover): record
    /// this image, and the records after it as its log (only with
    /// [`Config::persistence`]).
    PersistImage(Image),
    /// Something to log or count.
    Event(Event),
}

/// Cumulative counts since start, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    dropped: BTreeMap<(InputSource, &'static str), u64>,
    /// Updates published (client updates, replays and expiry deletes).
    pub published: u64,
    /// Keys expired (each also counts as published).
    pub expired: u64,
    /// Snapshot streams opened.
    pub snapshots_opened: u64,
    /// Subscriptions to HUGZ the host reported (each pulls the next HUGZ forward).
    pub subscribers_joined: u64,
    /// Streams replaced before they started by a newer request from the same client
    /// (at most one waits behind the stream being sent).
    pub snapshots_superseded: u64,
    /// Snapshot streams that reached their KTHXBAI.
    pub snapshots_completed: u64,
    /// Snapshot streams closed early.
    pub snapshots_abandoned: u64,
    /// Snapshots requested from the peer.
    pub syncs_started: u64,
    /// Snapshots received in full from the peer (resumes included).
    pub syncs_completed: u64,
    /// Syncs completed by resuming: only the changes after this server's map.
    pub syncs_resumed: u64,
    /// Peers' resume requests answered with the changes they lacked.
    pub resumes_served: u64,
    /// Peers' resume requests answered with a full snapshot (another history, or
    /// changes no longer kept).
    pub resumes_refused: u64,
    /// Pending updates replayed at failover.
    pub pending_replayed: u64,
    /// Pending updates not replayed because a later update (from the active, or a later
    /// pending copy of the same key) superseded them.
    pub pending_superseded: u64,
    /// Pending updates not replayed because their ttl ran out while they waited.
    pub pending_expired: u64,
    /// Pending updates settled by a full snapshot requested after they arrived.
    pub pending_superseded_by_snapshot: u64,
    /// Pending entries evicted by size or age.
    pub pending_evicted: u64,
    /// Updates forwarded to the primary after a dual active.
    pub split_forwarded: u64,
    /// Updates of a split that could not be recorded for forwarding.
    pub split_lost: u64,
    /// State messages from a peer configured with this server's own role
    /// ([`Event::RoleConflict`]).
    pub role_conflicts: u64,
    /// The active's updates a passive let go from its sync buffers to stay within
    /// [`Config::sync_backlog_max`] and [`Config::sync_backlog_max_bytes`] (a full
    /// backlog starts the sync over; set-aside layers and what came before the
    /// passive state lose their oldest). Only a failover mid-sync would have used them.
    pub sync_buffered_dropped: u64,
}

impl Counters {
    /// Inputs dropped from `source` for `reason` (a [`DropReason::as_str`] name).
    pub fn dropped(&self, source: InputSource, reason: &str) -> u64 {
        self.dropped
            .iter()
            .filter(|((from, name), _)| *from == source && *name == reason)
            .map(|(_, count)| *count)
            .sum()
    }

    /// All inputs dropped, whatever the source and reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Every non-zero drop count, ordered by source then reason.
    pub fn dropped_by_reason(&self) -> impl Iterator<Item = (InputSource, &'static str, u64)> + '_ {
        self.dropped
            .iter()
            .map(|((source, reason), count)| (*source, *reason, *count))
    }

    fn count_drop(&mut self, source: InputSource, reason: &DropReason) {
        *self.dropped.entry((source, reason.as_str())).or_default() += 1;
    }
}

/// The latest change a backup made to a key while active (see `Server::split_log`).
#[derive(Clone, Copy, Debug)]
struct SplitChange {
    uuid: Option<Uuid>,
    sequence: i64,
}

/// The clone server state machine. See the [module docs](self) for the run loop.
#[derive(Clone, Debug)]
pub struct Server {
    config: Config,
    bstar: Bstar,
    store: Store,
    /// The sequence of the last change: published (active) or applied (passive).
    sequence: i64,
    /// The highest sequence this server ever published. A re-sync can lower
    /// `sequence` to the active's; on becoming active again numbering resumes above
    /// this, so that one server's published sequences always increase.
    highest_published: i64,
    pending: PendingList,
    /// Uuids of updates seen published, to drop KVSETs that come again.
    seen: SeenUpdates,
    snapshots: SnapshotStreams,
    follow: Follow,
    /// The peer's sequence through which this map holds what the peer published on the
    /// current subscription to its publisher, kept from when this server stopped
    /// following it (see [`Server::late_on_followed_subscription`]). Forgotten when the
    /// subscription reconnects and when a sync completes.
    followed_through: Option<i64>,
    /// Keys a backup changed while active that its peer may not hold, to forward on
    /// step-down (§7 dual active), with the uuid and sequence of their latest change.
    /// The value itself is the map's: a key present in the map is forwarded as its
    /// stored entry, an absent one as a delete. A key leaves the log when the peer's
    /// HUGZ, marked passive, carries a sequence at or above its change: the peer then
    /// holds it (see `Server::prune_split_log`).
    split_log: BTreeMap<Key, SplitChange>,
    /// Changes the log had no room for, and the sequence of the latest of them.
    split_lost: u64,
    split_lost_through: i64,
    /// The active's updates received while this server was still deciding (PRIMARY or
    /// BACKUP, just started): the sync it starts on becoming passive asks for a
    /// snapshot that holds them, but a failover before that sync completes merges them
    /// (see `SyncInProgress::unconfirmed`): the echo of such an update may already
    /// have cancelled its client copy, so this is the only place it survives.
    before_passive: VecDeque<(KvMsg, Option<EpochMillis>)>,
    /// The bytes `before_passive` is charged ([`buffered_bytes`]).
    before_passive_bytes: usize,
    /// The bytes the split log is charged ([`split_change_bytes`]).
    split_log_bytes: usize,
    /// The key of the hash tables keyed by input (uuids), and of reign ids.
    hash_key: HashKey,
    /// The map's lineage (see [`history`]), and whether the active it was synced from
    /// serves resumes.
    history: History,
    /// Reigns this process began (an input to each reign's id).
    reigns_begun: u64,
    /// The map's changes since a point, to answer a peer that resumes.
    recent: RecentChanges,
    /// The next sync asks for a full snapshot, not a resume.
    full_sync_next: bool,
    next_hugz: Instant,
    /// When the latest HUGZ went out.
    last_hugz: Option<Instant>,
    /// The latest (monotonic, wall) pair seen, to place wall-clock expiries on the
    /// monotonic timeline in `poll_timeout`.
    clock: (Instant, EpochMillis),
    outputs: VecDeque<Output>,
    counters: Counters,
}

impl Server {
    /// A server that has just started: PRIMARY or BACKUP, empty map, sequence 0.
    /// `hash_key` keys the hash tables that clients' uuids index: draw it at random per
    /// process (the daemon from the OS, the simulator from its seed), so that no client
    /// can compute uuids that collide. The ids of the reigns this server begins derive
    /// from it too ([`history`]): a key used by two processes could draw one reign id
    /// twice, and a peer could then resume across two different histories.
    pub fn new(
        now: Instant,
        wall: EpochMillis,
        config: Config,
        hash_key: HashKey,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Server {
            bstar: Bstar::new(now, config.bstar)?,
            config,
            store: Store::default(),
            sequence: 0,
            highest_published: 0,
            pending: PendingList::new(hash_key),
            seen: SeenUpdates::new(hash_key),
            snapshots: SnapshotStreams::default(),
            follow: Follow::Not,
            followed_through: None,
            split_log: BTreeMap::new(),
            split_lost: 0,
            split_lost_through: 0,
            before_passive: VecDeque::new(),
            before_passive_bytes: 0,
            split_log_bytes: 0,
            hash_key,
            history: History::default(),
            reigns_begun: 0,
            recent: RecentChanges::new(0),
            full_sync_next: false,
            next_hugz: now,
            last_hugz: None,
            clock: (now, wall),
            outputs: VecDeque::new(),
            counters: Counters::default(),
        })
    }

    /// A server that has just started from what it recorded before (see [`persist`]):
    /// PRIMARY or BACKUP as [`Server::new`], with the restored map and sequence.
    /// Numbering continues above the highest sequence it ever published; Binary Star
    /// decides as for a fresh start whether it serves this map or re-syncs from an
    /// active peer. Entries whose ttl ran out while it was down are deleted (and the
    /// deletes published) the moment it becomes active, before it serves anything.
    pub fn restore(
        now: Instant,
        wall: EpochMillis,
        config: Config,
        hash_key: HashKey,
        restored: Restored,
    ) -> Result<Self, ConfigError> {
        let mut server = Server::new(now, wall, config, hash_key)?;
        server.store = restored.store;
        server.sequence = restored.sequence;
        server.highest_published = restored.highest_published.max(restored.sequence);
        server.history = restored.history;
        server.recent = RecentChanges::new(restored.sequence);
        Ok(server)
    }

    /// The map and numbering now, for a host that compacts its log: the image
    /// followed by no records rebuilds this server's state.
    pub fn image(&self) -> Image {
        Image::new(
            self.store.map().clone(),
            self.sequence,
            self.highest_published,
            self.history.clone(),
        )
    }

    // --- Getters ---------------------------------------------------------------------

    /// The map's lineage: the reigns its history went through (see [`history`]).
    pub fn lineage(&self) -> &Lineage {
        &self.history.lineage
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The Binary Star state.
    pub fn state(&self) -> BstarState {
        self.bstar.state()
    }

    /// The Binary Star machine (peer state, peer expiry, role).
    pub fn bstar(&self) -> &Bstar {
        &self.bstar
    }

    /// The sequence of the last change published (active) or applied (passive).
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// The stored entry for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.store.get(key)
    }

    /// Every stored entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> + '_ {
        self.store.iter().map(|(key, entry)| (&**key, entry))
    }

    /// Number of stored keys.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.store.len() == 0
    }

    /// Updates a syncing passive holds until its snapshot completes (every layer), or
    /// the active's updates held while still deciding; 0 otherwise.
    pub fn sync_backlog_len(&self) -> usize {
        match &self.follow {
            Follow::Syncing(sync) => {
                sync.backlog.len()
                    + sync.unconfirmed.iter().map(Vec::len).sum::<usize>()
                    + sync.reconnected.iter().map(Vec::len).sum::<usize>()
            }
            _ => self.before_passive.len(),
        }
    }

    /// Entries on the pending list (client copies and early echoes).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Open snapshot streams, queued ones included.
    pub fn open_snapshot_streams(&self) -> usize {
        self.snapshots.len()
    }

    /// Routing ids with an open snapshot stream, in byte order.
    pub fn snapshot_routing_ids(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.snapshots.routing_ids()
    }

    /// True while a passive server waits for or receives the peer's snapshot.
    pub fn is_syncing(&self) -> bool {
        matches!(self.follow, Follow::AwaitingPublisher | Follow::Syncing(_))
    }

    /// True when a message of the peer's snapshot reply arriving now is taken: a
    /// request of a sync attempt is out. Otherwise it is dropped
    /// (`unexpected_snapshot_message`).
    pub fn awaits_peer_reply(&self) -> bool {
        matches!(self.follow, Follow::Syncing(_))
    }

    /// Cumulative counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Bytes the map is charged (see [`Config::max_map_bytes`]).
    pub fn map_bytes(&self) -> usize {
        self.store.bytes()
    }

    /// Every structure that input fills outside the map, with its use and its count and
    /// byte bounds. Each stays within both at all times (the simulator's oracle 7).
    pub fn bounds(&self) -> [BoundedStructure; 9] {
        let config = &self.config;
        let sync = match &self.follow {
            Follow::Syncing(sync) => Some(&**sync),
            _ => None,
        };
        let sync_budget = config.sync_budget();
        let (backlog_len, backlog_bytes) =
            sync.map_or((0, 0), |sync| (sync.backlog.len(), sync.backlog_bytes));
        let (set_aside_len, set_aside_bytes) = sync.map_or((0, 0), |sync| {
            sync.set_aside()
                .fold((0, 0), |(len, bytes), (layer, layer_bytes)| {
                    (len + layer.len(), bytes + layer_bytes)
                })
        });
        let window = |structure, len: usize| BoundedStructure {
            structure,
            len,
            max_len: config.dedupe_window,
            bytes: len.saturating_mul(SeenUpdates::BYTES_PER_UUID),
            max_bytes: config
                .dedupe_window
                .saturating_mul(SeenUpdates::BYTES_PER_UUID),
        };
        let (resume_len, resume_bytes) = match sync.map(|sync| &sync.resume) {
            Some(ResumeReply::Changes { changes, bytes, .. }) => (changes.len(), *bytes),
            _ => (0, 0),
        };
        let split_budget = config.split_log_budget();
        [
            BoundedStructure {
                structure: Structure::PendingList,
                len: self.pending.len(),
                max_len: config.pending_max_len,
                bytes: self.pending.bytes(),
                max_bytes: config.pending_max_bytes,
            },
            BoundedStructure {
                structure: Structure::SyncBacklog,
                len: backlog_len + self.before_passive.len(),
                max_len: sync_budget.max_len,
                bytes: backlog_bytes + self.before_passive_bytes,
                max_bytes: sync_budget.max_bytes,
            },
            BoundedStructure {
                structure: Structure::SyncSetAside,
                len: set_aside_len,
                max_len: sync_budget.max_len,
                bytes: set_aside_bytes,
                max_bytes: sync_budget.max_bytes,
            },
            window(Structure::DedupeWindow, self.seen.len()),
            window(
                Structure::SyncDedupeWindow,
                sync.map_or(0, |sync| sync.seen.len()),
            ),
            BoundedStructure {
                structure: Structure::SplitLog,
                len: self.split_log.len(),
                max_len: split_budget.max_len,
                bytes: self.split_log_bytes,
                max_bytes: split_budget.max_bytes,
            },
            BoundedStructure {
                structure: Structure::SnapshotStreams,
                len: self.snapshots.len(),
                max_len: config.max_snapshot_streams,
                bytes: self.snapshots.bytes(),
                max_bytes: config.max_snapshot_streams.saturating_mul(
                    SnapshotStreams::max_bytes_per_stream(
                        config.limits.max_key_len,
                        config.snapshot_batch,
                    ),
                ),
            },
            BoundedStructure {
                structure: Structure::RecentChanges,
                len: self.recent.len(),
                max_len: config.recent_changes_max,
                bytes: self.recent.bytes(),
                max_bytes: config.recent_changes_max_bytes,
            },
            BoundedStructure {
                structure: Structure::ResumeReply,
                len: resume_len,
                max_len: sync_budget.max_len,
                bytes: resume_bytes,
                max_bytes: sync_budget.max_bytes,
            },
        ]
    }

    // --- Inputs ------------------------------------------------------------------------

    /// An ICANHAZ? from `routing_id` on the ROUTER at P (without the identity frame).
    /// Binary Star decides; an accepted request opens a snapshot stream taken now.
    pub fn handle_snapshot_request<F: AsRef<[u8]>>(
        &mut self,
        now: Instant,
        wall: EpochMillis,
        routing_id: &[u8],
        frames: &[F],
    ) {
        self.begin(now, wall);
        let source = InputSource::SnapshotRequest;
        // Garbage does not vote: only a well-formed request may promote this server.
        let request = match SnapshotRequest::decode(frames, &self.config.limits) {
            Ok(request) => request,
            Err(error) => return self.drop_input(source, DropReason::Malformed(error)),
        };
        if routing_id.len() > MAX_ROUTING_ID_LEN {
            return self.drop_input(source, DropReason::RoutingIdTooLong);
        }
        let verdict = self.bstar.handle_client_request(now);
        self.drain_bstar(now, wall);
        if verdict == Verdict::Reject {
            return self.drop_input(source, DropReason::NotActive);
        }
        if self.snapshots.len() >= self.config.max_snapshot_streams {
            return self.drop_input(source, DropReason::TooManySnapshotStreams);
        }
        // Only a whole-map reply names its history: a peer adopts it with the map.
        let history = (request.subtree.is_empty() && !self.history.lineage.is_empty())
            .then(|| self.history.lineage.to_property());
        let reply = match request
            .resume
            .and_then(|position| self.answer_resume(position))
        {
            Some(reply) => reply,
            None => Reply::Snapshot {
                map: self.store.map().clone(),
                subtree: request.subtree,
            },
        };
        let replaced = self
            .snapshots
            .open(now, routing_id, reply, self.sequence, history);
        self.counters.snapshots_opened += 1;
        if replaced {
            self.counters.snapshots_superseded += 1;
        }
        self.outputs.push_back(Output::SnapshotReady {
            routing_id: routing_id.to_vec(),
        });
    }

    /// The changes after a resuming peer's `position`, if its map is a state of this
    /// server's history (the one rule: [`history`]'s invariant), every change after it
    /// is still kept, and they are no more than the keys a full snapshot would send
    /// (many changes to few keys are cheaper as the map); reported either way.
    fn answer_resume(&mut self, position: ResumePosition) -> Option<Reply> {
        let changes = self
            .history
            .lineage
            .end_of(position.reign, self.sequence)
            .filter(|end| position.sequence <= *end)
            .and_then(|_| self.recent.after(position.sequence))
            .filter(|changes| changes.len() <= self.store.len());
        match &changes {
            Some(_) => self.counters.resumes_served += 1,
            None => self.counters.resumes_refused += 1,
        }
        self.outputs.push_back(Output::Event(Event::ResumeAnswered {
            after: position.sequence,
            changes: changes.as_ref().map(|changes| changes.len()),
        }));
        Some(Reply::Changes {
            after: position.sequence,
            changes: changes?,
        })
    }

    /// A KVSET from the collector SUB at P+2.
    pub fn handle_collected<F: AsRef<[u8]>>(
        &mut self,
        now: Instant,
        wall: EpochMillis,
        frames: &[F],
    ) {
        self.begin(now, wall);
        let source = InputSource::Collector;
        let update = match KvMsgRef::decode(frames, &self.config.limits) {
            Ok(update) => update,
            Err(error) => return self.drop_input(source, DropReason::Malformed(error)),
        };
        if update.has_reserved_key() {
            return self.drop_input(source, DropReason::ReservedKey);
        }
        let ttl = match update.client_ttl() {
            Ok(ttl) => ttl,
            Err(error) => return self.drop_input(source, DropReason::InvalidTtl(error)),
        };
        if let Some(uuid) = update.uuid.filter(|uuid| self.seen.contains(uuid)) {
            // Already published: applying it again would regress its key. (A passive
            // also forgets the early echo it kept for this copy, and will not replay
            // the older copies of its key.)
            self.pending.cancel_published(&uuid, update.key);
            return self.drop_input(source, DropReason::DuplicateUuid);
        }
        let expires_at = ttl
            .filter(|_| !update.is_delete())
            .map(|ttl| wall.saturating_add(ttl));
        if self.state() == BstarState::Active {
            self.publish_update(&update, expires_at);
        } else {
            let Some(uuid) = update.uuid else {
                return self.drop_input(source, DropReason::UnmatchableCopy);
            };
            let (fate, evicted) = self.pending.hold_client_copy(
                now,
                uuid,
                &update,
                expires_at,
                self.config.pending_budget(),
            );
            self.report_eviction(evicted, EvictionReason::Size);
            match fate {
                ClientCopyFate::Duplicate => self.drop_input(source, DropReason::DuplicateUuid),
                ClientCopyFate::TooLarge => self.drop_input(source, DropReason::TooLargeToHold),
                ClientCopyFate::Held | ClientCopyFate::CancelledByEcho => {}
            }
        }
    }

    /// A subscription message arrived on the publisher (the host's XPUB passes each up:
    /// `1` then the topic to subscribe, `0` then the topic to drop). One that a HUGZ
    /// matches (`HUGZ`, a prefix of it, or everything) is a new subscriber
    /// ([`Server::handle_subscriber_joined`]); anything else changes nothing.
    pub fn handle_subscription(&mut self, now: Instant, wall: EpochMillis, message: &[u8]) {
        if let [1, topic @ ..] = message {
            if crate::kvmsg::HUGZ.starts_with(topic) {
                self.handle_subscriber_joined(now, wall);
            }
        }
    }

    /// A subscriber of this server's publisher subscribed to HUGZ: a client proves its
    /// subscription live by the first message it gets, so the next HUGZ goes out now
    /// rather than at the next heartbeat, at most one per [`WELCOME_HUGZ_INTERVAL`]
    /// however many subscribers arrive.
    pub fn handle_subscriber_joined(&mut self, now: Instant, wall: EpochMillis) {
        self.begin(now, wall);
        let earliest = self
            .last_hugz
            .map_or(now, |last| (last + WELCOME_HUGZ_INTERVAL).max(now));
        self.next_hugz = self.next_hugz.min(earliest);
        self.counters.subscribers_joined += 1;
    }

    /// The host's SUB on the peer's publisher reconnected (libzmq's socket monitor
    /// reports it). A passive that was following re-syncs once the new subscription is
    /// live: the peer may have restarted with a new history whose numbers continue
    /// this map's, and without a gap nothing else would show that they are not the
    /// same history.
    /// A passive already syncing keeps waiting for its reply, but sets what it buffered
    /// so far aside (see `SyncInProgress::unconfirmed`): the new connection may carry a
    /// restarted active's new history, numbered anew.
    pub fn handle_peer_publisher_reconnected(&mut self, now: Instant, wall: EpochMillis) {
        self.begin(now, wall);
        self.followed_through = None;
        let budget = self.config.sync_budget();
        match &mut self.follow {
            Follow::Following => self.start_sync(SyncReason::PublisherReconnected),
            Follow::Syncing(sync) => {
                sync.stale_through = None;
                let backlog = sync.take_backlog();
                sync.before_request = 0;
                sync.backlog_overflowed = false;
                if !backlog.is_empty() {
                    sync.reconnected.push(backlog);
                }
                let dropped = sync.bound_set_aside(budget);
                self.report_sync_buffer_drops(dropped);
            }
            Follow::Not | Follow::AwaitingPublisher => {}
        }
    }

    /// A message from the SUB on the peer's publisher (P+1 of the peer): KVPUB or HUGZ.
    pub fn handle_peer_update<F: AsRef<[u8]>>(
        &mut self,
        now: Instant,
        wall: EpochMillis,
        frames: &[F],
    ) {
        self.begin(now, wall);
        let source = InputSource::PeerUpdate;
        let update = match KvMsgRef::decode(frames, &self.config.limits) {
            Ok(update) => update,
            Err(error) => return self.drop_input(source, DropReason::Malformed(error)),
        };
        if update.is_hugz() {
            self.prune_split_log(&update);
            return self.follow_heartbeat(now, update.sequence);
        }
        if update.is_kthxbai() {
            return self.drop_input(source, DropReason::ReservedKey);
        }
        if self.state() == BstarState::Active {
            return self.drop_input(source, DropReason::PeerUpdateWhileActive);
        }
        if self.late_on_followed_subscription(update.sequence) {
            // It still proves the subscription live.
            if matches!(self.follow, Follow::AwaitingPublisher) {
                self.request_peer_snapshot(now, Vec::new());
            }
            return self.drop_input(source, DropReason::StaleSequence);
        }
        self.observe_published(now, &update, true);
        let expires_at = if update.is_delete() {
            None
        } else {
            match update.peer_ttl() {
                Ok(ttl) => ttl.map(|ttl| absolute(ttl, wall)),
                Err(error) => return self.drop_input(source, DropReason::InvalidTtl(error)),
            }
        };
        let sync_budget = self.config.sync_budget();
        match &mut self.follow {
            // Still PRIMARY / BACKUP: the sync starts on becoming passive.
            Follow::Not => self.buffer_before_passive(update.to_kvmsg(), expires_at),
            Follow::AwaitingPublisher => {
                self.request_peer_snapshot(now, vec![(update.to_kvmsg(), expires_at)]);
            }
            Follow::Syncing(sync) => {
                let dropped = sync.buffer(update.to_kvmsg(), expires_at, sync_budget);
                self.report_sync_buffer_drops(dropped);
            }
            Follow::Following => self.apply_followed(now, &update, expires_at),
        }
    }

    /// The active published `update` (a KVPUB, or a change of a resume reply), whether or
    /// not this server can apply it now: its uuid is remembered, so that a late client
    /// copy does not apply it again (a delete seen while syncing is absent from the
    /// snapshot, so the map alone cannot tell), and it echoes the client copy the
    /// pending list holds. A `live` KVPUB was
    /// published after every copy held now; a resume's change may be older than them.
    fn observe_published(&mut self, now: Instant, update: &KvMsgRef, live: bool) {
        self.remember_published(update.uuid);
        // An expiry delete carries the stored entry's uuid, whose client copy was
        // matched long ago: remembering it as an echo would only clog the list.
        let is_expiry_delete = update.is_delete()
            && update.uuid.is_some()
            && self.store.get(update.key).map(|entry| entry.uuid()) == Some(update.uuid);
        let evicted = self.pending.observe_active_update(
            now,
            update.uuid,
            update.key,
            !is_expiry_delete,
            live,
            self.config.pending_budget(),
        );
        self.report_eviction(evicted, EvictionReason::Size);
    }

    /// The peer's Binary Star state (one frame).
    pub fn handle_peer_state<F: AsRef<[u8]>>(
        &mut self,
        now: Instant,
        wall: EpochMillis,
        frames: &[F],
    ) {
        self.begin(now, wall);
        let peer = match BstarState::decode(frames) {
            Ok(peer) => peer,
            Err(error) => {
                return self.drop_input(InputSource::PeerState, DropReason::Malformed(error))
            }
        };
        let previous = self.bstar.peer_state();
        self.bstar.handle_peer_state(now, peer);
        self.drain_bstar(now, wall);
        match (self.state(), peer) {
            // A different server became active (dual passive resolved on the primary):
            // our map and numbering may not match its own; take a fresh snapshot.
            (BstarState::Passive, BstarState::Active) if previous != Some(BstarState::Active) => {
                match self.follow {
                    Follow::Following => self.start_sync(SyncReason::PeerBecameActive),
                    Follow::Syncing(_) => self.resync_with_new_reign(now),
                    Follow::Not | Follow::AwaitingPublisher => {}
                }
            }
            _ => {}
        }
    }

    /// A message from the DEALER to the peer's ROUTER: KVSYNC or KTHXBAI.
    pub fn handle_peer_snapshot<F: AsRef<[u8]>>(
        &mut self,
        now: Instant,
        wall: EpochMillis,
        frames: &[F],
    ) {
        self.begin(now, wall);
        let source = InputSource::PeerSnapshot;
        let entry = match KvMsgRef::decode(frames, &self.config.limits) {
            Ok(entry) => entry,
            Err(error) => return self.drop_input(source, DropReason::Malformed(error)),
        };
        let Follow::Syncing(sync) = &mut self.follow else {
            return self.drop_input(source, DropReason::UnexpectedSnapshotMessage);
        };
        sync.last_activity = now;
        if sync.opens_resume_reply(&entry) {
            return;
        }
        if entry.is_kthxbai() {
            if !sync.reply_ends_as_taken(&entry) {
                self.full_sync_next = true;
                return self.retry_sync(now, SyncReason::ReplyMisread);
            }
            let history = entry.history().map(Lineage::from_property);
            return self.complete_sync(now, entry.sequence, history);
        }
        if entry.is_hugz() {
            return self.drop_input(source, DropReason::ReservedKey);
        }
        let expires_at = if entry.is_delete() {
            None
        } else {
            match entry.peer_ttl() {
                Ok(ttl) => ttl.map(|ttl| absolute(ttl, wall)),
                Err(error) => return self.drop_input(source, DropReason::InvalidTtl(error)),
            }
        };
        if let Some(uuid) = entry.uuid {
            sync.seen.insert(uuid, self.config.dedupe_window);
        }
        match sync.hold_resume_change(&entry, expires_at, self.config.sync_budget()) {
            // A resume's change is one of the active's publications, as a KVPUB is.
            Some(true) => return self.observe_published(now, &entry, false),
            Some(false) => {
                self.full_sync_next = true;
                return self.retry_sync(now, SyncReason::ResumeTooLarge);
            }
            None => {}
        }
        sync.store.apply(&entry, expires_at);
    }

    /// What a server not yet passive buffers of the active's updates: the newest
    /// within [`Config::sync_backlog_max`] and [`Config::sync_backlog_max_bytes`] (the
    /// oldest are the likeliest to be settled by the snapshot it will ask for).
    fn buffer_before_passive(&mut self, update: KvMsg, expires_at: Option<EpochMillis>) {
        let budget = self.config.sync_budget();
        let incoming = buffered_bytes(&update);
        while !budget.admits(
            self.before_passive.len(),
            self.before_passive_bytes,
            incoming,
        ) {
            let Some((oldest, _)) = self.before_passive.pop_front() else {
                break;
            };
            self.before_passive_bytes = self
                .before_passive_bytes
                .saturating_sub(buffered_bytes(&oldest));
            self.report_sync_buffer_drops(1);
        }
        self.before_passive_bytes = self.before_passive_bytes.saturating_add(incoming);
        self.before_passive.push_back((update, expires_at));
    }

    /// Takes what was buffered before the passive state.
    fn take_before_passive(&mut self) -> VecDeque<(KvMsg, Option<EpochMillis>)> {
        self.before_passive_bytes = 0;
        std::mem::take(&mut self.before_passive)
    }

    /// Fires every timer that is due (see [`Timer`]), in the table's order; ttl
    /// expiries are due whenever the host calls in (`begin`).
    pub fn handle_timeout(&mut self, now: Instant, wall: EpochMillis) {
        self.begin(now, wall);
        for timer in Timer::ALL {
            if self.deadline(timer).is_some_and(|due| due <= now) {
                self.fire(now, wall, timer);
            }
        }
    }

    /// Publishes a HUGZ marked with the server's state. Besides the heartbeat, one goes
    /// out the moment an active steps down: a subscriber must hear that the reign ended
    /// before anything a later reign publishes, or a reign that begins in the same
    /// instant from a merged map would continue the stream it takes for the old one.
    fn announce_state(&mut self, now: Instant) {
        self.outputs.push_back(Output::Publish(
            KvMsg::hugz_from(self.state(), self.sequence)
                .with_keys(self.store.len())
                .encode()
                .map(Frame::from),
        ));
        self.next_hugz = now + self.config.bstar.heartbeat;
        self.last_hugz = Some(now);
    }

    fn fire(&mut self, now: Instant, wall: EpochMillis, timer: Timer) {
        match timer {
            Timer::BinaryStar => {
                self.bstar.handle_timeout(now);
                self.drain_bstar(now, wall);
            }
            Timer::Heartbeat => self.announce_state(now),
            // Done by `begin`, which every input runs.
            Timer::Expiry => {}
            Timer::PendingAge => {
                let evicted = self
                    .pending
                    .evict_older_than(now, self.config.pending_max_age);
                self.report_eviction(evicted, EvictionReason::Age);
            }
            Timer::SnapshotStall => {
                for routing_id in self
                    .snapshots
                    .close_stalled(now, self.config.snapshot_stall_timeout)
                {
                    self.abandon_stream(routing_id, AbandonReason::Stalled);
                }
            }
            Timer::PeerSync => self.retry_sync(now, SyncReason::Timeout),
        }
    }

    /// When `timer` is due, if it is armed. Ttl expiries are placed on the monotonic
    /// timeline using the latest `(now, wall)` pair the host passed in.
    fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::BinaryStar => self.bstar.poll_timeout(),
            Timer::Heartbeat => Some(self.next_hugz),
            Timer::Expiry => {
                let (now, wall) = self.clock;
                (self.state() == BstarState::Active)
                    .then(|| self.store.next_expiry())
                    .flatten()
                    .map(|expires_at| now + wall.saturating_duration_until(expires_at))
            }
            Timer::PendingAge => self
                .pending_ages_out()
                .then(|| self.pending.oldest_arrived_at())
                .flatten()
                .map(|arrived_at| arrived_at + self.config.pending_max_age),
            Timer::SnapshotStall => self
                .snapshots
                .next_stall(self.config.snapshot_stall_timeout),
            Timer::PeerSync => match &self.follow {
                Follow::Syncing(sync) => Some(sync.last_activity + self.config.peer_sync_timeout),
                _ => None,
            },
        }
    }

    /// The sync got no usable reply (none for `peer_sync_timeout`, or a resume too
    /// large to buffer): ask again, keeping what was buffered so far (it precedes the
    /// new request).
    fn retry_sync(&mut self, now: Instant, reason: SyncReason) {
        self.next_sync_attempt(now, reason, NextAttempt::SameHistory);
    }

    /// The peer became active while this server was syncing with it: its new reign
    /// numbers its own history, so the reply this sync awaits (if any comes) and the
    /// updates it buffered belong to the history the peer left. Ask again at once on
    /// the subscription this sync already proved live, with everything held set aside:
    /// a completed snapshot of the new reign makes it moot, a failover before that
    /// merges it.
    fn resync_with_new_reign(&mut self, now: Instant) {
        self.next_sync_attempt(now, SyncReason::PeerBecameActive, NextAttempt::NewReign);
    }

    /// Replaces the sync in progress by a new attempt that keeps what it held: the
    /// earlier connections' layers set aside, and the current connection's backlog
    /// carried ahead of the new request ([`NextAttempt::SameHistory`]) or set aside too
    /// ([`NextAttempt::NewReign`]).
    fn next_sync_attempt(&mut self, now: Instant, reason: SyncReason, next: NextAttempt) {
        self.outputs
            .push_back(Output::Event(Event::SyncStarted { reason }));
        let budget = self.config.sync_budget();
        let (mut unconfirmed, carried, carried_dropped, stale_through) =
            match std::mem::replace(&mut self.follow, Follow::Not) {
                Follow::Syncing(sync) => {
                    let stale_through = sync.stale_through;
                    let (unconfirmed, carried, dropped) = sync.into_next_attempt(budget);
                    (unconfirmed, carried, dropped, stale_through)
                }
                _ => (Vec::new(), Vec::new(), 0, None),
            };
        self.report_sync_buffer_drops(carried_dropped);
        let (carried, stale_through) = match next {
            NextAttempt::SameHistory => (carried, stale_through),
            NextAttempt::NewReign => {
                unconfirmed.push(carried);
                unconfirmed.retain(|layer| !layer.is_empty());
                (Vec::new(), None)
            }
        };
        self.request_peer_snapshot(now, carried);
        if let Follow::Syncing(sync) = &mut self.follow {
            // Same history on the same subscription: what the map held is still stale
            // on it.
            sync.stale_through = stale_through;
            sync.unconfirmed = std::mem::take(&mut unconfirmed);
            let dropped = sync.bound_set_aside(budget);
            self.report_sync_buffer_drops(dropped);
        }
    }

    // --- Outputs -----------------------------------------------------------------------

    /// The next output, oldest first.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Server::handle_timeout`] next has work: the earliest armed timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL
            .into_iter()
            .filter_map(|timer| self.deadline(timer))
            .min()
    }

    /// The next message of the snapshot stream open for `routing_id`: a KVSYNC, or the
    /// KTHXBAI that ends the stream. `None` when the client has no open stream (never
    /// had one, finished, or was closed). Several requests from one client are answered
    /// one after the other. Pull only when the socket has room: the stream advances on
    /// every call, and pulling resets the stall timer.
    pub fn poll_snapshot(
        &mut self,
        now: Instant,
        routing_id: &[u8],
    ) -> Option<[Frame; FRAME_COUNT]> {
        match self
            .snapshots
            .next_message(now, routing_id, self.config.snapshot_batch)?
        {
            Pulled::Message(frames) => Some(frames),
            Pulled::Finished(frames) => {
                self.counters.snapshots_completed += 1;
                Some(frames)
            }
        }
    }

    /// Closes every snapshot stream of `routing_id` (the host found the client gone).
    pub fn cancel_snapshot(&mut self, routing_id: &[u8]) {
        if self.snapshots.cancel(routing_id) > 0 {
            self.abandon_stream(routing_id.to_vec(), AbandonReason::Cancelled);
        }
    }

    // --- Internals ---------------------------------------------------------------------

    /// Common start of every input: remember the clock, and expire what is due so that
    /// no input ever observes (or snapshots) a key past its ttl.
    fn begin(&mut self, now: Instant, wall: EpochMillis) {
        self.clock = (now, wall);
        if self.state() == BstarState::Active {
            self.expire_due(wall);
        }
    }

    fn drop_input(&mut self, source: InputSource, reason: DropReason) {
        self.counters.count_drop(source, &reason);
        self.outputs
            .push_back(Output::Event(Event::InputDropped { source, reason }));
    }

    fn report_eviction(&mut self, evicted: Evicted, reason: EvictionReason) {
        if evicted.is_empty() {
            return;
        }
        self.counters.pending_evicted += (evicted.client_copies + evicted.echoes) as u64;
        self.outputs.push_back(Output::Event(Event::PendingEvicted {
            client_copies: evicted.client_copies,
            echoes: evicted.echoes,
            reason,
        }));
    }

    fn report_sync_buffer_drops(&mut self, dropped: usize) {
        if dropped == 0 {
            return;
        }
        self.counters.sync_buffered_dropped += dropped as u64;
        self.outputs
            .push_back(Output::Event(Event::SyncBufferDropped { dropped }));
    }

    fn abandon_stream(&mut self, routing_id: Vec<u8>, reason: AbandonReason) {
        self.counters.snapshots_abandoned += 1;
        self.outputs
            .push_back(Output::Event(Event::SnapshotStreamAbandoned {
                routing_id,
                reason,
            }));
    }

    /// Age eviction runs only while the active is alive: if it died, the pending list
    /// is exactly what a failover must replay.
    fn pending_ages_out(&self) -> bool {
        let (now, _) = self.clock;
        self.state() != BstarState::Active && self.bstar.peer_is_alive(now)
    }

    fn drain_bstar(&mut self, now: Instant, wall: EpochMillis) {
        while let Some(output) = self.bstar.poll_output() {
            match output {
                bstar::Output::SendState(state) => {
                    self.outputs
                        .push_back(Output::SendStateToPeer(state.encode()));
                }
                bstar::Output::StateChanged { from, to, cause } => {
                    self.outputs
                        .push_back(Output::Event(Event::StateChanged { from, to, cause }));
                    self.on_state_change(now, wall, from, to);
                }
                bstar::Output::DualActive { stepped_down } => {
                    self.outputs
                        .push_back(Output::Event(Event::DualActive { stepped_down }));
                }
                bstar::Output::DualPassive { took_over } => {
                    self.outputs
                        .push_back(Output::Event(Event::DualPassive { took_over }));
                }
                bstar::Output::RoleConflict { role } => {
                    self.counters.role_conflicts += 1;
                    self.outputs
                        .push_back(Output::Event(Event::RoleConflict { role }));
                }
            }
        }
    }

    fn on_state_change(
        &mut self,
        now: Instant,
        wall: EpochMillis,
        from: BstarState,
        to: BstarState,
    ) {
        match to {
            BstarState::Active => {
                // A new reign's split log starts here, before the replay: a backup
                // taking over while the primary may live must forward what it replays,
                // too: a client copy only the backup had would otherwise be lost when
                // the primary's snapshot wins.
                self.split_log.clear();
                self.split_log_bytes = 0;
                self.split_lost = 0;
                self.split_lost_through = 0;
                self.followed_through = self.followed_through_now();
                let merged = self.abandon_sync();
                self.begin_reign(now, !merged);
                self.sequence = self.sequence.max(self.highest_published);
                self.replay_pending(wall);
                self.expire_due(wall);
            }
            BstarState::Passive => {
                if from == BstarState::Active {
                    for routing_id in self.snapshots.cancel_all() {
                        self.abandon_stream(routing_id, AbandonReason::NoLongerActive);
                    }
                    self.forward_split_log(now, wall);
                    self.announce_state(now);
                }
                self.start_sync(SyncReason::BecamePassive);
            }
            BstarState::Primary | BstarState::Backup => {}
        }
    }

    /// A reign begins from the map as it is (see [`history`]); `continues` says whether
    /// the map is still its lineage's state at this server's sequence.
    fn begin_reign(&mut self, now: Instant, continues: bool) {
        self.reigns_begun += 1;
        let reign = Reign {
            id: draw_reign_id(self.hash_key, now, self.sequence, self.reigns_begun),
            base: self.sequence,
        };
        self.history.lineage.begin_reign(reign, continues);
        let history = self.history.clone();
        self.persist(|| Record::of_history(history));
    }

    // --- Active ------------------------------------------------------------------------

    /// Numbers, publishes and stores one update (§6 active). The KVPUB carries the
    /// properties as given (the client's relative ttl); the store keeps the absolute
    /// expiry.
    fn publish_update(&mut self, update: &KvMsgRef, expires_at: Option<EpochMillis>) {
        if !update.is_delete() {
            match self.store.admits(update, self.config.map_limits()) {
                Ok(()) => {}
                Err(MapFull::Keys) => {
                    return self.drop_input(InputSource::Collector, DropReason::MapFullKeys)
                }
                Err(MapFull::Bytes) => {
                    return self.drop_input(InputSource::Collector, DropReason::MapFullBytes)
                }
            }
        }
        let Some(sequence) = self.sequence.checked_add(1) else {
            return self.drop_input(InputSource::Collector, DropReason::SequenceExhausted);
        };
        self.sequence = sequence;
        self.highest_published = sequence;
        let update = KvMsgRef {
            sequence,
            ..*update
        };
        self.remember_published(update.uuid);
        self.counters.published += 1;
        self.record_split(update.key, update.uuid, sequence);
        // The KVPUB is the client's message with the new sequence: its properties as
        // sent (a relative ttl), its body shared with the stored entry.
        let key = Frame::from(update.key);
        let uuid = uuid_frame(update.uuid);
        let properties = Frame::from(&*update.normalized_properties());
        let body = if update.is_delete() {
            self.store.remove(update.key);
            self.record_change(Change::Delete {
                key: Key::from(update.key),
                sequence,
                uuid: update.uuid,
            });
            Frame::EMPTY
        } else {
            let entry = self.store.store_value(&update, expires_at);
            let body = Frame::body_of(&entry);
            self.record_change(Change::Put(Key::from(update.key), entry));
            body
        };
        let frames = [key, Frame::sequence(sequence), uuid, properties, body];
        self.outputs.push_back(Output::Publish(frames));
    }

    /// Removes every key whose ttl has passed, publishing a delete for each: the key, a
    /// new sequence, the entry's uuid and (absolute-ttl) properties, an empty body.
    fn expire_due(&mut self, wall: EpochMillis) {
        while let Some((key, entry)) = self.store.pop_expired(wall) {
            let Some(sequence) = self.sequence.checked_add(1) else {
                // Cannot number the delete; keep the key rather than diverge silently.
                self.store.insert(key, entry);
                return;
            };
            self.sequence = sequence;
            self.highest_published = sequence;
            let frames = Entry::expiry_frames(&entry, &key, sequence);
            self.record_change(Change::Delete {
                key: key.clone(),
                sequence,
                uuid: entry.uuid(),
            });
            self.counters.published += 1;
            self.counters.expired += 1;
            self.record_split(&key, entry.uuid(), sequence);
            self.outputs.push_back(Output::Publish(frames));
        }
    }

    /// On becoming active: every pending client copy not superseded gets a new sequence
    /// and is published, in arrival order. A ttl is republished as what remains of it by
    /// our clock. A copy whose ttl ran out while it waited is not replayed at all:
    /// publishing it would show clients a value already past its expiry (and with a
    /// ttl shorter than the one its writer asked for); it is exactly as if it had been
    /// set and expired. So where the store still holds an older value of its key, that
    /// value is deleted (with the copy's uuid, as its expiry would have been), or the
    /// newer copy's expiry would leave an older value (say one a failover mid-sync
    /// merged from the peer) standing.
    fn replay_pending(&mut self, wall: EpochMillis) {
        let (replay, skipped) = self.pending.take_replay();
        if replay.is_empty() && skipped == 0 {
            return;
        }
        let mut replayed = 0;
        let mut expired = 0;
        for entry in replay {
            let mut update = entry.update;
            if let Some(expires_at) = entry.expires_at {
                if expires_at <= wall {
                    expired += 1;
                    let older_value = self
                        .store
                        .get(&update.key)
                        .is_some_and(|entry| entry.uuid() != update.uuid);
                    if older_value {
                        let delete = KvMsg {
                            key: update.key,
                            uuid: update.uuid,
                            ..KvMsg::default()
                        };
                        self.publish_update(&delete.as_msg_ref(), None);
                    }
                    continue;
                }
                update.set_ttl_relative(wall.saturating_duration_until(expires_at));
            }
            replayed += 1;
            self.publish_update(&update.as_msg_ref(), entry.expires_at);
        }
        self.counters.pending_replayed += replayed as u64;
        self.counters.pending_superseded += skipped as u64;
        self.counters.pending_expired += expired as u64;
        self.outputs
            .push_back(Output::Event(Event::PendingReplayed {
                replayed,
                skipped_superseded: skipped,
                skipped_expired: expired,
            }));
    }

    /// A backup that is active records which keys it changes, to forward them if it
    /// has to step down (§7 dual active): the primary may be active too, or become so
    /// before it holds the change.
    fn record_split(&mut self, key: &[u8], uuid: Option<Uuid>, sequence: i64) {
        if self.bstar.role() != Role::Backup {
            return;
        }
        let change = SplitChange { uuid, sequence };
        let incoming = split_change_bytes(key.len());
        if let Some(latest) = self.split_log.get_mut(key) {
            *latest = change;
        } else if self.config.split_log_budget().admits(
            self.split_log.len(),
            self.split_log_bytes,
            incoming,
        ) {
            self.split_log.insert(Key::from(key), change);
            self.split_log_bytes = self.split_log_bytes.saturating_add(incoming);
        } else {
            self.split_lost += 1;
            self.split_lost_through = sequence;
        }
    }

    /// A HUGZ from the peer: if it is marked passive, the peer follows us and holds
    /// every change we numbered up to its sequence (it applies our KVPUBs in order, or
    /// a snapshot taken at that sequence, and keeps what it holds if it takes over), so
    /// those leave the split log. Only the peer's own word counts, not our view of its
    /// state: a PASSIVE state or HUGZ can be read long after it was sent (a stalled
    /// link, our own pause) when the peer has taken over since, and what we published
    /// after it does not reach the peer once it is active. A sequence above ours is
    /// not our numbering (a peer that followed an earlier history) and proves nothing.
    fn prune_split_log(&mut self, hugz: &KvMsgRef) {
        if self.state() != BstarState::Active
            || self.bstar.role() != Role::Backup
            || hugz.hugz_state() != Some(BstarState::Passive)
            || hugz.sequence > self.sequence
        {
            return;
        }
        let held = hugz.sequence;
        self.split_log.retain(|_, change| change.sequence > held);
        self.split_log_bytes = self
            .split_log
            .keys()
            .map(|key| split_change_bytes(key.len()))
            .sum();
        if self.split_lost_through <= held {
            self.split_lost = 0;
        }
    }

    /// After stepping down: send every update accepted while split to the primary's
    /// collector as a KVSET (same uuid, remaining ttl), and hold each on the pending list
    /// so that it is replayed if the primary dies before echoing it.
    fn forward_split_log(&mut self, now: Instant, wall: EpochMillis) {
        let split_log = std::mem::take(&mut self.split_log);
        self.split_log_bytes = 0;
        let lost = std::mem::take(&mut self.split_lost);
        if split_log.is_empty() && lost == 0 {
            return;
        }
        self.split_lost_through = 0;
        let forwarded = split_log.len();
        for (key, latest) in split_log {
            let key = key.to_vec();
            let (kvset, expires_at) = match self.store.get(&key) {
                Some(entry) => {
                    let mut kvset = KvMsg {
                        key,
                        sequence: 0,
                        uuid: entry.uuid(),
                        properties: entry.properties(),
                        body: entry.body().to_vec(),
                    };
                    if let Some(expires_at) = entry.expires_at() {
                        let remaining = wall
                            .saturating_duration_until(expires_at)
                            .max(Duration::from_millis(1));
                        kvset.set_ttl_relative(remaining);
                    }
                    (kvset, entry.expires_at())
                }
                None => (
                    KvMsg {
                        key,
                        uuid: latest.uuid,
                        ..KvMsg::default()
                    },
                    None,
                ),
            };
            self.outputs
                .push_back(Output::ForwardToPeerCollector(kvset.encode()));
            if let Some(uuid) = kvset.uuid {
                let (_, evicted) = self.pending.hold_client_copy(
                    now,
                    uuid,
                    &kvset.as_msg_ref(),
                    expires_at,
                    self.config.pending_budget(),
                );
                self.report_eviction(evicted, EvictionReason::Size);
            }
        }
        self.counters.split_forwarded += forwarded as u64;
        self.counters.split_lost += lost;
        self.outputs
            .push_back(Output::Event(Event::SplitUpdatesForwarded {
                forwarded,
                lost,
            }));
    }

    // --- Passive -----------------------------------------------------------------------

    fn start_sync(&mut self, reason: SyncReason) {
        self.outputs
            .push_back(Output::Event(Event::SyncStarted { reason }));
        self.follow = Follow::AwaitingPublisher;
    }

    /// Sends ICANHAZ? with an empty subtree (the whole map) to the peer and starts
    /// buffering the active's updates behind `backlog`, which came before the request
    /// (see `SyncInProgress::before_request`).
    fn request_peer_snapshot(&mut self, now: Instant, backlog: Vec<(KvMsg, Option<EpochMillis>)>) {
        self.counters.syncs_started += 1;
        let position = self.resume_position();
        let request = match position {
            Some(position) => SnapshotRequest::resume(position),
            None => SnapshotRequest::new(Vec::new()),
        };
        self.outputs
            .push_back(Output::RequestPeerSnapshot(request.encode()));
        let before_passive: Vec<_> = self.take_before_passive().into();
        self.follow = Follow::Syncing(Box::new(SyncInProgress {
            before_request: backlog.len(),
            backlog_bytes: layer_bytes(&backlog),
            backlog,
            unconfirmed: if before_passive.is_empty() {
                Vec::new()
            } else {
                vec![before_passive]
            },
            pending_mark: self.pending.arrival_mark(),
            resume: position.map_or(ResumeReply::Snapshot, |position| ResumeReply::Asked {
                after: position.sequence,
            }),
            stale_through: self.followed_through,
            ..SyncInProgress::new(now, self.hash_key)
        }));
    }

    /// Where to ask the active to resume from: the map's position in its history, if
    /// it has one and the active it was synced from serves resumes (a reference server
    /// must never see the extra frame).
    fn resume_position(&self) -> Option<ResumePosition> {
        if !self.config.resume || self.full_sync_next || !self.history.peer_serves_resumes {
            return None;
        }
        let reign = self.history.lineage.current()?;
        Some(ResumePosition {
            reign: reign.id,
            sequence: self.sequence,
        })
    }

    /// KTHXBAI: install the new map at the snapshot's sequence (a snapshot's entries, or
    /// this map with a resume's changes), adopt the history the KTHXBAI names
    /// (`history`: absent, or `Some(None)` when malformed), then apply the buffered
    /// updates that are newer.
    fn complete_sync(&mut self, now: Instant, sequence: i64, history: Option<Option<Lineage>>) {
        let Follow::Syncing(sync) = std::mem::replace(&mut self.follow, Follow::Following) else {
            return;
        };
        let SyncInProgress {
            store,
            backlog,
            before_request,
            backlog_overflowed,
            pending_mark,
            seen,
            resume,
            ..
        } = *sync;
        let resumed = match resume {
            ResumeReply::Changes { after, changes, .. } => Some((after, changes)),
            ResumeReply::Snapshot | ResumeReply::Asked { .. } => None,
        };
        let resumed_report = resumed
            .as_ref()
            .map(|(after, changes)| (*after, changes.len()));
        match resumed {
            Some((_, changes)) => {
                for (change, expires_at) in &changes {
                    self.store.apply(&change.as_msg_ref(), *expires_at);
                    self.persist_applied(change.key.as_slice(), change.sequence, change.uuid);
                }
                self.counters.syncs_resumed += 1;
            }
            None => self.store = store,
        }
        self.followed_through = None;
        self.history = History {
            peer_serves_resumes: matches!(history, Some(Some(_))),
            lineage: history.flatten().unwrap_or_default(),
        };
        self.full_sync_next = false;
        // Remember the adopted history's updates too. What this server saw before stays
        // remembered: a late copy of it must still not be applied again. (Replaying a
        // stepped-down backup's forwarded updates does not consult this set.)
        for uuid in seen.iter() {
            self.seen.insert(uuid, self.config.dedupe_window);
        }
        self.sequence = sequence;
        let store = &self.store;
        let superseded = self.pending.settle_against_snapshot(
            pending_mark,
            |_| true,
            |key| store.get(key).and_then(|entry| entry.uuid()),
        );
        self.counters.pending_superseded_by_snapshot += superseded as u64;
        self.counters.syncs_completed += 1;
        if resumed_report.is_some() {
            let history = self.history.clone();
            self.persist(|| Record::of_history(history));
            self.recent.reset(sequence);
        } else {
            self.persist_image();
        }
        self.outputs.push_back(Output::Event(Event::SyncCompleted {
            sequence,
            keys: self.store.len(),
            resumed: resumed_report,
        }));
        for (update, expires_at) in backlog.into_iter().skip(before_request) {
            if update.sequence <= self.sequence {
                // Already in the snapshot.
                continue;
            }
            match &mut self.follow {
                Follow::Following => self.apply_followed(now, &update.as_msg_ref(), expires_at),
                // A gap in the backlog started another sync: the rest is its backlog,
                // and came before its request.
                Follow::Syncing(next) => {
                    next.backlog_bytes = next.backlog_bytes.saturating_add(buffered_bytes(&update));
                    next.backlog.push((update, expires_at));
                    next.before_request = next.backlog.len();
                }
                Follow::Not | Follow::AwaitingPublisher => {}
            }
        }
        if backlog_overflowed && matches!(self.follow, Follow::Following) {
            self.outputs.push_back(Output::Event(Event::SyncStarted {
                reason: SyncReason::BacklogOverflow,
            }));
            self.request_peer_snapshot(now, Vec::new());
        }
    }

    /// An update from the active while following: applied when it is the next one; a
    /// gap means updates were missed, so re-sync.
    fn apply_followed(&mut self, now: Instant, update: &KvMsgRef, expires_at: Option<EpochMillis>) {
        let expected = self.sequence.saturating_add(1);
        if update.sequence < expected {
            return self.drop_input(InputSource::PeerUpdate, DropReason::StaleSequence);
        }
        if update.sequence > expected {
            self.outputs.push_back(Output::Event(Event::SyncStarted {
                reason: SyncReason::SequenceGap {
                    expected,
                    received: update.sequence,
                },
            }));
            self.request_peer_snapshot(now, vec![(update.to_kvmsg(), expires_at)]);
            return self.buffer_on_followed_connection(expected.saturating_sub(1));
        }
        self.sequence = update.sequence;
        self.remember_published(update.uuid);
        self.store.apply(update, expires_at);
        self.record_change(self.applied_change(update.key, update.sequence, update.uuid));
    }

    /// The change just applied to `key` by the update numbered `sequence`: the stored
    /// entry, or a delete if the key is gone.
    fn applied_change(&self, key: &[u8], sequence: i64, uuid: Option<Uuid>) -> Change {
        match self.store.get(key) {
            Some(entry) if entry.sequence() == sequence => {
                Change::Put(Key::from(key), entry.clone())
            }
            _ => Change::Delete {
                key: Key::from(key),
                sequence,
                uuid,
            },
        }
    }

    /// Records a resumed change for the host (the resume's changes are not kept as
    /// recent ones: the sync resets them).
    fn persist_applied(&mut self, key: &[u8], sequence: i64, uuid: Option<Uuid>) {
        if self.config.persistence {
            let change = self.applied_change(key, sequence, uuid);
            self.outputs
                .push_back(Output::Persist(Record::change(change)));
        }
    }

    /// One change of the map, in order: kept for resuming peers and reported for the
    /// host to record (see [`persist`]).
    fn record_change(&mut self, change: Change) {
        if self.config.persistence {
            self.outputs
                .push_back(Output::Persist(Record::change(change.clone())));
        }
        self.recent
            .push(change, self.config.recent_changes_budget());
    }

    /// Reports a record for the host (see [`persist`]).
    fn persist(&mut self, record: impl FnOnce() -> Record) {
        if self.config.persistence {
            self.outputs.push_back(Output::Persist(record()));
        }
    }

    /// Reports that the map was replaced as a whole (see [`persist`]); no change
    /// before it can be served to a resuming peer.
    fn persist_image(&mut self) {
        self.recent.reset(self.sequence);
        if self.config.persistence {
            self.outputs.push_back(Output::PersistImage(self.image()));
        }
    }

    /// The peer's sequence through which the map holds what arrived on the current
    /// subscription: while following, the map's; while syncing, the sync's
    /// `stale_through`; otherwise what was kept when following stopped.
    fn followed_through_now(&self) -> Option<i64> {
        match &self.follow {
            Follow::Following => Some(self.sequence),
            Follow::Syncing(sync) => sync.stale_through,
            Follow::Not | Follow::AwaitingPublisher => self.followed_through,
        }
    }

    /// Whether a KVPUB numbered `sequence` from the peer is a late copy of what the map
    /// already holds or has since replaced: numbered at or below the sequence the map
    /// was followed through on the subscription it arrived on, whatever this server did
    /// in between (a reign of its own, then a step-down: its own newer values must not
    /// lose to them when a failover merges what its sync buffered). A restarted
    /// active's new history comes on a new connection, which the host reports
    /// (`handle_peer_publisher_reconnected`). While following, the sequence rule of
    /// `apply_followed` decides.
    fn late_on_followed_subscription(&self, sequence: i64) -> bool {
        let through = match &self.follow {
            Follow::Following | Follow::Not => None,
            Follow::AwaitingPublisher | Follow::Syncing(_) => self.followed_through_now(),
        };
        through.is_some_and(|through| sequence <= through)
    }

    /// The sync just requested buffers on the connection the map (at `sequence`) was
    /// followed on: see `SyncInProgress::stale_through`.
    fn buffer_on_followed_connection(&mut self, sequence: i64) {
        if let Follow::Syncing(sync) = &mut self.follow {
            sync.stale_through = Some(sequence);
        }
    }

    fn remember_published(&mut self, uuid: Option<Uuid>) {
        if let Some(uuid) = uuid {
            self.seen.insert(uuid, self.config.dedupe_window);
        }
    }

    /// HUGZ from the peer. While syncing is awaited it proves the subscription live;
    /// while following, its sequence must equal ours (it is sent after every KVPUB it
    /// covers, on the same connection).
    fn follow_heartbeat(&mut self, now: Instant, sequence: i64) {
        match self.follow {
            Follow::AwaitingPublisher => self.request_peer_snapshot(now, Vec::new()),
            Follow::Following if sequence != self.sequence => {
                self.outputs.push_back(Output::Event(Event::SyncStarted {
                    reason: SyncReason::SequenceGap {
                        expected: self.sequence.saturating_add(1),
                        received: sequence,
                    },
                }));
                self.request_peer_snapshot(now, Vec::new());
                self.buffer_on_followed_connection(self.sequence);
            }
            Follow::Not | Follow::Syncing(_) | Follow::Following => {}
        }
    }

    /// Became active mid-sync (the active died while sending its snapshot): keep what
    /// arrived. Whatever came from the peer during the sync is newer than this server's
    /// own map (that is why it was syncing): the updates earlier attempts buffered, then
    /// the snapshot's entries (taken after those), then this attempt's buffered updates,
    /// connection by connection, unless the key already has a newer one from the same
    /// connection. A resume's changes are no snapshot: they replay the history after
    /// this map and may stop short of what an earlier attempt buffered, so they come
    /// first and each earlier attempt's update of a key applies when numbered above
    /// them. Sequences are compared only among the peer's own messages: this
    /// server's map may carry another history's numbers (its own while split, or a
    /// restarted peer's), and comparing those with the peer's lets stale values win.
    /// Numbering continues after the highest sequence seen. Returns whether anything
    /// was merged (the map is then no state of its lineage).
    fn abandon_sync(&mut self) -> bool {
        let before_passive = self.take_before_passive();
        let (now, _) = self.clock;
        let sync = match std::mem::replace(&mut self.follow, Follow::Not) {
            Follow::Syncing(sync) => *sync,
            // Passive, but its sync had not begun: only what it saw before counts.
            Follow::AwaitingPublisher if !before_passive.is_empty() => SyncInProgress {
                unconfirmed: vec![before_passive.into()],
                ..SyncInProgress::new(now, self.hash_key)
            },
            _ => return false,
        };
        let SyncInProgress {
            store: snapshot,
            unconfirmed,
            reconnected,
            backlog,
            seen,
            resume,
            pending_mark,
            ..
        } = sync;
        // The merged entries join the history this server publishes, as an adopted
        // snapshot's do: a KVSET carrying one of their uuids (a forward after a split,
        // a late client copy) is a repeat. The buffered updates' uuids were remembered
        // on arrival.
        for uuid in seen.iter() {
            self.seen.insert(uuid, self.config.dedupe_window);
        }
        let mut applied_updates = 0;
        let mut merged_entries = 0;
        let mut from_peer: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        match resume {
            // A resume's changes replay the history after this map, in order: an update
            // an earlier connection brought is newer than them when its sequence is
            // higher (the reply may have been cut before reaching it), so the layers
            // set aside are compared with them, key by key.
            ResumeReply::Changes { changes, .. } => {
                for (change, expires_at) in changes {
                    merged_entries +=
                        usize::from(self.merge_peer_update(&mut from_peer, change, expires_at));
                }
                for layer in unconfirmed {
                    let mut from_layer = from_peer.clone();
                    for (update, expires_at) in layer {
                        applied_updates += usize::from(self.merge_peer_update(
                            &mut from_layer,
                            update,
                            expires_at,
                        ));
                    }
                }
            }
            // A snapshot was taken after every connection set aside: its entries are
            // newer than what those brought.
            ResumeReply::Snapshot | ResumeReply::Asked { .. } => {
                for layer in unconfirmed {
                    let mut from_layer: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
                    for (update, expires_at) in layer {
                        applied_updates += usize::from(self.merge_peer_update(
                            &mut from_layer,
                            update,
                            expires_at,
                        ));
                    }
                }
                for (key, entry) in snapshot.iter() {
                    from_peer.insert(key.to_vec(), entry.sequence());
                    self.sequence = self.sequence.max(entry.sequence());
                    self.store.insert(key.clone(), entry.clone());
                    merged_entries += 1;
                }
            }
        }
        // The snapshot's entries that arrived settle the pending copies of their keys,
        // as a completed snapshot settles all of them.
        let store = &self.store;
        let superseded = self.pending.settle_against_snapshot(
            pending_mark,
            |key| snapshot.get(key).is_some(),
            |key| store.get(key).and_then(|entry| entry.uuid()),
        );
        self.counters.pending_superseded_by_snapshot += superseded as u64;
        // The connection the request went out on numbers like the snapshot; each later
        // one is compared only with itself.
        for (index, layer) in reconnected.into_iter().chain([backlog]).enumerate() {
            if index > 0 {
                from_peer.clear();
            }
            for (update, expires_at) in layer {
                applied_updates +=
                    usize::from(self.merge_peer_update(&mut from_peer, update, expires_at));
            }
        }
        self.persist_image();
        self.outputs.push_back(Output::Event(Event::SyncAbandoned {
            merged_entries,
            applied_updates,
        }));
        true
    }

    /// Applies one of the peer's updates kept by an abandoned sync unless the peer's
    /// data for its key is already newer. Returns whether it was applied.
    fn merge_peer_update(
        &mut self,
        from_peer: &mut BTreeMap<Vec<u8>, i64>,
        update: KvMsg,
        expires_at: Option<EpochMillis>,
    ) -> bool {
        let newer = from_peer
            .get(update.key.as_slice())
            .is_none_or(|sequence| *sequence < update.sequence);
        if !newer || update.sequence <= 0 {
            return false;
        }
        from_peer.insert(update.key.clone(), update.sequence);
        self.sequence = self.sequence.max(update.sequence);
        self.store.apply(&update.as_msg_ref(), expires_at);
        true
    }
}

/// A peer's ttl as an absolute expiry by our clock (§5: relative ttls are converted
/// with our own clock).
fn absolute(ttl: Ttl, wall: EpochMillis) -> EpochMillis {
    match ttl {
        Ttl::Relative(duration) => wall.saturating_add(duration),
        Ttl::ExpiresAt(expires_at) => expires_at,
    }
}

#[cfg(test)]
mod tests;
