//! Eviction policies: which cached expert to drop first when the budget needs room.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::budget::ExpertKey;
use super::reuse::ExpectedReuse;

/// Which entry to evict first.
pub trait EvictionPolicy: Send {
    fn inserted(&mut self, key: ExpertKey);
    fn accessed(&mut self, key: ExpertKey);
    fn removed(&mut self, key: ExpertKey);
    /// The least valuable key for which `evictable` holds.
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey>;
    /// Whether the cached `kept` is worth more than `guess`, a prefetch not yet in the cache
    /// (a prefetch may evict only what is worth less). Policies that rank a new entry above
    /// every other (recency, the layer needed next) never value an entry more than a guess.
    fn values_more(&self, _kept: ExpertKey, _guess: ExpertKey) -> bool {
        false
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used with dynamic aging.
    Lfuda,
    /// The expert whose layer comes round last (see [`LayerCycle`]).
    Cycle,
    /// The expert whose next use is expected last (see [`ExpectedReuse`]): the default, since
    /// replayed traces put it at or above `cycle` everywhere, and above it on real routing.
    #[default]
    Reuse,
}

impl PolicyKind {
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::Lfuda => Box::new(Lfuda::default()),
            PolicyKind::Cycle => Box::new(LayerCycle::default()),
            PolicyKind::Reuse => Box::new(ExpectedReuse::default()),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(PolicyKind::Lru),
            "lfuda" => Ok(PolicyKind::Lfuda),
            "cycle" => Ok(PolicyKind::Cycle),
            "reuse" => Ok(PolicyKind::Reuse),
            other => Err(format!(
                "unknown eviction policy {other:?} (reuse, cycle, lru, lfuda)"
            )),
        }
    }
}

/// Least recently used: entries ordered by the tick of their last access.
#[derive(Default)]
pub struct Lru {
    tick: u64,
    order: BTreeSet<(u64, ExpertKey)>,
    last: HashMap<ExpertKey, u64>,
}

impl EvictionPolicy for Lru {
    fn inserted(&mut self, key: ExpertKey) {
        self.accessed(key);
    }
    fn accessed(&mut self, key: ExpertKey) {
        self.tick += 1;
        if let Some(old) = self.last.insert(key, self.tick) {
            self.order.remove(&(old, key));
        }
        self.order.insert((self.tick, key));
    }
    fn removed(&mut self, key: ExpertKey) {
        if let Some(old) = self.last.remove(&key) {
            self.order.remove(&(old, key));
        }
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.order.iter().map(|&(_, k)| k).find(|&k| evictable(k))
    }
}

/// LFU with dynamic aging: priority = age + hits; evicting sets the age to the victim's priority,
/// so entries that were popular long ago do not stay forever.
#[derive(Default)]
pub struct Lfuda {
    age: u64,
    tick: u64,
    /// (priority, tick of last access, key): lowest first, oldest first among equals.
    order: BTreeSet<(u64, u64, ExpertKey)>,
    state: HashMap<ExpertKey, (u64, u64, u64)>, // key -> (priority, tick, hits)
}

impl Lfuda {
    fn set(&mut self, key: ExpertKey, hits: u64) {
        self.tick += 1;
        if let Some((p, t, _)) = self.state.get(&key) {
            self.order.remove(&(*p, *t, key));
        }
        let priority = self.age + hits;
        self.state.insert(key, (priority, self.tick, hits));
        self.order.insert((priority, self.tick, key));
    }
}

impl EvictionPolicy for Lfuda {
    fn inserted(&mut self, key: ExpertKey) {
        self.set(key, 1);
    }
    fn accessed(&mut self, key: ExpertKey) {
        let hits = self.state.get(&key).map_or(0, |s| s.2);
        self.set(key, hits + 1);
    }
    fn removed(&mut self, key: ExpertKey) {
        if let Some((p, t, _)) = self.state.remove(&key) {
            self.order.remove(&(p, t, key));
            // Dynamic aging: the cache's age becomes the priority of what left it.
            self.age = self.age.max(p);
        }
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.order
            .iter()
            .map(|&(_, _, k)| k)
            .find(|&k| evictable(k))
    }
}

/// Belady's MIN, the offline optimum: evicts the entry whose next use lies farthest in the future
/// (never-used-again entries first). It is given the exact sequence of accesses the cache will see
/// (one per [`BudgetCache::pin`], in order), so it exists only in trace replay, where it bounds
/// the hit rate of every online policy on the same trace.
#[derive(Default)]
pub struct Belady {
    /// Each key's remaining access positions, ascending.
    future: HashMap<ExpertKey, VecDeque<usize>>,
    /// Cached keys by next use, farthest first.
    order: BTreeSet<(Reverse<usize>, ExpertKey)>,
    next: HashMap<ExpertKey, usize>,
}

impl Belady {
    pub fn new(accesses: impl IntoIterator<Item = ExpertKey>) -> Self {
        let mut future: HashMap<ExpertKey, VecDeque<usize>> = HashMap::new();
        for (i, key) in accesses.into_iter().enumerate() {
            future.entry(key).or_default().push_back(i);
        }
        Self {
            future,
            ..Self::default()
        }
    }

    fn next_use(&self, key: ExpertKey) -> usize {
        self.future
            .get(&key)
            .and_then(|q| q.front().copied())
            .unwrap_or(usize::MAX)
    }

    fn place(&mut self, key: ExpertKey) {
        if let Some(old) = self.next.remove(&key) {
            self.order.remove(&(Reverse(old), key));
        }
        let next = self.next_use(key);
        self.next.insert(key, next);
        self.order.insert((Reverse(next), key));
    }
}

impl EvictionPolicy for Belady {
    fn inserted(&mut self, key: ExpertKey) {
        self.place(key);
    }
    fn accessed(&mut self, key: ExpertKey) {
        // An access consumes the key's earliest remaining position, so accesses reordered within a
        // batch (present experts are pinned before misses) keep every key's future exact.
        if let Some(q) = self.future.get_mut(&key) {
            q.pop_front();
        }
        if self.next.contains_key(&key) {
            self.place(key);
        }
    }
    fn removed(&mut self, key: ExpertKey) {
        if let Some(old) = self.next.remove(&key) {
            self.order.remove(&(Reverse(old), key));
        }
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.order.iter().map(|&(_, k)| k).find(|&k| evictable(k))
    }
}

/// Experts are used layer after layer, token after token: a cyclic scan, on which LRU evicts
/// exactly what is needed next. This policy evicts from the layer that comes round last counted
/// from the layer being computed (that layer itself, whose next use is a whole token away, then
/// the one before it, and so on), which is Belady's choice when every token visits every layer;
/// within a layer, the least used expert, the oldest among equals. The layer being computed is
/// the layer of the latest access (prefetch insertions do not move it).
#[derive(Default)]
pub struct LayerCycle {
    current: usize,
    /// Layers seen so far (the cycle's length).
    layers: usize,
    tick: u64,
    /// Per layer: (uses, tick of last use, key), least used first.
    per_layer: HashMap<usize, BTreeSet<(u64, u64, ExpertKey)>>,
    state: HashMap<ExpertKey, (u64, u64)>,
}

impl LayerCycle {
    fn set(&mut self, key: ExpertKey, uses: u64) {
        self.tick += 1;
        self.layers = self.layers.max(key.0 + 1);
        let entries = self.per_layer.entry(key.0).or_default();
        if let Some((old_uses, old_tick)) = self.state.insert(key, (uses, self.tick)) {
            entries.remove(&(old_uses, old_tick, key));
        }
        entries.insert((uses, self.tick, key));
    }
}

impl EvictionPolicy for LayerCycle {
    fn inserted(&mut self, key: ExpertKey) {
        self.set(key, 0);
    }
    fn accessed(&mut self, key: ExpertKey) {
        self.current = key.0;
        let uses = self.state.get(&key).map_or(0, |s| s.0);
        self.set(key, uses + 1);
    }
    fn removed(&mut self, key: ExpertKey) {
        if let Some((uses, tick)) = self.state.remove(&key)
            && let Some(entries) = self.per_layer.get_mut(&key.0)
        {
            entries.remove(&(uses, tick, key));
        }
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        let layers = self.layers.max(1);
        // Distance L (the current layer) first, down to distance 1 (the next layer).
        (1..=layers).rev().find_map(|distance| {
            let layer = (self.current + distance) % layers;
            self.per_layer
                .get(&layer)?
                .iter()
                .map(|&(_, _, k)| k)
                .find(|&k| evictable(k))
        })
    }
}
