//! What every scenario shares: opening sessions, reading events straight off the socket,
//! locating `seq` and the payload inside an `Event` frame without decoding it, payloads of an
//! exact size, and reading the broker's CPU and memory from /proc.

use std::io::Cursor;

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use roomcast_protocol::{
    ClientFrame, EventName, PROTOCOL_VERSION, Payload, PayloadLimits, RoomName, ServerFrame,
    frame::encode_event,
};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async_with_config,
    tungstenite::{
        Message,
        protocol::frame::{
            FrameHeader,
            coding::{Data, OpCode},
        },
    },
};

/// A WebSocket session as tokio-tungstenite holds it.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Receives the next frame, which must decode.
async fn next_frame(ws: &mut Socket) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return Ok(ServerFrame::decode(&b, PayloadLimits::default())?);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => bail!("expected a frame, got {other:?}"),
        }
    }
}

/// Connects (TCP_NODELAY on) and completes Hello/Welcome.
pub(crate) async fn open_session(url: &str) -> anyhow::Result<Socket> {
    let (mut ws, _) = connect_async_with_config(url, None, true)
        .await
        .context("connect")?;
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: None,
    };
    ws.send(Message::Binary(hello.encode())).await?;
    match next_frame(&mut ws).await? {
        ServerFrame::Welcome(_) => Ok(ws),
        other => bail!("expected Welcome, got {other:?}"),
    }
}

/// Opens a session subscribed to `room`.
pub(crate) async fn open_subscriber(url: &str, room: &str) -> anyhow::Result<Socket> {
    let mut ws = open_session(url).await?;
    let subscribe = ClientFrame::Subscribe {
        id: 1,
        room: room.to_owned(),
    };
    ws.send(Message::Binary(subscribe.encode())).await?;
    match next_frame(&mut ws).await? {
        ServerFrame::Subscribed { .. } => Ok(ws),
        other => bail!("expected Subscribed, got {other:?}"),
    }
}

/// A publish frame (no ack) for `room`/`event` with `data`.
pub(crate) fn publish_frame(room: &str, event: &str, data: Bytes) -> Bytes {
    ClientFrame::Publish {
        id: 0,
        room: room.to_owned(),
        event: event.to_owned(),
        data,
        ack: false,
    }
    .encode()
}

/// A payload of exactly `size` bytes (at least 1): a CBOR byte string with its head, the body
/// filled with `fill`.
pub(crate) fn payload(size: usize, fill: u8) -> Bytes {
    let mut out = Vec::with_capacity(size.max(1));
    let body = match size {
        0 | 1 => return Bytes::from_static(&[0x40]),
        2..=24 => {
            out.push(0x40 | (size - 1) as u8);
            size - 1
        }
        25..=257 => {
            out.extend_from_slice(&[0x58, (size - 2) as u8]);
            size - 2
        }
        _ => {
            out.push(0x59);
            out.extend_from_slice(&((size - 3) as u16).to_be_bytes());
            size - 3
        }
    };
    out.resize(out.len() + body, fill);
    Bytes::from(out)
}

/// Where `seq` and the payload's content sit in the `Event` frames of one room, event name and
/// payload size: computed once from a sample encoding, so reading an event costs one bounds
/// check instead of a decode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventLayout {
    /// Offset of the payload's content (after the byte string head).
    content_at: usize,
    /// Offset of the seq value (after key 5).
    seq_at: usize,
}

impl EventLayout {
    /// The layout for events of `room`/`event` carrying `payload` (made by [`payload`]).
    pub(crate) fn new(room: &str, event: &str, payload: &Bytes) -> anyhow::Result<Self> {
        let data = Payload::new(payload.clone(), PayloadLimits::default())?;
        let frame = encode_event(&RoomName::new(room)?, &EventName::new(event)?, &data, 0);
        // The encoder writes the data as a byte string holding the payload, then key 5, then seq.
        let seq_at = frame.len() - 1;
        let data_end = seq_at - 1;
        let data_at = data_end - payload.len();
        let head = payload.len() - payload_content_len(payload);
        if frame[data_end] != 0x05 || frame[data_at..data_end] != payload[..] {
            bail!("unexpected Event layout");
        }
        Ok(EventLayout {
            content_at: data_at + head,
            seq_at,
        })
    }

    /// The seq of an `Event` frame of this layout.
    pub(crate) fn seq(&self, frame: &[u8]) -> Option<u64> {
        let tail = frame.get(self.seq_at..)?;
        if frame.get(self.seq_at - 1) != Some(&0x05) {
            return None;
        }
        match ciborium_ll::Decoder::from(tail).pull() {
            Ok(ciborium_ll::Header::Positive(seq)) => Some(seq),
            _ => None,
        }
    }

    /// The first 8 content bytes of the payload as a little-endian u64 (a timestamp put there
    /// by the publisher).
    pub(crate) fn stamp(&self, frame: &[u8]) -> Option<u64> {
        let bytes = frame.get(self.content_at..self.content_at + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

fn payload_content_len(payload: &Bytes) -> usize {
    match payload.first() {
        Some(&b) if b & 0x1f < 24 => (b & 0x1f) as usize,
        Some(0x58) => payload.len() - 2,
        Some(0x59) => payload.len() - 3,
        _ => 0,
    }
}

/// Reads binary frames straight off the TCP socket of a session whose handshake went through
/// tungstenite: many frames per read system call, headers parsed by tungstenite's
/// `FrameHeader`.
pub(crate) struct RawFrames {
    tcp: tokio::net::TcpStream,
    buf: BytesMut,
    /// Read system calls so far.
    pub(crate) reads: u64,
}

impl RawFrames {
    /// Takes the socket over; `None` for TLS sessions.
    pub(crate) fn new(ws: Socket) -> Option<Self> {
        match ws.into_inner() {
            MaybeTlsStream::Plain(tcp) => Some(RawFrames {
                tcp,
                buf: BytesMut::with_capacity(16 * 1024),
                reads: 0,
            }),
            _ => None,
        }
    }

    /// Waits for the next read and hands every complete binary frame's payload to `on_frame`.
    /// Returns false once the connection has ended.
    pub(crate) async fn read(&mut self, mut on_frame: impl FnMut(&[u8])) -> bool {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.tcp.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => self.reads += 1,
        }
        loop {
            let mut cursor = Cursor::new(&self.buf[..]);
            let Ok(Some((header, len))) = FrameHeader::parse(&mut cursor) else {
                return true;
            };
            let start = cursor.position() as usize;
            let end = start + len as usize;
            if self.buf.len() < end {
                return true;
            }
            if header.opcode == OpCode::Data(Data::Binary) {
                on_frame(&self.buf[start..end]);
            } else if header.opcode
                == OpCode::Control(
                    tokio_tungstenite::tungstenite::protocol::frame::coding::Control::Close,
                )
            {
                return false;
            }
            self.buf.advance(end);
        }
    }
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// VmRSS of a process, in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_finds_seq_and_stamp() {
        for size in [10usize, 100, 300] {
            let mut data = payload(size, 0).to_vec();
            let layout_probe = payload(size, 0);
            let head = size - payload_content_len(&layout_probe);
            data[head..head + 8].copy_from_slice(&42u64.to_le_bytes());
            let data = Bytes::from(data);
            let layout = EventLayout::new("bench:x", "tick", &data).unwrap();
            let p = Payload::new(data.clone(), PayloadLimits::default()).unwrap();
            let (r, e) = (
                RoomName::new("bench:x").unwrap(),
                EventName::new("tick").unwrap(),
            );
            for seq in [1, 23, 24, 70_000, u64::MAX] {
                let frame = encode_event(&r, &e, &p, seq);
                assert_eq!(layout.seq(&frame), Some(seq));
                assert_eq!(layout.stamp(&frame), Some(42));
            }
        }
    }

    #[test]
    fn payload_sizes_are_exact_and_valid() {
        for size in [1usize, 2, 24, 25, 100, 257, 258, 4000] {
            let p = payload(size, 7);
            assert_eq!(p.len(), size);
            Payload::new(p, PayloadLimits::default()).unwrap();
        }
    }
}
