//! Frames as the broker sends them: encoded once and shared by reference count, with the
//! WebSocket frame header written in front of `Event` frames when they are encoded, so that a
//! WebSocket writer sends header and frame as one slice instead of formatting a header per
//! delivery (with 1,000 subscribers that was a quarter of the broker's own instructions per
//! delivery; docs/BENCHMARKS.md). Other transports see only the frame.
//!
//! Owns no I/O and knows nothing of rooms, sessions or queues.

use std::ops::Deref;

use bytes::{Buf, Bytes};
use roomcast_protocol::{EventName, Payload, RoomName, frame::write_event};
use tokio_tungstenite::tungstenite::protocol::frame::{
    FrameHeader,
    coding::{Data, OpCode},
};

/// Longest WebSocket header of an unmasked server frame (64-bit length).
const MAX_WS_HEADER: usize = 10;

/// An encoded frame, maybe with its WebSocket header in front of it in the same allocation.
/// Dereferences to the frame alone. The default is empty (no frame is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wire {
    /// The WebSocket header (if any) followed by the frame.
    bytes: Bytes,
    /// Length of the WebSocket header at the start of `bytes`; 0: none.
    ws_header: u8,
}

impl Wire {
    /// Encodes an `Event` frame with its WebSocket header in front.
    pub fn event(
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        seq: u64,
        epoch: Option<u64>,
    ) -> Wire {
        let mut buf = Vec::with_capacity(MAX_WS_HEADER + 64 + data.len());
        buf.resize(MAX_WS_HEADER, 0);
        write_event(&mut buf, room, event, data, seq, epoch);
        let mut header = Vec::with_capacity(MAX_WS_HEADER);
        let frame_len = (buf.len() - MAX_WS_HEADER) as u64;
        if let Err(e) = ws_binary_header().format(frame_len, &mut header) {
            // Formatting into a Vec cannot fail.
            unreachable!("WebSocket header formatting into memory failed: {e}");
        }
        let start = MAX_WS_HEADER - header.len();
        buf[start..MAX_WS_HEADER].copy_from_slice(&header);
        let mut bytes = Bytes::from(buf);
        bytes.advance(start);
        Wire {
            bytes,
            ws_header: header.len() as u8,
        }
    }

    /// The frame alone.
    pub fn frame(&self) -> &[u8] {
        &self.bytes[usize::from(self.ws_header)..]
    }

    /// Length of the frame alone (what [`Wire::frame`] would give, without slicing).
    #[inline]
    pub fn len(&self) -> usize {
        self.bytes.len() - usize::from(self.ws_header)
    }

    /// True for the empty default, which no encoded frame is.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame alone, sharing the allocation.
    pub fn frame_bytes(&self) -> Bytes {
        if self.ws_header == 0 {
            self.bytes.clone()
        } else {
            self.bytes.slice(usize::from(self.ws_header)..)
        }
    }

    /// Header and frame as one WebSocket binary message, when the header was written at
    /// encoding time.
    pub fn ws_message(&self) -> Option<&[u8]> {
        (self.ws_header > 0).then_some(&self.bytes[..])
    }
}

/// The header of an unmasked, final, binary WebSocket frame (length filled in when formatted).
pub fn ws_binary_header() -> FrameHeader {
    FrameHeader {
        opcode: OpCode::Data(Data::Binary),
        ..FrameHeader::default()
    }
}

impl From<Bytes> for Wire {
    /// A frame without a WebSocket header.
    fn from(frame: Bytes) -> Self {
        Wire {
            bytes: frame,
            ws_header: 0,
        }
    }
}

impl Deref for Wire {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.frame()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_protocol::{PayloadLimits, ServerFrame, frame::encode_event};

    fn event_of(size: usize) -> (Wire, Bytes) {
        let room = RoomName::new("prices:EURUSD").unwrap();
        let event = EventName::new("tick").unwrap();
        let data = Payload::encode(&vec![0u8; size]).unwrap();
        (
            Wire::event(&room, &event, &data, 7, None),
            encode_event(&room, &event, &data, 7, None),
        )
    }

    #[test]
    fn an_event_carries_the_same_frame_behind_a_websocket_header_of_the_right_length() {
        // Frame lengths below 126, below 65,536 and above: 2-, 4- and 10-byte headers.
        for (size, header_len) in [(10, 2), (1_000, 4), (70_000, 10)] {
            let (wire, plain) = event_of(size);
            assert_eq!(wire.frame(), &plain[..]);
            assert_eq!(&wire[..], &plain[..]);
            assert_eq!(wire.frame_bytes(), plain);
            let message = wire.ws_message().expect("events are pre-framed");
            assert_eq!(message.len(), header_len + plain.len());
            let mut header = Vec::new();
            ws_binary_header()
                .format(plain.len() as u64, &mut header)
                .unwrap();
            assert_eq!(&message[..header_len], &header[..]);
            assert_eq!(&message[header_len..], &plain[..]);
            assert!(matches!(
                ServerFrame::decode(wire.frame(), PayloadLimits::default()),
                Ok(ServerFrame::Event(e)) if e.seq == 7
            ));
        }
    }

    #[test]
    fn a_plain_frame_has_no_websocket_message() {
        let wire = Wire::from(Bytes::from_static(b"\xa1\x00\x10"));
        assert_eq!(wire.ws_message(), None);
        assert_eq!(wire.frame(), b"\xa1\x00\x10");
        assert_eq!(wire.frame_bytes(), Bytes::from_static(b"\xa1\x00\x10"));
    }
}
