//! The client side's decoder of broker frames: arbitrary bytes never panic, and a frame that
//! decodes re-encodes to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{PayloadLimits, ServerFrame};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ServerFrame::decode(data, PayloadLimits::default()) {
        let again = ServerFrame::decode(&frame.encode(), PayloadLimits::default())
            .expect("an encoded frame decodes");
        assert_eq!(again, frame);
    }
});
