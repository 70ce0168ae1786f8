//! group: members, a leader, votes and messages, agreed by every member (DECISIONS.md,
//! "Groups: every derived fact is a pure function of the ordered stream").
//!
//! A [`Group`] is fed the changes a clone client sees under one group's subtree
//! (`/_group/<name>/`, [`prefix`]) and computes, at every sequence it reaches, the same
//! facts every other member computes at that sequence:
//!
//! - **members**: the live keys `m/<member>`; each holds its join sequence (`0` in the
//!   first write: "this entry's own sequence"), so a snapshot reader recovers it although
//!   every lease refresh republishes the key;
//! - **leader**: the member with the smallest join sequence at or above the *fence*,
//!   while at least [`Config::min_size`] members are live; its join sequence is the
//!   **fencing token**. Each leader writes its token as the fence (`f/<token>`, no ttl):
//!   a key that expired and was brought back by a late refresh keeps a join below the
//!   fence and cannot lead again (its member joins afresh);
//! - **votes**: a request `v/<vote>` (kind, timeout, voters, topic; its ttl is the
//!   timeout) and ballots `b/<vote>/<member>`. A vote is decided at the first sequence at
//!   which its rule is certain ([`Kind::decide`]); a request that disappears undecided
//!   gives [`Outcome::Timeout`]. A decision never changes;
//! - **messages**: `x/<to>/<sender>:<join>:<n>`, delivered to `<to>` (a member, `*` for
//!   every member but the sender, `@leader` for the leader as of the message's sequence).
//!
//! # Invariants
//!
//! - Every derived fact is a function of the group subtree's state at the evaluated
//!   sequence, plus, for votes, the decisions taken at earlier evaluated sequences (which
//!   were themselves functions of earlier states). Nothing reads `now` but the lease
//!   timer, and iteration is in key order, so the same history gives the same events.
//! - Only the server's order counts: a change with sequence 0 (a local write not yet
//!   echoed) is ignored, and a change at or below the last evaluated sequence is stale.
//! - A decided vote keeps its outcome; the fencing token of successive leaders grows
//!   (DECISIONS.md names the one case a late lease refresh can step it back, briefly).
//!
//! # The member's side
//!
//! With [`Config::member`] set, the machine is also that member: [`Group::join`] writes its
//! key, the [`Timer::Refresh`] timer re-sets it every [`Config::refresh`] with the join
//! sequence read back from the stream, and a lost key (the lease ran out, for example
//! after a partition) is written again at once as a fresh join. [`Group::request_vote`],
//! [`Group::vote`] and [`Group::send`] produce writes. Writes go out as
//! [`Output::Write`] for the host's clone client; the machine learns their effect only
//! from the stream, like everyone else. Without a member it only observes.
//!
//! Drive it as every core machine: feed `handle_change` (one live change) or
//! `handle_resync` (the whole subtree after a snapshot), drain `poll_output`, sleep until
//! `poll_timeout`, call `handle_timeout(now)`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::time::Instant;

/// Every group lives under this key prefix.
pub const ROOT: &str = "/_group/";
/// The longest group name or member id.
pub const MAX_NAME_LEN: usize = 64;
/// The longest vote topic or message payload a request carries (the key-value limits of
/// the servers apply too).
pub const MAX_TOPIC_LEN: usize = 4096;

/// The key prefix of group `name`: `/_group/<name>/`.
pub fn prefix(name: &str) -> Vec<u8> {
    format!("{ROOT}{name}/").into_bytes()
}

/// Checks a group name or member id: 1 to [`MAX_NAME_LEN`] characters of `A-Z a-z 0-9 .
/// _ -` (so it can sit inside a key, and `*`, `@` and `:` stay free for the machine).
pub fn validate_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// Misuse of the machine or an invalid configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A group name or member id outside the allowed characters or length.
    #[error("invalid name {name:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A duration that must be positive is zero.
    #[error("{name} must be longer than zero")]
    ZeroDuration {
        /// The configuration field.
        name: &'static str,
    },
    /// The lease must outlast at least two refreshes, or a single late refresh loses it.
    #[error("the lease ({lease:?}) must be at least twice the refresh interval ({refresh:?})")]
    LeaseTooShort {
        /// The lease.
        lease: Duration,
        /// The refresh interval.
        refresh: Duration,
    },
    /// `min_size` is zero.
    #[error("min_size must be at least 1")]
    ZeroMinSize,
    /// The machine observes only: no member was configured.
    #[error("this group handle observes only: it has no member id")]
    NotAMember,
    /// The member's join has not been published yet (or the member left).
    #[error("not joined yet: wait until the member's own key is published")]
    NotJoined,
    /// Too few members for a vote.
    #[error("the group has {size} members; a vote needs at least {min_size}")]
    TooFewMembers {
        /// Live members.
        size: usize,
        /// The configured minimum.
        min_size: usize,
    },
    /// No open vote with this id.
    #[error("no open vote {vote:?}")]
    UnknownVote {
        /// The vote id.
        vote: String,
    },
    /// The member was not a voter of this vote.
    #[error("this member is not a voter of {vote:?}")]
    NotAVoter {
        /// The vote id.
        vote: String,
    },
    /// This member already voted in this vote.
    #[error("this member already voted in {vote:?}")]
    AlreadyVoted {
        /// The vote id.
        vote: String,
    },
    /// A topic or payload longer than [`MAX_TOPIC_LEN`].
    #[error("{what} is {len} bytes; at most {MAX_TOPIC_LEN}")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// The machine's configuration. The defaults are RIAPS's: peer timeout (lease) 3 s,
/// heartbeat (refresh) 1 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The group's name.
    pub group: String,
    /// The member this machine acts as; `None` to observe only.
    pub member: Option<String>,
    /// The ttl of the member's key: a member whose process dies is gone this long after
    /// its last refresh.
    pub lease: Duration,
    /// How often the member's key is re-set.
    pub refresh: Duration,
    /// Fewer live members than this: no leader, and no vote can be requested (RIAPS's
    /// `groupMinSize`). Every member of a group must use the same value.
    pub min_size: usize,
    /// The ttl of a message key: how long a message waits in the map.
    pub message_ttl: Duration,
    /// Decided votes remembered for [`Group::decision`]; past it the oldest are forgotten.
    pub max_decided: usize,
}

impl Config {
    /// A member's configuration with the defaults.
    pub fn member(group: &str, member: &str) -> Config {
        Config {
            member: Some(member.to_owned()),
            ..Config::observer(group)
        }
    }

    /// An observer's configuration with the defaults.
    pub fn observer(group: &str) -> Config {
        Config {
            group: group.to_owned(),
            member: None,
            lease: Duration::from_secs(3),
            refresh: Duration::from_secs(1),
            min_size: 1,
            message_ttl: Duration::from_secs(5),
            max_decided: 1024,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name(&self.group)?;
        if let Some(member) = &self.member {
            validate_name(member)?;
        }
        for (name, value) in [
            ("lease", self.lease),
            ("refresh", self.refresh),
            ("message_ttl", self.message_ttl),
        ] {
            if value.is_zero() {
                return Err(Error::ZeroDuration { name });
            }
        }
        if self.lease < self.refresh.saturating_mul(2) {
            return Err(Error::LeaseTooShort {
                lease: self.lease,
                refresh: self.refresh,
            });
        }
        if self.min_size == 0 {
            return Err(Error::ZeroMinSize);
        }
        Ok(())
    }
}

/// How a vote is decided among its `n` voters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Kind {
    /// Yes wins with `n/2 + 1` yes ballots; no wins once that is out of reach.
    Majority,
    /// Yes wins when all `n` voters said yes; no wins at the first no.
    Consensus,
}

impl Kind {
    /// The name used in keys, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Majority => "majority",
            Kind::Consensus => "consensus",
        }
    }

    /// Parses [`Kind::as_str`].
    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "majority" => Some(Kind::Majority),
            "consensus" => Some(Kind::Consensus),
            _ => None,
        }
    }

    /// The outcome once it is certain, given `yes` and `no` ballots of `voters` voters
    /// (RIAPS's rules); `None` while more ballots could change it.
    pub fn decide(self, voters: usize, yes: usize, no: usize) -> Option<Outcome> {
        match self {
            Kind::Majority => {
                let needed = voters / 2 + 1;
                if yes >= needed {
                    Some(Outcome::Yes)
                } else if voters.saturating_sub(no) < needed {
                    Some(Outcome::No)
                } else {
                    None
                }
            }
            Kind::Consensus => {
                if no > 0 {
                    Some(Outcome::No)
                } else if yes >= voters {
                    Some(Outcome::Yes)
                } else {
                    None
                }
            }
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of a vote.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Outcome {
    /// Accepted by the vote's rule.
    Yes,
    /// Rejected by the vote's rule.
    No,
    /// The request expired (or was deleted) before the rule was certain.
    Timeout,
    /// This machine jumped over the vote's close in a re-sync (its ballots inside the
    /// jump may have come before or after the close, or expired since): the members that
    /// followed the stream know the result; this one does not guess.
    Unknown,
}

impl Outcome {
    /// `yes`, `no`, `timeout` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Yes => "yes",
            Outcome::No => "no",
            Outcome::Timeout => "timeout",
            Outcome::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a message is for.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Recipient {
    /// Every member but the sender.
    All,
    /// The leader as of the message's sequence.
    Leader,
    /// One member.
    Member(String),
}

impl Recipient {
    fn key_part(&self) -> &str {
        match self {
            Recipient::All => "*",
            Recipient::Leader => "@leader",
            Recipient::Member(member) => member,
        }
    }

    fn parse(text: &str) -> Option<Recipient> {
        match text {
            "*" => Some(Recipient::All),
            "@leader" => Some(Recipient::Leader),
            member => validate_name(member)
                .ok()
                .map(|()| Recipient::Member(member.to_owned())),
        }
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key_part())
    }
}

/// A vote request as the stream shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Its id (`<requester>:<join>:<n>`).
    pub id: String,
    /// The member that asked.
    pub requester: String,
    /// Majority or consensus.
    pub kind: Kind,
    /// Its timeout (the request key's ttl).
    pub timeout: Duration,
    /// The members entitled to vote, as the requester saw them.
    pub voters: Vec<String>,
    /// What the vote is about.
    pub topic: Vec<u8>,
    /// The sequence of the request.
    pub sequence: i64,
}

/// A decided vote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The request.
    pub request: Request,
    /// The result.
    pub outcome: Outcome,
    /// Yes ballots counted when it was decided.
    pub yes: usize,
    /// No ballots counted when it was decided.
    pub no: usize,
    /// The sequence at which it was decided.
    pub sequence: i64,
}

/// What the group's members should know. Within one evaluated sequence the events come
/// in this order: members left, members joined, leader exited, leader elected, votes
/// requested, votes decided, messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member's key appeared.
    MemberJoined {
        /// The member.
        member: String,
        /// Its join sequence.
        join: i64,
        /// The sequence evaluated.
        sequence: i64,
    },
    /// A member's key is gone (left, or its lease ran out).
    MemberLeft {
        /// The member.
        member: String,
        /// The sequence evaluated.
        sequence: i64,
    },
    /// A member became the leader.
    LeaderElected {
        /// The leader.
        member: String,
        /// Its fencing token (its join sequence).
        token: i64,
        /// The sequence evaluated.
        sequence: i64,
    },
    /// The leader is no longer the leader (it left, or the group fell below its minimum
    /// size).
    LeaderExited {
        /// The former leader.
        member: String,
        /// Its fencing token.
        token: i64,
        /// The sequence evaluated.
        sequence: i64,
    },
    /// A vote was requested.
    VoteRequested(Request),
    /// A vote was decided.
    VoteDecided(Decision),
    /// A message for this member.
    Message {
        /// The sender.
        from: String,
        /// Who it was addressed to.
        to: Recipient,
        /// The payload.
        payload: Vec<u8>,
        /// Its sequence.
        sequence: i64,
    },
}

/// A change of the group subtree, as the clone client reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `key` now has `value`, written at `sequence`.
    Set {
        /// The full key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The sequence the server gave it (0: a local write, ignored).
        sequence: i64,
    },
    /// `key` is gone since `sequence`.
    Delete {
        /// The full key.
        key: Vec<u8>,
        /// The sequence of the deletion (0: a local delete, ignored).
        sequence: i64,
    },
}

/// A write for the host's clone client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Set `key` to `value` with `ttl` (`value: None` deletes the key).
    Write {
        /// The full key.
        key: Vec<u8>,
        /// The value, or `None` to delete.
        value: Option<Vec<u8>>,
        /// The ttl of a set.
        ttl: Option<Duration>,
    },
    /// Tell the application.
    Event(Event),
}

/// The machine's one timer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Timer {
    /// Re-set the member's key (or write its join again).
    Refresh,
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Changes applied.
    pub changes: u64,
    /// Re-syncs applied.
    pub resyncs: u64,
    /// Changes at or below the evaluated sequence, dropped.
    pub stale_changes: u64,
    /// Keys under the group whose name or value makes no sense, ignored.
    pub malformed: u64,
    /// Times this member found its own key gone and joined again.
    pub rejoins: u64,
}

/// Where the member stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Membership {
    /// Not joined (or left, or an observer).
    Out,
    /// The join was written at `sent`; its key has not been seen yet.
    Joining { sent: Instant },
    /// The member's key is live with this join sequence.
    Joined { join: i64 },
}

/// One entry of the group subtree, keyed by its path below the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    value: Vec<u8>,
    sequence: i64,
}

/// A vote still open.
#[derive(Clone, Debug)]
struct Open {
    request: Request,
}

/// The group machine; see the module documentation.
#[derive(Debug)]
pub struct Group {
    config: Config,
    prefix: Vec<u8>,
    /// The group subtree, keyed by the path below the prefix.
    entries: BTreeMap<Vec<u8>, Stored>,
    /// The last evaluated sequence.
    sequence: i64,
    members: BTreeMap<String, i64>,
    leader: Option<(String, i64)>,
    open: BTreeMap<String, Open>,
    decided: BTreeMap<String, Decision>,
    /// Decided vote ids in the order they were decided, for eviction.
    decided_order: VecDeque<String>,
    /// Message keys already delivered (or already present when this member joined).
    seen_messages: BTreeSet<Vec<u8>>,
    membership: Membership,
    /// Votes and messages this member wrote, for unique ids.
    written: u64,
    /// Open votes this member cast a ballot in: a member votes once.
    voted: BTreeSet<String>,
    /// Send times of this member's writes of its key not yet seen in the stream, oldest
    /// first (echoes come in order; a lost one only makes the guess more careful).
    unconfirmed: VecDeque<Instant>,
    /// The send time of the newest write of the key seen in the stream: its lease runs
    /// at least until this plus the lease.
    confirmed_send: Option<Instant>,
    /// The entry sequence of the member's key last seen.
    own_entry: i64,
    /// A refresh was held back because the lease may have run out; it goes out at the
    /// next confirmation if that makes it safe.
    refresh_held: bool,
    /// The largest fence this member wrote.
    fence_written: i64,
    timers: BTreeMap<Timer, Instant>,
    outputs: VecDeque<Output>,
    stats: Stats,
}

impl Group {
    /// A machine with nothing seen yet.
    pub fn new(config: Config) -> Result<Group, Error> {
        config.validate()?;
        Ok(Group {
            prefix: prefix(&config.group),
            config,
            entries: BTreeMap::new(),
            sequence: 0,
            members: BTreeMap::new(),
            leader: None,
            open: BTreeMap::new(),
            decided: BTreeMap::new(),
            decided_order: VecDeque::new(),
            seen_messages: BTreeSet::new(),
            membership: Membership::Out,
            written: 0,
            voted: BTreeSet::new(),
            unconfirmed: VecDeque::new(),
            confirmed_send: None,
            own_entry: 0,
            refresh_held: false,
            fence_written: 0,
            timers: BTreeMap::new(),
            outputs: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The group's key prefix (the subtree a clone client must follow).
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The last sequence the facts were computed at.
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// Live members and their join sequences, in member order.
    pub fn members(&self) -> impl Iterator<Item = (&str, i64)> + '_ {
        self.members
            .iter()
            .map(|(member, join)| (member.as_str(), *join))
    }

    /// Number of live members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The leader and its fencing token.
    pub fn leader(&self) -> Option<(&str, i64)> {
        self.leader
            .as_ref()
            .map(|(member, token)| (member.as_str(), *token))
    }

    /// The leader's fencing token.
    pub fn fencing_token(&self) -> Option<i64> {
        self.leader.as_ref().map(|(_, token)| *token)
    }

    /// True when this machine's member is the leader.
    pub fn is_leader(&self) -> bool {
        match (&self.config.member, &self.leader) {
            (Some(me), Some((leader, _))) => me == leader,
            _ => false,
        }
    }

    /// This member's join sequence, once its key is live.
    pub fn join_sequence(&self) -> Option<i64> {
        match self.membership {
            Membership::Joined { join } => Some(join),
            _ => None,
        }
    }

    /// True from [`Group::join`] until [`Group::leave`], whether or not the key is
    /// published yet.
    pub fn is_joined_or_joining(&self) -> bool {
        self.membership != Membership::Out
    }

    /// Open votes, by id.
    pub fn open_votes(&self) -> impl Iterator<Item = &Request> + '_ {
        self.open.values().map(|open| &open.request)
    }

    /// The decision of a vote, if decided and still remembered.
    pub fn decision(&self, vote: &str) -> Option<&Decision> {
        self.decided.get(vote)
    }

    /// Remembered decisions, by vote id.
    pub fn decisions(&self) -> impl Iterator<Item = &Decision> + '_ {
        self.decided.values()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Joins the group: writes the member's key; the refresh timer keeps it alive.
    pub fn join(&mut self, now: Instant) -> Result<(), Error> {
        if self.config.member.is_none() {
            return Err(Error::NotAMember);
        }
        if self.membership == Membership::Out {
            self.write_join(now);
        }
        Ok(())
    }

    /// Leaves the group: deletes the member's key and stops refreshing it.
    pub fn leave(&mut self) -> Result<(), Error> {
        let key = self.own_key().ok_or(Error::NotAMember)?;
        self.membership = Membership::Out;
        self.timers.remove(&Timer::Refresh);
        self.outputs.push_back(Output::Write {
            key,
            value: None,
            ttl: None,
        });
        Ok(())
    }

    /// Requests a vote of every live member on `topic`, open for `timeout`. Returns the
    /// vote's id.
    pub fn request_vote(
        &mut self,
        topic: &[u8],
        kind: Kind,
        timeout: Duration,
    ) -> Result<String, Error> {
        if timeout < Duration::from_millis(1) {
            return Err(Error::ZeroDuration { name: "timeout" });
        }
        if topic.len() > MAX_TOPIC_LEN {
            return Err(Error::TooLong {
                what: "the topic",
                len: topic.len(),
            });
        }
        let id = self.next_id()?;
        if self.members.len() < self.config.min_size {
            return Err(Error::TooFewMembers {
                size: self.members.len(),
                min_size: self.config.min_size,
            });
        }
        let voters: Vec<&str> = self.members.keys().map(String::as_str).collect();
        let mut value = format!(
            "{}\n{}\n{}\n",
            kind.as_str(),
            timeout.as_millis(),
            voters.join(",")
        )
        .into_bytes();
        value.extend_from_slice(topic);
        let key = self.key(&format!("v/{id}"));
        self.outputs.push_back(Output::Write {
            key,
            value: Some(value),
            ttl: Some(timeout),
        });
        Ok(id)
    }

    /// Casts this member's ballot in an open vote.
    pub fn vote(&mut self, vote: &str, yes: bool) -> Result<(), Error> {
        let me = self.config.member.clone().ok_or(Error::NotAMember)?;
        let open = self.open.get(vote).ok_or_else(|| Error::UnknownVote {
            vote: vote.to_owned(),
        })?;
        if !open.request.voters.contains(&me) {
            return Err(Error::NotAVoter {
                vote: vote.to_owned(),
            });
        }
        if self.voted.contains(vote) {
            return Err(Error::AlreadyVoted {
                vote: vote.to_owned(),
            });
        }
        // The ballot outlives the request, so it counts until the request's close.
        let ttl = open.request.timeout.saturating_mul(2);
        let key = self.key(&format!("b/{vote}/{me}"));
        let value = if yes { b"yes".to_vec() } else { b"no".to_vec() };
        self.voted.insert(vote.to_owned());
        self.outputs.push_back(Output::Write {
            key,
            value: Some(value),
            ttl: Some(ttl),
        });
        Ok(())
    }

    /// Sends `payload` to `to`.
    pub fn send(&mut self, to: Recipient, payload: &[u8]) -> Result<(), Error> {
        if payload.len() > MAX_TOPIC_LEN {
            return Err(Error::TooLong {
                what: "the message",
                len: payload.len(),
            });
        }
        let id = self.next_id()?;
        let key = self.key(&format!("x/{}/{id}", to.key_part()));
        let ttl = self.config.message_ttl;
        self.outputs.push_back(Output::Write {
            key,
            value: Some(payload.to_vec()),
            ttl: Some(ttl),
        });
        Ok(())
    }

    /// Applies one live change (a consistent state at its sequence) and evaluates.
    pub fn handle_change(&mut self, now: Instant, change: Change) {
        let (key, value, sequence) = match change {
            Change::Set {
                key,
                value,
                sequence,
            } => (key, Some(value), sequence),
            Change::Delete { key, sequence } => (key, None, sequence),
        };
        if sequence == 0 {
            return;
        }
        if sequence <= self.sequence {
            self.stats.stale_changes += 1;
            return;
        }
        self.stats.changes += 1;
        if let Some(path) = key.strip_prefix(self.prefix.as_slice()) {
            match value {
                Some(value) if !value.is_empty() => {
                    self.entries
                        .insert(path.to_vec(), Stored { value, sequence });
                }
                _ => {
                    self.entries.remove(path);
                }
            }
        }
        self.evaluate(now, sequence, false);
    }

    /// Replaces the group subtree with `entries` (full key, value, entry sequence), the
    /// state at `sequence`, after the clone client re-synced, and evaluates. Entries with
    /// sequence 0 (local writes not yet echoed) keep the entry seen before, if any.
    pub fn handle_resync(
        &mut self,
        now: Instant,
        sequence: i64,
        entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>, i64)>,
    ) {
        if sequence < self.sequence {
            self.stats.stale_changes += 1;
            return;
        }
        self.stats.resyncs += 1;
        let mut replaced = BTreeMap::new();
        for (key, value, entry_sequence) in entries {
            let Some(path) = key.strip_prefix(self.prefix.as_slice()) else {
                continue;
            };
            if entry_sequence == 0 {
                if let Some(before) = self.entries.get(path) {
                    replaced.insert(path.to_vec(), before.clone());
                }
            } else if !value.is_empty() {
                replaced.insert(
                    path.to_vec(),
                    Stored {
                        value,
                        sequence: entry_sequence,
                    },
                );
            }
        }
        self.entries = replaced;
        self.evaluate(now, sequence, true);
    }

    /// The next output, in the order produced.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Group::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.values().min().copied()
    }

    /// Fires the timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<Timer> = self
            .timers
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(timer, _)| *timer)
            .collect();
        for timer in due {
            self.timers.remove(&timer);
            match timer {
                Timer::Refresh => self.refresh(now),
            }
        }
    }

    fn refresh(&mut self, now: Instant) {
        match self.membership {
            Membership::Out => return,
            Membership::Joining { sent } => {
                // The join is not in the stream yet. Written again only once a lease has
                // passed: a second `0` after a published first would move the join.
                if now.saturating_duration_since(sent) >= self.config.lease {
                    self.write_join(now);
                    return;
                }
            }
            Membership::Joined { join } => {
                if self.refresh_is_safe(now) {
                    self.write_member(now, join);
                } else {
                    self.refresh_held = true;
                }
            }
        }
        self.timers
            .insert(Timer::Refresh, now + self.config.refresh);
    }

    /// A refresh may claim the join sequence only while the key is surely alive when it
    /// arrives: the newest write seen in the stream was sent less than `lease - refresh`
    /// ago, leaving a refresh interval for the way to the server. Otherwise a refresh
    /// could bring an expired key back with its old join (and an old leader back with a
    /// smaller token); the member waits for its stream instead, which either confirms a
    /// later write or shows the key gone (then it joins again).
    fn refresh_is_safe(&self, now: Instant) -> bool {
        let margin = self.config.lease.saturating_sub(self.config.refresh);
        self.confirmed_send
            .is_some_and(|sent| now.saturating_duration_since(sent) < margin)
    }

    fn write_join(&mut self, now: Instant) {
        self.membership = Membership::Joining { sent: now };
        self.unconfirmed.clear();
        self.confirmed_send = None;
        self.refresh_held = false;
        self.write_member(now, 0);
        self.timers
            .insert(Timer::Refresh, now + self.config.refresh);
    }

    fn write_member(&mut self, now: Instant, join: i64) {
        /// Send times remembered; past it the oldest is taken as lost.
        const MAX_UNCONFIRMED: usize = 64;
        if self.unconfirmed.len() >= MAX_UNCONFIRMED {
            self.unconfirmed.pop_front();
        }
        self.unconfirmed.push_back(now);
        if let Some(key) = self.own_key() {
            self.outputs.push_back(Output::Write {
                key,
                value: Some(join.to_string().into_bytes()),
                ttl: Some(self.config.lease),
            });
        }
    }

    fn own_key(&self) -> Option<Vec<u8>> {
        let member = self.config.member.as_ref()?;
        Some(self.key(&format!("m/{member}")))
    }

    fn key(&self, path: &str) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(path.as_bytes());
        key
    }

    /// A fresh id for a vote or message: `<member>:<join>:<n>`, unique because the join
    /// sequence is unique to this incarnation of the member. A member acting without
    /// joining (a command-line requester, a ballot cast from another process) uses
    /// `s<sequence>` instead of its join: unique per process as long as two processes
    /// do not act for the same member id at the same sequence.
    fn next_id(&mut self) -> Result<String, Error> {
        let me = self.config.member.as_ref().ok_or(Error::NotAMember)?;
        let tag = match self.membership {
            Membership::Joined { join } => join.to_string(),
            Membership::Joining { .. } => return Err(Error::NotJoined),
            Membership::Out => format!("s{}", self.sequence),
        };
        self.written += 1;
        Ok(format!("{me}:{tag}:{}", self.written))
    }

    /// Computes every fact at `sequence` from the entries and emits what changed.
    /// `jumped`: the entries replaced a state older than `sequence` in one step.
    fn evaluate(&mut self, now: Instant, sequence: i64, jumped: bool) {
        let previous = self.sequence;
        self.sequence = sequence;
        self.evaluate_members(sequence);
        self.evaluate_leader(sequence);
        self.evaluate_votes(sequence, previous, jumped);
        self.evaluate_messages();
        self.follow_own_key(now);
        self.raise_fence();
    }

    /// The fence: the largest token in an `f/<token>` key. Every leader writes its token
    /// there when it is elected, so a member whose join sequence is below it joined
    /// before a leader that was elected after it had gone.
    pub fn fence(&self) -> i64 {
        self.entries
            .range(b"f/".to_vec()..b"f0".to_vec())
            .filter_map(|(path, _)| {
                let token = path.strip_prefix(b"f/")?;
                std::str::from_utf8(token).ok()?.parse::<i64>().ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// When this member leads and the fence is below its token: writes its token as the
    /// fence (no ttl), and removes the older fence keys it sees.
    fn raise_fence(&mut self) {
        let Some(token) = self
            .leader
            .as_ref()
            .filter(|_| self.is_leader())
            .map(|(_, t)| *t)
        else {
            return;
        };
        if self.fence() >= token || self.fence_written >= token {
            return;
        }
        self.fence_written = token;
        let older: Vec<Vec<u8>> = self
            .entries
            .range(b"f/".to_vec()..b"f0".to_vec())
            .map(|(path, _)| path.clone())
            .collect();
        let me = self.config.member.clone().unwrap_or_default();
        let key = self.key(&format!("f/{token}"));
        self.outputs.push_back(Output::Write {
            key,
            value: Some(me.into_bytes()),
            ttl: None,
        });
        for path in older {
            let mut key = self.prefix.clone();
            key.extend_from_slice(&path);
            self.outputs.push_back(Output::Write {
                key,
                value: None,
                ttl: None,
            });
        }
    }

    fn evaluate_members(&mut self, sequence: i64) {
        let mut members = BTreeMap::new();
        let mut malformed = 0;
        for (path, stored) in &self.entries {
            let Some(member) = path.strip_prefix(b"m/") else {
                continue;
            };
            let join = std::str::from_utf8(&stored.value)
                .ok()
                .and_then(|text| text.parse::<i64>().ok());
            match (std::str::from_utf8(member), join) {
                (Ok(member), Some(claim)) if validate_name(member).is_ok() && claim >= 0 => {
                    // `0` means "this entry"; a claim after the entry is no real join.
                    let join = if claim == 0 || claim > stored.sequence {
                        stored.sequence
                    } else {
                        claim
                    };
                    members.insert(member.to_owned(), join);
                }
                _ => malformed += 1,
            }
        }
        self.stats.malformed += malformed;
        let old = std::mem::replace(&mut self.members, members);
        for (member, join) in &old {
            if self.members.get(member) != Some(join) {
                self.emit(Event::MemberLeft {
                    member: member.clone(),
                    sequence,
                });
            }
        }
        let joined: Vec<(String, i64)> = self
            .members
            .iter()
            .filter(|(member, join)| old.get(*member) != Some(*join))
            .map(|(member, join)| (member.clone(), *join))
            .collect();
        for (member, join) in joined {
            self.emit(Event::MemberJoined {
                member,
                join,
                sequence,
            });
        }
    }

    /// The rule: the member with the smallest join sequence, if the group is big enough.
    fn evaluate_leader(&mut self, sequence: i64) {
        let fence = self.fence();
        let leader = if self.members.len() >= self.config.min_size {
            self.members
                .iter()
                // A join below the fence is an expired key brought back by a late
                // refresh: that member cannot lead until it joins again.
                .filter(|(_, join)| **join >= fence)
                .min_by_key(|(member, join)| (**join, member.as_str()))
                .map(|(member, join)| (member.clone(), *join))
        } else {
            None
        };
        if leader == self.leader {
            return;
        }
        if let Some((member, token)) = self.leader.take() {
            self.emit(Event::LeaderExited {
                member,
                token,
                sequence,
            });
        }
        if let Some((member, token)) = leader.clone() {
            self.emit(Event::LeaderElected {
                member,
                token,
                sequence,
            });
        }
        self.leader = leader;
    }

    fn evaluate_votes(&mut self, sequence: i64, previous: i64, jumped: bool) {
        // New requests.
        let mut requested = Vec::new();
        let mut malformed = 0;
        for (path, stored) in self.entries.range(b"v/".to_vec()..b"v0".to_vec()) {
            let Some(id) = path
                .strip_prefix(b"v/")
                .and_then(|id| std::str::from_utf8(id).ok())
            else {
                malformed += 1;
                continue;
            };
            if self.open.contains_key(id) || self.decided.contains_key(id) {
                continue;
            }
            match parse_request(id, &stored.value, stored.sequence) {
                Some(request) => requested.push(request),
                None => malformed += 1,
            }
        }
        self.stats.malformed += malformed;
        for request in requested {
            self.open.insert(
                request.id.clone(),
                Open {
                    request: request.clone(),
                },
            );
            self.emit(Event::VoteRequested(request));
        }
        // Decisions, in vote id order.
        let mut decided = Vec::new();
        for (id, open) in &self.open {
            let present = self.entries.contains_key(format!("v/{id}").as_bytes());
            let tally = self.tally(&open.request, None);
            let kind = open.request.kind;
            let voters = open.request.voters.len();
            let decision = if present || !jumped {
                match kind.decide(voters, tally.yes, tally.no) {
                    Some(outcome) => Some((outcome, tally)),
                    None if present => None,
                    None => Some((Outcome::Timeout, tally)),
                }
            } else {
                // Closed inside a jump. A ballot written inside it may have come before
                // or after the close, and one may even have expired since: only a jump
                // of one sequence (the close itself) leaves no doubt.
                let before = self.tally(&open.request, Some(previous));
                let outcome = match kind.decide(voters, before.yes, before.no) {
                    Some(outcome) => outcome,
                    None if sequence == previous.saturating_add(1) => Outcome::Timeout,
                    None => Outcome::Unknown,
                };
                Some((outcome, before))
            };
            if let Some((outcome, tally)) = decision {
                decided.push(Decision {
                    request: open.request.clone(),
                    outcome,
                    yes: tally.yes,
                    no: tally.no,
                    sequence,
                });
            }
        }
        for decision in decided {
            self.open.remove(&decision.request.id);
            self.voted.remove(&decision.request.id);
            self.remember(decision.clone());
            self.emit(Event::VoteDecided(decision));
        }
    }

    /// Ballots of `request`'s voters in the entries (written at or before `through`, if
    /// given).
    fn tally(&self, request: &Request, through: Option<i64>) -> Tally {
        let mut tally = Tally::default();
        for voter in &request.voters {
            let path = format!("b/{}/{voter}", request.id);
            let Some(ballot) = self.entries.get(path.as_bytes()) else {
                continue;
            };
            if through.is_some_and(|through| ballot.sequence > through) {
                continue;
            }
            match ballot.value.as_slice() {
                b"yes" => tally.yes += 1,
                b"no" => tally.no += 1,
                _ => {}
            }
        }
        tally
    }

    fn remember(&mut self, decision: Decision) {
        self.decided_order.push_back(decision.request.id.clone());
        self.decided.insert(decision.request.id.clone(), decision);
        while self.decided.len() > self.config.max_decided {
            match self.decided_order.pop_front() {
                Some(oldest) => {
                    self.decided.remove(&oldest);
                }
                None => break,
            }
        }
    }

    fn evaluate_messages(&mut self) {
        let message_keys: BTreeSet<Vec<u8>> = self
            .entries
            .range(b"x/".to_vec()..b"x0".to_vec())
            .map(|(path, _)| path.clone())
            .collect();
        // Forget delivered messages whose keys are gone: the set stays as small as the map.
        self.seen_messages
            .retain(|path| message_keys.contains(path));
        let (Some(me), Some(join)) = (self.config.member.clone(), self.join_sequence()) else {
            return;
        };
        let mut deliveries = Vec::new();
        for path in message_keys {
            if self.seen_messages.contains(&path) {
                continue;
            }
            let Some(stored) = self.entries.get(&path) else {
                continue;
            };
            let Some((to, from)) = parse_message_path(&path) else {
                self.stats.malformed += 1;
                self.seen_messages.insert(path);
                continue;
            };
            // A member receives what was sent after it joined.
            let for_me = stored.sequence > join
                && match &to {
                    Recipient::All => from != me,
                    Recipient::Leader => self.is_leader(),
                    Recipient::Member(member) => *member == me,
                };
            if for_me {
                deliveries.push(Event::Message {
                    from,
                    to,
                    payload: stored.value.clone(),
                    sequence: stored.sequence,
                });
            }
            self.seen_messages.insert(path);
        }
        for event in deliveries {
            self.emit(event);
        }
    }

    /// Keeps this member's membership in step with its key in the stream.
    fn follow_own_key(&mut self, now: Instant) {
        let Some(me) = self.config.member.as_ref() else {
            return;
        };
        let mut live = self.members.get(me).copied();
        let entry = self
            .entries
            .get(format!("m/{me}").as_bytes())
            .map_or(0, |stored| stored.sequence);
        let written = entry > self.own_entry;
        if written || live.is_none() {
            self.own_entry = entry;
        }
        if written && self.membership != Membership::Out {
            // One of this member's writes of its key reached the stream.
            if let Some(sent) = self.unconfirmed.pop_front() {
                self.confirmed_send = Some(sent);
            }
        } else if matches!(self.membership, Membership::Joining { .. }) {
            // The key of an earlier incarnation, not this join.
            live = None;
        }
        match (self.membership, live) {
            (Membership::Out, _) => {}
            (Membership::Joining { .. }, Some(join)) => {
                self.membership = Membership::Joined { join };
                // Messages sent before the join are not for this member.
                let keys: Vec<Vec<u8>> = self
                    .entries
                    .range(b"x/".to_vec()..b"x0".to_vec())
                    .map(|(path, _)| path.clone())
                    .collect();
                self.seen_messages.extend(keys);
            }
            (Membership::Joining { .. }, None) => {}
            (Membership::Joined { .. }, Some(seen)) if seen < self.fence() => {
                // This member's key came back from before the fence (a refresh that
                // arrived after it expired): it cannot lead until it joins again.
                self.stats.rejoins += 1;
                self.write_join(now);
            }
            (Membership::Joined { join }, Some(seen)) if seen < join => {
                // A refresh that arrived after the key expired brought an old join back:
                // put the current one back at once (DECISIONS.md, limit 2).
                self.write_member(now, join);
            }
            (Membership::Joined { .. }, Some(seen)) => {
                self.membership = Membership::Joined { join: seen };
                if self.refresh_held && self.refresh_is_safe(now) {
                    self.refresh_held = false;
                    self.write_member(now, seen);
                }
            }
            (Membership::Joined { .. }, None) => {
                // The lease ran out (or someone deleted the key): join again.
                self.stats.rejoins += 1;
                self.write_join(now);
            }
        }
    }

    fn emit(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    yes: usize,
    no: usize,
}

/// Parses a request value: `<kind>\n<timeout ms>\n<voter,voter,...>\n<topic>`.
fn parse_request(id: &str, value: &[u8], sequence: i64) -> Option<Request> {
    let mut parts = value.splitn(4, |byte| *byte == b'\n');
    let kind = Kind::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let timeout_ms: u64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let voters_text = std::str::from_utf8(parts.next()?).ok()?;
    let topic = parts.next()?.to_vec();
    let mut voters: Vec<String> = Vec::new();
    for voter in voters_text.split(',') {
        validate_name(voter).ok()?;
        voters.push(voter.to_owned());
    }
    voters.sort();
    voters.dedup();
    let requester = id.split(':').next()?.to_owned();
    validate_name(&requester).ok()?;
    Some(Request {
        id: id.to_owned(),
        requester,
        kind,
        timeout: Duration::from_millis(timeout_ms),
        voters,
        topic,
        sequence,
    })
}

/// Parses `x/<to>/<sender>:<join>:<n>` into the recipient and the sender.
fn parse_message_path(path: &[u8]) -> Option<(Recipient, String)> {
    let text = std::str::from_utf8(path.strip_prefix(b"x/")?).ok()?;
    let (to, id) = text.split_once('/')?;
    let sender = id.split(':').next()?;
    validate_name(sender).ok()?;
    Some((Recipient::parse(to)?, sender.to_owned()))
}

#[cfg(test)]
mod tests;
