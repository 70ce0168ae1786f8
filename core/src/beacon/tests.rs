use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::*;

const CLUSTER: &[u8] = b"weather";
const ME: [u8; 16] = [1; 16];
const OTHER: [u8; 16] = [2; 16];

fn ms(millis: u64) -> Instant {
    Instant::from_millis(millis)
}

fn host(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn server(kind: Kind, state: BstarState) -> Announcement {
    Announcement {
        kind,
        state: Some(state),
        base_port: 5556,
        state_port: 5003,
    }
}

fn beacon_of(instance: [u8; 16], cluster: &[u8], announcement: Announcement) -> Vec<u8> {
    Datagram {
        cluster: cluster.to_vec(),
        instance,
        announcement,
    }
    .encode()
}

fn machine() -> Beacon {
    Beacon::new(
        ms(0),
        Config::new(CLUSTER, ME, server(Kind::Backup, BstarState::Backup)),
    )
    .unwrap()
}

fn drain(beacon: &mut Beacon) -> Vec<Output> {
    std::iter::from_fn(|| beacon.poll_output()).collect()
}

fn events(beacon: &mut Beacon) -> Vec<Event> {
    drain(beacon)
        .into_iter()
        .filter_map(|output| match output {
            Output::Event(event) => Some(event),
            Output::Send(_) => None,
        })
        .collect()
}

#[test]
fn the_datagram_round_trips_and_its_bytes_are_fixed() {
    let datagram = Datagram {
        cluster: b"prod".to_vec(),
        instance: [0xab; 16],
        announcement: server(Kind::Primary, BstarState::Active),
    };
    let bytes = datagram.encode();
    assert_eq!(Datagram::decode(&bytes), Ok(datagram));
    let mut expected = b"CKVB\x01\x04prod".to_vec();
    expected.extend_from_slice(&[0xab; 16]);
    expected.extend_from_slice(&[1, b'3', 0x15, 0xb4, 0x13, 0x8b]);
    assert_eq!(bytes, expected);
}

#[test]
fn it_announces_at_once_then_every_interval_and_at_once_when_its_state_changes() {
    let mut beacon = machine();
    assert_eq!(beacon.poll_timeout(), Some(ms(0)));
    beacon.handle_timeout(ms(0));
    let sent = drain(&mut beacon);
    assert_eq!(sent.len(), 1);
    assert_eq!(beacon.poll_timeout(), Some(ms(1_000)));
    beacon.set_state(ms(300), BstarState::Passive);
    assert_eq!(beacon.poll_timeout(), Some(ms(300)));
    beacon.handle_timeout(ms(300));
    let Some(Output::Send(bytes)) = drain(&mut beacon).pop() else {
        panic!("no beacon after the state change");
    };
    let datagram = Datagram::decode(&bytes).unwrap();
    assert_eq!(datagram.announcement.state, Some(BstarState::Passive));
    assert_eq!(beacon.poll_timeout(), Some(ms(1_300)));
}

#[test]
fn a_peer_is_up_on_its_first_beacon_changed_when_it_moves_and_down_after_silence() {
    let mut beacon = machine();
    drain(&mut beacon);
    let primary = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Active));
    beacon.handle_datagram(ms(100), host(1), &primary);
    let up = events(&mut beacon);
    assert!(matches!(&up[..], [Event::PeerUp(peer)] if peer.address == host(1)));
    // The same beacon again changes nothing. From another address it keeps the peer up
    // but does not move it while its address is still heard ...
    beacon.handle_datagram(ms(1_100), host(1), &primary);
    assert!(events(&mut beacon).is_empty());
    beacon.handle_datagram(ms(2_100), host(9), &primary);
    assert!(events(&mut beacon).is_empty());
    // ... and moves it once its address has been silent for two and a half intervals.
    beacon.handle_datagram(ms(3_100), host(9), &primary);
    assert!(events(&mut beacon).is_empty());
    beacon.handle_datagram(ms(3_600), host(9), &primary);
    assert!(
        matches!(&events(&mut beacon)[..], [Event::PeerChanged(peer)] if peer.address == host(9))
    );
    // A state change is a change too.
    let passive = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Passive));
    beacon.handle_datagram(ms(3_700), host(9), &passive);
    assert_eq!(events(&mut beacon).len(), 1);
    // No peer is down while its beacons arrive ...
    for second in 4..20 {
        beacon.handle_timeout(ms(second * 1_000));
        beacon.handle_datagram(ms(second * 1_000 + 100), host(9), &passive);
        assert!(events(&mut beacon).is_empty(), "second {second}");
    }
    // ... and down after the silence timeout.
    assert_eq!(beacon.poll_timeout(), Some(ms(20_000)));
    beacon.handle_timeout(ms(20_000));
    drain(&mut beacon);
    beacon.handle_timeout(ms(23_099));
    assert!(events(&mut beacon).is_empty());
    beacon.handle_timeout(ms(23_100));
    assert_eq!(events(&mut beacon), [Event::PeerDown { instance: OTHER }]);
    assert_eq!(beacon.peers().count(), 0);
}

#[test]
fn the_longest_datagram_is_the_limit_and_anything_longer_is_dropped_unread() {
    let longest = Datagram {
        cluster: vec![b'c'; MAX_CLUSTER_LEN],
        instance: OTHER,
        announcement: server(Kind::Backup, BstarState::Passive),
    };
    let bytes = longest.encode();
    assert_eq!(bytes.len(), MAX_DATAGRAM_LEN);
    assert_eq!(Datagram::decode(&bytes), Ok(longest));
    // One byte over the limit is refused for its length before its magic is read.
    let mut over = vec![b'X'; MAX_DATAGRAM_LEN + 1];
    assert_eq!(Datagram::decode(&over), Err(DropReason::BadLength));
    over.truncate(MAX_DATAGRAM_LEN);
    assert_eq!(Datagram::decode(&over), Err(DropReason::BadMagic));
}

#[test]
fn a_cluster_name_empty_or_over_the_limit_is_a_bad_field_whatever_follows() {
    let announcement = server(Kind::Primary, BstarState::Active);
    let empty = Datagram {
        cluster: Vec::new(),
        instance: OTHER,
        announcement,
    };
    assert_eq!(Datagram::decode(&empty.encode()), Err(DropReason::BadField));
    // A declared length over the limit is refused as such, not read (the datagram would
    // also be too short for it).
    let mut too_long = b"CKVB\x01".to_vec();
    too_long.push(u8::try_from(MAX_CLUSTER_LEN + 1).unwrap_or(u8::MAX));
    too_long.extend_from_slice(&[b'c'; 8]);
    assert_eq!(Datagram::decode(&too_long), Err(DropReason::BadField));
}

#[test]
fn bad_datagrams_change_nothing_but_counters() {
    let mut beacon = machine();
    drain(&mut beacon);
    let good = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Active));
    let mut wrong_magic = good.clone();
    wrong_magic[0] = b'X';
    let mut wrong_version = good.clone();
    wrong_version[4] = 9;
    let truncated = good[..good.len() - 1].to_vec();
    let mut long = good.clone();
    long.push(0);
    let huge = vec![0u8; 65_000];
    let mut bad_kind = good.clone();
    let kind_at = good.len() - 6;
    bad_kind[kind_at] = 7;
    let cases: [(&[u8], DropReason); 8] = [
        (&wrong_magic, DropReason::BadMagic),
        (&wrong_version, DropReason::UnknownVersion),
        (&truncated, DropReason::BadLength),
        (&long, DropReason::BadLength),
        (&huge, DropReason::BadLength),
        (&bad_kind, DropReason::BadField),
        (
            &beacon_of(
                OTHER,
                b"elsewhere",
                server(Kind::Primary, BstarState::Active),
            ),
            DropReason::OtherCluster,
        ),
        (
            &beacon_of(ME, CLUSTER, server(Kind::Backup, BstarState::Backup)),
            DropReason::OwnBeacon,
        ),
    ];
    let mut expected: BTreeMap<DropReason, u64> = BTreeMap::new();
    for (bytes, reason) in cases {
        beacon.handle_datagram(ms(10), host(1), bytes);
        *expected.entry(reason).or_default() += 1;
        assert_eq!(beacon.dropped(reason), expected[&reason], "{reason:?}");
    }
    assert!(drain(&mut beacon).is_empty());
    assert_eq!(beacon.peers().count(), 0);
}

#[test]
fn the_configuration_is_checked() {
    let mut config = Config::new(b"", ME, server(Kind::Primary, BstarState::Primary));
    assert_eq!(
        Beacon::new(ms(0), config.clone()).err(),
        Some(Error::ClusterName { len: 0 })
    );
    config.cluster = b"x".to_vec();
    config.silence = config.interval;
    assert_eq!(
        Beacon::new(ms(0), config.clone()).err(),
        Some(Error::SilenceTooShort)
    );
    config.silence = config.interval * 4;
    assert!(Beacon::new(ms(0), config.clone()).is_ok());
    // The cluster name's limits, both ends inclusive.
    config.cluster = vec![b'c'; MAX_CLUSTER_LEN];
    assert!(Beacon::new(ms(0), config.clone()).is_ok());
    config.cluster.push(b'c');
    assert_eq!(
        Beacon::new(ms(0), config.clone()).err(),
        Some(Error::ClusterName {
            len: MAX_CLUSTER_LEN + 1
        })
    );
    config.cluster = b"x".to_vec();
    // The highest base port leaves room for its two neighbours (P+1, P+2).
    config.announcement.base_port = u16::MAX - 2;
    assert!(Beacon::new(ms(0), config.clone()).is_ok());
    config.announcement.base_port = u16::MAX - 1;
    assert_eq!(
        Beacon::new(ms(0), config.clone()).err(),
        Some(Error::Announcement {
            announcement: config.announcement
        })
    );
    // An announcement receivers would drop is refused, with what to fix.
    for announcement in [
        Announcement {
            state: None,
            ..server(Kind::Primary, BstarState::Primary)
        },
        Announcement {
            base_port: 0,
            ..server(Kind::Backup, BstarState::Backup)
        },
        Announcement {
            state_port: 0,
            ..server(Kind::Backup, BstarState::Backup)
        },
        Announcement {
            state: Some(BstarState::Active),
            ..client()
        },
    ] {
        config.announcement = announcement;
        let error = Beacon::new(ms(0), config.clone()).err();
        assert_eq!(error, Some(Error::Announcement { announcement }));
        assert!(error.unwrap().to_string().contains("a server announces"));
    }
}

fn client() -> Announcement {
    Announcement {
        kind: Kind::Client,
        state: None,
        base_port: 0,
        state_port: 0,
    }
}

/// A client machine whose one solicitation, sent when it was made, has been taken.
fn client_machine() -> Beacon {
    let mut beacon = Beacon::new(ms(0), Config::new(CLUSTER, ME, client())).unwrap();
    let sent = drain(&mut beacon);
    assert!(matches!(&sent[..], [Output::Send(_)]), "{sent:?}");
    beacon
}

#[test]
fn a_client_solicits_once_when_it_starts_and_then_only_listens() {
    let mut beacon = Beacon::new(ms(0), Config::new(CLUSTER, ME, client())).unwrap();
    let sent = drain(&mut beacon);
    let [Output::Send(bytes)] = &sent[..] else {
        panic!("expected one solicitation, got {sent:?}");
    };
    let solicitation = Datagram::decode(bytes).unwrap();
    assert_eq!(solicitation.announcement, client());
    assert_eq!(solicitation.cluster, CLUSTER);
    assert_eq!(beacon.solicitations(), 1);
    beacon.handle_timeout(ms(60_000));
    assert!(drain(&mut beacon).is_empty());
}

#[test]
fn a_server_answers_a_solicitation_at_once_and_a_crowd_of_them_at_a_bounded_rate() {
    let mut beacon = machine();
    let solicitation = beacon_of(OTHER, CLUSTER, client());
    beacon.handle_timeout(ms(0));
    assert_eq!(sends(&mut beacon), 1, "the first beacon, at once");
    // A solicitation soon after a beacon: answered a tenth of an interval after it.
    beacon.handle_datagram(ms(30), host(3), &solicitation);
    assert_eq!(beacon.poll_timeout(), Some(ms(100)));
    beacon.handle_timeout(ms(100));
    assert_eq!(sends(&mut beacon), 1);
    // Long after: answered at once.
    beacon.handle_datagram(ms(700), host(3), &solicitation);
    assert_eq!(beacon.poll_timeout(), Some(ms(700)));
    beacon.handle_timeout(ms(700));
    assert_eq!(sends(&mut beacon), 1);
    // A solicitation every millisecond for ten seconds: at most ten beacons more per
    // interval than the regular one.
    let mut sent = 0;
    for at in 701..10_701 {
        beacon.handle_datagram(ms(at), host(3), &solicitation);
        beacon.handle_timeout(ms(at));
        sent += sends(&mut beacon);
    }
    assert!(sent <= 10 * 10 + 10, "{sent} beacons in 10 s");
    assert!(sent >= 10 * 9, "solicitations were answered: {sent}");
    // Each one heard is counted, answered or not.
    assert_eq!(beacon.solicitations(), 2 + 10_000);
    // Clients are never peers.
    assert_eq!(beacon.peers().count(), 0);
    assert!(events(&mut beacon).is_empty());
}

fn sends(beacon: &mut Beacon) -> usize {
    drain(beacon)
        .iter()
        .filter(|output| matches!(output, Output::Send(_)))
        .count()
}

#[test]
fn a_client_only_listens() {
    let mut beacon = client_machine();
    assert_eq!(beacon.poll_timeout(), None);
    beacon.handle_timeout(ms(0));
    beacon.handle_timeout(ms(5_000));
    beacon.set_state(ms(5_000), BstarState::Active);
    assert_eq!(beacon.announcement(), client());
    assert!(drain(&mut beacon).is_empty());
    // It hears servers, and its only timer is their silence.
    let primary = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Active));
    beacon.handle_datagram(ms(6_000), host(1), &primary);
    assert!(matches!(&events(&mut beacon)[..], [Event::PeerUp(_)]));
    assert_eq!(beacon.poll_timeout(), Some(ms(10_000)));
    beacon.handle_timeout(ms(10_000));
    assert_eq!(
        drain(&mut beacon),
        [Output::Event(Event::PeerDown { instance: OTHER })]
    );
    assert_eq!(beacon.poll_timeout(), None);
}

#[test]
fn a_multi_homed_peer_keeps_its_first_address() {
    let mut beacon = client_machine();
    let primary = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Active));
    // Every beacon arrives twice: over the LAN and over loopback, in either order.
    for second in 0..30u64 {
        let (first, then) = if second % 3 == 0 {
            (host(2), host(1))
        } else {
            (host(1), host(2))
        };
        beacon.handle_datagram(ms(second * 1_000), first, &primary);
        beacon.handle_datagram(ms(second * 1_000 + 7), then, &primary);
        beacon.handle_timeout(ms(second * 1_000 + 7));
    }
    let happened = events(&mut beacon);
    assert!(
        matches!(&happened[..], [Event::PeerUp(peer)] if peer.address == host(2)),
        "{happened:?}"
    );
    assert_eq!(
        beacon.peers().next().map(|peer| peer.address),
        Some(host(2))
    );
}

#[test]
fn the_address_rule_moves_only_after_two_and_a_half_silent_intervals() {
    let interval = Duration::from_secs(1);
    let heard = ms(10_000);
    assert_eq!(
        followed_address(host(1), heard, host(2), ms(12_499), interval),
        host(1)
    );
    assert_eq!(
        followed_address(host(1), heard, host(2), ms(12_500), interval),
        host(2)
    );
    assert_eq!(
        followed_address(host(1), heard, host(1), ms(50_000), interval),
        host(1)
    );
    // An absurd interval never overflows: the peer simply never moves.
    assert_eq!(
        followed_address(
            host(1),
            heard,
            host(2),
            ms(u64::MAX / 1_000_000),
            Duration::MAX
        ),
        host(1)
    );
}

fn announcement_strategy() -> impl Strategy<Value = Announcement> {
    prop_oneof![
        (0u16..=u16::MAX).prop_map(|port| Announcement {
            kind: Kind::Client,
            state: None,
            base_port: port,
            state_port: port,
        }),
        (
            prop_oneof![Just(Kind::Primary), Just(Kind::Backup)],
            prop_oneof![
                Just(BstarState::Primary),
                Just(BstarState::Backup),
                Just(BstarState::Active),
                Just(BstarState::Passive)
            ],
            1u16..=u16::MAX - 2,
            1u16..=u16::MAX,
        )
            .prop_map(|(kind, state, base_port, state_port)| Announcement {
                kind,
                state: Some(state),
                base_port,
                state_port,
            }),
    ]
}

proptest! {
    #[test]
    fn every_valid_datagram_round_trips(
        cluster in proptest::collection::vec(any::<u8>(), 1..=MAX_CLUSTER_LEN),
        instance in any::<[u8; 16]>(),
        announcement in announcement_strategy(),
    ) {
        let datagram = Datagram { cluster, instance, announcement };
        let bytes = datagram.encode();
        prop_assert!(bytes.len() <= MAX_DATAGRAM_LEN);
        prop_assert_eq!(Datagram::decode(&bytes), Ok(datagram));
    }

    #[test]
    fn any_bytes_decode_or_are_dropped_without_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut beacon = machine();
        drain(&mut beacon);
        beacon.handle_datagram(ms(1), host(1), &bytes);
        if let Ok(datagram) = Datagram::decode(&bytes) {
            prop_assert_eq!(datagram.encode(), bytes);
        }
    }
}

/// One input to a machine under test.
#[derive(Clone, Debug)]
enum Step {
    /// Time passes (milliseconds), firing whatever is due.
    Wait(u64),
    /// A beacon of peer `instance` (0..3) from host `address` (0..3), in state `active`.
    Beacon {
        instance: u8,
        address: u8,
        active: bool,
    },
    /// Garbage from host 1.
    Garbage(Vec<u8>),
    /// This node's Binary Star state changes.
    SetState(bool),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u64..3_000).prop_map(Step::Wait),
        (0u8..3, 0u8..3, any::<bool>()).prop_map(|(instance, address, active)| Step::Beacon {
            instance,
            address,
            active
        }),
        proptest::collection::vec(any::<u8>(), 0..120).prop_map(Step::Garbage),
        any::<bool>().prop_map(Step::SetState),
    ]
}

fn peer_instance(instance: u8) -> [u8; 16] {
    [instance + 10; 16]
}

fn state_of(active: bool) -> BstarState {
    if active {
        BstarState::Active
    } else {
        BstarState::Passive
    }
}

/// Runs `steps` against `beacon`, calling `handle_timeout` whenever it is due, and
/// checks after every step every invariant of the module against a model.
fn check_invariants(mut beacon: Beacon, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let interval = Duration::from_secs(1);
    let silence = Duration::from_secs(4);
    let is_client = beacon.announcement().kind == Kind::Client;
    let mut now = ms(0);
    // The model: per instance, the last beacon from each address, and the address held.
    let mut last_heard: BTreeMap<[u8; 16], BTreeMap<IpAddr, Instant>> = BTreeMap::new();
    let mut address_of: BTreeMap<[u8; 16], IpAddr> = BTreeMap::new();
    let mut last_send = None;
    for step in steps {
        let fire_until =
            |until: Instant, beacon: &mut Beacon, outputs: &mut Vec<(Instant, Output)>| {
                while let Some(due) = beacon.poll_timeout().filter(|due| *due <= until) {
                    beacon.handle_timeout(due);
                    outputs.extend(std::iter::from_fn(|| beacon.poll_output()).map(|o| (due, o)));
                }
            };
        let mut outputs = Vec::new();
        match step {
            Step::Wait(millis) => {
                now += Duration::from_millis(millis);
                fire_until(now, &mut beacon, &mut outputs);
            }
            Step::Beacon {
                instance,
                address,
                active,
            } => {
                let instance = peer_instance(instance);
                let bytes = beacon_of(instance, CLUSTER, server(Kind::Primary, state_of(active)));
                beacon.handle_datagram(now, host(address), &bytes);
                outputs.extend(drain(&mut beacon).into_iter().map(|o| (now, o)));
                let heard = last_heard.entry(instance).or_default();
                let held = address_of.get(&instance).copied();
                let up = heard.values().max().is_some_and(|at| *at + silence > now);
                // The model of the address rule.
                let expected = match held {
                    Some(held) if up => {
                        let held_heard = heard.get(&held).copied().unwrap_or(ms(0));
                        if held_heard + interval * 5 / 2 <= now {
                            host(address)
                        } else {
                            held
                        }
                    }
                    _ => {
                        heard.clear();
                        host(address)
                    }
                };
                heard.insert(host(address), now);
                address_of.insert(instance, expected);
            }
            Step::Garbage(bytes) => {
                let before: Vec<Peer> = beacon.peers().cloned().collect();
                beacon.handle_datagram(now, host(1), &bytes);
                let after: Vec<Peer> = beacon.peers().cloned().collect();
                if Datagram::decode(&bytes).map_or(true, |d| d.cluster != CLUSTER) {
                    prop_assert_eq!(before, after);
                    prop_assert!(drain(&mut beacon).is_empty());
                }
                outputs.extend(drain(&mut beacon).into_iter().map(|o| (now, o)));
            }
            Step::SetState(active) => {
                beacon.set_state(now, state_of(active));
                fire_until(now, &mut beacon, &mut outputs);
            }
        }
        for (at, output) in &outputs {
            if let Output::Send(bytes) = output {
                prop_assert!(!is_client, "a client sent a beacon");
                prop_assert!(
                    Datagram::decode(bytes).is_ok(),
                    "an unparsable beacon was sent"
                );
                last_send = Some(*at);
            }
        }
        // Servers are heard: never more than an interval between two beacons.
        if !is_client {
            let last = last_send.unwrap_or(ms(0));
            prop_assert!(
                beacon
                    .poll_timeout()
                    .is_some_and(|due| due <= last + interval),
                "the next beacon is due later than an interval after the last"
            );
        }
        // Up exactly while heard within silence, at the address the rule gives.
        let expected: BTreeMap<[u8; 16], IpAddr> = last_heard
            .iter()
            .filter(|(_, heard)| heard.values().max().is_some_and(|at| *at + silence > now))
            .map(|(instance, _)| (*instance, address_of[instance]))
            .collect();
        let actual: BTreeMap<[u8; 16], IpAddr> = beacon
            .peers()
            .map(|peer| (peer.instance, peer.address))
            .collect();
        prop_assert_eq!(actual, expected);
    }
    Ok(())
}

proptest! {
    #[test]
    fn a_server_keeps_every_invariant(steps in proptest::collection::vec(step_strategy(), 0..80)) {
        check_invariants(machine(), steps)?;
    }

    #[test]
    fn a_client_keeps_every_invariant_and_never_sends(
        steps in proptest::collection::vec(step_strategy(), 0..80),
    ) {
        check_invariants(client_machine(), steps)?;
    }

    #[test]
    fn a_peer_heard_from_two_addresses_never_changes_address(
        gaps in proptest::collection::vec((0u64..900, any::<bool>(), 0u64..50), 1..60),
    ) {
        // Beacons at most 900 ms apart, each heard from both addresses in either order.
        let mut beacon = client_machine();
        let primary = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Active));
        let mut now = ms(0);
        for (gap, lan_first, skew) in gaps {
            now += Duration::from_millis(gap);
            let order = if lan_first { [host(1), host(2)] } else { [host(2), host(1)] };
            beacon.handle_datagram(now, order[0], &primary);
            beacon.handle_datagram(now + Duration::from_millis(skew), order[1], &primary);
            now += Duration::from_millis(skew);
        }
        let happened = events(&mut beacon);
        prop_assert_eq!(happened.len(), 1, "{:?}", happened);
        prop_assert!(matches!(&happened[0], Event::PeerUp(_)));
    }
}
