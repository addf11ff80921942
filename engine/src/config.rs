//! The normalised architecture config: what the engine needs to know of a model's shape,
//! whatever file it came from. A leaf: plain data (it is written into an odmoe layout's
//! manifest); reading it from `config.json` or GGUF metadata, with each architecture's defaults,
//! is the models' job (`model::`).

use serde::{Deserialize, Serialize};

/// The model families the engine implements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    Qwen2Moe,
    Qwen3Moe,
    Mixtral,
    /// A dense Llama: one SwiGLU feed-forward per layer, no experts.
    #[default]
    Llama,
    /// A dense Llama whose feed-forward neurons `odmoe convert --split-experts` partitioned into
    /// experts: Mixtral's tensor names, and the chosen experts' outputs summed with weight one,
    /// so that choosing every expert gives back the dense model.
    SplitLlama,
    /// DeepSeek-V3 and models built on it (Kimi-K2): multi-head latent attention, sigmoid
    /// group-limited routing, shared experts, and dense feed-forwards in the first layers.
    DeepseekV3,
    /// gpt-oss: attention with sinks, alternating sliding-window and full layers and YaRN; a
    /// biased router; experts with biases and a clamped SwiGLU.
    GptOss,
    /// GLM-4.5 and its successors: grouped-query attention with biases, optional query-key
    /// norms and rotary on part of each head; DeepSeek-V3's routing, shared experts and dense
    /// first layers.
    Glm4Moe,
}

/// Everything the engine needs to know about a model's shape, normalised across spellings.
///
/// The default is no model at all (every size zero); config readers fill in what their file
/// states and take the rest from it: a dense decoder with full attention, no experts, shared
/// experts, query-key norms or interleaved rotary pairs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
    /// YaRN scaling of grouped-query attention's rotary position (gpt-oss; DeepSeek-V3's is in
    /// [`DeepseekConfig`]).
    #[serde(default)]
    pub rope_yarn: Option<YarnScaling>,
    /// Which layers attend only within `sliding_window` (gpt-oss alternates); every layer when
    /// `None`.
    #[serde(default)]
    pub window_layers: Option<Vec<bool>>,
    /// Each query head has a learned logit that joins its softmax without a value (gpt-oss).
    #[serde(default)]
    pub attention_sinks: bool,
    /// The attention output projection has a bias (gpt-oss).
    #[serde(default)]
    pub attention_output_bias: bool,
    /// How routed experts gate their up projection.
    #[serde(default)]
    pub expert_gating: ExpertGating,
    /// Rotary position applies to the first this many dimensions of each head only, the rest
    /// pass through (GLM-4.5: half); every dimension when `None`.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// Layers the checkpoint carries after the decoder stack for multi-token prediction
    /// (DeepSeek-V3 and GLM-4.5 `num_nextn_predict_layers`). They only draft tokens for
    /// speculative decoding: not run, and left out of a conversion.
    #[serde(default)]
    pub draft_layers: usize,
    /// The parts of DeepSeek-V3-style models (group-limited sigmoid routing, leading dense
    /// layers, and for DeepSeek-V3 itself latent attention and YaRN).
    #[serde(default)]
    pub deepseek: Option<DeepseekConfig>,
}

/// How an expert turns its gate and up projections into the down projection's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExpertGating {
    /// `silu(gate) * up`.
    #[default]
    Silu,
    /// gpt-oss: the gate clamped above at `limit`, up to `-limit..=limit`, then
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// What a DeepSeek-V3-architecture model adds to [`ModelConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeepseekConfig {
    /// Latent attention; `None` for models with DeepSeek-V3's routing and grouped-query
    /// attention (GLM-4.5).
    #[serde(default)]
    pub attention: Option<LatentAttentionConfig>,
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

impl ModelConfig {
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
        let per_layer = match self.latent_attention() {
            Some(a) => a.kv_lora_rank + a.qk_rope_head_dim,
            None => 2 * self.num_kv_heads * self.head_dim,
        };
        self.num_layers * per_layer * elem_bytes
    }

    /// The window `layer` attends within, if it has one.
    pub fn sliding_window_of(&self, layer: usize) -> Option<usize> {
        let windowed = match &self.window_layers {
            Some(layers) => layers.get(layer).copied().unwrap_or(false),
            None => true,
        };
        self.sliding_window.filter(|_| windowed)
    }

    /// Whether the tensor `name` (a checkpoint's `model.layers.N.` or a GGUF file's `blk.N.`)
    /// belongs to one of the [draft layers](Self::draft_layers).
    pub fn is_draft_layer_tensor(&self, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix("model.layers.")
            .or_else(|| name.strip_prefix("blk."))
        else {
            return false;
        };
        let layer = rest.split('.').next().and_then(|n| n.parse::<usize>().ok());
        layer.is_some_and(|l| l >= self.num_layers && l < self.num_layers + self.draft_layers)
    }

    /// The latent attention config, when the model's attention is latent.
    pub fn latent_attention(&self) -> Option<&LatentAttentionConfig> {
        self.deepseek.as_ref()?.attention.as_ref()
    }

    /// Bytes of one routed expert's weights in f32 (gate, up and down projections).
    pub fn expert_f32_bytes(&self) -> usize {
        3 * self.hidden_size * self.expert_intermediate_size * 4
    }

    /// `[out, in]` of a routed expert's gate, up and down projections.
    pub fn expert_shapes(&self) -> [[usize; 2]; 3] {
        let (h, i) = (self.hidden_size, self.expert_intermediate_size);
        [[i, h], [i, h], [h, i]]
    }
}
