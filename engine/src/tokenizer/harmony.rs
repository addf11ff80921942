//! gpt-oss's Harmony replies. A reply is a run of messages, each a header and a body:
//! `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>`.
//! The `analysis` channel is the model's reasoning, `commentary` carries tool calls (its header
//! names the recipient, `to=functions.NAME`) and preambles to the user, `final` the answer.
//! [`HarmonyReply`] tells, token by token, which of these the text belongs to.

use super::reasoning::Part;

/// Where a Harmony reply is: in a header (after `<|start|>`, and at the start of the reply, the
/// prompt having opened `<|start|>assistant`), or in the body of a message of some part.
#[derive(Debug)]
pub struct HarmonyReply {
    body: Option<Part>,
    header: String,
}

impl Default for HarmonyReply {
    fn default() -> Self {
        Self::new()
    }
}

impl HarmonyReply {
    /// A reply about to start: the prompt ends in `<|start|>assistant`.
    pub fn new() -> Self {
        Self {
            body: None,
            header: String::new(),
        }
    }

    /// A reply after a prompt ending in `prompt_tail`: in the header it opened, or inside the
    /// message it opened when it ends in `<|message|>` (a prefilled channel).
    pub fn after(prompt_tail: &str) -> Self {
        let mut reply = Self::new();
        if let Some(opened) = prompt_tail.strip_suffix("<|message|>") {
            let header = opened.rsplit("<|start|>").next().unwrap_or(opened);
            reply.body = Some(part_of(header));
        }
        reply
    }

    /// The part `raw` (one token's text with special tokens kept) belongs to.
    pub fn route(&mut self, raw: &str) -> Part {
        match raw {
            "<|start|>" | "<|end|>" | "<|return|>" | "<|call|>" => {
                self.body = None;
                self.header.clear();
                Part::Structure
            }
            "<|message|>" => {
                self.body = Some(part_of(&self.header));
                self.header.clear();
                Part::Structure
            }
            _ => match self.body {
                Some(part) => part,
                None => {
                    self.header.push_str(raw);
                    Part::Structure
                }
            },
        }
    }
}

/// The part a message's body is, from its header (`assistant<|channel|>commentary to=… …`).
fn part_of(header: &str) -> Part {
    let channel = header
        .split("<|channel|>")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    if header.contains("to=") {
        Part::Call
    } else if channel == "analysis" {
        Part::Reasoning
    } else {
        Part::Answer
    }
}

/// Whether `template` (a chat template's source) writes Harmony.
pub fn writes_harmony(template: &str) -> bool {
    template.contains("<|channel|>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(tokens: &[&str]) -> Vec<Part> {
        let mut reply = HarmonyReply::new();
        tokens.iter().map(|t| reply.route(t)).collect()
    }

    #[test]
    fn a_prompt_that_opens_the_answer_starts_inside_it() {
        let mut reply = HarmonyReply::after("<|start|>assistant<|channel|>final<|message|>");
        assert_eq!(reply.route("Hi"), Part::Answer);
        let mut reply = HarmonyReply::after("<|start|>assistant");
        assert_eq!(reply.route("Hi"), Part::Structure);
    }

    #[test]
    fn reasoning_answer_and_call_are_told_apart() {
        use Part::*;
        assert_eq!(
            parts(&[
                "<|channel|>",
                "analysis",
                "<|message|>",
                "Think",
                "<|end|>",
                "<|start|>",
                "assistant",
                "<|channel|>",
                "final",
                "<|message|>",
                "Hi",
                "!",
                "<|return|>",
            ]),
            [
                Structure, Structure, Structure, Reasoning, Structure, Structure, Structure,
                Structure, Structure, Structure, Answer, Answer, Structure
            ]
        );
        assert_eq!(
            parts(&[
                "<|channel|>",
                "comment",
                "ary",
                " to",
                "=functions",
                ".get",
                "_weather",
                " ",
                "<|constrain|>",
                "json",
                "<|message|>",
                "{\"",
                "<|call|>",
            ])[10..],
            [Structure, Call, Structure]
        );
        // A preamble: commentary to no one is for the user.
        assert_eq!(
            parts(&["<|channel|>", "commentary", "<|message|>", "Checking"])[3],
            Answer
        );
    }
}
