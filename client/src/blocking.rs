//! [`BlockingClient`]: the client for programs that are not async.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use odmoe_protocol::{
    GenerateParams, GenerateResult, HelloResult, MemoryStats, Method, ModelInfo, ModelsResult,
    Notification, StatsResult, TokenEvent, Value,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::socket::default_socket;
use crate::{Client, ClientError};

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

#[cfg(test)]
mod tests {
    use odmoe_protocol::{CancelParams, Response, to_value};

    use super::*;
    use crate::test_server::{generated, hello_result, serve, token};

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
