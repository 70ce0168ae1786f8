//! Durations as people type them on a command line or in a config file: `250ms`, `1s`,
//! `1.5s`, `2m`, `1h`, `1h 30m`. A bare number is seconds, like a ttl on the wire.
//!
//! Parsing is humantime's (its units: `ns`, `us`/`µs`, `ms`, `s`/`sec`, `m`/`min`,
//! `h`/`hr`, `d`, `w`, ...; whole numbers or decimal fractions, several terms summed);
//! this module only adds a bare number as seconds and a leading `.` (`.5s`).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A [`Duration`] that parses from and prints as text like `250ms` or `1.5s`. It is the
/// type of every timing flag and config-file entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// Why a duration did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {text:?} ({reason}): expected a number with a unit, like 250ms, 1.5s, \
     2m or 1h"
)]
pub struct DurationError {
    text: String,
    reason: String,
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(&humantime_text(text.trim()))
            .map(HumanDuration)
            .map_err(|error| DurationError {
                text: text.to_string(),
                reason: error.to_string(),
            })
    }
}

/// `text` in humantime's grammar: a bare number (`2`, `1.5`) gets the unit `s`, and a
/// number that starts with its decimal point (`.5s`) a leading zero.
fn humantime_text(text: &str) -> Cow<'_, str> {
    let is_number = text
        .bytes()
        .all(|byte| byte.is_ascii_digit() || byte == b'.')
        && text.bytes().any(|byte| byte.is_ascii_digit());
    let text: Cow<'_, str> = if text.starts_with('.') {
        format!("0{text}").into()
    } else {
        text.into()
    };
    if is_number {
        format!("{text}s").into()
    } else {
        text
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let duration = self.0;
        if duration.subsec_nanos() == 0 {
            write!(f, "{}s", duration.as_secs())
        } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", duration.as_millis())
        } else {
            write!(f, "{}ns", duration.as_nanos())
        }
    }
}

impl<'de> serde::Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration like \"250ms\", \"1.5s\" or \"2m\" (a bare number is seconds)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                text.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(seconds)))
            }
            fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<HumanDuration, E> {
                u64::try_from(seconds)
                    .map(|seconds| HumanDuration(Duration::from_secs(seconds)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, seconds: f64) -> Result<HumanDuration, E> {
                Duration::try_from_secs_f64(seconds)
                    .map(HumanDuration)
                    .map_err(|_| E::custom("a duration must be a non-negative number of seconds"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<Duration> {
        text.parse::<HumanDuration>().ok().map(HumanDuration::get)
    }

    #[test]
    fn units_and_fractions_parse() {
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Some(Duration::from_millis(1_500)));
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse(".5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3_600)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
    }

    #[test]
    fn humantime_adds_its_units_and_sums() {
        assert_eq!(parse("1h 30m"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse("1 s"), Some(Duration::from_secs(1)));
        assert_eq!(parse("2min"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1.5"), Some(Duration::from_millis(1_500)));
        assert_eq!(parse(" 3s "), Some(Duration::from_secs(3)));
        assert_eq!(parse("1.25ms"), Some(Duration::from_micros(1_250)));
    }

    #[test]
    fn an_error_says_why_and_what_is_expected() {
        let error = "soon".parse::<HumanDuration>().unwrap_err().to_string();
        assert!(error.starts_with("invalid duration \"soon\" ("), "{error}");
        assert!(error.ends_with("like 250ms, 1.5s, 2m or 1h"), "{error}");
    }

    #[test]
    fn garbage_is_refused() {
        for text in [
            "",
            "s",
            ".",
            "-1s",
            "1x",
            "1.2.3s",
            "1e3s",
            "99999999999999999999h",
            ".s",
            "1.",
            "5 apples",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        assert_eq!(HumanDuration(Duration::from_secs(3)).to_string(), "3s");
        assert_eq!(
            HumanDuration(Duration::from_millis(1_500)).to_string(),
            "1500ms"
        );
    }

    #[test]
    fn a_config_file_may_give_strings_or_seconds() {
        #[derive(serde::Deserialize)]
        struct File {
            a: HumanDuration,
            b: HumanDuration,
        }
        let file: File = toml::from_str("a = \"200ms\"\nb = 3").unwrap();
        assert_eq!(file.a.get(), Duration::from_millis(200));
        assert_eq!(file.b.get(), Duration::from_secs(3));
    }
}
