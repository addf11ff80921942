//! `odmoe convert`: a Hugging Face checkpoint directory or a GGUF file to the odmoe layout of
//! [`crate::format::layout`]; and `--split-experts`, a dense Llama cut into experts ([`split`]).
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

mod headers;
mod identity;
mod placement;
mod plan;
pub mod split;
mod writer;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::layout::{Manifest, expert_path};
use crate::model::BaseGroup;
use plan::Plan;
use writer::Writer;

/// Base-model files, in the order they are written (each only when it has tensors).
pub const EMBEDDINGS: &str = "base_model/embeddings.safetensors";
pub const ATTENTION: &str = "base_model/attention_layers.safetensors";
pub const NORMS: &str = "base_model/norms.safetensors";
pub const ROUTERS: &str = "base_model/routers.safetensors";
pub const SHARED_EXPERTS: &str = "base_model/shared_experts.safetensors";

/// The base file of each [`BaseGroup`].
fn base_file_of(group: BaseGroup) -> &'static str {
    match group {
        BaseGroup::Embeddings => EMBEDDINGS,
        BaseGroup::Attention => ATTENTION,
        BaseGroup::Norms => NORMS,
        BaseGroup::Routers => ROUTERS,
        BaseGroup::AlwaysOn => SHARED_EXPERTS,
    }
}

/// Files copied unchanged from the source directory when present.
pub const COPIED_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// The suffix of a file being written, renamed away when complete.
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
