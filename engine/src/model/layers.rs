//! Layers shared by every architecture: RMSNorm, rotary embeddings, grouped-query attention with
//! a KV cache, and loading projections and feed-forwards from a checkpoint.

use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::kv_type::KvType;
pub use super::rotary::Rotary;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::GluMlp;
use crate::format::WeightSource;
use crate::kernels::{Projection, attention};

/// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`) as a linear layer `in -> out`.
pub fn linear(
    w: &dyn WeightSource,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear> {
    let weight = w.tensor(&format!("{prefix}.weight"), &[out, inp])?;
    Ok(Linear::new(weight, load_bias(w, prefix, out, bias)?))
}

/// `{prefix}.bias` of length `out`, when the layer has one.
fn load_bias(w: &dyn WeightSource, prefix: &str, out: usize, bias: bool) -> Result<Option<Tensor>> {
    bias.then(|| w.tensor(&format!("{prefix}.bias"), &[out]))
        .transpose()
}

/// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`) as a projection `in -> out`, in the
/// weights' stored type.
pub fn projection(
    w: &dyn WeightSource,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Projection> {
    Ok(Projection::new(
        w.matrix(&format!("{prefix}.weight"), &[out, inp])?,
        load_bias(w, prefix, out, bias)?,
    ))
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &dyn WeightSource, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(&format!("{name}.weight"), &[size])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// Positions `first..first + len` as a `[len]` u32 tensor on `device`.
pub(crate) fn positions(first: usize, len: usize, device: &Device) -> Result<Tensor> {
    let (start, end) = (u32::try_from(first), u32::try_from(first + len));
    let (Ok(start), Ok(end)) = (start, end) else {
        return Err(crate::error::Error::InvalidRequest(format!(
            "position {} is past the 2^32 a model can attend over",
            first + len
        )));
    };
    Ok(Tensor::arange(start, end, device)?)
}

/// Keys and values of every layer for the positions seen so far.
///
/// Not `Clone`: appending writes into buffers in place, which a copy would share.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions the buffers never grow past (the context length), when known: doubling an
    /// 8,160-position prompt's buffers for its first reply token held 16,320 positions.
    most_positions: Option<usize>,
    /// Positions the buffers take at once when next allocated or grown (see
    /// [`KvCache::reserve`]).
    reserved: usize,
    /// How grouped-query attention stores keys and values (latent attention keeps what it
    /// appends).
    kind: KvType,
}

/// One layer's cache: keys and values shaped `[kv_heads, capacity, head_dim]`, or with latent
/// attention the compressed latent `[1, capacity, kv_lora_rank]` and the rotary key
/// `[1, capacity, qk_rope_head_dim]`, of which the first `len - base` positions are filled with
/// positions `base..len`.
///
/// A step writes only its own positions; the buffers double when full. Concatenating instead
/// copied the whole cache at every step and layer, which grows with the conversation.
///
/// A layer that attends within a sliding window drops the keys no later query can see, a chunk
/// of [`attention::CHUNK`] positions at a time, and its buffers hold little more than the
/// window: gpt-oss's windowed half of the layers would otherwise keep as much as the other at
/// any context length.
#[derive(Debug)]
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
    /// The position of the buffers' first key: 0, or a multiple of [`attention::CHUNK`].
    base: usize,
    /// The layer's sliding window, when it has one.
    window: Option<usize>,
}

/// Positions a layer's buffers first hold.
const INITIAL_POSITIONS: usize = 256;

impl LayerCache {
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys.narrow(1, 0, self.kept())?,
            self.values.narrow(1, 0, self.kept())?,
        ))
    }

    /// Positions the buffers hold.
    fn kept(&self) -> usize {
        self.len - self.base
    }

    /// The first position a query at `position` sees.
    fn first_seen(&self, position: usize) -> usize {
        self.window.map_or(0, |w| (position + 1).saturating_sub(w))
    }

    /// Drops the keys before the chunk holding the first one a query at `len` (the next) sees.
    /// Whole chunks go, so that the kept keys fall into the attention kernel's chunks as they
    /// did and its sums keep their bits.
    fn drop_unseen(&mut self) -> Result<()> {
        let base = self.first_seen(self.len) / attention::CHUNK * attention::CHUNK;
        if base <= self.base {
            return Ok(());
        }
        let (from, kept) = (base - self.base, self.len - base);
        for buffer in [&self.keys, &self.values] {
            let tail = buffer.narrow(1, from, kept)?.contiguous()?;
            buffer.slice_set(&tail, 1, 0)?;
        }
        self.base = base;
        Ok(())
    }

    /// Buffers for `capacity` positions, shaped like `k` and `v`, holding the filled positions of
    /// `old`, if any.
    fn with_capacity(old: Option<&Self>, k: &Tensor, v: &Tensor, capacity: usize) -> Result<Self> {
        let buffer = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[1] = capacity;
            Ok(Tensor::zeros(dims, t.dtype(), t.device())?)
        };
        let grown = Self {
            keys: buffer(k)?,
            values: buffer(v)?,
            len: old.map_or(0, |o| o.len),
            base: old.map_or(0, |o| o.base),
            window: old.and_then(|o| o.window),
        };
        if let Some(old) = old {
            let (keys, values) = old.filled()?;
            grown.keys.slice_set(&keys.contiguous()?, 1, 0)?;
            grown.values.slice_set(&values.contiguous()?, 1, 0)?;
        }
        Ok(grown)
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            most_positions: None,
            reserved: 0,
            kind: KvType::F32,
        }
    }

    /// Makes the buffers hold at least `positions` when they are next allocated or grown: a
    /// sequence whose length is known (a prompt and its most tokens) then never grows them
    /// again, and never holds a full old buffer beside a larger new one while it copies. At
    /// 32K tokens the cache is hundreds of megabytes; doubling it took three times that.
    pub fn reserve(&mut self, positions: usize) {
        self.reserved = self.reserved.max(positions);
    }

    /// This cache, grouped-query attention's keys and values kept as `kind`.
    pub fn with_kind(mut self, kind: KvType) -> Self {
        self.kind = kind;
        self
    }

    /// How grouped-query attention keeps keys and values.
    pub fn kind(&self) -> KvType {
        self.kind
    }

    /// This cache, its buffers growing to at most `positions` (more only if asked to hold more).
    pub fn with_most_positions(mut self, positions: usize) -> Self {
        self.most_positions = Some(positions);
        self
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The longest of the first `len` positions this cache can go on from: `len`, or none when
    /// a windowed layer has dropped keys a query at `len` would see.
    pub fn reusable(&self, len: usize) -> usize {
        let kept = |cache: &LayerCache| cache.first_seen(len.min(cache.len)) >= cache.base;
        match self.layers.iter().flatten().all(kept) {
            true => len,
            false => 0,
        }
    }

    /// Keeps only the first `len` positions, so a conversation can continue from a shared
    /// prefix; `len` must be [`reusable`](Self::reusable).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > 0 && self.reusable(len) != len {
            return Err(Error::InvalidRequest(format!(
                "the cache cannot go on from position {len}: a sliding-window layer dropped keys \
                 before it"
            )));
        }
        for layer in &mut self.layers {
            if len == 0 {
                *layer = None;
            } else if let Some(cache) = layer {
                cache.len = cache.len.min(len);
            }
        }
        Ok(())
    }

    /// Bytes of the cached positions' keys and values (the buffers hold up to twice that while
    /// they grow).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let per_position = (l.keys.elem_count() + l.values.elem_count())
                    / l.keys.dim(1).unwrap_or(1).max(1);
                l.kept() * per_position * l.keys.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Appends `k` and `v` (positions on dimension 1) to `layer`, returning everything cached.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (keys, values, _) = self.append_in_window(layer, k, v, None)?;
        Ok((keys, values))
    }

    /// [`append`](Self::append) for a layer that attends within `window` positions, when it
    /// has one: returns the keys and values its queries may see (the others are dropped), and
    /// the position of the first.
    pub(crate) fn append_in_window(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
        window: Option<usize>,
    ) -> Result<(Tensor, Tensor, usize)> {
        let new = k.dim(1)?;
        let slot = &mut self.layers[layer];
        if let Some(cache) = slot.as_mut() {
            cache.drop_unseen()?;
        }
        let (kept, capacity) = slot
            .as_ref()
            .map_or((0, 0), |l| (l.kept(), l.keys.dim(1).unwrap_or(0)));
        if kept + new > capacity {
            let doubled = (2 * capacity).max(INITIAL_POSITIONS).max(self.reserved);
            // A windowed layer holds at most its window, the chunk it cannot drop yet and what
            // a step adds.
            let most = match window {
                Some(w) => Some(
                    self.most_positions
                        .unwrap_or(usize::MAX)
                        .min(w + attention::CHUNK + new),
                ),
                None => self.most_positions,
            };
            let capacity = (kept + new).max(most.map_or(doubled, |most| doubled.min(most)));
            *slot = Some(LayerCache::with_capacity(slot.as_ref(), &k, &v, capacity)?);
        }
        let cache = slot.as_mut().expect("allocated above");
        cache.window = window;
        cache.keys.slice_set(&k.contiguous()?, 1, cache.kept())?;
        cache.values.slice_set(&v.contiguous()?, 1, cache.kept())?;
        cache.len += new;
        let (keys, values) = cache.filled()?;
        Ok((keys, values, cache.base))
    }
}

/// Grouped-query attention with rotary positions, optional qkv bias and optional q/k norms.
#[derive(Clone, Debug)]
pub struct Attention {
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
    /// Each query head's sink logit, when the model has them.
    sinks: Option<Vec<f32>>,
    rotary: Rotary,
    /// Rotary applies to each head's first this many dimensions (all of them but in GLM-4.5).
    rotary_dim: usize,
    rope_interleaved: bool,
}

impl Attention {
    /// Loads layer `layer`'s `{prefix}.{q,k,v,o}_proj` (and `q_norm`/`k_norm`, `sinks` when the
    /// config has them).
    pub fn load(
        cfg: &ModelConfig,
        w: &dyn WeightSource,
        layer: usize,
        prefix: &str,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let p = prefix;
        let rotary_dim = cfg.rotary_dim.unwrap_or(d);
        let sinks = cfg
            .attention_sinks
            .then(|| -> Result<Vec<f32>> {
                Ok(w.tensor(&format!("{p}.sinks"), &[cfg.num_heads])?
                    .to_vec1::<f32>()?)
            })
            .transpose()?;
        let bias = cfg.attention_bias;
        let norm = |n: &str| RmsNorm::load(w, &format!("{p}.{n}"), d, cfg.rms_norm_eps);
        Ok(Self {
            q: projection(w, &format!("{p}.q_proj"), cfg.num_heads * d, h, bias)?,
            k: projection(w, &format!("{p}.k_proj"), cfg.num_kv_heads * d, h, bias)?,
            v: projection(w, &format!("{p}.v_proj"), cfg.num_kv_heads * d, h, bias)?,
            o: projection(
                w,
                &format!("{p}.o_proj"),
                h,
                cfg.num_heads * d,
                cfg.attention_output_bias,
            )?,
            q_norm: cfg.qk_norm.then(|| norm("q_norm")).transpose()?,
            k_norm: cfg.qk_norm.then(|| norm("k_norm")).transpose()?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            sliding_window: cfg.sliding_window_of(layer),
            sinks,
            rotary: match &cfg.rope_yarn {
                Some(yarn) => Rotary::yarn(rotary_dim, cfg.rope_theta, yarn),
                None => Rotary::new(rotary_dim, cfg.rope_theta),
            },
            rotary_dim,
            rope_interleaved: cfg.rope_interleaved,
        })
    }

    /// Attends `x` `[T, hidden]` at positions `cache.len()..` to itself and the cached past.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        offset: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] = Projection::forward_all(&[&self.q, &self.k, &self.v], x)?
            .try_into()
            .expect("three projections");
        let mut q = q.reshape((t, nh, d))?;
        let mut k = k.reshape((t, nkv, d))?;
        let v = v.reshape((t, nkv, d))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (cos, sin) = self.rotary.tables(offset, t, x.device())?;
        let rope = |x: &Tensor| -> Result<Tensor> {
            Ok(if self.rope_interleaved {
                candle_nn::rotary_emb::rope_i(x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope(x, &cos, &sin)?
            })
        };
        let rotate = |x: Tensor| -> Result<Tensor> {
            let x = x.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
            let r = self.rotary_dim;
            let rotated = if r == d {
                rope(&x)?
            } else {
                // Partial rotary: the first `r` dimensions turn, the rest pass through.
                let turned = rope(&x.narrow(3, 0, r)?.contiguous()?)?;
                Tensor::cat(&[&turned, &x.narrow(3, r, d - r)?], 3)?
            };
            Ok(rotated.squeeze(0)?)
        };
        let q = rotate(q)?;
        let k = rotate(k)?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let kind = cache.kind();
        let window = self.sliding_window;
        let (k, v, first) =
            cache.append_in_window(layer, kind.stored(&k)?, kind.stored(&v)?, window)?;
        let scale = 1.0 / (d as f64).sqrt();
        let reach = Reach {
            window,
            sinks: self.sinks.as_deref(),
        };
        // Attention sees only positions' differences: counted from the first key kept, it is
        // the same.
        let out = attend(&q, &k, &v, offset - first, reach, scale, QUERY_TILE)?;
        let out = out.transpose(0, 1)?.reshape((t, nh * d))?;
        self.o.forward(&out)
    }
}

/// Queries attend in tiles of this many positions: scores and masks are `[heads, tile, keys]`
/// rather than `[heads, T, S]`, so a long prompt's attention takes memory linear in its length,
/// and each tile multiplies only the keys it can see (about half of a prompt's, causally).
pub(crate) const QUERY_TILE: usize = 256;

/// Grouped-query attention of `q` `[heads, T, d]` at positions `offset..` over `k` and `v`
/// `[kv_heads, S, dv]` (positions `0..S`), causal and within `window` when there is one;
/// returns `[heads, T, dv]` in the type of the scores. On the CPU in f32, the online-softmax
/// kernel; elsewhere candle's products in tiles of `tile` queries.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    reach: Reach,
    scale: f64,
    tile: usize,
) -> Result<Tensor> {
    if attention::takes(q, k, v) {
        return attention::attend(q, k, v, offset, reach.window, reach.sinks, scale as f32);
    }
    let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
    attend_in_tiles(q, &k, &v, offset, reach, scale, tile)
}

/// Which keys a query sees besides the causal limit, and what else joins its softmax.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Reach<'a> {
    /// Only the last this many positions (its own included).
    pub window: Option<usize>,
    /// Per query head, a logit that joins the softmax with no value (gpt-oss): the weights of
    /// the keys sum to less than one.
    pub sinks: Option<&'a [f32]>,
}

/// [`attend`] through candle's products, queries in tiles of `tile` (a prompt of at most
/// `tile` tokens is one tile): scores and masks are `[heads, tile, keys]`.
pub(crate) fn attend_in_tiles(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    reach: Reach,
    scale: f64,
    tile: usize,
) -> Result<Tensor> {
    let window = reach.window;
    let (nh, t, d) = q.dims3()?;
    let (nkv, dv) = (k.dim(0)?, v.dim(2)?);
    let rep = nh / nkv;
    // Query heads kv*rep..(kv+1)*rep share key head kv: stacking their rows multiplies each key
    // head once, where repeating the keys per query head would copy the cache.
    let q = q.reshape((nkv, rep, t, d))?;
    // One more column of every tile's softmax, taken to the device once.
    let sinks = match reach.sinks {
        Some(sinks) => {
            Some(Tensor::from_slice(sinks, (nh, 1, 1), q.device())?.to_dtype(q.dtype())?)
        }
        None => None,
    };
    let mut tiles = Vec::with_capacity(t.div_ceil(tile));
    for start in (0..t).step_by(tile) {
        let len = tile.min(t - start);
        let first = offset + start;
        // The keys some query of the tile sees: none after its last position, none before the
        // window of its first.
        let key_start = window.map_or(0, |w| (first + 1).saturating_sub(w));
        let keys = first + len - key_start;
        let q = q
            .narrow(2, start, len)?
            .contiguous()?
            .reshape((nkv, rep * len, d))?;
        let (k, v) = (k.narrow(1, key_start, keys)?, v.narrow(1, key_start, keys)?);
        let scores = (q.matmul(&k.t()?)? * scale)?.reshape((nh, len, keys))?;
        // A query alone sees every key taken for it: it needs no mask.
        let scores = if len > 1 {
            let mask = causal_mask(len, first, key_start, keys, window, q.device())?;
            scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?
        } else {
            scores
        };
        let probs = match &sinks {
            // The sink is one more column of the softmax, dropped after it.
            Some(sinks) => {
                let sinks = sinks.broadcast_as((nh, len, 1))?;
                let with_sinks = Tensor::cat(&[&scores, &sinks], 2)?.contiguous()?;
                candle_nn::ops::softmax_last_dim(&with_sinks)?.narrow(2, 0, keys)?
            }
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let probs = probs.contiguous()?.reshape((nkv, rep * len, keys))?;
        tiles.push(probs.matmul(&v)?.reshape((nh, len, dv))?);
    }
    Ok(Tensor::cat(&tiles, 1)?)
}

/// Additive mask `[queries, keys]` for queries at positions `first..` and keys at positions
/// `key_start..`: a query sees a key at or before its position, and within the sliding window
/// when there is one. Made on `device` from the two position ranges.
pub(crate) fn causal_mask(
    queries: usize,
    first: usize,
    key_start: usize,
    keys: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let at = positions(first, queries, device)?.reshape((queries, 1))?;
    let key_at = positions(key_start, keys, device)?.reshape((1, keys))?;
    let seen = Tensor::zeros((queries, keys), DType::F32, device)?;
    let blocked = seen.affine(1.0, f64::NEG_INFINITY)?;
    let mut mask = key_at.broadcast_gt(&at)?.where_cond(&blocked, &seen)?;
    if let Some(window) = sliding_window {
        // Too old: `position >= key + window`.
        let ends = positions(key_start + window, keys, device)?.reshape((1, keys))?;
        mask = at.broadcast_ge(&ends)?.where_cond(&blocked, &mask)?;
    }
    Ok(mask)
}

/// Loads a SwiGLU feed-forward from the three projections named `{gate,up,down}.weight` (shared
/// experts and dense feed-forwards), in the type the source keeps them in: a GGUF file's own
/// quantized type, as llama.cpp computes them, else f32. Widened to f32 they took four times the
/// memory of a Q8_0 file's and most of a prompt's time in f32 products.
pub fn glu_mlp(
    w: &dyn WeightSource,
    [gate, up, down]: [&str; 3],
    hidden: usize,
    intermediate: usize,
) -> Result<GluMlp> {
    Ok(GluMlp::from_candle(
        w.matrix(&format!("{gate}.weight"), &[intermediate, hidden])?,
        w.matrix(&format!("{up}.weight"), &[intermediate, hidden])?,
        w.matrix(&format!("{down}.weight"), &[hidden, intermediate])?,
    ))
}

/// Converts logits or hidden states to plain f32 rows for sampling and inspection.
pub fn to_f32_rows(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(x.to_dtype(DType::F32)?.to_vec2()?)
}

/// Index of the largest value (first on ties), as greedy decoding uses.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Attention in tiles equals attention in one piece: the same keys seen, causally and in
    /// the window, whichever tile a query falls in.
    #[test]
    fn tiled_attention_equals_one_piece() {
        let device = Device::Cpu;
        let (nh, nkv, d, t, offset) = (6, 2, 16, 300, 37);
        let s = offset + t;
        let q = Tensor::randn(0f32, 1.0, (nh, t, d), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (nkv, s, d), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (nkv, s, d), &device).unwrap();
        for window in [None, Some(50), Some(1)] {
            let reach = Reach {
                window,
                sinks: None,
            };
            let whole = attend_in_tiles(&q, &k, &v, offset, reach, 0.25, usize::MAX).unwrap();
            for tile in [1, 64, 128, 299] {
                let tiled = attend_in_tiles(&q, &k, &v, offset, reach, 0.25, tile).unwrap();
                let diff = max_diff(&tiled, &whole);
                assert!(diff < 1e-5, "window {window:?}, tile {tile}: {diff}");
            }
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        values(a)
            .iter()
            .zip(values(b))
            .fold(0f32, |most, (x, y)| most.max((x - y).abs()))
    }

    /// The online-softmax kernel equals candle's products in one piece within 1e-5: a prompt,
    /// a prompt after a cached past, a decode step; with and without a window; query heads
    /// sharing key heads; values narrower than keys (latent attention's expanded form); keys
    /// and values read in place from a larger buffer, as the cache holds them.
    #[test]
    fn the_kernel_equals_attention_in_one_piece() {
        let device = Device::Cpu;
        for (nh, nkv, d, dv, t, offset) in [
            (6, 2, 16, 16, 300, 0),
            (9, 3, 64, 64, 70, 130),
            (9, 3, 64, 64, 1, 500),
            (8, 2, 32, 16, 3, 900),
            (4, 4, 24, 16, 33, 7),
        ] {
            let s = offset + t;
            let q = Tensor::randn(0f32, 1.0, (nh, t, d), &device).unwrap();
            let k = Tensor::randn(0f32, 1.0, (nkv, s + 40, d), &device).unwrap();
            let v = Tensor::randn(0f32, 1.0, (nkv, s + 40, dv), &device).unwrap();
            // In Q8_0 rows too where heads are whole blocks (bytes, read in place from the
            // larger buffer like the others).
            let q8 = (d % 32 == 0 && dv % 32 == 0).then(|| {
                let (k8, v8) = (
                    KvType::Q8_0.stored(&k).unwrap().narrow(1, 0, s).unwrap(),
                    KvType::Q8_0.stored(&v).unwrap().narrow(1, 0, s).unwrap(),
                );
                let (k8_as_f32, v8_as_f32) = (q8_0_as_f32(&k8), q8_0_as_f32(&v8));
                (k8, v8, k8_as_f32, v8_as_f32)
            });
            let (k, v) = (k.narrow(1, 0, s).unwrap(), v.narrow(1, 0, s).unwrap());
            assert!(!k.is_contiguous());
            // Kept in f16 as the cache keeps them by default: the kernel reads the halves.
            let (k16, v16) = (
                k.to_dtype(DType::F16).unwrap(),
                v.to_dtype(DType::F16).unwrap(),
            );
            let (k16_as_f32, v16_as_f32) = (
                k16.to_dtype(DType::F32).unwrap(),
                v16.to_dtype(DType::F32).unwrap(),
            );
            let mut cases = vec![
                ((&k, &v), (&k, &v)),
                ((&k16, &v16), (&k16_as_f32, &v16_as_f32)),
            ];
            if let Some((k8, v8, k8_as_f32, v8_as_f32)) = &q8 {
                cases.push(((k8, v8), (k8_as_f32, v8_as_f32)));
            }
            let sinks: Vec<f32> = (0..nh).map(|h| h as f32 * 0.7 - 1.5).collect();
            let reaches = [None, Some(50), Some(1)].into_iter().flat_map(|window| {
                [None, Some(sinks.as_slice())].map(|sinks| Reach { window, sinks })
            });
            for reach in reaches {
                let window = reach.window;
                let sunk = reach.sinks.is_some();
                for &((k, v), (ref_k, ref_v)) in &cases {
                    let whole =
                        attend_in_tiles(&q, ref_k, ref_v, offset, reach, 0.3, usize::MAX).unwrap();
                    let kernel = attend(&q, k, v, offset, reach, 0.3, QUERY_TILE).unwrap();
                    assert_eq!(kernel.dims(), whole.dims());
                    let diff = max_diff(&kernel, &whole);
                    let kind = k.dtype();
                    assert!(
                        diff < 1e-5,
                        "{nh}/{nkv} heads, t {t}, window {window:?}, sinks {sunk}, {kind:?}: {diff}"
                    );
                }
            }
        }
    }

    /// Q8_0 rows `[heads, positions, bytes]` widened to f32 by candle's own GGUF dequantization.
    fn q8_0_as_f32(rows: &Tensor) -> Tensor {
        use candle_core::quantized::{GgmlDType, ggml_file::qtensor_from_ggml};
        let (heads, positions, _) = rows.dims3().unwrap();
        let values = crate::kernels::attention::row_values(rows).unwrap();
        let bytes = rows.contiguous().unwrap().flatten_all().unwrap();
        let bytes = bytes.to_vec1::<u8>().unwrap();
        let q = qtensor_from_ggml(
            GgmlDType::Q8_0,
            &bytes,
            vec![heads * positions, values],
            &Device::Cpu,
        )
        .unwrap();
        let f = q.dequantize(&Device::Cpu).unwrap();
        f.reshape((heads, positions, values)).unwrap()
    }

    /// Appends across the buffers' growth, a truncation and appends after it return exactly the
    /// concatenation of what was appended.
    #[test]
    fn the_cache_returns_what_was_appended_across_growth_and_truncation() {
        let device = Device::Cpu;
        let mut cache = KvCache::new(2);
        let mut expected: Vec<Option<(Tensor, Tensor)>> = vec![None, None];
        let append = |cache: &mut KvCache, expected: &mut Vec<Option<(Tensor, Tensor)>>, n| {
            for (layer, slot) in expected.iter_mut().enumerate() {
                let k = Tensor::randn(0f32, 1.0, (4, n, 8), &device).unwrap();
                let v = Tensor::randn(0f32, 1.0, (4, n, 8), &device).unwrap();
                let (ck, cv) = cache.append(layer, k.clone(), v.clone()).unwrap();
                let merged = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (
                        Tensor::cat(&[&pk, &k], 1).unwrap(),
                        Tensor::cat(&[&pv, &v], 1).unwrap(),
                    ),
                };
                assert_eq!(values(&ck), values(&merged.0));
                assert_eq!(values(&cv), values(&merged.1));
                *slot = Some(merged);
            }
        };
        append(&mut cache, &mut expected, 100);
        for _ in 0..200 {
            append(&mut cache, &mut expected, 1);
        }
        append(&mut cache, &mut expected, 300);
        assert_eq!(cache.len(), 600);
        assert_eq!(cache.bytes(), 2 * 2 * 600 * 4 * 8 * 4);

        cache.truncate(250).unwrap();
        for slot in expected.iter_mut() {
            let (k, v) = slot.take().unwrap();
            *slot = Some((k.narrow(1, 0, 250).unwrap(), v.narrow(1, 0, 250).unwrap()));
        }
        assert_eq!(cache.len(), 250);
        append(&mut cache, &mut expected, 3);

        cache.truncate(0).unwrap();
        assert!(cache.is_empty());
        expected = vec![None, None];
        append(&mut cache, &mut expected, 5);
    }

    /// A windowed layer keeps the keys its next query sees, from the start of their chunk,
    /// in buffers little larger than the window; it can go on only from positions whose window
    /// it kept.
    #[test]
    fn a_windowed_layer_keeps_its_window_and_goes_on_only_from_it() {
        let device = Device::Cpu;
        let (window, chunk) = (100, attention::CHUNK);
        let mut cache = KvCache::new(2);
        cache.reserve(4000);
        let mut all = Vec::new();
        for position in 0..1000usize {
            let k = Tensor::full(position as f32, (2, 1, 1), &device).unwrap();
            all.push(position as f32);
            let (keys, _, first) = cache
                .append_in_window(0, k.clone(), k.clone(), Some(window))
                .unwrap();
            // The first key this position's query sees is kept, from its chunk's start.
            let seen = (position + 1).saturating_sub(window);
            assert_eq!(first, seen / chunk * chunk, "position {position}");
            assert_eq!(
                values(&keys.narrow(0, 0, 1).unwrap()),
                all[first..position + 1]
            );
            cache.append(1, k.clone(), k).unwrap();
        }
        let capacity = |layer: usize| cache.layers[layer].as_ref().unwrap().keys.dim(1).unwrap();
        assert!(capacity(0) <= window + chunk + 1, "{}", capacity(0));
        assert_eq!(capacity(1), 4000, "the other layer keeps every position");
        assert_eq!(cache.len(), 1000);
        // Positions 768.. are kept: a query at 900 sees from 801 on; one at 850, from 751.
        assert_eq!(cache.reusable(900), 900);
        assert_eq!(cache.reusable(850), 0);
        assert!(cache.truncate(850).is_err());
        cache.truncate(900).unwrap();
        let k = Tensor::full(-1f32, (2, 1, 1), &device).unwrap();
        let (keys, _, first) = cache
            .append_in_window(0, k.clone(), k, Some(window))
            .unwrap();
        assert_eq!(first, 768);
        let mut expected = all[768..900].to_vec();
        expected.push(-1.0);
        assert_eq!(values(&keys.narrow(0, 0, 1).unwrap()), expected);
    }

    /// Buffers double as they fill, but not past the most positions the cache was given, unless
    /// asked to hold more.
    #[test]
    fn the_cache_grows_no_further_than_its_most_positions() {
        let device = Device::Cpu;
        let capacity = |cache: &KvCache| cache.layers[0].as_ref().unwrap().keys.dim(1).unwrap();
        let mut cache = KvCache::new(1).with_most_positions(300);
        let append = |cache: &mut KvCache, n| {
            let k = Tensor::zeros((2, n, 4), DType::F32, &device).unwrap();
            cache.append(0, k.clone(), k).unwrap();
        };
        append(&mut cache, 250);
        assert_eq!(capacity(&cache), 256);
        append(&mut cache, 10);
        assert_eq!(capacity(&cache), 300, "doubled to 512 without a limit");
        append(&mut cache, 50);
        assert_eq!(capacity(&cache), 310);

        // A reserved length is allocated at once, within the most positions.
        let mut cache = KvCache::new(1).with_most_positions(5000);
        cache.reserve(4100);
        append(&mut cache, 10);
        assert_eq!(capacity(&cache), 4100);
        append(&mut cache, 4090);
        assert_eq!(capacity(&cache), 4100, "no growth within the reserve");
        let mut cache = KvCache::new(1).with_most_positions(300);
        cache.reserve(4100);
        append(&mut cache, 10);
        assert_eq!(capacity(&cache), 300);
    }
}
