//! The AVX2 (with FMA and F16C) Q8_0 dot product, and the block helpers the AVX-512 path shares.

use std::arch::x86_64::*;

use super::{BLOCK, BLOCK_BYTES};

/// `sum over blocks of (weight scale * activation scale) * (integer dot of the quants)`, a
/// block to a 256-bit register and four blocks a step into two accumulators.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `weights` holds `scales.len()` blocks and `quants` 32
/// quants for each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(weights: &[u8], quants: &[i8], scales: &[f32]) -> f32 {
    let blocks = scales.len();
    debug_assert!(weights.len() >= blocks * BLOCK_BYTES && quants.len() >= blocks * BLOCK);
    let w = weights.as_ptr();
    let a = quants.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut b = 0;
    // SAFETY (all blocks below): block b + 3, or b in the tail, is inside both slices.
    while b + 4 <= blocks {
        unsafe {
            let block = w.add(b * BLOCK_BYTES);
            let four = _mm256_castps128_ps256(four_scales(block, scales.as_ptr().add(b)));
            for i in 0..4 {
                let sums = integer_dots(
                    block_quants(block.add(i * BLOCK_BYTES)),
                    _mm256_loadu_si256(a.add((b + i) * BLOCK) as *const __m256i),
                );
                let scale = _mm256_permutevar8x32_ps(four, _mm256_set1_epi32(i as i32));
                acc[i % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[i % 2]);
            }
        }
        b += 4;
    }
    while b < blocks {
        unsafe {
            let block = w.add(b * BLOCK_BYTES);
            let scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi64_si128(scale_bits(block))))
                * *scales.get_unchecked(b);
            let sums = integer_dots(
                block_quants(block),
                _mm256_loadu_si256(a.add(b * BLOCK) as *const __m256i),
            );
            acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc[0]);
        }
        b += 1;
    }
    let sum = _mm256_add_ps(acc[0], acc[1]);
    let sum = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
    let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)))
}

/// Quantizes 32 values into `out` and returns their scale, as `avx512::quantize_block` does
/// (the same bits: both round half to even and saturate).
///
/// # Safety
/// The CPU has F16C; both slices hold 32 values.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn quantize_block(block: &[f32], out: &mut [i8]) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in out.iter_mut().zip(block) {
        *q = (v * inverse).round_ties_even() as i8;
    }
    round_through_f16(scale)
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
