//! The NEON dot products, with the dotprod extension (every Apple M-series chip, and Arm's
//! server cores since Neoverse N1): a block's 32 products summed by two `sdot`s into four i32
//! lanes, one dot product at a time as the AVX2 path computes a token's. The quants are met as they
//! are stored, so candle's repacked second copy of each matrix is never made.

use std::arch::aarch64::*;
use std::arch::asm;

use super::k_quants::{Layout, SUB_BLOCKS};
use super::small::{self, Kind};
use super::{BLOCK, BLOCK_BYTES};

/// `acc` plus the per-lane sums of four products of signed bytes. `sdot` by hand: the standard
/// library's `vdotq_s32` is not yet stable.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: registers only; the CPU has dotprod (this function's feature).
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack),
        );
    }
    acc
}

/// `acc` plus, in each lane, the sum of the products of its four signed bytes of `a` with the
/// four bytes of lane `LANE` of `b` (`sdot` by element): four rows of `a`, one to a lane, with
/// four values of one activation row.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(super) fn sdot_lane<const LANE: i32>(
    mut acc: int32x4_t,
    a: int8x16_t,
    b: int8x16_t,
) -> int32x4_t {
    // SAFETY: registers only; the CPU has dotprod (this function's feature).
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            lane = const LANE,
            options(pure, nomem, nostack),
        );
    }
    acc
}

/// The integer dot of 32 weight quants (values 0-15 in `low`, 16-31 in `high`) with the 32
/// activation quants at `a`, in four lanes.
///
/// # Safety
/// `a` points at 32 quants.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn block_dot(low: int8x16_t, high: int8x16_t, a: *const i8) -> int32x4_t {
    // SAFETY: the caller's.
    unsafe {
        sdot(
            sdot(vdupq_n_s32(0), low, vld1q_s8(a)),
            high,
            vld1q_s8(a.add(16)),
        )
    }
}

/// `sum over blocks of (weight scale * activation scale) * (integer dot of the quants)`, into
/// two accumulators taking blocks in turn.
///
/// # Safety
/// The CPU has dotprod; `weights` holds `scales.len()` blocks and `quants` 32 quants for each.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn dot(weights: &[u8], quants: &[i8], scales: &[f32]) -> f32 {
    let blocks = scales.len();
    debug_assert!(weights.len() >= blocks * BLOCK_BYTES && quants.len() >= blocks * BLOCK);
    let mut acc = [vdupq_n_f32(0.0); 2];
    for b in 0..blocks {
        // SAFETY: block b is inside both slices.
        unsafe {
            let block = weights.as_ptr().add(b * BLOCK_BYTES);
            let w = block.add(2) as *const i8;
            let lanes = block_dot(
                vld1q_s8(w),
                vld1q_s8(w.add(16)),
                quants.as_ptr().add(b * BLOCK),
            );
            let scale = half(block) * *scales.get_unchecked(b);
            acc[b % 2] = vfmaq_n_f32(acc[b % 2], vcvtq_f32_s32(lanes), scale);
        }
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// `sum over blocks of d (activation scale) (integer dot of the quants less the zero point) +
/// m (activation block sum)` for a 4- or 5-bit block type or MXFP4 (see `small`).
///
/// # Safety
/// The CPU has dotprod; `weights` holds `scales.len()` blocks, `quants` 32 quants and `sums`
/// one sum for each.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn dot_small<S: Kind>(
    weights: &[u8],
    quants: &[i8],
    scales: &[f32],
    sums: &[f32],
) -> f32 {
    let blocks = scales.len();
    let bytes = S::BYTES;
    debug_assert!(weights.len() >= blocks * bytes && quants.len() >= blocks * BLOCK);
    debug_assert!(sums.len() >= blocks);
    let mut acc = vdupq_n_f32(0.0);
    let mut offsets = 0f32;
    for b in 0..blocks {
        // SAFETY: block b is inside every slice.
        unsafe {
            let block = weights.as_ptr().add(b * bytes);
            let (low, high) = small_quants::<S>(block);
            // Without an offset the zero point comes off in bytes: the quants become signed.
            let zero = vdupq_n_u8(if S::MIN { 0 } else { S::ZERO as u8 });
            let lanes = block_dot(
                vreinterpretq_s8_u8(vsubq_u8(low, zero)),
                vreinterpretq_s8_u8(vsubq_u8(high, zero)),
                quants.as_ptr().add(b * BLOCK),
            );
            let d = if S::E2M1 {
                small::e8m0_half(*block)
            } else {
                half(block)
            };
            let scale = d * *scales.get_unchecked(b);
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(lanes), scale);
            if S::MIN {
                offsets += half(block.add(small::min_at())) * *sums.get_unchecked(b);
            }
        }
    }
    vaddvq_f32(acc) + offsets
}

/// `sum over super-blocks of (the activations' scale) (d (the integer dot of the quants, each
/// 16-value group's times its integer scale) - d or dmin (the integer offsets times the
/// activations' sums of 16))` for a K-quant type with Q8_K activations: a super-block's sums
/// are exact in integers, as llama.cpp computes them, and converted once (see AVX2's `dot_k`);
/// four groups' dots a step.
///
/// # Safety
/// The CPU has dotprod; `weights` holds `scales.len() / 8` super-blocks, `quants` 32 quants
/// and `scales` one scale (the super-block's) for each activation block, and `sums` the integer
/// sum of each 16 quants.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn dot_k<K: Layout>(
    weights: &[u8],
    quants: &[i8],
    scales: &[f32],
    sums: &[i16],
) -> f32 {
    let supers = scales.len() / SUB_BLOCKS;
    debug_assert!(weights.len() >= supers * K::BYTES && quants.len() >= scales.len() * BLOCK);
    debug_assert!(sums.len() >= 2 * scales.len());
    let mut acc = vdupq_n_f32(0.0);
    for s in 0..supers {
        // SAFETY: super-block s and its activation blocks are inside every slice.
        unsafe {
            let block = weights.as_ptr().add(s * K::BYTES);
            let weight = K::integer_scales(block);
            let mut dots = vdupq_n_s32(0);
            for pair in 0..SUB_BLOCKS / 2 {
                // The groups of sub-blocks 2 pair and 2 pair + 1, each a dot of 16 quants.
                let mut groups = [vdupq_n_s32(0); 4];
                for i in 0..2 {
                    let sub = 2 * pair + i;
                    let a = quants.as_ptr().add((s * SUB_BLOCKS + sub) * BLOCK);
                    let (low, high) = K::quants(block, sub);
                    groups[2 * i] = sdot(vdupq_n_s32(0), vreinterpretq_s8_u8(low), vld1q_s8(a));
                    groups[2 * i + 1] = sdot(
                        vdupq_n_s32(0),
                        vreinterpretq_s8_u8(high),
                        vld1q_s8(a.add(16)),
                    );
                }
                let four = vpaddq_s32(
                    vpaddq_s32(groups[0], groups[1]),
                    vpaddq_s32(groups[2], groups[3]),
                );
                let group_scales = vld1q_s32(weight.scales.as_ptr().add(4 * pair));
                dots = vmlaq_s32(dots, four, group_scales);
            }
            let mut offsets = vdupq_n_s32(0);
            for quarter in 0..4 {
                offsets = vmlal_s16(
                    offsets,
                    vld1_s16(weight.offsets.as_ptr().add(4 * quarter)),
                    vld1_s16(sums.as_ptr().add(16 * s + 4 * quarter)),
                );
            }
            let token = *scales.get_unchecked(s * SUB_BLOCKS);
            if K::ZERO_POINT {
                let exact = vsubq_s32(dots, offsets);
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(exact), weight.d * token);
            } else {
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dots), weight.d * token);
                let by_dmin = vdupq_n_f32(weight.dmin * token);
                acc = vfmsq_f32(acc, vcvtq_f32_s32(offsets), by_dmin);
            }
        }
    }
    vaddvq_f32(acc)
}

/// The 32 unsigned quants (0-15, or 0-31 with the fifth bits, or MXFP4's lifted values 0-24) of
/// a 4- or 5-bit or MXFP4 block: values 0-15 (the low nibbles) and 16-31 (the high ones).
///
/// # Safety
/// `block` points at a whole block.
#[inline]
#[target_feature(enable = "neon")]
pub(super) unsafe fn small_quants<S: Kind>(block: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller's.
    unsafe {
        let packed = vld1q_u8(block.add(S::QUANTS_AT));
        let low = vandq_u8(packed, vdupq_n_u8(0x0f));
        let high = vshrq_n_u8::<4>(packed);
        if S::E2M1 {
            // Each code as its value doubled plus 12 (see `small::E2M1_LIFTED`).
            let table = vld1q_u8(small::E2M1_LIFTED.as_ptr());
            return (vqtbl1q_u8(table, low), vqtbl1q_u8(table, high));
        }
        if !S::HIGH {
            return (low, high);
        }
        let bits = (block.add(small::high_at(S::MIN)) as *const u32).read_unaligned();
        (
            vorrq_u8(low, fifth_bits(bits as u16)),
            vorrq_u8(high, fifth_bits((bits >> 16) as u16)),
        )
    }
}

/// 0x10 in byte i where bit i of `bits` is set, else 0: bytes 0-7 test the low byte's bits,
/// 8-15 the high byte's.
#[inline]
#[target_feature(enable = "neon")]
fn fifth_bits(bits: u16) -> uint8x16_t {
    let [low, high] = bits.to_le_bytes();
    let spread = vcombine_u8(vdup_n_u8(low), vdup_n_u8(high));
    let mask = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    vandq_u8(vtstq_u8(spread, mask), vdupq_n_u8(0x10))
}

/// The f16 at `at`, as f32.
///
/// # Safety
/// `at` points at two readable bytes.
#[inline]
pub(super) unsafe fn half(at: *const u8) -> f32 {
    // SAFETY: the caller's.
    let bits = unsafe { (at as *const u16).read_unaligned() };
    ::half::f16::from_bits(bits).to_f32()
}
