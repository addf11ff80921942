//! Expert prediction: guess which experts the next layers will route to, so the store reads them
//! while the current layers compute.
//!
//! - [`Predictor`] is the one interface: given the hidden state entering layer `l`, score the
//!   experts of the `depth` layers that run next. Depth counts layers in execution order: past the
//!   last layer it continues with the next token's first layers, so a depth larger than the
//!   model's layer count is meaningful in decode.
//! - [`lookahead::Lookahead`] applies the real routers of the next layers to the current hidden
//!   state (no training); [`shadow::Shadow`] is a small MLP per target layer trained from routing
//!   traces. [`history::RoutingHistory`] needs no hidden state: it guesses from the experts the
//!   current layer routed to, by what followed them before.
//! - [`Prefetcher`] is the live side: a [`ForwardHook`] that asks the predictor at every layer and
//!   queues low-priority prefetches in the [`ExpertStore`], measures recall, and switches itself
//!   off while decode is faster without it, or before any decode while its prefetches waste more
//!   reads than they save ([`PrefetchGate`]).
//! - [`trace`] records routing traces, [`replay`] runs the store's own [`BudgetCache`] over them
//!   to compare policies and predictors against the Belady bound.
//!
//! Nothing here changes what the model computes: a hook only reads the hidden state, and the
//! store returns the same weights whether an expert was prefetched or read on demand.
//!
//! [`BudgetCache`]: crate::store::BudgetCache

pub mod gate;
pub mod history;
pub mod import;
pub mod lookahead;
pub mod recorded;
pub mod replay;
pub mod shadow;
pub mod trace;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ForwardHook, Model, Routing};
use crate::store::{ExpertStore, PrefetchCounts};
pub use gate::{GateConfig, PrefetchGate};

/// One guess: `expert` of `layer`, `depth` layers after the one the hidden state entered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guess {
    pub depth: usize,
    pub layer: usize,
    pub expert: usize,
    /// Higher is more likely (a routing probability or a sigmoid output).
    pub score: f32,
}

/// Which predictor, as the command line and the config name them.
///
/// The default is [`Lookahead`](Self::Lookahead): on the demo model from cold storage it made
/// decode 1.45x faster (`odmoe predictor bench`), and its gate switches it off while wasteful. On
/// the committed fixtures, whose experts all fit in the page cache, no predictor made decode
/// faster than the store alone (README, "Expert prediction"): with recall near 0.5, a wrong
/// prefetch costs a read and evicts an expert that would have hit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictorKind {
    /// No prediction, no prefetch.
    None,
    /// The next layers' routers applied to the current hidden state.
    #[default]
    Lookahead,
    /// A trained MLP per target layer.
    Shadow,
    /// What followed the current layer's experts so far (no hidden state; learns as it runs).
    History,
    /// A recording of the same run's routing: every guess right (see [`recorded`]). It needs
    /// the recording, so no name on the command line chooses it.
    Recorded,
}

impl std::str::FromStr for PredictorKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" | "off" => Ok(Self::None),
            "lookahead" => Ok(Self::Lookahead),
            "shadow" => Ok(Self::Shadow),
            "history" => Ok(Self::History),
            other => Err(format!(
                "unknown predictor {other:?} (none, lookahead, shadow, history)"
            )),
        }
    }
}

impl std::fmt::Display for PredictorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Lookahead => "lookahead",
            Self::Shadow => "shadow",
            Self::History => "history",
            Self::Recorded => "recorded",
        })
    }
}

/// Scores the experts of the layers that run next.
pub trait Predictor: Send + Sync {
    fn kind(&self) -> PredictorKind;
    /// How many layers ahead it predicts.
    fn depth(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// Experts each position routes to.
    fn top_k(&self) -> usize;

    /// Scores `[T, experts]` for depth 1..=[`depth`](Self::depth) (entry d-1 is layer
    /// `(layer + d) % num_layers`), given the hidden state `[T, hidden]` entering `layer`. They
    /// stay on the hidden state's device: [`guesses`](Self::guesses) takes them read back.
    fn scores(&self, layer: usize, hidden: &Tensor) -> Result<Vec<Tensor>>;

    /// What the choice of experts at layer `target` ranks, from one position's scores: the
    /// scores themselves unless that layer's router chooses otherwise.
    fn choice_row(&self, _target: usize, scores: &[f32]) -> Vec<f32> {
        scores.to_vec()
    }

    /// [`guesses`](Self::guesses) from `hidden`, its scores read back at once.
    fn predict(&self, layer: usize, hidden: &Tensor) -> Result<Vec<Guess>> {
        let scores = self.scores(layer, hidden)?;
        let rows = crate::model::readback::rows(&scores.iter().collect::<Vec<_>>())?;
        Ok(self.guesses(layer, &rows))
    }

    /// The guesses `(layer, expert, score)` for layers `layer+1 ..= layer+depth`, from the rows
    /// of [`scores`](Self::scores) (`rows[d - 1][t]`): each position's top-k, merged (an
    /// expert's score is its best). Targets past the last layer belong to the next token,
    /// which follows only the last position, so only its row counts for them.
    fn guesses(&self, layer: usize, rows: &[Vec<Vec<f32>>]) -> Vec<Guess> {
        let num_layers = self.num_layers();
        let mut guesses = Vec::new();
        for (i, rows) in rows.iter().enumerate() {
            let depth = i + 1;
            let target = (layer + depth) % num_layers;
            let rows = if layer + depth >= num_layers {
                &rows[rows.len().saturating_sub(1)..]
            } else {
                &rows[..]
            };
            let mut best: BTreeMap<usize, f32> = BTreeMap::new();
            for row in rows {
                let row = self.choice_row(target, row);
                for e in top_k(&row, self.top_k()) {
                    let score = best.entry(e).or_insert(f32::NEG_INFINITY);
                    *score = score.max(row[e]);
                }
            }
            let mut merged: Vec<(usize, f32)> = best.into_iter().collect();
            merged.sort_by(|a, b| b.1.total_cmp(&a.1));
            guesses.extend(merged.into_iter().map(|(expert, score)| Guess {
                depth,
                layer: target,
                expert,
                score,
            }));
        }
        guesses
    }
}

/// What to prefetch from `guesses`: for each depth 1..=`depth` that has guesses scoring at least
/// `min_score`, (depth, target layer, experts best first).
pub fn plan(guesses: &[Guess], depth: usize, min_score: f32) -> Vec<(usize, usize, Vec<usize>)> {
    (1..=depth)
        .filter_map(|d| {
            let chosen: Vec<&Guess> = guesses
                .iter()
                .filter(|g| g.depth == d && g.score >= min_score)
                .collect();
            let layer = chosen.first()?.layer;
            Some((d, layer, chosen.iter().map(|g| g.expert).collect()))
        })
        .collect()
}

/// The indices of the `k` largest values, largest first; ties keep index order (as routing does).
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(k);
    order
}

/// Recall@top-k of `predictor` on a trace with hidden states, by depth 1..=D: for every token and
/// layer, the share of the experts routed to `d` layers later that the predictor's top-k for that
/// token named. Targets past the last layer are the next token's (same prompt).
pub fn recall_on_trace(predictor: &dyn Predictor, trace: &trace::Trace) -> Result<Vec<f64>> {
    let depth = predictor.depth();
    let (n, k) = (trace.num_tokens(), trace.top_k());
    let (mut found, mut routed) = (vec![0u64; depth], vec![0u64; depth]);
    for layer in 0..trace.num_layers() {
        let hidden = trace.hidden_rows(0..n, layer)?;
        for (i, scores) in predictor.scores(layer, &hidden)?.iter().enumerate() {
            let rows = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (t, row) in rows.iter().enumerate() {
                let Some((t2, j)) = trace.step_after(t, layer, i + 1) else {
                    continue;
                };
                let truth = trace.ids(t2, j);
                found[i] += top_k(&predictor.choice_row(j, row), k)
                    .iter()
                    .filter(|&&e| truth.contains(&(e as u32)))
                    .count() as u64;
                routed[i] += truth.len() as u64;
            }
        }
    }
    Ok(found
        .iter()
        .zip(&routed)
        .map(|(&f, &r)| f as f64 / r.max(1) as f64)
        .collect())
}

/// Where a prefetcher's guesses come from: a predictor of hidden states, or routing.
pub enum GuessSource {
    Predictor(Box<dyn Predictor>),
    Routing(RoutingSource),
}

/// A source that guesses from each layer's routing.
pub enum RoutingSource {
    History(history::RoutingHistory),
    Recorded(recorded::RecordedRouting),
}

impl RoutingSource {
    fn kind(&self) -> PredictorKind {
        match self {
            Self::History(_) => PredictorKind::History,
            Self::Recorded(_) => PredictorKind::Recorded,
        }
    }

    fn depth(&self) -> usize {
        match self {
            Self::History(h) => h.depth(),
            Self::Recorded(r) => r.depth(),
        }
    }

    fn num_layers(&self) -> usize {
        match self {
            Self::History(h) => h.num_layers(),
            Self::Recorded(r) => r.num_layers(),
        }
    }

    /// Takes in `layer`'s routing of `positions` tokens to `routed` (distinct, ascending).
    fn observe(&mut self, layer: usize, routed: &[usize], positions: usize) {
        match self {
            Self::History(h) => h.observe(layer, routed),
            Self::Recorded(r) => r.follow(layer, routed, positions),
        }
    }

    /// The guesses for the layers after `layer`, which routed to `routed`.
    fn guesses(&self, layer: usize, routed: &[usize]) -> Vec<Guess> {
        match self {
            Self::History(h) => h.guesses(layer, routed),
            Self::Recorded(r) => r.guesses(layer),
        }
    }
}

impl From<RoutingSource> for GuessSource {
    fn from(source: RoutingSource) -> Self {
        Self::Routing(source)
    }
}

impl From<Box<dyn Predictor>> for GuessSource {
    fn from(predictor: Box<dyn Predictor>) -> Self {
        Self::Predictor(predictor)
    }
}

impl GuessSource {
    pub fn depth(&self) -> usize {
        match self {
            Self::Predictor(p) => p.depth(),
            Self::Routing(r) => r.depth(),
        }
    }

    pub fn kind(&self) -> PredictorKind {
        match self {
            Self::Predictor(p) => p.kind(),
            Self::Routing(r) => r.kind(),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Predictor(p) => p.num_layers(),
            Self::Routing(r) => r.num_layers(),
        }
    }
}

/// A routing history for `model`'s routed layers.
fn routing_history(model: &Model, depth: usize) -> Result<history::RoutingHistory> {
    let config = &model.config;
    let layers = config.moe_layers().collect();
    history::RoutingHistory::new(config.num_layers, layers, config.num_experts, depth)
}

/// Builds the predictor `kind` for `model`: lookahead from its routers, shadow from `weights`,
/// history from nothing.
pub fn build(
    kind: PredictorKind,
    model: &Model,
    depth: usize,
    weights: Option<&std::path::Path>,
) -> Result<Option<GuessSource>> {
    Ok(match kind {
        PredictorKind::None => None,
        PredictorKind::History => {
            Some(RoutingSource::History(routing_history(model, depth)?).into())
        }
        PredictorKind::Recorded => {
            return Err(Error::InvalidRequest(
                "guesses from a recorded routing need the recording \
                 (odmoe bench decode --prefetch-from-trace)"
                    .into(),
            ));
        }
        PredictorKind::Lookahead => Some(GuessSource::Predictor(Box::new(
            lookahead::Lookahead::new(model, depth)?,
        ))),
        PredictorKind::Shadow => {
            let path = weights.ok_or_else(|| {
                Error::InvalidRequest(
                    "the shadow predictor needs its weights (odmoe predictor train)".into(),
                )
            })?;
            let shadow = shadow::Shadow::load(path, &model.config)?;
            if depth > shadow.depth() {
                return Err(Error::InvalidRequest(format!(
                    "{} was trained for depth {}, not {depth}",
                    path.display(),
                    shadow.depth()
                )));
            }
            Some(GuessSource::Predictor(Box::new(shadow.truncated(depth))))
        }
    })
}

/// Recall of predictions against what routing did, by depth: the share of the experts a step
/// routed to that the predictions made `d` steps before had named.
#[derive(Debug, Default)]
pub struct RecallMeter {
    /// Step -> (depth, predicted experts).
    pending: BTreeMap<u64, Vec<(usize, Vec<usize>)>>,
    found: Vec<u64>,
    routed: Vec<u64>,
}

impl RecallMeter {
    pub fn new(depth: usize) -> Self {
        Self {
            found: vec![0; depth],
            routed: vec![0; depth],
            ..Self::default()
        }
    }

    /// Remembers that `experts` are predicted for `step`, `depth` steps ahead.
    pub fn expect(&mut self, step: u64, depth: usize, experts: Vec<usize>) {
        self.pending.entry(step).or_default().push((depth, experts));
    }

    /// Scores the predictions for `step` against the experts it routed to.
    pub fn observe(&mut self, step: u64, routed: &[usize]) {
        // Predictions for steps that never reported routing (a failed pass) are dropped.
        let later = self.pending.split_off(&step);
        self.pending = later;
        let Some(predicted) = self.pending.remove(&step) else {
            return;
        };
        for (depth, experts) in predicted {
            let Some(i) = depth.checked_sub(1).filter(|&i| i < self.found.len()) else {
                continue;
            };
            self.found[i] += routed.iter().filter(|e| experts.contains(e)).count() as u64;
            self.routed[i] += routed.len() as u64;
        }
    }

    /// Recall at each depth 1..=D (`None` where nothing was measured).
    pub fn recall(&self) -> Vec<Option<f64>> {
        self.found
            .iter()
            .zip(&self.routed)
            .map(|(&f, &r)| (r > 0).then(|| f as f64 / r as f64))
            .collect()
    }
}

/// How the live prefetcher behaves.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefetchOptions {
    /// Layers ahead to prefetch (at most the predictor's depth).
    pub depth: usize,
    /// Switch off while wasteful (see [`PrefetchGate`]); off means always on.
    pub adaptive: bool,
    pub gate: GateConfig,
    /// Guesses scoring below this are not prefetched (0 prefetches every top-k guess).
    #[serde(default)]
    pub min_score: f32,
}

impl PrefetchOptions {
    pub fn new(depth: usize, num_layers: usize) -> Self {
        Self {
            depth,
            adaptive: true,
            gate: GateConfig::for_layers(num_layers),
            min_score: 0.0,
        }
    }
}

/// Nearest-rank percentiles of a latency window, in microseconds.
pub(crate) fn percentile_us(samples: &VecDeque<f64>, p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted: Vec<f64> = samples.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const LATENCY_WINDOW: usize = 4096;

/// What the live prefetcher did, with the store's prefetch counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefetchStats {
    pub predictor: PredictorKind,
    pub depth: usize,
    /// Whether prefetch is on now.
    pub enabled: bool,
    pub switched_off: u64,
    pub switched_on: u64,
    /// Layers run since installed.
    pub steps: u64,
    /// Layers at which the predictor ran.
    pub predictions: u64,
    /// Recall at depth 1..=D of the predictions that were made.
    pub recall: Vec<Option<f64>>,
    pub predict_p50_us: f64,
    pub predict_p99_us: f64,
    pub issued: u64,
    pub used: u64,
    pub wasted: u64,
    pub dropped: u64,
    /// Guesses cancelled before their read once routing chose otherwise.
    #[serde(default)]
    pub cancelled: u64,
    /// Hits that prefetches' evictions cost.
    #[serde(default)]
    pub evicted_hits: u64,
    /// Mean decode step (one layer) time of the latest window with prefetch on, and off: what
    /// the gate compares.
    #[serde(default)]
    pub decode_step_ms_on: Option<f64>,
    #[serde(default)]
    pub decode_step_ms_off: Option<f64>,
    /// Time compute waited for expert reads.
    pub stall_us: u64,
}

struct LiveState {
    gate: PrefetchGate,
    step: u64,
    seen: PrefetchCounts,
    recall: RecallMeter,
    predictions: u64,
    latencies_us: VecDeque<f64>,
    /// Time the predictor took to score the current layer's input, its guesses still to come.
    scoring_us: f64,
    /// Whether the gate let this layer predict.
    predicting: bool,
    /// When the latest layer of a single-position pass (decode) began.
    decode_step_started: Option<Instant>,
    /// The source that guesses from routing (a history learns from every layer's, a recording
    /// follows it).
    routing: Option<RoutingSource>,
}

/// The live prefetcher: at each layer, asks its source about the next layers and queues their
/// experts in the store at low priority (needed-soonest first). A predictor of hidden states
/// scores the layer's input, a routing history the layer's routing. The store's reads overlap
/// the next layers' compute; prefetches never evict a pinned expert or an unused prefetch.
pub struct Prefetcher {
    kind: PredictorKind,
    num_layers: usize,
    /// The hidden-state predictor (None with a routing history, which lives in the state).
    predictor: Option<Box<dyn Predictor>>,
    store: Arc<ExpertStore>,
    options: PrefetchOptions,
    state: Mutex<LiveState>,
}

impl Prefetcher {
    pub fn new(
        source: impl Into<GuessSource>,
        store: Arc<ExpertStore>,
        options: PrefetchOptions,
    ) -> Self {
        let source = source.into();
        let (kind, num_layers) = (source.kind(), source.num_layers().max(1));
        let depth = options.depth.min(source.depth());
        let options = PrefetchOptions { depth, ..options };
        let (predictor, routing) = match source {
            GuessSource::Predictor(p) => (Some(p), None),
            GuessSource::Routing(r) => (None, Some(r)),
        };
        Self {
            state: Mutex::new(LiveState {
                gate: PrefetchGate::new(options.gate),
                step: 0,
                seen: store.prefetch_counts(),
                recall: RecallMeter::new(depth),
                predictions: 0,
                latencies_us: VecDeque::new(),
                scoring_us: 0.0,
                predicting: false,
                decode_step_started: None,
                routing,
            }),
            kind,
            num_layers,
            predictor,
            store,
            options,
        }
    }

    /// Installs a prefetcher as `model`'s forward hook and returns it (for its stats).
    pub fn install(
        model: &mut Model,
        source: impl Into<GuessSource>,
        store: Arc<ExpertStore>,
        options: PrefetchOptions,
    ) -> Arc<Prefetcher> {
        let prefetcher = Arc::new(Self::new(source, store, options));
        model.set_hook(Some(prefetcher.clone()));
        prefetcher
    }

    pub fn stats(&self) -> PrefetchStats {
        let state = crate::lock::recover(self.state.lock());
        let counts = self.store.prefetch_counts();
        let (on_s, off_s) = state.gate.decode_step_s();
        PrefetchStats {
            decode_step_ms_on: on_s.map(|s| s * 1e3),
            decode_step_ms_off: off_s.map(|s| s * 1e3),
            predictor: self.kind,
            depth: self.options.depth,
            enabled: state.gate.enabled(),
            switched_off: state.gate.switched_off,
            switched_on: state.gate.switched_on,
            steps: state.step,
            predictions: state.predictions,
            recall: state.recall.recall(),
            predict_p50_us: percentile_us(&state.latencies_us, 50.0),
            predict_p99_us: percentile_us(&state.latencies_us, 99.0),
            issued: counts.issued,
            used: counts.used,
            wasted: counts.wasted,
            dropped: counts.dropped,
            cancelled: counts.cancelled,
            evicted_hits: counts.evicted_hits,
            stall_us: counts.stall_us,
        }
    }

    /// Records a prediction made at `layer`'s step and queues its guesses' experts.
    fn queue(&self, state: &mut LiveState, layer: usize, guesses: &[Guess], latency_us: f64) {
        if state.latencies_us.len() == LATENCY_WINDOW {
            state.latencies_us.pop_front();
        }
        state.latencies_us.push_back(latency_us);
        state.predictions += 1;
        let step = state.step;
        let n = self.num_layers;
        for (depth, target_layer, ids) in plan(guesses, self.options.depth, self.options.min_score)
        {
            // Steps count every layer; a history's depth counts routed layers only.
            let ahead = (target_layer + n - layer % n - 1) % n + 1;
            let target = step + ahead as u64;
            self.store.prefetch_at(target_layer, &ids, target);
            state.recall.expect(target, depth, ids);
        }
    }
}

impl ForwardHook for Prefetcher {
    /// Scores the next layers from the layer's input; they come back with its routing.
    fn layer_input(&self, layer: usize, hidden: &Tensor) -> Vec<Tensor> {
        let mut state = crate::lock::recover(self.state.lock());
        state.step += 1;
        let counts = self.store.prefetch_counts();
        // A hit a prefetch's eviction cost weighs as a wasted prefetch.
        let (used, wasted) = (
            counts.used - state.seen.used,
            counts.wasted + counts.evicted_hits - state.seen.wasted - state.seen.evicted_hits,
        );
        state.seen = counts;
        // A decode step's time, from this layer's start to the next's within one pass (the
        // time between passes holds sampling and idle time, which prefetch does not change).
        let now = Instant::now();
        let decode = hidden.dims().first() == Some(&1);
        let decode_step_s = state
            .decode_step_started
            .filter(|_| decode && layer > 0)
            .map(|started| now.duration_since(started).as_secs_f64());
        state.decode_step_started = decode.then_some(now);
        state.predicting =
            !self.options.adaptive || state.gate.step_timed(used, wasted, decode_step_s);
        let Some(predictor) = self.predictor.as_ref().filter(|_| state.predicting) else {
            return Vec::new();
        };
        let started = Instant::now();
        let scores = match predictor.scores(layer, hidden) {
            Ok(scores) => scores,
            Err(e) => {
                tracing::warn!("expert prediction failed at layer {layer}: {e}");
                return Vec::new();
            }
        };
        state.scoring_us = started.elapsed().as_secs_f64() * 1e6;
        scores
    }

    /// Turns the scores into guesses and queues their experts.
    fn layer_scores(&self, layer: usize, rows: Vec<Vec<Vec<f32>>>) {
        let Some(predictor) = self.predictor.as_ref() else {
            return;
        };
        let mut state = crate::lock::recover(self.state.lock());
        let started = Instant::now();
        let guesses = predictor.guesses(layer, &rows);
        let latency = state.scoring_us + started.elapsed().as_secs_f64() * 1e6;
        self.queue(&mut state, layer, &guesses, latency);
    }

    /// Tells the store the routing (wrong guesses for this layer are cancelled, its experts
    /// spared), measures recall; a source that guesses from routing takes it in and guesses.
    fn layer_routing(&self, layer: usize, routing: &Routing) {
        let routed = routed_experts(routing);
        if !routed.is_empty() {
            self.store.routed(layer, &routed);
        }
        let mut state = crate::lock::recover(self.state.lock());
        let step = state.step;
        state.recall.observe(step, &routed);
        let started = Instant::now();
        let predicting = state.predicting;
        let Some(source) = state.routing.as_mut() else {
            return;
        };
        source.observe(layer, &routed, routing.ids.len());
        if !predicting {
            return;
        }
        let guesses = source.guesses(layer, &routed);
        let latency = started.elapsed().as_secs_f64() * 1e6;
        self.queue(&mut state, layer, &guesses, latency);
    }
}

/// The distinct experts a layer routed its positions to, ascending.
pub fn routed_experts(routing: &Routing) -> Vec<usize> {
    let mut ids: Vec<usize> = routing.ids.iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
    }

    #[test]
    fn plans_keep_confident_guesses_by_depth() {
        let g = |depth, expert, score| Guess {
            depth,
            layer: depth % 3,
            expert,
            score,
        };
        let guesses = [g(1, 4, 0.9), g(1, 2, 0.3), g(2, 7, 0.2), g(3, 1, 0.8)];
        assert_eq!(
            plan(&guesses, 2, 0.0),
            vec![(1, 1, vec![4, 2]), (2, 2, vec![7])]
        );
        assert_eq!(
            plan(&guesses, 3, 0.5),
            vec![(1, 1, vec![4]), (3, 0, vec![1])]
        );
    }

    #[test]
    fn recall_counts_routed_experts_that_were_predicted() {
        let mut m = RecallMeter::new(2);
        m.expect(3, 1, vec![1, 2]);
        m.expect(3, 2, vec![4, 5]);
        m.expect(2, 1, vec![0]); // never observed: dropped
        m.observe(3, &[1, 5]);
        assert_eq!(m.recall(), vec![Some(0.5), Some(0.5)]);
    }
}
