//! Update traffic: one publisher thread sends paced 5-frame KVSETs into a route (a CHP
//! server's collector, the raw relay, or straight to the subscribers), and the calling
//! thread receives them on M subscribers, counting only what arrives in order.
//!
//! Every message carries, in its body, the trial it belongs to, its index within the
//! trial and the time it was sent; the body travels unchanged through a CHP server (and
//! through the relay), so one receiver checks order, loss and latency for every route.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clonekv_zmq::curve::{self, KeyPair, PublicKey};
use hdrhistogram::Histogram;

use super::prefix::{Prefix, PREFIX_LEN};
use super::BenchError;

/// Bytes of the body header: trial (u32), publisher (u32), index (u64), sent-at
/// nanoseconds (u64).
pub const BODY_HEADER: usize = 24;
/// The sequence frame's length.
const SEQUENCE_LEN: usize = 8;
/// Messages drained from one subscriber before looking at the others.
const RECV_BATCH: usize = 1_024;
/// A flood never runs more than this many messages ahead of the slowest subscriber:
/// a closed loop that measures what the route can carry without filling (and dropping
/// at) its high-water marks, and leaves little to drain afterwards.
const FLOOD_WINDOW: u64 = 20_000;
/// A paced trial fails as soon as the slowest subscriber is this far behind the
/// publishers (a backlog is building inside the route): there is no point waiting.
const LAG_LIMIT: Duration = Duration::from_millis(100);

/// Set when the run is stopped by a signal: every publisher stops sending at once, so
/// that the run's keys can be removed without new ones arriving behind the removal.
static STOP_WRITING: AtomicBool = AtomicBool::new(false);

/// Stops every publisher of every session, for good.
pub fn stop_writing() {
    STOP_WRITING.store(true, Ordering::SeqCst);
}

fn writing_stopped() -> bool {
    STOP_WRITING.load(Ordering::Relaxed)
}

/// Where the publisher sends and where the subscribers listen.
#[derive(Clone, Debug)]
pub struct Route {
    /// Endpoints the publisher's PUB connects to (every server's collector, as a CHP
    /// client does) or, for the direct route, the one it binds.
    pub publish: Vec<String>,
    /// True when the publisher binds `publish[0]` (raw PUB → SUB).
    pub publisher_binds: bool,
    /// The endpoint every subscriber connects to.
    pub subscribe: String,
    /// A backup server's publisher: its HUGZ carry the sequence it has applied, so a
    /// trial also checks that the backup kept up.
    pub backup_publisher: Option<String>,
    /// CURVE keys for every socket of the route (`None`: plain ZMTP).
    pub curve: Option<RouteCurve>,
}

/// The CURVE keys of a route's sockets: the bench's own pair and the server's public key.
#[derive(Clone, Debug)]
pub struct RouteCurve {
    pub own: KeyPair,
    pub server: PublicKey,
}

impl RouteCurve {
    /// Makes `socket` a CURVE client of the server; before it connects.
    pub fn apply(curve: Option<&RouteCurve>, socket: &zmq::Socket) -> Result<(), BenchError> {
        match curve {
            Some(keys) => curve::make_client(socket, &keys.own, &keys.server)
                .map_err(|error| BenchError::new(format!("cannot set CURVE keys: {error}"))),
            None => Ok(()),
        }
    }
}

/// Sizes of the generated updates.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub key_len: usize,
    pub value_len: usize,
    /// Distinct keys the scattered key order cycles through.
    pub keyspace: u64,
    /// Every key starts with the run's prefix.
    pub prefix: Prefix,
}

impl Shape {
    /// The `index`-th key: the run's prefix and zero-padded decimal digits, `key_len`
    /// bytes.
    pub fn key(&self, index: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.prefix.as_bytes());
        let width = self.key_len.saturating_sub(PREFIX_LEN);
        let digits = index.to_string();
        for _ in digits.len()..width {
            out.push(b'0');
        }
        out.extend_from_slice(digits.as_bytes());
    }

    /// The index encoded in a key made by [`Shape::key`].
    pub fn key_index(&self, key: &[u8]) -> Option<u64> {
        let digits = key.strip_prefix(self.prefix.as_bytes())?;
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
}

/// How fast the publisher sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As fast as the slowest subscriber takes them, within a window of
    /// [`FLOOD_WINDOW`] messages in flight.
    Flood,
    /// This many messages per second, spread evenly (bursts of at most a few hundred
    /// microseconds' worth).
    Rate(f64),
}

/// Which keys a trial writes.
#[derive(Clone, Copy, Debug)]
pub enum Keys {
    /// A scattered walk over the keyspace that continues across trials.
    Scattered,
    /// The keys at positions `first + index` of a scattered walk over the keyspace:
    /// trials covering positions `0..keyspace` write every key exactly once, in an
    /// order that is not sorted (a map loaded in key order would be unrealistically
    /// compact or loose, depending on how its B-tree splits).
    Load { first: u64 },
}

/// What the receiver waits for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Goal {
    /// Every message of the trial on every subscriber, in order.
    All,
    /// Any message of the trial on every subscriber (connection warm-up).
    Any,
    /// Whatever arrives until the route is drained (a flood, where losses are expected).
    Flood,
    /// Like `All`, but never cut short by a lagging subscriber.
    Latency,
}

/// One trial's outcome.
#[derive(Clone, Debug)]
pub struct TrialResult {
    pub offered_rate: f64,
    pub sent: u64,
    /// Per subscriber: messages received in order (a gap ends the in-order count only
    /// for the lost ones: later messages still count once the sequence resumes).
    pub received_in_order: Vec<u64>,
    /// Per subscriber: true if any message was lost or reordered.
    pub gap: Vec<bool>,
    /// Delivered rate of the slowest subscriber: its in-order messages over the time
    /// from the first send to its last receipt.
    pub delivered_rate: f64,
    /// False when a backup was watched and did not reach the primary's sequence.
    pub backup_kept_up: bool,
    /// True when the trial was cut short because a backlog built up in the route.
    pub lagged: bool,
}

impl TrialResult {
    /// Every subscriber got every message in order, the backup (if any) kept up, and
    /// the messages came out as fast as they went in (within 5 %, so a backlog growing
    /// inside the route counts as a failure, not as throughput).
    pub fn zero_loss(&self) -> bool {
        self.complete_in_order()
            && self.backup_kept_up
            && !self.lagged
            && match self.offered_rate {
                rate if rate.is_finite() => self.delivered_rate >= 0.95 * rate,
                _ => true,
            }
    }
}

impl TrialResult {
    /// Every subscriber got every message in order (however late).
    pub fn complete_in_order(&self) -> bool {
        self.gap.iter().all(|gap| !gap) && self.received_in_order.iter().all(|&n| n == self.sent)
    }
}

/// A publisher and its subscribers, connected once and reused for every trial.
pub struct Session {
    // Sockets before contexts: they must close first.
    publishers: Vec<zmq::Socket>,
    subscribers: Vec<zmq::Socket>,
    backup: Option<zmq::Socket>,
    _publisher_context: zmq::Context,
    _subscriber_context: zmq::Context,
    shape: Shape,
    origin: Instant,
    next_trial: u32,
    /// Position of the scattered key walk.
    key_cursor: u64,
    /// Makes uuids unique across runs (servers drop a repeated uuid).
    uuid_prefix: [u8; 6],
    uuid_counter: u64,
    drain: Duration,
}

fn zmq_error(what: &str, endpoint: &str) -> impl Fn(zmq::Error) -> BenchError {
    let context = format!("{what} {endpoint}");
    move |error| BenchError::new(format!("{context}: {error}"))
}

impl Session {
    /// Opens the sockets; the publisher and the subscribers each get their own libzmq
    /// context (one I/O thread each), the same for every route.
    pub fn open(
        route: &Route,
        publishers: usize,
        subscribers: usize,
        shape: Shape,
        hwm: i32,
        drain: Duration,
    ) -> Result<Session, BenchError> {
        let publisher_context = zmq::Context::new();
        let subscriber_context = zmq::Context::new();
        if route.publisher_binds && publishers != 1 {
            return Err(BenchError::new(
                "the direct PUB → SUB route has exactly one publisher",
            ));
        }
        let mut publisher_sockets = Vec::with_capacity(publishers);
        for _ in 0..publishers {
            let publisher = publisher_context
                .socket(zmq::PUB)
                .map_err(zmq_error("cannot create a PUB for", "the bench"))?;
            publisher
                .set_sndhwm(hwm)
                .and_then(|()| publisher.set_linger(0))
                .map_err(zmq_error("cannot configure the PUB for", "the bench"))?;
            RouteCurve::apply(route.curve.as_ref(), &publisher)?;
            for endpoint in &route.publish {
                if route.publisher_binds {
                    publisher
                        .bind(endpoint)
                        .map_err(zmq_error("cannot bind", endpoint))?;
                } else {
                    publisher
                        .connect(endpoint)
                        .map_err(zmq_error("cannot connect to", endpoint))?;
                }
            }
            publisher_sockets.push(publisher);
        }
        let mut sockets = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            sockets.push(subscriber(
                &subscriber_context,
                &route.subscribe,
                b"",
                hwm,
                route.curve.as_ref(),
            )?);
        }
        let backup = match &route.backup_publisher {
            Some(endpoint) => Some(subscriber(
                &subscriber_context,
                endpoint,
                clonekv_zmq::core::kvmsg::HUGZ,
                hwm,
                None,
            )?),
            None => None,
        };
        let mut uuid_prefix = [0u8; 6];
        getrandom::fill(&mut uuid_prefix)
            .map_err(|error| BenchError::new(format!("no OS randomness: {error}")))?;
        Ok(Session {
            publishers: publisher_sockets,
            subscribers: sockets,
            backup,
            _publisher_context: publisher_context,
            _subscriber_context: subscriber_context,
            shape,
            origin: Instant::now(),
            next_trial: 1,
            key_cursor: 0,
            uuid_prefix,
            uuid_counter: 0,
            drain,
        })
    }

    /// Waits until every subscriber receives what the publisher sends (PUB/SUB drop
    /// everything sent before a subscription arrives), then lets the route go quiet.
    pub fn warm_up(&mut self, patience: Duration) -> Result<(), BenchError> {
        let count = (patience.as_secs_f64() * 50.0) as u64;
        let result = self.run(
            Pace::Rate(50.0),
            count,
            None,
            Keys::Scattered,
            Goal::Any,
            None,
        )?;
        if result.received_in_order.iter().all(|&n| n > 0) {
            Ok(())
        } else {
            Err(BenchError::new(format!(
                "no update came through within {patience:?} (is the server active, and is this its endpoint?)"
            )))
        }
    }

    /// Sends `count` updates at `pace` and receives them; `latency` (if given) records
    /// send-to-receive times in nanoseconds, of the first subscriber.
    pub fn trial(
        &mut self,
        pace: Pace,
        count: u64,
        keys: Keys,
        latency: Option<&mut Histogram<u64>>,
    ) -> Result<TrialResult, BenchError> {
        let goal = match pace {
            Pace::Flood => Goal::Flood,
            Pace::Rate(_) => Goal::All,
        };
        self.run(pace, count, None, keys, goal, latency)
    }

    /// A paced trial that runs to its end however far the subscribers lag (a latency
    /// measurement: a backlog shows in the percentiles instead of ending the trial).
    pub fn latency_trial(
        &mut self,
        rate: f64,
        count: u64,
        latency: &mut Histogram<u64>,
    ) -> Result<TrialResult, BenchError> {
        self.run(
            Pace::Rate(rate),
            count,
            None,
            Keys::Scattered,
            Goal::Latency,
            Some(latency),
        )
    }

    /// A flood that stops sending after `duration` (or `count` messages).
    pub fn flood_for(&mut self, duration: Duration, count: u64) -> Result<TrialResult, BenchError> {
        self.run(
            Pace::Flood,
            count,
            Some(duration),
            Keys::Scattered,
            Goal::Flood,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        pace: Pace,
        count: u64,
        time_limit: Option<Duration>,
        keys: Keys,
        goal: Goal,
        latency: Option<&mut Histogram<u64>>,
    ) -> Result<TrialResult, BenchError> {
        let trial = self.next_trial;
        self.next_trial += 1;
        let publishers = self.publishers.len() as u64;
        // Each publisher sends its share, at its share of the rate.
        let share = count.div_ceil(publishers.max(1));
        let share_pace = match pace {
            Pace::Flood => Pace::Flood,
            Pace::Rate(rate) => Pace::Rate(rate / publishers.max(1) as f64),
        };
        let started = Instant::now();
        let done = AtomicBool::new(false);
        let abort = AtomicBool::new(false);
        let flow = Flow::default();
        let plans: Vec<SendPlan> = (0..publishers)
            .map(|publisher| SendPlan {
                trial,
                publisher: publisher as u32,
                count: share,
                pace: share_pace,
                keys: match keys {
                    Keys::Scattered => Keys::Scattered,
                    Keys::Load { first } => Keys::Load {
                        first: first + publisher * share,
                    },
                },
                key_cursor: self.key_cursor + publisher * share,
                uuid_prefix: self.uuid_prefix,
                uuid_counter: self.uuid_counter,
                shape: self.shape,
                origin: self.origin,
                time_limit,
            })
            .collect();
        let publisher_sockets = &mut self.publishers;
        let (sent, receipt) = thread::scope(|scope| {
            let senders: Vec<_> = publisher_sockets
                .iter_mut()
                .zip(&plans)
                .map(|(socket, plan)| {
                    let (abort, flow) = (&abort, &flow);
                    scope.spawn(move || plan.send(socket, abort, flow))
                })
                .collect();
            let waiter = scope.spawn(|| {
                // Tells the receiver when every publisher is done.
                let sent: Vec<_> = senders.into_iter().map(|sender| sender.join()).collect();
                done.store(true, Ordering::SeqCst);
                sent
            });
            let receipt = receive(
                &self.subscribers,
                self.backup.as_ref(),
                Expect {
                    trial,
                    publishers: publishers as usize,
                    share,
                    goal,
                    origin: self.origin,
                    drain: self.drain,
                    lag_limit: match (pace, goal) {
                        (Pace::Flood, _) | (_, Goal::Latency) => None,
                        (Pace::Rate(rate), _) => {
                            Some(((rate * LAG_LIMIT.as_secs_f64()) as u64).max(2_000))
                        }
                    },
                },
                &done,
                &abort,
                &flow,
                latency,
            );
            // The publishers stop early once the receiver has what it needs (warm-up)
            // or has seen a loss (the trial has failed).
            abort.store(true, Ordering::SeqCst);
            (waiter.join(), receipt)
        });
        let mut total_sent = 0;
        for result in sent.map_err(|_| BenchError::new("a publisher thread panicked"))? {
            total_sent += result.map_err(|_| BenchError::new("a publisher thread panicked"))??;
        }
        let receipt = receipt?;
        if std::env::var_os("CLONEKV_BENCH_TRACE").is_some() {
            eprintln!(
                "trial {trial}: {pace:?} sent {total_sent} in {:.3}s, received {:?} lagged {} gap {:?} backup ok {}",
                started.elapsed().as_secs_f64(),
                receipt.in_order,
                receipt.lagged,
                receipt.gap,
                receipt.backup_kept_up
            );
        }
        self.key_cursor += share * publishers;
        self.uuid_counter += share;
        let slowest_last = receipt
            .last_at
            .iter()
            .copied()
            .max()
            .unwrap_or(started)
            .max(started);
        let elapsed = slowest_last.duration_since(started).as_secs_f64();
        let slowest_count = receipt.in_order.iter().copied().min().unwrap_or(0);
        let delivered_rate = if elapsed > 0.0 {
            slowest_count as f64 / elapsed
        } else {
            0.0
        };
        Ok(TrialResult {
            offered_rate: match pace {
                Pace::Flood => f64::INFINITY,
                Pace::Rate(rate) => rate,
            },
            sent: total_sent,
            received_in_order: receipt.in_order,
            gap: receipt.gap,
            delivered_rate,
            backup_kept_up: receipt.backup_kept_up,
            lagged: receipt.lagged,
        })
    }
}

fn subscriber(
    context: &zmq::Context,
    endpoint: &str,
    prefix: &[u8],
    hwm: i32,
    curve: Option<&RouteCurve>,
) -> Result<zmq::Socket, BenchError> {
    let socket = context
        .socket(zmq::SUB)
        .map_err(zmq_error("cannot create a SUB for", endpoint))?;
    socket
        .set_rcvhwm(hwm)
        .and_then(|()| socket.set_linger(0))
        .and_then(|()| socket.set_subscribe(prefix))
        .map_err(zmq_error("cannot configure the SUB for", endpoint))?;
    RouteCurve::apply(curve, &socket)?;
    socket
        .connect(endpoint)
        .map_err(zmq_error("cannot connect to", endpoint))?;
    Ok(socket)
}

/// Everything a publisher thread needs, copied out of the session.
struct SendPlan {
    trial: u32,
    publisher: u32,
    count: u64,
    pace: Pace,
    keys: Keys,
    key_cursor: u64,
    uuid_prefix: [u8; 6],
    uuid_counter: u64,
    shape: Shape,
    origin: Instant,
    time_limit: Option<Duration>,
}

/// What the publishers and the receiver tell each other during a trial.
#[derive(Default)]
struct Flow {
    /// Messages sent, all publishers together.
    sent: AtomicU64,
    /// Messages the slowest subscriber has received.
    received: AtomicU64,
}

impl SendPlan {
    fn send(
        &self,
        socket: &zmq::Socket,
        abort: &AtomicBool,
        flow: &Flow,
    ) -> Result<u64, BenchError> {
        let mut key = Vec::with_capacity(self.shape.key_len.max(24));
        let mut body = vec![b'v'; self.shape.value_len.max(BODY_HEADER)];
        let mut uuid = [0u8; 16];
        uuid[..6].copy_from_slice(&self.uuid_prefix);
        uuid[6..8].copy_from_slice(&(self.publisher as u16).to_be_bytes());
        let sequence = [0u8; SEQUENCE_LEN];
        body[0..4].copy_from_slice(&self.trial.to_be_bytes());
        body[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        let started = Instant::now();
        let mut sent = 0u64;
        let fail = |error: zmq::Error| BenchError::new(format!("publishing failed: {error}"));
        while sent < self.count {
            if abort.load(Ordering::Relaxed) || writing_stopped() {
                break;
            }
            if self
                .time_limit
                .is_some_and(|limit| started.elapsed() >= limit)
            {
                break;
            }
            let due = match self.pace {
                Pace::Flood => {
                    let in_flight = flow
                        .sent
                        .load(Ordering::Relaxed)
                        .saturating_sub(flow.received.load(Ordering::Relaxed));
                    if in_flight >= FLOOD_WINDOW {
                        thread::sleep(Duration::from_micros(50));
                        continue;
                    }
                    (sent + 256).min(self.count)
                }
                Pace::Rate(rate) => {
                    ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(self.count)
                }
            };
            while sent < due {
                let key_index = match self.keys {
                    Keys::Scattered => scatter(self.key_cursor + sent, self.shape.keyspace),
                    Keys::Load { first } => scatter(first + sent, self.shape.keyspace),
                };
                self.shape.key(key_index, &mut key);
                uuid[8..].copy_from_slice(&(self.uuid_counter + sent).to_be_bytes());
                let sent_at = self.origin.elapsed().as_nanos() as u64;
                body[8..16].copy_from_slice(&sent.to_be_bytes());
                body[16..24].copy_from_slice(&sent_at.to_be_bytes());
                socket.send(&key[..], zmq::SNDMORE).map_err(fail)?;
                socket.send(&sequence[..], zmq::SNDMORE).map_err(fail)?;
                socket.send(&uuid[..], zmq::SNDMORE).map_err(fail)?;
                socket.send(&b""[..], zmq::SNDMORE).map_err(fail)?;
                socket.send(&body[..], 0).map_err(fail)?;
                sent += 1;
                flow.sent.fetch_add(1, Ordering::Relaxed);
                if sent.is_multiple_of(4_096)
                    && (abort.load(Ordering::Relaxed) || writing_stopped())
                {
                    return Ok(sent);
                }
            }
            if let Pace::Rate(rate) = self.pace {
                if sent < self.count {
                    let next = started + Duration::from_secs_f64(sent as f64 / rate);
                    let now = Instant::now();
                    if next > now {
                        // Sleeping releases the CPU to the route under test; a burst of
                        // the messages that fell due meanwhile follows.
                        thread::sleep((next - now).max(Duration::from_micros(100)));
                    }
                }
            }
        }
        Ok(sent)
    }
}

/// The `n`-th key of a walk that visits the keyspace in a scattered order: every key
/// once per lap, consecutive steps far apart.
fn scatter(n: u64, keyspace: u64) -> u64 {
    let keyspace = keyspace.max(1);
    let mut step = 7_777_777 % keyspace;
    while gcd(step, keyspace) != 1 {
        step += 1;
    }
    ((u128::from(n % keyspace) * u128::from(step)) % u128::from(keyspace)) as u64
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

struct Expect {
    trial: u32,
    publishers: usize,
    /// Messages per publisher.
    share: u64,
    goal: Goal,
    origin: Instant,
    drain: Duration,
    /// Most messages the slowest subscriber may lag behind before the trial fails.
    lag_limit: Option<u64>,
}

struct Receipt {
    in_order: Vec<u64>,
    gap: Vec<bool>,
    last_at: Vec<Instant>,
    backup_kept_up: bool,
    lagged: bool,
}

/// One received message's fields of interest.
struct Received {
    is_hugz: bool,
    sequence: i64,
    trial: u32,
    publisher: u32,
    index: u64,
    sent_at: u64,
}

/// Reads one whole message into `frames` (reused), returning its fields; `None` when
/// nothing is waiting.
fn read_message(
    socket: &zmq::Socket,
    frames: &mut [zmq::Message; 5],
) -> Result<Option<Received>, BenchError> {
    let mut count = 0;
    loop {
        let slot = count.min(frames.len() - 1);
        let flags = if count == 0 { zmq::DONTWAIT } else { 0 };
        match socket.recv(&mut frames[slot], flags) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) if count == 0 => return Ok(None),
            Err(error) => return Err(BenchError::new(format!("receiving failed: {error}"))),
        }
        count += 1;
        if !frames[slot].get_more() {
            break;
        }
    }
    let field = |bytes: &[u8], at: usize, len: usize| -> u64 {
        bytes.get(at..at + len).map_or(0, |slice| {
            slice
                .iter()
                .fold(0u64, |acc, byte| acc << 8 | u64::from(*byte))
        })
    };
    let is_hugz = &frames[0][..] == clonekv_zmq::core::kvmsg::HUGZ;
    let sequence = field(&frames[1], 0, SEQUENCE_LEN) as i64;
    let body = &frames[4][..];
    let valid = count == 5 && body.len() >= BODY_HEADER;
    Ok(Some(Received {
        is_hugz,
        sequence,
        trial: if valid { field(body, 0, 4) as u32 } else { 0 },
        publisher: field(body, 4, 4) as u32,
        index: field(body, 8, 8),
        sent_at: field(body, 16, 8),
    }))
}

fn receive(
    subscribers: &[zmq::Socket],
    backup: Option<&zmq::Socket>,
    expect: Expect,
    done: &AtomicBool,
    abort: &AtomicBool,
    flow: &Flow,
    mut latency: Option<&mut Histogram<u64>>,
) -> Result<Receipt, BenchError> {
    let n = subscribers.len();
    let total = expect.share * expect.publishers as u64;
    // Next index expected, per subscriber and publisher.
    let mut next = vec![vec![0u64; expect.publishers]; n];
    let mut in_order = vec![0u64; n];
    let mut any = vec![false; n];
    let mut gap = vec![false; n];
    let mut last_at = vec![Instant::now(); n];
    let mut frames: [zmq::Message; 5] = std::array::from_fn(|_| zmq::Message::new());
    let mut highest_sequence: i64 = 0;
    let mut backup_sequence: i64 = -1;
    let mut deadline: Option<Instant> = None;
    let mut lagged = false;
    loop {
        let mut items: Vec<zmq::PollItem> = subscribers
            .iter()
            .chain(backup)
            .map(|socket| socket.as_poll_item(zmq::POLLIN))
            .collect();
        zmq::poll(&mut items, 5).map_err(|error| BenchError::new(format!("poll: {error}")))?;
        let readable: Vec<bool> = items.iter().map(zmq::PollItem::is_readable).collect();
        drop(items);
        for (s, socket) in subscribers.iter().enumerate() {
            if !readable.get(s).copied().unwrap_or(false) {
                continue;
            }
            for _ in 0..RECV_BATCH {
                let Some(message) = read_message(socket, &mut frames)? else {
                    break;
                };
                if message.is_hugz || message.trial != expect.trial {
                    continue;
                }
                let Some(expected) = next[s].get_mut(message.publisher as usize) else {
                    continue;
                };
                let now = Instant::now();
                any[s] = true;
                highest_sequence = highest_sequence.max(message.sequence);
                if message.index >= *expected {
                    gap[s] |= message.index > *expected;
                    in_order[s] += 1;
                    last_at[s] = now;
                    *expected = message.index + 1;
                } else {
                    // Reordered or repeated: not counted.
                    gap[s] = true;
                }
                if s == 0 {
                    if let Some(histogram) = latency.as_deref_mut() {
                        let now_ns = now.duration_since(expect.origin).as_nanos() as u64;
                        let _ = histogram.record(now_ns.saturating_sub(message.sent_at).max(1));
                    }
                }
            }
        }
        if let Some(socket) = backup {
            if readable.get(n).copied().unwrap_or(false) {
                while let Some(message) = read_message(socket, &mut frames)? {
                    if message.is_hugz {
                        backup_sequence = backup_sequence.max(message.sequence);
                    }
                }
            }
        }
        let slowest = in_order.iter().copied().min().unwrap_or(0);
        flow.received.store(slowest, Ordering::Relaxed);
        if let Some(limit) = expect.lag_limit {
            if flow.sent.load(Ordering::Relaxed).saturating_sub(slowest) > limit {
                lagged = true;
            }
        }
        let failed = gap.iter().any(|&g| g) || lagged;
        if matches!(expect.goal, Goal::All | Goal::Latency) && failed {
            // The trial has failed: stop the publishers early.
            abort.store(true, Ordering::Relaxed);
        }
        let data_complete = match expect.goal {
            Goal::Any => any.iter().all(|&a| a),
            Goal::All | Goal::Latency => in_order.iter().all(|&k| k == total),
            // A flood may stop early (its time limit): complete when all it sent is in.
            Goal::Flood => {
                in_order.iter().all(|&k| k == total)
                    || (done.load(Ordering::SeqCst)
                        && in_order
                            .iter()
                            .all(|&k| k == flow.sent.load(Ordering::Relaxed)))
            }
        };
        if data_complete && expect.goal == Goal::Any {
            break;
        }
        let backup_done = backup.is_none() || backup_sequence >= highest_sequence;
        if data_complete && backup_done {
            break;
        }
        if deadline.is_none() && done.load(Ordering::SeqCst) {
            let extra = if backup.is_some() && !failed {
                // A HUGZ per heartbeat carries the backup's sequence.
                Duration::from_millis(2_500)
            } else {
                Duration::ZERO
            };
            deadline = Some(Instant::now() + expect.drain + extra);
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break;
        }
    }
    let backup_kept_up = backup.is_none() || backup_sequence >= highest_sequence;
    // Stop the publishers before waiting for the route to go quiet.
    abort.store(true, Ordering::SeqCst);
    settle(
        subscribers,
        backup,
        &mut frames,
        highest_sequence,
        backup_sequence,
    )?;
    Ok(Receipt {
        in_order,
        gap,
        last_at,
        backup_kept_up,
        lagged,
    })
}

/// Drains whatever is still arriving until the route has been quiet for 50 ms, so a
/// trial's leftovers do not load the next one; with a backup, also until the backup's
/// heartbeat shows it has applied everything the primary published (a backup that fell
/// behind during a failed trial re-syncs, and must not fail the next one).
fn settle(
    subscribers: &[zmq::Socket],
    backup: Option<&zmq::Socket>,
    frames: &mut [zmq::Message; 5],
    mut primary_sequence: i64,
    mut backup_sequence: i64,
) -> Result<(), BenchError> {
    let quiet = Duration::from_millis(50);
    let give_up = Instant::now() + Duration::from_secs(15);
    let mut last_seen = Instant::now();
    loop {
        let caught_up = backup.is_none() || backup_sequence >= primary_sequence;
        if (last_seen.elapsed() >= quiet && caught_up) || Instant::now() >= give_up {
            return Ok(());
        }
        let mut got = false;
        for socket in subscribers {
            while let Some(message) = read_message(socket, frames)? {
                // Updates and the primary's heartbeats carry its sequence.
                primary_sequence = primary_sequence.max(message.sequence);
                got = true;
            }
        }
        if let Some(socket) = backup {
            while let Some(message) = read_message(socket, frames)? {
                if message.is_hugz {
                    backup_sequence = backup_sequence.max(message.sequence);
                }
            }
        }
        if got {
            last_seen = Instant::now();
        } else {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The highest zero-loss rate found by a search, and the trials that found it.
#[derive(Clone, Debug)]
pub struct Search {
    /// The flood trial's delivered rate: an upper bound.
    pub flood_rate: f64,
    /// Highest offered rate that passed.
    pub best: Option<TrialResult>,
    pub trials: Vec<TrialResult>,
}

impl Search {
    /// The throughput figure: the delivered rate of the best passing trial.
    pub fn rate(&self) -> f64 {
        self.best.as_ref().map_or(0.0, |best| best.delivered_rate)
    }
}

/// Search settings.
#[derive(Clone, Copy, Debug)]
pub struct SearchPlan {
    pub trial: Duration,
    pub steps: u32,
}

/// Finds the highest rate at which every subscriber receives every update in order:
/// a flood trial bounds it from above, then bisection over short paced trials.
pub fn search(
    session: &mut Session,
    plan: SearchPlan,
    mut progress: impl FnMut(&str),
) -> Result<Search, BenchError> {
    let seconds = plan.trial.as_secs_f64();
    // A flood of one trial's worth at a generous guess of the rate.
    progress("closed-loop flood");
    let flood = session.flood_for(plan.trial, u64::MAX / 4)?;
    let flood_rate = flood.delivered_rate;
    let mut trials = vec![flood];
    let mut low = 0.0f64;
    let mut high = flood_rate.max(1_000.0) * 1.15;
    let mut best: Option<TrialResult> = None;
    let mut rate = flood_rate.max(1_000.0) * 0.85;
    for step in 0..plan.steps {
        progress(&format!(
            "step {}/{} at {:.0}/s",
            step + 1,
            plan.steps,
            rate
        ));
        let count = (seconds * rate).max(100.0) as u64;
        let result = session.trial(Pace::Rate(rate), count, Keys::Scattered, None)?;
        if result.zero_loss() {
            low = rate;
            best = Some(result.clone());
        } else {
            high = rate;
        }
        trials.push(result);
        rate = (low + high) / 2.0;
    }
    // Nothing passed: walk down until something does (a very slow route).
    let mut tries = 0;
    while best.is_none() && tries < 6 {
        rate = high / 4.0;
        progress(&format!("fallback at {rate:.0}/s"));
        let count = (seconds * rate).max(100.0) as u64;
        let result = session.trial(Pace::Rate(rate), count, Keys::Scattered, None)?;
        if result.zero_loss() {
            best = Some(result.clone());
        } else {
            high = rate;
        }
        trials.push(result);
        tries += 1;
    }
    Ok(Search {
        flood_rate,
        best,
        trials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_requested_length_and_decode_back() {
        let shape = Shape {
            key_len: 16,
            value_len: 100,
            keyspace: 1_000_000,
            prefix: Prefix::random().unwrap(),
        };
        let mut key = Vec::new();
        shape.key(999_999, &mut key);
        assert_eq!(key.len(), 16);
        assert_eq!(&key[..PREFIX_LEN], shape.prefix.as_bytes());
        assert_eq!(&key[PREFIX_LEN..], b"0999999");
        assert_eq!(shape.key_index(&key), Some(999_999));
        assert_eq!(shape.key_index(b"key:000000999999"), None);
    }

    #[test]
    fn the_scattered_walk_visits_every_key_once_per_lap() {
        // Keyspaces that share factors with 7 777 777 = 7 · 239 · 4649 too.
        for keyspace in [10_000, 239 * 4_649, 239 * 5, 1] {
            let mut seen = vec![false; keyspace as usize];
            for n in 0..keyspace {
                seen[scatter(n, keyspace) as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "keyspace {keyspace}");
        }
    }

    #[test]
    fn a_trial_over_a_direct_route_delivers_in_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let route = Route {
            publish: vec![endpoint.clone()],
            publisher_binds: true,
            subscribe: endpoint,
            backup_publisher: None,
            curve: None,
        };
        let shape = Shape {
            key_len: 16,
            value_len: 100,
            keyspace: 1_000,
            prefix: Prefix::random().unwrap(),
        };
        let mut session =
            Session::open(&route, 1, 2, shape, 100_000, Duration::from_millis(500)).unwrap();
        session.warm_up(Duration::from_secs(10)).unwrap();
        let mut histogram = Histogram::new(3).unwrap();
        let result = session
            .trial(
                Pace::Rate(20_000.0),
                2_000,
                Keys::Scattered,
                Some(&mut histogram),
            )
            .unwrap();
        assert_eq!(result.sent, 2_000);
        // Completeness and order only: whether the route kept pace is a rate, and a
        // test on a busy machine must not depend on one.
        assert!(result.complete_in_order(), "{result:?}");
        assert_eq!(histogram.len(), 2_000);
    }
}
