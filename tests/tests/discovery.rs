//! Zero-config discovery on a real broadcast network (network namespaces on a bridge,
//! see `clonekv_tests::netns`): a primary, a backup and the CLI, none given an address,
//! find each other by beacon; a second cluster on the same LAN stays apart; bad
//! datagrams change nothing but counters; a failover works as with configured endpoints.

use std::process::{Command, Output, Stdio};

use clonekv_tests::netns::Lan;
use clonekv_tests::{binary, stdout, Daemon, LineReader, Scratch};

/// Fast timings, so that the test takes seconds: beacons and heartbeats every 250 ms.
const DAEMON_TIMING: [&str; 4] = ["--discovery-interval", "250ms", "--heartbeat", "250ms"];

/// `clonekv ARGS...` run inside `namespace`, with discovery on (no server address).
fn cli_in(namespace: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", namespace])
        .arg(binary("clonekv"))
        .args(["--server-ttl", "1s", "--timeout", "30s"])
        .args(args)
        .env_remove("CLONEKV_SERVERS")
        .env_remove("CLONEKV_NO_DISCOVERY")
        .env_remove("CLONEKV_CLUSTER")
        .stdin(Stdio::null());
    command
}

fn run(mut command: Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {what}: {error}"))
}

fn assert_ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn daemon_args(extra: &[&str]) -> Vec<String> {
    DAEMON_TIMING
        .iter()
        .chain(extra)
        .map(|arg| arg.to_string())
        .collect()
}

/// Sends `bytes` as one UDP datagram from `namespace` to `to` (`HOST/PORT`), with bash's
/// `/dev/udp` (no tool beyond bash needed).
fn send_datagram(lan: &Lan, namespace: &str, to: &str, printf_format: &str) {
    let script = format!("printf '{printf_format}' > /dev/udp/{to}");
    lan.exec(namespace, &["bash", "-c", &script]);
}

/// The value of `field=N` in a log line.
fn counter(line: &str, field: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{field}=")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {field}= in {line:?}"))
}

#[test]
fn a_pair_and_a_cli_with_no_addresses_find_each_other_and_fail_over_on_a_broadcast_lan() {
    let scratch = Scratch::new("discovery");
    let mut lan = Lan::new("disc");
    let primary_ns = lan.add_host("primary", 1);
    let backup_ns = lan.add_host("backup", 2);
    let client_ns = lan.add_host("client", 3);
    let other_ns = lan.add_host("other", 5);

    // The backup starts with its network down, as after a boot before the link is up.
    lan.exec(&backup_ns, &["ip", "link", "set", "eth0", "down"]);
    let mut primary = Daemon::spawn_in(&primary_ns, "primary", &daemon_args(&[]), scratch.path());
    let mut backup = Daemon::spawn_in(
        &backup_ns,
        "backup",
        &daemon_args(&["--backup"]),
        scratch.path(),
    );
    let mut other = Daemon::spawn_in(
        &other_ns,
        "other",
        &daemon_args(&["--cluster", "other"]),
        scratch.path(),
    );
    backup.wait_for_log("discovery on");
    std::thread::sleep(std::time::Duration::from_millis(600));
    lan.exec(&backup_ns, &["ip", "link", "set", "eth0", "up"]);

    // Neither server was given the other's address.
    backup.wait_for_log(
        "discovery: connected to the partner role=\"primary\" snapshot=tcp://10.77.0.1:5556",
    );
    primary.wait_for_log(
        "discovery: connected to the partner role=\"backup\" snapshot=tcp://10.77.0.2:5566",
    );
    backup.wait_for_log("synced from the active peer");

    // The CLI, with no server address, writes and reads.
    let set = run(
        cli_in(&client_ns, &["set", "/disc/k", "v1", "--wait"]),
        "set",
    );
    assert_ok(&set, "clonekv set --wait");
    let get = run(cli_in(&client_ns, &["get", "/disc/k"]), "get");
    assert_ok(&get, "clonekv get");
    assert_eq!(stdout(&get).trim(), "v1");

    // A watcher that will have to follow the failover.
    let mut watch = cli_in(&client_ns, &["watch", "/disc/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start clonekv watch");
    let mut lines = LineReader::new(watch.stdout.take().expect("watch stdout"));
    assert_ok(
        &run(
            cli_in(&client_ns, &["set", "/disc/w", "hello", "--wait"]),
            "set",
        ),
        "clonekv set /disc/w",
    );
    lines.wait_for("hello");

    // Status says what discovery found.
    let status = run(cli_in(&client_ns, &["status"]), "status");
    assert_ok(&status, "clonekv status");
    let status = stdout(&status);
    assert!(
        status.contains("discovered: primary tcp://10.77.0.1:5556 (active), backup tcp://10.77.0.2:5566 (passive)"),
        "status: {status}"
    );

    // The other cluster on the same LAN is a separate store.
    let other_get = run(
        cli_in(&client_ns, &["--cluster", "other", "get", "/disc/k"]),
        "get in the other cluster",
    );
    assert_eq!(
        other_get.status.code(),
        Some(1),
        "the other cluster must not have /disc/k: {}{}",
        stdout(&other_get),
        String::from_utf8_lossy(&other_get.stderr)
    );
    assert_ok(
        &run(
            cli_in(
                &client_ns,
                &["--cluster", "other", "set", "/disc/o", "x", "--wait"],
            ),
            "set in the other cluster",
        ),
        "clonekv --cluster other set",
    );
    let ours = run(cli_in(&client_ns, &["get", "/disc/o"]), "get");
    assert_eq!(
        ours.status.code(),
        Some(1),
        "/disc/o leaked across clusters"
    );
    assert!(!primary.log().contains("address=10.77.0.5"));
    assert!(!other.log().contains("address=10.77.0.1"));

    // Bad datagrams at the backup: wrong magic, truncated, an unknown version, huge.
    for bytes in [
        "XXXX\\001garbage",
        "CKVB\\001",
        "CKVB\\011\\007clonekv",
        &" ".repeat(3000),
    ] {
        send_datagram(&lan, &client_ns, "10.77.0.2/5560", bytes);
    }

    // A failover, with the servers found by discovery.
    primary.kill9();
    let get = run(
        cli_in(&client_ns, &["get", "/disc/k"]),
        "get after the kill",
    );
    assert_ok(&get, "clonekv get after kill -9 of the primary");
    assert_eq!(stdout(&get).trim(), "v1");
    assert_ok(
        &run(
            cli_in(&client_ns, &["set", "/disc/w", "after", "--wait"]),
            "set",
        ),
        "clonekv set --wait after the failover",
    );
    lines.wait_for("after");

    // The backup, now the active server, moves to another address: the running watcher
    // follows it by its beacons, and a new CLI finds it there.
    lan.exec(
        &backup_ns,
        &["ip", "addr", "del", "10.77.0.2/24", "dev", "eth0"],
    );
    lan.exec(
        &backup_ns,
        &["ip", "addr", "add", "10.77.0.12/24", "dev", "eth0"],
    );
    assert_ok(
        &run(
            cli_in(&client_ns, &["set", "/disc/w", "moved", "--wait"]),
            "set",
        ),
        "clonekv set --wait after the backup moved",
    );
    let status = stdout(&run(cli_in(&client_ns, &["status"]), "status"));
    assert!(
        status.contains("backup tcp://10.77.0.12:5566 (active)"),
        "{status}"
    );
    lines.wait_for("moved");
    let _ = watch.kill();
    let _ = watch.wait();

    // The bad datagrams changed nothing but counters.
    backup.signal("TERM");
    assert!(backup.wait_exit().success());
    let log = backup.log();
    let counters = log
        .lines()
        .find(|line| line.contains("discovery counters"))
        .unwrap_or_else(|| panic!("no discovery counters in the backup's log:\n{log}"));
    assert!(counter(counters, "bad_magic") >= 1, "{counters}");
    assert!(counter(counters, "bad_length") >= 2, "{counters}");
    assert!(counter(counters, "unknown_version") >= 1, "{counters}");
    assert!(counter(counters, "other_cluster") >= 1, "{counters}");
    let servers_up: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("discovery: peer up") && !line.contains("role=\"client\""))
        .collect();
    assert_eq!(
        servers_up.len(),
        1,
        "only the primary is a server peer of the backup: {servers_up:#?}"
    );
    other.signal("TERM");
    other.wait_exit();
}
