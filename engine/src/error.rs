//! The engine's error type: every variant names the file, tensor or key at fault.

use std::path::PathBuf;

/// Errors from loading and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The underlying error is part of the message rather than a `source`, so that error chains
    // printed by callers do not repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: invalid JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported model_type {model_type:?} in {path} (supported: {supported})")]
    UnknownArchitecture {
        model_type: String,
        path: PathBuf,
        supported: String,
    },
    #[error("{path}: not a readable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: not a readable GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("tensor {name:?} not found in {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor {name:?} in {path} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        path: PathBuf,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("expert {expert} of layer {layer} ({path}): {message}")]
    Expert {
        layer: usize,
        expert: usize,
        path: PathBuf,
        message: String,
    },
    #[error("expert budget: {0}")]
    Budget(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The model's own weights or config cannot make the layer asked for: a fault of the
    /// checkpoint, not of the request.
    #[error("model: {0}")]
    InvalidModel(String),
    /// The prompt, or the prompt with the tokens asked for, does not fit the context.
    #[error("{0}")]
    ContextLengthExceeded(String),
    /// Shown without the backtrace candle attaches under `RUST_BACKTRACE`: messages reach
    /// people and clients, backtraces belong in a debugger.
    #[error("{}", without_backtrace(.0))]
    Tensor(#[from] candle_core::Error),
    /// One failure reported to several waiters (concurrent acquires that shared a read).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The message of a candle error, with the backtraces inside it left out.
pub(crate) fn without_backtrace(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", without_backtrace(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), without_backtrace(inner))
        }
        other => other.to_string(),
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_backtraces_stay_out_of_messages() {
        let inner = candle_core::Error::Msg("bad magic".into());
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let message = Error::from(traced.with_path("/m.gguf")).to_string();
        assert_eq!(message, "/m.gguf: bad magic");
    }
}
