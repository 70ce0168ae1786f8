//! `clonekv bench-http`: clonekvd's HTTP gateway against etcd's v3 JSON gateway, the
//! same operations in the same run on the same machine: PUT with its commit, GET, and
//! a watch fanned out to many streaming clients. See docs/PERFORMANCE.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::procs::{server_args, Ports, Process, Scratch, ServerPorts, Timing};
use super::{table, BenchError};
use clonekv_zmq::duration::HumanDuration;

/// `clonekv bench-http` options.
#[derive(Args, Debug, Clone)]
pub struct HttpBenchArgs {
    /// Concurrent HTTP clients of the PUT and GET measurements (each its own
    /// connection and thread).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub clients: usize,
    /// Streaming clients of the watch fan-out.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub watchers: usize,
    /// Changes per second written during the watch fan-out.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub watch_rate: u32,
    /// Length of each measurement.
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub duration: HumanDuration,
    /// Value length in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    pub value_size: usize,
    /// Distinct keys written and read.
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub keys: usize,
    /// The clonekvd executable [default: the one next to this clonekv].
    #[arg(long, value_name = "PATH")]
    pub clonekvd: Option<PathBuf>,
    /// The etcd executable [default: etcd on the PATH]; without one, only clonekv is
    /// measured (Debian: apt-get install etcd-server).
    #[arg(long, value_name = "PATH")]
    pub etcd: Option<PathBuf>,
    /// Where etcd keeps its data: a new directory is made in DIR and removed at the end
    /// [default: /dev/shm (memory, as clonekv keeps its map), or the scratch directory
    /// on a system without it]. Give a disk directory to measure etcd with its fsyncs.
    #[arg(long, value_name = "DIR")]
    pub etcd_data_dir: Option<PathBuf>,
}

/// The figures of one system.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Figures {
    pub put_per_second: f64,
    pub put_p50_ms: f64,
    pub put_p99_ms: f64,
    pub get_per_second: f64,
    pub get_p50_ms: f64,
    pub get_p99_ms: f64,
    pub watch_events_per_second: f64,
    pub watch_p50_ms: f64,
    pub watch_p99_ms: f64,
    pub watch_delivered: u64,
    pub watch_expected: u64,
}

/// The whole report.
#[derive(Debug, serde::Serialize)]
pub struct HttpReport {
    pub clonekv: Figures,
    pub etcd: Option<Figures>,
    pub etcd_version: Option<String>,
    /// etcd's data directory.
    pub etcd_storage: Option<String>,
    pub problems: Vec<String>,
    pub clients: usize,
    pub watchers: usize,
    pub watch_rate: u32,
    pub value_size: usize,
    pub seconds: f64,
}

/// The two HTTP APIs, as the bench drives them.
#[derive(Clone, Debug)]
enum Target {
    Clonekv { base: String },
    Etcd { base: String },
}

const PREFIX: &str = "/bench/";

/// The next values a watch delivers (one message may carry several); `None` once it
/// has ended.
type ChangeReader = Box<dyn FnMut() -> Option<Vec<Vec<u8>>> + Send>;

/// A row of the table: its name, the figure, and whether higher is better.
type Row = (&'static str, fn(&Figures) -> f64, bool);

impl Target {
    fn put(&self, agent: &ureq::Agent, key: &str, value: &[u8]) -> Result<(), String> {
        let response = match self {
            Target::Clonekv { base } => agent.put(format!("{base}/v1/kv{key}")).send(value),
            Target::Etcd { base } => agent
                .post(format!("{base}/v3/kv/put"))
                .send(json!({"key": b64(key.as_bytes()), "value": b64(value)}).to_string()),
        };
        expect_ok(response).map(|_| ())
    }

    fn get(&self, agent: &ureq::Agent, key: &str) -> Result<(), String> {
        let response = match self {
            Target::Clonekv { base } => agent.get(format!("{base}/v1/kv{key}")).call(),
            // A serializable read is served by the member from its own store, as the
            // gateway serves reads from its replica.
            Target::Etcd { base } => agent
                .post(format!("{base}/v3/kv/range"))
                .send(json!({"key": b64(key.as_bytes()), "serializable": true}).to_string()),
        };
        let body = expect_ok(response)?;
        if body.is_empty() {
            return Err("empty answer".into());
        }
        Ok(())
    }

    /// Opens a watch on [`PREFIX`]; the reader yields the values of changes.
    fn watch(&self) -> Result<ChangeReader, String> {
        let agent = agent(None);
        match self {
            Target::Clonekv { base } => {
                let response = agent
                    .get(format!("{base}/v1/watch?prefix={PREFIX}"))
                    .call()
                    .map_err(|error| error.to_string())?;
                let mut lines = BufReader::new(response.into_body().into_reader()).lines();
                Ok(Box::new(move || loop {
                    let line = lines.next()?.ok()?;
                    if let Some(data) = line.strip_prefix("data: ") {
                        let data: Value = serde_json::from_str(data).ok()?;
                        if let Some(value) = data["value"].as_str() {
                            return Some(vec![value.as_bytes().to_vec()]);
                        }
                    }
                }))
            }
            Target::Etcd { base } => {
                let mut end = PREFIX.as_bytes().to_vec();
                if let Some(last) = end.last_mut() {
                    *last += 1;
                }
                let request = json!({"create_request": {
                    "key": b64(PREFIX.as_bytes()),
                    "range_end": b64(&end),
                }});
                let response = agent
                    .post(format!("{base}/v3/watch"))
                    .send(request.to_string())
                    .map_err(|error| error.to_string())?;
                let mut reader = BufReader::new(response.into_body().into_reader());
                Ok(Box::new(move || loop {
                    // grpc-gateway streams one JSON object per message.
                    let message = read_json_object(&mut reader)?;
                    let values: Vec<Vec<u8>> = message["result"]["events"]
                        .as_array()
                        .map(|events| {
                            events
                                .iter()
                                .filter_map(|event| event["kv"]["value"].as_str())
                                .filter_map(|value| {
                                    base64::engine::general_purpose::STANDARD.decode(value).ok()
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    if !values.is_empty() {
                        return Some(values);
                    }
                }))
            }
        }
    }
}

/// Reads one JSON object of a stream of concatenated objects (newlines or not).
fn read_json_object(reader: &mut impl BufRead) -> Option<Value> {
    let mut text = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut byte = [0u8; 1];
    loop {
        reader.read_exact(&mut byte).ok()?;
        let c = byte[0];
        if depth == 0 && c != b'{' {
            continue;
        }
        text.push(c);
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return serde_json::from_slice(&text).ok();
                }
            }
            _ => {}
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout)
        .build()
        .into()
}

fn expect_ok(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Vec<u8>, String> {
    let mut response = response.map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_vec()
        .map_err(|error| error.to_string())?;
    if status != 200 {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(body)
}

/// Latencies in microseconds, 1 µs to 100 s, 3 significant digits.
fn histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .map_err(|error| BenchError::new(format!("cannot make a histogram: {error}")))
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1_000.0
}

/// `clients` threads run `operation` back to back for `duration`; the rate and the
/// latency histogram of the operations that succeeded.
fn closed_loop(
    clients: usize,
    duration: Duration,
    operation: impl Fn(&ureq::Agent, usize, u64) -> Result<(), String> + Send + Sync + 'static,
) -> Result<(f64, Histogram<u64>), BenchError> {
    let operation = Arc::new(operation);
    let start = Arc::new(Barrier::new(clients + 1));
    let mut threads = Vec::new();
    for client in 0..clients {
        let operation = Arc::clone(&operation);
        let start = Arc::clone(&start);
        let mut latencies = histogram()?;
        threads.push(std::thread::spawn(move || {
            let agent = agent(Some(Duration::from_secs(30)));
            start.wait();
            let began = Instant::now();
            let mut n = 0u64;
            while began.elapsed() < duration {
                let sent = Instant::now();
                operation(&agent, client, n)?;
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = latencies.record(micros.max(1));
                n += 1;
            }
            Ok::<_, String>(latencies)
        }));
    }
    start.wait();
    let began = Instant::now();
    let mut all = histogram()?;
    for thread in threads {
        let latencies = thread
            .join()
            .map_err(|_| BenchError::new("a client thread panicked"))?
            .map_err(BenchError::new)?;
        let _ = all.add(&latencies);
    }
    let rate = all.len() as f64 / began.elapsed().as_secs_f64();
    Ok((rate, all))
}

fn measure(target: &Target, args: &HttpBenchArgs) -> Result<Figures, BenchError> {
    let duration = args.duration.get();
    let keys = args.keys.max(1);
    let value = vec![b'v'; args.value_size.max(1)];
    let key = move |client: usize, n: u64| {
        let index = (client as u64 * 7_919 + n) % keys as u64;
        format!("{PREFIX}k{index:08}")
    };
    // Every key exists before the reads.
    let writer = target.clone();
    let filler = agent(Some(Duration::from_secs(30)));
    for index in 0..keys {
        writer
            .put(&filler, &format!("{PREFIX}k{index:08}"), &value)
            .map_err(|error| BenchError::new(format!("filling the keys: {error}")))?;
    }
    let put_target = target.clone();
    let put_value = value.clone();
    let (put_rate, puts) = closed_loop(args.clients, duration, move |agent, client, n| {
        put_target.put(agent, &key(client, n), &put_value)
    })?;
    let get_target = target.clone();
    let (get_rate, gets) = closed_loop(args.clients, duration, move |agent, client, n| {
        get_target.get(agent, &key(client, n))
    })?;
    let watch = fan_out(target, args)?;
    Ok(Figures {
        put_per_second: put_rate,
        put_p50_ms: ms(&puts, 0.5),
        put_p99_ms: ms(&puts, 0.99),
        get_per_second: get_rate,
        get_p50_ms: ms(&gets, 0.5),
        get_p99_ms: ms(&gets, 0.99),
        ..watch
    })
}

/// `watchers` streams on the prefix while one writer changes a key `watch_rate` times
/// a second; each value carries its send time, so every delivery is timed.
fn fan_out(target: &Target, args: &HttpBenchArgs) -> Result<Figures, BenchError> {
    let clock = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..args.watchers {
        let mut next = target
            .watch()
            .map_err(|error| BenchError::new(format!("opening a watch: {error}")))?;
        let delivered = Arc::clone(&delivered);
        let stop = Arc::clone(&stop);
        let mut latencies = histogram()?;
        readers.push(std::thread::spawn(move || {
            while let Some(values) = next() {
                let now = u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX);
                for value in values {
                    let sent = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|text| text.split(':').nth(1))
                        .and_then(|micros| micros.parse::<u64>().ok());
                    if let Some(sent) = sent {
                        let _ = latencies.record(now.saturating_sub(sent).max(1));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            latencies
        }));
    }
    // Let every watch take its start before the first change.
    std::thread::sleep(Duration::from_millis(500));
    // The same offered load for every system: `clients` writers share the rate, so a
    // slow commit delays one writer, not the schedule.
    let writers = args.clients.max(1);
    let interval = Duration::from_secs_f64(writers as f64 / f64::from(args.watch_rate.max(1)));
    let duration = args.duration.get();
    let began = Instant::now();
    let mut threads = Vec::new();
    for writer_index in 0..writers {
        let target = target.clone();
        let filler = "x".repeat(args.value_size.saturating_sub(24));
        threads.push(std::thread::spawn(move || {
            let writer = agent(Some(Duration::from_secs(30)));
            let mut written = 0u64;
            // Staggered so that the writers' changes interleave evenly.
            let offset = interval.mul_f64(writer_index as f64 / writers as f64);
            while began.elapsed() < duration {
                let due = offset + interval.mul_f64(written as f64);
                if let Some(wait) = due.checked_sub(began.elapsed()) {
                    std::thread::sleep(wait);
                }
                let sent = u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX);
                let value = format!("t:{sent}:{filler}");
                let key = format!("{PREFIX}w{writer_index:02}-{:03}", written % 100);
                target.put(&writer, &key, value.as_bytes())?;
                written += 1;
            }
            Ok::<u64, String>(written)
        }));
    }
    let mut written = 0;
    for thread in threads {
        written += thread
            .join()
            .map_err(|_| BenchError::new("a writer thread panicked"))?
            .map_err(|error| BenchError::new(format!("writing: {error}")))?;
    }
    let writer = agent(Some(Duration::from_secs(30)));
    let expected = written * args.watchers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // One more change wakes every reader so it sees the stop.
    let _ = target.put(&writer, &format!("{PREFIX}w-stop"), b"t:0:stop");
    let mut all = histogram()?;
    for reader in readers {
        if let Ok(latencies) = reader.join() {
            let _ = all.add(&latencies);
        }
    }
    let delivered = delivered.load(Ordering::Relaxed).min(expected);
    Ok(Figures {
        watch_events_per_second: delivered as f64 / elapsed,
        watch_p50_ms: ms(&all, 0.5),
        watch_p99_ms: ms(&all, 0.99),
        watch_delivered: delivered,
        watch_expected: expected,
        ..Figures::default()
    })
}

/// Waits until `url` answers 200 to a GET (or a POST of `{}` for etcd), at most 20 s.
fn wait_http(url: &str, post: bool, process: &mut Process) -> Result<(), BenchError> {
    let probe = agent(Some(Duration::from_secs(2)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        process.check_running()?;
        let answer = if post {
            probe.post(url).send("{}")
        } else {
            probe.get(url).call()
        };
        if answer.is_ok_and(|response| response.status() == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::new(format!("{url} did not answer within 20 s")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

/// Runs the whole comparison.
pub fn run(args: &HttpBenchArgs, bin_dir: Option<PathBuf>) -> Result<HttpReport, BenchError> {
    let began = Instant::now();
    let scratch = Scratch::new()?;
    let mut ports = Ports::allocate(16)?;
    let clonekvd = args
        .clonekvd
        .clone()
        .or_else(|| bin_dir.map(|dir| dir.join("clonekvd")))
        .ok_or_else(|| BenchError::new("cannot find clonekvd; pass --clonekvd"))?;
    let primary = ServerPorts::take(&mut ports)?;
    let backup = ServerPorts::take(&mut ports)?;
    let http_primary = ports.take(1)?;
    let http_backup = ports.take(1)?;
    let mut processes = Vec::new();
    for (name, me, peer, is_backup, http) in [
        ("primary", primary, backup, false, http_primary),
        ("backup", backup, primary, true, http_backup),
    ] {
        let mut server = server_args(me, peer, is_backup, Timing::DEFAULT, 100_000);
        server.push("--http".into());
        server.push(format!("127.0.0.1:{http}"));
        processes.push(Process::spawn(name, &clonekvd, &server, &scratch.path)?);
    }
    let base = format!("http://127.0.0.1:{http_primary}");
    for (process, port) in processes.iter_mut().zip([http_primary, http_backup]) {
        wait_http(&format!("http://127.0.0.1:{port}/healthz"), false, process)?;
    }
    let clonekv = measure(&Target::Clonekv { base }, args)?;
    drop(processes);

    let mut problems = Vec::new();
    let mut etcd_version = None;
    let mut etcd_storage = None;
    let etcd = match args.etcd.clone().or_else(|| find_on_path("etcd")) {
        None => {
            problems
                .push("etcd: no etcd executable (install etcd-server, or pass --etcd)".to_string());
            None
        }
        Some(program) => {
            etcd_version = version_of(&program);
            let client = ports.take(1)?;
            let peer = ports.take(1)?;
            // A new directory, removed when `owned` is dropped at the end of this arm.
            let parent = args
                .etcd_data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/dev/shm"));
            let owned = tempfile::Builder::new()
                .prefix("clonekv-bench-etcd-")
                .tempdir_in(&parent);
            let owned = match (owned, &args.etcd_data_dir) {
                (Ok(owned), _) => Some(owned),
                (Err(error), Some(dir)) => {
                    return Err(BenchError::new(format!(
                        "cannot create a directory in {}: {error}",
                        dir.display()
                    )))
                }
                // No /dev/shm: the scratch directory.
                (Err(_), None) => None,
            };
            let data = match &owned {
                Some(owned) => owned.path().join("data"),
                None => scratch.path.join("etcd-data"),
            };
            etcd_storage = Some(data.display().to_string());
            let etcd_args: Vec<String> = [
                "--name",
                "bench",
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("bench=http://127.0.0.1:{peer}"),
                "--log-level",
                "warn",
            ]
            .iter()
            .map(|arg| arg.to_string())
            .collect();
            let mut process = Process::spawn("etcd", &program, &etcd_args, &scratch.path)?;
            let base = format!("http://127.0.0.1:{client}");
            wait_http(&format!("{base}/v3/maintenance/status"), true, &mut process)?;
            let figures = measure(&Target::Etcd { base }, args);
            drop(process);
            match figures {
                Ok(figures) => Some(figures),
                Err(error) => {
                    problems.push(format!("etcd: {error}"));
                    None
                }
            }
        }
    };
    Ok(HttpReport {
        clonekv,
        etcd,
        etcd_version,
        etcd_storage,
        problems,
        clients: args.clients,
        watchers: args.watchers,
        watch_rate: args.watch_rate,
        value_size: args.value_size,
        seconds: began.elapsed().as_secs_f64(),
    })
}

fn version_of(program: &Path) -> Option<String> {
    let output = std::process::Command::new(program)
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .map(|line| line.trim().to_string())
}

/// The report as a table: each figure for clonekv and etcd, and their ratio (above 1:
/// clonekv ahead).
pub fn render(report: &HttpReport) -> String {
    let rows: [Row; 9] = [
        ("PUT+commit /s", |f| f.put_per_second, true),
        ("PUT p50 ms", |f| f.put_p50_ms, false),
        ("PUT p99 ms", |f| f.put_p99_ms, false),
        ("GET /s", |f| f.get_per_second, true),
        ("GET p50 ms", |f| f.get_p50_ms, false),
        ("GET p99 ms", |f| f.get_p99_ms, false),
        (
            "watch events delivered /s",
            |f| f.watch_events_per_second,
            true,
        ),
        ("watch delivery p50 ms", |f| f.watch_p50_ms, false),
        ("watch delivery p99 ms", |f| f.watch_p99_ms, false),
    ];
    let format = |value: f64| {
        if value >= 100.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.2}")
        }
    };
    let lines = rows.iter().map(|(name, figure, higher_is_better)| {
        let ours = figure(&report.clonekv);
        let theirs = report.etcd.as_ref().map(figure);
        let ratio = theirs.map_or("-".to_string(), |theirs| {
            let ratio = if *higher_is_better {
                ours / theirs
            } else {
                theirs / ours
            };
            format!("{ratio:.1}x")
        });
        vec![
            name.to_string(),
            format(ours),
            theirs.map_or("-".to_string(), format),
            ratio,
        ]
    });
    let mut out = format!(
        "clonekv HTTP gateway vs etcd v3 JSON gateway ({}): {} clients, {} watchers at {} changes/s, {}-byte values\n\n",
        report.etcd_version.as_deref().unwrap_or("etcd not measured"),
        report.clients,
        report.watchers,
        report.watch_rate,
        report.value_size
    );
    out.push_str(&table(
        &["figure", "clonekv", "etcd", "clonekv ahead by"],
        lines,
    ));
    out.push('\n');
    let delivered = |figures: &Figures| {
        format!(
            "{} of {} deliveries",
            figures.watch_delivered, figures.watch_expected
        )
    };
    out.push_str(&format!(
        "\n  watch: clonekv {}",
        delivered(&report.clonekv)
    ));
    if let Some(etcd) = &report.etcd {
        out.push_str(&format!(", etcd {}", delivered(etcd)));
    }
    out.push('\n');
    if let Some(storage) = &report.etcd_storage {
        out.push_str(&format!("  etcd data directory: {storage}\n"));
    }
    for problem in &report.problems {
        out.push_str(&format!("\nnot measured: {problem}\n"));
    }
    out.push_str(&format!("\n({:.0} s)\n", report.seconds));
    out
}
