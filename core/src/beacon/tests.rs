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
    // The same beacon again changes nothing; from another address it is a move.
    beacon.handle_datagram(ms(1_100), host(1), &primary);
    assert!(events(&mut beacon).is_empty());
    beacon.handle_datagram(ms(2_100), host(9), &primary);
    assert!(
        matches!(&events(&mut beacon)[..], [Event::PeerChanged(peer)] if peer.address == host(9))
    );
    // A state change is a change too.
    let passive = beacon_of(OTHER, CLUSTER, server(Kind::Primary, BstarState::Passive));
    beacon.handle_datagram(ms(3_100), host(9), &passive);
    assert_eq!(events(&mut beacon).len(), 1);
    // No peer is down while its beacons arrive ...
    for second in 4..20 {
        beacon.handle_timeout(ms(second * 1_000));
        beacon.handle_datagram(ms(second * 1_000 + 100), host(9), &passive);
        assert!(events(&mut beacon).is_empty(), "second {second}");
    }
    // ... and down after the silence timeout.
    assert_eq!(beacon.poll_timeout(), Some(ms(20_000)));
    beacon.handle_timeout(ms(23_099));
    assert!(events(&mut beacon).is_empty());
    beacon.handle_timeout(ms(23_100));
    assert_eq!(events(&mut beacon), [Event::PeerDown { instance: OTHER }]);
    assert_eq!(beacon.peers().count(), 0);
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
        Beacon::new(ms(0), config).err(),
        Some(Error::SilenceTooShort)
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
