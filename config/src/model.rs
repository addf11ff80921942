//! `[model]`: what to serve, how much memory its experts may use, how long
//! it stays loaded.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::KeepAlive;
use crate::size::{Size, deserialize_size, format_size};

/// `[model]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The model to serve (an `.odmoe` directory, a GGUF file or a Hugging Face
    /// checkpoint directory). Default: none, load one later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Memory for cached experts. Default `"auto"`.
    pub expert_budget: ExpertBudget,
    /// Most positions a sequence may hold (prompt and reply together), to
    /// lower the model's own maximum; 0 keeps the model's. Default 0.
    pub context_length: u32,
    /// How attention's keys and values are kept: "f16" (half f32's memory, as
    /// llama.cpp keeps them), "f32" (exact math, twice the memory) or "q8_0"
    /// (34 bytes for f16's 64, on the CPU). Takes effect at the next start.
    /// Default "f16".
    pub kv_cache: KvCache,
    /// Most prompt tokens a prefill runs through the layers together: a longer
    /// prompt goes slab after slab, so its activations take memory for a slab,
    /// not the whole prompt, and each layer's experts are read once per slab.
    /// 0 keeps the default, 4096. Takes effect at the next start. Default 0.
    pub prefill_slab_tokens: u32,
    /// Where the experts the next layer will want are guessed from, so they are
    /// read while the current layer computes (with an expert budget):
    /// "lookahead" (the next layers' routers applied to the current hidden
    /// state), "history" (what followed the current layer's experts before) or
    /// "none". Each switches itself off while its reads waste more than they
    /// save. Takes effect at the next load. Default "lookahead".
    pub prefetch: Prefetch,
    /// How long the model stays loaded after its last request: a duration
    /// ("5m"), 0 to unload after each reply, -1 to keep it. Requests may set
    /// their own. Default -1.
    pub keep_alive: KeepAlive,
    /// Where `odmoe models` looks for models and `load NAME` finds them.
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<PathBuf>,
}

/// The number type attention's keys and values (latent attention's latents) are kept in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    #[default]
    F16,
    F32,
    /// Rows of 32-value blocks, an f16 scale and 32 signed bytes each (GGUF's Q8_0).
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// Where prefetched experts are guessed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    None,
    #[default]
    Lookahead,
    History,
}

/// How much memory cached experts may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum ExpertBudget {
    /// Decided from the machine's memory and adapted to memory pressure.
    #[default]
    Auto,
    /// A fixed number of bytes (`"8GiB"`).
    Bytes(u64),
    /// A share of all the model's experts, in percent (`"25%"`), as
    /// `odmoe run --expert-budget` reads it.
    Percent(f64),
}

impl<'de> Deserialize<'de> for ExpertBudget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match deserialize_size(deserializer, true)? {
            None => ExpertBudget::Auto,
            Some(Size::Bytes(bytes)) => ExpertBudget::Bytes(bytes),
            Some(Size::Percent(percent)) => ExpertBudget::Percent(percent),
        })
    }
}

impl Serialize for ExpertBudget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ExpertBudget::Auto => serializer.serialize_str("auto"),
            ExpertBudget::Bytes(bytes) => serializer.collect_str(&format_size(*bytes)),
            ExpertBudget::Percent(percent) => serializer.collect_str(&format_args!("{percent}%")),
        }
    }
}
