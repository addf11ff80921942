//! The engine against goldens recorded from Hugging Face transformers (see scripts/make_fixtures.py):
//! f32 compute from bf16 weights, every position's logits, per-layer hidden states and routing, and
//! 16 greedy tokens through the KV cache.

mod common;

use common::{fixture, golden, ids, max_abs_diff};

use candle_core::{Device, Tensor};
use odmoe_engine::generate::{GenerateRequest, Session};
use odmoe_engine::model::{ForwardTrace, KvCache, Logits};

const LOGITS_TOLERANCE: f32 = 1e-4;

fn check_fixture(name: &str) {
    let model = odmoe_engine::open::resident(&fixture(name), &Device::Cpu).unwrap();
    let g = golden(name);
    let input = ids(&g["input_ids"]);

    let mut trace = ForwardTrace::default();
    let mut cache: KvCache = model.new_cache();
    let logits = model
        .forward(&input, &mut cache, Logits::All, Some(&mut trace))
        .unwrap();
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
    let size = g["hidden_states"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let allowed = LOGITS_TOLERANCE * (size / 10.0).max(1.0);
    assert!(
        diff <= allowed,
        "{name}: max |hidden diff| {diff}, of values up to {size}"
    );

    let golden_ids = g["routing_ids"].to_vec3::<i64>().unwrap();
    let golden_weights = g["routing_weights"].to_vec3::<f32>().unwrap();
    assert_eq!(
        trace.routing.len(),
        golden_ids.len(),
        "{name}: layers routed"
    );
    for (layer, routing) in trace.routing.iter().enumerate() {
        // The golden marks dense layers (DeepSeek's first ones) with -1: nothing is routed there.
        if golden_ids[layer].iter().flatten().all(|&e| e == -1) {
            assert!(routing.ids.is_empty(), "{name}: dense layer {layer} routed");
            continue;
        }
        assert_eq!(
            routing.ids.len(),
            input.len(),
            "{name}: layer {layer} positions"
        );
        for (t, chosen) in routing.ids.iter().enumerate() {
            let expected: Vec<usize> = golden_ids[layer][t].iter().map(|&e| e as usize).collect();
            assert_eq!(
                chosen, &expected,
                "{name}: experts of layer {layer} position {t}"
            );
            for (w, gw) in routing.weights[t].iter().zip(&golden_weights[layer][t]) {
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
