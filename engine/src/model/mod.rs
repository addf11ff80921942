//! The models: the architecture registry, the decoder stack and its forward pass, the shared
//! layers, the MoE block's routing, and one file per architecture (its config defaults, tensor
//! names, base tensor groups and layer construction). Adding an architecture is a file here, a
//! line in [`FAMILIES`] and a variant of [`Architecture`].

pub mod deepseek;
mod gguf_config;
pub mod glm_moe;
pub mod gpt_oss;
mod hf_config;
pub mod kv_type;
pub mod latent_attention;
pub mod layers;
pub mod llama;
pub mod mixtral;
pub mod moe;
pub mod qwen_moe;
pub mod readback;
pub mod rotary;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};

pub use gguf_config::GgufConfig;
pub use hf_config::HfConfig;
pub use kv_type::KvType;
pub use latent_attention::{LatentAttention, LatentForm};
pub use layers::KvCache;
pub use moe::Routing;

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::expert::{ExpertProvider, GluMlp};
use crate::format::WeightSource;
use crate::format::gguf::GgufFile;
use crate::kernels::Projection;
use layers::{Attention, RmsNorm, projection};
use moe::MoeBlock;

/// What the engine knows of one architecture, declared in its model file.
pub struct Family {
    pub architecture: Architecture,
    /// The `model_type` values of `config.json` that name it; the first is the one written.
    pub model_types: &'static [&'static str],
    /// The GGUF files it reads, when llama.cpp has a name for it.
    pub gguf: Option<GgufMatch>,
    /// Its config from `config.json`, with its own keys and defaults.
    pub from_hf: fn(&HfConfig) -> Result<ModelConfig>,
    /// Its config from GGUF metadata.
    pub from_gguf: fn(&GgufConfig) -> Result<ModelConfig>,
    /// Decoder layer `i`, loaded from a checkpoint.
    pub load_layer: fn(&ModelConfig, &dyn WeightSource, usize) -> Result<DecoderLayer>,
    /// Names of routed expert `expert` of `layer`: gate, up, down (without `.weight`); `None`
    /// for an architecture without experts.
    pub expert_names: Option<fn(usize, usize) -> [String; 3]>,
    /// The name of `layer`'s router (without `.weight`).
    pub router: fn(usize) -> String,
    /// Which base group a feed-forward tensor of a layer belongs to, named after
    /// `model.layers.N.`; `None` when the architecture has no such tensor.
    pub feed_forward_group: fn(&ModelConfig, &str) -> Option<BaseGroup>,
}

/// Which GGUF files an architecture reads: llama.cpp's `general.architecture`, and whether the
/// file must (or must not) have experts, when one llama.cpp name covers two architectures.
#[derive(Clone, Copy)]
pub struct GgufMatch {
    pub architecture: &'static str,
    pub with_experts: Option<bool>,
}

/// Every architecture the engine runs.
pub const FAMILIES: &[&Family] = &[
    &qwen_moe::QWEN2_MOE,
    &qwen_moe::QWEN3_MOE,
    &mixtral::MIXTRAL,
    &mixtral::SPLIT_LLAMA,
    &llama::LLAMA,
    &deepseek::DEEPSEEK_V3,
    &glm_moe::GLM4_MOE,
    &gpt_oss::GPT_OSS,
];

/// The family of `architecture`.
pub fn family(architecture: Architecture) -> &'static Family {
    FAMILIES
        .iter()
        .find(|f| f.architecture == architecture)
        .expect("every architecture has a family")
}

/// The `model_type` `config.json` names `architecture` by.
pub fn model_type(architecture: Architecture) -> &'static str {
    family(architecture).model_types[0]
}

/// Reads and validates a checkpoint's `config.json`.
pub fn config_from_hf_file(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    config_from_hf_json(&text, path)
}

/// Parses `config.json` text, naming `path` in errors.
pub fn config_from_hf_json(text: &str, path: &Path) -> Result<ModelConfig> {
    let hf = HfConfig::parse(text, path)?;
    let model_type = hf.need(hf.model_type.clone(), "model_type")?;
    let family = FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&model_type.as_str()))
        .ok_or_else(|| Error::UnknownArchitecture {
            model_type,
            path: path.to_path_buf(),
            supported: FAMILIES
                .iter()
                .flat_map(|f| f.model_types)
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    (family.from_hf)(&hf)
}

/// The architecture config from a GGUF file's metadata.
pub fn config_from_gguf(gguf: &GgufFile) -> Result<ModelConfig> {
    let meta = GgufConfig::new(gguf)?;
    let has_experts = meta.has_experts();
    let family = FAMILIES
        .iter()
        .find(|f| {
            f.gguf.is_some_and(|g| {
                g.architecture == meta.architecture()
                    && g.with_experts.is_none_or(|e| e == has_experts)
            })
        })
        .ok_or_else(|| {
            let mut names: Vec<&str> = FAMILIES
                .iter()
                .filter_map(|f| Some(f.gguf?.architecture))
                .collect();
            names.dedup();
            Error::UnknownArchitecture {
                model_type: meta.architecture().to_string(),
                path: gguf.path().to_path_buf(),
                supported: format!("GGUF {}", names.join(", ")),
            }
        })?;
    (family.from_gguf)(&meta)
}

/// Names of the gate, up and down projections of one routed expert (without `.weight`).
pub fn expert_tensor_names(config: &ModelConfig, layer: usize, expert: usize) -> [String; 3] {
    let names = family(config.architecture)
        .expert_names
        .expect("only a model with routed experts names them");
    names(layer, expert)
}

/// Where the tensors outside the routed experts go in an odmoe layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BaseGroup {
    /// Embeddings, the output head and the final norm.
    Embeddings,
    Attention,
    Norms,
    Routers,
    /// Feed-forwards that run for every token: shared experts and dense layers.
    AlwaysOn,
}

/// The base group of the non-expert tensor `name`, or `None` when the model has no place for it
/// (another architecture's name, a layer beyond the model's, a non-canonical layer number).
pub fn base_group(config: &ModelConfig, name: &str) -> Option<BaseGroup> {
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" | "model.norm.weight" => {
            return Some(BaseGroup::Embeddings);
        }
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let canonical = !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && (layer == "0" || !layer.starts_with('0'));
    if !canonical || layer.parse::<usize>().ok()? >= config.num_layers {
        return None;
    }
    if tensor.starts_with("self_attn.") {
        Some(BaseGroup::Attention)
    } else if tensor.starts_with("input_layernorm.")
        || tensor.starts_with("post_attention_layernorm.")
    {
        Some(BaseGroup::Norms)
    } else {
        (family(config.architecture).feed_forward_group)(config, tensor)
    }
}

/// Tensors without which a model cannot run, for checking a source before converting it.
pub fn required_base_tensors(config: &ModelConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    let router = family(config.architecture).router;
    names.extend(config.moe_layers().map(|l| format!("{}.weight", router(l))));
    names
}

/// One transformer block: pre-norm attention, then a pre-norm sparse MoE, each with a residual.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attention: SelfAttention,
    pub post_attention_norm: RmsNorm,
    pub ffn: FeedForward,
}

impl DecoderLayer {
    /// Layer `i` of `attention` and `ffn`, with its two norms loaded by their usual names.
    pub fn with_norms(
        cfg: &ModelConfig,
        w: &dyn WeightSource,
        i: usize,
        attention: SelfAttention,
        ffn: FeedForward,
    ) -> Result<Self> {
        let norm = |name: &str| {
            RmsNorm::load(
                w,
                &format!("model.layers.{i}.{name}"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            attention,
            post_attention_norm: norm("post_attention_layernorm")?,
            ffn,
        })
    }
}

/// A layer's attention: grouped-query with a key-value cache, or latent (DeepSeek-V3) with a
/// cache of compressed latents.
#[derive(Clone, Debug)]
pub enum SelfAttention {
    Grouped(Attention),
    Latent(LatentAttention),
}

impl SelfAttention {
    /// Layer `i`'s grouped-query attention, by its usual names.
    pub fn grouped(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<Self> {
        Ok(Self::Grouped(Attention::load(
            cfg,
            w,
            i,
            &format!("model.layers.{i}.self_attn"),
        )?))
    }

    /// Attends `x` `[T, hidden]` at positions `offset..` to itself and the cached past.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        offset: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        match self {
            Self::Grouped(attention) => attention.forward(x, layer, offset, cache),
            Self::Latent(attention) => attention.forward(x, layer, offset, cache),
        }
    }
}

/// A layer's feed-forward: routed experts, or one dense SwiGLU (models without experts, and
/// DeepSeek's first layers).
#[derive(Clone, Debug)]
pub enum FeedForward {
    Moe(MoeBlock),
    Dense(GluMlp),
}

/// Which positions to compute logits for: all (for scoring) or only the last (for generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// What a forward pass saw inside, recorded on request.
#[derive(Debug, Default)]
pub struct ForwardTrace {
    /// Entry l is the hidden state `[T, hidden]` entering layer l; the last entry is the output of
    /// the final layer before the final norm (L + 1 entries).
    pub hidden_states: Vec<Tensor>,
    /// The routing decision of every layer.
    pub routing: Vec<Routing>,
    /// The normed state `[T, hidden]` entering each layer's feed-forward (what its router sees).
    pub ffn_inputs: Vec<Tensor>,
    /// Record the routing alone, not the states: a long prompt's states for every layer take
    /// more memory than the model (1.2 GB of SmolLM2's at 8,160 tokens).
    pub routing_only: bool,
}

impl ForwardTrace {
    /// A trace of the routing alone.
    pub fn routing_only() -> Self {
        Self {
            routing_only: true,
            ..Self::default()
        }
    }
}

/// Watches a forward pass layer by layer without changing it: the expert prefetcher is one.
///
/// A hook only reads what it is given, so logits never depend on it. It runs on the thread that
/// runs the model, between layers: it must be quick.
pub trait ForwardHook: Send + Sync {
    /// The hidden state `[T, hidden]` entering `layer`, before the layer runs. Returns tensors
    /// `[T, n]` on its device whose rows the hook wants on the host: they are read back with
    /// the layer's routing scores, in the same read, and given to
    /// [`layer_scores`](Self::layer_scores) before the layer's experts are asked for.
    fn layer_input(&self, layer: usize, hidden: &Tensor) -> Vec<Tensor>;
    /// The rows of what [`layer_input`](Self::layer_input) returned for `layer`, when it
    /// returned any.
    fn layer_scores(&self, _layer: usize, _rows: Vec<Vec<Vec<f32>>>) {}
    /// The experts `layer` routed its positions to, before they are asked for and before
    /// [`layer_scores`](Self::layer_scores).
    fn layer_routing(&self, _layer: usize, _routing: &Routing) {}
}

/// A loaded model whose experts come from an [`ExpertProvider`].
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, f32 or in a GGUF file's quantized type (rows dequantized as looked up).
    embed: QMatMul,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Projection,
    experts: Arc<dyn ExpertProvider>,
    hook: Option<Arc<dyn ForwardHook>>,
    device: Device,
    /// Most positions a sequence may hold: the model's own maximum, or less when lowered.
    context_length: usize,
    /// How grouped-query attention's cache holds keys and values.
    kv_cache: KvType,
    /// Most prompt tokens one forward pass of a prefill takes: see [`Model::set_prefill_slab`].
    prefill_slab: usize,
}

/// Prompt tokens a prefill runs through the layers together unless told otherwise.
pub const DEFAULT_PREFILL_SLAB: usize = 4096;

impl Model {
    /// Loads everything but the routed experts, which come from `experts`.
    pub fn load_base(
        config: ModelConfig,
        w: &dyn WeightSource,
        experts: Arc<dyn ExpertProvider>,
    ) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = w.matrix("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if config.tie_word_embeddings && !w.contains("lm_head.weight") {
            Projection::new(embed.clone(), None)
        } else {
            projection(w, "lm_head", v, h, false)?
        };
        let device = match &embed {
            QMatMul::QTensor(q) => q.device(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
        };
        let layers = (0..config.num_layers)
            .map(|i| (family(config.architecture).load_layer)(&config, w, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: RmsNorm::load(w, "model.norm", h, config.rms_norm_eps)?,
            embed,
            layers,
            lm_head,
            experts,
            hook: None,
            device,
            context_length: config.max_position_embeddings,
            kv_cache: KvType::F32,
            prefill_slab: DEFAULT_PREFILL_SLAB,
            config,
        })
    }

    /// Most positions a sequence may hold (prompt and generated tokens together).
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Lowers the context length below the model's maximum positions, which it may not exceed.
    pub fn set_context_length(&mut self, tokens: usize) -> Result<()> {
        let most = self.config.max_position_embeddings;
        if tokens == 0 || tokens > most {
            return Err(Error::InvalidRequest(format!(
                "context length {tokens}: must be between 1 and the model's {most} positions"
            )));
        }
        self.context_length = tokens;
        Ok(())
    }

    /// The decoder layers (the predictor reads their norms and routers).
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Installs (or, with `None`, removes) the hook every forward pass reports its layers to.
    pub fn set_hook(&mut self, hook: Option<Arc<dyn ForwardHook>>) {
        self.hook = hook;
    }

    pub fn hook(&self) -> Option<&Arc<dyn ForwardHook>> {
        self.hook.as_ref()
    }

    /// Chooses how latent attention layers compute (no effect on other attention).
    pub fn set_latent_form(&mut self, form: LatentForm) {
        for layer in &mut self.layers {
            if let SelfAttention::Latent(attention) = &mut layer.attention {
                attention.form = form;
            }
        }
    }

    /// Chooses the type latent attention layers sum in (f32 by default; see
    /// `LatentAttention::accumulate`).
    pub fn set_latent_precision(&mut self, accumulate: candle_core::DType) {
        for layer in &mut self.layers {
            if let SelfAttention::Latent(attention) = &mut layer.attention {
                attention.accumulate = accumulate;
            }
        }
    }

    /// A cache for one sequence, which never grows past the context length.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers)
            .with_most_positions(self.context_length)
            .with_kind(self.kv_cache)
    }

    /// Most prompt tokens one forward pass of a prefill takes.
    pub fn prefill_slab(&self) -> usize {
        self.prefill_slab
    }

    /// Runs a long prompt's prefill layer by layer over slabs of at most `tokens` tokens, one
    /// slab after another: what a prompt's activations take grows with the slab, not the prompt
    /// (a 32K-token prompt's hidden states alone are 256 MiB at a hidden size of 2,048), and
    /// each layer's experts are still read once per slab, not once per token.
    pub fn set_prefill_slab(&mut self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(Error::InvalidRequest(
                "a prefill slab of 0 tokens: it takes at least one".into(),
            ));
        }
        self.prefill_slab = tokens;
        Ok(())
    }

    /// How new caches keep grouped-query attention's keys and values.
    pub fn kv_cache(&self) -> KvType {
        self.kv_cache
    }

    /// Bytes a sequence of `positions` holds in a new cache.
    pub fn kv_cache_bytes(&self, positions: usize) -> u64 {
        (positions.min(self.context_length) * self.kv_cache.bytes_per_token(&self.config)) as u64
    }

    /// Keeps grouped-query attention's keys and values as `kind` in new caches.
    pub fn set_kv_cache(&mut self, kind: KvType) -> Result<()> {
        if self.config.latent_attention().is_none() {
            kind.check(self.device(), self.config.head_dim)?;
        }
        self.kv_cache = kind;
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `tokens` at positions `cache.len()..`, appending them to `cache`, and returns f32
    /// logits `[T, vocab]` (or `[1, vocab]` for [`Logits::Last`]).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        mut trace: Option<&mut ForwardTrace>,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to run".into()));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        let offset = cache.len();
        let ids = Tensor::new(tokens, self.device())?;
        let mut x = self.embed.embedding(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(trace) = trace.as_deref_mut().filter(|t| !t.routing_only) {
                trace.hidden_states.push(x.clone());
            }
            let wanted = match &self.hook {
                Some(hook) => hook.layer_input(i, &x),
                None => Vec::new(),
            };
            let h = (&x
                + layer
                    .attention
                    .forward(&layer.input_norm.forward(&x)?, i, offset, cache)?)?;
            let normed = layer.post_attention_norm.forward(&h)?;
            if let Some(trace) = trace.as_deref_mut().filter(|t| !t.routing_only) {
                trace.ffn_inputs.push(normed.clone());
            }
            // One read back per layer: the routing scores and what the hook wants, together.
            let wanted: Vec<&Tensor> = wanted.iter().collect();
            let (routing, read) = match &layer.ffn {
                FeedForward::Moe(moe) => moe.route_reading(&normed, &wanted)?,
                FeedForward::Dense(_) => (Routing::default(), readback::rows(&wanted)?),
            };
            // The routing first: guesses made from it, or queued after it, must spare the
            // experts it chose; both before the experts are asked for, so reads overlap them.
            if let Some(hook) = &self.hook {
                hook.layer_routing(i, &routing);
            }
            if let Some(hook) = self.hook.as_ref().filter(|_| !wanted.is_empty()) {
                hook.layer_scores(i, read);
            }
            let ffn_out = match &layer.ffn {
                FeedForward::Moe(moe) => moe.mix(&normed, &routing, self.experts.as_ref())?,
                FeedForward::Dense(mlp) => mlp.forward(&normed)?,
            };
            x = (h + ffn_out)?;
            if let Some(trace) = trace.as_deref_mut() {
                trace.routing.push(routing);
            }
        }
        if let Some(trace) = trace.filter(|t| !t.routing_only) {
            trace.hidden_states.push(x.clone());
        }
        if logits == Logits::Last {
            x = x.narrow(0, tokens.len() - 1, 1)?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_placed_by_name() {
        let config = config_from_hf_json(
            r#"{"model_type":"qwen2_moe","vocab_size":16,"hidden_size":8,"num_hidden_layers":2,
            "num_attention_heads":2,"rope_theta":1e4,"num_experts":4,"num_experts_per_tok":2,
            "moe_intermediate_size":4,"shared_expert_intermediate_size":8}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let group = |name| base_group(&config, name);
        assert_eq!(group("lm_head.weight"), Some(BaseGroup::Embeddings));
        assert_eq!(
            group("model.layers.1.self_attn.q_proj.bias"),
            Some(BaseGroup::Attention)
        );
        assert_eq!(
            group("model.layers.0.post_attention_layernorm.weight"),
            Some(BaseGroup::Norms)
        );
        assert_eq!(
            group("model.layers.1.mlp.gate.weight"),
            Some(BaseGroup::Routers)
        );
        assert_eq!(
            group("model.layers.1.mlp.shared_expert_gate.weight"),
            Some(BaseGroup::AlwaysOn)
        );
        assert_eq!(
            group("model.layers.1.mlp.shared_expert.up_proj.weight"),
            Some(BaseGroup::AlwaysOn)
        );
        // Beyond the configured layers, other architectures' names, or unknown: no place.
        assert_eq!(group("model.layers.2.self_attn.q_proj.weight"), None);
        assert_eq!(group("model.layers.01.self_attn.q_proj.weight"), None);
        assert_eq!(group("model.layers.0.block_sparse_moe.gate.weight"), None);
        assert_eq!(group("model.layers.0.mlp.gate_proj.weight"), None);
        assert_eq!(group("model.vision_tower.weight"), None);
    }
}
