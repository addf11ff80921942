//! GGUF's K-quant layouts (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): super-blocks of 256 weights, each with
//! its own f16 scales and, per sub-block, small integer scales (and for Q2_K/Q4_K/Q5_K offsets).
//! The kernels see a super-block as eight 32-value sub-blocks, each met by one activation block:
//! a weight is `scale * q + offset` with `q` unsigned, both per 16 values (Q3_K's and Q6_K's zero
//! points are offsets of `-4 scale` and `-32 scale`).
//!
//! They meet activations in llama.cpp's Q8_K (one f32 scale per 256 values), spread over the
//! super-block's eight blocks of 32 so that the kernels read them as they read Q8_0 rows.

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::avx2::half;
#[cfg(target_arch = "aarch64")]
use super::neon::half;

/// Weights in a super-block.
pub const VALUES: usize = 256;

/// Sub-blocks of 32 in a super-block.
pub const SUB_BLOCKS: usize = VALUES / super::BLOCK;

/// One K-quant type's layout.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub trait Layout {
    /// Bytes of one super-block.
    const BYTES: usize;

    /// The super-block's [`IntegerScales`] in registers, unpacked with SIMD: a decode step
    /// unpacks every super-block of every row it reads. By default Q4_K's and Q5_K's (see
    /// [`six_bit_words`]).
    ///
    /// # Safety
    /// `block` points at a whole super-block; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale_lanes(block: *const u8) -> ScaleLanes {
        // SAFETY: the caller's.
        unsafe {
            let (scales, mins) = six_bit_words(block);
            // Each sub-block's scale and minimum cover both of its 16-value groups.
            let per_group = |per_sub_block: u64| {
                let bytes = _mm_cvtsi64_si128(per_sub_block as i64);
                _mm_unpacklo_epi8(bytes, bytes)
            };
            ScaleLanes {
                scales: per_group(scales),
                offsets: _mm256_cvtepu8_epi16(per_group(mins)),
                d: half(block),
                dmin: half(block.add(2)),
            }
        }
    }

    /// Whether [`IntegerScales::offsets`] are a zero point of the quants times their scales
    /// (Q3_K, Q6_K), to come off the integer sum in `d`'s units; otherwise they are minima (Q2_K,
    /// Q4_K, Q5_K), in `dmin`'s.
    const ZERO_POINT: bool = false;

    /// Whether each 32-value sub-block has one scale (Q4_K, Q5_K), so that both of its 16-value
    /// groups' integer dots may take it together; otherwise each 16 values has its own.
    const SCALE_PER_32: bool = true;

    /// The super-block's scales and offsets per 16 values as the integers stored, with `d` and
    /// `dmin`: by default Q4_K's and Q5_K's (see [`six_bit_scales`]).
    ///
    /// # Safety
    /// `block` points at a whole super-block; an x86-64 CPU has F16C.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline]
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "f16c"))]
    unsafe fn integer_scales(block: *const u8) -> IntegerScales {
        // SAFETY: the caller's.
        let (scales, mins, d, dmin) = unsafe {
            let (scales, mins) = six_bit_scales(block);
            (scales, mins, half(block), half(block.add(2)))
        };
        // Each sub-block's scale and minimum cover both of its 16-value halves.
        IntegerScales {
            scales: std::array::from_fn(|i| scales[i / 2] as i32),
            offsets: std::array::from_fn(|i| mins[i / 2] as i16),
            d,
            dmin,
        }
    }

    /// The 32 unsigned quants of sub-block `s` (0-7), in value order.
    ///
    /// # Safety
    /// As [`Layout::scale_lanes`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn quants(block: *const u8, s: usize) -> __m256i;

    /// The same, values 0-15 and 16-31.
    ///
    /// # Safety
    /// `block` points at a whole super-block.
    #[cfg(target_arch = "aarch64")]
    unsafe fn quants(block: *const u8, s: usize) -> (uint8x16_t, uint8x16_t);

    /// Sub-blocks `2p` and `2p + 1`'s quants in one register, `2p`'s in the low half: two
    /// [`quants`](Layout::quants) unless the pair's bytes let one wide load serve both.
    ///
    /// # Safety
    /// As [`Layout::scale_lanes`]; the CPU has AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    unsafe fn pair_quants(block: *const u8, p: usize) -> __m512i {
        // SAFETY: the caller's.
        unsafe {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(Self::quants(block, 2 * p)),
                Self::quants(block, 2 * p + 1),
            )
        }
    }
}

/// `bytes` in the low 256 bits, `bytes` shifted right by `SHIFT` (in 16-bit lanes) in the high
/// ones: a pair of sub-blocks whose second takes the first's bytes' higher bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn upper_half_shifted<const SHIFT: u32>(bytes: __m512i) -> __m512i {
    _mm512_mask_blend_epi64(0xf0, bytes, _mm512_srli_epi16::<SHIFT>(bytes))
}

/// A super-block's integers per 16 values `16 i..16 i + 16`: a weight is
/// `d scales[i] q - d offsets[i]` ([`Layout::ZERO_POINT`]) or `d scales[i] q - dmin offsets[i]`
/// (no `dmin`: 0), so that a dot with Q8_K activations is exact in integers up to those two
/// products, as llama.cpp computes it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Clone, Copy)]
pub struct IntegerScales {
    pub scales: [i32; 16],
    pub offsets: [i16; 16],
    pub d: f32,
    pub dmin: f32,
}

/// [`IntegerScales`] in registers: byte `i` of `scales` is group `i`'s scale (signed), 16-bit
/// lane `i` of `offsets` its offset.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct ScaleLanes {
    pub scales: __m128i,
    pub offsets: __m256i,
    pub d: f32,
    pub dmin: f32,
}

/// `d`, `dmin`, 12 bytes of 6-bit scales and offsets, then 4-bit quants: sub-blocks `2k` and
/// `2k + 1` are the low and high nibbles of bytes `32k..32k + 32`. A weight is
/// `d sc q - dmin m`.
pub struct Q4K;

/// As Q4_K with 32 bytes of fifth bits after the scales: bit `s` of byte `l` is the fifth bit
/// of value `l` of sub-block `s`.
pub struct Q5K;

/// 128 bytes of low nibbles, 64 of two high bits each, 16 signed 8-bit scales (one per 16
/// values), then `d`. A weight is `d sc (q - 32)`. Each half of 128 values: sub-blocks 0 and 1
/// are the low nibbles of its bytes `0..32` and `32..64`, 2 and 3 their high nibbles; the high
/// bits of sub-block `k` are bits `2k, 2k + 1` of its 32 high-bit bytes.
pub struct Q6K;

/// 16 bytes of 4-bit scales (low nibble) and offsets (high nibble), one of each per 16 values;
/// 64 bytes of 2-bit quants; then `d` and `dmin`. A weight is `d sc q - dmin m`. Each half of
/// 128 values takes 32 quant bytes: sub-block `j` of the half is their bits `2j, 2j + 1`.
pub struct Q2K;

/// 32 bytes of third bits, 64 bytes of 2-bit quants laid out as Q2_K's, 12 bytes of 6-bit
/// scales (one per 16 values, stored plus 32), then `d`. A weight is `d (sc - 32) (q - 4)`, `q`
/// the two low bits with the third bit `s` of the third-bit byte `l` for value `l` of sub-block
/// `s`.
pub struct Q3K;

const Q2K_QUANTS_AT: usize = 16;
const Q2K_D_AT: usize = Q2K_QUANTS_AT + 64;
const Q3K_QUANTS_AT: usize = 32;
const Q3K_SCALES_AT: usize = Q3K_QUANTS_AT + 64;
const Q3K_D_AT: usize = Q3K_SCALES_AT + 12;
const Q4K_SCALES_AT: usize = 4;
const Q4K_QUANTS_AT: usize = Q4K_SCALES_AT + 12;
const Q5K_HIGH_AT: usize = Q4K_QUANTS_AT;
const Q5K_QUANTS_AT: usize = Q5K_HIGH_AT + 32;
const Q6K_HIGH_AT: usize = 128;
const Q6K_SCALES_AT: usize = Q6K_HIGH_AT + 64;
const Q6K_D_AT: usize = Q6K_SCALES_AT + 16;

impl Layout for Q2K {
    const BYTES: usize = Q2K_D_AT + 4;
    const SCALE_PER_32: bool = false;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale_lanes(block: *const u8) -> ScaleLanes {
        // SAFETY: the caller's: the 16 scale bytes open the super-block, `d` and `dmin` end it.
        unsafe {
            let bytes = _mm_loadu_si128(block as *const __m128i);
            let nibble = _mm_set1_epi8(0x0f);
            ScaleLanes {
                scales: _mm_and_si128(bytes, nibble),
                offsets: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble)),
                d: half(block.add(Q2K_D_AT)),
                dmin: half(block.add(Q2K_D_AT + 2)),
            }
        }
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline]
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "f16c"))]
    unsafe fn integer_scales(block: *const u8) -> IntegerScales {
        // SAFETY: the caller's: the 16 scale bytes open the super-block, `d` and `dmin` end it.
        let (packed, d, dmin) = unsafe {
            let packed: [u8; 16] = *(block as *const [u8; 16]);
            (
                packed,
                half(block.add(Q2K_D_AT)),
                half(block.add(Q2K_D_AT + 2)),
            )
        };
        IntegerScales {
            scales: packed.map(|b| (b & 0x0f) as i32),
            offsets: packed.map(|b| (b >> 4) as i16),
            d,
            dmin,
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn quants(block: *const u8, s: usize) -> __m256i {
        // SAFETY: the caller's.
        unsafe { two_bits(block.add(Q2K_QUANTS_AT + 32 * (s / 4)), s % 4) }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn quants(block: *const u8, s: usize) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: the caller's.
        unsafe { two_bits(block.add(Q2K_QUANTS_AT + 32 * (s / 4)), s % 4) }
    }
}

impl Layout for Q3K {
    const BYTES: usize = Q3K_D_AT + 2;
    const SCALE_PER_32: bool = false;
    const ZERO_POINT: bool = true;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline]
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "f16c"))]
    unsafe fn integer_scales(block: *const u8) -> IntegerScales {
        // SAFETY: the caller's.
        let (bytes, d) = unsafe { (q3k_scale_bytes(block), half(block.add(Q3K_D_AT))) };
        // Scales are stored plus 32; the quants' zero point is 4.
        let scales = bytes.map(|b| b as i32 - 32);
        IntegerScales {
            scales,
            offsets: scales.map(|s| (4 * s) as i16),
            d,
            dmin: 0.0,
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale_lanes(block: *const u8) -> ScaleLanes {
        // SAFETY: the caller's.
        unsafe {
            let bytes = _mm_loadu_si128(q3k_scale_bytes(block).as_ptr() as *const __m128i);
            // Scales are stored plus 32; the quants' zero point is 4.
            let scales = _mm_sub_epi8(bytes, _mm_set1_epi8(32));
            ScaleLanes {
                scales,
                offsets: _mm256_slli_epi16::<2>(_mm256_cvtepi8_epi16(scales)),
                d: half(block.add(Q3K_D_AT)),
                dmin: 0.0,
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn quants(block: *const u8, s: usize) -> __m256i {
        // SAFETY: the caller's.
        unsafe {
            let low = two_bits(block.add(Q3K_QUANTS_AT + 32 * (s / 4)), s % 4);
            let third = _mm256_loadu_si256(block as *const __m256i);
            let bit = _mm256_and_si256(
                _mm256_srl_epi16(third, _mm_cvtsi32_si128(s as i32)),
                _mm256_set1_epi8(1),
            );
            _mm256_or_si256(low, _mm256_slli_epi16::<2>(bit))
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn quants(block: *const u8, s: usize) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: the caller's.
        unsafe {
            let (low, high) = two_bits(block.add(Q3K_QUANTS_AT + 32 * (s / 4)), s % 4);
            let (bit, four) = (vdupq_n_u8(1 << s), vdupq_n_u8(4));
            let first = vandq_u8(vtstq_u8(vld1q_u8(block), bit), four);
            let second = vandq_u8(vtstq_u8(vld1q_u8(block.add(16)), bit), four);
            (vorrq_u8(low, first), vorrq_u8(high, second))
        }
    }
}

impl Layout for Q4K {
    const BYTES: usize = Q4K_QUANTS_AT + 128;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn quants(block: *const u8, s: usize) -> __m256i {
        // SAFETY: the caller's.
        unsafe { nibbles(block.add(Q4K_QUANTS_AT + 32 * (s / 2)), s % 2) }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn quants(block: *const u8, s: usize) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: the caller's.
        unsafe { nibbles(block.add(Q4K_QUANTS_AT + 32 * (s / 2)), s % 2) }
    }
}

impl Layout for Q5K {
    const BYTES: usize = Q5K_QUANTS_AT + 128;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn quants(block: *const u8, s: usize) -> __m256i {
        // SAFETY: the caller's.
        unsafe {
            let low = nibbles(block.add(Q5K_QUANTS_AT + 32 * (s / 2)), s % 2);
            let high = _mm256_loadu_si256(block.add(Q5K_HIGH_AT) as *const __m256i);
            let bit = _mm256_and_si256(
                _mm256_srl_epi16(high, _mm_cvtsi32_si128(s as i32)),
                _mm256_set1_epi8(1),
            );
            _mm256_or_si256(low, _mm256_slli_epi16::<4>(bit))
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn quants(block: *const u8, s: usize) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: the caller's.
        unsafe {
            let (low, high) = nibbles(block.add(Q5K_QUANTS_AT + 32 * (s / 2)), s % 2);
            let (bit, sixteen) = (vdupq_n_u8(1 << s), vdupq_n_u8(0x10));
            let first = vtstq_u8(vld1q_u8(block.add(Q5K_HIGH_AT)), bit);
            let second = vtstq_u8(vld1q_u8(block.add(Q5K_HIGH_AT + 16)), bit);
            (
                vorrq_u8(low, vandq_u8(first, sixteen)),
                vorrq_u8(high, vandq_u8(second, sixteen)),
            )
        }
    }
}

impl Layout for Q6K {
    const BYTES: usize = Q6K_D_AT + 2;
    const SCALE_PER_32: bool = false;
    const ZERO_POINT: bool = true;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline]
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "f16c"))]
    unsafe fn integer_scales(block: *const u8) -> IntegerScales {
        // SAFETY: the caller's: `d` and the 16 signed scales lie inside the super-block.
        let (bytes, d) = unsafe {
            let bytes: [u8; 16] = *(block.add(Q6K_SCALES_AT) as *const [u8; 16]);
            (bytes, half(block.add(Q6K_D_AT)))
        };
        // The quants are stored as `q + 32`.
        let scales = bytes.map(|b| b as i8 as i32);
        IntegerScales {
            scales,
            offsets: scales.map(|s| (32 * s) as i16),
            d,
            dmin: 0.0,
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale_lanes(block: *const u8) -> ScaleLanes {
        // SAFETY: the caller's: `d` and the 16 signed scales lie inside the super-block.
        unsafe {
            let scales = _mm_loadu_si128(block.add(Q6K_SCALES_AT) as *const __m128i);
            // The quants are stored as `q + 32`.
            ScaleLanes {
                scales,
                offsets: _mm256_slli_epi16::<5>(_mm256_cvtepi8_epi16(scales)),
                d: half(block.add(Q6K_D_AT)),
                dmin: 0.0,
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn quants(block: *const u8, s: usize) -> __m256i {
        let (half, k) = (s / 4, s % 4);
        // SAFETY: the caller's.
        unsafe {
            let low = nibbles(block.add(64 * half + 32 * (k % 2)), k / 2);
            let high = _mm256_loadu_si256(block.add(Q6K_HIGH_AT + 32 * half) as *const __m256i);
            let bits = _mm256_and_si256(
                _mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * k as i32)),
                _mm256_set1_epi8(3),
            );
            _mm256_or_si256(low, _mm256_slli_epi16::<4>(bits))
        }
    }

    /// The pair's low nibbles are 64 adjacent bytes, and both take their high bits from the
    /// same 32: two wide loads for both.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    unsafe fn pair_quants(block: *const u8, p: usize) -> __m512i {
        let (half, nibble) = (p / 2, p % 2);
        let shift = _mm_cvtsi32_si128(4 * nibble as i32);
        // SAFETY: the caller's.
        unsafe {
            let low = _mm512_loadu_si512(block.add(64 * half) as *const __m512i);
            let low = _mm512_and_si512(_mm512_srl_epi16(low, shift), _mm512_set1_epi8(0x0f));
            let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                block.add(Q6K_HIGH_AT + 32 * half) as *const __m256i,
            ));
            let bits = _mm512_and_si512(
                upper_half_shifted::<2>(_mm512_srl_epi16(high, shift)),
                _mm512_set1_epi8(3),
            );
            _mm512_or_si512(low, _mm512_slli_epi16::<4>(bits))
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn quants(block: *const u8, s: usize) -> (uint8x16_t, uint8x16_t) {
        let (half, k) = (s / 4, s % 4);
        // SAFETY: the caller's.
        unsafe {
            let (low, high) = nibbles(block.add(64 * half + 32 * (k % 2)), k / 2);
            let bits = block.add(Q6K_HIGH_AT + 32 * half);
            let (shift, three) = (vdupq_n_s8(-2 * k as i8), vdupq_n_u8(3));
            let first = vandq_u8(vshlq_u8(vld1q_u8(bits), shift), three);
            let second = vandq_u8(vshlq_u8(vld1q_u8(bits.add(16)), shift), three);
            (
                vorrq_u8(low, vshlq_n_u8::<4>(first)),
                vorrq_u8(high, vshlq_n_u8::<4>(second)),
            )
        }
    }
}

/// Bits `2 pair, 2 pair + 1` of the 32 bytes at `at`.
///
/// # Safety
/// `at` points at 32 readable bytes; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn two_bits(at: *const u8, pair: usize) -> __m256i {
    // SAFETY: the caller's.
    let bytes = unsafe { _mm256_loadu_si256(at as *const __m256i) };
    let shifted = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(2 * pair as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(3))
}

/// The same, as values 0-15 and 16-31.
///
/// # Safety
/// `at` points at 32 readable bytes.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
unsafe fn two_bits(at: *const u8, pair: usize) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller's.
    let (first, second) = unsafe { (vld1q_u8(at), vld1q_u8(at.add(16))) };
    let (shift, three) = (vdupq_n_s8(-2 * pair as i8), vdupq_n_u8(3));
    (
        vandq_u8(vshlq_u8(first, shift), three),
        vandq_u8(vshlq_u8(second, shift), three),
    )
}

/// Q3_K's 16 six-bit scales, stored plus 32, as llama.cpp unpacks them from 12 bytes: the low
/// nibbles of bytes 0-7 then their high nibbles, each with two top bits from bytes 8-11 (scale
/// `i`'s at bits `2 (i / 4)` of byte `8 + i % 4`).
///
/// # Safety
/// `block` points at a whole Q3_K super-block.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline]
unsafe fn q3k_scale_bytes(block: *const u8) -> [u8; 16] {
    // SAFETY: the caller's: the 12 scale bytes lie inside the super-block.
    let packed: [u8; 12] = unsafe { *(block.add(Q3K_SCALES_AT) as *const [u8; 12]) };
    let word = |i: usize| u32::from_le_bytes([0, 1, 2, 3].map(|b| packed[4 * i + b]));
    let (low, high, top) = (word(0), word(1), word(2));
    const NIBBLES: u32 = 0x0f0f_0f0f;
    const TWO_BITS: u32 = 0x0303_0303;
    let words = [
        low & NIBBLES | (top & TWO_BITS) << 4,
        high & NIBBLES | (top >> 2 & TWO_BITS) << 4,
        low >> 4 & NIBBLES | (top >> 4 & TWO_BITS) << 4,
        high >> 4 & NIBBLES | (top >> 6 & TWO_BITS) << 4,
    ];
    let mut out = [0u8; 16];
    for (bytes, word) in out.chunks_exact_mut(4).zip(words) {
        bytes.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// The low (`high` 0) or high (1) nibbles of the 32 bytes at `at`.
///
/// # Safety
/// `at` points at 32 readable bytes; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(at: *const u8, high: usize) -> __m256i {
    // SAFETY: the caller's.
    let bytes = unsafe { _mm256_loadu_si256(at as *const __m256i) };
    let shifted = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(4 * high as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f))
}

/// The low (`high` 0) or high (1) nibbles of the 32 bytes at `at`, as values 0-15 and 16-31.
///
/// # Safety
/// `at` points at 32 readable bytes.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
unsafe fn nibbles(at: *const u8, high: usize) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller's.
    let (first, second) = unsafe { (vld1q_u8(at), vld1q_u8(at.add(16))) };
    if high == 1 {
        (vshrq_n_u8::<4>(first), vshrq_n_u8::<4>(second))
    } else {
        let low = vdupq_n_u8(0x0f);
        (vandq_u8(first, low), vandq_u8(second, low))
    }
}

/// Q4_K's and Q5_K's eight 6-bit scales and eight 6-bit minima, one per sub-block, from their 12
/// packed bytes (see [`six_bit_words`]).
///
/// # Safety
/// `block` points at a whole Q4_K or Q5_K super-block.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn six_bit_scales(block: *const u8) -> ([u8; 8], [u8; 8]) {
    // SAFETY: the caller's.
    let (scales, mins) = unsafe { six_bit_words(block) };
    (scales.to_le_bytes(), mins.to_le_bytes())
}

/// The same, a byte each in two words, unpacked a word at a time from the 12 bytes after `d` and
/// `dmin`: the first four of each in the low six bits of packed bytes 0-3 (scales) and 4-7
/// (minima), the last four in the nibbles of bytes 8-11 with their top two bits in the top bits
/// of bytes 0-7.
///
/// # Safety
/// As [`six_bit_scales`].
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline]
unsafe fn six_bit_words(block: *const u8) -> (u64, u64) {
    // SAFETY: the caller's: the 12 packed bytes follow `d` and `dmin`.
    let word =
        |i: usize| unsafe { (block.add(Q4K_SCALES_AT + 4 * i) as *const u32).read_unaligned() };
    let (w0, w1, w2) = (word(0), word(1), word(2));
    const SIX: u32 = 0x3f3f_3f3f;
    const NIBBLE: u32 = 0x0f0f_0f0f;
    const TOP: u32 = 0x0303_0303;
    let scales = (w0 & SIX) as u64 | ((w2 & NIBBLE | ((w0 >> 6) & TOP) << 4) as u64) << 32;
    let mins = (w1 & SIX) as u64 | (((w2 >> 4) & NIBBLE | ((w1 >> 6) & TOP) << 4) as u64) << 32;
    (scales, mins)
}
