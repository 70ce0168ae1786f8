//! Failover as an application sees it through the client library: a writer keeps
//! setting keys on both servers, a watcher follows the map; the active is killed with
//! SIGKILL and the clock runs until the watcher receives the first update published by
//! the backup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, Event};

use super::procs::Process;
use super::BenchError;

/// What one failover took, from the SIGKILL.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverResult {
    /// Until the watcher gave up on the primary and moved to the backup.
    pub server_changed_s: f64,
    /// Until the backup's snapshot arrived at the watcher.
    pub synced_s: f64,
    /// Until the first update published by the backup arrived: the figure.
    pub first_update_s: f64,
}

/// Runs one failover: `primary` must be active with `backup` following it.
pub fn measure(
    primary: &mut Process,
    servers: &[String; 2],
    server_ttl: Duration,
    patience: Duration,
) -> Result<FailoverResult, BenchError> {
    let client = |subtree: &str| {
        let mut builder = Client::builder().subtree(subtree).server_ttl(server_ttl);
        for server in servers {
            builder = builder.server(server.clone());
        }
        builder
            .connect()
            .map_err(|error| BenchError::new(format!("client: {error}")))
    };
    let watcher = client("failover/")?;
    let events = watcher.subscribe();
    watcher
        .wait_synced(patience)
        .map_err(|error| BenchError::new(format!("the watcher did not sync: {error}")))?;
    let writer = client("failover/")?;
    writer
        .wait_synced(patience)
        .map_err(|error| BenchError::new(format!("the writer did not sync: {error}")))?;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        // One update every 2 ms, to both servers (the client library sends to each).
        let writing = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = writer.set(format!("failover/{}", n % 1_000), n.to_string(), None);
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
        });
        let result = watch(primary, &events, patience);
        stop.store(true, Ordering::Relaxed);
        let _ = writing.join();
        result
    })
}

fn watch(
    primary: &mut Process,
    events: &clonekv_zmq::client::Events,
    patience: Duration,
) -> Result<FailoverResult, BenchError> {
    // Let updates flow through the primary first: the watcher must be following it.
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
    while events.try_recv().is_some() {}
    let killed = Instant::now();
    primary.kill();
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
                        let first_update = killed.elapsed();
                        return Ok(FailoverResult {
                            server_changed_s: server_changed.unwrap_or(synced_after).as_secs_f64(),
                            synced_s: synced_after.as_secs_f64(),
                            first_update_s: first_update.as_secs_f64(),
                        });
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
