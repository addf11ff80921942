//! OpenAI's API: `GET /v1/models`, `POST /v1/chat/completions` and
//! `POST /v1/completions`, streamed as server-sent events ending with
//! `data: [DONE]` when `stream` is set.

use std::convert::Infallible;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt, stream};
use odmoe_engine::generate::ReplyForm;
use odmoe_protocol::{GenerateParams, GenerateResult};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Http;
use super::error::{ApiError, Dialect};
use super::generation::{
    Generation, OneOrMany, Step, chat_prompt, fresh_id, model_id, parse_body, served_model,
    tool_syntax, unix_now,
};
use super::messages;
use super::reply::{Ending, Reply};
use super::tools::ToolCall;

const DIALECT: Dialect = Dialect::OpenAi;

/// `GET /v1/models`: the loaded model, if any.
pub async fn models(Extract(http): Extract<Http>) -> Json<Value> {
    let data: Vec<Value> = http
        .state
        .scheduler
        .served()
        .map(|served| {
            json!({
                "id": model_id(&served),
                "object": "model",
                "created": unix_now(),
                "owned_by": "odmoe",
            })
        })
        .into_iter()
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The sampling fields both endpoints take, beyond OpenAI's own the ones llama.cpp's server
/// also reads.
#[derive(Debug, Default, Deserialize)]
struct Sampling {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    n: Option<u32>,
}

impl Sampling {
    /// The socket's parameters with these fields, `max_tokens` and the prompt left to the caller.
    fn params(self, max_tokens: Option<u32>) -> Result<GenerateParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(DIALECT, "n: only 1 is supported"));
        }
        Ok(GenerateParams {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            stream: false,
            ..GenerateParams::default()
        })
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// OpenAI's reasoning models' effort, which gpt-oss's template writes into its system
    /// message.
    #[serde(default)]
    reasoning_effort: Option<String>,
    /// Variables for the chat template, as vLLM and llama.cpp's server take them (Qwen3's
    /// `enable_thinking`, ...).
    #[serde(default)]
    chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(flatten)]
    sampling: Sampling,
}

pub async fn chat_completions(
    Extract(http): Extract<Http>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(DIALECT, body)?;
    let served = served_model(&http.state, DIALECT, request.model.as_deref())?;
    let messages =
        messages::from_openai(request.messages).map_err(|e| ApiError::bad_request(DIALECT, e))?;
    // `tool_choice: "none"` keeps the tools out of the prompt; any other choice offers them.
    let offered = request
        .tools
        .filter(|tools| !tools.is_empty())
        .filter(|_| request.tool_choice.as_ref().and_then(Value::as_str) != Some("none"));
    let syntax = match &offered {
        Some(_) => Some(tool_syntax(&served, DIALECT)?),
        None => None,
    };
    let mut variables = request.chat_template_kwargs.unwrap_or_default();
    // What the server itself gives the template is not the client's to change.
    const RESERVED: [&str; 5] = [
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
    ];
    if let Some(key) = RESERVED.iter().find(|k| variables.contains_key(**k)) {
        return Err(ApiError::bad_request(
            DIALECT,
            format!("chat_template_kwargs: {key} is set by the server, not the request"),
        ));
    }
    if let Some(effort) = request.reasoning_effort {
        if !["minimal", "low", "medium", "high"].contains(&effort.as_str()) {
            return Err(ApiError::bad_request(
                DIALECT,
                format!(
                    "reasoning_effort: {:?} is none of minimal, low, medium, high",
                    crate::logging::untrusted(&effort)
                ),
            ));
        }
        variables.insert("reasoning_effort".into(), Value::String(effort));
    }
    let prompt = chat_prompt(
        &served,
        DIALECT,
        messages,
        offered.clone().map(Value::Array),
        variables,
    )
    .await?;
    let parts = served
        .tokenizer
        .as_deref()
        .and_then(|t| t.reply_parts(&prompt));
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let params = GenerateParams {
        tokens: Some(prompt),
        ..request.sampling.params(max_tokens)?
    };
    let generation = Generation::start(&http, DIALECT, params, ReplyForm::Chat).await?;
    let mut answer = Answer {
        id: fresh_id("chatcmpl-"),
        model: model_id(&served),
        created: unix_now(),
        reply: Reply::new(syntax, served.tokenizer.clone(), parts)
            .offering(offered.unwrap_or_default()),
    };
    if request.stream {
        let usage = request.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(chat_stream(generation, answer, usage)).into_response());
    }
    let (pieces, outcome) = generation.finish().await;
    let result = outcome?;
    let Ending {
        text,
        reasoning,
        calls,
    } = answer.reply.whole(pieces);
    let finish = finish_reason(&result, &calls);
    let mut message = json!({"role": "assistant", "content": text});
    // As vLLM and llama.cpp's server return a reasoning model's thoughts.
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if !calls.is_empty() {
        message["tool_calls"] = tool_calls_json(&calls, false);
        if text.is_empty() {
            message["content"] = Value::Null;
        }
    }
    Ok(Json(json!({
        "id": answer.id,
        "object": "chat.completion",
        "created": answer.created,
        "model": answer.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage_json(&result),
    }))
    .into_response())
}

/// What every chunk of one answer repeats, and its reply so far.
struct Answer {
    id: String,
    model: String,
    created: u64,
    reply: Reply,
}

impl Answer {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }
}

/// The chunks of a streamed chat answer: the role, the text as it comes, the tool calls and
/// finish reason at the end, the usage when asked for, and `[DONE]`.
fn chat_stream(
    generation: Generation,
    answer: Answer,
    include_usage: bool,
) -> impl Stream<Item = Value> + Send {
    let first = answer.chunk(json!({"role": "assistant", "content": ""}), None);
    let state = Some((generation, answer));
    let rest = stream::unfold(state, move |state| async move {
        let (mut generation, mut answer) = state?;
        loop {
            match generation.next().await {
                Step::Token(delta) => {
                    let shown = answer.reply.take(&delta);
                    let reasoning = answer.reply.take_reasoning();
                    let mut chunks = Vec::new();
                    if !reasoning.is_empty() {
                        chunks.push(answer.chunk(json!({"reasoning_content": reasoning}), None));
                    }
                    if !shown.is_empty() {
                        chunks.push(answer.chunk(json!({"content": shown}), None));
                    }
                    if !chunks.is_empty() {
                        return Some((chunks, Some((generation, answer))));
                    }
                }
                Step::Done(Err(error)) => return Some((vec![error.body()], None)),
                Step::Done(Ok(result)) => {
                    let ending = answer.reply.finish();
                    let mut chunks = Vec::new();
                    if !ending.reasoning.is_empty() {
                        let delta = json!({"reasoning_content": ending.reasoning});
                        chunks.push(answer.chunk(delta, None));
                    }
                    if !ending.text.is_empty() {
                        chunks.push(answer.chunk(json!({"content": ending.text}), None));
                    }
                    if !ending.calls.is_empty() {
                        let calls = tool_calls_json(&ending.calls, true);
                        chunks.push(answer.chunk(json!({"tool_calls": calls}), None));
                    }
                    let finish = finish_reason(&result, &ending.calls);
                    chunks.push(answer.chunk(json!({}), Some(finish)));
                    if include_usage {
                        let mut usage = answer.chunk(json!({}), None);
                        usage["choices"] = json!([]);
                        usage["usage"] = usage_json(&result);
                        chunks.push(usage);
                    }
                    return Some((chunks, None));
                }
            }
        }
    });
    stream::iter([first]).chain(rest.flat_map(stream::iter))
}

/// `POST /v1/completions`: text after a prompt.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: OneOrMany,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(flatten)]
    sampling: Sampling,
}

pub async fn completions(
    Extract(http): Extract<Http>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_body(DIALECT, body)?;
    let served = served_model(&http.state, DIALECT, request.model.as_deref())?;
    let prompt = match request.prompt.into_vec().as_slice() {
        [one] => one.clone(),
        _ => {
            return Err(ApiError::bad_request(
                DIALECT,
                "prompt: give one prompt; lists of prompts are not supported",
            ));
        }
    };
    let params = GenerateParams {
        prompt: Some(prompt),
        ..request.sampling.params(request.max_tokens)?
    };
    let generation = Generation::start(&http, DIALECT, params, ReplyForm::Completion).await?;
    let (id, model, created) = (fresh_id("cmpl-"), model_id(&served), unix_now());
    let chunk = move |text: &str, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        })
    };
    if request.stream {
        let usage = request.stream_options.is_some_and(|o| o.include_usage);
        let chunks = stream::unfold(Some(generation), move |state| {
            let chunk = chunk.clone();
            async move {
                let mut generation = state?;
                match generation.next().await {
                    Step::Token(delta) => Some((vec![chunk(&delta.text, None)], Some(generation))),
                    Step::Done(Err(error)) => Some((vec![error.body()], None)),
                    Step::Done(Ok(result)) => {
                        let mut chunks = vec![chunk("", Some(&result.finish_reason))];
                        if usage {
                            let mut last = chunk("", None);
                            last["choices"] = json!([]);
                            last["usage"] = usage_json(&result);
                            chunks.push(last);
                        }
                        Some((chunks, None))
                    }
                }
            }
        });
        return Ok(sse(chunks.flat_map(stream::iter)).into_response());
    }
    let (_, outcome) = generation.finish().await;
    let result = outcome?;
    let mut body = chunk(&result.text, Some(&result.finish_reason));
    body["usage"] = usage_json(&result);
    Ok(Json(body).into_response())
}

/// Server-sent events of `chunks`, then `data: [DONE]`.
fn sse(
    chunks: impl Stream<Item = Value> + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = chunks
        .map(|chunk| Event::default().data(chunk.to_string()))
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok);
    Sse::new(events)
}

fn finish_reason<'a>(result: &'a GenerateResult, calls: &[ToolCall]) -> &'a str {
    if calls.is_empty() {
        &result.finish_reason
    } else {
        "tool_calls"
    }
}

/// Calls as OpenAI's `tool_calls`, with `index` in a stream's delta.
fn tool_calls_json(calls: &[ToolCall], indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(index, call)| {
            let mut value = json!({
                "id": fresh_id("call_"),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments.to_string()},
            });
            if indexed {
                value["index"] = json!(index);
            }
            value
        })
        .collect()
}

fn usage_json(result: &GenerateResult) -> Value {
    let usage = &result.usage;
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}
