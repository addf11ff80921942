//! Anthropic's Messages API: `POST /v1/messages`, streamed as its event
//! sequence (`message_start`, content blocks, `message_delta`,
//! `message_stop`) when `stream` is set. A reasoning model's thoughts come back
//! as `thinking` blocks when the request asks for them (`thinking`), as
//! Anthropic returns them.

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
use serde_json::{Map, Value, json};

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
    /// `{"type": "enabled", "budget_tokens": N}` returns the reasoning; `{"type":
    /// "disabled"}` asks the template not to reason.
    #[serde(default)]
    thinking: Option<Value>,
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
    let thinking = match &request.thinking {
        None => None,
        Some(thinking) => Some(
            thinking
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request(DIALECT, "thinking.type: missing"))?,
        ),
    };
    let mut variables = Map::new();
    if thinking == Some("disabled") {
        // Qwen3's and GLM's templates read it; others ignore it.
        variables.insert("enable_thinking".into(), Value::Bool(false));
    }
    let show_thinking = thinking.is_some_and(|kind| kind != "disabled");
    let schemas = offered
        .as_ref()
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let prompt = chat_prompt(&served, DIALECT, conversation, offered, variables).await?;
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
        show_thinking,
        reply: Reply::new(syntax, served.tokenizer.clone(), parts).offering(schemas),
    };
    if request.stream {
        return Ok(message_stream(generation, message, prompt_tokens).into_response());
    }
    let (pieces, outcome) = generation.finish().await;
    let result = outcome?;
    let ending = message.reply.whole(pieces);
    let text = ending.text;
    let mut content = Vec::new();
    if message.show_thinking && !ending.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": ending.reasoning,
                            "signature": NO_SIGNATURE}));
    }
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

/// What a thinking block's signature says: nothing. Anthropic signs its thinking so that it
/// can check what a client sends back; no key vouches for a local model's, so the field is
/// empty, as llama.cpp's server leaves it.
const NO_SIGNATURE: &str = "";

/// One answer being made.
struct Message {
    id: String,
    model: String,
    stops: Vec<String>,
    /// The request asked for the reasoning.
    show_thinking: bool,
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

/// The event sequence of a streamed answer: the message, its blocks as they grow (thinking
/// when asked for, then text), a block per tool call, the stop reason with the usage, and the
/// end.
fn message_stream(
    generation: Generation,
    message: Message,
    prompt_tokens: usize,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let start = [(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": message.id, "type": "message", "role": "assistant", "model": message.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }}),
    )];
    let state = (generation, message, Blocks::default());
    let rest = stream::unfold(Some(state), |state| async move {
        let (mut generation, mut message, mut blocks) = state?;
        loop {
            let mut events = Vec::new();
            match generation.next().await {
                Step::Token(delta) => {
                    let shown = message.reply.take(&delta);
                    let reasoning = message.reply.take_reasoning();
                    if message.show_thinking {
                        blocks.add(Block::Thinking, &reasoning, &mut events);
                    }
                    blocks.add(Block::Text, &shown, &mut events);
                    if !events.is_empty() {
                        return Some((events, Some((generation, message, blocks))));
                    }
                }
                Step::Done(Err(error)) => return Some((vec![("error", error.body())], None)),
                Step::Done(Ok(result)) => {
                    let ending = message.reply.finish();
                    if message.show_thinking {
                        blocks.add(Block::Thinking, &ending.reasoning, &mut events);
                    }
                    blocks.add(Block::Text, &ending.text, &mut events);
                    // As without streaming: a text block, empty if need be, unless calls answer.
                    if ending.calls.is_empty() && !blocks.text_opened {
                        blocks.open(Block::Text, &mut events);
                    }
                    blocks.close(&mut events);
                    for call in &ending.calls {
                        let mut block = tool_use(call);
                        block["input"] = json!({});
                        let partial = call.arguments.to_string();
                        let delta = json!({"type": "input_json_delta", "partial_json": partial});
                        blocks.whole(block, delta, &mut events);
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

/// Named events of a stream.
type Events = Vec<(&'static str, Value)>;

/// A kind of block that grows as the reply is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
}

/// A streamed answer's content blocks, numbered in the order they open: a growing block opens
/// when what comes is of another kind than the open one, which closes.
#[derive(Default)]
struct Blocks {
    growing: Option<Block>,
    /// Blocks opened so far; the open one's index is one less.
    opened: usize,
    /// A text block has opened.
    text_opened: bool,
}

impl Blocks {
    /// `piece` of `kind` added to the open block, opening one of that kind if need be.
    fn add(&mut self, kind: Block, piece: &str, events: &mut Events) {
        if piece.is_empty() {
            return;
        }
        self.open(kind, events);
        let delta = match kind {
            Block::Thinking => json!({"type": "thinking_delta", "thinking": piece}),
            Block::Text => json!({"type": "text_delta", "text": piece}),
        };
        self.delta(delta, events);
    }

    /// Opens a block of `kind` unless one is open.
    fn open(&mut self, kind: Block, events: &mut Events) {
        if self.growing == Some(kind) {
            return;
        }
        self.close(events);
        let block = match kind {
            Block::Thinking => {
                json!({"type": "thinking", "thinking": "", "signature": NO_SIGNATURE})
            }
            Block::Text => json!({"type": "text", "text": ""}),
        };
        self.start(block, events);
        self.growing = Some(kind);
        self.text_opened |= kind == Block::Text;
    }

    /// Closes the open block, if any: a thinking block after its signature.
    fn close(&mut self, events: &mut Events) {
        let Some(kind) = self.growing.take() else {
            return;
        };
        if kind == Block::Thinking {
            let signature = json!({"type": "signature_delta", "signature": NO_SIGNATURE});
            self.delta(signature, events);
        }
        self.stop(events);
    }

    /// A block whose content comes in one delta (a tool call).
    fn whole(&mut self, block: Value, delta: Value, events: &mut Events) {
        self.close(events);
        self.start(block, events);
        self.delta(delta, events);
        self.stop(events);
    }

    fn start(&mut self, block: Value, events: &mut Events) {
        let index = self.opened;
        self.opened += 1;
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
    }

    fn delta(&self, delta: Value, events: &mut Events) {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.opened - 1, "delta": delta}),
        ));
    }

    fn stop(&self, events: &mut Events) {
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": self.opened - 1}),
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The events' names with their blocks' indices and delta types.
    fn outline(events: &Events) -> Vec<String> {
        events
            .iter()
            .map(|(name, data)| {
                let delta = data["delta"]["type"].as_str().unwrap_or("");
                let block = data["content_block"]["type"].as_str().unwrap_or("");
                format!("{name} {} {block}{delta}", data["index"])
            })
            .collect()
    }

    #[test]
    fn blocks_open_in_order_as_the_reply_changes_kind() {
        let mut blocks = Blocks::default();
        let mut events = Vec::new();
        blocks.add(Block::Thinking, "Need the ", &mut events);
        blocks.add(Block::Thinking, "weather.", &mut events);
        blocks.add(Block::Text, "", &mut events);
        blocks.add(Block::Text, "Checking.", &mut events);
        blocks.close(&mut events);
        let call = json!({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}});
        blocks.whole(call, json!({"type": "input_json_delta"}), &mut events);
        assert_eq!(
            outline(&events),
            [
                "content_block_start 0 thinking",
                "content_block_delta 0 thinking_delta",
                "content_block_delta 0 thinking_delta",
                "content_block_delta 0 signature_delta",
                "content_block_stop 0 ",
                "content_block_start 1 text",
                "content_block_delta 1 text_delta",
                "content_block_stop 1 ",
                "content_block_start 2 tool_use",
                "content_block_delta 2 input_json_delta",
                "content_block_stop 2 ",
            ]
        );
        assert_eq!(events[1].1["delta"]["thinking"], "Need the ");
        assert_eq!(events[3].1["delta"]["signature"], NO_SIGNATURE);
    }
}
