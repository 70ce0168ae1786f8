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
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    keys: BTreeMap<String, KeyState>,
}

#[derive(Debug)]
struct KeyState {
    last_logged: Instant,
    suppressed: u64,
}

/// The limiter lets an occurrence through with the number suppressed since the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LetThrough {
    /// Occurrences of the same key not logged since the previous line.
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
        }
    }

    /// Records one occurrence of `key` at `now`; `Some` when it should be logged.
    pub fn check(&mut self, key: &str, now: Instant) -> Option<LetThrough> {
        if let Some(state) = self.keys.get_mut(key) {
            if now.saturating_duration_since(state.last_logged) < self.interval {
                state.suppressed += 1;
                return None;
            }
            let suppressed = std::mem::take(&mut state.suppressed);
            state.last_logged = now;
            return Some(LetThrough { suppressed });
        }
        if self.keys.len() >= MAX_KEYS {
            self.keys.clear();
        }
        self.keys.insert(
            key.to_string(),
            KeyState {
                last_logged: now,
                suppressed: 0,
            },
        );
        Some(LetThrough { suppressed: 0 })
    }
}

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
    if let Some(allowed) = limiter.check(&key, Instant::now()) {
        tracing::warn!(
            socket = socket.name(),
            problem,
            suppressed = allowed.suppressed,
            "message not sent"
        );
    }
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
}
