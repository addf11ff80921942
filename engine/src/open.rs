//! Opening a model from a Hugging Face checkpoint directory, an odmoe layout or a GGUF file, with
//! every expert resident or with experts on demand from an [`ExpertStore`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::{ExpertProvider, ResidentExperts};
use crate::format::WeightSource;
use crate::format::gguf::GgufFile;
use crate::format::layout::{MANIFEST, Manifest, SOURCE};
use crate::format::safetensors::HfWeights;
use crate::model::{KvType, Model};
use crate::predict::{PredictorKind, PrefetchOptions, Prefetcher};
use crate::store::fetch::Pace;
use crate::store::{
    ExpertSizes, ExpertSource, ExpertStore, GgufSource, HfSource, LayoutSource, StoreConfig,
};
use crate::tokenizer::Tokenizer;
use odmoe_config::format_bytes;

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
    /// Also check each expert file's sha256 against the manifest when it is read (odmoe layout
    /// only), beyond the xxh3-64 checksum every expert read is checked against.
    pub verify_checksums: bool,
    /// Keep expert reads out of the page cache, so the store holds the only copy.
    pub bypass_page_cache: bool,
    /// Route each token to this many experts instead of the model's own number.
    pub experts_per_token: Option<usize>,
    /// With experts on demand, read the experts a predictor expects in the next layers while the
    /// current layer computes ([`PredictorKind`]'s default unless chosen).
    pub prefetch: PredictorKind,
    /// Routed layers ahead the predictor guesses (1: the next layer's experts only).
    pub prefetch_depth: usize,
    /// Prefetch only guesses the predictor scores at least this (0 prefetches every top-k guess).
    pub prefetch_min_score: f32,
    /// Keep a GGUF file's quantized attention, embedding and output matrices in their stored
    /// type, as llama.cpp does, instead of widening them to f32 (exact dequantized math, four
    /// times the memory for Q8_0). Routers and norms are f32 either way.
    pub quantized_base: bool,
    /// Lower the context length below the model's maximum positions.
    pub context_length: Option<usize>,
    /// How grouped-query attention keeps keys and values: f32 for exact math (the library's
    /// default, which the reference tests hold to 1e-4), f16 as llama.cpp keeps them, half the
    /// memory and half the bytes a long context's decode step reads (what odmoe and odmoed serve
    /// with, [`LoadOptions::serving`]), or q8_0 rows, 34 bytes for f16's 64 (CPU only); latent
    /// attention's latents in f32 or f16.
    pub kv_cache: KvType,
    /// Most prompt tokens a prefill runs through the layers together (see
    /// [`crate::model::Model::set_prefill_slab`]).
    pub prefill_slab: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            experts: ExpertMode::Resident,
            verify_checksums: false,
            bypass_page_cache: true,
            experts_per_token: None,
            prefetch: PredictorKind::default(),
            prefetch_depth: 1,
            prefetch_min_score: 0.0,
            quantized_base: true,
            context_length: None,
            kv_cache: KvType::F32,
            prefill_slab: crate::model::DEFAULT_PREFILL_SLAB,
        }
    }
}

impl LoadOptions {
    /// The defaults odmoe and odmoed serve with: keys and values in f16.
    pub fn serving() -> Self {
        Self {
            kv_cache: KvType::F16,
            ..Self::default()
        }
    }
}

/// A model, its tokenizer when it has one, and its expert store (and prefetcher) when experts
/// come on demand.
pub struct LoadedModel {
    pub model: Model,
    pub store: Option<Arc<ExpertStore>>,
    pub prefetcher: Option<Arc<Prefetcher>>,
    /// From `tokenizer.json` (with the chat template of `tokenizer_config.json`) or from a GGUF
    /// file's vocabulary and `tokenizer.chat_template`.
    pub tokenizer: Option<Arc<Tokenizer>>,
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

/// What kind of model `path` holds: `"gguf"`, `"odmoe"` (a layout) or `"huggingface"`; an error
/// saying why when it is none of them.
pub fn checkpoint_format(path: &Path) -> Result<&'static str> {
    Ok(match checkpoint_kind(path)? {
        Checkpoint::Gguf => "gguf",
        Checkpoint::Layout => "odmoe",
        Checkpoint::HuggingFace => "huggingface",
    })
}

/// What a path holds, told from the bytes and files there rather than from its name, so that a
/// typo or a stray file gets an error a person can act on instead of a parser's.
fn checkpoint_kind(path: &Path) -> Result<Checkpoint> {
    let not_a_model = || {
        Error::config(
            path,
            "not a model: expected a Hugging Face directory (config.json and safetensors), \
             an odmoe layout (manifest.json) or a .gguf file",
        )
    };
    let metadata = std::fs::metadata(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => Error::config(path, "does not exist"),
        _ => Error::io(path, error),
    })?;
    if metadata.is_file() {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path)
            .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic));
        return match read {
            Ok(()) if &magic == GGUF_MAGIC => Ok(Checkpoint::Gguf),
            Ok(()) => Err(not_a_model()),
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(not_a_model()),
            Err(error) => Err(Error::io(path, error)),
        };
    }
    if is_layout(path) {
        Ok(Checkpoint::Layout)
    } else if path.join("config.json").exists() {
        Ok(Checkpoint::HuggingFace)
    } else {
        Err(not_a_model())
    }
}

/// The first bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// The tokenizer of the checkpoint at `path`, when it has one.
pub fn load_tokenizer(path: &Path) -> Result<Option<Tokenizer>> {
    match checkpoint_kind(path)? {
        Checkpoint::Gguf => gguf_tokenizer(&GgufFile::open(path, &Device::Cpu)?),
        _ => tokenizer_in_dir(path),
    }
}

/// The tokenizer a GGUF file's metadata describes, when it has one (files written without a
/// vocabulary, such as test models, are served by token ids).
fn gguf_tokenizer(gguf: &GgufFile) -> Result<Option<Tokenizer>> {
    if gguf.meta_str("tokenizer.ggml.model").is_err() {
        return Ok(None);
    }
    Tokenizer::from_gguf(gguf).map(Some)
}

/// The tokenizer of a Hugging Face directory or odmoe layout, when it has a `tokenizer.json`.
fn tokenizer_in_dir(dir: &Path) -> Result<Option<Tokenizer>> {
    if dir.join("tokenizer.json").exists() {
        Tokenizer::from_dir(dir).map(Some)
    } else {
        Ok(None)
    }
}

/// Whether a model has no experts at all (a dense Llama): it loads resident whatever the budget.
pub fn is_dense(config: &ModelConfig) -> bool {
    config.moe_layers().next().is_none()
}

/// The smallest expert budget a model can run with: one layer's routed experts, all pinned at
/// once while the layer computes, in the layer whose experts are largest.
pub fn budget_floor(config: &ModelConfig, sizes: &ExpertSizes) -> u64 {
    config.num_experts_per_token as u64 * sizes.largest()
}

/// Refuses an expert budget below [`budget_floor`], with the one message every entry point gives.
pub fn check_budget(config: &ModelConfig, sizes: &ExpertSizes, budget_bytes: u64) -> Result<()> {
    let floor = budget_floor(config, sizes);
    if budget_bytes >= floor {
        return Ok(());
    }
    Err(Error::Budget(format!(
        "{} is below the minimum of {} (one layer's {} routed experts of {} each)",
        format_bytes(budget_bytes),
        format_bytes(floor),
        config.num_experts_per_token,
        format_bytes(sizes.largest()),
    )))
}

/// The model's architecture config and the in-memory bytes of all its experts on the CPU, without
/// loading any weights.
pub fn describe(path: &Path) -> Result<(ModelConfig, u64)> {
    let (config, sizes) = expert_sizes_on(path, &Device::Cpu)?;
    let total = sizes.total(&config);
    Ok((config, total))
}

/// The model's architecture config and the bytes one expert of each layer holds in memory on
/// `device` once read (MXFP4 experts take more where odmoe's kernels do not multiply them),
/// without loading any weights.
pub fn expert_sizes_on(path: &Path, device: &Device) -> Result<(ModelConfig, ExpertSizes)> {
    Ok(match checkpoint_kind(path)? {
        Checkpoint::Gguf => {
            let gguf = GgufFile::open(path, device)?;
            let config = crate::model::config_from_gguf(&gguf)?;
            let sizes = GgufSource::expert_sizes_of(&config, &gguf)?;
            (config, sizes)
        }
        Checkpoint::Layout => {
            let manifest = Manifest::load(path)?;
            // Dense experts are widened to f32, GGUF blocks stay as stored: the source knows.
            let sizes = LayoutSource::expert_sizes_of(path, &manifest, device)?;
            (manifest.architecture, sizes)
        }
        Checkpoint::HuggingFace => {
            let config = crate::model::config_from_hf_file(&path.join("config.json"))?;
            let weights = HfWeights::open(path, &Device::Cpu)?;
            let names = |layer, expert| crate::model::expert_tensor_names(&config, layer, expert);
            let sizes = HfSource::expert_sizes_of(&config, names, &weights, device)?;
            (config, sizes)
        }
    })
}

/// Opens the checkpoint at `path`: a GGUF file, an odmoe layout or a Hugging Face directory.
pub fn load(path: &Path, options: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    let (config, base, source, tokenizer): (
        ModelConfig,
        Box<dyn WeightSource>,
        Arc<dyn ExpertSource>,
        Option<Tokenizer>,
    ) = match checkpoint_kind(path)? {
        Checkpoint::Gguf => {
            let gguf = GgufFile::open(path, device)?.keep_quantized(options.quantized_base);
            let config = crate::model::config_from_gguf(&gguf)?;
            let source = GgufSource::new(&config, &gguf, options.bypass_page_cache)?;
            let tokenizer = gguf_tokenizer(&gguf)?;
            (config, Box::new(gguf), Arc::new(source), tokenizer)
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
            let tokenizer = tokenizer_in_dir(path)?;
            (
                manifest.architecture,
                Box::new(base),
                Arc::new(source),
                tokenizer,
            )
        }
        Checkpoint::HuggingFace => {
            let config = crate::model::config_from_hf_file(&path.join("config.json"))?;
            let weights = HfWeights::open(path, device)?;
            let names = |layer, expert| crate::model::expert_tensor_names(&config, layer, expert);
            let source = HfSource::new(
                path,
                &config,
                names,
                &weights,
                options.bypass_page_cache,
                device,
            )?;
            let tokenizer = tokenizer_in_dir(path)?;
            (config, Box::new(weights), Arc::new(source), tokenizer)
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
    // A dense model has no experts to put on demand: it is resident whatever was asked.
    let experts = match &options.experts {
        ExpertMode::OnDemand(_) if is_dense(&config) => &ExpertMode::Resident,
        experts => experts,
    };
    let (provider, store): (Arc<dyn ExpertProvider>, _) = match experts {
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
                    .map(|e| source.read(layer, e, Pace::Whole).map(|(w, _)| Arc::new(w)))
                    .collect::<Result<Vec<_>>>()?;
                layers.push(experts);
            }
            (Arc::new(ResidentExperts { layers }), None)
        }
        ExpertMode::OnDemand(store_config) => {
            check_budget(&config, &source.expert_sizes(), store_config.budget_bytes)?;
            let store = Arc::new(ExpertStore::new(source, store_config));
            (store.clone(), Some(store))
        }
    };
    let mut model = Model::load_base(config, base.as_ref(), provider)?;
    model.set_kv_cache(options.kv_cache)?;
    model.set_prefill_slab(options.prefill_slab)?;
    if let Some(tokens) = options.context_length {
        model.set_context_length(tokens)?;
    }
    let prefetcher = match &store {
        Some(store) => {
            crate::predict::build(options.prefetch, &model, options.prefetch_depth, None)?.map(
                |predictor| {
                    let options = PrefetchOptions {
                        min_score: options.prefetch_min_score,
                        ..PrefetchOptions::new(options.prefetch_depth, model.config.num_layers)
                    };
                    Prefetcher::install(&mut model, predictor, store.clone(), options)
                },
            )
        }
        None => None,
    };
    // Loading's large temporaries (file pieces, dequantized tables) are not a prompt's tensors.
    crate::allocator::give_back();
    Ok(LoadedModel {
        model,
        store,
        prefetcher,
        tokenizer: tokenizer.map(Arc::new),
        path: path.to_path_buf(),
    })
}

/// Opens the checkpoint at `path` with every expert resident, for tools and tests that need only
/// the model.
pub fn resident(path: &Path, device: &Device) -> Result<Model> {
    load(path, &LoadOptions::default(), device).map(|loaded| loaded.model)
}
