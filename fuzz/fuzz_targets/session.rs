//! The sans-IO session state machine fed a sequence of arbitrary frames: never panics, never
//! holds more subscriptions than its cap, and ignores everything after it closed.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{Action, ServerSession, SessionConfig};

fuzz_target!(|frames: Vec<Vec<u8>>| {
    let config = SessionConfig {
        max_subscriptions: 4,
        max_frame_size: 4096,
        ..SessionConfig::default()
    };
    let start = Instant::now();
    let mut session = ServerSession::new("fuzz", config, start);
    let mut closed = false;
    for (n, frame) in frames.iter().enumerate() {
        let now = start + Duration::from_millis(n as u64);
        let action = session.handle_frame(frame, now, 0);
        if closed {
            assert_eq!(action, Action::None, "input after Close must be ignored");
        }
        if matches!(action, Action::Close { .. }) {
            closed = true;
        }
        assert!(session.subscriptions().count() <= 4);
    }
});
