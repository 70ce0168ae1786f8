//! One simulated world: a primary, a backup and 1..8 clients — the real core state
//! machines — on the simulated network, under faults, with every oracle checked after
//! every step.
//!
//! A run has two phases. In the *fault phase* the workload writes and faults are
//! injected. In the *heal phase* every partition heals, crashed nodes restart, paused
//! nodes resume and writes stop; at its end the liveness oracle must hold. Safety
//! oracles are checked throughout.
//!
//! Node ids: 0 is the primary, 1 the backup, 2.. the clients. The clients' server list
//! is `[primary, backup]`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use clonekv_core::client::{self, Channel, Client, ServerIndex};
use clonekv_core::kvmsg::{BstarState, KvMsg, Limits, Uuid};
use clonekv_core::server::{self, HashKey, Server};
use clonekv_core::time::{EpochMillis, Instant};
use rand::RngExt;

use crate::clock::NodeClock;
use crate::model::{HistoryId, Map, MapView, Model, ModelStats};
use crate::network::{Delivery, DropReason, Link, Network, NodeId, PartitionKind, Route};
use crate::options::{streams, Options};
use crate::oracles::{History, Moment, Oracle, Publication, TtlExpectation, Violation};
use crate::trace::Trace;
use crate::workload::{Operation, Workload};
use crate::{derive_rng, SimRng};

mod checks;
mod faults;

/// The primary server's node id.
pub const PRIMARY: NodeId = 0;
/// The backup server's node id.
pub const BACKUP: NodeId = 1;
/// The first client's node id.
pub const FIRST_CLIENT: NodeId = 2;

/// Wall clock of the world at time zero: 2026-11-21, so ttls look like real epoch ms.
const WALL_AT_START: EpochMillis = EpochMillis(1_795_268_000_000);
/// How late an expiry may be on an undisturbed active (PROTOCOL.md §5).
const EXPIRY_GRANULARITY: Duration = Duration::from_millis(100);
/// Events kept for a failure report.
const RECENT_EVENTS: usize = 40;

/// One pinned step of a scripted scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scripted {
    /// Client `client` (0-based) makes this write.
    Write {
        /// The client's index.
        client: usize,
        /// The write.
        operation: Operation,
    },
    /// The node crashes and stays down until a `Restart` (or the heal phase).
    Crash(NodeId),
    /// A crashed node comes back with a fresh state machine.
    Restart(NodeId),
    /// Cuts `a ↔ b` (or only `a → b` when one-way).
    Partition {
        /// One side.
        a: NodeId,
        /// The other side.
        b: NodeId,
        /// Stall or break.
        kind: PartitionKind,
        /// Cut `a → b` only (stalls).
        one_way: bool,
    },
    /// Removes the cuts between `a` and `b` (not a [`Scripted::StallRoute`]).
    Heal {
        /// One side.
        a: NodeId,
        /// The other side.
        b: NodeId,
    },
    /// Stalls one direction of one socket pair: what is sent on it waits until
    /// [`Scripted::ReleaseRoute`] (a slow connection beside healthy ones).
    StallRoute(Route),
    /// Ends a [`Scripted::StallRoute`]: what waited flows again, in order.
    ReleaseRoute(Route),
    /// Ends a [`Scripted::StallRoute`] delivering what waited newest first (the harsh
    /// network's reordering within a connection, pinned).
    ReleaseRouteNewestFirst(Route),
    /// The node stops reading and running (a long GC, a stopped process) for this
    /// long; what reaches it meanwhile, and its monitors' reconnect notices, wait.
    Pause {
        /// The node.
        node: NodeId,
        /// How long.
        duration: Duration,
    },
}

/// How much of the run to write down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceMode {
    /// Only the trace hash (fast).
    Hash,
    /// Keep the last events in memory for a failure report.
    Recent,
    /// Print every event to stdout as it happens.
    Print,
}

/// Counts of what happened, so that a too-gentle world is visible.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Binary Star transitions, by (from, to).
    pub bstar_transitions: BTreeMap<(BstarState, BstarState), u64>,
    /// Client state changes, by name.
    pub client_events: BTreeMap<&'static str, u64>,
    /// Server events, by name.
    pub server_events: BTreeMap<&'static str, u64>,
    /// Injected faults, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Messages the network lost, by reason.
    pub network_drops: BTreeMap<&'static str, u64>,
    /// Messages delivered.
    pub delivered: u64,
    /// Writes the workload made.
    pub writes: u64,
    /// Keys that expired by ttl.
    pub expiries: u64,
    /// Times both servers were active at once.
    pub split_brain_windows: u64,
    /// Subtree clients excused from liveness: their server's publisher dropped updates
    /// for them at its high-water mark, which a subtree client cannot detect.
    pub liveness_waived_high_water_drop: u64,
    /// Servers that became active while their peer still was, missing something they
    /// had received from it: checked again when one of the two stops being active.
    pub failover_checks_deferred: u64,
    /// What the model checked, and how many reigns it could not rebuild.
    pub model: ModelStats,
}

impl Coverage {
    /// Adds another run's counts.
    pub fn merge(&mut self, other: &Coverage) {
        for (key, count) in &other.bstar_transitions {
            *self.bstar_transitions.entry(*key).or_default() += count;
        }
        for (mine, theirs) in [
            (&mut self.client_events, &other.client_events),
            (&mut self.server_events, &other.server_events),
            (&mut self.faults, &other.faults),
            (&mut self.network_drops, &other.network_drops),
        ] {
            for (key, count) in theirs {
                *mine.entry(key).or_default() += count;
            }
        }
        self.delivered += other.delivered;
        self.writes += other.writes;
        self.expiries += other.expiries;
        self.split_brain_windows += other.split_brain_windows;
        self.liveness_waived_high_water_drop += other.liveness_waived_high_water_drop;
        self.failover_checks_deferred += other.failover_checks_deferred;
        self.model.merge(&other.model);
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunReport {
    /// The world seed.
    pub seed: u64,
    /// The first broken oracle, if any.
    pub violation: Option<Violation>,
    /// Hash of every event, for the determinism check.
    pub trace_hash: u64,
    /// What happened.
    pub coverage: Coverage,
    /// The last events before the end (with [`TraceMode::Recent`] or `Print`).
    pub recent: Vec<String>,
    /// Simulated time reached.
    pub simulated: Duration,
    /// The sole active server's map at the end, if there is one.
    pub final_active_map: Option<BTreeMap<Vec<u8>, Vec<u8>>>,
}

/// What a socket monitor reports about a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Notice {
    /// The connection broke (a crash or a broken partition; a stall is silent).
    Disconnected,
    /// The connection came back after a break.
    Reconnected,
}

#[derive(Debug)]
struct Life {
    clock: NodeClock,
    restart_at: Option<Instant>,
    paused_until: Option<Instant>,
    /// What reached it while paused, in arrival order: a connection's messages stay
    /// ahead of the monitor's notice that it broke or came back, because the hosts read
    /// a socket's queued messages before reporting its monitor's notice.
    held: VecDeque<Held>,
    incarnation: u32,
    /// World time since which the node has run without a pause or restart.
    running_since: Instant,
}

/// One thing a paused node will read on resuming.
#[derive(Debug)]
enum Held {
    /// A message, with its sender's incarnation when sent (the sender may crash and
    /// restart before this node reads it).
    Delivery(Delivery, Option<u32>),
    /// What a socket monitor saw: the peer at the other end, the route's link, and the
    /// notice.
    Notice(NodeId, Link, Notice),
}

impl Life {
    fn is_paused(&self) -> bool {
        self.paused_until.is_some()
    }
}

/// A peer snapshot reply as its first message makes it (see [`ServerSlot::peer_reply`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerReply {
    /// Requested; nothing arrived yet.
    Awaited,
    /// It opened with a HUGZ.
    Resume,
    Snapshot,
    /// Its KTHXBAI arrived.
    Ended,
}

#[derive(Debug)]
struct ServerSlot {
    node: NodeId,
    config: server::Config,
    machine: Option<Server>,
    life: Life,
    /// Fresh DEALER per peer snapshot request: replies to older ones are discarded.
    peer_dealer_epoch: u32,
    /// What the reply on the current peer DEALER is, decided by its first message as
    /// the server decides it: a resume reply's changes are the peer's publications,
    /// received like followed KVPUBs.
    peer_reply: PeerReply,
    /// Routing ids whose snapshot streams have messages to pull.
    ready_streams: BTreeSet<Vec<u8>>,
    /// World time since which the server has been active, if it is.
    active_since: Option<Instant>,
    /// When it last sent a snapshot request to the peer.
    sync_requested_at: Option<Moment>,
    /// The peer incarnation whose history this server last synced with: it follows that
    /// history, not a restarted peer's new one.
    synced_with: Option<u32>,
    /// The peer incarnation its current snapshot request went to: what that peer
    /// publishes meanwhile is buffered for the same history (oracle 5 counts it).
    syncing_with: Option<u32>,
    /// The peer incarnation and sequence of the last snapshot it adopted: a KVPUB of
    /// that incarnation numbered at or below it arrives late and is dropped as stale.
    adopted_through: Option<(u32, i64)>,
    /// When it asked for the last snapshot it adopted.
    adopted_request: Option<Moment>,
    /// The entries of the snapshot the current sync has received so far, as the peer
    /// sent them: a failover mid-sync merges them into the map it takes over with.
    snapshot_received: BTreeMap<Vec<u8>, crate::oracles::Held>,
}

#[derive(Debug)]
struct ClientSlot {
    node: NodeId,
    subtree: Vec<u8>,
    machine: Option<Client>,
    life: Life,
    /// The client's map as told by its events.
    mirror: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Per key, the publication index of the newest value seen since the last sync.
    newest_seen: BTreeMap<Vec<u8>, u64>,
    /// World time at which the client's last completed sync began (its first snapshot
    /// request of that attempt): updates dropped after it may be missing from the
    /// updates it buffered during the snapshot.
    last_synced_at: Option<Instant>,
    /// The sequence of the client's last completed snapshot.
    last_synced_sequence: Option<i64>,
    /// World time of the first snapshot request of the sync under way, if any.
    sync_requested_at: Option<Instant>,
    /// Per server: the epoch of the client's current DEALER to it (a fresh one per
    /// attempt): replies to an older one are discarded with it.
    dealer_epochs: [u32; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Faults,
    Healing,
}

/// A simulated world.
pub struct World {
    /// The server and incarnation that sent the message a client is handling now.
    delivering_to_client: Option<(NodeId, u32)>,
    seed: u64,
    options: Options,
    now: Instant,
    phase: Phase,
    network: Network,
    servers: Vec<ServerSlot>,
    clients: Vec<ClientSlot>,
    workload: Workload,
    fault_rng: SimRng,
    next_fault_tick: Instant,
    heals: BTreeMap<(Instant, NodeId, NodeId), ()>,
    history: History,
    /// The ground truth built from what was published (oracles 1, 2, 9, 10).
    model: Model,
    /// Orders the moments of one instant (see [`Moment`]).
    moments: u64,
    coverage: Coverage,
    trace: Trace,
    violation: Option<Violation>,
    /// World time since which the pair has been able to talk both ways, if it can.
    pair_connected_since: Option<Instant>,
    both_active_since: Option<Instant>,
    /// Oracle 5 findings of a server that became active while its peer still was (a
    /// split brain, not a failover): they stand only if the peer stops being active
    /// while this one still is; if this one steps down, the peer's history wins and
    /// nothing it held from the peer is lost.
    deferred_failover_checks: BTreeMap<NodeId, String>,
    limits: Limits,
    script: BTreeMap<(Instant, u64), Scripted>,
}

/// A server's map: key → value.
fn machine_map(machine: &Server) -> Map {
    machine.to_map()
}

impl MapView for Server {
    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter().map(|(key, entry)| (key, entry.body()))
    }
}

fn server_index(node: NodeId) -> ServerIndex {
    ServerIndex(node)
}

fn routes(clients: usize) -> Vec<Route> {
    let mut routes = Vec::new();
    for (a, b) in [(PRIMARY, BACKUP), (BACKUP, PRIMARY)] {
        for link in [
            Link::SnapshotRequest,
            Link::SnapshotReply,
            Link::Updates,
            Link::Collector,
            Link::State,
        ] {
            routes.push(Route {
                from: a,
                to: b,
                link,
            });
        }
    }
    for client in FIRST_CLIENT..FIRST_CLIENT + clients {
        for server in [PRIMARY, BACKUP] {
            for (from, to, link) in [
                (client, server, Link::SnapshotRequest),
                (server, client, Link::SnapshotReply),
                (server, client, Link::Updates),
                (client, server, Link::Collector),
            ] {
                routes.push(Route { from, to, link });
            }
        }
    }
    routes
}

/// `d<node>.<incarnation>.<epoch>`: the identity a DEALER presents; the ROUTER side adds
/// `.<connection>`. Replies carry it back so that the sim can tell a reply to a closed
/// DEALER (restarted node, re-created peer DEALER, reconnected TCP) from a live one.
fn dealer_identity(node: NodeId, incarnation: u32, epoch: u32) -> Vec<u8> {
    format!("d{node}.{incarnation}.{epoch}").into_bytes()
}

fn parse_routing_id(routing_id: &[u8]) -> Option<(NodeId, u32, u32, u64)> {
    let text = std::str::from_utf8(routing_id).ok()?;
    let mut parts = text.strip_prefix('d')?.split('.');
    let node = parts.next()?.parse().ok()?;
    let incarnation = parts.next()?.parse().ok()?;
    let epoch = parts.next()?.parse().ok()?;
    let connection = parts.next()?.parse().ok()?;
    Some((node, incarnation, epoch, connection))
}

impl World {
    /// A world for `seed` with `options`.
    pub fn new(seed: u64, options: Options, trace_mode: TraceMode) -> World {
        let now = Instant::ZERO;
        let mut clock_rng = derive_rng(seed, streams::CLOCKS);
        let clients_count = options.workload.clients.clamp(1, 8);
        let skew = u64::try_from(options.clocks.wall_skew_max.as_millis()).unwrap_or(0);
        let drift = i32::try_from(options.clocks.drift_ppm_max).unwrap_or(0);
        let clock = |rng: &mut SimRng| NodeClock {
            offset: Duration::from_millis(rng.random_range(0..=10_000)),
            drift_ppm: rng.random_range(-drift..=drift),
            wall_at_start: EpochMillis(WALL_AT_START.0 + rng.random_range(0..=skew)),
        };
        let life = |clock: NodeClock| Life {
            clock,
            restart_at: None,
            paused_until: None,
            held: VecDeque::new(),
            incarnation: 0,
            running_since: now,
        };
        let network = Network::new(
            options.network.clone(),
            derive_rng(seed, streams::NETWORK),
            routes(clients_count),
            now,
        );
        let workload = Workload::new(
            crate::options::WorkloadOptions {
                clients: clients_count,
                ..options.workload.clone()
            },
            derive_rng(seed, streams::WORKLOAD),
            now,
        );
        let mut world = World {
            seed,
            now,
            phase: Phase::Faults,
            network,
            servers: Vec::new(),
            clients: Vec::new(),
            fault_rng: derive_rng(seed, streams::FAULTS),
            next_fault_tick: now + options.faults.tick,
            heals: BTreeMap::new(),
            history: History::default(),
            model: Model::default(),
            moments: 0,
            coverage: Coverage::default(),
            trace: Trace::new(trace_mode, RECENT_EVENTS),
            violation: None,
            delivering_to_client: None,
            pair_connected_since: Some(now),
            both_active_since: None,
            deferred_failover_checks: BTreeMap::new(),
            limits: Limits::default(),
            script: BTreeMap::new(),
            workload,
            options,
        };
        // Resumes served from few, some or many recent changes: a peer further behind
        // gets a full snapshot, so both paths run in every kind of world.
        let recent_changes_max = [40, 1_000, 100_000][(seed % 3) as usize];
        for (node, config) in [
            (PRIMARY, server::Config::primary()),
            (BACKUP, server::Config::backup()),
        ] {
            let config = server::Config {
                recent_changes_max,
                ..config
            };
            let clock = clock(&mut clock_rng);
            world.servers.push(ServerSlot {
                node,
                config,
                machine: None,
                life: life(clock),
                peer_dealer_epoch: 0,
                peer_reply: PeerReply::Awaited,
                ready_streams: BTreeSet::new(),
                active_since: None,
                sync_requested_at: None,
                synced_with: None,
                syncing_with: None,
                adopted_through: None,
                adopted_request: None,
                snapshot_received: BTreeMap::new(),
            });
            world.start_server(node);
        }
        for index in 0..clients_count {
            let clock = clock(&mut clock_rng);
            let node = FIRST_CLIENT + index;
            world.clients.push(ClientSlot {
                node,
                subtree: world.workload.subtree(index).to_vec(),
                machine: None,
                life: life(clock),
                mirror: BTreeMap::new(),
                newest_seen: BTreeMap::new(),
                last_synced_at: None,
                last_synced_sequence: None,
                sync_requested_at: None,
                dealer_epochs: [0; 2],
            });
            world.start_client(node);
        }
        world
    }

    /// Pins these steps into the world, each at its time from the start. A scripted
    /// scenario pairs them with [`crate::options::FaultOptions::none`] and a quiet
    /// workload, so that the schedule is exactly what the scenario says.
    pub fn with_script(mut self, steps: impl IntoIterator<Item = (Duration, Scripted)>) -> World {
        for (order, (at, step)) in steps.into_iter().enumerate() {
            self.script.insert((Instant::ZERO + at, order as u64), step);
        }
        self
    }

    // --- Running ---------------------------------------------------------------------

    /// Runs the world to the end of its heal phase, or to the first violation.
    pub fn run(mut self) -> RunReport {
        let fault_end = Instant::ZERO + self.options.fault_phase;
        let end = fault_end + self.options.heal_phase;
        while self.violation.is_none() {
            let Some(next) = self.next_time(fault_end, end) else {
                break;
            };
            if next >= end {
                break;
            }
            self.now = self.now.max(next);
            if self.phase == Phase::Faults && self.now >= fault_end {
                self.begin_healing();
            }
            self.step();
        }
        if self.violation.is_none() {
            self.now = end;
            if !self.options.is_harsh() {
                self.check_liveness();
            }
        }
        self.finish()
    }

    fn finish(mut self) -> RunReport {
        let stats = self.network.stats().clone();
        self.coverage.delivered = stats.delivered;
        for reason in DropReason::ALL {
            if let Some(count) = stats.dropped.get(&reason) {
                self.coverage.network_drops.insert(reason.name(), *count);
            }
        }
        for (name, count) in [
            ("released_after_stall", stats.released_after_stall),
            ("connections_broken", stats.connections_broken),
            ("reconnects", stats.reconnects),
            ("duplicated", stats.duplicated),
        ] {
            if count > 0 {
                self.coverage.faults.insert(name, count);
            }
        }
        self.coverage.model = self.model.stats.clone();
        let final_active_map = self.sole_active().map(|active| self.server_map(active));
        let (trace_hash, recent) = self.trace.finish();
        RunReport {
            final_active_map,
            seed: self.seed,
            violation: self.violation,
            trace_hash,
            coverage: self.coverage,
            recent,
            simulated: self.now.saturating_duration_since(Instant::ZERO),
        }
    }

    fn next_time(&self, fault_end: Instant, end: Instant) -> Option<Instant> {
        // Asked at every step: a running minimum, no allocation.
        let mut next = end;
        let mut consider = |candidate: Option<Instant>| {
            if let Some(at) = candidate {
                next = next.min(at);
            }
        };
        consider(self.network.next_event());
        consider(self.script.keys().next().map(|(at, _)| *at));
        if self.phase == Phase::Faults {
            consider(self.workload.next_due());
            consider(Some(self.next_fault_tick));
            consider(Some(fault_end));
            consider(self.heals.keys().next().map(|(at, _, _)| *at));
        }
        let lives = self
            .servers
            .iter()
            .map(|slot| {
                let timeout = slot.machine.as_ref().and_then(Server::poll_timeout);
                (&slot.life, timeout)
            })
            .chain(self.clients.iter().map(|slot| {
                let timeout = slot.machine.as_ref().and_then(Client::poll_timeout);
                (&slot.life, timeout)
            }));
        for (life, timeout) in lives {
            consider(life.restart_at);
            consider(life.paused_until);
            if !life.is_paused() {
                consider(timeout.map(|local| life.clock.world_deadline(local)));
            }
        }
        Some(next)
    }

    fn step(&mut self) {
        let now = self.now;
        let disconnects = self.network.take_disconnects();
        let reconnects = self.network.handle_reconnects(now);
        let notices = disconnects
            .into_iter()
            .map(|route| (route, Notice::Disconnected))
            .chain(
                reconnects
                    .into_iter()
                    .map(|route| (route, Notice::Reconnected)),
            );
        for (route, notice) in notices {
            self.trace(|| format!("{notice:?} {route:?}"), &(1u8, route, notice));
            // The monitors the hosts run: every SUB's, and a client's DEALER's (its
            // replies come back on the SnapshotReply route).
            let monitored = route.link == Link::Updates
                || (route.link == Link::SnapshotReply && !World::is_server(route.to));
            if !monitored || !self.is_up(route.to) {
                continue;
            }
            let paused = self.life(route.to).is_some_and(Life::is_paused);
            if paused {
                if let Some(life) = self.life_mut(route.to) {
                    life.held
                        .push_back(Held::Notice(route.from, route.link, notice));
                }
            } else {
                self.report_notice(route.to, route.from, route.link, notice);
            }
        }
        for route in self.network.take_joins(now) {
            self.report_join(route.from);
        }
        self.restarts_and_resumes();
        self.heal_partitions_due();
        self.run_script();
        while let Some(delivery) = self.network.pop_delivery(now) {
            self.deliver(delivery);
            if self.violation.is_some() {
                return;
            }
        }
        if self.phase == Phase::Faults {
            while let Some((client, operation)) = self.workload.poll(now) {
                self.write(client, operation);
            }
        }
        self.timeouts();
        if self.phase == Phase::Faults && now >= self.next_fault_tick {
            self.next_fault_tick = now + self.options.faults.tick;
            self.inject_faults();
        }
        self.pump_snapshots();
        self.check_pair();
    }

    // --- Nodes -----------------------------------------------------------------------

    fn server_slot(&mut self, node: NodeId) -> Option<&mut ServerSlot> {
        self.servers.get_mut(node)
    }

    fn client_slot(&mut self, node: NodeId) -> Option<&mut ClientSlot> {
        node.checked_sub(FIRST_CLIENT)
            .and_then(|index| self.clients.get_mut(index))
    }

    fn start_server(&mut self, node: NodeId) {
        let now = self.now;
        let seed = self.seed;
        let Some(slot) = self.server_slot(node) else {
            return;
        };
        let local = slot.life.clock.local(now);
        let wall = slot.life.clock.wall(now);
        // A fresh key per incarnation, from the world seed, as a restarted daemon draws
        // a fresh one from the OS.
        let hash_key = HashKey::from_rng(&mut derive_rng(
            seed,
            streams::NODE_BASE + (node as u64) * 1_000 + u64::from(slot.life.incarnation),
        ));
        match Server::new(local, wall, slot.config, hash_key) {
            Ok(machine) => slot.machine = Some(machine),
            Err(error) => {
                let detail = format!("server {node} refused the sim's config: {error}");
                self.fail(Oracle::NoPanic, detail);
                return;
            }
        }
        if let Some(slot) = self.servers.get_mut(node) {
            slot.synced_with = None;
            slot.syncing_with = None;
            slot.adopted_through = None;
            slot.adopted_request = None;
        }
        let incarnation = self.life(node).map_or(0, |life| life.incarnation);
        self.model.server_started(node, incarnation);
        self.history.held.remove(&node);
        self.history.client_copies.remove(&node);
        self.history.seen.remove(&node);
        let (lost, kept) = std::mem::take(&mut self.history.ttl)
            .into_iter()
            .partition(|((holder, _), _)| *holder == node);
        self.history.ttl = kept;
        self.history
            .ttl_before_crash
            .retain(|(holder, _), _| *holder != node);
        self.history.ttl_before_crash.extend(lost);
        self.drain_server(node);
    }

    fn start_client(&mut self, node: NodeId) {
        let now = self.now;
        let seed = self.seed;
        let Some(slot) = self.client_slot(node) else {
            return;
        };
        let config = client::Config {
            servers: 2,
            subtree: slot.subtree.clone(),
            ..client::Config::default()
        };
        let rng = derive_rng(
            seed,
            streams::NODE_BASE + (node as u64) * 1_000 + u64::from(slot.life.incarnation),
        );
        let local = slot.life.clock.local(now);
        slot.mirror.clear();
        slot.newest_seen.clear();
        slot.sync_requested_at = None;
        match Client::new(config, rng, local) {
            Ok(machine) => slot.machine = Some(machine),
            Err(error) => {
                let detail = format!("client {node} refused the sim's config: {error}");
                self.fail(Oracle::NoPanic, detail);
                return;
            }
        }
        self.drain_client(node);
    }

    fn is_server(node: NodeId) -> bool {
        node < FIRST_CLIENT
    }

    fn life(&self, node: NodeId) -> Option<&Life> {
        if World::is_server(node) {
            self.servers.get(node).map(|slot| &slot.life)
        } else {
            node.checked_sub(FIRST_CLIENT)
                .and_then(|index| self.clients.get(index))
                .map(|slot| &slot.life)
        }
    }

    fn life_mut(&mut self, node: NodeId) -> Option<&mut Life> {
        if World::is_server(node) {
            self.servers.get_mut(node).map(|slot| &mut slot.life)
        } else {
            node.checked_sub(FIRST_CLIENT)
                .and_then(|index| self.clients.get_mut(index))
                .map(|slot| &mut slot.life)
        }
    }

    fn is_up(&self, node: NodeId) -> bool {
        if World::is_server(node) {
            self.servers
                .get(node)
                .is_some_and(|slot| slot.machine.is_some())
        } else {
            node.checked_sub(FIRST_CLIENT)
                .and_then(|index| self.clients.get(index))
                .is_some_and(|slot| slot.machine.is_some())
        }
    }

    fn node_count(&self) -> usize {
        FIRST_CLIENT + self.clients.len()
    }

    // --- Delivering ------------------------------------------------------------------

    fn deliver(&mut self, delivery: Delivery) {
        // A crash breaks the sender's connections and loses what was in flight, so
        // whatever arrives was sent by its current incarnation.
        let sender = self.life(delivery.route.from).map(|life| life.incarnation);
        self.deliver_sent_by(delivery, sender);
    }

    fn deliver_sent_by(&mut self, delivery: Delivery, sender: Option<u32>) {
        let to = delivery.route.to;
        self.trace(
            || {
                format!(
                    "deliver {:?} {} -> {} {}",
                    delivery.route.link,
                    delivery.route.from,
                    to,
                    describe(&delivery.frames)
                )
            },
            &(2u8, &delivery.route, &delivery.frames),
        );
        if !self.is_up(to) {
            return;
        }
        if let Some(life) = self.life_mut(to) {
            if life.is_paused() {
                life.held.push_back(Held::Delivery(delivery, sender));
                return;
            }
        }
        if World::is_server(to) {
            self.deliver_to_server(delivery, sender);
        } else {
            self.delivering_to_client =
                sender.map(|incarnation| (delivery.route.from, incarnation));
            self.deliver_to_client(delivery);
            self.delivering_to_client = None;
        }
    }

    /// Splits the sim's envelope frame (the DEALER identity or routing id) off a
    /// DEALER/ROUTER message.
    fn split_envelope(frames: Vec<Vec<u8>>) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
        let mut frames = frames.into_iter();
        let envelope = frames.next()?;
        Some((envelope, frames.collect()))
    }

    /// True when a reply addressed to `routing_id` can still reach its DEALER.
    fn dealer_is_current(&self, routing_id: &[u8], reply_route: Route) -> bool {
        let Some((node, incarnation, epoch, connection)) = parse_routing_id(routing_id) else {
            return false;
        };
        let request_route = Route {
            from: reply_route.to,
            to: reply_route.from,
            link: Link::SnapshotRequest,
        };
        let life_matches = self
            .life(node)
            .is_some_and(|life| life.incarnation == incarnation);
        let epoch_matches = if World::is_server(node) {
            self.servers
                .get(node)
                .is_some_and(|slot| slot.peer_dealer_epoch == epoch)
        } else {
            self.clients
                .iter()
                .find(|slot| slot.node == node)
                .and_then(|slot| slot.dealer_epochs.get(reply_route.from))
                .is_some_and(|current| *current == epoch)
        };
        node == reply_route.to
            && life_matches
            && epoch_matches
            && self.network.incarnation(request_route) == Some(connection)
            && self.is_up(node)
    }

    /// A message of the reply on `node`'s current peer DEALER arrives: what the reply
    /// is, decided by its first message as the server decides it (before the server
    /// handles the message, whose outputs may already ask for the next reply). Returns
    /// whether the message is a resume reply's change.
    fn classify_peer_reply(&mut self, node: NodeId, message: &KvMsg) -> bool {
        let Some(slot) = self.servers.get_mut(node) else {
            return false;
        };
        if !slot.machine.as_ref().is_some_and(Server::awaits_peer_reply) {
            // No request out (the server took over since it asked): the server drops
            // the whole reply, which answers an attempt it gave up (swarm 517240274067:
            // a stale resume's change counted as received outlived the server's own
            // newer publications of its key).
            slot.peer_reply = PeerReply::Ended;
            return false;
        }
        slot.peer_reply = match slot.peer_reply {
            _ if message.is_kthxbai() => PeerReply::Ended,
            PeerReply::Awaited if message.is_hugz() => PeerReply::Resume,
            PeerReply::Awaited => PeerReply::Snapshot,
            kind => kind,
        };
        slot.peer_reply == PeerReply::Resume && !message.is_hugz()
    }

    /// A resume reply's change reached `node`: a publication of the peer's history,
    /// received as a followed KVPUB is if the server is passive.
    fn note_resume_change(&mut self, node: NodeId, from: HistoryId, message: &KvMsg) {
        let passive = self
            .servers
            .get(node)
            .and_then(|slot| slot.machine.as_ref())
            .is_some_and(|machine| machine.state() == BstarState::Passive);
        if passive {
            self.model.received(node, from, message);
            self.note_followed(node, message, Some(from.1));
        }
    }

    /// An entry of a snapshot reply reached `node` while it syncs: kept aside, as the
    /// server keeps it, until the sync completes (then the map is rebuilt) or is
    /// abandoned (then it is merged).
    fn note_snapshot_entry(&mut self, node: NodeId, from: HistoryId, message: &KvMsg) {
        let Some(slot) = self.servers.get(node) else {
            return;
        };
        let syncing = slot.peer_reply == PeerReply::Snapshot
            && slot.syncing_with == Some(from.1)
            && slot.machine.as_ref().is_some_and(Server::awaits_peer_reply);
        if !syncing || message.is_hugz() || message.body.is_empty() {
            return;
        }
        let Some(index) = self.history.update_index((message.uuid, false)) else {
            return;
        };
        let held = crate::oracles::Held {
            index,
            present: true,
            sequence: message.sequence,
            received_at: self.moment(),
            from_active: Some(from.1),
            publication: self
                .history
                .publication_at(from.0, message.sequence, &message.body),
        };
        if let Some(slot) = self.servers.get_mut(node) {
            slot.snapshot_received.insert(message.key.clone(), held);
        }
    }

    /// A failover mid-sync merged the snapshot entries received so far over what the
    /// server held, except where a later update of the same history, numbered above
    /// the entry, reached it (the server applies that one after the snapshot).
    fn hold_merged_snapshot(&mut self, node: NodeId) {
        let Some(slot) = self.servers.get_mut(node) else {
            return;
        };
        let merged = std::mem::take(&mut slot.snapshot_received);
        let held = self.history.held.entry(node).or_default();
        for (key, entry) in merged {
            let newer_update = held.get(&key).is_some_and(|received| {
                received.from_active == entry.from_active && received.sequence > entry.sequence
            });
            if !newer_update {
                held.insert(key, entry);
            }
        }
    }

    fn deliver_to_server(&mut self, delivery: Delivery, sender: Option<u32>) {
        let node = delivery.route.to;
        let route = delivery.route;
        let now = self.now;
        let dealer_ok = match route.link {
            Link::SnapshotReply => Self::split_envelope(delivery.frames.clone())
                .is_some_and(|(routing_id, _)| self.dealer_is_current(&routing_id, route)),
            _ => true,
        };
        let from_snapshot = if route.link == Link::SnapshotReply && dealer_ok {
            Self::split_envelope(delivery.frames.clone())
                .and_then(|(_, frames)| KvMsg::decode(&frames, &self.limits).ok())
        } else {
            None
        };
        let resume_change = from_snapshot
            .as_ref()
            .is_some_and(|message| self.classify_peer_reply(node, message));
        let followed = if route.link == Link::Updates {
            KvMsg::decode(&delivery.frames, &self.limits)
                .ok()
                .filter(|update| !update.is_hugz())
        } else {
            None
        };
        if let Some(update) = &followed {
            // The active's update of a key settles every copy of it the server holds:
            // the echo, or a later value (the pending list supersedes the copy).
            if let Some(copies) = self.history.client_copies.get_mut(&node) {
                copies.remove(&update.key);
            }
        }
        let Some(slot) = self.servers.get_mut(node) else {
            return;
        };
        let (local, wall) = (slot.life.clock.local(now), slot.life.clock.wall(now));
        let Some(machine) = slot.machine.as_mut() else {
            return;
        };
        match route.link {
            Link::SnapshotRequest => {
                if let Some((identity, frames)) = Self::split_envelope(delivery.frames) {
                    let mut routing_id = identity;
                    routing_id.extend_from_slice(format!(".{}", delivery.connection).as_bytes());
                    machine.handle_snapshot_request(local, wall, &routing_id, &frames);
                }
            }
            Link::Collector => {
                // Only a passive follows a history whose updates it must keep; a server
                // still deciding (just restarted, memory lost) holds nothing yet.
                let passive = machine.state() == BstarState::Passive;
                machine.handle_collected(local, wall, &delivery.frames);
                if passive {
                    self.note_client_copy(node, &delivery.frames, wall);
                }
                self.after_server_step(node);
                return;
            }
            Link::Updates => machine.handle_peer_update(local, wall, &delivery.frames),
            Link::State => machine.handle_peer_state(local, wall, &delivery.frames),
            Link::SnapshotReply => {
                if !dealer_ok {
                    return;
                }
                if let Some((_, frames)) = Self::split_envelope(delivery.frames) {
                    machine.handle_peer_snapshot(local, wall, &frames);
                }
            }
        }
        self.after_server_step(node);
        if let (Some(message), Some(incarnation), true) = (&from_snapshot, sender, resume_change) {
            self.note_resume_change(node, (route.from, incarnation), message);
        }
        if let (Some(message), Some(incarnation), false) = (&from_snapshot, sender, resume_change) {
            self.note_snapshot_entry(node, (route.from, incarnation), message);
        }
        if let (Some(update), Some(incarnation)) = (&followed, sender) {
            let passive = self
                .servers
                .get(node)
                .and_then(|slot| slot.machine.as_ref())
                .is_some_and(|machine| machine.state() == BstarState::Passive);
            if passive {
                self.model.received(node, (route.from, incarnation), update);
            }
        }
        if let Some(update) = followed {
            self.note_followed(node, &update, sender);
        }
    }

    /// An update from the active reached this server: if it is passive (following, or
    /// re-syncing to follow), what it received for the key is what oracle 5 protects at
    /// failover, whether it applied the update at once or buffered it. A server still
    /// deciding (just restarted, memory lost) follows nothing yet.
    fn note_followed(&mut self, node: NodeId, update: &KvMsg, sender: Option<u32>) {
        let receives = self
            .servers
            .get(node)
            .and_then(|slot| slot.machine.as_ref())
            .is_some_and(|machine| machine.state() == BstarState::Passive);
        // A KVPUB its peer's previous incarnation published before dying, read only
        // now (this server was paused) while re-syncing with the next one: a failover
        // mid-sync merges it too (swarm 66756: a client's delete of a key this server
        // had set while split).
        let earlier_incarnation = |slot: &ServerSlot| matches!((sender, slot.syncing_with), (Some(sender), Some(syncing)) if sender < syncing);
        let same_history = self.servers.get(node).is_some_and(|slot| {
            sender.is_some()
                && (slot.synced_with == sender
                    || slot.syncing_with == sender
                    || earlier_incarnation(slot))
        });
        if !receives || !same_history {
            // A restarted peer's new history cannot be applied to the one this server
            // follows; Binary Star resolves which history survives.
            return;
        }
        // A late KVPUB that the adopted snapshot already covers is dropped as stale
        // (found in swarm 45316: it overtook nothing, it was merely slower than the
        // snapshot's reply).
        let covered = self
            .servers
            .get(node)
            .and_then(|slot| slot.adopted_through)
            .is_some_and(|(incarnation, sequence)| {
                sender == Some(incarnation) && update.sequence <= sequence
            });
        if covered {
            // Oracle 6, late side: the server may still apply it (a failover mid-sync
            // merges what a later sync buffered), counting its relative ttl from this
            // receipt (swarm 24559).
            let now = self.now;
            if let Some(expectation) = self.history.ttl.get_mut(&(node, update.key.clone())) {
                if expectation.uuid == update.uuid && !update.body.is_empty() {
                    expectation.followed_at.insert(node, now);
                }
            }
            return;
        }
        let update_id = (update.uuid, update.body.is_empty());
        self.history.seen.entry(node).or_default().insert(update_id);
        let now = self.now;
        let peer = 1 - node;
        let inherited = self
            .history
            .ttl
            .get(&(peer, update.key.clone()))
            .filter(|expectation| {
                !update.body.is_empty()
                    && update.client_ttl().ok().flatten().is_some()
                    && expectation.uuid == update.uuid
            })
            .cloned();
        match inherited {
            Some(mut expectation) => {
                expectation.followed_at.insert(node, now);
                expectation.exact = false;
                self.history
                    .ttl
                    .insert((node, update.key.clone()), expectation);
            }
            None => {
                self.history.ttl.remove(&(node, update.key.clone()));
            }
        }
        // A resume reply's change can arrive after a newer KVPUB of the same key from
        // the same incarnation (it was buffered meanwhile): the newer one stays held.
        let newer_held = self
            .history
            .held
            .get(&node)
            .and_then(|held| held.get(&update.key))
            .is_some_and(|held| held.from_active == sender && held.sequence > update.sequence);
        let index = self.history.update_index(update_id).filter(|_| !newer_held);
        if let Some(index) = index {
            let received_at = self.moment();
            let publication = self
                .history
                .publication_at(1 - node, update.sequence, &update.body);
            self.history.held.entry(node).or_default().insert(
                update.key.clone(),
                crate::oracles::Held {
                    index,
                    present: !update.body.is_empty(),
                    sequence: update.sequence,
                    received_at,
                    from_active: sender,
                    publication,
                },
            );
        }
    }

    /// A passive server received a client's KVSET: it holds it (pending list) until the
    /// active's echo, to replay it if the active dies first.
    fn note_client_copy(&mut self, node: NodeId, frames: &[Vec<u8>], wall: EpochMillis) {
        let Ok(update) = KvMsg::decode(frames, &self.limits) else {
            return;
        };
        let expires_at = match update.client_ttl() {
            Ok(Some(ttl)) if !update.body.is_empty() => Some(wall.saturating_add(ttl)),
            _ => None,
        };
        let arrived = self.moment();
        self.history.client_copies.entry(node).or_default().insert(
            update.key.clone(),
            crate::oracles::ClientCopy {
                update: (update.uuid, update.body.is_empty()),
                arrived,
                expires_at,
            },
        );
    }

    /// What oracle 5 protects at `node`'s takeover: what it held from the old active,
    /// and each key whose latest news at `node` was a client's copy of the very update
    /// the old active (the peer incarnation it synced with) published last for that key. The pending list exists for these:
    /// the echo never came, but the update reached the backup. Left out, as the
    /// pending list's documented windows (DECISIONS.md): a copy that arrived before the
    /// snapshot request of the sync it adopted since, a copy whose ttl ran out, and
    /// copies on a list that evicted entries (age or size).
    fn held_through_copies(
        &mut self,
        node: NodeId,
        wall: EpochMillis,
    ) -> BTreeMap<Vec<u8>, crate::oracles::Held> {
        let mut held = self.history.held.get(&node).cloned().unwrap_or_default();
        let Some(slot) = self.servers.get(node) else {
            return held;
        };
        let evicted = slot
            .machine
            .as_ref()
            .is_some_and(|machine| machine.counters().pending_evicted > 0);
        if evicted {
            return held;
        }
        let adopted_request = slot.adopted_request;
        let synced_with = slot.synced_with;
        let peer = 1 - node;
        let copies = self
            .history
            .client_copies
            .get(&node)
            .cloned()
            .unwrap_or_default();
        for (key, copy) in copies {
            let after_adopted_request = adopted_request.is_none_or(|at| copy.arrived > at);
            let latest_news = held
                .get(&key)
                .is_none_or(|received| received.received_at < copy.arrived);
            // By the peer incarnation whose history this server follows: a restarted
            // peer's new history does not hold what its previous one published (swarm
            // 32551: the backup dropped the late copy of such an update as already
            // published, and the amnesiac primary won the dual-active resolution).
            let published_last = self.history.last_published_of_key.get(&key)
                == synced_with
                    .map(|incarnation| (copy.update, peer, incarnation))
                    .as_ref();
            let live = copy.expires_at.is_none_or(|expires_at| expires_at > wall);
            let Some(index) = self.history.update_index(copy.update) else {
                continue;
            };
            if after_adopted_request && latest_news && published_last && live {
                held.insert(
                    key,
                    crate::oracles::Held {
                        index,
                        present: !copy.update.1,
                        sequence: 0,
                        received_at: copy.arrived,
                        from_active: None,
                        publication: None,
                    },
                );
            }
        }
        held
    }

    /// After a sync the passive holds exactly the active's map.
    fn rebuild_held(
        &mut self,
        node: NodeId,
        answered_request: Option<Moment>,
        snapshot_sequence: i64,
    ) {
        self.adopt_peer_ttl_promises(node);
        let now = self.moment();
        let requested_at = answered_request.unwrap_or(now);
        let synced_with = self.servers.get(node).and_then(|slot| slot.synced_with);
        let mut held: BTreeMap<Vec<u8>, crate::oracles::Held> = self
            .server_entries(node)
            .into_iter()
            .map(|(key, uuid, _)| {
                self.history
                    .seen
                    .entry(node)
                    .or_default()
                    .insert((uuid, false));
                let index = self.history.update_index((uuid, false)).unwrap_or(0);
                (
                    key,
                    crate::oracles::Held {
                        index,
                        present: true,
                        sequence: snapshot_sequence,
                        // As of the snapshot's point, which follows the request.
                        received_at: requested_at,
                        from_active: None,
                        publication: None,
                    },
                )
            })
            .collect();
        // What the active published after the snapshot's point is missing from it
        // (buffered, or deferred to the next sync): it still counts as received. What it
        // published before is in the snapshot, or was replaced or deleted there.
        if let Some(previous) = self.history.held.get(&node) {
            for (key, received) in previous {
                // Only what came from the active: a stepped-down server's own split-time
                // values are not part of the history it adopts.
                let after_the_snapshot = received.received_at > requested_at
                    && received.sequence > snapshot_sequence
                    && received.from_active.is_some()
                    && received.from_active == synced_with;
                if !after_the_snapshot {
                    continue;
                }
                // Numbered above the snapshot by the incarnation that took it, it
                // follows every entry of the snapshot in that history, whatever was
                // published first elsewhere (a value this server published while split,
                // forwarded and republished by the peer: swarm 331561370784).
                held.insert(key.clone(), *received);
            }
        }
        self.history.held.insert(node, held);
    }

    /// Oracle 6 after a server took in the peer's entries (a completed sync, or the part
    /// of an abandoned one it merged): those carry absolute expiries, so the peer's
    /// promises hold here, unless this server received the KVPUB itself (its own copy
    /// knows the delay). Swarm 90737: a passive merged an abandoned sync's entry over
    /// its own split-time publication of the same update, then expired it by the
    /// peer's expiry, early by the clocks' skew.
    fn adopt_peer_ttl_promises(&mut self, node: NodeId) {
        let peer = 1 - node;
        let previous: BTreeMap<Vec<u8>, TtlExpectation> = self
            .history
            .ttl
            .iter()
            .filter(|((holder, _), _)| *holder == node)
            .map(|((_, key), expectation)| (key.clone(), expectation.clone()))
            .collect();
        self.history.ttl.retain(|(holder, _), _| *holder != node);
        for (key, uuid, _) in self.server_entries(node) {
            let stored = self.stored_expiry(node, &key);
            let own = previous.get(&key).filter(|own| own.uuid == uuid);
            // A KVPUB it followed itself knows its own delay; its own publication
            // counts only while the entry still carries the expiry it made (one made
            // while split is replaced by the peer's entry for the same update).
            if let Some(own) =
                own.filter(|own| own.publisher != node || stored == Some(own.expires_at))
            {
                self.history.ttl.insert((node, key), own.clone());
                continue;
            }
            // The peer's promise. An abandoned sync merges entries a peer sent before
            // it crashed: its promise then counts where the entry is the one it sent
            // (same absolute expiry, or one it followed), not one this server applied
            // from a KVPUB since, counting the ttl from its own receipt.
            let sent_before_crash = || {
                self.history
                    .ttl_before_crash
                    .get(&(peer, key.clone()))
                    .filter(|promise| {
                        stored == Some(promise.expires_at)
                            || promise.followed_at.contains_key(&peer)
                    })
            };
            let peer_promise = self
                .history
                .ttl
                .get(&(peer, key.clone()))
                .or_else(sent_before_crash)
                .filter(|promise| promise.uuid == uuid)
                .cloned();
            if let Some(mut expectation) = peer_promise {
                expectation.exact = false;
                // The peer stored the expiry when it received the KVPUB; a snapshot
                // passes that absolute time on unchanged.
                if let Some(received) = expectation.followed_at.get(&peer).copied() {
                    expectation.followed_at.insert(node, received);
                }
                if stored != Some(expectation.expires_at)
                    && !expectation.followed_at.contains_key(&node)
                {
                    // Not the peer's absolute expiry: this server applied the KVPUB
                    // itself, counting the ttl from a receipt the oracle no longer knows;
                    // it came before now (swarms 36280, 87070).
                    expectation.followed_at.insert(node, self.now);
                }
                self.history.ttl.insert((node, key), expectation);
            } else if let Some(own) = own {
                // The same update, its expiry from elsewhere: the clocks' skew applies.
                let mut own = own.clone();
                own.exact = false;
                self.history.ttl.insert((node, key), own);
            }
        }
    }

    /// Now, ordered after every moment taken before it.
    fn moment(&mut self) -> Moment {
        self.moments += 1;
        (self.now, self.moments)
    }

    /// `(key, uuid, value)` of every entry a server holds, in key order.
    /// The absolute expiry a server stores for `key`.
    fn stored_expiry(&self, node: NodeId, key: &[u8]) -> Option<EpochMillis> {
        self.servers
            .get(node)
            .and_then(|slot| slot.machine.as_ref())
            .and_then(|machine| machine.get(key))
            .and_then(|entry| entry.expires_at())
    }

    fn server_entries(&self, node: NodeId) -> Vec<(Vec<u8>, Option<Uuid>, Vec<u8>)> {
        self.servers
            .get(node)
            .and_then(|slot| slot.machine.as_ref())
            .map(|machine| {
                machine
                    .iter()
                    .map(|(key, entry)| (key.to_vec(), entry.uuid(), entry.body().to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn deliver_to_client(&mut self, delivery: Delivery) {
        let node = delivery.route.to;
        let route = delivery.route;
        let now = self.now;
        let channel = match route.link {
            Link::SnapshotReply => Channel::Snapshot,
            Link::Updates => Channel::Subscriber,
            _ => return,
        };
        let frames = if channel == Channel::Snapshot {
            match Self::split_envelope(delivery.frames) {
                Some((routing_id, frames)) if self.dealer_is_current(&routing_id, route) => frames,
                _ => return,
            }
        } else {
            delivery.frames
        };
        let Some(slot) = self.client_slot(node) else {
            return;
        };
        let local = slot.life.clock.local(now);
        if let Some(machine) = slot.machine.as_mut() {
            machine.handle_message(local, server_index(route.from), channel, &frames);
        }
        self.drain_client(node);
    }

    fn write(&mut self, client: usize, operation: Operation) {
        let node = FIRST_CLIENT + client;
        self.coverage.writes += 1;
        self.trace(
            || format!("write c{node} {operation:?}"),
            &(3u8, node, operation.key()),
        );
        let watch = self.options.workload.watch_commits;
        let Some(slot) = self.client_slot(node) else {
            return;
        };
        if slot.life.is_paused() {
            return;
        }
        let Some(machine) = slot.machine.as_mut() else {
            return;
        };
        let result = match operation {
            Operation::Set { key, value, ttl } => machine.set(key, value, ttl),
            Operation::Delete { key } => machine.delete(key),
        };
        let result = match result {
            Ok(uuid) if watch => machine.watch_commit(uuid),
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            self.fail(
                Oracle::NoPanic,
                format!("client {node} refused a valid workload write: {error}"),
            );
            return;
        }
        self.drain_client(node);
    }

    fn timeouts(&mut self) {
        let now = self.now;
        for node in 0..self.node_count() {
            let Some(life) = self.life(node) else {
                continue;
            };
            if life.is_paused() {
                continue;
            }
            let clock = life.clock;
            let (local, wall) = (clock.local(now), clock.wall(now));
            if World::is_server(node) {
                let due = self
                    .servers
                    .get(node)
                    .and_then(|slot| slot.machine.as_ref())
                    .and_then(Server::poll_timeout)
                    .is_some_and(|deadline| deadline <= local);
                if due {
                    let mut stuck = None;
                    if let Some(machine) =
                        self.servers.get_mut(node).and_then(|s| s.machine.as_mut())
                    {
                        machine.handle_timeout(local, wall);
                        stuck = machine.poll_timeout().filter(|deadline| *deadline <= local);
                    }
                    self.after_server_step(node);
                    if let Some(deadline) = stuck {
                        self.fail(
                            Oracle::NoPanic,
                            format!("server {node}'s timer does not advance: handle_timeout at {local:?} leaves poll_timeout at {deadline:?} (the host would spin)"),
                        );
                    }
                }
            } else {
                let due = self
                    .client_slot(node)
                    .and_then(|slot| slot.machine.as_ref())
                    .and_then(Client::poll_timeout)
                    .is_some_and(|deadline| deadline <= local);
                if due {
                    let mut stuck = None;
                    if let Some(machine) = self.client_slot(node).and_then(|s| s.machine.as_mut()) {
                        machine.handle_timeout(local);
                        stuck = machine.poll_timeout().filter(|deadline| *deadline <= local);
                    }
                    self.drain_client(node);
                    if let Some(deadline) = stuck {
                        self.fail(
                            Oracle::NoPanic,
                            format!("client {node}'s timer does not advance: handle_timeout at {local:?} leaves poll_timeout at {deadline:?} (the host would spin)"),
                        );
                    }
                }
            }
            if self.violation.is_some() {
                return;
            }
        }
    }

    // --- Outputs ---------------------------------------------------------------------

    fn send(&mut self, route: Route, frames: Vec<Vec<u8>>) {
        let now = self.now;
        let _ = self.network.send(now, route, frames);
    }

    fn after_server_step(&mut self, node: NodeId) {
        self.drain_server(node);
        self.check_server_bounds(node);
    }

    fn drain_server(&mut self, node: NodeId) {
        let peer = if node == PRIMARY { BACKUP } else { PRIMARY };
        let mut outputs = Vec::new();
        let state_before;
        {
            let Some(slot) = self.servers.get_mut(node) else {
                return;
            };
            let Some(machine) = slot.machine.as_mut() else {
                return;
            };
            while let Some(output) = machine.poll_output() {
                outputs.push(output);
            }
            state_before = slot.active_since.is_some();
        }
        // The request this step's SyncCompleted answers (a new one may follow in it).
        let answered_request = self
            .servers
            .get(node)
            .and_then(|slot| slot.sync_requested_at);
        let mut became_active = false;
        let mut sync_completed = None;
        let mut sync_abandoned = false;
        let mut published = Vec::new();
        for output in outputs {
            match output {
                server::Output::Publish(frames) => {
                    let frames = frames.map(|frame| frame.to_vec());
                    self.trace(
                        || format!("s{node} publish {}", describe(&frames)),
                        &(13u8, node, &frames),
                    );
                    published.push(frames.clone());
                    self.publish(node, frames.to_vec());
                }
                server::Output::SnapshotReady { routing_id } => {
                    if let Some(slot) = self.servers.get_mut(node) {
                        slot.ready_streams.insert(routing_id);
                    }
                }
                server::Output::SendStateToPeer(frame) => self.send(
                    Route {
                        from: node,
                        to: peer,
                        link: Link::State,
                    },
                    vec![frame],
                ),
                server::Output::RequestPeerSnapshot(frames) => {
                    let moment = self.moment();
                    let Some(slot) = self.servers.get_mut(node) else {
                        continue;
                    };
                    slot.peer_dealer_epoch += 1;
                    slot.peer_reply = PeerReply::Awaited;
                    slot.sync_requested_at = Some(moment);
                    let identity =
                        dealer_identity(node, slot.life.incarnation, slot.peer_dealer_epoch);
                    let mut message = vec![identity];
                    message.extend(frames);
                    self.send(
                        Route {
                            from: node,
                            to: peer,
                            link: Link::SnapshotRequest,
                        },
                        message,
                    );
                }
                server::Output::ForwardToPeerCollector(frames) => self.send(
                    Route {
                        from: node,
                        to: peer,
                        link: Link::Collector,
                    },
                    frames.to_vec(),
                ),
                // The simulated servers run without persistence (no disk yet).
                server::Output::Persist(_) | server::Output::PersistImage(_) => {}
                server::Output::Event(event) => {
                    if let server::Event::StateChanged { from, to, .. } = &event {
                        *self
                            .coverage
                            .bstar_transitions
                            .entry((*from, *to))
                            .or_default() += 1;
                        if *to == BstarState::Active {
                            became_active = true;
                        }
                    }
                    if let server::Event::SyncCompleted { sequence, .. } = &event {
                        sync_completed = Some(*sequence);
                    }
                    if matches!(event, server::Event::SyncAbandoned { .. }) {
                        sync_abandoned = true;
                    }
                    if matches!(event, server::Event::SyncStarted { .. }) {
                        let peer_incarnation = self.life(peer).map(|life| life.incarnation);
                        if let Some(slot) = self.servers.get_mut(node) {
                            slot.syncing_with = peer_incarnation;
                            slot.snapshot_received.clear();
                        }
                    }
                    self.count_server_event(&event);
                    self.trace(
                        || format!("s{node} {event:?}"),
                        &(4u8, node, event_tag(&event)),
                    );
                }
            }
        }
        if let Some(snapshot_sequence) = sync_completed {
            let peer_incarnation = self.life(peer).map(|life| life.incarnation);
            if let Some(slot) = self.servers.get_mut(node) {
                slot.synced_with = peer_incarnation;
                slot.adopted_through =
                    peer_incarnation.map(|incarnation| (incarnation, snapshot_sequence));
                slot.adopted_request = answered_request;
                slot.snapshot_received.clear();
            }
            self.rebuild_held(node, answered_request, snapshot_sequence);
        }
        if sync_abandoned {
            self.adopt_peer_ttl_promises(node);
            self.hold_merged_snapshot(node);
        }
        let took_over = became_active && !state_before;
        self.record_publications(node, &published, took_over, sync_abandoned);
        let active_now = self
            .servers
            .get(node)
            .and_then(|slot| slot.machine.as_ref())
            .is_some_and(|machine| machine.state() == BstarState::Active);
        if self.violation.is_none() {
            self.model_step(
                node,
                &published,
                took_over,
                state_before && !active_now,
                sync_completed,
            );
        }
        let now = self.now;
        if let Some(slot) = self.servers.get_mut(node) {
            slot.active_since = match (active_now, slot.active_since) {
                (true, None) => Some(now),
                (true, since) => since,
                (false, _) => None,
            };
        }
    }

    /// Oracle 9 after a server step: an active's map is its reign, a stepped-down
    /// server keeps it, a passive's is its peer's history at its sequence (checked in
    /// full after a sync).
    fn model_step(
        &mut self,
        node: NodeId,
        published: &[[Vec<u8>; 5]],
        took_over: bool,
        stepped_down: bool,
        sync_completed: Option<i64>,
    ) {
        let Some(machine) = self
            .servers
            .get(node)
            .and_then(|slot| slot.machine.as_ref())
        else {
            return;
        };
        let sequence = machine.sequence();
        let (active, passive) = (
            machine.state() == BstarState::Active,
            machine.state() == BstarState::Passive,
        );
        let result = if active && (took_over || !published.is_empty()) {
            let what = if took_over {
                "became active"
            } else {
                "published"
            };
            let peer = 1 - node;
            let peer_history = (peer, self.life(peer).map_or(0, |life| life.incarnation));
            let kept = if took_over && !self.options.is_harsh() {
                let entries = machine.iter().map(|(key, entry)| (key, entry.uuid()));
                let messages: Vec<KvMsg> = published
                    .iter()
                    .filter_map(|frames| KvMsg::decode(frames, &self.limits).ok())
                    .filter(|message| !message.is_hugz())
                    .collect();
                let replayed = messages.iter().map(|message| message.uuid).collect();
                let deleted = messages
                    .iter()
                    .filter(|message| message.body.is_empty())
                    .map(|message| message.key.clone())
                    .collect();
                let adopted_request = self.servers.get(node).and_then(|slot| slot.adopted_request);
                let copies_after_base = self
                    .history
                    .client_copies
                    .get(&node)
                    .into_iter()
                    .flat_map(|copies| copies.values())
                    .filter(|copy| adopted_request.is_none_or(|at| copy.arrived > at))
                    .map(|copy| copy.update.0)
                    .collect();
                self.model.check_takeover_keeps_received(
                    node,
                    peer_history,
                    entries,
                    &replayed,
                    &copies_after_base,
                    &deleted,
                )
            } else {
                Ok(())
            };
            kept.and_then(|()| self.model.check_active(node, sequence, machine, what))
        } else if stepped_down {
            let result = self
                .model
                .check_active(node, sequence, machine, "stepped down");
            self.model.end_reign(node);
            result
        } else if let Some(snapshot_sequence) = sync_completed {
            let peer = 1 - node;
            let peer_history = (peer, self.life(peer).map_or(0, |life| life.incarnation));
            let map = self.server_map(node);
            let checkable = !self.options.is_harsh();
            self.model.sync_completed(
                node,
                peer_history,
                snapshot_sequence,
                sequence,
                &map,
                checkable,
            )
        } else if passive {
            self.model.passive_step(node, sequence, machine)
        } else {
            Ok(())
        };
        if let Err(violation) = result {
            self.fail(violation.oracle, violation.detail);
        }
    }

    /// Sends a PUB message to every subscriber whose subscription matches (the
    /// publisher filters, as libzmq does over TCP).
    fn publish(&mut self, node: NodeId, frames: Vec<Vec<u8>>) {
        let key = frames.first().cloned().unwrap_or_default();
        let peer = if node == PRIMARY { BACKUP } else { PRIMARY };
        self.send(
            Route {
                from: node,
                to: peer,
                link: Link::Updates,
            },
            frames.clone(),
        );
        let subscribers: Vec<NodeId> = self
            .clients
            .iter()
            .filter(|slot| key.starts_with(&slot.subtree) || key == b"HUGZ")
            .map(|slot| slot.node)
            .collect();
        for client in subscribers {
            self.send(
                Route {
                    from: node,
                    to: client,
                    link: Link::Updates,
                },
                frames.clone(),
            );
        }
    }

    fn pump_snapshots(&mut self) {
        let now = self.now;
        for node in [PRIMARY, BACKUP] {
            let ready: Vec<Vec<u8>> = self
                .servers
                .get(node)
                .map(|slot| slot.ready_streams.iter().cloned().collect())
                .unwrap_or_default();
            for routing_id in ready {
                let Some((dealer, ..)) = parse_routing_id(&routing_id) else {
                    continue;
                };
                let route = Route {
                    from: node,
                    to: dealer,
                    link: Link::SnapshotReply,
                };
                let local = match self.servers.get(node) {
                    Some(slot) => slot.life.clock.local(now),
                    None => continue,
                };
                loop {
                    if !self.dealer_is_current(&routing_id, route) {
                        // EHOSTUNREACH under ROUTER_MANDATORY: the peer is gone.
                        if let Some(slot) = self.servers.get_mut(node) {
                            slot.ready_streams.remove(&routing_id);
                            if let Some(machine) = slot.machine.as_mut() {
                                machine.cancel_snapshot(&routing_id);
                            }
                        }
                        self.drain_server(node);
                        break;
                    }
                    if !self.network.has_room(route) {
                        break;
                    }
                    let Some(slot) = self.servers.get_mut(node) else {
                        break;
                    };
                    if slot.life.is_paused() {
                        break;
                    }
                    let Some(machine) = slot.machine.as_mut() else {
                        break;
                    };
                    let Some(frames) = machine.poll_snapshot(local, &routing_id) else {
                        slot.ready_streams.remove(&routing_id);
                        break;
                    };
                    let mut message = vec![routing_id.clone()];
                    message.extend(frames.iter().map(|frame| frame.to_vec()));
                    self.send(route, message);
                }
            }
        }
    }

    fn drain_client(&mut self, node: NodeId) {
        self.check_client_bounds(node);
        let mut outputs = Vec::new();
        {
            let Some(slot) = self.client_slot(node) else {
                return;
            };
            let Some(machine) = slot.machine.as_mut() else {
                return;
            };
            while let Some(output) = machine.poll_output() {
                outputs.push(output);
            }
        }
        // Changes a snapshot install reports come just before its Synced: they are
        // judged by the point-in-time oracle, not by the order of the followed stream.
        let installed_through = outputs.iter().rposition(|output| {
            matches!(output, client::Output::Event(client::Event::Synced { .. }))
        });
        for (position, output) in outputs.into_iter().enumerate() {
            let from_snapshot = installed_through.is_some_and(|last| position < last);
            match output {
                client::Output::SendSnapshotRequest {
                    server,
                    frames,
                    fresh_connection,
                } => {
                    let now = self.now;
                    let mut epoch = 0;
                    if let Some(slot) = self.client_slot(node) {
                        slot.sync_requested_at.get_or_insert(now);
                        if let Some(server_epoch) = slot.dealer_epochs.get_mut(server.0) {
                            if fresh_connection {
                                *server_epoch += 1;
                            }
                            epoch = *server_epoch;
                        }
                    }
                    let incarnation = self.life(node).map_or(0, |life| life.incarnation);
                    let mut message = vec![dealer_identity(node, incarnation, epoch)];
                    message.extend(frames);
                    self.send(
                        Route {
                            from: node,
                            to: server.0,
                            link: Link::SnapshotRequest,
                        },
                        message,
                    );
                }
                client::Output::Publish { frames } => {
                    for server in [PRIMARY, BACKUP] {
                        self.send(
                            Route {
                                from: node,
                                to: server,
                                link: Link::Collector,
                            },
                            frames.to_vec(),
                        );
                    }
                }
                client::Output::Event(event) => {
                    self.trace(
                        || format!("c{node} {event:?}"),
                        &(5u8, node, client_event_tag(&event)),
                    );
                    self.client_event(node, event, from_snapshot);
                    if self.violation.is_some() {
                        return;
                    }
                }
            }
        }
    }

    // --- Trace -----------------------------------------------------------------------

    fn trace<T: Hash + ?Sized>(&mut self, describe: impl FnOnce() -> String, data: &T) {
        self.trace.record(&self.now, describe, data);
    }

    fn count_server_event(&mut self, event: &server::Event) {
        *self
            .coverage
            .server_events
            .entry(event_tag(event))
            .or_default() += 1;
        if let server::Event::PendingReplayed {
            skipped_superseded,
            skipped_expired,
            ..
        } = event
        {
            for (name, count) in [
                ("pending_superseded_not_replayed", skipped_superseded),
                ("pending_expired_not_replayed", skipped_expired),
            ] {
                *self.coverage.server_events.entry(name).or_default() += *count as u64;
            }
        }
    }
}

/// "; first difference KEY: client …, server …" for two maps that differ.
fn first_difference(
    client: &BTreeMap<&Vec<u8>, &Vec<u8>>,
    server: &BTreeMap<&Vec<u8>, &Vec<u8>>,
) -> String {
    let show = |value: Option<&&Vec<u8>>| value.map(|v| String::from_utf8_lossy(v).into_owned());
    client
        .keys()
        .chain(server.keys())
        .filter(|key| client.get(*key) != server.get(*key))
        .min()
        .map(|key| {
            format!(
                "; first difference {}: client {:?}, server {:?}",
                String::from_utf8_lossy(key),
                show(client.get(*key)),
                show(server.get(*key))
            )
        })
        .unwrap_or_default()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn random_duration(rng: &mut SimRng, max: Duration) -> Duration {
    Duration::from_millis(rng.random_range(0..=millis(max).max(1)))
}

/// A short text for a message in traces: the sequence frame of a kvmsg (frame 1, or
/// frame 2 behind the sim's envelope) as a number, other frames as text.
fn describe(frames: &[Vec<u8>]) -> String {
    let sequence_frame = match frames.len() {
        5 => Some(1),
        6 => Some(2),
        _ => None,
    };
    let texts: Vec<String> = frames
        .iter()
        .enumerate()
        .map(|(index, frame)| {
            if Some(index) == sequence_frame {
                if let Ok(bytes) = <[u8; 8]>::try_from(frame.as_slice()) {
                    return format!("#{}", i64::from_be_bytes(bytes));
                }
            }
            // The uuid, as the first 8 hex digits: enough to follow one update.
            if sequence_frame.map(|sequence| sequence + 1) == Some(index) && frame.len() == 16 {
                let hex: String = frame
                    .iter()
                    .take(4)
                    .map(|byte| format!("{byte:02x}"))
                    .collect();
                return format!("u{hex}");
            }
            // Properties end each line with a newline; keep one message on one line.
            let text = String::from_utf8_lossy(frame).replace('\n', " ");
            if text.chars().count() > 24 {
                format!("{}…", text.chars().take(24).collect::<String>())
            } else {
                text
            }
        })
        .collect();
    texts.join("|")
}

fn event_tag(event: &server::Event) -> &'static str {
    match event {
        server::Event::InputDropped { .. } => "input_dropped",
        server::Event::StateChanged { .. } => "state_changed",
        server::Event::DualActive { .. } => "dual_active",
        server::Event::DualPassive { .. } => "dual_passive",
        server::Event::RoleConflict { .. } => "role_conflict",
        server::Event::SyncStarted { .. } => "sync_started",
        server::Event::SyncCompleted { .. } => "sync_completed",
        server::Event::SyncAbandoned { .. } => "sync_abandoned",
        server::Event::PendingReplayed { .. } => "pending_replayed",
        server::Event::PendingEvicted { .. } => "pending_evicted",
        server::Event::SplitUpdatesForwarded { .. } => "split_updates_forwarded",
        server::Event::SnapshotStreamAbandoned { .. } => "snapshot_stream_abandoned",
        _ => "other",
    }
}

fn client_event_tag(event: &client::Event) -> &'static str {
    match event {
        client::Event::Updated { .. } => "updated",
        client::Event::Deleted { .. } => "deleted",
        client::Event::Synced { .. } => "synced",
        client::Event::ServerChanged { .. } => "server_changed",
        client::Event::Committed { .. } => "committed",
        client::Event::Lost { .. } => "lost",
        client::Event::Dropped { .. } => "dropped",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}
