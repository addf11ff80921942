//! Matrix products in the weights' stored type: candle's, or odmoe's own kernels where they are
//! faster (the 32-value block types on x86-64). Kernels sit below the models: they know tensors and blocks, never
//! layers or architectures.

pub mod attention;
pub mod exact_mxfp4;
pub mod quantized;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;

/// `f(0)`, ..., `f(n - 1)` computed over candle's thread pool, returned in order.
pub(crate) fn on_pool<T: Send + Sync>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<std::sync::OnceLock<T>> = (0..n).map(|_| std::sync::OnceLock::new()).collect();
    candle_core::utils::barrier_pool().execute_chunked(n, |items| {
        for i in items {
            let _ = slots[i].set(f(i));
        }
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("every item computed"))
        .collect()
}

/// A weight matrix: candle's (f32, or GGUF blocks candle multiplies in their stored type), or
/// blocks only these kernels multiply: MXFP4, which candle does not have, or an expert's blocks
/// held in the buffer they were read into.
#[derive(Clone, Debug)]
pub enum Matrix {
    Candle(QMatMul),
    /// Multiplied by the quantized kernels, activations quantized as llama.cpp quantizes them.
    Blocks(quantized::BlockMatrix),
    /// MXFP4 multiplied by f32 activations at every weight's exact value (see [`exact_mxfp4`]).
    ExactMxfp4(quantized::BlockMatrix),
}

impl Matrix {
    /// MXFP4 blocks `[rows, cols]` as they are stored, if they are whole rows of whole blocks.
    pub fn mxfp4(blocks: Vec<u8>, shape: [usize; 2]) -> Option<Self> {
        mxfp4_blocks(blocks, shape).map(Self::Blocks)
    }

    /// MXFP4 blocks `[rows, cols]` multiplied at their exact values by f32 activations, if they
    /// are whole rows of whole blocks.
    pub fn exact_mxfp4(blocks: Vec<u8>, shape: [usize; 2]) -> Option<Self> {
        mxfp4_blocks(blocks, shape).map(Self::ExactMxfp4)
    }

    /// The exact values of MXFP4 `blocks` forming a matrix `[rows, cols]`, in f32 (see
    /// [`exact_mxfp4::widened`]), or `None` when they do not form it: what a device without
    /// these kernels multiplies.
    pub fn mxfp4_values(blocks: Vec<u8>, shape: [usize; 2]) -> Option<Vec<f32>> {
        mxfp4_blocks(blocks, shape).map(|w| exact_mxfp4::widened(&w))
    }

    /// Blocks `[rows, cols]` in `format`, held as they are for these kernels to multiply, if they
    /// are whole rows of that matrix. Only where the kernels run ([`Matrix::kernels_on`]).
    pub fn blocks(
        format: quantized::Format,
        blocks: quantized::BlockBytes,
        shape: [usize; 2],
    ) -> Option<Self> {
        block_matrix(format, blocks, shape).map(Self::Blocks)
    }

    /// Whether these kernels multiply matrices on `device`: the CPU, with their instructions.
    pub fn kernels_on(device: &Device) -> bool {
        device.is_cpu() && quantized::available()
    }

    /// Whether MXFP4 blocks are held as they are on `device`: where these kernels multiply them.
    /// Elsewhere candle multiplies them as Q8_0 blocks of the same values, at twice the bytes.
    pub fn keeps_mxfp4(device: &Device) -> bool {
        Self::kernels_on(device)
    }

    /// Whether a checkpoint's MXFP4 blocks are held as they are on `device`, multiplied at their
    /// exact values ([`exact_mxfp4`], plain code any CPU runs); elsewhere as their f32 values.
    pub fn keeps_exact_mxfp4(device: &Device) -> bool {
        device.is_cpu()
    }

    /// `x W^T`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(w) => Ok(w.forward(x)?),
            // Blocks are held only where the kernels run; they take f32 rows.
            Self::Blocks(w) => Ok(quantized::forward(&[w.weight()], &x.to_dtype(DType::F32)?)?
                .remove(0)
                .to_dtype(x.dtype())?),
            Self::ExactMxfp4(w) if x.elem_count() / w.dims()[1] >= exact_mxfp4::WIDEN_FROM => {
                let widened =
                    Tensor::from_vec(exact_mxfp4::widened(w), w.dims().to_vec(), x.device())?;
                Ok(x.to_dtype(DType::F32)?
                    .broadcast_matmul(&widened.t()?)?
                    .to_dtype(x.dtype())?)
            }
            Self::ExactMxfp4(w) => {
                let rows = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let out = exact_mxfp4::product(w, &rows);
                let mut dims = x.dims().to_vec();
                *dims
                    .last_mut()
                    .expect("a matrix input has a last dimension") = w.dims()[0];
                Ok(Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?)
            }
        }
    }

    /// The matrix as the kernels take it with input `x`, if they do.
    pub fn kernel_weight(&self, x: &Tensor) -> Option<quantized::Weight<'_>> {
        match self {
            Self::Candle(w) => quantized::eligible(w, x),
            Self::Blocks(w) => quantized::takes(x).then(|| w.weight()),
            Self::ExactMxfp4(_) => None,
        }
    }

    /// Bytes held, as stored in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            Self::Blocks(w) | Self::ExactMxfp4(w) => w.bytes(),
        }
    }
}

/// MXFP4 blocks `[rows, cols]` as a matrix, if they are whole rows of whole blocks.
fn mxfp4_blocks(blocks: Vec<u8>, shape: [usize; 2]) -> Option<quantized::BlockMatrix> {
    block_matrix(quantized::Format::Mxfp4, blocks.into(), shape)
}

/// Blocks in `format` as a `[rows, cols]` matrix, if they are whole rows of whole blocks.
fn block_matrix(
    format: quantized::Format,
    blocks: quantized::BlockBytes,
    [rows, cols]: [usize; 2],
) -> Option<quantized::BlockMatrix> {
    quantized::BlockMatrix::new(format, blocks, cols).filter(|m| m.dims() == [rows, cols])
}

/// A projection `x W^T (+ b)` whose weight is f32 or, from a GGUF file, its stored quantized
/// type: attention and the output head of a large quantized model then take a quarter of the
/// memory and compute from fewer bytes.
#[derive(Clone, Debug)]
pub struct Projection {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Projection {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_all(&[self], x)?.remove(0))
    }

    /// Each projection of `all` applied to the same `x`: when the kernels take them all, `x` is
    /// quantized once and they are computed together.
    pub fn forward_all(all: &[&Self], x: &Tensor) -> Result<Vec<Tensor>> {
        let products = match all
            .iter()
            .map(|p| quantized::eligible(&p.weight, x))
            .collect::<Option<Vec<_>>>()
        {
            Some(weights) => quantized::forward(&weights, x)?,
            None => all
                .iter()
                .map(|p| p.weight.forward(x))
                .collect::<candle_core::Result<_>>()?,
        };
        products
            .into_iter()
            .zip(all)
            .map(|(y, p)| {
                Ok(match &p.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            })
            .collect()
    }
}
