//! DeepSeek-V3 and Kimi-K2 (the same architecture with other sizes and routing values).
//!
//! - Multi-head latent attention ([`LatentAttention`]) with its rotary part in DeepSeek's
//!   interleaved pair layout unless `rope_interleave` is false, YaRN when configured.
//! - Routing: sigmoid scores, a per-expert bias that only chooses, group-limited top-k,
//!   renormalised weights times `routed_scaling_factor` (see [`Scoring::GroupLimitedSigmoid`]).
//!   Shared experts are resident; the first `first_k_dense_replace` layers are dense.
//! - Experts are named as Qwen names them; GGUF files are llama.cpp's `deepseek2`.

use std::path::Path;

use serde_json::Value;

use super::gguf_config::GgufConfig;
use super::hf_config::{HfConfig, RopeScalings};
use super::latent_attention::LatentAttention;
use super::layers::{glu_mlp, linear};
use super::moe::{MoeBlock, Scoring, SharedExpert};
use super::{
    BaseGroup, DecoderLayer, Family, FeedForward, GgufMatch, SelfAttention, llama, qwen_moe,
};
use crate::config::{
    Architecture, DeepseekConfig, GroupLimitedRouting, LatentAttentionConfig, ModelConfig,
    YarnScaling,
};
use crate::error::{Error, Result};
use crate::expert::ExpertForm;
use crate::format::WeightSource;

pub const DEEPSEEK_V3: Family = Family {
    architecture: Architecture::DeepseekV3,
    // Kimi-K2 is the DeepSeek-V3 architecture with its own sizes and routing values.
    model_types: &["deepseek_v3", "kimi_k2"],
    gguf: Some(GgufMatch {
        architecture: "deepseek2",
        with_experts: None,
    }),
    from_hf,
    from_gguf,
    load_layer,
    expert_names: Some(qwen_moe::expert_tensor_names),
    router: qwen_moe::router_name,
    feed_forward_group,
};

fn from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    let mut config = hf.common(Architecture::DeepseekV3, RopeScalings::PlainOrYarn)?;
    hf.refuse_sliding_window()?;
    let attention = latent_attention_config(hf, &hf.path)?;
    config.head_dim = attention.qk_nope_head_dim + attention.qk_rope_head_dim;
    let mut deepseek = set_routed_experts(hf, &mut config)?;
    deepseek.attention = Some(attention);
    deepseek.yarn = hf.yarn()?;
    // DeepSeek checkpoints pair adjacent rotary dimensions unless `rope_interleave` is false
    // (transformers' default is true).
    config.rope_interleaved = hf.rope_interleave.unwrap_or(true);
    config.deepseek = Some(deepseek);
    Ok(config)
}

/// Sets `config`'s routed, shared and dense feed-forwards as DeepSeek-V3 (and GLM-4.5) configs
/// state them, and returns the routing (without attention or YaRN). Keys transformers would
/// silently default are required, so that a config missing them fails here rather than
/// computing something else.
pub(super) fn set_routed_experts(
    hf: &HfConfig,
    config: &mut ModelConfig,
) -> Result<DeepseekConfig> {
    let path = &hf.path;
    let need = |value: Option<usize>, key: &str| {
        value.ok_or_else(|| Error::config(path, format!("missing key {key:?}")))
    };
    let routing = GroupLimitedRouting {
        n_group: need(hf.n_group, "n_group")?,
        topk_group: need(hf.topk_group, "topk_group")?,
        routed_scaling_factor: hf
            .routed_scaling_factor
            .ok_or_else(|| Error::config(path, "missing key \"routed_scaling_factor\""))?,
    };
    let experts = need(hf.num_experts, "n_routed_experts")?;
    let top_k = need(hf.num_experts_per_tok, "num_experts_per_tok")?;
    routing
        .check(experts, top_k)
        .map_err(|message| Error::config(path, message))?;
    if let Some(scoring) = hf.scoring_func.as_deref()
        && scoring != "sigmoid"
    {
        return Err(Error::config(
            path,
            format!("scoring_func {scoring:?} is not supported (only \"sigmoid\")"),
        ));
    }
    if let Some(method) = hf.topk_method.as_deref()
        && method != "noaux_tc"
    {
        return Err(Error::config(
            path,
            format!("topk_method {method:?} is not supported (only \"noaux_tc\")"),
        ));
    }
    if hf.moe_layer_freq.is_some_and(|f| f != 1) {
        return Err(Error::config(
            path,
            "moe_layer_freq other than 1 is not supported",
        ));
    }
    hf.set_experts(config, hf.moe_intermediate_size, "moe_intermediate_size")?;
    let first_dense_layers = need(hf.first_k_dense_replace, "first_k_dense_replace")?;
    if first_dense_layers > 0 {
        config.dense_intermediate_size = Some(hf.need(hf.intermediate_size, "intermediate_size")?);
    }
    config.norm_topk_prob = hf.norm_topk_prob.unwrap_or(true);
    config.draft_layers = hf.num_nextn_predict_layers.unwrap_or(0);
    // The shared experts run as one feed-forward of their summed width.
    config.shared_expert_intermediate_size = match hf.n_shared_experts.unwrap_or(1) {
        0 => None,
        n => Some(n * config.expert_intermediate_size),
    };
    Ok(DeepseekConfig {
        attention: None,
        yarn: None,
        routing,
        first_dense_layers,
    })
}

/// DeepSeek-V3's latent attention sizes, checked.
fn latent_attention_config(raw: &HfConfig, path: &Path) -> Result<LatentAttentionConfig> {
    let need = |value: Option<usize>, key: &str| {
        value.ok_or_else(|| Error::config(path, format!("missing key {key:?}")))
    };
    let q_lora_rank = match &raw.q_lora_rank {
        None => {
            return Err(Error::config(
                path,
                "missing key \"q_lora_rank\" (null for none)",
            ));
        }
        Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .ok_or_else(|| Error::config(path, format!("q_lora_rank {value} is not a size")))?
                as usize,
        ),
    };
    let attention = LatentAttentionConfig {
        q_lora_rank,
        kv_lora_rank: need(raw.kv_lora_rank, "kv_lora_rank")?,
        qk_nope_head_dim: need(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
        qk_rope_head_dim: need(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
        v_head_dim: need(raw.v_head_dim, "v_head_dim")?,
    };
    if !attention.qk_rope_head_dim.is_multiple_of(2) {
        return Err(Error::config(
            path,
            format!(
                "qk_rope_head_dim ({}) must be even",
                attention.qk_rope_head_dim
            ),
        ));
    }
    Ok(attention)
}

/// A DeepSeek-V3 / Kimi-K2 config from llama.cpp's `deepseek2` metadata.
///
/// llama.cpp stores latent attention as MQA with one KV head whose key is the latent plus the
/// rotary part (`attention.key_length` = `kv_lora_rank + qk_rope_head_dim`); the per-head widths
/// are `attention.key_length_mla` / `value_length_mla` (older files: `key_length` /
/// `value_length` themselves). Routing must be sigmoid (`expert_gating_func` 2) with the
/// `exp_probs_b` bias: a file without `expert_gating_func` is DeepSeek-V2's softmax routing,
/// which llama.cpp assumes for it and this engine does not run.
fn from_gguf(meta: &GgufConfig) -> Result<ModelConfig> {
    let rope_dim = meta.usize("rope.dimension_count")?;
    let key_width = match meta.opt_usize("attention.key_length_mla")? {
        Some(w) => w,
        None => meta.usize("attention.key_length")?,
    };
    let v_head_dim = match meta.opt_usize("attention.value_length_mla")? {
        Some(w) => w,
        None => meta.usize("attention.value_length")?,
    };
    if key_width <= rope_dim || rope_dim % 2 != 0 {
        return Err(meta.error(format!(
            "deepseek2 key width {key_width} must exceed the even rotary width {rope_dim}"
        )));
    }
    let attention = LatentAttentionConfig {
        q_lora_rank: meta.opt_usize("attention.q_lora_rank")?,
        kv_lora_rank: meta.usize("attention.kv_lora_rank")?,
        qk_nope_head_dim: key_width - rope_dim,
        qk_rope_head_dim: rope_dim,
        v_head_dim,
    };
    let mut config = meta.common(Architecture::DeepseekV3)?;
    let mut deepseek = gguf_routed_experts(meta, &mut config, None)?;
    deepseek.yarn = match meta.yarn()? {
        Some(yarn) => Some(gguf_yarn(meta, yarn)?),
        None => None,
    };
    deepseek.attention = Some(attention);
    // `head_count_kv` is 1 (the latent, shared by all heads); expanded, every head has its own
    // key and value, as `num_key_value_heads` says in config.json.
    config.num_kv_heads = config.num_heads;
    config.head_dim = key_width;
    config.attention_bias = meta.gguf.has_tensor("blk.0.attn_kv_a_mqa.bias");
    // llama.cpp ropes deepseek2 in adjacent pairs on unpermuted rows, as DeepSeek does.
    config.rope_interleaved = true;
    config.deepseek = Some(deepseek);
    Ok(config)
}

/// Sets `config`'s routed, shared and dense feed-forwards from llama.cpp's metadata for
/// DeepSeek-V3's routing (`deepseek2`, `glm4moe`), and returns the routing. Routing must be
/// sigmoid (`expert_gating_func` 2) with the `exp_probs_b` bias. Without the key llama.cpp
/// routes by `gating_unstated`: a `deepseek2` file so is DeepSeek-V2's softmax routing, which
/// this engine does not run; a `glm4moe` file routes with sigmoid.
pub(super) fn gguf_routed_experts(
    meta: &GgufConfig,
    config: &mut ModelConfig,
    gating_unstated: Option<usize>,
) -> Result<DeepseekConfig> {
    const SIGMOID: usize = 2;
    let arch = meta.architecture();
    // 0 is llama.cpp's "none": as if the key were absent.
    let stated = meta.opt_usize("expert_gating_func")?.filter(|&g| g != 0);
    match stated.or(gating_unstated) {
        Some(SIGMOID) => {}
        other => {
            return Err(meta.error(format!(
                "{arch} expert_gating_func {other:?}: only sigmoid routing (2, DeepSeek-V3, \
                 Kimi-K2, GLM-4.5) is supported; without the key llama.cpp routes deepseek2 \
                 files with softmax (DeepSeek-V2)"
            )));
        }
    }
    meta.set_experts(config, "expert_feed_forward_length")?;
    let routing = GroupLimitedRouting {
        n_group: meta.opt_usize("expert_group_count")?.unwrap_or(1),
        topk_group: meta.opt_usize("expert_group_used_count")?.unwrap_or(1),
        // llama.cpp skips the scaling when the key is absent.
        routed_scaling_factor: meta.opt_f64("expert_weights_scale")?.unwrap_or(1.0),
    };
    routing
        .check(config.num_experts, config.num_experts_per_token)
        .map_err(|m| meta.error(format!("{arch}: {m}")))?;
    if config.num_experts_per_token == 0 {
        return Err(meta.error(format!("{arch} expert_used_count is 0")));
    }
    let first_dense_layers = meta.opt_usize("leading_dense_block_count")?.unwrap_or(0);
    if first_dense_layers > 0 {
        config.dense_intermediate_size = Some(meta.usize("feed_forward_length")?);
    }
    config.norm_topk_prob = meta.bool("expert_weights_norm").unwrap_or(false);
    // The shared experts run as one feed-forward of their summed width.
    let shared = meta.usize("expert_shared_count")?;
    config.shared_expert_intermediate_size =
        (shared > 0).then_some(shared * config.expert_intermediate_size);
    Ok(DeepseekConfig {
        attention: None,
        yarn: None,
        routing,
        first_dense_layers,
    })
}

/// YaRN from `rope.scaling.*`. The converter writes `yarn_log_multiplier` = 0.1 *
/// `mscale_all_dim` and drops `mscale`; llama.cpp then scales cos and sin by 1, which is
/// transformers' answer when `mscale` equals `mscale_all_dim` (true of every DeepSeek-V3 and
/// Kimi-K2 config), so `mscale` is taken to be `mscale_all_dim`.
///
/// `yarn_beta_fast` / `yarn_beta_slow` are taken from the file when present, else 32 / 1.
/// llama.cpp ignores the keys for deepseek2 and always uses 32 / 1 unless told otherwise at run
/// time; the converter writes the checkpoint's own values, which are what the model was trained
/// with (Kimi-K2: 1 / 1), so this reader follows the checkpoint, as transformers does. 32 / 1 are
/// both llama.cpp's and transformers' defaults.
///
/// From the file's plain `yarn` (see `GgufConfig::yarn`): its attention factors checked, its
/// mscale from `yarn_log_multiplier`, the correction range truncated.
fn gguf_yarn(meta: &GgufConfig, yarn: YarnScaling) -> Result<YarnScaling> {
    let optional = |k: &str| meta.opt_f64(&format!("rope.scaling.{k}"));
    if let Some(factor) = optional("yarn_attn_factor")?.filter(|&f| f != 1.0) {
        return Err(meta.error(format!(
            "deepseek2 rope.scaling.yarn_attn_factor {factor} is not supported (only 1)"
        )));
    }
    if let Some(ext) = optional("yarn_ext_factor")?.filter(|&f| f != 1.0) {
        return Err(meta.error(format!(
            "deepseek2 rope.scaling.yarn_ext_factor {ext} is not supported (only 1)"
        )));
    }
    let mscale_all_dim = optional("yarn_log_multiplier")?.map(|m| m / 0.1);
    Ok(YarnScaling {
        mscale: mscale_all_dim,
        mscale_all_dim,
        truncate: true,
        ..yarn
    })
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let attention = SelfAttention::Latent(LatentAttention::load(
        cfg,
        w,
        &format!("model.layers.{i}.self_attn"),
    )?);
    DecoderLayer::with_norms(cfg, w, i, attention, feed_forward(cfg, w, i)?)
}

/// Layer `i`'s feed-forward with DeepSeek-V3's routing: routed experts with resident shared
/// ones, or in the first layers one dense SwiGLU.
pub(super) fn feed_forward(
    cfg: &ModelConfig,
    w: &dyn WeightSource,
    i: usize,
) -> Result<FeedForward> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    if !cfg.is_moe_layer(i) {
        let width = cfg.dense_intermediate_size.ok_or_else(|| {
            Error::InvalidModel("dense DeepSeek layers need intermediate_size".into())
        })?;
        return Ok(FeedForward::Dense(glu_mlp(
            w,
            llama::dense_mlp_names(i).each_ref().map(String::as_str),
            h,
            width,
        )?));
    }
    let routing = &cfg
        .deepseek
        .as_ref()
        .ok_or_else(|| Error::InvalidModel("DeepSeek-V3 routing needs its config".into()))?
        .routing;
    let shared = match cfg.shared_expert_intermediate_size {
        Some(width) => Some(SharedExpert {
            mlp: glu_mlp(
                w,
                ["gate_proj", "up_proj", "down_proj"]
                    .map(|n| format!("{p}.mlp.shared_experts.{n}"))
                    .each_ref()
                    .map(String::as_str),
                h,
                width,
            )?,
            gate: None,
        }),
        None => None,
    };
    let bias = w
        .tensor(
            &format!("{p}.mlp.gate.e_score_correction_bias"),
            &[cfg.num_experts],
        )?
        .to_vec1::<f32>()?;
    Ok(FeedForward::Moe(MoeBlock {
        layer: i,
        router: linear(w, &format!("{p}.mlp.gate"), cfg.num_experts, h, false)?,
        scoring: Scoring::GroupLimitedSigmoid {
            bias,
            n_group: routing.n_group,
            topk_group: routing.topk_group,
            scale: routing.routed_scaling_factor as f32,
        },
        top_k: cfg.num_experts_per_token,
        norm_topk_prob: cfg.norm_topk_prob,
        unit_weights: false,
        expert_form: ExpertForm::default(),
        shared,
    }))
}

/// Routers, shared experts, and the dense feed-forwards of the first layers (these always run).
pub(super) fn feed_forward_group(_config: &ModelConfig, tensor: &str) -> Option<BaseGroup> {
    if tensor.starts_with("mlp.gate.") {
        Some(BaseGroup::Routers)
    } else if tensor.starts_with("mlp.shared_experts.")
        || ["mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj."]
            .iter()
            .any(|p| tensor.starts_with(p))
    {
        Some(BaseGroup::AlwaysOn)
    } else {
        None
    }
}
