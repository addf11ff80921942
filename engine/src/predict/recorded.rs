//! Guesses from a recording of the very run being made: the routing that an earlier run of the
//! same model, prompt and fed tokens recorded (`odmoe bench decode --trace-out`). Experts on
//! demand change no logit, so the run routes exactly as recorded and every guess is right.
//! Prefetching from it measures the most any predictor could gain on a machine: what remains
//! once prediction is perfect is the reads' own time and how the store schedules them.
//!
//! The recording is followed forward pass by forward pass. Should the run route otherwise (a
//! different model, prompt or feed), guessing stops at once: no guess is made from a routing
//! the run has left.

use std::collections::BTreeSet;
use std::ops::Range;

use super::Guess;
use super::trace::Trace;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

pub struct RecordedRouting {
    /// Boxed: a trace's config is large beside the other sources a prefetcher holds.
    trace: Box<Trace>,
    /// The token range of each forward pass, in order.
    forwards: Vec<Range<usize>>,
    depth: usize,
    /// The forward pass being run (an index into `forwards`) and the latest layer it routed.
    forward: usize,
    last_layer: Option<usize>,
    /// The run routed otherwise than recorded: no more guesses.
    diverged: bool,
}

impl RecordedRouting {
    /// Guesses `depth` routed layers ahead from `trace`, a recording of `config`'s routing.
    pub fn new(trace: Trace, config: &ModelConfig, depth: usize) -> Result<Self> {
        if depth == 0 {
            return Err(Error::InvalidRequest(
                "prediction depth must be at least 1".into(),
            ));
        }
        let recorded = &trace.config;
        if (
            recorded.num_layers,
            recorded.num_experts,
            recorded.num_experts_per_token,
        ) != (
            config.num_layers,
            config.num_experts,
            config.num_experts_per_token,
        ) {
            return Err(Error::InvalidRequest(format!(
                "the recorded routing is of a model with {} layers of {} experts, {} per token; \
                 this one has {} of {}, {} per token",
                recorded.num_layers,
                recorded.num_experts,
                recorded.num_experts_per_token,
                config.num_layers,
                config.num_experts,
                config.num_experts_per_token
            )));
        }
        let forwards = trace.forwards().into_iter().map(|(r, _)| r).collect();
        Ok(Self {
            trace: Box::new(trace),
            forwards,
            depth,
            forward: 0,
            last_layer: None,
            diverged: false,
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn num_layers(&self) -> usize {
        self.trace.num_layers()
    }

    /// The distinct experts `tokens` routed to at `layer`, as recorded, ascending.
    fn recorded(&self, tokens: Range<usize>, layer: usize) -> Vec<usize> {
        let experts: BTreeSet<usize> = tokens
            .flat_map(|t| self.trace.ids(t, layer))
            .map(|&e| e as usize)
            .collect();
        experts.into_iter().collect()
    }

    /// `layer` routed the `positions` tokens of the current forward pass to `routed` (distinct,
    /// ascending). A layer at or before the previous one starts the next forward pass.
    pub fn follow(&mut self, layer: usize, routed: &[usize], positions: usize) {
        if self.last_layer.is_some_and(|last| layer <= last) {
            self.forward += 1;
        }
        self.last_layer = Some(layer);
        self.diverged = self.diverged
            || self.forwards.get(self.forward).is_none_or(|range| {
                range.len() != positions || self.recorded(range.clone(), layer) != routed
            });
    }

    /// The experts of the `depth` routed layers after `layer`, the latest one followed, as
    /// recorded: each a guess of score 1. None once the run has left the recording.
    pub fn guesses(&self, layer: usize) -> Vec<Guess> {
        let range = match self.forwards.get(self.forward) {
            Some(range) if !self.diverged => range.clone(),
            _ => return Vec::new(),
        };
        let last = range.end - 1;
        let mut guesses = Vec::new();
        let (mut depth, mut ahead) = (0, 0);
        while depth < self.depth {
            ahead += 1;
            let Some((token, target)) = self.trace.step_after(last, layer, ahead) else {
                break;
            };
            if !self.trace.config.is_moe_layer(target) {
                continue;
            }
            depth += 1;
            // Within this pass every position routes the layer; past its last layer, the next
            // pass does, with all of its positions.
            let tokens = if token <= last {
                range.clone()
            } else {
                match self.forwards.get(self.forward + 1) {
                    Some(next) => next.clone(),
                    None => break,
                }
            };
            guesses.extend(
                self.recorded(tokens, target)
                    .into_iter()
                    .map(|expert| Guess {
                        depth,
                        layer: target,
                        expert,
                        score: 1.0,
                    }),
            );
        }
        guesses
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ExpertSizes;

    /// Two layers of four experts, two per token: a prefill of two tokens, then two decode passes.
    fn recording() -> Trace {
        let config = ModelConfig {
            num_layers: 2,
            num_experts: 4,
            num_experts_per_token: 2,
            ..ModelConfig::default()
        };
        let mut trace = Trace::new(config, ExpertSizes::Same(1), "test".into());
        // Per token, layer 0's experts then layer 1's.
        let tokens: [[u32; 4]; 4] = [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]];
        for (t, ids) in tokens.iter().enumerate() {
            trace.ids.extend(ids);
            trace.weights.extend([0.5; 4]);
            trace.prompt_index.push(0);
            trace.forward.push(t.saturating_sub(1) as u32);
        }
        trace
    }

    fn experts(guesses: &[Guess]) -> Vec<(usize, usize, usize)> {
        guesses
            .iter()
            .map(|g| (g.depth, g.layer, g.expert))
            .collect()
    }

    #[test]
    fn it_guesses_what_the_next_layers_route_as_recorded_pass_by_pass() {
        let trace = recording();
        let mut recorded = RecordedRouting::new(trace.clone(), &trace.config, 2).unwrap();
        // The prefill's layer 0 (tokens 0 and 1): its layer 1 takes both tokens' experts, the
        // next pass's layer 0 token 2's.
        recorded.follow(0, &[0, 1, 2], 2);
        assert_eq!(
            experts(&recorded.guesses(0)),
            vec![(1, 1, 0), (1, 1, 2), (1, 1, 3), (2, 0, 2), (2, 0, 3)]
        );
        recorded.follow(1, &[0, 2, 3], 2);
        assert_eq!(
            experts(&recorded.guesses(1)),
            vec![(1, 0, 2), (1, 0, 3), (2, 1, 0), (2, 1, 1)]
        );
        // Token 2's pass; at its last layer, token 3's pass is next.
        recorded.follow(0, &[2, 3], 1);
        recorded.follow(1, &[0, 1], 1);
        assert_eq!(
            experts(&recorded.guesses(1)),
            vec![(1, 0, 0), (1, 0, 3), (2, 1, 1), (2, 1, 2)]
        );
        // Token 3's pass is the recording's last: nothing follows it.
        recorded.follow(0, &[0, 3], 1);
        assert_eq!(experts(&recorded.guesses(0)), vec![(1, 1, 1), (1, 1, 2)]);
        recorded.follow(1, &[1, 2], 1);
        assert!(recorded.guesses(1).is_empty());
    }

    #[test]
    fn a_run_that_leaves_the_recording_gets_no_more_guesses() {
        let trace = recording();
        type Step = (usize, &'static [usize], usize);
        // A layer routed otherwise, then the recording's next pass: guessing does not resume.
        // A pass of another length, then the prefill's layer 1 as recorded. A pass past the
        // recording's end.
        let runs: [(&[Step], Option<Step>); 3] = [
            (
                &[(0, &[0, 1, 2], 2), (1, &[0, 1], 2)],
                Some((0, &[2, 3], 1)),
            ),
            (&[(0, &[0, 1, 2], 1)], Some((1, &[0, 2, 3], 2))),
            (
                &[
                    (0, &[0, 1, 2], 2),
                    (1, &[0, 2, 3], 2),
                    (0, &[2, 3], 1),
                    (1, &[0, 1], 1),
                    (0, &[0, 3], 1),
                    (1, &[1, 2], 1),
                    (0, &[0, 3], 1),
                ],
                None,
            ),
        ];
        for (steps, then) in runs {
            let mut recorded = RecordedRouting::new(trace.clone(), &trace.config, 1).unwrap();
            for &(layer, routed, positions) in steps {
                recorded.follow(layer, routed, positions);
            }
            let (layer, ..) = steps[steps.len() - 1];
            assert!(recorded.guesses(layer).is_empty(), "{steps:?}");
            if let Some((layer, routed, positions)) = then {
                recorded.follow(layer, routed, positions);
                assert!(recorded.guesses(layer).is_empty(), "{steps:?}");
            }
        }
        let other = ModelConfig {
            num_experts: 8,
            ..trace.config.clone()
        };
        assert!(RecordedRouting::new(trace.clone(), &other, 1).is_err());
        assert!(RecordedRouting::new(trace.clone(), &trace.config, 0).is_err());
    }
}
