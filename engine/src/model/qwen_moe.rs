//! Qwen2-MoE and Qwen3-MoE.
//!
//! Qwen2-MoE: qkv bias, a shared expert behind a sigmoid gate, top-k weights not renormalised.
//! Qwen3-MoE: RMSNorm on each head's query and key, no shared expert, renormalised top-k.

use super::config::{Architecture, ModelConfig};
use super::layers::{Attention, RmsNorm, glu_mlp, linear};
use super::moe::{MoeBlock, Scoring, SharedExpert};
use super::{DecoderLayer, FeedForward, SelfAttention};
use crate::error::Result;
use crate::format::WeightSource;

pub fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    let attention = SelfAttention::Grouped(Attention::load(cfg, w, &format!("{p}.self_attn"))?);
    let shared = match (cfg.architecture, cfg.shared_expert_intermediate_size) {
        (Architecture::Qwen2Moe, Some(width)) => Some(SharedExpert {
            mlp: glu_mlp(
                w,
                [
                    &format!("{p}.mlp.shared_expert.gate_proj"),
                    &format!("{p}.mlp.shared_expert.up_proj"),
                    &format!("{p}.mlp.shared_expert.down_proj"),
                ],
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
    Ok(DecoderLayer {
        input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, cfg.rms_norm_eps)?,
        attention,
        post_attention_norm: RmsNorm::load(
            w,
            &format!("{p}.post_attention_layernorm"),
            h,
            cfg.rms_norm_eps,
        )?,
        ffn: FeedForward::Moe(MoeBlock {
            layer: i,
            router: linear(w, &format!("{p}.mlp.gate"), cfg.num_experts, h, false)?,
            scoring: Scoring::Softmax,
            top_k: cfg.num_experts_per_token,
            norm_topk_prob: cfg.norm_topk_prob,
            unit_weights: false,
            shared,
        }),
    })
}

pub fn expert_tensor_names(layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.mlp.experts.{expert}");
    [
        format!("{p}.gate_proj"),
        format!("{p}.up_proj"),
        format!("{p}.down_proj"),
    ]
}
