//! The expert store: bit-exact logits against resident mode at every budget, from the odmoe layout
//! and from Hugging Face files in place; the budget invariant under concurrent load; shared reads;
//! exact telemetry; clear errors for broken expert files.

mod common;

use common::{fixture, golden, ids, logit_bits_and_greedy};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};
use odmoe_engine::format::convert::convert;
use odmoe_engine::loader::{self, ExpertMode, LoadOptions};
use odmoe_engine::model::Model;
use odmoe_engine::model::layers::GluMlp;
use odmoe_engine::store::{ExpertSource, ExpertStore, PolicyKind, StoreConfig};

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
    ] {
        let out = tempfile::tempdir().unwrap();
        let layout = out.path().join("model.odmoe");
        convert(&fixture(name), &layout, |_| {}).unwrap();
        let input = ids(&golden(name)["input_ids"]);
        let resident = Model::load_resident(&fixture(name), &Device::Cpu).unwrap();
        let expected = logit_bits_and_greedy(&resident, &input, 16);
        let (config, total) = loader::describe(&fixture(name)).unwrap();
        let expert = config.expert_f32_bytes() as u64;
        let minimum = config.num_experts_per_token as u64 * expert;
        for source in [fixture(name), layout.clone()] {
            for budget in [minimum, minimum + expert, total / 4, total / 2, total] {
                for policy in [PolicyKind::Lru, PolicyKind::Lfuda] {
                    let loaded =
                        loader::load(&source, &on_demand(budget, policy), &Device::Cpu).unwrap();
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

#[test]
fn layout_resident_mode_matches_the_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("m.odmoe");
    convert(&fixture("qwen2_moe"), &layout, |_| {}).unwrap();
    let input = ids(&golden("qwen2_moe")["input_ids"]);
    let resident = |path: &std::path::Path| Model::load_resident(path, &Device::Cpu).unwrap();
    let a = logit_bits_and_greedy(&resident(&fixture("qwen2_moe")), &input, 16);
    let b = logit_bits_and_greedy(&resident(&layout), &input, 16);
    assert!(a == b);
}

/// An in-memory source: tiny experts, an optional delay, and a count of reads per expert.
struct FakeSource {
    delay: Duration,
    reads: Mutex<HashMap<(usize, usize), u64>>,
    failing: Option<(usize, usize)>,
}

impl FakeSource {
    fn new(delay: Duration) -> Self {
        Self {
            delay,
            reads: Mutex::new(HashMap::new()),
            failing: None,
        }
    }
}

impl ExpertSource for FakeSource {
    fn read(&self, layer: usize, expert: usize) -> odmoe_engine::Result<(GluMlp, u64)> {
        std::thread::sleep(self.delay);
        *self
            .reads
            .lock()
            .unwrap()
            .entry((layer, expert))
            .or_default() += 1;
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

    fn expert_bytes(&self) -> u64 {
        100
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
                            let QMatMul::Tensor(gate) = &held[0].gate else {
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

/// Reads that block until the test lets them through.
struct GatedSource(Mutex<std::sync::mpsc::Receiver<()>>);

impl ExpertSource for GatedSource {
    fn read(&self, layer: usize, expert: usize) -> odmoe_engine::Result<(GluMlp, u64)> {
        self.0.lock().unwrap().recv().unwrap();
        let w = Tensor::full((layer * 100 + expert) as f32, (1, 1), &Device::Cpu).unwrap();
        Ok((GluMlp::from_f32(w.clone(), w.clone(), w), 12))
    }

    fn expert_bytes(&self) -> u64 {
        100
    }
}

#[test]
fn requests_return_before_their_reads_and_unwaited_ones_release_their_pins() {
    let (open, gate) = std::sync::mpsc::channel();
    let config = StoreConfig {
        budget_bytes: 200,
        io_threads: 2,
        policy: PolicyKind::Lru,
    };
    let store = ExpertStore::new(Arc::new(GatedSource(Mutex::new(gate))), &config);
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

fn layout_with_broken_expert(break_it: impl Fn(&Path)) -> (tempfile::TempDir, PathBuf) {
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("m.odmoe");
    convert(&fixture("qwen3_moe"), &layout, |_| {}).unwrap();
    break_it(&layout.join("experts/layer_01_expert_004.safetensors"));
    (out, layout)
}

fn broken_expert_error(layout: &Path, verify: bool) -> String {
    let options = LoadOptions {
        verify_checksums: verify,
        ..on_demand(1 << 30, PolicyKind::Lru)
    };
    let loaded = loader::load(layout, &options, &Device::Cpu).unwrap();
    let store = loaded.store.unwrap();
    drop(store.acquire(1, &[3, 5]).unwrap()); // other experts are fine
    let err = store
        .acquire(1, &[4])
        .err()
        .expect("expert 4 of layer 1 is broken")
        .to_string();
    drop(store.acquire(0, &[4]).unwrap()); // and the store stays usable
    store.check_invariants().unwrap();
    err
}

#[test]
fn broken_expert_files_are_named() {
    let (_keep, layout) = layout_with_broken_expert(|p| {
        let bytes = std::fs::read(p).unwrap();
        std::fs::write(p, &bytes[..bytes.len() - 4096]).unwrap();
    });
    let err = broken_expert_error(&layout, false);
    assert!(
        err.contains("layer_01_expert_004")
            && err.contains("expert 4 of layer 1")
            && err.contains("truncated"),
        "{err}"
    );

    let (_keep, layout) = layout_with_broken_expert(|p| {
        let mut bytes = std::fs::read(p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(p, &bytes).unwrap();
    });
    let err = broken_expert_error(&layout, true);
    assert!(
        err.contains("layer_01_expert_004") && err.contains("sha256 mismatch"),
        "{err}"
    );

    let (_keep, layout) = layout_with_broken_expert(|p| std::fs::remove_file(p).unwrap());
    let err = broken_expert_error(&layout, false);
    assert!(
        err.contains("layer_01_expert_004") && err.contains("expert 4 of layer 1"),
        "{err}"
    );
}

#[test]
fn reads_are_counted_in_bytes_from_disk() {
    let loaded = loader::load(
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
        store.expert_bytes(),
        3 * 48 * 64 * 4,
        "the budget counts experts as f32 in memory"
    );
}
