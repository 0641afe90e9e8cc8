//! The client's side of `Hello`/`Welcome`, without I/O.
//!
//! Owns [`Handshake`]: the `Hello` frame, the wait for `Welcome` (a `Close` or `Error` instead
//! is a refusal), the version check, and the room frames that overtake `Welcome` on other
//! WebTransport streams (kept, at most [`MAX_EARLY_FRAMES`], for [`super::ClientSession`]). It
//! must not open connections or time anything: the caller sends the bytes and bounds the wait.

use std::time::Duration;

use bytes::Bytes;

use super::CloseInfo;
use crate::{
    PROTOCOL_VERSION,
    code::Code,
    frame::{ClientFrame, DecodeError, ServerFrame, Welcome},
    payload::PayloadLimits,
};

/// Most frames held from other channels while waiting for `Welcome`; a broker sending more
/// is broken.
pub const MAX_EARLY_FRAMES: usize = 64;

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The broker refused the session with `Close`, asking to wait `retry_after` first.
    #[error("session closed: {info}")]
    Closed {
        /// How the broker ended the session.
        info: CloseInfo,
        /// The `Close`'s `retry_after`.
        retry_after: Option<Duration>,
    },
    /// The broker answered `Hello` with `Error`.
    #[error("broker error {code}: {message}")]
    Server {
        /// The broker's code.
        code: Code,
        /// The broker's detail.
        message: String,
    },
    /// The broker sent something other than `Welcome`, or chose a version this client does
    /// not speak.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One handshake in progress.
#[derive(Debug)]
pub struct Handshake {
    limits: PayloadLimits,
    early: Vec<Bytes>,
}

impl Handshake {
    /// Starts a handshake with `token`; returns it and the `Hello` frame to send.
    pub fn start(token: Option<String>, limits: PayloadLimits) -> (Self, Bytes) {
        let hello = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token,
        };
        let handshake = Handshake {
            limits,
            early: Vec::new(),
        };
        (handshake, hello.encode())
    }

    /// Handles one received frame: `Ok(Some(welcome))` once the session is open, `Ok(None)`
    /// to wait for more.
    pub fn handle_frame(&mut self, bytes: Bytes) -> Result<Option<Welcome>, HandshakeError> {
        let welcome = match ServerFrame::decode(&bytes, self.limits) {
            Ok(ServerFrame::Welcome(welcome)) => welcome,
            Ok(ServerFrame::Close {
                code,
                reason,
                reconnect,
                retry_after_ms,
            }) => {
                return Err(HandshakeError::Closed {
                    info: CloseInfo {
                        code: Some(code),
                        reason,
                        reconnect,
                    },
                    retry_after: retry_after_ms.map(Duration::from_millis),
                });
            }
            Ok(ServerFrame::Error { code, message, .. }) => {
                return Err(HandshakeError::Server { code, message });
            }
            // Room frames may overtake `Welcome` on WebTransport (PROTOCOL.md §2b): kept for
            // the session.
            Ok(
                ServerFrame::Subscribed { .. }
                | ServerFrame::Event(_)
                | ServerFrame::Conflation { .. }
                | ServerFrame::Unsubscribed { .. },
            ) if self.early.len() < MAX_EARLY_FRAMES => {
                self.early.push(bytes);
                return Ok(None);
            }
            Ok(other) => {
                return Err(HandshakeError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
            Err(DecodeError::UnknownType { .. }) => return Ok(None),
            Err(e) => return Err(HandshakeError::Protocol(format!("before Welcome: {e}"))),
        };
        if welcome.version == 0 || welcome.version > PROTOCOL_VERSION {
            return Err(HandshakeError::Protocol(format!(
                "broker chose protocol version {}, this client speaks 1..={PROTOCOL_VERSION}",
                welcome.version
            )));
        }
        Ok(Some(welcome))
    }

    /// The frames that arrived before `Welcome`, in arrival order: hand them to
    /// [`super::ClientSession::connected`].
    pub fn into_early(self) -> Vec<Bytes> {
        self.early
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Event;

    fn welcome(version: u64) -> Bytes {
        ServerFrame::Welcome(Welcome {
            version,
            session_id: "s".into(),
            server_time_ms: 0,
            max_frame_size: 1024,
            ping_interval_ms: 0,
            idle_timeout_ms: 0,
        })
        .encode()
    }

    fn event(seq: u64) -> Bytes {
        ServerFrame::Event(Event {
            room: "user:a".parse().unwrap(),
            event: "e".parse().unwrap(),
            data: crate::Payload::encode(&seq).unwrap(),
            seq,
            epoch: None,
        })
        .encode()
    }

    #[test]
    fn room_frames_before_welcome_are_kept_up_to_the_bound() {
        let (mut h, hello) = Handshake::start(Some("t".into()), PayloadLimits::default());
        assert!(matches!(
            ClientFrame::decode(&hello),
            Ok(ClientFrame::Hello { version: 1, token: Some(t) }) if t == "t"
        ));
        for seq in 1..=MAX_EARLY_FRAMES as u64 {
            assert_eq!(h.handle_frame(event(seq)), Ok(None));
        }
        assert!(matches!(
            h.handle_frame(event(99)),
            Err(HandshakeError::Protocol(_))
        ));
        let (mut h, _) = Handshake::start(None, PayloadLimits::default());
        h.handle_frame(event(1)).unwrap();
        assert!(h.handle_frame(welcome(1)).unwrap().is_some());
        assert_eq!(h.into_early(), vec![event(1)]);
    }

    #[test]
    fn refusals_and_bad_versions_fail() {
        let (mut h, _) = Handshake::start(None, PayloadLimits::default());
        let close = ServerFrame::Close {
            code: Code::Unauthorized,
            reason: "no".into(),
            reconnect: false,
            retry_after_ms: Some(5),
        };
        assert_eq!(
            h.handle_frame(close.encode()),
            Err(HandshakeError::Closed {
                info: CloseInfo {
                    code: Some(Code::Unauthorized),
                    reason: "no".into(),
                    reconnect: false
                },
                retry_after: Some(Duration::from_millis(5)),
            })
        );
        let (mut h, _) = Handshake::start(None, PayloadLimits::default());
        assert!(matches!(
            h.handle_frame(welcome(2)),
            Err(HandshakeError::Protocol(m)) if m.contains("version 2")
        ));
    }
}
