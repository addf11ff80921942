//! Routing traces: for every token and layer, the experts routing chose and their weights, and
//! optionally the hidden state entering the layer (what predictors are trained on).
//!
//! A trace is recorded by running prompts through a model: each prompt is prefilled in one forward
//! pass, then greedy decoding runs one pass per generated token, exactly as
//! [`Session::generate`](crate::generate::Session::generate) does, so that replaying the trace
//! visits the expert store in the same order as a live run.
//!
//! # File format
//!
//! One safetensors file. N is the number of tokens run, L the number of layers, k the experts per
//! token, H the hidden size. Tokens are in execution order: prompt by prompt, each prompt's tokens
//! then its generated tokens (the last generated token is sampled but never run, as in a live
//! run).
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `ids` | U32 | [N, L, k] | experts each token routed to at each layer, by descending weight |
//! | `weights` | F32 | [N, L, k] | their routing weights, as applied |
//! | `prompt_index` | U32 | [N] | the prompt (line of the prompts file, from 0) of each token |
//! | `forward` | U32 | [N] | the forward pass that ran the token, numbered through the file: a prompt's first pass is its prefill, each later pass decodes one token |
//! | `hidden` | F16 or F32 | [N, L, H] | optional: the hidden state entering each layer |
//!
//! Metadata (strings): `format` = `odmoe-trace`, `version` = `1`, `config` = the architecture
//! config as JSON (the engine's normalised `ModelConfig`), `expert_bytes` = bytes one expert takes
//! in the store's budget (decimal; the largest, where layers differ), `layer_expert_bytes` = where
//! layers differ, each layer's (comma separated, 0 for a layer without experts), `model` = where
//! the model was read from (informative).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{ForwardTrace, Logits, Model};
use crate::store::ExpertSizes;

pub const FORMAT: &str = "odmoe-trace";
pub const VERSION: &str = "1";

/// A recorded routing trace (see the module documentation for the file format).
#[derive(Clone, Debug)]
pub struct Trace {
    pub config: ModelConfig,
    /// Bytes one expert of each layer takes in the store's budget.
    pub expert_sizes: ExpertSizes,
    /// `[N, L, k]`, flattened.
    pub ids: Vec<u32>,
    /// `[N, L, k]`, flattened.
    pub weights: Vec<f32>,
    pub prompt_index: Vec<u32>,
    pub forward: Vec<u32>,
    /// `[N, L, H]` when recorded.
    pub hidden: Option<Tensor>,
    /// Where the model was read from.
    pub model: String,
}

/// How [`Trace::record`] runs.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// Greedy tokens generated after each prompt.
    pub max_tokens: usize,
    /// Keep the hidden state entering every layer.
    pub hidden: bool,
    /// Tokens that end a generation early (end-of-sequence).
    pub stop_ids: Vec<u32>,
    /// Bytes one expert of each layer takes in the store's budget.
    pub expert_sizes: ExpertSizes,
    pub model: String,
}

impl Trace {
    pub fn num_tokens(&self) -> usize {
        self.prompt_index.len()
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_layers
    }

    pub fn num_experts(&self) -> usize {
        self.config.num_experts
    }

    pub fn top_k(&self) -> usize {
        self.config.num_experts_per_token
    }

    /// Bytes of all routed experts of the model: what a budget percentage is a percentage of.
    pub fn total_expert_bytes(&self) -> u64 {
        self.expert_sizes.total(&self.config)
    }

    /// Bytes one expert takes on average over the layers with experts.
    pub fn mean_expert_bytes(&self) -> u64 {
        self.expert_sizes.mean(&self.config)
    }

    /// The experts token `t` routed to at `layer`.
    pub fn ids(&self, t: usize, layer: usize) -> &[u32] {
        let k = self.top_k();
        let at = (t * self.num_layers() + layer) * k;
        &self.ids[at..at + k]
    }

    /// The step `depth` layers after layer `layer` of token `t`, in execution order (past the last
    /// layer, the next token of the same prompt), if the trace has it.
    pub fn step_after(&self, t: usize, layer: usize, depth: usize) -> Option<(usize, usize)> {
        let l = self.num_layers();
        let g = layer + depth;
        let t2 = t + g / l;
        (t2 < self.num_tokens() && self.prompt_index[t2] == self.prompt_index[t])
            .then_some((t2, g % l))
    }

    /// The token ranges of each forward pass, in order, and whether each is a prefill (the first
    /// pass of its prompt).
    pub fn forwards(&self) -> Vec<(Range<usize>, bool)> {
        let mut out: Vec<(Range<usize>, bool)> = Vec::new();
        let mut start = 0;
        for t in 1..=self.num_tokens() {
            if t == self.num_tokens() || self.forward[t] != self.forward[start] {
                let prefill =
                    start == 0 || self.prompt_index[start - 1] != self.prompt_index[start];
                out.push((start..t, prefill));
                start = t;
            }
        }
        out
    }

    /// The hidden states `[n, H]` (f32) entering `layer` for tokens `tokens`.
    pub fn hidden_rows(&self, tokens: Range<usize>, layer: usize) -> Result<Tensor> {
        let hidden = self.hidden.as_ref().ok_or_else(|| {
            Error::InvalidRequest("the trace has no hidden states: record it with --hidden".into())
        })?;
        Ok(hidden
            .narrow(0, tokens.start, tokens.len())?
            .narrow(1, layer, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?)
    }

    /// The tokens of the prompts for which `keep` holds (for train/held-out splits).
    pub fn select_prompts(&self, keep: impl Fn(u32) -> bool) -> Result<Trace> {
        let tokens: Vec<usize> = (0..self.num_tokens())
            .filter(|&t| keep(self.prompt_index[t]))
            .collect();
        let per_token = self.num_layers() * self.top_k();
        let gather_ids = |t: &usize| &self.ids[t * per_token..(t + 1) * per_token];
        let gather_weights = |t: &usize| &self.weights[t * per_token..(t + 1) * per_token];
        let hidden = match &self.hidden {
            Some(h) if !tokens.is_empty() => {
                let index: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
                let index = Tensor::from_vec(index, tokens.len(), h.device())?;
                Some(h.index_select(&index, 0)?)
            }
            _ => None,
        };
        Ok(Trace {
            config: self.config.clone(),
            expert_sizes: self.expert_sizes.clone(),
            ids: tokens.iter().flat_map(gather_ids).copied().collect(),
            weights: tokens.iter().flat_map(gather_weights).copied().collect(),
            prompt_index: tokens.iter().map(|&t| self.prompt_index[t]).collect(),
            forward: tokens.iter().map(|&t| self.forward[t]).collect(),
            hidden,
            model: self.model.clone(),
        })
    }

    /// An empty trace of a model's routing, experts counted at `expert_sizes`.
    pub fn new(config: ModelConfig, expert_sizes: ExpertSizes, model: String) -> Self {
        Self {
            config,
            expert_sizes,
            ids: Vec::new(),
            weights: Vec::new(),
            prompt_index: Vec::new(),
            forward: Vec::new(),
            hidden: None,
            model,
        }
    }

    /// Appends the routing `seen` in one forward pass over `positions` tokens of prompt `prompt`.
    pub fn push_forward(
        &mut self,
        seen: &ForwardTrace,
        positions: usize,
        prompt: u32,
    ) -> Result<()> {
        let k = self.config.num_experts_per_token;
        let forward = self.forward.last().map_or(0, |f| f + 1);
        for t in 0..positions {
            for routing in &seen.routing {
                // A dense model routes nothing: no position has a row.
                let ids = routing.ids.get(t).map_or(&[][..], Vec::as_slice);
                let weights = routing.weights.get(t).map_or(&[][..], Vec::as_slice);
                if ids.len() != k || weights.len() != k {
                    return Err(Error::InvalidRequest(format!(
                        "routing chose {} experts, the config says {k}",
                        ids.len()
                    )));
                }
                self.ids.extend(ids.iter().map(|&e| e as u32));
                self.weights.extend_from_slice(weights);
            }
            self.prompt_index.push(prompt);
            self.forward.push(forward);
        }
        Ok(())
    }

    /// Runs every prompt through `model` (prefill, then greedy decoding of up to
    /// `options.max_tokens` tokens) and records its routing; calls `progress` after each prompt.
    pub fn record(
        model: &Model,
        prompts: &[Vec<u32>],
        options: &RecordOptions,
        mut progress: impl FnMut(usize),
    ) -> Result<Trace> {
        let l = model.config.num_layers;
        let mut trace = Trace::new(
            model.config.clone(),
            options.expert_sizes.clone(),
            options.model.clone(),
        );
        let mut hidden: Vec<Tensor> = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                return Err(Error::InvalidRequest(format!("prompt {p} is empty")));
            }
            let mut cache = model.new_cache();
            let mut run = prompt.clone();
            let mut generated = 0;
            loop {
                let mut seen = if options.hidden {
                    ForwardTrace::default()
                } else {
                    ForwardTrace::routing_only()
                };
                let logits = model.forward(&run, &mut cache, Logits::Last, Some(&mut seen))?;
                trace.push_forward(&seen, run.len(), p as u32)?;
                if options.hidden {
                    // [T, L, H]: the hidden states entering each layer, per token.
                    hidden
                        .push(Tensor::stack(&seen.hidden_states[..l], 1)?.to_device(&Device::Cpu)?);
                }
                // As Session::generate: the last token is sampled but not run.
                let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
                let next = crate::model::layers::argmax(&logits) as u32;
                if generated >= options.max_tokens || options.stop_ids.contains(&next) {
                    break;
                }
                generated += 1;
                if generated >= options.max_tokens {
                    break;
                }
                run = vec![next];
            }
            progress(p);
        }
        if options.hidden && !hidden.is_empty() {
            trace.hidden = Some(Tensor::cat(&hidden, 0)?);
        }
        Ok(trace)
    }

    /// Writes the trace; hidden states are stored as `hidden_dtype` (F16 halves the file).
    pub fn save(&self, path: &Path, hidden_dtype: DType) -> Result<()> {
        let n = self.num_tokens();
        let (l, k) = (self.num_layers(), self.top_k());
        let cpu = Device::Cpu;
        let mut tensors = vec![
            (
                "ids".to_string(),
                Tensor::from_vec(self.ids.clone(), (n, l, k), &cpu)?,
            ),
            (
                "weights".to_string(),
                Tensor::from_vec(self.weights.clone(), (n, l, k), &cpu)?,
            ),
            (
                "prompt_index".to_string(),
                Tensor::from_vec(self.prompt_index.clone(), n, &cpu)?,
            ),
            (
                "forward".to_string(),
                Tensor::from_vec(self.forward.clone(), n, &cpu)?,
            ),
        ];
        if let Some(h) = &self.hidden {
            tensors.push(("hidden".to_string(), h.to_dtype(hidden_dtype)?));
        }
        let mut metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.config).expect("the config serialises"),
            ),
            (
                "expert_bytes".to_string(),
                self.expert_sizes.largest().to_string(),
            ),
            ("model".to_string(), self.model.clone()),
        ]);
        if let ExpertSizes::ByLayer(by_layer) = &self.expert_sizes {
            let list: Vec<String> = by_layer.iter().map(u64::to_string).collect();
            metadata.insert("layer_expert_bytes".to_string(), list.join(","));
        }
        write_safetensors(path, &tensors, metadata)
    }

    /// Reads a trace written by [`save`](Self::save), checking its shapes.
    pub fn load(path: &Path) -> Result<Trace> {
        let (tensors, metadata) = read_safetensors(path)?;
        let bad = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        check_format(path, &metadata, FORMAT, VERSION, "a routing trace")?;
        let config: ModelConfig = serde_json::from_str(
            metadata
                .get("config")
                .ok_or_else(|| bad("no config in the metadata".into()))?,
        )
        .map_err(|e| bad(format!("config: {e}")))?;
        let expert_bytes: u64 = metadata
            .get("expert_bytes")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no expert_bytes in the metadata".into()))?;
        let expert_sizes = match metadata.get("layer_expert_bytes") {
            None => ExpertSizes::Same(expert_bytes),
            Some(list) => {
                let by_layer = list
                    .split(',')
                    .map(|b| b.trim().parse::<u64>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .ok()
                    .filter(|by_layer| by_layer.len() == config.num_layers)
                    .ok_or_else(|| {
                        bad(format!(
                            "layer_expert_bytes {list:?} is not {} sizes in bytes",
                            config.num_layers
                        ))
                    })?;
                ExpertSizes::by_layer(by_layer)
            }
        };
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| bad(format!("no tensor {name:?}")))
        };
        let prompt_index = get("prompt_index")?.to_vec1::<u32>()?;
        let n = prompt_index.len();
        let (l, k, h) = (
            config.num_layers,
            config.num_experts_per_token,
            config.hidden_size,
        );
        let check = |name: &str, t: &Tensor, dims: &[usize]| {
            if t.dims() != dims {
                return Err(bad(format!(
                    "tensor {name:?} has shape {:?}, expected {dims:?}",
                    t.dims()
                )));
            }
            Ok(())
        };
        let ids = get("ids")?;
        check("ids", ids, &[n, l, k])?;
        let weights = get("weights")?;
        check("weights", weights, &[n, l, k])?;
        let forward = get("forward")?;
        check("forward", forward, &[n])?;
        let hidden = match tensors.get("hidden") {
            Some(t) => {
                check("hidden", t, &[n, l, h])?;
                Some(t.clone())
            }
            None => None,
        };
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        if let Some(&e) = ids.iter().find(|&&e| e as usize >= config.num_experts) {
            return Err(bad(format!(
                "expert id {e} is outside the model's {} experts",
                config.num_experts
            )));
        }
        Ok(Trace {
            ids,
            weights: weights.flatten_all()?.to_vec1::<f32>()?,
            forward: forward.to_vec1::<u32>()?,
            prompt_index,
            hidden,
            expert_sizes,
            model: metadata.get("model").cloned().unwrap_or_default(),
            config,
        })
    }
}

/// Writes named tensors and string metadata as one safetensors file.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Checks the `format` and `version` metadata of a file that should be `what`.
pub(crate) fn check_format(
    path: &Path,
    metadata: &HashMap<String, String>,
    format: &str,
    version: &str,
    what: &str,
) -> Result<()> {
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    if metadata.get("format").map(String::as_str) != Some(format) {
        return Err(bad(format!("not {what} (format {format:?} missing)")));
    }
    if metadata.get("version").map(String::as_str) != Some(version) {
        return Err(bad(format!(
            "{what}: version {:?}, this build reads {version}",
            metadata.get("version")
        )));
    }
    Ok(())
}

/// Reads every tensor (to the CPU) and the string metadata of a safetensors file.
pub(crate) fn read_safetensors(
    path: &Path,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: safetensors::SafeTensorError| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(bad)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        tensors.insert(name, view.load(&Device::Cpu)?);
    }
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}
