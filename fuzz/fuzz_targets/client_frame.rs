//! The broker's frame decoder on arbitrary bytes: never panics, and whatever it accepts
//! re-encodes canonically to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::ClientFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ClientFrame::decode(data) {
        let again = ClientFrame::decode(&frame.encode()).expect("a re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
