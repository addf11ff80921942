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
pub struct ReplyParts(Marking);

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
        if writes_harmony(template) {
            return Some(Self(Marking::Harmony(HarmonyReply::new())));
        }
        template.contains("<think>").then(|| {
            Self(Marking::Think {
                inside: prompt.trim_end().ends_with("<think>"),
            })
        })
    }

    /// The part `raw` (one token's text with special tokens kept) belongs to.
    pub fn route(&mut self, raw: &str) -> Part {
        match &mut self.0 {
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
        let routed: Vec<Part> = ["<think>", "Hmm", "</think>", "\n\n", "Hi"]
            .iter()
            .map(|t| parts.route(t))
            .collect();
        use Part::*;
        assert_eq!(routed, [Structure, Reasoning, Structure, Answer, Answer]);
        // A template that opens the reasoning itself: the reply starts inside it.
        let mut parts = ReplyParts::new(template, "<|im_start|>assistant\n<think>\n").unwrap();
        assert_eq!(parts.route("Hmm"), Reasoning);
        assert_eq!(parts.route("</think>"), Structure);
        assert_eq!(parts.route("Hi"), Answer);
        assert!(ReplyParts::new("{{ messages }}", "").is_none());
    }
}
