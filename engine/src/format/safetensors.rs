//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Headers are parsed once; tensor data is read from a memory map
//! and converted to f32, since bf16/f16 matmuls on CPU are far slower than f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};

use crate::error::{Error, Result};

/// One safetensors file: its memory map and parsed header.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the first data byte (8-byte length prefix plus the JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: checkpoints are treated as read-only; a file truncated while mapped is outside
        // what the engine can defend against here (the expert store reads with pread instead).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }
}

/// A tensor's place in a file: absolute byte offset and length, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLocation {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub dtype: Dtype,
    /// The shape of the tensor as named (after `view`).
    pub shape: Vec<usize>,
    /// How the bytes at `offset` make the tensor.
    pub view: View,
    /// With [`View::Mxfp4Rows`], where the blocks' exponents lie.
    pub scales: Option<Span>,
}

impl TensorLocation {
    /// The dtype an odmoe layout names for the tensor's values: the checkpoint's, or
    /// [`MXFP4_DTYPE`](crate::format::layout::MXFP4_DTYPE) for MXFP4 blocks (stored as U8).
    pub fn values_dtype(&self) -> String {
        match self.view {
            View::Mxfp4Rows { .. } => crate::format::layout::MXFP4_DTYPE.to_string(),
            View::Whole | View::Columns { .. } => self.dtype.to_string(),
        }
    }
}

/// A run of bytes in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
}

/// How a tensor is made from the bytes of its location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// They are the tensor.
    Whole,
    /// They are one expert's `[in, out]` slab of a fused tensor (transformers' gpt-oss keeps
    /// each layer's experts as `gate_up_proj` `[experts, hidden, 2 * width]`, gate and up
    /// columns interleaved, and `down_proj` `[experts, width, hidden]`): the tensor is the
    /// slab's columns from `first`, every `step`-th, transposed to `[out, in]`.
    Columns { first: usize, step: usize },
    /// They are one expert's MXFP4 blocks of a fused tensor as OpenAI's checkpoints keep them
    /// (`{name}_blocks` `[experts, rows, in / 32, 16]`, `{name}_scales` `[experts, rows, in / 32]`,
    /// a row per output, gate and up rows interleaved): the tensor is rows `first`, `first +
    /// step`, ... (see [`super::mxfp4::from_checkpoint_rows`]).
    Mxfp4Rows { first: usize, step: usize },
}

impl View {
    /// The tensor `bytes` (and `scales`, with [`View::Mxfp4Rows`]) make, as an odmoe layout stores
    /// it: `[out, in]` values of `dtype` (`elem` bytes each), or ggml's MXFP4 blocks.
    pub fn stored_bytes(
        self,
        bytes: &[u8],
        scales: Option<&[u8]>,
        elem: usize,
        shape: &[usize],
    ) -> std::result::Result<Vec<u8>, String> {
        let (out, input) = (shape[0], shape[1]);
        match self {
            Self::Whole => Ok(bytes.to_vec()),
            Self::Columns { first, step } => {
                let row = out * step * elem;
                if bytes.len() != input * row {
                    return Err(format!(
                        "{} bytes are not a [{input}, {}] slab",
                        bytes.len(),
                        out * step
                    ));
                }
                let mut stored = Vec::with_capacity(out * input * elem);
                for o in 0..out {
                    let column = (first + o * step) * elem;
                    for i in 0..input {
                        stored.extend_from_slice(&bytes[i * row + column..][..elem]);
                    }
                }
                Ok(stored)
            }
            Self::Mxfp4Rows { first, step } => {
                let scales = scales.ok_or("MXFP4 blocks without their scales")?;
                let groups = input / 32;
                let rows = (0..out).map(|r| first + r * step);
                let rows_held = (first + out.saturating_sub(1) * step + 1) * groups;
                if bytes.len() != scales.len() * 16 || scales.len() < rows_held {
                    return Err(format!(
                        "{} bytes of MXFP4 blocks and {} of scales are not {out} rows of {input}",
                        bytes.len(),
                        scales.len()
                    ));
                }
                Ok(super::mxfp4::from_checkpoint_rows(
                    bytes, scales, groups, rows,
                ))
            }
        }
    }

    /// The tensor `bytes` (of `dtype`, in the location's layout) make, as f32 on `device`: a
    /// fused slab's columns are gathered first, so only the expert's own values are widened.
    pub fn f32_tensor(
        self,
        bytes: &[u8],
        dtype: Dtype,
        shape: &[usize],
        device: &Device,
    ) -> std::result::Result<Tensor, String> {
        match self {
            Self::Whole => f32_tensor(bytes, dtype, shape, device),
            Self::Columns { .. } => {
                let own = self.stored_bytes(bytes, None, dtype.bitsize() / 8, shape)?;
                f32_tensor(&own, dtype, shape, device)
            }
            Self::Mxfp4Rows { .. } => Err("MXFP4 blocks are not a float tensor".into()),
        }
    }
}

/// Whether `name` is one of the tensors in which a checkpoint keeps a layer's routed experts
/// fused (gpt-oss's `mlp.experts.gate_up_proj` and `down_proj`, or their MXFP4 `_blocks` and
/// `_scales`): experts, not base weights, read through [`HfWeights::location`].
pub fn is_fused_expert_tensor(name: &str) -> bool {
    let name = name
        .strip_suffix("_blocks")
        .or_else(|| name.strip_suffix("_scales"))
        .unwrap_or(name);
    name.ends_with(".mlp.experts.gate_up_proj") || name.ends_with(".mlp.experts.down_proj")
}

/// The weights of a Hugging Face checkpoint directory, looked up by tensor name.
pub struct HfWeights {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    device: Device,
}

impl HfWeights {
    /// Opens `model.safetensors`, or every shard named in `model.safetensors.index.json`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index_path.exists() {
            shard_paths(&index_path)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            ));
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            for name in file.tensors.keys() {
                index.insert(name.clone(), i);
            }
            files.push(file);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            device: device.clone(),
        })
    }

    /// Opens an explicit list of safetensors files (an odmoe layout's `base_model` files, for
    /// instance); `label` names the set in errors. A tensor name found in two files is an error.
    pub fn open_files(label: &str, paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            for name in file.tensors.keys() {
                if let Some(&first) = index.get(name) {
                    let first: &SafetensorsFile = &files[first];
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        message: format!("tensor {name:?} is also in {}", first.path.display()),
                    });
                }
                index.insert(name.clone(), i);
            }
            files.push(file);
        }
        Ok(Self {
            dir: PathBuf::from(label),
            files,
            index,
            device: device.clone(),
        })
    }

    /// The safetensors files this checkpoint was read from, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// `name`'s stored dtype, shape and raw little-endian bytes, as they are in the file.
    pub fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let file = self.file_of(name)?;
        let info = &file.tensors[name];
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        Ok((info.dtype, &info.shape, bytes))
    }

    /// The bytes of `location` (one of this checkpoint's) and of its scales if it has them.
    pub fn located_bytes(&self, location: &TensorLocation) -> Result<(&[u8], Option<&[u8]>)> {
        let span = |path: &Path, offset: u64, bytes: u64| -> Result<&[u8]> {
            let file = self.files.iter().find(|f| f.path == path).ok_or_else(|| {
                Error::io(path, std::io::Error::other("not a file of this checkpoint"))
            })?;
            let range = offset as usize..(offset + bytes) as usize;
            file.mmap.get(range).ok_or_else(|| Error::Safetensors {
                path: path.to_path_buf(),
                message: format!("{bytes} bytes at {offset} lie beyond the file"),
            })
        };
        let bytes = span(&location.path, location.offset, location.bytes)?;
        let scales = match &location.scales {
            Some(s) => Some(span(&s.path, s.offset, s.bytes)?),
            None => None,
        };
        Ok((bytes, scales))
    }

    /// The file holding `name`.
    pub fn path_of(&self, name: &str) -> Result<&Path> {
        Ok(&self.file_of(name)?.path)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Loads `name` as f32, checking that its shape is `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let file = self.file_of(name)?;
        let info = &file.tensors[name];
        if info.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: file.path.clone(),
                actual: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        f32_tensor(bytes, info.dtype, shape, &self.device).map_err(|message| Error::Safetensors {
            path: file.path.clone(),
            message: format!("tensor {name:?}: {message}"),
        })
    }

    /// Where `name`'s bytes are, so that a reader can fetch them with its own I/O.
    pub fn location(&self, name: &str) -> Result<TensorLocation> {
        if !self.contains(name)
            && let Some(location) = self.fused_expert_location(name)?
        {
            return Ok(location);
        }
        let file = self.file_of(name)?;
        let info = &file.tensors[name];
        let (start, end) = info.data_offsets;
        Ok(TensorLocation {
            path: file.path.clone(),
            offset: (file.data_start + start) as u64,
            bytes: (end - start) as u64,
            dtype: info.dtype,
            shape: info.shape.clone(),
            view: View::Whole,
            scales: None,
        })
    }

    /// Where expert E's projection `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`
    /// lies when the checkpoint keeps the layer's experts fused (see [`View::Columns`]).
    fn fused_expert_location(&self, name: &str) -> Result<Option<TensorLocation>> {
        let Some((layer, rest)) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once(".mlp.experts."))
        else {
            return Ok(None);
        };
        let Some((expert, projection)) = rest.split_once('.') else {
            return Ok(None);
        };
        let Ok(expert) = expert.parse::<usize>() else {
            return Ok(None);
        };
        let (fused, first, step) = match projection {
            "gate_proj.weight" => ("gate_up_proj", 0, 2),
            "up_proj.weight" => ("gate_up_proj", 1, 2),
            "down_proj.weight" => ("down_proj", 0, 1),
            _ => return Ok(None),
        };
        let fused = format!("model.layers.{layer}.mlp.experts.{fused}");
        if self.contains(&format!("{fused}_blocks")) {
            return self.mxfp4_expert_location(name, &fused, expert, first, step);
        }
        if !self.contains(&fused) {
            return Ok(None);
        }
        let whole = self.location(&fused)?;
        let fused_shape = |detail: &str| {
            Error::config(
                &whole.path,
                format!(
                    "{fused} {:?} is not a fused expert tensor [experts, in, out] as gpt-oss's \
                     ({detail})",
                    whole.shape
                ),
            )
        };
        let [experts, input, columns] = whole.shape[..] else {
            return Err(fused_shape("three dimensions expected"));
        };
        if !columns.is_multiple_of(step) {
            return Err(fused_shape("gate and up columns do not pair"));
        }
        if expert >= experts {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                location: format!("{} ({fused} has {experts} experts)", whole.path.display()),
            });
        }
        let slab = whole.bytes / experts as u64;
        Ok(Some(TensorLocation {
            offset: whole.offset + expert as u64 * slab,
            bytes: slab,
            shape: vec![columns / step, input],
            view: View::Columns { first, step },
            ..whole
        }))
    }

    /// [`fused_expert_location`](Self::fused_expert_location) when the fused tensor `fused` is
    /// kept as MXFP4 blocks and scales (see [`View::Mxfp4Rows`]).
    fn mxfp4_expert_location(
        &self,
        name: &str,
        fused: &str,
        expert: usize,
        first: usize,
        step: usize,
    ) -> Result<Option<TensorLocation>> {
        let blocks = self.location(&format!("{fused}_blocks"))?;
        let scales = self.location(&format!("{fused}_scales"))?;
        let wrong = |detail: &str| {
            Error::config(
                &blocks.path,
                format!(
                    "{fused}_blocks {:?} and _scales {:?} are not MXFP4 experts as gpt-oss's \
                     ({detail})",
                    blocks.shape, scales.shape
                ),
            )
        };
        let [experts, rows, groups, 16] = blocks.shape[..] else {
            return Err(wrong("blocks [experts, rows, in / 32, 16] expected"));
        };
        if scales.shape != [experts, rows, groups] {
            return Err(wrong("scales [experts, rows, in / 32] expected"));
        }
        if blocks.dtype != Dtype::U8 || scales.dtype != Dtype::U8 {
            return Err(wrong(&format!(
                "U8 tensors expected, found {} and {}",
                blocks.dtype, scales.dtype
            )));
        }
        if !rows.is_multiple_of(step) {
            return Err(wrong("gate and up rows do not pair"));
        }
        if expert >= experts {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                location: format!("{} ({fused} has {experts} experts)", blocks.path.display()),
            });
        }
        let (slab, scale_slab) = (blocks.bytes / experts as u64, scales.bytes / experts as u64);
        Ok(Some(TensorLocation {
            offset: blocks.offset + expert as u64 * slab,
            bytes: slab,
            shape: vec![rows / step, groups * 32],
            view: View::Mxfp4Rows { first, step },
            scales: Some(Span {
                path: scales.path,
                offset: scales.offset + expert as u64 * scale_slab,
                bytes: scale_slab,
            }),
            ..blocks
        }))
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
                location: self.dir.display().to_string(),
            }),
        }
    }
}

/// The shard files named by an index, in first-mention order, without duplicates.
fn shard_paths(index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|error| Error::Json {
        path: index_path.to_path_buf(),
        error,
    })?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Converts stored bytes to an f32 tensor on `device`; bf16 and f16 widen exactly. They widen on
/// the host and go to the device once, as they will stay: a GPU's conversion output comes from
/// its buffer pool, sized to the next power of two (up to twice the tensor).
pub fn f32_tensor(
    bytes: &[u8],
    dtype: Dtype,
    shape: &[usize],
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let dtype = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => return Err(format!("dtype {other:?} is not supported (F32, F16, BF16)")),
    };
    Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_device(device))
        .map_err(|e| e.to_string())
}
