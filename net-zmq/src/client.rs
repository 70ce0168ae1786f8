//! The clonekv client library: a replica of one subtree of the servers' map, kept up to
//! date in a background thread, with reads, writes, commit confirmation and a stream of
//! change events.
//!
//! # Model
//!
//! [`Client::builder`] lists the servers (the primary and the backup), the subtree to
//! follow and the timing; [`ClientBuilder::connect`] creates the sockets and starts an
//! agent thread that runs the core's clone agent ([`clonekv_core::client::Client`]) in
//! its own mio loop. The agent takes a snapshot from the first server that answers,
//! follows its updates, and fails over to the next server when the current one goes
//! silent. The [`Client`] handle talks to the agent over a channel and wakes it with a
//! [`mio::Waker`]:
//!
//! - reads ([`Client::get`], [`Client::dump`], [`Client::status`]) are a request and a
//!   reply, answered from the agent's map between two inputs, so a read always sees
//!   every earlier write of the same handle and never a half-applied snapshot;
//! - writes ([`Client::set`], [`Client::delete`]) are published to every server and
//!   applied to the local map at once; [`Client::set_confirmed`] and
//!   [`Client::delete_confirmed`] also wait until the current server publishes the
//!   update (its echo), which is the commit;
//! - [`Client::subscribe`] returns an [`Events`] receiver of every change to the map.
//!
//! Sockets, per server *i*: a DEALER to its snapshot port P and a SUB to its publisher
//! P+1 (subscribed to the subtree first, then `HUGZ`, PROTOCOL.md §4); plus one PUB
//! connected to every server's collector P+2.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use clonekv_zmq::client::{Client, Event};
//!
//! # fn main() -> Result<(), clonekv_zmq::client::ClientError> {
//! let client = Client::builder()
//!     .server("tcp://localhost:5556") // primary: P; P+1 and P+2 follow
//!     .server("tcp://localhost:5566") // backup
//!     .subtree("/weather/")
//!     .connect()?;
//! client.wait_synced(Duration::from_secs(10))?;
//!
//! let events = client.subscribe();
//! client.set("/weather/london", "rain", None)?;
//! let sequence = client.set_confirmed(
//!     "/weather/paris",
//!     "sun",
//!     Some(Duration::from_secs(60)), // expires in a minute
//!     Duration::from_secs(5),        // wait this long for the commit
//! )?;
//! println!("committed at {sequence}");
//! assert_eq!(client.get("/weather/london")?.as_deref(), Some(&b"rain"[..]));
//!
//! while let Ok(event) = events.recv_timeout(Duration::from_millis(100)) {
//!     if let Event::Updated { key, value, .. } = event {
//!         println!("{} = {}", String::from_utf8_lossy(&key), String::from_utf8_lossy(&value));
//!     }
//! }
//! client.shutdown()
//! # }
//! ```
//!
//! `examples/weather.rs` is the same as a runnable program.
//!
//! # Discovery
//!
//! With no server given, [`ClientBuilder::discover`] finds the cluster's primary and
//! backup by their UDP beacons ([`crate::discovery`]) and follows them when they move or
//! restart; servers given with [`ClientBuilder::server`] win:
//!
//! ```no_run
//! use clonekv_zmq::client::Client;
//! use clonekv_zmq::discovery::DiscoveryOptions;
//!
//! # fn main() -> Result<(), clonekv_zmq::client::ClientError> {
//! let client = Client::builder()
//!     .discover(DiscoveryOptions::new("clonekv")) // the cluster's name
//!     .connect()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Security
//!
//! Without keys every connection is plain ZMTP, readable and forgeable on the network.
//! Servers started with CURVE keys admit only clients whose public key they list; such a
//! client gives its own pair and the servers' public keys (docs/SECURITY.md):
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use clonekv_zmq::client::Client;
//! use clonekv_zmq::curve::{KeyPair, PublicKey};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder()
//!     .server_with_key("tcp://kv1:5556", PublicKey::from_key_or_file("primary.pub")?)
//!     .server_with_key("tcp://kv2:5566", PublicKey::from_key_or_file("backup.pub")?)
//!     .curve_key_pair(KeyPair::read(Path::new("app.key"))?)
//!     .connect()?;
//! // A server that refuses our key is named in the error (ClientError::Handshake).
//! client.wait_synced(Duration::from_secs(10))?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Bound;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use clonekv_core::beacon::{Kind, CLIENT_SLOTS};
use clonekv_core::client::{
    self as core_client, Channel, Client as CoreClient, LostReason, Output, ServerIndex, State,
};
use clonekv_core::kvmsg::{BstarState, Limits, Uuid};
use mio::{Events as MioEvents, Poll, Token, Waker};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

pub use clonekv_core::client::Entry;

use crate::clock::Clock;
use crate::curve::{self, KeyPair, PublicKey};
use crate::discovery::{
    Discovery, DiscoveryError, DiscoveryOptions, FoundServer, CLIENT_ANNOUNCEMENT,
};
use crate::log::{send_or_log, RateLimiter};
use crate::socket::{largest_legal_frame, HandshakeFailure, ReconnectMonitor, ZmqSocket};
use crate::watch::{Change, History, Resume};

/// The servers a client uses when none are given: the reference primary and backup on
/// this host.
pub const DEFAULT_SERVERS: [&str; 2] = ["tcp://localhost:5556", "tcp://localhost:5566"];

/// The three endpoints of one server, as a client connects to them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    /// The snapshot ROUTER (P): the client's DEALER connects here.
    pub snapshot: String,
    /// The update PUB (P+1): the client's SUB connects here.
    pub publisher: String,
    /// The collector SUB (P+2): the client's PUB connects here.
    pub collector: String,
}

impl ServerAddress {
    /// The address of a server from its base endpoint `tcp://HOST:P` (or `HOST:P`):
    /// snapshots at P, updates at P+1, the collector at P+2.
    pub fn from_base(endpoint: &str) -> Result<ServerAddress, ClientError> {
        let invalid = |reason: &'static str| ClientError::Endpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        let rest =
            match endpoint.split_once("://") {
                Some(("tcp", rest)) => rest,
                Some(_) => return Err(invalid(
                    "only tcp:// endpoints have a base port; give the three endpoints explicitly",
                )),
                None => endpoint,
            };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected HOST:PORT, for example tcp://localhost:5556"))?;
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("the port is not a number from 1 to 65533"))?;
        if port == 0 || port > u16::MAX - 2 {
            return Err(invalid(
                "the port must leave room for P+1 and P+2 (1 to 65533)",
            ));
        }
        let at = |port: u16| format!("tcp://{host}:{port}");
        Ok(ServerAddress {
            snapshot: at(port),
            publisher: at(port + 1),
            collector: at(port + 2),
        })
    }
}

impl ServerAddress {
    /// A slot whose server discovery has not found yet.
    pub fn undiscovered() -> ServerAddress {
        ServerAddress {
            snapshot: String::new(),
            publisher: String::new(),
            collector: String::new(),
        }
    }

    /// False for a slot discovery has not filled yet.
    pub fn is_known(&self) -> bool {
        !self.snapshot.is_empty()
    }
}

impl FromStr for ServerAddress {
    type Err = ClientError;
    fn from_str(endpoint: &str) -> Result<Self, Self::Err> {
        ServerAddress::from_base(endpoint)
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.snapshot)
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The builder's settings are unusable.
    #[error("invalid client configuration: {0}")]
    Config(core_client::Error),
    /// Discovery was asked for and cannot start.
    #[error("{0}")]
    Discovery(DiscoveryError),
    /// A server endpoint does not parse.
    #[error("invalid server endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// libzmq refused to create, configure or connect a socket.
    #[error("cannot set up the {socket} socket ({endpoint}): {error}")]
    Socket {
        /// Which socket.
        socket: &'static str,
        /// The endpoint involved, if any.
        endpoint: String,
        /// libzmq's reason.
        error: zmq::Error,
    },
    /// The event loop or the agent thread could not be set up.
    #[error("cannot start the client: {0}")]
    Io(#[from] io::Error),
    /// The operating system gave no randomness for the update ids.
    #[error("cannot seed the update id generator from the OS: {0}")]
    Randomness(String),
    /// The update was refused before sending (empty key, value too large, ...).
    #[error("update refused: {0}")]
    Rejected(core_client::Error),
    /// No server completed a snapshot in time.
    #[error("no server answered within {}", crate::duration::HumanDuration(*.waited))]
    NotSynced {
        /// How long the call waited.
        waited: Duration,
    },
    /// The update's echo did not arrive in time. It may still be committed.
    #[error("the update was not confirmed within {}", crate::duration::HumanDuration(*.waited))]
    CommitTimeout {
        /// How long the call waited.
        waited: Duration,
    },
    /// The update's echo can no longer arrive; it may or may not have been applied.
    #[error("the update could not be confirmed: {}", describe_lost(*.0))]
    Lost(LostReason),
    /// The client's agent thread has stopped (after [`Client::shutdown`] or a fatal
    /// socket error, which it logged).
    #[error("the client has stopped")]
    Stopped,
    /// The CURVE settings are incomplete or unusable.
    #[error("CURVE: {0}")]
    Curve(String),
    /// No server completed a snapshot in time, and one refused the security handshake:
    /// the likely reason.
    #[error("{}", describe_handshake(endpoint, failure, *with_curve))]
    Handshake {
        /// The server's snapshot endpoint.
        endpoint: String,
        /// What libzmq reported.
        failure: HandshakeFailure,
        /// This client has CURVE keys.
        with_curve: bool,
    },
}

fn describe_handshake(endpoint: &str, failure: &HandshakeFailure, with_curve: bool) -> String {
    match failure {
        // A CURVE server closes a plain connection at once; libzmq gives no detail.
        _ if !with_curve => format!(
            "{endpoint} refused our plain connection during the handshake ({failure}): the \
             server probably requires CURVE; give --curve-secret-key and --server-public-key"
        ),
        HandshakeFailure::Refused { status } => format!(
            "server refused our CURVE key (not admitted): {endpoint} answered ZAP status \
             {status}; its operator must add this client's public key to its --curve-clients"
        ),
        HandshakeFailure::MechanismMismatch => format!(
            "{endpoint}: the server and this client disagree on security: one uses CURVE \
             keys and the other does not (see --server-public-key and --curve-secret-key)"
        ),
        other => format!(
            "{endpoint}: the CURVE handshake failed: {other} (is --server-public-key that \
             server's public key?)"
        ),
    }
}

fn describe_lost(reason: LostReason) -> &'static str {
    match reason {
        LostReason::OutsideSubtree => {
            "its key is outside the client's subtree, so its echo never reaches this client"
        }
        LostReason::ServerChanged => {
            "the client failed over to another server before the echo arrived (read the key to see whether it survived)"
        }
        LostReason::Evicted => "too many updates were awaiting their echo",
        LostReason::NotPublished => {
            "the server did not publish it in time: it refused it (its map is full, see --max-keys and --max-bytes in its log) or the update was lost on the way"
        }
    }
}

/// How long `entry` has left before its server deletes it; `None` if it never expires.
/// An entry from an update carries the ttl it was sent with (counted from when it was
/// received); one from a snapshot carries its expiry time.
pub fn remaining_ttl(entry: &Entry) -> Option<Duration> {
    use clonekv_core::kvmsg::{KvMsg, Ttl};
    use std::time::{SystemTime, UNIX_EPOCH};
    let message = KvMsg {
        properties: entry.properties.clone(),
        ..KvMsg::default()
    };
    match message.peer_ttl().ok().flatten()? {
        Ttl::Relative(ttl) => Some(ttl),
        Ttl::ExpiresAt(at) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                });
            Some(Duration::from_millis(at.0.saturating_sub(now)))
        }
    }
}

/// A change to the client's map, or to its connection, as seen by [`Client::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `key` now has `value`, written by the server at `sequence` (0: this client's own
    /// update, not yet confirmed).
    Updated {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Vec<u8>,
        /// The sequence of the entry.
        sequence: i64,
    },
    /// `key` is gone (deleted, expired, or absent from a newer snapshot).
    Deleted {
        /// The key.
        key: Vec<u8>,
        /// The sequence of the deletion (0 for a local delete).
        sequence: i64,
    },
    /// A snapshot from `server` replaced the map. It comes before the
    /// [`Event::Updated`] and [`Event::Deleted`] events of the differences the snapshot
    /// made (those carry sequences at or below its own), so a subscriber that reads the
    /// map on `Synced` can skip them.
    Synced {
        /// Index of the server in the builder's list.
        server: usize,
        /// The snapshot's sequence.
        sequence: i64,
        /// Keys in the map.
        keys: usize,
    },
    /// The current server went silent; the client moved to the next one.
    ServerChanged {
        /// The server given up on.
        from: usize,
        /// The new current server.
        to: usize,
    },
    /// The receiver fell behind and `missed` events were dropped before this one; read
    /// the map ([`Client::dump`]) to catch up.
    Lagged {
        /// Events dropped.
        missed: u64,
    },
}

/// What the client knows about its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The agent's state with its current server.
    pub state: State,
    /// Index of the current server in the builder's list.
    pub server: usize,
    /// The current server's snapshot endpoint.
    pub endpoint: String,
    /// Sequence of the last snapshot or update applied.
    pub sequence: i64,
    /// Keys in the local map.
    pub keys: usize,
    /// Time since the current server's publisher last delivered anything (a heartbeat
    /// or an update): the heartbeat age. `None` if nothing has arrived yet.
    pub last_heard: Option<Duration>,
    /// Every server of the list, in order.
    pub servers: Vec<ServerStatus>,
    /// With discovery: the servers of the cluster heard now, primary first (a server
    /// not heard within the silence timeout is not listed). Empty without discovery.
    pub discovered: Vec<FoundServer>,
}

/// What the client knows of one server of its list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerStatus {
    /// Its snapshot endpoint.
    pub endpoint: String,
    /// The client follows it.
    pub current: bool,
    /// The connection to its publisher is up.
    pub connected: bool,
    /// That connection has been up at least once.
    pub ever_connected: bool,
    /// Connection attempts that failed since the last one that succeeded (refused,
    /// unreachable).
    pub connects_failed: u64,
    /// The Binary Star state its latest heartbeat announced (`None`: not heard yet, or a
    /// server that does not say, such as the zguide's).
    pub announced: Option<BstarState>,
    /// Sequence of its latest message (heartbeat or update), if heard since the
    /// connection was made.
    pub sequence: Option<i64>,
    /// Keys in its map, as its latest heartbeat said (`None`: not said).
    pub keys: Option<u64>,
    /// Time since its publisher last delivered anything.
    pub last_heard: Option<Duration>,
    /// The last security handshake with it failed, and none succeeded since: why.
    pub handshake_failure: Option<HandshakeFailure>,
}

impl Status {
    /// True once a snapshot was applied and updates are being followed.
    pub fn is_synced(&self) -> bool {
        self.state == State::Active
    }
}

/// A stream of [`Event`]s from [`Client::subscribe`]. Iterating blocks for the next
/// event and ends when the client stops.
#[derive(Debug)]
pub struct Events {
    receiver: Receiver<Event>,
}

impl Events {
    /// The next event, waiting at most `timeout`. `Err` on timeout or when the client
    /// has stopped.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        self.receiver.recv_timeout(timeout)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.receiver.try_recv().ok()
    }
}

impl Iterator for Events {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.receiver.recv().ok()
    }
}

/// How a [`Watch`] starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchStart {
    /// Right after the change `after`: the changes that follow are every change since.
    Resumed {
        /// The sequence the caller gave.
        after: i64,
    },
    /// With the keys under the prefix as they are at `sequence`; the changes that follow
    /// are those after it.
    Snapshot {
        /// The id of the latest change the snapshot includes.
        sequence: i64,
        /// The entries under the prefix, in key order.
        entries: Vec<(Vec<u8>, Entry)>,
        /// Why the watch did not resume.
        reason: SnapshotReason,
    },
}

/// Why a [`Watch`] starts with a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// No sequence was given.
    New,
    /// The history no longer holds every change after the sequence given.
    Gone,
    /// The sequence given is above the latest change this client has: it is behind
    /// (asking again a little later may resume), or the sequence is another history's.
    Ahead,
}

/// Why a [`Watch`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The watcher left more changes unread than its capacity.
    TooSlow,
    /// The client stopped.
    Stopped,
}

/// The committed changes under a prefix, from [`Client::watch`]: first
/// [`Watch::start`], then each change with its id (its sequence; see
/// [`crate::watch`] for the one exception).
#[derive(Debug)]
pub struct Watch {
    /// How the watch starts.
    pub start: WatchStart,
    changes: tokio::sync::mpsc::Receiver<(i64, Arc<Change>)>,
    too_slow: Arc<AtomicBool>,
}

impl Watch {
    /// The next change and its id, waiting for it; `Err` once the watch has ended.
    pub async fn next(&mut self) -> Result<(i64, Arc<Change>), WatchEnd> {
        match self.changes.recv().await {
            Some(item) => Ok(item),
            None => Err(self.end()),
        }
    }

    /// Like [`Watch::next`], for a thread outside an async runtime.
    pub fn blocking_next(&mut self) -> Result<(i64, Arc<Change>), WatchEnd> {
        match self.changes.blocking_recv() {
            Some(item) => Ok(item),
            None => Err(self.end()),
        }
    }

    /// True once the watch was cut off for falling behind (its queued changes may
    /// still be read).
    pub fn is_too_slow(&self) -> bool {
        self.too_slow.load(Ordering::SeqCst)
    }

    fn end(&self) -> WatchEnd {
        if self.too_slow.load(Ordering::SeqCst) {
            WatchEnd::TooSlow
        } else {
            WatchEnd::Stopped
        }
    }
}

struct Watcher {
    prefix: Vec<u8>,
    sender: tokio::sync::mpsc::Sender<(i64, Arc<Change>)>,
    too_slow: Arc<AtomicBool>,
}

impl Watcher {
    /// Sends `change` if it is under the prefix; false once the watch has ended (its
    /// receiver is gone, or it fell behind and is cut off).
    fn deliver(&self, id: i64, change: &Arc<Change>) -> bool {
        if !change.key.starts_with(&self.prefix) {
            return !self.sender.is_closed();
        }
        match self.sender.try_send((id, Arc::clone(change))) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                self.too_slow.store(true, Ordering::SeqCst);
                false
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Settings for a [`Client`]; see [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    servers: Vec<(ServerSpec, Option<PublicKey>)>,
    discovery: Option<DiscoveryOptions>,
    discovered: Vec<FoundServer>,
    /// This client's CURVE key pair; `None` for plain ZMTP.
    key_pair: Option<KeyPair>,
    /// The public key of every server added without its own (and of discovered ones).
    server_public_key: Option<PublicKey>,
    /// With discovery: the public key of the server of each kind, when they differ.
    kind_keys: BTreeMap<Kind, PublicKey>,
    config: core_client::Config,
    event_capacity: usize,
    history_len: usize,
    history_bytes: usize,
    hwm: i32,
    linger: Duration,
}

#[derive(Clone, Debug)]
enum ServerSpec {
    Base(String),
    Explicit(ServerAddress),
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            servers: Vec::new(),
            discovery: None,
            discovered: Vec::new(),
            key_pair: None,
            server_public_key: None,
            kind_keys: BTreeMap::new(),
            config: core_client::Config::default(),
            event_capacity: 65_536,
            history_len: 0,
            history_bytes: 0,
            hwm: crate::server::DEFAULT_HWM,
            linger: Duration::from_secs(1),
        }
    }
}

impl ClientBuilder {
    /// Adds a server by its base endpoint `tcp://HOST:P` (P+1 and P+2 follow). Servers
    /// are tried in the order given. With none, [`DEFAULT_SERVERS`] are used.
    pub fn server(mut self, endpoint: impl Into<String>) -> Self {
        self.servers.push((ServerSpec::Base(endpoint.into()), None));
        self
    }

    /// Adds a server by its three endpoints.
    pub fn server_address(mut self, address: ServerAddress) -> Self {
        self.servers.push((ServerSpec::Explicit(address), None));
        self
    }

    /// Adds a server by its three endpoints, with its CURVE public key.
    pub fn server_address_with_key(mut self, address: ServerAddress, key: PublicKey) -> Self {
        self.servers
            .push((ServerSpec::Explicit(address), Some(key)));
        self
    }

    /// Adds a server by its base endpoint, with its own CURVE public key (for a pair
    /// whose servers have different keys).
    pub fn server_with_key(mut self, endpoint: impl Into<String>, key: PublicKey) -> Self {
        self.servers
            .push((ServerSpec::Base(endpoint.into()), Some(key)));
        self
    }

    /// This client's CURVE key pair: every connection then uses CURVE, and a server
    /// admits it only if its public key is in the server's `--curve-clients`. Needs the
    /// servers' public keys ([`ClientBuilder::server_public_key`]). Without it the
    /// client speaks plain ZMTP, as the zguide programs do (docs/SECURITY.md).
    pub fn curve_key_pair(mut self, pair: KeyPair) -> Self {
        self.key_pair = Some(pair);
        self
    }

    /// The CURVE public key of every server added without one of its own: the client
    /// talks only to a server that proves it holds the secret key.
    pub fn server_public_key(mut self, key: PublicKey) -> Self {
        self.server_public_key = Some(key);
        self
    }

    /// With [`ClientBuilder::discover`]: the CURVE public key of the cluster's server of
    /// `kind` (primary or backup), for a pair whose servers have keys of their own.
    pub fn discovered_server_key(mut self, kind: Kind, key: PublicKey) -> Self {
        self.kind_keys.insert(kind, key);
        self
    }

    /// Finds the cluster's servers by their UDP beacons ([`crate::discovery`]) instead of
    /// a list, and follows them when they move or restart. Servers given with
    /// [`ClientBuilder::server`] win: with any, discovery is not used.
    pub fn discover(mut self, options: DiscoveryOptions) -> Self {
        self.discovery = Some(options);
        self
    }

    /// With [`ClientBuilder::discover`]: servers already heard (say by
    /// [`Discovery::listen_for_servers`]), connected at once rather than at their next
    /// beacon.
    pub fn discovered(mut self, servers: Vec<FoundServer>) -> Self {
        self.discovered = servers;
        self
    }

    /// Follows only keys starting with `subtree` (default: every key).
    pub fn subtree(mut self, subtree: impl Into<Vec<u8>>) -> Self {
        self.config.subtree = subtree.into();
        self
    }

    /// Silence from the current server after which the client moves to the next one
    /// (default 5 s).
    pub fn server_ttl(mut self, server_ttl: Duration) -> Self {
        self.config.server_ttl = server_ttl;
        self
    }

    /// Size limits for keys, values and properties (default: PROTOCOL.md §2).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Updates buffered while a snapshot arrives (default 100 000).
    pub fn max_buffered_updates(mut self, max: usize) -> Self {
        self.config.max_buffered_updates = max;
        self
    }

    /// How long an own update may go without its echo before the client counts it as
    /// not published (a watched one fails with [`LostReason::NotPublished`]: the server
    /// refused it, its map being full, or it was lost) and re-syncs (default 5 s).
    pub fn echo_timeout(mut self, echo_timeout: Duration) -> Self {
        self.config.echo_timeout = echo_timeout;
        self
    }

    /// Own updates remembered while their echo is awaited (default 10 000).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.config.max_in_flight = max;
        self
    }

    /// Events queued per [`Events`] receiver before the oldest unread are dropped and
    /// reported as [`Event::Lagged`] (default 65 536).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Applies the client's own updates to the local map at once, before their commit
    /// (default true, §8). With false, the map and every event change only with what
    /// the server publishes, at its sequence: what [`Client::watch`] users need to see
    /// committed changes only.
    pub fn apply_own_updates(mut self, apply: bool) -> Self {
        self.config.apply_own_updates = apply;
        self
    }

    /// Keeps the latest `changes` committed changes (at most `bytes` of keys and
    /// values) so that a [`Client::watch`] can resume after a sequence it saw (default:
    /// none kept, so a watch always starts with a snapshot).
    pub fn history(mut self, changes: usize, bytes: usize) -> Self {
        self.history_len = changes;
        self.history_bytes = bytes;
        self
    }

    /// High-water mark of the update sockets: messages queued before libzmq drops
    /// (default 100 000).
    pub fn hwm(mut self, hwm: i32) -> Self {
        self.hwm = hwm.max(0);
        self
    }

    /// How long [`Client::shutdown`] waits for updates still queued to go out
    /// (default 1 s).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Creates the sockets, connects to every server and starts the agent thread.
    /// Returns at once: the servers need not be up (see [`Client::wait_synced`]).
    pub fn connect(self) -> Result<Client, ClientError> {
        let clock = Clock::new();
        let discovery = match (&self.discovery, self.servers.is_empty()) {
            (Some(options), true) => Some(
                Discovery::open(clock, options.clone(), CLIENT_ANNOUNCEMENT)
                    .map_err(ClientError::Discovery)?,
            ),
            _ => None,
        };
        let servers = if discovery.is_some() {
            // One slot per server kind, primary first; a slot not heard yet is filled
            // when its server's beacon arrives.
            CLIENT_SLOTS
                .iter()
                .map(
                    |kind| match self.discovered.iter().find(|server| server.kind == *kind) {
                        Some(server) => ServerAddress::from_base(&server.base_endpoint()),
                        None => Ok(ServerAddress::undiscovered()),
                    },
                )
                .zip(CLIENT_SLOTS)
                .map(|(address, kind)| {
                    address.map(|address| {
                        (
                            ServerSpec::Explicit(address),
                            self.kind_keys.get(&kind).copied(),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if self.servers.is_empty() {
            DEFAULT_SERVERS
                .iter()
                .map(|endpoint| (ServerSpec::Base(endpoint.to_string()), None))
                .collect()
        } else {
            self.servers
        };
        let mut addresses = Vec::with_capacity(servers.len());
        let mut server_keys = Vec::with_capacity(servers.len());
        for (spec, key) in servers {
            addresses.push(match spec {
                ServerSpec::Base(endpoint) => ServerAddress::from_base(&endpoint)?,
                ServerSpec::Explicit(address) => address,
            });
            server_keys.push(key.or(self.server_public_key));
        }
        let curve_keys = curve_keys(self.key_pair.as_ref(), &addresses, &server_keys)?;
        let with_curve = curve_keys.is_some();
        let mut config = self.config;
        let subtree = config.subtree.clone();
        config.servers = addresses.len();
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|error| ClientError::Randomness(error.to_string()))?;
        let mut core = CoreClient::new(config, ChaCha8Rng::from_seed(seed), clock.now())
            .map_err(ClientError::Config)?;

        let context = zmq::Context::new();
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut links = Vec::with_capacity(addresses.len());
        for (index, address) in addresses.iter().enumerate() {
            let curve_client = |socket: &ZmqSocket, endpoint: &str| match &curve_keys {
                Some((own, keys)) => configure(socket, endpoint, |inner| match keys.get(index) {
                    Some(server) => curve::make_client(inner, own, server),
                    None => Err(zmq::Error::EINVAL),
                }),
                None => Ok(()),
            };
            let largest = largest_legal_frame(&core.config().limits);
            let (snapshot, snapshot_monitor) =
                open_snapshot_socket(&context, address, curve_keys.as_ref(), index, largest)?;
            let subscriber = new_socket(&context, zmq::SUB, "subscriber", &address.publisher)?;
            curve_client(&subscriber, &address.publisher)?;
            let subtree = core.subtree().to_vec();
            configure(&subscriber, &address.publisher, |socket| {
                socket.set_rcvhwm(self.hwm)?;
                socket.set_maxmsgsize(largest)?;
                // The subtree first, then HUGZ: once a HUGZ arrives, the subtree
                // subscription is known to be in effect too (PROTOCOL.md §4).
                socket.set_subscribe(&subtree)?;
                socket.set_subscribe(clonekv_core::kvmsg::HUGZ)
            })?;
            // What was published while the SUB's connection was down is lost to it.
            let monitor = ReconnectMonitor::new(&context, &subscriber).map_err(|error| {
                ClientError::Socket {
                    socket: "subscriber monitor",
                    endpoint: address.publisher.clone(),
                    error,
                }
            })?;
            if address.is_known() {
                connect(&subscriber, &address.publisher)?;
            } else {
                // Nothing to wait for there until discovery finds it.
                core.handle_server_disconnected(clock.now(), ServerIndex(index));
            }
            snapshot.register(poll.registry(), snapshot_token(index))?;
            subscriber.register(poll.registry(), subscriber_token(index))?;
            monitor.register(poll.registry(), monitor_token(index))?;
            snapshot_monitor.register(poll.registry(), snapshot_monitor_token(index))?;
            links.push(ServerLink {
                snapshot,
                subscriber,
                monitor,
                snapshot_monitor,
                last_heard: None,
                connected: false,
                ever_connected: false,
                connects_failed: 0,
                handshake_failure: None,
            });
        }
        let publisher = new_socket(&context, zmq::PUB, "publisher", "")?;
        let linger = i32::try_from(self.linger.as_millis()).unwrap_or(i32::MAX);
        configure(&publisher, "", |socket| {
            socket.set_sndhwm(self.hwm)?;
            // Updates still queued at shutdown get this long to go out.
            socket.set_linger(linger)
        })?;
        for (index, address) in addresses.iter().enumerate() {
            if !address.is_known() {
                continue;
            }
            // Options are taken at each connect: each collector gets its server's key.
            if let Some((own, keys)) = &curve_keys {
                configure(&publisher, &address.collector, |inner| {
                    match keys.get(index) {
                        Some(server) => curve::make_client(inner, own, server),
                        None => Err(zmq::Error::EINVAL),
                    }
                })?;
            }
            connect(&publisher, &address.collector)?;
        }
        let mut discovery = discovery;
        if let Some(discovery) = discovery.as_mut() {
            discovery.register(poll.registry(), DISCOVERY)?;
        }

        let (commands, inbox) = mpsc::channel();
        let agent = Agent {
            clock,
            core,
            poll,
            inbox,
            links,
            publisher,
            addresses: addresses.clone(),
            subscribers: Vec::new(),
            watchers: Vec::new(),
            history: History::new(self.history_len, self.history_bytes),
            synced_once: false,
            unrecorded: Vec::new(),
            commit_waiters: BTreeMap::new(),
            sync_waiters: Vec::new(),
            limiter: RateLimiter::new(Duration::from_secs(10)),
            stopping: false,
            discovery,
            discovery_readable: true,
            curve_keys,
            context,
        };
        let thread = std::thread::Builder::new()
            .name("clonekv-client".to_string())
            .spawn(move || agent.run())?;
        Ok(Client {
            commands,
            waker,
            thread: Some(thread),
            addresses,
            event_capacity: self.event_capacity,
            with_curve,
            subtree,
        })
    }
}

/// A handle on a running client. Cheap calls; dropping it stops the agent (as
/// [`Client::shutdown`] does).
#[derive(Debug)]
pub struct Client {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    addresses: Vec<ServerAddress>,
    event_capacity: usize,
    /// The connections use CURVE.
    with_curve: bool,
    subtree: Vec<u8>,
}

/// The entries under a prefix and the sequence of the map they were read from.
pub type SequencedDump = (i64, Vec<(Vec<u8>, Entry)>);

/// The commit of an update: its sequence, or why it cannot be confirmed.
type CommitOutcome = Result<i64, LostReason>;

enum Command {
    Get {
        key: Vec<u8>,
        reply: Reply<Option<Entry>>,
    },
    Dump {
        prefix: Vec<u8>,
        reply: Sender<SequencedDump>,
    },
    Update {
        key: Vec<u8>,
        /// `Some((value, ttl))` to set, `None` to delete.
        value: Option<(Vec<u8>, Option<Duration>)>,
        confirm: Option<Reply<CommitOutcome>>,
        reply: Reply<Result<Uuid, core_client::Error>>,
    },
    Subscribe {
        events: SyncSender<Event>,
    },
    Range {
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
        reply: Sender<Vec<(Vec<u8>, Entry)>>,
    },
    Watch {
        prefix: Vec<u8>,
        after: Option<i64>,
        capacity: usize,
        reply: Sender<Watch>,
    },
    Status {
        reply: Reply<Status>,
    },
    WhenSynced {
        reply: Sender<Status>,
    },
    Stop,
}

/// Where the agent sends an answer: to a thread that blocks on it, or to an async task.
enum Reply<T> {
    Blocking(Sender<T>),
    Async(tokio::sync::oneshot::Sender<T>),
}

impl<T> Reply<T> {
    /// Sends the answer; a caller that has gone (timed out, dropped) is no error.
    fn send(self, value: T) {
        match self {
            Reply::Blocking(sender) => {
                let _ = sender.send(value);
            }
            Reply::Async(sender) => {
                let _ = sender.send(value);
            }
        }
    }
}

impl Client {
    /// A builder with the defaults: [`DEFAULT_SERVERS`], the whole map, server ttl 5 s.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The servers, in the order they are tried, as they were when the client started.
    /// With discovery these are the primary's and the backup's slots, and a slot not yet
    /// filled then is [`ServerAddress::undiscovered`]; [`Client::status`] has each
    /// server's endpoint now.
    pub fn servers(&self) -> &[ServerAddress] {
        &self.addresses
    }

    /// Waits until a snapshot has been applied (the client follows a server), at most
    /// `timeout`.
    /// A server that refused the security handshake is named in the error
    /// ([`ClientError::Handshake`]) instead of [`ClientError::NotSynced`].
    pub fn wait_synced(&self, timeout: Duration) -> Result<Status, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::WhenSynced { reply })?;
        match answer.recv_timeout(timeout) {
            Ok(status) => Ok(status),
            Err(RecvTimeoutError::Timeout) => Err(self
                .handshake_error()
                .unwrap_or(ClientError::NotSynced { waited: timeout })),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Stopped),
        }
    }

    /// The first server whose last security handshake failed, as an error.
    pub fn handshake_error(&self) -> Option<ClientError> {
        let status = self.status().ok()?;
        status.servers.into_iter().find_map(|server| {
            server
                .handshake_failure
                .map(|failure| ClientError::Handshake {
                    endpoint: server.endpoint,
                    failure,
                    with_curve: self.with_curve,
                })
        })
    }

    /// The value of `key` in the local map.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.entry(key)?.map(|entry| entry.value))
    }

    /// The entry under `key` in the local map (value, sequence, uuid, properties).
    pub fn entry(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Get {
            key: key.as_ref().to_vec(),
            reply: Reply::Blocking(reply),
        })?;
        answer.recv().map_err(|_| ClientError::Stopped)
    }

    /// Every entry whose key starts with `prefix` (empty: the whole local map), in key
    /// order.
    pub fn dump(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<(Vec<u8>, Entry)>, ClientError> {
        Ok(self.dump_at(prefix)?.1)
    }

    /// Like [`Client::dump`], with the sequence of the map it was read from: the state
    /// of the prefix at that sequence (plus this client's own unconfirmed updates, with
    /// sequence 0).
    pub fn dump_at(&self, prefix: impl AsRef<[u8]>) -> Result<SequencedDump, ClientError> {
        self.link().dump_at(prefix.as_ref())
    }

    /// The subtree this client follows (empty: the whole map).
    pub fn subtree(&self) -> &[u8] {
        &self.subtree
    }

    /// A cheap second handle on the agent, for helpers that run in their own thread
    /// (groups); it does not own the agent.
    pub(crate) fn link(&self) -> Link {
        Link {
            commands: self.commands.clone(),
            waker: Arc::clone(&self.waker),
            event_capacity: self.event_capacity,
        }
    }

    /// At most `limit` entries whose key starts with `prefix`, in key order, from the
    /// first key after `after` (from the start of the prefix when `None`): a page of
    /// [`Client::dump`], for maps too large to copy at once.
    pub fn range(
        &self,
        prefix: impl AsRef<[u8]>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Entry)>, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Range {
            prefix: prefix.as_ref().to_vec(),
            after: after.map(<[u8]>::to_vec),
            limit,
            reply,
        })?;
        answer.recv().map_err(|_| ClientError::Stopped)
    }

    /// Watches the committed changes to keys under `prefix`. With `after`, the
    /// sequence of the last change the caller saw, the watch resumes right after it
    /// when the client's history (see [`ClientBuilder::history`]) still holds every
    /// change since; otherwise it starts with a snapshot of the keys under the prefix.
    /// Either way the changes that follow are exactly those after the start: none
    /// missed, none repeated. At most `capacity` changes wait unread; a watch that
    /// falls further behind is ended ([`WatchEnd::TooSlow`]) rather than buffered.
    pub fn watch(
        &self,
        prefix: impl AsRef<[u8]>,
        after: Option<i64>,
        capacity: usize,
    ) -> Result<Watch, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Watch {
            prefix: prefix.as_ref().to_vec(),
            after,
            capacity: capacity.max(1),
            reply,
        })?;
        answer.recv().map_err(|_| ClientError::Stopped)
    }

    /// Sets `key` to `value`, persistent or expiring after `ttl`: sends it to every
    /// server and applies it locally. Returns once it is queued for sending.
    pub fn set(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<(), ClientError> {
        let value = Some((value.as_ref().to_vec(), ttl));
        self.update(key.as_ref(), value, None).map(|_| ())
    }

    /// Like [`Client::set`], then waits at most `timeout` for the current server to
    /// publish it, and returns the sequence it was given.
    pub fn set_confirmed(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
        timeout: Duration,
    ) -> Result<i64, ClientError> {
        let value = Some((value.as_ref().to_vec(), ttl));
        self.update_confirmed(key.as_ref(), value, timeout)
    }

    /// Deletes `key` on every server and locally.
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<(), ClientError> {
        self.update(key.as_ref(), None, None).map(|_| ())
    }

    /// Like [`Client::delete`], then waits at most `timeout` for the commit.
    pub fn delete_confirmed(
        &self,
        key: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<i64, ClientError> {
        self.update_confirmed(key.as_ref(), None, timeout)
    }

    /// A new receiver of every change from now on. Each receiver has its own bounded
    /// queue; one that falls behind gets an [`Event::Lagged`]. Dropping it unsubscribes.
    pub fn subscribe(&self) -> Events {
        let (events, receiver) = mpsc::sync_channel(self.event_capacity);
        // If the agent has stopped, the receiver simply ends at once.
        let _ = self.send(Command::Subscribe { events });
        Events { receiver }
    }

    /// What the client knows about its connection now.
    pub fn status(&self) -> Result<Status, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Status {
            reply: Reply::Blocking(reply),
        })?;
        answer.recv().map_err(|_| ClientError::Stopped)
    }

    /// Stops the agent, letting queued updates go out for up to the linger time, and
    /// closes the sockets.
    pub fn shutdown(mut self) -> Result<(), ClientError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ClientError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.send(Command::Stop);
        thread.join().map_err(|_| ClientError::Stopped)
    }

    fn update(
        &self,
        key: &[u8],
        value: Option<(Vec<u8>, Option<Duration>)>,
        confirm: Option<Sender<CommitOutcome>>,
    ) -> Result<Uuid, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Update {
            key: key.to_vec(),
            value,
            confirm: confirm.map(Reply::Blocking),
            reply: Reply::Blocking(reply),
        })?;
        answer
            .recv()
            .map_err(|_| ClientError::Stopped)?
            .map_err(ClientError::Rejected)
    }

    fn update_confirmed(
        &self,
        key: &[u8],
        value: Option<(Vec<u8>, Option<Duration>)>,
        timeout: Duration,
    ) -> Result<i64, ClientError> {
        let (confirm, outcome) = mpsc::channel();
        self.update(key, value, Some(confirm))?;
        match outcome.recv_timeout(timeout) {
            Ok(Ok(sequence)) => Ok(sequence),
            Ok(Err(reason)) => Err(ClientError::Lost(reason)),
            Err(RecvTimeoutError::Timeout) => Err(ClientError::CommitTimeout { waited: timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Stopped),
        }
    }

    /// [`Client::entry`] for async callers: the answer is awaited, no thread blocks.
    pub async fn entry_async(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>, ClientError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Command::Get {
            key: key.as_ref().to_vec(),
            reply: Reply::Async(reply),
        })?;
        answer.await.map_err(|_| ClientError::Stopped)
    }

    /// [`Client::status`] for async callers.
    pub async fn status_async(&self) -> Result<Status, ClientError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Command::Status {
            reply: Reply::Async(reply),
        })?;
        answer.await.map_err(|_| ClientError::Stopped)
    }

    /// [`Client::set_confirmed`] for async callers; must run in a tokio runtime with
    /// its timer enabled (the commit timeout).
    pub async fn set_confirmed_async(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
        timeout: Duration,
    ) -> Result<i64, ClientError> {
        let value = Some((value.as_ref().to_vec(), ttl));
        self.update_confirmed_async(key.as_ref(), value, timeout)
            .await
    }

    /// [`Client::delete_confirmed`] for async callers (see
    /// [`Client::set_confirmed_async`]).
    pub async fn delete_confirmed_async(
        &self,
        key: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<i64, ClientError> {
        self.update_confirmed_async(key.as_ref(), None, timeout)
            .await
    }

    async fn update_confirmed_async(
        &self,
        key: &[u8],
        value: Option<(Vec<u8>, Option<Duration>)>,
        timeout: Duration,
    ) -> Result<i64, ClientError> {
        let (confirm, outcome) = tokio::sync::oneshot::channel();
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Command::Update {
            key: key.to_vec(),
            value,
            confirm: Some(Reply::Async(confirm)),
            reply: Reply::Async(reply),
        })?;
        answer
            .await
            .map_err(|_| ClientError::Stopped)?
            .map_err(ClientError::Rejected)?;
        match tokio::time::timeout(timeout, outcome).await {
            Ok(Ok(Ok(sequence))) => Ok(sequence),
            Ok(Ok(Err(reason))) => Err(ClientError::Lost(reason)),
            Ok(Err(_)) => Err(ClientError::Stopped),
            Err(_) => Err(ClientError::CommitTimeout { waited: timeout }),
        }
    }

    fn send(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .map_err(|_| ClientError::Stopped)?;
        self.waker.wake().map_err(ClientError::Io)
    }
}

/// A snapshot's `Synced` event is delivered before the differences it caused (the core
/// emits it after them): a subscriber that re-reads the map on `Synced` then knows that
/// every later event with a sequence at or below the snapshot's is already in what it
/// read, and never mistakes a half-applied snapshot for a state (groups rely on it).
fn synced_first(outputs: &mut Vec<Event>) {
    let Some(synced) = outputs
        .iter()
        .position(|output| matches!(output, Event::Synced { .. }))
    else {
        return;
    };
    let first_change = outputs
        .iter()
        .take(synced)
        .position(|output| matches!(output, Event::Updated { .. } | Event::Deleted { .. }));
    if let Some(first_change) = first_change {
        let event = outputs.remove(synced);
        outputs.insert(first_change, event);
    }
}

/// A second handle on a client's agent (see [`Client::link`]).
#[derive(Clone, Debug)]
pub(crate) struct Link {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    event_capacity: usize,
}

impl Link {
    pub(crate) fn dump_at(&self, prefix: &[u8]) -> Result<SequencedDump, ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Dump {
            prefix: prefix.to_vec(),
            reply,
        })?;
        answer.recv().map_err(|_| ClientError::Stopped)
    }

    pub(crate) fn subscribe(&self) -> Events {
        let (events, receiver) = mpsc::sync_channel(self.event_capacity);
        let _ = self.send(Command::Subscribe { events });
        Events { receiver }
    }

    /// Sets (`Some`) or deletes (`None`) `key`; returns once queued.
    pub(crate) fn update(
        &self,
        key: &[u8],
        value: Option<(Vec<u8>, Option<Duration>)>,
    ) -> Result<(), ClientError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Update {
            key: key.to_vec(),
            value,
            confirm: None,
            reply: Reply::Blocking(reply),
        })?;
        answer
            .recv()
            .map_err(|_| ClientError::Stopped)?
            .map(|_| ())
            .map_err(ClientError::Rejected)
    }

    fn send(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .map_err(|_| ClientError::Stopped)?;
        self.waker.wake().map_err(ClientError::Io)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

const WAKER: Token = Token(0);
const DISCOVERY: Token = Token(3_000_000);

fn snapshot_token(index: usize) -> Token {
    Token(1 + 2 * index)
}

fn subscriber_token(index: usize) -> Token {
    Token(2 + 2 * index)
}

fn monitor_token(index: usize) -> Token {
    Token(1_000_000 + index)
}

fn snapshot_monitor_token(index: usize) -> Token {
    Token(2_000_000 + index)
}

/// Messages taken from one socket per pass, so that a flood on one socket cannot starve
/// the others or the application's commands.
const BATCH: usize = 256;

struct ServerLink {
    snapshot: ZmqSocket,
    subscriber: ZmqSocket,
    /// Connection events of `subscriber`.
    monitor: ReconnectMonitor,
    /// Connection events of `snapshot`.
    snapshot_monitor: ReconnectMonitor,
    last_heard: Option<StdInstant>,
    /// The SUB's connection is up (libzmq's monitor).
    connected: bool,
    /// The SUB's connection has been up at least once.
    ever_connected: bool,
    /// Failed connection attempts of the SUB and the DEALER since the last success.
    connects_failed: u64,
    /// The last handshake of the SUB or the DEALER failed, and none succeeded since.
    handshake_failure: Option<HandshakeFailure>,
}

struct Subscriber {
    events: SyncSender<Event>,
    /// Events dropped since the last one delivered.
    missed: u64,
}

impl Subscriber {
    /// Delivers `event` without blocking; false once the receiver is gone.
    fn deliver(&mut self, event: &Event) -> bool {
        if self.missed > 0 {
            match self.events.try_send(Event::Lagged {
                missed: self.missed,
            }) {
                Ok(()) => self.missed = 0,
                Err(TrySendError::Full(_)) => {
                    self.missed += 1;
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        match self.events.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.missed += 1;
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The background thread: the core clone agent, its sockets and the loop between them.
struct Agent {
    clock: Clock,
    core: CoreClient,
    poll: Poll,
    inbox: Receiver<Command>,
    links: Vec<ServerLink>,
    publisher: ZmqSocket,
    addresses: Vec<ServerAddress>,
    subscribers: Vec<Subscriber>,
    watchers: Vec<Watcher>,
    /// Recent committed changes, for watches that resume.
    history: History,
    synced_once: bool,
    /// Committed changes of the current step, recorded when it ends (or at its
    /// snapshot).
    unrecorded: Vec<Arc<Change>>,
    commit_waiters: BTreeMap<Uuid, Reply<CommitOutcome>>,
    sync_waiters: Vec<Sender<Status>>,
    limiter: RateLimiter,
    stopping: bool,
    /// The cluster's beacons, when the servers are found by discovery; the servers'
    /// slots are then [`CLIENT_SLOTS`] (primary, backup).
    discovery: Option<Discovery>,
    /// The discovery socket's fd signalled since it was last read empty.
    discovery_readable: bool,
    /// This client's pair and each slot's server key, when the connections use CURVE:
    /// the collector PUB takes its server's key at each connect.
    curve_keys: Option<(KeyPair, Vec<PublicKey>)>,
    // Dropped last: terminating the context waits (up to the linger) for queued updates.
    context: zmq::Context,
}

impl Agent {
    fn run(mut self) {
        let mut events = MioEvents::with_capacity(64);
        loop {
            if let Err(error) = self.turn() {
                tracing::error!(%error, "client stopped: a socket failed");
                break;
            }
            if self.stopping {
                break;
            }
            let discovery_due = self.discovery.as_ref().and_then(Discovery::poll_timeout);
            let deadline = match (self.core.poll_timeout(), discovery_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout = self.clock.sleep_until(self.clock.now(), deadline);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::error!(%error, "client stopped: the event loop failed");
                    break;
                }
            }
            if events.iter().any(|event| event.token() == DISCOVERY) {
                self.discovery_readable = true;
            }
        }
        // Sockets close here; the context (dropped last) lets queued updates go out.
        drop(self.links);
        drop(self.publisher);
        drop(self.context);
    }

    /// Passes over commands, timers and sockets until one moves nothing: then every
    /// socket's edge-triggered fd has been consumed and the loop may sleep.
    fn turn(&mut self) -> Result<(), zmq::Error> {
        loop {
            let mut moved = self.take_commands();
            if self.stopping {
                return Ok(());
            }
            let now = self.clock.now();
            if self.core.poll_timeout().is_some_and(|due| due <= now) {
                self.core.handle_timeout(now);
                self.drain_outputs();
            }
            moved |= self.pump_discovery()?;
            for index in 0..self.links.len() {
                moved |= self.receive_monitor_events(index)?;
                moved |= self.receive_batch(index, Channel::Snapshot)?;
                moved |= self.receive_batch(index, Channel::Subscriber)?;
            }
            if self.core.state() == State::Active && !self.sync_waiters.is_empty() {
                let status = self.status();
                for waiter in self.sync_waiters.drain(..) {
                    let _ = waiter.send(status.clone());
                }
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// Reads beacons and connects each slot to the server discovery has for it; true
    /// while more beacons may be waiting.
    fn pump_discovery(&mut self) -> Result<bool, zmq::Error> {
        let Some(discovery) = self.discovery.as_mut() else {
            return Ok(false);
        };
        let due = discovery
            .poll_timeout()
            .is_some_and(|due| due <= self.clock.now());
        if !self.discovery_readable && !due {
            return Ok(false);
        }
        let more = discovery.pump();
        self.discovery_readable = more;
        let mut changed = false;
        while discovery.poll_event().is_some() {
            changed = true;
        }
        if changed {
            self.follow_servers()?;
        }
        Ok(more)
    }

    /// Moves each slot whose server discovery now places elsewhere. A server that went
    /// silent keeps its slot's connection: libzmq reconnects if it comes back there, and
    /// the core judges its liveness by its heartbeats.
    fn follow_servers(&mut self) -> Result<(), zmq::Error> {
        let Some(discovery) = &self.discovery else {
            return Ok(());
        };
        for (index, kind) in CLIENT_SLOTS.iter().enumerate() {
            let Some(found) = discovery.beacon().server_of_kind(*kind) else {
                continue;
            };
            let found = FoundServer::from(found);
            let Ok(address) = ServerAddress::from_base(&found.base_endpoint()) else {
                continue;
            };
            let (Some(link), Some(current)) = (self.links.get(index), self.addresses.get(index))
            else {
                continue;
            };
            if *current == address {
                continue;
            }
            if current.is_known() {
                // Fails only for an endpoint never connected; nothing to undo then.
                let _ = link.snapshot.inner().disconnect(&current.snapshot);
                let _ = link.subscriber.inner().disconnect(&current.publisher);
                let _ = self.publisher.inner().disconnect(&current.collector);
            }
            link.snapshot.inner().connect(&address.snapshot)?;
            link.subscriber.inner().connect(&address.publisher)?;
            if let Some((own, keys)) = &self.curve_keys {
                if let Some(server) = keys.get(index) {
                    curve::make_client(self.publisher.inner(), own, server)?;
                }
            }
            self.publisher.inner().connect(&address.collector)?;
            tracing::info!(
                server = %address.snapshot,
                role = ?kind,
                "discovery: connected to a server of the cluster"
            );
            if let Some(slot) = self.addresses.get_mut(index) {
                *slot = address;
            }
        }
        Ok(())
    }

    /// Replaces server `index`'s DEALER (and its monitor) by a new one: replies queued
    /// for the old one answer requests of an earlier attempt (the core's module docs).
    fn reopen_snapshot_socket(&mut self, index: usize) -> Result<(), ClientError> {
        let Some(address) = self.addresses.get(index) else {
            return Ok(());
        };
        let largest = largest_legal_frame(&self.core.config().limits);
        let (snapshot, monitor) = open_snapshot_socket(
            &self.context,
            address,
            self.curve_keys.as_ref(),
            index,
            largest,
        )?;
        let Some(link) = self.links.get_mut(index) else {
            return Ok(());
        };
        let registry = self.poll.registry();
        // Dropping the old sockets closes them; deregistering first keeps mio's view
        // of the fds right.
        let _ = link.snapshot.deregister(registry);
        let _ = link.snapshot_monitor.deregister(registry);
        snapshot.register(registry, snapshot_token(index))?;
        monitor.register(registry, snapshot_monitor_token(index))?;
        link.snapshot = snapshot;
        link.snapshot_monitor = monitor;
        Ok(())
    }

    fn take_commands(&mut self) -> bool {
        let mut took = false;
        while let Ok(command) = self.inbox.try_recv() {
            took = true;
            self.execute(command);
            self.drain_outputs();
            if self.stopping {
                break;
            }
        }
        took
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Get { key, reply } => reply.send(self.core.entry(&key).cloned()),
            Command::Dump { prefix, reply } => {
                let entries = self
                    .core
                    .iter()
                    .filter(|(key, _)| key.starts_with(&prefix))
                    .map(|(key, entry)| (key.to_vec(), entry.clone()))
                    .collect();
                let _ = reply.send((self.core.sequence(), entries));
            }
            Command::Update {
                key,
                value,
                confirm,
                reply,
            } => {
                let result = match value {
                    Some((value, ttl)) => self.core.set(key, value, ttl),
                    None => self.core.delete(key),
                };
                if let (Ok(uuid), Some(confirm)) = (&result, confirm) {
                    // Right after the update, before any input: the echo cannot have
                    // arrived yet.
                    if self.core.watch_commit(*uuid).is_ok() {
                        self.commit_waiters.insert(*uuid, confirm);
                    }
                }
                reply.send(result);
            }
            Command::Subscribe { events } => {
                self.subscribers.push(Subscriber { events, missed: 0 })
            }
            Command::Range {
                prefix,
                after,
                limit,
                reply,
            } => {
                let start = match &after {
                    Some(after) if after.as_slice() >= prefix.as_slice() => {
                        Bound::Excluded(after.as_slice())
                    }
                    _ => Bound::Included(prefix.as_slice()),
                };
                let entries = self
                    .core
                    .iter_from(start)
                    .take_while(|(key, _)| key.starts_with(&prefix))
                    .take(limit)
                    .map(|(key, entry)| (key.to_vec(), entry.clone()))
                    .collect();
                let _ = reply.send(entries);
            }
            Command::Watch {
                prefix,
                after,
                capacity,
                reply,
            } => {
                let _ = reply.send(self.start_watch(prefix, after, capacity));
            }
            Command::Status { reply } => reply.send(self.status()),
            Command::WhenSynced { reply } => self.sync_waiters.push(reply),
            Command::Stop => self.stopping = true,
        }
    }

    /// A new watch: the resumed changes or the snapshot, then (as watcher) the changes
    /// from now on, all taken between two inputs.
    fn start_watch(&mut self, prefix: Vec<u8>, after: Option<i64>, capacity: usize) -> Watch {
        let snapshot = |reason| WatchStart::Snapshot {
            sequence: self.history.last(),
            entries: self
                .core
                .iter_from(Bound::Included(prefix.as_slice()))
                .take_while(|(key, _)| key.starts_with(&prefix))
                .map(|(key, entry)| (key.to_vec(), entry.clone()))
                .collect(),
            reason,
        };
        let (start, replay) = match after.map(|after| (after, self.history.resume(after))) {
            None => (snapshot(SnapshotReason::New), Vec::new()),
            Some((_, Resume::Ahead)) => (snapshot(SnapshotReason::Ahead), Vec::new()),
            Some((_, Resume::Gone)) => (snapshot(SnapshotReason::Gone), Vec::new()),
            Some((after, Resume::Replay(changes))) => {
                let replay: Vec<_> = changes
                    .into_iter()
                    .filter(|(_, change)| change.key.starts_with(&prefix))
                    .collect();
                (WatchStart::Resumed { after }, replay)
            }
        };
        let (sender, changes) = tokio::sync::mpsc::channel(capacity + replay.len());
        for item in replay {
            // Room was made for every replayed change.
            let _ = sender.try_send(item);
        }
        let too_slow = Arc::new(AtomicBool::new(false));
        self.watchers.push(Watcher {
            prefix,
            sender,
            too_slow: Arc::clone(&too_slow),
        });
        Watch {
            start,
            changes,
            too_slow,
        }
    }

    /// Records the committed changes not yet recorded, in order, and sends them to the
    /// watchers.
    fn record_changes(&mut self) {
        for change in std::mem::take(&mut self.unrecorded) {
            let id = self.history.record(Arc::clone(&change));
            self.watchers.retain(|watcher| watcher.deliver(id, &change));
        }
    }

    fn status(&self) -> Status {
        let server = self.core.current_server().0;
        Status {
            state: self.core.state(),
            server,
            endpoint: self
                .addresses
                .get(server)
                .map(|address| address.snapshot.clone())
                .unwrap_or_default(),
            sequence: self.core.sequence(),
            keys: self.core.len(),
            last_heard: self
                .links
                .get(server)
                .and_then(|link| link.last_heard)
                .map(|heard| heard.elapsed()),
            servers: self
                .addresses
                .iter()
                .zip(&self.links)
                .enumerate()
                .map(|(index, (address, link))| {
                    let view = self.core.server_view(ServerIndex(index));
                    ServerStatus {
                        endpoint: address.snapshot.clone(),
                        current: index == server,
                        connected: link.connected,
                        ever_connected: link.ever_connected,
                        connects_failed: link.connects_failed,
                        announced: view.announced,
                        sequence: view.heard,
                        keys: view.keys,
                        last_heard: link.last_heard.map(|heard| heard.elapsed()),
                        handshake_failure: link.handshake_failure,
                    }
                })
                .collect(),
            discovered: self
                .discovery
                .as_ref()
                .map(Discovery::servers)
                .unwrap_or_default(),
        }
    }

    /// Turns the monitor events of the SUB and the DEALER into the core's reconnect
    /// inputs: a connect that follows a disconnect means messages may have been lost in
    /// between.
    fn receive_monitor_events(&mut self, index: usize) -> Result<bool, zmq::Error> {
        let Some(link) = self.links.get_mut(index) else {
            return Ok(false);
        };
        let subscriber = link.monitor.poll_reconnected()?;
        let snapshot = link.snapshot_monitor.poll_reconnected()?;
        if let Some(up) = subscriber.up {
            link.connected = up;
            link.ever_connected |= up;
        }
        if subscriber.up == Some(true) || snapshot.up == Some(true) {
            link.connects_failed = 0;
        }
        link.connects_failed += subscriber.connects_failed + snapshot.connects_failed;
        if subscriber.handshake_succeeded || snapshot.handshake_succeeded {
            link.handshake_failure = None;
        }
        if let Some(failure) = subscriber.handshake_failed.or(snapshot.handshake_failed) {
            link.handshake_failure = Some(failure);
            let server = self
                .addresses
                .get(index)
                .map_or("?", |address| address.snapshot.as_str());
            if let Some(allowed) = self
                .limiter
                .check(&format!("{index}/handshake"), StdInstant::now())
            {
                tracing::warn!(
                    server,
                    reason = %failure,
                    suppressed = allowed.suppressed,
                    "security handshake with the server failed"
                );
            }
        }
        if subscriber.disconnected || subscriber.reconnected {
            // libzmq queues a reconnecting socket's messages in one pipe, the old
            // connection's first: reading them before the report keeps them ahead of
            // it, the order the core relies on (docs/DECISIONS.md).
            while self.receive_batch(index, Channel::Subscriber)? {}
        }
        if snapshot.disconnected || snapshot.reconnected {
            while self.receive_batch(index, Channel::Snapshot)? {}
        }
        if subscriber.disconnected || snapshot.disconnected {
            tracing::debug!(
                server = %self.endpoint(ServerIndex(index)),
                "connection to the server is down"
            );
            self.core
                .handle_server_disconnected(self.clock.now(), ServerIndex(index));
            self.drain_outputs();
        }
        if snapshot.reconnected {
            tracing::info!(
                server = %self.addresses.get(index).map(|a| a.snapshot.as_str()).unwrap_or("?"),
                "snapshot connection reconnected: replies in flight are written off"
            );
            self.core
                .handle_snapshot_reconnected(self.clock.now(), ServerIndex(index));
            self.drain_outputs();
        }
        if subscriber.reconnected {
            tracing::info!(
                server = %self.addresses.get(index).map(|a| a.publisher.as_str()).unwrap_or("?"),
                "subscription reconnected: taking a fresh snapshot"
            );
            self.core
                .handle_subscriber_reconnected(self.clock.now(), ServerIndex(index));
            self.drain_outputs();
        }
        Ok(subscriber.received || snapshot.received)
    }

    fn receive_batch(&mut self, index: usize, channel: Channel) -> Result<bool, zmq::Error> {
        let mut received = false;
        for _ in 0..BATCH {
            let Some(link) = self.links.get_mut(index) else {
                return Ok(received);
            };
            let socket = match channel {
                Channel::Snapshot => &link.snapshot,
                Channel::Subscriber => &link.subscriber,
            };
            let Some(frames) = socket.try_recv()? else {
                return Ok(received);
            };
            if channel == Channel::Subscriber {
                link.last_heard = Some(StdInstant::now());
            }
            received = true;
            self.core
                .handle_message(self.clock.now(), ServerIndex(index), channel, &frames);
            self.drain_outputs();
        }
        Ok(received)
    }

    fn drain_outputs(&mut self) {
        self.drain_core_outputs();
        self.record_changes();
    }

    /// Carries out the core's outputs in its order (the history records a snapshot's
    /// differences before its Synced), then gives the subscribers their events with each
    /// Synced before the differences its snapshot made ([`synced_first`]).
    fn drain_core_outputs(&mut self) {
        let mut events = Vec::new();
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::SendSnapshotRequest {
                    server,
                    frames,
                    fresh_connection,
                } => {
                    if fresh_connection {
                        if let Err(error) = self.reopen_snapshot_socket(server.0) {
                            tracing::warn!(
                                %error,
                                server = server.0,
                                "could not open a new snapshot connection; asking on the old one"
                            );
                        }
                    }
                    if let Some(link) = self.links.get(server.0) {
                        send_or_log(&link.snapshot, &frames, &mut self.limiter);
                    }
                }
                Output::Publish { frames } => {
                    send_or_log(&self.publisher, &frames, &mut self.limiter);
                }
                Output::Event(event) => events.extend(self.on_event(event)),
            }
        }
        if events.is_empty() || self.subscribers.is_empty() {
            return;
        }
        synced_first(&mut events);
        for event in &events {
            self.subscribers
                .retain_mut(|subscriber| subscriber.deliver(event));
        }
    }

    /// Keeps the agent's books for one core event; the event for subscribers, if any.
    fn on_event(&mut self, event: core_client::Event) -> Option<Event> {
        use core_client::Event as CoreEvent;
        let event = match event {
            CoreEvent::Updated {
                key,
                value,
                sequence,
            } => {
                self.note_change(sequence, &key, Some(&value));
                Event::Updated {
                    key,
                    value,
                    sequence,
                }
            }
            CoreEvent::Deleted { key, sequence } => {
                self.note_change(sequence, &key, None);
                Event::Deleted { key, sequence }
            }
            CoreEvent::Synced {
                server,
                sequence,
                keys,
            } => {
                tracing::info!(server = %self.endpoint(server), sequence, keys, "synced");
                // The changes before it in this step are the snapshot's differences from
                // the old map, emitted in key order: recorded in sequence order.
                self.unrecorded.sort_by_key(|change| change.sequence);
                self.record_changes();
                self.history.synced(sequence, !self.synced_once);
                self.synced_once = true;
                Event::Synced {
                    server: server.0,
                    sequence,
                    keys,
                }
            }
            CoreEvent::ServerChanged { from, to } => {
                tracing::warn!(
                    from = %self.endpoint(from),
                    to = %self.endpoint(to),
                    "server silent: trying the next one"
                );
                Event::ServerChanged {
                    from: from.0,
                    to: to.0,
                }
            }
            CoreEvent::Committed { uuid, sequence } => {
                if let Some(waiter) = self.commit_waiters.remove(&uuid) {
                    waiter.send(Ok(sequence));
                }
                return None;
            }
            CoreEvent::Lost { uuid, reason } => {
                if let Some(waiter) = self.commit_waiters.remove(&uuid) {
                    waiter.send(Err(reason));
                }
                return None;
            }
            CoreEvent::Dropped {
                server,
                channel,
                reason,
            } => {
                let key = format!("{}/{channel:?}/{}", server.0, reason.as_str());
                if let Some(allowed) = self.limiter.check(&key, StdInstant::now()) {
                    tracing::warn!(
                        server = %self.endpoint(server),
                        channel = ?channel,
                        reason = ?reason,
                        suppressed = allowed.suppressed,
                        "dropped a message from a server"
                    );
                }
                return None;
            }
        };
        Some(event)
    }

    /// Keeps a committed change for the history and the watchers (a provisional local
    /// change, sequence 0, is not one), unless nobody could ever ask for it.
    fn note_change(&mut self, sequence: i64, key: &[u8], value: Option<&[u8]>) {
        // Before the first snapshot completes, the changes are the map's initial
        // entries, which the history forgets at that snapshot anyway.
        let unwanted =
            self.watchers.is_empty() && (self.history.capacity() == 0 || !self.synced_once);
        if sequence <= 0 || unwanted {
            if sequence > 0 {
                self.history.skip(sequence);
            }
            return;
        }
        self.unrecorded.push(Arc::new(Change {
            sequence,
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }));
    }

    fn endpoint(&self, server: ServerIndex) -> &str {
        self.addresses
            .get(server.0)
            .map_or("?", |address| address.snapshot.as_str())
    }
}

/// The client's own pair and each server's public key (in the order of `addresses`), or
/// `None` for plain ZMTP; an error names what is missing.
#[allow(clippy::type_complexity)]
fn curve_keys(
    own: Option<&KeyPair>,
    addresses: &[ServerAddress],
    server_keys: &[Option<PublicKey>],
) -> Result<Option<(KeyPair, Vec<PublicKey>)>, ClientError> {
    let Some(own) = own else {
        if server_keys.iter().any(Option::is_some) {
            return Err(ClientError::Curve(
                "a server public key needs this client's own key pair too (`clonekv keygen` \
                 makes one; the server must admit its public key)"
                    .to_string(),
            ));
        }
        return Ok(None);
    };
    if !curve::available() {
        return Err(ClientError::Curve(curve::KeyError::Unavailable.to_string()));
    }
    let keys = addresses
        .iter()
        .zip(server_keys)
        .map(|(address, key)| {
            key.ok_or_else(|| {
                ClientError::Curve(format!(
                    "no public key for server {address}: give the servers' public keys \
                     (--server-public-key)"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((own.clone(), keys)))
}

/// The DEALER to a server's snapshot port, with the monitor of its connection: CURVE
/// (server `index`'s key), the frame limit, and connected if the address is known.
fn open_snapshot_socket(
    context: &zmq::Context,
    address: &ServerAddress,
    curve_keys: Option<&(KeyPair, Vec<PublicKey>)>,
    index: usize,
    largest_frame: i64,
) -> Result<(ZmqSocket, ReconnectMonitor), ClientError> {
    let snapshot = new_socket(context, zmq::DEALER, "snapshot", &address.snapshot)?;
    if let Some((own, keys)) = curve_keys {
        configure(&snapshot, &address.snapshot, |inner| {
            match keys.get(index) {
                Some(server) => curve::make_client(inner, own, server),
                None => Err(zmq::Error::EINVAL),
            }
        })?;
    }
    // A reply's unsent part is lost with its connection (the server answers on the
    // connection the request came in on).
    let monitor =
        ReconnectMonitor::new(context, &snapshot).map_err(|error| ClientError::Socket {
            socket: "snapshot monitor",
            endpoint: address.snapshot.clone(),
            error,
        })?;
    configure(&snapshot, &address.snapshot, |socket| {
        // Nothing queued on a DEALER being replaced is worth sending.
        socket.set_linger(0)?;
        socket.set_maxmsgsize(largest_frame)
    })?;
    if address.is_known() {
        connect(&snapshot, &address.snapshot)?;
    }
    Ok((snapshot, monitor))
}

fn new_socket(
    context: &zmq::Context,
    kind: zmq::SocketType,
    name: &'static str,
    endpoint: &str,
) -> Result<ZmqSocket, ClientError> {
    ZmqSocket::new(context, kind, name).map_err(|error| ClientError::Socket {
        socket: name,
        endpoint: endpoint.to_string(),
        error,
    })
}

fn configure(
    socket: &ZmqSocket,
    endpoint: &str,
    options: impl FnOnce(&zmq::Socket) -> Result<(), zmq::Error>,
) -> Result<(), ClientError> {
    options(socket.inner()).map_err(|error| ClientError::Socket {
        socket: socket.name(),
        endpoint: endpoint.to_string(),
        error,
    })
}

fn connect(socket: &ZmqSocket, endpoint: &str) -> Result<(), ClientError> {
    socket
        .inner()
        .connect(endpoint)
        .map_err(|error| ClientError::Socket {
            socket: socket.name(),
            endpoint: endpoint.to_string(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_settings_must_be_complete() {
        let pair = KeyPair::generate().unwrap();
        let error = Client::builder()
            .server("tcp://127.0.0.1:1")
            .server_public_key(pair.public())
            .connect()
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("needs this client's own key pair"),
            "{error}"
        );
        let error = Client::builder()
            .server("tcp://127.0.0.1:1")
            .server_with_key("tcp://127.0.0.1:4", pair.public())
            .curve_key_pair(pair)
            .connect()
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("no public key for server tcp://127.0.0.1:1"),
            "{error}"
        );
    }

    #[test]
    fn a_snapshot_is_announced_before_the_differences_it_made() {
        let updated = |key: &str, sequence| Event::Updated {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            sequence,
        };
        let synced = Event::Synced {
            server: 1,
            sequence: 9,
            keys: 2,
        };
        let mut outputs = vec![
            updated("/a", 3),
            Event::Deleted {
                key: b"/b".to_vec(),
                sequence: 9,
            },
            synced.clone(),
            updated("/c", 10),
        ];
        synced_first(&mut outputs);
        assert_eq!(outputs[0], synced);
        assert_eq!(outputs[1], updated("/a", 3));
        assert_eq!(outputs[3], updated("/c", 10));

        let mut live = vec![updated("/a", 3), updated("/c", 4)];
        synced_first(&mut live);
        assert_eq!(live, [updated("/a", 3), updated("/c", 4)]);
    }

    #[test]
    fn a_base_endpoint_gives_the_three_ports() {
        let address = ServerAddress::from_base("tcp://localhost:5556").unwrap();
        assert_eq!(address.snapshot, "tcp://localhost:5556");
        assert_eq!(address.publisher, "tcp://localhost:5557");
        assert_eq!(address.collector, "tcp://localhost:5558");
        let bare = ServerAddress::from_base("127.0.0.1:7000").unwrap();
        assert_eq!(bare.collector, "tcp://127.0.0.1:7002");
    }

    #[test]
    fn bad_endpoints_say_what_is_wrong() {
        for endpoint in [
            "localhost",
            "tcp://:5556",
            "tcp://host:port",
            "tcp://host:65535",
            "ipc:///tmp/x",
        ] {
            let error = ServerAddress::from_base(endpoint).unwrap_err();
            assert!(matches!(error, ClientError::Endpoint { .. }), "{endpoint}");
        }
    }

    #[test]
    fn a_slow_subscriber_gets_a_lagged_event_instead_of_blocking() {
        let (events, receiver) = mpsc::sync_channel(2);
        let mut subscriber = Subscriber { events, missed: 0 };
        let deleted = |n: u8| Event::Deleted {
            key: vec![n],
            sequence: i64::from(n),
        };
        for n in 0..5 {
            assert!(subscriber.deliver(&deleted(n)));
        }
        assert_eq!(receiver.try_recv().ok(), Some(deleted(0)));
        assert_eq!(receiver.try_recv().ok(), Some(deleted(1)));
        assert!(subscriber.deliver(&deleted(5)));
        assert_eq!(receiver.try_recv().ok(), Some(Event::Lagged { missed: 3 }));
        assert_eq!(receiver.try_recv().ok(), Some(deleted(5)));
        drop(receiver);
        assert!(!subscriber.deliver(&deleted(6)));
    }
}
