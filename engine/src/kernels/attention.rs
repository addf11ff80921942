//! Grouped-query attention on the CPU with an online softmax (flash-attention style): scores are
//! computed for 64 keys at a time, folded into each query's running maximum, sum and output, and
//! never held for a whole `[queries, keys]` row. Causal and sliding-window masks are key ranges
//! per query, not tensors.
//!
//! Why not candle's matrix products: the tiled product materialised `[heads, 256, keys]` scores
//! per tile and went over them five times (product, scale, mask, softmax, product): at 8,192
//! tokens that is 75 MB a tile, most of a long prompt's time in memory traffic and most of its
//! peak memory. And a decode step's product copied the whole cache to make it contiguous.
//!
//! Keys and values are read in the cache's type, f16, f32 or Q8_0 rows (u8 tensors of GGUF
//! blocks: an f16 scale and 32 signed bytes), a block at a time into f32.
//!
//! Work is shared out over candle's thread pool by (key head, block of queries); every output is
//! computed by one thread in a fixed order, so results do not depend on the thread count.

use candle_core::{DType, Device, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};

/// Keys per block: a block's scores for one query fit in four 512-bit registers.
const KEYS: usize = 64;
/// Queries per work item (times the query heads sharing a key head).
const QUERIES: usize = 16;
/// Keys are taken in chunks of this many positions, counted from position 0: each query's
/// softmax is computed chunk by chunk and the chunks folded in order, so that a decode step can
/// share one key head's chunks out over the threads and still give, bit for bit, what the same
/// query gives inside a prompt.
pub(crate) const CHUNK: usize = 4 * KEYS;

/// Whether [`attend`] takes these operands: on the CPU, f32 queries and keys and values in f32,
/// f16 or Q8_0 rows alike.
pub fn takes(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v].iter().all(|t| matches!(t.device(), Device::Cpu))
        && q.dtype() == DType::F32
        && k.dtype() == v.dtype()
        && matches!(k.dtype(), DType::F32 | DType::F16 | DType::U8)
}

/// Values in each row of `t` (`[heads, positions, row]`): its last dimension, or for Q8_0 rows
/// (u8) the values its bytes hold.
pub fn row_values(t: &Tensor) -> Result<usize> {
    let last = t.dim(2)?;
    Ok(match t.dtype() {
        DType::U8 => super::quantized::q8_0_values(last),
        _ => last,
    })
}

/// Attention of `q` `[heads, T, d]` at positions `offset..` over `k` `[kv_heads, S, d]` and `v`
/// `[kv_heads, S, dv]` (positions `0..S`, any strides with the last one 1: the cache's buffers
/// as they are), causal and within `window` when there is one, scores scaled by `scale`, with
/// each query head's sink logit (`sinks[head]`) in its softmax when there are sinks; returns
/// `[heads, T, dv]`. Query heads `g * rep..(g + 1) * rep` share key head `g`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    scale: f32,
) -> Result<Tensor> {
    let (heads, t, d) = q.dims3()?;
    let (kv_heads, s, _) = k.dims3()?;
    let (dk, dv) = (row_values(k)?, row_values(v)?);
    if let Some(sinks) = sinks.filter(|s| s.len() != heads) {
        return Err(Error::InvalidModel(format!(
            "{} attention sinks for {heads} query heads",
            sinks.len()
        )));
    }
    if dk != d || v.dim(0)? != kv_heads || v.dim(1)? != s || !heads.is_multiple_of(kv_heads) {
        return Err(Error::InvalidModel(format!(
            "attention of q {:?} over k {:?} and v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let q = q.contiguous()?;
    // The cache's buffers are read in place; a view whose rows are not contiguous (latent
    // attention's expanded keys) is copied first.
    let rows_contiguous = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.stride().last() == Some(&1) {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let (k, v) = (rows_contiguous(k)?, rows_contiguous(v)?);
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let queries = &cpu_storage(&q_storage)?.as_slice::<f32>()?[q_layout.start_offset()..];
    let keys = Strided::of(&k_storage, k_layout)?;
    let values = Strided::of(&v_storage, v_layout)?;
    let shape = Shape {
        rep: heads / kv_heads,
        t,
        d,
        dv,
        offset,
        window,
        scale,
    };
    let mut out = vec![0f32; heads * t * dv];
    let blocks = t.div_ceil(QUERIES);
    let last_chunk = (offset + t - 1) / CHUNK;
    let inputs = Inputs {
        shape: &shape,
        queries,
        keys: &keys,
        values: &values,
    };
    let attend_chunk_at = |g: usize, rows: &Rows, chunk: usize, partial: &mut Partial| {
        let keys_seen = chunk * CHUNK..(chunk + 1) * CHUNK;
        attend_chunk(&inputs, g, rows, keys_seen, partial)
    };
    if blocks == 1 && last_chunk > 0 {
        // A decode step (or a few queries) over a long cache: too few (key head, block) items
        // to keep the threads busy, so each item takes one chunk of the keys and the chunks'
        // partial softmaxes are folded afterwards, in the order one item would fold them.
        let chunks = last_chunk + 1;
        let rows: Vec<Rows> = (0..kv_heads).map(|g| Rows::of(&shape, g, 0..t)).collect();
        let partials = super::on_pool(kv_heads * chunks, |item| {
            let (g, chunk) = (item / chunks, item % chunks);
            let mut partial = Partial::empty(rows[g].len(), dv);
            attend_chunk_at(g, &rows[g], chunk, &mut partial);
            partial
        });
        for (rows, chunk_partials) in rows.iter().zip(partials.chunks(chunks)) {
            let mut total = Partial::empty(rows.len(), dv);
            for partial in chunk_partials {
                total.fold(partial);
            }
            // SAFETY: `out` holds `[heads, t, dv]`.
            unsafe { total.write(&shape, rows, sinks, out.as_mut_ptr()) };
        }
    } else {
        let out_address = out.as_mut_ptr() as usize;
        let run = |items: std::ops::Range<usize>| {
            for item in items {
                let (g, block) = (item / blocks, item % blocks);
                let first = block * QUERIES;
                let rows = Rows::of(&shape, g, first..(first + QUERIES).min(t));
                let mut total = Partial::empty(rows.len(), dv);
                let mut partial = Partial::empty(rows.len(), dv);
                for chunk in rows.lo / CHUNK..=rows.hi / CHUNK {
                    partial.clear();
                    attend_chunk_at(g, &rows, chunk, &mut partial);
                    total.fold(&partial);
                }
                // SAFETY: work item (g, block) writes only the outputs of key head g's query
                // heads at its queries; `out` outlives the pool call.
                unsafe { total.write(&shape, &rows, sinks, out_address as *mut f32) };
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(kv_heads * blocks, run);
    }
    Ok(Tensor::from_vec(out, (heads, t, dv), &Device::Cpu)?)
}

/// What every work item reads.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    shape: &'a Shape,
    queries: &'a [f32],
    keys: &'a Strided<'a>,
    values: &'a Strided<'a>,
}

/// The sizes every work item shares.
struct Shape {
    rep: usize,
    t: usize,
    d: usize,
    dv: usize,
    offset: usize,
    window: Option<usize>,
    scale: f32,
}

/// A `[heads, positions, width]` view of a CPU buffer of f32 or f16: element `(h, p, c)` at
/// `h * head + p * position + c`; or of Q8_0 rows, whose strides count bytes.
struct Strided<'a> {
    data: Values<'a>,
    head: usize,
    position: usize,
    /// Halves are widened 16 at a time with AVX-512: the slice conversion's per-call overhead
    /// made an 8K-token decode step slower in f16 than in f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    wide_halves: bool,
}

enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8_0(&'a [u8]),
}

/// Bytes of a Q8_0 block: its f16 scale, then 32 signed quants.
const Q8_0_BLOCK: usize = super::quantized::BLOCK_BYTES;

impl<'a> Strided<'a> {
    fn of(storage: &'a Storage, layout: &candle_core::Layout) -> Result<Self> {
        let stride = layout.stride();
        if stride.len() != 3 || stride[2] != 1 {
            return Err(Error::InvalidModel(format!(
                "attention needs rows of contiguous values, not strides {stride:?}"
            )));
        }
        let cpu = cpu_storage(storage)?;
        let start = layout.start_offset();
        let data = match cpu {
            candle_core::CpuStorage::F16(data) => Values::F16(&data[start..]),
            candle_core::CpuStorage::U8(data) => Values::Q8_0(&data[start..]),
            _ => Values::F32(&cpu.as_slice::<f32>()?[start..]),
        };
        #[cfg(target_arch = "x86_64")]
        let wide_halves = avx512() && layout.dims()[2].is_multiple_of(16);
        #[cfg(not(target_arch = "x86_64"))]
        let wide_halves = false;
        Ok(Self {
            data,
            head: stride[0],
            position: stride[1],
            wide_halves,
        })
    }

    /// Row `(head, position)` into `out`, as f32.
    fn load(&self, head: usize, position: usize, out: &mut [f32]) {
        let at = head * self.head + position * self.position;
        match self.data {
            Values::F32(data) => out.copy_from_slice(&data[at..at + out.len()]),
            Values::F16(data) => {
                let halves = &data[at..at + out.len()];
                #[cfg(target_arch = "x86_64")]
                if self.wide_halves {
                    // SAFETY: `wide_halves` found AVX-512 and rows of whole registers.
                    unsafe { widen_avx512(halves, out) };
                    return;
                }
                halves.convert_to_f32_slice(out)
            }
            Values::Q8_0(data) => {
                let blocks = &data[at..at + out.len() / 32 * Q8_0_BLOCK];
                for (block, out) in blocks
                    .chunks_exact(Q8_0_BLOCK)
                    .zip(out.chunks_exact_mut(32))
                {
                    let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (o, &q) in out.iter_mut().zip(&block[2..]) {
                        *o = q as i8 as f32 * scale;
                    }
                }
            }
        }
    }
}

impl Strided<'_> {
    /// Values `c..c + 16` of row `(head, position)`, as f32.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(&self, head: usize, position: usize, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let at = head * self.head + position * self.position + c;
        match self.data {
            Values::F32(data) => {
                // SAFETY: 16 values from `at`, checked.
                unsafe { _mm512_loadu_ps(data[at..at + 16].as_ptr()) }
            }
            Values::F16(data) => {
                let halves = data[at..at + 16].as_ptr() as *const __m256i;
                // SAFETY: 16 halves from `at`, checked.
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(halves) })
            }
            Values::Q8_0(data) => {
                // `at` counted bytes for the row and values for `c`: c's block starts at
                // `c / 32` blocks in, its 16 values `c % 32` quants after the scale.
                let block = &data[at - c + c / 32 * Q8_0_BLOCK..][..Q8_0_BLOCK];
                let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let quants = block[2 + c % 32..][..16].as_ptr() as *const __m128i;
                // SAFETY: 16 quants inside the block, checked.
                let quants = _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(quants) });
                _mm512_mul_ps(_mm512_cvtepi32_ps(quants), _mm512_set1_ps(scale))
            }
        }
    }
}

/// `halves` into `out` as f32, 16 at a time.
///
/// # Safety
/// The CPU has AVX-512 F; both hold the same multiple of 16 values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(halves: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    for (from, to) in halves.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        // SAFETY: 16 halves in, 16 floats out.
        unsafe {
            let packed = _mm256_loadu_si256(from.as_ptr() as *const __m256i);
            _mm512_storeu_ps(to.as_mut_ptr(), _mm512_cvtph_ps(packed));
        }
    }
}

fn cpu_storage(storage: &Storage) -> Result<&candle_core::CpuStorage> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu),
        _ => Err(Error::InvalidModel(
            "CPU attention called with tensors on another device".into(),
        )),
    }
}

/// The rows (query, head) of one work item, in (query, head) order, and the keys they see.
struct Rows {
    rows: Vec<(usize, usize)>,
    /// The first key any row sees.
    lo: usize,
    /// The last key any row sees.
    hi: usize,
}

impl Rows {
    /// Queries `span` for each query head of key head `g`.
    fn of(shape: &Shape, g: usize, span: std::ops::Range<usize>) -> Self {
        let rows = span
            .clone()
            .flat_map(|i| (0..shape.rep).map(move |r| (i, g * shape.rep + r)))
            .collect();
        Self {
            rows,
            lo: shape.visible(span.start).start,
            hi: shape.visible(span.end - 1).end - 1,
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }
}

impl Shape {
    /// The keys query `i` sees: none after its position, none before its window.
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let position = self.offset + i;
        let lo = self.window.map_or(0, |w| (position + 1).saturating_sub(w));
        lo..position + 1
    }
}

/// Each row's online softmax over some keys: its running maximum, the sum of its weights and
/// its output weighted by them, `dv` values a row.
struct Partial {
    maxima: Vec<f32>,
    sums: Vec<f32>,
    outputs: Vec<f32>,
}

impl Partial {
    fn empty(rows: usize, dv: usize) -> Self {
        Self {
            maxima: vec![f32::NEG_INFINITY; rows],
            sums: vec![0.0; rows],
            outputs: vec![0.0; rows * dv],
        }
    }

    fn clear(&mut self) {
        self.maxima.fill(f32::NEG_INFINITY);
        self.sums.fill(0.0);
        self.outputs.fill(0.0);
    }

    /// Adds `later`'s keys to these rows': both rescaled to the larger maximum. Rows that saw no
    /// key in `later` are left as they are. With the FMA instruction where the CPU has it: without
    /// it each `mul_add` (the rescaling's, and `exp`'s) is a call to the library's exact and slow
    /// fused multiply-add, of the same result.
    fn fold(&mut self, later: &Partial) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("fma") {
            #[target_feature(enable = "fma")]
            fn with_fma(total: &mut Partial, later: &Partial) {
                total.fold_rows(later)
            }
            // SAFETY: the CPU has FMA.
            unsafe { with_fma(self, later) };
            return;
        }
        self.fold_rows(later)
    }

    /// [`Partial::fold`]'s steps, inlined into the function that picks the instructions.
    #[inline(always)]
    fn fold_rows(&mut self, later: &Partial) {
        let dv = self.outputs.len() / self.maxima.len().max(1);
        for (row, &late_max) in later.maxima.iter().enumerate() {
            if late_max == f32::NEG_INFINITY {
                continue;
            }
            let output = &mut self.outputs[row * dv..][..dv];
            let late_output = &later.outputs[row * dv..][..dv];
            let max = self.maxima[row];
            if max == f32::NEG_INFINITY {
                self.maxima[row] = late_max;
                self.sums[row] = later.sums[row];
                output.copy_from_slice(late_output);
                continue;
            }
            let new_max = max.max(late_max);
            let (kept, late_kept) = (exp(max - new_max), exp(late_max - new_max));
            self.maxima[row] = new_max;
            self.sums[row] = self.sums[row] * kept + later.sums[row] * late_kept;
            for (o, &late) in output.iter_mut().zip(late_output) {
                *o = late.mul_add(late_kept, *o * kept);
            }
        }
    }

    /// Each row's output divided by its sum (with its head's sink, when there are sinks, as one
    /// more term of the sum that adds no value), into `out` `[heads, t, dv]`.
    ///
    /// # Safety
    /// `out` holds `[heads, t, dv]` and nothing else writes these rows meanwhile.
    unsafe fn write(&self, shape: &Shape, rows: &Rows, sinks: Option<&[f32]>, out: *mut f32) {
        let dv = shape.dv;
        for (((&(i, head), &sum), &max), output) in rows
            .rows
            .iter()
            .zip(&self.sums)
            .zip(&self.maxima)
            .zip(self.outputs.chunks_exact(dv))
        {
            let inverse = match sinks {
                Some(sinks) => {
                    let sink = sinks[head];
                    let new_max = max.max(sink);
                    let kept = exp(max - new_max);
                    kept / (sum * kept + exp(sink - new_max))
                }
                None => 1.0 / sum,
            };
            for (c, &o) in output.iter().enumerate() {
                // SAFETY: the caller's.
                unsafe { *out.add((head * shape.t + i) * dv + c) = o * inverse };
            }
        }
    }
}

/// `rows`' softmax over the keys of `chunk` they see, from an empty `partial`: through AVX-512
/// where the CPU has it and the widths are whole registers, else in plain arithmetic.
fn attend_chunk(
    inputs: &Inputs,
    g: usize,
    rows: &Rows,
    chunk: std::ops::Range<usize>,
    partial: &mut Partial,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512() && inputs.shape.d.is_multiple_of(16) && inputs.shape.dv.is_multiple_of(16) {
        // SAFETY: the CPU has the features.
        unsafe { attend_chunk_avx512(inputs, g, rows, chunk, partial) };
        return;
    }
    attend_chunk_with(inputs, g, rows, chunk, partial, transpose_keys, update_rows)
}

/// [`update_row`] for each of `rows`, with the FMA instruction where the CPU has it (see
/// [`Partial::fold`]).
fn update_rows(rows: &mut [RowUpdate]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        fn with_fma(rows: &mut [RowUpdate]) {
            rows.iter_mut().for_each(update_row)
        }
        // SAFETY: the CPU has FMA.
        unsafe { with_fma(rows) };
        return;
    }
    rows.iter_mut().for_each(update_row)
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"))
}

/// # Safety
/// The CPU has AVX-512 F and FMA, `d` and `dv` are multiples of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_chunk_avx512(
    inputs: &Inputs,
    g: usize,
    rows: &Rows,
    chunk: std::ops::Range<usize>,
    partial: &mut Partial,
) {
    attend_chunk_with(
        inputs,
        g,
        rows,
        chunk,
        partial,
        // SAFETY: the features, and `d` a multiple of 16.
        |keys, g, block, transposed| unsafe { transpose_keys_avx512(keys, g, block, transposed) },
        // SAFETY: the features, and `d` and `dv` multiples of 16.
        |rows| unsafe { update_rows_avx512(rows) },
    )
}

/// One row's (query and head's) update by one block of keys.
struct RowUpdate<'a> {
    /// The query, `d` values.
    q: &'a [f32],
    /// The block's keys transposed: value `c` of key `j` at `c * KEYS + j`.
    transposed: &'a [f32],
    /// The keys of the block this row sees, counted from the block's first.
    seen: std::ops::Range<usize>,
    scale: f32,
    /// The block's values, `dv` for each key.
    values: &'a [f32],
    max: &'a mut f32,
    sum: &'a mut f32,
    /// The row's output so far, `dv` values, weighted by `exp(score - max)`.
    output: &'a mut [f32],
}

/// [`attend_chunk`] with its two inner steps given: the chunk's keys that some row sees, a block
/// of [`KEYS`] at a time from a multiple of [`KEYS`] (so a row meets the same blocks whichever
/// rows share its item), each block's keys put in columns by `transpose` once for all rows, each
/// row updated by `update`.
#[inline(always)]
fn attend_chunk_with(
    inputs: &Inputs,
    g: usize,
    rows: &Rows,
    chunk: std::ops::Range<usize>,
    partial: &mut Partial,
    transpose: impl Fn(&Strided, usize, std::ops::Range<usize>, &mut [f32]),
    update: impl Fn(&mut [RowUpdate]),
) {
    let Inputs {
        shape,
        queries,
        keys,
        values,
    } = *inputs;
    let (d, dv) = (shape.d, shape.dv);
    let first = chunk.start.max(rows.lo - rows.lo % KEYS);
    let end = chunk.end.min(rows.hi + 1);
    if first >= end {
        return;
    }
    let mut transposed = vec![0f32; d * KEYS];
    let mut block_values = vec![0f32; KEYS * dv];
    for block in (first..end).step_by(KEYS) {
        let block_end = (block + KEYS).min(end);
        transpose(keys, g, block..block_end, &mut transposed);
        for (j, position) in (block..block_end).enumerate() {
            values.load(g, position, &mut block_values[j * dv..(j + 1) * dv]);
        }
        let mut updates = Vec::with_capacity(rows.len());
        for (((&(i, head), max), sum), output) in rows
            .rows
            .iter()
            .zip(&mut partial.maxima)
            .zip(&mut partial.sums)
            .zip(partial.outputs.chunks_exact_mut(dv))
        {
            let seen = shape.visible(i);
            let (from, to) = (seen.start.max(block), seen.end.min(block_end));
            if from >= to {
                continue;
            }
            updates.push(RowUpdate {
                q: &queries[(head * shape.t + i) * d..][..d],
                transposed: &transposed,
                seen: from - block..to - block,
                scale: shape.scale,
                values: &block_values,
                max,
                sum,
                output,
            });
        }
        update(&mut updates);
    }
}

/// Keys `block` of key head `g` into `transposed`, value `c` of the block's key `j` at
/// `c * KEYS + j`.
fn transpose_keys(keys: &Strided, g: usize, block: std::ops::Range<usize>, transposed: &mut [f32]) {
    let mut key = vec![0f32; transposed.len() / KEYS];
    for (j, position) in block.enumerate() {
        keys.load(g, position, &mut key);
        for (c, &value) in key.iter().enumerate() {
            transposed[c * KEYS + j] = value;
        }
    }
}

/// [`transpose_keys`] sixteen keys by sixteen values at a time, in registers; keys past the
/// block's end are zeros.
///
/// # Safety
/// The CPU has AVX-512 F; `d` is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn transpose_keys_avx512(
    keys: &Strided,
    g: usize,
    block: std::ops::Range<usize>,
    transposed: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = transposed.len() / KEYS;
    let n = block.len();
    for k0 in (0..n).step_by(16) {
        for c0 in (0..d).step_by(16) {
            let mut tile = [_mm512_setzero_ps(); 16];
            for (j, row) in tile.iter_mut().enumerate().take(n - k0) {
                *row = keys.load16(g, block.start + k0 + j, c0);
            }
            let columns = transpose_16x16(tile);
            for (c, column) in columns.iter().enumerate() {
                // SAFETY: `transposed` holds d rows of KEYS; k0 + 16 <= KEYS.
                unsafe {
                    _mm512_storeu_ps(transposed.as_mut_ptr().add((c0 + c) * KEYS + k0), *column)
                };
            }
        }
    }
}

/// Rows become columns: lane `j` of register `c` out is lane `c` of register `j` in.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_16x16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved, then pairs of pairs: each 128-bit lane then holds one column's
    // four values from four rows. (Loops, not closures: a closure does not inherit the
    // function's target features and would not be inlined.)
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..16 {
        let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        t[i] = if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        };
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..16 {
        let base = 4 * (i / 4);
        let (a, b) = (t[base + (i % 4) / 2], t[base + 2 + (i % 4) / 2]);
        u[i] = if i % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        };
    }
    // Then 128-bit lanes across groups of four rows, twice.
    let mut v = [_mm512_setzero_ps(); 16];
    for i in 0..16 {
        let base = 8 * (i / 8);
        let (a, b) = (u[base + i % 4], u[base + 4 + i % 4]);
        v[i] = if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        };
    }
    let mut columns = [_mm512_setzero_ps(); 16];
    for (i, column) in columns.iter_mut().enumerate() {
        let (a, b) = (v[i % 8], v[8 + i % 8]);
        *column = if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        };
    }
    columns
}

/// What a row's sum and output so far are scaled by when its maximum moves from `max` to
/// `new_max`: nothing is kept of a row that has seen no key yet.
#[inline(always)]
fn kept(max: f32, new_max: f32) -> f32 {
    if max == f32::NEG_INFINITY {
        0.0
    } else {
        exp(max - new_max)
    }
}

/// The online softmax's step for one row and block, in plain arithmetic: the block's scores,
/// the new maximum, the old sum and output scaled to it, the block's weights added. Inlined
/// into [`update_rows`], which picks the instructions.
#[inline(always)]
fn update_row(row: &mut RowUpdate) {
    let mut scores = [0f32; KEYS];
    for (c, &qc) in row.q.iter().enumerate() {
        let column = &row.transposed[c * KEYS..][..KEYS];
        for (score, &k) in scores.iter_mut().zip(column) {
            *score = qc.mul_add(k, *score);
        }
    }
    let seen = &mut scores[row.seen.clone()];
    let mut block_max = f32::NEG_INFINITY;
    for score in seen.iter_mut() {
        *score *= row.scale;
        block_max = block_max.max(*score);
    }
    let new_max = (*row.max).max(block_max);
    let kept = kept(*row.max, new_max);
    let mut block_sum = 0f32;
    for score in seen.iter_mut() {
        *score = exp(*score - new_max);
        block_sum += *score;
    }
    *row.max = new_max;
    *row.sum = *row.sum * kept + block_sum;
    for o in row.output.iter_mut() {
        *o *= kept;
    }
    let dv = row.output.len();
    for (j, &p) in seen.iter().enumerate() {
        let value = &row.values[(row.seen.start + j) * dv..][..dv];
        for (o, &v) in row.output.iter_mut().zip(value) {
            *o = p.mul_add(v, *o);
        }
    }
}

/// [`update_row`] in AVX-512 for each of `rows`: the block's scores of up to four rows at a
/// time (each load of the block's keys shared by them), then each row's softmax step.
///
/// # Safety
/// The CPU has AVX-512 F and FMA; `d` and `dv` are multiples of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn update_rows_avx512(rows: &mut [RowUpdate]) {
    for batch in rows.chunks_mut(4) {
        // SAFETY: the caller's.
        let steps = unsafe {
            match batch.len() {
                4 => softmax_steps_avx512::<4>(batch),
                3 => softmax_steps_avx512::<3>(batch),
                2 => softmax_steps_avx512::<2>(batch),
                _ => softmax_steps_avx512::<1>(batch),
            }
        };
        // Rows that see the same keys (a query's heads) take the values two at a time,
        // sharing each load; the sums are the same steps either way.
        let mut i = 0;
        while i < batch.len() {
            if i + 1 < batch.len() && batch[i].seen == batch[i + 1].seen {
                let (first, second) = batch.split_at_mut(i + 1);
                // SAFETY: the caller's.
                unsafe {
                    add_values_avx512([&mut first[i], &mut second[0]], [&steps[i], &steps[i + 1]])
                };
                i += 2;
            } else {
                // SAFETY: the caller's.
                unsafe { add_values_avx512([&mut batch[i]], [&steps[i]]) };
                i += 1;
            }
        }
    }
}

/// The scores of `N` rows (`batch`'s) together, then each row's softmax step, its weights and
/// output factor in `steps[i]` for row `i`.
///
/// # Safety
/// As [`update_rows_avx512`]; `batch` holds `N` rows.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_steps_avx512<const N: usize>(batch: &mut [RowUpdate]) -> [([f32; KEYS], f32); 4] {
    let mut queries: [&[f32]; N] = [&[]; N];
    for (query, row) in queries.iter_mut().zip(batch.iter()) {
        *query = row.q;
    }
    let mut steps = [([0f32; KEYS], 0f32); 4];
    // SAFETY: the caller's.
    unsafe {
        let scores = scores_avx512(queries, batch[0].transposed);
        for ((step, row), scores) in steps.iter_mut().zip(batch.iter_mut()).zip(scores) {
            *step = softmax_step_avx512(row, scores);
        }
    }
    steps
}

/// The block's 64 unscaled scores for each of `N` queries, in four registers each; each value
/// of the block's keys is loaded once for all of them. Each score is the same fixed-order sum
/// whichever queries share the batch.
///
/// # Safety
/// The CPU has AVX-512 F and FMA; `transposed` holds `d` rows of [`KEYS`] for the queries' `d`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scores_avx512<const N: usize>(
    queries: [&[f32]; N],
    transposed: &[f32],
) -> [[std::arch::x86_64::__m512; KEYS / 16]; N] {
    use std::arch::x86_64::*;
    let d = queries[0].len();
    let t = transposed[..d * KEYS].as_ptr();
    let mut scores = [[_mm512_setzero_ps(); KEYS / 16]; N];
    for c in 0..d {
        let mut columns = [_mm512_setzero_ps(); KEYS / 16];
        for (k, column) in columns.iter_mut().enumerate() {
            // SAFETY: c < d and 16 k + 16 <= KEYS.
            *column = unsafe { _mm512_loadu_ps(t.add(c * KEYS + 16 * k)) };
        }
        for (scores, q) in scores.iter_mut().zip(&queries) {
            let qc = _mm512_set1_ps(q[c]);
            for (score, &column) in scores.iter_mut().zip(&columns) {
                *score = _mm512_fmadd_ps(qc, column, *score);
            }
        }
    }
    scores
}

/// The softmax step of [`update_row`] in AVX-512 from the row's `scores` ([`scores_avx512`]),
/// masked to the keys the row sees: the new maximum and sum, and the block's weights and the
/// factor the row's output is to be scaled by, for [`add_values_avx512`].
///
/// # Safety
/// The CPU has AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_step_avx512(
    row: &mut RowUpdate,
    mut scores: [std::arch::x86_64::__m512; KEYS / 16],
) -> ([f32; KEYS], f32) {
    use std::arch::x86_64::*;
    // Lane j of register k is key 16 k + j: seen when inside `seen`.
    let bits = |n: usize| if n >= KEYS { u64::MAX } else { (1u64 << n) - 1 };
    let seen = bits(row.seen.end) & !bits(row.seen.start);
    let masks: [__mmask16; KEYS / 16] = std::array::from_fn(|k| (seen >> (16 * k)) as __mmask16);
    let scale = _mm512_set1_ps(row.scale);
    let mut block_max = f32::NEG_INFINITY;
    for (score, &mask) in scores.iter_mut().zip(&masks) {
        *score = _mm512_mul_ps(*score, scale);
        if mask != 0 {
            block_max = block_max.max(_mm512_mask_reduce_max_ps(mask, *score));
        }
    }
    let new_max = (*row.max).max(block_max);
    let kept = kept(*row.max, new_max);
    let shift = _mm512_set1_ps(new_max);
    let mut weights = [0f32; KEYS];
    let mut block_sum = _mm512_setzero_ps();
    for (k, (score, &mask)) in scores.iter().zip(&masks).enumerate() {
        let p = _mm512_maskz_mov_ps(mask, exp_avx512(_mm512_sub_ps(*score, shift)));
        block_sum = _mm512_add_ps(block_sum, p);
        // SAFETY: 16 weights from 16 k.
        unsafe { _mm512_storeu_ps(weights.as_mut_ptr().add(16 * k), p) };
    }
    *row.max = new_max;
    *row.sum = *row.sum * kept + _mm512_reduce_add_ps(block_sum);
    (weights, kept)
}

/// The value step of [`update_row`] in AVX-512 for `R` rows that see the same keys, each with
/// its [`softmax_step_avx512`]: each output scaled, then each seen key's values added with the
/// row's weight, 64 output values at a time held in registers.
///
/// # Safety
/// The CPU has AVX-512 F and FMA; `dv` is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn add_values_avx512<const R: usize>(
    mut rows: [&mut RowUpdate; R],
    steps: [&([f32; KEYS], f32); R],
) {
    let dv = rows[0].output.len();
    let mut c = 0;
    while c + 64 <= dv {
        // SAFETY: the features; c + 64 <= dv.
        unsafe { add_value_registers::<R, 4>(&mut rows, &steps, c) };
        c += 64;
    }
    while c < dv {
        // SAFETY: the features; c + 16 <= dv.
        unsafe { add_value_registers::<R, 1>(&mut rows, &steps, c) };
        c += 16;
    }
}

/// [`add_values_avx512`] for output values `c..c + 16 N`.
///
/// # Safety
/// The CPU has AVX-512 F and FMA; `c + 16 N <= dv`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn add_value_registers<const R: usize, const N: usize>(
    rows: &mut [&mut RowUpdate; R],
    steps: &[&([f32; KEYS], f32); R],
    c: usize,
) {
    use std::arch::x86_64::*;
    let dv = rows[0].output.len();
    let mut sums = [[_mm512_setzero_ps(); N]; R];
    for ((sums, row), (_, kept)) in sums.iter_mut().zip(rows.iter()).zip(steps) {
        let o = row.output[c..][..16 * N].as_ptr();
        let kept = _mm512_set1_ps(*kept);
        for (n, sum) in sums.iter_mut().enumerate() {
            // SAFETY: `o` holds 16 N values.
            *sum = _mm512_mul_ps(unsafe { _mm512_loadu_ps(o.add(16 * n)) }, kept);
        }
    }
    let values = rows[0].values;
    for j in rows[0].seen.clone() {
        let value = values[j * dv + c..][..16 * N].as_ptr();
        let mut loaded = [_mm512_setzero_ps(); N];
        for (n, v) in loaded.iter_mut().enumerate() {
            // SAFETY: 16 N values from `value`.
            *v = unsafe { _mm512_loadu_ps(value.add(16 * n)) };
        }
        for (sums, (weights, _)) in sums.iter_mut().zip(steps) {
            let p = _mm512_set1_ps(weights[j]);
            for (sum, &v) in sums.iter_mut().zip(&loaded) {
                *sum = _mm512_fmadd_ps(p, v, *sum);
            }
        }
    }
    for (sums, row) in sums.iter().zip(rows.iter_mut()) {
        let o = row.output[c..][..16 * N].as_mut_ptr();
        for (n, sum) in sums.iter().enumerate() {
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(o.add(16 * n), *sum) };
        }
    }
}

/// [`exp`] of 16 values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
    let mut p = _mm512_set1_ps(EXP_TERMS[0]);
    for &term in &EXP_TERMS[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(term));
    }
    let power = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(power))
}

/// ln 2 in two parts: the first with few enough bits that `n ln 2` is exact.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// `e^r`'s Taylor terms from the highest power down: 1/720, 1/120, ..., 1, 1.
const EXP_TERMS: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^x` for `x <= 0` to a few parts in 10^7: `2^n e^r` with `n` the nearest integer to
/// `x log2 e` and `r = x - n ln 2` (ln 2 in two parts, so `r` keeps its bits), `e^r` a
/// polynomial of degree 6.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LOW, (-n).mul_add(LN2_HIGH, x));
    let p = EXP_TERMS[1..]
        .iter()
        .fold(EXP_TERMS[0], |p, &term| p.mul_add(r, term));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn exp_is_within_a_few_parts_in_ten_million() {
        for i in 0..20_000 {
            let x = -(i as f32) * 0.004;
            let (ours, exact) = (exp(x), x.exp());
            assert!(
                (ours - exact).abs() <= 3e-7 * exact,
                "{x}: {ours} against {exact}"
            );
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_registers_transpose_as_a_matrix_does() {
        if !avx512() {
            return;
        }
        let rows: Vec<[f32; 16]> = (0..16)
            .map(|j| std::array::from_fn(|c| (100 * j + c) as f32))
            .collect();
        // SAFETY: the CPU has AVX-512 F.
        let columns: Vec<[f32; 16]> = unsafe {
            use std::arch::x86_64::*;
            let registers = std::array::from_fn(|j| _mm512_loadu_ps(rows[j].as_ptr()));
            transpose_16x16(registers)
                .iter()
                .map(|&column| std::mem::transmute::<__m512, [f32; 16]>(column))
                .collect()
        };
        for (c, column) in columns.iter().enumerate() {
            for (j, &value) in column.iter().enumerate() {
                assert_eq!(value, rows[j][c], "value {c} of key {j}");
            }
        }
    }

    /// A query's output is the same, bit for bit, whether it is a decode step (its key head's
    /// chunks shared out over the threads), one of a few queries, or inside a long prompt: with
    /// and without a window and sinks, in f16 and f32, through the AVX-512 path and the plain
    /// one.
    /// Keys dropped before the chunk holding the first one a window lets a query see (as a
    /// windowed layer's cache drops them) leave its output's bits as they were: positions count
    /// from the first key kept, and the kept keys fall into the same chunks.
    #[test]
    fn attention_from_a_later_chunk_keeps_its_bits() {
        let device = Device::Cpu;
        let (heads, kv_heads, d, s) = (4, 2, 24, 1100);
        let q = Tensor::randn(0f32, 1.0, (heads, s, d), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv_heads, s, d), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv_heads, s, d), &device).unwrap();
        let sinks: Vec<f32> = (0..heads).map(|h| h as f32 - 2.0).collect();
        for (window, sinks) in [(300, None), (128, Some(sinks.as_slice())), (1, None)] {
            for (position, n) in [(600usize, 1), (900, 1), (1000, 7), (1090, 10)] {
                let seen = position + n;
                let base = (position + 1).saturating_sub(window) / CHUNK * CHUNK;
                assert!(base > 0);
                let query = q.narrow(1, position, n).unwrap();
                let all = attend(
                    &query,
                    &k.narrow(1, 0, seen).unwrap(),
                    &v.narrow(1, 0, seen).unwrap(),
                    position,
                    Some(window),
                    sinks,
                    0.2,
                )
                .unwrap();
                let kept = attend(
                    &query,
                    &k.narrow(1, base, seen - base).unwrap(),
                    &v.narrow(1, base, seen - base).unwrap(),
                    position - base,
                    Some(window),
                    sinks,
                    0.2,
                )
                .unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    values.iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(
                    bits(&all),
                    bits(&kept),
                    "window {window}, query at {position}"
                );
            }
        }
    }

    #[test]
    fn a_query_gives_the_same_bits_alone_as_inside_a_prompt() {
        let device = Device::Cpu;
        for (heads, kv_heads, d) in [(9, 3, 64), (4, 2, 24)] {
            let (offset, t) = (150, 700);
            let s = offset + t;
            let q = Tensor::randn(0f32, 1.0, (heads, t, d), &device).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kv_heads, s, d), &device).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kv_heads, s, d), &device).unwrap();
            for dtype in [DType::F32, DType::F16] {
                let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
                let sinks: Vec<f32> = (0..heads).map(|h| h as f32 - 4.0).collect();
                let reaches = [None, Some(300), Some(1)]
                    .into_iter()
                    .flat_map(|window| [(window, None), (window, Some(sinks.as_slice()))]);
                for (window, sinks) in reaches {
                    let prompt = attend(&q, &k, &v, offset, window, sinks, 0.2).unwrap();
                    for (i, n) in [(0, 1), (255, 1), (256, 3), (531, 1), (690, 10)] {
                        let seen = offset + i + n;
                        let alone = attend(
                            &q.narrow(1, i, n).unwrap(),
                            &k.narrow(1, 0, seen).unwrap(),
                            &v.narrow(1, 0, seen).unwrap(),
                            offset + i,
                            window,
                            sinks,
                            0.2,
                        )
                        .unwrap();
                        let inside = prompt.narrow(1, i, n).unwrap();
                        let (alone, inside) = (
                            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                            inside.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        );
                        assert!(
                            alone
                                .iter()
                                .zip(&inside)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "d {d}, {dtype:?}, window {window:?}, queries {i}..{}",
                            i + n
                        );
                    }
                }
            }
        }
    }
}
