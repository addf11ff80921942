//! Byte sizes as people write them: the expert budget (`64MiB`, `1.5GB`, `25%`) and readable
//! sizes for reports.

use odmoe_config::{Size, parse_size};

use crate::error::{Error, Result};

/// Reads an expert budget as written, before the model's size is known: a byte count with a
/// unit, or a percentage of all experts.
///
/// Units are case-insensitive: `B`; decimal `KB`, `MB`, `GB`, `TB` (powers of 1000); binary
/// `KiB`, `MiB`, `GiB`, `TiB` and the bare `K`, `M`, `G`, `T` (powers of 1024). Fractions are
/// allowed (`1.5GB`) and rounded down to whole bytes. A bare number is refused: `1.5` meant as
/// gigabytes or as a share would otherwise become one byte.
pub fn parse_budget_size(text: &str) -> Result<Size> {
    let bad = |why: &dyn std::fmt::Display| Error::Budget(format!("{text:?}: {why}"));
    // One parser for sizes everywhere: the config file's.
    let size = parse_size(text).map_err(|e| bad(&e))?;
    let has_unit = text
        .trim_end()
        .ends_with(|c: char| c.is_ascii_alphabetic() || c == '%');
    if !has_unit {
        return Err(bad(
            &"a budget needs a unit (64MiB, 8GiB, 1.5GB) or a percentage of all experts (25%)",
        ));
    }
    Ok(size)
}

/// The bytes `size` stands for when all experts take `total_bytes`.
pub fn budget_bytes(size: Size, total_bytes: u64) -> u64 {
    match size {
        Size::Bytes(bytes) => bytes,
        Size::Percent(percent) => (total_bytes as f64 * percent / 100.0).floor() as u64,
    }
}

/// Parses an expert budget ([`parse_budget_size`]) into bytes, a percentage being of
/// `total_bytes` (the in-memory size of all experts). The budget must be positive.
pub fn parse_budget(text: &str, total_bytes: u64) -> Result<u64> {
    let bytes = budget_bytes(parse_budget_size(text)?, total_bytes);
    if bytes == 0 {
        return Err(Error::Budget(format!(
            "{text:?}: the budget must be larger than zero bytes"
        )));
    }
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    const TOTAL: u64 = 8 << 30;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_budget("64MiB", TOTAL).unwrap(), 64 << 20);
        assert_eq!(parse_budget("64mib", TOTAL).unwrap(), 64 << 20);
        assert_eq!(parse_budget("1.5GB", TOTAL).unwrap(), 1_500_000_000);
        assert_eq!(parse_budget("8G", TOTAL).unwrap(), 8 << 30);
        assert_eq!(parse_budget(" 512 KiB ", TOTAL).unwrap(), 512 << 10);
        assert_eq!(parse_budget("100B", TOTAL).unwrap(), 100);
        assert_eq!(parse_budget("2kb", TOTAL).unwrap(), 2000);
        assert_eq!(parse_budget("0.5K", TOTAL).unwrap(), 512);
        // The config file's parser reads a bare leading or trailing point as a decimal.
        assert_eq!(parse_budget(".5G", TOTAL).unwrap(), 512 << 20);
    }

    #[test]
    fn percentages_of_the_experts() {
        assert_eq!(parse_budget("25%", TOTAL).unwrap(), 2 << 30);
        assert_eq!(parse_budget("100%", TOTAL).unwrap(), TOTAL);
        assert_eq!(parse_budget("12.5 %", 1000).unwrap(), 125);
        assert_eq!(parse_budget("33%", 10).unwrap(), 3);
    }

    #[test]
    fn nonsense_is_refused_and_named() {
        for text in [
            "", "abc", "64XB", "-5MiB", "1.2.3G", "0", "0%", "101%", "0.1%", "1e9", "1.5", "4096",
        ] {
            let total = if text == "0.1%" { 100 } else { TOTAL };
            let err = parse_budget(text, total).unwrap_err().to_string();
            assert!(err.contains(&format!("{text:?}")), "{text:?}: {err}");
        }
        assert!(
            parse_budget("1.5", TOTAL)
                .unwrap_err()
                .to_string()
                .contains("needs a unit")
        );
    }

    #[test]
    fn readable_sizes() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(64 << 20), "64.0 MiB");
        assert_eq!(format_bytes(3 << 40), "3.0 TiB");
    }
}
