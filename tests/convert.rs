//! `odmoe convert`, `verify` and `inspect` as a user runs them: a conversion killed part-way and
//! re-run ends where an uninterrupted one does; damage is named; inspect's numbers are exact.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use odmoe_e2e::{binary, fixture, odmoe, odmoe_ok};

const FIXTURES: [&str; 3] = ["qwen2_moe", "qwen3_moe", "mixtral"];

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn expert_files(dir: &Path) -> usize {
    fs::read_dir(dir.join("experts"))
        .map(|entries| {
            entries
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    name.to_str().unwrap().ends_with(".safetensors")
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_killed_conversion_resumes_to_the_uninterrupted_layout() {
    let src = fixture("qwen2_moe");
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference.odmoe");
    odmoe_ok(&["convert", s(&src), s(&reference)]);
    let total_experts = expert_files(&reference);
    assert_eq!(total_experts, 3 * 8);

    let out = tmp.path().join("model.odmoe");
    let mut child = Command::new(binary("odmoe"))
        .args(["convert", s(&src), s(&out)])
        .env("ODMOE_CONVERT_THROTTLE_MS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while expert_files(&out) < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the throttled conversion finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "no expert files appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = expert_files(&out);
    assert!(done < total_experts, "killed after {done} expert files");
    assert!(!out.join("manifest.json").exists());

    let failed = odmoe(&["verify", s(&out)]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("incomplete"), "{stderr}");

    let stdout = odmoe_ok(&["convert", s(&src), s(&out)]);
    assert!(stdout.contains("kept from an earlier run"), "{stdout}");
    let stdout = odmoe_ok(&["verify", s(&out)]);
    assert!(stdout.starts_with("ok:"), "{stdout}");
    assert_eq!(
        fs::read_to_string(out.join("manifest.json")).unwrap(),
        fs::read_to_string(reference.join("manifest.json")).unwrap()
    );
    let leftovers: Vec<_> = ["", "experts", "base_model"]
        .iter()
        .flat_map(|d| fs::read_dir(out.join(d)).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn verify_fails_on_a_corrupted_layout_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.odmoe");
    odmoe_ok(&["convert", s(&fixture("mixtral")), s(&out)]);
    odmoe_ok(&["verify", s(&out)]);

    let damaged = out.join("experts/layer_01_expert_002.safetensors");
    let mut bytes = fs::read(&damaged).unwrap();
    bytes[4096 + 100] ^= 0x20;
    fs::write(&damaged, bytes).unwrap();
    let output = odmoe(&["verify", s(&out)]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("experts/layer_01_expert_002.safetensors")
            && stdout.contains("layer 1, expert 2")
            && stdout.contains("sha256"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    let output = odmoe(&["verify", s(&out), "--json"]);
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0]["file"],
        "experts/layer_01_expert_002.safetensors"
    );
    assert_eq!(
        (&problems[0]["layer"], &problems[0]["expert"]),
        (&1.into(), &2.into())
    );
    assert_eq!(problems[0]["problem"]["kind"], "checksum");

    // A Hugging Face directory is not a layout.
    let output = odmoe(&["verify", s(&fixture("mixtral"))]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not an odmoe layout"));
}

/// Expected inspect numbers, computed from config.json and the raw safetensors headers.
struct Expected {
    layers: u64,
    experts: u64,
    top_k: u64,
    expert_disk: u64,
    expert_f32: u64,
    base_disk: u64,
    base_f32: u64,
}

fn expected(dir: &Path) -> Expected {
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let experts = config
        .get("num_experts")
        .or(config.get("num_local_experts"))
        .unwrap()
        .as_u64()
        .unwrap();
    let mut e = Expected {
        layers: config["num_hidden_layers"].as_u64().unwrap(),
        experts,
        top_k: config["num_experts_per_tok"].as_u64().unwrap(),
        expert_disk: 0,
        expert_f32: 0,
        base_disk: 0,
        base_f32: 0,
    };
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !name.starts_with("model") || !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (tensor, info) in header {
            if tensor == "__metadata__" {
                continue;
            }
            let offsets = info["data_offsets"].as_array().unwrap();
            let disk = offsets[1].as_u64().unwrap() - offsets[0].as_u64().unwrap();
            let elements: u64 = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product();
            if tensor.contains(".experts.") {
                e.expert_disk += disk;
                e.expert_f32 += elements * 4;
            } else {
                e.base_disk += disk;
                e.base_f32 += elements * 4;
            }
        }
    }
    e
}

#[test]
fn inspect_json_gives_exact_numbers_for_checkpoints_and_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let src = fixture(name);
        let e = expected(&src);
        let layout = tmp.path().join(format!("{name}.odmoe"));
        odmoe_ok(&["convert", s(&src), s(&layout)]);
        for (dir, format) in [(&src, "huggingface"), (&layout, "odmoe")] {
            let stdout = odmoe_ok(&["inspect", s(dir), "--json"]);
            let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let count = e.layers * e.experts;
            assert_eq!(r["format"], format);
            assert_eq!(r["architecture"], name);
            assert_eq!(r["layers"], e.layers, "{name}");
            assert_eq!(r["experts_per_layer"], e.experts, "{name}");
            assert_eq!(r["top_k"], e.top_k, "{name}");
            assert_eq!(r["expert_dtype"], "BF16");
            assert_eq!(r["total_experts"], count);
            assert_eq!(r["expert_bytes_on_disk"], e.expert_disk / count, "{name}");
            assert_eq!(r["expert_bytes_f32"], e.expert_f32 / count, "{name}");
            assert_eq!(r["total_expert_bytes_on_disk"], e.expert_disk, "{name}");
            assert_eq!(r["total_expert_bytes_f32"], e.expert_f32, "{name}");
            assert_eq!(r["base_bytes_on_disk"], e.base_disk, "{name}");
            assert_eq!(r["base_bytes_f32"], e.base_f32, "{name}");
            assert_eq!(r["budget_bytes"], serde_json::Value::Null);
            assert_eq!(r["memory_needed_bytes"], e.base_f32 + e.expert_f32);
            if format == "odmoe" {
                assert_eq!(r["expert_file_bytes"].as_u64().unwrap() % 4096, 0);
            }

            let stdout = odmoe_ok(&["inspect", s(dir), "--budget", "25%", "--json"]);
            let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(r["budget_bytes"], e.expert_f32 / 4, "{name}");
            assert_eq!(r["memory_needed_bytes"], e.base_f32 + e.expert_f32 / 4);
            let stdout = odmoe_ok(&["inspect", s(dir), "--budget", "64KiB", "--json"]);
            let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(r["memory_needed_bytes"], e.base_f32 + 65536);
        }
    }
    let text = odmoe_ok(&["inspect", s(&fixture("qwen3_moe")), "--budget", "1.5MB"]);
    assert!(
        text.contains("qwen3_moe") && text.contains("budget"),
        "{text}"
    );
    let bad = odmoe(&[
        "inspect",
        s(&fixture("qwen3_moe")),
        "--budget",
        "12 parsecs",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("12 parsecs"));
}

#[test]
fn inspect_gives_kv_bytes_per_token_from_a_config_json() {
    // The public config.json of DeepSeek-V3 and Kimi-K2: 61 layers cache a latent of 512 and a
    // rotary key of 64 per token, 70,272 bytes in f16.
    for (name, moe_layers, experts) in [("deepseek_v3", 58, 256), ("kimi_k2", 60, 384)] {
        let config = fixture(&format!("configs/{name}.json"));
        let stdout = odmoe_ok(&["inspect", s(&config), "--json"]);
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(r["architecture"], "deepseek_v3", "{name}");
        assert_eq!(r["layers"], 61, "{name}");
        assert_eq!(r["moe_layers"], moe_layers, "{name}");
        assert_eq!(r["experts_per_layer"], experts, "{name}");
        assert_eq!(r["total_experts"], moe_layers * experts, "{name}");
        assert_eq!(r["expert_bytes_f32"], 3 * 7168 * 2048 * 4, "{name}");
        assert_eq!(r["kv_lora_rank"], 512, "{name}");
        assert_eq!(r["kv_cache_bytes_per_token_f16"], 70_272, "{name}");
        assert_eq!(r["kv_cache_bytes_per_token_f32"], 140_544, "{name}");
        let text = odmoe_ok(&["inspect", s(&config)]);
        assert!(
            text.contains("70272 bytes per token in f16"),
            "{name}: {text}"
        );
    }
}
