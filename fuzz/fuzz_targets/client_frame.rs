//! A session fed one frame from the network: decode, names, payload validation and the state
//! machine's reply must never panic, whatever the bytes. The first input byte chooses whether
//! the session has completed Hello first (most checks run only after it).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{ClientFrame, ServerSession, session::SessionConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, frame)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut session = ServerSession::new("fuzz", SessionConfig::default(), now);
    if mode & 1 == 1 {
        let hello = ClientFrame::Hello {
            version: 1,
            token: None,
        }
        .encode();
        let _ = session.handle_frame(&hello, now, 0);
    }
    let _ = session.handle_frame(frame, now + Duration::from_millis(1), 1);
    // Twice: a second frame after whatever the first did (e.g. a close) must be safe too.
    let _ = session.handle_frame(frame, now + Duration::from_millis(2), 2);
    // And the decoder on its own: what it accepts re-encodes to a frame that decodes to the
    // same value.
    if let Ok(decoded) = ClientFrame::decode(frame) {
        let again = ClientFrame::decode(&decoded.encode()).expect("a re-encoded frame decodes");
        assert_eq!(again, decoded);
    }
});
