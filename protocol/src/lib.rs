//! The odmoe wire protocol: msgpack-RPC as Neovim speaks it.
//!
//! Clients talk to `odmoed` over a Unix socket with three kinds of message, each
//! a msgpack array:
//!
//! | kind         | wire form                        |
//! |--------------|----------------------------------|
//! | request      | `[0, msgid, method, [params]]`   |
//! | response     | `[1, msgid, error, result]`      |
//! | notification | `[2, method, [params]]`          |
//!
//! `params` is one map of named fields, so Neovim can call the daemon directly
//! with `rpcrequest(chan, "hello", {"client": "nvim"})`. Errors are maps
//! `{code, message}` whose `code` is one of the stable names of [`ErrorCode`].
//! A message that cannot be tied to a request (unparseable bytes, a message too
//! large) is answered with msgid 0, as Neovim does.
//!
//! msgpack carries no length prefix: [`MessageReader`] buffers bytes and uses
//! [`FrameScanner`] to find where each value ends, checking every declared
//! length against a size limit before anything that large is buffered or
//! allocated.
//!
//! ```
//! use odmoe_protocol::{HelloParams, Message, Request, decode, encode};
//!
//! let hello = Request::new(1, "hello", &HelloParams { client: Some("doc".into()) })?;
//! let bytes = encode(&Message::Request(hello.clone()));
//! let (message, used) = decode(&bytes, 1024)?.expect("a whole message");
//! assert_eq!(used, bytes.len());
//! assert_eq!(message, Message::Request(hello));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Over a stream, read with [`MessageReader::read_message`] and write with
//! [`write_message`].

mod codec;
mod error;
mod message;
mod methods;

pub use codec::{
    DEFAULT_MAX_MESSAGE_BYTES, FrameError, FrameScanner, MessageReader, ReadError, decode, encode,
    encode_value, frame_len, write_message,
};
pub use error::{ErrorCode, RpcError};
pub use message::{
    EncodeError, InvalidMessage, Message, Notification, Request, Response, from_value, to_params,
    to_value,
};
pub use methods::{
    AvailableModel, BudgetAdjustment, CancelParams, CancelResult, ChatMessage, GenerateParams,
    GenerateResult, HelloParams, HelloResult, KeepAliveParam, LoadParams, MemoryStats, Method,
    ModelInfo, ModelsResult, PROTOCOL_VERSION, PressureParams, QUEUED_NOTIFICATION, QueueStats,
    QueuedEvent, Relay, STARTED_NOTIFICATION, SessionStats, StartedEvent, StatsResult, StoreStats,
    TOKEN_NOTIFICATION, Timings, TokenEvent, Usage,
};
pub use rmpv::Value;
