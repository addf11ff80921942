//! Mixtral: plain GQA attention (optionally windowed), softmax top-k routing always renormalised,
//! experts named `w1` (gate), `w3` (up) and `w2` (down). Split Llama models (experts partitioned
//! from a dense feed-forward) share the layout and sum their chosen experts with weight one.

use super::config::{Architecture, ModelConfig};
use super::layers::{Attention, RmsNorm, linear};
use super::moe::{MoeBlock, Scoring};
use super::{DecoderLayer, FeedForward, SelfAttention};
use crate::error::Result;
use crate::format::WeightSource;

pub fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    let attention = SelfAttention::Grouped(Attention::load(cfg, w, &format!("{p}.self_attn"))?);
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
            router: linear(
                w,
                &format!("{p}.block_sparse_moe.gate"),
                cfg.num_experts,
                h,
                false,
            )?,
            scoring: Scoring::Softmax,
            top_k: cfg.num_experts_per_token,
            norm_topk_prob: true,
            unit_weights: cfg.architecture == Architecture::SplitLlama,
            shared: None,
        }),
    })
}

pub fn expert_tensor_names(layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
    [format!("{p}.w1"), format!("{p}.w3"), format!("{p}.w2")]
}
