//! The plan of a conversion: the source checked completely, and every output file's contents
//! known (which tensors go where, headers, lengths) before anything is written.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;

use super::headers::{BaseFile, base_file, expert_header_json, padded_header};
use super::identity::{gguf_source_json, source_json};
use super::placement::{expert_layout, gguf_expert_layout};
use super::{COPIED_FILES, base_file_of};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::ResidentExperts;
use crate::format::WeightSource;
use crate::format::gguf::{GgufFile, stacked_expert_names};
use crate::format::layout::{ExpertLayout, expert_path};
use crate::format::safetensors::{HfWeights, is_fused_expert_tensor};
use crate::model::{self, BaseGroup, Model};
use crate::tokenizer::Tokenizer;

/// A checked source checkpoint and everything about the output that can be known in advance.
pub(super) struct Plan {
    pub(super) config: ModelConfig,
    pub(super) weights: SourceWeights,
    /// Files copied from the source, with their lengths.
    pub(super) copies: Vec<(&'static str, u64)>,
    /// Files made from the source (a GGUF file's tokenizer), with their contents.
    pub(super) generated: Vec<(&'static str, Vec<u8>)>,
    pub(super) base: Vec<BaseFile>,
    pub(super) expert: ExpertLayout,
    pub(super) expert_dtype: Dtype,
    pub(super) source_json: Vec<u8>,
    pub(super) tensors_total: usize,
}

impl Plan {
    pub(super) fn new(src: &Path) -> Result<Self> {
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
        let config = model::config_from_hf_file(&config_path)?;
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
        let mut groups: BTreeMap<BaseGroup, Vec<String>> = BTreeMap::new();
        for name in weights.names() {
            if expert_names.contains(name)
                || is_fused_expert_tensor(name)
                || config.is_draft_layer_tensor(name)
            {
                continue;
            }
            let Some(group) = model::base_group(&config, name) else {
                return Err(Error::config(
                    weights.path_of(name)?,
                    format!(
                        "tensor {name:?} has no place in the odmoe layout: it is none of the \
                         embedding, attention, norm, router, shared-expert or routed-expert \
                         tensors of a {} model with {} layers and {} experts per layer",
                        model::model_type(config.architecture),
                        config.num_layers,
                        config.num_experts
                    ),
                ));
            };
            groups.entry(group).or_default().push(name.to_string());
        }
        for name in model::required_base_tensors(&config) {
            if !weights.contains(&name) {
                return Err(Error::MissingTensor {
                    name,
                    location: src.display().to_string(),
                });
            }
        }
        let base = groups
            .into_iter()
            .map(|(group, names)| {
                base_file(base_file_of(group), names, |name| {
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
    pub(super) fn from_gguf(src: &Path) -> Result<Self> {
        let gguf = GgufFile::open(src, &Device::Cpu)?;
        let config = model::config_from_gguf(&gguf)?;
        if config.num_experts == 0 {
            return Err(Error::config(
                src,
                "a dense model has no experts to lay out: add --split-experts E --top-k K",
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
        let mut groups: BTreeMap<BaseGroup, Vec<String>> = BTreeMap::new();
        for name in base_shapes.keys() {
            let group = model::base_group(&config, name).ok_or_else(|| {
                Error::config(
                    src,
                    format!("tensor {name:?} has no place in the odmoe layout"),
                )
            })?;
            groups.entry(group).or_default().push(name.clone());
            placed.extend(gguf.sources_in_file(name));
        }
        let unplaced = gguf
            .tensor_names()
            .find(|n| !placed.contains(*n) && !config.is_draft_layer_tensor(n));
        if let Some(unplaced) = unplaced {
            return Err(Error::config(
                src,
                format!(
                    "GGUF tensor {unplaced:?} has no place in the odmoe layout: the {} model \
                     does not load it and it is no routed expert's",
                    model::model_type(config.architecture)
                ),
            ));
        }
        let base = groups
            .into_iter()
            .map(|(group, names)| {
                base_file(base_file_of(group), names, |name| {
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
    pub(super) fn expert_header(&self, layer: usize, expert: usize) -> Result<Vec<u8>> {
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
pub(super) enum SourceWeights {
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
    pub(super) fn base_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
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
    pub(super) fn expert_bytes(
        &self,
        config: &ModelConfig,
        layer: usize,
        expert: usize,
    ) -> Result<[Cow<'_, [u8]>; 3]> {
        let read = |k: usize| -> Result<Cow<'_, [u8]>> {
            match self {
                Self::Hf(weights) => {
                    let name = &expert_weight_names(config, layer, expert)[k];
                    if weights.contains(name) {
                        return Ok(Cow::Borrowed(weights.raw(name)?.2));
                    }
                    // A slice of a fused tensor (gpt-oss's), in the layout's form.
                    let location = weights.location(name)?;
                    let (bytes, scales) = weights.located_bytes(&location)?;
                    let elem = location.dtype.bitsize() / 8;
                    let stored = location
                        .view
                        .stored_bytes(bytes, scales, elem, &location.shape)
                        .map_err(|message| Error::Safetensors {
                            path: location.path.clone(),
                            message: format!("{name}: {message}"),
                        })?;
                    Ok(Cow::Owned(stored))
                }
                Self::Gguf { gguf, reader, .. } => {
                    let slice = gguf.expert_slice(
                        &stacked_expert_names(layer)[k],
                        expert,
                        config.expert_shapes()[k],
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

/// Names of one expert's gate, up and down weights in the source checkpoint.
pub(super) fn expert_weight_names(
    config: &ModelConfig,
    layer: usize,
    expert: usize,
) -> [String; 3] {
    model::expert_tensor_names(config, layer, expert).map(|n| format!("{n}.weight"))
}
