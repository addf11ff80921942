//! Errors carried inside responses: a map `{code, message}` with a stable code.

use std::fmt;

use rmpv::Value;

/// The stable code of an error response.
///
/// On the wire a code is a short snake_case string, so clients can match on it
/// without parsing the human-readable message. Codes this version does not know
/// (sent by a newer peer) decode as [`ErrorCode::Other`] instead of failing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The bytes received were not valid msgpack; the connection is closed.
    ParseError,
    /// Valid msgpack, but not a msgpack-RPC message (wrong shape or type).
    InvalidRequest,
    /// The method name is not one the server knows.
    MethodNotFound,
    /// The params map is missing a field or has one of the wrong type.
    InvalidParams,
    /// The server failed while handling a valid request.
    Internal,
    /// The request was cancelled before it finished.
    Cancelled,
    /// A message was larger than the peer's limit; the connection is closed.
    MessageTooLarge,
    /// The method exists but this build does not serve it yet.
    NotImplemented,
    /// The peer is not allowed to use this server (another user's process).
    Unauthorized,
    /// The method needs a model and none is loaded.
    NoModel,
    /// The prompt, with the tokens asked for, does not fit the model's context.
    ContextLengthExceeded,
    /// The daemon serves as many clients as it may; try again later.
    Busy,
    /// A code this version does not know, kept verbatim.
    Other(String),
}

impl ErrorCode {
    /// The wire spelling of the code.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MethodNotFound => "method_not_found",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::Internal => "internal",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NoModel => "no_model",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::Busy => "busy",
            ErrorCode::Other(code) => code,
        }
    }

    /// The code spelled `name` on the wire; unknown names become [`ErrorCode::Other`].
    pub fn from_name(name: &str) -> ErrorCode {
        match name {
            "parse_error" => ErrorCode::ParseError,
            "invalid_request" => ErrorCode::InvalidRequest,
            "method_not_found" => ErrorCode::MethodNotFound,
            "invalid_params" => ErrorCode::InvalidParams,
            "internal" => ErrorCode::Internal,
            "cancelled" => ErrorCode::Cancelled,
            "message_too_large" => ErrorCode::MessageTooLarge,
            "not_implemented" => ErrorCode::NotImplemented,
            "unauthorized" => ErrorCode::Unauthorized,
            "no_model" => ErrorCode::NoModel,
            "context_length_exceeded" => ErrorCode::ContextLengthExceeded,
            "busy" => ErrorCode::Busy,
            other => ErrorCode::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error half of a response: `{code: "method_not_found", message: "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and a human-readable `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// The wire form: a map with the keys `code` and `message`.
    pub fn to_value(&self) -> Value {
        Value::Map(vec![
            (Value::from("code"), Value::from(self.code.as_str())),
            (Value::from("message"), Value::from(self.message.as_str())),
        ])
    }

    /// Reads the wire form back. `None` when `value` is not a map holding a
    /// string `code`; a missing or non-string `message` becomes empty.
    pub fn from_value(value: &Value) -> Option<RpcError> {
        let Value::Map(entries) = value else {
            return None;
        };
        let field = |name: &str| {
            entries
                .iter()
                .find(|(key, _)| key.as_str() == Some(name))
                .and_then(|(_, value)| value.as_str())
        };
        Some(RpcError::new(
            ErrorCode::from_name(field("code")?),
            field("message").unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_through_its_name() {
        let codes = [
            ErrorCode::ParseError,
            ErrorCode::InvalidRequest,
            ErrorCode::MethodNotFound,
            ErrorCode::InvalidParams,
            ErrorCode::Internal,
            ErrorCode::Cancelled,
            ErrorCode::MessageTooLarge,
            ErrorCode::NotImplemented,
            ErrorCode::Unauthorized,
            ErrorCode::NoModel,
            ErrorCode::ContextLengthExceeded,
            ErrorCode::Busy,
        ];
        for code in codes {
            assert_eq!(ErrorCode::from_name(code.as_str()), code);
        }
        assert_eq!(
            ErrorCode::from_name("out_of_memory"),
            ErrorCode::Other("out_of_memory".into())
        );
    }

    #[test]
    fn error_value_is_a_code_message_map() {
        let error = RpcError::new(ErrorCode::MethodNotFound, "no method `frobnicate`");
        let value = error.to_value();
        assert_eq!(value["code"].as_str(), Some("method_not_found"));
        assert_eq!(value["message"].as_str(), Some("no method `frobnicate`"));
        assert_eq!(RpcError::from_value(&value), Some(error));
        assert_eq!(RpcError::from_value(&Value::from("oops")), None);
    }
}
