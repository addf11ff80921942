//! Checkpoint formats the engine reads.

pub mod gguf;
pub mod gguf_header;
pub mod layout;
pub mod mxfp4;
pub mod safetensors;

use candle_core::Tensor;
use candle_core::quantized::QMatMul;

use crate::error::Result;

/// Dense weights by Hugging Face tensor name, whatever file format holds them.
pub trait WeightSource {
    /// Loads `name` as f32, checking that its shape is `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;

    /// Loads the matrix `name` for multiplying: f32 unless the source keeps it in a quantized
    /// type it was stored in.
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.tensor(name, shape)?))
    }
}

impl WeightSource for safetensors::HfWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        safetensors::HfWeights::tensor(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        safetensors::HfWeights::contains(self, name)
    }
}
