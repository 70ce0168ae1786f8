//! Memory stays bounded in bytes whatever arrives, and a full map refuses writes loudly.
//!
//! The flood goes at the passive's collector, where every client copy is held until
//! the active's echo: copies the active never sees (sent to the passive only) are never
//! echoed, so they fill the pending list to its byte budget. Then a frame that
//! announces 100 MiB and messages of thousands of frames. The passive's peak resident
//! set (VmHWM in /proc) stays under the README's budget, the pair keeps serving, and
//! the shutdown log counts what was dropped.

use std::time::Duration;

use clonekv_tests::{Cluster, Role, PATIENCE};
use clonekv_zmq::client::ClientError;
use clonekv_zmq::core::client::LostReason;

/// The figure the README's "Memory bounds" table adds up to: whatever arrives, what
/// input fills outside the map stays below it.
const BUDGET_MIB: u64 = 512;

/// Values of 1 MiB sent at the passive.
const FLOOD: u64 = 250;

fn socket(context: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
    let socket = context.socket(kind).expect("socket");
    socket.set_linger(0).expect("linger");
    socket
}

/// Waits for the server's subscription on an XPUB: from then on what it sends arrives.
fn wait_for_subscriber(xpub: &zmq::Socket) {
    let timeout = i64::try_from(PATIENCE.as_millis()).unwrap_or(i64::MAX);
    assert!(
        xpub.poll(zmq::POLLIN, timeout).expect("poll") > 0,
        "the server never subscribed"
    );
    xpub.recv_bytes(0).expect("subscription");
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn kvset(key: &str, uuid: u64, body: &[u8]) -> Vec<Vec<u8>> {
    let mut id = [0x5eu8; 16];
    id[..8].copy_from_slice(&uuid.to_be_bytes());
    vec![
        key.as_bytes().to_vec(),
        0i64.to_be_bytes().to_vec(),
        id.to_vec(),
        Vec::new(),
        body.to_vec(),
    ]
}

/// The count a "inputs dropped since start" or "stopped" log line gives `field`.
fn logged_count(log: &str, needle: &str, field: &str) -> u64 {
    log.lines()
        .filter(|line| line.contains(needle))
        .filter_map(|line| {
            let start = line.find(&format!("{field}="))? + field.len() + 1;
            line[start..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn a_flood_at_the_passive_leaves_its_memory_under_budget_and_the_pair_serving() {
    let mut cluster = Cluster::pair("flood");
    let passive_collector = format!("tcp://127.0.0.1:{}", cluster.base_port(Role::Backup) + 2);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/ok/")
        .connect()
        .expect("connect client");
    client.wait_synced(PATIENCE).expect("the pair serves");
    cluster
        .daemon(Role::Backup)
        .wait_for_log("synced from the active peer");
    let pid = cluster.daemon(Role::Backup).pid();
    let before_kib = status_kib(pid, "VmRSS");

    let context = zmq::Context::new();
    // 250 values of 1 MiB: over twice the pending list's 96 MiB budget. No high-water
    // mark on this side, so that all of it arrives: what the passive does not take yet
    // waits here (its own high-water mark pushes back through TCP).
    let flooder = socket(&context, zmq::XPUB);
    flooder.set_sndhwm(0).expect("hwm");
    flooder
        .connect(&passive_collector)
        .expect("connect to the passive's collector");
    wait_for_subscriber(&flooder);
    let value = vec![b'v'; 1 << 20];
    for n in 0..FLOOD {
        flooder
            .send_multipart(kvset(&format!("/flood/{n}"), n, &value), 0)
            .expect("the passive keeps reading");
    }
    // A frame announcing 100 MiB: libzmq refuses it from its header (ZMQ_MAXMSGSIZE)
    // and drops the connection.
    let announcer = socket(&context, zmq::XPUB);
    announcer.connect(&passive_collector).expect("connect");
    wait_for_subscriber(&announcer);
    announcer
        .send_multipart(kvset("/flood/huge", 1_000, &vec![b'h'; 100 << 20]), 0)
        .expect("send");
    // Messages of thousands of frames: the server keeps seven of each.
    let splitter = socket(&context, zmq::XPUB);
    splitter.connect(&passive_collector).expect("connect");
    wait_for_subscriber(&splitter);
    for round in 0..20u32 {
        let many: Vec<Vec<u8>> = (0..5_000u32)
            .map(|n| (round * 5_000 + n).to_be_bytes().to_vec())
            .collect();
        splitter.send_multipart(many, 0).expect("send");
    }

    let backup = cluster.daemon(Role::Backup);
    backup.wait_for_log("pending list bound reached");
    backup.wait_for_log("expected 5 frames, got 7");
    // Give the flood's tail time to land before the measurement.
    std::thread::sleep(Duration::from_secs(2));
    let peak_kib = status_kib(pid, "VmHWM");
    let now_kib = status_kib(pid, "VmRSS");
    eprintln!(
        "passive RSS before the flood {} MiB, peak {} MiB, now {} MiB",
        before_kib / 1024,
        peak_kib / 1024,
        now_kib / 1024
    );
    assert!(
        peak_kib < BUDGET_MIB * 1024,
        "peak RSS {} MiB past the {BUDGET_MIB} MiB budget",
        peak_kib / 1024
    );
    assert!(
        peak_kib > before_kib + 64 * 1024,
        "the flood reached the pending list (peak {} MiB)",
        peak_kib / 1024
    );

    // The pair still serves, and the passive is still its passive.
    client
        .set_confirmed("/ok/after", "yes", None, PATIENCE)
        .expect("an update commits after the flood");
    let backup = cluster.daemon(Role::Backup);
    assert!(backup.is_running());
    backup.signal("TERM");
    backup.wait_exit();
    let log = backup.log();
    let evicted = logged_count(&log, "stopped", "pending_evicted");
    // The 96 MiB budget holds 95 copies of 1 MiB; the rest made room.
    assert!(
        (FLOOD - 100..=FLOOD - 90).contains(&evicted),
        "the copies past the byte budget evicted, got {evicted}:\n{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("inputs dropped since start")
                && line.contains("source=collector")
                && line.contains("count=20")),
        "the 20 messages of many frames are counted:\n{log}"
    );
    client.shutdown().expect("shutdown");
}

#[test]
fn a_write_past_max_keys_is_refused_and_its_writer_told() {
    let mut cluster = Cluster::new("max-keys").with_daemon_args(&["--max-keys", "2"]);
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/m/")
        .echo_timeout(Duration::from_millis(500))
        .connect()
        .expect("connect client");
    client.wait_synced(PATIENCE).expect("the pair serves");
    client
        .set_confirmed("/m/a", "1", None, PATIENCE)
        .expect("first key");
    client
        .set_confirmed("/m/b", "1", None, PATIENCE)
        .expect("second key");
    let refused = client.set_confirmed("/m/c", "1", None, PATIENCE);
    assert!(
        matches!(refused, Err(ClientError::Lost(LostReason::NotPublished))),
        "{refused:?}"
    );
    let message = refused.map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("--max-keys"), "{message}");
    // The re-sync took the provisional value back out of the client's map.
    clonekv_tests::wait_until("the refused key leaves the client's map", || {
        client.get("/m/c").ok().flatten().is_none()
    });
    client
        .set_confirmed("/m/a", "2", None, PATIENCE)
        .expect("a key already there may change");
    client
        .delete_confirmed("/m/b", PATIENCE)
        .expect("a delete always passes");
    client
        .set_confirmed("/m/c", "1", None, PATIENCE)
        .expect("room again");
    let primary = cluster.daemon(Role::Primary);
    primary.wait_for_log("write refused: the map holds --max-keys keys");
    primary.signal("TERM");
    primary.wait_exit();
    let log = primary.log();
    assert!(
        log.lines()
            .any(|line| line.contains("inputs dropped since start")
                && line.contains("map_full_keys")),
        "{log}"
    );
    client.shutdown().expect("shutdown");
}
