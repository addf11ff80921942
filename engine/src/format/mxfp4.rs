//! MXFP4 blocks (OCP microscaling, as ggml stores them): per 32 values an e8m0 exponent `e`
//! and 32 four-bit e2m1 codes, values 0-15 in the low nibbles and 16-31 in the high ones. A
//! value is `KVALUES[code] * 2^(e - 128)` (ggml keeps the e2m1 values doubled, as integers).
//!
//! odmoe's kernels multiply these blocks as they are. Where they do not (a GPU, a CPU without
//! their instructions), the blocks are held as Q8_0 blocks of exactly the same values (the
//! integers `KVALUES[code]` with the scale `2^(e - 128)` in f16), at twice the bytes, for candle;
//! or, from a Hugging Face checkpoint, as their f32 values. The same table lives in the kernels
//! (`E2M1_DOUBLED`), which may not import the file formats.

use super::gguf_header::MXFP4_BLOCK_BYTES;

const VALUES: usize = 32;
/// e2m1 values, doubled.
const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// Bytes of a Q8_0 block: an f16 scale and 32 signed values.
const Q8_0_BLOCK_BYTES: usize = 34;

/// Bytes that `bytes` of MXFP4 blocks take as Q8_0 blocks.
pub fn q8_0_bytes(bytes: usize) -> usize {
    bytes / MXFP4_BLOCK_BYTES * Q8_0_BLOCK_BYTES
}

/// `blocks` (whole MXFP4 blocks) as Q8_0 blocks of the same values. Exact for scales from
/// 2^-24 to 2^18; a block whose scale is below 2^-24 (values under 4e-7) becomes zero, and one
/// above 2^18 is refused.
pub fn to_q8_0(blocks: &[u8]) -> Result<Vec<u8>, String> {
    if !blocks.len().is_multiple_of(MXFP4_BLOCK_BYTES) {
        return Err(format!(
            "{} bytes are not whole MXFP4 blocks of {MXFP4_BLOCK_BYTES}",
            blocks.len()
        ));
    }
    let mut out = vec![0u8; q8_0_bytes(blocks.len())];
    for (block, held) in blocks
        .chunks_exact(MXFP4_BLOCK_BYTES)
        .zip(out.chunks_exact_mut(Q8_0_BLOCK_BYTES))
    {
        let exponent = i32::from(block[0]) - 128;
        // Codes times 2^shift keep |values| <= 96, and the scale inside f16's range.
        let shift = (exponent - 15).clamp(0, 3);
        let scale_exponent = exponent - shift;
        if scale_exponent > 15 {
            return Err(format!(
                "an MXFP4 block scale of 2^{exponent} is beyond what this version holds"
            ));
        }
        if scale_exponent < -24 {
            // Values under 4e-7: the block stays zero.
            continue;
        }
        // 2^scale_exponent as f16 bits: a normal number's biased exponent, or a subnormal's
        // one mantissa bit.
        let scale: u16 = if scale_exponent >= -14 {
            ((scale_exponent + 15) as u16) << 10
        } else {
            1 << (scale_exponent + 24)
        };
        held[..2].copy_from_slice(&scale.to_le_bytes());
        let (low, high) = held[2..].split_at_mut(16);
        for ((&byte, low), high) in block[1..].iter().zip(low).zip(high) {
            *low = (KVALUES[usize::from(byte & 0x0f)] << shift) as u8;
            *high = (KVALUES[usize::from(byte >> 4)] << shift) as u8;
        }
    }
    Ok(out)
}

/// Rows `rows` of an MXFP4 matrix as OpenAI's checkpoints keep it, as ggml's blocks: `blocks`
/// holds per row `groups` blocks of 16 bytes (value 2j of a block in byte j's low nibble, 2j + 1
/// in its high one) and `scales` per row `groups` exponents, `2^(s - 127)` for the e2m1 values,
/// which is ggml's `2^(e - 128)` for the doubled ones.
pub fn from_checkpoint_rows(
    blocks: &[u8],
    scales: &[u8],
    groups: usize,
    rows: impl Iterator<Item = usize>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for row in rows {
        let row_blocks = blocks[row * groups * 16..][..groups * 16].chunks_exact(16);
        for (packed, &scale) in row_blocks.zip(&scales[row * groups..][..groups]) {
            let value = |i: usize| {
                let byte = packed[i / 2];
                if i.is_multiple_of(2) {
                    byte & 0x0f
                } else {
                    byte >> 4
                }
            };
            out.push(scale);
            out.extend((0..16).map(|k| value(k) | value(k + 16) << 4));
        }
    }
    out
}

/// `values` (a multiple of 32) as MXFP4 blocks, as ggml's reference quantizer makes them: the
/// exponent from the block's largest magnitude, each value its nearest e2m1 code (the first
/// on ties).
pub fn quantize(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / VALUES * MXFP4_BLOCK_BYTES);
    for block in values.chunks_exact(VALUES) {
        let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let exponent = if largest > 0.0 {
            (largest.log2().floor() as i32 - 2 + 127).clamp(0, 255) as u8
        } else {
            0
        };
        let half = 2f32.powi(i32::from(exponent) - 128);
        let code = |x: f32| {
            (0..16u8)
                .min_by(|&a, &b| {
                    let err = |c: u8| (half * f32::from(KVALUES[c as usize]) - x).abs();
                    err(a).total_cmp(&err(b))
                })
                .expect("sixteen codes")
        };
        out.push(exponent);
        out.extend((0..16).map(|j| code(block[j]) | (code(block[j + 16]) << 4)));
    }
    out
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    /// ggml's reference: `KVALUES[code] * e8m0_to_fp32_half(e)`.
    fn reference(block: &[u8]) -> Vec<f32> {
        let half = 2f64.powi(i32::from(block[0]) - 128);
        (0..VALUES)
            .map(|j| {
                let byte = block[1 + j % 16];
                let nibble = if j < 16 { byte & 0x0f } else { byte >> 4 };
                (f64::from(KVALUES[nibble as usize]) * half) as f32
            })
            .collect()
    }

    fn q8_0_values(block: &[u8]) -> Vec<f32> {
        let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
        block[2..]
            .iter()
            .map(|&q| f32::from(q as i8) * scale)
            .collect()
    }

    /// A checkpoint's rows (values in nibble pairs, e2m1 exponents) become ggml blocks of the
    /// same values: checked against transformers' dequantization rule.
    #[test]
    fn checkpoint_rows_become_blocks_of_the_same_values() {
        const E2M1: [f64; 16] = [
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        ];
        let (rows, groups) = (3, 2);
        let blocks: Vec<u8> = (0..rows * groups * 16)
            .map(|i| (i * 37 + 11) as u8)
            .collect();
        let scales: Vec<u8> = (0..rows * groups).map(|i| 120 + i as u8).collect();
        // Rows 0 and 2, as gate rows of an interleaved gate_up.
        let ours = from_checkpoint_rows(&blocks, &scales, groups, [0, 2].into_iter());
        assert_eq!(ours.len(), 2 * groups * MXFP4_BLOCK_BYTES);
        for (n, row) in [0, 2].into_iter().enumerate() {
            for g in 0..groups {
                let block = &ours[(n * groups + g) * MXFP4_BLOCK_BYTES..][..MXFP4_BLOCK_BYTES];
                let values = reference(block);
                let scale = 2f64.powi(i32::from(scales[row * groups + g]) - 127);
                for (i, &value) in values.iter().enumerate() {
                    let byte = blocks[(row * groups + g) * 16 + i / 2];
                    let code = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    assert_eq!(
                        f64::from(value),
                        E2M1[code as usize] * scale,
                        "row {row} value {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn quantized_values_are_the_nearest_codes() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.01).collect();
        let blocks = quantize(&values);
        assert_eq!(blocks.len(), 2 * MXFP4_BLOCK_BYTES);
        for (block, originals) in blocks.chunks(MXFP4_BLOCK_BYTES).zip(values.chunks(32)) {
            let step = 2f32.powi(i32::from(block[0]) - 128);
            for (got, want) in reference(block).iter().zip(originals) {
                // Within half the widest gap of the e2m1 grid (4 doubled units) of the value.
                assert!((got - want).abs() <= 2.0 * step, "{got} for {want}");
            }
        }
    }

    #[test]
    fn q8_0_blocks_hold_the_same_values() {
        for exponent in [104u8, 110, 120, 126, 127, 128, 140, 143, 144, 146] {
            let mut block = vec![exponent];
            block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
            let q = to_q8_0(&block).unwrap();
            assert_eq!(q.len(), Q8_0_BLOCK_BYTES);
            assert_eq!(q8_0_values(&q), reference(&block), "e {exponent}");
        }
        // Below f16's range: values under 4e-7 become zero.
        let block = [90u8; MXFP4_BLOCK_BYTES];
        assert!(
            q8_0_values(&to_q8_0(&block).unwrap())
                .iter()
                .all(|&v| v == 0.0)
        );
        assert!(to_q8_0(&[200u8; MXFP4_BLOCK_BYTES]).is_err());
        assert!(to_q8_0(&[0u8; 5]).is_err());
    }
}
