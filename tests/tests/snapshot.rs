//! A snapshot far larger than the ROUTER's high-water mark (1000) arrives complete,
//! while another client that requested one and does not read does not hold it up; when
//! that client reads at last, its paused stream resumes and delivers everything.

use std::time::{Duration, Instant};

use clonekv_tests::{Cluster, Role, PATIENCE};
use clonekv_zmq::client::Event;

const KEYS: usize = 200_000;

fn key(n: usize) -> String {
    format!("/big/{n:06}")
}

fn value(n: usize) -> String {
    format!("value-{n}")
}

#[test]
fn a_200_000_key_snapshot_arrives_complete_and_a_stalled_client_neither_blocks_it_nor_loses_anything(
) {
    // The stalled client below reads its snapshot only at the end; the default stall
    // timeout (30 s) could close its stream first on a slow machine.
    let mut cluster =
        Cluster::new("snapshot").with_daemon_args(&["--snapshot-stall-timeout", "10m"]);
    cluster.start(Role::Primary);

    let started = Instant::now();
    let writer = cluster
        .client_of(Role::Primary)
        .subtree("/big/")
        .connect()
        .expect("connect writer");
    writer.wait_synced(PATIENCE).expect("lone primary serves");
    for n in 0..KEYS {
        // Every so often wait for the commit, so the writer never outruns the
        // high-water marks between it and the server (PUB drops past them).
        if n % 5_000 == 4_999 {
            writer
                .set_confirmed(key(n), value(n), None, PATIENCE)
                .expect("commit");
        } else {
            writer.set(key(n), value(n), None).expect("set");
        }
    }
    let last = writer
        .set_confirmed("/big/zz-last", "end", None, PATIENCE)
        .expect("final commit");
    assert_eq!(last, KEYS as i64 + 1, "every update got a sequence");
    eprintln!("wrote {KEYS} keys in {:?}", started.elapsed());

    // A client that asks for the whole subtree and never reads: its stream must pause
    // at its pipe's high-water mark without blocking anyone else.
    let context = zmq::Context::new();
    let stalled = context.socket(zmq::DEALER).expect("dealer");
    stalled.set_rcvhwm(10).expect("rcvhwm");
    stalled.set_linger(0).expect("linger");
    stalled
        .connect(&cluster.endpoint(Role::Primary))
        .expect("connect stalled dealer");
    stalled
        .send_multipart([&b"ICANHAZ?"[..], b"/big/"], 0)
        .expect("send ICANHAZ?");
    // Wait until its stream is open and blocked: its first reply is readable.
    assert!(
        stalled
            .poll(zmq::POLLIN, PATIENCE.as_millis() as i64)
            .expect("poll")
            > 0,
        "the stalled client got no reply at all"
    );

    let started = Instant::now();
    let reader = cluster
        .client_of(Role::Primary)
        .subtree("/big/")
        // Room for one event per key and the Synced event, so that none is dropped.
        .event_capacity(KEYS + 16)
        .connect()
        .expect("connect reader");
    let events = reader.subscribe();
    let status = reader
        .wait_synced(Duration::from_secs(300))
        .expect("the big snapshot arrives");
    eprintln!("synced {} keys in {:?}", status.keys, started.elapsed());
    assert_eq!(status.keys, KEYS + 1);
    assert!(status.sequence >= last);

    let entries = reader.dump("/big/").expect("dump");
    assert_eq!(entries.len(), KEYS + 1);
    for (n, (stored_key, entry)) in entries.iter().take(KEYS).enumerate() {
        assert_eq!(stored_key, key(n).as_bytes());
        assert_eq!(entry.value, value(n).as_bytes());
    }
    let synced = loop {
        match events.recv_timeout(PATIENCE).expect("a Synced event") {
            Event::Synced { keys, .. } => break keys,
            Event::Lagged { missed } => panic!("{missed} events were dropped"),
            _ => continue,
        }
    };
    assert_eq!(synced, KEYS + 1);

    // The stalled client's stream was paused, not dropped: now that it reads, the rest
    // arrives, every entry in key order, then the KTHXBAI.
    let mut received = 0;
    loop {
        let frames = stalled.recv_multipart(0).expect("stalled client reads");
        assert_eq!(frames.len(), 5, "a KVSYNC or KTHXBAI");
        if frames[0] == b"KTHXBAI" {
            break;
        }
        if received < KEYS {
            assert_eq!(frames[0], key(received).as_bytes(), "entry {received}");
            assert_eq!(frames[4], value(received).as_bytes(), "entry {received}");
        }
        received += 1;
    }
    assert_eq!(
        received,
        KEYS + 1,
        "the paused stream resumed and lost nothing"
    );
    assert!(cluster.daemon(Role::Primary).is_running());
    reader.shutdown().expect("reader shutdown");
    writer.shutdown().expect("writer shutdown");
}
