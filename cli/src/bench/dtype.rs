//! `odmoe bench dtype`: one expert projection (Qwen3-30B-A3B's, 768 x 2048) by weight type, in a
//! decode step's shape (one token, the weights cycling through 512 MiB of copies so they come from
//! memory as a step's experts do) and a prompt's (`--prompt-tokens` tokens, one copy), through
//! candle's products and through odmoe's (its kernels where they take the type, else candle's);
//! and MXFP4, which candle does not have (see `mxfp4_rows`).

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{DType, Device, Module, Tensor};
use clap::Args;
use odmoe_engine::format::mxfp4;
use odmoe_engine::kernels::{Matrix, Projection, quantized};
use serde_json::json;

use super::gbps;

#[derive(Args)]
pub struct DtypeBenchArgs {
    /// Tokens in the prompt shape.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

const ROWS: usize = 768;
const COLS: usize = 2048;
/// The decode shape's weights in all copies: far beyond the CPU's caches.
const DECODE_BYTES: usize = 512 << 20;
/// Each measurement runs at least this long.
const MEASURE: Duration = Duration::from_millis(300);

type Apply = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

/// One row of the table: a type in one shape, through candle and through odmoe.
struct Row {
    weights: String,
    shape: &'static str,
    bytes: usize,
    candle_us: f64,
    odmoe_us: f64,
    /// Whether odmoe's own kernel computed it (else odmoe runs candle's product).
    kernel: bool,
}

pub fn run(args: DtypeBenchArgs) -> Result<()> {
    let device = Device::Cpu;
    let weight = Tensor::randn(0f32, 0.1, (ROWS, COLS), &device)?;
    let decode_x = Tensor::randn(0f32, 1.0, (1, COLS), &device)?;
    let prompt_x = Tensor::randn(0f32, 1.0, (args.prompt_tokens.max(1), COLS), &device)?;
    let mut rows = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        let bytes = weight.elem_count() * dtype.size_in_bytes();
        let matrix = |_| -> Result<Apply> {
            let w = weight.to_dtype(dtype)?.copy()?;
            Ok(Box::new(move |x: &Tensor| {
                x.to_dtype(w.dtype())?.matmul(&w.t()?)
            }))
        };
        let decode = copies(bytes, &matrix)?;
        let prompt = copies(usize::MAX, &matrix)?;
        let (decode_us, prompt_us) = (time(&decode, &decode_x), time(&prompt, &prompt_x));
        for (shape, us) in [("decode", decode_us), ("prompt", prompt_us)] {
            rows.push(Row {
                weights: format!("{dtype:?}"),
                shape,
                bytes,
                candle_us: us,
                odmoe_us: us,
                kernel: false,
            });
        }
    }
    for ggml in quantized::TYPES {
        let quantized = QTensor::quantize(&weight, ggml)?;
        let data = quantized.data()?.into_owned();
        let bytes = data.len();
        let stored = || -> Result<QMatMul> {
            let copy = qtensor_from_ggml(ggml, &data, vec![ROWS, COLS], &device)?;
            Ok(QMatMul::from_qtensor(copy)?)
        };
        let candle = |_| Ok(through_candle(stored()?));
        let odmoe = |_| Ok(through_odmoe(stored()?));
        let kernel = quantized::eligible(&stored()?, &decode_x).is_some();
        for (shape, x, budget) in [
            ("decode", &decode_x, bytes),
            ("prompt", &prompt_x, usize::MAX),
        ] {
            let candle_us = time(&copies(budget, &candle)?, x);
            let odmoe_us = time(&copies(budget, &odmoe)?, x);
            rows.push(Row {
                weights: format!("{ggml:?}"),
                shape,
                bytes,
                candle_us,
                odmoe_us,
                kernel,
            });
        }
    }
    rows.extend(mxfp4_rows(&weight, &decode_x, &prompt_x)?);
    let isa = quantized::isa().map_or("none (candle's products only)".to_string(), |isa| {
        isa.to_string()
    });
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "weights": r.weights, "shape": r.shape, "bytes": r.bytes,
                    "candle_us": r.candle_us, "odmoe_us": r.odmoe_us, "odmoe_kernel": r.kernel,
                    "candle_gbps": gbps(r.bytes as u64, r.candle_us / 1e6),
                    "odmoe_gbps": gbps(r.bytes as u64, r.odmoe_us / 1e6),
                })
            })
            .collect();
        let out = json!({
            "matrix": [ROWS, COLS], "prompt_tokens": prompt_x.dims()[0],
            "instruction_set": isa, "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{ROWS} x {COLS} projection; decode: 1 token, weights from memory; prompt: {} tokens. \
         odmoe's kernels: {isa}.",
        prompt_x.dims()[0]
    );
    println!(
        "| weights | shape | candle us | odmoe us | candle GB/s | odmoe GB/s | odmoe speed-up |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let odmoe = if r.kernel { "" } else { " (candle's)" };
        println!(
            "| {} | {} | {:.0} | {:.0}{odmoe} | {:.2} | {:.2} | {:.2}x |",
            r.weights,
            r.shape,
            r.candle_us,
            r.odmoe_us,
            gbps(r.bytes as u64, r.candle_us / 1e6),
            gbps(r.bytes as u64, r.odmoe_us / 1e6),
            r.candle_us / r.odmoe_us
        );
    }
    Ok(())
}

/// MXFP4 (gpt-oss's experts): odmoe's kernel on the blocks as a file stores them; candle has no
/// MXFP4, so its column is its Q8_0 product on the Q8_0 blocks of the same values (twice the
/// bytes), both at the rate of the MXFP4 bytes. A checkpoint's MXFP4, multiplied by f32
/// activations at exact values, against candle's f32 product of the values widened. And the
/// conversion to Q8_0 blocks (`convert`), which a device without the kernels pays on every read.
fn mxfp4_rows(weight: &Tensor, decode_x: &Tensor, prompt_x: &Tensor) -> Result<Vec<Row>> {
    let blocks = mxfp4::quantize(&weight.flatten_all()?.to_vec1::<f32>()?);
    let bytes = blocks.len();
    let started = Instant::now();
    let mut converted = 0;
    while started.elapsed() < MEASURE {
        std::hint::black_box(mxfp4::to_q8_0(&blocks).map_err(anyhow::Error::msg)?);
        converted += 1;
    }
    let convert_us = started.elapsed().as_secs_f64() * 1e6 / converted as f64;
    let held = mxfp4::to_q8_0(&blocks).map_err(anyhow::Error::msg)?;
    let candle = |_| -> Result<Apply> {
        let copy = qtensor_from_ggml(GgmlDType::Q8_0, &held, vec![ROWS, COLS], &Device::Cpu)?;
        Ok(through_candle(QMatMul::from_qtensor(copy)?))
    };
    let kernel = Matrix::keeps_mxfp4(&Device::Cpu);
    let odmoe = |_| -> Result<Apply> {
        if !kernel {
            return candle(0);
        }
        let m = Matrix::mxfp4(blocks.clone(), [ROWS, COLS])
            .ok_or_else(|| anyhow::anyhow!("MXFP4 blocks of a {ROWS} x {COLS} matrix"))?;
        Ok(Box::new(move |x: &Tensor| {
            m.forward(x)
                .map_err(|error| candle_core::Error::Msg(error.to_string()))
        }))
    };
    let mut rows = vec![Row {
        weights: "MXFP4 to Q8_0".into(),
        shape: "convert",
        bytes,
        candle_us: convert_us,
        odmoe_us: convert_us,
        kernel: true,
    }];
    // A checkpoint's MXFP4 (gpt-oss's Hugging Face files) multiplies f32 activations at the
    // weights' exact values; candle's column is its f32 product on the same values widened.
    let values = Matrix::mxfp4_values(blocks.clone(), [ROWS, COLS])
        .ok_or_else(|| anyhow::anyhow!("MXFP4 blocks of a {ROWS} x {COLS} matrix"))?;
    let widened = |_| -> Result<Apply> {
        let w = Tensor::from_vec(values.clone(), (ROWS, COLS), &Device::Cpu)?;
        Ok(Box::new(move |x: &Tensor| x.matmul(&w.t()?)))
    };
    let exact = |_| -> Result<Apply> {
        let m = Matrix::exact_mxfp4(blocks.clone(), [ROWS, COLS])
            .ok_or_else(|| anyhow::anyhow!("MXFP4 blocks of a {ROWS} x {COLS} matrix"))?;
        Ok(Box::new(move |x: &Tensor| {
            m.forward(x)
                .map_err(|error| candle_core::Error::Msg(error.to_string()))
        }))
    };
    for (shape, x, budget) in [
        ("decode", decode_x, bytes),
        ("prompt", prompt_x, usize::MAX),
    ] {
        rows.push(Row {
            weights: "MXFP4".into(),
            shape,
            bytes,
            candle_us: time(&copies(budget, &candle)?, x),
            odmoe_us: time(&copies(budget, &odmoe)?, x),
            kernel,
        });
        rows.push(Row {
            weights: "MXFP4, f32 activations".into(),
            shape,
            bytes,
            candle_us: time(&copies(budget, &widened)?, x),
            odmoe_us: time(&copies(budget, &exact)?, x),
            kernel: true,
        });
    }
    Ok(rows)
}

/// `m`'s product through candle.
fn through_candle(m: QMatMul) -> Apply {
    Box::new(move |x: &Tensor| m.forward(x))
}

/// `m`'s product as odmoe computes it (its kernels where they take the type).
fn through_odmoe(m: QMatMul) -> Apply {
    let p = Projection::new(m, None);
    Box::new(move |x: &Tensor| {
        p.forward(x)
            .map_err(|error| candle_core::Error::Msg(error.to_string()))
    })
}

/// Copies of a matrix of `bytes` bytes worth [`DECODE_BYTES`] (one if `bytes` is `usize::MAX`).
fn copies(bytes: usize, make: &dyn Fn(usize) -> Result<Apply>) -> Result<Vec<Apply>> {
    let count = if bytes == usize::MAX {
        1
    } else {
        (DECODE_BYTES / bytes).max(1)
    };
    (0..count).map(make).collect()
}

/// Microseconds per call of the matrices, in turn, on `x`: after one warm-up pass, at least
/// [`MEASURE`] and two passes over all copies.
fn time(matrices: &[Apply], x: &Tensor) -> f64 {
    for apply in matrices {
        std::hint::black_box(apply(x).expect("a product of matching shapes"));
    }
    let started = Instant::now();
    let mut calls = 0usize;
    while started.elapsed() < MEASURE || calls < 2 * matrices.len() {
        let apply = &matrices[calls % matrices.len()];
        std::hint::black_box(apply(x).expect("a product of matching shapes"));
        calls += 1;
    }
    started.elapsed().as_secs_f64() * 1e6 / calls as f64
}
