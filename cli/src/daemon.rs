//! What the commands that talk to a running `odmoed` share: the `--socket` flag, connecting with
//! an error that says how to start the daemon, the sampling flags and streamed generation.

use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use odmoe_client::{Client, ClientError, GenerateEvent};
use odmoe_config::KeepAlive;
use odmoe_protocol::{
    ErrorCode, GenerateParams, GenerateResult, KeepAliveParam, Method, TokenEvent,
};

/// What to do when the daemon is not there.
pub const START_HINT: &str = "start it with `odmoed` or `odmoe service install`";

/// `--socket PATH`, shared by every client command.
#[derive(Args, Debug, Clone)]
pub struct SocketArgs {
    /// The daemon's socket [default: `server.socket` from the config file, else the platform's
    /// default, e.g. $XDG_RUNTIME_DIR/odmoe/odmoed.sock]
    #[arg(long, env = "ODMOE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket to use: the flag, else the configured or default one.
    pub fn path(&self) -> Result<PathBuf> {
        match &self.socket {
            Some(path) => Ok(path.clone()),
            None => odmoe_client::default_socket().map_err(explain),
        }
    }

    /// Connects to the daemon.
    pub async fn connect(&self) -> Result<Client> {
        let path = self.path()?;
        Client::connect(&path).await.map_err(explain)
    }
}

/// A client error as the user should read it: a daemon that is not running comes with how to
/// start one.
pub fn explain(error: ClientError) -> anyhow::Error {
    match error {
        ClientError::NotRunning { .. } | ClientError::Refused { .. } => {
            anyhow!("{error}; {START_HINT}")
        }
        ClientError::Rpc(refusal) if refusal.code == ErrorCode::MessageTooLarge => anyhow!(
            "the request is too large for odmoed: {}; the daemon's `server.max_message_bytes` \
             sets the limit",
            refusal.message
        ),
        other => anyhow::Error::new(other),
    }
}

/// A single-threaded runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")
}

/// The sampling flags of `complete` and `chat`. Flags left out are left out of the request, so
/// the daemon's configured defaults apply.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Most tokens to generate [default: the daemon's `generation.max_tokens`].
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy [default: the daemon's].
    #[arg(long = "temp", value_name = "T")]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens (0 = off) [default: the daemon's].
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Nucleus sampling threshold (1 = off) [default: the daemon's].
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the top probability (0 = off) [default: the daemon's].
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the context (1 = off) [default: the daemon's].
    #[arg(long, value_name = "X")]
    pub repeat_penalty: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Always pick the most likely token (same as --temp 0).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// How long the model stays loaded after this reply: a duration (5m, 1h), 0 to unload it
    /// after the reply, -1 to keep it [default: the daemon's `model.keep_alive`].
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = keep_alive)]
    pub keep_alive: Option<String>,
}

/// Checks a keep_alive here, so a typo is not a round trip to the daemon.
fn keep_alive(text: &str) -> Result<String, String> {
    KeepAlive::parse(text)
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
}

impl SamplingArgs {
    /// Params carrying these flags and nothing else.
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            temperature: if self.greedy {
                Some(0.0)
            } else {
                self.temperature
            },
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            keep_alive: self.keep_alive.clone().map(KeepAliveParam::Text),
            // The CLI shows a long prompt being computed.
            progress: true,
            ..GenerateParams::default()
        }
    }
}

/// Runs `generate` or `chat`, calling `on_token` for each streamed token. When `cancel`
/// completes first the request is cancelled and its final result (finish reason "cancelled")
/// returned. While the request waits in the daemon's queue stderr says so, and on a terminal a
/// long prompt shows that it is being computed until the first token.
pub async fn generate<F, C>(
    client: &mut Client,
    method: Method,
    params: &GenerateParams,
    mut on_token: F,
    cancel: C,
) -> Result<GenerateResult>
where
    F: FnMut(&TokenEvent),
    C: Future<Output = ()>,
{
    let terminal = std::io::stderr().is_terminal();
    let mut prefill_shown = false;
    let on_event = |event: GenerateEvent<'_>| match event {
        GenerateEvent::Queued { position } => eprintln!("queued (position {position})"),
        GenerateEvent::Started { prompt_tokens } => {
            if terminal && prompt_tokens >= LONG_PROMPT_TOKENS {
                eprint!("computing a prompt of {prompt_tokens} tokens...");
                prefill_shown = true;
            }
        }
        GenerateEvent::Token(token) => {
            if prefill_shown {
                // Clear the line before the reply goes on.
                eprint!("\r\x1b[2K");
                prefill_shown = false;
            }
            on_token(token);
        }
    };
    let result = client
        .generate_with_events(method, params, on_event, cancel)
        .await
        .map_err(explain);
    if prefill_shown {
        eprint!("\r\x1b[2K");
    }
    result
}

/// Prompts at least this long are worth a word on a terminal while they compute.
const LONG_PROMPT_TOKENS: u32 = 512;

/// Completes on Ctrl-C (SIGINT). While it is alive, Ctrl-C no longer ends the process.
pub async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No handler could be installed: never cancel.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_left_out_are_left_out_of_the_request() {
        let params = SamplingArgs::default().params();
        assert_eq!(
            params,
            GenerateParams {
                progress: true,
                ..GenerateParams::default()
            }
        );
        let greedy = SamplingArgs {
            greedy: true,
            max_tokens: Some(8),
            stop: vec!["\n".into()],
            ..SamplingArgs::default()
        }
        .params();
        assert_eq!(greedy.temperature, Some(0.0));
        assert_eq!(greedy.max_tokens, Some(8));
        assert_eq!(greedy.stop, ["\n"]);
        assert!(greedy.top_k.is_none() && greedy.seed.is_none() && greedy.stream);
    }

    #[test]
    fn a_daemon_not_running_comes_with_how_to_start_it() {
        let error = explain(ClientError::NotRunning {
            path: "/run/user/1/odmoe/odmoed.sock".into(),
        });
        let shown = error.to_string();
        assert!(shown.starts_with("is odmoed running?"), "{shown}");
        assert!(shown.contains("odmoe service install"), "{shown}");
        assert!(
            !explain(ClientError::Closed)
                .to_string()
                .contains("start it")
        );
    }
}
