//! The state-machine fuzz harness, shared by the `machines` fuzz target (`cargo fuzz`)
//! and the stable-Rust corpus replay test (`core/tests/fuzz_machines_corpus.rs`).
//!
//! The fuzzer's bytes are read as a sequence of operations on a primary, a backup and
//! one client, all real `clonekv-core` machines: messages between them (delivered,
//! dropped, in order per link), arbitrary or well-formed frames on every input, the
//! application's writes, the host's connection notices, restarts, time passing and
//! wall-clock jumps. After every operation it asserts that nothing panicked and that
//! the machines' own bounds and invariants hold.

use std::collections::VecDeque;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use clonekv_core::client::{self, Channel, Client, ServerIndex, MAX_OUTSTANDING_REQUESTS};
use clonekv_core::kvmsg::{BstarState, KvMsg, Properties, SnapshotRequest, Uuid, TTL};
use clonekv_core::server::{self, HashKey, Server};
use clonekv_core::time::{EpochMillis, Instant};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

/// Operations read from one input, at most.
const MAX_OPERATIONS: usize = 4_000;
/// Messages a link holds; past it the oldest is dropped (a high-water mark).
const LINK_CAPACITY: usize = 64;
/// Frames of an arbitrary message, at most.
const MAX_FRAMES: usize = 7;

/// A directed link between two machines, carrying whole messages in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
enum Link {
    /// A server's PUB to the client's SUB.
    ServerToClient { server: bool },
    /// A server's snapshot replies to the client's DEALER.
    SnapshotToClient { server: bool },
    /// The client's DEALER to a server's ROUTER.
    ClientRequest { server: bool },
    /// The client's PUB to a server's collector.
    ClientToCollector { server: bool },
    /// A server's PUB to its peer's SUB (updates and HUGZ).
    PeerUpdates { from: bool },
    /// A server's Binary Star state to its peer.
    PeerState { from: bool },
    /// A server's snapshot request to its peer.
    PeerRequest { from: bool },
    /// A server's snapshot reply to its peer.
    PeerReply { from: bool },
    /// A server's forward to its peer's collector.
    PeerForward { from: bool },
}

const LINKS: usize = 18;

impl Link {
    fn index(self) -> usize {
        let (kind, side) = match self {
            Link::ServerToClient { server } => (0, server),
            Link::SnapshotToClient { server } => (1, server),
            Link::ClientRequest { server } => (2, server),
            Link::ClientToCollector { server } => (3, server),
            Link::PeerUpdates { from } => (4, from),
            Link::PeerState { from } => (5, from),
            Link::PeerRequest { from } => (6, from),
            Link::PeerReply { from } => (7, from),
            Link::PeerForward { from } => (8, from),
        };
        kind * 2 + usize::from(side)
    }
}

/// What the fuzzer does next.
#[derive(Debug, Arbitrary)]
enum Operation {
    /// Time passes; every machine whose deadline came fires it.
    Advance(u16),
    /// The wall clock jumps (both ways), the monotonic one does not.
    WallJump(i16),
    /// The head of a link arrives.
    Deliver(Link),
    /// Every message on a link arrives, in order.
    Flush(Link),
    /// The head of a link is lost.
    Drop(Link),
    /// Frames the fuzzer made arrive on a server's input.
    ServerInput {
        server: bool,
        socket: u8,
        message: Message,
    },
    /// Frames the fuzzer made arrive on one of the client's sockets.
    ClientInput {
        server: u8,
        snapshot: bool,
        message: Message,
    },
    /// The application writes.
    Set {
        key: u8,
        value: u8,
        ttl_ms: Option<u16>,
        watch: bool,
    },
    /// The application deletes.
    Delete { key: u8, watch: bool },
    /// The client's host reports a connection to a server down or back.
    ClientNotice { server: bool, notice: u8 },
    /// A server's host reports its peer subscription back, or a new subscriber.
    ServerNotice { server: bool, joined: bool },
    /// A server restarts with an empty map.
    Restart { server: bool },
}

/// A message to feed: well-formed from parts, or raw frames.
#[derive(Debug, Arbitrary)]
enum Message {
    Update {
        key: u8,
        sequence: i16,
        uuid: Option<u8>,
        ttl: Option<u16>,
        body: Vec<u8>,
    },
    Hugz {
        sequence: i16,
        state: Option<u8>,
    },
    Kthxbai {
        sequence: i16,
        subtree: u8,
    },
    Request {
        subtree: u8,
    },
    State(u8),
    Raw(Vec<Vec<u8>>),
}

fn key(index: u8) -> Vec<u8> {
    // A few keys under two subtrees, so that updates collide and subtrees matter.
    format!("/k/{}/{}", index % 2, index % 5).into_bytes()
}

fn subtree(index: u8) -> Vec<u8> {
    match index % 4 {
        0 => Vec::new(),
        1 => b"/k/0/".to_vec(),
        2 => b"/k/1/".to_vec(),
        _ => b"/elsewhere/".to_vec(),
    }
}

fn state(index: u8) -> BstarState {
    match index % 4 {
        0 => BstarState::Primary,
        1 => BstarState::Backup,
        2 => BstarState::Active,
        _ => BstarState::Passive,
    }
}

impl Message {
    fn frames(&self) -> Vec<Vec<u8>> {
        match self {
            Message::Update {
                key: index,
                sequence,
                uuid,
                ttl,
                body,
            } => {
                let mut message = KvMsg {
                    key: key(*index),
                    sequence: i64::from(*sequence),
                    uuid: uuid.map(|byte| Uuid::from_bytes([byte; 16])),
                    properties: Properties::default(),
                    body: body.iter().copied().take(32).collect(),
                };
                if let Some(ttl) = ttl {
                    let text = format!("{}", f64::from(*ttl) / 100.0);
                    let _ = message.properties.set(TTL, text.as_bytes());
                }
                message.encode().to_vec()
            }
            Message::Hugz {
                sequence,
                state: marked,
            } => {
                let sequence = i64::from(*sequence);
                match marked {
                    Some(index) => KvMsg::hugz_from(state(*index), sequence),
                    None => KvMsg::hugz(sequence),
                }
                .encode()
                .to_vec()
            }
            Message::Kthxbai {
                sequence,
                subtree: index,
            } => KvMsg::kthxbai(i64::from(*sequence), subtree(*index))
                .encode()
                .to_vec(),
            Message::Request { subtree: index } => {
                SnapshotRequest::new(subtree(*index)).encode().to_vec()
            }
            Message::State(index) => vec![state(*index).encode()],
            Message::Raw(frames) => frames.iter().take(MAX_FRAMES).cloned().collect(),
        }
    }
}

/// Routing ids the servers see: the client's DEALER and each peer's.
const CLIENT_ID: &[u8] = b"client";
const PEER_ID: &[u8] = b"peer";

struct World {
    servers: [Server; 2],
    configs: [server::Config; 2],
    client: Client,
    links: Vec<VecDeque<Vec<Vec<u8>>>>,
    now: Instant,
    wall: EpochMillis,
    /// The highest sequence of a KVPUB each server published in its current
    /// incarnation: it never numbers another at or below it (it may adopt a lower
    /// history after stepping down, but resumes above what it published).
    published: [i64; 2],
}

fn side(server: bool) -> usize {
    usize::from(server)
}

impl World {
    fn new(tight: bool) -> World {
        let now = Instant::ZERO;
        let wall = EpochMillis(1_795_000_000_000);
        let mut configs = [server::Config::primary(), server::Config::backup()];
        if tight {
            for config in &mut configs {
                config.pending_max_len = 3;
                config.sync_backlog_max = 3;
                config.dedupe_window = 3;
                config.split_log_max = 3;
                config.max_snapshot_streams = 2;
                config.snapshot_batch = 1;
            }
        }
        let servers = configs.map(|config| {
            Server::new(now, wall, config, HashKey::from_bytes([7; 16]))
                .unwrap_or_else(|error| panic!("config: {error}"))
        });
        let mut client_config = client::Config {
            servers: 2,
            subtree: b"/k/".to_vec(),
            ..client::Config::default()
        };
        if tight {
            client_config.max_buffered_updates = 3;
            client_config.max_in_flight = 3;
        }
        let client = Client::new(client_config, ChaCha8Rng::seed_from_u64(7), now)
            .unwrap_or_else(|error| panic!("client config: {error}"));
        World {
            servers,
            configs,
            client,
            links: vec![VecDeque::new(); LINKS],
            now,
            wall,
            published: [0; 2],
        }
    }

    fn send(&mut self, link: Link, frames: Vec<Vec<u8>>) {
        let queue = &mut self.links[link.index()];
        if queue.len() >= LINK_CAPACITY {
            queue.pop_front();
        }
        queue.push_back(frames);
    }

    /// Moves every machine's outputs onto the links.
    fn drain(&mut self) {
        for index in 0..2 {
            let from = index == 1;
            while let Some(output) = self.servers[index].poll_output() {
                match output {
                    server::Output::Publish(frames) => {
                        let frames: Vec<Vec<u8>> =
                            frames.iter().map(|frame| frame.as_ref().to_vec()).collect();
                        self.check_numbering(index, &frames);
                        self.send(Link::ServerToClient { server: from }, frames.clone());
                        self.send(Link::PeerUpdates { from }, frames);
                    }
                    server::Output::SnapshotReady { .. } => {}
                    server::Output::SendStateToPeer(frame) => {
                        self.send(Link::PeerState { from }, vec![frame]);
                    }
                    server::Output::RequestPeerSnapshot(frames) => {
                        self.send(Link::PeerRequest { from }, frames.to_vec());
                    }
                    server::Output::ForwardToPeerCollector(frames) => {
                        self.send(Link::PeerForward { from }, frames.to_vec());
                    }
                    server::Output::Persist(_)
                    | server::Output::PersistImage(_)
                    | server::Output::Event(_) => {}
                }
            }
            // Snapshot streams are pulled as the links have room.
            for (routing_id, link) in [
                (CLIENT_ID, Link::SnapshotToClient { server: from }),
                (PEER_ID, Link::PeerReply { from }),
            ] {
                while self.links[link.index()].len() < LINK_CAPACITY {
                    let Some(frames) = self.servers[index].poll_snapshot(self.now, routing_id)
                    else {
                        break;
                    };
                    let frames = frames.iter().map(|frame| frame.as_ref().to_vec()).collect();
                    self.send(link, frames);
                }
            }
        }
        while let Some(output) = self.client.poll_output() {
            match output {
                client::Output::SendSnapshotRequest { server, frames, .. } => {
                    self.send(
                        Link::ClientRequest {
                            server: server.0 == 1,
                        },
                        frames.to_vec(),
                    );
                }
                client::Output::Publish { frames } => {
                    for server in [false, true] {
                        self.send(Link::ClientToCollector { server }, frames.to_vec());
                    }
                }
                client::Output::Event(_) => {}
            }
        }
    }

    fn deliver(&mut self, link: Link) {
        let Some(frames) = self.links[link.index()].pop_front() else {
            return;
        };
        let (now, wall) = (self.now, self.wall);
        match link {
            Link::ServerToClient { server } => self.client.handle_message(
                now,
                ServerIndex(side(server)),
                Channel::Subscriber,
                &frames,
            ),
            Link::SnapshotToClient { server } => self.client.handle_message(
                now,
                ServerIndex(side(server)),
                Channel::Snapshot,
                &frames,
            ),
            Link::ClientRequest { server } => {
                self.servers[side(server)].handle_snapshot_request(now, wall, CLIENT_ID, &frames)
            }
            Link::ClientToCollector { server } => {
                self.servers[side(server)].handle_collected(now, wall, &frames)
            }
            Link::PeerUpdates { from } => {
                self.servers[side(!from)].handle_peer_update(now, wall, &frames)
            }
            Link::PeerState { from } => {
                self.servers[side(!from)].handle_peer_state(now, wall, &frames)
            }
            Link::PeerRequest { from } => {
                self.servers[side(!from)].handle_snapshot_request(now, wall, PEER_ID, &frames)
            }
            Link::PeerReply { from } => {
                self.servers[side(!from)].handle_peer_snapshot(now, wall, &frames)
            }
            Link::PeerForward { from } => {
                self.servers[side(!from)].handle_collected(now, wall, &frames)
            }
        }
    }

    fn fire_due(&mut self) {
        let (now, wall) = (self.now, self.wall);
        for server in &mut self.servers {
            if server.poll_timeout().is_some_and(|due| due <= now) {
                server.handle_timeout(now, wall);
            }
        }
        if self.client.poll_timeout().is_some_and(|due| due <= now) {
            self.client.handle_timeout(now);
        }
    }

    fn apply(&mut self, operation: Operation) {
        let (now, wall) = (self.now, self.wall);
        match operation {
            Operation::Advance(millis) => {
                let step = Duration::from_millis(u64::from(millis));
                self.now += step;
                self.wall = self.wall.saturating_add(step);
                self.fire_due();
            }
            Operation::WallJump(millis) => {
                let millis = i64::from(millis) * 10;
                self.wall = EpochMillis(self.wall.0.saturating_add_signed(millis));
            }
            Operation::Deliver(link) => self.deliver(link),
            Operation::Flush(link) => {
                for _ in 0..LINK_CAPACITY {
                    if self.links[link.index()].is_empty() {
                        break;
                    }
                    self.deliver(link);
                    self.drain();
                }
            }
            Operation::Drop(link) => {
                self.links[link.index()].pop_front();
            }
            Operation::ServerInput {
                server,
                socket,
                message,
            } => {
                let frames = message.frames();
                let server = &mut self.servers[side(server)];
                match socket % 5 {
                    0 => server.handle_snapshot_request(now, wall, CLIENT_ID, &frames),
                    1 => server.handle_collected(now, wall, &frames),
                    2 => server.handle_peer_state(now, wall, &frames),
                    3 => server.handle_peer_update(now, wall, &frames),
                    _ => server.handle_peer_snapshot(now, wall, &frames),
                }
            }
            Operation::ClientInput {
                server,
                snapshot,
                message,
            } => {
                let channel = if snapshot {
                    Channel::Snapshot
                } else {
                    Channel::Subscriber
                };
                // Index 2 is outside the list: the client must drop it.
                let index = ServerIndex(usize::from(server % 3));
                self.client
                    .handle_message(now, index, channel, &message.frames());
            }
            Operation::Set {
                key: index,
                value,
                ttl_ms,
                watch,
            } => {
                let ttl = ttl_ms.map(|millis| Duration::from_millis(u64::from(millis)));
                if let Ok(uuid) = self.client.set(key(index), vec![value; 3], ttl) {
                    if watch {
                        let _ = self.client.watch_commit(uuid);
                    }
                }
            }
            Operation::Delete { key: index, watch } => {
                if let Ok(uuid) = self.client.delete(key(index)) {
                    if watch {
                        let _ = self.client.watch_commit(uuid);
                    }
                }
            }
            Operation::ClientNotice { server, notice } => {
                let index = ServerIndex(side(server));
                match notice % 3 {
                    0 => self.client.handle_server_disconnected(now, index),
                    1 => self.client.handle_subscriber_reconnected(now, index),
                    _ => self.client.handle_snapshot_reconnected(now, index),
                }
            }
            Operation::ServerNotice { server, joined } => {
                let server = &mut self.servers[side(server)];
                if joined {
                    server.handle_subscriber_joined(now, wall);
                } else {
                    server.handle_peer_publisher_reconnected(now, wall);
                }
            }
            Operation::Restart { server } => {
                let index = side(server);
                let config = self.configs[index];
                if let Ok(fresh) = Server::new(now, wall, config, HashKey::from_bytes([7; 16])) {
                    self.servers[index] = fresh;
                    self.published[index] = 0;
                }
            }
        }
        self.drain();
        self.check();
    }

    /// A KVPUB is numbered above every KVPUB its server published before, in this
    /// incarnation (HUGZ only repeat the current sequence).
    fn check_numbering(&mut self, index: usize, frames: &[Vec<u8>]) {
        let Ok(message) = KvMsg::decode(frames, &self.configs[index].limits) else {
            panic!("server {index} published a message that does not decode");
        };
        if message.is_hugz() {
            return;
        }
        assert!(
            message.sequence > self.published[index],
            "server {index} numbered a KVPUB {} at or below {} it already published",
            message.sequence,
            self.published[index]
        );
        self.published[index] = message.sequence;
    }

    /// The machines' own bounds and invariants.
    fn check(&mut self) {
        for (index, server) in self.servers.iter().enumerate() {
            let config = &self.configs[index];
            assert!(
                server.pending_len() <= config.pending_max_len,
                "server {index}: pending list over its bound"
            );
            assert!(
                server.open_snapshot_streams() <= config.max_snapshot_streams,
                "server {index}: snapshot streams over their bound"
            );
            assert!(
                server.poll_timeout().is_some(),
                "server {index}: no deadline (its heartbeat must always be due)"
            );
        }
        for index in 0..2 {
            assert!(
                self.client.outstanding_requests(ServerIndex(index)) <= MAX_OUTSTANDING_REQUESTS,
                "client: more than {MAX_OUTSTANDING_REQUESTS} requests outstanding"
            );
        }
        assert!(
            self.client.poll_timeout().is_some(),
            "client: no deadline (the server's silence must always be timed)"
        );
    }
}

/// Runs the operations `data` spells. Panics (the fuzzer's signal) if a machine panics
/// or an invariant breaks. Returns the number of operations run.
pub fn drive_machines(data: &[u8]) -> usize {
    let mut input = Unstructured::new(data);
    let tight = bool::arbitrary(&mut input).unwrap_or(false);
    let mut world = World::new(tight);
    let mut operations = 0;
    while operations < MAX_OPERATIONS && !input.is_empty() {
        let Ok(operation) = Operation::arbitrary(&mut input) else {
            break;
        };
        world.apply(operation);
        operations += 1;
    }
    operations
}
