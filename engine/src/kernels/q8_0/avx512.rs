//! The AVX-512 VNNI Q8_0 dot product: two blocks through one `vpdpbusd`.

use std::arch::x86_64::*;

use super::avx2::{block_quants, four_scales, round_through_f16, scale_bits};
use super::{BLOCK, BLOCK_BYTES};

/// Quantizes 32 values into `out` and returns their scale, `max|x| / 127` rounded through
/// f16; quants round half to even, as llama.cpp's vector code rounds them.
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
        round_through_f16(scale)
    }
}

/// `sum over blocks of (weight scale * activation scale) * (integer dot of the quants)`, two
/// blocks to a 512-bit register and four blocks a step into two accumulators.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI and F16C; `weights` holds `scales.len()` blocks and `quants`
/// 32 quants for each.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
pub(super) unsafe fn dot(weights: &[u8], quants: &[i8], scales: &[f32]) -> f32 {
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

/// Per-lane sums of four products of signed bytes. vpdpbusd multiplies unsigned by signed
/// bytes, so each weight's sign moves onto its activation and the weight gives its magnitude.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn integer_dots(weights: __m512i, activations: __m512i) -> __m512i {
    let negative = _mm512_movepi8_mask(weights);
    let signed = _mm512_mask_sub_epi8(activations, negative, _mm512_setzero_si512(), activations);
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(weights), signed)
}
