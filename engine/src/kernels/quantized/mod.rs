//! Matrix products in GGUF's 32-value block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4) and
//! K-quant types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) on x86-64 CPUs (with AVX-512 VNNI, else AVX2) and aarch64 CPUs
//! (NEON with dotprod), computed from the blocks as the file stores them.
//!
//! Why not candle's: it has no vector code at all for Q4_1, Q5_0 and Q5_1 (a Q4_1 prompt spent
//! 60% of its time in its scalar loop); its AVX2 Q8_0 loop converts each block's f16 scales
//! through a function call and widens products in two steps, so decode runs at about half the
//! memory bandwidth; its VNNI path keeps a repacked second copy of every matrix, which a
//! byte-budgeted expert store cannot afford (on aarch64 it repacks Q4_0, Q8_0 and the K-quants
//! whenever the CPU has dotprod, every Apple M-series chip among them). Here activations are quantized to Q8_0 once per call
//! (once for gate and up together) with each block's sum beside its scale, as llama.cpp's Q8_1
//! partner format keeps it: a 4- or 5-bit weight `d q + m` then needs only the integer dot of its
//! unsigned quants with the activation's, plus `m` times the activation block's sum. Rows are
//! shared out over candle's own thread pool.
//!
//! Every output element is one row's dot product with one activation row, summed in the same
//! order whichever thread computes it, so results do not depend on the thread count: experts
//! read on demand give the bits resident ones give.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Tensor};

use crate::error::Result;

const BLOCK: usize = 32;
/// Q8_0: an f16 scale, then 32 signed quants.
pub(crate) const BLOCK_BYTES: usize = 34;

/// The GGUF types the kernels take, in the order of [`Format`].
pub const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The block types the kernels compute in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    /// Not one of candle's types: its matrices are [`BlockMatrix`]es.
    Mxfp4,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q2K => Self::Q2K,
            GgmlDType::Q3K => Self::Q3K,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// Whether the format stores K-quant super-blocks, which meet Q8_K activations.
    pub fn is_super_block(self) -> bool {
        self.block_values() == k_quants::VALUES
    }

    /// Weights in one stored block: 32, or 256 in a K-quant super-block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => k_quants::VALUES,
            _ => BLOCK,
        }
    }

    /// Bytes of one stored block.
    pub fn block_bytes(self) -> usize {
        use k_quants::Layout;
        use small::Kind;
        match self {
            Self::Q8_0 => BLOCK_BYTES,
            Self::Q4_0 => small::Q4_0::BYTES,
            Self::Q4_1 => small::Q4_1::BYTES,
            Self::Q5_0 => small::Q5_0::BYTES,
            Self::Q5_1 => small::Q5_1::BYTES,
            Self::Mxfp4 => small::Mxfp4::BYTES,
            Self::Q2K => k_quants::Q2K::BYTES,
            Self::Q3K => k_quants::Q3K::BYTES,
            Self::Q4K => k_quants::Q4K::BYTES,
            Self::Q5K => k_quants::Q5K::BYTES,
            Self::Q6K => k_quants::Q6K::BYTES,
        }
    }

    /// Bytes of a row of `cols` weights (a multiple of [`Format::block_values`]).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_values() * self.block_bytes()
    }
}

/// The e2m1 values of MXFP4's codes doubled, as integers (ggml's `kvalues_mxfp4`).
pub const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// An MXFP4 block's scale for the doubled values: `2^(e - 128)` for the exponent byte `e`, exact
/// in f32 (subnormal for `e` of 0 and 1), as ggml's `GGML_E8M0_TO_FP32_HALF`.
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// The instructions the kernels run on: on x86-64 AVX-512 VNNI where the CPU has it, else AVX2
/// (with FMA and F16C); on aarch64 NEON with dotprod. A process keeps to one, so its results
/// never mix two. Other CPUs have none (`available` is false there, and candle's products run
/// instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    NeonDotprod,
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match *self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => "AVX-512 VNNI",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "AVX2",
            #[cfg(target_arch = "aarch64")]
            Self::NeonDotprod => "NEON dotprod",
        })
    }
}

/// The environment variable that, set to `avx2`, holds an AVX-512 CPU's kernels to AVX2.
#[cfg(target_arch = "x86_64")]
pub const HOLD_VARIABLE: &str = "ODMOE_KERNELS";

/// Runs this test binary's tests chosen by `args` (a filter and its flags) again in a process
/// held to AVX2, panicking with its report unless they pass, and returns how many passed. For
/// tests: they run on AVX-512 CPUs, which would otherwise never take the AVX2 path.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub fn rerun_held_to_avx2(args: &[&str]) -> usize {
    let run = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(args)
        .args(["--test-threads", "2"])
        .env(HOLD_VARIABLE, "avx2")
        .output()
        .expect("the test binary runs again");
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "held to AVX2:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    report
        .lines()
        .find_map(|line| line.strip_prefix("test result: ok. "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The instruction set this process computes with, if the CPU has one the kernels use.
pub fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            // Held to AVX2 on request: the path of CPUs without AVX-512, tested and timed on
            // CPUs that have it.
            let held_to_avx2 = std::env::var_os(HOLD_VARIABLE).is_some_and(|v| v == "avx2");
            match (avx2, avx512 && !held_to_avx2) {
                (true, true) => Some(Isa::Avx512Vnni),
                (true, false) => Some(Isa::Avx2),
                (false, _) => None,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("dotprod").then_some(Isa::NeonDotprod)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            None
        }
    })
}

/// Whether this CPU runs the kernels (checked once).
pub fn available() -> bool {
    isa().is_some()
}

/// A matrix as the kernels take it: `rows` rows of blocks in `format`, as stored.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub format: Format,
    pub blocks: &'a [u8],
    pub rows: usize,
}

/// The weight the kernels take `x` through, if they can: a matrix in one of their block types
/// (whole blocks per row) held on the CPU, for a CPU tensor of f32 rows, on a CPU that has the
/// instructions.
pub fn eligible<'a>(w: &'a QMatMul, x: &Tensor) -> Option<Weight<'a>> {
    let QMatMul::QTensor(q) = w else {
        return None;
    };
    let format = Format::of(q.dtype())?;
    let &[rows, cols] = q.shape().dims() else {
        return None;
    };
    if !cols.is_multiple_of(format.block_values()) || !takes(x) {
        return None;
    }
    // Borrowed where the blocks are in host memory, which is where the kernels read them.
    match q.data().ok()? {
        std::borrow::Cow::Borrowed(blocks) => Some(Weight {
            format,
            blocks,
            rows,
        }),
        std::borrow::Cow::Owned(_) => None,
    }
}

/// Whether the kernels take `x` as input: f32 rows on the CPU, on a CPU that has their
/// instructions.
pub fn takes(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && available()
}

/// The bytes of a matrix's blocks: a vector of its own, or a range of a buffer it shares, such
/// as the buffer an expert was read into, held as read rather than copied out of it.
#[derive(Clone)]
pub struct BlockBytes {
    buffer: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl BlockBytes {
    /// `range` of `buffer`, or `None` if the buffer is shorter.
    pub fn shared(buffer: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        (range.start <= range.end && range.end <= (*buffer).as_ref().len())
            .then_some(Self { buffer, range })
    }
}

impl From<Vec<u8>> for BlockBytes {
    fn from(blocks: Vec<u8>) -> Self {
        let range = 0..blocks.len();
        Self {
            buffer: Arc::new(blocks),
            range,
        }
    }
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.buffer).as_ref()[self.range.clone()]
    }
}

/// A matrix of blocks the kernels multiply, held as the file stores them: `[rows, cols]`, `cols`
/// a multiple of the format's block. MXFP4, which candle does not have, is always one; other
/// types are one when an expert's matrix is held in the buffer it was read into.
#[derive(Clone)]
pub struct BlockMatrix {
    format: Format,
    blocks: BlockBytes,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl BlockMatrix {
    /// `blocks`, rows of `cols` values in `format`, as a matrix; `None` if they are not whole
    /// rows of whole blocks.
    pub fn new(format: Format, blocks: impl Into<BlockBytes>, cols: usize) -> Option<Self> {
        let blocks = blocks.into();
        let row_bytes = format.row_bytes(cols);
        (cols > 0
            && cols.is_multiple_of(format.block_values())
            && blocks.len().is_multiple_of(row_bytes))
        .then(|| Self {
            format,
            rows: blocks.len() / row_bytes,
            blocks,
            cols,
        })
    }

    /// The matrix as the kernels take it.
    pub fn weight(&self) -> Weight<'_> {
        Weight {
            format: self.format,
            blocks: &self.blocks,
            rows: self.rows,
        }
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes held: the blocks as stored.
    pub fn bytes(&self) -> usize {
        self.blocks.len()
    }
}

/// `x W^T` for each `w` of `weights` (`[rows, cols]`, from [`eligible`]) and `x` `[.., cols]`:
/// `x` is quantized once and every product shares one pass over the pool.
pub fn forward(weights: &[Weight], x: &Tensor) -> Result<Vec<Tensor>> {
    let formats: Vec<Format> = weights.iter().map(|w| w.format).collect();
    let activations = Activations::of(x, &formats)?;
    let mut outputs: Vec<Vec<f32>> = weights
        .iter()
        .map(|w| vec![0f32; activations.len() * w.rows])
        .collect();
    let mut jobs: Vec<Job> = weights
        .iter()
        .zip(&mut outputs)
        .map(|(w, out)| Job::new(w, &activations, out))
        .collect();
    matmul(&mut jobs);
    outputs
        .into_iter()
        .zip(weights)
        .map(|(out, w)| {
            let mut dims = x.dims().to_vec();
            *dims
                .last_mut()
                .expect("a matrix input has a last dimension") = w.rows;
            Ok(Tensor::from_vec(out, dims, x.device())?)
        })
        .collect()
}

/// An expert's gate, up and down projections, all in reach of the kernels (their block types may
/// differ).
#[derive(Clone, Copy)]
pub struct GluWeights<'a> {
    pub gate: Weight<'a>,
    pub up: Weight<'a>,
    pub down: Weight<'a>,
}

impl GluWeights<'_> {
    /// The formats the expert's input meets (its gate's and up's), to quantize it for.
    pub fn input_formats(&self) -> [Format; 2] {
        [self.gate.format, self.up.format]
    }
}

/// `down(silu(gate(x)) * up(x))` of each expert for its own activations `[tokens, hidden]`,
/// as `[tokens, hidden]` rows: all gates and ups in one pass over the pool, then all downs.
pub fn glu(experts: &[(GluWeights, &Activations)]) -> Result<Vec<Vec<f32>>> {
    glu_with(experts, &|_, gate, up| silu_times(gate, up))
}

/// How an expert's gate and up rows (`[tokens, width]` each) become its down projection's
/// input, written over the gate's: called with the expert's index in the list given to
/// [`glu_with`].
pub type Combine<'a> = &'a (dyn Fn(usize, &mut [f32], &[f32]) + Sync);

/// `silu(gate) * up` in place in `gate`, SiLU as candle computes it.
pub fn silu_times(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// [`glu`] with the gate and up products combined by `combine` (gpt-oss's biases and clamped
/// SwiGLU; the down projection's bias is the caller's to add).
pub fn glu_with(experts: &[(GluWeights, &Activations)], combine: Combine) -> Result<Vec<Vec<f32>>> {
    let width: Vec<usize> = experts.iter().map(|(w, _)| w.gate.rows).collect();
    let mut gated: Vec<Vec<f32>> = Vec::with_capacity(experts.len());
    let mut lifted: Vec<Vec<f32>> = Vec::with_capacity(experts.len());
    for ((_, x), &width) in experts.iter().zip(&width) {
        gated.push(vec![0f32; x.len() * width]);
        lifted.push(vec![0f32; x.len() * width]);
    }
    let mut jobs = Vec::with_capacity(2 * experts.len());
    for ((w, x), (g, u)) in experts.iter().zip(gated.iter_mut().zip(&mut lifted)) {
        jobs.push(Job::new(&w.gate, x, g));
        jobs.push(Job::new(&w.up, x, u));
    }
    matmul(&mut jobs);
    // Each expert's combination and quantization is one item on the pool: together they cost
    // as much as a small product.
    let gated: Vec<Mutex<Vec<f32>>> = gated.into_iter().map(Mutex::new).collect();
    let mids = super::on_pool(experts.len(), |e| {
        let mut gate = gated[e]
            .lock()
            .expect("an expert's gate rows are taken once");
        combine(e, &mut gate, &lifted[e]);
        Activations::quantize(&gate, width[e], &[experts[e].0.down.format])
    });
    let mut outputs: Vec<Vec<f32>> = experts
        .iter()
        .map(|(w, x)| vec![0f32; x.len() * w.down.rows])
        .collect();
    let mut jobs: Vec<Job> = experts
        .iter()
        .zip(&mids)
        .zip(&mut outputs)
        .map(|(((w, _), x), out)| Job::new(&w.down, x, out))
        .collect();
    matmul(&mut jobs);
    Ok(outputs)
}

/// Rows a thread quantizes at a time when [`Activations::of`] shares a prompt out.
const ROWS_PER_SHARE: usize = 32;

/// Activation rows quantized as llama.cpp quantizes them for each weight type. For the 32-value
/// types, Q8_0: per block of 32, the scale `max|x| / 127` rounded through f16, and `x / scale`
/// rounded to the nearest integer, with each block's sum as llama.cpp's Q8_1 keeps it (the
/// unrounded scale times the sum of the quants, rounded through f16) for the types with an
/// offset. For the K-quants, Q8_K (rows of whole super-blocks only): see
/// [`Activations::quantize_super_blocks`]. Each form is made only when a weight met needs it.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub struct Activations {
    quants: Vec<i8>,
    /// Per block of 32.
    scales: Vec<f32>,
    /// Q8_0: per block of 32, the scale times the quants' sum through f16 (Q8_1's). Q8_K has
    /// none: its products take zero points and offsets off in integers.
    sums: Vec<f32>,
    /// The quants' integer sums: Q8_0 per block of 32, Q8_K per 16 (as llama.cpp's Q8_K blocks
    /// keep them).
    integer_sums: Vec<i16>,
    cols: usize,
    rows: usize,
    /// The same rows in Q8_K, where they hold whole super-blocks.
    super_blocks: Option<Box<Activations>>,
}

impl Activations {
    /// The rows of `x` `[.., cols]` (f32), quantized for weights in `meets`: a prompt's rows in
    /// shares over the thread pool, since quantizing them costs as much as a small product.
    pub fn of(x: &Tensor, meets: &[Format]) -> Result<Self> {
        let cols = *x
            .dims()
            .last()
            .expect("a matrix input has a last dimension");
        let values: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let rows = values.len() / cols.max(1);
        if rows < 2 * ROWS_PER_SHARE {
            return Ok(Self::quantize(&values, cols, meets));
        }
        let shares = super::on_pool(rows.div_ceil(ROWS_PER_SHARE), |i| {
            let share = i * ROWS_PER_SHARE..((i + 1) * ROWS_PER_SHARE).min(rows);
            Self::quantize(&values[share.start * cols..share.end * cols], cols, meets)
        });
        Ok(Self::joined(shares))
    }

    /// The rows of `parts`, one part after another (each quantized for the same weights).
    fn joined(parts: Vec<Self>) -> Self {
        let mut parts = parts.into_iter();
        let mut all = parts.next().expect("at least one part");
        for part in parts {
            all.quants.extend(part.quants);
            all.scales.extend(part.scales);
            all.sums.extend(part.sums);
            all.integer_sums.extend(part.integer_sums);
            all.rows += part.rows;
            if let (Some(all), Some(part)) = (all.super_blocks.as_mut(), part.super_blocks) {
                all.quants.extend(part.quants);
                all.scales.extend(part.scales);
                all.sums.extend(part.sums);
                all.integer_sums.extend(part.integer_sums);
                all.rows += part.rows;
            }
        }
        all
    }

    /// Each of `inputs` quantized, over the thread pool: `(tokens, meets)` takes the rows
    /// `tokens` of `x` (rows of `cols` values) for weights in `meets`, as a prompt's tokens
    /// routed to one expert. The rows are read where they are, not gathered first.
    pub fn gather_each(x: &[f32], cols: usize, inputs: &[(&[u32], &[Format])]) -> Vec<Self> {
        super::on_pool(inputs.len(), |i| {
            let (tokens, meets) = inputs[i];
            let rows: Vec<&[f32]> = tokens
                .iter()
                .map(|&t| &x[t as usize * cols..][..cols])
                .collect();
            Self::quantize_rows(&rows, cols, meets)
        })
    }

    /// Quantizes `x`, rows of `cols` values (a multiple of 32), for weights in `meets`: to Q8_0
    /// when a 32-value type is among them, to Q8_K when a K-quant is (then `cols` is a multiple
    /// of 256). An expert whose projections are all K-quants (a Q4_K_M file's) skips Q8_0.
    pub fn quantize(x: &[f32], cols: usize, meets: &[Format]) -> Self {
        assert!(
            cols > 0 && x.len().is_multiple_of(cols),
            "rows of {cols} values"
        );
        let rows: Vec<&[f32]> = x.chunks_exact(cols).collect();
        Self::quantize_rows(&rows, cols, meets)
    }

    /// [`quantize`](Self::quantize) of `rows`, each of `cols` values, wherever they lie.
    fn quantize_rows(rows: &[&[f32]], cols: usize, meets: &[Format]) -> Self {
        assert!(
            cols.is_multiple_of(BLOCK) && rows.iter().all(|row| row.len() == cols),
            "Q8_0 rows of {cols} values"
        );
        let isa = isa().expect("the kernels' instructions on this CPU");
        let q8_0 = meets.iter().any(|format| !format.is_super_block());
        let values = if q8_0 { rows.len() * cols } else { 0 };
        let mut quants = vec![0i8; values];
        let mut scales = Vec::with_capacity(values / BLOCK);
        let mut sums = Vec::with_capacity(values / BLOCK);
        let mut integer_sums = Vec::with_capacity(values / BLOCK);
        let blocks = rows.iter().flat_map(|row| row.chunks_exact(BLOCK));
        for (block, out) in blocks.zip(quants.chunks_exact_mut(BLOCK)) {
            let scale = quantize_block(isa, block, out);
            // At most 32 * 127 in magnitude.
            let sum = out.iter().map(|&q| q as i16).sum::<i16>();
            integer_sums.push(sum);
            // Both stored as f16 by llama.cpp (its Q8_0 and Q8_1 blocks), the sum from the
            // unrounded scale.
            scales.push(round_through_f16(scale));
            sums.push(round_through_f16(scale * sum as f32));
        }
        let super_blocks = meets
            .iter()
            .any(|format| format.is_super_block())
            .then(|| Box::new(Self::quantize_super_blocks(rows, cols)));
        Self {
            quants,
            scales,
            sums,
            integer_sums,
            cols,
            rows: rows.len(),
            super_blocks,
        }
    }

    /// Rows of whole super-blocks quantized to Q8_K as llama.cpp does it for its K-quant
    /// products: per 256 values, `x` times `-127 / max` (`max` the value of largest magnitude,
    /// so it becomes -127) rounded to the nearest integer (at most 127), and the scale
    /// `max / -127` kept in f32 (given for each of its blocks of 32), with the integer sums of
    /// each 16 quants.
    fn quantize_super_blocks(rows: &[&[f32]], cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(k_quants::VALUES),
            "Q8_K rows of {cols} values"
        );
        let values = rows.len() * cols;
        let mut quants = vec![0i8; values];
        let mut scales = Vec::with_capacity(values / BLOCK);
        let mut integer_sums = Vec::with_capacity(2 * values / BLOCK);
        let super_blocks = rows
            .iter()
            .flat_map(|row| row.chunks_exact(k_quants::VALUES));
        for (block, out) in super_blocks.zip(quants.chunks_exact_mut(k_quants::VALUES)) {
            let scale = super_block_quants(block, out);
            scales.extend([scale; k_quants::SUB_BLOCKS]);
            for sixteen in out.chunks_exact(16) {
                // At most 16 * 127 in magnitude.
                integer_sums.push(sixteen.iter().map(|&q| q as i16).sum::<i16>());
            }
        }
        Self {
            quants,
            scales,
            sums: Vec::new(),
            integer_sums,
            cols,
            rows: rows.len(),
            super_blocks: None,
        }
    }

    /// The quantization a weight of `format` meets.
    fn for_format(&self, format: Format) -> &Self {
        if format.is_super_block() {
            self.super_blocks
                .as_deref()
                .expect("activations quantized for a K-quant weight have Q8_K rows")
        } else {
            assert!(
                self.quants.len() == self.rows * self.cols,
                "activations quantized for a 32-value weight have Q8_0 rows"
            );
            self
        }
    }

    /// Token `t`'s activations, as the dot products take them.
    fn token(&self, t: usize) -> Token<'_> {
        let blocks = self.cols / BLOCK;
        let per_row = |all: usize| blocks * (all / self.scales.len().max(1));
        let (sums, integer_sums) = (per_row(self.sums.len()), per_row(self.integer_sums.len()));
        Token {
            quants: &self.quants[t * self.cols..][..self.cols],
            scales: &self.scales[t * blocks..][..blocks],
            sums: &self.sums[t * sums..][..sums],
            integer_sums: &self.integer_sums[t * integer_sums..][..integer_sums],
        }
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// One token's row of [`Activations`].
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct Token<'a> {
    quants: &'a [i8],
    /// Per block of 32.
    scales: &'a [f32],
    /// Q8_1's, per block of 32 (none in Q8_K).
    sums: &'a [f32],
    /// Per block of 32 (Q8_0) or per 16 quants (Q8_K).
    integer_sums: &'a [i16],
}

/// `values` (a multiple of 32) as GGUF Q8_0 blocks appended to `out`: per 32 values an f16 scale
/// (the largest magnitude over 127) and the values over the unrounded scale rounded half to
/// even, as activations are quantized here.
pub fn q8_0_blocks(values: &[f32], out: &mut Vec<u8>) {
    assert!(
        values.len().is_multiple_of(BLOCK),
        "Q8_0 blocks of 32 values"
    );
    out.reserve(values.len() / BLOCK * BLOCK_BYTES);
    // The instructions the activations are quantized with, where the CPU has them (the same
    // bits as plain code, faster).
    let isa = isa();
    let mut quants = [0i8; BLOCK];
    for block in values.chunks_exact(BLOCK) {
        let scale = match isa {
            Some(isa) => quantize_block(isa, block, &mut quants),
            None => quantize_block_in_order(block, &mut quants),
        };
        out.extend_from_slice(&::half::f16::from_f32(scale).to_bits().to_le_bytes());
        out.extend(quants.iter().map(|&q| q as u8));
    }
}

/// Bytes of `values` values (a multiple of 32) in Q8_0.
pub const fn q8_0_bytes(values: usize) -> usize {
    values / BLOCK * BLOCK_BYTES
}

/// Values in `bytes` bytes of Q8_0 blocks.
pub const fn q8_0_values(bytes: usize) -> usize {
    bytes / BLOCK_BYTES * BLOCK
}

/// Quantizes 32 values to Q8_0 into `out` and returns their scale, not yet rounded: the largest
/// magnitude over 127, and each value over it rounded half to even (saturating).
fn quantize_block(isa: Isa, block: &[f32], out: &mut [i8]) -> f32 {
    // SAFETY: `isa` found the instructions; both slices hold 32 values.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512::quantize_block(block, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::quantize_block(block, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDotprod => quantize_block_in_order(block, out),
    }
}

/// [`quantize_block`] in plain code, which the compiler vectorizes for the instructions of the
/// function it is inlined into.
#[inline(always)]
fn quantize_block_in_order(block: &[f32], out: &mut [i8]) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in out.iter_mut().zip(block) {
        *q = (v * inverse).round_ties_even() as i8;
    }
    scale
}

/// `value` rounded to the nearest f16 (ties to even), as f32.
fn round_through_f16(value: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: every x86-64 instruction set the kernels take has F16C.
    unsafe {
        avx2::round_through_f16(value)
    }
    #[cfg(not(target_arch = "x86_64"))]
    ::half::f16::from_f32(value).to_f32()
}

/// Quantizes one super-block of 256 values into `out` and returns its scale (see
/// [`Activations::quantize_super_blocks`]).
fn super_block_quants(block: &[f32], out: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: every x86-64 instruction set the kernels take has AVX2.
    let largest = unsafe { avx2::largest_magnitude(block) };
    #[cfg(not(target_arch = "x86_64"))]
    let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    // The first value of that magnitude, the one llama.cpp's scan keeps.
    let max = block
        .iter()
        .copied()
        .find(|v| v.abs() == largest)
        .unwrap_or(0.0);
    if max == 0.0 {
        return 0.0;
    }
    let inverse = -127.0 / max;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available` found AVX2.
        unsafe { avx2::scale_and_round(block, inverse, out) };
        return 1.0 / inverse;
    }
    for (q, &v) in out.iter_mut().zip(block) {
        *q = ((inverse * v).round_ties_even() as i32).min(127) as i8;
    }
    1.0 / inverse
}

/// One product for [`matmul`]: a matrix `[rows, x.cols]` (its blocks, in `format`) by the rows
/// of `x`, into `out` `[x.len(), rows]`.
pub struct Job<'a> {
    format: Format,
    weights: &'a [u8],
    x: &'a Activations,
    out: &'a mut [f32],
}

impl<'a> Job<'a> {
    /// The product of `w` by `x`, into `out`.
    fn new(w: &Weight<'a>, x: &'a Activations, out: &'a mut [f32]) -> Self {
        Self {
            format: w.format,
            weights: w.blocks,
            x: x.for_format(w.format),
            out,
        }
    }
}

/// Computes every job in one pass over the thread pool.
pub fn matmul(jobs: &mut [Job]) {
    // The rows of all jobs in one numbering, in units of a tile's rows (a job's last unit may
    // be short), so that a thread's range may span several matrices and never cuts a tile: a
    // tile cut between two threads would be computed whole by each.
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    let mut rows_of = Vec::with_capacity(jobs.len());
    let mut total = 0;
    for job in jobs.iter() {
        let row_bytes = job.format.row_bytes(job.x.cols);
        assert!(
            job.weights.len().is_multiple_of(row_bytes),
            "{:?} matrix of {} bytes, not rows of {} values",
            job.format,
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
        rows_of.push(rows);
        total += rows.div_ceil(ROWS_TOGETHER);
    }
    starts.push(total);
    let outputs: Vec<usize> = jobs
        .iter_mut()
        .map(|j| j.out.as_mut_ptr() as usize)
        .collect();
    let jobs = &*jobs;
    let run = |units: Range<usize>| {
        let mut unit = units.start;
        let mut index = starts.partition_point(|&s| s <= unit) - 1;
        while unit < units.end {
            let (job, first, rows) = (&jobs[index], starts[index], rows_of[index]);
            let end = units.end.min(starts[index + 1]);
            let range = (unit - first) * ROWS_TOGETHER..((end - first) * ROWS_TOGETHER).min(rows);
            if !range.is_empty() {
                let row_bytes = job.weights.len() / rows;
                let out = outputs[index] as *mut f32;
                // SAFETY: each (job, token, row) element is written by exactly one range item,
                // and the outputs outlive the pool call.
                unsafe { product(job, range, row_bytes, out, rows) };
            }
            unit = end;
            index += 1;
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(total, run);
}

/// Rows [`matmul`] gives a thread together: AVX-512's tile (NEON's of four divide it).
const ROWS_TOGETHER: usize = 16;

/// Elements `(t, r)` of `job` for its every token `t` and the rows `rows` (of `row_bytes` bytes),
/// into `out[t * out_rows + r]`: AVX-512 takes groups of tokens through each row or tile of rows,
/// AVX2 a prompt's groups of tokens through each row, NEON a prompt's rows in tiles; a decode
/// step's token (and NEON's leftovers) go one dot product at a time.
///
/// # Safety
/// `out` has room for those elements, and nothing else writes them meanwhile.
unsafe fn product(job: &Job, rows: Range<usize>, row_bytes: usize, out: *mut f32, out_rows: usize) {
    let x = job.x;
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: activations exist only where `isa` found the instructions; the caller's.
        Some(Isa::Avx512Vnni) => {
            unsafe { avx512::product(job.format, job.weights, rows, x, out, out_rows) };
            return;
        }
        // SAFETY: as above. A decode step's one token takes `dots` (the same steps, so the
        // same bits): through the groups' code it ran slower.
        Some(Isa::Avx2) if x.len() > 1 => {
            unsafe { avx2::product(job.format, job.weights, rows, x, out, out_rows) };
            return;
        }
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if x.len() >= PROMPT_GROUP {
        let grouped = x.len() / PROMPT_GROUP * PROMPT_GROUP;
        let untiled = tiles(
            job.weights.len() / row_bytes,
            &rows,
            neon_tiles::TILE,
            |first| {
                // SAFETY: the tile's rows are inside the job's weights, which NEON with dotprod
                // (`isa`) multiplies; the caller's for `out`.
                unsafe {
                    neon_tiles::product(
                        job.format,
                        job.weights,
                        first,
                        row_bytes,
                        x,
                        0..grouped,
                        &rows,
                        out,
                        out_rows,
                    )
                }
            },
        );
        // SAFETY: the caller's.
        unsafe {
            dots(
                job,
                rows.start..untiled.start,
                grouped..x.len(),
                row_bytes,
                out,
                out_rows,
            );
            dots(job, untiled, 0..x.len(), row_bytes, out, out_rows);
        }
        return;
    }
    // SAFETY: the caller's.
    unsafe { dots(job, rows, 0..x.len(), row_bytes, out, out_rows) };
}

/// Elements `(t, r)` of `job` for the tokens `tokens` and the rows `rows`, one dot product at a
/// time (see [`product`]).
///
/// # Safety
/// As [`product`].
unsafe fn dots(
    job: &Job,
    rows: Range<usize>,
    tokens: Range<usize>,
    row_bytes: usize,
    out: *mut f32,
    out_rows: usize,
) {
    for r in rows {
        let weights = &job.weights[r * row_bytes..(r + 1) * row_bytes];
        for t in tokens.clone() {
            // SAFETY: as above, the slices hold the row's blocks each; the caller's.
            unsafe { *out.add(t * out_rows + r) = dot(job.format, weights, job.x.token(t)) };
        }
    }
}

/// `tokens` as the x86 row-at-a-time paths take them, `(first, count)`: groups of eight, then
/// the few left over in fours, twos and ones rather than alone (an expert's share of a prompt
/// leaves three or four on average). A token's steps are the same in a group of any size.
#[cfg(target_arch = "x86_64")]
fn token_groups(tokens: Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    let mut t = tokens.start;
    std::iter::from_fn(move || {
        let count = [8, 4, 2, 1].into_iter().find(|&n| t + n <= tokens.end)?;
        t += count;
        Some((t - count, count))
    })
}

/// Row `r`'s elements for tokens `first..first + N` into `out[t * out_rows + r]`.
///
/// # Safety
/// `out` has room for them and nothing else writes them meanwhile.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn write_row<const N: usize>(
    out: *mut f32,
    out_rows: usize,
    r: usize,
    first: usize,
    elements: [f32; N],
) {
    for (j, element) in elements.into_iter().enumerate() {
        // SAFETY: the caller's.
        unsafe { *out.add((first + j) * out_rows + r) = element };
    }
}

/// Tokens NEON's prompt tiles take at a time, as AVX-512's groups; those left over after the
/// groups (and a decode step's one token) take the dot products, so that a decode step's token
/// gets the bits it would get among the few left over from a prompt.
#[cfg(target_arch = "aarch64")]
const PROMPT_GROUP: usize = 8;

/// Calls `each(first)` for the whole tiles of `tile` rows (of a matrix of `total`) that meet
/// `rows`, and returns the rows of `rows` after them, left to the row-at-a-time path. A tile
/// cut by `rows` is computed whole and only `rows`' rows stored, so that a row's bits do not
/// depend on how rows were shared out over the threads.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn tiles(
    total: usize,
    rows: &Range<usize>,
    tile: usize,
    mut each: impl FnMut(usize),
) -> Range<usize> {
    let tiles = total / tile * tile;
    let mut first = rows.start / tile * tile;
    while first < tiles && first < rows.end {
        each(first);
        first += tile;
    }
    rows.start.max(tiles.min(rows.end))..rows.end
}

/// One row of `format` weights by one token's activations, on AVX2 or NEON.
///
/// # Safety
/// The CPU has the instructions ([`isa`] found them); `weights` and the token hold whole blocks
/// of one row, the token in the form `format` meets.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn dot(format: Format, weights: &[u8], x: Token) -> f32 {
    #[cfg(target_arch = "x86_64")]
    use avx2 as simd;
    #[cfg(target_arch = "aarch64")]
    use neon as simd;
    // SAFETY: the caller's.
    unsafe {
        let (quants, scales, sums) = (x.quants, x.scales, x.sums);
        let integer_sums = x.integer_sums;
        match format {
            Format::Q8_0 => simd::dot(weights, quants, scales),
            Format::Q4_0 => simd::dot_small::<small::Q4_0>(weights, quants, scales, sums),
            Format::Q4_1 => simd::dot_small::<small::Q4_1>(weights, quants, scales, sums),
            Format::Q5_0 => simd::dot_small::<small::Q5_0>(weights, quants, scales, sums),
            Format::Q5_1 => simd::dot_small::<small::Q5_1>(weights, quants, scales, sums),
            Format::Mxfp4 => simd::dot_small::<small::Mxfp4>(weights, quants, scales, sums),
            Format::Q2K => simd::dot_k::<Q2K>(weights, quants, scales, integer_sums),
            Format::Q3K => simd::dot_k::<Q3K>(weights, quants, scales, integer_sums),
            Format::Q4K => simd::dot_k::<Q4K>(weights, quants, scales, integer_sums),
            Format::Q5K => simd::dot_k::<Q5K>(weights, quants, scales, integer_sums),
            Format::Q6K => simd::dot_k::<Q6K>(weights, quants, scales, integer_sums),
        }
    }
}

/// Without the kernels' instructions nothing reaches [`product`].
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn dot(_: Format, _: &[u8], _: Token) -> f32 {
    unreachable!("the quantized kernels are offered only on x86-64 and aarch64")
}

/// The 4- and 5-bit block layouts: an f16 scale `d`; with `MIN` an f16 offset `m`; with `HIGH`
/// 32 fifth bits in a little-endian u32; then 16 bytes whose low nibbles are values 0-15 and
/// high nibbles values 16-31. A weight is `d q + m`, or without `MIN` `d (q - 8)` (`d (q - 16)`
/// with five bits): the zero point is taken off in integers, as llama.cpp does, and `m` times
/// the activation block's sum added in floats.
///
/// MXFP4 (`E2M1`) fits the same mould: its block is an e8m0 exponent byte and the 16 bytes of
/// nibbles, each nibble an e2m1 code. The kernels look a code up as its value doubled plus 12
/// (0-24, see [`E2M1_LIFTED`]), so that the zero point 12 comes off as it does for Q4_0, and
/// `d` is the exponent's `2^(e - 128)` (half of `2^(e - 127)`, for the doubling).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
mod small {
    /// A 32-value block type, as the kernels' generic code reads it.
    pub trait Kind {
        /// Q8_0: signed quants after an f16 scale (the AVX-512 grouped products share their
        /// code with the 4- and 5-bit types).
        const Q8: bool = false;
        const MIN: bool = false;
        const HIGH: bool = false;
        const E2M1: bool = false;
        const BYTES: usize = if Self::Q8 {
            super::BLOCK_BYTES
        } else if Self::E2M1 {
            // The exponent byte and 16 bytes of two codes each.
            1 + 16
        } else {
            block_bytes(Self::MIN, Self::HIGH)
        };
        /// Where the 16 bytes of nibbles start.
        const QUANTS_AT: usize = if Self::E2M1 {
            1
        } else {
            quants_at(Self::MIN, Self::HIGH)
        };
        /// The quant that stands for zero without an offset.
        const ZERO: i8 = if Self::E2M1 {
            12
        } else {
            zero_point(Self::HIGH)
        };
    }

    /// Only AVX-512's grouped products and NEON's tiles take Q8_0 through the generic code.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub struct Q8_0;
    pub struct Q4_0;
    pub struct Q4_1;
    pub struct Q5_0;
    pub struct Q5_1;
    pub struct Mxfp4;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    impl Kind for Q8_0 {
        const Q8: bool = true;
    }
    impl Kind for Q4_0 {}
    impl Kind for Q4_1 {
        const MIN: bool = true;
    }
    impl Kind for Q5_0 {
        const HIGH: bool = true;
    }
    impl Kind for Q5_1 {
        const MIN: bool = true;
        const HIGH: bool = true;
    }
    impl Kind for Mxfp4 {
        const E2M1: bool = true;
    }

    pub use super::e8m0_half;

    /// [`super::E2M1_DOUBLED`] plus 12: unsigned bytes for the integer products, in the order
    /// of the codes.
    pub const E2M1_LIFTED: [u8; 16] = {
        let mut lifted = [0u8; 16];
        let mut code = 0;
        while code < 16 {
            lifted[code] = (super::E2M1_DOUBLED[code] + 12) as u8;
            code += 1;
        }
        lifted
    };

    pub const fn block_bytes(min: bool, high: bool) -> usize {
        quants_at(min, high) + 16
    }

    pub const fn min_at() -> usize {
        2
    }

    pub const fn high_at(min: bool) -> usize {
        2 + 2 * min as usize
    }

    pub const fn quants_at(min: bool, high: bool) -> usize {
        high_at(min) + 4 * high as usize
    }

    /// The quant that stands for zero when a block stores no offset.
    pub const fn zero_point(high: bool) -> i8 {
        if high { 16 } else { 8 }
    }
}

mod k_quants;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use k_quants::{Q2K, Q3K, Q4K, Q5K, Q6K};

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod avx512_tiles;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(target_arch = "aarch64")]
mod neon_tiles;

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_core::quantized::QTensor;

    use super::*;

    /// `q`, a matrix of the kernels' block types, as they take it.
    fn weight(q: &QTensor) -> Weight<'_> {
        let std::borrow::Cow::Borrowed(blocks) = q.data().unwrap() else {
            panic!("blocks in host memory")
        };
        Weight {
            format: Format::of(q.dtype()).unwrap(),
            blocks,
            rows: q.shape().dims()[0],
        }
    }

    /// Whether `dtype` stores super-blocks of 256 (rows then come in multiples of 256).
    fn is_k(dtype: GgmlDType) -> bool {
        Format::of(dtype).unwrap().is_super_block()
    }

    /// A Q8_0 matrix `[rows, cols]` of values in [-1, 1) and activations `[tokens, cols]`.
    fn case(rows: usize, cols: usize, tokens: usize, seed: u64) -> (QTensor, Tensor) {
        typed_case(GgmlDType::Q8_0, rows, cols, tokens, seed)
    }

    fn typed_case(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        tokens: usize,
        seed: u64,
    ) -> (QTensor, Tensor) {
        let (w, x) = f32_case(rows, cols, tokens, seed);
        (QTensor::quantize(&w, dtype).unwrap(), x)
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
        // Groups of eight tokens and tokens alone.
        let shapes = [
            (7, 32, 1),
            (5, 96, 11),
            (33, 160, 1),
            (64, 2048, 2),
            (9, 288, 16),
            // Q8_0's tiles of 16 rows with two groups of tokens, and rows and tokens left over.
            (40, 288, 19),
        ];
        // The K-quants take whole super-blocks.
        let super_shapes = [
            (7, 256, 1),
            (5, 512, 11),
            (33, 768, 1),
            (64, 2048, 2),
            (9, 256, 16),
            (40, 256, 19),
        ];
        for (dtype, (i, (rows, cols, tokens))) in TYPES.into_iter().flat_map(|dtype| {
            let shapes = if is_k(dtype) { super_shapes } else { shapes };
            shapes.into_iter().enumerate().map(move |s| (dtype, s))
        }) {
            let (w, x) = typed_case(dtype, rows, cols, tokens, i as u64);
            let ours = forward(&[weight(&w)], &x).unwrap().remove(0);
            assert_eq!(ours.dims(), &[tokens, rows]);
            let format = Format::of(dtype).unwrap();
            let q = Activations::of(&x, &[format]).unwrap();
            let q = q.for_format(format);
            let dequantized: Vec<f32> = q
                .quants
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f32 * q.scales[i / BLOCK])
                .collect();
            let x = Tensor::from_vec(dequantized, (tokens, cols), &Device::Cpu).unwrap();
            let w = w.dequantize(&Device::Cpu).unwrap();
            let exact = x.matmul(&w.t().unwrap()).unwrap();
            let mut bound = 1e-6 * cols as f32 * 2.0 * (1.0 + i as f32);
            if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1) {
                // Each activation block's sum is kept in f16, as llama.cpp keeps it: off by up to
                // 2^-11 of at most 64, times an offset of at most the weights' range.
                bound += (cols / BLOCK) as f32 * 64.0 / 2048.0 * (1.0 + i as f32);
            }
            let diff = max_abs_diff(&ours, &exact);
            assert!(diff < bound, "{dtype:?} {rows}x{cols}: {diff}");
        }
    }

    /// An element does not depend on what else is computed in the same pass: other matrices
    /// move the rows' split over threads; shifting the tokens moves them between groups. (Tokens
    /// left over after the groups take the one-token path, whose sums may round differently.)
    #[test]
    fn each_element_is_independent_of_the_rest_of_the_pass() {
        if !available() {
            return;
        }
        // Ten tokens: a group of eight and two alone; 3 blocks leave a tail after the pair.
        for dtype in TYPES {
            let widths = if is_k(dtype) { [256, 512] } else { [256, 96] };
            for cols in widths {
                let (a, x) = typed_case(dtype, 37, cols, 10, 1);
                let (b, _) = typed_case(dtype, 19, cols, 10, 2);
                let alone = values(&forward(&[weight(&a)], &x).unwrap()[0]);
                let together = values(&forward(&[weight(&b), weight(&a)], &x).unwrap()[1]);
                assert_eq!(alone, together, "{dtype:?} {cols}");
                // Tokens 1-8 make the group of the batch that starts at token 1.
                let shifted = x.narrow(0, 1, 9).unwrap();
                let shifted = values(&forward(&[weight(&a)], &shifted).unwrap()[0]);
                let grouped = x.narrow(0, 0, 8).unwrap();
                let grouped = values(&forward(&[weight(&a)], &grouped).unwrap()[0]);
                assert_eq!(shifted[..7 * 37], grouped[37..], "{dtype:?} {cols}");
                let one =
                    |t| values(&forward(&[weight(&a)], &x.narrow(0, t, 1).unwrap()).unwrap()[0]);
                assert_eq!(one(9), alone[9 * 37..], "{dtype:?} {cols}");
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
            gate: weight(&gate),
            up: weight(&up),
            down: weight(&down),
        };
        let input = Activations::of(&x, &[Format::Q8_0]).unwrap();
        let ours = glu(&[(weights, &input)]).unwrap().remove(0);
        let ours = Tensor::from_vec(ours, (3, 64), &Device::Cpu).unwrap();
        let g = forward(&[weight(&gate)], &x).unwrap().remove(0);
        let u = forward(&[weight(&up)], &x).unwrap().remove(0);
        let mid = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
        let expected = forward(&[weight(&down)], &mid).unwrap().remove(0);
        assert!(max_abs_diff(&ours, &expected) < 1e-3);
    }

    /// Every instruction set gives the exact block sums, up to f32 rounding, including the -128
    /// a file may hold and the tail after the last four blocks; and AVX2 and AVX-512 quantize
    /// alike.
    #[test]
    fn q8_0_agrees_with_exact_sums_on_every_instruction_set() {
        let Some(isa) = isa() else {
            eprintln!("skipped: this CPU lacks the kernels' instructions");
            return;
        };
        let blocks = 7;
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        let mut weights = vec![0u8; blocks * BLOCK_BYTES];
        let mut exact = 0f64;
        let x: Vec<f32> = (0..blocks * BLOCK)
            .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
            .collect();
        let activations = Activations::quantize(&x, blocks * BLOCK, &[Format::Q8_0]);
        for b in 0..blocks {
            let scale = round_through_f16(0.01 + (next() % 100) as f32 / 1000.0);
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
        // SAFETY: `isa` found the instructions; the row and the token hold `blocks` blocks.
        let ours = unsafe { dot(Format::Q8_0, &weights, activations.token(0)) };
        assert!(
            (ours as f64 - exact).abs() < 1e-4 * exact.abs().max(1.0),
            "{isa}: {ours} {exact}"
        );
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            // SAFETY: as above, and `isa` found AVX-512 VNNI.
            let avx512 = unsafe { avx512::element(Format::Q8_0, &weights, &activations, 0) };
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

    /// The 4- and 5-bit kernels of every instruction set give the exact block sums, up to f32
    /// rounding: quants at both ends of their range, offsets of both signs, a zero scale, and
    /// block counts that leave a tail after the pairs.
    #[test]
    fn small_types_agree_with_exact_sums_on_every_instruction_set() {
        let Some(isa) = isa() else {
            eprintln!("skipped: this CPU lacks the kernels' instructions");
            return;
        };
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for blocks in [1, 2, 3, 18] {
            let x: Vec<f32> = (0..blocks * BLOCK)
                .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
                .collect();
            let activations = Activations::quantize(&x, blocks * BLOCK, &[Format::Q4_1]);
            for (min, high) in [(false, false), (true, false), (false, true), (true, true)] {
                let bytes = small::block_bytes(min, high);
                let mut weights = vec![0u8; blocks * bytes];
                let mut exact = 0f64;
                for b in 0..blocks {
                    let block = &mut weights[b * bytes..(b + 1) * bytes];
                    let d = if b == 1 {
                        0.0
                    } else {
                        round_through_f16(0.01 + (next() % 100) as f32 / 1000.0)
                    };
                    block[..2].copy_from_slice(&f16_bits(d).to_le_bytes());
                    let m = round_through_f16((next() % 200) as f32 / 100.0 - 1.0);
                    if min {
                        block[small::min_at()..][..2].copy_from_slice(&f16_bits(m).to_le_bytes());
                    }
                    let top = if high { 31 } else { 15 };
                    let q: Vec<u32> = (0..BLOCK)
                        .map(|i| match i {
                            3 => 0,
                            7 | 20 => top,
                            _ => next() as u32 % (top + 1),
                        })
                        .collect();
                    let packed = &mut block[small::quants_at(min, high)..];
                    for i in 0..16 {
                        packed[i] = (q[i] & 15 | (q[i + 16] & 15) << 4) as u8;
                    }
                    if high {
                        let bits = (0..BLOCK).fold(0u32, |bits, i| bits | (q[i] >> 4) << i);
                        block[small::high_at(min)..][..4].copy_from_slice(&bits.to_le_bytes());
                    }
                    // As llama.cpp sums: integers within the block, then its scales, and for a
                    // block with an offset the activation block's sum as stored (through f16).
                    let zero = if min {
                        0
                    } else {
                        small::zero_point(high) as i64
                    };
                    let dots: i64 = q
                        .iter()
                        .enumerate()
                        .map(|(i, &q)| (q as i64 - zero) * activations.quants[b * BLOCK + i] as i64)
                        .sum();
                    exact += d as f64 * activations.scales[b] as f64 * dots as f64;
                    if min {
                        exact += m as f64 * activations.sums[b] as f64;
                    }
                }
                let tolerance = 1e-4 * exact.abs().max(1.0);
                let format = match (min, high) {
                    (false, false) => Format::Q4_0,
                    (true, false) => Format::Q4_1,
                    (false, true) => Format::Q5_0,
                    (true, true) => Format::Q5_1,
                };
                // SAFETY: `isa` found the instructions; the slices hold `blocks` blocks.
                let ours = unsafe { dot(format, &weights, activations.token(0)) };
                let case = format!("{blocks} blocks, min {min}, high {high}");
                assert!(
                    (ours as f64 - exact).abs() < tolerance,
                    "{isa} {case}: {ours} {exact}"
                );
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512Vnni {
                    // SAFETY: as above, and `isa` found AVX-512 VNNI.
                    let avx512 = unsafe { avx512::element(format, &weights, &activations, 0) };
                    assert!(
                        (avx512 as f64 - exact).abs() < tolerance,
                        "AVX-512 {case}: {avx512} {exact}"
                    );
                }
            }
        }
    }

    /// The MXFP4 kernel of every instruction set gives the exact sums of the dequantized blocks
    /// (ggml's values: the doubled e2m1 value times `2^(e - 128)`) times the dequantized
    /// activations, up to f32 rounding: every code, exponents from the subnormal scales 0 and 1
    /// to large ones, blocks counts with and without a tail after the pairs; and in a product of
    /// several rows and tokens (the grouped path of AVX-512) and against the same values held as
    /// Q8_0 blocks.
    #[test]
    fn mxfp4_agrees_with_exact_sums_on_every_instruction_set() {
        use crate::format::mxfp4;
        let Some(isa) = isa() else {
            eprintln!("skipped: this CPU lacks the kernels' instructions");
            return;
        };
        const DOUBLED: [f64; 16] = [
            0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0,
        ];
        let value = |block: &[u8], i: usize| {
            let byte = block[1 + i % 16];
            let code = if i < 16 { byte & 15 } else { byte >> 4 };
            DOUBLED[code as usize] * 2f64.powi(i32::from(block[0]) - 128)
        };
        let mut next = xorshift(0x5851_f42d_4c95_7f2du64);
        let (rows, tokens) = (5, 19);
        for blocks in [1, 2, 3, 8] {
            let cols = blocks * BLOCK;
            let mut weights = vec![0u8; rows * blocks * 17];
            for (b, block) in weights.chunks_exact_mut(17).enumerate() {
                block[0] = match b % 7 {
                    0 => 0,
                    1 => 1,
                    2 => 140,
                    _ => 118 + (next() % 16) as u8,
                };
                for byte in &mut block[1..] {
                    *byte = next() as u8;
                }
            }
            // Every code somewhere in the first row.
            for (i, byte) in weights[1..17].iter_mut().enumerate() {
                *byte = i as u8 | (15 - i as u8) << 4;
            }
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
                .collect();
            let activations = Activations::quantize(&x, cols, &[Format::Mxfp4]);
            let exact = |r: usize, t: usize| -> (f64, f64) {
                let row = &weights[r * blocks * 17..(r + 1) * blocks * 17];
                let (mut sum, mut magnitude) = (0f64, 0f64);
                for i in 0..cols {
                    let b = i / BLOCK;
                    let a = activations.quants[t * cols + i] as f64
                        * activations.scales[t * blocks + b] as f64;
                    let w = value(&row[b * 17..(b + 1) * 17], i % BLOCK);
                    sum += w * a;
                    magnitude += (w * a).abs();
                }
                (sum, magnitude)
            };
            let case = format!("{isa}, {blocks} blocks");
            for t in [0, tokens - 1] {
                let (exact, magnitude) = exact(0, t);
                let tolerance = 1e-5 * magnitude.max(1e-30);
                // SAFETY: `isa` found the instructions; the row and the token hold `blocks`
                // blocks.
                let ours =
                    unsafe { dot(Format::Mxfp4, &weights[..blocks * 17], activations.token(t)) };
                assert!(
                    (ours as f64 - exact).abs() <= tolerance,
                    "{case}: {ours} {exact}"
                );
            }
            let matrix = BlockMatrix::new(Format::Mxfp4, weights.clone(), cols).unwrap();
            assert_eq!(matrix.dims(), [rows, cols]);
            let x = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).unwrap();
            let ours = values(&forward(&[matrix.weight()], &x).unwrap()[0]);
            let held = mxfp4::to_q8_0(&weights).unwrap();
            let as_q8_0 = Weight {
                format: Format::Q8_0,
                blocks: &held,
                rows,
            };
            let through_q8_0 = values(&forward(&[as_q8_0], &x).unwrap()[0]);
            for t in 0..tokens {
                for r in 0..rows {
                    let (exact, magnitude) = exact(r, t);
                    let tolerance = 1e-5 * magnitude.max(1e-30);
                    let (mine, other) = (ours[t * rows + r], through_q8_0[t * rows + r]);
                    assert!(
                        (mine as f64 - exact).abs() <= tolerance,
                        "{case}, row {r} token {t}: {mine} {exact}"
                    );
                    assert!(
                        (mine as f64 - other as f64).abs() <= 2.0 * tolerance,
                        "{case}, row {r} token {t}: {mine} as Q8_0 {other}"
                    );
                }
            }
        }
        // Through f64: 2^-128 is subnormal in f32, past what powi reaches there.
        for e in [0u8, 1, 2, 127, 128, 255] {
            assert_eq!(e8m0_half(e), 2f64.powi(i32::from(e) - 128) as f32, "{e}");
        }
    }

    /// The K-quant kernels of every instruction set give the exact sum of the dequantized
    /// weights (as candle dequantizes them) times the dequantized activations, up to f32
    /// rounding: blocks of random bytes (every quant, scale and offset at both ends of its range
    /// somewhere), zero scales, and one to three super-blocks. 17 rows and 9 tokens take the tiles
    /// (AVX-512's of 16 rows, NEON's of four) with a group of eight tokens, and the rows and
    /// token after them the row-at-a-time path.
    #[test]
    fn k_quants_agree_with_exact_sums_on_every_instruction_set() {
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        let Some(isa) = isa() else {
            eprintln!("skipped: this CPU lacks the kernels' instructions");
            return;
        };
        const ROWS: usize = 17;
        const TOKENS: usize = 9;
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for dtype in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let format = Format::of(dtype).unwrap();
            for supers in [1, 2, 3] {
                let cols = supers * k_quants::VALUES;
                let row_bytes = supers * format.block_bytes();
                let mut weights: Vec<u8> = (0..ROWS * row_bytes).map(|_| next() as u8).collect();
                for (i, block) in weights.chunks_exact_mut(format.block_bytes()).enumerate() {
                    let d = if i % supers == 1 {
                        0.0
                    } else {
                        0.001 + (next() % 100) as f32 / 10_000.0
                    };
                    let dmin = (next() % 100) as f32 / 1000.0 - 0.05;
                    let (d_at, dmin_at) = match format {
                        Format::Q3K | Format::Q6K => (block.len() - 2, None),
                        Format::Q2K => (block.len() - 4, Some(block.len() - 2)),
                        _ => (0, Some(2)),
                    };
                    block[d_at..d_at + 2].copy_from_slice(&f16_bits(d).to_le_bytes());
                    if let Some(at) = dmin_at {
                        block[at..at + 2].copy_from_slice(&f16_bits(dmin).to_le_bytes());
                    }
                }
                let x: Vec<f32> = (0..TOKENS * cols)
                    .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
                    .collect();
                let quantized = Activations::quantize(&x, cols, &[format]);
                let activations = quantized.for_format(format);
                let w = qtensor_from_ggml(dtype, &weights, vec![ROWS, cols], &Device::Cpu).unwrap();
                let w = values(&w.dequantize(&Device::Cpu).unwrap());
                let a = |t: usize, i: usize| {
                    let at = t * cols + i;
                    activations.quants[at] as f64 * activations.scales[at / BLOCK] as f64
                };
                // Each element's exact value and the size of its terms, the rounding's scale.
                let exact = |t: usize, r: usize| -> (f64, f64) {
                    (0..cols).fold((0.0, 0.0), |(sum, size), i| {
                        let term = w[r * cols + i] as f64 * a(t, i);
                        (sum + term, size + term.abs())
                    })
                };
                let case = format!("{dtype:?}, {supers} super-blocks");
                let check = |path: &str, t: usize, r: usize, ours: f32| {
                    let (exact, size) = exact(t, r);
                    let tolerance = 1e-6 * size.max(1.0);
                    assert!(
                        (ours as f64 - exact).abs() < tolerance,
                        "{path} {case}, token {t} row {r}: {ours} {exact}"
                    );
                };
                // SAFETY: `isa` found the instructions; the row and the token hold `supers`
                // super-blocks.
                let ours = unsafe { dot(format, &weights[..row_bytes], activations.token(0)) };
                check(&format!("{isa} dot"), 0, 0, ours);
                let weight = Weight {
                    format,
                    blocks: &weights,
                    rows: ROWS,
                };
                let mut out = vec![0f32; TOKENS * ROWS];
                matmul(&mut [Job::new(&weight, &quantized, &mut out)]);
                for t in 0..TOKENS {
                    for r in 0..ROWS {
                        check(&isa.to_string(), t, r, out[t * ROWS + r]);
                    }
                }
            }
        }
    }

    /// The kernels' tests again in a process held to AVX2 ([`HOLD_VARIABLE`]), so that the
    /// path of CPUs without AVX-512 is tested on the CPUs that have it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_kernels_tests_pass_held_to_avx2() {
        if isa() != Some(Isa::Avx512Vnni) {
            return;
        }
        let passed = rerun_held_to_avx2(&["kernels::", "--skip", "held_to_avx2"]);
        assert!(passed >= 10, "held to AVX2, only {passed} tests ran");
    }

    /// A fixed sequence of pseudo-random numbers from `seed` (xorshift64).
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// The f16 nearest to `value`, as bits.
    fn f16_bits(value: f32) -> u16 {
        ::half::f16::from_f32(value).to_bits()
    }

    #[test]
    fn quantizes_as_llama_cpp() {
        if !available() {
            return;
        }
        let mut values: Vec<f32> = (0..32).map(|i| i as f32 * 0.37 - 6.0).collect();
        let q = Activations::quantize(&values, 32, &[Format::Q8_0]);
        let scale = 6.0f32 / 127.0;
        assert_eq!(q.scales, vec![half_round(scale)]);
        for (v, q) in values.iter().zip(&q.quants) {
            assert_eq!(*q as f32, (v * (1.0 / scale)).round_ties_even(), "{v}");
        }
        // With a scale of one, halves are ties and go to the even neighbour.
        values[0] = 127.0;
        values[1] = 2.5;
        values[2] = -3.5;
        let q = Activations::quantize(&values, 32, &[Format::Q8_0]);
        assert_eq!((q.scales[0], &q.quants[..3]), (1.0, &[127i8, 2, -4][..]));
        let zeros = Activations::quantize(&[0.0; 64], 32, &[Format::Q8_0]);
        assert_eq!((zeros.len(), zeros.scales), (2, vec![0.0, 0.0]));
        assert!(zeros.quants.iter().all(|&q| q == 0));
    }

    /// A prompt quantized in shares over the thread pool is the prompt quantized in one piece,
    /// in both forms.
    #[test]
    fn a_prompt_quantized_in_shares_equals_one_piece() {
        if !available() {
            return;
        }
        let tokens = 3 * ROWS_PER_SHARE + 5;
        let (_, x) = f32_case(1, 512, tokens, 0);
        let meets = [Format::Q8_0, Format::Q4K];
        let shared = Activations::of(&x, &meets).unwrap();
        let whole = Activations::quantize(&values(&x), 512, &meets);
        assert_same_quantization(&shared, &whole, tokens);
    }

    /// Rows gathered where they lie (a prompt's tokens routed to an expert, in any order and
    /// repeated) are quantized as a copy of them would be.
    #[test]
    fn gathered_rows_are_quantized_as_their_copy() {
        if !available() {
            return;
        }
        let (_, x) = f32_case(1, 512, 9, 1);
        let x = values(&x);
        let meets = [Format::Q8_0, Format::Q4K];
        let picks: [&[u32]; 2] = [&[7, 0, 3, 3], &[8]];
        let inputs: Vec<(&[u32], &[Format])> = picks.iter().map(|&t| (t, &meets[..])).collect();
        for (gathered, tokens) in Activations::gather_each(&x, 512, &inputs).iter().zip(picks) {
            let copy: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| &x[t as usize * 512..][..512])
                .copied()
                .collect();
            let copy = Activations::quantize(&copy, 512, &meets);
            assert_same_quantization(gathered, &copy, tokens.len());
        }
    }

    /// `a` and `b` hold the same `rows`, in both forms, field for field.
    fn assert_same_quantization(a: &Activations, b: &Activations, rows: usize) {
        for (a, b) in [
            (a, b),
            (a.for_format(Format::Q4K), b.for_format(Format::Q4K)),
        ] {
            assert_eq!(a.rows, rows);
            assert_eq!(a.quants, b.quants);
            assert_eq!(a.scales, b.scales);
            assert_eq!(a.sums, b.sums);
            assert_eq!(a.integer_sums, b.integer_sums);
        }
    }

    /// Rows of whole super-blocks are also quantized to Q8_K, bit for bit as candle's Q8_K
    /// (llama.cpp's reference quantizer, which the K fixtures' goldens matched exactly): the
    /// value of largest magnitude becomes -127, the f32 scale is `max / -127`.
    #[test]
    fn quantizes_super_blocks_as_llama_cpp() {
        if !available() {
            return;
        }
        let (_, x) = f32_case(1, 512, 3, 0);
        let mut rows = values(&x);
        // An all-zero super-block, and one whose largest value is positive.
        rows[512..768].fill(0.0);
        rows[1024 + 7] = 9.0;
        let ours = Activations::quantize(&rows, 512, &[Format::Q8_0, Format::Q4K]);
        let ours = ours.for_format(Format::Q4K);
        let x = Tensor::from_vec(rows.clone(), (3, 512), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&x, GgmlDType::Q8K).unwrap();
        let theirs = theirs.data().unwrap();
        // Q8_K: an f32 scale, 256 quants, 16 sums of 16.
        let block_bytes = 4 + 256 + 32;
        for (b, block) in theirs.chunks_exact(block_bytes).enumerate() {
            let scale = f32::from_le_bytes(block[..4].try_into().unwrap());
            let quants: Vec<i8> = block[4..260].iter().map(|&q| q as i8).collect();
            assert_eq!(ours.quants[b * 256..(b + 1) * 256], quants[..], "block {b}");
            for sub in 0..8 {
                assert_eq!(
                    ours.scales[b * 8 + sub].to_bits(),
                    scale.to_bits(),
                    "block {b}"
                );
            }
            for (i, sixteen) in block[260..].chunks_exact(2).enumerate() {
                let sum = i16::from_le_bytes(sixteen.try_into().unwrap());
                assert_eq!(ours.integer_sums[b * 16 + i], sum, "block {b}");
            }
        }
        assert_eq!(ours.quants[1024 + 7], -127);
        // The largest magnitude met negative first, then positive: llama.cpp's reference keeps
        // the first. (Candle's NEON quantizer keeps the second, so this is not compared.)
        let mut tie = rows[..256].to_vec();
        (tie[3], tie[200]) = (-9.5, 9.5);
        let tied = Activations::quantize(&tie, 256, &[Format::Q4K]);
        let tied = tied.for_format(Format::Q4K);
        assert_eq!((tied.quants[3], tied.quants[200]), (-127, 127));
        assert_eq!(tied.scales[0], 1.0 / (-127.0 / -9.5f32));
        // Rows meeting only 32-value types have no super-block form.
        assert!(
            Activations::quantize(&rows, 512, &[Format::Q8_0])
                .super_blocks
                .is_none()
        );
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
