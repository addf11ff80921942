//! Mixtral: plain GQA attention (optionally windowed), softmax top-k routing always renormalised,
//! experts named `w1` (gate), `w3` (up) and `w2` (down). Split Llama models (experts partitioned
//! from a dense feed-forward by `odmoe convert --split-experts`) share the layout and sum their
//! chosen experts with weight one.

use super::gguf_config::GgufConfig;
use super::hf_config::{HfConfig, RopeScalings};
use super::layers::linear;
use super::moe::{MoeBlock, Scoring};
use super::{BaseGroup, DecoderLayer, Family, FeedForward, GgufMatch, SelfAttention};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::expert::ExpertForm;
use crate::format::WeightSource;

pub const MIXTRAL: Family = Family {
    architecture: Architecture::Mixtral,
    model_types: &["mixtral"],
    // llama.cpp writes Mixtral as `llama` with experts.
    gguf: Some(GgufMatch {
        architecture: "llama",
        with_experts: Some(true),
    }),
    from_hf: |hf| from_hf(hf, Architecture::Mixtral),
    from_gguf,
    load_layer,
    expert_names: Some(expert_tensor_names),
    router: router_name,
    feed_forward_group,
};

pub const SPLIT_LLAMA: Family = Family {
    architecture: Architecture::SplitLlama,
    model_types: &["odmoe_split_llama"],
    gguf: None,
    from_hf: |hf| from_hf(hf, Architecture::SplitLlama),
    from_gguf: |meta| Err(meta.error("a split Llama is written as a Hugging Face checkpoint")),
    load_layer,
    expert_names: Some(expert_tensor_names),
    router: router_name,
    feed_forward_group,
};

fn from_hf(hf: &HfConfig, architecture: Architecture) -> Result<ModelConfig> {
    let mut config = hf.common(architecture, RopeScalings::Plain)?;
    config.sliding_window = hf.sliding_window;
    hf.set_experts(&mut config, hf.intermediate_size, "intermediate_size")?;
    Ok(config)
}

fn from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let mut config = meta.common(Architecture::Mixtral)?;
    meta.set_experts(&mut config, "feed_forward_length")?;
    Ok(config)
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let ffn = FeedForward::Moe(MoeBlock {
        layer: i,
        router: linear(w, &router_name(i), cfg.num_experts, cfg.hidden_size, false)?,
        scoring: Scoring::Softmax,
        top_k: cfg.num_experts_per_token,
        norm_topk_prob: true,
        unit_weights: cfg.architecture == Architecture::SplitLlama,
        expert_form: ExpertForm::default(),
        shared: None,
    });
    DecoderLayer::with_norms(cfg, w, i, SelfAttention::grouped(cfg, w, i)?, ffn)
}

fn expert_tensor_names(layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
    [format!("{p}.w1"), format!("{p}.w3"), format!("{p}.w2")]
}

fn router_name(layer: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.gate")
}

fn feed_forward_group(_config: &ModelConfig, tensor: &str) -> Option<BaseGroup> {
    tensor
        .starts_with("block_sparse_moe.gate.")
        .then_some(BaseGroup::Routers)
}
