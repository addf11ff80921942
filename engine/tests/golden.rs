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

/// gpt-oss's windowed layers (a window of 4 in the fixture) drop the keys no query sees again:
/// a sequence long enough to drop several chunks of them gives, a token at a time, the logits of
/// one pass over the whole of it (within rounding: a prompt's products sum in other groups than a
/// token's), its windowed layers keep a fraction of the memory, and a prefix reused past the
/// dropped keys gives a fresh run's tokens. (That dropping keeps attention's bits is the kernel's
/// test, `attention_from_a_later_chunk_keeps_its_bits`.)
#[test]
fn gpt_oss_windowed_layers_drop_unseen_keys_and_keep_their_logits() {
    use odmoe_engine::generate::{GenerateRequest, Session};
    use odmoe_engine::model::Logits;
    let model = odmoe_engine::open::resident(&fixture("gpt_oss"), &Device::Cpu).unwrap();
    let input: Vec<u32> = (0..700u32).map(|i| (i * 7919 + 13) % 200 + 10).collect();
    let whole = model
        .forward(&input, &mut model.new_cache(), Logits::All, None)
        .unwrap();
    let mut cache = model.new_cache();
    let mut per_position = 0;
    for (position, &token) in input.iter().enumerate() {
        let step = model
            .forward(&[token], &mut cache, Logits::Last, None)
            .unwrap();
        let expected = whole.narrow(0, position, 1).unwrap();
        let diff = max_abs_diff(&step.reshape(expected.shape()).unwrap(), &expected);
        assert!(diff <= LOGITS_TOLERANCE, "position {position}: {diff}");
        if position == 0 {
            per_position = cache.bytes();
        }
    }
    // Two of the three layers keep their window and the chunk it starts in (at most 4 + 256
    // positions), not 700: at most a third plus two thirds of 260 / 700 of the whole.
    assert!(
        cache.bytes() < per_position * 700 * 6 / 10,
        "{} bytes cached, {per_position} a position",
        cache.bytes()
    );
    // A session that generated past 700 tokens goes on from a prefix where its windowed layers
    // kept the window, and recomputes one where they did not, with a fresh run's tokens.
    let request = |prompt: &[u32]| GenerateRequest {
        prompt: prompt.to_vec(),
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let mut session = Session::new(&model);
    session
        .generate(&model, None, &request(&input), |_| true)
        .unwrap();
    for (prefix, reusable) in [(690, 690), (300, 0)] {
        let mut prompt = input[..prefix].to_vec();
        prompt.push(5);
        let reused = session
            .generate(&model, None, &request(&prompt), |_| true)
            .unwrap();
        let fresh = Session::new(&model)
            .generate(&model, None, &request(&prompt), |_| true)
            .unwrap();
        assert_eq!(reused.cached_tokens, reusable, "prefix {prefix}");
        assert_eq!(reused.tokens, fresh.tokens, "prefix {prefix}");
        // Back to the whole input for the next prefix.
        session
            .generate(&model, None, &request(&input), |_| true)
            .unwrap();
    }
}
