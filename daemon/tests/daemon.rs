//! The real `odmoed` binary on a socket in a temporary directory, driven by
//! `odmoe-client` and by raw bytes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use odmoe_client::{Client, ClientError};
use odmoe_e2e::Daemon;
use odmoe_protocol::{ErrorCode, HelloResult, Message, PROTOCOL_VERSION, RpcError, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

/// How long any single step may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

/// What these tests add to the shared [`Daemon`].
trait DaemonExt: Sized {
    /// Starts `odmoed --foreground` on `<tmp>/run/odmoed.sock` with `args`, and
    /// waits until it answers.
    async fn start(args: &[&str]) -> Self;

    /// Like [`DaemonExt::start`], with `--config` naming a file holding `config`.
    async fn start_with_config(config: Option<&str>, args: &[&str]) -> Self;

    /// Starts a new daemon, as the first was started, on the same socket.
    async fn restart(&mut self);
}

impl DaemonExt for Daemon {
    async fn start(args: &[&str]) -> Daemon {
        Daemon::start_with_config(None, args).await
    }

    async fn start_with_config(config: Option<&str>, args: &[&str]) -> Daemon {
        let mut builder = Daemon::builder()
            .program(env!("CARGO_BIN_EXE_odmoed"))
            .args(args)
            .limit(LIMIT);
        if let Some(config) = config {
            builder = builder.config(config);
        }
        let mut daemon = builder.spawn();
        daemon.wait_until_serving().await;
        daemon
    }

    async fn restart(&mut self) {
        self.respawn();
        self.wait_until_serving().await;
    }
}

/// `odmoed --foreground --socket SOCKET`, configured from `dir`.
fn foreground(dir: &Path, socket: &Path) -> Command {
    let mut command = odmoed(dir);
    command.arg("--foreground").arg("--socket").arg(socket);
    command
}

/// `odmoed`, with the config directory pointed into `dir` so that the
/// developer's own config cannot leak in.
fn odmoed(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_odmoed"));
    command
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
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

fn expect_rpc_error(result: Result<Value, ClientError>) -> RpcError {
    match result {
        Err(ClientError::Rpc(error)) => error,
        other => panic!("expected an error response, got {other:?}"),
    }
}

/// The smallest committed fixture model (the end-to-end tests' crate holds them).
fn fixture_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/qwen3_moe")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

#[tokio::test]
async fn hello_through_the_client() {
    let model = fixture_model();
    let daemon = Daemon::start(&["--model", &model]).await;
    let mut client = daemon.client().await;
    let hello = timeout(LIMIT, client.hello()).await.unwrap().unwrap();
    assert_eq!(
        hello,
        HelloResult {
            protocol_version: PROTOCOL_VERSION,
            server_version: env!("CARGO_PKG_VERSION").into(),
            model: Some(model),
        }
    );
}

#[test]
fn a_model_that_cannot_load_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = foreground(dir.path(), &dir.path().join("run").join("odmoed.sock"))
        .arg("--model")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot serve"), "{stderr}");
    assert!(stderr.contains("config.json"), "{stderr}");
}

#[tokio::test]
async fn hello_as_raw_bytes_from_an_editor() {
    let daemon = Daemon::start(&[]).await;
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
    let daemon = Daemon::start(&[]).await;
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
    let daemon = Daemon::start(&[]).await;
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
    let daemon = Daemon::start_with_config(Some(config), &[]).await;
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
    let daemon = Daemon::start(&[]).await;
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(daemon.socket()), 0o600);
    assert_eq!(mode(daemon.socket().parent().unwrap()), 0o700);
}

#[tokio::test]
async fn sigterm_stops_the_daemon_and_removes_the_socket() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut daemon = Daemon::start(&[]).await;
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
    let mut daemon = Daemon::start(&[]).await;
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
    let daemon = Daemon::start(&[]).await;
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
    let mut daemon = Daemon::start(&[]).await;
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
    let daemon = Daemon::start(&[]).await;
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
