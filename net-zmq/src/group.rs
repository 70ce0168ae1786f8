//! Groups for applications: membership with a lease, a leader with a fencing token,
//! votes and messages (RIAPS's coordination API), agreed by every member because each
//! fact is computed from the servers' single order ([`clonekv_core::group`]; design and
//! limits in DECISIONS.md, "Groups").
//!
//! [`Client::join`] returns a [`Group`]: a thread feeds the client's changes under
//! `/_group/<name>/` to the core group machine, carries out its writes through the
//! client (the lease refresh every second, ballots, messages) and queues its events for
//! [`Group::next_event`]. Queries read the machine under a lock, so they always answer
//! from one evaluated sequence.
//!
//! ```no_run
//! use std::time::Duration;
//! use clonekv_zmq::client::Client;
//! use clonekv_zmq::group::{GroupOptions, Kind};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder().subtree("/_group/robots/").connect()?;
//! client.wait_synced(Duration::from_secs(10))?;
//! let group = client.join("robots", "r1", GroupOptions::default())?;
//! group.wait_joined(Duration::from_secs(5))?;
//! if group.is_leader() {
//!     let vote = group.request_vote(b"go north", Kind::Majority, Duration::from_secs(5))?;
//!     println!("asked {vote}");
//! }
//! while let Some(event) = group.next_event(Duration::from_secs(1)) {
//!     println!("{event:?}");
//! }
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use clonekv_core::group::{Change, Config, Error as GroupError, Group as Machine, Output};
pub use clonekv_core::group::{Decision, Event, Kind, Outcome, Recipient, Request};

use crate::client::{Client, ClientError, Event as ClientEvent, Events, Link};
use crate::clock::Clock;

/// How a member takes part; the defaults are RIAPS's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupOptions {
    /// The member's lease: it is gone this long after its process dies (RIAPS's peer
    /// timeout, 3 s).
    pub lease: Duration,
    /// How often the lease is renewed (RIAPS's heartbeat, 1 s).
    pub refresh: Duration,
    /// Fewer members than this: no leader, no vote (RIAPS's `groupMinSize`; every
    /// member must use the same value).
    pub min_size: usize,
    /// How long a message waits in the map.
    pub message_ttl: Duration,
    /// Group events queued for [`Group::next_event`]; past it the oldest are dropped
    /// ([`Group::events_dropped`]).
    pub event_capacity: usize,
}

impl Default for GroupOptions {
    fn default() -> Self {
        let config = Config::observer("g");
        GroupOptions {
            lease: config.lease,
            refresh: config.refresh,
            min_size: config.min_size,
            message_ttl: config.message_ttl,
            event_capacity: 10_000,
        }
    }
}

/// What went wrong with a group call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupCallError {
    /// The group machine refused the call (misuse or invalid options).
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The client failed or stopped.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The client follows a subtree that does not contain the group's keys.
    #[error(
        "the client follows {subtree:?}, which does not contain the group's keys {prefix:?}: \
         build it with .subtree(\"{prefix}\") or a prefix of it"
    )]
    OutsideSubtree {
        /// The client's subtree.
        subtree: String,
        /// The group's prefix.
        prefix: String,
    },
    /// The member's key was not published in time.
    #[error("not joined after {waited:?}: is a server active and reachable?")]
    JoinTimeout {
        /// How long it waited.
        waited: Duration,
    },
}

struct Shared {
    machine: Mutex<Machine>,
    link: Link,
    clock: Clock,
    events: SyncSender<Event>,
    dropped: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock leaves a machine that is still consistent
        // between calls: keep using it.
        self.machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Carries out the machine's writes and queues its events.
    fn drain(&self, machine: &mut Machine) -> Result<(), ClientError> {
        let mut result = Ok(());
        while let Some(output) = machine.poll_output() {
            match output {
                Output::Write { key, value, ttl } => {
                    let written = self.link.update(&key, value.map(|value| (value, ttl)));
                    if result.is_ok() {
                        result = written;
                    }
                }
                Output::Event(event) => match self.events.try_send(event) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    // Nobody reads events any more: the handle is gone.
                    Err(TrySendError::Disconnected(_)) => {}
                },
            }
        }
        result
    }
}

/// A member of a group (or an observer, with [`Client::observe`]). Dropping it leaves
/// the group.
pub struct Group {
    shared: Arc<Shared>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("config", self.shared.lock().config())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Joins group `group` as `member`: publishes the member's key and keeps its lease
    /// alive until [`Group::leave`] or drop. The client must follow a subtree that
    /// contains `/_group/<group>/`.
    pub fn join(
        &self,
        group: &str,
        member: &str,
        options: GroupOptions,
    ) -> Result<Group, GroupCallError> {
        Group::start(self, Some(member), group, options, true)
    }

    /// Acts for `member` without publishing its key: to cast that member's ballot or
    /// request a vote from another process (the CLI's `group ballot` and `group vote`).
    /// Its votes count only if `member` is among the request's voters.
    pub fn act_as(
        &self,
        group: &str,
        member: &str,
        options: GroupOptions,
    ) -> Result<Group, GroupCallError> {
        Group::start(self, Some(member), group, options, false)
    }

    /// Follows group `group` without joining it: members, leader, votes.
    pub fn observe(&self, group: &str, options: GroupOptions) -> Result<Group, GroupCallError> {
        Group::start(self, None, group, options, false)
    }
}

impl Group {
    fn start(
        client: &Client,
        member: Option<&str>,
        group: &str,
        options: GroupOptions,
        join: bool,
    ) -> Result<Group, GroupCallError> {
        let config = Config {
            member: member.map(str::to_owned),
            lease: options.lease,
            refresh: options.refresh,
            min_size: options.min_size,
            message_ttl: options.message_ttl,
            ..Config::observer(group)
        };
        let mut machine = Machine::new(config)?;
        if !machine.prefix().starts_with(client.subtree()) {
            return Err(GroupCallError::OutsideSubtree {
                subtree: String::from_utf8_lossy(client.subtree()).into_owned(),
                prefix: String::from_utf8_lossy(machine.prefix()).into_owned(),
            });
        }
        let link = client.link();
        let clock = Clock::new();
        // Subscribe before reading the state: no change falls between the two.
        let changes = link.subscribe();
        let (sequence, entries) = link.dump_at(machine.prefix())?;
        let now = clock.now();
        machine.handle_resync(now, sequence, flatten(entries));
        if join {
            machine.join(now)?;
        }
        let (events_in, events) = mpsc::sync_channel(options.event_capacity.max(1));
        let shared = Arc::new(Shared {
            machine: Mutex::new(machine),
            link,
            clock,
            events: events_in,
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        {
            let mut machine = shared.lock();
            shared.drain(&mut machine)?;
        }
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("clonekv-group".to_string())
            .spawn(move || follow(&thread_shared, &changes, sequence))
            .map_err(ClientError::Io)?;
        Ok(Group {
            shared,
            events,
            thread: Some(thread),
        })
    }

    /// Waits until this member's key is published, at most `timeout`; returns its join
    /// sequence.
    pub fn wait_joined(&self, timeout: Duration) -> Result<i64, GroupCallError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(join) = self.join_sequence() {
                return Ok(join);
            }
            if std::time::Instant::now() >= deadline {
                return Err(GroupCallError::JoinTimeout { waited: timeout });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// This member's join sequence, once its key is published.
    pub fn join_sequence(&self) -> Option<i64> {
        self.shared.lock().join_sequence()
    }

    /// The leader and its fencing token.
    pub fn leader(&self) -> Option<(String, i64)> {
        self.shared
            .lock()
            .leader()
            .map(|(member, token)| (member.to_owned(), token))
    }

    /// True when this member leads.
    pub fn is_leader(&self) -> bool {
        self.shared.lock().is_leader()
    }

    /// The leader's fencing token: stamp actions with it; a resource that refuses tokens
    /// below the largest it has seen refuses a deposed leader.
    pub fn fencing_token(&self) -> Option<i64> {
        self.shared.lock().fencing_token()
    }

    /// The group's fence: the largest token a leader has written. A member whose join
    /// sequence is below it cannot lead (DECISIONS.md, "Groups").
    pub fn fence(&self) -> i64 {
        self.shared.lock().fence()
    }

    /// Live members and their join sequences, in member order.
    pub fn members(&self) -> Vec<(String, i64)> {
        self.shared
            .lock()
            .members()
            .map(|(member, join)| (member.to_owned(), join))
            .collect()
    }

    /// Number of live members.
    pub fn size(&self) -> usize {
        self.shared.lock().size()
    }

    /// The sequence the facts were last computed at.
    pub fn sequence(&self) -> i64 {
        self.shared.lock().sequence()
    }

    /// Open votes.
    pub fn open_votes(&self) -> Vec<Request> {
        self.shared.lock().open_votes().cloned().collect()
    }

    /// The result of a decided vote.
    pub fn decision(&self, vote: &str) -> Option<Decision> {
        self.shared.lock().decision(vote).cloned()
    }

    /// Asks every live member to vote on `topic`; decided by `kind`'s rule, or
    /// [`Outcome::Timeout`] after `timeout`. Returns the vote id.
    pub fn request_vote(
        &self,
        topic: &[u8],
        kind: Kind,
        timeout: Duration,
    ) -> Result<String, GroupCallError> {
        self.call(|machine| machine.request_vote(topic, kind, timeout))
    }

    /// Votes yes or no in an open vote (once).
    pub fn vote(&self, vote: &str, yes: bool) -> Result<(), GroupCallError> {
        self.call(|machine| machine.vote(vote, yes))
    }

    /// Sends `payload` to every other member.
    pub fn send(&self, payload: &[u8]) -> Result<(), GroupCallError> {
        self.call(|machine| machine.send(Recipient::All, payload))
    }

    /// Sends `payload` to whoever leads at the message's sequence.
    pub fn send_to_leader(&self, payload: &[u8]) -> Result<(), GroupCallError> {
        self.call(|machine| machine.send(Recipient::Leader, payload))
    }

    /// Sends `payload` to one member.
    pub fn send_to_member(&self, member: &str, payload: &[u8]) -> Result<(), GroupCallError> {
        clonekv_core::group::validate_name(member)?;
        self.call(|machine| machine.send(Recipient::Member(member.to_owned()), payload))
    }

    /// The next group event, waiting at most `timeout`; `None` on timeout or once the
    /// group has stopped.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Events dropped because [`GroupOptions::event_capacity`] were waiting.
    pub fn events_dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Leaves the group: deletes the member's key and stops.
    pub fn leave(mut self) -> Result<(), GroupCallError> {
        self.stop()
    }

    /// Stops following and renewing without deleting the member's key, as a crash
    /// would: the other members see it leave when its lease runs out (benchmarks and
    /// tests of failure handling).
    pub fn abandon(mut self) {
        if let Some(thread) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }

    fn stop(&mut self) -> Result<(), GroupCallError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Leave first: the machine stops renewing under the lock, so the thread cannot
        // write the key again after its delete, and the others see the leave at once.
        let left = {
            let mut machine = self.shared.lock();
            if machine.is_joined_or_joining() {
                machine
                    .leave()
                    .map_err(GroupCallError::from)
                    .and_then(|()| {
                        self.shared
                            .drain(&mut machine)
                            .map_err(GroupCallError::from)
                    })
            } else {
                Ok(())
            }
        };
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = thread.join();
        left
    }

    fn call<T>(
        &self,
        action: impl FnOnce(&mut Machine) -> Result<T, GroupError>,
    ) -> Result<T, GroupCallError> {
        let mut machine = self.shared.lock();
        let value = action(&mut machine)?;
        self.shared.drain(&mut machine)?;
        Ok(value)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Waits at most this long between checks of the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// The group thread: feeds the client's changes to the machine and fires its timer.
/// `resynced`: the sequence of the state read last; changes at or below it are in it.
fn follow(shared: &Shared, changes: &Events, mut resynced: i64) {
    while !shared.stop.load(Ordering::Relaxed) {
        let now = shared.clock.now();
        let wait = {
            let machine = shared.lock();
            shared
                .clock
                .sleep_until(now, machine.poll_timeout())
                .map_or(STOP_CHECK, |wait| wait.min(STOP_CHECK))
        };
        let received = match changes.recv_timeout(wait) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                tracing::warn!("group stopped: its client stopped");
                return;
            }
        };
        let mut machine = shared.lock();
        let now = shared.clock.now();
        if let Some(event) = received {
            match event {
                ClientEvent::Updated {
                    key,
                    value,
                    sequence,
                } if sequence > resynced => machine.handle_change(
                    now,
                    Change::Set {
                        key,
                        value,
                        sequence,
                    },
                ),
                ClientEvent::Deleted { key, sequence } if sequence > resynced => {
                    machine.handle_change(now, Change::Delete { key, sequence });
                }
                ClientEvent::Synced { .. } | ClientEvent::Lagged { .. } => {
                    match shared.link.dump_at(machine.prefix()) {
                        Ok((sequence, entries)) => {
                            resynced = sequence;
                            machine.handle_resync(now, sequence, flatten(entries));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "group stopped: its client stopped");
                            return;
                        }
                    }
                }
                _ => {}
            }
        }
        if machine.poll_timeout().is_some_and(|due| due <= now) {
            machine.handle_timeout(now);
        }
        if let Err(error) = shared.drain(&mut machine) {
            tracing::warn!(%error, "a group write failed");
        }
    }
}

fn flatten(
    entries: Vec<(Vec<u8>, crate::client::Entry)>,
) -> impl Iterator<Item = (Vec<u8>, Vec<u8>, i64)> {
    entries
        .into_iter()
        .map(|(key, entry)| (key, entry.value, entry.sequence))
}
