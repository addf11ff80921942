//! Helpers shared by the engine's integration tests: fixture paths, goldens, comparisons.
// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use odmoe_engine::generate::{GenerateRequest, Session};
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
