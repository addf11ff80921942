//! `odmoed` on a temporary socket: serving no model (starting, stopping, the socket, the
//! config, bytes on the wire) and serving the committed Qwen3-MoE fixture, driven by
//! `odmoe-client`, by raw bytes, by Neovim's own msgpack-RPC and by Python's msgpack.
//!
//! Every step is bounded by a timeout so that a hung daemon fails a test instead of hanging it;
//! no test asserts how long anything took.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use odmoe_client::{Client, ClientError};
use odmoe_e2e::{Daemon, DaemonBuilder, binary, fixture, isolate, odmoe_ok, test_python};
use odmoe_protocol::{
    ChatMessage, ErrorCode, GenerateParams, GenerateResult, HelloResult, Message, Method,
    PROTOCOL_VERSION, QueuedEvent, RpcError, TokenEvent, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::time::timeout;

/// How long any single step may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// Most tokens a generation can run on the fixture (4096 positions less the prompt): long
/// enough that it is still running when the test cancels it.
const LONG: u32 = 4000;

/// A prompt the fixture's tokenizer reads.
const PROMPT: &str = "The quick brown fox";

/// The fixture model served.
fn model() -> PathBuf {
    fixture("qwen3_moe")
}

/// What these tests add to the shared [`Daemon`].
trait DaemonExt: Sized {
    /// Serves the fixture with the default config.
    async fn start() -> Self;

    /// Serves the fixture with `--config` naming a file holding `config` (when given) and
    /// `args`, and waits until it answers `hello`.
    async fn start_with(config: Option<&str>, args: &[&str]) -> Self;

    /// Serves no model, with `--config` naming a file holding `config` when given, and waits
    /// until it answers `hello`.
    async fn start_empty(config: Option<&str>) -> Self;

    /// Starts a new daemon, as the first was started, on the same socket, and waits until it
    /// answers.
    async fn restart(&mut self);
}

/// Starts the daemon `builder` describes, with `config` when given, and waits until it answers.
async fn serving(builder: DaemonBuilder, config: Option<&str>) -> Daemon {
    let builder = match config {
        Some(config) => builder.config(config),
        None => builder,
    };
    let mut daemon = builder.limit(LIMIT).spawn();
    daemon.wait_until_serving().await;
    daemon
}

impl DaemonExt for Daemon {
    async fn start() -> Daemon {
        Daemon::start_with(None, &[]).await
    }

    async fn start_with(config: Option<&str>, args: &[&str]) -> Daemon {
        serving(Daemon::builder().model(model()).args(args), config).await
    }

    async fn start_empty(config: Option<&str>) -> Daemon {
        serving(Daemon::builder(), config).await
    }

    async fn restart(&mut self) {
        self.respawn();
        self.wait_until_serving().await;
    }
}

/// `odmoed`, with its home and config directories in `dir` (see [`isolate`]).
fn odmoed(dir: &Path) -> Command {
    let mut command = Command::new(binary("odmoed"));
    isolate(&mut command, dir);
    command.stdin(Stdio::null());
    command
}

/// `odmoed --foreground --socket SOCKET`, configured from `dir`.
fn foreground(dir: &Path, socket: &Path) -> Command {
    let mut command = odmoed(dir);
    command.arg("--foreground").arg("--socket").arg(socket);
    command
}

/// Reads one msgpack value from `stream` with plain rmpv, independent of the
/// protocol crate's codec.
async fn read_value(stream: &mut UnixStream) -> Value {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(value) = rmpv::decode::read_value(&mut bytes.as_slice()) {
            return value;
        }
        let n = timeout(LIMIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed after {} bytes", bytes.len());
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the daemon closes `stream`, returning what came before.
async fn read_until_closed(stream: &mut UnixStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("the daemon kept the connection open")
        {
            Ok(0) | Err(_) => return bytes,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The error in a response read from raw bytes, as `(msgid, error)`.
fn response_error(bytes: &[u8]) -> (u32, RpcError) {
    match odmoe_protocol::decode(bytes, 1 << 20).unwrap() {
        Some((Message::Response(response), _)) => (response.msgid, response.outcome.unwrap_err()),
        other => panic!("expected an error response, got {other:?}"),
    }
}

fn expect_rpc_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> RpcError {
    match result {
        Err(ClientError::Rpc(error)) => error,
        other => panic!("expected an error response, got {other:?}"),
    }
}

/// Greedy sampling of `max_tokens` after `prompt`, every sampling field given.
fn greedy(prompt: &str, max_tokens: u32) -> GenerateParams {
    GenerateParams {
        prompt: Some(prompt.into()),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        top_k: Some(0),
        top_p: Some(1.0),
        min_p: Some(0.0),
        repetition_penalty: Some(1.0),
        seed: Some(0),
        ..GenerateParams::default()
    }
}

/// A generation that runs until cancelled.
fn long() -> GenerateParams {
    GenerateParams {
        ignore_eos: true,
        ..greedy(PROMPT, LONG)
    }
}

/// `generate` through the client, with the token events it streamed.
async fn generate(
    client: &mut Client,
    params: &GenerateParams,
) -> (GenerateResult, Vec<TokenEvent>) {
    generate_or_error(client, params)
        .await
        .unwrap_or_else(|error| panic!("generate failed: {error}"))
}

async fn generate_or_error(
    client: &mut Client,
    params: &GenerateParams,
) -> Result<(GenerateResult, Vec<TokenEvent>), ClientError> {
    let mut events = Vec::new();
    let result = timeout(
        LIMIT,
        client.generate_streaming(
            Method::Generate,
            params,
            |event| events.push(event.clone()),
            std::future::pending(),
        ),
    )
    .await
    .expect("the generation did not finish")?;
    Ok((result, events))
}

/// The text of `events` in order.
fn text_of(events: &[TokenEvent]) -> String {
    events.iter().map(|event| event.text.as_str()).collect()
}

/// Starts a generation that runs until `cancel` fires, and waits for its first token.
/// The task answers with the result and the events streamed.
async fn start_long(
    mut client: Client,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<(GenerateResult, Vec<TokenEvent>)>,
) {
    let (cancel, cancelled) = oneshot::channel::<()>();
    let (first, first_seen) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut first = Some(first);
        let mut events = Vec::new();
        let result = client
            .generate_streaming(
                Method::Generate,
                &long(),
                |event| {
                    events.push(event.clone());
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                },
                async {
                    let _ = cancelled.await;
                },
            )
            .await
            .unwrap();
        (result, events)
    });
    timeout(LIMIT, first_seen)
        .await
        .expect("no first token")
        .unwrap();
    (cancel, task)
}

// Serving no model: starting, stopping, the socket, the config and bytes on the wire.

#[tokio::test]
async fn hello_through_the_client() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let hello = timeout(LIMIT, client.hello()).await.unwrap().unwrap();
    assert_eq!(
        hello,
        HelloResult {
            protocol_version: PROTOCOL_VERSION,
            server_version: env!("CARGO_PKG_VERSION").into(),
            model: Some(model().display().to_string()),
        }
    );
}

#[test]
fn a_model_that_cannot_load_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    // A directory, but not a model's.
    let output = foreground(dir.path(), &dir.path().join("run").join("odmoed.sock"))
        .arg("--model")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot serve"), "{stderr}");
    assert!(stderr.contains("config.json"), "{stderr}");
}

#[tokio::test]
async fn hello_as_raw_bytes_from_an_editor() {
    let daemon = Daemon::start_empty(None).await;
    let mut stream = daemon.raw().await;
    // rpcrequest(chan, 'hello', {'client': 'nvim'}) with msgid 1.
    let request = b"\x94\x00\x01\xa5hello\x91\x81\xa6client\xa4nvim";
    stream.write_all(request).await.unwrap();
    let response = read_value(&mut stream).await;
    let fields = response.as_array().expect("a response is an array");
    assert_eq!(fields.len(), 4);
    assert_eq!(fields[0].as_u64(), Some(1));
    assert_eq!(fields[1].as_u64(), Some(1));
    assert!(fields[2].is_nil(), "error: {}", fields[2]);
    assert_eq!(
        fields[3]["protocol_version"].as_u64(),
        Some(u64::from(PROTOCOL_VERSION))
    );
    assert_eq!(
        fields[3]["server_version"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(fields[3]["model"].is_nil());
}

#[tokio::test]
async fn unknown_methods_and_missing_models_answer_errors_and_keep_the_connection() {
    let daemon = Daemon::start_empty(None).await;
    let mut client = daemon.client().await;
    let error = expect_rpc_error(
        timeout(LIMIT, client.request("frobnicate", &()))
            .await
            .unwrap(),
    );
    assert_eq!(error.code, ErrorCode::MethodNotFound);
    let error = expect_rpc_error(
        timeout(LIMIT, client.request("generate", &()))
            .await
            .unwrap(),
    );
    assert_eq!(error.code, ErrorCode::NoModel);
    assert!(error.message.contains("load"), "{}", error.message);
    timeout(LIMIT, client.hello()).await.unwrap().unwrap();
}

#[tokio::test]
async fn malformed_msgpack_closes_that_connection_only() {
    let daemon = Daemon::start_empty(None).await;
    let mut bystander = daemon.client().await;
    let mut stream = daemon.raw().await;
    // An array of 4 whose third element starts with 0xc1, which msgpack never uses.
    stream
        .write_all(&[0x94, 0x00, 0x01, 0xc1, 0x00])
        .await
        .unwrap();
    let bytes = read_until_closed(&mut stream).await;
    let (msgid, error) = response_error(&bytes);
    assert_eq!((msgid, error.code), (0, ErrorCode::ParseError));

    timeout(LIMIT, bystander.hello()).await.unwrap().unwrap();
    let mut fresh = daemon.client().await;
    timeout(LIMIT, fresh.hello()).await.unwrap().unwrap();
}

#[tokio::test]
async fn an_oversized_message_closes_that_connection_only() {
    let config = "[server]\nmax_message_bytes = \"4KiB\"\n";
    let daemon = Daemon::start_empty(Some(config)).await;
    let mut bystander = daemon.client().await;

    // A whole message of about 8 KiB.
    let mut stream = daemon.raw().await;
    let params = Value::Map(vec![(
        Value::from("client"),
        Value::from("x".repeat(8 << 10)),
    )]);
    let request = Message::Request(odmoe_protocol::Request {
        msgid: 1,
        method: "hello".into(),
        params,
    });
    let bytes = odmoe_protocol::encode(&request);
    // The daemon may hang up before all of it is written.
    let _ = stream.write_all(&bytes).await;
    let (msgid, error) = response_error(&read_until_closed(&mut stream).await);
    assert_eq!((msgid, error.code), (0, ErrorCode::MessageTooLarge));

    // Only a header declaring a 4 GB string: refused without waiting for it.
    let mut stream = daemon.raw().await;
    stream
        .write_all(&[0x94, 0x00, 0x02, 0xdb, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (_, error) = response_error(&read_until_closed(&mut stream).await);
    assert_eq!(error.code, ErrorCode::MessageTooLarge);

    timeout(LIMIT, bystander.hello()).await.unwrap().unwrap();
    let mut fresh = daemon.client().await;
    timeout(LIMIT, fresh.hello()).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_socket_is_private() {
    let daemon = Daemon::start_empty(None).await;
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(daemon.socket()), 0o600);
    assert_eq!(mode(daemon.socket().parent().unwrap()), 0o700);
}

#[tokio::test]
async fn sigterm_stops_the_daemon_and_removes_the_socket() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut daemon = Daemon::start_empty(None).await;
        let _idle_client = daemon.client().await;
        daemon.signal(signal);
        let status = daemon.wait_for_exit();
        assert!(status.success(), "{signal}: {status}\n{}", daemon.log());
        assert!(
            !daemon.socket().exists(),
            "{signal}: the socket is still there"
        );
    }
}

#[tokio::test]
async fn the_shutdown_method_stops_the_daemon() {
    let mut daemon = Daemon::start_empty(None).await;
    let mut other = daemon.client().await;
    let mut client = daemon.client().await;
    let result = timeout(LIMIT, client.request("shutdown", &()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result, Value::Nil);
    let status = daemon.wait_for_exit();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(!daemon.socket().exists());
    // Connections still open were closed.
    assert!(timeout(LIMIT, other.hello()).await.unwrap().is_err());
}

#[tokio::test]
async fn a_second_daemon_on_the_same_socket_is_refused() {
    let daemon = Daemon::start_empty(None).await;
    let output = foreground(daemon.dir(), daemon.socket()).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    // The first daemon is untouched.
    timeout(LIMIT, daemon.client().await.hello())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let mut daemon = Daemon::start_empty(None).await;
    daemon.signal(Signal::SIGKILL);
    daemon.wait_for_exit();
    assert!(
        daemon.socket().exists(),
        "a killed daemon leaves its socket behind"
    );
    assert!(matches!(
        Client::connect(daemon.socket()).await,
        Err(ClientError::Refused { .. })
    ));

    daemon.restart().await;
    timeout(LIMIT, daemon.client().await.hello())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn without_foreground_the_daemon_detaches_once_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("odmoed.sock");
    let output = odmoed(dir.path())
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The parent has exited; the detached child is already accepting.
    let mut client = timeout(LIMIT, Client::connect(&socket))
        .await
        .unwrap()
        .unwrap();
    timeout(LIMIT, client.hello()).await.unwrap().unwrap();
    timeout(LIMIT, client.request("shutdown", &()))
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the detached daemon did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = fs::read_to_string(socket.with_file_name("odmoed.log")).unwrap();
    assert!(log.contains("shutting down on request"), "{log}");
}

/// Environment variable that turns [`connect_as_another_user_helper`] on.
const PEER_SOCKET_VAR: &str = "ODMOED_TEST_PEER_SOCKET";

#[tokio::test]
async fn another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can connect as another user");
        return;
    }
    let daemon = Daemon::start_empty(None).await;
    // Open the path to everyone, so that only the peer check stands in the way.
    let open =
        |path: &Path, mode| fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    open(daemon.dir(), 0o711);
    open(daemon.socket().parent().unwrap(), 0o711);
    open(daemon.socket(), 0o666);
    let helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "connect_as_another_user_helper", "--nocapture"])
        .env(PEER_SOCKET_VAR, daemon.socket())
        .uid(65534)
        .gid(65534)
        .output();
    let output = match helper {
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: the test binary cannot be run as uid 65534");
            return;
        }
        other => other.unwrap(),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("refused with unauthorized"), "{stdout}");
    assert!(
        daemon
            .log()
            .contains("refused a connection from another user")
    );
    // The daemon's own user is still served.
    timeout(LIMIT, daemon.client().await.hello())
        .await
        .unwrap()
        .unwrap();
}

/// Run by [`another_user_is_refused`] as another user; does nothing otherwise.
#[test]
fn connect_as_another_user_helper() {
    let Some(socket) = std::env::var_os(PEER_SOCKET_VAR) else {
        return;
    };
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut bytes).unwrap();
    let (msgid, error) = response_error(&bytes);
    assert_eq!(msgid, 0);
    println!("refused with {}", error.code);
}

#[test]
fn a_bad_config_names_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("odmoed.toml");
    fs::write(&config, "[generation]\ntop_k = 40\ntop_p = 1.5\n").unwrap();
    let output = odmoed(dir.path())
        .args(["--foreground", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:3: generation.top_p: ", config.display());
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn a_missing_explicit_config_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = odmoed(dir.path())
        .args(["--foreground", "--config"])
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent.toml"));
}

// Serving the fixture.

#[tokio::test(flavor = "multi_thread")]
async fn streamed_generation_equals_odmoe_run() {
    let model = model();
    let run: serde_json::Value = serde_json::from_str(&odmoe_ok(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "24",
        "--temp",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--min-p",
        "0.05",
        "--repeat-penalty",
        "1.1",
        "--seed",
        "11",
        "--json",
    ]))
    .unwrap();

    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let params = GenerateParams {
        prompt: Some(PROMPT.into()),
        max_tokens: Some(24),
        temperature: Some(0.9),
        top_k: Some(40),
        top_p: Some(0.95),
        min_p: Some(0.05),
        repetition_penalty: Some(1.1),
        seed: Some(11),
        stream: true,
        ..GenerateParams::default()
    };
    let (result, events) = generate(&mut client, &params).await;
    let run_tokens: Vec<u32> = run["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert!(!run_tokens.is_empty());
    assert_eq!(result.tokens, run_tokens);
    assert_eq!(result.text, run["text"].as_str().unwrap());
    assert_eq!(result.finish_reason, run["finish_reason"].as_str().unwrap());
    assert_eq!(
        u64::from(result.usage.prompt_tokens),
        run["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(result.usage.completion_tokens as usize, run_tokens.len());
    // The stream is the result, token by token.
    assert_eq!(text_of(&events), result.text);
    let streamed: Vec<u32> = events.iter().map(|e| e.token).collect();
    assert_eq!(&streamed[..run_tokens.len()], &run_tokens[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_clients_at_once_get_the_single_client_reply() {
    let daemon = Daemon::start().await;
    let params = greedy(PROMPT, 8);
    let (expected, _) = generate(&mut daemon.client().await, &params).await;
    assert!(!expected.tokens.is_empty());

    let mut clients = Vec::new();
    for _ in 0..32 {
        let mut client = daemon.client().await;
        let params = params.clone();
        clients.push(tokio::spawn(
            async move { generate(&mut client, &params).await },
        ));
    }
    for client in clients {
        let (result, events) = client.await.unwrap();
        assert_eq!(result.tokens, expected.tokens);
        assert_eq!(result.text, expected.text);
        assert_eq!(result.finish_reason, expected.finish_reason);
        assert_eq!(text_of(&events), expected.text);
    }
    let stats = daemon
        .stats_until("the queue empties", |s| s.queue.running == 0)
        .await;
    assert_eq!(stats.queue.waiting, 0);
    assert_eq!(
        stats.sessions.count, 0,
        "requests without a session keep none"
    );
    assert_eq!(stats.requests, 33);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_request_is_told_its_position() {
    let daemon = Daemon::start().await;
    let (cancel, running) = start_long(daemon.client().await).await;

    let mut waiting = daemon.client().await;
    let behind = tokio::spawn(async move {
        let result = timeout(LIMIT, waiting.request("generate", &greedy(PROMPT, 4)))
            .await
            .unwrap()
            .unwrap();
        (result, waiting.take_notifications())
    });
    daemon
        .stats_until("the second request waits", |s| s.queue.waiting == 1)
        .await;
    cancel.send(()).unwrap();
    let (result, _) = timeout(LIMIT, running).await.unwrap().unwrap();
    assert_eq!(result.finish_reason, "cancelled");

    let (result, notifications) = timeout(LIMIT, behind).await.unwrap().unwrap();
    let result: GenerateResult = odmoe_protocol::from_value(result).unwrap();
    assert_eq!(result.finish_reason, "length");
    let queued: Vec<QueuedEvent> = notifications
        .iter()
        .filter(|n| n.method == "queued")
        .map(|n| odmoe_protocol::from_value(n.params.clone()).unwrap())
        .collect();
    assert_eq!(queued.len(), 1, "{notifications:?}");
    assert_eq!(queued[0].position, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_disconnect_mid_stream_free_their_work() {
    let daemon = Daemon::start_with(Some("[sessions]\nmax_sessions = 2\n"), &[]).await;
    // One generation runs; seven wait behind it, four of them in named sessions.
    let (_cancel, running) = start_long(daemon.client().await).await;
    let mut waiting = Vec::new();
    for i in 0..7 {
        let mut client = daemon.client().await;
        let params = GenerateParams {
            session: (i % 2 == 0).then(|| format!("conversation {i}")),
            ..long()
        };
        waiting.push(tokio::spawn(async move {
            let _ = client
                .generate_streaming(Method::Generate, &params, |_| {}, std::future::pending())
                .await;
        }));
    }
    daemon
        .stats_until("seven requests wait", |s| s.queue.waiting == 7)
        .await;
    // Every client goes away without a word.
    running.abort();
    for client in waiting {
        client.abort();
    }
    let stats = daemon
        .stats_until("the work is freed", |s| {
            s.queue.waiting == 0 && s.queue.running == 0
        })
        .await;
    // A named session the engine started before its client's departure was seen
    // is kept for a later turn, within the limit; nothing else is.
    assert!(stats.sessions.count <= 2, "{stats:?}");
    // The daemon still serves.
    let (result, _) = generate(&mut daemon.client().await, &greedy(PROMPT, 4)).await;
    assert_eq!(result.finish_reason, "length");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_generation_within_a_token_step() {
    let daemon = Daemon::start().await;
    let (cancel, running) = start_long(daemon.client().await).await;
    cancel.send(()).unwrap();
    let (result, events) = timeout(LIMIT, running).await.unwrap().unwrap();
    assert_eq!(result.finish_reason, "cancelled");
    assert!(result.usage.completion_tokens >= 1);
    assert!(
        result.usage.completion_tokens < LONG / 2,
        "{} tokens",
        result.usage.completion_tokens
    );
    assert_eq!(result.tokens.len(), result.usage.completion_tokens as usize);
    assert_eq!(text_of(&events), result.text);
    let stats = daemon
        .stats_until("the engine is idle", |s| s.queue.running == 0)
        .await;
    assert_eq!(stats.queue.waiting, 0);

    // Cancelling what is not running says so.
    let mut client = daemon.client().await;
    let answer: odmoe_protocol::CancelResult = client
        .call("cancel", &odmoe_protocol::CancelParams { id: 1 })
        .await
        .unwrap();
    assert!(!answer.cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_errors_and_the_daemon_keeps_serving() {
    let daemon = Daemon::start_with(Some("[server]\nmax_message_bytes = \"4KiB\"\n"), &[]).await;
    let mut bystander = daemon.client().await;

    // Malformed msgpack: parse_error, then the connection closes.
    let mut stream = daemon.raw().await;
    stream
        .write_all(&[0x94, 0x00, 0x01, 0xc1, 0x00])
        .await
        .unwrap();
    let (msgid, error) = response_error(&read_until_closed(&mut stream).await);
    assert_eq!((msgid, error.code), (0, ErrorCode::ParseError));

    // Over the size limit: message_too_large, then the connection closes.
    let mut stream = daemon.raw().await;
    let request = Message::Request(odmoe_protocol::Request {
        msgid: 1,
        method: "generate".into(),
        params: Value::Map(vec![(
            Value::from("prompt"),
            Value::from("x".repeat(8 << 10)),
        )]),
    });
    let _ = stream.write_all(&odmoe_protocol::encode(&request)).await;
    let (_, error) = response_error(&read_until_closed(&mut stream).await);
    assert_eq!(error.code, ErrorCode::MessageTooLarge);

    // Wrong types, unknown methods and values out of range answer errors on a connection
    // that stays open.
    let mut client = daemon.client().await;
    let field = |name: &str, value: Value| {
        Value::Map(vec![
            (Value::from("prompt"), Value::from(PROMPT)),
            (Value::from(name), value),
        ])
    };
    let error = expect_rpc_error(
        client
            .request("generate", &field("max_tokens", Value::from("ten")))
            .await,
    );
    assert_eq!(error.code, ErrorCode::InvalidParams);
    assert!(error.message.contains("max_tokens"), "{}", error.message);
    let error = expect_rpc_error(client.request("frobnicate", &()).await);
    assert_eq!(error.code, ErrorCode::MethodNotFound);
    let out_of_range = [
        (field("top_p", Value::from(0.0)), "top_p"),
        (field("temperature", Value::from(-1.0)), "temperature"),
        (field("max_tokens", Value::from(0)), "max_tokens"),
        (
            Value::Map(vec![(
                Value::from("tokens"),
                Value::Array(vec![Value::from(1), Value::from(100_000)]),
            )]),
            "tokens",
        ),
        (
            Value::Map(vec![(Value::from("prompt"), Value::from(""))]),
            "prompt",
        ),
        (Value::Map(vec![]), "neither"),
    ];
    for (params, named) in out_of_range {
        let error = expect_rpc_error(client.request("generate", &params).await);
        assert_eq!(error.code, ErrorCode::InvalidParams, "{params}");
        assert!(error.message.contains(named), "{params}: {}", error.message);
    }
    let error = expect_rpc_error(
        client
            .request(
                "chat",
                &Value::Map(vec![(Value::from("messages"), Value::Array(vec![]))]),
            )
            .await,
    );
    assert_eq!(error.code, ErrorCode::InvalidParams);

    // Everyone is still served.
    let (result, _) = generate(&mut client, &greedy(PROMPT, 4)).await;
    assert_eq!(result.usage.completion_tokens, 4);
    generate(&mut bystander, &greedy(PROMPT, 4)).await;
    generate(&mut daemon.client().await, &greedy(PROMPT, 4)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_turn_in_a_session_prefills_only_the_new_tokens() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let first_prompt: Vec<u32> = vec![10, 20, 30, 40, 50, 60];
    let turn = |tokens: Vec<u32>, session: Option<&str>| GenerateParams {
        prompt: None,
        tokens: Some(tokens),
        session: session.map(str::to_owned),
        ignore_eos: true,
        ..greedy("", 5)
    };
    let (first, _) = generate(&mut client, &turn(first_prompt.clone(), Some("chat"))).await;
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(first.tokens.len(), 5);

    let mut second_prompt = first_prompt.clone();
    second_prompt.extend(&first.tokens);
    second_prompt.extend([70, 80, 90]);
    let (second, _) = generate(&mut client, &turn(second_prompt.clone(), Some("chat"))).await;
    // The session holds the first prompt and the reply except its last token, which was
    // sampled but never run through the model.
    let kept = first_prompt.len() + first.tokens.len() - 1;
    assert_eq!(second.usage.cached_tokens as usize, kept);
    assert_eq!(second.usage.prompt_tokens as usize, second_prompt.len());

    // Without the session the same prompt is computed from scratch, to the same reply.
    let (fresh, _) = generate(&mut client, &turn(second_prompt, None)).await;
    assert_eq!(fresh.usage.cached_tokens, 0);
    assert_eq!(fresh.tokens, second.tokens);

    // Chat turns: the second rendering starts with the first, reply included.
    let user = |content: &str| ChatMessage {
        role: "user".into(),
        content: content.into(),
    };
    let mut chat = GenerateParams {
        prompt: None,
        messages: Some(vec![user("Hello there")]),
        session: Some("talk".into()),
        ..greedy("", 6)
    };
    let first = timeout(
        LIMIT,
        client.generate_streaming(Method::Chat, &chat, |_| {}, std::future::pending()),
    )
    .await
    .unwrap()
    .unwrap();
    chat.messages.as_mut().unwrap().extend([
        ChatMessage {
            role: "assistant".into(),
            content: first.text.clone(),
        },
        user("And then?"),
    ]);
    let second = timeout(
        LIMIT,
        client.generate_streaming(Method::Chat, &chat, |_| {}, std::future::pending()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        second.usage.cached_tokens >= first.usage.prompt_tokens,
        "{:?} after {:?}",
        second.usage,
        first.usage
    );
    let stats = timeout(LIMIT, client.stats()).await.unwrap().unwrap();
    assert_eq!(stats.sessions.count, 2);
    assert!(stats.sessions.kv_bytes > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_beyond_the_limit_and_idle_ones_are_dropped() {
    let config = "[sessions]\nmax_sessions = 2\nidle_expiry_secs = 0\n";
    let daemon = Daemon::start_with(Some(config), &[]).await;
    let mut client = daemon.client().await;
    let turn = |session: &str| GenerateParams {
        prompt: None,
        tokens: Some(vec![10, 20, 30, 40]),
        session: Some(session.into()),
        ..greedy("", 2)
    };
    for session in ["first", "second", "third"] {
        let (result, _) = generate(&mut client, &turn(session)).await;
        assert_eq!(result.usage.cached_tokens, 0, "{session}");
    }
    let stats = timeout(LIMIT, client.stats()).await.unwrap().unwrap();
    assert_eq!(stats.sessions.count, 2);
    // The least recently used went; the others still hold their prompt.
    let (third, _) = generate(&mut client, &turn("third")).await;
    assert_eq!(third.usage.cached_tokens, 3);
    let (first, _) = generate(&mut client, &turn("first")).await;
    assert_eq!(first.usage.cached_tokens, 0);

    // Idle sessions expire once the reloaded config says so.
    daemon.rewrite_config("[sessions]\nmax_sessions = 2\nidle_expiry_secs = 1\n");
    daemon.signal(Signal::SIGHUP);
    daemon
        .stats_until("idle sessions expire", |s| s.sessions.count == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cancels_generations_removes_the_socket_and_exits_0() {
    let mut daemon = Daemon::start().await;
    let (_cancel, running) = start_long(daemon.client().await).await;
    daemon.signal(Signal::SIGTERM);
    let (result, _) = timeout(LIMIT, running).await.unwrap().unwrap();
    assert_eq!(result.finish_reason, "cancelled");
    let status = daemon.wait_for_exit();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(!daemon.socket().exists(), "the socket is still there");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_changed_sampling_default() {
    let before = "[generation]\ntemperature = 0.0\nmax_tokens = 3\n";
    let daemon = Daemon::start_with(Some(before), &[]).await;
    let mut client = daemon.client().await;
    let params = GenerateParams {
        prompt: Some(PROMPT.into()),
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let (result, _) = generate(&mut client, &params).await;
    assert_eq!(result.usage.completion_tokens, 3);

    daemon.rewrite_config("[generation]\ntemperature = 0.0\nmax_tokens = 5\n");
    daemon.signal(Signal::SIGHUP);
    let deadline = Instant::now() + LIMIT;
    loop {
        let (changed, _) = generate(&mut client, &params).await;
        if changed.usage.completion_tokens == 5 {
            // Greedy: the first three tokens are the ones before.
            assert_eq!(&changed.tokens[..3], &result.tokens[..]);
            break;
        }
        assert_eq!(changed.usage.completion_tokens, 3);
        assert!(
            Instant::now() < deadline,
            "SIGHUP not applied:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        daemon.log().contains("generation.max_tokens: 3 -> 5"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn experts_on_demand_give_the_same_reply_and_load_unload_work() {
    let resident = Daemon::start().await;
    let params = greedy(PROMPT, 8);
    let (expected, _) = generate(&mut resident.client().await, &params).await;
    drop(resident);

    let daemon = Daemon::start_with(None, &["--expert-budget", "50%"]).await;
    let mut client = daemon.client().await;
    let models = client.models().await.unwrap().models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].mode, "on_demand");
    assert_eq!(models[0].architecture, "qwen3_moe");
    assert_eq!(
        models[0].budget_bytes,
        Some(models[0].total_expert_bytes / 2)
    );
    let (result, _) = generate(&mut client, &params).await;
    assert_eq!(result.tokens, expected.tokens);
    let stats = client.stats().await.unwrap();
    let store = stats
        .store
        .expect("store stats when experts load on demand");
    assert!(store.misses > 0 && store.bytes_read > 0, "{store:?}");
    assert_eq!(store.budget_bytes, models[0].total_expert_bytes / 2);
    assert_eq!(stats.pid, daemon.pid());
    assert!(stats.rss_bytes > 0);

    // Unload: nothing to generate with, and it says so.
    client.unload().await.unwrap();
    assert!(client.models().await.unwrap().models.is_empty());
    let error = expect_rpc_error(generate_or_error(&mut client, &params).await);
    assert_eq!(error.code, ErrorCode::NoModel);
    // Load again, every expert resident this time.
    let info = client.load(model(), Some("100%")).await.unwrap();
    assert_eq!(info.mode, "resident");
    let (result, _) = generate(&mut client, &params).await;
    assert_eq!(result.tokens, expected.tokens);
    let error = expect_rpc_error(client.load("/nonexistent/model", None).await);
    assert_eq!(error.code, ErrorCode::InvalidParams);
    // A failed load keeps the model.
    assert_eq!(client.models().await.unwrap().models.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_changes_the_expert_budget_of_the_running_store() {
    let config = |budget: &str| format!("[model]\nexpert_budget = \"{budget}\"\n");
    let daemon = Daemon::start_with(Some(&config("50%")), &[]).await;
    let mut client = daemon.client().await;
    let total = client.models().await.unwrap().models[0].total_expert_bytes;
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.store.unwrap().budget_bytes, total / 2);

    daemon.rewrite_config(&config("25%"));
    daemon.signal(Signal::SIGHUP);
    daemon
        .stats_until("the budget shrinks", |s| {
            s.store
                .as_ref()
                .is_some_and(|store| store.budget_bytes == total / 4)
        })
        .await;
    let models = client.models().await.unwrap().models;
    assert_eq!(models[0].budget_bytes, Some(total / 4));
    let (result, _) = generate(&mut client, &greedy(PROMPT, 4)).await;
    assert_eq!(result.usage.completion_tokens, 4);
    let store = client.stats().await.unwrap().store.unwrap();
    assert!(store.resident_bytes <= total / 4, "{store:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_passed_by_systemd_is_served_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // The shell moves the listener from stdin to fd 3, names itself in LISTEN_PID
    // and becomes odmoed, as systemd would start it.
    let script = r#"exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(binary("odmoed"))
        .arg("--foreground")
        .arg("--model")
        .arg(model())
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let log = || fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    let mut client = timeout(LIMIT, Client::connect(&socket))
        .await
        .unwrap()
        .unwrap();
    let hello = timeout(LIMIT, client.hello()).await.unwrap();
    assert!(hello.is_ok(), "{hello:?}\n{}", log());
    let (result, _) = generate(&mut client, &greedy(PROMPT, 4)).await;
    assert_eq!(result.usage.completion_tokens, 4);

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("odmoed did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}\n{}", log());
    assert!(socket.exists(), "the service manager's socket was removed");
    assert!(log().contains("service manager"), "{}", log());
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_without_a_chat_template_says_so() {
    let daemon = Daemon::start().await;
    // The fixture without its chat template.
    let copy = daemon.dir().join("no_template");
    fs::create_dir(&copy).unwrap();
    for entry in fs::read_dir(model()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let config_path = copy.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    fs::write(&config_path, config.to_string()).unwrap();

    let mut client = daemon.client().await;
    let chat = GenerateParams {
        prompt: None,
        messages: Some(vec![ChatMessage {
            role: "user".into(),
            content: "Hello".into(),
        }]),
        ..greedy("", 4)
    };
    let with_template = timeout(
        LIMIT,
        client.generate_streaming(Method::Chat, &chat, |_| {}, std::future::pending()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(with_template.usage.completion_tokens, 4);

    client.load(&copy, None).await.unwrap();
    let error = expect_rpc_error(
        timeout(
            LIMIT,
            client.generate_streaming(Method::Chat, &chat, |_| {}, std::future::pending()),
        )
        .await
        .unwrap(),
    );
    assert_eq!(error.code, ErrorCode::InvalidParams);
    assert!(error.message.contains("chat_template"), "{}", error.message);
    // Plain prompts still work.
    generate(&mut client, &greedy(PROMPT, 4)).await;
}

/// `nvim`, which `scripts/setup.sh` installs.
fn nvim() -> &'static str {
    let found = Command::new("nvim")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(found, "nvim not found: run scripts/setup.sh");
    "nvim"
}

/// Waits for `child`, killing it after [`LIMIT`].
fn wait_bounded(mut child: Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{what} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn neovim_rpcrequest_gets_the_clients_reply() {
    let nvim = nvim();
    let daemon = Daemon::start().await;
    let params = GenerateParams {
        stream: false,
        ..greedy(PROMPT, 8)
    };
    let (expected, events) = generate(&mut daemon.client().await, &params).await;
    assert!(events.is_empty(), "stream = false sends no tokens");
    assert!(!expected.text.is_empty());

    let out = daemon.dir().join("nvim.out");
    let script = daemon.dir().join("generate.lua");
    let lua = format!(
        r#"
local ok, result = pcall(function()
  local ch = vim.fn.sockconnect('pipe', {socket:?}, {{rpc = true}})
  return vim.rpcrequest(ch, 'generate', {{prompt = {prompt:?}, max_tokens = 8, temperature = 0, stream = false}})
end)
local file = io.open({out:?}, 'w')
if ok then file:write(result.text) else file:write('ERROR: ' .. tostring(result)) end
file:close()
vim.cmd(ok and 'qall!' or 'cquit! 1')
"#,
        socket = daemon.socket().to_str().unwrap(),
        prompt = PROMPT,
        out = out.to_str().unwrap(),
    );
    fs::write(&script, lua).unwrap();
    let child = Command::new(nvim)
        .args(["--headless", "-u", "NONE", "-i", "NONE", "-n", "-c"])
        .arg(format!("luafile {}", script.display()))
        .env("HOME", daemon.dir())
        .env("XDG_CONFIG_HOME", daemon.dir().join("config"))
        .env("XDG_DATA_HOME", daemon.dir().join("data"))
        .env("XDG_STATE_HOME", daemon.dir().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || wait_bounded(child, "nvim"))
        .await
        .unwrap();
    let written = fs::read_to_string(&out).unwrap_or_default();
    assert!(status.success(), "nvim: {status}: {written}");
    assert_eq!(written, expected.text);
}

/// Runs the Lua file `script` in a headless Neovim with the plugin of `editors/nvim` on its
/// runtime path, isolated in `home`; fails if it does not exit 0 within the limit.
fn run_headless_nvim(home: &Path, script: &Path) -> ExitStatus {
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../editors/nvim");
    let child = Command::new(nvim())
        .args(["--headless", "-u", "NONE", "-i", "NONE", "-n", "--cmd"])
        .arg(format!("set rtp^={}", plugin.display()))
        .arg("-c")
        .arg("runtime plugin/odmoe.lua")
        .arg("-c")
        .arg(format!("luafile {}", script.display()))
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_STATE_HOME", home.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_bounded(child, "nvim")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_neovim_plugin_streams_a_reply_into_a_buffer_and_stops_on_ctrl_c() {
    let daemon = Daemon::start().await;
    let chat = GenerateParams {
        prompt: None,
        messages: Some(vec![ChatMessage {
            role: "user".into(),
            content: PROMPT.into(),
        }]),
        stream: false,
        ..greedy(PROMPT, 8)
    };
    let expected: GenerateResult = daemon.client().await.call("chat", &chat).await.unwrap();
    assert!(!expected.text.is_empty());

    let out = daemon.dir().join("nvim.out");
    let script = daemon.dir().join("plugin.lua");
    let lua = format!(
        r#"
local out = io.open({out:?}, 'w')
local ran, failure = pcall(function()
local odmoe = require('odmoe')
local function wait_idle() return vim.wait(60000, function() return not odmoe.busy() end, 10) end
vim.g.odmoe_socket = {socket:?}
vim.g.odmoe_options = {{temperature = 0, top_k = 0, top_p = 1, min_p = 0, repetition_penalty = 1, seed = 0, max_tokens = 8}}
vim.cmd('Odmoe ' .. {prompt:?})
local reply = vim.api.nvim_get_current_buf()
local idle = wait_idle()
out:write(('reply idle=%s finish=%s\n'):format(idle, vim.b[reply].odmoe_finish))
out:write(vim.fn.json_encode(table.concat(vim.api.nvim_buf_get_lines(reply, 0, -1, false), '\n')) .. '\n')

vim.g.odmoe_options = {{temperature = 0, max_tokens = 3000}}
vim.cmd('Odmoe Count to a thousand')
local long = vim.api.nvim_get_current_buf()
vim.wait(60000, function() return vim.api.nvim_buf_get_lines(long, 0, 1, false)[1] ~= '' end, 10)
vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes('<C-c>', true, false, true), 'x', false)
idle = wait_idle()
out:write(('cancel idle=%s finish=%s\n'):format(idle, vim.b[long].odmoe_finish))

vim.g.odmoe_options = {{temperature = 0, max_tokens = 4}}
vim.cmd('OdmoeChat Hello there')
local chat = vim.api.nvim_get_current_buf()
idle = wait_idle()
out:write(('chat idle=%s %s\n'):format(idle, vim.fn.json_encode(vim.api.nvim_buf_get_lines(chat, 0, -1, false))))

vim.cmd('enew')
vim.api.nvim_buf_set_lines(0, 0, -1, false, {{'fn main() {{', '    println!("hi");', '}}'}})
vim.cmd('1,3OdmoeSelection Explain this code.')
local explained = vim.api.nvim_get_current_buf()
idle = wait_idle()
out:write(('selection idle=%s finish=%s\n'):format(idle, vim.b[explained].odmoe_finish))

vim.g.odmoe_options = {{temperature = -1}}
vim.cmd('Odmoe Hello')
local refused = vim.api.nvim_get_current_buf()
idle = wait_idle()
out:write(('refused idle=%s %s\n'):format(idle, table.concat(vim.api.nvim_buf_get_lines(refused, 0, -1, false), ' ')))

vim.cmd('checkhealth odmoe')
out:write(table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n') .. '\n')
end)
if not ran then out:write('ERROR: ' .. tostring(failure)) end
out:close()
vim.cmd(ran and 'qall!' or 'cquit! 1')
"#,
        socket = daemon.socket().to_str().unwrap(),
        prompt = PROMPT,
        out = out.to_str().unwrap(),
    );
    fs::write(&script, lua).unwrap();
    let home = daemon.dir().to_owned();
    let status = tokio::task::spawn_blocking(move || run_headless_nvim(&home, &script))
        .await
        .unwrap();
    let written = fs::read_to_string(&out).unwrap_or_default();
    assert!(
        status.success(),
        "nvim: {status}: {written}\n{}",
        daemon.log()
    );
    let mut lines = written.lines();
    assert_eq!(
        lines.next(),
        Some("reply idle=true finish=length"),
        "{written}"
    );
    let reply: String = serde_json::from_str(lines.next().unwrap_or("")).unwrap();
    assert_eq!(reply, expected.text, "{written}");
    assert!(
        written.contains("cancel idle=true finish=cancelled"),
        "{written}"
    );
    assert!(
        written.contains("refused idle=true  [odmoe: temperature: "),
        "{written}"
    );
    // The chat buffer: the turn under "## You", the reply under "## odmoe", a new "## You".
    let chat = written
        .lines()
        .find_map(|line| line.strip_prefix("chat idle=true "))
        .unwrap_or_else(|| panic!("{written}"));
    let chat: Vec<String> = serde_json::from_str(chat).unwrap();
    assert_eq!(
        chat[..4],
        ["## You", "Hello there", "", "## odmoe"],
        "{chat:?}"
    );
    assert_eq!(chat[chat.len() - 2..], ["## You", ""], "{chat:?}");
    assert!(
        written.contains("selection idle=true finish=length"),
        "{written}"
    );
    // The chat went on in a daemon session, so the next turn sends only itself. The engine
    // counts the kept session once the turn's job ends, which may be just after the reply; and
    // critical memory pressure on the machine (PSI is system-wide) drops idle sessions, saying so.
    let mut client = daemon.client().await;
    let mut sessions = 0;
    for _ in 0..50 {
        sessions = client.stats().await.unwrap().sessions.count;
        if sessions == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = daemon.log();
    assert!(
        sessions == 1 || log.contains("critical memory pressure: idle sessions"),
        "{sessions} sessions kept\n{log}"
    );
    assert!(written.contains("OK: odmoed 0.1.0 answers at"), "{written}");
    assert!(written.contains("OK: model:"), "{written}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_msgpack_client_reads_tokens_then_the_response() {
    let python = test_python(&["msgpack"]);
    let daemon = Daemon::start().await;
    let (expected, _) = generate(&mut daemon.client().await, &greedy(PROMPT, 8)).await;

    let script = r#"
import json, socket, sys
import msgpack

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(60)
sock.connect(sys.argv[1])
params = {"prompt": sys.argv[2], "max_tokens": 8, "temperature": 0, "stream": True}
sock.sendall(msgpack.packb([0, 7, "generate", [params]]))
unpacker = msgpack.Unpacker(raw=False)
events = []
while True:
    data = sock.recv(65536)
    if not data:
        sys.exit("connection closed before the response")
    unpacker.feed(data)
    for message in unpacker:
        if message[0] == 2:
            assert message[1] == "token", message
            events.append(message[2][0])
        elif message[0] == 1:
            assert message[1] == 7 and message[2] is None, message
            print(json.dumps({"events": events, "result": message[3]}))
            sys.exit(0)
"#;
    let child = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(daemon.socket())
        .arg(PROMPT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let result: GenerateResult = serde_json::from_value(reply["result"].clone()).unwrap();
    assert_eq!(result.tokens, expected.tokens);
    assert_eq!(result.text, expected.text);
    let events: Vec<TokenEvent> = serde_json::from_value(reply["events"].clone()).unwrap();
    assert!(events.len() >= result.tokens.len());
    assert!(events.iter().all(|event| event.id == 7));
    assert_eq!(text_of(&events), result.text);
}

/// `model.kv_cache` decides how the served model keeps attention's keys and values: the same
/// session holds twice the bytes in f32 as in f16 (the default).
#[tokio::test(flavor = "multi_thread")]
async fn the_configured_kv_cache_type_is_what_sessions_hold() {
    let mut bytes = Vec::new();
    for config in [None, Some("[model]\nkv_cache = \"f32\"\n")] {
        let daemon = Daemon::start_with(config, &[]).await;
        let mut client = daemon.client().await;
        let turn = GenerateParams {
            prompt: None,
            tokens: Some(vec![10, 20, 30, 40, 50, 60]),
            session: Some("kept".into()),
            ignore_eos: true,
            ..greedy("", 4)
        };
        generate(&mut client, &turn).await;
        let stats = timeout(LIMIT, client.stats()).await.unwrap().unwrap();
        assert_eq!(stats.sessions.count, 1);
        bytes.push(stats.sessions.kv_bytes);
    }
    assert!(bytes[0] > 0 && bytes[1] == 2 * bytes[0], "{bytes:?}");
}
