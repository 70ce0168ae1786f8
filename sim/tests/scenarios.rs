//! Scripted scenarios: the schedule is pinned, not drawn, so each test names exactly
//! the situation it puts the cluster in. Every oracle runs as in a swarm world; the
//! assertions here add what the scenario is about.

use std::time::Duration;

use clonekv_core::kvmsg::BstarState;
use clonekv_sim::network::{Link, PartitionKind, Route};
use clonekv_sim::options::{FaultOptions, Options, WorkloadOptions};
use clonekv_sim::ratio::Ratio;
use clonekv_sim::workload::Operation;
use clonekv_sim::world::{RunReport, Scripted, TraceMode, World, BACKUP, FIRST_CLIENT, PRIMARY};

/// No random faults and no random writes: only what the script does.
fn quiet(clients: usize) -> Options {
    Options {
        fault_phase: Duration::from_secs(30),
        heal_phase: Duration::from_secs(30),
        faults: FaultOptions::none(),
        workload: WorkloadOptions {
            clients,
            write_interval: Duration::from_secs(1_000_000),
            burst: Ratio::NEVER,
            ..WorkloadOptions::default()
        },
        ..Options::default()
    }
}

fn set(client: usize, key: &str, value: &str) -> Scripted {
    Scripted::Write {
        client,
        operation: Operation::Set {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ttl: None,
        },
    }
}

fn at(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Breaks both directions between `a` and `b`.
fn cut(a: usize, b: usize) -> Scripted {
    Scripted::Partition {
        a,
        b,
        kind: PartitionKind::Break,
        one_way: false,
    }
}

fn heal(a: usize, b: usize) -> Scripted {
    Scripted::Heal { a, b }
}

/// Runs the scenario; with `SCENARIO_TRACE=1` in the environment it prints every event
/// (run one test with `--nocapture` to read why it does what it does).
fn run(name: &str, options: Options, script: Vec<(Duration, Scripted)>) -> RunReport {
    let trace = if std::env::var_os("SCENARIO_TRACE").is_some() {
        TraceMode::Print
    } else {
        TraceMode::Recent
    };
    let report = World::new(7, options, trace).with_script(script).run();
    if let Some(violation) = &report.violation {
        panic!(
            "scenario '{name}' broke {}: {}\nlast events:\n  {}",
            violation.oracle,
            violation.detail,
            report.recent.join("\n  ")
        );
    }
    report
}

fn final_value(report: &RunReport, key: &str) -> Option<String> {
    report
        .final_active_map
        .as_ref()
        .expect("one active server at the end")
        .get(key.as_bytes())
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// Asserts the active server's map ends with `key` at `expected` (`None`: absent).
fn assert_final_value(report: &RunReport, key: &str, expected: Option<&str>) {
    assert_eq!(final_value(report, key).as_deref(), expected, "{key}");
}

/// Asserts the run's servers reported `event` (the situation the scenario is about
/// happened).
fn assert_server_event(report: &RunReport, event: &str) {
    assert!(
        report.coverage.server_events.contains_key(event),
        "no {event}: {:?}",
        report.coverage.server_events
    );
}

#[test]
fn failover_the_primary_crashes_while_the_backup_holds_pending_updates() {
    let client = FIRST_CLIENT;
    let script = vec![
        // The client's path to the primary stalls: its writes reach only the backup.
        (
            at(2_000),
            Scripted::Partition {
                a: client,
                b: PRIMARY,
                kind: PartitionKind::Stall,
                one_way: true,
            },
        ),
        (at(2_500), set(0, "/k/a/1", "pending-1")),
        (at(2_600), set(0, "/k/a/2", "pending-2")),
        (at(4_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("primary crashes with pending updates", quiet(1), script);
    assert_server_event(&report, "pending_replayed");
    assert_final_value(&report, "/k/a/1", Some("pending-1"));
    assert_final_value(&report, "/k/a/2", Some("pending-2"));
}

#[test]
fn split_brain_a_server_partition_with_clients_on_both_sides_heals_without_an_outage() {
    let (left, right) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let script = vec![
        (at(2_000), cut(PRIMARY, BACKUP)),
        (at(2_000), cut(right, PRIMARY)),
        (at(2_000), cut(left, BACKUP)),
        // The right client fails over to the backup, which takes over: two actives.
        (at(12_000), set(0, "/k/a/left", "written-on-primary")),
        (at(12_000), set(1, "/k/a/right", "written-on-backup")),
        (at(15_000), heal(PRIMARY, BACKUP)),
        (at(15_000), heal(right, PRIMARY)),
        (at(15_000), heal(left, BACKUP)),
    ];
    let report = run(
        "server partition with clients on both sides",
        quiet(2),
        script,
    );
    assert!(
        report.coverage.split_brain_windows >= 1,
        "{:?}",
        report.coverage
    );
    assert_server_event(&report, "dual_active");
    assert_final_value(&report, "/k/a/left", Some("written-on-primary"));
    assert_eq!(
        final_value(&report, "/k/a/right").as_deref(),
        Some("written-on-backup"),
        "the backup's split-time update was forwarded, not discarded"
    );
}

#[test]
fn slow_joiner_a_client_whose_subscription_lags_still_gets_every_update() {
    let mut options = quiet(2);
    options.network.subscribe_delay_max = Duration::from_secs(3);
    let reader = FIRST_CLIENT + 1;
    // The reader restarts: its new SUB takes up to 3 s to reach the publisher while the
    // writer (long connected) keeps writing. It must not ask for its snapshot before
    // its subscription is live, or the writes in between would be lost to it.
    let mut script = vec![
        (at(5_000), Scripted::Crash(reader)),
        (at(5_010), Scripted::Restart(reader)),
    ];
    script.extend((0..40).map(|n| {
        (
            at(5_020 + n * 50),
            set(0, &format!("/k/a/{n}"), &format!("v{n}")),
        )
    }));
    let report = run("slow joiner", options, script);
    for n in 0..40 {
        assert_eq!(
            final_value(&report, &format!("/k/a/{n}")),
            Some(format!("v{n}"))
        );
    }
}

#[test]
fn ttl_an_ephemeral_value_expires_on_time_across_a_failover() {
    let script = vec![
        (
            at(2_000),
            Scripted::Write {
                client: 0,
                operation: Operation::Set {
                    key: b"/k/a/eph".to_vec(),
                    value: b"short-lived".to_vec(),
                    ttl: Some(Duration::from_secs(4)),
                },
            },
        ),
        (at(2_100), set(0, "/k/a/kept", "persistent")),
        (at(3_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("ttl expiry across failover", quiet(1), script);
    assert!(report.coverage.expiries >= 1, "{:?}", report.coverage);
    assert_eq!(final_value(&report, "/k/a/eph"), None);
    assert_final_value(&report, "/k/a/kept", Some("persistent"));
}

#[test]
fn snapshot_a_large_snapshot_streams_while_updates_arrive() {
    let mut options = quiet(2);
    // A small high-water mark makes the server stream the reply in many pulls.
    options.network.high_water_mark = 20;
    // The schedule it was written for: first HUGZ at the heartbeat (with a welcome
    // HUGZ the writer's last update falls to its PUB's high-water mark instead).
    options.network.report_joins = false;
    let mut script: Vec<(Duration, Scripted)> = (0..400)
        .map(|n| {
            (
                at(1_000 + n * 5),
                set(0, &format!("/k/a/{n:03}"), &format!("first{n}")),
            )
        })
        .collect();
    // The second client restarts and takes a new snapshot while the first keeps writing.
    script.push((at(4_000), Scripted::Crash(FIRST_CLIENT + 1)));
    script.push((at(4_100), Scripted::Restart(FIRST_CLIENT + 1)));
    script.extend((0..200).map(|n| {
        (
            at(4_100 + n * 10),
            set(0, &format!("/k/a/{n:03}"), &format!("second{n}")),
        )
    }));
    let report = run("snapshot streamed while updates arrive", options, script);
    assert!(
        report
            .coverage
            .client_events
            .get("synced")
            .copied()
            .unwrap_or(0)
            >= 3
    );
    assert_final_value(&report, "/k/a/000", Some("second0"));
    assert_final_value(&report, "/k/a/399", Some("first399"));
}

#[test]
fn split_brain_a_forward_the_primary_already_replaced_is_not_replayed_at_a_later_failover() {
    // Found by the simulator (swarm 14014). Both servers publish "older" while split
    // (its writer reaches both); only the primary then gets "newer". At the heal the
    // backup steps down and forwards "older", which the primary drops as already
    // published: no echo ever comes. When the primary then dies, the backup must keep
    // "newer", not replay its forward over it.
    let (on_backup, on_primary) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let script = vec![
        (at(2_000), cut(PRIMARY, BACKUP)),
        (at(2_000), cut(on_backup, PRIMARY)),
        (at(2_000), cut(on_primary, BACKUP)),
        // on_backup fails over to the backup, which takes over; then its writes reach
        // both servers again.
        (at(11_000), heal(on_backup, PRIMARY)),
        (at(12_000), set(0, "/k/a/x", "older")),
        (at(13_000), set(1, "/k/a/x", "newer")),
        (at(15_000), heal(PRIMARY, BACKUP)),
        (at(15_000), heal(on_primary, BACKUP)),
        (at(20_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("forward superseded at the primary", quiet(2), script);
    assert_server_event(&report, "dual_active");
    assert_server_event(&report, "split_updates_forwarded");
    assert_final_value(&report, "/k/a/x", Some("newer"));
}

#[test]
fn restart_a_primary_restarted_while_cut_off_whose_numbers_catch_up_is_still_followed() {
    // Found by the simulator (swarm 1147): the primary restarted (memory lost) while cut
    // off from the backup, took over again with a new history, and had numbered exactly
    // as many updates as the old one by the time the link healed, so the backup saw no
    // gap and kept the old map. The reconnect of its subscription must make it re-sync.
    let mut script: Vec<(Duration, Scripted)> = (0..5)
        .map(|n| (at(1_500 + n * 100), set(0, &format!("/k/a/old{n}"), "old")))
        .collect();
    // The client can reach only the primary: it makes the restarted primary take over.
    // Its link to the primary comes back only once the restarted primary has heard
    // nothing from its peer for two heartbeats: the client's re-sync then makes it
    // take over.
    script.extend([
        (at(2_500), cut(PRIMARY, BACKUP)),
        (at(2_500), cut(FIRST_CLIENT, BACKUP)),
        (at(2_500), cut(FIRST_CLIENT, PRIMARY)),
        (at(3_000), Scripted::Crash(PRIMARY)),
        (at(3_100), Scripted::Restart(PRIMARY)),
        (at(5_500), heal(FIRST_CLIENT, PRIMARY)),
    ]);
    script.extend((0..5).map(|n| (at(9_000 + n * 100), set(0, &format!("/k/a/new{n}"), "new"))));
    script.extend([
        (at(12_000), heal(PRIMARY, BACKUP)),
        (at(12_000), heal(FIRST_CLIENT, BACKUP)),
    ]);
    let report = run("restarted primary caught up", quiet(1), script);
    assert_final_value(&report, "/k/a/new0", Some("new"));
    assert_eq!(final_value(&report, "/k/a/old0"), None);
}

/// One-way stall of `from → to`: what `from` sends waits until the heal.
fn stall(from: usize, to: usize) -> Scripted {
    Scripted::Partition {
        a: from,
        b: to,
        kind: PartitionKind::Stall,
        one_way: true,
    }
}

/// Fixed, small delays: the scenario's timing is the script's.
fn pinned(clients: usize) -> Options {
    let mut options = quiet(clients);
    options.network.delay_min = Duration::from_millis(2);
    options.network.delay_max = Duration::from_millis(2);
    options.network.delay_spike = Ratio::NEVER;
    options.network.reconnect_delay_max = Duration::from_millis(50);
    options.network.subscribe_delay_max = Duration::from_millis(10);
    options
}

#[test]
fn split_brain_what_the_backup_replays_on_taking_over_is_forwarded_when_it_steps_down() {
    // Found by the simulator (swarms 25704, 44202): the backup's split log was cleared
    // after its takeover replayed the pending list, so a client update that only the
    // backup had received was published, never forwarded, and lost when the primary's
    // snapshot won at the heal.
    let client = FIRST_CLIENT;
    let script = vec![
        (at(2_000), cut(PRIMARY, BACKUP)),
        (at(2_000), cut(client, PRIMARY)),
        // Reaches only the (still passive) backup: it waits on its pending list until
        // the client, giving up on the primary, makes the backup take over.
        (at(2_500), set(0, "/k/a/x", "only-the-backup-had-it")),
        (at(15_000), heal(PRIMARY, BACKUP)),
        (at(15_000), heal(client, PRIMARY)),
    ];
    let report = run("takeover replay forwarded", quiet(1), script);
    assert_server_event(&report, "pending_replayed");
    assert_server_event(&report, "dual_active");
    assert_final_value(&report, "/k/a/x", Some("only-the-backup-had-it"));
}

#[test]
fn failover_an_older_copy_whose_newer_twin_was_echoed_first_is_not_replayed() {
    // Found by the simulator (swarms 90737, 75661). The client writes a key twice
    // before the primary is active; the primary publishes only the newer value. The
    // client's copies reach the backup late, after that echo: the older one must not be
    // replayed over the newer one when the primary dies.
    let client = FIRST_CLIENT;
    let script = vec![
        (at(0), stall(client, BACKUP)),
        (at(300), set(0, "/k/a/x", "older")),
        (at(350), set(0, "/k/a/x", "newer")),
        (at(4_000), heal(client, BACKUP)),
        (at(6_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("older copy after the echo", quiet(1), script);
    assert_server_event(&report, "pending_replayed");
    assert_final_value(&report, "/k/a/x", Some("newer"));
}

#[test]
fn failover_an_ephemeral_copy_that_expired_on_the_pending_list_still_replaces_the_older_value() {
    // Found by the simulator (swarm 93922): the backup held an older value of a key
    // and, on its pending list, a newer ephemeral value that reached only it. The
    // newer value's ttl ran out before the failover: it was not replayed, and the older
    // value stood, as if the newer write had never happened.
    let client = FIRST_CLIENT;
    let script = vec![
        (at(2_000), set(0, "/k/a/x", "older")),
        (at(3_000), cut(client, PRIMARY)),
        (
            at(3_500),
            Scripted::Write {
                client: 0,
                operation: Operation::Set {
                    key: b"/k/a/x".to_vec(),
                    value: b"newer-short-lived".to_vec(),
                    ttl: Some(Duration::from_millis(500)),
                },
            },
        ),
        (at(4_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("expired pending copy", quiet(1), script);
    assert_server_event(&report, "pending_replayed");
    assert_eq!(final_value(&report, "/k/a/x"), None);
}

#[test]
fn snapshot_a_client_whose_reply_a_broken_connection_cut_asks_again_instead_of_waiting() {
    // Found by the simulator (swarm 74799): a client's reply was cut by a broken
    // connection. Its next reply was (rightly) discarded as possibly the cut one, and it
    // then waited for a reply the broken connection had lost, until it timed out and
    // left a healthy server.
    let mut options = quiet(2);
    options.network.high_water_mark = 20;
    // Without a disconnect notice the reader stays on the primary through the break,
    // as it did when this was found (with one, it moves away at once).
    options.network.report_disconnects = false;
    let reader = FIRST_CLIENT + 1;
    let mut script: Vec<(Duration, Scripted)> = (0..400)
        .map(|n| {
            (
                at(1_000 + n * 5),
                set(0, &format!("/k/c/{n:03}"), &format!("v{n}")),
            )
        })
        .collect();
    script.extend([
        (at(4_000), Scripted::Crash(reader)),
        (at(4_100), Scripted::Restart(reader)),
        // Mid-reply (its reply streams from 4.55 s to 4.92 s at this high-water mark):
        // the reader's connections to the primary break, and come back before its
        // server timeout.
        (at(4_700), cut(reader, PRIMARY)),
        (at(7_600), heal(reader, PRIMARY)),
    ]);
    options.network.delay_min = Duration::from_millis(10);
    options.network.delay_max = Duration::from_millis(10);
    let report = run("left mid-reply, DEALER reconnected", options, script);
    let changes = report
        .coverage
        .client_events
        .get("server_changed")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        changes, 0,
        "it stays on the primary, which serves it: {:?}",
        report.coverage.client_events
    );
    assert_final_value(&report, "/k/c/399", Some("v399"));
}

#[test]
fn failover_a_restarted_backup_keeps_what_it_saw_while_deciding_when_its_sync_cannot_complete() {
    // Found by the simulator (swarm 7609): a restarted backup saw an update's KVPUB
    // while still deciding, then its client copy (cancelled by that echo) once passive;
    // the primary died before the backup's sync completed, and the update was lost.
    let options = pinned(1);
    let client = FIRST_CLIENT;
    let script = vec![
        (at(3_000), Scripted::Crash(BACKUP)),
        (at(3_100), Scripted::Restart(BACKUP)),
        // The client's copy reaches the backup only once it is passive.
        (at(3_500), stall(client, BACKUP)),
        (at(3_600), set(0, "/k/a/x", "seen-while-deciding")),
        // The primary's state makes the backup passive at 4.002 s; its snapshot reply
        // is held, and the primary dies.
        (at(4_003), stall(PRIMARY, BACKUP)),
        (at(4_200), heal(client, BACKUP)),
        (at(4_300), Scripted::Crash(PRIMARY)),
    ];
    let report = run("backup saw it while deciding", options, script);
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/x", Some("seen-while-deciding"));
}

#[test]
fn restart_a_client_that_reads_its_servers_old_history_after_the_reconnect_still_follows_the_new_one(
) {
    // Found by the simulator (swarm 52010): a client's first subscriber message of an
    // attempt came from its server's old history; the server had restarted and numbered
    // anew, so every snapshot it sent looked stale and the client never synced. Here
    // the client is paused while both servers restart: when it runs again it hears of
    // the reconnects first, then reads what the old history had sent it.
    let reader = FIRST_CLIENT + 1;
    let mut script: Vec<(Duration, Scripted)> = (0..20)
        .map(|n| (at(1_000 + n * 25), set(0, &format!("/k/c/old{n}"), "old")))
        .collect();
    script.push((
        at(2_000),
        Scripted::Pause {
            node: reader,
            duration: Duration::from_secs(3),
        },
    ));
    script.extend((0..5).map(|n| (at(2_100 + n * 50), set(0, &format!("/k/c/late{n}"), "old"))));
    script.extend([
        (at(2_500), Scripted::Crash(PRIMARY)),
        (at(2_500), Scripted::Crash(BACKUP)),
        (at(2_600), Scripted::Restart(PRIMARY)),
        (at(2_600), Scripted::Restart(BACKUP)),
        (at(8_000), set(0, "/k/c/new", "new")),
    ]);
    let report = run("old history read after the reconnect", quiet(2), script);
    assert!(
        report
            .coverage
            .client_events
            .get("synced")
            .copied()
            .unwrap_or(0)
            >= 4,
        "{:?}",
        report.coverage.client_events
    );
    assert_final_value(&report, "/k/c/new", Some("new"));
    assert_eq!(final_value(&report, "/k/c/old0"), None);
}

#[test]
fn restart_a_paused_backup_that_reads_its_restarted_primarys_old_history_late_follows_the_new_one()
{
    // Swarm 16385's case (a dead active's updates applied over its restarted
    // successor's history), which this scenario found a new way into: the backup is
    // paused while the primary restarts with a new history; when it runs again it hears
    // of the reconnect first, then reads the old history's last messages. Its request
    // went out on the first of them, so the rest were buffered as if they followed the
    // new history's snapshot: every completed sync found a gap and started another.
    let mut script: Vec<(Duration, Scripted)> = (0..20)
        .map(|n| (at(1_000 + n * 25), set(0, &format!("/k/a/old{n}"), "old")))
        .collect();
    script.push((
        at(2_000),
        Scripted::Pause {
            node: BACKUP,
            duration: Duration::from_secs(14),
        },
    ));
    // Read by the backup only once it runs again.
    script.extend((0..5).map(|n| (at(2_100 + n * 50), set(0, &format!("/k/a/late{n}"), "old"))));
    script.extend([
        // The restarted primary takes over (its peer is silent), on the client's
        // request, before it can reach the backup: the backup never hears it as PRIMARY.
        (at(2_400), cut(PRIMARY, BACKUP)),
        (at(2_400), cut(FIRST_CLIENT, BACKUP)),
        (at(2_500), Scripted::Crash(PRIMARY)),
        (at(2_600), Scripted::Restart(PRIMARY)),
        (at(15_000), heal(PRIMARY, BACKUP)),
        (at(15_000), heal(FIRST_CLIENT, BACKUP)),
        (at(15_800), set(0, "/k/a/new", "new")),
        (at(20_000), set(0, "/k/a/newer", "new")),
    ]);
    let report = run("paused backup reads old history", quiet(1), script);
    let syncs = report
        .coverage
        .server_events
        .get("sync_started")
        .copied()
        .unwrap_or(0);
    assert!(syncs <= 10, "{syncs} syncs: a storm");
    assert_final_value(&report, "/k/a/new", Some("new"));
    assert_final_value(&report, "/k/a/newer", Some("new"));
    assert_eq!(final_value(&report, "/k/a/old0"), None, "the new history");
}

/// The route `from → to` of `link`.
fn route(from: usize, to: usize, link: Link) -> Route {
    Route { from, to, link }
}

/// The backup re-syncs on a reconnect of its subscription (cut at 2.1 s, healed at
/// 2.2 s: it asks on the next HUGZ, at 3 s), while its snapshot request waits on the
/// route from 2 s until a `ReleaseRoute`, or for good.
fn backup_resyncs_with_its_request_held() -> [(Duration, Scripted); 3] {
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    [
        (at(2_000), Scripted::StallRoute(request)),
        (at(2_100), cut(PRIMARY, BACKUP)),
        (at(2_200), heal(PRIMARY, BACKUP)),
    ]
}

#[test]
fn resync_a_late_heartbeat_does_not_make_the_passive_merge_updates_its_map_already_holds() {
    // Found by the simulator (swarm 48374): a passive completed a sync while its
    // subscription lagged; a late HUGZ, numbered below the snapshot, started a needless
    // re-sync, which buffered late KVPUBs older than the map; the active died before
    // the re-sync completed and the failover merged one over the newer value.
    let mut options = pinned(1);
    // Two messages queued on a route: a third is dropped (ZMQ_SNDHWM).
    options.network.high_water_mark = 2;
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    let updates = route(PRIMARY, BACKUP, Link::Updates);
    let mut script: Vec<(Duration, Scripted)> = (0..10)
        .map(|n| (at(1_000 + n * 50), set(0, &format!("/k/a/{n}"), "v")))
        .collect();
    script.extend([
        // A reconnect makes the backup re-sync; its request waits.
        (at(2_100), Scripted::StallRoute(request)),
        (at(2_200), cut(PRIMARY, BACKUP)),
        (at(2_300), heal(PRIMARY, BACKUP)),
        // Its subscription lags: the next HUGZ (numbered 10) and the update numbered
        // 11 wait; the update numbered 12 is dropped at the high-water mark.
        (at(3_100), Scripted::StallRoute(updates)),
        (at(4_100), set(0, "/k/a/x", "older")),
        (at(4_200), set(0, "/k/a/x", "newer")),
        // The request goes through: the snapshot (at 12) holds "newer".
        (at(4_300), Scripted::ReleaseRoute(request)),
        (at(4_400), Scripted::StallRoute(request)),
        // The late HUGZ, then "older".
        (at(4_500), Scripted::ReleaseRoute(updates)),
        (at(4_600), Scripted::Crash(PRIMARY)),
    ]);
    let report = run("late heartbeat", options, script);
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/x", Some("newer"));
}

#[test]
fn split_brain_a_backup_that_stepped_down_keeps_the_primarys_newer_update_at_a_failover_mid_sync() {
    // Found by the simulator (swarm 32681): a backup that stepped down after a split
    // kept its own split-time value, numbered in its own (higher) history, over the
    // primary's newer update buffered during its re-sync, when the primary died before
    // the re-sync completed.
    let (on_primary, on_backup) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    let mut script: Vec<(Duration, Scripted)> = (0..5)
        .map(|n| (at(1_000 + n * 50), set(0, &format!("/k/a/{n}"), "v")))
        .collect();
    script.extend([
        (at(2_000), cut(PRIMARY, BACKUP)),
        (at(2_000), cut(on_backup, PRIMARY)),
        (at(2_000), cut(on_primary, BACKUP)),
    ]);
    // The backup takes over for on_backup and numbers its own updates far ahead.
    script.extend((0..10).map(|n| (at(12_000 + n * 50), set(1, "/k/a/x", &format!("own{n}")))));
    script.extend([
        // At the heal the backup steps down; its re-sync's request waits.
        (at(14_000), Scripted::StallRoute(request)),
        (at(15_000), heal(PRIMARY, BACKUP)),
        (at(17_000), set(0, "/k/a/x", "primarys-newer")),
        (at(17_500), Scripted::Crash(PRIMARY)),
    ]);
    let report = run("stepped-down backup, failover mid-sync", pinned(2), script);
    assert_server_event(&report, "dual_active");
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/x", Some("primarys-newer"));
}

#[test]
fn restart_a_failover_mid_sync_compares_numbers_only_within_one_connection() {
    // Found by the simulator (swarm 42617): the active restarted while the backup
    // synced, and took over again with a new history numbered from 1. Its update was
    // buffered behind the old history's and lost to their higher numbers when the
    // backup took over before its sync completed.
    let client = FIRST_CLIENT;
    let state = route(PRIMARY, BACKUP, Link::State);
    let mut script: Vec<(Duration, Scripted)> = (0..10)
        .map(|n| (at(1_000 + n * 50), set(0, "/k/a/x", &format!("old{n}"))))
        .collect();
    script.extend([
        // Buffered from the old history.
        (at(3_100), set(0, "/k/a/x", "old-buffered")),
        // The backup is paused, and the restarted primary's state waits for a while.
        (at(3_200), Scripted::StallRoute(state)),
        (
            at(3_300),
            Scripted::Pause {
                node: BACKUP,
                duration: Duration::from_millis(3_700),
            },
        ),
        (at(3_400), Scripted::Crash(PRIMARY)),
        (at(3_500), Scripted::Restart(PRIMARY)),
        // The client asks the restarted primary again once it may take over (its peer
        // silent for two heartbeats); its copy of the next write never reaches the
        // backup.
        (at(5_900), cut(client, BACKUP)),
        (at(6_000), cut(client, PRIMARY)),
        (at(6_000), heal(client, PRIMARY)),
        (at(6_500), set(0, "/k/a/x", "new-history")),
        // When the backup runs again it reads the reconnect notice, the new history's
        // update, then the restarted primary's state: it takes over mid-sync.
        (at(6_600), Scripted::ReleaseRoute(state)),
        (at(6_700), Scripted::Crash(PRIMARY)),
        (at(7_500), heal(client, BACKUP)),
    ]);
    // A reconnect makes the backup re-sync; its request waits for good.
    script.extend(backup_resyncs_with_its_request_held());
    // The client learns of the crashes from silence, as it did when this was found.
    let mut options = pinned(1);
    options.network.report_disconnects = false;
    let report = run("failover mid-sync across a reconnect", options, script);
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/x", Some("new-history"));
}

#[test]
fn restart_a_failover_mid_sync_keeps_an_update_that_followed_the_partial_snapshot_on_a_lost_connection(
) {
    // Found by the simulator (swarm 657): the snapshot's partial reply held an older
    // value than an update buffered later on the same connection, which then
    // reconnected; the active died before the reply completed, and the older value won.
    let mut options = pinned(1);
    options.network.high_water_mark = 20;
    let reply = route(PRIMARY, BACKUP, Link::SnapshotReply);
    let mut script: Vec<(Duration, Scripted)> = (0..100)
        .map(|n| {
            (
                at(1_000 + n * 5),
                set(0, &format!("/k/a/{n:03}"), "snapshot"),
            )
        })
        .collect();
    script.extend([
        // A reconnect makes the backup re-sync; the reply waits, then only its first
        // entries arrive.
        (at(2_000), cut(PRIMARY, BACKUP)),
        (at(2_100), heal(PRIMARY, BACKUP)),
        (at(2_500), Scripted::StallRoute(reply)),
        (at(3_500), Scripted::ReleaseRoute(reply)),
        (at(3_501), Scripted::StallRoute(reply)),
        // Published after the snapshot was taken: buffered.
        (at(3_600), set(0, "/k/a/000", "buffered")),
        // The subscription reconnects; then the primary restarts, which makes the
        // backup take over before its sync completes.
        (at(3_700), cut(PRIMARY, BACKUP)),
        (at(3_700), heal(PRIMARY, BACKUP)),
        (at(3_900), Scripted::Crash(PRIMARY)),
        (at(4_000), Scripted::Restart(PRIMARY)),
    ]);
    let report = run("partial snapshot, then a reconnect", options, script);
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/000", Some("buffered"));
}

#[test]
fn failover_an_ephemeral_copy_that_expired_on_the_pending_list_is_not_published() {
    // Found by the simulator (seed 0): the failover replayed a client copy whose ttl
    // had run out while it waited on the pending list: it published an already
    // expired value, with a 1 ms ttl, and deleted it in the same step.
    let client = FIRST_CLIENT;
    let script = vec![
        (at(3_000), cut(client, PRIMARY)),
        (
            at(3_500),
            Scripted::Write {
                client: 0,
                operation: Operation::Set {
                    key: b"/k/a/eph".to_vec(),
                    value: b"short-lived".to_vec(),
                    ttl: Some(Duration::from_millis(500)),
                },
            },
        ),
        (at(4_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("expired pending copy, no older value", pinned(1), script);
    assert_server_event(&report, "pending_replayed");
    // The delete that followed hid it from every oracle: nobody held it past its
    // expiry. What the scenario checks is that it was not published at all.
    assert_eq!(
        report
            .coverage
            .server_events
            .get("pending_expired_not_replayed"),
        Some(&1),
        "{:?}",
        report.coverage.server_events
    );
    assert_final_value(&report, "/k/a/eph", None);
}

#[test]
fn failover_a_delete_seen_while_syncing_is_not_replayed_from_a_late_client_copy() {
    // Found by the simulator (seed 750): a delete the backup received while waiting for
    // a snapshot (which shows it only as an absent key) was applied again after the
    // failover, from its writer's copy delayed by a stalled connection, over a newer
    // value.
    let (deleter, writer) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    let mut script = vec![
        (at(1_000), set(0, "/k/a/x", "first")),
        // The deleter's copy to the backup is delayed; the writer's never arrives.
        (at(3_100), stall(deleter, BACKUP)),
        (
            at(3_200),
            Scripted::Write {
                client: 0,
                operation: Operation::Delete {
                    key: b"/k/a/x".to_vec(),
                },
            },
        ),
        (at(3_300), cut(writer, BACKUP)),
        (at(3_400), set(1, "/k/a/x", "newer")),
        // The snapshot shows "newer".
        (at(3_500), Scripted::ReleaseRoute(request)),
        (at(4_000), heal(writer, BACKUP)),
        // The delete's copy arrives after the pending list has forgotten its echo
        // (pending_max_age): only the record of what the active published stops it.
        (at(40_000), heal(deleter, BACKUP)),
        (at(41_000), Scripted::Crash(PRIMARY)),
    ];
    // A reconnect makes the backup re-sync; its request waits.
    script.extend(backup_resyncs_with_its_request_held());
    let mut options = pinned(2);
    options.fault_phase = Duration::from_secs(60);
    let report = run("late copy of a delete seen while syncing", options, script);
    assert_final_value(&report, "/k/a/x", Some("newer"));
}

#[test]
fn failover_only_the_latest_pending_copy_of_a_key_is_replayed() {
    // Found by the simulator (seed 22): the backup held three copies of one key (A, B,
    // then a delete) without their echoes; the old active had published B but not A.
    // Replaying every copy in order published A over B, then B, then the delete.
    let client = FIRST_CLIENT;
    let updates = route(PRIMARY, BACKUP, Link::Updates);
    let script = vec![
        (at(1_000), set(0, "/k/a/x", "first")),
        // A reaches only the backup.
        (at(2_000), cut(client, PRIMARY)),
        (at(2_100), set(0, "/k/a/x", "A")),
        (at(2_200), heal(client, PRIMARY)),
        // B reaches both, but its echo never reaches the backup.
        (at(2_300), Scripted::StallRoute(updates)),
        (at(2_400), set(0, "/k/a/x", "B")),
        // The delete reaches only the backup.
        (at(2_500), stall(client, PRIMARY)),
        (
            at(2_600),
            Scripted::Write {
                client: 0,
                operation: Operation::Delete {
                    key: b"/k/a/x".to_vec(),
                },
            },
        ),
        (at(3_000), Scripted::Crash(PRIMARY)),
    ];
    let report = run("three pending copies of one key", pinned(1), script);
    assert_server_event(&report, "pending_replayed");
    // Every client syncs with the new active after its replay, so no oracle can see A
    // published over B: the scenario checks that A and B were not replayed at all.
    assert_eq!(
        report
            .coverage
            .server_events
            .get("pending_superseded_not_replayed"),
        Some(&2),
        "{:?}",
        report.coverage.server_events
    );
    assert_final_value(&report, "/k/a/x", None);
}

#[test]
fn snapshot_a_whole_map_client_whose_buffer_has_a_hole_takes_another_snapshot() {
    // Found by the simulator (swarm seed 10497): updates its publisher dropped at the
    // high-water mark left a hole in what a whole-map client buffered while it waited
    // for its snapshot; it applied the rest over the hole, and every later HUGZ looked
    // up to date, so it never learnt of the updates it had missed.
    let mut options = pinned(3);
    options.network.high_water_mark = 3;
    let reader = FIRST_CLIENT + 2;
    options.workload.subtrees = vec![None, None, Some(Vec::new())];
    let reply = route(PRIMARY, reader, Link::SnapshotReply);
    let mut script = vec![
        (at(1_000), set(0, "/k/a/first", "v")),
        // The reader restarts; the reply to its request waits.
        (at(2_000), Scripted::Crash(reader)),
        (at(2_050), Scripted::StallRoute(reply)),
        (at(2_100), Scripted::Restart(reader)),
    ];
    // Six updates at once: its subscription queues three and drops the rest.
    script.extend((0..3).map(|n| (at(3_500), set(0, &format!("/k/a/w0-{n}"), "v"))));
    script.extend((0..3).map(|n| (at(3_500), set(1, &format!("/k/a/w1-{n}"), "v"))));
    script.extend([
        (at(3_600), set(0, "/k/a/after", "v")),
        (at(3_700), Scripted::ReleaseRoute(reply)),
    ]);
    let report = run("a hole in the buffer", options, script);
    assert_final_value(&report, "/k/a/w1-2", Some("v"));
}

#[test]
fn snapshot_an_update_the_client_sent_after_its_request_still_waits_for_its_echo() {
    // Found by the simulator (swarm seed 107): a client settled the echo deadlines of
    // all its updates when its snapshot arrived. One sent after the request, and lost
    // on its way, was missing from that snapshot; then it left its provisional value in
    // the map for good. The map no longer keeps it, but without the deadline the
    // writer is never told the update was lost.
    let mut options = pinned(1);
    options.network.high_water_mark = 3;
    options.workload.watch_commits = true;
    let writer = FIRST_CLIENT;
    let reply = route(PRIMARY, writer, Link::SnapshotReply);
    let mut script = vec![
        (at(1_000), set(0, "/k/c/first", "v")),
        // The client restarts; the reply to its request waits.
        (at(2_000), Scripted::Crash(writer)),
        (at(2_050), Scripted::StallRoute(reply)),
        (at(2_100), Scripted::Restart(writer)),
    ];
    // Four writes at once after the request: the fourth is dropped at the high-water
    // mark on the way to both servers.
    script.extend((0..4).map(|n| (at(3_500), set(0, &format!("/k/c/{n}"), "v"))));
    script.push((at(3_700), Scripted::ReleaseRoute(reply)));
    let report = run("an update sent after the request, lost", options, script);
    // The snapshot wipes its provisional value from the map either way; what the
    // deadline gives is the answer to the writer: lost, not a wait for ever.
    let told = |event| report.coverage.client_events.get(event).copied();
    assert_eq!(told("lost"), Some(1), "{:?}", report.coverage.client_events);
    assert_eq!(
        told("committed"),
        Some(4),
        "{:?}",
        report.coverage.client_events
    );
    assert_final_value(&report, "/k/c/2", Some("v"));
    assert_final_value(&report, "/k/c/3", None);
}

#[test]
fn harsh_a_reordered_update_while_syncing_does_not_discard_the_newer_ones_buffered() {
    // Found by the simulator (swarm 19211, a harsh world that reorders messages within
    // a connection): a rule of the time took a lower number while syncing for a
    // restarted active and discarded what it had buffered, newer updates included;
    // the failover before the sync completed kept the older value.
    let updates = route(PRIMARY, BACKUP, Link::Updates);
    let mut script = vec![
        (at(1_000), set(0, "/k/a/x", "first")),
        (at(3_100), Scripted::StallRoute(updates)),
        (at(3_200), set(0, "/k/a/x", "older")),
        (at(3_300), set(0, "/k/a/x", "newer")),
        // "newer" arrives first, then "older".
        (at(3_400), Scripted::ReleaseRouteNewestFirst(updates)),
        (at(3_500), Scripted::Crash(PRIMARY)),
    ];
    // A reconnect makes the backup re-sync; its request waits.
    script.extend(backup_resyncs_with_its_request_held());
    // Oracle 5 assumes TCP's order (it is off in harsh worlds): the final value is
    // what this scenario checks.
    let report = run("a reordered update while syncing", pinned(1), script);
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/x", Some("newer"));
}

/// The backup is active and the primary, restarted, follows it as passive: the primary
/// crashes at 2 s and comes back at 2.1 s, and the backup takes over.
fn backup_active_primary_following() -> Vec<(Duration, Scripted)> {
    vec![
        (at(2_000), Scripted::Crash(PRIMARY)),
        (at(2_100), Scripted::Restart(PRIMARY)),
    ]
}

#[test]
fn split_brain_stale_passive_states_read_at_the_heal_do_not_erase_the_backups_split_updates() {
    // Found by the simulator (swarm 7027800): the servers' link stalled both ways while
    // the backup was active and the primary followed it. The primary took over for a
    // client; the backup, cut off from it, went on publishing. At the heal the backup
    // read the primary's queued messages in order: its PASSIVE states from before the
    // takeover first, which cleared the backup's split log, then ACTIVE: it stepped
    // down and forwarded nothing, and its split-time update was lost.
    let (writer, asker) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let mut script = backup_active_primary_following();
    script.extend([
        (at(5_000), stall(PRIMARY, BACKUP)),
        (at(5_000), stall(BACKUP, PRIMARY)),
        // The writer's updates reach only the backup.
        (at(5_000), cut(writer, PRIMARY)),
        // The asker leaves the backup for the primary, which takes over once its peer
        // has been silent for two heartbeats.
        (at(5_000), cut(asker, BACKUP)),
        (at(8_000), set(0, "/k/a/x", "split")),
        (at(10_000), heal(PRIMARY, BACKUP)),
        (at(10_000), heal(writer, PRIMARY)),
        (at(10_000), heal(asker, BACKUP)),
    ]);
    let report = run("stale passive states at the heal", pinned(2), script);
    assert_server_event(&report, "dual_active");
    assert_final_value(&report, "/k/a/x", Some("split"));
}

#[test]
fn split_brain_a_backup_paused_while_the_primary_took_over_forwards_what_it_published_on_resuming()
{
    // Found by the simulator (swarm 7000666): the active backup was paused while the
    // primary, following it, took over for a client. On resuming, the backup read in
    // order what had reached it: the primary's PASSIVE states from before its takeover,
    // which made the backup take it for a live passive following it and stop recording
    // its changes, then a client's update, which it published, then the primary's
    // ACTIVE state: it stepped down, forwarded nothing, and the update was lost.
    let (writer, asker) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let mut script = backup_active_primary_following();
    script.extend([
        // The writer's updates reach only the backup.
        (at(5_000), cut(writer, PRIMARY)),
        (
            at(5_000),
            Scripted::Pause {
                node: BACKUP,
                duration: Duration::from_secs(4),
            },
        ),
        // The asker leaves the backup for the primary, which takes over once its peer
        // has been silent for two heartbeats.
        (at(5_000), cut(asker, BACKUP)),
        (at(6_500), set(0, "/k/a/x", "published-on-resuming")),
        (at(10_000), heal(writer, PRIMARY)),
        (at(10_000), heal(asker, BACKUP)),
    ]);
    let report = run("paused backup", pinned(2), script);
    assert_server_event(&report, "dual_active");
    assert_final_value(&report, "/k/a/x", Some("published-on-resuming"));
}

fn set_with_ttl(client: usize, key: &str, value: &str, ttl: Duration) -> Scripted {
    Scripted::Write {
        client,
        operation: Operation::Set {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ttl: Some(ttl),
        },
    }
}

#[test]
fn failover_a_value_published_after_its_expired_copy_was_deleted_expires_again_at_the_next() {
    // Found by the simulator (swarm 7043944), an oracle's mistake. A client's ephemeral
    // update reached the passive backup, but the primary only after a pause. The backup
    // took over once the copy had expired and deleted the older value under the copy's
    // uuid (as its expiry would have); the primary, resuming, published the update with
    // its ttl counted from arrival; the backup stepped down and synced it. When the
    // primary paused again before the value expired, the backup took over and published
    // its expiry, a delete with the same uuid, which oracle 3 took for a republication
    // of the first delete over the newer value.
    let ttl = Duration::from_millis(1_500);
    let script = vec![
        (at(1_000), set(0, "/k/a/x", "older")),
        (
            at(2_000),
            Scripted::Pause {
                node: PRIMARY,
                duration: Duration::from_secs(7),
            },
        ),
        // Expires at 4 s on the backup's pending list; published by the primary at 9 s.
        (at(2_500), set_with_ttl(0, "/k/a/x", "short-lived", ttl)),
        (
            at(10_000),
            Scripted::Pause {
                node: PRIMARY,
                duration: Duration::from_secs(7),
            },
        ),
    ];
    let report = run("an expired copy's value published late", pinned(1), script);
    assert_server_event(&report, "dual_active");
    assert!(
        report
            .coverage
            .bstar_transitions
            .get(&(BstarState::Passive, BstarState::Active))
            .is_some_and(|&takeovers| takeovers >= 2),
        "{:?}",
        report.coverage.bstar_transitions
    );
    assert_final_value(&report, "/k/a/x", None);
}

#[test]
fn split_brain_a_forward_the_primary_published_after_a_delete_is_kept_at_a_failover_mid_sync() {
    // Found by the simulator (swarm 7031294), an oracle's mistake. The backup published
    // a value while split; at the heal it stepped down and forwarded it, and while the
    // forward was on its way the primary published a client's delete of the key, which
    // reached the re-syncing backup. The primary then published the forward: in its
    // history the value comes after the delete. The backup got that value from the
    // snapshot's first entries, not from the KVPUB; the primary died, and the backup,
    // taking over mid-sync, kept the value. Oracle 5 ordered the two by their first
    // publication (the value's, by the backup while split, came first) and saw the
    // delete lost.
    let (writer, deleter) = (FIRST_CLIENT, FIRST_CLIENT + 1);
    let mut options = pinned(2);
    options.network.high_water_mark = 20;
    let forward = route(BACKUP, PRIMARY, Link::Collector);
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    let updates = route(PRIMARY, BACKUP, Link::Updates);
    let reply = route(PRIMARY, BACKUP, Link::SnapshotReply);
    let mut script = vec![(at(1_000), set(0, "/k/a/x", "first"))];
    // Forty keys after /k/a/x: the snapshot's first twenty messages hold /k/a/x and no
    // KTHXBAI.
    script.extend((0..40).map(|n| (at(1_100 + n * 10), set(1, &format!("/k/b/{n:02}"), "v"))));
    script.extend([
        (at(2_000), cut(PRIMARY, BACKUP)),
        (at(2_000), cut(writer, PRIMARY)),
        (at(2_000), cut(deleter, BACKUP)),
        // The writer fails over to the backup, which takes over.
        (at(6_000), set(0, "/k/a/x", "split")),
        (at(7_000), Scripted::StallRoute(forward)),
        (at(7_000), Scripted::StallRoute(request)),
        (at(8_000), heal(PRIMARY, BACKUP)),
        // The backup has stepped down: the primary's delete reaches it as a follower.
        (
            at(9_000),
            Scripted::Write {
                client: 1,
                operation: Operation::Delete {
                    key: b"/k/a/x".to_vec(),
                },
            },
        ),
        (at(9_500), Scripted::StallRoute(updates)),
        (at(9_500), Scripted::StallRoute(reply)),
        // The primary publishes the forward after the delete, then takes the snapshot.
        (at(10_000), Scripted::ReleaseRoute(forward)),
        (at(10_500), Scripted::ReleaseRoute(request)),
        (at(11_000), Scripted::ReleaseRoute(reply)),
        (at(11_001), Scripted::StallRoute(reply)),
        (at(12_000), Scripted::Crash(PRIMARY)),
        (at(12_100), Scripted::Restart(PRIMARY)),
        (at(15_000), heal(writer, PRIMARY)),
        (at(15_000), heal(deleter, BACKUP)),
    ]);
    let report = run("forward published after a delete", options, script);
    assert_server_event(&report, "dual_active");
    assert_server_event(&report, "sync_abandoned");
    assert_final_value(&report, "/k/a/x", Some("split"));
}

#[test]
fn failover_a_copy_whose_update_the_installed_snapshot_holds_is_not_replayed_though_it_came_after_the_request(
) {
    // Found by the simulator (swarm 7047798): a re-syncing backup lost an update's KVPUB
    // at the high-water mark, received the KVPUB of the key's next update, and only
    // then the first update's client copy, which nothing superseded. The snapshot it
    // installed held the first update, so the active had published it, but the copy
    // had arrived after the request, and only earlier copies were settled: at the
    // failover the backup replayed it over the newer value.
    let older_writer = FIRST_CLIENT;
    let mut options = pinned(2);
    // Two messages queued on a route: a third is dropped (ZMQ_SNDHWM).
    options.network.high_water_mark = 2;
    // The schedule it was found with: first HUGZ at the heartbeat.
    options.network.report_joins = false;
    let updates = route(PRIMARY, BACKUP, Link::Updates);
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    let reply = route(PRIMARY, BACKUP, Link::SnapshotReply);
    let mut script = vec![(at(1_000), set(1, "/k/a/x", "first"))];
    // A reconnect makes the backup re-sync; its request waits.
    script.extend(backup_resyncs_with_its_request_held());
    script.extend([
        (at(3_100), Scripted::StallRoute(updates)),
        (at(3_150), stall(older_writer, BACKUP)),
        // Two updates fill the backup's subscription; the third, "older", is dropped.
        (at(3_200), set(1, "/k/a/f1", "v")),
        (at(3_300), set(1, "/k/a/f2", "v")),
        (at(3_400), set(0, "/k/a/x", "older")),
        // The snapshot is taken now, holding "older"; its reply waits.
        (at(3_450), Scripted::StallRoute(reply)),
        (at(3_450), Scripted::ReleaseRoute(request)),
        (at(3_500), Scripted::ReleaseRoute(updates)),
        (at(3_600), set(1, "/k/a/x", "newer")),
        // The copy of "older" reaches the backup after the KVPUB of "newer".
        (at(3_800), heal(older_writer, BACKUP)),
        (at(4_000), Scripted::ReleaseRoute(reply)),
        (at(5_000), Scripted::Crash(PRIMARY)),
    ]);
    let report = run(
        "copy after the request, held by the snapshot",
        options,
        script,
    );
    assert_server_event(&report, "sync_completed");
    assert_final_value(&report, "/k/a/x", Some("newer"));
}

#[test]
fn failover_a_late_copy_of_an_update_lost_in_a_gap_is_replayed_over_a_newer_value_a_known_limit() {
    // The schedule of the scenario above with the early first HUGZ (report_joins): the
    // backup's re-sync does not complete before the primary dies. It missed the KVPUB of
    // "older" (#4, dropped at the high-water mark), received "newer" (#5), then the
    // client's copy of "older". A copy carries no sequence: it may be the update lost in
    // the gap, or a write the active published after #5, or never. Replaying it may go
    // back; dropping it may lose a write only the backup holds. CHP keeps the write
    // (DECISIONS.md, "A late copy of an update lost in a gap"). The model's oracle 3 sees
    // the regression and counts it as that limit, instead of failing.
    let older_writer = FIRST_CLIENT;
    let mut options = pinned(2);
    options.network.high_water_mark = 2;
    options.network.report_joins = true;
    let updates = route(PRIMARY, BACKUP, Link::Updates);
    let request = route(BACKUP, PRIMARY, Link::SnapshotRequest);
    let reply = route(PRIMARY, BACKUP, Link::SnapshotReply);
    let mut script = vec![(at(1_000), set(1, "/k/a/x", "first"))];
    script.extend(backup_resyncs_with_its_request_held());
    script.extend([
        (at(3_100), Scripted::StallRoute(updates)),
        (at(3_150), stall(older_writer, BACKUP)),
        (at(3_200), set(1, "/k/a/f1", "v")),
        (at(3_300), set(1, "/k/a/f2", "v")),
        (at(3_400), set(0, "/k/a/x", "older")),
        (at(3_450), Scripted::StallRoute(reply)),
        (at(3_450), Scripted::ReleaseRoute(request)),
        (at(3_500), Scripted::ReleaseRoute(updates)),
        (at(3_600), set(1, "/k/a/x", "newer")),
        (at(3_800), heal(older_writer, BACKUP)),
        (at(4_000), Scripted::ReleaseRoute(reply)),
        (at(5_000), Scripted::Crash(PRIMARY)),
    ]);
    let report = run("late copy of an update lost in a gap", options, script);
    assert_server_event(&report, "sync_abandoned");
    assert_eq!(report.coverage.model.late_copies_replayed_after_a_gap, 1);
    assert_final_value(&report, "/k/a/x", Some("older"));
}

#[test]
fn split_brain_a_forward_of_an_entry_the_primary_merged_at_a_failover_mid_sync_is_a_repeat() {
    // Found by the simulator (swarms 7012028, 7021981, 7041692, once a backup's split
    // log kept what its restarted primary had not yet shown it held): the primary,
    // re-syncing from the active backup, took over mid-sync and merged the snapshot's
    // first entries, then published a newer value of one of their keys. At the heal the
    // backup forwarded the entry it had published, which the primary did not remember
    // having merged: it published the forward over the newer value.
    let mut options = pinned(1);
    options.network.high_water_mark = 20;
    // The schedule it was found with: first HUGZ at the heartbeat.
    options.network.report_joins = false;
    let request = route(PRIMARY, BACKUP, Link::SnapshotRequest);
    let updates = route(BACKUP, PRIMARY, Link::Updates);
    let reply = route(BACKUP, PRIMARY, Link::SnapshotReply);
    let mut script = backup_active_primary_following();
    // Forty keys after /k/a/x: the snapshot's first twenty messages hold /k/a/x and no
    // KTHXBAI.
    script.extend((0..40).map(|n| (at(1_000 + n * 10), set(0, &format!("/k/b/{n:02}"), "v"))));
    script.extend([
        // The restarted primary asks on the backup's next HUGZ, at 4 s; its request
        // waits, and the backup's updates stop reaching it.
        (at(3_900), Scripted::StallRoute(request)),
        (at(4_100), Scripted::StallRoute(updates)),
        // Published by the backup alone: the primary holds it only from the snapshot.
        (at(4_150), cut(FIRST_CLIENT, PRIMARY)),
        (at(4_200), set(0, "/k/a/x", "backups")),
        (at(4_300), heal(FIRST_CLIENT, PRIMARY)),
        (at(4_400), Scripted::StallRoute(reply)),
        (at(4_400), Scripted::ReleaseRoute(request)),
        (at(4_500), Scripted::ReleaseRoute(reply)),
        (at(4_501), Scripted::StallRoute(reply)),
        // The servers' link stalls; the client, cut from the backup, makes the primary
        // take over before its sync times out.
        (at(5_000), stall(PRIMARY, BACKUP)),
        (at(5_000), stall(BACKUP, PRIMARY)),
        (at(5_000), cut(FIRST_CLIENT, BACKUP)),
        (at(8_000), set(0, "/k/a/x", "newer")),
        (at(10_000), heal(PRIMARY, BACKUP)),
        (at(10_000), heal(FIRST_CLIENT, BACKUP)),
        (at(15_000), Scripted::ReleaseRoute(updates)),
        (at(15_000), Scripted::ReleaseRoute(reply)),
    ]);
    let report = run("forward of a merged entry", options, script);
    assert_server_event(&report, "sync_abandoned");
    assert_server_event(&report, "split_updates_forwarded");
    assert_final_value(&report, "/k/a/x", Some("newer"));
}
