//! Groups end to end: `clonekv group join` processes against a real pair agree on one
//! leader, replace a `kill -9`ed leader within the lease, decide votes by RIAPS's rules
//! (including a timeout), and keep a vote's result across a failover of the pair.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use clonekv_tests::{assert_success, stdout, Cluster, LineReader, Role, PATIENCE};
use clonekv_zmq::group::{Event, GroupOptions, Kind, Outcome};

/// The default lease (RIAPS's peer timeout): a dead member is gone this long after its
/// last renewal.
const LEASE: Duration = Duration::from_secs(3);

/// A `clonekv group join` process and its output.
struct Member {
    id: String,
    child: Child,
    lines: LineReader,
}

impl Member {
    fn join(cluster: &Cluster, group: &str, id: &str, auto_vote: Option<&str>) -> Member {
        let mut args = vec!["group", "join", group, "--id", id];
        if let Some(ballot) = auto_vote {
            args.extend(["--auto-vote", ballot]);
        }
        let mut child = cluster
            .cli_command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clonekv group join");
        let lines = LineReader::new(child.stdout.take().expect("join stdout"));
        Member {
            id: id.to_owned(),
            child,
            lines,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The leader as `group status --json` reports it: (member, fencing token).
fn status_leader(cluster: &Cluster, group: &str) -> (String, i64, usize) {
    let output = cluster.cli(&["--json", "group", "status", group]);
    assert_success(&output, "group status");
    let status: serde_json::Value =
        serde_json::from_str(stdout(&output).trim()).expect("status is one JSON object");
    (
        status["leader"].as_str().unwrap_or_default().to_owned(),
        status["fencing_token"].as_i64().unwrap_or(-1),
        status["size"].as_u64().unwrap_or(0) as usize,
    )
}

/// Waits until `group status` shows `size` members.
fn wait_for_size(cluster: &Cluster, group: &str, size: usize) -> (String, i64) {
    let deadline = Instant::now() + clonekv_tests::PATIENCE;
    loop {
        let (leader, token, seen) = status_leader(cluster, group);
        if seen == size {
            return (leader, token);
        }
        assert!(
            Instant::now() < deadline,
            "group {group} never had {size} members (last: {seen})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Requests a vote with the CLI and returns what it printed (yes, no or timeout).
fn vote(cluster: &Cluster, group: &str, topic: &str, kind: &str, timeout: &str) -> String {
    let output = cluster.cli(&[
        "group",
        "vote",
        group,
        topic,
        "--kind",
        kind,
        "--vote-timeout",
        timeout,
    ]);
    assert_success(&output, "group vote");
    stdout(&output).trim().to_owned()
}

#[test]
fn three_members_agree_on_one_leader_and_a_killed_leader_is_replaced_within_the_lease() {
    let cluster = Cluster::pair("group-leader");
    let mut members: Vec<Member> = ["m1", "m2", "m3"]
        .iter()
        .map(|id| Member::join(&cluster, "crew", id, None))
        .collect();
    let (leader, token) = wait_for_size(&cluster, "crew", 3);
    // Every member printed the same election, with the same token.
    let elected = format!("leader-elected {leader} token={token} ");
    for member in &mut members {
        member.lines.wait_for(&elected);
    }

    let index = members
        .iter()
        .position(|member| member.id == leader)
        .expect("the leader is one of ours");
    // A message to the leader reaches the leader's process.
    assert_success(
        &cluster.cli(&["group", "send", "crew", "status?", "--to", "@leader"]),
        "group send",
    );
    members[index].lines.wait_for("message from=cli");

    let killed_at = Instant::now();
    members[index].kill9();
    let survivors: Vec<&mut Member> = members
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, member)| member)
        .collect();
    let mut next = Vec::new();
    for member in survivors {
        let line = member.lines.wait_for("leader-elected ");
        next.push(
            line.split(" sequence=")
                .next()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let took = killed_at.elapsed();
    assert_eq!(next[0], next[1], "the survivors disagree: {next:?}");
    assert!(!next[0].contains(&format!(" {leader} ")), "{next:?}");
    let new_token: i64 = next[0]
        .rsplit("token=")
        .next()
        .and_then(|token| token.parse().ok())
        .expect("a token");
    assert!(
        new_token > token,
        "the fencing token went from {token} to {new_token}"
    );
    eprintln!("new leader {took:?} after kill -9 of the leader (lease {LEASE:?})");
    // The lease bounds it; the margin is for a loaded machine with debug builds.
    assert!(
        took < LEASE + Duration::from_secs(2),
        "a new leader took {took:?}"
    );
}

#[test]
fn majority_and_consensus_votes_give_riaps_results_including_a_timeout() {
    let cluster = Cluster::pair("group-votes");
    let _members = [
        Member::join(&cluster, "panel", "yes1", Some("yes")),
        Member::join(&cluster, "panel", "yes2", Some("yes")),
        Member::join(&cluster, "panel", "no1", Some("no")),
    ];
    wait_for_size(&cluster, "panel", 3);
    // 2 of 3 yes: a majority (3/2+1 = 2), not a consensus.
    assert_eq!(vote(&cluster, "panel", "lunch", "majority", "10s"), "yes");
    assert_eq!(vote(&cluster, "panel", "lunch", "consensus", "10s"), "no");

    // A fourth member that never votes: 2 yes and 1 no of 4 is neither a majority
    // (3 needed) nor out of reach, so the vote times out.
    let _silent = Member::join(&cluster, "panel", "silent", None);
    wait_for_size(&cluster, "panel", 4);
    assert_eq!(
        vote(&cluster, "panel", "dinner", "majority", "1s"),
        "timeout"
    );

    // A ballot in a vote that does not exist is a usage error that says so.
    let ballot = cluster.cli(&[
        "group",
        "ballot",
        "panel",
        "no-such-vote",
        "yes",
        "--id",
        "yes1",
    ]);
    assert_eq!(ballot.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&ballot.stderr);
    assert!(stderr.contains("no open vote"), "{stderr}");
}

#[test]
fn a_failover_of_the_pair_during_a_vote_changes_no_result() {
    let mut cluster = Cluster::pair("group-failover");
    let mut members = [
        Member::join(&cluster, "ha", "a", Some("yes")),
        Member::join(&cluster, "ha", "b", None),
        Member::join(&cluster, "ha", "c", None),
    ];
    wait_for_size(&cluster, "ha", 3);
    let requester = cluster
        .cli_command(&[
            "group",
            "vote",
            "ha",
            "upgrade",
            "--kind",
            "consensus",
            "--vote-timeout",
            "30s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start clonekv group vote");
    let requested = members[1].lines.wait_for("vote-requested ");
    let vote_id = requested
        .split_whitespace()
        .nth(1)
        .expect("a vote id")
        .to_owned();

    // The active dies with the vote open; the backup takes over.
    cluster.kill(Role::Primary);
    cluster
        .daemon(Role::Backup)
        .wait_for_log("failover: this server is now active");
    for id in ["b", "c"] {
        assert_success(
            &cluster.cli(&["group", "ballot", "ha", &vote_id, "yes", "--id", id]),
            "group ballot",
        );
    }
    let result = requester.wait_with_output().expect("group vote ends");
    assert!(
        result.status.success(),
        "group vote failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(stdout(&result).trim(), "yes");
    // Every member saw the same result. (A member that re-synced from the backup after
    // the last ballot learns it at the snapshot's sequence, so sequences may differ.)
    let decided: Vec<String> = members
        .iter_mut()
        .map(|member| member.lines.wait_for(&format!("vote-decided {vote_id} ")))
        .collect();
    assert!(
        decided
            .iter()
            .all(|line| line.contains(" result=yes yes=3 no=0 ")),
        "{decided:?}"
    );
}

#[test]
fn the_library_api_elects_votes_and_routes_messages_by_the_stream() {
    let cluster = Cluster::pair("group-library");
    let connect = || {
        let client = cluster
            .client()
            .subtree("/_group/lib/")
            .connect()
            .expect("connect");
        client.wait_synced(PATIENCE).expect("synced");
        client
    };
    let (first_client, second_client) = (connect(), connect());
    let first = first_client
        .join("lib", "first", GroupOptions::default())
        .expect("join");
    let first_join = first.wait_joined(PATIENCE).expect("first joined");
    let second = second_client
        .join("lib", "second", GroupOptions::default())
        .expect("join");
    let second_join = second.wait_joined(PATIENCE).expect("second joined");
    assert!(first_join < second_join);
    clonekv_tests::wait_until("both see two members", || {
        first.size() == 2 && second.size() == 2
    });
    assert!(first.is_leader() && !second.is_leader());
    assert_eq!(second.leader(), Some(("first".to_owned(), first_join)));
    assert_eq!(second.fencing_token(), Some(first_join));
    assert_eq!(
        second.members(),
        [
            ("first".to_owned(), first_join),
            ("second".to_owned(), second_join)
        ]
    );

    // Messages: to the leader (resolved at the message's sequence), to one member.
    second.send_to_leader(b"report").expect("send");
    first.send_to_member("second", b"order").expect("send");
    let received = |group: &clonekv_zmq::group::Group, payload: &[u8]| loop {
        match group.next_event(PATIENCE) {
            Some(Event::Message { payload: got, .. }) if got == payload => return,
            Some(_) => continue,
            None => panic!("no message {payload:?}"),
        }
    };
    received(&first, b"report");
    received(&second, b"order");

    // A consensus vote both answer yes.
    let vote = second
        .request_vote(b"ship it", Kind::Consensus, Duration::from_secs(30))
        .expect("request");
    clonekv_tests::wait_until("both see the vote open", || {
        !first.open_votes().is_empty() && !second.open_votes().is_empty()
    });
    first.vote(&vote, true).expect("vote");
    second.vote(&vote, true).expect("vote");
    clonekv_tests::wait_until("both see it decided", || {
        first.decision(&vote).is_some() && second.decision(&vote).is_some()
    });
    assert_eq!(first.decision(&vote), second.decision(&vote));
    assert_eq!(first.decision(&vote).map(|d| d.outcome), Some(Outcome::Yes));

    // The leader leaves: the other leads at once, with a larger token.
    first.leave().expect("leave");
    clonekv_tests::wait_until("second leads", || second.is_leader());
    assert_eq!(second.fencing_token(), Some(second_join));
}
