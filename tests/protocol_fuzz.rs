//! A protocol fuzzer from outside the process: random bytes, structured msgpack-RPC requests with
//! random params, and valid requests mutated bit by bit, each on its own connection to a real
//! `odmoed` serving a fixture. After every batch the daemon must still answer `hello` and a
//! greedy generation with the same tokens as before. Slow: `scripts/fuzz.sh` runs it
//! (`cargo test -p odmoe-e2e --test protocol_fuzz -- --ignored`); `ODMOE_FUZZ_MESSAGES` sets how
//! many messages (default 3,000).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use odmoe_e2e::{Daemon, fixture};
use odmoe_protocol::{GenerateParams, Message, Request, Value, decode, encode, encode_value};

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Up to `most` random bytes.
    fn some_bytes(&mut self, most: u64) -> Vec<u8> {
        let len = self.below(most) as usize;
        self.bytes(len)
    }

    /// A msgpack value of the kinds params hold, nested a little.
    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 7 } else { 9 }) {
            0 => Value::Nil,
            1 => Value::from(self.below(2) == 1),
            2 => Value::from(self.next() as i64),
            3 => Value::from(f64::from_bits(self.next())),
            4 => Value::from(String::from_utf8_lossy(&self.some_bytes(40)).into_owned()),
            5 => Value::from(
                ["prompt", "tokens", "max_tokens", "temperature", "session"]
                    [self.below(5) as usize],
            ),
            6 => Value::Binary(self.some_bytes(64)),
            7 => Value::Array((0..self.below(6)).map(|_| self.value(depth + 1)).collect()),
            _ => Value::Map(
                (0..self.below(6))
                    .map(|_| (self.key(), self.value(depth + 1)))
                    .collect(),
            ),
        }
    }

    fn key(&mut self) -> Value {
        const KEYS: [&str; 16] = [
            "prompt",
            "tokens",
            "messages",
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "seed",
            "stop",
            "stream",
            "session",
            "keep_alive",
            "id",
            "path",
            "level",
        ];
        Value::from(KEYS[self.below(KEYS.len() as u64) as usize])
    }
}

const METHODS: [&str; 11] = [
    "hello",
    "generate",
    "chat",
    "cancel",
    "stats",
    "models",
    "load",
    "pressure",
    "frobnicate",
    "",
    "unload",
];

/// One message the fuzzer sends: random bytes, a structured request, or a valid one mutated.
fn message(random: &mut Random, valid: &[u8]) -> Vec<u8> {
    match random.below(3) {
        0 => random.some_bytes(256),
        1 => {
            // Never `shutdown` or `unload`: the daemon must keep its model to be checked.
            let method = METHODS[random.below(METHODS.len() as u64 - 1) as usize];
            let params = Value::Array(vec![random.value(0)]);
            let msgid = Value::from(random.next() as u32);
            encode_value(&Value::Array(vec![
                Value::from(0),
                msgid,
                Value::from(method),
                params,
            ]))
        }
        _ => {
            let mut bytes = valid.to_vec();
            for _ in 0..=random.below(8) {
                let at = random.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << random.below(8);
            }
            bytes
        }
    }
}

/// Greedy tokens of a short prompt, through the same raw protocol.
fn greedy_tokens(daemon: &Daemon) -> Vec<u64> {
    let mut stream = UnixStream::connect(daemon.socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let params = GenerateParams {
        prompt: Some("Hello".into()),
        max_tokens: Some(6),
        temperature: Some(0.0),
        stream: false,
        ..GenerateParams::default()
    };
    let request = Request::new(1, "generate", &params).unwrap();
    stream.write_all(&encode(&request.into())).unwrap();
    let mut buffer = Vec::new();
    loop {
        while let Some((message, used)) = decode(&buffer, 1 << 24).unwrap() {
            buffer.drain(..used);
            let Message::Response(response) = message else {
                continue;
            };
            let result = response.outcome.expect("a generation");
            let tokens = result
                .as_map()
                .unwrap()
                .iter()
                .find(|(key, _)| key.as_str() == Some("tokens"))
                .map(|(_, value)| value.clone())
                .unwrap();
            return tokens
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the daemon hung up on a valid request");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

#[test]
#[ignore = "slow: run by scripts/fuzz.sh"]
fn odmoed_survives_random_structured_and_mutated_messages() {
    let messages: u64 = std::env::var("ODMOE_FUZZ_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000);
    let mut daemon = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .config("[server]\nmessage_timeout_secs = 1\n")
        .spawn();
    daemon.wait_until_listening();
    let expected = greedy_tokens(&daemon);
    let valid = encode(
        &Request::new(
            9,
            "generate",
            &GenerateParams {
                prompt: Some("Hi".into()),
                max_tokens: Some(2),
                ..GenerateParams::default()
            },
        )
        .unwrap()
        .into(),
    );
    let mut random = Random(0x0d_d0e5_eed5);
    for sent in 1..=messages {
        let mut stream = UnixStream::connect(daemon.socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = stream.write_all(&message(&mut random, &valid));
        // Read whatever comes back for a moment, then leave (cancelling any generation).
        let mut sink = [0u8; 4096];
        let _ = stream.read(&mut sink);
        drop(stream);
        if sent.is_multiple_of(500) {
            assert!(
                daemon.alive(),
                "odmoed died after {sent} messages:\n{}",
                daemon.log()
            );
            assert_eq!(greedy_tokens(&daemon), expected, "after {sent} messages");
            println!("{sent} messages: odmoed serves on");
        }
    }
    assert!(daemon.alive());
    assert_eq!(greedy_tokens(&daemon), expected);
}
