//! The discovery world in `cargo test`: determinism, a few hundred swarm seeds, and
//! scripted scenarios (a heal, a move, a restart, a multi-homed server, garbage).
//!
//! A failure prints the oracle, what it saw and the command that replays it. To watch a
//! scenario: `SCENARIO_TRACE=1 cargo test -p clonekv-sim --test discovery NAME -- --nocapture`.

use std::collections::BTreeSet;
use std::time::Duration;

use clonekv_core::beacon::Kind;
use clonekv_core::kvmsg::BstarState;
use clonekv_core::time::Instant;
use clonekv_sim::discovery::runner::{replay_command, run};
use clonekv_sim::discovery::{DiscoveryOptions, DiscoveryWorld, Garbage, Scripted};
use clonekv_sim::ratio::Ratio;
use clonekv_sim::world::TraceMode;

const PRIMARY: usize = 0;
const BACKUP: usize = 1;

fn trace_mode() -> TraceMode {
    if std::env::var_os("SCENARIO_TRACE").is_some() {
        TraceMode::Print
    } else {
        TraceMode::Recent
    }
}

fn at(seconds: f64) -> Instant {
    Instant::ZERO + Duration::from_secs_f64(seconds)
}

/// Fails with the oracle's verdict, the last events and the replay command.
fn assert_no_violation(world: &DiscoveryWorld, what: &str) {
    if let Some(violation) = world.violation() {
        panic!(
            "{what}: {} at {:?}: {}",
            violation.oracle, violation.at, violation.detail
        );
    }
}

fn assert_seed_passes(seed: u64, default_world: bool) {
    match run(seed, default_world, TraceMode::Recent) {
        Ok(report) => {
            if let Some(violation) = report.violation {
                panic!(
                    "discovery seed {seed} failed {} at {:?}: {}\nlast events:\n  {}\nreplay: {}",
                    violation.oracle,
                    violation.at,
                    violation.detail,
                    report.recent.join("\n  "),
                    replay_command(seed, default_world)
                );
            }
        }
        Err(panic) => panic!(
            "discovery seed {seed} panicked: {panic}\nreplay: {}",
            replay_command(seed, default_world)
        ),
    }
}

/// The nodes of cluster `prod` that listen for its servers: both servers and its clients.
fn prod_nodes(world: &DiscoveryWorld) -> Vec<usize> {
    (0..2 + world.options().clients).collect()
}

/// Asserts that every node of `prod` knows both of its servers (but itself) as they
/// are now, and nothing else.
fn assert_everyone_knows_the_servers(world: &DiscoveryWorld) {
    for observer in prod_nodes(world) {
        let known: BTreeSet<[u8; 16]> = world
            .peers(observer)
            .iter()
            .map(|peer| peer.instance)
            .collect();
        let expected: BTreeSet<[u8; 16]> = [PRIMARY, BACKUP]
            .into_iter()
            .filter(|server| *server != observer)
            .map(|server| world.instance(server))
            .collect();
        assert_eq!(
            known,
            expected,
            "{} at {:?}",
            world.name(observer),
            world.now()
        );
        for peer in world.peers(observer) {
            let server = if peer.instance == world.instance(PRIMARY) {
                PRIMARY
            } else {
                BACKUP
            };
            assert!(world.addresses(server).contains(&peer.address));
            assert_eq!(Some(peer.announcement), world.announcement(server));
        }
    }
}

#[test]
fn the_same_discovery_seed_replays_byte_for_byte() {
    for seed in [1, 7, 42] {
        let first = run(seed, false, TraceMode::Hash).unwrap();
        let second = run(seed, false, TraceMode::Hash).unwrap();
        assert_eq!(first.trace_hash, second.trace_hash, "seed {seed}");
        assert_eq!(first.coverage, second.coverage, "seed {seed}");
    }
    let one = run(1, false, TraceMode::Hash).unwrap();
    let two = run(2, false, TraceMode::Hash).unwrap();
    assert_ne!(one.trace_hash, two.trace_hash);
}

#[test]
fn three_hundred_swarm_seeds_and_fifty_default_worlds_pass() {
    let mut checks = 0;
    for seed in 0..300 {
        assert_seed_passes(seed, false);
    }
    for seed in 0..50 {
        assert_seed_passes(seed, true);
        checks += run(seed, true, TraceMode::Hash)
            .unwrap()
            .coverage
            .known_checks;
    }
    // The bound oracle really ran.
    assert!(checks > 1_000, "{checks}");
}

#[test]
fn heal_a_primary_cut_off_longer_than_the_silence_is_known_again_within_the_bound() {
    let options = DiscoveryOptions::quiet();
    let bound = options.convergence_bound();
    let script = vec![(
        Duration::from_secs(10),
        Scripted::Isolate {
            node: PRIMARY,
            duration: Duration::from_secs(10),
        },
    )];
    let mut world = DiscoveryWorld::with_script(3, options, script, trace_mode());
    world.run_until(at(9.0));
    assert_everyone_knows_the_servers(&world);
    // Cut off for longer than the silence: everybody has let it go ...
    world.run_until(at(19.9));
    assert_no_violation(&world, "while the primary is cut off");
    for observer in prod_nodes(&world)
        .into_iter()
        .filter(|node| *node != PRIMARY)
    {
        assert!(
            world
                .peers(observer)
                .iter()
                .all(|peer| peer.instance != world.instance(PRIMARY)),
            "{} still holds the isolated primary",
            world.name(observer)
        );
    }
    // ... and knows it again within the bound after the heal.
    world.run_until(at(20.0) + bound);
    assert_no_violation(&world, "after the heal");
    assert_everyone_knows_the_servers(&world);
    let report = world.run();
    assert!(report.violation.is_none(), "{:?}", report.violation);
    assert!(report.coverage.peer_down >= 4, "{:?}", report.coverage);
}

#[test]
fn move_a_backup_that_changes_address_is_followed_after_two_intervals_not_before() {
    let options = DiscoveryOptions {
        multi_homed: false,
        ..DiscoveryOptions::quiet()
    };
    let bound = options.convergence_bound();
    let script = vec![(Duration::from_secs(10), Scripted::Move { node: BACKUP })];
    let mut world = DiscoveryWorld::with_script(4, options, script, trace_mode());
    world.run_until(at(9.0));
    let old = world.addresses(BACKUP);
    world.run_until(at(11.5));
    let new = world.addresses(BACKUP);
    assert_ne!(old, new);
    // Its old address went silent at 10 s: it is still held at 11.5 s ...
    for observer in prod_nodes(&world)
        .into_iter()
        .filter(|node| *node != BACKUP)
    {
        let peer = world
            .peers(observer)
            .into_iter()
            .find(|peer| peer.instance == world.instance(BACKUP))
            .expect("the backup is up");
        assert_eq!(Some(&peer.address), old.first(), "{}", world.name(observer));
    }
    // ... and the new one within the bound.
    world.run_until(at(10.0) + bound);
    assert_no_violation(&world, "after the move");
    assert_everyone_knows_the_servers(&world);
    let report = world.run();
    assert!(report.violation.is_none(), "{:?}", report.violation);
    // Every listener but the backup followed it once, without it going down.
    assert_eq!(
        report.coverage.followed_moves,
        u64::try_from(prod_nodes_count(&report_options()) - 1).unwrap()
    );
    assert_eq!(report.coverage.peer_down, 0);
}

fn options_clients() -> usize {
    let options = DiscoveryOptions::quiet();
    options.clients + usize::from(options.other_cluster_client)
}

fn report_options() -> DiscoveryOptions {
    DiscoveryOptions::quiet()
}

fn prod_nodes_count(options: &DiscoveryOptions) -> usize {
    2 + options.clients
}

#[test]
fn restart_a_restarted_primary_is_a_new_peer_and_its_old_instance_goes_down() {
    let options = DiscoveryOptions::quiet();
    let (bound, silence, delay) = (
        options.convergence_bound(),
        options.silence,
        options.max_delay(),
    );
    let script = vec![(
        Duration::from_secs(10),
        Scripted::Restart {
            node: PRIMARY,
            down_for: Duration::from_millis(300),
        },
    )];
    let mut world = DiscoveryWorld::with_script(5, options, script, trace_mode());
    world.run_until(at(9.0));
    let old = world.instance(PRIMARY);
    world.run_until(at(10.3) + bound);
    assert_no_violation(&world, "after the restart");
    let new = world.instance(PRIMARY);
    assert_ne!(old, new);
    // The old instance's last beacon left before 10 s: down by then plus the silence.
    world.run_until(at(10.0) + silence + delay);
    assert_everyone_knows_the_servers(&world);
    for observer in prod_nodes(&world) {
        assert!(world
            .peers(observer)
            .iter()
            .all(|peer| peer.instance != old));
    }
    let report = world.run();
    assert!(report.violation.is_none(), "{:?}", report.violation);
    assert_eq!(report.coverage.faults.get("restart"), Some(&1));
}

#[test]
fn multi_homed_a_server_heard_from_two_addresses_keeps_one_at_every_listener() {
    // Loss-free, then with one loss in a row: the address never moves in either.
    for (seed, loss, in_a_row) in [(6, Ratio::NEVER, 0), (7, Ratio::new(1, 10), 1)] {
        let options = DiscoveryOptions {
            multi_homed: true,
            loss,
            max_consecutive_losses: in_a_row,
            delay_max: Duration::from_millis(20),
            ..DiscoveryOptions::quiet()
        };
        let mut world = DiscoveryWorld::with_script(seed, options, Vec::new(), trace_mode());
        let node = world.multi_homed_node().expect("a multi-homed server");
        assert_eq!(world.addresses(node).len(), 2);
        world.run_until(at(10.0));
        let held: Vec<_> = world
            .peers(2)
            .into_iter()
            .filter(|peer| peer.instance == world.instance(node))
            .collect();
        assert_eq!(held.len(), 1);
        let report = world.run();
        assert!(report.violation.is_none(), "{:?}", report.violation);
        assert_eq!(report.coverage.multi_homed_moves, 0, "seed {seed}");
        assert_eq!(report.coverage.peer_changed, 0, "seed {seed}");
    }
}

#[test]
fn garbage_of_every_kind_changes_only_counters_at_every_node() {
    let options = DiscoveryOptions::quiet();
    let nodes = 2 + options.clients + 2 + usize::from(options.other_cluster_client);
    let kinds = [
        Garbage::WrongMagic,
        Garbage::Truncated,
        Garbage::Huge,
        Garbage::UnknownVersion,
        Garbage::BadField,
        Garbage::OtherCluster,
        Garbage::Own,
    ];
    let mut script = Vec::new();
    for node in 0..nodes {
        for (index, garbage) in kinds.into_iter().enumerate() {
            script.push((
                Duration::from_millis(5_000 + 100 * index as u64),
                Scripted::Garbage { node, garbage },
            ));
        }
    }
    let quiet =
        DiscoveryWorld::with_script(8, DiscoveryOptions::quiet(), Vec::new(), TraceMode::Hash)
            .run();
    let world = DiscoveryWorld::with_script(8, options, script, trace_mode());
    assert_eq!(world.node_count(), nodes);
    let report = world.run();
    assert!(report.violation.is_none(), "{:?}", report.violation);
    let extra = |reason: &str| {
        report.coverage.dropped.get(reason).copied().unwrap_or(0)
            - quiet.coverage.dropped.get(reason).copied().unwrap_or(0)
    };
    let nodes = u64::try_from(nodes).unwrap();
    assert_eq!(extra("bad_magic"), nodes);
    assert_eq!(extra("bad_length"), 2 * nodes);
    assert_eq!(extra("unknown_version"), nodes);
    assert_eq!(extra("bad_field"), nodes);
    assert_eq!(extra("other_cluster"), nodes);
    assert_eq!(extra("own_beacon"), nodes);
    // Nothing else differs: the same peer events as without the garbage.
    assert_eq!(report.coverage.peer_up, quiet.coverage.peer_up);
    assert_eq!(report.coverage.peer_changed, quiet.coverage.peer_changed);
}

#[test]
fn clients_solicit_once_then_listen_and_the_other_cluster_stays_apart() {
    let options = DiscoveryOptions {
        state_change: Ratio::NEVER,
        ..DiscoveryOptions::quiet()
    };
    let script = vec![
        (
            Duration::from_secs(5),
            Scripted::SetState {
                node: PRIMARY,
                state: BstarState::Active,
            },
        ),
        (
            Duration::from_secs(5),
            Scripted::SetState {
                node: BACKUP,
                state: BstarState::Passive,
            },
        ),
    ];
    let world = DiscoveryWorld::with_script(9, options, script, trace_mode());
    let servers = 4;
    let report = world.run();
    assert!(report.violation.is_none(), "{:?}", report.violation);
    // One solicitation from each client (oracle (vi) fails on any more); 90 s of one
    // beacon a second from each server, plus one per state change and at most one per
    // solicitation answered early.
    let clients = u64::try_from(options_clients()).unwrap();
    assert_eq!(report.coverage.solicitations, clients);
    let sent = report.coverage.beacons_sent;
    assert!(
        (servers * 88..=servers * 92 + 2 + clients).contains(&sent),
        "{sent}"
    );
    let world =
        DiscoveryWorld::with_script(9, DiscoveryOptions::quiet(), Vec::new(), TraceMode::Hash);
    let mut world = world;
    world.run_until(at(30.0));
    for observer in prod_nodes(&world) {
        for peer in world.peers(observer) {
            assert_ne!(peer.announcement.kind, Kind::Client);
        }
    }
    assert_everyone_knows_the_servers(&world);
}
