//! The bytes the expert store counts are the bytes experts hold: reading experts and computing
//! with them grows the process's resident memory by what `expert_bytes` says, not by a hidden
//! second copy. candle repacks some quantized types into tiles at their first product (on
//! aarch64 CPUs with dotprod, and on x86-64 with AVX-512 VNNI), kept beside the stored blocks.
//! Alone in its test binary, its tests taking turns, so that nothing else allocates while it
//! measures.
#![cfg(target_os = "linux")]

use std::path::Path;

use odmoe_engine::format::gguf::GgufFile;
use odmoe_engine::store::{ExpertSource, GgufSource};

/// Resident memory of this process, from `/proc/self/statm`.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap();
    pages * page as u64
}

#[test]
fn experts_in_types_kept_as_stored_take_the_bytes_the_budget_counts() {
    held_as_counted(&["qwen3_moe-q8_0.gguf", "mixtral-f32.gguf"]);
}

#[test]
#[ignore = "on x86-64 odmoe's kernels compute K-quants, so candle no longer repacks them \
            (it held 2.6x): measured 1.14x for mixtral Q4_K_M and 1.01x for qwen3_moe Q6_K, the \
            first still above the bound and not yet explained; aarch64 CPUs with dotprod still \
            go through candle's repacking: run with --ignored"]
fn experts_in_types_candle_repacks_take_the_bytes_the_budget_counts() {
    held_as_counted(&["mixtral-k-q4_k_m.gguf", "qwen3_moe-k-q6_k.gguf"]);
}

/// Reads and computes with every expert of each GGUF fixture in `names`, many times over and
/// all kept, and fails unless resident memory grew by what the store counts for them.
fn held_as_counted(names: &[&str]) {
    // The tests take turns: each measures the whole process.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut failures = Vec::new();
    for name in names {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf")
            .join(name);
        let gguf = GgufFile::open(&path, &candle_core::Device::Cpu).unwrap();
        let config = odmoe_engine::model::config_from_gguf(&gguf).unwrap();
        let source = GgufSource::new(&config, &gguf, false).unwrap();
        let experts: Vec<(usize, usize)> = config
            .moe_layers()
            .flat_map(|layer| (0..config.num_experts).map(move |expert| (layer, expert)))
            .collect();
        // Every expert many times over, all kept: tens of MiB, well above the allocator's noise.
        let copies = (64 << 20) / (experts.len() as u64 * source.expert_bytes()).max(1) + 1;
        // What an earlier fixture freed goes back first, or its reuse would hide growth.
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { nix::libc::malloc_trim(0) };
        let before = resident_bytes();
        let mut kept = Vec::new();
        for _ in 0..copies {
            for &(layer, expert) in &experts {
                let (weights, _) = source.read(layer, expert).unwrap();
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
        let counted = kept.len() as u64 * source.expert_bytes();
        let ratio = grown as f64 / counted as f64;
        println!(
            "{name}: {kept} experts held, counted {counted} bytes, resident grew {grown} ({ratio:.2}x)",
            kept = kept.len()
        );
        // Each expert's tensors carry some bookkeeping besides their bytes: it matters only
        // for the fixtures' tiny experts.
        let bookkeeping = kept.len() as u64 * 4096;
        if grown < counted * 8 / 10 || grown > counted * 11 / 10 + bookkeeping {
            failures.push(format!(
                "{name}: experts counted at {counted} bytes took {grown} ({ratio:.2}x)"
            ));
        }
        drop(kept);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
