//! What checking an expert's checksum costs next to reading it: a measurement, not a test of
//! behaviour, so it is ignored by default and asserts nothing about time. Run it with
//!
//! ```text
//! cargo test -p odmoe-engine --test checksum_cost -- --ignored --nocapture
//! ```
//!
//! (the workspace builds dependencies, xxhash-rust among them, optimised even in the dev profile).
//!
//! It writes 64 files of 9 MiB (a Qwen3-30B-A3B bf16 expert) under `$TMPDIR`, reads each once as
//! the layout source does (one aligned read, page cache bypassed, 4 reads in flight as the store's
//! I/O pool keeps them), and hashes the same buffers with xxh3-64 as every read is checked.

use std::path::PathBuf;
use std::time::Instant;

use odmoe_engine::store::fetch::{Pace, read_aligned};
use xxhash_rust::xxh3::xxh3_64;

const EXPERT_BYTES: usize = 9 << 20;
const FILES: usize = 64;
const READERS: usize = 4;

fn write_experts(dir: &std::path::Path) -> Vec<PathBuf> {
    (0..FILES)
        .map(|i| {
            let path = dir.join(format!("expert_{i:03}"));
            let bytes: Vec<u8> = (0..EXPERT_BYTES)
                .map(|k| (k.wrapping_mul(2654435761) >> 7) as u8 ^ i as u8)
                .collect();
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect()
}

/// Seconds to read every file once with `READERS` reads in flight, hashing each buffer read when
/// `hash` is set; and the seconds spent hashing alone, summed over readers.
fn read_all(files: &[PathBuf], bypass_cache: bool, hash: bool) -> (f64, f64) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let hashing = std::sync::Mutex::new(0.0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..READERS {
            scope.spawn(|| {
                while let Some(path) =
                    files.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let buf =
                        read_aligned(path, 0, EXPERT_BYTES, bypass_cache, Pace::Whole).unwrap();
                    if hash {
                        let hashed = Instant::now();
                        std::hint::black_box(xxh3_64(&buf));
                        *hashing.lock().unwrap() += hashed.elapsed().as_secs_f64();
                    }
                }
            });
        }
    });
    (
        started.elapsed().as_secs_f64(),
        hashing.into_inner().unwrap(),
    )
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn checksum_cost_next_to_the_read() {
    let buffer: Vec<u8> = (0..EXPERT_BYTES).map(|k| (k * 31 % 251) as u8).collect();
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(xxh3_64(std::hint::black_box(&buffer)));
    }
    let per_hash = started.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "xxh3_64 of 9 MiB: {:.3} ms ({:.1} GB/s, one core)",
        per_hash * 1e3,
        EXPERT_BYTES as f64 / per_hash / 1e9
    );

    let dir = tempfile::tempdir().unwrap();
    let files = write_experts(dir.path());
    let bytes = (FILES * EXPERT_BYTES) as f64;
    for (what, bypass_cache) in [
        ("from the device (page cache bypassed)", true),
        ("from the page cache", false),
    ] {
        if !bypass_cache {
            read_all(&files, false, false); // warm the page cache
        }
        // Alternating runs, best of three each: the device's rate drifts between runs.
        let (mut plain, mut checked, mut hashing) = (f64::MAX, f64::MAX, 0.0);
        for _ in 0..3 {
            plain = plain.min(read_all(&files, bypass_cache, false).0);
            let (seconds, hashed) = read_all(&files, bypass_cache, true);
            if seconds < checked {
                (checked, hashing) = (seconds, hashed);
            }
        }
        let per_expert = checked * READERS as f64 / FILES as f64;
        println!(
            "reads {what}: {:.2} GB/s unchecked, {:.2} GB/s checked; per expert, hashing takes \
             {:.3} ms of {:.3} ms ({:.1}%)",
            bytes / plain / 1e9,
            bytes / checked / 1e9,
            hashing / FILES as f64 * 1e3,
            per_expert * 1e3,
            100.0 * hashing / (checked * READERS as f64),
        );
    }
}
