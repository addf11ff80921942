//! The flags that choose a model and where its experts live, shared by the offline commands.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use odmoe_engine::model::KvType;
use odmoe_engine::open::{self, ExpertMode, LoadOptions, LoadedModel};
use odmoe_engine::predict::PredictorKind;
use odmoe_engine::store::budget::parse_budget;
use odmoe_engine::store::{PolicyKind, StoreConfig};

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model: a Hugging Face checkpoint directory, an odmoe layout (MODEL.odmoe) or a GGUF file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Read experts on demand under this budget: a size with its unit (64MiB, 1.5GB) or a
    /// percentage of all experts (25%). Without it (or with --resident) every expert is loaded up
    /// front; a dense model (no experts) is always loaded whole.
    #[arg(long, value_name = "SIZE|PCT", conflicts_with = "resident")]
    pub expert_budget: Option<String>,
    /// Load every expert up front (the default unless --expert-budget is given).
    #[arg(long)]
    pub resident: bool,
    /// Threads reading experts (with --expert-budget).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub io_threads: usize,
    /// Eviction policy (with --expert-budget): reuse evicts the expert whose next use is expected
    /// last (its layer's place in the cycle and its history of use), cycle the expert whose layer
    /// comes round last, lru the least recently used, lfuda the least frequently used with aging.
    #[arg(long, default_value = "reuse", value_name = "reuse|cycle|lru|lfuda")]
    pub policy: PolicyKind,
    /// Check each expert file's sha256 against the manifest as it is read (odmoe layout).
    #[arg(long)]
    pub verify_checksums: bool,
    /// Route each token to K experts instead of the model's own number (quality/speed trade-off,
    /// e.g. for split models).
    #[arg(long, value_name = "K")]
    pub experts_per_token: Option<usize>,
    /// With --expert-budget, read the experts a predictor expects one layer ahead while the
    /// current layer computes: lookahead (the next layer's router on the current hidden state),
    /// history (what followed the current layer's experts before) or none. It switches itself
    /// off while wasteful.
    #[arg(
        long,
        default_value = "lookahead",
        value_name = "none|lookahead|history"
    )]
    pub prefetch_experts: PredictorKind,
    /// Prefetch only guesses scoring at least this (a routing probability for lookahead, an
    /// estimated chance of being routed for history); 0 prefetches every top-k guess.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub prefetch_min_score: f32,
    /// Let expert reads go through the page cache (by default they bypass it, so the budget is
    /// the only copy in memory).
    #[arg(long)]
    pub page_cache: bool,
    /// Widen a GGUF file's quantized attention, embedding and output matrices to f32 (exact
    /// dequantized math, at four times the memory of Q8_0) instead of computing in their type.
    #[arg(long)]
    pub f32_base: bool,
    /// Most tokens one sequence may hold (prompt and reply together), below the model's own
    /// maximum positions [default: the model's].
    #[arg(long, value_name = "TOKENS")]
    pub context_length: Option<usize>,
    /// Keep attention's keys and values in f16 (half the memory of f32, as llama.cpp keeps
    /// them), f32 (exact math) or q8_0 (34 bytes for f16's 64, CPU only); latent attention's
    /// latents and rotary keys in f32, or f16 for both others
    #[arg(long, default_value = "f16", value_name = "f16|f32|q8_0", value_parser = parse_kv_cache)]
    pub kv_cache: KvType,
    /// Most prompt tokens a prefill runs through the layers together: a longer prompt goes
    /// slab after slab, its activations sized by the slab, each layer's experts read once per
    /// slab
    #[arg(long, default_value_t = odmoe_engine::model::DEFAULT_PREFILL_SLAB, value_name = "TOKENS")]
    pub prefill_slab: usize,
}

fn parse_kv_cache(text: &str) -> Result<KvType, String> {
    text.parse().map_err(|e: odmoe_engine::Error| e.to_string())
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_with(self.prefetch_experts, 1)
    }

    /// Loads with `prefetch`, guessing `prefetch_depth` routed layers ahead, instead of the
    /// flag's choice one layer ahead (for benchmarks that choose their own).
    pub fn load_with(&self, prefetch: PredictorKind, prefetch_depth: usize) -> Result<LoadedModel> {
        let experts = match &self.expert_budget {
            None => ExpertMode::Resident,
            Some(text) => {
                let (config, total) = open::describe(&self.model)?;
                if open::is_dense(&config) {
                    eprintln!(
                        "note: {} is a dense model (no experts): it loads whole and \
                         --expert-budget does not apply",
                        self.model.display()
                    );
                    ExpertMode::Resident
                } else {
                    ExpertMode::OnDemand(StoreConfig {
                        budget_bytes: parse_budget(text, total)?,
                        io_threads: self.io_threads,
                        policy: self.policy,
                    })
                }
            }
        };
        let options = LoadOptions {
            experts,
            verify_checksums: self.verify_checksums,
            bypass_page_cache: !self.page_cache,
            experts_per_token: self.experts_per_token,
            prefetch,
            prefetch_depth,
            prefetch_min_score: self.prefetch_min_score,
            quantized_base: !self.f32_base,
            context_length: self.context_length,
            kv_cache: self.kv_cache,
            prefill_slab: self.prefill_slab,
        };
        let device = odmoe_engine::default_device()?;
        open::load(&self.model, &options, &device)
            .with_context(|| format!("loading model from {}", self.model.display()))
    }
}
