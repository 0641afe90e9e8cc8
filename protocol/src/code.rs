//! The single table of error and close codes.
//!
//! Every code the broker can send lives here, with whether it ends the session, whether the
//! client should retry or reconnect, and its WebSocket close code. Transports map codes through
//! [`Code::ws_close_code`]; nothing else invents numbers.

use std::fmt;

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $wire:literal, $fatal:literal, $retry:literal; )*) => {
        /// An error or close code carried by `Error` and `Close` frames.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Code {
            $( $(#[$doc])* $name, )*
        }

        impl Code {
            /// Every known code, in table order.
            pub const ALL: &'static [Code] = &[$(Code::$name),*];

            /// The numeric value on the wire.
            pub const fn value(self) -> u16 {
                match self { $(Code::$name => $value,)* }
            }

            /// The snake_case name used in logs, metrics and the CLI.
            pub const fn as_str(self) -> &'static str {
                match self { $(Code::$name => $wire,)* }
            }

            /// True when the broker ends the session with this code (sent in a `Close` frame);
            /// false for request errors (sent in an `Error` frame, the session goes on).
            pub const fn is_close(self) -> bool {
                match self { $(Code::$name => $fatal,)* }
            }

            /// For a close code: should the client reconnect (with backoff)? For a request
            /// error: may the same request succeed if retried later?
            pub const fn should_retry(self) -> bool {
                match self { $(Code::$name => $retry,)* }
            }

            /// Looks a numeric value up in the table.
            pub fn from_value(value: u64) -> Option<Code> {
                match value { $($value => Some(Code::$name),)* _ => None }
            }
        }
    };
}

codes! {
    // Request errors (Error frame; the session stays open).
    /// `room` is not a valid room name.
    InvalidRoom = 4101, "invalid_room", false, false;
    /// `event` is not a valid event name.
    InvalidEvent = 4102, "invalid_event", false, false;
    /// `data` is not exactly one well-formed CBOR item within the depth cap.
    InvalidPayload = 4103, "invalid_payload", false, false;
    /// The frame type is unknown to this broker (the frame is ignored).
    UnknownFrame = 4104, "unknown_frame", false, false;
    /// Unsubscribe from a room the session is not subscribed to.
    NotSubscribed = 4105, "not_subscribed", false, false;
    /// The session already holds its maximum number of subscriptions.
    TooManySubscriptions = 4106, "too_many_subscriptions", false, false;
    /// The session's token or the namespace policy does not allow this request (subscribe or
    /// publish in this room; a namespace the broker has no policy for).
    Forbidden = 4107, "forbidden", false, false;
    /// The session exceeded one of its rate limits (publishes, bytes, subscribe operations,
    /// datagrams); nothing was done. The message says after how many milliseconds to retry.
    RateLimited = 4108, "rate_limited", false, true;
    /// `data` is larger than the namespace's `max_payload_bytes`.
    PayloadTooLarge = 4109, "payload_too_large", false, false;
    /// `data` does not match the schema the namespace configures for the event.
    SchemaMismatch = 4110, "schema_mismatch", false, false;
    /// `Publish`: the idempotency key is empty or longer than 64 bytes.
    InvalidKey = 4111, "invalid_key", false, false;
    /// The broker cannot carry the request right now (cluster mode: not connected to NATS, or
    /// its publish queue is full); nothing was done, the same request may succeed later.
    Unavailable = 4503, "unavailable", false, true;
    // Close codes (Close frame, then the transport closes).
    /// Normal end of session (WebSocket 1000).
    Normal = 4000, "normal", true, false;
    /// The broker is shutting down or draining; reconnect, possibly to another node.
    ShuttingDown = 4001, "shutting_down", true, true;
    /// A frame was not valid CBOR, not a frame map, or had missing or mistyped fields.
    ProtocolError = 4400, "protocol_error", true, false;
    /// A frame other than `Hello` arrived before `Hello`, or `Hello` arrived twice.
    HelloRequired = 4401, "hello_required", true, false;
    /// A token is required but missing, or the token is invalid (signature, algorithm,
    /// audience, issuer, not yet valid), or a later token names another user.
    Unauthorized = 4403, "unauthorized", true, false;
    /// No `Hello` in time, or nothing received for the idle timeout.
    Timeout = 4408, "timeout", true, true;
    /// A frame exceeded the negotiated maximum frame size.
    FrameTooLarge = 4413, "frame_too_large", true, false;
    /// The session's token expired; reconnect with a fresh token.
    TokenExpired = 4419, "token_expired", true, true;
    /// The session kept making failing requests (rate-limited, forbidden, invalid) after being
    /// told: its error budget per window is spent.
    PolicyViolation = 4420, "policy_violation", true, false;
    /// The client's protocol version is not supported.
    UnsupportedVersion = 4426, "unsupported_version", true, false;
    /// The session's outbound queue exceeded its byte cap: the client does not read fast enough.
    SlowConsumer = 4429, "slow_consumer", true, true;
    /// The broker failed internally.
    Internal = 4500, "internal", true, true;
}

impl Code {
    /// The WebSocket close code for a close code: `Normal` maps to 1000, every other code is
    /// its own value (all lie in the application range 4000–4999).
    pub const fn ws_close_code(self) -> u16 {
        match self {
            Code::Normal => 1000,
            other => other.value(),
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn values_and_names_are_unique_and_round_trip() {
        let mut values = HashSet::new();
        let mut names = HashSet::new();
        for &code in Code::ALL {
            assert!(values.insert(code.value()), "duplicate value {code}");
            assert!(names.insert(code.as_str()), "duplicate name {code}");
            assert_eq!(Code::from_value(code.value().into()), Some(code));
        }
        assert_eq!(Code::from_value(1), None);
    }

    #[test]
    fn close_codes_map_into_websocket_application_range() {
        for &code in Code::ALL.iter().filter(|c| c.is_close()) {
            let ws = code.ws_close_code();
            assert!(ws == 1000 || (4000..5000).contains(&ws), "{code} -> {ws}");
        }
        assert_eq!(Code::Normal.ws_close_code(), 1000);
        assert_eq!(Code::SlowConsumer.ws_close_code(), 4429);
    }
}
