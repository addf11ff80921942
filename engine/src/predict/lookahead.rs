//! The lookahead predictor: the routers of layers l+1..l+D applied to the hidden state entering
//! layer l, each after its own layer's post-attention norm, as the model would apply it.
//!
//! No training: it relies on the residual stream changing little from one layer to the next. The
//! layers a hidden state has not gone through yet (their attention and experts) are what it
//! misses, so its recall falls with depth. Each router ranks experts as its layer chooses them
//! (for DeepSeek's group-limited routing, biased scores inside the chosen groups); dense layers
//! have no experts to score.

use candle_core::{DType, Tensor};

use super::{Predictor, PredictorKind};
use crate::error::{Error, Result};
use crate::model::layers::RmsNorm;
use crate::model::moe::MoeBlock;
use crate::model::{FeedForward, Model};

pub struct Lookahead {
    /// Each layer's post-attention norm and MoE block (`None` for dense layers).
    routers: Vec<Option<(RmsNorm, MoeBlock)>>,
    depth: usize,
    top_k: usize,
}

impl Lookahead {
    pub fn new(model: &Model, depth: usize) -> Result<Self> {
        if depth == 0 {
            return Err(Error::InvalidRequest(
                "prediction depth must be at least 1".into(),
            ));
        }
        let routers: Vec<_> = model
            .layers()
            .iter()
            .map(|l| match &l.ffn {
                FeedForward::Moe(moe) => Some((l.post_attention_norm.clone(), moe.clone())),
                FeedForward::Dense(_) => None,
            })
            .collect();
        if routers.iter().all(Option::is_none) {
            return Err(Error::InvalidRequest(
                "the model has no experts to predict".into(),
            ));
        }
        Ok(Self {
            routers,
            depth,
            top_k: model.config.num_experts_per_token,
        })
    }
}

impl Predictor for Lookahead {
    fn kind(&self) -> PredictorKind {
        PredictorKind::Lookahead
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn num_layers(&self) -> usize {
        self.routers.len()
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn scores(&self, layer: usize, hidden: &Tensor) -> Result<Vec<Tensor>> {
        let hidden = hidden.to_dtype(DType::F32)?;
        (1..=self.depth)
            .map(|d| match &self.routers[(layer + d) % self.routers.len()] {
                Some((norm, moe)) => moe.scores(&norm.forward(&hidden)?),
                None => Ok(Tensor::zeros(
                    (hidden.dim(0)?, 0),
                    DType::F32,
                    hidden.device(),
                )?),
            })
            .collect()
    }

    fn choice_row(&self, target: usize, scores: &[f32]) -> Vec<f32> {
        match &self.routers[target] {
            Some((_, moe)) => moe.choice_row(scores),
            None => scores.to_vec(),
        }
    }
}
