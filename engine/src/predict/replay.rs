//! Trace replay: the expert store's own bookkeeping, [`BudgetCache`], driven by a recorded trace,
//! to compare eviction policies and predictors on the same accesses.
//!
//! The replay makes exactly the cache calls [`ExpertStore::acquire`](crate::store::ExpertStore)
//! makes: per forward pass and layer, the distinct routed experts in ascending order, in batches
//! of as many experts as the budget holds; each batch pins its experts (a miss reserves room
//! first), the reads complete, the batch is released. Without prefetch its hit and miss counts are
//! the live store's, exactly. [`ReplayPolicy::Belady`] is given the future accesses and evicts
//! the entry used farthest ahead: the offline optimum that bounds every policy.
//!
//! Time is modelled, not measured: one disk reads experts one after another at `disk_gbps`
//! (demand reads go before queued prefetches, but a read in progress finishes first); each layer
//! computes for `compute_ms` per token; a prefetch queued `d` layers ahead overlaps `d` layers of
//! compute. An acquire waits for its reads: that wait is the stall.

use std::collections::VecDeque;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::history::RoutingHistory;
use super::trace::Trace;
use super::{GateConfig, Predictor, PredictorKind, PrefetchGate, RecallMeter, percentile_us, plan};
use crate::error::{Error, Result};
use crate::store::{Belady, BudgetCache, ExpertKey, ExpertSizes, PolicyKind};

/// Eviction policies the replay can run: the live store's, and the offline optimum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayPolicy {
    Lru,
    Lfuda,
    Cycle,
    Reuse,
    Belady,
}

impl ReplayPolicy {
    pub const ALL: [ReplayPolicy; 5] = [
        Self::Lru,
        Self::Lfuda,
        Self::Cycle,
        Self::Reuse,
        Self::Belady,
    ];
}

impl From<PolicyKind> for ReplayPolicy {
    fn from(p: PolicyKind) -> Self {
        match p {
            PolicyKind::Lru => Self::Lru,
            PolicyKind::Lfuda => Self::Lfuda,
            PolicyKind::Cycle => Self::Cycle,
            PolicyKind::Reuse => Self::Reuse,
        }
    }
}

impl std::str::FromStr for ReplayPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lru" => Ok(Self::Lru),
            "lfuda" => Ok(Self::Lfuda),
            "cycle" => Ok(Self::Cycle),
            "reuse" => Ok(Self::Reuse),
            "belady" => Ok(Self::Belady),
            other => Err(format!(
                "unknown eviction policy {other:?} (reuse, cycle, lru, lfuda, belady)"
            )),
        }
    }
}

impl std::fmt::Display for ReplayPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lru => "lru",
            Self::Lfuda => "lfuda",
            Self::Cycle => "cycle",
            Self::Reuse => "reuse",
            Self::Belady => "belady",
        })
    }
}

/// Where the replay's prefetches come from.
#[derive(Clone, Copy)]
pub enum Prefetch<'a> {
    None,
    /// A predictor run on the trace's hidden states, as the live prefetcher runs it.
    Predictor(&'a dyn Predictor),
    /// A routing history learning from the trace's routing as it goes (no hidden states).
    History,
    /// The trace's own future: perfect predictions, the bound for any predictor.
    Oracle,
}

impl Prefetch<'_> {
    pub fn name(&self) -> String {
        match self {
            Prefetch::None => "none".into(),
            Prefetch::Predictor(p) => p.kind().to_string(),
            Prefetch::History => PredictorKind::History.to_string(),
            Prefetch::Oracle => "oracle".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReplayOptions {
    pub budget_bytes: u64,
    pub policy: ReplayPolicy,
    /// Layers ahead to prefetch.
    pub depth: usize,
    /// Switch prefetch off while wasteful, as the live prefetcher does.
    pub adaptive: bool,
    /// Guesses scoring below this are not prefetched.
    pub min_score: f32,
    pub gate: GateConfig,
    /// Disk read rate for the stall estimate, GB/s.
    pub disk_gbps: f64,
    /// Compute time of one layer for one token, ms.
    pub compute_ms: f64,
}

impl ReplayOptions {
    pub fn new(budget_bytes: u64, policy: ReplayPolicy, trace: &Trace) -> Self {
        Self {
            budget_bytes,
            policy,
            depth: 1,
            adaptive: true,
            min_score: 0.0,
            gate: GateConfig::for_layers(trace.num_layers()),
            disk_gbps: 2.0,
            compute_ms: 0.5,
        }
    }
}

/// What a replay measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    pub policy: String,
    pub prefetch: String,
    pub depth: usize,
    pub budget_bytes: u64,
    /// Experts the budget holds (of the mean size, where layers differ).
    pub budget_experts: u64,
    /// The budget as a share of all routed experts.
    pub budget_fraction: f64,
    pub tokens: usize,
    pub decode_tokens: usize,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub evictions: u64,
    pub bytes_read: u64,
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub prefetch_wasted: u64,
    pub prefetch_dropped: u64,
    /// Guesses cancelled before their read when their layer's routing chose otherwise.
    pub prefetch_cancelled: u64,
    /// Experts a prefetch evicted that their layer's next routing wanted.
    pub prefetch_evicted_hits: u64,
    pub gate_switched_off: u64,
    pub gate_switched_on: u64,
    /// Recall of the predictions at depth 1..=D.
    pub recall: Vec<Option<f64>>,
    pub predict_p50_us: f64,
    pub predict_p99_us: f64,
    pub compute_ms: f64,
    pub stall_ms: f64,
    pub decode_compute_ms: f64,
    pub decode_stall_ms: f64,
    /// Predictor time on decode steps (measured, on this machine).
    pub decode_predict_ms: f64,
    /// Decode tokens per second from the model: compute + stall + prediction.
    pub est_decode_tok_s: f64,
}

/// One layer of one forward pass.
struct Step {
    tokens: std::ops::Range<usize>,
    prefill: bool,
    layer: usize,
    /// Distinct routed experts, ascending: the order the MoE block acquires them.
    needed: Vec<usize>,
}

fn steps(trace: &Trace) -> Vec<Step> {
    let mut out = Vec::new();
    for (tokens, prefill) in trace.forwards() {
        for layer in 0..trace.num_layers() {
            let mut needed: Vec<usize> = tokens
                .clone()
                .flat_map(|t| trace.ids(t, layer).iter().map(|&e| e as usize))
                .collect();
            needed.sort_unstable();
            needed.dedup();
            out.push(Step {
                tokens: tokens.clone(),
                prefill,
                layer,
                needed,
            });
        }
    }
    out
}

/// Every expert access of the trace in the order the store sees them (one per pin).
pub fn access_sequence(trace: &Trace) -> Vec<ExpertKey> {
    steps(trace)
        .iter()
        .flat_map(|s| s.needed.iter().map(move |&e| (s.layer, e)))
        .collect()
}

/// A disk that reads one expert at a time; demand reads go before queued prefetches.
struct Disk {
    /// Bytes one expert of each layer holds, read at `bytes_per_s`.
    sizes: ExpertSizes,
    bytes_per_s: f64,
    /// When the last started read ends.
    free_at: f64,
    /// Queued prefetches: (priority, key, time queued), lowest priority first.
    queue: VecDeque<(u64, ExpertKey, f64)>,
    /// Started prefetches and when they end.
    in_flight: Vec<(ExpertKey, f64)>,
}

impl Disk {
    /// Seconds one expert of `layer` takes to read.
    fn read_s(&self, layer: usize) -> f64 {
        self.sizes.at(layer) as f64 / self.bytes_per_s
    }

    fn enqueue(&mut self, priority: u64, key: ExpertKey, now: f64) {
        let at = self.queue.partition_point(|(p, _, _)| *p <= priority);
        self.queue.insert(at, (priority, key, now));
    }

    /// Starts the queued reads that begin before `now`.
    fn run_until(&mut self, now: f64) {
        while let Some(&(_, key, queued)) = self.queue.front() {
            let start = self.free_at.max(queued);
            if start >= now {
                break;
            }
            self.queue.pop_front();
            self.free_at = start + self.read_s(key.0);
            self.in_flight.push((key, self.free_at));
        }
    }

    /// Removes `key` from the queue if its read has not started.
    fn take_queued(&mut self, key: ExpertKey) -> bool {
        match self.queue.iter().position(|(_, k, _)| *k == key) {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    fn ends(&self, key: ExpertKey) -> Option<f64> {
        self.in_flight
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, t)| t)
    }

    /// Reads `keys` on demand from `now`; returns when they are all in.
    fn demand(&mut self, keys: &[ExpertKey], now: f64) -> f64 {
        let start = self.free_at.max(now);
        self.free_at = start + keys.iter().map(|k| self.read_s(k.0)).sum::<f64>();
        self.free_at
    }

    /// When the next prefetch completes (starting the first queued one if none is running).
    fn next_completion(&mut self) -> Option<f64> {
        if self.in_flight.is_empty() {
            let (_, key, queued) = self.queue.pop_front()?;
            self.free_at = self.free_at.max(queued) + self.read_s(key.0);
            self.in_flight.push((key, self.free_at));
        }
        self.in_flight
            .iter()
            .map(|&(_, t)| t)
            .min_by(f64::total_cmp)
    }

    /// Removes and returns the prefetches completed by `now`.
    fn completed(&mut self, now: f64) -> Vec<ExpertKey> {
        let mut done = Vec::new();
        self.in_flight.retain(|&(k, t)| {
            let finished = t <= now;
            if finished {
                done.push(k);
            }
            !finished
        });
        done
    }
}

struct Sim {
    cache: BudgetCache,
    disk: Disk,
    report: ReplayReport,
}

impl Sim {
    fn forget(&mut self, evicted: &[(ExpertKey, bool)]) {
        self.report.evictions += evicted.len() as u64;
        self.report.prefetch_wasted += evicted.iter().filter(|(_, unused)| *unused).count() as u64;
    }

    fn settle(&mut self, now: f64) {
        self.disk.run_until(now);
        for key in self.disk.completed(now) {
            self.land(key);
        }
    }

    /// As the store when a read completes: a guess that cannot land is dropped.
    fn land(&mut self, key: ExpertKey) {
        match self.cache.land(key) {
            Ok(evicted) => self.forget(&evicted),
            Err(_) => self.report.prefetch_dropped += 1,
        }
    }

    /// As `ExpertStore::routed`.
    fn routed(&mut self, layer: usize, ids: &[usize]) {
        self.report.prefetch_evicted_hits += self.cache.routed(layer, ids);
        let (cache, report, sizes) = (&mut self.cache, &mut self.report, &self.disk.sizes);
        self.disk.queue.retain(|&(_, key, _)| {
            let wrong = cache.wrong_guess(key, layer, ids);
            if wrong {
                cache.remove(key);
                report.prefetch_cancelled += 1;
                report.bytes_read -= sizes.at(key.0);
            }
            !wrong
        });
    }

    /// As `ExpertStore::prefetch_at`.
    fn prefetch(&mut self, key: ExpertKey, priority: u64, now: f64) {
        if self.cache.get(key).is_some() {
            return;
        }
        let bytes = self.disk.sizes.at(key.0);
        match self.cache.reserve_prefetch(key, bytes) {
            Ok(()) => {
                self.report.prefetch_issued += 1;
                // Counted as read unless it is cancelled before its read starts.
                self.report.bytes_read += bytes;
                self.disk.enqueue(priority, key, now);
            }
            Err(_) => self.report.prefetch_dropped += 1,
        }
    }

    /// Pins a present expert as a hit; one still queued for prefetch becomes a demand read, one
    /// being read is waited for.
    fn pin_present(
        &mut self,
        key: ExpertKey,
        pinned: &mut Vec<ExpertKey>,
        demand: &mut Vec<ExpertKey>,
        ready_at: &mut f64,
    ) {
        let ready = self.cache.get(key).is_some_and(|e| e.ready);
        self.report.hits += 1;
        if self.cache.pin(key) {
            self.report.prefetch_used += 1;
            // A guess being read is a demand read now, and takes its room.
            let evicted = self.cache.fit();
            self.forget(&evicted);
        }
        pinned.push(key);
        if !ready {
            if self.disk.take_queued(key) {
                demand.push(key);
            } else if let Some(t) = self.disk.ends(key) {
                *ready_at = ready_at.max(t);
            }
        }
    }

    /// As `ExpertStore::acquire` followed by the release of the handles; returns when the batch's
    /// experts are all in.
    fn acquire(&mut self, layer: usize, ids: &[usize], mut now: f64) -> Result<f64> {
        let mut pinned = Vec::with_capacity(ids.len());
        let mut demand = Vec::new();
        let mut ready_at = now;
        // As the store: present experts are pinned first, then the misses reserve room.
        let mut missing = Vec::new();
        for &expert in ids {
            let key = (layer, expert);
            if self.cache.get(key).is_some() {
                self.pin_present(key, &mut pinned, &mut demand, &mut ready_at);
            } else {
                missing.push(key);
            }
        }
        for key in missing {
            loop {
                if self.cache.get(key).is_some() {
                    self.pin_present(key, &mut pinned, &mut demand, &mut ready_at);
                    break;
                }
                let bytes = self.disk.sizes.at(layer);
                match self.cache.reserve(key, bytes) {
                    Ok(evicted) => {
                        self.forget(&evicted);
                        self.report.misses += 1;
                        self.report.bytes_read += bytes;
                        self.cache.pin(key);
                        pinned.push(key);
                        demand.push(key);
                        break;
                    }
                    Err(_) => {
                        // Reads nobody waits on hold room; the store waits until one lands.
                        // (Guesses hold none until they land.)
                        let waiting = self
                            .disk
                            .queue
                            .iter()
                            .map(|&(_, k, _)| k)
                            .chain(self.disk.in_flight.iter().map(|&(k, _)| k))
                            .any(|k| self.cache.frees_room_once_read(k));
                        match self.disk.next_completion() {
                            Some(t) if waiting => {
                                now = now.max(t);
                                ready_at = ready_at.max(now);
                                for key in self.disk.completed(now) {
                                    self.land(key);
                                }
                            }
                            _ => {
                                return Err(Error::Budget(format!(
                                    "no room for expert {} of layer {layer} in a budget of {} bytes",
                                    key.1,
                                    self.cache.budget()
                                )));
                            }
                        }
                    }
                }
            }
        }
        if !demand.is_empty() {
            ready_at = ready_at.max(self.disk.demand(&demand, now));
        }
        for key in demand {
            self.land(key);
        }
        for key in self.disk.completed(ready_at) {
            self.land(key);
        }
        for key in pinned {
            self.cache.unpin(key);
        }
        Ok(ready_at)
    }
}

/// Replays `trace` under `options`, with prefetches from `prefetch`.
pub fn replay(
    trace: &Trace,
    options: &ReplayOptions,
    prefetch: Prefetch<'_>,
) -> Result<ReplayReport> {
    let largest = trace.expert_sizes.largest().max(1);
    let steps = steps(trace);
    let policy = match options.policy {
        ReplayPolicy::Lru => PolicyKind::Lru.build(),
        ReplayPolicy::Lfuda => PolicyKind::Lfuda.build(),
        ReplayPolicy::Cycle => PolicyKind::Cycle.build(),
        ReplayPolicy::Reuse => PolicyKind::Reuse.build(),
        ReplayPolicy::Belady => Box::new(Belady::new(access_sequence(trace))),
    };
    if options.disk_gbps <= 0.0 || options.compute_ms < 0.0 {
        return Err(Error::InvalidRequest(
            "the disk rate must be positive and the compute time not negative".into(),
        ));
    }
    if let Prefetch::Predictor(p) = prefetch {
        if trace.hidden.is_none() {
            return Err(Error::InvalidRequest(
                "predictors need the trace's hidden states: record it with --hidden".into(),
            ));
        }
        if p.depth() < options.depth {
            return Err(Error::InvalidRequest(format!(
                "the {} predictor predicts {} layers ahead, not {}",
                p.kind(),
                p.depth(),
                options.depth
            )));
        }
    }
    let depth = match prefetch {
        Prefetch::None => 0,
        _ => options.depth,
    };
    let max_batch = ((options.budget_bytes / largest) as usize).max(1);
    let mut sim = Sim {
        cache: BudgetCache::with_policy(options.budget_bytes, policy),
        disk: Disk {
            sizes: trace.expert_sizes.clone(),
            bytes_per_s: options.disk_gbps * 1e9,
            free_at: 0.0,
            queue: VecDeque::new(),
            in_flight: Vec::new(),
        },
        report: ReplayReport {
            policy: options.policy.to_string(),
            prefetch: prefetch.name(),
            depth,
            budget_bytes: options.budget_bytes,
            budget_experts: options.budget_bytes / trace.mean_expert_bytes().max(1),
            budget_fraction: options.budget_bytes as f64 / trace.total_expert_bytes().max(1) as f64,
            tokens: trace.num_tokens(),
            ..ReplayReport::default()
        },
    };
    let layers = trace.num_layers();
    let mut history = match prefetch {
        Prefetch::History => Some(RoutingHistory::new(
            layers,
            (0..layers).collect(),
            trace.num_experts(),
            depth,
        )?),
        _ => None,
    };
    let mut gate = PrefetchGate::new(options.gate);
    let mut recall = RecallMeter::new(depth);
    let mut latencies: VecDeque<f64> = VecDeque::new();
    let (mut seen_used, mut seen_wasted) = (0, 0);
    let mut now = 0.0f64;
    for (s, step) in steps.iter().enumerate() {
        let step_id = s as u64 + 1;
        sim.settle(now);
        // As the live gate: a hit a prefetch's eviction cost weighs as a wasted prefetch.
        let (used, wasted) = (
            sim.report.prefetch_used,
            sim.report.prefetch_wasted + sim.report.prefetch_evicted_hits,
        );
        let on = !options.adaptive || gate.step(used - seen_used, wasted - seen_wasted);
        (seen_used, seen_wasted) = (used, wasted);
        let mut predict_s = 0.0;
        // The routing of the step is known once its router ran, before any guess is queued.
        if depth > 0 {
            sim.routed(step.layer, &step.needed);
        }
        // The history learns from it whether or not it is asked to guess.
        if let Some(history) = history.as_mut() {
            history.observe(step.layer, &step.needed);
        }
        if depth > 0 && on {
            let planned: Vec<(usize, usize, Vec<usize>)> = match prefetch {
                Prefetch::None => Vec::new(),
                Prefetch::Oracle => (1..=depth)
                    .filter_map(|d| steps.get(s + d).map(|t| (d, t.layer, t.needed.clone())))
                    .collect(),
                Prefetch::History => {
                    let history = history.as_ref().expect("built for Prefetch::History");
                    let started = Instant::now();
                    let guesses = history.guesses(step.layer, &step.needed);
                    predict_s = started.elapsed().as_secs_f64();
                    latencies.push_back(predict_s * 1e6);
                    plan(&guesses, depth, options.min_score)
                }
                Prefetch::Predictor(p) => {
                    let hidden = trace.hidden_rows(step.tokens.clone(), step.layer)?;
                    let started = Instant::now();
                    let guesses = p.predict(step.layer, &hidden)?;
                    predict_s = started.elapsed().as_secs_f64();
                    latencies.push_back(predict_s * 1e6);
                    plan(&guesses, depth, options.min_score)
                }
            };
            for (d, layer, ids) in planned {
                for &e in &ids {
                    sim.prefetch((layer, e), step_id + d as u64, now);
                }
                recall.expect(step_id + d as u64, d, ids);
            }
        }
        recall.observe(step_id, &step.needed);
        let started = now;
        for batch in step.needed.chunks(max_batch) {
            now = sim.acquire(step.layer, batch, now)?;
        }
        let stall_ms = (now - started) * 1e3;
        let compute_ms = options.compute_ms * step.tokens.len() as f64;
        now += compute_ms / 1e3;
        sim.report.stall_ms += stall_ms;
        sim.report.compute_ms += compute_ms;
        if !step.prefill {
            sim.report.decode_stall_ms += stall_ms;
            sim.report.decode_compute_ms += compute_ms;
            sim.report.decode_predict_ms += predict_s * 1e3;
        }
    }
    let mut report = sim.report;
    report.decode_tokens = trace.forwards().iter().filter(|(_, p)| !p).count();
    report.hit_rate = report.hits as f64 / (report.hits + report.misses).max(1) as f64;
    report.gate_switched_off = gate.switched_off;
    report.gate_switched_on = gate.switched_on;
    report.recall = recall.recall();
    report.predict_p50_us = percentile_us(&latencies, 50.0);
    report.predict_p99_us = percentile_us(&latencies, 99.0);
    let decode_s =
        (report.decode_compute_ms + report.decode_stall_ms + report.decode_predict_ms) / 1e3;
    report.est_decode_tok_s = if decode_s > 0.0 {
        report.decode_tokens as f64 / decode_s
    } else {
        0.0
    };
    Ok(report)
}
