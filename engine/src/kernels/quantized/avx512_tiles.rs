//! AVX-512 prompt products over tiles of 16 weight rows, one row to a register lane.
//!
//! A row at a time, every `vpdpbusd` of a block's four-value lanes is followed by a conversion
//! and a fused add that bring in the block's scale. With the tile's weights transposed so that
//! a register holds four quants of each of its 16 rows, a token's four quants are broadcast to
//! all of them, and the instructions that bring in scales are shared by the 16 rows.
//!
//! Tiles take the prompt's groups of eight tokens; a decode step's token and those left over
//! take the row-at-a-time path. Per row and token the steps are the same in any tile and any
//! group, so an element does not depend on the other tokens of the batch or on the threads.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::half;
use super::avx512::small_quants;
use super::k_quants::{self, Layout, SUB_BLOCKS};
use super::small::{self, Kind};
use super::{Activations, BLOCK};

/// Rows in a tile, one to each lane of a register of 32-bit lanes.
pub(super) const TILE: usize = 16;

/// Rows `first..first + 16` (of `row_bytes` bytes each) of a 32-value block type with the
/// tokens `tokens` of `x` (in Q8_0), stored for the rows in `keep`. Each block's quants are
/// unpacked (Q8_0's sign-flipped: a weight goes in as `w + 128`) and transposed so that one
/// register holds four quants of each of the 16 rows: a token's block takes eight `vpdpbusd`
/// with its quants broadcast four at a time, the zero point times the activations' sum starting
/// the accumulator negated, then one conversion, one scale product and one fused add (and for a
/// type with an offset, one more for the offsets times the block sums) for all 16 rows.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; the 16 rows are inside `weights`, the
/// tokens rows of `x` (in Q8_0); `out` has room for every element and nothing else writes
/// `keep`'s.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn block_tile<S: Kind>(
    weights: &[u8],
    first: usize,
    row_bytes: usize,
    x: &Activations,
    tokens: Range<usize>,
    keep: &Range<usize>,
    out: *mut f32,
    out_rows: usize,
) {
    let blocks = x.cols / BLOCK;
    let mut acc = vec![_mm512_setzero_ps(); tokens.len()];
    // Row r's offset in the unpacked block, for the gathers.
    let offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(BLOCK as i32),
    );
    // What one quant stands for zero: Q8_0's sign flip, or the type's zero point.
    let zero = if S::Q8 {
        128
    } else if S::MIN {
        0
    } else {
        S::ZERO as i32
    };
    let mut unpacked = [[0u8; BLOCK]; TILE];
    let (mut d, mut min) = ([0f32; TILE], [0f32; TILE]);
    for b in 0..blocks {
        // SAFETY: block b of the tile's 16 rows is inside `weights`; the tokens' blocks inside
        // `x`.
        unsafe {
            for (r, unpacked) in unpacked.iter_mut().enumerate() {
                let block = weights.as_ptr().add((first + r) * row_bytes + b * S::BYTES);
                let quants = if S::Q8 {
                    let signed = _mm256_loadu_si256(block.add(2) as *const __m256i);
                    _mm256_xor_si256(signed, _mm256_set1_epi8(-128))
                } else {
                    small_quants::<S>(block)
                };
                _mm256_storeu_si256(unpacked.as_mut_ptr() as *mut __m256i, quants);
                d[r] = if S::E2M1 {
                    small::e8m0_half(*block)
                } else {
                    half(block)
                };
                if S::MIN {
                    min[r] = half(block.add(small::min_at()));
                }
            }
            let base = unpacked.as_ptr() as *const u8;
            // Loops, not closures, in this file: a closure does not inherit the function's
            // target features, and where it was not inlined each intrinsic became a call (a
            // 512-token SmolLM2 prompt took 0.51 s instead of 0.30).
            let mut w = [_mm512_setzero_si512(); BLOCK / 4];
            for (k, w) in w.iter_mut().enumerate() {
                *w = _mm512_i32gather_epi32::<1>(offsets, base.add(4 * k) as *const i32);
            }
            let (d, min) = (_mm512_loadu_ps(d.as_ptr()), _mm512_loadu_ps(min.as_ptr()));
            for (t, acc) in tokens.clone().zip(acc.iter_mut()) {
                let at = t * blocks + b;
                let quads = x.quants.as_ptr().add(t * x.cols + b * BLOCK) as *const i32;
                let sum = *x.integer_sums.get_unchecked(at) as i32;
                // Integer sums are exact in any order: two chains, so that the second does
                // not wait on the first.
                let mut lanes = [_mm512_set1_epi32(-zero * sum), _mm512_setzero_si512()];
                for (chain, (lanes, w)) in lanes.iter_mut().zip(w.chunks_exact(4)).enumerate() {
                    for (k, &w) in w.iter().enumerate() {
                        let a = _mm512_set1_epi32(quads.add(4 * chain + k).read_unaligned());
                        *lanes = _mm512_dpbusd_epi32(*lanes, w, a);
                    }
                }
                let lanes = _mm512_add_epi32(lanes[0], lanes[1]);
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scales.get_unchecked(at)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, *acc);
                if S::MIN {
                    *acc = _mm512_fmadd_ps(min, _mm512_set1_ps(*x.sums.get_unchecked(at)), *acc);
                }
            }
        }
    }
    // SAFETY: the caller's.
    unsafe { store(&acc, tokens, first, keep, out, out_rows) };
}

/// K-quant rows `first..first + 16` (of `row_bytes` bytes each) with the tokens `tokens` of `x`
/// (in Q8_K), stored for the rows in `keep`.
///
/// Per super-block the sum is llama.cpp's, exact in integers: each 16-value group's four
/// `vpdpbusd` of unsigned quants by the token's quants, times the group's integer scale, added
/// over the 16 groups; the offsets (zero points or minima) times the token's group sums go in
/// by `vpdpwssd`. Then one conversion and one or two fused adds bring in `d` (and `dmin`) times
/// the token's scale, for all 16 rows.
///
/// # Safety
/// As [`block_tile`], with `x` in Q8_K.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn k_tile<K: Layout>(
    weights: &[u8],
    first: usize,
    row_bytes: usize,
    x: &Activations,
    tokens: Range<usize>,
    keep: &Range<usize>,
    out: *mut f32,
    out_rows: usize,
) {
    let supers = x.cols / k_quants::VALUES;
    let blocks = x.cols / BLOCK;
    let mut acc = vec![_mm512_setzero_ps(); tokens.len()];
    // Per super-block: quads[4 g + k] holds quants 16 g + 4 k..16 g + 4 k + 4 of each row;
    // scales[g] and the 16-bit pairs offsets[g / 2] each row's integers for group g.
    let mut quads = [_mm512_setzero_si512(); 64];
    let mut scales = [[0i32; TILE]; 16];
    let mut offsets = [[0u32; TILE]; 8];
    let (mut d, mut dmin) = ([0f32; TILE], [0f32; TILE]);
    for s in 0..supers {
        // SAFETY: super-block s of the tile's 16 rows is inside `weights`; the tokens' values
        // and their sums inside `x`.
        unsafe {
            let block = |r: usize| weights.as_ptr().add((first + r) * row_bytes + s * K::BYTES);
            for p in 0..SUB_BLOCKS / 2 {
                let mut rows = [_mm512_setzero_si512(); TILE];
                for (r, row) in rows.iter_mut().enumerate() {
                    *row = K::pair_quants(block(r), p);
                }
                quads[16 * p..16 * p + 16].copy_from_slice(&transpose(rows));
            }
            for r in 0..TILE {
                let row = K::integer_scales(block(r));
                for (group, &scale) in scales.iter_mut().zip(&row.scales) {
                    group[r] = scale;
                }
                for (j, pair) in row.offsets.chunks_exact(2).enumerate() {
                    offsets[j][r] = pair[0] as u16 as u32 | (pair[1] as u16 as u32) << 16;
                }
                (d[r], dmin[r]) = (row.d, row.dmin);
            }
            let mut scale_lanes = [_mm512_setzero_si512(); 16];
            for (lanes, group) in scale_lanes.iter_mut().zip(&scales) {
                *lanes = _mm512_loadu_si512(group.as_ptr() as *const __m512i);
            }
            let mut offset_lanes = [_mm512_setzero_si512(); 8];
            for (lanes, pair) in offset_lanes.iter_mut().zip(&offsets) {
                *lanes = _mm512_loadu_si512(pair.as_ptr() as *const __m512i);
            }
            let (scales, offsets) = (scale_lanes, offset_lanes);
            let (d, dmin) = (_mm512_loadu_ps(d.as_ptr()), _mm512_loadu_ps(dmin.as_ptr()));
            for (t, acc) in tokens.clone().zip(acc.iter_mut()) {
                let a = x.quants.as_ptr().add(t * x.cols + s * k_quants::VALUES) as *const i32;
                // Integer sums are exact in any order: two groups at a time, each in two
                // chains of two, so that the additions do not wait on each other.
                let mut sum = [_mm512_setzero_si512(); 2];
                for (g, (scale, quads)) in scales
                    .chunks_exact(2)
                    .zip(quads.chunks_exact(8))
                    .enumerate()
                {
                    let mut dots = [_mm512_setzero_si512(); 4];
                    for (chain, dots) in dots.iter_mut().enumerate() {
                        let k = 2 * chain;
                        let first = _mm512_set1_epi32(a.add(8 * g + k).read_unaligned());
                        let second = _mm512_set1_epi32(a.add(8 * g + k + 1).read_unaligned());
                        *dots = _mm512_dpbusd_epi32(*dots, quads[k], first);
                        *dots = _mm512_dpbusd_epi32(*dots, quads[k + 1], second);
                    }
                    let halves = [
                        _mm512_add_epi32(dots[0], dots[1]),
                        _mm512_add_epi32(dots[2], dots[3]),
                    ];
                    if K::SCALE_PER_32 {
                        // Both groups take the sub-block's scale: one product for the two.
                        let dots = _mm512_add_epi32(halves[0], halves[1]);
                        sum[g % 2] =
                            _mm512_add_epi32(sum[g % 2], _mm512_mullo_epi32(dots, scale[0]));
                    } else {
                        for ((sum, dots), &scale) in sum.iter_mut().zip(halves).zip(scale) {
                            *sum = _mm512_add_epi32(*sum, _mm512_mullo_epi32(dots, scale));
                        }
                    }
                }
                let sum = _mm512_add_epi32(sum[0], sum[1]);
                // Two sums of 16 to a 32-bit word, as the offsets are paired.
                let pairs = x
                    .integer_sums
                    .as_ptr()
                    .add(2 * (t * blocks + s * SUB_BLOCKS));
                let pairs = pairs as *const i32;
                let mut offset = _mm512_setzero_si512();
                for (j, &pair) in offsets.iter().enumerate() {
                    let two = _mm512_set1_epi32(pairs.add(j).read_unaligned());
                    offset = _mm512_dpwssd_epi32(offset, pair, two);
                }
                let scale = _mm512_set1_ps(*x.scales.get_unchecked(t * blocks + s * SUB_BLOCKS));
                if K::ZERO_POINT {
                    let exact = _mm512_sub_epi32(sum, offset);
                    *acc =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(d, scale), *acc);
                } else {
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, scale), *acc);
                    let by = _mm512_mul_ps(dmin, scale);
                    *acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offset), by, *acc);
                }
            }
        }
    }
    // SAFETY: the caller's.
    unsafe { store(&acc, tokens, first, keep, out, out_rows) };
}

/// Each token's register of the tile's 16 rows into `out[t * out_rows + r]`, for the rows `r`
/// in `keep`.
///
/// # Safety
/// The tile's rows are rows of `out`, which has room for the tokens; nothing else writes
/// `keep`'s elements meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn store(
    acc: &[__m512],
    tokens: Range<usize>,
    first: usize,
    keep: &Range<usize>,
    out: *mut f32,
    out_rows: usize,
) {
    let kept = (0..TILE)
        .filter(|r| keep.contains(&(first + r)))
        .fold(0u16, |mask, r| mask | 1 << r);
    for (t, &acc) in tokens.zip(acc) {
        // SAFETY: the caller's.
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_rows + first), kept, acc) };
    }
}

/// The 16x16 matrix of 32-bit lanes transposed: lane `r` of output `i` is lane `i` of input
/// `r`. Pairs interleave their 32-bit then 64-bit lanes, so that each 128-bit lane holds one
/// column of four inputs; two rounds of 128-bit shuffles then gather the four quarters.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(rows: [__m512i; 16]) -> [__m512i; 16] {
    let mut pairs = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        pairs[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        pairs[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    // columns[4 q + c]: lanes 4 L + c of inputs 4 q..4 q + 4, in 128-bit lane L.
    let mut columns = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let (low, high) = (pairs[4 * q], pairs[4 * q + 1]);
        let (low2, high2) = (pairs[4 * q + 2], pairs[4 * q + 3]);
        columns[4 * q] = _mm512_unpacklo_epi64(low, low2);
        columns[4 * q + 1] = _mm512_unpackhi_epi64(low, low2);
        columns[4 * q + 2] = _mm512_unpacklo_epi64(high, high2);
        columns[4 * q + 3] = _mm512_unpackhi_epi64(high, high2);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        // Quarters 0 and 2, then 1 and 3, of inputs 0-7 and of inputs 8-15.
        let even = _mm512_shuffle_i32x4::<0x88>(columns[c], columns[4 + c]);
        let odd = _mm512_shuffle_i32x4::<0xdd>(columns[c], columns[4 + c]);
        let even2 = _mm512_shuffle_i32x4::<0x88>(columns[8 + c], columns[12 + c]);
        let odd2 = _mm512_shuffle_i32x4::<0xdd>(columns[8 + c], columns[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(even, even2);
        out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(even, even2);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(odd, odd2);
        out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(odd, odd2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_sixteen_by_sixteen() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let rows: [[u32; 16]; 16] =
            std::array::from_fn(|r| std::array::from_fn(|i| (r * 16 + i) as u32));
        // SAFETY: AVX-512 F was found; each array holds 16 lanes.
        let out =
            unsafe { transpose(rows.map(|r| _mm512_loadu_si512(r.as_ptr() as *const __m512i))) };
        for (i, column) in out.into_iter().enumerate() {
            let mut lanes = [0u32; 16];
            // SAFETY: as above.
            unsafe { _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, column) };
            assert_eq!(
                lanes,
                std::array::from_fn(|r| (r * 16 + i) as u32),
                "column {i}"
            );
        }
    }
}
