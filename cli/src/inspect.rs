//! `odmoe inspect`: a model's shape, its expert sizes, its KV cache per token, and the memory it
//! needs with an expert budget. Works on a Hugging Face checkpoint directory, an odmoe layout and
//! a GGUF file, and on a bare `config.json` (sizes computed from the config alone, no weights
//! read).

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;
use odmoe_config::format_bytes;
use odmoe_engine::config::ModelConfig;
use odmoe_engine::format::gguf::{ggml_bytes, ggml_type_name, stacked_expert_names};
use odmoe_engine::format::gguf_header;
use odmoe_engine::format::layout::{GGUF_DTYPE, Manifest};
use odmoe_engine::format::safetensors::{HfWeights, is_fused_expert_tensor};
use odmoe_engine::model::{KvType, expert_tensor_names};
use odmoe_engine::open;
use odmoe_engine::store::budget::parse_budget;
use safetensors::Dtype;
use serde::Serialize;

#[derive(Args)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint directory, an odmoe layout (MODEL.odmoe), a GGUF file, or a
    /// config.json (any file named *.json: sizes from the config alone).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Expert budget: bytes with a unit (64MiB, 1.5GB, 8G) or a percentage of all experts as
    /// held in memory (25%). Without it, the memory shown keeps every expert resident.
    #[arg(long, value_name = "SIZE|PCT")]
    budget: Option<String>,
    /// Also show the KV cache (or, with latent attention, the latent cache) a sequence of this
    /// many tokens holds, such as 262144.
    #[arg(long, value_name = "TOKENS")]
    context: Option<u64>,
    /// Print the numbers as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// What `inspect` reports; byte counts are exact. "In memory" is as the engine holds weights:
/// dense types widened to f32, GGUF quantized blocks kept as stored.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    /// "huggingface", "odmoe" or "gguf".
    pub format: &'static str,
    pub architecture: &'static str,
    pub layers: usize,
    /// Layers with routed experts: none in a dense model, not the first few in DeepSeek's.
    pub moe_layers: usize,
    pub experts_per_layer: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub expert_intermediate_size: usize,
    /// Stored type of the expert weights ("Q4_K+Q6_K" when a GGUF mixture varies it); none in a
    /// dense model.
    pub expert_dtype: Option<String>,
    /// One expert's gate, up and down weights as stored (in the first layer with experts).
    pub expert_bytes_on_disk: u64,
    /// One expert file of an odmoe layout, padding included (what one read fetches).
    pub expert_file_bytes: Option<u64>,
    /// One expert's weights widened to f32.
    pub expert_bytes_f32: u64,
    /// One expert in memory: the unit of the expert budget.
    pub expert_bytes_in_memory: u64,
    pub total_experts: usize,
    pub total_expert_bytes_on_disk: u64,
    pub total_expert_bytes_f32: u64,
    pub total_expert_bytes_in_memory: u64,
    /// Everything but the routed experts: as stored, widened to f32, and in memory.
    pub base_bytes_on_disk: u64,
    pub base_bytes_f32: u64,
    pub base_bytes_in_memory: u64,
    /// The parsed budget, when one was given (and the model has experts).
    pub budget_bytes: Option<u64>,
    /// base_bytes_in_memory plus the budget (or all experts in memory without one); the KV cache
    /// and activations come on top.
    pub memory_needed_bytes: u64,
    /// The KV cache per token, and with `--context` at that many tokens.
    #[serde(flatten)]
    pub kv_cache: KvCacheSizes,
}

/// The KV cache's bytes per token in each way it can be kept (`--kv-cache`; f16 is the
/// default), and with `--context` at that many tokens.
#[derive(Debug, Serialize)]
pub struct KvCacheSizes {
    pub kv_cache_bytes_per_token_f16: u64,
    /// `None` when the heads cannot be kept in Q8_0 (their width is not a multiple of 32).
    pub kv_cache_bytes_per_token_q8_0: Option<u64>,
    pub kv_cache_bytes_per_token_f32: u64,
    pub context_tokens: Option<u64>,
    pub kv_cache_bytes_at_context_f16: Option<u64>,
    pub kv_cache_bytes_at_context_q8_0: Option<u64>,
    pub kv_cache_bytes_at_context_f32: Option<u64>,
}

impl KvCacheSizes {
    fn of(config: &ModelConfig) -> Self {
        let per_token = |kind: KvType| kind.bytes_per_token(config) as u64;
        Self {
            kv_cache_bytes_per_token_f16: per_token(KvType::F16),
            // Latent attention keeps its latents in f16 under any cache type.
            kv_cache_bytes_per_token_q8_0: (config.latent_attention().is_some()
                || KvType::Q8_0.check(&Device::Cpu, config.head_dim).is_ok())
            .then(|| per_token(KvType::Q8_0)),
            kv_cache_bytes_per_token_f32: per_token(KvType::F32),
            context_tokens: None,
            kv_cache_bytes_at_context_f16: None,
            kv_cache_bytes_at_context_q8_0: None,
            kv_cache_bytes_at_context_f32: None,
        }
    }

    fn at_context(&mut self, tokens: Option<u64>) {
        let Some(tokens) = tokens else { return };
        self.context_tokens = Some(tokens);
        self.kv_cache_bytes_at_context_f16 =
            Some(tokens.saturating_mul(self.kv_cache_bytes_per_token_f16));
        self.kv_cache_bytes_at_context_q8_0 = self
            .kv_cache_bytes_per_token_q8_0
            .map(|bytes| tokens.saturating_mul(bytes));
        self.kv_cache_bytes_at_context_f32 =
            Some(tokens.saturating_mul(self.kv_cache_bytes_per_token_f32));
    }

    /// The KV cache's lines; `what` says what it holds.
    fn print(&self, what: &str) {
        let q8_0 = |bytes: Option<u64>, show: &dyn Fn(u64) -> String| match bytes {
            Some(bytes) => format!("{} in q8_0", show(bytes)),
            None => "no q8_0: heads are not whole 32-value blocks".to_string(),
        };
        println!(
            "KV cache      {} bytes per token in f16 ({}, {} in f32): {what}",
            self.kv_cache_bytes_per_token_f16,
            q8_0(self.kv_cache_bytes_per_token_q8_0, &|b| b.to_string()),
            self.kv_cache_bytes_per_token_f32
        );
        if let (Some(tokens), Some(f16), Some(f32)) = (
            self.context_tokens,
            self.kv_cache_bytes_at_context_f16,
            self.kv_cache_bytes_at_context_f32,
        ) {
            println!(
                "              {} in f16 ({}, {} in f32) at {tokens} tokens",
                format_bytes(f16),
                q8_0(self.kv_cache_bytes_at_context_q8_0, &format_bytes),
                format_bytes(f32)
            );
        }
    }
}

/// What `inspect` reports from a config.json alone: shapes and sizes that follow from it.
#[derive(Debug, Serialize)]
pub struct ConfigInspection {
    pub path: String,
    pub architecture: &'static str,
    pub layers: usize,
    /// Layers with routed experts (DeepSeek's first layers are dense).
    pub moe_layers: usize,
    pub experts_per_layer: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub expert_intermediate_size: usize,
    pub total_experts: usize,
    /// One expert's weights in f32 and in 16-bit floats.
    pub expert_bytes_f32: u64,
    pub expert_bytes_f16: u64,
    /// Latent attention: the width of the cached latent and of the shared rotary key.
    pub kv_lora_rank: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    /// The KV cache per token, and with `--context` at that many tokens.
    #[serde(flatten)]
    pub kv_cache: KvCacheSizes,
}

pub fn run(args: InspectArgs) -> Result<()> {
    if is_config_json(&args.model) {
        if args.budget.is_some() {
            anyhow::bail!("--budget needs a checkpoint or layout, not a config.json alone");
        }
        let mut report = inspect_config(&args.model)
            .with_context(|| format!("inspecting {}", args.model.display()))?;
        report.kv_cache.at_context(args.context);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_config(&report);
        }
        return Ok(());
    }
    let mut report =
        inspect(&args.model).with_context(|| format!("inspecting {}", args.model.display()))?;
    report.kv_cache.at_context(args.context);
    if let Some(text) = &args.budget {
        if report.total_experts == 0 {
            eprintln!(
                "note: {} is a dense model (no experts): --budget does not apply",
                args.model.display()
            );
        } else {
            let budget = parse_budget(text, report.total_expert_bytes_in_memory)?;
            report.budget_bytes = Some(budget);
            report.memory_needed_bytes = report.base_bytes_in_memory + budget;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_inspection(&report);
    }
    Ok(())
}

/// Whether `path` is a bare config rather than a checkpoint: checkpoints are directories or GGUF
/// files, whose kind [`open::describe`] tells from their bytes.
fn is_config_json(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|ext| ext == "json")
}

fn print_inspection(r: &Inspection) {
    let kind = match r.format {
        "odmoe" => "odmoe layout",
        "gguf" => "GGUF file",
        _ => "Hugging Face checkpoint",
    };
    println!("model         {} ({kind})", r.path);
    let Some(dtype) = &r.expert_dtype else {
        println!(
            "architecture  {}: {} layers, dense: no experts, hidden {}",
            r.architecture, r.layers, r.hidden_size
        );
        print_base_and_kv_cache(r);
        println!(
            "memory        {} = base, plus KV cache and activations",
            format_bytes(r.memory_needed_bytes)
        );
        return;
    };
    let dense_layers = match r.layers - r.moe_layers {
        0 => String::new(),
        n => format!(" ({n} dense)"),
    };
    println!(
        "architecture  {}: {} layers{dense_layers}, {} experts per layer, top-{}, hidden {}, \
         expert width {}",
        r.architecture,
        r.layers,
        r.experts_per_layer,
        r.top_k,
        r.hidden_size,
        r.expert_intermediate_size
    );
    let file = r
        .expert_file_bytes
        .map(|b| format!(", {} per file", format_bytes(b)))
        .unwrap_or_default();
    println!(
        "one expert    {} on disk ({dtype}){file}, {}",
        format_bytes(r.expert_bytes_on_disk),
        in_memory(r.expert_bytes_in_memory, r.expert_bytes_f32)
    );
    println!(
        "all experts   {} x: {} on disk, {}",
        r.total_experts,
        format_bytes(r.total_expert_bytes_on_disk),
        in_memory(r.total_expert_bytes_in_memory, r.total_expert_bytes_f32)
    );
    print_base_and_kv_cache(r);
    match r.budget_bytes {
        Some(budget) => {
            println!(
                "budget        {} ({:.1}% of all experts, about {} experts)",
                format_bytes(budget),
                100.0 * budget as f64 / r.total_expert_bytes_in_memory.max(1) as f64,
                budget / r.expert_bytes_in_memory.max(1)
            );
            println!(
                "memory        {} = base + budget, plus KV cache and activations",
                format_bytes(r.memory_needed_bytes)
            );
        }
        None => println!(
            "memory        {} = base + all experts, plus KV cache and activations; --budget \
             gives less",
            format_bytes(r.memory_needed_bytes)
        ),
    }
}

/// The lines every model has: the base model's size and the KV cache per token.
fn print_base_and_kv_cache(r: &Inspection) {
    println!(
        "base model    {} on disk, {}",
        format_bytes(r.base_bytes_on_disk),
        in_memory(r.base_bytes_in_memory, r.base_bytes_f32)
    );
    r.kv_cache
        .print("keys and values (or latents) of every layer");
}

/// "N in memory (f32)" for widened weights; quantized weights also say what f32 would take.
fn in_memory(bytes: u64, f32_bytes: u64) -> String {
    if bytes == f32_bytes {
        format!("{} in memory (f32)", format_bytes(bytes))
    } else {
        format!(
            "{} in memory (quantized; {} in f32)",
            format_bytes(bytes),
            format_bytes(f32_bytes)
        )
    }
}

/// The sizes that follow from the config.json at `path`.
pub fn inspect_config(path: &Path) -> Result<ConfigInspection> {
    let config = odmoe_engine::model::config_from_hf_file(path)?;
    let expert_bytes_f32 = config.expert_f32_bytes() as u64;
    let latent = config.latent_attention();
    let moe_layers = config.moe_layers().count();
    Ok(ConfigInspection {
        path: path.display().to_string(),
        architecture: odmoe_engine::model::model_type(config.architecture),
        layers: config.num_layers,
        moe_layers,
        experts_per_layer: config.num_experts,
        top_k: config.num_experts_per_token,
        hidden_size: config.hidden_size,
        expert_intermediate_size: config.expert_intermediate_size,
        total_experts: moe_layers * config.num_experts,
        expert_bytes_f32,
        expert_bytes_f16: expert_bytes_f32 / 2,
        kv_lora_rank: latent.map(|a| a.kv_lora_rank),
        qk_rope_head_dim: latent.map(|a| a.qk_rope_head_dim),
        kv_cache: KvCacheSizes::of(&config),
    })
}

fn print_config(r: &ConfigInspection) {
    println!("config        {} (no weights read)", r.path);
    println!(
        "architecture  {}: {} layers ({} with experts), {} experts per layer, top-{}, hidden {}, \
         expert width {}",
        r.architecture,
        r.layers,
        r.moe_layers,
        r.experts_per_layer,
        r.top_k,
        r.hidden_size,
        r.expert_intermediate_size
    );
    println!(
        "one expert    {} in f16/bf16, {} in memory (f32)",
        format_bytes(r.expert_bytes_f16),
        format_bytes(r.expert_bytes_f32)
    );
    println!(
        "all experts   {} x: {} in f16/bf16, {} in memory (f32)",
        r.total_experts,
        format_bytes(r.total_experts as u64 * r.expert_bytes_f16),
        format_bytes(r.total_experts as u64 * r.expert_bytes_f32)
    );
    let what = match (r.kv_lora_rank, r.qk_rope_head_dim) {
        (Some(rank), Some(rope)) => {
            format!("latent {rank} + rotary key {rope} per layer")
        }
        _ => "keys and values of every KV head per layer".into(),
    };
    r.kv_cache.print(&what);
}

/// The numbers for the checkpoint at `path`, without a budget (memory needed keeps every expert).
pub fn inspect(path: &Path) -> Result<Inspection> {
    // The experts' bytes in memory come from the engine itself, so that a percentage budget
    // means here what it means to `odmoe run --expert-budget`.
    let (config, total_expert_bytes_in_memory) = open::describe(path)?;
    let stored = if path.is_file() {
        gguf_contents(path, &config)?
    } else if open::is_layout(path) {
        layout_contents(path)?
    } else {
        huggingface_contents(path, &config)?
    };
    Ok(summary(path, &config, stored, total_expert_bytes_in_memory))
}

/// What a checkpoint stores, in its own format's terms.
struct Contents {
    format: &'static str,
    /// `None` for a dense model.
    expert_dtype: Option<String>,
    /// One expert of the first layer with experts.
    expert_bytes_on_disk: u64,
    expert_file_bytes: Option<u64>,
    total_expert_bytes_on_disk: u64,
    base: Bytes,
}

/// Bytes of some tensors: as stored, widened to f32, and in memory.
#[derive(Clone, Copy, Default)]
struct Bytes {
    on_disk: u64,
    f32: u64,
    in_memory: u64,
}

impl Bytes {
    /// A tensor stored in `stored` bytes that takes `f32` bytes widened to f32; the engine holds
    /// it widened when `held_widened`.
    fn add(&mut self, stored: u64, f32: u64, held_widened: bool) {
        self.on_disk += stored;
        self.f32 += f32;
        self.in_memory += if held_widened { f32 } else { stored };
    }
}

/// Distinct type names, as "Q4_K+Q6_K"; `None` when there are none (a dense model).
fn type_mix<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let names: BTreeSet<&str> = names.into_iter().collect();
    (!names.is_empty()).then(|| names.into_iter().collect::<Vec<_>>().join("+"))
}

/// A GGUF file's tensors from its header: the stacked expert tensors of the layers with experts,
/// and the rest.
fn gguf_contents(path: &Path, config: &ModelConfig) -> Result<Contents> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let header = gguf_header::read(&mut BufReader::new(file)).map_err(|message| {
        anyhow::anyhow!("reading the GGUF header of {}: {message}", path.display())
    })?;
    let content = header.content;
    let expert_names: HashSet<String> =
        config.moe_layers().flat_map(stacked_expert_names).collect();
    let first_layer_names = config.moe_layers().next().map(stacked_expert_names);
    let mut expert_types = Vec::new();
    let (mut total_expert_bytes, mut first_layer_bytes) = (0u64, 0u64);
    let mut base = Bytes::default();
    for (name, info) in &content.tensor_infos {
        let elements = info.shape.elem_count();
        let stored = ggml_bytes(info.ggml_dtype, elements).with_context(|| {
            format!(
                "{}: tensor {name:?} of {elements} values does not fill whole {} blocks",
                path.display(),
                ggml_type_name(info.ggml_dtype)
            )
        })? as u64;
        if expert_names.contains(name) {
            expert_types.push(ggml_type_name(info.ggml_dtype));
            total_expert_bytes += stored;
            if first_layer_names.as_ref().is_some_and(|n| n.contains(name)) {
                first_layer_bytes += stored;
            }
        } else {
            // Types of one value per block (F32, F16, BF16) are widened; quantized matrices stay.
            base.add(
                stored,
                elements as u64 * 4,
                info.ggml_dtype.block_size() == 1,
            );
        }
    }
    // MXFP4 experts (gpt-oss's): candle has no type for them.
    for (name, tensor) in &header.others {
        if !expert_names.contains(name) || tensor.ggml_type != gguf_header::MXFP4_TYPE {
            bail!(
                "{}: tensor {name:?} is of ggml type {}, which this version does not read",
                path.display(),
                tensor.ggml_type
            );
        }
        let values: usize = tensor.shape.iter().product();
        let stored = gguf_header::mxfp4_bytes(values) as u64;
        expert_types.push("MXFP4");
        total_expert_bytes += stored;
        if first_layer_names.as_ref().is_some_and(|n| n.contains(name)) {
            first_layer_bytes += stored;
        }
    }
    Ok(Contents {
        format: "gguf",
        expert_dtype: type_mix(expert_types),
        expert_bytes_on_disk: first_layer_bytes
            .checked_div(config.num_experts as u64)
            .unwrap_or(0),
        expert_file_bytes: None,
        total_expert_bytes_on_disk: total_expert_bytes,
        base,
    })
}

/// An odmoe layout's manifest and base files.
fn layout_contents(dir: &Path) -> Result<Contents> {
    let manifest = Manifest::load(dir)?;
    let paths: Vec<PathBuf> = manifest.base_files.iter().map(|f| dir.join(f)).collect();
    let base = HfWeights::open_files(&dir.display().to_string(), &paths, &Device::Cpu)?;
    let config = &manifest.architecture;
    let experts = config.moe_layers().count() * config.num_experts;
    let expert = &manifest.expert;
    let expert_dtype = if expert.dtype == GGUF_DTYPE {
        // Experts kept as GGUF blocks: the ggml types their layers use.
        type_mix(
            config
                .moe_layers()
                .filter_map(|layer| expert.ggml_types.as_ref()?.get(layer))
                .flatten()
                .map(String::as_str),
        )
    } else {
        (experts > 0).then(|| expert.dtype.clone())
    };
    Ok(Contents {
        format: "odmoe",
        expert_dtype,
        expert_bytes_on_disk: expert.weight_bytes(),
        expert_file_bytes: Some(expert.file_bytes),
        total_expert_bytes_on_disk: experts as u64 * expert.weight_bytes(),
        base: tensor_bytes(&base, &base.names())?,
    })
}

/// A Hugging Face checkpoint's safetensors headers: the expert tensors and the rest.
fn huggingface_contents(dir: &Path, config: &ModelConfig) -> Result<Contents> {
    let weights = HfWeights::open(dir, &Device::Cpu)?;
    let mut expert_names = HashSet::new();
    let mut total_disk = 0;
    for layer in config.moe_layers() {
        for expert in 0..config.num_experts {
            for name in expert_tensor_names(config, layer, expert) {
                let name = format!("{name}.weight");
                // A fused expert tensor (gpt-oss's) holds gate and up together: its bytes
                // count once, with the gate.
                let location = weights.location(&name)?;
                if !weights.contains(&name) && name.ends_with(".up_proj.weight") {
                    continue;
                }
                // MXFP4 blocks (OpenAI's checkpoints) come with their exponents.
                total_disk += location.bytes + location.scales.as_ref().map_or(0, |s| s.bytes);
                expert_names.insert(name);
            }
        }
    }
    let (expert_dtype, expert_bytes_on_disk) = match config.moe_layers().next() {
        Some(first) => {
            let names = expert_tensor_names(config, first, 0).map(|n| format!("{n}.weight"));
            let dtype = weights.location(&names[0])?.values_dtype();
            (
                Some(dtype),
                total_disk / (config.moe_layers().count() * config.num_experts) as u64,
            )
        }
        None => (None, 0),
    };
    let base_names: Vec<&str> = weights
        .names()
        .into_iter()
        .filter(|n| !expert_names.contains(*n) && !is_fused_expert_tensor(n))
        .collect();
    Ok(Contents {
        format: "huggingface",
        expert_dtype,
        expert_bytes_on_disk,
        expert_file_bytes: None,
        total_expert_bytes_on_disk: total_disk,
        base: tensor_bytes(&weights, &base_names)?,
    })
}

fn summary(
    path: &Path,
    config: &ModelConfig,
    contents: Contents,
    total_expert_bytes_in_memory: u64,
) -> Inspection {
    let moe_layers = config.moe_layers().count();
    let total_experts = moe_layers * config.num_experts;
    let expert_bytes_f32 = config.expert_f32_bytes() as u64;
    let base = contents.base;
    Inspection {
        path: path.display().to_string(),
        format: contents.format,
        architecture: odmoe_engine::model::model_type(config.architecture),
        layers: config.num_layers,
        moe_layers,
        experts_per_layer: config.num_experts,
        top_k: config.num_experts_per_token,
        hidden_size: config.hidden_size,
        expert_intermediate_size: config.expert_intermediate_size,
        expert_dtype: contents.expert_dtype,
        expert_bytes_on_disk: contents.expert_bytes_on_disk,
        expert_file_bytes: contents.expert_file_bytes,
        expert_bytes_f32,
        expert_bytes_in_memory: total_expert_bytes_in_memory
            .checked_div(total_experts as u64)
            .unwrap_or(0),
        total_experts,
        total_expert_bytes_on_disk: contents.total_expert_bytes_on_disk,
        total_expert_bytes_f32: total_experts as u64 * expert_bytes_f32,
        total_expert_bytes_in_memory,
        base_bytes_on_disk: base.on_disk,
        base_bytes_f32: base.f32,
        base_bytes_in_memory: base.in_memory,
        budget_bytes: None,
        memory_needed_bytes: base.in_memory + total_expert_bytes_in_memory,
        kv_cache: KvCacheSizes::of(config),
    }
}

/// Bytes of the safetensors tensors `names`: float tensors widen to f32, others stay as stored.
fn tensor_bytes(weights: &HfWeights, names: &[&str]) -> Result<Bytes> {
    let mut bytes = Bytes::default();
    for name in names {
        let (dtype, shape, data) = weights.raw(name)?;
        let stored = data.len() as u64;
        match dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                bytes.add(stored, shape.iter().product::<usize>() as u64 * 4, true)
            }
            _ => bytes.add(stored, stored, false),
        }
    }
    Ok(bytes)
}
