//! The sparse MoE block: router, scores (softmax, or DeepSeek's sigmoid with group-limited choice),
//! top-k, optional renormalisation, experts, weighted sum, shared experts.
//!
//! Experts reach the block only through [`ExpertProvider`], so where they live (all resident, or
//! read on demand into a byte-budgeted store) never shows in the model files.

use std::ops::Deref;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module};

use super::layers::GluMlp;
use super::q8_0;
use crate::error::{Error, Result};

/// One routed expert's weights, kept alive (and, for a store, pinned) while the handle lives.
pub struct ExpertHandle {
    weights: Arc<GluMlp>,
    /// Released when the handle drops: a store unpins the expert then.
    _pin: Option<Box<dyn Send + Sync>>,
}

impl ExpertHandle {
    pub fn new(weights: Arc<GluMlp>) -> Self {
        Self {
            weights,
            _pin: None,
        }
    }

    /// A handle that holds `pin` (whose drop unpins the expert) as long as it lives.
    pub fn pinned(weights: Arc<GluMlp>, pin: Box<dyn Send + Sync>) -> Self {
        Self {
            weights,
            _pin: Some(pin),
        }
    }
}

impl Deref for ExpertHandle {
    type Target = GluMlp;
    fn deref(&self) -> &GluMlp {
        &self.weights
    }
}

/// An expert asked for and pinned, whose read may still be in flight.
///
/// Dropping it unwaited releases the pin.
pub struct PendingExpert(Box<dyn FnOnce() -> Result<ExpertHandle> + Send>);

impl PendingExpert {
    /// `wait` finishes the read (its captures hold the pin until then).
    pub fn new(wait: impl FnOnce() -> Result<ExpertHandle> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    pub fn ready(handle: ExpertHandle) -> Self {
        Self::new(move || Ok(handle))
    }

    /// Blocks until the expert is loaded.
    pub fn wait(self) -> Result<ExpertHandle> {
        (self.0)()
    }
}

/// Where the MoE block gets its experts from.
pub trait ExpertProvider: Send + Sync {
    /// The weights of experts `ids` of `layer`, in the order asked.
    fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertHandle>>;

    /// Experts `ids` of `layer`, returned once their reads are queued rather than done, so the
    /// caller computes with the first while the rest are read.
    fn request(&self, layer: usize, ids: &[usize]) -> Result<Vec<PendingExpert>> {
        Ok(self
            .experts(layer, ids)?
            .into_iter()
            .map(PendingExpert::ready)
            .collect())
    }

    /// How many experts one call may ask for (a store cannot pin more than its budget holds).
    fn max_batch(&self) -> usize {
        usize::MAX
    }
}

/// Every expert loaded up front.
#[derive(Debug, Default)]
pub struct ResidentExperts {
    /// `layers[layer][expert]`.
    pub layers: Vec<Vec<Arc<GluMlp>>>,
}

impl ResidentExperts {
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|e| e.bytes()).sum()
    }
}

impl ExpertProvider for ResidentExperts {
    fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertHandle>> {
        let experts = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::InvalidRequest(format!("no MoE layer {layer}")))?;
        ids.iter()
            .map(|&id| {
                experts
                    .get(id)
                    .map(|e| ExpertHandle::new(e.clone()))
                    .ok_or_else(|| {
                        Error::InvalidRequest(format!("no expert {id} in layer {layer}"))
                    })
            })
            .collect()
    }
}

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
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// Routes `x` `[T, hidden]` and mixes the chosen experts' outputs.
    pub fn forward(&self, x: &Tensor, experts: &dyn ExpertProvider) -> Result<(Tensor, Routing)> {
        let routing = self.route(&self.scores(x)?.to_vec2::<f32>()?);

        // Tokens per expert, experts in ascending order as the reference accumulates them.
        let mut by_expert: std::collections::BTreeMap<usize, (Vec<u32>, Vec<f32>)> =
            Default::default();
        for (t, (ids, weights)) in routing.ids.iter().zip(&routing.weights).enumerate() {
            for (&e, &w) in ids.iter().zip(weights) {
                let entry = by_expert.entry(e).or_default();
                entry.0.push(t as u32);
                entry.1.push(w);
            }
        }
        let routed: Vec<Assignment> = by_expert.into_iter().collect();
        let mut out = x.zeros_like()?;
        // In batches the provider can hold at once; accumulation stays in ascending expert order.
        // Each expert is waited for only when its turn comes: computing one overlaps reading the
        // next, and its pin is released as soon as it has been applied.
        for batch in routed.chunks(experts.max_batch().max(1)) {
            let ids: Vec<usize> = batch.iter().map(|(e, _)| *e).collect();
            let mut pending = experts.request(self.layer, &ids)?.into_iter();
            let Some(first) = pending.next() else {
                continue;
            };
            let first = first.wait()?;
            if first.q8_0(x).is_some() {
                // The Q8_0 kernel takes experts a group at a time, in two passes over the thread
                // pool instead of two per expert. A group is a decode step's experts; in a
                // prompt, computing one group overlaps reading the next.
                let mut pending = std::iter::once(PendingExpert::ready(first)).chain(pending);
                for group in batch.chunks(Q8_0_GROUP) {
                    let handles = pending
                        .by_ref()
                        .take(group.len())
                        .map(PendingExpert::wait)
                        .collect::<Result<Vec<_>>>()?;
                    out = mix_q8_0(out, x, &handles, group)?;
                }
                continue;
            }
            let rest = pending.map(|p| p.wait());
            for (handle, (_, (tokens, weights))) in
                std::iter::once(Ok(first)).chain(rest).zip(batch)
            {
                let handle = handle?;
                let n = tokens.len();
                let index = Tensor::from_vec(tokens.clone(), n, x.device())?;
                let weights =
                    Tensor::from_vec(weights.clone(), (n, 1), x.device())?.to_dtype(x.dtype())?;
                let y = handle
                    .forward(&x.index_select(&index, 0)?)?
                    .broadcast_mul(&weights)?;
                out = out.index_add(&index, &y, 0)?;
            }
        }
        if let Some(shared) = &self.shared {
            let y = shared.mlp.forward(x)?;
            let y = match &shared.gate {
                Some(gate) => y.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(x)?)?)?,
                None => y,
            };
            out = (out + y)?;
        }
        Ok((out, routing))
    }

    /// Routing scores `[T, experts]` in f32: softmax probabilities, or sigmoid scores.
    fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.router.forward(&x.to_dtype(DType::F32)?)?;
        Ok(match self.scoring {
            Scoring::Softmax => candle_nn::ops::softmax_last_dim(&logits)?,
            Scoring::GroupLimitedSigmoid { .. } => candle_nn::ops::sigmoid(&logits)?,
        })
    }

    /// What the choice of experts ranks, `[T, experts]`: the scores, or for group-limited
    /// routing the biased scores with experts outside the chosen groups at minus infinity. The
    /// lookahead predictor ranks the same way.
    pub fn choice_scores(&self, x: &Tensor) -> Result<Tensor> {
        let scores = self.scores(x)?;
        if matches!(self.scoring, Scoring::Softmax) {
            return Ok(scores);
        }
        let rows: Vec<Vec<f32>> = scores
            .to_vec2::<f32>()?
            .iter()
            .map(|row| self.choice_row(row))
            .collect();
        Ok(Tensor::new(rows, x.device())?)
    }

    /// One position's ranking for the choice (see [`choice_scores`](Self::choice_scores)).
    fn choice_row(&self, scores: &[f32]) -> Vec<f32> {
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

/// Experts the Q8_0 kernel computes together: the top-k of the architectures served.
const Q8_0_GROUP: usize = 8;

/// An expert, the positions routed to it, and their routing weights.
type Assignment = (usize, (Vec<u32>, Vec<f32>));

/// `out` plus each expert's output on its tokens times its routing weight, added in the order of
/// `batch` (ascending expert ids) as the candle path adds them.
fn mix_q8_0(
    out: Tensor,
    x: &Tensor,
    handles: &[ExpertHandle],
    batch: &[Assignment],
) -> Result<Tensor> {
    let (_, hidden) = x.dims2()?;
    let rows = x.to_vec2::<f32>()?;
    let inputs: Vec<q8_0::Activations> = batch
        .iter()
        .map(|(_, (tokens, _))| {
            let gathered: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| rows[t as usize].iter().copied())
                .collect();
            q8_0::Activations::quantize(&gathered, hidden)
        })
        .collect();
    let experts: Vec<_> = handles
        .iter()
        .zip(&inputs)
        .map(|(h, input)| Ok((h.q8_0(x).ok_or_else(mixed_types)?, input)))
        .collect::<Result<_>>()?;
    let outputs = q8_0::glu(&experts)?;
    let mut sum = out.flatten_all()?.to_vec1::<f32>()?;
    for (y, (_, (tokens, weights))) in outputs.iter().zip(batch) {
        for ((&t, &w), y) in tokens.iter().zip(weights).zip(y.chunks_exact(hidden)) {
            let row = &mut sum[t as usize * hidden..(t as usize + 1) * hidden];
            for (acc, v) in row.iter_mut().zip(y) {
                *acc += v * w;
            }
        }
    }
    Ok(Tensor::from_vec(sum, out.shape(), out.device())?)
}

fn mixed_types() -> Error {
    Error::InvalidRequest("a layer's experts mix Q8_0 with other weight types".into())
}

/// Indices of the `k` largest values, largest first; equal values keep index order, as
/// torch.topk does on CPU.
fn top_indices(row: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(k);
    order
}
