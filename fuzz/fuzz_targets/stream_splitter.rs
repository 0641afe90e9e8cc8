//! WebTransport stream framing: bytes arriving in arbitrary chunks are split into frames (or
//! refused as too large) without panicking and without buffering past the limit plus one read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::stream::FrameSplitter;

const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, mut rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut splitter = FrameSplitter::new(MAX_FRAME);
    while !rest.is_empty() {
        let take = chunk.min(rest.len());
        let buffer = splitter.buffer(chunk);
        buffer.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match splitter.next_frame() {
                Ok(Some(frame)) => assert!(frame.len() <= MAX_FRAME),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
