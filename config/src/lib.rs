//! The configuration of `odmoed`: one TOML file, typed, with a documented
//! default for every key.
//!
//! The file lives at [`default_config_path`] (`~/.config/odmoe/odmoed.toml` on
//! Linux, `~/Library/Application Support/odmoe/odmoed.toml` on macOS). It may be
//! absent, which means every default; an explicit `--config FILE` must exist.
//! `config/odmoed.toml` in the source tree lists every key with its default.
//!
//! ```toml
//! [server]
//! max_connections = 16
//!
//! [model]
//! path = "~/models/qwen3-30b-a3b.odmoe"
//! expert_budget = "8GiB"
//! ```
//!
//! Unknown keys and bad values are errors naming the file, the line and the
//! key, e.g. `odmoed.toml:12: generation.top_p: must be in (0, 1], got 1.5`.
//!
//! ```
//! use odmoe_config::{Config, ExpertBudget};
//!
//! let config = Config::from_toml("[model]\nexpert_budget = \"25%\"\n", None)?;
//! assert_eq!(config.model.expert_budget, ExpertBudget::Percent(25.0));
//! assert_eq!(config.generation, Config::default().generation);
//! # Ok::<(), odmoe_config::ConfigError>(())
//! ```
//!
//! Paths in the file may start with `~/`; relative paths are taken from the
//! directory holding the file.

mod check;
mod error;
mod generation;
mod http;
mod keep_alive;
mod locate;
mod log;
mod memory;
mod model;
mod paths;
mod server;
mod sessions;
mod size;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use error::{ConfigError, Invalid};
pub use generation::GenerationConfig;
pub use http::HttpConfig;
pub use keep_alive::{KeepAlive, KeepAliveError};
pub use log::{LogConfig, LogLevel};
pub use memory::MemoryConfig;
pub use model::{ExpertBudget, KvCache, ModelConfig, Prefetch};
pub use paths::{
    config_path_from, default_config_path, default_http_key_path, default_socket_path,
    socket_path_from,
};
pub use server::{DEFAULT_MAX_MESSAGE_BYTES, ServerConfig};
pub use sessions::SessionsConfig;
pub use size::{Size, SizeError, format_bytes, format_size, parse_size, size_spec};

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: the socket and its limits.
    pub server: ServerConfig,
    /// `[model]`: what to serve and how much memory experts may use.
    pub model: ModelConfig,
    /// `[generation]`: sampling defaults for requests that do not set their own.
    pub generation: GenerationConfig,
    /// `[sessions]`: conversations kept with their KV caches.
    pub sessions: SessionsConfig,
    /// `[log]`: what the daemon logs.
    pub log: LogConfig,
    /// `[memory]`: how the expert budget follows the memory left on the machine.
    pub memory: MemoryConfig,
    /// `[http]`: OpenAI's and Anthropic's APIs and the status page over HTTP.
    pub http: HttpConfig,
}

impl Config {
    /// Loads the config from `explicit`, which must exist, or else from
    /// [`default_config_path`], where a missing file means all defaults.
    /// Returns the config and the file it came from, if any.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        match explicit {
            Some(path) => Config::from_file(path).map(|config| (config, Some(path.to_owned()))),
            None => Config::load_optional(&default_config_path()?),
        }
    }

    /// Loads the config from `path` if the file exists, else all defaults.
    pub fn load_optional(path: &Path) -> Result<(Config, Option<PathBuf>), ConfigError> {
        if path.try_exists().unwrap_or(true) {
            Config::from_file(path).map(|config| (config, Some(path.to_owned())))
        } else {
            Ok((Config::default(), None))
        }
    }

    /// Reads, parses and validates the file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, Some(path))
    }

    /// Parses and validates `text`; `path`, when given, is named in errors and
    /// is where relative paths in the text are taken from.
    pub fn from_toml(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let invalid = |line, key, message| {
            ConfigError::Invalid(Box::new(Invalid {
                path: path.map(Path::to_owned),
                line,
                key,
                message,
            }))
        };
        let mut config: Config = toml::from_str(text).map_err(|error| {
            let offset = error.span().map(|span| span.start);
            invalid(
                offset.map(|offset| locate::line_of(text, offset)),
                offset.and_then(|offset| locate::key_at(text, offset)),
                error.message().to_owned(),
            )
        })?;
        if let Err((key, message)) = config.check() {
            let line = locate::offset_of_key(text, key).map(|offset| locate::line_of(text, offset));
            return Err(invalid(line, Some(key.to_owned()), message));
        }
        let home = paths::home_from(&|name| std::env::var_os(name)).ok();
        let base = path.and_then(Path::parent);
        for file in [
            &mut config.server.socket,
            &mut config.model.path,
            &mut config.model.models_dir,
            &mut config.http.key_file,
        ]
        .into_iter()
        .flatten()
        {
            *file = resolve(file, home.as_deref(), base);
        }
        Ok(config)
    }

    /// Checks every value's range; a config built in code can be checked too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|(key, message)| {
            ConfigError::Invalid(Box::new(Invalid {
                path: None,
                line: None,
                key: Some(key.to_owned()),
                message,
            }))
        })
    }

    /// The socket path: the configured one, else the platform default.
    pub fn socket_path(&self) -> PathBuf {
        self.server
            .socket
            .clone()
            .unwrap_or_else(default_socket_path)
    }
}

/// `path` with a leading `~/` replaced by `home`, and made absolute against
/// `base` when relative.
fn resolve(path: &Path, home: Option<&Path>, base: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => match base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example file committed beside this crate.
    const EXAMPLE: &str = include_str!("../odmoed.toml");

    fn invalid(text: &str) -> Invalid {
        match Config::from_toml(text, Some(Path::new("/etc/odmoed.toml"))) {
            Err(ConfigError::Invalid(invalid)) => *invalid,
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        assert_eq!(Config::from_toml(EXAMPLE, None).unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_shows_every_key() {
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut keys: Vec<String> = Vec::new();
        for (section, table) in defaults.as_table().unwrap() {
            for key in table.as_table().unwrap().keys() {
                keys.push(format!("{section}.{key}"));
            }
        }
        // Keys without a default value are shown commented out.
        keys.extend([
            "server.socket".into(),
            "model.path".into(),
            "model.models_dir".into(),
            "memory.max_budget".into(),
        ]);
        let uncommented = EXAMPLE
            .replace("# socket = ", "socket = ")
            .replace("# path = ", "path = ")
            .replace("# models_dir = ", "models_dir = ")
            .replace("# max_budget = ", "max_budget = ");
        Config::from_toml(&uncommented, None).unwrap();
        for key in keys {
            assert!(
                locate::offset_of_key(&uncommented, &key).is_some(),
                "{key} is missing from odmoed.toml"
            );
        }
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("", None).unwrap(), Config::default());
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let error = invalid("[server]\nmax_connections = 2\nmax_conections = 3\n");
        assert_eq!(error.line, Some(3));
        assert_eq!(error.key.as_deref(), Some("server.max_conections"));
        assert_eq!(error.path.as_deref(), Some(Path::new("/etc/odmoed.toml")));
        assert!(error.message.contains("unknown field"), "{}", error.message);
        let shown = error.to_string();
        assert!(
            shown.starts_with("/etc/odmoed.toml:3: server.max_conections: "),
            "{shown}"
        );

        let error = invalid("\n[serve]\n");
        assert_eq!((error.line, error.key.as_deref()), (Some(2), Some("serve")));
    }

    #[test]
    fn prefill_slabs_are_the_default_unless_set() {
        assert_eq!(Config::default().model.prefill_slab_tokens, 0);
        let set = Config::from_toml("[model]\nprefill_slab_tokens = 512\n", None).unwrap();
        assert_eq!(set.model.prefill_slab_tokens, 512);
        let error = invalid("[model]\nprefill_slab_tokens = -1\n");
        assert_eq!(error.key.as_deref(), Some("model.prefill_slab_tokens"));
    }

    #[test]
    fn prefetch_is_lookahead_unless_history_or_none_is_asked_for() {
        let history = Config::from_toml("[model]\nprefetch = \"history\"\n", None).unwrap();
        assert_eq!(history.model.prefetch, Prefetch::History);
        let none = Config::from_toml("[model]\nprefetch = \"none\"\n", None).unwrap();
        assert_eq!(none.model.prefetch, Prefetch::None);
        assert_eq!(Config::default().model.prefetch, Prefetch::Lookahead);
        let error = invalid("[model]\nprefetch = \"oracle\"\n");
        assert_eq!(error.key.as_deref(), Some("model.prefetch"));
    }

    #[test]
    fn the_kv_cache_is_f16_unless_f32_or_q8_0_is_asked_for() {
        let f32 = Config::from_toml("[model]\nkv_cache = \"f32\"\n", None).unwrap();
        assert_eq!(f32.model.kv_cache, KvCache::F32);
        let q8_0 = Config::from_toml("[model]\nkv_cache = \"q8_0\"\n", None).unwrap();
        assert_eq!(q8_0.model.kv_cache, KvCache::Q8_0);
        assert_eq!(Config::default().model.kv_cache, KvCache::F16);
        let error = invalid("[model]\nkv_cache = \"bf16\"\n");
        assert_eq!(error.key.as_deref(), Some("model.kv_cache"));
        assert!(
            ["`f16`", "`f32`", "`q8_0`"]
                .iter()
                .all(|kind| error.message.contains(kind)),
            "{}",
            error.message
        );
    }

    #[test]
    fn values_of_the_wrong_type_are_named_with_their_line() {
        let error = invalid("# tuning\n\n[generation]\ntop_k = \"many\"\n");
        assert_eq!(error.line, Some(4));
        assert_eq!(error.key.as_deref(), Some("generation.top_k"));

        let error = invalid("[model]\nexpert_budget = \"lots\"\n");
        assert_eq!(error.line, Some(2));
        assert_eq!(error.key.as_deref(), Some("model.expert_budget"));
        assert!(
            error.message.contains("`lots` is not a size"),
            "{}",
            error.message
        );

        let error = invalid("[log]\nlevel = \"loud\"\n");
        assert_eq!(
            (error.line, error.key.as_deref()),
            (Some(2), Some("log.level"))
        );
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let error = invalid("[server]\nmax_connections = 3\n[generation\n");
        assert_eq!(error.line, Some(3));
    }

    #[test]
    fn sizes_and_budgets_are_read() {
        let config = Config::from_toml(
            "[server]\nmax_message_bytes = 65536\n[model]\nexpert_budget = \"8GiB\"\n",
            None,
        )
        .unwrap();
        assert_eq!(config.server.max_message_bytes, 65536);
        assert_eq!(config.model.expert_budget, ExpertBudget::Bytes(8 << 30));
        let config = Config::from_toml("[server]\nmax_message_bytes = \"1.5MB\"\n", None).unwrap();
        assert_eq!(config.server.max_message_bytes, 1_500_000);
        let config = Config::from_toml("[model]\nexpert_budget = \"AUTO\"\n", None).unwrap();
        assert_eq!(config.model.expert_budget, ExpertBudget::Auto);
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_directory() {
        let text = "[server]\nsocket = \"run/odmoed.sock\"\n[model]\npath = \"/models/m.odmoe\"\n";
        let config = Config::from_toml(text, Some(Path::new("/etc/odmoe/odmoed.toml"))).unwrap();
        assert_eq!(
            config.socket_path(),
            Path::new("/etc/odmoe/run/odmoed.sock")
        );
        assert_eq!(
            config.model.path.as_deref(),
            Some(Path::new("/models/m.odmoe"))
        );
        assert_eq!(
            resolve(Path::new("~/m"), Some(Path::new("/home/ada")), None),
            Path::new("/home/ada/m")
        );
    }

    #[test]
    fn an_explicit_file_must_exist_but_the_default_may_be_absent() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("odmoed.toml");
        assert!(matches!(
            Config::load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
        assert_eq!(
            Config::load_optional(&missing).unwrap(),
            (Config::default(), None)
        );
        std::fs::write(&missing, "[sessions]\nmax_sessions = 2\n").unwrap();
        let (config, source) = Config::load_optional(&missing).unwrap();
        assert_eq!(config.sessions.max_sessions, 2);
        assert_eq!(source.as_deref(), Some(missing.as_path()));
    }
}
