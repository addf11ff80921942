//! The shadow predictor: one small MLP per target layer, trained from routing traces.
//!
//! Input: the hidden state entering layer l, scaled to unit RMS (layers differ in scale), followed
//! by a one-hot of the depth d (1..=D) the guess is for. Output: one logit per expert of layer
//! `(l + d) % L` (past the last layer: the next token's). Shape `hidden + D -> units -> experts`,
//! ReLU between. Trained with AdamW on binary cross-entropy against the experts routing chose (the
//! top-k set as a multi-hot target); scores are the sigmoids.
//!
//! # File format
//! safetensors with `layers.{j}.fc1.weight` `[units, hidden + depth]`, `layers.{j}.fc1.bias`
//! `[units]`, `layers.{j}.fc2.weight` `[experts, units]`, `layers.{j}.fc2.bias` `[experts]` (F32)
//! for every target layer j, and metadata `format` = `odmoe-shadow`, `version` = `1`, `depth`,
//! `units`, `num_layers`, `num_experts`, `top_k`, `hidden_size`, `model_type`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::trace::{Trace, check_format, read_safetensors, write_safetensors};
use super::{Predictor, PredictorKind};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

pub const FORMAT: &str = "odmoe-shadow";
pub const VERSION: &str = "1";

/// One target layer's MLP, its first layer split into the hidden part and a bias per depth.
#[derive(Clone, Debug)]
struct Mlp {
    /// `[hidden, units]`.
    w_hidden: Tensor,
    /// `[depth, units]`: fc1's bias plus the depth column of fc1's weight.
    depth_bias: Tensor,
    /// `[units, experts]`.
    w_out: Tensor,
    /// `[experts]`.
    b_out: Tensor,
    /// The weights as trained and saved.
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
}

impl Mlp {
    fn new(
        fc1_weight: Tensor,
        fc1_bias: Tensor,
        fc2_weight: Tensor,
        fc2_bias: Tensor,
        hidden: usize,
    ) -> Result<Self> {
        let depth = fc1_weight.dim(1)? - hidden;
        let w_hidden = fc1_weight.narrow(1, 0, hidden)?.t()?.contiguous()?;
        let depth_bias = fc1_weight
            .narrow(1, hidden, depth)?
            .t()?
            .broadcast_add(&fc1_bias)?
            .contiguous()?;
        Ok(Self {
            w_hidden,
            depth_bias,
            w_out: fc2_weight.t()?.contiguous()?,
            b_out: fc2_bias,
            fc1_weight,
            fc1_bias,
            fc2_weight,
        })
    }

    /// Logits `[T, experts]` for inputs already scaled to unit RMS.
    fn logits(&self, x: &Tensor, depth: usize) -> Result<Tensor> {
        let h = x
            .matmul(&self.w_hidden)?
            .broadcast_add(&self.depth_bias.get(depth - 1)?)?
            .relu()?;
        Ok(h.matmul(&self.w_out)?.broadcast_add(&self.b_out)?)
    }
}

/// Scales each row to unit RMS.
fn unit_rms(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?)
}

/// Mean binary cross-entropy of `logits` against 0/1 `targets`, as `max(x, 0) - x y +
/// ln(1 + e^-|x|)`: candle's `binary_cross_entropy_with_logit` takes the log of the sigmoid,
/// which is 0 or 1 in f32 once a logit passes about 17 in size, and its 0 times infinity made
/// every layer's loss NaN within 40 epochs on an 18-layer qwen3moe trace.
fn binary_cross_entropy_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_of_minus_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * targets)?)? + softplus_of_minus_abs)?;
    Ok(loss.mean_all()?)
}

/// The trained shadow predictor.
#[derive(Clone, Debug)]
pub struct Shadow {
    depth: usize,
    units: usize,
    top_k: usize,
    hidden_size: usize,
    num_experts: usize,
    model_type: String,
    /// One per target layer.
    mlps: Vec<Mlp>,
}

/// How [`train`] trains.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub depth: usize,
    /// Width of the hidden layer.
    pub units: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            depth: 4,
            units: 256,
            epochs: 40,
            batch_size: 128,
            learning_rate: 2e-3,
            weight_decay: 1e-2,
            seed: 0,
        }
    }
}

impl Shadow {
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The same weights, predicting only `depth` layers ahead (at most the trained depth).
    pub fn truncated(mut self, depth: usize) -> Self {
        self.depth = depth.clamp(1, self.depth);
        self
    }

    /// Reads weights written by [`save`](Self::save) and checks them against `config`.
    pub fn load(path: &Path, config: &ModelConfig) -> Result<Self> {
        let (tensors, metadata) = read_safetensors(path)?;
        let bad = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        check_format(path, &metadata, FORMAT, VERSION, "shadow predictor weights")?;
        let number = |key: &str| -> Result<usize> {
            metadata
                .get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("no {key} in the metadata")))
        };
        let (depth, units) = (number("depth")?, number("units")?);
        for (key, expected) in [
            ("num_layers", config.num_layers),
            ("num_experts", config.num_experts),
            ("top_k", config.num_experts_per_token),
            ("hidden_size", config.hidden_size),
        ] {
            let found = number(key)?;
            if found != expected {
                return Err(bad(format!(
                    "trained for {key} = {found}, the model has {expected}"
                )));
            }
        }
        let (h, e) = (config.hidden_size, config.num_experts);
        let mut mlps = Vec::with_capacity(config.num_layers);
        for j in 0..config.num_layers {
            let get = |name: &str, dims: &[usize]| -> Result<Tensor> {
                let name = format!("layers.{j}.{name}");
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| bad(format!("no tensor {name:?}")))?;
                if t.dims() != dims {
                    return Err(bad(format!(
                        "tensor {name:?} has shape {:?}, expected {dims:?}",
                        t.dims()
                    )));
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            mlps.push(Mlp::new(
                get("fc1.weight", &[units, h + depth])?,
                get("fc1.bias", &[units])?,
                get("fc2.weight", &[e, units])?,
                get("fc2.bias", &[e])?,
                h,
            )?);
        }
        Ok(Self {
            depth,
            units,
            top_k: config.num_experts_per_token,
            hidden_size: h,
            num_experts: e,
            model_type: metadata.get("model_type").cloned().unwrap_or_default(),
            mlps,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (j, mlp) in self.mlps.iter().enumerate() {
            tensors.push((format!("layers.{j}.fc1.weight"), mlp.fc1_weight.clone()));
            tensors.push((format!("layers.{j}.fc1.bias"), mlp.fc1_bias.clone()));
            tensors.push((format!("layers.{j}.fc2.weight"), mlp.fc2_weight.clone()));
            tensors.push((format!("layers.{j}.fc2.bias"), mlp.b_out.clone()));
        }
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("depth", self.depth.to_string()),
            ("units", self.units.to_string()),
            ("num_layers", self.mlps.len().to_string()),
            ("num_experts", self.num_experts.to_string()),
            ("top_k", self.top_k.to_string()),
            ("hidden_size", self.hidden_size.to_string()),
            ("model_type", self.model_type.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        write_safetensors(path, &tensors, metadata)
    }
}

impl Predictor for Shadow {
    fn kind(&self) -> PredictorKind {
        PredictorKind::Shadow
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn num_layers(&self) -> usize {
        self.mlps.len()
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn scores(&self, layer: usize, hidden: &Tensor) -> Result<Vec<Tensor>> {
        let x = unit_rms(hidden)?;
        (1..=self.depth)
            .map(|d| {
                let mlp = &self.mlps[(layer + d) % self.mlps.len()];
                Ok(candle_nn::ops::sigmoid(&mlp.logits(&x, d)?)?)
            })
            .collect()
    }
}

/// One training example for a target layer.
#[derive(Clone, Copy)]
struct Sample {
    /// Row of the flattened `[N * L, H]` hidden states: the input.
    row: u32,
    depth: usize,
    /// (token, layer) whose experts are the target.
    target: (usize, usize),
}

/// Training progress: target layer, epoch (from 1), mean loss of the epoch.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f32);

/// Trains a shadow predictor on a trace recorded with hidden states: for every token, layer l and
/// depth d, the hidden state entering l is an input and the experts of the step d layers later
/// are its target.
pub fn train(trace: &Trace, options: &TrainOptions, progress: Progress<'_>) -> Result<Shadow> {
    let hidden = trace.hidden.as_ref().ok_or_else(|| {
        Error::InvalidRequest("training needs hidden states: record the trace with --hidden".into())
    })?;
    if options.depth == 0 || options.units == 0 || options.batch_size == 0 {
        return Err(Error::InvalidRequest(
            "depth, units and batch size must be at least 1".into(),
        ));
    }
    let (n, l) = (trace.num_tokens(), trace.num_layers());
    let (h, e, depth) = (trace.config.hidden_size, trace.num_experts(), options.depth);
    let device = Device::Cpu;
    let inputs = unit_rms(&hidden.to_device(&device)?.reshape((n * l, h))?)?;

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); l];
    for t in 0..n {
        for layer in 0..l {
            for depth in 1..=depth {
                if let Some(target) = trace.step_after(t, layer, depth) {
                    samples[target.1].push(Sample {
                        row: (t * l + layer) as u32,
                        depth,
                        target,
                    });
                }
            }
        }
    }

    let mut mlps = Vec::with_capacity(l);
    for (j, samples) in samples.iter().enumerate() {
        let count = samples.len();
        if count == 0 {
            return Err(Error::InvalidRequest(format!(
                "the trace has no samples for layer {j}: record more tokens"
            )));
        }
        let rows: Vec<u32> = samples.iter().map(|s| s.row).collect();
        let x = inputs.index_select(&Tensor::from_vec(rows, count, &device)?, 0)?;
        let mut onehot = vec![0f32; count * depth];
        let mut target = vec![0f32; count * e];
        let mut frequency = vec![0f64; e];
        for (i, sample) in samples.iter().enumerate() {
            onehot[i * depth + sample.depth - 1] = 1.0;
            for &id in trace.ids(sample.target.0, sample.target.1) {
                target[i * e + id as usize] = 1.0;
                frequency[id as usize] += 1.0;
            }
        }
        let x = Tensor::cat(&[x, Tensor::from_vec(onehot, (count, depth), &device)?], 1)?;
        let y = Tensor::from_vec(target, (count, e), &device)?;

        let mut rng = StdRng::seed_from_u64(options.seed.wrapping_add(j as u64));
        let mut uniform = |shape: (usize, usize), fan_in: usize| -> Result<Var> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                values, shape, &device,
            )?)?)
        };
        let fc1_weight = uniform((options.units, h + depth), h + depth)?;
        let fc1_bias = Var::zeros(options.units, DType::F32, &device)?;
        let fc2_weight = uniform((e, options.units), options.units)?;
        // Start from each expert's base rate, so training learns what the hidden state adds.
        let prior: Vec<f32> = frequency
            .iter()
            .map(|&f| {
                let p = (f / count as f64).clamp(1e-3, 1.0 - 1e-3);
                (p / (1.0 - p)).ln() as f32
            })
            .collect();
        let fc2_bias = Var::from_tensor(&Tensor::from_vec(prior, e, &device)?)?;
        let mut optimizer = candle_nn::AdamW::new(
            vec![
                fc1_weight.clone(),
                fc1_bias.clone(),
                fc2_weight.clone(),
                fc2_bias.clone(),
            ],
            candle_nn::ParamsAdamW {
                lr: options.learning_rate,
                weight_decay: options.weight_decay,
                ..Default::default()
            },
        )?;
        let mut order: Vec<u32> = (0..count as u32).collect();
        for epoch in 1..=options.epochs {
            order.shuffle(&mut rng);
            let (mut total, mut batches) = (0f32, 0usize);
            for batch in order.chunks(options.batch_size) {
                let index = Tensor::from_slice(batch, batch.len(), &device)?;
                let (xb, yb) = (x.index_select(&index, 0)?, y.index_select(&index, 0)?);
                let logits = xb
                    .matmul(&fc1_weight.t()?)?
                    .broadcast_add(&fc1_bias)?
                    .relu()?
                    .matmul(&fc2_weight.t()?)?
                    .broadcast_add(&fc2_bias)?;
                let loss = binary_cross_entropy_with_logits(&logits, &yb)?;
                optimizer.backward_step(&loss)?;
                total += loss.to_scalar::<f32>()?;
                batches += 1;
            }
            let mean = total / batches.max(1) as f32;
            if !mean.is_finite() {
                return Err(Error::InvalidRequest(format!(
                    "training diverged: layer {j}'s loss is {mean} at epoch {epoch}; try a lower --lr"
                )));
            }
            progress(j, epoch, mean);
        }
        mlps.push(Mlp::new(
            fc1_weight.as_tensor().detach(),
            fc1_bias.as_tensor().detach(),
            fc2_weight.as_tensor().detach(),
            fc2_bias.as_tensor().detach(),
            h,
        )?);
    }
    Ok(Shadow {
        depth,
        units: options.units,
        top_k: trace.top_k(),
        hidden_size: h,
        num_experts: e,
        model_type: crate::model::model_type(trace.config.architecture).to_string(),
        mlps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_stays_finite_and_exact_for_saturated_logits() {
        let logits = Tensor::new(&[100f32, 100., -100., -100., 0., 2.], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1f32, 0., 1., 0., 1., 0.], &Device::Cpu).unwrap();
        let each = |i: usize| {
            let (x, y) = (
                logits.get(i).unwrap().reshape(1).unwrap(),
                targets.get(i).unwrap().reshape(1).unwrap(),
            );
            binary_cross_entropy_with_logits(&x, &y)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Right and sure, wrong and sure, unsure: -ln(sigmoid(x)) or -ln(1 - sigmoid(x)).
        let expected = [0.0, 100.0, 100.0, 0.0, std::f32::consts::LN_2, 2.126_928];
        for (i, want) in expected.into_iter().enumerate() {
            let got = each(i);
            assert!((got - want).abs() < 1e-5, "{i}: {got} against {want}");
        }
        let mean = binary_cross_entropy_with_logits(&logits, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((mean - expected.iter().sum::<f32>() / 6.0).abs() < 1e-5);
    }
}
