//! `clonekv group bench`: leader change and vote latency of a three-member group on a
//! running pair, with the default timings, next to a commit round trip measured in the
//! same run and RIAPS's default timings (see docs/PERFORMANCE.md).

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, ClientBuilder};
use clonekv_zmq::core::group::prefix;
use clonekv_zmq::group::{Event, GroupOptions, Kind, Outcome};
use serde_json::json;

use crate::{Failure, Output, EXIT_FAILURE, EXIT_UNAVAILABLE};

/// RIAPS's defaults (its coordination module's configuration), for the table.
const RIAPS_PEER_TIMEOUT: Duration = Duration::from_secs(3);
const RIAPS_ELECTION_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(1500), Duration::from_millis(2000));
const RIAPS_CONSENSUS_TIMEOUT: Duration = Duration::from_millis(1500);

enum ToMember {
    Crash,
    Leave,
}

/// A member in its own thread: it votes yes to every request and reports elections.
struct Member {
    id: String,
    commands: Sender<ToMember>,
    thread: Option<JoinHandle<()>>,
}

impl Member {
    fn stop(&mut self, how: ToMember) {
        let _ = self.commands.send(how);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop(ToMember::Leave);
    }
}

fn fail(what: &str, error: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_FAILURE, format!("{what}: {error}"))
}

fn connect(builder: &ClientBuilder, subtree: &[u8], timeout: Duration) -> Result<Client, Failure> {
    let client = builder
        .clone()
        .subtree(subtree.to_vec())
        .connect()
        .map_err(|error| fail("connect", error))?;
    client
        .wait_synced(timeout)
        .map_err(|error| Failure::new(EXIT_UNAVAILABLE, error.to_string()))?;
    Ok(client)
}

fn start_member(
    builder: &ClientBuilder,
    group: &str,
    id: &str,
    elections: Sender<(String, String, i64, Instant)>,
    timeout: Duration,
) -> Result<Member, Failure> {
    let client = connect(builder, &prefix(group), timeout)?;
    let handle = client
        .join(group, id, GroupOptions::default())
        .map_err(|error| fail("join", error))?;
    handle
        .wait_joined(timeout)
        .map_err(|error| fail("join", error))?;
    let (commands, inbox): (Sender<ToMember>, Receiver<ToMember>) = mpsc::channel();
    let me = id.to_owned();
    let thread = std::thread::spawn(move || {
        let _client = client;
        loop {
            match inbox.try_recv() {
                Ok(ToMember::Crash) => {
                    handle.abandon();
                    return;
                }
                Ok(ToMember::Leave) | Err(mpsc::TryRecvError::Disconnected) => {
                    let _ = handle.leave();
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            match handle.next_event(Duration::from_millis(5)) {
                Some(Event::VoteRequested(request)) if request.voters.contains(&me) => {
                    let _ = handle.vote(&request.id, true);
                }
                Some(Event::LeaderElected { member, token, .. }) => {
                    let _ = elections.send((me.clone(), member, token, Instant::now()));
                }
                _ => {}
            }
        }
    });
    Ok(Member {
        id: id.to_owned(),
        commands,
        thread: Some(thread),
    })
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn max(values: &[Duration]) -> Duration {
    values.iter().copied().max().unwrap_or_default()
}

/// Runs the bench; `builder` names the servers.
pub fn run(
    builder: &ClientBuilder,
    out: &mut Output,
    json_mode: bool,
    votes: usize,
    crashes: usize,
    timeout: Duration,
) -> Result<(), Failure> {
    let group = format!("bench-{}", std::process::id());
    let (elections_in, elections) = mpsc::channel();
    let mut members = Vec::new();
    let mut next_id = 0;
    for _ in 0..3 {
        next_id += 1;
        let id = format!("b{next_id}");
        members.push(start_member(
            builder,
            &group,
            &id,
            elections_in.clone(),
            timeout,
        )?);
    }
    let requester_client = connect(builder, &prefix(&group), timeout)?;
    let requester = requester_client
        .act_as(&group, "requester", GroupOptions::default())
        .map_err(|error| fail("requester", error))?;

    // Vote latency: a majority vote of three members that answer at once.
    let mut commits = Vec::new();
    let mut latencies = Vec::new();
    while requester.size() < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    for round in 0..votes {
        // The anchor, interleaved so that both see the same load: one commit round trip
        // (set, wait for the echo) on the same pair.
        let started = Instant::now();
        requester_client
            .set_confirmed(
                format!("{}anchor", String::from_utf8_lossy(&prefix(&group))),
                round.to_string(),
                Some(Duration::from_secs(5)),
                timeout,
            )
            .map_err(|error| fail("commit", error))?;
        commits.push(started.elapsed());
        let started = Instant::now();
        let vote = requester
            .request_vote(b"bench", Kind::Majority, Duration::from_secs(5))
            .map_err(|error| fail("vote", error))?;
        loop {
            if let Some(decision) = requester.decision(&vote) {
                if decision.outcome != Outcome::Yes {
                    return Err(fail("vote", format!("decided {}", decision.outcome)));
                }
                latencies.push(started.elapsed());
                break;
            }
            if started.elapsed() > timeout {
                return Err(fail("vote", "no decision in time"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    // Leader change: the leader's process stops renewing (a crash), or leaves.
    let mut after_crash = Vec::new();
    let mut after_leave = Vec::new();
    for round in 0..crashes * 2 {
        let crash = round % 2 == 0;
        let (leader, _) = requester
            .leader()
            .ok_or_else(|| fail("leader", "the group has no leader"))?;
        let index = members
            .iter()
            .position(|member| member.id == leader)
            .ok_or_else(|| fail("leader", format!("{leader} is not one of ours")))?;
        // Rounds follow each other on the refresh grid (a round starts when the last
        // one's new member is seen); a crash always at the same phase of the leader's
        // renewal would measure one point of the 2-3 s range. Spread the phases.
        let phase = GroupOptions::default().refresh.as_millis() as u64 * round as u64
            / (crashes as u64 * 2).max(1);
        std::thread::sleep(Duration::from_millis(100 + phase));
        while elections.try_recv().is_ok() {}
        let mut old = members.remove(index);
        let started = Instant::now();
        old.stop(if crash {
            ToMember::Crash
        } else {
            ToMember::Leave
        });
        // Every other member must have seen a new leader.
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < members.len() {
            let left = (timeout + RIAPS_PEER_TIMEOUT).saturating_sub(started.elapsed());
            let (member, elected, _, at) = elections
                .recv_timeout(left)
                .map_err(|_| fail("leader change", "no new leader in time"))?;
            if elected != leader {
                seen.insert(member);
                if seen.len() == members.len() {
                    let took = at.saturating_duration_since(started);
                    if crash {
                        after_crash.push(took);
                    } else {
                        after_leave.push(took);
                    }
                }
            }
        }
        next_id += 1;
        let id = format!("b{next_id}");
        members.push(start_member(
            builder,
            &group,
            &id,
            elections_in.clone(),
            timeout,
        )?);
        while requester.size() < 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = requester_client.delete(format!(
        "{}anchor",
        String::from_utf8_lossy(&prefix(&group))
    ));
    drop(members);

    let commit = median(&mut commits);
    let vote = median(&mut latencies);
    let crash = median(&mut after_crash);
    let leave = median(&mut after_leave);
    if json_mode {
        out.json(json!({
            "commit_round_trip_ms": commit.as_secs_f64() * 1e3,
            "vote_latency_ms": vote.as_secs_f64() * 1e3,
            "vote_latency_max_ms": max(&latencies).as_secs_f64() * 1e3,
            "leader_change_after_crash_ms": crash.as_secs_f64() * 1e3,
            "leader_change_after_crash_max_ms": max(&after_crash).as_secs_f64() * 1e3,
            "leader_change_after_leave_ms": leave.as_secs_f64() * 1e3,
            "votes": votes,
            "crashes": crashes,
        }));
        return Ok(());
    }
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    out.line("measure                               clonekv (median / max)        anchor");
    out.line(&format!(
        "commit round trip (set, echo)         {:<29} -",
        format!("{} / {}", ms(commit), ms(max(&commits)))
    ));
    out.line(&format!(
        "majority vote of 3, decided           {:<29} {:.1} commit round trips; RIAPS consensus timeout {} (default)",
        format!("{} / {}", ms(vote), ms(max(&latencies))),
        vote.as_secs_f64() / commit.as_secs_f64().max(1e-9),
        ms(RIAPS_CONSENSUS_TIMEOUT)
    ));
    out.line(&format!(
        "new leader after the leader crashed   {:<29} lease 3 s; RIAPS peer timeout {} + election timeout {}-{} (defaults)",
        format!("{} / {}", ms(crash), ms(max(&after_crash))),
        ms(RIAPS_PEER_TIMEOUT),
        ms(RIAPS_ELECTION_TIMEOUT.0),
        ms(RIAPS_ELECTION_TIMEOUT.1)
    ));
    out.line(&format!(
        "new leader after the leader left      {:<29} -",
        format!("{} / {}", ms(leave), ms(max(&after_leave)))
    ));
    Ok(())
}
