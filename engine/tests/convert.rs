//! `convert` and `verify` on the committed fixtures: every byte lands where the layout says, a
//! re-run or a resumed run gives the same layout, and damage is reported by file, layer and expert.

mod common;

use common::fixture;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use candle_core::Device;
use odmoe_engine::config::ModelConfig;
use odmoe_engine::convert::{ConvertEvent, convert};
use odmoe_engine::format::layout::{
    ALIGN, FORMAT_VERSION, MANIFEST, Manifest, Problem, expert_path, verify,
};
use odmoe_engine::format::safetensors::HfWeights;
use odmoe_engine::model::expert_tensor_names;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

const FIXTURES: [&str; 3] = ["qwen2_moe", "qwen3_moe", "mixtral"];

fn convert_quietly(src: &Path, out: &Path) -> Manifest {
    convert(src, out, |_| {}).unwrap_or_else(|e| panic!("converting {}: {e}", src.display()))
}

/// Every file under `dir`, as relative paths with `/` separators.
fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.insert(rel.to_str().unwrap().replace('\\', "/"));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn source_expert_names(config: &ModelConfig) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for layer in 0..config.num_layers {
        for expert in 0..config.num_experts {
            for name in expert_tensor_names(config, layer, expert) {
                names.insert(format!("{name}.weight"));
            }
        }
    }
    names
}

/// gpt-oss keeps each layer's experts fused, in BF16 or MXFP4: a layout holds each expert's own
/// `[out, in]` slices (MXFP4 as ggml's blocks), and computes the bits the checkpoint gives in
/// place, resident and on demand.
#[test]
fn fused_experts_convert_to_the_same_model() {
    use odmoe_engine::open::{self, ExpertMode, LoadOptions};
    use odmoe_engine::store::StoreConfig;
    for (name, dtype) in [("gpt_oss", "BF16"), ("gpt_oss_mxfp4", "MXFP4")] {
        let src = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model.odmoe");
        let manifest = convert_quietly(&src, &out);
        assert_eq!(manifest.expert.dtype, dtype, "{name}");
        // The fused tensors went into expert files, not base files; their biases stay in base.
        let base: Vec<String> = manifest
            .base_files
            .iter()
            .flat_map(|rel| {
                let bytes = fs::read(out.join(rel)).unwrap();
                let names: Vec<String> = SafeTensors::deserialize(&bytes)
                    .unwrap()
                    .names()
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                names
            })
            .collect();
        assert!(
            base.iter()
                .any(|n| n.ends_with("mlp.experts.gate_up_proj_bias")),
            "{name}"
        );
        assert!(
            !base
                .iter()
                .any(|n| odmoe_engine::format::safetensors::is_fused_expert_tensor(n)),
            "{name}: {base:?}"
        );

        let input = common::ids(&common::golden(name)["input_ids"]);
        let in_place = open::resident(&src, &Device::Cpu).unwrap();
        let expected = common::logit_bits_and_greedy(&in_place, &input, 16);
        let converted = open::resident(&out, &Device::Cpu).unwrap();
        assert!(
            common::logit_bits_and_greedy(&converted, &input, 16) == expected,
            "{name}"
        );
        let (config, total) = open::describe(&out).unwrap();
        assert_eq!(
            (&config, total),
            (&manifest.architecture, open::describe(&src).unwrap().1)
        );
        let options = LoadOptions {
            experts: ExpertMode::OnDemand(StoreConfig {
                budget_bytes: total / 4,
                ..StoreConfig::default()
            }),
            ..LoadOptions::default()
        };
        let loaded = open::load(&out, &options, &Device::Cpu).unwrap();
        assert!(
            common::logit_bits_and_greedy(&loaded.model, &input, 16) == expected,
            "{name}: on demand"
        );
        assert!(loaded.store.unwrap().stats().misses > 0, "{name}");
        let report = verify(&out, |_| {}).unwrap();
        assert!(report.is_ok(), "{name}: {:?}", report.problems);
    }
}

#[test]
fn every_fixture_converts_byte_for_byte() {
    for name in FIXTURES {
        let src = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model.odmoe");
        let manifest = convert_quietly(&src, &out);
        let config = odmoe_engine::model::config_from_hf_file(&src.join("config.json")).unwrap();
        let source = HfWeights::open(&src, &Device::Cpu).unwrap();

        // Manifest fields.
        assert_eq!(manifest.format, "odmoe");
        assert_eq!(manifest.format_version, FORMAT_VERSION);
        assert_eq!(manifest.architecture, config);
        assert_eq!(manifest.tokenizer.as_deref(), Some("tokenizer.json"));
        assert_eq!(Manifest::load(&out).unwrap(), manifest);
        let expert_files: Vec<&String> = manifest
            .files
            .keys()
            .filter(|f| f.starts_with("experts/"))
            .collect();
        assert_eq!(
            expert_files.len(),
            config.num_layers * config.num_experts,
            "{name}"
        );
        let layout = &manifest.expert;
        assert_eq!(layout.dtype, "BF16");
        assert_eq!(layout.data_offset % ALIGN, 0);
        assert_eq!(layout.file_bytes % ALIGN, 0);
        let (h, i) = (config.hidden_size, config.expert_intermediate_size);
        let shapes = [[i, h], [i, h], [h, i]];
        for (tensor, (tname, shape)) in layout
            .tensors
            .iter()
            .zip(["gate", "up", "down"].into_iter().zip(shapes))
        {
            assert_eq!((tensor.name.as_str(), tensor.shape), (tname, shape));
            assert_eq!(tensor.offset % ALIGN, 0);
            assert_eq!(tensor.bytes, (shape[0] * shape[1] * 2) as u64);
        }

        // The manifest lists exactly the files on disk (besides itself), with true hashes.
        let mut on_disk = files_under(&out);
        assert!(on_disk.remove(MANIFEST));
        assert_eq!(
            on_disk,
            manifest.files.keys().cloned().collect::<BTreeSet<_>>(),
            "{name}"
        );
        for (rel, entry) in &manifest.files {
            let bytes = fs::read(out.join(rel)).unwrap();
            assert_eq!(bytes.len() as u64, entry.bytes, "{rel}");
            let sha: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sha, entry.sha256, "{rel}");
        }
        for copied in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                fs::read(out.join(copied)).unwrap(),
                fs::read(src.join(copied)).unwrap()
            );
        }

        // Base files: every non-expert tensor exactly once, same dtype, shape and bytes, in the
        // file its kind belongs to.
        let expert_names = source_expert_names(&config);
        let mut placed = BTreeMap::new();
        for rel in &manifest.base_files {
            let bytes = fs::read(out.join(rel)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (tensor, view) in st.tensors() {
                let (dtype, shape, data) = source.raw(&tensor).unwrap();
                assert_eq!(
                    (view.dtype(), view.shape(), view.data()),
                    (dtype, shape, data),
                    "{tensor}"
                );
                assert!(
                    placed.insert(tensor.clone(), rel.clone()).is_none(),
                    "{tensor} twice"
                );
            }
        }
        let base_names: BTreeSet<String> = source
            .names()
            .into_iter()
            .filter(|n| !expert_names.contains(*n))
            .map(String::from)
            .collect();
        assert_eq!(
            placed.keys().cloned().collect::<BTreeSet<_>>(),
            base_names,
            "{name}"
        );
        for (tensor, rel) in &placed {
            let expected = if tensor.contains(".self_attn.") {
                "attention_layers"
            } else if tensor.contains("layernorm") {
                "norms"
            } else if tensor.contains(".shared_expert") {
                "shared_experts"
            } else if tensor.ends_with(".gate.weight") {
                "routers"
            } else {
                "embeddings"
            };
            assert_eq!(
                rel,
                &format!("base_model/{expected}.safetensors"),
                "{tensor}"
            );
        }
        assert_eq!(
            manifest
                .base_files
                .contains(&"base_model/shared_experts.safetensors".to_string()),
            name == "qwen2_moe"
        );
        // The same tensors through the engine's reader over the base files.
        let paths: Vec<PathBuf> = manifest.base_files.iter().map(|f| out.join(f)).collect();
        let base = HfWeights::open_files("base", &paths, &Device::Cpu).unwrap();
        for tensor in &base_names {
            assert_eq!(base.raw(tensor).unwrap(), source.raw(tensor).unwrap());
        }

        // Expert files: same layout in each, gate/up/down bytes equal to the source.
        for layer in 0..config.num_layers {
            for expert in 0..config.num_experts {
                let rel = expert_path(layer, expert);
                let bytes = fs::read(out.join(&rel)).unwrap();
                assert_eq!(bytes.len() as u64, layout.file_bytes, "{rel}");
                let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                assert_eq!(8 + header, layout.data_offset, "{rel}");
                let st = SafeTensors::deserialize(&bytes).unwrap();
                let names = expert_tensor_names(&config, layer, expert);
                for (tensor, source_name) in layout.tensors.iter().zip(&names) {
                    let view = st.tensor(&tensor.name).unwrap();
                    let (dtype, shape, data) =
                        source.raw(&format!("{source_name}.weight")).unwrap();
                    assert_eq!(
                        (view.dtype(), view.shape(), view.data()),
                        (dtype, shape, data)
                    );
                    let at = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
                    assert_eq!(at as u64, layout.data_offset + tensor.offset, "{rel}");
                }
                for (tensor, view) in st.tensors() {
                    if tensor.starts_with("_pad_") {
                        assert!(view.data().iter().all(|&b| b == 0));
                    }
                }
                let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
                let metadata = metadata.metadata().clone().unwrap();
                assert_eq!(metadata["layer"], layer.to_string());
                assert_eq!(metadata["expert"], expert.to_string());
            }
        }
        assert!(verify(&out, |_| {}).unwrap().is_ok());
    }
}

#[test]
fn reruns_and_second_conversions_give_identical_layouts() {
    let src = fixture("qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.odmoe"), tmp.path().join("b.odmoe"));
    let first = convert_quietly(&src, &a);
    let manifest_text = fs::read(a.join(MANIFEST)).unwrap();
    let mut events = Vec::new();
    let again = convert(&src, &a, |p| events.push(p.event)).unwrap();
    assert_eq!(again, first);
    assert_eq!(fs::read(a.join(MANIFEST)).unwrap(), manifest_text);
    assert!(!events.contains(&ConvertEvent::Written));
    assert_eq!(
        events.iter().filter(|e| **e == ConvertEvent::Kept).count(),
        first.files.len()
    );
    // Deterministic: another directory gets the same bytes.
    assert_eq!(convert_quietly(&src, &b), first);
    for rel in files_under(&a) {
        assert_eq!(
            fs::read(a.join(&rel)).unwrap(),
            fs::read(b.join(&rel)).unwrap(),
            "{rel}"
        );
    }
}

#[test]
fn an_interrupted_conversion_resumes_to_the_same_layout() {
    for name in ["mixtral", "qwen2_moe"] {
        let src = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let reference = convert_quietly(&src, &tmp.path().join("reference.odmoe"));
        let out = tmp.path().join("model.odmoe");
        // Die in the middle of the fifth expert file, after its first tensor.
        let mut experts_written = 0;
        let crashed = catch_unwind(AssertUnwindSafe(|| {
            convert(&src, &out, |p| {
                if p.file.starts_with("experts/") {
                    match p.event {
                        ConvertEvent::Written => experts_written += 1,
                        ConvertEvent::Tensor if experts_written == 4 => panic!("simulated crash"),
                        _ => {}
                    }
                }
            })
        }));
        assert!(crashed.is_err());
        assert!(!out.join(MANIFEST).exists());
        let partial = out.join(format!("{}.partial", expert_path(1, 0)));
        assert!(
            partial.exists() || out.join(format!("{}.partial", expert_path(0, 4))).exists(),
            "{:?}",
            files_under(&out)
        );
        let err = Manifest::load(&out).unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");
        assert!(verify(&out, |_| {}).is_err());

        let mut kept = 0;
        let resumed = convert(&src, &out, |p| {
            kept += usize::from(p.event == ConvertEvent::Kept)
        })
        .unwrap();
        assert_eq!(resumed, reference, "{name}");
        assert!(kept >= 4 + 2, "kept {kept} files");
        assert!(files_under(&out).iter().all(|f| !f.ends_with(".partial")));
        assert!(verify(&out, |_| {}).unwrap().is_ok());
    }
}

#[test]
fn verify_names_each_damaged_file_with_its_layer_and_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.odmoe");
    let manifest = convert_quietly(&fixture("qwen3_moe"), &out);
    let mut checked = Vec::new();
    let report = verify(&out, |p| checked.push(p.files_done)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.files_checked, manifest.files.len());
    assert_eq!(
        report.bytes_checked,
        manifest.files.values().map(|f| f.bytes).sum::<u64>()
    );
    assert_eq!(checked.last(), Some(&manifest.files.len()));

    // One flipped byte inside the up projection of layer 1, expert 5.
    let flipped = out.join(expert_path(1, 5));
    let mut bytes = fs::read(&flipped).unwrap();
    let at = (manifest.expert.data_offset + manifest.expert.tensors[1].offset + 7) as usize;
    bytes[at] ^= 0x01;
    fs::write(&flipped, &bytes).unwrap();
    let report = verify(&out, |_| {}).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let problem = &report.problems[0];
    assert_eq!(problem.file, expert_path(1, 5));
    assert_eq!((problem.layer, problem.expert), (Some(1), Some(5)));
    assert!(matches!(problem.problem, Problem::Checksum { .. }));
    let text = problem.to_string();
    assert!(
        text.contains("layer_01_expert_005") && text.contains("layer 1, expert 5"),
        "{text}"
    );
    bytes[at] ^= 0x01;
    fs::write(&flipped, &bytes).unwrap();
    assert!(verify(&out, |_| {}).unwrap().is_ok());

    // A truncated expert file, a missing one and a damaged base file.
    let truncated = out.join(expert_path(2, 7));
    let file = fs::OpenOptions::new().write(true).open(&truncated).unwrap();
    file.set_len(manifest.expert.file_bytes - ALIGN).unwrap();
    drop(file);
    fs::remove_file(out.join(expert_path(0, 0))).unwrap();
    let norms = out.join("base_model/norms.safetensors");
    let mut bytes = fs::read(&norms).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    fs::write(&norms, &bytes).unwrap();
    let report = verify(&out, |_| {}).unwrap();
    let found: BTreeMap<&str, &Problem> = report
        .problems
        .iter()
        .map(|p| (p.file.as_str(), &p.problem))
        .collect();
    assert_eq!(found.len(), 3, "{:?}", report.problems);
    assert_eq!(
        found[expert_path(2, 7).as_str()],
        &Problem::Size {
            expected: manifest.expert.file_bytes,
            actual: manifest.expert.file_bytes - ALIGN
        }
    );
    assert_eq!(found[expert_path(0, 0).as_str()], &Problem::Missing);
    assert!(matches!(
        found["base_model/norms.safetensors"],
        Problem::Checksum { .. }
    ));
    let base = report
        .problems
        .iter()
        .find(|p| p.file.starts_with("base_model/"))
        .unwrap();
    assert_eq!((base.layer, base.expert), (None, None));
}

#[test]
fn broken_manifests_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.odmoe");
    convert_quietly(&fixture("mixtral"), &out);
    let path = out.join(MANIFEST);
    let text = fs::read_to_string(&path).unwrap();

    let load_error = |contents: &str| {
        fs::write(&path, contents).unwrap();
        Manifest::load(&out).unwrap_err().to_string()
    };
    let err = load_error(&text.replace("\"format_version\": 1", "\"format_version\": 99"));
    assert!(
        err.contains("format_version 99") && err.contains("manifest.json"),
        "{err}"
    );
    let err = load_error(&text.replace("\"format\": \"odmoe\"", "\"format\": \"gguf\""));
    assert!(err.contains("\"gguf\""), "{err}");
    let err = load_error(&text[..text.len() / 2]);
    assert!(
        err.contains("manifest.json") && err.contains("JSON"),
        "{err}"
    );
    let err = load_error(&text.replace("\"data_offset\": 4096", "\"data_offset\": 4000"));
    assert!(err.contains("multiples of 4096"), "{err}");

    fs::remove_file(&path).unwrap();
    let err = Manifest::load(&out).unwrap_err().to_string();
    assert!(err.contains("incomplete"), "{err}");
    let err = Manifest::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("not an odmoe layout"), "{err}");
}

/// A writable copy of a fixture.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn convert_error(src: &Path, out: &Path) -> String {
    match convert(src, out, |_| {}) {
        Ok(_) => panic!("converting {} should fail", src.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bogus_sources_fail_clearly_and_leave_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.odmoe");

    let src = copy_fixture("qwen3_moe");
    fs::remove_file(src.path().join("config.json")).unwrap();
    let err = convert_error(src.path(), &out);
    assert!(
        err.contains("config.json") && err.contains("not a Hugging Face checkpoint"),
        "{err}"
    );
    assert!(!out.exists());

    let src = copy_fixture("qwen3_moe");
    let config = src.path().join("config.json");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replace("\"qwen3_moe\"", "\"llama4_moe\"")).unwrap();
    let err = convert_error(src.path(), &out);
    assert!(err.contains("llama4_moe"), "{err}");
    assert!(!out.exists());

    // A tensor the layout has no place for is an error, not a silent drop.
    let src = copy_fixture("qwen3_moe");
    let weights = src.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let extra = [0u8; 16];
    tensors.push((
        "model.layers.0.mlp.mystery.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &extra).unwrap(),
    ));
    fs::write(&weights, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let err = convert_error(src.path(), &out);
    assert!(
        err.contains("model.layers.0.mlp.mystery.weight") && err.contains("no place"),
        "{err}"
    );
    assert!(!out.exists());

    // A missing expert tensor is named.
    let src = copy_fixture("qwen3_moe");
    let weights = src.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let missing = "model.layers.2.mlp.experts.6.down_proj.weight";
    let tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != missing)
        .collect();
    fs::write(&weights, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let err = convert_error(src.path(), &out);
    assert!(err.contains(missing), "{err}");
    assert!(!out.exists());
}

#[test]
fn an_output_holding_another_checkpoint_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.odmoe");
    let manifest = convert_quietly(&fixture("qwen3_moe"), &out);
    let err = convert_error(&fixture("qwen2_moe"), &out);
    assert!(err.contains("different checkpoint"), "{err}");
    assert_eq!(Manifest::load(&out).unwrap(), manifest);
    assert!(verify(&out, |_| {}).unwrap().is_ok());

    let busy = tmp.path().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("notes.txt"), "mine").unwrap();
    let err = convert_error(&fixture("qwen3_moe"), &busy);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
}

#[test]
fn multi_token_prediction_layers_are_left_out_only_when_the_config_names_them() {
    // GLM-4.5 and DeepSeek-V3 checkpoints carry `num_nextn_predict_layers` drafting layers
    // after the decoder stack, named as one more decoder layer.
    let src = copy_fixture("glm4_moe");
    let weights = src.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let extra = [0u8; 16];
    for name in ["eh_proj.weight", "mlp.experts.0.up_proj.weight"] {
        tensors.push((
            format!("model.layers.3.{name}"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &extra).unwrap(),
        ));
    }
    fs::write(&weights, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.odmoe");
    let err = convert_error(src.path(), &out);
    assert!(
        err.contains("model.layers.3.") && err.contains("no place"),
        "{err}"
    );

    let config = src.path().join("config.json");
    let text = fs::read_to_string(&config).unwrap();
    let drafting = text.replace(
        "\"num_nextn_predict_layers\": 0",
        "\"num_nextn_predict_layers\": 1",
    );
    assert_ne!(text, drafting);
    fs::write(&config, drafting).unwrap();
    let manifest = convert_quietly(src.path(), &out);
    assert_eq!(manifest.architecture.draft_layers, 1);
    let resident = odmoe_engine::open::resident(&out, &Device::Cpu).unwrap();
    let input = common::ids(&common::golden("glm4_moe")["input_ids"]);
    let expected = odmoe_engine::open::resident(&fixture("glm4_moe"), &Device::Cpu).unwrap();
    assert!(
        common::logit_bits_and_greedy(&resident, &input, 4)
            == common::logit_bits_and_greedy(&expected, &input, 4),
        "the converted model is the checkpoint's without its drafting layer"
    );
}
