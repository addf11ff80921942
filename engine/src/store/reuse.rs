//! The default eviction policy: evict the expert whose next use is expected last.
//!
//! Experts are used layer after layer, token after token, so an expert's next use is its layer's
//! next visit or a later one. Routing picks an expert again at a visit with a probability that
//! this policy estimates from the expert's own history at its layer: a rate of use that decays
//! by [`DECAY`] a visit, blended with whether the layer's latest visit used it. If picks were
//! independent with that probability `p`, the next use would come, in layer visits from now,
//! after `d + L (1 - p) / p`, where `d` is how far the expert's layer is ahead of the layer being
//! computed and `L` the number of layers. The victim is the entry for which that is largest:
//! Belady's choice with the future replaced by its expectation.
//!
//! On routing where a token takes nearly every expert (the demo model) `p` is close to 1 for all
//! and this is the cycle order of [`LayerCycle`](super::policy::LayerCycle); on routing with
//! structure, an expert picked often or just now outlives one picked rarely in a nearer layer.
//!
//! Replayed on Mixtral-8x7B's real routing, the estimate is close to the best any predictor of
//! an expert's reuse from its layer's history reached there (the README has the figures), so
//! what it misses against Belady is the part of the future that history does not tell.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use super::budget::ExpertKey;
use super::policy::EvictionPolicy;

/// How much of an expert's rate of use survives one visit of its layer. Replayed on the real
/// trace, 0.9 to 0.98 all land within a point of hit rate.
const DECAY: f64 = 0.95;
/// The weight of "the layer's latest visit used it" against the decayed rate.
const RECENCY: f64 = 0.3;

/// A rate of use, comparable across visits: `ln(rate)` moved to visit 0, so that all of a
/// layer's entries keep their order as the layer's visits decay them alike.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rank(f64);

impl Eq for Rank {}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One expert's history at its layer (kept after eviction, so a returning expert keeps it).
#[derive(Clone, Copy, Debug)]
struct Usage {
    /// Decayed rate of use as of visit `updated`.
    rate: f64,
    updated: u64,
    /// The latest visit that counted a use of it (0: none).
    used_at: u64,
    /// In the cache; then it is in one of its layer's ranked sets.
    cached: bool,
    /// Ranked as used at its layer's latest visit (or brought in since it).
    recent: bool,
}

impl Usage {
    fn rank(&self) -> Rank {
        Rank(self.rate.ln() - self.updated as f64 * DECAY.ln())
    }

    fn rate_at(&self, visit: u64) -> f64 {
        self.rate * DECAY.powi(visit.saturating_sub(self.updated).min(i32::MAX as u64) as i32)
    }
}

/// A layer's cached entries, least valuable first, split by whether its latest visit used them.
#[derive(Default)]
struct LayerRanks {
    /// Visits of the layer so far; a visit is a run of uses of the layer.
    visits: u64,
    recent: BTreeSet<(Rank, usize)>,
    stale: BTreeSet<(Rank, usize)>,
}

impl LayerRanks {
    fn set(&mut self, recent: bool) -> &mut BTreeSet<(Rank, usize)> {
        if recent {
            &mut self.recent
        } else {
            &mut self.stale
        }
    }
}

/// See the module documentation.
#[derive(Default)]
pub struct ExpectedReuse {
    /// The layer of the latest use: the layer being computed (None before any use).
    current: Option<usize>,
    layers: Vec<LayerRanks>,
    usage: HashMap<ExpertKey, Usage>,
}

impl ExpectedReuse {
    fn layer(&mut self, layer: usize) -> &mut LayerRanks {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, LayerRanks::default);
        }
        &mut self.layers[layer]
    }

    /// Takes `key` out of its ranked set, applies `change`, and puts it back if still cached.
    fn update(&mut self, key: ExpertKey, change: impl FnOnce(&mut Usage, u64)) {
        let visits = self.layer(key.0).visits;
        let mut usage = self.usage.get(&key).copied().unwrap_or(Usage {
            rate: 0.0,
            updated: visits,
            used_at: 0,
            cached: false,
            recent: false,
        });
        let ranks = &mut self.layers[key.0];
        if usage.cached {
            ranks.set(usage.recent).remove(&(usage.rank(), key.1));
        }
        change(&mut usage, visits);
        if usage.cached {
            ranks.set(usage.recent).insert((usage.rank(), key.1));
        }
        self.usage.insert(key, usage);
    }

    /// A new visit of `layer` starts: no entry of it has been used at this visit yet.
    fn start_visit(&mut self, layer: usize) {
        self.current = Some(layer);
        let ranks = self.layer(layer);
        ranks.visits += 1;
        let recent = std::mem::take(&mut ranks.recent);
        ranks.stale.extend(recent.iter().copied());
        for (_, expert) in recent {
            if let Some(usage) = self.usage.get_mut(&(layer, expert)) {
                usage.recent = false;
            }
        }
    }

    /// Layer visits from now until the expected next use of the entry (infinite if never).
    fn expected_wait(&self, key: ExpertKey) -> f64 {
        let usage = &self.usage[&key];
        let rate = usage.rate_at(self.layers[key.0].visits);
        self.wait(key.0, rate, usage.recent)
    }

    /// [`expected_wait`](Self::expected_wait) of an expert of `layer` with a rate of use `rate`
    /// now, and `recent` if its layer's latest visit used it (or it was brought in since).
    fn wait(&self, layer: usize, rate: f64, recent: bool) -> f64 {
        let recency = if recent { RECENCY } else { 0.0 };
        let p = (1.0 - RECENCY) * rate + recency;
        let layers = self.layers.len().max(layer + 1);
        let current = self.current.unwrap_or(0);
        let ahead = (layer + layers - current % layers - 1) % layers + 1;
        if p <= 0.0 {
            f64::INFINITY
        } else {
            ahead as f64 + layers as f64 * (1.0 - p) / p
        }
    }
}

impl EvictionPolicy for ExpectedReuse {
    fn inserted(&mut self, key: ExpertKey) {
        // Brought in for a use at its layer's coming visit: ranked as recent until that visit.
        self.update(key, |usage, _| {
            usage.cached = true;
            usage.recent = true;
        });
    }

    fn accessed(&mut self, key: ExpertKey) {
        let visits = self.layer(key.0).visits;
        let used_this_visit = self.usage.get(&key).is_some_and(|u| u.used_at == visits);
        if self.current != Some(key.0) || used_this_visit {
            self.start_visit(key.0);
        }
        self.update(key, |usage, visit| {
            usage.rate = usage.rate_at(visit) + (1.0 - DECAY);
            usage.updated = visit;
            usage.used_at = visit;
            usage.recent = true;
        });
    }

    fn removed(&mut self, key: ExpertKey) {
        if self.usage.get(&key).is_some_and(|u| u.cached) {
            self.update(key, |usage, _| usage.cached = false);
        }
    }

    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        let mut best: Option<(f64, ExpertKey)> = None;
        for (layer, ranks) in self.layers.iter().enumerate() {
            // Within a layer and a recency, the lowest rate waits longest.
            for set in [&ranks.stale, &ranks.recent] {
                let Some(key) = set
                    .iter()
                    .map(|&(_, expert)| (layer, expert))
                    .find(|&k| evictable(k))
                else {
                    continue;
                };
                let wait = self.expected_wait(key);
                if best.is_none_or(|(longest, _)| wait > longest) {
                    best = Some((wait, key));
                }
            }
        }
        best.map(|(_, key)| key)
    }

    /// A guess is valued as an entry just brought in: its history, and recent.
    fn values_more(&self, kept: ExpertKey, guess: ExpertKey) -> bool {
        let visits = self.layers.get(guess.0).map_or(0, |ranks| ranks.visits);
        let rate = self.usage.get(&guess).map_or(0.0, |u| u.rate_at(visits));
        self.expected_wait(kept) < self.wait(guess.0, rate, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_layers(policy: &mut ExpectedReuse, token: &[&[usize]]) {
        for (layer, experts) in token.iter().enumerate() {
            for &expert in experts.iter() {
                policy.accessed((layer, expert));
            }
        }
    }

    fn insert_all(policy: &mut ExpectedReuse, keys: &[ExpertKey]) {
        for &key in keys {
            policy.inserted(key);
        }
    }

    #[test]
    fn an_expert_picked_often_outlives_one_picked_once() {
        let mut policy = ExpectedReuse::default();
        insert_all(&mut policy, &[(0, 0), (0, 1), (1, 0), (1, 1)]);
        // Layer 0 picks expert 0 every token and expert 1 once, long ago.
        use_layers(&mut policy, &[&[0, 1], &[0]]);
        for _ in 0..5 {
            use_layers(&mut policy, &[&[0], &[0]]);
        }
        // Layer 1 is next, but its expert 1 has never been used: it goes first; then layer 0's
        // expert 1, used once five tokens ago, before anything used every token.
        assert_eq!(policy.victim(&|_| true), Some((1, 1)));
        policy.removed((1, 1));
        assert_eq!(policy.victim(&|_| true), Some((0, 1)));
        policy.removed((0, 1));
        // Of two experts used every token, the one whose layer comes round last goes.
        assert_eq!(policy.victim(&|_| true), Some((1, 0)));
    }

    #[test]
    fn with_equal_history_the_layer_that_comes_round_last_goes() {
        let mut policy = ExpectedReuse::default();
        insert_all(&mut policy, &[(0, 0), (1, 0), (2, 0), (3, 0)]);
        for _ in 0..3 {
            use_layers(&mut policy, &[&[0], &[0], &[0], &[0]]);
        }
        policy.accessed((0, 0));
        policy.accessed((1, 0));
        // Computing layer 1: layer 2 is needed next, layer 1 itself a whole token away.
        assert_eq!(policy.victim(&|_| true), Some((1, 0)));
        assert_eq!(policy.victim(&|k| k != (1, 0)), Some((0, 0)));
        assert_eq!(policy.victim(&|k| k.0 >= 2), Some((3, 0)));
    }

    #[test]
    fn an_evicted_expert_keeps_its_history() {
        let mut policy = ExpectedReuse::default();
        insert_all(&mut policy, &[(0, 0), (0, 1), (0, 2)]);
        for _ in 0..6 {
            use_layers(&mut policy, &[&[0, 1]]);
        }
        policy.accessed((0, 2));
        policy.removed((0, 0));
        policy.removed((0, 1));
        assert_eq!(policy.victim(&|_| true), Some((0, 2)));
        // Back in, expert 0 is still valued over expert 2, used twice.
        policy.accessed((0, 2));
        policy.inserted((0, 0));
        policy.accessed((0, 0));
        assert_eq!(policy.victim(&|_| true), Some((0, 2)));
    }

    #[test]
    fn a_prefetched_expert_is_kept_until_its_layer_comes_round() {
        let mut policy = ExpectedReuse::default();
        insert_all(&mut policy, &[(0, 0), (0, 1), (1, 0)]);
        use_layers(&mut policy, &[&[0], &[0]]);
        policy.accessed((0, 0));
        // A guess for layer 1 with no history is valued as just used: over an expert that its
        // layer's latest visit passed by.
        policy.inserted((1, 1));
        assert_eq!(policy.victim(&|_| true), Some((0, 1)));
        policy.removed((0, 1));
        // Once layer 1's visit passes it by too, it is the first to go.
        policy.accessed((1, 0));
        assert_eq!(policy.victim(&|_| true), Some((1, 1)));
    }
}
