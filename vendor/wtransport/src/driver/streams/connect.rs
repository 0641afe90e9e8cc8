use tracing::debug;
use wtransport_proto::bytes::BytesWriter;
use wtransport_proto::bytes::IoReadError;
use wtransport_proto::capsule::capsules;
use wtransport_proto::capsule::Capsule;
use wtransport_proto::capsule::{self};
use wtransport_proto::error::ErrorCode;
use wtransport_proto::frame::Frame;
use wtransport_proto::varint::VarInt;

use super::session::StreamSession;
use super::ProtoReadError;
use super::ProtoWriteError;
use crate::driver::DriverError;
use crate::error::ApplicationClose;
use std::future::pending;

pub struct ConnectStream {
    stream: Option<StreamSession>,
    closing: bool,
}

impl ConnectStream {
    pub fn empty() -> Self {
        Self {
            stream: None,
            closing: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stream.is_none()
    }

    pub fn set_stream(&mut self, stream: StreamSession) {
        self.stream = Some(stream);
    }

    /// Whether [`Self::close`] sent (or tried to send) a capsule.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Sends a CLOSE_WEBTRANSPORT_SESSION capsule (see [`close_session_capsule`]) followed by
    /// FIN, once; the peer's answer (its FIN or capsule) is then read by [`Self::run`].
    pub async fn close(&mut self, capsule: Frame<'_>) -> Result<(), DriverError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };

        if std::mem::replace(&mut self.closing, true) {
            return Ok(());
        }

        match stream.write_frame(capsule).await {
            Ok(()) => {
                stream.finish_now();
                Ok(())
            }
            Err(ProtoWriteError::NotConnected) => Err(DriverError::NotConnected),
            // The peer no longer reads the CONNECT stream: it is ending the session itself.
            Err(ProtoWriteError::Stopped) => Ok(()),
        }
    }

    pub async fn run(&mut self) -> DriverError {
        let stream = match self.stream.as_mut() {
            Some(stream) => stream,
            None => pending().await,
        };

        loop {
            return match stream.read_frame().await {
                Ok(frame) => {
                    let capsule = match Capsule::with_frame(&frame) {
                        Some(capsule)
                            if matches!(
                                capsule.kind(),
                                capsule::CapsuleKind::CloseWebTransportSession
                            ) =>
                        {
                            capsule
                        }
                        // Unknown capsule, skip it
                        _ => {
                            debug!(
                                "Unknown capsule of kind {:?} of {}B",
                                frame.kind(),
                                frame.payload().len()
                            );

                            continue;
                        }
                    };

                    let close_session =
                        match capsules::CloseWebTransportSession::with_capsule(&capsule) {
                            Ok(close_session) => close_session,
                            Err(error_code) => return DriverError::Proto(error_code),
                        };

                    // reset right away to avoid receiving additional data which requires resetting with ErrorCode::Message.
                    self.stream
                        .take()
                        .unwrap()
                        .reset(ErrorCode::NoError.to_code());

                    DriverError::ApplicationClosed(ApplicationClose::new(
                        close_session.error_code(),
                        close_session
                            .reason()
                            .as_bytes()
                            .to_vec()
                            .into_boxed_slice(),
                    ))
                }
                Err(ProtoReadError::H3(error_code)) => DriverError::Proto(error_code),
                Err(ProtoReadError::IO(io_error)) => match io_error {
                    // Cleanly terminating a CONNECT stream without a CLOSE_WEBTRANSPORT_SESSION
                    // capsule SHALL be semantically equivalent to terminating it with a
                    // CLOSE_WEBTRANSPORT_SESSION capsule that has an error code of 0 and an empty error string.
                    IoReadError::ImmediateFin => DriverError::ApplicationClosed(
                        ApplicationClose::new(VarInt::from_u32(0), Box::new([])),
                    ),
                    IoReadError::UnexpectedFin | IoReadError::Reset => {
                        DriverError::Proto(ErrorCode::ClosedCriticalStream)
                    }
                    IoReadError::NotConnected => DriverError::NotConnected,
                },
            };
        }
    }
}

/// The HTTP/3 DATA frame carrying a CLOSE_WEBTRANSPORT_SESSION capsule: the capsule type, its
/// length, then `error_code` (32 bits, network byte order) and `reason`, cut to at most
/// 1024 bytes at a character boundary.
pub fn close_session_capsule(error_code: u32, reason: &str) -> Frame<'static> {
    const CAPSULE_TYPE_CLOSE_WEBTRANSPORT_SESSION: VarInt = VarInt::from_u32(0x2843);
    const MAX_REASON_LEN: usize = 1024;

    let mut reason_len = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    let reason = &reason.as_bytes()[..reason_len];
    let capsule_len = VarInt::from_u32(4 + reason_len as u32);

    let mut payload = Vec::new();
    payload
        .put_varint(CAPSULE_TYPE_CLOSE_WEBTRANSPORT_SESSION)
        .expect("Vec grows");
    payload.put_varint(capsule_len).expect("Vec grows");
    payload
        .put_bytes(&error_code.to_be_bytes())
        .expect("Vec grows");
    payload.put_bytes(reason).expect("Vec grows");

    Frame::new_data(payload.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_session_capsule_parses_back() {
        let empty = close_session_capsule(0, "");
        assert_eq!(empty.payload(), [0x68, 0x43, 4, 0, 0, 0, 0]);

        let frame = close_session_capsule(4408, "timeout");
        let capsule = Capsule::with_frame(&frame).expect("a capsule");
        let close = capsules::CloseWebTransportSession::with_capsule(&capsule).expect("valid");
        assert_eq!(close.error_code(), VarInt::from_u32(4408));
        assert_eq!(close.reason(), "timeout");
    }

    #[test]
    fn close_session_capsule_cuts_long_reasons_at_a_character() {
        let reason = "\u{20ac}".repeat(1000);
        let frame = close_session_capsule(u32::MAX, &reason);
        let capsule = Capsule::with_frame(&frame).expect("a capsule");
        let close = capsules::CloseWebTransportSession::with_capsule(&capsule).expect("valid");
        assert_eq!(close.error_code(), VarInt::from_u32(u32::MAX));
        assert_eq!(close.reason(), "\u{20ac}".repeat(341));
    }
}
