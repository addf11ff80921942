//! Which part of a chat reply a generated token is: the answer, the reasoning before it, a tool
//! call, or structure (markers and message headers). Models mark them in two ways: gpt-oss's
//! Harmony channels ([`HarmonyReply`]), and `<think>…</think>` around the reasoning (Qwen3,
//! GLM-4.5, DeepSeek-R1), whose opening some templates already write at the end of the prompt.

use super::harmony::{HarmonyReply, writes_harmony};

/// What a token of a reply is part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// A marker or a message header: never shown.
    Structure,
    /// The answer (Harmony: `final`, or a preamble on `commentary` to no one).
    Answer,
    /// The reasoning (`analysis`, or inside `<think>`): kept out of the answer.
    Reasoning,
    /// A tool call's arguments (Harmony: `commentary` to a recipient).
    Call,
}

/// A reply being split into its parts.
#[derive(Debug)]
pub struct ReplyParts {
    marking: Marking,
    /// Reasoning came before: the answer starts at its first visible character, not at the
    /// blank lines after the reasoning.
    reasoned: bool,
    /// The answer has shown a character.
    answering: bool,
}

#[derive(Debug)]
enum Marking {
    Harmony(HarmonyReply),
    Think { inside: bool },
}

impl ReplyParts {
    /// How the reply to `prompt` (a chat rendered with its generation prompt; only its end is
    /// looked at) divides, for a chat template whose source is `template`: `None` when the
    /// template marks no reasoning, and the whole reply is the answer.
    pub fn new(template: &str, prompt: &str) -> Option<Self> {
        let marking = if writes_harmony(template) {
            Marking::Harmony(HarmonyReply::after(prompt))
        } else if template.contains("<think>") {
            Marking::Think {
                inside: prompt.trim_end().ends_with("<think>"),
            }
        } else {
            return None;
        };
        Some(Self {
            marking,
            reasoned: false,
            answering: false,
        })
    }

    /// One token of the reply: `raw` its text with special tokens kept, `text` what it made
    /// final of the reply's text. Returns its part, and its text as the answer takes it (from
    /// the answer's first visible character when reasoning came before).
    pub fn take<'a>(&mut self, raw: &str, text: &'a str) -> (Part, &'a str) {
        let part = self.route(raw);
        // An empty `<think></think>` is reasoning too: blank lines follow it.
        self.reasoned |= part == Part::Reasoning || raw.trim() == "</think>";
        if part != Part::Answer || self.answering {
            return (part, text);
        }
        let text = if self.reasoned {
            text.trim_start()
        } else {
            text
        };
        self.answering = !text.is_empty();
        (part, text)
    }

    /// Whether the answer may hold tool calls in the template's own syntax (`<think>`-marked
    /// replies), rather than in messages of their own (Harmony).
    pub fn calls_in_answer(&self) -> bool {
        matches!(self.marking, Marking::Think { .. })
    }

    /// The part of `raw` (the whole reply with special tokens) where its calls are: after the
    /// reasoning, so that a call the model only thought about is not taken for one.
    pub fn calls_in<'a>(&self, raw: &'a str) -> &'a str {
        match self.marking {
            Marking::Harmony(_) => raw,
            // The first `</think>`: one the answer writes later is text.
            Marking::Think { .. } => match raw.find("</think>") {
                Some(at) => &raw[at + "</think>".len()..],
                None if self.reasoned => "",
                None => raw,
            },
        }
    }

    /// The part `raw` (one token's text with special tokens kept) belongs to.
    fn route(&mut self, raw: &str) -> Part {
        match &mut self.marking {
            Marking::Harmony(reply) => reply.route(raw),
            Marking::Think { inside } => match raw.trim() {
                "<think>" => {
                    *inside = true;
                    Part::Structure
                }
                "</think>" => {
                    *inside = false;
                    Part::Structure
                }
                _ if *inside => Part::Reasoning,
                _ => Part::Answer,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_tags_divide_reasoning_from_the_answer() {
        let template = "{{ '<think>' + reasoning_content + '</think>' }}";
        let mut parts = ReplyParts::new(template, "<|im_start|>assistant\n").unwrap();
        let routed: Vec<(Part, &str)> = ["<think>", "Hmm", "</think>", "\n\n", " Hi", " there"]
            .iter()
            .map(|t| parts.take(t, t))
            .collect();
        use Part::*;
        assert_eq!(
            routed,
            [
                (Structure, "<think>"),
                (Reasoning, "Hmm"),
                (Structure, "</think>"),
                (Answer, ""),
                (Answer, "Hi"),
                (Answer, " there")
            ]
        );
        // A template that opens the reasoning itself: the reply starts inside it.
        let mut parts = ReplyParts::new(template, "<|im_start|>assistant\n<think>\n").unwrap();
        assert_eq!(parts.take("Hmm", "Hmm").0, Reasoning);
        assert_eq!(parts.take("</think>", "").0, Structure);
        assert_eq!(parts.take("Hi", "Hi"), (Answer, "Hi"));
        assert!(ReplyParts::new("{{ messages }}", "").is_none());
    }

    #[test]
    fn an_answer_without_reasoning_keeps_its_leading_blanks() {
        // A template that only mentions <think> (to strip it from history): nothing reasoned.
        let mut parts = ReplyParts::new("{{ '<think>' }}", "assistant\n").unwrap();
        assert_eq!(
            parts.take("    x = 1", "    x = 1"),
            (Part::Answer, "    x = 1")
        );
    }

    #[test]
    fn calls_are_read_after_the_reasoning() {
        let parts = ReplyParts::new("{{ '<think>' }}", "").unwrap();
        let raw = "<think>maybe <tool_call>{}</tool_call></think>\n<tool_call>{}</tool_call>";
        assert_eq!(parts.calls_in(raw), "\n<tool_call>{}</tool_call>");
        // A `</think>` the answer writes is text.
        let raw = "<think>x</think>\n<tool_call>{\"a\": \"</think>\"}</tool_call>";
        assert_eq!(
            parts.calls_in(raw),
            "\n<tool_call>{\"a\": \"</think>\"}</tool_call>"
        );
    }

    #[test]
    fn an_empty_think_block_is_reasoning_too() {
        let mut parts = ReplyParts::new("{{ '<think>' }}", "").unwrap();
        parts.take("<think>", "");
        parts.take("</think>", "");
        assert_eq!(parts.take("\n\n", "\n\n"), (Part::Answer, ""));
        assert_eq!(parts.take("Hi", "Hi"), (Part::Answer, "Hi"));
    }
}
