//! A reply as it is generated: the text that may be shown now, and at the end
//! the tool calls it holds.
//!
//! With tools offered, text that could open a call is held back from a stream
//! until the next token tells, and once a call opens nothing more is streamed
//! as text: the calls are parsed at the end from the reply with its special
//! tokens kept (some templates open calls with a special token, which the
//! shown text leaves out).

use std::sync::Arc;

use odmoe_engine::tokenizer::Tokenizer;

use super::tools::{ToolCall, ToolSyntax};

/// A reply being generated.
pub struct Reply {
    /// The template's call syntax when tools were offered.
    syntax: Option<ToolSyntax>,
    /// The model's tokenizer, which reads calls back with their special tokens.
    tokenizer: Option<Arc<Tokenizer>>,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` handed out as shown text.
    shown: usize,
    /// A call has opened: the rest is not shown text.
    calling: bool,
}

/// The end of a reply: the shown text not yet handed out, and the calls.
pub struct Ending {
    pub text: String,
    pub calls: Vec<ToolCall>,
}

impl Reply {
    pub fn new(syntax: Option<ToolSyntax>, tokenizer: Option<Arc<Tokenizer>>) -> Reply {
        Reply {
            syntax,
            tokenizer,
            tokens: Vec::new(),
            text: String::new(),
            shown: 0,
            calling: false,
        }
    }

    /// The model's tokenizer, when it has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Adds `token` with the `text` it made final; returns the text that may be shown now.
    pub fn push(&mut self, token: u32, text: &str) -> String {
        self.tokens.push(token);
        self.text.push_str(text);
        let Some(syntax) = self.syntax else {
            return self.show_to(self.text.len());
        };
        if self.calling {
            return String::new();
        }
        if let Some(start) = syntax.start(&self.text) {
            self.calling = true;
            return self.show_to(start);
        }
        let special_opening = self
            .tokenizer()
            .and_then(|tokenizer| tokenizer.decode(&[token], false).ok())
            .is_some_and(|raw| raw.contains(syntax.opening()));
        if special_opening {
            self.calling = true;
            return self.show_to(self.text.len() - text.len());
        }
        self.show_to(self.text.len() - syntax.held_back(&self.text))
    }

    /// A whole reply at once: `pieces` (tokens with the text each made final) added in turn,
    /// then the end; its text is all the reply shows.
    pub fn whole(&mut self, pieces: Vec<(u32, String)>) -> Ending {
        let mut text = String::new();
        for (token, piece) in pieces {
            text.push_str(&self.push(token, &piece));
        }
        let ending = self.finish();
        text.push_str(&ending.text);
        Ending {
            text,
            calls: ending.calls,
        }
    }

    /// Ends the reply: the calls, parsed from the reply with special tokens, and the shown text
    /// still held back (all of it when no call parses).
    pub fn finish(&mut self) -> Ending {
        let calls = self
            .syntax
            .zip(self.tokenizer())
            .and_then(|(syntax, tokenizer)| {
                let raw = tokenizer.decode(&self.tokens, false).ok()?;
                syntax.parse(&raw).map(|(_, calls)| (syntax, calls))
            });
        match calls {
            Some((syntax, calls)) => {
                let end = syntax.start(&self.text).unwrap_or(self.text.len());
                let text = self.show_to(end.max(self.shown));
                Ending {
                    text: text.trim_end().to_owned(),
                    calls,
                }
            }
            None => Ending {
                text: self.show_to(self.text.len()),
                calls: Vec::new(),
            },
        }
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
        let mut reply = Reply::new(None, None);
        assert_eq!(reply.push(1, "Hello"), "Hello");
        assert_eq!(reply.push(2, " <tool_call>"), " <tool_call>");
        let ending = reply.finish();
        assert_eq!(ending.text, "");
        assert!(ending.calls.is_empty());
    }

    #[test]
    fn text_that_may_open_a_call_waits_and_a_call_is_not_shown() {
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), None);
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
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), Some(Arc::clone(&tokenizer)));
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
    fn a_false_alarm_is_shown_once_it_is_clear() {
        let mut reply = Reply::new(Some(ToolSyntax::Hermes), None);
        assert_eq!(reply.push(1, "a <"), "a ");
        assert_eq!(reply.push(2, "b"), "<b");
        assert_eq!(reply.finish().text, "");
    }
}
