//! One HTTP generation: the body read within its limit, the model checked,
//! the prompt rendered, the job queued through `dispatch`, and its events.
//!
//! A [`Generation`] holds one of the HTTP slots and cancels its job when
//! dropped before the end: a client that disconnects drops the handler's
//! future (or its stream), and with it the generation.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use odmoe_engine::generate::{Delta, ReplyForm};
use odmoe_engine::tokenizer::Tokenizer;
use odmoe_protocol::{GenerateParams, GenerateResult, Method, RpcError};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::UnboundedReceiver;

use super::Http;
use super::error::{ApiError, Dialect};
use super::tools::ToolSyntax;
use crate::dispatch::{self, Queued};
use crate::scheduler::{CancelToken, Event, Served};
use crate::state::State;

/// The body of a request as `T`, or the error naming what is wrong: 413 past the size limit,
/// 400 with the failing field's path when it does not parse.
pub fn parse_body<T: DeserializeOwned>(
    dialect: Dialect,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than server.max_message_bytes".to_owned()
        } else {
            rejection.body_text()
        };
        ApiError::new(dialect, status, message)
    })?;
    let mut reader = serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(&mut reader).map_err(|error| {
        let path = error.path().to_string();
        let message = if path == "." {
            format!("the body is not valid: {}", error.inner())
        } else {
            format!("{path}: {}", error.inner())
        };
        ApiError::bad_request(dialect, message)
    })
}

/// The tool-call syntax of the model's chat template, or a 400 when the template renders no tools.
pub fn tool_syntax(served: &Served, dialect: Dialect) -> Result<ToolSyntax, ApiError> {
    served
        .tokenizer
        .as_deref()
        .and_then(Tokenizer::chat_template)
        .and_then(|template| ToolSyntax::of_template(template.source()))
        .ok_or_else(|| {
            ApiError::bad_request(
                dialect,
                "tools: this model's chat template does not render tools",
            )
        })
}

/// The name clients give the loaded model: its file or directory name.
pub fn model_id(served: &Served) -> String {
    served
        .info
        .path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| served.info.path.display().to_string())
}

/// The loaded model, when `requested` (if given) names it: by its id or its path.
pub fn served_model(
    state: &State,
    dialect: Dialect,
    requested: Option<&str>,
) -> Result<Arc<Served>, ApiError> {
    let served = state.scheduler.served().ok_or_else(|| {
        ApiError::new(
            dialect,
            StatusCode::SERVICE_UNAVAILABLE,
            "no model is loaded: start odmoed with --model PATH or run `odmoe load NAME`",
        )
    })?;
    match requested {
        Some(name)
            if !name.is_empty()
                && name != model_id(&served)
                && name != served.info.path.display().to_string() =>
        {
            Err(ApiError::new(
                dialect,
                StatusCode::NOT_FOUND,
                format!(
                    "model `{}` is not loaded; odmoed serves `{}` (GET /v1/models lists it)",
                    crate::logging::untrusted(name),
                    model_id(&served)
                ),
            ))
        }
        _ => Ok(served),
    }
}

/// `messages` (JSON, as the chat template reads them) and `tools` rendered with the model's
/// chat template and tokenized, off the async runtime.
pub async fn chat_prompt(
    served: &Arc<Served>,
    dialect: Dialect,
    messages: Vec<Value>,
    tools: Option<Value>,
    variables: Map<String, Value>,
) -> Result<Vec<u32>, ApiError> {
    let served = Arc::clone(served);
    let rendered = tokio::task::spawn_blocking(move || {
        let tokenizer = served.tokenizer.as_deref().ok_or_else(|| {
            format!(
                "the model at {} has no tokenizer to render messages with",
                served.info.path.display()
            )
        })?;
        tokenizer
            .encode_chat_json(&messages, tools.as_ref(), &variables)
            .map_err(|error| format!("messages: {error}"))
    })
    .await
    .map_err(|error| {
        ApiError::new(
            dialect,
            StatusCode::INTERNAL_SERVER_ERROR,
            error.to_string(),
        )
    })?;
    rendered.map_err(|message| ApiError::bad_request(dialect, message))
}

/// What a running generation says next.
pub enum Step {
    /// Text made final, and with which token.
    Token(Delta),
    /// The end: the result, or why there is none.
    Done(Result<GenerateResult, ApiError>),
}

/// A queued generation and its events; cancelled if dropped before [`Step::Done`].
pub struct Generation {
    events: UnboundedReceiver<Event>,
    dialect: Dialect,
    cancel_on_drop: CancelOnDrop,
}

impl Generation {
    /// Takes an HTTP slot (429 when none is free), then checks and queues `params` as the
    /// socket's `generate` would, its prompt asking for `reply` (a chat's rendered prompt asks
    /// for [`ReplyForm::Chat`]: all of the reply is text, stop strings sought in its answer).
    pub async fn start(
        http: &Http,
        dialect: Dialect,
        params: GenerateParams,
        reply: ReplyForm,
    ) -> Result<Generation, ApiError> {
        let slot = Arc::clone(&http.slots)
            .try_acquire_owned()
            .map_err(|_| ApiError::busy(dialect))?;
        let cancel = Arc::new(CancelToken::default());
        let Queued { events, .. } = dispatch::queue(
            &params,
            Method::Generate,
            reply,
            &http.state,
            Arc::clone(&cancel),
        )
        .await
        .map_err(|error| ApiError::from_rpc(dialect, error))?;
        Ok(Generation {
            events,
            dialect,
            cancel_on_drop: CancelOnDrop {
                state: Arc::clone(&http.state),
                cancel,
                finished: false,
                _slot: slot,
            },
        })
    }

    /// The next token, or the end.
    pub async fn next(&mut self) -> Step {
        loop {
            let event = self.events.recv().await;
            let outcome = match event {
                Some(Event::Started { .. }) => continue,
                Some(Event::Token(delta)) => return Step::Token(delta),
                Some(Event::Done(outcome)) => outcome
                    .map(dispatch::generate_result)
                    .map_err(RpcError::from),
                None => Err(dispatch::dropped_without_answer()),
            };
            self.cancel_on_drop.finished = true;
            return Step::Done(outcome.map_err(|error| ApiError::from_rpc(self.dialect, error)));
        }
    }

    /// Runs to the end, keeping the tokens and their texts.
    pub async fn finish(mut self) -> (Vec<Delta>, Result<GenerateResult, ApiError>) {
        let mut pieces = Vec::new();
        loop {
            match self.next().await {
                Step::Token(delta) => pieces.push(delta),
                Step::Done(outcome) => return (pieces, outcome),
            }
        }
    }
}

/// Cancels the job unless it finished, and frees the slot.
struct CancelOnDrop {
    state: Arc<State>,
    cancel: Arc<CancelToken>,
    finished: bool,
    _slot: OwnedSemaphorePermit,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
            self.state.scheduler.withdraw(&self.cancel);
        }
    }
}

/// The stop fields of both APIs: one string or a list of them.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// Seconds since the epoch, for the `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A fresh id with `prefix`, such as `chatcmpl-3f2a...`.
pub fn fresh_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 12];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}{hex}")
}
