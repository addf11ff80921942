//! Routing traces recorded elsewhere (another server's logs, a published dataset), read into
//! odmoe's trace format so that replay, budget sweeps and predictor evaluation run on real
//! routing.
//!
//! # JSONL schema
//!
//! One JSON object per line, one line per token and layer, in any order:
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `layer` | integer, required | the MoE layer, from 0 |
//! | `token_idx` (or `token`) | integer, required | the token's position in its sequence |
//! | `experts` | list of integers, required | the experts routed to, by descending weight; every line routes the same number |
//! | `gating_probs` (or `weights`) | list of numbers | their routing weights; absent, equal weights |
//! | `problem_id` (or `sequence`, `prompt`) | integer or string | the sequence the token belongs to; absent, all lines are one sequence |
//!
//! Other keys are ignored. Sequences keep the order in which they first appear, tokens their
//! positions. Each token is one decode step, a forward pass of its own. A token that lacks some
//! layers is left out (and counted): a trace holds every layer of every token.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;

use serde_json::Value;

use super::trace::Trace;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::store::ExpertSizes;

/// How a routing file becomes a trace.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Experts per layer; absent, one more than the largest id seen.
    pub experts: Option<usize>,
    /// Bytes one expert takes in a store's budget, for byte figures in replays.
    pub expert_bytes: u64,
    /// Where the routing came from, kept in the trace (informative).
    pub source: String,
}

/// A trace read from a routing file, with what was left out of it.
#[derive(Clone, Debug)]
pub struct Imported {
    pub trace: Trace,
    /// Lines read.
    pub lines: usize,
    /// Sequences found.
    pub sequences: usize,
    /// Tokens left out because some layers were missing.
    pub incomplete_tokens: usize,
}

/// One token's routing, layer by layer, as it is read.
type Layers = Vec<Option<(Vec<u32>, Vec<f32>)>>;

/// Reads routing lines in the JSONL schema of this module.
pub fn import_jsonl(reader: impl BufRead, options: &ImportOptions) -> Result<Imported> {
    let mut sequences: HashMap<String, u32> = HashMap::new();
    // (sequence, position) -> the token's layers.
    let mut tokens: BTreeMap<(u32, u64), Layers> = BTreeMap::new();
    let (mut layers, mut top_k, mut largest_id, mut lines) = (0usize, None::<usize>, 0u32, 0usize);
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| Error::InvalidRequest(format!("line {number}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let bad = |message: String| Error::InvalidRequest(format!("line {number}: {message}"));
        let record: Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let integer = |keys: &[&str]| {
            keys.iter()
                .find_map(|key| record.get(*key))
                .map(|value| {
                    value
                        .as_u64()
                        .ok_or_else(|| bad(format!("`{}` must be a whole number", keys[0])))
                })
                .transpose()
        };
        let layer = integer(&["layer"])?.ok_or_else(|| bad("no `layer`".into()))? as usize;
        let position =
            integer(&["token_idx", "token"])?.ok_or_else(|| bad("no `token_idx`".into()))?;
        let experts: Vec<u32> = record
            .get("experts")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no `experts` list".into()))?
            .iter()
            .map(|e| e.as_u64().and_then(|e| u32::try_from(e).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`experts` must hold expert numbers".into()))?;
        let k = *top_k.get_or_insert(experts.len());
        if experts.is_empty() || experts.len() != k {
            return Err(bad(format!(
                "{} experts where earlier lines route {k}",
                experts.len()
            )));
        }
        let weights: Vec<f32> = match ["gating_probs", "weights"]
            .iter()
            .find_map(|key| record.get(*key))
        {
            Some(Value::Array(values)) if values.len() == k => values
                .iter()
                .map(|w| w.as_f64().map(|w| w as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("weights must be numbers".into()))?,
            Some(_) => return Err(bad(format!("weights must be a list of {k} numbers"))),
            None => vec![1.0 / k as f32; k],
        };
        let sequence = ["problem_id", "sequence", "prompt"]
            .iter()
            .find_map(|key| record.get(*key))
            .map_or_else(String::new, Value::to_string);
        let next = sequences.len() as u32;
        let sequence = *sequences.entry(sequence).or_insert(next);
        largest_id = largest_id.max(experts.iter().copied().max().unwrap_or(0));
        layers = layers.max(layer + 1);
        let token = tokens.entry((sequence, position)).or_default();
        if token.len() <= layer {
            token.resize(layer + 1, None);
        }
        if token[layer].replace((experts, weights)).is_some() {
            return Err(bad(format!(
                "layer {layer} of token {position} appears twice"
            )));
        }
    }
    let top_k = top_k.ok_or_else(|| Error::InvalidRequest("no routing lines".into()))?;
    let experts = options.experts.unwrap_or(largest_id as usize + 1);
    if largest_id as usize >= experts {
        return Err(Error::InvalidRequest(format!(
            "expert {largest_id} is routed to, but layers have {experts} experts"
        )));
    }
    let config = ModelConfig {
        num_layers: layers,
        num_experts: experts,
        num_experts_per_token: top_k,
        ..ModelConfig::default()
    };
    let mut trace = Trace::new(
        config,
        ExpertSizes::Same(options.expert_bytes),
        options.source.clone(),
    );
    let mut incomplete_tokens = 0;
    for ((sequence, _), routing) in tokens {
        if routing.len() < layers || routing.iter().any(Option::is_none) {
            incomplete_tokens += 1;
            continue;
        }
        for (ids, weights) in routing.into_iter().flatten() {
            trace.ids.extend(ids);
            trace.weights.extend(weights);
        }
        trace.prompt_index.push(sequence);
        trace.forward.push(trace.forward.len() as u32);
    }
    Ok(Imported {
        trace,
        lines,
        sequences: sequences.len(),
        incomplete_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ImportOptions {
        ImportOptions {
            experts: None,
            expert_bytes: 1000,
            source: "test".into(),
        }
    }

    #[test]
    fn lines_in_any_order_become_tokens_in_order_and_incomplete_ones_go() {
        let text = r#"{"problem_id": 7, "layer": 1, "token_idx": 0, "experts": [3, 1], "gating_probs": [0.75, 0.25]}
{"problem_id": 7, "layer": 0, "token_idx": 0, "experts": [2, 0], "gating_probs": [0.5, 0.5]}
{"problem_id": 7, "layer": 0, "token_idx": 1, "experts": [1, 0]}
{"problem_id": 9, "layer": 0, "token_idx": 0, "experts": [0, 1]}
{"problem_id": 9, "layer": 1, "token_idx": 0, "experts": [1, 2]}
"#;
        let imported = import_jsonl(text.as_bytes(), &options()).unwrap();
        let trace = &imported.trace;
        assert_eq!((imported.lines, imported.sequences), (5, 2));
        assert_eq!(imported.incomplete_tokens, 1);
        assert_eq!(
            (trace.num_layers(), trace.num_experts(), trace.top_k()),
            (2, 4, 2)
        );
        assert_eq!(trace.num_tokens(), 2);
        assert_eq!(trace.ids(0, 0), [2, 0]);
        assert_eq!(trace.ids(0, 1), [3, 1]);
        assert_eq!(trace.ids(1, 1), [1, 2]);
        assert_eq!(&trace.weights[..4], [0.5, 0.5, 0.75, 0.25]);
        assert_eq!(trace.weights[4..6], [0.5, 0.5]);
        assert_eq!(trace.prompt_index, [0, 1]);
        assert_eq!(trace.forward, [0, 1]);
        assert_eq!(trace.total_expert_bytes(), 8000);
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            ("{\"layer\": 0, \"experts\": [1]}", "line 1: no `token_idx`"),
            (
                "{\"layer\": 0, \"token\": 0, \"experts\": [1]}\n{\"layer\": 1, \"token\": 0, \"experts\": [1, 2]}",
                "line 2: 2 experts where earlier lines route 1",
            ),
            ("not json", "line 1: not JSON"),
            (
                "{\"layer\": 0, \"token\": 0, \"experts\": [1]}\n{\"layer\": 0, \"token\": 0, \"experts\": [2]}",
                "line 2: layer 0 of token 0 appears twice",
            ),
        ];
        for (text, expected) in cases {
            let error = import_jsonl(text.as_bytes(), &options())
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let few = ImportOptions {
            experts: Some(2),
            ..options()
        };
        let error = import_jsonl(
            "{\"layer\": 0, \"token\": 0, \"experts\": [5]}".as_bytes(),
            &few,
        );
        assert!(
            error
                .unwrap_err()
                .to_string()
                .contains("expert 5 is routed to")
        );
    }
}
