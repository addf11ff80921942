//! Multi-head latent attention (MLA, DeepSeek-V3): each token's keys and values are expanded
//! from one latent of `kv_lora_rank` by `kv_b_proj`; a `qk_rope_head_dim` rotary key part is
//! shared by all heads. Queries come straight from the hidden state or through a low-rank
//! `q_lora_rank` bottleneck. The rotary part uses YaRN when configured.
//!
//! The KV cache holds only the latent and the rotary key. Long prompts expand them into per-head
//! keys and values as transformers does; short steps (decode) use the absorbed form, folding
//! `kv_b_proj` into the query and the output so the cache is read without expanding.

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module};

use super::layers::{KvCache, QUERY_TILE, Reach, RmsNorm, attend, causal_mask, linear};
use super::rotary::{Rotary, yarn_mscale};
use crate::config::{DeepseekConfig, LatentAttentionConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::format::WeightSource;

/// The epsilon of the query and latent norms inside MLA: transformers builds them with the
/// RMSNorm default, not the config's `rms_norm_eps`.
const LATENT_NORM_EPS: f64 = 1e-6;

/// The DeepSeek-V3 part of `cfg`, which a model with latent attention must have.
pub(super) fn latent_config(
    cfg: &ModelConfig,
) -> Result<(&DeepseekConfig, &LatentAttentionConfig)> {
    let missing =
        || Error::InvalidModel("a DeepSeek-V3 model needs its latent attention config".into());
    let deepseek = cfg.deepseek.as_ref().ok_or_else(missing)?;
    Ok((deepseek, deepseek.attention.as_ref().ok_or_else(missing)?))
}

/// Which form of latent attention a forward pass computes; both give the same result up to
/// rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LatentForm {
    /// Whichever costs fewer multiplications for the step (absorbed for decode, expanded for
    /// long prompts).
    #[default]
    Auto,
    /// Expand the cached latents into per-head keys and values (what transformers computes).
    Expanded,
    /// Fold `kv_b_proj` into the query and output and attend over the latents directly.
    Absorbed,
}

/// How queries are projected: directly, or through a normed low-rank bottleneck.
#[derive(Clone, Debug)]
enum QueryProjection {
    Direct(Linear),
    LowRank {
        down: Linear,
        norm: RmsNorm,
        up: Linear,
    },
}

impl QueryProjection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Direct(q) => q.forward(x)?,
            Self::LowRank { down, norm, up } => up.forward(&norm.forward(&down.forward(x)?)?)?,
        })
    }
}

/// Multi-head latent attention with a latent KV cache.
#[derive(Clone, Debug)]
pub struct LatentAttention {
    query: QueryProjection,
    /// hidden -> latent (`kv_lora_rank`) and rotary key (`qk_rope_head_dim`).
    kv_down: Linear,
    latent_norm: RmsNorm,
    /// The rows of `kv_b_proj` that make keys without positions, head by head:
    /// `[heads * qk_nope_head_dim, kv_lora_rank]`.
    k_up: Tensor,
    /// The rows of `kv_b_proj` that make values, head by head: `[heads * v_head_dim, kv_lora_rank]`.
    v_up: Tensor,
    o: Linear,
    num_heads: usize,
    nope_dim: usize,
    rope_dim: usize,
    v_dim: usize,
    kv_lora_rank: usize,
    rotary: Rotary,
    rope_interleaved: bool,
    /// Multiplies query-key products: 1/sqrt(query head width), times YaRN's mscale squared.
    softmax_scale: f64,
    pub form: LatentForm,
    /// The type computed in from the cached latents to each head's attended value (the
    /// `kv_b_proj` products, scores, softmax and sums); the cache stays in the model's type, or
    /// f16 when the cache keeps 16-bit keys and values.
    ///
    /// f32 by default. The two forms associate the same sums differently, which in f32 moved the
    /// DeepSeek-V3 fixture's logits by up to 2.1e-5 over 64 decode steps (f32 expanded is itself
    /// 1.5e-5 from the f64 answer); in f64 they agree to the last f32 bit, which is how the test
    /// proves the absorbed algebra exact. f64 is not the default because widening `kv_b_proj`
    /// every step made a decode step's attention 4x slower at DeepSeek-V3 widths (106 against
    /// 26 ms at 1024 cached tokens, 2 cores), and a kept f64 copy would double its memory.
    pub accumulate: DType,
}

impl LatentAttention {
    pub fn load(cfg: &ModelConfig, w: &dyn WeightSource, prefix: &str) -> Result<Self> {
        let (ds, a) = latent_config(cfg)?;
        let (h, nh, p) = (cfg.hidden_size, cfg.num_heads, prefix);
        let (nope, rope, v, rank) = (
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
        );
        let bias = cfg.attention_bias;
        let q_width = nh * (nope + rope);
        let query = match a.q_lora_rank {
            None => QueryProjection::Direct(linear(w, &format!("{p}.q_proj"), q_width, h, false)?),
            Some(q_rank) => QueryProjection::LowRank {
                down: linear(w, &format!("{p}.q_a_proj"), q_rank, h, bias)?,
                norm: RmsNorm::load(w, &format!("{p}.q_a_layernorm"), q_rank, LATENT_NORM_EPS)?,
                up: linear(w, &format!("{p}.q_b_proj"), q_width, q_rank, false)?,
            },
        };
        let kv_up = w
            .tensor(&format!("{p}.kv_b_proj.weight"), &[nh * (nope + v), rank])?
            .reshape((nh, nope + v, rank))?;
        let rotary = match &ds.yarn {
            Some(yarn) => Rotary::yarn(rope, cfg.rope_theta, yarn),
            None => Rotary::new(rope, cfg.rope_theta),
        };
        let mut softmax_scale = 1.0 / ((nope + rope) as f64).sqrt();
        if let Some(yarn) = &ds.yarn
            && let Some(all_dim) = yarn.mscale_all_dim.filter(|&m| m != 0.0)
        {
            let m = yarn_mscale(yarn.factor, all_dim);
            softmax_scale *= m * m;
        }
        Ok(Self {
            query,
            kv_down: linear(w, &format!("{p}.kv_a_proj_with_mqa"), rank + rope, h, bias)?,
            latent_norm: RmsNorm::load(w, &format!("{p}.kv_a_layernorm"), rank, LATENT_NORM_EPS)?,
            k_up: kv_up
                .narrow(1, 0, nope)?
                .contiguous()?
                .reshape((nh * nope, rank))?,
            v_up: kv_up
                .narrow(1, nope, v)?
                .contiguous()?
                .reshape((nh * v, rank))?,
            o: linear(w, &format!("{p}.o_proj"), h, nh * v, bias)?,
            num_heads: nh,
            nope_dim: nope,
            rope_dim: rope,
            v_dim: v,
            kv_lora_rank: rank,
            rotary,
            rope_interleaved: cfg.rope_interleaved,
            softmax_scale,
            form: LatentForm::Auto,
            accumulate: DType::F32,
        })
    }

    /// Widens `x` to the type attention sums in.
    fn wide(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.accumulate)?)
    }

    /// Attends `x` `[T, hidden]` at positions `offset..` to itself and the cached past, caching
    /// its latents.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        offset: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (nh, nope, rope) = (self.num_heads, self.nope_dim, self.rope_dim);
        let q = self
            .query
            .forward(x)?
            .reshape((t, nh, nope + rope))?
            .transpose(0, 1)?; // [nh, T, nope + rope]
        let q_nope = q.narrow(2, 0, nope)?.contiguous()?;
        let compressed = self.kv_down.forward(x)?;
        let latent = self
            .latent_norm
            .forward(&compressed.narrow(1, 0, self.kv_lora_rank)?)?;
        let k_rot = compressed.narrow(1, self.kv_lora_rank, rope)?;

        let (cos, sin) = self.rotary.tables(offset, t, x.device())?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?.unsqueeze(0)?;
            let rotated = if self.rope_interleaved {
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope(&x, &cos, &sin)?
            };
            Ok(rotated.squeeze(0)?)
        };
        // Interleaved pairs stay interleaved here (transformers lists the rotated pairs' first
        // halves, then their second halves): queries and keys share the order, so their products
        // are the same.
        let q_rot = rotate(&q.narrow(2, nope, rope)?)?; // [nh, T, rope]
        let k_rot = rotate(&k_rot.unsqueeze(0)?)?; // [1, T, rope]

        // Kept in f16 when the cache keeps 16-bit keys and values (odmoe's and odmoed's
        // default), half the memory of f32; read back widened to the type attention sums in.
        let in_halves = cache.kind().latent_dtype() == DType::F16;
        let kept = |x: Tensor| -> Result<Tensor> {
            Ok(if in_halves {
                x.to_dtype(DType::F16)?
            } else {
                x
            })
        };
        let (latents, rot_keys) = cache.append(layer, kept(latent.unsqueeze(0)?)?, kept(k_rot)?)?;
        let (latents, rot_keys) = (latents.squeeze(0)?, rot_keys.squeeze(0)?); // [S, rank], [S, rope]
        let s = latents.dim(0)?;
        let absorbed = match self.form {
            LatentForm::Absorbed => true,
            LatentForm::Expanded => false,
            LatentForm::Auto => self.absorbed_is_cheaper(t, s),
        };
        let out = if absorbed {
            let mask = (t > 1)
                .then(|| causal_mask(t, offset, 0, s, None, x.device()))
                .transpose()?;
            self.attend_absorbed(&q_nope, &q_rot, &latents, &rot_keys, mask.as_ref())?
        } else {
            self.attend_expanded(&q_nope, &q_rot, &latents, &rot_keys, offset)?
        }; // [nh, T, v]
        let out = out.transpose(0, 1)?.reshape((t, nh * self.v_dim))?;
        Ok(self.o.forward(&out)?)
    }

    /// Multiplications of each form for `t` queries over `s` cached positions, per head.
    fn absorbed_is_cheaper(&self, t: usize, s: usize) -> bool {
        let (rank, nope, rope, v) = (self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim);
        let expanded = s * rank * (nope + v) + t * s * (nope + rope + v);
        let absorbed = t * rank * (nope + v) + t * s * (2 * rank + rope);
        absorbed < expanded
    }

    fn softmax(&self, scores: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut scores = scores.affine(self.softmax_scale, 0.0)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        }
        Ok(candle_nn::ops::softmax_last_dim(&scores)?)
    }

    /// Per-head keys and values expanded from every cached latent, then plain attention in
    /// tiles of queries (the form long prompts take).
    fn attend_expanded(
        &self,
        q_nope: &Tensor,
        q_rot: &Tensor,
        latents: &Tensor,
        rot_keys: &Tensor,
        offset: usize,
    ) -> Result<Tensor> {
        let (nh, nope, rope) = (self.num_heads, self.nope_dim, self.rope_dim);
        let s = latents.dim(0)?;
        let dtype = q_nope.dtype();
        let (q_nope, q_rot, latents, rot_keys) = (
            self.wide(q_nope)?,
            self.wide(q_rot)?,
            self.wide(latents)?,
            self.wide(rot_keys)?,
        );
        let per_head = |up: &Tensor, width: usize| -> Result<Tensor> {
            Ok(latents
                .matmul(&self.wide(up)?.t()?)?
                .reshape((s, nh, width))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let k_nope = per_head(&self.k_up, nope)?;
        let values = per_head(&self.v_up, self.v_dim)?;
        let k_rot = rot_keys.unsqueeze(0)?.broadcast_as((nh, s, rope))?;
        let keys = Tensor::cat(&[&k_nope, &k_rot], 2)?;
        let queries = Tensor::cat(&[&q_nope, &q_rot], 2)?;
        let scale = self.softmax_scale;
        let out = attend(
            &queries,
            &keys,
            &values,
            offset,
            Reach::default(),
            scale,
            QUERY_TILE,
        )?;
        Ok(out.to_dtype(dtype)?)
    }

    /// Attention over the latents themselves: each head's query is carried into latent space
    /// by its key rows of `kv_b_proj`, and the attended latent out of it by its value rows.
    fn attend_absorbed(
        &self,
        q_nope: &Tensor,
        q_rot: &Tensor,
        latents: &Tensor,
        rot_keys: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (nh, rank) = (self.num_heads, self.kv_lora_rank);
        let (t, s) = (q_nope.dim(1)?, latents.dim(0)?);
        let k_up = self.wide(&self.k_up)?.reshape((nh, self.nope_dim, rank))?;
        let q_latent = self.wide(q_nope)?.matmul(&k_up)?.reshape((nh * t, rank))?;
        let latents = self.wide(latents)?;
        let q_rot = self.wide(&q_rot.reshape((nh * t, self.rope_dim))?)?;
        let scores = (q_latent.matmul(&latents.t()?)?
            + q_rot.matmul(&self.wide(rot_keys)?.t()?)?)?
        .reshape((nh, t, s))?;
        let probs = self.softmax(scores, mask)?;
        let attended = probs
            .reshape((nh * t, s))?
            .matmul(&latents)?
            .reshape((nh, t, rank))?;
        let v_up = self.wide(&self.v_up)?.reshape((nh, self.v_dim, rank))?;
        Ok(attended.matmul(&v_up.t()?)?.to_dtype(q_nope.dtype())?)
    }
}
