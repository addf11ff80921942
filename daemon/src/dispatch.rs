//! From a request to its result: one function per method.
//!
//! `generate` and `chat` are checked and tokenized here, on the connection's
//! task, so a bad request is refused at once instead of after waiting in the
//! queue; the engine thread only runs them (see `scheduler`). Names outside
//! the protocol get `method_not_found`.

use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::Arc;

use odmoe_config::{GenerationConfig, KeepAlive};
use odmoe_engine::generate::{GenerateRequest, SamplingParams, check_context};
use odmoe_engine::tokenizer::ChatMessage;
use odmoe_protocol::{
    CancelParams, CancelResult, ErrorCode, GenerateParams, HelloParams, HelloResult,
    KeepAliveParam, LoadParams, MemoryStats, Method, ModelInfo, ModelsResult, PROTOCOL_VERSION,
    PressureParams, QUEUED_NOTIFICATION, QueuedEvent, Request, Response, RpcError,
    STARTED_NOTIFICATION, StartedEvent, StatsResult, TOKEN_NOTIFICATION, TokenEvent, Value,
    to_value,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::budget::BudgetSpec;
use crate::logging::untrusted;
use crate::memory::resident_bytes;
use crate::models_dir;
use crate::peer::{Peer, peer_allowed};
use crate::pressure::{self, Level};
use crate::scheduler::{CancelToken, ChatTurn, Event, GenerateJob, Served, engine_error, no_model};
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
            generate(request, method, state, peer, token.unwrap_or_default()).await
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
            .map(|served| served.info.path.clone()),
    })
}

/// `generate` and `chat`: checks and tokenizes, queues the job, streams its
/// tokens as notifications, and answers with the result.
async fn generate(
    request: &Request,
    method: Method,
    state: &State,
    peer: &Peer,
    cancel: Arc<CancelToken>,
) -> Result<Value, RpcError> {
    let params: GenerateParams = request.parse_params()?;
    let served = state.scheduler.served().ok_or_else(no_model)?;
    // Cheap checks first: a bad field is refused before any tokenizing.
    let checked = checked_request(&params, &state.settings().generation)?;
    let keep_alive = params
        .keep_alive
        .as_ref()
        .map(|keep| match keep {
            KeepAliveParam::Seconds(seconds) => Ok(KeepAlive::seconds(*seconds)),
            KeepAliveParam::Text(text) => KeepAlive::parse(text),
        })
        .transpose()
        .map_err(|error| invalid(format!("keep_alive: {error}")))?;
    let (job_request, turn) = match (method, &params.session) {
        // The session's conversation is on the engine thread, which renders
        // the turn after it and fits it to the context.
        (Method::Chat, Some(_)) => {
            let messages = chat_messages(&params)?;
            served
                .tokenizer
                .as_deref()
                .ok_or_else(|| no_tokenizer(&served))?;
            let turn = ChatTurn {
                messages,
                new_conversation: params.new_conversation,
                fit_max_tokens: params.max_tokens.is_none(),
            };
            (checked, Some(turn))
        }
        _ => {
            // Tokenizing a long prompt is CPU work: off the async runtime, so
            // other clients are not kept waiting.
            let (owned, tokenizing) = (params.clone(), Arc::clone(&served));
            let prompt =
                tokio::task::spawn_blocking(move || prompt_tokens(method, &owned, &tokenizing))
                    .await
                    .map_err(|error| RpcError::new(ErrorCode::Internal, error.to_string()))??;
            let length_given = params.max_tokens.is_some();
            let request = with_prompt(checked, prompt, length_given, served.context_length)?;
            (request, None)
        }
    };
    let (events, mut receiver) = mpsc::unbounded_channel();
    let job = GenerateJob {
        epoch: served.epoch,
        request: job_request,
        turn,
        session: params.session.clone(),
        keep_alive,
        cancel,
        events,
    };
    let id = request.msgid;
    match state.scheduler.submit(job) {
        Some(0) => {}
        Some(position) => {
            peer.notify(QUEUED_NOTIFICATION, &QueuedEvent { id, position })
                .await;
        }
        None => {
            return Err(RpcError::new(
                ErrorCode::Cancelled,
                "odmoed is shutting down",
            ));
        }
    }
    while let Some(event) = receiver.recv().await {
        match event {
            Event::Started { prompt_tokens } => {
                if params.progress {
                    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
                    peer.notify(STARTED_NOTIFICATION, &StartedEvent { id, prompt_tokens })
                        .await;
                }
            }
            Event::Token { token, text } => {
                if params.stream {
                    peer.notify(TOKEN_NOTIFICATION, &TokenEvent { id, text, token })
                        .await;
                }
            }
            Event::Done(outcome) => return encode(&outcome?),
        }
    }
    Err(RpcError::new(
        ErrorCode::Internal,
        "the engine dropped the request without an answer",
    ))
}

/// The answer when text needs a tokenizer the model does not have.
fn no_tokenizer(served: &Served) -> RpcError {
    invalid(format!(
        "the model at {} has no tokenizer: send `tokens` instead of text",
        served.info.path
    ))
}

/// The messages of a `chat` request, checked.
fn chat_messages(params: &GenerateParams) -> Result<Vec<ChatMessage>, RpcError> {
    if params.prompt.is_some() || params.tokens.is_some() {
        return Err(invalid(
            "`chat` takes `messages`; send `prompt` or `tokens` to `generate`",
        ));
    }
    match &params.messages {
        Some(messages) if !messages.is_empty() => Ok(messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect()),
        _ => Err(invalid("messages: must hold at least one message")),
    }
}

/// The prompt as token ids: `tokens` as given, `prompt` encoded, or `messages`
/// rendered with the chat template and encoded.
fn prompt_tokens(
    method: Method,
    params: &GenerateParams,
    served: &Served,
) -> Result<Vec<u32>, RpcError> {
    let tokenizer = || {
        served
            .tokenizer
            .as_deref()
            .ok_or_else(|| no_tokenizer(served))
    };
    let tokens = if method == Method::Chat {
        let messages = chat_messages(params)?;
        tokenizer()?
            .encode_chat(&messages)
            .map_err(|error| invalid(format!("messages: {error}")))?
    } else {
        if params.messages.is_some() {
            return Err(invalid(
                "`generate` takes `prompt` or `tokens`; send `messages` to `chat`",
            ));
        }
        match (&params.prompt, &params.tokens) {
            (Some(_), Some(_)) => return Err(invalid("give `prompt` or `tokens`, not both")),
            (None, None) => {
                return Err(invalid(
                    "neither `prompt` nor `tokens`: give the prompt as text or as token ids",
                ));
            }
            (None, Some(tokens)) => {
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= served.vocab_size) {
                    return Err(invalid(format!(
                        "tokens: {bad} is outside the vocabulary of {} tokens",
                        served.vocab_size
                    )));
                }
                tokens.clone()
            }
            (Some(prompt), None) => {
                if prompt.is_empty() {
                    return Err(invalid("prompt: must not be empty"));
                }
                tokenizer()?
                    .encode(prompt, true)
                    .map_err(|error| invalid(format!("prompt: {error}")))?
            }
        }
    };
    if tokens.is_empty() {
        let field = match method {
            Method::Chat => "messages",
            _ if params.tokens.is_some() => "tokens",
            _ => "prompt",
        };
        return Err(invalid(format!("{field}: the prompt has no tokens")));
    }
    Ok(tokens)
}

/// The engine's request without its prompt: the client's fields, the
/// configured defaults for the rest, each checked and named when out of range.
/// Cheap, so it runs before the prompt is tokenized.
fn checked_request(
    params: &GenerateParams,
    defaults: &GenerationConfig,
) -> Result<GenerateRequest, RpcError> {
    let sampling = SamplingParams {
        temperature: params.temperature.unwrap_or(defaults.temperature),
        top_k: params.top_k.unwrap_or(defaults.top_k) as usize,
        top_p: params.top_p.unwrap_or(defaults.top_p),
        min_p: params.min_p.unwrap_or(defaults.min_p),
        repetition_penalty: params
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        // Unseeded requests differ from one another, as people expect.
        seed: params
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(std::time::SystemTime::now())),
    };
    sampling.validate().map_err(engine_error)?;
    let max_tokens = params.max_tokens.unwrap_or(defaults.max_tokens);
    if max_tokens < 1 {
        return Err(invalid("max_tokens: must be at least 1"));
    }
    Ok(GenerateRequest {
        prompt: Vec::new(),
        max_tokens: max_tokens as usize,
        sampling,
        stop: params.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: params.ignore_eos,
    })
}

/// `request` with its `prompt`, which must fit in `context_length` with the
/// `max_tokens` asked for; a `max_tokens` left to the default (`length_given`
/// false) is lowered to what fits instead, as a request that did not ask for
/// a length should not fail for it.
fn with_prompt(
    mut request: GenerateRequest,
    prompt: Vec<u32>,
    length_given: bool,
    context_length: usize,
) -> Result<GenerateRequest, RpcError> {
    if !length_given {
        let room = context_length.saturating_sub(prompt.len());
        request.max_tokens = request.max_tokens.min(room.max(1));
    }
    check_context(context_length, prompt.len(), request.max_tokens).map_err(engine_error)?;
    request.prompt = prompt;
    Ok(request)
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
    let mut info = served.info.clone();
    if let Some(store) = &served.store {
        info.budget_bytes = Some(store.stats().budget_bytes);
    }
    info.unloads_in_s = state.scheduler.unloads_in().map(|left| left.as_secs_f64());
    info
}

fn stats(state: &State) -> StatsResult {
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
        queue: state.scheduler.queue_stats(),
        sessions: state.scheduler.session_stats(),
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
    state.pressure.stats(budget)
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
        available,
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
    encode(&state.scheduler.load(path, budget).await?)
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

    use super::*;
    use crate::pressure::Pressure;
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

    /// What `generate` makes of `params` with a prompt of `prompt`.
    fn request_for(
        params: &GenerateParams,
        prompt: Vec<u32>,
        defaults: &GenerationConfig,
        context_length: usize,
    ) -> Result<GenerateRequest, RpcError> {
        let checked = checked_request(params, defaults)?;
        with_prompt(checked, prompt, params.max_tokens.is_some(), context_length)
    }

    #[test]
    fn sampling_fields_left_out_take_the_configured_defaults() {
        let defaults = GenerationConfig {
            max_tokens: 7,
            temperature: 0.0,
            ..GenerationConfig::default()
        };
        let params = GenerateParams {
            top_k: Some(3),
            seed: Some(9),
            ..GenerateParams::default()
        };
        let request = request_for(&params, vec![1], &defaults, 4096).unwrap();
        assert_eq!(request.max_tokens, 7);
        assert_eq!(request.sampling.temperature, 0.0);
        assert_eq!(request.sampling.top_k, 3);
        assert_eq!(request.sampling.top_p, defaults.top_p);
        assert_eq!(request.sampling.seed, 9);
    }

    #[test]
    fn prompts_must_fit_the_context_and_the_default_length_shrinks_to_fit() {
        let defaults = GenerationConfig::default();
        let fitted = request_for(&GenerateParams::default(), vec![1; 60], &defaults, 64);
        assert_eq!(fitted.unwrap().max_tokens, 4);
        let asked = GenerateParams {
            max_tokens: Some(5),
            ..GenerateParams::default()
        };
        let error = request_for(&asked, vec![1; 60], &defaults, 64).unwrap_err();
        assert_eq!(error.code, ErrorCode::ContextLengthExceeded);
        let error =
            request_for(&GenerateParams::default(), vec![1; 64], &defaults, 64).unwrap_err();
        assert_eq!(error.code, ErrorCode::ContextLengthExceeded);
        assert!(error.message.contains("64 tokens"), "{}", error.message);
    }

    #[test]
    fn out_of_range_sampling_names_the_field() {
        let defaults = GenerationConfig::default();
        let cases = [
            (
                GenerateParams {
                    top_p: Some(0.0),
                    ..GenerateParams::default()
                },
                "top_p: ",
            ),
            (
                GenerateParams {
                    temperature: Some(-1.0),
                    ..GenerateParams::default()
                },
                "temperature: ",
            ),
            (
                GenerateParams {
                    min_p: Some(1.5),
                    ..GenerateParams::default()
                },
                "min_p: ",
            ),
            (
                GenerateParams {
                    repetition_penalty: Some(0.0),
                    ..GenerateParams::default()
                },
                "repetition_penalty: ",
            ),
            (
                GenerateParams {
                    max_tokens: Some(0),
                    ..GenerateParams::default()
                },
                "max_tokens: ",
            ),
        ];
        for (params, field) in cases {
            let error = request_for(&params, vec![1], &defaults, 4096).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidParams);
            assert!(error.message.starts_with(field), "{}", error.message);
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
