//! `odmoe stats` and `odmoe ps`: what the daemon holds and how its expert store is doing.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use odmoe_protocol::{MemoryStats, StatsResult};
use serde::Serialize;

use crate::daemon::{self, SocketArgs};
use odmoe_config::format_bytes;

#[derive(Args)]
#[command(
    after_help = "Fields of --json are those of the `stats` method (see odmoe-protocol's \
    StatsResult); their names are stable."
)]
pub struct StatsArgs {
    /// Print the daemon's stats as JSON (one object; one line per refresh with --watch).
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct PsArgs {
    /// Print {"model", "mode", "resident_bytes", "budget_bytes", "pressure", "simulated",
    /// "target_bytes", "sessions", "queue"} as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

/// Asks the daemon for its stats.
pub async fn fetch(client: &mut odmoe_client::Client) -> Result<StatsResult> {
    client.stats().await.map_err(daemon::explain)
}

pub fn run(args: StatsArgs) -> Result<()> {
    let interval = match args.watch {
        Some(secs) if !(secs.is_finite() && secs > 0.0) => {
            bail!("--watch takes a number of seconds above 0, got {secs}")
        }
        watch => watch.map(Duration::from_secs_f64),
    };
    let runtime = daemon::runtime()?;
    runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        let clear = interval.is_some() && !args.json && std::io::stdout().is_terminal();
        loop {
            let stats = fetch(&mut client).await?;
            let text = if args.json {
                if interval.is_some() {
                    serde_json::to_string(&stats)?
                } else {
                    serde_json::to_string_pretty(&stats)?
                }
            } else {
                summary(&stats)
            };
            let refresh = |out: &mut dyn Write| -> std::io::Result<()> {
                if clear {
                    // Home the cursor and clear the screen, as `watch` does.
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(out, "{}", text.trim_end())?;
                // Watched summaries are set apart by a blank line when not redrawn in place.
                if interval.is_some() && !clear && !args.json {
                    writeln!(out)?;
                }
                Ok(())
            };
            if !print_to_stdout(refresh)? {
                return Ok(());
            }
            match interval {
                None => return Ok(()),
                Some(interval) => tokio::time::sleep(interval).await,
            }
        }
    })
}

/// The stats as a few lines a person reads.
pub fn summary(stats: &StatsResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "odmoed {}  pid {}  up {}  rss {}",
        stats.server_version,
        stats.pid,
        duration(stats.uptime_s),
        format_bytes(stats.rss_bytes)
    );
    match &stats.model {
        None => {
            let _ = writeln!(out, "model     none loaded (odmoe load PATH)");
        }
        Some(model) => {
            let _ = writeln!(
                out,
                "model     {} ({}, {} layers x {} experts, {} per token)",
                model.path,
                model.architecture,
                model.layers,
                model.experts_per_layer,
                model.experts_per_token
            );
            let _ = writeln!(
                out,
                "mode      {}, experts {} in all ({} each)",
                model.mode,
                format_bytes(model.total_expert_bytes),
                format_bytes(model.expert_bytes)
            );
        }
    }
    if let Some(store) = &stats.store {
        let budget_share = if store.budget_bytes > 0 {
            format!(
                " ({:.0}%)",
                100.0 * store.resident_bytes as f64 / store.budget_bytes as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "budget    {} resident of {}{}, {} experts",
            format_bytes(store.resident_bytes),
            format_bytes(store.budget_bytes),
            budget_share,
            store.resident_experts
        );
        let lookups = store.hits + store.misses;
        let hit_rate = if lookups > 0 {
            format!("{:.1}%", 100.0 * store.hits as f64 / lookups as f64)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "cache     hit rate {hit_rate} ({} hits, {} misses), {} evictions",
            store.hits, store.misses, store.evictions
        );
        let _ = writeln!(
            out,
            "reads     {} in {} reads ({} failed), latency p50 {} p99 {}, stalled {}",
            format_bytes(store.bytes_read),
            store.reads,
            store.read_errors,
            micros(store.read_latency_p50_us),
            micros(store.read_latency_p99_us),
            micros(store.stall_us)
        );
        let _ = writeln!(
            out,
            "prefetch  {} issued, {} used, {} wasted, {} dropped, {} cancelled; {} hits lost to its evictions; {} read while several may go at once",
            store.prefetch_issued,
            store.prefetch_used,
            store.prefetch_wasted,
            store.prefetch_dropped,
            store.prefetch_cancelled,
            store.prefetch_evicted_hits,
            store.prefetch_wide_reads
        );
    }
    let _ = writeln!(
        out,
        "queue     {} running, {} waiting; {} requests served",
        stats.queue.running, stats.queue.waiting, stats.requests
    );
    let _ = writeln!(
        out,
        "sessions  {} (KV caches {}); prefix cache {} ({})",
        stats.sessions.count,
        format_bytes(stats.sessions.kv_bytes),
        stats.sessions.prefixes,
        format_bytes(stats.sessions.prefix_bytes)
    );
    if let Some(memory) = &stats.memory {
        out.push_str(&memory_summary(memory, stats.uptime_s, 3));
    }
    out
}

/// The memory-pressure section: level, budget against its bounds, and the
/// last `adjustments` changes of the budget (timed against `uptime_s`).
pub fn memory_summary(memory: &MemoryStats, uptime_s: f64, adjustments: usize) -> String {
    let mut out = String::new();
    let simulated = if memory.simulated { " (simulated)" } else { "" };
    let _ = writeln!(
        out,
        "memory    {}{simulated}: {}",
        memory.level, memory.reason
    );
    if let (Some(target), Some(floor), Some(ceiling)) = (
        memory.target_bytes,
        memory.floor_bytes,
        memory.ceiling_bytes,
    ) {
        let budget = memory.budget_bytes.map_or("-".into(), format_bytes);
        let growth = match memory.grow_in_s {
            Some(secs) if secs > 0.0 => format!(", grows back in {}", duration(secs)),
            Some(_) => ", growing back".to_owned(),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "          expert budget {budget}, target {} (floor {}, ceiling {}){growth}{}",
            format_bytes(target),
            format_bytes(floor),
            format_bytes(ceiling),
            if memory.adapt {
                ""
            } else {
                "; fixed (memory.adapt = false)"
            }
        );
    }
    let base = memory
        .base_bytes
        .map(|base| format!("model base {}, ", format_bytes(base)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "          {base}KV caches {} (reserve {}); watching {}",
        format_bytes(memory.kv_bytes),
        format_bytes(memory.kv_reserve_bytes),
        memory.source
    );
    let recent = memory.adjustments.len().saturating_sub(adjustments);
    for adjustment in &memory.adjustments[recent..] {
        let _ = writeln!(
            out,
            "adjusted  {} ago: {} -> {}, {}",
            duration(uptime_s - adjustment.at_s),
            format_bytes(adjustment.from_bytes),
            format_bytes(adjustment.to_bytes),
            adjustment.reason
        );
    }
    out
}

/// What `ps --json` prints.
#[derive(Serialize)]
struct Ps<'a> {
    model: Option<&'a str>,
    mode: Option<&'a str>,
    resident_bytes: Option<u64>,
    budget_bytes: Option<u64>,
    /// The memory-pressure level, and whether it is simulated.
    pressure: Option<&'a str>,
    simulated: bool,
    /// The budget the memory controller is moving to.
    target_bytes: Option<u64>,
    sessions: u32,
    queue: &'a odmoe_protocol::QueueStats,
    /// Seconds until the idle model is unloaded (its keep_alive); null while it stays.
    unloads_in_s: Option<f64>,
}

impl<'a> Ps<'a> {
    fn new(stats: &'a StatsResult) -> Ps<'a> {
        let model = stats.model.as_ref();
        let store = stats.store.as_ref();
        Ps {
            model: model.map(|model| model.path.as_str()),
            mode: model.map(|model| model.mode.as_str()),
            resident_bytes: store
                .map(|store| store.resident_bytes)
                .or(model.map(|model| model.total_expert_bytes)),
            budget_bytes: store
                .map(|store| store.budget_bytes)
                .or(model.and_then(|model| model.budget_bytes)),
            pressure: stats.memory.as_ref().map(|memory| memory.level.as_str()),
            simulated: stats.memory.as_ref().is_some_and(|memory| memory.simulated),
            target_bytes: stats.memory.as_ref().and_then(|memory| memory.target_bytes),
            sessions: stats.sessions.count,
            queue: &stats.queue,
            unloads_in_s: model.and_then(|model| model.unloads_in_s),
        }
    }
}

pub fn ps(args: PsArgs) -> Result<()> {
    let runtime = daemon::runtime()?;
    let stats = runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        fetch(&mut client).await
    })?;
    let ps = Ps::new(&stats);
    let text = if args.json {
        serde_json::to_string_pretty(&ps)? + "\n"
    } else {
        ps_table(&ps)
    };
    print_to_stdout(|out| out.write_all(text.as_bytes()))?;
    Ok(())
}

/// Runs `write` on stdout and flushes it. `Ok(false)` when stdout was closed (piped into `head`,
/// say): the reader has what it wanted, so the command ends quietly, as `odmoe run` does.
fn print_to_stdout(write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<bool> {
    write_or_closed(&mut std::io::stdout().lock(), write)
}

/// [`print_to_stdout`] on any writer.
fn write_or_closed(
    out: &mut dyn Write,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<bool> {
    match write(out).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(anyhow::Error::new(error).context("writing to stdout")),
    }
}

/// `ps` as a table with a header row.
fn ps_table(ps: &Ps<'_>) -> String {
    let memory = match (ps.resident_bytes, ps.budget_bytes) {
        (Some(resident), Some(budget)) => {
            format!("{} / {}", format_bytes(resident), format_bytes(budget))
        }
        _ if ps.mode == Some("dense") => "none (dense)".into(),
        (Some(resident), None) => format!("{} (all)", format_bytes(resident)),
        _ => "-".into(),
    };
    let until = match (ps.model, ps.unloads_in_s) {
        (None, _) => "-".to_owned(),
        (Some(_), None) => "loaded".to_owned(),
        (Some(_), Some(left)) => format!("unloads in {}", duration(left)),
    };
    let pressure = match (ps.pressure, ps.target_bytes, ps.budget_bytes) {
        (Some(level), Some(target), Some(budget)) if target != budget => {
            format!("{level}, budget -> {}", format_bytes(target))
        }
        (Some(level), ..) => level.to_owned(),
        (None, ..) => "-".into(),
    } + if ps.simulated { " (simulated)" } else { "" };
    let rows = [
        [
            "MODEL".to_owned(),
            "MODE".into(),
            "EXPERTS / BUDGET".into(),
            "PRESSURE".into(),
            "SESSIONS".into(),
            "QUEUE".into(),
            "UNTIL".into(),
        ],
        [
            ps.model.unwrap_or("(none loaded)").to_owned(),
            ps.mode.unwrap_or("-").to_owned(),
            memory,
            pressure,
            ps.sessions.to_string(),
            format!("{} running, {} waiting", ps.queue.running, ps.queue.waiting),
            until,
        ],
    ];
    aligned(&rows)
}

/// Rows of cells as text, each column as wide as its widest cell.
pub fn aligned<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Seconds as `1h 02m`, `3m 04s` or `5.0s`.
pub fn duration(secs: f64) -> String {
    let whole = secs.max(0.0) as u64;
    match whole {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m {:02}s", whole / 60, whole % 60),
        _ => format!("{}h {:02}m", whole / 3600, whole / 60 % 60),
    }
}

/// Microseconds in the unit that reads best.
fn micros(us: u64) -> String {
    match us {
        0..1000 => format!("{us} µs"),
        1000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.1} s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use odmoe_protocol::{BudgetAdjustment, ModelInfo, QueueStats, SessionStats, StoreStats};

    use super::*;

    fn stats() -> StatsResult {
        StatsResult {
            server_version: "0.1.0".into(),
            pid: 42,
            uptime_s: 3725.0,
            rss_bytes: 3 << 30,
            model: Some(ModelInfo {
                path: "/models/q.odmoe".into(),
                architecture: "qwen3_moe".into(),
                layers: 48,
                experts_per_layer: 128,
                experts_per_token: 8,
                expert_bytes: 9 << 20,
                total_expert_bytes: 54 << 30,
                mode: "on_demand".into(),
                budget_bytes: Some(8 << 30),
                unloads_in_s: None,
            }),
            store: Some(StoreStats {
                hits: 900,
                misses: 100,
                evictions: 7,
                read_latency_p50_us: 850,
                read_latency_p99_us: 4200,
                stall_us: 2_500_000,
                resident_bytes: 6 << 30,
                budget_bytes: 8 << 30,
                ..StoreStats::default()
            }),
            queue: QueueStats {
                waiting: 1,
                running: 1,
            },
            sessions: SessionStats {
                count: 2,
                kv_bytes: 5 << 20,
                prefixes: 1,
                prefix_bytes: 1 << 20,
            },
            requests: 12,
            memory: Some(MemoryStats {
                level: "warn".into(),
                reason: "1.0 GiB left of the machine (16.0 GiB limit), below 1.6 GiB".into(),
                source: "PSI triggers (some 150ms/1s) on /proc/pressure/memory".into(),
                simulated: false,
                adapt: true,
                headroom_bytes: Some(1 << 30),
                limit_bytes: Some(16 << 30),
                budget_bytes: Some(8 << 30),
                target_bytes: Some(6 << 30),
                floor_bytes: Some(144 << 20),
                ceiling_bytes: Some(8 << 30),
                base_bytes: Some(2 << 30),
                kv_reserve_bytes: 512 << 20,
                kv_bytes: 96 << 20,
                grow_in_s: Some(125.0),
                adjustments: vec![BudgetAdjustment {
                    at_s: 3715.0,
                    from_bytes: 8 << 30,
                    to_bytes: 6 << 30,
                    reason: "memory pressure (warn): PSI some 150ms/1s".into(),
                }],
            }),
        }
    }

    #[test]
    fn the_summary_shows_what_matters() {
        let text = summary(&stats());
        for part in [
            "pid 42",
            "up 1h 02m",
            "rss 3.0 GiB",
            "/models/q.odmoe",
            "on_demand",
            "6.0 GiB resident of 8.0 GiB (75%)",
            "hit rate 90.0% (900 hits, 100 misses), 7 evictions",
            "p50 850 µs p99 4.2 ms, stalled 2.5 s",
            "1 running, 1 waiting",
            "sessions  2",
            "memory    warn: 1.0 GiB left of the machine",
            "expert budget 8.0 GiB, target 6.0 GiB (floor 144.0 MiB, ceiling 8.0 GiB), \
             grows back in 2m 05s",
            "model base 2.0 GiB, KV caches 96.0 MiB (reserve 512.0 MiB); watching PSI triggers",
            "adjusted  10.0s ago: 8.0 GiB -> 6.0 GiB, memory pressure (warn)",
        ] {
            assert!(text.contains(part), "{part:?} missing from\n{text}");
        }
    }

    /// A stdout whose reader has gone, or that fails otherwise.
    struct Failing(std::io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_ends_printing_quietly() {
        let print = |out: &mut dyn Write| writeln!(out, "{}", summary(&stats()));
        let mut shown = Vec::new();
        assert!(write_or_closed(&mut shown, print).unwrap());
        assert!(String::from_utf8(shown).unwrap().contains("pid 42"));
        let closed = &mut Failing(std::io::ErrorKind::BrokenPipe);
        assert!(!write_or_closed(closed, print).unwrap());
        let full = &mut Failing(std::io::ErrorKind::StorageFull);
        let error = write_or_closed(full, print).unwrap_err();
        assert!(
            format!("{error:#}").contains("writing to stdout"),
            "{error:#}"
        );
    }

    #[test]
    fn ps_is_a_short_table() {
        let stats = stats();
        let table = ps_table(&Ps::new(&stats));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("MODEL"));
        assert!(lines[1].contains("6.0 GiB / 8.0 GiB"), "{table}");
        assert!(lines[0].contains("PRESSURE"), "{table}");
        assert!(lines[1].contains("warn, budget -> 6.0 GiB"), "{table}");
        let idle = StatsResult {
            model: None,
            store: None,
            ..stats
        };
        assert!(ps_table(&Ps::new(&idle)).contains("(none loaded)"));
    }
}
