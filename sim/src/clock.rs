//! Per-node clocks: each node sees the world's time through its own offset and drift, and
//! its own wall clock, so timeouts and ttls are tested under skew as real machines have it.

use std::time::Duration;

use clonekv_core::time::{EpochMillis, Instant};

const PPM: i128 = 1_000_000;

/// How one node's clocks relate to the world's true time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeClock {
    /// Monotonic offset: the node's `Instant` origin is this far behind the world's.
    pub offset: Duration,
    /// Rate error in parts per million: +100 runs 0.01% fast. Real quartz: within ±100.
    pub drift_ppm: i32,
    /// The node's wall clock at world time zero.
    pub wall_at_start: EpochMillis,
}

impl NodeClock {
    /// A perfect clock with its wall clock starting at `wall_at_start`.
    pub fn exact(wall_at_start: EpochMillis) -> NodeClock {
        NodeClock {
            offset: Duration::ZERO,
            drift_ppm: 0,
            wall_at_start,
        }
    }

    fn local_nanos(&self, world: Instant) -> i128 {
        // The simulator asks this millions of times a second: 64-bit division is several
        // times cheaper than 128-bit, and exact for any run shorter than a century.
        let fast = i64::try_from(world.as_nanos()).ok().and_then(|world| {
            let drift = world.checked_mul(i64::from(self.drift_ppm))? / 1_000_000;
            let offset = i64::try_from(self.offset.as_nanos()).ok()?;
            world.checked_add(drift)?.checked_add(offset)
        });
        match fast {
            Some(nanos) => i128::from(nanos),
            None => {
                let world = i128::from(world.as_nanos());
                world + world * i128::from(self.drift_ppm) / PPM + self.offset.as_nanos() as i128
            }
        }
    }

    /// The node's monotonic time when the world's time is `world`.
    pub fn local(&self, world: Instant) -> Instant {
        let nanos = self.local_nanos(world).clamp(0, i128::from(u64::MAX));
        Instant::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The node's wall clock when the world's time is `world`: its start value plus the
    /// world's elapsed time at the node's rate. The monotonic offset is only where the
    /// node's `Instant` origin lies; it does not move the wall clock.
    pub fn wall(&self, world: Instant) -> EpochMillis {
        let elapsed = self.local_nanos(world) - self.offset.as_nanos() as i128;
        let elapsed_millis = match u64::try_from(elapsed.max(0)) {
            Ok(nanos) => nanos / 1_000_000,
            Err(_) => u64::MAX,
        };
        EpochMillis(self.wall_at_start.0.saturating_add(elapsed_millis))
    }

    /// The earliest world time at which the node's clock reads at least `local`: when a
    /// node asks to be woken at its `local` deadline, the world wakes it then.
    pub fn world_deadline(&self, local: Instant) -> Instant {
        let target = i128::from(local.as_nanos()) - self.offset.as_nanos() as i128;
        if target <= 0 {
            return Instant::ZERO;
        }
        let rate = PPM + i128::from(self.drift_ppm);
        let mut estimate = match (i64::try_from(target * PPM), i64::try_from(rate)) {
            (Ok(scaled), Ok(rate)) if rate > 0 => i128::from(scaled / rate),
            _ => target * PPM / rate,
        }
        .max(0);
        // Integer division can land a few nanoseconds short; step to the first instant
        // that really is at or past the deadline.
        while self.local_nanos(to_instant(estimate)) < i128::from(local.as_nanos()) {
            estimate += 1;
        }
        while estimate > 0
            && self.local_nanos(to_instant(estimate - 1)) >= i128::from(local.as_nanos())
        {
            estimate -= 1;
        }
        to_instant(estimate)
    }
}

fn to_instant(nanos: i128) -> Instant {
    Instant::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_fast_clock_runs_ahead_of_the_world() {
        let clock = NodeClock {
            offset: Duration::from_secs(3),
            drift_ppm: 100,
            wall_at_start: EpochMillis(1_000_000),
        };
        let world = Instant::from_millis(10_000);
        assert_eq!(clock.local(world), Instant::from_millis(13_001));
        assert_eq!(clock.wall(world), EpochMillis(1_010_001));
    }

    #[test]
    fn the_monotonic_offset_does_not_move_the_wall_clock() {
        let wall_at_start = EpochMillis(1_000_000);
        let near = NodeClock::exact(wall_at_start);
        let far = NodeClock {
            offset: Duration::from_secs(10),
            ..near
        };
        let world = Instant::from_millis(2_500);
        assert_eq!(near.wall(world), far.wall(world));
        assert_ne!(near.local(world), far.local(world));
    }

    proptest! {
        #[test]
        fn the_world_deadline_is_the_first_instant_the_node_sees_its_deadline(
            offset_ms in 0u64..10_000, drift in -500i32..500, local_ms in 0u64..1_000_000,
        ) {
            let clock = NodeClock {
                offset: Duration::from_millis(offset_ms),
                drift_ppm: drift,
                wall_at_start: EpochMillis(0),
            };
            let local = Instant::from_millis(local_ms);
            let world = clock.world_deadline(local);
            prop_assert!(clock.local(world) >= local);
            if world > Instant::ZERO {
                prop_assert!(clock.local(Instant::from_nanos(world.as_nanos() - 1)) < local);
            }
        }
    }
}
