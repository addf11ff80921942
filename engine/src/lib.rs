//! odmoe-engine: exact inference for Mixture-of-Experts language models whose experts need not all
//! be in memory.
//!
//! Imports run one way (README, "Layout"; checked by `tests/layering.rs`):
//!
//! - [`open`] is the composition root: it opens a Hugging Face directory, an odmoe layout or a
//!   GGUF file with every expert resident or on demand, with its predictor and tokenizer.
//! - [`convert`] writes the odmoe layout (and splits dense models into experts).
//! - [`generate`] runs prefill and decode with sampling and stop conditions; [`eval`] scores text.
//! - [`predict`] guesses the next layers' experts so the store can prefetch them, and records and
//!   replays routing traces against the offline optimum.
//! - [`model`] holds the architecture registry ([`model::FAMILIES`]) and the forward pass on
//!   shared layers; one file per architecture (Qwen2-MoE, Qwen3-MoE, Mixtral, Llama and its
//!   split form, DeepSeek-V3).
//! - [`tokenizer`] encodes, decodes incrementally and renders chat templates.
//! - [`store`] keeps a byte-budgeted working set of experts read on demand, with eviction
//!   policies, page-cache bypass, checksums and telemetry.
//! - [`expert`] is the contract between store and models: an expert's weights, pinned handles,
//!   reads in flight, [`expert::ExpertProvider`], and applying experts to tokens.
//! - [`kernels`] multiply in the weights' stored type (odmoe's Q8_0 kernel, else candle's).
//! - [`format`] reads safetensors, GGUF and the odmoe layout; [`config`] is the normalised
//!   architecture config.
//!
//! The engine never touches a socket: the daemon drives it through these types.
//!
//! ```no_run
//! # fn main() -> odmoe_engine::Result<()> {
//! use odmoe_engine::{generate::{GenerateRequest, Session}, tokenizer::Tokenizer};
//! let dir = std::path::Path::new("tests/fixtures/qwen3_moe");
//! let model = odmoe_engine::open::resident(dir, &odmoe_engine::default_device()?)?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let prompt = tokenizer.encode("The quick brown fox", false)?;
//! let mut session = Session::new(&model);
//! let request = GenerateRequest { prompt, max_tokens: 8, ..GenerateRequest::default() };
//! let out = session.generate(&model, Some(&tokenizer), &request, |_| true)?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

pub mod allocator;
pub mod config;
pub mod convert;
pub mod error;
pub mod eval;
pub mod expert;
pub mod format;
pub mod generate;
pub mod kernels;
pub mod lock;
pub mod model;
pub mod open;
pub mod predict;
pub mod store;
mod time;
pub mod tokenizer;

pub use error::{Error, Result};

/// Settles how candle computes on the CPU. Candle reads its settings from the environment when
/// its thread pool starts, so this runs first thing in `main`; a variable the user set wins.
///
/// No retiled copies of Q8_0 weights (`MISTRALRS_FORCE_AVX2`, candle's switch): on AVX512-VNNI
/// CPUs candle keeps a retiled copy beside every Q8_0 matrix on first use. That doubles what an
/// expert really holds against the store's budget (a 6 GB Q8_0 model took 11 GB resident) and
/// repacks every expert read from disk; and it was slower here, 13.2 against 17.2 tok/s decode and
/// 12.1 against 1.8 s to the first token (`odmoe bench decode --resident`, 2 threads).
///
/// Q8_0 itself goes through odmoe's own kernels (`kernels::quantized`) where the CPU has AVX2 or AVX-512;
/// the switch still matters for other quantized types.
///
/// The thread count fixed once (`RAYON_NUM_THREADS`, to the count candle would choose): unset,
/// candle counts physical cores by reading `/proc/cpuinfo` on every f32 matrix product, which
/// took 2% of decode time.
///
/// Pool workers that sleep soon (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, 1,000 spins of about 20 ns
/// instead of 25,000): after each parallel product candle's workers spin before they sleep, half
/// a millisecond at its default. With experts on demand a layer often waits longer than that for
/// a read, and the spinning worker held a core the reads needed for their copy and checksum:
/// 30% of decode's CPU samples at a 2 GB limit. With experts read from the page cache (as from a
/// fast SSD), decode went from 30.7 to 35.1 tok/s without prefetch and 26.1 to 31.7 with it
/// (skewed 18-layer qwen3moe, three runs each); resident decode, whose products follow one
/// another within microseconds, stayed within its spread (about 60 tok/s).
///
/// # Safety
/// Changes the process environment: call it before any other thread starts.
pub unsafe fn configure_cpu_compute() {
    if std::env::var_os("MISTRALRS_FORCE_AVX2").is_none() {
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("MISTRALRS_FORCE_AVX2", "1") };
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000") };
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads().to_string();
        // SAFETY: as above.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads) };
    }
}

/// The device models run on: Metal when built with the `metal` feature, else the CPU.
pub fn default_device() -> Result<candle_core::Device> {
    #[cfg(feature = "metal")]
    {
        Ok(candle_core::Device::new_metal(0)?)
    }
    #[cfg(not(feature = "metal"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}
