//! Small `odmoe` commands as a user runs them: `inspect` on GGUF files (with experts and dense),
//! `tokenize --json`, `stats --watch` piped into `head`, `convert --split-experts` and
//! `trace record` progress off a terminal.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use odmoe_e2e::{Daemon, binary, fixture, isolate, odmoe, odmoe_ok};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("{error}: {text}"))
}

/// Shapes of the dense Llama [`write_dense_llama_gguf`] writes.
const HIDDEN: usize = 8;
const VOCAB: usize = 16;
const FEED_FORWARD: usize = 8;

/// Writes a one-layer dense Llama with random f32 weights as a GGUF file, llama.cpp's names and
/// metadata keys; returns its tensors' total bytes.
fn write_dense_llama_gguf(path: &Path) -> u64 {
    let shapes: [(&str, &[usize]); 10] = [
        ("token_embd.weight", &[VOCAB, HIDDEN]),
        ("output_norm.weight", &[HIDDEN]),
        ("blk.0.attn_norm.weight", &[HIDDEN]),
        ("blk.0.attn_q.weight", &[HIDDEN, HIDDEN]),
        ("blk.0.attn_k.weight", &[HIDDEN, HIDDEN]),
        ("blk.0.attn_v.weight", &[HIDDEN, HIDDEN]),
        ("blk.0.attn_output.weight", &[HIDDEN, HIDDEN]),
        ("blk.0.ffn_norm.weight", &[HIDDEN]),
        ("blk.0.ffn_gate.weight", &[FEED_FORWARD, HIDDEN]),
        ("blk.0.ffn_up.weight", &[FEED_FORWARD, HIDDEN]),
    ];
    let down = ("blk.0.ffn_down.weight", &[HIDDEN, FEED_FORWARD][..]);
    let tensors: Vec<(&str, QTensor)> = shapes
        .into_iter()
        .chain([down])
        .map(|(name, shape)| {
            let values = Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
            (name, QTensor::quantize(&values, GgmlDType::F32).unwrap())
        })
        .collect();
    let u = |v: usize| Value::U32(v as u32);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u(1)),
        ("llama.context_length", u(64)),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(FEED_FORWARD)),
        ("llama.attention.head_count", u(2)),
        ("llama.attention.head_count_kv", u(2)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &refs).unwrap();
    tensors
        .iter()
        .map(|(_, t)| t.storage_size_in_bytes() as u64)
        .sum()
}

#[test]
fn inspect_reads_a_gguf_file_with_experts() {
    // The qwen3_moe fixture (3 layers of 8 experts of hidden 64 and width 32) in Q8_0: 34 bytes
    // per block of 32 values, kept as stored in memory.
    let gguf = fixture("gguf/qwen3_moe-q8_0.gguf");
    let expert_q8_0 = 3 * 64 * 32 / 32 * 34;
    let r = json(&odmoe_ok(&["inspect", s(&gguf), "--json"]));
    assert_eq!(r["format"], "gguf");
    assert_eq!(r["architecture"], "qwen3_moe");
    assert_eq!(
        (r["layers"].as_u64(), r["moe_layers"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        (r["experts_per_layer"].as_u64(), r["top_k"].as_u64()),
        (Some(8), Some(3))
    );
    assert_eq!(r["expert_dtype"], "Q8_0");
    assert_eq!(r["total_experts"], 24);
    assert_eq!(r["expert_bytes_on_disk"], expert_q8_0);
    assert_eq!(r["expert_bytes_in_memory"], expert_q8_0);
    assert_eq!(r["expert_bytes_f32"], 3 * 64 * 32 * 4);
    assert_eq!(r["total_expert_bytes_on_disk"], 24 * expert_q8_0);
    assert_eq!(r["total_expert_bytes_in_memory"], 24 * expert_q8_0);
    let base = r["base_bytes_in_memory"].as_u64().unwrap();
    assert!(
        base > 0 && base <= r["base_bytes_f32"].as_u64().unwrap(),
        "{r}"
    );
    assert_eq!(r["memory_needed_bytes"], base + 24 * expert_q8_0);

    let r = json(&odmoe_ok(&[
        "inspect",
        s(&gguf),
        "--budget",
        "50%",
        "--json",
    ]));
    assert_eq!(r["budget_bytes"], 12 * expert_q8_0);
    assert_eq!(r["memory_needed_bytes"], base + 12 * expert_q8_0);

    let text = odmoe_ok(&["inspect", s(&gguf), "--budget", "50%"]);
    for part in ["GGUF file", "qwen3_moe", "(Q8_0)", "about 12 experts"] {
        assert!(text.contains(part), "{part:?} missing from\n{text}");
    }

    // Unquantized experts are held as f32, like a Hugging Face checkpoint's.
    let f32_gguf = fixture("gguf/qwen3_moe-f32.gguf");
    let r = json(&odmoe_ok(&["inspect", s(&f32_gguf), "--json"]));
    assert_eq!(r["expert_dtype"], "F32");
    assert_eq!(r["expert_bytes_in_memory"], r["expert_bytes_f32"]);
}

#[test]
fn inspect_shows_a_dense_gguf_model_without_experts() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("dense-llama.gguf");
    let tensor_bytes = write_dense_llama_gguf(&gguf);
    let r = json(&odmoe_ok(&["inspect", s(&gguf), "--json"]));
    assert_eq!(r["format"], "gguf");
    assert_eq!(r["architecture"], "llama");
    assert_eq!(
        (r["moe_layers"].as_u64(), r["total_experts"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(r["expert_dtype"], serde_json::Value::Null);
    assert_eq!(r["total_expert_bytes_in_memory"], 0);
    assert_eq!(r["base_bytes_on_disk"], tensor_bytes);
    assert_eq!(r["base_bytes_in_memory"], tensor_bytes);
    assert_eq!(r["memory_needed_bytes"], tensor_bytes);

    let text = odmoe_ok(&["inspect", s(&gguf)]);
    assert!(text.contains("dense: no experts"), "{text}");

    let output = odmoe(&["inspect", s(&gguf), "--budget", "25%"]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--budget does not apply"), "{stderr}");
}

#[test]
fn tokenize_json_gives_ids_and_their_texts() {
    let model = fixture("qwen3_moe");
    let text = "The quick brown fox";
    let encoded = json(&odmoe_ok(&[
        "tokenize",
        "--model",
        s(&model),
        "--json",
        text,
    ]));
    let ids: Vec<String> = encoded["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap().to_string())
        .collect();
    let tokens: Vec<&str> = encoded["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {encoded}"))
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), ids.len(), "{encoded}");
    let decoded = json(&odmoe_ok(&[
        "tokenize",
        "--model",
        s(&model),
        "--json",
        "--decode",
        &ids.join(","),
    ]));
    assert_eq!(decoded["text"], tokens.concat());
}

#[test]
fn stats_watch_into_a_closed_pipe_ends_quietly() {
    let mut daemon = Daemon::builder().spawn();
    daemon.wait_until_listening();
    let mut command = Command::new(binary("odmoe"));
    isolate(&mut command, daemon.dir());
    let mut child = command
        .args(["stats", "--watch", "0.1", "--socket", s(daemon.socket())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // What `| head -1` does: read one line, then close the pipe.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("odmoed "), "{first}");
    let deadline = Instant::now() + Daemon::LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("odmoe stats --watch kept running after its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn convert_split_experts_names_the_output_not_its_scratch_directory() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("dense-llama.gguf");
    write_dense_llama_gguf(&gguf);
    let out = dir.path().join("split.odmoe");
    let stdout = odmoe_ok(&[
        "convert",
        s(&gguf),
        s(&out),
        "--split-experts",
        "2",
        "--top-k",
        "2",
    ]);
    let first = stdout.lines().next().unwrap_or_default();
    let expected = format!("converted {} -> {} in ", gguf.display(), out.display());
    assert!(first.starts_with(&expected), "{stdout}");
    assert!(!stdout.contains("split-src"), "{stdout}");
    assert!(out.join("manifest.json").is_file());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "scratch left behind: {left:?}");
}

#[test]
fn trace_record_progress_is_whole_lines_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The quick brown fox\nOnce upon a time\n").unwrap();
    let out = dir.path().join("trace.safetensors");
    let output = odmoe(&[
        "trace",
        "record",
        "--model",
        s(&fixture("qwen3_moe")),
        "--prompts",
        s(&prompts),
        "--out",
        s(&out),
        "--max-tokens",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("recorded 1/2 prompts\nrecorded 2/2 prompts\n"),
        "{stderr:?}"
    );
    assert!(!stderr.contains('\r'), "{stderr:?}");
}

#[test]
fn bench_decode_runs_a_dense_model() {
    // A dense model routes nothing: the routing trace the bench records must hold no experts
    // rather than fail on the first position.
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("dense.gguf");
    write_dense_llama_gguf(&gguf);
    let r = json(&odmoe_ok(&[
        "bench",
        "decode",
        "--model",
        s(&gguf),
        "--prompt-ids",
        "1,2,3",
        "--tokens",
        "4",
        "--json",
    ]));
    assert_eq!(r["prompt_tokens"], 3);
    assert_eq!(r["decode_tokens"], 4);
    assert_eq!(r["bytes_read"], 0);
}

/// A run that prefetches from a recording of its own routing guesses only right: every guess
/// is routed to (recall 1, none cancelled). A recording of another run is refused, after the run,
/// rather than reported as perfect prediction.
#[test]
fn bench_decode_prefetches_from_the_recorded_routing_of_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("routing.safetensors");
    let model = fixture("gguf/qwen3_moe-q8_0.gguf");
    let run = |tokens: &str, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "decode",
            "--model",
            s(&model),
            "--expert-budget",
            "50%",
            "--prompt-ids",
            "1,2,3,4,5",
            "--tokens",
            tokens,
            "--feed-ids",
            "6,7,8,9,10,11,12,13",
            "--json",
        ];
        args.extend_from_slice(extra);
        odmoe(&args)
    };
    let recorded = run(
        "6",
        &["--prefetch-experts", "none", "--trace-out", s(&recording)],
    );
    assert!(recorded.status.success(), "{recorded:?}");
    let from_trace = [
        "--prefetch-from-trace",
        s(&recording),
        "--prefetch-depth",
        "2",
    ];
    let output = run("6", &from_trace);
    assert!(output.status.success(), "{output:?}");
    let r = json(&String::from_utf8_lossy(&output.stdout));
    let prefetch = &r["prefetch"];
    assert_eq!(prefetch["predictor"], "recorded", "{prefetch}");
    assert_eq!(
        prefetch["recall"],
        serde_json::json!([1.0, 1.0]),
        "{prefetch}"
    );
    assert_eq!(prefetch["cancelled"], 0, "{prefetch}");
    assert!(prefetch["used"].as_u64().unwrap() > 0, "{prefetch}");

    // Two tokens more than recorded: the last passes were not in the recording.
    let output = run("8", &from_trace);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not this run's (they differ from token 11, layer 0)"),
        "{stderr}"
    );
    // A predictor's guesses two layers ahead: recall measured at both depths, below 1 here.
    let output = run("6", &["--prefetch-depth", "2"]);
    assert!(output.status.success(), "{output:?}");
    let prefetch = &json(&String::from_utf8_lossy(&output.stdout))["prefetch"];
    assert_eq!(prefetch["predictor"], "lookahead", "{prefetch}");
    assert_eq!(prefetch["depth"], 2, "{prefetch}");
}

#[test]
fn inspect_gives_the_kv_cache_of_a_long_context() {
    // Kimi-K2 keeps a latent of 512 and a rotary key of 64 per layer and token, 61 layers.
    let kimi = fixture("configs/kimi_k2.json");
    let r = json(&odmoe_ok(&[
        "inspect",
        s(&kimi),
        "--context",
        "262144",
        "--json",
    ]));
    assert_eq!(r["kv_cache_bytes_per_token_f16"], 61 * (512 + 64) * 2);
    assert_eq!(r["context_tokens"], 262144);
    assert_eq!(r["kv_cache_bytes_at_context_f16"], 262144u64 * 61 * 576 * 2);
    assert_eq!(r["kv_cache_bytes_at_context_f32"], 262144u64 * 61 * 576 * 4);
    let text = odmoe_ok(&["inspect", s(&kimi), "--context", "262144"]);
    assert!(
        text.contains("17.2 GiB in f16 (17.2 GiB in q8_0, 34.3 GiB in f32) at 262144 tokens"),
        "{text}"
    );

    // Qwen3-30B-A3B keeps keys and values of 4 heads of 128 per layer and token, 48 layers: in
    // q8_0, 34 bytes for every 32 values.
    let qwen = fixture("configs/qwen3_30b_a3b.json");
    let r = json(&odmoe_ok(&[
        "inspect",
        s(&qwen),
        "--context",
        "262144",
        "--json",
    ]));
    assert_eq!(r["kv_cache_bytes_per_token_f16"], 48 * 2 * 4 * 128 * 2);
    assert_eq!(
        r["kv_cache_bytes_per_token_q8_0"],
        48 * 2 * 4 * (128 / 32 * 34)
    );
    let text = odmoe_ok(&["inspect", s(&qwen), "--context", "262144"]);
    assert!(
        text.contains("24.0 GiB in f16 (12.8 GiB in q8_0, 48.0 GiB in f32) at 262144 tokens"),
        "{text}"
    );

    // Heads of 16 values (the tiny gpt-oss) cannot be kept in Q8_0 blocks: said, not counted 0.
    let oss = fixture("gguf/gpt_oss-mxfp4.gguf");
    let r = json(&odmoe_ok(&["inspect", s(&oss), "--json"]));
    assert!(r["kv_cache_bytes_per_token_q8_0"].is_null(), "{r}");
    assert_eq!(r["expert_dtype"], "MXFP4", "{r}");
    let text = odmoe_ok(&["inspect", s(&oss)]);
    assert!(
        text.contains("no q8_0: heads are not whole 32-value blocks"),
        "{text}"
    );

    // A checkpoint: its cache in each way it can be kept, Q8_0 rows at 34 bytes for f16's 64.
    let gguf = fixture("gguf/qwen3_moe-q8_0.gguf");
    let r = json(&odmoe_ok(&[
        "inspect",
        s(&gguf),
        "--context",
        "1000",
        "--json",
    ]));
    let per_token = |kind: &str| {
        r[format!("kv_cache_bytes_per_token_{kind}")]
            .as_u64()
            .unwrap()
    };
    for kind in ["f16", "q8_0", "f32"] {
        assert_eq!(
            r[format!("kv_cache_bytes_at_context_{kind}")],
            1000 * per_token(kind)
        );
    }
    assert_eq!(per_token("f32"), 2 * per_token("f16"));
    assert_eq!(per_token("q8_0") * 64, per_token("f16") * 34);
}
