//! Conversations as the chat template reads them (transformers' convention:
//! `role`, `content` as text, `tool_calls` with arguments as objects, tool
//! results as `tool` messages), from OpenAI's and Anthropic's shapes, and
//! tools as OpenAI's function list, which the templates read.

use serde_json::{Map, Value, json};

/// OpenAI's `messages`, for the template: content parts joined into text, and
/// tool-call arguments (a JSON string on the wire) as objects.
pub fn from_openai(messages: Vec<Value>) -> Result<Vec<Value>, String> {
    if messages.is_empty() {
        return Err("messages: must hold at least one message".into());
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            let Value::Object(mut message) = message else {
                return Err(format!("messages[{index}]: must be an object"));
            };
            if !message.get("role").is_some_and(Value::is_string) {
                return Err(format!("messages[{index}].role: missing"));
            }
            let content = message.remove("content").unwrap_or(Value::Null);
            let content = openai_text(content).map_err(|e| format!("messages[{index}].{e}"))?;
            message.insert("content".into(), Value::String(content));
            if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
                for call in calls {
                    if let Some(arguments) = call.pointer_mut("/function/arguments")
                        && let Value::String(text) = arguments
                    {
                        *arguments =
                            serde_json::from_str(text).unwrap_or(Value::Object(Map::new()));
                    }
                }
            }
            Ok(Value::Object(message))
        })
        .collect()
}

/// A message's content as text: a string, null, or text parts.
fn openai_text(content: Value) -> Result<String, String> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => part
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| "content: a text part without text".to_owned()),
                Some(other) => Err(format!(
                    "content: `{other}` parts are not supported; this model reads text"
                )),
                None => Err("content: a part without a type".to_owned()),
            })
            .collect(),
        _ => Err("content: must be a string or a list of parts".into()),
    }
}

/// Anthropic's `system` and `messages`, for the template: text blocks joined, `tool_use`
/// blocks as the assistant's `tool_calls`, `tool_result` blocks as `tool` messages, the
/// assistant's `thinking` blocks as its `reasoning_content`.
pub fn from_anthropic(system: Option<Value>, messages: Vec<Value>) -> Result<Vec<Value>, String> {
    if messages.is_empty() {
        return Err("messages: must hold at least one message".into());
    }
    let mut conversation = Vec::new();
    if let Some(system) = system {
        let text = anthropic_text(&system).map_err(|e| format!("system: {e}"))?;
        if !text.is_empty() {
            conversation.push(json!({"role": "system", "content": text}));
        }
    }
    for (index, message) in messages.iter().enumerate() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .filter(|role| matches!(*role, "user" | "assistant"))
            .ok_or_else(|| format!("messages[{index}].role: must be `user` or `assistant`"))?;
        let content = message.get("content").unwrap_or(&Value::Null);
        let blocks: Vec<Value> = match content {
            Value::String(text) => vec![json!({"type": "text", "text": text})],
            Value::Array(blocks) => blocks.clone(),
            _ => {
                return Err(format!(
                    "messages[{index}].content: must be a string or a list of blocks"
                ));
            }
        };
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut calls = Vec::new();
        for (at, block) in blocks.iter().enumerate() {
            let place = format!("messages[{index}].content[{at}]");
            match block.get("type").and_then(Value::as_str) {
                Some("text") => {
                    text.push_str(block.get("text").and_then(Value::as_str).unwrap_or(""))
                }
                // An earlier reply's reasoning, sent back as clients keep it: the template's
                // `reasoning_content`, which templates that show past reasoning read.
                Some("thinking") if role == "assistant" => {
                    reasoning.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""))
                }
                Some("redacted_thinking") if role == "assistant" => {}
                Some("tool_use") => calls.push(json!({
                    "id": block.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": block.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": block.get("input").cloned().unwrap_or(json!({})),
                    },
                })),
                Some("tool_result") => {
                    let result = block.get("content").unwrap_or(&Value::Null);
                    let result =
                        anthropic_text(result).map_err(|e| format!("{place}.content: {e}"))?;
                    conversation.push(json!({
                        "role": "tool",
                        "tool_call_id": block.get("tool_use_id").cloned().unwrap_or(Value::Null),
                        "content": result,
                    }));
                }
                Some(other) => {
                    return Err(format!(
                        "{place}: `{other}` blocks are not supported; this model reads text and tools"
                    ));
                }
                None => return Err(format!("{place}: a block without a type")),
            }
        }
        if !text.is_empty() || !calls.is_empty() || !reasoning.is_empty() {
            let mut message = json!({"role": role, "content": text});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            if !reasoning.is_empty() {
                message["reasoning_content"] = Value::String(reasoning);
            }
            conversation.push(message);
        }
    }
    Ok(conversation)
}

/// Text of a string or a list of text blocks.
fn anthropic_text(value: &Value) -> Result<String, String> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .map(|block| match block.get("type").and_then(Value::as_str) {
                Some("text") => Ok(block
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()),
                other => Err(format!(
                    "`{}` blocks are not supported here; send text",
                    other.unwrap_or("untyped")
                )),
            })
            .collect(),
        _ => Err("must be a string or a list of text blocks".into()),
    }
}

/// Anthropic's tools (`name`, `description`, `input_schema`) as the function list templates read.
pub fn anthropic_tools(tools: &[Value]) -> Result<Value, String> {
    tools
        .iter()
        .enumerate()
        .map(|(index, tool)| {
            let name = tool
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("tools[{index}].name: missing"))?;
            Ok(json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": tool.get("description").cloned().unwrap_or(Value::String(String::new())),
                    "parameters": tool.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
                },
            }))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_parts_are_joined_and_arguments_become_objects() {
        let messages = from_openai(vec![
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
            ]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "42"}),
        ])
        .unwrap();
        assert_eq!(messages[0]["content"], "ab");
        assert_eq!(messages[1]["content"], "");
        assert_eq!(
            messages[1]["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        assert_eq!(messages[2]["role"], "tool");
        let error = from_openai(vec![
            json!({"role": "user", "content": [{"type": "image_url"}]}),
        ]);
        assert!(
            error
                .unwrap_err()
                .contains("messages[0].content: `image_url`")
        );
    }

    #[test]
    fn anthropic_blocks_become_template_messages() {
        let messages = from_anthropic(
            Some(json!([{"type": "text", "text": "Be brief."}])),
            vec![
                json!({"role": "user", "content": "Weather?"}),
                json!({"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Need the weather.", "signature": ""},
                    {"type": "redacted_thinking", "data": "..."},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}
                ]}),
                json!({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}
                ]}),
            ],
        )
        .unwrap();
        let roles: Vec<_> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(
            messages[2]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
        assert_eq!(messages[2]["reasoning_content"], "Need the weather.");
        assert_eq!(messages[3]["content"], "sunny");
        assert_eq!(messages[3]["tool_call_id"], "t1");
        // Thinking is the assistant's: in a user's message it is refused, by name.
        let error = from_anthropic(
            None,
            vec![json!({"role": "user", "content": [{"type": "thinking", "thinking": "x"}]})],
        );
        assert!(
            error
                .unwrap_err()
                .contains("messages[0].content[0]: `thinking`")
        );
    }
}
