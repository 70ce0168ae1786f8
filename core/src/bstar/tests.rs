use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const TRANSITIONS: &str = include_str!("testdata/transitions.txt");
const START: Instant = Instant::from_millis(10_000);

fn config(role: Role) -> Config {
    match role {
        Role::Primary => Config::primary(),
        Role::Backup => Config::backup(),
    }
}

/// A machine of `role` that is already in `state`, with no outputs queued.
fn machine_in(role: Role, state: BstarState) -> Bstar {
    let mut machine = Bstar::new(START, config(role)).unwrap();
    machine.state = state;
    machine.outputs.clear();
    machine
}

fn drain(machine: &mut Bstar) -> Vec<Output> {
    std::iter::from_fn(|| machine.poll_output()).collect()
}

// --- The golden decision table -------------------------------------------------------

#[derive(Debug)]
enum TableEvent {
    Peer(BstarState),
    ClientRequest,
}

#[derive(Debug)]
struct Row {
    line: usize,
    role: Role,
    state: BstarState,
    event: TableEvent,
    peer_alive: Option<bool>,
    next: BstarState,
    verdict: Option<Verdict>,
    signal: Option<Output>,
}

fn parse_state(word: &str) -> BstarState {
    match word {
        "PRIMARY" => BstarState::Primary,
        "BACKUP" => BstarState::Backup,
        "ACTIVE" => BstarState::Active,
        "PASSIVE" => BstarState::Passive,
        other => panic!("unknown state {other:?}"),
    }
}

fn parse_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (index, line) in TRANSITIONS.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let [role, state, event, peer, next, verdict, signal] = words[..] else {
            panic!("line {line_number}: expected 7 columns: {line:?}");
        };
        let role = match role {
            "primary" => Role::Primary,
            "backup" => Role::Backup,
            other => panic!("line {line_number}: unknown role {other:?}"),
        };
        let event = match event {
            "CLIENT_REQUEST" => TableEvent::ClientRequest,
            peer_event => TableEvent::Peer(parse_state(
                peer_event
                    .strip_prefix("PEER_")
                    .unwrap_or_else(|| panic!("line {line_number}: unknown event {event:?}")),
            )),
        };
        let peer_alive = match peer {
            "alive" => Some(true),
            "expired" => Some(false),
            "-" => None,
            other => panic!("line {line_number}: unknown peer liveness {other:?}"),
        };
        let verdict = match verdict {
            "accept" => Some(Verdict::Accept),
            "reject" => Some(Verdict::Reject),
            "-" => None,
            other => panic!("line {line_number}: unknown verdict {other:?}"),
        };
        let signal = match signal {
            "dual-active:stepped-down" => Some(Output::DualActive { stepped_down: true }),
            "dual-active:stays" => Some(Output::DualActive {
                stepped_down: false,
            }),
            "dual-passive:took-over" => Some(Output::DualPassive { took_over: true }),
            "dual-passive:stays" => Some(Output::DualPassive { took_over: false }),
            "role-conflict" => Some(Output::RoleConflict { role }),
            "-" => None,
            other => panic!("line {line_number}: unknown signal {other:?}"),
        };
        rows.push(Row {
            line: line_number,
            role,
            state: parse_state(state),
            event,
            peer_alive,
            next: parse_state(next),
            verdict,
            signal,
        });
    }
    rows
}

#[test]
fn every_row_of_the_transition_table_holds() {
    let rows = parse_rows();
    for row in &rows {
        let mut machine = machine_in(row.role, row.state);
        let expiry = machine.peer_expiry();
        let verdict = match row.event {
            TableEvent::Peer(peer) => {
                let now = START + Duration::from_millis(500);
                machine.handle_peer_state(now, peer);
                assert_eq!(
                    machine.peer_expiry(),
                    now + Duration::from_secs(2),
                    "line {}: a peer message must push the expiry to now + 2 beats",
                    row.line
                );
                assert_eq!(machine.peer_state(), Some(peer), "line {}", row.line);
                None
            }
            TableEvent::ClientRequest => {
                let now = match row.peer_alive {
                    Some(true) => Instant::from_nanos(expiry.as_nanos() - 1),
                    Some(false) => expiry,
                    None => panic!("line {}: CLIENT_REQUEST needs alive/expired", row.line),
                };
                Some(machine.handle_client_request(now))
            }
        };
        assert_eq!(machine.state(), row.next, "line {}: next state", row.line);
        assert_eq!(verdict, row.verdict, "line {}: verdict", row.line);

        let outputs = drain(&mut machine);
        let signals: Vec<Output> = outputs
            .iter()
            .copied()
            .filter(|output| {
                matches!(
                    output,
                    Output::DualActive { .. }
                        | Output::DualPassive { .. }
                        | Output::RoleConflict { .. }
                )
            })
            .collect();
        assert_eq!(
            signals,
            row.signal.into_iter().collect::<Vec<_>>(),
            "line {}: loud signal",
            row.line
        );
        let changes: Vec<Output> = outputs
            .iter()
            .copied()
            .filter(|output| {
                !matches!(
                    output,
                    Output::DualActive { .. }
                        | Output::DualPassive { .. }
                        | Output::RoleConflict { .. }
                )
            })
            .collect();
        if row.next == row.state {
            assert!(
                changes.is_empty(),
                "line {}: no change expected, got {changes:?}",
                row.line
            );
        } else {
            assert!(
                matches!(
                    changes[..],
                    [Output::StateChanged { from, to, .. }, Output::SendState(sent)]
                        if from == row.state && to == row.next && sent == row.next
                ),
                "line {}: expected a change announced to the peer, got {changes:?}",
                row.line
            );
        }
    }
}

#[test]
fn the_transition_table_covers_every_reachable_state_and_event_exactly_once() {
    let rows = parse_rows();
    let mut seen = BTreeSet::new();
    for row in &rows {
        let event = match row.event {
            TableEvent::Peer(peer) => format!("PEER_{peer}"),
            TableEvent::ClientRequest => "CLIENT_REQUEST".to_string(),
        };
        let key = (row.role, row.state, event, row.peer_alive);
        assert!(
            seen.insert(key.clone()),
            "line {}: duplicate row {key:?}",
            row.line
        );
    }
    let mut expected = BTreeSet::new();
    for role in [Role::Primary, Role::Backup] {
        for state in [
            role.initial_state(),
            BstarState::Active,
            BstarState::Passive,
        ] {
            for peer in BstarState::ALL {
                expected.insert((role, state, format!("PEER_{peer}"), None));
            }
            for alive in [true, false] {
                expected.insert((role, state, "CLIENT_REQUEST".to_string(), Some(alive)));
            }
        }
    }
    assert_eq!(seen, expected);
}

#[test]
fn two_servers_of_one_role_never_serve_and_say_so_at_every_state_message() {
    for role in [Role::Primary, Role::Backup] {
        let mut one = Bstar::new(START, config(role)).unwrap();
        let mut other = Bstar::new(START, config(role)).unwrap();
        let mut now = START;
        let mut conflicts = 0;
        for _ in 0..10 {
            now += Duration::from_secs(1);
            let from_one = announce(&mut one, now);
            let from_other = announce(&mut other, now);
            for state in from_one {
                other.handle_peer_state(now, state);
            }
            for state in from_other {
                one.handle_peer_state(now, state);
            }
            for machine in [&mut one, &mut other] {
                assert_eq!(machine.handle_client_request(now), Verdict::Reject);
                assert!(machine.role_conflict());
                conflicts += drain(machine)
                    .iter()
                    .filter(|output| **output == Output::RoleConflict { role })
                    .count();
            }
        }
        assert_eq!(
            one.state(),
            role.initial_state(),
            "{role}: undecided for ever"
        );
        assert_eq!(other.state(), role.initial_state());
        // One report per state message heard: each side heard ten heartbeats.
        assert_eq!(conflicts, 20, "{role}");
    }
}

/// Fires the machine's heartbeat and returns the states it sent.
fn announce(machine: &mut Bstar, now: Instant) -> Vec<BstarState> {
    machine.handle_timeout(now);
    drain(machine)
        .into_iter()
        .filter_map(|output| match output {
            Output::SendState(state) => Some(state),
            _ => None,
        })
        .collect()
}

#[test]
fn a_proper_pair_reports_no_role_conflict() {
    let mut primary = Bstar::new(START, Config::primary()).unwrap();
    let mut backup = Bstar::new(START, Config::backup()).unwrap();
    primary.handle_peer_state(START, BstarState::Backup);
    backup.handle_peer_state(START, BstarState::Active);
    assert!(!primary.role_conflict() && !backup.role_conflict());
    let outputs = [drain(&mut primary), drain(&mut backup)].concat();
    assert!(outputs
        .iter()
        .all(|output| !matches!(output, Output::RoleConflict { .. })));
}

// --- Timing -----------------------------------------------------------------------

#[test]
fn a_new_machine_announces_its_state_at_once_then_every_heartbeat() {
    let mut machine = Bstar::new(START, Config::backup()).unwrap();
    assert_eq!(machine.poll_timeout(), Some(START));
    machine.handle_timeout(START);
    assert_eq!(drain(&mut machine), [Output::SendState(BstarState::Backup)]);
    assert_eq!(machine.poll_timeout(), Some(START + Duration::from_secs(1)));

    machine.handle_timeout(START + Duration::from_millis(999));
    assert!(drain(&mut machine).is_empty(), "not due yet");
    machine.handle_timeout(START + Duration::from_secs(1));
    assert_eq!(drain(&mut machine), [Output::SendState(BstarState::Backup)]);
}

#[test]
fn at_start_the_peer_gets_two_heartbeats_before_a_client_can_promote_the_primary() {
    let mut machine = Bstar::new(START, Config::primary()).unwrap();
    let almost = START + Duration::from_millis(1_999);
    assert_eq!(machine.handle_client_request(almost), Verdict::Reject);
    assert_eq!(machine.state(), BstarState::Primary);
    let expired = START + Duration::from_secs(2);
    assert_eq!(machine.handle_client_request(expired), Verdict::Accept);
    assert_eq!(machine.state(), BstarState::Active);
}

#[test]
fn a_passive_server_never_promotes_itself_on_a_timer() {
    let mut machine = machine_in(Role::Backup, BstarState::Passive);
    let mut now = START;
    for _ in 0..10 {
        now += Duration::from_secs(1);
        machine.handle_timeout(now);
    }
    assert!(!machine.peer_is_alive(now));
    assert_eq!(machine.state(), BstarState::Passive);
    assert!(drain(&mut machine)
        .iter()
        .all(|output| *output == Output::SendState(BstarState::Passive)));
}

#[test]
fn every_peer_message_keeps_the_peer_alive_for_another_two_beats() {
    let mut machine = machine_in(Role::Backup, BstarState::Passive);
    let mut now = START;
    for _ in 0..5 {
        now += Duration::from_millis(1_900);
        machine.handle_peer_state(now, BstarState::Active);
        assert_eq!(
            machine.handle_client_request(now + Duration::from_millis(1_999)),
            Verdict::Reject
        );
    }
    assert_eq!(machine.state(), BstarState::Passive);
}

#[test]
fn longer_configured_expiry_delays_failover() {
    let mut config = Config::backup();
    config.peer_expiry_beats = 5;
    let mut machine = Bstar::new(START, config).unwrap();
    machine.handle_peer_state(START, BstarState::Active);
    assert_eq!(
        machine.handle_client_request(START + Duration::from_millis(4_999)),
        Verdict::Reject
    );
    assert_eq!(
        machine.handle_client_request(START + Duration::from_secs(5)),
        Verdict::Accept
    );
}

#[test]
fn zero_heartbeat_or_zero_expiry_is_an_invalid_config() {
    let mut config = Config::primary();
    config.heartbeat = Duration::ZERO;
    assert_eq!(
        Bstar::new(START, config).unwrap_err(),
        ConfigError::Zero { field: "heartbeat" }
    );
    let mut config = Config::primary();
    config.peer_expiry_beats = 0;
    assert_eq!(
        config.validate(),
        Err(ConfigError::Zero {
            field: "peer_expiry_beats"
        })
    );
    assert_eq!(Config::backup().validate(), Ok(()));
}

// --- Two machines wired to each other ------------------------------------------------

/// One direction of the server-to-server PUB/SUB link: in order, fixed latency, and
/// when cut, messages are lost (the connection broke).
#[derive(Debug, Default)]
struct Link {
    in_flight: VecDeque<(Instant, BstarState)>,
    cut: bool,
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Primary,
    Backup,
}

#[derive(Clone, Debug)]
enum Step {
    /// Let time pass, delivering messages and firing timers in order.
    Wait(Duration),
    /// A client's ICANHAZ? reaches one server.
    ClientRequest(Side),
    /// Break the link from one side to the other.
    Cut(Side),
    /// Repair the link from one side to the other.
    Heal(Side),
    /// A server crashes and restarts with a fresh machine.
    Restart(Side),
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Primary), Just(Side::Backup)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..3_000).prop_map(|millis| Step::Wait(Duration::from_millis(millis))),
        4 => side().prop_map(Step::ClientRequest),
        1 => side().prop_map(Step::Cut),
        1 => side().prop_map(Step::Heal),
        1 => side().prop_map(Step::Restart),
    ]
}

struct Pair {
    now: Instant,
    latency: Duration,
    primary: Bstar,
    backup: Bstar,
    /// Primary → backup.
    to_backup: Link,
    /// Backup → primary.
    to_primary: Link,
    /// While both links are up: the last disturbance. `None` while a link is cut.
    undisturbed_since: Option<Instant>,
}

impl Pair {
    fn new(latency: Duration) -> Self {
        Pair {
            now: START,
            latency,
            primary: Bstar::new(START, Config::primary()).unwrap(),
            backup: Bstar::new(START, Config::backup()).unwrap(),
            to_backup: Link::default(),
            to_primary: Link::default(),
            undisturbed_since: Some(START),
        }
    }

    /// Moves each machine's outputs onto its outgoing link.
    fn flush(&mut self) {
        let deliver_at = self.now + self.latency;
        for (machine, link) in [
            (&mut self.primary, &mut self.to_backup),
            (&mut self.backup, &mut self.to_primary),
        ] {
            while let Some(output) = machine.poll_output() {
                if let Output::SendState(state) = output {
                    if !link.cut {
                        link.in_flight.push_back((deliver_at, state));
                    }
                }
            }
        }
    }

    fn next_event(&self) -> Option<Instant> {
        [
            self.primary.poll_timeout(),
            self.backup.poll_timeout(),
            self.to_backup.in_flight.front().map(|(at, _)| *at),
            self.to_primary.in_flight.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn run_until(&mut self, until: Instant) {
        while let Some(at) = self.next_event().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.primary.handle_timeout(self.now);
            self.backup.handle_timeout(self.now);
            while let Some(&(due, state)) = self.to_backup.in_flight.front() {
                if due > self.now {
                    break;
                }
                self.to_backup.in_flight.pop_front();
                self.backup.handle_peer_state(self.now, state);
                // Whatever the history, a backup never stays active once it hears that
                // the primary is active.
                if state == BstarState::Active {
                    assert_ne!(self.backup.state(), BstarState::Active);
                }
            }
            while let Some(&(due, state)) = self.to_primary.in_flight.front() {
                if due > self.now {
                    break;
                }
                self.to_primary.in_flight.pop_front();
                self.primary.handle_peer_state(self.now, state);
            }
            self.flush();
            self.check();
        }
        self.now = until;
    }

    fn link_from(&mut self, side: Side) -> &mut Link {
        match side {
            Side::Primary => &mut self.to_backup,
            Side::Backup => &mut self.to_primary,
        }
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Wait(duration) => self.run_until(self.now + duration),
            Step::ClientRequest(side) => {
                let machine = match side {
                    Side::Primary => &mut self.primary,
                    Side::Backup => &mut self.backup,
                };
                let before = machine.state();
                machine.handle_client_request(self.now);
                if machine.state() != before {
                    self.disturbed();
                }
            }
            Step::Cut(side) => {
                let link = self.link_from(side);
                link.cut = true;
                link.in_flight.clear();
                self.undisturbed_since = None;
            }
            Step::Heal(side) => {
                self.link_from(side).cut = false;
                if !self.to_backup.cut && !self.to_primary.cut && self.undisturbed_since.is_none() {
                    self.undisturbed_since = Some(self.now);
                }
            }
            Step::Restart(Side::Primary) => {
                self.primary = Bstar::new(self.now, Config::primary()).unwrap();
                self.disturbed();
            }
            Step::Restart(Side::Backup) => {
                self.backup = Bstar::new(self.now, Config::backup()).unwrap();
                self.disturbed();
            }
        }
        self.flush();
        self.check();
    }

    fn disturbed(&mut self) {
        if let Some(since) = self.undisturbed_since.as_mut() {
            *since = self.now;
        }
    }

    /// "Both sides hear each other" means: both links are up, and every message sent
    /// before the last disturbance (a heal, a restart, a client request that changed a
    /// state), and every reaction to those stale messages, has been delivered, so each
    /// side knows the other's current state. A restarted server's last messages are
    /// still in flight when it comes back, and each stale message can flip its receiver
    /// once; two heartbeats and three latencies cover the longest such chain (stale
    /// ACTIVE: the backup steps down; its stale PASSIVE: the primary takes over; the
    /// backup hears ACTIVE and steps down). From then on there must never be two
    /// actives.
    fn check(&self) {
        let both_active =
            self.primary.state() == BstarState::Active && self.backup.state() == BstarState::Active;
        if let Some(since) = self.undisturbed_since {
            let settled = since + 2 * Duration::from_secs(1) + 3 * self.latency;
            assert!(
                !(both_active && self.now > settled),
                "two actives at {:?} although the pair hears each other since {since:?}",
                self.now
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn two_connected_machines_are_never_both_active_and_settle_on_exactly_one(
        latency in (0u64..800).prop_map(Duration::from_millis),
        steps in proptest::collection::vec(step(), 0..60),
    ) {
        let mut pair = Pair::new(latency);
        pair.flush();
        for step in &steps {
            pair.apply(step);
        }
        // Liveness: heal everything and wait; exactly one side ends up active once a
        // client has asked (a client request is what promotes a lone survivor).
        pair.apply(&Step::Heal(Side::Primary));
        pair.apply(&Step::Heal(Side::Backup));
        pair.apply(&Step::Wait(Duration::from_secs(5)));
        pair.apply(&Step::ClientRequest(Side::Primary));
        pair.apply(&Step::ClientRequest(Side::Backup));
        pair.apply(&Step::Wait(Duration::from_secs(5)));
        let actives = [pair.primary.state(), pair.backup.state()]
            .into_iter()
            .filter(|state| *state == BstarState::Active)
            .count();
        prop_assert_eq!(actives, 1, "primary {}, backup {}", pair.primary.state(), pair.backup.state());
    }
}

#[test]
fn roles_and_causes_read_as_distinct_lowercase_words_in_logs() {
    let roles: Vec<String> = [Role::Primary, Role::Backup]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(roles, ["primary", "backup"]);
    let causes: BTreeSet<String> = [
        Cause::PeerIsBackup,
        Cause::PeerIsActive,
        Cause::ClientRequestWhilePeerSilent,
        Cause::PeerRestarted,
        Cause::DualPassive,
        Cause::DualActive,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(causes.len(), 6, "{causes:?}");
    for cause in &causes {
        assert!(
            !cause.is_empty() && cause == &cause.to_lowercase(),
            "{cause:?}"
        );
    }
    assert!(causes.contains("dual active"), "{causes:?}");
}
