//! Qwen2-MoE and Qwen3-MoE.
//!
//! Qwen2-MoE: qkv bias, a shared expert behind a sigmoid gate, top-k weights not renormalised.
//! Qwen3-MoE: RMSNorm on each head's query and key, no shared expert, renormalised top-k.

use super::gguf_config::GgufConfig;
use super::hf_config::{HfConfig, RopeScalings};
use super::layers::{glu_mlp, linear};
use super::moe::{MoeBlock, Scoring, SharedExpert};
use super::{BaseGroup, DecoderLayer, Family, FeedForward, GgufMatch, SelfAttention};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::expert::ExpertForm;
use crate::format::WeightSource;

pub const QWEN2_MOE: Family = Family {
    architecture: Architecture::Qwen2Moe,
    model_types: &["qwen2_moe"],
    gguf: Some(GgufMatch {
        architecture: "qwen2moe",
        with_experts: None,
    }),
    from_hf: qwen2_from_hf,
    from_gguf: qwen2_from_gguf,
    load_layer,
    expert_names: Some(expert_tensor_names),
    router: router_name,
    feed_forward_group,
};

pub const QWEN3_MOE: Family = Family {
    architecture: Architecture::Qwen3Moe,
    model_types: &["qwen3_moe"],
    gguf: Some(GgufMatch {
        architecture: "qwen3moe",
        with_experts: None,
    }),
    from_hf: qwen3_from_hf,
    from_gguf: qwen3_from_gguf,
    load_layer,
    expert_names: Some(expert_tensor_names),
    router: router_name,
    feed_forward_group,
};

/// What both generations read alike from `config.json`.
fn from_hf(hf: &HfConfig, architecture: Architecture) -> Result<ModelConfig> {
    let mut config = hf.common(architecture, RopeScalings::Plain)?;
    hf.refuse_sliding_window()?;
    let step = hf.decoder_sparse_step.unwrap_or(1);
    if step != 1 || hf.mlp_only_layers.as_ref().is_some_and(|l| !l.is_empty()) {
        return Err(hf.error(
            "dense MLP layers (decoder_sparse_step != 1 or mlp_only_layers) are not supported",
        ));
    }
    hf.set_experts(
        &mut config,
        hf.moe_intermediate_size,
        "moe_intermediate_size",
    )?;
    Ok(config)
}

fn qwen2_from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    let mut config = from_hf(hf, Architecture::Qwen2Moe)?;
    config.attention_bias = hf.qkv_bias.unwrap_or(true);
    config.norm_topk_prob = hf.norm_topk_prob.unwrap_or(false);
    config.shared_expert_intermediate_size = Some(hf.need(
        hf.shared_expert_intermediate_size,
        "shared_expert_intermediate_size",
    )?);
    Ok(config)
}

fn qwen3_from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    let mut config = from_hf(hf, Architecture::Qwen3Moe)?;
    config.qk_norm = true;
    config.norm_topk_prob = hf.norm_topk_prob.unwrap_or(true);
    Ok(config)
}

fn qwen2_from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let mut config = meta.common(Architecture::Qwen2Moe)?;
    meta.set_experts(&mut config, "expert_feed_forward_length")?;
    config.norm_topk_prob = false;
    config.shared_expert_intermediate_size = Some(meta.usize("expert_shared_feed_forward_length")?);
    Ok(config)
}

fn qwen3_from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let mut config = meta.common(Architecture::Qwen3Moe)?;
    meta.set_experts(&mut config, "expert_feed_forward_length")?;
    config.qk_norm = true;
    Ok(config)
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    let shared = match (cfg.architecture, cfg.shared_expert_intermediate_size) {
        (Architecture::Qwen2Moe, Some(width)) => Some(SharedExpert {
            mlp: glu_mlp(
                w,
                ["gate_proj", "up_proj", "down_proj"]
                    .map(|n| format!("{p}.mlp.shared_expert.{n}"))
                    .each_ref()
                    .map(String::as_str),
                h,
                width,
            )?,
            gate: Some(linear(
                w,
                &format!("{p}.mlp.shared_expert_gate"),
                1,
                h,
                false,
            )?),
        }),
        _ => None,
    };
    let ffn = FeedForward::Moe(MoeBlock {
        layer: i,
        router: linear(w, &router_name(i), cfg.num_experts, h, false)?,
        scoring: Scoring::Softmax,
        top_k: cfg.num_experts_per_token,
        norm_topk_prob: cfg.norm_topk_prob,
        unit_weights: false,
        expert_form: ExpertForm::default(),
        shared,
    });
    DecoderLayer::with_norms(cfg, w, i, SelfAttention::grouped(cfg, w, i)?, ffn)
}

/// Routed experts as Qwen (and DeepSeek) name them.
pub fn expert_tensor_names(layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.mlp.experts.{expert}");
    [
        format!("{p}.gate_proj"),
        format!("{p}.up_proj"),
        format!("{p}.down_proj"),
    ]
}

/// The router as Qwen (and DeepSeek) name it.
pub fn router_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.gate")
}

/// The router, and Qwen2-MoE's shared expert with its gate.
fn feed_forward_group(config: &ModelConfig, tensor: &str) -> Option<BaseGroup> {
    if tensor.starts_with("mlp.gate.") {
        Some(BaseGroup::Routers)
    } else if config.shared_expert_intermediate_size.is_some()
        && (tensor.starts_with("mlp.shared_expert.")
            || tensor.starts_with("mlp.shared_expert_gate."))
    {
        Some(BaseGroup::AlwaysOn)
    } else {
        None
    }
}
