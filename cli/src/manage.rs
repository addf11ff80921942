//! `odmoe load`, `odmoe unload` and `odmoe stop`: what the daemon serves, and stopping it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use odmoe_engine::store::budget::parse_budget_size;
use odmoe_protocol::{LoadParams, Method, ModelInfo};

use crate::daemon::{self, SocketArgs};
use odmoe_config::format_bytes;

#[derive(Args)]
pub struct LoadArgs {
    /// The model: a GGUF file, an odmoe layout (MODEL.odmoe) or a Hugging Face checkpoint
    /// directory, or the name of one in the daemon's `model.models_dir` (`odmoe models`).
    #[arg(value_name = "PATH|NAME")]
    path: PathBuf,
    /// Memory for cached experts: `auto`, bytes (8GiB, 1.5GB) or a percentage (25%)
    /// [default: the daemon's `model.expert_budget`].
    #[arg(long, value_name = "SIZE|PCT|auto", value_parser = parse_budget)]
    expert_budget: Option<String>,
    /// Print the loaded model as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct UnloadArgs {
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct StopArgs {
    /// Return once the request is sent, without waiting for the socket to go away.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

/// Checks an expert budget here, so a typo is not a round trip to the daemon.
pub fn parse_budget(text: &str) -> Result<String, String> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok("auto".into());
    }
    parse_budget_size(text)
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
}

pub fn load(args: LoadArgs) -> Result<()> {
    let target = load_target(&args.path)?;
    let runtime = daemon::runtime()?;
    let model = runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        let params = LoadParams {
            path: target,
            expert_budget: args.expert_budget.clone(),
        };
        client
            .call::<_, ModelInfo>(Method::Load.name(), &params)
            .await
            .map_err(daemon::explain)
    })?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&model)?)?;
    } else {
        let budget = match model.budget_bytes {
            Some(budget) => format!(", expert budget {}", format_bytes(budget)),
            None => String::new(),
        };
        writeln!(
            stdout,
            "loaded {} ({}, {}{budget})",
            model.path, model.architecture, model.mode
        )?;
    }
    Ok(())
}

/// What `load` sends for `arg`: an existing path made absolute (the daemon runs in another
/// directory), or a bare name for the daemon to find in its `models_dir`.
fn load_target(arg: &Path) -> Result<String> {
    if arg.exists() {
        let path = std::path::absolute(arg)
            .with_context(|| format!("cannot resolve {}", arg.display()))?;
        return Ok(path.to_string_lossy().into_owned());
    }
    let text = arg.to_string_lossy();
    if arg.components().count() == 1 && !text.contains('/') {
        return Ok(text.into_owned());
    }
    bail!("model {} does not exist", arg.display())
}

pub fn unload(args: UnloadArgs) -> Result<()> {
    let runtime = daemon::runtime()?;
    runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        client.unload().await.map_err(daemon::explain)
    })?;
    println!("unloaded");
    Ok(())
}

pub fn stop(args: StopArgs) -> Result<()> {
    let path = args.socket.path()?;
    let runtime = daemon::runtime()?;
    let pid = runtime.block_on(async {
        let mut client = odmoe_client::Client::connect(&path)
            .await
            .map_err(daemon::explain)?;
        // The pid tells when the daemon has exited even where the socket outlives it (socket
        // activation); a daemon without `stats` is waited for by its socket alone.
        let pid = crate::stats::fetch(&mut client)
            .await
            .ok()
            .map(|stats| stats.pid);
        client.shutdown().await.map_err(daemon::explain)?;
        anyhow::Ok(pid)
    })?;
    if args.no_wait {
        println!("odmoed is stopping");
        return Ok(());
    }
    if wait_gone(&path, pid, Duration::from_secs(30)) {
        println!("odmoed stopped");
    } else {
        println!("odmoed is stopping (still finishing requests)");
    }
    Ok(())
}

/// Waits up to `limit` for the daemon to exit (process `pid` gone) or to remove its socket,
/// the last thing it does when it owns the socket.
fn wait_gone(socket: &Path, pid: Option<u32>, limit: Duration) -> bool {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    let running = |pid: u32| {
        i32::try_from(pid)
            .is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
    };
    while socket.exists() && pid.is_none_or(running) {
        if waited >= limit {
            return false;
        }
        std::thread::sleep(step);
        waited += step;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_checked_before_they_are_sent() {
        assert_eq!(parse_budget("AUTO").unwrap(), "auto");
        assert_eq!(parse_budget("8GiB").unwrap(), "8GiB");
        assert_eq!(parse_budget("25%").unwrap(), "25%");
        assert!(parse_budget("lots").is_err());
        assert!(parse_budget("1.5").unwrap_err().contains("needs a unit"));
    }
}
