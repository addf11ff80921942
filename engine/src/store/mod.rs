//! The expert store: routed experts on demand under a byte budget.
//!
//! The engine thread calls [`ExpertStore::acquire`] (through [`ExpertProvider`]) for the experts a
//! layer routed to; hits return at once, misses are read by a pool of I/O threads, and every
//! returned [`ExpertHandle`] pins its expert until dropped. [`ExpertStore::prefetch`] queues
//! low-priority reads that never evict a pinned expert or another unused prefetch.
//!
//! Locking: one mutex guards the bookkeeping; it is never held across a read. Each read has a
//! [`LoadSlot`] that every acquirer of that expert waits on, so concurrent requests share one read.
//!
//! A failed read (the bytes do not match the expert's checksum, the file is unreadable or gone)
//! quarantines its expert: later requests for it fail at once with the same error instead of
//! reading it again every time the router picks it, while every other expert keeps working.
//! Loading the model again, after the file is repaired, starts with an empty quarantine.

pub mod budget;
pub mod checksum;
pub mod fetch;
pub mod held;
pub mod policy;
pub mod reuse;
pub mod source;
pub mod stats;
pub mod width;

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use budget::{BudgetCache, Declined, ExpertKey, NoRoom};
pub use policy::{Belady, EvictionPolicy, PolicyKind};
pub use source::{ExpertSizes, ExpertSource, GgufSource, HfSource, LayoutSource};
pub use stats::{PrefetchCounts, StoreStats};

use fetch::{Next, Pace};

use crate::error::{Error, Result};
use crate::expert::{ExpertHandle, ExpertProvider, GluMlp, PendingExpert};
use crate::lock::recover;

/// How the store behaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Bytes the cached experts may hold (in memory, f32).
    pub budget_bytes: u64,
    /// Threads reading experts; several reads stay in flight.
    pub io_threads: usize,
    pub policy: PolicyKind,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            budget_bytes: 0,
            io_threads: 4,
            policy: PolicyKind::default(),
        }
    }
}

/// Where the experts are, from [`ExpertStore::residency`].
#[derive(Clone, Debug, Default)]
pub struct Residency {
    /// Experts in memory (`false`) or being read (`true`).
    pub present: Vec<(ExpertKey, bool)>,
    /// Hits per expert since the store was made.
    pub hits: HashMap<ExpertKey, u64>,
}

/// One read in progress, waited on by every acquirer of its expert.
struct LoadSlot {
    /// Set by the I/O thread that performs the read, so a job queued twice (a prefetch promoted
    /// to a demand read) is read once.
    claimed: AtomicBool,
    /// Its read was taken up as a guess's.
    guessed: AtomicBool,
    /// A miss waits on that guess's read, which counts as a demand read from then on.
    waited: AtomicBool,
    /// Routing showed the guess wrong while it was read: its read stops at the next piece.
    abandoned: AtomicBool,
    /// Bytes of the guess's read so far, piece by piece: counted as read when it is given up.
    guess_bytes: AtomicU64,
    result: Mutex<Option<Result<Arc<GluMlp>, Arc<Error>>>>,
    done: Condvar,
}

impl LoadSlot {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            claimed: AtomicBool::new(false),
            guessed: AtomicBool::new(false),
            waited: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            guess_bytes: AtomicU64::new(0),
            result: Mutex::new(None),
            done: Condvar::new(),
        })
    }

    fn finish(&self, result: Result<Arc<GluMlp>, Arc<Error>>) {
        *recover(self.result.lock()) = Some(result);
        self.done.notify_all();
    }

    fn is_finished(&self) -> bool {
        recover(self.result.lock()).is_some()
    }

    fn wait(&self) -> Result<Arc<GluMlp>, Arc<Error>> {
        let mut result = recover(self.result.lock());
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone();
            }
            result = recover(self.done.wait(result));
        }
    }
}

enum Slot {
    Loading(Arc<LoadSlot>),
    Ready(Arc<GluMlp>),
}

struct State {
    cache: BudgetCache,
    slots: HashMap<ExpertKey, Slot>,
    demand: VecDeque<(ExpertKey, Arc<LoadSlot>)>,
    /// Queued prefetches with their priority, lowest (needed soonest) first.
    prefetch: VecDeque<(u64, ExpertKey, Arc<LoadSlot>)>,
    /// Experts whose read failed, with the error every later request for them gets.
    quarantined: HashMap<ExpertKey, Arc<Error>>,
    /// Hits per expert since the store was made, for a picture of where the hits go.
    hits: HashMap<ExpertKey, u64>,
    /// Prefetch reads in progress.
    prefetch_reads: usize,
    /// How many of them may be, from how often guesses were right.
    guess_width: width::GuessWidth,
    /// Demand reads in progress (a guess's read a miss waits on among them), and how many may
    /// be: a guess's read starts, and goes on from piece to piece, only while there are none, so
    /// that guesses take the disk's idle time (a layer's compute) and never its time for a miss.
    demand_reads: usize,
    max_demand_reads: usize,
    telemetry: stats::Telemetry,
    shutdown: bool,
}

impl State {
    /// Pins `key` if it is ready or being read, counting a hit (and a used prefetch); a queued
    /// prefetch that is needed now becomes a demand read, ahead of other prefetches.
    fn pin_present(
        &mut self,
        key: ExpertKey,
        queued: &mut bool,
        resumed: &mut bool,
    ) -> Option<Slot> {
        let slot = match self.slots.get(&key)? {
            Slot::Ready(weights) => Slot::Ready(weights.clone()),
            Slot::Loading(slot) => Slot::Loading(slot.clone()),
        };
        self.telemetry.counts.hits += 1;
        *self.hits.entry(key).or_default() += 1;
        if self.cache.pin(key) {
            self.telemetry.counts.prefetch_used += 1;
            self.guess_width.record(true);
            // A guess being read is a demand read now, and takes its room.
            let evicted = self.cache.fit();
            self.forget(&evicted);
        }
        if let Slot::Loading(slot) = &slot {
            if !slot.claimed.load(Ordering::Acquire) {
                self.demand.push_front((key, slot.clone()));
                *queued = true;
            } else if slot.guessed.load(Ordering::Acquire)
                && !slot.waited.swap(true, Ordering::AcqRel)
            {
                // No other guess goes on beside a read a miss waits on; this one does, at once.
                self.demand_reads += 1;
                *resumed = true;
            }
        }
        Some(slot)
    }

    fn forget(&mut self, evicted: &[(ExpertKey, bool)]) {
        for &(key, unused_guess) in evicted {
            self.slots.remove(&key);
            if unused_guess {
                self.guess_width.record(false);
            }
        }
        self.telemetry.record_evictions(evicted);
    }
}

struct Shared {
    source: Arc<dyn ExpertSource>,
    expert_sizes: ExpertSizes,
    state: Mutex<State>,
    /// Wakes I/O threads when reads are queued.
    work: Condvar,
    /// Wakes acquirers waiting for room when a read completes.
    progress: Condvar,
    /// Wakes guesses' reads waiting between pieces: demand reads are done, a miss waits on the
    /// guess, or routing showed it wrong.
    resume: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        recover(self.state.lock())
    }

    /// Before each piece of a guess's read: give up once routing showed the guess wrong (or
    /// the store closes); read the rest at once if a miss waits on it; else wait while demand
    /// reads are in flight, then read a piece, larger while guesses are read several at once.
    fn pace_guess(&self, slot: &LoadSlot, left: usize) -> Next {
        let mut state = self.lock();
        let (next, bytes) = loop {
            if state.shutdown || slot.abandoned.load(Ordering::Acquire) {
                return Next::GiveUp;
            }
            if slot.waited.load(Ordering::Acquire) {
                break (Next::Rest, left);
            }
            if state.demand_reads == 0 {
                let piece = state.guess_width.piece().min(left);
                break (Next::Piece(piece), piece);
            }
            state = recover(self.resume.wait(state));
        };
        slot.guess_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        next
    }
}

/// Keeps one expert pinned while alive.
struct Pin {
    shared: Arc<Shared>,
    key: ExpertKey,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state.cache.get(self.key).is_some() {
            state.cache.unpin(self.key);
        }
    }
}

/// The byte-budgeted working set of experts.
pub struct ExpertStore {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ExpertStore {
    pub fn new(source: Arc<dyn ExpertSource>, config: &StoreConfig) -> Self {
        let shared = Arc::new(Shared {
            expert_sizes: source.expert_sizes(),
            source,
            state: Mutex::new(State {
                cache: BudgetCache::new(config.budget_bytes, config.policy),
                slots: HashMap::new(),
                demand: VecDeque::new(),
                prefetch: VecDeque::new(),
                quarantined: HashMap::new(),
                hits: HashMap::new(),
                prefetch_reads: 0,
                guess_width: Default::default(),
                demand_reads: 0,
                max_demand_reads: config.io_threads.max(1),
                telemetry: Default::default(),
                shutdown: false,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            resume: Condvar::new(),
        });
        let demand = (0..config.io_threads.max(1)).map(|i| (Role::Demand, i));
        let guesses = (0..GUESS_THREADS).map(|i| (Role::Guess, i));
        let workers = demand
            .chain(guesses)
            .map(|(role, i)| {
                let shared = shared.clone();
                let name = match role {
                    Role::Demand => format!("odmoe-io-{i}"),
                    Role::Guess => format!("odmoe-guess-{i}"),
                };
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || io_worker(&shared, role))
                    .expect("spawn an I/O thread")
            })
            .collect();
        Self { shared, workers }
    }

    /// Bytes one expert of each layer takes in the budget.
    pub fn expert_sizes(&self) -> &ExpertSizes {
        &self.shared.expert_sizes
    }

    /// Returns `ids` of `layer`, pinned, reading misses; waits until all are loaded.
    pub fn acquire(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertHandle>> {
        self.request(layer, ids)?
            .into_iter()
            .map(PendingExpert::wait)
            .collect()
    }

    /// Pins `ids` of `layer` and queues the reads of misses, returning without waiting for them.
    pub fn request(&self, layer: usize, ids: &[usize]) -> Result<Vec<PendingExpert>> {
        let mut pinned: Vec<Option<(ExpertKey, Slot)>> = Vec::with_capacity(ids.len());
        let mut state = self.shared.lock();
        if let Some(error) = ids
            .iter()
            .find_map(|&expert| state.quarantined.get(&(layer, expert)))
        {
            return Err(Error::Shared(error.clone()));
        }
        let (mut queued, mut resumed) = (false, false);
        // Experts already present are pinned first, so that this call's misses cannot evict them.
        for &expert in ids {
            let key = (layer, expert);
            pinned.push(
                state
                    .pin_present(key, &mut queued, &mut resumed)
                    .map(|slot| (key, slot)),
            );
        }
        for (i, &expert) in ids.iter().enumerate() {
            if pinned[i].is_some() {
                continue;
            }
            let key = (layer, expert);
            loop {
                // Another acquirer may have started the read while this one waited for room.
                if let Some(slot) = state.pin_present(key, &mut queued, &mut resumed) {
                    pinned[i] = Some((key, slot));
                    break;
                }
                match state.cache.reserve(key, self.shared.expert_sizes.at(layer)) {
                    Ok(evicted) => {
                        state.forget(&evicted);
                        state.telemetry.counts.misses += 1;
                        state.cache.pin(key);
                        let slot = LoadSlot::new();
                        state.slots.insert(key, Slot::Loading(slot.clone()));
                        state.demand.push_back((key, slot.clone()));
                        queued = true;
                        pinned[i] = Some((key, Slot::Loading(slot)));
                        break;
                    }
                    Err(NoRoom::Full {
                        needed,
                        budget,
                        pinned_or_loading,
                    }) => {
                        let unpinned_loads = state.slots.iter().any(|(k, s)| {
                            matches!(s, Slot::Loading(_)) && state.cache.frees_room_once_read(*k)
                        });
                        if unpinned_loads {
                            // Reads nobody waits on any more hold room; once read they can be
                            // evicted. (Guesses hold none until they land.)
                            if queued {
                                self.shared.work.notify_all();
                                queued = false;
                            }
                            state = recover(self.shared.progress.wait(state));
                            continue;
                        }
                        for (key, _) in pinned.iter().flatten() {
                            state.cache.unpin(*key);
                        }
                        return Err(Error::Budget(format!(
                            "no room for expert {expert} of layer {layer}: it needs {needed} bytes, \
                             the budget is {budget} and {pinned_or_loading} are pinned or loading; \
                             raise the expert budget to at least one layer's experts"
                        )));
                    }
                }
            }
        }
        if queued {
            self.shared.work.notify_all();
        }
        if resumed {
            self.shared.resume.notify_all();
        }
        drop(state);
        Ok(pinned
            .into_iter()
            .flatten()
            .map(|(key, slot)| {
                let pin = Pin {
                    shared: self.shared.clone(),
                    key,
                };
                let loaded = match &slot {
                    Slot::Ready(_) => None,
                    Slot::Loading(load) => Some(load.clone()),
                };
                PendingExpert::new(
                    move || {
                        let weights = match slot {
                            Slot::Ready(w) => w,
                            Slot::Loading(load) => {
                                let started = Instant::now();
                                let loaded = load.wait();
                                pin.shared.lock().telemetry.stall += started.elapsed();
                                // A failed read removed its entry, so dropping the pin unpins nothing.
                                loaded.map_err(Error::Shared)?
                            }
                        };
                        Ok(ExpertHandle::pinned(weights, Box::new(pin)))
                    },
                    move || loaded.as_ref().is_none_or(|load| load.is_finished()),
                )
            })
            .collect())
    }

    /// Queues low-priority reads of `ids` of `layer`, where they cannot cost a hit (see
    /// [`BudgetCache::reserve_prefetch`]); the others are dropped and counted.
    pub fn prefetch(&self, layer: usize, ids: &[usize]) {
        self.prefetch_at(layer, ids, 0);
    }

    /// [`prefetch`](Self::prefetch) with a priority among queued prefetches: lower values are read
    /// first, equal values in the order queued (the predictor passes the step at which the
    /// expert is expected to be needed). Demand reads always go first.
    pub fn prefetch_at(&self, layer: usize, ids: &[usize], priority: u64) {
        let mut state = self.shared.lock();
        let mut queued = false;
        for &expert in ids {
            let key = (layer, expert);
            if state.slots.contains_key(&key) || state.quarantined.contains_key(&key) {
                continue;
            }
            match state
                .cache
                .reserve_prefetch(key, self.shared.expert_sizes.at(layer))
            {
                Ok(()) => {
                    state.telemetry.counts.prefetch_issued += 1;
                    let slot = LoadSlot::new();
                    state.slots.insert(key, Slot::Loading(slot.clone()));
                    let at = state.prefetch.partition_point(|(p, _, _)| *p <= priority);
                    state.prefetch.insert(at, (priority, key, slot));
                    queued = true;
                }
                Err(_) => state.telemetry.counts.prefetch_dropped += 1,
            }
        }
        if queued {
            self.shared.work.notify_all();
        }
    }

    /// The routing of `layer` is known and its experts are about to be asked for. From now on
    /// prefetches spare them; guesses for `layer` that routing did not choose are cancelled, a
    /// queued one at once and one being read at its next piece; and each of `ids` that a
    /// prefetch had evicted is counted as a hit that prefetch cost.
    pub fn routed(&self, layer: usize, ids: &[usize]) {
        let mut state = self.shared.lock();
        let cost = state.cache.routed(layer, ids);
        state.telemetry.counts.prefetch_evicted_hits += cost;
        let State {
            prefetch,
            cache,
            slots,
            telemetry,
            guess_width,
            ..
        } = &mut *state;
        prefetch.retain(|(_, key, slot)| {
            let wrong =
                !slot.claimed.load(Ordering::Acquire) && cache.wrong_guess(*key, layer, ids);
            if wrong {
                // Nothing waits on a guess nobody asked for: its slot goes with it.
                slots.remove(key);
                cache.remove(*key);
                telemetry.counts.prefetch_cancelled += 1;
                guess_width.record(false);
            }
            !wrong
        });
        let mut abandoned = false;
        slots.retain(|key, slot| {
            let wrong = matches!(slot, Slot::Loading(load) if load.guessed.load(Ordering::Acquire))
                && cache.wrong_guess(*key, layer, ids);
            if let (true, Slot::Loading(load)) = (wrong, slot) {
                // The I/O thread reading it sees the flag at its next piece.
                load.abandoned.store(true, Ordering::Release);
                cache.remove(*key);
                telemetry.counts.prefetch_cancelled += 1;
                guess_width.record(false);
                abandoned = true;
            }
            !wrong
        });
        if abandoned {
            self.shared.resume.notify_all();
        }
    }

    /// Changes the budget; unpinned experts are evicted at once until the rest fits.
    pub fn set_budget(&self, bytes: u64) {
        let mut state = self.shared.lock();
        let evicted = state.cache.set_budget(bytes);
        state.forget(&evicted);
    }

    pub fn stats(&self) -> StoreStats {
        let state = self.shared.lock();
        state
            .telemetry
            .snapshot(state.cache.used(), state.cache.budget(), state.cache.len())
    }

    /// Every expert in memory or being read, and the hits of every expert hit so far: what a
    /// picture of the store shows.
    pub fn residency(&self) -> Residency {
        let state = self.shared.lock();
        Residency {
            present: state
                .slots
                .iter()
                .map(|(&key, slot)| (key, matches!(slot, Slot::Loading(_))))
                .collect(),
            hits: state.hits.clone(),
        }
    }

    /// The prefetch counters and stall time alone: cheap enough to read after every layer.
    pub fn prefetch_counts(&self) -> PrefetchCounts {
        self.shared.lock().telemetry.prefetch_counts()
    }

    /// Waits until no read is queued or running (for tests and benchmarks).
    pub fn wait_idle(&self) {
        let mut state = self.shared.lock();
        // A guess given up has left the slots, but its read may still be running.
        while state.prefetch_reads > 0
            || state.demand_reads > 0
            || state.slots.values().any(|s| matches!(s, Slot::Loading(_)))
        {
            state = self
                .shared
                .progress
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    /// Checks the budget invariant (bytes held never exceed the budget); for tests.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let state = self.shared.lock();
        let (used, budget) = (state.cache.used(), state.cache.budget());
        if used > budget {
            return Err(format!("{used} bytes held over a budget of {budget}"));
        }
        if state.slots.len() != state.cache.len() {
            return Err(format!(
                "{} slots for {} cache entries",
                state.slots.len(),
                state.cache.len()
            ));
        }
        Ok(())
    }
}

impl ExpertProvider for ExpertStore {
    fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertHandle>> {
        self.acquire(layer, ids)
    }

    fn request(&self, layer: usize, ids: &[usize]) -> Result<Vec<PendingExpert>> {
        ExpertStore::request(self, layer, ids)
    }

    fn max_batch(&self) -> usize {
        let state = self.shared.lock();
        ((state.cache.budget() / self.shared.expert_sizes.largest().max(1)) as usize).max(1)
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        self.shared.resume.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Threads reading guesses: as many as may read at once ([`width::GuessWidth`]), which is one
/// while guesses are often wrong, so that they are read one after another in the order the
/// predictor ranks them. The disk's idle time while a layer computes holds less than one
/// expert's read (about 1 ms against 1.3 ms for 2.65 MB at 2 GB/s); three guesses read at once
/// split it, each ended part-read when its layer came, and the wrong ones among them had taken
/// their share for nothing. One at a time, the guesses after the first are mostly cancelled
/// before they start. Forced on at a 2 GB limit (skewed 18-layer qwen3moe, reads held to
/// 0.8 GB/s), lookahead went from 0.83x to 0.90x of no prefetch; unheld, its wasted guesses
/// halved (about 460 to 232 over 256 tokens). One guess's three projections are still read at
/// once, which keeps three reads in flight.
const GUESS_THREADS: usize = width::WIDEST;

/// What an I/O thread reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Demand,
    /// Guesses, at a lower CPU priority: what a guess's read costs the CPU (its checksum, and
    /// for small slices their copy) never delays the layers' compute, which demand reads wait
    /// on. Guesses have a thread of their own, so that a guess waiting between pieces never
    /// holds one a miss needs.
    Guess,
}

/// The error of expert `key`'s read that panicked with `payload`.
fn read_panicked(key: ExpertKey, payload: &(dyn std::any::Any + Send)) -> Error {
    let message = payload
        .downcast_ref::<&str>()
        .map(|m| m.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    Error::InvalidModel(format!(
        "expert {} of layer {}: its read panicked ({message})",
        key.1, key.0
    ))
}

/// An I/O thread: takes the reads of its role, reads without the lock, publishes.
fn io_worker(shared: &Shared, role: Role) {
    if role == Role::Guess {
        fetch::lower_thread_priority();
    }
    // Guesses' threads too: their next piece starts as soon as the disk is free, while at nice
    // 10 their share of a core stays small. With every guess right and read one at a time,
    // decode went 1.08x as fast with it (three rounds).
    fetch::wake_promptly();
    loop {
        let (key, slot, prefetch) = {
            let mut state = shared.lock();
            loop {
                if state.shutdown {
                    return;
                }
                let job = match role {
                    Role::Demand if state.demand_reads < state.max_demand_reads => state
                        .demand
                        .pop_front()
                        .map(|(key, slot)| (key, slot, false)),
                    Role::Guess
                        if state.demand.is_empty()
                            && state.demand_reads == 0
                            && state.prefetch_reads < state.guess_width.reads() =>
                    {
                        state
                            .prefetch
                            .pop_front()
                            .map(|(_, key, slot)| (key, slot, true))
                    }
                    Role::Demand | Role::Guess => None,
                };
                match job {
                    Some((key, slot, prefetch)) if !slot.claimed.swap(true, Ordering::AcqRel) => {
                        if prefetch {
                            state.prefetch_reads += 1;
                            if state.guess_width.is_wide() {
                                state.telemetry.counts.prefetch_wide_reads += 1;
                            }
                            slot.guessed.store(true, Ordering::Release);
                        } else {
                            state.demand_reads += 1;
                        }
                        break (key, slot, prefetch);
                    }
                    Some(_) => continue, // already read through its other queue entry
                    None => state = recover(shared.work.wait(state)),
                }
            }
        };
        let started = Instant::now();
        // A read that panics (a bug met by some file's bytes) fails like any other: the thread
        // dying would leave its expert loading for ever, and every later acquirer waiting on it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if prefetch {
                let pace = |piece| shared.pace_guess(&slot, piece);
                shared.source.read(key.0, key.1, Pace::Pieces(&pace))
            } else {
                shared.source.read(key.0, key.1, Pace::Whole)
            }
        }))
        .unwrap_or_else(|payload| Err(read_panicked(key, payload.as_ref())));
        let latency = started.elapsed();
        let mut state = shared.lock();
        if prefetch {
            state.prefetch_reads -= 1;
        }
        if !prefetch || slot.waited.load(Ordering::Acquire) {
            state.demand_reads -= 1;
            if state.demand_reads == 0 {
                shared.resume.notify_all();
            }
        }
        // A thread that left a queued read for another's sake may take it now.
        shared.work.notify_all();
        if slot.abandoned.load(Ordering::Acquire) {
            // Routing showed the guess wrong and took its entry: whatever the read came to, it
            // is dropped, and what it read counted.
            state.telemetry.counts.bytes_read += slot.guess_bytes.load(Ordering::Relaxed);
            drop(state);
            slot.finish(Err(Arc::new(Error::InvalidRequest(
                fetch::GIVEN_UP.to_string(),
            ))));
            shared.progress.notify_all();
            continue;
        }
        let current =
            matches!(state.slots.get(&key), Some(Slot::Loading(s)) if Arc::ptr_eq(s, &slot));
        let outcome = match result {
            Ok((weights, bytes)) => {
                state.telemetry.record_read(bytes, latency);
                let weights = Arc::new(weights);
                if current {
                    match state.cache.land(key) {
                        Ok(evicted) => {
                            state.forget(&evicted);
                            state.slots.insert(key, Slot::Ready(weights.clone()));
                        }
                        // A guess that no longer fits: nobody waits on it.
                        Err(_) => {
                            state.slots.remove(&key);
                            state.telemetry.counts.prefetch_dropped += 1;
                        }
                    }
                }
                Ok(weights)
            }
            Err(error) => {
                tracing::error!(
                    "{error}; the expert is quarantined until the model is loaded again"
                );
                state.telemetry.counts.read_errors += 1;
                if current {
                    state.slots.remove(&key);
                    state.cache.remove(key);
                }
                let error = Arc::new(error);
                state.quarantined.insert(key, error.clone());
                Err(error)
            }
        };
        drop(state);
        slot.finish(outcome);
        shared.progress.notify_all();
    }
}
