//! The chat templates of gpt-oss (Harmony) and GLM-4.6 as their checkpoints ship them, rendered
//! by the engine against transformers' renderings (tests/fixtures/templates/refs.json, made by
//! scripts/make_template_refs.py): tools, tool calls and results, several turns. The template
//! files and the gpt-oss tokenizer are fetched by scripts/setup.sh (fetch-llama-vocabs.sh,
//! fetch-tokenizers.sh); without them these tests fail rather than skip.

mod common;

use std::path::PathBuf;

use odmoe_engine::tokenizer::Tokenizer;
use serde_json::{Map, Value};

fn refs() -> Value {
    let path = common::fixture("templates/refs.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn template_file(file: &str) -> PathBuf {
    let path = common::fetched("ODMOE_LLAMA_VOCABS_DIR", "llama-vocabs")
        .join("templates")
        .join(file);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-llama-vocabs.sh (scripts/setup.sh runs it)",
        path.display()
    );
    path
}

/// A model directory of the gpt-oss tokenizer with `template` as its `chat_template.jinja`.
fn gpt_oss_dir(template: &str) -> tempfile::TempDir {
    let tokenizer = common::fetched("ODMOE_TOKENIZERS_DIR", "tokenizers").join("gptoss");
    let dir = tempfile::tempdir().unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let from = tokenizer.join(file);
        assert!(
            from.exists(),
            "{} is missing: run scripts/fetch-tokenizers.sh gptoss (scripts/setup.sh runs it)",
            from.display()
        );
        std::os::unix::fs::symlink(&from, dir.path().join(file)).unwrap();
    }
    std::fs::copy(
        template_file(template),
        dir.path().join("chat_template.jinja"),
    )
    .unwrap();
    dir
}

/// `text` with the date gpt-oss's template prints (the day it is rendered) masked.
fn dateless(text: &str) -> String {
    match text.find("Current date: ") {
        Some(at) => {
            let start = at + "Current date: ".len();
            format!("{}YYYY-MM-DD{}", &text[..start], &text[start + 10..])
        }
        None => text.to_string(),
    }
}

fn renders_as_transformers(name: &str) {
    let refs = refs();
    let entry = &refs["templates"][name];
    let dir = gpt_oss_dir(entry["file"].as_str().unwrap());
    // Read from chat_template.jinja beside the tokenizer, as checkpoints ship it.
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let template = tokenizer
        .chat_template()
        .expect("chat_template.jinja is read");
    for (conversation, case) in entry["conversations"].as_object().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        let tools = Some(&case["tools"]).filter(|t| !t.is_null());
        let rendered = template
            .render(messages, tools, true, &Map::new())
            .unwrap_or_else(|e| panic!("{name}/{conversation}: {e}"));
        assert_eq!(
            dateless(&rendered),
            dateless(case["rendered"].as_str().unwrap()),
            "{name}/{conversation}"
        );
    }
}

#[test]
fn gpt_oss_harmony_renders_as_transformers() {
    renders_as_transformers("gpt-oss");
}

#[test]
fn glm_renders_as_transformers() {
    renders_as_transformers("glm-4.6");
}

#[test]
fn harmony_markers_are_single_tokens() {
    let dir = gpt_oss_dir("openai-gpt-oss-120b.jinja");
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let ids = tokenizer
        .encode(
            "<|start|>assistant<|channel|>final<|message|>Hi<|return|>",
            false,
        )
        .unwrap();
    assert_eq!(ids[0], 200006, "<|start|>");
    assert!(ids.contains(&200005) && ids.contains(&200008), "{ids:?}");
    assert_eq!(*ids.last().unwrap(), 200002, "<|return|>");
    // A reply ends at an answer's <|return|> or a tool call's <|call|>, not at <|end|>.
    assert_eq!(tokenizer.eos_token_ids(), [200002, 200012]);
}
