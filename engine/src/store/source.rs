//! Cold-tier readers: where experts come from when they are not in the working set.
//!
//! - [`LayoutSource`]: the odmoe layout, one aligned read of one file per expert (dense values, or
//!   GGUF blocks multiplied as they are, exactly as [`GgufSource`] does).
//! - [`HfSource`]: a Hugging Face safetensors checkpoint read in place, by offsets from its headers.
//! - [`GgufSource`]: a GGUF file read in place, one slice of each stacked expert tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use safetensors::tensor::Dtype;
use sha2::{Digest, Sha256};

use super::fetch;
use crate::error::{Error, Result};
use crate::format::gguf::{ExpertSlice, GgufFile, ggml_bytes, stacked_expert_names};
use crate::format::layout::{ExpertLayout, GGUF_DTYPE, Manifest, expert_path};
use crate::format::safetensors::{HfWeights, TensorLocation, f32_tensor};
use crate::model::layers::GluMlp;
use crate::model::{ModelConfig, expert_tensor_names};

/// Reads experts from cold storage.
pub trait ExpertSource: Send + Sync {
    /// Reads one expert: its weights in f32, and how many bytes were read from storage.
    fn read(&self, layer: usize, expert: usize) -> Result<(GluMlp, u64)>;
    /// Bytes one expert holds in memory once read (the unit of the budget).
    fn expert_bytes(&self) -> u64;
}

/// Bytes of one expert in memory: three f32 matrices.
fn f32_expert_bytes(config: &ModelConfig) -> u64 {
    3 * (config.hidden_size * config.expert_intermediate_size * 4) as u64
}

fn parse_dtype(name: &str) -> Option<Dtype> {
    match name {
        "F32" => Some(Dtype::F32),
        "F16" => Some(Dtype::F16),
        "BF16" => Some(Dtype::BF16),
        _ => None,
    }
}

/// How a layout stores its expert tensors.
enum ExpertEncoding {
    /// Dense values, widened to f32 when read.
    Dense(Dtype),
    /// GGUF blocks, by layer: the ggml types of gate, up and down.
    Ggml(Vec<[GgmlDType; 3]>),
}

/// Experts of an odmoe layout: `experts/layer_LL_expert_EEE.safetensors`.
pub struct LayoutSource {
    dir: PathBuf,
    layout: ExpertLayout,
    encoding: ExpertEncoding,
    /// sha256 of each expert file by relative path, when reads are verified.
    checksums: Option<HashMap<String, String>>,
    bypass_cache: bool,
    expert_bytes: u64,
    device: Device,
}

impl LayoutSource {
    pub fn new(
        dir: &Path,
        manifest: &Manifest,
        verify: bool,
        bypass_cache: bool,
        device: &Device,
    ) -> Result<Self> {
        let layout = manifest.expert.clone();
        let unsupported = |what: String| Error::config(dir.join("manifest.json"), what);
        let encoding = if layout.dtype == GGUF_DTYPE {
            let types = (0..manifest.architecture.num_layers)
                .map(|layer| {
                    layout.ggml_types(layer).ok_or_else(|| {
                        unsupported(format!("no known ggml types for layer {layer}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            ExpertEncoding::Ggml(types)
        } else {
            ExpertEncoding::Dense(parse_dtype(&layout.dtype).ok_or_else(|| {
                unsupported(format!("unsupported expert dtype {:?}", layout.dtype))
            })?)
        };
        let expert_bytes = match &encoding {
            ExpertEncoding::Dense(_) => f32_expert_bytes(&manifest.architecture),
            // As GgufSource counts them: the first layer's slices as they sit in memory.
            ExpertEncoding::Ggml(types) => (0..3)
                .map(|k| ggml_slice(&layout, types, 0, k).bytes_in_memory() as u64)
                .sum(),
        };
        let checksums = verify.then(|| {
            manifest
                .files
                .iter()
                .filter(|(path, _)| path.starts_with("experts/"))
                .map(|(path, entry)| (path.clone(), entry.sha256.clone()))
                .collect()
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            layout,
            encoding,
            checksums,
            bypass_cache,
            expert_bytes,
            device: device.clone(),
        })
    }
}

/// Where tensor `k` of a `layer` expert stored as GGUF blocks sits in its file.
fn ggml_slice(
    layout: &ExpertLayout,
    types: &[[GgmlDType; 3]],
    layer: usize,
    k: usize,
) -> ExpertSlice {
    let tensor = &layout.tensors[k];
    let dtype = types[layer][k];
    ExpertSlice {
        offset: layout.data_offset + tensor.offset,
        bytes: ggml_bytes(dtype, tensor.shape[0] * tensor.shape[1])
            .expect("the manifest check found whole blocks"),
        dtype,
        shape: tensor.shape,
    }
}

impl ExpertSource for LayoutSource {
    fn read(&self, layer: usize, expert: usize) -> Result<(GluMlp, u64)> {
        let relative = expert_path(layer, expert);
        let path = self.dir.join(&relative);
        let fail = |message: String| Error::Expert {
            layer,
            expert,
            path: path.clone(),
            message,
        };
        let len = std::fs::metadata(&path)
            .map_err(|e| fail(e.to_string()))?
            .len();
        if len != self.layout.file_bytes {
            return Err(fail(format!(
                "file is {len} bytes, expected {} (truncated or not from this conversion)",
                self.layout.file_bytes
            )));
        }
        // One read of the whole file: the header is a few KiB and lets the checksum cover it all.
        let buf = fetch::read_aligned(&path, 0, len as usize, self.bypass_cache)
            .map_err(|e| fail(e.to_string()))?;
        if let Some(sums) = &self.checksums {
            let actual = format!("{:x}", Sha256::digest(&buf[..]));
            match sums.get(&relative) {
                Some(expected) if *expected == actual => {}
                Some(expected) => {
                    return Err(fail(format!(
                        "sha256 mismatch: file has {actual}, manifest says {expected}"
                    )));
                }
                None => return Err(fail("file is not listed in the manifest".into())),
            }
        }
        let mlp = match &self.encoding {
            ExpertEncoding::Dense(dtype) => {
                let [gate, up, down] = self.layout.tensors.each_ref().map(|t| {
                    let start = (self.layout.data_offset + t.offset) as usize;
                    let bytes = &buf[start..start + t.bytes as usize];
                    f32_tensor(bytes, *dtype, &t.shape, &self.device)
                        .map_err(|m| fail(format!("tensor {}: {m}", t.name)))
                });
                GluMlp::from_f32(gate?, up?, down?)
            }
            ExpertEncoding::Ggml(types) => {
                let [gate, up, down] = [0, 1, 2].map(|k| {
                    let slice = ggml_slice(&self.layout, types, layer, k);
                    let start = slice.offset as usize;
                    slice
                        .to_qmatmul(&buf[start..start + slice.bytes], &self.device)
                        .map_err(|e| fail(format!("tensor {}: {e}", self.layout.tensors[k].name)))
                });
                GluMlp {
                    gate: gate?,
                    up: up?,
                    down: down?,
                }
            }
        };
        Ok((mlp, len))
    }

    fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }
}

/// Experts read in place from a Hugging Face checkpoint's safetensors files.
pub struct HfSource {
    /// `locations[layer][expert]`: gate, up, down.
    locations: Vec<Vec<[TensorLocation; 3]>>,
    files: HashMap<PathBuf, File>,
    bypass_cache: bool,
    expert_bytes: u64,
    device: Device,
}

impl HfSource {
    pub fn new(
        config: &ModelConfig,
        weights: &HfWeights,
        bypass_cache: bool,
        device: &Device,
    ) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.expert_intermediate_size);
        let shapes = [[i, h], [i, h], [h, i]];
        let mut files = HashMap::new();
        let mut locations = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let mut experts = Vec::with_capacity(config.num_experts);
            // Dense layers keep an empty list: a read there is refused as for any unknown expert.
            let count = if config.is_moe_layer(layer) {
                config.num_experts
            } else {
                0
            };
            for expert in 0..count {
                let names = expert_tensor_names(config, layer, expert);
                let mut located = Vec::with_capacity(3);
                for (name, shape) in names.iter().zip(shapes) {
                    let name = format!("{name}.weight");
                    let location = weights.location(&name)?;
                    if location.shape != shape {
                        return Err(Error::TensorShape {
                            name,
                            path: location.path,
                            actual: location.shape,
                            expected: shape.to_vec(),
                        });
                    }
                    if !files.contains_key(&location.path) {
                        let file =
                            File::open(&location.path).map_err(|e| Error::io(&location.path, e))?;
                        files.insert(location.path.clone(), file);
                    }
                    located.push(location);
                }
                experts.push(located.try_into().expect("three tensors"));
            }
            locations.push(experts);
        }
        Ok(Self {
            locations,
            files,
            bypass_cache,
            expert_bytes: f32_expert_bytes(config),
            device: device.clone(),
        })
    }
}

impl ExpertSource for HfSource {
    fn read(&self, layer: usize, expert: usize) -> Result<(GluMlp, u64)> {
        let located = self
            .locations
            .get(layer)
            .and_then(|l| l.get(expert))
            .ok_or_else(|| Error::InvalidRequest(format!("no expert {expert} in layer {layer}")))?;
        let mut total = 0;
        let mut read_one = |t: &TensorLocation| -> Result<candle_core::Tensor> {
            let fail = |message: String| Error::Expert {
                layer,
                expert,
                path: t.path.clone(),
                message,
            };
            let bytes = fetch::read_at(
                &self.files[&t.path],
                t.offset,
                t.bytes as usize,
                self.bypass_cache,
            )
            .map_err(|e| fail(e.to_string()))?;
            total += t.bytes;
            f32_tensor(&bytes, t.dtype, &t.shape, &self.device).map_err(fail)
        };
        let gate = read_one(&located[0])?;
        let up = read_one(&located[1])?;
        let down = read_one(&located[2])?;
        Ok((GluMlp::from_f32(gate, up, down), total))
    }

    fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }
}

/// Experts read in place from a GGUF file: one slice of each stacked tensor, kept in its stored
/// type (quantized blocks are multiplied as they are).
pub struct GgufSource {
    /// `slices[layer][expert]`: gate, up, down.
    slices: Vec<Vec<[ExpertSlice; 3]>>,
    path: PathBuf,
    /// Opened with O_DIRECT when bypassing the page cache and the filesystem allows it.
    file: File,
    direct: bool,
    bypass_cache: bool,
    expert_bytes: u64,
    device: Device,
}

impl GgufSource {
    pub fn new(config: &ModelConfig, gguf: &GgufFile, bypass_cache: bool) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.expert_intermediate_size);
        let shapes = [[i, h], [i, h], [h, i]];
        let mut slices = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let names = stacked_expert_names(layer);
            // Dense layers keep an empty list: a read there is refused as for any unknown expert.
            let count = if config.is_moe_layer(layer) {
                config.num_experts
            } else {
                0
            };
            let experts = (0..count)
                .map(|e| -> Result<[ExpertSlice; 3]> {
                    Ok([
                        gguf.expert_slice(&names[0], e, shapes[0])?,
                        gguf.expert_slice(&names[1], e, shapes[1])?,
                        gguf.expert_slice(&names[2], e, shapes[2])?,
                    ])
                })
                .collect::<Result<Vec<_>>>()?;
            slices.push(experts);
        }
        // Dense types are widened to f32 by QMatMul; quantized blocks stay as stored.
        let expert_bytes = slices.iter().find_map(|l| l.first()).map_or(0, |s| {
            s.iter().map(ExpertSlice::bytes_in_memory).sum::<usize>() as u64
        });
        let path = gguf.path().to_path_buf();
        let (file, direct) =
            fetch::open_for_ranges(&path, bypass_cache).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            slices,
            path,
            file,
            direct,
            bypass_cache,
            expert_bytes,
            device: gguf.device().clone(),
        })
    }
}

impl ExpertSource for GgufSource {
    fn read(&self, layer: usize, expert: usize) -> Result<(GluMlp, u64)> {
        let slices = self
            .slices
            .get(layer)
            .and_then(|l| l.get(expert))
            .ok_or_else(|| Error::InvalidRequest(format!("no expert {expert} in layer {layer}")))?;
        let fail = |message: String| Error::Expert {
            layer,
            expert,
            path: self.path.clone(),
            message,
        };
        let read_one = |s: &ExpertSlice| {
            let (buf, at) = fetch::read_range(
                &self.file,
                self.direct,
                s.offset,
                s.bytes,
                self.bypass_cache,
            )
            .map_err(|e| fail(e.to_string()))?;
            s.to_qmatmul(&buf[at..at + s.bytes], &self.device)
                .map_err(|e| fail(e.to_string()))
        };
        // The three projections lie in three stacked tensors: reading them at once keeps three
        // times as many reads in flight, which this disk needs to approach its rate (1.3 GB/s at
        // 4-8 reads of 1.7 MB in flight, 1.6 GB/s at 16).
        let [gate, up, down] = std::thread::scope(|scope| {
            let up = scope.spawn(|| read_one(&slices[1]));
            let down = scope.spawn(|| read_one(&slices[2]));
            let gate = read_one(&slices[0]);
            [
                gate,
                up.join().expect("expert read panicked"),
                down.join().expect("expert read panicked"),
            ]
        });
        let total = slices.iter().map(|s| s.bytes as u64).sum();
        Ok((
            GluMlp {
                gate: gate?,
                up: up?,
                down: down?,
            },
            total,
        ))
    }

    fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }
}
