//! Malformed frames of every class, sent to every socket of a running server, are
//! dropped, counted and logged, and leave it serving.
//!
//! The test plays the server's peer itself (binding the sockets a backup would), so it
//! can reach the sockets a server only uses towards its peer: the Binary Star state
//! SUB, the SUB following the active's updates, and the DEALER that fetches the active's
//! snapshot (used only while passive, so the fake peer first makes the server passive).

use clonekv_tests::{Cluster, Role, PATIENCE};

type Message = Vec<Vec<u8>>;

fn frames(parts: &[&[u8]]) -> Message {
    parts.iter().map(|part| part.to_vec()).collect()
}

fn sequence(n: i64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

const UUID: &[u8] = &[7; 16];

/// Broken five-frame messages: one per decode error class, then well-formed messages
/// that a server must still refuse, then raw garbage.
fn bad_updates() -> Vec<Message> {
    let seq = sequence(0);
    let long_key = vec![b'k'; 300];
    let big_properties = [b"a=".to_vec(), vec![b'x'; 5_000], b"\n".to_vec()].concat();
    vec![
        frames(&[b"x"]),
        frames(&[b"/k", &seq, UUID, b"", b"v", b"extra"]),
        frames(&[b"", &seq, UUID, b"", b"v"]),
        frames(&[&long_key, &seq, UUID, b"", b"v"]),
        frames(&[b"/k", b"1234567", UUID, b"", b"v"]),
        frames(&[b"/k", &seq, b"short", b"", b"v"]),
        frames(&[b"/k", &seq, UUID, b"no-equals-sign\n", b"v"]),
        frames(&[b"/k", &seq, UUID, &big_properties, b"v"]),
        frames(&[b"/k", &seq, UUID, b"ttl=soon\n", b"v"]),
        frames(&[b"KTHXBAI", &seq, UUID, b"", b"v"]),
        frames(&[b"/k", &seq, b"", b"", b"v"]),
        frames(&[b"ICANHAZ?", b""]),
        frames(&[&[0xff, 0x00, 0xfe]]),
        frames(&[b""]),
    ]
}

/// Broken snapshot requests (ICANHAZ?).
fn bad_requests() -> Vec<Message> {
    vec![
        frames(&[b"ICANHAZ?"]),
        frames(&[b"ICANHAZ?", b"", b"extra"]),
        frames(&[b"GIMME", b""]),
        frames(&[b"ICANHAZ?", &[b's'; 300]]),
        frames(&[b"/k", &sequence(0), UUID, b"", b"v"]),
        frames(&[b""]),
    ]
}

/// Broken Binary Star state messages.
fn bad_states() -> Vec<Message> {
    vec![
        frames(&[b"9"]),
        frames(&[b"0"]),
        frames(&[b"33"]),
        frames(&[b""]),
        frames(&[b"3", b"3"]),
        frames(&[b"ACTIVE"]),
    ]
}

fn send_all(socket: &zmq::Socket, messages: &[Message]) {
    for message in messages {
        socket.send_multipart(message, 0).expect("send");
    }
}

/// Prefixes each message with a ROUTER routing id.
fn routed(routing_id: &[u8], messages: &[Message]) -> Vec<Message> {
    messages
        .iter()
        .map(|message| {
            let mut routed = vec![routing_id.to_vec()];
            routed.extend(message.iter().cloned());
            routed
        })
        .collect()
}

fn socket(context: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
    let socket = context.socket(kind).expect("socket");
    socket.set_linger(0).expect("linger");
    socket
}

/// Waits for the first subscription on an XPUB: from then on what it sends arrives.
fn wait_for_subscriber(xpub: &zmq::Socket) {
    let timeout = i64::try_from(PATIENCE.as_millis()).unwrap_or(i64::MAX);
    assert!(
        xpub.poll(zmq::POLLIN, timeout).expect("poll") > 0,
        "the server never subscribed"
    );
    let subscription = xpub.recv_bytes(0).expect("subscription");
    assert_eq!(subscription.first(), Some(&1), "a subscribe message");
}

fn assert_logged(log: &str, source: &str, text: &str) {
    let found = log
        .lines()
        .any(|line| line.contains("dropped input") && line.contains(source) && line.contains(text));
    assert!(found, "no log line for {source} dropping {text:?}:\n{log}");
}

#[test]
fn malformed_frames_on_every_socket_leave_the_server_serving() {
    let mut cluster = Cluster::new("malformed");
    let port = |role, offset| format!("tcp://127.0.0.1:{}", cluster.base_port(role) + offset);
    let (peer_snapshot, peer_publisher) = (port(Role::Backup, 0), port(Role::Backup, 1));
    let server_snapshot = port(Role::Primary, 0);
    let server_collector = port(Role::Primary, 2);
    let peer_state = format!("tcp://127.0.0.1:{}", cluster.state_port(Role::Backup));

    // The fake peer binds where the backup would.
    let context = zmq::Context::new();
    let fake_state = socket(&context, zmq::XPUB);
    fake_state.bind(&peer_state).expect("bind fake state");
    let fake_publisher = socket(&context, zmq::XPUB);
    fake_publisher
        .bind(&peer_publisher)
        .expect("bind fake publisher");
    let fake_snapshots = socket(&context, zmq::ROUTER);
    fake_snapshots
        .bind(&peer_snapshot)
        .expect("bind fake router");

    cluster.start(Role::Primary);

    // Client-facing sockets, while the server is still undecided (PRIMARY).
    let requester = socket(&context, zmq::DEALER);
    requester.connect(&server_snapshot).expect("connect dealer");
    send_all(&requester, &bad_requests());
    let updater = socket(&context, zmq::XPUB);
    updater
        .connect(&server_collector)
        .expect("connect to collector");
    wait_for_subscriber(&updater);
    send_all(&updater, &bad_updates());

    // Peer-facing sockets.
    wait_for_subscriber(&fake_state);
    send_all(&fake_state, &bad_states());
    wait_for_subscriber(&fake_publisher);
    send_all(&fake_publisher, &bad_updates());

    // Become the active peer: the server goes passive, hears our publisher, and asks
    // us for a snapshot, which we answer with garbage and then a proper end.
    fake_state.send("3", 0).expect("send ACTIVE");
    let server = cluster.daemon(Role::Primary);
    server.wait_for_log("from=primary to=passive");
    let hugz = frames(&[b"HUGZ", &sequence(0), b"", b"", b""]);
    fake_publisher.send_multipart(&hugz, 0).expect("send HUGZ");
    let request = fake_snapshots
        .recv_multipart(0)
        .expect("ICANHAZ? from the server");
    assert_eq!(request.get(1).map(Vec::as_slice), Some(&b"ICANHAZ?"[..]));
    let routing_id = request.first().cloned().expect("routing id");
    send_all(&fake_snapshots, &routed(&routing_id, &bad_updates()));
    let kthxbai = frames(&[b"KTHXBAI", &sequence(0), b"", b"", b""]);
    send_all(&fake_snapshots, &routed(&routing_id, &[kthxbai]));
    server.wait_for_log("synced from the active peer");
    // And garbage while it follows us.
    send_all(&fake_publisher, &bad_updates());

    // The fake peer falls silent. A client's request makes the server take over, and
    // it serves.
    drop(fake_state);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/k/")
        .connect()
        .expect("connect client");
    client.wait_synced(PATIENCE).expect("the server serves");
    client
        .set_confirmed("/k/alive", "yes", None, PATIENCE)
        .expect("an update commits");

    // Garbage again now that it is active, then it still serves.
    send_all(&requester, &bad_requests());
    send_all(&updater, &bad_updates());
    client
        .set_confirmed("/k/still", "yes", None, PATIENCE)
        .expect("an update still commits");
    assert_eq!(
        client.get("/k/alive").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
    let fresh = cluster
        .client_of(Role::Primary)
        .subtree("/k/")
        .connect()
        .expect("connect");
    fresh.wait_synced(PATIENCE).expect("a new client syncs");
    assert_eq!(fresh.dump("/k/").unwrap().len(), 2);

    let server = cluster.daemon(Role::Primary);
    assert!(server.is_running());
    let log = server.log();
    for text in [
        // One line per class per interval: "got 6 frames" is the same class, counted.
        "expected 5 frames, got 1",
        "key is empty",
        "key is 300 bytes",
        "sequence frame is 7 bytes",
        "uuid frame is 5 bytes",
        "property record",
        "properties frame is",
        "invalid ttl",
        "reserved_key",
        // The uuid-less KVSET, sent while the server was not yet active.
        "unmatchable_copy",
    ] {
        assert_logged(&log, "source=collector", text);
    }
    for text in [
        "expected 2 frames, got 1",
        "unknown command",
        "subtree is 300 bytes",
    ] {
        assert_logged(&log, "source=snapshot_request", text);
    }
    assert_logged(&log, "source=peer_state", "invalid Binary Star state");
    assert_logged(&log, "source=peer_state", "expected 1 frames, got 2");
    assert_logged(&log, "source=peer_update", "key is empty");
    assert_logged(&log, "source=peer_snapshot", "sequence frame is 7 bytes");
    fresh.shutdown().expect("shutdown");
    client.shutdown().expect("shutdown");
}

#[test]
fn an_oversized_frame_and_a_message_of_thousands_of_frames_cost_nothing_and_change_nothing() {
    let mut cluster = Cluster::pair("oversized");
    let collector = format!("tcp://127.0.0.1:{}", cluster.base_port(Role::Primary) + 2);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/k/")
        .connect()
        .expect("connect client");
    client.wait_synced(PATIENCE).expect("the pair serves");

    let context = zmq::Context::new();
    let updater = socket(&context, zmq::XPUB);
    updater.connect(&collector).expect("connect to collector");
    wait_for_subscriber(&updater);
    // One frame past the largest legal one (the 1 MiB body limit): libzmq refuses it
    // before allocating it, and drops the connection, which comes back by itself.
    let seq = sequence(0);
    let oversized = vec![b'b'; (1 << 20) + 1];
    send_all(
        &updater,
        &[frames(&[b"/k/big", &seq, UUID, b"", &oversized])],
    );
    // Thousands of frames: read and let go past the seventh, refused by their count.
    let many: Message = (0..5_000).map(|n: u32| n.to_be_bytes().to_vec()).collect();
    let updater = socket(&context, zmq::XPUB);
    updater.connect(&collector).expect("connect to collector");
    wait_for_subscriber(&updater);
    send_all(&updater, &[many]);

    client
        .set_confirmed("/k/after", "yes", None, PATIENCE)
        .expect("the pair still serves");
    assert_eq!(client.get("/k/big").unwrap(), None, "nothing of it applied");
    let server = cluster.daemon(Role::Primary);
    server.wait_for_log("expected 5 frames, got 7");
    client.shutdown().expect("shutdown");
}

#[test]
fn a_kvset_without_a_uuid_is_published_by_the_active_and_applied_once_by_the_backup() {
    let mut cluster = Cluster::pair("empty-uuid");
    let collector = format!("tcp://127.0.0.1:{}", cluster.base_port(Role::Primary) + 2);
    let backup_collector = format!("tcp://127.0.0.1:{}", cluster.base_port(Role::Backup) + 2);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/anon/")
        .connect()
        .expect("connect client");
    client.wait_synced(PATIENCE).expect("the pair serves");

    // As RFC 12 allows and a CHP client may send it: the uuid frame empty, to both
    // servers as a client's PUB does.
    let context = zmq::Context::new();
    let mut updaters = Vec::new();
    for endpoint in [&collector, &backup_collector] {
        let updater = socket(&context, zmq::XPUB);
        updater.connect(endpoint).expect("connect to collector");
        wait_for_subscriber(&updater);
        updaters.push(updater);
    }
    let anonymous = frames(&[b"/anon/k", &sequence(0), b"", b"", b"v1"]);
    for updater in &updaters {
        send_all(updater, std::slice::from_ref(&anonymous));
    }
    clonekv_tests::wait_until("the uuid-less update is published", || {
        client.get("/anon/k").ok().flatten().as_deref() == Some(&b"v1"[..])
    });
    let backup = cluster.daemon(Role::Backup);
    backup.wait_for_log("unmatchable_copy");

    // The active fails; the backup, which applied the update once from the active's
    // KVPUB, takes over with it and does not publish it again.
    cluster.kill(Role::Primary);
    let fresh = cluster
        .client_of(Role::Backup)
        .subtree("/anon/")
        .connect()
        .expect("connect to the backup");
    fresh.wait_synced(PATIENCE).expect("the backup takes over");
    let entry = fresh
        .entry("/anon/k")
        .expect("read")
        .expect("the update survived the failover");
    assert_eq!(entry.value, b"v1");
    assert_eq!(
        entry.sequence, 1,
        "applied once: still the active's sequence 1"
    );
    fresh.shutdown().expect("shutdown");
    client.shutdown().expect("shutdown");
}
