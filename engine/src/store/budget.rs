//! The expert budget: as people write it (`64MiB`, `25%`), and the byte-budget cache bookkeeping,
//! free of I/O and tensors so that the live store and the trace replay run the very same code.
//!
//! Invariant: the bytes every entry holds (ready, or loading on demand) never exceed the budget.
//! A demand read's room is made before it starts; a guess's when its read lands, so that a guess
//! shown wrong while it is read has evicted nothing. Eviction takes the least valuable unpinned,
//! ready entry as the policy ranks them; a pinned entry is never evicted.

use std::collections::{HashMap, HashSet};

use odmoe_config::{Size, parse_size};

use super::policy::{EvictionPolicy, PolicyKind};
use crate::error::{Error, Result};

/// One routed expert: (layer, expert).
pub type ExpertKey = (usize, usize);

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

/// Why a prefetch was not reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declined {
    /// Pinned, loading and spared entries and unused prefetches leave no room.
    NoRoom,
    /// The staging share of the budget is held by unused prefetches already.
    Staging,
    /// Making room would evict an expert the policy values more than the guess.
    Valued,
}

/// Unused prefetches may hold at most this share of the budget (1/8): a guess never takes more
/// than a bounded corner of the cache from experts that were used.
const STAGING_DIVISOR: u64 = 8;

/// Entries, their bytes, and the budget they must fit in.
pub struct BudgetCache {
    budget: u64,
    used: u64,
    /// Bytes of unused prefetches (loading or ready).
    staged: u64,
    /// Bytes of guesses still loading: counted in `used`, but their room is made when they land.
    unlanded: u64,
    /// The experts the layer being computed routed to: prefetches do not evict them.
    spared: Vec<ExpertKey>,
    /// Experts a prefetch evicted, until their layer's next routing tells whether that cost a
    /// hit.
    evicted_by_prefetch: HashSet<ExpertKey>,
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
            staged: 0,
            unlanded: 0,
            spared: Vec::new(),
            evicted_by_prefetch: HashSet::new(),
            entries: HashMap::new(),
            policy,
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes held by ready entries and reserved by demand reads (guesses count once they land).
    pub fn used(&self) -> u64 {
        self.used - self.unlanded
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
    /// prefetch. A guess still loading becomes a demand read, whose room [`fit`](Self::fit)
    /// makes.
    pub fn pin(&mut self, key: ExpertKey) -> bool {
        let entry = self.entries.get_mut(&key).expect("pin of an absent entry");
        entry.pins += 1;
        let was_prefetch = std::mem::take(&mut entry.prefetched_unused);
        if was_prefetch {
            self.staged -= entry.bytes;
            if !entry.ready {
                self.unlanded -= entry.bytes;
            }
        }
        self.policy.accessed(key);
        was_prefetch
    }

    /// Evicts unpinned ready entries until what is held fits the budget (after a guess being
    /// read became a demand read); returns them (key, was an unused prefetch).
    pub fn fit(&mut self) -> Vec<(ExpertKey, bool)> {
        self.evict_until(self.budget)
    }

    pub fn unpin(&mut self, key: ExpertKey) {
        let entry = self
            .entries
            .get_mut(&key)
            .expect("unpin of an absent entry");
        assert!(entry.pins > 0, "unpin of an unpinned entry {key:?}");
        entry.pins -= 1;
    }

    /// Reserves `bytes` for a new entry `key` read on demand (loading, not ready), evicting
    /// unpinned ready entries as the policy ranks them. Returns the evicted entries (key, was an
    /// unused prefetch).
    pub fn reserve(
        &mut self,
        key: ExpertKey,
        bytes: u64,
    ) -> Result<Vec<(ExpertKey, bool)>, NoRoom> {
        assert!(
            !self.entries.contains_key(&key),
            "reserve of a present entry {key:?}"
        );
        let evictable_bytes: u64 = self
            .entries
            .values()
            .filter(|e| Self::evictable(e))
            .map(|e| e.bytes)
            .sum();
        let held = self.used();
        if held - evictable_bytes + bytes > self.budget {
            return Err(NoRoom::Full {
                needed: bytes,
                budget: self.budget,
                pinned_or_loading: held - evictable_bytes,
            });
        }
        let evicted = self.evict_until(self.budget - bytes);
        self.insert(key, bytes, false);
        Ok(evicted)
    }

    /// The routing of `layer` is known and its experts are about to be asked for: from now on
    /// prefetches spare them. Returns how many of them a prefetch had evicted since the layer's
    /// previous routing: the hits prefetches cost.
    pub fn routed(&mut self, layer: usize, ids: &[usize]) -> u64 {
        self.spared = ids.iter().map(|&e| (layer, e)).collect();
        let mut cost = 0;
        self.evicted_by_prefetch.retain(|&(l, e)| {
            if l == layer && ids.contains(&e) {
                cost += 1;
            }
            l != layer
        });
        cost
    }

    /// Whether `key` holds room that nobody waits on: an unpinned entry that is not a guess
    /// (guesses hold none until they land). Once read, it can be evicted to make room.
    pub fn frees_room_once_read(&self, key: ExpertKey) -> bool {
        self.entries
            .get(&key)
            .is_some_and(|e| e.pins == 0 && !e.prefetched_unused)
    }

    /// Whether `key` is a guess that `layer`'s routing to `ids` proved wrong: an unused,
    /// unpinned prefetch of that layer that routing did not choose (cancel it if its read has
    /// not started).
    pub fn wrong_guess(&self, key: ExpertKey, layer: usize, ids: &[usize]) -> bool {
        key.0 == layer
            && !ids.contains(&key.1)
            && self
                .entries
                .get(&key)
                .is_some_and(|e| e.pins == 0 && e.prefetched_unused)
    }

    /// Takes in a guess `key` of `bytes` to be read, only if it could land now without costing
    /// a hit the cache would otherwise have (see [`land`](Self::land)); unused prefetches stay
    /// within the staging share of the budget. Nothing is evicted until it lands.
    pub fn reserve_prefetch(&mut self, key: ExpertKey, bytes: u64) -> Result<(), Declined> {
        assert!(
            !self.entries.contains_key(&key),
            "reserve of a present entry {key:?}"
        );
        if self.staged + bytes > (self.budget / STAGING_DIVISOR).max(bytes) {
            return Err(Declined::Staging);
        }
        self.prefetch_victims(key, bytes)?;
        self.insert(key, bytes, true);
        Ok(())
    }

    /// A loaded entry is ready: from now on it may be evicted when unpinned. A guess (unused,
    /// still loading) lands: its room is made now, evicting only entries that are unpinned,
    /// ready, not unused prefetches themselves, not spared (see [`routed`](Self::routed)), and
    /// valued by the policy below the guess; if that cannot be done, the guess is removed and
    /// nothing is evicted. Returns the evicted entries (key, was an unused prefetch).
    pub fn land(&mut self, key: ExpertKey) -> Result<Vec<(ExpertKey, bool)>, Declined> {
        let Some(entry) = self.entries.get(&key) else {
            return Ok(Vec::new());
        };
        if entry.ready || !entry.prefetched_unused {
            self.mark_ready(key);
            return Ok(Vec::new());
        }
        let bytes = entry.bytes;
        // What is held leaves out the guess still: its room is found as for a new one.
        let victims = match self.prefetch_victims(key, bytes) {
            Ok(victims) => victims,
            Err(declined) => {
                self.remove(key);
                return Err(declined);
            }
        };
        let evicted = victims
            .into_iter()
            .map(|victim| {
                let entry = self.remove(victim).expect("victim is present");
                self.evicted_by_prefetch.insert(victim);
                (victim, entry.prefetched_unused)
            })
            .collect();
        self.evicted_by_prefetch.remove(&key);
        self.unlanded -= bytes;
        self.mark_ready(key);
        Ok(evicted)
    }

    /// The entries a guess `key` of `bytes` would evict to fit (see [`land`](Self::land)).
    fn prefetch_victims(&mut self, key: ExpertKey, bytes: u64) -> Result<Vec<ExpertKey>, Declined> {
        let held = self.used();
        let mut victims: Vec<ExpertKey> = Vec::new();
        let mut freed = 0;
        while held - freed + bytes > self.budget {
            let (entries, spared) = (&self.entries, &self.spared);
            let victim = self.policy.victim(&|k| {
                !victims.contains(&k)
                    && !spared.contains(&k)
                    && entries
                        .get(&k)
                        .is_some_and(|e| Self::evictable(e) && !e.prefetched_unused)
            });
            let Some(victim) = victim else {
                return Err(Declined::NoRoom);
            };
            if self.policy.values_more(victim, key) {
                return Err(Declined::Valued);
            }
            freed += self.entries[&victim].bytes;
            victims.push(victim);
        }
        Ok(victims)
    }

    fn insert(&mut self, key: ExpertKey, bytes: u64, prefetch: bool) {
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
        if prefetch {
            self.staged += bytes;
            self.unlanded += bytes;
        }
        self.policy.inserted(key);
    }

    /// Marks a loaded entry ready: from now on it may be evicted when unpinned.
    fn mark_ready(&mut self, key: ExpertKey) {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.ready = true;
        }
    }

    /// Removes `key` (a failed read, or an eviction decided outside).
    pub fn remove(&mut self, key: ExpertKey) -> Option<EntryMeta> {
        let entry = self.entries.remove(&key)?;
        self.used -= entry.bytes;
        if entry.prefetched_unused {
            self.staged -= entry.bytes;
            if !entry.ready {
                self.unlanded -= entry.bytes;
            }
        }
        self.policy.removed(key);
        Some(entry)
    }

    /// Changes the budget, evicting unpinned ready entries until what is held fits if it can.
    /// Returns the evicted entries (key, was an unused prefetch).
    pub fn set_budget(&mut self, budget: u64) -> Vec<(ExpertKey, bool)> {
        self.budget = budget;
        self.evict_until(budget)
    }

    /// Whether an entry may be evicted to make room for a read on demand.
    fn evictable(entry: &EntryMeta) -> bool {
        entry.ready && entry.pins == 0
    }

    /// Evicts until at most `target` bytes are used or nothing more can go.
    fn evict_until(&mut self, target: u64) -> Vec<(ExpertKey, bool)> {
        let mut evicted = Vec::new();
        while self.used() > target {
            let entries = &self.entries;
            let victim = self
                .policy
                .victim(&|k| entries.get(&k).is_some_and(Self::evictable));
            let Some(key) = victim else { break };
            let entry = self.remove(key).expect("victim is present");
            evicted.push((key, entry.prefetched_unused));
        }
        evicted
    }
}

/// Reads an expert budget as written, before the model's size is known: a byte count with a
/// unit, or a percentage of all experts.
///
/// Units are case-insensitive: `B`; decimal `KB`, `MB`, `GB`, `TB` (powers of 1000); binary
/// `KiB`, `MiB`, `GiB`, `TiB` and the bare `K`, `M`, `G`, `T` (powers of 1024). Fractions are
/// allowed (`1.5GB`) and rounded down to whole bytes. A bare number is refused: `1.5` meant as
/// gigabytes or as a share would otherwise become one byte.
pub fn parse_budget_size(text: &str) -> Result<Size> {
    let bad = |why: &dyn std::fmt::Display| Error::Budget(format!("{text:?}: {why}"));
    // One parser for sizes everywhere: the config file's.
    let size = parse_size(text).map_err(|e| bad(&e))?;
    let has_unit = text
        .trim_end()
        .ends_with(|c: char| c.is_ascii_alphabetic() || c == '%');
    if !has_unit {
        return Err(bad(
            &"a budget needs a unit (64MiB, 8GiB, 1.5GB) or a percentage of all experts (25%)",
        ));
    }
    Ok(size)
}

/// Parses an expert budget ([`parse_budget_size`]) into bytes, a percentage being of
/// `total_bytes` (the in-memory size of all experts). The budget must be positive.
pub fn parse_budget(text: &str, total_bytes: u64) -> Result<u64> {
    let bytes = parse_budget_size(text)?.of(total_bytes);
    if bytes == 0 {
        return Err(Error::Budget(format!(
            "{text:?}: the budget must be larger than zero bytes"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::policy::Belady;

    fn cache(budget: u64, policy: PolicyKind) -> BudgetCache {
        BudgetCache::new(budget, policy)
    }

    fn load(c: &mut BudgetCache, key: ExpertKey) -> Vec<ExpertKey> {
        let evicted = c.reserve(key, 10).unwrap();
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
                        c.reserve(key, 10).unwrap();
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
                        lru.reserve(key, 10).unwrap();
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
        c.reserve((0, 1), 10).unwrap(); // loading entries are not evictable
        assert!(matches!(c.reserve((0, 2), 10), Err(NoRoom::Full { .. })));
        assert_eq!(c.used(), 20);
    }

    #[test]
    fn prefetch_never_evicts_an_unused_prefetch_nor_a_spared_entry() {
        // 16 entries of 10 bytes; unused prefetches may hold 20 bytes of them, two entries.
        let mut c = cache(160, PolicyKind::Lru);
        c.reserve_prefetch((1, 0), 10).unwrap();
        assert_eq!(c.land((1, 0)), Ok(vec![]));
        for expert in 0..15 {
            load(&mut c, (0, expert));
        }
        // Room only by evicting: the oldest demand entry goes, not the unused prefetch, and not
        // an entry spared for the layer about to use it.
        assert_eq!(c.routed(0, &[0]), 0);
        c.reserve_prefetch((1, 1), 10).unwrap();
        assert_eq!(c.land((1, 1)), Ok(vec![((0, 1), false)]));
        // A demand read may evict an unused prefetch, and reports it as wasted.
        assert_eq!(c.reserve((0, 15), 10).unwrap(), vec![((1, 0), true)]);
        // Layer 0's next routing wants the expert the prefetch evicted: a hit it cost.
        assert_eq!(c.routed(0, &[1, 2]), 1);
        assert_eq!(c.routed(0, &[1, 2]), 0);
    }

    #[test]
    fn unused_prefetches_stay_within_their_share_of_the_budget() {
        let mut c = cache(160, PolicyKind::Lru);
        c.reserve_prefetch((1, 0), 10).unwrap();
        c.reserve_prefetch((1, 1), 10).unwrap();
        assert_eq!(c.reserve_prefetch((1, 2), 10), Err(Declined::Staging));
        // Once one is used, its share is free for another guess.
        c.land((1, 0)).unwrap();
        c.pin((1, 0));
        c.reserve_prefetch((1, 2), 10).unwrap();
        // Guesses still being read hold nothing yet.
        assert_eq!(c.used(), 10);
    }

    /// A guess evicts nothing until its read lands: one shown wrong while it is read has cost
    /// no hit; one that no longer fits when it lands is dropped, and evicts nothing either.
    #[test]
    fn a_guess_makes_its_room_only_when_it_lands() {
        // 16 entries of 10 bytes, all held; guesses may stage two.
        let mut c = cache(160, PolicyKind::Lru);
        for expert in 0..16 {
            load(&mut c, (0, expert));
        }
        c.reserve_prefetch((1, 0), 10).unwrap();
        c.reserve_prefetch((1, 1), 10).unwrap();
        assert_eq!((c.used(), c.len()), (160, 18), "nothing evicted yet");
        c.remove((1, 0));
        assert_eq!((c.used(), c.len()), (160, 17));
        // Every held entry pinned by the time the other lands: it cannot, and is dropped.
        for expert in 0..16 {
            c.pin((0, expert));
        }
        assert_eq!(c.land((1, 1)), Err(Declined::NoRoom));
        assert_eq!((c.used(), c.len()), (160, 16));
        for expert in 0..16 {
            c.unpin((0, expert));
        }
        // A guess a demand read pins while it is read takes its room then.
        c.reserve_prefetch((1, 2), 10).unwrap();
        assert!(c.pin((1, 2)));
        assert_eq!(c.fit(), vec![((0, 0), false)]);
        c.land((1, 2)).unwrap();
        assert_eq!((c.used(), c.len()), (160, 16));
    }

    #[test]
    fn a_prefetch_evicts_only_what_the_policy_values_less_than_the_guess() {
        let mut c = cache(80, PolicyKind::Reuse);
        let experts: Vec<ExpertKey> = (0..8).map(|e| (e / 4, e % 4)).collect();
        for &key in &experts {
            load(&mut c, key);
        }
        // Every cached expert is used at every token: each is worth more than a guess with no
        // history, which is declined without evicting anything.
        for _ in 0..10 {
            for &key in &experts {
                c.pin(key);
                c.unpin(key);
            }
        }
        assert_eq!(c.reserve_prefetch((1, 7), 10), Err(Declined::Valued));
        assert_eq!(c.used(), 80);
        // A demand read evicts regardless.
        assert_eq!(c.reserve((1, 7), 10).unwrap().len(), 1);
    }

    #[test]
    fn belady_evicts_the_entry_used_farthest_ahead() {
        let seq = [(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2)];
        let mut c = BudgetCache::with_policy(20, Box::new(Belady::new(seq)));
        let mut misses = 0;
        for key in seq {
            if c.get(key).is_none() {
                misses += 1;
                c.reserve(key, 10).unwrap();
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

#[cfg(test)]
mod budget_size_tests {
    use super::*;

    const TOTAL: u64 = 8 << 30;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_budget("64MiB", TOTAL).unwrap(), 64 << 20);
        assert_eq!(parse_budget("64mib", TOTAL).unwrap(), 64 << 20);
        assert_eq!(parse_budget("1.5GB", TOTAL).unwrap(), 1_500_000_000);
        assert_eq!(parse_budget("8G", TOTAL).unwrap(), 8 << 30);
        assert_eq!(parse_budget(" 512 KiB ", TOTAL).unwrap(), 512 << 10);
        assert_eq!(parse_budget("100B", TOTAL).unwrap(), 100);
        assert_eq!(parse_budget("2kb", TOTAL).unwrap(), 2000);
        assert_eq!(parse_budget("0.5K", TOTAL).unwrap(), 512);
        // The config file's parser reads a bare leading or trailing point as a decimal.
        assert_eq!(parse_budget(".5G", TOTAL).unwrap(), 512 << 20);
    }

    #[test]
    fn percentages_of_the_experts() {
        assert_eq!(parse_budget("25%", TOTAL).unwrap(), 2 << 30);
        assert_eq!(parse_budget("100%", TOTAL).unwrap(), TOTAL);
        assert_eq!(parse_budget("12.5 %", 1000).unwrap(), 125);
        assert_eq!(parse_budget("33%", 10).unwrap(), 3);
    }

    #[test]
    fn nonsense_is_refused_and_named() {
        for text in [
            "", "abc", "64XB", "-5MiB", "1.2.3G", "0", "0%", "101%", "0.1%", "1e9", "1.5", "4096",
        ] {
            let total = if text == "0.1%" { 100 } else { TOTAL };
            let err = parse_budget(text, total).unwrap_err().to_string();
            assert!(err.contains(&format!("{text:?}")), "{text:?}: {err}");
        }
        assert!(
            parse_budget("1.5", TOTAL)
                .unwrap_err()
                .to_string()
                .contains("needs a unit")
        );
    }
}
