//! GLM-4.5, 4.6 and 4.7 (`glm4_moe`; GGUF `glm4moe`).
//!
//! - Grouped-query attention with biases on the query, key and value projections, an RMSNorm
//!   on each head's query and key where the config says (`use_qk_norm`), and rotary position on
//!   the first `partial_rotary_factor` of each head's dimensions in the rotate-half layout.
//! - DeepSeek-V3's feed-forward: sigmoid routing with a correction bias that only chooses,
//!   group-limited (every released config has one group), weights times
//!   `routed_scaling_factor`; resident shared experts; dense first layers.
//! - The multi-token-prediction layers the checkpoints carry after the last decoder layer
//!   (`num_nextn_predict_layers`) are not run: they only draft tokens for speculative decoding.

use super::gguf_config::GgufConfig;
use super::hf_config::{HfConfig, RopeScalings};
use super::{DecoderLayer, Family, GgufMatch, SelfAttention, deepseek, qwen_moe};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::format::WeightSource;

pub const GLM4_MOE: Family = Family {
    architecture: Architecture::Glm4Moe,
    model_types: &["glm4_moe"],
    gguf: Some(GgufMatch {
        architecture: "glm4moe",
        with_experts: None,
    }),
    from_hf,
    from_gguf,
    load_layer,
    expert_names: Some(qwen_moe::expert_tensor_names),
    router: qwen_moe::router_name,
    feed_forward_group: deepseek::feed_forward_group,
};

/// transformers' `partial_rotary_factor` when a GLM-4.5 config leaves it out.
const DEFAULT_PARTIAL_ROTARY_FACTOR: f64 = 0.5;

fn from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    let mut config = hf.common(Architecture::Glm4Moe, RopeScalings::Plain)?;
    hf.refuse_sliding_window()?;
    config.deepseek = Some(deepseek::set_routed_experts(hf, &mut config)?);
    config.qk_norm = hf.use_qk_norm.unwrap_or(false);
    let factor = hf
        .partial_rotary_factor()?
        .unwrap_or(DEFAULT_PARTIAL_ROTARY_FACTOR);
    // transformers truncates: `int(head_dim * partial_rotary_factor)`.
    let rotary = (config.head_dim as f64 * factor) as usize;
    config.rotary_dim = Some(checked_rotary_dim(rotary, config.head_dim).map_err(|m| hf.error(m))?);
    Ok(config)
}

fn from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let mut config = meta.common(Architecture::Glm4Moe)?;
    // llama.cpp's converter counts the multi-token-prediction layers into `block_count`.
    let drafting = meta.opt_usize("nextn_predict_layers")?.unwrap_or(0);
    config.draft_layers = drafting;
    config.num_layers = config
        .num_layers
        .checked_sub(drafting)
        .filter(|&layers| layers > 0)
        .ok_or_else(|| {
            meta.error(format!(
                "glm4moe block_count {} leaves no decoder layer besides its {drafting} \
                 multi-token-prediction layers",
                config.num_layers
            ))
        })?;
    // llama.cpp routes a glm4moe file that does not say how with sigmoid.
    const SIGMOID: usize = 2;
    config.deepseek = Some(deepseek::gguf_routed_experts(
        meta,
        &mut config,
        Some(SIGMOID),
    )?);
    if meta.has("rope.scaling.type") && meta.str("rope.scaling.type")? != "none" {
        return Err(meta.error(
            "glm4moe rope scaling is not supported: GLM-4.5 models use plain rotary positions",
        ));
    }
    config.qk_norm = meta.gguf.has_tensor("blk.0.attn_q_norm.weight");
    let rotary = meta.usize("rope.dimension_count")?;
    config.rotary_dim =
        Some(checked_rotary_dim(rotary, config.head_dim).map_err(|m| meta.error(m))?);
    Ok(config)
}

/// `rotary` dimensions of a head of `head_dim`, if they can turn in pairs.
fn checked_rotary_dim(rotary: usize, head_dim: usize) -> std::result::Result<usize, String> {
    if rotary == 0 || rotary > head_dim || !rotary.is_multiple_of(2) {
        return Err(format!(
            "a rotary width of {rotary} does not fit heads of {head_dim}: it must be even and \
             between 2 and the head's width"
        ));
    }
    Ok(rotary)
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let attention = SelfAttention::grouped(cfg, w, i)?;
    DecoderLayer::with_norms(cfg, w, i, attention, deepseek::feed_forward(cfg, w, i)?)
}
