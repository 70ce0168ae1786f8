//! The `clonekv-sim --discovery` runner: one seed (replay) or a swarm of seeds.

use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use super::options::DiscoveryOptions;
use super::world::{
    DiscoveryCoverage, DiscoveryOracle, DiscoveryReport, DiscoveryViolation, DiscoveryWorld,
};
use crate::world::TraceMode;

/// What to run, from the command line.
#[derive(Clone, Debug, Default)]
pub struct RunnerArgs {
    /// Run (or replay) this one seed.
    pub seed: Option<u64>,
    /// With `seed`: print every event.
    pub trace: bool,
    /// Run this many seeds from `from`.
    pub seeds: Option<u64>,
    /// Or as many as fit in this many minutes.
    pub minutes: Option<f64>,
    /// First seed of a swarm.
    pub from: u64,
    /// The default world instead of drawing every knob from the seed.
    pub default_world: bool,
    /// Keep going after a failure.
    pub keep_going: bool,
}

/// The options of `seed`'s world.
pub fn options_for(seed: u64, default_world: bool) -> DiscoveryOptions {
    if default_world {
        DiscoveryOptions::default()
    } else {
        DiscoveryOptions::swarm(seed)
    }
}

/// Runs one world, turning a panic of a machine into an error.
pub fn run(seed: u64, default_world: bool, mode: TraceMode) -> Result<DiscoveryReport, String> {
    let options = options_for(seed, default_world);
    panic::catch_unwind(AssertUnwindSafe(|| {
        DiscoveryWorld::new(seed, options, mode).run()
    }))
    .map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

/// The command that replays `seed`.
pub fn replay_command(seed: u64, default_world: bool) -> String {
    let world = if default_world {
        " --default-world"
    } else {
        ""
    };
    format!("cargo run --release -p clonekv-sim -- --discovery --seed {seed}{world} --trace")
}

/// Exit code of a failure: 3 a panic, 4 a safety oracle ((ii) to (vi)), 5 oracle (i).
fn exit_code(failure: &Result<DiscoveryViolation, String>) -> u8 {
    match failure {
        Err(_) => 3,
        Ok(violation) if violation.oracle == DiscoveryOracle::Known => 5,
        Ok(_) => 4,
    }
}

/// Prints a failure with the seed, the oracle, the last events and the replay command;
/// returns its exit code.
pub fn report_failure(
    seed: u64,
    default_world: bool,
    failure: &Result<DiscoveryViolation, String>,
) -> u8 {
    println!("\nFAILED discovery seed {seed}");
    match failure {
        Ok(violation) => {
            println!("  oracle: {}", violation.oracle);
            println!("  at {:?}: {}", violation.at, violation.detail);
        }
        Err(message) => println!("  panic: {message}"),
    }
    if let Ok(report) = run(seed, default_world, TraceMode::Recent) {
        println!("  last events:");
        for line in &report.recent {
            println!("    {line}");
        }
    }
    for line in options_for(seed, default_world).to_string().lines() {
        println!("  {line}");
    }
    println!("  replay: {}", replay_command(seed, default_world));
    exit_code(failure)
}

fn print_summary(
    seeds: u64,
    failures: u64,
    elapsed: Duration,
    cpu: Option<Duration>,
    coverage: &DiscoveryCoverage,
) {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let rate = if minutes > 0.0 {
        seeds as f64 / minutes
    } else {
        0.0
    };
    println!(
        "\n{seeds} discovery seeds, {failures} failed, in {:.1} s ({rate:.0} seeds/minute of wall time)",
        elapsed.as_secs_f64()
    );
    if let Some(cpu) = cpu.filter(|cpu| !cpu.is_zero()) {
        println!(
            "  CPU time {:.1} s: {:.0} seeds/minute on one core",
            cpu.as_secs_f64(),
            seeds as f64 / (cpu.as_secs_f64() / 60.0)
        );
    }
    println!("coverage:");
    println!(
        "  beacons sent {}, solicitations {}, datagrams delivered {}, lost {}, duplicated {}, cut by isolation or a stopped node {}",
        coverage.beacons_sent, coverage.solicitations, coverage.delivered, coverage.lost, coverage.duplicated, coverage.cut
    );
    println!(
        "  peer events: up {}, changed {}, down {}; address moves followed {}, of the multi-homed server {}",
        coverage.peer_up, coverage.peer_changed, coverage.peer_down, coverage.followed_moves, coverage.multi_homed_moves
    );
    println!(
        "  oracle (i) checks past the bound: {}; peer changes back to a replaced announcement: {}",
        coverage.known_checks, coverage.stale_announcements
    );
    for (title, counts) in [
        ("faults", &coverage.faults),
        ("datagrams dropped by the machines", &coverage.dropped),
    ] {
        println!("  {title}:");
        for (name, count) in counts {
            println!("    {name:<16} {count}");
        }
    }
}

/// Runs what `args` asks; returns the exit code. `elapsed` is the wall time since the
/// runner started and `cpu` the process's CPU time (the binary measures both; worlds
/// never read a clock).
pub fn main(
    args: &RunnerArgs,
    elapsed: &dyn Fn() -> Duration,
    cpu: &dyn Fn() -> Option<Duration>,
) -> u8 {
    if let Some(seed) = args.seed {
        let mode = if args.trace {
            TraceMode::Print
        } else {
            TraceMode::Hash
        };
        if args.trace {
            println!("{}", options_for(seed, args.default_world));
        }
        return match run(seed, args.default_world, mode) {
            Ok(DiscoveryReport {
                violation: None,
                simulated,
                trace_hash,
                ..
            }) => {
                println!("discovery seed {seed} passed ({simulated:?} simulated, trace hash {trace_hash:016x})");
                0
            }
            Ok(DiscoveryReport {
                violation: Some(violation),
                ..
            }) => report_failure(seed, args.default_world, &Ok(violation)),
            Err(message) => report_failure(seed, args.default_world, &Err(message)),
        };
    }
    let deadline = args
        .minutes
        .map(|minutes| Duration::from_secs_f64(minutes.max(0.0) * 60.0));
    let count = args
        .seeds
        .unwrap_or(if deadline.is_some() { u64::MAX } else { 1_000 });
    let mut coverage = DiscoveryCoverage::default();
    let (mut ran, mut failures, mut worst) = (0u64, 0u64, 0u8);
    for seed in args.from..args.from.saturating_add(count) {
        if deadline.is_some_and(|deadline| elapsed() >= deadline) {
            break;
        }
        ran += 1;
        let failure = match run(seed, args.default_world, TraceMode::Hash) {
            Ok(report) => {
                coverage.merge(&report.coverage);
                report.violation.map(Ok)
            }
            Err(message) => Some(Err(message)),
        };
        if let Some(failure) = failure {
            failures += 1;
            let code = report_failure(seed, args.default_world, &failure);
            // Worst first: a panic (3), then safety (4), then oracle (i) (5).
            worst = match (worst, code) {
                (0, code) => code,
                (worst, code) => worst.min(code),
            };
            if !args.keep_going {
                break;
            }
        }
        if ran % 10_000 == 0 {
            eprintln!("... {ran} discovery seeds, {failures} failed");
        }
    }
    print_summary(ran, failures, elapsed(), cpu(), &coverage);
    worst
}
