//! Tokenizers and chat templates against references recorded from Python (`tokenizers` 0.23.3 for
//! ids and decoding, transformers 5.23 `apply_chat_template` for renderings; see
//! scripts/make_tokenizer_refs.py and tests/fixtures/tokenizer_refs.json), streaming
//! detokenization, the fixture tokenizer against its goldens, and load and render errors.
//!
//! The real tokenizers are not committed: scripts/fetch-tokenizers.sh puts them in
//! `${ODMOE_TOKENIZERS_DIR:-$HOME/.cache/odmoe/tokenizers}`. Without them the tests that need them
//! fail instead of skipping, so that a run which forgot the fetch cannot pass without checking
//! anything.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use odmoe_engine::Error;
use odmoe_engine::tokenizer::{ChatMessage, ChatTemplate, DecodeStream, Tokenizer};
use serde_json::{Map, Value};

/// The tokenizers of tokenizer_refs.json, in its order.
const REAL: [&str; 4] = ["qwen3", "deepseek_v3", "llama3", "llama2"];
/// The fixture checkpoints; they share one small byte-level BPE tokenizer.
const FIXTURES: [&str; 3] = ["qwen2_moe", "qwen3_moe", "mixtral"];
const FFFD: char = '\u{FFFD}';

fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn refs() -> &'static Value {
    static REFS: OnceLock<Value> = OnceLock::new();
    REFS.get_or_init(|| {
        let path = repo_path("tests/fixtures/tokenizer_refs.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

fn entry(name: &str) -> &'static Value {
    &refs()["tokenizers"][name]
}

/// The cached files of a real tokenizer; panics (never skips) when they are absent or are not the
/// files the references were recorded from.
fn real_dir(name: &str) -> PathBuf {
    let root = common::fetched("ODMOE_TOKENIZERS_DIR", "tokenizers");
    let dir = root.join(name);
    for (file, meta) in entry(name)["files"].as_object().unwrap() {
        let path = dir.join(file);
        let Ok(metadata) = std::fs::metadata(&path) else {
            panic!(
                "{} is missing: run scripts/fetch-tokenizers.sh first (it fills {}; set \
                 ODMOE_TOKENIZERS_DIR to use another directory)",
                path.display(),
                root.display()
            );
        };
        let bytes = meta["bytes"].as_u64().unwrap();
        assert_eq!(
            metadata.len(),
            bytes,
            "{} has {} bytes, the references were made from {bytes}: run \
             scripts/fetch-tokenizers.sh --force {name}",
            path.display(),
            metadata.len()
        );
    }
    dir
}

fn load_real(name: &str) -> Tokenizer {
    Tokenizer::from_dir(&real_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn fixture_dir(name: &str) -> PathBuf {
    repo_path("tests/fixtures").join(name)
}

fn json_ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|id| id.as_u64().expect("an id") as u32)
        .collect()
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value}"))
}

/// Where two strings first differ, with context, for a readable failure.
fn first_difference(expected: &str, actual: &str) -> String {
    let mut at = expected
        .bytes()
        .zip(actual.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    while !expected.is_char_boundary(at) {
        at -= 1;
    }
    let before: Vec<char> = expected[..at].chars().rev().take(40).collect();
    let before: String = before.into_iter().rev().collect();
    let expected_rest: String = expected[at..].chars().take(80).collect();
    let actual_rest: String = actual[at..].chars().take(80).collect();
    format!(
        "first difference at byte {at}, after {before:?}\n      expected {expected_rest:?}\n      \
         actual   {actual_rest:?}"
    )
}

/// Panics listing every failure, so that one run shows all the cases that differ.
fn assert_no_failures(what: &str, total: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Real tokenizers

/// Every tokenizer of the references has tests below.
#[test]
fn references_cover_the_tested_tokenizers() {
    let names: Vec<&str> = refs()["tokenizers"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names, REAL);
}

fn check_encode_decode(name: &str) {
    let tokenizer = load_real(name);
    let cases = entry(name)["encode"].as_array().unwrap();
    assert!(cases.len() >= 10, "{name}: too few encode cases");
    let mut failures = Vec::new();
    let mut checks = 0;
    for case in cases {
        let case_name = str_of(case, "name");
        let text = str_of(case, "text");
        // Where transformers' own tokenizer class differs (llama2's LlamaTokenizer rebuilds the
        // pre-tokenizer, so leading spaces are handled differently), the case records that under
        // "transformers"; the reference stays the `tokenizers` value because we load
        // tokenizer.json exactly as the `tokenizers` library does.
        for (key, add_special) in [("ids", false), ("ids_with_special", true)] {
            checks += 1;
            let expected = json_ids(&case[key]);
            match tokenizer.encode(text, add_special) {
                Ok(ids) if ids == expected => {}
                Ok(ids) => failures.push(format!("  {case_name}/{key}: {ids:?} != {expected:?}")),
                Err(e) => failures.push(format!("  {case_name}/{key}: {e}")),
            }
        }
        checks += 1;
        let expected = str_of(case, "decoded");
        match tokenizer.decode(&json_ids(&case["ids"]), false) {
            Ok(decoded) if decoded == expected => {}
            Ok(decoded) => failures.push(format!(
                "  {case_name}/decoded: {}",
                first_difference(expected, &decoded)
            )),
            Err(e) => failures.push(format!("  {case_name}/decoded: {e}")),
        }
    }
    assert_no_failures(&format!("{name} encode/decode"), checks, &failures);
}

fn case_label(case: &Value) -> String {
    let mut label = format!(
        "{} (add_generation_prompt={}",
        str_of(case, "name"),
        case["add_generation_prompt"]
    );
    if let Some(extra) = case.get("extra_kwargs") {
        label.push_str(&format!(", {extra}"));
    }
    label + ")"
}

fn check_chat(name: &str) {
    let tokenizer = load_real(name);
    let entry = entry(name);
    let Some(cases) = entry["chat"].as_array() else {
        assert!(
            tokenizer.chat_template().is_none(),
            "{name}: the references record no chat template, but one was loaded"
        );
        return;
    };
    assert!(!cases.is_empty(), "{name}: no chat cases");
    // As in production: the template and its special tokens come from tokenizer_config.json.
    let template = tokenizer
        .chat_template()
        .unwrap_or_else(|| panic!("{name}: no chat template loaded from tokenizer_config.json"));
    let embedded = &entry["chat_template"];
    assert_eq!(
        template.source(),
        str_of(embedded, "template"),
        "{name}: tokenizer_config.json's template is not the one the references were made with"
    );
    assert_eq!(
        embedded["uses_strftime_now"], false,
        "{name}: a template printing today's date needs the pinned date handled here"
    );
    // Cross-check: the embedded template with the special tokens transformers passed.
    let special = embedded["context_special_tokens"]
        .as_object()
        .unwrap()
        .clone();
    let cross_check = ChatTemplate::new(str_of(embedded, "template"), special);

    let mut failures = Vec::new();
    let mut checks = 0;
    for case in cases {
        let label = case_label(case);
        let messages = case["messages"].as_array().unwrap();
        let tools = case.get("tools");
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let extra = case
            .get("extra_kwargs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let expected = str_of(case, "rendered");
        for (source, template) in [
            ("tokenizer_config.json", template),
            ("embedded template", &cross_check),
        ] {
            checks += 1;
            match template.render(messages, tools, add_generation_prompt, &extra) {
                Ok(rendered) if rendered == expected => {}
                Ok(rendered) => failures.push(format!(
                    "  {label} via {source}: {}",
                    first_difference(expected, &rendered)
                )),
                Err(e) => failures.push(format!("  {label} via {source}: {e}")),
            }
        }
        checks += 1;
        let expected_ids = json_ids(&case["ids"]);
        match tokenizer.encode(expected, false) {
            Ok(ids) if ids == expected_ids => {}
            Ok(ids) => failures.push(format!(
                "  {label}: rendering encodes to {ids:?}, expected {expected_ids:?}"
            )),
            Err(e) => failures.push(format!("  {label}: {e}")),
        }
    }
    assert_no_failures(&format!("{name} chat template"), checks, &failures);
}

/// What feeding `ids` one at a time through a [`DecodeStream`] showed.
struct Streamed {
    /// Some step returned nothing while the text so far ended inside a character.
    held_incomplete_character: bool,
}

/// Streams `ids` and checks the deltas against the one-shot decode.
fn stream(
    tokenizer: &Tokenizer,
    label: &str,
    ids: &[u32],
    skip_special_tokens: bool,
) -> Result<Streamed, String> {
    let label = format!("{label} (skip_special_tokens={skip_special_tokens})");
    let full = tokenizer
        .decode(ids, skip_special_tokens)
        .map_err(|e| format!("{label}: {e}"))?;
    let mut stream = DecodeStream::new(tokenizer, skip_special_tokens);
    let mut text = String::new();
    let mut held_incomplete_character = false;
    for (i, &id) in ids.iter().enumerate() {
        let delta = stream.step(id).map_err(|e| format!("{label}: {e}"))?;
        match delta {
            Some(delta) => {
                if delta.contains(FFFD) && !full.contains(FFFD) {
                    return Err(format!("{label}: step {i} emitted {delta:?}"));
                }
                text.push_str(&delta);
            }
            None => {
                let so_far = tokenizer
                    .decode(&ids[..=i], skip_special_tokens)
                    .map_err(|e| format!("{label}: {e}"))?;
                held_incomplete_character |= so_far.ends_with(FFFD) && !full.contains(FFFD);
            }
        }
    }
    if let Some(rest) = stream.flush().map_err(|e| format!("{label}: {e}"))? {
        if rest.contains(FFFD) && !full.contains(FFFD) {
            return Err(format!("{label}: flush emitted {rest:?}"));
        }
        text.push_str(&rest);
    }
    if text != full {
        return Err(format!("{label}: {}", first_difference(&full, &text)));
    }
    Ok(Streamed {
        held_incomplete_character,
    })
}

/// Streams every id list both with and without special tokens; returns the number of checks and
/// whether the "emoji" case held back an incomplete character at some step.
fn check_streams<'a>(
    tokenizer: &Tokenizer,
    cases: impl IntoIterator<Item = (&'a str, Vec<u32>)>,
    failures: &mut Vec<String>,
) -> (usize, bool) {
    let mut checks = 0;
    let mut emoji_held = false;
    for (label, ids) in cases {
        for skip in [false, true] {
            checks += 1;
            match stream(tokenizer, label, &ids, skip) {
                Ok(streamed) => {
                    emoji_held |= label.starts_with("emoji") && streamed.held_incomplete_character
                }
                Err(e) => failures.push(format!("  {e}")),
            }
        }
    }
    (checks, emoji_held)
}

fn check_streaming(name: &str) {
    let tokenizer = load_real(name);
    let cases = entry(name)["encode"].as_array().unwrap();
    let labelled = cases.iter().flat_map(|case| {
        let case_name = str_of(case, "name");
        [
            (case_name, json_ids(&case["ids"])),
            (case_name, json_ids(&case["ids_with_special"])),
        ]
    });
    let mut failures = Vec::new();
    let (checks, emoji_held) = check_streams(&tokenizer, labelled, &mut failures);
    // All four split an emoji over several tokens (bytes of byte-level BPE, or <0xNN> byte
    // fallback tokens for llama2), so a step must have held back a half character.
    if !emoji_held {
        failures.push("  emoji: no step held back an incomplete character".into());
    }
    assert_no_failures(&format!("{name} streaming"), checks + 1, &failures);
}

macro_rules! real_tokenizer_tests {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn encode_decode() {
                super::check_encode_decode(stringify!($name));
            }
            #[test]
            fn chat_template() {
                super::check_chat(stringify!($name));
            }
            #[test]
            fn streaming() {
                super::check_streaming(stringify!($name));
            }
        }
    )*};
}

real_tokenizer_tests!(qwen3, deepseek_v3, llama3, llama2);

// ---------------------------------------------------------------------------------------------
// Fixture tokenizer

fn golden_ids(fixture: &str, name: &str) -> Vec<u32> {
    let path = fixture_dir(fixture).join("golden.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let tensor = tensors
        .remove(name)
        .unwrap_or_else(|| panic!("{}: no tensor {name}", path.display()));
    tensor
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|id| id as u32)
        .collect()
}

/// The conversation of the goldens and its rendering by transformers, from fixtures.json.
fn fixture_chat() -> (Vec<ChatMessage>, String) {
    let path = repo_path("tests/fixtures/fixtures.json");
    let fixtures: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tokenizer = &fixtures["tokenizer"];
    let messages = serde_json::from_value(tokenizer["chat_messages"].clone()).unwrap();
    (messages, str_of(tokenizer, "chat_text").to_string())
}

#[test]
fn fixture_tokenizer_matches_goldens() {
    let (messages, chat_text) = fixture_chat();
    assert_eq!(messages.len(), 4);
    for fixture in FIXTURES {
        let tokenizer = Tokenizer::from_dir(&fixture_dir(fixture)).unwrap();
        assert_eq!(
            tokenizer.encode("The quick brown fox", false).unwrap(),
            golden_ids(fixture, "prompt_ids"),
            "{fixture}: prompt_ids"
        );
        let rendered = tokenizer.apply_chat_template(&messages, true).unwrap();
        assert_eq!(rendered, chat_text, "{fixture}: chat rendering");
        assert_eq!(
            tokenizer.encode(&rendered, false).unwrap(),
            golden_ids(fixture, "chat_ids"),
            "{fixture}: chat_ids of {rendered:?}"
        );
        assert!(
            tokenizer.eos_token_ids().contains(&2),
            "{fixture}: eos ids {:?}",
            tokenizer.eos_token_ids()
        );
    }
}

#[test]
fn fixture_tokenizer_streaming() {
    let tokenizer = Tokenizer::from_dir(&fixture_dir("qwen3_moe")).unwrap();
    // The reference texts, encoded by this 512-token vocabulary, which splits most non-ASCII
    // characters into single bytes, plus the golden chat with its special tokens.
    let texts = entry("qwen3")["encode"].as_array().unwrap();
    let mut cases: Vec<(&str, Vec<u32>)> = texts
        .iter()
        .map(|case| {
            let ids = tokenizer.encode(str_of(case, "text"), false).unwrap();
            (str_of(case, "name"), ids)
        })
        .collect();
    cases.push(("golden chat_ids", golden_ids("qwen3_moe", "chat_ids")));
    let mut failures = Vec::new();
    let (checks, emoji_held) = check_streams(&tokenizer, cases, &mut failures);
    if !emoji_held {
        failures.push("  emoji: no step held back an incomplete character".into());
    }
    assert_no_failures("fixture streaming", checks + 1, &failures);
}

/// Templates exercising the parts of transformers' jinja2 environment that real templates rely on,
/// with the output of transformers 5.23 `render_jinja_template` for the messages below and
/// `add_generation_prompt=True` (recorded with the reference environment of
/// scripts/setup-reference-venv.sh).
const ENVIRONMENT_CASES: [(&str, &str, &str); 11] = [
    (
        "context_defaults",
        r#"{% if tools is not none %}tools{% endif %}|{{ tools is defined }}|{{ tools is none }}|{{ documents is none }}|{{ add_generation_prompt }}"#,
        r#"|True|True|True|True"#,
    ),
    (
        "tojson_default",
        r#"{{ {'b': 1, 'a': [1.5, 'é<>&\'"\\\n\t\x01\x7f😀', none, true, false, -3]} | tojson }}"#,
        "{\"b\": 1, \"a\": [1.5, \"é<>&'\\\"\\\\\\n\\t\\u0001\u{7f}😀\", null, true, false, -3]}",
    ),
    (
        "tojson_floats",
        r#"{{ [1.0, 0.1, -0.0, 1e15, 1e16, 1e-4, 1e-05, 2.5e-7, 123456789.125, 1e100] | tojson }}"#,
        r#"[1.0, 0.1, -0.0, 1000000000000000.0, 1e+16, 0.0001, 1e-05, 2.5e-07, 123456789.125, 1e+100]"#,
    ),
    (
        "tojson_indent",
        r#"{{ {'b': {}, 'a': [[], [1, {'x': 2}]]} | tojson(indent=2) }}"#,
        r#"{
  "b": {},
  "a": [
    [],
    [
      1,
      {
        "x": 2
      }
    ]
  ]
}"#,
    ),
    (
        "tojson_kwargs",
        r#"{{ {'é': 1, 'b': [1, 2], 'a': '😀\x7f'} | tojson(ensure_ascii=true, sort_keys=true) }}|{{ {'a': [1, 2]} | tojson(separators=(',', ':')) }}|{{ {'a': [1]} | tojson(indent=1, separators=(', ', ' = ')) }}|{{ [1] | tojson(indent=0) }}"#,
        r#"{"a": "\ud83d\ude00\u007f", "b": [1, 2], "\u00e9": 1}|{"a":[1,2]}|{
 "a" = [
  1
 ]
}|[
1
]"#,
    ),
    (
        "tojson_messages",
        r#"{{ messages | tojson }}"#,
        r#"[{"role": "user", "content": "hi", "n": 1.5}]"#,
    ),
    (
        "python_values",
        r#"{{ none }}|{{ true }}|{{ [1, 'a', none, true] }}|{{ {'a': 1.0} }}"#,
        r#"None|True|[1, 'a', None, True]|{'a': 1.0}"#,
    ),
    (
        "generation",
        r#"{% for m in messages %}
  {%- generation -%}
  {{ m.content }}
  {% endgeneration %}
{% endfor %}"#,
        r#"hi
"#,
    ),
    (
        "methods",
        r#"{{ 'a  b c'.split() }}|{{ ' x '.strip() }}|{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ 'abc'.startswith(('x', 'a')) }}"#,
        r#"['a', 'b', 'c']|x|a=1|True"#,
    ),
    (
        "loop_controls",
        r#"{% for i in [1, 2, 3, 4] %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}"#,
        r#"13"#,
    ),
    (
        "blocks",
        r#"  {% if true %}
  x
  {% endif %}
end
"#,
        r#"  x
end"#,
    ),
];

#[test]
fn template_environment_matches_transformers() {
    let messages = [serde_json::json!({"role": "user", "content": "hi", "n": 1.5})];
    let mut failures = Vec::new();
    for (name, source, expected) in ENVIRONMENT_CASES {
        match ChatTemplate::new(source, Map::new()).render(&messages, None, true, &Map::new()) {
            Ok(rendered) if rendered == expected => {}
            Ok(rendered) => failures.push(format!(
                "  {name}: {}",
                first_difference(expected, &rendered)
            )),
            Err(e) => failures.push(format!("  {name}: {e}")),
        }
    }
    assert_no_failures("template environment", ENVIRONMENT_CASES.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// Errors

fn assert_names_path(error: &Error, path: &Path) {
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "error does not name {}: {message}",
        path.display()
    );
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let error = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert_names_path(&error, &dir.path().join("tokenizer.json"));
}

#[test]
fn corrupt_tokenizer_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_json = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer_json, b"{\"model\": \x00\xff garbage").unwrap();
    let error = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(error, Error::Tokenizer { .. }), "{error:?}");
    assert_names_path(&error, &tokenizer_json);

    // A valid tokenizer.json beside a corrupt tokenizer_config.json.
    std::fs::copy(
        fixture_dir("qwen3_moe").join("tokenizer.json"),
        &tokenizer_json,
    )
    .unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, "{\"chat_template\": ").unwrap();
    let error = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert_names_path(&error, &config);
}

fn render_error(source: &str) -> String {
    let template = ChatTemplate::new(source, Map::new());
    let messages = [serde_json::json!({"role": "user", "content": "hi"})];
    match template.render(&messages, None, true, &Map::new()) {
        Err(Error::ChatTemplate(message)) => message,
        other => panic!("{source:?}: expected a chat template error, got {other:?}"),
    }
}

#[test]
fn template_errors() {
    let message = render_error("{% for message in messages %}{{ message.content }}");
    assert!(message.contains("syntax error"), "{message}");
    let message = render_error("{{ raise_exception('boom') }}");
    assert!(message.contains("boom"), "{message}");
    // Raised from inside a loop and a condition, as real templates do on bad roles.
    let message = render_error(
        "{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('Conversation roles \
         must alternate') }}{% endif %}{% endfor %}",
    );
    assert!(
        message.contains("Conversation roles must alternate"),
        "{message}"
    );
}

#[test]
fn apply_chat_template_without_template_is_an_error() {
    let path = repo_path("tests/fixtures/qwen3_moe/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&path).unwrap();
    let error = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(matches!(error, Error::ChatTemplate(_)), "{error:?}");
}
