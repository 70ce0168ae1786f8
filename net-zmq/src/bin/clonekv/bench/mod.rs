//! `clonekv bench`: measures a CHP server over real sockets and, in the same run and
//! the same topology, the raw libzmq limits of this machine, so that every figure comes
//! with a ratio that survives a noisy machine. See docs/PERFORMANCE.md for the method.

mod failover;
pub mod http;
mod prefix;
mod procs;
mod relay;
mod snapshot;
mod traffic;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use comfy_table::{presets, CellAlignment, Table};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use clonekv_zmq::duration::HumanDuration;
use prefix::{Prefix, PREFIX_LEN};
use procs::{Ports, Process, Scratch, ServerPorts, Timing};
use traffic::{Keys, Pace, Route, RouteCurve, SearchPlan, Session, Shape};

pub use relay::run as run_relay;

/// A failure of the bench itself (not a figure): one line for the user.
#[derive(Debug)]
pub struct BenchError(String);

impl BenchError {
    pub fn new(message: impl Into<String>) -> Self {
        BenchError(message.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `clonekv bench` options.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Keys: every key a run writes is under one prefix, /cb-XXXX/ \
(XXXX: four random letters or digits naming the run, shown in the report). With --endpoint, \
the run ends by deleting every key under its prefix from that server (and its backup), \
whether it succeeded, failed or was stopped by Ctrl-C (a second Ctrl-C stops the removal); \
the report says how many were deleted and whether any is left. The bench writes up to \
--keys keys of --value-size bytes of binary data there.\n\n\
Method and results: docs/PERFORMANCE.md."
)]
pub struct BenchArgs {
    /// A running CHP server to measure, by its base endpoint P (P+1 publishes, P+2
    /// collects); any implementation of the protocol. Default: start clonekvd servers
    /// on free ports of 127.0.0.1 (and measure failover and memory too). Every key the
    /// run writes there is deleted at the end (see below).
    #[arg(long, value_name = "ENDPOINT")]
    pub endpoint: Option<String>,
    /// With --endpoint: its backup's base endpoint, to measure a primary with its backup
    /// attached (updates go to both collectors, as a CHP client sends them).
    #[arg(long, value_name = "ENDPOINT", requires = "endpoint")]
    pub backup_endpoint: Option<String>,
    /// With --endpoint: the server's process id, to read its memory (Linux /proc).
    #[arg(long, value_name = "PID", requires = "endpoint")]
    pub server_pid: Option<u32>,
    /// The clonekvd executable to start [default: the one next to this clonekv].
    #[arg(long, value_name = "PATH")]
    pub clonekvd: Option<PathBuf>,
    /// A run of about 30 seconds: shorter trials, fewer bisection steps.
    #[arg(long)]
    pub quick: bool,
    /// Publishers sending updates (each its own PUB and thread).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub publishers: usize,
    /// Subscriber counts to measure throughput with (comma-separated).
    #[arg(
        long,
        value_name = "M,...",
        value_delimiter = ',',
        default_value = "1,10"
    )]
    pub subscribers: Vec<usize>,
    /// Key length in bytes (keys are the run's 9-byte prefix and digits; at least 11).
    #[arg(long, value_name = "BYTES", default_value_t = 16)]
    pub key_size: usize,
    /// Value length in bytes (at least 24: the bench's header travels in it).
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    pub value_size: usize,
    /// Keys in the snapshot and memory measurement.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub keys: u64,
    /// High-water mark of every streaming socket (the bench's, the relay's and the
    /// started servers' --hwm).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub hwm: i32,
    /// Length of one throughput trial [default: 1s; --quick 0.4s].
    #[arg(long, value_name = "DURATION")]
    pub trial: Option<HumanDuration>,
    /// Bisection steps per throughput search [default: 6; --quick 4].
    #[arg(long, value_name = "N")]
    pub steps: Option<u32>,
    /// Updates per second of the latency measurement [default: half the server's
    /// zero-loss rate (of the slower of the plain and the CURVE server), or 20000 when
    /// throughput is skipped].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub latency_rate: Option<u32>,
    /// Parts to leave out (comma-separated): throughput, pair, curve, latency, snapshot,
    /// failover, persistence, restart, resume. `curve` is a lone server with CURVE keys beside
    /// the plain one, in the throughput and latency tables and their comparison (only on
    /// servers started here); `persistence` three lone servers with a data directory, one
    /// per fsync policy, in the same tables; `restart` a restart from a data directory
    /// holding --keys keys; `resume` a backup's re-sync after an absence during which
    /// --resume-changes keys changed, by resuming beside a full snapshot.
    #[arg(long, value_name = "PART,...", value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Keys changed while the backup is away, in the resume measurement.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub resume_changes: u64,
}

impl BenchArgs {
    fn skips(&self, part: &str) -> bool {
        self.skip.iter().any(|skip| skip == part)
    }
}

/// One throughput figure.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRow {
    pub route: &'static str,
    pub subscribers: usize,
    /// Zero-loss, in-order updates per second.
    pub updates_per_s: f64,
    /// Delivered rate of an unpaced flood (with losses): an upper bound.
    pub flood_per_s: f64,
    pub trials: usize,
    /// CPU time (user + system, all threads) of the relay or server processes (both
    /// servers of a pair) over the search, per update sent: the cost of an update,
    /// far steadier than a rate on a busy machine.
    pub cpu_us_per_update: Option<f64>,
    /// This figure over the raw relay's with as many subscribers.
    pub of_relay: Option<f64>,
    /// This figure over raw PUB → SUB's with as many subscribers.
    pub of_pub_sub: Option<f64>,
}

/// One latency figure, microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyRow {
    pub route: &'static str,
    pub rate_per_s: f64,
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Each round's own p99, in the order measured.
    pub round_p99_us: Vec<f64>,
}

/// The snapshot figure.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotRow {
    pub keys_loaded: u64,
    /// Loading the keys (a closed-loop flood, each confirmed by a subscriber).
    pub load_seconds: f64,
    /// Server CPU time (user + system, all its threads) per update while loading:
    /// a figure much less sensitive to a busy machine than a rate.
    pub load_cpu_us_per_update: Option<f64>,
    /// Entries received by the median run.
    pub entries_received: u64,
    /// Every run ended with KTHXBAI and held every loaded key.
    pub complete: bool,
    /// Server CPU time (user + system, all threads) per entry sent, in the median run.
    pub cpu_us_per_entry: Option<f64>,
    /// The median run's time, from the request to the KTHXBAI.
    pub seconds: f64,
    /// Every run's time, in the order taken.
    pub runs_seconds: Vec<f64>,
    pub keys_per_s: f64,
    pub mb_per_s: f64,
}

/// The memory figure.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    pub keys: u64,
    pub rss_empty_bytes: u64,
    pub rss_loaded_bytes: u64,
    pub bytes_per_key: f64,
}

/// A restart from a data directory.
#[derive(Clone, Debug, Serialize)]
pub struct RestartRow {
    pub keys: u64,
    /// Loading them into a server with `--fsync never` (a closed-loop flood).
    pub load_seconds: f64,
    /// The data directory's size after the load (snapshot and log).
    pub data_dir_bytes: u64,
    /// From the restarted process's start to its first snapshot reply: reading the
    /// data directory plus what every start costs.
    pub restart_to_serving_s: f64,
    /// The anchor: the same for a server with no data directory, started just before.
    pub empty_start_to_serving_s: f64,
    /// The anchor for the reading alone: this process reading the directory's files
    /// (from the page cache).
    pub raw_read_s: f64,
    /// Keys the restarted server holds (counted by a snapshot of them).
    pub keys_restored: u64,
}

/// A backup's re-sync after an absence, by resuming and (the anchor) by a full
/// snapshot, in the same run on the same map.
#[derive(Clone, Debug, Serialize)]
pub struct ResumeRow {
    pub keys: u64,
    /// Keys changed while the backup was away (before each restart).
    pub changes: u64,
    /// From the backup's restart to its first HUGZ at the primary's sequence: reading
    /// its data directory, then resuming.
    pub resume_s: f64,
    /// The same with `--no-resume`: reading the directory, then a full snapshot.
    pub full_s: f64,
    /// The backup's log said it resumed, then that it took a full snapshot.
    pub resumed_as_asked: bool,
}

/// The failovers measured under one set of timings.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRow {
    pub timing: &'static str,
    pub heartbeat_ms: u64,
    pub peer_expiry_beats: u32,
    pub client_server_ttl_ms: u64,
    /// One per kill, at the phases of [`FAILOVER_PHASES`].
    pub runs: Vec<failover::FailoverResult>,
    /// The slowest run's first update through the backup: the figure.
    pub worst_first_update_s: f64,
    /// The slowest run's `clonekv get` (`None` if one did not return the value).
    pub worst_cli_get_s: Option<f64>,
    /// The slowest run's takeover by the backup: the anchor.
    pub worst_backup_answers_s: Option<f64>,
}

impl FailoverRow {
    fn new(
        timing: &'static str,
        heartbeat_ms: u64,
        peer_expiry_beats: u32,
        client_server_ttl_ms: u64,
        runs: Vec<failover::FailoverResult>,
    ) -> FailoverRow {
        let worst = |figure: fn(&failover::FailoverResult) -> Option<f64>| {
            runs.iter()
                .map(figure)
                .try_fold(0.0f64, |worst, figure| Some(worst.max(figure?)))
        };
        FailoverRow {
            timing,
            heartbeat_ms,
            peer_expiry_beats,
            client_server_ttl_ms,
            worst_first_update_s: worst(|run| Some(run.first_update_s)).unwrap_or(0.0),
            worst_cli_get_s: worst(|run| run.cli_get_s),
            worst_backup_answers_s: worst(|run| run.backup_answers_s),
            runs,
        }
    }
}

/// Where in the active's heartbeat each failover run kills it, as fractions of a beat
/// after one of its HUGZ: right after one (the backup waits a whole peer expiry, the
/// worst case), then a third and two thirds of a beat later.
const FAILOVER_PHASES: [(u32, u32); 3] = [(0, 3), (1, 3), (2, 3)];

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: String,
    /// Every key the run wrote starts with this.
    pub key_prefix: String,
    pub cpus: usize,
    /// The 1-minute load average when the run started and when it ended (Linux): above
    /// the CPU count, something else competed for the machine and the rates (not the
    /// ratios) are low.
    pub load_average: (Option<f64>, Option<f64>),
    pub quick: bool,
    pub key_size: usize,
    pub value_size: usize,
    pub publishers: usize,
    pub hwm: i32,
    pub trial_seconds: f64,
    pub throughput: Vec<ThroughputRow>,
    pub latency: Vec<LatencyRow>,
    pub snapshot: Option<SnapshotRow>,
    pub memory: Option<MemoryRow>,
    pub failover: Vec<FailoverRow>,
    pub restart: Option<RestartRow>,
    pub resume: Option<ResumeRow>,
    /// With `--endpoint`: the removal of the run's keys.
    pub cleanup: Option<prefix::Cleanup>,
    /// Parts that could not be measured, and why.
    pub problems: Vec<String>,
    pub elapsed_seconds: f64,
}

const ROUTE_PUB_SUB: &str = "raw PUB→SUB";
const ROUTE_RELAY: &str = "raw relay";
const ROUTE_SERVER: &str = "server";
const ROUTE_PAIR: &str = "server + backup";
/// Lone servers with a data directory, one per fsync policy: (route, policy).
const ROUTES_FSYNC: [(&str, &str); 3] = [
    ("server --fsync always", "always"),
    ("server --fsync batch", "batch"),
    ("server --fsync never", "never"),
];
const ROUTE_SERVER_CURVE: &str = "server, CURVE";

/// How long to wait for a started server or a route to come up.
const PATIENCE: Duration = Duration::from_secs(30);

/// The servers a run measures: started here, or given by endpoint.
struct Targets {
    /// Throughput and latency.
    lone: String,
    lone_process: Option<Process>,
    /// Snapshot and memory (a fresh server when started here).
    loaded: String,
    loaded_process: Option<Process>,
    loaded_pid: Option<u32>,
    /// Primary and backup endpoints for the pair throughput.
    pair: Option<(String, String)>,
    pair_processes: Vec<Process>,
    /// Lone servers with a data directory: (route, endpoint, process).
    persisted: Vec<(&'static str, String, Process)>,
    /// A lone server with CURVE keys, and the keys of the bench's sockets for it.
    curve: Option<(String, Process, RouteCurve)>,
}

/// Runs the bench and returns its report. Progress goes to stderr. On a server the
/// bench did not start, every key the run wrote is deleted at the end, whatever the
/// outcome (also on SIGINT, SIGTERM or SIGHUP).
pub fn run(args: &BenchArgs, bin_dir: Option<PathBuf>) -> Result<Report, BenchError> {
    validate(args)?;
    let shape = Shape {
        key_len: args.key_size,
        value_len: args.value_size,
        keyspace: args.keys.max(1),
        prefix: Prefix::random()?,
    };
    let prefix = shape.prefix;
    let Some(endpoint) = &args.endpoint else {
        return measure(args, bin_dir, shape);
    };
    let servers: Vec<String> = std::iter::once(endpoint)
        .chain(&args.backup_endpoint)
        .cloned()
        .collect();
    let on_signal = servers.clone();
    procs::on_signal(Box::new(move || {
        traffic::stop_writing();
        // Let what is already on its way land first.
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("clonekv bench: removing the keys it wrote under {prefix}");
        report_cleanup(&prefix::remove_all(&on_signal, &shape, PATIENCE));
    }));
    let measured = measure(args, bin_dir, shape);
    // From here a signal only stops: the removal below is the one.
    procs::forget_on_signal();
    eprintln!("clonekv bench: removing the keys it wrote under {prefix}");
    let cleanup = prefix::remove_all(&servers, &shape, PATIENCE);
    match measured {
        Ok(mut report) => {
            match cleanup {
                Ok(cleanup) => {
                    if cleanup.keys_left > 0 {
                        report.problems.push(format!(
                            "{} keys are left under {prefix} on {endpoint}",
                            cleanup.keys_left
                        ));
                    }
                    report.cleanup = Some(cleanup);
                }
                Err(error) => report.problems.push(format!(
                    "the keys under {prefix} on {endpoint} may not all be removed: {error}"
                )),
            }
            Ok(report)
        }
        Err(error) => {
            report_cleanup(&cleanup);
            Err(error)
        }
    }
}

/// One line on stderr about a removal that no report will carry.
fn report_cleanup(cleanup: &Result<prefix::Cleanup, BenchError>) {
    match cleanup {
        Ok(cleanup) if cleanup.keys_left == 0 => eprintln!(
            "clonekv bench: removed every key under {} ({} deletes)",
            cleanup.prefix, cleanup.keys_deleted
        ),
        Ok(cleanup) => eprintln!(
            "clonekv bench: {} keys are left under {}",
            cleanup.keys_left, cleanup.prefix
        ),
        Err(error) => eprintln!("clonekv bench: {error}"),
    }
}

/// Measures every part the options ask for.
fn measure(args: &BenchArgs, bin_dir: Option<PathBuf>, shape: Shape) -> Result<Report, BenchError> {
    let prefix = shape.prefix;
    let began = Instant::now();
    let trial = args.trial.map(HumanDuration::get).unwrap_or(if args.quick {
        Duration::from_millis(400)
    } else {
        Duration::from_secs(1)
    });
    let steps = args.steps.unwrap_or(if args.quick { 4 } else { 6 });
    let plan = SearchPlan { trial, steps };
    let drain = Duration::from_millis(300);
    let mut scratch = Scratch::new()?;
    let mut ports = Ports::allocate(52)?;
    let clonekvd = args
        .clonekvd
        .clone()
        .or_else(|| bin_dir.map(|dir| dir.join("clonekvd")))
        .unwrap_or_else(|| PathBuf::from("clonekvd"));

    let persisted_routes = if args.endpoint.is_none() && !args.skips("persistence") {
        ROUTES_FSYNC.len()
    } else {
        0
    };
    let searches_per_count =
        3 + usize::from(!args.skips("pair")) + usize::from(targets_curve(args)) + persisted_routes;
    let throughput_steps = if args.skips("throughput") {
        0
    } else {
        args.subscribers.len() * searches_per_count * (1 + steps as usize)
    };
    let bar = ProgressBar::new(
        (throughput_steps + 8 + persisted_routes + 2 * FAILOVER_PHASES.len()) as u64,
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut report = Report {
        target: args
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("clonekvd started by the bench ({})", clonekvd.display())),
        key_prefix: prefix.to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: (procs::load_average(), None),
        quick: args.quick,
        key_size: args.key_size,
        value_size: args.value_size,
        publishers: args.publishers,
        hwm: args.hwm,
        trial_seconds: trial.as_secs_f64(),
        throughput: Vec::new(),
        latency: Vec::new(),
        snapshot: None,
        memory: None,
        failover: Vec::new(),
        restart: None,
        resume: None,
        cleanup: None,
        problems: Vec::new(),
        elapsed_seconds: 0.0,
    };

    bar.set_message("starting servers and the relay");
    let dummy_peer = ServerPorts::take(&mut ports)?;
    let mut targets = start_targets(args, &clonekvd, &mut ports, dummy_peer, &scratch)?;
    let relay_collector = format!("tcp://127.0.0.1:{}", ports.take(1)?);
    let relay_publisher = format!("tcp://127.0.0.1:{}", ports.take(1)?);
    let direct = format!("tcp://127.0.0.1:{}", ports.take(1)?);
    let self_exe = std::env::current_exe()
        .map_err(|error| BenchError::new(format!("cannot find this executable: {error}")))?;
    let mut relay_process = Process::spawn(
        "relay",
        &self_exe,
        &[
            "bench-relay".to_string(),
            "--collector".to_string(),
            relay_collector.clone(),
            "--publisher".to_string(),
            relay_publisher.clone(),
            "--hwm".to_string(),
            args.hwm.to_string(),
        ],
        &scratch.path,
    )?;
    bar.set_message("waiting for the servers to become active");
    wait_active(&targets.lone, targets.lone_process.as_mut())?;
    if targets.loaded != targets.lone {
        wait_active(&targets.loaded, targets.loaded_process.as_mut())?;
    }
    if let Some((primary, _)) = &targets.pair {
        wait_active(primary, None)?;
    }
    let mut persisted_routes = Vec::new();
    for (name, endpoint, process) in &mut targets.persisted {
        wait_active(endpoint, Some(process))?;
        persisted_routes.push((
            *name,
            process.pid(),
            Route {
                publish: vec![plus(endpoint, 2)?],
                publisher_binds: false,
                subscribe: plus(endpoint, 1)?,
                backup_publisher: None,
                curve: None,
            },
        ));
    }
    if let Some((endpoint, process, keys)) = targets.curve.as_mut() {
        let waited = snapshot::wait_active(endpoint, PATIENCE, Some(keys));
        process.check_running()?;
        waited?;
    }
    relay_process.check_running()?;
    bar.inc(1);

    let routes = |subscribe_to: &str, publish: Vec<String>, binds: bool| Route {
        publish,
        publisher_binds: binds,
        subscribe: subscribe_to.to_string(),
        backup_publisher: None,
        curve: None,
    };
    let direct_route = routes(&direct, vec![direct.clone()], true);
    let relay_route = routes(&relay_publisher, vec![relay_collector.clone()], false);
    let server_route = routes(
        &plus(&targets.lone, 1)?,
        vec![plus(&targets.lone, 2)?],
        false,
    );
    let pair_route = match &targets.pair {
        Some((primary, backup)) => Some(Route {
            publish: vec![plus(primary, 2)?, plus(backup, 2)?],
            publisher_binds: false,
            subscribe: plus(primary, 1)?,
            backup_publisher: Some(plus(backup, 1)?),
            curve: None,
        }),
        None => None,
    };
    let curve_route = match &targets.curve {
        Some((endpoint, _, keys)) => Some(Route {
            curve: Some(keys.clone()),
            ..routes(&plus(endpoint, 1)?, vec![plus(endpoint, 2)?], false)
        }),
        None => None,
    };

    // 1 and 6: throughput of the server, the pair and the baselines.
    let mut server_max: Option<f64> = None;
    let mut curve_max: Option<f64> = None;
    if !args.skips("throughput") {
        for &subscribers in &args.subscribers {
            let mut rows = Vec::new();
            let mut candidates = vec![
                (ROUTE_PUB_SUB, Some(&direct_route)),
                (ROUTE_RELAY, Some(&relay_route)),
                (ROUTE_SERVER, Some(&server_route)),
            ];
            if !args.skips("pair") {
                candidates.push((ROUTE_PAIR, pair_route.as_ref()));
            }
            for (name, _, route) in &persisted_routes {
                candidates.push((name, Some(route)));
            }
            if curve_route.is_some() {
                candidates.push((ROUTE_SERVER_CURVE, curve_route.as_ref()));
            }
            for (name, route) in candidates {
                let Some(route) = route else {
                    continue;
                };
                let publishers = if name == ROUTE_PUB_SUB {
                    1
                } else {
                    args.publishers
                };
                let label = format!("{name}, {subscribers} sub");
                bar.set_message(format!("throughput: {label}"));
                let pids: Vec<u32> = match name {
                    ROUTE_RELAY => vec![relay_process.pid()],
                    ROUTE_SERVER => targets
                        .lone_process
                        .as_ref()
                        .map(Process::pid)
                        .or(args.server_pid)
                        .into_iter()
                        .collect(),
                    ROUTE_PAIR => targets.pair_processes.iter().map(Process::pid).collect(),
                    ROUTE_SERVER_CURVE => targets
                        .curve
                        .as_ref()
                        .map(|(_, process, _)| process.pid())
                        .into_iter()
                        .collect(),
                    _ => persisted_routes
                        .iter()
                        .filter(|(route, ..)| *route == name)
                        .map(|(_, pid, _)| *pid)
                        .collect(),
                };
                let cpu = || -> Option<Duration> {
                    if pids.is_empty() {
                        return None;
                    }
                    pids.iter().map(|&pid| procs::cpu_time_of(pid)).sum()
                };
                let mut cpu_us_per_update = None;
                let outcome = (|| {
                    let mut session =
                        Session::open(route, publishers, subscribers, shape, args.hwm, drain)?;
                    session.warm_up(PATIENCE)?;
                    let before = cpu();
                    let search = traffic::search(&mut session, plan, |step| {
                        bar.set_message(format!("throughput: {label}: {step}"));
                        bar.inc(1);
                    })?;
                    let sent: u64 = search.trials.iter().map(|trial| trial.sent).sum();
                    if let (Some(before), Some(after)) = (before, cpu()) {
                        cpu_us_per_update = Some(
                            after.saturating_sub(before).as_secs_f64() * 1e6 / sent.max(1) as f64,
                        );
                    }
                    Ok::<_, BenchError>(search)
                })();
                match outcome {
                    Ok(search) => {
                        if name == ROUTE_SERVER && subscribers == 1 {
                            server_max = Some(search.rate());
                        }
                        if name == ROUTE_SERVER_CURVE && subscribers == 1 {
                            curve_max = Some(search.rate());
                        }
                        rows.push(ThroughputRow {
                            route: name,
                            subscribers,
                            updates_per_s: search.rate(),
                            flood_per_s: search.flood_rate,
                            trials: search.trials.len(),
                            cpu_us_per_update,
                            of_relay: None,
                            of_pub_sub: None,
                        });
                    }
                    Err(error) => report
                        .problems
                        .push(format!("throughput of {label}: {error}")),
                }
            }
            let figure = |rows: &[ThroughputRow], route: &str| {
                rows.iter()
                    .find(|row| row.route == route)
                    .map(|row| row.updates_per_s)
                    .filter(|rate| *rate > 0.0)
            };
            let relay = figure(&rows, ROUTE_RELAY);
            let pub_sub = figure(&rows, ROUTE_PUB_SUB);
            for row in &mut rows {
                row.of_relay = relay.map(|relay| row.updates_per_s / relay);
                row.of_pub_sub = pub_sub.map(|pub_sub| row.updates_per_s / pub_sub);
            }
            report.throughput.extend(rows);
        }
    }
    drop(targets.pair_processes.drain(..));

    // 2: latency at half the server's zero-loss rate (half the slower one's when the
    // CURVE server is measured too, so that every route sustains it), and the relay's
    // at that rate.
    if !args.skips("latency") {
        bar.set_message("latency");
        let slowest = match (server_max, curve_max) {
            (Some(plain), Some(curve)) => Some(plain.min(curve)),
            (plain, curve) => plain.or(curve),
        };
        let rate = match args.latency_rate {
            Some(rate) => f64::from(rate),
            None => slowest.map_or(20_000.0, |max| max / 2.0),
        };
        let seconds = if args.quick { 2.0 } else { 5.0 };
        let mut routes = vec![(ROUTE_RELAY, &relay_route), (ROUTE_SERVER, &server_route)];
        routes.extend(
            persisted_routes
                .iter()
                .map(|(name, _, route)| (*name, route)),
        );
        if let Some(route) = &curve_route {
            routes.push((ROUTE_SERVER_CURVE, route));
        }
        let mut pools: Vec<Result<LatencyPool, BenchError>> =
            routes.iter().map(|_| LatencyPool::new()).collect();
        for _ in 0..LATENCY_ROUNDS {
            for ((_, route), pool) in routes.iter().zip(&mut pools) {
                let Ok(measured) = pool else { continue };
                let round = latency_round(
                    route,
                    args.publishers,
                    shape,
                    args.hwm,
                    drain,
                    rate,
                    seconds / LATENCY_ROUNDS as f64,
                );
                if let Err(error) = round.and_then(|histogram| measured.add(&histogram)) {
                    *pool = Err(error);
                }
            }
        }
        for ((name, _), pool) in routes.iter().zip(pools) {
            match pool {
                Ok(pool) => report.latency.push(pool.row(name, rate)),
                Err(error) => report.problems.push(format!("latency of {name}: {error}")),
            }
            bar.inc(1);
        }
    }
    drop(relay_process);
    drop(targets.lone_process.take());
    drop(targets.persisted.drain(..));
    drop(targets.curve.take());

    // 3 and 5: load the map, read the memory, take the snapshot.
    if !args.skips("snapshot") {
        match load_and_snapshot(args, shape, &targets, &bar) {
            Ok((snapshot, memory)) => {
                report.snapshot = Some(snapshot);
                report.memory = memory;
            }
            Err(error) => report.problems.push(format!("snapshot: {error}")),
        }
    }
    drop(targets.loaded_process.take());

    // 7: a restart from a data directory holding every key.
    if args.endpoint.is_none() && !args.skips("restart") {
        match measure_restart(
            args, shape, &clonekvd, &mut ports, dummy_peer, &scratch, &bar,
        ) {
            Ok(row) => report.restart = Some(row),
            Err(error) => report.problems.push(format!("restart: {error}")),
        }
        bar.inc(1);
    }

    // 8: a backup back from an absence: resume beside a full snapshot.
    if args.endpoint.is_none() && !args.skips("resume") {
        match measure_resume(args, shape, &clonekvd, &mut ports, &scratch, &bar) {
            Ok(row) => report.resume = Some(row),
            Err(error) => report.problems.push(format!("resume: {error}")),
        }
        bar.inc(1);
    }

    // 4: failover, only of a pair started here.
    if args.endpoint.is_none() && !args.skips("failover") {
        let timings = [
            ("default", Timing::DEFAULT, Duration::from_secs(5), false),
            (
                "aggressive",
                Timing {
                    heartbeat_ms: 100,
                    peer_expiry_beats: 2,
                },
                Duration::from_millis(300),
                true,
            ),
        ];
        for (name, timing, server_ttl, cli_server_ttl) in timings {
            let mut runs = Vec::new();
            for (run, (numerator, denominator)) in FAILOVER_PHASES.into_iter().enumerate() {
                let run = run + 1;
                bar.set_message(format!(
                    "failover, {name} timings, {run} of {}",
                    FAILOVER_PHASES.len()
                ));
                let kill_phase =
                    Duration::from_millis(timing.heartbeat_ms) * numerator / denominator;
                let outcome = (|| {
                    // A block free now for every pair, checked after the last was killed.
                    let mut ports = Ports::allocate(8)?;
                    let primary_ports = ServerPorts::take(&mut ports)?;
                    let backup_ports = ServerPorts::take(&mut ports)?;
                    let (mut primary, mut backup) = start_pair(
                        &clonekvd,
                        primary_ports,
                        backup_ports,
                        timing,
                        args.hwm,
                        &scratch,
                        &format!("{name}-{run}"),
                    )?;
                    wait_active(&primary_ports.endpoint(), Some(&mut primary))?;
                    backup.check_running()?;
                    failover::measure(
                        &mut primary,
                        &failover::Setup {
                            servers: [primary_ports.endpoint(), backup_ports.endpoint()],
                            server_ttl,
                            cli_server_ttl,
                            subtree: format!("{prefix}failover/"),
                            kill_phase,
                            clonekv: &self_exe,
                            patience: PATIENCE,
                        },
                    )
                })();
                match outcome {
                    Ok(result) => {
                        if let Some(why) = &result.cli_get_failure {
                            report.problems.push(format!(
                                "`clonekv get` after the kill ({name} timings, run {run}): {why}"
                            ));
                        }
                        runs.push(result);
                    }
                    Err(error) => report
                        .problems
                        .push(format!("failover with {name} timings, run {run}: {error}")),
                }
                bar.inc(1);
            }
            if !runs.is_empty() {
                report.failover.push(FailoverRow::new(
                    name,
                    timing.heartbeat_ms,
                    timing.peer_expiry_beats,
                    server_ttl.as_millis() as u64,
                    runs,
                ));
            }
        }
    }
    bar.finish_and_clear();
    report.load_average.1 = procs::load_average();
    report.elapsed_seconds = began.elapsed().as_secs_f64();
    scratch.keep = !report.problems.is_empty();
    Ok(report)
}

fn validate(args: &BenchArgs) -> Result<(), BenchError> {
    // The run's prefix and at least two digits.
    if args.key_size < 11 || args.key_size > 255 {
        return Err(BenchError::new("--key-size must be 11..=255"));
    }
    if args.value_size < traffic::BODY_HEADER {
        return Err(BenchError::new(format!(
            "--value-size must be at least {}",
            traffic::BODY_HEADER
        )));
    }
    if args.publishers == 0 || args.subscribers.contains(&0) {
        return Err(BenchError::new(
            "--publishers and --subscribers must be at least 1",
        ));
    }
    let digits = args.key_size - PREFIX_LEN;
    if digits < 20 && args.keys > 10u64.pow(digits as u32) {
        return Err(BenchError::new("--keys does not fit in --key-size digits"));
    }
    Ok(())
}

/// `tcp://host:P` → `tcp://host:P+offset`.
fn plus(endpoint: &str, offset: u16) -> Result<String, BenchError> {
    let (head, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| BenchError::new(format!("{endpoint}: expected transport://host:port")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| BenchError::new(format!("{endpoint}: the port is not a number")))?;
    let port = port
        .checked_add(offset)
        .ok_or_else(|| BenchError::new(format!("{endpoint}: port out of range")))?;
    Ok(format!("{head}:{port}"))
}

fn wait_active(endpoint: &str, process: Option<&mut Process>) -> Result<(), BenchError> {
    let waited = snapshot::wait_active(endpoint, PATIENCE, None);
    if let Some(process) = process {
        process.check_running()?;
    }
    waited.map(|_| ())
}

fn start_targets(
    args: &BenchArgs,
    clonekvd: &std::path::Path,
    ports: &mut Ports,
    dummy_peer: ServerPorts,
    scratch: &Scratch,
) -> Result<Targets, BenchError> {
    if let Some(endpoint) = &args.endpoint {
        return Ok(Targets {
            lone: endpoint.clone(),
            lone_process: None,
            loaded: endpoint.clone(),
            loaded_process: None,
            loaded_pid: args.server_pid,
            pair: args
                .backup_endpoint
                .clone()
                .map(|backup| (endpoint.clone(), backup)),
            pair_processes: Vec::new(),
            persisted: Vec::new(),
            curve: None,
        });
    }
    // A lone primary whose peer never answers: it becomes active on the first client
    // request after two heartbeats.
    let mut lone_server = |name: &str| -> Result<(String, Process), BenchError> {
        let me = ServerPorts::take(ports)?;
        let args = procs::server_args(me, dummy_peer, false, Timing::DEFAULT, args.hwm);
        let process = Process::spawn(name, clonekvd, &args, &scratch.path)?;
        Ok((me.endpoint(), process))
    };
    let (lone, lone_process) = lone_server("lone")?;
    let (loaded, loaded_process) = lone_server("loaded")?;
    let loaded_pid = Some(loaded_process.pid());
    let pair = if args.skips("pair") || args.skips("throughput") {
        None
    } else {
        let primary = ServerPorts::take(ports)?;
        let backup = ServerPorts::take(ports)?;
        // A short heartbeat only so that each trial learns the backup's sequence (from
        // its HUGZ) quickly; it does not change the update path.
        let timing = Timing {
            heartbeat_ms: 250,
            peer_expiry_beats: 4,
        };
        let (primary_process, backup_process) =
            start_pair(clonekvd, primary, backup, timing, args.hwm, scratch, "pair")?;
        Some((
            (primary.endpoint(), backup.endpoint()),
            vec![primary_process, backup_process],
        ))
    };
    let (pair, pair_processes) = match pair {
        Some((endpoints, processes)) => (Some(endpoints), processes),
        None => (None, Vec::new()),
    };
    let mut persisted = Vec::new();
    if !args.skips("persistence") {
        for (route, policy) in ROUTES_FSYNC {
            let me = ServerPorts::take(ports)?;
            let mut server_args =
                procs::server_args(me, dummy_peer, false, Timing::DEFAULT, args.hwm);
            server_args.extend([
                "--data-dir".to_string(),
                scratch
                    .path
                    .join(format!("data-{policy}"))
                    .display()
                    .to_string(),
                "--fsync".to_string(),
                policy.to_string(),
            ]);
            let process = Process::spawn(
                &format!("fsync-{policy}"),
                clonekvd,
                &server_args,
                &scratch.path,
            )?;
            persisted.push((route, me.endpoint(), process));
        }
    }
    let curve = if targets_curve(args) {
        let me = ServerPorts::take(ports)?;
        let (flags, keys) = curve_keys(&scratch.path)?;
        let mut server_args = procs::server_args(me, dummy_peer, false, Timing::DEFAULT, args.hwm);
        server_args.extend(flags);
        let process = Process::spawn("lone-curve", clonekvd, &server_args, &scratch.path)?;
        Some((me.endpoint(), process, keys))
    } else {
        None
    };
    Ok(Targets {
        lone,
        lone_process: Some(lone_process),
        loaded,
        loaded_process: Some(loaded_process),
        loaded_pid,
        pair,
        pair_processes,
        persisted,
        curve,
    })
}

/// Whether the run measures a server with CURVE keys: only on servers it starts, and
/// only where throughput or latency is measured.
fn targets_curve(args: &BenchArgs) -> bool {
    args.endpoint.is_none()
        && !args.skips("curve")
        && !(args.skips("throughput") && args.skips("latency"))
}

/// Key pairs for the CURVE server and the bench's sockets, written to `dir`: the
/// server's flags and the bench's keys.
fn curve_keys(dir: &std::path::Path) -> Result<(Vec<String>, RouteCurve), BenchError> {
    use clonekv_zmq::curve::KeyPair;
    let failed =
        |error: clonekv_zmq::curve::KeyError| BenchError::new(format!("CURVE keys: {error}"));
    let server = KeyPair::generate().map_err(failed)?;
    let client = KeyPair::generate().map_err(failed)?;
    let peer = KeyPair::generate().map_err(failed)?;
    let clients = dir.join("curve-clients");
    std::fs::create_dir_all(&clients).map_err(|error| {
        BenchError::new(format!("cannot create {}: {error}", clients.display()))
    })?;
    let (server_file, _) = server
        .write(&dir.join("curve-server"), true)
        .map_err(failed)?;
    client.write(&clients.join("bench"), true).map_err(failed)?;
    let flags = vec![
        "--curve-secret-key".to_string(),
        server_file.display().to_string(),
        "--curve-clients".to_string(),
        clients.display().to_string(),
        "--peer-public-key".to_string(),
        peer.public().z85(),
    ];
    Ok((
        flags,
        RouteCurve {
            own: client,
            server: server.public(),
        },
    ))
}

fn start_pair(
    clonekvd: &std::path::Path,
    primary: ServerPorts,
    backup: ServerPorts,
    timing: Timing,
    hwm: i32,
    scratch: &Scratch,
    name: &str,
) -> Result<(Process, Process), BenchError> {
    let primary_process = Process::spawn(
        &format!("{name}-primary"),
        clonekvd,
        &procs::server_args(primary, backup, false, timing, hwm),
        &scratch.path,
    )?;
    let backup_process = Process::spawn(
        &format!("{name}-backup"),
        clonekvd,
        &procs::server_args(backup, primary, true, timing, hwm),
        &scratch.path,
    )?;
    Ok((primary_process, backup_process))
}

#[allow(clippy::too_many_arguments)]
/// Latency is measured in rounds, the relay and the server taking turns (a fresh session
/// each), so that both meet the same moments of a busy machine; each route's figures
/// are over all of its samples, and each round's p99 is reported beside them.
const LATENCY_ROUNDS: usize = 3;

/// One route's latency samples over every round.
struct LatencyPool {
    histogram: Histogram<u64>,
    round_p99_us: Vec<f64>,
}

/// Nanoseconds, from 1 ns to an hour, to 3 significant digits.
fn latency_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|error| BenchError::new(format!("histogram: {error}")))
}

impl LatencyPool {
    fn new() -> Result<LatencyPool, BenchError> {
        Ok(LatencyPool {
            histogram: latency_histogram()?,
            round_p99_us: Vec::new(),
        })
    }

    fn add(&mut self, round: &Histogram<u64>) -> Result<(), BenchError> {
        self.round_p99_us
            .push(round.value_at_quantile(0.99) as f64 / 1_000.0);
        self.histogram
            .add(round)
            .map_err(|error| BenchError::new(format!("histogram: {error}")))
    }

    fn row(&self, route: &'static str, rate: f64) -> LatencyRow {
        let us = |quantile: f64| self.histogram.value_at_quantile(quantile) as f64 / 1_000.0;
        LatencyRow {
            route,
            rate_per_s: rate,
            samples: self.histogram.len(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.histogram.max() as f64 / 1_000.0,
            round_p99_us: self.round_p99_us.clone(),
        }
    }
}

/// One round of latency samples through `route` at `rate`, for `seconds`.
fn latency_round(
    route: &Route,
    publishers: usize,
    shape: Shape,
    hwm: i32,
    drain: Duration,
    rate: f64,
    seconds: f64,
) -> Result<Histogram<u64>, BenchError> {
    let mut session = Session::open(route, publishers, 1, shape, hwm, drain)?;
    session.warm_up(PATIENCE)?;
    let mut histogram = latency_histogram()?;
    let count = (rate * seconds) as u64;
    let result = session.latency_trial(rate, count, &mut histogram)?;
    if !result.complete_in_order() {
        return Err(BenchError::new(format!(
            "updates were lost at {rate:.0}/s ({} of {} arrived in order)",
            result.received_in_order.first().copied().unwrap_or(0),
            result.sent
        )));
    }
    Ok(histogram)
}

fn load_and_snapshot(
    args: &BenchArgs,
    shape: Shape,
    targets: &Targets,
    bar: &ProgressBar,
) -> Result<(SnapshotRow, Option<MemoryRow>), BenchError> {
    let keys = args.keys;
    let rss = || targets.loaded_pid.and_then(procs::rss_of);
    let route = Route {
        publish: vec![plus(&targets.loaded, 2)?],
        publisher_binds: false,
        subscribe: plus(&targets.loaded, 1)?,
        backup_publisher: None,
        curve: None,
    };
    let mut session = Session::open(&route, 1, 1, shape, args.hwm, Duration::from_millis(300))?;
    let rss_empty = rss();
    session.warm_up(PATIENCE)?;
    let cpu_before = targets.loaded_pid.and_then(procs::cpu_time_of);
    let load_seconds = load_keys(&mut session, keys, "snapshot", bar)?;
    let load_cpu_us_per_update = match (cpu_before, targets.loaded_pid.and_then(procs::cpu_time_of))
    {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before).as_secs_f64() * 1e6 / keys as f64)
        }
        _ => None,
    };
    drop(session);
    bar.inc(1);
    // Let the server's queues empty and its allocator settle before reading memory.
    std::thread::sleep(Duration::from_millis(500));
    let memory = match (rss_empty, rss()) {
        (Some(empty), Some(loaded)) => Some(MemoryRow {
            keys,
            rss_empty_bytes: empty,
            rss_loaded_bytes: loaded,
            bytes_per_key: loaded.saturating_sub(empty) as f64 / keys as f64,
        }),
        _ => None,
    };
    let mut runs = Vec::with_capacity(SNAPSHOT_RUNS);
    for run in 1..=SNAPSHOT_RUNS {
        bar.set_message(format!("snapshot {run} of {SNAPSHOT_RUNS}: {keys} keys"));
        let cpu_before = targets.loaded_pid.and_then(procs::cpu_time_of);
        let taken = snapshot::take(
            &targets.loaded,
            &shape,
            keys,
            Duration::from_secs(10),
            |entries| {
                bar.set_message(format!(
                    "snapshot {run} of {SNAPSHOT_RUNS}: {entries} of {keys} entries"
                ));
            },
        )?;
        let cpu_us_per_entry = match (cpu_before, targets.loaded_pid.and_then(procs::cpu_time_of)) {
            (Some(before), Some(after)) => {
                Some(after.saturating_sub(before).as_secs_f64() * 1e6 / taken.entries.max(1) as f64)
            }
            _ => None,
        };
        runs.push((taken, cpu_us_per_entry));
    }
    bar.inc(1);
    let complete = runs
        .iter()
        .all(|(taken, _)| taken.ended && taken.expected_present == keys);
    let runs_seconds: Vec<f64> = runs
        .iter()
        .map(|(taken, _)| taken.elapsed.as_secs_f64())
        .collect();
    runs.sort_by_key(|(taken, _)| taken.elapsed);
    let Some((median, cpu_us_per_entry)) = runs.get(runs.len() / 2) else {
        return Err(BenchError::new("no snapshot was taken"));
    };
    let seconds = median.elapsed.as_secs_f64();
    Ok((
        SnapshotRow {
            keys_loaded: keys,
            load_seconds,
            load_cpu_us_per_update,
            entries_received: median.entries,
            cpu_us_per_entry: *cpu_us_per_entry,
            complete,
            seconds,
            runs_seconds,
            keys_per_s: median.entries as f64 / seconds,
            mb_per_s: median.bytes as f64 / 1e6 / seconds,
        },
        memory,
    ))
}

/// Every key once, in chunks each confirmed in order by the subscriber, as fast as the
/// server takes them (a closed-loop flood); a chunk that lost updates is sent again.
/// Returns the seconds it took.
fn load_keys(
    session: &mut Session,
    keys: u64,
    part: &str,
    bar: &ProgressBar,
) -> Result<f64, BenchError> {
    let chunk = 250_000u64;
    let mut first = 0;
    let load_began = Instant::now();
    let mut failures = 0;
    while first < keys {
        let count = chunk.min(keys - first);
        bar.set_message(format!("{part}: loading keys {first}..{}", first + count));
        let result = session.trial(Pace::Flood, count, Keys::Load { first }, None)?;
        if result.zero_loss() {
            first += count;
        } else {
            failures += 1;
            if failures > 3 {
                return Err(BenchError::new("loading the keys keeps losing updates"));
            }
        }
    }
    Ok(load_began.elapsed().as_secs_f64())
}

/// Loads `--keys` keys into a server with a data directory (`--fsync never`), kills it
/// (SIGKILL) and times its restart to the first snapshot reply, beside an empty server's
/// start and this process reading the same files.
fn measure_restart(
    args: &BenchArgs,
    shape: Shape,
    clonekvd: &std::path::Path,
    ports: &mut Ports,
    dummy_peer: ServerPorts,
    scratch: &Scratch,
    bar: &ProgressBar,
) -> Result<RestartRow, BenchError> {
    // A short heartbeat: a lone primary serves once its peer is silent for two, which
    // every start below pays alike.
    let timing = Timing {
        heartbeat_ms: 100,
        peer_expiry_beats: 2,
    };
    let me = ServerPorts::take(ports)?;
    let endpoint = me.endpoint();
    let dir = scratch.path.join("data-restart");
    let mut with_dir = procs::server_args(me, dummy_peer, false, timing, args.hwm);
    with_dir.extend([
        "--data-dir".to_string(),
        dir.display().to_string(),
        "--fsync".to_string(),
        "never".to_string(),
    ]);
    let mut first = Process::spawn("restart-1", clonekvd, &with_dir, &scratch.path)?;
    wait_active(&endpoint, Some(&mut first))?;
    let route = Route {
        publish: vec![plus(&endpoint, 2)?],
        publisher_binds: false,
        subscribe: plus(&endpoint, 1)?,
        backup_publisher: None,
        curve: None,
    };
    let mut session = Session::open(&route, 1, 1, shape, args.hwm, Duration::from_millis(300))?;
    session.warm_up(PATIENCE)?;
    let load_seconds = load_keys(&mut session, args.keys, "restart", bar)?;
    drop(session);
    // Every update was published, so it was written: a SIGKILL loses none.
    first.kill();

    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|error| BenchError::new(format!("cannot list {}: {error}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    let read_began = Instant::now();
    let mut data_dir_bytes = 0u64;
    for file in &files {
        let bytes = std::fs::read(file)
            .map_err(|error| BenchError::new(format!("cannot read {}: {error}", file.display())))?;
        data_dir_bytes += bytes.len() as u64;
    }
    let raw_read_s = read_began.elapsed().as_secs_f64();

    bar.set_message("restart: an empty server's start (the anchor)");
    let empty_ports = ServerPorts::take(ports)?;
    let empty_began = Instant::now();
    let mut empty = Process::spawn(
        "restart-empty",
        clonekvd,
        &procs::server_args(empty_ports, dummy_peer, false, timing, args.hwm),
        &scratch.path,
    )?;
    wait_active(&empty_ports.endpoint(), Some(&mut empty))?;
    let empty_start_to_serving_s = empty_began.elapsed().as_secs_f64();
    drop(empty);

    bar.set_message(format!("restart: reading {} keys back", args.keys));
    let restart_began = Instant::now();
    let mut second = Process::spawn("restart-2", clonekvd, &with_dir, &scratch.path)?;
    wait_active(&endpoint, Some(&mut second))?;
    let restart_to_serving_s = restart_began.elapsed().as_secs_f64();
    let keys_restored = snapshot::count(&endpoint, shape.prefix.as_bytes(), PATIENCE)?;
    Ok(RestartRow {
        keys: args.keys,
        load_seconds,
        data_dir_bytes,
        restart_to_serving_s,
        empty_start_to_serving_s,
        raw_read_s,
        keys_restored,
    })
}

/// A pair with data directories (`--fsync never`) loaded with `--keys` keys; the backup
/// is killed, `--resume-changes` keys change, and it is started again: the time to its
/// first HUGZ at the primary's sequence, resuming. Then the same again with
/// `--no-resume` (a full snapshot), the anchor.
fn measure_resume(
    args: &BenchArgs,
    shape: Shape,
    clonekvd: &std::path::Path,
    ports: &mut Ports,
    scratch: &Scratch,
    bar: &ProgressBar,
) -> Result<ResumeRow, BenchError> {
    let timing = Timing {
        heartbeat_ms: 100,
        peer_expiry_beats: 2,
    };
    let primary = ServerPorts::take(ports)?;
    let backup = ServerPorts::take(ports)?;
    let with_dir = |args_of: Vec<String>, name: &str| {
        let mut args_of = args_of;
        args_of.extend([
            "--data-dir".to_string(),
            scratch.path.join(name).display().to_string(),
            "--fsync".to_string(),
            "never".to_string(),
        ]);
        args_of
    };
    let primary_args = with_dir(
        procs::server_args(primary, backup, false, timing, args.hwm),
        "resume-primary",
    );
    let backup_args = with_dir(
        procs::server_args(backup, primary, true, timing, args.hwm),
        "resume-backup",
    );
    let mut primary_process =
        Process::spawn_logging("resume-primary", clonekvd, &primary_args, &scratch.path)?;
    let mut backup_process =
        Process::spawn_logging("resume-backup-1", clonekvd, &backup_args, &scratch.path)?;
    wait_active(&primary.endpoint(), Some(&mut primary_process))?;
    let route = Route {
        publish: vec![plus(&primary.endpoint(), 2)?],
        publisher_binds: false,
        subscribe: plus(&primary.endpoint(), 1)?,
        backup_publisher: None,
        curve: None,
    };
    let mut session = Session::open(&route, 1, 1, shape, args.hwm, Duration::from_millis(300))?;
    session.warm_up(PATIENCE)?;
    load_keys(&mut session, args.keys, "resume", bar)?;
    let changes = args.resume_changes.min(args.keys);
    let mut restart_backup =
        |run: usize, extra: &[&str], process: &mut Process| -> Result<(f64, String), BenchError> {
            bar.set_message(format!(
                "resume: backup away while {changes} keys change ({})",
                if extra.is_empty() { "resume" } else { "full" }
            ));
            wait_hugz_at(&backup.endpoint(), hugz_sequence(&primary.endpoint())?)?;
            process.kill();
            load_keys(&mut session, changes, "resume", bar)?;
            let target = hugz_sequence(&primary.endpoint())?;
            let mut restarted_args = backup_args.clone();
            restarted_args.extend(extra.iter().map(|arg| arg.to_string()));
            let name = format!("resume-backup-{run}");
            let began = Instant::now();
            *process = Process::spawn_logging(&name, clonekvd, &restarted_args, &scratch.path)?;
            wait_hugz_at(&backup.endpoint(), target)?;
            let seconds = began.elapsed().as_secs_f64();
            let log = std::fs::read_to_string(scratch.path.join(format!("{name}.log")))
                .unwrap_or_default();
            Ok((seconds, log))
        };
    let (resume_s, resume_log) = restart_backup(2, &[], &mut backup_process)?;
    let (full_s, full_log) = restart_backup(3, &["--no-resume"], &mut backup_process)?;
    drop(session);
    drop(backup_process);
    drop(primary_process);
    Ok(ResumeRow {
        keys: args.keys,
        changes,
        resume_s,
        full_s,
        resumed_as_asked: resume_log.contains("by resuming")
            && full_log.contains("(full snapshot)"),
    })
}

/// The sequence of a server's next HUGZ.
fn hugz_sequence(endpoint: &str) -> Result<i64, BenchError> {
    let mut sequence = None;
    read_hugz_until(endpoint, |at| {
        sequence = Some(at);
        true
    })?;
    sequence.ok_or_else(|| BenchError::new(format!("{endpoint}: no HUGZ")))
}

/// Waits until a server's HUGZ carry `sequence` or more (a passive's, once it holds
/// every update up to it).
fn wait_hugz_at(endpoint: &str, sequence: i64) -> Result<(), BenchError> {
    read_hugz_until(endpoint, |at| at >= sequence)
}

/// Reads the HUGZ of the server at `endpoint` until `done` says so, for at most
/// [`PATIENCE`].
fn read_hugz_until(endpoint: &str, mut done: impl FnMut(i64) -> bool) -> Result<(), BenchError> {
    let publisher = plus(endpoint, 1)?;
    let fail = |error: zmq::Error| BenchError::new(format!("heartbeats of {publisher}: {error}"));
    let context = zmq::Context::new();
    let socket = context.socket(zmq::SUB).map_err(fail)?;
    socket.set_linger(0).map_err(fail)?;
    socket
        .set_subscribe(clonekv_core::kvmsg::HUGZ)
        .map_err(fail)?;
    socket.connect(&publisher).map_err(fail)?;
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if socket.poll(zmq::POLLIN, 50).map_err(fail)? == 0 {
            continue;
        }
        let frames = socket.recv_multipart(0).map_err(fail)?;
        let sequence = frames
            .get(1)
            .and_then(|frame| <[u8; 8]>::try_from(frame.as_slice()).ok())
            .map(i64::from_be_bytes);
        if sequence.is_some_and(&mut done) {
            return Ok(());
        }
    }
    Err(BenchError::new(format!(
        "{publisher}: its HUGZ did not reach the expected sequence within {PATIENCE:?}"
    )))
}

/// Snapshots taken of the loaded map, one after another; the figures are the median
/// run's, and every run's time is reported: on a busy machine one run moves by ±20 %.
const SNAPSHOT_RUNS: usize = 3;

/// The report as a human-readable table.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let k = |rate: f64| format!("{:.0}k/s", rate / 1_000.0);
    let ratio = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.2}"));
    let _ = writeln!(
        out,
        "clonekv bench{}: {}; {} CPUs; {} B keys under {}, {} B values, {} publisher(s), HWM {}; trials of {:.1} s",
        if report.quick { " --quick" } else { "" },
        report.target,
        report.cpus,
        report.key_size,
        report.key_prefix,
        report.value_size,
        report.publishers,
        report.hwm,
        report.trial_seconds,
    );
    if !report.throughput.is_empty() {
        let rows = report.throughput.iter().map(|row| {
            vec![
                row.route.to_string(),
                row.subscribers.to_string(),
                k(row.updates_per_s),
                k(row.flood_per_s),
                ratio(row.of_relay),
                ratio(row.of_pub_sub),
                row.cpu_us_per_update
                    .map_or("-".to_string(), |us| format!("{us:.1} µs")),
            ]
        });
        let _ = writeln!(
            out,
            "\nupdate throughput (zero loss, in order)\n{}",
            table(
                &[
                    "route",
                    "subs",
                    "updates",
                    "flood",
                    "of relay",
                    "of PUB→SUB",
                    "CPU/update"
                ],
                rows
            )
        );
    }
    if report.publishers > 1 && !report.throughput.is_empty() {
        let _ = writeln!(
            out,
            "  (raw PUB→SUB always has 1 publisher: it binds the endpoint)"
        );
    }
    if !report.latency.is_empty() {
        let us = |micros: f64| format!("{micros:.0}µs");
        let rows = report.latency.iter().map(|row| {
            vec![
                row.route.to_string(),
                k(row.rate_per_s),
                us(row.p50_us),
                us(row.p99_us),
                us(row.p999_us),
                us(row.max_us),
            ]
        });
        let _ = writeln!(
            out,
            "\nupdate latency, KVSET sent → KVPUB received (1 subscriber)\n{}",
            table(&["route", "rate", "p50", "p99", "p99.9", "max"], rows)
        );
        let rounds: Vec<String> = report
            .latency
            .iter()
            .map(|row| {
                let p99s: Vec<String> = row
                    .round_p99_us
                    .iter()
                    .map(|us| format!("{us:.0}"))
                    .collect();
                format!("{} {} µs", row.route, p99s.join(" / "))
            })
            .collect();
        let _ = writeln!(
            out,
            "  ({LATENCY_ROUNDS} rounds, the routes taking turns; p99 of each round: {})",
            rounds.join("; ")
        );
    }
    if let Some(cost) = curve_cost(report) {
        let _ = writeln!(
            out,
            "\ncost of CURVE: the same lone server with and without keys, in this run\n{cost}"
        );
    }
    if let Some(snapshot) = &report.snapshot {
        let cpu = snapshot
            .cpu_us_per_entry
            .map_or(String::new(), |us| format!(", server CPU {us:.1} µs/entry"));
        let _ = writeln!(
            out,
            "\nsnapshot of {} keys: {:.2} s (median of {}: {} s), {:.0}k keys/s, {:.0} MB/s{cpu}, {} ({} entries)",
            snapshot.keys_loaded,
            snapshot.seconds,
            snapshot.runs_seconds.len(),
            snapshot
                .runs_seconds
                .iter()
                .map(|seconds| format!("{seconds:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            snapshot.keys_per_s / 1_000.0,
            snapshot.mb_per_s,
            if snapshot.complete {
                "complete"
            } else {
                "INCOMPLETE"
            },
            snapshot.entries_received,
        );
    }
    if let Some(snapshot) = &report.snapshot {
        let cpu = snapshot.load_cpu_us_per_update.map_or(String::new(), |us| {
            format!(", server CPU {us:.1} µs/update")
        });
        let _ = writeln!(
            out,
            "loading them: {:.2} s, {:.0}k updates/s{cpu}",
            snapshot.load_seconds,
            snapshot.keys_loaded as f64 / snapshot.load_seconds / 1_000.0,
        );
    }
    if let Some(memory) = &report.memory {
        let _ = writeln!(
            out,
            "memory at {} keys: {:.0} B/key (server RSS {:.0} MB empty, {:.0} MB loaded)",
            memory.keys,
            memory.bytes_per_key,
            memory.rss_empty_bytes as f64 / 1e6,
            memory.rss_loaded_bytes as f64 / 1e6,
        );
    }
    if !report.failover.is_empty() {
        let seconds = |figure: Option<f64>| figure.map_or("-".to_string(), |s| format!("{s:.2}"));
        let rows = report.failover.iter().flat_map(|row| {
            row.runs.iter().map(|run| {
                vec![
                    row.timing.to_string(),
                    format!("+{} ms", run.kill_phase_ms),
                    seconds(run.backup_answers_s),
                    seconds(Some(run.server_changed_s)),
                    seconds(Some(run.synced_s)),
                    seconds(Some(run.first_update_s)),
                    // The probe asks every 10 ms: a client's own request may make the
                    // backup take over up to that much before the probe sees it.
                    seconds(
                        run.backup_answers_s
                            .map(|anchor| (run.first_update_s - anchor).max(0.0)),
                    ),
                    seconds(run.cli_get_s),
                ]
            })
        });
        let _ = writeln!(
            out,
            "\nfailover, SIGKILL of the active at a phase of its heartbeat (seconds from the kill)\n{}",
            table(
                &[
                    "timings",
                    "kill at",
                    "backup takes over",
                    "client moved",
                    "re-synced",
                    "first update",
                    "after takeover",
                    "clonekv get",
                ],
                rows
            )
        );
        for row in &report.failover {
            let cli = row.worst_cli_get_s.map_or_else(
                || "`clonekv get` did not return the value in every run".to_string(),
                |worst| format!("worst `clonekv get` {worst:.2} s"),
            );
            let _ = writeln!(
                out,
                "  {}: heartbeat {} ms × {}, client server ttl {} ms: worst first update {:.2} s, {cli}; the backup took over by {} s",
                row.timing,
                row.heartbeat_ms,
                row.peer_expiry_beats,
                row.client_server_ttl_ms,
                row.worst_first_update_s,
                seconds(row.worst_backup_answers_s),
            );
        }
        let _ = writeln!(
            out,
            "  (backup takes over: a raw ICANHAZ? every 10 ms first answered, the earliest Binary Star allows, give or take those 10 ms; first update: through the backup, to a client library watcher; clonekv get: the CLI started right after the kill)"
        );
    }
    if let Some(restart) = &report.restart {
        let _ = writeln!(
            out,
            "\nrestart from a data directory of {} keys ({:.0} MB; loaded with --fsync never in {:.1} s): serving after {:.2} s; an empty server's start {:.2} s; reading the files alone {:.2} s; {} keys restored{}",
            restart.keys,
            restart.data_dir_bytes as f64 / 1e6,
            restart.load_seconds,
            restart.restart_to_serving_s,
            restart.empty_start_to_serving_s,
            restart.raw_read_s,
            restart.keys_restored,
            if restart.keys_restored == restart.keys { "" } else { " (INCOMPLETE)" },
        );
    }
    if let Some(resume) = &report.resume {
        let _ = writeln!(
            out,
            "\nbackup back from an absence ({} keys, {} changed while it was away; restart → synced, data directory read included)\n{}{}",
            resume.keys,
            resume.changes,
            table(
                &["re-sync", "sent", "restart → synced", "of full"],
                [
                    vec![
                        "resume".to_string(),
                        format!("{} changes", resume.changes),
                        format!("{:.2} s", resume.resume_s),
                        format!("{:.2}", resume.resume_s / resume.full_s.max(f64::EPSILON)),
                    ],
                    vec![
                        "full snapshot (--no-resume)".to_string(),
                        format!("{} keys", resume.keys),
                        format!("{:.2} s", resume.full_s),
                        "1.00".to_string(),
                    ],
                ]
                .into_iter()
            ),
            if resume.resumed_as_asked {
                ""
            } else {
                "\n  (WARNING: the backup's logs do not show one resume and one full snapshot)"
            }
        );
    }
    if let Some(cleanup) = &report.cleanup {
        let _ = writeln!(
            out,
            "\nthe run's keys removed: {} deletes under {} in {:.1} s, {}",
            cleanup.keys_deleted,
            cleanup.prefix,
            cleanup.seconds,
            match cleanup.keys_left {
                0 => "none left".to_string(),
                left => format!("{left} LEFT"),
            }
        );
    }
    if let (Some(start), end) = report.load_average {
        let end = end.map_or(String::new(), |end| format!(" → {end:.1}"));
        let _ = writeln!(
            out,
            "\nload average {start:.1}{end} on {} CPUs{}",
            report.cpus,
            if start > report.cpus as f64 {
                ": the machine was busy, compare ratios, not rates"
            } else {
                ""
            }
        );
    }
    for problem in &report.problems {
        let _ = writeln!(out, "\nnot measured: {problem}");
    }
    let _ = writeln!(out, "\n({:.0} s)", report.elapsed_seconds);
    out
}

/// A borderless table indented by two spaces like the rest of the report: the first
/// column left-aligned, the others right-aligned, two spaces between columns.
/// The plain server's figures beside the CURVE server's, from the throughput and latency
/// rows of one run; `None` if the run measured no CURVE server.
fn curve_cost(report: &Report) -> Option<String> {
    let mut rows = Vec::new();
    let ratio = |plain: f64, curve: f64| {
        if plain > 0.0 {
            format!("{:.2}", curve / plain)
        } else {
            "-".to_string()
        }
    };
    let throughput = |route: &str, subscribers: usize| {
        report
            .throughput
            .iter()
            .find(|row| row.route == route && row.subscribers == subscribers)
    };
    let mut counts: Vec<usize> = report
        .throughput
        .iter()
        .map(|row| row.subscribers)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    for subscribers in counts {
        let (Some(plain), Some(curve)) = (
            throughput(ROUTE_SERVER, subscribers),
            throughput(ROUTE_SERVER_CURVE, subscribers),
        ) else {
            continue;
        };
        rows.push(vec![
            format!("updates, {subscribers} sub"),
            format!("{:.0}k/s", plain.updates_per_s / 1_000.0),
            format!("{:.0}k/s", curve.updates_per_s / 1_000.0),
            ratio(plain.updates_per_s, curve.updates_per_s),
        ]);
        if let (Some(plain_cpu), Some(curve_cpu)) =
            (plain.cpu_us_per_update, curve.cpu_us_per_update)
        {
            rows.push(vec![
                format!("server CPU/update, {subscribers} sub"),
                format!("{plain_cpu:.1} µs"),
                format!("{curve_cpu:.1} µs"),
                ratio(plain_cpu, curve_cpu),
            ]);
        }
    }
    let latency = |route: &str| report.latency.iter().find(|row| row.route == route);
    if let (Some(plain), Some(curve)) = (latency(ROUTE_SERVER), latency(ROUTE_SERVER_CURVE)) {
        for (name, plain_us, curve_us) in [
            ("latency p50", plain.p50_us, curve.p50_us),
            ("latency p99", plain.p99_us, curve.p99_us),
        ] {
            rows.push(vec![
                format!("{name} at {:.0}k/s", plain.rate_per_s / 1_000.0),
                format!("{plain_us:.0}µs"),
                format!("{curve_us:.0}µs"),
                ratio(plain_us, curve_us),
            ]);
        }
    }
    if rows.is_empty() {
        return None;
    }
    Some(table(&["figure", "plain", "CURVE", "CURVE / plain"], rows))
}

fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        if column.index == 0 {
            column.set_padding((2, 1));
        } else {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.trim_fmt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_rounds_pool_their_samples_and_keep_each_p99() {
        let mut pool = LatencyPool::new().unwrap();
        let mut quiet = latency_histogram().unwrap();
        let mut stalled = latency_histogram().unwrap();
        for micros in 1..=100u64 {
            quiet.record(micros * 1_000).unwrap();
            // The same, but its worst 2 % waited 50 ms.
            let waited = if micros > 98 { 50_000 } else { micros };
            stalled.record(waited * 1_000).unwrap();
        }
        pool.add(&quiet).unwrap();
        pool.add(&stalled).unwrap();
        let row = pool.row(ROUTE_SERVER, 1_000.0);
        assert_eq!(row.samples, 200);
        assert_eq!(row.round_p99_us.len(), 2);
        assert!((row.round_p99_us[0] - 99.0).abs() < 0.1, "{row:?}");
        assert!((row.round_p99_us[1] - 50_000.0).abs() < 50.0, "{row:?}");
        // Pooled, the stalled round's 2 samples are 1 % of 200: p99 is still quiet,
        // p99.9 and the maximum are not.
        assert!(row.p99_us < 101.0, "{row:?}");
        assert!(row.p999_us > 49_000.0, "{row:?}");
        assert!(row.max_us > 49_000.0, "{row:?}");
    }

    /// A report with every kind of row, for the renderer.
    fn sample() -> Report {
        let throughput = |route, subscribers, rate: f64, cpu, of_relay, of_pub_sub| ThroughputRow {
            route,
            subscribers,
            updates_per_s: rate,
            flood_per_s: rate * 1.2,
            trials: 7,
            cpu_us_per_update: cpu,
            of_relay,
            of_pub_sub,
        };
        let latency = |route, p50| LatencyRow {
            route,
            rate_per_s: 77_000.0,
            samples: 100,
            p50_us: p50,
            p99_us: 1690.4,
            p999_us: 4800.0,
            max_us: 6800.0,
            round_p99_us: vec![900.0, 1200.0, 2000.0],
        };
        Report {
            target: "clonekvd started by the bench (x)".to_string(),
            key_prefix: "/cb-0000/".to_string(),
            cpus: 2,
            load_average: (Some(1.5), Some(2.25)),
            quick: true,
            key_size: 16,
            value_size: 100,
            publishers: 1,
            hwm: 100_000,
            trial_seconds: 0.4,
            throughput: vec![
                throughput(ROUTE_PUB_SUB, 1, 423_000.0, None, Some(1.7), Some(1.0)),
                throughput(ROUTE_RELAY, 1, 249_000.0, Some(3.2), Some(1.0), Some(0.59)),
                throughput(
                    ROUTE_SERVER,
                    1,
                    154_000.0,
                    Some(5.7),
                    Some(0.62),
                    Some(0.36),
                ),
                throughput(ROUTE_PAIR, 10, 41_000.0, Some(24.1), None, None),
                throughput(ROUTE_SERVER_CURVE, 1, 77_000.0, Some(11.4), None, None),
            ],
            latency: vec![
                latency(ROUTE_RELAY, 109.0),
                latency(ROUTE_SERVER, 139.0),
                latency(ROUTE_SERVER_CURVE, 278.0),
            ],
            snapshot: None,
            memory: None,
            restart: None,
            resume: None,
            failover: vec![FailoverRow::new(
                "default",
                1_000,
                2,
                5_000,
                vec![
                    failover::FailoverResult {
                        kill_phase_ms: 0,
                        backup_answers_s: Some(2.004),
                        server_changed_s: 0.001,
                        synced_s: 2.101,
                        first_update_s: 2.107,
                        cli_get_s: Some(2.15),
                        cli_get_failure: None,
                    },
                    failover::FailoverResult {
                        kill_phase_ms: 333,
                        backup_answers_s: Some(1.671),
                        server_changed_s: 0.002,
                        synced_s: 1.8,
                        first_update_s: 1.803,
                        cli_get_s: None,
                        cli_get_failure: Some("exit status: 3".to_string()),
                    },
                ],
            )],
            cleanup: None,
            problems: vec!["something".to_string()],
            elapsed_seconds: 42.0,
        }
    }

    #[test]
    fn tables_are_aligned_and_keep_every_column() {
        let text = render(&sample());
        let expected = "
update throughput (zero loss, in order)
  route            subs  updates   flood  of relay  of PUB→SUB  CPU/update
  raw PUB→SUB         1   423k/s  508k/s      1.70        1.00           -
  raw relay           1   249k/s  299k/s      1.00        0.59      3.2 µs
  server              1   154k/s  185k/s      0.62        0.36      5.7 µs
  server + backup    10    41k/s   49k/s         -           -     24.1 µs
  server, CURVE       1    77k/s   92k/s         -           -     11.4 µs

update latency, KVSET sent → KVPUB received (1 subscriber)
  route           rate    p50     p99   p99.9     max
  raw relay      77k/s  109µs  1690µs  4800µs  6800µs
  server         77k/s  139µs  1690µs  4800µs  6800µs
  server, CURVE  77k/s  278µs  1690µs  4800µs  6800µs
";
        assert!(text.contains(expected), "{text}");
    }

    #[test]
    fn the_cost_of_curve_sets_the_keyed_server_beside_the_plain_one() {
        let text = render(&sample());
        let expected = "
cost of CURVE: the same lone server with and without keys, in this run
  figure                     plain    CURVE  CURVE / plain
  updates, 1 sub            154k/s    77k/s           0.50
  server CPU/update, 1 sub  5.7 µs  11.4 µs           2.00
  latency p50 at 77k/s       139µs    278µs           2.00
  latency p99 at 77k/s      1690µs   1690µs           1.00
";
        assert!(text.contains(expected), "{text}");
    }

    #[test]
    fn the_failover_table_shows_each_run_beside_the_takeover() {
        let text = render(&sample());
        let expected = "
failover, SIGKILL of the active at a phase of its heartbeat (seconds from the kill)
  timings  kill at  backup takes over  client moved  re-synced  first update  after takeover  clonekv get
  default    +0 ms               2.00          0.00       2.10          2.11            0.10         2.15
  default  +333 ms               1.67          0.00       1.80          1.80            0.13            -
  default: heartbeat 1000 ms × 2, client server ttl 5000 ms: worst first update 2.11 s, `clonekv get` did not return the value in every run; the backup took over by 2.00 s
";
        assert!(text.contains(expected), "{text}");
        let row = &sample().failover[0];
        assert_eq!(row.worst_first_update_s, 2.107);
        assert_eq!(row.worst_cli_get_s, None);
        assert_eq!(row.worst_backup_answers_s, Some(2.004));
    }
}
