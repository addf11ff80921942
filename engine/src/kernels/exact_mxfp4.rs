//! MXFP4 weights times f32 activations, every weight at its exact value: the product of a
//! Hugging Face checkpoint's MXFP4 experts, computed in f32 as transformers computes it from the
//! dequantized blocks, while memory holds the blocks (17 bytes per 32 values, where f32 would take
//! 128).
//!
//! Each output element is one row's sum over its blocks in order, each block's 32 products summed
//! in eight lanes and then scaled by its exponent: the same steps whichever thread computes it and
//! whatever else the pass holds, so results depend neither on the thread count nor on the batch.

use super::quantized::{BlockMatrix, E2M1_DOUBLED, Format, e8m0_half};

/// Values in a block.
const BLOCK: usize = 32;
/// The e2m1 values doubled, by code, as f32.
const DOUBLED: [f32; 16] = {
    let mut values = [0f32; 16];
    let mut code = 0;
    while code < 16 {
        values[code] = E2M1_DOUBLED[code] as f32;
        code += 1;
    }
    values
};

/// Tokens from which a product widens the matrix to f32 once and multiplies it by candle's
/// blocked product instead: decoding each row for a few tokens costs less than widening the
/// whole matrix, and for many tokens the blocked product is several times faster (`odmoe bench
/// dtype`: a 768 x 2048 matrix by 512 tokens took 51 ms row by row, 7 ms widened).
pub const WIDEN_FROM: usize = 16;

/// The exact values of `w` (MXFP4) in f32, `[rows, cols]` row-major.
pub fn widened(w: &BlockMatrix) -> Vec<f32> {
    let weight = w.weight();
    let [rows, cols] = w.dims();
    let row_bytes = cols / BLOCK * Format::Mxfp4.block_bytes();
    let mut values = vec![0f32; rows * cols];
    let mut scales = vec![0f32; cols / BLOCK];
    for (row, values) in weight
        .blocks
        .chunks_exact(row_bytes)
        .zip(values.chunks_exact_mut(cols))
    {
        decode_row(row, values, &mut scales);
        for (block, &scale) in values.chunks_exact_mut(BLOCK).zip(&scales) {
            // Powers of two: exact.
            block.iter_mut().for_each(|v| *v *= scale);
        }
    }
    values
}

/// A row's values doubled (the codes' e2m1 values times two) into `values`, and its blocks'
/// scales (`2^(e - 128)`, half of each block's power of two) into `scales`.
fn decode_row(row: &[u8], values: &mut [f32], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        unsafe { decode_row_avx512(row, values, scales) };
        return;
    }
    // The exponent, then 16 bytes of two codes each.
    let blocks = row.chunks_exact(Format::Mxfp4.block_bytes());
    for ((block, values), scale) in blocks.zip(values.chunks_exact_mut(BLOCK)).zip(scales) {
        *scale = e8m0_half(block[0]);
        for (j, &byte) in block[1..].iter().enumerate() {
            values[j] = DOUBLED[usize::from(byte & 0x0f)];
            values[j + 16] = DOUBLED[usize::from(byte >> 4)];
        }
    }
}

/// [`decode_row`] with the 16 codes of a block's low (then high) nibbles looked up at once in a
/// register holding the 16 values: where a decode step's time went, one lookup at a time.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_row_avx512(row: &[u8], values: &mut [f32], scales: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: `DOUBLED` holds 16 values.
    let table = unsafe { _mm512_loadu_ps(DOUBLED.as_ptr()) };
    let nibble = _mm512_set1_epi32(0x0f);
    let blocks = row.chunks_exact(Format::Mxfp4.block_bytes());
    for ((block, values), scale) in blocks.zip(values.chunks_exact_mut(BLOCK)).zip(scales) {
        *scale = e8m0_half(block[0]);
        // SAFETY: the block's 16 bytes of codes follow its exponent; `values` holds 32.
        unsafe {
            let codes = _mm_loadu_si128(block.as_ptr().add(1) as *const __m128i);
            let codes = _mm512_cvtepu8_epi32(codes);
            let low = _mm512_and_si512(codes, nibble);
            let high = _mm512_srli_epi32::<4>(codes);
            _mm512_storeu_ps(values.as_mut_ptr(), _mm512_permutexvar_ps(low, table));
            _mm512_storeu_ps(
                values.as_mut_ptr().add(16),
                _mm512_permutexvar_ps(high, table),
            );
        }
    }
}

/// `x W^T` for `x`, rows of `w.dims()[1]` f32 values, and `w` in MXFP4: `[tokens, rows]`.
pub fn product(w: &BlockMatrix, x: &[f32]) -> Vec<f32> {
    let weight = w.weight();
    assert_eq!(weight.format, Format::Mxfp4, "an MXFP4 matrix");
    let [rows, cols] = w.dims();
    assert!(x.len().is_multiple_of(cols), "rows of {cols} values");
    let tokens = x.len() / cols;
    let blocks = cols / BLOCK;
    let row_bytes = blocks * Format::Mxfp4.block_bytes();
    let mut out = vec![0f32; tokens * rows];
    let out_at = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        // A row's doubled values, decoded once for every token.
        let mut values = vec![0f32; cols];
        let mut scales = vec![0f32; blocks];
        for r in range {
            decode_row(
                &weight.blocks[r * row_bytes..(r + 1) * row_bytes],
                &mut values,
                &mut scales,
            );
            for t in 0..tokens {
                let x = &x[t * cols..(t + 1) * cols];
                let mut sum = 0f32;
                for ((values, x), scale) in values
                    .chunks_exact(BLOCK)
                    .zip(x.chunks_exact(BLOCK))
                    .zip(&scales)
                {
                    sum += block_dot(values, x) * scale;
                }
                // SAFETY: element (t, r) is written by this range item alone, and `out` outlives
                // the pool call.
                unsafe { *(out_at as *mut f32).add(t * rows + r) = sum };
            }
        }
    });
    out
}

/// The 32 products of a block summed in eight lanes, then the lanes: a fixed order the compiler
/// turns into vector instructions.
#[inline(always)]
fn block_dot(values: &[f32], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, (v, x)) in values.iter().zip(x).enumerate() {
        lanes[i % 8] += v * x;
    }
    let half = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (half[0] + half[2]) + (half[1] + half[3])
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Each element is the f64 sum of the dequantized weights times the activations, up to f32
    /// rounding: every code, subnormal and large exponents, one and several blocks.
    #[test]
    fn products_are_the_exact_sums() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Few tokens go row by row; from WIDEN_FROM on, through the widened matrix.
        for (rows, cols, tokens) in [(3, 32, 1), (5, 96, 4), (2, 256, 9), (4, 64, WIDEN_FROM + 3)] {
            let mut blocks = Vec::new();
            for b in 0..rows * cols / BLOCK {
                blocks.push(match b % 5 {
                    0 => 1,
                    1 => 150,
                    _ => 110 + (next() % 30) as u8,
                });
                blocks.extend((0..16).map(|_| next() as u8));
            }
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (next() % 2001) as f32 / 250.0 - 4.0)
                .collect();
            let matrix = crate::kernels::Matrix::exact_mxfp4(blocks.clone(), [rows, cols]).unwrap();
            let input =
                candle_core::Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).unwrap();
            let ours: Vec<f32> = matrix
                .forward(&input)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let w = BlockMatrix::new(Format::Mxfp4, blocks.clone(), cols).unwrap();
            let widened = widened(&w);
            for t in 0..tokens {
                for r in 0..rows {
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for i in 0..cols {
                        let block = &blocks[(r * cols + i) / BLOCK * Format::Mxfp4.block_bytes()..];
                        let byte = block[1 + i % BLOCK % 16];
                        let code = if i % BLOCK < 16 { byte & 15 } else { byte >> 4 };
                        let w = f64::from(DOUBLED[code as usize])
                            * 2f64.powi(i32::from(block[0]) - 128);
                        assert_eq!(f64::from(widened[r * cols + i]), w, "value {i} of row {r}");
                        exact += w * f64::from(x[t * cols + i]);
                        magnitude += (w * f64::from(x[t * cols + i])).abs();
                    }
                    let ours = f64::from(ours[t * rows + r]);
                    assert!(
                        (ours - exact).abs() <= 1e-6 * magnitude,
                        "{rows}x{cols}, row {r} token {t}: {ours} {exact}"
                    );
                }
            }
        }
    }
}
