//! `odmoed`: the odmoe daemon. It serves Mixture-of-Experts language models to
//! local clients over a Unix socket speaking msgpack-RPC (see `odmoe-protocol`).
//!
//! ```text
//! odmoed [--foreground] [--socket PATH] [--config FILE] [--model PATH]
//! ```
//!
//! Without `--foreground` the daemon binds its socket, then detaches from the
//! terminal and logs to `odmoed.log` beside the socket; start-up errors (bad
//! config, a daemon already running) are still reported before it detaches.
//! Under launchd or systemd, and in tests, run it with `--foreground`: logs go
//! to stderr. SIGTERM, SIGINT or a `shutdown` request stop it gracefully and
//! remove the socket.
//!
//! This version answers `hello` and `shutdown`; the engine is not wired in
//! yet, so the other methods answer `not_implemented`.

mod connection;
mod dispatch;
mod server;
mod shutdown;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use odmoe_config::{Config, LogLevel};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Serve Mixture-of-Experts models to local clients over a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "odmoed", version)]
struct Args {
    /// Stay attached to the terminal and log to stderr (for launchd, systemd
    /// and debugging) instead of detaching and logging beside the socket.
    #[arg(long)]
    foreground: bool,
    /// Listen on this socket instead of the configured one.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Read this config file, which must exist, instead of the default one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve this model instead of the configured one.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("odmoed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (config, config_file) = Config::load(args.config.as_deref())?;
    init_logging(config.log.level, args.foreground);
    if let Some(file) = &config_file {
        info!(config = %file.display(), "configuration read");
    }
    // Paths from the command line are taken from the current directory, which
    // a detached daemon leaves.
    let socket = std::path::absolute(args.socket.unwrap_or_else(|| config.socket_path()))?;
    let model = match args.model.or(config.model.path) {
        Some(model) => Some(std::path::absolute(&model)?),
        None => None,
    };
    if let Some(model) = &model
        && !model.exists()
    {
        bail!("model {} does not exist", model.display());
    }
    let max_message_bytes = usize::try_from(config.server.max_message_bytes)
        .context("server.max_message_bytes does not fit in memory")?;
    let state = Arc::new(server::State::new(model, max_message_bytes));
    let max_connections = config.server.max_connections as usize;

    // A detached daemon binds before it forks, so that start-up errors reach
    // the terminal; in the foreground the signal handlers come first, so that
    // a SIGTERM sent as soon as the socket appears is handled.
    let bound = if args.foreground {
        None
    } else {
        let bound = server::bind(&socket)?;
        detach(bound.path())?;
        Some(bound)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let signal = shutdown_signal()?;
        let bound = match bound {
            Some(bound) => bound,
            None => server::bind(&socket)?,
        };
        server::run(bound, state, max_connections, signal).await?;
        Ok(())
    })
}

/// Logs to stderr at `level`, unless `RUST_LOG` says otherwise.
fn init_logging(level: LogLevel, foreground: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.as_str()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(foreground && std::io::stderr().is_terminal())
        .init();
}

/// Completes with the signal's name on the first SIGTERM or SIGINT. The
/// handlers are installed when this is called, not when it is first polled.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

/// Leaves the terminal: the parent exits at once (the socket already accepts
/// connections), the child starts a new session with stdin and stdout on
/// /dev/null and stderr appended to `odmoed.log` beside `socket`.
///
/// Must be called before any thread is started.
fn detach(socket: &Path) -> anyhow::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    use nix::unistd::{ForkResult, dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid};

    let log = socket.with_file_name("odmoed.log");
    let log_file = open(
        &log,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .with_context(|| format!("cannot open log file {}", log.display()))?;
    let null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .context("cannot open /dev/null")?;
    // SAFETY: no other thread exists yet (the runtime is built after this), so
    // the child starts from a consistent copy of the process.
    match unsafe { fork() }.context("cannot fork")? {
        ForkResult::Parent { child } => {
            info!(pid = child.as_raw(), log = %log.display(), "detached");
            // Leave without running destructors: the child owns the socket now.
            std::process::exit(0);
        }
        ForkResult::Child => {}
    }
    setsid().context("cannot start a new session")?;
    std::env::set_current_dir("/")?;
    dup2_stdin(&null)?;
    dup2_stdout(&null)?;
    dup2_stderr(&log_file)?;
    Ok(())
}
