//! `[server]`: the socket and its limits.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Path of the Unix socket. Default: [`crate::default_socket_path`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Largest message accepted from a client, in bytes; a bigger one closes
    /// the connection. An integer or a size such as `"16MiB"`. Default 16 MiB.
    #[serde(
        deserialize_with = "crate::size::bytes",
        serialize_with = "crate::size::size_text"
    )]
    pub max_message_bytes: u64,
    /// Clients served at once; a client beyond them is told the daemon is
    /// busy and disconnected. Default 64.
    pub max_connections: u32,
    /// Requests one connection may have in flight; past them the daemon reads
    /// nothing more from it until replies are written. Default 32.
    pub max_requests_per_connection: u32,
    /// Seconds a connection may sit without a request in flight or a message
    /// arriving before it is closed; 0 never closes it. Default 600.
    pub idle_timeout_secs: u64,
    /// Seconds a message may take to arrive once it has begun, and a new
    /// connection to send its first message; slower ones are dropped.
    /// Default 10.
    pub message_timeout_secs: u64,
}

/// Default of `server.max_message_bytes`; the same as the protocol's own default.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = odmoe_protocol::DEFAULT_MAX_MESSAGE_BYTES as u64;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_connections: 64,
            max_requests_per_connection: 32,
            idle_timeout_secs: 600,
            message_timeout_secs: 10,
        }
    }
}
