//! Why a call to the daemon failed.

use std::io;
use std::path::PathBuf;

use odmoe_config::ConfigError;
use odmoe_protocol::{EncodeError, ReadError, RpcError};

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
