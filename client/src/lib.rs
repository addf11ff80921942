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

mod blocking;
mod client;
mod error;
mod socket;
mod stream;
#[cfg(test)]
mod test_server;

pub use blocking::BlockingClient;
pub use client::Client;
pub use error::ClientError;
pub use socket::default_socket;
pub use stream::GenerateEvent;
