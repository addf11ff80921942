//! GGUF files made by llama.cpp's converter in BF16 (built by scripts/make_gguf_bf16_fixtures.py),
//! read in place:
//! - DeepSeek-V3 (arch `deepseek2`, from tests/fixtures/deepseek_v3): latent attention rebuilt
//!   from `attn_k_b` / `attn_v_b`, YaRN and sigmoid group routing from `deepseek2.*` metadata,
//!   dense first layer, shared experts, stacked routed experts.
//! - GLM-4.5 (arch `glm4moe`, from tests/fixtures/glm4_moe): attention biases and QK-norm,
//!   rotary on half of each head (`rope.dimension_count`), the norm before the feed-forward
//!   named `post_attention_norm`, and DeepSeek-V3's routing.
//! - gpt-oss (arch `gpt-oss`, from tests/fixtures/gpt_oss, experts in BF16): attention sinks,
//!   alternating sliding windows, YaRN, a biased router, experts with biases and the clamped
//!   SwiGLU.
//!
//! The BF16 weights are the checkpoints' exactly, so the logits must match transformers'
//! (`hf_logits`; DeepSeek's computed with mscale = mscale_all_dim as the GGUF can only say)
//! within 1e-4, and llama.cpp's own logits on the same weights (f32, f32 KV cache) as closely,
//! but for gpt-oss, where llama.cpp itself is 0.035 from transformers.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{
    assert_routing_ids, fixture, forward_traced, ids, logit_bits_and_greedy, max_abs_diff,
};
use odmoe_engine::config::ModelConfig;
use odmoe_engine::format::gguf::GgufFile;
use odmoe_engine::model::Logits;
use odmoe_engine::open::{self, ExpertMode, LoadOptions};
use odmoe_engine::store::StoreConfig;

const DEEPSEEK: &str = "deepseek_v3";
const GLM: &str = "glm4_moe";
const GPT_OSS: &str = "gpt_oss";

/// The GGUF file built from the checkpoint fixture `name`.
fn path(name: &str) -> PathBuf {
    fixture("gguf").join(format!("{name}-bf16.gguf"))
}

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture("gguf").join(format!("{name}-bf16.golden.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn deepseek_v3_matches_transformers_and_llama_cpp() {
    matches_transformers_and_llama_cpp(DEEPSEEK, 1e-4);
}

#[test]
fn glm4_moe_matches_transformers_and_llama_cpp() {
    matches_transformers_and_llama_cpp(GLM, 1e-4);
}

/// llama.cpp rounds YaRN's correction range, which gpt-oss's config says not to: its logits
/// are 0.035 from transformers' (see the fixture's json), and this engine's must be as close
/// to them as they are to transformers'.
#[test]
fn gpt_oss_matches_transformers_and_llama_cpp() {
    matches_transformers_and_llama_cpp(GPT_OSS, 0.04);
}

/// Logits, routing at every layer and greedy tokens against both references: within 1e-4 of
/// transformers and `to_llama` of llama.cpp.
fn matches_transformers_and_llama_cpp(name: &str, to_llama_at_most: f32) {
    let g = golden(name);
    let model = odmoe_engine::open::resident(&path(name), &Device::Cpu).unwrap();
    let input = ids(&g["input_ids"]);
    let (logits, trace) = forward_traced(&model, &input);
    let to_hf = max_abs_diff(&logits, &g["hf_logits"]);
    let to_llama = max_abs_diff(&logits, &g["llama_logits"]);
    println!("{name}: max |diff| to transformers {to_hf:.2e}, to llama.cpp {to_llama:.2e}");
    assert!(to_hf <= 1e-4, "max |logit diff| to transformers {to_hf}");
    assert!(
        to_llama <= to_llama_at_most,
        "max |logit diff| to llama.cpp {to_llama}"
    );

    assert_routing_ids(name, &trace, &g["hf_routing_ids"]);
    let (_, greedy) = logit_bits_and_greedy(&model, &input, 16);
    assert_eq!(greedy, ids(&g["hf_greedy"]), "greedy");
    assert_eq!(greedy, ids(&g["llama_greedy"]), "llama.cpp greedy");
}

/// The config read from `name`'s GGUF metadata, and from its checkpoint's config.json.
fn configs(name: &str) -> (ModelConfig, ModelConfig) {
    let gguf = GgufFile::open(&path(name), &Device::Cpu).unwrap();
    let from_gguf = odmoe_engine::model::config_from_gguf(&gguf).unwrap();
    let from_hf =
        odmoe_engine::model::config_from_hf_file(&fixture(name).join("config.json")).unwrap();
    // The epsilon is stored as an f32.
    assert!((from_gguf.rms_norm_eps - from_hf.rms_norm_eps).abs() < 1e-12);
    (from_gguf, from_hf)
}

#[test]
fn glm4_moe_config_from_metadata_equals_the_checkpoints() {
    let (from_gguf, mut expected) = configs(GLM);
    expected.rms_norm_eps = from_gguf.rms_norm_eps;
    assert_eq!(from_gguf, expected);
}

#[test]
fn gpt_oss_config_from_metadata_equals_the_checkpoints() {
    let (from_gguf, mut expected) = configs(GPT_OSS);
    expected.rms_norm_eps = from_gguf.rms_norm_eps;
    assert_eq!(from_gguf, expected);
}

#[test]
fn deepseek_v3_config_from_metadata_equals_the_checkpoints() {
    let (from_gguf, from_hf) = configs(DEEPSEEK);
    let mut expected = from_hf.clone();
    let ds = expected.deepseek.as_mut().unwrap();
    let yarn = ds.yarn.as_mut().unwrap();
    // What the GGUF cannot say: mscale is taken to be mscale_all_dim, which is stored as
    // 0.1 * mscale_all_dim.
    let got = from_gguf.deepseek.as_ref().unwrap().yarn.as_ref().unwrap();
    let all_dim = got.mscale_all_dim.unwrap();
    assert!((all_dim - 0.8).abs() < 1e-6, "mscale_all_dim {all_dim}");
    (yarn.mscale, yarn.mscale_all_dim) = (Some(all_dim), Some(all_dim));
    expected.rms_norm_eps = from_gguf.rms_norm_eps;
    assert_eq!(from_gguf, expected);
}

/// A copy of fixture `name` with one metadata key renamed (same length, so offsets stay
/// valid).
fn with_key_renamed(dir: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path(name)).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap();
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    let out = dir.join(format!("{name}-edited.gguf"));
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn softmax_routing_and_missing_latent_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Without expert_gating_func llama.cpp routes deepseek2 with softmax (DeepSeek-V2).
    let edited = with_key_renamed(
        dir.path(),
        DEEPSEEK,
        "expert_gating_func",
        "expert_gating_fund",
    );
    let err =
        odmoe_engine::model::config_from_gguf(&GgufFile::open(&edited, &Device::Cpu).unwrap())
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("sigmoid"), "{err}");
    let edited = with_key_renamed(
        dir.path(),
        DEEPSEEK,
        "blk.1.attn_v_b.weight",
        "blk.1.attn_v_x.weight",
    );
    let err = odmoe_engine::open::resident(&edited, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("attn_v_b"), "{err}");
}

#[test]
fn experts_read_in_place_on_demand_equal_resident() {
    for name in [DEEPSEEK, GLM, GPT_OSS] {
        experts_on_demand_equal_resident(name);
    }
}

fn experts_on_demand_equal_resident(name: &str) {
    let path = path(name);
    let input = ids(&golden(name)["input_ids"]);
    let expected = logit_bits_and_greedy(
        &odmoe_engine::open::resident(&path, &Device::Cpu).unwrap(),
        &input,
        8,
    );
    let (config, total) = open::describe(&path).unwrap();
    let expert = total / (config.moe_layers().count() * config.num_experts) as u64;
    for budget in [config.num_experts_per_token as u64 * expert, total / 2] {
        let options = LoadOptions {
            experts: ExpertMode::OnDemand(StoreConfig {
                budget_bytes: budget,
                ..StoreConfig::default()
            }),
            ..LoadOptions::default()
        };
        let loaded = open::load(&path, &options, &Device::Cpu).unwrap();
        assert!(
            logit_bits_and_greedy(&loaded.model, &input, 8) == expected,
            "{name}: budget {budget}"
        );
        let stats = loaded.store.unwrap().stats();
        assert!(stats.misses > 0);
    }
}

#[test]
fn a_glm_file_that_does_not_name_its_gating_routes_with_sigmoid_as_llama_cpp_does() {
    let dir = tempfile::tempdir().unwrap();
    let edited = with_key_renamed(dir.path(), GLM, "expert_gating_func", "expert_gating_fund");
    let model = odmoe_engine::open::resident(&edited, &Device::Cpu).unwrap();
    let g = golden(GLM);
    let logits = model
        .forward(
            &ids(&g["input_ids"]),
            &mut model.new_cache(),
            Logits::All,
            None,
        )
        .unwrap();
    assert!(max_abs_diff(&logits, &g["hf_logits"]) <= 1e-4);
}

/// gpt-oss with every matrix in Q8_0 (llama.cpp's quantizer, from the BF16 file): its biased,
/// clamped experts through the quantized kernels, against llama.cpp on the same file; on demand
/// as resident.
#[test]
fn gpt_oss_in_q8_0_matches_llama_cpp() {
    quantized_gpt_oss_matches_llama_cpp("q8_0");
}

/// The same with the routed experts in MXFP4, as gpt-oss's released files keep them, multiplied
/// by the MXFP4 kernel and held at the file's size.
#[test]
fn gpt_oss_in_mxfp4_matches_llama_cpp() {
    quantized_gpt_oss_matches_llama_cpp("mxfp4");
}

fn quantized_gpt_oss_matches_llama_cpp(kind: &str) {
    let path = fixture("gguf").join(format!("gpt_oss-{kind}.gguf"));
    let g = candle_core::safetensors::load(
        fixture("gguf").join(format!("gpt_oss-{kind}.golden.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let input = ids(&g["input_ids"]);
    let model = odmoe_engine::open::resident(&path, &Device::Cpu).unwrap();
    let logits = model
        .forward(&input, &mut model.new_cache(), Logits::All, None)
        .unwrap();
    // Q8_0 moves this small model's logits far from exact math (llama.cpp's by 4.5 from
    // transformers' on the BF16 weights); the two Q8_0 computations must be much closer to
    // each other than either is to it.
    let to_llama = max_abs_diff(&logits, &g["llama_logits"]);
    let exact = &golden(GPT_OSS)["hf_logits"];
    let llama_to_exact = max_abs_diff(&g["llama_logits"], exact);
    println!(
        "gpt_oss {kind}: max |diff| to llama.cpp {to_llama:.2e}; llama.cpp to transformers \
         {llama_to_exact:.2e}"
    );
    assert!(
        to_llama <= 0.1 * llama_to_exact,
        "max |logit diff| to llama.cpp {to_llama}, llama.cpp's own distance {llama_to_exact}"
    );
    let expected = logit_bits_and_greedy(&model, &input, 16);
    assert_eq!(expected.1, ids(&g["llama_greedy"]), "llama.cpp greedy");

    let (config, total) = open::describe(&path).unwrap();
    let expert = total / (config.moe_layers().count() * config.num_experts) as u64;
    if kind == "mxfp4" && odmoe_engine::kernels::quantized::available() {
        // Held as the file stores them, 17 bytes per 32 values, where the kernels multiply
        // MXFP4.
        let values = 3 * config.hidden_size * config.expert_intermediate_size;
        assert_eq!(expert, (values / 32 * 17) as u64);
    }
    let options = LoadOptions {
        experts: ExpertMode::OnDemand(StoreConfig {
            budget_bytes: config.num_experts_per_token as u64 * expert,
            ..StoreConfig::default()
        }),
        ..LoadOptions::default()
    };
    let loaded = open::load(&path, &options, &Device::Cpu).unwrap();
    assert!(logit_bits_and_greedy(&loaded.model, &input, 16) == expected);
}
