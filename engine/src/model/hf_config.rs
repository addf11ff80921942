//! `config.json` as Hugging Face checkpoints write it: every key optional, some spelled several
//! ways. Real checkpoints and transformers 5 spell some keys differently (`rope_theta` vs
//! `rope_parameters.rope_theta`, `num_experts` vs `num_local_experts`); both are accepted, and so
//! is a key written under two spellings with one value (transformers 5.24 writes Qwen3-MoE's
//! expert count as both `num_experts` and `num_local_experts`).
//!
//! The parts every architecture reads alike are here ([`HfConfig::common`]); each architecture's
//! own keys and defaults are read in its model file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{Architecture, ModelConfig, YarnScaling};
use crate::error::{Error, Result};

/// `config.json` as found in the wild: every key optional, read by each architecture with the shared parts below.
#[derive(Deserialize)]
pub struct HfConfig {
    /// The file read, named in errors.
    #[serde(skip)]
    pub(crate) path: PathBuf,
    pub(crate) model_type: Option<String>,
    pub(crate) vocab_size: Option<usize>,
    pub(crate) hidden_size: Option<usize>,
    pub(crate) num_hidden_layers: Option<usize>,
    pub(crate) num_attention_heads: Option<usize>,
    pub(crate) num_key_value_heads: Option<usize>,
    pub(crate) head_dim: Option<usize>,
    pub(crate) rms_norm_eps: Option<f64>,
    pub(crate) rope_theta: Option<f64>,
    pub(crate) rope_scaling: Option<Value>,
    pub(crate) rope_parameters: Option<Value>,
    pub(crate) max_position_embeddings: Option<usize>,
    pub(crate) sliding_window: Option<usize>,
    pub(crate) use_sliding_window: Option<bool>,
    pub(crate) attention_bias: Option<bool>,
    pub(crate) qkv_bias: Option<bool>,
    /// Also read as `num_local_experts` or `n_routed_experts` (see [`KEY_SPELLINGS`]).
    pub(crate) num_experts: Option<usize>,
    pub(crate) num_experts_per_tok: Option<usize>,
    pub(crate) moe_intermediate_size: Option<usize>,
    pub(crate) intermediate_size: Option<usize>,
    pub(crate) norm_topk_prob: Option<bool>,
    pub(crate) shared_expert_intermediate_size: Option<usize>,
    pub(crate) decoder_sparse_step: Option<usize>,
    pub(crate) mlp_only_layers: Option<Vec<usize>>,
    pub(crate) tie_word_embeddings: Option<bool>,
    eos_token_id: Option<TokenIds>,
    pub(crate) bos_token_id: Option<u32>,
    pub(crate) hidden_act: Option<String>,
    /// Kept as JSON to tell an explicit `null` (no query compression) from a missing key.
    #[serde(default, deserialize_with = "present")]
    pub(crate) q_lora_rank: Option<Value>,
    pub(crate) kv_lora_rank: Option<usize>,
    pub(crate) qk_nope_head_dim: Option<usize>,
    pub(crate) qk_rope_head_dim: Option<usize>,
    pub(crate) v_head_dim: Option<usize>,
    pub(crate) n_group: Option<usize>,
    pub(crate) topk_group: Option<usize>,
    pub(crate) routed_scaling_factor: Option<f64>,
    pub(crate) first_k_dense_replace: Option<usize>,
    pub(crate) n_shared_experts: Option<usize>,
    pub(crate) moe_layer_freq: Option<usize>,
    pub(crate) scoring_func: Option<String>,
    pub(crate) topk_method: Option<String>,
    pub(crate) rope_interleave: Option<bool>,
    pub(crate) use_qk_norm: Option<bool>,
    pub(crate) num_nextn_predict_layers: Option<usize>,
    pub(crate) layer_types: Option<Vec<String>>,
    pub(crate) swiglu_alpha: Option<f32>,
    pub(crate) swiglu_limit: Option<f32>,
    pub(crate) quantization_config: Option<Value>,
    /// Also read inside `rope_parameters` (see [`HfConfig::partial_rotary_factor`]).
    partial_rotary_factor: Option<f64>,
}

/// Keys that checkpoints spell in several ways; the first spelling of each group is the field
/// [`HfConfig`] reads. serde's `alias` would refuse a config holding two spellings even with equal
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

#[derive(Clone, Deserialize)]
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

/// Which rotary scalings an architecture computes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeScalings {
    /// Plain RoPE only.
    Plain,
    /// Plain RoPE or YaRN.
    PlainOrYarn,
}

impl HfConfig {
    /// Parses `text`, naming `path` in errors.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self> {
        let json_error = |error| Error::Json {
            path: path.to_path_buf(),
            error,
        };
        let mut object: Map<String, Value> = serde_json::from_str(text).map_err(json_error)?;
        merge_spellings(&mut object, path)?;
        let config = Value::Object(object);
        let mut raw = HfConfig::deserialize(&config)
            .map_err(|error| wrong_value(&config, path).unwrap_or_else(|| json_error(error)))?;
        raw.path = path.to_path_buf();
        Ok(raw)
    }

    /// An error about this file.
    pub(crate) fn error(&self, message: impl Into<String>) -> Error {
        Error::config(&self.path, message)
    }

    /// `value`, or an error naming the missing `key`.
    pub(crate) fn need<T>(&self, value: Option<T>, key: &str) -> Result<T> {
        value.ok_or_else(|| self.error(format!("missing key {key:?}")))
    }

    /// The fields every architecture reads alike; the rest as [`ModelConfig`]'s default has
    /// them, for the architecture to fill in.
    pub(crate) fn common(
        &self,
        architecture: Architecture,
        scalings: RopeScalings,
    ) -> Result<ModelConfig> {
        let hidden_size = self.need(self.hidden_size, "hidden_size")?;
        let num_heads = self.need(self.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(self.error(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(self.error(format!(
                "hidden_act {act:?} is not supported (only \"silu\")"
            )));
        }
        Ok(ModelConfig {
            architecture,
            vocab_size: self.need(self.vocab_size, "vocab_size")?,
            hidden_size,
            num_layers: self.need(self.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim: self.head_dim.unwrap_or(hidden_size / num_heads),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta(self, scalings)?,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(32768),
            attention_bias: self.attention_bias.unwrap_or(false),
            norm_topk_prob: true,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: self
                .eos_token_id
                .clone()
                .map(TokenIds::into_vec)
                .unwrap_or_default(),
            bos_token_id: self.bos_token_id,
            ..ModelConfig::default()
        })
    }

    /// Sets the routed experts (count, choices per token and the width read from `width_key`),
    /// checked.
    pub(crate) fn set_experts(
        &self,
        config: &mut ModelConfig,
        width: Option<usize>,
        width_key: &str,
    ) -> Result<()> {
        config.num_experts = self.need(self.num_experts, "num_experts (or num_local_experts)")?;
        config.num_experts_per_token =
            self.need(self.num_experts_per_tok, "num_experts_per_tok")?;
        config.expert_intermediate_size = self.need(width, width_key)?;
        if config.num_experts_per_token == 0 || config.num_experts_per_token > config.num_experts {
            return Err(self.error(format!(
                "num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                config.num_experts_per_token, config.num_experts
            )));
        }
        Ok(())
    }

    /// Refuses a windowed attention for architectures that attend to every position.
    pub(crate) fn refuse_sliding_window(&self) -> Result<()> {
        match self.use_sliding_window {
            Some(true) => {
                Err(self.error("use_sliding_window = true is not supported for this architecture"))
            }
            _ => Ok(()),
        }
    }

    /// The share of each head's dimensions that rotary position turns, when stated: at the top
    /// level in hub configs, inside `rope_parameters` in transformers 5's.
    pub(crate) fn partial_rotary_factor(&self) -> Result<Option<f64>> {
        let nested = rope_scaling(self).and_then(|map| map.get("partial_rotary_factor"));
        let factor = match (self.partial_rotary_factor, nested) {
            (Some(factor), _) => Some(factor),
            (None, Some(value)) => Some(value.as_f64().ok_or_else(|| {
                self.error(format!("partial_rotary_factor {value} is not a number"))
            })?),
            (None, None) => None,
        };
        match factor {
            Some(f) if !(f > 0.0 && f <= 1.0) => Err(self.error(format!(
                "partial_rotary_factor {f} must be above 0 and at most 1"
            ))),
            _ => Ok(factor),
        }
    }

    /// YaRN parameters when the rotary scaling is YaRN.
    pub(crate) fn yarn(&self) -> Result<Option<YarnScaling>> {
        match rope_type(self) {
            "yarn" => yarn_scaling(self, &self.path).map(Some),
            _ => Ok(None),
        }
    }
}

/// The first key of the `config` object whose value [`HfConfig`] cannot take, as an error naming
/// it: deserialising an already parsed object, serde's own message has no line to point at.
fn wrong_value(config: &Value, path: &Path) -> Option<Error> {
    config.as_object()?.iter().find_map(|(key, value)| {
        let alone = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        HfConfig::deserialize(&alone)
            .err()
            .map(|error| Error::config(path, format!("{key}: {error}")))
    })
}

/// The rotary scaling parameters, from `rope_parameters` (transformers 5) or `rope_scaling`.
fn rope_scaling(raw: &HfConfig) -> Option<&Map<String, Value>> {
    raw.rope_parameters
        .as_ref()
        .or(raw.rope_scaling.as_ref())
        .and_then(|v| v.as_object())
}

/// The rotary scaling type ("default" when unscaled).
fn rope_type(raw: &HfConfig) -> &str {
    rope_scaling(raw)
        .and_then(|map| map.get("rope_type").or_else(|| map.get("type")))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
}

/// The RoPE base frequency, refusing a scaling the architecture does not compute.
fn rope_theta(raw: &HfConfig, scalings: RopeScalings) -> Result<f64> {
    let path = &raw.path;
    let kind = rope_type(raw);
    let yarn_allowed = scalings == RopeScalings::PlainOrYarn && kind == "yarn";
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

/// YaRN parameters with transformers' defaults: `beta_fast` 32, `beta_slow` 1 (also for 0),
/// `original_max_position_embeddings` = `max_position_embeddings`, `truncate` true.
fn yarn_scaling(raw: &HfConfig, path: &Path) -> Result<YarnScaling> {
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
    use std::path::Path;

    use crate::config::{Architecture, ModelConfig};
    use crate::model::{config_from_hf_file, config_from_hf_json};

    const QWEN3_HUB: &str = r#"{"model_type":"qwen3_moe","vocab_size":512,"hidden_size":64,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,
        "rope_theta":1000000.0,"rope_scaling":null,"num_experts":8,"num_experts_per_tok":2,
        "moe_intermediate_size":32,"eos_token_id":[2,3]}"#;

    #[test]
    fn hub_and_transformers5_spellings_agree() {
        let hub = config_from_hf_json(QWEN3_HUB, Path::new("c.json")).unwrap();
        let t5 = QWEN3_HUB
            .replace(
                "\"rope_theta\":1000000.0,\"rope_scaling\":null",
                "\"rope_parameters\":{\"rope_theta\":1000000.0,\"rope_type\":\"default\"}",
            )
            .replace("num_experts\"", "num_local_experts\"");
        let t5 = config_from_hf_json(&t5, Path::new("c.json")).unwrap();
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
        let hub = config_from_hf_json(QWEN3_HUB, Path::new("c.json")).unwrap();
        for text in [both, all_three] {
            let config = config_from_hf_json(&text, Path::new("c.json")).unwrap();
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
        let err = config_from_hf_json(&text, Path::new("/m/config.json")).unwrap_err();
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
        let config = config_from_hf_file(&path).unwrap();
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
        let err = config_from_hf_json(&text, Path::new("c.json")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("hidden_size") && message.contains("c.json"),
            "{message}"
        );
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = QWEN3_HUB.replace("qwen3_moe", "llama4_moe");
        let err = config_from_hf_json(&text, Path::new("/m/config.json")).unwrap_err();
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
        let err = config_from_hf_json(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    /// The public config.json of DeepSeek-V3 and Kimi-K2 (also read by `odmoe inspect` tests).
    const DEEPSEEK_V3: &str = include_str!("../../../tests/fixtures/configs/deepseek_v3.json");
    const KIMI_K2: &str = include_str!("../../../tests/fixtures/configs/kimi_k2.json");

    #[test]
    fn real_deepseek_configs_parse() {
        let v3 = config_from_hf_json(DEEPSEEK_V3, Path::new("v3.json")).unwrap();
        let kimi = config_from_hf_json(KIMI_K2, Path::new("k2.json")).unwrap();
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
            let attention = ds.attention.as_ref().unwrap();
            assert_eq!(attention.q_lora_rank, Some(1536));
            assert_eq!(
                (attention.kv_lora_rank, attention.qk_rope_head_dim),
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
            let config = config_from_hf_json(text, Path::new("c.json")).unwrap();
            assert_eq!(config.kv_cache_bytes_per_token(2), 70_272);
            assert_eq!(config.kv_cache_bytes_per_token(4), 140_544);
        }
        // Grouped-query attention caches keys and values of every KV head.
        let qwen = config_from_hf_json(QWEN3_HUB, Path::new("c.json")).unwrap();
        assert_eq!(qwen.kv_cache_bytes_per_token(4), 2 * 2 * 2 * 32 * 4);
    }

    #[test]
    fn deepseek_query_rank_must_be_explicit() {
        let direct = KIMI_K2.replace("\"q_lora_rank\": 1536", "\"q_lora_rank\": null");
        let config = config_from_hf_json(&direct, Path::new("c.json")).unwrap();
        assert_eq!(config.latent_attention().unwrap().q_lora_rank, None);
        let missing = KIMI_K2.replace("\"q_lora_rank\": 1536,", "");
        let err = config_from_hf_json(&missing, Path::new("c.json")).unwrap_err();
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
            let err = config_from_hf_json(&text, Path::new("c.json")).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn missing_key_is_named() {
        let text = QWEN3_HUB.replace("\"hidden_size\":64,", "");
        let err = config_from_hf_json(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }
}
