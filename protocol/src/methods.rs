//! Method names and the params and results of the methods defined so far.

use serde::{Deserialize, Serialize};

/// The protocol version a server reports in [`HelloResult::protocol_version`].
/// It changes when a message or method changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every method the protocol names. A server that does not serve one yet
/// answers it with `not_implemented`; a name outside this list gets
/// `method_not_found`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Handshake: versions and the loaded model.
    Hello,
    /// Generate a completion for a prompt.
    Generate,
    /// Generate the next turn of a chat.
    Chat,
    /// Cancel a request in flight.
    Cancel,
    /// Telemetry of the server and its expert store.
    Stats,
    /// The models the server can serve.
    Models,
    /// Load a model.
    Load,
    /// Unload the model.
    Unload,
    /// Stop the server gracefully.
    Shutdown,
}

impl Method {
    /// All methods, in the order the protocol lists them.
    pub const ALL: [Method; 9] = [
        Method::Hello,
        Method::Generate,
        Method::Chat,
        Method::Cancel,
        Method::Stats,
        Method::Models,
        Method::Load,
        Method::Unload,
        Method::Shutdown,
    ];

    /// The method's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Method::Hello => "hello",
            Method::Generate => "generate",
            Method::Chat => "chat",
            Method::Cancel => "cancel",
            Method::Stats => "stats",
            Method::Models => "models",
            Method::Load => "load",
            Method::Unload => "unload",
            Method::Shutdown => "shutdown",
        }
    }

    /// The method called `name` on the wire, if the protocol has one.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|method| method.name() == name)
    }
}

/// Params of `hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloParams {
    /// Who is calling, e.g. `"odmoe 0.1.0"` or `"nvim"`; for the server's log.
    #[serde(default)]
    pub client: Option<String>,
}

/// Result of `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResult {
    /// The server's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The server's own version, e.g. `"0.1.0"`.
    pub server_version: String,
    /// The model the server serves, if one is configured.
    #[serde(default)]
    pub model: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for method in Method::ALL {
            assert_eq!(Method::from_name(method.name()), Some(method));
        }
        assert_eq!(Method::from_name("Hello"), None);
        assert_eq!(Method::from_name("frobnicate"), None);
    }
}
