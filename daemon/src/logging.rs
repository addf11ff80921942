//! Logging with `tracing`: to the journal when systemd runs the daemon
//! (`JOURNAL_STREAM` is set), else to stderr (which launchd captures, and a
//! detached daemon points at its log file). The level can change while the
//! daemon runs.

use std::io::IsTerminal;

use odmoe_config::LogLevel;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Changes the level of the logging set up by [`init`].
#[derive(Debug)]
pub struct LogControl {
    /// Replaces the filter of the installed subscriber.
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over the configured level.
    from_env: bool,
}

impl LogControl {
    /// Logs at `level` from now on, unless `RUST_LOG` decides.
    pub fn set_level(&self, level: LogLevel) -> Result<(), String> {
        if self.from_env {
            return Ok(());
        }
        self.handle
            .reload(EnvFilter::new(level.as_str()))
            .map_err(|error| error.to_string())
    }
}

/// Installs the global subscriber logging at `level`, unless `RUST_LOG` says otherwise.
pub fn init(level: LogLevel, foreground: bool) -> LogControl {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.as_str()));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|layer| layer.with_syslog_identifier("odmoed".into()));
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(foreground && std::io::stderr().is_terminal())
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .init();
    LogControl { handle, from_env }
}

/// Longest piece of client-sent text written into a log line.
const UNTRUSTED_CHARS: usize = 64;

/// Text a client sent (a method name, a client name, a path), made safe to
/// log: control characters escaped so it cannot forge log lines, and cut to
/// a few dozen characters so it cannot flood the log.
pub fn untrusted(text: &str) -> String {
    let mut shown: String = text
        .chars()
        .take(UNTRUSTED_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    let total = text.chars().count();
    if total > UNTRUSTED_CHARS {
        shown.push_str(&format!("... ({} bytes)", text.len()));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_cannot_forge_or_flood_log_lines() {
        assert_eq!(untrusted("generate"), "generate");
        let forged = untrusted("x\n2026-12-03T00:00:00Z  INFO odmoed: shutdown\r");
        assert!(!forged.contains('\n') && !forged.contains('\r'), "{forged}");
        let flood = untrusted(&"a".repeat(15 << 20));
        assert!(flood.len() < 120, "{}", flood.len());
        assert!(flood.ends_with("(15728640 bytes)"), "{flood}");
    }
}
