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

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use safetensors::tensor::Dtype;
use sha2::{Digest, Sha256};

use super::checksum::{self, ByteRange, ExpertChecksums, ReadPlan};
use super::fetch;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::{GluMlp, Matrix};
use crate::format::gguf::{ExpertSlice, GgufFile, ggml_bytes, stacked_expert_names};
use crate::format::layout::{
    self, ExpertLayout, GGUF_DTYPE, MANIFEST, Manifest, expert_path, parse_xxh3_hex,
};
use crate::format::safetensors::{HfWeights, TensorLocation, f32_tensor};

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
    /// xxh3-64 of each expert file, checked on every read.
    checksums: ExpertChecksums,
    /// sha256 of each expert file by relative path, when reads are verified against it too.
    sha256: Option<HashMap<String, String>>,
    bypass_cache: bool,
    expert_bytes: u64,
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
            expert_bytes: layout_expert_bytes(manifest, &encoding),
            encoding,
            checksums,
            sha256,
            bypass_cache,
            device: device.clone(),
        })
    }

    /// Bytes one expert of the layout in `dir` holds in memory once read, without opening any
    /// expert file.
    pub fn expert_bytes_of(dir: &Path, manifest: &Manifest) -> Result<u64> {
        Ok(layout_expert_bytes(
            manifest,
            &expert_encoding(dir, manifest)?,
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
                None if !config.is_moe_layer(layer) => Ok([GgmlDType::F32; 3]),
                None => Err(unsupported(format!(
                    "no known ggml types for layer {layer}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        ExpertEncoding::Ggml(types)
    } else {
        ExpertEncoding::Dense(
            parse_dtype(&layout.dtype).ok_or_else(|| {
                unsupported(format!("unsupported expert dtype {:?}", layout.dtype))
            })?,
        )
    })
}

fn layout_expert_bytes(manifest: &Manifest, encoding: &ExpertEncoding) -> u64 {
    match encoding {
        ExpertEncoding::Dense(_) => f32_expert_bytes(&manifest.architecture),
        // As GgufSource counts them: the first layer's slices as they sit in memory.
        ExpertEncoding::Ggml(types) => (0..3)
            // A layout's types are candle's, MXFP4 not among them.
            .map(|k| ggml_slice(&manifest.expert, types, 0, k).bytes_in_memory(false) as u64)
            .sum(),
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
        mxfp4: false,
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
        let len = self.layout.file_bytes;
        // Checked at load too; a file truncated since gets this message rather than a short read.
        if let Some(problem) = expert_file_problem(&path, len) {
            return Err(fail(problem));
        }
        // One read of the whole file: the header is a few KiB and lets the checksum cover it all.
        let buf = fetch::read_aligned(&path, 0, len as usize, self.bypass_cache)
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
                let [gate, up, down] = [0, 1, 2].map(|k| {
                    let slice = ggml_slice(&self.layout, types, layer, k);
                    let start = slice.offset as usize;
                    slice_matrix(&slice, &buf[start..start + slice.bytes], &self.device)
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

/// Names of an expert's three projections, in the order sources read and check them.
const PROJECTIONS: [&str; 3] = ["gate", "up", "down"];

/// The read plan of a source that reads each expert as three ranges (gate, up, down), where
/// `locate` says the file, offset and length of each.
fn three_range_plan<'a, T>(
    experts: &'a [Vec<[T; 3]>],
    locate: impl Fn(&'a T) -> (&'a Path, u64, u64),
) -> ReadPlan {
    let mut files = Vec::new();
    let mut file_index: HashMap<PathBuf, usize> = HashMap::new();
    let mut range = |t: &'a T| {
        let (path, offset, len) = locate(t);
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
                .map(|tensors| tensors.iter().map(&mut range).collect())
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
    /// xxh3-64 of each tensor of each expert, checked on every read.
    checksums: ExpertChecksums,
    bypass_cache: bool,
    expert_bytes: u64,
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
                    if !files.contains_key(&location.path) {
                        let file = fetch::open_buffered(&location.path, bypass_cache)
                            .map_err(|e| Error::io(&location.path, e))?;
                        files.insert(location.path.clone(), file);
                    }
                    located.push(location);
                }
                experts.push(located.try_into().expect("three tensors"));
            }
            locations.push(experts);
        }
        let plan = three_range_plan(&locations, |t| (&t.path, t.offset, t.bytes));
        let checksums = checksum::load_or_build(dir, &plan, bypass_cache, None)?;
        Ok(Self {
            locations,
            files,
            checksums,
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
        // Gate and up may be views of one slab (fused experts): read it once for both.
        let mut last_read: Option<(usize, Vec<u8>)> = None;
        let mut read_one = |k: usize| -> Result<candle_core::Tensor> {
            let t = &located[k];
            let fail = |message: String| Error::Expert {
                layer,
                expert,
                path: t.path.clone(),
                message,
            };
            let same_slab = last_read.as_ref().is_some_and(|(previous, _)| {
                let p = &located[*previous];
                (&p.path, p.offset, p.bytes) == (&t.path, t.offset, t.bytes)
            });
            if !same_slab {
                let bytes = fetch::read_at(
                    &self.files[&t.path],
                    t.offset,
                    t.bytes as usize,
                    self.bypass_cache,
                )
                .map_err(|e| fail(e.to_string()))?;
                self.checksums
                    .check(layer, expert, k, &bytes)
                    .map_err(|m| {
                        fail(format!(
                            "{} tensor at offset {}: {m}",
                            PROJECTIONS[k], t.offset
                        ))
                    })?;
                total += t.bytes;
                last_read = Some((k, bytes));
            }
            let bytes = &last_read.as_ref().expect("read above").1;
            t.view
                .f32_tensor(bytes, t.dtype, &t.shape, &self.device)
                .map_err(fail)
        };
        let gate = read_one(0)?;
        let up = read_one(1)?;
        let down = read_one(2)?;
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
    /// xxh3-64 of each slice of each expert, checked on every read.
    checksums: ExpertChecksums,
    bypass_cache: bool,
    expert_bytes: u64,
    device: Device,
}

impl GgufSource {
    /// Opens the experts of `gguf`, with the checksum index of every expert slice (kept from an
    /// earlier load, or computed now: see [`checksum::load_or_build`]).
    pub fn new(config: &ModelConfig, gguf: &GgufFile, bypass_cache: bool) -> Result<Self> {
        let slices = gguf_expert_slices(config, gguf)?;
        let path = gguf.path().to_path_buf();
        let plan = three_range_plan(&slices, |s| (&path, s.offset, s.bytes as u64));
        let checksums = checksum::load_or_build(&path, &plan, bypass_cache, None)?;
        let (file, direct) =
            fetch::open_for_ranges(&path, bypass_cache).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            expert_bytes: gguf_expert_bytes(&slices, gguf.device()),
            slices,
            path,
            file,
            direct,
            checksums,
            bypass_cache,
            device: gguf.device().clone(),
        })
    }

    /// Bytes one expert of `gguf` holds in memory once read, without reading any.
    pub fn expert_bytes_of(config: &ModelConfig, gguf: &GgufFile) -> Result<u64> {
        Ok(gguf_expert_bytes(
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

/// Dense types are widened to f32 by QMatMul; quantized blocks stay as stored.
fn gguf_expert_bytes(slices: &[Vec<[ExpertSlice; 3]>], device: &Device) -> u64 {
    slices.iter().find_map(|l| l.first()).map_or(0, |s| {
        s.iter().map(|s| held_bytes(s, device)).sum::<usize>() as u64
    })
}

/// Bytes `slice` takes in memory once read onto `device`.
fn held_bytes(slice: &ExpertSlice, device: &Device) -> usize {
    slice.bytes_in_memory(Matrix::keeps_mxfp4(device))
}

/// `bytes`, the slice `slice` of a file, as a matrix on `device` in its stored type: MXFP4 as
/// it is where odmoe's kernels multiply it.
fn slice_matrix(slice: &ExpertSlice, bytes: &[u8], device: &Device) -> candle_core::Result<Matrix> {
    if slice.mxfp4 && Matrix::keeps_mxfp4(device) {
        return Matrix::mxfp4(bytes.to_vec(), slice.shape).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{} bytes are not a {:?} matrix of MXFP4 blocks",
                bytes.len(),
                slice.shape
            ))
        });
    }
    Ok(Matrix::Candle(slice.to_qmatmul(bytes, device)?))
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
        let read_one = |k: usize| {
            let s = &slices[k];
            let (buf, at) = fetch::read_range(
                &self.file,
                self.direct,
                s.offset,
                s.bytes,
                self.bypass_cache,
            )
            .map_err(|e| fail(e.to_string()))?;
            let bytes = &buf[at..at + s.bytes];
            self.checksums.check(layer, expert, k, bytes).map_err(|m| {
                fail(format!(
                    "{} slice at offset {}: {m}",
                    PROJECTIONS[k], s.offset
                ))
            })?;
            slice_matrix(s, bytes, &self.device).map_err(|e| fail(e.to_string()))
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

    fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }
}
