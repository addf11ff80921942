//! The range of every value, checked once the file is read.

use crate::{Config, ExpertBudget, Size, size_spec};

impl Config {
    /// The first value out of range, as its dotted key and what is wrong.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        let server = &self.server;
        let generation = &self.generation;
        let memory = &self.memory;
        let share = |value: f64| value > 0.0 && value < 1.0;
        let rules: [(&'static str, bool, String); 19] = [
            (
                "server.max_message_bytes",
                server.max_message_bytes >= 1024,
                format!("must be at least 1KiB, got {}", server.max_message_bytes),
            ),
            (
                "server.max_connections",
                server.max_connections >= 1,
                "must be at least 1".into(),
            ),
            (
                "server.max_requests_per_connection",
                server.max_requests_per_connection >= 1,
                "must be at least 1".into(),
            ),
            (
                "server.message_timeout_secs",
                server.message_timeout_secs >= 1,
                "must be at least 1".into(),
            ),
            (
                "model.expert_budget",
                match self.model.expert_budget {
                    ExpertBudget::Auto => true,
                    ExpertBudget::Bytes(bytes) => bytes > 0,
                    ExpertBudget::Percent(percent) => percent > 0.0,
                },
                "must be more than 0".into(),
            ),
            (
                "generation.temperature",
                generation.temperature.is_finite() && generation.temperature >= 0.0,
                format!("must be 0 or more, got {}", generation.temperature),
            ),
            (
                "generation.top_p",
                generation.top_p > 0.0 && generation.top_p <= 1.0,
                format!("must be in (0, 1], got {}", generation.top_p),
            ),
            (
                "generation.min_p",
                (0.0..1.0).contains(&generation.min_p),
                format!("must be in [0, 1), got {}", generation.min_p),
            ),
            (
                "generation.repetition_penalty",
                generation.repetition_penalty.is_finite() && generation.repetition_penalty > 0.0,
                format!("must be more than 0, got {}", generation.repetition_penalty),
            ),
            (
                "generation.max_tokens",
                generation.max_tokens >= 1,
                "must be at least 1".into(),
            ),
            (
                "sessions.max_sessions",
                self.sessions.max_sessions >= 1,
                "must be at least 1".into(),
            ),
            (
                "server.socket",
                server
                    .socket
                    .as_ref()
                    .is_none_or(|path| !path.as_os_str().is_empty()),
                "must not be empty".into(),
            ),
            (
                "memory.auto_fraction",
                memory.auto_fraction > 0.0 && memory.auto_fraction <= 1.0,
                format!("must be in (0, 1], got {}", memory.auto_fraction),
            ),
            (
                "memory.shrink_step",
                share(memory.shrink_step),
                format!("must be in (0, 1), got {}", memory.shrink_step),
            ),
            (
                "memory.critical_step",
                share(memory.critical_step),
                format!("must be in (0, 1), got {}", memory.critical_step),
            ),
            (
                "memory.grow_step",
                memory.grow_step > 0.0 && memory.grow_step <= 1.0,
                format!("must be in (0, 1], got {}", memory.grow_step),
            ),
            (
                "memory.interval_ms",
                memory.interval_ms >= 10,
                format!("must be at least 10, got {}", memory.interval_ms),
            ),
            (
                "memory.max_budget",
                memory.max_budget.is_none_or(|max| match max {
                    Size::Bytes(bytes) => bytes > 0,
                    Size::Percent(percent) => percent > 0.0,
                }),
                "must be more than 0".into(),
            ),
            (
                "memory.critical_headroom",
                match (memory.critical_headroom, memory.warn_headroom) {
                    (Size::Bytes(critical), Size::Bytes(warn)) => critical <= warn,
                    (Size::Percent(critical), Size::Percent(warn)) => critical <= warn,
                    _ => true,
                },
                format!(
                    "must not be above memory.warn_headroom ({})",
                    size_spec(memory.warn_headroom)
                ),
            ),
        ];
        match rules.into_iter().find(|(_, ok, _)| !ok) {
            Some((key, _, message)) => Err((key, message)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{Config, ConfigError, Invalid};

    fn invalid(text: &str) -> Invalid {
        match Config::from_toml(text, Some(Path::new("/etc/odmoed.toml"))) {
            Err(ConfigError::Invalid(invalid)) => *invalid,
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn values_out_of_range_are_named_with_their_line() {
        let cases = [
            (
                "[generation]\ntemperature = 0.5\ntop_p = 1.5\n",
                3,
                "generation.top_p",
            ),
            ("[generation]\ntop_p = 0.0\n", 2, "generation.top_p"),
            ("[generation]\nmin_p = 1.0\n", 2, "generation.min_p"),
            (
                "[generation]\ntemperature = -0.1\n",
                2,
                "generation.temperature",
            ),
            (
                "[generation]\nrepetition_penalty = 0\n",
                2,
                "generation.repetition_penalty",
            ),
            ("[generation]\nmax_tokens = 0\n", 2, "generation.max_tokens"),
            (
                "[server]\nmax_connections = 0\n",
                2,
                "server.max_connections",
            ),
            (
                "[server]\nmax_message_bytes = 100\n",
                2,
                "server.max_message_bytes",
            ),
            (
                "[server]\nmax_message_bytes = \"10%\"\n",
                2,
                "server.max_message_bytes",
            ),
            ("[sessions]\nmax_sessions = 0\n", 2, "sessions.max_sessions"),
            (
                "[model]\nexpert_budget = \"0%\"\n",
                2,
                "model.expert_budget",
            ),
            (
                "[model]\nexpert_budget = \"0GiB\"\n",
                2,
                "model.expert_budget",
            ),
            ("[memory]\nauto_fraction = 0\n", 2, "memory.auto_fraction"),
            (
                "[memory]\nadapt = true\nauto_fraction = 1.5\n",
                3,
                "memory.auto_fraction",
            ),
            ("[memory]\nshrink_step = 1.0\n", 2, "memory.shrink_step"),
            ("[memory]\ncritical_step = 0\n", 2, "memory.critical_step"),
            ("[memory]\ngrow_step = 0\n", 2, "memory.grow_step"),
            ("[memory]\ninterval_ms = 5\n", 2, "memory.interval_ms"),
            ("[memory]\nmax_budget = \"0%\"\n", 2, "memory.max_budget"),
            (
                "[memory]\nwarn_headroom = \"1GiB\"\ncritical_headroom = \"2GiB\"\n",
                3,
                "memory.critical_headroom",
            ),
            ("[memory]\nkv_reserve = \"10%\"\n", 2, "memory.kv_reserve"),
            (
                "[memory]\nwarn_headroom = \"lots\"\n",
                2,
                "memory.warn_headroom",
            ),
            ("[memory]\nquiet_secs = -1\n", 2, "memory.quiet_secs"),
        ];
        for (text, line, key) in cases {
            let error = invalid(text);
            assert_eq!(
                (error.line, error.key.as_deref()),
                (Some(line), Some(key)),
                "{text}"
            );
        }
    }
}
