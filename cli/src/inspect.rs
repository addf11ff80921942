//! `odmoe inspect`: a model's shape, its expert sizes, its KV cache per token, and the memory it
//! needs with an expert budget. Works on a Hugging Face checkpoint directory, on an odmoe layout,
//! and on a bare `config.json` (sizes computed from the config alone, no weights read).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;
use odmoe_engine::format::layout::{MANIFEST, Manifest, SOURCE};
use odmoe_engine::format::safetensors::HfWeights;
use odmoe_engine::format::size::{format_bytes, parse_budget};
use odmoe_engine::model::{ModelConfig, expert_tensor_names};
use safetensors::Dtype;
use serde::Serialize;

#[derive(Args)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint directory, an odmoe layout (MODEL.odmoe), or a config.json.
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Expert budget: bytes with a unit (64MiB, 1.5GB, 8G) or a percentage of all experts' f32
    /// size (25%). Without it, the memory shown keeps every expert resident.
    #[arg(long, value_name = "SIZE|PCT")]
    budget: Option<String>,
    /// Print the numbers as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// What `inspect` reports; byte counts are exact.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    /// "huggingface" or "odmoe".
    pub format: &'static str,
    pub architecture: &'static str,
    pub layers: usize,
    pub experts_per_layer: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub expert_intermediate_size: usize,
    /// Stored dtype of the expert weights.
    pub expert_dtype: String,
    /// One expert's gate, up and down weights as stored.
    pub expert_bytes_on_disk: u64,
    /// One expert file of an odmoe layout, padding included (what one read fetches).
    pub expert_file_bytes: Option<u64>,
    /// One expert's weights in memory, as f32.
    pub expert_bytes_f32: u64,
    pub total_experts: usize,
    pub total_expert_bytes_on_disk: u64,
    pub total_expert_bytes_f32: u64,
    /// Everything but the routed experts, as stored and as f32 in memory.
    pub base_bytes_on_disk: u64,
    pub base_bytes_f32: u64,
    /// The parsed budget, when one was given.
    pub budget_bytes: Option<u64>,
    /// base_bytes_f32 plus the budget (or all experts without one); the KV cache and
    /// activations come on top.
    pub memory_needed_bytes: u64,
    /// KV cache bytes per token as the engine holds it (f32).
    pub kv_cache_bytes_per_token: u64,
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
    /// KV cache bytes per token with 16-bit elements (the usual serving size) and with f32 (as
    /// this engine holds it).
    pub kv_cache_bytes_per_token_f16: u64,
    pub kv_cache_bytes_per_token_f32: u64,
}

pub fn run(args: InspectArgs) -> Result<()> {
    if args.model.is_file() {
        if args.budget.is_some() {
            bail!("--budget needs a checkpoint or layout, not a config.json alone");
        }
        let report = inspect_config(&args.model)
            .with_context(|| format!("inspecting {}", args.model.display()))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_config(&report);
        }
        return Ok(());
    }
    let mut report =
        inspect(&args.model).with_context(|| format!("inspecting {}", args.model.display()))?;
    if let Some(text) = &args.budget {
        let budget = parse_budget(text, report.total_expert_bytes_f32)?;
        report.budget_bytes = Some(budget);
        report.memory_needed_bytes = report.base_bytes_f32 + budget;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let r = &report;
    let kind = match r.format {
        "odmoe" => "odmoe layout",
        _ => "Hugging Face checkpoint",
    };
    println!("model         {} ({kind})", r.path);
    println!(
        "architecture  {}: {} layers, {} experts per layer, top-{}, hidden {}, expert width {}",
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
        "one expert    {} on disk ({}){file}, {} in memory (f32)",
        format_bytes(r.expert_bytes_on_disk),
        r.expert_dtype,
        format_bytes(r.expert_bytes_f32)
    );
    println!(
        "all experts   {} x: {} on disk, {} in memory (f32)",
        r.total_experts,
        format_bytes(r.total_expert_bytes_on_disk),
        format_bytes(r.total_expert_bytes_f32)
    );
    println!(
        "base model    {} on disk, {} in memory (f32)",
        format_bytes(r.base_bytes_on_disk),
        format_bytes(r.base_bytes_f32)
    );
    println!(
        "KV cache      {} bytes per token (f32)",
        r.kv_cache_bytes_per_token
    );
    match r.budget_bytes {
        Some(budget) => {
            println!(
                "budget        {} ({:.1}% of all experts, about {} experts)",
                format_bytes(budget),
                100.0 * budget as f64 / r.total_expert_bytes_f32 as f64,
                budget / r.expert_bytes_f32.max(1)
            );
            println!(
                "memory        {} = base (f32) + budget, plus KV cache and activations",
                format_bytes(r.memory_needed_bytes)
            );
        }
        None => println!(
            "memory        {} = base (f32) + all experts (f32), plus KV cache and activations; \
             --budget gives less",
            format_bytes(r.memory_needed_bytes)
        ),
    }
    Ok(())
}

/// The sizes that follow from the config.json at `path`.
pub fn inspect_config(path: &Path) -> Result<ConfigInspection> {
    let config = ModelConfig::from_file(path)?;
    let expert_bytes_f32 = config.expert_f32_bytes() as u64;
    let latent = config.deepseek.as_ref().map(|d| &d.attention);
    let moe_layers = config.moe_layers().count();
    Ok(ConfigInspection {
        path: path.display().to_string(),
        architecture: config.architecture.model_type(),
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
        kv_cache_bytes_per_token_f16: config.kv_cache_bytes_per_token(2) as u64,
        kv_cache_bytes_per_token_f32: config.kv_cache_bytes_per_token(4) as u64,
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
    println!(
        "KV cache      {} bytes per token in f16 ({} in f32): {what}",
        r.kv_cache_bytes_per_token_f16, r.kv_cache_bytes_per_token_f32
    );
}

/// The numbers for `dir`, without a budget (memory needed keeps every expert).
pub fn inspect(dir: &Path) -> Result<Inspection> {
    let device = Device::Cpu;
    if dir.join(MANIFEST).exists() || dir.join(SOURCE).exists() {
        let manifest = Manifest::load(dir)?;
        let paths: Vec<PathBuf> = manifest.base_files.iter().map(|f| dir.join(f)).collect();
        let base = HfWeights::open_files(&dir.display().to_string(), &paths, &device)?;
        let (base_disk, base_f32) = tensor_bytes(&base, &base.names())?;
        let config = &manifest.architecture;
        let experts = config.moe_layers().count() * config.num_experts;
        Ok(summary(
            dir,
            "odmoe",
            config,
            manifest.expert.dtype.clone(),
            manifest.expert.weight_bytes(),
            Some(manifest.expert.file_bytes),
            experts as u64 * manifest.expert.weight_bytes(),
            (base_disk, base_f32),
        ))
    } else if dir.join("config.json").exists() {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = HfWeights::open(dir, &device)?;
        let mut expert_names = HashSet::new();
        let mut total_disk = 0;
        for layer in config.moe_layers() {
            for expert in 0..config.num_experts {
                for name in expert_tensor_names(&config, layer, expert) {
                    let name = format!("{name}.weight");
                    total_disk += weights.raw(&name)?.2.len() as u64;
                    expert_names.insert(name);
                }
            }
        }
        let first = config
            .moe_layers()
            .next()
            .context("the model has no routed experts")?;
        let names = expert_tensor_names(&config, first, 0).map(|n| format!("{n}.weight"));
        let dtype = weights.raw(&names[0])?.0.to_string();
        let (one_disk, _) = tensor_bytes(
            &weights,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let base_names: Vec<&str> = weights
            .names()
            .into_iter()
            .filter(|n| !expert_names.contains(*n))
            .collect();
        let base = tensor_bytes(&weights, &base_names)?;
        Ok(summary(
            dir,
            "huggingface",
            &config,
            dtype,
            one_disk,
            None,
            total_disk,
            base,
        ))
    } else {
        bail!(
            "{}: neither a Hugging Face checkpoint (no config.json) nor an odmoe layout (no {MANIFEST})",
            dir.display()
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn summary(
    dir: &Path,
    format: &'static str,
    config: &ModelConfig,
    expert_dtype: String,
    expert_bytes_on_disk: u64,
    expert_file_bytes: Option<u64>,
    total_expert_bytes_on_disk: u64,
    (base_bytes_on_disk, base_bytes_f32): (u64, u64),
) -> Inspection {
    let total_experts = config.moe_layers().count() * config.num_experts;
    let expert_bytes_f32 = config.expert_f32_bytes() as u64;
    let total_expert_bytes_f32 = total_experts as u64 * expert_bytes_f32;
    Inspection {
        path: dir.display().to_string(),
        format,
        architecture: config.architecture.model_type(),
        layers: config.num_layers,
        experts_per_layer: config.num_experts,
        top_k: config.num_experts_per_token,
        hidden_size: config.hidden_size,
        expert_intermediate_size: config.expert_intermediate_size,
        expert_dtype,
        expert_bytes_on_disk,
        expert_file_bytes,
        expert_bytes_f32,
        total_experts,
        total_expert_bytes_on_disk,
        total_expert_bytes_f32,
        base_bytes_on_disk,
        base_bytes_f32,
        budget_bytes: None,
        memory_needed_bytes: base_bytes_f32 + total_expert_bytes_f32,
        kv_cache_bytes_per_token: config.kv_cache_bytes_per_token(4) as u64,
    }
}

/// Stored bytes and in-memory bytes of `names`: float tensors widen to f32, others stay as is.
fn tensor_bytes(weights: &HfWeights, names: &[&str]) -> Result<(u64, u64)> {
    let (mut disk, mut memory) = (0u64, 0u64);
    for name in names {
        let (dtype, shape, bytes) = weights.raw(name)?;
        disk += bytes.len() as u64;
        memory += match dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                shape.iter().product::<usize>() as u64 * 4
            }
            _ => bytes.len() as u64,
        };
    }
    Ok((disk, memory))
}
