use super::*;

use proptest::prelude::*;

const G: &str = "g";

/// A write the machine asked for: key, value (`None`: delete), ttl.
type Write = (Vec<u8>, Option<Vec<u8>>, Option<Duration>);
/// The group subtree: full key -> (value, entry sequence).
type State = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;

fn key(path: &str) -> Vec<u8> {
    format!("/_group/{G}/{path}").into_bytes()
}

fn set(path: &str, value: &str, sequence: i64) -> Change {
    Change::Set {
        key: key(path),
        value: value.as_bytes().to_vec(),
        sequence,
    }
}

fn delete(path: &str, sequence: i64) -> Change {
    Change::Delete {
        key: key(path),
        sequence,
    }
}

fn observer() -> Group {
    Group::new(Config::observer(G)).unwrap()
}

fn drain(group: &mut Group) -> (Vec<Event>, Vec<Write>) {
    let mut events = Vec::new();
    let mut writes = Vec::new();
    while let Some(output) = group.poll_output() {
        match output {
            Output::Event(event) => events.push(event),
            Output::Write { key, value, ttl } => writes.push((key, value, ttl)),
        }
    }
    (events, writes)
}

fn feed(group: &mut Group, changes: impl IntoIterator<Item = Change>) -> Vec<Event> {
    for change in changes {
        group.handle_change(Instant::ZERO, change);
    }
    drain(group).0
}

fn request_value(kind: Kind, timeout_ms: u64, voters: &str, topic: &str) -> String {
    format!("{}\n{timeout_ms}\n{voters}\n{topic}", kind.as_str())
}

fn decisions(events: &[Event]) -> Vec<(String, Outcome, usize, usize)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::VoteDecided(decision) => Some((
                decision.request.id.clone(),
                decision.outcome,
                decision.yes,
                decision.no,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn the_member_that_joined_first_leads_and_its_join_is_the_token() {
    let mut group = observer();
    let events = feed(
        &mut group,
        [set("m/b", "0", 3), set("m/a", "0", 5), set("m/b", "3", 7)],
    );
    assert_eq!(group.leader(), Some(("b", 3)));
    assert_eq!(group.members().collect::<Vec<_>>(), [("a", 5), ("b", 3)]);
    assert_eq!(
        events[..2],
        [
            Event::MemberJoined {
                member: "b".into(),
                join: 3,
                sequence: 3
            },
            Event::LeaderElected {
                member: "b".into(),
                token: 3,
                sequence: 3
            },
        ]
    );
    // The refresh at 7 changed nothing: no event.
    assert_eq!(events.len(), 3);
    let events = feed(&mut group, [delete("m/b", 9)]);
    assert_eq!(
        events,
        [
            Event::MemberLeft {
                member: "b".into(),
                sequence: 9
            },
            Event::LeaderExited {
                member: "b".into(),
                token: 3,
                sequence: 9
            },
            Event::LeaderElected {
                member: "a".into(),
                token: 5,
                sequence: 9
            },
        ]
    );
}

#[test]
fn a_snapshot_reader_recovers_join_sequences_from_the_values() {
    let mut group = observer();
    // b joined at 3 and was refreshed at 40; a joined at 20 and was refreshed at 41.
    group.handle_resync(
        Instant::ZERO,
        41,
        [
            (key("m/a"), b"20".to_vec(), 41),
            (key("m/b"), b"3".to_vec(), 40),
            (key("m/c"), b"0".to_vec(), 35),
            // A claim after its own entry is no join: read as the entry's sequence.
            (key("m/d"), b"99".to_vec(), 38),
        ],
    );
    assert_eq!(group.leader(), Some(("b", 3)));
    assert_eq!(
        group.members().collect::<Vec<_>>(),
        [("a", 20), ("b", 3), ("c", 35), ("d", 38)]
    );
}

#[test]
fn below_the_minimum_size_there_is_no_leader() {
    let mut group = Group::new(Config {
        min_size: 2,
        ..Config::observer(G)
    })
    .unwrap();
    feed(&mut group, [set("m/a", "0", 1)]);
    assert_eq!(group.leader(), None);
    feed(&mut group, [set("m/b", "0", 2)]);
    assert_eq!(group.leader(), Some(("a", 1)));
    let events = feed(&mut group, [delete("m/b", 3)]);
    assert!(events.contains(&Event::LeaderExited {
        member: "a".into(),
        token: 1,
        sequence: 3
    }));
    assert_eq!(group.leader(), None);
}

#[test]
fn riaps_rules_decide_majority_and_consensus_votes() {
    // (kind, voters, yes, no) -> outcome once certain
    let table = [
        (Kind::Majority, 3, 2, 0, Some(Outcome::Yes)),
        (Kind::Majority, 3, 1, 1, None),
        (Kind::Majority, 3, 1, 2, Some(Outcome::No)),
        (Kind::Majority, 4, 2, 2, Some(Outcome::No)),
        (Kind::Majority, 4, 3, 0, Some(Outcome::Yes)),
        (Kind::Majority, 4, 2, 1, None),
        (Kind::Majority, 1, 1, 0, Some(Outcome::Yes)),
        (Kind::Consensus, 3, 2, 0, None),
        (Kind::Consensus, 3, 3, 0, Some(Outcome::Yes)),
        (Kind::Consensus, 3, 0, 1, Some(Outcome::No)),
        (Kind::Consensus, 3, 2, 1, Some(Outcome::No)),
    ];
    for (kind, voters, yes, no, outcome) in table {
        assert_eq!(
            kind.decide(voters, yes, no),
            outcome,
            "{kind} of {voters}: {yes} yes, {no} no"
        );
    }
}

#[test]
fn a_vote_is_decided_when_certain_and_never_changes() {
    let mut group = observer();
    let request = request_value(Kind::Majority, 5000, "a,b,c", "deploy v2");
    let events = feed(
        &mut group,
        [
            set("m/a", "0", 1),
            set("m/b", "0", 2),
            set("m/c", "0", 3),
            set("v/a:1:1", &request, 4),
            set("b/a:1:1/a", "yes", 5),
            set("b/a:1:1/z", "yes", 6), // not a voter
            set("b/a:1:1/b", "yes", 7),
            set("b/a:1:1/c", "no", 8),
            delete("v/a:1:1", 9),
        ],
    );
    let requested: Vec<&Event> = events
        .iter()
        .filter(|event| matches!(event, Event::VoteRequested(_)))
        .collect();
    assert_eq!(requested.len(), 1);
    assert_eq!(
        decisions(&events),
        [("a:1:1".to_owned(), Outcome::Yes, 2, 0)]
    );
    let decision = group.decision("a:1:1").unwrap();
    assert_eq!((decision.outcome, decision.sequence), (Outcome::Yes, 7));
    assert_eq!(decision.request.topic, b"deploy v2");
}

#[test]
fn a_consensus_vote_without_every_ballot_times_out_at_the_expiry() {
    let mut group = observer();
    let request = request_value(Kind::Consensus, 1500, "a,b", "t");
    let events = feed(
        &mut group,
        [
            set("m/a", "0", 1),
            set("m/b", "0", 2),
            set("v/a:1:1", &request, 3),
            set("b/a:1:1/a", "yes", 4),
            delete("v/a:1:1", 5),
            // A ballot after the close counts for nothing.
            set("b/a:1:1/b", "yes", 6),
        ],
    );
    assert_eq!(
        decisions(&events),
        [("a:1:1".to_owned(), Outcome::Timeout, 1, 0)]
    );
}

#[test]
fn a_jump_over_a_close_with_a_deciding_ballot_inside_reports_unknown() {
    let request = request_value(Kind::Majority, 1000, "a,b,c", "t");
    let mut group = observer();
    feed(
        &mut group,
        [
            set("m/a", "0", 1),
            set("m/b", "0", 2),
            set("m/c", "0", 3),
            set("v/a:1:1", &request, 4),
            set("b/a:1:1/a", "yes", 5),
        ],
    );
    // Inside the jump: b votes yes (6) and the request expires (7), order unknown to a
    // snapshot reader.
    group.handle_resync(
        Instant::ZERO,
        8,
        [
            (key("m/a"), b"1".to_vec(), 1),
            (key("m/b"), b"2".to_vec(), 2),
            (key("m/c"), b"3".to_vec(), 3),
            (key("b/a:1:1/a"), b"yes".to_vec(), 5),
            (key("b/a:1:1/b"), b"yes".to_vec(), 6),
        ],
    );
    let events = drain(&mut group).0;
    assert_eq!(
        decisions(&events),
        [("a:1:1".to_owned(), Outcome::Unknown, 1, 0)]
    );

    // A jump of one sequence holds only the close: a plain timeout.
    let mut group = observer();
    feed(
        &mut group,
        [
            set("m/a", "0", 1),
            set("m/b", "0", 2),
            set("m/c", "0", 3),
            set("v/a:1:1", &request, 4),
            set("b/a:1:1/a", "yes", 5),
        ],
    );
    group.handle_resync(
        Instant::ZERO,
        6,
        [
            (key("m/a"), b"1".to_vec(), 1),
            (key("m/b"), b"2".to_vec(), 2),
            (key("m/c"), b"3".to_vec(), 3),
            (key("b/a:1:1/a"), b"yes".to_vec(), 5),
        ],
    );
    let events = drain(&mut group).0;
    assert_eq!(
        decisions(&events),
        [("a:1:1".to_owned(), Outcome::Timeout, 1, 0)]
    );
}

#[test]
fn malformed_keys_and_values_are_counted_and_ignored() {
    let mut group = observer();
    let events = feed(
        &mut group,
        [
            set("m/a", "zero", 1),
            set("m/b*", "0", 2),
            set("v/x:1:1", "plurality\n10\na\nt", 3),
            set("m/c", "-4", 4),
        ],
    );
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(group.size(), 0);
    assert!(group.stats().malformed >= 4);
    // Stale and local changes are not applied.
    feed(&mut group, [set("m/d", "0", 4), set("m/e", "0", 0)]);
    assert_eq!(group.size(), 0);
    assert_eq!(group.stats().stale_changes, 1);
}

#[test]
fn a_member_joins_refreshes_with_its_join_and_rejoins_after_losing_its_lease() {
    let mut group = Group::new(Config::member(G, "a")).unwrap();
    let t0 = Instant::from_millis(0);
    group.join(t0).unwrap();
    let (_, writes) = drain(&mut group);
    assert_eq!(
        writes,
        [(
            key("m/a"),
            Some(b"0".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );
    assert_eq!(group.poll_timeout(), Some(Instant::from_millis(1000)));
    assert_eq!(
        group.request_vote(b"t", Kind::Majority, Duration::from_secs(1)),
        Err(Error::NotJoined)
    );

    group.handle_change(t0, set("m/a", "0", 12));
    assert_eq!(group.join_sequence(), Some(12));
    assert!(group.is_leader());
    drain(&mut group);
    group.handle_timeout(Instant::from_millis(1000));
    let (_, writes) = drain(&mut group);
    assert_eq!(
        writes,
        [(
            key("m/a"),
            Some(b"12".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );

    // The key expired (partition): a fresh join at once.
    group.handle_change(Instant::from_millis(1500), delete("m/a", 20));
    let (events, writes) = drain(&mut group);
    assert!(events.contains(&Event::LeaderExited {
        member: "a".into(),
        token: 12,
        sequence: 20
    }));
    assert_eq!(
        writes,
        [(
            key("m/a"),
            Some(b"0".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );
    assert_eq!(group.stats().rejoins, 1);
    group.handle_change(Instant::from_millis(1600), set("m/a", "0", 22));
    assert_eq!(group.join_sequence(), Some(22));
    drain(&mut group);

    // A refresh queued before the expiry lands late with the old join: put it back.
    group.handle_change(Instant::from_millis(1700), set("m/a", "12", 23));
    let (_, writes) = drain(&mut group);
    assert_eq!(
        writes,
        [(
            key("m/a"),
            Some(b"22".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );

    group.leave().unwrap();
    let (_, writes) = drain(&mut group);
    assert_eq!(writes, [(key("m/a"), None, None)]);
    assert_eq!(group.poll_timeout(), None);
}

#[test]
fn a_member_whose_stream_is_late_holds_its_refresh_back_until_it_is_safe() {
    let mut group = Group::new(Config::member(G, "a")).unwrap();
    group.join(Instant::ZERO).unwrap();
    group.handle_change(Instant::from_millis(10), set("m/a", "0", 5));
    drain(&mut group);
    group.handle_timeout(Instant::from_millis(1000));
    assert_eq!(drain(&mut group).1.len(), 1, "the first refresh goes out");
    // Its echo does not come: at 2 s the join written at 0 is the newest seen, and a
    // refresh could land after the key expired.
    group.handle_timeout(Instant::from_millis(2000));
    assert!(drain(&mut group).1.is_empty(), "held back");
    // The echo of the 1 s refresh arrives: the lease surely runs until 4 s.
    group.handle_change(Instant::from_millis(2500), set("m/a", "5", 9));
    assert_eq!(
        drain(&mut group).1,
        [(
            key("m/a"),
            Some(b"5".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );
}

#[test]
fn a_restarted_member_does_not_take_its_earlier_incarnations_key_for_its_join() {
    let mut group = Group::new(Config::member(G, "a")).unwrap();
    group.handle_resync(Instant::ZERO, 20, [(key("m/a"), b"3".to_vec(), 18)]);
    group.join(Instant::ZERO).unwrap();
    drain(&mut group);
    group.handle_change(Instant::ZERO, set("m/b", "0", 21));
    assert_eq!(group.join_sequence(), None);
    group.handle_change(Instant::ZERO, set("m/a", "0", 22));
    assert_eq!(group.join_sequence(), Some(22));
}

#[test]
fn a_join_not_seen_within_a_lease_is_written_again() {
    let mut group = Group::new(Config::member(G, "a")).unwrap();
    group.join(Instant::ZERO).unwrap();
    drain(&mut group);
    for second in 1..=2 {
        group.handle_timeout(Instant::from_millis(second * 1000));
        assert!(
            drain(&mut group).1.is_empty(),
            "no second join at {second} s"
        );
    }
    group.handle_timeout(Instant::from_millis(3000));
    assert_eq!(
        drain(&mut group).1,
        [(
            key("m/a"),
            Some(b"0".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );
}

#[test]
fn members_write_votes_ballots_and_messages_the_others_read() {
    let mut a = Group::new(Config::member(G, "a")).unwrap();
    let mut b = Group::new(Config::member(G, "b")).unwrap();
    let mut history = vec![set("m/a", "0", 1), set("m/b", "0", 2)];
    a.join(Instant::ZERO).unwrap();
    b.join(Instant::ZERO).unwrap();
    for change in history.clone() {
        a.handle_change(Instant::ZERO, change.clone());
        b.handle_change(Instant::ZERO, change);
    }
    drain(&mut a);
    drain(&mut b);
    let vote = a
        .request_vote(b"go?", Kind::Consensus, Duration::from_secs(2))
        .unwrap();
    assert_eq!(vote, "a:1:1");
    b.send(Recipient::Leader, b"hello leader").unwrap();
    a.send(Recipient::All, b"hello all").unwrap();
    let mut sequence = 2;
    // Publish every write in order, as the server would, to both machines.
    let mut publish = |a: &mut Group, b: &mut Group, history: &mut Vec<Change>| {
        let mut writes = drain(a).1;
        writes.extend(drain(b).1);
        for (key, value, _) in writes {
            sequence += 1;
            let change = match value {
                Some(value) => Change::Set {
                    key,
                    value,
                    sequence,
                },
                None => Change::Delete { key, sequence },
            };
            history.push(change.clone());
            a.handle_change(Instant::ZERO, change.clone());
            b.handle_change(Instant::ZERO, change);
        }
    };
    publish(&mut a, &mut b, &mut history);
    let a_events: Vec<Event> = drain(&mut a).0;
    let b_events: Vec<Event> = drain(&mut b).0;
    assert!(a_events.iter().any(|event| matches!(event,
        Event::Message { from, to: Recipient::Leader, payload, .. } if from == "b" && payload == b"hello leader")));
    assert!(!a_events.iter().any(|event| matches!(event,
        Event::Message { payload, .. } if payload == b"hello all")));
    assert!(b_events.iter().any(|event| matches!(event,
        Event::Message { from, to: Recipient::All, .. } if from == "a")));
    assert!(!b_events.iter().any(|event| matches!(event,
        Event::Message { payload, .. } if payload == b"hello leader")));

    a.vote(&vote, true).unwrap();
    assert_eq!(
        b.vote("nope", true),
        Err(Error::UnknownVote {
            vote: "nope".into()
        })
    );
    b.vote(&vote, true).unwrap();
    assert_eq!(
        b.vote(&vote, false),
        Err(Error::AlreadyVoted { vote: vote.clone() })
    );
    publish(&mut a, &mut b, &mut history);
    for group in [&a, &b] {
        assert_eq!(group.decision(&vote).map(|d| d.outcome), Some(Outcome::Yes));
    }
}

#[test]
fn configuration_errors_say_what_is_wrong() {
    assert_eq!(
        Group::new(Config::member(G, "a/b")).err(),
        Some(Error::InvalidName { name: "a/b".into() })
    );
    assert_eq!(
        Group::new(Config {
            lease: Duration::from_secs(1),
            ..Config::observer(G)
        })
        .err(),
        Some(Error::LeaseTooShort {
            lease: Duration::from_secs(1),
            refresh: Duration::from_secs(1)
        })
    );
    assert_eq!(
        Group::new(Config {
            min_size: 0,
            ..Config::observer(G)
        })
        .err(),
        Some(Error::ZeroMinSize)
    );
    assert_eq!(observer().join(Instant::ZERO), Err(Error::NotAMember));
}

// --- Histories -------------------------------------------------------------------------

const POOL: [&str; 4] = ["a", "b", "c", "d"];

/// What happens next in a random group's life, as the server orders it.
#[derive(Clone, Debug)]
enum Step {
    Join(usize),
    Refresh(usize),
    /// The member's lease runs out, or it leaves.
    Expire(usize),
    Request(usize, bool),
    Ballot(usize, usize, bool),
    CloseVote(usize),
    /// A change elsewhere in the map: a sequence the group does not see.
    Elsewhere,
    /// The leader writes its token as the fence.
    Fence,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..POOL.len()).prop_map(Step::Join),
        3 => (0..POOL.len()).prop_map(Step::Refresh),
        2 => (0..POOL.len()).prop_map(Step::Expire),
        1 => (0..4usize, any::<bool>()).prop_map(|(n, majority)| Step::Request(n, majority)),
        4 => (0..POOL.len(), 0..4usize, any::<bool>())
            .prop_map(|(voter, vote, yes)| Step::Ballot(voter, vote, yes)),
        1 => (0..4usize).prop_map(Step::CloseVote),
        1 => Just(Step::Elsewhere),
        1 => Just(Step::Fence),
    ]
}

/// A model server: the group subtree after every sequence.
struct History {
    changes: Vec<Change>,
    /// The state after each change: (sequence, full key -> (value, entry sequence)).
    states: Vec<(i64, State)>,
}

fn build(steps: &[Step]) -> History {
    let mut map: State = BTreeMap::new();
    let mut sequence = 0;
    let mut changes = Vec::new();
    let mut states = Vec::new();
    let mut votes: Vec<String> = Vec::new();
    let join_of = |map: &State, member: &str| {
        map.get(&key(&format!("m/{member}"))).map(|(value, at)| {
            let claim: i64 = std::str::from_utf8(value).unwrap().parse().unwrap();
            if claim == 0 {
                *at
            } else {
                claim
            }
        })
    };
    for step in steps {
        let change = match step {
            Step::Join(m) if join_of(&map, POOL[*m]).is_none() => {
                Some((key(&format!("m/{}", POOL[*m])), Some("0".to_owned())))
            }
            Step::Refresh(m) => join_of(&map, POOL[*m])
                .map(|join| (key(&format!("m/{}", POOL[*m])), Some(join.to_string()))),
            Step::Expire(m) if join_of(&map, POOL[*m]).is_some() => {
                Some((key(&format!("m/{}", POOL[*m])), None))
            }
            Step::Request(n, majority) => {
                let live: Vec<&str> = POOL
                    .iter()
                    .copied()
                    .filter(|member| join_of(&map, member).is_some())
                    .collect();
                match live.first() {
                    Some(requester) => {
                        let id = format!(
                            "{requester}:{}:{n}{}",
                            join_of(&map, requester).unwrap(),
                            votes.len()
                        );
                        votes.push(id.clone());
                        let kind = if *majority {
                            Kind::Majority
                        } else {
                            Kind::Consensus
                        };
                        Some((
                            key(&format!("v/{id}")),
                            Some(request_value(kind, 1000, &live.join(","), "t")),
                        ))
                    }
                    None => None,
                }
            }
            // A voter votes once (the library refuses a second ballot).
            Step::Ballot(voter, vote, yes) => votes
                .get(*vote)
                .filter(|id| !map.contains_key(&key(&format!("b/{id}/{}", POOL[*voter]))))
                .map(|id| {
                    (
                        key(&format!("b/{id}/{}", POOL[*voter])),
                        Some(if *yes { "yes" } else { "no" }.to_owned()),
                    )
                }),
            Step::CloseVote(vote) => votes
                .get(*vote)
                .filter(|id| map.contains_key(&key(&format!("v/{id}"))))
                .map(|id| (key(&format!("v/{id}")), None)),
            Step::Elsewhere => {
                sequence += 1;
                None
            }
            Step::Fence => POOL
                .iter()
                .filter_map(|member| join_of(&map, member))
                .min()
                .map(|token| (key(&format!("f/{token}")), Some("leader".to_owned()))),
            _ => None,
        };
        let Some((key, value)) = change else {
            continue;
        };
        sequence += 1;
        match value {
            Some(value) => {
                map.insert(key.clone(), (value.clone().into_bytes(), sequence));
                changes.push(Change::Set {
                    key,
                    value: value.into_bytes(),
                    sequence,
                });
            }
            None => {
                map.remove(&key);
                changes.push(Change::Delete { key, sequence });
            }
        }
        states.push((sequence, map.clone()));
    }
    History { changes, states }
}

/// What an observer knows at one evaluated sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    members: Vec<(String, i64)>,
    leader: Option<(String, i64)>,
}

fn facts(group: &Group) -> Facts {
    Facts {
        members: group
            .members()
            .map(|(member, join)| (member.to_owned(), join))
            .collect(),
        leader: group
            .leader()
            .map(|(member, token)| (member.to_owned(), token)),
    }
}

/// Runs an observer over the history; `jumps[i]`: reach state `i` by a re-sync rather
/// than its live change. Returns the facts at each evaluated sequence, and the events.
fn run(history: &History, jumps: &[bool]) -> (BTreeMap<i64, Facts>, Vec<Event>) {
    let mut group = observer();
    let mut seen = BTreeMap::new();
    let mut events = Vec::new();
    let count = history.changes.len();
    for index in 0..count {
        let jump = jumps.get(index).copied().unwrap_or(false);
        // A jump skips ahead: the following live changes up to the next non-jump are
        // folded into one re-sync at the last of them.
        if jump {
            let (sequence, state) = &history.states[index];
            group.handle_resync(
                Instant::ZERO,
                *sequence,
                state
                    .iter()
                    .map(|(key, (value, at))| (key.clone(), value.clone(), *at)),
            );
        } else {
            // A live change after a jump must follow the jumped-to state.
            let change = history.changes[index].clone();
            group.handle_change(Instant::ZERO, change);
        }
        seen.insert(group.sequence(), facts(&group));
        events.extend(drain(&mut group).0);
    }
    (seen, events)
}

/// A history with some of its states reached by skipping: the skipped changes are
/// never seen, the next state comes by re-sync.
fn run_skipping(history: &History, keep: &[bool]) -> (BTreeMap<i64, Facts>, Vec<Event>) {
    let mut group = observer();
    let mut seen = BTreeMap::new();
    let mut events = Vec::new();
    let mut skipped = false;
    for (index, change) in history.changes.iter().enumerate() {
        if !keep.get(index).copied().unwrap_or(true) {
            skipped = true;
            continue;
        }
        if skipped {
            let (sequence, state) = &history.states[index];
            group.handle_resync(
                Instant::ZERO,
                *sequence,
                state
                    .iter()
                    .map(|(key, (value, at))| (key.clone(), value.clone(), *at)),
            );
            skipped = false;
        } else {
            group.handle_change(Instant::ZERO, change.clone());
        }
        seen.insert(group.sequence(), facts(&group));
        events.extend(drain(&mut group).0);
    }
    (seen, events)
}

fn outcomes(events: &[Event]) -> BTreeMap<String, Vec<Outcome>> {
    let mut outcomes: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    for event in events {
        if let Event::VoteDecided(decision) = event {
            outcomes
                .entry(decision.request.id.clone())
                .or_default()
                .push(decision.outcome);
        }
    }
    outcomes
}

fn tokens(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::LeaderElected { token, .. } => Some(*token),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The same history gives the same members and leader at every sequence, and the
    /// same vote results, whether each change is fed live or states are reached by
    /// re-syncs that skip changes.
    #[test]
    fn every_batching_of_a_history_agrees(
        steps in prop::collection::vec(step(), 1..80),
        keep in prop::collection::vec(prop::bool::weighted(0.7), 80),
        resync_each in prop::collection::vec(any::<bool>(), 80),
    ) {
        let history = build(&steps);
        let (live, live_events) = run(&history, &[]);
        for (skipping, skipping_events) in [
            run_skipping(&history, &keep),
            run(&history, &resync_each),
        ] {
            for (sequence, facts) in &skipping {
                prop_assert_eq!(Some(facts), live.get(sequence), "at sequence {}", sequence);
            }
            let live_outcomes = outcomes(&live_events);
            for (vote, decided) in outcomes(&skipping_events) {
                prop_assert_eq!(decided.len(), 1, "{} decided twice", vote);
                if decided[0] != Outcome::Unknown {
                    prop_assert_eq!(Some(&decided), live_outcomes.get(&vote), "vote {}", vote);
                }
            }
        }
        // Re-syncs at every sequence see every state: every vote is decided, the same
        // way, except a close inside a jump over a change elsewhere (unknown).
        let (_, all_resync_events) = run(&history, &[true; 80]);
        let live_outcomes = outcomes(&live_events);
        let resync_outcomes = outcomes(&all_resync_events);
        prop_assert_eq!(resync_outcomes.keys().collect::<Vec<_>>(), live_outcomes.keys().collect::<Vec<_>>());
        for (vote, decided) in resync_outcomes {
            if decided != [Outcome::Unknown] {
                prop_assert_eq!(Some(&decided), live_outcomes.get(&vote), "vote {}", vote);
            }
        }
    }

    /// Within a history the fencing token only grows, a vote is decided once, and a
    /// follower of the whole stream never reports `unknown`.
    #[test]
    fn tokens_grow_and_decisions_stand(steps in prop::collection::vec(step(), 1..120)) {
        let history = build(&steps);
        let (_, events) = run(&history, &[]);
        let tokens = tokens(&events);
        prop_assert!(tokens.windows(2).all(|pair| pair[0] < pair[1]), "tokens {:?}", tokens);
        for (vote, decided) in outcomes(&events) {
            prop_assert_eq!(decided.len(), 1, "{} decided twice", vote);
            prop_assert_ne!(decided[0], Outcome::Unknown);
        }
    }
}

#[test]
fn a_member_with_a_prompt_stream_refreshes_every_interval() {
    let mut group = Group::new(Config::member(G, "a")).unwrap();
    group.join(Instant::ZERO).unwrap();
    let mut sequence = 0;
    let mut refreshes = Vec::new();
    for millis in (0..10_000).step_by(10) {
        let now = Instant::from_millis(millis);
        if group.poll_timeout().is_some_and(|due| due <= now) {
            group.handle_timeout(now);
        }
        for (written, value, _) in drain(&mut group).1 {
            sequence += 1;
            if sequence > 1 && written == key("m/a") {
                refreshes.push(millis);
            }
            let key = written;
            // The echo comes back at once.
            group.handle_change(
                now,
                Change::Set {
                    key,
                    value: value.unwrap(),
                    sequence,
                },
            );
        }
    }
    assert_eq!(
        refreshes,
        (1..10).map(|second| second * 1000).collect::<Vec<u64>>()
    );
}

#[test]
fn a_key_brought_back_from_before_the_fence_cannot_lead_and_its_member_rejoins() {
    // b leads after a's key expired, and writes its token as the fence.
    let mut b = Group::new(Config::member(G, "b")).unwrap();
    b.join(Instant::ZERO).unwrap();
    drain(&mut b);
    for change in [set("m/a", "0", 5), set("m/b", "0", 7), delete("m/a", 9)] {
        b.handle_change(Instant::ZERO, change);
    }
    assert!(b.is_leader());
    let (_, writes) = drain(&mut b);
    assert_eq!(writes, [(key("f/7"), Some(b"b".to_vec()), None)]);

    // a's refresh, queued while it was cut off, lands after the fence: a is a member
    // again but cannot lead; b stays leader with its token.
    let mut observer = observer();
    let history = [
        set("m/a", "0", 5),
        set("m/b", "0", 7),
        delete("m/a", 9),
        set("f/7", "b", 10),
        set("m/a", "5", 11),
    ];
    let events = feed(&mut observer, history.clone());
    assert_eq!(observer.leader(), Some(("b", 7)));
    assert_eq!(observer.fence(), 7);
    assert!(observer
        .members()
        .any(|(member, join)| member == "a" && join == 5));
    assert_eq!(tokens(&events), [5, 7]);

    // a itself sees its old join below the fence and joins afresh.
    let mut a = Group::new(Config::member(G, "a")).unwrap();
    a.join(Instant::ZERO).unwrap();
    a.handle_change(Instant::ZERO, set("m/a", "0", 5));
    drain(&mut a);
    a.handle_resync(
        Instant::from_millis(5000),
        11,
        [
            (key("m/a"), b"5".to_vec(), 11),
            (key("m/b"), b"0".to_vec(), 7),
            (key("f/7"), b"b".to_vec(), 10),
        ],
    );
    assert!(!a.is_leader());
    let (_, writes) = drain(&mut a);
    assert_eq!(
        writes,
        [(
            key("m/a"),
            Some(b"0".to_vec()),
            Some(Duration::from_secs(3))
        )]
    );
}
