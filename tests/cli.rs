//! `odmoe run` and `odmoe logits` as outside checks use them.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use odmoe_e2e::{fixture, odmoe, odmoe_ok};

const ARCHITECTURES: [&str; 3] = ["qwen2_moe", "qwen3_moe", "mixtral"];

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn id_list(t: &Tensor) -> Vec<u64> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u64)
        .collect()
}

fn joined(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn run_json_gives_the_golden_greedy_tokens() {
    for name in ARCHITECTURES {
        let g = golden(name);
        let dir = fixture(name);
        let tokens = joined(&id_list(&g["input_ids"]));
        let stdout = odmoe_ok(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--max-tokens",
            "16",
            "--greedy",
            "--ignore-eos",
            "--json",
        ]);
        let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let got: Vec<u64> = out["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got, id_list(&g["greedy_tokens"]), "{name}");
        assert_eq!(out["finish_reason"], "length");
        assert_eq!(out["usage"]["completion_tokens"], 16);
    }
}

#[test]
fn streamed_text_equals_the_json_text() {
    let dir = fixture("qwen3_moe");
    let common = [
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "24",
        "--seed",
        "11",
        "--temp",
        "0.9",
    ];
    let streamed = odmoe_ok(&common);
    let json: serde_json::Value =
        serde_json::from_str(&odmoe_ok(&[&common[..], &["--json"]].concat())).unwrap();
    assert_eq!(
        streamed.strip_suffix('\n').unwrap(),
        json["text"].as_str().unwrap()
    );
    assert!(!json["tokens"].as_array().unwrap().is_empty());
}

#[test]
fn logits_file_matches_the_golden() {
    for name in ARCHITECTURES {
        let g = golden(name);
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("logits.safetensors");
        odmoe_ok(&[
            "logits",
            "--model",
            fixture(name).to_str().unwrap(),
            "--tokens",
            &joined(&id_list(&g["input_ids"])),
            "--out",
            out.to_str().unwrap(),
            "--hidden",
            // Exact math: the default f16 cache rounds keys and values past the tolerance.
            "--kv-cache",
            "f32",
        ]);
        let written = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        for (tensor, tolerance) in [("logits", 1e-4f32), ("hidden_states", 1e-4)] {
            let diff = (&written[tensor] - &g[tensor])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= tolerance, "{name} {tensor}: max diff {diff}");
        }
    }
}

#[test]
fn bad_input_fails_cleanly() {
    let missing = odmoe(&["run", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("/nonexistent/model: does not exist"),
        "{stderr}"
    );
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), "just some notes\n").unwrap();
    let not_a_model = odmoe(&[
        "run",
        "--model",
        text.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    let stderr = String::from_utf8_lossy(&not_a_model.stderr);
    assert!(!not_a_model.status.success());
    assert!(
        stderr.contains("not a model: expected a Hugging Face directory"),
        "{stderr}"
    );

    let dir = fixture("mixtral");
    let out_of_vocab = odmoe(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,99999",
    ]);
    assert!(!out_of_vocab.status.success());
    assert!(String::from_utf8_lossy(&out_of_vocab.stderr).contains("99999"));

    let bad_tokens = odmoe(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,x",
        "--out",
        "/tmp/x",
    ]);
    assert!(!bad_tokens.status.success());
    assert!(String::from_utf8_lossy(&bad_tokens.stderr).contains("\"x\""));
}

#[test]
fn on_demand_run_and_logits_equal_resident() {
    let dir = fixture("qwen3_moe");
    let model = dir.to_str().unwrap();
    let tokens = joined(&id_list(&golden("qwen3_moe")["input_ids"]));
    let run = |extra: &[&str]| -> serde_json::Value {
        let args = [
            &[
                "run",
                "--model",
                model,
                "--tokens",
                &tokens,
                "--max-tokens",
                "16",
                "--greedy",
                "--ignore-eos",
                "--json",
            ][..],
            extra,
        ]
        .concat();
        serde_json::from_str(&odmoe_ok(&args)).unwrap()
    };
    let resident = run(&["--resident"]);
    let on_demand = run(&["--expert-budget", "15%"]);
    assert_eq!(resident["tokens"], on_demand["tokens"]);
    assert!(on_demand["store"]["misses"].as_u64().unwrap() > 0);
    assert!(resident["store"].is_null());

    let out = tempfile::tempdir().unwrap();
    let write = |name: &str, extra: &[&str]| {
        let path = out.path().join(name);
        let args = [
            &[
                "logits",
                "--model",
                model,
                "--tokens",
                &tokens,
                "--out",
                path.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        odmoe_ok(&args);
        std::fs::read(path).unwrap()
    };
    assert_eq!(
        write("resident.safetensors", &[]),
        write("on_demand.safetensors", &["--expert-budget", "25%"])
    );

    let too_small = odmoe(&[
        "run",
        "--model",
        model,
        "--tokens",
        "1,2",
        "--expert-budget",
        "1KB",
    ]);
    assert!(!too_small.status.success());
    assert!(String::from_utf8_lossy(&too_small.stderr).contains("below the minimum"));
}

#[test]
fn an_unfinished_conversion_is_reported_as_such() {
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("m.odmoe");
    odmoe_ok(&[
        "convert",
        fixture("mixtral").to_str().unwrap(),
        layout.to_str().unwrap(),
    ]);
    std::fs::remove_file(layout.join("manifest.json")).unwrap();
    let run = odmoe(&[
        "run",
        "--model",
        layout.to_str().unwrap(),
        "--tokens",
        "1,2",
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("conversion incomplete"), "{stderr}");
}

/// `odmoe trace replay TRACE --budget 25% --policy POLICIES --json`, parsed.
fn replay_at_a_quarter(trace: &std::path::Path, policies: &str) -> serde_json::Value {
    serde_json::from_str(&odmoe_ok(&[
        "trace",
        "replay",
        trace.to_str().unwrap(),
        "--budget",
        "25%",
        "--policy",
        policies,
        "--json",
    ]))
    .unwrap()
}

#[test]
fn bench_decode_reports_one_run_and_on_demand_decodes_as_resident() {
    let name = "qwen3_moe";
    let g = golden(name);
    let dir = fixture(name);
    let prompt = joined(&id_list(&g["input_ids"]));
    let run_args = vec![
        "bench",
        "decode",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &prompt,
        "--tokens",
        "8",
    ];
    let decode = |placement: &[&str], feed: Option<&str>| -> serde_json::Value {
        let mut args = run_args.clone();
        args.push("--json");
        args.extend_from_slice(placement);
        if let Some(feed) = feed {
            args.extend_from_slice(&["--feed-ids", feed]);
        }
        serde_json::from_str(&odmoe_ok(&args)).unwrap()
    };
    let greedy = |out: &serde_json::Value| -> Vec<u64> {
        out["generated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let resident = decode(&["--resident"], None);
    let on_demand = decode(&["--expert-budget", "25%"], None);
    assert_eq!(greedy(&on_demand), greedy(&resident));
    assert_eq!(
        greedy(&resident),
        id_list(&g["greedy_tokens"])[..8].to_vec(),
        "bench decode's greedy tokens are the golden's"
    );
    assert!(resident["hit_rate"].is_null(), "no store when resident");
    for rate in ["hit_rate", "read_free_rate", "belady_hit_rate"] {
        let r = on_demand[rate].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{rate} {r}");
    }
    assert_eq!(on_demand["decode_tokens"], 8);

    let trace_dir = tempfile::tempdir().unwrap();
    let trace = trace_dir.path().join("run.trace");
    let fed = decode(
        &[
            "--expert-budget",
            "25%",
            "--trace-out",
            trace.to_str().unwrap(),
        ],
        Some("5,6,7,8,9,10,11,12"),
    );
    assert_eq!(greedy(&fed), vec![5, 6, 7, 8, 9, 10, 11, 12]);
    // The run's own routing, saved, replays to the Belady figure the run reported.
    let replays = replay_at_a_quarter(&trace, "belady");
    assert_eq!(
        replays[0]["hit_rate"], fed["belady_hit_rate"],
        "{replays} against {fed}"
    );
    assert!(
        odmoe(&[run_args.as_slice(), &["--feed-ids", "5,6"]].concat())
            .status
            .code()
            != Some(0),
        "too few fed ids must fail"
    );
}

#[test]
fn routing_recorded_elsewhere_is_imported_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("mixtral.trace");
    let routing = fixture("routing/mixtral-humaneval-12-tokens.jsonl");
    let summary: serde_json::Value = serde_json::from_str(&odmoe_ok(&[
        "trace",
        "import",
        routing.to_str().unwrap(),
        "--out",
        trace.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(summary["lines"], 383);
    assert_eq!(summary["tokens"], 11, "{summary}");
    assert_eq!(summary["incomplete_tokens"], 1, "{summary}");
    assert_eq!(
        (
            &summary["layers"],
            &summary["experts"],
            &summary["experts_per_token"]
        ),
        (
            &serde_json::json!(32),
            &serde_json::json!(8),
            &serde_json::json!(2)
        )
    );
    let replays = replay_at_a_quarter(&trace, "cycle,belady");
    let hit_rate = |index: usize| replays[index]["hit_rate"].as_f64().unwrap();
    assert!(hit_rate(1) >= hit_rate(0) && hit_rate(1) > 0.0, "{replays}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"layer\": 0, \"experts\": [1, 2]}\n").unwrap();
    let output = odmoe(&["trace", "import", bad.to_str().unwrap(), "--out", "x.trace"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 1: no `token_idx`"), "{stderr}");
}
