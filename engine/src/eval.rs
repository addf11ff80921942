//! Scoring text: perplexity, for comparing a model with its variants (split experts, fewer
//! experts per token, quantized weights).

use crate::error::{Error, Result};
use crate::model::{Logits, Model};

/// What [`perplexity`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll: f64,
    pub scored_tokens: usize,
}

/// Perplexity of `tokens`, scored in consecutive windows of `window` tokens; each window starts
/// from an empty cache and every token after a window's first is scored. A window runs in the
/// model's prefill slabs, each slab's logits scored and dropped before the next: a window of
/// 32K tokens would otherwise hold 32K rows of logits (4 GB at a vocabulary of 32,000).
pub fn perplexity(model: &Model, tokens: &[u32], window: usize) -> Result<Perplexity> {
    if window < 2 || tokens.len() < 2 {
        return Err(Error::InvalidRequest(
            "perplexity needs at least two tokens and a window of at least two".into(),
        ));
    }
    let mut total = 0f64;
    let mut scored = 0usize;
    for chunk in tokens.chunks(window).filter(|c| c.len() >= 2) {
        let mut cache = model.new_cache();
        cache.reserve(chunk.len());
        for (i, slab) in chunk.chunks(model.prefill_slab()).enumerate() {
            let start = i * model.prefill_slab();
            let logits = model.forward(slab, &mut cache, Logits::All, None)?;
            let rows = logits.to_vec2::<f32>()?;
            // Row j predicts the window's token start + j + 1, while there is one.
            for (row, &next) in rows.iter().zip(&chunk[start + 1..]) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let log_sum = row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln()
                    + max;
                total += log_sum - row[next as usize] as f64;
                scored += 1;
            }
        }
    }
    let nll = total / scored as f64;
    Ok(Perplexity {
        perplexity: nll.exp(),
        nll,
        scored_tokens: scored,
    })
}
