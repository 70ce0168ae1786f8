//! Binary Star failover with real processes: `kill -9` of the primary under a steady
//! write load, and the old primary's return as a passive that converges.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use clonekv_tests::{wait_until, Cluster, Role, PATIENCE};
use clonekv_zmq::client::{Client, ClientError, Event, Events};

fn key(prefix: &str, n: usize) -> String {
    format!("{prefix}{n:05}")
}

fn value(n: usize) -> String {
    format!("v{n}")
}

/// Waits until both servers have settled: the primary active, the backup passive and
/// synced from it.
fn settle(cluster: &mut Cluster) {
    cluster
        .daemon(Role::Primary)
        .wait_for_log("from=primary to=active");
    cluster
        .daemon(Role::Backup)
        .wait_for_log("synced from the active peer");
}

/// Waits until the client has a snapshot from `server` (an index in the cluster's
/// server list: 0 primary, 1 backup): its status says so already, or the event does.
/// The status comes first because the snapshot may have been applied before `events`
/// was subscribed (a busy machine can hold the test thread that long), and that event
/// is then never seen.
fn wait_synced_with(client: &Client, events: &Events, server: usize) {
    let status = client.status().expect("status");
    if status.is_synced() && status.server == server {
        return;
    }
    loop {
        match events.recv_timeout(PATIENCE) {
            Ok(Event::Synced { server: from, .. }) if from == server => return,
            Ok(_) => continue,
            Err(error) => panic!("no snapshot from server {server}: {error}"),
        }
    }
}

/// Waits until the client has applied an update of `key`.
fn wait_for_key(events: &Events, key: &str) {
    loop {
        match events.recv_timeout(PATIENCE) {
            Ok(Event::Updated { key: seen, .. }) if seen == key.as_bytes() => return,
            Ok(Event::Lagged { missed }) => panic!("the test fell {missed} events behind"),
            Ok(_) => continue,
            Err(error) => panic!("never saw {key}: {error}"),
        }
    }
}

/// The whole map of one server, as a fresh client of that server only sees it.
fn server_map(cluster: &Cluster, role: Role, subtree: &str) -> (i64, BTreeMap<Vec<u8>, Vec<u8>>) {
    let client = cluster
        .client_of(role)
        .subtree(subtree)
        .connect()
        .expect("connect");
    let status = client.wait_synced(PATIENCE).expect("the server answers");
    let map = as_map(&client, subtree);
    client.shutdown().expect("shutdown");
    (status.sequence, map)
}

fn as_map(client: &Client, subtree: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    client
        .dump(subtree)
        .expect("dump")
        .into_iter()
        .map(|(key, entry)| (key, entry.value))
        .collect()
}

/// Sets `key` and waits for its commit, trying again (after the client has found a
/// server) when a failover made the outcome unknown.
fn commit(client: &Client, key: &str, value: &str) -> i64 {
    for _ in 0..10 {
        match client.set_confirmed(key, value, None, PATIENCE) {
            Ok(sequence) => return sequence,
            Err(ClientError::Lost(_) | ClientError::CommitTimeout { .. }) => {
                client
                    .wait_synced(PATIENCE)
                    .expect("the client finds a server");
            }
            Err(other) => panic!("set {key}: {other}"),
        }
    }
    panic!("{key} never committed");
}

#[test]
fn a_client_fails_over_to_the_backup_with_every_update_it_had_when_the_primary_is_killed_under_load(
) {
    let mut cluster = Cluster::pair("failover");
    settle(&mut cluster);
    let subtree = "/load/";

    let reader = cluster
        .client()
        .subtree(subtree)
        .connect()
        .expect("connect reader");
    let events = reader.subscribe();
    wait_synced_with(&reader, &events, 0);

    // A steady load: one writer committing one key after another until told to stop.
    let writer = cluster
        .client()
        .subtree(subtree)
        .connect()
        .expect("connect writer");
    writer.wait_synced(PATIENCE).expect("writer syncs");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        std::thread::spawn(move || {
            let mut committed = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                match writer.set_confirmed(key(subtree, n), value(n), None, PATIENCE) {
                    Ok(_) => committed.push(n),
                    // Its echo was due from the server that died: fate unknown.
                    Err(ClientError::Lost(_) | ClientError::CommitTimeout { .. }) => {}
                    Err(other) => panic!("writer: {other}"),
                }
                n += 1;
                written.store(n, Ordering::SeqCst);
            }
            writer.shutdown().expect("writer shutdown");
            committed
        })
    };

    wait_for_key(&events, &key(subtree, 300));
    cluster.kill(Role::Primary);
    let killed_at = written.load(Ordering::SeqCst);

    // The reader moves to the backup, which takes over on its request.
    wait_synced_with(&reader, &events, 1);
    cluster
        .daemon(Role::Backup)
        .wait_for_log("failover: this server is now active");
    // The load goes on through the backup.
    wait_for_key(&events, &key(subtree, killed_at + 300));
    stop.store(true, Ordering::SeqCst);
    let committed = load.join().expect("writer thread");

    let (backup_sequence, backup) = server_map(&cluster, Role::Backup, subtree);
    for n in &committed {
        assert_eq!(
            backup.get(key(subtree, *n).as_bytes()),
            Some(&value(*n).into_bytes()),
            "committed update {n} is missing on the backup"
        );
    }
    for (stored_key, stored_value) in &backup {
        let text = String::from_utf8_lossy(stored_key);
        let n: usize = text
            .trim_start_matches(subtree)
            .parse()
            .unwrap_or_else(|_| panic!("unexpected key {text}"));
        assert_eq!(stored_value, value(n).as_bytes(), "{text}");
    }
    // About 300 commits before the kill and 300 after it, less the few in flight then.
    assert!(
        committed.len() > 500,
        "the load kept committing: {}",
        committed.len()
    );

    // The reader ends up with exactly the backup's map.
    wait_until("the reader to catch up with the backup", || {
        reader.status().expect("status").sequence >= backup_sequence
    });
    assert_eq!(as_map(&reader, subtree), backup);
    assert_eq!(reader.status().expect("status").server, 1);
    reader.shutdown().expect("reader shutdown");
}

#[test]
fn a_restarted_primary_comes_back_passive_and_converges() {
    let mut cluster = Cluster::pair("restart");
    settle(&mut cluster);
    let subtree = "/conv/";
    let reader = cluster
        .client()
        .subtree(subtree)
        .connect()
        .expect("connect reader");
    let events = reader.subscribe();
    wait_synced_with(&reader, &events, 0);
    let writer = cluster
        .client()
        .subtree(subtree)
        .connect()
        .expect("connect writer");
    writer.wait_synced(PATIENCE).expect("writer syncs");

    for n in 0..100 {
        commit(&writer, &key(subtree, n), &value(n));
    }
    cluster.kill(Role::Primary);
    wait_synced_with(&reader, &events, 1);
    for n in 100..200 {
        commit(&writer, &key(subtree, n), &value(n));
    }

    // The old primary returns: it hears an active peer, so it goes passive and takes a
    // snapshot from the backup.
    let primary = cluster.start(Role::Primary);
    let after_start = primary.wait_for_log("from=primary to=passive");
    primary.wait_for_log_from(after_start, "synced from the active peer");
    // Then it follows the backup's live updates.
    for n in 200..300 {
        commit(&writer, &key(subtree, n), &value(n));
    }
    // An overwrite and a delete must converge too.
    commit(&writer, &key(subtree, 0), "overwritten");
    writer
        .delete_confirmed(key(subtree, 1), PATIENCE)
        .expect("delete commits");
    writer.shutdown().expect("writer shutdown");
    let (_, backup) = server_map(&cluster, Role::Backup, subtree);
    assert_eq!(backup.len(), 299);

    // Take the backup away: the reader fails over to the old primary, which must hold
    // exactly what the backup held.
    cluster.kill(Role::Backup);
    wait_synced_with(&reader, &events, 0);
    cluster
        .daemon(Role::Primary)
        .wait_for_log("failover: this server is now active");
    assert_eq!(as_map(&reader, subtree), backup);
    reader.shutdown().expect("reader shutdown");
}
