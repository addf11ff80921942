//! `odmoe convert` from a GGUF file: experts keep their quantized blocks, so the layout gives
//! logits bit-identical to the GGUF read in place with its base matrices widened to f32 (as the
//! layout stores them), resident and on demand, and a second run keeps every file.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use odmoe_engine::convert::{ConvertEvent, convert};
use odmoe_engine::format::gguf::{GgufFile, stacked_expert_names};
use odmoe_engine::format::layout::{GGUF_DTYPE, Manifest};
use odmoe_engine::open::{self, ExpertMode, LoadOptions};

use odmoe_engine::store::StoreConfig;
use odmoe_engine::tokenizer::Tokenizer;

/// Quantized files of every architecture, with mixtures where the types vary by layer (Q4_K_M)
/// where an expert tensor fell back to F16 (mixtral-q8_0's down projections), and GLM-4.5 and
/// DeepSeek-V3 in BF16 (dense first layers; GLM also in Q8_0, where a dense first layer must not
/// stand for the experts' bytes), and gpt-oss in BF16 (expert biases resident) and with MXFP4
/// experts (candle has no such type).
const FILES: [&str; 11] = [
    "qwen2_moe-q8_0",
    "qwen2_moe-k-q4_k_m",
    "qwen3_moe-q8_0",
    "qwen3_moe-k-q4_k_m",
    "mixtral-q8_0",
    "mixtral-k-q4_k_m",
    "glm4_moe-bf16",
    "glm4_moe-q8_0",
    "deepseek_v3-bf16",
    "gpt_oss-bf16",
    "gpt_oss-mxfp4",
];

fn gguf_path(name: &str) -> PathBuf {
    common::fixture("gguf").join(format!("{name}.gguf"))
}

fn convert_quietly(src: &Path, out: &Path) -> (Manifest, usize) {
    let mut kept = 0;
    let manifest = convert(src, out, |p| {
        kept += usize::from(p.event == ConvertEvent::Kept)
    })
    .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    (manifest, kept)
}

/// The ggml types of `layer`'s stacked expert tensors in the GGUF file itself (empty for a
/// dense layer).
fn file_types(
    gguf: &GgufFile,
    config: &odmoe_engine::config::ModelConfig,
    layer: usize,
) -> [String; 3] {
    if !config.is_moe_layer(layer) {
        return [(); 3].map(|_| String::new());
    }
    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    let shapes = [[i, h], [i, h], [h, i]];
    let names = stacked_expert_names(layer);
    [0, 1, 2].map(|k| {
        let slice = gguf.expert_slice(&names[k], 0, shapes[k]).unwrap();
        slice.stored.name().to_string()
    })
}

#[test]
fn converted_gguf_equals_gguf_in_place_bit_for_bit() {
    let input: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 500).collect();
    for name in FILES {
        let src = gguf_path(name);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(format!("{name}.odmoe"));
        let (manifest, kept) = convert_quietly(&src, &out);
        assert_eq!(kept, 0, "{name}: a first conversion writes every file");

        // The manifest records every layer's types as the file has them.
        let gguf = GgufFile::open(&src, &Device::Cpu).unwrap();
        let config = odmoe_engine::model::config_from_gguf(&gguf).unwrap();
        assert_eq!(manifest.expert.dtype, GGUF_DTYPE, "{name}");
        let types = manifest.expert.ggml_types.clone().unwrap();
        assert_eq!(types.len(), config.num_layers, "{name}");
        for (layer, types) in types.iter().enumerate() {
            assert_eq!(
                types,
                &file_types(&gguf, &config, layer),
                "{name} layer {layer}"
            );
        }
        assert_eq!(manifest.architecture, config, "{name}: architecture");
        assert_eq!(
            manifest.tokenizer.as_deref(),
            Some("tokenizer.json"),
            "{name}"
        );

        let f32_base = LoadOptions {
            quantized_base: false,
            ..LoadOptions::default()
        };
        let in_place = open::load(&src, &f32_base, &Device::Cpu).unwrap().model;
        let expected = common::logit_bits_and_greedy(&in_place, &input, 8);
        let converted = odmoe_engine::open::resident(&out, &Device::Cpu).unwrap();
        assert!(
            common::logit_bits_and_greedy(&converted, &input, 8) == expected,
            "{name}: resident layout differs from the GGUF in place"
        );

        // On demand through the store, with room for one layer's experts only.
        let (described, sizes) = open::expert_sizes_on(&out, &Device::Cpu).unwrap();
        assert_eq!(
            (&described, &sizes),
            (
                &config,
                &open::expert_sizes_on(&src, &Device::Cpu).unwrap().1
            ),
            "{name}: expert bytes as the store counts them"
        );
        let options = LoadOptions {
            experts: ExpertMode::OnDemand(StoreConfig {
                budget_bytes: open::budget_floor(&config, &sizes),
                ..StoreConfig::default()
            }),
            ..LoadOptions::default()
        };
        let loaded = open::load(&out, &options, &Device::Cpu).unwrap();
        assert!(
            common::logit_bits_and_greedy(&loaded.model, &input, 8) == expected,
            "{name}: on-demand layout differs from the GGUF in place"
        );
        assert!(loaded.store.unwrap().stats().misses > 0, "{name}");

        // The tokenizer files rebuilt from the GGUF vocabulary encode and render alike.
        let from_gguf = Tokenizer::from_gguf(&gguf).unwrap();
        let from_layout = open::load_tokenizer(&out).unwrap().unwrap();
        let text = "Hello, world! <|im_start|>user\n1234 ünïcödé";
        assert_eq!(
            from_layout.encode(text, false).unwrap(),
            from_gguf.encode(text, false).unwrap(),
            "{name}: tokenizer"
        );
        assert_eq!(from_layout.eos_token_ids(), from_gguf.eos_token_ids());
        let chat = [odmoe_engine::tokenizer::ChatMessage::new("user", "Hi")];
        assert_eq!(
            from_layout.apply_chat_template(&chat, true).unwrap(),
            from_gguf.apply_chat_template(&chat, true).unwrap()
        );

        // A second run over the finished layout keeps every file and the same manifest.
        let (again, kept) = convert_quietly(&src, &out);
        assert_eq!(again, manifest, "{name}: second run");
        assert_eq!(
            kept,
            manifest.files.len(),
            "{name}: second run keeps every file"
        );
        let report = odmoe_engine::format::layout::verify(&out, |_| {}).unwrap();
        assert!(report.is_ok(), "{name}: {:?}", report.problems);
    }
}

#[test]
fn converting_an_f32_gguf_keeps_f32_blocks() {
    let src = gguf_path("qwen3_moe-f32");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f32.odmoe");
    let (manifest, _) = convert_quietly(&src, &out);
    let types = manifest.expert.ggml_types.unwrap();
    assert!(types.iter().flatten().all(|t| t == "F32"), "{types:?}");
    let input = [1, 2, 3, 4];
    let expected = common::logit_bits_and_greedy(
        &odmoe_engine::open::resident(&src, &Device::Cpu).unwrap(),
        &input,
        4,
    );
    let converted = odmoe_engine::open::resident(&out, &Device::Cpu).unwrap();
    assert!(common::logit_bits_and_greedy(&converted, &input, 4) == expected);
}
