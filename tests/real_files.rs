//! Real files through the daemon, as a new user meets them: GGUF models of every vocabulary kind
//! served by `odmoed` and talked to with text, a dense model, a start-up that fails, budgets
//! and prompts that cannot work, and memory given back after `unload`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Value};
use odmoe_client::{Client, ClientError};
use odmoe_e2e::{Daemon, binary, demo_gguf, fixture, isolate, odmoe, odmoe_ok};
use odmoe_protocol::{ChatMessage, ErrorCode, GenerateParams, GenerateResult, Method, StatsResult};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(300);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn gguf_fixture(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

/// The Mixtral GGUF fixture with a SentencePiece vocabulary: llama.cpp's own `llama-spm` test
/// vocabulary cut to the model's 512 rows (its special and byte tokens come first), in place of
/// the fixture's gpt2 BPE one. The fixtures are all converted from checkpoints with BPE
/// tokenizers; this makes the other kind of vocabulary a served model can have.
fn sentencepiece_fixture(dir: &Path) -> PathBuf {
    let read = |path: &Path| {
        let mut file = BufReader::new(File::open(path).unwrap());
        let content = gguf_file::Content::read(&mut file).unwrap();
        (file, content)
    };
    let (mut model_file, model) = read(&gguf_fixture("mixtral-q8_0.gguf"));
    let (_, vocab) = read(&gguf_fixture("vocab/ggml-vocab-llama-spm.gguf"));
    let rows = match model.metadata.get("llama.vocab_size") {
        Some(size) => size.to_u32().unwrap() as usize,
        None => model.metadata["tokenizer.ggml.tokens"]
            .to_vec()
            .unwrap()
            .len(),
    };
    let mut metadata: HashMap<String, Value> = model
        .metadata
        .iter()
        .filter(|(key, _)| !key.starts_with("tokenizer.ggml."))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    for (key, value) in &vocab.metadata {
        if let Some(name) = key.strip_prefix("tokenizer.ggml.") {
            let value = match value {
                Value::Array(items) => Value::Array(items[..rows].to_vec()),
                other => other.clone(),
            };
            metadata.insert(format!("tokenizer.ggml.{name}"), value);
        }
    }
    assert_eq!(
        metadata["tokenizer.ggml.model"].to_string().unwrap(),
        "llama"
    );
    let tensors: Vec<(String, _)> = model
        .tensor_infos
        .keys()
        .map(|name| {
            let tensor = model.tensor(&mut model_file, name, &Device::Cpu).unwrap();
            (name.clone(), tensor)
        })
        .collect();
    let path = dir.join("mixtral-spm-q8_0.gguf");
    let mut out = BufWriter::new(File::create(&path).unwrap());
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, _)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    path
}

/// Greedy `odmoe run` on `model` (the offline path, loading the model in its own process).
fn offline(model: &Path, prompt: &str, chat: bool) -> serde_json::Value {
    let mut args = vec![
        "run",
        "--model",
        s(model),
        "--prompt",
        prompt,
        "--greedy",
        "--max-tokens",
        "8",
        "--json",
    ];
    if chat {
        args.push("--chat");
    }
    serde_json::from_str(&odmoe_ok(&args)).unwrap()
}

fn greedy(
    prompt: Option<&str>,
    messages: &[(&str, &str)],
    session: Option<&str>,
) -> GenerateParams {
    GenerateParams {
        prompt: prompt.map(str::to_owned),
        messages: (!messages.is_empty()).then(|| {
            messages
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: (*role).into(),
                    content: (*content).into(),
                })
                .collect()
        }),
        max_tokens: Some(8),
        temperature: Some(0.0),
        session: session.map(str::to_owned),
        stream: false,
        ..GenerateParams::default()
    }
}

async fn call(
    client: &mut Client,
    method: Method,
    params: &GenerateParams,
) -> Result<GenerateResult, ClientError> {
    timeout(
        LIMIT,
        client.generate_streaming(method, params, |_| {}, std::future::pending()),
    )
    .await
    .expect("the daemon answered in time")
}

/// `odmoe ARGS --socket SOCKET` with `stdin`, which must succeed; its stdout.
fn odmoe_piped(daemon: &Daemon, args: &[&str], stdin: &str) -> String {
    let output = daemon.odmoe_with_input(args, stdin);
    assert!(
        output.status.success(),
        "odmoe {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Serves `model` under a budget of half its experts, served as `mode`, and checks a text
/// completion against `odmoe run` on the same file; the daemon, a client and the completion's
/// text, for more.
async fn serve_a_completion_as_offline(model: &Path, mode: &str) -> (Daemon, Client, String) {
    let mut daemon = Daemon::builder()
        .model(model)
        .args(["--expert-budget", "50%"])
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_serving().await;
    let mut client = daemon.client().await;
    let served = client.models().await.unwrap().models;
    assert_eq!(served[0].mode, mode, "{}", model.display());

    let completion = call(
        &mut client,
        Method::Generate,
        &greedy(Some("Hello world"), &[], None),
    )
    .await
    .unwrap();
    let reference = offline(model, "Hello world", false);
    assert_eq!(completion.text, reference["text"], "{}", model.display());
    assert_eq!(
        serde_json::json!(completion.tokens),
        reference["tokens"],
        "{}",
        model.display()
    );
    (daemon, client, completion.text)
}

/// [`serve_a_completion_as_offline`], then a chat turn through the model's own chat template,
/// and a second turn that the daemon's session answers as if the whole conversation had been
/// sent.
async fn text_and_chat_through_the_daemon(model: &Path, mode: &str) {
    let (daemon, mut client, completion) = serve_a_completion_as_offline(model, mode).await;

    let first_turn = [("user", "Hi there")];
    let first = call(
        &mut client,
        Method::Chat,
        &greedy(None, &first_turn, Some("talk")),
    )
    .await
    .unwrap();
    let reference = offline(model, "Hi there", true);
    assert_eq!(serde_json::json!(first.tokens), reference["tokens"]);

    let second = call(
        &mut client,
        Method::Chat,
        &greedy(None, &[("user", "Tell me more")], Some("talk")),
    )
    .await
    .unwrap();
    let whole = [
        ("user", "Hi there"),
        ("assistant", first.text.as_str()),
        ("user", "Tell me more"),
    ];
    let stateless = call(&mut client, Method::Chat, &greedy(None, &whole, None))
        .await
        .unwrap();
    assert_eq!(second.tokens, stateless.tokens, "{}", model.display());
    assert_eq!(second.usage.prompt_tokens, stateless.usage.prompt_tokens);
    // Re-rendered, the first turn's reply may tokenize a little differently at its edges, so
    // the cache covers most of what came before, not always all of it.
    assert!(
        second.usage.cached_tokens > first.usage.prompt_tokens / 2,
        "the second turn reuses the first: {:?}",
        second.usage
    );

    // The CLI, piped, keeps its named conversation in the daemon too.
    let flags = ["chat", "--session", "cli", "--greedy", "--max-tokens", "8"];
    let reply = odmoe_piped(&daemon, &flags, "Hi there\n");
    assert_eq!(reply.trim_end_matches('\n'), first.text);
    let reply = odmoe_piped(&daemon, &flags, "Tell me more\n");
    assert_eq!(reply.trim_end_matches('\n'), stateless.text);
    let completed = odmoe_piped(
        &daemon,
        &["complete", "--greedy", "--max-tokens", "8"],
        "Hello world",
    );
    assert_eq!(completed.trim_end_matches('\n'), completion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_models_of_every_vocabulary_kind_chat_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    text_and_chat_through_the_daemon(&gguf_fixture("qwen3_moe-q8_0.gguf"), "on_demand").await;
    // The session and stateless turns below must give the same bits whether a prompt runs in
    // one pass or two (a prefix reused or not): so these run in Q8_0, whose products do not
    // depend on a pass's length, where candle's f32 products of BF16 weights do.
    // GLM-4.5 (glm4moe): dense first layer, shared expert, partial rotary.
    text_and_chat_through_the_daemon(&gguf_fixture("glm4_moe-q8_0.gguf"), "on_demand").await;
    // gpt-oss with MXFP4 experts, as its released files keep them: attention sinks,
    // alternating windows, biased clamped experts.
    text_and_chat_through_the_daemon(&gguf_fixture("gpt_oss-mxfp4.gguf"), "on_demand").await;
    text_and_chat_through_the_daemon(&sentencepiece_fixture(dir.path()), "on_demand").await;
    text_and_chat_through_the_daemon(&demo_gguf(), "dense").await;
}

/// gpt-oss as OpenAI's checkpoints keep it (MXFP4 expert blocks and scales, in place), on
/// demand through the daemon, as `odmoe run` generates offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mxfp4_checkpoint_generates_through_the_daemon_as_offline() {
    let (_daemon, mut client, _) =
        serve_a_completion_as_offline(&fixture("gpt_oss_mxfp4"), "on_demand").await;
    let store = client.stats().await.unwrap().store.unwrap();
    assert!(store.misses > 0 && store.read_errors == 0, "{store:?}");
}

/// `odmoed` detached (no `--foreground`) on `model`, with its home in `dir`.
fn detached(dir: &Path, model: &Path) -> Output {
    let mut command = Command::new(binary("odmoed"));
    isolate(&mut command, dir);
    command
        .args(["--socket", s(&dir.join("run").join("odmoed.sock"))])
        .args(["--model", s(model)])
        .stdin(Stdio::null());
    timeout_output(command)
}

fn timeout_output(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A parent that never hears from its child would hang here: the test's own limit catches it.
    child.wait_with_output().unwrap()
}

#[test]
fn a_detached_start_waits_for_the_model_and_reports_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a model at all\n").unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let whole = std::fs::read(gguf_fixture("qwen3_moe-q8_0.gguf")).unwrap();
    std::fs::write(&truncated, &whole[..4096]).unwrap();
    for (model, expected) in [(&text, "not a model"), (&truncated, "truncated.gguf")] {
        let output = detached(dir.path(), model);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }

    // A good model: the parent returns once the daemon serves it.
    let output = detached(dir.path(), &fixture("qwen3_moe"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let socket = dir.path().join("run").join("odmoed.sock");
    let models = odmoe_ok(&["ps", "--json", "--socket", s(&socket)]);
    assert!(models.contains("qwen3_moe"), "{models}");
    odmoe_ok(&["stop", "--socket", s(&socket)]);
}

#[test]
fn budgets_need_a_unit_and_room_for_one_layer_everywhere() {
    let model = fixture("qwen3_moe");
    let foreground = |budget: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(binary("odmoed"));
        isolate(&mut command, dir.path());
        command
            .args([
                "--foreground",
                "--socket",
                s(&dir.path().join("run/s.sock")),
            ])
            .args(["--model", s(&model), "--expert-budget", budget]);
        let output = timeout_output(command);
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(foreground("1.5").contains("needs a unit"));
    let run = |budget: &str| {
        let output = odmoe(&[
            "run",
            "--model",
            s(&model),
            "--tokens",
            "1,2",
            "--expert-budget",
            budget,
        ]);
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run("1.5").contains("needs a unit"));
    // One message, word for word, from the daemon and from `run`.
    let floor = |stderr: &str| {
        let at = stderr.find("1.0 KiB is below").expect(stderr);
        stderr[at..].lines().next().unwrap().to_owned()
    };
    assert_eq!(floor(&foreground("1KiB")), floor(&run("1KiB")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_past_the_context_are_refused_before_any_compute() {
    let mut daemon = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .args(["--context-length", "64"])
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_serving().await;
    let mut client = daemon.client().await;
    let refused = |result: Result<GenerateResult, ClientError>| match result {
        Err(ClientError::Rpc(error)) => {
            assert_eq!(error.code, ErrorCode::ContextLengthExceeded, "{error:?}");
            error.message
        }
        other => panic!("expected context_length_exceeded, got {other:?}"),
    };
    let mut long = greedy(None, &[], None);
    long.tokens = Some((1..=70).collect());
    let message = refused(call(&mut client, Method::Generate, &long).await);
    assert!(message.contains("70 tokens"), "{message}");
    let mut fits_but_not_with_the_reply = greedy(None, &[], None);
    fits_but_not_with_the_reply.tokens = Some((1..=60).collect());
    fits_but_not_with_the_reply.max_tokens = Some(10);
    refused(call(&mut client, Method::Generate, &fits_but_not_with_the_reply).await);
    let megabyte = "the quick brown fox ".repeat(50_000);
    refused(
        call(
            &mut client,
            Method::Generate,
            &greedy(Some(&megabyte), &[], None),
        )
        .await,
    );
    // The default length shrinks to what fits, and the daemon serves on.
    let mut fits = greedy(Some("Hello"), &[], None);
    fits.max_tokens = None;
    let result = call(&mut client, Method::Generate, &fits).await.unwrap();
    assert!(result.usage.prompt_tokens + result.usage.completion_tokens <= 64);
    assert!(client.hello().await.unwrap().model.is_some());
}

/// Resident memory of the daemon, as it reports it.
async fn rss(client: &mut Client) -> u64 {
    client.stats().await.unwrap().rss_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_gives_the_memory_back() {
    let mut daemon = Daemon::builder().limit(LIMIT).spawn();
    daemon.wait_until_serving().await;
    let mut client = daemon.client().await;
    let fresh = rss(&mut client).await;
    client.load(demo_gguf(), None).await.unwrap();
    let mut long = greedy(None, &[], Some("kept"));
    long.tokens = Some((0..1000).map(|i| 100 + i * 37 % 20_000).collect());
    long.max_tokens = Some(4);
    call(&mut client, Method::Generate, &long).await.unwrap();
    let loaded = rss(&mut client).await;
    client.unload().await.unwrap();
    let unloaded = rss(&mut client).await;
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "rss: fresh {:.1} MiB, loaded {:.1} MiB, unloaded {:.1} MiB",
        mib(fresh),
        mib(loaded),
        mib(unloaded)
    );
    assert!(loaded > fresh + (64 << 20), "the model was not loaded");
    assert!(
        unloaded <= fresh + (24 << 20),
        "after unload {:.1} MiB against {:.1} MiB fresh",
        mib(unloaded),
        mib(fresh)
    );
}

/// `odmoe ARGS --socket SOCKET` for `daemon`; its output, whatever the status.
fn odmoe_at(daemon: &Daemon, args: &[&str]) -> Output {
    let mut command = Command::new(binary("odmoe"));
    isolate(&mut command, daemon.dir());
    command
        .args(args)
        .args(["--socket", s(daemon.socket())])
        .stdin(Stdio::null());
    timeout_output(command)
}

fn json_of(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Waits until the daemon has no model loaded (3,000 polls, over 30 s: beyond the longest
/// keep_alive here).
async fn until_unloaded(client: &mut Client) {
    let unloaded = poll_stats(client, 3000, |stats| stats.model.is_none()).await;
    assert!(unloaded, "the model was not unloaded");
}

/// Polls the daemon's stats every 10 ms, at most `polls` times, until `holds`; whether it did.
async fn poll_stats(
    client: &mut Client,
    polls: usize,
    holds: impl Fn(&StatsResult) -> bool,
) -> bool {
    for _ in 0..polls {
        if holds(&client.stats().await.unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_folder_keep_alive_and_the_queue_as_ollama_users_expect() {
    let models = tempfile::tempdir().unwrap();
    std::fs::copy(
        gguf_fixture("qwen3_moe-q8_0.gguf"),
        models.path().join("qwen3.gguf"),
    )
    .unwrap();
    std::fs::write(models.path().join("notes.txt"), "not a model").unwrap();
    let config = format!("[model]\nmodels_dir = {:?}\n", s(models.path()));
    let mut daemon = Daemon::builder().config(config).limit(LIMIT).spawn();
    daemon.wait_until_serving().await;

    let listed = json_of(&odmoe_at(&daemon, &["models", "--json"]));
    let available = listed["available"].as_array().unwrap();
    assert_eq!(available.len(), 1, "{listed}");
    assert_eq!(available[0]["name"], "qwen3.gguf");
    assert_eq!(available[0]["format"], "gguf");
    assert_eq!(available[0]["architecture"], "qwen3_moe");
    assert!(available[0]["experts_per_layer"].as_u64().unwrap() > 1);
    let loaded = odmoe_at(&daemon, &["load", "qwen3"]);
    assert!(loaded.status.success(), "{loaded:?}");

    // keep_alive per request: the idle model goes once it elapses, and ps says when. Long
    // enough that `odmoe ps`, a new process on a machine running other tests' daemons, starts
    // within it (2 s was not, now and then).
    let mut client = daemon.client().await;
    let mut brief = greedy(Some("Hello"), &[], None);
    brief.keep_alive = Some(odmoe_protocol::KeepAliveParam::Text("8s".into()));
    call(&mut client, Method::Generate, &brief).await.unwrap();
    let ps = json_of(&odmoe_at(&daemon, &["ps", "--json"]));
    let left = ps["unloads_in_s"].as_f64().expect("ps says when");
    assert!(left > 0.0 && left <= 8.0, "{ps}");
    until_unloaded(&mut client).await;

    // keep_alive 0 from the CLI: unloaded right after the reply.
    assert!(odmoe_at(&daemon, &["load", "qwen3"]).status.success());
    let once = odmoe_at(
        &daemon,
        &["complete", "Hi", "--max-tokens", "2", "--keep-alive", "0"],
    );
    assert!(once.status.success(), "{once:?}");
    until_unloaded(&mut client).await;

    // A request behind another is told its place.
    assert!(odmoe_at(&daemon, &["load", "qwen3"]).status.success());
    // The load's job counts as running until the engine thread is done with it, which may come
    // after the CLI has its answer: were the long requests below counted waiting behind it,
    // the client behind them could find an empty queue once they were stopped.
    daemon
        .stats_until("the load's job never ended", |stats| {
            stats.queue.running == 0 && stats.queue.waiting == 0
        })
        .await;
    // Two long requests, one running and one waiting, so that a client started on a loaded CI
    // machine still finds one ahead of it when the first has ended.
    let mut long = greedy(Some("Once upon a time"), &[], None);
    long.max_tokens = Some(4000);
    long.ignore_eos = true;
    let mut ahead = Vec::new();
    for _ in 0..2 {
        let mut busy = daemon.client().await;
        let long = long.clone();
        ahead.push(tokio::spawn(async move {
            let _ = call(&mut busy, Method::Generate, &long).await;
        }));
    }
    // On a loaded machine the two clients can take seconds to connect: the client behind them
    // is started only once both are in, or it could be served first and never queue.
    let in_place = |stats: &StatsResult| stats.queue.running == 1 && stats.queue.waiting == 1;
    assert!(
        poll_stats(&mut client, 6000, in_place).await,
        "the two long requests never ran and waited"
    );
    let socket = daemon.socket().to_owned();
    let home = daemon.dir().to_owned();
    let behind = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(binary("odmoe"));
        isolate(&mut command, &home);
        command
            .args([
                "complete",
                "Hi",
                "--max-tokens",
                "2",
                "--socket",
                s(&socket),
            ])
            .stdin(Stdio::null());
        timeout_output(command)
    });
    // Queued behind both, or behind the second once the first has ended.
    let seen_waiting = poll_stats(&mut client, 3000, |stats| stats.queue.waiting == 2).await;
    for request in ahead {
        request.abort();
    }
    let behind = behind.await.unwrap();
    let stderr = String::from_utf8_lossy(&behind.stderr);
    assert!(behind.status.success(), "{:?}: {stderr}", behind.status);
    assert!(
        stderr.contains("queued (position"),
        "not queued (seen waiting behind both: {seen_waiting}): {stderr}{}\n{}",
        String::from_utf8_lossy(&behind.stdout),
        daemon.log()
    );
}

#[test]
fn a_request_over_the_size_limit_is_explained_by_the_client() {
    let mut daemon = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_listening();
    let mut command = Command::new(binary("odmoe"));
    isolate(&mut command, daemon.dir());
    let mut child = command
        .args([
            "complete",
            "--max-tokens",
            "1",
            "--socket",
            s(daemon.socket()),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // The client may stop reading once it has its answer.
        let _ = stdin.write_all(&vec![b'a'; 18 << 20]);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("max_message_bytes"), "{stderr}");
    assert!(stderr.contains("16777216"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chat_session_forgets_its_oldest_turns_instead_of_failing() {
    let mut daemon = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .args(["--context-length", "128"])
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_serving().await;
    let mut client = daemon.client().await;
    let mut prompt_tokens = Vec::new();
    for turn in 0..20 {
        let text = format!("This is turn number {turn} of a long conversation.");
        let params = greedy(None, &[("user", text.as_str())], Some("long"));
        let result = call(&mut client, Method::Chat, &params)
            .await
            .unwrap_or_else(|error| panic!("turn {turn}: {error}"));
        assert!(result.usage.prompt_tokens + result.usage.completion_tokens <= 128);
        prompt_tokens.push(result.usage.prompt_tokens);
    }
    // The conversation grew past three quarters of the context, and was trimmed back.
    assert!(prompt_tokens.iter().any(|&n| n > 96), "{prompt_tokens:?}");
    let trimmed = prompt_tokens.windows(2).any(|pair| pair[1] < pair[0]);
    assert!(trimmed, "{prompt_tokens:?}");
}
