//! `[sessions]`: conversations kept with their KV caches.

use serde::{Deserialize, Serialize};

/// `[sessions]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Conversations kept at once with their KV caches. Default 8.
    pub max_sessions: u32,
    /// Seconds without use before a session is dropped; 0 keeps sessions until
    /// `max_sessions` forces one out. Default 1800.
    pub idle_expiry_secs: u64,
    /// Bytes of KV caches kept for requests without a session, keyed by their tokens, so a
    /// request that extends an earlier one (a stateless API re-sending a conversation)
    /// computes only what is new; 0 keeps none. Default 1 GiB.
    #[serde(
        deserialize_with = "crate::size::bytes",
        serialize_with = "crate::size::size_text"
    )]
    pub prefix_cache_bytes: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_sessions: 8,
            idle_expiry_secs: 1800,
            prefix_cache_bytes: 1 << 30,
        }
    }
}
