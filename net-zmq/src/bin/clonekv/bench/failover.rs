//! Failover as a user meets it. A pair runs under the timings given; a writer sets a key
//! every 2 ms through the client library (to both servers, as every client does) and a
//! watcher follows the map. The active is killed with SIGKILL, and from that instant the
//! clock runs for:
//!
//! - the anchor: a raw DEALER asking the backup for an empty snapshot every 10 ms. Its
//!   first answer is when Binary Star let the backup take over (the peer silent for its
//!   expiry, and a request): no client can be served sooner;
//! - the watcher (client library): when it moved to the backup, when the backup's
//!   snapshot re-synced it (it can read), and when the first update the backup published
//!   reached it (writes go through);
//! - `clonekv get KEY`, the CLI itself, started right after the kill with the same
//!   servers and client timing: until it exits, having printed the value.
//!
//! The kill is placed at a chosen phase of the active's heartbeat (a delay after one of
//! its HUGZ, which leave on the same tick as its Binary Star state message): right
//! after one, the backup heard its peer last just before the kill and waits a whole
//! peer expiry, the worst case; later in the beat, less.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, Event, Events};
use clonekv_zmq::core::kvmsg::{SnapshotRequest, HUGZ, KTHXBAI};

use super::procs::Process;
use super::BenchError;

/// What one failover took, in seconds from the SIGKILL.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverResult {
    /// Delay of the kill after the active's latest heartbeat.
    pub kill_phase_ms: u64,
    /// The anchor: the backup first answered a raw snapshot request (Binary Star's
    /// takeover). `None` if it never did within the patience.
    pub backup_answers_s: Option<f64>,
    /// The watcher moved to the backup.
    pub server_changed_s: f64,
    /// The backup's snapshot arrived at the watcher: it can read.
    pub synced_s: f64,
    /// The first update published by the backup arrived at the watcher: the figure.
    pub first_update_s: f64,
    /// `clonekv get` started right after the kill exited with the value.
    pub cli_get_s: Option<f64>,
    /// Why the `clonekv get` did not count, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cli_get_failure: Option<String>,
}

/// One failover to measure.
pub struct Setup<'a> {
    /// The primary's and the backup's base endpoints.
    pub servers: [String; 2],
    /// The clients' server ttl (also given to the CLI).
    pub server_ttl: Duration,
    /// Pass `server_ttl` to the CLI (`--server-ttl`); `false` leaves its default.
    pub cli_server_ttl: bool,
    /// The subtree the clients follow; every key written is under it.
    pub subtree: String,
    /// Delay of the kill after a HUGZ of the active.
    pub kill_phase: Duration,
    /// The `clonekv` executable for the one-shot `get`.
    pub clonekv: &'a Path,
    pub patience: Duration,
}

/// Value of the key the CLI reads after the kill.
const CLI_VALUE: &str = "written-before-the-kill";

/// Runs one failover: `primary` must be active with the backup following it.
pub fn measure(primary: &mut Process, setup: &Setup) -> Result<FailoverResult, BenchError> {
    let client = || {
        let mut builder = Client::builder()
            .subtree(setup.subtree.as_str())
            .server_ttl(setup.server_ttl);
        for server in &setup.servers {
            builder = builder.server(server.clone());
        }
        builder
            .connect()
            .map_err(|error| BenchError::new(format!("client: {error}")))
    };
    let watcher = client()?;
    let events = watcher.subscribe();
    watcher
        .wait_synced(setup.patience)
        .map_err(|error| BenchError::new(format!("the watcher did not sync: {error}")))?;
    let writer = client()?;
    writer
        .wait_synced(setup.patience)
        .map_err(|error| BenchError::new(format!("the writer did not sync: {error}")))?;
    let cli_key = format!("{}cli", setup.subtree);
    let cli_key = cli_key.as_str();
    writer
        .set_confirmed(cli_key, CLI_VALUE, None, setup.patience)
        .map_err(|error| BenchError::new(format!("the CLI's key was not committed: {error}")))?;
    // Connected before the kill, so that neither has a connection to make after it.
    let context = zmq::Context::new();
    let heartbeats = heartbeat_subscriber(&context, &plus_one(&setup.servers[0])?)?;
    let mut probe = Some(dealer(&context, &setup.servers[1])?);
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        // One update every 2 ms, to both servers (the client library sends to each).
        let writing = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{}{}", setup.subtree, n % 1_000);
                let _ = writer.set(key, n.to_string(), None);
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
        });
        let result = (|| {
            follow_primary(&events)?;
            // Wait for a fresh heartbeat of the active, then for the phase.
            while read_hugz(&heartbeats, 0)? {}
            if !read_hugz(&heartbeats, 10_000)? {
                return Err(BenchError::new("the active sent no heartbeat"));
            }
            thread::sleep(setup.kill_phase);
            while events.try_recv().is_some() {}
            let killed = Instant::now();
            primary.kill();
            let cli = scope.spawn(move || one_shot_get(setup, cli_key, killed));
            let probe = probe
                .take()
                .ok_or_else(|| BenchError::new("probe used twice"))?;
            let anchor = scope.spawn(move || backup_answers(&probe, killed, setup.patience));
            let watched = watch(&events, killed, setup.patience);
            let anchor = anchor.join().unwrap_or(Ok(None));
            let cli = cli.join().unwrap_or_else(|_| Err("panicked".to_string()));
            let (server_changed, synced, first_update) = watched?;
            let (cli_get_s, cli_get_failure) = match cli {
                Ok(elapsed) => (Some(elapsed.as_secs_f64()), None),
                Err(why) => (None, Some(why)),
            };
            Ok(FailoverResult {
                kill_phase_ms: setup.kill_phase.as_millis() as u64,
                backup_answers_s: anchor?.map(|elapsed| elapsed.as_secs_f64()),
                server_changed_s: server_changed.as_secs_f64(),
                synced_s: synced.as_secs_f64(),
                first_update_s: first_update.as_secs_f64(),
                cli_get_s,
                cli_get_failure,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = writing.join();
        result
    })
}

/// Waits until updates flow to the watcher through the primary.
fn follow_primary(events: &Events) -> Result<(), BenchError> {
    let warm = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < 20 {
        if Instant::now() > warm {
            return Err(BenchError::new(
                "no updates reached the watcher before the kill",
            ));
        }
        if let Ok(Event::Updated { sequence, .. }) = events.recv_timeout(Duration::from_millis(100))
        {
            if sequence > 0 {
                seen += 1;
            }
        }
    }
    Ok(())
}

/// The watcher's moves after the kill: (moved to the backup, re-synced from it, first
/// update the backup published).
fn watch(
    events: &Events,
    killed: Instant,
    patience: Duration,
) -> Result<(Duration, Duration, Duration), BenchError> {
    let mut server_changed = None;
    let mut synced: Option<(Duration, i64)> = None;
    while killed.elapsed() < patience {
        let Ok(event) = events.recv_timeout(Duration::from_millis(50)) else {
            continue;
        };
        match event {
            Event::ServerChanged { to: 1, .. } => {
                server_changed.get_or_insert(killed.elapsed());
            }
            Event::Synced {
                server: 1,
                sequence,
                ..
            } => {
                synced.get_or_insert((killed.elapsed(), sequence));
            }
            Event::Updated { sequence, .. } => {
                if let Some((synced_after, snapshot_sequence)) = synced {
                    if sequence > snapshot_sequence {
                        return Ok((
                            server_changed.unwrap_or(synced_after),
                            synced_after,
                            killed.elapsed(),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Err(BenchError::new(format!(
        "no update through the backup within {patience:?} of the kill"
    )))
}

/// Runs `clonekv get KEY` against the pair, as a user would right after the kill, and
/// times it to its exit; it must print the value written before the kill.
fn one_shot_get(setup: &Setup, key: &str, killed: Instant) -> Result<Duration, String> {
    let mut command = Command::new(setup.clonekv);
    for server in &setup.servers {
        command.arg("--server").arg(server);
    }
    if setup.cli_server_ttl {
        command
            .arg("--server-ttl")
            .arg(format!("{}ms", setup.server_ttl.as_millis()));
    }
    let output = command
        .arg("get")
        .arg(key)
        .env_remove("CLONEKV_SERVERS")
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run {}: {error}", setup.clonekv.display()))?;
    let elapsed = killed.elapsed();
    let printed = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && printed.trim_end() == CLI_VALUE {
        Ok(elapsed)
    } else {
        Err(format!(
            "after {:.2} s it exited with {} and printed {:?} ({})",
            elapsed.as_secs_f64(),
            output.status,
            printed.trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        ))
    }
}

/// The anchor: asks the backup for an empty snapshot every 10 ms until one is answered.
/// A passive drops requests; it takes over at the first one after its peer expired.
fn backup_answers(
    probe: &zmq::Socket,
    killed: Instant,
    patience: Duration,
) -> Result<Option<Duration>, BenchError> {
    let fail = |error: zmq::Error| BenchError::new(format!("probe: {error}"));
    let request = SnapshotRequest::new(HUGZ.to_vec()).encode();
    while killed.elapsed() < patience {
        probe.send_multipart(request.iter(), 0).map_err(fail)?;
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(10) {
            if probe.poll(zmq::POLLIN, 1).map_err(fail)? > 0 {
                let frames = probe.recv_multipart(0).map_err(fail)?;
                if frames.first().map(Vec::as_slice) == Some(KTHXBAI) {
                    return Ok(Some(killed.elapsed()));
                }
            }
        }
    }
    Ok(None)
}

fn dealer(context: &zmq::Context, endpoint: &str) -> Result<zmq::Socket, BenchError> {
    let fail = |error: zmq::Error| BenchError::new(format!("probe to {endpoint}: {error}"));
    let socket = context.socket(zmq::DEALER).map_err(fail)?;
    socket.set_linger(0).map_err(fail)?;
    socket.connect(endpoint).map_err(fail)?;
    Ok(socket)
}

/// A SUB to a server's publisher that receives only its HUGZ.
fn heartbeat_subscriber(context: &zmq::Context, endpoint: &str) -> Result<zmq::Socket, BenchError> {
    let fail = |error: zmq::Error| BenchError::new(format!("heartbeats of {endpoint}: {error}"));
    let socket = context.socket(zmq::SUB).map_err(fail)?;
    socket.set_linger(0).map_err(fail)?;
    socket.set_subscribe(HUGZ).map_err(fail)?;
    socket.connect(endpoint).map_err(fail)?;
    Ok(socket)
}

/// Reads one HUGZ, waiting at most `timeout_ms`; false if none came.
fn read_hugz(socket: &zmq::Socket, timeout_ms: i64) -> Result<bool, BenchError> {
    let fail = |error: zmq::Error| BenchError::new(format!("heartbeats: {error}"));
    if socket.poll(zmq::POLLIN, timeout_ms).map_err(fail)? == 0 {
        return Ok(false);
    }
    socket.recv_multipart(0).map_err(fail)?;
    Ok(true)
}

/// `tcp://host:P` → `tcp://host:P+1`, the publisher.
fn plus_one(endpoint: &str) -> Result<String, BenchError> {
    super::plus(endpoint, 1)
}
