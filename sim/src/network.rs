//! A simulated network that behaves like libzmq over TCP, not like an ideal pipe.
//!
//! Every pair of sockets that PROTOCOL.md §1 connects is a [`Route`]: a one-way
//! connection `from → to` on one [`Link`]. What the model reproduces:
//!
//! - **Order:** messages on one route arrive in the order sent; different routes race
//!   freely (each message draws its own delay).
//! - **Slow joiners:** on a PUB/SUB link nothing is delivered until the subscription has
//!   reached the publisher, a random delay after the connection comes up; the publisher
//!   drops what it sends before then.
//! - **High-water marks:** at most `hwm` messages are queued on a route. A publisher
//!   drops past it; a snapshot reply is only sent when [`Network::has_room`] says so
//!   (ROUTER_MANDATORY flow control); a request past it is dropped as a blocked send.
//! - **Partitions:** a *stall* holds a direction's messages (up to the high-water mark)
//!   and releases them in order at heal time; it can be one-way. A *break* tears the TCP
//!   connections down both ways, losing what was in flight; they come back a random
//!   delay after the heal, and subscriptions must propagate again.
//! - **Crashes:** every connection of the node breaks; they come back after its restart.
//! - **Harsh mode:** duplication and reordering *within* a route, beyond what TCP allows.
//!
//! The network is itself a small sans-IO machine: [`Network::send`] queues,
//! [`Network::next_delivery`] says when the next message is due, and
//! [`Network::pop_delivery`] hands it over. Ties are broken by a send counter, so the
//! order of delivery is a pure function of the seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use clonekv_core::time::Instant;
use rand::RngExt;

use crate::ratio::Ratio;
use crate::SimRng;

/// A node of the simulated cluster: 0 is the primary, 1 the backup, then clients.
pub type NodeId = usize;

/// The socket pairs of PROTOCOL.md §1 a message can travel on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Link {
    /// DEALER → ROUTER on port P: ICANHAZ? (a client's, or the passive server's).
    SnapshotRequest,
    /// ROUTER → DEALER on port P: KVSYNC … KTHXBAI.
    SnapshotReply,
    /// PUB on P+1 → SUB: KVPUB and HUGZ, to clients and to the passive peer.
    Updates,
    /// PUB → collector SUB on P+2: KVSETs (and a stepping-down server's forwards).
    Collector,
    /// Binary Star PUB → peer SUB: the one-frame state message.
    State,
}

impl Link {
    /// True for PUB/SUB links: slow-joiner and drop-at-high-water-mark semantics.
    pub fn is_pub_sub(self) -> bool {
        matches!(self, Link::Updates | Link::Collector | Link::State)
    }
}

/// One direction of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// Sending node.
    pub from: NodeId,
    /// Receiving node.
    pub to: NodeId,
    /// Which socket pair.
    pub link: Link,
}

/// A message handed to its receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Where it travelled.
    pub route: Route,
    /// Which incarnation of the connection carried it: a reconnected DEALER is a new
    /// peer to the ROUTER, with a new routing id.
    pub connection: u64,
    /// The frames.
    pub frames: Vec<Vec<u8>>,
}

/// What a partition does to the connections it cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PartitionKind {
    /// Packets stop but TCP holds on: messages queue and arrive after the heal.
    Stall,
    /// TCP gives up: in-flight messages are lost and connections re-establish after heal.
    Break,
}

/// Why a message did not make it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Sent on PUB/SUB before the subscription reached the publisher.
    SlowJoiner,
    /// The route's queue was at its high-water mark.
    HighWaterMark,
    /// Lost in flight when the connection broke (partition or crash).
    ConnectionBroken,
    /// Sent while the connection was down and the socket type drops rather than queues.
    Disconnected,
}

impl DropReason {
    /// All reasons, for reports.
    pub const ALL: [DropReason; 4] = [
        DropReason::SlowJoiner,
        DropReason::HighWaterMark,
        DropReason::ConnectionBroken,
        DropReason::Disconnected,
    ];

    /// A short name for summaries.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::SlowJoiner => "slow_joiner",
            DropReason::HighWaterMark => "high_water_mark",
            DropReason::ConnectionBroken => "connection_broken",
            DropReason::Disconnected => "disconnected",
        }
    }
}

/// The network's timing and limits. Every field models one behaviour of libzmq over TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkOptions {
    /// Fastest one-way delivery (loopback TCP: tens of microseconds).
    pub delay_min: Duration,
    /// Slowest ordinary one-way delivery (a loaded LAN).
    pub delay_max: Duration,
    /// How often a message is much slower than usual (a retransmit, a scheduling hiccup).
    pub delay_spike: Ratio,
    /// The extra delay of a spike.
    pub delay_spike_max: Duration,
    /// Messages a route queues before its sender drops or blocks (ZMQ_SNDHWM).
    pub high_water_mark: usize,
    /// Longest time for a new subscription to reach the publisher (the slow joiner).
    pub subscribe_delay_max: Duration,
    /// Longest time a broken connection takes to come back once it can (reconnect ivl).
    pub reconnect_delay_max: Duration,
    /// Harsh mode: a message is delivered twice (never happens over TCP).
    pub duplicate: Ratio,
    /// Harsh mode: a message may overtake earlier ones on its own route.
    pub reorder: Ratio,
    /// A connection that breaks (a crash, a reset) is reported at once to the socket
    /// monitor of the side that receives on it, as TCP and libzmq do. Off models hosts
    /// without a monitor (the zguide's clients): they learn only from silence.
    pub report_disconnects: bool,
    /// A publisher's host sees each update subscription arrive (clonekvd's XPUB) and
    /// tells its server, which sends a HUGZ at once. Off models the zguide's servers,
    /// whose first HUGZ comes at the next heartbeat.
    pub report_joins: bool,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            delay_min: Duration::from_micros(50),
            delay_max: Duration::from_millis(5),
            delay_spike: Ratio::new(1, 100),
            delay_spike_max: Duration::from_millis(200),
            high_water_mark: 1000,
            subscribe_delay_max: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_millis(500),
            duplicate: Ratio::NEVER,
            reorder: Ratio::NEVER,
            report_disconnects: true,
            report_joins: true,
        }
    }
}

/// Counters of what the network did, for the run summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Messages handed to receivers.
    pub delivered: u64,
    /// Messages lost, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// Extra copies delivered in harsh mode.
    pub duplicated: u64,
    /// Messages held by a stall and released at heal time.
    pub released_after_stall: u64,
    /// Connections that broke.
    pub connections_broken: u64,
    /// Connections that came back.
    pub reconnects: u64,
    /// When each route last dropped a message at its high-water mark.
    pub last_high_water_drop: BTreeMap<Route, Instant>,
    /// The highest CHP sequence (a message's second frame, 8 bytes big-endian) each route
    /// dropped at its high-water mark.
    pub highest_high_water_drop: BTreeMap<Route, i64>,
}

#[derive(Clone, Debug)]
enum ConnectionState {
    /// Connected since `since`; a PUB/SUB link delivers from `live_at` on.
    Up { live_at: Instant },
    /// Torn down; comes back at `reconnect_at` unless still cut off then.
    Down { reconnect_at: Option<Instant> },
}

#[derive(Clone, Debug)]
struct Connection {
    state: ConnectionState,
    incarnation: u64,
    /// Messages scheduled for delivery or held by a stall.
    queued: usize,
    /// Latest delivery time handed out, to keep the route FIFO.
    last_delivery: Instant,
    /// Messages held back by a stall, in order.
    stalled: VecDeque<Vec<Vec<u8>>>,
}

#[derive(Clone, Debug)]
struct InFlight {
    route: Route,
    incarnation: u64,
    frames: Vec<Vec<u8>>,
}

/// The simulated network between the cluster's nodes.
#[derive(Debug)]
pub struct Network {
    options: NetworkOptions,
    rng: SimRng,
    connections: BTreeMap<Route, Connection>,
    /// Every connection that is down with a reconnect time, by that time: the
    /// simulator asks for the next one at every step.
    reconnects: BTreeSet<(Instant, Route)>,
    in_flight: BTreeMap<(Instant, u64), InFlight>,
    send_counter: u64,
    /// Directed cuts: `(from, to)` → kind.
    cuts: BTreeMap<(NodeId, NodeId), PartitionKind>,
    /// Single routes stalled by a script (one socket pair, one direction): a slow
    /// connection beside healthy ones between the same two nodes.
    stalled_routes: BTreeSet<Route>,
    down_nodes: BTreeSet<NodeId>,
    /// Connections that broke since the last [`Network::take_disconnects`], in the
    /// order they broke: their receivers' monitors see them go.
    disconnects: Vec<Route>,
    /// When each update subscription takes effect at its publisher, by that time: the
    /// publisher's host sees the subscription arrive (an XPUB) and tells its server.
    joins: BTreeSet<(Instant, Route)>,
    stats: NetworkStats,
}

impl Network {
    /// A network with these routes, all connecting at `now`.
    pub fn new(
        options: NetworkOptions,
        rng: SimRng,
        routes: impl IntoIterator<Item = Route>,
        now: Instant,
    ) -> Network {
        let mut network = Network {
            options,
            rng,
            connections: BTreeMap::new(),
            reconnects: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            send_counter: 0,
            cuts: BTreeMap::new(),
            stalled_routes: BTreeSet::new(),
            down_nodes: BTreeSet::new(),
            disconnects: Vec::new(),
            joins: BTreeSet::new(),
            stats: NetworkStats::default(),
        };
        for route in routes {
            let live_at = network.live_at(now, route.link);
            network.note_join(route, live_at);
            network.connections.insert(
                route,
                Connection {
                    state: ConnectionState::Up { live_at },
                    incarnation: 0,
                    queued: 0,
                    last_delivery: now,
                    stalled: VecDeque::new(),
                },
            );
        }
        network
    }

    /// What the network has done so far.
    pub fn stats(&self) -> &NetworkStats {
        &self.stats
    }

    /// The options in force.
    pub fn options(&self) -> &NetworkOptions {
        &self.options
    }

    fn random_duration(&mut self, max: Duration) -> Duration {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }

    fn live_at(&mut self, now: Instant, link: Link) -> Instant {
        if link.is_pub_sub() {
            now + self.random_duration(self.options.subscribe_delay_max)
        } else {
            now
        }
    }

    fn delay(&mut self) -> Duration {
        let spread = self
            .options
            .delay_max
            .saturating_sub(self.options.delay_min);
        let mut delay = self.options.delay_min + self.random_duration(spread);
        if self.options.delay_spike.sample(&mut self.rng) {
            delay += self.random_duration(self.options.delay_spike_max);
        }
        delay
    }

    /// True when a message sent now on `route` would be accepted: the connection is up
    /// and its queue is under the high-water mark. Senders that must not lose messages
    /// (snapshot streams) ask before sending.
    pub fn has_room(&self, route: Route) -> bool {
        self.connections.get(&route).is_some_and(|connection| {
            matches!(connection.state, ConnectionState::Up { .. })
                && connection.queued < self.options.high_water_mark
        })
    }

    /// True when `route` is connected and its subscription (if any) is live.
    pub fn is_live(&self, route: Route, now: Instant) -> bool {
        self.connections.get(&route).is_some_and(|connection| {
            matches!(connection.state, ConnectionState::Up { live_at } if live_at <= now)
        })
    }

    /// The current incarnation of a route's connection (changes at every reconnect).
    pub fn incarnation(&self, route: Route) -> Option<u64> {
        self.connections
            .get(&route)
            .map(|connection| connection.incarnation)
    }

    /// Sends `frames` on `route` at `now`. Returns the reason if the message is dropped.
    pub fn send(
        &mut self,
        now: Instant,
        route: Route,
        frames: Vec<Vec<u8>>,
    ) -> Result<(), DropReason> {
        let high_water_mark = self.options.high_water_mark;
        let cut = self.cuts.get(&(route.from, route.to)).copied();
        let Some(connection) = self.connections.get(&route) else {
            return self.drop_message(DropReason::Disconnected);
        };
        let live_at = match connection.state {
            ConnectionState::Up { live_at } => live_at,
            ConnectionState::Down { .. } => return self.drop_message(DropReason::Disconnected),
        };
        if route.link.is_pub_sub() && now < live_at {
            return self.drop_message(DropReason::SlowJoiner);
        }
        if connection.queued >= high_water_mark {
            self.stats.last_high_water_drop.insert(route, now);
            let sequence = frames
                .get(1)
                .and_then(|frame| <[u8; 8]>::try_from(frame.as_slice()).ok())
                .map(i64::from_be_bytes);
            if let Some(sequence) = sequence {
                let highest = self
                    .stats
                    .highest_high_water_drop
                    .entry(route)
                    .or_insert(sequence);
                *highest = (*highest).max(sequence);
            }
            return self.drop_message(DropReason::HighWaterMark);
        }
        if cut == Some(PartitionKind::Stall) || self.stalled_routes.contains(&route) {
            if let Some(connection) = self.connections.get_mut(&route) {
                connection.queued += 1;
                connection.stalled.push_back(frames);
            }
            return Ok(());
        }
        self.schedule(now, route, frames);
        Ok(())
    }

    fn drop_message(&mut self, reason: DropReason) -> Result<(), DropReason> {
        *self.stats.dropped.entry(reason).or_default() += 1;
        Err(reason)
    }

    fn schedule(&mut self, now: Instant, route: Route, frames: Vec<Vec<u8>>) {
        let delay = self.delay();
        let reorder = self.options.reorder.sample(&mut self.rng);
        let duplicate = self.options.duplicate.sample(&mut self.rng);
        let duplicate_delay = self.delay();
        let Some(connection) = self.connections.get_mut(&route) else {
            return;
        };
        let mut deliver_at = now + delay;
        if !reorder {
            // TCP: never before the previous message on this route.
            deliver_at = deliver_at.max(connection.last_delivery);
            connection.last_delivery = deliver_at;
        }
        connection.queued += 1;
        let incarnation = connection.incarnation;
        if duplicate {
            connection.queued += 1;
            self.stats.duplicated += 1;
            self.send_counter += 1;
            self.in_flight.insert(
                (deliver_at + duplicate_delay, self.send_counter),
                InFlight {
                    route,
                    incarnation,
                    frames: frames.clone(),
                },
            );
        }
        self.send_counter += 1;
        self.in_flight.insert(
            (deliver_at, self.send_counter),
            InFlight {
                route,
                incarnation,
                frames,
            },
        );
    }

    /// When the next message or reconnection is due.
    pub fn next_event(&self) -> Option<Instant> {
        if !self.disconnects.is_empty() {
            // Reported at the next step, which may be now.
            return Some(Instant::ZERO);
        }
        let delivery = self.in_flight.keys().next().map(|(at, _)| *at);
        let reconnect = self.reconnects.first().map(|(at, _)| *at);
        let join = self.joins.first().map(|(at, _)| *at);
        [delivery, reconnect, join].into_iter().flatten().min()
    }

    fn note_join(&mut self, route: Route, live_at: Instant) {
        if route.link == Link::Updates && self.options.report_joins {
            self.joins.insert((live_at, route));
        }
    }

    /// The update subscriptions that took effect at or before `now` and are still
    /// live, in time order: their publishers' hosts see them arrive.
    pub fn take_joins(&mut self, now: Instant) -> Vec<Route> {
        let mut joined = Vec::new();
        while let Some(&(at, route)) = self.joins.first() {
            if at > now {
                break;
            }
            self.joins.pop_first();
            if self.is_live(route, now) {
                joined.push(route);
            }
        }
        joined
    }

    /// The connections that broke since the last call, in the order they broke (a
    /// crash or a broken partition: TCP reports it at once; a stall does not).
    pub fn take_disconnects(&mut self) -> Vec<Route> {
        std::mem::take(&mut self.disconnects)
    }

    /// Brings back connections whose reconnect time has come; returns the routes that
    /// reconnected (their receivers see a new peer).
    pub fn handle_reconnects(&mut self, now: Instant) -> Vec<Route> {
        let mut due = Vec::new();
        while let Some(&(at, route)) = self.reconnects.first() {
            if at > now {
                break;
            }
            self.reconnects.pop_first();
            due.push(route);
        }
        // In route order, as the connections map iterates.
        due.sort_unstable();
        for route in &due {
            let live_at = self.live_at(now, route.link);
            self.note_join(*route, live_at);
            if let Some(connection) = self.connections.get_mut(route) {
                connection.state = ConnectionState::Up { live_at };
                connection.incarnation += 1;
                connection.last_delivery = now;
                self.stats.reconnects += 1;
            }
        }
        due
    }

    /// The next message due at or before `now`, if any.
    pub fn pop_delivery(&mut self, now: Instant) -> Option<Delivery> {
        loop {
            let key = *self.in_flight.keys().next()?;
            if key.0 > now {
                return None;
            }
            let message = self.in_flight.remove(&key)?;
            let connection = self.connections.get_mut(&message.route)?;
            connection.queued = connection.queued.saturating_sub(1);
            if connection.incarnation != message.incarnation
                || !matches!(connection.state, ConnectionState::Up { .. })
            {
                // Already counted as lost when the connection broke.
                continue;
            }
            self.stats.delivered += 1;
            return Some(Delivery {
                route: message.route,
                connection: message.incarnation,
                frames: message.frames,
            });
        }
    }

    /// Cuts `from → to` (and `to → from` unless `one_way`). A break is always both ways:
    /// TCP cannot break in one direction only.
    pub fn partition(
        &mut self,
        now: Instant,
        from: NodeId,
        to: NodeId,
        kind: PartitionKind,
        one_way: bool,
    ) {
        self.cuts.insert((from, to), kind);
        if !one_way || kind == PartitionKind::Break {
            self.cuts.insert((to, from), kind);
        }
        if kind == PartitionKind::Break {
            self.break_between(now, |route| {
                (route.from == from && route.to == to) || (route.from == to && route.to == from)
            });
        }
    }

    /// Removes every cut between `a` and `b`: stalled messages flow again in order and
    /// broken connections come back after a reconnect delay.
    pub fn heal(&mut self, now: Instant, a: NodeId, b: NodeId) {
        self.cuts.remove(&(a, b));
        self.cuts.remove(&(b, a));
        let routes: Vec<Route> = self
            .connections
            .keys()
            .filter(|route| {
                (route.from == a && route.to == b) || (route.from == b && route.to == a)
            })
            .copied()
            .collect();
        for route in routes {
            self.restore(now, route);
        }
    }

    /// Stalls one route (one direction of one socket pair): what is sent on it waits,
    /// in order, until [`Network::release_route`] or the heal phase. Cuts and heals of
    /// the pair leave it stalled.
    pub fn stall_route(&mut self, route: Route) {
        self.stalled_routes.insert(route);
    }

    /// Ends a [`Network::stall_route`]: what waited flows again, in order.
    pub fn release_route(&mut self, now: Instant, route: Route) {
        if self.stalled_routes.remove(&route) {
            self.restore(now, route);
        }
    }

    /// Ends a [`Network::stall_route`] delivering what waited newest first: the harsh
    /// network's reordering within a connection (which TCP never does), pinned.
    pub fn release_route_newest_first(&mut self, now: Instant, route: Route) {
        if !self.stalled_routes.contains(&route) {
            return;
        }
        if let Some(connection) = self.connections.get_mut(&route) {
            connection.stalled.make_contiguous().reverse();
        }
        self.release_route(now, route);
    }

    /// Removes every cut.
    pub fn heal_all(&mut self, now: Instant) {
        let routes: Vec<Route> = self.stalled_routes.iter().copied().collect();
        for route in routes {
            self.release_route(now, route);
        }
        let pairs: Vec<(NodeId, NodeId)> = self.cuts.keys().copied().collect();
        for (a, b) in pairs {
            self.heal(now, a, b);
        }
    }

    /// True when any cut is in force.
    pub fn is_partitioned(&self) -> bool {
        !self.cuts.is_empty() || !self.stalled_routes.is_empty()
    }

    /// True when `from → to` is cut.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cuts.contains_key(&(from, to))
    }

    fn restore(&mut self, now: Instant, route: Route) {
        if self.down_nodes.contains(&route.from) || self.down_nodes.contains(&route.to) {
            return;
        }
        if self.cuts.contains_key(&(route.from, route.to)) {
            return;
        }
        let reconnect_delay = self.random_duration(self.options.reconnect_delay_max);
        let Some(connection) = self.connections.get_mut(&route) else {
            return;
        };
        match connection.state {
            ConnectionState::Down { reconnect_at } => {
                if let Some(at) = reconnect_at {
                    self.reconnects.remove(&(at, route));
                }
                let at = now + reconnect_delay;
                connection.state = ConnectionState::Down {
                    reconnect_at: Some(at),
                };
                self.reconnects.insert((at, route));
            }
            // A stalled route reconnects (TCP is up), but what waits on it stays.
            ConnectionState::Up { .. } if self.stalled_routes.contains(&route) => {}
            ConnectionState::Up { .. } => {
                let stalled: Vec<Vec<Vec<u8>>> = connection.stalled.drain(..).collect();
                connection.queued = connection.queued.saturating_sub(stalled.len());
                self.stats.released_after_stall += stalled.len() as u64;
                for frames in stalled {
                    self.schedule(now, route, frames);
                }
            }
        }
    }

    fn break_between(&mut self, _now: Instant, affected: impl Fn(&Route) -> bool) {
        let mut lost = 0u64;
        for (route, connection) in self.connections.iter_mut() {
            if !affected(route) {
                continue;
            }
            match connection.state {
                ConnectionState::Up { .. } => {
                    self.stats.connections_broken += 1;
                    if self.options.report_disconnects {
                        self.disconnects.push(*route);
                    }
                }
                ConnectionState::Down {
                    reconnect_at: Some(at),
                } => {
                    self.reconnects.remove(&(at, *route));
                }
                ConnectionState::Down { reconnect_at: None } => {}
            }
            connection.state = ConnectionState::Down { reconnect_at: None };
            lost += connection.stalled.len() as u64;
            connection.stalled.clear();
            // Scheduled messages of the old incarnation are skipped at delivery.
            connection.incarnation += 1;
        }
        let before = self.in_flight.len();
        let connections = &self.connections;
        self.in_flight.retain(|_, message| {
            connections
                .get(&message.route)
                .is_some_and(|connection| connection.incarnation == message.incarnation)
        });
        lost += (before - self.in_flight.len()) as u64;
        for connection in self.connections.values_mut() {
            connection.queued = connection.stalled.len();
        }
        let scheduled: Vec<Route> = self.in_flight.values().map(|m| m.route).collect();
        for route in scheduled {
            if let Some(connection) = self.connections.get_mut(&route) {
                connection.queued += 1;
            }
        }
        if lost > 0 {
            *self
                .stats
                .dropped
                .entry(DropReason::ConnectionBroken)
                .or_default() += lost;
        }
    }

    /// A node crashes: all its connections break and stay down until [`Network::restart`].
    pub fn crash(&mut self, now: Instant, node: NodeId) {
        self.down_nodes.insert(node);
        self.break_between(now, |route| route.from == node || route.to == node);
    }

    /// A crashed node is back: its connections re-establish after a reconnect delay
    /// (those to other crashed nodes or across a cut stay down).
    pub fn restart(&mut self, now: Instant, node: NodeId) {
        self.down_nodes.remove(&node);
        let routes: Vec<Route> = self
            .connections
            .keys()
            .filter(|route| route.from == node || route.to == node)
            .copied()
            .collect();
        for route in routes {
            self.restore(now, route);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const UPDATES: Route = Route {
        from: 0,
        to: 2,
        link: Link::Updates,
    };
    const REQUESTS: Route = Route {
        from: 2,
        to: 0,
        link: Link::SnapshotRequest,
    };

    fn network(options: NetworkOptions) -> Network {
        Network::new(
            options,
            SimRng::seed_from_u64(7),
            [UPDATES, REQUESTS],
            Instant::ZERO,
        )
    }

    fn drain(network: &mut Network, until: Instant) -> Vec<Delivery> {
        let mut delivered = Vec::new();
        while let Some(delivery) = network.pop_delivery(until) {
            delivered.push(delivery);
        }
        delivered
    }

    fn numbered(n: u8) -> Vec<Vec<u8>> {
        vec![vec![n]]
    }

    #[test]
    fn messages_on_one_route_arrive_in_the_order_sent() {
        let mut network = network(NetworkOptions {
            delay_spike: Ratio::ALWAYS,
            subscribe_delay_max: Duration::ZERO,
            ..NetworkOptions::default()
        });
        for n in 0..100 {
            network.send(Instant::ZERO, UPDATES, numbered(n)).unwrap();
        }
        let order: Vec<u8> = drain(&mut network, Instant::from_millis(10_000))
            .iter()
            .map(|d| d.frames[0][0])
            .collect();
        assert_eq!(order, (0..100).collect::<Vec<u8>>());
    }

    #[test]
    fn a_publisher_drops_what_it_sends_before_the_subscription_arrives() {
        let mut network = network(NetworkOptions {
            subscribe_delay_max: Duration::from_millis(50),
            ..NetworkOptions::default()
        });
        assert_eq!(
            network.send(Instant::ZERO, UPDATES, numbered(1)),
            Err(DropReason::SlowJoiner)
        );
        let later = Instant::from_millis(51);
        assert!(network.is_live(UPDATES, later));
        assert_eq!(network.send(later, UPDATES, numbered(2)), Ok(()));
    }

    #[test]
    fn a_publisher_drops_past_the_high_water_mark() {
        let mut network = network(NetworkOptions {
            high_water_mark: 3,
            subscribe_delay_max: Duration::ZERO,
            ..NetworkOptions::default()
        });
        for n in 0..3 {
            network.send(Instant::ZERO, UPDATES, numbered(n)).unwrap();
        }
        assert!(!network.has_room(UPDATES));
        assert_eq!(
            network.send(Instant::ZERO, UPDATES, numbered(3)),
            Err(DropReason::HighWaterMark)
        );
        drain(&mut network, Instant::from_millis(1000));
        assert!(network.has_room(UPDATES));
    }

    #[test]
    fn a_stall_holds_messages_and_releases_them_in_order_at_heal() {
        let mut network = network(NetworkOptions {
            subscribe_delay_max: Duration::ZERO,
            ..NetworkOptions::default()
        });
        network.partition(Instant::ZERO, 0, 2, PartitionKind::Stall, true);
        for n in 0..5 {
            network.send(Instant::ZERO, UPDATES, numbered(n)).unwrap();
        }
        assert!(drain(&mut network, Instant::from_millis(5_000)).is_empty());
        // One-way: the other direction still flows.
        network.send(Instant::ZERO, REQUESTS, numbered(9)).unwrap();
        network.heal(Instant::from_millis(5_000), 0, 2);
        let delivered = drain(&mut network, Instant::from_millis(10_000));
        let order: Vec<u8> = delivered.iter().map(|d| d.frames[0][0]).collect();
        assert_eq!(order, vec![9, 0, 1, 2, 3, 4]);
        assert_eq!(network.stats().released_after_stall, 5);
    }

    #[test]
    fn a_break_loses_in_flight_messages_and_reconnects_after_heal() {
        let mut network = network(NetworkOptions {
            subscribe_delay_max: Duration::ZERO,
            ..NetworkOptions::default()
        });
        network.send(Instant::ZERO, UPDATES, numbered(1)).unwrap();
        network.partition(Instant::ZERO, 0, 2, PartitionKind::Break, false);
        assert_eq!(
            network.take_disconnects(),
            [UPDATES, REQUESTS],
            "the receivers' monitors see them go"
        );
        assert!(drain(&mut network, Instant::from_millis(1_000)).is_empty());
        assert_eq!(
            network.send(Instant::from_millis(1_000), UPDATES, numbered(2)),
            Err(DropReason::Disconnected)
        );
        network.heal(Instant::from_millis(2_000), 0, 2);
        // The subscription made at start took effect before the break.
        assert_eq!(network.take_joins(Instant::from_millis(2_000)), []);
        assert!(network.next_event().unwrap() > Instant::from_millis(2_000));
        let back = Instant::from_millis(2_000) + network.options().reconnect_delay_max;
        assert!(network.handle_reconnects(back).contains(&UPDATES));
        assert_eq!(network.incarnation(UPDATES), Some(2));
        network.send(back, UPDATES, numbered(3)).unwrap();
        let delivered = drain(&mut network, back + Duration::from_secs(1));
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].frames, numbered(3));
        assert_eq!(network.stats().dropped[&DropReason::ConnectionBroken], 1);
    }

    #[test]
    fn a_crashed_node_stays_unreachable_until_it_restarts() {
        let mut network = network(NetworkOptions::default());
        network.crash(Instant::ZERO, 0);
        assert_eq!(network.take_disconnects(), [UPDATES, REQUESTS]);
        network.heal_all(Instant::ZERO);
        assert!(
            network.take_joins(Instant::from_millis(60_000)).is_empty(),
            "the subscription made at start broke before it took effect, or is gone"
        );
        assert_eq!(network.next_event(), None);
        network.restart(Instant::from_millis(100), 0);
        let back = Instant::from_millis(100) + network.options().reconnect_delay_max;
        assert_eq!(network.handle_reconnects(back).len(), 2);
    }

    #[test]
    fn harsh_mode_duplicates_and_reorders_within_a_route() {
        let mut network = network(NetworkOptions {
            duplicate: Ratio::new(1, 2),
            reorder: Ratio::ALWAYS,
            subscribe_delay_max: Duration::ZERO,
            ..NetworkOptions::default()
        });
        for n in 0..50 {
            network.send(Instant::ZERO, UPDATES, numbered(n)).unwrap();
        }
        let order: Vec<u8> = drain(&mut network, Instant::from_millis(10_000))
            .iter()
            .map(|d| d.frames[0][0])
            .collect();
        assert!(order.len() > 50);
        assert!(order.windows(2).any(|pair| pair[0] > pair[1]));
    }

    #[test]
    fn the_same_seed_gives_the_same_deliveries() {
        let run = || {
            let mut network = network(NetworkOptions::default());
            let mut at = Instant::ZERO;
            for n in 0..200 {
                at += Duration::from_micros(300);
                let _ = network.send(at, UPDATES, numbered(n));
                let _ = network.send(at, REQUESTS, numbered(n));
            }
            drain(&mut network, Instant::from_millis(10_000))
        };
        assert_eq!(run(), run());
    }
}
