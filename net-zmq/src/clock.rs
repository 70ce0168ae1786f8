//! The host's two clocks, converted into core's time types.
//!
//! Core never reads a clock: the adapter reads [`std::time::Instant`] (monotonic, for
//! timers) and [`std::time::SystemTime`] (wall clock, for ttl expiries in epoch
//! milliseconds) and passes both into every `handle_*` call.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clonekv_core::time::{EpochMillis, Instant};

/// Reads the process's clocks as core [`Instant`]s (nanoseconds since this clock was
/// made) and [`EpochMillis`].
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: std::time::Instant,
}

impl Clock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Self {
        Clock {
            origin: std::time::Instant::now(),
        }
    }

    /// Monotonic time since the origin.
    pub fn now(&self) -> Instant {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Instant::from_nanos(nanos)
    }

    /// Wall-clock time. A clock set before 1970 reads as the epoch itself.
    pub fn wall(&self) -> EpochMillis {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        EpochMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }

    /// How long to sleep from `now` until `deadline` (`None`: no deadline, sleep until
    /// a socket wakes us). Rounded up to whole milliseconds, the resolution of the
    /// poller, so that a wakeup never comes a fraction early and spins.
    pub fn sleep_until(&self, now: Instant, deadline: Option<Instant>) -> Option<Duration> {
        let remaining = deadline?.saturating_duration_since(now);
        let millis = remaining.as_nanos().div_ceil(1_000_000);
        Some(Duration::from_millis(
            u64::try_from(millis).unwrap_or(u64::MAX),
        ))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_round_up_to_whole_milliseconds() {
        let clock = Clock::new();
        let now = Instant::from_nanos(1_000);
        let deadline = Instant::from_nanos(1_000 + 1_500_000);
        assert_eq!(
            clock.sleep_until(now, Some(deadline)),
            Some(Duration::from_millis(2))
        );
        assert_eq!(clock.sleep_until(deadline, Some(now)), Some(Duration::ZERO));
        assert_eq!(clock.sleep_until(now, None), None);
    }

    #[test]
    fn the_wall_clock_reads_epoch_milliseconds() {
        // 2020-01-01 in epoch ms: any machine running this is later.
        assert!(Clock::new().wall().0 > 1_577_836_800_000);
    }
}
