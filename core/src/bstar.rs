//! Binary Star: the primary/backup failover state machine (PROTOCOL.md §7).
//!
//! Two servers exchange their [`BstarState`] every heartbeat. Each side feeds what it
//! hears into [`Bstar::handle_peer_state`] and every client snapshot request (an
//! ICANHAZ? on the voter socket) into [`Bstar::handle_client_request`], which answers
//! [`Verdict::Accept`] or [`Verdict::Reject`]. Peer liveness is computed from the `now`
//! the host passes in: each state message pushes the peer's expiry to `now + peer_expiry`.
//!
//! | state   | event                      | result                                         |
//! |---------|----------------------------|------------------------------------------------|
//! | PRIMARY | PEER_BACKUP                | → ACTIVE                                       |
//! | PRIMARY | PEER_ACTIVE                | → PASSIVE                                      |
//! | PRIMARY | CLIENT_REQUEST             | peer expired: → ACTIVE, accept; else reject    |
//! | BACKUP  | PEER_ACTIVE                | → PASSIVE                                      |
//! | BACKUP  | CLIENT_REQUEST             | reject                                         |
//! | ACTIVE  | PEER_ACTIVE                | dual active: the backup steps down → PASSIVE   |
//! | ACTIVE  | CLIENT_REQUEST             | accept                                         |
//! | PASSIVE | PEER_PRIMARY, PEER_BACKUP  | peer restarted: → ACTIVE                       |
//! | PASSIVE | PEER_PASSIVE               | dual passive: the primary takes over → ACTIVE  |
//! | PASSIVE | CLIENT_REQUEST             | peer expired: failover → ACTIVE, accept; else reject |
//!
//! Every other pair changes nothing. A passive server never promotes itself on a timer:
//! only a client's request while the peer looks dead does it. The reference aborts on
//! dual active and dual passive; here both resolve by role, and are reported loudly
//! through [`Output::DualActive`] and [`Output::DualPassive`].
//!
//! Only a primary ever announces PRIMARY, and only a backup BACKUP. A primary that hears
//! PEER_PRIMARY, or a backup that hears PEER_BACKUP, is paired with a server of its own
//! role: a misconfiguration the table cannot resolve (two undecided servers reject every
//! client for ever). It changes nothing, and is reported with
//! [`Output::RoleConflict`] on every such message, for the host to log at its own rate.
//!
//! The machine sends its state at start, on every change, and every heartbeat
//! ([`Output::SendState`]). Drain [`Bstar::poll_output`] after every call.
//!
//! ```
//! use std::time::Duration;
//! use clonekv_core::bstar::{Bstar, Config, Output, Verdict};
//! use clonekv_core::kvmsg::BstarState;
//! use clonekv_core::time::Instant;
//!
//! let start = Instant::ZERO;
//! let mut primary = Bstar::new(start, Config::primary()).unwrap();
//! primary.handle_peer_state(start, BstarState::Backup);
//! assert_eq!(primary.state(), BstarState::Active);
//! assert_eq!(primary.handle_client_request(start), Verdict::Accept);
//! while let Some(output) = primary.poll_output() {
//!     if let Output::SendState(state) = output {
//!         let _frame = state.encode(); // send it on the peer PUB socket
//!     }
//! }
//! // The first heartbeat is due at once, then every second.
//! assert_eq!(primary.poll_timeout(), Some(start));
//! primary.handle_timeout(start);
//! assert_eq!(primary.poll_output(), Some(Output::SendState(BstarState::Active)));
//! assert_eq!(primary.poll_timeout(), Some(start + Duration::from_secs(1)));
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::kvmsg::BstarState;
use crate::time::Instant;

/// Which server of the pair this is. Fixed by configuration; the role decides who wins
/// the dual-active and dual-passive resolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Starts in [`BstarState::Primary`]; stays active on dual active, takes over on dual
    /// passive.
    Primary,
    /// Starts in [`BstarState::Backup`]; steps down on dual active.
    Backup,
}

impl Role {
    /// The state a freshly started server of this role is in.
    pub fn initial_state(self) -> BstarState {
        match self {
            Role::Primary => BstarState::Primary,
            Role::Backup => BstarState::Backup,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// Why a configuration is unusable. Returned by `validate()` and by constructors; never
/// caused by network input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration or count that must be positive is zero: a zero heartbeat would spin the
    /// timer, a zero limit would make the server unable to do its job.
    #[error("{field} must be greater than zero")]
    Zero {
        /// The offending field.
        field: &'static str,
    },
    /// A byte budget is smaller than one largest valid message, which it must hold.
    #[error("{field} must be at least {needed} bytes (one largest message under the size limits)")]
    BelowLargestMessage {
        /// The offending field.
        field: &'static str,
        /// The least it may be.
        needed: usize,
    },
}

/// Binary Star timing and role. Defaults from PROTOCOL.md §3 and §7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// This server's role in the pair.
    pub role: Role,
    /// Interval between state messages to the peer (1 s).
    pub heartbeat: Duration,
    /// The peer counts as dead after this many heartbeats without a state message (2).
    /// Below 2 a single late message makes the peer look dead.
    pub peer_expiry_beats: u32,
}

impl Config {
    /// The defaults for the primary.
    pub fn primary() -> Self {
        Config {
            role: Role::Primary,
            heartbeat: Duration::from_secs(1),
            peer_expiry_beats: 2,
        }
    }

    /// The defaults for the backup.
    pub fn backup() -> Self {
        Config {
            role: Role::Backup,
            ..Config::primary()
        }
    }

    /// How long the peer stays alive after its last state message.
    pub fn peer_expiry(&self) -> Duration {
        self.heartbeat.saturating_mul(self.peer_expiry_beats)
    }

    /// Checks that the configuration is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat.is_zero() {
            return Err(ConfigError::Zero { field: "heartbeat" });
        }
        if self.peer_expiry_beats == 0 {
            return Err(ConfigError::Zero {
                field: "peer_expiry_beats",
            });
        }
        Ok(())
    }
}

/// The answer to a client's snapshot request. A rejected request gets no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve the request.
    Accept,
    /// Drop the request without replying.
    Reject,
}

/// What made the state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// Started as primary and heard the backup: the primary serves.
    PeerIsBackup,
    /// Heard that the peer is active: follow it.
    PeerIsActive,
    /// A client asked while the peer was silent for longer than its expiry.
    ClientRequestWhilePeerSilent,
    /// The peer came back as PRIMARY or BACKUP: it restarted and holds nothing, so the
    /// passive side takes over.
    PeerRestarted,
    /// Both sides were passive; the primary takes over.
    DualPassive,
    /// Both sides were active; the backup steps down.
    DualActive,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::PeerIsBackup => "peer is backup",
            Cause::PeerIsActive => "peer is active",
            Cause::ClientRequestWhilePeerSilent => "client request while peer silent",
            Cause::PeerRestarted => "peer restarted",
            Cause::DualPassive => "dual passive",
            Cause::DualActive => "dual active",
        })
    }
}

/// An effect for the host to carry out, or a fact for it to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this state to the peer (one frame: [`BstarState::encode`]).
    SendState(BstarState),
    /// The state changed.
    StateChanged {
        /// The state before.
        from: BstarState,
        /// The state now.
        to: BstarState,
        /// Why.
        cause: Cause,
    },
    /// Both servers were active (split brain healed). Log loudly.
    DualActive {
        /// True on the backup, which stepped down to passive; false on the primary,
        /// which stays active.
        stepped_down: bool,
    },
    /// Both servers were passive. Log loudly.
    DualPassive {
        /// True on the primary, which became active; false on the backup.
        took_over: bool,
    },
    /// The peer announced the initial state of this server's own role (PRIMARY to a
    /// primary, BACKUP to a backup): both servers are configured with the same role.
    /// Emitted for every such state message (one per peer heartbeat while it lasts).
    /// Log loudly: while both are undecided, no client is ever served.
    RoleConflict {
        /// The role both servers have.
        role: Role,
    },
}

/// The Binary Star state machine of one server.
///
/// Outputs queue in call order; drain them with [`Bstar::poll_output`] after every
/// `handle_*` call.
#[derive(Clone, Debug)]
pub struct Bstar {
    config: Config,
    state: BstarState,
    /// The state the peer last reported, if it reported any.
    peer_state: Option<BstarState>,
    /// The peer counts as alive while `now < peer_expiry`.
    peer_expiry: Instant,
    next_heartbeat: Instant,
    outputs: VecDeque<Output>,
}

impl Bstar {
    /// A machine in its role's initial state. The peer gets a full expiry period to speak
    /// up before a client request can promote this side, and the first state message is
    /// due at once.
    pub fn new(now: Instant, config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Bstar {
            state: config.role.initial_state(),
            peer_state: None,
            peer_expiry: now + config.peer_expiry(),
            next_heartbeat: now,
            outputs: VecDeque::new(),
            config,
        })
    }

    /// The current state.
    pub fn state(&self) -> BstarState {
        self.state
    }

    /// This server's role.
    pub fn role(&self) -> Role {
        self.config.role
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The state the peer last reported, if any.
    pub fn peer_state(&self) -> Option<BstarState> {
        self.peer_state
    }

    /// The instant from which the peer counts as dead unless it speaks again.
    pub fn peer_expiry(&self) -> Instant {
        self.peer_expiry
    }

    /// True while the peer's last state message is recent enough.
    pub fn peer_is_alive(&self, now: Instant) -> bool {
        now < self.peer_expiry
    }

    /// True when the peer's last state message was the initial state of this server's
    /// own role: both servers are configured with the same role (see
    /// [`Output::RoleConflict`]).
    pub fn role_conflict(&self) -> bool {
        self.peer_state == Some(self.config.role.initial_state())
    }

    /// A state message from the peer (events PEER_PRIMARY … PEER_PASSIVE).
    pub fn handle_peer_state(&mut self, now: Instant, peer: BstarState) {
        self.peer_state = Some(peer);
        self.peer_expiry = now + self.config.peer_expiry();
        let role = self.config.role;
        if peer == role.initial_state() {
            self.outputs.push_back(Output::RoleConflict { role });
        }
        match (self.state, peer) {
            (BstarState::Primary, BstarState::Backup) => {
                self.change(BstarState::Active, Cause::PeerIsBackup);
            }
            (BstarState::Primary | BstarState::Backup, BstarState::Active) => {
                self.change(BstarState::Passive, Cause::PeerIsActive);
            }
            (BstarState::Active, BstarState::Active) => {
                let stepped_down = role == Role::Backup;
                self.outputs.push_back(Output::DualActive { stepped_down });
                if stepped_down {
                    self.change(BstarState::Passive, Cause::DualActive);
                }
            }
            (BstarState::Passive, BstarState::Primary | BstarState::Backup) => {
                self.change(BstarState::Active, Cause::PeerRestarted);
            }
            (BstarState::Passive, BstarState::Passive) => {
                let took_over = role == Role::Primary;
                self.outputs.push_back(Output::DualPassive { took_over });
                if took_over {
                    self.change(BstarState::Active, Cause::DualPassive);
                }
            }
            _ => {}
        }
    }

    /// A client's snapshot request on the voter socket (event CLIENT_REQUEST). Decides
    /// whether it is served; may promote this server.
    pub fn handle_client_request(&mut self, now: Instant) -> Verdict {
        match self.state {
            BstarState::Active => Verdict::Accept,
            BstarState::Primary | BstarState::Passive if !self.peer_is_alive(now) => {
                self.change(BstarState::Active, Cause::ClientRequestWhilePeerSilent);
                Verdict::Accept
            }
            BstarState::Primary | BstarState::Backup | BstarState::Passive => Verdict::Reject,
        }
    }

    /// The next instant [`Bstar::handle_timeout`] has work: the next heartbeat.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_heartbeat)
    }

    /// Sends the heartbeat when it is due. Never changes state: peer expiry only matters
    /// when a client asks.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_heartbeat {
            self.outputs.push_back(Output::SendState(self.state));
            self.next_heartbeat = now + self.config.heartbeat;
        }
    }

    /// The next output, oldest first.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn change(&mut self, to: BstarState, cause: Cause) {
        let from = self.state;
        self.state = to;
        self.outputs
            .push_back(Output::StateChanged { from, to, cause });
        // Tell the peer at once rather than at the next beat: the pair converges (and a
        // dual active resolves) a heartbeat sooner.
        self.outputs.push_back(Output::SendState(to));
    }
}

#[cfg(test)]
mod tests;
