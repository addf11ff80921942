//! `odmoed`: the odmoe daemon. It serves Mixture-of-Experts language models to
//! local clients over a Unix socket speaking msgpack-RPC (see `odmoe-protocol`).
//!
//! ```text
//! odmoed [--foreground] [--socket PATH] [--config FILE] [--model PATH]
//!        [--expert-budget SIZE|PCT|auto]
//! ```
//!
//! Without `--foreground` the daemon binds its socket, then detaches from the
//! terminal and logs to `odmoed.log` beside the socket; start-up errors (bad
//! config, a daemon already running) are still reported before it detaches.
//! Under launchd or systemd, and in tests, run it with `--foreground`: logs go
//! to stderr, or to the journal under systemd. A socket passed by systemd or
//! launchd (socket activation) is used instead of binding one.
//!
//! The model loads before the first client is served and stays loaded across
//! connections until `load` replaces it or `unload` drops it.
//!
//! Signals: SIGTERM and SIGINT stop accepting, cancel the generations in
//! flight (they answer "cancelled"), remove the socket and exit; SIGHUP reads
//! the config file again and applies what can change live (generation
//! defaults, session limits, the expert budget, the log level).
//!
//! Memory pressure shrinks the expert budget and a quiet period lets it grow
//! back (see the `pressure` module and the config's `[memory]`).
//!
//! Modules import one way, main -> server -> connection -> dispatch ->
//! scheduler (`tests/layering.rs` holds the table): `socket` finds, checks
//! and binds the socket (or takes an activated one); `server` accepts and
//! caps connections; `connection` frames one client's messages with limits
//! and timeouts; `peer` says who the client is and what it may do;
//! `dispatch` turns methods into scheduler requests and results into
//! protocol values, the last module that sees the protocol; `scheduler` is
//! the engine thread (queue, model loading, sessions) in its own types;
//! `pressure`, `budget` and `memory` size the expert budget.

mod budget;
mod connection;
mod dispatch;
mod http;
mod logging;
mod memory;
mod models_dir;
mod peer;
mod pressure;
mod scheduler;
mod server;
mod settings;
mod shutdown;
mod socket;
mod startup;
mod state;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use clap::Parser;
use odmoe_config::Config;
use odmoe_engine::lock::recover;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::budget::{BudgetKind, BudgetSpec, Placement};
use crate::logging::LogControl;
use crate::pressure::Pressure;
use crate::scheduler::Scheduler;
use crate::settings::Settings;
use crate::state::{ConnectionLimits, State};

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
    /// Memory for cached experts, instead of the configured `model.expert_budget`:
    /// a size (8GiB), a percentage of all experts (25%) or auto. Experts load on
    /// demand when the budget is below what all of them take.
    #[arg(long, value_name = "SIZE|PCT|auto")]
    expert_budget: Option<String>,
    /// Most tokens one sequence may hold (prompt and reply together), below the
    /// model's own maximum positions, instead of the configured
    /// `model.context_length`.
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    context_length: Option<u32>,
    /// Also serve OpenAI's and Anthropic's HTTP APIs and the status page on
    /// this address (such as 127.0.0.1:11535), instead of the configured
    /// `http.listen`. Requests need the key `odmoe http-key` prints.
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<String>,
}

/// Blocks of megabytes (a prompt's tensors) on huge pages: see the allocator's documentation.
#[global_allocator]
static ALLOCATOR: odmoe_engine::allocator::HugePageBlocks = odmoe_engine::allocator::HugePageBlocks;

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { odmoe_engine::configure_cpu_compute() };
    odmoe_engine::allocator::configure_system_allocator();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("odmoed: {error:#}");
            startup::failed(&format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (config, config_file) = Config::load(args.config.as_deref())?;
    let logs = logging::init(config.log.level, args.foreground);
    if let Some(file) = &config_file {
        info!(config = %file.display(), "configuration read");
    }
    let flag_budget = args
        .expert_budget
        .as_deref()
        .map(BudgetSpec::parse)
        .transpose()
        .map_err(|error| anyhow::anyhow!("--expert-budget: {error}"))?;
    // Paths from the command line are taken from the current directory, which
    // a detached daemon leaves.
    let socket = std::path::absolute(args.socket.clone().unwrap_or_else(|| config.socket_path()))?;
    let model = match args.model.clone().or(config.model.path.clone()) {
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
    let max_connections = config.server.max_connections as usize;
    let mut settings = Settings::new(&config, flag_budget);
    if let Some(tokens) = args.context_length {
        settings.context_length = Some(tokens as usize);
    }
    let settings = Arc::new(RwLock::new(settings));

    // Before any thread starts: a socket from the service manager replaces ours. Only a daemon
    // in the foreground runs under one (launchd and systemd both expect no fork), and asking
    // launchd (through XPC) before forking would leave the child's libdispatch unusable.
    let activated = if args.foreground {
        socket::activated()?
    } else {
        None
    };
    // A detached daemon binds before it forks, so that start-up errors reach
    // the terminal; in the foreground the signal handlers come first, so that
    // a SIGTERM sent as soon as the socket appears is handled.
    let bound = match activated {
        Some(bound) => Some(bound),
        None if args.foreground => None,
        None => {
            let bound = socket::bind(&socket)?;
            detach(bound.path().unwrap_or(&socket))?;
            Some(bound)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let mut signal = Box::pin(shutdown_signal()?);
        let hangup = signal_stream(SignalKind::hangup(), "SIGHUP")?;
        let pressure = Arc::new(Pressure::new(
            &config.memory,
            pressure::platform_source(),
            std::time::Instant::now(),
        ));
        let scheduler = Scheduler::start(Arc::clone(&settings), Arc::clone(&pressure))
            .context("cannot start the engine thread")?;
        pressure.direct_to(scheduler.director());
        pressure
            .start_monitor()
            .context("cannot start the memory-pressure monitor")?;
        let limits = ConnectionLimits::from_config(&config.server);
        let state = Arc::new(State::new(
            scheduler,
            settings,
            pressure,
            max_message_bytes,
            limits,
        ));
        let bound = match bound {
            Some(bound) => bound,
            None => socket::bind(&socket)?,
        };
        let http_listener = match args.http.as_deref().or(config.http.listen.as_deref()) {
            Some(address) => Some(http::Listener::bind(address, &config.http).await?),
            None => None,
        };
        if let Some(model) = model {
            let budget = state.settings().expert_budget;
            tokio::select! {
                loaded = state.scheduler.load(model.clone(), budget) => {
                    loaded.map_err(|error| anyhow::anyhow!("{error}"))
                        .with_context(|| format!("cannot serve {}", model.display()))?;
                }
                name = &mut signal => {
                    info!(signal = name, "stopped while loading the model");
                    state.scheduler.stop();
                    return Ok(());
                }
            }
        }
        tokio::spawn(reload_on_hangup(
            hangup,
            args.config.clone(),
            config,
            Arc::clone(&state),
            logs,
        ));
        if let Some(listener) = http_listener {
            listener.announce()?;
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                if let Err(error) = http::serve(listener, state, max_connections).await {
                    error!(%error, "the HTTP listener failed");
                }
            });
        }
        startup::ready();
        server::run(bound, state, max_connections, signal).await?;
        Ok(())
    })
}

/// Reloads the config file on every SIGHUP and applies the keys that can
/// change live, logging each change; a config that no longer reads is
/// reported and ignored.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    explicit: Option<PathBuf>,
    started_with: Config,
    state: Arc<State>,
    logs: LogControl,
) {
    while hangup.recv().await.is_some() {
        let config = match Config::load(explicit.as_deref()) {
            Ok((config, _)) => config,
            Err(error) => {
                error!("SIGHUP: the configuration was not reloaded: {error}");
                continue;
            }
        };
        apply(&config, &started_with, &state, &logs);
    }
}

/// Applies `config`'s live keys to the running daemon.
fn apply(config: &Config, started_with: &Config, state: &State, logs: &LogControl) {
    let current = state.settings();
    let (next, changes) = current.reloaded(config);
    if next.log_level != current.log_level
        && let Err(error) = logs.set_level(next.log_level)
    {
        warn!(%error, "cannot change the log level");
    }
    if next.expert_budget != current.expert_budget {
        apply_budget(&next.expert_budget, state);
    }
    *recover(state.settings.write()) = next;
    state.scheduler.settings_changed();
    if config.server != started_with.server
        || config.model.path != started_with.model.path
        || config.model.context_length != started_with.model.context_length
        || config.model.kv_cache != started_with.model.kv_cache
        || config.model.prefill_slab_tokens != started_with.model.prefill_slab_tokens
        || config.memory != started_with.memory
    {
        warn!(
            "SIGHUP: [server], [memory], model.path, model.context_length, model.kv_cache and model.prefill_slab_tokens take effect at the next start"
        );
    }
    if changes.is_empty() {
        info!("SIGHUP: configuration reloaded, nothing changed");
    }
    for change in changes {
        info!(%change, "SIGHUP: configuration changed");
    }
}

/// Gives the loaded model's expert store the budget `budget`: the memory
/// controller starts over from it, and the engine applies it between tokens.
fn apply_budget(budget: &BudgetSpec, state: &State) {
    let Some(served) = state.scheduler.served() else {
        return;
    };
    if served.store.is_none() {
        info!(%budget, "experts are resident: the new expert budget applies at the next load");
        return;
    }
    match budget.resolve(served.info.total_expert_bytes) {
        Placement::OnDemand(kind) => {
            let why = format!("configuration reloaded: model.expert_budget = {budget}");
            if let Some(bytes) = state.pressure.rebudget(kind, &why) {
                info!(%budget, bytes, "expert budget changed");
            }
        }
        Placement::Resident => {
            let total = served.info.total_expert_bytes;
            let why = format!(
                "configuration reloaded: model.expert_budget = {budget} holds every expert"
            );
            if let Some(bytes) = state.pressure.rebudget(BudgetKind::Fixed(total), &why) {
                info!(%budget, bytes, "expert budget changed; experts stay on demand until the next load");
            }
        }
    }
}

/// A stream of `kind` signals, installed now.
fn signal_stream(kind: SignalKind, name: &str) -> anyhow::Result<tokio::signal::unix::Signal> {
    signal(kind).with_context(|| format!("cannot handle {name}"))
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

/// Leaves the terminal: the child starts a new session with stdin and stdout
/// on /dev/null and stderr appended to `odmoed.log` beside `socket`; the
/// parent waits until the child serves (its model loaded) and exits 0, or
/// exits 1 with the child's error on stderr (see [`startup`]).
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
    let (report_read, report_write) =
        nix::unistd::pipe().context("cannot make the start-up pipe")?;
    // SAFETY: no other thread exists yet (the runtime is built after this), so
    // the child starts from a consistent copy of the process.
    match unsafe { fork() }.context("cannot fork")? {
        ForkResult::Parent { child } => {
            drop(report_write);
            // Leave without running destructors: the child owns the socket now.
            match startup::wait_for_child(report_read, &log) {
                Ok(()) => {
                    info!(pid = child.as_raw(), log = %log.display(), "detached");
                    std::process::exit(0);
                }
                Err(error) => {
                    eprintln!("odmoed: {error}");
                    std::process::exit(1);
                }
            }
        }
        ForkResult::Child => {
            drop(report_read);
            startup::report_to(report_write);
        }
    }
    setsid().context("cannot start a new session")?;
    std::env::set_current_dir("/")?;
    dup2_stdin(&null)?;
    dup2_stdout(&null)?;
    dup2_stderr(&log_file)?;
    Ok(())
}
