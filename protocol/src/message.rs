//! The three msgpack-RPC message kinds and their conversion to and from [`Value`].

use rmpv::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ErrorCode, RpcError};

/// Type tag of a request: `[0, msgid, method, [params]]`.
const REQUEST: u64 = 0;
/// Type tag of a response: `[1, msgid, error, result]`.
const RESPONSE: u64 = 1;
/// Type tag of a notification: `[2, method, [params]]`.
const NOTIFICATION: u64 = 2;

/// One msgpack-RPC message, in the shape Neovim's `rpcrequest`/`rpcnotify` use.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A call that expects exactly one [`Response`] with the same msgid.
    Request(Request),
    /// The answer to a [`Request`].
    Response(Response),
    /// A one-way message; nothing answers it.
    Notification(Notification),
}

/// `[0, msgid, method, [params]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Chosen by the caller; the response carries it back.
    pub msgid: u32,
    /// The method name, e.g. `hello`.
    pub method: String,
    /// The one map of named fields (an empty map when the caller sent none).
    pub params: Value,
}

/// `[1, msgid, error, result]`: exactly one of `error` and `result` is meaningful.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The msgid of the request this answers.
    pub msgid: u32,
    /// The result, or the error that replaced it. On the wire the other slot is nil.
    pub outcome: Result<Value, RpcError>,
}

/// `[2, method, [params]]`, or `[2, method, args]` for a relayed one ([`Notification::positional`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The notification name, e.g. `token`.
    pub method: String,
    /// The one map of named fields; an array is sent as the positional arguments themselves.
    pub params: Value,
}

/// A msgpack value that is not a valid msgpack-RPC message.
///
/// It carries the msgid when the value looked enough like a request to have one,
/// so the receiver can answer that request with [`InvalidMessage::error`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct InvalidMessage {
    /// The msgid of the request, when one could be read.
    pub msgid: Option<u32>,
    /// The error to answer with (`invalid_request` or `invalid_params`).
    pub error: RpcError,
}

/// Serializing a Rust value into params or a result failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The serde serializer refused the value.
    #[error("cannot encode value as msgpack")]
    Serialize(#[from] rmp_serde::encode::Error),
    /// Params must be one map of named fields (a struct or a map).
    #[error("params must be a map of named fields, got {0}")]
    ParamsNotAMap(&'static str),
}

/// Converts any serializable value into a msgpack [`Value`]; structs become maps
/// keyed by field name, as the protocol wants.
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, EncodeError> {
    let bytes = rmp_serde::to_vec_named(value)?;
    // Bytes we have just encoded always decode.
    Ok(rmpv::decode::read_value(&mut bytes.as_slice())
        .expect("rmp_serde produced msgpack that rmpv cannot read"))
}

/// Converts a msgpack [`Value`] into a Rust type.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, rmpv::ext::Error> {
    rmpv::ext::from_value(value)
}

/// Converts `params` into the one map the protocol sends; `()` and `None` become
/// an empty map.
pub fn to_params<T: Serialize + ?Sized>(params: &T) -> Result<Value, EncodeError> {
    match to_value(params)? {
        Value::Nil => Ok(Value::Map(Vec::new())),
        map @ Value::Map(_) => Ok(map),
        other => Err(EncodeError::ParamsNotAMap(kind_of(&other))),
    }
}

impl Request {
    /// A request for `method` whose params are `params` serialized as a map.
    pub fn new<T: Serialize + ?Sized>(
        msgid: u32,
        method: impl Into<String>,
        params: &T,
    ) -> Result<Request, EncodeError> {
        Ok(Request {
            msgid,
            method: method.into(),
            params: to_params(params)?,
        })
    }

    /// The params as a Rust type, or the `invalid_params` error to answer with.
    /// The error names the field at fault, e.g. ``invalid params for `generate`:
    /// max_tokens: invalid type: string "ten", expected u32``.
    pub fn parse_params<T: DeserializeOwned>(&self) -> Result<T, RpcError> {
        serde_path_to_error::deserialize(self.params.clone()).map_err(|error| {
            let path = error.path().to_string();
            let error = error.into_inner();
            let message = if path == "." {
                format!("invalid params for `{}`: {error}", self.method)
            } else {
                format!("invalid params for `{}`: {path}: {error}", self.method)
            };
            RpcError::new(ErrorCode::InvalidParams, message)
        })
    }
}

impl Response {
    /// A successful response carrying `result`.
    pub fn ok(msgid: u32, result: Value) -> Response {
        Response {
            msgid,
            outcome: Ok(result),
        }
    }

    /// A failed response carrying `error`.
    pub fn error(msgid: u32, error: RpcError) -> Response {
        Response {
            msgid,
            outcome: Err(error),
        }
    }
}

impl Notification {
    /// A notification whose params are `args` as they are, not one map: how a relayed event
    /// calls a method of a client's own, such as Neovim's `nvim_exec_lua(code, args)`.
    pub fn positional(method: impl Into<String>, args: Vec<Value>) -> Notification {
        Notification {
            method: method.into(),
            params: Value::Array(args),
        }
    }

    /// A notification for `method` whose params are `params` serialized as a map.
    pub fn new<T: Serialize + ?Sized>(
        method: impl Into<String>,
        params: &T,
    ) -> Result<Notification, EncodeError> {
        Ok(Notification {
            method: method.into(),
            params: to_params(params)?,
        })
    }
}

impl From<Request> for Message {
    fn from(request: Request) -> Message {
        Message::Request(request)
    }
}

impl From<Response> for Message {
    fn from(response: Response) -> Message {
        Message::Response(response)
    }
}

impl From<Notification> for Message {
    fn from(notification: Notification) -> Message {
        Message::Notification(notification)
    }
}

impl Message {
    /// The wire form as a msgpack array.
    pub fn to_value(&self) -> Value {
        match self {
            Message::Request(request) => Value::Array(vec![
                Value::from(REQUEST),
                Value::from(request.msgid),
                Value::from(request.method.as_str()),
                Value::Array(vec![request.params.clone()]),
            ]),
            Message::Response(response) => {
                let (error, result) = match &response.outcome {
                    Ok(result) => (Value::Nil, result.clone()),
                    Err(error) => (error.to_value(), Value::Nil),
                };
                Value::Array(vec![
                    Value::from(RESPONSE),
                    Value::from(response.msgid),
                    error,
                    result,
                ])
            }
            Message::Notification(notification) => Value::Array(vec![
                Value::from(NOTIFICATION),
                Value::from(notification.method.as_str()),
                match &notification.params {
                    Value::Array(args) => Value::Array(args.clone()),
                    params => Value::Array(vec![params.clone()]),
                },
            ]),
        }
    }

    /// Reads a message from its wire form.
    ///
    /// Params may arrive as `[]`, `[nil]` (both read as an empty map) or `[map]`;
    /// method names may be msgpack str or bin holding UTF-8, as older clients send.
    pub fn from_value(value: Value) -> Result<Message, InvalidMessage> {
        let Value::Array(fields) = value else {
            return Err(invalid(
                None,
                format!("a message must be an array, got {}", kind_of(&value)),
            ));
        };
        let wrong_length = |kind: u64, expected: usize, got: usize| {
            invalid(
                None,
                format!("a message of type {kind} must have {expected} elements, got {got}"),
            )
        };
        match fields.first().and_then(Value::as_u64) {
            Some(REQUEST) => {
                let [_, msgid, method, params] = <[Value; 4]>::try_from(fields)
                    .map_err(|fields| wrong_length(REQUEST, 4, fields.len()))?;
                let msgid = read_msgid(&msgid)?;
                let method = method_name(&method).map_err(|e| with_msgid(e, msgid))?;
                let params = read_params(params, &method).map_err(|e| with_msgid(e, msgid))?;
                Ok(Message::Request(Request {
                    msgid,
                    method,
                    params,
                }))
            }
            Some(RESPONSE) => {
                let [_, msgid, error, result] = <[Value; 4]>::try_from(fields)
                    .map_err(|fields| wrong_length(RESPONSE, 4, fields.len()))?;
                let msgid = read_msgid(&msgid)?;
                let outcome = match error {
                    Value::Nil => Ok(result),
                    error => Err(RpcError::from_value(&error).ok_or_else(|| {
                        invalid(
                            None,
                            format!(
                                "a response error must be a {{code, message}} map, got {}",
                                kind_of(&error)
                            ),
                        )
                    })?),
                };
                Ok(Message::Response(Response { msgid, outcome }))
            }
            Some(NOTIFICATION) => {
                let [_, method, params] = <[Value; 3]>::try_from(fields)
                    .map_err(|fields| wrong_length(NOTIFICATION, 3, fields.len()))?;
                let method = method_name(&method)?;
                let params = read_params(params, &method)?;
                Ok(Message::Notification(Notification { method, params }))
            }
            _ => Err(invalid(
                None,
                match fields.first() {
                    Some(Value::Integer(kind)) => {
                        format!("a message must start with its type 0, 1 or 2, got {kind}")
                    }
                    first => format!(
                        "a message must start with its type 0, 1 or 2, got {}",
                        first.map_or("nothing", kind_of)
                    ),
                },
            )),
        }
    }
}

fn invalid(msgid: Option<u32>, message: String) -> InvalidMessage {
    InvalidMessage {
        msgid,
        error: RpcError::new(ErrorCode::InvalidRequest, message),
    }
}

fn with_msgid(error: InvalidMessage, msgid: u32) -> InvalidMessage {
    InvalidMessage {
        msgid: Some(msgid),
        ..error
    }
}

fn read_msgid(value: &Value) -> Result<u32, InvalidMessage> {
    value
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| {
            invalid(
                None,
                format!(
                    "a msgid must be an unsigned 32-bit integer, got {}",
                    match value {
                        Value::Integer(id) => id.to_string(),
                        other => kind_of(other).to_owned(),
                    }
                ),
            )
        })
}

fn method_name(value: &Value) -> Result<String, InvalidMessage> {
    let name = match value {
        Value::String(name) => name.as_str().map(str::to_owned),
        Value::Binary(bytes) => String::from_utf8(bytes.clone()).ok(),
        _ => None,
    };
    name.ok_or_else(|| {
        invalid(
            None,
            format!(
                "a method name must be a UTF-8 string, got {}",
                kind_of(value)
            ),
        )
    })
}

/// The one map of named fields in `[map]`; `[]` and `[nil]` give an empty map.
fn read_params(value: Value, method: &str) -> Result<Value, InvalidMessage> {
    let bad = |got: String| InvalidMessage {
        msgid: None,
        error: RpcError::new(
            ErrorCode::InvalidParams,
            format!(
                "params of `{method}` must be an array holding one map of named fields, got {got}"
            ),
        ),
    };
    let items = match value {
        Value::Array(items) => items,
        other => return Err(bad(kind_of(&other).to_owned())),
    };
    match <[Value; 1]>::try_from(items) {
        Ok([map @ Value::Map(_)]) => Ok(map),
        Ok([Value::Nil]) => Ok(Value::Map(Vec::new())),
        Err(items) if items.is_empty() => Ok(Value::Map(Vec::new())),
        Ok([other]) => Err(bad(format!("an array holding {}", kind_of(&other)))),
        Err(items) => Err(bad(format!("an array of {} elements", items.len()))),
    }
}

/// A short name for the kind of `value`, for error messages: never the value
/// itself, which may be megabytes long.
pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary data",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::methods::{HelloParams, HelloResult};

    fn round_trip(message: Message) {
        let bytes = encode(&message);
        let (decoded, used) = decode(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded, message);
    }

    #[test]
    fn request_round_trips() {
        let params = HelloParams {
            client: Some("test".into()),
        };
        round_trip(Request::new(7, "hello", &params).unwrap().into());
    }

    #[test]
    fn responses_round_trip() {
        let result = HelloResult {
            protocol_version: 1,
            server_version: "0.1.0".into(),
            model: None,
        };
        round_trip(Response::ok(u32::MAX, to_value(&result).unwrap()).into());
        round_trip(Response::error(3, RpcError::new(ErrorCode::NotImplemented, "not yet")).into());
        round_trip(Response::ok(4, Value::Nil).into());
    }

    #[test]
    fn notification_round_trips() {
        let params = Value::Map(vec![
            (Value::from("id"), Value::from(7)),
            (Value::from("text"), Value::from(" Paris")),
        ]);
        round_trip(
            Notification {
                method: "token".into(),
                params,
            }
            .into(),
        );
    }

    #[test]
    fn request_encodes_byte_for_byte_as_neovim_sends_it() {
        // rpcrequest(chan, 'hello', {'client': 'nvim'})
        let expected: &[u8] = &[
            0x94, // array of 4
            0x00, // type: request
            0x01, // msgid 1
            0xa5, b'h', b'e', b'l', b'l', b'o', // method "hello"
            0x91, // params: array of 1
            0x81, // map of 1
            0xa6, b'c', b'l', b'i', b'e', b'n', b't', // "client"
            0xa4, b'n', b'v', b'i', b'm', // "nvim"
        ];
        let params = HelloParams {
            client: Some("nvim".into()),
        };
        let request = Request::new(1, "hello", &params).unwrap();
        assert_eq!(encode(&request.clone().into()), expected);
        let (decoded, _) = decode(expected, 1024).unwrap().unwrap();
        assert_eq!(decoded, Message::Request(request));
    }

    #[test]
    fn empty_and_nil_params_read_as_an_empty_map() {
        for params in [Value::Array(vec![]), Value::Array(vec![Value::Nil])] {
            let value = Value::Array(vec![
                Value::from(0),
                Value::from(9),
                Value::from("stats"),
                params,
            ]);
            let Message::Request(request) = Message::from_value(value).unwrap() else {
                panic!("not a request");
            };
            assert_eq!(request.params, Value::Map(vec![]));
            let hello: HelloParams = request.parse_params().unwrap();
            assert_eq!(hello, HelloParams::default());
        }
    }

    #[test]
    fn binary_method_names_are_accepted() {
        let value = Value::Array(vec![
            Value::from(2),
            Value::Binary(b"token".to_vec()),
            Value::Array(vec![]),
        ]);
        let Message::Notification(notification) = Message::from_value(value).unwrap() else {
            panic!("not a notification");
        };
        assert_eq!(notification.method, "token");
    }

    #[test]
    fn positional_params_are_invalid_params_with_the_msgid() {
        let value = Value::Array(vec![
            Value::from(0),
            Value::from(5),
            Value::from("hello"),
            Value::Array(vec![Value::from(1), Value::from(2)]),
        ]);
        let error = Message::from_value(value).unwrap_err();
        assert_eq!(error.msgid, Some(5));
        assert_eq!(error.error.code, ErrorCode::InvalidParams);
    }

    #[test]
    fn malformed_messages_are_invalid_requests() {
        let cases = [
            Value::from("hello"),
            Value::Array(vec![]),
            Value::Array(vec![Value::from(3), Value::from(1), Value::from("x")]),
            Value::Array(vec![Value::from(0), Value::from(1), Value::from("hello")]),
            Value::Array(vec![
                Value::from(0),
                Value::from(-1),
                Value::from("hello"),
                Value::Array(vec![]),
            ]),
            Value::Array(vec![
                Value::from(0),
                Value::from(1u64 << 32),
                Value::from("hello"),
                Value::Array(vec![]),
            ]),
            Value::Array(vec![
                Value::from(1),
                Value::from(1),
                Value::from("not a map"),
                Value::Nil,
            ]),
        ];
        for value in cases {
            let error = Message::from_value(value.clone()).unwrap_err();
            assert_eq!(error.error.code, ErrorCode::InvalidRequest, "{value}");
            assert_eq!(error.msgid, None, "{value}");
        }
        let bad_method = Value::Array(vec![
            Value::from(0),
            Value::from(8),
            Value::from(42),
            Value::Array(vec![]),
        ]);
        assert_eq!(Message::from_value(bad_method).unwrap_err().msgid, Some(8));
    }

    #[test]
    fn wrongly_typed_params_name_the_method() {
        let request = Request {
            msgid: 1,
            method: "hello".into(),
            params: Value::Map(vec![(Value::from("client"), Value::from(3))]),
        };
        let error = request.parse_params::<HelloParams>().unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidParams);
        assert!(error.message.contains("`hello`"), "{}", error.message);
        assert!(error.message.contains("client: "), "{}", error.message);
    }

    #[test]
    fn wrongly_typed_params_name_the_field() {
        let request = Request {
            msgid: 1,
            method: "generate".into(),
            params: Value::Map(vec![
                (Value::from("prompt"), Value::from("Hello")),
                (Value::from("max_tokens"), Value::from("ten")),
            ]),
        };
        let error = request.parse_params::<crate::GenerateParams>().unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidParams);
        assert!(
            error
                .message
                .starts_with("invalid params for `generate`: max_tokens: "),
            "{}",
            error.message
        );
    }

    #[test]
    fn params_must_serialize_to_a_map() {
        assert_eq!(to_params(&()).unwrap(), Value::Map(vec![]));
        assert!(matches!(
            to_params(&[1, 2]),
            Err(EncodeError::ParamsNotAMap("an array"))
        ));
    }
}
