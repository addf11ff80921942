//! The AVX-512 VNNI products: groups of tokens through each weight row, two blocks through one
//! `vpdpbusd`.
//!
//! A prompt's product goes a group of tokens at a time: their activations are laid out once per
//! block pair with their scales spread over the lanes, then every row is unpacked once for the
//! whole group and meets each token in four or five instructions (memory operands from the
//! group). Every element gets its own accumulator and the same steps in the same order in any
//! group, so results depend neither on the batch's other tokens nor on the thread count. Tokens
//! left over after the groups (and a decode step's one token) go through the one-token dot.
//!
//! Rows in whole tiles of 16 (of any type) take a prompt's groups differently, one row to a
//! register lane (see `avx512_tiles`).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. 4- and 5-bit quants are unsigned already. A
//! Q8_0 weight goes in as `w + 128` (its sign bit flipped) and `128 * (the activations' sum)`,
//! laid out with the group, starts the instruction's accumulator negated.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{
    block_quants, e2m1_lifted, four_scales, nibbles, scale_bits, small_scales, sub_block_scales,
};
use super::avx512_tiles::{TILE, block_tile, k_tile};
use super::k_quants::{self, Layout, Q2K, Q3K, Q4K, Q5K, Q6K, SUB_BLOCKS};
use super::small::{self, Kind};
use super::{Activations, BLOCK, BLOCK_BYTES, Format, tiles, token_groups, write_row};

/// Tokens in a group: eight accumulators and a row's operands stay in registers.
const GROUP: usize = 8;

/// Quantizes 32 values into `out` and returns their scale `max|x| / 127` (in f32: the caller
/// rounds it through f16); quants round half to even, as llama.cpp's vector code rounds them.
///
/// # Safety
/// The CPU has AVX-512 F/BW and F16C; both slices hold 32 values.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(super) unsafe fn quantize_block(block: &[f32], out: &mut [i8]) -> f32 {
    debug_assert!(block.len() == BLOCK && out.len() == BLOCK);
    // SAFETY: the caller's.
    unsafe {
        let low = _mm512_loadu_ps(block.as_ptr());
        let high = _mm512_loadu_ps(block.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
        let scale = amax / 127.0;
        let inverse = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        for (half, values) in [low, high].into_iter().enumerate() {
            let rounded = _mm512_cvtps_epi32(_mm512_mul_ps(values, inverse));
            _mm_storeu_si128(
                out.as_mut_ptr().add(16 * half) as *mut __m128i,
                _mm512_cvtsepi32_epi8(rounded),
            );
        }
        scale
    }
}

/// Elements `(t, r)` of `x W^T` for every token `t` of `x` and the rows `rows` of `weights` (a
/// matrix of `format` blocks), written to `out[t * out_rows + r]`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C (as `Activations` found); `weights`
/// holds the rows; `out` has room for every element and nothing else writes them meanwhile.
pub(super) unsafe fn product(
    format: Format,
    weights: &[u8],
    rows: Range<usize>,
    x: &Activations,
    out: *mut f32,
    out_rows: usize,
) {
    // SAFETY: the caller's.
    unsafe {
        match format {
            Format::Q8_0 => product_of::<small::Q8_0>(weights, rows, x, out, out_rows),
            Format::Q4_0 => product_of::<small::Q4_0>(weights, rows, x, out, out_rows),
            Format::Q4_1 => product_of::<small::Q4_1>(weights, rows, x, out, out_rows),
            Format::Q5_0 => product_of::<small::Q5_0>(weights, rows, x, out, out_rows),
            Format::Q5_1 => product_of::<small::Q5_1>(weights, rows, x, out, out_rows),
            Format::Mxfp4 => product_of::<small::Mxfp4>(weights, rows, x, out, out_rows),
            Format::Q2K => product_k::<Q2K>(weights, rows, x, out, out_rows),
            Format::Q3K => product_k::<Q3K>(weights, rows, x, out, out_rows),
            Format::Q4K => product_k::<Q4K>(weights, rows, x, out, out_rows),
            Format::Q5K => product_k::<Q5K>(weights, rows, x, out, out_rows),
            Format::Q6K => product_k::<Q6K>(weights, rows, x, out, out_rows),
        }
    }
}

/// One element: the row in `weights` (one row of `format` blocks) with token `t` of `x`.
///
/// # Safety
/// As [`product`].
#[cfg(test)]
pub(super) unsafe fn element(format: Format, weights: &[u8], x: &Activations, t: usize) -> f32 {
    let mut out = vec![0f32; x.len()];
    // SAFETY: the caller's; `out` holds one element per token.
    unsafe { product(format, weights, 0..1, x, out.as_mut_ptr(), 1) };
    out[t]
}

/// Token `t` of `x` with one weight row, alone: a decode step's product, which has no other
/// tokens to share the row's unpacking with.
///
/// # Safety
/// As [`product_of`]; `row` holds `x.cols / 32` blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot<S: Kind>(row: &[u8], x: &Activations, t: usize) -> f32 {
    let blocks = x.cols / BLOCK;
    let quants = &x.quants[t * x.cols..(t + 1) * x.cols];
    let scales = &x.scales[t * blocks..(t + 1) * blocks];
    // SAFETY: the caller's.
    unsafe {
        if S::Q8 {
            dot_q8_0(row, quants, scales)
        } else {
            dot_small::<S>(row, quants, scales, &x.sums[t * blocks..(t + 1) * blocks])
        }
    }
}

/// [`product`] for one 32-value block type: Q8_0, a 4- or 5-bit one, or MXFP4 (see `small`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn product_of<S: Kind>(
    weights: &[u8],
    rows: Range<usize>,
    x: &Activations,
    out: *mut f32,
    out_rows: usize,
) {
    let bytes = S::BYTES;
    let blocks = x.cols / BLOCK;
    let row_bytes = blocks * bytes;
    debug_assert!(weights.len() >= rows.end * row_bytes);
    let tokens = x.len();
    let grouped = tokens / GROUP * GROUP;
    let tiled_rows = if grouped > 0 {
        let total = weights.len() / row_bytes;
        tiles(total, &rows, TILE, |first| {
            // SAFETY: the tile's rows are inside `weights`; the caller's for `out`.
            unsafe {
                block_tile::<S>(
                    weights,
                    first,
                    row_bytes,
                    x,
                    0..grouped,
                    &rows,
                    out,
                    out_rows,
                )
            }
        })
    } else {
        rows.clone()
    };
    let mut group = Vec::new();
    let mut t = 0;
    while t + GROUP <= tokens && !tiled_rows.is_empty() {
        // SAFETY: tokens t..t + GROUP are rows of `x`.
        unsafe { lay_out(x, t, GROUP, Extra::of::<S>(), &mut group) };
        // Rows two at a time, a last odd one alone.
        let mut r = tiled_rows.start;
        while r < rows.end {
            // SAFETY: rows r (and r + 1 when taken) are inside `weights`; the caller's for `out`.
            unsafe {
                let row = weights.as_ptr().add(r * row_bytes);
                let sums: &[[f32; GROUP]] = if r + 1 < rows.end {
                    let rows = [row, row.add(row_bytes)];
                    &rows_with_group::<S, 2>(rows, blocks, bytes, &group)
                } else {
                    &rows_with_group::<S, 1>([row], blocks, bytes, &group)
                };
                for (i, row_sums) in sums.iter().enumerate() {
                    for (j, &sum) in row_sums.iter().enumerate() {
                        *out.add((t + j) * out_rows + r + i) = sum;
                    }
                }
                r += sums.len();
            }
        }
        t += GROUP;
    }
    for t in grouped..tokens {
        for r in rows.clone() {
            // SAFETY: as above.
            unsafe {
                let row =
                    std::slice::from_raw_parts(weights.as_ptr().add(r * row_bytes), row_bytes);
                *out.add(t * out_rows + r) = dot::<S>(row, x, t);
            }
        }
    }
}

/// [`product`] for a K-quant type: a prompt's groups of eight tokens through whole tiles of 16
/// rows (see `avx512_tiles`); the other rows, the tokens left over and a decode step's token
/// through [`rows_with_k`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn product_k<K: Layout>(
    weights: &[u8],
    rows: Range<usize>,
    x: &Activations,
    out: *mut f32,
    out_rows: usize,
) {
    let row_bytes = x.cols / k_quants::VALUES * K::BYTES;
    debug_assert!(weights.len() >= rows.end * row_bytes);
    let tokens = x.len();
    let grouped = tokens / GROUP * GROUP;
    let untiled = if grouped > 0 {
        tiles(weights.len() / row_bytes, &rows, TILE, |first| {
            // SAFETY: the tile's rows are inside `weights`; the caller's for `out`.
            unsafe {
                k_tile::<K>(
                    weights,
                    first,
                    row_bytes,
                    x,
                    0..grouped,
                    &rows,
                    out,
                    out_rows,
                )
            }
        })
    } else {
        rows.clone()
    };
    // SAFETY: the caller's.
    unsafe {
        rows_with_k::<K>(
            weights,
            rows.start..untiled.start,
            grouped..tokens,
            x,
            out,
            out_rows,
        );
        rows_with_k::<K>(weights, untiled, 0..tokens, x, out, out_rows);
    }
}

/// The rows `rows` with the tokens `tokens`: groups of tokens through each row, those left over
/// in smaller groups (each token's steps are the same in a group of any size, so a decode
/// step's token gets the bits it would get among the few left over from a prompt). Tokens are
/// read where `x` holds them: per pair of sub-blocks a token needs only its 64 quants, and a
/// group's rows of up to a few thousand values stay in the first-level cache.
///
/// # Safety
/// As [`product`], with `x` in Q8_K.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_with_k<K: Layout>(
    weights: &[u8],
    rows: Range<usize>,
    tokens: Range<usize>,
    x: &Activations,
    out: *mut f32,
    out_rows: usize,
) {
    let supers = x.cols / k_quants::VALUES;
    let row_bytes = supers * K::BYTES;
    if rows.is_empty() {
        return;
    }
    for (t, count) in token_groups(tokens) {
        for r in rows.clone() {
            // SAFETY: row r is inside `weights`, tokens t..t + count inside `x`; the caller's
            // for `out`.
            unsafe {
                let row = weights.as_ptr().add(r * row_bytes);
                match count {
                    GROUP => write_row(
                        out,
                        out_rows,
                        r,
                        t,
                        row_with_k::<K, GROUP>(row, supers, x, t),
                    ),
                    4 => write_row(out, out_rows, r, t, row_with_k::<K, 4>(row, supers, x, t)),
                    2 => write_row(out, out_rows, r, t, row_with_k::<K, 2>(row, supers, x, t)),
                    _ => write_row(out, out_rows, r, t, row_with_k::<K, 1>(row, supers, x, t)),
                }
            }
        }
    }
}

/// One K-quant weight row (at `row`, `supers` super-blocks) with tokens `first..first + N` of
/// `x` (in Q8_K), as AVX2's `dot_k` sums it: per super-block, in integers, each pair of
/// sub-blocks' 16-bit pairs of products times their groups' integer scales, less (or beside) the
/// integer offsets times the token's sums of 16; then converted once, times `d` (and `dmin`)
/// and the token's scale.
///
/// # Safety
/// The CPU has the features of [`product_k`]; the row holds `supers` super-blocks and the
/// tokens are rows of `x`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn row_with_k<K: Layout, const N: usize>(
    row: *const u8,
    supers: usize,
    x: &Activations,
    first: usize,
) -> [f32; N] {
    let blocks = x.cols / BLOCK;
    let mut acc = [_mm512_setzero_ps(); N];
    for s in 0..supers {
        // SAFETY: super-block s is inside the row, and its values inside each token's row.
        unsafe {
            let block = row.add(s * K::BYTES);
            let weight = K::scale_lanes(block);
            let mut dots = [_mm512_setzero_si512(); N];
            for p in 0..SUB_BLOCKS / 2 {
                let w = K::pair_quants(block, p);
                let group_scales = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(sub_block_scales(weight.scales, 2 * p)),
                    sub_block_scales(weight.scales, 2 * p + 1),
                );
                let at = s * k_quants::VALUES + 2 * p * BLOCK;
                for (j, dots) in dots.iter_mut().enumerate() {
                    let a = x.quants.as_ptr().add((first + j) * x.cols + at);
                    let a = _mm512_loadu_si512(a as *const __m512i);
                    // Pairs of unsigned quants (at most 63) by activations (at least -127)
                    // stay within i16.
                    let pairs = _mm512_maddubs_epi16(w, a);
                    *dots = _mm512_add_epi32(*dots, _mm512_madd_epi16(pairs, group_scales));
                }
            }
            for (j, (acc, dots)) in acc.iter_mut().zip(dots).enumerate() {
                let t = first + j;
                let sums = x
                    .integer_sums
                    .as_ptr()
                    .add((t * blocks + s * SUB_BLOCKS) * 2);
                let sixteens = _mm256_loadu_si256(sums as *const __m256i);
                let offsets = _mm512_zextsi256_si512(_mm256_madd_epi16(weight.offsets, sixteens));
                let token = *x.scales.get_unchecked(t * blocks + s * SUB_BLOCKS);
                let by_d = _mm512_set1_ps(weight.d * token);
                if K::ZERO_POINT {
                    let exact = _mm512_sub_epi32(dots, offsets);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), by_d, *acc);
                } else {
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), by_d, *acc);
                    let by_dmin = _mm512_set1_ps(weight.dmin * token);
                    *acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offsets), by_dmin, *acc);
                }
            }
        }
    }
    sums_of(acc)
}

/// One token's operands for one block pair: its quants, its block scales spread over the lanes
/// (lanes 0-7 the first block's, 8-15 the second's) and, for types with an offset, its block
/// sums spread alike; for Q8_0, `-128 * (the lane's four quants' sum)`, and for the other types
/// without an offset minus their zero point times it.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Operands {
    quants: __m512i,
    scales: __m512,
    extra: __m512i,
}

/// What a token's `extra` operand holds for a block type.
#[derive(Clone, Copy)]
enum Extra {
    /// Q8_0: `-128 * (the lane's four quants' sum)`, for weights that go in sign-flipped.
    SignFlip,
    /// Minus this zero point times the lane's four quants' sum.
    ZeroPoint(i8),
    /// The block sums as llama.cpp's Q8_1 stores them (through f16), spread over the lanes.
    RoundedSums,
}

impl Extra {
    /// The extra operand of a 32-value type: Q8_0, a 4- or 5-bit one, or MXFP4.
    fn of<S: Kind>() -> Self {
        match (S::Q8, S::MIN) {
            (true, _) => Self::SignFlip,
            (false, true) => Self::RoundedSums,
            (false, false) => Self::ZeroPoint(S::ZERO),
        }
    }
}

/// Lays out `count` tokens of `x` from `first` on as `group[pair * count + j]`; the upper half
/// of a last, unpaired block is zero.
///
/// # Safety
/// The CPU has the features of [`product_of`]; the tokens are rows of `x`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn lay_out(
    x: &Activations,
    first: usize,
    count: usize,
    extra: Extra,
    group: &mut Vec<Operands>,
) {
    let blocks = x.cols / BLOCK;
    group.clear();
    let mut b = 0;
    while b < blocks {
        let pair = b + 1 < blocks;
        for t in first..first + count {
            // SAFETY: block b (and b + 1 with `pair`) of token t is inside `x`.
            unsafe {
                let at = x.quants.as_ptr().add(t * x.cols + b * BLOCK);
                let quants = if pair {
                    _mm512_loadu_si512(at as *const __m512i)
                } else {
                    _mm512_zextsi256_si512(_mm256_loadu_si256(at as *const __m256i))
                };
                let scales = two_lanes(x.scales.as_ptr().add(t * blocks + b), pair);
                let extra = match extra {
                    Extra::SignFlip => less_zero(-128, quants),
                    Extra::ZeroPoint(zero) => less_zero(zero, quants),
                    Extra::RoundedSums => {
                        _mm512_castps_si512(two_lanes(x.sums.as_ptr().add(t * blocks + b), pair))
                    }
                };
                group.push(Operands {
                    quants,
                    scales,
                    extra,
                });
            }
        }
        b += 2;
    }
}

/// `R` weight rows (at `rows`, `blocks` blocks of `bytes` bytes each) with every token of
/// `group`: per block pair, the integer dots times the scale products, plus (types with an
/// offset) the offsets times the activation sums, each offset spread over its block's eight
/// lanes as `m / 8` (exact in binary). Rows taken together share each token's operands as they
/// are loaded; each element still gets its own accumulator and the same steps.
///
/// # Safety
/// The CPU has the features of [`product_of`]; each row holds `blocks` blocks and `group` their
/// pairs laid out by [`lay_out`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_with_group<S: Kind, const R: usize>(
    rows: [*const u8; R],
    blocks: usize,
    bytes: usize,
    group: &[Operands],
) -> [[f32; GROUP]; R] {
    let mut acc = [[_mm512_setzero_ps(); GROUP]; R];
    for (index, tokens) in group.chunks_exact(GROUP).enumerate() {
        let b = 2 * index;
        // SAFETY: each row holds block b (and b + 1 where there is one).
        let mut pairs = [(
            _mm512_setzero_si512(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        ); R];
        for (pair, &row) in pairs.iter_mut().zip(&rows) {
            // SAFETY: as above.
            *pair = unsafe { weight_pair::<S>(row, b, blocks, bytes) };
        }
        for (j, token) in tokens.iter().enumerate() {
            for (acc, &(w, dw, mw)) in acc.iter_mut().zip(&pairs) {
                let lanes = if S::Q8 || !S::MIN {
                    _mm512_dpbusd_epi32(token.extra, w, token.quants)
                } else {
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, token.quants)
                };
                let scale = _mm512_mul_ps(dw, token.scales);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, acc[j]);
                if !S::Q8 && S::MIN {
                    acc[j] = _mm512_fmadd_ps(mw, _mm512_castsi512_ps(token.extra), acc[j]);
                }
            }
        }
    }
    let mut sums = [[0f32; GROUP]; R];
    for (sums, acc) in sums.iter_mut().zip(acc) {
        *sums = sums_of(acc);
    }
    sums
}

/// Each register's lanes added up. (A loop, not a closure: a closure does not inherit the
/// function's target features, so it is not inlined, and each register went through memory.)
#[inline]
#[target_feature(enable = "avx512f")]
fn sums_of<const N: usize>(registers: [__m512; N]) -> [f32; N] {
    let mut sums = [0f32; N];
    for (sum, register) in sums.iter_mut().zip(registers) {
        *sum = _mm512_reduce_add_ps(register);
    }
    sums
}

/// Blocks `b` and `b + 1` (zero where the row has no `b + 1`) of the row at `row`: their
/// unsigned quants (Q8_0's sign-flipped), their scales spread over the lanes (lanes 0-7 the
/// first block's, 8-15 the second's) and, for types with an offset, their offsets spread as
/// `m / 8`.
///
/// # Safety
/// The CPU has the features of [`product_of`]; the row holds `blocks` blocks of `bytes` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn weight_pair<S: Kind>(
    row: *const u8,
    b: usize,
    blocks: usize,
    bytes: usize,
) -> (__m512i, __m512, __m512) {
    let pair = b + 1 < blocks;
    // SAFETY: blocks b and, with `pair`, b + 1 are inside the row.
    unsafe {
        let first = row.add(b * bytes);
        let second = first.add(bytes);
        if S::Q8 {
            let w = if pair {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(block_quants(first)),
                    block_quants(second),
                )
            } else {
                _mm512_zextsi256_si512(block_quants(first))
            };
            let h0 = scale_bits(first) as i16;
            let h1 = if pair { scale_bits(second) as i16 } else { 0 };
            let dw = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, 0, 0, h1, h0));
            // The sign bit flipped: w + 128, unsigned.
            let w = _mm512_xor_si512(w, _mm512_set1_epi8(-128));
            (w, spread(dw), _mm512_setzero_ps())
        } else {
            let (d0, m0) = small_scales::<S>(first);
            let (q1, d1, m1) = if pair {
                let (d1, m1) = small_scales::<S>(second);
                (small_quants::<S>(second), d1, m1)
            } else {
                (_mm256_setzero_si256(), 0.0, 0.0)
            };
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(small_quants::<S>(first)), q1);
            let dw = spread(_mm_set_ps(0.0, 0.0, d1, d0));
            let mw = spread(_mm_set_ps(0.0, 0.0, m1 * 0.125, m0 * 0.125));
            (w, dw, mw)
        }
    }
}

/// `sum over blocks of (weight scale * activation scale) * (integer dot of the quants)`, two
/// blocks to a 512-bit register and four blocks a step into two accumulators.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI and F16C; `weights` holds `scales.len()` blocks and `quants`
/// 32 quants for each.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
unsafe fn dot_q8_0(weights: &[u8], quants: &[i8], scales: &[f32]) -> f32 {
    let blocks = scales.len();
    debug_assert!(weights.len() >= blocks * BLOCK_BYTES && quants.len() >= blocks * BLOCK);
    let w = weights.as_ptr();
    let a = quants.as_ptr();
    // Spread scales 0 and 1 (or 2 and 3) over lanes 0-7 and 8-15.
    let first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let second = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut b = 0;
    // SAFETY (all blocks below): block b + 3, or b in the tail, is inside both slices.
    while b + 4 <= blocks {
        unsafe {
            let block = w.add(b * BLOCK_BYTES);
            let both = _mm512_castps128_ps512(four_scales(block, scales.as_ptr().add(b)));
            for (half, lanes) in [first, second].into_iter().enumerate() {
                let pair = block.add(2 * half * BLOCK_BYTES);
                let quants = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(block_quants(pair)),
                    block_quants(pair.add(BLOCK_BYTES)),
                );
                let sums = integer_dots(
                    quants,
                    _mm512_loadu_si512(a.add((b + 2 * half) * BLOCK) as *const __m512i),
                );
                acc[half] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sums),
                    _mm512_permutexvar_ps(lanes, both),
                    acc[half],
                );
            }
        }
        b += 4;
    }
    while b < blocks {
        unsafe {
            let block = w.add(b * BLOCK_BYTES);
            let scale = _mm_mul_ss(
                _mm_cvtph_ps(_mm_cvtsi64_si128(scale_bits(block))),
                _mm_set_ss(*scales.get_unchecked(b)),
            );
            // The upper half stays zero.
            let sums = integer_dots(
                _mm512_zextsi256_si512(block_quants(block)),
                _mm512_zextsi256_si512(_mm256_loadu_si256(a.add(b * BLOCK) as *const __m256i)),
            );
            acc[0] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(sums),
                _mm512_permutexvar_ps(first, _mm512_castps128_ps512(scale)),
                acc[0],
            );
        }
        b += 1;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// `sum over blocks of d (activation scale) (integer dot of the quants less the zero point) +
/// m (activation block sum)` for a 4- or 5-bit block type or MXFP4 (see `small`): the unsigned
/// quants go straight into `vpdpbusd`, two blocks to a 512-bit register.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI, AVX2, FMA and F16C; `weights` holds `scales.len()` blocks,
/// `quants` 32 quants and `sums` one sum for each.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_small<S: Kind>(weights: &[u8], quants: &[i8], scales: &[f32], sums: &[f32]) -> f32 {
    let blocks = scales.len();
    let bytes = S::BYTES;
    debug_assert!(weights.len() >= blocks * bytes && quants.len() >= blocks * BLOCK);
    debug_assert!(sums.len() >= blocks);
    let w = weights.as_ptr();
    let a = quants.as_ptr();
    let mut acc = _mm512_setzero_ps();
    let mut offsets = 0f32;
    let mut b = 0;
    // SAFETY (all blocks below): block b + 1, or b in the tail, is inside every slice.
    while b + 2 <= blocks {
        unsafe {
            let (first, second) = (w.add(b * bytes), w.add((b + 1) * bytes));
            let (d0, m0) = small_scales::<S>(first);
            let (d1, m1) = small_scales::<S>(second);
            let quants = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(small_quants::<S>(first)),
                small_quants::<S>(second),
            );
            let activations = _mm512_loadu_si512(a.add(b * BLOCK) as *const __m512i);
            let lanes =
                _mm512_dpbusd_epi32(less_zero_points::<S>(activations), quants, activations);
            let pair = _mm_set_ps(
                0.0,
                0.0,
                d1 * *scales.get_unchecked(b + 1),
                d0 * *scales.get_unchecked(b),
            );
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), spread(pair), acc);
            if S::MIN {
                offsets += m0 * *sums.get_unchecked(b);
                offsets += m1 * *sums.get_unchecked(b + 1);
            }
        }
        b += 2;
    }
    if b < blocks {
        unsafe {
            let block = w.add(b * bytes);
            let (d, m) = small_scales::<S>(block);
            // The upper half stays zero.
            let activations =
                _mm512_zextsi256_si512(_mm256_loadu_si256(a.add(b * BLOCK) as *const __m256i));
            let lanes = _mm512_dpbusd_epi32(
                less_zero_points::<S>(activations),
                _mm512_zextsi256_si512(small_quants::<S>(block)),
                activations,
            );
            let scale = _mm512_set1_ps(d * *scales.get_unchecked(b));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, acc);
            if S::MIN {
                offsets += m * *sums.get_unchecked(b);
            }
        }
    }
    _mm512_reduce_add_ps(acc) + offsets
}

/// Minus `zero` times each lane's four activations: the accumulator a dot of unsigned quants
/// starts from so that it is the dot of `q - zero` in integers. (As bytes, -128 is 128
/// unsigned: Q8_0's sign-flipped weights.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn less_zero(zero: i8, activations: __m512i) -> __m512i {
    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(zero), activations);
    _mm512_sub_epi32(_mm512_setzero_si512(), sums)
}

/// The accumulator a 4- or 5-bit dot starts from: [`less_zero`] of its zero point without an
/// offset, else zero.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn less_zero_points<S: Kind>(activations: __m512i) -> __m512i {
    if S::MIN {
        _mm512_setzero_si512()
    } else {
        less_zero(S::ZERO, activations)
    }
}

/// Per-lane sums of four products of signed bytes. vpdpbusd multiplies unsigned by signed
/// bytes, so each weight's sign moves onto its activation and the weight gives its magnitude.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn integer_dots(weights: __m512i, activations: __m512i) -> __m512i {
    let negative = _mm512_movepi8_mask(weights);
    let signed = _mm512_mask_sub_epi8(activations, negative, _mm512_setzero_si512(), activations);
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(weights), signed)
}

/// The 32 unsigned quants of a 4- or 5-bit or MXFP4 block (see `small`), in value order: the
/// fifth bits are added through a mask register, one instruction where AVX2 needs four.
///
/// # Safety
/// `block` points at a whole block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
pub(super) unsafe fn small_quants<S: Kind>(block: *const u8) -> __m256i {
    // SAFETY: the caller's.
    unsafe {
        let low = nibbles(block.add(S::QUANTS_AT));
        if S::E2M1 {
            return e2m1_lifted(low);
        }
        if !S::HIGH {
            return low;
        }
        let high = (block.add(small::high_at(S::MIN)) as *const u32).read_unaligned();
        _mm256_mask_add_epi8(low, high, low, _mm256_set1_epi8(0x10))
    }
}

/// Lanes 0-7 the first of `values`, lanes 8-15 the second (zero without `pair`).
///
/// # Safety
/// `values` points at one f32, or two with `pair`.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn two_lanes(values: *const f32, pair: bool) -> __m512 {
    // SAFETY: the caller's.
    unsafe {
        let both = if pair {
            _mm_castpd_ps(_mm_load_sd(values as *const f64))
        } else {
            _mm_load_ss(values)
        };
        spread(both)
    }
}

/// Lanes 0-7 element 0 of `two`, lanes 8-15 element 1.
#[inline]
#[target_feature(enable = "avx512f")]
fn spread(two: __m128) -> __m512 {
    let lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(two))
}
