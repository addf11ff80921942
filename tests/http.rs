//! odmoed's HTTP APIs driven by the official `openai` and `anthropic` Python packages
//! (`tests/python/http_clients.py`, in the venv `scripts/setup.sh` makes), against the Qwen3-MoE
//! fixture with Qwen3's own chat template (so tools render) and against the demo model; the
//! status page rendered by headless Chromium (`scripts/check-status-page.sh`).
//!
//! Every step is bounded by a timeout; no test asserts how long anything took.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use odmoe_e2e::{Daemon, binary, demo_gguf, fixture, isolate, test_python};
use odmoe_engine::tokenizer::Tokenizer;
use odmoe_protocol::{GenerateParams, GenerateResult, StatsResult};
use serde_json::{Value, json};
use tempfile::TempDir;

/// How long any single step may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(300);

/// A daemon with HTTP on a port of its choosing, the address it reports, and its key.
struct HttpDaemon {
    daemon: Daemon,
    base: String,
    key: String,
}

impl HttpDaemon {
    /// Serves `model` with HTTP on, bodies up to 64 KiB and `extra` config (whose `[server]`
    /// keys replace these).
    async fn start(model: &Path, extra: &str) -> HttpDaemon {
        let server = if extra.contains("[server]") {
            String::new()
        } else {
            "[server]\nmax_message_bytes = \"64KiB\"\n\n".to_owned()
        };
        let config = format!("{server}[http]\nlisten = \"127.0.0.1:0\"\n\n{extra}");
        let (daemon, base) = Self::spawn(Some(model), config).await;
        let mut command = Command::new(binary("odmoe"));
        isolate(&mut command, daemon.dir());
        let output = command
            .args(["http-key", "--config"])
            .arg(daemon.config_file())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        assert!(key.starts_with("odmoe-"), "{key}");
        HttpDaemon { daemon, base, key }
    }

    /// Serves no model, with HTTP on and no key asked.
    async fn start_unauthenticated_without_a_model() -> HttpDaemon {
        let config = "[http]\nlisten = \"127.0.0.1:0\"\nallow_unauthenticated = true\n";
        let (daemon, base) = Self::spawn(None, config.to_owned()).await;
        HttpDaemon {
            daemon,
            base,
            key: String::new(),
        }
    }

    /// Starts odmoed with `config` and waits until it serves; the HTTP base URL it logged.
    async fn spawn(model: Option<&Path>, config: String) -> (Daemon, String) {
        let builder = Daemon::builder().config(config);
        let mut daemon = match model {
            Some(model) => builder.model(model),
            None => builder,
        }
        .spawn();
        daemon.wait_until_serving().await;
        let log = daemon.log();
        let address = log
            .lines()
            .find(|line| line.contains("serving HTTP"))
            .and_then(|line| line.split("address=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no HTTP address in the log:\n{log}"))
            .to_owned();
        (daemon, format!("http://{address}"))
    }

    /// Runs `phase` of the Python clients against this daemon; the JSON it reports.
    fn clients(&self, phase: &str, model: &str, uncached: Option<&HttpDaemon>) -> Value {
        let python = test_python(&["openai", "anthropic"]);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/http_clients.py");
        let mut command = Command::new(python);
        command
            .arg(script)
            .args([phase, &self.base, &self.key, model])
            .args(
                uncached
                    .into_iter()
                    .flat_map(|other| [&other.base, &other.key]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().unwrap();
        let output = wait_bounded(child, phase);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{phase}: {}\n{stdout}\n{}\nodmoed:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.daemon.log()
        );
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
    }

    async fn stats(&self) -> StatsResult {
        self.daemon.client().await.stats().await.unwrap()
    }

    /// Polls `stats` until `done` holds.
    async fn stats_until(&self, what: &str, done: impl Fn(&StatsResult) -> bool) -> StatsResult {
        self.daemon.stats_until(what, done).await
    }
}

/// Waits for `child`'s output, killing it after [`LIMIT`].
fn wait_bounded(mut child: std::process::Child, what: &str) -> std::process::Output {
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{what} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The Qwen3-MoE fixture with the chat template of the real Qwen3 (which renders tools and
/// tool results), fetched by `scripts/setup.sh`.
fn fixture_with_qwen3_template() -> TempDir {
    let tokenizers = std::env::var_os("ODMOE_TOKENIZERS_DIR").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/odmoe/tokenizers"),
        PathBuf::from,
    );
    let qwen3 = tokenizers.join("qwen3/tokenizer_config.json");
    let qwen3: Value = serde_json::from_str(
        &fs::read_to_string(&qwen3)
            .unwrap_or_else(|_| panic!("{} is missing: run scripts/setup.sh", qwen3.display())),
    )
    .unwrap();
    fixture_with_template(&qwen3["chat_template"])
}

/// The Qwen3-MoE fixture with the chat template `template`: its files linked, its tokenizer
/// config rewritten.
fn fixture_with_template(template: &Value) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("qwen3_moe");
    for entry in fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "tokenizer_config.json" {
            symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let config = source.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&fs::read_to_string(config).unwrap()).unwrap();
    config["chat_template"] = template.clone();
    fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_and_anthropic_clients_chat_complete_stream_and_call_tools() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let name = model.path().file_name().unwrap().to_str().unwrap();
    let report = daemon.clients("apis", name, None);

    // The tools went through the template: the daemon's prompt is the template rendered with
    // the conversation and the tools, as the engine's tokenizer renders it here.
    let tokenizer = Tokenizer::from_dir(model.path()).unwrap();
    let conversation = [
        json!({"role": "user", "content": "What is the weather in Paris?"}),
        json!({"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}),
    ];
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let rendered = tokenizer
        .render_chat(&conversation, Some(&tools), true, &Default::default())
        .unwrap();
    assert!(
        rendered.contains("get_weather") && rendered.contains("<tools>"),
        "{rendered}"
    );
    let expected = tokenizer
        .encode_chat_json(&conversation, Some(&tools), &Default::default())
        .unwrap()
        .len();
    assert_eq!(report["tools_prompt_tokens"], json!(expected), "{report}");
    assert_eq!(
        report["anthropic_tools_prompt_tokens"],
        json!(expected),
        "{report}"
    );
    let without = tokenizer
        .encode_chat_json(&conversation, None, &Default::default())
        .unwrap()
        .len();
    assert_eq!(report["no_tools_prompt_tokens"], json!(without), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_model_answers_both_apis() {
    let demo = demo_gguf();
    let daemon = HttpDaemon::start(&demo, "").await;
    let name = demo.file_name().unwrap().to_str().unwrap();
    let report = daemon.clients("apis_without_tools", name, None);
    assert!(
        !report["chat"]["text"].as_str().unwrap().is_empty(),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_sent_again_one_turn_longer_computes_only_the_new_turn() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let uncached = HttpDaemon::start(model.path(), "[sessions]\nprefix_cache_bytes = 0\n").await;
    let name = model.path().file_name().unwrap().to_str().unwrap();
    let report = daemon.clients("prefix", name, Some(&uncached));
    let (prompt, cached) = (
        report["prompt_tokens"].as_u64().unwrap(),
        report["cached_tokens"].as_u64().unwrap(),
    );
    println!("prefix cache: {cached} of the second request's {prompt} prompt tokens reused");
    assert!(
        cached * 10 >= prompt * 9,
        "{cached} of {prompt} cached: {report}"
    );
    let stats = daemon.stats().await;
    assert!(
        stats.sessions.prefixes >= 1 && stats.sessions.prefix_bytes > 0,
        "{stats:?}"
    );
    assert_eq!(uncached.stats().await.sessions.prefixes, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_cancels_its_generation() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let name = model.path().file_name().unwrap().to_str().unwrap();
    let report = daemon.clients("cancel", name, None);
    assert_eq!(report["chunks"], json!(4), "{report}");
    daemon
        .stats_until("the generation ends", |stats| {
            stats.requests >= 1 && stats.queue.running == 0
        })
        .await;
    let log = daemon.daemon.log();
    let done = log
        .lines()
        .find(|line| line.contains("generation done"))
        .unwrap_or_else(|| panic!("no generation in the log:\n{log}"));
    assert!(done.contains("finish=Cancelled"), "{done}");
    let tokens: usize = done
        .split("tokens=")
        .nth(2)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{done}"));
    assert!(tokens < 3000, "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_http_clients_and_socket_clients_at_once_are_all_answered() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let name = model
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let fds = || {
        fs::read_dir(format!("/proc/{}/fd", daemon.daemon.pid()))
            .unwrap()
            .count()
    };
    // One request first, so the runtime's and the engine's lasting descriptors exist.
    daemon.clients("concurrent", &name, None);
    let before = fds();

    let socket_clients: Vec<_> = (0..4)
        .map(|index| {
            let socket = daemon.daemon.socket().to_owned();
            tokio::spawn(async move {
                let mut client = odmoe_client::Client::connect(&socket).await.unwrap();
                let params = GenerateParams {
                    prompt: Some(format!("Socket client {index}")),
                    max_tokens: Some(8),
                    temperature: Some(0.0),
                    stream: false,
                    ..GenerateParams::default()
                };
                let result: GenerateResult = client.call("generate", &params).await.unwrap();
                result.tokens.len()
            })
        })
        .collect();
    let report = tokio::task::block_in_place(|| daemon.clients("concurrent", &name, None));
    assert_eq!(report["answered"], json!(16), "{report}");
    for client in socket_clients {
        assert!(client.await.unwrap() >= 1);
    }
    let stats = daemon
        .stats_until("every request is done", |stats| {
            stats.requests == 36 && stats.queue.running == 0 && stats.queue.waiting == 0
        })
        .await;
    assert!(stats.sessions.prefix_bytes <= 1 << 30, "{stats:?}");
    // Every connection closed: no descriptor is left behind.
    let deadline = Instant::now() + LIMIT;
    while fds() > before {
        assert!(
            Instant::now() < deadline,
            "{} descriptors, {before} before",
            fds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_one_cell_per_expert_and_the_values_of_its_json() {
    let chromium = Command::new("chromium").arg("--version").output();
    assert!(
        chromium.is_ok_and(|output| output.status.success()),
        "chromium not found: run scripts/setup.sh"
    );
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let name = model.path().file_name().unwrap().to_str().unwrap();
    // Some hits and reads to show.
    daemon.clients("concurrent", name, None);
    let screenshot = daemon.daemon.dir().join("status.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check-status-page.sh");
    let child = Command::new("bash")
        .arg(script)
        .arg(&daemon.base)
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = wait_bounded(child, "check-status-page.sh");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("24 cells = 3 layers x 8 experts"), "{said}");
    assert!(fs::metadata(&screenshot).unwrap().len() > 0);
}

/// Sends `request` (a whole HTTP/1.1 request) to `base` and reads the response's status line
/// and headers, leaving the body unread; the connection stays open for the caller to drop.
fn send_raw(base: &str, request: &str) -> (std::net::TcpStream, String) {
    use std::io::{BufRead, BufReader, Write};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            return (stream, head);
        }
    }
}

/// A POST of `body` to `path`, with `key` when given.
fn post(path: &str, key: Option<&str>, body: &Value) -> String {
    let body = body.to_string();
    let auth = key.map_or(String::new(), |key| {
        format!("Authorization: Bearer {key}\r\n")
    });
    format!(
        "POST {path} HTTP/1.1\r\nHost: odmoed\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A chat request that would run for thousands of tokens unless stopped.
fn long_chat(stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": "Count to a thousand"}],
           "max_tokens": 3000, "temperature": 0, "stream": stream})
}

/// The `generation done` lines of the daemon's log, once there are `count` of them.
async fn generations(daemon: &HttpDaemon, count: usize) -> Vec<String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let done: Vec<String> = daemon
            .daemon
            .log()
            .lines()
            .filter(|line| line.contains("generation done"))
            .map(str::to_owned)
            .collect();
        if done.len() >= count {
            return done;
        }
        assert!(Instant::now() < deadline, "{}", daemon.daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_before_a_whole_reply_cancels_it() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let request = post("/v1/chat/completions", Some(&daemon.key), &long_chat(false));
    let address = daemon.base.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    daemon
        .stats_until("the generation runs", |stats| stats.queue.running == 1)
        .await;
    drop(stream);
    let done = generations(&daemon, 1).await;
    assert!(done[0].contains("finish=Cancelled"), "{done:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn past_max_connections_generations_a_request_is_told_to_retry() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "[server]\nmax_connections = 1\n").await;
    let (first, head) = send_raw(
        &daemon.base,
        &post("/v1/chat/completions", Some(&daemon.key), &long_chat(true)),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_, head) = send_raw(
        &daemon.base,
        &post("/v1/chat/completions", Some(&daemon.key), &long_chat(false)),
    );
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    // Dropped once its generation runs: one cancelled before it starts logs no generation, and
    // a loaded machine can be that slow to start it.
    daemon
        .stats_until("the generation runs", |stats| stats.queue.running == 1)
        .await;
    drop(first);
    // The slot comes back once the first is cancelled.
    generations(&daemon, 1).await;
    let (_, head) = send_raw(
        &daemon.base,
        &post(
            "/v1/chat/completions",
            Some(&daemon.key),
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_unauthenticated_serves_without_a_key_and_without_a_model_says_unavailable() {
    let daemon = HttpDaemon::start_unauthenticated_without_a_model().await;
    let (_, head) = send_raw(
        &daemon.base,
        "GET /v1/models HTTP/1.1\r\nHost: odmoed\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let hello = json!({"messages": [{"role": "user", "content": "Hi"}]});
    let (_, head) = send_raw(&daemon.base, &post("/v1/chat/completions", None, &hello));
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(!daemon.daemon.dir().join("config/odmoe/http-key").exists());
}

/// The JSON body of the response to `request` (a whole, not streamed, response).
fn response_json(base: &str, request: &str) -> Value {
    use std::io::{Read, Write};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let request = request.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A request refused before its body was read says the connection closes, so that a client's
/// pool does not send the next request on it; other errors keep it open.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_refused_unread_closes_its_connection_and_says_so() {
    let model = fixture_with_qwen3_template();
    // Bodies up to 64 KiB.
    let daemon = HttpDaemon::start(model.path(), "").await;
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(200 * 1024)}],
                      "max_tokens": 1});
    let small = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
    for (request, status, closes) in [
        (
            post("/v1/chat/completions", Some(&daemon.key), &huge),
            "413",
            true,
        ),
        (post("/v1/messages", Some("wrong"), &small), "401", true),
        (
            post("/v1/chat/completions", Some(&daemon.key), &json!({})),
            "400",
            false,
        ),
    ] {
        let (_, head) = send_raw(&daemon.base, &request);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        let says_close = head.to_ascii_lowercase().contains("connection: close");
        assert_eq!(says_close, closes, "{head}");
    }
}

/// A stop sequence met in a reply ends it there: Anthropic's API names it as the reason, with
/// the text before it, and OpenAI's ends at the same place.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_sequence_ends_the_reply_where_it_is_met_and_is_named() {
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let ask = |path: &str, extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Say something"}],
                              "max_tokens": 24, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        response_json(&daemon.base, &post(path, Some(&daemon.key), &body))
    };
    let whole = ask("/v1/messages", json!({}));
    assert_eq!(whole["stop_reason"], "max_tokens", "{whole}");
    let text = whole["content"][0]["text"].as_str().unwrap().to_string();
    // Three characters from the second half; the reply ends where they are first met.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text:?}");
    let stop: String = chars[chars.len() / 2..][..3].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];

    let stopped = ask("/v1/messages", json!({"stop_sequences": [stop]}));
    assert_eq!(stopped["stop_reason"], "stop_sequence", "{stopped}");
    assert_eq!(stopped["stop_sequence"], json!(stop), "{stopped}");
    let shown = stopped["content"]
        .as_array()
        .unwrap()
        .first()
        .map_or("", |block| block["text"].as_str().unwrap());
    assert_eq!(shown, before, "{stopped}");

    let openai = ask("/v1/chat/completions", json!({"stop": [stop]}));
    let choice = &openai["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{openai}");
    assert_eq!(
        choice["message"]["content"].as_str().unwrap_or(""),
        before,
        "{openai}"
    );
}

/// A reasoning model's thoughts reach Anthropic's official client as `thinking` blocks when it
/// asks for them, streamed or not, and are sent back in a later turn; without asking it gets
/// the answer alone. The template opens `<think>` for the reply, so everything the fixture
/// writes is reasoning (its byte-level vocabulary has no `</think>` token to close it).
#[tokio::test(flavor = "multi_thread")]
async fn anthropic_clients_get_the_reasoning_as_thinking_blocks_when_they_ask() {
    let template = "{% for message in messages %}{{ message.content }}{% endfor %}<think>";
    let model = fixture_with_template(&json!(template));
    let daemon = HttpDaemon::start(model.path(), "").await;
    let name = model.path().file_name().unwrap().to_str().unwrap();
    let report = daemon.clients("thinking", name, None);
    let thinking = report["thinking"].as_str().unwrap();
    assert!(thinking.len() >= 8, "{report}");
    // The same greedy reply through OpenAI's API, as its reasoning.
    let openai = response_json(
        &daemon.base,
        &post(
            "/v1/chat/completions",
            Some(&daemon.key),
            &json!({"messages": [{"role": "user", "content": "Name a colour."}],
                    "max_tokens": 12, "temperature": 0}),
        ),
    );
    assert_eq!(
        openai["choices"][0]["message"]["reasoning_content"], thinking,
        "{openai}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_template_variables_reach_the_template() {
    // Qwen3's template closes an empty <think> in the prompt when enable_thinking is false.
    let model = fixture_with_qwen3_template();
    let daemon = HttpDaemon::start(model.path(), "").await;
    let prompt_tokens = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 1, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let request = post("/v1/chat/completions", Some(&daemon.key), &body);
        response_json(&daemon.base, &request)["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
    };
    let thinking = prompt_tokens(json!({}));
    let not = prompt_tokens(json!({"chat_template_kwargs": {"enable_thinking": false}}));
    assert!(not > thinking, "{not} against {thinking}");
    // gpt-oss's effort is a variable like any other: the Qwen3 template ignores it.
    assert_eq!(prompt_tokens(json!({"reasoning_effort": "high"})), thinking);
    // What the server sets, and efforts OpenAI does not name, are refused.
    for extra in [
        json!({"reasoning_effort": "extreme"}),
        json!({"chat_template_kwargs": {"add_generation_prompt": false}}),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let request = post("/v1/chat/completions", Some(&daemon.key), &body);
        let (_, head) = send_raw(&daemon.base, &request);
        assert!(head.starts_with("HTTP/1.1 400"), "{extra}: {head}");
    }
}
