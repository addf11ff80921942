//! Sizes written by people (`"64MiB"`, `"1.5GB"`, `"123"`, `"25%"`), and bytes written for them
//! (`1.5 GiB`).

use std::fmt;

use serde::Serializer;
use serde::de::{self, Deserializer, Visitor};

/// A size as written in the config: a number of bytes or a share of something.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A percentage in `[0, 100]` of some whole (e.g. the machine's memory).
    Percent(f64),
}

/// Text that [`parse_size`] cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a size: {reason} (expected a number of bytes with an optional unit \
     B, KB, MB, GB, TB (decimal), KiB, MiB, GiB, TiB or K, M, G, T (binary), or a percentage \
     such as 25%)"
)]
pub struct SizeError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Units and their multipliers: decimal `KB` = 1000, binary `KiB` = 1024, and
/// the bare `K` binary too, as memory sizes are usually meant.
const UNITS: [(&str, u64); 13] = [
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
];

/// Reads a size: a decimal number with an optional unit (case-insensitive,
/// optionally after a space), or a percentage. `KB`, `MB`, `GB`, `TB` are
/// decimal; `KiB`, `MiB`, `GiB`, `TiB` and the bare `K`, `M`, `G`, `T` binary.
///
/// Without a unit the number is bytes. Fractions are exact decimal arithmetic,
/// and a fraction of a byte is dropped: `"1.5KiB"` is 1536 bytes, `"0.5B"` is 0.
///
/// ```
/// use odmoe_config::{Size, parse_size};
/// assert_eq!(parse_size("64MiB"), Ok(Size::Bytes(64 << 20)));
/// assert_eq!(parse_size("1.5GB"), Ok(Size::Bytes(1_500_000_000)));
/// assert_eq!(parse_size("123"), Ok(Size::Bytes(123)));
/// assert_eq!(parse_size("25%"), Ok(Size::Percent(25.0)));
/// ```
pub fn parse_size(input: &str) -> Result<Size, SizeError> {
    let error = |reason| SizeError {
        input: input.to_owned(),
        reason,
    };
    let text = input.trim();
    if let Some(number) = text.strip_suffix('%') {
        let percent: f64 = number
            .trim_end()
            .parse()
            .map_err(|_| error("not a number before `%`"))?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(error("a percentage must be between 0 and 100"));
        }
        return Ok(Size::Percent(percent));
    }
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let unit = unit.trim_start().to_ascii_lowercase();
    let multiplier = match unit.as_str() {
        "" => 1,
        unit => UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, multiplier)| multiplier)
            .ok_or_else(|| error("unknown unit"))?,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(error("no number"));
    }
    if whole.len() > 20 || fraction.len() > 18 || fraction.contains('.') {
        return Err(error("not a number"));
    }
    // At most 20 + 18 digits: the u128 arithmetic below cannot overflow.
    let parse = |digits: &str| digits.parse::<u128>().unwrap_or(0);
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = (parse(whole) * scale + parse(fraction)) * u128::from(multiplier) / scale;
    u64::try_from(bytes)
        .map(Size::Bytes)
        .map_err(|_| error("too large"))
}

/// Deserializes a size from a TOML integer (bytes) or a string for
/// [`parse_size`]; with `auto` set, the string `"auto"` gives `None`.
pub(crate) fn deserialize_size<'de, D: Deserializer<'de>>(
    deserializer: D,
    auto: bool,
) -> Result<Option<Size>, D::Error> {
    struct SizeVisitor {
        /// Whether `"auto"` is accepted.
        auto: bool,
    }

    impl Visitor<'_> for SizeVisitor {
        type Value = Option<Size>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.auto {
                f.write_str("\"auto\", a size such as \"8GiB\", or a percentage such as \"25%\"")
            } else {
                f.write_str("a number of bytes or a size such as \"16MiB\"")
            }
        }

        fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Self::Value, E> {
            Ok(Some(Size::Bytes(bytes)))
        }

        fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<Self::Value, E> {
            u64::try_from(bytes)
                .map(|bytes| Some(Size::Bytes(bytes)))
                .map_err(|_| E::custom(format!("a size cannot be negative, got {bytes}")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            if self.auto && text.trim().eq_ignore_ascii_case("auto") {
                return Ok(None);
            }
            parse_size(text).map(Some).map_err(E::custom)
        }
    }

    deserializer.deserialize_any(SizeVisitor { auto })
}

/// `bytes` in binary units with one decimal (`1.5 GiB`), or exact below 1 KiB (`512 B`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl Size {
    /// The bytes of this size, a percentage being of `whole`.
    pub fn of(self, whole: u64) -> u64 {
        match self {
            Size::Bytes(bytes) => bytes,
            Size::Percent(percent) => (whole as f64 * percent / 100.0) as u64,
        }
    }
}

/// A number of bytes: an integer or a size, not a percentage.
pub(crate) fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match deserialize_size(deserializer, false)? {
        Some(Size::Bytes(bytes)) => Ok(bytes),
        _ => Err(serde::de::Error::custom(
            "must be a number of bytes, not a percentage",
        )),
    }
}

/// Bytes written as the config file writes them.
pub(crate) fn size_text<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_size(*bytes))
}

/// A size or a percentage.
pub(crate) fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
    deserialize_size(deserializer, false)?
        .ok_or_else(|| serde::de::Error::custom("must be a size or a percentage"))
}

/// A size or a percentage, when given.
pub(crate) fn optional_size<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Size>, D::Error> {
    size(deserializer).map(Some)
}

/// A size or a percentage written as the config file writes it.
pub(crate) fn size_spec_text<S: Serializer>(size: &Size, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&size_spec(*size))
}

/// [`size_spec_text`], when given.
pub(crate) fn optional_size_text<S: Serializer>(
    size: &Option<Size>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match size {
        Some(size) => size_spec_text(size, serializer),
        None => serializer.serialize_none(),
    }
}

/// A size as the config file writes it: `"16MiB"` or `"25%"`.
pub fn size_spec(size: Size) -> String {
    match size {
        Size::Bytes(bytes) => format_size(bytes),
        Size::Percent(percent) => format!("{percent}%"),
    }
}

/// `bytes` in the largest binary unit that divides it exactly, e.g. `"16MiB"`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    UNITS
        .iter()
        .find(|&&(_, shift)| bytes != 0 && bytes.trailing_zeros() >= shift)
        .map(|&(unit, shift)| format!("{}{unit}", bytes >> shift))
        .unwrap_or_else(|| bytes.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_sizes() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(64 << 20), "64.0 MiB");
        assert_eq!(format_bytes(3 << 40), "3.0 TiB");
    }

    #[test]
    fn binary_and_decimal_units() {
        let cases = [
            ("64MiB", 64 << 20),
            ("1KiB", 1024),
            ("2GiB", 2 << 30),
            ("1TiB", 1 << 40),
            ("1KB", 1000),
            ("3MB", 3_000_000),
            ("1.5GB", 1_500_000_000),
            ("1.5GiB", 3 << 29),
            ("4.1KB", 4100),
            ("123", 123),
            ("123B", 123),
            ("8 gib", 8 << 30),
            ("8G", 8 << 30),
            ("512k", 512 << 10),
            (" 16MiB ", 16 << 20),
            (".5KiB", 512),
            ("0.3KiB", 307),
            ("0", 0),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(Size::Bytes(bytes)), "{text}");
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_size("25%"), Ok(Size::Percent(25.0)));
        assert_eq!(parse_size("12.5 %"), Ok(Size::Percent(12.5)));
        assert_eq!(parse_size("100%"), Ok(Size::Percent(100.0)));
        assert!(parse_size("101%").is_err());
        assert!(parse_size("-5%").is_err());
        assert!(parse_size("%").is_err());
    }

    #[test]
    fn nonsense_is_refused_with_the_input_named() {
        for text in [
            "",
            "MiB",
            "12 parsecs",
            "1.2.3GB",
            "-1",
            "1e9",
            "8Gb/s",
            "99999999999999999999999",
        ] {
            let error = parse_size(text).unwrap_err();
            assert_eq!(error.input, text);
            assert!(error.to_string().contains(&format!("`{text}`")));
        }
        assert_eq!(parse_size("16777216TiB").unwrap_err().reason, "too large");
    }

    #[test]
    fn sizes_print_in_the_largest_exact_binary_unit() {
        assert_eq!(format_size(16 << 20), "16MiB");
        assert_eq!(format_size(3 << 29), "1536MiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }
}
