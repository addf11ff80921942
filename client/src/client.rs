//! [`Client`]: the connection to the daemon, requests matched to their
//! responses, and a method per call.

use std::collections::VecDeque;
use std::io;
use std::path::Path;

use odmoe_protocol::{
    DEFAULT_MAX_MESSAGE_BYTES, HelloParams, HelloResult, LoadParams, MemoryStats, Message,
    MessageReader, Method, ModelInfo, ModelsResult, Notification, PressureParams, Request,
    StatsResult, Value, write_message,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::ClientError;
use crate::socket::{self, default_socket};

/// What the client says it is in `hello`.
const CLIENT_NAME: &str = concat!("odmoe-client ", env!("CARGO_PKG_VERSION"));

/// An async connection to the daemon.
#[derive(Debug)]
pub struct Client {
    /// Incoming messages, framed and size-limited.
    pub(crate) reader: MessageReader<OwnedReadHalf>,
    /// Outgoing messages.
    writer: OwnedWriteHalf,
    /// The msgid of the next request; never 0, which the daemon uses for
    /// errors it cannot tie to a request.
    next_msgid: u32,
    /// Notifications received while waiting for responses, oldest first.
    pub(crate) notifications: VecDeque<Notification>,
}

impl Client {
    /// Connects to the daemon listening at `path`, which must run as this
    /// process's effective user ([`ClientError::OtherUser`] otherwise).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let stream = socket::connect(path.as_ref()).await?;
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
    pub(crate) async fn send_request<P: Serialize + ?Sized>(
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
    pub(crate) fn keep_or_fail(&mut self, message: Option<Message>) -> Result<(), ClientError> {
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
/// `result` decoded as the result of `method`.
pub(crate) fn decode<R: DeserializeOwned>(method: &str, result: Value) -> Result<R, ClientError> {
    odmoe_protocol::from_value(result).map_err(|source| ClientError::Decode {
        method: method.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use odmoe_protocol::{ErrorCode, Response, RpcError, to_value};

    use super::*;
    use crate::test_server::{hello_result, serve};

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
}
