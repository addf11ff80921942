//! The demo model: SmolLM2-135M-Instruct (a real dense Llama, Q4_1 GGUF from PyPI, fetched by
//! scripts/setup.sh) runs in place, and split into 32 experts it reproduces the dense model with
//! all 32 chosen and still answers with 30 (the demo's default).

use std::path::PathBuf;

use candle_core::Device;
use odmoe_e2e::{demo_gguf, odmoe_ok};

fn calibration() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/calibration.txt")
}

fn greedy_completion(model: &str, extra: &[&str]) -> String {
    let args = [
        &[
            "run",
            "--model",
            model,
            "--prompt",
            "The capital of France is",
            "--greedy",
            "--max-tokens",
            "4",
            "--json",
        ][..],
        extra,
    ]
    .concat();
    let out: serde_json::Value = serde_json::from_str(&odmoe_ok(&args)).unwrap();
    out["text"].as_str().unwrap().to_string()
}

#[test]
fn the_demo_model_answers_paris_dense_exact_and_split() {
    let gguf = demo_gguf();
    let gguf = gguf.to_str().unwrap();
    assert!(
        greedy_completion(gguf, &[]).starts_with(" Paris"),
        "dense GGUF in place"
    );

    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("smollm2-e32.odmoe");
    let layout_str = layout.to_str().unwrap();
    odmoe_ok(&[
        "convert",
        gguf,
        layout_str,
        "--split-experts",
        "32",
        "--top-k",
        "30",
        "--calibration",
        calibration().to_str().unwrap(),
    ]);
    assert!(
        greedy_completion(layout_str, &["--experts-per-token", "32"]).starts_with(" Paris"),
        "K = E"
    );
    assert!(
        greedy_completion(layout_str, &[]).starts_with(" Paris"),
        "default K = 30"
    );
    assert!(
        greedy_completion(layout_str, &["--expert-budget", "50%"]).starts_with(" Paris"),
        "experts on demand"
    );

    // With every expert chosen, the split model computes the dense model (sums reordered only).
    let tokens = "504,3575,282,4649,314,7042,30,1073,3575,282,7042,314";
    let dense = out.path().join("dense.safetensors");
    let split = out.path().join("split.safetensors");
    // The split layout keeps base weights dequantized to f32, so the dense file widens its Q4_1
    // matrices too; both keep keys and values in f32, where f16 would round the reordered
    // sums' last bits apart.
    odmoe_ok(&[
        "logits",
        "--model",
        gguf,
        "--f32-base",
        "--kv-cache",
        "f32",
        "--tokens",
        tokens,
        "--out",
        dense.to_str().unwrap(),
    ]);
    odmoe_ok(&[
        "logits",
        "--model",
        layout_str,
        "--tokens",
        tokens,
        "--experts-per-token",
        "32",
        "--kv-cache",
        "f32",
        "--out",
        split.to_str().unwrap(),
    ]);
    let load = |p: &PathBuf| {
        candle_core::safetensors::load(p, &Device::Cpu)
            .unwrap()
            .remove("logits")
            .unwrap()
    };
    let diff = (load(&dense) - load(&split))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-4, "max |logit diff| split K=E vs dense: {diff}");
}
