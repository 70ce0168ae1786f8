//! Logging helpers: `tracing` set up from `RUST_LOG`, and a rate limiter so that a flood
//! of bad input costs one log line per interval, not one per message.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (for example
/// `RUST_LOG=debug` or `RUST_LOG=clonekv_zmq=debug`), or by `default_filter` when it is
/// unset or invalid. Safe to call more than once: later calls do nothing.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Decides which occurrences of a repeated condition get a log line: the first one of
/// each key, then at most one per interval, reporting how many were suppressed between.
///
/// Occurrences suppressed after the last line of a key are not lost: once the interval
/// has passed, [`RateLimiter::due_summaries`] hands them out as one [`Summary`] per key
/// (for the host to log with [`log_summaries`] whenever it wakes), and
/// [`RateLimiter::all_summaries`] hands out every remaining one (at shutdown). So the
/// counts of a key's lines add up to its occurrences, and a burst that ends still shows
/// how big it was.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    keys: BTreeMap<String, KeyState>,
    /// No key has suppressed occurrences due for a summary before this instant (`None`:
    /// no key has any).
    next_summary: Option<Instant>,
}

#[derive(Debug)]
struct KeyState {
    last_logged: Instant,
    suppressed: u64,
    line: Option<Line>,
}

/// The limiter lets an occurrence through with the number suppressed since the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LetThrough {
    /// Occurrences of the same key not logged since the previous line.
    pub suppressed: u64,
}

/// What a key's lines say, so that its summary can say it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    /// The level of the key's lines.
    pub level: tracing::Level,
    /// The message of the key's lines.
    pub message: &'static str,
}

/// Occurrences of a key suppressed since its last line, not followed by another line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The key.
    pub key: String,
    /// What its lines say, if the limiter was told ([`RateLimiter::check_line`]).
    pub line: Option<Line>,
    /// How many.
    pub suppressed: u64,
}

/// Distinct keys remembered; past it the table is cleared (a new interval starts for
/// everyone), so input that invents keys cannot grow memory without bound.
const MAX_KEYS: usize = 1024;

impl RateLimiter {
    /// One line per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimiter {
            interval,
            keys: BTreeMap::new(),
            next_summary: None,
        }
    }

    /// Records one occurrence of `key` at `now`; `Some` when it should be logged.
    pub fn check(&mut self, key: &str, now: Instant) -> Option<LetThrough> {
        self.record(key, now, None)
    }

    /// [`RateLimiter::check`] for a key whose lines say `line`, which its
    /// [`Summary`] repeats.
    pub fn check_line(&mut self, key: &str, now: Instant, line: Line) -> Option<LetThrough> {
        self.record(key, now, Some(line))
    }

    fn record(&mut self, key: &str, now: Instant, line: Option<Line>) -> Option<LetThrough> {
        if let Some(state) = self.keys.get_mut(key) {
            state.line = line.or(state.line);
            if now.saturating_duration_since(state.last_logged) < self.interval {
                state.suppressed += 1;
                let due = state.last_logged + self.interval;
                self.next_summary = Some(self.next_summary.map_or(due, |next| next.min(due)));
                return None;
            }
            let suppressed = std::mem::take(&mut state.suppressed);
            state.last_logged = now;
            return Some(LetThrough { suppressed });
        }
        if self.keys.len() >= MAX_KEYS {
            self.keys.clear();
            self.next_summary = None;
        }
        self.keys.insert(
            key.to_string(),
            KeyState {
                last_logged: now,
                suppressed: 0,
                line,
            },
        );
        Some(LetThrough { suppressed: 0 })
    }

    /// The keys whose occurrences were suppressed and whose interval has passed since
    /// their last line, in key order. Each counts as a line: the key's next occurrence
    /// within an interval of `now` is suppressed. Cheap when nothing is due.
    pub fn due_summaries(&mut self, now: Instant) -> Vec<Summary> {
        if self.next_summary.is_none_or(|next| now < next) {
            return Vec::new();
        }
        let interval = self.interval;
        self.summaries(|state| now.saturating_duration_since(state.last_logged) >= interval)
            .into_iter()
            .map(|(summary, state)| {
                state.last_logged = now;
                summary
            })
            .collect()
    }

    /// Every key with suppressed occurrences, due or not (at shutdown), in key order.
    pub fn all_summaries(&mut self) -> Vec<Summary> {
        self.summaries(|_| true)
            .into_iter()
            .map(|(summary, _)| summary)
            .collect()
    }

    /// Takes the suppressed counts of the keys `due` selects, and recomputes
    /// `next_summary` from the rest.
    fn summaries(&mut self, due: impl Fn(&KeyState) -> bool) -> Vec<(Summary, &mut KeyState)> {
        let interval = self.interval;
        let mut next = None;
        let mut taken = Vec::new();
        for (key, state) in &mut self.keys {
            if state.suppressed == 0 {
                continue;
            }
            if due(state) {
                let summary = Summary {
                    key: key.clone(),
                    line: state.line,
                    suppressed: std::mem::take(&mut state.suppressed),
                };
                taken.push((summary, state));
            } else {
                let at = state.last_logged + interval;
                next = Some(next.map_or(at, |next: Instant| next.min(at)));
            }
        }
        self.next_summary = next;
        taken
    }
}

/// Logs each summary as one line at its key's level: the key's message, marked as a
/// summary, with `suppressed=N`.
pub fn log_summaries(summaries: Vec<Summary>) {
    for Summary {
        key,
        line,
        suppressed,
    } in summaries
    {
        let Some(Line { level, message }) = line else {
            tracing::warn!(key, suppressed, "repeated log lines suppressed");
            continue;
        };
        macro_rules! summary {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    key,
                    suppressed,
                    "{message} (summary of suppressed repeats)"
                )
            };
        }
        match level {
            tracing::Level::ERROR => summary!(tracing::Level::ERROR),
            tracing::Level::WARN => summary!(tracing::Level::WARN),
            tracing::Level::INFO => summary!(tracing::Level::INFO),
            tracing::Level::DEBUG => summary!(tracing::Level::DEBUG),
            _ => summary!(tracing::Level::TRACE),
        }
    }
}

/// Logs a line at most once per key per interval through a [`RateLimiter`], with
/// `suppressed=N` (the repeats not logged since the previous line) after the given
/// fields:
///
/// ```text
/// log_limited!(limiter, key, tracing::Level::WARN, "message", field = value, %shown);
/// ```
macro_rules! log_limited {
    ($limiter:expr, $key:expr, $level:expr, $message:literal $(, $($fields:tt)+)?) => {
        if let Some(allowed) = $limiter.check_line(
            &$key,
            std::time::Instant::now(),
            $crate::log::Line {
                level: $level,
                message: $message,
            },
        ) {
            tracing::event!(
                $level,
                $($($fields)+,)?
                suppressed = allowed.suppressed,
                $message
            );
        }
    };
}
pub(crate) use log_limited;

/// Sends on a socket that drops rather than refuses (PUB) or queues (a connecting or
/// fresh DEALER): a refusal is rare, so it is logged (rate-limited per socket) and the
/// core's timers recover (a lost ICANHAZ? is asked again after the server ttl).
pub(crate) fn send_or_log<F: AsRef<[u8]>>(
    socket: &crate::socket::ZmqSocket,
    frames: &[F],
    limiter: &mut RateLimiter,
) {
    send_or_log_reusing(socket, frames, None, limiter);
}

/// [`send_or_log`], sending `last` (a received frame holding the same bytes as the last
/// of `frames`) in place of a copy of that frame; see [`ZmqSocket::send_reusing`].
///
/// [`ZmqSocket::send_reusing`]: crate::socket::ZmqSocket::send_reusing
pub(crate) fn send_or_log_reusing<F: AsRef<[u8]>>(
    socket: &crate::socket::ZmqSocket,
    frames: &[F],
    last: Option<zmq::Message>,
    limiter: &mut RateLimiter,
) {
    let problem = match socket.send_reusing(frames, last) {
        Ok(crate::socket::SendOutcome::Sent) => return,
        Ok(other) => format!("{other:?}"),
        Err(error) => error.to_string(),
    };
    let key = format!("send/{}", socket.name());
    log_limited!(
        limiter,
        key,
        tracing::Level::WARN,
        "message not sent",
        socket = socket.name(),
        problem
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_once_per_interval_and_counts_the_rest() {
        let mut limiter = RateLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(
            limiter.check("a", start),
            Some(LetThrough { suppressed: 0 })
        );
        for _ in 0..5 {
            assert_eq!(limiter.check("a", start), None);
        }
        assert_eq!(
            limiter.check("b", start),
            Some(LetThrough { suppressed: 0 })
        );
        let later = start + Duration::from_secs(11);
        assert_eq!(
            limiter.check("a", later),
            Some(LetThrough { suppressed: 5 })
        );
        assert_eq!(limiter.check("a", later), None);
    }

    const LINE: Line = Line {
        level: tracing::Level::WARN,
        message: "something repeated",
    };

    #[test]
    fn what_was_suppressed_after_the_last_line_comes_out_as_a_summary_once_due() {
        let mut limiter = RateLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert!(limiter.check_line("a", at(0), LINE).is_some());
        assert!(limiter.check_line("b", at(0), LINE).is_some());
        for second in 1..4 {
            assert_eq!(limiter.check_line("a", at(second), LINE), None);
        }
        assert_eq!(limiter.check_line("b", at(5), LINE), None);
        // Nothing is due before an interval has passed since each key's line.
        assert!(limiter.due_summaries(at(9)).is_empty());
        assert_eq!(
            limiter.due_summaries(at(10)),
            [
                Summary {
                    key: "a".into(),
                    line: Some(LINE),
                    suppressed: 3
                },
                Summary {
                    key: "b".into(),
                    line: Some(LINE),
                    suppressed: 1
                }
            ]
        );
        // Given out once; the summary counts as the key's line for the next interval.
        assert!(limiter.due_summaries(at(30)).is_empty());
        assert_eq!(limiter.check_line("a", at(15), LINE), None);
        assert_eq!(
            limiter.check_line("a", at(20), LINE),
            Some(LetThrough { suppressed: 1 })
        );
    }

    #[test]
    fn at_shutdown_every_suppressed_count_comes_out() {
        let mut limiter = RateLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        assert!(limiter.check_line("a", start, LINE).is_some());
        assert!(limiter.check("quiet", start).is_some());
        for _ in 0..7 {
            assert_eq!(limiter.check_line("a", start, LINE), None);
        }
        assert_eq!(limiter.check("quiet", start), None);
        assert_eq!(
            limiter.all_summaries(),
            [
                Summary {
                    key: "a".into(),
                    line: Some(LINE),
                    suppressed: 7
                },
                Summary {
                    key: "quiet".into(),
                    line: None,
                    suppressed: 1
                }
            ]
        );
        assert!(limiter.all_summaries().is_empty());
        assert!(limiter
            .due_summaries(start + Duration::from_secs(60))
            .is_empty());
    }

    #[test]
    fn lines_and_summaries_add_up_to_every_occurrence() {
        let mut limiter = RateLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        let mut counted = 0;
        // 1000 occurrences, one every 100 ms, with a summary check every second.
        for n in 0..1_000u64 {
            let now = start + Duration::from_millis(100 * n);
            if let Some(allowed) = limiter.check_line("k", now, LINE) {
                counted += 1 + allowed.suppressed;
            }
            if n % 10 == 0 {
                counted += limiter
                    .due_summaries(now)
                    .iter()
                    .map(|summary| summary.suppressed)
                    .sum::<u64>();
            }
        }
        counted += limiter
            .all_summaries()
            .iter()
            .map(|summary| summary.suppressed)
            .sum::<u64>();
        assert_eq!(counted, 1_000);
    }
}
