//! The lookahead predictor: the routers of layers l+1..l+D applied to the hidden state entering
//! layer l, each after its own layer's post-attention norm, as the model would apply it.
//!
//! No training: it relies on the residual stream changing little from one layer to the next. The
//! layers a hidden state has not gone through yet (their attention and experts) are what it
//! misses, so its recall falls with depth.

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module};

use super::{Predictor, PredictorKind};
use crate::error::{Error, Result};
use crate::model::layers::RmsNorm;
use crate::model::{FeedForward, Model};

pub struct Lookahead {
    /// Each layer's post-attention norm and router.
    routers: Vec<(RmsNorm, Linear)>,
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
        let routers = model
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| match &l.ffn {
                FeedForward::Moe(moe) => Ok((l.post_attention_norm.clone(), moe.router.clone())),
                FeedForward::Dense(_) => Err(Error::InvalidRequest(format!(
                    "layer {i} has no experts to predict"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
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
            .map(|d| {
                let (norm, router) = &self.routers[(layer + d) % self.routers.len()];
                let logits = router.forward(&norm.forward(&hidden)?)?;
                Ok(candle_nn::ops::softmax_last_dim(&logits)?)
            })
            .collect()
    }
}
