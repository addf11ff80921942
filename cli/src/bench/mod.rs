//! `odmoe bench`: figures measured in one run and reported as ratios. `store`:
//!
//! - Cold expert reads (page cache dropped before each pass) with 1, 2, 4 and 8 reads in flight,
//!   against `dd iflag=direct` over the same bytes in one file and against mmap + copy.
//! - Warm hit latency of `acquire`.
//! - Decode tok/s of the committed fixtures at budgets of 10%, 25%, 50% and 100% of all experts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use odmoe_config::format_bytes;
use odmoe_engine::convert::convert;
use odmoe_engine::generate::{GenerateRequest, Session};
use odmoe_engine::open::{self, ExpertMode, LoadOptions};
use odmoe_engine::store::fetch::{DIRECT_ALIGN, Pace, read_aligned};
use odmoe_engine::store::{PolicyKind, StoreConfig};
use serde_json::json;

mod decode;
mod dtype;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Cold read throughput, warm hit latency and decode speed at several budgets.
    Store(StoreBenchArgs),
    /// Speed of one expert projection by weight type, for a decode step (weights from memory)
    /// and a prompt: candle's products against odmoe's kernels, with the instruction set used.
    Dtype(dtype::DtypeBenchArgs),
    /// One engine run of the llama.cpp comparison (bench/compare.py): time to first token,
    /// decode tok/s, bytes read, peak memory, hit rate against Belady's.
    Decode(decode::DecodeBenchArgs),
}

#[derive(Args)]
pub struct StoreBenchArgs {
    /// Where to write the synthetic expert files (needs experts x size of free space).
    #[arg(long, default_value = "/var/tmp/odmoe-bench")]
    dir: PathBuf,
    /// Number of synthetic expert files.
    #[arg(long, default_value_t = 96)]
    experts: usize,
    /// Size of each synthetic expert in MiB (Qwen3-30B-A3B's bf16 experts are 9 MiB).
    #[arg(long, default_value_t = 9)]
    expert_mib: usize,
    /// Fixture models for the decode figures.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Store(args) => store(args),
        BenchCommand::Dtype(args) => dtype::run(args),
        BenchCommand::Decode(args) => decode::run(args),
    }
}

/// Drops the page cache so the next reads come from the device; needs root.
fn drop_page_cache() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

fn store(args: StoreBenchArgs) -> Result<()> {
    let expert_bytes = args.expert_mib * 1024 * 1024;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let files = write_experts(&args.dir, args.experts, expert_bytes)?;
    let total = (args.experts * expert_bytes) as u64;
    let cold = drop_page_cache();
    if !cold {
        eprintln!("warning: cannot drop the page cache (needs root): read figures may be warm");
    }

    let mut reads = Vec::new();
    for inflight in [1, 2, 4, 8] {
        drop_page_cache();
        let seconds = read_all(&files, expert_bytes, inflight)?;
        reads.push((inflight, gbps(total, seconds)));
    }
    drop_page_cache();
    let dd = dd_direct(&args.dir, &files, expert_bytes)?;
    drop_page_cache();
    let mmap = mmap_copy(&files)?;
    let hit_ns = warm_hit_ns(&args.fixtures)?;
    let decode = decode_at_budgets(&args.fixtures)?;

    let best = reads.iter().map(|r| r.1).fold(0.0, f64::max);
    if args.json {
        let out = json!({
            "expert_bytes": expert_bytes, "experts": args.experts, "cold": cold,
            "reads_gbps": reads.iter().map(|(n, g)| json!({"inflight": n, "gbps": g})).collect::<Vec<_>>(),
            "dd_direct_gbps": dd, "mmap_copy_gbps": mmap,
            "ratio_best_to_dd": best / dd, "ratio_best_to_mmap": best / mmap,
            "warm_hit_ns": hit_ns, "decode": decode,
        });
        println!("{out}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "cold expert reads: {} experts of {} ({}){}",
        args.experts,
        format_bytes(expert_bytes as u64),
        format_bytes(total),
        if cold {
            ""
        } else {
            " [page cache NOT dropped]"
        }
    )?;
    writeln!(
        out,
        "| reads in flight | GB/s | vs dd iflag=direct | vs mmap + copy |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    for (inflight, g) in &reads {
        writeln!(
            out,
            "| {inflight} | {g:.2} | {:.2}x | {:.2}x |",
            g / dd,
            g / mmap
        )?;
    }
    writeln!(
        out,
        "dd iflag=direct bs=4M: {dd:.2} GB/s; mmap + copy: {mmap:.2} GB/s"
    )?;
    writeln!(
        out,
        "warm hit (acquire + release of a resident expert): {hit_ns:.0} ns"
    )?;
    writeln!(
        out,
        "| model | budget | experts resident | hit rate | tok/s | vs 100% |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for row in &decode {
        writeln!(
            out,
            "| {} | {}% | {} | {:.1}% | {:.1} | {:.2}x |",
            row["model"].as_str().unwrap_or(""),
            row["percent"],
            row["resident_experts"],
            row["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
            row["tok_s"].as_f64().unwrap_or(0.0),
            row["ratio_to_full"].as_f64().unwrap_or(0.0),
        )?;
    }
    Ok(())
}

/// Synthetic expert files of `bytes` each (a multiple of the O_DIRECT alignment), reused when
/// already present at the right size.
fn write_experts(dir: &Path, count: usize, bytes: usize) -> Result<Vec<PathBuf>> {
    if !bytes.is_multiple_of(DIRECT_ALIGN) {
        bail!("expert size must be a multiple of {DIRECT_ALIGN} bytes");
    }
    let mut block = vec![0u8; bytes];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    (0..count)
        .map(|i| {
            let path = dir.join(format!("expert_{i:04}.bin"));
            if std::fs::metadata(&path).map(|m| m.len() as usize).ok() != Some(bytes) {
                block[0..8].copy_from_slice(&(i as u64).to_le_bytes());
                std::fs::write(&path, &block)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(path)
        })
        .collect()
}

/// Reads every file once with `inflight` threads, as the store's I/O pool does; returns seconds.
fn read_all(files: &[PathBuf], bytes: usize, inflight: usize) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..inflight)
            .map(|_| {
                let next = next.clone();
                scope.spawn(move || -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = files.get(i) else {
                            return Ok(());
                        };
                        let buf = read_aligned(path, 0, bytes, true, Pace::Whole)?;
                        std::hint::black_box(&buf[..]);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .collect()
    });
    results.into_iter().collect::<Result<()>>()?;
    Ok(started.elapsed().as_secs_f64())
}

/// `dd iflag=direct` over the same bytes laid out as one file: the device's sequential bound.
fn dd_direct(dir: &Path, files: &[PathBuf], bytes: usize) -> Result<f64> {
    let all = dir.join("all.bin");
    let total = (files.len() * bytes) as u64;
    if std::fs::metadata(&all).map(|m| m.len()).ok() != Some(total) {
        let mut out = std::fs::File::create(&all)?;
        for f in files {
            out.write_all(&std::fs::read(f)?)?;
        }
        out.sync_all()?;
        drop_page_cache();
    }
    let started = Instant::now();
    let status = Command::new("dd")
        .args([
            format!("if={}", all.display()),
            "of=/dev/null".into(),
            "bs=4M".into(),
            "iflag=direct".into(),
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .context("running dd")?;
    if !status.success() {
        bail!("dd iflag=direct failed");
    }
    Ok(gbps(total, started.elapsed().as_secs_f64()))
}

/// Maps each file and copies it out, as a loader that relies on page faults does.
fn mmap_copy(files: &[PathBuf]) -> Result<f64> {
    let started = Instant::now();
    let mut total = 0u64;
    for path in files {
        let file = std::fs::File::open(path)?;
        // SAFETY: the benchmark's own files are not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let copy = map.to_vec();
        total += std::hint::black_box(copy).len() as u64;
    }
    Ok(gbps(total, started.elapsed().as_secs_f64()))
}

fn fixture_layout(fixtures: &Path, name: &str, out: &Path) -> Result<PathBuf> {
    let layout = out.join(format!("{name}.odmoe"));
    convert(&fixtures.join(name), &layout, |_| {})
        .with_context(|| format!("converting fixture {name}"))?;
    Ok(layout)
}

/// Nanoseconds per acquire + release of an expert that is already resident.
fn warm_hit_ns(fixtures: &Path) -> Result<f64> {
    let tmp = tempfile::tempdir()?;
    let layout = fixture_layout(fixtures, "qwen3_moe", tmp.path())?;
    let options = LoadOptions {
        experts: ExpertMode::OnDemand(StoreConfig {
            budget_bytes: u64::MAX / 2,
            io_threads: 1,
            policy: PolicyKind::Lru,
        }),
        ..LoadOptions::default()
    };
    let loaded = open::load(&layout, &options, &candle_core::Device::Cpu)?;
    let store = loaded.store.context("on-demand load has a store")?;
    let resident = [0, 1, 2, 3];
    drop(store.acquire(0, &resident)?);
    let n = 200_000;
    let started = Instant::now();
    for i in 0..n {
        let expert = resident[i % resident.len()];
        drop(std::hint::black_box(store.acquire(0, &[expert])?));
    }
    Ok(started.elapsed().as_nanos() as f64 / n as f64)
}

/// Greedy decode of 64 tokens at several budgets, from the odmoe layout of each fixture.
fn decode_at_budgets(fixtures: &Path) -> Result<Vec<serde_json::Value>> {
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for name in ["qwen2_moe", "qwen3_moe", "mixtral"] {
        let layout = fixture_layout(fixtures, name, tmp.path())?;
        let (config, total) = open::describe(&layout)?;
        let minimum = config.num_experts_per_token as u64 * config.expert_f32_bytes() as u64;
        let mut full_tok_s = None;
        for percent in [100u64, 50, 25, 10] {
            let budget = (total * percent / 100).max(minimum);
            let options = LoadOptions {
                experts: ExpertMode::OnDemand(StoreConfig {
                    budget_bytes: budget,
                    io_threads: 4,
                    policy: PolicyKind::default(),
                }),
                ..LoadOptions::default()
            };
            let loaded = open::load(&layout, &options, &candle_core::Device::Cpu)?;
            let request = GenerateRequest {
                prompt: vec![5, 6, 7, 8],
                max_tokens: 64,
                ignore_eos: true,
                ..Default::default()
            };
            let model = &loaded.model;
            let out = Session::new(model).generate(model, None, &request, |_| true)?;
            let tok_s = out.tokens.len() as f64 / (out.timings.decode_ms / 1e3);
            let full = *full_tok_s.get_or_insert(tok_s);
            let stats = loaded.store.context("store")?.stats();
            rows.push(json!({
                "model": name, "percent": percent, "budget_bytes": budget,
                "resident_experts": stats.resident_experts,
                "hit_rate": stats.hits as f64 / (stats.hits + stats.misses).max(1) as f64,
                "tok_s": tok_s, "ratio_to_full": tok_s / full,
            }));
        }
    }
    Ok(rows)
}
