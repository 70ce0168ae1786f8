//! Probabilities as exact ratios, so a fault knob reads `Ratio::new(1, 50)` ("one in
//! fifty") and two runs of one seed draw exactly the same outcomes on every platform.

use std::fmt;

use rand::RngExt;

use crate::SimRng;

/// A probability `numerator / denominator`, at most 1.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    numerator: u32,
    denominator: u32,
}

impl Ratio {
    /// Never.
    pub const NEVER: Ratio = Ratio {
        numerator: 0,
        denominator: 1,
    };
    /// Always.
    pub const ALWAYS: Ratio = Ratio {
        numerator: 1,
        denominator: 1,
    };

    /// `numerator / denominator`, clamped to `[0, 1]`; a zero denominator means never.
    pub const fn new(numerator: u32, denominator: u32) -> Ratio {
        if denominator == 0 {
            Ratio::NEVER
        } else if numerator > denominator {
            Ratio::ALWAYS
        } else {
            Ratio {
                numerator,
                denominator,
            }
        }
    }

    /// Draws one outcome.
    pub fn sample(self, rng: &mut SimRng) -> bool {
        self.numerator != 0 && rng.random_ratio(self.numerator, self.denominator)
    }

    /// The probability as a float, for estimates (never for drawing outcomes).
    pub fn probability(self) -> f64 {
        f64::from(self.numerator) / f64::from(self.denominator)
    }

    /// True when this ratio can never fire.
    pub fn is_never(self) -> bool {
        self.numerator == 0
    }
}

impl fmt::Debug for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.numerator, self.denominator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn never_and_always_are_exact() {
        let mut rng = SimRng::seed_from_u64(1);
        assert!((0..1000).all(|_| !Ratio::NEVER.sample(&mut rng)));
        assert!((0..1000).all(|_| Ratio::ALWAYS.sample(&mut rng)));
        assert_eq!(Ratio::new(5, 0), Ratio::NEVER);
        assert_eq!(Ratio::new(7, 3), Ratio::ALWAYS);
    }

    #[test]
    fn a_ratio_fires_about_as_often_as_it_says() {
        let mut rng = SimRng::seed_from_u64(2);
        let hits = (0..10_000)
            .filter(|_| Ratio::new(1, 4).sample(&mut rng))
            .count();
        assert!((2_300..2_700).contains(&hits), "{hits}");
    }
}
