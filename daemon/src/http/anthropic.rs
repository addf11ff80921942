//! Anthropic's Messages API: `POST /v1/messages`, streamed as its event
//! sequence (`message_start`, content blocks, `message_delta`,
//! `message_stop`) when `stream` is set.

use std::convert::Infallible;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, stream};
use odmoe_engine::generate::ReplyForm;
use odmoe_protocol::{GenerateParams, GenerateResult};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Http;
use super::error::{ApiError, Dialect};
use super::generation::{
    Generation, OneOrMany, Step, chat_prompt, fresh_id, model_id, parse_body, served_model,
    tool_syntax,
};
use super::messages;
use super::reply::Reply;
use super::tools::ToolCall;

const DIALECT: Dialect = Dialect::Anthropic;

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: Option<String>,
    max_tokens: u32,
    messages: Vec<Value>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

/// `POST /v1/messages`.
pub async fn messages(
    Extract(http): Extract<Http>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: MessagesRequest = parse_body(DIALECT, body)?;
    let served = served_model(&http.state, DIALECT, request.model.as_deref())?;
    let conversation = messages::from_anthropic(request.system, request.messages)
        .map_err(|e| ApiError::bad_request(DIALECT, e))?;
    let declined = request
        .tool_choice
        .as_ref()
        .and_then(|choice| choice.get("type"))
        .and_then(Value::as_str)
        == Some("none");
    let offered = match request.tools.filter(|tools| !tools.is_empty() && !declined) {
        Some(tools) => {
            Some(messages::anthropic_tools(&tools).map_err(|e| ApiError::bad_request(DIALECT, e))?)
        }
        None => None,
    };
    let syntax = match &offered {
        Some(_) => Some(tool_syntax(&served, DIALECT)?),
        None => None,
    };
    let prompt = chat_prompt(&served, DIALECT, conversation, offered, Default::default()).await?;
    let prompt_tokens = prompt.len();
    let parts = served
        .tokenizer
        .as_deref()
        .and_then(|t| t.reply_parts(&prompt));
    let stops = request
        .stop_sequences
        .map(OneOrMany::into_vec)
        .unwrap_or_default();
    let params = GenerateParams {
        tokens: Some(prompt),
        max_tokens: Some(request.max_tokens),
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        stop: stops.clone(),
        stream: false,
        ..GenerateParams::default()
    };
    let generation = Generation::start(&http, DIALECT, params, ReplyForm::Chat).await?;
    let mut message = Message {
        id: fresh_id("msg_"),
        model: model_id(&served),
        stops,
        reply: Reply::new(syntax, served.tokenizer.clone(), parts),
    };
    if request.stream {
        return Ok(message_stream(generation, message, prompt_tokens).into_response());
    }
    let (pieces, outcome) = generation.finish().await;
    let result = outcome?;
    let ending = message.reply.whole(pieces);
    let text = ending.text;
    let mut content = Vec::new();
    if !text.is_empty() || ending.calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(ending.calls.iter().map(tool_use));
    let (stop_reason, stop_sequence) = message.stop_reason(&result, &ending.calls);
    Ok(Json(json!({
        "id": message.id,
        "type": "message",
        "role": "assistant",
        "model": message.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_json(&result),
    }))
    .into_response())
}

/// One answer being made.
struct Message {
    id: String,
    model: String,
    stops: Vec<String>,
    reply: Reply,
}

impl Message {
    /// Why the reply ended, in Anthropic's words, and the stop sequence that ended it.
    fn stop_reason(&self, result: &GenerateResult, calls: &[ToolCall]) -> (&'static str, Value) {
        if !calls.is_empty() {
            return ("tool_use", Value::Null);
        }
        match result.finish_reason.as_str() {
            "length" => ("max_tokens", Value::Null),
            _ => {
                // The generated tokens still hold the stop sequence the text leaves out. The one
                // that ended the reply ends in its last token's text: one met earlier, in
                // reasoning, where stop sequences are not sought, did not end it.
                let decoded = |tokens: &[u32]| {
                    self.reply
                        .tokenizer()
                        .and_then(|tokenizer| tokenizer.decode(tokens, true).ok())
                        .unwrap_or_default()
                };
                let generated = decoded(&result.tokens);
                let before_last = decoded(&result.tokens[..result.tokens.len().saturating_sub(1)]);
                // The text before the last token may end in a character the last token
                // completes, decoded as U+FFFD: up to two bytes longer than its bytes.
                const SPLIT_CHARACTER: usize = 2;
                let ends_last = |stop: &&String| {
                    let mut from = before_last
                        .len()
                        .saturating_sub(stop.len().saturating_sub(1) + SPLIT_CHARACTER);
                    while !generated.is_char_boundary(from) {
                        from -= 1;
                    }
                    generated
                        .get(from..)
                        .is_some_and(|tail| tail.contains(stop.as_str()))
                };
                match self.stops.iter().find(ends_last) {
                    Some(stop) => ("stop_sequence", Value::String(stop.clone())),
                    None => ("end_turn", Value::Null),
                }
            }
        }
    }
}

/// The event sequence of a streamed answer: the message, a text block growing with the
/// reply, a block per tool call, the stop reason with the usage, and the end.
fn message_stream(
    generation: Generation,
    message: Message,
    prompt_tokens: usize,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let start = [
        (
            "message_start",
            json!({"type": "message_start", "message": {
                "id": message.id, "type": "message", "role": "assistant", "model": message.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
            }}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let rest = stream::unfold(Some((generation, message)), |state| async move {
        let (mut generation, mut message) = state?;
        loop {
            match generation.next().await {
                Step::Token { token, text } => {
                    let shown = message.reply.push(token, &text);
                    // This API has no place for the reasoning here: it is not kept.
                    message.reply.take_reasoning();
                    if !shown.is_empty() {
                        return Some((vec![text_delta(&shown)], Some((generation, message))));
                    }
                }
                Step::Done(Err(error)) => return Some((vec![("error", error.body())], None)),
                Step::Done(Ok(result)) => {
                    let ending = message.reply.finish();
                    let mut events = Vec::new();
                    if !ending.text.is_empty() {
                        events.push(text_delta(&ending.text));
                    }
                    events.push((
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ));
                    for (at, call) in ending.calls.iter().enumerate() {
                        let index = at + 1;
                        let mut block = tool_use(call);
                        block["input"] = json!({});
                        events.push((
                            "content_block_start",
                            json!({"type": "content_block_start", "index": index, "content_block": block}),
                        ));
                        events.push((
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index, "delta": {
                                "type": "input_json_delta", "partial_json": call.arguments.to_string()}}),
                        ));
                        events.push((
                            "content_block_stop",
                            json!({"type": "content_block_stop", "index": index}),
                        ));
                    }
                    let (stop_reason, stop_sequence) = message.stop_reason(&result, &ending.calls);
                    events.push((
                        "message_delta",
                        json!({"type": "message_delta",
                               "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                               "usage": usage_json(&result)}),
                    ));
                    events.push(("message_stop", json!({"type": "message_stop"})));
                    return Some((events, None));
                }
            }
        }
    });
    let events = stream::iter(start)
        .chain(rest.flat_map(stream::iter))
        .map(|(name, data)| Ok(Event::default().event(name).data(data.to_string())));
    Sse::new(events)
}

fn text_delta(text: &str) -> (&'static str, Value) {
    (
        "content_block_delta",
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": text}}),
    )
}

fn tool_use(call: &ToolCall) -> Value {
    json!({"type": "tool_use", "id": fresh_id("toolu_"), "name": call.name, "input": call.arguments})
}

/// Anthropic counts cached prompt tokens apart from the others.
fn usage_json(result: &GenerateResult) -> Value {
    let usage = &result.usage;
    json!({
        "input_tokens": usage.prompt_tokens - usage.cached_tokens.min(usage.prompt_tokens),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}
