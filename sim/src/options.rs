//! Every knob of a simulated world, in one documented struct.
//!
//! [`Options::default`] is a moderate world; [`Options::swarm`] draws every knob from the
//! seed (swarm testing: some worlds have no partitions and heavy writes, others constant
//! crashes and few keys), so that many seeds explore many *kinds* of worlds rather than
//! one kind many times. A run prints its options first so a failure is understood.

use std::fmt;
use std::time::Duration;

use rand::RngExt;

use crate::network::NetworkOptions;
use crate::ratio::Ratio;
use crate::{derive_rng, SimRng};

/// Stream ids for [`derive_rng`]: one per purpose, fixed forever so that seeds replay.
pub mod streams {
    /// Drawing the options of a swarm world.
    pub const SWARM: u64 = 1;
    /// The network's delays and drops.
    pub const NETWORK: u64 = 2;
    /// Fault injection: partitions, crashes, pauses.
    pub const FAULTS: u64 = 3;
    /// The workload: who writes what when.
    pub const WORKLOAD: u64 = 4;
    /// Clock offsets and drifts.
    pub const CLOCKS: u64 = 5;
    /// Node `n`'s own RNG (client uuids) is stream `NODE_BASE + n`.
    pub const NODE_BASE: u64 = 1_000;
}

/// Faults injected during the fault phase. Probabilities are per fault tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultOptions {
    /// How often the world considers injecting a fault.
    pub tick: Duration,
    /// A partition starts between two random nodes (a switch port dies, a firewall rule).
    pub partition: Ratio,
    /// A new partition cuts the two servers from each other rather than a random pair:
    /// the split-brain case Binary Star exists for.
    pub partition_servers: Ratio,
    /// A partition breaks TCP (in-flight data lost, reconnect later) instead of stalling.
    pub partition_breaks: Ratio,
    /// A stalling partition cuts one direction only (asymmetric routing, a one-way ACL).
    pub partition_one_way: Ratio,
    /// Longest partition.
    pub partition_duration_max: Duration,
    /// A server process dies (OOM kill, kill -9, power loss): memory is lost.
    pub server_crash: Ratio,
    /// A client process dies and restarts.
    pub client_crash: Ratio,
    /// Longest time before a crashed node restarts.
    pub restart_delay_max: Duration,
    /// A node freezes (a long GC pause, a stopped VM) while the world goes on.
    pub pause: Ratio,
    /// Longest pause.
    pub pause_duration_max: Duration,
}

impl FaultOptions {
    /// No faults at all.
    pub fn none() -> FaultOptions {
        FaultOptions {
            tick: Duration::from_millis(100),
            partition: Ratio::NEVER,
            partition_servers: Ratio::NEVER,
            partition_breaks: Ratio::NEVER,
            partition_one_way: Ratio::NEVER,
            partition_duration_max: Duration::ZERO,
            server_crash: Ratio::NEVER,
            client_crash: Ratio::NEVER,
            restart_delay_max: Duration::ZERO,
            pause: Ratio::NEVER,
            pause_duration_max: Duration::ZERO,
        }
    }
}

impl Default for FaultOptions {
    fn default() -> Self {
        FaultOptions {
            tick: Duration::from_millis(100),
            partition: Ratio::new(1, 100),
            partition_servers: Ratio::new(1, 3),
            partition_breaks: Ratio::new(1, 2),
            partition_one_way: Ratio::new(1, 4),
            partition_duration_max: Duration::from_secs(8),
            server_crash: Ratio::new(1, 300),
            client_crash: Ratio::new(1, 1000),
            restart_delay_max: Duration::from_secs(5),
            pause: Ratio::new(1, 500),
            pause_duration_max: Duration::from_secs(4),
        }
    }
}

/// Per-node clock error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockOptions {
    /// Largest difference between nodes' wall clocks (NTP off by this much).
    pub wall_skew_max: Duration,
    /// Largest rate error, in parts per million (cheap quartz: ±100).
    pub drift_ppm_max: u32,
}

impl Default for ClockOptions {
    fn default() -> Self {
        ClockOptions {
            wall_skew_max: Duration::from_millis(50),
            drift_ppm_max: 100,
        }
    }
}

/// What the clients do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadOptions {
    /// Number of client nodes (1..=8).
    pub clients: usize,
    /// Distinct keys written; few keys means many overwrites of the same key.
    pub keys: usize,
    /// Mean time between a client's writes outside bursts.
    pub write_interval: Duration,
    /// A client starts a burst of back-to-back writes (a batch job, a reconnect flush).
    pub burst: Ratio,
    /// Writes in a burst, at most.
    pub burst_len_max: usize,
    /// Relative weight of plain sets.
    pub weight_set: u32,
    /// Relative weight of deletes.
    pub weight_delete: u32,
    /// Relative weight of sets with a ttl (ephemeral values).
    pub weight_ephemeral: u32,
    /// Longest ttl of an ephemeral value.
    pub ttl_max: Duration,
    /// Longest value body, in bytes.
    pub value_len_max: usize,
    /// Subtrees a scripted world pins, by client index (`Some(b"")`: the whole map);
    /// the others are drawn. Swarm worlds pin none.
    pub subtrees: Vec<Option<Vec<u8>>>,
    /// Each client watches the commit of every write it makes: the coverage counts
    /// what it was told (`committed`, `lost`) and oracle 10 checks every commit.
    /// Scripted worlds choose; half the swarm worlds watch.
    pub watch_commits: bool,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            clients: 3,
            keys: 20,
            write_interval: Duration::from_millis(300),
            burst: Ratio::new(1, 50),
            burst_len_max: 20,
            weight_set: 6,
            weight_delete: 2,
            weight_ephemeral: 2,
            ttl_max: Duration::from_secs(10),
            value_len_max: 64,
            subtrees: Vec::new(),
            watch_commits: false,
        }
    }
}

/// Everything that shapes one simulated world, except the seed's own draws.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Simulated length of the fault phase (workload and faults on).
    pub fault_phase: Duration,
    /// Simulated length of the healing phase (faults off, all healed, writes stop)
    /// before liveness is checked.
    pub heal_phase: Duration,
    /// The network model.
    pub network: NetworkOptions,
    /// Fault injection.
    pub faults: FaultOptions,
    /// Clock error.
    pub clocks: ClockOptions,
    /// The workload.
    pub workload: WorkloadOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fault_phase: Duration::from_secs(60),
            heal_phase: Duration::from_secs(30),
            network: NetworkOptions::default(),
            faults: FaultOptions::default(),
            clocks: ClockOptions::default(),
            workload: WorkloadOptions::default(),
        }
    }
}

fn ratio_up_to(rng: &mut SimRng, max_numerator: u32, denominator: u32) -> Ratio {
    // One world in four turns the knob off entirely: swarm testing's weight-zero trick,
    // so some worlds never see this fault and others see it constantly.
    if rng.random_ratio(1, 4) {
        Ratio::NEVER
    } else {
        Ratio::new(rng.random_range(1..=max_numerator), denominator)
    }
}

fn duration_between(rng: &mut SimRng, min: Duration, max: Duration) -> Duration {
    let min_ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.random_range(min_ms..=max_ms.max(min_ms)))
}

/// The shortest heal phase of a swarm world.
const HEAL_PHASE_MIN: Duration = Duration::from_secs(30);

/// How long the heal phase must be for liveness to be owed: at least
/// [`HEAL_PHASE_MIN`], and long enough for the snapshot streams a client may have to
/// wait through once writes stop. A route delivers in order through a window of
/// `high_water_mark` messages, so each window waits for its slowest message (a delay
/// spike holds every message behind it). Streams to one client go out one after the
/// other, at most two are queued when its last resync begins (the one being sent and
/// the one waiting, see the server's snapshot streams), and CHP cannot cancel them:
/// three full snapshots, plus slack for failover and subscription.
fn heal_phase_for(network: &NetworkOptions, workload: &WorkloadOptions) -> Duration {
    let window = network.high_water_mark.max(1) as f64;
    let spike_in_window = 1.0 - (1.0 - network.delay_spike.probability()).powf(window);
    let window_time =
        network.delay_max.as_secs_f64() + spike_in_window * network.delay_spike_max.as_secs_f64();
    let snapshot_messages = workload.keys as f64 + 1.0;
    let snapshot_time = snapshot_messages / window * window_time;
    let needed = Duration::from_secs(10).as_secs_f64() + 3.0 * snapshot_time;
    HEAL_PHASE_MIN.max(Duration::from_secs_f64(needed.min(600.0)))
}

impl Options {
    /// A world whose every knob is drawn from `seed`.
    pub fn swarm(seed: u64) -> Options {
        let rng = &mut derive_rng(seed, streams::SWARM);
        let harsh_network = rng.random_ratio(1, 10);
        let network = NetworkOptions {
            delay_min: Duration::from_micros(rng.random_range(10..=200)),
            delay_max: duration_between(rng, Duration::from_millis(1), Duration::from_millis(30)),
            delay_spike: ratio_up_to(rng, 5, 100),
            delay_spike_max: duration_between(
                rng,
                Duration::from_millis(10),
                Duration::from_millis(1_500),
            ),
            high_water_mark: *[20, 100, 1000].get(rng.random_range(0..3)).unwrap_or(&1000),
            subscribe_delay_max: duration_between(rng, Duration::ZERO, Duration::from_millis(300)),
            reconnect_delay_max: duration_between(
                rng,
                Duration::from_millis(10),
                Duration::from_secs(2),
            ),
            duplicate: if harsh_network {
                ratio_up_to(rng, 5, 100)
            } else {
                Ratio::NEVER
            },
            reorder: if harsh_network {
                ratio_up_to(rng, 20, 100)
            } else {
                Ratio::NEVER
            },
            report_disconnects: true,
            report_joins: true,
        };
        let faults = FaultOptions {
            tick: Duration::from_millis(100),
            partition: ratio_up_to(rng, 5, 200),
            partition_servers: ratio_up_to(rng, 3, 4),
            partition_breaks: Ratio::new(rng.random_range(0..=4), 4),
            partition_one_way: Ratio::new(rng.random_range(0..=2), 4),
            partition_duration_max: duration_between(
                rng,
                Duration::from_millis(500),
                Duration::from_secs(15),
            ),
            server_crash: ratio_up_to(rng, 3, 500),
            client_crash: ratio_up_to(rng, 2, 1000),
            restart_delay_max: duration_between(
                rng,
                Duration::from_millis(100),
                Duration::from_secs(10),
            ),
            pause: ratio_up_to(rng, 3, 1000),
            pause_duration_max: duration_between(
                rng,
                Duration::from_millis(100),
                Duration::from_secs(6),
            ),
        };
        let clocks = ClockOptions {
            wall_skew_max: duration_between(rng, Duration::ZERO, Duration::from_millis(200)),
            drift_ppm_max: rng.random_range(0..=200),
        };
        let workload = WorkloadOptions {
            clients: rng.random_range(1..=8),
            keys: *[1, 3, 10, 50, 500]
                .get(rng.random_range(0..5))
                .unwrap_or(&10),
            write_interval: duration_between(rng, Duration::from_millis(5), Duration::from_secs(2)),
            burst: ratio_up_to(rng, 5, 100),
            burst_len_max: rng.random_range(2..=100),
            weight_set: rng.random_range(1..=10),
            weight_delete: rng.random_range(0..=5),
            weight_ephemeral: rng.random_range(0..=5),
            ttl_max: duration_between(rng, Duration::from_millis(200), Duration::from_secs(20)),
            value_len_max: rng.random_range(1..=256),
            subtrees: Vec::new(),
            watch_commits: false,
        };
        // Drawn last, so the knobs above keep the values older seeds gave them.
        let network = NetworkOptions {
            report_disconnects: rng.random_ratio(3, 4),
            report_joins: rng.random_ratio(3, 4),
            ..network
        };
        // Watching commits changes no behaviour, only what the clients report: oracle
        // 10 checks every `Committed` against the histories.
        let workload = WorkloadOptions {
            watch_commits: rng.random_ratio(1, 2),
            ..workload
        };
        Options {
            fault_phase: Duration::from_secs(60),
            heal_phase: heal_phase_for(&network, &workload),
            network,
            faults,
            clocks,
            workload,
        }
    }

    /// True when the network duplicates or reorders within a connection: only the
    /// safety oracles hold in such a world.
    pub fn is_harsh(&self) -> bool {
        !self.network.duplicate.is_never() || !self.network.reorder.is_never()
    }
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "phases: faults {:?}, heal {:?}",
            self.fault_phase, self.heal_phase
        )?;
        writeln!(f, "network: {:?}", self.network)?;
        writeln!(f, "faults: {:?}", self.faults)?;
        writeln!(f, "clocks: {:?}", self.clocks)?;
        write!(f, "workload: {:?}", self.workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swarm_world_is_a_pure_function_of_its_seed() {
        assert_eq!(Options::swarm(17), Options::swarm(17));
        assert_ne!(Options::swarm(17), Options::swarm(18));
    }

    #[test]
    fn swarm_worlds_differ_in_kind_not_just_in_numbers() {
        let worlds: Vec<Options> = (0..200).map(Options::swarm).collect();
        let without_partitions = worlds.iter().filter(|w| w.faults.partition.is_never());
        let without_crashes = worlds.iter().filter(|w| w.faults.server_crash.is_never());
        let harsh = worlds.iter().filter(|w| w.is_harsh());
        assert!(without_partitions.count() > 20);
        assert!(without_crashes.count() > 20);
        assert!(harsh.count() > 5);
        assert!(worlds.iter().any(|w| w.workload.keys == 1));
        assert!(worlds.iter().any(|w| w.workload.clients == 8));
        assert!(worlds.iter().all(|w| (1..=8).contains(&w.workload.clients)));
    }

    #[test]
    fn options_print_every_knob() {
        let printed = Options::default().to_string();
        for knob in [
            "high_water_mark",
            "server_crash",
            "drift_ppm_max",
            "weight_delete",
        ] {
            assert!(printed.contains(knob), "{knob} missing from {printed}");
        }
    }
}
