//! `[generation]`: sampling defaults for requests that do not set their own.

use serde::{Deserialize, Serialize};

/// `[generation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// Softmax temperature; 0 picks the most likely token. Default 0.8.
    pub temperature: f32,
    /// Sample from the k most likely tokens only; 0 disables. Default 40.
    pub top_k: u32,
    /// Sample from the smallest set of tokens whose probability reaches p, in
    /// (0, 1]; 1 disables. Default 0.95.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one, in [0, 1);
    /// 0 disables. Default 0.05.
    pub min_p: f32,
    /// Divides the logits of tokens already seen (> 0); 1 disables. Default 1.0.
    pub repetition_penalty: f32,
    /// Most tokens generated for one request. Default 512.
    pub max_tokens: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            max_tokens: 512,
        }
    }
}
