//! A reply as it is generated: the text that may be shown now, and at the end
//! the tool calls it holds.
//!
//! With tools offered, text that could open a call is held back from a stream
//! until the next token tells, and once a call opens nothing more is streamed
//! as text: the calls are parsed at the end from the reply with its special
//! tokens kept (some templates open calls with a special token, which the
//! shown text leaves out).

use std::sync::Arc;

use serde_json::Value;

use odmoe_engine::generate::Delta;
use odmoe_engine::tokenizer::Tokenizer;
use odmoe_engine::tokenizer::reasoning::{Part, ReplyParts};

use super::tools::{ToolCall, ToolSyntax};

/// A reply being generated.
pub struct Reply {
    /// The template's call syntax when tools were offered.
    syntax: Option<ToolSyntax>,
    /// The tools offered (in OpenAI's form), whose schemas type the calls' arguments.
    offered: Vec<Value>,
    /// The model's tokenizer, which reads calls back with their special tokens.
    tokenizer: Option<Arc<Tokenizer>>,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` handed out as shown text.
    shown: usize,
    /// A call has opened: the rest is not shown text.
    calling: bool,
    /// How a reply whose template marks its parts (Harmony channels, `<think>` tags) divides:
    /// only its answer is shown text, its reasoning is kept apart, and its calls are read
    /// from the whole reply at the end.
    parts: Option<ReplyParts>,
    /// Reasoning not yet handed out.
    reasoning: String,
    /// The part the last token was of, which text released after it again belongs to.
    last_part: Part,
}

/// The end of a reply: the shown text and reasoning not yet handed out, and the calls.
pub struct Ending {
    pub text: String,
    pub reasoning: String,
    pub calls: Vec<ToolCall>,
}

impl Reply {
    /// A reply with tools in `syntax` (when offered), divided as `parts` says (see
    /// [`Tokenizer::reply_parts`]).
    pub fn new(
        syntax: Option<ToolSyntax>,
        tokenizer: Option<Arc<Tokenizer>>,
        parts: Option<ReplyParts>,
    ) -> Reply {
        Reply {
            syntax,
            offered: Vec::new(),
            tokenizer,
            parts,
            reasoning: String::new(),
            last_part: Part::Answer,
            tokens: Vec::new(),
            text: String::new(),
            shown: 0,
            calling: false,
        }
    }

    /// The reply with the tools offered (in OpenAI's form), whose schemas type the arguments
    /// of calls.
    pub fn offering(mut self, offered: Vec<Value>) -> Reply {
        self.offered = offered;
        self
    }

    /// The model's tokenizer, when it has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Adds what the generation said: a token with the text it made final, or text released
    /// with the last token again; returns the text that may be shown now.
    pub fn take(&mut self, delta: &Delta) -> String {
        match delta.again {
            true => self.push_again(&delta.text),
            false => self.push(delta.token, &delta.text),
        }
    }

    /// Text released with the last token again (held back from the stop strings, or
    /// mid-character): of the last token's part, and no token of its own.
    fn push_again(&mut self, text: &str) -> String {
        match self.last_part {
            Part::Answer => self.answer(text, ""),
            Part::Reasoning => {
                self.reasoning.push_str(text);
                String::new()
            }
            Part::Structure | Part::Call => String::new(),
        }
    }

    /// Adds `token` with the `text` it made final; returns the text that may be shown now.
    pub fn push(&mut self, token: u32, text: &str) -> String {
        self.tokens.push(token);
        // The token's text with special tokens kept, which tells a reply's parts and calls
        // opened by a special token; decoded once, when either may be asked.
        let raw = self
            .tokenizer
            .as_deref()
            .filter(|_| self.parts.is_some() || self.syntax.is_some())
            .and_then(|tokenizer| tokenizer.decode(&[token], false).ok())
            .unwrap_or_default();
        let mut text = text;
        if let Some(parts) = &mut self.parts {
            let (part, of_part) = parts.take(&raw, text);
            self.last_part = part;
            match part {
                // The answer goes on as any reply does, calls held back.
                Part::Answer => text = of_part,
                Part::Reasoning => {
                    self.reasoning.push_str(of_part);
                    return String::new();
                }
                Part::Structure | Part::Call => return String::new(),
            }
        }
        self.answer(text, &raw)
    }

    /// `text` added to the answer (`raw` the token's text with special tokens kept, which may
    /// open a call); returns what may be shown now.
    fn answer(&mut self, text: &str, raw: &str) -> String {
        self.text.push_str(text);
        let Some(syntax) = self.answer_syntax() else {
            return self.show_to(self.text.len());
        };
        if self.calling {
            return String::new();
        }
        if let Some(start) = syntax.start(&self.text) {
            self.calling = true;
            return self.show_to(start);
        }
        if raw.contains(syntax.opening()) {
            self.calling = true;
            return self.show_to(self.text.len() - text.len());
        }
        self.show_to(self.text.len() - syntax.held_back(&self.text))
    }

    /// The syntax of the calls the answer itself may hold: none in a Harmony reply, whose calls
    /// are messages of their own.
    fn answer_syntax(&self) -> Option<ToolSyntax> {
        self.syntax
            .filter(|_| self.parts.as_ref().is_none_or(ReplyParts::calls_in_answer))
    }

    /// The reasoning generated since it was last taken.
    pub fn take_reasoning(&mut self) -> String {
        std::mem::take(&mut self.reasoning)
    }

    /// A whole reply at once: `pieces` (what the generation said) added in turn, then the end;
    /// its text is all the reply shows, its reasoning all it reasoned.
    pub fn whole(&mut self, pieces: Vec<Delta>) -> Ending {
        let mut text = String::new();
        for piece in &pieces {
            text.push_str(&self.take(piece));
        }
        let ending = self.finish();
        text.push_str(&ending.text);
        Ending {
            text,
            reasoning: ending.reasoning,
            calls: ending.calls,
        }
    }

    /// Ends the reply: the calls, parsed from the reply with special tokens, and the shown text
    /// still held back (all of it when no call parses).
    pub fn finish(&mut self) -> Ending {
        let reasoning = self.take_reasoning();
        match self.calls() {
            Some(calls) => {
                let end = self
                    .answer_syntax()
                    .and_then(|syntax| syntax.start(&self.text))
                    .unwrap_or(self.text.len());
                let text = self.show_to(end.max(self.shown));
                Ending {
                    text: text.trim_end().to_owned(),
                    reasoning,
                    calls,
                }
            }
            None => Ending {
                text: self.show_to(self.text.len()),
                reasoning,
                calls: Vec::new(),
            },
        }
    }

    /// The calls of the reply (past its reasoning), read with its special tokens, when tools
    /// were offered and some call parses.
    fn calls(&self) -> Option<Vec<ToolCall>> {
        self.syntax
            .zip(self.tokenizer())
            .and_then(|(syntax, tokenizer)| {
                let raw = tokenizer.decode(&self.tokens, false).ok()?;
                let raw = match &self.parts {
                    Some(parts) => parts.calls_in(&raw),
                    None => &raw,
                };
                syntax.parse(raw, &self.offered).map(|(_, calls)| calls)
            })
    }

    /// Hands out the text up to byte `end`.
    fn show_to(&mut self, end: usize) -> String {
        if end <= self.shown {
            return String::new();
        }
        let piece = self.text[self.shown..end].to_owned();
        self.shown = end;
        piece
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tools_everything_shows_at_once() {
        let mut reply = Reply::new(None, None, None);
        assert_eq!(reply.push(1, "Hello"), "Hello");
        assert_eq!(reply.push(2, " <tool_call>"), " <tool_call>");
        let ending = reply.finish();
        assert_eq!(ending.text, "");
        assert!(ending.calls.is_empty());
    }

    #[test]
    fn text_that_may_open_a_call_waits_and_a_call_is_not_shown() {
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), None, None);
        assert_eq!(reply.push(1, "Let me check <tool"), "Let me check ");
        assert_eq!(reply.push(2, "_call>{\"name\": \"f\"}"), "");
        assert_eq!(reply.push(3, "</tool_call>"), "");
        // Without a tokenizer the calls cannot be read back: what was held comes out as text.
        let ending = reply.finish();
        assert_eq!(ending.text, "<tool_call>{\"name\": \"f\"}</tool_call>");
    }

    #[test]
    fn a_generated_call_is_read_back_from_its_tokens() {
        use odmoe_engine::tokenizer::DecodeStream;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
        let tokenizer = Arc::new(Tokenizer::from_dir(&dir).unwrap());
        let generated = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let tokens = tokenizer.encode(generated, false).unwrap();
        let mut stream = DecodeStream::new(&tokenizer, true);
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), Some(Arc::clone(&tokenizer)), None);
        let mut shown = String::new();
        for &token in &tokens {
            let piece = stream.step(token).unwrap().unwrap_or_default();
            shown.push_str(&reply.push(token, &piece));
        }
        let ending = reply.finish();
        shown.push_str(&ending.text);
        assert_eq!(shown.trim_end(), "Checking.");
        assert_eq!(
            ending.calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: serde_json::json!({"city": "Paris"}),
            }]
        );
    }

    #[test]
    fn a_glm_calls_arguments_take_the_offered_schemas_types() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
        let tokenizer = Arc::new(Tokenizer::from_dir(&dir).unwrap());
        let generated = "<tool_call>book<arg_key>code</arg_key><arg_value>123</arg_value>\
                         <arg_key>nights</arg_key><arg_value>3</arg_value></tool_call>";
        let offered = vec![
            serde_json::json!({"type": "function", "function": {"name": "book",
            "parameters": {"properties": {"code": {"type": "string"},
                                          "nights": {"type": "integer"}}}}}),
        ];
        let mut reply =
            Reply::new(Some(ToolSyntax::Glm), Some(Arc::clone(&tokenizer)), None).offering(offered);
        for token in tokenizer.encode(generated, false).unwrap() {
            reply.push(token, "");
        }
        let ending = reply.finish();
        assert_eq!(
            ending.calls[0].arguments,
            serde_json::json!({"code": "123", "nights": 3})
        );
    }

    /// A tokenizer fetched by scripts/fetch-tokenizers.sh.
    fn fetched_tokenizer(name: &str) -> std::path::PathBuf {
        let dir = std::env::var_os("ODMOE_TOKENIZERS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
                    .join(".cache/odmoe/tokenizers")
            })
            .join(name);
        assert!(
            dir.exists(),
            "{} is missing: run scripts/fetch-tokenizers.sh {name}",
            dir.display()
        );
        dir
    }

    #[test]
    fn thinking_is_kept_apart_from_the_answer() {
        // Qwen3's template marks reasoning with <think> tags.
        let tokenizer = Arc::new(Tokenizer::from_dir(&fetched_tokenizer("qwen3")).unwrap());
        let prompt = tokenizer
            .encode(
                "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
                false,
            )
            .unwrap();
        let parts = tokenizer.reply_parts(&prompt);
        assert!(parts.is_some());
        let mut reply = Reply::new(None, Some(Arc::clone(&tokenizer)), parts);
        let (shown, ending) = stream(
            &mut reply,
            &tokenizer,
            "<think>\nThe capital is Paris.\n</think>\n\nParis.",
        );
        assert_eq!(shown, "Paris.");
        assert_eq!(ending.reasoning.trim(), "The capital is Paris.");

        // A call after the reasoning is held back from the answer and read back.
        let parts = tokenizer.reply_parts(&prompt);
        let mut reply = Reply::new(
            Some(ToolSyntax::Hermes),
            Some(Arc::clone(&tokenizer)),
            parts,
        );
        let (shown, ending) = stream(
            &mut reply,
            &tokenizer,
            "<think>\nI need the weather.\n</think>\n\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(shown.trim_end(), "Checking.");
        assert_eq!(ending.calls.len(), 1, "{:?}", ending.calls);
    }

    /// gpt-oss's tokenizer (scripts/fetch-tokenizers.sh gptoss) with a template that writes
    /// Harmony.
    fn harmony_tokenizer() -> (tempfile::TempDir, Arc<Tokenizer>) {
        let fetched = fetched_tokenizer("gptoss").join("tokenizer.json");
        assert!(
            fetched.exists(),
            "{} is missing: run scripts/fetch-tokenizers.sh gptoss",
            fetched.display()
        );
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&fetched, dir.path().join("tokenizer.json")).unwrap();
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{- '<|start|>assistant<|channel|>final<|message|>' }}",
        )
        .unwrap();
        let tokenizer = Arc::new(Tokenizer::from_dir(dir.path()).unwrap());
        (dir, tokenizer)
    }

    /// Text the engine released again (an answer's tail it held back from the stop strings)
    /// is the answer's, though a marker follows, and adds no token to read calls from.
    #[test]
    fn text_released_again_belongs_to_the_last_tokens_part() {
        let delta = |token: u32, text: &str, again: bool| Delta {
            token,
            text: text.into(),
            again,
        };
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), None, None);
        assert_eq!(reply.take(&delta(1, "Hi", false)), "Hi");
        assert_eq!(reply.take(&delta(1, "\n", true)), "\n");
        assert_eq!(reply.tokens, [1]);

        let (_dir, tokenizer) = harmony_tokenizer();
        let mut reply = Reply::new(
            None,
            Some(Arc::clone(&tokenizer)),
            tokenizer.reply_parts(&[]),
        );
        let mut shown = String::new();
        let mut say = |reply: &mut Reply, text: &str| {
            for token in tokenizer.encode(text, false).unwrap() {
                let piece = tokenizer.decode(&[token], true).unwrap();
                shown.push_str(&reply.take(&delta(token, &piece, false)));
            }
        };
        say(&mut reply, "<|channel|>commentary<|message|>Let me check");
        let held = reply.take(&delta(0, "!\n", true));
        say(
            &mut reply,
            "<|end|><|start|>assistant<|channel|>final<|message|>Done.",
        );
        assert_eq!(held, "!\n");
        assert_eq!(shown, "Let me checkDone.");
        assert_eq!(reply.finish().reasoning, "");
    }

    /// Streams `generated` through a reply as the daemon does; returns what it showed and its
    /// end.
    fn stream(reply: &mut Reply, tokenizer: &Tokenizer, generated: &str) -> (String, Ending) {
        use odmoe_engine::tokenizer::DecodeStream;
        let tokens = tokenizer.encode(generated, false).unwrap();
        let mut decode = DecodeStream::new(tokenizer, true);
        let mut shown = String::new();
        for &token in &tokens {
            let piece = decode.step(token).unwrap().unwrap_or_default();
            shown.push_str(&reply.push(token, &piece));
        }
        let ending = reply.finish();
        shown.push_str(&ending.text);
        (shown, ending)
    }

    #[test]
    fn a_harmony_reply_shows_its_answer_only_and_calls_from_commentary() {
        let (_dir, tokenizer) = harmony_tokenizer();
        let parts = || tokenizer.reply_parts(&[]);
        let mut reply = Reply::new(None, Some(Arc::clone(&tokenizer)), parts());
        let generated = "<|channel|>analysis<|message|>The user greets me.<|end|>\
                         <|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>";
        let (shown, ending) = stream(&mut reply, &tokenizer, generated);
        assert_eq!(shown, "Hello! How can I help?");
        assert_eq!(ending.reasoning, "The user greets me.");
        assert!(ending.calls.is_empty());

        let mut reply = Reply::new(
            Some(ToolSyntax::Harmony),
            Some(Arc::clone(&tokenizer)),
            parts(),
        );
        let generated = "<|channel|>analysis<|message|>Need the weather.<|end|>\
                         <|start|>assistant<|channel|>commentary to=functions.get_weather \
                         <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>";
        let (shown, ending) = stream(&mut reply, &tokenizer, generated);
        assert_eq!(shown, "");
        assert_eq!(
            ending.calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: serde_json::json!({"city": "Paris"}),
            }]
        );
    }

    #[test]
    fn a_false_alarm_is_shown_once_it_is_clear() {
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), None, None);
        assert_eq!(reply.push(1, "a <"), "a ");
        assert_eq!(reply.push(2, "b"), "<b");
        assert_eq!(reply.finish().text, "");
    }
}
