//! Memory pressure: where it is read, and the controller that makes the
//! expert budget follow it.
//!
//! A [`PressureSource`] (PSI triggers and the memory left on the machine and
//! in the daemon's cgroups on Linux, the memory-pressure dispatch source on
//! macOS) is read by a monitor thread every `memory.interval_ms`, or at once
//! when it fires. The [`Pressure`] controller makes each reading a level (the
//! worse of the source's event and of the headroom against
//! `memory.warn_headroom` and `memory.critical_headroom`), feeds it to the
//! [`BudgetPolicy`](policy::BudgetPolicy), logs every change of the budget
//! with its reason, and hands the engine thread a [`Directive`]: the budget to
//! give the expert store between two tokens (never within a layer, and the
//! store never evicts a pinned expert), and under critical pressure, to drop
//! the KV caches of idle sessions and give freed memory back to the system.
//!
//! The `pressure` method puts a simulated level in place of the source's
//! until it is released; the simulated readings take the same path.

mod controller;
#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;
pub mod policy;

use std::time::Duration;

use crate::budget::BudgetKind;
pub use controller::{MemoryReport, Pressure};
pub use policy::Level;

/// Memory the daemon can still take before the tightest limit it lives under.
#[derive(Clone, Debug, PartialEq)]
pub struct Headroom {
    /// Bytes still available.
    pub available: u64,
    /// The smallest limit: the machine's memory or a cgroup's limit.
    pub limit: u64,
    /// Where `available` was least, e.g. "the machine" or "cgroup /sys/...".
    pub scope: String,
}

/// Where memory pressure is read: the system's own signal, and the headroom.
pub trait PressureSource: Send + Sync {
    /// What is watched, for the log and `stats`.
    fn describe(&self) -> String;
    /// Waits up to `timeout` for the system's pressure signal; the level it
    /// reports and what fired, or `None` when nothing did.
    fn wait(&self, timeout: Duration) -> Option<(Level, String)>;
    /// The memory left now, when the platform says.
    fn headroom(&self) -> Option<Headroom>;
}

/// The platform's source.
pub fn platform_source() -> Box<dyn PressureSource> {
    #[cfg(target_os = "linux")]
    return Box::new(linux::LinuxSource::open());
    #[cfg(target_os = "macos")]
    return Box::new(macos::MacSource::open());
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    return Box::new(NoSource);
}

/// A platform without a pressure signal: readings are always normal.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
struct NoSource;

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
impl PressureSource for NoSource {
    fn describe(&self) -> String {
        "nothing (no memory-pressure signal on this platform)".to_owned()
    }
    fn wait(&self, timeout: Duration) -> Option<(Level, String)> {
        std::thread::sleep(timeout);
        None
    }
    fn headroom(&self) -> Option<Headroom> {
        None
    }
}

/// What the engine thread is to do between two tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Directive {
    /// The model it is meant for: the engine counts the models it loads.
    pub epoch: u64,
    /// The expert budget to set.
    pub budget: u64,
    /// Critical pressure: drop idle sessions' KV caches too.
    pub relieve: bool,
}

/// A model whose experts load on demand, as the controller needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMemory {
    pub epoch: u64,
    /// Bytes of all experts in memory.
    pub total_expert_bytes: u64,
    /// Bytes of the largest expert in memory (layers' experts may differ).
    pub expert_bytes: u64,
    pub experts_per_token: u64,
    pub layers: u64,
    /// The daemon's resident memory with the model loaded and no expert.
    pub base_bytes: u64,
    pub budget: BudgetKind,
}

impl ModelMemory {
    /// Two layers' routed experts: the least a token is computed with while
    /// the next layer's experts arrive.
    fn floor(&self) -> u64 {
        self.layers.min(2) * self.experts_per_token * self.expert_bytes
    }
}
