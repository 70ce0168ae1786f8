//! Everyday use through the `clonekv` CLI and the client library against a real pair:
//! set, get, delete and watch across two clients, and ttl expiry.

use std::process::Stdio;
use std::time::Duration;

use clonekv_tests::{assert_success, stdout, Cluster, LineReader, Role, PATIENCE};
use clonekv_zmq::client::Event;

#[test]
fn set_get_delete_and_watch_work_across_two_clients() {
    let cluster = Cluster::pair("basics");

    // A key that exists before anyone watches.
    assert_success(
        &cluster.cli(&["set", "/color/moon", "white", "--wait"]),
        "set --wait",
    );

    // Client one watches the subtree from its own process: first what is there, then
    // the changes.
    let mut watcher = cluster
        .cli_command(&["watch", "/color/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start clonekv watch");
    let mut watched = LineReader::new(watcher.stdout.take().expect("watch stdout"));
    watched.wait_for("set /color/moon=white (sequence ");
    watched.wait_for("# synced from");

    // Client two writes with the CLI, waiting for each commit.
    let set = cluster.cli(&["set", "/color/sky", "blue", "--wait"]);
    assert_success(&set, "set --wait");
    assert!(
        stdout(&set).starts_with("committed at sequence "),
        "{}",
        stdout(&set)
    );
    watched.wait_for("set /color/sky=blue (sequence ");

    let get = cluster.cli(&["get", "/color/sky"]);
    assert_success(&get, "get");
    assert_eq!(stdout(&get), "blue\n");

    // A third client, the library, sees the same value and its own change reaches the
    // watcher too.
    let library = cluster
        .client()
        .subtree("/color/")
        .connect()
        .expect("connect");
    library.wait_synced(PATIENCE).expect("library client syncs");
    assert_eq!(
        library.get("/color/sky").unwrap().as_deref(),
        Some(&b"blue"[..])
    );
    library
        .set_confirmed("/color/grass", "green", None, PATIENCE)
        .expect("library set commits");
    watched.wait_for("set /color/grass=green (sequence ");

    let json = cluster.cli(&["--json", "get", "/color/grass"]);
    assert_success(&json, "get --json");
    assert!(
        stdout(&json).contains(r#""value":"green""#),
        "{}",
        stdout(&json)
    );

    // Delete from the CLI: the watcher and the library see it go.
    let events = library.subscribe();
    assert_success(&cluster.cli(&["del", "/color/sky", "--wait"]), "del --wait");
    assert_success(
        &cluster.cli(&["del", "/color/moon", "--wait"]),
        "del --wait",
    );
    watched.wait_for("del /color/sky (sequence ");
    loop {
        match events.recv_timeout(PATIENCE).expect("delete event") {
            Event::Deleted { key, .. } if key == b"/color/sky" => break,
            _ => continue,
        }
    }
    assert_eq!(library.get("/color/sky").unwrap(), None);
    let missing = cluster.cli(&["get", "/color/sky"]);
    assert_eq!(
        missing.status.code(),
        Some(1),
        "get of a deleted key exits 1"
    );

    let dump = cluster.cli(&["dump", "/color/"]);
    assert_success(&dump, "dump");
    assert_eq!(stdout(&dump), "/color/grass=green\n");

    let status = cluster.cli(&["--json", "status"]);
    assert_success(&status, "status");
    let status = stdout(&status);
    assert!(status.contains(r#""state":"active""#), "{status}");
    assert!(
        status.contains(&format!(
            r#""server":"{}""#,
            cluster.endpoint(Role::Primary)
        )),
        "{status}"
    );

    // Ctrl-C ends the watch cleanly.
    let watcher_pid = watcher.id().to_string();
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &watcher_pid])
        .status()
        .expect("kill -INT");
    assert!(interrupted.success());
    let exit = watcher.wait().expect("watch exits");
    assert!(exit.success(), "watch exits 0 on Ctrl-C, got {exit}");
    library.shutdown().expect("clean shutdown");
}

#[test]
fn an_ephemeral_key_expires_and_every_client_sees_it_go() {
    let cluster = Cluster::pair("ttl");
    let client = cluster
        .client()
        .subtree("/session/")
        .connect()
        .expect("connect");
    client.wait_synced(PATIENCE).expect("sync");
    let events = client.subscribe();

    client
        .set_confirmed(
            "/session/a",
            "token",
            Some(Duration::from_secs(1)),
            PATIENCE,
        )
        .expect("ephemeral set commits");
    client
        .set_confirmed("/session/b", "forever", None, PATIENCE)
        .expect("persistent set commits");

    // The active server deletes it at expiry and publishes the delete.
    loop {
        match events.recv_timeout(PATIENCE).expect("expiry delete") {
            Event::Deleted { key, sequence } if key == b"/session/a" => {
                assert!(sequence > 0, "a server delete, not a local one");
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(client.get("/session/a").unwrap(), None);
    assert_eq!(
        client.get("/session/b").unwrap().as_deref(),
        Some(&b"forever"[..])
    );

    // A client that joins now gets a snapshot without it, from the CLI too.
    let dump = cluster.cli(&["dump", "/session/"]);
    assert_success(&dump, "dump");
    assert_eq!(stdout(&dump), "/session/b=forever\n");

    // The CLI's --ttl makes keys expire the same way.
    assert_success(
        &cluster.cli(&["set", "/session/c", "short", "--ttl", "500ms", "--wait"]),
        "set --ttl --wait",
    );
    loop {
        match events.recv_timeout(PATIENCE).expect("expiry delete") {
            Event::Deleted { key, .. } if key == b"/session/c" => break,
            _ => continue,
        }
    }
    client.shutdown().expect("clean shutdown");
}
