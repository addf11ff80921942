//! How long a model stays loaded after its last request, as Ollama spells it:
//! a duration (`"5m"`, `"1h30m"`, `"90s"`, `"250ms"`, or a number of
//! seconds), `0` to unload right after each reply, or any negative number to
//! keep it loaded until told otherwise.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// How long an idle model stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepAlive {
    /// Until `unload`, `load` of another model, or the daemon stops.
    #[default]
    Forever,
    /// This long after the last request finished (zero: unload at once).
    For(Duration),
}

/// Text that [`KeepAlive::parse`] cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a keep_alive: expected a duration such as \"5m\", \"1h30m\" or \"90s\", a number \
     of seconds, 0 (unload after each reply) or -1 (keep loaded)"
)]
pub struct KeepAliveError(pub String);

const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

impl KeepAlive {
    /// Reads a keep_alive as text.
    pub fn parse(text: &str) -> Result<KeepAlive, KeepAliveError> {
        let error = || KeepAliveError(text.to_owned());
        let trimmed = text.trim();
        if let Ok(seconds) = trimmed.parse::<i64>() {
            return Ok(KeepAlive::seconds(seconds));
        }
        if let Some(magnitude) = trimmed.strip_prefix('-') {
            if magnitude.starts_with('-') {
                return Err(error());
            }
            // "-1m" keeps the model loaded, as a negative number does.
            return KeepAlive::parse(magnitude)
                .map(|_| KeepAlive::Forever)
                .map_err(|_| error());
        }
        let mut millis: u64 = 0;
        let mut rest = trimmed;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(error)?;
            if digits == 0 {
                return Err(error());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| error())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            let scale = UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|&(_, scale)| scale)
                .ok_or_else(error)?;
            millis = number
                .checked_mul(scale)
                .and_then(|part| millis.checked_add(part))
                .ok_or_else(error)?;
            rest = &rest[unit_len..];
        }
        if trimmed.is_empty() {
            return Err(error());
        }
        Ok(KeepAlive::For(Duration::from_millis(millis)))
    }

    /// `seconds` as Ollama reads a number: negative keeps the model loaded.
    pub fn seconds(seconds: i64) -> KeepAlive {
        match u64::try_from(seconds) {
            Ok(seconds) => KeepAlive::For(Duration::from_secs(seconds)),
            Err(_) => KeepAlive::Forever,
        }
    }
}

impl fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepAlive::Forever => f.write_str("-1"),
            KeepAlive::For(duration) if duration.subsec_millis() != 0 => {
                write!(f, "{}ms", duration.as_millis())
            }
            KeepAlive::For(duration) => write!(f, "{}s", duration.as_secs()),
        }
    }
}

impl Serialize for KeepAlive {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeepAlive {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeepAliveVisitor;

        impl Visitor<'_> for KeepAliveVisitor {
            type Value = KeepAlive;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"5m\", a number of seconds, 0 or -1")
            }

            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<KeepAlive, E> {
                Ok(KeepAlive::seconds(seconds))
            }

            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<KeepAlive, E> {
                Ok(KeepAlive::seconds(
                    i64::try_from(seconds).unwrap_or(i64::MAX),
                ))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<KeepAlive, E> {
                KeepAlive::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(KeepAliveVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_numbers_zero_and_negative() {
        let cases = [
            ("5m", KeepAlive::For(Duration::from_secs(300))),
            ("1h30m", KeepAlive::For(Duration::from_secs(5400))),
            ("90s", KeepAlive::For(Duration::from_secs(90))),
            ("250ms", KeepAlive::For(Duration::from_millis(250))),
            ("300", KeepAlive::For(Duration::from_secs(300))),
            ("0", KeepAlive::For(Duration::ZERO)),
            ("-1", KeepAlive::Forever),
            ("-5m", KeepAlive::Forever),
        ];
        for (text, expected) in cases {
            assert_eq!(KeepAlive::parse(text), Ok(expected), "{text}");
        }
        for text in ["", "5 minutes", "m", "1.5h", "5x", "--1"] {
            assert!(KeepAlive::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn it_reads_back_what_it_writes() {
        for keep in [
            KeepAlive::Forever,
            KeepAlive::For(Duration::from_secs(300)),
            KeepAlive::For(Duration::from_millis(1500)),
        ] {
            assert_eq!(KeepAlive::parse(&keep.to_string()), Ok(keep));
        }
    }
}
