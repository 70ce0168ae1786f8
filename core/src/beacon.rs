//! beacon: zero-config discovery on a LAN, as a sans-IO machine.
//!
//! Every server of a cluster broadcasts a small datagram every [`Config::interval`]
//! saying how to reach it; clients only listen. The machine tracks the peers it hears:
//! a peer is up on its first valid beacon, changed when its address or what it
//! announces (role, Binary Star state, ports) changes, and down after
//! [`Config::silence`] without one.
//!
//! # Invariants
//!
//! - **Up exactly while heard.** A peer is up exactly while a valid beacon of this
//!   cluster from it arrived within `silence` (given [`Beacon::handle_timeout`] is called
//!   at [`Beacon::poll_timeout`]). A beacon from any of its addresses keeps it up.
//! - **Only valid beacons count.** Nothing that fails to parse, names another cluster or
//!   comes from this node itself changes the peer table or produces an output; such
//!   datagrams are counted by reason ([`Beacon::dropped`]) and never trusted.
//! - **Addresses do not flap.** A node on a multi-homed host, or one heard both over
//!   loopback and over the LAN, reaches us from several source addresses. A peer's
//!   address moves to another source only once its current address has been silent for
//!   [`address_silence`] (two and a half intervals; see [`followed_address`]); so a
//!   server that really moves is followed within about three intervals, and one heard
//!   from two addresses keeps the first as long as no two beacons in a row are lost on
//!   its path.
//! - **Clients ask once, then listen.** A [`Kind::Client`] emits exactly one datagram,
//!   when created: a *solicitation* (its own beacon), so that a command-line client need
//!   not wait up to an interval for the servers' next beacons. A client is never a peer:
//!   its datagrams change no peer table, and a server needs no list of clients.
//! - **Servers are heard.** A server emits a beacon at once when created, then every
//!   `interval`, at once when its Binary Star state changes, and early when a client
//!   solicits one — but never two within [`Config::interval`] /
//!   [`SOLICITED_BEACONS_PER_INTERVAL`] (see [`Beacon::answer_solicitation`]): however
//!   many clients start, a server sends at most that many beacons more per interval.
//! - **What is sent parses.** A configuration whose beacon receivers would drop (a
//!   server without a Binary Star state or with port 0, a client with a state) is refused
//!   by [`Beacon::new`].
//!
//! # The datagram
//!
//! | bytes | field |
//! |-------|-------|
//! | 4 | magic `CKVB` |
//! | 1 | version (1) |
//! | 1 | length N of the cluster name (1 to [`MAX_CLUSTER_LEN`]) |
//! | N | cluster name: two clusters on one LAN never mix |
//! | 16 | the sender's instance id (random per process start: a restart is a new peer) |
//! | 1 | kind: 0 client (listens only), 1 primary server, 2 backup server |
//! | 1 | Binary Star state (`1`–`4` as on the state socket; 0 for a client) |
//! | 2 | base port P (big-endian): snapshots on P, updates on P+1, collector on P+2 |
//! | 2 | Binary Star state port (big-endian): what a peer server connects to |
//!
//! The host is the datagram's source address: a server reachable on several interfaces
//! is reached on the one its beacon left by. The kind lets a backup find its primary
//! and a client find both; the state lets a client go straight to the active one.
//!
//! # Driving it
//!
//! Feed received datagrams to [`Beacon::handle_datagram`], call [`Beacon::handle_timeout`]
//! at [`Beacon::poll_timeout`], and drain [`Beacon::poll_output`]: [`Output::Send`] is a
//! datagram to broadcast, [`Output::Event`] a change in the peer table.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use crate::kvmsg::BstarState;
use crate::time::Instant;

/// The datagram's first four bytes.
pub const MAGIC: &[u8; 4] = b"CKVB";
/// The datagram format this code writes and reads.
pub const VERSION: u8 = 1;
/// Longest cluster name.
pub const MAX_CLUSTER_LEN: usize = 64;
/// Longest valid datagram; anything longer is dropped unread.
pub const MAX_DATAGRAM_LEN: usize = 4 + 1 + 1 + MAX_CLUSTER_LEN + 16 + 1 + 1 + 2 + 2;
/// How many whole intervals a peer's current address must be silent before the peer is
/// followed to another address it is heard from; [`address_silence`] adds half an
/// interval for jitter.
pub const ADDRESS_SILENCE_INTERVALS: u32 = 2;

/// How long a peer's current address must be silent before the peer is followed to
/// another address it is heard from (see [`followed_address`]):
/// [`ADDRESS_SILENCE_INTERVALS`] intervals and a half. With one beacon lost on the
/// current path, that path's next one is due two intervals after the last, and arrives
/// early or late by the jitter; the copy heard over the other path may arrive first. The
/// half interval keeps that race, and so one lost beacon, from moving a multi-homed peer.
pub fn address_silence(interval: Duration) -> Duration {
    interval
        .saturating_mul(ADDRESS_SILENCE_INTERVALS)
        .saturating_add(interval / 2)
}

/// At most this many beacons per interval answer solicitations, beyond the regular one
/// (see [`Beacon::answer_solicitation`]).
pub const SOLICITED_BEACONS_PER_INTERVAL: u32 = 10;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A client: it listens, after one solicitation when it starts (it is never a peer).
    Client,
    /// A server configured as the primary.
    Primary,
    /// A server configured as the backup.
    Backup,
}

/// What a server announces about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Announcement {
    /// Primary or backup (a client announces [`Kind::Client`] and no ports).
    pub kind: Kind,
    /// Its Binary Star state (`None` for a client).
    pub state: Option<BstarState>,
    /// Base port P: snapshots on P, updates on P+1, collector on P+2.
    pub base_port: u16,
    /// The port of its Binary Star state PUB.
    pub state_port: u16,
}

/// A beacon as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Datagram {
    /// The cluster it belongs to.
    pub cluster: Vec<u8>,
    /// The sender's instance id.
    pub instance: [u8; 16],
    /// What the sender announces.
    pub announcement: Announcement,
}

/// Why a received datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Shorter than its fields, or longer than [`MAX_DATAGRAM_LEN`].
    BadLength,
    /// Not `CKVB`: someone else's traffic on the port.
    BadMagic,
    /// A format version this code does not read.
    UnknownVersion,
    /// A kind or state byte out of range, or an empty cluster name.
    BadField,
    /// Another cluster's beacon (routine on a shared LAN).
    OtherCluster,
    /// This node's own beacon, looped back (routine).
    OwnBeacon,
}

impl DropReason {
    /// A short, stable identifier, for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BadLength => "bad_length",
            DropReason::BadMagic => "bad_magic",
            DropReason::UnknownVersion => "unknown_version",
            DropReason::BadField => "bad_field",
            DropReason::OtherCluster => "other_cluster",
            DropReason::OwnBeacon => "own_beacon",
        }
    }
}

impl Datagram {
    /// The bytes to broadcast.
    pub fn encode(&self) -> Vec<u8> {
        let cluster = self.cluster.get(..MAX_CLUSTER_LEN).unwrap_or(&self.cluster);
        let mut bytes = Vec::with_capacity(MAX_DATAGRAM_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.push(VERSION);
        bytes.push(u8::try_from(cluster.len()).unwrap_or(u8::MAX));
        bytes.extend_from_slice(cluster);
        bytes.extend_from_slice(&self.instance);
        let announcement = &self.announcement;
        bytes.push(match announcement.kind {
            Kind::Client => 0,
            Kind::Primary => 1,
            Kind::Backup => 2,
        });
        bytes.push(announcement.state.map_or(0, state_byte));
        bytes.extend_from_slice(&announcement.base_port.to_be_bytes());
        bytes.extend_from_slice(&announcement.state_port.to_be_bytes());
        bytes
    }

    /// Reads a datagram; anything that does not parse is an error, never a guess.
    pub fn decode(bytes: &[u8]) -> Result<Datagram, DropReason> {
        if bytes.len() > MAX_DATAGRAM_LEN {
            return Err(DropReason::BadLength);
        }
        let mut reader = Reader(bytes);
        if reader.take(4).ok_or(DropReason::BadLength)? != MAGIC {
            return Err(DropReason::BadMagic);
        }
        if reader.byte()? != VERSION {
            return Err(DropReason::UnknownVersion);
        }
        let cluster_len = usize::from(reader.byte()?);
        if cluster_len == 0 || cluster_len > MAX_CLUSTER_LEN {
            return Err(DropReason::BadField);
        }
        let cluster = reader
            .take(cluster_len)
            .ok_or(DropReason::BadLength)?
            .to_vec();
        let instance: [u8; 16] = reader
            .take(16)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(DropReason::BadLength)?;
        let kind = match reader.byte()? {
            0 => Kind::Client,
            1 => Kind::Primary,
            2 => Kind::Backup,
            _ => return Err(DropReason::BadField),
        };
        let state = match (kind, reader.byte()?) {
            (Kind::Client, 0) => None,
            (Kind::Client, _) => return Err(DropReason::BadField),
            (_, byte) => Some(BstarState::decode(&[[byte]]).map_err(|_| DropReason::BadField)?),
        };
        let base_port = reader.port()?;
        let state_port = reader.port()?;
        if !reader.0.is_empty() {
            return Err(DropReason::BadLength);
        }
        if kind != Kind::Client && (base_port == 0 || base_port > u16::MAX - 2 || state_port == 0) {
            return Err(DropReason::BadField);
        }
        Ok(Datagram {
            cluster,
            instance,
            announcement: Announcement {
                kind,
                state,
                base_port,
                state_port,
            },
        })
    }
}

fn state_byte(state: BstarState) -> u8 {
    state.encode().first().copied().unwrap_or(0)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Result<u8, DropReason> {
        self.take(1)
            .and_then(|bytes| bytes.first().copied())
            .ok_or(DropReason::BadLength)
    }

    fn port(&mut self) -> Result<u16, DropReason> {
        let bytes: [u8; 2] = self
            .take(2)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(DropReason::BadLength)?;
        Ok(u16::from_be_bytes(bytes))
    }
}

/// The machine's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The cluster this node belongs to (1 to [`MAX_CLUSTER_LEN`] bytes).
    pub cluster: Vec<u8>,
    /// This node's instance id: random per start, so a restart is a new peer.
    pub instance: [u8; 16],
    /// What this node announces.
    pub announcement: Announcement,
    /// Time between two beacons (1 s, as dkv and zbeacon).
    pub interval: Duration,
    /// A peer unheard this long is down (4 s, as dkv: several beacons lost in a row).
    pub silence: Duration,
}

impl Config {
    /// A node of `cluster` announcing `announcement`, with the default timing.
    pub fn new(cluster: &[u8], instance: [u8; 16], announcement: Announcement) -> Config {
        Config {
            cluster: cluster.to_vec(),
            instance,
            announcement,
            interval: Duration::from_secs(1),
            silence: Duration::from_secs(4),
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), Error> {
        if self.cluster.is_empty() || self.cluster.len() > MAX_CLUSTER_LEN {
            return Err(Error::ClusterName {
                len: self.cluster.len(),
            });
        }
        if self.interval.is_zero() {
            return Err(Error::ZeroInterval);
        }
        if self.silence <= self.interval {
            return Err(Error::SilenceTooShort);
        }
        let own = Datagram {
            cluster: self.cluster.clone(),
            instance: self.instance,
            announcement: self.announcement,
        };
        if Datagram::decode(&own.encode()).is_err() {
            return Err(Error::Announcement {
                announcement: self.announcement,
            });
        }
        Ok(())
    }
}

/// Invalid configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cluster name is empty or too long.
    #[error("the cluster name is {len} bytes; it must be 1 to {MAX_CLUSTER_LEN}")]
    ClusterName {
        /// Its length.
        len: usize,
    },
    /// The beacon interval is zero.
    #[error("the beacon interval must be greater than zero")]
    ZeroInterval,
    /// A peer would be declared down between two of its beacons.
    #[error("the silence timeout must be longer than the beacon interval")]
    SilenceTooShort,
    /// Receivers would drop this node's beacon as malformed.
    #[error(
        "the announcement {announcement:?} is not valid: a server announces its Binary Star \
         state, a base port from 1 to 65533 and a non-zero state port; a client announces no state"
    )]
    Announcement {
        /// The announcement refused.
        announcement: Announcement,
    },
}

/// A node this one hears.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Its instance id.
    pub instance: [u8; 16],
    /// The address it is reached at: the source address of its beacons (the first one
    /// heard, while that one keeps being heard; see [`followed_address`]).
    pub address: IpAddr,
    /// What it announces.
    pub announcement: Announcement,
    /// When its latest beacon arrived, from any of its addresses.
    pub heard_at: Instant,
}

/// A peer and when its current address was last heard.
#[derive(Clone, Debug)]
struct Tracked {
    peer: Peer,
    address_heard_at: Instant,
}

/// The address a peer is reached at after one of its beacons arrives from `source` at
/// `now`: its `current` address, unless that has been silent (last heard at
/// `current_heard_at`) for [`address_silence`], in which case
/// `source`. This is the whole address rule: a multi-homed peer's address does not
/// flap, and a peer that really moves is followed.
pub fn followed_address(
    current: IpAddr,
    current_heard_at: Instant,
    source: IpAddr,
    now: Instant,
    interval: Duration,
) -> IpAddr {
    if source != current && current_heard_at + address_silence(interval) <= now {
        source
    } else {
        current
    }
}

/// A change in the peer table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A peer was heard for the first time (or again after it was down).
    PeerUp(Peer),
    /// A peer's address (see [`followed_address`]) or announcement changed.
    PeerChanged(Peer),
    /// A peer was silent for [`Config::silence`].
    PeerDown {
        /// Its instance id.
        instance: [u8; 16],
    },
}

/// An effect for the host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// Broadcast this datagram.
    Send(Vec<u8>),
    /// Tell the application.
    Event(Event),
}

/// The machine's timers, computed in [`Beacon::deadline`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The next beacon is due (servers only).
    Announce,
    /// The peer heard longest ago goes down.
    Silence,
}

impl Timer {
    const ALL: [Timer; 2] = [Timer::Announce, Timer::Silence];
}

/// The discovery machine. See the [module documentation](self).
#[derive(Debug)]
pub struct Beacon {
    config: Config,
    next_announce: Instant,
    /// When this server last sent a beacon.
    last_announce: Option<Instant>,
    /// Solicitations heard from clients (a server) or sent (a client).
    solicitations: u64,
    peers: BTreeMap<[u8; 16], Tracked>,
    dropped: BTreeMap<DropReason, u64>,
    outputs: VecDeque<Output>,
}

impl Beacon {
    /// A machine; a server sends its first beacon at `now`, a client its one
    /// solicitation.
    pub fn new(now: Instant, config: Config) -> Result<Beacon, Error> {
        config.validate()?;
        let mut beacon = Beacon {
            config,
            next_announce: now,
            last_announce: None,
            solicitations: 0,
            peers: BTreeMap::new(),
            dropped: BTreeMap::new(),
            outputs: VecDeque::new(),
        };
        if beacon.config.announcement.kind == Kind::Client {
            beacon.solicitations = 1;
            let solicitation = beacon.datagram().encode();
            beacon.outputs.push_back(Output::Send(solicitation));
        }
        Ok(beacon)
    }

    /// Solicitations: answered so far (a server), or sent (a client: one).
    pub fn solicitations(&self) -> u64 {
        self.solicitations
    }

    /// The peers up now, by instance id.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> + '_ {
        self.peers.values().map(|tracked| &tracked.peer)
    }

    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// What this node announces now.
    pub fn announcement(&self) -> Announcement {
        self.config.announcement
    }

    /// This node's Binary Star state changed: the next beacon, sent at once, says so.
    /// A client has no Binary Star state; for a client this does nothing.
    pub fn set_state(&mut self, now: Instant, state: BstarState) {
        if self.config.announcement.kind != Kind::Client
            && self.config.announcement.state != Some(state)
        {
            self.config.announcement.state = Some(state);
            self.next_announce = now;
        }
    }

    /// A datagram arrived from `address`.
    pub fn handle_datagram(&mut self, now: Instant, address: IpAddr, bytes: &[u8]) {
        let datagram = match Datagram::decode(bytes) {
            Ok(datagram) => datagram,
            Err(reason) => return self.drop_datagram(reason),
        };
        if datagram.cluster != self.config.cluster {
            return self.drop_datagram(DropReason::OtherCluster);
        }
        if datagram.instance == self.config.instance {
            return self.drop_datagram(DropReason::OwnBeacon);
        }
        let instance = datagram.instance;
        let announcement = datagram.announcement;
        if announcement.kind == Kind::Client {
            return self.answer_solicitation(now);
        }
        let Some(tracked) = self.peers.get_mut(&instance) else {
            let peer = Peer {
                instance,
                address,
                announcement,
                heard_at: now,
            };
            self.peers.insert(
                instance,
                Tracked {
                    peer: peer.clone(),
                    address_heard_at: now,
                },
            );
            return self.emit(Event::PeerUp(peer));
        };
        let followed = followed_address(
            tracked.peer.address,
            tracked.address_heard_at,
            address,
            now,
            self.config.interval,
        );
        if followed == address {
            tracked.address_heard_at = now;
        }
        let changed = followed != tracked.peer.address || announcement != tracked.peer.announcement;
        tracked.peer.address = followed;
        tracked.peer.announcement = announcement;
        tracked.peer.heard_at = now;
        if changed {
            let peer = tracked.peer.clone();
            self.emit(Event::PeerChanged(peer));
        }
    }

    /// A client asked for the servers' beacons: a server brings its next one forward to
    /// now, or to [`SOLICITED_BEACONS_PER_INTERVAL`]-th of an interval after its last
    /// one if that is later. That bound is what keeps a crowd of clients, or a stranger
    /// sending solicitations in a loop, from making a server flood the LAN. A client
    /// ignores other clients.
    pub fn answer_solicitation(&mut self, now: Instant) {
        if self.config.announcement.kind == Kind::Client {
            return;
        }
        self.solicitations += 1;
        let gap = self.config.interval / SOLICITED_BEACONS_PER_INTERVAL;
        let earliest = self.last_announce.map_or(now, |last| (last + gap).max(now));
        self.next_announce = self.next_announce.min(earliest);
    }

    fn datagram(&self) -> Datagram {
        Datagram {
            cluster: self.config.cluster.clone(),
            instance: self.config.instance,
            announcement: self.config.announcement,
        }
    }

    /// Fires what is due: the next beacon, and peers gone silent.
    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in Timer::ALL {
            if self.deadline(timer).is_some_and(|due| due <= now) {
                self.fire(now, timer);
            }
        }
    }

    fn fire(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::Announce => {
                let beacon = self.datagram().encode();
                self.outputs.push_back(Output::Send(beacon));
                self.last_announce = Some(now);
                self.next_announce = now + self.config.interval;
            }
            Timer::Silence => {
                let silence = self.config.silence;
                let gone: Vec<[u8; 16]> = self
                    .peers
                    .values()
                    .filter(|tracked| tracked.peer.heard_at + silence <= now)
                    .map(|tracked| tracked.peer.instance)
                    .collect();
                for instance in gone {
                    self.peers.remove(&instance);
                    self.emit(Event::PeerDown { instance });
                }
            }
        }
    }

    /// When `timer` is due.
    fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::Announce => {
                (self.config.announcement.kind != Kind::Client).then_some(self.next_announce)
            }
            Timer::Silence => self
                .peers
                .values()
                .map(|tracked| tracked.peer.heard_at + self.config.silence)
                .min(),
        }
    }

    /// When [`Beacon::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL
            .into_iter()
            .filter_map(|timer| self.deadline(timer))
            .min()
    }

    /// The next effect, in the order produced.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn drop_datagram(&mut self, reason: DropReason) {
        *self.dropped.entry(reason).or_default() += 1;
    }

    fn emit(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }
}

mod partner;
pub use partner::{partner_kind, CLIENT_SLOTS};

#[cfg(test)]
mod tests;
