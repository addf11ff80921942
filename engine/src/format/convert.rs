//! `odmoe convert`: a Hugging Face checkpoint directory or a GGUF file to the odmoe layout of
//! [`super::layout`].
//!
//! Everything but the routed experts goes to a few safetensors files under `base_model/`, with the
//! original tensor names and dtypes; every routed expert gets a file of its own whose `gate`, `up`
//! and `down` tensors sit at [`ALIGN`]ed offsets, so that one aligned read fetches it. Every
//! source tensor lands in exactly one place: a tensor the layout has no place for is an error,
//! never dropped.
//!
//! From a GGUF file, experts keep their quantized blocks as they are (U8 tensors, the ggml type of
//! each layer's gate, up and down in the manifest), so that the layout computes exactly what the
//! GGUF read in place computes; the base tensors are written as the f32 values the engine
//! dequantizes them to, under their Hugging Face names, and the tokenizer files are rebuilt from
//! the GGUF vocabulary.
//!
//! Crash safety: each file is written as `NAME.partial`, fsync'd, then renamed to `NAME`, so a file
//! under its final name is complete. A re-run keeps the complete files (re-hashing them for the
//! manifest) and writes the rest. `manifest.json` is written last, the same way, so a directory
//! without it is an unfinished conversion. `source.json`, written first, identifies the source
//! checkpoint, so that a re-run never mixes files of two different checkpoints. Output bytes
//! depend only on the input: converting twice gives identical files and manifests.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::WeightSource;
use super::gguf::{GgufFile, ggml_bytes, ggml_type_name, gguf_name, stacked_expert_names};
use super::layout::{
    self, ExpertLayout, ExpertTensor, FORMAT_VERSION, FileEntry, FileHasher, GGUF_DTYPE, MANIFEST,
    Manifest, SOURCE, expert_path,
};
use super::safetensors::HfWeights;
use crate::error::{Error, Result};
use crate::expert::ResidentExperts;
use crate::model::{Architecture, Model, ModelConfig, expert_tensor_names};
use crate::tokenizer::Tokenizer;

/// Base-model files, in the order they are written (each only when it has tensors).
pub const EMBEDDINGS: &str = "base_model/embeddings.safetensors";
pub const ATTENTION: &str = "base_model/attention_layers.safetensors";
pub const NORMS: &str = "base_model/norms.safetensors";
pub const ROUTERS: &str = "base_model/routers.safetensors";
pub const SHARED_EXPERTS: &str = "base_model/shared_experts.safetensors";
const BASE_FILES: [&str; 5] = [EMBEDDINGS, ATTENTION, NORMS, ROUTERS, SHARED_EXPERTS];

/// Files copied unchanged from the source directory when present.
pub const COPIED_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

const PARTIAL: &str = ".partial";

/// What just happened, in [`ConvertProgress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvertEvent {
    /// One source tensor was written into `file`.
    Tensor,
    /// `file` was written completely and is in place under its final name.
    Written,
    /// `file` was already complete from an earlier run and was kept (and re-hashed).
    Kept,
    /// Part of a kept file was re-hashed.
    Rehash,
}

/// Progress of [`convert`]; counts are totals over the whole conversion.
#[derive(Clone, Debug)]
pub struct ConvertProgress<'a> {
    /// Relative path of the file being written or just finished.
    pub file: &'a str,
    pub event: ConvertEvent,
    pub files_done: usize,
    pub files_total: usize,
    pub tensors_done: usize,
    pub tensors_total: usize,
    /// Bytes of output written or re-hashed so far.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Converts the checkpoint at `src` (a Hugging Face directory or a GGUF file) into an odmoe layout
/// in `out`, resuming an interrupted conversion of the same checkpoint. The source is checked
/// completely before anything is written, so a bad source leaves `out` untouched.
pub fn convert(
    src: &Path,
    out: &Path,
    mut progress: impl FnMut(&ConvertProgress),
) -> Result<Manifest> {
    let plan = if src.is_file() {
        Plan::from_gguf(src)?
    } else {
        Plan::new(src)?
    };
    let mut writer = Writer::new(out, &plan, &mut progress);
    writer.start(&plan.source_json)?;
    for &(name, bytes) in &plan.copies {
        let from = src.join(name);
        writer.produce(name, bytes, 0, |sink| {
            let mut file = File::open(&from).map_err(|e| Error::io(&from, e))?;
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                match file.read(&mut buffer) {
                    Ok(0) => return Ok(()),
                    Ok(n) => sink.write(&buffer[..n])?,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io(&from, e)),
                }
            }
        })?;
    }
    for (name, bytes) in &plan.generated {
        writer.produce(name, bytes.len() as u64, 0, |sink| sink.write(bytes))?;
    }
    for base in &plan.base {
        writer.produce(base.rel, base.file_bytes, base.names.len(), |sink| {
            sink.write(&base.header)?;
            for name in &base.names {
                let bytes = plan.weights.base_bytes(name)?;
                sink.write(&bytes)?;
                sink.tensor_done(bytes.len() as u64);
            }
            Ok(())
        })?;
    }
    let layout = &plan.expert;
    for layer in plan.config.moe_layers() {
        for expert in 0..plan.config.num_experts {
            let rel = expert_path(layer, expert);
            writer.produce(&rel, layout.file_bytes, 3, |sink| {
                sink.write(&plan.expert_header(layer, expert)?)?;
                let mut at = 0;
                let tensors = plan.weights.expert_bytes(&plan.config, layer, expert)?;
                for (tensor, bytes) in layout.tensors.iter().zip(tensors) {
                    sink.zeros(tensor.offset - at)?;
                    sink.write(&bytes)?;
                    sink.tensor_done(bytes.len() as u64);
                    at = tensor.offset + bytes.len() as u64;
                }
                sink.zeros(layout.read_bytes() - at)
            })?;
        }
    }
    writer.finish(&plan)
}

/// A checked source checkpoint and everything about the output that can be known in advance.
struct Plan {
    config: ModelConfig,
    weights: SourceWeights,
    /// Files copied from the source, with their lengths.
    copies: Vec<(&'static str, u64)>,
    /// Files made from the source (a GGUF file's tokenizer), with their contents.
    generated: Vec<(&'static str, Vec<u8>)>,
    base: Vec<BaseFile>,
    expert: ExpertLayout,
    expert_dtype: Dtype,
    source_json: Vec<u8>,
    tensors_total: usize,
}

struct BaseFile {
    rel: &'static str,
    names: Vec<String>,
    /// Length prefix plus padded JSON header.
    header: Vec<u8>,
    file_bytes: u64,
}

impl Plan {
    fn new(src: &Path) -> Result<Self> {
        let config_path = src.join("config.json");
        if !config_path.is_file() {
            return Err(Error::config(
                &config_path,
                format!(
                    "not found: {} is not a Hugging Face checkpoint directory",
                    src.display()
                ),
            ));
        }
        let config = ModelConfig::from_file(&config_path)?;
        if config.num_experts == 0 {
            return Err(Error::config(
                &config_path,
                "a dense model has no experts to lay out: add --split-experts E --top-k K",
            ));
        }
        let weights = HfWeights::open(src, &Device::Cpu)?;
        let mut copies = Vec::new();
        for name in COPIED_FILES {
            let path = src.join(name);
            if path.is_file() {
                copies.push((
                    name,
                    fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len(),
                ));
            }
        }

        let (expert, expert_dtype) = expert_layout(&config, &weights, &config_path)?;
        let mut expert_names = HashSet::new();
        for layer in config.moe_layers() {
            for e in 0..config.num_experts {
                expert_names.extend(expert_weight_names(&config, layer, e));
            }
        }
        let mut groups: [Vec<String>; 5] = Default::default();
        for name in weights.names() {
            if expert_names.contains(name) {
                continue;
            }
            let Some(group) = base_group(&config, name) else {
                return Err(Error::config(
                    weights.path_of(name)?,
                    format!(
                        "tensor {name:?} has no place in the odmoe layout: it is none of the \
                         embedding, attention, norm, router, shared-expert or routed-expert \
                         tensors of a {} model with {} layers and {} experts per layer",
                        config.architecture.model_type(),
                        config.num_layers,
                        config.num_experts
                    ),
                ));
            };
            groups[group].push(name.to_string());
        }
        for name in required_base_tensors(&config) {
            if !weights.contains(&name) {
                return Err(Error::MissingTensor {
                    name,
                    location: src.display().to_string(),
                });
            }
        }
        let base = BASE_FILES
            .into_iter()
            .zip(groups)
            .filter(|(_, names)| !names.is_empty())
            .map(|(rel, names)| {
                base_file(rel, names, |name| {
                    let (dtype, shape, bytes) = weights.raw(name)?;
                    Ok((dtype, shape.to_vec(), bytes.len() as u64))
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let plan = Self {
            source_json: source_json(src, &weights)?,
            tensors_total: weights.names().len(),
            config,
            weights: SourceWeights::Hf(weights),
            copies,
            generated: Vec::new(),
            base,
            expert,
            expert_dtype,
        };
        Ok(plan)
    }

    /// The plan for a GGUF file. The base tensors are the ones the model loads (recorded by
    /// loading it), every other tensor of the file must be a routed expert's.
    fn from_gguf(src: &Path) -> Result<Self> {
        let gguf = GgufFile::open(src, &Device::Cpu)?;
        let config = gguf.model_config()?;
        if config.num_experts == 0 {
            return Err(Error::config(
                src,
                "a dense model has no experts to lay out: add --split-experts E --top-k K",
            ));
        }
        if config.moe_layers().count() != config.num_layers {
            return Err(Error::config(
                src,
                "GGUF models with dense layers between MoE layers are not supported by convert",
            ));
        }
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let recorder = RecordingWeights {
            gguf: &gguf,
            shapes: RefCell::new(BTreeMap::new()),
        };
        Model::load_base(
            config.clone(),
            &recorder,
            Arc::new(ResidentExperts::default()),
        )?;
        let base_shapes = recorder.shapes.into_inner();

        let mut placed: HashSet<String> =
            config.moe_layers().flat_map(stacked_expert_names).collect();
        let mut groups: [Vec<String>; 5] = Default::default();
        for name in base_shapes.keys() {
            let group = base_group(&config, name).ok_or_else(|| {
                Error::config(
                    src,
                    format!("tensor {name:?} has no place in the odmoe layout"),
                )
            })?;
            groups[group].push(name.clone());
            placed.extend(gguf_name(name));
        }
        if let Some(unplaced) = gguf.tensor_names().find(|n| !placed.contains(*n)) {
            return Err(Error::config(
                src,
                format!(
                    "GGUF tensor {unplaced:?} has no place in the odmoe layout: the {} model \
                     does not load it and it is no routed expert's",
                    config.architecture.model_type()
                ),
            ));
        }
        let base = BASE_FILES
            .into_iter()
            .zip(groups)
            .filter(|(_, names)| !names.is_empty())
            .map(|(rel, names)| {
                base_file(rel, names, |name| {
                    let shape = base_shapes[name].clone();
                    let bytes = shape.iter().product::<usize>() as u64 * 4;
                    Ok((Dtype::F32, shape, bytes))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let expert = gguf_expert_layout(&config, &gguf)?;
        let reader = File::open(src).map_err(|e| Error::io(src, e))?;
        let experts = config.moe_layers().count() * config.num_experts;
        Ok(Self {
            source_json: gguf_source_json(src)?,
            tensors_total: base_shapes.len() + 3 * experts,
            generated: tokenizer.hf_files()?,
            copies: Vec::new(),
            weights: SourceWeights::Gguf {
                gguf,
                base_shapes,
                reader,
            },
            config,
            base,
            expert,
            expert_dtype: Dtype::U8,
        })
    }

    /// The length prefix and JSON header of one expert file, padded with spaces so that data
    /// starts at `data_offset`.
    fn expert_header(&self, layer: usize, expert: usize) -> Result<Vec<u8>> {
        let json = expert_header_json(&self.expert, self.expert_dtype, layer, expert);
        let room = (self.expert.data_offset - 8) as usize;
        if json.len() > room {
            // The data offset was sized for the longest header; this would be a bug.
            return Err(Error::config(
                expert_path(layer, expert),
                format!(
                    "expert header of {} bytes does not fit in {room}",
                    json.len()
                ),
            ));
        }
        Ok(padded_header(json, room))
    }
}

/// Where the tensors come from.
enum SourceWeights {
    Hf(HfWeights),
    /// A GGUF file, with the Hugging Face names and shapes the model loads its base tensors by
    /// and the file open for reading experts' blocks.
    Gguf {
        gguf: GgufFile,
        base_shapes: BTreeMap<String, Vec<usize>>,
        reader: File,
    },
}

impl SourceWeights {
    /// The stored bytes of a base tensor: as in the checkpoint, or the f32 values a GGUF tensor
    /// dequantizes to (exactly what the engine computes with when reading the file in place).
    fn base_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        match self {
            Self::Hf(weights) => Ok(Cow::Borrowed(weights.raw(name)?.2)),
            Self::Gguf {
                gguf, base_shapes, ..
            } => {
                let values = gguf
                    .tensor(name, &base_shapes[name])?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(Cow::Owned(
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ))
            }
        }
    }

    /// The stored bytes of one expert's gate, up and down.
    fn expert_bytes(
        &self,
        config: &ModelConfig,
        layer: usize,
        expert: usize,
    ) -> Result<[Cow<'_, [u8]>; 3]> {
        let read = |k: usize| -> Result<Cow<'_, [u8]>> {
            match self {
                Self::Hf(weights) => {
                    let name = &expert_weight_names(config, layer, expert)[k];
                    Ok(Cow::Borrowed(weights.raw(name)?.2))
                }
                Self::Gguf { gguf, reader, .. } => {
                    let slice = gguf.expert_slice(
                        &stacked_expert_names(layer)[k],
                        expert,
                        expert_shapes(config)[k],
                    )?;
                    let mut bytes = vec![0u8; slice.bytes];
                    reader
                        .read_exact_at(&mut bytes, slice.offset)
                        .map_err(|e| Error::io(gguf.path(), e))?;
                    Ok(Cow::Owned(bytes))
                }
            }
        };
        Ok([read(0)?, read(1)?, read(2)?])
    }
}

/// Records the name and shape of every tensor a model loads from a GGUF file.
struct RecordingWeights<'a> {
    gguf: &'a GgufFile,
    shapes: RefCell<BTreeMap<String, Vec<usize>>>,
}

impl WeightSource for RecordingWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.gguf.tensor(name, shape)?;
        self.shapes
            .borrow_mut()
            .insert(name.to_string(), shape.to_vec());
        Ok(tensor)
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf.contains(name)
    }
}

/// `[out, in]` of an expert's gate, up and down.
fn expert_shapes(config: &ModelConfig) -> [[usize; 2]; 3] {
    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    [[i, h], [i, h], [h, i]]
}

/// The layout of experts kept as GGUF blocks: each tensor's slot holds its largest type over the
/// layers, and the manifest records every layer's types.
fn gguf_expert_layout(config: &ModelConfig, gguf: &GgufFile) -> Result<ExpertLayout> {
    let shapes = expert_shapes(config);
    let mut slot_bytes = [0u64; 3];
    let mut ggml_types = Vec::with_capacity(config.num_layers);
    for layer in 0..config.num_layers {
        let names = stacked_expert_names(layer);
        let mut types = Vec::with_capacity(3);
        for k in 0..3 {
            let slice = gguf.expert_slice(&names[k], 0, shapes[k])?;
            slot_bytes[k] = slot_bytes[k].max(slice.bytes as u64);
            types.push(ggml_type_name(slice.dtype).to_string());
        }
        ggml_types.push(types.try_into().expect("three types"));
    }
    let mut tensors = Vec::with_capacity(3);
    let mut end = 0;
    for ((name, shape), bytes) in ["gate", "up", "down"]
        .into_iter()
        .zip(shapes)
        .zip(slot_bytes)
    {
        let offset = layout::align_up(end);
        tensors.push(ExpertTensor {
            name: name.into(),
            offset,
            bytes,
            shape,
        });
        end = offset + bytes;
    }
    let layout = ExpertLayout {
        dtype: GGUF_DTYPE.into(),
        ggml_types: Some(ggml_types),
        file_bytes: 0,
        data_offset: 0,
        tensors: tensors.try_into().expect("three tensors"),
    };
    finish_expert_layout(layout, config, Dtype::U8)
}

/// Names of one expert's gate, up and down weights in the source checkpoint.
fn expert_weight_names(config: &ModelConfig, layer: usize, expert: usize) -> [String; 3] {
    expert_tensor_names(config, layer, expert).map(|n| format!("{n}.weight"))
}

/// Which base file (index into [`BASE_FILES`]) a non-expert tensor belongs to.
fn base_group(config: &ModelConfig, name: &str) -> Option<usize> {
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" | "model.norm.weight" => return Some(0),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let canonical = !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && (layer == "0" || !layer.starts_with('0'));
    if !canonical || layer.parse::<usize>().ok()? >= config.num_layers {
        return None;
    }
    let qwen = matches!(
        config.architecture,
        Architecture::Qwen2Moe | Architecture::Qwen3Moe
    );
    let deepseek = config.architecture == Architecture::DeepseekV3;
    if rest.starts_with("self_attn.") {
        Some(1)
    } else if rest.starts_with("input_layernorm.") || rest.starts_with("post_attention_layernorm.")
    {
        Some(2)
    } else if ((qwen || deepseek) && rest.starts_with("mlp.gate."))
        || (matches!(
            config.architecture,
            Architecture::Mixtral | Architecture::SplitLlama
        ) && rest.starts_with("block_sparse_moe.gate."))
    {
        Some(3)
    } else if config.shared_expert_intermediate_size.is_some()
        && (rest.starts_with("mlp.shared_expert.") || rest.starts_with("mlp.shared_expert_gate."))
    {
        Some(4)
    } else if deepseek
        && (rest.starts_with("mlp.shared_experts.")
            || ["mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj."]
                .iter()
                .any(|p| rest.starts_with(p)))
    {
        // Feed-forwards that always run: shared experts, and the dense first layers.
        Some(4)
    } else {
        None
    }
}

/// Tensors without which the layout could not run, checked so that a broken source fails here.
fn required_base_tensors(config: &ModelConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for layer in config.moe_layers() {
        names.push(match config.architecture {
            Architecture::Mixtral | Architecture::SplitLlama => {
                format!("model.layers.{layer}.block_sparse_moe.gate.weight")
            }
            _ => format!("model.layers.{layer}.mlp.gate.weight"),
        });
    }
    names
}

/// The common layout of every expert file, after checking every expert tensor's dtype and shape.
fn expert_layout(
    config: &ModelConfig,
    weights: &HfWeights,
    config_path: &Path,
) -> Result<(ExpertLayout, Dtype)> {
    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    let shapes = [[i, h], [i, h], [h, i]];
    let mut dtype = None;
    for layer in config.moe_layers() {
        for e in 0..config.num_experts {
            for (name, shape) in expert_weight_names(config, layer, e).iter().zip(shapes) {
                let (found, actual, _) = weights.raw(name)?;
                let path = weights.path_of(name)?;
                if actual != shape {
                    return Err(Error::TensorShape {
                        name: name.clone(),
                        path: path.to_path_buf(),
                        actual: actual.to_vec(),
                        expected: shape.to_vec(),
                    });
                }
                if !matches!(found, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    return Err(Error::Safetensors {
                        path: path.to_path_buf(),
                        message: format!(
                            "expert tensor {name:?} has dtype {found}; supported: F32, F16, BF16"
                        ),
                    });
                }
                match dtype {
                    None => dtype = Some(found),
                    Some(first) if first != found => {
                        return Err(Error::Safetensors {
                            path: path.to_path_buf(),
                            message: format!(
                                "expert tensor {name:?} is {found} while earlier experts are \
                                 {first}; a layout stores all experts in one dtype"
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
    }
    let dtype = dtype.ok_or_else(|| {
        Error::config(
            config_path,
            "the model has no routed experts (num_hidden_layers or num_experts is 0)",
        )
    })?;
    let elem = layout::dtype_bytes(&dtype.to_string()).expect("checked above");
    let mut tensors = Vec::with_capacity(3);
    let mut end = 0;
    for (name, shape) in ["gate", "up", "down"].into_iter().zip(shapes) {
        let offset = layout::align_up(end);
        let bytes = (shape[0] * shape[1]) as u64 * elem;
        tensors.push(ExpertTensor {
            name: name.into(),
            offset,
            bytes,
            shape,
        });
        end = offset + bytes;
    }
    let layout = ExpertLayout {
        dtype: dtype.to_string(),
        ggml_types: None,
        file_bytes: 0,
        data_offset: 0,
        tensors: tensors.try_into().expect("three tensors"),
    };
    Ok((finish_expert_layout(layout, config, dtype)?, dtype))
}

/// Sizes the header room and the files of `layout`, whose tensors are placed, and checks it.
fn finish_expert_layout(
    mut layout: ExpertLayout,
    config: &ModelConfig,
    dtype: Dtype,
) -> Result<ExpertLayout> {
    // The data offset must hold the longest header of any expert file (their metadata differ
    // only in the layer and expert numbers, and for GGUF blocks in the tensors' lengths).
    let mut longest = 0;
    for layer in config.moe_layers() {
        for e in 0..config.num_experts {
            longest = longest.max(expert_header_json(&layout, dtype, layer, e).len());
        }
    }
    let last = &layout.tensors[2];
    layout.data_offset = layout::align_up(8 + longest as u64);
    layout.file_bytes = layout.data_offset + layout::align_up(last.offset + last.bytes);
    layout
        .check(config)
        .map_err(|m| Error::config("experts", m))?;
    Ok(layout)
}

/// The JSON header of one expert file (unpadded): gate, up, down and the `_pad_N` U8 tensors
/// that fill the gaps between them and up to the end of the file, in offset order. Experts kept as
/// GGUF blocks are U8 tensors of their layer's length.
fn expert_header_json(layout: &ExpertLayout, dtype: Dtype, layer: usize, expert: usize) -> String {
    let ggml_types = layout.ggml_types(layer);
    let mut json = format!(
        "{{\"__metadata__\":{{\"format\":\"odmoe\",\"layer\":\"{layer}\",\"expert\":\"{expert}\"}}"
    );
    let mut at = 0;
    let mut pads = 0;
    let mut pad = |json: &mut String, from: u64, to: u64| {
        if to > from {
            json.push_str(&tensor_json(
                &format!("_pad_{pads}"),
                Dtype::U8,
                &[(to - from) as usize],
                from,
                to,
            ));
            pads += 1;
        }
    };
    for (k, tensor) in layout.tensors.iter().enumerate() {
        pad(&mut json, at, tensor.offset);
        let stored = ggml_types.map(|types| {
            ggml_bytes(types[k], tensor.shape[0] * tensor.shape[1]).unwrap_or(0) as u64
        });
        let (dtype, shape, bytes) = match stored {
            Some(bytes) => (Dtype::U8, vec![bytes as usize], bytes),
            None => (dtype, tensor.shape.to_vec(), tensor.bytes),
        };
        json.push_str(&tensor_json(
            &tensor.name,
            dtype,
            &shape,
            tensor.offset,
            tensor.offset + bytes,
        ));
        at = tensor.offset + bytes;
    }
    let last = &layout.tensors[2];
    pad(&mut json, at, layout::align_up(last.offset + last.bytes));
    json.push('}');
    json
}

/// `,"name":{"dtype":..,"shape":[..],"data_offsets":[start,end]}`
fn tensor_json(name: &str, dtype: Dtype, shape: &[usize], start: u64, end: u64) -> String {
    let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!(
        ",{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
        serde_json::to_string(name).expect("a string serialises"),
        shape.join(",")
    )
}

/// The 8-byte little-endian header length followed by `json` padded with spaces to `room` bytes.
fn padded_header(json: String, room: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(8 + room);
    header.extend_from_slice(&(room as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    header.resize(8 + room, b' ');
    header
}

/// A base file: its tensors in name order, the header padded to a multiple of 8 bytes as the
/// safetensors library writes it. `stored` gives a tensor's dtype, shape and length as written.
fn base_file(
    rel: &'static str,
    names: Vec<String>,
    stored: impl Fn(&str) -> Result<(Dtype, Vec<usize>, u64)>,
) -> Result<BaseFile> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut at = 0u64;
    for name in &names {
        let (dtype, shape, bytes) = stored(name)?;
        let end = at + bytes;
        json.push_str(&tensor_json(name, dtype, &shape, at, end));
        at = end;
    }
    json.push('}');
    let room = json.len().next_multiple_of(8);
    let header = padded_header(json, room);
    Ok(BaseFile {
        rel,
        names,
        file_bytes: header.len() as u64 + at,
        header,
    })
}

/// `source.json`: what identifies the source checkpoint, cheaply. The config's SHA-256, and for
/// each weight file its name, length, and the SHA-256 of its header plus 16 evenly spaced 64 KiB
/// samples of its data (the whole file when small), which tells apart two fine-tunes of one
/// model without reading all of either.
fn source_json(src: &Path, weights: &HfWeights) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Source {
        format: &'static str,
        format_version: u32,
        config_sha256: String,
        weights: Vec<WeightFile>,
    }
    #[derive(Serialize)]
    struct WeightFile {
        file: String,
        bytes: u64,
        sampled_sha256: String,
    }
    let config_path = src.join("config.json");
    let config = fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut files = Vec::new();
    for path in weights.files() {
        let (bytes, sampled_sha256) = sampled_sha256(path)?;
        files.push(WeightFile {
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            sampled_sha256,
        });
    }
    files.sort_by(|a, b| a.file.cmp(&b.file));
    let source = Source {
        format: "odmoe-source",
        format_version: FORMAT_VERSION,
        config_sha256: layout::hex(&Sha256::digest(&config)),
        weights: files,
    };
    let mut text = serde_json::to_string_pretty(&source).expect("serialises");
    text.push('\n');
    Ok(text.into_bytes())
}

/// `source.json` of a GGUF file: its name, length and sampled SHA-256 (see [`source_json`]).
fn gguf_source_json(src: &Path) -> Result<Vec<u8>> {
    let (bytes, sampled_sha256) = sampled_sha256(src)?;
    let source = serde_json::json!({
        "format": "odmoe-source",
        "format_version": FORMAT_VERSION,
        "gguf": {
            "file": src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            "bytes": bytes,
            "sampled_sha256": sampled_sha256,
        },
    });
    let mut text = serde_json::to_string_pretty(&source).expect("serialises");
    text.push('\n');
    Ok(text.into_bytes())
}

/// A file's length and the SHA-256 of its start (a safetensors header, or the first 16 MiB of
/// anything else, which holds a GGUF file's metadata) and 16 evenly spaced 64 KiB samples; of the
/// whole file when it is small.
fn sampled_sha256(path: &Path) -> Result<(u64, String)> {
    const SAMPLES: u64 = 16;
    const SAMPLE: u64 = 64 << 10;
    let io = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut hasher = Sha256::new();
    let mut read_at = |file: &mut File, at: u64, n: u64| -> Result<()> {
        let mut buffer = vec![0u8; n as usize];
        file.seek(SeekFrom::Start(at)).map_err(io)?;
        file.read_exact(&mut buffer).map_err(io)?;
        hasher.update(&buffer);
        Ok(())
    };
    if len <= SAMPLES * SAMPLE * 2 {
        read_at(&mut file, 0, len)?;
    } else {
        const START: u64 = 16 << 20;
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix).map_err(io)?;
        let header = if &prefix[..4] == b"GGUF" {
            START
        } else {
            8 + u64::from_le_bytes(prefix)
        }
        .min(len);
        read_at(&mut file, 0, header)?;
        for k in 0..SAMPLES {
            read_at(&mut file, k * (len - SAMPLE) / (SAMPLES - 1), SAMPLE)?;
        }
    }
    Ok((len, layout::hex(&hasher.finalize())))
}

/// Writes output files crash-safely and keeps the counts for progress and the manifest.
struct Writer<'p> {
    out: PathBuf,
    files: BTreeMap<String, FileEntry>,
    counts: Counts,
    progress: &'p mut dyn FnMut(&ConvertProgress),
}

#[derive(Clone, Copy, Default)]
struct Counts {
    files_done: usize,
    files_total: usize,
    tensors_done: usize,
    tensors_total: usize,
    bytes_done: u64,
    bytes_total: u64,
}

impl Counts {
    fn report(&self, file: &str, event: ConvertEvent, progress: &mut dyn FnMut(&ConvertProgress)) {
        progress(&ConvertProgress {
            file,
            event,
            files_done: self.files_done,
            files_total: self.files_total,
            tensors_done: self.tensors_done,
            tensors_total: self.tensors_total,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
        });
    }
}

impl<'p> Writer<'p> {
    fn new(out: &Path, plan: &Plan, progress: &'p mut dyn FnMut(&ConvertProgress)) -> Self {
        let experts = (plan.config.moe_layers().count() * plan.config.num_experts) as u64;
        let copied: u64 = plan.copies.iter().map(|&(_, bytes)| bytes).sum();
        let counts = Counts {
            files_total: 1 + plan.copies.len() + plan.base.len() + experts as usize,
            tensors_total: plan.tensors_total,
            bytes_total: plan.source_json.len() as u64
                + copied
                + plan.base.iter().map(|b| b.file_bytes).sum::<u64>()
                + experts * plan.expert.file_bytes,
            ..Counts::default()
        };
        Self {
            out: out.to_path_buf(),
            files: BTreeMap::new(),
            counts,
            progress,
        }
    }

    /// Claims `out` for this source: a new or empty directory gets `source.json`; one that has
    /// it already must have been started from the same checkpoint.
    fn start(&mut self, source_json: &[u8]) -> Result<()> {
        let out = &self.out;
        if out.exists() && !out.is_dir() {
            return Err(Error::config(out, "exists and is not a directory"));
        }
        fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let source = out.join(SOURCE);
        if source.exists() {
            let existing = fs::read(&source).map_err(|e| Error::io(&source, e))?;
            if existing != source_json {
                return Err(Error::config(
                    out,
                    format!(
                        "holds a conversion of a different checkpoint ({SOURCE} differs); \
                         remove it or choose another output directory"
                    ),
                ));
            }
        } else {
            let leftover = format!("{SOURCE}{PARTIAL}");
            for entry in fs::read_dir(out).map_err(|e| Error::io(out, e))? {
                let entry = entry.map_err(|e| Error::io(out, e))?;
                if entry.file_name().to_str() != Some(leftover.as_str()) {
                    return Err(Error::config(
                        out,
                        format!(
                            "is not empty and holds no conversion in progress (no {SOURCE}); \
                             remove it or choose another output directory"
                        ),
                    ));
                }
            }
        }
        self.produce(SOURCE, source_json.len() as u64, 0, |sink| {
            sink.write(source_json)
        })?;
        for dir in ["base_model", "experts"] {
            let dir = self.out.join(dir);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        sync_dir(&self.out)
    }

    /// Makes `rel` exist complete: kept if already there with the expected length, else written
    /// by `write` to `rel.partial`, synced and renamed.
    fn produce(
        &mut self,
        rel: &str,
        expected: u64,
        tensors: usize,
        write: impl FnOnce(&mut Sink) -> Result<()>,
    ) -> Result<()> {
        let path = self.out.join(rel);
        let start = self.counts.bytes_done;
        let kept = match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == expected => true,
            // A file of the wrong length under a final name cannot come from an interrupted
            // conversion; it is replaced.
            Ok(_) => {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let entry = if kept {
            let (counts, progress) = (&mut self.counts, &mut *self.progress);
            let entry = layout::hash_file(&path, |n| {
                counts.bytes_done += n;
                counts.report(rel, ConvertEvent::Rehash, progress);
            })?;
            self.counts.tensors_done += tensors;
            entry
        } else {
            let partial = self.out.join(format!("{rel}{PARTIAL}"));
            let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
            let mut sink = Sink {
                out: BufWriter::with_capacity(1 << 20, file),
                hasher: FileHasher::default(),
                path: &partial,
                rel,
                counts: &mut self.counts,
                progress: &mut *self.progress,
            };
            write(&mut sink)?;
            let entry = sink.hasher.finish();
            let file = sink
                .out
                .into_inner()
                .map_err(|e| Error::io(&partial, e.into_error()))?;
            if entry.bytes != expected {
                return Err(Error::config(
                    &partial,
                    format!(
                        "wrote {} bytes where the layout needs {expected}",
                        entry.bytes
                    ),
                ));
            }
            file.sync_all().map_err(|e| Error::io(&partial, e))?;
            drop(file);
            fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
            sync_dir(path.parent().unwrap_or(&self.out))?;
            entry
        };
        self.counts.bytes_done = start + expected;
        self.counts.files_done += 1;
        let event = if kept {
            ConvertEvent::Kept
        } else {
            ConvertEvent::Written
        };
        self.counts.report(rel, event, self.progress);
        self.files.insert(rel.to_string(), entry);
        Ok(())
    }

    /// Removes leftover partial files, then writes the manifest last (unless an identical one is
    /// already in place).
    fn finish(self, plan: &Plan) -> Result<Manifest> {
        for dir in [
            self.out.clone(),
            self.out.join("base_model"),
            self.out.join("experts"),
        ] {
            for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                if path.extension().is_some_and(|ext| ext == &PARTIAL[1..]) {
                    fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        let manifest = Manifest {
            format: "odmoe".into(),
            format_version: FORMAT_VERSION,
            architecture: plan.config.clone(),
            tokenizer: plan
                .copies
                .iter()
                .map(|&(name, _)| name)
                .chain(plan.generated.iter().map(|&(name, _)| name))
                .any(|name| name == "tokenizer.json")
                .then(|| "tokenizer.json".to_string()),
            base_files: plan.base.iter().map(|b| b.rel.to_string()).collect(),
            expert: plan.expert.clone(),
            files: self.files,
        };
        manifest
            .check()
            .map_err(|m| Error::config(self.out.join(MANIFEST), m))?;
        let text = manifest.to_json();
        let path = self.out.join(MANIFEST);
        if fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
            let partial = self.out.join(format!("{MANIFEST}{PARTIAL}"));
            let mut file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io(&partial, e))?;
            drop(file);
            fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
            sync_dir(&self.out)?;
        }
        Ok(manifest)
    }
}

/// Makes a rename durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The open `.partial` file a producer writes into, hashing as it goes.
struct Sink<'a> {
    out: BufWriter<File>,
    hasher: FileHasher,
    path: &'a Path,
    rel: &'a str,
    counts: &'a mut Counts,
    progress: &'a mut dyn FnMut(&ConvertProgress),
}

impl Sink<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(self.path, e))?;
        self.hasher.update(bytes);
        Ok(())
    }

    fn zeros(&mut self, n: u64) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = n;
        while left > 0 {
            let chunk = left.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..chunk])?;
            left -= chunk as u64;
        }
        Ok(())
    }

    fn tensor_done(&mut self, bytes: u64) {
        self.counts.tensors_done += 1;
        self.counts.bytes_done += bytes;
        self.counts
            .report(self.rel, ConvertEvent::Tensor, self.progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_header_covers_the_file_without_holes() {
        let layout = ExpertLayout {
            dtype: "BF16".into(),
            ggml_types: None,
            file_bytes: 4096 * 5,
            data_offset: 4096,
            tensors: [
                ExpertTensor {
                    name: "gate".into(),
                    offset: 0,
                    bytes: 3000,
                    shape: [30, 50],
                },
                ExpertTensor {
                    name: "up".into(),
                    offset: 4096,
                    bytes: 3000,
                    shape: [30, 50],
                },
                ExpertTensor {
                    name: "down".into(),
                    offset: 8192,
                    bytes: 3000,
                    shape: [50, 30],
                },
            ],
        };
        let json = expert_header_json(&layout, Dtype::BF16, 3, 17);
        let mut file = padded_header(json, 4096 - 8);
        file.resize(4096 * 4, 0);
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let mut names = st.names();
        names.sort_unstable();
        assert_eq!(names, ["_pad_0", "_pad_1", "_pad_2", "down", "gate", "up"]);
        assert_eq!(
            st.tensor("_pad_2").unwrap().data().len(),
            4096 * 3 - 8192 - 3000
        );
        let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta["layer"], "3");
        assert_eq!(meta["expert"], "17");
    }

    #[test]
    fn tensors_are_placed_by_name() {
        let config: ModelConfig = ModelConfig::from_json(
            r#"{"model_type":"qwen2_moe","vocab_size":16,"hidden_size":8,"num_hidden_layers":2,
            "num_attention_heads":2,"rope_theta":1e4,"num_experts":4,"num_experts_per_tok":2,
            "moe_intermediate_size":4,"shared_expert_intermediate_size":8}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let group = |name| base_group(&config, name);
        assert_eq!(group("lm_head.weight"), Some(0));
        assert_eq!(group("model.layers.1.self_attn.q_proj.bias"), Some(1));
        assert_eq!(
            group("model.layers.0.post_attention_layernorm.weight"),
            Some(2)
        );
        assert_eq!(group("model.layers.1.mlp.gate.weight"), Some(3));
        assert_eq!(
            group("model.layers.1.mlp.shared_expert_gate.weight"),
            Some(4)
        );
        assert_eq!(
            group("model.layers.1.mlp.shared_expert.up_proj.weight"),
            Some(4)
        );
        // Beyond the configured layers, other architectures' names, or unknown: no place.
        assert_eq!(group("model.layers.2.self_attn.q_proj.weight"), None);
        assert_eq!(group("model.layers.01.self_attn.q_proj.weight"), None);
        assert_eq!(group("model.layers.0.block_sparse_moe.gate.weight"), None);
        assert_eq!(group("model.layers.0.mlp.gate_proj.weight"), None);
        assert_eq!(group("model.vision_tower.weight"), None);
    }
}
