//! `odmoe convert --split-experts E --top-k K`: turns a dense Llama into a split-Llama MoE by
//! partitioning each layer's feed-forward neurons into E experts of equal size.
//!
//! A SwiGLU feed-forward is a sum over its neurons, so the experts' outputs add up to the dense
//! output exactly; choosing all E experts (K = E) gives back the dense model.
//!
//! With calibration text (the better choice), the dense model runs over it first, and each
//! neuron's importance on each token is |its activation| x |its down-projection column|. Neurons
//! that matter on the same tokens are grouped by balanced k-means on those importance profiles
//! (co-activation clustering), and each expert's router row is the least-squares fit (ridge) of
//! its neurons' summed importance from the router's input, so the router predicts which experts
//! matter most for a token. Without calibration text, neurons are grouped by their normalised gate
//! rows and the router row is the mean gate row.
//!
//! The result is written as a Hugging Face style directory (f32 `model.safetensors`, config with
//! `model_type = "odmoe_split_llama"`, tokenizer files), which `convert` then lays out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, Device, Tensor};
use serde_json::json;

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::format::WeightSource;
use crate::format::gguf::GgufFile;
use crate::format::safetensors::HfWeights;
use crate::model::llama::dense_mlp_names;
use crate::open::LoadOptions;
use crate::tokenizer::Tokenizer;

/// Rounds of balanced k-means per layer: assignments settle within a few.
const KMEANS_ROUNDS: usize = 8;

/// Writes the split model of the dense Llama at `src` (GGUF file or Hugging Face directory) into
/// the directory `out` as a Hugging Face style checkpoint.
pub fn split_dense_llama(
    src: &Path,
    out: &Path,
    experts: usize,
    top_k: usize,
    calibration: Option<&str>,
    mut progress: impl FnMut(usize, usize),
) -> Result<ModelConfig> {
    let device = Device::Cpu;
    let (config, weights, tokenizer): (ModelConfig, Box<dyn WeightSource>, Option<Tokenizer>) =
        if src.is_file() {
            let gguf = GgufFile::open(src, &device)?;
            let tokenizer = Tokenizer::from_gguf(&gguf).ok();
            (
                crate::model::config_from_gguf(&gguf)?,
                Box::new(gguf),
                tokenizer,
            )
        } else {
            let config = crate::model::config_from_hf_file(&src.join("config.json"))?;
            let tokenizer = Tokenizer::from_dir(src).ok();
            (config, Box::new(HfWeights::open(src, &device)?), tokenizer)
        };
    if config.architecture != Architecture::Llama {
        return Err(Error::config(
            src,
            format!(
                "--split-experts needs a dense Llama; this is {}",
                crate::model::model_type(config.architecture)
            ),
        ));
    }
    let width = config.dense_intermediate_size.unwrap_or(0);
    if experts < 2 || top_k == 0 || top_k > experts || width % experts != 0 {
        return Err(Error::InvalidRequest(format!(
            "--split-experts {experts} --top-k {top_k}: the feed-forward width {width} must divide \
             into at least 2 experts of equal size, and 1 <= K <= E"
        )));
    }
    let ffn_inputs = match (calibration, &tokenizer) {
        (Some(text), Some(tokenizer)) => {
            Some(calibration_inputs(src, &tokenizer.encode(text, false)?)?)
        }
        (Some(_), None) => {
            return Err(Error::InvalidRequest(
                "calibration text needs the model's tokenizer, and none was found".into(),
            ));
        }
        (None, _) => None,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut copy = |name: &str, shape: &[usize]| -> Result<()> {
        tensors.insert(name.to_string(), weights.tensor(name, shape)?);
        Ok(())
    };
    copy("model.embed_tokens.weight", &[v, h])?;
    copy("model.norm.weight", &[h])?;
    let tied = config.tie_word_embeddings && !weights.contains("lm_head.weight");
    if !tied {
        copy("lm_head.weight", &[v, h])?;
    }
    let (q_rows, kv_rows) = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    );
    for layer in 0..config.num_layers {
        progress(layer, config.num_layers);
        let p = format!("model.layers.{layer}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("{p}.{norm}.weight");
            tensors.insert(name.clone(), weights.tensor(&name, &[h])?);
        }
        for (proj, rows, heads) in [
            ("q_proj", q_rows, config.num_heads),
            ("k_proj", kv_rows, config.num_kv_heads),
            ("v_proj", kv_rows, 0),
            ("o_proj", h, 0),
        ] {
            let name = format!("{p}.self_attn.{proj}.weight");
            let cols = if proj == "o_proj" { q_rows } else { h };
            let mut w = weights.tensor(&name, &[rows, cols])?;
            if config.rope_interleaved && heads > 0 {
                w = unpermute_rotary_rows(&w, heads)?;
            }
            tensors.insert(name, w);
        }
        let [gate_name, up_name, down_name] = dense_mlp_names(layer);
        let gate = weights.tensor(&format!("{gate_name}.weight"), &[width, h])?;
        let up = weights.tensor(&format!("{up_name}.weight"), &[width, h])?;
        let down = weights.tensor(&format!("{down_name}.weight"), &[h, width])?;
        let (clusters, router) = match &ffn_inputs {
            Some(inputs) => calibrated_split(&inputs[layer], &gate, &up, &down, experts)?,
            None => {
                let clusters = balanced_clusters(&gate, experts)?;
                let rows = clusters
                    .iter()
                    .map(|c| {
                        gate.index_select(&Tensor::new(c.as_slice(), &device)?, 0)?
                            .mean(0)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (clusters, Tensor::stack(&rows, 0)?)
            }
        };
        for (e, neurons) in clusters.iter().enumerate() {
            let index = Tensor::new(neurons.as_slice(), &device)?;
            let expert_gate = gate.index_select(&index, 0)?;
            let prefix = format!("{p}.block_sparse_moe.experts.{e}");
            tensors.insert(format!("{prefix}.w1.weight"), expert_gate);
            tensors.insert(format!("{prefix}.w3.weight"), up.index_select(&index, 0)?);
            tensors.insert(
                format!("{prefix}.w2.weight"),
                down.index_select(&index, 1)?.contiguous()?,
            );
        }
        tensors.insert(format!("{p}.block_sparse_moe.gate.weight"), router);
    }
    progress(config.num_layers, config.num_layers);

    let weights_path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)?;
    let config_json = json!({
        "model_type": crate::model::model_type(Architecture::SplitLlama),
        "architectures": ["OdmoeSplitLlamaForCausalLM"],
        "vocab_size": v,
        "hidden_size": h,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu",
        "intermediate_size": width / experts,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "tie_word_embeddings": tied,
        "eos_token_id": config.eos_token_ids,
        "bos_token_id": config.bos_token_id,
        "odmoe_split": {
            "dense_intermediate_size": width,
            "method": if calibration.is_some() {
                "co-activation clustering on calibration text; least-squares router"
            } else {
                "balanced k-means on gate rows; router = mean gate row"
            },
        },
    });
    write_json(&out.join("config.json"), &config_json)?;
    for (name, bytes) in tokenizer
        .map(|t| t.hf_files())
        .transpose()?
        .into_iter()
        .flatten()
    {
        let path = out.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    crate::model::config_from_hf_file(&out.join("config.json"))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The normed input of every layer's feed-forward over the calibration tokens: `[N, hidden]`.
fn calibration_inputs(src: &Path, tokens: &[u32]) -> Result<Vec<Tensor>> {
    const WINDOW: usize = 256;
    let model = crate::open::load(src, &LoadOptions::default(), &Device::Cpu)?.model;
    let mut per_layer: Vec<Vec<Tensor>> = vec![Vec::new(); model.config.num_layers];
    for chunk in tokens.chunks(WINDOW) {
        let mut trace = crate::model::ForwardTrace::default();
        model.forward(
            chunk,
            &mut model.new_cache(),
            crate::model::Logits::Last,
            Some(&mut trace),
        )?;
        for (layer, input) in trace.ffn_inputs.into_iter().enumerate() {
            per_layer[layer].push(input);
        }
    }
    per_layer
        .iter()
        .map(|inputs| Ok(Tensor::cat(inputs, 0)?))
        .collect()
}

/// Co-activation clusters and a least-squares router for one layer, from its feed-forward
/// inputs `x` `[N, hidden]` on calibration text.
fn calibrated_split(
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    experts: usize,
) -> Result<(Vec<Vec<u32>>, Tensor)> {
    let activation = (candle_nn::ops::silu(&x.matmul(&gate.t()?)?)? * x.matmul(&up.t()?)?)?;
    let down_norms = down.sqr()?.sum_keepdim(0)?.sqrt()?; // [1, width]
    let importance = activation.abs()?.broadcast_mul(&down_norms)?; // [N, width]
    let clusters = balanced_clusters(&importance.t()?.contiguous()?, experts)?;
    let targets = clusters
        .iter()
        .map(|c| {
            importance
                .index_select(&Tensor::new(c.as_slice(), x.device())?, 1)?
                .sum_keepdim(1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let targets = Tensor::cat(&targets, 1)?; // [N, experts]
    let router = ridge_regression(x, &targets)?; // [hidden, experts]
    Ok((clusters, router.t()?.contiguous()?))
}

/// Solves min ||x w - y||^2 + lambda ||w||^2 for w `[hidden, outputs]`, in f64 by Cholesky.
fn ridge_regression(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let xt = x.t()?;
    let gram = xt
        .matmul(x)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec2::<f64>()?;
    let rhs = xt
        .matmul(y)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec2::<f64>()?;
    let n = gram.len();
    let lambda = 1e-3 * (0..n).map(|i| gram[i][i]).sum::<f64>() / n as f64 + 1e-9;
    // Cholesky factor L of (gram + lambda I).
    let mut l = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = l[i][..j].iter().zip(&l[j][..j]).map(|(a, b)| a * b).sum();
            let sum = gram[i][j] + if i == j { lambda } else { 0.0 } - dot;
            l[i][j] = if i == j {
                sum.max(1e-12).sqrt()
            } else {
                sum / l[j][j]
            };
        }
    }
    let outputs = rhs[0].len();
    let mut w = vec![0f32; n * outputs];
    for o in 0..outputs {
        // Forward then back substitution for column o.
        let mut z = vec![0f64; n];
        for i in 0..n {
            let s: f64 = (0..i).map(|k| l[i][k] * z[k]).sum();
            z[i] = (rhs[i][o] - s) / l[i][i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n)
                .map(|k| l[k][i] * w[k * outputs + o] as f64)
                .sum();
            w[i * outputs + o] = ((z[i] - s) / l[i][i]) as f32;
        }
    }
    Ok(Tensor::from_vec(w, (n, outputs), x.device())?)
}

/// Undoes llama.cpp's Q/K row permutation (pairs interleaved per head) back to the two-halves
/// layout that Hugging Face rotary embeddings expect.
fn unpermute_rotary_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Partitions the rows of `gate` (one per neuron) into `k` groups of equal size by balanced
/// k-means on the normalised rows: each round assigns (neuron, cluster) pairs from the most
/// similar down, filling each cluster to its capacity. Deterministic.
fn balanced_clusters(gate: &Tensor, k: usize) -> Result<Vec<Vec<u32>>> {
    let n = gate.dim(0)?;
    let capacity = n / k;
    let norms = gate
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    let points = gate.broadcast_div(&norms)?;
    // Start from evenly spaced neurons.
    let seeds: Vec<u32> = (0..k).map(|c| (c * capacity) as u32).collect();
    let mut centroids = points.index_select(&Tensor::new(seeds.as_slice(), gate.device())?, 0)?;
    let mut clusters: Vec<Vec<u32>> = Vec::new();
    for _ in 0..KMEANS_ROUNDS {
        let similarity = points.matmul(&centroids.t()?)?.to_vec2::<f32>()?;
        let mut pairs: Vec<(f32, u32, u32)> = Vec::with_capacity(n * k);
        for (i, row) in similarity.iter().enumerate() {
            for (c, &s) in row.iter().enumerate() {
                pairs.push((s, i as u32, c as u32));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut assigned = vec![false; n];
        clusters = vec![Vec::with_capacity(capacity); k];
        for (_, i, c) in pairs {
            if !assigned[i as usize] && clusters[c as usize].len() < capacity {
                assigned[i as usize] = true;
                clusters[c as usize].push(i);
            }
        }
        let mut next = Vec::with_capacity(k);
        for members in &mut clusters {
            members.sort_unstable();
            let index = Tensor::new(members.as_slice(), gate.device())?;
            let mean = points.index_select(&index, 0)?.mean(0)?;
            let norm = mean.sqr()?.sum_all()?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
            next.push(mean.broadcast_div(&norm)?);
        }
        centroids = Tensor::stack(&next, 0)?;
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_balanced_and_cover_every_neuron() {
        let gate = Tensor::randn(0f32, 1.0, (64, 16), &Device::Cpu).unwrap();
        let clusters = balanced_clusters(&gate, 4).unwrap();
        assert!(clusters.iter().all(|c| c.len() == 16));
        let mut all: Vec<u32> = clusters.concat();
        all.sort_unstable();
        assert_eq!(all, (0..64).collect::<Vec<u32>>());
    }

    #[test]
    fn ridge_regression_recovers_a_linear_map() {
        let x = Tensor::randn(0f32, 1.0, (200, 6), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (6, 3), &Device::Cpu).unwrap();
        let y = x.matmul(&w).unwrap();
        let fit = ridge_regression(&x, &y).unwrap();
        let err = (fit - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-2, "{err}");
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, half, cols).swapaxes(1, 2).
        let (heads, rows, cols) = (2, 8, 3);
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, rows / heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let back = unpermute_rotary_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
