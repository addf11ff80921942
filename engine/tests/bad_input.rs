//! Broken checkpoints give errors that name the file or tensor at fault, never a panic.

mod common;

use common::fixture;

use std::fs;
use std::path::Path;

use candle_core::Device;

/// A writable copy of a fixture.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match odmoe_engine::open::resident(dir, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_weights_file_is_named() {
    let dir = copy_fixture("qwen3_moe");
    fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("mixtral");
    fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("model-00002-of-00003.safetensors"),
        "{message}"
    );
}

#[test]
fn unknown_model_type_is_named() {
    let dir = copy_fixture("qwen2_moe");
    let config = dir.path().join("config.json");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("\"qwen2_moe\"", "\"jamba\"");
    fs::write(&config, text).unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("jamba") && message.contains("config.json"),
        "{message}"
    );
}

#[test]
fn wrong_tensor_shape_is_named() {
    // A config that disagrees with the weights: every expert tensor has the wrong width.
    let dir = copy_fixture("qwen2_moe");
    let config = dir.path().join("config.json");
    let text = fs::read_to_string(&config).unwrap().replace(
        "\"moe_intermediate_size\": 32",
        "\"moe_intermediate_size\": 48",
    );
    fs::write(&config, text).unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("model.layers.0.mlp.experts.0.gate_proj.weight")
            && message.contains("[32, 64]")
            && message.contains("[48, 64]"),
        "{message}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = copy_fixture("qwen3_moe");
    let weights = dir.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("model.safetensors") && message.contains("safetensors"),
        "{message}"
    );
}

#[test]
fn garbage_header_is_named() {
    let dir = copy_fixture("qwen3_moe");
    fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file at all",
    )
    .unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn malformed_config_is_named() {
    let dir = copy_fixture("qwen3_moe");
    fs::write(dir.path().join("config.json"), b"{\"model_type\": ").unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("config.json") && message.contains("JSON"),
        "{message}"
    );
}

/// A GGUF file holding one tensor of ggml type `ggml_type` (shape 32, no metadata).
fn gguf_with_tensor_type(path: &Path, ggml_type: u32) {
    gguf_with(path, &[("blk.0.ffn_up_exps.weight", ggml_type, 0)], None);
}

/// A GGUF file of `tensors` (name, ggml type, data offset; shape 32 each) and, when given, a
/// `general.alignment` of `alignment` (a u32).
fn gguf_with(path: &Path, tensors: &[(&str, u32, u64)], alignment: Option<u32>) {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes()); // version
    bytes.extend((tensors.len() as u64).to_le_bytes());
    bytes.extend(u64::from(alignment.is_some()).to_le_bytes()); // metadata pairs
    if let Some(alignment) = alignment {
        let key = b"general.alignment";
        bytes.extend((key.len() as u64).to_le_bytes());
        bytes.extend(key);
        bytes.extend(4u32.to_le_bytes()); // u32
        bytes.extend(alignment.to_le_bytes());
    }
    for (name, ggml_type, offset) in tensors {
        bytes.extend((name.len() as u64).to_le_bytes());
        bytes.extend(name.as_bytes());
        bytes.extend(1u32.to_le_bytes()); // dimensions
        bytes.extend(32u64.to_le_bytes());
        bytes.extend(ggml_type.to_le_bytes());
        bytes.extend(offset.to_le_bytes());
    }
    bytes.resize(bytes.len().next_multiple_of(32) + 256, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn gguf_headers_that_would_misplace_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let open = |path: &Path| {
        odmoe_engine::format::gguf::GgufFile::open(path, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
    };
    gguf_with(&path, &[("a", 0, 0), ("a", 0, 128)], None);
    assert!(open(&path).is_some_and(|e| e.contains("listed twice")));
    gguf_with(&path, &[("a", 0, 0)], Some(48));
    assert!(open(&path).is_some_and(|e| e.contains("power of two")));
    // An offset that wraps past the end of the address space.
    gguf_with(&path, &[("a", 0, u64::MAX - 8)], None);
    assert!(open(&path).is_some_and(|e| e.contains("truncated")));
    gguf_with(&path, &[("a", 0, 0)], Some(64));
    assert_eq!(open(&path), None);
}

#[test]
fn gguf_tensor_types_not_read_yet_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq.gguf");
    gguf_with_tensor_type(&path, 23);
    let err = odmoe_engine::format::gguf::GgufFile::open(&path, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("iq.gguf")
            && err.contains("IQ4_XS")
            && err.contains("type 23")
            && err.contains("blk.0.ffn_up_exps.weight"),
        "{err}"
    );
    // MXFP4 (gpt-oss's experts) is read; the rest of a file's types as candle reads them.
    let path = dir.path().join("mxfp4.gguf");
    gguf_with_tensor_type(&path, 39);
    let gguf = odmoe_engine::format::gguf::GgufFile::open(&path, &Device::Cpu).unwrap();
    assert_eq!(gguf.tensor_shape("blk.0.ffn_up_exps.weight").unwrap(), [32]);
    // A tensor whose bytes run past the end of the file.
    std::fs::write(&path, &std::fs::read(&path).unwrap()[..40]).unwrap();
    assert!(odmoe_engine::format::gguf::GgufFile::open(&path, &Device::Cpu).is_err());
}
