//! `generate` and `chat`: the request checked and tokenized, queued for the
//! engine thread, its tokens streamed as notifications, and its result.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use odmoe_config::{GenerationConfig, KeepAlive};
use odmoe_engine::generate::{Delta, GenerateRequest, ReplyForm, SamplingParams, check_context};
use odmoe_engine::tokenizer::ChatMessage;
use odmoe_protocol::{
    ErrorCode, GenerateParams, KeepAliveParam, Method, QUEUED_NOTIFICATION, QueuedEvent, Request,
    RpcError, STARTED_NOTIFICATION, StartedEvent, TOKEN_NOTIFICATION, TokenEvent, Value,
};
use tokio::sync::mpsc;

use super::convert::{engine_error, generate_result};
use super::{encode, invalid};
use crate::peer::Peer;
use crate::scheduler::{CancelToken, ChatTurn, Event, GenerateJob, SchedulerError, Served};
use crate::state::State;

/// `generate` and `chat`: checks and tokenizes, queues the job, streams its
/// tokens as notifications, and answers with the result.
pub(super) async fn generate(
    request: &Request,
    method: Method,
    state: &State,
    peer: &Peer,
    cancel: Arc<CancelToken>,
) -> Result<Value, RpcError> {
    let params: GenerateParams = request.parse_params()?;
    let Queued {
        position,
        mut events,
    } = queue(&params, method, reply_form(method), state, cancel).await?;
    let id = request.msgid;
    let relay = params.relay.as_ref();
    if position > 0 {
        peer.event(relay, QUEUED_NOTIFICATION, &QueuedEvent { id, position })
            .await;
    }
    while let Some(event) = events.recv().await {
        match event {
            Event::Started { prompt_tokens } => {
                if params.progress {
                    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
                    peer.event(
                        relay,
                        STARTED_NOTIFICATION,
                        &StartedEvent { id, prompt_tokens },
                    )
                    .await;
                }
            }
            Event::Token(Delta { token, text, .. }) => {
                if params.stream {
                    peer.event(relay, TOKEN_NOTIFICATION, &TokenEvent { id, text, token })
                        .await;
                }
            }
            Event::Done(outcome) => return encode(&generate_result(outcome?)),
        }
    }
    Err(dropped_without_answer())
}

/// A generation queued for the engine thread: how many jobs wait before it,
/// and its events, which end with [`Event::Done`]. Dropping `events` cancels it.
pub struct Queued {
    pub position: u32,
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// The error when the engine ends a request's events without its result.
pub fn dropped_without_answer() -> RpcError {
    RpcError::new(
        ErrorCode::Internal,
        "the engine dropped the request without an answer",
    )
}

/// What the socket's `method` asks for: `chat` shows a reply's answer only.
fn reply_form(method: Method) -> ReplyForm {
    if method == Method::Chat {
        ReplyForm::ChatAnswer
    } else {
        ReplyForm::Completion
    }
}

/// Checks `params` as `method` (`generate` or `chat`), tokenizes its prompt off
/// the async runtime and queues it for the engine thread, its text as `reply`
/// says; every client of the daemon, socket or HTTP, goes through here.
pub async fn queue(
    params: &GenerateParams,
    method: Method,
    reply: ReplyForm,
    state: &State,
    cancel: Arc<CancelToken>,
) -> Result<Queued, RpcError> {
    let served = state.scheduler.served().ok_or(SchedulerError::NoModel)?;
    // Cheap checks first: a bad field is refused before any tokenizing.
    let mut checked = checked_request(params, &state.settings().generation)?;
    checked.reply = reply;
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
            let messages = chat_messages(params)?;
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
    let (events, receiver) = mpsc::unbounded_channel();
    let job = GenerateJob {
        epoch: served.epoch,
        request: job_request,
        turn,
        session: params.session.clone(),
        keep_alive,
        cancel,
        events,
    };
    match state.scheduler.submit(job) {
        Some(position) => Ok(Queued {
            position,
            events: receiver,
        }),
        None => Err(RpcError::new(
            ErrorCode::Cancelled,
            "odmoed is shutting down",
        )),
    }
}

/// The answer when text needs a tokenizer the model does not have.
fn no_tokenizer(served: &Served) -> RpcError {
    invalid(format!(
        "the model at {} has no tokenizer: send `tokens` instead of text",
        served.info.path.display()
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
        reply: ReplyForm::Completion,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
