//! The decoder a client's bytes meet first: any bytes, cut anywhere, must give a message, a
//! request for more bytes or an error, never a panic or an allocation the limit does not allow.

#![no_main]

use libfuzzer_sys::fuzz_target;
use odmoe_protocol::{decode, encode};

/// A small limit, so that the "message too large" paths are reached too.
const LIMIT: usize = 4096;

fuzz_target!(|bytes: &[u8]| {
    let mut rest = bytes;
    while let Ok(Some((message, used))) = decode(rest, LIMIT) {
        assert!(used > 0 && used <= rest.len());
        // What decodes encodes to a message that decodes and encodes to the same bytes (the
        // first encoding may differ: a string that is not UTF-8 is written back as binary).
        let again = encode(&message);
        let (round_trip, _) = decode(&again, usize::MAX)
            .expect("an encoded message decodes")
            .expect("an encoded message is whole");
        assert_eq!(encode(&round_trip), again);
        rest = &rest[used..];
    }
});
