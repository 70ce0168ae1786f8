use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use proptest::prelude::*;
use rand_core::SeedableRng;

use super::*;
use crate::kvmsg::{HUGZ, KTHXBAI};

// --- Harness ----------------------------------------------------------------------------

const A: ServerIndex = ServerIndex(0);
const B: ServerIndex = ServerIndex(1);
const C: ServerIndex = ServerIndex(2);
const SUBTREE: &str = "/a/";
/// Uuid of updates made by "another client" in these tests.
const OTHER: Uuid = Uuid::from_bytes([0xee; 16]);

type Frames = Vec<Vec<u8>>;

fn ms(millis: u64) -> Instant {
    Instant::from_millis(millis)
}

fn config(servers: usize) -> Config {
    Config {
        servers,
        subtree: SUBTREE.as_bytes().to_vec(),
        ..Config::default()
    }
}

fn client(servers: usize) -> Client {
    Client::new(config(servers), ChaCha8Rng::seed_from_u64(1), ms(0)).unwrap()
}

fn frames(message: KvMsg) -> Frames {
    message.encode().to_vec()
}

fn hugz(sequence: i64) -> Frames {
    frames(KvMsg::hugz(sequence))
}

fn kvpub(key: &str, value: &str, sequence: i64) -> Frames {
    frames(KvMsg::kvset(key.into(), value.into(), OTHER).with_sequence(sequence))
}

fn kvsync(key: &str, value: &str, sequence: i64) -> Frames {
    kvpub(key, value, sequence)
}

fn kthxbai(sequence: i64) -> Frames {
    frames(KvMsg::kthxbai(sequence, SUBTREE.into()))
}

fn sub(client: &mut Client, now: Instant, server: ServerIndex, message: Frames) {
    client.handle_message(now, server, Channel::Subscriber, &message);
}

fn snap(client: &mut Client, now: Instant, server: ServerIndex, message: Frames) {
    client.handle_message(now, server, Channel::Snapshot, &message);
}

fn drain(client: &mut Client) -> Vec<Output> {
    std::iter::from_fn(|| client.poll_output()).collect()
}

fn events(client: &mut Client) -> Vec<Event> {
    drain(client)
        .into_iter()
        .filter_map(|output| match output {
            Output::Event(event) => Some(event),
            _ => None,
        })
        .collect()
}

fn requests(outputs: &[Output]) -> Vec<ServerIndex> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::SendSnapshotRequest { server, .. } => Some(*server),
            _ => None,
        })
        .collect()
}

fn fresh_requests(outputs: &[Output]) -> Vec<(ServerIndex, bool)> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::SendSnapshotRequest {
                server,
                fresh_connection,
                ..
            } => Some((*server, *fresh_connection)),
            _ => None,
        })
        .collect()
}

fn published(outputs: &[Output]) -> Vec<KvMsg> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::Publish { frames } => Some(KvMsg::decode(frames, &Limits::default()).unwrap()),
            _ => None,
        })
        .collect()
}

/// The local map as `key=value@sequence` strings, in key order.
fn contents(client: &Client) -> Vec<String> {
    client
        .iter()
        .map(|(key, entry)| {
            format!(
                "{}={}@{}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&entry.value),
                entry.sequence
            )
        })
        .collect()
}

/// Makes `server` current-and-live and completes a snapshot of `entries` at `sequence`.
fn sync(
    client: &mut Client,
    now: Instant,
    server: ServerIndex,
    sequence: i64,
    entries: &[(&str, &str, i64)],
) {
    sub(client, now, server, hugz(sequence));
    for (key, value, entry_sequence) in entries {
        snap(client, now, server, kvsync(key, value, *entry_sequence));
    }
    snap(client, now, server, kthxbai(sequence));
    assert_eq!(client.state(), State::Active);
}

fn fail_over(client: &mut Client, now: Instant) {
    let from = client.current_server();
    client.handle_timeout(now);
    assert_ne!(client.state(), State::Active, "no failover from {from}");
}

// --- Configuration ----------------------------------------------------------------------

#[test]
fn a_zero_echo_timeout_is_invalid() {
    let config = Config {
        echo_timeout: Duration::ZERO,
        ..config(1)
    };
    assert_eq!(config.validate(), Err(Error::ZeroEchoTimeout));
}

#[test]
fn a_config_without_servers_is_invalid() {
    let config = Config {
        servers: 0,
        ..Config::default()
    };
    assert_eq!(config.validate(), Err(Error::NoServers));
    assert_eq!(
        Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)).err(),
        Some(Error::NoServers)
    );
}

#[test]
fn a_zero_server_ttl_is_invalid() {
    let config = Config {
        server_ttl: Duration::ZERO,
        ..Config::default()
    };
    assert_eq!(config.validate(), Err(Error::ZeroServerTtl));
}

#[test]
fn zero_bounds_are_invalid() {
    let config = Config {
        max_buffered_updates: 0,
        ..Config::default()
    };
    assert_eq!(
        config.validate(),
        Err(Error::ZeroLimit {
            name: "max_buffered_updates"
        })
    );
    let config = Config {
        max_in_flight: 0,
        ..Config::default()
    };
    assert_eq!(
        config.validate(),
        Err(Error::ZeroLimit {
            name: "max_in_flight"
        })
    );
}

#[test]
fn a_subtree_longer_than_the_key_limit_is_invalid() {
    let config = Config {
        subtree: vec![b'x'; 256],
        ..Config::default()
    };
    assert_eq!(
        config.validate(),
        Err(Error::SubtreeTooLong { len: 256, max: 255 })
    );
}

#[test]
fn the_default_config_is_valid_with_a_five_second_server_ttl() {
    assert_eq!(Config::default().validate(), Ok(()));
    assert_eq!(Config::default().server_ttl, Duration::from_secs(5));
}

// --- §4: the subscription must be live before the snapshot request --------------------

#[test]
fn no_snapshot_request_before_the_subscription_is_live() {
    let mut client = client(2);
    assert_eq!(client.state(), State::Initial);
    assert!(drain(&mut client).is_empty());
    client.handle_timeout(ms(4_999));
    assert!(requests(&drain(&mut client)).is_empty());
    // A snapshot reply or another server's HUGZ is not our subscriber speaking.
    sub(&mut client, ms(100), B, hugz(3));
    assert!(requests(&drain(&mut client)).is_empty());
    assert!(!client.is_subscription_live());
    assert_eq!(client.state(), State::Initial);

    sub(&mut client, ms(200), A, hugz(3));
    assert!(client.is_subscription_live());
    assert_eq!(requests(&drain(&mut client)), vec![A]);
    assert_eq!(client.state(), State::Syncing);
}

#[test]
fn the_snapshot_request_is_icanhaz_and_the_subtree_to_the_current_server() {
    let mut client = client(2);
    sub(&mut client, ms(0), A, kvpub("/a/x", "1", 4));
    let outputs = drain(&mut client);
    let [Output::SendSnapshotRequest { server, frames, .. }] = outputs.as_slice() else {
        panic!("expected exactly one request, got {outputs:?}");
    };
    assert_eq!(*server, A);
    assert_eq!(frames, &[b"ICANHAZ?".to_vec(), b"/a/".to_vec()]);
    assert_eq!(client.outstanding_requests(A), 1);
}

#[test]
fn further_subscriber_messages_while_syncing_send_no_more_requests() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(1));
    sub(&mut client, ms(1_000), A, hugz(1));
    sub(&mut client, ms(2_000), A, kvpub("/a/x", "1", 2));
    assert_eq!(requests(&drain(&mut client)), vec![A]);
}

#[test]
fn a_client_that_started_before_its_subscription_was_live_still_ends_up_with_every_update() {
    // The server already has /a/1 at 1. Updates 2 and 3 are published before the SUB's
    // subscription reaches the server (the client never sees them); 4 is the first
    // message the SUB delivers, 5 and 6 are published while the snapshot is streaming.
    let mut client = client(1);
    client.handle_timeout(ms(1_000));
    assert!(
        requests(&drain(&mut client)).is_empty(),
        "asked before the SUB was live"
    );
    sub(&mut client, ms(1_500), A, kvpub("/a/4", "four", 4));
    assert_eq!(requests(&drain(&mut client)), vec![A]);
    // The server takes the snapshot at 5 (after publishing 5).
    sub(&mut client, ms(1_510), A, kvpub("/a/5", "five", 5));
    snap(&mut client, ms(1_520), A, kvsync("/a/1", "one", 1));
    snap(&mut client, ms(1_520), A, kvsync("/a/2", "two", 2));
    sub(&mut client, ms(1_525), A, kvpub("/a/6", "six", 6));
    snap(&mut client, ms(1_530), A, kvsync("/a/3", "three", 3));
    snap(&mut client, ms(1_530), A, kvsync("/a/4", "four", 4));
    snap(&mut client, ms(1_530), A, kvsync("/a/5", "five", 5));
    snap(&mut client, ms(1_540), A, kthxbai(5));
    assert_eq!(
        contents(&client),
        [
            "/a/1=one@1",
            "/a/2=two@2",
            "/a/3=three@3",
            "/a/4=four@4",
            "/a/5=five@5",
            "/a/6=six@6"
        ]
    );
    assert_eq!(client.sequence(), 6);
}

// --- §8 SYNCING: a new map, replaced atomically -----------------------------------------

#[test]
fn snapshot_entries_are_invisible_until_kthxbai() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(2));
    snap(&mut client, ms(0), A, kvsync("/a/x", "1", 1));
    snap(&mut client, ms(0), A, kvsync("/a/y", "2", 2));
    assert!(client.is_empty());
    assert_eq!(client.get(b"/a/x"), None);
    snap(&mut client, ms(0), A, kthxbai(2));
    assert_eq!(client.get(b"/a/x"), Some(&b"1"[..]));
    assert_eq!(client.len(), 2);
}

#[test]
fn kthxbai_sets_the_sequence_and_makes_the_client_active() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 42, &[("/a/x", "1", 7)]);
    assert_eq!(client.sequence(), 42);
    assert_eq!(client.state(), State::Active);
    let events = events(&mut client);
    assert!(events.contains(&Event::Synced {
        server: A,
        sequence: 42,
        keys: 1
    }));
    assert_eq!(client.stats().snapshots_applied, 1);
}

#[test]
fn a_snapshot_emits_only_the_differences() {
    let mut client = client(2);
    sync(
        &mut client,
        ms(0),
        A,
        10,
        &[
            ("/a/gone", "g", 1),
            ("/a/same", "s", 2),
            ("/a/changed", "old", 3),
        ],
    );
    drain(&mut client);
    fail_over(&mut client, ms(5_000));
    drain(&mut client);
    sync(
        &mut client,
        ms(5_100),
        B,
        12,
        &[
            ("/a/changed", "new", 11),
            ("/a/new", "n", 12),
            ("/a/same", "s", 2),
        ],
    );
    assert_eq!(
        events(&mut client),
        vec![
            Event::Updated {
                key: b"/a/changed".to_vec(),
                value: b"new".to_vec(),
                sequence: 11
            },
            Event::Deleted {
                key: b"/a/gone".to_vec(),
                sequence: 12
            },
            Event::Updated {
                key: b"/a/new".to_vec(),
                value: b"n".to_vec(),
                sequence: 12
            },
            Event::Synced {
                server: B,
                sequence: 12,
                keys: 3
            },
        ]
    );
}

#[test]
fn stale_keys_disappear_after_failover() {
    let mut client = client(2);
    sync(
        &mut client,
        ms(0),
        A,
        2,
        &[("/a/kept", "k", 1), ("/a/stale", "s", 2)],
    );
    fail_over(&mut client, ms(5_000));
    // B never had /a/stale (it was lost with A). The reference keeps it forever.
    sync(&mut client, ms(5_100), B, 1, &[("/a/kept", "k", 1)]);
    assert_eq!(contents(&client), ["/a/kept=k@1"]);
    assert_eq!(client.current_server(), B);
}

#[test]
fn a_snapshot_that_is_not_finished_at_failover_is_thrown_away() {
    let mut client = client(2);
    sub(&mut client, ms(0), A, hugz(3));
    snap(&mut client, ms(0), A, kvsync("/a/half", "h", 1));
    fail_over(&mut client, ms(5_000));
    sync(&mut client, ms(5_100), B, 3, &[]);
    assert!(client.is_empty());
}

// --- §8 ACTIVE: apply updates above the sequence, drop the rest -------------------------

#[test]
fn updates_above_the_sequence_are_applied_in_order() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 5)]);
    drain(&mut client);
    sub(&mut client, ms(10), A, kvpub("/a/x", "2", 6));
    sub(&mut client, ms(20), A, kvpub("/a/y", "3", 7));
    sub(&mut client, ms(30), A, kvpub("/a/x", "", 8));
    assert_eq!(contents(&client), ["/a/y=3@7"]);
    assert_eq!(client.sequence(), 8);
    assert_eq!(
        events(&mut client),
        vec![
            Event::Updated {
                key: b"/a/x".to_vec(),
                value: b"2".to_vec(),
                sequence: 6
            },
            Event::Updated {
                key: b"/a/y".to_vec(),
                value: b"3".to_vec(),
                sequence: 7
            },
            Event::Deleted {
                key: b"/a/x".to_vec(),
                sequence: 8
            },
        ]
    );
}

#[test]
fn updates_at_or_below_the_sequence_are_dropped() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 5)]);
    drain(&mut client);
    sub(&mut client, ms(10), A, kvpub("/a/x", "old", 5));
    sub(&mut client, ms(10), A, kvpub("/a/y", "older", 3));
    assert_eq!(contents(&client), ["/a/x=1@5"]);
    assert_eq!(client.stats().dropped("old_sequence"), 2);
    assert!(
        events(&mut client).is_empty(),
        "routine drops are not reported"
    );
}

#[test]
fn a_hugz_never_changes_the_map() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 5)]);
    drain(&mut client);
    // HUGZ carries the server's sequence, which counts keys outside our subtree: it is
    // ahead of ours, and the reference would store it as a key named HUGZ.
    sub(&mut client, ms(1_000), A, hugz(99));
    assert_eq!(contents(&client), ["/a/x=1@5"]);
    assert_eq!(client.sequence(), 5);
    assert_eq!(client.get(HUGZ), None);
    assert!(events(&mut client).is_empty());
    // The update 6 that follows is still applied.
    sub(&mut client, ms(1_010), A, kvpub("/a/x", "2", 6));
    assert_eq!(contents(&client), ["/a/x=2@6"]);
}

#[test]
fn a_client_leaves_a_server_whose_hugz_says_it_is_no_longer_active() {
    // Found by the simulator: after a split brain the backup steps down to passive; its
    // clients kept receiving its HUGZ, never timed out, and saw no update again.
    let mut client = client(2);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 5)]);
    drain(&mut client);
    let passive_hugz = frames(KvMsg::hugz_from(BstarState::Passive, 7));
    sub(&mut client, ms(1_000), A, passive_hugz);
    assert_eq!(client.current_server(), B);
    assert_eq!(client.state(), State::Initial);
    assert!(events(&mut client).contains(&Event::ServerChanged { from: A, to: B }));
    assert_eq!(client.stats().left_inactive_server, 1);
    // The map stays until the new server's snapshot replaces it.
    assert_eq!(contents(&client), ["/a/x=1@5"]);
}

#[test]
fn a_marked_hugz_still_proves_the_subscription_live_so_a_client_can_promote_a_backup() {
    // The only way a backup takes over is a client's ICANHAZ?; the backup's HUGZ is
    // what lets the client send it.
    let mut client = client(2);
    client.handle_timeout(ms(5_000));
    assert_eq!(client.current_server(), B);
    drain(&mut client);
    sub(
        &mut client,
        ms(5_100),
        B,
        frames(KvMsg::hugz_from(BstarState::Passive, 7)),
    );
    assert_eq!(requests(&drain(&mut client)), [B]);
    assert_eq!(client.state(), State::Syncing);
}

#[test]
fn a_client_resyncs_when_its_servers_sequence_falls_below_its_own() {
    // Found by the simulator: both servers crashed and restarted within the client's
    // server_ttl; the client stayed, and dropped every update of the new history as old.
    let mut client = client(2);
    sync(&mut client, ms(0), A, 400, &[("/a/x", "old", 400)]);
    drain(&mut client);
    sub(&mut client, ms(1_000), A, hugz(3));
    assert_eq!(client.current_server(), A, "the same server, a new history");
    assert_eq!(requests(&drain(&mut client)), [A]);
    assert_eq!(client.stats().resyncs_after_restart, 1);
    snap(&mut client, ms(1_001), A, kvsync("/a/y", "new", 2));
    snap(&mut client, ms(1_002), A, kthxbai(3));
    assert_eq!(contents(&client), ["/a/y=new@2"]);
    sub(&mut client, ms(1_003), A, kvpub("/a/y", "newer", 4));
    assert_eq!(contents(&client), ["/a/y=newer@4"]);
}

#[test]
fn a_reconnected_subscriber_makes_the_client_take_a_fresh_snapshot() {
    // Found by the simulator (swarm seed 15): a TCP break swallowed a delete; the SUB
    // reconnected and nothing in the stream said anything was missing.
    let mut client = client(2);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "stale", 5)]);
    drain(&mut client);
    client.handle_subscriber_reconnected(ms(1_000), B);
    assert_eq!(
        client.state(),
        State::Active,
        "not our server: nothing to do"
    );
    client.handle_subscriber_reconnected(ms(1_000), A);
    assert_eq!(client.state(), State::Initial);
    assert_eq!(client.stats().resyncs_after_reconnect, 1);
    // Once the subscription is live again, a snapshot replaces the stale map.
    sub(&mut client, ms(1_100), A, hugz(6));
    assert_eq!(requests(&drain(&mut client)), [A]);
    snap(&mut client, ms(1_101), A, kthxbai(6));
    assert!(contents(&client).is_empty());
}

#[test]
fn a_request_lost_with_its_connection_is_asked_again_when_the_dealer_reconnects() {
    let mut client = client(2);
    sub(&mut client, ms(0), A, hugz(5));
    assert_eq!(requests(&drain(&mut client)), [A]);
    // Nothing of the reply came: the connection broke and came back.
    client.handle_snapshot_reconnected(ms(1_000), B);
    assert!(requests(&drain(&mut client)).is_empty(), "not our server");
    client.handle_snapshot_reconnected(ms(1_000), A);
    assert_eq!(client.stats().snapshot_reconnects, 2);
    assert_eq!(requests(&drain(&mut client)), [A]);
    snap(&mut client, ms(1_001), A, kthxbai(5));
    assert_eq!(client.state(), State::Active);
}

#[test]
fn a_dealer_reconnect_while_collecting_asks_again_and_distrusts_the_started_reply() {
    let mut client = client(2);
    sub(&mut client, ms(0), A, hugz(5));
    assert_eq!(requests(&drain(&mut client)), [A]);
    snap(&mut client, ms(1), A, kvsync("/a/x", "1", 3));
    client.handle_snapshot_reconnected(ms(2), A);
    assert_eq!(requests(&drain(&mut client)), [A]);
    // The old reply's tail was still queued: it is incomplete, so it is discarded...
    snap(&mut client, ms(3), A, kvsync("/a/z", "3", 4));
    snap(&mut client, ms(3), A, kthxbai(5));
    assert_eq!(client.state(), State::Syncing);
    drain(&mut client);
    // ... and the reply to the new request is used.
    snap(&mut client, ms(4), A, kvsync("/a/x", "1", 3));
    snap(&mut client, ms(4), A, kvsync("/a/z", "3", 4));
    snap(&mut client, ms(4), A, kthxbai(5));
    assert_eq!(client.state(), State::Active);
    assert_eq!(contents(&client), ["/a/x=1@3", "/a/z=3@4"]);
}

/// A client of the whole map (empty subtree), synced at `sequence` from one server.
fn synced_whole_map_client(sequence: i64) -> Client {
    let config = Config {
        servers: 1,
        subtree: Vec::new(),
        ..Config::default()
    };
    let mut client = Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)).unwrap();
    sub(&mut client, ms(0), A, hugz(sequence));
    snap(
        &mut client,
        ms(0),
        A,
        frames(KvMsg::kthxbai(sequence, Vec::new())),
    );
    assert_eq!(client.state(), State::Active);
    drain(&mut client);
    client
}

#[test]
fn a_whole_map_client_resyncs_on_a_gap_in_the_numbering() {
    let mut client = synced_whole_map_client(5);
    sub(&mut client, ms(10), A, kvpub("/a/x", "2", 6));
    assert_eq!(client.state(), State::Active, "6 follows 5");
    sub(&mut client, ms(20), A, kvpub("/a/x", "4", 8));
    assert_eq!(client.state(), State::Syncing, "7 is missing: ask again");
    assert_eq!(client.stats().resyncs_after_gap, 1);
    assert_eq!(requests(&drain(&mut client)), [A]);
}

#[test]
fn a_whole_map_client_resyncs_on_a_gap_among_the_updates_buffered_during_its_snapshot() {
    let config = Config {
        servers: 1,
        subtree: Vec::new(),
        ..Config::default()
    };
    let mut client = Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)).unwrap();
    sub(&mut client, ms(0), A, hugz(5));
    sub(&mut client, ms(1), A, kvpub("/a/x", "6", 6));
    sub(&mut client, ms(2), A, kvpub("/a/x", "8", 8)); // 7 was dropped by the publisher
    drain(&mut client);
    snap(&mut client, ms(3), A, frames(KvMsg::kthxbai(5, Vec::new())));
    assert_eq!(client.sequence(), 6);
    assert_eq!(client.stats().resyncs_after_gap, 1);
    // The subscription is known live (8 was heard): it asks again at once.
    assert_eq!(
        client.state(),
        State::Syncing,
        "the buffer has a hole: ask again"
    );
    assert_eq!(requests(&drain(&mut client)), [A]);
}

#[test]
fn a_whole_map_client_resyncs_when_a_hugz_is_ahead_of_it() {
    let mut client = synced_whole_map_client(5);
    sub(&mut client, ms(1_000), A, hugz(5));
    assert_eq!(client.state(), State::Active);
    sub(&mut client, ms(2_000), A, hugz(9));
    assert_eq!(client.state(), State::Syncing);
}

#[test]
fn an_own_update_whose_echo_never_comes_makes_the_client_resync() {
    // Found by the simulator (swarm seed 15 and others): a KVSET lost on its way left the
    // provisional local value in the map for good.
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 5)]);
    drain(&mut client);
    let uuid = client
        .set(b"/a/x".to_vec(), b"never-arrives".to_vec(), None)
        .unwrap();
    client.watch_commit(uuid).unwrap();
    drain(&mut client);
    assert_eq!(client.poll_timeout(), Some(ms(5_000)), "the echo deadline");
    sub(&mut client, ms(4_000), A, hugz(5));
    client.handle_timeout(ms(5_000));
    assert_eq!(client.state(), State::Syncing, "a fresh snapshot, at once");
    assert_eq!(client.stats().resyncs_after_lost_update, 1);
    assert!(events(&mut client).contains(&Event::Lost {
        uuid,
        reason: LostReason::NotPublished
    }));
    // The fresh snapshot settles the map: the server never had the update.
    sub(&mut client, ms(5_100), A, hugz(5));
    snap(&mut client, ms(5_101), A, kvsync("/a/x", "1", 5));
    snap(&mut client, ms(5_102), A, kthxbai(5));
    assert_eq!(contents(&client), ["/a/x=1@5"]);
}

#[test]
fn a_snapshot_requested_before_an_own_update_does_not_settle_it() {
    // Found by the simulator (swarm seed 107): the update's KVPUB was lost and the
    // snapshot that completed next had been requested before the update was sent.
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[]);
    drain(&mut client);
    client.handle_subscriber_reconnected(ms(100), A);
    sub(&mut client, ms(200), A, hugz(5));
    assert_eq!(
        requests(&drain(&mut client)),
        [A],
        "a snapshot requested at 200 ms"
    );
    client
        .set(b"/a/x".to_vec(), b"after-request".to_vec(), None)
        .unwrap();
    sub(&mut client, ms(300), A, hugz(5));
    snap(&mut client, ms(400), A, kthxbai(5));
    assert_eq!(client.state(), State::Active);
    // Nothing settled the update: at its deadline the client asks again.
    client.handle_timeout(ms(300) + Duration::from_secs(5));
    assert_eq!(client.stats().resyncs_after_lost_update, 1);
}

#[test]
fn an_echo_in_time_clears_the_deadline() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[]);
    drain(&mut client);
    let uuid = client.set(b"/a/x".to_vec(), b"2".to_vec(), None).unwrap();
    let echo = KvMsg::kvset(b"/a/x".to_vec(), b"2".to_vec(), uuid).with_sequence(6);
    sub(&mut client, ms(100), A, frames(echo));
    assert_eq!(
        client.poll_timeout(),
        Some(ms(100) + Duration::from_secs(5))
    );
    client.handle_timeout(ms(5_000));
    assert_eq!(client.state(), State::Active);
}

#[test]
fn updates_that_arrive_during_the_snapshot_are_applied_after_it() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(1));
    sub(&mut client, ms(1), A, kvpub("/a/x", "in-snapshot", 2));
    sub(&mut client, ms(2), A, kvpub("/a/x", "after", 3));
    snap(&mut client, ms(3), A, kvsync("/a/x", "in-snapshot", 2));
    assert_eq!(client.get(b"/a/x"), None, "buffered, not applied");
    snap(&mut client, ms(4), A, kthxbai(2));
    assert_eq!(contents(&client), ["/a/x=after@3"]);
    assert_eq!(client.stats().dropped("old_sequence"), 1);
}

#[test]
fn updates_outside_the_subtree_are_dropped_and_reported() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[]);
    drain(&mut client);
    sub(&mut client, ms(10), A, kvpub("/b/x", "1", 6));
    assert!(client.is_empty());
    assert_eq!(
        events(&mut client),
        vec![Event::Dropped {
            server: A,
            channel: Channel::Subscriber,
            reason: DropReason::OutsideSubtree
        }]
    );
}

// --- Expiry and failover ----------------------------------------------------------------

#[test]
fn poll_timeout_is_the_current_server_expiry_or_a_request_retry_when_earlier() {
    let mut client = client(2);
    assert_eq!(client.poll_timeout(), Some(ms(5_000)));
    sub(&mut client, ms(1_000), A, hugz(0));
    // A HUGZ without a state mark (the references'): the server may be active, and
    // an active server answers every request with a whole snapshot: no repeat.
    assert_eq!(client.poll_timeout(), Some(ms(6_000)));
    sub(
        &mut client,
        ms(1_100),
        A,
        frames(KvMsg::hugz_from(BstarState::Passive, 0)),
    );
    assert_eq!(
        client.poll_timeout(),
        Some(ms(1_200)),
        "a passive drops requests"
    );
}

#[test]
fn a_request_unanswered_by_a_server_not_known_active_is_repeated_until_the_expiry() {
    let mut client = client(2);
    sub(
        &mut client,
        ms(0),
        A,
        frames(KvMsg::hugz_from(BstarState::Passive, 0)),
    );
    assert_eq!(requests(&drain(&mut client)), [A]);
    for step in 1..25 {
        client.handle_timeout(ms(step * 200));
        assert_eq!(requests(&drain(&mut client)), [A], "repeat {step}");
        assert_eq!(client.current_server(), A);
    }
    assert!(client.outstanding_requests(A) <= MAX_OUTSTANDING_REQUESTS);
    assert_eq!(client.stats().requests_repeated, 24);
    // Repeats do not extend the server's time: at its expiry the client moves on.
    client.handle_timeout(ms(5_000));
    assert_eq!(client.current_server(), B);
    // A reply that has started is not asked for again.
    let mut streaming = self::client(1);
    sub(&mut streaming, ms(0), A, hugz(1));
    drain(&mut streaming);
    snap(&mut streaming, ms(100), A, kvsync("/a/x", "1", 1));
    streaming.handle_timeout(ms(300));
    assert!(requests(&drain(&mut streaming)).is_empty());
}

#[test]
fn silence_from_the_current_server_fails_over_to_the_next() {
    let mut client = client(2);
    sync(&mut client, ms(0), A, 1, &[]);
    drain(&mut client);
    client.handle_timeout(ms(4_999));
    assert_eq!(client.current_server(), A);
    client.handle_timeout(ms(5_000));
    assert_eq!(client.current_server(), B);
    assert_eq!(client.state(), State::Initial);
    assert_eq!(
        events(&mut client),
        vec![Event::ServerChanged { from: A, to: B }]
    );
    assert_eq!(client.stats().failovers, 1);
    // The new server also needs a live subscription before the request.
    assert!(!client.is_subscription_live());
    sub(&mut client, ms(5_100), B, hugz(1));
    assert_eq!(requests(&drain(&mut client)), vec![B]);
}

#[test]
fn a_server_whose_subscriber_never_speaks_is_left_too() {
    let mut client = client(2);
    client.handle_timeout(ms(5_000));
    assert_eq!(client.current_server(), B);
}

#[test]
fn failover_wraps_around_a_server_list_of_any_length() {
    let mut client = client(3);
    let mut visited = vec![client.current_server()];
    for step in 1..=3 {
        client.handle_timeout(ms(step * 5_000));
        visited.push(client.current_server());
    }
    assert_eq!(visited, [A, B, C, A]);
    let mut single = self::client(1);
    single.handle_timeout(ms(5_000));
    assert_eq!(single.current_server(), A);
    assert_eq!(
        events(&mut single),
        vec![Event::ServerChanged { from: A, to: A }]
    );
}

#[test]
fn while_active_any_message_from_the_current_server_keeps_it() {
    let mut client = client(2);
    sync(&mut client, ms(0), A, 1, &[]);
    sub(&mut client, ms(4_000), A, hugz(1));
    client.handle_timeout(ms(8_000));
    assert_eq!(client.current_server(), A);
    sub(&mut client, ms(8_500), A, kvpub("/a/x", "1", 2));
    client.handle_timeout(ms(13_000));
    assert_eq!(client.current_server(), A);
    client.handle_timeout(ms(13_500));
    assert_eq!(client.current_server(), B);
}

#[test]
fn while_syncing_only_snapshot_replies_keep_the_server() {
    // A passive server keeps sending HUGZ but never answers the request.
    let mut client = client(2);
    sub(&mut client, ms(0), A, hugz(1));
    for second in 1..5 {
        sub(&mut client, ms(second * 1_000), A, hugz(1));
    }
    client.handle_timeout(ms(5_000));
    assert_eq!(client.current_server(), B, "HUGZ held a syncing client");

    // Snapshot replies do keep it.
    let mut client = self::client(2);
    sub(&mut client, ms(0), A, hugz(1));
    snap(&mut client, ms(4_000), A, kvsync("/a/x", "1", 1));
    client.handle_timeout(ms(8_000));
    assert_eq!(client.current_server(), A);
    assert_eq!(client.state(), State::Syncing);
}

#[test]
fn messages_from_other_servers_are_counted_and_ignored() {
    let mut client = client(2);
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 5)]);
    drain(&mut client);
    sub(&mut client, ms(10), B, kvpub("/a/x", "from-b", 9));
    sub(&mut client, ms(10), B, hugz(9));
    snap(&mut client, ms(10), B, kvsync("/a/y", "from-b", 9));
    snap(&mut client, ms(10), B, kthxbai(9));
    assert_eq!(contents(&client), ["/a/x=1@5"]);
    assert_eq!(client.stats().dropped("not_current_server"), 4);
    assert!(events(&mut client).is_empty());
    // ... and they do not keep the current server.
    client.handle_timeout(ms(5_000));
    assert_eq!(client.current_server(), B);
}

#[test]
fn a_message_for_an_unknown_server_index_is_counted_and_reported() {
    let mut client = client(2);
    sub(&mut client, ms(0), ServerIndex(7), hugz(1));
    assert!(!client.is_subscription_live());
    assert_eq!(client.stats().dropped("unknown_server"), 1);
    assert_eq!(
        events(&mut client),
        vec![Event::Dropped {
            server: ServerIndex(7),
            channel: Channel::Subscriber,
            reason: DropReason::UnknownServer
        }]
    );
}

// --- Outstanding requests and stale replies -------------------------------------------

#[test]
fn every_later_attempt_on_a_server_asks_on_a_fresh_connection() {
    // A passive A and B: nobody ever answers.
    let mut client = client(2);
    let mut now = 0;
    let mut asked = Vec::new();
    for _ in 0..4 {
        for server in [A, B] {
            sub(&mut client, ms(now), server, hugz(1));
            asked.extend(fresh_requests(&drain(&mut client)));
            now += 5_000;
            client.handle_timeout(ms(now));
            asked.extend(fresh_requests(&drain(&mut client)));
        }
    }
    // The first request to each server goes on the DEALER made at start; every later
    // attempt (the subscription is known live, so it asks with the move) on a new one.
    let mut expected = vec![(A, false), (B, false)];
    expected.extend([(A, true), (B, true)].repeat(3));
    expected.push((A, true));
    assert_eq!(asked, expected);
    // Requests on a closed connection are not waited for, nor written off.
    assert_eq!(client.outstanding_requests(A), 1);
    assert_eq!(client.outstanding_requests(B), 1);
    assert_eq!(client.stats().requests_written_off, 0);
}

#[test]
fn a_late_reply_from_an_earlier_attempt_cannot_reach_the_new_one() {
    // Found by the simulator (swarm 692477835536): replies to an earlier attempt's
    // requests, held up on a stalled connection while the server stepped down, synced
    // to its peer's history and took over again, were taken for the answer to the new
    // attempt's request; the client followed the new reign from the old reign's map.
    let mut client = client(2);
    // First attempt at A: its request is answered only much later, at sequence 3.
    sub(&mut client, ms(0), A, hugz(3));
    fail_over(&mut client, ms(5_000));
    sub(&mut client, ms(6_000), A, hugz(5));
    drain(&mut client);
    fail_over(&mut client, ms(10_000));
    assert_eq!(client.current_server(), A);
    // Back at A, the request goes out at once, on a new DEALER: the old one, and the
    // late reply queued for it, are gone.
    assert_eq!(fresh_requests(&drain(&mut client)), [(A, true)]);
    assert_eq!(client.outstanding_requests(A), 1);
    snap(&mut client, ms(10_300), A, kvsync("/a/x", "new", 5));
    snap(&mut client, ms(10_300), A, kthxbai(5));
    assert_eq!(contents(&client), ["/a/x=new@5"]);
    assert_eq!(client.outstanding_requests(A), 0);
}

#[test]
fn a_reply_cut_by_leaving_the_server_does_not_spoil_the_next_attempt() {
    // The client leaves A in the middle of a reply and comes back (a single server):
    // the rest of that reply went with the old connection, and the first reply on the
    // new one is whole.
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(2));
    drain(&mut client);
    snap(&mut client, ms(4_000), A, kvsync("/a/x", "1", 1));
    fail_over(&mut client, ms(9_000));
    sub(&mut client, ms(9_100), A, hugz(2));
    assert_eq!(fresh_requests(&drain(&mut client)), [(A, true)]);
    snap(&mut client, ms(9_300), A, kvsync("/a/x", "1", 1));
    snap(&mut client, ms(9_300), A, kvsync("/a/y", "2", 2));
    snap(&mut client, ms(9_300), A, kthxbai(2));
    assert_eq!(client.state(), State::Active);
    assert_eq!(contents(&client), ["/a/x=1@1", "/a/y=2@2"]);
}

#[test]
fn a_server_that_leaves_the_history_mid_sync_is_asked_again_on_a_fresh_connection() {
    // While the client waits for A's snapshot, A's numbers fall (it re-synced to its
    // peer's history, or restarted): a reply still queued may be of the old history.
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(200));
    assert_eq!(fresh_requests(&drain(&mut client)), [(A, false)]);
    sub(&mut client, ms(100), A, hugz(30));
    assert_eq!(fresh_requests(&drain(&mut client)), [(A, true)]);
    assert_eq!(client.stats().resyncs_after_restart, 1);
    snap(&mut client, ms(200), A, kvsync("/a/x", "1", 31));
    snap(&mut client, ms(200), A, kthxbai(31));
    assert_eq!(contents(&client), ["/a/x=1@31"]);
}

#[test]
fn a_snapshot_just_below_the_first_buffered_update_is_used_with_it() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, kvpub("/a/y", "2", 54)); // overtook the reply
    snap(&mut client, ms(1), A, kvsync("/a/x", "1", 50));
    snap(&mut client, ms(1), A, kthxbai(53));
    assert_eq!(client.state(), State::Active);
    assert_eq!(contents(&client), ["/a/x=1@50", "/a/y=2@54"]);
    assert_eq!(client.stats().dropped("stale_reply"), 0);
}

#[test]
fn a_snapshot_below_a_first_hugz_is_still_stale() {
    // The HUGZ follows the update it counts: update 4 is not in the buffer.
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(4));
    snap(&mut client, ms(1), A, kthxbai(3));
    assert_eq!(client.state(), State::Syncing);
    assert_eq!(client.stats().dropped("stale_reply"), 1);
}

#[test]
fn a_server_that_restarts_while_the_client_syncs_is_followed_into_its_new_history() {
    // Found by the simulator (swarm 52010): the first message of the attempt came from
    // the old history (12321); the restarted server numbers from 1, so every one of its
    // snapshots looked stale, for ever.
    let mut client = client(1);
    sub(&mut client, ms(0), A, kvpub("/a/old", "x", 12_321));
    sub(&mut client, ms(1_000), A, hugz(52));
    snap(&mut client, ms(1_001), A, kvsync("/a/new", "y", 50));
    snap(&mut client, ms(1_001), A, kthxbai(53));
    assert_eq!(client.state(), State::Active);
    assert_eq!(contents(&client), ["/a/new=y@50"]);
}

#[test]
fn a_passive_server_that_never_answers_does_not_block_later_requests() {
    // A rejected two requests while B was alive; B is gone now and A takes over on the
    // next request, which must still be sent and its reply used.
    let mut client = client(2);
    for round in 0..2 {
        sub(&mut client, ms(round * 10_000), A, hugz(1));
        fail_over(&mut client, ms(round * 10_000 + 5_000));
        fail_over(&mut client, ms(round * 10_000 + 10_000));
    }
    // The move back to A asked it at once (its subscription was known live).
    assert_eq!(requests(&drain(&mut client)).last(), Some(&A));
    assert!(client.outstanding_requests(A) <= MAX_OUTSTANDING_REQUESTS);
    sub(&mut client, ms(20_100), A, hugz(1));
    snap(&mut client, ms(20_200), A, kvsync("/a/x", "1", 1));
    snap(&mut client, ms(20_200), A, kthxbai(1));
    assert_eq!(client.state(), State::Active);
    assert_eq!(contents(&client), ["/a/x=1@1"]);
}

#[test]
fn an_unsolicited_snapshot_reply_is_reported_and_ignored() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 1, &[]);
    drain(&mut client);
    snap(&mut client, ms(10), A, kvsync("/a/x", "1", 1));
    snap(&mut client, ms(10), A, kthxbai(1));
    assert!(client.is_empty());
    assert_eq!(client.stats().dropped("unsolicited_reply"), 2);
    assert_eq!(events(&mut client).len(), 2);
}

#[test]
fn a_kthxbai_for_another_subtree_is_discarded_and_asked_again_at_the_retry_pace() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(1));
    drain(&mut client);
    snap(&mut client, ms(10), A, kvsync("/a/x", "1", 1));
    snap(
        &mut client,
        ms(10),
        A,
        frames(KvMsg::kthxbai(1, b"/b/".to_vec())),
    );
    assert_eq!(client.state(), State::Syncing);
    assert!(client.is_empty());
    let outputs = drain(&mut client);
    assert!(outputs.contains(&Output::Event(Event::Dropped {
        server: A,
        channel: Channel::Snapshot,
        reason: DropReason::SubtreeMismatch
    })));
    // Not at once: the same server would answer the same way, as fast as it can.
    assert!(requests(&outputs).is_empty());
    assert_eq!(client.poll_timeout(), Some(ms(200)));
    client.handle_timeout(ms(200));
    assert_eq!(requests(&drain(&mut client)), vec![A]);
    assert_eq!(client.poll_timeout(), Some(ms(5_010)), "once per discard");
}

#[test]
fn a_kthxbai_with_an_empty_body_ends_the_snapshot_as_the_zguide_c_server_sends_it() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(1));
    drain(&mut client);
    snap(&mut client, ms(10), A, kvsync("/a/x", "1", 1));
    snap(
        &mut client,
        ms(10),
        A,
        frames(KvMsg::kthxbai(1, Vec::new())),
    );
    assert_eq!(client.state(), State::Active);
    assert_eq!(client.get(b"/a/x"), Some(&b"1"[..]));
    assert_eq!(client.stats().snapshots_applied, 1);
}

#[test]
fn a_full_buffer_forces_a_fresh_snapshot_when_the_reply_needed_what_it_dropped() {
    let config = Config {
        max_buffered_updates: 2,
        ..config(1)
    };
    let mut client = Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)).unwrap();
    sub(&mut client, ms(0), A, hugz(1));
    for sequence in 2..=5 {
        sub(
            &mut client,
            ms(1),
            A,
            kvpub("/a/x", &sequence.to_string(), sequence),
        );
    }
    assert_eq!(client.stats().dropped("buffer_overflow"), 2);
    drain(&mut client);
    // The snapshot at 2 would need update 3, which was dropped.
    snap(&mut client, ms(2), A, kthxbai(2));
    assert_eq!(client.state(), State::Syncing);
    assert_eq!(requests(&drain(&mut client)), vec![A]);
    // A snapshot at 3 or later does not.
    snap(&mut client, ms(3), A, kvsync("/a/x", "3", 3));
    snap(&mut client, ms(3), A, kthxbai(3));
    assert_eq!(contents(&client), ["/a/x=5@5"]);
}

// --- Malformed input ----------------------------------------------------------------------

#[test]
fn malformed_input_is_counted_and_reported_never_fatal() {
    let mut client = client(1);
    let garbage: [&[u8]; 3] = [b"x", b"y", b"z"];
    client.handle_message(ms(0), A, Channel::Subscriber, &garbage);
    assert!(!client.is_subscription_live(), "garbage proves nothing");
    let short_sequence: [&[u8]; 5] = [b"/a/x", b"123", b"", b"", b"v"];
    client.handle_message(ms(0), A, Channel::Snapshot, &short_sequence);
    let empty: [&[u8]; 0] = [];
    client.handle_message(ms(0), A, Channel::Subscriber, &empty);
    assert_eq!(client.stats().dropped("frame_count"), 2);
    assert_eq!(client.stats().dropped("sequence_length"), 1);
    let events = events(&mut client);
    assert_eq!(events.len(), 3);
    assert!(matches!(
        &events[1],
        Event::Dropped {
            reason: DropReason::Malformed(DecodeError::SequenceLength { len: 3 }),
            ..
        }
    ));
}

#[test]
fn a_malformed_snapshot_entry_spoils_its_reply() {
    let mut client = client(1);
    sub(&mut client, ms(0), A, hugz(2));
    drain(&mut client);
    snap(&mut client, ms(1), A, kvsync("/a/x", "1", 1));
    let bad: [&[u8]; 5] = [b"/a/y", b"2", b"", b"", b"2"];
    client.handle_message(ms(1), A, Channel::Snapshot, &bad);
    snap(&mut client, ms(1), A, kthxbai(2));
    assert_eq!(client.state(), State::Syncing);
    assert_eq!(
        requests(&drain(&mut client)),
        vec![A],
        "asks again for a whole one"
    );
}

#[test]
fn messages_on_the_wrong_channel_are_reported() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 1, &[]);
    drain(&mut client);
    snap(&mut client, ms(1), A, hugz(1));
    sub(&mut client, ms(1), A, kthxbai(2));
    assert_eq!(client.stats().dropped("wrong_channel"), 2);
    assert_eq!(client.state(), State::Active);
    assert_eq!(client.sequence(), 1);
}

// --- Application commands --------------------------------------------------------------

#[test]
fn set_publishes_one_kvset_for_every_server_and_applies_it_locally() {
    let mut client = client(2);
    let uuid = client.set(b"/a/x".to_vec(), b"v".to_vec(), None).unwrap();
    let outputs = drain(&mut client);
    let sent = published(&outputs);
    assert_eq!(
        sent,
        vec![KvMsg::kvset(b"/a/x".to_vec(), b"v".to_vec(), uuid)]
    );
    assert_eq!(sent[0].sequence, 0);
    assert_eq!(client.get(b"/a/x"), Some(&b"v"[..]));
    assert_eq!(client.entry(b"/a/x").unwrap().sequence, 0);
    assert_eq!(
        outputs.last(),
        Some(&Output::Event(Event::Updated {
            key: b"/a/x".to_vec(),
            value: b"v".to_vec(),
            sequence: 0
        }))
    );
}

#[test]
fn set_sends_a_ttl_in_seconds_and_zero_means_persistent() {
    let mut client = client(1);
    client
        .set(
            b"/a/x".to_vec(),
            b"v".to_vec(),
            Some(Duration::from_millis(1_500)),
        )
        .unwrap();
    client
        .set(b"/a/y".to_vec(), b"v".to_vec(), Some(Duration::ZERO))
        .unwrap();
    let sent = published(&drain(&mut client));
    assert_eq!(sent[0].properties.as_frame(), b"ttl=1.5\n");
    assert_eq!(sent[0].client_ttl(), Ok(Some(Duration::from_millis(1_500))));
    assert!(sent[1].properties.is_empty());
    assert_eq!(
        client.entry(b"/a/x").unwrap().properties.get("ttl"),
        Some(&b"1.5"[..])
    );
}

#[test]
fn reserved_empty_and_overlong_keys_are_refused() {
    let mut client = client(1);
    assert_eq!(
        client.set(HUGZ.to_vec(), b"v".to_vec(), None),
        Err(Error::ReservedKey)
    );
    assert_eq!(client.delete(KTHXBAI.to_vec()), Err(Error::ReservedKey));
    assert_eq!(
        client.set(Vec::new(), b"v".to_vec(), None),
        Err(Error::EmptyKey)
    );
    assert_eq!(
        client.delete(vec![b'k'; 256]),
        Err(Error::KeyTooLong { len: 256, max: 255 })
    );
    assert!(
        drain(&mut client).is_empty(),
        "a refused command sends nothing"
    );
}

#[test]
fn empty_oversized_values_and_sub_millisecond_ttls_are_refused() {
    let mut client = client(1);
    assert_eq!(
        client.set(b"/a/x".to_vec(), Vec::new(), None),
        Err(Error::EmptyValue)
    );
    assert_eq!(
        client.set(b"/a/x".to_vec(), vec![0; (1 << 20) + 1], None),
        Err(Error::ValueTooLarge {
            len: (1 << 20) + 1,
            max: 1 << 20
        })
    );
    assert_eq!(
        client.set(
            b"/a/x".to_vec(),
            b"v".to_vec(),
            Some(Duration::from_micros(500))
        ),
        Err(Error::TtlTooShort)
    );
    assert!(drain(&mut client).is_empty());
}

#[test]
fn delete_removes_locally_and_sends_an_empty_body() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 1, &[("/a/x", "1", 1)]);
    drain(&mut client);
    let uuid = client.delete(b"/a/x".to_vec()).unwrap();
    let outputs = drain(&mut client);
    assert_eq!(
        published(&outputs),
        vec![KvMsg::kvset_delete(b"/a/x".to_vec(), uuid)]
    );
    assert_eq!(client.get(b"/a/x"), None);
    assert!(outputs.contains(&Output::Event(Event::Deleted {
        key: b"/a/x".to_vec(),
        sequence: 0
    })));
}

#[test]
fn keys_outside_the_subtree_are_sent_but_not_applied_locally() {
    let mut client = client(1);
    client.set(b"/b/x".to_vec(), b"v".to_vec(), None).unwrap();
    let outputs = drain(&mut client);
    assert_eq!(published(&outputs).len(), 1);
    assert!(client.is_empty());
    assert_eq!(outputs.len(), 1, "no change event for a key we do not hold");
}

#[test]
fn the_map_iterates_in_key_order() {
    let mut client = client(1);
    for key in ["/a/m", "/a/b", "/a/z", "/a/a"] {
        client.set(key.into(), b"v".to_vec(), None).unwrap();
    }
    let keys: Vec<&[u8]> = client.iter().map(|(key, _)| key).collect();
    assert_eq!(keys, [&b"/a/a"[..], b"/a/b", b"/a/m", b"/a/z"]);
}

#[test]
fn uuids_come_from_the_injected_rng() {
    let uuids = |seed| {
        let mut client = Client::new(config(1), ChaCha8Rng::seed_from_u64(seed), ms(0)).unwrap();
        (0..3)
            .map(|_| client.set(b"/a/x".to_vec(), b"v".to_vec(), None).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(uuids(7), uuids(7));
    assert_ne!(uuids(7), uuids(8));
    let first = uuids(7)[0];
    assert_eq!(first.as_bytes()[6] >> 4, 4, "version 4");
    assert_eq!(first.as_bytes()[8] >> 6, 2, "RFC 4122 variant");
}

#[test]
fn a_local_set_is_replaced_by_a_newer_update_from_the_server() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[]);
    client
        .set(b"/a/x".to_vec(), b"mine".to_vec(), None)
        .unwrap();
    // Another client's write reached the server first; ours follows at 7.
    sub(&mut client, ms(10), A, kvpub("/a/x", "theirs", 6));
    assert_eq!(contents(&client), ["/a/x=theirs@6"]);
}

#[test]
fn a_local_set_is_replaced_by_a_later_snapshot_without_it() {
    let mut client = client(2);
    sync(&mut client, ms(0), A, 5, &[]);
    fail_over(&mut client, ms(5_000));
    client
        .set(b"/a/x".to_vec(), b"mine".to_vec(), None)
        .unwrap();
    // B's snapshot does not have it (yet): the server's view wins.
    sync(&mut client, ms(5_100), B, 5, &[]);
    assert!(client.is_empty());
    drain(&mut client);
    // Its echo then brings it back with the server's sequence.
    sub(&mut client, ms(5_200), B, kvpub("/a/x", "mine", 6));
    assert_eq!(contents(&client), ["/a/x=mine@6"]);
}

// --- Commit confirmation ------------------------------------------------------------------

#[test]
fn the_echo_of_a_watched_update_confirms_it() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[]);
    let uuid = client.set(b"/a/x".to_vec(), b"v".to_vec(), None).unwrap();
    client.watch_commit(uuid).unwrap();
    drain(&mut client);
    let echo = frames(KvMsg::kvset(b"/a/x".to_vec(), b"v".to_vec(), uuid).with_sequence(6));
    sub(&mut client, ms(10), A, echo);
    assert_eq!(
        events(&mut client),
        vec![
            Event::Committed { uuid, sequence: 6 },
            Event::Updated {
                key: b"/a/x".to_vec(),
                value: b"v".to_vec(),
                sequence: 6
            },
        ]
    );
    assert_eq!(client.watch_commit(uuid), Err(Error::UnknownUpdate(uuid)));
}

#[test]
fn an_unwatched_update_is_confirmed_silently() {
    let mut client = client(1);
    sync(&mut client, ms(0), A, 5, &[]);
    let uuid = client.delete(b"/a/x".to_vec()).unwrap();
    drain(&mut client);
    sub(
        &mut client,
        ms(10),
        A,
        frames(KvMsg::kvset_delete(b"/a/x".to_vec(), uuid).with_sequence(6)),
    );
    assert!(events(&mut client).is_empty());
}

#[test]
fn an_update_found_in_a_snapshot_is_confirmed() {
    // The echo was published before the subscription was live; the snapshot has it.
    let mut client = client(1);
    let uuid = client.set(b"/a/x".to_vec(), b"v".to_vec(), None).unwrap();
    client.watch_commit(uuid).unwrap();
    drain(&mut client);
    sub(&mut client, ms(0), A, hugz(3));
    let stored = frames(KvMsg::kvset(b"/a/x".to_vec(), b"v".to_vec(), uuid).with_sequence(3));
    snap(&mut client, ms(1), A, stored);
    snap(&mut client, ms(1), A, kthxbai(3));
    assert!(events(&mut client).contains(&Event::Committed { uuid, sequence: 3 }));
}

#[test]
fn watching_an_update_outside_the_subtree_reports_it_lost_at_once() {
    let mut client = client(1);
    let uuid = client.set(b"/b/x".to_vec(), b"v".to_vec(), None).unwrap();
    drain(&mut client);
    client.watch_commit(uuid).unwrap();
    assert_eq!(
        events(&mut client),
        vec![Event::Lost {
            uuid,
            reason: LostReason::OutsideSubtree
        }]
    );
}

#[test]
fn failover_before_the_echo_reports_a_watched_update_lost() {
    let mut client = client(2);
    sync(&mut client, ms(0), A, 5, &[]);
    let watched = client.set(b"/a/x".to_vec(), b"v".to_vec(), None).unwrap();
    client.watch_commit(watched).unwrap();
    client.set(b"/a/y".to_vec(), b"v".to_vec(), None).unwrap();
    drain(&mut client);
    client.handle_timeout(ms(5_000));
    assert_eq!(
        events(&mut client),
        vec![
            Event::ServerChanged { from: A, to: B },
            Event::Lost {
                uuid: watched,
                reason: LostReason::ServerChanged
            },
        ]
    );
    // A late echo from B does not resurrect it.
    sync(&mut client, ms(5_100), B, 5, &[]);
    sub(
        &mut client,
        ms(5_200),
        B,
        frames(KvMsg::kvset(b"/a/x".to_vec(), b"v".to_vec(), watched).with_sequence(6)),
    );
    assert!(!events(&mut client)
        .iter()
        .any(|event| matches!(event, Event::Committed { .. })));
}

#[test]
fn unknown_uuids_cannot_be_watched() {
    let mut client = client(1);
    assert_eq!(client.watch_commit(OTHER), Err(Error::UnknownUpdate(OTHER)));
}

#[test]
fn the_oldest_watched_update_is_reported_lost_past_the_in_flight_bound() {
    let config = Config {
        max_in_flight: 2,
        ..config(1)
    };
    let mut client = Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)).unwrap();
    let first = client.set(b"/a/1".to_vec(), b"v".to_vec(), None).unwrap();
    client.watch_commit(first).unwrap();
    let second = client.set(b"/a/2".to_vec(), b"v".to_vec(), None).unwrap();
    client.watch_commit(second).unwrap();
    drain(&mut client);
    client.set(b"/a/3".to_vec(), b"v".to_vec(), None).unwrap();
    assert!(events(&mut client).contains(&Event::Lost {
        uuid: first,
        reason: LostReason::Evicted
    }));
    assert_eq!(client.watch_commit(second), Ok(()));
}

// --- A scripted trace -------------------------------------------------------------------

fn describe(output: &Output) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match output {
        Output::SendSnapshotRequest { server, frames, .. } => {
            format!("send {server}: {} '{}'", text(&frames[0]), text(&frames[1]))
        }
        Output::Publish { frames } => {
            let message = KvMsg::decode(frames, &Limits::default()).unwrap();
            format!(
                "publish KVSET '{}'='{}' uuid={} props={:?}",
                text(&message.key),
                text(&message.body),
                message.uuid.unwrap(),
                message.properties
            )
        }
        Output::Event(event) => match event {
            Event::Updated {
                key,
                value,
                sequence,
            } => {
                format!(
                    "event Updated '{}'='{}' @{sequence}",
                    text(key),
                    text(value)
                )
            }
            Event::Deleted { key, sequence } => {
                format!("event Deleted '{}' @{sequence}", text(key))
            }
            other => format!("event {other:?}"),
        },
    }
}

#[test]
fn a_scripted_failover_trace() {
    let mut client = client(2);
    let mut trace = String::new();
    let mut step = |client: &mut Client, label: &str| {
        let _ = writeln!(trace, "# {label}");
        for output in drain(client) {
            let _ = writeln!(trace, "{}", describe(&output));
        }
    };
    sub(&mut client, ms(0), A, hugz(3));
    step(&mut client, "A's subscriber speaks: ask A for a snapshot");
    snap(&mut client, ms(10), A, kvsync("/a/1", "one", 1));
    sub(&mut client, ms(11), A, kvpub("/a/2", "two", 4));
    snap(&mut client, ms(12), A, kvsync("/a/3", "three", 3));
    snap(&mut client, ms(13), A, kthxbai(3));
    step(
        &mut client,
        "snapshot at 3 plus the update 4 buffered meanwhile",
    );
    let uuid = client
        .set(
            b"/a/1".to_vec(),
            b"uno".to_vec(),
            Some(Duration::from_secs(30)),
        )
        .unwrap();
    client.watch_commit(uuid).unwrap();
    step(&mut client, "set /a/1 with a ttl, watched");
    sub(
        &mut client,
        ms(20),
        A,
        frames(
            KvMsg::kvset(b"/a/1".to_vec(), b"uno".to_vec(), uuid)
                .with_ttl(Duration::from_secs(30))
                .with_sequence(5),
        ),
    );
    step(&mut client, "its echo at 5");
    let lost = client
        .set(b"/a/9".to_vec(), b"nine".to_vec(), None)
        .unwrap();
    client.watch_commit(lost).unwrap();
    client.handle_timeout(ms(5_020));
    step(
        &mut client,
        "A goes silent before echoing /a/9: fail over to B",
    );
    sub(&mut client, ms(5_100), B, hugz(5));
    snap(&mut client, ms(5_110), B, kvsync("/a/1", "uno", 5));
    snap(&mut client, ms(5_110), B, kvsync("/a/3", "three", 3));
    snap(&mut client, ms(5_120), B, kthxbai(5));
    step(&mut client, "B's snapshot lacks /a/2 and /a/9");
    insta::assert_snapshot!("failover_trace", trace);
}

// --- Property: the client converges on the server's map -----------------------------

/// A server the test controls: one map and sequence shared by every server of the list
/// (a perfectly replicated pair), each with its own sockets.
#[derive(Default)]
struct World {
    map: BTreeMap<Vec<u8>, KvMsg>,
    sequence: i64,
    /// The map after each sequence, for point-in-time checks.
    history: Vec<BTreeMap<Vec<u8>, KvMsg>>,
    /// The sequence each update was published at, by uuid.
    published_at: BTreeMap<Uuid, i64>,
    links: Vec<Link>,
    /// KVSETs on their way to the collector.
    collector: VecDeque<Frames>,
    subtree: Vec<u8>,
    next_other_uuid: u8,
}

#[derive(Default)]
struct Link {
    /// The subscription has reached the server's PUB.
    subscribed: bool,
    subscriber: VecDeque<Frames>,
    snapshot: VecDeque<Frames>,
    /// ICANHAZ? received, not yet answered or rejected.
    requests: u32,
    /// The SUB delivered something: its subscription is live (this model never
    /// reconnects), whether or not the server was current then.
    delivered: bool,
}

impl World {
    fn new(servers: usize, subtree: &[u8]) -> Self {
        World {
            links: (0..servers).map(|_| Link::default()).collect(),
            subtree: subtree.to_vec(),
            history: vec![BTreeMap::new()],
            ..World::default()
        }
    }

    fn publish(&mut self, mut update: KvMsg) {
        self.sequence += 1;
        update.sequence = self.sequence;
        if let Some(uuid) = update.uuid {
            self.published_at.insert(uuid, self.sequence);
        }
        if update.is_delete() {
            self.map.remove(&update.key);
        } else {
            self.map.insert(update.key.clone(), update.clone());
        }
        self.history.push(self.map.clone());
        let matches = update.key.starts_with(&self.subtree);
        for link in &mut self.links {
            if link.subscribed && matches {
                link.subscriber.push_back(frames(update.clone()));
            }
        }
    }

    fn heartbeat(&mut self, server: usize) {
        let sequence = self.sequence;
        let link = &mut self.links[server];
        if link.subscribed {
            link.subscriber.push_back(hugz(sequence));
        }
    }

    fn serve(&mut self, server: usize) {
        if self.links[server].requests == 0 {
            return;
        }
        let mut reply: Vec<Frames> = self
            .map
            .range(self.subtree.clone()..)
            .take_while(|(key, _)| key.starts_with(&self.subtree))
            .map(|(_, entry)| frames(entry.clone()))
            .collect();
        reply.push(frames(KvMsg::kthxbai(self.sequence, self.subtree.clone())));
        let link = &mut self.links[server];
        link.requests -= 1;
        link.snapshot.extend(reply);
    }

    /// The server's map at `sequence`, restricted to the subtree.
    fn view_at(&self, sequence: i64) -> BTreeMap<Vec<u8>, (Vec<u8>, i64)> {
        let map = &self.history[usize::try_from(sequence).unwrap()];
        map.iter()
            .filter(|(key, _)| key.starts_with(&self.subtree))
            .map(|(key, entry)| (key.clone(), (entry.body.clone(), entry.sequence)))
            .collect()
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// Another client's update reaches the server.
    Write {
        key: usize,
        value: Option<u8>,
    },
    /// This client sets or deletes a key (some outside its subtree), and watches it.
    ClientWrite {
        key: usize,
        value: Option<u8>,
    },
    /// The collector takes the next KVSET.
    Collect,
    Heartbeat(usize),
    Subscribe(usize),
    DeliverSubscriber(usize),
    Serve(usize),
    /// A passive server drops a request without answering.
    Reject(usize),
    DeliverSnapshot(usize),
    Advance(u64),
}

const SERVER_KEYS: [&str; 4] = ["/a/1", "/a/2", "/a/3", "/b/1"];
const CLIENT_KEYS: [&str; 3] = ["/a/c1", "/a/c2", "/b/c"];

fn step_strategy(servers: usize) -> impl Strategy<Value = Step> {
    let server = 0..servers;
    prop_oneof![
        3 => (0..SERVER_KEYS.len(), proptest::option::weighted(0.8, any::<u8>()))
            .prop_map(|(key, value)| Step::Write { key, value }),
        1 => (0..CLIENT_KEYS.len(), proptest::option::weighted(0.8, any::<u8>()))
            .prop_map(|(key, value)| Step::ClientWrite { key, value }),
        2 => Just(Step::Collect),
        2 => server.clone().prop_map(Step::Heartbeat),
        1 => server.clone().prop_map(Step::Subscribe),
        6 => server.clone().prop_map(Step::DeliverSubscriber),
        2 => server.clone().prop_map(Step::Serve),
        1 => server.clone().prop_map(Step::Reject),
        6 => server.clone().prop_map(Step::DeliverSnapshot),
        2 => prop_oneof![Just(300_u64), Just(1_000), Just(6_000)].prop_map(Step::Advance),
    ]
}

struct Run {
    world: World,
    client: Client,
    now: Instant,
    /// The map as rebuilt from events alone.
    mirror: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
    /// Watched updates and their outcome.
    outcomes: BTreeMap<Uuid, Vec<Event>>,
}

impl Run {
    fn new(servers: usize, subtree: &[u8]) -> Self {
        let config = Config {
            servers,
            subtree: subtree.to_vec(),
            ..Config::default()
        };
        Run {
            world: World::new(servers, subtree),
            client: Client::new(config, ChaCha8Rng::seed_from_u64(9), ms(0)).unwrap(),
            now: ms(0),
            mirror: BTreeMap::new(),
            outcomes: BTreeMap::new(),
        }
    }

    fn apply(&mut self, step: &Step) {
        let world = &mut self.world;
        match *step {
            Step::Write { key, value } => {
                world.next_other_uuid = world.next_other_uuid.wrapping_add(1);
                let uuid = Uuid::from_bytes([world.next_other_uuid; 16]);
                let key = SERVER_KEYS[key].as_bytes().to_vec();
                let body = value.map(|value| vec![b'v', value]).unwrap_or_default();
                world.publish(KvMsg::kvset(key, body, uuid));
            }
            Step::ClientWrite { key, value } => {
                let key = CLIENT_KEYS[key].as_bytes().to_vec();
                let uuid = match value {
                    Some(value) => self.client.set(key, vec![b'c', value], None),
                    None => self.client.delete(key),
                }
                .unwrap();
                self.client.watch_commit(uuid).unwrap();
                self.outcomes.insert(uuid, Vec::new());
            }
            Step::Collect => {
                if let Some(kvset) = world.collector.pop_front() {
                    world.publish(KvMsg::decode(&kvset, &Limits::default()).unwrap());
                }
            }
            Step::Heartbeat(server) => world.heartbeat(server),
            Step::Subscribe(server) => world.links[server].subscribed = true,
            Step::DeliverSubscriber(server) => {
                if let Some(message) = world.links[server].subscriber.pop_front() {
                    world.links[server].delivered = true;
                    self.client.handle_message(
                        self.now,
                        ServerIndex(server),
                        Channel::Subscriber,
                        &message,
                    );
                }
            }
            Step::Serve(server) => world.serve(server),
            Step::Reject(server) => {
                let link = &mut world.links[server];
                link.requests = link.requests.saturating_sub(1);
            }
            Step::DeliverSnapshot(server) => {
                if let Some(message) = world.links[server].snapshot.pop_front() {
                    self.client.handle_message(
                        self.now,
                        ServerIndex(server),
                        Channel::Snapshot,
                        &message,
                    );
                }
            }
            Step::Advance(millis) => {
                self.now += Duration::from_millis(millis);
                self.client.handle_timeout(self.now);
            }
        }
        self.drain();
        self.check_step();
    }

    fn drain(&mut self) {
        while let Some(output) = self.client.poll_output() {
            match output {
                Output::SendSnapshotRequest {
                    server,
                    fresh_connection,
                    ..
                } => {
                    let link = &mut self.world.links[server.0];
                    assert!(
                        link.delivered,
                        "ICANHAZ? to {server} before its SUB was live"
                    );
                    if fresh_connection {
                        // The old DEALER is closed: what it had asked and what was
                        // queued for it are gone.
                        link.requests = 0;
                        link.snapshot.clear();
                    }
                    link.requests += 1;
                }
                Output::Publish { frames } => self.world.collector.push_back(frames.to_vec()),
                Output::Event(event) => match event {
                    Event::Updated {
                        key,
                        value,
                        sequence,
                    } => {
                        self.mirror.insert(key, (value, sequence));
                    }
                    Event::Deleted { key, .. } => {
                        self.mirror.remove(&key);
                    }
                    Event::ServerChanged { .. } => {}
                    Event::Committed { uuid, sequence } => {
                        assert_eq!(
                            self.world.published_at.get(&uuid),
                            Some(&sequence),
                            "committed {uuid} at the wrong sequence"
                        );
                        self.outcomes
                            .get_mut(&uuid)
                            .expect("unwatched commit")
                            .push(event);
                    }
                    Event::Lost { uuid, .. } => self
                        .outcomes
                        .get_mut(&uuid)
                        .expect("unwatched loss")
                        .push(event),
                    Event::Synced { .. } => {}
                    // A reply to a request written off as rejected may still come.
                    Event::Dropped {
                        reason: DropReason::UnsolicitedReply,
                        ..
                    } => {}
                    Event::Dropped { reason, .. } => {
                        panic!("a well-behaved world produced {reason:?}")
                    }
                },
            }
        }
    }

    fn client_view(&self, include_local: bool) -> BTreeMap<Vec<u8>, (Vec<u8>, i64)> {
        self.client
            .iter()
            .filter(|(key, entry)| include_local || (entry.sequence != 0 && !is_client_key(key)))
            .map(|(key, entry)| (key.to_vec(), (entry.value.clone(), entry.sequence)))
            .collect()
    }

    fn check_step(&self) {
        let view: BTreeMap<_, _> = self.client_view(true);
        assert_eq!(self.mirror, view, "events do not describe the map");
        for outcome in self.outcomes.values() {
            assert!(outcome.len() <= 1, "two outcomes: {outcome:?}");
        }
        if self.client.state() == State::Active {
            // Point in time: the keys only the servers write equal the server's map at
            // the client's sequence.
            let server: BTreeMap<_, _> = self
                .world
                .view_at(self.client.sequence())
                .into_iter()
                .filter(|(key, _)| !is_client_key(key))
                .collect();
            assert_eq!(
                self.client_view(false),
                server,
                "client at {} differs from the server",
                self.client.sequence()
            );
        }
    }

    /// Heals everything and lets the client converge without failing over, unless it is
    /// waiting on requests that were rejected.
    fn settle(&mut self) {
        for _ in 0..20 {
            for server in 0..self.world.links.len() {
                self.world.links[server].subscribed = true;
            }
            while !self.world.collector.is_empty() {
                self.apply(&Step::Collect);
            }
            let current = self.client.current_server().0;
            self.apply(&Step::Heartbeat(current));
            for server in 0..self.world.links.len() {
                while !self.world.links[server].subscriber.is_empty() {
                    self.apply(&Step::DeliverSubscriber(server));
                }
            }
            for server in 0..self.world.links.len() {
                while self.world.links[server].requests > 0 {
                    self.apply(&Step::Serve(server));
                }
                while !self.world.links[server].snapshot.is_empty() {
                    self.apply(&Step::DeliverSnapshot(server));
                }
            }
            let quiet = self.world.collector.is_empty()
                && self.world.links.iter().all(|link| {
                    link.subscriber.is_empty() && link.snapshot.is_empty() && link.requests == 0
                });
            if quiet && self.client.state() == State::Active {
                return;
            }
            if quiet {
                // Every request it still counts on was rejected: only silence helps.
                self.apply(&Step::Advance(6_000));
            }
        }
        panic!("the client did not settle: {:?}", self.client.state());
    }
}

fn is_client_key(key: &[u8]) -> bool {
    CLIENT_KEYS
        .iter()
        .any(|client_key| client_key.as_bytes() == key)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn after_a_snapshot_and_the_updates_after_it_the_client_map_equals_the_server_subtree(
        (servers, steps) in (1_usize..=3).prop_flat_map(|servers| {
            (Just(servers), proptest::collection::vec(step_strategy(servers), 0..120))
        }),
        whole_map in any::<bool>(),
    ) {
        let subtree: &[u8] = if whole_map { b"" } else { b"/a/" };
        let mut run = Run::new(servers, subtree);
        for step in &steps {
            run.apply(step);
        }
        run.settle();
        let server = run.world.view_at(run.world.sequence);
        prop_assert_eq!(run.client_view(true), server);
        prop_assert!(run.client.sequence() <= run.world.sequence);
    }
}

// --- Byte budgets --------------------------------------------------------------------

#[test]
fn a_syncing_client_buffers_updates_within_its_bytes() {
    let mut config = config(1);
    config.limits.max_body_len = 1000;
    config.limits.max_properties_len = 64;
    config.limits.max_key_len = 16;
    // Three updates of a 4-byte key and a 1000-byte body, not four.
    config.max_buffered_bytes = 3 * (crate::budget::ENTRY_OVERHEAD + 4 + 1000) + 100;
    let mut client = Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)).unwrap();
    sub(&mut client, ms(1), A, hugz(0));
    assert_eq!(client.state(), State::Syncing);
    drain(&mut client);
    let value = "v".repeat(1000);
    for sequence in 1..=5 {
        sub(&mut client, ms(2), A, kvpub("/a/k", &value, sequence));
        for bound in client.bounds() {
            assert!(bound.within_bounds(), "{bound:?}");
        }
    }
    let buffer = client.bounds()[0];
    assert_eq!(
        buffer.structure,
        crate::budget::Structure::ClientUpdateBuffer
    );
    assert_eq!(buffer.len, 3, "the oldest two made room");
    assert_eq!(
        events(&mut client)
            .iter()
            .filter(|event| matches!(
                event,
                Event::Dropped {
                    reason: DropReason::BufferOverflow,
                    ..
                }
            ))
            .count(),
        2
    );
}

#[test]
fn a_buffer_budget_below_one_largest_message_is_invalid() {
    let mut config = config(1);
    config.max_buffered_bytes = 1000;
    assert!(matches!(
        Client::new(config, ChaCha8Rng::seed_from_u64(1), ms(0)),
        Err(Error::BudgetBelowLargestMessage {
            name: "max_buffered_bytes",
            ..
        })
    ));
}
#[test]
fn without_applying_own_updates_the_map_changes_only_with_the_echo() {
    let mut client = Client::new(
        Config {
            apply_own_updates: false,
            ..config(1)
        },
        ChaCha8Rng::seed_from_u64(1),
        ms(0),
    )
    .unwrap();
    sync(&mut client, ms(0), A, 5, &[("/a/x", "1", 4)]);
    drain(&mut client);
    let uuid = client.set(b"/a/y".to_vec(), b"2".to_vec(), None).unwrap();
    client.watch_commit(uuid).unwrap();
    let deleted = client.delete(b"/a/x".to_vec()).unwrap();
    assert_eq!(published(&drain(&mut client)).len(), 2, "both sent");
    assert_eq!(contents(&client), ["/a/x=1@4"], "nothing applied yet");
    // No echo deadline: a lost update cannot leave the map wrong.
    assert_eq!(client.poll_timeout(), Some(ms(0) + Duration::from_secs(5)));
    let echo = KvMsg::kvset(b"/a/y".to_vec(), b"2".to_vec(), uuid).with_sequence(6);
    sub(&mut client, ms(10), A, frames(echo));
    let delete_echo = KvMsg::kvset_delete(b"/a/x".to_vec(), deleted).with_sequence(7);
    sub(&mut client, ms(11), A, frames(delete_echo));
    assert_eq!(contents(&client), ["/a/y=2@6"]);
    assert_eq!(
        events(&mut client),
        [
            Event::Committed { uuid, sequence: 6 },
            Event::Updated {
                key: b"/a/y".to_vec(),
                value: b"2".to_vec(),
                sequence: 6
            },
            Event::Deleted {
                key: b"/a/x".to_vec(),
                sequence: 7
            },
        ]
    );
}
