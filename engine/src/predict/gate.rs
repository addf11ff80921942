//! When prefetch is on. Whether guesses pay depends on the machine as much as on the guesses:
//! the same prefetcher made decode 1.26x faster on one machine and 0.83x on another, where
//! reads were the bottleneck and every wrong guess took disk time from a demand read. Guesses
//! are now read only in the disk's idle time and stop once shown wrong (see the store), so
//! prefetch costs little by construction: at a 2 GB limit on that machine it made decode 1.35x
//! faster. So the live gate starts with prefetch on and measures: once decode steps report
//! their time, it compares a window without prefetch against the mean of the windows with it
//! just before and just after, turns prefetch off only if it was clearly slower, and measures
//! the other mode again after a hold that doubles while the verdict repeats. Each window after a
//! switch starts counting only once the cache has settled: a window right after prefetch was on
//! still holds the experts its guesses brought in, and measured at once it made prefetch look
//! 4-17% slower in runs where, run against run, it was faster. (A first comparison of one-token
//! windows, on and off in turn, judged by noise: windows of a few tokens differ by a third from
//! the disk alone.)
//! Without times (trace replay, prefill), it weighs used against wasted prefetches, as before.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Prefetch goes off only if its windows are more than this much slower than those without.
const TOLERANCE: f64 = 0.05;
/// The longest hold, in windows, between two measurements of the mode not chosen.
const MAX_HOLD_WINDOWS: usize = 64;
/// Windows with prefetch on before the first one without it, besides the window that is the
/// first's "before": the first comparison comes after two windows (32 tokens), not after a
/// whole hold (64). Where prefetch loses (reads bound by bytes, where every wrong guess is time),
/// those tokens are what the gate costs: with reads held to 0.8 GB/s, 256 tokens under the 2 GB
/// limit's expert budget (`odmoe bench decode`) went from 0.93x to 0.96x of prefetch off on
/// uniform routing and from 0.92x to 0.97x on skewed. Where it wins, the window without it only
/// comes sooner.
const FIRST_HOLD_WINDOWS: usize = 1;

/// When the [`PrefetchGate`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateConfig {
    /// Steps (layers run) the used/wasted balance is summed over, and each timed window.
    pub window: usize,
    /// Resolved prefetches (used or wasted) needed in the window before deciding.
    pub min_events: u64,
    /// Steps a verdict of the timed gate holds before the mode not chosen is measured again
    /// (the first measurement comes sooner, see [`FIRST_HOLD_WINDOWS`]); without times, steps
    /// prefetch stays off before it is tried again.
    pub probe_after: usize,
    /// Steps after a switch that no window counts: the cache still holds what the other mode
    /// brought in (guesses' experts, or their absence).
    pub settle: usize,
}

impl GateConfig {
    /// Windows scaled to the model: 16 tokens' layers to judge, after 8 to settle (at a 2 GB
    /// limit a token reads about 45 of the 390 experts held, so 8 tokens turn most of them
    /// over), 64 tokens' layers to hold.
    pub fn for_layers(num_layers: usize) -> Self {
        Self {
            window: 16 * num_layers.max(1),
            min_events: 8,
            probe_after: 64 * num_layers.max(1),
            settle: 8 * num_layers.max(1),
        }
    }

    /// Windows a first verdict holds for: `probe_after` in windows, at least one.
    fn hold_windows(&self) -> usize {
        (self.probe_after / self.window.max(1)).max(1)
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
#[derive(Clone, Debug)]
struct Timing {
    /// Mean decode step time of the latest window with prefetch on, and off; at a verdict, the
    /// two it compared (the chosen mode's the mean of its windows either side of the other's).
    on_s: Option<f64>,
    off_s: Option<f64>,
    /// The window being measured: decode steps and their summed time.
    steps: usize,
    sum_s: f64,
    /// The mode chosen (on until a comparison says otherwise).
    chosen: bool,
    /// Mean step time of the latest window in the chosen mode.
    chosen_s: Option<f64>,
    /// Mean step time of the window just measured in the other mode, until the chosen mode's
    /// window after it ends.
    other_s: Option<f64>,
    /// Windows left before the mode not chosen is measured again.
    hold: usize,
    /// Windows the latest verdict holds for.
    hold_len: usize,
    /// Steps left before the window after a switch starts counting.
    settling: usize,
}

impl PrefetchGate {
    pub fn new(config: GateConfig) -> Self {
        let hold = config.hold_windows();
        Self {
            config,
            enabled: true,
            window: VecDeque::new(),
            used: 0,
            wasted: 0,
            off_steps: 0,
            timing: Timing {
                on_s: None,
                off_s: None,
                steps: 0,
                sum_s: 0.0,
                chosen: true,
                chosen_s: None,
                other_s: None,
                hold: FIRST_HOLD_WINDOWS,
                hold_len: hold,
                settling: 0,
            },
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
        let t = &self.timing;
        match decode_step_s {
            Some(seconds) => self.timed(seconds),
            None if t.on_s.is_some() || t.off_s.is_some() || t.steps > 0 => self.enabled,
            None => self.step(used, wasted),
        }
    }

    /// One timed decode step: a window closes every `config.window` of them.
    fn timed(&mut self, seconds: f64) -> bool {
        let t = &mut self.timing;
        if t.settling > 0 {
            t.settling -= 1;
            return self.enabled;
        }
        t.steps += 1;
        t.sum_s += seconds;
        if t.steps < self.config.window.max(1) {
            return self.enabled;
        }
        let mean = t.sum_s / t.steps as f64;
        (t.steps, t.sum_s) = (0, 0.0);
        if self.enabled {
            t.on_s = Some(mean);
        } else {
            t.off_s = Some(mean);
        }
        let next = if self.enabled != t.chosen {
            // The other mode's window ends: the chosen mode's next window brackets it.
            t.other_s = Some(mean);
            t.chosen
        } else if let (Some(other), Some(before)) = (t.other_s.take(), t.chosen_s) {
            // Decide on the other mode's window against the mean of the chosen mode's windows
            // on either side: a disk that grows faster or slower from window to window weighs
            // on both alike.
            let chosen = (before + mean) / 2.0;
            let (on, off) = if t.chosen {
                (chosen, other)
            } else {
                (other, chosen)
            };
            (t.on_s, t.off_s) = (Some(on), Some(off));
            let verdict = on <= off * (1.0 + TOLERANCE);
            let base = self.config.hold_windows();
            t.hold_len = if t.chosen == verdict {
                (t.hold_len * 2).clamp(base, MAX_HOLD_WINDOWS)
            } else {
                base
            };
            t.chosen_s = (t.chosen == verdict).then_some(mean);
            t.chosen = verdict;
            t.hold = t.hold_len;
            verdict
        } else {
            t.chosen_s = Some(mean);
            if t.hold > 0 {
                t.hold -= 1;
                self.enabled
            } else {
                // The hold is over: measure the other mode.
                !self.enabled
            }
        };
        if next != self.enabled {
            self.enabled = next;
            t.settling = self.config.settle;
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
            min_events: 4,
            probe_after: 3,
            settle: 0,
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
            min_events: 1,
            probe_after: 4,
            settle: 0,
        });
        // Prefetch on: steps of 1.0 s; off: 0.8 s. Wasted prefetches no longer matter.
        let mut modes = Vec::new();
        let mut on = true;
        for _ in 0..40 {
            on = gate.step_timed(0, 9, Some(if on { 1.0 } else { 0.8 }));
            modes.push(on);
        }
        // Steps run without prefetch (the step before the first call ran with it): after two
        // windows on, one to measure, then one on again to bracket it; then the verdict's
        // window and holds of 2 and 4 windows, with a window on to measure and one off to
        // bracket it after each.
        let off_steps: Vec<usize> = (0..modes.len()).filter(|&i| !modes[i]).collect();
        let expected: Vec<usize> = [3..5, 7..13, 15..27, 29..40]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(off_steps, expected);
        // Faster with prefetch: it comes back on and stays.
        for _ in 0..40 {
            on = gate.step_timed(0, 9, Some(if on { 0.5 } else { 0.8 }));
        }
        assert!(gate.enabled());
        // Untimed steps (prefill) keep the mode once times decide.
        assert!(gate.step_timed(0, 100, None));
    }

    /// Prefetch stays on when it is a little slower, within what windows of one machine's
    /// decode differ by; it goes off when it is clearly slower.
    #[test]
    fn timed_the_first_window_without_prefetch_comes_after_two_not_a_whole_hold() {
        let mut gate = PrefetchGate::new(GateConfig {
            window: 2,
            min_events: 1,
            probe_after: 8,
            settle: 0,
        });
        let modes: Vec<bool> = (0..24).map(|_| gate.step_timed(0, 0, Some(1.0))).collect();
        let off_steps: Vec<usize> = (0..modes.len()).filter(|&i| !modes[i]).collect();
        // Two windows on (the step before the first call ran with it), one off, one on to
        // bracket it; equal times keep prefetch on, and the verdict's hold (twice the 4
        // windows of `probe_after`, since it repeats the start's) outlasts the steps run.
        assert_eq!(off_steps, vec![3, 4]);
    }

    #[test]
    fn timed_prefetch_goes_off_only_when_clearly_slower() {
        let config = GateConfig {
            window: 4,
            min_events: 1,
            probe_after: 8,
            settle: 0,
        };
        for (on_s, stays_on) in [(1.03, true), (1.2, false)] {
            let mut gate = PrefetchGate::new(config);
            let mut on = true;
            for _ in 0..16 {
                on = gate.step_timed(0, 0, Some(if on { on_s } else { 1.0 }));
            }
            assert_eq!(gate.enabled(), stays_on, "{on_s}");
            assert_eq!(gate.decode_step_s(), (Some(on_s), Some(1.0)));
        }
    }

    /// A disk that reads faster from window to window (the cache warming, another process
    /// ending) makes any later window look faster. Prefetch 10% faster stays on, though the
    /// window without it comes after the one with it and each is 15% faster than the last.
    #[test]
    fn timed_a_drifting_disk_weighs_on_both_modes_alike() {
        let config = GateConfig {
            window: 1,
            min_events: 1,
            probe_after: 2,
            settle: 0,
        };
        let mut gate = PrefetchGate::new(config);
        let mut on = true;
        for window in 0..4 {
            let drift = 0.85f64.powi(window);
            on = gate.step_timed(0, 0, Some(drift * if on { 0.9 } else { 1.0 }));
        }
        // Windows on, on, off, on: the off one (0.72 s) against 0.77 s before and 0.55 s after.
        assert!(on && gate.enabled());
        let (on_s, off_s) = gate.decode_step_s();
        assert!(on_s.unwrap() < off_s.unwrap(), "{on_s:?} {off_s:?}");
        // Against the window before it alone, off would have looked faster by more than the
        // tolerance.
        assert!(0.9 * 0.85 > 0.85f64.powi(2) * (1.0 + TOLERANCE));
    }

    /// A window without prefetch right after it was on still holds the experts its guesses
    /// brought in, and runs fast for a while. Prefetch 10% faster stays on once that settles
    /// before the window counts; measured at once, it went off.
    #[test]
    fn timed_windows_after_a_switch_count_once_the_cache_settles() {
        for (settle, stays_on) in [(3, true), (0, false)] {
            let mut gate = PrefetchGate::new(GateConfig {
                window: 4,
                min_events: 1,
                probe_after: 8,
                settle,
            });
            let mut on = true;
            let mut since_switch = 0;
            for _ in 0..24 {
                // Off: 1.0 s a step, but 0.5 s for the three steps after prefetch was on.
                let seconds = match (on, since_switch) {
                    (true, _) => 0.9,
                    (false, 0..3) => 0.5,
                    (false, _) => 1.0,
                };
                let next = gate.step_timed(0, 0, Some(seconds));
                since_switch = if next == on { since_switch + 1 } else { 0 };
                on = next;
            }
            assert!(gate.switched_off >= 1, "settle {settle}: it measured");
            assert_eq!(gate.enabled(), stays_on, "settle {settle}");
        }
    }
}
