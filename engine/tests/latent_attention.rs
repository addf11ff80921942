//! Multi-head latent attention (DeepSeek-V3, Kimi-K2): the absorbed form that decode uses equals
//! the expanded form that transformers computes, step by step over a long decode, and the KV
//! cache holds only the compressed latent and the rotary key.
//!
//! The two forms associate the same sums differently, so in f32 they agree to rounding, which
//! grows with the logits' size: the bound is 1e-5 of the largest logit (on these fixtures logits
//! reach about 7, and the forms differ by at most about 2e-5 absolute).

mod common;

use common::{fixture, golden, ids, max_abs_diff};

use candle_core::Device;
use odmoe_engine::model::layers::argmax;
use odmoe_engine::model::{LatentForm, Logits, Model};

const STEPS: usize = 64;
/// Largest difference allowed, relative to the largest logit of the step.
const RELATIVE_TOLERANCE: f32 = 1e-5;

fn model(name: &str, form: LatentForm) -> Model {
    let mut model = Model::load_resident(&fixture(name), &Device::Cpu).unwrap();
    model.set_latent_form(form);
    model
}

/// Prefills the golden prompt and decodes `STEPS` greedy tokens (chosen by the expanded form) in
/// both forms, comparing every step's logits; returns the largest absolute and relative
/// differences seen.
fn absorbed_against_expanded(name: &str) -> (f32, f32) {
    let expanded = model(name, LatentForm::Expanded);
    let absorbed = model(name, LatentForm::Absorbed);
    let prompt = ids(&golden(name)["input_ids"]);
    let (mut cache_e, mut cache_a) = (expanded.new_cache(), absorbed.new_cache());
    let mut tokens = prompt.clone();
    let (mut worst, mut worst_relative) = (0f32, 0f32);
    for step in 0..=STEPS {
        let input = if step == 0 {
            &prompt[..]
        } else {
            &tokens[tokens.len() - 1..]
        };
        let a = expanded
            .forward(input, &mut cache_e, Logits::Last, None)
            .unwrap();
        let b = absorbed
            .forward(input, &mut cache_a, Logits::Last, None)
            .unwrap();
        let diff = max_abs_diff(&a, &b);
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= RELATIVE_TOLERANCE * scale.max(1.0),
            "{name}: step {step}: absorbed and expanded logits differ by {diff} (largest logit {scale})"
        );
        worst = worst.max(diff);
        worst_relative = worst_relative.max(diff / scale.max(1.0));
        let row = a.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        tokens.push(argmax(&row) as u32);
    }
    assert_eq!(cache_e.len(), prompt.len() + STEPS);
    (worst, worst_relative)
}

#[test]
fn absorbed_decode_equals_expanded_over_64_steps() {
    for name in ["deepseek_v3", "kimi_k2"] {
        let (worst, relative) = absorbed_against_expanded(name);
        println!(
            "{name}: max |absorbed - expanded| over {STEPS} steps: {worst:.2e} ({relative:.2e} of the largest logit)"
        );
    }
}

#[test]
fn the_cache_holds_latents_not_keys_and_values() {
    for name in ["deepseek_v3", "kimi_k2"] {
        let model = model(name, LatentForm::Auto);
        let prompt = ids(&golden(name)["input_ids"]);
        let mut cache = model.new_cache();
        model
            .forward(&prompt, &mut cache, Logits::Last, None)
            .unwrap();
        model.forward(&[1], &mut cache, Logits::Last, None).unwrap();
        let per_token = model.config.kv_cache_bytes_per_token(4);
        assert_eq!(cache.bytes(), (prompt.len() + 1) * per_token, "{name}");
        let latent = model.config.deepseek.as_ref().unwrap().attention.clone();
        // Expanded keys and values would take heads x (qk + v) per layer instead.
        assert_eq!(
            per_token,
            model.config.num_layers * (latent.kv_lora_rank + latent.qk_rope_head_dim) * 4
        );
    }
}
