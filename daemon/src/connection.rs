//! One client: who it is, then its messages in order until it leaves, breaks
//! the protocol, or the daemon shuts down.

use std::io;

use odmoe_protocol::{
    ErrorCode, Message, MessageReader, ReadError, Response, RpcError, write_message,
};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tracing::{debug, warn};

use crate::dispatch::dispatch;
use crate::server::State;
use crate::shutdown::Shutdown;

/// A client's socket, read and written as whole messages.
struct Connection {
    /// Incoming messages, each at most the configured size.
    reader: MessageReader<OwnedReadHalf>,
    /// Outgoing messages.
    writer: OwnedWriteHalf,
}

impl Connection {
    fn new(stream: UnixStream, max_message_bytes: usize) -> Connection {
        let (read, writer) = stream.into_split();
        Connection {
            reader: MessageReader::new(read, max_message_bytes),
            writer,
        }
    }

    async fn read_message(&mut self) -> Result<Option<Message>, ReadError> {
        self.reader.read_message().await
    }

    async fn write_message(&mut self, message: impl Into<Message>) -> io::Result<()> {
        write_message(&mut self.writer, &message.into()).await
    }

    /// Answers with an error that no request can be tied to: msgid 0, as
    /// Neovim does.
    async fn write_connection_error(&mut self, error: RpcError) -> io::Result<()> {
        self.write_message(Response::error(0, error)).await
    }
}

/// Whether a peer running as `peer_uid` may use a daemon running as `daemon_uid`:
/// the same user, or root.
pub fn peer_allowed(peer_uid: u32, daemon_uid: u32) -> bool {
    peer_uid == daemon_uid || peer_uid == 0
}

/// The uid of the process at the other end of `stream`, from the kernel.
fn peer_uid(stream: &UnixStream) -> nix::Result<u32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        getsockopt(stream, PeerCredentials).map(|credentials| credentials.uid())
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        nix::unistd::getpeereid(stream).map(|(uid, _)| uid.as_raw())
    }
}

/// Serves one client until it disconnects, sends something unreadable, or the
/// daemon shuts down. Errors end only this connection.
pub async fn serve(stream: UnixStream, state: &State, mut shutdown: Shutdown) -> io::Result<()> {
    let uid = peer_uid(&stream).map_err(io::Error::from)?;
    let mut connection = Connection::new(stream, state.max_message_bytes);
    if !peer_allowed(uid, state.uid) {
        warn!(peer_uid = uid, "refused a connection from another user");
        let error = RpcError::new(
            ErrorCode::Unauthorized,
            "this odmoed serves only the user that started it",
        );
        return connection.write_connection_error(error).await;
    }
    debug!(peer_uid = uid, "client connected");

    loop {
        let message = tokio::select! {
            message = connection.read_message() => message,
            () = shutdown.recv() => return Ok(()),
        };
        match message {
            Ok(None) => {
                debug!("client disconnected");
                return Ok(());
            }
            Ok(Some(Message::Request(request))) => {
                debug!(msgid = request.msgid, method = %request.method, "request");
                let outcome = dispatch(&request, state);
                let response = Response {
                    msgid: request.msgid,
                    outcome,
                };
                connection.write_message(response).await?;
            }
            Ok(Some(Message::Notification(notification))) => {
                debug!(method = %notification.method, "ignoring a notification");
            }
            Ok(Some(Message::Response(response))) => {
                debug!(
                    msgid = response.msgid,
                    "ignoring a response: odmoed sends no requests"
                );
            }
            Err(ReadError::Invalid(invalid)) => {
                warn!(error = %invalid, "invalid message");
                let msgid = invalid.msgid.unwrap_or(0);
                connection
                    .write_message(Response::error(msgid, invalid.error))
                    .await?;
            }
            Err(ReadError::Frame(error)) => {
                // Unreadable bytes or a message over the limit: the stream
                // cannot be resynchronised, so say why and hang up.
                warn!(%error, "closing the connection");
                connection
                    .write_connection_error(error.to_rpc_error())
                    .await?;
                return Ok(());
            }
            Err(ReadError::Truncated { buffered }) => {
                debug!(buffered, "client left in the middle of a message");
                return Ok(());
            }
            Err(ReadError::Io(error)) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_user_or_root_may_connect() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1000, 0));
    }
}
