//! The sparse MoE block's routing: router, scores (softmax, or DeepSeek's sigmoid with
//! group-limited choice), top-k, optional renormalisation; then the chosen experts (applied by
//! [`expert::apply`]) and the shared experts.
//!
//! Experts reach the block only through [`ExpertProvider`], so where they live (all resident, or
//! read on demand into a byte-budgeted store) never shows in the model files.

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module};

use super::readback;
use crate::error::Result;
use crate::expert::{self, ExpertForm, ExpertProvider, GluMlp};

/// The experts chosen for each position of one layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    /// `ids[t]`: experts of position t, by descending weight.
    pub ids: Vec<Vec<usize>>,
    /// `weights[t]`: their routing weights, as applied to the expert outputs.
    pub weights: Vec<Vec<f32>>,
}

/// An always-on expert, resident, added to the routed experts' output: scaled by a sigmoid gate
/// (Qwen2-MoE) or as it is (DeepSeek-V3).
#[derive(Clone, Debug)]
pub struct SharedExpert {
    pub mlp: GluMlp,
    pub gate: Option<Linear>,
}

/// How router logits become the scores that choose experts and weigh them.
#[derive(Clone, Debug)]
pub enum Scoring {
    /// Softmax over all experts; the top-k probabilities are the weights.
    Softmax,
    /// DeepSeek-V3: sigmoid scores. Experts are chosen by score plus `bias`, only inside the
    /// `topk_group` groups (of `n_group` equal, contiguous groups) whose two best biased scores
    /// sum highest; their weights are the unbiased scores (renormalised when configured) times
    /// `scale`.
    GroupLimitedSigmoid {
        bias: Vec<f32>,
        n_group: usize,
        topk_group: usize,
        scale: f32,
    },
}

#[derive(Clone, Debug)]
pub struct MoeBlock {
    pub layer: usize,
    pub router: Linear,
    pub scoring: Scoring,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Sum the chosen experts with weight one (experts split from a dense feed-forward).
    pub unit_weights: bool,
    /// The routed experts' gating and biases.
    pub expert_form: ExpertForm,
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// Routes `x` `[T, hidden]` and mixes the chosen experts' outputs.
    pub fn forward(&self, x: &Tensor, experts: &dyn ExpertProvider) -> Result<(Tensor, Routing)> {
        let (routing, _) = self.route_reading(x, &[])?;
        Ok((self.mix(x, &routing, experts)?, routing))
    }

    /// Routes `x` `[T, hidden]`, reading back the rows of each of `also` (`[T, n]` tensors on
    /// `x`'s device) in the same read as the routing scores.
    pub fn route_reading(
        &self,
        x: &Tensor,
        also: &[&Tensor],
    ) -> Result<(Routing, Vec<Vec<Vec<f32>>>)> {
        let scores = self.scores(x)?;
        let mut read = readback::rows(&[&[&scores], also].concat())?;
        let scores = read.remove(0);
        Ok((self.route(&scores), read))
    }

    /// The chosen experts' outputs on `x` `[T, hidden]`, mixed by their routing weights, plus
    /// the shared experts'.
    pub fn mix(
        &self,
        x: &Tensor,
        routing: &Routing,
        experts: &dyn ExpertProvider,
    ) -> Result<Tensor> {
        let mut out = expert::apply(
            experts,
            self.layer,
            x,
            &routing.ids,
            &routing.weights,
            &self.expert_form,
        )?;
        if let Some(shared) = &self.shared {
            let y = shared.mlp.forward(x)?;
            let y = match &shared.gate {
                Some(gate) => y.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(x)?)?)?,
                None => y,
            };
            out = (out + y)?;
        }
        Ok(out)
    }

    /// Routing scores `[T, experts]` in f32: softmax probabilities, or sigmoid scores.
    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.router.forward(&x.to_dtype(DType::F32)?)?;
        Ok(match self.scoring {
            Scoring::Softmax => candle_nn::ops::softmax_last_dim(&logits)?,
            Scoring::GroupLimitedSigmoid { .. } => candle_nn::ops::sigmoid(&logits)?,
        })
    }

    /// What the choice of experts ranks for one position, from its [`scores`](Self::scores):
    /// the scores, or for group-limited routing the biased scores with experts outside the
    /// chosen groups at minus infinity. The lookahead predictor ranks the same way.
    pub fn choice_row(&self, scores: &[f32]) -> Vec<f32> {
        let Scoring::GroupLimitedSigmoid {
            bias,
            n_group,
            topk_group,
            ..
        } = &self.scoring
        else {
            return scores.to_vec();
        };
        let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        let size = choice.len() / n_group;
        let group_scores: Vec<f32> = choice
            .chunks(size)
            .map(|group| {
                let best = top_indices(group, 2);
                group[best[0]] + group[best[1]]
            })
            .collect();
        let kept = top_indices(&group_scores, *topk_group);
        for (g, group) in choice.chunks_mut(size).enumerate() {
            if !kept.contains(&g) {
                group.fill(f32::NEG_INFINITY);
            }
        }
        choice
    }

    /// Top-k of each row of routing scores, with weights as the scoring defines them.
    fn route(&self, scores: &[Vec<f32>]) -> Routing {
        let mut routing = Routing::default();
        for row in scores {
            let mut order = top_indices(&self.choice_row(row), self.top_k);
            let mut weights: Vec<f32> = order.iter().map(|&e| row[e]).collect();
            if self.unit_weights {
                weights.iter_mut().for_each(|w| *w = 1.0);
            } else if let Scoring::GroupLimitedSigmoid { scale, .. } = self.scoring {
                // The bias only chose: list the experts by the weight they carry.
                let mut by_weight: Vec<(usize, f32)> = order.into_iter().zip(weights).collect();
                by_weight.sort_by(|a, b| b.1.total_cmp(&a.1));
                (order, weights) = by_weight.into_iter().unzip();
                if self.norm_topk_prob {
                    // transformers adds 1e-20 against an all-zero sum.
                    let sum = weights.iter().sum::<f32>() + 1e-20;
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                weights.iter_mut().for_each(|w| *w *= scale);
            } else if self.norm_topk_prob {
                let sum: f32 = weights.iter().sum();
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            routing.ids.push(order);
            routing.weights.push(weights);
        }
        routing
    }
}

/// Indices of the `k` largest values, largest first; equal values keep index order, as
/// torch.topk does on CPU.
fn top_indices(row: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(k);
    order
}
