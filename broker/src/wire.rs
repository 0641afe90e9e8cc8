//! Frames as the broker sends them: encoded once and shared by reference count, with a
//! transport's header written in front of `Event` frames when they are encoded, so that a
//! writer sends header and frame as one slice instead of building them per delivery:
//!
//! - events of ordinary rooms carry the WebSocket frame header (formatting it per delivery
//!   was a quarter of the broker's own instructions per delivery with 1,000 subscribers;
//!   docs/BENCHMARKS.md);
//! - events of volatile rooms, which go out as QUIC datagrams, carry the HTTP/3 datagram
//!   header of a WebTransport session on stream 0 (RFC 9297: the quarter stream id, 0), so
//!   the datagram is the shared bytes themselves instead of a copy per subscriber.
//!
//! Every other reader sees only the frame.
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

/// An encoded frame, maybe with a transport's header in front of it in the same allocation.
/// Dereferences to the frame alone. The default is empty (no frame is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wire {
    /// The header (if any) followed by the frame.
    bytes: Bytes,
    /// Length of the header at the start of `bytes`; 0: none.
    header: u8,
    /// What the header is.
    kind: Framing,
}

/// The header written in front of a [`Wire`]'s frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Framing {
    /// None: the frame alone.
    #[default]
    None,
    /// A WebSocket binary frame header (events of ordinary rooms).
    WebSocket,
    /// The HTTP/3 datagram header of the WebTransport session on stream 0 (events of volatile
    /// rooms; WebSocket writers format their header for these per delivery).
    Datagram,
}

/// The HTTP/3 datagram header of session stream 0: its quarter stream id, 0, as a QUIC varint.
const SESSION_ZERO_DATAGRAM_HEADER: u8 = 0x00;

impl Wire {
    /// Encodes an `Event` frame with the header `framing` asks for in front.
    pub fn event(
        framing: Framing,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        seq: u64,
        epoch: Option<u64>,
    ) -> Wire {
        let reserved = match framing {
            Framing::None => 0,
            Framing::WebSocket => MAX_WS_HEADER,
            Framing::Datagram => 1,
        };
        let mut buf = Vec::with_capacity(reserved + 64 + data.len());
        buf.resize(reserved, SESSION_ZERO_DATAGRAM_HEADER);
        write_event(&mut buf, room, event, data, seq, epoch);
        let header = match framing {
            Framing::None | Framing::Datagram => reserved,
            Framing::WebSocket => {
                let mut header = Vec::with_capacity(MAX_WS_HEADER);
                let frame_len = (buf.len() - MAX_WS_HEADER) as u64;
                if let Err(e) = ws_binary_header().format(frame_len, &mut header) {
                    // Formatting into a Vec cannot fail.
                    unreachable!("WebSocket header formatting into memory failed: {e}");
                }
                buf[MAX_WS_HEADER - header.len()..MAX_WS_HEADER].copy_from_slice(&header);
                header.len()
            }
        };
        let mut bytes = Bytes::from(buf);
        bytes.advance(reserved - header);
        Wire {
            bytes,
            header: header as u8,
            kind: framing,
        }
    }

    /// The frame alone.
    pub fn frame(&self) -> &[u8] {
        &self.bytes[usize::from(self.header)..]
    }

    /// Length of the frame alone (what [`Wire::frame`] would give, without slicing).
    #[inline]
    pub fn len(&self) -> usize {
        self.bytes.len() - usize::from(self.header)
    }

    /// True for the empty default, which no encoded frame is.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame alone, sharing the allocation.
    pub fn frame_bytes(&self) -> Bytes {
        if self.header == 0 {
            self.bytes.clone()
        } else {
            self.bytes.slice(usize::from(self.header)..)
        }
    }

    /// Header and frame as one WebSocket binary message, when the header was written at
    /// encoding time.
    pub fn ws_message(&self) -> Option<&[u8]> {
        (self.kind == Framing::WebSocket).then_some(&self.bytes[..])
    }

    /// The frame as an HTTP/3 datagram of the WebTransport session on stream 0, sharing the
    /// allocation, when it was encoded so.
    pub fn session_zero_datagram(&self) -> Option<Bytes> {
        (self.kind == Framing::Datagram).then(|| self.bytes.clone())
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
            header: 0,
            kind: Framing::None,
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
            Wire::event(Framing::WebSocket, &room, &event, &data, 7, None),
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
    fn a_volatile_event_is_a_session_zero_datagram_around_the_same_frame() {
        let room = RoomName::new("gps:truck-7").unwrap();
        let event = EventName::new("pos").unwrap();
        let data = Payload::encode(&[52.52f64, 13.40]).unwrap();
        let wire = Wire::event(Framing::Datagram, &room, &event, &data, 9, None);
        let plain = encode_event(&room, &event, &data, 9, None);
        assert_eq!(wire.frame(), &plain[..]);
        assert_eq!(wire.len(), plain.len());
        assert_eq!(wire.frame_bytes(), plain);
        assert_eq!(
            wire.ws_message(),
            None,
            "WebSocket writers add their own header"
        );
        let datagram = wire.session_zero_datagram().unwrap();
        // RFC 9297: quarter stream id (session stream 0 / 4 = 0, a one-byte varint), payload.
        assert_eq!(datagram[0], 0x00);
        assert_eq!(&datagram[1..], &plain[..]);
        assert_eq!(
            Wire::event(Framing::WebSocket, &room, &event, &data, 9, None).session_zero_datagram(),
            None
        );
        let unframed = Wire::event(Framing::None, &room, &event, &data, 9, None);
        assert_eq!(unframed, Wire::from(plain));
    }

    #[test]
    fn a_plain_frame_has_no_websocket_message() {
        let wire = Wire::from(Bytes::from_static(b"\xa1\x00\x10"));
        assert_eq!(wire.ws_message(), None);
        assert_eq!(wire.session_zero_datagram(), None);
        assert_eq!(wire.frame(), b"\xa1\x00\x10");
        assert_eq!(wire.frame_bytes(), Bytes::from_static(b"\xa1\x00\x10"));
    }
}
