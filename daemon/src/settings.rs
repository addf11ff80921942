//! The config keys that can change while the daemon runs, and applying a
//! reloaded config file to them (SIGHUP).

use std::path::PathBuf;

use odmoe_config::{
    Config, GenerationConfig, KeepAlive, KvCache, LogLevel, Prefetch, SessionsConfig,
};

use crate::budget::BudgetSpec;

/// What SIGHUP can change without a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Sampling defaults for requests that leave fields out.
    pub generation: GenerationConfig,
    /// How many sessions are kept and for how long.
    pub sessions: SessionsConfig,
    /// The expert budget: `--expert-budget` when given, else the config's.
    pub expert_budget: BudgetSpec,
    /// Whether the budget came from `--expert-budget`, which a reloaded config
    /// does not override.
    pub budget_from_flag: bool,
    /// The configured log level (`RUST_LOG`, when set, wins).
    pub log_level: LogLevel,
    /// How long the model stays loaded after a request that does not say.
    pub keep_alive: KeepAlive,
    /// Where `models` lists models and `load NAME` finds them.
    pub models_dir: Option<PathBuf>,
    /// Most positions a sequence may hold, below the model's own maximum:
    /// `--context-length`, else `model.context_length` when not 0. Read at
    /// each load; a reloaded config does not change it.
    pub context_length: Option<usize>,
    /// `model.kv_cache`: how attention's keys and values are kept. Read at each
    /// load; a reloaded config does not change it.
    pub kv_cache: KvCache,
    /// `model.prefill_slab_tokens` when not 0: most prompt tokens a prefill runs
    /// through the layers together. Read at each load; a reloaded config does
    /// not change it.
    pub prefill_slab: Option<usize>,
    /// `model.prefetch`: where prefetched experts are guessed from. Read at each
    /// load; a reloaded config does not change it.
    pub prefetch: Prefetch,
}

impl Settings {
    /// The live settings of `config`, with the budget from the command line when given.
    pub fn new(config: &Config, flag_budget: Option<BudgetSpec>) -> Settings {
        let budget_from_flag = flag_budget.is_some();
        Settings {
            generation: config.generation.clone(),
            sessions: config.sessions.clone(),
            expert_budget: flag_budget
                .unwrap_or_else(|| BudgetSpec::from_config(config.model.expert_budget)),
            budget_from_flag,
            log_level: config.log.level,
            keep_alive: config.model.keep_alive,
            models_dir: config.model.models_dir.clone(),
            context_length: (config.model.context_length > 0)
                .then_some(config.model.context_length as usize),
            kv_cache: config.model.kv_cache,
            prefill_slab: (config.model.prefill_slab_tokens > 0)
                .then_some(config.model.prefill_slab_tokens as usize),
            prefetch: config.model.prefetch,
        }
    }

    /// These settings with `config`'s values applied, and a line per changed key.
    pub fn reloaded(&self, config: &Config) -> (Settings, Vec<String>) {
        let mut next = self.clone();
        let mut changes = Vec::new();
        let mut note = |key: &str, before: String, after: String| {
            if before != after {
                changes.push(format!("{key}: {before} -> {after}"));
            }
        };
        let (old, new) = (&self.generation, &config.generation);
        note(
            "generation.temperature",
            old.temperature.to_string(),
            new.temperature.to_string(),
        );
        note(
            "generation.top_k",
            old.top_k.to_string(),
            new.top_k.to_string(),
        );
        note(
            "generation.top_p",
            old.top_p.to_string(),
            new.top_p.to_string(),
        );
        note(
            "generation.min_p",
            old.min_p.to_string(),
            new.min_p.to_string(),
        );
        note(
            "generation.repetition_penalty",
            old.repetition_penalty.to_string(),
            new.repetition_penalty.to_string(),
        );
        note(
            "generation.max_tokens",
            old.max_tokens.to_string(),
            new.max_tokens.to_string(),
        );
        next.generation = new.clone();
        let (old, new) = (&self.sessions, &config.sessions);
        note(
            "sessions.max_sessions",
            old.max_sessions.to_string(),
            new.max_sessions.to_string(),
        );
        note(
            "sessions.idle_expiry_secs",
            old.idle_expiry_secs.to_string(),
            new.idle_expiry_secs.to_string(),
        );
        next.sessions = new.clone();
        if !self.budget_from_flag {
            let budget = BudgetSpec::from_config(config.model.expert_budget);
            note(
                "model.expert_budget",
                self.expert_budget.to_string(),
                budget.to_string(),
            );
            next.expert_budget = budget;
        }
        note(
            "model.keep_alive",
            self.keep_alive.to_string(),
            config.model.keep_alive.to_string(),
        );
        next.keep_alive = config.model.keep_alive;
        let shown = |dir: &Option<PathBuf>| {
            dir.as_ref()
                .map_or("none".to_owned(), |dir| dir.display().to_string())
        };
        note(
            "model.models_dir",
            shown(&self.models_dir),
            shown(&config.model.models_dir),
        );
        next.models_dir = config.model.models_dir.clone();
        note(
            "log.level",
            self.log_level.as_str().to_owned(),
            config.log.level.as_str().to_owned(),
        );
        next.log_level = config.log.level;
        (next, changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_each_changed_key() {
        let settings = Settings::new(&Config::default(), None);
        let config = Config::from_toml(
            "[generation]\nmax_tokens = 7\n[model]\nexpert_budget = \"25%\"\n[log]\nlevel = \"debug\"\n",
            None,
        )
        .unwrap();
        let (next, changes) = settings.reloaded(&config);
        assert_eq!(next.generation.max_tokens, 7);
        assert_eq!(next.expert_budget, BudgetSpec::parse("25%").unwrap());
        assert_eq!(next.log_level, LogLevel::Debug);
        assert_eq!(
            changes,
            [
                "generation.max_tokens: 512 -> 7",
                "model.expert_budget: auto -> 25%",
                "log.level: info -> debug"
            ]
        );
        assert!(next.reloaded(&config).1.is_empty());
    }

    #[test]
    fn the_budget_flag_outlives_reloads() {
        let flag = BudgetSpec::parse("1GiB").unwrap();
        let settings = Settings::new(&Config::default(), Some(flag.clone()));
        let config = Config::from_toml("[model]\nexpert_budget = \"25%\"\n", None).unwrap();
        let (next, changes) = settings.reloaded(&config);
        assert_eq!(next.expert_budget, flag);
        assert!(changes.is_empty(), "{changes:?}");
    }
}
