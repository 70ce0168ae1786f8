//! client: the clone agent (PROTOCOL.md §3, §4, §8).
//!
//! A [`Client`] keeps a local copy of one subtree of the servers' map: it takes a snapshot
//! from the current server, then follows that server's stream of numbered updates, fails
//! over to the next server in its list when the current one goes silent, and sends the
//! application's own updates to every server.
//!
//! # The host
//!
//! The host connects every socket up front, as the zguide's `clone.c` does, and feeds
//! whatever arrives into the client tagged with the server and the [`Channel`]:
//!
//! - per server *i* of the list, a DEALER to its snapshot port (replies arrive as
//!   [`Channel::Snapshot`]) and a SUB to its publisher (messages arrive as
//!   [`Channel::Subscriber`]). The SUB subscribes to [`Client::subtree`] **first** and to
//!   `HUGZ` second: subscriptions travel and take effect in order, so once a HUGZ arrives
//!   the subtree subscription is known to be in effect too (§4);
//! - one PUB connected to every server's collector, for [`Output::Publish`].
//!
//! The client decides what to send and which server to honour; messages from servers
//! other than the current one are counted and ignored.
//!
//! # Driving it
//!
//! ```
//! use clonekv_core::client::{Client, Config, Output};
//! use clonekv_core::time::Instant;
//! use rand_chacha::ChaCha8Rng;
//! use rand_core::SeedableRng;
//!
//! let config = Config { servers: 2, subtree: b"/weather/".to_vec(), ..Config::default() };
//! let mut client = Client::new(config, ChaCha8Rng::seed_from_u64(7), Instant::ZERO).unwrap();
//! let uuid = client.set(b"/weather/london".to_vec(), b"rain".to_vec(), None).unwrap();
//! client.watch_commit(uuid).unwrap();
//! while let Some(output) = client.poll_output() {
//!     match output {
//!         Output::SendSnapshotRequest { server, frames, fresh_connection } => {
//!             /* DEALER of `server`, a new one first if `fresh_connection` */
//!         }
//!         Output::Publish { frames } => { /* the PUB that reaches every collector */ }
//!         Output::Event(event) => { /* tell the application */ }
//!     }
//! }
//! // Then sleep until `client.poll_timeout()` or a socket is readable; on a message call
//! // `client.handle_message(now, server, channel, &frames)`, on the deadline
//! // `client.handle_timeout(now)`, and drain `poll_output` again.
//! ```
//!
//! Outputs come out of [`Client::poll_output`] in the order they were produced, so an
//! [`Event::Updated`] for a local set follows the [`Output::Publish`] that sent it.
//!
//! # States (§8)
//!
//! [`State::Initial`]: waiting until the current server's SUB has delivered a message in
//! this attempt (the subscription is live, §4); that message sends ICANHAZ? and moves to
//! [`State::Syncing`]: snapshot entries go into a new map while subscriber updates are
//! buffered; KTHXBAI replaces the map atomically, applies the buffered updates newer than
//! the snapshot and moves to [`State::Active`]: updates with a sequence above the
//! client's are applied, the rest dropped. Silence until the expiry moves to the next
//! server in [`State::Initial`].
//!
//! # Which snapshot reply is ours
//!
//! Replies carry no request id, and a passive server drops an ICANHAZ? without answering,
//! so a count of outstanding requests cannot say *which* request a reply answers: after
//! A → B → A, a reply from A may be the late answer to the first request or the answer to
//! the second one. The client counts outstanding requests per server (at most
//! [`MAX_OUTSTANDING_REQUESTS`]; replies that arrive while none is being collected are
//! expected and dropped as stale only while the count is above zero) and decides whether
//! the reply it has collected is usable on evidence, not on the count. A reply is
//! discarded when:
//!
//! 1. part of it arrived while the client was not collecting (it left the server
//!    mid-reply, or dropped one of its entries), so it is incomplete; or
//! 2. its KTHXBAI sequence is below the sequence of the first subscriber message of this
//!    attempt. Every update after that message reaches the client's buffer; an older
//!    snapshot would leave the updates in between missing. A snapshot at or above it,
//!    even a late answer to an earlier request, is a complete point-in-time view that the
//!    buffered updates bring up to date, so it is used.
//!
//! After a discard with no request left outstanding, the client asks again.
//!
//! Every attempt after the first on a server asks on a fresh connection
//! ([`Output::SendSnapshotRequest`]'s `fresh_connection`: the host closes the server's
//! DEALER and opens a new one), and so does an attempt restarted because the server's
//! numbers fell mid-sync. A reply to an earlier attempt's request can then never reach
//! a later attempt: it may be of a history the server has since left (it stepped down,
//! synced to its peer and took over again), where no sequence tells old from new. The
//! rules above remain for the requests of one attempt.
//!
//! # Local updates
//!
//! [`Client::set`] and [`Client::delete`] apply to the local map at once, as a
//! provisional entry with sequence 0 (the KVSET's own sequence). The server's order wins:
//! any later update from the server for that key (a KVPUB above the client's sequence)
//! and any later snapshot replace the provisional entry, whether or not it contains the
//! update, so the map never diverges from the server's. Keys outside the subtree are sent
//! but not applied locally: no echo or snapshot would ever confirm or remove them.
//!
//! # Events
//!
//! An [`Event::Updated`] or [`Event::Deleted`] is emitted whenever the entry under a key
//! changes (its value or the sequence the server wrote it at), so a mirror kept from the
//! events alone equals the map.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::mem;
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::Rng;

use crate::budget::{message_bytes, BoundedStructure, Budget, Structure, ENTRY_OVERHEAD};

use crate::kvmsg::{
    BstarState, DecodeError, KvMsg, Limits, Properties, SnapshotRequest, Uuid, FRAME_COUNT,
};
use crate::time::Instant;

/// At most this many snapshot requests are outstanding per server (§8).
pub const MAX_OUTSTANDING_REQUESTS: u8 = 2;

/// The position of a server in the client's server list.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ServerIndex(pub usize);

impl fmt::Display for ServerIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server {}", self.0)
    }
}

/// Which of a server's sockets a message arrived on.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Channel {
    /// The DEALER to the server's snapshot port: KVSYNC and KTHXBAI.
    Snapshot,
    /// The SUB to the server's publisher: KVPUB and HUGZ.
    Subscriber,
}

/// The client's configuration. Every timeout and bound is here so the simulator can push
/// it to extremes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Number of servers in the list (the host maps each [`ServerIndex`] to endpoints).
    pub servers: usize,
    /// Key prefix the client follows; empty for the whole map.
    pub subtree: Vec<u8>,
    /// Silence from the current server after which the client moves to the next (§8).
    pub server_ttl: Duration,
    /// Size limits for decoding, and for the client's own keys and values.
    pub limits: Limits,
    /// Subscriber updates held while a snapshot is in progress. Past it the oldest are
    /// dropped, and a snapshot that needed them is discarded and asked for again.
    pub max_buffered_updates: usize,
    /// The same bound in bytes (each update charged its frames plus
    /// [`crate::budget::ENTRY_OVERHEAD`]). At least one largest valid message.
    pub max_buffered_bytes: usize,
    /// Own updates remembered while their echo is awaited; past it the oldest are
    /// forgotten (a watched one is reported [`LostReason::Evicted`]).
    pub max_in_flight: usize,
    /// An own update in the subtree whose echo has not come this long after it was
    /// sent was lost on its way (§8 applies it locally at once): the client takes a
    /// fresh snapshot so that the local map cannot keep a value no server has.
    pub echo_timeout: Duration,
    /// While a snapshot request has no answer and its server's latest HUGZ said it is
    /// not active, the request is repeated this often. A passive drops requests, and takes
    /// over at the first request after its peer has been silent for two heartbeats: the
    /// repeat lets that happen within this long of the peer's expiry, not at the next
    /// server change.
    pub request_retry: Duration,
    /// Apply the client's own updates to the local map at once, as provisional entries
    /// with sequence 0 (§8, the default). Off, the map and the events change only with
    /// what the server publishes: an own update appears with its echo, at its sequence,
    /// so every event names a committed change (what a gateway serving watches needs).
    pub apply_own_updates: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            servers: 2,
            subtree: Vec::new(),
            server_ttl: Duration::from_secs(5),
            limits: Limits::default(),
            max_buffered_updates: 100_000,
            max_buffered_bytes: 128 << 20,
            max_in_flight: 10_000,
            echo_timeout: Duration::from_secs(5),
            request_retry: Duration::from_millis(200),
            apply_own_updates: true,
        }
    }
}

impl Config {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), Error> {
        if self.servers == 0 {
            return Err(Error::NoServers);
        }
        if self.server_ttl.is_zero() {
            return Err(Error::ZeroServerTtl);
        }
        if self.echo_timeout.is_zero() {
            return Err(Error::ZeroEchoTimeout);
        }
        if self.request_retry.is_zero() {
            return Err(Error::ZeroRequestRetry);
        }
        let largest = crate::budget::largest_message_bytes(&self.limits);
        if self.max_buffered_bytes < largest {
            return Err(Error::BudgetBelowLargestMessage {
                name: "max_buffered_bytes",
                needed: largest,
            });
        }
        for (name, value) in [
            ("limits.max_key_len", self.limits.max_key_len),
            ("limits.max_body_len", self.limits.max_body_len),
            ("max_buffered_updates", self.max_buffered_updates),
            ("max_in_flight", self.max_in_flight),
        ] {
            if value == 0 {
                return Err(Error::ZeroLimit { name });
            }
        }
        if self.subtree.len() > self.limits.max_key_len {
            return Err(Error::SubtreeTooLong {
                len: self.subtree.len(),
                max: self.limits.max_key_len,
            });
        }
        Ok(())
    }
}

/// Caller misuse or invalid configuration. Network input never produces one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server list is empty.
    #[error("the server list is empty")]
    NoServers,
    /// `server_ttl` is zero.
    #[error("server_ttl must be longer than zero")]
    ZeroServerTtl,
    /// `echo_timeout` is zero.
    #[error("echo_timeout must be greater than zero")]
    ZeroEchoTimeout,
    /// `request_retry` is zero.
    #[error("request_retry must be greater than zero")]
    ZeroRequestRetry,
    /// A byte budget is smaller than one largest valid message, which it must hold.
    #[error("{name} must be at least {needed} bytes (one largest message under the size limits)")]
    BudgetBelowLargestMessage {
        /// The offending field.
        name: &'static str,
        /// The least it may be.
        needed: usize,
    },
    /// A size limit is zero.
    #[error("{name} must be at least 1")]
    ZeroLimit {
        /// The configuration field.
        name: &'static str,
    },
    /// The subtree is longer than the key limit (a server would reject the ICANHAZ?).
    #[error("subtree is {len} bytes, the key limit is {max}")]
    SubtreeTooLong {
        /// Length given.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// A key is empty.
    #[error("key is empty")]
    EmptyKey,
    /// A key is longer than the limit.
    #[error("key is {len} bytes, limit is {max}")]
    KeyTooLong {
        /// Length given.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// `HUGZ` and `KTHXBAI` are reserved by the protocol.
    #[error("key is reserved by the protocol (HUGZ, KTHXBAI)")]
    ReservedKey,
    /// An empty value means delete on the wire; use [`Client::delete`].
    #[error("value is empty (an empty body means delete: use delete)")]
    EmptyValue,
    /// A value is larger than the body limit.
    #[error("value is {len} bytes, limit is {max}")]
    ValueTooLarge {
        /// Length given.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// A non-zero ttl under a millisecond: the wire's finest grain, it would read as 0
    /// (persistent).
    #[error("ttl is under one millisecond")]
    TtlTooShort,
    /// [`Client::watch_commit`] on a uuid that is not an own update awaiting its echo.
    #[error("update {0} is not awaiting its echo")]
    UnknownUpdate(Uuid),
}

/// The client's state for its current server (§8).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum State {
    /// Waiting for the subscription to be live before asking for a snapshot.
    Initial,
    /// Snapshot requested; collecting the reply.
    Syncing,
    /// Following the server's updates.
    Active,
}

/// One entry of the local map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value (never empty: an empty body deletes).
    pub value: Vec<u8>,
    /// The sequence at which the server wrote it; 0 for a local update not yet confirmed.
    pub sequence: i64,
    /// The uuid of the update that wrote it.
    pub uuid: Option<Uuid>,
    /// Its properties, as received (a snapshot's ttl is absolute, an update's relative).
    pub properties: Properties,
}

impl Entry {
    fn from_message(message: KvMsg) -> Self {
        Entry {
            value: message.body,
            sequence: message.sequence,
            uuid: message.uuid,
            properties: message.properties,
        }
    }
}

/// Why a watched update will never be confirmed by its echo.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LostReason {
    /// Its key is outside the client's subtree: the echo never reaches this client.
    OutsideSubtree,
    /// The client left the server before the echo arrived; the new server may or may not
    /// have the update (read the key to find out).
    ServerChanged,
    /// More than [`Config::max_in_flight`] updates were awaiting their echo.
    Evicted,
    /// The current server did not publish it within [`Config::echo_timeout`]: it refused
    /// it (its map is full: `--max-keys`, `--max-bytes`) or the update was lost on its
    /// way. The client re-syncs, so its map shows whether the update took effect.
    NotPublished,
}

/// What one buffered subscriber update is charged in the buffer's byte budget.
fn buffered_bytes(update: &KvMsg) -> usize {
    message_bytes(
        update.key.len(),
        update.properties.as_frame().len(),
        update.body.len(),
    )
}

/// Why an incoming message was dropped. Each has a counter in [`Stats`]; the routine ones
/// ([`DropReason::is_routine`]) happen in normal operation and emit no event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The frames are not a valid message.
    Malformed(DecodeError),
    /// The host passed a server index outside the list.
    UnknownServer,
    /// From a server other than the current one (routine: every server's sockets stay
    /// connected).
    NotCurrentServer,
    /// An update at or below the client's sequence (routine: updates already in the
    /// snapshot).
    OldSequence,
    /// A snapshot reply the client cannot use: a late or incomplete answer to an earlier
    /// request (routine after a failover).
    StaleReply,
    /// A snapshot reply while no request was outstanding.
    UnsolicitedReply,
    /// A key outside the client's subtree.
    OutsideSubtree,
    /// A message that does not belong on its channel (HUGZ as a snapshot reply, KTHXBAI
    /// on the subscriber).
    WrongChannel,
    /// A KTHXBAI whose subtree is not the client's.
    SubtreeMismatch,
    /// A buffered update pushed out by [`Config::max_buffered_updates`].
    BufferOverflow,
}

impl DropReason {
    /// A short, stable identifier, for counters and log fields.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Malformed(error) => error.reason(),
            DropReason::UnknownServer => "unknown_server",
            DropReason::NotCurrentServer => "not_current_server",
            DropReason::OldSequence => "old_sequence",
            DropReason::StaleReply => "stale_reply",
            DropReason::UnsolicitedReply => "unsolicited_reply",
            DropReason::OutsideSubtree => "outside_subtree",
            DropReason::WrongChannel => "wrong_channel",
            DropReason::SubtreeMismatch => "subtree_mismatch",
            DropReason::BufferOverflow => "buffer_overflow",
        }
    }

    /// True for drops that normal operation produces all the time; they are counted but
    /// emit no [`Event::Dropped`].
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            DropReason::NotCurrentServer | DropReason::OldSequence | DropReason::StaleReply
        )
    }
}

/// Something the application should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key now has this value, written by the server at `sequence` (0: a local update).
    Updated {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Vec<u8>,
        /// The sequence of the entry.
        sequence: i64,
    },
    /// A key is gone: deleted by the update at `sequence`, absent from the snapshot at
    /// `sequence`, or deleted locally (0).
    Deleted {
        /// The key.
        key: Vec<u8>,
        /// The sequence of the deletion.
        sequence: i64,
    },
    /// A snapshot replaced the map.
    Synced {
        /// The server it came from.
        server: ServerIndex,
        /// Its KTHXBAI sequence.
        sequence: i64,
        /// Number of keys in it.
        keys: usize,
    },
    /// The current server went silent; the client moved to the next one (with a single
    /// server, `from == to`: it starts over with the same one).
    ServerChanged {
        /// The server given up on.
        from: ServerIndex,
        /// The new current server.
        to: ServerIndex,
    },
    /// A watched update was published by the current server at `sequence`.
    Committed {
        /// The update.
        uuid: Uuid,
        /// The sequence the server gave it.
        sequence: i64,
    },
    /// A watched update will not be confirmed.
    Lost {
        /// The update.
        uuid: Uuid,
        /// Why.
        reason: LostReason,
    },
    /// An incoming message was dropped (only non-routine reasons are reported).
    Dropped {
        /// The server it came from, as the host tagged it.
        server: ServerIndex,
        /// The channel it came on.
        channel: Channel,
        /// Why.
        reason: DropReason,
    },
}

/// An effect for the host to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send these frames (ICANHAZ? and the subtree) on the DEALER of `server`.
    SendSnapshotRequest {
        /// The server to ask.
        server: ServerIndex,
        /// The two frames.
        frames: Vec<Vec<u8>>,
        /// Close the DEALER of `server` and send on a new one: the first request of an
        /// attempt on a server asked before. Replies still queued for the old one
        /// answer requests of an earlier attempt, perhaps of a history the server has
        /// since left, and nothing in a reply says which request it answers.
        fresh_connection: bool,
    },
    /// Send this KVSET on the PUB connected to every server's collector.
    Publish {
        /// The five frames.
        frames: [Vec<u8>; FRAME_COUNT],
    },
    /// Tell the application.
    Event(Event),
}

/// Counters, for logs, metrics and the simulator's coverage report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// ICANHAZ? sent.
    pub snapshot_requests: u64,
    /// Snapshots that replaced the map.
    pub snapshots_applied: u64,
    /// Complete snapshot replies discarded (stale, mismatched or missing buffered updates).
    pub snapshots_discarded: u64,
    /// Server updates applied to the map.
    pub updates_applied: u64,
    /// Times the client gave up on its current server.
    pub failovers: u64,
    /// Outstanding requests assumed dropped to stay within [`MAX_OUTSTANDING_REQUESTS`].
    pub requests_written_off: u64,
    /// Times the current server's HUGZ said it was no longer active, so the client left.
    pub left_inactive_server: u64,
    /// Times the current server's HUGZ sequence fell below the client's (it restarted),
    /// so the client took a fresh snapshot from it.
    pub resyncs_after_restart: u64,
    /// Times a whole-map client saw a gap in the numbering and took a fresh snapshot.
    pub resyncs_after_gap: u64,
    /// Times the host reported the current server's SUB reconnected, so the client took
    /// a fresh snapshot.
    pub resyncs_after_reconnect: u64,
    /// Times an own update's echo did not come within `echo_timeout`, so the client took
    /// a fresh snapshot.
    pub resyncs_after_lost_update: u64,
    /// Times the host reported a server's DEALER reconnected, so the replies to the
    /// requests sent to it before were written off.
    pub snapshot_reconnects: u64,
    /// Times the host reported the current server's connection gone, so the client
    /// moved on without waiting for `server_ttl`.
    pub left_disconnected_server: u64,
    /// Times the client left a server that was not serving for a better one: one that
    /// speaks when the current one is gone, or one that announced itself active when
    /// the current one is not active or unheard since it became current.
    pub moved_to_better_server: u64,
    /// Snapshot requests repeated to a server that said it is not active
    /// (`request_retry`).
    pub requests_repeated: u64,
    dropped: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Messages dropped for `reason` (a [`DropReason::as_str`] value).
    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped.get(reason).copied().unwrap_or(0)
    }

    /// Every non-zero drop counter, by reason, in name order.
    pub fn dropped_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.dropped.iter().map(|(reason, count)| (*reason, *count))
    }
}

/// What the client knows of one server, kept across failovers: its snapshot requests,
/// and what its own messages and the host's connection notices say about it.
#[derive(Clone, Copy, Debug, Default)]
struct ServerBook {
    /// Requests sent whose KTHXBAI has not arrived (capped, see the module docs).
    outstanding: u8,
    /// Part of the reply now streaming from this server was not collected.
    reply_cut: bool,
    /// Requests written off to stay within [`MAX_OUTSTANDING_REQUESTS`] whose replies
    /// may still come: a server that answers them is working through a queue of our
    /// requests, and asking again would only lengthen it.
    written_off: u8,
    /// Sequence of the latest message its SUB delivered since the subscription was last
    /// made (connect or reconnect). `Some` proves the subscription live: every later
    /// message reaches the client, current server or not, and this one was seen.
    heard: Option<i64>,
    /// The Binary Star state its latest HUGZ announced (servers that add the marker),
    /// and when it arrived.
    announced: Option<(BstarState, Instant)>,
    /// The host reported its connection gone, and nothing was heard from it since.
    down: bool,
    /// The number of keys its latest HUGZ said its map holds.
    keys: Option<u64>,
    /// A request went out on the current connection to it.
    asked: bool,
}

/// What a client knows of one server (see [`Client::server_view`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerView {
    /// Sequence of the latest message its SUB delivered since the subscription was
    /// last made; `None` if nothing since.
    pub heard: Option<i64>,
    /// The Binary Star state its latest HUGZ announced (`None`: never, or a server
    /// that does not mark its HUGZ, such as the zguide's).
    pub announced: Option<BstarState>,
    /// The host reported its connection gone, and nothing was heard from it since.
    pub down: bool,
    /// The number of keys its latest HUGZ said its map holds (`None`: not said).
    pub keys: Option<u64>,
}

/// The client's timers. Each deadline is computed from the state in one place,
/// [`Client::deadline`]; [`Client::poll_timeout`] is the earliest of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The current server has been silent for `server_ttl`: move to the next.
    ServerSilence,
    /// An own update's echo is overdue: take a fresh snapshot.
    LostEcho,
    /// A snapshot request went unanswered by a server that says it is not active: ask
    /// again.
    RequestRetry,
}

impl Timer {
    const ALL: [Timer; 3] = [Timer::ServerSilence, Timer::LostEcho, Timer::RequestRetry];
}

/// What the client has gathered from the current server since it became current.
#[derive(Debug, Default)]
struct Attempt {
    /// The lowest sequence from which every update reaches `buffer`: the first
    /// subscriber message of the attempt (one past it for a HUGZ, which follows the
    /// update it counts). `Some` once the subscription is live.
    live_from: Option<i64>,
    /// Sequence of the latest subscriber message of the attempt. One server's
    /// sequences never fall, so a lower one means it restarted with a new history.
    last_heard: Option<i64>,
    /// Subscriber updates received before the snapshot completes.
    buffer: VecDeque<KvMsg>,
    /// The bytes `buffer` is charged ([`buffered_bytes`]).
    buffer_bytes: usize,
    /// Highest sequence pushed out of a full `buffer`.
    overflow_through: Option<i64>,
    /// The snapshot being collected.
    incoming: BTreeMap<Vec<u8>, Entry>,
    /// A snapshot entry was collected since the last KTHXBAI.
    reply_started: bool,
    /// When the latest ICANHAZ? of this attempt that was not a repeat was sent.
    requested_at: Option<Instant>,
    /// When the latest ICANHAZ? of this attempt was sent, repeats included.
    last_request_at: Option<Instant>,
    /// A reply was discarded that asking again at once would only bring back (it named
    /// another subtree): ask again at the `request_retry` pace.
    ask_again: bool,
    /// A request of this attempt went out (on a connection of its own).
    asked: bool,
}

/// An own update awaiting its echo.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// Order of issue, for eviction.
    issued: u64,
    /// When a missing echo means the update was lost (echoable updates only).
    echo_deadline: Option<Instant>,
    /// The key is in the subtree, so an echo can arrive.
    echoable: bool,
    /// The application asked for [`Event::Committed`] or [`Event::Lost`].
    watched: bool,
}

/// The clone agent. See the [module documentation](self).
#[derive(Debug)]
pub struct Client {
    config: Config,
    rng: ChaCha8Rng,
    state: State,
    current: ServerIndex,
    expiry: Instant,
    sequence: i64,
    map: BTreeMap<Vec<u8>, Entry>,
    /// Request bookkeeping per server, created on first use.
    servers: BTreeMap<ServerIndex, ServerBook>,
    attempt: Attempt,
    in_flight: BTreeMap<Uuid, InFlight>,
    in_flight_by_age: BTreeMap<u64, Uuid>,
    /// Echo deadlines of in-flight updates sent since the last snapshot.
    echo_deadlines: BTreeMap<(Instant, u64), Uuid>,
    issued: u64,
    /// The latest `now` the host passed in: the send time of application updates.
    clock: Instant,
    outputs: VecDeque<Output>,
    stats: Stats,
}

impl Client {
    /// A client starting with the first server of the list, in [`State::Initial`]. UUIDs
    /// of its updates are drawn from `rng` (the daemon seeds it from the OS, tests and the
    /// simulator from a seed).
    pub fn new(config: Config, rng: ChaCha8Rng, now: Instant) -> Result<Self, Error> {
        config.validate()?;
        let expiry = now + config.server_ttl;
        Ok(Client {
            config,
            rng,
            state: State::Initial,
            current: ServerIndex(0),
            expiry,
            sequence: 0,
            map: BTreeMap::new(),
            servers: BTreeMap::new(),
            attempt: Attempt::default(),
            in_flight: BTreeMap::new(),
            in_flight_by_age: BTreeMap::new(),
            echo_deadlines: BTreeMap::new(),
            issued: 0,
            clock: now,
            outputs: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    // --- Getters ---------------------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The key prefix the client follows (the host subscribes its SUBs to it).
    pub fn subtree(&self) -> &[u8] {
        &self.config.subtree
    }

    /// The state for the current server.
    pub fn state(&self) -> State {
        self.state
    }

    /// The server the client honours.
    pub fn current_server(&self) -> ServerIndex {
        self.current
    }

    /// The sequence of the last snapshot or update applied.
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// The value under `key` in the local map.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(|entry| entry.value.as_slice())
    }

    /// The entry under `key` in the local map.
    pub fn entry(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    /// The local map in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> + '_ {
        self.map.iter().map(|(key, entry)| (key.as_slice(), entry))
    }

    /// The local map in key order from `start` on, so that a large map can be read in
    /// pages.
    pub fn iter_from(
        &self,
        start: std::ops::Bound<&[u8]>,
    ) -> impl Iterator<Item = (&[u8], &Entry)> + '_ {
        self.map
            .range::<[u8], _>((start, std::ops::Bound::Unbounded))
            .map(|(key, entry)| (key.as_slice(), entry))
    }

    /// Number of keys in the local map.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the local map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// True once the current server's subscriber has delivered a message since it became
    /// current (§4).
    pub fn is_subscription_live(&self) -> bool {
        self.attempt.live_from.is_some()
    }

    /// What the client has learned of `server` from its messages and the host's
    /// connection notices.
    pub fn server_view(&self, server: ServerIndex) -> ServerView {
        let book = self.servers.get(&server).copied().unwrap_or_default();
        ServerView {
            heard: book.heard,
            announced: book.announced.map(|(state, _)| state),
            down: book.down,
            keys: book.keys,
        }
    }

    /// Snapshot requests to `server` whose reply has not ended.
    pub fn outstanding_requests(&self, server: ServerIndex) -> u8 {
        self.servers.get(&server).map_or(0, |book| book.outstanding)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The structures that input fills, with their use and their count and byte bounds
    /// (the simulator's oracle 7 checks them). Own updates in flight are fixed-size
    /// records, each charged [`ENTRY_OVERHEAD`].
    pub fn bounds(&self) -> [BoundedStructure; 2] {
        [
            BoundedStructure {
                structure: Structure::ClientUpdateBuffer,
                len: self.attempt.buffer.len(),
                max_len: self.config.max_buffered_updates,
                bytes: self.attempt.buffer_bytes,
                max_bytes: self.config.max_buffered_bytes,
            },
            BoundedStructure {
                structure: Structure::ClientInFlight,
                len: self.in_flight.len(),
                max_len: self.config.max_in_flight,
                bytes: self.in_flight.len().saturating_mul(ENTRY_OVERHEAD),
                max_bytes: self.config.max_in_flight.saturating_mul(ENTRY_OVERHEAD),
            },
        ]
    }

    // --- Inputs ----------------------------------------------------------------------

    /// A message (its raw frames, without any envelope) arrived from `server` on
    /// `channel`. Malformed or unexpected input is counted and dropped, never an error.
    pub fn handle_message<F: AsRef<[u8]>>(
        &mut self,
        now: Instant,
        server: ServerIndex,
        channel: Channel,
        frames: &[F],
    ) {
        self.clock = self.clock.max(now);
        if server.0 >= self.config.servers {
            self.drop_message(server, channel, DropReason::UnknownServer);
            return;
        }
        match KvMsg::decode(frames, &self.config.limits) {
            Ok(message) => match channel {
                Channel::Subscriber => self.on_subscriber(now, server, message),
                Channel::Snapshot => self.on_snapshot_reply(now, server, message),
            },
            Err(error) => {
                if channel == Channel::Snapshot {
                    // It may have been an entry of a reply: that reply is now incomplete.
                    self.book(server).reply_cut = true;
                }
                self.drop_message(server, channel, DropReason::Malformed(error));
            }
        }
    }

    /// The host saw the SUB to `server` reconnect (libzmq's socket monitor: a
    /// disconnect, then a connect). Whatever was published meanwhile is lost and nothing
    /// in the stream says so; if it is the current server, the client takes a fresh
    /// snapshot from it once the subscription is live again.
    pub fn handle_subscriber_reconnected(&mut self, now: Instant, server: ServerIndex) {
        self.clock = self.clock.max(now);
        if server.0 >= self.config.servers {
            return;
        }
        // The subscription is made anew on the new connection: nothing proves it live.
        self.book(server).heard = None;
        if server != self.current || self.state == State::Initial {
            return;
        }
        self.stats.resyncs_after_reconnect += 1;
        self.start_over(now, server, false);
    }

    /// The host saw the DEALER to `server` reconnect (libzmq's socket monitor). A
    /// server answers on the connection a request came in on, and the lost connection
    /// took with it whatever part of a reply had not arrived: the requests sent before
    /// are written off, so the client never waits for a reply that cannot come.
    /// While collecting from `server`, the client asks again at once; a reply that had
    /// started may still have its tail queued here, so it counts as cut.
    pub fn handle_snapshot_reconnected(&mut self, now: Instant, server: ServerIndex) {
        self.clock = self.clock.max(now);
        if server.0 >= self.config.servers {
            return;
        }
        self.stats.snapshot_reconnects += 1;
        let book = self.book(server);
        book.outstanding = 0;
        book.written_off = 0;
        if server != self.current || self.state != State::Syncing {
            return;
        }
        if self.attempt.reply_started {
            self.book(server).reply_cut = true;
        }
        self.request_snapshot(now);
    }

    /// The host saw a connection to `server` go down (libzmq's socket monitor: the SUB
    /// or the DEALER disconnected, or a connect attempt failed). Its subscription is
    /// gone until it reconnects; if it is the current server, the client moves on at
    /// once instead of waiting out `server_ttl` (Binary Star still decides, at the
    /// server, whether the backup may take over).
    pub fn handle_server_disconnected(&mut self, now: Instant, server: ServerIndex) {
        self.clock = self.clock.max(now);
        if server.0 >= self.config.servers {
            return;
        }
        let book = self.book(server);
        let was_down = book.down;
        book.down = true;
        book.heard = None;
        if server == self.current && !was_down {
            self.stats.left_disconnected_server += 1;
            self.fail_over(now);
        }
    }

    /// Time has passed: fires every timer that is due (see [`Timer`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        for timer in Timer::ALL {
            if self.deadline(timer).is_some_and(|deadline| deadline <= now) {
                self.fire(now, timer);
            }
        }
    }

    fn fire(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::ServerSilence => self.fail_over(now),
            Timer::LostEcho => {
                // One of our own updates never came back: the local map may hold a
                // value no server has. Start over on the same server; its snapshot
                // settles the map.
                self.stats.resyncs_after_lost_update += 1;
                self.report_unechoed(now);
                self.start_over(now, self.current, false);
            }
            Timer::RequestRetry => {
                self.stats.requests_repeated += 1;
                self.send_snapshot_request(now);
            }
        }
    }

    /// When `timer` is due, if it is armed.
    fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::ServerSilence => Some(self.expiry),
            Timer::LostEcho => self
                .echo_deadlines
                .first_key_value()
                .filter(|_| self.state == State::Active)
                .map(|((deadline, _), _)| *deadline),
            Timer::RequestRetry => self
                .attempt
                .last_request_at
                .filter(|_| {
                    self.state == State::Syncing
                        && !self.attempt.reply_started
                        && (self.attempt.ask_again
                            || self.announced_inactive(self.clock, self.current))
                })
                .map(|requested_at| requested_at + self.config.request_retry),
        }
    }

    /// Leaves the current server for the best next one, in [`State::Initial`].
    fn fail_over(&mut self, now: Instant) {
        let to = self.successor(now, self.current);
        self.stats.failovers += 1;
        self.start_over(now, to, true);
    }

    /// Every watched own update whose echo is overdue is reported lost: the server did
    /// not publish it (it refused it, its map being full, or it never arrived). CHP has
    /// no negative reply, so the missing echo is the refusal (DECISIONS.md).
    fn report_unechoed(&mut self, now: Instant) {
        let overdue: Vec<Uuid> = self
            .echo_deadlines
            .range(..=(now, u64::MAX))
            .map(|(_, uuid)| *uuid)
            .collect();
        for uuid in overdue {
            if let Some(update) = self.forget_in_flight(uuid) {
                if update.watched {
                    self.emit(Event::Lost {
                        uuid,
                        reason: LostReason::NotPublished,
                    });
                }
            }
        }
    }

    /// The server to try after `from`: in list order from the one after it, the first
    /// that announced itself active recently, else the first whose connection is not
    /// known to be down, else simply the next.
    fn successor(&self, now: Instant, from: ServerIndex) -> ServerIndex {
        let servers = self.config.servers;
        let others: Vec<ServerIndex> = (1..=servers)
            .map(|step| ServerIndex((from.0 + step) % servers))
            .filter(|&server| server != from || servers == 1)
            .collect();
        let up = |server: &ServerIndex| !self.servers.get(server).is_some_and(|book| book.down);
        others
            .iter()
            .copied()
            .find(|&server| up(&server) && self.recently_announced(now, server, true))
            .or_else(|| others.iter().copied().find(up))
            .unwrap_or(ServerIndex((from.0 + 1) % servers))
    }

    /// True when `server`'s latest HUGZ, at most `server_ttl` old, announced a state
    /// that is active (`active`) or one that is not (`!active`).
    fn recently_announced(&self, now: Instant, server: ServerIndex, active: bool) -> bool {
        self.servers
            .get(&server)
            .and_then(|book| book.announced)
            .is_some_and(|(state, at)| {
                (state == BstarState::Active) == active
                    && now.saturating_duration_since(at) < self.config.server_ttl
            })
    }

    /// True when `server`'s latest HUGZ, at most `server_ttl` old, announced a state that
    /// is not active: it drops
    /// snapshot requests, and takes over at one that comes once its peer is silent.
    /// (Only then are requests repeated: an active server answers each one with a
    /// whole snapshot, and a server whose state is unknown may be active.)
    fn announced_inactive(&self, now: Instant, server: ServerIndex) -> bool {
        self.recently_announced(now, server, false)
    }

    /// Starts a new attempt on `server` in [`State::Initial`] (announced as a
    /// [`Event::ServerChanged`] when `announce`): the map stays until a new snapshot
    /// replaces it; updates awaiting an echo from the old history are lost.
    fn start_over(&mut self, now: Instant, server: ServerIndex, announce: bool) {
        let from = self.current;
        if self.state == State::Syncing && self.attempt.reply_started {
            // The rest of the reply we were collecting may still come; it is incomplete.
            self.book(from).reply_cut = true;
        }
        self.current = server;
        self.state = State::Initial;
        self.attempt = Attempt::default();
        self.expiry = now + self.config.server_ttl;
        if announce {
            self.emit(Event::ServerChanged { from, to: server });
        }
        if let Some(heard) = self.book(server).heard {
            // Its subscription is already live, and every message from it after `heard`
            // reaches the buffer from now on: ask for the snapshot at once.
            self.attempt.live_from = Some(heard.saturating_add(1));
            self.attempt.last_heard = Some(heard);
            self.request_snapshot(now);
        }
        // The update's echo would have come from the history we left.
        let in_flight = mem::take(&mut self.in_flight);
        self.in_flight_by_age.clear();
        self.echo_deadlines.clear();
        for (uuid, update) in in_flight {
            if update.watched {
                self.emit(Event::Lost {
                    uuid,
                    reason: LostReason::ServerChanged,
                });
            }
        }
    }

    // --- Outputs ---------------------------------------------------------------------

    /// The next effect to carry out, in the order produced.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Client::handle_timeout`] must be called next: the earliest armed timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL
            .into_iter()
            .filter_map(|timer| self.deadline(timer))
            .min()
    }

    // --- Application commands ----------------------------------------------------------

    /// Sets `key` to `value` (with a `ttl`, the server deletes it after that long; `None`
    /// or zero is persistent): publishes a KVSET to every server and applies it locally
    /// (see the module docs). Returns the update's uuid, for [`Client::watch_commit`].
    pub fn set(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Uuid, Error> {
        self.check_key(&key)?;
        if value.is_empty() {
            return Err(Error::EmptyValue);
        }
        if value.len() > self.config.limits.max_body_len {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.config.limits.max_body_len,
            });
        }
        let ttl = ttl.unwrap_or_default();
        if !ttl.is_zero() && ttl < Duration::from_millis(1) {
            return Err(Error::TtlTooShort);
        }
        let uuid = self.new_uuid();
        Ok(self.send_update(KvMsg::kvset(key, value, uuid).with_ttl(ttl), uuid))
    }

    /// Deletes `key`: publishes a KVSET with an empty body to every server and removes
    /// the key locally. Returns the update's uuid.
    pub fn delete(&mut self, key: Vec<u8>) -> Result<Uuid, Error> {
        self.check_key(&key)?;
        let uuid = self.new_uuid();
        Ok(self.send_update(KvMsg::kvset_delete(key, uuid), uuid))
    }

    /// Asks for an [`Event::Committed`] when the current server publishes the update
    /// `uuid` (returned by [`Client::set`] or [`Client::delete`]), or an [`Event::Lost`]
    /// if that cannot happen. Call it right after the update, before handling more input:
    /// once the echo has arrived, the uuid is no longer known.
    pub fn watch_commit(&mut self, uuid: Uuid) -> Result<(), Error> {
        let Some(update) = self.in_flight.get_mut(&uuid) else {
            return Err(Error::UnknownUpdate(uuid));
        };
        if update.echoable {
            update.watched = true;
        } else {
            self.forget_in_flight(uuid);
            self.emit(Event::Lost {
                uuid,
                reason: LostReason::OutsideSubtree,
            });
        }
        Ok(())
    }

    // --- Internals -------------------------------------------------------------------

    fn book(&mut self, server: ServerIndex) -> &mut ServerBook {
        self.servers.entry(server).or_default()
    }

    fn on_subscriber(&mut self, now: Instant, server: ServerIndex, message: KvMsg) {
        if message.is_kthxbai() {
            self.drop_message(server, Channel::Subscriber, DropReason::WrongChannel);
            return;
        }
        let sequence = message.sequence;
        let announced = message.hugz_state();
        if let Some(keys) = message.hugz_keys() {
            self.book(server).keys = Some(keys);
        }
        if server != self.current {
            let current_gone = self.book(self.current).down;
            self.note_heard(now, server, sequence, announced);
            let better = current_gone
                || (announced == Some(BstarState::Active) && !self.current_is_serving(now));
            if better {
                self.stats.moved_to_better_server += 1;
                self.stats.failovers += 1;
                self.start_over(now, server, true);
            } else {
                self.drop_message(server, Channel::Subscriber, DropReason::NotCurrentServer);
            }
            return;
        }
        // A server that was not active dropped every request it got; now that it says
        // it is active, the one it will answer must be sent.
        let became_active = announced == Some(BstarState::Active)
            && self
                .book(server)
                .announced
                .is_some_and(|(state, _)| state != BstarState::Active);
        // A new attempt that starts on the way (a restart, a gap) receives this message
        // as its first: it needs no earlier proof of the subscription, and the one it
        // would find may belong to a history the server no longer has.
        self.book(server).heard = None;
        self.on_current_subscriber(now, server, message);
        self.note_heard(now, server, sequence, announced);
        if became_active
            && self.current == server
            && self.state == State::Syncing
            && !self.attempt.reply_started
        {
            self.stats.requests_repeated += 1;
            self.request_snapshot(now);
        }
    }

    /// Records a message from `server`'s SUB: its subscription is live, and what the
    /// message announced of its Binary Star state.
    fn note_heard(
        &mut self,
        now: Instant,
        server: ServerIndex,
        sequence: i64,
        announced: Option<BstarState>,
    ) {
        let book = self.book(server);
        book.heard = Some(sequence);
        book.down = false;
        if let Some(state) = announced {
            book.announced = Some((state, now));
        }
    }

    /// False when the current server is gone, announced itself not active, or has said
    /// nothing since it became current while the client waits for its subscription:
    /// then a server that announces itself active is worth moving to at once.
    fn current_is_serving(&self, now: Instant) -> bool {
        let book = self.servers.get(&self.current).copied().unwrap_or_default();
        let unheard = self.state == State::Initial && book.heard.is_none();
        !(book.down || unheard || self.recently_announced(now, self.current, false))
    }

    fn on_current_subscriber(&mut self, now: Instant, server: ServerIndex, message: KvMsg) {
        if message.is_hugz() && self.state == State::Active && self.abandons_history(&message) {
            if message
                .hugz_state()
                .is_some_and(|state| state != BstarState::Active)
            {
                // The server stopped serving (a backup that stepped down after a split
                // brain, a primary that restarted): its HUGZ would otherwise keep us
                // on a server that publishes nothing.
                self.stats.left_inactive_server += 1;
                self.fail_over(now);
                return;
            }
            // Its sequence went below ours: the server restarted with a new history
            // (our updates above its sequence would all be dropped as old). Take a fresh
            // snapshot from it; this HUGZ already proves the subscription live.
            self.stats.resyncs_after_restart += 1;
            self.start_over(now, server, false);
        } else if self.state == State::Active && self.missed_updates(&message) {
            // A client of the whole map sees every KVPUB: a gap in their numbering (or a
            // HUGZ ahead of us, which follows every KVPUB it counts) means some were
            // lost (a high-water-mark drop, a connection that broke and came back).
            self.stats.resyncs_after_gap += 1;
            self.start_over(now, server, false);
        }
        let syncing = matches!(self.state, State::Initial | State::Syncing);
        if syncing
            && self
                .attempt
                .last_heard
                .is_some_and(|last| message.sequence < last)
        {
            // The server left the history we were syncing to (it restarted, or
            // re-synced to its peer's): what was buffered belongs to the old history,
            // and so may a reply still queued for us. Start a new attempt, whose request
            // goes out on a new connection; this message is its first.
            self.stats.resyncs_after_restart += 1;
            self.start_over(now, server, false);
        }
        self.attempt.last_heard = Some(message.sequence);
        if self.attempt.live_from.is_none() {
            let first_buffered = if message.is_hugz() {
                message.sequence.saturating_add(1)
            } else {
                message.sequence
            };
            self.attempt.live_from = Some(first_buffered);
        }
        if !message.is_hugz() {
            // Published by the current server: whatever happens to it here, it is
            // committed.
            self.note_published(message.uuid, message.sequence);
        }
        match self.state {
            State::Initial => self.request_snapshot(now),
            State::Syncing => {}
            State::Active => self.expiry = now + self.config.server_ttl,
        }
        if message.is_hugz() {
            // A HUGZ only proves the server alive; its sequence covers keys outside the
            // subtree too, so it never moves the client's sequence.
            return;
        }
        if !message.key.starts_with(&self.config.subtree) {
            self.drop_message(server, Channel::Subscriber, DropReason::OutsideSubtree);
            return;
        }
        match self.state {
            State::Active => self.apply_update(message),
            State::Initial | State::Syncing => self.buffer_update(server, message),
        }
    }

    /// True when a HUGZ from the current server shows that it no longer holds the
    /// history the client follows: it says it is not active, or its sequence fell below
    /// ours. A HUGZ follows every KVPUB numbered at or below it on the same connection,
    /// so a lower sequence cannot be a late message.
    fn abandons_history(&self, hugz: &KvMsg) -> bool {
        hugz.hugz_state()
            .is_some_and(|state| state != BstarState::Active)
            || hugz.sequence < self.sequence
    }

    /// True when a client of the whole map (empty subtree) can tell from `message` that
    /// it missed updates. Clients of a subtree cannot: the numbering counts keys their
    /// subscription filters out.
    fn missed_updates(&self, message: &KvMsg) -> bool {
        if !self.config.subtree.is_empty() {
            return false;
        }
        let expected = self.sequence.saturating_add(1);
        if message.is_hugz() {
            message.sequence > self.sequence
        } else {
            message.sequence > expected
        }
    }

    /// The buffer's bound: the oldest updates make room until `message` fits within
    /// [`Config::max_buffered_updates`] and [`Config::max_buffered_bytes`].
    fn buffer_update(&mut self, server: ServerIndex, message: KvMsg) {
        let budget = Budget {
            max_len: self.config.max_buffered_updates,
            max_bytes: self.config.max_buffered_bytes,
        };
        let incoming = buffered_bytes(&message);
        while !budget.admits(
            self.attempt.buffer.len(),
            self.attempt.buffer_bytes,
            incoming,
        ) {
            let Some(evicted) = self.attempt.buffer.pop_front() else {
                break;
            };
            self.attempt.buffer_bytes = self
                .attempt
                .buffer_bytes
                .saturating_sub(buffered_bytes(&evicted));
            let through = self.attempt.overflow_through.unwrap_or(i64::MIN);
            self.attempt.overflow_through = Some(through.max(evicted.sequence));
            self.drop_message(server, Channel::Subscriber, DropReason::BufferOverflow);
        }
        self.attempt.buffer_bytes = self.attempt.buffer_bytes.saturating_add(incoming);
        self.attempt.buffer.push_back(message);
    }

    fn on_snapshot_reply(&mut self, now: Instant, server: ServerIndex, mut message: KvMsg) {
        if message.is_hugz() {
            self.drop_message(server, Channel::Snapshot, DropReason::WrongChannel);
            return;
        }
        let current = server == self.current;
        let collecting = current && self.state == State::Syncing;
        if current && self.state != State::Initial {
            // While syncing only snapshot replies count; while active, anything does.
            self.expiry = now + self.config.server_ttl;
        }
        let book = self.book(server);
        let expected = book.outstanding > 0;
        if message.is_kthxbai() {
            if book.outstanding > 0 {
                book.outstanding -= 1;
            } else {
                book.written_off = book.written_off.saturating_sub(1);
            }
            let cut = mem::take(&mut book.reply_cut);
            if collecting {
                self.finish_snapshot(now, message, cut);
            } else {
                self.drop_reply(server, current, expected);
            }
            return;
        }
        if !collecting || book.reply_cut {
            book.reply_cut = true;
            self.drop_reply(server, current, expected);
            return;
        }
        if !message.key.starts_with(&self.config.subtree) {
            self.drop_message(server, Channel::Snapshot, DropReason::OutsideSubtree);
            return;
        }
        self.attempt.reply_started = true;
        self.note_published(message.uuid, message.sequence);
        if message.is_delete() {
            // Servers store no deletes; if one is sent anyway, the key is absent.
            self.attempt.incoming.remove(&message.key);
        } else {
            let key = mem::take(&mut message.key);
            self.attempt
                .incoming
                .insert(key, Entry::from_message(message));
        }
    }

    fn drop_reply(&mut self, server: ServerIndex, current: bool, expected: bool) {
        let reason = if !current {
            DropReason::NotCurrentServer
        } else if expected {
            DropReason::StaleReply
        } else {
            DropReason::UnsolicitedReply
        };
        self.drop_message(server, Channel::Snapshot, reason);
    }

    fn finish_snapshot(&mut self, now: Instant, kthxbai: KvMsg, cut: bool) {
        let server = self.current;
        let sequence = kthxbai.sequence;
        let incoming = mem::take(&mut self.attempt.incoming);
        self.attempt.reply_started = false;
        let rejection = if cut {
            Some(DropReason::StaleReply)
        } else if !names_subtree(&kthxbai.body, &self.config.subtree) {
            Some(DropReason::SubtreeMismatch)
        } else if self
            .attempt
            .live_from
            // The buffer holds every update from `live_from` on: a snapshot just below
            // it leaves no hole.
            .is_none_or(|live_from| sequence.saturating_add(1) < live_from)
        {
            Some(DropReason::StaleReply)
        } else if self
            .attempt
            .overflow_through
            .is_some_and(|through| through > sequence)
        {
            Some(DropReason::BufferOverflow)
        } else {
            None
        };
        if let Some(reason) = rejection {
            self.stats.snapshots_discarded += 1;
            let mismatch = reason == DropReason::SubtreeMismatch;
            self.drop_message(server, Channel::Snapshot, reason);
            // Ask again when no other reply is coming. The buffer keeps running, so the
            // subscription evidence of this attempt stays valid. After a cut reply the
            // count cannot be trusted: the request it answered may have been lost with
            // a broken connection, and the reply we discarded may be the one to our
            // latest request: waiting for another would end only in a timeout that
            // leaves a healthy server. At worst one snapshot too many is sent. A reply
            // for another subtree would come again: the request is repeated at the
            // retry pace only.
            let book = self.book(server);
            let none_coming = book.outstanding == 0 && book.written_off == 0;
            if mismatch {
                self.attempt.ask_again = true;
            } else if cut || none_coming {
                self.request_snapshot(now);
            }
            return;
        }
        let old = mem::replace(&mut self.map, incoming);
        self.emit_differences(old, sequence);
        // The snapshot replaced every provisional entry of an update sent before it was
        // requested: those can no longer leave the map wrong, so their echo is awaited
        // for commit reports only. An update sent after the request may be missing from
        // it: its deadline stands.
        let requested_at = self.attempt.requested_at.unwrap_or(self.clock);
        let settled: Vec<(Instant, u64)> = self
            .echo_deadlines
            .keys()
            // Sent before the request: its deadline (sent + echo_timeout) comes first.
            .filter(|(deadline, _)| *deadline < requested_at + self.config.echo_timeout)
            .copied()
            .collect();
        for key in settled {
            if let Some(uuid) = self.echo_deadlines.remove(&key) {
                if let Some(update) = self.in_flight.get_mut(&uuid) {
                    update.echo_deadline = None;
                }
            }
        }
        self.sequence = sequence;
        self.state = State::Active;
        self.stats.snapshots_applied += 1;
        self.emit(Event::Synced {
            server,
            sequence,
            keys: self.map.len(),
        });
        self.attempt.overflow_through = None;
        self.attempt.buffer_bytes = 0;
        for update in mem::take(&mut self.attempt.buffer) {
            if update.sequence > self.sequence && self.missed_updates(&update) {
                // The buffer itself has a hole (its publisher dropped updates): jumping
                // over it would make every later HUGZ look up to date.
                self.stats.resyncs_after_gap += 1;
                self.start_over(now, server, false);
                return;
            }
            self.apply_update(update);
        }
    }

    /// Emits events that turn `old` into the current map: a merge walk in key order.
    fn emit_differences(&mut self, old: BTreeMap<Vec<u8>, Entry>, sequence: i64) {
        let mut events = Vec::new();
        let mut old = old.into_iter().peekable();
        let mut new = self.map.iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((old_key, _)), Some((new_key, _))) => old_key.cmp(new_key),
            };
            match order {
                std::cmp::Ordering::Less => {
                    if let Some((key, _)) = old.next() {
                        events.push(Event::Deleted { key, sequence });
                    }
                }
                std::cmp::Ordering::Greater => {
                    if let Some((key, entry)) = new.next() {
                        events.push(updated(key, entry));
                    }
                }
                std::cmp::Ordering::Equal => {
                    if let (Some((_, before)), Some((key, after))) = (old.next(), new.next()) {
                        if before.value != after.value || before.sequence != after.sequence {
                            events.push(updated(key, after));
                        }
                    }
                }
            }
        }
        for event in events {
            self.emit(event);
        }
    }

    fn apply_update(&mut self, message: KvMsg) {
        if message.sequence <= self.sequence {
            self.drop_message(self.current, Channel::Subscriber, DropReason::OldSequence);
            return;
        }
        self.sequence = message.sequence;
        self.stats.updates_applied += 1;
        self.store(message);
    }

    /// Writes an update into the map and reports the change, if any.
    fn store(&mut self, message: KvMsg) {
        let sequence = message.sequence;
        if message.is_delete() {
            if let Some((key, _)) = self.map.remove_entry(&message.key) {
                self.emit(Event::Deleted { key, sequence });
            }
        } else {
            let key = message.key.clone();
            let entry = Entry::from_message(message);
            let event = updated(&key, &entry);
            self.map.insert(key, entry);
            self.emit(event);
        }
    }

    /// Asks the current server for a snapshot, giving it `server_ttl` to answer.
    fn request_snapshot(&mut self, now: Instant) {
        self.expiry = now + self.config.server_ttl;
        self.attempt.requested_at = Some(now);
        self.send_snapshot_request(now);
    }

    /// Sends an ICANHAZ? to the current server; a repeat keeps the deadline and the
    /// request time of the first (its reply may still be the one that comes).
    fn send_snapshot_request(&mut self, now: Instant) {
        let server = self.current;
        let fresh_connection = !self.attempt.asked && self.book(server).asked;
        self.attempt.asked = true;
        let book = self.book(server);
        if fresh_connection {
            // Nothing sent on the old connection can come back on the new one.
            book.outstanding = 0;
            book.written_off = 0;
            book.reply_cut = false;
        }
        book.asked = true;
        if book.outstanding >= MAX_OUTSTANDING_REQUESTS {
            // A passive server drops requests without a reply; waiting for those would
            // keep the client from ever making it take over. The reply rules of the
            // module docs stay safe if a written-off reply turns up after all.
            book.outstanding -= 1;
            book.written_off = book.written_off.saturating_add(1);
            self.stats.requests_written_off += 1;
        }
        let book = self.book(server);
        book.outstanding += 1;
        self.stats.snapshot_requests += 1;
        self.state = State::Syncing;
        self.attempt.incoming.clear();
        self.attempt.reply_started = false;
        self.attempt.last_request_at = Some(now);
        self.attempt.ask_again = false;
        self.outputs.push_back(Output::SendSnapshotRequest {
            server,
            frames: SnapshotRequest::new(self.config.subtree.clone()).encode(),
            fresh_connection,
        });
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.config.limits.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.len(),
                max: self.config.limits.max_key_len,
            });
        }
        if key == crate::kvmsg::HUGZ || key == crate::kvmsg::KTHXBAI {
            return Err(Error::ReservedKey);
        }
        Ok(())
    }

    /// A random (version 4) uuid from the injected RNG.
    fn new_uuid(&mut self) -> Uuid {
        let mut bits = u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64());
        // Version 4, variant RFC 4122, like the references' uuid libraries.
        bits = bits & !(0xf_u128 << 76) | (0x4_u128 << 76);
        bits = bits & !(0x3_u128 << 62) | (0x2_u128 << 62);
        Uuid::from_bytes(bits.to_be_bytes())
    }

    fn send_update(&mut self, message: KvMsg, uuid: Uuid) -> Uuid {
        self.outputs.push_back(Output::Publish {
            frames: message.encode(),
        });
        let echoable = message.key.starts_with(&self.config.subtree);
        self.remember_in_flight(uuid, echoable);
        if echoable && self.config.apply_own_updates {
            self.store(message);
        }
        uuid
    }

    fn remember_in_flight(&mut self, uuid: Uuid, echoable: bool) {
        while self.in_flight.len() >= self.config.max_in_flight {
            let Some((_, oldest)) = self.in_flight_by_age.pop_first() else {
                break;
            };
            if let Some(update) = self.in_flight.remove(&oldest) {
                if let Some(deadline) = update.echo_deadline {
                    self.echo_deadlines.remove(&(deadline, update.issued));
                }
                if update.watched {
                    self.emit(Event::Lost {
                        uuid: oldest,
                        reason: LostReason::Evicted,
                    });
                }
            }
        }
        self.issued += 1;
        self.in_flight_by_age.insert(self.issued, uuid);
        // Only a provisional entry can leave the map wrong when its echo never comes.
        let provisional = echoable && self.config.apply_own_updates;
        let echo_deadline = provisional.then(|| self.clock + self.config.echo_timeout);
        if let Some(deadline) = echo_deadline {
            self.echo_deadlines.insert((deadline, self.issued), uuid);
        }
        self.in_flight.insert(
            uuid,
            InFlight {
                issued: self.issued,
                echo_deadline,
                echoable,
                watched: false,
            },
        );
    }

    fn forget_in_flight(&mut self, uuid: Uuid) -> Option<InFlight> {
        let update = self.in_flight.remove(&uuid)?;
        self.in_flight_by_age.remove(&update.issued);
        if let Some(deadline) = update.echo_deadline {
            self.echo_deadlines.remove(&(deadline, update.issued));
        }
        Some(update)
    }

    /// The current server published (or stored) the update `uuid` at `sequence`.
    fn note_published(&mut self, uuid: Option<Uuid>, sequence: i64) {
        let Some(uuid) = uuid else { return };
        if let Some(update) = self.forget_in_flight(uuid) {
            if update.watched {
                self.emit(Event::Committed { uuid, sequence });
            }
        }
    }

    fn drop_message(&mut self, server: ServerIndex, channel: Channel, reason: DropReason) {
        *self.stats.dropped.entry(reason.as_str()).or_default() += 1;
        if !reason.is_routine() {
            self.emit(Event::Dropped {
                server,
                channel,
                reason,
            });
        }
    }

    fn emit(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }
}

/// True when a KTHXBAI's body fits the client's subtree: it names it (RFC 12, the Python
/// server) or is empty (the zguide C server never fills it in). A reply naming another
/// subtree answers someone else's request and is not used.
fn names_subtree(kthxbai_body: &[u8], subtree: &[u8]) -> bool {
    kthxbai_body.is_empty() || kthxbai_body == subtree
}

fn updated(key: &[u8], entry: &Entry) -> Event {
    Event::Updated {
        key: key.to_vec(),
        value: entry.value.clone(),
        sequence: entry.sequence,
    }
}

#[cfg(test)]
mod tests;
