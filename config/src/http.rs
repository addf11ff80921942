//! `[http]`: the HTTP listener serving OpenAI's and Anthropic's APIs and the status page.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[http]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port to listen on, such as `"127.0.0.1:11535"`; absent, no HTTP at all.
    /// `odmoed --http ADDR` also sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Serve the APIs without `Authorization: Bearer KEY`. Default false.
    pub allow_unauthenticated: bool,
    /// The file holding the API key, made (mode 0600) on first start. Default
    /// `http-key` beside the config file ([`crate::default_http_key_path`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl HttpConfig {
    /// The key file: the configured one, else the platform default.
    pub fn key_path(&self) -> Result<PathBuf, crate::ConfigError> {
        match &self.key_file {
            Some(path) => Ok(path.clone()),
            None => crate::default_http_key_path(),
        }
    }
}
