//! Helpers shared by the engine's integration tests: fixture paths, goldens, comparisons.
// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use odmoe_engine::format::gguf::{gguf_name, stacked_expert_names};
use odmoe_engine::format::safetensors::HfWeights;
use odmoe_engine::generate::{GenerateRequest, Session};
use odmoe_engine::model::expert_tensor_names;
use odmoe_engine::model::{ForwardTrace, Logits, Model};

/// A committed fixture under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// What a set-up script fetched into `$HOME/.cache/odmoe/<name>`, or into `$env` when set.
pub fn fetched(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/odmoe")
            .join(name)
    })
}

/// The goldens of a Hugging Face fixture.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

/// Token ids stored as an I64 tensor.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// The largest absolute difference between two equally long runs of values.
pub fn max_abs_diff_of(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// The largest magnitude in `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Logits for every position of `input` from a fresh cache, and what the pass saw.
pub fn forward_traced(model: &Model, input: &[u32]) -> (Tensor, ForwardTrace) {
    let mut trace = ForwardTrace::default();
    let logits = model
        .forward(input, &mut model.new_cache(), Logits::All, Some(&mut trace))
        .unwrap();
    (logits, trace)
}

/// Asserts that `trace` chose, at every layer and position and in order, the experts of
/// `golden` `[layers, positions, k]`, which marks dense layers (nothing routed) with -1.
pub fn assert_routing_ids(name: &str, trace: &ForwardTrace, golden: &Tensor) {
    let golden = golden.to_vec3::<i64>().unwrap();
    assert_eq!(trace.routing.len(), golden.len(), "{name}: layers routed");
    for (layer, (routing, expected)) in trace.routing.iter().zip(&golden).enumerate() {
        if expected.iter().flatten().all(|&e| e == -1) {
            assert!(routing.ids.is_empty(), "{name}: dense layer {layer} routed");
            continue;
        }
        assert_eq!(
            routing.ids.len(),
            expected.len(),
            "{name}: layer {layer} positions"
        );
        for (t, (chosen, expected)) in routing.ids.iter().zip(expected).enumerate() {
            let expected: Vec<usize> = expected.iter().map(|&e| e as usize).collect();
            assert_eq!(
                chosen, &expected,
                "{name}: experts of layer {layer} position {t}"
            );
        }
    }
}

/// Every position's logits for `input` as raw f32 bits, and `max_tokens` greedy tokens after it:
/// what must not change, bit for bit, however experts are provided.
pub fn logit_bits_and_greedy(
    model: &Model,
    input: &[u32],
    max_tokens: usize,
) -> (Vec<u32>, Vec<u32>) {
    let logits = model
        .forward(input, &mut model.new_cache(), Logits::All, None)
        .unwrap();
    let bits = logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let request = GenerateRequest {
        prompt: input.to_vec(),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let tokens = Session::new(model)
        .generate(model, None, &request, |_| true)
        .unwrap()
        .tokens;
    (bits, tokens)
}

/// Writes the qwen3_moe fixture as GGUF with expert tensors in `expert_type`, skipping metadata
/// keys in `omit`. With `expert_width`, the experts are that wide and their weights made up
/// (deterministic, of the fixture's scale) rather than the fixture's.
pub fn write_qwen3_gguf(
    path: &Path,
    expert_type: GgmlDType,
    omit: &[&str],
    expert_width: Option<usize>,
) {
    let dir = fixture("qwen3_moe");
    let config = odmoe_engine::model::config_from_hf_file(&dir.join("config.json")).unwrap();
    let weights = HfWeights::open(&dir, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in weights.names() {
        if name.contains(".mlp.experts.") {
            continue;
        }
        let t = weights.tensor(name, weights.raw(name).unwrap().1).unwrap();
        let gguf = gguf_name(name).unwrap_or_else(|| panic!("no GGUF name for {name}"));
        tensors.push((gguf, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let h = config.hidden_size;
    let i = expert_width.unwrap_or(config.expert_intermediate_size);
    for layer in 0..config.num_layers {
        for (part, shape) in [[i, h], [i, h], [h, i]].into_iter().enumerate() {
            let stacked = match expert_width {
                None => {
                    let experts: Vec<Tensor> = (0..config.num_experts)
                        .map(|e| {
                            let names = expert_tensor_names(&config, layer, e);
                            weights
                                .tensor(&format!("{}.weight", names[part]), &shape)
                                .unwrap()
                        })
                        .collect();
                    Tensor::stack(&experts, 0).unwrap()
                }
                Some(_) => {
                    made_up_weights(&[config.num_experts, shape[0], shape[1]], layer * 3 + part)
                }
            };
            let name = stacked_expert_names(layer)[part].clone();
            tensors.push((name, QTensor::quantize(&stacked, expert_type).unwrap()));
        }
    }
    let u = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("qwen3moe".into())),
        ("qwen3moe.block_count", u(config.num_layers)),
        ("qwen3moe.embedding_length", u(h)),
        ("qwen3moe.attention.head_count", u(config.num_heads)),
        ("qwen3moe.attention.head_count_kv", u(config.num_kv_heads)),
        ("qwen3moe.attention.key_length", u(config.head_dim)),
        (
            "qwen3moe.attention.layer_norm_rms_epsilon",
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            "qwen3moe.rope.freq_base",
            Value::F32(config.rope_theta as f32),
        ),
        ("qwen3moe.context_length", u(config.max_position_embeddings)),
        ("qwen3moe.expert_count", u(config.num_experts)),
        (
            "qwen3moe.expert_used_count",
            u(config.num_experts_per_token),
        ),
        ("qwen3moe.expert_feed_forward_length", u(i)),
        ("tokenizer.ggml.eos_token_id", u(2)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata
        .iter()
        .filter(|(k, _)| !omit.contains(k))
        .map(|(k, v)| (*k, v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// Weights of `shape` spread over about +-0.1 (a fixture's scale), different for each `seed`.
fn made_up_weights(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|k| 0.1 * ((k as f32) * 0.618_034 + seed as f32 * 1.7).sin())
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}
