//! The params of every method, as the daemon parses them from a request: any msgpack value must
//! parse or be refused with an error, and the strings parsed further (budgets, keep_alive) too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use odmoe_config::{KeepAlive, parse_size};
use odmoe_protocol::{
    CancelParams, GenerateParams, HelloParams, LoadParams, PressureParams, Request, Value,
};

fuzz_target!(|bytes: &[u8]| {
    let Ok(value) = rmpv::decode::read_value(&mut &bytes[..]) else {
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
