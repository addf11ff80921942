//! Tokenizers (`tokenizer.json`), chat templates from `tokenizer_config.json` rendered the way
//! transformers renders them, and incremental detokenization for streaming.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value as TemplateValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;

mod gguf;
pub mod harmony;
pub mod reasoning;

/// A chat message; `role` and `content` cover plain conversations, and templates that read more
/// keys (tool calls, reasoning) get them through [`ChatTemplate::render`]'s JSON messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Prose, code, numbers, punctuation, runs of blanks and other scripts: what a tokenizer's
/// pre-tokenizer meets, for [`Tokenizer::warm_up`].
const WARM_UP_TEXT: &str = "The quick brown fox jumps over the lazy dog. It's 12:45 on 2026-12-04; \
    costs were $3,141.59 (up 27%) and THE REPORT said: \"don't panic!\"\n\n\
    fn main() {\n    let answer: u64 = 0x2a << 3;\n    println!(\"{answer:>8}\");\n}\n\t\t  \
    def f(x): return [i ** 2 for i in range(x) if i % 3 != 0]  # squares\n\
    Ünïcödé façade naïve — «quotes» … 日本語のテキスト、中文文本。 Русский текст. العربية. 🙂👍\n\
    <html><body class=\"a-b\">&amp; x&lt;y</body></html> SELECT * FROM t WHERE id=7;\r\n";

/// A loaded tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<ChatTemplate>,
    /// Token ids that end a generation (from `generation_config.json` or the eos token).
    eos_token_ids: Vec<u32>,
    /// Decoding drops one leading space unless the first token is a special one: the space a
    /// SentencePiece vocabulary prepends when encoding (llama.cpp's `add_space_prefix`).
    strip_leading_space: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja` /
    /// `generation_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let mut config = Value::Null;
        if config_path.exists() {
            config = read_json(&config_path)?;
            tokenizer.chat_template = ChatTemplate::from_tokenizer_config(&config, &config_path)?;
            if let Some(eos) = config.get("eos_token").and_then(token_content) {
                tokenizer
                    .eos_token_ids
                    .extend(tokenizer.inner.token_to_id(&eos));
            }
        }
        // transformers saves the template in a file of its own since 4.43 (gpt-oss, GLM-4.5
        // and most checkpoints since ship it so), and reads it before the config's entry.
        let template_path = dir.join("chat_template.jinja");
        if template_path.exists() {
            let source = std::fs::read_to_string(&template_path)
                .map_err(|e| Error::io(&template_path, e))?;
            let special_tokens = ChatTemplate::special_tokens_of(&config);
            tokenizer.chat_template = Some(ChatTemplate::new(source, special_tokens));
        }
        let generation_path = dir.join("generation_config.json");
        if generation_path.exists() {
            let generation = read_json(&generation_path)?;
            match generation.get("eos_token_id") {
                Some(Value::Number(n)) => {
                    tokenizer.eos_token_ids.extend(n.as_u64().map(|n| n as u32))
                }
                Some(Value::Array(ids)) => tokenizer
                    .eos_token_ids
                    .extend(ids.iter().filter_map(|v| v.as_u64()).map(|n| n as u32)),
                _ => {}
            }
        }
        tokenizer.end_harmony_replies();
        Ok(tokenizer)
    }

    /// With gpt-oss's Harmony vocabulary a reply ends at `<|return|>` (an answer) or at
    /// `<|call|>` (a tool call), whatever the files name as end of sequence; `<|end|>` only
    /// ends one message of the reply. llama.cpp ends them the same way.
    fn end_harmony_replies(&mut self) {
        let ends = ["<|return|>", "<|call|>"].map(|t| self.inner.token_to_id(t));
        if let [Some(answer), Some(call)] = ends {
            self.eos_token_ids.extend([answer, call]);
        }
        self.eos_token_ids.sort_unstable();
        self.eos_token_ids.dedup();
    }

    /// Loads a bare `tokenizer.json`, with no chat template or end-of-sequence ids.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            chat_template: None,
            eos_token_ids: Vec::new(),
            strip_leading_space: false,
        })
    }

    /// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, with its chat
    /// template: byte-level BPE (`gpt2`) or SentencePiece (`llama`) vocabularies, encoding and
    /// decoding as llama.cpp does (see [`gguf`]).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path().to_path_buf();
        let error = |message: String| Error::Tokenizer {
            path: path.clone(),
            message,
        };
        let vocab = gguf::read(gguf).map_err(error)?;
        let inner = tokenizers::Tokenizer::from_bytes(vocab.json.to_string())
            .map_err(|e| error(e.to_string()))?;
        let token_text = |id: Option<usize>| id.map(|i| vocab.tokens[i].clone());
        let chat_template = match gguf.meta_str("tokenizer.chat_template") {
            Ok(source) => {
                let mut special = Map::new();
                for (key, id) in [("bos_token", vocab.bos), ("eos_token", vocab.eos)] {
                    if let Some(text) = token_text(id) {
                        special.insert(key.into(), Value::String(text));
                    }
                }
                Some(ChatTemplate::new(source, special))
            }
            Err(_) => None,
        };
        let mut tokenizer = Self {
            inner,
            path,
            chat_template,
            eos_token_ids: vocab.eos.map(|e| e as u32).into_iter().collect(),
            strip_leading_space: vocab.strip_leading_space,
        };
        tokenizer.end_harmony_replies();
        Ok(tokenizer)
    }

    /// Runs the tokenizer over text of every kind it meets, on two threads at once, so that the
    /// working memory its regexes keep (a cache per thread using them, kept for reuse) exists
    /// before the memory of a loaded model is measured, instead of growing after it.
    pub fn warm_up(&self) {
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let _ = self.encode(WARM_UP_TEXT, true);
                });
            }
        });
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(e))?;
        if self.strip_leading_space
            && text.starts_with(' ')
            && ids.first().is_some_and(|&id| !self.is_special(id))
        {
            text.remove(0);
        }
        Ok(text)
    }

    fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|token| self.inner.get_added_vocabulary().is_special_token(&token))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// How a chat reply to `prompt` divides into answer, reasoning and calls, when the chat
    /// template marks them (see [`reasoning`]).
    pub fn reply_parts(&self, prompt: &[u32]) -> Option<reasoning::ReplyParts> {
        let template = self.chat_template.as_ref()?;
        // The generation prompt's end: enough tokens to hold an opened `<think>` or a Harmony
        // message header.
        let tail = &prompt[prompt.len().saturating_sub(16)..];
        let tail = self.decode(tail, false).ok()?;
        reasoning::ReplyParts::new(template.source(), &tail)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document. A leading space that
    /// [`Tokenizer::decode`] drops becomes the `Strip` decoder Hugging Face's Llama tokenizers
    /// use, which drops it even after a skipped special token.
    pub fn to_json(&self) -> Result<String> {
        let json = self.inner.to_string(false).map_err(|e| self.error(e))?;
        if !self.strip_leading_space {
            return Ok(json);
        }
        let mut value: Value = serde_json::from_str(&json).map_err(|e| self.error(e))?;
        let strip = serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0});
        match value["decoder"]["decoders"].as_array_mut() {
            Some(decoders) => decoders.push(strip),
            None => value["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [strip]}),
        }
        Ok(value.to_string())
    }

    /// The Hugging Face files that describe this tokenizer: `tokenizer.json`,
    /// `tokenizer_config.json` (chat template and special tokens) and `generation_config.json`
    /// (end-of-sequence ids), as (file name, contents).
    pub fn hf_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let mut config = Map::new();
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), Value::from(template.source()));
            for (key, value) in &template.special_tokens {
                config.insert(key.clone(), value.clone());
            }
        }
        let pretty = |value: &Value| {
            serde_json::to_string_pretty(value)
                .expect("JSON values serialise")
                .into_bytes()
        };
        Ok(vec![
            ("tokenizer.json", self.to_json()?.into_bytes()),
            ("tokenizer_config.json", pretty(&Value::Object(config))),
            (
                "generation_config.json",
                pretty(&serde_json::json!({"eos_token_id": self.eos_token_ids})),
            ),
        ])
    }

    /// The special tokens the chat template is rendered with (`bos_token`, `eos_token`, ...).
    pub fn special_tokens(&self) -> Option<&Map<String, Value>> {
        self.chat_template.as_ref().map(|t| &t.special_tokens)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The prompt of a conversation: `messages` rendered with the chat template, opening the
    /// assistant's turn, encoded without adding special tokens (the template writes its own).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let rendered = self.apply_chat_template(messages, true)?;
        self.encode(&rendered, false)
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| serde_json::to_value(m).expect("a chat message serializes"))
            .collect();
        self.render_chat(&messages, None, add_generation_prompt, &Map::new())
    }

    /// The prompt of a conversation given as JSON messages (with tool calls, tool results and
    /// whatever else the template reads) and the tools the model may call, rendered with the
    /// chat template opening the assistant's turn and encoded. `variables` are set for the
    /// template besides (gpt-oss's `reasoning_effort`, Qwen3's `enable_thinking`).
    pub fn encode_chat_json(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        variables: &Map<String, Value>,
    ) -> Result<Vec<u32>> {
        let rendered = self.render_chat(messages, tools, true, variables)?;
        self.encode(&rendered, false)
    }

    /// Renders JSON `messages` and `tools` with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        variables: &Map<String, Value>,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "the model has no chat template (looked in chat_template.jinja and \
                 tokenizer_config.json beside {})",
                self.path.display()
            ))
        })?;
        template.render(messages, tools, add_generation_prompt, variables)
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|error| Error::Json {
        path: path.to_path_buf(),
        error,
    })
}

/// A special token written either as a string or as an added-token object `{"content": ...}`.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The special tokens a template may refer to, as transformers passes them.
const TEMPLATE_SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A Jinja chat template with the special-token values it is rendered with.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    special_tokens: Map<String, Value>,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, special_tokens: Map<String, Value>) -> Self {
        Self {
            source: source.into(),
            special_tokens,
        }
    }

    /// The template of a `tokenizer_config.json`: a string, or a list of named templates of which
    /// "default" is used.
    fn from_tokenizer_config(config: &Value, path: &Path) -> Result<Option<Self>> {
        let source = match config.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::config(
                        path,
                        "chat_template is a list without a \"default\" template",
                    )
                })?,
            Some(_) => {
                return Err(Error::config(
                    path,
                    "chat_template must be a string or a list",
                ));
            }
        };
        Ok(Some(Self::new(source, Self::special_tokens_of(config))))
    }

    /// The special tokens a template may name (`bos_token`, ...), as a tokenizer config states
    /// them.
    fn special_tokens_of(config: &Value) -> Map<String, Value> {
        TEMPLATE_SPECIAL_TOKENS
            .iter()
            .filter_map(|&key| {
                config
                    .get(key)
                    .and_then(token_content)
                    .map(|v| (key.to_string(), Value::String(v)))
            })
            .collect()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (JSON objects; keys whose value is null are dropped, as transformers
    /// does), with optional `tools` and extra context variables that override the defaults.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let env = template_environment()?;
        let source = rewrite_generation_tags(&self.source);
        let template = env
            .template_from_str(&source)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        let mut context = self.special_tokens.clone();
        let messages: Vec<Value> = messages.iter().map(drop_nulls).collect();
        context.insert("messages".into(), Value::Array(messages));
        // transformers always passes `tools` and `documents`, as None when absent: templates that
        // test `tools is not none` (Mistral's) must see none, not undefined.
        context.insert("tools".into(), tools.cloned().unwrap_or(Value::Null));
        context.insert("documents".into(), Value::Null);
        context.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        for (k, v) in extra {
            context.insert(k.clone(), v.clone());
        }
        template
            .render(TemplateValue::from(minijinja::value::Serde(&context)))
            .map_err(|e| Error::ChatTemplate(describe(&e)))
    }
}

fn drop_nulls(message: &Value) -> Value {
    match message {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// transformers' `AssistantTracker` extension adds `{% generation %}...{% endgeneration %}`, which
/// only marks assistant text for training masks and renders its body unchanged. minijinja has no
/// custom tags, so each becomes the always-true `if` / `endif` with the same whitespace control.
fn rewrite_generation_tags(source: &str) -> std::borrow::Cow<'_, str> {
    if !source.contains("generation") {
        return source.into();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}").map(|end| end + 2) else {
            break;
        };
        let tag = &rest[start..start + len];
        let name =
            tag[2..len - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        match name {
            "generation" => out.push_str(&tag.replacen(name, "if true", 1)),
            "endgeneration" => out.push_str(&tag.replacen(name, "endif", 1)),
            _ => out.push_str(tag),
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out.into()
}

fn describe(e: &minijinja::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    message
}

/// A Jinja environment configured like transformers' chat-template renderer: `trim_blocks`,
/// `lstrip_blocks`, loop controls, Python string methods, `raise_exception`, `strftime_now`, and
/// a `tojson` that writes JSON as Python's `json.dumps(ensure_ascii=False)` does.
fn template_environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| {
        crate::time::strftime_now(&format)
    });
    env.add_filter("tojson", python_tojson);
    Ok(env)
}

/// `tojson` as transformers defines it, `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, so that tool schemas in prompts are byte-identical to
/// Python's: no HTML escaping, `", "` / `": "` separators, Python's spelling of floats.
fn python_tojson(
    value: TemplateValue,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let json = PythonJson {
        indent: indent.map(|n| " ".repeat(n)),
        // Python drops the space after "," when indenting, as the line ends there.
        separators: match separators.as_deref() {
            None if indent.is_some() => (",".into(), ": ".into()),
            None => (", ".into(), ": ".into()),
            Some([item, key]) => (item.clone(), key.clone()),
            Some(_) => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson separators must be an (item, key) pair",
                ));
            }
        },
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    json.write(&value, 0, &mut out);
    Ok(out)
}

/// The options of Python's `json.dumps` that templates use.
struct PythonJson {
    indent: Option<String>,
    /// Item and key separators.
    separators: (String, String),
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PythonJson {
    fn write(&self, value: &Value, level: usize, out: &mut String) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                Some(f) => out.push_str(&python_float(f)),
                None => out.push_str(&n.to_string()),
            },
            Value::String(s) => self.write_str(s, out),
            Value::Array(items) => {
                self.write_container(('[', ']'), items.iter().map(|v| (None, v)), level, out)
            }
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                let entries = entries.into_iter().map(|(k, v)| (Some(k.as_str()), v));
                self.write_container(('{', '}'), entries, level, out)
            }
        }
    }

    fn write_container<'v>(
        &self,
        (open, close): (char, char),
        entries: impl Iterator<Item = (Option<&'v str>, &'v Value)>,
        level: usize,
        out: &mut String,
    ) {
        out.push(open);
        let mut empty = true;
        for (i, (key, value)) in entries.enumerate() {
            if i > 0 {
                out.push_str(&self.separators.0);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level + 1));
            }
            if let Some(key) = key {
                self.write_str(key, out);
                out.push_str(&self.separators.1);
            }
            self.write(value, level + 1, out);
            empty = false;
        }
        if let (false, Some(indent)) = (empty, &self.indent) {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
        out.push(close);
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                // ensure_ascii escapes everything outside ' '..='~', as UTF-16 code units.
                c if c < ' ' || (self.ensure_ascii && c > '~') => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, in exponent form (`1e-05`, `1e+16`)
/// below 1e-4 or from 1e16 on, else positional with at least one decimal (`1.0`).
fn python_float(f: f64) -> String {
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} exponent is an integer");
    if f != 0.0 && !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        f.to_string()
    }
}

/// Turns generated token ids into text deltas that are always whole characters: a token that ends
/// inside a multi-byte character is held until the character completes.
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the window decoded for context, so that spacing rules see the previous token.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
}

impl<'a> DecodeStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.ids.len())?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let delta = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// The text of tokens not yet emitted (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self) -> Result<Option<String>> {
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.ids.len())?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text
            .strip_prefix(prefix.as_str())
            .filter(|rest| !rest.is_empty())
            .map(str::to_string))
    }

    fn decode(&self, from: usize, to: usize) -> Result<String> {
        self.tokenizer
            .decode(&self.ids[from..to], self.skip_special_tokens)
    }
}
