//! The HTTP APIs tools already speak, on the same queue as the socket: OpenAI's
//! (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), Anthropic's
//! (`/v1/messages`), and a status page at `/` with its JSON at `/api/status`.
//!
//! Off unless `[http] listen` (or `odmoed --http`) names an address. Every
//! `/v1` request needs the key (`Authorization: Bearer KEY` or `x-api-key`)
//! unless `allow_unauthenticated`; the status page shows no prompt or reply
//! and needs none. Bodies are limited to `server.max_message_bytes` (413), and
//! generations in progress, streams included, to `server.max_connections`
//! (429 beyond them). A client that disconnects cancels its generation:
//! dropping the response drops the generation's events, which stops it (see
//! [`generation`]).
//!
//! Requests are turned into the socket's `generate` parameters and checked and
//! queued by `dispatch`, so both doors apply the same limits and defaults.

mod anthropic;
mod error;
mod generation;
mod key;
mod messages;
mod openai;
mod reply;
mod status;
mod tools;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State as Extract};
use axum::http::header::{AUTHORIZATION, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use odmoe_config::HttpConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::info;

use self::error::{ApiError, Dialect};
use crate::state::State;

/// What every HTTP handler shares.
#[derive(Clone)]
struct Http {
    state: Arc<State>,
    /// The key requests must carry; `None` when unauthenticated requests are allowed.
    key: Option<Arc<str>>,
    /// Generations in progress at once, streams included; one more is answered 429.
    slots: Arc<Semaphore>,
}

/// The HTTP listener, bound, with the key it checks.
pub struct Listener {
    listener: TcpListener,
    key: Option<Arc<str>>,
}

impl Listener {
    /// Binds `address` and reads (or makes) the key `config` names, so that a port in use or an
    /// unreadable key stops the daemon at start-up, where the user sees it.
    pub async fn bind(address: &str, config: &HttpConfig) -> anyhow::Result<Listener> {
        let key = if config.allow_unauthenticated {
            None
        } else {
            let path = config.key_path()?;
            Some(Arc::from(key::load_or_create(&path)?))
        };
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for HTTP on {address}"))?;
        Ok(Listener { listener, key })
    }

    /// Logs the address served. Called before the socket serves, so that whoever waits for the
    /// socket finds the address in the log (logged by the serving task, it could come later).
    pub fn announce(&self) -> std::io::Result<()> {
        let address = self.listener.local_addr()?;
        info!(%address, authenticated = self.key.is_some(), "serving HTTP");
        Ok(())
    }
}

/// Serves HTTP on `listener` until the daemon shuts down, with at most
/// `max_requests` generations of its own at once and bodies up to the
/// socket's largest message.
pub async fn serve(
    listener: Listener,
    state: Arc<State>,
    max_requests: usize,
) -> std::io::Result<()> {
    let max_body = state.max_message_bytes;
    let Listener { listener, key } = listener;
    let http = Http {
        key,
        slots: Arc::new(Semaphore::new(max_requests)),
        state: Arc::clone(&state),
    };
    let api = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route_layer(middleware::from_fn_with_state(http.clone(), admit));
    let app = Router::new()
        .route("/", get(status::page))
        .route("/api/status", get(status::json))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(http);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { state.shutdown_requested().await })
        .await
}

/// Lets a request in when it carries the key.
async fn admit(Extract(http): Extract<Http>, request: Request, next: Next) -> Response {
    if let Some(key) = &http.key
        && !presented(request.headers()).is_some_and(|given| key::matches(given, key))
    {
        return ApiError::unauthorized(Dialect::of_path(request.uri().path())).into_response();
    }
    next.run(request).await
}

/// The key a request presents: `Authorization: Bearer KEY` or `x-api-key: KEY`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(bearer) = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    {
        return Some(bearer.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
}

async fn not_found(request: Request) -> ApiError {
    let path = request.uri().path();
    ApiError::new(
        Dialect::of_path(path),
        axum::http::StatusCode::NOT_FOUND,
        format!(
            "no such endpoint: {} {}; odmoed serves GET /v1/models, POST /v1/chat/completions, \
             POST /v1/completions, POST /v1/messages and the status page at /",
            request.method(),
            crate::logging::untrusted(path)
        ),
    )
}
