//! gpt-oss (`gpt_oss`; GGUF `gpt-oss`).
//!
//! - Grouped-query attention with biases on every projection, the output's included, and a
//!   learned sink logit per query head that joins each softmax without a value.
//! - Layers alternate between a sliding window (`sliding_window`, 128) and full attention,
//!   windowed first: transformers' `layer_types`, llama.cpp's pattern of 2.
//! - YaRN rotary position in the rotate-half layout. Every gpt-oss config says
//!   `truncate: false` (the correction range is not rounded to whole dimensions), and GGUF
//!   files have no key for it, so it is taken as false for them too. llama.cpp rounds the range
//!   regardless; on the test model that moves its logits by 0.035 from transformers'.
//! - A router with a bias; the top-k logits are softmaxed (the same weights as a softmax over
//!   every expert renormalised over the top k, which is how [`Scoring::Softmax`] computes them).
//! - Experts with biases and the clamped SwiGLU ([`ExpertGating::ClampedSwiglu`]). The biases
//!   stay resident with the router; the store holds the three matrices.
//!
//! Hugging Face checkpoints keep each layer's experts in one fused tensor (`gate_up_proj`, gate
//! and up interleaved), which the checkpoint reader slices per expert (see
//! `format::safetensors::View`); the released checkpoints keep those in MXFP4 blocks, which are
//! not read from safetensors yet (their GGUF conversions are).

use candle_core::{D, Tensor};

use super::gguf_config::GgufConfig;
use super::hf_config::{HfConfig, RopeScalings};
use super::layers::linear;
use super::moe::{MoeBlock, Scoring};
use super::{BaseGroup, DecoderLayer, Family, FeedForward, GgufMatch, SelfAttention, qwen_moe};
use crate::config::{Architecture, ExpertGating, ModelConfig};
use crate::error::Result;
use crate::expert::{ExpertBiases, ExpertForm};
use crate::format::WeightSource;

pub const GPT_OSS: Family = Family {
    architecture: Architecture::GptOss,
    model_types: &["gpt_oss"],
    gguf: Some(GgufMatch {
        architecture: "gpt-oss",
        with_experts: None,
    }),
    from_hf,
    from_gguf,
    load_layer,
    expert_names: Some(qwen_moe::expert_tensor_names),
    router: router_name,
    feed_forward_group,
};

/// The clamped SwiGLU of every released gpt-oss: transformers' `swiglu_alpha` and
/// `swiglu_limit` defaults, llama.cpp's constants.
const SWIGLU_ALPHA: f32 = 1.702;
const SWIGLU_LIMIT: f32 = 7.0;

/// llama.cpp's sliding-window pattern for gpt-oss: of each group of this many layers, all but
/// the last are windowed (for 2, the even layers).
const WINDOW_PATTERN: usize = 2;

fn from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    // OpenAI's checkpoints keep the experts in MXFP4 (read where the experts are located); no
    // other quantization is read.
    if let Some(method) = hf
        .quantization_config
        .as_ref()
        .and_then(|q| q.get("quant_method"))
        .filter(|method| method.as_str() != Some("mxfp4"))
    {
        return Err(hf.error(format!(
            "gpt-oss checkpoints quantized with {method} are not read: BF16 checkpoints and \
             MXFP4 ones (as OpenAI released them) are"
        )));
    }
    let mut config = hf.common(Architecture::GptOss, RopeScalings::PlainOrYarn)?;
    hf.set_experts(&mut config, hf.intermediate_size, "intermediate_size")?;
    // The top-k logits softmaxed: the top-k probabilities renormalised.
    config.norm_topk_prob = true;
    config.rope_yarn = hf.yarn()?;
    config.sliding_window = hf.sliding_window;
    config.window_layers = Some(match &hf.layer_types {
        Some(types) => {
            if types.len() != config.num_layers {
                return Err(hf.error(format!(
                    "layer_types lists {} layers, the model has {}",
                    types.len(),
                    config.num_layers
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(hf.error(format!("layer_types: {other:?} is unknown"))),
                })
                .collect::<Result<_>>()?
        }
        // transformers' default: windowed first, then alternating.
        None => (0..config.num_layers).map(|l| l % 2 == 0).collect(),
    });
    config.attention_sinks = true;
    // gpt-oss's attention_bias covers the output projection too.
    config.attention_output_bias = config.attention_bias;
    config.expert_gating = ExpertGating::ClampedSwiglu {
        alpha: hf.swiglu_alpha.unwrap_or(SWIGLU_ALPHA),
        limit: hf.swiglu_limit.unwrap_or(SWIGLU_LIMIT),
    };
    Ok(config)
}

fn from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let mut config = meta.common(Architecture::GptOss)?;
    meta.set_experts(&mut config, "expert_feed_forward_length")?;
    // The top-k logits softmaxed: the top-k probabilities renormalised.
    config.norm_topk_prob = true;
    config.sliding_window = Some(meta.usize("attention.sliding_window")?);
    config.window_layers = Some(window_layers(meta, config.num_layers)?);
    // Every released gpt-oss ropes its windowed layers like the others.
    if let Some(base) = meta.opt_f64("rope.freq_base_swa")?
        && base != config.rope_theta
    {
        return Err(meta.error(format!(
            "gpt-oss rope.freq_base_swa {base} differs from rope.freq_base {}: a separate base \
             for windowed layers is not supported",
            config.rope_theta
        )));
    }
    for key in ["yarn_attn_factor", "yarn_log_multiplier", "yarn_ext_factor"] {
        if meta.has(&format!("rope.scaling.{key}")) {
            return Err(meta.error(format!(
                "gpt-oss rope.scaling.{key} is not supported (gpt-oss's YaRN has none)"
            )));
        }
    }
    // gpt-oss's configs say not to truncate YaRN's correction range, and a GGUF cannot say it:
    // the plain scaling `yarn` gives is gpt-oss's.
    config.rope_yarn = meta.yarn()?;
    config.attention_sinks = true;
    config.attention_output_bias = meta.gguf.has_tensor("blk.0.attn_output.bias");
    config.expert_gating = ExpertGating::ClampedSwiglu {
        alpha: SWIGLU_ALPHA,
        limit: SWIGLU_LIMIT,
    };
    Ok(config)
}

/// Which layers attend within the window: `attention.sliding_window_pattern` as llama.cpp reads
/// it, one flag per layer or a period (default 2).
fn window_layers(meta: &GgufConfig, layers: usize) -> Result<Vec<bool>> {
    const KEY: &str = "attention.sliding_window_pattern";
    if let Some(flags) = meta.opt_bools(KEY)? {
        if flags.len() != layers {
            return Err(meta.error(format!(
                "gpt-oss {KEY} has {} flags for {layers} layers",
                flags.len()
            )));
        }
        return Ok(flags);
    }
    let pattern = meta.opt_usize(KEY)?.unwrap_or(WINDOW_PATTERN);
    if pattern == 0 {
        return Err(meta.error(format!("gpt-oss {KEY} is 0")));
    }
    Ok((0..layers)
        .map(|layer| layer % pattern < pattern - 1)
        .collect())
}

fn router_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.router")
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let (experts, h, width) = (
        cfg.num_experts,
        cfg.hidden_size,
        cfg.expert_intermediate_size,
    );
    let p = format!("model.layers.{i}.mlp.experts");
    // Gate and up biases interleaved, as the gate and up rows of `gate_up_proj` are.
    let gate_up = w
        .tensor(&format!("{p}.gate_up_proj_bias"), &[experts, 2 * width])?
        .reshape((experts, width, 2))?;
    let column = |k: usize| -> Result<Tensor> {
        Ok(gate_up
            .narrow(D::Minus1, k, 1)?
            .squeeze(D::Minus1)?
            .contiguous()?)
    };
    let down = w.tensor(&format!("{p}.down_proj_bias"), &[experts, h])?;
    let biases = ExpertBiases::new(&column(0)?, &column(1)?, &down)?;
    let ffn = FeedForward::Moe(MoeBlock {
        layer: i,
        router: linear(w, &router_name(i), experts, h, true)?,
        scoring: Scoring::Softmax,
        top_k: cfg.num_experts_per_token,
        norm_topk_prob: true,
        unit_weights: false,
        expert_form: ExpertForm {
            gating: cfg.expert_gating,
            biases: Some(Box::new(biases)),
        },
        shared: None,
    });
    let attention = SelfAttention::grouped(cfg, w, i)?;
    DecoderLayer::with_norms(cfg, w, i, attention, ffn)
}

/// The router and the experts' biases, resident beside it.
fn feed_forward_group(_config: &ModelConfig, tensor: &str) -> Option<BaseGroup> {
    match tensor {
        "mlp.router.weight" | "mlp.router.bias" => Some(BaseGroup::Routers),
        "mlp.experts.gate_up_proj_bias" | "mlp.experts.down_proj_bias" => Some(BaseGroup::AlwaysOn),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn checkpoints_quantized_otherwise_than_mxfp4_are_refused() {
        let config = |method: &str| {
            crate::model::config_from_hf_json(
                &format!(
                    r#"{{"model_type": "gpt_oss", "quantization_config": {{"quant_method": "{method}"}}}}"#
                ),
                std::path::Path::new("config.json"),
            )
        };
        let err = config("gptq").unwrap_err().to_string();
        assert!(err.contains("gptq") && err.contains("MXFP4"), "{err}");
        // MXFP4 gets past this check (to the next: the minimal config lacks its sizes).
        let err = config("mxfp4").unwrap_err().to_string();
        assert!(!err.contains("quantized with"), "{err}");
    }
}
