//! WebTransport adapter (HTTP/3 over QUIC, via wtransport on quinn and rustls).
//!
//! A session is one WebTransport session at `/wt`. The client opens one bidirectional control
//! stream; both directions carry length-prefixed frames (QUIC varint length, then the CBOR
//! frame). The broker opens one unidirectional stream per subscribed room: it starts with the
//! room's `Subscribed`, carries the room's events in order and ends with `Unsubscribed` and
//! FIN, so loss on one room's stream never delays another room. Rooms opened while the client
//! grants no stream credit share the control stream instead. Events of volatile rooms travel
//! as QUIC datagrams (one frame per datagram) when they fit, and clients may send frames (e.g.
//! publishes from trackers) as datagrams. No protocol logic lives here.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use futures_util::FutureExt;
use roomcast_protocol::{
    Code,
    stream::{FrameSplitter, write_prefix},
};
use tokio::io::AsyncReadExt;
use wtransport::{Connection, RecvStream, SendStream, VarInt};

use super::{FrameReader, FrameWriter, Incoming, TransportError};
use crate::outbox::{Lane, Outgoing};

/// How long the broker waits, after its `Close` frame, for the client to close the session
/// before closing it itself.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Most room streams one session holds open at once; further rooms share the control stream.
const MAX_ROOM_STREAMS: usize = 1024;

/// Per-session WebTransport settings.
#[derive(Debug, Clone, Copy)]
pub struct WtSettings {
    /// Largest frame accepted on the control stream, bytes.
    pub max_frame: usize,
    /// Time allowed for the client to open its control stream.
    pub hello_timeout: Duration,
    /// Put every room on the control stream (measurement knob).
    pub single_stream: bool,
}

/// Waits for the client's control stream and splits the session into reader and writer.
/// Returns the connection back if no control stream arrives in `hello_timeout`.
pub async fn open(
    connection: Connection,
    settings: WtSettings,
) -> Result<(WtReader, WtWriter), Connection> {
    let WtSettings {
        max_frame,
        hello_timeout,
        single_stream,
    } = settings;
    let (send, recv) = match tokio::time::timeout(hello_timeout, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        _ => return Err(connection),
    };
    Ok((
        WtReader {
            connection: connection.clone(),
            control: recv,
            splitter: FrameSplitter::new(max_frame),
        },
        WtWriter {
            connection,
            control: send,
            rooms: HashMap::new(),
            pending: Vec::new(),
            single_stream,
        },
    ))
}

/// Closes a session with a code (used when no control stream exists to carry a `Close`).
pub fn close_connection(connection: &Connection, code: Code) {
    connection.close(
        VarInt::from_u32(u32::from(code.value())),
        code.as_str().as_bytes(),
    );
}

/// Receiving half: frames from the control stream. Any other stream the client opens is a
/// protocol error.
pub struct WtReader {
    connection: Connection,
    control: RecvStream,
    splitter: FrameSplitter,
}

impl FrameReader for WtReader {
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        loop {
            match self.splitter.next_frame() {
                Ok(Some(frame)) => return Ok(Incoming::Frame(frame)),
                Ok(None) => {}
                Err(_) => return Err(TransportError::TooLarge),
            }
            let buffer = self.splitter.buffer(4096);
            tokio::select! {
                datagram = self.connection.receive_datagram() => {
                    return match datagram {
                        // A datagram carries one whole frame (no length prefix); it goes
                        // through the same checks as the control stream's frames.
                        Ok(datagram) => Ok(Incoming::Frame(datagram.payload())),
                        Err(_) => Ok(Incoming::Closed),
                    };
                }
                read = self.control.read_buf(buffer) => match read {
                    Ok(0) => return Ok(Incoming::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(TransportError::Io(e.to_string())),
                },
                opened = self.connection.accept_bi() => {
                    return match opened {
                        Ok(_) => Err(TransportError::Protocol(
                            "a session has exactly one client-opened (control) stream".into(),
                        )),
                        Err(_) => Ok(Incoming::Closed),
                    };
                }
                opened = self.connection.accept_uni() => {
                    return match opened {
                        Ok(_) => Err(TransportError::Protocol(
                            "clients may not open unidirectional streams".into(),
                        )),
                        Err(_) => Ok(Incoming::Closed),
                    };
                }
            }
        }
    }
}

/// Where a room's frames go.
enum RoomChannel {
    /// Its own unidirectional stream.
    Stream(SendStream),
    /// The control stream (no stream credit when the room opened).
    Control,
}

/// Sending half: the control stream and one stream per subscribed room.
pub struct WtWriter {
    connection: Connection,
    control: SendStream,
    rooms: HashMap<u64, RoomChannel>,
    /// Bytes per channel for the batch being written (`None` = control), in first-use order.
    pending: Vec<(Option<u64>, Vec<u8>)>,
    /// Every room on the control stream.
    single_stream: bool,
}

impl WtWriter {
    fn append(&mut self, channel: Option<u64>, frame: &Bytes) {
        let index = match self.pending.iter().position(|(c, _)| *c == channel) {
            Some(i) => i,
            None => {
                self.pending.push((channel, Vec::new()));
                self.pending.len() - 1
            }
        };
        let buf = &mut self.pending[index].1;
        write_prefix(frame.len(), buf);
        buf.extend_from_slice(frame);
    }

    /// Opens the room's stream if the client grants credit right now.
    async fn open_room(&mut self, id: u64) {
        if self.rooms.contains_key(&id) {
            return;
        }
        let channel = if !self.single_stream && self.rooms.len() < MAX_ROOM_STREAMS {
            match self.connection.open_uni().now_or_never() {
                Some(Ok(opening)) => match opening.await {
                    Ok(stream) => RoomChannel::Stream(stream),
                    Err(_) => RoomChannel::Control,
                },
                _ => RoomChannel::Control,
            }
        } else {
            RoomChannel::Control
        };
        self.rooms.insert(id, channel);
    }

    fn channel_of(&self, id: u64) -> Option<u64> {
        match self.rooms.get(&id) {
            Some(RoomChannel::Stream(_)) => Some(id),
            _ => None,
        }
    }
}

fn io_error(e: impl std::fmt::Display) -> TransportError {
    TransportError::Io(e.to_string())
}

impl FrameWriter for WtWriter {
    async fn send_batch(&mut self, batch: &mut Vec<Outgoing>) -> Result<(), TransportError> {
        let mut finished = Vec::new();
        for Outgoing { frame, lane } in batch.drain(..) {
            let channel = match lane {
                Lane::Control => None,
                Lane::RoomOpen(id) => {
                    self.open_room(id).await;
                    self.channel_of(id)
                }
                Lane::Room(id) => self.channel_of(id),
                Lane::Volatile(id) => {
                    // A datagram when it fits (loss allowed); else the room's stream.
                    let fits = self
                        .connection
                        .max_datagram_size()
                        .is_some_and(|max| frame.len() <= max);
                    if fits && self.connection.send_datagram(frame.clone()).is_ok() {
                        continue;
                    }
                    self.channel_of(id)
                }
                Lane::RoomClose(id) => {
                    finished.push(id);
                    self.channel_of(id)
                }
            };
            self.append(channel, &frame);
        }
        let mut pending = std::mem::take(&mut self.pending);
        for (channel, bytes) in pending.drain(..) {
            let stream = match channel {
                None => &mut self.control,
                Some(id) => match self.rooms.get_mut(&id) {
                    Some(RoomChannel::Stream(stream)) => stream,
                    _ => &mut self.control,
                },
            };
            stream.write_all(&bytes).await.map_err(io_error)?;
        }
        self.pending = pending;
        for id in finished {
            if let Some(RoomChannel::Stream(mut stream)) = self.rooms.remove(&id) {
                let _ = stream.finish().await;
            }
        }
        Ok(())
    }

    async fn send_control(&mut self, _raw: Bytes) -> Result<(), TransportError> {
        // WebTransport has no transport-level replies for the session to relay.
        Ok(())
    }

    async fn close(&mut self, code: Code) -> Result<(), TransportError> {
        let _ = self.control.finish().await;
        // Let the client read the Close frame and close first; then close anyway.
        let _ = tokio::time::timeout(CLOSE_GRACE, self.connection.closed()).await;
        close_connection(&self.connection, code);
        Ok(())
    }
}
