//! `[memory]`: how the expert budget follows the memory left.

use serde::{Deserialize, Serialize};

use crate::Size;

/// `[memory]`: the automatic expert budget and how it follows memory pressure.
///
/// With `model.expert_budget = "auto"` the budget starts at `auto_fraction` of
/// the memory the daemon may use (the machine's, or its cgroup's limit when
/// lower), less the model's other weights and `kv_reserve`. Whatever the start,
/// memory pressure shrinks it at once and a quiet period lets it grow back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Shrink the expert budget under memory pressure and grow it back when it
    /// passes. Default true.
    pub adapt: bool,
    /// Share of the memory (the machine's, or the cgroup limit when lower) that
    /// the daemon takes in all with an `auto` budget, in (0, 1]. Default 0.7.
    pub auto_fraction: f64,
    /// Memory set aside for KV caches and activations when sizing an `auto`
    /// budget. Default 512 MiB.
    #[serde(
        deserialize_with = "crate::size::bytes",
        serialize_with = "crate::size::size_text"
    )]
    pub kv_reserve: u64,
    /// The budget never grows above this: a size, or a share of all the
    /// model's experts. Default: none (the configured budget is the maximum).
    #[serde(
        default,
        deserialize_with = "crate::size::optional_size",
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::size::optional_size_text"
    )]
    pub max_budget: Option<Size>,
    /// Share of the budget given up when a warning is confirmed, in (0, 1).
    /// Default 0.2.
    pub shrink_step: f64,
    /// Share of the budget given up at once under critical pressure, in
    /// (0, 1). Default 0.4.
    pub critical_step: f64,
    /// Share of the largest budget given back per step once pressure has
    /// passed, in (0, 1]. Default 0.1.
    pub grow_step: f64,
    /// Seconds without pressure before the budget grows back. Default 180.
    pub quiet_secs: u64,
    /// Seconds between two growth steps. Default 30.
    pub grow_interval_secs: u64,
    /// Memory left below which pressure is a warning: a size, or a share of
    /// the memory limit. Default 10%.
    #[serde(
        deserialize_with = "crate::size::size",
        serialize_with = "crate::size::size_spec_text"
    )]
    pub warn_headroom: Size,
    /// Memory left below which pressure is critical. Default 5%.
    #[serde(
        deserialize_with = "crate::size::size",
        serialize_with = "crate::size::size_spec_text"
    )]
    pub critical_headroom: Size,
    /// Milliseconds between two readings of the memory left, at least 10.
    /// Default 1000.
    pub interval_ms: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            adapt: true,
            auto_fraction: 0.7,
            kv_reserve: 512 << 20,
            max_budget: None,
            shrink_step: 0.2,
            critical_step: 0.4,
            grow_step: 0.1,
            quiet_secs: 180,
            grow_interval_secs: 30,
            warn_headroom: Size::Percent(10.0),
            critical_headroom: Size::Percent(5.0),
            interval_ms: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn the_memory_section_reads_sizes_and_shares() {
        let text = "[memory]\nkv_reserve = \"64MiB\"\nmax_budget = \"50%\"\n\
                    warn_headroom = \"1GiB\"\ncritical_headroom = \"256MiB\"\nquiet_secs = 2\n";
        let memory = Config::from_toml(text, None).unwrap().memory;
        assert_eq!(memory.kv_reserve, 64 << 20);
        assert_eq!(memory.max_budget, Some(Size::Percent(50.0)));
        assert_eq!(memory.warn_headroom, Size::Bytes(1 << 30));
        assert_eq!(memory.critical_headroom, Size::Bytes(256 << 20));
        assert_eq!(memory.quiet_secs, 2);
        assert_eq!(memory.shrink_step, MemoryConfig::default().shrink_step);
        assert_eq!(Size::Percent(10.0).of(1000), 100);
        assert_eq!(Size::Bytes(7).of(1000), 7);
        // Shares and sizes mixed are not compared.
        let text = "[memory]\nwarn_headroom = \"1%\"\ncritical_headroom = \"1GiB\"\n";
        assert!(Config::from_toml(text, None).is_ok());
    }
}
