//! The budget policy: how the expert budget answers memory-pressure readings.
//!
//! Pure bookkeeping, free of clocks, threads and the store, so that it is
//! tested with a fake clock: every reading comes with its time, a [`Duration`]
//! since an arbitrary start.
//!
//! The rules, after what worked for others (see DESIGN.md, "Lessons from the
//! field"):
//!
//! - **Shrink fast, multiplicatively.** A critical reading shrinks the budget
//!   at once by `critical_step` (40% by default). A warn reading shrinks it by
//!   `shrink_step` (20%) once it is confirmed: [`CONFIRMATIONS`] warn (or
//!   critical) readings within [`CONFIRM_WINDOW`]. A single warn can be a blip
//!   (one PSI window that saw a burst of reclaim), and PSI triggers fire at
//!   most once per window, so a real and lasting pressure reads as warn, quiet,
//!   warn: confirmations are counted in a window rather than in a row, or
//!   intermittent pressure would never be acted on.
//! - **At most one shrink per [`SHRINK_SPACING`]**, so a burst of readings
//!   (PSI events and headroom polls arriving together) is one step, and the
//!   step can take effect before the next is decided.
//! - **Grow slowly, additively.** After `quiet` without any warn or critical
//!   reading, the budget grows by `grow_step` of the ceiling (10%), then again
//!   every `grow_interval` while it stays quiet. Multiplicative decrease with
//!   additive increase converges instead of oscillating.
//! - **Grow only into headroom.** A reading that measured headroom says how
//!   much lies above the warn line (`spare`); the budget grows only when twice
//!   the step fits there, so growing cannot itself bring back the warning it
//!   recovered from. That is the hysteresis that keeps a steady signal steady.
//! - **Bounds.** Never below the floor (two layers' routed experts: a token can
//!   still be computed with the next layer's experts arriving) nor above the
//!   ceiling (the configured budget or maximum).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// Warn readings that confirm a pressure worth shrinking for.
pub const CONFIRMATIONS: usize = 2;
/// How close together the confirming readings must be.
pub const CONFIRM_WINDOW: Duration = Duration::from_secs(10);
/// Shortest time between two shrinks.
pub const SHRINK_SPACING: Duration = Duration::from_secs(1);

/// How short the machine (or the daemon's cgroup) is of memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Nothing to do; the budget may grow back after a quiet period.
    #[default]
    Normal,
    /// Memory is getting short: shrink once confirmed.
    Warn,
    /// Memory is about to run out: shrink at once, drop idle KV caches.
    Critical,
}

impl Level {
    /// The level's name on the wire and in the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warn => "warn",
            Level::Critical => "critical",
        }
    }

    /// Reads `normal`, `warn` or `critical`.
    pub fn parse(text: &str) -> Option<Level> {
        [Level::Normal, Level::Warn, Level::Critical]
            .into_iter()
            .find(|level| level.as_str() == text)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The steps and delays of the policy (the `[memory]` keys).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyParams {
    /// Share of the budget a confirmed warning takes away.
    pub shrink_step: f64,
    /// Share of the budget a critical reading takes away.
    pub critical_step: f64,
    /// Share of the ceiling each growth step gives back.
    pub grow_step: f64,
    /// Time without pressure before the budget grows.
    pub quiet: Duration,
    /// Time between growth steps.
    pub grow_interval: Duration,
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyParams {
            shrink_step: 0.2,
            critical_step: 0.4,
            grow_step: 0.1,
            quiet: Duration::from_secs(180),
            grow_interval: Duration::from_secs(30),
        }
    }
}

/// One reading, as the policy sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub level: Level,
    /// Bytes of headroom above the warn line, when measured.
    pub spare: Option<u64>,
}

/// Which way the budget moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Shrink,
    Grow,
}

/// A change of the budget and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub from: u64,
    pub to: u64,
    pub direction: Direction,
    /// Why, in words, e.g. "critical pressure" or "quiet for 180s".
    pub why: String,
}

/// The budget and what the policy remembers of past readings.
#[derive(Clone, Debug)]
pub struct BudgetPolicy {
    params: PolicyParams,
    floor: u64,
    ceiling: u64,
    target: u64,
    /// Times of recent warn and critical readings not yet acted on.
    confirmations: VecDeque<Duration>,
    /// The last warn or critical reading.
    last_pressure: Option<Duration>,
    last_shrink: Option<Duration>,
    last_grow: Option<Duration>,
}

impl BudgetPolicy {
    /// A policy starting at `start`, kept within `floor..=ceiling` (the floor
    /// gives way to a smaller ceiling).
    pub fn new(params: PolicyParams, floor: u64, ceiling: u64, start: u64) -> BudgetPolicy {
        let floor = floor.min(ceiling);
        BudgetPolicy {
            params,
            floor,
            ceiling,
            target: start.clamp(floor, ceiling),
            confirmations: VecDeque::new(),
            last_pressure: None,
            last_shrink: None,
            last_grow: None,
        }
    }

    /// The budget the store should have now.
    pub fn target(&self) -> u64 {
        self.target
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// New bounds (a reloaded budget): the target becomes `start`, within them.
    pub fn rebound(&mut self, floor: u64, ceiling: u64, start: u64) {
        self.floor = floor.min(ceiling);
        self.ceiling = ceiling;
        self.target = start.clamp(self.floor, ceiling);
    }

    /// Lowers the target to at most `most` (never below the floor); growth later goes back up
    /// as it would after a shrink.
    pub fn cap(&mut self, most: u64) {
        self.target = self.target.min(most.max(self.floor));
    }

    /// How long until the budget may grow, if it is below the ceiling and
    /// nothing presses: zero when it may grow now.
    pub fn growth_due(&self, now: Duration) -> Option<Duration> {
        if self.target >= self.ceiling {
            return None;
        }
        let quiet_until = self
            .last_pressure
            .map_or(Duration::ZERO, |t| t + self.params.quiet);
        let spaced_until = self
            .last_grow
            .map_or(Duration::ZERO, |t| t + self.params.grow_interval);
        Some(quiet_until.max(spaced_until).saturating_sub(now))
    }

    /// Takes the reading `seen` at `now`; returns the change of budget it calls
    /// for, if any.
    pub fn observe(&mut self, now: Duration, seen: &Observation) -> Option<Change> {
        match seen.level {
            Level::Critical => {
                self.last_pressure = Some(now);
                self.confirmations.clear();
                self.shrink(now, self.params.critical_step, "critical pressure")
            }
            Level::Warn => {
                self.last_pressure = Some(now);
                while self
                    .confirmations
                    .front()
                    .is_some_and(|&t| now.saturating_sub(t) > CONFIRM_WINDOW)
                {
                    self.confirmations.pop_front();
                }
                self.confirmations.push_back(now);
                if self.confirmations.len() < CONFIRMATIONS {
                    return None;
                }
                let change = self.shrink(now, self.params.shrink_step, "memory pressure (warn)");
                if change.is_some() {
                    self.confirmations.clear();
                }
                change
            }
            Level::Normal => self.grow(now, seen.spare),
        }
    }

    fn shrink(&mut self, now: Duration, step: f64, why: &str) -> Option<Change> {
        if self
            .last_shrink
            .is_some_and(|t| now.saturating_sub(t) < SHRINK_SPACING)
        {
            return None;
        }
        let to = ((self.target as f64 * (1.0 - step)) as u64).max(self.floor);
        if to >= self.target {
            return None;
        }
        self.last_shrink = Some(now);
        // Growth starts over: a new quiet period, then a first step.
        self.last_grow = None;
        Some(self.set(to, Direction::Shrink, why.to_owned()))
    }

    fn grow(&mut self, now: Duration, spare: Option<u64>) -> Option<Change> {
        if self.growth_due(now)? > Duration::ZERO {
            return None;
        }
        let step = ((self.ceiling as f64 * self.params.grow_step) as u64).max(1);
        let to = self.target.saturating_add(step).min(self.ceiling);
        // Growing must leave the headroom above the warn line.
        if spare.is_some_and(|spare| spare < 2 * (to - self.target)) {
            return None;
        }
        self.last_grow = Some(now);
        let quiet = now.saturating_sub(self.last_pressure.unwrap_or_default());
        let why = match self.last_pressure {
            Some(_) => format!("no pressure for {}s", quiet.as_secs()),
            None => "no pressure".to_owned(),
        };
        Some(self.set(to, Direction::Grow, why))
    }

    fn set(&mut self, to: u64, direction: Direction, why: String) -> Change {
        let from = std::mem::replace(&mut self.target, to);
        Change {
            from,
            to,
            direction,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn seen(level: Level) -> Observation {
        Observation { level, spare: None }
    }

    /// 1000 MiB of budget between a 100 MiB floor and the ceiling, growth after
    /// 60 s of quiet, then every 10 s.
    fn policy() -> BudgetPolicy {
        let params = PolicyParams {
            quiet: secs(60.0),
            grow_interval: secs(10.0),
            ..PolicyParams::default()
        };
        BudgetPolicy::new(params, 100 * MIB, 1000 * MIB, 1000 * MIB)
    }

    #[test]
    fn critical_shrinks_on_the_first_reading() {
        let mut policy = policy();
        let change = policy.observe(secs(5.0), &seen(Level::Critical)).unwrap();
        assert_eq!((change.from, change.to), (1000 * MIB, 600 * MIB));
        assert_eq!(change.direction, Direction::Shrink);
        assert!(change.why.contains("critical"), "{}", change.why);
    }

    #[test]
    fn warn_shrinks_on_the_second_reading_within_the_window() {
        let mut policy = policy();
        assert_eq!(policy.observe(secs(0.0), &seen(Level::Warn)), None);
        let change = policy.observe(secs(1.0), &seen(Level::Warn)).unwrap();
        assert_eq!(change.to, 800 * MIB);
        // The next shrink needs two new confirmations.
        assert_eq!(policy.observe(secs(2.0), &seen(Level::Warn)), None);
        assert_eq!(
            policy.observe(secs(3.0), &seen(Level::Warn)).unwrap().to,
            640 * MIB
        );
        // Warnings further apart than the window confirm nothing.
        let mut policy = BudgetPolicy::new(PolicyParams::default(), 0, 100, 100);
        for t in 0..5 {
            assert_eq!(
                policy.observe(
                    CONFIRM_WINDOW * (t + 1) + secs(0.5 * f64::from(t)),
                    &seen(Level::Warn)
                ),
                None
            );
        }
    }

    #[test]
    fn shrinks_are_spaced() {
        let mut policy = policy();
        assert!(policy.observe(secs(0.0), &seen(Level::Critical)).is_some());
        assert_eq!(policy.observe(secs(0.5), &seen(Level::Critical)), None);
        assert_eq!(
            policy
                .observe(secs(1.0), &seen(Level::Critical))
                .unwrap()
                .to,
            360 * MIB
        );
    }

    #[test]
    fn growth_waits_for_the_quiet_period_then_goes_in_steps() {
        let mut policy = policy();
        policy.observe(secs(0.0), &seen(Level::Critical)).unwrap();
        assert_eq!(policy.target(), 600 * MIB);
        // Nothing before 60 s of quiet, however many normal readings.
        let mut t = 0.0;
        while t < 59.9 {
            t += 0.1;
            assert_eq!(policy.observe(secs(t), &seen(Level::Normal)), None, "{t}");
        }
        assert_eq!(policy.growth_due(secs(59.0)), Some(secs(1.0)));
        let change = policy.observe(secs(60.0), &seen(Level::Normal)).unwrap();
        assert_eq!((change.from, change.to), (600 * MIB, 700 * MIB));
        assert_eq!(change.direction, Direction::Grow);
        assert!(change.why.contains("60s"), "{}", change.why);
        // Then one step of 10% of the ceiling every 10 s, up to the ceiling.
        assert_eq!(policy.observe(secs(65.0), &seen(Level::Normal)), None);
        let mut grown = vec![];
        for t in (70..200).step_by(5) {
            if let Some(change) = policy.observe(secs(f64::from(t)), &seen(Level::Normal)) {
                grown.push((t, change.to / MIB));
            }
        }
        assert_eq!(grown, [(70, 800), (80, 900), (90, 1000)]);
        assert_eq!(policy.growth_due(secs(200.0)), None);
    }

    #[test]
    fn pressure_during_the_quiet_period_starts_it_over() {
        let mut policy = policy();
        policy.observe(secs(0.0), &seen(Level::Critical)).unwrap();
        // One unconfirmed warning: no shrink, but the quiet period restarts.
        assert_eq!(policy.observe(secs(50.0), &seen(Level::Warn)), None);
        assert_eq!(policy.observe(secs(61.0), &seen(Level::Normal)), None);
        assert!(policy.observe(secs(110.0), &seen(Level::Normal)).is_some());
    }

    #[test]
    fn the_floor_and_the_ceiling_hold() {
        let mut policy = policy();
        let mut t = 0.0;
        for _ in 0..50 {
            t += 1.0;
            policy.observe(secs(t), &seen(Level::Critical));
        }
        assert_eq!(policy.target(), 100 * MIB);
        assert_eq!(policy.observe(secs(t + 1.0), &seen(Level::Critical)), None);
        for _ in 0..1000 {
            t += 1.0;
            policy.observe(secs(t), &seen(Level::Normal));
        }
        assert_eq!(policy.target(), 1000 * MIB);
        // A start outside the bounds is brought within them; a ceiling below
        // the floor wins.
        assert_eq!(
            BudgetPolicy::new(PolicyParams::default(), 10, 100, 500).target(),
            100
        );
        assert_eq!(
            BudgetPolicy::new(PolicyParams::default(), 10, 100, 1).target(),
            10
        );
        let small = BudgetPolicy::new(PolicyParams::default(), 10, 5, 5);
        assert_eq!((small.floor(), small.target()), (5, 5));
    }

    #[test]
    fn a_noisy_signal_shrinks_monotonically_and_never_ping_pongs() {
        // Normal and warn alternating every 100 ms for ten minutes.
        let mut policy = policy();
        let mut changes = Vec::new();
        for tick in 0..6000u32 {
            let level = if tick % 2 == 0 {
                Level::Normal
            } else {
                Level::Warn
            };
            if let Some(change) = policy.observe(secs(f64::from(tick) * 0.1), &seen(level)) {
                changes.push(change);
            }
        }
        assert!(
            changes.iter().all(|c| c.direction == Direction::Shrink),
            "{changes:?}"
        );
        // 1000 MiB to the 100 MiB floor in 20% steps: 11 steps, then nothing.
        assert_eq!(changes.len(), 11, "{changes:?}");
        assert_eq!(policy.target(), 100 * MIB);
        // The same signal, faster (every 10 ms): no more steps than before.
        let mut policy = policy_at(1000 * MIB);
        let fast = (0..60_000u32)
            .filter_map(|tick| {
                let level = if tick % 2 == 0 {
                    Level::Normal
                } else {
                    Level::Warn
                };
                policy.observe(secs(f64::from(tick) * 0.01), &seen(level))
            })
            .count();
        assert_eq!(fast, 11);
    }

    fn policy_at(start: u64) -> BudgetPolicy {
        let mut policy = policy();
        policy.rebound(100 * MIB, 1000 * MIB, start);
        policy
    }

    #[test]
    fn a_steady_headroom_signal_settles_without_oscillating() {
        // A closed loop: the machine has 700 MiB for the budget before the
        // warn line; above it readings say warn, below it they say how much
        // is spare. Started too high, the budget must settle and stay.
        let mut policy = policy();
        let line = 700 * MIB;
        let mut changes = Vec::new();
        for tick in 0..36_000u32 {
            let now = secs(f64::from(tick) * 0.1);
            let target = policy.target();
            let reading = if target > line {
                seen(Level::Warn)
            } else {
                Observation {
                    level: Level::Normal,
                    spare: Some(line - target),
                }
            };
            if let Some(change) = policy.observe(now, &reading) {
                changes.push((tick, change));
            }
        }
        let flips = changes
            .windows(2)
            .filter(|pair| pair[0].1.direction != pair[1].1.direction)
            .count();
        assert!(flips <= 1, "{changes:?}");
        assert!(policy.target() <= line, "{}", policy.target());
        // After the first minutes the budget no longer moves.
        assert!(changes.iter().all(|(tick, _)| *tick < 6000), "{changes:?}");
    }

    #[test]
    fn rebounding_moves_the_target() {
        let mut policy = policy();
        policy.rebound(100 * MIB, 500 * MIB, 500 * MIB);
        assert_eq!(policy.target(), 500 * MIB);
        assert_eq!(policy.observe(secs(0.0), &seen(Level::Normal)), None);
    }

    #[test]
    fn levels_read_and_print() {
        for level in [Level::Normal, Level::Warn, Level::Critical] {
            assert_eq!(Level::parse(level.as_str()), Some(level));
        }
        assert_eq!(Level::parse("high"), None);
        assert!(Level::Critical > Level::Warn && Level::Warn > Level::Normal);
    }
}
