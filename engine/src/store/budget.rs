//! The byte-budget cache bookkeeping, free of I/O and tensors so that the live store and the trace
//! replay run the very same code.
//!
//! Invariant: the bytes of every entry (loading or ready) never exceed the budget. Space is
//! reserved before a read starts; eviction takes the least valuable unpinned, ready entry as the
//! policy ranks them; a pinned entry is never evicted.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// One routed expert: (layer, expert).
pub type ExpertKey = (usize, usize);

/// Which entry to evict first.
pub trait EvictionPolicy: Send {
    fn inserted(&mut self, key: ExpertKey);
    fn accessed(&mut self, key: ExpertKey);
    fn removed(&mut self, key: ExpertKey);
    /// The least valuable key for which `evictable` holds.
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used with dynamic aging.
    Lfuda,
    /// The expert whose layer comes round last (see [`LayerCycle`]): the default, since replayed
    /// traces put it within a few percent of Belady where LRU collapses to no hits at all.
    #[default]
    Cycle,
}

impl PolicyKind {
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::Lfuda => Box::new(Lfuda::default()),
            PolicyKind::Cycle => Box::new(LayerCycle::default()),
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
            other => Err(format!(
                "unknown eviction policy {other:?} (lru, lfuda, cycle)"
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

/// What the cache knows of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    pub bytes: u64,
    pub pins: usize,
    pub ready: bool,
    /// Brought in by a prefetch and not used yet.
    pub prefetched_unused: bool,
}

/// Why a reservation could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Even evicting everything evictable would not make room.
    Full {
        needed: u64,
        budget: u64,
        pinned_or_loading: u64,
    },
}

/// Entries, their bytes, and the budget they must fit in.
pub struct BudgetCache {
    budget: u64,
    used: u64,
    entries: HashMap<ExpertKey, EntryMeta>,
    policy: Box<dyn EvictionPolicy>,
}

impl BudgetCache {
    pub fn new(budget: u64, policy: PolicyKind) -> Self {
        Self::with_policy(budget, policy.build())
    }

    /// A cache ranked by any policy (trace replay passes [`Belady`]).
    pub fn with_policy(budget: u64, policy: Box<dyn EvictionPolicy>) -> Self {
        Self {
            budget,
            used: 0,
            entries: HashMap::new(),
            policy,
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes reserved by loading and ready entries.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: ExpertKey) -> Option<&EntryMeta> {
        self.entries.get(&key)
    }

    /// Records a use of `key` (for the policy) and pins it; returns whether it was an unused
    /// prefetch.
    pub fn pin(&mut self, key: ExpertKey) -> bool {
        let entry = self.entries.get_mut(&key).expect("pin of an absent entry");
        entry.pins += 1;
        let was_prefetch = std::mem::take(&mut entry.prefetched_unused);
        self.policy.accessed(key);
        was_prefetch
    }

    pub fn unpin(&mut self, key: ExpertKey) {
        let entry = self
            .entries
            .get_mut(&key)
            .expect("unpin of an absent entry");
        assert!(entry.pins > 0, "unpin of an unpinned entry {key:?}");
        entry.pins -= 1;
    }

    /// Reserves `bytes` for a new entry `key` (loading, not ready), evicting unpinned ready
    /// entries as the policy ranks them. A prefetch may not evict another unused prefetch.
    /// Returns the evicted entries (key, was an unused prefetch).
    pub fn reserve(
        &mut self,
        key: ExpertKey,
        bytes: u64,
        prefetch: bool,
    ) -> Result<Vec<(ExpertKey, bool)>, NoRoom> {
        assert!(
            !self.entries.contains_key(&key),
            "reserve of a present entry {key:?}"
        );
        let evictable_bytes: u64 = self
            .entries
            .values()
            .filter(|e| Self::evictable(e, prefetch))
            .map(|e| e.bytes)
            .sum();
        if self.used - evictable_bytes + bytes > self.budget {
            return Err(NoRoom::Full {
                needed: bytes,
                budget: self.budget,
                pinned_or_loading: self.used - evictable_bytes,
            });
        }
        let evicted = self.evict_until(self.budget - bytes, prefetch);
        self.entries.insert(
            key,
            EntryMeta {
                bytes,
                pins: 0,
                ready: false,
                prefetched_unused: prefetch,
            },
        );
        self.used += bytes;
        self.policy.inserted(key);
        Ok(evicted)
    }

    /// Marks a loaded entry ready: from now on it may be evicted when unpinned.
    pub fn mark_ready(&mut self, key: ExpertKey) {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.ready = true;
        }
    }

    /// Removes `key` (a failed read, or an eviction decided outside).
    pub fn remove(&mut self, key: ExpertKey) -> Option<EntryMeta> {
        let entry = self.entries.remove(&key)?;
        self.used -= entry.bytes;
        self.policy.removed(key);
        Some(entry)
    }

    /// Changes the budget, evicting unpinned ready entries until what is held fits if it can.
    /// Returns the evicted entries (key, was an unused prefetch).
    pub fn set_budget(&mut self, budget: u64) -> Vec<(ExpertKey, bool)> {
        self.budget = budget;
        self.evict_until(budget, false)
    }

    fn evictable(entry: &EntryMeta, for_prefetch: bool) -> bool {
        entry.ready && entry.pins == 0 && !(for_prefetch && entry.prefetched_unused)
    }

    /// Evicts until at most `target` bytes are used or nothing more can go.
    fn evict_until(&mut self, target: u64, for_prefetch: bool) -> Vec<(ExpertKey, bool)> {
        let mut evicted = Vec::new();
        while self.used > target {
            let entries = &self.entries;
            let victim = self.policy.victim(&|k| {
                entries
                    .get(&k)
                    .is_some_and(|e| Self::evictable(e, for_prefetch))
            });
            let Some(key) = victim else { break };
            let entry = self.remove(key).expect("victim is present");
            evicted.push((key, entry.prefetched_unused));
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(budget: u64, policy: PolicyKind) -> BudgetCache {
        BudgetCache::new(budget, policy)
    }

    fn load(c: &mut BudgetCache, key: ExpertKey) -> Vec<ExpertKey> {
        let evicted = c.reserve(key, 10, false).unwrap();
        c.mark_ready(key);
        evicted.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn lru_evicts_the_least_recently_used_unpinned_entry() {
        let mut c = cache(30, PolicyKind::Lru);
        for e in 0..3 {
            load(&mut c, (0, e));
        }
        c.pin((0, 0));
        c.unpin((0, 0)); // (0,0) is now the most recent
        assert_eq!(load(&mut c, (0, 3)), vec![(0, 1)]);
        c.pin((0, 2)); // pinned: cannot go
        assert_eq!(load(&mut c, (0, 4)), vec![(0, 0)]);
        assert!(c.used() <= c.budget());
    }

    #[test]
    fn lfuda_keeps_frequent_entries_and_ages() {
        let mut c = cache(20, PolicyKind::Lfuda);
        load(&mut c, (0, 0));
        load(&mut c, (0, 1));
        for _ in 0..3 {
            c.pin((0, 0));
            c.unpin((0, 0));
        }
        assert_eq!(load(&mut c, (0, 2)), vec![(0, 1)]);
        // (0,2) entered at age 1 (the victim's priority) + 1 hit; (0,0) has 4 hits: (0,2) goes.
        assert_eq!(load(&mut c, (0, 3)), vec![(0, 2)]);
    }

    #[test]
    fn cycle_keeps_the_layers_needed_soonest() {
        // Four layers, two experts each, room for four: a token visits layers 0..4 in order.
        let mut c = cache(40, PolicyKind::Cycle);
        let mut hits = 0;
        for _token in 0..10 {
            for layer in 0..4 {
                for e in 0..2 {
                    let key = (layer, e);
                    if c.get(key).is_some() {
                        hits += 1;
                    } else {
                        c.reserve(key, 10, false).unwrap();
                        c.mark_ready(key);
                    }
                    c.pin(key);
                    c.unpin(key);
                }
            }
        }
        // LRU would hit nothing on this scan; keeping half the experts hits close to half.
        assert!(hits >= 25, "{hits} hits of 80");
        let mut lru = cache(40, PolicyKind::Lru);
        let mut lru_hits = 0;
        for _token in 0..10 {
            for layer in 0..4 {
                for e in 0..2 {
                    let key = (layer, e);
                    if lru.get(key).is_some() {
                        lru_hits += 1;
                    } else {
                        lru.reserve(key, 10, false).unwrap();
                        lru.mark_ready(key);
                    }
                    lru.pin(key);
                    lru.unpin(key);
                }
            }
        }
        assert_eq!(lru_hits, 0);
    }

    #[test]
    fn nothing_evictable_means_no_room() {
        let mut c = cache(20, PolicyKind::Lru);
        load(&mut c, (0, 0));
        c.pin((0, 0));
        c.reserve((0, 1), 10, false).unwrap(); // loading entries are not evictable
        assert!(matches!(
            c.reserve((0, 2), 10, false),
            Err(NoRoom::Full { .. })
        ));
        assert_eq!(c.used(), 20);
    }

    #[test]
    fn prefetch_never_evicts_an_unused_prefetch() {
        let mut c = cache(20, PolicyKind::Lru);
        c.reserve((1, 0), 10, true).unwrap();
        c.mark_ready((1, 0));
        load(&mut c, (0, 0));
        // Room only by evicting: the demand entry can go, the unused prefetch cannot.
        assert_eq!(c.reserve((1, 1), 10, true).unwrap(), vec![((0, 0), false)]);
        c.mark_ready((1, 1));
        assert!(c.reserve((1, 2), 10, true).is_err());
        // A demand read may evict it, and reports it as a wasted prefetch.
        assert_eq!(c.reserve((0, 5), 10, false).unwrap(), vec![((1, 0), true)]);
    }

    #[test]
    fn belady_evicts_the_entry_used_farthest_ahead() {
        let seq = [(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2)];
        let mut c = BudgetCache::with_policy(20, Box::new(Belady::new(seq)));
        let mut misses = 0;
        for key in seq {
            if c.get(key).is_none() {
                misses += 1;
                c.reserve(key, 10, false).unwrap();
                c.mark_ready(key);
            }
            c.pin(key);
            c.unpin(key);
        }
        // (0,2) evicts (0,1), used after (0,0); (0,1) then evicts (0,0), never used again.
        assert_eq!(misses, 4);
        let mut lru = cache(20, PolicyKind::Lru);
        let lru_misses = seq
            .iter()
            .filter(|&&key| {
                let miss = lru.get(key).is_none();
                if miss {
                    load(&mut lru, key);
                }
                lru.pin(key);
                lru.unpin(key);
                miss
            })
            .count();
        assert_eq!(lru_misses, 6);
    }

    #[test]
    fn shrinking_evicts_only_what_can_go() {
        let mut c = cache(40, PolicyKind::Lru);
        for e in 0..4 {
            load(&mut c, (0, e));
        }
        c.pin((0, 3));
        assert_eq!(c.set_budget(10).len(), 3);
        assert_eq!(c.used(), 10);
        c.unpin((0, 3));
        assert_eq!(c.set_budget(0), vec![((0, 3), false)]);
    }
}
