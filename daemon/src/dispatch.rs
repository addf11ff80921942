//! From a request to its result: one function per method.
//!
//! `hello` and `shutdown` are served. The other methods the protocol names are
//! answered with `not_implemented` until the engine is wired in; names outside
//! the protocol get `method_not_found`.

use odmoe_protocol::{
    ErrorCode, HelloParams, HelloResult, Method, PROTOCOL_VERSION, Request, RpcError, Value,
    to_value,
};
use tracing::{debug, info};

use crate::server::State;

/// The result of `request`, or the error to answer it with.
pub fn dispatch(request: &Request, state: &State) -> Result<Value, RpcError> {
    match Method::from_name(&request.method) {
        Some(Method::Hello) => hello(request, state),
        Some(Method::Shutdown) => shutdown(state),
        Some(method) => Err(RpcError::new(
            ErrorCode::NotImplemented,
            format!(
                "`{}` is not implemented yet: this odmoed {} serves only hello and shutdown",
                method.name(),
                env!("CARGO_PKG_VERSION"),
            ),
        )),
        None => Err(RpcError::new(
            ErrorCode::MethodNotFound,
            format!(
                "no method `{}`; the methods are {}",
                request.method,
                Method::ALL.map(Method::name).join(", ")
            ),
        )),
    }
}

fn hello(request: &Request, state: &State) -> Result<Value, RpcError> {
    let params: HelloParams = request.parse_params()?;
    debug!(
        client = params.client.as_deref().unwrap_or("unnamed"),
        "hello"
    );
    let result = HelloResult {
        protocol_version: PROTOCOL_VERSION,
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        model: state
            .model
            .as_ref()
            .map(|path| path.to_string_lossy().into_owned()),
    };
    to_value(&result).map_err(|error| RpcError::new(ErrorCode::Internal, error.to_string()))
}

/// Asks the server to stop. The answer is written before this connection sees
/// the shutdown, so the caller learns that it worked.
fn shutdown(state: &State) -> Result<Value, RpcError> {
    info!("shutdown requested by a client");
    state.request_shutdown();
    Ok(Value::Nil)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn request(method: &str, params: Value) -> Request {
        Request {
            msgid: 1,
            method: method.into(),
            params,
        }
    }

    fn state() -> State {
        State::new(Some(PathBuf::from("/models/m.odmoe")), 1 << 20)
    }

    #[test]
    fn hello_reports_versions_and_model() {
        let result = dispatch(&request("hello", Value::Map(vec![])), &state()).unwrap();
        let hello: HelloResult = odmoe_protocol::from_value(result).unwrap();
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.server_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.model.as_deref(), Some("/models/m.odmoe"));
    }

    #[test]
    fn hello_with_bad_params_is_invalid_params() {
        let params = Value::Map(vec![(Value::from("client"), Value::from(5))]);
        let error = dispatch(&request("hello", params), &state()).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidParams);
    }

    #[test]
    fn methods_not_served_yet_say_so() {
        for method in Method::ALL {
            if matches!(method, Method::Hello | Method::Shutdown) {
                continue;
            }
            let error =
                dispatch(&request(method.name(), Value::Map(vec![])), &state()).unwrap_err();
            assert_eq!(error.code, ErrorCode::NotImplemented, "{}", method.name());
            assert!(error.message.contains(method.name()));
        }
    }

    #[test]
    fn unknown_methods_are_not_found() {
        let error = dispatch(&request("frobnicate", Value::Map(vec![])), &state()).unwrap_err();
        assert_eq!(error.code, ErrorCode::MethodNotFound);
        assert!(error.message.contains("`frobnicate`"));
    }

    #[test]
    fn shutdown_asks_the_server_to_stop() {
        let state = state();
        assert!(!state.shutdown_was_requested());
        assert_eq!(
            dispatch(&request("shutdown", Value::Map(vec![])), &state),
            Ok(Value::Nil)
        );
        assert!(state.shutdown_was_requested());
    }
}
