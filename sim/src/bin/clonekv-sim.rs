//! `clonekv-sim`: runs simulated clonekv clusters, one world per seed.
//!
//! ```text
//! clonekv-sim --seed 42 --trace     # replay one world, printing every event
//! clonekv-sim --seeds 10000         # a swarm: seeds 0..10000, each its own kind of world
//! clonekv-sim --minutes 10 --from 7 # as many seeds as fit in 10 minutes, from seed 7
//! clonekv-sim --discovery --seeds 100000  # the discovery world (beacons on a LAN)
//! ```
//!
//! Exit codes: 0 all passed, 3 a state machine panicked, 4 a safety oracle failed,
//! 5 a liveness oracle failed, 2 bad arguments.

use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clonekv_sim::options::Options;
use clonekv_sim::oracles::Violation;
use clonekv_sim::world::{Coverage, RunReport, TraceMode, World};

/// Deterministic simulation of a clonekv cluster: a primary, a backup and 1..8 clients
/// running the real core state machines under a world decided by one seed.
#[derive(Parser, Debug)]
#[command(name = "clonekv-sim", version)]
struct Args {
    /// Run (or replay) this one seed.
    #[arg(long, conflicts_with_all = ["seeds", "minutes"])]
    seed: Option<u64>,
    /// With --seed: print every event of the world as it happens.
    #[arg(long, requires = "seed")]
    trace: bool,
    /// Run this many seeds (a swarm), starting at --from.
    #[arg(long)]
    seeds: Option<u64>,
    /// Run seeds from --from until this many minutes have passed.
    #[arg(long, conflicts_with = "seeds")]
    minutes: Option<f64>,
    /// First seed of a swarm.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Use the default world instead of drawing every knob from the seed.
    #[arg(long)]
    default_world: bool,
    /// Keep going after a failure (to count failures in a hunt).
    #[arg(long)]
    keep_going: bool,
    /// Run the discovery world instead (beacons of two clusters on a broadcast LAN;
    /// see docs/SIMULATION.md); the other options apply to it alike.
    #[arg(long)]
    discovery: bool,
}

/// How a world ended, for the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Passed,
    Liveness,
    Safety,
    Panic,
}

impl Outcome {
    fn exit_code(self) -> u8 {
        match self {
            Outcome::Passed => 0,
            Outcome::Panic => 3,
            Outcome::Safety => 4,
            Outcome::Liveness => 5,
        }
    }
}

fn options_for(seed: u64, default_world: bool) -> Options {
    if default_world {
        Options::default()
    } else {
        Options::swarm(seed)
    }
}

/// Runs one world, turning a panic into a report.
fn run(seed: u64, default_world: bool, mode: TraceMode) -> Result<RunReport, String> {
    let options = options_for(seed, default_world);
    panic::catch_unwind(AssertUnwindSafe(|| World::new(seed, options, mode).run())).map_err(
        |payload| {
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".to_string())
        },
    )
}

fn replay_command(seed: u64, default_world: bool) -> String {
    let world = if default_world {
        " --default-world"
    } else {
        ""
    };
    format!("cargo run --release -p clonekv-sim -- --seed {seed}{world} --trace")
}

/// Prints a failure: the seed, the oracle, the last events and the replay command.
fn report_failure(seed: u64, default_world: bool, failure: &Result<Violation, String>) -> Outcome {
    println!("\nFAILED seed {seed}");
    let outcome = match failure {
        Ok(violation) => {
            println!("  oracle: {}", violation.oracle);
            println!("  {}", violation.detail);
            if violation.oracle.is_liveness() {
                Outcome::Liveness
            } else {
                Outcome::Safety
            }
        }
        Err(message) => {
            println!("  panic: {message}");
            Outcome::Panic
        }
    };
    // The run is deterministic: run it again, keeping the last events.
    if let Ok(report) = run(seed, default_world, TraceMode::Recent) {
        println!("  last events:");
        for line in &report.recent {
            println!("    {line}");
        }
    }
    let options = options_for(seed, default_world);
    println!(
        "  world: {} clients, {} keys, harsh network: {}",
        options.workload.clients,
        options.workload.keys,
        options.is_harsh()
    );
    println!("  faults: {:?}", options.faults);
    println!("  replay: {}", replay_command(seed, default_world));
    outcome
}

fn print_summary(seeds: u64, failures: u64, elapsed: Duration, coverage: &Coverage) {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let rate = if minutes > 0.0 {
        seeds as f64 / minutes
    } else {
        0.0
    };
    println!(
        "\n{seeds} seeds, {failures} failed, in {:.1} s ({rate:.0} seeds/minute of wall time)",
        elapsed.as_secs_f64()
    );
    // The runner is one thread: its CPU time is the time it had a core, which a busy
    // machine does not inflate the way it inflates wall time.
    if let Some(cpu) = process_cpu_time().filter(|cpu| !cpu.is_zero()) {
        println!(
            "  CPU time {:.1} s: {:.0} seeds/minute on one core",
            cpu.as_secs_f64(),
            seeds as f64 / (cpu.as_secs_f64() / 60.0)
        );
    }
    println!("coverage:");
    println!(
        "  writes {}, messages delivered {}, ttl expiries {}, split-brain windows {}",
        coverage.writes, coverage.delivered, coverage.expiries, coverage.split_brain_windows
    );
    println!(
        "  subtree clients excused from liveness after a publisher high-water-mark drop: {}",
        coverage.liveness_waived_high_water_drop
    );
    println!(
        "  promotions while the peer was still active, oracle 5 deferred to the split's end: {}",
        coverage.failover_checks_deferred
    );
    let model = &coverage.model;
    println!(
        "  model: reigns rebuilt {}, reigns from a merge it does not rebuild {}, passive syncs checked {}, commits checked {}, active HUGZ checked {}, late copies replayed after a gap (known limit) {}",
        model.reigns_replayed,
        model.reigns_merged,
        model.syncs_checked,
        model.commits_checked,
        model.hugz_checked,
        model.late_copies_replayed_after_a_gap
    );
    println!("  binary star transitions:");
    for ((from, to), count) in &coverage.bstar_transitions {
        println!("    {from:>7} -> {to:<7} {count}");
    }
    for (title, counts) in [
        ("server events", &coverage.server_events),
        ("client events", &coverage.client_events),
        ("faults", &coverage.faults),
        ("messages dropped by the network", &coverage.network_drops),
    ] {
        println!("  {title}:");
        for (name, count) in counts {
            println!("    {name:<28} {count}");
        }
    }
}

/// User plus system CPU time of this process, from `/proc/self/stat` (Linux); `None`
/// elsewhere.
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after_name = stat.rsplit_once(')')?.1;
    let mut fields = after_name.split_whitespace();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // Clock ticks: 100 per second on every Linux this runs on (USER_HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

#[allow(clippy::disallowed_methods)] // The runner measures its own speed; worlds never read it.
fn wall_clock() -> std::time::Instant {
    std::time::Instant::now()
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.discovery {
        let started = wall_clock();
        let discovery = clonekv_sim::discovery::runner::RunnerArgs {
            seed: args.seed,
            trace: args.trace,
            seeds: args.seeds,
            minutes: args.minutes,
            from: args.from,
            default_world: args.default_world,
            keep_going: args.keep_going,
        };
        let elapsed = || started.elapsed();
        return ExitCode::from(clonekv_sim::discovery::runner::main(
            &discovery,
            &elapsed,
            &process_cpu_time,
        ));
    }
    if let Some(seed) = args.seed {
        let mode = if args.trace {
            TraceMode::Print
        } else {
            TraceMode::Hash
        };
        if args.trace {
            println!("{}", options_for(seed, args.default_world));
        }
        let outcome = match run(seed, args.default_world, mode) {
            Ok(report) => match report.violation {
                None => {
                    println!(
                        "seed {seed} passed ({:?} simulated, trace hash {:016x})",
                        report.simulated, report.trace_hash
                    );
                    Outcome::Passed
                }
                Some(violation) => report_failure(seed, args.default_world, &Ok(violation)),
            },
            Err(message) => report_failure(seed, args.default_world, &Err(message)),
        };
        return ExitCode::from(outcome.exit_code());
    }

    let started = wall_clock();
    let deadline = args
        .minutes
        .map(|minutes| Duration::from_secs_f64(minutes.max(0.0) * 60.0));
    let count = args
        .seeds
        .unwrap_or(if deadline.is_some() { u64::MAX } else { 1_000 });
    let mut coverage = Coverage::default();
    let mut worst = Outcome::Passed;
    let (mut ran, mut failures) = (0u64, 0u64);
    for seed in args.from..args.from.saturating_add(count) {
        if deadline.is_some_and(|deadline| started.elapsed() >= deadline) {
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
            worst = worst.max(report_failure(seed, args.default_world, &failure));
            if !args.keep_going {
                break;
            }
        }
        if ran % 1_000 == 0 {
            eprintln!("... {ran} seeds, {failures} failed");
        }
    }
    print_summary(ran, failures, started.elapsed(), &coverage);
    ExitCode::from(worst.exit_code())
}
