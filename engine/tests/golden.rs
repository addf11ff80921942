//! The engine against goldens recorded from Hugging Face transformers (see scripts/make_fixtures.py):
//! f32 compute from bf16 weights, every position's logits, per-layer hidden states and routing, and
//! 16 greedy tokens through the KV cache.

mod common;

use common::{assert_routing_ids, fixture, forward_traced, golden, ids, max_abs, max_abs_diff};

use candle_core::{Device, Tensor};
use odmoe_engine::generate::{GenerateRequest, Session};

const LOGITS_TOLERANCE: f32 = 1e-4;

fn check_fixture(name: &str) {
    let model = odmoe_engine::open::resident(&fixture(name), &Device::Cpu).unwrap();
    let g = golden(name);
    let input = ids(&g["input_ids"]);

    let (logits, trace) = forward_traced(&model, &input);
    let diff = max_abs_diff(&logits, &g["logits"]);
    println!(
        "{name}: max |logit diff| {diff:.2e} over {} positions",
        input.len()
    );
    assert!(diff <= LOGITS_TOLERANCE, "{name}: max |logit diff| {diff}");

    // Hidden states are held to the same tolerance relative to their size (gpt-oss's large
    // expert weights make them reach hundreds; the others' stay near ten).
    let hidden = Tensor::stack(&trace.hidden_states, 0).unwrap();
    let diff = max_abs_diff(&hidden, &g["hidden_states"]);
    let size = max_abs(&g["hidden_states"]);
    let allowed = LOGITS_TOLERANCE * (size / 10.0).max(1.0);
    assert!(
        diff <= allowed,
        "{name}: max |hidden diff| {diff}, of values up to {size}"
    );

    // The experts chosen (dense layers, marked -1, route nothing), then the weights they carry.
    assert_routing_ids(name, &trace, &g["routing_ids"]);
    let golden_weights = g["routing_weights"].to_vec3::<f32>().unwrap();
    for (routing, golden) in trace.routing.iter().zip(&golden_weights) {
        for (weights, golden) in routing.weights.iter().zip(golden) {
            for (w, gw) in weights.iter().zip(golden) {
                assert!((w - gw).abs() < 1e-5, "{name}: routing weight {w} vs {gw}");
            }
        }
    }

    let mut session = Session::new(&model);
    let request = GenerateRequest {
        prompt: input.clone(),
        max_tokens: 16,
        ignore_eos: true,
        ..GenerateRequest::default()
    };
    let out = session.generate(&model, None, &request, |_| true).unwrap();
    assert_eq!(
        out.tokens,
        ids(&g["greedy_tokens"]),
        "{name}: greedy tokens"
    );
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_fixture("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_fixture("qwen3_moe");
}

#[test]
fn mixtral_matches_transformers() {
    check_fixture("mixtral");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_fixture("deepseek_v3");
}

#[test]
fn kimi_k2_matches_transformers() {
    check_fixture("kimi_k2");
}

#[test]
fn glm4_moe_matches_transformers() {
    check_fixture("glm4_moe");
}

#[test]
fn gpt_oss_matches_transformers() {
    check_fixture("gpt_oss");
}

/// gpt-oss with its experts in MXFP4 as OpenAI's checkpoints keep them (blocks and scales):
/// against transformers computing from the same blocks dequantized.
#[test]
fn gpt_oss_in_mxfp4_matches_transformers() {
    check_fixture("gpt_oss_mxfp4");
}
