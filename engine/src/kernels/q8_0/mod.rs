//! Q8_0 matrix products on x86-64 CPUs (with AVX-512 VNNI, else AVX2), computed from GGUF's block
//! layout as the file stores it.
//!
//! Why not candle's: its AVX2 loop converts each block's f16 scales through a function call and
//! widens products in two steps, so decode runs at about half the memory bandwidth; its VNNI path
//! keeps a repacked second copy of every matrix, which a byte-budgeted expert store cannot
//! afford. Here activations are quantized once per call (once for gate and up together), scales
//! are converted four at a time, two blocks go through one `vpdpbusd` (or one block through
//! maddubs/madd on AVX2), and rows are shared out over candle's own thread pool.
//!
//! Every output element is one row's dot product with one activation row, summed in the same
//! order whichever thread computes it, so results do not depend on the thread count: experts
//! read on demand give the bits resident ones give.

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Tensor};

use crate::error::Result;

const BLOCK: usize = 32;
/// An f16 scale, then 32 signed quants.
const BLOCK_BYTES: usize = 34;

/// The instructions the kernel runs on: AVX-512 VNNI where the CPU has it, else AVX2 (with FMA
/// and F16C). A process keeps to one, so its results never mix the two. Other CPUs have none
/// (`available` is false there, and candle's products run instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    Avx512Vnni,
    Avx2,
}

fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni");
            match (avx2, avx512) {
                (true, true) => Some(Isa::Avx512Vnni),
                (true, false) => Some(Isa::Avx2),
                (false, _) => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// Whether this CPU runs the kernel (checked once).
pub fn available() -> bool {
    isa().is_some()
}

/// The Q8_0 weight the kernel takes `x` through, if it can: a CPU tensor of f32 rows, on a CPU
/// that has the instructions.
pub fn eligible<'a>(w: &'a QMatMul, x: &Tensor) -> Option<&'a QTensor> {
    match w {
        QMatMul::QTensor(q)
            if q.dtype() == GgmlDType::Q8_0
                && x.device().is_cpu()
                && x.dtype() == DType::F32
                && q.shape().dims().len() == 2
                && available() =>
        {
            Some(q)
        }
        _ => None,
    }
}

/// `x W^T` for each Q8_0 `w` of `weights` (`[rows, cols]`, from [`eligible`]) and `x`
/// `[.., cols]`: `x` is quantized once and every product shares one pass over the pool.
pub fn forward(weights: &[&QTensor], x: &Tensor) -> Result<Vec<Tensor>> {
    let activations = Activations::of(x)?;
    let data = weights
        .iter()
        .map(|w| w.data())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut outputs: Vec<Vec<f32>> = weights
        .iter()
        .map(|w| vec![0f32; activations.len() * w.shape().dims()[0]])
        .collect();
    let mut jobs: Vec<Job> = data
        .iter()
        .zip(&mut outputs)
        .map(|(weights, out)| Job {
            weights,
            x: &activations,
            out,
        })
        .collect();
    matmul(&mut jobs);
    outputs
        .into_iter()
        .zip(weights)
        .map(|(out, w)| {
            let mut dims = x.dims().to_vec();
            *dims
                .last_mut()
                .expect("a matrix input has a last dimension") = w.shape().dims()[0];
            Ok(Tensor::from_vec(out, dims, x.device())?)
        })
        .collect()
}

/// An expert's gate, up and down projections, all Q8_0 and in reach of the kernel.
#[derive(Clone, Copy)]
pub struct GluWeights<'a> {
    pub gate: &'a QTensor,
    pub up: &'a QTensor,
    pub down: &'a QTensor,
}

/// `down(silu(gate(x)) * up(x))` of each expert for its own activations `[tokens, hidden]`,
/// as `[tokens, hidden]` rows: all gates and ups in one pass over the pool, then all downs.
pub fn glu(experts: &[(GluWeights, &Activations)]) -> Result<Vec<Vec<f32>>> {
    let mut width = Vec::with_capacity(experts.len());
    let mut data = Vec::with_capacity(2 * experts.len());
    for (w, _) in experts {
        width.push(w.gate.shape().dims2()?.0);
        data.push((w.gate.data()?, w.up.data()?));
    }
    let mut gated: Vec<Vec<f32>> = Vec::with_capacity(experts.len());
    let mut lifted: Vec<Vec<f32>> = Vec::with_capacity(experts.len());
    for ((_, x), &width) in experts.iter().zip(&width) {
        gated.push(vec![0f32; x.len() * width]);
        lifted.push(vec![0f32; x.len() * width]);
    }
    let mut jobs = Vec::with_capacity(2 * experts.len());
    for (((gate, up), (_, x)), (g, u)) in data
        .iter()
        .zip(experts)
        .zip(gated.iter_mut().zip(&mut lifted))
    {
        jobs.push(Job {
            weights: gate,
            x,
            out: g,
        });
        jobs.push(Job {
            weights: up,
            x,
            out: u,
        });
    }
    matmul(&mut jobs);
    let mut mids = Vec::with_capacity(experts.len());
    for ((g, u), &width) in gated.iter_mut().zip(&lifted).zip(&width) {
        for (g, u) in g.iter_mut().zip(u) {
            // SiLU as candle computes it.
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        mids.push(Activations::quantize(g, width));
    }
    let downs = experts
        .iter()
        .map(|(w, _)| w.down.data())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut outputs: Vec<Vec<f32>> = experts
        .iter()
        .map(|(w, x)| vec![0f32; x.len() * w.down.shape().dims()[0]])
        .collect();
    let mut jobs: Vec<Job> = downs
        .iter()
        .zip(&mids)
        .zip(&mut outputs)
        .map(|((weights, x), out)| Job { weights, x, out })
        .collect();
    matmul(&mut jobs);
    Ok(outputs)
}

/// Activation rows quantized to Q8_0 as llama.cpp does it: per block of 32, the scale
/// `max|x| / 127` rounded through f16, and `x / scale` rounded to the nearest integer.
pub struct Activations {
    quants: Vec<i8>,
    scales: Vec<f32>,
    cols: usize,
}

impl Activations {
    /// The rows of `x` `[.., cols]` (f32), quantized.
    pub fn of(x: &Tensor) -> Result<Self> {
        let cols = *x
            .dims()
            .last()
            .expect("a matrix input has a last dimension");
        Ok(Self::quantize(&x.flatten_all()?.to_vec1()?, cols))
    }

    /// Quantizes `x`, rows of `cols` values; `cols` is a multiple of 32.
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols),
            "Q8_0 rows of {cols} values"
        );
        let isa = isa().expect("the Q8_0 kernel needs AVX2 with FMA and F16C");
        let mut quants = vec![0i8; x.len()];
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        for (block, out) in x.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked the instructions; both blocks hold 32 values.
            scales.push(unsafe {
                match isa {
                    Isa::Avx512Vnni => avx512::quantize_block(block, out),
                    Isa::Avx2 => avx2::quantize_block(block, out),
                }
            });
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (isa, block, out);
        }
        Self {
            quants,
            scales,
            cols,
        }
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.quants.len() / self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.quants.is_empty()
    }
}

/// One product for [`matmul`]: a Q8_0 matrix `[rows, x.cols]` (its blocks) by the rows of `x`,
/// into `out` `[x.len(), rows]`.
pub struct Job<'a> {
    pub weights: &'a [u8],
    pub x: &'a Activations,
    pub out: &'a mut [f32],
}

/// Computes every job in one pass over the thread pool.
pub fn matmul(jobs: &mut [Job]) {
    // The rows of all jobs in one numbering, so a thread's range may span several matrices.
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    let mut total = 0;
    for job in jobs.iter() {
        let row_bytes = job.x.cols / BLOCK * BLOCK_BYTES;
        assert!(
            job.weights.len().is_multiple_of(row_bytes),
            "Q8_0 matrix of {} bytes, not rows of {} values",
            job.weights.len(),
            job.x.cols
        );
        let rows = job.weights.len() / row_bytes;
        assert_eq!(
            job.out.len(),
            job.x.len() * rows,
            "output of {rows} columns"
        );
        starts.push(total);
        total += rows;
    }
    starts.push(total);
    let outputs: Vec<usize> = jobs
        .iter_mut()
        .map(|j| j.out.as_mut_ptr() as usize)
        .collect();
    let jobs = &*jobs;
    let run = |range: std::ops::Range<usize>| {
        let mut row = range.start;
        let mut index = starts.partition_point(|&s| s <= row) - 1;
        while row < range.end {
            let job = &jobs[index];
            let (first, rows) = (starts[index], starts[index + 1] - starts[index]);
            let row_bytes = job.weights.len() / rows;
            let end = range.end.min(first + rows);
            for local in row - first..end - first {
                let weights = &job.weights[local * row_bytes..(local + 1) * row_bytes];
                for t in 0..job.x.len() {
                    let value = dot(weights, job.x, t);
                    // SAFETY: each (job, token, row) element is written by exactly one range
                    // item, and the outputs outlive the pool call.
                    unsafe { *(outputs[index] as *mut f32).add(t * rows + local) = value };
                }
            }
            row = end;
            index += 1;
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(total, run);
}

/// One weight row's dot product with activation row `t`.
fn dot(weights: &[u8], x: &Activations, t: usize) -> f32 {
    let blocks = x.cols / BLOCK;
    let quants = &x.quants[t * x.cols..(t + 1) * x.cols];
    let scales = &x.scales[t * blocks..(t + 1) * blocks];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: activations exist only where `isa` found the instructions, and the slices
        // hold `blocks` blocks each.
        unsafe {
            match isa() {
                Some(Isa::Avx512Vnni) => avx512::dot(weights, quants, scales),
                _ => avx2::dot(weights, quants, scales),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (weights, quants, scales);
        unreachable!("the Q8_0 kernel is only offered on x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A Q8_0 matrix `[rows, cols]` of values in [-1, 1) and activations `[tokens, cols]`.
    fn case(rows: usize, cols: usize, tokens: usize, seed: u64) -> (QTensor, Tensor) {
        let (w, x) = f32_case(rows, cols, tokens, seed);
        (QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), x)
    }

    fn f32_case(rows: usize, cols: usize, tokens: usize, seed: u64) -> (Tensor, Tensor) {
        let device = Device::Cpu;
        let w = Tensor::rand(-1f32, 1f32, (rows, cols), &device).unwrap();
        let w = (w * (1.0 + seed as f64)).unwrap();
        (
            w,
            Tensor::rand(-2f32, 2f32, (tokens, cols), &device).unwrap(),
        )
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let pairs = values(a).into_iter().zip(values(b));
        pairs.map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Block counts that take the four-block loop, its tail, or both; one and several tokens.
    /// The kernel's sum is the dequantized matrix times the dequantized activations, up to f32
    /// rounding.
    #[test]
    fn multiplies_the_dequantized_operands() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        for (i, (rows, cols, tokens)) in [(7, 32, 1), (5, 96, 3), (33, 160, 1), (64, 2048, 2)]
            .into_iter()
            .enumerate()
        {
            let (w, x) = case(rows, cols, tokens, i as u64);
            let ours = forward(&[&w], &x).unwrap().remove(0);
            assert_eq!(ours.dims(), &[tokens, rows]);
            let q = Activations::of(&x).unwrap();
            let dequantized: Vec<f32> = q
                .quants
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f32 * q.scales[i / BLOCK])
                .collect();
            let x = Tensor::from_vec(dequantized, (tokens, cols), &Device::Cpu).unwrap();
            let w = w.dequantize(&Device::Cpu).unwrap();
            let exact = x.matmul(&w.t().unwrap()).unwrap();
            let bound = 1e-6 * cols as f32 * 2.0 * (1.0 + i as f32);
            let diff = max_abs_diff(&ours, &exact);
            assert!(diff < bound, "{rows}x{cols}: {diff}");
        }
    }

    /// An element does not depend on what else is computed with it: the split of rows over
    /// threads, other tokens, or other matrices in the same pass.
    #[test]
    fn each_element_is_independent_of_the_batch() {
        if !available() {
            return;
        }
        let (a, x) = case(37, 256, 4, 1);
        let (b, _) = case(19, 256, 4, 2);
        let together = forward(&[&a, &b], &x).unwrap();
        for t in 0..4 {
            let row = x.narrow(0, t, 1).unwrap();
            for (w, all) in [(&a, &together[0]), (&b, &together[1])] {
                let alone = forward(&[w], &row).unwrap().remove(0);
                let same = all.narrow(0, t, 1).unwrap();
                assert_eq!(values(&alone), values(&same));
            }
        }
    }

    #[test]
    fn glu_is_down_of_silu_gate_times_up() {
        if !available() {
            return;
        }
        let (gate, x) = case(96, 64, 3, 1);
        let (up, _) = case(96, 64, 3, 2);
        let (down, _) = case(64, 96, 3, 3);
        let weights = GluWeights {
            gate: &gate,
            up: &up,
            down: &down,
        };
        let input = Activations::of(&x).unwrap();
        let ours = glu(&[(weights, &input)]).unwrap().remove(0);
        let ours = Tensor::from_vec(ours, (3, 64), &Device::Cpu).unwrap();
        let g = forward(&[&gate], &x).unwrap().remove(0);
        let u = forward(&[&up], &x).unwrap().remove(0);
        let mid = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
        let expected = forward(&[&down], &mid).unwrap().remove(0);
        assert!(max_abs_diff(&ours, &expected) < 1e-3);
    }

    /// Both instruction sets give the exact block sums, up to f32 rounding, including the -128
    /// a file may hold and the tail after the last four blocks; and they quantize alike.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_and_avx512_agree_with_exact_sums() {
        let Some(isa) = isa() else {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        };
        let blocks = 7;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut weights = vec![0u8; blocks * BLOCK_BYTES];
        let mut exact = 0f64;
        let x: Vec<f32> = (0..blocks * BLOCK)
            .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
            .collect();
        let activations = Activations::quantize(&x, blocks * BLOCK);
        for b in 0..blocks {
            // SAFETY: `isa` found F16C.
            let scale = unsafe { avx2::round_through_f16(0.01 + (next() % 100) as f32 / 1000.0) };
            let block = &mut weights[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
            block[..2].copy_from_slice(&f16_bits(scale).to_le_bytes());
            let mut sum = 0i64;
            for i in 0..BLOCK {
                let q = if i == 5 {
                    -128
                } else {
                    (next() % 255) as i64 - 127
                };
                block[2 + i] = q as i8 as u8;
                sum += q * activations.quants[b * BLOCK + i] as i64;
            }
            exact += scale as f64 * activations.scales[b] as f64 * sum as f64;
        }
        let quants = &activations.quants;
        let scales = &activations.scales;
        // SAFETY: `isa` found AVX2, FMA and F16C; the slices hold `blocks` blocks.
        let avx2 = unsafe { avx2::dot(&weights, quants, scales) };
        assert!(
            (avx2 as f64 - exact).abs() < 1e-4 * exact.abs().max(1.0),
            "{avx2} {exact}"
        );
        if isa == Isa::Avx512Vnni {
            // SAFETY: as above, and `isa` found AVX-512 VNNI.
            let avx512 = unsafe { avx512::dot(&weights, quants, scales) };
            assert!((avx512 as f64 - exact).abs() < 1e-4 * exact.abs().max(1.0));
            for block in x.chunks_exact(BLOCK) {
                let (mut a, mut b) = ([0i8; BLOCK], [0i8; BLOCK]);
                // SAFETY: as above.
                let scales = unsafe {
                    (
                        avx2::quantize_block(block, &mut a),
                        avx512::quantize_block(block, &mut b),
                    )
                };
                assert_eq!((scales.0.to_bits(), a), (scales.1.to_bits(), b));
            }
        }
    }

    /// The f16 nearest to `value`, as bits.
    #[cfg(target_arch = "x86_64")]
    fn f16_bits(value: f32) -> u16 {
        use std::arch::x86_64::*;
        // SAFETY: only called where `isa` found F16C.
        unsafe {
            let half = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(value));
            _mm_extract_epi16::<0>(half) as u16
        }
    }

    #[test]
    fn quantizes_as_llama_cpp() {
        if !available() {
            return;
        }
        let mut values: Vec<f32> = (0..32).map(|i| i as f32 * 0.37 - 6.0).collect();
        let q = Activations::quantize(&values, 32);
        let scale = 6.0f32 / 127.0;
        assert_eq!(q.scales, vec![half_round(scale)]);
        for (v, q) in values.iter().zip(&q.quants) {
            assert_eq!(*q as f32, (v * (1.0 / scale)).round_ties_even(), "{v}");
        }
        // With a scale of one, halves are ties and go to the even neighbour.
        values[0] = 127.0;
        values[1] = 2.5;
        values[2] = -3.5;
        let q = Activations::quantize(&values, 32);
        assert_eq!((q.scales[0], &q.quants[..3]), (1.0, &[127i8, 2, -4][..]));
        let zeros = Activations::quantize(&[0.0; 64], 32);
        assert_eq!((zeros.len(), zeros.scales), (2, vec![0.0, 0.0]));
        assert!(zeros.quants.iter().all(|&q| q == 0));
    }

    fn half_round(v: f32) -> f32 {
        let t = Tensor::new(&[v], &Device::Cpu).unwrap();
        t.to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()[0]
    }
}
