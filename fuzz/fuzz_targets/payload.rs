//! The payload validator against ciborium: whatever the validator accepts must be one
//! well-formed CBOR item with nothing after it, so ciborium must never find it truncated or
//! syntactically broken. ciborium's *semantic* refusals are not errors of the validator: its
//! `Value` cannot hold every well-formed item (unassigned simple values such as `f0`, bignums
//! above 128 bits), and the broker forwards those (docs/PROTOCOL.md §4). The validator may
//! refuse more (its depth cap), never less.
#![no_main]

use ciborium::de::Error;
use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{PayloadLimits, payload::validate};

fuzz_target!(|data: &[u8]| {
    if validate(data, PayloadLimits::default()).is_ok() {
        let mut reader = data;
        match ciborium::from_reader::<ciborium::Value, _>(&mut reader) {
            Ok(_) => assert!(reader.is_empty(), "validator accepted trailing bytes"),
            Err(Error::Semantic(..)) => {}
            Err(e) => panic!("validator accepted what ciborium finds malformed: {e:?}"),
        }
    }
});
