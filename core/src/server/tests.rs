use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::kvmsg::{Properties, HUGZ, KTHXBAI, TTL};

const T0: Instant = Instant::from_millis(1_000_000);
/// 2026-11-21, as in the reference bytes of PROTOCOL.md §2.
const WALL0: EpochMillis = EpochMillis(1_795_268_600_000);

/// A fixed hash key: tests need no randomness, and the key changes no output.
fn test_key() -> HashKey {
    HashKey::from_bytes([0x5a; 16])
}

fn uuid(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

/// A distinct uuid for the `n`th of many updates (uuids are unique per update).
fn nth_uuid(n: u32) -> Uuid {
    let mut bytes = [0xab; 16];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    Uuid::from_bytes(bytes)
}

fn set(key: &str, value: &str, n: u8) -> KvMsg {
    KvMsg::kvset(key.as_bytes().to_vec(), value.as_bytes().to_vec(), uuid(n))
}

fn delete(key: &str, n: u8) -> KvMsg {
    KvMsg::kvset_delete(key.as_bytes().to_vec(), uuid(n))
}

fn with_ttl_text(mut message: KvMsg, ttl: &str) -> KvMsg {
    message.properties.set(TTL, ttl.as_bytes()).unwrap();
    message
}

/// The active's KVPUB of `message` at `sequence`.
fn kvpub(message: KvMsg, sequence: i64) -> KvMsg {
    message.with_sequence(sequence)
}

fn decode<F: AsRef<[u8]>>(frames: &[F]) -> KvMsg {
    KvMsg::decode(frames, &Limits::default()).unwrap()
}

/// A server with a hand on the clock.
struct Harness {
    server: Server,
    now: Instant,
    wall: EpochMillis,
}

impl Harness {
    fn new(config: Config) -> Self {
        let mut harness = Harness {
            server: Server::new(T0, WALL0, config, test_key()).unwrap(),
            now: T0,
            wall: WALL0,
        };
        harness.server.handle_timeout(T0, WALL0);
        harness.drain();
        harness
    }

    /// A primary that heard the backup and became active.
    fn active() -> Self {
        let mut harness = Harness::new(Config::primary());
        harness.peer_state(BstarState::Backup);
        assert_eq!(harness.server.state(), BstarState::Active);
        harness.drain();
        harness
    }

    /// A backup that became passive and synced an empty map at sequence `sequence`.
    fn passive_at(sequence: i64) -> Self {
        Harness::passive_with(Config::backup(), sequence)
    }

    fn passive_with(config: Config, sequence: i64) -> Self {
        let mut harness = Harness::new(config);
        harness.peer_state(BstarState::Active);
        harness.peer_update(KvMsg::hugz(sequence));
        harness.peer_snapshot(KvMsg::kthxbai(sequence, Vec::new()));
        assert_eq!(harness.server.state(), BstarState::Passive);
        assert!(!harness.server.is_syncing());
        harness.drain();
        harness
    }

    fn advance(&mut self, millis: u64) {
        self.now += Duration::from_millis(millis);
        self.wall = self.wall.saturating_add(Duration::from_millis(millis));
    }

    fn collect(&mut self, message: KvMsg) {
        self.server
            .handle_collected(self.now, self.wall, &message.encode());
    }

    fn peer_update(&mut self, message: KvMsg) {
        self.server
            .handle_peer_update(self.now, self.wall, &message.encode());
    }

    fn peer_snapshot(&mut self, message: KvMsg) {
        self.server
            .handle_peer_snapshot(self.now, self.wall, &message.encode());
    }

    fn peer_state(&mut self, state: BstarState) {
        self.server
            .handle_peer_state(self.now, self.wall, &[state.encode()]);
    }

    fn request(&mut self, routing_id: &str, subtree: &str) {
        self.server.handle_snapshot_request(
            self.now,
            self.wall,
            routing_id.as_bytes(),
            &SnapshotRequest::new(subtree.as_bytes().to_vec()).encode(),
        );
    }

    fn timeout(&mut self) {
        self.server.handle_timeout(self.now, self.wall);
    }

    /// Moves time to the server's next deadline and fires it.
    fn run_to_next_timeout(&mut self) {
        let deadline = self.server.poll_timeout().unwrap();
        let step = deadline.saturating_duration_since(self.now);
        self.advance(u64::try_from(step.as_millis()).unwrap());
        self.timeout();
    }

    fn drain(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.server.poll_output()).collect()
    }

    /// Drains the outputs and keeps the published messages, HUGZ excluded.
    fn published(&mut self) -> Vec<KvMsg> {
        let mut published = self.published_with_hugz();
        published.retain(|message| !message.is_hugz());
        published
    }

    /// Drains the outputs and keeps the published messages, HUGZ included.
    fn published_with_hugz(&mut self) -> Vec<KvMsg> {
        self.drain()
            .into_iter()
            .filter_map(|output| match output {
                Output::Publish(frames) => Some(decode(&frames)),
                _ => None,
            })
            .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        self.drain()
            .into_iter()
            .filter_map(|output| match output {
                Output::Event(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    fn pull_all(&mut self, routing_id: &str) -> Vec<KvMsg> {
        std::iter::from_fn(|| self.server.poll_snapshot(self.now, routing_id.as_bytes()))
            .map(|frames| decode(&frames))
            .collect()
    }

    fn value(&self, key: &str) -> Option<&[u8]> {
        self.server.get(key.as_bytes()).map(Entry::body)
    }

    fn stored_keys(&self) -> Vec<Vec<u8>> {
        self.server.iter().map(|(key, _)| key.to_vec()).collect()
    }

    fn dropped(&self, source: InputSource, reason: &str) -> u64 {
        self.server.counters().dropped(source, reason)
    }
}

fn keys(messages: &[KvMsg]) -> Vec<String> {
    messages
        .iter()
        .map(|message| String::from_utf8_lossy(&message.key).into_owned())
        .collect()
}

// --- Configuration -------------------------------------------------------------------

#[test]
fn default_config_follows_the_spec_and_is_valid() {
    let config = Config::primary();
    assert_eq!(config.bstar.heartbeat, Duration::from_secs(1));
    assert_eq!(config.bstar.peer_expiry_beats, 2);
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(Config::backup().bstar.role, Role::Backup);
    assert_eq!(Config::backup().validate(), Ok(()));
}

#[test]
fn a_zero_limit_or_timeout_is_an_invalid_config() {
    let mut config = Config::primary();
    config.max_snapshot_streams = 0;
    assert_eq!(
        Server::new(T0, WALL0, config, test_key()).unwrap_err(),
        ConfigError::Zero {
            field: "max_snapshot_streams"
        }
    );
    let mut config = Config::primary();
    config.peer_sync_timeout = Duration::ZERO;
    assert_eq!(
        config.validate(),
        Err(ConfigError::Zero {
            field: "peer_sync_timeout"
        })
    );
    let mut config = Config::backup();
    config.bstar.heartbeat = Duration::ZERO;
    assert_eq!(
        config.validate(),
        Err(ConfigError::Zero { field: "heartbeat" })
    );
}

// --- Active: updates -----------------------------------------------------------------

#[test]
fn active_numbers_each_update_and_publishes_it_unchanged_but_for_the_sequence() {
    let mut harness = Harness::active();
    let first = with_ttl_text(set("/a", "1", 1), "24");
    harness.collect(first.clone());
    harness.collect(set("/b", "2", 2));
    let published = harness.published();
    assert_eq!(published, [kvpub(first, 1), kvpub(set("/b", "2", 2), 2)]);
    assert_eq!(harness.server.sequence(), 2);
    assert_eq!(harness.server.counters().published, 2);
}

#[test]
fn active_stores_each_update_at_its_sequence() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.collect(set("/a", "2", 2));
    let entry = harness.server.get(b"/a").unwrap();
    assert_eq!(entry.body(), b"2");
    assert_eq!(entry.sequence(), 2);
    assert_eq!(entry.uuid(), Some(uuid(2)));
    assert_eq!(harness.server.len(), 1);
}

#[test]
fn active_publishes_a_delete_and_removes_the_key() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.collect(delete("/a", 2));
    let published = harness.published();
    assert_eq!(published[1], kvpub(delete("/a", 2), 2));
    assert!(harness.server.get(b"/a").is_none());
    assert!(harness.server.is_empty());
}

#[test]
fn a_delete_of_a_missing_key_is_still_a_numbered_change() {
    let mut harness = Harness::active();
    harness.collect(delete("/nothing", 1));
    assert_eq!(harness.published(), [kvpub(delete("/nothing", 1), 1)]);
    assert_eq!(harness.server.sequence(), 1);
}

#[test]
fn active_publishes_the_clients_relative_ttl_but_stores_the_absolute_expiry_in_epoch_millis() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/eph", "v", 1), "24"));
    let published = harness.published();
    assert_eq!(published[0].properties.get(TTL), Some(&b"24"[..]));
    let entry = harness.server.get(b"/eph").unwrap();
    let expected = WALL0.saturating_add(Duration::from_secs(24));
    assert_eq!(entry.expires_at(), Some(expected));
    assert_eq!(
        entry.properties().get(TTL),
        Some(expected.0.to_string().as_bytes())
    );
}

#[test]
fn a_fractional_ttl_is_kept_to_the_millisecond() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/eph", "v", 1), "1.5"));
    assert_eq!(
        harness.server.get(b"/eph").unwrap().expires_at(),
        Some(WALL0.saturating_add(Duration::from_millis(1_500)))
    );
}

#[test]
fn a_zero_ttl_means_persistent() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/p", "v", 1), "0"));
    assert_eq!(harness.server.get(b"/p").unwrap().expires_at(), None);
    harness.advance(3_600_000);
    harness.timeout();
    assert_eq!(harness.value("/p"), Some(&b"v"[..]));
}

#[test]
fn poll_timeout_reports_the_next_expiry() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/late", "v", 1), "0.4"));
    harness.collect(with_ttl_text(set("/soon", "v", 2), "0.25"));
    harness.drain();
    assert_eq!(
        harness.server.poll_timeout(),
        Some(T0 + Duration::from_millis(250))
    );
}

#[test]
fn a_ttl_expires_on_time_and_publishes_a_delete_with_the_entrys_uuid_and_properties() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/eph", "v", 7), "0.3"));
    harness.drain();
    harness.advance(299);
    harness.timeout();
    assert!(harness.published().is_empty(), "not expired 1 ms early");
    assert!(harness.value("/eph").is_some());

    harness.run_to_next_timeout();
    assert_eq!(
        harness.wall,
        WALL0.saturating_add(Duration::from_millis(300))
    );
    let published = harness.published();
    let expiry = WALL0.saturating_add(Duration::from_millis(300));
    let mut properties = Properties::new();
    properties
        .set(TTL, expiry.0.to_string().as_bytes())
        .unwrap();
    assert_eq!(
        published,
        [KvMsg {
            key: b"/eph".to_vec(),
            sequence: 2,
            uuid: Some(uuid(7)),
            properties,
            body: Vec::new(),
        }]
    );
    assert!(harness.value("/eph").is_none());
    assert_eq!(harness.server.sequence(), 2);
    assert_eq!(harness.server.counters().expired, 1);
}

#[test]
fn expiries_are_due_whenever_the_host_next_calls_in_even_without_a_timeout() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/eph", "v", 1), "1"));
    harness.drain();
    harness.advance(1_050);
    // The host was busy and feeds an input before calling handle_timeout.
    harness.collect(set("/other", "v", 2));
    let published = harness.published();
    assert_eq!(keys(&published), ["/eph", "/other"]);
    assert!(published[0].is_delete());
}

#[test]
fn overwriting_an_ephemeral_key_with_a_persistent_value_cancels_its_expiry() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/k", "short", 1), "1"));
    harness.collect(set("/k", "forever", 2));
    harness.drain();
    harness.advance(5_000);
    harness.timeout();
    assert!(harness.published().is_empty());
    assert_eq!(harness.value("/k"), Some(&b"forever"[..]));
}

#[test]
fn overwriting_an_ephemeral_key_moves_its_expiry() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/k", "a", 1), "1"));
    harness.collect(with_ttl_text(set("/k", "b", 2), "10"));
    harness.drain();
    harness.advance(2_000);
    harness.timeout();
    assert!(harness.published().is_empty());
    harness.advance(8_000);
    harness.timeout();
    let published = harness.published();
    assert_eq!(keys(&published), ["/k"]);
    assert!(published[0].is_delete());
}

#[test]
fn expiry_cost_does_not_depend_on_the_map_size() {
    // The index, not a sweep, finds what is due: with 10 000 persistent keys the next
    // deadline is still the single ephemeral one.
    let mut harness = Harness::active();
    for n in 0..10_000u32 {
        harness.collect(KvMsg::kvset(
            format!("/p/{n:05}").into_bytes(),
            b"v".to_vec(),
            nth_uuid(n),
        ));
    }
    harness.collect(with_ttl_text(set("/eph", "v", 1), "2"));
    harness.drain();
    assert_eq!(harness.server.store.expiry_count(), 1);
    assert_eq!(
        harness.server.poll_timeout(),
        Some(T0 + Duration::from_millis(1_000)),
        "the heartbeat comes first"
    );
    harness.run_to_next_timeout();
    harness.run_to_next_timeout();
    assert!(harness.value("/eph").is_none());
}

#[test]
fn every_server_sends_hugz_with_its_current_sequence_and_state_every_heartbeat() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.drain();
    harness.run_to_next_timeout();
    assert_eq!(harness.now, T0 + Duration::from_secs(1));
    let hugz = harness.published_with_hugz();
    assert_eq!(hugz, [KvMsg::hugz_from(BstarState::Active, 1).with_keys(1)]);
    assert_eq!(hugz[0].hugz_keys(), Some(1), "and how many keys it holds");

    // A passive says so in its HUGZ, so that a client still following it (a backup
    // that stepped down, a primary that restarted) knows to fail over.
    let mut passive = Harness::passive_at(9);
    passive.advance(1_000);
    passive.timeout();
    let expected = KvMsg::hugz_from(BstarState::Passive, 9).with_keys(0);
    assert_eq!(expected.hugz_state(), Some(BstarState::Passive));
    assert!(passive
        .drain()
        .contains(&Output::Publish(expected.encode().map(Frame::from))));
}

#[test]
fn a_new_subscriber_gets_a_hugz_at_once_but_a_crowd_gets_one_per_interval() {
    let mut harness = Harness::active();
    harness.run_to_next_timeout();
    harness.drain();
    let heartbeat_due = harness.server.poll_timeout().unwrap();
    harness.advance(100);
    harness
        .server
        .handle_subscriber_joined(harness.now, harness.wall);
    assert_eq!(
        harness.server.poll_timeout(),
        Some(harness.now),
        "a HUGZ now"
    );
    harness.timeout();
    assert_eq!(hugz_count(harness.drain()), 1);
    // Two more subscribers right after: one HUGZ, after the welcome interval.
    harness.advance(10);
    harness
        .server
        .handle_subscriber_joined(harness.now, harness.wall);
    harness
        .server
        .handle_subscriber_joined(harness.now, harness.wall);
    let next = harness.server.poll_timeout().unwrap();
    assert_eq!(
        next,
        harness.now + (WELCOME_HUGZ_INTERVAL - Duration::from_millis(10))
    );
    assert!(next < heartbeat_due);
    harness.run_to_next_timeout();
    assert_eq!(hugz_count(harness.drain()), 1);
    assert_eq!(harness.server.counters().subscribers_joined, 3);
}

#[test]
fn a_subscription_that_a_hugz_matches_is_a_new_subscriber() {
    let mut harness = Harness::active();
    for topic in [&b"HUGZ"[..], b"", b"HU"] {
        let mut message = vec![1u8];
        message.extend_from_slice(topic);
        harness
            .server
            .handle_subscription(harness.now, harness.wall, &message);
    }
    // A subtree subscription, an unsubscription, garbage.
    for message in [&b"\x01/weather/"[..], b"\x00HUGZ", b""] {
        harness
            .server
            .handle_subscription(harness.now, harness.wall, message);
    }
    assert_eq!(harness.server.counters().subscribers_joined, 3);
}

fn hugz_count(outputs: Vec<Output>) -> usize {
    outputs
        .into_iter()
        .filter(|output| match output {
            Output::Publish(frames) => decode(frames).is_hugz(),
            _ => false,
        })
        .count()
}

#[test]
fn the_binary_star_state_goes_to_the_peer_every_heartbeat() {
    let mut harness = Harness::active();
    harness.advance(1_000);
    harness.timeout();
    assert!(harness
        .drain()
        .contains(&Output::SendStateToPeer(b"3".to_vec())));
}

// --- Active: rejected input ----------------------------------------------------------

#[test]
fn a_kvset_with_a_reserved_key_is_dropped_and_counted() {
    let mut harness = Harness::active();
    harness.collect(set("HUGZ", "x", 1));
    harness.collect(set("KTHXBAI", "x", 2));
    assert_eq!(
        harness.events(),
        vec![
            Event::InputDropped {
                source: InputSource::Collector,
                reason: DropReason::ReservedKey
            };
            2
        ]
    );
    assert_eq!(harness.dropped(InputSource::Collector, "reserved_key"), 2);
    assert_eq!(harness.server.sequence(), 0);
    assert!(harness.server.is_empty());
}

#[test]
fn a_kvset_the_active_already_published_is_dropped_so_its_key_cannot_go_back() {
    // Found by the simulator (swarm seed 192): after a split brain the backup forwarded
    // an update the primary had already published and then replaced; republishing it
    // put the key back to the older value.
    let mut harness = Harness::active();
    harness.collect(set("/k", "older", 1));
    harness.collect(set("/k", "newer", 2));
    harness.drain();
    harness.collect(set("/k", "older", 1)); // the forward, or a network duplicate
    assert!(harness.published().is_empty());
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
    assert_eq!(harness.dropped(InputSource::Collector, "duplicate_uuid"), 1);
}

#[test]
fn an_update_seen_from_the_active_while_syncing_is_never_applied_again() {
    // Found by the simulator (swarm seed 750): a delete received while waiting for a
    // snapshot (which shows it only as an absent key) was applied again after failover,
    // from a client's copy delayed by a stalled connection.
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(kvpub(delete("/k", 7), 5));
    harness.peer_update(KvMsg::hugz(5));
    harness.peer_snapshot(kvpub(set("/k/other", "x", 8), 4));
    harness.peer_snapshot(KvMsg::kthxbai(5, Vec::new()));
    harness.drain();
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.drain();
    harness.collect(delete("/k", 7));
    assert!(harness.published().is_empty());
    assert_eq!(harness.dropped(InputSource::Collector, "duplicate_uuid"), 1);
}

#[test]
fn a_kvset_with_a_bad_ttl_is_dropped_and_counted() {
    let mut harness = Harness::active();
    for bad in ["-1", "soon", "1e3", ""] {
        harness.collect(with_ttl_text(set("/a", "1", 1), bad));
    }
    assert_eq!(harness.dropped(InputSource::Collector, "invalid_ttl"), 4);
    assert!(harness.published().is_empty());
    assert_eq!(harness.server.sequence(), 0);
}

#[test]
fn a_newer_request_replaces_the_snapshot_waiting_behind_the_one_being_sent() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.request("client", "");
    harness.collect(set("/a", "2", 2));
    harness.request("client", "");
    harness.collect(set("/a", "3", 3));
    harness.request("client", "");
    assert_eq!(harness.server.counters().snapshots_superseded, 1);
    let replies = harness.pull_all("client");
    let ends: Vec<i64> = replies
        .iter()
        .filter(|message| message.is_kthxbai())
        .map(|message| message.sequence)
        .collect();
    // The first, then the newest: the one at 2 was obsolete before it started.
    assert_eq!(ends, [1, 3]);
}

#[test]
fn the_active_publishes_a_kvset_without_a_uuid_like_any_other() {
    let mut harness = Harness::active();
    let mut anonymous = set("/a", "1", 1);
    anonymous.uuid = None;
    harness.collect(anonymous.clone());
    assert_eq!(harness.published(), vec![kvpub(anonymous.clone(), 1)]);
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
    // Nothing identifies a second copy of it: each is a new update (RFC 12 lets a
    // client leave the uuid out, and then it cannot be deduplicated).
    harness.collect(anonymous.clone());
    assert_eq!(harness.published(), vec![kvpub(anonymous, 2)]);
}

#[test]
fn a_passive_applies_a_uuid_less_update_once_from_the_actives_kvpub_and_never_replays_it() {
    let mut harness = Harness::passive_at(0);
    let mut anonymous = set("/a", "1", 1);
    anonymous.uuid = None;
    harness.collect(anonymous.clone());
    assert_eq!(
        harness.dropped(InputSource::Collector, "unmatchable_copy"),
        1
    );
    assert_eq!(
        harness.server.pending_len(),
        0,
        "it cannot be matched: not held"
    );
    harness.peer_update(kvpub(anonymous, 1));
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
    // At the failover nothing is replayed, so the update is applied exactly once.
    harness.advance(3_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert!(harness.published().is_empty());
    assert_eq!(harness.server.sequence(), 1);
}

#[test]
fn malformed_kvset_frames_are_dropped_and_counted_by_decode_reason() {
    let mut harness = Harness::active();
    let mut frames = set("/a", "1", 1).encode().to_vec();
    frames[1] = vec![0; 3];
    harness
        .server
        .handle_collected(harness.now, harness.wall, &frames);
    harness
        .server
        .handle_collected(harness.now, harness.wall, &frames[..4]);
    assert_eq!(
        harness.dropped(InputSource::Collector, "sequence_length"),
        1
    );
    assert_eq!(harness.dropped(InputSource::Collector, "frame_count"), 1);
    assert_eq!(harness.server.counters().dropped_total(), 2);
    assert!(harness.published().is_empty());
}

#[test]
fn an_icanhaz_with_extra_frames_is_dropped_counted_and_does_not_vote() {
    let mut harness = Harness::new(Config::primary());
    harness.advance(5_000); // the peer has been silent long enough for a takeover
                            // A third frame is only ever a 16-byte resume position after an empty subtree.
    let frames = [b"ICANHAZ?".to_vec(), Vec::new(), b"client-2".to_vec()];
    harness
        .server
        .handle_snapshot_request(harness.now, harness.wall, b"c1", &frames);
    assert_eq!(
        harness.dropped(InputSource::SnapshotRequest, "bad_resume_frame"),
        1
    );
    let frames: [&[u8]; 4] = [b"ICANHAZ?", b"", b"x", b"y"];
    harness
        .server
        .handle_snapshot_request(harness.now, harness.wall, b"c1", &frames);
    assert_eq!(
        harness.dropped(InputSource::SnapshotRequest, "frame_count"),
        1
    );
    assert_eq!(
        harness.server.state(),
        BstarState::Primary,
        "garbage must not promote"
    );
    assert_eq!(harness.server.open_snapshot_streams(), 0);
    // The server goes on serving: the next well-formed request is answered.
    harness.request("c1", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(keys(&harness.pull_all("c1")), ["KTHXBAI"]);
}

#[test]
fn an_unknown_command_on_the_voter_socket_is_dropped_and_counted() {
    let mut harness = Harness::active();
    harness.server.handle_snapshot_request(
        harness.now,
        harness.wall,
        b"c1",
        &[b"GIMME".to_vec(), Vec::new()],
    );
    assert_eq!(
        harness.dropped(InputSource::SnapshotRequest, "unknown_command"),
        1
    );
    assert!(harness.server.poll_snapshot(harness.now, b"c1").is_none());
}

#[test]
fn a_kvpub_from_the_peer_while_active_is_dropped_and_counted() {
    let mut harness = Harness::active();
    harness.peer_update(kvpub(set("/a", "1", 1), 5));
    assert_eq!(
        harness.dropped(InputSource::PeerUpdate, "peer_update_while_active"),
        1
    );
    assert!(harness.server.is_empty());
    assert_eq!(harness.server.sequence(), 0);
    // The peer's HUGZ are normal traffic, not counted.
    harness.peer_update(KvMsg::hugz(5));
    assert_eq!(harness.server.counters().dropped_total(), 1);
}

#[test]
fn a_malformed_peer_state_is_dropped_counted_and_changes_nothing() {
    let mut harness = Harness::new(Config::primary());
    harness
        .server
        .handle_peer_state(harness.now, harness.wall, &[b"7".to_vec()]);
    harness
        .server
        .handle_peer_state(harness.now, harness.wall, &[b"2".to_vec(), b"2".to_vec()]);
    assert_eq!(harness.dropped(InputSource::PeerState, "invalid_state"), 1);
    assert_eq!(harness.dropped(InputSource::PeerState, "frame_count"), 1);
    assert_eq!(harness.server.state(), BstarState::Primary);
}

#[test]
fn a_snapshot_reply_nobody_asked_for_is_dropped_and_counted() {
    let mut harness = Harness::active();
    harness.peer_snapshot(kvpub(set("/a", "1", 1), 1));
    harness.peer_snapshot(KvMsg::kthxbai(1, Vec::new()));
    assert_eq!(
        harness.dropped(InputSource::PeerSnapshot, "unexpected_snapshot_message"),
        2
    );
    assert!(harness.server.is_empty());
}

// --- Snapshots -----------------------------------------------------------------------

#[test]
fn a_snapshot_lists_the_subtree_in_key_order_and_ends_with_kthxbai_at_the_current_sequence() {
    let mut harness = Harness::active();
    for (n, key) in ["/b/2", "/a/1", "/b/1", "/bb", "/c", "/b/3"]
        .iter()
        .enumerate()
    {
        harness.collect(set(key, "v", n as u8));
    }
    harness.drain();
    harness.request("client", "/b/");
    assert_eq!(
        harness.drain(),
        [Output::SnapshotReady {
            routing_id: b"client".to_vec()
        }]
    );
    let reply = harness.pull_all("client");
    assert_eq!(keys(&reply), ["/b/1", "/b/2", "/b/3", "KTHXBAI"]);
    assert_eq!(
        reply[0].sequence, 3,
        "each entry at the sequence it was written"
    );
    assert_eq!(reply[3], KvMsg::kthxbai(6, b"/b/".to_vec()));
    assert_eq!(harness.server.open_snapshot_streams(), 0);
    assert_eq!(harness.server.counters().snapshots_completed, 1);
}

#[test]
fn an_empty_subtree_snapshots_the_whole_map() {
    let mut harness = Harness::active();
    harness.collect(set("/x", "1", 1));
    harness.collect(set("a", "2", 2));
    harness.request("client", "");
    assert_eq!(keys(&harness.pull_all("client")), ["/x", "a", "KTHXBAI"]);
}

#[test]
fn a_snapshot_spanning_many_batches_streams_every_key_once_in_order() {
    let mut config = Config::primary();
    config.snapshot_batch = 7;
    let mut harness = Harness::new(config);
    harness.peer_state(BstarState::Backup);
    let mut expected = Vec::new();
    for n in 0..500u32 {
        let key = format!("/k/{:04}", (n * 7919) % 500);
        harness.collect(KvMsg::kvset(
            key.clone().into_bytes(),
            b"v".to_vec(),
            nth_uuid(n),
        ));
        expected.push(key);
    }
    harness.collect(set("/l", "outside", 2));
    expected.sort();
    expected.push("KTHXBAI".to_string());
    harness.request("client", "/k/");
    assert_eq!(keys(&harness.pull_all("client")), expected);
}

#[test]
fn a_snapshot_is_point_in_time_so_updates_applied_meanwhile_do_not_leak_into_it() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "old", 1));
    harness.collect(set("/b", "old", 2));
    harness.collect(with_ttl_text(set("/c", "old", 3), "1"));
    harness.request("client", "");
    let first = harness
        .server
        .poll_snapshot(harness.now, b"client")
        .unwrap();
    assert_eq!(decode(&first).key, b"/a");

    harness.collect(set("/b", "new", 4));
    harness.collect(delete("/a", 5));
    harness.collect(set("/0", "new", 6));
    harness.advance(1_500);
    harness.timeout(); // "/c" expires
    assert!(harness.value("/c").is_none());

    let rest = harness.pull_all("client");
    assert_eq!(keys(&rest), ["/b", "/c", "KTHXBAI"]);
    assert_eq!(rest[0].body, b"old");
    assert_eq!(rest[1].body, b"old");
    assert_eq!(rest[2].sequence, 3);
}

#[test]
fn opening_a_snapshot_shares_the_map_instead_of_copying_it() {
    let mut harness = Harness::active();
    for n in 0..1_000u32 {
        harness.collect(KvMsg::kvset(
            format!("/k/{n:04}").into_bytes(),
            vec![b'v'; 100],
            nth_uuid(n),
        ));
    }
    harness.request("client", "");
    let shared = harness
        .server
        .snapshots
        .maps()
        .all(|map| map.ptr_eq(harness.server.store.map()));
    assert!(shared, "the stream holds the same tree, not a copy");
    // A later write copies only the path to one leaf; the stream keeps the old value.
    harness.collect(set("/k/0500", "new", 2));
    let stream_map = harness.server.snapshots.maps().next().unwrap().clone();
    assert!(!stream_map.ptr_eq(harness.server.store.map()));
    assert_eq!(
        stream_map.get(b"/k/0500".as_slice()).unwrap().body(),
        vec![b'v'; 100]
    );
}

#[test]
fn a_snapshot_carries_the_stored_absolute_ttl_in_epoch_millis() {
    let mut harness = Harness::active();
    harness.collect(with_ttl_text(set("/eph", "v", 1), "24"));
    harness.request("client", "");
    let reply = harness.pull_all("client");
    let expiry = WALL0.saturating_add(Duration::from_secs(24));
    assert_eq!(
        reply[0].properties.get(TTL),
        Some(expiry.0.to_string().as_bytes())
    );
    assert_eq!(reply[0].peer_ttl(), Ok(Some(Ttl::ExpiresAt(expiry))));
}

#[test]
fn a_snapshot_waits_for_the_host_to_pull_it() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.request("client", "");
    harness.drain();
    // Nothing is pushed: the reply exists only as an open stream until pulled.
    assert_eq!(harness.server.open_snapshot_streams(), 1);
    assert_eq!(
        harness.server.snapshot_routing_ids().collect::<Vec<_>>(),
        [b"client".as_slice()]
    );
    assert!(harness
        .server
        .poll_snapshot(harness.now, b"someone-else")
        .is_none());
    assert_eq!(keys(&harness.pull_all("client")), ["/a", "KTHXBAI"]);
    assert!(harness
        .server
        .poll_snapshot(harness.now, b"client")
        .is_none());
}

#[test]
fn two_requests_from_one_client_are_answered_one_after_the_other() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.collect(set("/b", "2", 2));
    harness.request("client", "/a");
    harness.collect(set("/a", "3", 3));
    harness.request("client", "/b");
    let reply = harness.pull_all("client");
    assert_eq!(keys(&reply), ["/a", "KTHXBAI", "/b", "KTHXBAI"]);
    assert_eq!(reply[0].body, b"1");
    assert_eq!(reply[1].sequence, 2);
    assert_eq!(reply[3].sequence, 3);
}

#[test]
fn snapshot_requests_past_the_limit_are_refused_without_reply_until_a_stream_ends() {
    let mut config = Config::primary();
    config.max_snapshot_streams = 2;
    let mut harness = Harness::new(config);
    harness.peer_state(BstarState::Backup);
    harness.request("c1", "");
    harness.request("c2", "");
    harness.drain();
    harness.request("c3", "");
    assert_eq!(
        harness.events(),
        [Event::InputDropped {
            source: InputSource::SnapshotRequest,
            reason: DropReason::TooManySnapshotStreams
        }]
    );
    assert!(harness.server.poll_snapshot(harness.now, b"c3").is_none());
    harness.pull_all("c1");
    harness.request("c3", "");
    assert_eq!(keys(&harness.pull_all("c3")), ["KTHXBAI"]);
}

#[test]
fn a_stalled_snapshot_stream_is_closed_and_frees_its_slot() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.request("slow", "");
    harness.request("fast", "");
    harness.drain();
    harness.server.poll_snapshot(harness.now, b"slow").unwrap();
    for _ in 0..29 {
        harness.advance(1_000);
        harness.timeout();
        harness.server.poll_snapshot(harness.now, b"fast");
    }
    harness.drain();
    harness.advance(1_000);
    harness.timeout();
    assert!(harness.events().contains(&Event::SnapshotStreamAbandoned {
        routing_id: b"slow".to_vec(),
        reason: AbandonReason::Stalled
    }));
    assert!(harness.server.poll_snapshot(harness.now, b"slow").is_none());
    assert_eq!(harness.server.open_snapshot_streams(), 0);
}

#[test]
fn the_host_can_cancel_the_streams_of_a_client_that_is_gone() {
    let mut harness = Harness::active();
    harness.request("gone", "");
    harness.drain();
    harness.server.cancel_snapshot(b"gone");
    assert_eq!(harness.server.open_snapshot_streams(), 0);
    assert_eq!(
        harness.events(),
        [Event::SnapshotStreamAbandoned {
            routing_id: b"gone".to_vec(),
            reason: AbandonReason::Cancelled
        }]
    );
}

#[test]
fn a_server_that_is_not_active_rejects_snapshot_requests_without_reply() {
    let mut harness = Harness::passive_at(0);
    harness.request("client", "");
    assert_eq!(
        harness.dropped(InputSource::SnapshotRequest, "not_active"),
        1
    );
    assert!(harness
        .server
        .poll_snapshot(harness.now, b"client")
        .is_none());
    assert!(!harness
        .drain()
        .iter()
        .any(|output| matches!(output, Output::SnapshotReady { .. })));

    let mut backup = Harness::new(Config::backup());
    backup.advance(10_000);
    backup.request("client", "");
    assert_eq!(backup.server.state(), BstarState::Backup);
    assert_eq!(
        backup.dropped(InputSource::SnapshotRequest, "not_active"),
        1
    );
}

// --- Passive: following the active --------------------------------------------------

#[test]
fn passive_asks_for_a_full_snapshot_only_after_hearing_the_actives_publisher() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    assert_eq!(harness.server.state(), BstarState::Passive);
    let outputs = harness.drain();
    assert!(!outputs
        .iter()
        .any(|output| matches!(output, Output::RequestPeerSnapshot(_))));
    assert!(harness.server.is_syncing());

    harness.peer_update(KvMsg::hugz(4));
    assert_eq!(
        harness.drain(),
        [Output::RequestPeerSnapshot(vec![
            b"ICANHAZ?".to_vec(),
            Vec::new()
        ])]
    );
}

#[test]
fn passive_installs_the_snapshot_then_applies_buffered_updates_newer_than_it() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(kvpub(set("/a", "2", 2), 2)); // triggers the request, buffered
    harness.peer_snapshot(kvpub(set("/a", "1", 1), 1));
    harness.peer_update(kvpub(set("/b", "3", 3), 3)); // published after the snapshot
    assert!(
        harness.server.is_empty(),
        "nothing is applied before KTHXBAI"
    );
    harness.peer_snapshot(KvMsg::kthxbai(2, Vec::new())); // snapshot already had seq 2
    harness.peer_snapshot(KvMsg::kthxbai(2, Vec::new()));
    assert_eq!(harness.server.sequence(), 3);
    assert_eq!(
        harness.value("/a"),
        Some(&b"1"[..]),
        "seq 2 is in the snapshot: not reapplied"
    );
    assert_eq!(harness.value("/b"), Some(&b"3"[..]));
    assert!(!harness.server.is_syncing());
    assert!(harness.events().contains(&Event::SyncCompleted {
        sequence: 2,
        keys: 1,
        resumed: None,
    }));
    assert_eq!(
        harness.dropped(InputSource::PeerSnapshot, "unexpected_snapshot_message"),
        1,
        "a second KTHXBAI is unexpected"
    );
}

#[test]
fn the_snapshot_replaces_the_passives_map_so_stale_keys_do_not_survive() {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/stale", "x", 1), 1));
    assert!(harness.value("/stale").is_some());
    // The active's numbering moved on without us (we missed updates): re-sync.
    harness.peer_update(KvMsg::hugz(7));
    assert!(harness.server.is_syncing());
    harness.peer_snapshot(kvpub(set("/fresh", "y", 2), 6));
    harness.peer_snapshot(KvMsg::kthxbai(7, Vec::new()));
    assert_eq!(harness.stored_keys(), [b"/fresh".to_vec()]);
    assert_eq!(harness.server.sequence(), 7);
}

#[test]
fn passive_applies_the_actives_kvpubs_with_sequence_above_its_own_and_drops_stale_ones() {
    let mut harness = Harness::passive_at(10);
    harness.peer_update(kvpub(set("/a", "1", 1), 11));
    harness.peer_update(kvpub(set("/a", "old", 2), 11));
    harness.peer_update(kvpub(set("/b", "old", 3), 9));
    assert_eq!(harness.server.sequence(), 11);
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
    assert!(harness.value("/b").is_none());
    assert_eq!(
        harness.dropped(InputSource::PeerUpdate, "stale_sequence"),
        2
    );
    assert!(
        harness.published().is_empty(),
        "a passive never publishes updates"
    );
}

#[test]
fn a_gap_in_the_actives_sequence_makes_the_passive_resync() {
    let mut harness = Harness::passive_at(10);
    harness.peer_update(kvpub(set("/a", "1", 1), 13));
    assert!(harness.value("/a").is_none());
    let outputs = harness.drain();
    assert!(outputs.contains(&Output::Event(Event::SyncStarted {
        reason: SyncReason::SequenceGap {
            expected: 11,
            received: 13
        }
    })));
    assert!(outputs
        .iter()
        .any(|output| matches!(output, Output::RequestPeerSnapshot(_))));
    // Published after the update that made it ask: buffered behind the snapshot.
    harness.peer_update(kvpub(set("/b", "2", 3), 14));
    // The snapshot was taken after the request, so it holds update 13.
    harness.peer_snapshot(kvpub(set("/a", "1", 1), 13));
    harness.peer_snapshot(KvMsg::kthxbai(13, Vec::new()));
    assert_eq!(
        harness.server.sequence(),
        14,
        "the buffered update follows the snapshot"
    );
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
    assert_eq!(harness.value("/b"), Some(&b"2"[..]));
    assert!(!harness.server.is_syncing());
}

#[test]
fn updates_that_came_before_the_request_are_not_applied_over_another_historys_snapshot() {
    // Found by the simulator (the scripted scenario for swarm 16385's case): a paused
    // backup read its restarted primary's old KVPUBs after the reconnect notice. Its
    // request went out on the old history's first message; the new history's snapshot
    // is numbered below the rest, whose gap made every completed sync start another.
    let mut harness = Harness::passive_at(20);
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    harness.peer_update(KvMsg::hugz(20)); // the old history: the request leaves
    harness.peer_update(kvpub(set("/old", "1", 1), 21)); // the old history, late
    harness.peer_update(kvpub(set("/old", "2", 2), 22));
    // The new history's snapshot: a gap before 21, so another sync. The old updates
    // came before its request: they are not a gap after its snapshot.
    harness.peer_snapshot(kvpub(set("/new", "1", 3), 1));
    harness.peer_snapshot(KvMsg::kthxbai(1, Vec::new()));
    assert!(harness.server.is_syncing());
    harness.peer_snapshot(kvpub(set("/new", "1", 3), 1));
    harness.peer_snapshot(KvMsg::kthxbai(1, Vec::new()));
    assert!(!harness.server.is_syncing(), "no sync storm");
    assert_eq!(harness.server.sequence(), 1);
    assert_eq!(harness.stored_keys(), [b"/new".to_vec()]);
}

#[test]
fn a_hugz_with_another_sequence_than_ours_makes_the_passive_resync() {
    let mut harness = Harness::passive_at(10);
    harness.peer_update(KvMsg::hugz(10));
    assert!(!harness.server.is_syncing());
    harness.peer_update(KvMsg::hugz(12));
    assert!(harness.server.is_syncing());
}

#[test]
fn a_passive_whose_subscription_to_the_active_reconnected_resyncs_once_it_is_live() {
    let mut harness = Harness::passive_at(5);
    harness.drain();
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    let outputs = harness.drain();
    assert!(outputs.contains(&Output::Event(Event::SyncStarted {
        reason: SyncReason::PublisherReconnected
    })));
    assert!(
        !outputs
            .iter()
            .any(|output| matches!(output, Output::RequestPeerSnapshot(_))),
        "not before the new subscription is live"
    );
    // The active restarted: its new history has reached 6 as well.
    harness.peer_update(kvpub(set("/new", "1", 1), 6));
    assert!(harness
        .drain()
        .iter()
        .any(|output| matches!(output, Output::RequestPeerSnapshot(_))));
    harness.peer_snapshot(kvpub(set("/new", "1", 1), 6));
    harness.peer_snapshot(KvMsg::kthxbai(6, Vec::new()));
    assert_eq!(harness.stored_keys(), [b"/new".to_vec()]);
}

#[test]
fn a_sync_without_reply_is_requested_again_after_the_timeout() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(0));
    harness.drain();
    for _ in 0..4 {
        harness.advance(1_000);
        harness.peer_state(BstarState::Active);
        harness.timeout();
    }
    assert!(!harness
        .drain()
        .iter()
        .any(|output| matches!(output, Output::RequestPeerSnapshot(_))));
    harness.advance(1_000);
    harness.timeout();
    let outputs = harness.drain();
    assert!(outputs.contains(&Output::Event(Event::SyncStarted {
        reason: SyncReason::Timeout
    })));
    assert!(outputs
        .iter()
        .any(|output| matches!(output, Output::RequestPeerSnapshot(_))));
    assert_eq!(harness.server.counters().syncs_started, 2);
}

#[test]
fn a_sync_that_times_out_forgets_its_backlog_so_a_restarted_actives_history_is_not_mixed_in() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(0));
    // Buffered from the active before it went silent (and, unseen, restarted).
    harness.peer_update(kvpub(delete("/kept", 1), 85));
    harness.drain();
    for _ in 0..5 {
        harness.advance(1_000);
        harness.peer_state(BstarState::Active);
        harness.timeout();
    }
    assert!(harness.drain().contains(&Output::Event(Event::SyncStarted {
        reason: SyncReason::Timeout
    })));
    // The restarted active's history: its snapshot is all there is.
    harness.peer_snapshot(kvpub(set("/kept", "new", 2), 44));
    harness.peer_snapshot(KvMsg::kthxbai(44, Vec::new()));
    assert_eq!(harness.value("/kept"), Some(&b"new"[..]));
    assert_eq!(harness.server.sequence(), 44);
    assert!(
        !harness.server.is_syncing(),
        "no old update was left to look like a gap"
    );
}

#[test]
fn a_failover_after_a_sync_timed_out_keeps_what_the_timed_out_attempt_buffered() {
    let mut harness = Harness::passive_at(10);
    harness.peer_update(kvpub(set("/a", "1", 1), 13));
    assert!(harness.server.is_syncing());
    harness.advance(5_000);
    harness.timeout();
    assert!(harness.drain().contains(&Output::Event(Event::SyncStarted {
        reason: SyncReason::Timeout
    })));
    // No snapshot ever comes: the active is gone, and a client asks this server.
    harness.advance(5_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
    assert_eq!(harness.server.sequence(), 13);
}

#[test]
fn a_backlog_overflow_installs_the_snapshot_and_requests_a_fresh_one() {
    let mut config = Config::backup();
    config.sync_backlog_max = 2;
    let mut harness = Harness::new(config);
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(0));
    for n in 1..=4u8 {
        harness.peer_update(kvpub(set("/a", "v", n), i64::from(n)));
    }
    harness.drain();
    harness.peer_snapshot(KvMsg::kthxbai(1, Vec::new()));
    let outputs = harness.drain();
    assert!(outputs.contains(&Output::Event(Event::SyncStarted {
        reason: SyncReason::BacklogOverflow
    })));
    assert!(outputs
        .iter()
        .any(|output| matches!(output, Output::RequestPeerSnapshot(_))));
    assert!(harness.server.is_syncing());
    assert_eq!(harness.server.sequence(), 1);
}

#[test]
fn passive_converts_relative_ttls_with_its_own_clock_and_keeps_absolute_ones() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(0));
    let absolute = WALL0.saturating_add(Duration::from_secs(100));
    harness.peer_snapshot(with_ttl_text(
        kvpub(set("/synced", "v", 1), 1),
        &absolute.0.to_string(),
    ));
    // The Python reference stores epoch seconds with a fraction.
    harness.peer_snapshot(with_ttl_text(
        kvpub(set("/python", "v", 2), 2),
        "1795268650.250000",
    ));
    harness.peer_snapshot(KvMsg::kthxbai(2, Vec::new()));
    harness.advance(500);
    harness.peer_update(with_ttl_text(kvpub(set("/live", "v", 3), 3), "24"));

    let expires = |key: &str| harness.server.get(key.as_bytes()).unwrap().expires_at();
    assert_eq!(expires("/synced"), Some(absolute));
    assert_eq!(expires("/python"), Some(EpochMillis(1_795_268_650_250)));
    assert_eq!(
        expires("/live"),
        Some(WALL0.saturating_add(Duration::from_millis(24_500)))
    );
    let stored = harness.server.get(b"/live").unwrap().properties();
    assert_eq!(stored.get(TTL), Some(b"1795268624500".as_slice()));
}

#[test]
fn passive_applies_the_actives_delete_but_never_expires_itself() {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(with_ttl_text(kvpub(set("/eph", "v", 1), 1), "1"));
    harness.peer_update(kvpub(set("/gone", "v", 2), 2));
    harness.peer_update(kvpub(delete("/gone", 3), 3));
    assert!(harness.value("/gone").is_none());

    for _ in 0..10 {
        harness.advance(1_000);
        harness.peer_state(BstarState::Active);
        harness.peer_update(KvMsg::hugz(3));
        harness.timeout();
    }
    assert_eq!(
        harness.value("/eph"),
        Some(&b"v"[..]),
        "only the active expires"
    );
    assert!(harness.published().is_empty());
    // The active's expiry delete is applied like any delete.
    let mut expiry = kvpub(delete("/eph", 1), 4);
    expiry.properties.set(TTL, b"1795268601000").unwrap();
    harness.peer_update(expiry);
    assert!(harness.value("/eph").is_none());
    assert_eq!(harness.server.sequence(), 4);
}

// --- Passive: the pending list -------------------------------------------------------

#[test]
fn passive_holds_client_updates_on_the_pending_list_until_the_actives_echo() {
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/a", "1", 1));
    assert_eq!(harness.server.pending_len(), 1);
    assert!(
        harness.value("/a").is_none(),
        "a passive applies only the active's updates"
    );
    harness.peer_update(kvpub(set("/a", "1", 1), 1));
    assert_eq!(harness.server.pending_len(), 0);
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
}

#[test]
fn an_echo_that_arrives_before_the_client_copy_cancels_that_copy() {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/a", "1", 1), 1));
    assert_eq!(
        harness.server.pending_len(),
        1,
        "the early echo is remembered"
    );
    harness.collect(set("/a", "1", 1));
    assert_eq!(
        harness.server.pending_len(),
        0,
        "and cancels the late client copy"
    );
    // Nothing is left to replay at failover.
    harness.advance(3_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert!(harness.published().is_empty());
}

#[test]
fn a_duplicate_client_copy_is_held_once() {
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/a", "1", 1));
    harness.collect(set("/a", "1", 1));
    assert_eq!(harness.server.pending_len(), 1);
    assert_eq!(harness.dropped(InputSource::Collector, "duplicate_uuid"), 1);
}

#[test]
fn the_pending_list_is_bounded_by_size_and_says_so() {
    let mut config = Config::backup();
    config.pending_max_len = 3;
    let mut harness = Harness::passive_with(config, 0);
    for n in 1..=5u8 {
        harness.collect(set(&format!("/k{n}"), "v", n));
    }
    assert_eq!(harness.server.pending_len(), 3);
    let evictions: Vec<Event> = harness
        .events()
        .into_iter()
        .filter(|event| matches!(event, Event::PendingEvicted { .. }))
        .collect();
    assert_eq!(
        evictions,
        vec![
            Event::PendingEvicted {
                client_copies: 1,
                echoes: 0,
                reason: EvictionReason::Size
            };
            2
        ]
    );
    assert_eq!(harness.server.counters().pending_evicted, 2);
    // The oldest went first: a failover replays the three newest.
    harness.advance(3_000);
    harness.request("client", "");
    assert_eq!(keys(&harness.published()), ["/k3", "/k4", "/k5"]);
}

#[test]
fn the_pending_list_is_bounded_by_age_while_the_active_is_alive() {
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/never-echoed", "v", 1));
    harness.peer_update(kvpub(set("/echo-only", "v", 2), 1)); // client copy never comes
    assert_eq!(harness.server.pending_len(), 2);
    for _ in 0..29 {
        harness.advance(1_000);
        harness.peer_state(BstarState::Active);
        harness.timeout();
    }
    assert_eq!(harness.server.pending_len(), 2);
    harness.advance(1_000);
    harness.peer_state(BstarState::Active);
    harness.timeout();
    assert_eq!(harness.server.pending_len(), 0);
    assert!(harness.events().contains(&Event::PendingEvicted {
        client_copies: 1,
        echoes: 1,
        reason: EvictionReason::Age
    }));
}

#[test]
fn the_pending_list_is_kept_past_its_age_while_the_active_is_silent() {
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/precious", "v", 1));
    for _ in 0..60 {
        harness.advance(1_000);
        harness.timeout();
    }
    assert_eq!(
        harness.server.pending_len(),
        1,
        "the active died: keep it for failover"
    );
    harness.request("client", "");
    assert_eq!(keys(&harness.published()), ["/precious"]);
}

#[test]
fn expiry_deletes_from_the_active_do_not_clog_the_pending_list() {
    let mut harness = Harness::passive_at(0);
    harness.collect(with_ttl_text(set("/eph", "v", 1), "1"));
    harness.peer_update(with_ttl_text(kvpub(set("/eph", "v", 1), 1), "1"));
    assert_eq!(harness.server.pending_len(), 0);
    let mut expiry = kvpub(delete("/eph", 1), 2);
    expiry.properties.set(TTL, b"1795268601000").unwrap();
    harness.peer_update(expiry);
    assert_eq!(harness.server.pending_len(), 0);
    // A client's delete (fresh uuid) does wait for its client copy.
    harness.peer_update(kvpub(set("/k", "v", 2), 3));
    harness.collect(set("/k", "v", 2));
    harness.peer_update(kvpub(delete("/k", 3), 4));
    assert_eq!(harness.server.pending_len(), 1);
}

// --- Failover ------------------------------------------------------------------------

#[test]
fn on_failover_the_passive_replays_pending_updates_with_new_sequences_in_arrival_order() {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/seen", "v", 9), 1));
    harness.collect(set("/seen", "v", 9)); // cancelled by the echo
    harness.collect(set("/b", "1", 1));
    harness.collect(with_ttl_text(set("/a", "2", 2), "60"));
    harness.collect(delete("/seen", 3));
    harness.drain();

    // The active dies; a client asks once the peer has been silent for 2 beats.
    harness.advance(1_999);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Passive);
    harness.advance(1);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);

    let published = harness.published();
    assert_eq!(keys(&published), ["/b", "/a", "/seen"]);
    assert_eq!(
        published.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(
        published[1].properties.get(TTL),
        Some(&b"58"[..]),
        "the replayed ttl is what remains of the one the client sent"
    );
    assert_eq!(harness.server.pending_len(), 0);
    assert_eq!(harness.value("/b"), Some(&b"1"[..]));
    assert!(harness.value("/seen").is_none());
    // Then it serves: the snapshot opened by the promoting request includes the replay.
    let reply = harness.pull_all("client");
    assert_eq!(keys(&reply), ["/a", "/b", "KTHXBAI"]);
    assert_eq!(reply[2].sequence, 4);
}

#[test]
fn a_pending_update_whose_ttl_ran_out_while_it_waited_is_not_replayed() {
    // Found by the simulator (seed 0): replaying it published an already-expired value
    // with a 1 ms ttl, then deleted it in the same step.
    let mut harness = Harness::passive_at(0);
    harness.collect(with_ttl_text(set("/short", "gone", 1), "0.5"));
    harness.collect(with_ttl_text(set("/long", "kept", 2), "60"));
    harness.drain();
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(keys(&harness.published()), ["/long"]);
    assert!(harness.value("/short").is_none());
    assert_eq!(harness.server.counters().pending_expired, 1);
    assert_eq!(harness.server.counters().pending_replayed, 1);
}

#[test]
fn a_snapshot_requested_after_a_client_copy_arrived_settles_that_copy() {
    // Found by the simulator (seed 6): a restarted backup held client copies whose
    // echoes it never saw, synced past them, and at failover replayed one over a newer
    // value. A full snapshot requested after a copy arrived states its key as of a
    // later point: the copy is its echo (same uuid) or older than what it shows.
    let mut harness = Harness::new(Config::backup());
    harness.collect(set("/newer", "old-copy", 1));
    harness.collect(set("/echoed", "mine", 2));
    harness.collect(set("/deleted", "resurrected?", 3));
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(10));
    // A copy that arrives after the request may not be in the snapshot: it stays live.
    harness.collect(set("/late", "after-request", 4));
    harness.peer_snapshot(kvpub(set("/echoed", "mine", 2), 5));
    harness.peer_snapshot(kvpub(set("/newer", "newer-value", 9), 8));
    harness.peer_snapshot(KvMsg::kthxbai(10, Vec::new()));
    assert_eq!(harness.server.state(), BstarState::Passive);
    assert!(!harness.server.is_syncing());
    assert_eq!(harness.server.counters().pending_superseded_by_snapshot, 2);
    harness.drain();

    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(keys(&harness.published()), ["/late"]);
    assert_eq!(harness.value("/newer"), Some(&b"newer-value"[..]));
    assert!(harness.value("/deleted").is_none());
}

#[test]
fn a_copy_that_arrived_after_the_request_is_settled_when_the_snapshot_holds_its_update() {
    // Found by the simulator (swarm 7047798): the KVPUB of a key's next update came
    // first, then the copy of an update whose own KVPUB was lost; the snapshot held that
    // update, but the copy, later than the request, stayed live and was replayed over
    // the next update at failover.
    let mut harness = Harness::new(Config::backup());
    harness.collect(set("/before", "early", 1));
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(3));
    harness.collect(set("/before", "later", 2));
    harness.peer_update(kvpub(set("/k", "newer", 4), 5));
    harness.collect(set("/k", "older", 3));
    harness.collect(set("/late", "after-request", 6));
    harness.peer_snapshot(kvpub(set("/k", "older", 3), 4));
    harness.peer_snapshot(KvMsg::kthxbai(4, Vec::new()));
    assert!(!harness.server.is_syncing());
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
    harness.drain();

    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    // "older" is echoed by the snapshot; the later copy nothing settles stays live.
    assert_eq!(keys(&harness.published()), ["/before", "/late"]);
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn the_copies_that_came_before_the_one_a_snapshot_holds_are_settled_with_it() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(3));
    // Copies of one key after the request: the one the snapshot holds came second.
    harness.collect(set("/k", "first-copy", 1));
    harness.collect(set("/k", "in-snapshot", 2));
    harness.peer_snapshot(kvpub(set("/k", "in-snapshot", 2), 4));
    harness.peer_snapshot(KvMsg::kthxbai(4, Vec::new()));
    harness.drain();
    harness.advance(2_000);
    harness.request("client", "");
    assert!(harness.published().is_empty());
    assert_eq!(harness.value("/k"), Some(&b"in-snapshot"[..]));
}

#[test]
fn a_failover_mid_sync_remembers_the_merged_entries_as_published() {
    // Found by the simulator (swarms 7012028, 7021981, 7041692): the primary took over
    // mid-sync and merged the snapshot's first entries, then replaced one; the backup,
    // stepping down, forwarded the merged entry, and the primary published it again
    // over the newer value.
    let mut harness = Harness::new(Config::primary());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(7));
    harness.peer_snapshot(kvpub(set("/k", "merged", 1), 7));
    harness.peer_state(BstarState::Backup); // the peer restarted
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.collect(set("/k", "newer", 2));
    harness.drain();
    harness.collect(set("/k", "merged", 1)); // the forward
    assert!(harness.published().is_empty());
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn a_failover_mid_sync_settles_the_copies_of_the_keys_the_partial_snapshot_reached() {
    // Found by the simulator (seed 5, once the world held what such a merge takes in): a stepped-down
    // backup forwarded its split-time value, the primary had already published and
    // replaced it; the backup took over mid-sync, merged the primary's newer value from
    // the snapshot's first entries, and replayed the forward over it.
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/k", "forwarded", 1));
    harness.collect(set("/unreached", "copy", 2));
    // A gap: the backup asks for a snapshot; the copies came before the request.
    harness.peer_update(kvpub(set("/gap", "x", 3), 5));
    assert!(harness.server.is_syncing());
    harness.peer_snapshot(kvpub(set("/k", "newer", 4), 3));
    harness.drain();
    // The primary dies before the rest of the snapshot.
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    // The copy of the key the snapshot reached is settled by it; the other is replayed.
    assert_eq!(keys(&harness.published()), ["/unreached"]);
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
    assert_eq!(harness.server.counters().pending_superseded_by_snapshot, 1);
}

#[test]
fn a_stepped_down_active_drops_the_late_updates_it_had_followed_before_its_reign() {
    // Found by the simulator (swarm 1061122210006): a passive following through #2 was
    // paused; on resuming it took over, published a newer value, read the old active's
    // late state and stepped down; the old active's late updates, numbered at or below
    // #2, then filled its sync, and a failover mid-sync merged the older value over
    // the newer one it had published.
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/k", "old", 1), 1));
    harness.peer_update(kvpub(set("/other", "x", 2), 2));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.collect(set("/k", "newer", 3));
    assert_eq!(keys(&harness.published()), ["/k"]);
    // The old active's state, sent before it went silent: dual active, the backup
    // steps down.
    harness.peer_state(BstarState::Active);
    assert_eq!(harness.server.state(), BstarState::Passive);
    harness.drain();
    // Late copies of what the map already held, on the subscription it followed.
    harness.peer_update(kvpub(set("/k", "old", 1), 1));
    harness.peer_update(kvpub(set("/other", "x", 2), 2));
    assert!(harness.server.is_syncing());
    assert_eq!(
        harness.dropped(InputSource::PeerUpdate, "stale_sequence"),
        2
    );
    // The old active stays silent: a failover mid-sync keeps the newer value.
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn only_the_latest_pending_copy_of_a_key_is_replayed() {
    // Found by the simulator (seed 22): replaying every copy in arrival order put the
    // key through values the old active had already replaced.
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/k", "never-published", 1));
    harness.collect(set("/k", "published-but-echo-lost", 2));
    harness.collect(delete("/k", 3));
    harness.collect(set("/other", "x", 4));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    let published = harness.published();
    assert_eq!(keys(&published), ["/k", "/other"]);
    assert!(published[0].is_delete());
    assert_eq!(harness.server.counters().pending_superseded, 2);
}

#[test]
fn a_pending_update_never_overwrites_a_newer_value_applied_from_the_active() {
    let mut harness = Harness::passive_at(0);
    // Client A's update reaches only the passive.
    harness.collect(set("/k", "from-a", 1));
    // Client B's later update of the same key is published by the active.
    harness.collect(set("/k", "from-b", 2));
    harness.peer_update(kvpub(set("/k", "from-b", 2), 1));
    // A third key's update stays pending and is replayed.
    harness.collect(set("/other", "x", 3));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(keys(&harness.published()), ["/other"]);
    assert_eq!(harness.value("/k"), Some(&b"from-b"[..]));
    assert_eq!(harness.server.counters().pending_superseded, 1);
}

#[test]
fn a_copy_whose_echo_came_first_supersedes_the_older_copies_of_its_key() {
    // Found by the simulator (swarm 90737): the active's echo of a client's newer
    // update came before both of that client's copies; the older copy, never published,
    // was replayed at failover over the newer value.
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/k", "newer", 2), 1));
    harness.collect(set("/k", "older", 1));
    harness.collect(set("/k", "newer", 2)); // dropped: already published
    harness.collect(set("/other", "x", 3));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(keys(&harness.published()), ["/other"]);
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
    assert_eq!(harness.server.counters().pending_superseded, 1);
}

#[test]
fn a_latest_copy_that_expired_while_it_waited_still_removes_the_older_value_of_its_key() {
    // Found by the simulator (swarm 93922): a failover mid-sync merged the peer's older
    // value of a key whose newer (ephemeral) copy had expired on the pending list; the
    // older value stood. The newer value came and went: the key ends without a value.
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/k", "older", 1), 1));
    harness.collect(with_ttl_text(set("/k", "newer", 2), "0.5"));
    harness.drain();
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    let published = harness.published();
    assert_eq!(keys(&published), ["/k"]);
    assert!(published[0].is_delete());
    assert_eq!(
        published[0].uuid,
        Some(uuid(2)),
        "the expired copy's own uuid"
    );
    assert!(harness.value("/k").is_none());
    assert_eq!(harness.server.counters().pending_expired, 1);
}

#[test]
fn what_a_backup_saw_while_deciding_survives_a_failover_before_its_sync_completes() {
    // Found by the simulator (swarm 7609): a restarted backup saw an update's KVPUB
    // while still deciding, then its client copy (cancelled by that echo) once
    // passive; the active died before the backup's sync completed, and the update was
    // lost.
    for sync_began in [false, true] {
        let mut harness = Harness::new(Config::backup());
        harness.peer_update(kvpub(set("/k", "v", 1), 15));
        harness.peer_state(BstarState::Active);
        assert_eq!(harness.server.state(), BstarState::Passive);
        if sync_began {
            harness.peer_update(KvMsg::hugz(15));
            assert!(harness.server.is_syncing());
        }
        harness.collect(set("/k", "v", 1)); // cancelled by the echo
        harness.drain();
        harness.advance(2_000);
        harness.request("client", "");
        assert_eq!(harness.server.state(), BstarState::Active);
        assert_eq!(
            harness.value("/k"),
            Some(&b"v"[..]),
            "sync began: {sync_began}"
        );
    }
}

#[test]
fn what_a_primary_saw_while_deciding_is_dropped_when_it_takes_over() {
    // The peer's updates seen before the pair decided belong to the reign that lost.
    let mut harness = Harness::new(Config::primary());
    harness.peer_update(kvpub(set("/k", "v", 1), 15));
    harness.peer_state(BstarState::Backup);
    assert_eq!(harness.server.state(), BstarState::Active);
    assert!(harness.value("/k").is_none());
}

#[test]
fn a_late_update_on_the_followed_connection_is_not_merged_over_the_map_at_a_failover() {
    // Found by the simulator (swarm 48374): a late HUGZ made a passive re-sync; late
    // KVPUBs older than its map were buffered, and a failover mid-sync merged one over
    // the newer value.
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/k", "older", 1), 1));
    harness.peer_update(kvpub(set("/k", "newer", 2), 2));
    harness.peer_update(KvMsg::hugz(1)); // late: sent before the KVPUB numbered 2
    assert!(harness.server.is_syncing());
    harness.peer_update(kvpub(set("/k", "older", 1), 1)); // late too
    assert_eq!(
        harness.dropped(InputSource::PeerUpdate, "stale_sequence"),
        1
    );
    harness.drain();
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn a_failover_mid_resume_keeps_an_update_newer_than_the_changes_that_arrived() {
    // Found by the simulator (swarm 203527195063): an earlier connection brought the
    // active's newest value of a key; the next attempt's resume reply replayed older
    // changes of that key (a delete last) and was cut by the active's death. The merge
    // put the replayed changes over the newer value, and the takeover lost it.
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(10));
    harness.peer_snapshot(KvMsg::kthxbai(10, Vec::new()).with_history(b"00000000000000aa@0"));
    assert!(!harness.server.is_syncing());
    harness.peer_update(kvpub(set("/k", "newer", 1), 20)); // a gap: resume after 10
    assert!(harness.server.is_syncing());
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    harness.advance(5_000);
    harness.peer_state(BstarState::Active);
    harness.timeout(); // no reply: ask again, the first connection's update set aside
    harness.drain();
    harness.peer_snapshot(KvMsg::hugz(10));
    harness.peer_snapshot(kvpub(set("/k", "older", 2), 15));
    harness.peer_snapshot(kvpub(delete("/k", 3), 16));
    // The active dies before the reply reaches 20.
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn after_a_reconnect_low_numbers_are_a_new_history_and_are_merged_at_a_failover() {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/k", "old history", 1), 1));
    harness.peer_update(kvpub(set("/k", "old history, later", 2), 2));
    harness.peer_update(KvMsg::hugz(3)); // a gap: re-sync on the same connection
    assert!(harness.server.is_syncing());
    // The active restarted: a new connection, numbered from 1 again.
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    harness.peer_update(kvpub(set("/k", "new history", 3), 1));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"new history"[..]));
}

#[test]
fn a_superseded_pending_update_is_still_cancelled_by_its_own_echo() {
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/k", "a", 1));
    harness.collect(set("/k", "b", 2));
    harness.peer_update(kvpub(set("/k", "b", 2), 1));
    harness.peer_update(kvpub(set("/k", "a", 1), 2));
    assert_eq!(harness.server.pending_len(), 0, "no stray echo left behind");
    assert_eq!(harness.value("/k"), Some(&b"a"[..]));
}

#[test]
fn after_failover_the_new_active_expires_what_is_due() {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(with_ttl_text(kvpub(set("/eph", "v", 1), 1), "1"));
    harness.advance(5_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    let published = harness.published();
    assert_eq!(keys(&published), ["/eph"]);
    assert!(published[0].is_delete());
    assert_eq!(published[0].sequence, 2);
}

#[test]
fn becoming_active_mid_sync_keeps_what_arrived_of_the_snapshot_and_the_buffered_updates() {
    let mut harness = Harness::new(Config::backup());
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(5));
    harness.peer_snapshot(kvpub(set("/a", "1", 1), 3));
    harness.peer_update(kvpub(set("/b", "2", 2), 6));
    // The active dies before KTHXBAI.
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert!(harness.events().contains(&Event::SyncAbandoned {
        merged_entries: 1,
        applied_updates: 1
    }));
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
    assert_eq!(harness.value("/b"), Some(&b"2"[..]));
    assert_eq!(harness.server.sequence(), 6);
    harness.collect(set("/c", "3", 3));
    assert_eq!(
        harness.published()[0].sequence,
        7,
        "numbering continues after what it saw"
    );
}

#[test]
fn becoming_active_mid_sync_prefers_the_peers_updates_to_its_own_map_whatever_the_numbers() {
    // Found by the simulator (swarm 32681): a backup that stepped down after a split
    // kept its own split-time entry, numbered in its own (higher) history, over the
    // primary's newer update buffered during the re-sync.
    // The backup took over at 500 and numbers its own updates above it.
    let mut harness = Harness::passive_at(500);
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.collect(set("/k", "own", 1));
    harness.drain();
    // The primary restarted (its new history comes on a new connection) and, split
    // from the backup, took over.
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    harness.advance(1_000);
    harness.peer_state(BstarState::Active); // dual active: step down
    harness.peer_update(KvMsg::hugz(40)); // the primary numbers a lower history
    assert!(harness.server.is_syncing());
    harness.peer_update(kvpub(set("/k", "peer's newer", 2), 41));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"peer's newer"[..]));
}

#[test]
fn a_failover_mid_sync_across_a_reconnect_compares_numbers_only_within_one_connection() {
    // Found by the simulator (swarm 42617): the active restarted during the sync and
    // took over again with a new history numbered from 1; its updates were buffered
    // behind the old history's and lost to their higher numbers at the failover.
    let mut harness = Harness::passive_at(1_600);
    harness.peer_update(kvpub(set("/k", "old history", 1), 1_642)); // a gap: sync
    assert!(harness.server.is_syncing());
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    assert!(harness.server.is_syncing(), "still waiting for its reply");
    harness.peer_update(kvpub(set("/k", "new history", 2), 13));
    // The active dies again before answering: the failover keeps the newest.
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"new history"[..]));
}

#[test]
fn a_failover_mid_sync_keeps_what_came_after_the_snapshot_point_on_a_connection_since_lost() {
    // Found by the simulator (swarm 657): the snapshot's partial reply is older than an
    // update buffered later on the same connection, which then reconnected.
    let mut harness = Harness::passive_at(10);
    harness.peer_update(kvpub(set("/k", "buffered", 1), 13)); // a gap: sync
    harness.peer_snapshot(kvpub(set("/k", "snapshot", 2), 12));
    harness
        .server
        .handle_peer_publisher_reconnected(harness.now, harness.wall);
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/k"), Some(&b"buffered"[..]));
}

#[test]
fn reordered_updates_while_syncing_are_kept_for_a_failover() {
    // A lower number on one connection is a reordering (the simulator's harsh
    // network), not a new history: the newest update must win (swarm 19211).
    let mut harness = Harness::passive_at(500);
    harness.peer_update(kvpub(set("/k", "newer", 1), 538));
    harness.peer_update(kvpub(set("/k", "older", 2), 529));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn a_passive_takes_over_when_the_peer_restarts() {
    let mut harness = Harness::passive_at(3);
    harness.peer_update(kvpub(set("/a", "1", 1), 4));
    harness.peer_state(BstarState::Primary);
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.request("client", "");
    assert_eq!(keys(&harness.pull_all("client")), ["/a", "KTHXBAI"]);
}

// --- Dual active and dual passive ----------------------------------------------------

/// A backup that failed over (the primary went silent) and accepted `updates`.
fn split_backup(updates: &[KvMsg]) -> Harness {
    let mut harness = Harness::passive_at(0);
    harness.peer_update(kvpub(set("/before", "v", 50), 1));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    for update in updates {
        harness.collect(update.clone());
    }
    harness.drain();
    harness
}

#[test]
fn on_dual_active_the_backup_steps_down_forwards_its_split_updates_and_resyncs() {
    let mut harness = split_backup(&[
        set("/x", "1", 1),
        with_ttl_text(set("/y", "2", 2), "10"),
        set("/x", "3", 3),
        delete("/before", 4),
    ]);
    harness.request("client", "/x");
    harness.drain();
    harness.advance(4_000);
    harness.peer_state(BstarState::Active);
    assert_eq!(harness.server.state(), BstarState::Passive);
    let outputs = harness.drain();

    let forwarded: Vec<KvMsg> = outputs
        .iter()
        .filter_map(|output| match output {
            Output::ForwardToPeerCollector(frames) => Some(decode(frames)),
            _ => None,
        })
        .collect();
    let mut y = set("/y", "2", 2);
    y.set_ttl_relative(Duration::from_secs(6));
    assert_eq!(
        forwarded,
        [delete("/before", 4), set("/x", "3", 3), y],
        "the latest update per key, as a KVSET with the remaining ttl"
    );
    let events: Vec<&Event> = outputs
        .iter()
        .filter_map(|output| match output {
            Output::Event(event) => Some(event),
            _ => None,
        })
        .collect();
    assert!(events.contains(&&Event::DualActive { stepped_down: true }));
    assert!(events.contains(&&Event::SplitUpdatesForwarded {
        forwarded: 3,
        lost: 0
    }));
    assert!(events.contains(&&Event::SnapshotStreamAbandoned {
        routing_id: b"client".to_vec(),
        reason: AbandonReason::NoLongerActive
    }));
    assert!(events.contains(&&Event::SyncStarted {
        reason: SyncReason::BecamePassive
    }));
    assert!(harness.server.is_syncing());

    // The forwarded updates wait on the pending list for the primary's echo.
    assert_eq!(harness.server.pending_len(), 3);
    harness.peer_update(KvMsg::hugz(20));
    harness.peer_snapshot(KvMsg::kthxbai(20, Vec::new()));
    harness.peer_update(kvpub(set("/x", "3", 3), 21));
    assert_eq!(harness.server.pending_len(), 2);
    assert_eq!(harness.server.sequence(), 21);
}

#[test]
fn an_active_that_steps_down_says_so_before_anything_its_next_reign_publishes() {
    // Swarm 936433587533: stepping down and taking over again in one instant, the
    // server's subscribers saw one unbroken stream and missed what the takeover merged.
    let mut harness = split_backup(&[set("/x", "1", 1)]);
    harness.drain();
    harness.peer_state(BstarState::Active); // dual active: step down
    harness.peer_state(BstarState::Primary); // the peer restarted: take over again
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.collect(set("/z", "3", 3));
    let published = harness.published_with_hugz();
    let announced = published.first().map(KvMsg::hugz_state);
    assert_eq!(announced, Some(Some(BstarState::Passive)), "{published:?}");
    assert!(
        published.iter().skip(1).any(|update| update.key == b"/z"),
        "{published:?}"
    );
}

#[test]
fn a_backup_that_stepped_down_and_resynced_lower_never_reuses_a_published_sequence() {
    let mut harness = split_backup(&[set("/x", "1", 1), set("/y", "2", 2)]);
    assert_eq!(harness.server.sequence(), 3);
    harness.peer_state(BstarState::Active); // dual active: step down
    harness.peer_update(KvMsg::hugz(1));
    // The primary's snapshot stops short of KTHXBAI: it follows the primary's numbering
    // so far, then the primary restarts.
    harness.peer_snapshot(kvpub(set("/w", "0", 9), 1));
    harness.peer_state(BstarState::Primary);
    assert_eq!(harness.server.state(), BstarState::Active);
    harness.collect(set("/z", "3", 3));
    let published = harness.published();
    // The forwarded updates the primary never echoed are replayed first, then /z; all
    // numbered above the 3 this server published before.
    assert_eq!(keys(&published), ["/x", "/y", "/z"]);
    assert_eq!(harness.value("/w"), Some(&b"0"[..]));
    assert_eq!(
        published
            .iter()
            .map(|message| message.sequence)
            .collect::<Vec<_>>(),
        [4, 5, 6]
    );
}

#[test]
fn a_forwarded_update_the_primarys_snapshot_supersedes_is_not_replayed_at_a_later_failover() {
    // Found by the simulator (swarm 14014): both servers published /k = older while
    // split, the primary then /k = newer. The backup stepped down and forwarded older,
    // which the primary dropped as already published, so no echo ever came; at the next
    // failover the backup replayed older over newer.
    let mut harness = split_backup(&[set("/k", "older", 1)]);
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(20));
    harness.peer_snapshot(kvpub(set("/k", "newer", 2), 20));
    harness.peer_snapshot(KvMsg::kthxbai(20, Vec::new()));
    harness.drain();
    harness.peer_state(BstarState::Primary); // the primary restarted
    assert_eq!(harness.server.state(), BstarState::Active);
    assert!(harness.published().is_empty());
    assert_eq!(harness.value("/k"), Some(&b"newer"[..]));
}

#[test]
fn a_backup_forwards_what_it_replayed_on_taking_over_when_it_steps_down() {
    // Found by the simulator (swarm 25704): the split log was cleared after the
    // takeover's replay, so a client copy only the backup had received was never
    // forwarded, and the primary's snapshot replaced it at the next failover.
    let mut harness = Harness::passive_at(0);
    harness.collect(set("/only-here", "v", 1));
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(keys(&harness.published()), ["/only-here"]);
    harness.advance(2_000);
    harness.peer_state(BstarState::Active); // dual active: step down
    assert_eq!(harness.server.state(), BstarState::Passive);
    let forwarded: Vec<KvMsg> = harness
        .drain()
        .iter()
        .filter_map(|output| match output {
            Output::ForwardToPeerCollector(frames) => Some(decode(frames)),
            _ => None,
        })
        .collect();
    assert_eq!(forwarded, [set("/only-here", "v", 1)]);
}

#[test]
fn on_dual_active_the_primary_stays_active_and_says_so() {
    let mut harness = Harness::active();
    harness.collect(set("/a", "1", 1));
    harness.drain();
    harness.peer_state(BstarState::Active);
    assert_eq!(harness.server.state(), BstarState::Active);
    let outputs = harness.drain();
    assert!(outputs.contains(&Output::Event(Event::DualActive {
        stepped_down: false
    })));
    assert!(!outputs
        .iter()
        .any(|output| matches!(output, Output::ForwardToPeerCollector(_))));
}

/// The keys a step-down forwards to the primary, in order.
fn forwarded_keys(harness: &mut Harness) -> Vec<Vec<u8>> {
    harness
        .drain()
        .into_iter()
        .filter_map(|output| match output {
            Output::ForwardToPeerCollector(frames) => Some(decode(&frames).key),
            _ => None,
        })
        .collect()
}

fn passive_hugz(sequence: i64) -> KvMsg {
    KvMsg::hugz_from(BstarState::Passive, sequence)
}

#[test]
fn updates_a_passive_peer_showed_it_holds_are_not_forwarded() {
    let mut harness = split_backup(&[set("/split", "1", 1)]);
    // The primary restarts and follows us: its HUGZ say what it holds.
    harness.peer_state(BstarState::Passive);
    harness.peer_update(passive_hugz(0));
    harness.collect(set("/followed", "2", 2));
    harness.peer_update(passive_hugz(3));
    // Later the primary is cut off, fails over by itself, and the link heals.
    harness.advance(3_000);
    harness.collect(set("/split-again", "3", 3));
    harness.drain();
    harness.peer_state(BstarState::Active);
    assert_eq!(forwarded_keys(&mut harness), [b"/split-again".to_vec()]);
}

#[test]
fn a_passive_state_alone_does_not_empty_the_split_log() {
    // Found by the simulator (swarms 7027800, 7000666): the primary's PASSIVE states,
    // read late (a stalled link, a paused backup), cleared the log after the primary
    // had taken over; the backup then stepped down and forwarded nothing.
    let mut harness = split_backup(&[set("/split", "1", 1)]);
    harness.peer_state(BstarState::Passive);
    harness.collect(set("/after", "2", 2));
    harness.drain();
    harness.peer_state(BstarState::Active);
    assert_eq!(
        forwarded_keys(&mut harness),
        [b"/after".to_vec(), b"/split".to_vec()]
    );
}

#[test]
fn a_passive_hugz_removes_only_the_changes_at_or_below_its_sequence() {
    let mut harness = split_backup(&[set("/a", "1", 1), set("/b", "2", 2)]);
    assert_eq!(harness.server.sequence(), 3);
    // Unmarked, or marked active: not a passive's word.
    harness.peer_update(KvMsg::hugz(3));
    harness.peer_update(KvMsg::hugz_from(BstarState::Active, 3));
    // Above our own numbering: another history's.
    harness.peer_update(passive_hugz(4));
    harness.peer_update(passive_hugz(2));
    harness.peer_state(BstarState::Active);
    assert_eq!(forwarded_keys(&mut harness), [b"/b".to_vec()]);
}

#[test]
fn a_split_log_past_its_limit_reports_the_updates_it_could_not_keep() {
    let mut config = Config::backup();
    config.split_log_max = 2;
    let mut harness = Harness::passive_with(config, 0);
    harness.advance(2_000);
    harness.request("client", "");
    for n in 1..=4u8 {
        harness.collect(set(&format!("/k{n}"), "v", n));
    }
    harness.drain();
    harness.peer_state(BstarState::Active);
    assert!(harness.events().contains(&Event::SplitUpdatesForwarded {
        forwarded: 2,
        lost: 2
    }));
    assert_eq!(harness.server.counters().split_lost, 2);
}

#[test]
fn two_servers_of_one_role_report_the_conflict_count_it_and_serve_no_one() {
    for (config, peer, role) in [
        (Config::primary(), BstarState::Primary, Role::Primary),
        (Config::backup(), BstarState::Backup, Role::Backup),
    ] {
        let mut harness = Harness::new(config);
        for _ in 0..3 {
            harness.advance(1_000);
            harness.peer_state(peer);
            assert_eq!(harness.events(), [Event::RoleConflict { role }]);
            harness.request("client", "");
            assert_eq!(
                harness.events(),
                [Event::InputDropped {
                    source: InputSource::SnapshotRequest,
                    reason: DropReason::NotActive
                }]
            );
        }
        assert_eq!(harness.server.state(), role.initial_state());
        assert_eq!(harness.server.counters().role_conflicts, 3);
        assert!(harness.server.bstar().role_conflict());
    }
}

#[test]
fn a_proper_peer_is_no_role_conflict() {
    let mut harness = Harness::new(Config::primary());
    harness.peer_state(BstarState::Backup);
    harness.peer_state(BstarState::Passive);
    assert!(!harness
        .events()
        .iter()
        .any(|event| matches!(event, Event::RoleConflict { .. })));
    assert_eq!(harness.server.counters().role_conflicts, 0);
}

#[test]
fn a_split_log_past_its_limit_forgets_its_losses_once_the_passive_peer_holds_them() {
    let mut config = Config::backup();
    config.split_log_max = 2;
    let mut harness = Harness::passive_with(config, 0);
    harness.advance(2_000);
    harness.request("client", "");
    for n in 1..=3u8 {
        harness.collect(set(&format!("/k{n}"), "v", n));
    }
    // All three, /k3 (lost) included, reached the peer.
    harness.peer_update(passive_hugz(3));
    for n in 4..=6u8 {
        harness.collect(set(&format!("/k{n}"), "v", n));
    }
    harness.drain();
    harness.peer_state(BstarState::Active);
    assert!(harness.events().contains(&Event::SplitUpdatesForwarded {
        forwarded: 2,
        lost: 1
    }));
}

#[test]
fn on_dual_passive_the_primary_takes_over_and_replays_its_pending_list() {
    let mut harness = Harness::new(Config::primary());
    harness.peer_state(BstarState::Active);
    assert_eq!(harness.server.state(), BstarState::Passive);
    harness.collect(set("/held", "v", 1));
    harness.peer_state(BstarState::Passive);
    assert_eq!(harness.server.state(), BstarState::Active);
    let outputs = harness.drain();
    assert!(outputs.contains(&Output::Event(Event::DualPassive { took_over: true })));
    assert!(outputs.contains(&Output::Publish(
        kvpub(set("/held", "v", 1), 1).encode().map(Frame::from)
    )));
}

#[test]
fn on_dual_passive_the_backup_waits_then_resyncs_from_the_primary_that_took_over() {
    let mut harness = Harness::passive_at(7);
    harness.peer_state(BstarState::Passive);
    assert_eq!(harness.server.state(), BstarState::Passive);
    assert!(harness
        .events()
        .contains(&Event::DualPassive { took_over: false }));
    harness.peer_state(BstarState::Active);
    assert!(harness.server.is_syncing());
    assert!(harness.events().contains(&Event::SyncStarted {
        reason: SyncReason::PeerBecameActive
    }));
    // The new active numbers from its own (lower) sequence; the snapshot realigns us.
    harness.peer_update(KvMsg::hugz(3));
    harness.peer_snapshot(KvMsg::kthxbai(3, Vec::new()));
    harness.peer_update(kvpub(set("/a", "1", 1), 4));
    assert_eq!(harness.server.sequence(), 4);
    assert_eq!(harness.value("/a"), Some(&b"1"[..]));
}

#[test]
fn a_sync_replaced_because_the_peer_began_a_new_reign_keeps_what_it_held_for_a_failover() {
    // Found by the simulator (swarm 832248865444): a passive syncing with its peer read
    // the old reign's KVPUBs, then the peer took over anew (dual passive) and the sync
    // started over with nothing; the peer died before answering, and the failover lost
    // what the old reign had published to this server.
    let mut harness = Harness::passive_at(10);
    harness.peer_update(kvpub(set("/old", "old reign", 1), 12)); // a gap: sync
    assert!(harness.server.is_syncing());
    harness.peer_state(BstarState::Passive);
    harness.peer_state(BstarState::Active);
    assert!(harness.events().contains(&Event::SyncStarted {
        reason: SyncReason::PeerBecameActive
    }));
    harness.peer_update(kvpub(set("/new", "new reign", 2), 3));
    // The new active dies before answering.
    harness.advance(2_000);
    harness.request("client", "");
    assert_eq!(harness.server.state(), BstarState::Active);
    assert_eq!(harness.value("/old"), Some(&b"old reign"[..]));
    assert_eq!(harness.value("/new"), Some(&b"new reign"[..]));
}

#[test]
fn a_sync_replaced_because_the_peer_began_a_new_reign_installs_the_new_reigns_snapshot() {
    let mut harness = Harness::passive_at(10);
    harness.peer_update(kvpub(set("/old", "old reign", 1), 12)); // a gap: sync
    harness.peer_state(BstarState::Passive);
    harness.peer_state(BstarState::Active);
    assert!(
        harness.server.awaits_peer_reply(),
        "asks the new reign at once"
    );
    // The new reign numbers from its own, lower, sequence: nothing the old one left
    // behind is stale in it, and the snapshot replaces all of it.
    harness.peer_update(kvpub(set("/new", "new reign", 2), 4));
    harness.peer_snapshot(KvMsg::kthxbai(3, Vec::new()));
    assert!(!harness.server.is_syncing());
    assert_eq!(harness.server.sequence(), 4);
    assert_eq!(harness.value("/old"), None);
    assert_eq!(harness.value("/new"), Some(&b"new reign"[..]));
}

// --- Robustness ------------------------------------------------------------------------

fn frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let frame = prop_oneof![
        Just(Vec::new()),
        Just(b"ICANHAZ?".to_vec()),
        Just(HUGZ.to_vec()),
        Just(KTHXBAI.to_vec()),
        Just(b"ttl=5\n".to_vec()),
        Just(b"3".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..20),
        proptest::collection::vec(any::<u8>(), 8..=8),
        proptest::collection::vec(any::<u8>(), 16..=16),
    ];
    proptest::collection::vec(frame, 0..7)
}

#[derive(Clone, Debug)]
enum Input {
    Request(Vec<Vec<u8>>),
    Collected(Vec<Vec<u8>>),
    PeerUpdate(Vec<Vec<u8>>),
    PeerState(Vec<Vec<u8>>),
    PeerSnapshot(Vec<Vec<u8>>),
    Wait(u16),
    Pull,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        frames().prop_map(Input::Request),
        frames().prop_map(Input::Collected),
        frames().prop_map(Input::PeerUpdate),
        frames().prop_map(Input::PeerState),
        frames().prop_map(Input::PeerSnapshot),
        any::<u16>().prop_map(Input::Wait),
        Just(Input::Pull),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_input_sequence_panics_and_every_drop_is_counted_and_reported(
        primary in any::<bool>(),
        inputs in proptest::collection::vec(input(), 0..80),
    ) {
        let config = if primary { Config::primary() } else { Config::backup() };
        let mut harness = Harness::new(config);
        let mut reported = 0u64;
        let mut last_sequence = 0;
        for input in inputs {
            let (now, wall) = (harness.now, harness.wall);
            match input {
                Input::Request(frames) => harness.server.handle_snapshot_request(now, wall, b"c", &frames),
                Input::Collected(frames) => harness.server.handle_collected(now, wall, &frames),
                Input::PeerUpdate(frames) => harness.server.handle_peer_update(now, wall, &frames),
                Input::PeerState(frames) => harness.server.handle_peer_state(now, wall, &frames),
                Input::PeerSnapshot(frames) => harness.server.handle_peer_snapshot(now, wall, &frames),
                Input::Wait(millis) => {
                    harness.advance(u64::from(millis));
                    harness.timeout();
                }
                Input::Pull => while harness.server.poll_snapshot(now, b"c").is_some() {},
            }
            for output in harness.drain() {
                match output {
                    Output::Event(Event::InputDropped { .. }) => reported += 1,
                    Output::Publish(frames) => {
                        let message = decode(&frames);
                        if !message.is_hugz() {
                            prop_assert!(message.sequence > last_sequence, "published sequences strictly increase");
                            last_sequence = message.sequence;
                        }
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(reported, harness.server.counters().dropped_total());
            prop_assert!(harness.server.pending_len() <= harness.server.config().pending_max_len);
        }
    }
}

// --- Byte budgets and map bounds -----------------------------------------------------

/// A config whose byte budgets hold about `messages` updates of `body` bytes, the
/// smallest the size limits allow being one largest message.
fn small_limits() -> Limits {
    Limits {
        max_key_len: 16,
        max_body_len: 1000,
        max_properties_len: 64,
    }
}

fn sized_set(n: u32, body: usize) -> KvMsg {
    KvMsg::kvset(format!("/k{n}").into_bytes(), vec![b'v'; body], nth_uuid(n))
}

fn assert_within_bounds(server: &Server) {
    for bound in server.bounds() {
        assert!(bound.within_bounds(), "{bound:?}");
    }
}

#[test]
fn a_byte_budget_below_one_largest_message_is_an_invalid_config() {
    let mut config = Config::primary();
    config.pending_max_bytes = 1 << 20;
    assert_eq!(
        Server::new(T0, WALL0, config, test_key()).unwrap_err(),
        ConfigError::BelowLargestMessage {
            field: "pending_max_bytes",
            needed: ENTRY_OVERHEAD + 255 + 4096 + (1 << 20),
        }
    );
    let mut config = Config::primary();
    config.max_keys = Some(0);
    assert_eq!(
        Server::new(T0, WALL0, config, test_key()).unwrap_err(),
        ConfigError::Zero { field: "max_keys" }
    );
}

#[test]
fn the_pending_list_evicts_the_oldest_copies_to_stay_within_its_bytes() {
    let mut config = Config::backup();
    config.limits = small_limits();
    // Room for three copies of 1000-byte bodies, not four.
    config.pending_max_bytes = 3 * (ENTRY_OVERHEAD + 16 + 2 * 4 + 1000 + 1) + 100;
    let mut harness = Harness::passive_with(config, 0);
    for n in 0..5 {
        harness.collect(sized_set(n, 1000));
        assert_within_bounds(&harness.server);
    }
    assert_eq!(harness.server.pending_len(), 3);
    assert_eq!(harness.server.counters().pending_evicted, 2);
    let pending = harness.server.bounds()[0];
    assert_eq!(pending.structure, Structure::PendingList);
    assert!(pending.bytes > 3 * 1000 && pending.bytes <= pending.max_bytes);
    // Small copies fit many more in the same bytes: the count is not the bound.
    for n in 10..20 {
        harness.collect(sized_set(n, 1));
    }
    assert!(harness.server.pending_len() > 3);
    assert_within_bounds(&harness.server);
}

#[test]
fn a_syncing_passive_starts_over_when_its_backlog_passes_its_bytes() {
    let mut config = Config::backup();
    config.limits = small_limits();
    config.sync_backlog_max_bytes = 2 * (ENTRY_OVERHEAD + 1100);
    let mut harness = Harness::new(config);
    harness.peer_state(BstarState::Active);
    harness.peer_update(KvMsg::hugz(0));
    assert!(harness.server.is_syncing());
    harness.drain();
    for n in 1..=4u32 {
        harness.peer_update(kvpub(sized_set(n, 1000), i64::from(n)));
        assert_within_bounds(&harness.server);
    }
    assert!(harness.server.counters().sync_buffered_dropped >= 2);
    harness.peer_snapshot(KvMsg::kthxbai(4, Vec::new()));
    let events = harness.events();
    assert!(
        events
            .iter()
            .any(|event| matches!(event, Event::SyncBufferDropped { dropped } if *dropped >= 2)),
        "{events:?}"
    );
    assert!(
        events.contains(&Event::SyncStarted {
            reason: SyncReason::BacklogOverflow,
        }),
        "the overflow is fetched by a fresh snapshot"
    );
}

#[test]
fn a_full_map_refuses_new_keys_but_takes_replacements_and_deletes() {
    let mut config = Config::primary();
    config.max_keys = Some(2);
    let mut harness = Harness::new(config);
    harness.peer_state(BstarState::Backup);
    harness.drain();
    harness.collect(set("/a", "1", 1));
    harness.collect(set("/b", "1", 2));
    harness.collect(set("/c", "1", 3));
    assert_eq!(harness.dropped(InputSource::Collector, "map_full_keys"), 1);
    assert_eq!(harness.value("/c"), None);
    harness.collect(set("/a", "2", 4));
    assert_eq!(harness.value("/a"), Some(&b"2"[..]));
    harness.collect(delete("/b", 5));
    harness.collect(set("/c", "1", 6));
    assert_eq!(harness.value("/c"), Some(&b"1"[..]));
    let published = harness.published();
    assert_eq!(keys(&published), ["/a", "/b", "/a", "/b", "/c"]);
    assert_eq!(
        harness.server.sequence(),
        5,
        "a refused write takes no number"
    );
}

#[test]
fn a_map_at_its_bytes_refuses_a_write_that_would_grow_it() {
    let mut config = Config::primary();
    config.max_map_bytes = Some(2 * (ENTRY_OVERHEAD + 300));
    let mut harness = Harness::new(config);
    harness.peer_state(BstarState::Backup);
    harness.drain();
    harness.collect(sized_set(1, 100));
    assert!(harness.server.map_bytes() > 100);
    harness.collect(sized_set(2, 100));
    assert_eq!(harness.server.len(), 2);
    harness.collect(sized_set(3, 100));
    assert_eq!(harness.dropped(InputSource::Collector, "map_full_bytes"), 1);
    assert_eq!(harness.server.len(), 2);
    assert!(harness.server.map_bytes() <= 2 * (ENTRY_OVERHEAD + 300));
    // A smaller value for a key already there shrinks the map, so it is taken.
    let mut smaller = sized_set(1, 10);
    smaller.uuid = Some(nth_uuid(9));
    harness.collect(smaller);
    assert_eq!(harness.value("/k1").map(<[u8]>::len), Some(10));
}

#[test]
fn a_snapshot_request_with_a_routing_id_longer_than_libzmqs_is_dropped() {
    let mut harness = Harness::active();
    harness.request(&"r".repeat(256), "");
    assert_eq!(
        harness.dropped(InputSource::SnapshotRequest, "routing_id_too_long"),
        1
    );
    assert_eq!(harness.server.open_snapshot_streams(), 0);
    harness.request(&"r".repeat(255), "");
    assert_eq!(harness.server.open_snapshot_streams(), 1);
    assert_within_bounds(&harness.server);
}

/// What a flood of client copies, echoes and snapshot requests can make a passive or
/// an active hold.
#[derive(Clone, Debug)]
enum FloodInput {
    Copy { n: u16, body: u16 },
    Echo { n: u16, sequence: u8 },
    Request { client: u8 },
}

fn flood_input() -> impl Strategy<Value = FloodInput> {
    prop_oneof![
        (any::<u16>(), 0u16..1000).prop_map(|(n, body)| FloodInput::Copy { n, body }),
        (any::<u16>(), any::<u8>()).prop_map(|(n, sequence)| FloodInput::Echo { n, sequence }),
        any::<u8>().prop_map(|client| FloodInput::Request { client }),
    ]
}

proptest! {
    /// Whatever arrives, every structure stays within its count and byte bounds.
    #[test]
    fn a_flood_leaves_every_structure_within_its_bounds(
        inputs in proptest::collection::vec(flood_input(), 1..200),
        passive in any::<bool>(),
        max_len in 1usize..20,
    ) {
        let mut config = if passive { Config::backup() } else { Config::primary() };
        config.limits = small_limits();
        config.pending_max_len = max_len;
        config.pending_max_bytes = largest_message_bytes(&config.limits) * 3;
        config.sync_backlog_max = max_len;
        config.sync_backlog_max_bytes = largest_message_bytes(&config.limits) * 2;
        config.dedupe_window = max_len;
        config.split_log_max = max_len;
        config.max_snapshot_streams = max_len.min(4);
        config.max_keys = Some(max_len);
        let mut harness = if passive {
            Harness::passive_with(config, 0)
        } else {
            let mut harness = Harness::new(config);
            harness.peer_state(BstarState::Backup);
            harness
        };
        for input in inputs {
            match input {
                FloodInput::Copy { n, body } => {
                    harness.collect(sized_set(u32::from(n % 64), usize::from(body)));
                }
                FloodInput::Echo { n, sequence } => harness.peer_update(kvpub(
                    sized_set(u32::from(n % 64), 10),
                    i64::from(sequence),
                )),
                FloodInput::Request { client } => {
                    harness.request(&format!("client-{client}"), "");
                }
            }
            harness.drain();
            for bound in harness.server.bounds() {
                prop_assert!(bound.within_bounds(), "{:?}", bound);
            }
            if let Some(max) = harness.server.config().max_keys {
                prop_assert!(harness.server.len() <= max);
            }
        }
    }
}
