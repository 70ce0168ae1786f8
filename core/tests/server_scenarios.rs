//! Scripted exchanges with the clone server, through its public API only. Each scenario
//! drives one or two servers with a pinned schedule and snapshots (insta) the transcript
//! of every output, so a change in behaviour shows up as a readable diff.

use std::fmt::Write as _;
use std::time::Duration;

use clonekv_core::kvmsg::{BstarState, KvMsg, Limits, SnapshotRequest, Uuid};
use clonekv_core::server::persist::{next_record, Image, NextRecord, Restored, Restorer};
use clonekv_core::server::{Config, Event, HashKey, Output, Server};
use clonekv_core::time::{EpochMillis, Instant};

const T0: Instant = Instant::ZERO;
const WALL0: EpochMillis = EpochMillis(1_795_268_600_000);

fn uuid(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// One message on one line: key, sequence, short uuid, properties, body.
fn message<F: AsRef<[u8]> + std::fmt::Debug>(frames: &[F]) -> String {
    let Ok(message) = KvMsg::decode(frames, &Limits::default()) else {
        return format!("<undecodable {frames:?}>");
    };
    let uuid = message
        .uuid
        .map(|uuid| format!(" uuid={:02x}..", uuid.as_bytes()[0]))
        .unwrap_or_default();
    let properties = if message.properties.is_empty() {
        String::new()
    } else {
        format!(
            " [{}]",
            text(message.properties.as_frame()).trim_end_matches("\\n")
        )
    };
    format!(
        "{} seq={}{uuid}{properties} body='{}'",
        text(&message.key),
        message.sequence,
        text(&message.body)
    )
}

fn describe(output: &Output) -> String {
    match output {
        Output::Publish(frames) => format!("publish   {}", message(frames)),
        Output::SnapshotReady { routing_id } => {
            format!("ready     snapshot for {}", text(routing_id))
        }
        Output::SendStateToPeer(frame) => format!("state     {}", text(frame)),
        Output::RequestPeerSnapshot(frames) => {
            match SnapshotRequest::decode(frames, &Limits::default()) {
                Ok(SnapshotRequest {
                    subtree,
                    resume: Some(position),
                }) => format!(
                    "ask peer  ICANHAZ? '{}' resume after {}",
                    text(&subtree),
                    position.sequence
                ),
                _ => format!("ask peer  {} '{}'", text(&frames[0]), text(&frames[1])),
            }
        }
        Output::ForwardToPeerCollector(frames) => format!("forward   {}", message(frames)),
        Output::Persist(record) => match (record.key(), record.sequence(), record.history()) {
            (Some(key), Some(sequence), _) => format!("persist   {} seq={sequence}", text(key)),
            (_, _, Some(history)) => format!(
                "persist   history reigns={} peer_serves_resumes={}",
                history.lineage.reigns().count(),
                history.peer_serves_resumes
            ),
            _ => format!("persist   {record:?}"),
        },
        Output::PersistImage(image) => {
            format!("image     seq={} keys={}", image.sequence(), image.len())
        }
        Output::Event(event) => format!("event     {event:?}"),
    }
}

/// A primary and a backup wired to each other (state, publisher, snapshots, collector),
/// delivering instantly; clients are scripted by the test. `primary_alive` and
/// `link_up` model a crash and a server-to-server partition.
struct Pair {
    now: Instant,
    primary: Server,
    backup: Server,
    primary_alive: bool,
    link_up: bool,
    /// The next peer snapshot reply arrives with its first two messages swapped (as a
    /// network that reorders within a connection would deliver it; TCP never does).
    swap_next_reply: bool,
    transcript: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Primary,
    Backup,
}

impl Pair {
    fn new() -> Self {
        Pair::with_primary(Config::primary())
    }

    fn with_primary(config: Config) -> Self {
        let mut pair = Pair {
            now: T0,
            primary: Server::new(T0, WALL0, config, HashKey::from_bytes([1; 16])).unwrap(),
            backup: Server::new(T0, WALL0, Config::backup(), HashKey::from_bytes([2; 16])).unwrap(),
            primary_alive: true,
            link_up: true,
            swap_next_reply: false,
            transcript: String::new(),
        };
        pair.timeouts();
        pair
    }

    fn wall(&self) -> EpochMillis {
        let elapsed = self.now.saturating_duration_since(T0);
        WALL0.saturating_add(elapsed)
    }

    fn server(&mut self, who: Who) -> &mut Server {
        match who {
            Who::Primary => &mut self.primary,
            Who::Backup => &mut self.backup,
        }
    }

    fn note(&mut self, line: &str) {
        let millis = self.now.as_nanos() / 1_000_000;
        let _ = writeln!(self.transcript, "[{millis:>5} ms] {line}");
    }

    fn alive(&self, who: Who) -> bool {
        who == Who::Backup || self.primary_alive
    }

    /// Drains both servers until quiet, delivering what goes to the other server.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for who in [Who::Primary, Who::Backup] {
                let other = match who {
                    Who::Primary => Who::Backup,
                    Who::Backup => Who::Primary,
                };
                let name = match who {
                    Who::Primary => "P",
                    Who::Backup => "B",
                };
                while let Some(output) = self.server(who).poll_output() {
                    moved = true;
                    if !self.alive(who) {
                        continue;
                    }
                    self.note(&format!("{name} {}", describe(&output)));
                    let deliver = self.link_up && self.alive(other);
                    let (now, wall) = (self.now, self.wall());
                    match output {
                        Output::Publish(frames) if deliver => {
                            self.server(other).handle_peer_update(now, wall, &frames);
                        }
                        Output::SendStateToPeer(frame) if deliver => {
                            self.server(other).handle_peer_state(now, wall, &[frame]);
                        }
                        Output::ForwardToPeerCollector(frames) if deliver => {
                            self.server(other).handle_collected(now, wall, &frames);
                        }
                        Output::RequestPeerSnapshot(frames) if deliver => {
                            self.server(other)
                                .handle_snapshot_request(now, wall, b"peer", &frames);
                        }
                        Output::SnapshotReady { routing_id } if routing_id == b"peer" => {
                            let mut reply = Vec::new();
                            while let Some(frames) = self.server(who).poll_snapshot(now, b"peer") {
                                reply.push(frames);
                            }
                            if std::mem::take(&mut self.swap_next_reply) && reply.len() >= 2 {
                                reply.swap(0, 1);
                                self.note("  (the reply's first two messages arrive swapped)");
                            }
                            for frames in reply.iter().filter(|_| deliver) {
                                self.server(other).handle_peer_snapshot(now, wall, frames);
                            }
                        }
                        _ => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn timeouts(&mut self) {
        let (now, wall) = (self.now, self.wall());
        if self.primary_alive {
            self.primary.handle_timeout(now, wall);
        }
        self.backup.handle_timeout(now, wall);
        self.pump();
    }

    /// Lets time pass to `millis` after start, firing every deadline on the way.
    fn run_until(&mut self, millis: u64) {
        let until = Instant::from_millis(millis);
        loop {
            let primary = self.primary_alive.then(|| self.primary.poll_timeout());
            let next = [Some(self.backup.poll_timeout()), primary]
                .into_iter()
                .flatten()
                .flatten()
                .min();
            match next {
                Some(at) if at <= until => {
                    self.now = self.now.max(at);
                    self.timeouts();
                }
                _ => break,
            }
        }
        self.now = until;
    }

    /// A client's update, sent to the collectors it reaches.
    fn client_set(&mut self, to: &[Who], message: KvMsg) {
        self.note(&format!(
            "client KVSET {} -> {}",
            message_line(&message),
            names(to)
        ));
        let (now, wall) = (self.now, self.wall());
        for &who in to {
            if self.alive(who) {
                self.server(who)
                    .handle_collected(now, wall, &message.encode());
            }
        }
        self.pump();
    }

    /// A client's ICANHAZ? to one server; pulls and notes the whole reply.
    fn client_snapshot(&mut self, who: Who, routing_id: &str, subtree: &str) {
        self.note(&format!(
            "client {routing_id} ICANHAZ? '{subtree}' -> {}",
            names(&[who])
        ));
        let (now, wall) = (self.now, self.wall());
        let request = SnapshotRequest::new(subtree.as_bytes().to_vec()).encode();
        self.server(who)
            .handle_snapshot_request(now, wall, routing_id.as_bytes(), &request);
        self.pump();
        while let Some(frames) = self.server(who).poll_snapshot(now, routing_id.as_bytes()) {
            self.note(&format!("  -> {routing_id}: {}", message(&frames)));
        }
    }
}

impl Pair {
    /// The backup process ends; a new one starts from what it recorded (`image`: by the
    /// persistence invariant, the last image plus the records since rebuild exactly it).
    fn restart_backup(&mut self, image: &Image, config: Config) {
        self.note("--- the backup restarts from its records ---");
        self.backup = Server::restore(
            self.now,
            self.wall(),
            config,
            HashKey::from_bytes([3; 16]),
            restored(image),
        )
        .unwrap();
        self.timeouts();
    }

    /// Clients set `/k/<n>` to `v1` (uuid n) through both servers, for each n.
    fn set_keys_on_both(&mut self, keys: std::ops::RangeInclusive<u8>) {
        for n in keys {
            self.client_set(
                &[Who::Primary, Who::Backup],
                set(&format!("/k/{n}"), "v1", n),
            );
        }
    }

    /// A resume request for the primary's current reign after `sequence`; the reply.
    fn ask_primary_to_resume_after(&mut self, sequence: i64) -> Vec<String> {
        let reign = self.primary.lineage().current().unwrap().id;
        let request =
            SnapshotRequest::resume(clonekv_core::kvmsg::ResumePosition { reign, sequence })
                .encode();
        let (now, wall) = (self.now, self.wall());
        self.primary
            .handle_snapshot_request(now, wall, b"tool", &request);
        let mut reply = Vec::new();
        while let Some(frames) = self.primary.poll_snapshot(now, b"tool") {
            reply.push(message(&frames));
        }
        reply
    }

    fn events(&self, name: char) -> Vec<String> {
        self.transcript
            .lines()
            .filter(|line| line.contains(&format!("] {name} event")))
            .map(|line| line.split("event     ").nth(1).unwrap_or("").to_string())
            .collect()
    }
}

/// Reads an image back as the daemon reads a snapshot file.
fn restored(image: &Image) -> Restored {
    let mut bytes = Vec::new();
    image
        .encode(&mut bytes, usize::MAX, |_| Ok::<(), ()>(()))
        .unwrap();
    let mut restorer = Restorer::new();
    let mut rest = bytes.as_slice();
    while let NextRecord::Record { payload, consumed } = next_record(rest) {
        restorer.apply(payload).unwrap();
        rest = &rest[consumed..];
    }
    restorer.finish()
}

fn message_line(message: &KvMsg) -> String {
    let frames = message.encode();
    self::message(&frames)
}

fn names(to: &[Who]) -> String {
    to.iter()
        .map(|who| match who {
            Who::Primary => "P",
            Who::Backup => "B",
        })
        .collect::<Vec<_>>()
        .join("+")
}

fn set(key: &str, value: &str, n: u8) -> KvMsg {
    KvMsg::kvset(key.as_bytes().to_vec(), value.as_bytes().to_vec(), uuid(n))
}

#[test]
fn a_client_joins_sets_deletes_and_a_ttl_expires() {
    let mut pair = Pair::new();
    assert_eq!(pair.primary.state(), BstarState::Active);
    assert_eq!(pair.backup.state(), BstarState::Passive);
    pair.run_until(100);
    pair.client_snapshot(Who::Primary, "client-1", "/client/");
    pair.client_set(&[Who::Primary, Who::Backup], set("/client/1", "hello", 1));
    pair.client_set(
        &[Who::Primary, Who::Backup],
        set("/client/2", "brief", 2).with_ttl(Duration::from_millis(1_500)),
    );
    pair.client_set(&[Who::Primary, Who::Backup], set("/other", "x", 3));
    pair.client_set(
        &[Who::Primary, Who::Backup],
        KvMsg::kvset_delete(b"/client/1".to_vec(), uuid(4)),
    );
    pair.run_until(1_700);
    pair.client_snapshot(Who::Primary, "client-2", "/client/");
    pair.client_snapshot(Who::Primary, "client-3", "");

    assert_eq!(pair.primary.sequence(), 5);
    assert_eq!(pair.backup.sequence(), 5, "the passive follows the active");
    assert_eq!(pair.backup.pending_len(), 0);
    insta::assert_snapshot!("client_joins_sets_deletes_ttl_expires", pair.transcript);
}

#[test]
fn failover_replays_the_pending_list_but_not_what_the_active_superseded() {
    let mut pair = Pair::new();
    pair.run_until(100);
    // Reaches both: echoed, nothing left pending.
    pair.client_set(&[Who::Primary, Who::Backup], set("/k/both", "1", 1));
    // The primary's collector lost this one: only the backup holds it.
    pair.client_set(&[Who::Backup], set("/k/lost", "2", 2));
    // Client A's update reaches only the backup; client B's later one reaches both.
    pair.client_set(&[Who::Backup], set("/k/raced", "from-a", 3));
    pair.client_set(&[Who::Primary, Who::Backup], set("/k/raced", "from-b", 4));
    pair.note("--- the primary crashes ---");
    pair.primary_alive = false;
    pair.run_until(2_600);
    pair.client_snapshot(Who::Backup, "client-1", "/k/");
    assert_eq!(pair.backup.state(), BstarState::Active);
    assert_eq!(
        pair.backup
            .get(b"/k/raced")
            .map(|entry| entry.body().to_vec()),
        Some(b"from-b".to_vec())
    );
    insta::assert_snapshot!("failover_with_pending_replay", pair.transcript);
}

#[test]
fn a_healed_split_brain_ends_with_the_backup_forwarding_its_updates_to_the_primary() {
    let mut pair = Pair::new();
    pair.run_until(100);
    pair.client_set(&[Who::Primary, Who::Backup], set("/shared", "1", 1));
    pair.note("--- the server-to-server link breaks ---");
    pair.link_up = false;
    pair.run_until(2_200);
    // A client cut off from the primary asks the backup, which fails over.
    pair.client_snapshot(Who::Backup, "client-b", "");
    pair.client_set(&[Who::Backup], set("/from-backup", "b", 2));
    pair.client_set(&[Who::Primary], set("/from-primary", "p", 3));
    pair.note("--- the link heals ---");
    pair.link_up = true;
    pair.run_until(4_500);

    assert_eq!(pair.primary.state(), BstarState::Active);
    assert_eq!(pair.backup.state(), BstarState::Passive);
    let keys = |server: &Server| {
        server
            .iter()
            .map(|(key, entry)| format!("{}={}", text(key), text(entry.body())))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&pair.primary),
        ["/from-backup=b", "/from-primary=p", "/shared=1"]
    );
    assert_eq!(keys(&pair.backup), keys(&pair.primary));
    assert_eq!(pair.backup.sequence(), pair.primary.sequence());
    insta::assert_snapshot!("split_brain_heals", pair.transcript);
}

#[test]
fn a_restarted_backup_resumes_from_its_recorded_sequence() {
    let mut pair = Pair::new();
    pair.run_until(100);
    pair.set_keys_on_both(1..=3);
    assert_eq!(pair.backup.sequence(), 3);
    let recorded = pair.backup.image();
    pair.note("--- the backup stops; the primary goes on alone ---");
    pair.link_up = false;
    pair.client_set(&[Who::Primary], set("/k/1", "v2", 4));
    pair.client_set(
        &[Who::Primary],
        KvMsg::kvset_delete(b"/k/2".to_vec(), uuid(5)),
    );
    pair.client_set(&[Who::Primary], set("/k/4", "v1", 6));
    pair.run_until(3_000);
    pair.link_up = true;
    pair.restart_backup(&recorded, Config::backup());
    pair.run_until(4_000);

    assert_eq!(pair.backup.state(), BstarState::Passive);
    let keys = |server: &Server| {
        server
            .iter()
            .map(|(key, entry)| {
                format!("{}={}@{}", text(key), text(entry.body()), entry.sequence())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&pair.backup), keys(&pair.primary));
    assert_eq!(pair.backup.sequence(), 6);
    assert_eq!(pair.backup.counters().syncs_resumed, 1);
    assert_eq!(pair.primary.counters().resumes_served, 1);
    assert!(pair
        .events('B')
        .iter()
        .any(|event| event.contains("resumed: Some((3, 3))")));
    insta::assert_snapshot!("backup_resumes", pair.transcript);
}

#[test]
fn a_resume_reply_taken_for_a_snapshot_is_not_installed() {
    // The reply's first message decides its kind; reordered, a resume reply looks like
    // a snapshot of its changes alone. Its KTHXBAI's `resumed` mark gives it away: the
    // backup installs none of it and asks for the map instead.
    let mut pair = Pair::new();
    pair.run_until(100);
    pair.set_keys_on_both(1..=3);
    let recorded = pair.backup.image();
    pair.link_up = false;
    pair.client_set(&[Who::Primary], set("/k/4", "v1", 4));
    pair.run_until(3_000);
    pair.link_up = true;
    pair.swap_next_reply = true;
    pair.restart_backup(&recorded, Config::backup());
    pair.run_until(4_000);

    assert!(pair
        .events('B')
        .iter()
        .any(|event| event.contains("ReplyMisread")));
    let keys = |server: &Server| server.iter().map(|(key, _)| text(key)).collect::<Vec<_>>();
    assert_eq!(keys(&pair.backup), ["/k/1", "/k/2", "/k/3", "/k/4"]);
    assert_eq!(pair.backup.sequence(), pair.primary.sequence());
    assert_eq!(pair.backup.counters().syncs_resumed, 0);
    assert_eq!(pair.primary.counters().resumes_served, 1);
}

#[test]
fn a_backup_whose_changes_the_active_no_longer_holds_gets_a_full_snapshot() {
    let mut pair = Pair::with_primary(Config {
        recent_changes_max: 2,
        ..Config::primary()
    });
    pair.run_until(100);
    pair.client_set(&[Who::Primary, Who::Backup], set("/k/1", "v1", 1));
    let recorded = pair.backup.image();
    pair.link_up = false;
    for n in 2..=4 {
        pair.client_set(&[Who::Primary], set(&format!("/k/{n}"), "v1", n));
    }
    pair.run_until(3_000);
    pair.link_up = true;
    pair.restart_backup(&recorded, Config::backup());
    pair.run_until(4_000);

    assert_eq!(pair.backup.sequence(), pair.primary.sequence());
    assert_eq!(pair.backup.len(), 4);
    assert_eq!(pair.backup.counters().syncs_resumed, 0);
    assert_eq!(pair.primary.counters().resumes_refused, 1);
    assert!(pair
        .events('P')
        .iter()
        .any(|event| event == "ResumeAnswered { after: 1, changes: None }"));
}

#[test]
fn a_restarted_active_starts_a_new_reign_so_what_it_lost_is_never_resumed_over() {
    // The primary published sequences 1..=3; its records kept only 1 (a crash under
    // `--fsync never`). The backup followed all three and then restarts too. The
    // primary, active again from sequence 1, numbers new changes from 4: the backup's
    // map at 3 is not a state of that history, so it must not resume.
    let mut pair = Pair::new();
    pair.run_until(100);
    pair.client_set(&[Who::Primary, Who::Backup], set("/k/1", "v1", 1));
    let primary_recorded = pair.primary.image();
    pair.client_set(&[Who::Primary, Who::Backup], set("/k/2", "v1", 2));
    pair.client_set(&[Who::Primary, Who::Backup], set("/k/3", "v1", 3));
    let backup_recorded = pair.backup.image();
    pair.note("--- both stop; the primary restarts from its records alone ---");
    pair.link_up = false;
    pair.primary = Server::restore(
        pair.now,
        pair.wall(),
        Config::primary(),
        HashKey::from_bytes([4; 16]),
        restored(&primary_recorded),
    )
    .unwrap();
    pair.run_until(3_000);
    pair.client_set(&[Who::Primary], set("/k/5", "v1", 5));
    pair.link_up = true;
    pair.restart_backup(&backup_recorded, Config::backup());
    pair.run_until(5_000);

    assert_eq!(pair.primary.state(), BstarState::Active);
    let keys = |server: &Server| server.iter().map(|(key, _)| text(key)).collect::<Vec<_>>();
    assert_eq!(keys(&pair.backup), ["/k/1", "/k/5"]);
    assert_eq!(pair.backup.counters().syncs_resumed, 0);
    assert_eq!(pair.primary.counters().resumes_refused, 1);
}

#[test]
fn the_changes_of_a_resume_reply_are_sent_after_a_hugz_naming_their_start() {
    let mut pair = Pair::new();
    pair.run_until(100);
    pair.set_keys_on_both(1..=3);
    pair.client_set(
        &[Who::Primary, Who::Backup],
        KvMsg::kvset_delete(b"/k/1".to_vec(), uuid(4)),
    );
    let reply = pair.ask_primary_to_resume_after(2);
    insta::assert_debug_snapshot!("resume_reply", reply);
    assert!(matches!(
        pair.primary.poll_output(),
        Some(Output::Event(Event::ResumeAnswered {
            after: 2,
            changes: Some(2)
        }))
    ));
}

#[test]
fn more_changes_than_keys_are_answered_with_the_map() {
    let mut pair = Pair::new();
    pair.run_until(100);
    for n in 1..=5 {
        pair.client_set(
            &[Who::Primary, Who::Backup],
            set("/hot", &format!("v{n}"), n),
        );
    }
    let reply = pair.ask_primary_to_resume_after(1);
    assert_eq!(reply.len(), 2, "one entry and KTHXBAI: {reply:?}");
    assert_eq!(pair.primary.counters().resumes_refused, 1);
}
