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
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_sessions: 8,
            idle_expiry_secs: 1800,
        }
    }
}
