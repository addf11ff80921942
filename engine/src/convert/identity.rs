//! `source.json`: what identifies the checkpoint a conversion reads, so that a resumed
//! conversion never mixes files of two checkpoints.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::layout::{self, FORMAT_VERSION};
use crate::format::safetensors::HfWeights;

/// `source.json`: what identifies the source checkpoint, cheaply. The config's SHA-256, and for
/// each weight file its name, length, and the SHA-256 of its header plus 16 evenly spaced 64 KiB
/// samples of its data (the whole file when small), which tells apart two fine-tunes of one
/// model without reading all of either.
pub(super) fn source_json(src: &Path, weights: &HfWeights) -> Result<Vec<u8>> {
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
pub(super) fn gguf_source_json(src: &Path) -> Result<Vec<u8>> {
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
