//! `clonekvd --data-dir`: a pair that loses both servers keeps every confirmed write; a
//! backup back from a short absence resumes instead of taking a full snapshot; a torn
//! log tail is cut off and reported; a data directory of another format version is
//! refused.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clonekv_core::server::persist::{encode_header, FileKind};
use clonekv_tests::{tool, wait_until, Cluster, Role, Scratch, PATIENCE};
use clonekv_zmq::client::ClientError;

/// Waits until the primary is active and the backup follows it.
fn settle(cluster: &mut Cluster) {
    cluster
        .daemon(Role::Primary)
        .wait_for_log("from=primary to=active");
    cluster
        .daemon(Role::Backup)
        .wait_for_log("synced from the active peer");
}

/// The whole map under `subtree` and the sequence, as a fresh client of `role` sees it.
fn server_map(cluster: &Cluster, role: Role, subtree: &str) -> (i64, BTreeMap<String, String>) {
    let client = cluster
        .client_of(role)
        .subtree(subtree)
        .connect()
        .expect("connect");
    let status = client.wait_synced(PATIENCE).expect("the server answers");
    let map = client
        .dump(subtree)
        .expect("dump")
        .into_iter()
        .map(|(key, entry)| {
            (
                String::from_utf8_lossy(&key).into_owned(),
                String::from_utf8_lossy(&entry.value).into_owned(),
            )
        })
        .collect();
    client.shutdown().expect("shutdown");
    (status.sequence, map)
}

/// The one log file of a data directory.
fn log_file(dir: &Path) -> PathBuf {
    let logs: Vec<PathBuf> = fs::read_dir(dir)
        .expect("the data directory exists")
        .map(|entry| entry.expect("list").path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("log-"))
        })
        .collect();
    assert_eq!(logs.len(), 1, "one log file in {}: {logs:?}", dir.display());
    logs.into_iter().next().unwrap_or_default()
}

#[test]
fn a_pair_killed_under_write_load_restarts_with_every_confirmed_write_and_numbering_continues() {
    let mut cluster = Cluster::new("persist-kill").with_data_dirs("always");
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    settle(&mut cluster);
    let subtree = "/load/";

    let writer = cluster
        .client()
        .subtree(subtree)
        .connect()
        .expect("connect writer");
    writer.wait_synced(PATIENCE).expect("writer syncs");
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut committed = BTreeMap::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("{subtree}{n:05}");
                let timeout = Duration::from_secs(3);
                match writer.set_confirmed(&key, format!("v{n}"), None, timeout) {
                    Ok(sequence) => {
                        committed.insert(key, (format!("v{n}"), sequence));
                    }
                    // The servers died before its echo: fate unknown, not counted.
                    Err(ClientError::Lost(_) | ClientError::CommitTimeout { .. }) => {}
                    Err(other) => panic!("writer: {other}"),
                }
                n += 1;
            }
            let _ = writer.shutdown();
            committed
        })
    };

    // Kill both while the writer is mid-stream, once it has committed a few hundred.
    let primary_data = cluster.data_dir(Role::Primary);
    wait_until(
        "a few hundred committed writes on the primary's disk",
        || fs::metadata(log_file(&primary_data)).is_ok_and(|meta| meta.len() > 300 * 40),
    );
    cluster.kill(Role::Primary);
    cluster.kill(Role::Backup);
    stop.store(true, Ordering::SeqCst);
    let committed = load.join().expect("the writer thread");
    assert!(
        committed.len() >= 100,
        "the load committed only {} writes",
        committed.len()
    );
    let highest = committed
        .values()
        .map(|(_, sequence)| *sequence)
        .max()
        .unwrap_or_default();

    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    cluster
        .daemon(Role::Primary)
        .wait_for_log("restored the map from the data directory");
    settle(&mut cluster);

    // The backup (passive) serves no snapshot; it follows the primary, which must hold
    // everything.
    {
        let role = Role::Primary;
        let (sequence, map) = server_map(&cluster, role, subtree);
        let missing: Vec<&String> = committed
            .iter()
            .filter(|(key, (value, _))| map.get(*key) != Some(value))
            .map(|(key, _)| key)
            .collect();
        assert!(
            missing.is_empty(),
            "{role:?} lost {} of {} confirmed writes, first {:?}",
            missing.len(),
            committed.len(),
            missing.first()
        );
        assert!(
            sequence >= highest,
            "{role:?} restarted at sequence {sequence}, below the confirmed {highest}"
        );
    }
    let client = cluster
        .client()
        .subtree(subtree)
        .connect()
        .expect("connect");
    client.wait_synced(PATIENCE).expect("sync");
    let next = client
        .set_confirmed(format!("{subtree}after"), "restart", None, PATIENCE)
        .expect("a write after the restart commits");
    assert!(
        next > highest,
        "numbering went back: {next} after a confirmed {highest}"
    );
    client.shutdown().expect("shutdown");
}

#[test]
fn a_torn_log_tail_is_cut_off_and_reported_and_the_rest_is_served() {
    let mut cluster = Cluster::new("persist-torn").with_data_dirs("always");
    cluster.start(Role::Primary);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/t/")
        .connect()
        .expect("connect");
    client.wait_synced(PATIENCE).expect("a lone primary serves");
    for n in 1..=3 {
        client
            .set_confirmed(format!("/t/{n}"), format!("value {n}"), None, PATIENCE)
            .expect("commit");
    }
    client.shutdown().expect("shutdown");
    cluster.kill(Role::Primary);

    // Half of the last record reaches the disk, as if the machine lost power mid-write.
    let log = log_file(&cluster.data_dir(Role::Primary));
    let length = fs::metadata(&log).expect("log").len();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open log");
    file.set_len(length - 10).expect("truncate");
    drop(file);

    cluster.start(Role::Primary);
    cluster
        .daemon(Role::Primary)
        .wait_for_log("cut a torn or damaged tail off the log");
    let (sequence, map) = server_map(&cluster, Role::Primary, "/t/");
    let expected: BTreeMap<String, String> = (1..=2)
        .map(|n| (format!("/t/{n}"), format!("value {n}")))
        .collect();
    assert_eq!(map, expected);
    assert_eq!(sequence, 2);
    let cut = cut_bytes(&cluster);
    assert!(
        cut > 0 && cut < 100,
        "cut {cut} bytes: the rest of one record"
    );
    let daemon_log = cluster
        .primary
        .as_ref()
        .map(|daemon| daemon.log())
        .unwrap_or_default();
    assert_eq!(
        log_field(&daemon_log, "cut a torn or damaged tail", "offset"),
        length - 10 - cut,
        "the file was cut back to its last whole record"
    );
    // The restarted primary appends to what is left (its new reign's history record).
    assert!(fs::metadata(&log).expect("log").len() >= length - 10 - cut);
}

/// The bytes the daemon reported cutting, from its log line.
fn cut_bytes(cluster: &Cluster) -> u64 {
    let log = cluster
        .primary
        .as_ref()
        .map(|daemon| daemon.log())
        .unwrap_or_default();
    let line = log
        .lines()
        .find(|line| line.contains("cut a torn or damaged tail"))
        .unwrap_or_default();
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("bytes="))
        .and_then(|bytes| bytes.parse().ok())
        .unwrap_or_else(|| panic!("no bytes= in {line:?}"))
}

#[test]
fn a_key_whose_ttl_ran_out_while_the_server_was_down_does_not_come_back() {
    let mut cluster = Cluster::new("persist-ttl").with_data_dirs("always");
    cluster.start(Role::Primary);
    let client = cluster
        .client_of(Role::Primary)
        .subtree("/ttl/")
        .connect()
        .expect("connect");
    client.wait_synced(PATIENCE).expect("a lone primary serves");
    client
        .set_confirmed("/ttl/kept", "stays", None, PATIENCE)
        .expect("commit");
    let expiring = client
        .set_confirmed("/ttl/brief", "goes", Some(Duration::from_secs(3)), PATIENCE)
        .expect("commit");
    client.shutdown().expect("shutdown");
    cluster.kill(Role::Primary);
    std::thread::sleep(Duration::from_millis(3200));

    cluster.start(Role::Primary);
    let needle = "restored the map from the data directory";
    cluster.daemon(Role::Primary).wait_for_log(needle);
    let log = cluster.daemon(Role::Primary).log();
    let line = log
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_default();
    assert!(
        line.contains("keys=2"),
        "both keys were on disk when it was killed: {line}"
    );
    let (sequence, map) = server_map(&cluster, Role::Primary, "/ttl/");
    assert_eq!(
        map,
        BTreeMap::from([("/ttl/kept".to_string(), "stays".to_string())])
    );
    assert!(
        sequence > expiring,
        "the expiry is published as a new update ({sequence} after {expiring})"
    );
}

#[test]
fn a_data_directory_of_another_format_version_is_refused_with_exit_status_2() {
    let scratch = Scratch::new("persist-version");
    let dir = scratch.path().join("data");
    fs::create_dir_all(&dir).expect("mkdir");
    let mut header = encode_header(FileKind::Snapshot, 1);
    header[8..12].copy_from_slice(&99u32.to_be_bytes());
    fs::write(dir.join("snapshot"), header).expect("write");
    let output = tool("clonekvd")
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "--bind-host",
            "127.0.0.1",
            "--port",
            "1",
            "--state-port",
            "4",
        ])
        .output()
        .expect("run clonekvd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("format version 99") && stderr.contains("reads versions 1 to 2"),
        "{stderr}"
    );
}

/// A counter of a server's /metrics (served with `--metrics`), 0 if absent.
fn counter(port: u16, name: &str) -> u64 {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut response = ureq::get(&url)
        .call()
        .unwrap_or_else(|error| panic!("GET {url}: {error}"));
    let text = response
        .body_mut()
        .read_to_string()
        .expect("the metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The `name=value` field of the first line of a daemon's log that contains `needle`.
fn log_field(daemon_log: &str, needle: &str, name: &str) -> u64 {
    let line = daemon_log
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}"));
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(&format!("{name}=")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

#[test]
fn a_backup_back_from_a_short_absence_resumes_without_a_full_snapshot() {
    // The gateway's ports serve /metrics alone (the gateway is off).
    let metrics_port = |cluster: &Cluster, role: Role| cluster.http_port(role);
    let mut cluster = Cluster::new("persist-resume").with_data_dirs("always");
    for role in [Role::Primary, Role::Backup] {
        let args = vec![
            "--metrics".to_string(),
            format!("127.0.0.1:{}", metrics_port(&cluster, role)),
        ];
        cluster = cluster.with_role_args(role, &args);
    }
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    settle(&mut cluster);
    let client = cluster.client().subtree("/r/").connect().expect("connect");
    client.wait_synced(PATIENCE).expect("sync");
    let mut last_before = 0;
    for n in 0..200 {
        last_before = client
            .set_confirmed(format!("/r/{n:03}"), "before", None, PATIENCE)
            .expect("commit");
    }
    // A confirmed write is published, not yet applied by the backup: on a busy machine
    // the backup may lag, and would then resume from further back.
    wait_until(
        "the backup applies every write made before its absence",
        || counter(metrics_port(&cluster, Role::Backup), "clonekv_sequence") >= last_before as u64,
    );
    cluster.kill(Role::Backup);
    // While the backup is away: 40 writes and 10 deletes.
    for n in 0..40 {
        client
            .set_confirmed(format!("/r/{n:03}"), "while away", None, PATIENCE)
            .expect("commit");
    }
    for n in 190..200 {
        client
            .delete_confirmed(format!("/r/{n:03}"), PATIENCE)
            .expect("delete");
    }
    cluster.start(Role::Backup);
    cluster
        .daemon(Role::Backup)
        .wait_for_log("synced from the active peer by resuming");
    let backup_log = cluster.daemon(Role::Backup).log();
    assert_eq!(
        log_field(
            &backup_log,
            "synced from the active peer by resuming",
            "changes"
        ),
        50
    );
    assert!(
        !backup_log.contains("(full snapshot)"),
        "the restarted backup took a full snapshot:\n{backup_log}"
    );
    // The counters reach /metrics with the daemon's periodic status.
    wait_until("the backup counts one resumed sync", || {
        counter(
            metrics_port(&cluster, Role::Backup),
            "clonekv_syncs_resumed_total",
        ) == 1
    });
    wait_until("the primary counts one resume served", || {
        counter(
            metrics_port(&cluster, Role::Primary),
            "clonekv_resumes_served_total",
        ) == 1
    });
    // One more write reaches the resumed backup as any update does.
    client
        .set_confirmed("/r/last", "after", None, PATIENCE)
        .expect("commit");
    client.shutdown().expect("shutdown");

    // The backup's map, seen once it serves: every write, none of the deleted keys.
    cluster.kill(Role::Primary);
    let (_, map) = server_map(&cluster, Role::Backup, "/r/");
    assert_eq!(map.len(), 191, "190 keys and /r/last");
    assert_eq!(map.get("/r/000").map(String::as_str), Some("while away"));
    assert_eq!(map.get("/r/100").map(String::as_str), Some("before"));
    assert_eq!(map.get("/r/last").map(String::as_str), Some("after"));
    assert!(!map.contains_key("/r/195"));
}
