//! The payload validator (streaming CBOR walk with a depth cap) on arbitrary bytes: never
//! panics, never allocates by a declared length, and a shallow cap never accepts what a deep
//! one refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{PayloadLimits, payload::validate};

fuzz_target!(|data: &[u8]| {
    let deep = validate(data, PayloadLimits { max_depth: 32 });
    let shallow = validate(data, PayloadLimits { max_depth: 2 });
    if shallow.is_ok() {
        assert!(deep.is_ok(), "accepted at depth 2 but refused at depth 32");
    }
});
