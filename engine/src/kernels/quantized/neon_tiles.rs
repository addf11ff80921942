//! NEON prompt products in tiles of four weight rows, one row to a register lane.
//!
//! One dot product at a time, a block's quants are unpacked for each token and its scale comes
//! in after pairwise additions, for one row. With the tile's quants unpacked once and
//! transposed so that a register holds four quants of each of its four rows, `sdot` by element
//! meets them with four of a token's quants, and what follows serves the four rows together: a
//! 32-value block's conversion and scale; for a K-quant, the scales as llama.cpp's K-quant
//! products take them, in integers (each 16-value group's dot times its integer scale, the
//! offsets, zero points or minima, times the token's group sums), then `d` (and `dmin`) times
//! the token's scale once per super-block.
//!
//! Per row and token the steps are the same in any tile and group, so an element does not
//! depend on the other tokens of the batch or on the threads.

use std::arch::aarch64::*;
use std::ops::Range;

use super::k_quants::{self, Layout, Q2K, Q3K, Q4K, Q5K, Q6K, SUB_BLOCKS};
use super::neon::{half, sdot_lane, small_quants};
use super::small::{self, Kind};
use super::{Activations, BLOCK, Format};

/// Rows in a tile, one to each lane of a register of 32-bit lanes.
pub(super) const TILE: usize = 4;

/// Rows `first..first + 4` of a matrix in `format` with the tokens `tokens` of `x` (in Q8_0, or
/// Q8_K for a K-quant), stored for the rows in `keep`.
///
/// # Safety
/// The CPU has dotprod; the four rows (of `row_bytes` bytes) are inside `weights`, the tokens
/// rows of `x`; `out` has room for every element and nothing else writes `keep`'s.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn product(
    format: Format,
    weights: &[u8],
    first: usize,
    row_bytes: usize,
    x: &Activations,
    tokens: Range<usize>,
    keep: &Range<usize>,
    out: *mut f32,
    out_rows: usize,
) {
    let tile = Tile {
        weights,
        first,
        row_bytes,
        x,
    };
    // SAFETY: the caller's.
    unsafe {
        let acc = match format {
            Format::Q8_0 => tile.blocks::<small::Q8_0>(tokens.clone()),
            Format::Q4_0 => tile.blocks::<small::Q4_0>(tokens.clone()),
            Format::Q4_1 => tile.blocks::<small::Q4_1>(tokens.clone()),
            Format::Q5_0 => tile.blocks::<small::Q5_0>(tokens.clone()),
            Format::Q5_1 => tile.blocks::<small::Q5_1>(tokens.clone()),
            Format::Mxfp4 => tile.blocks::<small::Mxfp4>(tokens.clone()),
            Format::Q2K => tile.super_blocks::<Q2K>(tokens.clone()),
            Format::Q3K => tile.super_blocks::<Q3K>(tokens.clone()),
            Format::Q4K => tile.super_blocks::<Q4K>(tokens.clone()),
            Format::Q5K => tile.super_blocks::<Q5K>(tokens.clone()),
            Format::Q6K => tile.super_blocks::<Q6K>(tokens.clone()),
        };
        let mut lanes = [0f32; TILE];
        for (t, acc) in tokens.zip(acc) {
            vst1q_f32(lanes.as_mut_ptr(), acc);
            for (r, &sum) in lanes.iter().enumerate() {
                if keep.contains(&(first + r)) {
                    *out.add(t * out_rows + first + r) = sum;
                }
            }
        }
    }
}

/// Row `r`'s `values` into lane `r` of `quads`, four to a lane: `quads[k]` gets values
/// `4 k..4 k + 4`.
fn put_lane(quads: &mut [[u32; TILE]], r: usize, values: &[u8]) {
    for (quad, four) in quads.iter_mut().zip(values.chunks_exact(4)) {
        quad[r] = u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
    }
}

/// A tile's rows and the activations they meet.
struct Tile<'a> {
    weights: &'a [u8],
    first: usize,
    row_bytes: usize,
    x: &'a Activations,
}

impl Tile<'_> {
    /// Byte `at` of the tile's row `r`.
    ///
    /// # Safety
    /// The row is inside the weights and `at` inside the row.
    unsafe fn row_at(&self, r: usize, at: usize) -> *const u8 {
        // SAFETY: the caller's.
        unsafe {
            self.weights
                .as_ptr()
                .add((self.first + r) * self.row_bytes + at)
        }
    }

    /// Each token's four elements, for a 32-value block type: per block, eight `sdot` by
    /// element, then the integer dots (less the zero point, taken off the quants in bytes as
    /// one dot at a time takes it) times `d` and the token's scale, plus for a type with an
    /// offset the offsets times the token's block sums.
    ///
    /// # Safety
    /// As [`product`].
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn blocks<S: Kind>(&self, tokens: Range<usize>) -> Vec<float32x4_t> {
        let x = self.x;
        let blocks = x.cols / BLOCK;
        let mut acc = vec![vdupq_n_f32(0.0); tokens.len()];
        // Per block: quads[k] holds quants 4 k..4 k + 4 of each row.
        let mut quads = [[0u32; TILE]; BLOCK / 4];
        let (mut d, mut min) = ([0f32; TILE], [0f32; TILE]);
        for b in 0..blocks {
            // SAFETY: block b of the tile's rows is inside the weights; the tokens' blocks
            // inside `x`.
            unsafe {
                for r in 0..TILE {
                    let block = self.row_at(r, b * S::BYTES);
                    let mut values = [0u8; BLOCK];
                    if S::Q8 {
                        values.copy_from_slice(std::slice::from_raw_parts(block.add(2), BLOCK));
                    } else {
                        let (low, high) = small_quants::<S>(block);
                        // Without an offset the zero point comes off in bytes.
                        let zero = vdupq_n_u8(if S::MIN { 0 } else { S::ZERO as u8 });
                        vst1q_u8(values.as_mut_ptr(), vsubq_u8(low, zero));
                        vst1q_u8(values.as_mut_ptr().add(16), vsubq_u8(high, zero));
                    }
                    put_lane(&mut quads, r, &values);
                    d[r] = if S::E2M1 {
                        small::e8m0_half(*block)
                    } else {
                        half(block)
                    };
                    if S::MIN {
                        min[r] = half(block.add(small::min_at()));
                    }
                }
                let quads = quads.map(|quad| vreinterpretq_s8_u32(vld1q_u32(quad.as_ptr())));
                let (d, min) = (vld1q_f32(d.as_ptr()), vld1q_f32(min.as_ptr()));
                for (t, acc) in tokens.clone().zip(acc.iter_mut()) {
                    let a = x.quants.as_ptr().add(t * x.cols + b * BLOCK);
                    let halves = [
                        (&quads[..4], vld1q_s8(a)),
                        (&quads[4..], vld1q_s8(a.add(16))),
                    ];
                    let mut dots = [vdupq_n_s32(0); 2];
                    for (dots, (quads, sixteen)) in dots.iter_mut().zip(halves) {
                        *dots = sdot_lane::<0>(*dots, quads[0], sixteen);
                        *dots = sdot_lane::<1>(*dots, quads[1], sixteen);
                        *dots = sdot_lane::<2>(*dots, quads[2], sixteen);
                        *dots = sdot_lane::<3>(*dots, quads[3], sixteen);
                    }
                    let dots = vcvtq_f32_s32(vaddq_s32(dots[0], dots[1]));
                    let at = t * blocks + b;
                    *acc = vfmaq_f32(*acc, dots, vmulq_n_f32(d, *x.scales.get_unchecked(at)));
                    if S::MIN {
                        *acc = vfmaq_n_f32(*acc, min, *x.sums.get_unchecked(at));
                    }
                }
            }
        }
        acc
    }

    /// Each token's four elements, for a K-quant type.
    ///
    /// # Safety
    /// As [`product`].
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn super_blocks<K: Layout>(&self, tokens: Range<usize>) -> Vec<float32x4_t> {
        let x = self.x;
        let supers = x.cols / k_quants::VALUES;
        let blocks = x.cols / BLOCK;
        let mut acc = vec![vdupq_n_f32(0.0); tokens.len()];
        // Per super-block: quads[4 g + k] holds quants 16 g + 4 k..16 g + 4 k + 4 of each row;
        // scales[g] and offsets[g] each row's integers for group g.
        let mut quads = [[0u32; TILE]; 64];
        let mut scales = [[0i32; TILE]; 16];
        let mut offsets = [[0i16; TILE]; 16];
        let (mut d, mut dmin) = ([0f32; TILE], [0f32; TILE]);
        for s in 0..supers {
            // SAFETY: super-block s of the tile's rows is inside the weights; the tokens'
            // values and their sums inside `x`.
            unsafe {
                for r in 0..TILE {
                    let block = self.row_at(r, s * K::BYTES);
                    let mut values = [0u8; k_quants::VALUES];
                    for sub in 0..SUB_BLOCKS {
                        let (low, high) = K::quants(block, sub);
                        vst1q_u8(values.as_mut_ptr().add(BLOCK * sub), low);
                        vst1q_u8(values.as_mut_ptr().add(BLOCK * sub + 16), high);
                    }
                    put_lane(&mut quads, r, &values);
                    let integers = K::integer_scales(block);
                    for g in 0..16 {
                        (scales[g][r], offsets[g][r]) = (integers.scales[g], integers.offsets[g]);
                    }
                    (d[r], dmin[r]) = (integers.d, integers.dmin);
                }
                let quads = quads.map(|quad| vreinterpretq_s8_u32(vld1q_u32(quad.as_ptr())));
                let scales = scales.map(|group| vld1q_s32(group.as_ptr()));
                let offsets = offsets.map(|group| vld1_s16(group.as_ptr()));
                let (d, dmin) = (vld1q_f32(d.as_ptr()), vld1q_f32(dmin.as_ptr()));
                for (t, acc) in tokens.clone().zip(acc.iter_mut()) {
                    let a = x.quants.as_ptr().add(t * x.cols + s * k_quants::VALUES);
                    // Integer sums are exact in any order: two accumulators taking groups in
                    // turn, so that the additions do not wait on each other.
                    let mut sum = [vdupq_n_s32(0); 2];
                    for (pair, (quads, scale)) in quads
                        .chunks_exact(8)
                        .zip(scales.chunks_exact(2))
                        .enumerate()
                    {
                        // A loop, not a closure: a closure does not inherit `dotprod`, and
                        // each `sdot` could become a call.
                        let mut dots = [vdupq_n_s32(0); 2];
                        for (half, dots) in dots.iter_mut().enumerate() {
                            let (g, quads) = (2 * pair + half, &quads[4 * half..]);
                            let sixteen = vld1q_s8(a.add(16 * g));
                            *dots = sdot_lane::<0>(*dots, quads[0], sixteen);
                            *dots = sdot_lane::<1>(*dots, quads[1], sixteen);
                            *dots = sdot_lane::<2>(*dots, quads[2], sixteen);
                            *dots = sdot_lane::<3>(*dots, quads[3], sixteen);
                        }
                        if K::SCALE_PER_32 {
                            // Both groups take the sub-block's scale: one product for the two.
                            let dots = vaddq_s32(dots[0], dots[1]);
                            sum[pair % 2] = vmlaq_s32(sum[pair % 2], dots, scale[0]);
                        } else {
                            for ((sum, dots), &scale) in sum.iter_mut().zip(dots).zip(scale) {
                                *sum = vmlaq_s32(*sum, dots, scale);
                            }
                        }
                    }
                    let sum = vaddq_s32(sum[0], sum[1]);
                    let group_sums = x
                        .integer_sums
                        .as_ptr()
                        .add(2 * (t * blocks + s * SUB_BLOCKS));
                    let mut offset = vdupq_n_s32(0);
                    for (g, &group) in offsets.iter().enumerate() {
                        offset = vmlal_n_s16(offset, group, *group_sums.add(g));
                    }
                    let scale = *x.scales.get_unchecked(t * blocks + s * SUB_BLOCKS);
                    if K::ZERO_POINT {
                        let exact = vcvtq_f32_s32(vsubq_s32(sum, offset));
                        *acc = vfmaq_f32(*acc, exact, vmulq_n_f32(d, scale));
                    } else {
                        *acc = vfmaq_f32(*acc, vcvtq_f32_s32(sum), vmulq_n_f32(d, scale));
                        let by = vmulq_n_f32(dmin, scale);
                        *acc = vfmsq_f32(*acc, vcvtq_f32_s32(offset), by);
                    }
                }
            }
        }
        acc
    }
}
