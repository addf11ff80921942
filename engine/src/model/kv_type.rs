//! How attention's keys and values are kept in the cache: f32 (exact math), f16 (half of it, as
//! llama.cpp keeps them by default) or Q8_0 rows (per 32 values an f16 scale and 32 signed
//! bytes: 34 bytes where f16 takes 64, as llama.cpp's `--cache-type-k q8_0`).
//!
//! Q8_0 rows are kept as bytes (`[heads, positions, row bytes]`, u8) and read by the CPU's
//! attention kernel, which widens them a block at a time; other devices keep f16 or f32.

use std::fmt;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::quantized;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    F32,
    #[default]
    F16,
    Q8_0,
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        })
    }
}

impl std::str::FromStr for KvType {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(Error::InvalidRequest(format!(
                "{other:?}: the KV cache is kept in f16, f32 or q8_0"
            ))),
        }
    }
}

impl KvType {
    /// Bytes a row of `values` keys or values takes.
    pub fn row_bytes(self, values: usize) -> usize {
        match self {
            Self::F32 => 4 * values,
            Self::F16 => 2 * values,
            Self::Q8_0 => quantized::q8_0_bytes(values),
        }
    }

    /// Bytes the cache holds per token for `config`: keys and values of every KV head, or with
    /// latent attention the latent and the shared rotary key (in [`latent_dtype`](Self::latent_dtype)).
    pub fn bytes_per_token(self, config: &ModelConfig) -> usize {
        match config.latent_attention() {
            Some(_) => config.kv_cache_bytes_per_token(self.latent_dtype().size_in_bytes()),
            None => config.num_layers * 2 * config.num_kv_heads * self.row_bytes(config.head_dim),
        }
    }

    /// The type latent attention keeps its latents in: they are not rows of heads, and stay f16
    /// when the cache is quantized.
    pub fn latent_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 | Self::Q8_0 => DType::F16,
        }
    }

    /// Whether a model on `device` with heads of `head_dim` values can keep its cache this way.
    pub fn check(self, device: &Device, head_dim: usize) -> Result<()> {
        if self != Self::Q8_0 {
            return Ok(());
        }
        if !device.is_cpu() {
            return Err(Error::InvalidRequest(
                "a q8_0 KV cache is read by the CPU's attention only: keep it in f16 on this device"
                    .into(),
            ));
        }
        if !head_dim.is_multiple_of(32) {
            return Err(Error::InvalidRequest(format!(
                "a q8_0 KV cache keeps rows of whole 32-value blocks, and heads have {head_dim} values"
            )));
        }
        Ok(())
    }

    /// `rows` `[heads, positions, values]` (f32) as this type keeps them.
    pub fn stored(self, rows: &Tensor) -> Result<Tensor> {
        match self {
            Self::F32 => Ok(rows.to_dtype(DType::F32)?),
            Self::F16 => Ok(rows.to_dtype(DType::F16)?),
            Self::Q8_0 => {
                let (heads, positions, values) = rows.dims3()?;
                self.check(rows.device(), values)?;
                let flat = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut bytes = Vec::new();
                quantized::q8_0_blocks(&flat, &mut bytes);
                let row = self.row_bytes(values);
                Ok(Tensor::from_vec(
                    bytes,
                    (heads, positions, row),
                    rows.device(),
                )?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rows_take_34_bytes_per_32_values_and_round_trip_within_a_step() {
        let rows = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
        let kept = KvType::Q8_0.stored(&rows).unwrap();
        assert_eq!((kept.dims(), kept.dtype()), (&[2, 3, 68][..], DType::U8));
        assert_eq!(crate::kernels::attention::row_values(&kept).unwrap(), 64);
        let bytes = kept.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let values = rows.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (block, values) in bytes.chunks_exact(34).zip(values.chunks_exact(32)) {
            let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            let most = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((scale - most / 127.0).abs() <= most / 127.0 / 1024.0);
            for (&q, &v) in block[2..].iter().zip(values) {
                assert!((q as i8 as f32 * scale - v).abs() <= scale * 0.6, "{v}");
            }
        }
        assert!(KvType::Q8_0.check(&Device::Cpu, 48).is_err());
        assert_eq!("q8_0".parse::<KvType>().unwrap(), KvType::Q8_0);
        assert!("q4_0".parse::<KvType>().is_err());
    }
}
