//! Throughput and memory of the clone server state machine (no sockets).
//!
//! 1. Applies 1 M KVSETs (16-byte keys, 100-byte bodies, scattered key order) through an
//!    active server, draining every output as a host would.
//! 2. Streams a snapshot of the resulting 1 M-key map through `poll_snapshot`, while a
//!    trickle of updates keeps arriving (they must not disturb the open snapshot).
//! 3. Follows 1 M updates as a passive backup does: each client copy on the collector,
//!    then, 1 000 updates later, the active's KVPUB of it (pending list in and out, then
//!    the map).
//!
//! Prints operations per second and resident memory per key (VmRSS / VmHWM from
//! /proc/self/status, Linux only). Run with `cargo bench -p clonekv-core --bench server`.

use clonekv_core::kvmsg::{BstarState, KvMsg, SnapshotRequest, Uuid};
use clonekv_core::server::{Config, HashKey, Output, Server};
use clonekv_core::time::{EpochMillis, Instant};

const KEYS: u64 = 1_000_000;
const BODY_LEN: usize = 100;

/// The host's clock. Benches measure real time; core itself never reads a clock.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> std::time::Instant {
    std::time::Instant::now()
}

/// (VmRSS, VmHWM) in bytes, if the platform reports them.
fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The i-th key of a scattered order: 16 bytes, `key:` and 12 digits.
fn key(i: u64) -> Vec<u8> {
    // 7 777 777 is coprime with 10^6, so this visits every index once.
    format!("key:{:012}", (i * 7_777_777) % KEYS).into_bytes()
}

fn kvset_frames(i: u64) -> [Vec<u8>; 5] {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&i.to_be_bytes());
    KvMsg::kvset(key(i), vec![b'v'; BODY_LEN], Uuid::from_bytes(uuid)).encode()
}

/// Phase 3: a passive server that holds each client copy until the active's echo.
#[inline(never)]
fn follow_as_passive(wall: EpochMillis) {
    let now = Instant::ZERO;
    let mut backup = Server::new(now, wall, Config::backup(), HashKey::from_bytes([2; 16]))
        .expect("default config");
    backup.handle_peer_state(now, wall, &[BstarState::Active.encode()]);
    backup.handle_peer_update(now, wall, &KvMsg::hugz(0).encode());
    backup.handle_peer_snapshot(now, wall, &KvMsg::kthxbai(0, Vec::new()).encode());
    drain(&mut backup);
    assert!(!backup.is_syncing(), "following the active");
    // Client copies run this far ahead of their echoes, as they do for a backup that
    // receives a burst on its collector while the active's KVPUBs trail behind.
    const IN_FLIGHT: u64 = 1_000;
    let began = wall_clock();
    for i in 0..KEYS + IN_FLIGHT {
        if i < KEYS {
            backup.handle_collected(now, wall, &kvset_frames(i));
        }
        if let Some(echoed) = i.checked_sub(IN_FLIGHT) {
            let mut echo = kvset_frames(echoed);
            echo[1] = (echoed as i64 + 1).to_be_bytes().to_vec();
            backup.handle_peer_update(now, wall, &echo);
        }
        drain(&mut backup);
    }
    let elapsed = began.elapsed();
    assert_eq!(backup.sequence() as u64, KEYS);
    assert_eq!(backup.pending_len(), 0, "every copy matched by its echo");
    println!(
        "follow  {KEYS} client copies + echoes ({IN_FLIGHT} in flight) as a passive: {:.2} s, {:.0} updates/s",
        elapsed.as_secs_f64(),
        KEYS as f64 / elapsed.as_secs_f64(),
    );
}

fn drain(server: &mut Server) -> u64 {
    let mut published = 0;
    while let Some(output) = server.poll_output() {
        if let Output::Publish(frames) = output {
            published += frames.iter().map(|frame| frame.len() as u64).sum::<u64>();
        }
    }
    published
}

fn main() {
    let start_memory = memory();
    let now = Instant::ZERO;
    let wall = EpochMillis(1_795_268_600_000);
    let mut server = Server::new(now, wall, Config::primary(), HashKey::from_bytes([1; 16]))
        .expect("default config");
    server.handle_peer_state(now, wall, &[BstarState::Backup.encode()]);
    assert_eq!(server.state(), BstarState::Active);
    drain(&mut server);

    // 1. One million KVSETs.
    let began = wall_clock();
    let mut published_bytes = 0;
    for i in 0..KEYS {
        server.handle_collected(now, wall, &kvset_frames(i));
        published_bytes += drain(&mut server);
    }
    let elapsed = began.elapsed();
    assert_eq!(server.len() as u64, KEYS);
    assert_eq!(server.sequence() as u64, KEYS);
    println!(
        "apply   {KEYS} KVSETs (16 B key, {BODY_LEN} B body): {:.2} s, {:.0} KVSET/s, {:.0} MiB published",
        elapsed.as_secs_f64(),
        KEYS as f64 / elapsed.as_secs_f64(),
        mib(published_bytes),
    );
    let loaded_memory = memory();
    if let (Some((rss0, _)), Some((rss, hwm))) = (start_memory, loaded_memory) {
        println!(
            "memory  after load: VmRSS {:.0} MiB, VmHWM {:.0} MiB, {:.0} B/key (RSS growth / keys)",
            mib(rss),
            mib(hwm),
            rss.saturating_sub(rss0) as f64 / KEYS as f64,
        );
    }

    // 2. A snapshot of the whole map, streamed while updates keep arriving.
    let began = wall_clock();
    let request = SnapshotRequest::new(Vec::new()).encode();
    server.handle_snapshot_request(now, wall, b"client", &request);
    drain(&mut server);
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let mut last_sequence = 0;
    let mut concurrent = 0u64;
    while let Some(frames) = server.poll_snapshot(now, b"client") {
        messages += 1;
        bytes += frames.iter().map(|frame| frame.len() as u64).sum::<u64>();
        if messages.is_multiple_of(1_000) {
            // A live update lands in the map; the open snapshot keeps its point in time.
            server.handle_collected(now, wall, &kvset_frames(KEYS - 1 - concurrent));
            drain(&mut server);
            concurrent += 1;
        }
        last_sequence = i64::from_be_bytes(frames[1].as_bytes().try_into().expect("8 bytes"));
    }
    let elapsed = began.elapsed();
    assert_eq!(messages, KEYS + 1, "every key plus KTHXBAI");
    assert_eq!(
        last_sequence as u64, KEYS,
        "KTHXBAI carries the sequence at the request"
    );
    println!(
        "stream  {KEYS}-key snapshot: {:.2} s, {:.0} msg/s, {:.0} MiB of frames, {concurrent} updates applied meanwhile",
        elapsed.as_secs_f64(),
        messages as f64 / elapsed.as_secs_f64(),
        mib(bytes),
    );
    if let (Some((rss_loaded, _)), Some((rss, hwm))) = (loaded_memory, memory()) {
        println!(
            "memory  after snapshot: VmRSS {:.0} MiB (+{:.0} MiB over the loaded map), VmHWM {:.0} MiB, peak {:.0} B/key",
            mib(rss),
            mib(rss.saturating_sub(rss_loaded)),
            mib(hwm),
            hwm as f64 / KEYS as f64,
        );
    }
    drop(server);
    follow_as_passive(wall);
}
