//! When prefetch is on. Whether guesses pay depends on the machine as much as on the guesses:
//! the same prefetcher made decode 1.26x faster on one machine and 0.83x on another, where
//! reads were the bottleneck and every wrong guess took disk time from a demand read. So the
//! live gate measures: once decode steps report their time, it compares windows with prefetch
//! on and off and keeps the faster, measuring the other again after a hold that doubles while
//! the verdict repeats. The first comparison is short (a few tokens each way), since until it
//! is made every step may run in the slower mode; later ones are long, to be sure. It measures
//! the first mode twice, before and after the other, since decode's first steps miss most while
//! the cache warms, and the mode measured first would otherwise carry all of that. Without
//! times (trace replay, prefill), it weighs used against wasted prefetches, as before.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Prefetch stays on only if its windows are at least this much faster than those without:
/// equal speed goes to fewer reads.
const MARGIN: f64 = 0.02;
/// The longest hold, in windows, between two measurements of the mode not chosen.
const MAX_HOLD_WINDOWS: usize = 64;

/// When the [`PrefetchGate`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateConfig {
    /// Steps (layers run) the used/wasted balance is summed over, and each timed window after
    /// the first comparison.
    pub window: usize,
    /// Steps of each of the first comparison's three timed windows.
    pub first_window: usize,
    /// Resolved prefetches (used or wasted) needed in the window before deciding.
    pub min_events: u64,
    /// Steps prefetch stays off before it is tried again.
    pub probe_after: usize,
}

impl GateConfig {
    /// Windows scaled to the model: 16 tokens' layers to judge (the first time, 3), 64
    /// tokens' layers off.
    pub fn for_layers(num_layers: usize) -> Self {
        Self {
            window: 16 * num_layers.max(1),
            first_window: 3 * num_layers.max(1),
            min_events: 8,
            probe_after: 64 * num_layers.max(1),
        }
    }
}

/// Switches prefetch on and off: by measured decode speed once there is any (see the module
/// documentation), else off while, over a sliding window, more prefetches are wasted (evicted
/// unused) than used, and back on for a probe after a while; the probe stays on if it pays.
#[derive(Clone, Debug)]
pub struct PrefetchGate {
    config: GateConfig,
    enabled: bool,
    window: VecDeque<(u64, u64)>,
    used: u64,
    wasted: u64,
    off_steps: usize,
    timing: Timing,
    pub switched_off: u64,
    pub switched_on: u64,
}

/// The speed comparison of prefetch on and off.
#[derive(Clone, Debug, Default)]
struct Timing {
    /// Mean decode step time of the latest window with prefetch on, and off.
    on_s: Option<f64>,
    off_s: Option<f64>,
    /// The first comparison's windows so far, in order: whether prefetch was on, and the mean
    /// step time.
    opening: Vec<(bool, f64)>,
    /// The window being measured: decode steps and their summed time.
    steps: usize,
    sum_s: f64,
    /// The mode chosen by the latest comparison (None before the first).
    chosen: Option<bool>,
    /// Windows left before the mode not chosen is measured again.
    hold: usize,
    /// Windows the latest verdict holds for.
    hold_len: usize,
}

impl PrefetchGate {
    pub fn new(config: GateConfig) -> Self {
        Self {
            config,
            enabled: true,
            window: VecDeque::new(),
            used: 0,
            wasted: 0,
            off_steps: 0,
            timing: Timing::default(),
            switched_off: 0,
            switched_on: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The mean decode step time, in seconds, of the latest window measured with prefetch on
    /// and off (None until measured).
    pub fn decode_step_s(&self) -> (Option<f64>, Option<f64>) {
        (self.timing.on_s, self.timing.off_s)
    }

    /// Advances one step with the prefetches resolved since the last one and, for a decode step
    /// that was timed, how long the previous step took; returns whether prefetch is on for this
    /// step. Once any decode step is timed, times decide and the prefetch counts no longer do.
    pub fn step_timed(&mut self, used: u64, wasted: u64, decode_step_s: Option<f64>) -> bool {
        match decode_step_s {
            Some(seconds) => self.timed(seconds),
            None if !self.timing.opening.is_empty() || self.timing.steps > 0 => self.enabled,
            None => self.step(used, wasted),
        }
    }

    /// One timed decode step: a window closes every `config.window` of them.
    fn timed(&mut self, seconds: f64) -> bool {
        let t = &mut self.timing;
        t.steps += 1;
        t.sum_s += seconds;
        let window = match t.chosen {
            None => self.config.first_window,
            Some(_) => self.config.window,
        };
        if t.steps < window.max(1) {
            return self.enabled;
        }
        let mean = t.sum_s / t.steps as f64;
        (t.steps, t.sum_s) = (0, 0.0);
        if t.chosen.is_none() {
            // The first comparison: each mode's mean over its windows of the three.
            t.opening.push((self.enabled, mean));
            let mean_of = |on: bool| {
                let (sum, count) = t
                    .opening
                    .iter()
                    .filter(|window| window.0 == on)
                    .fold((0.0, 0), |(sum, count), window| (sum + window.1, count + 1));
                (count > 0).then(|| sum / count as f64)
            };
            (t.on_s, t.off_s) = (mean_of(true), mean_of(false));
        } else if self.enabled {
            t.on_s = Some(mean);
        } else {
            t.off_s = Some(mean);
        }
        let next = match (t.on_s, t.off_s, t.chosen) {
            // The first comparison's other mode, then the first again.
            _ if t.chosen.is_none() && t.opening.len() < 3 => !self.enabled,
            (Some(on), Some(off), chosen) if chosen.is_none() || chosen != Some(self.enabled) => {
                // A measurement of the mode not chosen (or the first comparison) ends: decide.
                let verdict = on < off * (1.0 - MARGIN);
                let base = (self.config.probe_after / self.config.window.max(1)).max(1);
                t.hold_len = if chosen == Some(verdict) {
                    (t.hold_len * 2).clamp(base, MAX_HOLD_WINDOWS)
                } else {
                    base
                };
                t.chosen = Some(verdict);
                t.hold = t.hold_len;
                verdict
            }
            _ if t.hold > 0 => {
                t.hold -= 1;
                self.enabled
            }
            // The hold is over: measure the other mode again.
            _ => !self.enabled,
        };
        if next != self.enabled {
            self.enabled = next;
            if next {
                self.switched_on += 1;
            } else {
                self.switched_off += 1;
            }
        }
        self.enabled
    }

    /// Advances one step with the prefetches resolved since the last one; returns whether
    /// prefetch is on for this step.
    pub fn step(&mut self, used: u64, wasted: u64) -> bool {
        if self.enabled {
            self.window.push_back((used, wasted));
            self.used += used;
            self.wasted += wasted;
            while self.window.len() > self.config.window {
                let (u, w) = self.window.pop_front().unwrap();
                self.used -= u;
                self.wasted -= w;
            }
            if self.used + self.wasted >= self.config.min_events && self.wasted > self.used {
                self.enabled = false;
                self.off_steps = 0;
                self.switched_off += 1;
                self.clear();
            }
        } else {
            self.off_steps += 1;
            if self.off_steps >= self.config.probe_after {
                self.enabled = true;
                self.switched_on += 1;
                self.clear();
            }
        }
        self.enabled
    }

    fn clear(&mut self) {
        self.window.clear();
        self.used = 0;
        self.wasted = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_switches_off_when_wasteful_and_probes_back() {
        let mut gate = PrefetchGate::new(GateConfig {
            window: 4,
            first_window: 4,
            min_events: 4,
            probe_after: 3,
        });
        assert!(gate.step(1, 1));
        assert!(gate.step(0, 1)); // 1 used, 2 wasted: too few events yet
        assert!(!gate.step(0, 1)); // 1 used, 3 wasted: off
        assert!(!gate.step(5, 0)); // resolutions while off do not count
        assert!(!gate.step(0, 0));
        assert!(gate.step(0, 0)); // probe
        assert!(gate.step(3, 1)); // pays: stays on
        assert!(gate.step(0, 1));
        assert_eq!((gate.switched_off, gate.switched_on), (1, 1));
    }

    #[test]
    fn timed_the_gate_keeps_the_faster_mode_and_measures_the_other_less_and_less() {
        let mut gate = PrefetchGate::new(GateConfig {
            window: 2,
            first_window: 2,
            min_events: 1,
            probe_after: 2,
        });
        // Prefetch on: steps of 1.0 s; off: 0.8 s. Wasted prefetches no longer matter.
        let mut modes = Vec::new();
        let mut on = true;
        for _ in 0..40 {
            on = gate.step_timed(0, 9, Some(if on { 1.0 } else { 0.8 }));
            modes.push(on);
        }
        // Steps run with prefetch on: the first comparison's two windows (the step before the
        // first call ran on too), then one window's measurement after holds of 1, 2 and 4
        // windows off.
        let on_steps: Vec<usize> = (0..modes.len()).filter(|&i| modes[i]).collect();
        assert_eq!(on_steps, vec![0, 3, 4, 9, 10, 17, 18, 29, 30]);
        assert!(!gate.enabled());
        // Faster with prefetch: it comes back on and stays.
        for _ in 0..40 {
            on = gate.step_timed(0, 9, Some(if on { 0.5 } else { 0.8 }));
        }
        assert!(gate.enabled());
        // Untimed steps (prefill) keep the mode once times decide.
        assert!(gate.step_timed(0, 100, None));
    }

    #[test]
    fn timed_the_first_comparison_is_short_and_the_later_ones_long() {
        let mut gate = PrefetchGate::new(GateConfig {
            window: 4,
            first_window: 2,
            min_events: 1,
            probe_after: 8,
        });
        let mut modes = Vec::new();
        let mut on = true;
        for _ in 0..24 {
            on = gate.step_timed(0, 0, Some(if on { 1.0 } else { 0.8 }));
            modes.push(on);
        }
        // Two steps on, two off, two on, then off through a hold of two long windows, then a
        // long window on to measure again.
        let on_steps: Vec<usize> = (0..modes.len()).filter(|&i| modes[i]).collect();
        assert_eq!(on_steps, vec![0, 3, 4, 17, 18, 19, 20]);
    }

    /// Decode's first steps are slow in either mode while the cache warms: measured first and
    /// alone, prefetch would carry all of that and lose to a mode 20% slower.
    #[test]
    fn timed_the_first_mode_is_measured_before_and_after_the_other() {
        let mut gate = PrefetchGate::new(GateConfig {
            window: 4,
            first_window: 2,
            min_events: 1,
            probe_after: 8,
        });
        let mut on = true;
        for step in 0..6 {
            let warming = (3.0 - 0.4 * step as f64).max(1.0);
            on = gate.step_timed(0, 0, Some(warming * if on { 0.8 } else { 1.0 }));
        }
        // On: 2.24 s then 0.96 s a step; off between them: 2.0 s.
        assert!(on && gate.enabled());
        let (on_s, off_s) = gate.decode_step_s();
        assert!(on_s.unwrap() < off_s.unwrap(), "{on_s:?} {off_s:?}");
    }
}
