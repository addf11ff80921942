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

mod keep_alive;
mod locate;
mod paths;
mod size;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use keep_alive::{KeepAlive, KeepAliveError};
pub use paths::{config_path_from, default_config_path, default_socket_path, socket_path_from};
pub use size::{Size, SizeError, format_bytes, parse_size};

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
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Path of the Unix socket. Default: [`default_socket_path`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Largest message accepted from a client, in bytes; a bigger one closes
    /// the connection. An integer or a size such as `"16MiB"`. Default 16 MiB.
    #[serde(deserialize_with = "bytes", serialize_with = "size_text")]
    pub max_message_bytes: u64,
    /// Clients served at once; a client beyond them is told the daemon is
    /// busy and disconnected. Default 64.
    pub max_connections: u32,
    /// Requests one connection may have in flight; past them the daemon reads
    /// nothing more from it until replies are written. Default 32.
    pub max_requests_per_connection: u32,
    /// Seconds a connection may sit without a request in flight or a message
    /// arriving before it is closed; 0 never closes it. Default 600.
    pub idle_timeout_secs: u64,
    /// Seconds a message may take to arrive once it has begun, and a new
    /// connection to send its first message; slower ones are dropped.
    /// Default 10.
    pub message_timeout_secs: u64,
}

/// `[model]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The model to serve (an `.odmoe` directory, a GGUF file or a Hugging Face
    /// checkpoint directory). Default: none, load one later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Memory for cached experts. Default `"auto"`.
    pub expert_budget: ExpertBudget,
    /// Most positions a sequence may hold (prompt and reply together), to
    /// lower the model's own maximum; 0 keeps the model's. Default 0.
    pub context_length: u32,
    /// How long the model stays loaded after its last request: a duration
    /// ("5m"), 0 to unload after each reply, -1 to keep it. Requests may set
    /// their own. Default -1.
    pub keep_alive: KeepAlive,
    /// Where `odmoe models` looks for models and `load NAME` finds them.
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<PathBuf>,
}

/// How much memory cached experts may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum ExpertBudget {
    /// Decided from the machine's memory and adapted to memory pressure.
    #[default]
    Auto,
    /// A fixed number of bytes (`"8GiB"`).
    Bytes(u64),
    /// A share of all the model's experts, in percent (`"25%"`), as
    /// `odmoe run --expert-budget` reads it.
    Percent(f64),
}

/// `[generation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// Softmax temperature; 0 picks the most likely token. Default 0.8.
    pub temperature: f32,
    /// Sample from the k most likely tokens only; 0 disables. Default 40.
    pub top_k: u32,
    /// Sample from the smallest set of tokens whose probability reaches p, in
    /// (0, 1]; 1 disables. Default 0.95.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one, in [0, 1);
    /// 0 disables. Default 0.05.
    pub min_p: f32,
    /// Divides the logits of tokens already seen (> 0); 1 disables. Default 1.0.
    pub repetition_penalty: f32,
    /// Most tokens generated for one request. Default 512.
    pub max_tokens: u32,
}

/// `[sessions]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Conversations kept at once with their KV caches. Default 8.
    pub max_sessions: u32,
    /// Seconds without use before a session is dropped; 0 keeps sessions until
    /// `max_sessions` forces one out. Default 1800.
    pub idle_expiry_secs: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Least severe level logged: error, warn, info, debug or trace. Default
    /// info. `RUST_LOG`, when set, overrides it.
    pub level: LogLevel,
}

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
    #[serde(deserialize_with = "bytes", serialize_with = "size_text")]
    pub kv_reserve: u64,
    /// The budget never grows above this: a size, or a share of all the
    /// model's experts. Default: none (the configured budget is the maximum).
    #[serde(
        default,
        deserialize_with = "optional_size",
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_size_text"
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
    #[serde(deserialize_with = "size", serialize_with = "size_spec_text")]
    pub warn_headroom: Size,
    /// Memory left below which pressure is critical. Default 5%.
    #[serde(deserialize_with = "size", serialize_with = "size_spec_text")]
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

impl Size {
    /// The bytes of this size, a percentage being of `whole`.
    pub fn of(self, whole: u64) -> u64 {
        match self {
            Size::Bytes(bytes) => bytes,
            Size::Percent(percent) => (whole as f64 * percent / 100.0) as u64,
        }
    }
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

/// Default of `server.max_message_bytes`; the same as the protocol's own default.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = odmoe_protocol::DEFAULT_MAX_MESSAGE_BYTES as u64;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_connections: 64,
            max_requests_per_connection: 32,
            idle_timeout_secs: 600,
            message_timeout_secs: 10,
        }
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            max_tokens: 512,
        }
    }
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_sessions: 8,
            idle_expiry_secs: 1800,
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value out of range.
    #[error("{0}")]
    Invalid(Box<Invalid>),
    /// `$HOME` is unset, so there is no default config path.
    #[error("HOME is not set, so there is no default config file; pass --config FILE")]
    NoHome,
}

/// Where and why a config is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The file, when the config came from one.
    pub path: Option<PathBuf>,
    /// The 1-based line, when the problem is in the text.
    pub line: Option<usize>,
    /// The dotted key, e.g. `generation.top_p`, when one is to blame.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.line) {
            (Some(path), Some(line)) => write!(f, "{}:{line}: ", path.display())?,
            (Some(path), None) => write!(f, "{}: ", path.display())?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
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

    /// The first value out of range, as its dotted key and what is wrong.
    fn check(&self) -> Result<(), (&'static str, String)> {
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

fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match size::deserialize_size(deserializer, false)? {
        Some(Size::Bytes(bytes)) => Ok(bytes),
        _ => Err(serde::de::Error::custom(
            "must be a number of bytes, not a percentage",
        )),
    }
}

fn size_text<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_size(*bytes))
}

fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
    size::deserialize_size(deserializer, false)?
        .ok_or_else(|| serde::de::Error::custom("must be a size or a percentage"))
}

fn optional_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Size>, D::Error> {
    size(deserializer).map(Some)
}

fn size_spec_text<S: Serializer>(size: &Size, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&size_spec(*size))
}

fn optional_size_text<S: Serializer>(
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

impl<'de> Deserialize<'de> for ExpertBudget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match size::deserialize_size(deserializer, true)? {
            None => ExpertBudget::Auto,
            Some(Size::Bytes(bytes)) => ExpertBudget::Bytes(bytes),
            Some(Size::Percent(percent)) => ExpertBudget::Percent(percent),
        })
    }
}

impl Serialize for ExpertBudget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ExpertBudget::Auto => serializer.serialize_str("auto"),
            ExpertBudget::Bytes(bytes) => serializer.collect_str(&format_size(*bytes)),
            ExpertBudget::Percent(percent) => serializer.collect_str(&format_args!("{percent}%")),
        }
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

    #[test]
    fn sizes_print_in_the_largest_exact_binary_unit() {
        assert_eq!(format_size(16 << 20), "16MiB");
        assert_eq!(format_size(3 << 29), "1536MiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
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
