//! Llama: GQA attention and one dense SwiGLU feed-forward per layer (no experts). The source of
//! split-expert models, and the reference they must reproduce when every expert is chosen.

use super::gguf_config::GgufConfig;
use super::hf_config::{HfConfig, RopeScalings};
use super::layers::glu_mlp;
use super::{BaseGroup, DecoderLayer, Family, FeedForward, GgufMatch, SelfAttention};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::format::WeightSource;

pub const LLAMA: Family = Family {
    architecture: Architecture::Llama,
    model_types: &["llama"],
    gguf: Some(GgufMatch {
        architecture: "llama",
        with_experts: Some(false),
    }),
    from_hf,
    from_gguf,
    load_layer,
    expert_names: None,
    router: |_| unreachable!("a dense Llama has no routers"),
    feed_forward_group,
};

fn from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    let mut config = hf.common(Architecture::Llama, RopeScalings::Plain)?;
    config.sliding_window = hf.sliding_window;
    config.dense_intermediate_size = Some(hf.need(hf.intermediate_size, "intermediate_size")?);
    Ok(config)
}

fn from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let mut config = meta.common(Architecture::Llama)?;
    config.dense_intermediate_size = Some(meta.usize("feed_forward_length")?);
    Ok(config)
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let width = cfg
        .dense_intermediate_size
        .ok_or_else(|| Error::InvalidModel("a dense Llama needs intermediate_size".into()))?;
    let ffn = FeedForward::Dense(glu_mlp(
        w,
        dense_mlp_names(i).each_ref().map(String::as_str),
        cfg.hidden_size,
        width,
    )?);
    DecoderLayer::with_norms(cfg, w, i, SelfAttention::grouped(cfg, w, i)?, ffn)
}

/// Names of layer `i`'s dense gate, up and down projections (without `.weight`).
pub fn dense_mlp_names(i: usize) -> [String; 3] {
    ["gate_proj", "up_proj", "down_proj"].map(|p| format!("model.layers.{i}.mlp.{p}"))
}

/// A dense Llama is not laid out as experts; its split form is Mixtral's.
fn feed_forward_group(_config: &ModelConfig, _tensor: &str) -> Option<BaseGroup> {
    None
}
