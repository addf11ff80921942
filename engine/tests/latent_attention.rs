//! Multi-head latent attention (DeepSeek-V3, Kimi-K2): the absorbed form that decode uses equals
//! the expanded form that transformers computes, step by step over a long decode, and the KV
//! cache holds only the compressed latent and the rotary key.
//!
//! The two forms associate the same sums differently. Summed in f64 (which proves the algebra)
//! they must agree within 1e-5 absolute (measured: 0, to the last f32 bit on both fixtures). In
//! f32, the default for speed, they moved the logits by up to 2.1e-5 over these 64 steps (f32
//! expanded is itself 1.5e-5 from the f64 answer); that is bounded at 5e-5. A prompt longer
//! than a tile of queries checks the expanded form's tiles against the absorbed form's one piece.

mod common;

use common::{fixture, golden, ids, max_abs_diff};

use candle_core::{DType, Device};
use odmoe_engine::model::layers::argmax;
use odmoe_engine::model::{KvType, LatentForm, Logits, Model};

const STEPS: usize = 64;

fn model(name: &str, form: LatentForm, accumulate: DType) -> Model {
    let mut model = odmoe_engine::open::resident(&fixture(name), &Device::Cpu).unwrap();
    model.set_latent_form(form);
    model.set_latent_precision(accumulate);
    model
}

/// Prefills the golden prompt and decodes `STEPS` greedy tokens (chosen by the expanded form) in
/// both forms summing in `accumulate`, comparing every step's logits against `tolerance`;
/// returns the largest difference seen.
fn absorbed_against_expanded(name: &str, accumulate: DType, tolerance: f32) -> f32 {
    let expanded = model(name, LatentForm::Expanded, accumulate);
    let absorbed = model(name, LatentForm::Absorbed, accumulate);
    let prompt = ids(&golden(name)["input_ids"]);
    let (mut cache_e, mut cache_a) = (expanded.new_cache(), absorbed.new_cache());
    let mut tokens = prompt.clone();
    let mut worst = 0f32;
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
        assert!(
            diff <= tolerance,
            "{name}: step {step}: absorbed and expanded logits differ by {diff}"
        );
        worst = worst.max(diff);
        let row = a.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        tokens.push(argmax(&row) as u32);
    }
    assert_eq!(cache_e.len(), prompt.len() + STEPS);
    worst
}

#[test]
fn absorbed_decode_equals_expanded_over_64_steps() {
    for name in ["deepseek_v3", "kimi_k2"] {
        for (accumulate, tolerance) in [(DType::F64, 1e-5), (DType::F32, 5e-5)] {
            let worst = absorbed_against_expanded(name, accumulate, tolerance);
            println!(
                "{name}, {accumulate:?} sums: max |absorbed - expanded| over {STEPS} steps: {worst:.2e}"
            );
        }
    }
}

/// A prompt longer than one tile of queries: the expanded form (in tiles) and the absorbed form
/// (in one piece, with a whole `[T, S]` mask) agree at every position, summed in f64.
#[test]
fn a_long_prompt_in_tiles_equals_one_piece() {
    for name in ["deepseek_v3", "kimi_k2"] {
        let expanded = model(name, LatentForm::Expanded, DType::F64);
        let absorbed = model(name, LatentForm::Absorbed, DType::F64);
        let vocab = expanded.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..600u32).map(|i| (i * 7919 + 13) % vocab).collect();
        // The first 100 positions, then 500 more after them: tiles at an offset into the cache.
        let all = |m: &Model| {
            let mut cache = m.new_cache();
            m.forward(&prompt[..100], &mut cache, Logits::All, None)
                .unwrap();
            m.forward(&prompt[100..], &mut cache, Logits::All, None)
                .unwrap()
        };
        let diff = max_abs_diff(&all(&expanded), &all(&absorbed));
        assert!(
            diff <= 1e-5,
            "{name}: tiled and whole attention differ by {diff}"
        );
    }
}

#[test]
fn the_cache_holds_latents_not_keys_and_values() {
    for name in ["deepseek_v3", "kimi_k2"] {
        let model = model(name, LatentForm::Auto, DType::F32);
        let prompt = ids(&golden(name)["input_ids"]);
        let mut cache = model.new_cache();
        model
            .forward(&prompt, &mut cache, Logits::Last, None)
            .unwrap();
        model.forward(&[1], &mut cache, Logits::Last, None).unwrap();
        let per_token = model.config.kv_cache_bytes_per_token(4);
        assert_eq!(cache.bytes(), (prompt.len() + 1) * per_token, "{name}");
        let latent = model.config.latent_attention().unwrap().clone();
        // Expanded keys and values would take heads x (qk + v) per layer instead.
        assert_eq!(
            per_token,
            model.config.num_layers * (latent.kv_lora_rank + latent.qk_rope_head_dim) * 4
        );
    }
}

/// With the cache in f16 (odmoe's and odmoed's default) the latents are kept in f16: half the
/// bytes of f32, and the logits stay near the f32 cache's over a prompt and decode steps.
#[test]
fn an_f16_cache_keeps_latents_in_half_the_bytes() {
    for name in ["deepseek_v3", "kimi_k2"] {
        let model = model(name, LatentForm::Auto, DType::F32);
        let prompt = ids(&golden(name)["input_ids"]);
        let mut wide = model.new_cache();
        let mut half = model.new_cache().with_kind(KvType::F16);
        let mut worst = 0f32;
        for input in [&prompt[..], &[1], &[2], &[3]] {
            let a = model.forward(input, &mut wide, Logits::Last, None).unwrap();
            let b = model.forward(input, &mut half, Logits::Last, None).unwrap();
            worst = worst.max(max_abs_diff(&a, &b));
        }
        println!("{name}: max |f16 cache - f32 cache| logits: {worst:.2e}");
        assert!(worst > 0.0 && worst < 2e-2, "{name}: {worst}");
        assert_eq!(half.bytes() * 2, wide.bytes(), "{name}");
        assert_eq!(
            half.bytes(),
            (prompt.len() + 3) * model.config.kv_cache_bytes_per_token(2)
        );
    }
}
