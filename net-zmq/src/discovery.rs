//! Zero-config discovery over UDP broadcast: the socket side of
//! [`clonekv_core::beacon::Beacon`].
//!
//! [`Discovery`] owns one UDP socket bound to the discovery port on every interface,
//! with `SO_REUSEADDR` and `SO_REUSEPORT` so that several daemons and clients on one
//! host share the port (every socket bound to it receives each broadcast), and
//! `SO_BROADCAST` to send. Every beacon goes to the broadcast address of each IPv4
//! interface that is up (or of the one interface chosen), and to `127.255.255.255` so
//! that nodes on one host find each other even on a host with no network. The list of
//! interfaces is read again for every beacon, so a network that comes up, goes away or
//! changes address is followed within one interval; a send that fails because the
//! network is down is logged (rate-limited) and retried at the next beacon, never fatal.
//!
//! Why subnet broadcast addresses rather than `255.255.255.255`: a host with no default
//! route gets `ENETUNREACH` for the limited broadcast, while its subnet's broadcast
//! address works; with a default route the limited broadcast leaves only by that route's
//! interface, which its subnet broadcast already covers.
//!
//! The machine decides everything: which datagrams count, who is up, changed or down.
//! This module only moves bytes.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use clonekv_core::beacon::{
    self, Announcement, Beacon, DropReason, Event, Kind, Output, Peer, CLIENT_SLOTS,
};
use clonekv_core::kvmsg::BstarState;
use clonekv_core::time::Instant;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock::Clock;
use crate::log::{log_limited, log_summaries, RateLimiter};

/// The UDP port beacons use unless told otherwise.
pub const DEFAULT_DISCOVERY_PORT: u16 = 5560;

/// The cluster name servers and clients use unless told otherwise.
pub const DEFAULT_CLUSTER: &str = "clonekv";

/// Loopback's broadcast address: reaches every socket on this host bound to the port.
const LOOPBACK_BROADCAST: Ipv4Addr = Ipv4Addr::new(127, 255, 255, 255);

/// Datagrams read per call of [`Discovery::pump`], so that a flood cannot starve the
/// loop that also serves the protocol.
const BATCH: usize = 64;

/// How a node takes part in discovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// The cluster's name: nodes of other clusters on the same LAN are ignored.
    pub cluster: String,
    /// The UDP port every node of the cluster uses.
    pub port: u16,
    /// Send and listen on this interface only (by name, e.g. `eth0`); `None`: all.
    pub interface: Option<String>,
    /// How often a server announces itself.
    pub interval: Duration,
    /// Silence after which a peer counts as gone; longer than `interval`.
    pub silence: Duration,
}

impl DiscoveryOptions {
    /// The defaults for `cluster`: port [`DEFAULT_DISCOVERY_PORT`], every interface, a
    /// beacon a second, a peer gone after four seconds of silence.
    pub fn new(cluster: impl Into<String>) -> Self {
        DiscoveryOptions {
            cluster: cluster.into(),
            port: DEFAULT_DISCOVERY_PORT,
            interface: None,
            interval: Duration::from_secs(1),
            silence: Duration::from_secs(4),
        }
    }
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        DiscoveryOptions::new(DEFAULT_CLUSTER)
    }
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The options are unusable (an empty or too long cluster name, a bad interval).
    #[error("invalid discovery settings: {0}")]
    Config(#[from] beacon::Error),
    /// The UDP socket could not be made or bound.
    #[error("cannot open the discovery socket on UDP port {port}: {error} (is another program bound to it without SO_REUSEPORT? choose another with --discovery-port, or turn discovery off with --no-discovery)")]
    Socket {
        /// The port.
        port: u16,
        /// What the OS said.
        error: io::Error,
    },
    /// The interface named does not exist or has no IPv4 address.
    #[error("no IPv4 interface named {0:?} (see `ip -4 addr`)")]
    NoSuchInterface(String),
    /// No randomness for the instance id.
    #[error("cannot draw a random instance id: {0}")]
    Randomness(String),
}

/// A beacon machine and its UDP socket. See the [module docs](self).
#[derive(Debug)]
pub struct Discovery {
    clock: Clock,
    beacon: Beacon,
    socket: UdpSocket,
    options: DiscoveryOptions,
    events: VecDeque<Event>,
    buffer: Vec<u8>,
    limiter: RateLimiter,
    sent: u64,
    send_failures: u64,
}

impl Discovery {
    /// Opens the socket and starts the machine; the first beacon is due at once.
    /// `clock` is the caller's: the deadlines of [`Discovery::poll_timeout`] are in its
    /// time.
    pub fn open(
        clock: Clock,
        options: DiscoveryOptions,
        announcement: Announcement,
    ) -> Result<Discovery, DiscoveryError> {
        let now = clock.now();
        let mut instance = [0u8; 16];
        getrandom::fill(&mut instance)
            .map_err(|error| DiscoveryError::Randomness(error.to_string()))?;
        let mut config = beacon::Config::new(options.cluster.as_bytes(), instance, announcement);
        config.interval = options.interval;
        config.silence = options.silence;
        let beacon = Beacon::new(now, config)?;
        if let Some(interface) = &options.interface {
            if broadcast_targets(Some(interface)).is_empty() {
                return Err(DiscoveryError::NoSuchInterface(interface.clone()));
            }
        }
        let socket = open_socket(options.port, options.interface.as_deref()).map_err(|error| {
            DiscoveryError::Socket {
                port: options.port,
                error,
            }
        })?;
        Ok(Discovery {
            clock,
            beacon,
            socket,
            options,
            events: VecDeque::new(),
            // One byte more than the longest valid beacon, so that a longer datagram
            // is seen as too long rather than cut to a valid-looking prefix.
            buffer: vec![0; beacon::MAX_DATAGRAM_LEN + 1],
            limiter: RateLimiter::new(Duration::from_secs(30)),
            sent: 0,
            send_failures: 0,
        })
    }

    /// Registers the socket with a mio registry.
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.socket, token, Interest::READABLE)
    }

    /// The options in use.
    pub fn options(&self) -> &DiscoveryOptions {
        &self.options
    }

    /// When the machine next needs [`Discovery::pump`] without a datagram arriving.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.beacon.poll_timeout()
    }

    /// Announces a new Binary Star state (at once, not at the next interval).
    pub fn set_state(&mut self, state: BstarState) {
        self.beacon.set_state(self.clock.now(), state);
    }

    /// The peers heard within the silence timeout, in instance order.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> + '_ {
        self.beacon.peers()
    }

    /// The machine: its peer table and the rules that pick a partner or a server.
    pub fn beacon(&self) -> &Beacon {
        &self.beacon
    }

    /// Datagrams dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.beacon.dropped(reason)
    }

    /// Beacons sent, and sends that failed, so far.
    pub fn sent(&self) -> (u64, u64) {
        (self.sent, self.send_failures)
    }

    /// Runs due timers, reads up to a batch of waiting datagrams and sends what the
    /// machine queued. Returns true while datagrams may still be waiting (the socket's
    /// readiness is edge-triggered: call again before sleeping).
    pub fn pump(&mut self) -> bool {
        let now = self.clock.now();
        if self.beacon.poll_timeout().is_some_and(|due| due <= now) {
            self.beacon.handle_timeout(now);
        }
        let more = self.receive(now);
        self.carry_out_outputs();
        log_summaries(self.limiter.due_summaries(std::time::Instant::now()));
        more
    }

    /// The servers heard, in the order a client tries them (the primary first); at most
    /// one per kind.
    pub fn servers(&self) -> Vec<FoundServer> {
        CLIENT_SLOTS
            .iter()
            .filter_map(|kind| self.beacon.server_of_kind(*kind))
            .map(FoundServer::from)
            .collect()
    }

    /// Listens on a fresh socket until a server of the cluster is heard (and a moment
    /// more, for its partner's beacon sent at about the same time) or `timeout` passes.
    /// For a client that must know where the servers are before it starts.
    pub fn listen_for_servers(
        options: DiscoveryOptions,
        timeout: Duration,
    ) -> Result<Vec<FoundServer>, DiscoveryError> {
        let mut discovery = Discovery::open(Clock::new(), options, CLIENT_ANNOUNCEMENT)?;
        let started = std::time::Instant::now();
        let mut first_heard: Option<std::time::Instant> = None;
        loop {
            while discovery.pump() {}
            let servers = discovery.servers();
            let now = std::time::Instant::now();
            if !servers.is_empty() {
                let heard = *first_heard.get_or_insert(now);
                if servers.len() == CLIENT_SLOTS.len() || now >= heard + PARTNER_GRACE {
                    return Ok(servers);
                }
            }
            if now >= started + timeout {
                return Ok(servers);
            }
            std::thread::sleep(LISTEN_STEP);
        }
    }

    /// The next change in the peer table, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn receive(&mut self, now: Instant) -> bool {
        for _ in 0..BATCH {
            match self.socket.recv_from(&mut self.buffer) {
                Ok((len, from)) => {
                    let bytes = self.buffer.get(..len).unwrap_or(&self.buffer);
                    let before = DROP_REASONS.map(|reason| self.beacon.dropped(reason));
                    self.beacon.handle_datagram(now, from.ip(), bytes);
                    for (reason, before) in DROP_REASONS.into_iter().zip(before) {
                        if self.beacon.dropped(reason) > before {
                            log_drop(&mut self.limiter, reason, from, len);
                        }
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return false,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // ICMP errors of earlier sends surface here on some systems; none
                    // of them stops discovery.
                    log_limited!(
                        self.limiter,
                        "discovery_receive_failed",
                        tracing::Level::WARN,
                        "discovery: receiving a beacon failed",
                        %error
                    );
                    return false;
                }
            }
        }
        true
    }

    fn carry_out_outputs(&mut self) {
        while let Some(output) = self.beacon.poll_output() {
            match output {
                Output::Send(datagram) => self.broadcast(&datagram),
                Output::Event(event) => self.events.push_back(event),
            }
        }
    }

    fn broadcast(&mut self, datagram: &[u8]) {
        let targets = broadcast_targets(self.options.interface.as_deref());
        if targets.is_empty() {
            self.send_failures += 1;
            log_limited!(
                self.limiter,
                "discovery_no_interface",
                tracing::Level::WARN,
                "discovery: no IPv4 interface is up to send a beacon on; will try again",
                interface = self.options.interface.as_deref().unwrap_or("(any)")
            );
            return;
        }
        for target in targets {
            let to = SocketAddr::V4(SocketAddrV4::new(target, self.options.port));
            match self.socket.send_to(datagram, to) {
                Ok(_) => self.sent += 1,
                Err(error) => {
                    self.send_failures += 1;
                    // ENETUNREACH, ENETDOWN, EADDRNOTAVAIL while the network is down or
                    // changing; a full buffer (WouldBlock) under load. The next beacon
                    // is a second away.
                    log_limited!(
                        self.limiter,
                        "discovery_send_failed",
                        tracing::Level::WARN,
                        "discovery: sending a beacon failed; will try again at the next",
                        %to,
                        %error
                    );
                }
            }
        }
    }
}

/// What a client announces: that it is one. Clients only listen; the machine never
/// sends for them.
pub const CLIENT_ANNOUNCEMENT: Announcement = Announcement {
    kind: Kind::Client,
    state: None,
    base_port: 0,
    state_port: 0,
};

/// How long [`Discovery::listen_for_servers`] waits for a second server once it heard
/// one: the pair's beacons are independent, so this only catches one sent at about the
/// same time; a later one is followed by the client anyway.
const PARTNER_GRACE: Duration = Duration::from_millis(30);

/// How often [`Discovery::listen_for_servers`] looks for datagrams.
const LISTEN_STEP: Duration = Duration::from_millis(5);

/// A server discovery found, as a client reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundServer {
    /// Primary or backup.
    pub kind: Kind,
    /// The address its beacon came from.
    pub address: IpAddr,
    /// Its base port P.
    pub base_port: u16,
    /// Its Binary Star state when last heard.
    pub state: Option<BstarState>,
}

impl FoundServer {
    /// Its base endpoint, `tcp://ADDRESS:P`.
    pub fn base_endpoint(&self) -> String {
        format!("tcp://{}:{}", endpoint_host(self.address), self.base_port)
    }
}

impl From<&Peer> for FoundServer {
    fn from(peer: &Peer) -> Self {
        FoundServer {
            kind: peer.announcement.kind,
            address: peer.address,
            base_port: peer.announcement.base_port,
            state: peer.announcement.state,
        }
    }
}

/// Every reason a received datagram is dropped, for the log.
const DROP_REASONS: [DropReason; 6] = [
    DropReason::BadLength,
    DropReason::BadMagic,
    DropReason::UnknownVersion,
    DropReason::BadField,
    DropReason::OtherCluster,
    DropReason::OwnBeacon,
];

/// One line per reason per interval of the limiter: a malformed datagram is a warning
/// (someone else's traffic on our port, or a bad sender), another cluster's or our own
/// beacon is routine (debug).
fn log_drop(limiter: &mut RateLimiter, reason: DropReason, from: SocketAddr, len: usize) {
    let key = format!("discovery_dropped/{}", reason.as_str());
    match reason {
        DropReason::OtherCluster | DropReason::OwnBeacon => log_limited!(
            limiter,
            key,
            tracing::Level::DEBUG,
            "discovery: datagram dropped",
            reason = reason.as_str(),
            %from,
            len
        ),
        _ => log_limited!(
            limiter,
            key,
            tracing::Level::WARN,
            "discovery: datagram dropped: not a valid clonekv beacon",
            reason = reason.as_str(),
            %from,
            len
        ),
    }
}

/// Where beacons go: the broadcast address of each IPv4 interface that is up (only the
/// one named, if any), and loopback's. Read from the system at every call.
fn broadcast_targets(interface: Option<&str>) -> Vec<Ipv4Addr> {
    // A failure to list interfaces is a send failure, logged by the caller.
    let interfaces = if_addrs::get_if_addrs().unwrap_or_default();
    let mut targets: Vec<Ipv4Addr> = Vec::new();
    for candidate in &interfaces {
        if interface.is_some_and(|name| name != candidate.name) {
            continue;
        }
        let if_addrs::IfAddr::V4(address) = &candidate.addr else {
            continue;
        };
        let target = if address.ip.is_loopback() {
            Some(LOOPBACK_BROADCAST)
        } else if candidate.is_p2p() || address.prefixlen >= 31 {
            // A point-to-point link or a /31 or /32 has no broadcast address.
            None
        } else {
            // An address added without `brd` has none configured; its subnet's is the
            // same computed from the mask
            // (`getifaddrs` then reports the unspecified address or the host's own).
            address
                .broadcast
                .filter(|broadcast| !broadcast.is_unspecified() && *broadcast != address.ip)
                .or(Some(directed_broadcast(address.ip, address.netmask)))
        };
        if let Some(target) = target {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    if interface.is_none() && !targets.contains(&LOOPBACK_BROADCAST) {
        targets.push(LOOPBACK_BROADCAST);
    }
    targets
}

/// The broadcast address of the subnet of `ip` with `netmask`.
fn directed_broadcast(ip: Ipv4Addr, netmask: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) | !u32::from(netmask))
}

fn open_socket(port: u16, interface: Option<&str>) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_broadcast(true)?;
    if let Some(interface) = interface {
        socket.bind_device(Some(interface.as_bytes()))?;
    }
    socket.set_nonblocking(true)?;
    // Every address: broadcasts are addressed to the subnet's broadcast address, which
    // a socket bound to a unicast address would not receive.
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(UdpSocket::from_std(socket.into()))
}

/// The address a discovered server is reached at, as a libzmq endpoint host.
pub fn endpoint_host(address: IpAddr) -> String {
    match address {
        IpAddr::V4(address) => address.to_string(),
        IpAddr::V6(address) => format!("[{address}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_always_a_target_when_no_interface_is_chosen() {
        assert!(broadcast_targets(None).contains(&LOOPBACK_BROADCAST));
    }

    #[test]
    fn an_interface_that_does_not_exist_has_no_targets() {
        assert!(broadcast_targets(Some("no-such-interface0")).is_empty());
    }

    #[test]
    fn the_directed_broadcast_sets_every_host_bit() {
        let broadcast =
            directed_broadcast(Ipv4Addr::new(10, 77, 0, 3), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(broadcast, Ipv4Addr::new(10, 77, 0, 255));
    }

    #[test]
    fn a_v6_address_is_bracketed_for_an_endpoint() {
        assert_eq!(endpoint_host("::1".parse().unwrap()), "[::1]");
        assert_eq!(endpoint_host("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }
}
