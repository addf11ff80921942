//! Opening a model from a Hugging Face checkpoint directory, an odmoe layout or a GGUF file, with
//! every expert resident or with experts on demand from an [`ExpertStore`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::format::WeightSource;
use crate::format::gguf::GgufFile;
use crate::format::layout::{MANIFEST, Manifest, SOURCE};
use crate::format::safetensors::HfWeights;
use crate::model::{ExpertProvider, Model, ModelConfig, ResidentExperts};
use crate::predict::{PredictorKind, PrefetchOptions, Prefetcher};
use crate::store::{ExpertSource, ExpertStore, GgufSource, HfSource, LayoutSource, StoreConfig};
use crate::tokenizer::Tokenizer;

/// Where experts live while the model runs.
#[derive(Clone, Debug, PartialEq)]
pub enum ExpertMode {
    /// Every expert read at load and kept.
    Resident,
    /// Experts read on demand into a byte-budgeted store.
    OnDemand(StoreConfig),
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    pub experts: ExpertMode,
    /// Check each expert file's sha256 against the manifest when it is read (odmoe layout only).
    pub verify_checksums: bool,
    /// Keep expert reads out of the page cache, so the store holds the only copy.
    pub bypass_page_cache: bool,
    /// Route each token to this many experts instead of the model's own number.
    pub experts_per_token: Option<usize>,
    /// With experts on demand, read the experts a predictor expects one layer ahead while the
    /// current layer computes. Lookahead by default: on the demo model from cold storage it made
    /// decode 1.45x faster (odmoe predictor bench), and its gate switches it off while wasteful.
    pub prefetch: PredictorKind,
    /// Keep a GGUF file's quantized attention, embedding and output matrices in their stored
    /// type, as llama.cpp does, instead of widening them to f32 (exact dequantized math, four
    /// times the memory for Q8_0). Routers and norms are f32 either way.
    pub quantized_base: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            experts: ExpertMode::Resident,
            verify_checksums: false,
            bypass_page_cache: true,
            experts_per_token: None,
            prefetch: PredictorKind::Lookahead,
            quantized_base: true,
        }
    }
}

/// A model, and its expert store (and prefetcher) when experts come on demand.
pub struct LoadedModel {
    pub model: Model,
    pub store: Option<Arc<ExpertStore>>,
    pub prefetcher: Option<Arc<Prefetcher>>,
    /// The directory the model was read from.
    pub path: PathBuf,
}

/// Whether `path` is an odmoe layout (or a conversion into one that has not finished, which
/// [`Manifest::load`] then reports as such) rather than a Hugging Face directory.
pub fn is_layout(path: &Path) -> bool {
    path.join(MANIFEST).exists() || path.join(SOURCE).exists()
}

/// The kinds of checkpoint the engine reads.
enum Checkpoint {
    HuggingFace,
    Layout,
    Gguf,
}

fn checkpoint_kind(path: &Path) -> Checkpoint {
    if path.is_file() {
        Checkpoint::Gguf
    } else if is_layout(path) {
        Checkpoint::Layout
    } else {
        Checkpoint::HuggingFace
    }
}

/// The tokenizer of the checkpoint at `path`, when it has one.
pub fn load_tokenizer(path: &Path) -> Result<Option<Tokenizer>> {
    match checkpoint_kind(path) {
        Checkpoint::Gguf => Tokenizer::from_gguf(&GgufFile::open(path, &Device::Cpu)?).map(Some),
        _ if path.join("tokenizer.json").exists() => Tokenizer::from_dir(path).map(Some),
        _ => Ok(None),
    }
}

/// The model's architecture config and the in-memory bytes of all its experts, without loading
/// any weights.
pub fn describe(path: &Path) -> Result<(ModelConfig, u64)> {
    let (config, expert_bytes) = match checkpoint_kind(path) {
        Checkpoint::Gguf => {
            let gguf = GgufFile::open(path, &Device::Cpu)?;
            let config = gguf.model_config()?;
            let bytes = GgufSource::new(&config, &gguf, false)?.expert_bytes();
            (config, bytes)
        }
        Checkpoint::Layout => {
            let manifest = Manifest::load(path)?;
            // Dense experts are widened to f32, GGUF blocks stay as stored: the source knows.
            let bytes =
                LayoutSource::new(path, &manifest, false, false, &Device::Cpu)?.expert_bytes();
            (manifest.architecture, bytes)
        }
        Checkpoint::HuggingFace => {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            let bytes = config.expert_f32_bytes() as u64;
            (config, bytes)
        }
    };
    let total = (config.moe_layers().count() * config.num_experts) as u64 * expert_bytes;
    Ok((config, total))
}

/// Opens the checkpoint at `path`: a GGUF file, an odmoe layout or a Hugging Face directory.
pub fn load(path: &Path, options: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    let (config, base, source): (ModelConfig, Box<dyn WeightSource>, Arc<dyn ExpertSource>) =
        match checkpoint_kind(path) {
            Checkpoint::Gguf => {
                let gguf = GgufFile::open(path, device)?.keep_quantized(options.quantized_base);
                let config = gguf.model_config()?;
                let source = GgufSource::new(&config, &gguf, options.bypass_page_cache)?;
                (config, Box::new(gguf), Arc::new(source))
            }
            Checkpoint::Layout => {
                let manifest = Manifest::load(path)?;
                let base_paths: Vec<PathBuf> =
                    manifest.base_files.iter().map(|f| path.join(f)).collect();
                let base = HfWeights::open_files(&path.display().to_string(), &base_paths, device)?;
                let source = LayoutSource::new(
                    path,
                    &manifest,
                    options.verify_checksums,
                    options.bypass_page_cache,
                    device,
                )?;
                (manifest.architecture, Box::new(base), Arc::new(source))
            }
            Checkpoint::HuggingFace => {
                let config = ModelConfig::from_file(&path.join("config.json"))?;
                let weights = HfWeights::open(path, device)?;
                let source = HfSource::new(&config, &weights, options.bypass_page_cache, device)?;
                (config, Box::new(weights), Arc::new(source))
            }
        };
    let mut config = config;
    if let Some(k) = options.experts_per_token {
        if k == 0 || k > config.num_experts {
            return Err(Error::InvalidRequest(format!(
                "{k} experts per token: the model has {} experts per layer",
                config.num_experts
            )));
        }
        config.num_experts_per_token = k;
    }
    let (provider, store): (Arc<dyn ExpertProvider>, _) = match &options.experts {
        ExpertMode::Resident => {
            let mut layers = Vec::with_capacity(config.num_layers);
            for layer in 0..config.num_layers {
                // Dense layers (DeepSeek's first ones) have no experts to read.
                let count = if config.is_moe_layer(layer) {
                    config.num_experts
                } else {
                    0
                };
                let experts = (0..count)
                    .map(|e| source.read(layer, e).map(|(w, _)| Arc::new(w)))
                    .collect::<Result<Vec<_>>>()?;
                layers.push(experts);
            }
            (Arc::new(ResidentExperts { layers }), None)
        }
        ExpertMode::OnDemand(store_config) => {
            let minimum = config.num_experts_per_token as u64 * source.expert_bytes();
            if store_config.budget_bytes < minimum {
                return Err(Error::Budget(format!(
                    "{} bytes is below the minimum of {minimum} (one layer's {} routed experts of {} bytes each)",
                    store_config.budget_bytes,
                    config.num_experts_per_token,
                    source.expert_bytes()
                )));
            }
            let store = Arc::new(ExpertStore::new(source, store_config));
            (store.clone(), Some(store))
        }
    };
    let mut model = Model::load_base(config, base.as_ref(), provider)?;
    let prefetcher = match &store {
        Some(store) => crate::predict::build(options.prefetch, &model, 1, None)?.map(|predictor| {
            let options = PrefetchOptions::new(1, model.config.num_layers);
            Prefetcher::install(&mut model, predictor, store.clone(), options)
        }),
        None => None,
    };
    Ok(LoadedModel {
        model,
        store,
        prefetcher,
        path: path.to_path_buf(),
    })
}
