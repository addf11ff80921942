//! GGUF metadata read as an architecture config: the keys every architecture reads alike
//! ([`GgufConfig::common`]); each architecture's own keys are read in its model file.

use crate::config::{Architecture, ModelConfig, YarnScaling};
use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;

/// A GGUF file's metadata, with keys under its `general.architecture` prefix.
pub struct GgufConfig<'a> {
    pub(crate) gguf: &'a GgufFile,
    prefix: String,
}

impl<'a> GgufConfig<'a> {
    pub(crate) fn new(gguf: &'a GgufFile) -> Result<Self> {
        Ok(Self {
            prefix: gguf.meta_str("general.architecture")?.to_string(),
            gguf,
        })
    }

    /// llama.cpp's architecture name (`llama`, `qwen3moe`, `deepseek2`, ...).
    pub(crate) fn architecture(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    pub(crate) fn error(&self, message: impl std::fmt::Display) -> Error {
        self.gguf.error(message)
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.gguf.meta_usize(&self.key(key))
    }

    pub(crate) fn f64(&self, key: &str) -> Result<f64> {
        self.gguf.meta_f64(&self.key(key))
    }

    pub(crate) fn str(&self, key: &str) -> Result<&str> {
        self.gguf.meta_str(&self.key(key))
    }

    pub(crate) fn bool(&self, key: &str) -> Option<bool> {
        self.gguf.meta_bool(&self.key(key))
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.gguf.has_meta(&self.key(key))
    }

    /// An array of booleans, when the key holds one (`None` when absent or not an array).
    pub(crate) fn opt_bools(&self, key: &str) -> Result<Option<Vec<bool>>> {
        let Ok(values) = self.gguf.meta_array(&self.key(key)) else {
            return Ok(None);
        };
        values
            .iter()
            .map(|v| match v {
                candle_core::quantized::gguf_file::Value::Bool(b) => Ok(*b),
                _ => Err(self.error(format!("{} holds a non-boolean", self.key(key)))),
            })
            .collect::<Result<Vec<bool>>>()
            .map(Some)
    }

    /// The YaRN scaling the file declares (`rope.scaling.type` "yarn"): its factor, original
    /// context and betas (llama.cpp's defaults 32 and 1), the rest (mscale, truncation) left
    /// plain for the architecture to set; `None` without scaling. Another type is refused.
    pub(crate) fn yarn(&self) -> Result<Option<YarnScaling>> {
        if !self.has("rope.scaling.type") {
            return Ok(None);
        }
        match self.str("rope.scaling.type")? {
            "yarn" => Ok(Some(YarnScaling {
                factor: self.f64("rope.scaling.factor")?,
                original_max_position_embeddings: self
                    .usize("rope.scaling.original_context_length")?,
                beta_fast: self.opt_f64("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                beta_slow: self.opt_f64("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: false,
            })),
            "none" => Ok(None),
            other => Err(self.error(format!(
                "{} rope scaling {other:?} is not supported (only yarn)",
                self.architecture()
            ))),
        }
    }

    /// An integer that may be absent, refused when present with another type.
    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.has(key).then(|| self.usize(key)).transpose()
    }

    /// A float that may be absent, refused when present with another type.
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.has(key).then(|| self.f64(key)).transpose()
    }

    /// Whether the file says its layers have routed experts.
    pub(crate) fn has_experts(&self) -> bool {
        self.usize("expert_count").unwrap_or(0) > 0
    }

    /// The fields every architecture reads alike (and how llama.cpp laid out rotary rows); the
    /// rest as [`ModelConfig`]'s default has
    /// them, for the architecture to fill in.
    pub(crate) fn common(&self, architecture: Architecture) -> Result<ModelConfig> {
        let hidden_size = self.usize("embedding_length")?;
        let num_heads = self.usize("attention.head_count")?;
        let head_dim = match self.has("attention.key_length") {
            true => self.usize("attention.key_length")?,
            false => hidden_size / num_heads,
        };
        let token_id = |key: &str| self.gguf.meta_usize(key).ok().map(|v| v as u32);
        Ok(ModelConfig {
            architecture,
            vocab_size: self.gguf.tensor_shape("token_embd.weight")?[0],
            hidden_size,
            num_layers: self.usize("block_count")?,
            num_heads,
            num_kv_heads: self.usize("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self.f64("attention.layer_norm_rms_epsilon")?,
            rope_theta: self.opt_f64("rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: self.opt_usize("context_length")?.unwrap_or(4096),
            attention_bias: self.gguf.has_tensor("blk.0.attn_q.bias"),
            norm_topk_prob: true,
            tie_word_embeddings: !self.gguf.has_tensor("output.weight"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            // llama.cpp's converter permutes the Q/K rows of `llama` files (dense or with
            // experts) for interleaved rotary pairs; its other architectures keep rotate-half.
            rope_interleaved: self.prefix == "llama",
            ..ModelConfig::default()
        })
    }

    /// Sets the routed experts: count, choices per token and the width under `width_key`.
    pub(crate) fn set_experts(&self, config: &mut ModelConfig, width_key: &str) -> Result<()> {
        config.num_experts = self.usize("expert_count")?;
        config.num_experts_per_token = self.usize("expert_used_count")?;
        config.expert_intermediate_size = self.usize(width_key)?;
        Ok(())
    }
}
