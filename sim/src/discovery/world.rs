//! The discovery world: nodes running the real [`Beacon`] machine on a simulated
//! broadcast LAN, with the oracles checked after every step.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use clonekv_core::beacon::{
    self, address_silence, Announcement, Beacon, Config, Datagram, DropReason, Event, Kind, Output,
    Peer, MAX_DATAGRAM_LEN, SOLICITED_BEACONS_PER_INTERVAL,
};
use clonekv_core::kvmsg::BstarState;
use clonekv_core::time::Instant;
use rand::RngExt;

use super::options::{streams, DiscoveryOptions};
use crate::trace::Trace;
use crate::world::TraceMode;
use crate::{derive_rng, SimRng};

/// The cluster under test, and a second one on the same LAN whose name shares its prefix.
pub const CLUSTERS: [&[u8]; 2] = [b"prod", b"prod2"];

/// Events kept for a failure report.
const RECENT_EVENTS: usize = 60;

/// Every drop reason, in a fixed order (for counters and oracle (iv)).
const DROP_REASONS: [DropReason; 6] = [
    DropReason::BadLength,
    DropReason::BadMagic,
    DropReason::UnknownVersion,
    DropReason::BadField,
    DropReason::OtherCluster,
    DropReason::OwnBeacon,
];

/// Which promise a run broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiscoveryOracle {
    /// (i) A live server is known to every live node of its cluster, with its current
    /// address and announcement, within [`DiscoveryOptions::convergence_bound`].
    Known,
    /// (ii) No peer is down while its beacons arrive, and none is up after `silence`
    /// without one.
    UpExactlyWhileHeard,
    /// (iii) No node of another cluster (or no node at all) ever appears.
    OtherCluster,
    /// (iv) Garbage changes only the counter of its reason.
    Garbage,
    /// (v) A peer's address moves only when its current address has been silent for
    /// [`address_silence`] (no flapping), and only to one it sends from.
    AddressFlap,
    /// (vi) A client sends one solicitation when it starts and nothing else; a server
    /// never sends two beacons closer than a tenth of an interval unless its state
    /// changed between; every datagram sent parses; timers advance.
    Machine,
}

impl fmt::Display for DiscoveryOracle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiscoveryOracle::Known => "(i) every live server known within the bound",
            DiscoveryOracle::UpExactlyWhileHeard => "(ii) up exactly while heard",
            DiscoveryOracle::OtherCluster => "(iii) no other cluster's node",
            DiscoveryOracle::Garbage => "(iv) garbage changes only counters",
            DiscoveryOracle::AddressFlap => "(v) no address flapping",
            DiscoveryOracle::Machine => {
                "(vi) clients solicit once, servers rate-bound, datagrams parse, timers advance"
            }
        })
    }
}

/// A broken promise: which, when, and what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryViolation {
    /// The oracle.
    pub oracle: DiscoveryOracle,
    /// World time.
    pub at: Instant,
    /// What it saw.
    pub detail: String,
}

/// Counts of what happened, so that a too-gentle world shows up as zeros.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryCoverage {
    /// Beacons broadcast by servers.
    pub beacons_sent: u64,
    /// Solicitations broadcast by clients (one per start).
    pub solicitations: u64,
    /// Datagrams delivered to a node (valid or not).
    pub delivered: u64,
    /// Datagrams lost by the network, duplicated, and cut by isolation or a dead node.
    pub lost: u64,
    /// Duplicates delivered.
    pub duplicated: u64,
    /// Datagrams cut by an isolation or a stopped node.
    pub cut: u64,
    /// Peer events seen by observers: up, changed, down.
    pub peer_up: u64,
    /// Peer events: changed.
    pub peer_changed: u64,
    /// Peer events: down.
    pub peer_down: u64,
    /// Address changes of the multi-homed server's peer entries (each checked by (v)).
    pub multi_homed_moves: u64,
    /// Peer changes back to an announcement the server had already replaced, after the
    /// observer had reported its current one (a reordered or duplicated old beacon:
    /// beacons carry no sequence number). The next beacon corrects it.
    pub stale_announcements: u64,
    /// Address changes of a moved server's peer entries.
    pub followed_moves: u64,
    /// Faults injected, by name.
    pub faults: BTreeMap<&'static str, u64>,
    /// Datagrams dropped by the machines, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// (observer, server) pairs checked by oracle (i) past the bound.
    pub known_checks: u64,
}

impl DiscoveryCoverage {
    /// Adds another run's counts.
    pub fn merge(&mut self, other: &DiscoveryCoverage) {
        self.beacons_sent += other.beacons_sent;
        self.solicitations += other.solicitations;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.cut += other.cut;
        self.peer_up += other.peer_up;
        self.peer_changed += other.peer_changed;
        self.peer_down += other.peer_down;
        self.multi_homed_moves += other.multi_homed_moves;
        self.stale_announcements += other.stale_announcements;
        self.followed_moves += other.followed_moves;
        self.known_checks += other.known_checks;
        for (name, count) in &other.faults {
            *self.faults.entry(name).or_default() += count;
        }
        for (name, count) in &other.dropped {
            *self.dropped.entry(name).or_default() += count;
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct DiscoveryReport {
    /// The first broken promise, if any.
    pub violation: Option<DiscoveryViolation>,
    /// Hash of every event: the same seed gives the same hash.
    pub trace_hash: u64,
    /// World time simulated.
    pub simulated: Duration,
    /// What happened.
    pub coverage: DiscoveryCoverage,
    /// The last events (with [`TraceMode::Recent`] or [`TraceMode::Print`]).
    pub recent: Vec<String>,
}

/// Garbage a node may receive, each with the reason its machine must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Garbage {
    /// A valid-looking beacon whose magic is wrong.
    WrongMagic,
    /// A valid beacon cut short.
    Truncated,
    /// Longer than any beacon (up to a full UDP datagram).
    Huge,
    /// A version this code does not read.
    UnknownVersion,
    /// A kind byte out of range.
    BadField,
    /// A well-formed beacon of a cluster with another name.
    OtherCluster,
    /// The receiver's own beacon, replayed.
    Own,
}

impl Garbage {
    const ALL: [Garbage; 7] = [
        Garbage::WrongMagic,
        Garbage::Truncated,
        Garbage::Huge,
        Garbage::UnknownVersion,
        Garbage::BadField,
        Garbage::OtherCluster,
        Garbage::Own,
    ];

    fn reason(self) -> DropReason {
        match self {
            Garbage::WrongMagic => DropReason::BadMagic,
            Garbage::Truncated | Garbage::Huge => DropReason::BadLength,
            Garbage::UnknownVersion => DropReason::UnknownVersion,
            Garbage::BadField => DropReason::BadField,
            Garbage::OtherCluster => DropReason::OtherCluster,
            Garbage::Own => DropReason::OwnBeacon,
        }
    }
}

/// A scripted fault, for scenarios.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scripted {
    /// Cut `node` off the LAN for `duration`.
    Isolate {
        /// The node.
        node: usize,
        /// How long.
        duration: Duration,
    },
    /// `node`'s process dies and restarts after `down_for` with a new instance id.
    Restart {
        /// The node.
        node: usize,
        /// How long it stays down.
        down_for: Duration,
    },
    /// Server `node` moves to a new address.
    Move {
        /// The node.
        node: usize,
    },
    /// Server `node`'s Binary Star state becomes `state`.
    SetState {
        /// The node.
        node: usize,
        /// The new state.
        state: BstarState,
    },
    /// `node` receives a garbage datagram.
    Garbage {
        /// The node.
        node: usize,
        /// What kind.
        garbage: Garbage,
    },
}

/// One node: its identity, where it is reached, and its machine while it runs.
struct Node {
    name: String,
    cluster: usize,
    announcement: Announcement,
    /// Source addresses its broadcasts leave from; the first is its main one.
    addresses: Vec<IpAddr>,
    /// Its clock reads world time plus this (machines never share an origin).
    clock_offset: Duration,
    beacon: Option<Beacon>,
    instance: [u8; 16],
    rng: SimRng,
    isolated_until: Option<Instant>,
    restart_at: Option<Instant>,
    /// Oracle (i): since when this node, as a server, has been heard unchanged.
    announced_since: Instant,
    /// Oracle (i): since when this node, as an observer, has been listening undisturbed.
    listening_since: Instant,
    /// Oracle (ii) and (v): when each (instance, source address) last reached it.
    arrivals: BTreeMap<([u8; 16], IpAddr), Instant>,
    /// Oracle (v): the address each peer was last reported at.
    reported_address: BTreeMap<[u8; 16], IpAddr>,
    /// When it last started, and what it sent since: oracle (vi).
    started_at: Instant,
    sent_since_start: u64,
    last_sent: Option<Instant>,
    state_changed_since_sent: bool,
    /// The announcement each peer was last reported with.
    reported_announcement: BTreeMap<[u8; 16], Announcement>,
}

impl Node {
    fn is_server(&self) -> bool {
        self.announcement.kind != Kind::Client
    }

    fn local(&self, now: Instant) -> Instant {
        now + self.clock_offset
    }

    fn world(&self, local: Instant) -> Instant {
        Instant::from_nanos(
            local
                .as_nanos()
                .saturating_sub(u64::try_from(self.clock_offset.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// Up and on the LAN.
    fn is_live(&self) -> bool {
        self.beacon.is_some() && self.isolated_until.is_none()
    }

    fn initial_announcement(&self) -> Announcement {
        let state = match self.announcement.kind {
            Kind::Client => None,
            Kind::Primary => Some(BstarState::Primary),
            Kind::Backup => Some(BstarState::Backup),
        };
        Announcement {
            state,
            ..self.announcement
        }
    }

    fn own_beacon(&self) -> Vec<u8> {
        Datagram {
            cluster: CLUSTERS
                .get(self.cluster)
                .copied()
                .unwrap_or_default()
                .to_vec(),
            instance: self.instance,
            announcement: self.announcement,
        }
        .encode()
    }
}

/// A datagram on its way.
struct InFlight {
    to: usize,
    /// The sending node, or `None` for garbage.
    from: Option<usize>,
    source: IpAddr,
    bytes: Vec<u8>,
    garbage: Option<Garbage>,
}

/// A whole discovery world. Node numbering: 0 and 1 are the primary and backup of
/// cluster `prod`, then its clients, then the primary and backup of `prod2` and, if
/// configured, its client.
pub struct DiscoveryWorld {
    seed: u64,
    options: DiscoveryOptions,
    now: Instant,
    end: Instant,
    fault_end: Instant,
    next_tick: Instant,
    nodes: Vec<Node>,
    in_flight: BTreeMap<(Instant, u64), InFlight>,
    sequence: u64,
    /// Consecutive losses per (sender, source address, receiver).
    losses_in_a_row: BTreeMap<(usize, IpAddr, usize), u32>,
    /// Every instance id ever used, and its node.
    instances: BTreeMap<[u8; 16], usize>,
    next_moved_host: u8,
    multi_homed_node: Option<usize>,
    network_rng: SimRng,
    fault_rng: SimRng,
    script: VecDeque<(Instant, Scripted)>,
    violation: Option<DiscoveryViolation>,
    coverage: DiscoveryCoverage,
    trace: Trace,
}

/// A node's address on the LAN.
fn lan_address(node: usize, net: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        0,
        net,
        u8::try_from(10 + node).unwrap_or(u8::MAX),
    ))
}

impl DiscoveryWorld {
    /// The world of `seed` with `options` (random faults as the options say).
    pub fn new(seed: u64, options: DiscoveryOptions, trace_mode: TraceMode) -> DiscoveryWorld {
        let clocks = &mut derive_rng(seed, streams::CLOCKS);
        let mut layout: Vec<(usize, Kind, u16)> =
            vec![(0, Kind::Primary, 5556), (0, Kind::Backup, 5566)];
        layout.extend((0..options.clients).map(|_| (0, Kind::Client, 0)));
        layout.push((1, Kind::Primary, 6556));
        layout.push((1, Kind::Backup, 6566));
        if options.other_cluster_client {
            layout.push((1, Kind::Client, 0));
        }
        let multi_homed_node = options.multi_homed.then(|| clocks.random_range(0..2usize));
        let mut client_number = 0;
        let nodes = layout
            .into_iter()
            .enumerate()
            .map(|(index, (cluster, kind, base_port))| {
                let role = match kind {
                    Kind::Primary => "primary".to_string(),
                    Kind::Backup => "backup".to_string(),
                    Kind::Client => {
                        client_number += 1;
                        format!("client{client_number}")
                    }
                };
                let cluster_name =
                    String::from_utf8_lossy(CLUSTERS.get(cluster).copied().unwrap_or_default())
                        .into_owned();
                let mut addresses = vec![lan_address(index, 0)];
                if multi_homed_node == Some(index) {
                    addresses.push(lan_address(index, 1));
                }
                let start = Instant::from_nanos(clocks.random_range(0..=2_000_000_000));
                let announcement = Announcement {
                    kind,
                    state: None,
                    base_port,
                    state_port: if base_port == 0 { 0 } else { base_port - 553 },
                };
                Node {
                    name: format!("{cluster_name}.{role}"),
                    cluster,
                    announcement,
                    addresses,
                    clock_offset: Duration::from_millis(clocks.random_range(0..=1_000_000)),
                    beacon: None,
                    instance: [0; 16],
                    rng: derive_rng(seed, streams::NODE_BASE + index as u64),
                    isolated_until: None,
                    restart_at: Some(start),
                    announced_since: start,
                    listening_since: start,
                    arrivals: BTreeMap::new(),
                    reported_address: BTreeMap::new(),
                    reported_announcement: BTreeMap::new(),
                    started_at: start,
                    sent_since_start: 0,
                    last_sent: None,
                    state_changed_since_sent: false,
                }
            })
            .collect();
        let fault_end = Instant::ZERO + options.fault_phase;
        DiscoveryWorld {
            seed,
            now: Instant::ZERO,
            end: fault_end + options.heal_phase,
            fault_end,
            next_tick: Instant::ZERO + options.tick,
            nodes,
            in_flight: BTreeMap::new(),
            sequence: 0,
            losses_in_a_row: BTreeMap::new(),
            instances: BTreeMap::new(),
            next_moved_host: 0,
            multi_homed_node,
            network_rng: derive_rng(seed, streams::NETWORK),
            fault_rng: derive_rng(seed, streams::FAULTS),
            script: VecDeque::new(),
            violation: None,
            coverage: DiscoveryCoverage::default(),
            trace: Trace::new(trace_mode, RECENT_EVENTS),
            options,
        }
    }

    /// A world with no random faults: `script` (times from the start) decides them.
    pub fn with_script(
        seed: u64,
        options: DiscoveryOptions,
        mut script: Vec<(Duration, Scripted)>,
        trace_mode: TraceMode,
    ) -> DiscoveryWorld {
        let mut world = DiscoveryWorld::new(
            seed,
            DiscoveryOptions {
                isolate: crate::ratio::Ratio::NEVER,
                restart: crate::ratio::Ratio::NEVER,
                move_server: crate::ratio::Ratio::NEVER,
                state_change: crate::ratio::Ratio::NEVER,
                garbage: crate::ratio::Ratio::NEVER,
                ..options
            },
            trace_mode,
        );
        script.sort_by_key(|(at, _)| *at);
        world.script = script
            .into_iter()
            .map(|(at, scripted)| (Instant::ZERO + at, scripted))
            .collect();
        world
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The options.
    pub fn options(&self) -> &DiscoveryOptions {
        &self.options
    }

    /// World time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// How many nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node that is heard from two addresses, if any.
    pub fn multi_homed_node(&self) -> Option<usize> {
        self.multi_homed_node
    }

    /// A node's name (`prod.client2`, ...).
    pub fn name(&self, node: usize) -> &str {
        self.nodes.get(node).map_or("?", |node| node.name.as_str())
    }

    /// A node's current instance id (zero before it first starts).
    pub fn instance(&self, node: usize) -> [u8; 16] {
        self.nodes.get(node).map_or([0; 16], |node| node.instance)
    }

    /// A node's source addresses, main one first.
    pub fn addresses(&self, node: usize) -> Vec<IpAddr> {
        self.nodes
            .get(node)
            .map(|node| node.addresses.clone())
            .unwrap_or_default()
    }

    /// What a node announces now.
    pub fn announcement(&self, node: usize) -> Option<Announcement> {
        self.nodes.get(node).map(|node| node.announcement)
    }

    /// The peers `node`'s machine knows now (none while it is down).
    pub fn peers(&self, node: usize) -> Vec<Peer> {
        self.nodes
            .get(node)
            .and_then(|node| node.beacon.as_ref())
            .map(|beacon| beacon.peers().cloned().collect())
            .unwrap_or_default()
    }

    /// What happened so far.
    pub fn coverage(&self) -> &DiscoveryCoverage {
        &self.coverage
    }

    /// The first violation so far.
    pub fn violation(&self) -> Option<&DiscoveryViolation> {
        self.violation.as_ref()
    }

    /// Runs to the end of the heal phase (or the first violation) and reports.
    pub fn run(mut self) -> DiscoveryReport {
        let end = self.end;
        self.run_until(end);
        self.check_all_converged();
        self.finish()
    }

    /// The report of the run so far.
    pub fn finish(mut self) -> DiscoveryReport {
        for index in 0..self.nodes.len() {
            self.retire_counters(index);
        }
        let (trace_hash, recent) = self.trace.finish();
        DiscoveryReport {
            violation: self.violation,
            trace_hash,
            simulated: self.now.saturating_duration_since(Instant::ZERO),
            coverage: self.coverage,
            recent,
        }
    }

    /// Runs every event up to world time `until`, stopping at the first violation.
    pub fn run_until(&mut self, until: Instant) {
        if let Err(error) = self.options.validate() {
            self.violate(
                DiscoveryOracle::Machine,
                format!("invalid options: {error}"),
            );
            return;
        }
        while self.violation.is_none() {
            let Some(next) = self.next_event().filter(|next| *next <= until) else {
                break;
            };
            self.now = self.now.max(next);
            self.step();
            if self.violation.is_none() {
                self.check_step_oracles();
            }
        }
        self.now = self.now.max(until);
    }

    fn next_event(&self) -> Option<Instant> {
        let deliveries = self.in_flight.keys().next().map(|(at, _)| *at);
        let timers = self.nodes.iter().filter_map(|node| {
            let due = node.beacon.as_ref()?.poll_timeout()?;
            Some(node.world(due))
        });
        let expiries = self
            .nodes
            .iter()
            .flat_map(|node| [node.isolated_until, node.restart_at])
            .flatten();
        let tick = (self.next_tick < self.fault_end).then_some(self.next_tick);
        let script = self.script.front().map(|(at, _)| *at);
        deliveries
            .into_iter()
            .chain(timers)
            .chain(expiries)
            .chain(tick)
            .chain(script)
            .min()
    }

    /// Everything due at `self.now`, in a fixed order: restarts and heals, deliveries,
    /// timers, the script, the fault tick.
    fn step(&mut self) {
        let now = self.now;
        for index in 0..self.nodes.len() {
            if self
                .nodes
                .get(index)
                .and_then(|node| node.restart_at)
                .is_some_and(|at| at <= now)
            {
                self.start(index);
            }
            if self
                .nodes
                .get(index)
                .and_then(|node| node.isolated_until)
                .is_some_and(|at| at <= now)
            {
                self.heal(index);
            }
        }
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let datagram = entry.remove();
            self.deliver(datagram);
            if self.violation.is_some() {
                return;
            }
        }
        for index in 0..self.nodes.len() {
            self.fire_timers(index);
        }
        while self.script.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, scripted)) = self.script.pop_front() {
                self.apply(scripted);
            }
        }
        if self.next_tick <= now && self.next_tick < self.fault_end {
            self.next_tick += self.options.tick;
            self.fault_tick();
        }
    }

    fn fire_timers(&mut self, index: usize) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(index) else {
            return;
        };
        let local = node.local(now);
        let Some(beacon) = node.beacon.as_mut() else {
            return;
        };
        if beacon.poll_timeout().is_none_or(|due| due > local) {
            return;
        }
        beacon.handle_timeout(local);
        if beacon.poll_timeout().is_some_and(|due| due <= local) {
            let name = node.name.clone();
            self.violate(
                DiscoveryOracle::Machine,
                format!("{name}'s timer did not advance past {local:?} after it fired"),
            );
        }
        self.drain(index);
    }

    /// Takes a node's outputs: broadcasts its beacons, checks its events.
    fn drain(&mut self, index: usize) {
        loop {
            let Some(output) = self
                .nodes
                .get_mut(index)
                .and_then(|node| node.beacon.as_mut())
                .and_then(Beacon::poll_output)
            else {
                return;
            };
            match output {
                Output::Send(bytes) => self.broadcast(index, bytes),
                Output::Event(event) => self.observe(index, event),
            }
        }
    }

    /// A node's beacon leaves from each of its addresses to every node on the LAN (itself
    /// included: a broadcast loops back).
    fn broadcast(&mut self, from: usize, bytes: Vec<u8>) {
        let Some(sender) = self.nodes.get(from) else {
            return;
        };
        let name = sender.name.clone();
        let gap = self.options.interval / SOLICITED_BEACONS_PER_INTERVAL;
        if !sender.is_server() && (sender.sent_since_start > 0 || sender.started_at != self.now) {
            return self.violate(
                DiscoveryOracle::Machine,
                format!("client {name} sent more than its one solicitation when it started"),
            );
        }
        if let Some(last) = sender
            .last_sent
            .filter(|last| !sender.state_changed_since_sent && *last + gap > self.now)
        {
            return self.violate(
                DiscoveryOracle::Machine,
                format!(
                    "{name} sent two beacons {:?} apart with no state change between",
                    self.now.saturating_duration_since(last)
                ),
            );
        }
        if Datagram::decode(&bytes).is_err() {
            return self.violate(
                DiscoveryOracle::Machine,
                format!("{name} sent a beacon that does not parse: {bytes:?}"),
            );
        }
        let addresses = sender.addresses.clone();
        let sender_isolated = sender.isolated_until.is_some();
        if sender.is_server() {
            self.coverage.beacons_sent += 1;
        } else {
            self.coverage.solicitations += 1;
        }
        if let Some(sender) = self.nodes.get_mut(from) {
            sender.sent_since_start += 1;
            sender.last_sent = Some(self.now);
            sender.state_changed_since_sent = false;
        }
        self.trace(
            || format!("{name} broadcasts {} bytes", bytes.len()),
            &(1u8, from, &bytes),
        );
        for source in addresses {
            for to in 0..self.nodes.len() {
                if sender_isolated {
                    self.coverage.cut += 1;
                    continue;
                }
                self.transmit(Some(from), source, to, bytes.clone(), None);
            }
        }
    }

    /// One datagram onto the wire towards `to`: lost, delayed, maybe duplicated.
    fn transmit(
        &mut self,
        from: Option<usize>,
        source: IpAddr,
        to: usize,
        bytes: Vec<u8>,
        garbage: Option<Garbage>,
    ) {
        if let Some(from) = from.filter(|from| *from != to) {
            let in_a_row = self.losses_in_a_row.entry((from, source, to)).or_default();
            if *in_a_row < self.options.max_consecutive_losses
                && self.options.loss.sample(&mut self.network_rng)
            {
                *in_a_row += 1;
                self.coverage.lost += 1;
                let trace_name = self.name(to).to_string();
                self.trace(
                    || format!("lost: from {source} to {trace_name}"),
                    &(2u8, from, source, to),
                );
                return;
            }
            *in_a_row = 0;
        }
        let copies = if self.options.duplicate.sample(&mut self.network_rng) {
            self.coverage.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay =
                Duration::from_nanos(self.network_rng.random_range(
                    0..=u64::try_from(self.options.delay_max.as_nanos()).unwrap_or(0),
                ));
            if self.options.spike.sample(&mut self.network_rng) {
                delay += Duration::from_nanos(self.network_rng.random_range(
                    0..=u64::try_from(self.options.spike_max.as_nanos()).unwrap_or(0),
                ));
            }
            self.sequence += 1;
            self.in_flight.insert(
                (self.now + delay, self.sequence),
                InFlight {
                    to,
                    from,
                    source,
                    bytes: bytes.clone(),
                    garbage,
                },
            );
        }
    }

    fn deliver(&mut self, datagram: InFlight) {
        let InFlight {
            to,
            from,
            source,
            mut bytes,
            garbage,
        } = datagram;
        let now = self.now;
        let sender_isolated = from
            .and_then(|from| self.nodes.get(from))
            .is_some_and(|sender| sender.isolated_until.is_some());
        let Some(node) = self.nodes.get_mut(to) else {
            return;
        };
        if !node.is_live() || sender_isolated {
            self.coverage.cut += 1;
            return;
        }
        self.coverage.delivered += 1;
        if garbage == Some(Garbage::Own) {
            // Its own beacon as it is now: the one it sent may predate a restart.
            bytes = node.own_beacon();
        }
        let local = node.local(now);
        let own_cluster = CLUSTERS.get(node.cluster).copied().unwrap_or_default();
        let name = node.name.clone();
        let Some(beacon) = node.beacon.as_mut() else {
            return;
        };
        // What oracle (iv) compares: nothing but one counter may change.
        let before = garbage.map(|_| {
            (
                beacon.peers().cloned().collect::<Vec<Peer>>(),
                beacon.poll_timeout(),
                DROP_REASONS.map(|reason| beacon.dropped(reason)),
            )
        });
        beacon.handle_datagram(local, source, &bytes);
        if let (Some(garbage), Some((peers, timeout, dropped))) = (garbage, before) {
            let expected = DROP_REASONS.map(|reason| {
                dropped[DROP_REASONS.iter().position(|r| *r == reason).unwrap_or(0)]
                    + u64::from(reason == garbage.reason())
            });
            let after_peers: Vec<Peer> = beacon.peers().cloned().collect();
            let after_dropped = DROP_REASONS.map(|reason| beacon.dropped(reason));
            let output = beacon.poll_output();
            if after_peers != peers
                || beacon.poll_timeout() != timeout
                || after_dropped != expected
                || output.is_some()
            {
                return self.violate(
                    DiscoveryOracle::Garbage,
                    format!(
                        "{garbage:?} ({} bytes) from {source} changed {name}: counters {after_dropped:?} \
                         (expected {expected:?}), peers {} -> {}, output {output:?}",
                        bytes.len(),
                        peers.len(),
                        after_peers.len()
                    ),
                );
            }
            self.trace(
                || format!("{name} dropped {garbage:?} from {source}"),
                &(3u8, to, garbage),
            );
            return;
        }
        // A valid beacon of this node's cluster from another node: record its arrival.
        if let Ok(datagram) = Datagram::decode(&bytes) {
            if datagram.cluster == own_cluster
                && datagram.instance != node.instance
                && datagram.announcement.kind != Kind::Client
            {
                node.arrivals.insert((datagram.instance, source), now);
            }
        }
        self.trace(
            || format!("{name} receives {} bytes from {source}", bytes.len()),
            &(4u8, to, source),
        );
        self.drain(to);
    }

    /// Oracles (ii), (iii), (v) on one event of `observer`'s machine.
    fn observe(&mut self, observer: usize, event: Event) {
        let now = self.now;
        let silence = self.options.silence;
        let sticky_for = address_silence(self.options.interval);
        let Some(node) = self.nodes.get(observer) else {
            return;
        };
        let name = node.name.clone();
        let instance = match &event {
            Event::PeerUp(peer) | Event::PeerChanged(peer) => peer.instance,
            Event::PeerDown { instance } => *instance,
        };
        let owner = self.instances.get(&instance).copied();
        let owner_name = owner.map_or("an unknown instance".to_string(), |owner| {
            self.name(owner).to_string()
        });
        self.trace(
            || format!("{name} sees {owner_name}: {event:?}"),
            &(5u8, observer, &event),
        );
        let Some(node) = self.nodes.get(observer) else {
            return;
        };
        let last_heard = node
            .arrivals
            .range((instance, IpAddr::V4(Ipv4Addr::UNSPECIFIED))..)
            .take_while(|((heard, _), _)| *heard == instance)
            .map(|(_, at)| *at)
            .max();
        let previous = node.reported_address.get(&instance).copied();
        let reported_up = matches!(event, Event::PeerUp(_));
        match event {
            Event::PeerUp(peer) | Event::PeerChanged(peer) => {
                let is_up = previous.is_none();
                let same_cluster = owner
                    .and_then(|owner| self.nodes.get(owner))
                    .is_some_and(|owner| owner.cluster == node.cluster);
                // A node may hear its previous incarnation's last beacons after a quick
                // restart: of its cluster, but never its current instance.
                if !same_cluster
                    || instance == node.instance
                    || peer.announcement.kind == Kind::Client
                {
                    return self.violate(
                        DiscoveryOracle::OtherCluster,
                        format!("{name} reports {owner_name} ({peer:?}), not another node of its cluster"),
                    );
                }
                if !node.arrivals.contains_key(&(instance, peer.address)) {
                    return self.violate(
                        DiscoveryOracle::AddressFlap,
                        format!(
                            "{name} reports {owner_name} at {}, an address it never heard it from",
                            peer.address
                        ),
                    );
                }
                if reported_up != is_up {
                    return self.violate(
                        DiscoveryOracle::UpExactlyWhileHeard,
                        format!(
                            "{name} reports {owner_name} {} while it was {}",
                            if reported_up { "up" } else { "changed" },
                            if is_up { "down" } else { "up" }
                        ),
                    );
                }
                if is_up {
                    self.coverage.peer_up += 1;
                } else {
                    self.coverage.peer_changed += 1;
                }
                let reverted = owner
                    .and_then(|owner| self.nodes.get(owner))
                    .is_some_and(|owner| {
                        owner.instance == instance
                            && owner.announcement != peer.announcement
                            && node.reported_announcement.get(&instance)
                                == Some(&owner.announcement)
                    });
                if reverted {
                    self.coverage.stale_announcements += 1;
                }
                if let Some(previous) = previous.filter(|previous| *previous != peer.address) {
                    let previous_heard = node
                        .arrivals
                        .get(&(instance, previous))
                        .copied()
                        .unwrap_or(Instant::ZERO);
                    if previous_heard + sticky_for > now {
                        return self.violate(
                            DiscoveryOracle::AddressFlap,
                            format!(
                                "{name} moved {owner_name} from {previous} to {} while {previous} was heard {:?} ago",
                                peer.address,
                                now.saturating_duration_since(previous_heard)
                            ),
                        );
                    }
                    if owner.is_some() && owner == self.multi_homed_node {
                        self.coverage.multi_homed_moves += 1;
                    } else {
                        self.coverage.followed_moves += 1;
                    }
                }
                if let Some(node) = self.nodes.get_mut(observer) {
                    node.reported_address.insert(instance, peer.address);
                    node.reported_announcement
                        .insert(instance, peer.announcement);
                }
            }
            Event::PeerDown { .. } => {
                self.coverage.peer_down += 1;
                if previous.is_none() {
                    return self.violate(
                        DiscoveryOracle::UpExactlyWhileHeard,
                        format!("{name} reports {owner_name} down, which it never reported up"),
                    );
                }
                if let Some(heard) = last_heard.filter(|heard| *heard + silence > now) {
                    return self.violate(
                        DiscoveryOracle::UpExactlyWhileHeard,
                        format!(
                            "{name} reports {owner_name} down although its beacon arrived {:?} ago",
                            now.saturating_duration_since(heard)
                        ),
                    );
                }
                if let Some(node) = self.nodes.get_mut(observer) {
                    node.reported_address.remove(&instance);
                    node.reported_announcement.remove(&instance);
                }
            }
        }
    }

    /// Oracles checked after every step: (ii)'s other half (no peer up after silence)
    /// and (i).
    fn check_step_oracles(&mut self) {
        let now = self.now;
        let silence = self.options.silence;
        let bound = self.options.convergence_bound();
        let mut failure = None;
        'observers: for observer in &self.nodes {
            let Some(beacon) = observer.beacon.as_ref() else {
                continue;
            };
            for peer in beacon.peers() {
                let last_heard = observer
                    .arrivals
                    .range((peer.instance, IpAddr::V4(Ipv4Addr::UNSPECIFIED))..)
                    .take_while(|((heard, _), _)| *heard == peer.instance)
                    .map(|(_, at)| *at)
                    .max();
                if last_heard.is_none_or(|heard| heard + silence <= now) {
                    failure = Some((
                        DiscoveryOracle::UpExactlyWhileHeard,
                        format!(
                            "{} still holds {:?} up, last heard {last_heard:?}",
                            observer.name, peer
                        ),
                    ));
                    break 'observers;
                }
            }
            if !observer.is_live() || !self.options.checks_convergence() {
                continue;
            }
            for server in &self.nodes {
                if !server.is_server()
                    || server.cluster != observer.cluster
                    || std::ptr::eq(server, observer)
                    || !server.is_live()
                {
                    continue;
                }
                let since = observer.listening_since.max(server.announced_since);
                if since + bound > now {
                    continue;
                }
                self.coverage.known_checks += 1;
                let known = beacon.peers().find(|peer| peer.instance == server.instance);
                let at_home = |peer: &&Peer| {
                    let current = if server.addresses.len() > 1 {
                        server.addresses.contains(&peer.address)
                    } else {
                        server.addresses.first() == Some(&peer.address)
                    };
                    current && peer.announcement == server.announcement
                };
                if !known.as_ref().is_some_and(at_home) {
                    failure = Some((
                        DiscoveryOracle::Known,
                        format!(
                            "{} does not know {} as it is ({:?} at {:?}, announcing {:?}) {:?} after both settled \
                             (bound {bound:?}); it holds {known:?}",
                            observer.name,
                            server.name,
                            server.instance,
                            server.addresses,
                            server.announcement,
                            now.saturating_duration_since(since)
                        ),
                    ));
                    break 'observers;
                }
            }
        }
        if let Some((oracle, detail)) = failure {
            self.violate(oracle, detail);
        }
    }

    /// At the end of the heal phase every node runs, and oracle (i) must have held for
    /// every pair (the heal phase is longer than any fault plus the bound).
    fn check_all_converged(&mut self) {
        if self.violation.is_some() || !self.options.checks_convergence() {
            return;
        }
        let bound = self.options.convergence_bound();
        for node in &self.nodes {
            let since = node.listening_since.max(node.announced_since);
            if !node.is_live() || since + bound > self.now {
                let detail = format!(
                    "{} has not run undisturbed for the bound at the end of the heal phase",
                    node.name
                );
                return self.violate(DiscoveryOracle::Known, detail);
            }
        }
        self.check_step_oracles();
    }

    fn start(&mut self, index: usize) {
        let now = self.now;
        let options_interval = self.options.interval;
        let options_silence = self.options.silence;
        let Some(node) = self.nodes.get_mut(index) else {
            return;
        };
        node.restart_at = None;
        node.instance = node.rng.random();
        node.announcement = node.initial_announcement();
        node.arrivals.clear();
        node.reported_address.clear();
        node.reported_announcement.clear();
        node.started_at = now;
        node.sent_since_start = 0;
        node.last_sent = None;
        node.state_changed_since_sent = false;
        node.announced_since = now;
        node.listening_since = now;
        let config = Config {
            interval: options_interval,
            silence: options_silence,
            ..Config::new(
                CLUSTERS.get(node.cluster).copied().unwrap_or_default(),
                node.instance,
                node.announcement,
            )
        };
        let local = node.local(now);
        let name = node.name.clone();
        let instance = node.instance;
        match Beacon::new(local, config) {
            Ok(beacon) => node.beacon = Some(beacon),
            Err(error) => {
                return self.violate(
                    DiscoveryOracle::Machine,
                    format!("{name} refused its configuration: {error}"),
                )
            }
        }
        self.instances.insert(instance, index);
        self.trace(
            || format!("{name} starts as {instance:02x?}"),
            &(6u8, index, instance),
        );
        // A client's solicitation is out at once, before any timer.
        self.drain(index);
        self.fire_timers(index);
    }

    fn heal(&mut self, index: usize) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(index) else {
            return;
        };
        node.isolated_until = None;
        node.announced_since = now;
        node.listening_since = now;
        let name = node.name.clone();
        self.trace(|| format!("{name} healed"), &(7u8, index));
    }

    fn count_fault(&mut self, name: &'static str) {
        *self.coverage.faults.entry(name).or_default() += 1;
    }

    fn apply(&mut self, scripted: Scripted) {
        let now = self.now;
        match scripted {
            Scripted::Isolate { node, duration } => {
                let Some(target) = self.nodes.get_mut(node) else {
                    return;
                };
                if target.isolated_until.is_none() {
                    target.isolated_until = Some(now + duration.max(Duration::from_nanos(1)));
                    let name = target.name.clone();
                    self.count_fault("isolate");
                    self.trace(
                        || format!("{name} isolated for {duration:?}"),
                        &(8u8, node, duration),
                    );
                }
            }
            Scripted::Restart { node, down_for } => {
                let Some(target) = self.nodes.get(node) else {
                    return;
                };
                if target.restart_at.is_some() {
                    return;
                }
                self.retire_counters(node);
                let Some(target) = self.nodes.get_mut(node) else {
                    return;
                };
                target.beacon = None;
                target.restart_at = Some(now + down_for);
                let name = target.name.clone();
                self.count_fault("restart");
                self.trace(
                    || format!("{name} dies, back in {down_for:?}"),
                    &(9u8, node, down_for),
                );
            }
            Scripted::Move { node } => {
                self.next_moved_host = self.next_moved_host.wrapping_add(1);
                let address = IpAddr::V4(Ipv4Addr::new(10, 0, 2, self.next_moved_host));
                let Some(target) = self.nodes.get_mut(node) else {
                    return;
                };
                if !target.is_server() || target.addresses.len() != 1 {
                    return;
                }
                target.addresses = vec![address];
                target.announced_since = now;
                let name = target.name.clone();
                self.count_fault("move");
                self.trace(
                    || format!("{name} moves to {address}"),
                    &(10u8, node, address),
                );
            }
            Scripted::SetState { node, state } => {
                let Some(target) = self.nodes.get_mut(node) else {
                    return;
                };
                if !target.is_server() || target.announcement.state == Some(state) {
                    return;
                }
                let local = target.local(now);
                target.announcement.state = Some(state);
                target.announced_since = now;
                target.state_changed_since_sent = true;
                if let Some(beacon) = target.beacon.as_mut() {
                    beacon.set_state(local, state);
                }
                let name = target.name.clone();
                self.count_fault("state change");
                self.trace(
                    || format!("{name} is now {state:?}"),
                    &(11u8, node, state_byte(state)),
                );
                self.fire_timers(node);
            }
            Scripted::Garbage { node, garbage } => {
                if node >= self.nodes.len() {
                    return;
                }
                let bytes = self.garbage_bytes(node, garbage);
                let source = IpAddr::V4(Ipv4Addr::new(
                    10,
                    0,
                    9,
                    self.fault_rng.random_range(1..=254),
                ));
                self.count_fault("garbage");
                self.transmit(None, source, node, bytes, Some(garbage));
            }
        }
    }

    fn garbage_bytes(&mut self, node: usize, garbage: Garbage) -> Vec<u8> {
        let rng = &mut self.fault_rng;
        let Some(target) = self.nodes.get(node) else {
            return Vec::new();
        };
        let cluster = CLUSTERS
            .get(target.cluster)
            .copied()
            .unwrap_or_default()
            .to_vec();
        let stranger = Datagram {
            cluster: cluster.clone(),
            instance: rng.random(),
            announcement: Announcement {
                kind: Kind::Primary,
                state: Some(BstarState::Active),
                base_port: 7000,
                state_port: 7001,
            },
        }
        .encode();
        let kind_at = stranger.len().saturating_sub(6);
        match garbage {
            Garbage::WrongMagic => {
                let mut bytes = stranger;
                let at = rng.random_range(0..4);
                if let Some(byte) = bytes.get_mut(at) {
                    *byte ^= rng.random_range(1..=255u8);
                }
                bytes
            }
            Garbage::Truncated => {
                let len = rng.random_range(0..stranger.len());
                stranger.get(..len).unwrap_or_default().to_vec()
            }
            Garbage::Huge => {
                let len = rng.random_range(MAX_DATAGRAM_LEN + 1..=65_507);
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                // Sometimes a valid beacon followed by junk.
                if rng.random_ratio(1, 2) {
                    if let Some(head) = bytes.get_mut(..stranger.len()) {
                        head.copy_from_slice(&stranger);
                    }
                }
                bytes
            }
            Garbage::UnknownVersion => {
                let mut bytes = stranger;
                if let Some(version) = bytes.get_mut(4) {
                    *version = rng.random_range(2..=255);
                }
                bytes
            }
            Garbage::BadField => {
                let mut bytes = stranger;
                if let Some(kind) = bytes.get_mut(kind_at) {
                    *kind = rng.random_range(3..=255);
                }
                bytes
            }
            Garbage::OtherCluster => {
                let mut other = cluster;
                match rng.random_range(0..3) {
                    0 => other.push(b'x'),
                    1 => {
                        other = other
                            .get(..other.len().saturating_sub(1))
                            .unwrap_or_default()
                            .to_vec()
                    }
                    _ => {
                        other = (0..rng.random_range(1..=beacon::MAX_CLUSTER_LEN))
                            .map(|_| rng.random())
                            .collect()
                    }
                }
                if other.is_empty()
                    || other == CLUSTERS.get(target.cluster).copied().unwrap_or_default()
                {
                    other = b"elsewhere".to_vec();
                }
                Datagram {
                    cluster: other,
                    instance: rng.random(),
                    announcement: Announcement {
                        kind: Kind::Backup,
                        state: Some(BstarState::Passive),
                        base_port: 7000,
                        state_port: 7001,
                    },
                }
                .encode()
            }
            Garbage::Own => target.own_beacon(),
        }
    }

    /// One fault tick: each node in turn may be isolated, restarted, moved, change state
    /// or receive garbage.
    fn fault_tick(&mut self) {
        let options = self.options.clone();
        for node in 0..self.nodes.len() {
            let Some(target) = self.nodes.get(node) else {
                continue;
            };
            let running = target.beacon.is_some();
            let server = target.is_server();
            if running && options.isolate.sample(&mut self.fault_rng) {
                let duration = Duration::from_millis(
                    self.fault_rng.random_range(
                        100..=u64::try_from(options.isolate_max.as_millis())
                            .unwrap_or(100)
                            .max(100),
                    ),
                );
                self.apply(Scripted::Isolate { node, duration });
            }
            if running && options.restart.sample(&mut self.fault_rng) {
                let down_for = Duration::from_millis(self.fault_rng.random_range(
                    0..=u64::try_from(options.restart_delay_max.as_millis()).unwrap_or(0),
                ));
                self.apply(Scripted::Restart { node, down_for });
            }
            if server && options.move_server.sample(&mut self.fault_rng) {
                self.apply(Scripted::Move { node });
            }
            if server && running && options.state_change.sample(&mut self.fault_rng) {
                let state = [
                    BstarState::Primary,
                    BstarState::Backup,
                    BstarState::Active,
                    BstarState::Passive,
                ][self.fault_rng.random_range(0..4usize)];
                self.apply(Scripted::SetState { node, state });
            }
            if options.garbage.sample(&mut self.fault_rng) {
                for _ in 0..self.fault_rng.random_range(1..=5) {
                    let garbage = Garbage::ALL[self.fault_rng.random_range(0..Garbage::ALL.len())];
                    self.apply(Scripted::Garbage { node, garbage });
                }
            }
        }
    }

    /// Adds a machine's drop counters to the coverage before it is replaced.
    fn retire_counters(&mut self, index: usize) {
        let Some(beacon) = self
            .nodes
            .get_mut(index)
            .and_then(|node| node.beacon.take())
        else {
            return;
        };
        for reason in DROP_REASONS {
            *self.coverage.dropped.entry(reason.as_str()).or_default() += beacon.dropped(reason);
        }
        if let Some(node) = self.nodes.get_mut(index) {
            node.beacon = Some(beacon);
        }
    }

    fn violate(&mut self, oracle: DiscoveryOracle, detail: String) {
        if self.violation.is_none() {
            self.trace(|| format!("VIOLATION {oracle}: {detail}"), &(99u8,));
            self.violation = Some(DiscoveryViolation {
                oracle,
                at: self.now,
                detail,
            });
        }
    }

    fn trace<T: Hash + ?Sized>(&mut self, describe: impl FnOnce() -> String, data: &T) {
        self.trace.record(&self.now, describe, data);
    }
}

fn state_byte(state: BstarState) -> u8 {
    state.encode().first().copied().unwrap_or(0)
}
