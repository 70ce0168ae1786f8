//! A fixed workload for counting a running `clonekvd`'s instructions (docs/PERFORMANCE.md,
//! "Counting instructions"): closed loop, so the count does not depend on timing.
//!
//! ```sh
//! valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=d.cg \
//!     target/release/clonekvd --bind-host 127.0.0.1 --port 31000 --state-port 31003 \
//!     --peer-host 127.0.0.1 --peer-port 31010 --peer-state-port 31013 &
//! cargo run --release -p clonekv-zmq --example profile_driver -- 31000 $!
//! ```
//!
//! Phases, each followed by `callgrind_control -d PID` when a PID is given: (1) `KEYS`
//! KVSETs of new keys (16-byte keys in a scattered order, 100-byte bodies) with at most
//! `IN_FLIGHT` unconfirmed; (2) `KEYS` more that replace existing keys; (3) a snapshot
//! of the whole map (`KEYS` + 1 entries with the warm-up key).

use std::process::Command;
use std::time::{Duration, Instant};

use clonekv_core::kvmsg::{KvMsg, SnapshotRequest, Uuid};

const KEYS: u64 = 50_000;
const IN_FLIGHT: u64 = 2_000;
const BODY_LEN: usize = 100;

type Error = Box<dyn std::error::Error>;

fn key(i: u64) -> Vec<u8> {
    // 7 777 777 is coprime with KEYS, so this visits every index once.
    format!("key:{:012}", (i * 7_777_777) % KEYS).into_bytes()
}

fn kvset(i: u64, generation: u64) -> [Vec<u8>; 5] {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&i.to_be_bytes());
    uuid[8..].copy_from_slice(&generation.to_be_bytes());
    KvMsg::kvset(key(i), vec![b'v'; BODY_LEN], Uuid::from_bytes(uuid)).encode()
}

fn dump(pid: Option<&str>, phase: &str) -> Result<(), Error> {
    eprintln!("phase {phase} done");
    if let Some(pid) = pid {
        Command::new("callgrind_control")
            .args(["-d", phase, pid])
            .status()?;
    }
    Ok(())
}

/// Publishes `KEYS` updates of `generation`, never more than `IN_FLIGHT` ahead of the
/// subscriber, and waits for the last.
fn load(pub_: &zmq::Socket, sub: &zmq::Socket, generation: u64) -> Result<(), Error> {
    let (mut sent, mut received) = (0u64, 0u64);
    while received < KEYS {
        while sent < KEYS && sent - received < IN_FLIGHT {
            pub_.send_multipart(kvset(sent, generation), 0)?;
            sent += 1;
        }
        let frames = sub.recv_multipart(0)?;
        if frames.first().map(Vec::as_slice) != Some(b"HUGZ") {
            received += 1;
        }
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).map_or(Ok(31000), |port| port.parse())?;
    let pid = args.get(2).map(String::as_str);
    let context = zmq::Context::new();
    let endpoint = |offset: u16| format!("tcp://127.0.0.1:{}", port + offset);
    let dealer = context.socket(zmq::DEALER)?;
    dealer.connect(&endpoint(0))?;
    let sub = context.socket(zmq::SUB)?;
    sub.set_subscribe(b"")?;
    sub.set_rcvhwm(0)?;
    sub.connect(&endpoint(1))?;
    let pub_ = context.socket(zmq::PUB)?;
    pub_.set_sndhwm(0)?;
    pub_.connect(&endpoint(2))?;

    // A lone primary becomes active on a client's snapshot request.
    dealer.send_multipart(SnapshotRequest::new(Vec::new()).encode(), 0)?;
    loop {
        let frames = dealer.recv_multipart(0)?;
        if frames.first().map(Vec::as_slice) == Some(b"KTHXBAI") {
            break;
        }
    }
    // Until the warm-up key comes back, both subscriptions may still be in flight.
    sub.set_rcvtimeo(200)?;
    let warm = KvMsg::kvset(
        b"warm".to_vec(),
        b"up".to_vec(),
        Uuid::from_bytes([0xff; 16]),
    );
    'warm: loop {
        pub_.send_multipart(warm.encode(), 0)?;
        let began = Instant::now();
        while began.elapsed() < Duration::from_secs(1) {
            match sub.recv_multipart(0) {
                Ok(frames) if frames.first().map(Vec::as_slice) == Some(b"warm") => break 'warm,
                Ok(_) | Err(zmq::Error::EAGAIN) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    sub.set_rcvtimeo(-1)?;
    // Warm-up copies still in flight.
    std::thread::sleep(Duration::from_millis(500));
    while sub.recv_multipart(zmq::DONTWAIT).is_ok() {}
    dump(pid, "warmup")?;

    load(&pub_, &sub, 1)?;
    dump(pid, "insert")?;
    load(&pub_, &sub, 2)?;
    dump(pid, "replace")?;

    dealer.send_multipart(SnapshotRequest::new(Vec::new()).encode(), 0)?;
    let mut entries = 0u64;
    loop {
        let frames = dealer.recv_multipart(0)?;
        if frames.first().map(Vec::as_slice) == Some(b"KTHXBAI") {
            break;
        }
        entries += 1;
    }
    dump(pid, "snapshot")?;
    eprintln!("snapshot of {entries} entries");
    Ok(())
}
