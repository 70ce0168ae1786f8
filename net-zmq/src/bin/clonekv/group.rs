//! `clonekv group ...`: join a group, show it, request a vote, cast a ballot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use clonekv_zmq::client::Client;
use clonekv_zmq::core::group::{prefix, validate_name};
use clonekv_zmq::duration::HumanDuration;
use clonekv_zmq::group::{Decision, Event, Group, GroupCallError, GroupOptions, Kind, Request};
use serde_json::{json, Value};

use crate::show::text;
use crate::{Failure, Output, EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE};

#[derive(Args, Debug)]
pub struct GroupArgs {
    #[command(subcommand)]
    pub command: GroupCommand,
}

/// The group timing every member of a group should share (RIAPS's defaults).
#[derive(Args, Debug, Clone)]
pub struct Timing {
    /// A member is gone this long after its process dies (its key's ttl).
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    lease: HumanDuration,
    /// How often a member renews its lease.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    refresh: HumanDuration,
    /// Fewer members than this: no leader and no vote (every member must agree on it).
    #[arg(long, value_name = "N", default_value_t = 1)]
    min_size: usize,
}

impl Timing {
    fn options(&self) -> GroupOptions {
        GroupOptions {
            lease: self.lease.get(),
            refresh: self.refresh.get(),
            min_size: self.min_size,
            ..GroupOptions::default()
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    /// Yes wins with n/2+1 yes ballots of the n voters.
    Majority,
    /// Yes wins only if every voter says yes.
    Consensus,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BallotArg {
    Yes,
    No,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Join group NAME and stay in it, printing its events (members, leader, votes,
    /// messages), until Ctrl-C (which leaves the group).
    Join {
        /// The group.
        name: String,
        /// This member's id (A-Z a-z 0-9 . _ -; default: the host name and process id).
        #[arg(long)]
        id: Option<String>,
        /// Answer every vote this member is asked with this ballot.
        #[arg(long, value_name = "yes|no")]
        auto_vote: Option<BallotArg>,
        #[command(flatten)]
        timing: Timing,
    },
    /// Show group NAME: members and join sequences, the leader and its fencing token,
    /// open votes.
    Status {
        /// The group.
        name: String,
        #[command(flatten)]
        timing: Timing,
    },
    /// Ask the members of NAME to vote on TOPIC and print the result (yes, no or
    /// timeout) once decided.
    Vote {
        /// The group.
        name: String,
        /// What the vote is about.
        topic: String,
        /// The rule.
        #[arg(long, value_enum, default_value = "majority")]
        kind: KindArg,
        /// The vote closes undecided (result: timeout) after this long.
        #[arg(long = "vote-timeout", value_name = "DURATION", default_value = "5s")]
        vote_timeout: HumanDuration,
        /// The requester's id (not a member: it does not vote).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        timing: Timing,
    },
    /// Cast member ID's ballot in the open vote VOTE of group NAME.
    Ballot {
        /// The group.
        name: String,
        /// The vote's id (as `group vote`, `group status` or `group join` print it).
        vote: String,
        /// The ballot.
        ballot: BallotArg,
        /// The voting member.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        timing: Timing,
    },
    /// Send MESSAGE to the members of NAME: every member (default), the leader as of
    /// the message's sequence (`--to @leader`) or one member (`--to ID`); `group join`
    /// prints what its member receives.
    Send {
        /// The group.
        name: String,
        /// The message.
        message: String,
        /// `*` (every member but the sender), `@leader` or a member id.
        #[arg(long, default_value = "*")]
        to: String,
        /// The sender's id (default: cli and the process id).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        timing: Timing,
    },
    /// Measure leader change and vote latency of a three-member group (in this
    /// process, default timings) on the servers, next to a commit round trip measured
    /// in the same run and RIAPS's default timings.
    Bench {
        /// Votes (and commit round trips) to measure.
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        votes: u64,
        /// Leader crashes (and as many graceful leaves) to measure; each costs about a
        /// lease.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        crashes: u64,
    },
}

impl GroupCommand {
    /// The group named on the command line (the bench makes its own).
    pub fn name(&self) -> Option<&str> {
        match self {
            GroupCommand::Join { name, .. }
            | GroupCommand::Status { name, .. }
            | GroupCommand::Vote { name, .. }
            | GroupCommand::Ballot { name, .. }
            | GroupCommand::Send { name, .. } => Some(name),
            GroupCommand::Bench { .. } => None,
        }
    }

    /// Checks the arguments before anything connects.
    pub fn check(&self) -> Result<(), Failure> {
        let usage = |error: String| Failure::new(EXIT_USAGE, error);
        if let Some(name) = self.name() {
            validate_name(name).map_err(|error| usage(error.to_string()))?;
        }
        match self {
            GroupCommand::Join { id: Some(id), .. }
            | GroupCommand::Vote { id: Some(id), .. }
            | GroupCommand::Send { id: Some(id), .. }
            | GroupCommand::Ballot { id, .. } => {
                validate_name(id).map_err(|error| usage(format!("--id: {error}")))?;
            }
            _ => {}
        }
        if let GroupCommand::Send { to, .. } = self {
            if to != "*" && to != "@leader" {
                validate_name(to).map_err(|error| usage(format!("--to: {error}")))?;
            }
        }
        Ok(())
    }

    /// The subtree the client must follow.
    pub fn subtree(&self) -> String {
        self.name()
            .map(|name| String::from_utf8_lossy(&prefix(name)).into_owned())
            .unwrap_or_default()
    }
}

fn failure(error: GroupCallError) -> Failure {
    let status = match &error {
        GroupCallError::Group(_) | GroupCallError::OutsideSubtree { .. } => EXIT_USAGE,
        GroupCallError::JoinTimeout { .. } => EXIT_UNAVAILABLE,
        _ => EXIT_FAILURE,
    };
    Failure::new(status, error.to_string())
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(40)
        .collect();
    if host.is_empty() {
        format!("m{}", std::process::id())
    } else {
        format!("{host}-{}", std::process::id())
    }
}

pub fn run(
    client: &Client,
    command: &GroupCommand,
    out: &mut Output,
    json: bool,
    timeout: Duration,
) -> Result<(), Failure> {
    match command {
        // Run before the client connects (main.rs), with the servers' builder.
        GroupCommand::Bench { .. } => Ok(()),
        GroupCommand::Join {
            name,
            id,
            auto_vote,
            timing,
        } => {
            let id = id.clone().unwrap_or_else(default_id);
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|error| {
                    Failure::new(EXIT_FAILURE, format!("cannot handle Ctrl-C: {error}"))
                })?;
            }
            let group = client.join(name, &id, timing.options()).map_err(failure)?;
            while !stop.load(Ordering::SeqCst) && !out.closed {
                let Some(event) = group.next_event(Duration::from_millis(100)) else {
                    continue;
                };
                if let (Some(ballot), Event::VoteRequested(request)) = (auto_vote, &event) {
                    if request.voters.contains(&id) {
                        if let Err(error) = group.vote(&request.id, *ballot == BallotArg::Yes) {
                            eprintln!("clonekv: cannot vote in {}: {error}", request.id);
                        }
                    }
                }
                print_event(out, json, &event);
            }
            group.leave().map_err(failure)
        }
        GroupCommand::Status { name, timing } => {
            let group = client.observe(name, timing.options()).map_err(failure)?;
            print_status(out, json, name, &group);
            Ok(())
        }
        GroupCommand::Vote {
            name,
            topic,
            kind,
            vote_timeout,
            id,
            timing,
        } => {
            let id = id
                .clone()
                .unwrap_or_else(|| format!("cli{}", std::process::id()));
            let group = client
                .act_as(name, &id, timing.options())
                .map_err(failure)?;
            let kind = match kind {
                KindArg::Majority => Kind::Majority,
                KindArg::Consensus => Kind::Consensus,
            };
            let vote = group
                .request_vote(topic.as_bytes(), kind, vote_timeout.get())
                .map_err(failure)?;
            // The decision comes at the latest when the request expires; give the
            // servers --timeout more to publish that.
            let deadline = Instant::now() + vote_timeout.get() + timeout;
            while Instant::now() < deadline {
                if let Some(decision) = group.decision(&vote) {
                    print_decision(out, json, &decision);
                    return Ok(());
                }
                group.next_event(Duration::from_millis(20));
            }
            Err(Failure::new(
                EXIT_UNAVAILABLE,
                format!("vote {vote} was not seen decided within its timeout and --timeout"),
            ))
        }
        GroupCommand::Send {
            name,
            message,
            to,
            id,
            timing,
        } => {
            let id = id
                .clone()
                .unwrap_or_else(|| format!("cli{}", std::process::id()));
            let group = client
                .act_as(name, &id, timing.options())
                .map_err(failure)?;
            let payload = message.as_bytes();
            match to.as_str() {
                "*" => group.send(payload),
                "@leader" => group.send_to_leader(payload),
                member => group.send_to_member(member, payload),
            }
            .map_err(failure)?;
            if json {
                out.json(json!({"sent": message, "to": to, "from": id}));
            } else {
                out.line(&format!("sent to {to}"));
            }
            drop(group);
            Ok(())
        }
        GroupCommand::Ballot {
            name,
            vote,
            ballot,
            id,
            timing,
        } => {
            let group = client.act_as(name, id, timing.options()).map_err(failure)?;
            if let Some(decision) = group.decision(vote) {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!("vote {vote} is already decided: {}", decision.outcome),
                ));
            }
            group
                .vote(vote, *ballot == BallotArg::Yes)
                .map_err(failure)?;
            if json {
                out.json(json!({"ballot": vote, "member": id, "yes": *ballot == BallotArg::Yes}));
            } else {
                out.line(&format!("{id} voted {ballot:?} in {vote}").to_lowercase());
            }
            // Let the write go out before the client stops (the linger also covers it).
            drop(group);
            Ok(())
        }
    }
}

fn print_status(out: &mut Output, json: bool, name: &str, group: &Group) {
    let members = group.members();
    let leader = group.leader();
    let votes = group.open_votes();
    if json {
        out.json(json!({
            "group": name,
            "sequence": group.sequence(),
            "size": members.len(),
            "members": members.iter().map(|(member, join)| json!({"member": member, "join": join})).collect::<Vec<_>>(),
            "leader": leader.as_ref().map(|(member, _)| member),
            "fencing_token": leader.as_ref().map(|(_, token)| token),
            "fence": group.fence(),
            "open_votes": votes.iter().map(request_json).collect::<Vec<_>>(),
        }));
        return;
    }
    out.line(&format!(
        "group {name}: {} members at sequence {}",
        members.len(),
        group.sequence()
    ));
    for (member, join) in &members {
        let mark = if leader.as_ref().is_some_and(|(leader, _)| leader == member) {
            "  (leader)"
        } else {
            ""
        };
        out.line(&format!("  {member}\tjoined at {join}{mark}"));
    }
    match leader {
        Some((member, token)) => out.line(&format!(
            "leader: {member}, fencing token {token} (fence {})",
            group.fence()
        )),
        None => out.line("leader: none"),
    }
    for request in votes {
        out.line(&format!(
            "open vote {} ({}, voters {}): {}",
            request.id,
            request.kind,
            request.voters.join(","),
            text(&request.topic)
        ));
    }
}

fn request_json(request: &Request) -> Value {
    json!({
        "vote": request.id,
        "requester": request.requester,
        "kind": request.kind.as_str(),
        "timeout_ms": u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX),
        "voters": request.voters,
        "topic": String::from_utf8_lossy(&request.topic),
        "sequence": request.sequence,
    })
}

fn print_decision(out: &mut Output, json: bool, decision: &Decision) {
    if json {
        out.json(json!({
            "event": "vote_decided",
            "vote": decision.request.id,
            "result": decision.outcome.as_str(),
            "yes": decision.yes,
            "no": decision.no,
            "sequence": decision.sequence,
        }));
    } else {
        out.line(decision.outcome.as_str());
    }
}

fn print_event(out: &mut Output, json: bool, event: &Event) {
    if json {
        let value = match event {
            Event::MemberJoined {
                member,
                join,
                sequence,
            } => {
                json!({"event": "member_joined", "member": member, "join": join, "sequence": sequence})
            }
            Event::MemberLeft { member, sequence } => {
                json!({"event": "member_left", "member": member, "sequence": sequence})
            }
            Event::LeaderElected {
                member,
                token,
                sequence,
            } => {
                json!({"event": "leader_elected", "member": member, "token": token, "sequence": sequence})
            }
            Event::LeaderExited {
                member,
                token,
                sequence,
            } => {
                json!({"event": "leader_exited", "member": member, "token": token, "sequence": sequence})
            }
            Event::VoteRequested(request) => {
                let mut value = request_json(request);
                if let Some(object) = value.as_object_mut() {
                    object.insert("event".into(), "vote_requested".into());
                }
                value
            }
            Event::VoteDecided(decision) => {
                print_decision(out, true, decision);
                return;
            }
            Event::Message {
                from,
                to,
                payload,
                sequence,
            } => json!({
                "event": "message",
                "from": from,
                "to": to.to_string(),
                "payload": String::from_utf8_lossy(payload),
                "sequence": sequence,
            }),
        };
        out.json(value);
        return;
    }
    let line = match event {
        Event::MemberJoined {
            member,
            join,
            sequence,
        } => format!("member-joined {member} join={join} sequence={sequence}"),
        Event::MemberLeft { member, sequence } => {
            format!("member-left {member} sequence={sequence}")
        }
        Event::LeaderElected {
            member,
            token,
            sequence,
        } => format!("leader-elected {member} token={token} sequence={sequence}"),
        Event::LeaderExited {
            member,
            token,
            sequence,
        } => format!("leader-exited {member} token={token} sequence={sequence}"),
        Event::VoteRequested(request) => format!(
            "vote-requested {} kind={} voters={} topic={}",
            request.id,
            request.kind,
            request.voters.join(","),
            text(&request.topic)
        ),
        Event::VoteDecided(decision) => format!(
            "vote-decided {} result={} yes={} no={} sequence={}",
            decision.request.id, decision.outcome, decision.yes, decision.no, decision.sequence
        ),
        Event::Message {
            from, to, payload, ..
        } => format!("message from={from} to={to} {}", text(payload)),
    };
    out.line(&line);
}
