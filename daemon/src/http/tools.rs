//! Tool calls in a model's reply, in the syntax its chat template teaches it.
//!
//! Each template family writes calls its own way; the family is recognised from the template's
//! source, and a reply is parsed back into calls with JSON arguments. A reply that does not
//! parse stays text: a model that meant to call a tool and wrote nonsense is shown as it wrote it.

use serde_json::{Map, Value};

/// How a template family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// Qwen2, Qwen3 and Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
    Hermes,
    /// gpt-oss's Harmony: a message on the commentary channel to `functions.NAME`, its body
    /// the JSON arguments: `<|channel|>commentary to=functions.NAME <|constrain|>json
    /// <|message|>{...}<|call|>`.
    Harmony,
    /// GLM-4.5 to 4.7: `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`,
    /// each value as text when it is a string and as JSON otherwise: which of the two a value
    /// is, only the tool's schema tells (`"123"` and `123` are written alike).
    Glm,
    /// Mistral and Mixtral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`, or in newer
    /// templates `[TOOL_CALLS]name[ARGS]{...}`.
    Mistral,
    /// DeepSeek-V3: `<｜tool▁call▁begin｜>function<｜tool▁sep｜>name` and the arguments in a
    /// fenced JSON block, or (V3.1) `<｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}`.
    DeepSeek,
    /// Kimi-K2: `<|tool_call_begin|>functions.name:0<|tool_call_argument_begin|>{...}`.
    Kimi,
    /// Llama 3.1 and later: the whole reply is `{"name": ..., "parameters": {...}}`.
    Llama3,
}

/// One call the model asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

impl ToolSyntax {
    /// The syntax `template` (a chat template's source) teaches, if it renders tools at all.
    pub fn of_template(template: &str) -> Option<ToolSyntax> {
        if odmoe_engine::tokenizer::harmony::writes_harmony(template) {
            return Some(ToolSyntax::Harmony);
        }
        [
            // Before Hermes: GLM's templates write `<tool_call>` too.
            ("<arg_key>", ToolSyntax::Glm),
            ("<tool_call>", ToolSyntax::Hermes),
            ("[TOOL_CALLS]", ToolSyntax::Mistral),
            ("tool▁call▁begin", ToolSyntax::DeepSeek),
            ("<|tool_call_begin|>", ToolSyntax::Kimi),
            ("<|python_tag|>", ToolSyntax::Llama3),
            ("ipython", ToolSyntax::Llama3),
        ]
        .into_iter()
        .find(|(mark, _)| template.contains(mark))
        .map(|(_, syntax)| syntax)
    }

    /// The text that opens the calls: the reply's text before it is the model's message.
    pub fn opening(self) -> &'static str {
        match self {
            ToolSyntax::Hermes | ToolSyntax::Glm => "<tool_call>",
            ToolSyntax::Harmony => "to=functions.",
            ToolSyntax::Mistral => "[TOOL_CALLS]",
            ToolSyntax::DeepSeek => "<｜tool▁call",
            ToolSyntax::Kimi => "<|tool_call",
            ToolSyntax::Llama3 => "{",
        }
    }

    /// Where the calls start in `reply`, if they have begun. Llama 3 calls are the whole reply,
    /// so only a reply that starts with `{` (or the python tag) holds one.
    pub fn start(self, reply: &str) -> Option<usize> {
        if self == ToolSyntax::Llama3 {
            let trimmed = reply.trim_start();
            let start = reply.len() - trimmed.len();
            return (trimmed.starts_with('{') || trimmed.starts_with("<|python_tag|>"))
                .then_some(start);
        }
        reply.find(self.opening())
    }

    /// How many bytes at the end of `reply` could be the beginning of the opening, and must be
    /// held back from a stream until the next token tells.
    pub fn held_back(self, reply: &str) -> usize {
        if self == ToolSyntax::Llama3 {
            // Until the reply's first character shows, it could open a call.
            return if reply.trim().is_empty() {
                reply.len()
            } else {
                0
            };
        }
        let opening = self.opening();
        (1..opening.len().min(reply.len() + 1))
            .rev()
            .find(|&n| {
                reply.is_char_boundary(reply.len() - n)
                    && opening.starts_with(&reply[reply.len() - n..])
            })
            .unwrap_or(0)
    }

    /// The calls in `reply` (the model's text with special tokens kept) and the text before
    /// them; `None` when it holds no call that parses. `offered` is the request's tools (in
    /// OpenAI's form), whose schemas type the arguments of syntaxes that write them as text.
    pub fn parse(self, reply: &str, offered: &[Value]) -> Option<(String, Vec<ToolCall>)> {
        let start = self.start(reply)?;
        let (text, calls) = reply.split_at(start);
        let calls = match self {
            ToolSyntax::Hermes => hermes(calls),
            ToolSyntax::Glm => glm(calls, offered),
            ToolSyntax::Harmony => harmony(calls),
            ToolSyntax::Mistral => mistral(calls),
            ToolSyntax::DeepSeek => deepseek(calls),
            ToolSyntax::Kimi => kimi(calls),
            ToolSyntax::Llama3 => llama3(calls),
        }?;
        (!calls.is_empty()).then(|| (text.trim_end().to_owned(), calls))
    }
}

/// A call from a JSON object with `name` and `arguments` (or `parameters`); arguments given as
/// a JSON string are read as JSON.
fn call_of(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = value
        .get("arguments")
        .or_else(|| value.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    Some(ToolCall {
        name,
        arguments: arguments_object(arguments)?,
    })
}

/// Arguments as a JSON object: an object as it is, a string holding one parsed.
fn arguments_object(arguments: Value) -> Option<Value> {
    match arguments {
        Value::Object(_) => Some(arguments),
        Value::String(text) => serde_json::from_str::<Value>(text.trim())
            .ok()
            .filter(Value::is_object),
        _ => None,
    }
}

/// The first JSON value in `text` (after leading blanks) and the text after it.
fn json_prefix(text: &str) -> Option<(Value, &str)> {
    let text = text.trim_start();
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, &text[values.byte_offset()..]))
}

fn hermes(mut text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    while let Some(rest) = text.trim_start().strip_prefix("<tool_call>") {
        let (value, rest) = json_prefix(rest)?;
        calls.push(call_of(&value)?);
        let rest = rest.trim_start();
        text = rest.strip_prefix("</tool_call>").unwrap_or(rest);
    }
    Some(calls)
}

fn harmony(text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    for part in text.split("to=functions.").skip(1) {
        let end = part
            .find(|c: char| c.is_whitespace() || c == '<')
            .unwrap_or(part.len());
        let name = &part[..end];
        let body = part.split_once("<|message|>")?.1;
        let body = ["<|call|>", "<|end|>", "<|return|>"]
            .iter()
            .filter_map(|marker| body.find(marker))
            .min()
            .map_or(body, |at| &body[..at]);
        let (arguments, _) = json_prefix(body)?;
        if name.is_empty() {
            return None;
        }
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: arguments_object(arguments)?,
        });
    }
    Some(calls)
}

fn glm(text: &str, offered: &[Value]) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    for part in text.split("<tool_call>").skip(1) {
        let body = part.split("</tool_call>").next()?;
        let mut pairs = body.split("<arg_key>");
        let name = pairs.next()?.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return None;
        }
        let mut arguments = Map::new();
        for pair in pairs {
            let (key, rest) = pair.split_once("</arg_key>")?;
            let value = rest
                .split_once("<arg_value>")?
                .1
                .split_once("</arg_value>")?
                .0;
            // The template writes strings as they are and anything else as JSON. A value of a
            // parameter the schema declares a string stays the text written, as vLLM reads
            // it; any other is JSON when it parses.
            let key = key.trim();
            let value = match declared_string(offered, name, key) {
                true => Value::String(value.to_owned()),
                false => serde_json::from_str(value.trim())
                    .unwrap_or_else(|_| Value::String(value.to_owned())),
            };
            arguments.insert(key.to_owned(), value);
        }
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: Value::Object(arguments),
        });
    }
    Some(calls)
}

/// Whether the offered tool `tool` declares its parameter `parameter` a string: `"string"`,
/// or a string or null (a list of types, or pydantic's `anyOf` for `Optional[str]`).
fn declared_string(offered: &[Value], tool: &str, parameter: &str) -> bool {
    offered
        .iter()
        .filter_map(|tool| tool.get("function"))
        .find(|function| function.get("name").and_then(Value::as_str) == Some(tool))
        .and_then(|function| {
            function
                .get("parameters")?
                .get("properties")?
                .get(parameter)
        })
        .is_some_and(string_or_null)
}

/// Whether the schema `property` admits strings and, besides, at most null.
fn string_or_null(property: &Value) -> bool {
    let kinds: Vec<&Value> = match (property.get("type"), property.get("anyOf")) {
        (Some(Value::Array(kinds)), _) => kinds.iter().collect(),
        (Some(kind), _) => vec![kind],
        (None, Some(Value::Array(options))) => options
            .iter()
            .filter_map(|option| option.get("type"))
            .collect(),
        _ => return false,
    };
    kinds.iter().any(|kind| *kind == "string")
        && kinds
            .iter()
            .all(|kind| *kind == "string" || *kind == "null")
}

fn mistral(text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    for part in text.split("[TOOL_CALLS]").skip(1) {
        match part.split_once("[ARGS]") {
            Some((name, arguments)) => {
                let (arguments, _) = json_prefix(arguments)?;
                calls.push(ToolCall {
                    name: name.trim().to_owned(),
                    arguments: arguments_object(arguments)?,
                });
            }
            None => match json_prefix(part)?.0 {
                Value::Array(values) => {
                    for value in &values {
                        calls.push(call_of(value)?);
                    }
                }
                value => calls.push(call_of(&value)?),
            },
        }
    }
    Some(calls)
}

fn deepseek(text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    for part in text.split("<｜tool▁call▁begin｜>").skip(1) {
        let body = part.split("<｜tool▁call▁end｜>").next()?;
        let (head, arguments) = body.split_once("<｜tool▁sep｜>")?;
        let (name, arguments) = if head.trim() == "function" {
            // V3: the name on the first line, the arguments in a ```json block.
            let (name, rest) = arguments.split_once('\n')?;
            let rest = rest.trim_start();
            let rest = rest.strip_prefix("```json").unwrap_or(rest);
            (name.trim(), rest.trim_end().trim_end_matches("```"))
        } else {
            (head.trim(), arguments)
        };
        let (arguments, _) = json_prefix(arguments)?;
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: arguments_object(arguments)?,
        });
    }
    Some(calls)
}

fn kimi(text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    for part in text.split("<|tool_call_begin|>").skip(1) {
        let (id, arguments) = part.split_once("<|tool_call_argument_begin|>")?;
        // `functions.NAME:INDEX`
        let name = id.trim().trim_start_matches("functions.");
        let name = name.rsplit_once(':').map_or(name, |(name, _)| name);
        let (arguments, _) = json_prefix(arguments)?;
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: arguments_object(arguments)?,
        });
    }
    Some(calls)
}

fn llama3(text: &str) -> Option<Vec<ToolCall>> {
    let text = text.trim_start();
    let text = text.strip_prefix("<|python_tag|>").unwrap_or(text);
    let mut calls = Vec::new();
    let mut rest = text;
    // Several calls come separated by `;`.
    while !rest.trim().is_empty() {
        let (value, after) = json_prefix(rest)?;
        calls.push(call_of(&value)?);
        rest = after.trim_start().trim_start_matches(';');
    }
    Some(calls)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments,
        }
    }

    #[test]
    fn each_family_is_read_back_into_calls() {
        let weather = call("get_weather", json!({"city": "Paris"}));
        let cases = [
            (
                ToolSyntax::Hermes,
                "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                "Let me look.",
            ),
            (
                ToolSyntax::Harmony,
                "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>",
                "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary",
            ),
            (
                ToolSyntax::Glm,
                "I will check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
                "I will check.",
            ),
            (
                ToolSyntax::Glm,
                "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
                "",
            ),
            (
                ToolSyntax::Mistral,
                "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
                "",
            ),
            (
                ToolSyntax::Mistral,
                "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}",
                "",
            ),
            (
                ToolSyntax::DeepSeek,
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                "",
            ),
            (
                ToolSyntax::DeepSeek,
                "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                "Sure.",
            ),
            (
                ToolSyntax::Kimi,
                "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>",
                "",
            ),
            (
                ToolSyntax::Llama3,
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
                "",
            ),
        ];
        for (syntax, reply, text) in cases {
            let parsed = syntax.parse(reply, &[]);
            assert_eq!(
                parsed,
                Some((text.to_owned(), vec![weather.clone()])),
                "{syntax:?}: {reply}"
            );
        }
    }

    #[test]
    fn several_calls_and_string_arguments() {
        let reply = "<tool_call>{\"name\": \"a\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let (_, calls) = ToolSyntax::Hermes.parse(reply, &[]).unwrap();
        assert_eq!(
            calls,
            vec![call("a", json!({"x": 1})), call("b", json!({}))]
        );
    }

    #[test]
    fn glm_values_are_json_unless_they_are_text() {
        let reply = "<tool_call>book\n<arg_key>nights</arg_key>\n<arg_value>3</arg_value>\n<arg_key>rooms</arg_key>\n<arg_value>[\"a\", \"b\"]</arg_value>\n<arg_key>note</arg_key>\n<arg_value>late arrival</arg_value>\n</tool_call>\n<tool_call>done</tool_call>";
        let (_, calls) = ToolSyntax::Glm.parse(reply, &[]).unwrap();
        assert_eq!(
            calls,
            vec![
                call(
                    "book",
                    json!({"nights": 3, "rooms": ["a", "b"], "note": "late arrival"})
                ),
                call("done", json!({})),
            ]
        );
        assert_eq!(
            ToolSyntax::Glm.parse("<tool_call>two words</tool_call>", &[]),
            None
        );
        assert_eq!(
            ToolSyntax::Glm.parse("<tool_call>f<arg_key>k</arg_key></tool_call>", &[]),
            None
        );
    }

    #[test]
    fn glm_values_take_the_type_the_offered_schema_declares() {
        let offered = [
            json!({"type": "function", "function": {"name": "book", "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string"},
                    "nights": {"type": "integer"},
                    "note": {"type": ["string", "null"]},
                    "rooms": {"type": "array"},
                    "either": {"type": ["string", "integer"]},
                    "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            }}}),
        ];
        let value = |key: &str, text: &str| {
            let reply = format!(
                "<tool_call>book<arg_key>{key}</arg_key><arg_value>{text}</arg_value></tool_call>"
            );
            let (_, calls) = ToolSyntax::Glm.parse(&reply, &offered).unwrap();
            calls[0].arguments[key].clone()
        };
        // Declared strings stay as written, whitespace and all, even where they read as JSON.
        assert_eq!(value("code", "123"), json!("123"));
        assert_eq!(value("note", "{\"a\": 1}"), json!("{\"a\": 1}"));
        assert_eq!(value("code", "\n two lines\n"), json!("\n two lines\n"));
        assert_eq!(value("maybe", "42"), json!("42"));
        // Other types, types the schema leaves open and undeclared parameters read as JSON.
        assert_eq!(value("nights", "3"), json!(3));
        assert_eq!(value("rooms", "[\"a\"]"), json!(["a"]));
        assert_eq!(value("either", "7"), json!(7));
        assert_eq!(value("extra", "true"), json!(true));
        // Without the schema, as before: JSON when it parses.
        let reply = "<tool_call>book<arg_key>code</arg_key><arg_value>123</arg_value></tool_call>";
        let (_, calls) = ToolSyntax::Glm.parse(reply, &[]).unwrap();
        assert_eq!(calls[0].arguments, json!({"code": 123}));
    }

    #[test]
    fn replies_without_a_call_that_parses_stay_text() {
        assert_eq!(ToolSyntax::Hermes.parse("Paris is sunny.", &[]), None);
        assert_eq!(
            ToolSyntax::Hermes.parse("<tool_call>{\"name\": ", &[]),
            None
        );
        assert_eq!(ToolSyntax::Llama3.parse("The answer is {1, 2}.", &[]), None);
        assert_eq!(ToolSyntax::Llama3.parse("{\"x\": 1}", &[]), None);
    }

    #[test]
    fn a_partial_opening_is_held_back() {
        assert_eq!(ToolSyntax::Hermes.held_back("Look <tool_"), 6);
        assert_eq!(ToolSyntax::Hermes.held_back("Look <"), 1);
        assert_eq!(ToolSyntax::Hermes.held_back("Look"), 0);
        assert_eq!(ToolSyntax::Llama3.held_back("  "), 2);
        assert_eq!(ToolSyntax::Llama3.held_back("Hi"), 0);
    }

    #[test]
    fn families_are_known_by_their_templates() {
        let qwen = "{%- if tools %}...<tool_call>\\n{\"name\": <function-name>}...";
        assert_eq!(ToolSyntax::of_template(qwen), Some(ToolSyntax::Hermes));
        let harmony = "{{- \"<|start|>assistant<|channel|>final<|message|>\" }}";
        assert_eq!(ToolSyntax::of_template(harmony), Some(ToolSyntax::Harmony));
        let glm = "<tool_call>{{ tc.name }}\n{% for k, v in tc.arguments.items() %}<arg_key>{{ k }}</arg_key>";
        assert_eq!(ToolSyntax::of_template(glm), Some(ToolSyntax::Glm));
        assert_eq!(
            ToolSyntax::of_template("{{ '[TOOL_CALLS]' }}"),
            Some(ToolSyntax::Mistral)
        );
        assert_eq!(
            ToolSyntax::of_template("<|start_header_id|>ipython<|end_header_id|>"),
            Some(ToolSyntax::Llama3)
        );
        assert_eq!(ToolSyntax::of_template("{{ messages }}"), None);
    }
}
