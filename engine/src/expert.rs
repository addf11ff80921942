//! The expert contract shared by the store and the models (odmoe's SwitchGLU): an expert's
//! weights, the handles that keep them pinned while in use, reads still in flight, the provider
//! trait the store and the all-resident set implement, and applying chosen experts to tokens.
//!
//! The store knows experts only through this module, so it never needs the models; the models
//! get experts only through [`ExpertProvider`], so where experts live never shows in them.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use candle_core::Tensor;
use candle_core::quantized::QMatMul;

use crate::config::ExpertGating;
use crate::error::{Error, Result};
pub use crate::kernels::Matrix;
use crate::kernels::quantized;
/// What a matrix of blocks is made of: its block type, and the bytes it holds or shares.
pub use crate::kernels::quantized::{BlockBytes, Format};

/// A SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`. Every routed expert is one.
///
/// Projections are f32 matrices (from safetensors, or dequantized), GGUF blocks that candle
/// multiplies in their stored type, or MXFP4 blocks that only odmoe's kernels multiply.
#[derive(Clone, Debug)]
pub struct GluMlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl GluMlp {
    /// An expert from three f32 weight matrices `[out, in]`.
    pub fn from_f32(gate: Tensor, up: Tensor, down: Tensor) -> Self {
        Self::from_candle(
            QMatMul::Tensor(gate),
            QMatMul::Tensor(up),
            QMatMul::Tensor(down),
        )
    }

    /// An expert from three matrices candle multiplies.
    pub fn from_candle(gate: QMatMul, up: QMatMul, down: QMatMul) -> Self {
        Self {
            gate: Matrix::Candle(gate),
            up: Matrix::Candle(up),
            down: Matrix::Candle(down),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, &ExpertForm::default(), 0)
    }

    /// The expert as `form` says its layer's experts compute, `expert` naming its biases.
    pub fn forward_as(&self, x: &Tensor, form: &ExpertForm, expert: usize) -> Result<Tensor> {
        if let Some(weights) = self.quantized(x) {
            let input = quantized::Activations::of(x, &weights.input_formats())?;
            let mut out = form.glu(&[(weights, &input)], &[expert])?.remove(0);
            form.add_down_bias(expert, &mut out);
            return Ok(Tensor::from_vec(out, x.dims(), x.device())?);
        }
        self.forward_in_form(x, form, expert)
    }

    /// [`forward_as`](Self::forward_as) through candle's products, in the order transformers
    /// computes them (without biases, `down(silu(gate(x)) * up(x))`).
    fn forward_in_form(&self, x: &Tensor, form: &ExpertForm, expert: usize) -> Result<Tensor> {
        let biased = |y: Tensor, bias: Option<&[f32]>| -> Result<Tensor> {
            Ok(match bias {
                Some(b) => y.broadcast_add(&Tensor::from_slice(b, b.len(), x.device())?)?,
                None => y,
            })
        };
        let biases = form.biases.as_ref();
        let gate = biased(self.gate.forward(x)?, biases.map(|b| b.gate(expert)))?;
        let up = biased(self.up.forward(x)?, biases.map(|b| b.up(expert)))?;
        let inner = match form.gating {
            ExpertGating::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            ExpertGating::ClampedSwiglu { alpha, limit } => {
                let (alpha, limit) = (f64::from(alpha), f64::from(limit));
                let gate = gate.minimum(limit)?;
                let up = up.clamp(-limit, limit)?;
                let glu = (&gate * candle_nn::ops::sigmoid(&gate.affine(alpha, 0.0)?)?)?;
                (up.affine(1.0, 1.0)? * glu)?
            }
        };
        biased(self.down.forward(&inner)?, biases.map(|b| b.down(expert)))
    }

    /// The three projections when the quantized kernels take `x` through them all.
    pub fn quantized(&self, x: &Tensor) -> Option<quantized::GluWeights<'_>> {
        Some(quantized::GluWeights {
            gate: self.gate.kernel_weight(x)?,
            up: self.up.kernel_weight(x)?,
            down: self.down.kernel_weight(x)?,
        })
    }

    /// Bytes held by the three weight matrices, as stored in memory.
    pub fn bytes(&self) -> usize {
        [&self.gate, &self.up, &self.down]
            .iter()
            .map(|m| m.bytes())
            .sum()
    }
}

/// How a layer's routed experts compute besides their three matrices: the gating, and biases
/// the layer keeps resident (the store holds only the matrices).
#[derive(Clone, Debug, Default)]
pub struct ExpertForm {
    pub gating: ExpertGating,
    pub biases: Option<Box<ExpertBiases>>,
}

impl ExpertForm {
    /// `silu(gate) * up` without biases, as every architecture but gpt-oss computes.
    pub fn is_plain(&self) -> bool {
        self.gating == ExpertGating::Silu && self.biases.is_none()
    }

    /// The quantized kernels' [`quantized::glu`] of experts `ids` (one per entry of `experts`)
    /// in this form, but for the down projection's bias ([`add_down_bias`](Self::add_down_bias)).
    fn glu(
        &self,
        experts: &[(quantized::GluWeights, &quantized::Activations)],
        ids: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        if self.is_plain() {
            return quantized::glu(experts);
        }
        let (gating, biases) = (self.gating, self.biases.as_ref());
        quantized::glu_with(experts, &|e, gate, up| {
            match biases {
                // Each token's row of gate and up values, with the expert's bias rows.
                Some(b) => {
                    let (gate_bias, up_bias) = (b.gate(ids[e]), b.up(ids[e]));
                    let width = gate_bias.len();
                    for (g, u) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
                        for (((g, &u), gb), ub) in g.iter_mut().zip(u).zip(gate_bias).zip(up_bias) {
                            *g = gated(gating, *g + gb, u + ub);
                        }
                    }
                }
                None => {
                    for (g, &u) in gate.iter_mut().zip(up) {
                        *g = gated(gating, *g, u);
                    }
                }
            }
        })
    }

    /// Adds expert `expert`'s down-projection bias to each row of `out`.
    fn add_down_bias(&self, expert: usize, out: &mut [f32]) {
        if let Some(biases) = &self.biases {
            let bias = biases.down(expert);
            for row in out.chunks_exact_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        }
    }
}

/// One value of the down projection's input from its gate and up values, as `gating` says and
/// in the order of operations of candle's tensors in [`GluMlp::forward_as`].
fn gated(gating: ExpertGating, gate: f32, up: f32) -> f32 {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    match gating {
        // As candle's SiLU and the kernels' `silu_times` compute it.
        ExpertGating::Silu => gate / (1.0 + (-gate).exp()) * up,
        ExpertGating::ClampedSwiglu { alpha, limit } => {
            let gate = gate.min(limit);
            let up = up.clamp(-limit, limit);
            (up + 1.0) * (gate * sigmoid(gate * alpha))
        }
    }
}

/// Every expert's biases, one row per expert, on the host: the quantized kernels add them to
/// their rows as they are, and candle's path takes an expert's rows to the device.
#[derive(Clone, Debug)]
pub struct ExpertBiases {
    /// `[experts, intermediate]` each.
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `[experts, hidden]`.
    down: Vec<f32>,
    width: usize,
    hidden: usize,
}

impl ExpertBiases {
    /// The biases of gate and up (`[experts, intermediate]` each) and down (`[experts, hidden]`).
    pub fn new(gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Self> {
        let (width, hidden) = (gate.dim(1)?, down.dim(1)?);
        let rows = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        Ok(Self {
            gate: rows(gate)?,
            up: rows(up)?,
            down: rows(down)?,
            width,
            hidden,
        })
    }

    fn gate(&self, expert: usize) -> &[f32] {
        &self.gate[expert * self.width..][..self.width]
    }

    fn up(&self, expert: usize) -> &[f32] {
        &self.up[expert * self.width..][..self.width]
    }

    fn down(&self, expert: usize) -> &[f32] {
        &self.down[expert * self.hidden..][..self.hidden]
    }
}

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
pub struct PendingExpert {
    wait: Box<dyn FnOnce() -> Result<ExpertHandle> + Send>,
    loaded: Box<dyn Fn() -> bool + Send>,
}

impl PendingExpert {
    /// `wait` finishes the read (its captures hold the pin until then); `loaded` tells whether
    /// it would return at once.
    pub fn new(
        wait: impl FnOnce() -> Result<ExpertHandle> + Send + 'static,
        loaded: impl Fn() -> bool + Send + 'static,
    ) -> Self {
        Self {
            wait: Box::new(wait),
            loaded: Box::new(loaded),
        }
    }

    pub fn ready(handle: ExpertHandle) -> Self {
        Self::new(move || Ok(handle), || true)
    }

    /// Whether [`wait`](Self::wait) would return without waiting for a read (a failed read
    /// counts as finished).
    pub fn is_loaded(&self) -> bool {
        (self.loaded)()
    }

    /// Blocks until the expert is loaded.
    pub fn wait(self) -> Result<ExpertHandle> {
        (self.wait)()
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
            .ok_or_else(|| Error::InvalidModel(format!("no MoE layer {layer}")))?;
        ids.iter()
            .map(|&id| {
                experts
                    .get(id)
                    .map(|e| ExpertHandle::new(e.clone()))
                    .ok_or_else(|| Error::InvalidModel(format!("no expert {id} in layer {layer}")))
            })
            .collect()
    }
}

/// Each position of `x` `[T, hidden]` through the experts of `layer` it was routed to: `ids[t]`
/// with weights `weights[t]`, summed in ascending expert order as the reference sums them.
pub fn apply(
    experts: &dyn ExpertProvider,
    layer: usize,
    x: &Tensor,
    ids: &[Vec<usize>],
    weights: &[Vec<f32>],
    form: &ExpertForm,
) -> Result<Tensor> {
    // Tokens per expert, experts in ascending order as the reference accumulates them.
    let mut by_expert: BTreeMap<usize, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
    for (t, (ids, weights)) in ids.iter().zip(weights).enumerate() {
        for (&e, &w) in ids.iter().zip(weights) {
            let entry = by_expert.entry(e).or_default();
            entry.0.push(t as u32);
            entry.1.push(w);
        }
    }
    let routed: Vec<Assignment> = by_expert.into_iter().collect();
    let mut out = x.zeros_like()?;
    // Every expert's positions and weights, taken to the device once per layer (each expert's
    // are a slice of them), on the path that computes there.
    let mut on_device: Option<(Tensor, Tensor, Vec<usize>)> = None;
    // `x`'s values for the quantized kernels, taken once for every batch that needs them.
    let mut rows: Option<Vec<f32>> = None;
    // In batches the provider can hold at once; accumulation stays in ascending expert order.
    // Each expert is waited for only when its turn comes: computing one overlaps reading the
    // next, and its pin is released as soon as it has been applied.
    let per_batch = experts.max_batch().max(1);
    for (b, batch) in routed.chunks(per_batch).enumerate() {
        let ids: Vec<usize> = batch.iter().map(|(e, _)| *e).collect();
        let mut pending = experts.request(layer, &ids)?;
        if pending.is_empty() {
            continue;
        }
        // The experts' form is told by one already loaded where there is one: waiting for a
        // miss first would leave nothing to compute while it is read.
        let probe = pending
            .iter()
            .position(PendingExpert::is_loaded)
            .unwrap_or(0);
        let probed = pending.remove(probe).wait()?;
        let quantized = probed.quantized(x).is_some();
        pending.insert(probe, PendingExpert::ready(probed));
        if quantized {
            // The quantized kernels take experts a group at a time, in two passes over the thread
            // pool instead of two per expert. A group is a decode step's experts; in a
            // prompt, computing one group overlaps reading the next. The input's rows and the
            // sum are plain vectors for the whole batch: a tensor round trip per group copied
            // the prompt's hidden states three times over each time.
            let rows = match &mut rows {
                Some(rows) => rows,
                None => rows.insert(x.flatten_all()?.to_vec1::<f32>()?),
            };
            let mut sum = out.flatten_all()?.to_vec1::<f32>()?;
            let mut pending = pending.into_iter();
            for group in batch.chunks(KERNEL_GROUP) {
                let members = pending.by_ref().take(group.len()).collect();
                mix_quantized(&mut sum, rows, x, members, group, form)?;
            }
            out = Tensor::from_vec(sum, out.shape(), out.device())?;
            continue;
        }
        let (indices, all_weights, starts) = match &mut on_device {
            Some(uploaded) => uploaded,
            None => on_device.insert(upload_assignments(&routed, x)?),
        };
        let first_of_batch = b * per_batch;
        let batch_experts = pending.into_iter().map(PendingExpert::wait).zip(batch);
        for (i, (handle, (expert, (tokens, _)))) in batch_experts.enumerate() {
            let handle = handle?;
            let (n, start) = (tokens.len(), starts[first_of_batch + i]);
            let weights = all_weights.narrow(0, start, n)?;
            if x.dim(0)? == 1 {
                // A decode step: the one position is the expert's whole input.
                let y = handle.forward_as(x, form, *expert)?;
                out = (out + y.broadcast_mul(&weights)?)?;
                continue;
            }
            let index = indices.narrow(0, start, n)?;
            let y = handle
                .forward_as(&x.index_select(&index, 0)?, form, *expert)?
                .broadcast_mul(&weights)?;
            out = out.index_add(&index, &y, 0)?;
        }
    }
    Ok(out)
}

/// The positions `[n]` and weights `[n, 1]` (in `x`'s type) of every assignment of `routed`
/// on `x`'s device, one after another, with where each expert's begin.
fn upload_assignments(routed: &[Assignment], x: &Tensor) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let mut starts = Vec::with_capacity(routed.len());
    let (mut tokens, mut weights) = (Vec::new(), Vec::new());
    for (_, (t, w)) in routed {
        starts.push(tokens.len());
        tokens.extend_from_slice(t);
        weights.extend_from_slice(w);
    }
    let n = tokens.len();
    Ok((
        Tensor::from_vec(tokens, n, x.device())?,
        Tensor::from_vec(weights, (n, 1), x.device())?.to_dtype(x.dtype())?,
        starts,
    ))
}

/// Experts the quantized kernels compute together: the top-k of the architectures served.
const KERNEL_GROUP: usize = 8;

/// An expert, the positions routed to it, and their routing weights.
type Assignment = (usize, (Vec<u32>, Vec<f32>));

/// Adds to `sum` (`[T, hidden]`, row-major) each expert's output on its tokens of `rows` (`x`'s
/// values) times its routing weight, in the order of `batch` (ascending expert ids) as the
/// candle path adds them. `members` are `batch`'s experts: those loaded already are computed
/// first, while the others are read (else a decode step whose layer misses one expert waits
/// for its read with the seven others' compute still to do). Each expert's output does not
/// depend on which others are computed with it, and the sum adds them in `batch`'s order all
/// the same, so the result is the same whichever were loaded.
fn mix_quantized(
    sum: &mut [f32],
    rows: &[f32],
    x: &Tensor,
    members: Vec<PendingExpert>,
    batch: &[Assignment],
    form: &ExpertForm,
) -> Result<()> {
    let (_, hidden) = x.dims2()?;
    let (loaded, later): (Vec<usize>, Vec<usize>) =
        (0..members.len()).partition(|&i| members[i].is_loaded());
    let mut members: Vec<Option<PendingExpert>> = members.into_iter().map(Some).collect();
    let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); members.len()];
    for turn in [loaded, later] {
        if turn.is_empty() {
            continue;
        }
        let handles = turn
            .iter()
            .map(|&i| members[i].take().expect("each expert is taken once").wait())
            .collect::<Result<Vec<_>>>()?;
        let assigned: Vec<&Assignment> = turn.iter().map(|&i| &batch[i]).collect();
        for (&i, y) in turn
            .iter()
            .zip(outputs_of(rows, x, &handles, &assigned, form)?)
        {
            outputs[i] = y;
        }
    }
    for (y, (_, (tokens, weights))) in outputs.iter().zip(batch) {
        for ((&t, &w), y) in tokens.iter().zip(weights).zip(y.chunks_exact(hidden)) {
            let row = &mut sum[t as usize * hidden..(t as usize + 1) * hidden];
            for (acc, v) in row.iter_mut().zip(y) {
                *acc += v * w;
            }
        }
    }
    Ok(())
}

/// Each of `handles`' output (down bias included) on its tokens of `rows`, as `assigned` routes
/// them: one row of `x`'s width per token.
fn outputs_of(
    rows: &[f32],
    x: &Tensor,
    handles: &[ExpertHandle],
    assigned: &[&Assignment],
    form: &ExpertForm,
) -> Result<Vec<Vec<f32>>> {
    let (_, hidden) = x.dims2()?;
    let weights: Vec<quantized::GluWeights> = handles
        .iter()
        .map(|h| h.quantized(x).ok_or_else(mixed_types))
        .collect::<Result<_>>()?;
    let formats: Vec<_> = weights.iter().map(|w| w.input_formats()).collect();
    let gathered: Vec<(&[u32], &[quantized::Format])> = assigned
        .iter()
        .zip(&formats)
        .map(|((_, (tokens, _)), meets)| (tokens.as_slice(), meets.as_slice()))
        .collect();
    let inputs = quantized::Activations::gather_each(rows, hidden, &gathered);
    let experts: Vec<_> = weights.into_iter().zip(&inputs).collect();
    let ids: Vec<usize> = assigned.iter().map(|(e, _)| *e).collect();
    let mut outputs = form.glu(&experts, &ids)?;
    for (y, &e) in outputs.iter_mut().zip(&ids) {
        form.add_down_bias(e, y);
    }
    Ok(outputs)
}

fn mixed_types() -> Error {
    Error::InvalidModel("a layer's experts mix block types the kernels take with others".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use candle_core::Device;
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    const HIDDEN: usize = 64;
    const WIDTH: usize = 96;

    fn q8_0(rows: usize, cols: usize, seed: u64) -> QMatMul {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()).unwrap()
    }

    fn expert(seed: u64) -> Arc<GluMlp> {
        Arc::new(GluMlp::from_candle(
            q8_0(WIDTH, HIDDEN, 3 * seed),
            q8_0(WIDTH, HIDDEN, 3 * seed + 1),
            q8_0(HIDDEN, WIDTH, 3 * seed + 2),
        ))
    }

    /// What happened to the experts of a call, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    /// Logs its expert's release when the handle holding it drops.
    struct Released(usize, Log);

    impl Drop for Released {
        fn drop(&mut self) {
            self.1.lock().unwrap().push(format!("released {}", self.0));
        }
    }

    /// Experts all in memory but the first asked for, which is still being read: waiting for it
    /// is logged.
    struct FirstStillRead {
        experts: ResidentExperts,
        log: Log,
    }

    impl ExpertProvider for FirstStillRead {
        fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertHandle>> {
            self.experts.experts(layer, ids)
        }

        fn request(&self, _: usize, ids: &[usize]) -> Result<Vec<PendingExpert>> {
            Ok(ids
                .iter()
                .map(|&id| {
                    let weights = self.experts.layers[0][id].clone();
                    let released = Box::new(Released(id, self.log.clone()));
                    let handle = ExpertHandle::pinned(weights, released);
                    if id != ids[0] {
                        return PendingExpert::ready(handle);
                    }
                    let log = self.log.clone();
                    let wait = move || {
                        log.lock().unwrap().push(format!("waited {id}"));
                        Ok(handle)
                    };
                    PendingExpert::new(wait, || false)
                })
                .collect())
        }
    }

    #[test]
    fn experts_in_memory_are_computed_while_a_miss_is_read_with_the_same_sum() {
        let experts = ResidentExperts {
            layers: vec![(0..8).map(expert).collect()],
        };
        let x = Tensor::from_vec(
            (0..HIDDEN).map(|i| (i as f32 * 0.37).sin()).collect(),
            (1, HIDDEN),
            &Device::Cpu,
        )
        .unwrap();
        let ids = vec![(0..8).collect::<Vec<_>>()];
        let weights = vec![(1..=8).map(|w| w as f32 / 36.0).collect::<Vec<_>>()];
        let form = ExpertForm::default();
        let resident = apply(&experts, 0, &x, &ids, &weights, &form).unwrap();
        let log = Log::default();
        let provider = FirstStillRead {
            experts,
            log: log.clone(),
        };
        let on_demand = apply(&provider, 0, &x, &ids, &weights, &form).unwrap();
        assert_eq!(
            resident.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            on_demand.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "the sum does not depend on which experts were read last"
        );
        if provider.experts.layers[0][0].quantized(&x).is_none() {
            // Without the quantized kernels (no SIMD they take), experts go one by one in order.
            return;
        }
        let log = log.lock().unwrap();
        let waited = log.iter().position(|e| e == "waited 0").expect("waited");
        for id in 1..8 {
            let released = log.iter().position(|e| *e == format!("released {id}"));
            assert!(
                released.is_some_and(|r| r < waited),
                "expert {id} should be computed and let go before the read of expert 0 is waited \
                 for: {log:?}"
            );
        }
    }
}
