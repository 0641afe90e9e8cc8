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
//! Every other reader sees only the frame. Also the vocabulary between the outbox and the
//! transports: the [`Lane`] a frame travels on and the queued [`Outgoing`] frame; and the
//! RFC 6455 header of a server's binary frame ([`ws_header`]), written here rather than by a
//! WebSocket library so that nothing but the WebSocket transport depends on one.
//!
//! Owns no I/O and imports nothing of the hub, the outbox or the transports.

use std::ops::Deref;

use bytes::{Buf, Bytes};
use roomcast_protocol::{EventName, Payload, RoomName, frame::write_event};

/// Longest WebSocket header of an unmasked server frame (64-bit length).
pub const MAX_WS_HEADER: usize = 10;

/// The header of an unmasked, final (FIN), binary WebSocket frame carrying `len` bytes
/// (RFC 6455 §5.2): the bytes (the first `n` are the header) and `n`, which is 2 below 126
/// bytes, 4 up to 65,535 and 10 above.
#[inline]
pub fn ws_header(len: usize) -> ([u8; MAX_WS_HEADER], usize) {
    /// FIN set, no extension bits, opcode 2 (binary).
    const FIN_BINARY: u8 = 0x82;
    let mut header = [0u8; MAX_WS_HEADER];
    header[0] = FIN_BINARY;
    // The second byte is the mask bit (clear: servers do not mask) and the length or its
    // marker: 126 for a 16-bit length, 127 for a 64-bit one, both in network byte order.
    let n = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, n)
}

/// Length of [`ws_header`]`(len)`.
#[inline]
pub fn ws_header_len(len: usize) -> usize {
    match len {
        0..126 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

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
                let (header, n) = ws_header(buf.len() - MAX_WS_HEADER);
                buf[MAX_WS_HEADER - n..MAX_WS_HEADER].copy_from_slice(&header[..n]);
                n
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

/// The ordered channel a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Session-level frames: Welcome, Ack, Error, Pong, Close.
    Control,
    /// `Subscribed` of the room with this hub id: the room's channel opens.
    RoomOpen(u64),
    /// An `Event` (or `Conflation`) of the room with this hub id.
    Room(u64),
    /// An `Event` of the volatile room with this hub id: may travel as a datagram, and is
    /// dropped (oldest first) rather than overflowing the queue.
    Volatile(u64),
    /// `Unsubscribed` of the room with this hub id: the room's channel ends after it.
    RoomClose(u64),
}

impl Lane {
    /// The hub id of the lane's room (`None`: the control lane).
    pub fn room(self) -> Option<u64> {
        match self {
            Lane::Control => None,
            Lane::RoomOpen(id) | Lane::Room(id) | Lane::Volatile(id) | Lane::RoomClose(id) => {
                Some(id)
            }
        }
    }
}

/// One queued frame and its lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The encoded frame (shared with other sessions for events).
    pub frame: Wire,
    /// Where it goes.
    pub lane: Lane,
}

impl Outgoing {
    /// A session-level frame.
    pub fn control(frame: Bytes) -> Self {
        Outgoing {
            frame: frame.into(),
            lane: Lane::Control,
        }
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
            let (header, n) = ws_header(plain.len());
            assert_eq!(n, header_len);
            assert_eq!(&message[..header_len], &header[..n]);
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

    #[test]
    fn websocket_headers_match_rfc_6455() {
        // FIN + binary (0x82), no mask bit; 7-bit, 16-bit (126) and 64-bit (127) lengths.
        let cases: [(usize, &[u8]); 7] = [
            (0, &[0x82, 0x00]),
            (1, &[0x82, 0x01]),
            (125, &[0x82, 0x7d]),
            (126, &[0x82, 0x7e, 0x00, 0x7e]),
            (65_535, &[0x82, 0x7e, 0xff, 0xff]),
            (65_536, &[0x82, 0x7f, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]),
            (
                0x0123_4567_89ab,
                &[0x82, 0x7f, 0, 0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab],
            ),
        ];
        for (len, expected) in cases {
            let (header, n) = ws_header(len);
            assert_eq!(&header[..n], expected, "length {len}");
            assert_eq!(ws_header_len(len), n, "length {len}");
        }
    }
}
