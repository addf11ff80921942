//! The architecture config, read from a checkpoint's `config.json`.
//!
//! Real checkpoints and transformers 5 spell some keys differently (`rope_theta` vs
//! `rope_parameters.rope_theta`, `num_experts` vs `num_local_experts`); both are accepted.

use std::path::Path;

use serde::{Deserialize, Serialize};

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
}

impl Architecture {
    pub const SUPPORTED: &'static str = "qwen2_moe, qwen3_moe, mixtral, llama, odmoe_split_llama";

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2_moe" => Some(Self::Qwen2Moe),
            "qwen3_moe" => Some(Self::Qwen3Moe),
            "mixtral" => Some(Self::Mixtral),
            "llama" => Some(Self::Llama),
            "odmoe_split_llama" => Some(Self::SplitLlama),
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
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    #[serde(alias = "num_local_experts")]
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
        let raw: RawConfig = serde_json::from_str(text).map_err(|error| Error::Json {
            path: path.to_path_buf(),
            error,
        })?;
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
        let rope_theta = rope_theta(&raw, path)?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let dense = architecture == Architecture::Llama;
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
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_heads),
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
            dense_intermediate_size: if dense {
                Some(need(raw.intermediate_size, "intermediate_size")?)
            } else {
                None
            },
            norm_topk_prob: match architecture {
                Architecture::Mixtral | Architecture::Llama | Architecture::SplitLlama => true,
                Architecture::Qwen2Moe => raw.norm_topk_prob.unwrap_or(false),
                Architecture::Qwen3Moe => raw.norm_topk_prob.unwrap_or(true),
            },
            shared_expert_intermediate_size: match architecture {
                Architecture::Qwen2Moe => Some(need(
                    raw.shared_expert_intermediate_size,
                    "shared_expert_intermediate_size",
                )?),
                _ => None,
            },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
            bos_token_id: raw.bos_token_id,
            rope_interleaved: false,
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

    /// Bytes of one routed expert's weights in f32 (gate, up and down projections).
    pub fn expert_f32_bytes(&self) -> usize {
        3 * self.hidden_size * self.expert_intermediate_size * 4
    }
}

/// The RoPE base frequency; only plain (unscaled) RoPE is implemented for these architectures.
fn rope_theta(raw: &RawConfig, path: &Path) -> Result<f64> {
    let scaling = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    if let Some(serde_json::Value::Object(map)) = scaling {
        let kind = map
            .get("rope_type")
            .or_else(|| map.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if kind != "default" {
            return Err(Error::config(
                path,
                format!("rope scaling type {kind:?} is not supported for this architecture"),
            ));
        }
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

    #[test]
    fn missing_key_is_named() {
        let text = QWEN3_HUB.replace("\"hidden_size\":64,", "");
        let err = ModelConfig::from_json(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }
}
