//! Why a config could not be loaded, and where.

use std::fmt;
use std::io;
use std::path::PathBuf;

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
