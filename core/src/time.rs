//! Time as data. Core never reads a clock: the host passes `now` into every call.
//!
//! [`Instant`] is monotonic time (nanoseconds since an origin the host chooses: process
//! start in the daemon, zero in the simulator); it drives timers. [`EpochMillis`] is
//! wall-clock time in Unix milliseconds; the protocol needs it only for absolute ttl
//! expiries exchanged with peers and snapshots (PROTOCOL.md §5).

use std::fmt;
use std::ops::{Add, AddAssign};
use std::time::Duration;

/// A point in monotonic time, in nanoseconds since a host-chosen origin.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The origin of the host's clock.
    pub const ZERO: Instant = Instant(0);

    /// An instant `nanos` nanoseconds after the origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// An instant `millis` milliseconds after the origin.
    pub const fn from_millis(millis: u64) -> Self {
        Instant(millis.saturating_mul(1_000_000))
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self + duration`, saturating at the end of representable time rather than
    /// wrapping: a timer set absurdly far away simply never fires.
    pub fn saturating_add(self, duration: Duration) -> Instant {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, duration: Duration) -> Instant {
        self.saturating_add(duration)
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, duration: Duration) {
        *self = self.saturating_add(duration);
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

/// Wall-clock time: milliseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct EpochMillis(pub u64);

impl EpochMillis {
    /// `self + duration`, saturating.
    pub fn saturating_add(self, duration: Duration) -> EpochMillis {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        EpochMillis(self.0.saturating_add(millis))
    }

    /// Time from `self` until `later`, or zero if `later` is not later.
    pub fn saturating_duration_until(self, later: EpochMillis) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_a_huge_duration_saturates_instead_of_wrapping() {
        let late = Instant::from_nanos(u64::MAX - 5) + Duration::from_secs(1);
        assert_eq!(late.as_nanos(), u64::MAX);
        assert_eq!(
            EpochMillis(u64::MAX - 1).saturating_add(Duration::MAX),
            EpochMillis(u64::MAX)
        );
    }

    #[test]
    fn durations_between_instants_never_go_negative() {
        let early = Instant::from_millis(10);
        let late = Instant::from_millis(25);
        assert_eq!(
            late.saturating_duration_since(early),
            Duration::from_millis(15)
        );
        assert_eq!(early.saturating_duration_since(late), Duration::ZERO);
        assert_eq!(
            EpochMillis(30).saturating_duration_until(EpochMillis(10)),
            Duration::ZERO
        );
    }

    #[test]
    fn instants_print_as_seconds() {
        assert_eq!(format!("{:?}", Instant::from_millis(1_500)), "1.500000000s");
    }
}
