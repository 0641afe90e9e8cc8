//! The client's frame decoder (with name and payload validation) on arbitrary bytes: never
//! panics, and whatever it accepts round-trips through the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{PayloadLimits, ServerFrame};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ServerFrame::decode(data, PayloadLimits::default()) {
        let again = ServerFrame::decode(&frame.encode(), PayloadLimits::default())
            .expect("a re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
