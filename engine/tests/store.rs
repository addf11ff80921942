//! The expert store: bit-exact logits against resident mode at every budget, from the odmoe layout
//! and from Hugging Face files in place; the budget invariant under concurrent load; shared reads;
//! exact telemetry; broken expert files refused at load or by their checksum at read, named, and
//! quarantined, from a layout, a GGUF file or a Hugging Face checkpoint.

mod common;

use common::{fixture, golden, ids, logit_bits_and_greedy};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};
use odmoe_engine::convert::convert;
use odmoe_engine::expert::{GluMlp, Matrix};
use odmoe_engine::format::gguf::{GgufFile, stacked_expert_names};
use odmoe_engine::format::layout::{MANIFEST, Manifest};
use odmoe_engine::format::safetensors::HfWeights;
use odmoe_engine::model::{Logits, expert_tensor_names};
use odmoe_engine::open::{self, ExpertMode, LoadOptions};
use odmoe_engine::store::fetch::{GIVEN_UP, Next, Pace};
use odmoe_engine::store::{ExpertSizes, ExpertSource, ExpertStore, PolicyKind, StoreConfig, width};

fn on_demand(budget_bytes: u64, policy: PolicyKind) -> LoadOptions {
    LoadOptions {
        experts: ExpertMode::OnDemand(StoreConfig {
            budget_bytes,
            io_threads: 3,
            policy,
        }),
        ..LoadOptions::default()
    }
}

#[test]
fn on_demand_is_bit_identical_to_resident_at_every_budget() {
    for name in [
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
        "deepseek_v3",
        "kimi_k2",
        "glm4_moe",
    ] {
        let out = tempfile::tempdir().unwrap();
        let layout = out.path().join("model.odmoe");
        convert(&fixture(name), &layout, |_| {}).unwrap();
        let input = ids(&golden(name)["input_ids"]);
        let resident = odmoe_engine::open::resident(&fixture(name), &Device::Cpu).unwrap();
        let expected = logit_bits_and_greedy(&resident, &input, 16);
        let (config, total) = open::describe(&fixture(name)).unwrap();
        let expert = config.expert_f32_bytes() as u64;
        let minimum = config.num_experts_per_token as u64 * expert;
        for source in [fixture(name), layout.clone()] {
            for budget in [minimum, minimum + expert, total / 4, total / 2, total] {
                for policy in [PolicyKind::Lru, PolicyKind::Lfuda] {
                    let loaded =
                        open::load(&source, &on_demand(budget, policy), &Device::Cpu).unwrap();
                    let got = logit_bits_and_greedy(&loaded.model, &input, 16);
                    assert!(
                        got == expected,
                        "{name} from {} at budget {budget} ({policy:?}) differs",
                        source.display()
                    );
                    let store = loaded.store.unwrap();
                    store.check_invariants().unwrap();
                    let stats = store.stats();
                    assert!(stats.resident_bytes <= budget);
                    if budget < total {
                        assert!(
                            stats.evictions > 0,
                            "{name}: a budget below all experts must evict"
                        );
                    }
                }
            }
        }
    }
}

/// gpt-oss's experts, sliced per expert out of its fused tensors (BF16, or MXFP4 blocks and
/// scales), on demand as resident.
#[test]
fn fused_experts_on_demand_are_bit_identical_to_resident() {
    for name in ["gpt_oss", "gpt_oss_mxfp4"] {
        let source = fixture(name);
        let input = ids(&golden(name)["input_ids"]);
        let resident = odmoe_engine::open::resident(&source, &Device::Cpu).unwrap();
        let expected = logit_bits_and_greedy(&resident, &input, 16);
        let (config, total) = open::describe(&source).unwrap();
        let expert = total / (config.moe_layers().count() * config.num_experts) as u64;
        for budget in [config.num_experts_per_token as u64 * expert, total / 2] {
            let loaded =
                open::load(&source, &on_demand(budget, PolicyKind::Lru), &Device::Cpu).unwrap();
            assert!(
                logit_bits_and_greedy(&loaded.model, &input, 16) == expected,
                "{name}, budget {budget}"
            );
            let store = loaded.store.unwrap();
            assert!(store.stats().evictions > 0, "{name}");
            // An expert's bytes as its matrices hold them, which the budget counts.
            assert_eq!(store.stats().resident_bytes % expert, 0, "{name}");
        }
        if name == "gpt_oss_mxfp4" && odmoe_engine::kernels::quantized::available() {
            // Held as the checkpoint stores them: 17 bytes per 32 values.
            assert_eq!(expert, config.expert_f32_bytes() as u64 / 4 / 32 * 17);
        }
    }
}

#[test]
fn layout_resident_mode_matches_the_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("m.odmoe");
    convert(&fixture("qwen2_moe"), &layout, |_| {}).unwrap();
    let input = ids(&golden("qwen2_moe")["input_ids"]);
    let resident =
        |path: &std::path::Path| odmoe_engine::open::resident(path, &Device::Cpu).unwrap();
    let a = logit_bits_and_greedy(&resident(&fixture("qwen2_moe")), &input, 16);
    let b = logit_bits_and_greedy(&resident(&layout), &input, 16);
    assert!(a == b);
}

/// An in-memory source: tiny experts, an optional delay, and a count of reads per expert.
struct FakeSource {
    delay: Duration,
    reads: Mutex<HashMap<(usize, usize), u64>>,
    failing: Option<(usize, usize)>,
    /// The expert whose read panics.
    panicking: Option<(usize, usize)>,
}

impl FakeSource {
    fn new(delay: Duration) -> Self {
        Self {
            delay,
            reads: Mutex::new(HashMap::new()),
            failing: None,
            panicking: None,
        }
    }
}

impl ExpertSource for FakeSource {
    fn read(
        &self,
        layer: usize,
        expert: usize,
        _pace: Pace,
    ) -> odmoe_engine::Result<(GluMlp, u64)> {
        std::thread::sleep(self.delay);
        *self
            .reads
            .lock()
            .unwrap()
            .entry((layer, expert))
            .or_default() += 1;
        if self.panicking == Some((layer, expert)) {
            panic!("injected panic");
        }
        if self.failing == Some((layer, expert)) {
            return Err(odmoe_engine::Error::Expert {
                layer,
                expert,
                path: PathBuf::from("fake"),
                message: "injected failure".into(),
            });
        }
        let w = Tensor::full((layer * 100 + expert) as f32, (1, 1), &Device::Cpu).unwrap();
        Ok((GluMlp::from_f32(w.clone(), w.clone(), w), 12))
    }

    fn expert_sizes(&self) -> ExpertSizes {
        ExpertSizes::Same(100)
    }
}

fn store(
    source: FakeSource,
    experts_in_budget: u64,
    policy: PolicyKind,
) -> (Arc<FakeSource>, ExpertStore) {
    let source = Arc::new(source);
    let config = StoreConfig {
        budget_bytes: experts_in_budget * 100,
        io_threads: 4,
        policy,
    };
    (source.clone(), ExpertStore::new(source, &config))
}

#[test]
fn the_budget_holds_under_concurrent_acquire_prefetch_and_release() {
    for policy in [PolicyKind::Lru, PolicyKind::Lfuda] {
        let (_, store) = store(FakeSource::new(Duration::from_micros(200)), 6, policy);
        let store = Arc::new(store);
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut x = t * 7919 + 1;
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for _ in 0..300 {
                        let layer = (next() % 4) as usize;
                        let a = (next() % 8) as usize;
                        if next() % 3 == 0 {
                            store.prefetch(layer, &[a, (a + 1) % 8]);
                        } else {
                            // One expert per thread at a time: six threads fit a budget of six.
                            let held = store.acquire(layer, &[a]).unwrap();
                            store.check_invariants().unwrap();
                            let Matrix::Candle(QMatMul::Tensor(gate)) = &held[0].gate else {
                                panic!("fake experts are f32")
                            };
                            let value = gate.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
                            assert_eq!(value, (layer * 100 + a) as f32, "wrong expert returned");
                            drop(held);
                        }
                        store.check_invariants().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        store.wait_idle();
        store.check_invariants().unwrap();
        let stats = store.stats();
        assert!(stats.resident_bytes <= stats.budget_bytes);
        assert!(stats.evictions > 0 && stats.misses > 0 && stats.hits > 0);
    }
}

#[test]
fn concurrent_requests_for_one_expert_share_one_read() {
    let (source, store) = store(
        FakeSource::new(Duration::from_millis(50)),
        4,
        PolicyKind::Lru,
    );
    let store = Arc::new(store);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || drop(store.acquire(2, &[5]).unwrap()))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(source.reads.lock().unwrap()[&(2, 5)], 1);
    let stats = store.stats();
    assert_eq!((stats.misses, stats.hits, stats.reads), (1, 7, 1));
}

#[test]
fn telemetry_is_exact_on_a_scripted_sequence() {
    let (_, store) = store(FakeSource::new(Duration::ZERO), 3, PolicyKind::Lru);
    drop(store.acquire(0, &[0, 1]).unwrap()); // 2 misses
    drop(store.acquire(0, &[1, 2]).unwrap()); // 1 hit, 1 miss: budget full (0,1,2)
    drop(store.acquire(1, &[0]).unwrap()); // 1 miss, evicts (0,0), the least recent
    store.prefetch(1, &[1]); // issued, evicts (0,1)
    store.wait_idle();
    drop(store.acquire(1, &[1]).unwrap()); // hit, prefetch used
    store.prefetch(2, &[0]); // issued, evicts (0,2)
    store.wait_idle();
    drop(store.acquire(3, &[0]).unwrap()); // miss, evicts (1,0)
    drop(store.acquire(3, &[1, 2]).unwrap()); // 2 misses: evicts (1,1) then the unused prefetch (2,0)
    let s = store.stats();
    assert_eq!((s.hits, s.misses), (2, 7));
    assert_eq!(
        (
            s.prefetch_issued,
            s.prefetch_used,
            s.prefetch_wasted,
            s.prefetch_dropped
        ),
        (2, 1, 1, 0)
    );
    assert_eq!(s.evictions, 6);
    assert_eq!((s.reads, s.bytes_read), (9, 108));
    assert_eq!(
        (s.resident_bytes, s.budget_bytes, s.resident_experts),
        (300, 300, 3)
    );
}

#[test]
fn a_prefetch_that_cannot_fit_is_dropped_and_pinned_experts_stay() {
    let (_, store) = store(FakeSource::new(Duration::ZERO), 2, PolicyKind::Lru);
    let held = store.acquire(0, &[0, 1]).unwrap();
    store.prefetch(0, &[2]);
    assert_eq!(store.stats().prefetch_dropped, 1);
    assert!(
        store.acquire(0, &[3]).is_err(),
        "no room while both experts are pinned"
    );
    drop(held);
    drop(store.acquire(0, &[3]).unwrap());
    store.check_invariants().unwrap();
}

/// Reads that say they started, then block until the test lets them through.
struct GatedSource {
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
    started: Mutex<std::sync::mpsc::Sender<(usize, usize)>>,
}

impl ExpertSource for GatedSource {
    fn read(
        &self,
        layer: usize,
        expert: usize,
        _pace: Pace,
    ) -> odmoe_engine::Result<(GluMlp, u64)> {
        // The test may not listen.
        let _ = self.started.lock().unwrap().send((layer, expert));
        // A test that fails before letting a read through would otherwise hang, the store's
        // I/O threads waiting here as it drops.
        let opened = self
            .gate
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30));
        if opened.is_err() {
            return Err(odmoe_engine::Error::Expert {
                layer,
                expert,
                path: PathBuf::from("gated"),
                message: "the test never let the read through".into(),
            });
        }
        let w = Tensor::full((layer * 100 + expert) as f32, (1, 1), &Device::Cpu).unwrap();
        Ok((GluMlp::from_f32(w.clone(), w.clone(), w), 12))
    }

    fn expert_sizes(&self) -> ExpertSizes {
        ExpertSizes::Same(100)
    }
}

/// A store of experts of 100 bytes whose reads each wait for a message on the sender returned.
fn gated_store(
    experts_in_budget: u64,
    io_threads: usize,
) -> (std::sync::mpsc::Sender<()>, ExpertStore) {
    let (open, _, store) = gated_store_telling_starts(experts_in_budget, io_threads);
    (open, store)
}

/// [`gated_store`], and the receiver each read names its expert on as it starts.
fn gated_store_telling_starts(
    experts_in_budget: u64,
    io_threads: usize,
) -> (
    std::sync::mpsc::Sender<()>,
    std::sync::mpsc::Receiver<(usize, usize)>,
    ExpertStore,
) {
    let (open, gate) = std::sync::mpsc::channel();
    let (tell, started) = std::sync::mpsc::channel();
    let config = StoreConfig {
        budget_bytes: experts_in_budget * 100,
        io_threads,
        policy: PolicyKind::Lru,
    };
    let source = Arc::new(GatedSource {
        gate: Mutex::new(gate),
        started: Mutex::new(tell),
    });
    (open, started, ExpertStore::new(source, &config))
}

#[test]
fn requests_return_before_their_reads_and_unwaited_ones_release_their_pins() {
    let (open, store) = gated_store(2, 2);
    // No read can finish yet: returning at all shows request does not wait for them.
    let mut pending = store.request(0, &[0, 1]).unwrap();
    assert_eq!(store.stats().reads, 0);
    open.send(()).unwrap();
    open.send(()).unwrap();
    let second = pending.pop().unwrap();
    let first = pending.pop().unwrap().wait().unwrap();
    assert!(
        store.acquire(0, &[2]).is_err(),
        "both experts are pinned, waited for or not"
    );
    drop(second);
    drop(first);
    open.send(()).unwrap();
    drop(store.acquire(0, &[2]).unwrap());
    store.check_invariants().unwrap();
}

#[test]
fn a_failed_read_is_reported_and_the_store_stays_usable() {
    let mut source = FakeSource::new(Duration::ZERO);
    source.failing = Some((1, 3));
    let (_, store) = store(source, 4, PolicyKind::Lru);
    let err = store
        .acquire(1, &[2, 3])
        .err()
        .expect("the read of (1, 3) fails")
        .to_string();
    assert!(
        err.contains("expert 3 of layer 1") && err.contains("injected failure"),
        "{err}"
    );
    store.check_invariants().unwrap();
    assert_eq!(
        store.stats().resident_bytes,
        100,
        "only the expert that loaded stays"
    );
    drop(store.acquire(1, &[2, 4]).unwrap());
    store.set_budget(0);
    assert_eq!(store.stats().resident_bytes, 0);
}

#[test]
fn a_read_that_panics_fails_like_any_other_and_the_store_stays_usable() {
    let mut source = FakeSource::new(Duration::ZERO);
    source.panicking = Some((1, 3));
    let (_, store) = store(source, 4, PolicyKind::Reuse);
    let store = Arc::new(store);
    // Before, the I/O thread died with the read and the acquire waited for ever.
    let (done, outcome) = std::sync::mpsc::channel();
    let acquiring = store.clone();
    std::thread::spawn(move || {
        let result = acquiring
            .acquire(1, &[2, 3])
            .map(drop)
            .map_err(|e| e.to_string());
        done.send(result).unwrap();
    });
    let err = outcome
        .recv_timeout(Duration::from_secs(30))
        .expect("the acquire returns")
        .expect_err("the read of (1, 3) fails");
    assert!(
        err.contains("expert 3 of layer 1") && err.contains("injected panic"),
        "{err}"
    );
    assert_eq!(store.stats().read_errors, 1);
    store.check_invariants().unwrap();
    for layer in 0..3 {
        drop(store.acquire(layer, &[0, 1, 2, 4]).unwrap());
    }
    store.wait_idle();
}

/// The expert the broken-file tests break: expert 4 of layer 1.
const BROKEN: &str = "experts/layer_01_expert_004.safetensors";

fn layout_with_broken_expert(break_it: impl Fn(&Path)) -> (tempfile::TempDir, PathBuf) {
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("m.odmoe");
    convert(&fixture("qwen3_moe"), &layout, |_| {}).unwrap();
    break_it(&layout.join(BROKEN));
    (out, layout)
}

/// Overwrites `bytes.len()` bytes of the file at `path` from `offset`, in place.
fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Flips bit `k % 8` of eight bytes spread over `[offset, offset + len)` of the file at `path`.
fn flip_eight_bits(path: &Path, offset: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    for k in 0..8 {
        let at = offset + k * (len / 8) + 3;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        byte[0] ^= 1 << k;
        file.write_all_at(&byte, at).unwrap();
    }
}

/// Where the expert tensors of a layout's files start.
fn expert_data_offset(layout: &Path) -> u64 {
    Manifest::load(layout).unwrap().expert.data_offset
}

/// Expert 4 of layer 1 of the loaded model is broken: its acquire fails, and a second one fails
/// at once with the same error without reading it again; other experts and the store keep
/// working. Returns the error.
fn broken_expert_error_of(store: &ExpertStore) -> String {
    drop(store.acquire(1, &[3, 5]).unwrap()); // other experts are fine
    let err = store
        .acquire(1, &[4])
        .err()
        .expect("expert 4 of layer 1 is broken")
        .to_string();
    let after_first = store.stats();
    assert_eq!(after_first.read_errors, 1, "the failed read is counted");
    let again = store
        .acquire(1, &[5, 4])
        .err()
        .expect("a quarantined expert fails again")
        .to_string();
    assert_eq!(again, err, "the same error");
    let after_second = store.stats();
    assert_eq!(
        (
            after_second.read_errors,
            after_second.misses,
            after_second.reads
        ),
        (1, after_first.misses, after_first.reads),
        "the quarantined expert is not read again"
    );
    store.prefetch(1, &[4]);
    assert_eq!(
        store.stats().prefetch_issued,
        after_second.prefetch_issued,
        "nor prefetched"
    );
    drop(store.acquire(0, &[4]).unwrap()); // and the store stays usable
    drop(store.acquire(1, &[5]).unwrap());
    store.check_invariants().unwrap();
    err
}

fn broken_expert_error(layout: &Path, verify: bool) -> String {
    let options = LoadOptions {
        verify_checksums: verify,
        ..on_demand(1 << 30, PolicyKind::Lru)
    };
    let loaded = open::load(layout, &options, &Device::Cpu).unwrap();
    broken_expert_error_of(&loaded.store.unwrap())
}

fn load_error(path: &Path) -> String {
    open::load(path, &on_demand(1 << 30, PolicyKind::Lru), &Device::Cpu)
        .err()
        .expect("the model must not load")
        .to_string()
}

#[test]
fn four_kib_of_0xff_in_an_expert_file_fail_its_checksum() {
    let (_keep, layout) = layout_with_broken_expert(|p| {
        let data = expert_data_offset(p.parent().unwrap().parent().unwrap());
        overwrite(p, data, &[0xFF; 4096]);
    });
    for verify_sha256 in [false, true] {
        let err = broken_expert_error(&layout, verify_sha256);
        assert!(
            err.contains("layer_01_expert_004")
                && err.contains("expert 4 of layer 1")
                && err.contains("checksum mismatch"),
            "{err}"
        );
    }
}

#[test]
fn eight_flipped_bits_in_an_expert_file_fail_its_checksum() {
    let (_keep, layout) = layout_with_broken_expert(|p| {
        let data = expert_data_offset(p.parent().unwrap().parent().unwrap());
        let len = std::fs::metadata(p).unwrap().len();
        flip_eight_bits(p, data, len - data);
    });
    let err = broken_expert_error(&layout, false);
    assert!(
        err.contains("layer_01_expert_004") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn a_resident_load_refuses_a_corrupt_expert() {
    let (_keep, layout) = layout_with_broken_expert(|p| overwrite(p, 5000, &[0xFF; 16]));
    let err = open::load(&layout, &LoadOptions::default(), &Device::Cpu)
        .err()
        .expect("a corrupt expert must not load")
        .to_string();
    assert!(
        err.contains("layer_01_expert_004") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn truncated_or_missing_expert_files_are_refused_at_load() {
    let (_keep, layout) = layout_with_broken_expert(|p| {
        let file = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        file.set_len(file.metadata().unwrap().len() - 4096).unwrap();
    });
    let err = load_error(&layout);
    assert!(
        err.contains("layer_01_expert_004")
            && err.contains("expert 4 of layer 1")
            && err.contains("truncated"),
        "{err}"
    );

    let (_keep, layout) = layout_with_broken_expert(|p| std::fs::remove_file(p).unwrap());
    let err = load_error(&layout);
    assert!(
        err.contains("layer_01_expert_004") && err.contains("expert 4 of layer 1"),
        "{err}"
    );
}

#[test]
fn an_expert_file_broken_after_load_is_named() {
    let (_keep, layout) = layout_with_broken_expert(|_| {});
    let loaded = open::load(&layout, &on_demand(1 << 30, PolicyKind::Lru), &Device::Cpu).unwrap();
    let broken = layout.join(BROKEN);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&broken)
        .unwrap();
    file.set_len(file.metadata().unwrap().len() - 4096).unwrap();
    let err = broken_expert_error_of(loaded.store.as_ref().unwrap());
    assert!(
        err.contains("layer_01_expert_004") && err.contains("truncated"),
        "{err}"
    );
}

/// Removes the expert files' xxh3 from a layout's manifest, as layouts written before it was
/// recorded have none.
fn strip_xxh3(layout: &Path) {
    let mut manifest = Manifest::load(layout).unwrap();
    for entry in manifest.files.values_mut() {
        entry.xxh3_64 = None;
    }
    std::fs::write(layout.join(MANIFEST), manifest.to_json()).unwrap();
}

#[test]
fn a_layout_without_xxh3_gets_an_index_from_files_that_match_their_sha256() {
    let name = "qwen3_moe";
    let input = ids(&golden(name)["input_ids"]);
    let expected = logit_bits_and_greedy(
        &odmoe_engine::open::resident(&fixture(name), &Device::Cpu).unwrap(),
        &input,
        8,
    );
    let (_keep, layout) = layout_with_broken_expert(|_| {});
    strip_xxh3(&layout);
    let loaded = open::load(&layout, &on_demand(1 << 30, PolicyKind::Lru), &Device::Cpu).unwrap();
    assert!(layout.join("experts.odmoe-checksums").is_file());
    assert!(logit_bits_and_greedy(&loaded.model, &input, 8) == expected);

    // The index guards later reads as the manifest's xxh3 would.
    let store = loaded.store.unwrap();
    store.set_budget(0);
    flip_eight_bits(&layout.join(BROKEN), 4096, 4096);
    store.set_budget(1 << 30);
    let err = broken_expert_error_of(&store);
    assert!(
        err.contains("layer_01_expert_004")
            && err.contains("checksum mismatch")
            && err.contains("experts.odmoe-checksums"),
        "{err}"
    );

    // A file already corrupt when the index would be computed is refused by its sha256.
    let (_keep, layout) = layout_with_broken_expert(|p| flip_eight_bits(p, 4096, 4096));
    strip_xxh3(&layout);
    let err = load_error(&layout);
    assert!(
        err.contains("layer_01_expert_004") && err.contains("sha256 mismatch"),
        "{err}"
    );
}

/// Flips eight bits of `[offset, offset + len)` of the file at `path`, keeping its modification
/// time, as bit rot on the disk would: an index kept from an earlier load still applies.
fn rot_bits(path: &Path, offset: u64, len: u64) {
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    flip_eight_bits(path, offset, len);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
}

#[test]
fn a_gguf_expert_changed_after_its_index_was_built_is_refused_never_computed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen3_moe-q8_0.gguf");
    std::fs::copy(fixture("gguf").join("qwen3_moe-q8_0.gguf"), &path).unwrap();
    let gguf = GgufFile::open(&path, &Device::Cpu).unwrap();
    let config = odmoe_engine::model::config_from_gguf(&gguf).unwrap();
    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    let gate = gguf
        .expert_slice(&stacked_expert_names(1)[0], 4, [i, h])
        .unwrap();
    drop(gguf);

    // Loading computes the index and keeps it beside the file.
    let loaded = open::load(&path, &on_demand(1 << 30, PolicyKind::Lru), &Device::Cpu).unwrap();
    assert!(
        dir.path()
            .join("qwen3_moe-q8_0.gguf.odmoe-checksums")
            .is_file()
    );
    rot_bits(&path, gate.offset, gate.bytes as u64);
    let err = broken_expert_error_of(loaded.store.as_ref().unwrap());
    assert!(
        err.contains("qwen3_moe-q8_0.gguf")
            && err.contains("expert 4 of layer 1")
            && err.contains("gate slice")
            && err.contains("checksum mismatch"),
        "{err}"
    );
    drop(loaded);

    // The next load keeps the index (same path, length and time): a forward pass over enough
    // tokens that some route to the expert fails rather than computing with its bytes.
    let tokens: Vec<u32> = (0..config.vocab_size.min(64) as u32).collect();
    for options in [on_demand(1 << 30, PolicyKind::Lru), LoadOptions::default()] {
        let result = open::load(&path, &options, &Device::Cpu).and_then(|loaded| {
            loaded
                .model
                .forward(&tokens, &mut loaded.model.new_cache(), Logits::Last, None)
        });
        let err = result
            .expect_err("expert 4 of layer 1 is corrupt")
            .to_string();
        assert!(
            err.contains("expert 4 of layer 1") && err.contains("checksum mismatch"),
            "{err}"
        );
    }
}

#[test]
fn a_hugging_face_expert_changed_after_its_index_was_built_is_refused() {
    // A tensor of its own, and the exponents of MXFP4 blocks (gpt-oss's fused experts).
    for (name, scales) in [("qwen3_moe", false), ("gpt_oss_mxfp4", true)] {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let from = entry.unwrap().path();
            // Not an index kept beside the fixture: this copy must compute its own.
            if !from.to_string_lossy().ends_with(".odmoe-checksums") {
                std::fs::copy(&from, dir.path().join(from.file_name().unwrap())).unwrap();
            }
        }
        let config =
            odmoe_engine::model::config_from_hf_file(&dir.path().join("config.json")).unwrap();
        let tensor = format!("{}.weight", expert_tensor_names(&config, 1, 4)[2]);
        let down = HfWeights::open(dir.path(), &Device::Cpu)
            .unwrap()
            .location(&tensor)
            .unwrap();
        let loaded = open::load(
            dir.path(),
            &on_demand(1 << 30, PolicyKind::Lru),
            &Device::Cpu,
        )
        .unwrap();
        assert!(dir.path().join("experts.odmoe-checksums").is_file());
        match (&down.scales, scales) {
            (Some(scales), true) => rot_bits(&scales.path, scales.offset, scales.bytes),
            (None, false) => rot_bits(&down.path, down.offset, down.bytes),
            _ => panic!("{name}: scales {:?}", down.scales),
        }
        let err = broken_expert_error_of(loaded.store.as_ref().unwrap());
        let range = if scales { "down scales" } else { "down tensor" };
        assert!(
            err.contains("model.safetensors")
                && err.contains("expert 4 of layer 1")
                && err.contains(range)
                && err.contains("checksum mismatch"),
            "{name}: {err}"
        );
    }
}

#[test]
fn reads_are_counted_in_bytes_from_disk() {
    let loaded = open::load(
        &fixture("mixtral"),
        &on_demand(1 << 30, PolicyKind::Lru),
        &Device::Cpu,
    )
    .unwrap();
    let store = loaded.store.unwrap();
    drop(store.acquire(0, &[0, 1, 2]).unwrap());
    let s = store.stats();
    // Mixtral fixture: bf16 experts of 3 x 48 x 64 values.
    assert_eq!((s.reads, s.bytes_read), (3, 3 * 3 * 48 * 64 * 2));
    assert_eq!(
        store.expert_sizes(),
        &ExpertSizes::Same(3 * 48 * 64 * 4),
        "the budget counts experts as f32 in memory"
    );
}

/// llama.cpp's Q4_K_M keeps some layers' down projections in Q6_K (this fixture's layer 1): each
/// layer's experts are charged their own size, so the store never holds more than its budget.
#[test]
fn each_layer_is_charged_its_own_expert_size() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gguf/qwen3_moe-k-q4_k_m.gguf");
    let (config, sizes) = open::expert_sizes_on(&path, &Device::Cpu).unwrap();
    // Q4_K holds 256 values in 144 bytes, Q6_K in 210.
    let blocks = (config.hidden_size * config.expert_intermediate_size / 256) as u64;
    let (q4_k, mixed) = (3 * blocks * 144, 2 * blocks * 144 + blocks * 210);
    assert_eq!((sizes.at(0), sizes.at(1)), (q4_k, mixed), "{sizes:?}");
    let k = config.num_experts_per_token;
    let routed: Vec<usize> = (0..k).collect();

    let budget = k as u64 * mixed;
    let loaded = open::load(&path, &on_demand(budget, PolicyKind::Lru), &Device::Cpu).unwrap();
    let store = loaded.store.unwrap();
    drop(store.acquire(1, &routed).unwrap());
    assert_eq!(store.stats().resident_bytes, budget);
    drop(store.acquire(0, &routed).unwrap());
    assert_eq!(store.stats().resident_bytes, k as u64 * q4_k);
    store.check_invariants().unwrap();

    // The least budget is the larger layer's k experts, not k of the mean size.
    let short = open::load(&path, &on_demand(budget - 1, PolicyKind::Lru), &Device::Cpu);
    let err = short
        .err()
        .expect("a byte short of k larger experts is refused");
    assert!(err.to_string().contains("below the minimum"), "{err}");
}

/// Once a layer's routing is known, queued guesses for it that routing did not choose are
/// cancelled before their reads start; a read already started completes and is used.
#[test]
fn routing_cancels_the_wrong_guesses_still_queued() {
    let (open, store) = gated_store(16, 1);
    // The one I/O thread takes the first guess and waits in its read: the second stays queued.
    store.prefetch(1, &[0, 1]);
    store.routed(1, &[0]);
    let stats = store.stats();
    assert_eq!((stats.prefetch_issued, stats.prefetch_cancelled), (2, 1));
    assert_eq!(
        stats.resident_experts, 1,
        "the cancelled guess gave its room back"
    );
    open.send(()).unwrap();
    drop(store.acquire(1, &[0]).unwrap());
    let stats = store.stats();
    assert_eq!((stats.hits, stats.prefetch_used, stats.reads), (1, 1, 1));
    store.check_invariants().unwrap();
}

/// A guess's read waits while a miss is being read, though I/O threads are free: on a disk
/// that reads bound, a guess read beside a miss takes the miss's time; read while the layer
/// computes, it takes idle time.
#[test]
fn a_guess_is_read_only_while_no_miss_is() {
    let (open, started, store) = gated_store_telling_starts(16, 3);
    let wait = Duration::from_secs(10);
    let miss = store.request(0, &[0]).unwrap();
    assert_eq!(started.recv_timeout(wait), Ok((0, 0)));
    store.prefetch(1, &[1]);
    the_guess_starts_only_once_the_miss_is_read(&open, &started, &store, miss, (1, 1));
    assert_eq!(store.stats().reads, 2);
    store.check_invariants().unwrap();
}

/// While `miss` is pending no other read starts, though I/O threads are free; once it is let
/// through and dropped, `guess` starts, and is let through and read.
fn the_guess_starts_only_once_the_miss_is_read(
    open: &Sender<()>,
    started: &Receiver<(usize, usize)>,
    store: &ExpertStore,
    miss: Vec<odmoe_engine::expert::PendingExpert>,
    guess: (usize, usize),
) {
    assert!(
        started.recv_timeout(Duration::from_millis(300)).is_err(),
        "a guess's read started beside the miss's"
    );
    open.send(()).unwrap();
    drop(miss);
    assert_eq!(
        started.recv_timeout(Duration::from_secs(10)),
        Ok(guess),
        "the guess is read next"
    );
    open.send(()).unwrap();
    store.wait_idle();
}

/// A guess's read that a miss comes to wait on counts as the miss's: no other guess starts
/// beside it.
#[test]
fn a_guess_a_miss_waits_on_is_read_as_a_miss() {
    let (open, started, store) = gated_store_telling_starts(16, 3);
    let wait = Duration::from_secs(10);
    store.prefetch(1, &[1]);
    assert_eq!(started.recv_timeout(wait), Ok((1, 1)));
    let miss = store.request(1, &[1]).unwrap();
    store.prefetch(1, &[2]);
    the_guess_starts_only_once_the_miss_is_read(&open, &started, &store, miss, (1, 2));
    store.check_invariants().unwrap();
}

/// What a [`PiecedSource`] read told: its expert, and the pace's answer (None: a demand read
/// started).
type Told = ((usize, usize), Option<Next>);

/// Reads in two pieces, each let through by the test for its expert. A guess's read asks its
/// pace before each piece and tells what it answered; a demand read tells it started.
struct PiecedSource {
    passes: Mutex<HashMap<(usize, usize), usize>>,
    passed: Condvar,
    told: Mutex<Sender<Told>>,
}

impl PiecedSource {
    fn new() -> (Arc<Self>, Receiver<Told>) {
        let (tell, told) = std::sync::mpsc::channel();
        let source = Self {
            passes: Mutex::default(),
            passed: Condvar::new(),
            told: Mutex::new(tell),
        };
        (Arc::new(source), told)
    }

    fn let_through(&self, key: (usize, usize)) {
        *self.passes.lock().unwrap().entry(key).or_default() += 1;
        self.passed.notify_all();
    }

    /// Waits for the test to let one piece of `key` through; false if it never does.
    fn pass(&self, key: (usize, usize)) -> bool {
        let passes = self.passes.lock().unwrap();
        let (mut passes, timeout) = self
            .passed
            .wait_timeout_while(passes, Duration::from_secs(30), |p| {
                p.get(&key).is_none_or(|&n| n == 0)
            })
            .unwrap();
        if timeout.timed_out() {
            return false;
        }
        *passes.get_mut(&key).unwrap() -= 1;
        true
    }

    fn tell(&self, key: (usize, usize), answer: Option<Next>) {
        // The test may not listen.
        let _ = self.told.lock().unwrap().send((key, answer));
    }
}

impl ExpertSource for PiecedSource {
    fn read(&self, layer: usize, expert: usize, pace: Pace) -> odmoe_engine::Result<(GluMlp, u64)> {
        let key = (layer, expert);
        let fail = |message: &str| odmoe_engine::Error::Expert {
            layer,
            expert,
            path: PathBuf::from("pieced"),
            message: message.into(),
        };
        let mut ask = match pace {
            Pace::Whole => {
                self.tell(key, None);
                None
            }
            Pace::Pieces(next) => Some(next),
        };
        for _ in 0..2 {
            if let Some(next) = ask {
                let answer = next(1);
                self.tell(key, Some(answer));
                match answer {
                    Next::GiveUp => return Err(fail(GIVEN_UP)),
                    Next::Rest => ask = None,
                    Next::Piece(_) => {}
                }
            }
            if !self.pass(key) {
                return Err(fail("the test never let the read through"));
            }
        }
        let w = Tensor::full((layer * 100 + expert) as f32, (1, 1), &Device::Cpu).unwrap();
        Ok((GluMlp::from_f32(w.clone(), w.clone(), w), 2))
    }

    fn expert_sizes(&self) -> ExpertSizes {
        ExpertSizes::Same(100)
    }
}

fn pieced_store() -> (Arc<PiecedSource>, Receiver<Told>, ExpertStore) {
    let (source, told) = PiecedSource::new();
    let config = StoreConfig {
        budget_bytes: 16 * 100,
        io_threads: 2,
        policy: PolicyKind::Lru,
    };
    (source.clone(), told, ExpertStore::new(source, &config))
}

const TOLD_WITHIN: Duration = Duration::from_secs(10);

/// A guess routing shows wrong while it is read stops at its next piece: its room is given
/// back at once, what it read is counted, and the expert is not taken for broken.
#[test]
fn a_wrong_guess_being_read_is_given_up_at_its_next_piece() {
    let (source, told, store) = pieced_store();
    store.prefetch(1, &[5]);
    assert_eq!(
        told.recv_timeout(TOLD_WITHIN),
        Ok(((1, 5), Some(Next::Piece(1))))
    );
    store.routed(1, &[2]);
    let stats = store.stats();
    assert_eq!((stats.prefetch_cancelled, stats.resident_experts), (1, 0));
    source.let_through((1, 5));
    assert_eq!(
        told.recv_timeout(TOLD_WITHIN),
        Ok(((1, 5), Some(Next::GiveUp)))
    );
    store.wait_idle();
    let stats = store.stats();
    assert_eq!(
        (stats.reads, stats.read_errors, stats.bytes_read),
        (0, 0, 1)
    );
    let reader = std::thread::spawn({
        let source = source.clone();
        move || {
            source.let_through((1, 5));
            source.let_through((1, 5));
        }
    });
    let read = store.acquire(1, &[5]);
    assert!(read.is_ok(), "the given-up expert was quarantined");
    reader.join().unwrap();
    assert_eq!(told.recv_timeout(TOLD_WITHIN), Ok(((1, 5), None)));
    store.check_invariants().unwrap();
}

/// A pieced store reading a guess, expert 5 of layer 1, past its first piece, and then a miss,
/// expert 1 of layer 0, which is pending.
fn guess_read_beside_a_miss() -> (
    Arc<PiecedSource>,
    Receiver<Told>,
    ExpertStore,
    Vec<odmoe_engine::expert::PendingExpert>,
) {
    let (source, told, store) = pieced_store();
    store.prefetch(1, &[5]);
    assert_eq!(
        told.recv_timeout(TOLD_WITHIN),
        Ok(((1, 5), Some(Next::Piece(1))))
    );
    let miss = store.request(0, &[1]).unwrap();
    assert_eq!(told.recv_timeout(TOLD_WITHIN), Ok(((0, 1), None)));
    (source, told, store, miss)
}

/// Between pieces a guess's read waits while a miss is read, and goes on once it is done: a
/// miss that comes while guesses are read waits behind at most a piece of each.
#[test]
fn a_guess_waits_between_pieces_while_a_miss_is_read() {
    let (source, told, store, miss) = guess_read_beside_a_miss();
    source.let_through((1, 5));
    assert!(
        told.recv_timeout(Duration::from_millis(300)).is_err(),
        "the guess read its next piece beside the miss"
    );
    source.let_through((0, 1));
    source.let_through((0, 1));
    drop(miss);
    assert_eq!(
        told.recv_timeout(TOLD_WITHIN),
        Ok(((1, 5), Some(Next::Piece(1))))
    );
    source.let_through((1, 5));
    store.wait_idle();
    assert_eq!(store.stats().reads, 2);
    store.check_invariants().unwrap();
}

/// A guess a miss comes to wait on is a demand read from then on: it reads its rest at once,
/// though another miss is in flight.
#[test]
fn a_guess_a_miss_comes_to_wait_on_reads_its_rest_at_once() {
    let (source, told, store, other) = guess_read_beside_a_miss();
    let waiting = store.request(1, &[5]).unwrap();
    source.let_through((1, 5));
    assert_eq!(
        told.recv_timeout(TOLD_WITHIN),
        Ok(((1, 5), Some(Next::Rest)))
    );
    source.let_through((1, 5));
    for pending in waiting {
        pending.wait().unwrap();
    }
    source.let_through((0, 1));
    source.let_through((0, 1));
    drop(other);
    store.wait_idle();
    let stats = store.stats();
    assert_eq!((stats.reads, stats.prefetch_used), (2, 1));
    store.check_invariants().unwrap();
}

/// A prefetch spares the experts the current layer routed to; an expert it evicts that the
/// layer's next routing wants is counted as a hit it cost.
#[test]
fn prefetches_spare_the_routed_experts_and_are_charged_for_the_hits_they_cost() {
    let (_, store) = store(FakeSource::new(Duration::ZERO), 2, PolicyKind::Lru);
    drop(store.acquire(0, &[0, 1]).unwrap());
    store.routed(0, &[0]);
    // Room for the guess only by evicting: not expert 0, which LRU would pick, but 1.
    store.prefetch(1, &[5]);
    store.wait_idle();
    drop(store.acquire(0, &[0]).unwrap());
    assert_eq!(store.stats().hits, 1, "the spared expert stayed");
    store.routed(0, &[1]);
    let stats = store.stats();
    assert_eq!((stats.prefetch_issued, stats.prefetch_evicted_hits), (1, 1));
    store.check_invariants().unwrap();
}

#[test]
fn guesses_are_read_one_at_a_time_in_the_order_given() {
    // Room for guesses: unused ones may hold an eighth of the budget.
    let (open, started, store) = gated_store_telling_starts(64, 4);
    // Ranked by the predictor, best first.
    store.prefetch(1, &[5, 6, 7]);
    let wait = Duration::from_secs(30);
    assert_eq!(started.recv_timeout(wait).unwrap(), (1, 5));
    assert!(
        started.recv_timeout(Duration::from_millis(300)).is_err(),
        "a second guess started while the first was read"
    );
    open.send(()).unwrap();
    assert_eq!(started.recv_timeout(wait).unwrap(), (1, 6));
    open.send(()).unwrap();
    assert_eq!(started.recv_timeout(wait).unwrap(), (1, 7));
    open.send(()).unwrap();
    store.wait_idle();
    assert_eq!(store.stats().prefetch_issued, 3);
}

/// Guesses that keep proving right are read several at once; once they go wrong, one at a time
/// again (`store::width`).
#[test]
fn guesses_are_read_several_at_once_while_they_prove_right() {
    // Room for every guess below, and in the eighth of it unused guesses may hold.
    let (open, started, store) = gated_store_telling_starts(1024, 4);
    let wait = Duration::from_secs(30);
    let starts_within = |expected: usize| {
        let mut seen = Vec::new();
        while let Ok(key) = started.recv_timeout(Duration::from_millis(300)) {
            seen.push(key);
        }
        assert_eq!(seen.len(), expected, "reads started at once: {seen:?}");
    };
    // Guesses its layer then asks for: right, one after another.
    for expert in 0..width::WIDEST * 40 {
        store.prefetch(0, &[expert]);
        assert_eq!(started.recv_timeout(wait).unwrap(), (0, expert));
        open.send(()).unwrap();
        store.wait_idle();
        drop(store.acquire(0, &[expert]).unwrap());
    }
    let narrow_until_widened = store.stats().prefetch_wide_reads;
    assert!(narrow_until_widened < 160, "wide from the start");
    store.prefetch(1, &[0, 1, 2, 3, 4, 5]);
    starts_within(width::WIDEST);
    for _ in 0..6 {
        open.send(()).unwrap();
    }
    starts_within(6 - width::WIDEST);
    store.wait_idle();
    // Guesses its layer's routing passes over while they are read: wrong.
    for expert in 10..40 {
        store.prefetch(2, &[expert]);
        assert_eq!(started.recv_timeout(wait).unwrap(), (2, expert));
        store.routed(2, &[0]);
        open.send(()).unwrap();
        store.wait_idle();
    }
    let wide_reads = store.stats().prefetch_wide_reads;
    assert!(wide_reads >= narrow_until_widened + 6);
    store.prefetch(3, &[0, 1, 2]);
    starts_within(1);
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    store.wait_idle();
    let stats = store.stats();
    assert_eq!(stats.prefetch_cancelled, 30);
    assert_eq!(stats.prefetch_wide_reads, wide_reads, "one at a time again");
    store.check_invariants().unwrap();
}
