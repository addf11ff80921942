//! The params of every method, as the daemon parses them from a request: any msgpack value must
//! parse or be refused with an error, and the strings parsed further (budgets, keep_alive) too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use odmoe_config::{KeepAlive, parse_size};
use odmoe_protocol::{
    CancelParams, GenerateParams, HelloParams, LoadParams, PressureParams, Request, Value,
    frame_len,
};

/// The daemon's message limit is larger; a small one keeps the fuzzer's inputs cheap.
const LIMIT: usize = 4096;

fuzz_target!(|bytes: &[u8]| {
    // As the daemon does: a value is decoded only once its frame is known to fit the limit (a
    // declared length is never trusted for an allocation).
    let Ok(Some(len)) = frame_len(bytes, LIMIT) else {
        return;
    };
    let Ok(value) = rmpv::decode::read_value(&mut &bytes[..len]) else {
        return;
    };
    let request = |params: Value| Request {
        msgid: 1,
        method: "fuzz".into(),
        params,
    };
    let params = [value.clone(), Value::Array(vec![value])];
    for params in params {
        let request = request(params);
        let _ = request.parse_params::<HelloParams>();
        let _ = request.parse_params::<CancelParams>();
        let _ = request.parse_params::<PressureParams>();
        if let Ok(load) = request.parse_params::<LoadParams>()
            && let Some(budget) = load.expert_budget
        {
            let _ = parse_size(&budget);
        }
        if let Ok(generate) = request.parse_params::<GenerateParams>()
            && let Some(odmoe_protocol::KeepAliveParam::Text(text)) = generate.keep_alive
        {
            let _ = KeepAlive::parse(&text);
        }
    }
});
