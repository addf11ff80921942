//! Llama: GQA attention and one dense SwiGLU feed-forward per layer (no experts). The source of
//! split-expert models, and the reference they must reproduce when every expert is chosen.

use super::config::ModelConfig;
use super::layers::{Attention, RmsNorm, glu_mlp};
use super::{DecoderLayer, FeedForward, SelfAttention};
use crate::error::{Error, Result};
use crate::format::WeightSource;

pub fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    let width = cfg
        .dense_intermediate_size
        .ok_or_else(|| Error::InvalidRequest("a dense Llama needs intermediate_size".into()))?;
    Ok(DecoderLayer {
        input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, cfg.rms_norm_eps)?,
        attention: SelfAttention::Grouped(Attention::load(cfg, w, &format!("{p}.self_attn"))?),
        post_attention_norm: RmsNorm::load(
            w,
            &format!("{p}.post_attention_layernorm"),
            h,
            cfg.rms_norm_eps,
        )?,
        ffn: FeedForward::Dense(glu_mlp(
            w,
            dense_mlp_names(i).each_ref().map(String::as_str),
            h,
            width,
        )?),
    })
}

/// Names of layer `i`'s dense gate, up and down projections (without `.weight`).
pub fn dense_mlp_names(i: usize) -> [String; 3] {
    ["gate_proj", "up_proj", "down_proj"].map(|p| format!("model.layers.{i}.mlp.{p}"))
}
