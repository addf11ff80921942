//! `odmoe pressure`: the daemon's memory pressure, and simulating it.
//!
//! `simulate LEVEL` makes the daemon take that level in place of the real one,
//! through the very path real pressure takes (the budget shrinks at once under
//! critical); `release` goes back to the real level; `status` shows it.

use std::io::Write;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use odmoe_protocol::MemoryStats;

use crate::daemon::{self, SocketArgs};
use crate::stats::memory_summary;

#[derive(Subcommand)]
pub enum PressureCommand {
    /// Make the daemon act as if memory pressure were LEVEL, until `release`.
    Simulate(SimulateArgs),
    /// Go back to the machine's real memory pressure.
    Release(OutputArgs),
    /// Show the memory-pressure level, the expert budget and its latest changes.
    Status(OutputArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LevelArg {
    Normal,
    Warn,
    Critical,
}

impl LevelArg {
    fn name(self) -> &'static str {
        match self {
            LevelArg::Normal => "normal",
            LevelArg::Warn => "warn",
            LevelArg::Critical => "critical",
        }
    }
}

#[derive(Args)]
pub struct SimulateArgs {
    /// The level to simulate: warn shrinks the budget once confirmed (a second reading within
    /// 10 s), critical shrinks it at once and drops idle sessions' KV caches; normal lets it
    /// grow back after the quiet period.
    #[arg(value_enum)]
    level: LevelArg,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args)]
pub struct OutputArgs {
    /// Print the daemon's memory stats (the `memory` section of `stats`) as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

pub fn run(command: PressureCommand) -> Result<()> {
    let runtime = daemon::runtime()?;
    let (output, memory, uptime) = runtime.block_on(async {
        match command {
            PressureCommand::Simulate(args) => {
                let mut client = args.output.socket.connect().await?;
                let memory = client
                    .simulate_pressure(args.level.name())
                    .await
                    .map_err(daemon::explain)?;
                let uptime = uptime(&mut client).await?;
                anyhow::Ok((args.output, memory, uptime))
            }
            PressureCommand::Release(output) => {
                let mut client = output.socket.connect().await?;
                let memory = client.release_pressure().await.map_err(daemon::explain)?;
                let uptime = uptime(&mut client).await?;
                Ok((output, memory, uptime))
            }
            PressureCommand::Status(output) => {
                let mut client = output.socket.connect().await?;
                let stats = crate::stats::fetch(&mut client).await?;
                let memory = stats.memory.unwrap_or_else(|| MemoryStats {
                    level: "unknown".into(),
                    reason: "this odmoed does not report memory pressure".into(),
                    ..MemoryStats::default()
                });
                Ok((output, memory, stats.uptime_s))
            }
        }
    })?;
    let mut stdout = std::io::stdout().lock();
    if output.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&memory)?)?;
    } else {
        write!(stdout, "{}", memory_summary(&memory, uptime, usize::MAX))?;
    }
    Ok(())
}

/// The daemon's uptime, against which adjustments are timed.
async fn uptime(client: &mut odmoe_client::Client) -> Result<f64> {
    Ok(crate::stats::fetch(client).await?.uptime_s)
}
