//! The AVX2 (with FMA and F16C) dot products, a prompt's tokens in groups through each row, and
//! the block helpers the AVX-512 path shares.

use std::arch::x86_64::*;
use std::ops::Range;

use super::k_quants::{Layout, Q2K, Q3K, Q4K, Q5K, Q6K, SUB_BLOCKS};
use super::small::{self, Kind};
use super::{Activations, BLOCK, BLOCK_BYTES, Format, token_groups, write_row};

/// `sum over blocks of (weight scale * activation scale) * (integer dot of the quants)`, a
/// block to a 256-bit register and four blocks a step into two accumulators.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `weights` holds `scales.len()` blocks and `quants` 32
/// quants for each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(weights: &[u8], quants: &[i8], scales: &[f32]) -> f32 {
    // SAFETY: the caller's.
    let [sum] = unsafe { dot_tokens::<1>(weights, [quants], [scales]) };
    sum
}

/// [`dot`] of one weight row with `N` tokens' activations, each block unpacked once for all of
/// them; each token's steps are [`dot`]'s, so its sum has the same bits.
///
/// # Safety
/// As [`dot`], for every token.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tokens<const N: usize>(
    weights: &[u8],
    quants: [&[i8]; N],
    scales: [&[f32]; N],
) -> [f32; N] {
    let blocks = scales[0].len();
    debug_assert!(weights.len() >= blocks * BLOCK_BYTES);
    debug_assert!((0..N).all(|j| quants[j].len() >= blocks * BLOCK && scales[j].len() >= blocks));
    let w = weights.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let mut b = 0;
    // SAFETY (all blocks below): block b + 3, or b in the tail, is inside every slice.
    while b + 4 <= blocks {
        unsafe {
            let block = w.add(b * BLOCK_BYTES);
            // Loops, not closures, here: a closure does not inherit the target features.
            let mut unpacked = [_mm256_setzero_si256(); 4];
            for (i, unpacked) in unpacked.iter_mut().enumerate() {
                *unpacked = block_quants(block.add(i * BLOCK_BYTES));
            }
            for j in 0..N {
                let four = _mm256_castps128_ps256(four_scales(block, scales[j].as_ptr().add(b)));
                let a = quants[j].as_ptr();
                for (i, &weight) in unpacked.iter().enumerate() {
                    let sums = integer_dots(
                        weight,
                        _mm256_loadu_si256(a.add((b + i) * BLOCK) as *const __m256i),
                    );
                    let scale = _mm256_permutevar8x32_ps(four, _mm256_set1_epi32(i as i32));
                    acc[j][i % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[j][i % 2]);
                }
            }
        }
        b += 4;
    }
    while b < blocks {
        unsafe {
            let block = w.add(b * BLOCK_BYTES);
            let weight = block_quants(block);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi64_si128(scale_bits(block))));
            for j in 0..N {
                let scale = d * *scales[j].get_unchecked(b);
                let sums = integer_dots(
                    weight,
                    _mm256_loadu_si256(quants[j].as_ptr().add(b * BLOCK) as *const __m256i),
                );
                acc[j][0] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc[j][0]);
            }
        }
        b += 1;
    }
    let mut out = [0f32; N];
    for (out, [even, odd]) in out.iter_mut().zip(acc) {
        *out = horizontal_sum(_mm256_add_ps(even, odd));
    }
    out
}

/// `sum over blocks of d (activation scale) (integer dot of the quants less the zero point) +
/// m (activation block sum)` for a 4- or 5-bit block type or MXFP4 (see `small`), a block to a
/// 256-bit register.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `weights` holds `scales.len()` blocks, `quants` 32 quants
/// and `sums` one sum for each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_small<S: Kind>(
    weights: &[u8],
    quants: &[i8],
    scales: &[f32],
    sums: &[f32],
) -> f32 {
    // SAFETY: the caller's.
    let [sum] = unsafe { dot_small_tokens::<S, 1>(weights, [quants], [scales], [sums]) };
    sum
}

/// [`dot_small`] of one weight row with `N` tokens' activations, each block unpacked once for
/// all of them; each token's steps are [`dot_small`]'s, so its sum has the same bits.
///
/// # Safety
/// As [`dot_small`], for every token.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_small_tokens<S: Kind, const N: usize>(
    weights: &[u8],
    quants: [&[i8]; N],
    scales: [&[f32]; N],
    sums: [&[f32]; N],
) -> [f32; N] {
    let blocks = scales[0].len();
    let bytes = S::BYTES;
    debug_assert!(weights.len() >= blocks * bytes);
    debug_assert!((0..N).all(|j| quants[j].len() >= blocks * BLOCK && sums[j].len() >= blocks));
    let mut acc = [_mm256_setzero_ps(); N];
    let mut offsets = [0f32; N];
    for b in 0..blocks {
        // SAFETY: block b is inside every slice.
        unsafe {
            let block = weights.as_ptr().add(b * bytes);
            let (d, m) = small_scales::<S>(block);
            let weight = small_quants::<S>(block);
            for j in 0..N {
                let a = _mm256_loadu_si256(quants[j].as_ptr().add(b * BLOCK) as *const __m256i);
                let mut lanes = unsigned_dots(weight, a);
                if !S::MIN {
                    let zero = _mm256_set1_epi8(S::ZERO);
                    lanes = _mm256_sub_epi32(lanes, unsigned_dots(zero, a));
                }
                let scale = _mm256_set1_ps(d * *scales[j].get_unchecked(b));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, acc[j]);
                if S::MIN {
                    offsets[j] += m * *sums[j].get_unchecked(b);
                }
            }
        }
    }
    let mut out = [0f32; N];
    for ((out, acc), offsets) in out.iter_mut().zip(acc).zip(offsets) {
        *out = horizontal_sum(acc) + offsets;
    }
    out
}

/// `sum over super-blocks of (the activations' scale) (d (the integer dot of the quants, each
/// 16-value group's times its integer scale) - d or dmin (the integer offsets times the
/// activations' sums of 16))` for a K-quant type with Q8_K activations: a super-block's sums
/// are exact in integers, as llama.cpp computes them, and converted once. (Summed in floats a
/// group at a time, a 12-token prompt of the mixtral fixture drifted 1e-6 from llama.cpp after
/// one layer, enough to round one activation of the next to another quant: 0.1 apart in the
/// logits.) A sub-block to a 256-bit register, its 16-bit pairs of products in lanes 0-7 for
/// its first 16 values and 8-15 for the rest.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `weights` holds `scales.len() / 8` super-blocks, `quants`
/// 32 quants and `scales` one scale (the super-block's) for each activation block, and `sums`
/// the integer sum of each 16 quants.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_k<K: Layout>(
    weights: &[u8],
    quants: &[i8],
    scales: &[f32],
    sums: &[i16],
) -> f32 {
    // SAFETY: the caller's.
    let [sum] = unsafe { dot_k_tokens::<K, 1>(weights, [quants], [scales], [sums]) };
    sum
}

/// [`dot_k`] of one weight row with `N` tokens' activations, each super-block's scales and
/// sub-blocks unpacked once for all of them; each token's steps are [`dot_k`]'s, so its sum has
/// the same bits.
///
/// # Safety
/// As [`dot_k`], for every token.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k_tokens<K: Layout, const N: usize>(
    weights: &[u8],
    quants: [&[i8]; N],
    scales: [&[f32]; N],
    sums: [&[i16]; N],
) -> [f32; N] {
    let supers = scales[0].len() / SUB_BLOCKS;
    debug_assert!(weights.len() >= supers * K::BYTES);
    debug_assert!((0..N).all(|j| quants[j].len() >= supers * 256 && sums[j].len() >= 16 * supers));
    let mut acc = [_mm256_setzero_ps(); N];
    for s in 0..supers {
        // SAFETY: super-block s and its activation blocks are inside every slice.
        unsafe {
            let block = weights.as_ptr().add(s * K::BYTES);
            let weight = K::scale_lanes(block);
            let mut group_scales = [_mm256_setzero_si256(); SUB_BLOCKS];
            for (sub, lanes) in group_scales.iter_mut().enumerate() {
                *lanes = sub_block_scales(weight.scales, sub);
            }
            let mut dots = [_mm256_setzero_si256(); N];
            for (sub, &group_scales) in group_scales.iter().enumerate() {
                let w = K::quants(block, sub);
                let at = (s * SUB_BLOCKS + sub) * BLOCK;
                for (dots, quants) in dots.iter_mut().zip(quants) {
                    let a = _mm256_loadu_si256(quants.as_ptr().add(at) as *const __m256i);
                    // Pairs of unsigned quants (at most 63) by activations (at least -127)
                    // stay within i16.
                    let pairs = _mm256_maddubs_epi16(w, a);
                    *dots = _mm256_add_epi32(*dots, _mm256_madd_epi16(pairs, group_scales));
                }
            }
            for j in 0..N {
                let sixteens = _mm256_loadu_si256(sums[j].as_ptr().add(16 * s) as *const __m256i);
                let offsets = _mm256_madd_epi16(weight.offsets, sixteens);
                let token = *scales[j].get_unchecked(s * SUB_BLOCKS);
                let by_d = _mm256_set1_ps(weight.d * token);
                if K::ZERO_POINT {
                    let exact = _mm256_sub_epi32(dots[j], offsets);
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), by_d, acc[j]);
                } else {
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[j]), by_d, acc[j]);
                    let by_dmin = _mm256_set1_ps(weight.dmin * token);
                    acc[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(offsets), by_dmin, acc[j]);
                }
            }
        }
    }
    let mut out = [0f32; N];
    for (out, acc) in out.iter_mut().zip(acc) {
        *out = horizontal_sum(acc);
    }
    out
}

/// Sub-block `sub`'s two group scales (bytes `2 sub` and `2 sub + 1` of `scales`) in 16-bit
/// lanes 0-7 and 8-15, where `maddubs` leaves the pairs of products of its two groups.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn sub_block_scales(scales: __m128i, sub: usize) -> __m256i {
    let (first, second) = (2 * sub as i64, 2 * sub as i64 + 1);
    let spread = _mm_set_epi64x(
        second * 0x0101_0101_0101_0101,
        first * 0x0101_0101_0101_0101,
    );
    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, spread))
}

/// Rows `rows` of `weights` (in `format`) with every token of `x`, into `out[t * out_rows + r]`:
/// tokens in groups of eight (those left over in fours, twos and ones) through each row, so
/// that a row's blocks are unpacked once per group. A token's sum has the same bits in a group
/// of any size, a decode step's token included.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `x` is in the form `format` meets, the rows inside
/// `weights`; `out` has room for the elements and nothing else writes them meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn product(
    format: Format,
    weights: &[u8],
    rows: Range<usize>,
    x: &Activations,
    out: *mut f32,
    out_rows: usize,
) {
    for (t, count) in token_groups(0..x.len()) {
        // SAFETY: the caller's.
        unsafe {
            match count {
                8 => group::<8>(format, weights, rows.clone(), x, t, out, out_rows),
                4 => group::<4>(format, weights, rows.clone(), x, t, out, out_rows),
                2 => group::<2>(format, weights, rows.clone(), x, t, out, out_rows),
                _ => group::<1>(format, weights, rows.clone(), x, t, out, out_rows),
            }
        }
    }
}

/// [`product`]'s rows with tokens `first..first + N`.
///
/// # Safety
/// As [`product`]; the tokens are rows of `x`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const N: usize>(
    format: Format,
    weights: &[u8],
    rows: Range<usize>,
    x: &Activations,
    first: usize,
    out: *mut f32,
    out_rows: usize,
) {
    let row_bytes = format.row_bytes(x.cols);
    let tokens: [_; N] = std::array::from_fn(|j| x.token(first + j));
    let (quants, scales) = (tokens.map(|t| t.quants), tokens.map(|t| t.scales));
    let (sums, integer_sums) = (tokens.map(|t| t.sums), tokens.map(|t| t.integer_sums));
    for r in rows {
        let row = &weights[r * row_bytes..(r + 1) * row_bytes];
        // SAFETY: the caller's; every slice holds the row's blocks.
        let elements = unsafe {
            match format {
                Format::Q8_0 => dot_tokens::<N>(row, quants, scales),
                Format::Q4_0 => dot_small_tokens::<small::Q4_0, N>(row, quants, scales, sums),
                Format::Q4_1 => dot_small_tokens::<small::Q4_1, N>(row, quants, scales, sums),
                Format::Q5_0 => dot_small_tokens::<small::Q5_0, N>(row, quants, scales, sums),
                Format::Q5_1 => dot_small_tokens::<small::Q5_1, N>(row, quants, scales, sums),
                Format::Mxfp4 => dot_small_tokens::<small::Mxfp4, N>(row, quants, scales, sums),
                Format::Q2K => dot_k_tokens::<Q2K, N>(row, quants, scales, integer_sums),
                Format::Q3K => dot_k_tokens::<Q3K, N>(row, quants, scales, integer_sums),
                Format::Q4K => dot_k_tokens::<Q4K, N>(row, quants, scales, integer_sums),
                Format::Q5K => dot_k_tokens::<Q5K, N>(row, quants, scales, integer_sums),
                Format::Q6K => dot_k_tokens::<Q6K, N>(row, quants, scales, integer_sums),
            }
        };
        // SAFETY: the caller's.
        unsafe { write_row(out, out_rows, r, first, elements) };
    }
}

/// The scale `d` and offset `m` of a 4- or 5-bit or MXFP4 block (`m` zero when it stores none).
///
/// # Safety
/// `block` points at a whole block.
#[inline]
#[target_feature(enable = "f16c")]
pub(super) unsafe fn small_scales<S: Kind>(block: *const u8) -> (f32, f32) {
    // SAFETY: the caller's.
    unsafe {
        if S::E2M1 {
            return (small::e8m0_half(*block), 0.0);
        }
        let d = half(block);
        let m = if S::MIN {
            half(block.add(small::min_at()))
        } else {
            0.0
        };
        (d, m)
    }
}

/// The f16 at `at`, as f32.
///
/// # Safety
/// `at` points at two readable bytes.
#[inline]
#[target_feature(enable = "f16c")]
pub(super) unsafe fn half(at: *const u8) -> f32 {
    // SAFETY: the caller's.
    let bits = unsafe { (at as *const u16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The 32 unsigned quants (0-15, or 0-31 with the fifth bits, or MXFP4's lifted values 0-24) of
/// a 4- or 5-bit or MXFP4 block, in value order.
///
/// # Safety
/// `block` points at a whole block.
#[inline]
#[target_feature(enable = "avx2")]
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
        _mm256_or_si256(low, fifth_bits(high))
    }
}

/// Each of 32 e2m1 codes (0-15, one to a byte) as its value doubled plus 12: one byte shuffle.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn e2m1_lifted(codes: __m256i) -> __m256i {
    // SAFETY: the table is 16 bytes.
    let table = unsafe { _mm_loadu_si128(small::E2M1_LIFTED.as_ptr() as *const __m128i) };
    _mm256_shuffle_epi8(_mm256_set_m128i(table, table), codes)
}

/// The 16 bytes at `packed` as 32 values: their low nibbles, then their high nibbles.
///
/// # Safety
/// `packed` points at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn nibbles(packed: *const u8) -> __m256i {
    // SAFETY: the caller's.
    let packed = unsafe { _mm_loadu_si128(packed as *const __m128i) };
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
        _mm256_set1_epi8(0x0f),
    )
}

/// 0x10 in byte i where bit i of `bits` is set, else 0: each byte takes its bit's byte of
/// `bits`, every other bit of it is set, and only a byte with its own bit set too is all ones.
#[inline]
#[target_feature(enable = "avx2")]
fn fifth_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Per-lane sums of four products of unsigned weight quants (at most 63) and signed activation
/// quants (at least -127): pairs of products stay within i16.
#[inline]
#[target_feature(enable = "avx2")]
fn unsigned_dots(weights: __m256i, activations: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(weights, activations),
        _mm256_set1_epi16(1),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn horizontal_sum(v: __m256) -> f32 {
    let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)))
}

/// Quantizes 32 values into `out` and returns their scale, as `avx512::quantize_block` does
/// (the same bits: both round half to even and saturate; the scale is not yet rounded).
///
/// # Safety
/// The CPU has F16C; both slices hold 32 values.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn quantize_block(block: &[f32], out: &mut [i8]) -> f32 {
    super::quantize_block_in_order(block, out)
}

/// `out[i] = round(values[i] * inverse)` (half to even, at most 127): Q8_K's quants, in a loop
/// the compiler turns into AVX2 instead of a rounding call per value.
///
/// # Safety
/// The CPU has AVX2; both slices are the same length.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scale_and_round(values: &[f32], inverse: f32, out: &mut [i8]) {
    for (q, &v) in out.iter_mut().zip(values) {
        *q = ((inverse * v).round_ties_even() as i32).min(127) as i8;
    }
}

/// The largest magnitude among `values` (0 for none; NaNs are passed over).
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn largest_magnitude(values: &[f32]) -> f32 {
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut largest = _mm256_setzero_ps();
    let mut eights = values.chunks_exact(8);
    for eight in &mut eights {
        // SAFETY: eight values.
        let v = unsafe { _mm256_loadu_ps(eight.as_ptr()) };
        // `maxps` keeps its second operand where the first is NaN.
        largest = _mm256_max_ps(_mm256_and_ps(v, magnitude), largest);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: eight lanes.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), largest) };
    let rest = eights.remainder().iter().map(|v| v.abs());
    lanes.into_iter().chain(rest).fold(0f32, f32::max)
}

#[target_feature(enable = "f16c")]
pub(super) fn round_through_f16(value: f32) -> f32 {
    let half = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(value));
    _mm_cvtss_f32(_mm_cvtph_ps(half))
}

/// The four blocks' scales from `block` on, each times its activation block's scale from
/// `activation` on.
///
/// # Safety
/// `block` points at four whole blocks and `activation` at four scales.
#[inline]
#[target_feature(enable = "f16c")]
pub(super) unsafe fn four_scales(block: *const u8, activation: *const f32) -> __m128 {
    // SAFETY: the caller's.
    unsafe {
        let bits = (0..4).fold(0i64, |bits, i| {
            bits | (scale_bits(block.add(i * BLOCK_BYTES)) << (16 * i))
        });
        _mm_mul_ps(
            _mm_cvtph_ps(_mm_cvtsi64_si128(bits)),
            _mm_loadu_ps(activation),
        )
    }
}

/// The f16 scale that opens the block at `block`.
///
/// # Safety
/// `block` points at a whole block.
#[inline]
pub(super) unsafe fn scale_bits(block: *const u8) -> i64 {
    // SAFETY: the caller's.
    unsafe { (block as *const u16).read_unaligned() as i64 }
}

/// The 32 quants of the block at `block`.
///
/// # Safety
/// `block` points at a whole block.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block_quants(block: *const u8) -> __m256i {
    // SAFETY: the caller's.
    unsafe { _mm256_loadu_si256(block.add(2) as *const __m256i) }
}

/// Per-lane sums of four products of signed bytes: maddubs multiplies unsigned by signed
/// bytes, so each weight's sign moves onto its activation. Pairs of products stay within
/// i16 (at most 2 x 128 x 127).
#[inline]
#[target_feature(enable = "avx2")]
fn integer_dots(weights: __m256i, activations: __m256i) -> __m256i {
    let magnitude = _mm256_sign_epi8(weights, weights);
    let signed = _mm256_sign_epi8(activations, weights);
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(magnitude, signed),
        _mm256_set1_epi16(1),
    )
}
