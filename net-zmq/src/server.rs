//! The clone server over libzmq: [`ServerHost`] owns the sockets of one server of a
//! Binary Star pair and drives a [`clonekv_core::server::Server`] with them.
//!
//! # Sockets (PROTOCOL.md §1)
//!
//! | socket | endpoint (primary default) | core call / output |
//! |--------|----------------------------|--------------------|
//! | ROUTER, bound, `ROUTER_MANDATORY` | `tcp://*:5556` (P) | `handle_snapshot_request`; `poll_snapshot` replies |
//! | XPUB (verbose), bound | `tcp://*:5557` (P+1) | `Output::Publish`; each subscription to `HUGZ` → `handle_subscriber_joined` |
//! | SUB ``""``, bound | `tcp://*:5558` (P+2, collector) | `handle_collected` |
//! | PUB, bound | `tcp://*:5003` (Binary Star state) | `Output::SendStateToPeer` |
//! | SUB ``""``, connected | `tcp://localhost:5004` (peer state) | `handle_peer_state` |
//! | SUB ``""``, connected | `tcp://localhost:5567` (peer's P+1) | `handle_peer_update` |
//! | DEALER, connected, new per request | `tcp://localhost:5566` (peer's P) | `Output::RequestPeerSnapshot`; `handle_peer_snapshot` |
//! | PUB, connected | `tcp://localhost:5568` (peer's P+2) | `Output::ForwardToPeerCollector` |
//!
//! With [`ServerOptions::curve`] set, every socket above uses CURVE: the bound ones as
//! CURVE servers behind the ZAP handler of [`crate::curve`] (served by this loop, like
//! any socket), the ones connected to the peer as CURVE clients that require the peer's
//! key. A failed handshake on a peer-facing socket (read from libzmq's socket monitor)
//! and every refused key are logged, rate-limited.
//!
//! # The loop
//!
//! ```text
//! loop {
//!     repeat until a whole pass moves nothing:
//!         if the core's deadline has passed: handle_timeout(now, wall)
//!         for each readable socket: try_recv up to a batch, feed handle_*, drain poll_output
//!         for each open snapshot stream: retry its held message, then poll_snapshot and
//!             send until the client's pipe is full (hold that message) or the stream ends
//!     sleep in mio until a socket's fd signals or the core's poll_timeout
//! }
//! ```
//!
//! A pass reads only the input sockets that may have something: those whose fd signalled
//! since, or that were used for anything but a receive that found nothing (a receive
//! that finds nothing costs libzmq a command check, a `poll()` syscall, per socket).
//! The zmq fd is edge-triggered, and every send or receive can consume its edge, so the
//! loop only sleeps after a full pass over every socket that received and sent nothing
//! (when the pass's only sends were refused, it looks at every socket once more: a
//! refused send also enters libzmq).
//! Snapshot replies are the only sends that can be refused: a full pipe pauses that one
//! client's stream, with the refused message kept to be sent first on a later pass (the
//! ROUTER's fd signals when a pipe drains); an unreachable client's streams are cancelled.
//! Nothing here decides anything about the protocol.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use clonekv_core::beacon::{Announcement, Event as PeerEvent, Kind};
use clonekv_core::bstar::Role;
use clonekv_core::kvmsg::{BstarState, FRAME_COUNT};
use clonekv_core::server::{
    AbandonReason, Config, ConfigError, Counters, DropReason, Event, EvictionReason, Frame,
    HashKey, Output, Server, SyncReason,
};
use clonekv_core::time::{EpochMillis, Instant};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::clock::Clock;
use crate::curve::{self, KeyError, ServerCurve, ZapDecision, ZapDomain, ZapHandler};
use crate::discovery::{endpoint_host, Discovery, DiscoveryError, DiscoveryOptions};
use crate::endpoint::EndpointError;
use crate::log::{log_limited, log_summaries, send_or_log, send_or_log_reusing, RateLimiter};
use crate::persist::{Journal, OpenReport, PersistError, PersistOptions};
pub use crate::socket::hwm_for_queue_bytes;
use crate::socket::{
    largest_legal_frame, Frames, MonitorPoll, ReconnectMonitor, SendOutcome, ZmqSocket,
};

/// Where one server binds and where it finds its peer. Every field is a full libzmq
/// endpoint, so any transport works; [`ServerEndpoints::with_ports`] builds the usual
/// TCP layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerEndpoints {
    /// Bind: ROUTER for snapshot requests (P).
    pub snapshot: String,
    /// Bind: PUB for updates and heartbeats (P+1).
    pub publisher: String,
    /// Bind: SUB collecting client updates (P+2).
    pub collector: String,
    /// Bind: PUB for this server's Binary Star state.
    pub state: String,
    /// Connect: the peer's snapshot ROUTER (its P).
    pub peer_snapshot: String,
    /// Connect: the peer's publisher (its P+1).
    pub peer_publisher: String,
    /// Connect: the peer's collector (its P+2).
    pub peer_collector: String,
    /// Connect: the peer's Binary Star state PUB.
    pub peer_state: String,
}

impl ServerEndpoints {
    /// The TCP layout: bind P, P+1, P+2 and `state_port` on `bind_host` (`*` for every
    /// interface); connect to `peer_host` at `peer_port`, +1, +2 and `peer_state_port`.
    pub fn with_ports(
        bind_host: &str,
        port: u16,
        state_port: u16,
        peer_host: &str,
        peer_port: u16,
        peer_state_port: u16,
    ) -> Self {
        let tcp = |host: &str, port: u32| format!("tcp://{host}:{port}");
        let (port, peer_port) = (u32::from(port), u32::from(peer_port));
        ServerEndpoints {
            snapshot: tcp(bind_host, port),
            publisher: tcp(bind_host, port + 1),
            collector: tcp(bind_host, port + 2),
            state: tcp(bind_host, u32::from(state_port)),
            peer_snapshot: tcp(peer_host, peer_port),
            peer_publisher: tcp(peer_host, peer_port + 1),
            peer_collector: tcp(peer_host, peer_port + 2),
            peer_state: tcp(peer_host, u32::from(peer_state_port)),
        }
    }

    /// The primary's defaults: P = 5556, Binary Star on 5003, peer at localhost:5566
    /// and 5004 (the zguide's `clonesrv6 -p`).
    pub fn primary() -> Self {
        ServerEndpoints::with_ports("*", 5556, 5003, "localhost", 5566, 5004)
    }

    /// The backup's defaults: P = 5566, Binary Star on 5004, peer at localhost:5556
    /// and 5003 (the zguide's `clonesrv6 -b`).
    pub fn backup() -> Self {
        ServerEndpoints::with_ports("*", 5566, 5004, "localhost", 5556, 5003)
    }

    /// Checks that no two sockets share a port, that no peer endpoint is one of this
    /// server's own, and that every peer host resolves (see [`crate::endpoint::check`]).
    /// [`ServerHost::start`] does it before making any socket.
    pub fn check(&self) -> Result<(), EndpointError> {
        crate::endpoint::check(
            &self.own(),
            &[
                ("peer snapshot", &self.peer_snapshot),
                ("peer publisher", &self.peer_publisher),
                ("peer collector", &self.peer_collector),
                ("peer state", &self.peer_state),
            ],
        )
    }

    /// [`ServerEndpoints::check`] of this server's own endpoints only, for a server
    /// that finds its peer by discovery.
    pub fn check_own(&self) -> Result<(), EndpointError> {
        crate::endpoint::check(&self.own(), &[])
    }

    fn own(&self) -> [(&'static str, &str); 4] {
        [
            ("snapshot", &self.snapshot),
            ("publisher", &self.publisher),
            ("collector", &self.collector),
            ("state", &self.state),
        ]
    }
}

/// Everything a [`ServerHost`] needs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The core server's role, timing and limits.
    pub config: Config,
    /// Where to bind and connect.
    pub endpoints: ServerEndpoints,
    /// High-water mark (messages) of the sending streaming sockets, per subscriber: the
    /// publisher and the PUB to the peer's collector. libzmq drops silently past it (a
    /// passive, or a client of the whole map, re-syncs when it notices; a client of a
    /// subtree cannot notice, PROTOCOL.md §9), so it is generous. The snapshot ROUTER
    /// keeps libzmq's default, since its replies are flow-controlled instead.
    pub hwm: i32,
    /// High-water mark (messages) of the receiving streaming sockets, per connection:
    /// the collector, the SUB following the peer and the DEALER of a sync. A full pipe
    /// makes libzmq stop reading that connection (TCP pushes back on the sender), so a
    /// small one loses nothing. By default
    /// [`hwm_for_queue_bytes`]`(`[`DEFAULT_QUEUE_BYTES`]`)`, so that a pipe of the
    /// largest messages stays within that many bytes.
    pub receive_hwm: i32,
    /// Announce this server by UDP beacon, and maybe find the peer that way; `None`:
    /// no discovery.
    pub discovery: Option<ServerDiscovery>,
    /// Record the map in a data directory and start from what it holds
    /// ([`crate::persist`]); `None`: memory only.
    pub persistence: Option<PersistOptions>,
    /// CURVE keys: `None` for plain ZMTP on every socket (the zguide's wire, open to
    /// anyone who reaches the ports); with keys, every socket is CURVE and a ZAP handler
    /// admits only the configured clients and the peer (docs/SECURITY.md).
    pub curve: Option<ServerCurve>,
}

/// How a server takes part in discovery ([`crate::discovery`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerDiscovery {
    /// Cluster, UDP port, interface and timing.
    pub options: DiscoveryOptions,
    /// The base port P announced (snapshots on P, updates on P+1, collector on P+2).
    pub base_port: u16,
    /// The Binary Star state port announced.
    pub state_port: u16,
    /// Connect to the partner the beacons reveal (the server of the other role in the
    /// cluster). The peer endpoints in [`ServerEndpoints`] are then a fallback, used only
    /// when no partner is heard within the silence timeout (a partner that does not
    /// announce itself, such as the zguide's servers); a partner heard later replaces
    /// them.
    pub find_peer: bool,
}

impl ServerOptions {
    /// The primary with every default.
    pub fn primary() -> Self {
        ServerOptions {
            config: Config::primary(),
            endpoints: ServerEndpoints::primary(),
            hwm: DEFAULT_HWM,
            discovery: None,
            persistence: None,
            curve: None,
            receive_hwm: hwm_for_queue_bytes(DEFAULT_QUEUE_BYTES, &Config::primary().limits),
        }
    }

    /// The backup with every default.
    pub fn backup() -> Self {
        ServerOptions {
            config: Config::backup(),
            endpoints: ServerEndpoints::backup(),
            hwm: DEFAULT_HWM,
            discovery: None,
            persistence: None,
            curve: None,
            receive_hwm: hwm_for_queue_bytes(DEFAULT_QUEUE_BYTES, &Config::backup().limits),
        }
    }
}

/// The default high-water mark of a server's sending sockets and of a client's
/// sockets: bursts of this many updates queue instead of being dropped.
pub const DEFAULT_HWM: i32 = 100_000;

/// The default byte budget of one pipe of a server's receiving sockets (per connection):
/// libzmq queues at most this many bytes of the largest messages there
/// ([`hwm_for_queue_bytes`]): 15 messages at the default 1 MiB body limit, about 3 800
/// at a 4 KiB one.
pub const DEFAULT_QUEUE_BYTES: usize = 16 << 20;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The core rejected the configuration.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The endpoints clash, or a peer host does not resolve.
    #[error("invalid configuration: {0}")]
    Endpoints(#[from] EndpointError),
    /// The OS gave no randomness for the hash key.
    #[error("cannot read OS randomness for the hash key: {0}")]
    Randomness(String),
    /// A socket could not bind (the address is in use, is not this host's, or the
    /// endpoint is invalid).
    #[error(
        "cannot bind the {socket} socket to {endpoint}: {}",
        bind_failure(error)
    )]
    Bind {
        /// Which socket.
        socket: &'static str,
        /// The endpoint.
        endpoint: String,
        /// libzmq's reason.
        error: zmq::Error,
    },
    /// A socket could not connect (the endpoint is invalid).
    #[error("cannot connect the {socket} socket to {endpoint}: {error}")]
    Connect {
        /// Which socket.
        socket: &'static str,
        /// The endpoint.
        endpoint: String,
        /// libzmq's reason.
        error: zmq::Error,
    },
    /// libzmq could not create or configure a socket.
    #[error("cannot set up the {socket} socket: {error}")]
    Socket {
        /// Which socket.
        socket: &'static str,
        /// libzmq's reason.
        error: zmq::Error,
    },
    /// The event loop could not be set up.
    #[error("cannot set up the event loop: {0}")]
    Io(#[from] io::Error),
    /// Discovery was asked for and cannot start.
    #[error("{0}")]
    Discovery(#[from] DiscoveryError),
    /// The data directory cannot be used.
    #[error("data directory: {0}")]
    Persist(#[from] PersistError),
    /// CURVE keys were given but cannot be used.
    #[error("{0}")]
    Curve(#[from] KeyError),
}

/// What a bind error means, with libzmq's errno and text.
fn bind_failure(error: &zmq::Error) -> String {
    let (meaning, errno) = match error {
        zmq::Error::EADDRINUSE => ("the address is in use by another process", "EADDRINUSE"),
        zmq::Error::EADDRNOTAVAIL => (
            "the address is not available on this host: no interface has it",
            "EADDRNOTAVAIL",
        ),
        zmq::Error::ENODEV => (
            "no interface or address of this host has that name",
            "ENODEV",
        ),
        other => return other.to_string(),
    };
    format!("{meaning} ({errno}: {error})")
}

/// Why a running server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Waiting for events failed.
    #[error("event loop failed: {0}")]
    Io(#[from] io::Error),
    /// Receiving from a socket failed for a reason other than "nothing waiting".
    #[error("receiving on the {socket} socket failed: {error}")]
    Receive {
        /// Which socket.
        socket: &'static str,
        /// libzmq's reason.
        error: zmq::Error,
    },
    /// Recording to the data directory failed: the server stops rather than publish
    /// what it could not record (its partner takes over).
    #[error("recording to the data directory failed: {0}")]
    Persist(#[from] PersistError),
}

/// What a server reports about itself, copied out of the loop for metrics and status
/// pages (see [`ServerHost::share_stats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerStats {
    /// The configured role.
    pub role: Role,
    /// The Binary Star state.
    pub state: BstarState,
    /// The peer's state as last heard, if ever.
    pub peer_state: Option<BstarState>,
    /// The peer was heard within its expiry.
    pub peer_alive: bool,
    /// The sequence of the last change published or applied.
    pub sequence: i64,
    /// Keys in the map.
    pub keys: usize,
    /// Bytes the map is charged ([`Server::map_bytes`]).
    pub bytes: usize,
    /// Entries on the pending list.
    pub pending: usize,
    /// Updates held by a passive until its sync completes.
    pub sync_backlog: usize,
    /// Open snapshot streams.
    pub snapshot_streams: usize,
    /// A passive is waiting for or receiving the peer's snapshot.
    pub syncing: bool,
    /// Cumulative counters since start.
    pub counters: Counters,
}

/// How often the loop refreshes its shared [`ServerStats`] at most (it does so at its
/// timers, which fire at least every heartbeat).
const STATS_INTERVAL: Duration = Duration::from_millis(200);

/// Stops a running [`ServerHost`] from another thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
    /// Asks the loop to return from [`ServerHost::run`] at its next wakeup (now).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(error) = self.waker.wake() {
            tracing::error!(%error, "cannot wake the server loop to stop it");
        }
    }
}

const ROUTER: Token = Token(0);
const COLLECTOR: Token = Token(1);
const PEER_STATE: Token = Token(2);
const PEER_UPDATES: Token = Token(3);
const PEER_SNAPSHOT: Token = Token(4);
const WAKER: Token = Token(5);
const SIGNALS: Token = Token(6);
const PEER_UPDATES_MONITOR: Token = Token(7);
const PUBLISHER: Token = Token(8);
const ZAP: Token = Token(9);
const PEER_STATE_MONITOR: Token = Token(10);
const PEER_COLLECTOR_MONITOR: Token = Token(11);
const PEER_SNAPSHOT_MONITOR: Token = Token(12);
const DISCOVERY: Token = Token(13);

/// Messages taken from one socket, or one client's snapshot stream, per pass, so that a
/// flood on one cannot starve the others.
const BATCH: usize = 256;

/// The sockets that deliver input, in the order a pass visits them (the discriminant
/// is the index in [`INPUTS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    SnapshotRequests = 0,
    Collector = 1,
    PeerState = 2,
    PeerUpdates = 3,
    PeerSnapshot = 4,
    /// Subscription messages on the publisher (an XPUB).
    Subscriptions = 5,
}

/// The input socket registered under `token`, if any.
fn input_of(token: Token) -> Option<Input> {
    match token {
        ROUTER => Some(Input::SnapshotRequests),
        COLLECTOR => Some(Input::Collector),
        PEER_STATE => Some(Input::PeerState),
        PEER_UPDATES => Some(Input::PeerUpdates),
        PEER_SNAPSHOT => Some(Input::PeerSnapshot),
        PUBLISHER => Some(Input::Subscriptions),
        _ => None,
    }
}

const INPUTS: [Input; 6] = [
    Input::SnapshotRequests,
    Input::Collector,
    Input::PeerState,
    Input::PeerUpdates,
    Input::PeerSnapshot,
    Input::Subscriptions,
];

/// One server of the pair: the core state machine, its sockets and the loop between
/// them. See the [module docs](self).
pub struct ServerHost {
    clock: Clock,
    server: Server,
    endpoints: ServerEndpoints,
    /// The high-water mark of each sync's DEALER ([`ServerOptions::receive_hwm`]).
    receive_hwm: i32,
    poll: Poll,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    // Sockets are dropped before the context (field order), which then terminates
    // without waiting: every socket has linger 0.
    router: ZmqSocket,
    publisher: ZmqSocket,
    collector: ZmqSocket,
    state_publisher: ZmqSocket,
    peer_state: ZmqSocket,
    peer_updates: ZmqSocket,
    /// Connection events of `peer_updates`: a passive re-syncs when it reconnects.
    peer_updates_monitor: ReconnectMonitor,
    /// The monitor's fd signalled since its events were last read.
    peer_updates_monitor_readable: bool,
    peer_collector: ZmqSocket,
    peer_snapshot: Option<ZmqSocket>,
    /// Handshake events of the other sockets connected to the peer: with CURVE, a
    /// process that is not the peer fails there, and is logged.
    peer_state_monitor: ReconnectMonitor,
    peer_collector_monitor: ReconnectMonitor,
    peer_snapshot_monitor: Option<ReconnectMonitor>,
    /// One of the three monitors' fds signalled since their events were last read.
    peer_monitors_readable: bool,
    /// CURVE keys and the ZAP handler that admits connections by them.
    curve: Option<(ServerCurve, ZapHandler)>,
    /// The ZAP socket may have a request waiting.
    zap_readable: bool,
    context: zmq::Context,
    /// Snapshot streams with messages to send, by routing id, each with the message the
    /// client's full pipe refused (sent first when the stream resumes).
    streams: BTreeMap<Vec<u8>, Option<[Frame; FRAME_COUNT]>>,
    limiter: RateLimiter,
    /// The last message received, in libzmq's buffers, reused for the next one.
    frames: Frames,
    /// Per input socket (indexed like [`INPUTS`]): true when it may have something to
    /// read: its fd signalled, or it was last used for anything but a receive that
    /// found nothing. A pass reads only these; see [`ServerHost::turn`].
    maybe_readable: [bool; INPUTS.len()],
    /// Beacons out and in, when discovery is on.
    discovery: Option<Discovery>,
    /// The discovery socket's fd signalled since it was last read empty.
    discovery_readable: bool,
    /// The peer's endpoints come from discovery, not from [`ServerEndpoints`].
    find_peer: bool,
    /// The peer sockets are connected to `endpoints`' peer endpoints (always, unless
    /// the peer is to be discovered and has not been heard yet).
    peer_connected: bool,
    /// When the configured peer endpoints are used if discovery has found no partner.
    peer_fallback_at: Option<Instant>,
    /// The data directory, with `--data-dir`.
    journal: Option<Journal>,
    /// Messages for the publisher that wait until the records before them are written
    /// (and, under `fsync always`, synced): see [`ServerHost::commit`].
    held: Vec<[Frame; FRAME_COUNT]>,
    /// A failure to record, reported by the loop.
    persist_failure: Option<PersistError>,
    /// The copy of the stats other threads read, and when it is next refreshed.
    shared_stats: Option<(Arc<Mutex<ServerStats>>, StdInstant)>,
}

impl ServerHost {
    /// Creates the core server, binds and connects every socket. Fails with a reason
    /// that names the socket and endpoint when, for example, a port is taken.
    pub fn start(options: ServerOptions) -> Result<ServerHost, StartError> {
        let clock = Clock::new();
        // The key of the core's uuid-keyed hash tables: secret and fresh per process, so
        // that no client can compute uuids that collide (core takes it, never draws it).
        let mut hash_key = [0u8; 16];
        getrandom::fill(&mut hash_key)
            .map_err(|error| StartError::Randomness(error.to_string()))?;
        let hash_key = HashKey::from_bytes(hash_key);
        let (server, journal) = match options.persistence {
            None => (
                Server::new(clock.now(), clock.wall(), options.config, hash_key)?,
                None,
            ),
            Some(persistence) => {
                options.config.validate()?;
                let (journal, restored, report) = Journal::open(persistence)?;
                log_restored(&report, &journal, &restored);
                let config = Config {
                    persistence: true,
                    ..options.config
                };
                let server =
                    Server::restore(clock.now(), clock.wall(), config, hash_key, restored)?;
                (server, Some(journal))
            }
        };
        let find_peer = options
            .discovery
            .as_ref()
            .is_some_and(|discovery| discovery.find_peer);
        if find_peer {
            options.endpoints.check_own()?;
        } else {
            options.endpoints.check()?;
        }
        let endpoints = options.endpoints;
        let context = zmq::Context::new();
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);

        let curve = match options.curve {
            Some(keys) => {
                if !curve::available() {
                    return Err(StartError::Curve(KeyError::Unavailable));
                }
                // Before any CURVE socket binds: without a handler libzmq admits every key.
                let zap = ZapHandler::bind(&context).map_err(|error| StartError::Socket {
                    socket: "zap",
                    error,
                })?;
                Some((keys, zap))
            }
            None => None,
        };
        let keys = curve.as_ref().map(|(keys, _)| keys);
        let curve_server = |socket: &ZmqSocket, domain: ZapDomain| match keys {
            Some(keys) => configure(socket, |inner| curve::make_server(inner, &keys.own, domain)),
            None => Ok(()),
        };
        let curve_client = |socket: &ZmqSocket| match keys {
            Some(keys) => configure(socket, |inner| {
                curve::make_client(inner, &keys.own, &keys.peer)
            }),
            None => Ok(()),
        };

        let limits = options.config.limits;
        let router = new_socket(&context, zmq::ROUTER, "snapshot")?;
        curve_server(&router, ZapDomain::Clients)?;
        configure(&router, |socket| {
            socket.set_maxmsgsize(largest_legal_frame(&limits))
        })?;
        configure(&router, |socket| socket.set_router_mandatory(true))?;
        bind(&router, &endpoints.snapshot)?;
        // An XPUB that passes every subscription up (verbose), so that each new
        // subscriber can be sent a HUGZ at once instead of at the next heartbeat.
        let publisher = new_socket(&context, zmq::XPUB, "publisher")?;
        curve_server(&publisher, ZapDomain::Clients)?;
        configure(&publisher, |socket| socket.set_sndhwm(options.hwm))?;
        configure(&publisher, |socket| socket.set_xpub_verbose(true))?;
        configure(&publisher, |socket| {
            socket.set_maxmsgsize(largest_legal_frame(&limits))
        })?;
        bind(&publisher, &endpoints.publisher)?;
        let collector = new_socket(&context, zmq::SUB, "collector")?;
        curve_server(&collector, ZapDomain::Clients)?;
        configure(&collector, |socket| socket.set_rcvhwm(options.receive_hwm))?;
        configure(&collector, |socket| {
            socket.set_maxmsgsize(largest_legal_frame(&limits))
        })?;
        configure(&collector, |socket| socket.set_subscribe(b""))?;
        bind(&collector, &endpoints.collector)?;
        let state_publisher = new_socket(&context, zmq::PUB, "state")?;
        curve_server(&state_publisher, ZapDomain::Peer)?;
        bind(&state_publisher, &endpoints.state)?;

        let peer_state = new_socket(&context, zmq::SUB, "peer state")?;
        curve_client(&peer_state)?;
        let peer_state_monitor = new_monitor(&context, &peer_state, "peer state monitor")?;
        configure(&peer_state, |socket| {
            socket.set_maxmsgsize(largest_legal_frame(&limits))
        })?;
        configure(&peer_state, |socket| socket.set_subscribe(b""))?;
        if !find_peer {
            connect(&peer_state, &endpoints.peer_state)?;
        }
        let peer_updates = new_socket(&context, zmq::SUB, "peer publisher")?;
        curve_client(&peer_updates)?;
        configure(&peer_updates, |socket| {
            socket.set_rcvhwm(options.receive_hwm)
        })?;
        configure(&peer_updates, |socket| {
            socket.set_maxmsgsize(largest_legal_frame(&limits))
        })?;
        configure(&peer_updates, |socket| socket.set_subscribe(b""))?;
        let peer_updates_monitor =
            ReconnectMonitor::new(&context, &peer_updates).map_err(|error| StartError::Socket {
                socket: "peer publisher monitor",
                error,
            })?;
        let peer_collector = new_socket(&context, zmq::PUB, "peer collector")?;
        curve_client(&peer_collector)?;
        let peer_collector_monitor =
            new_monitor(&context, &peer_collector, "peer collector monitor")?;
        configure(&peer_collector, |socket| socket.set_sndhwm(options.hwm))?;
        if !find_peer {
            connect(&peer_updates, &endpoints.peer_publisher)?;
            connect(&peer_collector, &endpoints.peer_collector)?;
        }

        let registry = poll.registry();
        router.register(registry, ROUTER)?;
        collector.register(registry, COLLECTOR)?;
        peer_state.register(registry, PEER_STATE)?;
        peer_updates.register(registry, PEER_UPDATES)?;
        publisher.register(registry, PUBLISHER)?;
        peer_updates_monitor.register(registry, PEER_UPDATES_MONITOR)?;
        peer_state_monitor.register(registry, PEER_STATE_MONITOR)?;
        peer_collector_monitor.register(registry, PEER_COLLECTOR_MONITOR)?;
        if let Some((_, zap)) = &curve {
            zap.socket().register(registry, ZAP)?;
        }
        // Announced only once every port is bound: a peer or client that hears the
        // beacon finds the sockets there.
        let mut peer_fallback_at = None;
        let discovery = match options.discovery {
            Some(discovery) => {
                if find_peer {
                    peer_fallback_at = Some(clock.now() + discovery.options.silence);
                }
                let announcement = Announcement {
                    kind: match server.bstar().role() {
                        Role::Primary => Kind::Primary,
                        Role::Backup => Kind::Backup,
                    },
                    state: Some(server.bstar().state()),
                    base_port: discovery.base_port,
                    state_port: discovery.state_port,
                };
                let mut opened = Discovery::open(clock, discovery.options, announcement)?;
                opened.register(registry, DISCOVERY)?;
                Some(opened)
            }
            None => None,
        };

        Ok(ServerHost {
            clock,
            server,
            endpoints,
            receive_hwm: options.receive_hwm,
            poll,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            router,
            publisher,
            collector,
            state_publisher,
            peer_state,
            peer_updates,
            peer_updates_monitor,
            peer_updates_monitor_readable: true,
            peer_collector,
            peer_snapshot: None,
            peer_state_monitor,
            peer_collector_monitor,
            peer_snapshot_monitor: None,
            peer_monitors_readable: true,
            curve,
            zap_readable: true,
            context,
            streams: BTreeMap::new(),
            limiter: RateLimiter::new(Duration::from_secs(10)),
            frames: Frames::default(),
            maybe_readable: [true; INPUTS.len()],
            discovery,
            discovery_readable: true,
            find_peer,
            peer_connected: !find_peer,
            peer_fallback_at,
            journal,
            held: Vec::new(),
            persist_failure: None,
            shared_stats: None,
        })
    }

    /// A handle that stops [`ServerHost::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: Arc::clone(&self.stop),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Makes SIGINT and SIGTERM stop [`ServerHost::run`] cleanly.
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// The server's stats, shared with other threads: a copy the loop refreshes at its
    /// timers (at least every heartbeat, at most every 200 ms), so that readers never
    /// touch the server itself.
    pub fn share_stats(&mut self) -> Arc<Mutex<ServerStats>> {
        let shared = Arc::new(Mutex::new(self.stats()));
        self.shared_stats = Some((Arc::clone(&shared), StdInstant::now()));
        shared
    }

    /// The server's stats now.
    pub fn stats(&self) -> ServerStats {
        let bstar = self.server.bstar();
        ServerStats {
            role: bstar.role(),
            state: self.server.state(),
            peer_state: bstar.peer_state(),
            peer_alive: bstar.peer_is_alive(self.clock.now()),
            sequence: self.server.sequence(),
            keys: self.server.len(),
            bytes: self.server.map_bytes(),
            pending: self.server.pending_len(),
            sync_backlog: self.server.sync_backlog_len(),
            snapshot_streams: self.server.open_snapshot_streams(),
            syncing: self.server.is_syncing(),
            counters: self.server.counters().clone(),
        }
    }

    fn refresh_shared_stats(&mut self) {
        let now = StdInstant::now();
        let due = match &self.shared_stats {
            Some((_, next)) => *next <= now,
            None => false,
        };
        if !due {
            return;
        }
        let stats = self.stats();
        if let Some((shared, next)) = &mut self.shared_stats {
            // A reader that panicked while holding the lock left no broken state
            // behind: the copy is replaced whole.
            let mut guard = shared
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *guard = stats;
            *next = now + STATS_INTERVAL;
        }
    }

    /// The endpoints in use.
    pub fn endpoints(&self) -> &ServerEndpoints {
        &self.endpoints
    }

    /// The core server (state, sequence, counters).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Serves until stopped by a [`StopHandle`] or a signal. Errors only if the event
    /// loop itself fails; nothing a client or peer sends makes it return.
    pub fn run(&mut self) -> Result<(), RunError> {
        let mut events = Events::with_capacity(64);
        loop {
            self.turn()?;
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let deadline = earliest(
                earliest(
                    self.server.poll_timeout(),
                    self.discovery.as_ref().and_then(Discovery::poll_timeout),
                ),
                self.peer_fallback_at.filter(|_| !self.peer_connected),
            );
            let mut timeout = self.clock.sleep_until(self.clock.now(), deadline);
            if let Some(due) = self.journal.as_ref().and_then(Journal::poll_sync) {
                let until = due.saturating_duration_since(StdInstant::now());
                timeout = Some(timeout.map_or(until, |timeout| timeout.min(until)));
            }
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(RunError::Io(error)),
            }
            for event in events.iter() {
                if let Some(input) = input_of(event.token()) {
                    self.maybe_readable[input as usize] = true;
                }
                match event.token() {
                    PEER_UPDATES_MONITOR => self.peer_updates_monitor_readable = true,
                    PEER_STATE_MONITOR | PEER_COLLECTOR_MONITOR | PEER_SNAPSHOT_MONITOR => {
                        self.peer_monitors_readable = true
                    }
                    ZAP => self.zap_readable = true,
                    _ => {}
                }
                if event.token() == DISCOVERY {
                    self.discovery_readable = true;
                }
                if event.token() == SIGNALS {
                    if let Some(signals) = self.signals.as_mut() {
                        for signal in signals.pending() {
                            tracing::info!(signal, "signal received, shutting down");
                            self.stop.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        if let Some(journal) = self.journal.as_mut() {
            // A clean stop leaves everything recorded synced, whatever the policy.
            journal.commit(StdInstant::now())?;
            journal.sync_now()?;
            let counters = journal.counters();
            tracing::info!(
                records = counters.records,
                log_bytes = counters.log_bytes,
                fsyncs = counters.syncs,
                snapshots = counters.snapshots,
                "data directory closed"
            );
        }
        log_summaries(self.limiter.all_summaries());
        log_counters(self.server.counters(), self.server.bstar().role());
        if let Some(discovery) = &self.discovery {
            log_discovery_counters(discovery);
        }
        Ok(())
    }

    /// One round of work: passes over timers, sockets and snapshot streams until a pass
    /// receives and sends nothing, which is when every socket's edge has been consumed.
    fn turn(&mut self) -> Result<(), RunError> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.commit()?;
            let now = self.clock.now();
            if self.server.poll_timeout().is_some_and(|due| due <= now) {
                self.server.handle_timeout(now, self.clock.wall());
                self.drain_outputs();
                // A send on the publisher may have taken its fd's edge for a
                // subscription that arrived meanwhile (the zmq fd is edge-triggered).
                // Looking at every timer, not after every send, keeps the update path
                // free of an extra receive; a subscription missed that way waits at
                // most until the next heartbeat, as it did before the early HUGZ.
                self.maybe_readable[Input::Subscriptions as usize] = true;
                // The core's timers fire at least every heartbeat: often enough to give
                // out the counts of lines suppressed an interval ago.
                log_summaries(self.limiter.due_summaries(StdInstant::now()));
                self.refresh_shared_stats();
            }
            let mut moved = self.serve_zap()?;
            moved |= self.receive_peer_monitors()?;
            moved |= self.receive_peer_updates_monitor()?;
            moved |= self.pump_discovery();
            moved |= self.receive_pass()?;
            // A snapshot stream reads the map, which must be recorded first.
            self.commit()?;
            let pumped = self.pump_snapshots();
            moved |= pumped.sent;
            if !moved && pumped.refused {
                // A refused send still entered libzmq, which may have consumed the
                // ROUTER's edge for a message that arrived meanwhile: look once more.
                moved = self.receive_pass()?;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// Feeds a reconnect of the SUB on the peer's publisher to the core; true if any
    /// monitor event arrived.
    fn receive_peer_updates_monitor(&mut self) -> Result<bool, RunError> {
        if !self.peer_updates_monitor_readable {
            return Ok(false);
        }
        self.peer_updates_monitor_readable = false;
        let poll = self
            .peer_updates_monitor
            .poll_reconnected()
            .map_err(|error| RunError::Receive {
                socket: "peer publisher monitor",
                error,
            })?;
        self.log_handshake(&poll, "peer publisher");
        if poll.reconnected {
            self.drain_peer_updates()?;
            log_limited!(
                self.limiter,
                "peer_publisher_reconnected",
                tracing::Level::INFO,
                "subscription to the peer's publisher reconnected",
                peer = %self.endpoints.peer_publisher
            );
            self.server
                .handle_peer_publisher_reconnected(self.clock.now(), self.clock.wall());
            self.drain_outputs();
        }
        Ok(poll.received)
    }

    /// Feeds the core every message waiting on the SUB to the peer's publisher. libzmq
    /// queues a reconnecting SUB's messages in one pipe, the old connection's first, so
    /// draining it before reporting a reconnect keeps the old connection's messages
    /// ahead of the report, the order the core relies on (docs/DECISIONS.md).
    fn drain_peer_updates(&mut self) -> Result<(), RunError> {
        self.maybe_readable[Input::PeerUpdates as usize] = true;
        while self.receive_batch(Input::PeerUpdates)? {}
        Ok(())
    }

    /// Answers every waiting ZAP request (CURVE only) and logs each refusal; true if any
    /// was answered.
    fn serve_zap(&mut self) -> Result<bool, RunError> {
        let Some((keys, zap)) = &self.curve else {
            return Ok(false);
        };
        if !self.zap_readable {
            return Ok(false);
        }
        let answered = zap.serve(keys).map_err(|error| RunError::Receive {
            socket: "zap",
            error,
        })?;
        // A reply is a send, which may have taken the fd's edge of the next request.
        self.zap_readable = !answered.is_empty();
        for answer in &answered {
            let domain = String::from_utf8_lossy(&answer.request.domain);
            let key = curve::PublicKey::from_bytes(&answer.request.client_key)
                .map_or_else(|| "(none)".to_string(), |key| key.z85());
            let address = &answer.request.address;
            match answer.decision {
                ZapDecision::Admit => {
                    tracing::debug!(%domain, %address, %key, "CURVE key admitted")
                }
                ZapDecision::NotAdmitted if domain == ZapDomain::Peer.as_str() => log_limited!(
                    self.limiter,
                    "zap_refused/peer",
                    tracing::Level::WARN,
                    "refused a connection to the Binary Star state socket: its CURVE key is not the peer's (--peer-public-key)",
                    %address,
                    %key
                ),
                ZapDecision::NotAdmitted => log_limited!(
                    self.limiter,
                    "zap_refused/clients",
                    tracing::Level::WARN,
                    "refused a client connection: its CURVE key is not admitted (--curve-clients)",
                    %address,
                    %key
                ),
                ZapDecision::NotCurve | ZapDecision::UnknownDomain => log_limited!(
                    self.limiter,
                    "zap_refused/malformed",
                    tracing::Level::WARN,
                    "refused a connection: its ZAP request was not a CURVE request of this server",
                    %domain,
                    %address
                ),
            }
        }
        Ok(!answered.is_empty())
    }

    /// Reads the handshake events of the peer state, peer collector and peer snapshot
    /// sockets and logs each failure; true if any event arrived.
    fn receive_peer_monitors(&mut self) -> Result<bool, RunError> {
        if !self.peer_monitors_readable {
            return Ok(false);
        }
        self.peer_monitors_readable = false;
        let receive = |monitor: &mut ReconnectMonitor, socket: &'static str| {
            monitor
                .poll_reconnected()
                .map_err(|error| RunError::Receive { socket, error })
        };
        let mut polls = vec![
            (
                receive(&mut self.peer_state_monitor, "peer state monitor")?,
                "peer state",
            ),
            (
                receive(&mut self.peer_collector_monitor, "peer collector monitor")?,
                "peer collector",
            ),
        ];
        if let Some(monitor) = self.peer_snapshot_monitor.as_mut() {
            polls.push((receive(monitor, "peer snapshot monitor")?, "peer snapshot"));
        }
        let mut received = false;
        for (poll, socket) in polls {
            received |= poll.received;
            self.log_handshake(&poll, socket);
        }
        Ok(received)
    }

    /// Logs a failed handshake with the peer: nothing from that connection reaches the
    /// core (libzmq passes no message before the handshake succeeds).
    fn log_handshake(&mut self, poll: &MonitorPoll, socket: &'static str) {
        let Some(failure) = poll.handshake_failed else {
            return;
        };
        let endpoint = match socket {
            "peer state" => &self.endpoints.peer_state,
            "peer collector" => &self.endpoints.peer_collector,
            "peer snapshot" => &self.endpoints.peer_snapshot,
            _ => &self.endpoints.peer_publisher,
        };
        let key = format!("peer_handshake_failed/{socket}");
        if self.curve.is_some() {
            log_limited!(
                self.limiter,
                key,
                tracing::Level::ERROR,
                "the process at the peer's endpoint did not prove the peer's CURVE key (a stranger, or the wrong --peer-public-key); nothing it sends is used",
                socket,
                %endpoint,
                reason = %failure
            );
        } else {
            log_limited!(
                self.limiter,
                key,
                tracing::Level::ERROR,
                "the handshake with the peer failed (is the peer configured with CURVE keys and this server not?); nothing it sends is used",
                socket,
                %endpoint,
                reason = %failure
            );
        }
    }

    /// Up to a batch from every input socket; true if anything arrived.
    fn receive_pass(&mut self) -> Result<bool, RunError> {
        let mut received = false;
        for input in INPUTS {
            received |= self.receive_batch(input)?;
        }
        Ok(received)
    }

    /// Feeds up to [`BATCH`] waiting messages from one socket into the core, all with
    /// the time read when the batch began. A batch is short (under a millisecond on an
    /// idle core) next to the timers and ttls, which count in milliseconds and span
    /// seconds, and time still never goes backwards; two clock readings per message
    /// were ~465 of the ~9 600 instructions an update cost this thread
    /// (docs/PERFORMANCE.md).
    fn receive_batch(&mut self, input: Input) -> Result<bool, RunError> {
        let mut received = false;
        if !self.maybe_readable[input as usize] {
            // Untouched since a receive found it empty, and its fd has not signalled:
            // asking libzmq again would only cost a command check (a poll() syscall).
            return Ok(false);
        }
        let time = (self.clock.now(), self.clock.wall());
        for _ in 0..BATCH {
            let socket = match input {
                Input::SnapshotRequests => &self.router,
                Input::Collector => &self.collector,
                Input::PeerState => &self.peer_state,
                Input::PeerUpdates => &self.peer_updates,
                Input::PeerSnapshot => match &self.peer_snapshot {
                    Some(socket) => socket,
                    None => return Ok(received),
                },
                Input::Subscriptions => &self.publisher,
            };
            let mut frames = std::mem::take(&mut self.frames);
            let outcome = socket.try_recv_into(&mut frames);
            match outcome {
                Ok(true) => {}
                Ok(false) => {
                    self.frames = frames;
                    self.maybe_readable[input as usize] = false;
                    return Ok(received);
                }
                Err(error) => {
                    return Err(RunError::Receive {
                        socket: socket.name(),
                        error,
                    })
                }
            };
            received = true;
            self.feed(time, input, frames.get());
            self.drain_outputs_reusing(Some(&mut frames));
            self.frames = frames;
        }
        // One write (and fsync) for the batch: group commit.
        self.commit()?;
        Ok(received)
    }

    /// Writes the records queued since the last call (fsyncing them as the policy says),
    /// then sends what was held for them; compacts the log once it has outgrown the map.
    fn commit(&mut self) -> Result<(), RunError> {
        if let Some(error) = self.persist_failure.take() {
            return Err(RunError::Persist(error));
        }
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        journal.commit(StdInstant::now())?;
        for frames in self.held.drain(..) {
            send_or_log(&self.publisher, &frames, &mut self.limiter);
        }
        if journal.wants_compaction() {
            let started = StdInstant::now();
            let image = self.server.image();
            let bytes = journal.write_image(&image)?;
            tracing::info!(
                keys = image.len(),
                sequence = image.sequence(),
                bytes,
                generation = journal.generation(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "log compacted into a new snapshot"
            );
        }
        Ok(())
    }

    fn feed<F: AsRef<[u8]>>(
        &mut self,
        (now, wall): (Instant, EpochMillis),
        input: Input,
        frames: &[F],
    ) {
        match input {
            Input::SnapshotRequests => {
                // The ROUTER prepends the sender's routing id; it always does, so an
                // empty message cannot arrive, but it costs nothing to be sure.
                if let Some((routing_id, request)) = frames.split_first() {
                    self.server
                        .handle_snapshot_request(now, wall, routing_id.as_ref(), request);
                }
            }
            Input::Collector => self.server.handle_collected(now, wall, frames),
            Input::PeerState => self.server.handle_peer_state(now, wall, frames),
            Input::PeerUpdates => self.server.handle_peer_update(now, wall, frames),
            Input::PeerSnapshot => self.server.handle_peer_snapshot(now, wall, frames),
            Input::Subscriptions => {
                if let Some(message) = frames.first() {
                    self.server.handle_subscription(now, wall, message.as_ref());
                }
            }
        }
    }

    /// Carries out every queued output of the core.
    fn drain_outputs(&mut self) {
        self.drain_outputs_reusing(None);
    }

    /// Carries out every queued output of the core. `received` is the message just fed
    /// to it: a published body with the same bytes as the received one (a KVPUB is the
    /// KVSET with a new sequence) is sent as that received frame, by reference, instead
    /// of being copied into a new libzmq message. Which bytes go out is the core's
    /// decision alone; this only chooses the cheapest buffer that holds them.
    fn drain_outputs_reusing(&mut self, mut received: Option<&mut Frames>) {
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::Persist(record) => {
                    if let Some(journal) = self.journal.as_mut() {
                        journal.append(&record);
                    }
                }
                Output::PersistImage(image) => self.record_image(&image),
                Output::Publish(frames)
                    if !self.held.is_empty()
                        || self.journal.as_ref().is_some_and(Journal::has_pending) =>
                {
                    // Revealed only once what it covers is recorded (`commit`).
                    self.held.push(frames);
                }
                Output::Publish(frames) => {
                    let [.., body] = &frames;
                    let last = received
                        .as_deref_mut()
                        .and_then(|received| received.take_if_equal(FRAME_COUNT - 1, body));
                    send_or_log_reusing(&self.publisher, &frames, last, &mut self.limiter);
                }
                Output::SnapshotReady { routing_id } => {
                    self.streams.entry(routing_id).or_insert(None);
                }
                Output::SendStateToPeer(frame) => {
                    send_or_log(&self.state_publisher, &[frame], &mut self.limiter);
                }
                Output::RequestPeerSnapshot(frames) => self.request_peer_snapshot(&frames),
                Output::ForwardToPeerCollector(frames) => {
                    send_or_log(&self.peer_collector, &frames, &mut self.limiter);
                }
                Output::Event(event) => {
                    if let Event::SnapshotStreamAbandoned { routing_id, .. } = &event {
                        // The core closed every stream of this client: forget the
                        // message we were holding for it too.
                        self.streams.remove(routing_id);
                    }
                    let role_conflict = self.server.bstar().role_conflict();
                    log_event(&event, &mut self.limiter, role_conflict);
                }
            }
        }
    }

    /// Records the whole map the core replaced (a full sync) as the next snapshot.
    fn record_image(&mut self, image: &clonekv_core::server::persist::Image) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        if self.persist_failure.is_some() {
            return;
        }
        let started = StdInstant::now();
        match journal.write_image(image) {
            Ok(bytes) => tracing::info!(
                keys = image.len(),
                sequence = image.sequence(),
                bytes,
                generation = journal.generation(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "the map was replaced (a sync from the active): recorded as a new snapshot"
            ),
            Err(error) => self.persist_failure = Some(error),
        }
    }

    /// Announces the current Binary Star state, reads beacons and follows the partner
    /// they reveal; true while more beacons may be waiting.
    fn pump_discovery(&mut self) -> bool {
        let Some(discovery) = self.discovery.as_mut() else {
            return false;
        };
        let now = self.clock.now();
        discovery.set_state(self.server.bstar().state());
        if !self.peer_connected && self.peer_fallback_at.is_some_and(|due| due <= now) {
            self.connect_fallback_peer();
            return true;
        }
        let due = discovery.poll_timeout().is_some_and(|due| due <= now);
        if !self.discovery_readable && !due {
            return false;
        }
        let more = discovery.pump();
        self.discovery_readable = more;
        let mut heard_change = false;
        while let Some(event) = discovery.poll_event() {
            log_discovery_event(&event);
            heard_change = true;
        }
        if heard_change && self.find_peer {
            self.follow_partner();
        }
        more
    }

    /// Connects the peer sockets to the configured peer endpoints: no partner announced
    /// itself within the silence timeout.
    fn connect_fallback_peer(&mut self) {
        for (socket, endpoint) in [
            (&self.peer_state, &self.endpoints.peer_state),
            (&self.peer_updates, &self.endpoints.peer_publisher),
            (&self.peer_collector, &self.endpoints.peer_collector),
        ] {
            if let Err(error) = socket.inner().connect(endpoint) {
                tracing::error!(socket = socket.name(), %endpoint, %error, "cannot connect to the configured peer");
            }
        }
        tracing::info!(
            peer_snapshot = %self.endpoints.peer_snapshot,
            peer_state = %self.endpoints.peer_state,
            "discovery: no partner announced itself; using the configured peer endpoints until one does"
        );
        self.peer_connected = true;
    }

    /// Connects the peer sockets to the partner discovery found, when it is new or has
    /// moved. A partner that goes silent stays connected: libzmq reconnects when it comes
    /// back at the same address, and Binary Star judges its liveness.
    fn follow_partner(&mut self) {
        let Some(discovery) = &self.discovery else {
            return;
        };
        let Some(partner) = discovery.beacon().partner() else {
            return;
        };
        let kind = partner.announcement.kind;
        if discovery.beacon().servers_of_kind(kind) > 1 {
            log_limited!(
                self.limiter,
                "discovery_two_partners",
                tracing::Level::WARN,
                "discovery: more than one server of the partner's role in this cluster; pairing with the lowest instance id. Give each pair its own --cluster",
                role = kind_name(kind),
                count = discovery.beacon().servers_of_kind(kind)
            );
        }
        let found = ServerEndpoints::with_ports(
            "*",
            1,
            1,
            &endpoint_host(partner.address),
            partner.announcement.base_port,
            partner.announcement.state_port,
        );
        if self.peer_connected
            && found.peer_state == self.endpoints.peer_state
            && found.peer_snapshot == self.endpoints.peer_snapshot
        {
            return;
        }
        let pairs: [(&ZmqSocket, String, String); 3] = [
            (
                &self.peer_state,
                self.endpoints.peer_state.clone(),
                found.peer_state.clone(),
            ),
            (
                &self.peer_updates,
                self.endpoints.peer_publisher.clone(),
                found.peer_publisher.clone(),
            ),
            (
                &self.peer_collector,
                self.endpoints.peer_collector.clone(),
                found.peer_collector.clone(),
            ),
        ];
        for (socket, old, new) in pairs {
            if self.peer_connected {
                // Fails only if it was never connected there; nothing to undo then.
                let _ = socket.inner().disconnect(&old);
            }
            if let Err(error) = socket.inner().connect(&new) {
                tracing::error!(socket = socket.name(), endpoint = %new, %error, "discovery: cannot connect to the partner");
            }
        }
        tracing::info!(
            role = kind_name(kind),
            snapshot = %found.peer_snapshot,
            state = %found.peer_state,
            "discovery: connected to the partner"
        );
        self.endpoints.peer_snapshot = found.peer_snapshot;
        self.endpoints.peer_publisher = found.peer_publisher;
        self.endpoints.peer_collector = found.peer_collector;
        self.endpoints.peer_state = found.peer_state;
        self.peer_connected = true;
    }

    /// Sends ICANHAZ? to the peer on a fresh DEALER, so that a late reply to an earlier
    /// request can never be read as part of this one.
    fn request_peer_snapshot(&mut self, frames: &[Vec<u8>]) {
        if !self.peer_connected {
            // The core asks again after peer_sync_timeout; by then the partner may have
            // been heard.
            log_limited!(
                self.limiter,
                "peer_snapshot/undiscovered",
                tracing::Level::INFO,
                "the peer's snapshot is wanted but discovery has not found the peer yet"
            );
            return;
        }
        if let Some(old) = self.peer_snapshot.take() {
            if let Err(error) = old.deregister(self.poll.registry()) {
                log_limited!(
                    self.limiter,
                    "peer_snapshot/deregister",
                    tracing::Level::WARN,
                    "cannot deregister the old peer snapshot socket",
                    %error
                );
            }
        }
        let dealer = match self.new_peer_dealer() {
            Ok(dealer) => dealer,
            Err(error) => {
                // The core asks again after peer_sync_timeout.
                log_limited!(
                    self.limiter,
                    "peer_snapshot/open",
                    tracing::Level::ERROR,
                    "cannot open a socket to request the peer's snapshot",
                    %error
                );
                return;
            }
        };
        send_or_log(&dealer, frames, &mut self.limiter);
        self.peer_snapshot = Some(dealer);
        self.maybe_readable[Input::PeerSnapshot as usize] = true;
    }

    fn new_peer_dealer(&mut self) -> Result<ZmqSocket, StartError> {
        let dealer = new_socket(&self.context, zmq::DEALER, "peer snapshot")?;
        if let Some((keys, _)) = &self.curve {
            configure(&dealer, |inner| {
                curve::make_client(inner, &keys.own, &keys.peer)
            })?;
        }
        let monitor = new_monitor(&self.context, &dealer, "peer snapshot monitor")?;
        monitor.register(self.poll.registry(), PEER_SNAPSHOT_MONITOR)?;
        if let Some(old) = self.peer_snapshot_monitor.replace(monitor) {
            if let Err(error) = old.deregister(self.poll.registry()) {
                tracing::debug!(%error, "cannot deregister the old peer snapshot monitor");
            }
        }
        configure(&dealer, |socket| socket.set_rcvhwm(self.receive_hwm))?;
        let largest = largest_legal_frame(&self.server.config().limits);
        configure(&dealer, |socket| socket.set_maxmsgsize(largest))?;
        connect(&dealer, &self.endpoints.peer_snapshot)?;
        dealer.register(self.poll.registry(), PEER_SNAPSHOT)?;
        Ok(dealer)
    }

    /// Sends snapshot replies: for each client with an open stream, its held message
    /// first, then fresh ones from the core, up to [`BATCH`], until its pipe is full or
    /// the stream ends.
    fn pump_snapshots(&mut self) -> Pumped {
        let mut pumped = Pumped::default();
        let routing_ids: Vec<Vec<u8>> = self.streams.keys().cloned().collect();
        for routing_id in routing_ids {
            let mut held = self.streams.get_mut(&routing_id).and_then(Option::take);
            let mut finished = false;
            // One reading per batch: the core only uses it for the stall timer.
            let now = self.clock.now();
            for _ in 0..BATCH {
                let message = match held.take() {
                    Some(message) => message,
                    None => match self.server.poll_snapshot(now, &routing_id) {
                        Some(message) => message,
                        None => {
                            finished = true;
                            break;
                        }
                    },
                };
                let [key, sequence, uuid, properties, body] = &message;
                let frames: [&[u8]; FRAME_COUNT + 1] = [
                    &routing_id,
                    key.as_bytes(),
                    sequence.as_bytes(),
                    uuid.as_bytes(),
                    properties.as_bytes(),
                    body.as_bytes(),
                ];
                // Any send, even a refused one, enters libzmq and may consume the
                // ROUTER's edge for a request that arrived meanwhile: read it again.
                self.maybe_readable[Input::SnapshotRequests as usize] = true;
                match self.router.send(&frames) {
                    Ok(SendOutcome::Sent) => pumped.sent = true,
                    Ok(SendOutcome::WouldBlock) => {
                        pumped.refused = true;
                        held = Some(message);
                        break;
                    }
                    Ok(SendOutcome::Unreachable) => {
                        pumped.refused = true;
                        self.server.cancel_snapshot(&routing_id);
                        finished = true;
                        break;
                    }
                    Err(error) => {
                        pumped.refused = true;
                        log_limited!(
                            self.limiter,
                            "snapshot_reply/send",
                            tracing::Level::WARN,
                            "cannot send a snapshot reply; closing that stream",
                            %error
                        );
                        self.server.cancel_snapshot(&routing_id);
                        finished = true;
                        break;
                    }
                }
            }
            if finished {
                self.streams.remove(&routing_id);
            } else if let Some(slot) = self.streams.get_mut(&routing_id) {
                *slot = held;
            }
            self.drain_outputs();
        }
        pumped
    }
}

/// What one round of snapshot sending did.
#[derive(Clone, Copy, Debug, Default)]
struct Pumped {
    /// At least one message went out.
    sent: bool,
    /// At least one send was refused (full pipe, gone client, error).
    refused: bool,
}

fn new_socket(
    context: &zmq::Context,
    kind: zmq::SocketType,
    name: &'static str,
) -> Result<ZmqSocket, StartError> {
    ZmqSocket::new(context, kind, name).map_err(|error| StartError::Socket {
        socket: name,
        error,
    })
}

fn new_monitor(
    context: &zmq::Context,
    socket: &ZmqSocket,
    name: &'static str,
) -> Result<ReconnectMonitor, StartError> {
    ReconnectMonitor::new(context, socket).map_err(|error| StartError::Socket {
        socket: name,
        error,
    })
}

fn configure(
    socket: &ZmqSocket,
    option: impl FnOnce(&zmq::Socket) -> Result<(), zmq::Error>,
) -> Result<(), StartError> {
    option(socket.inner()).map_err(|error| StartError::Socket {
        socket: socket.name(),
        error,
    })
}

fn bind(socket: &ZmqSocket, endpoint: &str) -> Result<(), StartError> {
    socket
        .inner()
        .bind(endpoint)
        .map_err(|error| StartError::Bind {
            socket: socket.name(),
            endpoint: endpoint.to_string(),
            error,
        })
}

fn connect(socket: &ZmqSocket, endpoint: &str) -> Result<(), StartError> {
    socket
        .inner()
        .connect(endpoint)
        .map_err(|error| StartError::Connect {
            socket: socket.name(),
            endpoint: endpoint.to_string(),
            error,
        })
}

/// One log line per fact worth a line. Every line that input or a condition can repeat
/// goes through the rate limiter (one line per key per interval, then a summary with
/// the count), keyed by the kind of fact and never by anything a client chooses.
/// `role_conflict` is whether this server's peer has its role (see
/// [`Event::RoleConflict`]), to say why clients are rejected.
fn log_event(event: &Event, limiter: &mut RateLimiter, role_conflict: bool) {
    use tracing::Level;
    match event {
        Event::StateChanged { from, to, cause } => {
            let key = format!("state_changed/{from}/{to}");
            if *from == BstarState::Passive && *to == BstarState::Active {
                log_limited!(limiter, key, Level::WARN, "failover: this server is now active", %from, %to, %cause);
            } else {
                log_limited!(limiter, key, Level::INFO, "state changed", %from, %to, %cause);
            }
        }
        Event::DualActive { stepped_down: true } => log_limited!(
            limiter,
            "dual_active/stepped_down",
            Level::ERROR,
            "dual active (split brain healed): this backup steps down, forwards its updates to the primary and re-syncs"
        ),
        Event::DualActive { stepped_down: false } => log_limited!(
            limiter,
            "dual_active/stays",
            Level::ERROR,
            "dual active (split brain healed): the backup was active too; this primary keeps serving"
        ),
        Event::DualPassive { took_over: true } => log_limited!(
            limiter,
            "dual_passive/took_over",
            Level::ERROR,
            "dual passive: both servers were passive; this primary takes over"
        ),
        Event::DualPassive { took_over: false } => log_limited!(
            limiter,
            "dual_passive/stays",
            Level::ERROR,
            "dual passive: both servers were passive; the primary takes over"
        ),
        Event::RoleConflict { role: Role::Primary } => log_limited!(
            limiter,
            "role_conflict",
            Level::ERROR,
            "both servers are configured as primary: start one of them with --backup (until then neither serves any client)",
            role = %Role::Primary
        ),
        Event::RoleConflict { role: Role::Backup } => log_limited!(
            limiter,
            "role_conflict",
            Level::ERROR,
            "both servers are configured as backup: start one of them without --backup, as the primary (until then neither serves any client)",
            role = %Role::Backup
        ),
        Event::InputDropped { source, reason } => {
            let routine = matches!(
                reason,
                DropReason::DuplicateUuid | DropReason::StaleSequence
            );
            if routine && !tracing::enabled!(Level::DEBUG) {
                // Counted by the core; nothing to log, so no key to build.
                return;
            }
            let key = format!("{source}/{}", reason.as_str());
            match reason {
                DropReason::NotActive if role_conflict => log_limited!(
                    limiter,
                    key,
                    Level::INFO,
                    "client rejected: this server is not active, and cannot become active while its peer has the same role (see the ERROR above)"
                ),
                DropReason::NotActive => log_limited!(
                    limiter,
                    key,
                    Level::INFO,
                    "client rejected: this server is not active (or is passive while the active is alive)"
                ),
                DropReason::MapFullKeys => log_limited!(
                    limiter,
                    key,
                    Level::WARN,
                    "write refused: the map holds --max-keys keys (the writer sees no commit)"
                ),
                DropReason::MapFullBytes => log_limited!(
                    limiter,
                    key,
                    Level::WARN,
                    "write refused: the map would pass --max-bytes (the writer sees no commit)"
                ),
                DropReason::TooManySnapshotStreams => log_limited!(
                    limiter,
                    key,
                    Level::WARN,
                    "client rejected: too many snapshot streams open (see --max-snapshot-streams)"
                ),
                DropReason::StaleSequence => log_limited!(
                    limiter,
                    key,
                    Level::DEBUG,
                    "dropped an update this server already has",
                    %source
                ),
                // Routine in a pair: a client's copy that reaches the passive after the
                // active's echo, a forward the primary already published, a retry.
                DropReason::DuplicateUuid => log_limited!(
                    limiter,
                    key,
                    Level::DEBUG,
                    "dropped an update already published (same uuid)",
                    %source
                ),
                other => log_limited!(
                    limiter,
                    key,
                    Level::WARN,
                    "dropped input",
                    %source,
                    reason = %other
                ),
            }
        }
        Event::SyncStarted { reason } => {
            let key = match reason {
                SyncReason::BecamePassive => "sync_started/became_passive",
                SyncReason::PeerBecameActive => "sync_started/peer_became_active",
                SyncReason::SequenceGap { .. } => "sync_started/sequence_gap",
                SyncReason::Timeout => "sync_started/timeout",
                SyncReason::BacklogOverflow => "sync_started/backlog_overflow",
                SyncReason::PublisherReconnected => "sync_started/publisher_reconnected",
                SyncReason::ResumeTooLarge => "sync_started/resume_too_large",
                SyncReason::ReplyMisread => "sync_started/reply_misread",
            };
            log_limited!(limiter, key, Level::INFO, "syncing from the active peer", reason = ?reason)
        }
        Event::SyncCompleted {
            sequence,
            keys,
            resumed: None,
        } => log_limited!(
            limiter,
            "sync_completed",
            Level::INFO,
            "synced from the active peer (full snapshot); following it",
            sequence,
            keys
        ),
        Event::SyncCompleted {
            sequence,
            keys,
            resumed: Some((after, changes)),
        } => log_limited!(
            limiter,
            "sync_completed",
            Level::INFO,
            "synced from the active peer by resuming (only the changes after this map, no full snapshot); following it",
            resumed_after = after,
            changes,
            sequence,
            keys
        ),
        Event::ResumeAnswered {
            after,
            changes: Some(changes),
        } => log_limited!(
            limiter,
            "resume_answered/served",
            Level::INFO,
            "the peer resumes: sending the changes after its sequence",
            after,
            changes
        ),
        Event::ResumeAnswered {
            after,
            changes: None,
        } => log_limited!(
            limiter,
            "resume_answered/refused",
            Level::INFO,
            "the peer asked to resume but its position is not in this server's recent history; sending a full snapshot",
            after
        ),
        Event::SyncAbandoned {
            merged_entries,
            applied_updates,
        } => log_limited!(
            limiter,
            "sync_abandoned",
            Level::WARN,
            "became active in the middle of a sync; kept what had arrived",
            merged_entries,
            applied_updates
        ),
        Event::PendingReplayed {
            replayed,
            skipped_superseded,
            skipped_expired,
        } => log_limited!(
            limiter,
            "pending_replayed",
            Level::WARN,
            "replayed pending client updates after failover",
            replayed,
            skipped_superseded,
            skipped_expired
        ),
        Event::PendingEvicted {
            client_copies,
            echoes,
            reason,
        } => {
            let key = match reason {
                EvictionReason::Size => "pending_evicted/size",
                EvictionReason::Age => "pending_evicted/age",
            };
            log_limited!(
                limiter,
                key,
                Level::WARN,
                "pending list bound reached: entries dropped without replay",
                client_copies,
                echoes,
                reason = ?reason
            )
        }
        Event::SplitUpdatesForwarded { forwarded, lost } => log_limited!(
            limiter,
            "split_updates_forwarded",
            Level::ERROR,
            "forwarded updates accepted while split to the primary",
            forwarded,
            lost
        ),
        Event::SnapshotStreamAbandoned { routing_id, reason } => {
            let client = hex(routing_id);
            match reason {
                AbandonReason::Stalled => log_limited!(
                    limiter,
                    "snapshot_abandoned/stalled",
                    Level::WARN,
                    "snapshot stream closed: the client took nothing for too long",
                    client
                ),
                AbandonReason::Cancelled => log_limited!(
                    limiter,
                    "snapshot_abandoned/cancelled",
                    Level::INFO,
                    "snapshot stream closed: the client disconnected",
                    client
                ),
                AbandonReason::NoLongerActive => log_limited!(
                    limiter,
                    "snapshot_abandoned/no_longer_active",
                    Level::INFO,
                    "snapshot stream closed: this server is no longer active",
                    client
                ),
            }
        }
        Event::SyncBufferDropped { dropped } => log_limited!(
            limiter,
            "sync_buffer_dropped",
            Level::WARN,
            "sync buffer at its bound (--sync-backlog-max, --sync-backlog-max-bytes): buffered updates of the active let go; the next snapshot brings them",
            dropped
        ),
        other => tracing::debug!(event = ?other, "server event"),
    }
}

/// The totals since start, at shutdown.
fn log_counters(counters: &Counters, role: Role) {
    tracing::info!(
        published = counters.published,
        expired = counters.expired,
        snapshots = counters.snapshots_completed,
        dropped = counters.dropped_total(),
        pending_evicted = counters.pending_evicted,
        sync_buffered_dropped = counters.sync_buffered_dropped,
        split_lost = counters.split_lost,
        role_conflicts = counters.role_conflicts,
        "stopped"
    );
    for (source, reason, count) in counters.dropped_by_reason() {
        tracing::info!(%source, reason, count, "inputs dropped since start");
    }
    if counters.role_conflicts > 0 {
        tracing::error!(
            role_conflicts = counters.role_conflicts,
            %role,
            "the peer announced this server's own role: both servers were configured as {role}"
        );
    }
}

/// What was read back from the data directory at start.
fn log_restored(
    report: &OpenReport,
    journal: &Journal,
    restored: &clonekv_core::server::persist::Restored,
) {
    let dir = journal.options().dir.display();
    let fsync = journal.options().fsync.as_str();
    if report.fresh {
        tracing::info!(%dir, fsync, "data directory is new: starting with an empty map");
    } else {
        tracing::info!(
            %dir,
            fsync,
            keys = restored.len(),
            sequence = restored.sequence(),
            snapshot_keys = report.snapshot_keys,
            log_records = report.log_records,
            generation = report.generation,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "restored the map from the data directory"
        );
    }
    if let Some(cut) = &report.cut {
        tracing::warn!(
            file = %cut.path.display(),
            offset = cut.offset,
            bytes = cut.bytes,
            reason = %cut.reason,
            "cut a torn or damaged tail off the log; every whole record before it was restored"
        );
    }
    for path in &report.removed {
        tracing::info!(file = %path.display(), "removed a file left by an interrupted compaction");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Primary => "primary",
        Kind::Backup => "backup",
        Kind::Client => "client",
    }
}

/// A line per change in the table of discovered peers (each is rare: a node starting,
/// stopping or moving).
fn log_discovery_event(event: &PeerEvent) {
    match event {
        PeerEvent::PeerUp(peer) | PeerEvent::PeerChanged(peer) => {
            let what = if matches!(event, PeerEvent::PeerUp(_)) {
                "discovery: peer up"
            } else {
                "discovery: peer changed"
            };
            tracing::info!(
                instance = %short_instance(&peer.instance),
                role = kind_name(peer.announcement.kind),
                address = %peer.address,
                base_port = peer.announcement.base_port,
                state_port = peer.announcement.state_port,
                state = ?peer.announcement.state,
                "{what}"
            );
        }
        PeerEvent::PeerDown { instance } => {
            tracing::info!(instance = %short_instance(instance), "discovery: peer down (no beacon within the silence timeout)");
        }
    }
}

/// The first four bytes of an instance id in hex: enough to tell nodes apart in a log.
pub(crate) fn short_instance(instance: &[u8; 16]) -> String {
    instance
        .iter()
        .take(4)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Discovery's counters, once at shutdown: beacons sent and every reason a received one
/// was dropped.
fn log_discovery_counters(discovery: &Discovery) {
    use clonekv_core::beacon::DropReason;
    let (sent, send_failures) = discovery.sent();
    let dropped = |reason: DropReason| discovery.dropped(reason);
    tracing::info!(
        sent,
        send_failures,
        bad_length = dropped(DropReason::BadLength),
        bad_magic = dropped(DropReason::BadMagic),
        unknown_version = dropped(DropReason::UnknownVersion),
        bad_field = dropped(DropReason::BadField),
        other_cluster = dropped(DropReason::OtherCluster),
        own_beacon = dropped(DropReason::OwnBeacon),
        "discovery counters"
    );
}
