//! From a request to its result: one function per method, and the protocol
//! values made of what the scheduler answers ([`convert`]).
//!
//! `generate` and `chat` are checked and tokenized here, on the connection's
//! task, so a bad request is refused at once instead of after waiting in the
//! queue; the engine thread only runs them (see [`generate`] and
//! `scheduler`). Names outside the protocol get `method_not_found`.

mod convert;
mod generate;

pub use self::convert::generate_result;
pub use self::generate::{Queued, dropped_without_answer, queue};

use std::path::PathBuf;
use std::sync::Arc;

use odmoe_protocol::{
    CancelParams, CancelResult, ErrorCode, HelloParams, HelloResult, LoadParams, MemoryStats,
    Method, ModelInfo, ModelsResult, Notification, PROTOCOL_VERSION, PressureParams, Relay,
    Request, Response, RpcError, StatsResult, Value, to_value,
};
use serde::Serialize;
use tracing::{debug, info};

use self::convert::{available_model, memory_stats, model_info, queue_stats, session_stats};
use crate::budget::BudgetSpec;
use crate::logging::untrusted;
use crate::memory::resident_bytes;
use crate::models_dir;
use crate::peer::{Peer, peer_allowed};
use crate::pressure::Level;
use crate::scheduler::{CancelToken, Served};
use crate::state::State;

/// Answers one request; runs as its own task.
pub async fn answer(
    request: Request,
    state: Arc<State>,
    peer: Arc<Peer>,
    cancel: Option<Arc<CancelToken>>,
) {
    let outcome = dispatch(&request, &state, &peer, cancel.clone()).await;
    if let Some(token) = &cancel {
        peer.finish(request.msgid, token);
    }
    peer.send(Response {
        msgid: request.msgid,
        outcome,
    })
    .await;
}

/// Answers a request that came as a notification (see [`odmoe_protocol::Relay`]): a relayed
/// generation's result goes to its relay as the event `done`, its error as `error`; a `cancel`
/// gets no answer.
pub async fn answer_relayed(
    request: Request,
    state: Arc<State>,
    peer: Arc<Peer>,
    cancel: Option<Arc<CancelToken>>,
) {
    let relay = relay_of(&request);
    let outcome = dispatch(&request, &state, &peer, cancel.clone()).await;
    if let Some(token) = &cancel {
        peer.finish(request.msgid, token);
    }
    let Some(relay) = relay.filter(|_| cancel.is_some()) else {
        return;
    };
    match outcome {
        Ok(Value::Map(mut result)) => {
            result.push((Value::from("id"), Value::from(request.msgid)));
            peer.event(Some(&relay), "done", &Value::Map(result)).await;
        }
        Ok(other) => {
            peer.event(Some(&relay), "done", &other).await;
        }
        Err(error) => send_relay_error(request.msgid, &relay, &peer, error).await,
    }
}

/// Tells a relayed request's client that it failed, through its relay.
pub async fn relay_error(request: &Request, peer: &Peer, error: RpcError) {
    if let Some(relay) = relay_of(request) {
        send_relay_error(request.msgid, &relay, peer, error).await;
    }
}

async fn send_relay_error(id: u32, relay: &Relay, peer: &Peer, error: RpcError) {
    let event = Value::Map(vec![
        (Value::from("id"), Value::from(id)),
        (Value::from("code"), Value::from(error.code.as_str())),
        (Value::from("message"), Value::from(error.message.as_str())),
    ]);
    peer.event(Some(relay), "error", &event).await;
}

/// The request a notification stands for: a `generate` or `chat` that names a relay with an
/// `id` (answered through the relay under that id), or a `cancel`.
pub fn relayed_request(notification: Notification) -> Option<Request> {
    let method = Method::from_name(&notification.method)?;
    let mut request = Request {
        msgid: 0,
        method: notification.method,
        params: notification.params,
    };
    match method {
        Method::Generate | Method::Chat => {
            request.msgid = relay_of(&request)?.id?;
            Some(request)
        }
        Method::Cancel => Some(request),
        _ => None,
    }
}

/// The relay `request` names, read alone: a request whose other fields are wrong still hears
/// why through its relay.
fn relay_of(request: &Request) -> Option<Relay> {
    #[derive(serde::Deserialize)]
    struct RelayField {
        #[serde(default)]
        relay: Option<Relay>,
    }
    request.parse_params::<RelayField>().ok()?.relay
}

/// The result of `request`, or the error to answer it with. `cancel` is the
/// token registered for a `generate` or `chat`.
async fn dispatch(
    request: &Request,
    state: &State,
    peer: &Peer,
    token: Option<Arc<CancelToken>>,
) -> Result<Value, RpcError> {
    match Method::from_name(&request.method) {
        Some(Method::Hello) => hello(request, state),
        Some(method @ (Method::Generate | Method::Chat)) => {
            generate::generate(request, method, state, peer, token.unwrap_or_default()).await
        }
        Some(Method::Cancel) => cancel(request, state, peer),
        Some(Method::Stats) => encode(&stats(state)),
        Some(Method::Models) => models(state).await,
        Some(Method::Load) => load(request, state).await,
        Some(Method::Unload) => {
            state.scheduler.unload().await?;
            Ok(Value::Nil)
        }
        Some(Method::Shutdown) => shutdown(state),
        Some(Method::Pressure) => pressure(request, state, peer),
        None => Err(RpcError::new(
            ErrorCode::MethodNotFound,
            format!(
                "no method `{}`; the methods are {}",
                untrusted(&request.method),
                Method::ALL.map(Method::name).join(", ")
            ),
        )),
    }
}

fn encode<T: Serialize>(result: &T) -> Result<Value, RpcError> {
    to_value(result).map_err(|error| RpcError::new(ErrorCode::Internal, error.to_string()))
}

fn invalid(message: impl Into<String>) -> RpcError {
    RpcError::new(ErrorCode::InvalidParams, message)
}

fn hello(request: &Request, state: &State) -> Result<Value, RpcError> {
    let params: HelloParams = request.parse_params()?;
    debug!(
        client = %untrusted(params.client.as_deref().unwrap_or("unnamed")),
        "hello"
    );
    encode(&HelloResult {
        protocol_version: PROTOCOL_VERSION,
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        model: state
            .scheduler
            .served()
            .map(|served| served.info.path.display().to_string()),
    })
}

/// `cancel {id}`: stops a generation this connection started.
fn cancel(request: &Request, state: &State, peer: &Peer) -> Result<Value, RpcError> {
    let params: CancelParams = request.parse_params()?;
    let cancelled = match peer.in_flight(params.id) {
        Some(token) => {
            token.cancel();
            state.scheduler.withdraw(&token);
            true
        }
        None => false,
    };
    debug!(id = params.id, cancelled, "cancel");
    encode(&CancelResult { cancelled })
}

/// `ModelInfo` with the store's budget as it is now (SIGHUP may change it)
/// and the time left before its keep_alive unloads it.
fn live_info(served: &Served, state: &State) -> ModelInfo {
    let mut info = model_info(&served.info);
    if let Some(store) = &served.store {
        info.budget_bytes = Some(store.stats().budget_bytes);
    }
    info.unloads_in_s = state.scheduler.unloads_in().map(|left| left.as_secs_f64());
    info
}

/// What `stats` answers; the HTTP status page shows it too.
pub fn stats(state: &State) -> StatsResult {
    let served = state.scheduler.served();
    let store = served
        .as_ref()
        .and_then(|served| served.store.as_ref())
        .map(|store| store.stats());
    StatsResult {
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_s: state.started.elapsed().as_secs_f64(),
        rss_bytes: resident_bytes().unwrap_or(0),
        model: served.as_deref().map(|served| live_info(served, state)),
        store,
        queue: queue_stats(state.scheduler.queue_length()),
        sessions: session_stats(state.scheduler.sessions_kept()),
        requests: state.scheduler.requests(),
        memory: Some(memory(state)),
    }
}

/// The memory section of `stats`, with the store's budget as it is now.
fn memory(state: &State) -> MemoryStats {
    let budget = state.scheduler.served().and_then(|served| {
        served
            .store
            .as_ref()
            .map(|store| store.stats().budget_bytes)
    });
    memory_stats(state.pressure.stats(budget))
}

/// `pressure {level}` simulates a memory-pressure level; `{release: true}`
/// goes back to the real one. Only the daemon's own user (or root) may: the
/// connection checked it, and so does this, should that rule ever loosen.
fn pressure(request: &Request, state: &State, peer: &Peer) -> Result<Value, RpcError> {
    if !peer_allowed(peer.uid, state.uid) {
        return Err(RpcError::new(
            ErrorCode::Unauthorized,
            "only the user running odmoed may simulate memory pressure",
        ));
    }
    let params: PressureParams = request.parse_params()?;
    match (&params.level, params.release) {
        (Some(_), true) => return Err(invalid("give `level` or `release`, not both")),
        (None, false) => {
            return Err(invalid(
                "give `level` (normal, warn or critical) to simulate, or `release: true`",
            ));
        }
        (Some(text), false) => {
            let level = Level::parse(text).ok_or_else(|| {
                invalid(format!(
                    "level: {text:?} is not one of normal, warn, critical"
                ))
            })?;
            state.pressure.simulate(Some(level));
        }
        (None, true) => state.pressure.simulate(None),
    }
    encode(&memory(state))
}

/// `models`: the model loaded, and those in `models_dir` (read off the
/// async runtime: describing a model reads its files).
async fn models(state: &State) -> Result<Value, RpcError> {
    let models_dir = state.settings().models_dir;
    let available = match models_dir.clone() {
        Some(dir) => tokio::task::spawn_blocking(move || models_dir::list(&dir))
            .await
            .map_err(|error| RpcError::new(ErrorCode::Internal, error.to_string()))?
            .map_err(|error| {
                RpcError::new(
                    ErrorCode::Internal,
                    format!("model.models_dir: cannot list it: {error}"),
                )
            })?,
        None => Vec::new(),
    };
    encode(&ModelsResult {
        models: state
            .scheduler
            .served()
            .map(|served| live_info(&served, state))
            .into_iter()
            .collect(),
        models_dir: models_dir.map(|dir| dir.display().to_string()),
        available: available.into_iter().map(available_model).collect(),
    })
}

/// `load {path, expert_budget}`: replaces the model, dropping every session.
/// `path` is absolute, or the name of a model in `models_dir`.
async fn load(request: &Request, state: &State) -> Result<Value, RpcError> {
    let params: LoadParams = request.parse_params()?;
    let named = state
        .settings()
        .models_dir
        .and_then(|dir| models_dir::resolve(&dir, &params.path));
    let path = named.unwrap_or_else(|| PathBuf::from(&params.path));
    if !path.is_absolute() {
        return Err(invalid(format!(
            "path: {} is neither an absolute path nor the name of a model in model.models_dir \
             (`odmoe models` lists them)",
            params.path
        )));
    }
    if !path.exists() {
        return Err(invalid(format!("path: {} does not exist", params.path)));
    }
    let budget = match &params.expert_budget {
        Some(text) => {
            BudgetSpec::parse(text).map_err(|error| invalid(format!("expert_budget: {error}")))?
        }
        None => state.settings().expert_budget,
    };
    info!(model = %untrusted(&path.display().to_string()), %budget, "loading on request");
    encode(&model_info(&state.scheduler.load(path, budget).await?))
}

/// Asks the server to stop. The answer is written before this connection sees
/// the shutdown, so the caller learns that it worked.
fn shutdown(state: &State) -> Result<Value, RpcError> {
    info!("shutdown requested by a client");
    state.request_shutdown();
    Ok(Value::Nil)
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use odmoe_config::Config;
    use tokio::sync::mpsc;

    use super::*;
    use crate::pressure::{self, Pressure};
    use crate::scheduler::Scheduler;
    use crate::settings::Settings;

    fn request(method: &str, params: Value) -> Request {
        Request {
            msgid: 1,
            method: method.into(),
            params,
        }
    }

    fn state() -> State {
        let config = Config::default();
        let settings = Arc::new(RwLock::new(Settings::new(&config, None)));
        let pressure = Arc::new(Pressure::new(
            &config.memory,
            pressure::platform_source(),
            std::time::Instant::now(),
        ));
        let scheduler = Scheduler::start(Arc::clone(&settings), Arc::clone(&pressure)).unwrap();
        pressure.direct_to(scheduler.director());
        let limits = crate::state::ConnectionLimits::from_config(&config.server);
        State::new(scheduler, settings, pressure, 1 << 20, limits)
    }

    async fn call(method: &str, params: Value, state: &State) -> Result<Value, RpcError> {
        call_as(state.uid, method, params, state).await
    }

    async fn call_as(
        uid: u32,
        method: &str,
        params: Value,
        state: &State,
    ) -> Result<Value, RpcError> {
        let (out, _outgoing) = mpsc::channel(16);
        let peer = Peer::new(out, uid);
        dispatch(&request(method, params), state, &peer, None).await
    }

    fn map(entries: &[(&str, Value)]) -> Value {
        Value::Map(
            entries
                .iter()
                .map(|(key, value)| (Value::from(*key), value.clone()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn hello_reports_versions_and_no_model() {
        let result = call("hello", Value::Map(vec![]), &state()).await.unwrap();
        let hello: HelloResult = odmoe_protocol::from_value(result).unwrap();
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.server_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.model, None);
    }

    #[tokio::test]
    async fn hello_with_bad_params_is_invalid_params() {
        let params = map(&[("client", Value::from(5))]);
        let error = call("hello", params, &state()).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidParams);
    }

    #[tokio::test]
    async fn generating_without_a_model_says_so() {
        let state = state();
        for method in ["generate", "chat"] {
            let params = map(&[("prompt", Value::from("Hi"))]);
            let error = call(method, params, &state).await.unwrap_err();
            assert_eq!(error.code, ErrorCode::NoModel, "{method}");
            assert!(error.message.contains("load"), "{}", error.message);
        }
        let stats: StatsResult =
            odmoe_protocol::from_value(call("stats", Value::Map(vec![]), &state).await.unwrap())
                .unwrap();
        assert_eq!(stats.model, None);
        assert_eq!(stats.pid, std::process::id());
        assert!(stats.rss_bytes > 0);
        let models: ModelsResult =
            odmoe_protocol::from_value(call("models", Value::Map(vec![]), &state).await.unwrap())
                .unwrap();
        assert!(models.models.is_empty());
    }

    #[tokio::test]
    async fn load_wants_an_existing_absolute_path_and_a_readable_budget() {
        let state = state();
        let cases = [
            (map(&[("path", Value::from("relative/model"))]), "relative"),
            (
                map(&[("path", Value::from("/nonexistent/model"))]),
                "does not exist",
            ),
            (
                map(&[
                    ("path", Value::from("/")),
                    ("expert_budget", Value::from("lots")),
                ]),
                "expert_budget",
            ),
            (map(&[]), "path"),
        ];
        for (params, expected) in cases {
            let error = call("load", params, &state).await.unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidParams);
            assert!(error.message.contains(expected), "{}", error.message);
        }
    }

    #[tokio::test]
    async fn cancelling_an_unknown_request_says_so() {
        let params = map(&[("id", Value::from(42))]);
        let result: CancelResult =
            odmoe_protocol::from_value(call("cancel", params, &state()).await.unwrap()).unwrap();
        assert!(!result.cancelled);
    }

    #[tokio::test]
    async fn unknown_methods_are_not_found() {
        let error = call("frobnicate", Value::Map(vec![]), &state())
            .await
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::MethodNotFound);
        assert!(error.message.contains("`frobnicate`"));
    }

    #[tokio::test]
    async fn pressure_simulates_a_level_until_released() {
        let state = state();
        let simulate = map(&[("level", Value::from("warn"))]);
        let memory: MemoryStats =
            odmoe_protocol::from_value(call("pressure", simulate, &state).await.unwrap()).unwrap();
        assert_eq!(memory.level, "warn");
        assert!(memory.simulated);
        let stats: StatsResult =
            odmoe_protocol::from_value(call("stats", Value::Map(vec![]), &state).await.unwrap())
                .unwrap();
        assert!(stats.memory.unwrap().simulated);
        let release = map(&[("release", Value::from(true))]);
        let memory: MemoryStats =
            odmoe_protocol::from_value(call("pressure", release, &state).await.unwrap()).unwrap();
        assert!(!memory.simulated);

        let cases = [
            (map(&[("level", Value::from("high"))]), "level: "),
            (map(&[]), "give `level`"),
            (
                map(&[
                    ("level", Value::from("warn")),
                    ("release", Value::from(true)),
                ]),
                "not both",
            ),
        ];
        for (params, expected) in cases {
            let error = call("pressure", params, &state).await.unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidParams);
            assert!(error.message.contains(expected), "{}", error.message);
        }
        let other = state.uid.wrapping_add(1).max(1);
        let params = map(&[("level", Value::from("critical"))]);
        let error = call_as(other, "pressure", params, &state)
            .await
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::Unauthorized);
    }

    #[tokio::test]
    async fn shutdown_asks_the_server_to_stop() {
        let state = state();
        assert!(!state.shutdown_was_requested());
        assert_eq!(
            call("shutdown", Value::Map(vec![]), &state).await,
            Ok(Value::Nil)
        );
        assert!(state.shutdown_was_requested());
    }
}
