//! A small client for `odmoed`, the odmoe daemon, over its Unix socket.
//!
//! It speaks the msgpack-RPC of [`odmoe_protocol`] and nothing else: no engine,
//! no model code. [`Client`] is async (tokio); [`BlockingClient`] wraps it with
//! its own single-threaded runtime for programs that are not async.
//!
//! ```no_run
//! use odmoe_client::BlockingClient;
//!
//! let mut client = BlockingClient::connect_default()?;
//! let hello = client.hello()?;
//! println!("odmoed {} serving {:?}", hello.server_version, hello.model);
//! # Ok::<(), odmoe_client::ClientError>(())
//! ```
//!
//! Requests are answered in turn: [`Client::request`] sends one request, then
//! reads until the response with the same msgid arrives, keeping any
//! notifications that come first for [`Client::take_notifications`].
//!
//! Generation streams: [`Client::generate_streaming`] hands each token to a
//! callback as it arrives and sends `cancel` when a future of the caller's
//! completes first.
//!
//! ```no_run
//! use odmoe_client::Client;
//! use odmoe_protocol::{GenerateParams, Method};
//!
//! # async fn example() -> Result<(), odmoe_client::ClientError> {
//! let mut client = Client::connect_default().await?;
//! let params = GenerateParams {
//!     prompt: Some("The quick brown fox".into()),
//!     max_tokens: Some(32),
//!     ..GenerateParams::default()
//! };
//! let ctrl_c = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! let result = client
//!     .generate_streaming(Method::Generate, &params, |token| print!("{}", token.text), ctrl_c)
//!     .await?;
//! println!("\n({})", result.finish_reason);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use odmoe_config::{Config, ConfigError};
use odmoe_protocol::{
    CancelParams, DEFAULT_MAX_MESSAGE_BYTES, EncodeError, GenerateParams, GenerateResult,
    HelloParams, HelloResult, LoadParams, MemoryStats, Message, MessageReader, Method, ModelInfo,
    ModelsResult, Notification, PressureParams, QUEUED_NOTIFICATION, QueuedEvent, ReadError,
    Request, RpcError, STARTED_NOTIFICATION, StartedEvent, StatsResult, TOKEN_NOTIFICATION,
    TokenEvent, Value, write_message,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// What the client says it is in `hello`.
const CLIENT_NAME: &str = concat!("odmoe-client ", env!("CARGO_PKG_VERSION"));

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the socket path.
    #[error("is odmoed running? socket {} not found", path.display())]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
    },
    /// A socket file exists but nobody listens on it.
    #[error(
        "is odmoed running? connection to {} refused (the socket may be left over from a daemon that exited)",
        path.display()
    )]
    Refused {
        /// The socket path tried.
        path: PathBuf,
    },
    /// Connecting failed for another reason, e.g. permission denied.
    #[error("cannot connect to odmoed at {}", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The process listening at the socket runs as another user: it may be
    /// posing as odmoed (whoever can swap a link or directory on the socket
    /// path can listen there), so nothing was sent to it. Even root's client
    /// talks only to root's daemon.
    #[error(
        "refusing to use {}: the process listening there runs as uid {daemon_uid}, not as this \
         user (uid {client_uid}), so it may be another user's program posing as odmoed; nothing \
         was sent. Use the socket of an odmoed you started yourself",
        path.display()
    )]
    OtherUser {
        /// The socket path tried.
        path: PathBuf,
        /// The user the listening process runs as.
        daemon_uid: u32,
        /// The effective user of this process.
        client_uid: u32,
    },
    /// The config that names the socket could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The blocking client could not start its runtime.
    #[error("cannot start the client runtime")]
    Runtime(#[source] io::Error),
    /// Writing to or reading from the socket failed.
    #[error("connection to odmoed failed")]
    Io(#[from] io::Error),
    /// The daemon closed the connection before answering.
    #[error("odmoed closed the connection")]
    Closed,
    /// The daemon sent something that is not a valid message.
    #[error("odmoed sent an unreadable message")]
    Protocol(#[from] ReadError),
    /// The params could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The daemon answered with an error.
    #[error("odmoed: {0}")]
    Rpc(RpcError),
    /// The result did not have the expected shape.
    #[error("unexpected result from `{method}`")]
    Decode {
        /// The method called.
        method: String,
        /// What did not fit.
        source: rmpv::ext::Error,
    },
}

/// An async connection to the daemon.
#[derive(Debug)]
pub struct Client {
    /// Incoming messages, framed and size-limited.
    reader: MessageReader<OwnedReadHalf>,
    /// Outgoing messages.
    writer: OwnedWriteHalf,
    /// The msgid of the next request; never 0, which the daemon uses for
    /// errors it cannot tie to a request.
    next_msgid: u32,
    /// Notifications received while waiting for responses, oldest first.
    notifications: VecDeque<Notification>,
}

/// What happens to a generation before its result, as the daemon tells it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GenerateEvent<'a> {
    /// It waits behind `position` others.
    Queued { position: u32 },
    /// It left the queue: its prompt of this many tokens is computed now.
    Started { prompt_tokens: u32 },
    /// Text generated.
    Token(&'a TokenEvent),
}

/// Hands `notification` to `on_event` when it is about request `msgid`; false
/// when it is not (it is kept for [`Client::take_notifications`]).
fn notify_event(
    msgid: u32,
    notification: &Notification,
    on_event: &mut impl FnMut(GenerateEvent<'_>),
) -> bool {
    let params = || notification.params.clone();
    match notification.method.as_str() {
        TOKEN_NOTIFICATION => match odmoe_protocol::from_value::<TokenEvent>(params()) {
            Ok(token) if token.id == msgid => on_event(GenerateEvent::Token(&token)),
            _ => return false,
        },
        QUEUED_NOTIFICATION => match odmoe_protocol::from_value::<QueuedEvent>(params()) {
            Ok(queued) if queued.id == msgid => on_event(GenerateEvent::Queued {
                position: queued.position,
            }),
            _ => return false,
        },
        STARTED_NOTIFICATION => match odmoe_protocol::from_value::<StartedEvent>(params()) {
            Ok(started) if started.id == msgid => on_event(GenerateEvent::Started {
                prompt_tokens: started.prompt_tokens,
            }),
            _ => return false,
        },
        _ => return false,
    }
    true
}

impl Client {
    /// Connects to the daemon listening at `path`, which must run as this
    /// process's effective user ([`ClientError::OtherUser`] otherwise).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| connect_error(path, source))?;
        ensure_same_user(&stream, path)?;
        let (read, writer) = stream.into_split();
        Ok(Client {
            reader: MessageReader::new(read, DEFAULT_MAX_MESSAGE_BYTES),
            writer,
            next_msgid: 1,
            notifications: VecDeque::new(),
        })
    }

    /// Connects to the socket named by the user's config file, or the
    /// platform's default socket when the config names none.
    pub async fn connect_default() -> Result<Client, ClientError> {
        Client::connect(default_socket()?).await
    }

    /// Calls `hello`: the daemon's protocol and server versions and its model.
    pub async fn hello(&mut self) -> Result<HelloResult, ClientError> {
        let params = HelloParams {
            client: Some(CLIENT_NAME.to_owned()),
        };
        self.call(Method::Hello.name(), &params).await
    }

    /// Calls `generate` or `chat` (`method`) and returns its result, calling
    /// `on_token` for each `token` notification of this request as it arrives
    /// (when `params.stream` is true, the default).
    ///
    /// If `cancel` completes before the result, a `cancel` request is sent and
    /// reading goes on until the result, whose `finish_reason` is then
    /// "cancelled". Pass `std::future::pending()` to never cancel.
    pub async fn generate_streaming<F, C>(
        &mut self,
        method: Method,
        params: &GenerateParams,
        mut on_token: F,
        cancel: C,
    ) -> Result<GenerateResult, ClientError>
    where
        F: FnMut(&TokenEvent),
        C: Future<Output = ()>,
    {
        let on_event = |event: GenerateEvent<'_>| {
            if let GenerateEvent::Token(token) = event {
                on_token(token);
            }
        };
        self.generate_with_events(method, params, on_event, cancel)
            .await
    }

    /// [`Client::generate_streaming`], telling `on_event` also when the
    /// request waits in the queue and when its prompt starts computing.
    pub async fn generate_with_events<F, C>(
        &mut self,
        method: Method,
        params: &GenerateParams,
        mut on_event: F,
        cancel: C,
    ) -> Result<GenerateResult, ClientError>
    where
        F: FnMut(GenerateEvent<'_>),
        C: Future<Output = ()>,
    {
        let msgid = self.send_request(method.name(), params).await?;
        let mut cancel = std::pin::pin!(cancel);
        let mut cancel_sent = false;
        loop {
            let message = tokio::select! {
                message = self.reader.read_message() => message?,
                () = &mut cancel, if !cancel_sent => {
                    cancel_sent = true;
                    // Its answer is skipped like any response to another msgid.
                    self.send_request(Method::Cancel.name(), &CancelParams { id: msgid })
                        .await?;
                    continue;
                }
            };
            match message {
                Some(Message::Response(response)) if response.msgid == msgid => {
                    let result = response.outcome.map_err(ClientError::Rpc)?;
                    return decode(method.name(), result);
                }
                Some(Message::Notification(notification)) => {
                    if !notify_event(msgid, &notification, &mut on_event) {
                        self.notifications.push_back(notification);
                    }
                }
                other => self.keep_or_fail(other)?,
            }
        }
    }

    /// Calls `stats`: the daemon's telemetry.
    pub async fn stats(&mut self) -> Result<StatsResult, ClientError> {
        self.call(Method::Stats.name(), &()).await
    }

    /// Calls `models`: the model the daemon serves, if any.
    pub async fn models(&mut self) -> Result<ModelsResult, ClientError> {
        self.call(Method::Models.name(), &()).await
    }

    /// Calls `load`: replaces the daemon's model with the one at `path` (made
    /// absolute here, since the daemon has its own working directory), with
    /// `budget` ("auto", a size such as "8GiB", or a percentage of all experts)
    /// or else the daemon's configured budget.
    pub async fn load(
        &mut self,
        path: impl AsRef<Path>,
        budget: Option<&str>,
    ) -> Result<ModelInfo, ClientError> {
        let params = LoadParams {
            path: std::path::absolute(path.as_ref())?
                .to_string_lossy()
                .into_owned(),
            expert_budget: budget.map(str::to_owned),
        };
        self.call(Method::Load.name(), &params).await
    }

    /// Calls `unload`: the daemon drops its model and sessions.
    pub async fn unload(&mut self) -> Result<(), ClientError> {
        self.request(Method::Unload.name(), &()).await.map(drop)
    }

    /// Calls `shutdown`: the daemon stops gracefully.
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.request(Method::Shutdown.name(), &()).await.map(drop)
    }

    /// Calls `pressure {level}`: the daemon takes `level` ("normal", "warn" or
    /// "critical") as its memory-pressure level until released, and answers
    /// with its memory stats.
    pub async fn simulate_pressure(&mut self, level: &str) -> Result<MemoryStats, ClientError> {
        let params = PressureParams {
            level: Some(level.to_owned()),
            release: false,
        };
        self.call(Method::Pressure.name(), &params).await
    }

    /// Calls `pressure {release: true}`: the daemon goes back to the real
    /// memory-pressure level.
    pub async fn release_pressure(&mut self) -> Result<MemoryStats, ClientError> {
        let params = PressureParams {
            level: None,
            release: true,
        };
        self.call(Method::Pressure.name(), &params).await
    }

    /// Calls `method` and decodes its result into `R`.
    pub async fn call<P, R>(&mut self, method: &str, params: &P) -> Result<R, ClientError>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let result = self.request(method, params).await?;
        decode(method, result)
    }

    /// Sends a request for `method` with `params` (a struct or map) and waits
    /// for its response. Notifications arriving meanwhile are kept for
    /// [`Client::take_notifications`]; responses to earlier, abandoned requests
    /// are skipped.
    ///
    /// If the returned future is dropped while the request is being written, the
    /// connection is left mid-message and should be dropped too.
    pub async fn request<P: Serialize + ?Sized>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<Value, ClientError> {
        let msgid = self.send_request(method, params).await?;
        loop {
            match self.reader.read_message().await? {
                Some(Message::Response(response)) if response.msgid == msgid => {
                    return response.outcome.map_err(ClientError::Rpc);
                }
                other => self.keep_or_fail(other)?,
            }
        }
    }

    /// Writes a request with a fresh msgid and returns the msgid.
    async fn send_request<P: Serialize + ?Sized>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<u32, ClientError> {
        let msgid = self.next_msgid;
        self.next_msgid = self.next_msgid.checked_add(1).unwrap_or(1);
        let request = Request::new(msgid, method, params)?;
        if let Err(error) = write_message(&mut self.writer, &request.into()).await {
            return Err(self.why_write_failed(error).await);
        }
        Ok(msgid)
    }

    /// The daemon hangs up on a message it refuses (one over its size limit)
    /// after saying why: that answer, still readable, explains a broken pipe
    /// better than the pipe does.
    async fn why_write_failed(&mut self, error: io::Error) -> ClientError {
        use io::ErrorKind::{BrokenPipe, ConnectionReset};
        if matches!(error.kind(), BrokenPipe | ConnectionReset)
            && let Ok(Some(Message::Response(response))) = self.reader.read_message().await
            && response.msgid == 0
            && let Err(refusal) = response.outcome
        {
            return ClientError::Rpc(refusal);
        }
        ClientError::Io(error)
    }

    /// Handles a message that is not the awaited response: notifications are
    /// kept, responses to other requests skipped; an error the daemon could not
    /// tie to a request, or the end of the stream, ends the wait.
    fn keep_or_fail(&mut self, message: Option<Message>) -> Result<(), ClientError> {
        match message {
            Some(Message::Response(response)) if response.msgid == 0 => match response.outcome {
                Err(error) => Err(ClientError::Rpc(error)),
                Ok(_) => Ok(()),
            },
            Some(Message::Response(_)) | Some(Message::Request(_)) => Ok(()),
            Some(Message::Notification(notification)) => {
                self.notifications.push_back(notification);
                Ok(())
            }
            None => Err(ClientError::Closed),
        }
    }

    /// The notifications received so far, oldest first, leaving none behind.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        self.notifications.drain(..).collect()
    }
}

/// A [`Client`] for code that is not async: each call runs on a
/// single-threaded tokio runtime owned by the client.
#[derive(Debug)]
pub struct BlockingClient {
    /// Runs the calls of `client`.
    runtime: tokio::runtime::Runtime,
    /// The connection.
    client: Client,
}

impl BlockingClient {
    /// Connects to the daemon listening at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<BlockingClient, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let client = runtime.block_on(Client::connect(path))?;
        Ok(BlockingClient { runtime, client })
    }

    /// Connects to the socket named by the user's config file, or the
    /// platform's default socket when the config names none.
    pub fn connect_default() -> Result<BlockingClient, ClientError> {
        BlockingClient::connect(default_socket()?)
    }

    /// See [`Client::hello`].
    pub fn hello(&mut self) -> Result<HelloResult, ClientError> {
        self.runtime.block_on(self.client.hello())
    }

    /// See [`Client::generate_streaming`]; here `cancel` is a flag, looked at
    /// every few milliseconds (set it from a signal handler or another thread).
    pub fn generate_streaming<F>(
        &mut self,
        method: Method,
        params: &GenerateParams,
        on_token: F,
        cancel: &AtomicBool,
    ) -> Result<GenerateResult, ClientError>
    where
        F: FnMut(&TokenEvent),
    {
        let cancelled = async {
            while !cancel.load(Ordering::Relaxed) {
                tokio::time::sleep(CANCEL_POLL).await;
            }
        };
        self.runtime.block_on(
            self.client
                .generate_streaming(method, params, on_token, cancelled),
        )
    }

    /// See [`Client::stats`].
    pub fn stats(&mut self) -> Result<StatsResult, ClientError> {
        self.runtime.block_on(self.client.stats())
    }

    /// See [`Client::models`].
    pub fn models(&mut self) -> Result<ModelsResult, ClientError> {
        self.runtime.block_on(self.client.models())
    }

    /// See [`Client::load`].
    pub fn load(
        &mut self,
        path: impl AsRef<Path>,
        budget: Option<&str>,
    ) -> Result<ModelInfo, ClientError> {
        self.runtime.block_on(self.client.load(path, budget))
    }

    /// See [`Client::unload`].
    pub fn unload(&mut self) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.unload())
    }

    /// See [`Client::shutdown`].
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.shutdown())
    }

    /// See [`Client::simulate_pressure`].
    pub fn simulate_pressure(&mut self, level: &str) -> Result<MemoryStats, ClientError> {
        self.runtime.block_on(self.client.simulate_pressure(level))
    }

    /// See [`Client::release_pressure`].
    pub fn release_pressure(&mut self) -> Result<MemoryStats, ClientError> {
        self.runtime.block_on(self.client.release_pressure())
    }

    /// See [`Client::call`].
    pub fn call<P, R>(&mut self, method: &str, params: &P) -> Result<R, ClientError>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.runtime.block_on(self.client.call(method, params))
    }

    /// See [`Client::request`].
    pub fn request<P: Serialize + ?Sized>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<Value, ClientError> {
        self.runtime.block_on(self.client.request(method, params))
    }

    /// See [`Client::take_notifications`].
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        self.client.take_notifications()
    }
}

/// How often [`BlockingClient::generate_streaming`] looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// `result` decoded as the result of `method`.
fn decode<R: DeserializeOwned>(method: &str, result: Value) -> Result<R, ClientError> {
    odmoe_protocol::from_value(result).map_err(|source| ClientError::Decode {
        method: method.to_owned(),
        source,
    })
}

/// The socket the daemon listens on, by the user's config file.
pub fn default_socket() -> Result<PathBuf, ClientError> {
    Ok(Config::load(None)?.0.socket_path())
}

fn connect_error(path: &Path, source: io::Error) -> ClientError {
    let path = path.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning { path },
        io::ErrorKind::ConnectionRefused => ClientError::Refused { path },
        _ => ClientError::Connect { path, source },
    }
}

/// Refuses the connection, before anything is sent on it, unless the process
/// that listens on it (as the kernel reports) runs as this process's effective
/// user: the prompts are for the user's own daemon only.
fn ensure_same_user(stream: &UnixStream, path: &Path) -> Result<(), ClientError> {
    let daemon_uid = stream
        .peer_cred()
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?
        .uid();
    let client_uid = nix::unistd::geteuid().as_raw();
    if daemon_uid != client_uid {
        return Err(ClientError::OtherUser {
            path: path.to_owned(),
            daemon_uid,
            client_uid,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use odmoe_protocol::{ErrorCode, Response, to_value};
    use tokio::net::UnixListener;

    use super::*;

    /// Serves one connection at a fresh socket: `answer` gets each request and
    /// returns the messages to send back; an empty answer hangs up.
    fn serve(
        answer: impl Fn(Request) -> Vec<Message> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odmoed.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = UnixListener::from_std(listener).unwrap();
                let (stream, _) = listener.accept().await.unwrap();
                let (read, mut write) = stream.into_split();
                let mut reader = MessageReader::new(read, 1 << 20);
                while let Ok(Some(Message::Request(request))) = reader.read_message().await {
                    let messages = answer(request);
                    if messages.is_empty() {
                        break;
                    }
                    for message in messages {
                        write_message(&mut write, &message).await.unwrap();
                    }
                }
            });
        });
        (dir, path)
    }

    fn hello_result() -> HelloResult {
        HelloResult {
            protocol_version: 1,
            server_version: "9.9.9".into(),
            model: Some("/models/m.odmoe".into()),
        }
    }

    #[tokio::test]
    async fn a_missing_socket_asks_whether_the_daemon_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odmoed.sock");
        let error = Client::connect(&path).await.unwrap_err();
        assert!(matches!(error, ClientError::NotRunning { .. }), "{error}");
        let shown = error.to_string();
        assert!(shown.starts_with("is odmoed running?"), "{shown}");
        assert!(shown.contains(&path.display().to_string()), "{shown}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odmoed.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let error = Client::connect(&path).await.unwrap_err();
        assert!(matches!(error, ClientError::Refused { .. }), "{error}");
    }

    #[tokio::test]
    async fn responses_are_matched_by_msgid_and_notifications_kept() {
        let (_dir, path) = serve(|request| {
            assert_eq!(request.method, "hello");
            let params: HelloParams = request.parse_params().unwrap();
            assert_eq!(params.client.as_deref(), Some(CLIENT_NAME));
            vec![
                Notification {
                    method: "token".into(),
                    params: Value::Map(vec![(Value::from("text"), Value::from("a"))]),
                }
                .into(),
                Response::ok(request.msgid + 100, Value::from("stale")).into(),
                Response::ok(request.msgid, to_value(&hello_result()).unwrap()).into(),
            ]
        });
        let mut client = Client::connect(&path).await.unwrap();
        assert_eq!(client.hello().await.unwrap(), hello_result());
        assert_eq!(client.hello().await.unwrap(), hello_result());
        let notifications = client.take_notifications();
        assert_eq!(notifications.len(), 2);
        assert_eq!(notifications[0].params["text"].as_str(), Some("a"));
        assert!(client.take_notifications().is_empty());
    }

    #[tokio::test]
    async fn pressure_is_simulated_then_released() {
        let (_dir, path) = serve(|request| {
            assert_eq!(request.method, "pressure");
            let params: PressureParams = request.parse_params().unwrap();
            let memory = MemoryStats {
                level: params.level.clone().unwrap_or_else(|| "normal".into()),
                simulated: !params.release,
                ..MemoryStats::default()
            };
            vec![Response::ok(request.msgid, to_value(&memory).unwrap()).into()]
        });
        let mut client = Client::connect(&path).await.unwrap();
        let memory = client.simulate_pressure("critical").await.unwrap();
        assert_eq!(
            (memory.level.as_str(), memory.simulated),
            ("critical", true)
        );
        let memory = client.release_pressure().await.unwrap();
        assert_eq!((memory.level.as_str(), memory.simulated), ("normal", false));
    }

    #[tokio::test]
    async fn error_responses_become_rpc_errors() {
        let (_dir, path) = serve(|request| {
            let error = RpcError::new(ErrorCode::NotImplemented, "not yet");
            vec![Response::error(request.msgid, error).into()]
        });
        let mut client = Client::connect(&path).await.unwrap();
        match client.request("stats", &()).await {
            Err(ClientError::Rpc(error)) => assert_eq!(error.code, ErrorCode::NotImplemented),
            other => panic!("expected an rpc error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_error_for_msgid_0_ends_the_wait() {
        let (_dir, path) = serve(|_| {
            let error = RpcError::new(ErrorCode::MessageTooLarge, "too big");
            vec![Response::error(0, error).into()]
        });
        let mut client = Client::connect(&path).await.unwrap();
        match client.request("hello", &()).await {
            Err(ClientError::Rpc(error)) => assert_eq!(error.code, ErrorCode::MessageTooLarge),
            other => panic!("expected an rpc error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_reported() {
        let (_dir, path) = serve(|_| Vec::new());
        let mut client = Client::connect(&path).await.unwrap();
        let error = client.request("hello", &()).await.unwrap_err();
        assert!(matches!(error, ClientError::Closed), "{error}");
    }

    fn generated(text: &str, finish_reason: &str) -> GenerateResult {
        GenerateResult {
            text: text.into(),
            tokens: vec![7; text.len()],
            finish_reason: finish_reason.into(),
            usage: odmoe_protocol::Usage::default(),
            timings: odmoe_protocol::Timings::default(),
        }
    }

    fn token(id: u32, text: &str) -> Message {
        Notification::new(
            TOKEN_NOTIFICATION,
            &TokenEvent {
                id,
                text: text.into(),
                token: 7,
            },
        )
        .unwrap()
        .into()
    }

    #[tokio::test]
    async fn streamed_tokens_reach_the_callback_in_order() {
        let (_dir, path) = serve(|request| {
            assert_eq!(request.method, "generate");
            let params: GenerateParams = request.parse_params().unwrap();
            assert_eq!(params.prompt.as_deref(), Some("Hi"));
            let id = request.msgid;
            vec![
                token(id, "a"),
                // Another request's token is not this one's.
                token(id + 50, "x"),
                token(id, "b"),
                Response::ok(id, to_value(&generated("ab", "length")).unwrap()).into(),
            ]
        });
        let mut client = Client::connect(&path).await.unwrap();
        let params = GenerateParams {
            prompt: Some("Hi".into()),
            ..GenerateParams::default()
        };
        let mut texts = Vec::new();
        let result = client
            .generate_streaming(
                Method::Generate,
                &params,
                |event| texts.push(event.text.clone()),
                std::future::pending(),
            )
            .await
            .unwrap();
        assert_eq!(texts, ["a", "b"]);
        assert_eq!(result, generated("ab", "length"));
        assert_eq!(client.take_notifications().len(), 1);
    }

    #[tokio::test]
    async fn a_completed_cancel_future_sends_cancel_and_waits_for_the_result() {
        let generate_id = std::sync::Mutex::new(0);
        let (_dir, path) = serve(move |request| match request.method.as_str() {
            "chat" => {
                *generate_id.lock().unwrap() = request.msgid;
                vec![token(request.msgid, "a")]
            }
            "cancel" => {
                let params: CancelParams = request.parse_params().unwrap();
                let id = *generate_id.lock().unwrap();
                assert_eq!(params.id, id);
                vec![
                    Response::ok(request.msgid, Value::Map(vec![])).into(),
                    token(id, "b"),
                    Response::ok(id, to_value(&generated("ab", "cancelled")).unwrap()).into(),
                ]
            }
            other => panic!("unexpected {other}"),
        });
        let mut client = Client::connect(&path).await.unwrap();
        let (first, first_seen) = tokio::sync::oneshot::channel();
        let mut first = Some(first);
        let mut texts = String::new();
        let result = client
            .generate_streaming(
                Method::Chat,
                &GenerateParams::default(),
                |event| {
                    texts.push_str(&event.text);
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                },
                async {
                    let _ = first_seen.await;
                },
            )
            .await
            .unwrap();
        assert_eq!(result.finish_reason, "cancelled");
        assert_eq!(texts, "ab");
    }

    #[test]
    fn the_blocking_client_streams_and_cancels_with_a_flag() {
        let (_dir, path) = serve(|request| match request.method.as_str() {
            "generate" => vec![token(request.msgid, "a")],
            "cancel" => {
                let params: CancelParams = request.parse_params().unwrap();
                vec![
                    Response::ok(params.id, to_value(&generated("a", "cancelled")).unwrap()).into(),
                ]
            }
            other => panic!("unexpected {other}"),
        });
        let mut client = BlockingClient::connect(&path).unwrap();
        let cancel = AtomicBool::new(false);
        let result = client
            .generate_streaming(
                Method::Generate,
                &GenerateParams::default(),
                |_| cancel.store(true, Ordering::Relaxed),
                &cancel,
            )
            .unwrap();
        assert_eq!(result.finish_reason, "cancelled");
    }

    #[test]
    fn the_blocking_client_calls_and_decodes() {
        let (_dir, path) = serve(|request| {
            vec![Response::ok(request.msgid, to_value(&hello_result()).unwrap()).into()]
        });
        let mut client = BlockingClient::connect(&path).unwrap();
        assert_eq!(client.hello().unwrap(), hello_result());
        let error = client.call::<_, u32>("hello", &()).unwrap_err();
        assert!(matches!(error, ClientError::Decode { .. }), "{error}");
    }
}
