//! The roomcast wire protocol, sans-IO.
//!
//! This crate owns the bytes on the wire and the rules about them: the CBOR frame codec
//! ([`frame`]), the one table of error and close codes ([`code`]), the validated room and event
//! names ([`name`]), validated opaque event payloads ([`payload`]), the broker-side session
//! state machine ([`session`]), the client-side one ([`client`]: requests, room positions,
//! recovery, keyed resends, token refresh and keepalive across reconnects) and the length-prefixed framing used on WebTransport streams
//! ([`stream`]).
//!
//! It does **no networking and reads no clock**: bytes come in as slices, time comes in as an
//! argument (`now: Instant`), and what the caller must do comes back as values. Transports,
//! fan-out, NATS and timers belong to `roomcast-broker` and `roomcast-client`.
//!
//! The normative description of the format is `docs/PROTOCOL.md`; its hex test vectors are
//! decoded by this crate's tests.

pub mod client;
pub mod code;
pub mod frame;
pub mod name;
pub mod payload;
pub mod session;
pub mod stream;

pub use client::{ClientSession, CloseInfo, Recovery, Resumption};
pub use code::Code;
pub use frame::{ClientFrame, DecodeError, Position, ServerFrame};
pub use name::{EventName, NameError, RoomName};
pub use payload::{CodecError, Payload, PayloadError, PayloadLimits};
pub use session::{Action, ServerSession, SessionConfig};

/// The newest protocol version this crate speaks. Version 1 is the only one so far.
pub const PROTOCOL_VERSION: u64 = 1;
