//! Every knob of a discovery world, and the bound oracle (i) derives from them.

use std::fmt;
use std::time::Duration;

use clonekv_core::beacon::address_silence;
use rand::RngExt;

use crate::ratio::Ratio;
use crate::{derive_rng, SimRng};

/// Stream ids for [`derive_rng`] in a discovery world, apart from the cluster world's.
pub mod streams {
    /// Drawing the options of a swarm world.
    pub const SWARM: u64 = 50_001;
    /// The LAN's losses, delays and duplicates.
    pub const NETWORK: u64 = 50_002;
    /// Fault injection: isolation, restarts, moves, state changes, garbage.
    pub const FAULTS: u64 = 50_003;
    /// Start times and clock offsets.
    pub const CLOCKS: u64 = 50_004;
    /// Node `n`'s instance ids are drawn from stream `NODE_BASE + n`.
    pub const NODE_BASE: u64 = 51_000;
}

/// The knobs of one discovery world. Probabilities of faults are per node per
/// [`tick`](DiscoveryOptions::tick) of the fault phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// Clients of the cluster under test (1..=4); it also has a primary and a backup.
    pub clients: usize,
    /// The second cluster on the LAN has a client too (besides its two servers).
    pub other_cluster_client: bool,
    /// One server of the cluster under test is heard from two addresses (a multi-homed
    /// host, or a beacon reaching listeners over loopback and over the LAN).
    pub multi_homed: bool,
    /// The beacon interval every node is configured with.
    pub interval: Duration,
    /// The silence after which a peer is down.
    pub silence: Duration,
    /// Every datagram's delay is uniform in `0..=delay_max` ...
    pub delay_max: Duration,
    /// ... plus, this often, a spike uniform in `0..=spike_max`.
    pub spike: Ratio,
    /// Longest spike.
    pub spike_max: Duration,
    /// A datagram is lost on its way to one receiver from one source address ...
    pub loss: Ratio,
    /// ... but never more than this many in a row on that path (the loss model's worst
    /// case, on which the bound of oracle (i) rests).
    pub max_consecutive_losses: u32,
    /// A delivered datagram arrives twice (each copy with its own delay).
    pub duplicate: Ratio,
    /// How often faults are considered.
    pub tick: Duration,
    /// A node is cut off the LAN (its cable, its switch port, a firewall rule) ...
    pub isolate: Ratio,
    /// ... for at most this long, then healed.
    pub isolate_max: Duration,
    /// A node's process dies; it restarts with a new instance id ...
    pub restart: Ratio,
    /// ... after at most this long.
    pub restart_delay_max: Duration,
    /// A single-homed server moves to a new address (DHCP renewal, a VM migrated).
    pub move_server: Ratio,
    /// A server's Binary Star state changes (it announces the new one at once).
    pub state_change: Ratio,
    /// A burst of 1..=5 garbage datagrams (wrong magic, truncated, huge, bad version or
    /// field, another cluster, a node's own beacon replayed) reaches a node.
    pub garbage: Ratio,
    /// Faults happen during this phase ...
    pub fault_phase: Duration,
    /// ... and none during this one, at whose end every pair must have converged.
    pub heal_phase: Duration,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        DiscoveryOptions {
            clients: 3,
            other_cluster_client: true,
            multi_homed: true,
            interval: Duration::from_secs(1),
            silence: Duration::from_secs(4),
            delay_max: Duration::from_millis(5),
            spike: Ratio::new(1, 100),
            spike_max: Duration::from_millis(100),
            loss: Ratio::new(5, 100),
            max_consecutive_losses: 2,
            duplicate: Ratio::new(2, 100),
            tick: Duration::from_secs(1),
            isolate: Ratio::new(2, 100),
            isolate_max: Duration::from_secs(10),
            restart: Ratio::new(1, 100),
            restart_delay_max: Duration::from_secs(3),
            move_server: Ratio::new(1, 100),
            state_change: Ratio::new(2, 100),
            garbage: Ratio::new(5, 100),
            fault_phase: Duration::from_secs(60),
            heal_phase: Duration::from_secs(30),
        }
    }
}

fn ratio_up_to(rng: &mut SimRng, max_numerator: u32, denominator: u32) -> Ratio {
    // One world in four turns the knob off entirely (swarm testing).
    if rng.random_ratio(1, 4) {
        Ratio::NEVER
    } else {
        Ratio::new(rng.random_range(1..=max_numerator), denominator)
    }
}

fn millis_up_to(rng: &mut SimRng, max: u64) -> Duration {
    Duration::from_millis(rng.random_range(0..=max))
}

impl DiscoveryOptions {
    /// A world whose every knob is drawn from `seed`.
    pub fn swarm(seed: u64) -> DiscoveryOptions {
        let rng = &mut derive_rng(seed, streams::SWARM);
        DiscoveryOptions {
            clients: rng.random_range(1..=4),
            other_cluster_client: rng.random_ratio(1, 2),
            multi_homed: rng.random_ratio(3, 4),
            interval: Duration::from_secs(1),
            silence: Duration::from_secs(4),
            delay_max: millis_up_to(rng, 50),
            spike: ratio_up_to(rng, 5, 100),
            spike_max: millis_up_to(rng, 200),
            loss: ratio_up_to(rng, 30, 100),
            // Three in a row can outlast the silence: such worlds check all but (i).
            max_consecutive_losses: if rng.random_ratio(1, 8) {
                3
            } else {
                rng.random_range(1..=2)
            },
            duplicate: ratio_up_to(rng, 10, 100),
            tick: Duration::from_secs(1),
            isolate: ratio_up_to(rng, 4, 100),
            isolate_max: Duration::from_millis(rng.random_range(1_000..=12_000)),
            restart: ratio_up_to(rng, 3, 200),
            restart_delay_max: millis_up_to(rng, 5_000),
            move_server: ratio_up_to(rng, 3, 100),
            state_change: ratio_up_to(rng, 5, 100),
            garbage: ratio_up_to(rng, 20, 100),
            fault_phase: Duration::from_secs(60),
            heal_phase: Duration::from_secs(30),
        }
    }

    /// No random faults: a scripted world decides them all. The network keeps its
    /// delays but loses and duplicates nothing.
    pub fn quiet() -> DiscoveryOptions {
        DiscoveryOptions {
            spike: Ratio::NEVER,
            loss: Ratio::NEVER,
            duplicate: Ratio::NEVER,
            isolate: Ratio::NEVER,
            restart: Ratio::NEVER,
            move_server: Ratio::NEVER,
            state_change: Ratio::NEVER,
            garbage: Ratio::NEVER,
            ..DiscoveryOptions::default()
        }
    }

    /// The longest a datagram is in flight (a delay plus a spike).
    pub fn max_delay(&self) -> Duration {
        self.delay_max + self.spike_max
    }

    /// Oracle (i)'s bound: once an observer and a server of its cluster have both run
    /// undisturbed (no restart, isolation, move or state change) for this long, the
    /// observer knows the server's current instance, address and announcement.
    ///
    /// With `D` the longest delay, `I` the interval, `K` the most consecutive losses on
    /// one path and `S` the address silence ([`address_silence`], 2.5·I): datagrams sent
    /// before the last disturbance at `T` (from an old address, or with an old
    /// announcement) have all arrived by `T + D`. The server sends at least every `I`, so
    /// the beacons it sends after `T + D + S` start by `T + D + S + I`, and of `K + 1` in a
    /// row one arrives: by `T + 2D + S + (K + 1)·I`. That beacon finds the old address (if
    /// any) silent for `S`, so the peer is at the current address, with the current
    /// announcement, since every datagram arriving after `T + D` carries both.
    pub fn convergence_bound(&self) -> Duration {
        self.max_delay() * 2
            + address_silence(self.interval)
            + self.interval * (self.max_consecutive_losses + 1)
    }

    /// Whether oracle (i) applies: only if losses can never make a live server look
    /// silent. Two arrivals on one path are at most `(K + 1)·I + D` apart (`K + 1`
    /// intervals between their sends, and a delay differing by at most `D`), which must
    /// be shorter than the silence. With the defaults (1 s, 4 s) that allows two losses
    /// in a row; a world with three checks the other oracles only.
    pub fn checks_convergence(&self) -> bool {
        self.interval * (self.max_consecutive_losses + 1) + self.max_delay() < self.silence
    }

    /// Checks that the world can make oracle (i)'s promise: delays shorter than half an
    /// interval, and a heal phase long enough for the longest isolation or restart to
    /// end and the bound to pass after it.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_delay() * 2 >= self.interval {
            return Err(format!(
                "the longest delay {:?} must be under half the interval {:?}",
                self.max_delay(),
                self.interval
            ));
        }
        let needed = self.isolate_max.max(self.restart_delay_max) + self.convergence_bound();
        if self.heal_phase <= needed {
            return Err(format!(
                "the heal phase {:?} must exceed the longest fault plus the bound, {needed:?}",
                self.heal_phase
            ));
        }
        if !(1..=4).contains(&self.clients) {
            return Err(format!("clients must be 1 to 4, not {}", self.clients));
        }
        Ok(())
    }
}

impl fmt::Display for DiscoveryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "discovery world: {} clients, other cluster's client {}, multi-homed server {}",
            self.clients, self.other_cluster_client, self.multi_homed
        )?;
        writeln!(
            f,
            "timing: interval {:?}, silence {:?}; phases: faults {:?}, heal {:?}",
            self.interval, self.silence, self.fault_phase, self.heal_phase
        )?;
        writeln!(
            f,
            "network: delay up to {:?}, spikes {:?} up to {:?}, loss {:?} (at most {} in a row), \
             duplicates {:?}",
            self.delay_max,
            self.spike,
            self.spike_max,
            self.loss,
            self.max_consecutive_losses,
            self.duplicate
        )?;
        writeln!(
            f,
            "faults per {:?}: isolate {:?} (up to {:?}), restart {:?} (after up to {:?}), \
             move {:?}, state change {:?}, garbage {:?}",
            self.tick,
            self.isolate,
            self.isolate_max,
            self.restart,
            self.restart_delay_max,
            self.move_server,
            self.state_change,
            self.garbage
        )?;
        if self.checks_convergence() {
            write!(f, "oracle (i) bound: {:?}", self.convergence_bound())
        } else {
            write!(f, "oracle (i) off: losses in a row can outlast the silence")
        }
    }
}
