//! The architecture config, read from a checkpoint's `config.json`.
//!
//! Real checkpoints and transformers 5 spell some keys differently (`rope_theta` vs
//! `rope_parameters.rope_theta`, `num_experts` vs `num_local_experts`); both are accepted, and so
//! is a key written under two spellings with one value (transformers 5.24 writes Qwen3-MoE's
//! expert count as both `num_experts` and `num_local_experts`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The model families the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    Qwen2Moe,
    Qwen3Moe,
    Mixtral,
    /// A dense Llama: one SwiGLU feed-forward per layer, no experts.
    Llama,
    /// A dense Llama whose feed-forward neurons `odmoe convert --split-experts` partitioned into
    /// experts: Mixtral's tensor names, and the chosen experts' outputs summed with weight one,
    /// so that choosing every expert gives back the dense model.
    SplitLlama,
    /// DeepSeek-V3 and models built on it (Kimi-K2): multi-head latent attention, sigmoid
    /// group-limited routing, shared experts, and dense feed-forwards in the first layers.
    DeepseekV3,
}

impl Architecture {
    pub const SUPPORTED: &'static str =
        "qwen2_moe, qwen3_moe, mixtral, llama, odmoe_split_llama, deepseek_v3, kimi_k2";

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2_moe" => Some(Self::Qwen2Moe),
            "qwen3_moe" => Some(Self::Qwen3Moe),
            "mixtral" => Some(Self::Mixtral),
            "llama" => Some(Self::Llama),
            "odmoe_split_llama" => Some(Self::SplitLlama),
            // Kimi-K2 is the DeepSeek-V3 architecture with its own sizes and routing values.
            "deepseek_v3" | "kimi_k2" => Some(Self::DeepseekV3),
            _ => None,
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Mixtral => "mixtral",
            Self::Llama => "llama",
            Self::SplitLlama => "odmoe_split_llama",
            Self::DeepseekV3 => "deepseek_v3",
        }
    }
}

/// Everything the engine needs to know about a model's shape, normalised across spellings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Attention only looks this many positions back, when set (Mixtral).
    pub sliding_window: Option<usize>,
    pub attention_bias: bool,
    /// Qwen3-style RMSNorm on each head's query and key.
    pub qk_norm: bool,
    pub num_experts: usize,
    pub num_experts_per_token: usize,
    pub expert_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    /// Width of the dense feed-forward of models without experts (Llama).
    #[serde(default)]
    pub dense_intermediate_size: Option<usize>,
    /// Width of the always-on shared expert (Qwen2-MoE), gated by a sigmoid.
    pub shared_expert_intermediate_size: Option<usize>,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Rotary pairs are adjacent dimensions (GGUF `llama` models, whose Q/K rows llama.cpp's
    /// converter permuted) rather than the two halves of each head.
    #[serde(default)]
    pub rope_interleaved: bool,
    /// The parts only DeepSeek-V3-style models have (latent attention, YaRN, group-limited
    /// sigmoid routing, leading dense layers).
    #[serde(default)]
    pub deepseek: Option<DeepseekConfig>,
}

/// What a DeepSeek-V3-architecture model adds to [`ModelConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeepseekConfig {
    pub attention: LatentAttentionConfig,
    /// YaRN scaling of the rotary part of queries and keys, when configured.
    pub yarn: Option<YarnScaling>,
    pub routing: GroupLimitedRouting,
    /// The first this many layers have one dense feed-forward (of `dense_intermediate_size`)
    /// instead of experts (`first_k_dense_replace`).
    pub first_dense_layers: usize,
}

/// Multi-head latent attention: every head's key and value are expanded from one shared latent
/// per token, plus one shared rotary key part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatentAttentionConfig {
    /// Rank of the query's low-rank compression; `None` projects queries directly (V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key-value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without positions.
    pub qk_nope_head_dim: usize,
    /// Width of the rotary query/key part (one key part shared by all heads).
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// YaRN rotary scaling (the `rope_scaling` / `rope_parameters` of type "yarn").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// Rotations bounding the extrapolated (fast) and interpolated (slow) frequency bands.
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Scale of cos and sin; derived from `factor`, `mscale` and `mscale_all_dim` when absent.
    pub attention_factor: Option<f64>,
    /// Round the correction range outwards to whole dimensions.
    pub truncate: bool,
}

/// DeepSeek-V3 routing: sigmoid scores; experts chosen by score plus a per-expert correction
/// bias, only inside the `topk_group` best of `n_group` groups; weights are the plain scores,
/// optionally renormalised, times `routed_scaling_factor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupLimitedRouting {
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
}

impl GroupLimitedRouting {
    /// Whether the groups fit `experts` experts with `top_k` chosen per token.
    pub fn check(&self, experts: usize, top_k: usize) -> std::result::Result<(), String> {
        let Self {
            n_group,
            topk_group,
            ..
        } = *self;
        // Groups are ranked by the sum of their two best scores, so each needs two experts.
        if n_group == 0 || !experts.is_multiple_of(n_group) || experts / n_group < 2 {
            return Err(format!(
                "n_group ({n_group}) must split {experts} experts into groups of at least 2"
            ));
        }
        if topk_group == 0 || topk_group > n_group || top_k > topk_group * (experts / n_group) {
            return Err(format!(
                "topk_group ({topk_group}) must be 1..={n_group} and its groups must hold the \
                 {top_k} experts chosen per token"
            ));
        }
        Ok(())
    }
}

/// `config.json` as found in the wild: every key optional, checked in [`ModelConfig::from_raw`].
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    /// Also read as `num_local_experts` or `n_routed_experts` (see [`KEY_SPELLINGS`]).
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    shared_expert_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<TokenIds>,
    bos_token_id: Option<u32>,
    hidden_act: Option<String>,
    /// Kept as JSON to tell an explicit `null` (no query compression) from a missing key.
    #[serde(default, deserialize_with = "present")]
    q_lora_rank: Option<Value>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    routed_scaling_factor: Option<f64>,
    first_k_dense_replace: Option<usize>,
    n_shared_experts: Option<usize>,
    moe_layer_freq: Option<usize>,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    rope_interleave: Option<bool>,
}

/// Keys that checkpoints spell in several ways; the first spelling of each group is the field
/// [`RawConfig`] reads. serde's `alias` would refuse a config holding two spellings even with equal
/// values, so [`merge_spellings`] folds them into the first one before deserialising.
const KEY_SPELLINGS: &[&[&str]] = &[&["num_experts", "num_local_experts", "n_routed_experts"]];

/// Folds every group of [`KEY_SPELLINGS`] present in `object` into the group's first spelling.
/// Spellings that agree are one setting written twice; spellings that differ leave the model's
/// shape unknown, so they are refused with both keys and values named.
fn merge_spellings(object: &mut Map<String, Value>, path: &Path) -> Result<()> {
    for spellings in KEY_SPELLINGS {
        let mut kept: Option<(&str, Value)> = None;
        for &key in *spellings {
            let Some(value) = object.remove(key) else {
                continue;
            };
            match &kept {
                None => kept = Some((key, value)),
                Some((first_key, first_value)) if *first_value != value => {
                    return Err(Error::config(
                        path,
                        format!(
                            "{first_key} ({first_value}) and {key} ({value}) disagree; they are \
                             two spellings of one setting"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some((_, value)) = kept {
            object.insert(spellings[0].to_string(), value);
        }
    }
    Ok(())
}

/// `Some` for any value that is present, `null` included (serde maps `null` to `None` otherwise).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses `text`, naming `path` in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let json_error = |error| Error::Json {
            path: path.to_path_buf(),
            error,
        };
        let mut object: Map<String, Value> = serde_json::from_str(text).map_err(json_error)?;
        merge_spellings(&mut object, path)?;
        let config = Value::Object(object);
        let raw = RawConfig::deserialize(&config)
            .map_err(|error| wrong_value(&config, path).unwrap_or_else(|| json_error(error)))?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self> {
        let model_type = raw
            .model_type
            .clone()
            .ok_or_else(|| Error::config(path, "missing key \"model_type\""))?;
        let architecture = Architecture::from_model_type(&model_type).ok_or_else(|| {
            Error::UnknownArchitecture {
                model_type: model_type.clone(),
                path: path.to_path_buf(),
                supported: Architecture::SUPPORTED,
            }
        })?;
        let need = |value: Option<usize>, key: &str| {
            value.ok_or_else(|| Error::config(path, format!("missing key {key:?}")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
                ),
            ));
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(Error::config(
                path,
                format!("hidden_act {act:?} is not supported (only \"silu\")"),
            ));
        }
        let rope_theta = rope_theta(&raw, path, architecture)?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let dense = architecture == Architecture::Llama;
        let deepseek = match architecture {
            Architecture::DeepseekV3 => Some(deepseek_config(&raw, path)?),
            _ => None,
        };
        let expert_intermediate_size = match architecture {
            Architecture::Llama => 0,
            Architecture::Mixtral | Architecture::SplitLlama => {
                need(raw.intermediate_size, "intermediate_size")?
            }
            _ => need(raw.moe_intermediate_size, "moe_intermediate_size")?,
        };
        if matches!(
            architecture,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe
        ) {
            let step = raw.decoder_sparse_step.unwrap_or(1);
            let dense_layers = raw.mlp_only_layers.clone().unwrap_or_default();
            if step != 1 || !dense_layers.is_empty() {
                return Err(Error::config(
                    path,
                    "dense MLP layers (decoder_sparse_step != 1 or mlp_only_layers) are not supported",
                ));
            }
        }
        let sliding_window = match architecture {
            Architecture::Mixtral | Architecture::Llama | Architecture::SplitLlama => {
                raw.sliding_window
            }
            _ if raw.use_sliding_window == Some(true) => {
                return Err(Error::config(
                    path,
                    "use_sliding_window = true is not supported for this architecture",
                ));
            }
            _ => None,
        };
        let config = ModelConfig {
            architecture,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: match &deepseek {
                Some(d) => d.attention.qk_nope_head_dim + d.attention.qk_rope_head_dim,
                None => raw.head_dim.unwrap_or(hidden_size / num_heads),
            },
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32768),
            sliding_window,
            attention_bias: match architecture {
                Architecture::Qwen2Moe => raw.qkv_bias.unwrap_or(true),
                _ => raw.attention_bias.unwrap_or(false),
            },
            qk_norm: architecture == Architecture::Qwen3Moe,
            num_experts: if dense {
                0
            } else {
                need(raw.num_experts, "num_experts (or num_local_experts)")?
            },
            num_experts_per_token: if dense {
                0
            } else {
                need(raw.num_experts_per_tok, "num_experts_per_tok")?
            },
            expert_intermediate_size,
            dense_intermediate_size: if dense
                || deepseek.as_ref().is_some_and(|d| d.first_dense_layers > 0)
            {
                Some(need(raw.intermediate_size, "intermediate_size")?)
            } else {
                None
            },
            norm_topk_prob: match architecture {
                Architecture::Mixtral | Architecture::Llama | Architecture::SplitLlama => true,
                Architecture::Qwen2Moe => raw.norm_topk_prob.unwrap_or(false),
                Architecture::Qwen3Moe | Architecture::DeepseekV3 => {
                    raw.norm_topk_prob.unwrap_or(true)
                }
            },
            shared_expert_intermediate_size: match architecture {
                Architecture::Qwen2Moe => Some(need(
                    raw.shared_expert_intermediate_size,
                    "shared_expert_intermediate_size",
                )?),
                // DeepSeek's shared experts run as one feed-forward of their summed width.
                Architecture::DeepseekV3 => match raw.n_shared_experts.unwrap_or(1) {
                    0 => None,
                    n => Some(n * expert_intermediate_size),
                },
                _ => None,
            },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
            bos_token_id: raw.bos_token_id,
            // DeepSeek checkpoints pair adjacent rotary dimensions unless `rope_interleave` is
            // false (transformers' default is true).
            rope_interleaved: deepseek.is_some() && raw.rope_interleave.unwrap_or(true),
            deepseek,
        };
        if !dense
            && (config.num_experts_per_token == 0
                || config.num_experts_per_token > config.num_experts)
        {
            return Err(Error::config(
                path,
                format!(
                    "num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                    config.num_experts_per_token, config.num_experts
                ),
            ));
        }
        Ok(config)
    }

    /// Whether `layer` has routed experts (DeepSeek's first layers are dense).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.num_experts > 0
            && layer < self.num_layers
            && self
                .deepseek
                .as_ref()
                .is_none_or(|d| layer >= d.first_dense_layers)
    }

    /// The layers with routed experts, in order.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_layers).filter(|&l| self.is_moe_layer(l))
    }

    /// Bytes the KV cache holds per token with elements of `elem_bytes` bytes: keys and values of
    /// every KV head, or with latent attention the compressed latent and the shared rotary key.
    pub fn kv_cache_bytes_per_token(&self, elem_bytes: usize) -> usize {
        let per_layer = match &self.deepseek {
            Some(d) => d.attention.kv_lora_rank + d.attention.qk_rope_head_dim,
            None => 2 * self.num_kv_heads * self.head_dim,
        };
        self.num_layers * per_layer * elem_bytes
    }

    /// Bytes of one routed expert's weights in f32 (gate, up and down projections).
    pub fn expert_f32_bytes(&self) -> usize {
        3 * self.hidden_size * self.expert_intermediate_size * 4
    }
}

/// The first key of the `config` object whose value [`RawConfig`] cannot take, as an error naming
/// it: deserialising an already parsed object, serde's own message has no line to point at.
fn wrong_value(config: &Value, path: &Path) -> Option<Error> {
    config.as_object()?.iter().find_map(|(key, value)| {
        let alone = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        RawConfig::deserialize(&alone)
            .err()
            .map(|error| Error::config(path, format!("{key}: {error}")))
    })
}

/// The rotary scaling parameters, from `rope_parameters` (transformers 5) or `rope_scaling`.
fn rope_scaling(raw: &RawConfig) -> Option<&Map<String, Value>> {
    raw.rope_parameters
        .as_ref()
        .or(raw.rope_scaling.as_ref())
        .and_then(|v| v.as_object())
}

/// The rotary scaling type ("default" when unscaled).
fn rope_type(raw: &RawConfig) -> &str {
    rope_scaling(raw)
        .and_then(|map| map.get("rope_type").or_else(|| map.get("type")))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
}

/// The RoPE base frequency. Plain RoPE everywhere; YaRN too for DeepSeek-V3 models.
fn rope_theta(raw: &RawConfig, path: &Path, architecture: Architecture) -> Result<f64> {
    let kind = rope_type(raw);
    let yarn_allowed = architecture == Architecture::DeepseekV3 && kind == "yarn";
    if kind != "default" && !yarn_allowed {
        return Err(Error::config(
            path,
            format!("rope scaling type {kind:?} is not supported for this architecture"),
        ));
    }
    let nested = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64());
    raw.rope_theta.or(nested).ok_or_else(|| {
        Error::config(
            path,
            "missing key \"rope_theta\" (or rope_parameters.rope_theta)",
        )
    })
}

/// The DeepSeek-V3 parts of a config, checked. Keys transformers would silently default are
/// required, so that a config missing them fails here rather than computing something else.
fn deepseek_config(raw: &RawConfig, path: &Path) -> Result<DeepseekConfig> {
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
    let routing = GroupLimitedRouting {
        n_group: need(raw.n_group, "n_group")?,
        topk_group: need(raw.topk_group, "topk_group")?,
        routed_scaling_factor: raw
            .routed_scaling_factor
            .ok_or_else(|| Error::config(path, "missing key \"routed_scaling_factor\""))?,
    };
    let experts = need(raw.num_experts, "n_routed_experts")?;
    let top_k = need(raw.num_experts_per_tok, "num_experts_per_tok")?;
    routing
        .check(experts, top_k)
        .map_err(|message| Error::config(path, message))?;
    if let Some(scoring) = raw.scoring_func.as_deref()
        && scoring != "sigmoid"
    {
        return Err(Error::config(
            path,
            format!("scoring_func {scoring:?} is not supported (only \"sigmoid\")"),
        ));
    }
    if let Some(method) = raw.topk_method.as_deref()
        && method != "noaux_tc"
    {
        return Err(Error::config(
            path,
            format!("topk_method {method:?} is not supported (only \"noaux_tc\")"),
        ));
    }
    if raw.moe_layer_freq.is_some_and(|f| f != 1) {
        return Err(Error::config(
            path,
            "moe_layer_freq other than 1 is not supported",
        ));
    }
    let yarn = match rope_type(raw) {
        "yarn" => Some(yarn_scaling(raw, path)?),
        _ => None,
    };
    Ok(DeepseekConfig {
        attention,
        yarn,
        routing,
        first_dense_layers: need(raw.first_k_dense_replace, "first_k_dense_replace")?,
    })
}

/// YaRN parameters with transformers' defaults: `beta_fast` 32, `beta_slow` 1 (also for 0),
/// `original_max_position_embeddings` = `max_position_embeddings`, `truncate` true.
fn yarn_scaling(raw: &RawConfig, path: &Path) -> Result<YarnScaling> {
    let map = rope_scaling(raw).expect("a yarn rope type comes from a map");
    let number = |key: &str| map.get(key).and_then(|v| v.as_f64());
    let original = map
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or(raw.max_position_embeddings)
        .ok_or_else(|| Error::config(path, "yarn needs original_max_position_embeddings"))?;
    let factor = match number("factor") {
        Some(f) => f,
        None => match raw.max_position_embeddings {
            Some(max) => max as f64 / original as f64,
            None => return Err(Error::config(path, "yarn needs a factor")),
        },
    };
    let nonzero = |v: Option<f64>| v.filter(|&v| v != 0.0);
    Ok(YarnScaling {
        factor,
        original_max_position_embeddings: original,
        beta_fast: nonzero(number("beta_fast")).unwrap_or(32.0),
        beta_slow: nonzero(number("beta_slow")).unwrap_or(1.0),
        mscale: number("mscale"),
        mscale_all_dim: number("mscale_all_dim"),
        attention_factor: number("attention_factor"),
        truncate: map
            .get("truncate")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3_HUB: &str = r#"{"model_type":"qwen3_moe","vocab_size":512,"hidden_size":64,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,
        "rope_theta":1000000.0,"rope_scaling":null,"num_experts":8,"num_experts_per_tok":2,
        "moe_intermediate_size":32,"eos_token_id":[2,3]}"#;

    #[test]
    fn hub_and_transformers5_spellings_agree() {
        let hub = ModelConfig::from_json(QWEN3_HUB, Path::new("c.json")).unwrap();
        let t5 = QWEN3_HUB
            .replace(
                "\"rope_theta\":1000000.0,\"rope_scaling\":null",
                "\"rope_parameters\":{\"rope_theta\":1000000.0,\"rope_type\":\"default\"}",
            )
            .replace("num_experts\"", "num_local_experts\"");
        let t5 = ModelConfig::from_json(&t5, Path::new("c.json")).unwrap();
        assert_eq!(hub, t5);
        assert_eq!(hub.rope_theta, 1e6);
        assert_eq!(hub.num_experts, 8);
        assert_eq!(hub.eos_token_ids, vec![2, 3]);
        assert!(hub.norm_topk_prob && hub.qk_norm);
    }

    #[test]
    fn a_key_under_two_spellings_with_one_value_is_one_setting() {
        let both = QWEN3_HUB.replace(
            "\"num_experts\":8,",
            "\"num_experts\":8,\"num_local_experts\":8,",
        );
        let all_three = both.replace(
            "\"num_local_experts\":8,",
            "\"num_local_experts\":8,\"n_routed_experts\":8,",
        );
        let hub = ModelConfig::from_json(QWEN3_HUB, Path::new("c.json")).unwrap();
        for text in [both, all_three] {
            let config = ModelConfig::from_json(&text, Path::new("c.json")).unwrap();
            assert_eq!(config.num_experts, 8);
            assert_eq!(config, hub);
        }
    }

    #[test]
    fn spellings_that_disagree_are_refused_with_both_named() {
        let text = QWEN3_HUB.replace(
            "\"num_experts\":8,",
            "\"num_experts\":8,\"num_local_experts\":16,",
        );
        let err = ModelConfig::from_json(&text, Path::new("/m/config.json")).unwrap_err();
        let message = err.to_string();
        for part in [
            "/m/config.json",
            "num_experts (8)",
            "num_local_experts (16)",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
    }

    /// Qwen3-30B-A3B's config.json as transformers 5.24 saves it: `num_experts` and
    /// `num_local_experts` both written, `rope_parameters` instead of `rope_theta`.
    const QWEN3_TRANSFORMERS_5_24: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "dtype": "bfloat16",
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": true,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "num_local_experts": 128,
  "output_router_logits": false,
  "pad_token_id": null,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
  "router_aux_loss_coef": 0.001,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.24.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

    #[test]
    fn a_transformers_5_24_qwen3_moe_config_loads_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, QWEN3_TRANSFORMERS_5_24).unwrap();
        let config = ModelConfig::from_file(&path).unwrap();
        assert_eq!(config.architecture, Architecture::Qwen3Moe);
        assert_eq!((config.num_experts, config.num_experts_per_token), (128, 8));
        assert_eq!(
            (config.num_layers, config.expert_intermediate_size),
            (48, 768)
        );
        assert_eq!(config.rope_theta, 1e6);
        assert_eq!(config.eos_token_ids, vec![151645]);
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key() {
        let text = QWEN3_HUB.replace("\"hidden_size\":64", "\"hidden_size\":\"64\"");
        let err = ModelConfig::from_json(&text, Path::new("c.json")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("hidden_size") && message.contains("c.json"),
            "{message}"
        );
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = QWEN3_HUB.replace("qwen3_moe", "llama4_moe");
        let err = ModelConfig::from_json(&text, Path::new("/m/config.json")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("llama4_moe") && message.contains("/m/config.json"),
            "{message}"
        );
    }

    #[test]
    fn scaled_rope_is_refused() {
        let text = QWEN3_HUB.replace(
            "\"rope_scaling\":null",
            "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0}",
        );
        let err = ModelConfig::from_json(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    /// The public config.json of DeepSeek-V3 and Kimi-K2 (also read by `odmoe inspect` tests).
    const DEEPSEEK_V3: &str = include_str!("../../../tests/fixtures/configs/deepseek_v3.json");
    const KIMI_K2: &str = include_str!("../../../tests/fixtures/configs/kimi_k2.json");

    #[test]
    fn real_deepseek_configs_parse() {
        let v3 = ModelConfig::from_json(DEEPSEEK_V3, Path::new("v3.json")).unwrap();
        let kimi = ModelConfig::from_json(KIMI_K2, Path::new("k2.json")).unwrap();
        for (config, experts, dense, groups, kept, heads) in
            [(&v3, 256, 3, 8, 4, 128), (&kimi, 384, 1, 1, 1, 64)]
        {
            let ds = config.deepseek.as_ref().unwrap();
            assert_eq!(config.architecture, Architecture::DeepseekV3);
            assert_eq!((config.num_layers, config.num_experts), (61, experts));
            assert_eq!((config.num_heads, config.num_experts_per_token), (heads, 8));
            assert_eq!(config.expert_intermediate_size, 2048);
            assert_eq!(config.shared_expert_intermediate_size, Some(2048));
            assert_eq!(config.dense_intermediate_size, Some(18432));
            assert_eq!(ds.first_dense_layers, dense);
            assert_eq!(config.moe_layers().count(), 61 - dense);
            assert!(!config.is_moe_layer(dense - 1) && config.is_moe_layer(dense));
            assert_eq!((ds.routing.n_group, ds.routing.topk_group), (groups, kept));
            assert_eq!(ds.attention.q_lora_rank, Some(1536));
            assert_eq!(
                (ds.attention.kv_lora_rank, ds.attention.qk_rope_head_dim),
                (512, 64)
            );
            assert!(config.rope_interleaved && config.norm_topk_prob);
        }
        let yarn = |c: &ModelConfig| c.deepseek.as_ref().unwrap().yarn.clone().unwrap();
        assert_eq!(
            (yarn(&v3).factor, yarn(&v3).beta_fast, yarn(&v3).beta_slow),
            (40.0, 32.0, 1.0)
        );
        assert_eq!(
            (
                yarn(&kimi).factor,
                yarn(&kimi).beta_fast,
                yarn(&kimi).beta_slow
            ),
            (32.0, 1.0, 1.0)
        );
        assert_eq!(kimi.rope_theta, 50000.0);
        assert_eq!(
            kimi.deepseek
                .as_ref()
                .unwrap()
                .routing
                .routed_scaling_factor,
            2.827
        );
    }

    #[test]
    fn latent_kv_cache_bytes_per_token() {
        // 61 layers x (kv_lora_rank 512 + qk_rope_head_dim 64) x 2 bytes in f16.
        for text in [DEEPSEEK_V3, KIMI_K2] {
            let config = ModelConfig::from_json(text, Path::new("c.json")).unwrap();
            assert_eq!(config.kv_cache_bytes_per_token(2), 70_272);
            assert_eq!(config.kv_cache_bytes_per_token(4), 140_544);
        }
        // Grouped-query attention caches keys and values of every KV head.
        let qwen = ModelConfig::from_json(QWEN3_HUB, Path::new("c.json")).unwrap();
        assert_eq!(qwen.kv_cache_bytes_per_token(4), 2 * 2 * 2 * 32 * 4);
    }

    #[test]
    fn deepseek_query_rank_must_be_explicit() {
        let direct = KIMI_K2.replace("\"q_lora_rank\": 1536", "\"q_lora_rank\": null");
        let config = ModelConfig::from_json(&direct, Path::new("c.json")).unwrap();
        assert_eq!(config.deepseek.unwrap().attention.q_lora_rank, None);
        let missing = KIMI_K2.replace("\"q_lora_rank\": 1536,", "");
        let err = ModelConfig::from_json(&missing, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("q_lora_rank"), "{err}");
    }

    #[test]
    fn unsupported_deepseek_routing_is_refused() {
        for (from, to, named) in [
            (
                "\"scoring_func\": \"sigmoid\"",
                "\"scoring_func\": \"softmax\"",
                "softmax",
            ),
            (
                "\"topk_method\": \"noaux_tc\"",
                "\"topk_method\": \"greedy\"",
                "greedy",
            ),
            ("\"n_group\": 8", "\"n_group\": 3", "n_group"),
            ("\"topk_group\": 4", "\"topk_group\": 9", "topk_group"),
        ] {
            let text = DEEPSEEK_V3.replace(from, to);
            assert_ne!(text, DEEPSEEK_V3, "{from}");
            let err = ModelConfig::from_json(&text, Path::new("c.json")).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn missing_key_is_named() {
        let text = QWEN3_HUB.replace("\"hidden_size\":64,", "");
        let err = ModelConfig::from_json(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }
}
