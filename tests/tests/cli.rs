//! The `clonekv` CLI as a user meets it: errors in one line that say why, values from
//! stdin and files, bytes that are not UTF-8, the pair's status, completions and the
//! manual page.

use std::io::Write;
use std::process::{Output, Stdio};

use base64::Engine as _;
use clonekv_tests::{assert_success, stdout, tool, Cluster, PortBlock, Role};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `clonekv` against explicit servers, outside any cluster, waiting 30 s at most.
fn cli_alone(servers: &str, args: &[&str]) -> Output {
    cli_waiting(servers, "30s", args)
}

fn cli_waiting(servers: &str, timeout: &str, args: &[&str]) -> Output {
    tool("clonekv")
        .args(["--server", servers, "--timeout", timeout])
        .args(args)
        .env_remove("CLONEKV_SERVERS")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run clonekv")
}

/// Asserts a failure with `status` and exactly one line on stderr that starts `prefix`.
fn assert_one_line_error(output: &Output, status: i32, prefix: &str) -> String {
    let message = stderr(output);
    assert_eq!(output.status.code(), Some(status), "{message}");
    assert_eq!(message.lines().count(), 1, "one line only: {message}");
    assert!(message.starts_with(prefix), "{message}");
    message
}

#[test]
fn a_refused_endpoint_is_named_with_its_cause_and_no_library_log() {
    let ports = PortBlock::allocate();
    let nobody = format!("tcp://127.0.0.1:{}", ports.port(0));
    let output = cli_alone(&nobody, &["get", "/x"]);
    let message = assert_one_line_error(&output, 3, "clonekv: cannot reach ");
    assert!(
        message.contains(&format!("{nobody}: connection refused")),
        "{message}"
    );
}

#[test]
fn an_unresolvable_endpoint_is_an_error_at_once() {
    let output = cli_alone("tcp://no-such-host.invalid:5556", &["get", "/x"]);
    let message = assert_one_line_error(&output, 3, "clonekv: cannot reach ");
    assert!(message.contains("cannot resolve"), "{message}");
}

#[test]
fn bad_keys_and_values_are_usage_errors_that_name_the_argument() {
    // Checked before anything connects: no server is needed.
    let nobody = "tcp://127.0.0.1:1";
    let empty_key = cli_alone(nobody, &["set", "", "v"]);
    assert_one_line_error(&empty_key, 2, "clonekv: KEY must not be empty");
    let long_key = "k".repeat(300);
    let too_long = cli_alone(nobody, &["get", &long_key]);
    assert_one_line_error(&too_long, 2, "clonekv: KEY is 300 bytes; the limit is 255");
    let empty_value = cli_alone(nobody, &["set", "/k", ""]);
    assert_one_line_error(&empty_value, 2, "clonekv: VALUE is empty");
    let missing = cli_alone(nobody, &["set", "/k", "--file", "/nonexistent/value"]);
    assert_one_line_error(
        &missing,
        2,
        "clonekv: cannot read --file /nonexistent/value",
    );
}

#[test]
fn values_come_from_stdin_and_files_and_bytes_round_trip() {
    let cluster = Cluster::pair("cli-values");
    let scratch = cluster.scratch().to_path_buf();

    // From stdin: bytes that are not UTF-8.
    let binary_value: &[u8] = b"\xff\xfe\x00bin";
    let mut set = cluster
        .cli_command(&["set", "/v/stdin", "-", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start clonekv set -");
    set.stdin
        .take()
        .expect("stdin")
        .write_all(binary_value)
        .expect("write the value");
    let set = set.wait_with_output().expect("set - finishes");
    assert_success(&set, "set - (stdin)");

    // Text escapes, --json marks and round-trips, --raw gives the bytes back.
    let text = cluster.cli(&["get", "/v/stdin"]);
    assert_success(&text, "get");
    assert_eq!(stdout(&text), "\\xff\\xfe\u{0}bin\n");
    let json = cluster.cli(&["--json", "get", "/v/stdin"]);
    assert_success(&json, "get --json");
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let encoded = parsed["value_base64"].as_str().expect("value_base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    assert_eq!(decoded, binary_value);
    let raw = cluster.cli(&["get", "--raw", "/v/stdin"]);
    assert_success(&raw, "get --raw");
    assert_eq!(raw.stdout, binary_value);

    // From a file: a large value within the limit, and one over it.
    let big: Vec<u8> = (0..900_000u32).map(|n| (n % 251) as u8).collect();
    let big_path = scratch.join("big.bin");
    std::fs::write(&big_path, &big).expect("write big value");
    let big_path = big_path.display().to_string();
    assert_success(
        &cluster.cli(&["set", "/v/file", "--file", &big_path, "--wait"]),
        "set --file",
    );
    let raw = cluster.cli(&["get", "--raw", "/v/file"]);
    assert_success(&raw, "get --raw of the file value");
    assert_eq!(raw.stdout.len(), big.len());
    assert!(raw.stdout == big, "the file's bytes come back unchanged");
    let over_path = scratch.join("over.bin");
    std::fs::write(&over_path, vec![7u8; 2 << 20]).expect("write oversized value");
    let over = cluster.cli(&["set", "/v/over", "--file", &over_path.display().to_string()]);
    let message = assert_one_line_error(&over, 2, "clonekv: --file ");
    assert!(
        message.contains("over the limit of 1048576 bytes"),
        "{message}"
    );

    // dump --long shows each key's sequence and remaining ttl.
    assert_success(
        &cluster.cli(&["set", "/v/ephemeral", "x", "--ttl", "1h", "--wait"]),
        "set --ttl",
    );
    let dump = cluster.cli(&["dump", "--long", "/v/"]);
    assert_success(&dump, "dump --long");
    let listing = stdout(&dump);
    let ephemeral = listing
        .lines()
        .find(|line| line.starts_with("/v/ephemeral=x\t"))
        .unwrap_or_else(|| panic!("no /v/ephemeral in {listing}"));
    assert!(ephemeral.contains("\tsequence="), "{ephemeral}");
    let ttl: f64 = ephemeral
        .rsplit("ttl=")
        .next()
        .and_then(|ttl| ttl.strip_suffix('s'))
        .and_then(|ttl| ttl.parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {ephemeral}"));
    assert!(ttl > 3_000.0 && ttl <= 3_600.0, "{ephemeral}");
    assert!(
        listing.contains("/v/stdin=\\xff\\xfe\\x00bin\tsequence="),
        "{listing}"
    );
}

#[test]
fn status_shows_both_servers_of_the_pair() {
    let cluster = Cluster::pair("cli-status");
    assert_success(&cluster.cli(&["set", "/s/a", "1", "--wait"]), "set");
    let status = cluster.cli(&["status"]);
    assert_success(&status, "status");
    let text = stdout(&status);
    let line_of = |role: Role| {
        let endpoint = cluster.endpoint(role);
        text.lines()
            .find(|line| line.starts_with(&endpoint))
            .unwrap_or_else(|| panic!("no line for {endpoint} in {text}"))
            .to_string()
    };
    let primary = line_of(Role::Primary);
    let backup = line_of(Role::Backup);
    assert!(primary.contains(" active "), "{primary}");
    assert!(backup.contains(" passive "), "{backup}");
    assert!(primary.contains("yes (snapshot)"), "{primary}");

    let json = cluster.cli(&["--json", "status"]);
    assert_success(&json, "status --json");
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let servers = parsed["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0]["state"], "active");
    assert_eq!(servers[1]["state"], "passive");
    assert!(servers[0]["keys"].as_u64().is_some_and(|keys| keys >= 1));
}

#[test]
fn when_only_a_passive_answers_the_cli_says_so_and_names_the_missing_primary() {
    let mut cluster = Cluster::new("cli-passive-only");
    cluster.start(Role::Backup);
    let output = cli_waiting(&cluster.servers().join(","), "3s", &["get", "/x"]);
    let message = assert_one_line_error(&output, 3, "clonekv: no active server within 3s: ");
    assert!(
        message.contains(&format!("{} is backup", cluster.endpoint(Role::Backup))),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "{} (connection refused)",
            cluster.endpoint(Role::Primary)
        )),
        "{message}"
    );
}

#[test]
fn completions_and_the_manual_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let output = tool("clonekv")
            .args(["completions", shell])
            .output()
            .expect("run clonekv completions");
        assert!(output.status.success(), "{shell}: {}", stderr(&output));
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(script.contains("clonekv"), "{shell}");
        assert!(
            script.contains("dump"),
            "{shell}: subcommands are completed"
        );
    }
    let bad = tool("clonekv")
        .args(["completions", "tcsh"])
        .output()
        .expect("run clonekv completions tcsh");
    assert_eq!(bad.status.code(), Some(2));
    let man = tool("clonekv")
        .arg("man")
        .output()
        .expect("run clonekv man");
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH clonekv"),
        "{page}"
    );
    assert!(page.contains("completions"), "{page}");
    // A reader that stops early (`| head`) is not an error.
    let mut early = tool("clonekv")
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run clonekv completions");
    drop(early.stdout.take());
    let early = early.wait_with_output().expect("completions finishes");
    assert!(stderr(&early).is_empty(), "{}", stderr(&early));
}

#[test]
fn bench_against_a_users_pair_writes_under_its_prefix_and_removes_every_key() {
    let cluster = Cluster::pair("cli-bench-cleanup");
    assert_success(
        &cluster.cli(&["set", "/user/keep", "yes", "--wait"]),
        "set the user's key",
    );
    let bench = tool("clonekv")
        .args([
            "bench",
            "--endpoint",
            &cluster.endpoint(Role::Primary),
            "--backup-endpoint",
            &cluster.endpoint(Role::Backup),
            "--quick",
            "--skip",
            "throughput,pair,latency,failover",
            "--keys",
            "2000",
        ])
        .env_remove("CLONEKV_SERVERS")
        .output()
        .expect("run clonekv bench");
    let report = stdout(&bench);
    assert!(bench.status.success(), "{report}{}", stderr(&bench));
    assert!(report.contains("2000 deletes under /cb-"), "{report}");
    assert!(report.contains("none left"), "{report}");
    let dump = cluster.cli(&["dump"]);
    assert_success(&dump, "dump");
    assert_eq!(
        stdout(&dump),
        "/user/keep=yes\n",
        "only the user's key is left"
    );
}

#[test]
fn a_10_mb_value_from_a_file_works_up_to_the_servers_limit() {
    let mut cluster = Cluster::new("cli-10mb").with_daemon_args(&["--max-body-len", "16777216"]);
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    let value: Vec<u8> = (0..10_000_000u32).map(|n| (n % 253) as u8).collect();
    let path = cluster.scratch().join("ten-megabytes.bin");
    std::fs::write(&path, &value).expect("write the value");
    let path = path.display().to_string();

    // The CLI's default limit is the servers' default: it says which flag to pass.
    let refused = cluster.cli(&["set", "/big/v", "--file", &path]);
    let message = assert_one_line_error(&refused, 2, "clonekv: --file ");
    assert!(message.contains("--max-value-len"), "{message}");

    let limit = ["--max-value-len", "16777216"];
    let set = cluster.cli(&[&limit[..], &["set", "/big/v", "--file", &path, "--wait"]].concat());
    assert_success(&set, "set --file of 10 MB");
    let get = cluster.cli(&[&limit[..], &["get", "--raw", "/big/v"]].concat());
    assert_success(&get, "get --raw of 10 MB");
    assert!(get.stdout == value, "the 10 MB come back unchanged");
}
