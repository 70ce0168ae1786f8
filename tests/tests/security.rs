//! CURVE with real processes: a pair started with keys serves a client with an admitted
//! key (failover included), refuses a client without one (which is told why, in one
//! line), and cannot be taken over by a process that plays its peer.
//!
//! The same fake peer without keys makes a primary passive and feeds it a snapshot:
//! `malformed.rs` does exactly that to reach the peer-facing sockets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clonekv_tests::{stdout, wait_until, Cluster, Role, PATIENCE};
use clonekv_zmq::client::{Client, ClientBuilder, ClientError};
use clonekv_zmq::curve::{self, KeyPair, ZapDomain};

/// The keys of one test: the two servers, an admitted client and a stranger.
struct Keys {
    primary: KeyPair,
    backup: KeyPair,
    client: KeyPair,
    stranger: KeyPair,
    dir: PathBuf,
}

impl Keys {
    /// New pairs, written to `dir` as `clonekv keygen` does; the admitted client's
    /// public key alone in `dir/clients/`.
    fn new(dir: &Path) -> Keys {
        let keys = Keys {
            primary: KeyPair::generate().expect("keygen"),
            backup: KeyPair::generate().expect("keygen"),
            client: KeyPair::generate().expect("keygen"),
            stranger: KeyPair::generate().expect("keygen"),
            dir: dir.to_path_buf(),
        };
        std::fs::create_dir_all(dir.join("clients")).expect("mkdir");
        for (name, pair) in [
            ("primary", &keys.primary),
            ("backup", &keys.backup),
            ("client", &keys.client),
            ("stranger", &keys.stranger),
        ] {
            pair.write(&dir.join(name), false).expect("write keys");
        }
        keys.client
            .write(&dir.join("clients").join("client"), false)
            .expect("write admitted key");
        keys
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The daemon flags of `role`.
    fn daemon_args(&self, role: Role) -> Vec<String> {
        let (own, peer) = match role {
            Role::Primary => ("primary.key", "backup.pub"),
            Role::Backup => ("backup.key", "primary.pub"),
        };
        vec![
            "--curve-secret-key".into(),
            self.file(own),
            "--curve-clients".into(),
            self.file("clients"),
            "--peer-public-key".into(),
            self.file(peer),
        ]
    }

    /// A keyed pair on fresh ports (not started).
    fn cluster(&self, test: &str) -> Cluster {
        Cluster::new(test)
            .with_role_args(Role::Primary, &self.daemon_args(Role::Primary))
            .with_role_args(Role::Backup, &self.daemon_args(Role::Backup))
    }
}

/// A client builder of `cluster` (both servers, with their public keys) with `pair` as
/// its own keys.
fn keyed_client(keys: &Keys, cluster: &Cluster, pair: &KeyPair) -> ClientBuilder {
    Client::builder()
        .server_with_key(cluster.endpoint(Role::Primary), keys.primary.public())
        .server_with_key(cluster.endpoint(Role::Backup), keys.backup.public())
        .server_ttl(clonekv_tests::SERVER_TTL)
        .curve_key_pair(pair.clone())
}

fn settle(cluster: &mut Cluster) {
    cluster
        .daemon(Role::Primary)
        .wait_for_log("from=primary to=active");
    cluster
        .daemon(Role::Backup)
        .wait_for_log("synced from the active peer");
}

/// The CLI's flags for a client with `pair_file`'s keys.
fn cli_keys(keys: &Keys, pair_file: &str) -> Vec<String> {
    vec![
        "--curve-secret-key".into(),
        keys.file(pair_file),
        "--server-public-key".into(),
        format!("{},{}", keys.file("primary.pub"), keys.file("backup.pub")),
    ]
}

/// Runs the CLI and returns (exit status, stdout, stderr).
fn run_cli(cluster: &Cluster, args: &[String]) -> (Option<i32>, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let output = cluster.cli(&args);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "clonekv {args:?} took {:?}: a refused key must fail fast",
        started.elapsed()
    );
    (
        output.status.code(),
        stdout(&output),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_keyed_pair_serves_an_admitted_client_and_fails_over() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(scratch.path());
    let mut cluster = keys.cluster("curve_failover");
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    settle(&mut cluster);
    assert!(cluster
        .daemon(Role::Primary)
        .log()
        .contains("security: CURVE on every socket"));

    let client = keyed_client(&keys, &cluster, &keys.client)
        .subtree("/s/")
        .connect()
        .expect("connect");
    client
        .wait_synced(PATIENCE)
        .expect("the keyed client syncs");
    client
        .set_confirmed("/s/before", "1", None, PATIENCE)
        .expect("commit before the failover");
    // The CLI with the same keys reads it.
    let mut args = cli_keys(&keys, "client.key");
    args.extend(["get".into(), "/s/before".into()]);
    let (status, out, err) = run_cli(&cluster, &args);
    assert_eq!(status, Some(0), "{err}");
    assert_eq!(out.trim(), "1");

    cluster.kill(Role::Primary);
    cluster
        .daemon(Role::Backup)
        .wait_for_log("failover: this server is now active");
    let mut committed = None;
    for _ in 0..10 {
        match client.set_confirmed("/s/after", "2", None, PATIENCE) {
            Ok(sequence) => {
                committed = Some(sequence);
                break;
            }
            Err(ClientError::Lost(_)) => continue,
            Err(error) => panic!("commit after the failover: {error}"),
        }
    }
    assert!(committed.is_some(), "no commit after the failover");
    assert_eq!(
        client.get("/s/before").expect("get").as_deref(),
        Some(&b"1"[..])
    );
    // A fresh keyed client of the backup alone has both.
    let fresh = Client::builder()
        .server_with_key(cluster.endpoint(Role::Backup), keys.backup.public())
        .curve_key_pair(keys.client.clone())
        .subtree("/s/")
        .connect()
        .expect("connect");
    fresh.wait_synced(PATIENCE).expect("the backup serves");
    assert_eq!(fresh.dump("/s/").expect("dump").len(), 2);

    // The old primary comes back passive and follows over CURVE.
    cluster
        .start(Role::Primary)
        .wait_for_log("synced from the active peer");
    fresh.shutdown().expect("shutdown");
    client.shutdown().expect("shutdown");
}

#[test]
fn a_client_without_an_admitted_key_can_neither_read_nor_write_and_is_told_why() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(scratch.path());
    let mut cluster = keys.cluster("curve_refused");
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    settle(&mut cluster);
    let client = keyed_client(&keys, &cluster, &keys.client)
        .subtree("/r/")
        .connect()
        .expect("connect");
    client.wait_synced(PATIENCE).expect("sync");
    client
        .set_confirmed("/r/key", "original", None, PATIENCE)
        .expect("commit");

    // A stranger's key: refused by ZAP, in one line.
    let mut args = cli_keys(&keys, "stranger.key");
    args.extend(["get".into(), "/r/key".into()]);
    let (status, out, err) = run_cli(&cluster, &args);
    assert_eq!(status, Some(3), "stdout {out:?} stderr {err:?}");
    assert!(out.is_empty(), "a refused client printed {out:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("server refused our CURVE key (not admitted)"),
        "{err}"
    );
    let mut args = cli_keys(&keys, "stranger.key");
    args.extend(["set".into(), "/r/key".into(), "stranger".into()]);
    let (status, _, err) = run_cli(&cluster, &args);
    assert_eq!(status, Some(3), "{err}");
    assert!(err.contains("not admitted"), "{err}");

    // No keys at all: plain ZMTP against CURVE sockets, also one line.
    let (status, _, err) = run_cli(&cluster, &["get".into(), "/r/key".into()]);
    assert_eq!(status, Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("requires CURVE"), "{err}");

    // The library says the same.
    let stranger = keyed_client(&keys, &cluster, &keys.stranger)
        .subtree("/r/")
        .connect()
        .expect("connect");
    match stranger.wait_synced(Duration::from_secs(2)) {
        Err(error @ ClientError::Handshake { .. }) => {
            assert!(error.to_string().contains("not admitted"), "{error}")
        }
        other => panic!("a stranger synced or failed otherwise: {other:?}"),
    }
    stranger.shutdown().expect("shutdown");

    // Raw writes past the CLI: a plain PUB and a stranger's CURVE PUB at both
    // collectors, sending well-formed KVSETs.
    let context = zmq::Context::new();
    let kvset = |value: &[u8]| -> Vec<Vec<u8>> {
        vec![
            b"/r/key".to_vec(),
            0i64.to_be_bytes().to_vec(),
            vec![9; 16],
            Vec::new(),
            value.to_vec(),
        ]
    };
    let mut publishers = Vec::new();
    for (role, server_key) in [
        (Role::Primary, keys.primary.public()),
        (Role::Backup, keys.backup.public()),
    ] {
        let collector = format!("tcp://127.0.0.1:{}", cluster.base_port(role) + 2);
        let plain = context.socket(zmq::PUB).expect("socket");
        plain.set_linger(0).expect("linger");
        plain.connect(&collector).expect("connect");
        let keyed = context.socket(zmq::PUB).expect("socket");
        keyed.set_linger(0).expect("linger");
        curve::make_client(&keyed, &keys.stranger, &server_key).expect("curve");
        keyed.connect(&collector).expect("connect");
        publishers.push(plain);
        publishers.push(keyed);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for publisher in &publishers {
            publisher.send_multipart(kvset(b"forged"), 0).expect("send");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A write the keyed client makes after the forgeries commits, and the key still
    // holds the keyed client's value: nothing forged got in.
    client
        .set_confirmed("/r/marker", "after", None, PATIENCE)
        .expect("commit");
    let fresh = keyed_client(&keys, &cluster, &keys.client)
        .subtree("/r/")
        .connect()
        .expect("connect");
    fresh.wait_synced(PATIENCE).expect("sync");
    assert_eq!(
        fresh.get("/r/key").expect("get").as_deref(),
        Some(&b"original"[..])
    );
    let log = cluster.daemon(Role::Primary).log();
    assert!(
        log.contains("refused a client connection: its CURVE key is not admitted"),
        "{log}"
    );
    fresh.shutdown().expect("shutdown");
    client.shutdown().expect("shutdown");
}

#[test]
fn a_process_playing_the_peer_changes_nothing_and_is_logged() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(scratch.path());
    let mut cluster = keys.cluster("curve_fake_peer");
    let at = |port: u16| format!("tcp://127.0.0.1:{port}");
    let peer_state = at(cluster.state_port(Role::Backup));
    let peer_snapshot = at(cluster.base_port(Role::Backup));
    let peer_publisher = at(cluster.base_port(Role::Backup) + 1);
    let own_state = at(cluster.state_port(Role::Primary));

    // The fake peer binds where the backup would: a plain state PUB announcing ACTIVE
    // (as the zguide's programs would), and a stranger's CURVE snapshot ROUTER and
    // publisher that answer as an active peer would.
    let context = zmq::Context::new();
    let socket = |kind| {
        let socket = context.socket(kind).expect("socket");
        socket.set_linger(0).expect("linger");
        socket
    };
    let fake_state = socket(zmq::PUB);
    fake_state.bind(&peer_state).expect("bind fake state");
    let fake_snapshots = socket(zmq::ROUTER);
    curve::make_server(&fake_snapshots, &keys.stranger, ZapDomain::Clients).expect("curve");
    fake_snapshots.set_rcvtimeo(0).expect("rcvtimeo");
    fake_snapshots
        .bind(&peer_snapshot)
        .expect("bind fake router");
    let fake_publisher = socket(zmq::PUB);
    curve::make_server(&fake_publisher, &keys.stranger, ZapDomain::Clients).expect("curve");
    fake_publisher
        .bind(&peer_publisher)
        .expect("bind fake publisher");
    // And it listens to the primary's own state, with the stranger's key.
    let listener = socket(zmq::SUB);
    curve::make_client(&listener, &keys.stranger, &keys.primary.public()).expect("curve");
    listener.set_subscribe(b"").expect("subscribe");
    listener.set_rcvtimeo(0).expect("rcvtimeo");
    listener.connect(&own_state).expect("connect");

    cluster.start(Role::Primary);
    let mut requests = 0;
    let mut heard = 0;
    let fake_snapshot = |routing_id: &[u8]| -> Vec<Vec<Vec<u8>>> {
        let sequence = 99i64.to_be_bytes().to_vec();
        vec![
            vec![
                routing_id.to_vec(),
                b"/fake".to_vec(),
                sequence.clone(),
                vec![5; 16],
                Vec::new(),
                b"installed".to_vec(),
            ],
            vec![
                routing_id.to_vec(),
                b"KTHXBAI".to_vec(),
                sequence,
                Vec::new(),
                Vec::new(),
                Vec::new(),
            ],
        ]
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        fake_state.send("3", 0).expect("send ACTIVE");
        let hugz = [&b"HUGZ"[..], &0i64.to_be_bytes(), b"", b"", b""];
        fake_publisher.send_multipart(hugz, 0).expect("send HUGZ");
        while let Ok(request) = fake_snapshots.recv_multipart(0) {
            requests += 1;
            if let Some(routing_id) = request.first() {
                for message in fake_snapshot(routing_id) {
                    let _ = fake_snapshots.send_multipart(message, 0);
                }
            }
        }
        while listener.recv_bytes(0).is_ok() {
            heard += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        requests, 0,
        "the primary asked the fake peer for a snapshot"
    );
    assert_eq!(heard, 0, "a stranger heard the primary's Binary Star state");

    let server = cluster.daemon(Role::Primary);
    let log = server.log();
    assert!(
        !log.contains("to=passive"),
        "the fake peer demoted the primary:\n{log}"
    );
    assert!(!log.contains("synced from the active peer"), "{log}");
    for needle in [
        // The plain state PUB and the stranger's snapshot ROUTER and publisher.
        "did not prove the peer's CURVE key",
        "socket=\"peer state\"",
        "socket=\"peer publisher\"",
        // The stranger subscribing to the primary's own state.
        "refused a connection to the Binary Star state socket",
    ] {
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }

    // With the fake peer still there, the primary serves a keyed client as the lone
    // primary it is, and holds nothing of the fake snapshot.
    let client = keyed_client(&keys, &cluster, &keys.client)
        .connect()
        .expect("connect");
    client.wait_synced(PATIENCE).expect("the primary serves");
    client
        .set_confirmed("/real", "yes", None, PATIENCE)
        .expect("commit");
    assert_eq!(client.get("/fake").expect("get"), None);
    client.shutdown().expect("shutdown");
}

#[test]
fn keygen_writes_a_private_pair_and_never_overwrites_one() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = tempfile::tempdir().expect("tempdir");
    let base = scratch.path().join("node");
    let keygen = || {
        std::process::Command::new(clonekv_tests::binary("clonekv"))
            .arg("keygen")
            .arg(&base)
            .output()
            .expect("run clonekv keygen")
    };
    let output = keygen();
    assert!(output.status.success(), "{output:?}");
    let printed = stdout(&output);
    let pair = KeyPair::read(&scratch.path().join("node.key")).expect("a key pair file");
    assert_eq!(printed.trim(), pair.public().z85());
    let mode = std::fs::metadata(scratch.path().join("node.key"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret key file is private");
    let public = std::fs::read_to_string(scratch.path().join("node.pub")).expect("read .pub");
    assert!(public.contains(&pair.public().z85()), "{public}");
    assert!(!public.contains("secret-key"), "{public}");
    // A second run refuses, in one line, and leaves the pair as it was.
    let again = keygen();
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert_eq!(String::from_utf8_lossy(&again.stderr).lines().count(), 1);
    assert_eq!(
        KeyPair::read(&scratch.path().join("node.key")).expect("read"),
        pair
    );
}

#[test]
fn a_daemon_with_half_its_keys_refuses_to_start_in_one_line() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(scratch.path());
    let output = std::process::Command::new(clonekv_tests::binary("clonekvd"))
        .args(["--curve-secret-key", &keys.file("primary.key")])
        .env_remove("CLONEKVD_CURVE_CLIENTS")
        .env_remove("CLONEKVD_PEER_PUBLIC_KEY")
        .output()
        .expect("run clonekvd");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("needs --curve-clients"), "{err}");
}

/// A GET or PUT on a gateway: (status, body).
fn http(method: &str, url: &str, body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let response = match method {
        "PUT" => agent.put(url).send(body),
        _ => agent.get(url).call(),
    };
    match response {
        Ok(mut response) => (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

#[test]
fn the_http_gateway_of_a_keyed_pair_reaches_it_with_its_daemons_keys() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(scratch.path());
    let mut cluster = keys.cluster("curve_http").with_http();
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    settle(&mut cluster);
    let primary = cluster.http_url(Role::Primary);
    let backup = cluster.http_url(Role::Backup);
    wait_until("both gateways are synced", || {
        http("GET", &format!("{primary}/healthz"), b"").0 == 200
            && http("GET", &format!("{backup}/healthz"), b"").0 == 200
    });
    let (status, body) = http("PUT", &format!("{backup}/v1/kv/curve/h"), b"through-http");
    assert_eq!(status, 200, "PUT through the backup's gateway: {body}");
    wait_until("the primary's gateway reads the write", || {
        http("GET", &format!("{primary}/v1/kv/curve/h"), b"") == (200, "through-http".into())
    });
    // Admitting each server's own key (its gateway) lets no stranger in.
    let mut args = cli_keys(&keys, "stranger.key");
    args.extend(["get".to_string(), "/curve/h".to_string()]);
    let (code, _, stderr) = run_cli(&cluster, &args);
    assert_eq!(code, Some(3), "{stderr}");
}
