//! Cold-tier readers: where experts come from when they are not in the working set.
//!
//! - [`LayoutSource`]: the odmoe layout, one aligned read of one file per expert (dense values, or
//!   GGUF blocks multiplied as they are, exactly as [`GgufSource`] does).
//! - [`HfSource`]: a Hugging Face safetensors checkpoint read in place, by offsets from its headers.
//! - [`GgufSource`]: a GGUF file read in place, one slice of each stacked expert tensor.
//!
//! Every source checks the bytes it read against the expert's checksums (see [`super::checksum`])
//! before they become weights.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QMatMul, ggml_file::qtensor_from_ggml};
use safetensors::tensor::Dtype;
use sha2::{Digest, Sha256};

use super::checksum::{self, ByteRange, ExpertChecksums, ReadPlan};
use super::fetch::{self, AlignedBuf, Pace};
use super::held;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::{BlockBytes, Format, GluMlp, Matrix};
use crate::format::gguf::{ExpertSlice, ExpertType, GgufFile, stacked_expert_names};
use crate::format::layout::{
    self, ExpertLayout, GGUF_DTYPE, MANIFEST, MXFP4_DTYPE, Manifest, expert_path, parse_xxh3_hex,
};
use crate::format::safetensors::{HfWeights, TensorLocation, View, f32_tensor};
use crate::format::{gguf_header, mxfp4};

/// Reads experts from cold storage.
pub trait ExpertSource: Send + Sync {
    /// Reads one expert: its weights as the source holds them, and how many bytes were read from
    /// storage. A guess's read goes in pieces ([`Pace::Pieces`]) and fails with
    /// [`fetch::GIVEN_UP`] in its message when given up; a source that cannot read in pieces
    /// may read whole.
    fn read(&self, layer: usize, expert: usize, pace: Pace) -> Result<(GluMlp, u64)>;
    /// Bytes one expert holds in memory once read, by layer: what the budget charges for it.
    fn expert_sizes(&self) -> ExpertSizes;
}

/// Bytes one expert holds in memory once read, by layer. Layers may differ: a Q4_K_M file keeps
/// some layers' down projections in Q6_K, which makes their experts a sixth larger. Counting
/// every expert at the first layer's size held 7% fewer experts than the budget has room for
/// on such a file, or let the store hold more than its budget where a later layer is larger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertSizes {
    /// Every expert alike.
    Same(u64),
    /// Each layer's own (0 where a layer has no experts).
    ByLayer(Vec<u64>),
}

impl ExpertSizes {
    /// `by_layer`, kept as [`Same`](Self::Same) when every layer with experts has one size.
    pub fn by_layer(by_layer: Vec<u64>) -> Self {
        let mut sizes = by_layer.iter().copied().filter(|&bytes| bytes > 0);
        let first = sizes.next().unwrap_or(0);
        if sizes.all(|bytes| bytes == first) {
            Self::Same(first)
        } else {
            Self::ByLayer(by_layer)
        }
    }

    /// Bytes one expert of `layer` holds.
    pub fn at(&self, layer: usize) -> u64 {
        match self {
            Self::Same(bytes) => *bytes,
            Self::ByLayer(by_layer) => by_layer.get(layer).copied().unwrap_or(0),
        }
    }

    /// The most one expert holds.
    pub fn largest(&self) -> u64 {
        match self {
            Self::Same(bytes) => *bytes,
            Self::ByLayer(by_layer) => by_layer.iter().copied().max().unwrap_or(0),
        }
    }

    /// All experts' bytes: `config`'s experts in each of its layers that has them.
    pub fn total(&self, config: &ModelConfig) -> u64 {
        config.moe_layers().map(|layer| self.at(layer)).sum::<u64>() * config.num_experts as u64
    }

    /// One expert's bytes on average over `config`'s layers that have experts (dense layers
    /// hold none, so they do not count).
    pub fn mean(&self, config: &ModelConfig) -> u64 {
        let experts = config.moe_layers().count() * config.num_experts;
        self.total(config) / experts.max(1) as u64
    }
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
    Ggml(Vec<[ExpertType; 3]>),
    /// A checkpoint's MXFP4 blocks, multiplied at their exact values.
    ExactMxfp4,
}

/// Experts of an odmoe layout: `experts/layer_LL_expert_EEE.safetensors`.
pub struct LayoutSource {
    dir: PathBuf,
    layout: ExpertLayout,
    encoding: ExpertEncoding,
    /// xxh3-64 of each expert file, checked on every read.
    checksums: ExpertChecksums,
    /// sha256 of each expert file by relative path, when reads are verified against it too.
    sha256: Option<HashMap<String, String>>,
    bypass_cache: bool,
    expert_sizes: ExpertSizes,
    device: Device,
}

impl LayoutSource {
    /// Opens the experts of the layout in `dir`. A missing or wrongly sized expert file is refused
    /// now rather than at its first read. Each file's xxh3-64 comes from the manifest, or, for a
    /// layout written before the manifest recorded it, from an index computed on the first load
    /// (see [`checksum::load_or_build`]) from files checked against the manifest's SHA-256.
    pub fn new(
        dir: &Path,
        manifest: &Manifest,
        verify_sha256: bool,
        bypass_cache: bool,
        device: &Device,
    ) -> Result<Self> {
        let encoding = expert_encoding(dir, manifest)?;
        check_expert_files(dir, manifest)?;
        let checksums = match checksums_in_manifest(dir, manifest) {
            Some(checksums) => checksums,
            None => checksums_by_index(dir, manifest, bypass_cache)?,
        };
        let sha256 = verify_sha256.then(|| {
            manifest
                .files
                .iter()
                .filter(|(path, _)| path.starts_with("experts/"))
                .map(|(path, entry)| (path.clone(), entry.sha256.clone()))
                .collect()
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            layout: manifest.expert.clone(),
            expert_sizes: layout_expert_sizes(manifest, &encoding, device),
            encoding,
            checksums,
            sha256,
            bypass_cache,
            device: device.clone(),
        })
    }

    /// Bytes one expert of the layout in `dir` holds in memory once read, by layer, without
    /// opening any expert file.
    pub fn expert_sizes_of(
        dir: &Path,
        manifest: &Manifest,
        device: &Device,
    ) -> Result<ExpertSizes> {
        Ok(layout_expert_sizes(
            manifest,
            &expert_encoding(dir, manifest)?,
            device,
        ))
    }
}

fn expert_encoding(dir: &Path, manifest: &Manifest) -> Result<ExpertEncoding> {
    let layout = &manifest.expert;
    let unsupported = |what: String| Error::config(dir.join(MANIFEST), what);
    Ok(if layout.dtype == GGUF_DTYPE {
        let config = &manifest.architecture;
        let types = (0..config.num_layers)
            .map(|layer| match layout.ggml_types(layer) {
                Some(types) => Ok(types),
                // A dense layer has no experts to read (a read there is refused before its
                // types are looked at).
                None if !config.is_moe_layer(layer) => Ok([ExpertType::Ggml(GgmlDType::F32); 3]),
                None => Err(unsupported(format!(
                    "no known ggml types for layer {layer}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        ExpertEncoding::Ggml(types)
    } else if layout.dtype == MXFP4_DTYPE {
        ExpertEncoding::ExactMxfp4
    } else {
        ExpertEncoding::Dense(
            parse_dtype(&layout.dtype).ok_or_else(|| {
                unsupported(format!("unsupported expert dtype {:?}", layout.dtype))
            })?,
        )
    })
}

/// Bytes one expert of the layout holds on `device`, by layer.
fn layout_expert_sizes(
    manifest: &Manifest,
    encoding: &ExpertEncoding,
    device: &Device,
) -> ExpertSizes {
    let config = &manifest.architecture;
    match encoding {
        ExpertEncoding::Dense(_) => ExpertSizes::Same(config.expert_f32_bytes() as u64),
        ExpertEncoding::ExactMxfp4 if Matrix::keeps_exact_mxfp4(device) => {
            ExpertSizes::Same(manifest.expert.weight_bytes())
        }
        ExpertEncoding::ExactMxfp4 => ExpertSizes::Same(config.expert_f32_bytes() as u64),
        // As GgufSource counts them: each layer's slices as they sit in memory.
        ExpertEncoding::Ggml(types) => ExpertSizes::by_layer(
            (0..config.num_layers)
                .map(|layer| {
                    if !config.is_moe_layer(layer) {
                        return 0;
                    }
                    (0..3)
                        .map(|k| {
                            held_bytes(&ggml_slice(&manifest.expert, types, layer, k), device)
                                as u64
                        })
                        .sum()
                })
                .collect(),
        ),
    }
}

/// What is wrong with the expert file at `path` of a layout whose expert files have `expected`
/// bytes, if anything.
fn expert_file_problem(path: &Path, expected: u64) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() == expected => None,
        Ok(meta) => Some(format!(
            "file is {} bytes, expected {expected} (truncated or not from this conversion)",
            meta.len()
        )),
        Err(error) => Some(error.to_string()),
    }
}

/// Refuses a layout with a missing or wrongly sized expert file, naming the first and counting
/// the others.
fn check_expert_files(dir: &Path, manifest: &Manifest) -> Result<()> {
    let mut broken = manifest
        .expert_files()
        .filter_map(|(layer, expert, relative)| {
            let path = dir.join(relative);
            expert_file_problem(&path, manifest.expert.file_bytes)
                .map(|problem| (layer, expert, path, problem))
        });
    let Some((layer, expert, path, problem)) = broken.next() else {
        return Ok(());
    };
    let others = match broken.count() {
        0 => String::new(),
        n => format!("; {n} more expert files are broken"),
    };
    Err(Error::Expert {
        layer,
        expert,
        path,
        message: format!(
            "{problem}{others}: the model cannot load; `odmoe verify` lists every broken file"
        ),
    })
}

/// Each expert file's xxh3-64 from the manifest, when it records them all.
fn checksums_in_manifest(dir: &Path, manifest: &Manifest) -> Option<ExpertChecksums> {
    let mut sums = vec![Vec::new(); manifest.architecture.num_layers];
    // Expert files come layer by layer in expert order, so each lands at its index.
    for (layer, _, relative) in manifest.expert_files() {
        let recorded = manifest.files.get(&relative)?.xxh3_64.as_deref()?;
        sums[layer].push(vec![parse_xxh3_hex(recorded)?]);
    }
    Some(ExpertChecksums::new(
        sums,
        dir.join(MANIFEST).display().to_string(),
    ))
}

/// Each expert file's xxh3-64 for a layout whose manifest records only SHA-256: from an index,
/// computed once from files whose SHA-256 matches the manifest.
fn checksums_by_index(
    dir: &Path,
    manifest: &Manifest,
    bypass_cache: bool,
) -> Result<ExpertChecksums> {
    let mut plan = ReadPlan {
        files: Vec::new(),
        experts: vec![Vec::new(); manifest.architecture.num_layers],
    };
    let mut sha256 = Vec::new();
    for (layer, _, relative) in manifest.expert_files() {
        plan.experts[layer].push(vec![ByteRange {
            file: plan.files.len(),
            offset: 0,
            len: manifest.expert.file_bytes,
        }]);
        plan.files.push(dir.join(&relative));
        sha256.push(manifest.files[&relative].sha256.as_str());
    }
    checksum::load_or_build(
        dir,
        &plan,
        bypass_cache,
        Some(&|range: &ByteRange, bytes: &[u8]| check_sha256(bytes, sha256[range.file])),
    )
}

/// Compares the SHA-256 of a whole expert file with the manifest's.
fn check_sha256(bytes: &[u8], expected: &str) -> std::result::Result<(), String> {
    let actual = layout::hex(&Sha256::digest(bytes));
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "sha256 mismatch: file has {actual}, manifest says {expected}"
        ))
    }
}

/// Where tensor `k` of a `layer` expert stored as GGUF blocks sits in its file.
fn ggml_slice(
    layout: &ExpertLayout,
    types: &[[ExpertType; 3]],
    layer: usize,
    k: usize,
) -> ExpertSlice {
    let tensor = &layout.tensors[k];
    let stored = types[layer][k];
    ExpertSlice {
        offset: layout.data_offset + tensor.offset,
        bytes: stored
            .bytes(tensor.shape[0] * tensor.shape[1])
            .expect("the manifest check found whole blocks"),
        stored,
        shape: tensor.shape,
    }
}

impl ExpertSource for LayoutSource {
    fn read(&self, layer: usize, expert: usize, pace: Pace) -> Result<(GluMlp, u64)> {
        let relative = expert_path(layer, expert);
        let path = self.dir.join(&relative);
        let fail = |message: String| Error::Expert {
            layer,
            expert,
            path: path.clone(),
            message,
        };
        let len = self.layout.file_bytes;
        // Checked at load too; a file truncated since gets this message rather than a short read.
        if let Some(problem) = expert_file_problem(&path, len) {
            return Err(fail(problem));
        }
        // One read of the whole file: the header is a few KiB and lets the checksum cover it all.
        let buf = fetch::read_aligned(&path, 0, len as usize, self.bypass_cache, pace)
            .map_err(|e| fail(e.to_string()))?;
        self.checksums
            .check(layer, expert, 0, &buf)
            .map_err(&fail)?;
        if let Some(sums) = &self.sha256 {
            let expected = sums
                .get(&relative)
                .ok_or_else(|| fail("file is not listed in the manifest".into()))?;
            check_sha256(&buf, expected).map_err(&fail)?;
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
                let slices = [0, 1, 2].map(|k| ggml_slice(&self.layout, types, layer, k));
                let at = slices.each_ref().map(|s| (s, s.offset as usize));
                let matrices = slice_matrices(buf, &at, &self.device)
                    .map_err(|e| fail(format!("expert tensors: {e}")))?;
                let [gate, up, down] =
                    <[Matrix; 3]>::try_from(matrices).expect("three matrices for three slices");
                GluMlp { gate, up, down }
            }
            ExpertEncoding::ExactMxfp4 => {
                let [gate, up, down] = self.layout.tensors.each_ref().map(|t| {
                    let start = (self.layout.data_offset + t.offset) as usize;
                    let blocks = buf[start..start + t.bytes as usize].to_vec();
                    exact_mxfp4_matrix(blocks, t.shape, &self.device)
                        .map_err(|e| fail(format!("tensor {}: {e}", t.name)))
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

    fn expert_sizes(&self) -> ExpertSizes {
        self.expert_sizes.clone()
    }
}

/// Names of an expert's three projections, in the order sources read and check them.
const PROJECTIONS: [&str; 3] = ["gate", "up", "down"];

/// The read plan of a source that reads each expert's gate, up and down as ranges, where
/// `locate` says the file, offset and length of each of a projection's ranges (one, or with
/// MXFP4 checkpoints two).
fn projection_plan<'a, T>(
    experts: &'a [Vec<[T; 3]>],
    locate: impl Fn(&'a T) -> Vec<(&'a Path, u64, u64)>,
) -> ReadPlan {
    let mut files = Vec::new();
    let mut file_index: HashMap<PathBuf, usize> = HashMap::new();
    let mut range = |(path, offset, len): (&'a Path, u64, u64)| {
        let file = *file_index.entry(path.to_path_buf()).or_insert_with(|| {
            files.push(path.to_path_buf());
            files.len() - 1
        });
        ByteRange { file, offset, len }
    };
    let experts = experts
        .iter()
        .map(|layer| {
            layer
                .iter()
                .map(|tensors| tensors.iter().flat_map(&locate).map(&mut range).collect())
                .collect()
        })
        .collect();
    ReadPlan { files, experts }
}

/// Experts read in place from a Hugging Face checkpoint's safetensors files.
pub struct HfSource {
    /// `locations[layer][expert]`: gate, up, down.
    locations: Vec<Vec<[TensorLocation; 3]>>,
    files: HashMap<PathBuf, File>,
    /// xxh3-64 of each range of each expert (a tensor, or MXFP4 blocks and their scales),
    /// checked on every read.
    checksums: ExpertChecksums,
    bypass_cache: bool,
    expert_sizes: ExpertSizes,
    device: Device,
}

impl HfSource {
    /// Opens the experts of the checkpoint in `dir`, with the checksum index of every expert
    /// tensor (kept from an earlier load, or computed now: see [`checksum::load_or_build`]).
    /// `names` gives an expert's gate, up and down tensor names (without `.weight`), as its
    /// architecture names them.
    pub fn new(
        dir: &Path,
        config: &ModelConfig,
        names: impl Fn(usize, usize) -> [String; 3],
        weights: &HfWeights,
        bypass_cache: bool,
        device: &Device,
    ) -> Result<Self> {
        let shapes = config.expert_shapes();
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
                let names = names(layer, expert);
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
                    // MXFP4 scales may lie in another shard than their blocks.
                    for (path, _, _) in location_ranges(&location) {
                        if !files.contains_key(path) {
                            let file = fetch::open_buffered(path, bypass_cache)
                                .map_err(|e| Error::io(path, e))?;
                            files.insert(path.to_path_buf(), file);
                        }
                    }
                    located.push(location);
                }
                experts.push(located.try_into().expect("three tensors"));
            }
            locations.push(experts);
        }
        let plan = projection_plan(&locations, location_ranges);
        let checksums = checksum::load_or_build(dir, &plan, bypass_cache, None)?;
        Ok(Self {
            expert_sizes: ExpertSizes::Same(located_expert_bytes(&locations, device)),
            locations,
            files,
            checksums,
            bypass_cache,
            device: device.clone(),
        })
    }

    /// Bytes one expert of the checkpoint holds in memory once read onto `device`, without
    /// reading any: the same in every layer, as a checkpoint stores its experts in one type.
    pub fn expert_sizes_of(
        config: &ModelConfig,
        names: impl Fn(usize, usize) -> [String; 3],
        weights: &HfWeights,
        device: &Device,
    ) -> Result<ExpertSizes> {
        let Some(layer) = config.moe_layers().next() else {
            return Ok(ExpertSizes::Same(0));
        };
        let located = names(layer, 0)
            .map(|name| weights.location(&format!("{name}.weight")))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let located: [TensorLocation; 3] = located.try_into().expect("three tensors");
        Ok(ExpertSizes::Same(located_expert_bytes(
            &[vec![located]],
            device,
        )))
    }
}

/// The ranges a located tensor is read from: its bytes, and its blocks' scales if it has them.
fn location_ranges(t: &TensorLocation) -> Vec<(&Path, u64, u64)> {
    let mut ranges = vec![(t.path.as_path(), t.offset, t.bytes)];
    if let Some(scales) = &t.scales {
        ranges.push((scales.path.as_path(), scales.offset, scales.bytes));
    }
    ranges
}

/// Bytes one expert of `locations` holds on `device`: float tensors widened to f32, MXFP4
/// blocks as [`exact_mxfp4_matrix`] holds them.
fn located_expert_bytes(locations: &[Vec<[TensorLocation; 3]>], device: &Device) -> u64 {
    let Some(first) = locations.iter().find_map(|l| l.first()) else {
        return 0;
    };
    first
        .iter()
        .map(|t| {
            let values = (t.shape[0] * t.shape[1]) as u64;
            match t.view {
                View::Mxfp4Rows { .. } if Matrix::keeps_exact_mxfp4(device) => {
                    gguf_header::mxfp4_bytes(values as usize) as u64
                }
                View::Whole | View::Columns { .. } | View::Mxfp4Rows { .. } => values * 4,
            }
        })
        .sum()
}

/// A checkpoint's MXFP4 blocks `[rows, cols]` (in ggml's layout) as a matrix on `device` that
/// multiplies f32 activations at the weights' exact values, as transformers computes from them:
/// the blocks themselves on the CPU, their f32 values elsewhere.
fn exact_mxfp4_matrix(
    blocks: Vec<u8>,
    shape: [usize; 2],
    device: &Device,
) -> candle_core::Result<Matrix> {
    if Matrix::keeps_exact_mxfp4(device) {
        return Matrix::exact_mxfp4(blocks, shape).ok_or_else(|| {
            candle_core::Error::Msg(format!("MXFP4 blocks are not a {shape:?} matrix"))
        });
    }
    let values = Matrix::mxfp4_values(blocks, shape).ok_or_else(|| {
        candle_core::Error::Msg(format!("MXFP4 blocks are not a {shape:?} matrix"))
    })?;
    let values = candle_core::Tensor::from_vec(values, shape.to_vec(), device)?;
    Ok(Matrix::Candle(QMatMul::Tensor(values)))
}

/// A GGUF file's MXFP4 blocks `[rows, cols]` as a matrix on `device`: as they are where
/// odmoe's kernels multiply them, else as the Q8_0 blocks of the same values for candle.
fn mxfp4_matrix(
    blocks: Vec<u8>,
    shape: [usize; 2],
    device: &Device,
) -> candle_core::Result<Matrix> {
    if Matrix::keeps_mxfp4(device) {
        return Matrix::mxfp4(blocks, shape).ok_or_else(|| {
            candle_core::Error::Msg(format!("MXFP4 blocks are not a {shape:?} matrix"))
        });
    }
    let held = mxfp4::to_q8_0(&blocks).map_err(candle_core::Error::Msg)?;
    let held = qtensor_from_ggml(GgmlDType::Q8_0, &held, shape.to_vec(), device)?;
    Ok(Matrix::Candle(QMatMul::from_qtensor(held)?))
}

impl ExpertSource for HfSource {
    fn read(&self, layer: usize, expert: usize, pace: Pace) -> Result<(GluMlp, u64)> {
        let located = self
            .locations
            .get(layer)
            .and_then(|l| l.get(expert))
            .ok_or_else(|| Error::InvalidRequest(format!("no expert {expert} in layer {layer}")))?;
        let mut total = 0;
        // Gate and up may be views of one slab (fused experts): each range is read once.
        let mut read: Vec<((PathBuf, u64, u64), Vec<u8>)> = Vec::new();
        let mut range_index = 0;
        let mut projections = Vec::with_capacity(3);
        for (k, t) in located.iter().enumerate() {
            let fail_in = |path: &Path, message: String| Error::Expert {
                layer,
                expert,
                path: path.to_path_buf(),
                message,
            };
            let fail = |message: String| fail_in(&t.path, message);
            let mut parts = Vec::with_capacity(2);
            for (part, (path, offset, len)) in location_ranges(t).into_iter().enumerate() {
                let key = (path.to_path_buf(), offset, len);
                let index = match read.iter().position(|(k, _)| *k == key) {
                    Some(index) => index,
                    None => {
                        let bytes = fetch::read_at(
                            &self.files[path],
                            offset,
                            len as usize,
                            self.bypass_cache,
                            pace,
                        )
                        .map_err(|e| fail_in(path, e.to_string()))?;
                        let what = if part == 0 { "tensor" } else { "scales" };
                        self.checksums
                            .check(layer, expert, range_index, &bytes)
                            .map_err(|m| {
                                fail_in(
                                    path,
                                    format!("{} {what} at offset {offset}: {m}", PROJECTIONS[k]),
                                )
                            })?;
                        total += len;
                        read.push((key, bytes));
                        read.len() - 1
                    }
                };
                range_index += 1;
                parts.push(index);
            }
            let bytes = &read[parts[0]].1;
            projections.push(match t.view {
                View::Mxfp4Rows { .. } => {
                    let scales = Some(&read[parts[1]].1[..]);
                    let blocks = t
                        .view
                        .stored_bytes(bytes, scales, 1, &t.shape)
                        .map_err(&fail)?;
                    exact_mxfp4_matrix(blocks, [t.shape[0], t.shape[1]], &self.device)
                        .map_err(|e| fail(e.to_string()))?
                }
                View::Whole | View::Columns { .. } => Matrix::Candle(QMatMul::Tensor(
                    t.view
                        .f32_tensor(bytes, t.dtype, &t.shape, &self.device)
                        .map_err(fail)?,
                )),
            });
        }
        let [gate, up, down] = projections.try_into().expect("three projections");
        Ok((GluMlp { gate, up, down }, total))
    }

    fn expert_sizes(&self) -> ExpertSizes {
        self.expert_sizes.clone()
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
    /// xxh3-64 of each slice of each expert, checked on every read.
    checksums: ExpertChecksums,
    bypass_cache: bool,
    expert_sizes: ExpertSizes,
    device: Device,
}

impl GgufSource {
    /// Opens the experts of `gguf`, with the checksum index of every expert slice (kept from an
    /// earlier load, or computed now: see [`checksum::load_or_build`]).
    pub fn new(config: &ModelConfig, gguf: &GgufFile, bypass_cache: bool) -> Result<Self> {
        let slices = gguf_expert_slices(config, gguf)?;
        let path = gguf.path().to_path_buf();
        let plan = projection_plan(&slices, |s| vec![(&path, s.offset, s.bytes as u64)]);
        let checksums = checksum::load_or_build(&path, &plan, bypass_cache, None)?;
        let (file, direct) =
            fetch::open_for_ranges(&path, bypass_cache).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            expert_sizes: gguf_expert_sizes(&slices, gguf.device()),
            slices,
            path,
            file,
            direct,
            checksums,
            bypass_cache,
            device: gguf.device().clone(),
        })
    }

    /// Bytes one expert of `gguf` holds in memory once read, by layer, without reading any.
    pub fn expert_sizes_of(config: &ModelConfig, gguf: &GgufFile) -> Result<ExpertSizes> {
        Ok(gguf_expert_sizes(
            &gguf_expert_slices(config, gguf)?,
            gguf.device(),
        ))
    }
}

/// Where each expert's gate, up and down lie in a GGUF file, by layer and expert.
fn gguf_expert_slices(config: &ModelConfig, gguf: &GgufFile) -> Result<Vec<Vec<[ExpertSlice; 3]>>> {
    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    let shapes = [[i, h], [i, h], [h, i]];
    (0..config.num_layers)
        .map(|layer| {
            let names = stacked_expert_names(layer);
            // Dense layers keep an empty list: a read there is refused as for any unknown expert.
            let count = if config.is_moe_layer(layer) {
                config.num_experts
            } else {
                0
            };
            (0..count)
                .map(|e| -> Result<[ExpertSlice; 3]> {
                    Ok([
                        gguf.expert_slice(&names[0], e, shapes[0])?,
                        gguf.expert_slice(&names[1], e, shapes[1])?,
                        gguf.expert_slice(&names[2], e, shapes[2])?,
                    ])
                })
                .collect()
        })
        .collect()
}

/// Bytes one expert of each layer holds: dense types are widened to f32 by QMatMul, quantized
/// blocks stay as stored.
fn gguf_expert_sizes(slices: &[Vec<[ExpertSlice; 3]>], device: &Device) -> ExpertSizes {
    ExpertSizes::by_layer(
        slices
            .iter()
            .map(|layer| {
                // A layer's experts share their types in llama.cpp's files; the largest
                // is charged should one differ.
                layer
                    .iter()
                    .map(|s| s.iter().map(|s| held_bytes(s, device)).sum::<usize>() as u64)
                    .max()
                    .unwrap_or(0)
            })
            .collect(),
    )
}

/// Bytes `slice` takes in memory once read onto `device`.
fn held_bytes(slice: &ExpertSlice, device: &Device) -> usize {
    slice.bytes_in_memory(Matrix::keeps_mxfp4(device))
}

/// The matrices of `slices`, each at its start in `buf` (the read that holds them all), on
/// `device` in their stored types: held in `buf` itself where odmoe's kernels multiply every one
/// of them and the buffer is long enough (see [`held`]), else copied out of it.
fn slice_matrices(
    buf: AlignedBuf,
    slices: &[(&ExpertSlice, usize)],
    device: &Device,
) -> candle_core::Result<Vec<Matrix>> {
    let formats: Option<Vec<Format>> = slices.iter().map(|(s, _)| kernel_format(s)).collect();
    let buf = match formats.filter(|_| Matrix::kernels_on(device)) {
        Some(formats) => match held::hold(buf) {
            Ok(shared) => {
                return slices
                    .iter()
                    .zip(formats)
                    .map(|(&(slice, at), format)| held_matrix(&shared, slice, at, format))
                    .collect();
            }
            Err(buf) => buf,
        },
        None => buf,
    };
    slices
        .iter()
        .map(|&(slice, at)| slice_matrix(slice, &buf[at..at + slice.bytes], device))
        .collect()
}

/// The kernels' format for `slice`'s stored type, if they have one.
fn kernel_format(slice: &ExpertSlice) -> Option<Format> {
    match slice.stored {
        ExpertType::Mxfp4 => Some(Format::Mxfp4),
        ExpertType::Ggml(dtype) => Format::of(dtype),
    }
}

/// `slice`, at `at` in the read buffer `shared`, as a matrix of `format` blocks held there.
fn held_matrix(
    shared: &Arc<dyn AsRef<[u8]> + Send + Sync>,
    slice: &ExpertSlice,
    at: usize,
    format: Format,
) -> candle_core::Result<Matrix> {
    BlockBytes::shared(shared.clone(), at..at + slice.bytes)
        .and_then(|blocks| Matrix::blocks(format, blocks, slice.shape))
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{} bytes of {format:?} blocks are not a {:?} matrix",
                slice.bytes, slice.shape
            ))
        })
}

/// `bytes`, the slice `slice` of a file, copied into a matrix on `device` in its stored type:
/// MXFP4 as it is where odmoe's kernels multiply it.
fn slice_matrix(slice: &ExpertSlice, bytes: &[u8], device: &Device) -> candle_core::Result<Matrix> {
    if slice.stored == ExpertType::Mxfp4 {
        return mxfp4_matrix(bytes.to_vec(), slice.shape, device);
    }
    Ok(Matrix::Candle(slice.to_qmatmul(bytes, device)?))
}

impl ExpertSource for GgufSource {
    fn read(&self, layer: usize, expert: usize, pace: Pace) -> Result<(GluMlp, u64)> {
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
        let read_one = |k: usize| {
            let s = &slices[k];
            let (buf, at) = fetch::read_range(
                &self.file,
                self.direct,
                s.offset,
                s.bytes,
                self.bypass_cache,
                pace,
            )
            .map_err(|e| fail(e.to_string()))?;
            self.checksums
                .check(layer, expert, k, &buf[at..at + s.bytes])
                .map_err(|m| {
                    fail(format!(
                        "{} slice at offset {}: {m}",
                        PROJECTIONS[k], s.offset
                    ))
                })?;
            slice_matrices(buf, &[(s, at)], &self.device)
                .map(|mut one| one.remove(0))
                .map_err(|e| fail(e.to_string()))
        };
        // The three projections lie in three stacked tensors: reading them at once keeps three
        // times as many reads in flight, which this disk needs to approach its rate (1.3 GB/s at
        // 4-8 reads of 1.7 MB in flight, 1.6 GB/s at 16).
        let [gate, up, down] = std::thread::scope(|scope| {
            let up = scope.spawn(|| read_one(1));
            let down = scope.spawn(|| read_one(2));
            let gate = read_one(0);
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

    fn expert_sizes(&self) -> ExpertSizes {
        self.expert_sizes.clone()
    }
}
