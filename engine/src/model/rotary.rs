//! Rotary position embedding: plain, or with YaRN's scaled frequencies and cos/sin scale.

use candle_core::{DType, Device, Tensor};

use super::layers::positions;
use crate::config::YarnScaling;
use crate::error::Result;

/// Rotary position embedding in the "rotate half" layout that Hugging Face checkpoints use.
#[derive(Clone, Debug)]
pub struct Rotary {
    /// Inverse frequencies, computed in f32 as the reference does.
    inv_freq: Vec<f32>,
    /// `inv_freq` as `[1, head_dim / 2]` on the device the tables were first made on.
    on_device: std::sync::OnceLock<Tensor>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    scale: f64,
}

impl Rotary {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let base = theta as f32;
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        Self::from_inv_freq(inv_freq)
    }

    /// Rotary embedding with precomputed inverse frequencies (scaled RoPE variants).
    pub fn from_inv_freq(inv_freq: Vec<f32>) -> Self {
        Self {
            inv_freq,
            on_device: std::sync::OnceLock::new(),
            scale: 1.0,
        }
    }

    /// YaRN's rotary embedding for `dim` rotated dimensions.
    pub fn yarn(dim: usize, theta: f64, yarn: &YarnScaling) -> Self {
        let (inv_freq, scale) = yarn_frequencies(dim, theta, yarn);
        Self {
            scale,
            ..Self::from_inv_freq(inv_freq)
        }
    }

    /// cos and sin tables `[len, head_dim / 2]` for positions `offset..offset + len`, made on
    /// `device` from the positions alone (`position * inv_freq` in f32, as the reference
    /// computes the angles): a prompt's tables are not built on the host and copied over.
    pub(crate) fn tables(
        &self,
        offset: usize,
        len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv_freq = match self.on_device.get() {
            Some(kept) if kept.device().same_device(device) => kept.clone(),
            _ => {
                let made = Tensor::from_slice(&self.inv_freq, (1, self.inv_freq.len()), device)?;
                let _ = self.on_device.set(made.clone());
                made
            }
        };
        let angles = positions(offset, len, device)?
            .to_dtype(DType::F32)?
            .reshape((len, 1))?
            .broadcast_mul(&inv_freq)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        if self.scale == 1.0 {
            return Ok((cos, sin));
        }
        Ok((cos.affine(self.scale, 0.0)?, sin.affine(self.scale, 0.0)?))
    }
}

/// YaRN's attention magnitude correction for a context `scale` times the original.
pub(crate) fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// YaRN inverse frequencies for a rotary width of `dim`, and the scale of cos and sin, computed
/// in the same precision and order as transformers (f32 tensors, f64 scalars): frequencies that
/// turn fewer than `beta_slow` times over the original context are interpolated by `factor`,
/// those turning more than `beta_fast` times are kept, with a linear ramp between.
fn yarn_frequencies(dim: usize, theta: f64, yarn: &YarnScaling) -> (Vec<f32>, f64) {
    let correction_dim = |rotations: f64| {
        let original = yarn.original_max_position_embeddings as f64;
        dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (
        correction_dim(yarn.beta_fast),
        correction_dim(yarn.beta_slow),
    );
    if yarn.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001; // as transformers does, against a zero-width ramp
    }
    let (base, factor) = (theta as f32, yarn.factor as f32);
    let inv_freq = (0..dim / 2)
        .map(|i| {
            let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            let frequency = base.powf((2 * i) as f32 / dim as f32);
            let extrapolated = 1.0 / frequency;
            let interpolated = 1.0 / (factor * frequency);
            interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight
        })
        .collect();
    let scale = yarn.attention_factor.unwrap_or_else(|| {
        match (
            yarn.mscale.filter(|&m| m != 0.0),
            yarn.mscale_all_dim.filter(|&m| m != 0.0),
        ) {
            (Some(m), Some(all)) => yarn_mscale(yarn.factor, m) / yarn_mscale(yarn.factor, all),
            _ => yarn_mscale(yarn.factor, 1.0),
        }
    });
    (inv_freq, scale)
}
