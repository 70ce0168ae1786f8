//! Groups under a seeded world: several members, each a real [`clonekv_core::group::Group`]
//! machine, on one ordered stream, with crashes, partitions and slow members; oracles
//! check after every step that the members agree.
//!
//! # The model
//!
//! The servers are modelled by a [`Sequencer`]: one order (the active's), a ttl per key
//! whose expiry is published as a delete at its own sequence, exactly what clonekv's
//! active does. The Binary Star pair and the clone agent are not in this world (the
//! cluster simulator, `world`, tests them); what is tested here is the group layer on the
//! stream they deliver: every member sees the published changes in order, each after its
//! own delay, or, after a partition, jumps to the state at a later sequence (the clone
//! agent's re-sync). A partitioned member's writes are lost (a cut connection). A
//! crashed member stops: its lease runs out; it may come back as a new incarnation.
//!
//! # Oracles (checked after every step)
//!
//! 1. Agreement: every member that evaluated sequence `s` computed the same members,
//!    leader and fencing token there, and the same as the truth computed from the
//!    sequencer's published state at `s` by this module's own rule.
//! 2. One leader per sequence (the truth has one, and every member agrees with it).
//! 3. The fencing token never decreases within one member's history; in worlds that
//!    queue a cut-off member's writes, a smaller token may be seen for at most a round
//!    trip (a late refresh landing before the new leader's fence, DECISIONS.md).
//! 4. A vote is decided at most once per member; every decision other than `unknown`
//!    equals the truth computed from the published history.
//! 5. Liveness: at the end, after every partition healed and a quiet period of a lease
//!    plus the largest delay, every live member sees the same leader, the earliest-joined
//!    live member; a crashed leader is replaced within its lease plus the delivery bound.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use clonekv_core::group::{Change, Config, Event, Group, Kind, Outcome, Output};
use clonekv_core::time::Instant;
use rand::RngExt;

use crate::{derive_rng, SimRng};

/// The group every member joins.
pub const GROUP: &str = "sim";

/// The world's knobs. Each says what real-world failure it models.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// Members (processes), 2..=6.
    pub members: usize,
    /// Length of the fault phase.
    pub fault_phase: Duration,
    /// Length of the quiet phase at the end (no new faults; partitions heal).
    pub heal_phase: Duration,
    /// Time step.
    pub tick: Duration,
    /// Largest delay from the sequencer to a member (a slow subscriber, a busy host).
    pub max_delay: Duration,
    /// Per tick and member: chance in a million that it crashes (`kill -9`).
    pub crash_per_million: u32,
    /// Per tick and member: chance in a million that it is cut from the servers (a
    /// partition of its host) for up to `max_partition`.
    pub partition_per_million: u32,
    /// Longest partition.
    pub max_partition: Duration,
    /// Per tick and member: chance in a million that it requests a vote.
    pub vote_per_million: u32,
    /// What a cut-off member writes waits and arrives when the cut heals (libzmq queues
    /// what a PUB sends while its connection is down) instead of being lost. A lease
    /// refresh can then arrive after its key expired.
    pub queue_writes_when_cut: bool,
    /// Pinned faults: at each time, the member that leads then (in its own view) is cut
    /// off for the given length.
    pub cut_the_leader: Vec<(Duration, Duration)>,
}

impl GroupOptions {
    /// The knobs drawn from a seed (swarm testing: some worlds are gentle, some harsh).
    pub fn from_seed(seed: u64) -> GroupOptions {
        let mut rng = derive_rng(seed, 0x6702);
        GroupOptions {
            members: rng.random_range(2..=6),
            fault_phase: Duration::from_secs(30),
            heal_phase: Duration::from_secs(10),
            tick: Duration::from_millis(10),
            max_delay: Duration::from_millis(rng.random_range(1..=400)),
            crash_per_million: rng.random_range(0..=300),
            partition_per_million: rng.random_range(0..=300),
            max_partition: Duration::from_millis(rng.random_range(100..=6_000)),
            vote_per_million: rng.random_range(500..=3_000),
            queue_writes_when_cut: rng.random_bool(0.5),
            cut_the_leader: Vec::new(),
        }
    }

    /// A quiet world (no random faults, no votes) for a scripted scenario.
    pub fn quiet(members: usize) -> GroupOptions {
        GroupOptions {
            members,
            fault_phase: Duration::from_secs(20),
            heal_phase: Duration::from_secs(10),
            tick: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            crash_per_million: 0,
            partition_per_million: 0,
            max_partition: Duration::from_secs(1),
            vote_per_million: 0,
            queue_writes_when_cut: true,
            cut_the_leader: Vec::new(),
        }
    }
}

/// A broken oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which oracle.
    pub oracle: &'static str,
    /// What it saw.
    pub detail: String,
    /// World time.
    pub at: Duration,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Sequences published.
    pub sequences: i64,
    /// Leader elections seen by members.
    pub elections: u64,
    /// Votes decided, by outcome (as members saw them).
    pub decided: BTreeMap<&'static str, u64>,
    /// Crashes, partitions, re-syncs.
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
    /// Re-syncs (jumps) members made.
    pub resyncs: u64,
    /// Lease refreshes that arrived after their key had expired and brought it back
    /// (queued writes).
    pub revivals: u64,
    /// Longest time from a leader's crash to a new leader seen by every live member.
    pub slowest_replacement: Duration,
    /// A hash of every event every member emitted, for the determinism check.
    pub trace: u64,
    /// The first broken oracle.
    pub violation: Option<Violation>,
}

/// The model of the active server: one order, ttl expiry as deletes.
#[derive(Default)]
struct Sequencer {
    sequence: i64,
    /// key -> (value, entry sequence, expiry).
    map: BTreeMap<Vec<u8>, (Vec<u8>, i64, Option<Instant>)>,
    /// Every published change, in order.
    log: Vec<Change>,
}

impl Sequencer {
    fn publish(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, expiry: Option<Instant>) {
        self.sequence += 1;
        let sequence = self.sequence;
        match value {
            Some(value) => {
                self.map
                    .insert(key.clone(), (value.clone(), sequence, expiry));
                self.log.push(Change::Set {
                    key,
                    value,
                    sequence,
                });
            }
            None => {
                self.map.remove(&key);
                self.log.push(Change::Delete { key, sequence });
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let due: Vec<Vec<u8>> = self
            .map
            .iter()
            .filter(|(_, (_, _, expiry))| expiry.is_some_and(|at| at <= now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.publish(key, None, None);
        }
    }
}

struct Member {
    id: String,
    incarnation: u32,
    machine: Option<Group>,
    /// Index of the next log entry to deliver, and when each becomes visible.
    next: usize,
    delay: Duration,
    /// Deliveries are visible at `published_at + delay`; log index -> time published.
    partitioned_until: Option<Instant>,
    /// After a partition: jump to the sequencer's state at this time.
    resync_at: Option<Instant>,
    /// Ballots to cast: (when, vote, yes).
    ballots: VecDeque<(Instant, String, bool)>,
    /// The largest fencing token this member has seen, and since when it has seen a
    /// smaller one (oracle 3).
    max_token: Option<i64>,
    regressed_since: Option<Instant>,
    /// Writes made while cut off, with queued delivery.
    queued: Vec<QueuedWrite>,
    decided: BTreeMap<String, Outcome>,
    restart_at: Option<Instant>,
}

/// A write waiting in a cut-off member's socket: key, value (`None`: delete), ttl.
type QueuedWrite = (Vec<u8>, Option<Vec<u8>>, Option<Duration>);

/// Facts a member computed at a sequence.
type Facts = (Vec<(String, i64)>, Option<(String, i64)>);

/// A seeded world of group members.
pub struct GroupWorld {
    options: GroupOptions,
    rng: SimRng,
    now: Instant,
    sequencer: Sequencer,
    /// When each log entry was published.
    published_at: Vec<Instant>,
    members: Vec<Member>,
    /// sequence -> facts, as the first member to evaluate it computed them.
    agreed: BTreeMap<i64, Facts>,
    truth_votes: BTreeMap<String, Outcome>,
    /// The published state, as the truth rebuilds it from the log.
    truth_state: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
    /// The truth's open votes, for the independent vote rule.
    truth_open: BTreeMap<String, (Kind, Vec<String>)>,
    /// A crashed leader: (member, token, crash time), until every live member sees
    /// another.
    crashed_leader: Option<((String, i64), Instant)>,
    report: Report,
    trace: u64,
}

impl GroupWorld {
    /// A world for `seed`.
    pub fn new(seed: u64, options: GroupOptions) -> GroupWorld {
        let mut rng = derive_rng(seed, 0x6701);
        let members = (0..options.members.clamp(2, 6))
            .map(|index| Member {
                id: format!("m{index}"),
                incarnation: 0,
                machine: None,
                next: 0,
                delay: Duration::from_millis(
                    rng.random_range(0..=options.max_delay.as_millis() as u64),
                ),
                partitioned_until: None,
                resync_at: None,
                ballots: VecDeque::new(),
                max_token: None,
                regressed_since: None,
                queued: Vec::new(),
                decided: BTreeMap::new(),
                restart_at: Some(
                    // Slow joiners: members start over the first two seconds.
                    Instant::ZERO + Duration::from_millis(rng.random_range(0..=2_000)),
                ),
            })
            .collect();
        GroupWorld {
            options,
            rng,
            now: Instant::ZERO,
            sequencer: Sequencer::default(),
            published_at: Vec::new(),
            members,
            agreed: BTreeMap::new(),
            truth_votes: BTreeMap::new(),
            truth_state: BTreeMap::new(),
            truth_open: BTreeMap::new(),
            crashed_leader: None,
            report: Report::default(),
            trace: 0xcbf2_9ce4_8422_2325,
        }
    }

    /// Runs the world to its end or its first violation.
    pub fn run(mut self) -> Report {
        let fault_end = Instant::ZERO + self.options.fault_phase;
        let end = fault_end + self.options.heal_phase;
        while self.now < end && self.report.violation.is_none() {
            self.now += self.options.tick;
            let faults = self.now < fault_end;
            self.step(faults);
        }
        if self.report.violation.is_none() {
            self.check_liveness();
        }
        self.report.sequences = self.sequencer.sequence;
        self.report.trace = self.trace;
        self.report
    }

    fn violation(&mut self, oracle: &'static str, detail: String) {
        if self.report.violation.is_none() {
            self.report.violation = Some(Violation {
                oracle,
                detail,
                at: self.now.saturating_duration_since(Instant::ZERO),
            });
        }
    }

    fn step(&mut self, faults: bool) {
        let now = self.now;
        let pinned: Vec<Duration> = self
            .options
            .cut_the_leader
            .iter()
            .filter(|(at, _)| Instant::ZERO + *at == now)
            .map(|(_, length)| *length)
            .collect();
        for length in pinned {
            let leader = self.members.iter_mut().find(|member| {
                member.partitioned_until.is_none()
                    && member.machine.as_ref().is_some_and(Group::is_leader)
            });
            if let Some(leader) = leader {
                leader.partitioned_until = Some(now + length);
                self.report.partitions += 1;
            }
        }
        // Faults and restarts.
        for index in 0..self.members.len() {
            if faults {
                let crash = self.rng.random_range(0..1_000_000) < self.options.crash_per_million;
                let cut = self.rng.random_range(0..1_000_000) < self.options.partition_per_million;
                let member = &mut self.members[index];
                if crash && member.machine.is_some() {
                    self.crash(index);
                } else if cut && member.machine.is_some() && member.partitioned_until.is_none() {
                    let length = self
                        .rng
                        .random_range(1..=self.options.max_partition.as_millis() as u64);
                    self.members[index].partitioned_until =
                        Some(now + Duration::from_millis(length));
                    self.report.partitions += 1;
                }
            }
            let member = &mut self.members[index];
            if member
                .partitioned_until
                .is_some_and(|until| until <= now || !faults)
            {
                member.partitioned_until = None;
                member.resync_at = Some(now + member.delay);
                // What waited in the sockets arrives first.
                for (key, value, ttl) in std::mem::take(&mut member.queued) {
                    let member_key = format!("/_group/{GROUP}/m/").into_bytes();
                    if key.starts_with(&member_key)
                        && value.as_deref().is_some_and(|value| value != b"0")
                        && !self.sequencer.map.contains_key(&key)
                    {
                        self.report.revivals += 1;
                    }
                    self.sequencer.publish(key, value, ttl.map(|ttl| now + ttl));
                }
            }
            if member.restart_at.is_some_and(|at| at <= now) {
                self.start(index);
            }
        }
        // The sequencer: expiries, then what reached it.
        self.sequencer.expire(now);
        self.catch_up_published();
        // Members: deliveries, timers, workload.
        for index in 0..self.members.len() {
            self.deliver(index);
            if let Some(machine) = self.members[index].machine.as_mut() {
                if machine.poll_timeout().is_some_and(|due| due <= now) {
                    machine.handle_timeout(now);
                }
            }
            if faults {
                self.workload(index);
            }
            self.drain(index);
            if self.report.violation.is_some() {
                return;
            }
        }
        self.check_replacement();
        self.check_regressions();
    }

    /// Oracle 3 with queued writes: a late refresh can bring an old join back only until
    /// the fence the newer leader wrote arrives (its election seen, its write, its
    /// delivery): a smaller token may be seen that long at most.
    fn check_regressions(&mut self) {
        let bound = self.options.max_delay * 2 + self.options.tick * 20;
        let now = self.now;
        let late = self.members.iter().find(|member| {
            member
                .regressed_since
                .is_some_and(|since| now.saturating_duration_since(since) > bound)
        });
        if let Some(member) = late {
            let detail = format!(
                "{} has seen a token below {:?} for longer than {bound:?}",
                member.id, member.max_token
            );
            self.violation("3 fencing token monotone", detail);
        }
    }

    fn catch_up_published(&mut self) {
        while self.published_at.len() < self.sequencer.log.len() {
            let index = self.published_at.len();
            self.published_at.push(self.now);
            self.update_truth(index);
        }
    }

    fn start(&mut self, index: usize) {
        let state = self.state_now();
        let id = self.members[index].id.clone();
        let mut machine = match Group::new(Config::member(GROUP, &id)) {
            Ok(machine) => machine,
            Err(error) => {
                let detail = format!("cannot make a member: {error}");
                self.violation("setup", detail);
                return;
            }
        };
        // A fresh process re-syncs first (the clone agent's snapshot), then joins.
        machine.handle_resync(self.now, self.sequencer.sequence, state);
        let _ = machine.join(self.now);
        let member = &mut self.members[index];
        member.restart_at = None;
        member.incarnation += 1;
        member.next = self.sequencer.log.len();
        member.machine = Some(machine);
        member.max_token = None;
        member.regressed_since = None;
        member.queued.clear();
        member.decided.clear();
        member.ballots.clear();
        self.drain(index);
    }

    fn crash(&mut self, index: usize) {
        let member = &mut self.members[index];
        let leader = member
            .machine
            .as_ref()
            .filter(|machine| machine.is_leader())
            .and_then(|machine| machine.leader())
            .map(|(id, token)| (id.to_owned(), token));
        member.machine = None;
        member.partitioned_until = None;
        member.resync_at = None;
        member.restart_at = Some(self.now + Duration::from_secs(2));
        self.report.crashes += 1;
        if let (Some(leader), None) = (leader, &self.crashed_leader) {
            self.crashed_leader = Some((leader, self.now));
        }
    }

    fn state_now(&self) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
        self.sequencer
            .map
            .iter()
            .map(|(key, (value, sequence, _))| (key.clone(), value.clone(), *sequence))
            .collect()
    }

    /// Delivers what is visible to member `index` now.
    fn deliver(&mut self, index: usize) {
        let now = self.now;
        let sequence = self.sequencer.sequence;
        let state = self.state_now();
        let log_len = self.sequencer.log.len();
        let member = &mut self.members[index];
        let Some(machine) = member.machine.as_mut() else {
            return;
        };
        if member.partitioned_until.is_some() {
            return;
        }
        if member.resync_at.is_some_and(|at| at <= now) {
            member.resync_at = None;
            machine.handle_resync(now, sequence, state);
            member.next = log_len;
            self.report.resyncs += 1;
            return;
        }
        if member.resync_at.is_some() {
            return;
        }
        while member.next < log_len {
            let visible = self.published_at[member.next] + member.delay;
            if visible > now {
                break;
            }
            machine.handle_change(now, self.sequencer.log[member.next].clone());
            member.next += 1;
        }
    }

    fn workload(&mut self, index: usize) {
        let now = self.now;
        let ask = self.rng.random_range(0..1_000_000) < self.options.vote_per_million;
        let majority = self.rng.random_bool(0.5);
        let timeout = Duration::from_millis(self.rng.random_range(300..=3_000));
        let member = &mut self.members[index];
        let Some(machine) = member.machine.as_mut() else {
            return;
        };
        if ask && member.partitioned_until.is_none() {
            let kind = if majority {
                Kind::Majority
            } else {
                Kind::Consensus
            };
            let _ = machine.request_vote(b"topic", kind, timeout);
        }
        while member.ballots.front().is_some_and(|(at, _, _)| *at <= now) {
            if let Some((_, vote, yes)) = member.ballots.pop_front() {
                let _ = machine.vote(&vote, yes);
            }
        }
    }

    /// Carries out member `index`'s outputs and checks its events.
    fn drain(&mut self, index: usize) {
        let now = self.now;
        let mut outputs = Vec::new();
        if let Some(machine) = self.members[index].machine.as_mut() {
            while let Some(output) = machine.poll_output() {
                outputs.push(output);
            }
        }
        let cut = self.members[index].partitioned_until.is_some();
        for output in outputs {
            match output {
                Output::Write { key, value, ttl } => {
                    if !cut {
                        let expiry = ttl.map(|ttl| now + ttl);
                        self.sequencer.publish(key, value, expiry);
                    } else if self.options.queue_writes_when_cut {
                        self.members[index].queued.push((key, value, ttl));
                    }
                }
                Output::Event(event) => self.on_event(index, event),
            }
        }
        self.catch_up_published();
        self.check_facts(index);
    }

    fn on_event(&mut self, index: usize, event: Event) {
        self.trace = fnv(self.trace, format!("{index}:{event:?}").as_bytes());
        match event {
            Event::LeaderElected { token, member, .. } => {
                self.report.elections += 1;
                let now = self.now;
                let queued = self.options.queue_writes_when_cut;
                let me = &mut self.members[index];
                match me.max_token {
                    Some(max) if token < max => {
                        if !queued {
                            let detail = format!(
                                "{} saw the token go from {max} to {token} ({member})",
                                me.id
                            );
                            self.violation("3 fencing token monotone", detail);
                            return;
                        }
                        me.regressed_since.get_or_insert(now);
                    }
                    _ => {
                        me.max_token = Some(token);
                        me.regressed_since = None;
                    }
                }
            }
            Event::VoteRequested(request) => {
                let me = &self.members[index];
                if request.voters.contains(&me.id) {
                    let delay = Duration::from_millis(self.rng.random_range(0..=1_500));
                    let yes = self.rng.random_bool(0.7);
                    let at = self.now + delay;
                    self.members[index]
                        .ballots
                        .push_back((at, request.id.clone(), yes));
                }
            }
            Event::VoteDecided(decision) => {
                *self
                    .report
                    .decided
                    .entry(decision.outcome.as_str())
                    .or_default() += 1;
                let me = &mut self.members[index];
                let id = decision.request.id.clone();
                if let Some(before) = me.decided.insert(id.clone(), decision.outcome) {
                    let detail = format!(
                        "{} decided {id} twice: {before} then {}",
                        me.id, decision.outcome
                    );
                    self.violation("4 decided once", detail);
                    return;
                }
                if decision.outcome != Outcome::Unknown {
                    if let Some(truth) = self.truth_votes.get(&id) {
                        if *truth != decision.outcome {
                            let detail = format!(
                                "{} decided {id} {} but the published history says {truth}",
                                self.members[index].id, decision.outcome
                            );
                            self.violation("4 vote result", detail);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Oracles 1 and 2: the member's facts at its sequence equal the others' and the
    /// truth's.
    fn check_facts(&mut self, index: usize) {
        let Some(machine) = self.members[index].machine.as_ref() else {
            return;
        };
        let sequence = machine.sequence();
        if sequence == 0 {
            return;
        }
        let facts: Facts = (
            machine
                .members()
                .map(|(member, join)| (member.to_owned(), join))
                .collect(),
            machine
                .leader()
                .map(|(member, token)| (member.to_owned(), token)),
        );
        match self.agreed.get(&sequence) {
            Some(agreed) if *agreed != facts => {
                let detail = format!(
                    "at sequence {sequence} {} computed {facts:?}, others {agreed:?}",
                    self.members[index].id
                );
                self.violation("1 agreement", detail);
            }
            Some(_) => {}
            None => {
                let detail = format!(
                    "at sequence {sequence} {} computed {facts:?}, but nothing was published there",
                    self.members[index].id
                );
                self.violation("1 agreement", detail);
            }
        }
    }

    /// The truth after log entry `index`: members and leader by this module's own rule,
    /// and vote results by replaying the published history.
    fn update_truth(&mut self, index: usize) {
        // Entries are taken in publication order, so the truth's own copy of the
        // published state, updated here, is the state at this entry.
        let Some(change) = self.sequencer.log.get(index).cloned() else {
            return;
        };
        let change_sequence = match &change {
            Change::Set {
                key,
                value,
                sequence,
            } => {
                self.truth_state
                    .insert(key.clone(), (value.clone(), *sequence));
                *sequence
            }
            Change::Delete { key, sequence } => {
                self.truth_state.remove(key);
                *sequence
            }
        };
        let state = &self.truth_state;
        let prefix = format!("/_group/{GROUP}/");
        let mut members: Vec<(String, i64)> = Vec::new();
        for (key, (value, entry_sequence)) in state {
            let Some(member) = key
                .strip_prefix(prefix.as_bytes())
                .and_then(|path| path.strip_prefix(b"m/"))
            else {
                continue;
            };
            let claim: i64 = std::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse().ok())
                .unwrap_or(0);
            let join = if claim == 0 || claim > *entry_sequence {
                *entry_sequence
            } else {
                claim
            };
            members.push((String::from_utf8_lossy(member).into_owned(), join));
        }
        let fence_prefix = format!("{prefix}f/");
        let fence = state
            .keys()
            .filter_map(|key| {
                let token = key.strip_prefix(fence_prefix.as_bytes())?;
                std::str::from_utf8(token).ok()?.parse::<i64>().ok()
            })
            .max()
            .unwrap_or(0);
        let leader = members
            .iter()
            .filter(|(_, join)| *join >= fence)
            .min_by_key(|(member, join)| (*join, member.clone()))
            .cloned();
        self.agreed.insert(change_sequence, (members, leader));
        // Votes: a request opens; a vote is decided at the first state where its rule is
        // certain, or times out when its request goes.
        let vote_prefix = format!("{prefix}v/");
        if let Change::Set { key, value, .. } = &change {
            if let Some(id) = key.strip_prefix(vote_prefix.as_bytes()) {
                let id = String::from_utf8_lossy(id).into_owned();
                let text = String::from_utf8_lossy(value).into_owned();
                let mut lines = text.splitn(4, '\n');
                let kind = match lines.next() {
                    Some("majority") => Kind::Majority,
                    _ => Kind::Consensus,
                };
                let _timeout = lines.next();
                let voters: BTreeSet<String> = lines
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                if !self.truth_votes.contains_key(&id) {
                    self.truth_open
                        .insert(id, (kind, voters.into_iter().collect()));
                }
            }
        }
        let mut decided = Vec::new();
        for (id, (kind, voters)) in &self.truth_open {
            let (mut yes, mut no) = (0, 0);
            for voter in voters {
                let key = format!("{prefix}b/{id}/{voter}").into_bytes();
                match state.get(&key).map(|(value, _)| value.as_slice()) {
                    Some(b"yes") => yes += 1,
                    Some(b"no") => no += 1,
                    _ => {}
                }
            }
            let n = voters.len();
            let needed = n / 2 + 1;
            let certain = match kind {
                Kind::Majority if yes >= needed => Some(Outcome::Yes),
                Kind::Majority if n - no < needed => Some(Outcome::No),
                Kind::Consensus if no > 0 => Some(Outcome::No),
                Kind::Consensus if yes == n => Some(Outcome::Yes),
                _ => None,
            };
            let present = state.contains_key(format!("{prefix}v/{id}").as_bytes());
            match certain {
                Some(outcome) => decided.push((id.clone(), outcome)),
                None if !present => decided.push((id.clone(), Outcome::Timeout)),
                None => {}
            }
        }
        for (id, outcome) in decided {
            self.truth_open.remove(&id);
            self.truth_votes.insert(id, outcome);
        }
    }

    /// Oracle 5, part one: a crashed leader is replaced, at every live member, within its
    /// lease plus the delivery bound.
    fn check_replacement(&mut self) {
        let Some((crashed, at)) = self.crashed_leader.clone() else {
            return;
        };
        let live: Vec<&Member> = self
            .members
            .iter()
            .filter(|member| member.machine.is_some() && member.partitioned_until.is_none())
            .collect();
        let replaced = live.iter().all(|member| {
            member.resync_at.is_some()
                || member.machine.as_ref().is_some_and(|machine| {
                    machine.leader().is_none_or(|(leader, token)| {
                        (leader, token) != (crashed.0.as_str(), crashed.1)
                    })
                })
        });
        let took = self.now.saturating_duration_since(at);
        if replaced {
            self.report.slowest_replacement = self.report.slowest_replacement.max(took);
            self.crashed_leader = None;
            return;
        }
        let bound = Config::observer(GROUP).lease + self.options.max_delay + self.options.tick * 2;
        if took > bound {
            let detail = format!(
                "the crashed leader {} (token {}) was still leader {took:?} after its crash (bound {bound:?})",
                crashed.0, crashed.1
            );
            self.violation("5 crashed leader replaced within its lease", detail);
        }
    }

    /// Oracle 5, part two: after the heal phase every live member has caught up to
    /// within its delay, and every one sees the same leader, the truth's.
    fn check_liveness(&mut self) {
        let sequence = self.sequencer.sequence;
        let expected = self
            .agreed
            .get(&sequence)
            .and_then(|(_, leader)| leader.clone());
        let mut problems = Vec::new();
        for member in &self.members {
            let Some(machine) = &member.machine else {
                continue;
            };
            let leader = machine
                .leader()
                .map(|(leader, token)| (leader.to_owned(), token));
            // The leader is stable in the heal phase, so a member a little behind still
            // sees the same one.
            if leader.is_none() || leader != expected {
                problems.push(format!(
                    "{} at sequence {} sees leader {leader:?}",
                    member.id,
                    machine.sequence()
                ));
            }
        }
        if !problems.is_empty() {
            let detail = format!(
                "after the heal the stream is at {sequence} with leader {expected:?}: {}",
                problems.join("; ")
            );
            self.violation("5 leader after heal", detail);
        }
    }
}

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
