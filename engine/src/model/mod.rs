//! Model definitions: shared layers, the MoE block, and one compact file per architecture.

pub mod config;
pub mod deepseek;
pub mod layers;
pub mod llama;
pub mod mixtral;
pub mod moe;
pub mod qwen_moe;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};

pub use config::{Architecture, ModelConfig};
pub use deepseek::LatentForm;
pub use layers::KvCache;
pub use moe::Routing;

use crate::error::{Error, Result};
use crate::format::WeightSource;
use deepseek::LatentAttention;
use crate::expert::{ExpertProvider, GluMlp};
use crate::kernels::Projection;
use layers::{Attention, RmsNorm, projection};
use moe::MoeBlock;

/// One transformer block: pre-norm attention, then a pre-norm sparse MoE, each with a residual.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attention: SelfAttention,
    pub post_attention_norm: RmsNorm,
    pub ffn: FeedForward,
}

/// A layer's attention: grouped-query with a key-value cache, or latent (DeepSeek-V3) with a
/// cache of compressed latents.
#[derive(Clone, Debug)]
pub enum SelfAttention {
    Grouped(Attention),
    Latent(LatentAttention),
}

impl SelfAttention {
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
}

/// Watches a forward pass layer by layer without changing it: the expert prefetcher is one.
///
/// A hook only reads what it is given, so logits never depend on it. It runs on the thread that
/// runs the model, between layers: it must be quick.
pub trait ForwardHook: Send + Sync {
    /// The hidden state `[T, hidden]` entering `layer`, before the layer runs.
    fn layer_input(&self, layer: usize, hidden: &Tensor);
    /// The experts `layer` routed its positions to.
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
}

impl Model {
    /// Loads a checkpoint (Hugging Face directory or odmoe layout) with every expert resident.
    pub fn load_resident(path: &Path, device: &Device) -> Result<Self> {
        crate::loader::load(path, &crate::loader::LoadOptions::default(), device).map(|l| l.model)
    }

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
            .map(|i| match config.architecture {
                Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                    qwen_moe::load_layer(&config, w, i)
                }
                Architecture::Mixtral | Architecture::SplitLlama => {
                    mixtral::load_layer(&config, w, i)
                }
                Architecture::Llama => llama::load_layer(&config, w, i),
                Architecture::DeepseekV3 => deepseek::load_layer(&config, w, i),
            })
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

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers)
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
            if let Some(trace) = trace.as_deref_mut() {
                trace.hidden_states.push(x.clone());
            }
            if let Some(hook) = &self.hook {
                hook.layer_input(i, &x);
            }
            let h = (&x
                + layer
                    .attention
                    .forward(&layer.input_norm.forward(&x)?, i, offset, cache)?)?;
            let normed = layer.post_attention_norm.forward(&h)?;
            if let Some(trace) = trace.as_deref_mut() {
                trace.ffn_inputs.push(normed.clone());
            }
            let (ffn_out, routing) = match &layer.ffn {
                FeedForward::Moe(moe) => moe.forward(&normed, self.experts.as_ref())?,
                FeedForward::Dense(mlp) => (mlp.forward(&normed)?, Routing::default()),
            };
            x = (h + ffn_out)?;
            if let Some(hook) = &self.hook {
                hook.layer_routing(i, &routing);
            }
            if let Some(trace) = trace.as_deref_mut() {
                trace.routing.push(routing);
            }
        }
        if let Some(trace) = trace {
            trace.hidden_states.push(x.clone());
        }
        if logits == Logits::Last {
            x = x.narrow(0, tokens.len() - 1, 1)?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)
    }
}

/// Names of the gate, up and down projections of one routed expert.
pub fn expert_tensor_names(config: &ModelConfig, layer: usize, expert: usize) -> [String; 3] {
    match config.architecture {
        // DeepSeek-V3 names its experts as Qwen does.
        Architecture::Qwen2Moe | Architecture::Qwen3Moe | Architecture::DeepseekV3 => {
            qwen_moe::expert_tensor_names(layer, expert)
        }
        Architecture::Mixtral | Architecture::SplitLlama => {
            mixtral::expert_tensor_names(layer, expert)
        }
        Architecture::Llama => unreachable!("a dense Llama has no routed experts"),
    }
}
