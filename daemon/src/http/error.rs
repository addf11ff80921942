//! Errors in the shape each API's clients read: OpenAI's
//! `{"error": {"message", "type", "code"}}` or Anthropic's
//! `{"type": "error", "error": {"type", "message"}}`, with the HTTP status
//! their SDKs map to exceptions.

use axum::Json;
use axum::http::header::CONNECTION;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use odmoe_protocol::{ErrorCode, RpcError};
use serde_json::json;

/// Which API's error shape a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    /// Anthropic's for its endpoint, OpenAI's everywhere else.
    pub fn of_path(path: &str) -> Dialect {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    dialect: Dialect,
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(dialect: Dialect, status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            dialect,
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(dialect: Dialect, message: impl Into<String>) -> ApiError {
        ApiError::new(dialect, StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(dialect: Dialect) -> ApiError {
        ApiError::new(
            dialect,
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send `Authorization: Bearer KEY` (or `x-api-key: KEY`); \
             `odmoe http-key` prints the key",
        )
    }

    pub fn busy(dialect: Dialect) -> ApiError {
        ApiError::new(
            dialect,
            StatusCode::TOO_MANY_REQUESTS,
            "odmoed is busy: every HTTP request slot (server.max_connections) is taken; retry later",
        )
    }

    /// A daemon error as its HTTP status: a bad request 400, no model 503, busy 429.
    pub fn from_rpc(dialect: Dialect, error: RpcError) -> ApiError {
        let status = match error.code {
            ErrorCode::InvalidParams
            | ErrorCode::InvalidRequest
            | ErrorCode::ParseError
            | ErrorCode::ContextLengthExceeded => StatusCode::BAD_REQUEST,
            ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NoModel => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NotImplemented | ErrorCode::MethodNotFound => StatusCode::NOT_IMPLEMENTED,
            ErrorCode::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal | ErrorCode::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(dialect, status, error.message)
    }

    /// The error as the JSON body each API sends (also as a stream's error event).
    pub fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": openai_type(self.status),
                    "param": null,
                    "code": openai_code(self.status),
                }
            }),
            Dialect::Anthropic => json!({
                "type": "error",
                "error": {"type": anthropic_type(self.status), "message": self.message},
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        // Refused before its body was read (too large, or without the key), a request leaves
        // the rest of its body on the connection, which then closes: saying so keeps a client
        // from sending its next request on it, where it would meet the close instead of an
        // answer.
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNAUTHORIZED
        ) {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn openai_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        status if status.is_server_error() => "server_error",
        _ => "invalid_request_error",
    }
}

fn openai_code(status: StatusCode) -> Option<&'static str> {
    match status {
        StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
        StatusCode::NOT_FOUND => Some("model_not_found"),
        StatusCode::PAYLOAD_TOO_LARGE => Some("request_too_large"),
        _ => None,
    }
}

fn anthropic_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        status if status.is_server_error() => "api_error",
        _ => "invalid_request_error",
    }
}
