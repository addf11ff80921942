//! GGUF read in place: a qwen3_moe GGUF written here from the Hugging Face fixture (llama.cpp's
//! tensor names and metadata keys, experts stacked per layer) must give the fixture's golden
//! logits in f32, on demand exactly as resident in a quantized type, and broken files must give
//! clear errors. llama.cpp-made files are checked against llama.cpp's own logits elsewhere.

mod common;

use common::{golden, ids, max_abs_diff, max_abs_diff_of, write_qwen3_gguf};

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use odmoe_engine::expert::{GluMlp, Matrix};
use odmoe_engine::format::gguf::{GgufFile, stacked_expert_names};
use odmoe_engine::generate::Session;
use odmoe_engine::model::{ForwardHook, KvType, Logits, Model};
use odmoe_engine::open::{self, ExpertMode, LoadOptions};
use odmoe_engine::store::fetch::Pace;
use odmoe_engine::store::{ExpertSource, GgufSource, PolicyKind, StoreConfig, held};

fn logits(model: &Model, input: &[u32]) -> Tensor {
    model
        .forward(input, &mut model.new_cache(), Logits::All, None)
        .unwrap()
}

fn input() -> Vec<u32> {
    ids(&golden("qwen3_moe")["input_ids"])
}

#[test]
fn f32_gguf_matches_the_transformers_golden() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_qwen3_gguf(&path, GgmlDType::F32, &[], None);
    let model = odmoe_engine::open::resident(&path, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&logits(&model, &input()), &golden("qwen3_moe")["logits"]);
    assert!(diff <= 1e-4, "max |logit diff| {diff}");
}

#[test]
fn quantized_experts_on_demand_equal_resident() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_qwen3_gguf(&path, GgmlDType::Q8_0, &[], None);
    let resident = odmoe_engine::open::resident(&path, &Device::Cpu).unwrap();
    let expected = logits(&resident, &input())
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (config, total) = open::describe(&path).unwrap();
    let expert = total / (config.num_layers * config.num_experts) as u64;
    assert_eq!(
        expert,
        3 * 32 * 64 / 32 * 34,
        "Q8_0 experts are counted in their stored size"
    );
    for budget in [3 * expert, total / 2, total] {
        let options = LoadOptions {
            experts: ExpertMode::OnDemand(StoreConfig {
                budget_bytes: budget,
                io_threads: 2,
                policy: PolicyKind::Lru,
            }),
            ..LoadOptions::default()
        };
        let loaded = open::load(&path, &options, &Device::Cpu).unwrap();
        let got = logits(&loaded.model, &input())
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            got.iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "budget {budget}"
        );
        loaded.store.unwrap().check_invariants().unwrap();
    }
    // Quantized experts stay close to the f32 model (Q8_0 weights, activations quantized too).
    let golden = golden("qwen3_moe")["logits"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let diff = max_abs_diff_of(&expected, &golden);
    assert!(diff < 0.1, "Q8_0 max |logit diff| {diff}");
}

/// The bits of every value of `t`.
fn bits(t: &Tensor) -> Vec<u32> {
    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values.iter().map(|v| v.to_bits()).collect()
}

/// Expert width of the GGUF whose slices are held in their read buffers: Q8_0 slices of 8192 x
/// 64 values, 557,056 bytes, past `held::HOLD_FROM`.
const WIDE: usize = 8192;

/// Slices long enough are held in the buffers they were read into, not copied out (see
/// `store::held`): such experts must compute the bits copied ones compute, be counted alike, and
/// on demand give the logits resident ones give.
#[test]
fn experts_held_in_their_read_buffers_compute_as_copied_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.gguf");
    write_qwen3_gguf(&path, GgmlDType::Q8_0, &[], Some(WIDE));
    let gguf = GgufFile::open(&path, &Device::Cpu).unwrap();
    let config = odmoe_engine::model::config_from_gguf(&gguf).unwrap();
    let h = config.hidden_size;
    let file = std::fs::read(&path).unwrap();
    for bypass_cache in [false, true] {
        let source = GgufSource::new(&config, &gguf, bypass_cache).unwrap();
        for (layer, expert) in [(0, 0), (1, 5), (2, 7)] {
            let (held, _) = source.read(layer, expert, Pace::Whole).unwrap();
            let names = stacked_expert_names(layer);
            let shapes = [[WIDE, h], [WIDE, h], [h, WIDE]];
            let [gate, up, down] = [0, 1, 2].map(|k| {
                let slice = gguf.expert_slice(&names[k], expert, shapes[k]).unwrap();
                assert!(slice.bytes >= held::HOLD_FROM, "{} bytes", slice.bytes);
                let bytes = &file[slice.offset as usize..][..slice.bytes];
                Matrix::Candle(slice.to_qmatmul(bytes, &Device::Cpu).unwrap())
            });
            let copied = GluMlp { gate, up, down };
            let held_in_place = [&held.gate, &held.up, &held.down]
                .iter()
                .all(|m| matches!(m, Matrix::Blocks(_)));
            assert_eq!(
                held_in_place,
                Matrix::kernels_on(&Device::Cpu),
                "held where the kernels multiply them, copied for candle elsewhere"
            );
            assert_eq!(held.bytes(), copied.bytes(), "counted alike");
            for tokens in [1, 8] {
                let x = Tensor::arange(0, (tokens * h) as u32, &Device::Cpu)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .affine(0.37, 0.0)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .reshape((tokens, h))
                    .unwrap();
                assert_eq!(
                    bits(&held.forward(&x).unwrap()),
                    bits(&copied.forward(&x).unwrap()),
                    "layer {layer} expert {expert}"
                );
            }
        }
    }
    let resident = odmoe_engine::open::resident(&path, &Device::Cpu).unwrap();
    let expected = logits(&resident, &input());
    let (_, total) = open::describe(&path).unwrap();
    let expert = total / (config.num_layers * config.num_experts) as u64;
    let options = LoadOptions {
        experts: ExpertMode::OnDemand(StoreConfig {
            budget_bytes: 4 * expert,
            io_threads: 2,
            policy: PolicyKind::Lru,
        }),
        ..LoadOptions::default()
    };
    let loaded = open::load(&path, &options, &Device::Cpu).unwrap();
    let got = logits(&loaded.model, &input());
    assert_eq!(bits(&got), bits(&expected), "on demand, as resident");
    let stats = loaded.store.as_ref().unwrap().stats();
    assert!(stats.evictions > 0, "experts were evicted and read again");
    loaded.store.unwrap().check_invariants().unwrap();
}

fn load_error(path: &Path) -> String {
    match odmoe_engine::open::resident(path, &Device::Cpu) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_gguf_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_qwen3_gguf(&good, GgmlDType::F32, &[], None);
    let bytes = std::fs::read(&good).unwrap();

    let magic = dir.path().join("magic.gguf");
    std::fs::write(&magic, [b"XXXX".as_slice(), &bytes[4..]].concat()).unwrap();
    let message = load_error(&magic);
    assert!(message.contains("magic.gguf"), "{message}");

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let message = load_error(&truncated);
    assert!(
        message.contains("truncated.gguf") && message.contains("truncated"),
        "{message}"
    );

    let missing = dir.path().join("missing.gguf");
    write_qwen3_gguf(&missing, GgmlDType::F32, &["qwen3moe.expert_count"], None);
    let message = load_error(&missing);
    assert!(
        message.contains("qwen3moe.expert_count") && message.contains("missing.gguf"),
        "{message}"
    );

    // The first tensor's type field follows its name, dimension count and dimensions.
    let unknown = dir.path().join("unknown.gguf");
    let mut patched = bytes.clone();
    let name = b"token_embd.weight";
    let at = patched.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dims = u32::from_le_bytes(patched[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * dims;
    patched[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&unknown, &patched).unwrap();
    let message = load_error(&unknown);
    assert!(
        message.contains("unknown.gguf") && message.contains("99"),
        "{message}"
    );
}

/// A prompt run in slabs (here of 3 tokens) gives the last position's logits of the prompt in
/// one piece, within the kernels' rounding, and on demand exactly what it gives resident at the
/// same slab size; the session then holds every prompt token.
#[test]
fn a_prompt_in_slabs_on_demand_equals_resident() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_qwen3_gguf(&path, GgmlDType::Q8_0, &[], None);
    let prompt = input();
    assert!(prompt.len() > 6, "a prompt of several slabs");
    let prefill = |options: LoadOptions| {
        let slab = options.prefill_slab;
        let mut loaded = open::load(&path, &options, &Device::Cpu).unwrap();
        let passes = Arc::new(FirstLayerInputs::default());
        loaded.model.set_hook(Some(passes.clone()));
        let mut session = Session::new(&loaded.model);
        let (logits, reused) = session.prefill(&loaded.model, &prompt).unwrap();
        assert_eq!((session.tokens(), reused), (&prompt[..], 0));
        let lengths = passes.0.lock().unwrap().clone();
        let expected: Vec<usize> = prompt.chunks(slab).map(<[u32]>::len).collect();
        assert_eq!(lengths, expected, "the prompt's passes at a slab of {slab}");
        logits
    };
    let whole = prefill(LoadOptions::default());
    let slabs = |experts| LoadOptions {
        experts,
        prefill_slab: 3,
        ..LoadOptions::default()
    };
    let resident = prefill(slabs(ExpertMode::Resident));
    let (_, total) = open::describe(&path).unwrap();
    let on_demand = prefill(slabs(ExpertMode::OnDemand(StoreConfig {
        budget_bytes: total / 3,
        io_threads: 2,
        policy: PolicyKind::Lru,
    })));
    assert!(
        resident
            .iter()
            .zip(&on_demand)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let diff = max_abs_diff_of(&whole, &resident);
    assert!(diff < 1e-3, "slabs against one piece: {diff}");
}

/// A KV cache of Q8_0 rows holds 34 bytes for every 128 an f32 cache holds, gives on demand
/// exactly the logits it gives resident (in slabs), and stays near an f32 cache's logits (on
/// this fixture 0.056 apart at most, where an f16 cache is 0.033 apart, the largest logit 6.8).
#[test]
fn a_q8_0_kv_cache_is_a_quarter_of_f32_and_exact_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_qwen3_gguf(&path, GgmlDType::Q8_0, &[], None);
    let prompt = input();
    let prefill = |options: LoadOptions| {
        let loaded = open::load(&path, &options, &Device::Cpu).unwrap();
        let mut session = Session::new(&loaded.model);
        let (logits, _) = session.prefill(&loaded.model, &prompt).unwrap();
        (logits, session.cache_bytes())
    };
    let options = |experts, kv_cache| LoadOptions {
        experts,
        kv_cache,
        prefill_slab: 3,
        ..LoadOptions::default()
    };
    let (resident, bytes) = prefill(options(ExpertMode::Resident, KvType::Q8_0));
    let (_, total) = open::describe(&path).unwrap();
    let store = StoreConfig {
        budget_bytes: total / 3,
        io_threads: 2,
        policy: PolicyKind::Lru,
    };
    let (on_demand, _) = prefill(options(ExpertMode::OnDemand(store), KvType::Q8_0));
    assert!(
        resident
            .iter()
            .zip(&on_demand)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let (exact, f32_bytes) = prefill(options(ExpertMode::Resident, KvType::F32));
    assert_eq!(
        bytes * 128,
        f32_bytes * 34,
        "{bytes} bytes against f32's {f32_bytes}"
    );
    let diff = max_abs_diff_of(&exact, &resident);
    let (half, _) = prefill(options(ExpertMode::Resident, KvType::F16));
    let half_diff = max_abs_diff_of(&exact, &half);
    let largest = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("q8_0 cache against f32: {diff}, f16: {half_diff}, largest logit {largest}");
    // Q8_0 keeps 8 bits to f16's 11: its logits move further, not by orders of magnitude.
    assert!(
        diff > 0.0 && diff < 4.0 * half_diff && diff < 0.02 * largest,
        "q8_0 cache against f32: {diff}, f16 against f32: {half_diff}"
    );
}

/// Perplexity scores each window's tokens after its first from logits of slabs as it would
/// from one forward pass over the window: the same tokens, the same mean log-likelihood within
/// the kernels' rounding, and that mean is the one the whole window's logits give.
#[test]
fn perplexity_in_slabs_scores_what_one_pass_scores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_qwen3_gguf(&path, GgmlDType::Q8_0, &[], None);
    let tokens = input();
    let load = |prefill_slab| {
        let options = LoadOptions {
            prefill_slab,
            ..LoadOptions::default()
        };
        open::load(&path, &options, &Device::Cpu).unwrap()
    };
    let whole = load(4096);
    let window = tokens.len();
    let expected = {
        let logits = whole
            .model
            .forward(&tokens, &mut whole.model.new_cache(), Logits::All, None)
            .unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        let nll: f64 = rows
            .iter()
            .zip(&tokens[1..])
            .map(|(row, &next)| {
                let sum: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
                sum.ln() - row[next as usize] as f64
            })
            .sum();
        nll / (tokens.len() - 1) as f64
    };
    let one_pass = odmoe_engine::eval::perplexity(&whole.model, &tokens, window).unwrap();
    let slabs = odmoe_engine::eval::perplexity(&load(3).model, &tokens, window).unwrap();
    assert_eq!(one_pass.scored_tokens, tokens.len() - 1);
    assert_eq!(slabs.scored_tokens, one_pass.scored_tokens);
    assert!(
        (one_pass.nll - expected).abs() < 1e-9,
        "{} {expected}",
        one_pass.nll
    );
    assert!(
        (slabs.nll - one_pass.nll).abs() < 1e-4,
        "{} {}",
        slabs.nll,
        one_pass.nll
    );
}

/// The number of positions of each forward pass, as layer 0 sees them.
#[derive(Default)]
struct FirstLayerInputs(std::sync::Mutex<Vec<usize>>);

impl ForwardHook for FirstLayerInputs {
    fn layer_input(&self, layer: usize, hidden: &Tensor) -> Vec<Tensor> {
        if layer == 0 {
            self.0.lock().unwrap().push(hidden.dim(0).unwrap());
        }
        Vec::new()
    }
}
