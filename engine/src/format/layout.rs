//! The odmoe on-disk layout, written by `odmoe convert`:
//!
//! ```text
//! MODEL.odmoe/
//!   manifest.json      format version, architecture config, expert layout, sha256 and xxh3-64
//!                      of every file (the expert store checks each expert read against the xxh3)
//!   source.json        which checkpoint this was converted from (config hash, weight files)
//!   config.json, tokenizer.json, tokenizer_config.json, generation_config.json (copied)
//!   base_model/        embeddings.safetensors, attention_layers.safetensors, norms.safetensors,
//!                      routers.safetensors (+ shared_experts.safetensors): original tensor names
//!   experts/           layer_LL_expert_EEE.safetensors: one expert's gate, up, down
//! ```
//!
//! Every expert file has the same shape: a safetensors header padded so that tensor data starts at
//! a multiple of [`ALIGN`], then `gate`, `up` and `down` each starting at a multiple of [`ALIGN`]
//! (padding tensors `_pad_*` fill the gaps, since safetensors allows no holes), and a file length
//! that is a multiple of [`ALIGN`]. One aligned read of `[data_offset, file_bytes)` fetches the
//! whole expert, with O_DIRECT where the platform allows. Each expert file's `__metadata__` names
//! its layer and expert (`{"format": "odmoe", "layer": "L", "expert": "E"}`); base files keep the
//! source's tensor names and dtypes, with `{"format": "pt"}` as transformers writes it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::gguf::ExpertType;

/// Version of the layout this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Alignment of expert tensor data and expert file lengths (the page and O_DIRECT block size).
pub const ALIGN: u64 = 4096;
/// Name of the manifest file in a layout directory.
pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "odmoe".
    pub format: String,
    pub format_version: u32,
    pub architecture: ModelConfig,
    /// Tokenizer file relative to the layout directory, when the source had one.
    pub tokenizer: Option<String>,
    /// Safetensors files (relative paths) holding everything but the routed experts.
    pub base_files: Vec<String>,
    pub expert: ExpertLayout,
    /// Every file of the layout except the manifest itself, by relative path.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
    /// xxh3-64 of the whole file as 16 lowercase hex digits: fast enough for the expert store to
    /// check on every read of an expert file (SHA-256 would cost more than the read). Absent in
    /// layouts written before it was recorded; the store then computes its own index once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3_64: Option<String>,
}

/// `hash` as a manifest or checksum index records an xxh3-64: 16 lowercase hex digits.
pub fn xxh3_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// The value of an xxh3-64 written by [`xxh3_hex`].
pub fn parse_xxh3_hex(text: &str) -> Option<u64> {
    (text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

/// Where the three tensors sit inside every expert file (all expert files are alike).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertLayout {
    /// Stored dtype of the expert tensors: "F32", "F16" or "BF16", [`MXFP4_DTYPE`], or
    /// [`GGUF_DTYPE`] for experts kept as the GGUF blocks they were converted from.
    pub dtype: String,
    /// For [`GGUF_DTYPE`] experts: the ggml type ("Q4_K", "Q6_K", "F16", ...) of gate, up and
    /// down in each layer (by layer index), since quantization mixtures vary them by layer. Each
    /// tensor's slot then holds the largest of its types; a layer's tensor fills the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ggml_types: Option<Vec<[String; 3]>>,
    /// Length of each expert file; a multiple of ALIGN.
    pub file_bytes: u64,
    /// Offset of the first tensor byte in each file; a multiple of ALIGN.
    pub data_offset: u64,
    /// gate, up, down in that order.
    pub tensors: [ExpertTensor; 3],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertTensor {
    /// "gate", "up" or "down".
    pub name: String,
    /// Offset from `data_offset`; a multiple of ALIGN.
    pub offset: u64,
    pub bytes: u64,
    /// `[out, in]`, as a linear layer's weight.
    pub shape: [usize; 2],
}

/// [`ExpertLayout::dtype`] of experts stored as raw GGUF blocks, U8 tensors in their files.
pub const GGUF_DTYPE: &str = "GGUF";

/// [`ExpertLayout::dtype`] of experts converted from a Hugging Face checkpoint's MXFP4 blocks
/// (gpt-oss's): ggml's MXFP4 blocks in U8 tensors, multiplied by f32 activations at their exact
/// values as the checkpoint's are.
pub const MXFP4_DTYPE: &str = "MXFP4";

/// Path of one expert's file relative to the layout directory.
pub fn expert_path(layer: usize, expert: usize) -> String {
    format!("experts/layer_{layer:02}_expert_{expert:03}.safetensors")
}

/// Name of the file recording which checkpoint a layout was converted from (see
/// [`crate::convert`]); listed in the manifest like every other file.
pub const SOURCE: &str = "source.json";

/// `n` rounded up to the next multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Bytes of `values` values in an expert dtype a layout may hold without ggml types ("F32",
/// "F16", "BF16", or [`MXFP4_DTYPE`] in whole blocks).
pub fn stored_bytes(dtype: &str, values: usize) -> Option<u64> {
    let values = values as u64;
    match dtype {
        "F32" => Some(4 * values),
        "F16" | "BF16" => Some(2 * values),
        MXFP4_DTYPE => ExpertType::Mxfp4.bytes(values as usize).map(|b| b as u64),
        _ => None,
    }
}

/// The layer and expert of an expert file's relative path, the inverse of [`expert_path`].
pub fn parse_expert_path(path: &str) -> Option<(usize, usize)> {
    let rest = path
        .strip_prefix("experts/layer_")?
        .strip_suffix(".safetensors")?;
    let (layer, expert) = rest.split_once("_expert_")?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(layer) || !all_digits(expert) {
        return None;
    }
    let (layer, expert) = (layer.parse().ok()?, expert.parse().ok()?);
    (expert_path(layer, expert) == path).then_some((layer, expert))
}

impl ExpertLayout {
    /// Bytes one read of an expert fetches: `[data_offset, file_bytes)`.
    pub fn read_bytes(&self) -> u64 {
        self.file_bytes - self.data_offset
    }

    /// Bytes of the three weight tensors alone, in the stored dtype.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// The types of `layer`'s gate, up and down, for [`GGUF_DTYPE`] experts.
    pub fn ggml_types(&self, layer: usize) -> Option<[ExpertType; 3]> {
        let names = self.ggml_types.as_ref()?.get(layer)?;
        let [gate, up, down] = names.each_ref().map(|n| ExpertType::parse(n));
        Some([gate?, up?, down?])
    }

    /// Checks the alignment and size invariants, and the shapes against `config`.
    pub fn check(&self, config: &ModelConfig) -> std::result::Result<(), String> {
        let gguf = self.dtype == GGUF_DTYPE;
        match (stored_bytes(&self.dtype, 32), &self.ggml_types) {
            (Some(_), None) => {}
            (None, Some(types)) if gguf => {
                if types.len() != config.num_layers {
                    return Err(format!(
                        "ggml_types lists {} layers, the model has {}",
                        types.len(),
                        config.num_layers
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "expert dtype {:?} is not supported (F32, F16, BF16, {MXFP4_DTYPE:?}, or \
                     {GGUF_DTYPE:?} with ggml_types)",
                    self.dtype
                ));
            }
        };
        if !self.data_offset.is_multiple_of(ALIGN) || !self.file_bytes.is_multiple_of(ALIGN) {
            return Err(format!(
                "expert data offset {} and file length {} must be multiples of {ALIGN}",
                self.data_offset, self.file_bytes
            ));
        }
        let (h, i) = (config.hidden_size, config.expert_intermediate_size);
        let mut end = 0;
        for (tensor, (name, shape)) in
            self.tensors
                .iter()
                .zip([("gate", [i, h]), ("up", [i, h]), ("down", [h, i])])
        {
            if tensor.name != name || tensor.shape != shape {
                return Err(format!(
                    "expert tensor {:?} {:?} where {name:?} {shape:?} was expected",
                    tensor.name, tensor.shape
                ));
            }
            if tensor.offset % ALIGN != 0 || tensor.offset < end {
                return Err(format!(
                    "expert tensor {name:?} at offset {} is not aligned to {ALIGN} or overlaps the one before",
                    tensor.offset
                ));
            }
            if gguf {
                for layer in config.moe_layers() {
                    let types = self.ggml_types(layer).ok_or_else(|| {
                        format!("layer {layer} has unknown ggml types in ggml_types")
                    })?;
                    let k = ["gate", "up", "down"].iter().position(|n| *n == name);
                    let stored = types[k.expect("one of the three")];
                    match stored.bytes(shape[0] * shape[1]) {
                        Some(bytes) if bytes as u64 <= tensor.bytes => {}
                        _ => {
                            return Err(format!(
                                "expert tensor {name:?} {shape:?} of layer {layer} as {} does not \
                                 fill whole blocks within its {} bytes",
                                stored.name(),
                                tensor.bytes
                            ));
                        }
                    }
                }
            } else {
                let expected = stored_bytes(&self.dtype, shape[0] * shape[1]);
                if expected != Some(tensor.bytes) {
                    return Err(match expected {
                        Some(bytes) => format!(
                            "expert tensor {name:?} has {} bytes, but {shape:?} {} takes {bytes}",
                            tensor.bytes, self.dtype
                        ),
                        None => format!(
                            "expert tensor {name:?} {shape:?} is not whole 32-value {} blocks",
                            self.dtype
                        ),
                    });
                }
            }
            end = tensor.offset + tensor.bytes;
        }
        if self.data_offset + end > self.file_bytes {
            return Err(format!(
                "expert tensors end at byte {} of a {}-byte file",
                self.data_offset + end,
                self.file_bytes
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`. A directory without one is not a layout, or one whose
    /// conversion has not finished (the manifest is written last).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = if dir.join(SOURCE).exists() {
                    "conversion incomplete: re-run `odmoe convert` to finish it"
                } else {
                    "not an odmoe layout or conversion incomplete"
                };
                return Err(Error::config(&path, format!("no {MANIFEST}: {why}")));
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let json_error = |error| Error::Json {
            path: path.clone(),
            error,
        };
        // Format and version first, so that a newer layout is refused with a clear message
        // rather than with whatever field it renamed.
        let value: serde_json::Value = serde_json::from_str(&text).map_err(json_error)?;
        let format = value.get("format").and_then(|v| v.as_str());
        if format != Some("odmoe") {
            return Err(Error::config(
                &path,
                format!(
                    "format is {}, expected \"odmoe\"",
                    value
                        .get("format")
                        .map_or("missing".into(), |v| v.to_string())
                ),
            ));
        }
        let version = value.get("format_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(FORMAT_VERSION)) {
            return Err(Error::config(
                &path,
                format!(
                    "format_version {} is not supported (this build reads version {FORMAT_VERSION})",
                    value
                        .get("format_version")
                        .map_or("missing".into(), |v| v.to_string())
                ),
            ));
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(json_error)?;
        manifest.check().map_err(|m| Error::config(&path, m))?;
        Ok(manifest)
    }

    /// The manifest as written to disk: pretty JSON with a final newline. Deterministic, since
    /// files are kept in a sorted map.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest always serialises");
        text.push('\n');
        text
    }

    /// Every expert file as (layer, expert, relative path), layer by layer (dense layers have
    /// none).
    pub fn expert_files(&self) -> impl Iterator<Item = (usize, usize, String)> + '_ {
        let experts = self.architecture.num_experts;
        self.architecture
            .moe_layers()
            .flat_map(move |l| (0..experts).map(move |e| (l, e, expert_path(l, e))))
    }

    /// Internal consistency: expert layout invariants, and every file the layout needs listed.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        self.expert.check(&self.architecture)?;
        let listed = |rel: &str| -> std::result::Result<(), String> {
            if self.files.contains_key(rel) {
                Ok(())
            } else {
                Err(format!("{rel} is not listed in \"files\""))
            }
        };
        for rel in &self.base_files {
            listed(rel)?;
        }
        if let Some(tokenizer) = &self.tokenizer {
            listed(tokenizer)?;
        }
        for (_, _, rel) in self.expert_files() {
            listed(&rel)?;
            if self.files[&rel].bytes != self.expert.file_bytes {
                return Err(format!(
                    "{rel} is listed with {} bytes, but expert files have {}",
                    self.files[&rel].bytes, self.expert.file_bytes
                ));
            }
        }
        for (rel, entry) in &self.files {
            if rel.starts_with('/') || rel.split('/').any(|part| part == ".." || part.is_empty()) {
                return Err(format!("file path {rel:?} leaves the layout directory"));
            }
            if let Some(xxh3) = &entry.xxh3_64
                && parse_xxh3_hex(xxh3).is_none()
            {
                return Err(format!(
                    "{rel} has xxh3_64 {xxh3:?}, which is not 16 hex digits"
                ));
            }
        }
        Ok(())
    }
}

/// A file's manifest entry: its SHA-256, length and xxh3-64, with `progress(bytes)` called as it
/// is read.
pub fn hash_file(path: &Path, mut progress: impl FnMut(u64)) -> Result<FileEntry> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = FileHasher::default();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        hasher.update(&buffer[..n]);
        progress(n as u64);
    }
    Ok(hasher.finish())
}

/// Computes a [`FileEntry`] from a file's bytes as they stream past (read or written).
#[derive(Default)]
pub struct FileHasher {
    sha256: sha2::Sha256,
    xxh3: xxhash_rust::xxh3::Xxh3Default,
    bytes: u64,
}

impl FileHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        self.sha256.update(bytes);
        self.xxh3.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    pub fn finish(self) -> FileEntry {
        use sha2::Digest;
        FileEntry {
            sha256: hex(&self.sha256.finalize()),
            bytes: self.bytes,
            xxh3_64: Some(xxh3_hex(self.xxh3.digest())),
        }
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// What [`verify`] found wrong with one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyProblem {
    /// Relative path in the layout.
    pub file: String,
    /// Set for expert files.
    pub layer: Option<usize>,
    pub expert: Option<usize>,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    Missing,
    Size {
        expected: u64,
        actual: u64,
    },
    Checksum {
        expected: String,
        actual: String,
    },
    /// The SHA-256 matches but the xxh3-64 the expert store checks every read against does not:
    /// the manifest is inconsistent, and the store would refuse the file.
    Xxh3 {
        expected: String,
        actual: String,
    },
    Unreadable {
        message: String,
    },
}

impl std::fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(layer), Some(expert)) = (self.layer, self.expert) {
            write!(f, " (layer {layer}, expert {expert})")?;
        }
        match &self.problem {
            Problem::Missing => write!(f, ": missing"),
            Problem::Size { expected, actual } => {
                write!(f, ": {actual} bytes, expected {expected}")
            }
            Problem::Checksum { expected, actual } => {
                write!(f, ": sha256 mismatch: expected {expected}, found {actual}")
            }
            Problem::Xxh3 { expected, actual } => write!(
                f,
                ": xxh3_64 mismatch (the sha256 matches): expected {expected}, found {actual}"
            ),
            Problem::Unreadable { message } => write!(f, ": unreadable: {message}"),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub files_checked: usize,
    pub bytes_checked: u64,
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Progress of [`verify`], reported as files are read.
#[derive(Clone, Debug)]
pub struct VerifyProgress<'a> {
    pub file: &'a str,
    pub files_done: usize,
    pub files_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Re-reads every file the manifest of `dir` lists and compares its length, SHA-256 and (where
/// recorded) xxh3-64. A broken manifest is an `Err`; broken files are the report's problems.
pub fn verify(dir: &Path, mut progress: impl FnMut(&VerifyProgress)) -> Result<VerifyReport> {
    let manifest = Manifest::load(dir)?;
    let files_total = manifest.files.len();
    let bytes_total = manifest.files.values().map(|f| f.bytes).sum();
    let mut report = VerifyReport::default();
    let mut bytes_done = 0u64;
    for (i, (rel, entry)) in manifest.files.iter().enumerate() {
        let (layer, expert) = parse_expert_path(rel).unzip();
        let problem = |problem| VerifyProblem {
            file: rel.clone(),
            layer,
            expert,
            problem,
        };
        let path = dir.join(rel);
        let found = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Some(meta.len()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                report.problems.push(problem(Problem::Unreadable {
                    message: e.to_string(),
                }));
                bytes_done += entry.bytes;
                continue;
            }
        };
        match found {
            None => report.problems.push(problem(Problem::Missing)),
            Some(actual) if actual != entry.bytes => report.problems.push(problem(Problem::Size {
                expected: entry.bytes,
                actual,
            })),
            Some(_) => {
                let start = bytes_done;
                let mut done = 0;
                let hashed = hash_file(&path, |n| {
                    done += n;
                    progress(&VerifyProgress {
                        file: rel,
                        files_done: i,
                        files_total,
                        bytes_done: start + done,
                        bytes_total,
                    });
                });
                match hashed {
                    Ok(found) => {
                        report.bytes_checked += found.bytes;
                        if found.sha256 != entry.sha256 {
                            report.problems.push(problem(Problem::Checksum {
                                expected: entry.sha256.clone(),
                                actual: found.sha256,
                            }));
                        } else if let (Some(expected), Some(actual)) =
                            (&entry.xxh3_64, found.xxh3_64)
                            && *expected != actual
                        {
                            report.problems.push(problem(Problem::Xxh3 {
                                expected: expected.clone(),
                                actual,
                            }));
                        }
                    }
                    Err(e) => report.problems.push(problem(Problem::Unreadable {
                        message: e.to_string(),
                    })),
                }
            }
        }
        bytes_done += entry.bytes;
        report.files_checked += 1;
        progress(&VerifyProgress {
            file: rel,
            files_done: i + 1,
            files_total,
            bytes_done,
            bytes_total,
        });
    }
    Ok(report)
}
