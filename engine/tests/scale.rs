//! A layout shaped like Kimi-K2 (61 layers, the first dense, 384 experts each, top-8) with tiny
//! tensors: its manifest loads quickly, opening it holds no file per expert, and a decode step
//! over it with a budget of one layer's experts keeps the budget invariant.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use odmoe_engine::config::ModelConfig;
use odmoe_engine::format::layout::{
    ALIGN, ExpertLayout, ExpertTensor, FORMAT_VERSION, FileEntry, MANIFEST, Manifest, align_up,
    expert_path, hash_file,
};
use odmoe_engine::model::Logits;
use odmoe_engine::open::{self, ExpertMode, LoadOptions};
use odmoe_engine::store::{PolicyKind, StoreConfig};

const KIMI_K2: &str = include_str!("../../tests/fixtures/configs/kimi_k2.json");

/// Kimi-K2's config with every width shrunk and its depth, experts and routing kept.
fn tiny_kimi_config() -> ModelConfig {
    let mut text = KIMI_K2.to_string();
    for (key, value) in [
        ("hidden_size", "7168", "16"),
        ("intermediate_size", "18432", "32"),
        ("moe_intermediate_size", "2048", "8"),
        ("num_attention_heads", "64", "2"),
        ("num_key_value_heads", "64", "2"),
        ("q_lora_rank", "1536", "8"),
        ("kv_lora_rank", "512", "8"),
        ("qk_nope_head_dim", "128", "4"),
        ("qk_rope_head_dim", "64", "4"),
        ("v_head_dim", "128", "4"),
        ("vocab_size", "163840", "64"),
    ]
    .map(|(k, from, to)| (format!("\"{k}\": {from}"), format!("\"{k}\": {to}")))
    {
        assert!(text.contains(&key), "{key}");
        text = text.replace(&key, &value);
    }
    odmoe_engine::model::config_from_hf_json(&text, Path::new("tiny_kimi.json")).unwrap()
}

/// Deterministic values in [-0.5, 0.5) (xorshift), so the model routes like a real one would.
fn tensor(shape: &[usize], state: &mut u64) -> Tensor {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Every non-expert tensor of `config`, under its Hugging Face name.
fn base_tensors(config: &ModelConfig) -> HashMap<String, Tensor> {
    let ds = config.deepseek.as_ref().unwrap();
    let a = ds.attention.as_ref().unwrap();
    let (h, v, nh) = (config.hidden_size, config.vocab_size, config.num_heads);
    let q_rank = a.q_lora_rank.unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15;
    let mut t = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        t.insert(name, tensor(shape, &mut state));
    };
    add("model.embed_tokens.weight".into(), &[v, h]);
    add("lm_head.weight".into(), &[v, h]);
    add("model.norm.weight".into(), &[h]);
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h]);
        add(format!("{p}.post_attention_layernorm.weight"), &[h]);
        let s = format!("{p}.self_attn");
        let qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
        add(format!("{s}.q_a_proj.weight"), &[q_rank, h]);
        add(format!("{s}.q_a_layernorm.weight"), &[q_rank]);
        add(format!("{s}.q_b_proj.weight"), &[nh * qk, q_rank]);
        add(
            format!("{s}.kv_a_proj_with_mqa.weight"),
            &[a.kv_lora_rank + a.qk_rope_head_dim, h],
        );
        add(format!("{s}.kv_a_layernorm.weight"), &[a.kv_lora_rank]);
        add(
            format!("{s}.kv_b_proj.weight"),
            &[nh * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank],
        );
        add(format!("{s}.o_proj.weight"), &[h, nh * a.v_head_dim]);
        let (mlp, width) = if config.is_moe_layer(l) {
            add(format!("{p}.mlp.gate.weight"), &[config.num_experts, h]);
            add(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                &[config.num_experts],
            );
            let width = config.shared_expert_intermediate_size.unwrap();
            (format!("{p}.mlp.shared_experts"), width)
        } else {
            (format!("{p}.mlp"), config.dense_intermediate_size.unwrap())
        };
        add(format!("{mlp}.gate_proj.weight"), &[width, h]);
        add(format!("{mlp}.up_proj.weight"), &[width, h]);
        add(format!("{mlp}.down_proj.weight"), &[h, width]);
    }
    t
}

/// Writes the layout: real base weights, and expert files of the right length that are holes
/// (zeros, taking no disk), all listed with their checksums in the manifest.
fn write_layout(dir: &Path, config: &ModelConfig) -> usize {
    fs::create_dir_all(dir.join("base_model")).unwrap();
    fs::create_dir_all(dir.join("experts")).unwrap();
    let base = "base_model/base.safetensors";
    candle_core::safetensors::save(&base_tensors(config), dir.join(base)).unwrap();

    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    let mut tensors = Vec::new();
    let mut offset = 0;
    for (name, shape) in [("gate", [i, h]), ("up", [i, h]), ("down", [h, i])] {
        let bytes = (shape[0] * shape[1] * 4) as u64;
        tensors.push(ExpertTensor {
            name: name.into(),
            offset,
            bytes,
            shape,
        });
        offset = align_up(offset + bytes);
    }
    let expert = ExpertLayout {
        dtype: "F32".into(),
        ggml_types: None,
        file_bytes: ALIGN + offset,
        data_offset: ALIGN,
        tensors: tensors.try_into().unwrap(),
    };
    let mut files = BTreeMap::new();
    let entry = |path: &Path| -> FileEntry { hash_file(path, |_| {}).unwrap() };
    files.insert(base.to_string(), entry(&dir.join(base)));
    let mut expert_entry = None;
    let mut count = 0;
    for layer in config.moe_layers() {
        for e in 0..config.num_experts {
            let rel = expert_path(layer, e);
            let file = fs::File::create(dir.join(&rel)).unwrap();
            file.set_len(expert.file_bytes).unwrap();
            // Every file holds the same zeros: hash one.
            let entry = expert_entry
                .get_or_insert_with(|| entry(&dir.join(&rel)))
                .clone();
            files.insert(rel, entry);
            count += 1;
        }
    }
    let manifest = Manifest {
        format: "odmoe".into(),
        format_version: FORMAT_VERSION,
        architecture: config.clone(),
        tokenizer: None,
        base_files: vec![base.into()],
        expert,
        files,
    };
    fs::write(dir.join(MANIFEST), manifest.to_json()).unwrap();
    count
}

fn open_descriptors() -> usize {
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[test]
fn a_kimi_k2_shaped_layout_loads_fast_and_decodes_within_a_tiny_budget() {
    let config = tiny_kimi_config();
    assert_eq!((config.num_layers, config.num_experts), (61, 384));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kimi.odmoe");
    let experts = write_layout(&dir, &config);
    assert_eq!(experts, 60 * 384);

    let started = Instant::now();
    let manifest = Manifest::load(&dir).unwrap();
    let manifest_load = started.elapsed();
    assert_eq!(manifest.expert_files().count(), experts);
    let manifest_bytes = fs::metadata(dir.join(MANIFEST)).unwrap().len();
    println!(
        "manifest: {experts} expert files, {manifest_bytes} bytes, loaded in {:.1} ms",
        manifest_load.as_secs_f64() * 1e3
    );
    assert!(
        manifest_load.as_secs_f64() < 1.0,
        "manifest took {manifest_load:?}"
    );

    let budget = config.num_experts_per_token as u64 * config.expert_f32_bytes() as u64;
    let options = LoadOptions {
        experts: ExpertMode::OnDemand(StoreConfig {
            budget_bytes: budget,
            io_threads: 2,
            policy: PolicyKind::default(),
        }),
        ..LoadOptions::default()
    };
    let descriptors = open_descriptors();
    let started = Instant::now();
    let loaded = open::load(&dir, &options, &Device::Cpu).unwrap();
    println!(
        "opened on demand in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    // Expert files are opened per read, not held: a handful of descriptors at most (the base
    // file's map), never one per expert.
    assert!(
        open_descriptors() <= descriptors + 8,
        "{} descriptors open after loading, {descriptors} before",
        open_descriptors()
    );

    let model = &loaded.model;
    let store = loaded.store.as_ref().unwrap();
    let mut cache = model.new_cache();
    let started = Instant::now();
    model
        .forward(&[1, 2, 3], &mut cache, Logits::Last, None)
        .unwrap();
    store.check_invariants().unwrap();
    model.forward(&[4], &mut cache, Logits::Last, None).unwrap();
    println!(
        "prefill of 3 tokens and one decode step in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    store.wait_idle();
    store.check_invariants().unwrap();
    let stats = store.stats();
    assert!(
        stats.resident_bytes <= budget,
        "{} > {budget}",
        stats.resident_bytes
    );
    // Every MoE layer was visited for four tokens under a budget of one layer's experts.
    assert!(stats.misses >= 60 * 8, "{} misses", stats.misses);
    assert!(stats.evictions > 0);
    assert_eq!(cache.len(), 4);
    assert_eq!(cache.bytes(), 4 * config.kv_cache_bytes_per_token(4));
}
