//! `clonekvd`: one server of a clonekv Binary Star pair.
//!
//! With no arguments it serves as the primary on the zguide's default ports; `--backup`
//! starts the backup. Every endpoint, timing and limit can be set by a flag or in a TOML
//! file given with `--config` (flags win). See `clonekvd --help`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, ValueEnum};
use clonekv_zmq::client::ServerAddress;
use clonekv_zmq::core::beacon::Kind;
use clonekv_zmq::core::bstar::Role;
use clonekv_zmq::core::server::Config;
use clonekv_zmq::curve::{self, KeyError, KeyPair, PublicKey, ServerCurve};
use clonekv_zmq::discovery::{
    DiscoveryError, DiscoveryOptions, DEFAULT_CLUSTER, DEFAULT_DISCOVERY_PORT,
};
use clonekv_zmq::duration::HumanDuration;
use clonekv_zmq::endpoint::EndpointError;
use clonekv_zmq::http::{GatewayCurve, HttpError, HttpOptions};
use clonekv_zmq::persist::{FsyncPolicy, PersistOptions, DEFAULT_COMPACT_MIN_BYTES};
use clonekv_zmq::server::{
    hwm_for_queue_bytes, ServerDiscovery, ServerEndpoints, ServerHost, ServerOptions, StartError,
    DEFAULT_HWM, DEFAULT_QUEUE_BYTES,
};

/// Exit status when the configuration (flags or file) is unusable, on any host or on
/// this one.
const EXIT_CONFIG: u8 = 2;
/// Exit status when the server cannot start (a port is taken) or its loop fails.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "clonekvd",
    version,
    about = "clonekv server: a replicated key-value store speaking the ZeroMQ Clone protocol with Binary Star failover",
    long_about = "clonekv server: a replicated key-value store speaking the ZeroMQ Clone protocol \
(CHP) with Binary Star failover.\n\n\
With no arguments it serves as the primary: ROUTER on tcp://*:5556 (snapshots), PUB on \
5557 (updates), SUB on 5558 (collector), Binary Star state PUB on 5003, and it expects a \
backup on localhost:5566 / 5004. `--backup` starts the backup on 5566-5568 and 5004, with \
the primary at localhost:5556 / 5003. A lone primary starts serving on the first client \
request once its peer has been silent for two heartbeats.\n\n\
Discovery is on by default: the server announces itself by UDP broadcast (port 5560, \
cluster \"clonekv\") and, unless a --peer-* option is given, connects to the server of \
the other role that its cluster's beacons reveal, on this host or anywhere on the LAN; \
with no such beacon within 4 s it uses the peer endpoints above until one comes. \
--no-discovery turns it off.\n\n\
With --http IP:PORT it also serves a JSON/HTTP gateway to the pair (GET/PUT/DELETE \
/v1/kv/KEY, /v1/kv?prefix=, Server-Sent Events on /v1/watch, /v1/status, /healthz) and \
Prometheus metrics on /metrics; --metrics IP:PORT serves /metrics alone. Both are off by \
default.",
    after_help = "Every option can also be set in the --config file under its long name \
(for example `port = 5566`, `heartbeat = \"200ms\"`, `role = \"backup\"`); flags win over \
the file. Durations take a unit: 250ms, 1.5s, 2m (a bare number is seconds).\n\n\
Security: without --curve-secret-key every socket is plain ZMTP, as in the zguide: \
anyone who reaches the ports can read and write every key and change the Binary Star \
state. With it (and --curve-clients, --peer-public-key) every socket uses CURVE; the \
three also come from CLONEKVD_CURVE_SECRET_KEY, CLONEKVD_CURVE_CLIENTS and \
CLONEKVD_PEER_PUBLIC_KEY, which win over the file. See docs/SECURITY.md.\n\n\
Logs go to stderr; set RUST_LOG (for example RUST_LOG=debug) to change the level.\n\
Exit status: 0 after SIGINT/SIGTERM, 1 when it cannot start (a port is taken) or fails, \
2 for a bad option or config file, ports that clash, a peer host that does not resolve, \
a --bind-host that is not this host's, or a --data-dir this build cannot use (another \
format version, a damaged snapshot)."
)]
struct Cli {
    /// Start as the backup (same as `--role backup`).
    #[arg(long, conflicts_with = "role")]
    backup: bool,

    /// Read settings from this TOML file; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: Settings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum RoleName {
    Primary,
    Backup,
}

/// When the data directory's log is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum FsyncName {
    /// Before an update is published: a confirmed write survives a power cut.
    Always,
    /// Every --fsync-interval: a power cut loses at most that much.
    Batch,
    /// Left to the kernel: a power cut loses what it had not written back.
    Never,
}

/// Everything that can come from a flag or the config file. Unset means "the default
/// for the role".
#[derive(Args, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Settings {
    /// Role in the pair [default: primary].
    #[arg(long, value_enum)]
    role: Option<RoleName>,

    /// Address to bind the server's ports on [default: * (every interface)].
    #[arg(long, value_name = "HOST", help_heading = "Endpoints")]
    bind_host: Option<String>,
    /// Base port P: ROUTER on P, PUB on P+1, collector SUB on P+2 [default: 5556; backup 5566].
    #[arg(long, value_name = "P", help_heading = "Endpoints")]
    port: Option<u16>,
    /// Port of this server's Binary Star state PUB [default: 5003; backup 5004].
    #[arg(long, value_name = "PORT", help_heading = "Endpoints")]
    state_port: Option<u16>,
    /// Host of the peer server [default: localhost].
    #[arg(long, value_name = "HOST", help_heading = "Endpoints")]
    peer_host: Option<String>,
    /// The peer's base port P [default: 5566; backup 5556].
    #[arg(long, value_name = "P", help_heading = "Endpoints")]
    peer_port: Option<u16>,
    /// Port of the peer's Binary Star state PUB [default: 5004; backup 5003].
    #[arg(long, value_name = "PORT", help_heading = "Endpoints")]
    peer_state_port: Option<u16>,
    /// Full endpoint for the snapshot ROUTER (overrides --bind-host/--port).
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    snapshot_endpoint: Option<String>,
    /// Full endpoint for the update PUB.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    publisher_endpoint: Option<String>,
    /// Full endpoint for the collector SUB.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    collector_endpoint: Option<String>,
    /// Full endpoint for the Binary Star state PUB.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    state_endpoint: Option<String>,
    /// Full endpoint of the peer's snapshot ROUTER (to connect to).
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    peer_snapshot_endpoint: Option<String>,
    /// Full endpoint of the peer's update PUB.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    peer_publisher_endpoint: Option<String>,
    /// Full endpoint of the peer's collector SUB.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    peer_collector_endpoint: Option<String>,
    /// Full endpoint of the peer's Binary Star state PUB.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Endpoints")]
    peer_state_endpoint: Option<String>,

    /// Interval of Binary Star state messages and HUGZ heartbeats [default: 1s].
    #[arg(long, value_name = "DURATION", help_heading = "Timing")]
    heartbeat: Option<HumanDuration>,
    /// Heartbeats without a word from the peer before it counts as dead [default: 2].
    #[arg(long, value_name = "N", help_heading = "Timing")]
    peer_expiry_beats: Option<u32>,
    /// Age after which a passive drops a client update the active never echoed [default: 30s].
    #[arg(long, value_name = "DURATION", help_heading = "Timing")]
    pending_max_age: Option<HumanDuration>,
    /// A client that takes no snapshot message for this long loses its stream [default: 30s].
    #[arg(long, value_name = "DURATION", help_heading = "Timing")]
    snapshot_stall_timeout: Option<HumanDuration>,
    /// A passive re-requests the peer's snapshot after this long without a reply [default: 5s].
    #[arg(long, value_name = "DURATION", help_heading = "Timing")]
    peer_sync_timeout: Option<HumanDuration>,

    /// Longest key (and subtree) accepted, in bytes [default: 255].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    max_key_len: Option<usize>,
    /// Largest value accepted, in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    max_body_len: Option<usize>,
    /// Largest properties frame accepted, in bytes [default: 4096].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    max_properties_len: Option<usize>,
    /// Most client updates a passive holds for a failover [default: 100000].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pending_max_len: Option<usize>,
    /// Most bytes of client updates a passive holds for a failover [default: 96MiB].
    #[arg(long, value_name = "SIZE", help_heading = "Limits")]
    pending_max_bytes: Option<ByteSize>,
    /// Most snapshot streams open at once; further requests wait for a retry [default: 64].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    max_snapshot_streams: Option<usize>,
    /// Entries read from the map per step of a snapshot stream [default: 256].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    snapshot_batch: Option<usize>,
    /// Updates a syncing passive buffers before it starts the sync over [default: 100000].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    sync_backlog_max: Option<usize>,
    /// Bytes a syncing passive buffers before it starts the sync over [default: 64MiB].
    #[arg(long, value_name = "SIZE", help_heading = "Limits")]
    sync_backlog_max_bytes: Option<ByteSize>,
    /// Keys an active backup records to forward after a split brain [default: 100000].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    split_log_max: Option<usize>,
    /// Bytes libzmq may queue per connection on each receiving socket (collector, peer
    /// publisher, sync): the high-water mark is this over the largest message the size
    /// limits allow, 15 at the defaults; a full pipe pushes back on its sender [default: 16MiB].
    #[arg(long, value_name = "SIZE", help_heading = "Limits")]
    queue_bytes: Option<ByteSize>,
    /// Messages queued per subscriber on the publisher (and towards the peer's
    /// collector) before libzmq drops [default: 100000].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    hwm: Option<i32>,

    /// Record every change in this directory and start from what it holds (created if
    /// missing; one directory per server) [default: none, memory only].
    #[arg(long, value_name = "DIR", help_heading = "Persistence")]
    data_dir: Option<PathBuf>,
    /// When the log is fsynced. Under every policy an update is written to the log
    /// before it is published, so a confirmed write survives the process being killed;
    /// on a power cut `always` loses nothing confirmed, `batch` at most the last
    /// --fsync-interval, `never` what the kernel had not yet written [default: always].
    #[arg(long, value_enum, value_name = "POLICY", help_heading = "Persistence")]
    fsync: Option<FsyncName>,
    /// Under --fsync batch, the longest time a written record waits for its fsync
    /// [default: 1s].
    #[arg(long, value_name = "DURATION", help_heading = "Persistence")]
    fsync_interval: Option<HumanDuration>,
    /// Compact (write a snapshot of the map and start a new log) once the log is larger
    /// than this and than the last snapshot [default: 67108864].
    #[arg(long, value_name = "BYTES", help_heading = "Persistence")]
    compact_min_bytes: Option<u64>,
    /// Most recent changes this server keeps so that its peer, back from a short
    /// absence (or behind after lost updates), resumes from where its map stands
    /// instead of taking a full snapshot; 0 keeps none [default: 100000, at most 32 MiB].
    #[arg(long, value_name = "N", help_heading = "Persistence")]
    resume_changes: Option<usize>,
    /// Always re-sync from the active peer with a full snapshot, never by resuming.
    #[arg(long, help_heading = "Persistence")]
    #[serde(default)]
    no_resume: bool,

    /// Name of this server's cluster: servers and clients find only their own cluster's
    /// nodes on the LAN [default: clonekv].
    #[arg(long, value_name = "NAME", help_heading = "Discovery")]
    cluster: Option<String>,
    /// UDP port of the discovery beacons, the same for every node of the cluster
    /// [default: 5560].
    #[arg(long, value_name = "PORT", help_heading = "Discovery")]
    discovery_port: Option<u16>,
    /// Send and hear beacons on this network interface only (e.g. eth0) [default: every
    /// interface that is up, and loopback].
    #[arg(long, value_name = "IFACE", help_heading = "Discovery")]
    discovery_interface: Option<String>,
    /// How often this server broadcasts its beacon; a node is gone after four intervals
    /// without one [default: 1s].
    #[arg(long, value_name = "DURATION", help_heading = "Discovery")]
    discovery_interval: Option<HumanDuration>,
    /// Neither announce this server nor look for its peer by beacon: the peer is at the
    /// --peer-* endpoints (default localhost).
    #[arg(
        long,
        env = "CLONEKVD_NO_DISCOVERY",
        value_parser = clap::builder::BoolishValueParser::new(),
        help_heading = "Discovery"
    )]
    #[serde(default)]
    no_discovery: bool,
    /// This server's CURVE key pair file (`clonekv keygen NAME` writes NAME.key): every
    /// socket then uses CURVE and admits only the keys below. Needs --curve-clients and
    /// --peer-public-key [default: none: plain ZMTP, open to anyone who reaches the ports].
    #[arg(
        long,
        value_name = "FILE",
        env = "CLONEKVD_CURVE_SECRET_KEY",
        help_heading = "Security"
    )]
    curve_secret_key: Option<PathBuf>,
    /// The clients' public keys admitted: a directory of *.pub files, or a file with one
    /// key per line (the peer's key is always admitted).
    #[arg(
        long,
        value_name = "DIR|FILE",
        env = "CLONEKVD_CURVE_CLIENTS",
        help_heading = "Security"
    )]
    curve_clients: Option<PathBuf>,
    /// The peer server's public key (Z85) or its .pub file: the Binary Star state, the
    /// peer's updates and snapshots are taken only from a process that proves it.
    // A Z85 key may start with `-`.
    #[arg(
        long,
        value_name = "KEY|FILE",
        env = "CLONEKVD_PEER_PUBLIC_KEY",
        allow_hyphen_values = true,
        help_heading = "Security"
    )]
    peer_public_key: Option<String>,
    /// Most keys the map holds; a write of a new key past it is refused (the writer's
    /// commit fails), counted and logged [default: no limit].
    #[arg(long, value_name = "N", help_heading = "Map")]
    max_keys: Option<usize>,
    /// Most bytes the map holds (keys, values, properties and 384 bytes per key); a write
    /// past it is refused, counted and logged; deletes always pass [default: no limit].
    #[arg(long, value_name = "SIZE", help_heading = "Map")]
    max_bytes: Option<ByteSize>,
    /// Serve the HTTP/JSON gateway (and /metrics, /healthz) on this address, for example
    /// 127.0.0.1:8556 [default: off].
    #[arg(long, value_name = "IP:PORT", help_heading = "HTTP")]
    http: Option<SocketAddr>,
    /// Serve only /metrics (Prometheus text format) on this address; works with or
    /// without --http [default: off].
    #[arg(long, value_name = "IP:PORT", help_heading = "HTTP")]
    metrics: Option<SocketAddr>,
    /// How long a PUT or DELETE waits for its commit before answering 504 [default: 5s].
    #[arg(long, value_name = "DURATION", help_heading = "HTTP")]
    http_commit_timeout: Option<HumanDuration>,
    /// Changes the gateway keeps for watches that reconnect with Last-Event-ID [default: 10000].
    #[arg(long, value_name = "N", help_heading = "HTTP")]
    http_watch_history: Option<usize>,
    /// Changes a watcher may leave unread before it is disconnected [default: 4096].
    #[arg(long, value_name = "N", help_heading = "HTTP")]
    http_watch_queue: Option<usize>,
    /// An HTTP connection whose writes make no progress this long is closed [default: 10s].
    #[arg(long, value_name = "DURATION", help_heading = "HTTP")]
    http_write_timeout: Option<HumanDuration>,
}

impl Settings {
    /// Each field of `self` if set, else the one from `file`.
    fn over(self, file: Settings) -> Settings {
        Settings {
            role: self.role.or(file.role),
            bind_host: self.bind_host.or(file.bind_host),
            port: self.port.or(file.port),
            state_port: self.state_port.or(file.state_port),
            peer_host: self.peer_host.or(file.peer_host),
            peer_port: self.peer_port.or(file.peer_port),
            peer_state_port: self.peer_state_port.or(file.peer_state_port),
            snapshot_endpoint: self.snapshot_endpoint.or(file.snapshot_endpoint),
            publisher_endpoint: self.publisher_endpoint.or(file.publisher_endpoint),
            collector_endpoint: self.collector_endpoint.or(file.collector_endpoint),
            state_endpoint: self.state_endpoint.or(file.state_endpoint),
            peer_snapshot_endpoint: self.peer_snapshot_endpoint.or(file.peer_snapshot_endpoint),
            peer_publisher_endpoint: self
                .peer_publisher_endpoint
                .or(file.peer_publisher_endpoint),
            peer_collector_endpoint: self
                .peer_collector_endpoint
                .or(file.peer_collector_endpoint),
            peer_state_endpoint: self.peer_state_endpoint.or(file.peer_state_endpoint),
            heartbeat: self.heartbeat.or(file.heartbeat),
            peer_expiry_beats: self.peer_expiry_beats.or(file.peer_expiry_beats),
            pending_max_age: self.pending_max_age.or(file.pending_max_age),
            snapshot_stall_timeout: self.snapshot_stall_timeout.or(file.snapshot_stall_timeout),
            peer_sync_timeout: self.peer_sync_timeout.or(file.peer_sync_timeout),
            max_key_len: self.max_key_len.or(file.max_key_len),
            max_body_len: self.max_body_len.or(file.max_body_len),
            max_properties_len: self.max_properties_len.or(file.max_properties_len),
            pending_max_len: self.pending_max_len.or(file.pending_max_len),
            max_snapshot_streams: self.max_snapshot_streams.or(file.max_snapshot_streams),
            snapshot_batch: self.snapshot_batch.or(file.snapshot_batch),
            sync_backlog_max: self.sync_backlog_max.or(file.sync_backlog_max),
            split_log_max: self.split_log_max.or(file.split_log_max),
            pending_max_bytes: self.pending_max_bytes.or(file.pending_max_bytes),
            sync_backlog_max_bytes: self.sync_backlog_max_bytes.or(file.sync_backlog_max_bytes),
            queue_bytes: self.queue_bytes.or(file.queue_bytes),
            hwm: self.hwm.or(file.hwm),
            data_dir: self.data_dir.or(file.data_dir),
            fsync: self.fsync.or(file.fsync),
            fsync_interval: self.fsync_interval.or(file.fsync_interval),
            compact_min_bytes: self.compact_min_bytes.or(file.compact_min_bytes),
            resume_changes: self.resume_changes.or(file.resume_changes),
            no_resume: self.no_resume || file.no_resume,
            cluster: self.cluster.or(file.cluster),
            discovery_port: self.discovery_port.or(file.discovery_port),
            discovery_interface: self.discovery_interface.or(file.discovery_interface),
            discovery_interval: self.discovery_interval.or(file.discovery_interval),
            no_discovery: self.no_discovery || file.no_discovery,
            curve_secret_key: self.curve_secret_key.or(file.curve_secret_key),
            curve_clients: self.curve_clients.or(file.curve_clients),
            peer_public_key: self.peer_public_key.or(file.peer_public_key),
            max_keys: self.max_keys.or(file.max_keys),
            max_bytes: self.max_bytes.or(file.max_bytes),
            http: self.http.or(file.http),
            metrics: self.metrics.or(file.metrics),
            http_commit_timeout: self.http_commit_timeout.or(file.http_commit_timeout),
            http_watch_history: self.http_watch_history.or(file.http_watch_history),
            http_watch_queue: self.http_watch_queue.or(file.http_watch_queue),
            http_write_timeout: self.http_write_timeout.or(file.http_write_timeout),
        }
    }

    /// True when any endpoint of the peer was given: the peer is then found there, not
    /// by discovery.
    fn peer_given(&self) -> bool {
        self.peer_host.is_some()
            || self.peer_port.is_some()
            || self.peer_state_port.is_some()
            || self.peer_snapshot_endpoint.is_some()
            || self.peer_publisher_endpoint.is_some()
            || self.peer_collector_endpoint.is_some()
            || self.peer_state_endpoint.is_some()
    }

    /// How this server takes part in discovery, or none with `--no-discovery`.
    fn discovery(
        &self,
        base_port: u16,
        state_port: u16,
    ) -> Result<Option<ServerDiscovery>, String> {
        if self.no_discovery {
            return Ok(None);
        }
        if self.snapshot_endpoint.is_some()
            || self.publisher_endpoint.is_some()
            || self.collector_endpoint.is_some()
            || self.state_endpoint.is_some()
        {
            return Err(
                "discovery announces the --port / --state-port layout; with full \
                        endpoints (--snapshot-endpoint and the like) give --no-discovery"
                    .to_string(),
            );
        }
        let mut options = DiscoveryOptions::new(self.cluster.as_deref().unwrap_or(DEFAULT_CLUSTER));
        options.port = self.discovery_port.unwrap_or(DEFAULT_DISCOVERY_PORT);
        options.interface = self.discovery_interface.clone();
        if let Some(interval) = self.discovery_interval {
            options.interval = interval.get();
            options.silence = interval.get().saturating_mul(4);
        }
        if options.port == 0 {
            return Err("--discovery-port must not be 0".to_string());
        }
        Ok(Some(ServerDiscovery {
            options,
            base_port,
            state_port,
            find_peer: !self.peer_given(),
        }))
    }

    /// The HTTP options for a server with `options`, if --http or --metrics is set.
    fn http_options(&self, options: &ServerOptions) -> Result<Option<HttpOptions>, String> {
        if self.http.is_none() && self.metrics.is_none() {
            return Ok(None);
        }
        let endpoints = &options.endpoints;
        let own = ServerAddress {
            snapshot: connectable(&endpoints.snapshot),
            publisher: connectable(&endpoints.publisher),
            collector: connectable(&endpoints.collector),
        };
        let peer = ServerAddress {
            snapshot: endpoints.peer_snapshot.clone(),
            publisher: endpoints.peer_publisher.clone(),
            collector: endpoints.peer_collector.clone(),
        };
        let mut http = HttpOptions::new(vec![own, peer], options.config.limits);
        // The gateway reaches the pair as the daemon reaches its peer: by discovery
        // when the daemon finds its peer that way, and with the daemon's keys.
        http.discovery = options
            .discovery
            .as_ref()
            .filter(|discovery| discovery.find_peer)
            .map(|discovery| discovery.options.clone());
        http.curve = options.curve.as_ref().map(|keys| {
            let (own_kind, peer_kind) = match options.config.bstar.role {
                Role::Primary => (Kind::Primary, Kind::Backup),
                Role::Backup => (Kind::Backup, Kind::Primary),
            };
            GatewayCurve {
                own: keys.own.clone(),
                servers: [(own_kind, keys.own.public()), (peer_kind, keys.peer)],
            }
        });
        http.api = self.http;
        http.metrics = self.metrics;
        if let Some(timeout) = self.http_commit_timeout {
            http.commit_timeout = timeout.get();
        }
        if let Some(history) = self.http_watch_history {
            http.watch_history = history;
        }
        if let Some(queue) = self.http_watch_queue {
            if queue == 0 {
                return Err("--http-watch-queue must be at least 1".to_string());
            }
            http.watch_queue = queue;
        }
        if let Some(timeout) = self.http_write_timeout {
            if timeout.get().is_zero() {
                return Err("--http-write-timeout must be above 0".to_string());
            }
            http.write_timeout = timeout.get();
        }
        if http.api.is_some() && http.api == http.metrics {
            return Err(
                "--http and --metrics need different addresses (--http serves /metrics too)"
                    .to_string(),
            );
        }
        Ok(Some(http))
    }

    /// The server options: the role's defaults with every given setting applied.
    fn into_options(self) -> Result<ServerOptions, String> {
        let role = match self.role.unwrap_or(RoleName::Primary) {
            RoleName::Primary => Role::Primary,
            RoleName::Backup => Role::Backup,
        };
        let mut config = match role {
            Role::Primary => Config::primary(),
            Role::Backup => Config::backup(),
        };
        let (port, state_port, peer_port, peer_state_port) = match role {
            Role::Primary => (5556, 5003, 5566, 5004),
            Role::Backup => (5566, 5004, 5556, 5003),
        };
        let port = self.port.unwrap_or(port);
        let peer_port = self.peer_port.unwrap_or(peer_port);
        let discovery = self.discovery(port, self.state_port.unwrap_or(state_port))?;
        let persistence = self.persistence()?;
        for (name, base) in [("--port", port), ("--peer-port", peer_port)] {
            if base > u16::MAX - 2 {
                return Err(format!(
                    "{name} {base} leaves no room for P+1 and P+2 (at most {})",
                    u16::MAX - 2
                ));
            }
        }
        let ports = ServerEndpoints::with_ports(
            self.bind_host.as_deref().unwrap_or("*"),
            port,
            self.state_port.unwrap_or(state_port),
            self.peer_host.as_deref().unwrap_or("localhost"),
            peer_port,
            self.peer_state_port.unwrap_or(peer_state_port),
        );
        let endpoints = ServerEndpoints {
            snapshot: self.snapshot_endpoint.unwrap_or(ports.snapshot),
            publisher: self.publisher_endpoint.unwrap_or(ports.publisher),
            collector: self.collector_endpoint.unwrap_or(ports.collector),
            state: self.state_endpoint.unwrap_or(ports.state),
            peer_snapshot: self.peer_snapshot_endpoint.unwrap_or(ports.peer_snapshot),
            peer_publisher: self.peer_publisher_endpoint.unwrap_or(ports.peer_publisher),
            peer_collector: self.peer_collector_endpoint.unwrap_or(ports.peer_collector),
            peer_state: self.peer_state_endpoint.unwrap_or(ports.peer_state),
        };

        let duration = |value: Option<HumanDuration>, default: Duration| {
            value.map_or(default, HumanDuration::get)
        };
        config.bstar.heartbeat = duration(self.heartbeat, config.bstar.heartbeat);
        config.bstar.peer_expiry_beats = self
            .peer_expiry_beats
            .unwrap_or(config.bstar.peer_expiry_beats);
        config.pending_max_age = duration(self.pending_max_age, config.pending_max_age);
        config.snapshot_stall_timeout =
            duration(self.snapshot_stall_timeout, config.snapshot_stall_timeout);
        config.peer_sync_timeout = duration(self.peer_sync_timeout, config.peer_sync_timeout);
        config.limits.max_key_len = self.max_key_len.unwrap_or(config.limits.max_key_len);
        config.limits.max_body_len = self.max_body_len.unwrap_or(config.limits.max_body_len);
        config.limits.max_properties_len = self
            .max_properties_len
            .unwrap_or(config.limits.max_properties_len);
        config.pending_max_len = self.pending_max_len.unwrap_or(config.pending_max_len);
        config.max_snapshot_streams = self
            .max_snapshot_streams
            .unwrap_or(config.max_snapshot_streams);
        config.snapshot_batch = self.snapshot_batch.unwrap_or(config.snapshot_batch);
        config.sync_backlog_max = self.sync_backlog_max.unwrap_or(config.sync_backlog_max);
        config.split_log_max = self.split_log_max.unwrap_or(config.split_log_max);
        if let Some(size) = self.pending_max_bytes {
            config.pending_max_bytes = bytes(size);
        }
        if let Some(size) = self.sync_backlog_max_bytes {
            config.sync_backlog_max_bytes = bytes(size);
        }
        config.max_keys = self.max_keys.or(config.max_keys);
        config.max_map_bytes = self.max_bytes.map(bytes).or(config.max_map_bytes);
        config.recent_changes_max = self.resume_changes.unwrap_or(config.recent_changes_max);
        config.resume = !self.no_resume;
        config.validate().map_err(|error| error.to_string())?;

        let queue_bytes = self.queue_bytes.map_or(DEFAULT_QUEUE_BYTES, bytes);
        let receive_hwm = hwm_for_queue_bytes(queue_bytes, &config.limits);
        let hwm = self.hwm.unwrap_or(DEFAULT_HWM);
        if hwm < 0 {
            return Err(format!("--hwm {hwm} must be 0 (no limit) or more"));
        }
        let curve = curve_keys(
            self.curve_secret_key.as_deref(),
            self.curve_clients.as_deref(),
            self.peer_public_key.as_deref(),
        )?;
        Ok(ServerOptions {
            config,
            endpoints,
            hwm,
            discovery,
            persistence,
            curve,
            receive_hwm,
        })
    }

    /// The data directory's options, or none without --data-dir.
    fn persistence(&self) -> Result<Option<PersistOptions>, String> {
        let Some(dir) = &self.data_dir else {
            if self.fsync.is_some()
                || self.fsync_interval.is_some()
                || self.compact_min_bytes.is_some()
            {
                return Err(
                    "--fsync, --fsync-interval and --compact-min-bytes need --data-dir".to_string(),
                );
            }
            return Ok(None);
        };
        let mut options = PersistOptions::new(dir);
        options.fsync = match self.fsync.unwrap_or(FsyncName::Always) {
            FsyncName::Always => FsyncPolicy::Always,
            FsyncName::Batch => FsyncPolicy::Batch,
            FsyncName::Never => FsyncPolicy::Never,
        };
        if let Some(interval) = self.fsync_interval {
            if interval.get().is_zero() {
                return Err("--fsync-interval must be more than 0 (or use --fsync always)".into());
            }
            options.fsync_interval = interval.get();
        }
        options.compact_min_bytes = self.compact_min_bytes.unwrap_or(DEFAULT_COMPACT_MIN_BYTES);
        Ok(Some(options))
    }
}

/// The CURVE keys, read from their files: all three settings or none.
fn curve_keys(
    secret_key: Option<&Path>,
    clients: Option<&Path>,
    peer: Option<&str>,
) -> Result<Option<ServerCurve>, String> {
    let (secret_key, clients, peer) = match (secret_key, clients, peer) {
        (None, None, None) => return Ok(None),
        (Some(secret_key), Some(clients), Some(peer)) => (secret_key, clients, peer),
        (None, _, _) => {
            return Err(
                "--curve-clients and --peer-public-key need --curve-secret-key \
                        (this server's key pair; `clonekv keygen` makes one)"
                    .to_string(),
            )
        }
        (Some(_), None, _) => {
            return Err(
                "--curve-secret-key needs --curve-clients: the public keys of the \
                        clients to admit (a directory of .pub files or a file of keys)"
                    .to_string(),
            )
        }
        (Some(_), Some(_), None) => {
            return Err(
                "--curve-secret-key needs --peer-public-key: the other server's \
                        public key (or its .pub file)"
                    .to_string(),
            )
        }
    };
    if !curve::available() {
        return Err(KeyError::Unavailable.to_string());
    }
    let own = KeyPair::read(secret_key).map_err(|error| format!("--curve-secret-key: {error}"))?;
    let clients =
        curve::read_public_keys(clients).map_err(|error| format!("--curve-clients: {error}"))?;
    let peer =
        PublicKey::from_key_or_file(peer).map_err(|error| format!("--peer-public-key: {error}"))?;
    if peer == own.public() {
        return Err(
            "--peer-public-key is this server's own public key: give the other server's"
                .to_string(),
        );
    }
    Ok(Some(ServerCurve { own, peer, clients }))
}

impl Settings {}

/// A size as a byte count (a size past the address space is as good as no bound).
fn bytes(size: ByteSize) -> usize {
    usize::try_from(size.as_u64()).unwrap_or(usize::MAX)
}

/// A bound endpoint as a local client reaches it: every interface (`*`, `0.0.0.0`,
/// `[::]`) becomes loopback.
fn connectable(endpoint: &str) -> String {
    for (any, local) in [
        ("tcp://*:", "tcp://localhost:"),
        ("tcp://0.0.0.0:", "tcp://127.0.0.1:"),
        ("tcp://[::]:", "tcp://[::1]:"),
    ] {
        if let Some(port) = endpoint.strip_prefix(any) {
            return format!("{local}{port}");
        }
    }
    endpoint.to_string()
}

fn read_config_file(path: &Path) -> Result<Settings, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read config file {}: {error}", path.display()))?;
    parse_config(&text).map_err(|(line, message)| match line {
        Some(line) => format!("config file {}, line {line}: {message}", path.display()),
        None => format!("config file {}: {message}", path.display()),
    })
}

/// The settings of a config file's text, or the line (from 1) of the error and its
/// message.
fn parse_config(text: &str) -> Result<Settings, (Option<usize>, String)> {
    toml::from_str(text).map_err(|error| {
        // The line of the span's first byte is one more than the newlines before it
        // (`lines()` of the text before it would miss the last one when the span starts
        // a line, as an unknown key does).
        let line = error.span().map(|span| {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            before.iter().filter(|byte| **byte == b'\n').count() + 1
        });
        (line, error.message().to_string())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    clonekv_zmq::log::init("info");

    let file = match &cli.config {
        Some(path) => match read_config_file(path) {
            Ok(settings) => settings,
            Err(message) => return fail(EXIT_CONFIG, &message),
        },
        None => Settings::default(),
    };
    let mut settings = cli.settings.over(file);
    if cli.backup {
        settings.role = Some(RoleName::Backup);
    }
    let http_settings = Settings {
        http: settings.http,
        metrics: settings.metrics,
        http_commit_timeout: settings.http_commit_timeout,
        http_watch_history: settings.http_watch_history,
        http_watch_queue: settings.http_watch_queue,
        http_write_timeout: settings.http_write_timeout,
        ..Settings::default()
    };
    let options = match settings.into_options() {
        Ok(options) => options,
        Err(message) => return fail(EXIT_CONFIG, &format!("invalid configuration: {message}")),
    };
    let http_options = match http_settings.http_options(&options) {
        Ok(http) => http,
        Err(message) => return fail(EXIT_CONFIG, &format!("invalid configuration: {message}")),
    };

    let role = options.config.bstar.role;
    let discovery = options.discovery.clone();
    let security = options
        .curve
        .as_ref()
        .map(|keys| (keys.own.public().z85(), keys.peer.z85(), keys.clients.len()));
    let (config, hwm, receive_hwm) = (options.config, options.hwm, options.receive_hwm);
    let mut host = match ServerHost::start(options) {
        Ok(host) => host,
        Err(error) => {
            let (status, message) = start_failure(&error);
            return fail(status, &message);
        }
    };
    if let Err(error) = host.stop_on_signals() {
        return fail(
            EXIT_FAILURE,
            &format!("cannot install SIGINT/SIGTERM handlers: {error}"),
        );
    }
    if let Some(http_options) = http_options {
        let stats = host.share_stats();
        match clonekv_zmq::http::start(http_options, stats) {
            Ok(http) => {
                if let Some(api) = http.api {
                    tracing::info!(%api, "HTTP gateway listening");
                }
                if let Some(metrics) = http.metrics {
                    tracing::info!(%metrics, "metrics listening");
                }
            }
            Err(error) => {
                let hint = match &error {
                    HttpError::Bind { .. } => " (choose another address with --http / --metrics)",
                    _ => "",
                };
                return fail(EXIT_FAILURE, &format!("cannot start: {error}{hint}"));
            }
        }
    }
    let endpoints = host.endpoints();
    match security {
        Some((public_key, peer_public_key, clients_admitted)) => tracing::info!(
            %role,
            snapshot = %endpoints.snapshot,
            publisher = %endpoints.publisher,
            collector = %endpoints.collector,
            state = %endpoints.state,
            peer_snapshot = %endpoints.peer_snapshot,
            peer_state = %endpoints.peer_state,
            %public_key,
            %peer_public_key,
            clients_admitted,
            "clonekvd started; security: CURVE on every socket, only admitted keys and the peer get in"
        ),
        None => tracing::warn!(
            %role,
            snapshot = %endpoints.snapshot,
            publisher = %endpoints.publisher,
            collector = %endpoints.collector,
            state = %endpoints.state,
            peer_snapshot = %endpoints.peer_snapshot,
            peer_state = %endpoints.peer_state,
            "clonekvd started; security: NONE (plain ZMTP, zguide-compatible): anyone who reaches these ports can read and write every key and change this server's Binary Star state; set --curve-secret-key, --curve-clients and --peer-public-key (docs/SECURITY.md)"
        ),
    }
    match &discovery {
        Some(discovery) => tracing::info!(
            cluster = %discovery.options.cluster,
            udp_port = discovery.options.port,
            interface = discovery.options.interface.as_deref().unwrap_or("(every interface)"),
            peer = if discovery.find_peer { "found by beacon (the peer endpoints above are not used)" } else { "at the configured endpoints" },
            "discovery on: announcing this server by UDP broadcast"
        ),
        None => tracing::info!("discovery off: the peer is at the configured endpoints"),
    }
    let unbounded = || "none".to_string();
    tracing::info!(
        pending_max_bytes = config.pending_max_bytes,
        sync_backlog_max_bytes = config.sync_backlog_max_bytes,
        receive_hwm_per_connection = receive_hwm,
        publisher_hwm_per_subscriber = hwm,
        max_keys = config
            .max_keys
            .map_or_else(unbounded, |max| max.to_string()),
        max_map_bytes = config
            .max_map_bytes
            .map_or_else(unbounded, |max| max.to_string()),
        "memory bounds (README: Memory bounds)"
    );
    match host.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(EXIT_FAILURE, &format!("stopped: {error}")),
    }
}

/// The exit status and one-line message for a server that could not start: a
/// configuration that cannot work on this host is status 2 (starting again cannot fix
/// it), a port taken or a name server that did not answer is status 1.
fn start_failure(error: &StartError) -> (u8, String) {
    match error {
        StartError::Endpoints(EndpointError::Unresolvable {
            temporary: true, ..
        }) => (
            EXIT_FAILURE,
            format!("cannot start: {error} (the name server did not answer; try again)"),
        ),
        StartError::Endpoints(clash) => {
            let hint = match clash {
                EndpointError::BindClash { .. } => {
                    "set --port and --state-port so that P, P+1, P+2 and the state port differ"
                }
                EndpointError::PeerIsSelf { .. } => {
                    "a peer on this host needs ports of its own: see --peer-port and --peer-state-port"
                }
                EndpointError::PeerClash { .. } => "see --peer-port and --peer-state-port",
                _ => "check --peer-host",
            };
            (EXIT_CONFIG, format!("{error} ({hint})"))
        }
        StartError::Config(_) => (EXIT_CONFIG, error.to_string()),
        StartError::Persist(persist) if persist.is_refusal() => {
            (EXIT_CONFIG, format!("cannot start: {error}"))
        }
        StartError::Discovery(DiscoveryError::Config(_) | DiscoveryError::NoSuchInterface(_)) => {
            (EXIT_CONFIG, format!("cannot start: {error}"))
        }
        StartError::Bind {
            error: zmq::Error::EADDRINUSE,
            ..
        } => (
            EXIT_FAILURE,
            format!(
                "cannot start: {error} (is another clonekvd running? choose other ports with \
                 --port / --state-port)"
            ),
        ),
        StartError::Bind {
            error: zmq::Error::EADDRNOTAVAIL | zmq::Error::ENODEV,
            ..
        } => (
            EXIT_CONFIG,
            format!(
                "cannot start: {error} (--bind-host must be an address of this host, or * for \
                 every interface)"
            ),
        ),
        _ => (EXIT_FAILURE, format!("cannot start: {error}")),
    }
}

/// Prints the one-line reason and returns the exit status.
fn fail(status: u8, message: &str) -> ExitCode {
    eprintln!("clonekvd: {message}");
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_is_on_by_default_and_finds_the_peer_unless_one_is_given() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("clonekvd").chain(args.iter().copied()))
                .unwrap();
            cli.settings.into_options()
        };
        let default = parse(&[]).unwrap().discovery.unwrap();
        assert!(default.find_peer);
        assert_eq!(default.options.cluster, "clonekv");
        assert_eq!(default.options.port, 5560);
        assert_eq!((default.base_port, default.state_port), (5556, 5003));
        let given = parse(&["--peer-host", "10.0.0.2", "--cluster", "b"]).unwrap();
        let given = given.discovery.unwrap();
        assert!(!given.find_peer, "a given peer wins");
        assert_eq!(given.options.cluster, "b");
        let fast = parse(&["--discovery-interval", "250ms"])
            .unwrap()
            .discovery
            .unwrap();
        assert_eq!(fast.options.silence, Duration::from_secs(1));
        assert!(parse(&["--no-discovery"]).unwrap().discovery.is_none());
        let error = parse(&["--snapshot-endpoint", "ipc:///tmp/s"]).unwrap_err();
        assert!(error.contains("--no-discovery"), "{error}");
        assert!(parse(&["--discovery-port", "0"]).is_err());
    }

    #[test]
    fn no_arguments_mean_the_primary_on_the_reference_ports() {
        let options = Settings::default().into_options().unwrap();
        assert_eq!(options.endpoints, ServerEndpoints::primary());
        assert_eq!(options.config, Config::primary());
    }

    #[test]
    fn the_backup_flips_every_default() {
        let cli = Cli::try_parse_from(["clonekvd", "--backup"]).unwrap();
        let mut settings = cli.settings.over(Settings::default());
        settings.role = Some(RoleName::Backup);
        let options = settings.into_options().unwrap();
        assert_eq!(options.endpoints, ServerEndpoints::backup());
        assert_eq!(options.config, Config::backup());
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let file: Settings =
            toml::from_str("port = 7000\nheartbeat = \"200ms\"\nrole = \"backup\"").unwrap();
        let cli = Cli::try_parse_from(["clonekvd", "--port", "8000"]).unwrap();
        let options = cli.settings.over(file).into_options().unwrap();
        assert_eq!(options.endpoints.snapshot, "tcp://*:8000");
        assert_eq!(options.endpoints.collector, "tcp://*:8002");
        assert_eq!(options.endpoints.peer_snapshot, "tcp://localhost:5556");
        assert_eq!(options.config.bstar.heartbeat, Duration::from_millis(200));
        assert_eq!(options.config.bstar.role, Role::Backup);
    }

    #[test]
    fn the_map_bounds_and_byte_budgets_come_from_flags_or_the_file() {
        let options = Settings::default().into_options().unwrap();
        assert_eq!(options.config.max_keys, None, "no map bound by default");
        assert_eq!(options.config.max_map_bytes, None);
        assert_eq!(
            options.receive_hwm,
            hwm_for_queue_bytes(DEFAULT_QUEUE_BYTES, &options.config.limits)
        );
        assert_eq!(options.hwm, DEFAULT_HWM);
        let file: Settings = toml::from_str(
            "max-keys = 1000\nmax-bytes = \"64MiB\"\npending-max-bytes = 200000000\nqueue-bytes = \"4MiB\"",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "clonekvd",
            "--max-keys",
            "10",
            "--sync-backlog-max-bytes",
            "100MiB",
        ])
        .unwrap();
        let options = cli.settings.over(file).into_options().unwrap();
        assert_eq!(options.config.max_keys, Some(10), "the flag wins");
        assert_eq!(options.config.max_map_bytes, Some(64 << 20));
        assert_eq!(options.config.pending_max_bytes, 200_000_000);
        assert_eq!(options.config.sync_backlog_max_bytes, 100 << 20);
        assert_eq!(options.receive_hwm, 3, "4 MiB of messages just over 1 MiB");
    }

    #[test]
    fn a_byte_budget_below_one_message_is_refused_with_the_least_it_may_be() {
        let cli = Cli::try_parse_from(["clonekvd", "--pending-max-bytes", "1MiB"]).unwrap();
        let error = cli
            .settings
            .over(Settings::default())
            .into_options()
            .unwrap_err();
        assert!(
            error.contains("pending_max_bytes must be at least"),
            "{error}"
        );
        assert!(Cli::try_parse_from(["clonekvd", "--max-bytes", "lots"]).is_err());
    }

    #[test]
    fn a_typo_in_the_config_file_is_an_error() {
        assert!(toml::from_str::<Settings>("prot = 1").is_err());
    }

    #[test]
    fn config_errors_name_the_line_they_are_on() {
        let line = |text: &str| parse_config(text).err().and_then(|(line, _)| line);
        assert_eq!(line("prot = 1"), Some(1));
        // An unknown key starts its line.
        assert_eq!(line("port = 1\n\nprot = 1\n"), Some(3));
        // A bad value is in the middle of its line.
        assert_eq!(line("port = 1\n# note\nheartbeat = \"soon\"\n"), Some(3));
        assert_eq!(line("port = 1\r\nrole = \"boss\"\r\n"), Some(2));
    }

    #[test]
    fn a_data_dir_comes_from_a_flag_or_the_file_and_fsync_defaults_to_always() {
        let parse = |args: &[&str], file: &str| {
            let cli = Cli::try_parse_from(std::iter::once("clonekvd").chain(args.iter().copied()))
                .unwrap();
            cli.settings
                .over(parse_config(file).unwrap())
                .into_options()
        };
        assert_eq!(parse(&[], "").unwrap().persistence, None);
        let given = parse(&["--data-dir", "/var/lib/clonekv"], "").unwrap();
        let given = given.persistence.unwrap();
        assert_eq!(given.dir, PathBuf::from("/var/lib/clonekv"));
        assert_eq!(given.fsync, FsyncPolicy::Always);
        let file = "data-dir = \"/d\"\nfsync = \"batch\"\nfsync-interval = \"50ms\"\n";
        let from_file = parse(&[], file).unwrap().persistence.unwrap();
        assert_eq!(from_file.fsync, FsyncPolicy::Batch);
        assert_eq!(from_file.fsync_interval, Duration::from_millis(50));
        let error = parse(&["--fsync", "never"], "").unwrap_err();
        assert!(error.contains("--data-dir"), "{error}");
        let error = parse(&["--data-dir", "/d", "--fsync-interval", "0s"], "").unwrap_err();
        assert!(error.contains("--fsync-interval"), "{error}");
    }

    #[test]
    fn a_zero_heartbeat_is_refused() {
        let cli = Cli::try_parse_from(["clonekvd", "--heartbeat", "0s"]).unwrap();
        let error = cli
            .settings
            .over(Settings::default())
            .into_options()
            .unwrap_err();
        assert!(error.contains("heartbeat"), "{error}");
    }

    #[test]
    fn what_no_restart_fixes_exits_2_and_what_may_fix_itself_exits_1() {
        let unresolvable = |temporary| {
            StartError::Endpoints(EndpointError::Unresolvable {
                socket: "peer state",
                endpoint: "tcp://kv1:5004".into(),
                host: "kv1".into(),
                reason: "lookup failed".into(),
                temporary,
            })
        };
        let bind = |error| StartError::Bind {
            socket: "snapshot",
            endpoint: "tcp://10.9.9.9:5556".into(),
            error,
        };
        let status = |error: StartError| start_failure(&error).0;
        assert_eq!(status(unresolvable(false)), EXIT_CONFIG);
        assert_eq!(status(unresolvable(true)), EXIT_FAILURE);
        assert_eq!(status(bind(zmq::Error::EADDRNOTAVAIL)), EXIT_CONFIG);
        assert_eq!(status(bind(zmq::Error::ENODEV)), EXIT_CONFIG);
        assert_eq!(status(bind(zmq::Error::EADDRINUSE)), EXIT_FAILURE);
        let (_, message) = start_failure(&bind(zmq::Error::EADDRINUSE));
        assert!(
            message.contains("in use") && message.contains("EADDRINUSE"),
            "{message}"
        );
    }

    #[test]
    fn curve_keys_come_from_the_config_file_all_three_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let own = KeyPair::generate().unwrap();
        let peer = KeyPair::generate().unwrap();
        let client = KeyPair::generate().unwrap();
        let (own_file, _) = own.write(&dir.path().join("own"), false).unwrap();
        let (_, peer_file) = peer.write(&dir.path().join("peer"), false).unwrap();
        let clients = dir.path().join("clients");
        std::fs::create_dir(&clients).unwrap();
        client.write(&clients.join("app"), false).unwrap();
        let text = format!(
            "curve-secret-key = {:?}\ncurve-clients = {:?}\npeer-public-key = {:?}\n",
            own_file.display().to_string(),
            clients.display().to_string(),
            peer_file.display().to_string()
        );
        let options = parse_config(&text).unwrap().into_options().unwrap();
        let keys = options.curve.expect("CURVE configured");
        assert_eq!(keys.own, own);
        assert_eq!(keys.peer, peer.public());
        assert!(keys.clients.contains(&client.public()));
        // The peer's key may be given as Z85 on the command line too.
        let cli =
            Cli::try_parse_from(["clonekvd", "--peer-public-key", &peer.public().z85()]).unwrap();
        let file = parse_config(&text).unwrap();
        let options = cli.settings.over(file).into_options().unwrap();
        assert_eq!(options.curve.map(|keys| keys.peer), Some(peer.public()));
        // Any one missing is an error that names what is missing.
        let partial = format!("curve-secret-key = {:?}\n", own_file.display().to_string());
        let error = parse_config(&partial).unwrap().into_options().unwrap_err();
        assert!(error.contains("--curve-clients"), "{error}");
        let error = Cli::try_parse_from(["clonekvd", "--curve-clients", "x"])
            .unwrap()
            .settings
            .over(Settings::default())
            .into_options()
            .unwrap_err();
        assert!(error.contains("need --curve-secret-key"), "{error}");
        // Its own key as the peer's is a mistake.
        let cli =
            Cli::try_parse_from(["clonekvd", "--peer-public-key", &own.public().z85()]).unwrap();
        let error = cli
            .settings
            .over(parse_config(&text).unwrap())
            .into_options()
            .unwrap_err();
        assert!(error.contains("own public key"), "{error}");
        // No keys: plain.
        assert!(Settings::default().into_options().unwrap().curve.is_none());
        // A Z85 key may start with a hyphen; it is still the flag's value.
        let hyphen = format!("-{}", "0".repeat(39));
        let cli = Cli::try_parse_from(["clonekvd", "--peer-public-key", &hyphen]).unwrap();
        assert_eq!(
            cli.settings.peer_public_key.as_deref(),
            Some(hyphen.as_str())
        );
        assert!(PublicKey::from_key_or_file(&hyphen).is_ok());
    }

    #[test]
    fn the_gateway_reaches_its_own_server_on_loopback_and_the_peer_as_configured() {
        assert_eq!(connectable("tcp://*:5556"), "tcp://localhost:5556");
        assert_eq!(connectable("tcp://0.0.0.0:7000"), "tcp://127.0.0.1:7000");
        assert_eq!(connectable("tcp://[::]:7000"), "tcp://[::1]:7000");
        assert_eq!(connectable("tcp://10.0.0.1:7000"), "tcp://10.0.0.1:7000");
        let cli = Cli::try_parse_from(["clonekvd", "--http", "127.0.0.1:8556"]).unwrap();
        let settings = cli.settings.over(Settings::default());
        let http_settings = Settings {
            http: settings.http,
            ..Settings::default()
        };
        let options = settings.into_options().unwrap();
        let http = http_settings.http_options(&options).unwrap().unwrap();
        assert_eq!(http.servers[0].snapshot, "tcp://localhost:5556");
        assert_eq!(http.servers[1].collector, "tcp://localhost:5568");
        assert_eq!(http.api, Some("127.0.0.1:8556".parse().unwrap()));
        assert_eq!(http.metrics, None);
        assert!(Settings::default()
            .http_options(&options)
            .unwrap()
            .is_none());
    }

    #[test]
    fn http_settings_that_cannot_work_are_refused() {
        let options = Settings::default().into_options().unwrap();
        for args in [
            &[
                "clonekvd",
                "--http",
                "127.0.0.1:1",
                "--metrics",
                "127.0.0.1:1",
            ][..],
            &[
                "clonekvd",
                "--http",
                "127.0.0.1:1",
                "--http-watch-queue",
                "0",
            ],
            &[
                "clonekvd",
                "--metrics",
                "127.0.0.1:1",
                "--http-write-timeout",
                "0s",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(cli.settings.http_options(&options).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["clonekvd", "--http", "localhost"]).is_err());
    }

    #[test]
    fn the_help_text_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
