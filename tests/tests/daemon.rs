//! The binaries as programs: exit statuses, one-line errors, signals, the config file.

use std::process::Command;

use clonekv_tests::{assert_success, binary, stdout, tool, Cluster, PortBlock, Role, Scratch};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn clonekvd_exits_non_zero_with_one_line_when_it_cannot_bind() {
    let mut cluster = Cluster::new("bind");
    cluster
        .start(Role::Primary)
        .wait_for_log("clonekvd started");
    let output = tool("clonekvd")
        .args(cluster.daemon_args(Role::Primary))
        .output()
        .expect("run a second clonekvd");
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.starts_with(
            "clonekvd: cannot start: cannot bind the snapshot socket to tcp://127.0.0.1:"
        ),
        "{message}"
    );
    assert!(message.contains("Address already in use"), "{message}");
}

#[test]
fn sigterm_and_sigint_stop_clonekvd_cleanly() {
    let mut cluster = Cluster::pair("signals");
    for (role, signal) in [(Role::Primary, "TERM"), (Role::Backup, "INT")] {
        let daemon = cluster.daemon(role);
        daemon.wait_for_log("clonekvd started");
        daemon.signal(signal);
        let status = daemon.wait_exit();
        assert!(
            status.success(),
            "{role:?} exits 0 on SIG{signal}, got {status}"
        );
        assert!(daemon.log().contains("shutting down"), "{}", daemon.log());
    }
}

#[test]
fn clonekvd_reads_a_toml_config_file_and_flags_win_over_it() {
    let scratch = Scratch::new("config");
    let ports = PortBlock::allocate();
    let config = scratch.path().join("clonekvd.toml");
    // The file asks for port + 0 ...; the flag moves the base port to + 4.
    std::fs::write(
        &config,
        format!(
            "role = \"primary\"\nbind-host = \"127.0.0.1\"\nport = {}\nstate-port = {}\n\
             peer-host = \"127.0.0.1\"\npeer-port = {}\npeer-state-port = {}\n\
             heartbeat = \"200ms\"\n",
            ports.port(0),
            ports.port(8),
            ports.port(12),
            ports.port(9),
        ),
    )
    .expect("write config");
    let args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--port".to_string(),
        ports.port(4).to_string(),
    ];
    let mut daemon = clonekv_tests::Daemon::spawn("configured", &args, scratch.path());
    daemon.wait_for_log(&format!("snapshot=tcp://127.0.0.1:{}", ports.port(4)));

    let server = format!("tcp://127.0.0.1:{}", ports.port(4));
    let set = tool("clonekv")
        .args([
            "--server",
            &server,
            "--timeout",
            "60s",
            "set",
            "/cfg",
            "ok",
            "--wait",
        ])
        .output()
        .expect("run clonekv");
    assert_success(&set, "set against the configured server");

    let bad = scratch.path().join("bad.toml");
    std::fs::write(&bad, "prot = 5556\n").expect("write bad config");
    let output = tool("clonekvd")
        .args(["--config", &bad.display().to_string()])
        .output()
        .expect("run clonekvd");
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.starts_with("clonekvd: config file "), "{message}");
    assert!(message.contains("line 1"), "{message}");

    // An error further down names its own line, not the one before it.
    let bad = scratch.path().join("bad-line-3.toml");
    std::fs::write(
        &bad,
        "port = 5556\nheartbeat = \"1s\"\nprot = 5556\nrole = \"backup\"\n",
    )
    .expect("write bad config");
    let output = tool("clonekvd")
        .args(["--config", &bad.display().to_string()])
        .output()
        .expect("run clonekvd");
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("line 3:"), "{message}");
    assert!(message.contains("prot"), "{message}");
}

#[test]
fn the_cli_says_in_one_line_when_no_server_answers() {
    let ports = PortBlock::allocate();
    let nobody = format!("tcp://127.0.0.1:{}", ports.port(0));
    let output = tool("clonekv")
        .args(["--server", &nobody, "--timeout", "30s", "get", "/x"])
        .env_remove("CLONEKV_SERVERS")
        .output()
        .expect("run clonekv");
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.starts_with(&format!(
            "clonekv: cannot reach {nobody}: connection refused"
        )),
        "{message}"
    );
}

#[test]
fn bad_arguments_are_one_line_errors_with_status_2() {
    let bad_endpoint = tool("clonekv")
        .args(["--server", "localhost", "get", "/x"])
        .output()
        .expect("run clonekv");
    assert_eq!(bad_endpoint.status.code(), Some(2));
    assert_eq!(
        stderr(&bad_endpoint).lines().count(),
        1,
        "{}",
        stderr(&bad_endpoint)
    );

    let bad_duration = tool("clonekvd")
        .args(["--heartbeat", "soon"])
        .output()
        .expect("run clonekvd");
    assert_eq!(bad_duration.status.code(), Some(2));

    let zero = tool("clonekvd")
        .args(["--max-snapshot-streams", "0"])
        .output()
        .expect("run clonekvd");
    assert_eq!(zero.status.code(), Some(2));
    assert!(stderr(&zero).starts_with("clonekvd: invalid configuration: max_snapshot_streams"));

    for program in ["clonekvd", "clonekv"] {
        let help = Command::new(binary(program))
            .arg("--help")
            .output()
            .expect("run --help");
        assert_success(&help, "--help");
        assert!(stdout(&help).contains("Usage:"));
    }
}
