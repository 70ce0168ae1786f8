//! What an operator sees: a daemon that is loud about misconfiguration (two servers of
//! one role, ports that clash, addresses that are not this host's, peer hosts that do
//! not resolve) and quiet otherwise (a flood costs a few lines that still count every
//! occurrence).

use std::process::Output;

use clonekv_core::kvmsg::{KvMsg, Uuid};
use clonekv_tests::{tool, Cluster, Daemon, Role, PATIENCE};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `args` with the value of `flag` replaced by `value` (added when absent).
fn with_flag(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|arg| arg == flag) {
        Some(index) => args[index + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

/// Runs `clonekvd args...` that must refuse to start; returns its one-line message
/// after checking the status and the line's shape.
fn refused(args: &[String], status: i32) -> String {
    let output = tool("clonekvd").args(args).output().expect("run clonekvd");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(status), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.starts_with("clonekvd: "), "{message}");
    message
}

/// The number after `field=` in `line`.
fn field(line: &str, field: &str) -> Option<u64> {
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Starts two servers of `role` pointed at each other (the cluster's layout, the second
/// on the other server's ports), with a peer expiry long enough that neither ever
/// counts the other as dead during the test.
fn same_role_pair(cluster: &Cluster, role: Role) -> (Daemon, Daemon) {
    let args = |ports: Role| {
        let mut args: Vec<String> = cluster
            .daemon_args(ports)
            .into_iter()
            .filter(|arg| arg != "--backup")
            .collect();
        if role == Role::Backup {
            args.insert(0, "--backup".to_string());
        }
        with_flag(args, "--peer-expiry-beats", "1000")
    };
    let one = Daemon::spawn("one", &args(Role::Primary), cluster.scratch());
    let other = Daemon::spawn("other", &args(Role::Backup), cluster.scratch());
    (one, other)
}

#[test]
fn two_servers_configured_with_one_role_log_an_error_that_names_the_fix() {
    for (role, name, fix) in [
        (
            Role::Primary,
            "primary",
            "both servers are configured as primary: start one of them with --backup",
        ),
        (
            Role::Backup,
            "backup",
            "both servers are configured as backup: start one of them without --backup",
        ),
    ] {
        let cluster = Cluster::new(&format!("two-{name}s"));
        let (mut one, mut other) = same_role_pair(&cluster, role);
        for daemon in [&mut one, &mut other] {
            daemon.wait_for_log(fix);
            let log = daemon.log();
            let line = log
                .lines()
                .find(|line| line.contains(fix))
                .expect("the line");
            assert!(line.contains("ERROR"), "logged as an error: {line}");
        }

        // A client gets no answer, and the log says why.
        let servers = cluster.servers().join(",");
        let output = tool("clonekv")
            .args(["--server", &servers, "--timeout", "1s", "get", "/x"])
            .env_remove("CLONEKV_SERVERS")
            .output()
            .expect("run clonekv");
        assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
        let message = stderr(&output);
        assert!(
            message.contains(&format!(
                "both servers are configured as {name}; start one of them with"
            )),
            "the CLI names the cause: {message}"
        );
        // `status` shows the pair, and the problem.
        let status = tool("clonekv")
            .args(["--server", &servers, "--timeout", "1s", "status"])
            .env_remove("CLONEKV_SERVERS")
            .output()
            .expect("run clonekv status");
        let shown = String::from_utf8_lossy(&status.stdout);
        assert!(
            shown.contains("problem: ") && shown.contains(&format!("configured as {name}")),
            "{shown}"
        );
        one.wait_for_log("client rejected: this server is not active, and cannot become active while its peer has the same role");

        // The shutdown counters say it too.
        one.signal("TERM");
        assert!(one.wait_exit().success());
        let log = one.log();
        let stopped = log
            .lines()
            .find(|line| line.contains(" stopped"))
            .unwrap_or_else(|| panic!("no stopped line:\n{log}"));
        assert!(
            field(stopped, "role_conflicts").is_some_and(|count| count > 0),
            "{stopped}"
        );
        assert!(
            log.contains(&format!("both servers were configured as {name}")),
            "{log}"
        );
    }
}

#[test]
fn ports_that_clash_are_refused_at_start_with_both_sockets_named() {
    let cluster = Cluster::new("clash");
    let base = cluster.base_port(Role::Primary);
    let args = cluster.daemon_args(Role::Primary);

    // Our own state port on our publisher port (P+1).
    let own = with_flag(args.clone(), "--state-port", &(base + 1).to_string());
    let message = refused(&own, 2);
    assert!(
        message.contains(&format!("publisher endpoint tcp://127.0.0.1:{}", base + 1))
            && message.contains(&format!("state endpoint tcp://127.0.0.1:{}", base + 1))
            && message.contains("same port"),
        "{message}"
    );

    // The peer's state port on our publisher port, on this host.
    let peer = with_flag(args.clone(), "--peer-state-port", &(base + 1).to_string());
    let message = refused(&peer, 2);
    assert!(
        message.contains(&format!(
            "peer state endpoint tcp://127.0.0.1:{} is this server's own publisher endpoint",
            base + 1
        )),
        "{message}"
    );

    // Two of the peer's ports on one.
    let peer_state = cluster.base_port(Role::Backup);
    let peers = with_flag(args, "--peer-state-port", &peer_state.to_string());
    let message = refused(&peers, 2);
    assert!(
        message.contains("peer snapshot endpoint") && message.contains("peer state endpoint"),
        "{message}"
    );
}

#[test]
fn a_bind_address_says_whether_it_is_in_use_or_not_this_hosts() {
    let mut cluster = Cluster::new("bind-errors");
    let args = cluster.daemon_args(Role::Primary);

    // 192.0.2.1 is reserved for documentation: no host has it.
    let elsewhere = with_flag(args.clone(), "--bind-host", "192.0.2.1");
    let message = refused(&elsewhere, 2);
    assert!(
        message.contains("cannot bind the snapshot socket to tcp://192.0.2.1:")
            && message.contains("not available on this host")
            && message.contains("EADDRNOTAVAIL"),
        "{message}"
    );

    cluster
        .start(Role::Primary)
        .wait_for_log("clonekvd started");
    let message = refused(&args, 1);
    assert!(
        message.contains("the address is in use") && message.contains("EADDRINUSE"),
        "{message}"
    );
}

#[test]
fn a_peer_host_that_does_not_resolve_is_an_error_at_start() {
    let cluster = Cluster::new("unresolvable");
    let args = with_flag(
        cluster.daemon_args(Role::Primary),
        "--peer-host",
        "no-such-host.invalid",
    );
    let message = refused(&args, 2);
    assert!(
        message.starts_with("clonekvd: invalid configuration: the peer ")
            && message.contains("\"no-such-host.invalid\" does not resolve"),
        "{message}"
    );
}

#[test]
fn a_flood_of_evicted_pending_updates_costs_a_few_lines_that_count_every_one() {
    const UPDATES: u32 = 3_000;
    const PENDING_MAX_LEN: u32 = 10;
    const LINE: &str = "pending list bound reached";
    let mut cluster = Cluster::new("eviction-flood")
        .with_daemon_args(&["--pending-max-len", &PENDING_MAX_LEN.to_string()]);
    let collector = format!("tcp://127.0.0.1:{}", cluster.base_port(Role::Primary) + 2);
    // Alone and asked by no client, the primary stays undecided: it holds every update
    // on its pending list, which evicts the oldest past the bound.
    let daemon = cluster.start(Role::Primary);
    daemon.wait_for_log("clonekvd started");

    let context = zmq::Context::new();
    let updater = context.socket(zmq::XPUB).expect("socket");
    updater.set_linger(0).expect("linger");
    updater
        .set_sndhwm(0)
        .expect("no high-water mark: drop nothing");
    updater.connect(&collector).expect("connect");
    let timeout = i64::try_from(PATIENCE.as_millis()).unwrap_or(i64::MAX);
    assert!(
        updater.poll(zmq::POLLIN, timeout).expect("poll") > 0,
        "the server never subscribed"
    );
    updater.recv_bytes(0).expect("subscription");
    for n in 0..UPDATES {
        let mut uuid = [0x5a; 16];
        uuid[..4].copy_from_slice(&n.to_be_bytes());
        let update = KvMsg::kvset(
            format!("/flood/{n}").into_bytes(),
            b"v".to_vec(),
            Uuid::from_bytes(uuid),
        );
        updater
            .send_multipart(update.encode(), 0)
            .expect("send update");
    }
    // A reserved key, dropped with a line of its own once everything before it was
    // handled (one connection keeps its order).
    let reserved = KvMsg::kvset(b"KTHXBAI".to_vec(), Vec::new(), Uuid::from_bytes([1; 16]));
    updater
        .send_multipart(reserved.encode(), 0)
        .expect("send reserved");
    daemon.wait_for_log("reserved_key");
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success());

    let log = daemon.log();
    let stopped = log
        .lines()
        .find(|line| line.contains(" stopped"))
        .unwrap_or_else(|| panic!("no stopped line:\n{log}"));
    let evicted = field(stopped, "pending_evicted").expect("pending_evicted");
    assert_eq!(evicted, u64::from(UPDATES - PENDING_MAX_LEN), "{stopped}");
    let lines: Vec<&str> = log.lines().filter(|line| line.contains(LINE)).collect();
    // Each line stands for itself and the repeats suppressed before it; a summary only
    // for the repeats after the last line.
    let counted: u64 = lines
        .iter()
        .map(|line| {
            let suppressed = field(line, "suppressed").expect("suppressed=N");
            if line.contains("summary of suppressed repeats") {
                suppressed
            } else {
                suppressed + 1
            }
        })
        .sum();
    assert_eq!(counted, evicted, "{lines:#?}");
    // One line per 10 s and a summary: a flood of thousands takes far fewer than 100
    // lines even on a slow machine.
    assert!(
        lines.len() < 100,
        "{} lines for {evicted} evictions",
        lines.len()
    );
}
