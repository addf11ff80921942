//! The controller: readings become levels, levels move the expert budget
//! through the policy, and each move becomes a [`Directive`] for the engine
//! thread and a line in the log.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use odmoe_config::MemoryConfig;
use odmoe_config::format_bytes;
use odmoe_engine::lock::recover;
use tracing::{info, warn};

use super::policy::{BudgetPolicy, Direction, Observation, PolicyParams, SHRINK_SPACING};
use super::{Directive, Headroom, Level, ModelMemory, PressureSource};
use crate::budget::BudgetKind;
use crate::memory::memory_total;

/// How many budget changes `stats` keeps.
const KEPT_ADJUSTMENTS: usize = 16;

/// How long a warn or critical reading stands in `stats` and the log after it
/// was last seen: PSI triggers fire at most once per window (up to 2 s), so
/// lasting pressure reads as events between quiet readings, which should not
/// show as pressure coming and going. The policy sees every reading as it is.
const LEVEL_HOLD: Duration = Duration::from_secs(5);

/// What the controller knows, for `stats` and `pressure`.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryReport {
    /// The level shown: the last reading's, or a worse one seen lately.
    pub level: Level,
    /// Why that level.
    pub reason: String,
    /// What is watched.
    pub source: String,
    /// Whether the level is simulated (the `pressure` method).
    pub simulated: bool,
    /// Whether the budget follows pressure (`memory.adapt`).
    pub adapt: bool,
    /// The memory left at the last reading, when the platform says.
    pub headroom: Option<Headroom>,
    /// The budget the store has now.
    pub budget_bytes: Option<u64>,
    /// The budget the policy aims at.
    pub target_bytes: Option<u64>,
    /// The least the budget may shrink to.
    pub floor_bytes: Option<u64>,
    /// The most the budget may grow to.
    pub ceiling_bytes: Option<u64>,
    /// The daemon's resident memory with the model loaded and no expert.
    pub base_bytes: Option<u64>,
    /// Memory set aside for KV caches when sizing an `auto` budget.
    pub kv_reserve_bytes: u64,
    /// What the KV caches hold (kept sessions, the prefix cache and the request running).
    pub kv_bytes: u64,
    /// How long until the budget next grows, when it is to.
    pub grow_in: Option<Duration>,
    /// The latest changes of the budget, oldest first.
    pub adjustments: Vec<Adjustment>,
}

/// One change of the expert budget, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Adjustment {
    /// When, since the daemon started.
    pub at: Duration,
    /// The budget before.
    pub from_bytes: u64,
    /// The budget after.
    pub to_bytes: u64,
    /// What moved it.
    pub reason: String,
}

/// The model under control.
struct Managed {
    model: ModelMemory,
    policy: BudgetPolicy,
}

/// What the controller knows; behind one lock.
struct Inner {
    /// The level shown: the last reading's, or a worse one seen within [`LEVEL_HOLD`].
    level: Level,
    reason: String,
    /// The last warn or critical reading, with why and when.
    held: Option<(Level, String, Duration)>,
    headroom: Option<Headroom>,
    /// The level `pressure` simulates, if any.
    simulated: Option<Level>,
    model: Option<Managed>,
    adjustments: VecDeque<Adjustment>,
    /// When idle sessions were last dropped for critical pressure.
    last_relief: Option<Duration>,
    /// What the KV caches hold, as the engine thread last said.
    kv_bytes: u64,
}

/// Gives a directive to the engine thread.
type Director = Box<dyn Fn(Directive) + Send + Sync>;

/// The memory-pressure controller, shared by the monitor thread, the engine
/// thread (loads) and the connections (`stats`, `pressure`).
pub struct Pressure {
    config: MemoryConfig,
    params: PolicyParams,
    source: Box<dyn PressureSource>,
    /// Policy time and `BudgetAdjustment::at_s` count from here.
    started: Instant,
    inner: Mutex<Inner>,
    /// Wakes the monitor when the simulated level changes.
    simulation: Condvar,
    /// Set once the engine thread exists.
    director: OnceLock<Director>,
}

impl std::fmt::Debug for Pressure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pressure")
            .field("source", &self.source.describe())
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Pressure {
    /// A controller reading `source`, with `config`'s steps and thresholds;
    /// `started` is the daemon's start, which adjustments are timed from.
    pub fn new(
        config: &MemoryConfig,
        source: Box<dyn PressureSource>,
        started: Instant,
    ) -> Pressure {
        let params = PolicyParams {
            shrink_step: config.shrink_step,
            critical_step: config.critical_step,
            grow_step: config.grow_step,
            quiet: Duration::from_secs(config.quiet_secs),
            grow_interval: Duration::from_secs(config.grow_interval_secs),
        };
        let headroom = source.headroom();
        Pressure {
            config: config.clone(),
            params,
            source,
            started,
            inner: Mutex::new(Inner {
                level: Level::Normal,
                reason: "no reading yet".to_owned(),
                held: None,
                headroom,
                simulated: None,
                model: None,
                adjustments: VecDeque::new(),
                last_relief: None,
                kv_bytes: 0,
            }),
            simulation: Condvar::new(),
            director: OnceLock::new(),
        }
    }

    /// When the daemon started, as given to [`Pressure::new`].
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Where directives go: the engine thread.
    pub fn direct_to(&self, director: impl Fn(Directive) + Send + Sync + 'static) {
        let _ = self.director.set(Box::new(director));
    }

    /// Starts the monitor thread, which reads the source for the rest of the
    /// process's life.
    pub fn start_monitor(self: &Arc<Self>) -> std::io::Result<()> {
        let pressure = Arc::clone(self);
        std::thread::Builder::new()
            .name("pressure".into())
            .spawn(move || pressure.monitor())?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        recover(self.inner.lock())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The memory the daemon lives under: the machine's, or its cgroup's
    /// limit when lower.
    fn memory_limit(&self) -> Option<u64> {
        self.source
            .headroom()
            .map(|headroom| headroom.limit)
            .or_else(memory_total)
    }

    /// Takes control of a loaded model's budget; returns the budget to start with.
    pub fn model_loaded(&self, model: ModelMemory) -> u64 {
        let (start, ceiling) = self.bounds(&model);
        let policy = BudgetPolicy::new(self.params.clone(), model.floor(), ceiling, start);
        let start = policy.target();
        info!(
            budget = %format_bytes(start),
            floor = %format_bytes(policy.floor()),
            ceiling = %format_bytes(policy.ceiling()),
            base = %format_bytes(model.base_bytes),
            adapt = self.config.adapt,
            "expert budget set"
        );
        let mut inner = self.lock();
        inner.model = Some(Managed { model, policy });
        inner.adjustments.clear();
        start
    }

    /// The start and the ceiling of `model`'s budget.
    fn bounds(&self, model: &ModelMemory) -> (u64, u64) {
        let total = model.total_expert_bytes;
        let max = self.config.max_budget.map_or(total, |max| max.of(total));
        match model.budget {
            BudgetKind::Fixed(bytes) => {
                let ceiling = bytes.min(max);
                (ceiling, ceiling)
            }
            BudgetKind::Auto => {
                let ceiling = total.min(max);
                let limit = self.memory_limit().unwrap_or(u64::MAX);
                let auto = auto_budget(
                    limit,
                    self.config.auto_fraction,
                    model.base_bytes,
                    self.config.kv_reserve,
                );
                if auto < model.floor() {
                    warn!(
                        limit = %format_bytes(limit),
                        base = %format_bytes(model.base_bytes),
                        floor = %format_bytes(model.floor()),
                        "memory is short for this model: the expert budget starts at its floor"
                    );
                }
                (auto.min(ceiling), ceiling)
            }
        }
    }

    /// The KV caches now hold (or are about to hold) `bytes`. An `auto` budget set aside
    /// `kv_reserve` for them; what they hold beyond it comes out of the expert budget at once
    /// (before a long prompt's cache is allocated, not after the pressure it would cause), and
    /// goes back to it through the policy's growth once they shrink. Returns the directive for
    /// the engine thread (the caller) to apply when the budget moves.
    pub fn kv_cache_bytes(&self, bytes: u64) -> Option<Directive> {
        let mut inner = self.lock();
        inner.kv_bytes = bytes;
        let managed = inner.model.as_mut()?;
        if !matches!(managed.model.budget, BudgetKind::Auto) || bytes <= self.config.kv_reserve {
            return None;
        }
        let limit = self.memory_limit().unwrap_or(u64::MAX);
        let room = auto_budget(
            limit,
            self.config.auto_fraction,
            managed.model.base_bytes,
            bytes,
        );
        let from = managed.policy.target();
        managed.policy.cap(room);
        let to = managed.policy.target();
        if to == from {
            return None;
        }
        let epoch = managed.model.epoch;
        let why = format!(
            "KV caches hold {}, beyond the {} set aside",
            format_bytes(bytes),
            format_bytes(self.config.kv_reserve)
        );
        info!(from = %format_bytes(from), to = %format_bytes(to), "{why}");
        self.record(&mut inner, from, to, why);
        Some(Directive {
            epoch,
            budget: to,
            relieve: false,
        })
    }

    /// The model is gone: nothing to steer until the next load.
    pub fn model_unloaded(&self) {
        self.lock().model = None;
    }

    /// A new budget for the loaded model (SIGHUP changed it); returns the
    /// budget it starts at, or `None` without a model under control.
    pub fn rebudget(&self, budget: BudgetKind, why: &str) -> Option<u64> {
        let mut inner = self.lock();
        let managed = inner.model.as_mut()?;
        managed.model.budget = budget;
        let (start, ceiling) = self.bounds(&managed.model);
        let from = managed.policy.target();
        managed
            .policy
            .rebound(managed.model.floor(), ceiling, start);
        let to = managed.policy.target();
        let epoch = managed.model.epoch;
        if from != to {
            self.record(&mut inner, from, to, why.to_owned());
        }
        self.direct(Directive {
            epoch,
            budget: to,
            relieve: false,
        });
        Some(to)
    }

    /// Simulates `level` until called with `None`, which goes back to the
    /// source. The first simulated reading is taken at once.
    pub fn simulate(&self, level: Option<Level>) {
        {
            let mut inner = self.lock();
            inner.simulated = level;
            // A level set by hand replaces what was seen, at once.
            inner.held = None;
        }
        self.simulation.notify_all();
        match level {
            Some(level) => {
                info!(%level, "simulating memory pressure");
                self.observe(Some((level, simulated_reason(level))), true);
            }
            None => {
                info!("memory pressure simulation released");
                self.observe(None, false);
            }
        }
    }

    /// Reads the source until the process ends.
    fn monitor(&self) {
        let interval = Duration::from_millis(self.config.interval_ms);
        loop {
            let simulated = self.lock().simulated;
            match simulated {
                Some(level) => {
                    let inner = self.lock();
                    let (inner, _) = recover(self.simulation.wait_timeout(inner, interval));
                    // A changed simulation was read when it was set.
                    if inner.simulated == Some(level) {
                        drop(inner);
                        self.observe(Some((level, simulated_reason(level))), true);
                    }
                }
                None => {
                    let event = self.source.wait(interval);
                    if self.lock().simulated.is_none() {
                        self.observe(event, false);
                    }
                }
            }
        }
    }

    /// Takes one reading: `event` from the source (or the simulated level,
    /// which then stands alone) and the headroom measured now.
    fn observe(&self, event: Option<(Level, String)>, simulated: bool) {
        let headroom = self.source.headroom();
        let (headroom_level, spare, headroom_reason) = match &headroom {
            Some(headroom) => self.headroom_level(headroom),
            None => (
                Level::Normal,
                None,
                "the memory left is not measured".into(),
            ),
        };
        let (level, reason) = match event {
            Some((level, reason)) if simulated || level >= headroom_level => (level, reason),
            _ => (headroom_level, headroom_reason),
        };
        let now = self.now();
        let mut inner = self.lock();
        let (shown, shown_reason) = if level != Level::Normal {
            inner.held = Some((level, reason.clone(), now));
            (level, reason.clone())
        } else {
            match inner.held.take() {
                Some((held, why, at)) if now.saturating_sub(at) < LEVEL_HOLD => {
                    let ago = now.saturating_sub(at).as_secs_f64();
                    let shown = (held, format!("{why} ({ago:.1}s ago)"));
                    inner.held = Some((held, why, at));
                    shown
                }
                _ => (level, reason.clone()),
            }
        };
        if shown != inner.level {
            if shown > inner.level {
                warn!(level = %shown, reason = %shown_reason, "memory pressure");
            } else {
                info!(level = %shown, reason = %shown_reason, "memory pressure eased");
            }
        }
        inner.level = shown;
        inner.reason = shown_reason;
        inner.headroom = headroom;
        if !self.config.adapt {
            return;
        }
        let relieve = level == Level::Critical
            && inner
                .last_relief
                .is_none_or(|last| now.saturating_sub(last) >= SHRINK_SPACING);
        let Some(managed) = inner.model.as_mut() else {
            return;
        };
        let epoch = managed.model.epoch;
        let change = managed.policy.observe(now, &Observation { level, spare });
        let target = managed.policy.target();
        if let Some(change) = &change {
            let why = format!("{}: {reason}", change.why);
            match change.direction {
                Direction::Shrink => {
                    info!(from = %format_bytes(change.from), to = %format_bytes(change.to), reason = %why, "expert budget shrunk");
                }
                Direction::Grow => {
                    info!(from = %format_bytes(change.from), to = %format_bytes(change.to), reason = %why, "expert budget grown");
                }
            }
            self.record(&mut inner, change.from, change.to, why);
        }
        if relieve {
            inner.last_relief = Some(now);
        }
        if change.is_some() || relieve {
            // Given while locked, so directives reach the engine in order.
            self.direct(Directive {
                epoch,
                budget: target,
                relieve,
            });
        }
    }

    /// The level of `headroom` against the configured thresholds, the bytes
    /// above the warn line, and why.
    fn headroom_level(&self, headroom: &Headroom) -> (Level, Option<u64>, String) {
        let warn_at = self.config.warn_headroom.of(headroom.limit);
        let critical_at = self.config.critical_headroom.of(headroom.limit);
        let left = format!(
            "{} left of {} ({} limit)",
            format_bytes(headroom.available),
            headroom.scope,
            format_bytes(headroom.limit)
        );
        let (level, reason) = if headroom.available < critical_at {
            (
                Level::Critical,
                format!("{left}, below {}", format_bytes(critical_at)),
            )
        } else if headroom.available < warn_at {
            (
                Level::Warn,
                format!("{left}, below {}", format_bytes(warn_at)),
            )
        } else {
            (Level::Normal, left)
        };
        (
            level,
            Some(headroom.available.saturating_sub(warn_at)),
            reason,
        )
    }

    fn record(&self, inner: &mut Inner, from: u64, to: u64, reason: String) {
        if inner.adjustments.len() == KEPT_ADJUSTMENTS {
            inner.adjustments.pop_front();
        }
        inner.adjustments.push_back(Adjustment {
            at: self.now(),
            from_bytes: from,
            to_bytes: to,
            reason,
        });
    }

    fn direct(&self, directive: Directive) {
        if let Some(director) = self.director.get() {
            director(directive);
        }
    }

    /// What the controller knows now; `store_budget` is the budget the store
    /// has now.
    pub fn stats(&self, store_budget: Option<u64>) -> MemoryReport {
        let now = self.now();
        let inner = self.lock();
        let managed = inner.model.as_ref();
        MemoryReport {
            level: inner.level,
            reason: inner.reason.clone(),
            source: self.source.describe(),
            simulated: inner.simulated.is_some(),
            adapt: self.config.adapt,
            headroom: inner.headroom.clone(),
            budget_bytes: store_budget,
            target_bytes: managed.map(|m| m.policy.target()),
            floor_bytes: managed.map(|m| m.policy.floor()),
            ceiling_bytes: managed.map(|m| m.policy.ceiling()),
            base_bytes: managed.map(|m| m.model.base_bytes),
            kv_reserve_bytes: self.config.kv_reserve,
            kv_bytes: inner.kv_bytes,
            grow_in: managed
                .filter(|_| self.config.adapt)
                .and_then(|m| m.policy.growth_due(now)),
            adjustments: inner.adjustments.iter().cloned().collect(),
        }
    }
}

/// What a simulated reading says.
fn simulated_reason(level: Level) -> String {
    format!("simulated {level} (odmoe pressure simulate)")
}

/// The `auto` expert budget: `fraction` of `limit`, less the model's other
/// memory and the KV reserve.
pub fn auto_budget(limit: u64, fraction: f64, base: u64, kv_reserve: u64) -> u64 {
    ((limit as f64 * fraction) as u64)
        .saturating_sub(base)
        .saturating_sub(kv_reserve)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use odmoe_config::Size;

    use super::*;
    use crate::pressure::Headroom;

    const MIB: u64 = 1 << 20;

    /// A source whose headroom the test sets.
    struct Fixed(Arc<Mutex<Option<Headroom>>>);

    impl PressureSource for Fixed {
        fn describe(&self) -> String {
            "a test".into()
        }
        fn wait(&self, _: Duration) -> Option<(Level, String)> {
            None
        }
        fn headroom(&self) -> Option<Headroom> {
            self.0.lock().unwrap().clone()
        }
    }

    fn headroom(available: u64) -> Option<Headroom> {
        Some(Headroom {
            available,
            limit: 1000 * MIB,
            scope: "cgroup /test".into(),
        })
    }

    fn model(budget: BudgetKind) -> ModelMemory {
        ModelMemory {
            epoch: 1,
            total_expert_bytes: 48 * MIB,
            expert_bytes: MIB,
            experts_per_token: 2,
            layers: 4,
            base_bytes: 100 * MIB,
            budget,
        }
    }

    type Directives = Arc<Mutex<Vec<Directive>>>;

    /// A controller with 900 MiB of 1000 MiB left, the headroom's handle and
    /// the directives it gives.
    fn controller_with_headroom(
        config: MemoryConfig,
    ) -> (Arc<Pressure>, Arc<Mutex<Option<Headroom>>>, Directives) {
        let left = Arc::new(Mutex::new(headroom(900 * MIB)));
        let source = Fixed(Arc::clone(&left));
        let pressure = Arc::new(Pressure::new(&config, Box::new(source), Instant::now()));
        let directives = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&directives);
        pressure.direct_to(move |directive| sink.lock().unwrap().push(directive));
        (pressure, left, directives)
    }

    fn controller(config: MemoryConfig) -> (Arc<Pressure>, Directives) {
        let (pressure, _, directives) = controller_with_headroom(config);
        (pressure, directives)
    }

    /// `auto` at a fifth of the test's 1000 MiB limit, 64 MiB set aside for KV caches.
    fn fifth_with_a_small_reserve() -> MemoryConfig {
        MemoryConfig {
            auto_fraction: 0.2,
            kv_reserve: 64 * MIB,
            ..MemoryConfig::default()
        }
    }

    #[test]
    fn auto_is_a_share_of_the_limit_less_the_base_and_the_reserve() {
        assert_eq!(auto_budget(1000, 0.7, 300, 100), 300);
        assert_eq!(auto_budget(1000, 0.5, 600, 100), 0);
        let config = fifth_with_a_small_reserve();
        let (pressure, _) = controller(config.clone());
        // 200 MiB of a 1000 MiB limit, less 100 MiB base and 64 MiB reserve.
        assert_eq!(pressure.model_loaded(model(BudgetKind::Auto)), 36 * MIB);
        // Never more than every expert, nor above max_budget.
        let (pressure, _) = controller(MemoryConfig {
            auto_fraction: 1.0,
            max_budget: Some(Size::Percent(50.0)),
            ..config.clone()
        });
        assert_eq!(pressure.model_loaded(model(BudgetKind::Auto)), 24 * MIB);
        // Never below two layers' routed experts.
        let (pressure, _) = controller(MemoryConfig {
            auto_fraction: 0.01,
            ..config
        });
        assert_eq!(pressure.model_loaded(model(BudgetKind::Auto)), 4 * MIB);
        let stats = pressure.stats(Some(4 * MIB));
        assert_eq!(stats.floor_bytes, Some(4 * MIB));
        assert_eq!(stats.ceiling_bytes, Some(48 * MIB));
        assert_eq!(stats.base_bytes, Some(100 * MIB));
    }

    /// KV caches beyond the reserve come out of an `auto` budget at once, never below the
    /// floor; within the reserve, or with a fixed budget, nothing moves.
    #[test]
    fn kv_caches_beyond_the_reserve_come_out_of_an_auto_budget() {
        let config = fifth_with_a_small_reserve();
        let (pressure, _) = controller(config.clone());
        assert_eq!(pressure.model_loaded(model(BudgetKind::Auto)), 36 * MIB);
        assert_eq!(pressure.kv_cache_bytes(60 * MIB), None);
        assert_eq!(pressure.stats(Some(36 * MIB)).kv_bytes, 60 * MIB);
        // 200 MiB of the limit, less the 100 MiB base and 80 MiB of caches.
        let directive = pressure
            .kv_cache_bytes(80 * MIB)
            .expect("the budget gives way");
        assert_eq!((directive.epoch, directive.budget), (1, 20 * MIB));
        let stats = pressure.stats(Some(20 * MIB));
        assert_eq!(stats.target_bytes, Some(20 * MIB));
        let last = stats.adjustments.last().unwrap();
        assert_eq!((last.from_bytes, last.to_bytes), (36 * MIB, 20 * MIB));
        assert!(
            last.reason.contains("KV caches hold 80.0 MiB"),
            "{}",
            last.reason
        );
        // Caches that take everything leave the floor: two layers' routed experts.
        let directive = pressure.kv_cache_bytes(500 * MIB).unwrap();
        assert_eq!(directive.budget, 4 * MIB);
        // A fixed budget is the user's to keep.
        let (pressure, _) = controller(config);
        pressure.model_loaded(model(BudgetKind::Fixed(30 * MIB)));
        assert_eq!(pressure.kv_cache_bytes(500 * MIB), None);
    }

    #[test]
    fn a_fixed_budget_is_the_start_and_the_ceiling() {
        let (pressure, _) = controller(MemoryConfig::default());
        assert_eq!(
            pressure.model_loaded(model(BudgetKind::Fixed(10 * MIB))),
            10 * MIB
        );
        assert_eq!(pressure.stats(None).ceiling_bytes, Some(10 * MIB));
    }

    #[test]
    fn simulated_critical_shrinks_at_once_and_relieves() {
        let (pressure, directives) = controller(MemoryConfig::default());
        pressure.model_loaded(model(BudgetKind::Fixed(40 * MIB)));
        pressure.simulate(Some(Level::Critical));
        assert_eq!(
            *directives.lock().unwrap(),
            [Directive {
                epoch: 1,
                budget: 24 * MIB,
                relieve: true
            }]
        );
        let stats = pressure.stats(Some(24 * MIB));
        assert_eq!(stats.level, Level::Critical);
        assert!(stats.simulated);
        assert_eq!(stats.adjustments.len(), 1);
        let adjustment = &stats.adjustments[0];
        assert_eq!(
            (adjustment.from_bytes, adjustment.to_bytes),
            (40 * MIB, 24 * MIB)
        );
        assert!(
            adjustment
                .reason
                .starts_with("critical pressure: simulated critical"),
            "{}",
            adjustment.reason
        );
        pressure.simulate(None);
        let stats = pressure.stats(None);
        assert!(!stats.simulated);
        assert_eq!(stats.level, Level::Normal);
    }

    #[test]
    fn the_headroom_sets_the_level() {
        let (pressure, left, directives) = controller_with_headroom(MemoryConfig {
            warn_headroom: Size::Bytes(200 * MIB),
            critical_headroom: Size::Percent(5.0),
            ..MemoryConfig::default()
        });
        pressure.model_loaded(model(BudgetKind::Fixed(40 * MIB)));
        let set = |available: u64| *left.lock().unwrap() = headroom(available);
        set(150 * MIB);
        pressure.observe(None, false);
        assert_eq!(pressure.stats(None).level, Level::Warn);
        assert!(
            directives.lock().unwrap().is_empty(),
            "one warning is not confirmed"
        );
        set(30 * MIB);
        pressure.observe(None, false);
        let stats = pressure.stats(None);
        assert_eq!(stats.level, Level::Critical);
        assert!(stats.reason.contains("below 50.0 MiB"), "{}", stats.reason);
        assert_eq!(directives.lock().unwrap().len(), 1);
        // A PSI event is worse than the headroom: it wins.
        set(900 * MIB);
        std::thread::sleep(SHRINK_SPACING);
        pressure.observe(Some((Level::Critical, "PSI full".into())), false);
        assert_eq!(pressure.stats(None).reason, "PSI full");
        assert_eq!(directives.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_pressure_event_stands_between_quiet_readings() {
        let (pressure, _) = controller(MemoryConfig::default());
        pressure.observe(Some((Level::Warn, "PSI some".into())), false);
        pressure.observe(None, false);
        let stats = pressure.stats(None);
        assert_eq!(stats.level, Level::Warn);
        assert!(stats.reason.starts_with("PSI some ("), "{}", stats.reason);
        // A released simulation is normal at once.
        pressure.simulate(Some(Level::Critical));
        pressure.simulate(None);
        assert_eq!(pressure.stats(None).level, Level::Normal);
    }

    #[test]
    fn without_adapt_the_budget_stays() {
        let (pressure, directives) = controller(MemoryConfig {
            adapt: false,
            ..MemoryConfig::default()
        });
        pressure.model_loaded(model(BudgetKind::Fixed(40 * MIB)));
        pressure.simulate(Some(Level::Critical));
        assert!(directives.lock().unwrap().is_empty());
        assert_eq!(pressure.stats(None).level, Level::Critical);
    }
}
