//! The odmoe on-disk layout, written by `odmoe convert`:
//!
//! ```text
//! MODEL.odmoe/
//!   manifest.json      format version, architecture config, expert layout, sha256 of every file
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
//! whole expert, with O_DIRECT where the platform allows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;

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
}

/// Where the three tensors sit inside every expert file (all expert files are alike).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertLayout {
    /// Stored dtype of the expert tensors: "F32", "F16" or "BF16".
    pub dtype: String,
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

/// Path of one expert's file relative to the layout directory.
pub fn expert_path(layer: usize, expert: usize) -> String {
    format!("experts/layer_{layer:02}_expert_{expert:03}.safetensors")
}
