//! The bytes the expert store counts are the bytes experts hold: reading experts and computing
//! with them grows the process's resident memory by what `expert_bytes` says, not by a hidden
//! second copy. candle repacks some quantized types into tiles at their first product (on
//! aarch64 CPUs with dotprod, and on x86-64 with AVX-512 VNNI), kept beside the stored blocks;
//! odmoe's kernels take those types on both, so candle never sees them.
//!
//! Each fixture is measured in a fresh process (this binary run again with
//! `EXPERT_MEMORY_FIXTURE` set): within one process the allocator hands an earlier fixture's
//! freed memory to the next, still resident, and growth reads low.
//!
//! Experts whose slices are long enough are held in the buffers they were read into
//! (`store::held`): one fixture, written here with wide experts, has them, and their memory must
//! also go back to the system once they are dropped and the kept buffers given back.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use odmoe_engine::expert::Matrix;
use odmoe_engine::format::gguf::GgufFile;
use odmoe_engine::store::fetch::Pace;
use odmoe_engine::store::{ExpertSource, GgufSource};

/// Fixtures in types kept as stored (Q8_0, f32) and in the K-quants candle would repack, and
/// the written one whose experts are held in their read buffers.
const FIXTURES: [&str; 5] = [
    "qwen3_moe-q8_0.gguf",
    "mixtral-f32.gguf",
    "mixtral-k-q4_k_m.gguf",
    "qwen3_moe-k-q6_k.gguf",
    WIDE,
];

/// The qwen3_moe fixture with experts 8192 wide in Q8_0: slices of 557,056 bytes, held.
const WIDE: &str = "qwen3_moe-q8_0-wide.gguf";

const FIXTURE_VAR: &str = "EXPERT_MEMORY_FIXTURE";

fn main() {
    if !cfg!(target_os = "linux") {
        println!("expert_memory: skipped, resident memory is read from /proc");
        return;
    }
    if let Ok(name) = std::env::var(FIXTURE_VAR) {
        if let Err(failure) = held_as_counted(&name) {
            eprintln!("{failure}");
            std::process::exit(1);
        }
        return;
    }
    let me = std::env::current_exe().expect("the test binary's path");
    let failed: Vec<&str> = FIXTURES
        .into_iter()
        .filter(|name| {
            let status = std::process::Command::new(&me)
                .env(FIXTURE_VAR, name)
                .status()
                .expect("the test binary runs again");
            !status.success()
        })
        .collect();
    assert!(failed.is_empty(), "experts not held as counted: {failed:?}");
    println!("expert_memory: {} fixtures held as counted", FIXTURES.len());
}

/// Resident memory of this process, from `/proc/self/statm`.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap();
    pages * page as u64
}

/// Reads and computes with every expert of the GGUF fixture `name`, many times over and all
/// kept, and fails unless resident memory grew by what the store counts for them.
fn held_as_counted(name: &str) -> Result<(), String> {
    let written = tempfile::tempdir().unwrap();
    let path = if name == WIDE {
        let path = written.path().join(name);
        common::write_qwen3_gguf(&path, GgmlDType::Q8_0, &[], Some(8192));
        path
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf")
            .join(name)
    };
    counted_as_held(name, &path)
}

fn counted_as_held(name: &str, path: &Path) -> Result<(), String> {
    let gguf = GgufFile::open(path, &candle_core::Device::Cpu).unwrap();
    let config = odmoe_engine::model::config_from_gguf(&gguf).unwrap();
    let source = GgufSource::new(&config, &gguf, false).unwrap();
    let experts: Vec<(usize, usize)> = config
        .moe_layers()
        .flat_map(|layer| (0..config.num_experts).map(move |expert| (layer, expert)))
        .collect();
    // Every expert many times over, all kept: tens of MiB, well above the allocator's noise.
    let sizes = source.expert_sizes();
    let all_once: u64 = experts.iter().map(|&(layer, _)| sizes.at(layer)).sum();
    let copies = (64 << 20) / all_once.max(1) + 1;
    let before = resident_bytes();
    let mut kept = Vec::new();
    for _ in 0..copies {
        for &(layer, expert) in &experts {
            let (weights, _) = source.read(layer, expert, Pace::Whole).unwrap();
            // One token and a batch of eight: the decode and prefill products.
            for tokens in [1, 8] {
                let x = candle_core::Tensor::ones(
                    (tokens, config.hidden_size),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                weights.forward(&x).unwrap();
            }
            kept.push(weights);
        }
    }
    let grown = resident_bytes().saturating_sub(before);
    let counted = copies * all_once;
    let ratio = grown as f64 / counted as f64;
    println!(
        "{name}: {kept} experts held, counted {counted} bytes, resident grew {grown} ({ratio:.2}x)",
        kept = kept.len()
    );
    // Each expert's tensors carry some bookkeeping besides their bytes: it matters only for the
    // fixtures' tiny experts.
    let bookkeeping = kept.len() as u64 * 4096;
    if grown < counted * 8 / 10 || grown > counted * 11 / 10 + bookkeeping {
        return Err(format!(
            "{name}: experts counted at {counted} bytes took {grown} ({ratio:.2}x)"
        ));
    }
    let held = matches!(kept[0].gate, Matrix::Blocks(_));
    if name == WIDE && held != Matrix::kernels_on(&candle_core::Device::Cpu) {
        return Err(format!(
            "{name}: experts held in their read buffers: {held}"
        ));
    }
    if held {
        let full = resident_bytes();
        drop(kept);
        odmoe_engine::allocator::give_back();
        let freed = full.saturating_sub(resident_bytes());
        println!("{name}: dropped and given back, resident shrank {freed} bytes");
        if freed < counted * 9 / 10 {
            return Err(format!(
                "{name}: experts held in {counted} bytes of read buffers gave back {freed}"
            ));
        }
    }
    Ok(())
}
