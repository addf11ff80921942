//! Prediction from routing alone: the experts of the next steps (layers in execution order, past
//! the last layer the next token's) guessed from the experts the current step routed to, by how
//! often each pair followed each other so far. It needs no hidden states, so it runs on imported
//! traces (another engine's routing) as well as live, and it learns as it goes: every step it is
//! shown is both a question and, for the steps before it, an answer.
//!
//! An expert's score for a target step is the share of the current step's experts' past
//! occurrences that the expert followed, smoothed towards its frequency at the target layer:
//! `(sum over sources s of pairs(s -> e) + PRIOR * frequency(e)) / (sum of occurrences(s) + PRIOR)`.

use std::collections::VecDeque;

use super::Guess;
use super::trace::Trace;
use crate::error::{Error, Result};

/// Occurrences the frequency prior weighs as.
const PRIOR: f64 = 2.0;

/// Co-occurrence counts of routed experts, `depth` steps apart.
pub struct RoutingHistory {
    /// Layers of the model, routed or not.
    num_layers: usize,
    /// Routed layers in execution order; a step is one of them.
    layers: Vec<usize>,
    /// Position of each layer in `layers` (None for layers that route nothing).
    position: Vec<Option<usize>>,
    experts: usize,
    depth: usize,
    /// `[d - 1][source position][source expert][expert]`: how often the expert was routed `d`
    /// steps after a step that routed the source expert.
    pairs: Vec<u32>,
    /// `[d - 1][source position][source expert]`: how often the source expert had a step `d`
    /// steps after it.
    sources: Vec<u32>,
    /// `[position][expert]`: how often the layer routed the expert.
    routed: Vec<u32>,
    /// `[position]`: steps seen at the layer.
    visits: Vec<u32>,
    /// The last `depth` steps: (position, experts).
    recent: VecDeque<(usize, Vec<usize>)>,
}

impl RoutingHistory {
    /// Predicts `depth` steps ahead over `layers` (the routed layers of a model of
    /// `num_layers` layers, in execution order) of `experts` experts each.
    pub fn new(
        num_layers: usize,
        layers: Vec<usize>,
        experts: usize,
        depth: usize,
    ) -> Result<Self> {
        if layers.is_empty()
            || experts == 0
            || depth == 0
            || layers.iter().any(|&l| l >= num_layers)
        {
            return Err(Error::InvalidRequest(
                "routing history needs routed layers, experts and a depth of at least 1".into(),
            ));
        }
        let mut position = vec![None; layers.iter().max().map_or(0, |&l| l + 1)];
        for (i, &layer) in layers.iter().enumerate() {
            position[layer] = Some(i);
        }
        let n = layers.len();
        Ok(Self {
            pairs: vec![0; depth * n * experts * experts],
            sources: vec![0; depth * n * experts],
            routed: vec![0; n * experts],
            visits: vec![0; n],
            recent: VecDeque::with_capacity(depth + 1),
            num_layers,
            layers,
            position,
            experts,
            depth,
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    fn position_of(&self, layer: usize) -> Option<usize> {
        self.position.get(layer).copied().flatten()
    }

    /// Learns from a step: `layer` routed to `experts` (distinct, each below the expert count).
    pub fn observe(&mut self, layer: usize, experts: &[usize]) {
        let Some(position) = self.position_of(layer) else {
            return;
        };
        let (n, e) = (self.layers.len(), self.experts);
        let experts: Vec<usize> = experts.iter().copied().filter(|&x| x < e).collect();
        for (back, (source, from)) in self.recent.iter().rev().enumerate() {
            let d = back + 1;
            // A step missing in between (a failed pass) breaks the distance: learn nothing.
            if (source + d) % n != position {
                break;
            }
            for &s in from {
                let row = ((d - 1) * n + source) * e + s;
                self.sources[row] += 1;
                for &x in &experts {
                    self.pairs[row * e + x] += 1;
                }
            }
        }
        for &x in &experts {
            self.routed[position * e + x] += 1;
        }
        self.visits[position] += 1;
        self.recent.push_back((position, experts));
        if self.recent.len() > self.depth {
            self.recent.pop_front();
        }
    }

    /// Guesses for the `depth` steps after a step of `layer` that routed `experts`: per depth,
    /// as many experts as the step routed, best first, scored as the module documentation says.
    pub fn guesses(&self, layer: usize, experts: &[usize]) -> Vec<Guess> {
        let Some(position) = self.position_of(layer) else {
            return Vec::new();
        };
        let (n, e) = (self.layers.len(), self.experts);
        let count = experts.len().min(e);
        let mut guesses = Vec::with_capacity(self.depth * count);
        for d in 1..=self.depth {
            let target = (position + d) % n;
            let visits = self.visits[target].max(1) as f64;
            let mut followed = vec![0u64; e];
            let mut occurrences = 0u64;
            for &s in experts.iter().filter(|&&s| s < e) {
                let row = ((d - 1) * n + position) * e + s;
                occurrences += self.sources[row] as u64;
                for (x, f) in followed.iter_mut().enumerate() {
                    *f += self.pairs[row * e + x] as u64;
                }
            }
            let mut scored: Vec<(usize, f32)> = (0..e)
                .map(|x| {
                    let frequency = self.routed[target * e + x] as f64 / visits;
                    let score =
                        (followed[x] as f64 + PRIOR * frequency) / (occurrences as f64 + PRIOR);
                    (x, score as f32)
                })
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            guesses.extend(scored.into_iter().take(count).map(|(expert, score)| Guess {
                depth: d,
                layer: self.layers[target],
                expert,
                score,
            }));
        }
        guesses
    }
}

/// What a routing history achieved along a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEval {
    /// Recall at depth 1..=D: the share of the experts routed `d` steps later that the guesses
    /// named (as many guesses as the step routed).
    pub recall: Vec<f64>,
    /// One step's guesses, all depths, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs a routing history along `trace`, token by token and layer by layer, learning from each
/// step before guessing from it, and scores every guess against the trace.
pub fn evaluate(trace: &Trace, depth: usize) -> Result<HistoryEval> {
    let layers = trace.num_layers();
    let mut history =
        RoutingHistory::new(layers, (0..layers).collect(), trace.num_experts(), depth)?;
    let (mut found, mut routed) = (vec![0u64; depth], vec![0u64; depth]);
    let mut latencies = VecDeque::new();
    for t in 0..trace.num_tokens() {
        for layer in 0..layers {
            let experts: Vec<usize> = trace.ids(t, layer).iter().map(|&e| e as usize).collect();
            history.observe(layer, &experts);
            let started = std::time::Instant::now();
            let guesses = history.guesses(layer, &experts);
            latencies.push_back(started.elapsed().as_secs_f64() * 1e6);
            for d in 1..=depth {
                let Some((t2, target)) = trace.step_after(t, layer, d) else {
                    continue;
                };
                let truth = trace.ids(t2, target);
                found[d - 1] += guesses
                    .iter()
                    .filter(|g| g.depth == d && truth.contains(&(g.expert as u32)))
                    .count() as u64;
                routed[d - 1] += truth.len() as u64;
            }
        }
    }
    Ok(HistoryEval {
        recall: found
            .iter()
            .zip(&routed)
            .map(|(&f, &r)| f as f64 / r.max(1) as f64)
            .collect(),
        p50_us: super::percentile_us(&latencies, 50.0),
        p99_us: super::percentile_us(&latencies, 99.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(guesses: &[Guess], depth: usize) -> Vec<(usize, usize)> {
        guesses
            .iter()
            .filter(|g| g.depth == depth)
            .map(|g| (g.layer, g.expert))
            .collect()
    }

    #[test]
    fn learns_which_experts_follow_which() {
        let mut history = RoutingHistory::new(3, vec![0, 1, 2], 4, 2).unwrap();
        // Expert 0 at layer 0 is followed by expert 3 at layer 1 and expert 2 at layer 2;
        // expert 1 at layer 0 by expert 1, then expert 0.
        for _ in 0..3 {
            for (layer, experts) in [(0, [0]), (1, [3]), (2, [2]), (0, [1]), (1, [1]), (2, [0])] {
                history.observe(layer, &experts);
            }
        }
        let after_0 = history.guesses(0, &[0]);
        assert_eq!(named(&after_0, 1), vec![(1, 3)]);
        assert_eq!(named(&after_0, 2), vec![(2, 2)]);
        let after_1 = history.guesses(0, &[1]);
        assert_eq!(named(&after_1, 1), vec![(1, 1)]);
        assert_eq!(named(&after_1, 2), vec![(2, 0)]);
        // Past the last layer, the next token's first layer: layer 2's expert 2 was followed by
        // layer 0's expert 1, and layer 2's expert 0 by layer 0's expert 0.
        assert_eq!(named(&history.guesses(2, &[2]), 1), vec![(0, 1)]);
        assert_eq!(named(&history.guesses(2, &[0]), 1), vec![(0, 0)]);
    }

    #[test]
    fn without_history_it_guesses_the_target_layers_frequent_experts() {
        let mut history = RoutingHistory::new(2, vec![0, 1], 4, 1).unwrap();
        for _ in 0..4 {
            history.observe(1, &[2, 3]);
        }
        // Expert 3 at layer 0 never came before anything: the prior is layer 1's frequencies.
        let guesses = history.guesses(0, &[3, 1]);
        assert_eq!(named(&guesses, 1), vec![(1, 2), (1, 3)]);
        assert!(guesses.iter().all(|g| (g.score - 1.0).abs() < 1e-6));
    }

    #[test]
    fn a_missing_step_is_not_learned_across() {
        let mut history = RoutingHistory::new(3, vec![0, 1, 2], 4, 1).unwrap();
        history.observe(0, &[0]);
        history.observe(2, &[3]); // layer 1 never reported
        assert_eq!(history.sources.iter().sum::<u32>(), 0);
        assert!(RoutingHistory::new(3, vec![], 4, 1).is_err());
        assert!(RoutingHistory::new(3, vec![3], 4, 1).is_err());
    }
}
