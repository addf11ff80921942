//! `[log]`: what the daemon logs.

use serde::{Deserialize, Serialize};

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Least severe level logged: error, warn, info, debug or trace. Default
    /// info. `RUST_LOG`, when set, overrides it.
    pub level: LogLevel,
}

/// Severity levels, as `tracing` names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Only failures.
    Error,
    /// Failures and suspicious events.
    Warn,
    /// Start-up, shutdown, connections refused. The default.
    #[default]
    Info,
    /// Every request.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level's name, as in the config file and `RUST_LOG`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}
