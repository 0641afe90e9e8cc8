//! WebTransport adapter (HTTP/3 over QUIC, via wtransport on quinn and rustls).
//!
//! A session is one WebTransport session at `/wt`. The client opens one bidirectional control
//! stream; both directions carry length-prefixed frames (QUIC varint length, then the CBOR
//! frame). The broker opens one unidirectional stream per subscribed room: it starts with the
//! room's `Subscribed`, carries the room's events in order and ends with `Unsubscribed` and
//! FIN, so loss on one room's stream never delays another room. Rooms opened while the client
//! grants no stream credit share the control stream instead. Events of volatile rooms travel
//! as QUIC datagrams (one frame per datagram) when they fit, and clients may send frames (e.g.
//! publishes from trackers) as datagrams. What QUIC does not take at once stays as the
//! channel's backlog; past half the outbox cap of backlog, the frames of backlogged channels
//! wait in the session's outbox instead ([`FrameWriter::holds`]), where conflation and the
//! outbox cap apply to them. No protocol logic lives here.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use roomcast_protocol::{
    Code,
    stream::{FrameSplitter, read_varint, write_prefix},
};
use tokio::io::AsyncReadExt;
use wtransport::{Connection, RecvStream, SendStream, VarInt, error::ConnectionError};

use super::{FrameReader, FrameWriter, Incoming, TransportError};
use crate::wire::{Lane, Outgoing};

/// How long the broker waits, after its `Close` frame, for the client to close the session
/// before closing it itself.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long the client may take to close in answer to the `CLOSE_WEBTRANSPORT_SESSION`
/// capsule before the broker closes the QUIC connection (the sum of the close path's waits
/// stays within the session's close budget).
const CAPSULE_GRACE: Duration = Duration::from_millis(250);

/// Bytes read from the control stream at a time when no frame length is known: clients send
/// little, and the buffer stays allocated for the session's life (measured: 4 KiB here cost
/// 4 KiB per idle session).
const CONTROL_READ_CHUNK: usize = 512;

/// When a session closes, how long its room streams, then its control stream, may take to
/// write their backlog.
const CLOSE_FLUSH_STEP: Duration = Duration::from_millis(300);

/// Most room streams one session holds open at once; further rooms share the control stream.
const MAX_ROOM_STREAMS: usize = 1024;

/// Per-session WebTransport settings.
#[derive(Debug, Clone)]
pub(crate) struct WtSettings {
    /// Largest frame accepted on the control stream, bytes.
    pub max_frame: usize,
    /// Time allowed for the client to open its control stream.
    pub hello_timeout: Duration,
    /// Put every room on the control stream (measurement knob).
    pub single_stream: bool,
    /// Bytes written but not yet accepted by QUIC from which the writer asks the session to
    /// keep the frames of backlogged channels in its outbox ([`FrameWriter::holds`]).
    pub hold_backlog: usize,
    /// Most bytes written but not yet accepted by QUIC before the session is a slow consumer.
    pub max_backlog: usize,
    /// Counts datagrams received.
    pub datagrams_in: Counter,
    /// Counts datagrams sent.
    pub datagrams_out: Counter,
}

/// Waits for the client's control stream and splits the session into reader and writer.
/// Returns the connection back if no control stream arrives in `hello_timeout`.
pub(crate) async fn open(
    connection: Connection,
    settings: WtSettings,
) -> Result<(WtReader, WtWriter), Connection> {
    let WtSettings {
        max_frame,
        hello_timeout,
        single_stream,
        hold_backlog,
        max_backlog,
        datagrams_in,
        datagrams_out,
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
            max_frame,
            datagrams_in,
        },
        WtWriter {
            session_zero: connection.session_id().into_u64() == 0,
            connection,
            control: Channel::new(send),
            rooms: HashMap::new(),
            closing: Vec::new(),
            backlog: AtomicUsize::new(0),
            hold_backlog,
            max_backlog,
            single_stream,
            datagrams_out,
        },
    ))
}

/// Ends a session with a code: the `CLOSE_WEBTRANSPORT_SESSION` capsule (the code's value and
/// name), a moment for the client to close in answer, then QUIC's `CONNECTION_CLOSE` with the
/// same code for a client that did not. Alone, it closes sessions with no control stream;
/// after a `Close` frame, it runs once the client had [`CLOSE_GRACE`] to close on its own
/// (a capsule right behind the frame could make the client drop the frame unread).
pub(crate) async fn close_connection(connection: &Connection, code: Code) {
    connection.close_session(u32::from(code.value()), code.as_str());
    let _ = tokio::time::timeout(CAPSULE_GRACE, connection.closed()).await;
    connection.close(
        VarInt::from_u32(u32::from(code.value())),
        code.as_str().as_bytes(),
    );
}

/// Receiving half: frames from the control stream. Any other stream the client opens is a
/// protocol error.
pub(crate) struct WtReader {
    connection: Connection,
    control: RecvStream,
    splitter: FrameSplitter,
    max_frame: usize,
    datagrams_in: Counter,
}

impl FrameReader for WtReader {
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        loop {
            match self.splitter.next_frame() {
                Ok(Some(frame)) => return Ok(Incoming::Frame(frame)),
                Ok(None) => {}
                Err(_) => return Err(TransportError::TooLarge),
            }
            let buffer = self.splitter.buffer(CONTROL_READ_CHUNK);
            tokio::select! {
                datagram = self.connection.receive_datagram() => {
                    return match datagram {
                        // A datagram carries one whole frame (no length prefix); it goes
                        // through the same checks as the control stream's frames, and its
                        // own rate limit (datagrams are not flow-controlled by QUIC).
                        Ok(datagram) => {
                            self.datagrams_in.inc();
                            let frame = datagram.payload();
                            if frame.len() > self.max_frame {
                                Err(TransportError::TooLarge)
                            } else {
                                Ok(Incoming::Datagram(frame))
                            }
                        }
                        Err(e) => session_ended(e),
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
                        Err(e) => session_ended(e),
                    };
                }
                opened = self.connection.accept_uni() => {
                    return match opened {
                        Ok(_) => Err(TransportError::Protocol(
                            "clients may not open unidirectional streams".into(),
                        )),
                        Err(e) => session_ended(e),
                    };
                }
            }
        }
    }
}

/// How the session's connection ended: closed by the client (or by us) is a close; lost,
/// timed out or reset is a broken connection.
fn session_ended(error: ConnectionError) -> Result<Incoming, TransportError> {
    match error {
        ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed => {
            Ok(Incoming::Closed)
        }
        other => Err(TransportError::Io(other.to_string())),
    }
}

/// Above this capacity a drained channel buffer is released rather than kept for reuse.
const RETAINED_BUFFER: usize = 16 * 1024;

/// One stream being written: length-prefixed frames not yet accepted by QUIC.
///
/// Writes never wait on one stream while another could progress: bytes QUIC does not take
/// right away stay here (the backlog) and are written by [`WtWriter::write_backlog`] for all
/// streams at once.
struct Channel {
    stream: SendStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already accepted by the stream.
    written: usize,
}

impl Channel {
    fn new(stream: SendStream) -> Self {
        Channel {
            stream,
            buf: Vec::new(),
            written: 0,
        }
    }

    fn backlog(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Appends one frame with its length prefix; returns the bytes added.
    fn push(&mut self, frame: &[u8]) -> usize {
        let before = self.buf.len();
        write_prefix(frame.len(), &mut self.buf);
        self.buf.extend_from_slice(frame);
        self.buf.len() - before
    }

    /// Writes what the stream accepts without waiting; returns the bytes written.
    fn write_now(&mut self) -> Result<usize, TransportError> {
        let start = self.written;
        while self.written < self.buf.len() {
            match self.stream.write(&self.buf[self.written..]).now_or_never() {
                Some(Ok(n)) => self.written += n,
                Some(Err(e)) => return Err(io_error(e)),
                None => break,
            }
        }
        let done = self.written - start;
        self.settle();
        Ok(done)
    }

    /// Writes the whole backlog, waiting for stream credit as needed. Cancel-safe: progress
    /// is recorded after every write.
    async fn write_backlog(&mut self, total: &AtomicUsize) -> Result<(), TransportError> {
        while self.written < self.buf.len() {
            let n = self
                .stream
                .write(&self.buf[self.written..])
                .await
                .map_err(io_error)?;
            self.written += n;
            total.fetch_sub(n, Ordering::Relaxed);
        }
        self.settle();
        Ok(())
    }

    /// Empties a fully written buffer, releasing a large one.
    fn settle(&mut self) {
        if self.written == self.buf.len() {
            self.written = 0;
            if self.buf.capacity() > RETAINED_BUFFER {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
    }

    /// Drops the frames of the backlog that QUIC has not started on, keeping the rest of the
    /// one it is in the middle of (the buffer holds whole length-prefixed frames from its
    /// start): the stream never ends inside a frame. Returns the bytes dropped.
    fn keep_frame_in_flight(&mut self) -> usize {
        let mut end = 0;
        while end < self.written {
            match read_varint(&self.buf[end..]) {
                Some((len, prefix)) => end += prefix + len as usize,
                // Cannot happen for bytes this channel wrote; keep everything then.
                None => return 0,
            }
        }
        let end = end.min(self.buf.len());
        let dropped = self.buf.len() - end;
        self.buf.truncate(end);
        self.settle();
        dropped
    }

    /// Ends the stream (FIN after what was written); QUIC delivers the rest on its own.
    fn finish(mut self) {
        let _ = self.stream.quic_stream_mut().finish();
    }
}

/// Where a room's frames go.
enum RoomChannel {
    /// Its own unidirectional stream.
    Stream(Channel),
    /// The control stream (no stream credit when the room opened).
    Control,
}

/// Sending half: the control stream and one stream per subscribed room.
pub(crate) struct WtWriter {
    connection: Connection,
    /// The session is on stream 0: volatile events' shared datagrams fit it as they are
    /// (see [`crate::wire`]).
    session_zero: bool,
    control: Channel,
    rooms: HashMap<u64, RoomChannel>,
    /// Streams of left rooms whose last bytes (ending with `Unsubscribed`) are not yet written;
    /// each gets its FIN once they are.
    closing: Vec<Channel>,
    /// Bytes queued in all channels and not yet accepted by QUIC (atomic only so that the
    /// concurrent writes of one task can share it).
    backlog: AtomicUsize,
    /// Backlog from which frames for backlogged channels stay in the session's outbox.
    hold_backlog: usize,
    /// Largest backlog before the session counts as a slow consumer.
    max_backlog: usize,
    /// Every room on the control stream.
    single_stream: bool,
    datagrams_out: Counter,
}

impl WtWriter {
    /// Opens the room's stream if the client grants credit right now.
    async fn open_room(&mut self, id: u64) {
        if self.rooms.contains_key(&id) {
            return;
        }
        let channel = if !self.single_stream && self.rooms.len() < MAX_ROOM_STREAMS {
            match self.connection.open_uni().now_or_never() {
                Some(Ok(opening)) => match opening.await {
                    Ok(stream) => RoomChannel::Stream(Channel::new(stream)),
                    Err(_) => RoomChannel::Control,
                },
                _ => RoomChannel::Control,
            }
        } else {
            RoomChannel::Control
        };
        self.rooms.insert(id, channel);
    }

    /// The channel carrying room `id` (the control stream if it has no stream of its own).
    fn room_channel(&mut self, id: u64) -> &mut Channel {
        match self.rooms.get_mut(&id) {
            Some(RoomChannel::Stream(channel)) => channel,
            _ => &mut self.control,
        }
    }

    /// Writes, on every channel with a backlog, what QUIC accepts without waiting.
    fn write_now(&mut self) -> Result<(), TransportError> {
        let mut written = self.control.write_now()?;
        for room in self.rooms.values_mut() {
            if let RoomChannel::Stream(channel) = room
                && channel.backlog() > 0
            {
                written += channel.write_now()?;
            }
        }
        for channel in &mut self.closing {
            written += channel.write_now()?;
        }
        self.backlog.fetch_sub(written, Ordering::Relaxed);
        self.finish_closed();
        Ok(())
    }

    /// The channel frames of `lane` would be written on (`None`: a room opening a new stream).
    fn lane_channel(&self, lane: Lane) -> Option<&Channel> {
        let id = match lane {
            Lane::Control => return Some(&self.control),
            Lane::RoomOpen(id) if !self.rooms.contains_key(&id) => return None,
            Lane::RoomOpen(id) | Lane::Room(id) | Lane::Volatile(id) | Lane::RoomClose(id) => id,
        };
        match self.rooms.get(&id) {
            Some(RoomChannel::Stream(channel)) => Some(channel),
            _ => Some(&self.control),
        }
    }

    /// Writes every channel's backlog, waiting for stream credit (`all`), or until one channel
    /// has written all of its backlog. Cancel-safe.
    async fn flush(&mut self, all: bool) -> Result<(), TransportError> {
        let WtWriter {
            control,
            rooms,
            closing,
            backlog,
            ..
        } = self;
        let mut writes = futures_util::stream::FuturesUnordered::new();
        if control.backlog() > 0 {
            writes.push(control.write_backlog(backlog));
        }
        for room in rooms.values_mut() {
            if let RoomChannel::Stream(channel) = room
                && channel.backlog() > 0
            {
                writes.push(channel.write_backlog(backlog));
            }
        }
        for channel in closing.iter_mut() {
            writes.push(channel.write_backlog(backlog));
        }
        let mut result = Ok(());
        while let Some(written) = writes.next().await {
            if written.is_err() || !all {
                result = written;
                break;
            }
        }
        drop(writes);
        self.finish_closed();
        result
    }

    /// Sends FIN on left rooms' streams that have written everything.
    fn finish_closed(&mut self) {
        let mut i = 0;
        while i < self.closing.len() {
            if self.closing[i].backlog() == 0 {
                self.closing.swap_remove(i).finish();
            } else {
                i += 1;
            }
        }
    }
}

fn io_error(e: impl std::fmt::Display) -> TransportError {
    TransportError::Io(e.to_string())
}

impl FrameWriter for WtWriter {
    /// Queues the batch on its channels and writes what QUIC takes right away; the rest is
    /// the backlog, written by [`FrameWriter::write_backlog`] while the session goes on.
    async fn send_batch(&mut self, batch: &mut Vec<Outgoing>) -> Result<(), TransportError> {
        // Counted once per batch: an atomic add per frame showed up as a twentieth of the
        // broker's time in WebTransport fan-out.
        let mut queued = 0;
        let datagram_max = self.connection.max_datagram_size();
        let quic_datagram_max = self.connection.quic_connection().max_datagram_size();
        for Outgoing { frame, lane } in batch.drain(..) {
            let added = match lane {
                Lane::Control => self.control.push(&frame),
                Lane::RoomOpen(id) => {
                    self.open_room(id).await;
                    self.room_channel(id).push(&frame)
                }
                Lane::Room(id) => self.room_channel(id).push(&frame),
                Lane::Volatile(id) => {
                    // A datagram when it fits (loss allowed); else the room's stream.
                    let sent = match frame.session_zero_datagram() {
                        Some(datagram) if self.session_zero => {
                            quic_datagram_max.is_some_and(|max| datagram.len() <= max)
                                && self
                                    .connection
                                    .quic_connection()
                                    .send_datagram(datagram)
                                    .is_ok()
                        }
                        _ => {
                            datagram_max.is_some_and(|max| frame.len() <= max)
                                && self.connection.send_datagram(frame.frame()).is_ok()
                        }
                    };
                    if sent {
                        self.datagrams_out.inc();
                        continue;
                    }
                    self.room_channel(id).push(&frame)
                }
                Lane::RoomClose(id) => match self.rooms.remove(&id) {
                    Some(RoomChannel::Stream(mut channel)) => {
                        let added = channel.push(&frame);
                        self.closing.push(channel);
                        added
                    }
                    _ => self.control.push(&frame),
                },
            };
            queued += added;
        }
        self.backlog.fetch_add(queued, Ordering::Relaxed);
        self.write_now()?;
        if self.backlog.load(Ordering::Relaxed) > self.max_backlog {
            return Err(TransportError::Backlogged);
        }
        Ok(())
    }

    fn has_backlog(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) > 0
    }

    /// Returns as soon as one channel has written its whole backlog, so that the session can
    /// hand over the frames it held for that channel.
    async fn write_backlog(&mut self) -> Result<(), TransportError> {
        self.flush(false).await
    }

    fn backpressured(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) >= self.hold_backlog
    }

    /// Holds the frames of a channel that still has a backlog (a room stream out of credit,
    /// or the control stream for the rooms riding it), once the backlog of all channels is
    /// over `hold_backlog`: they then wait in the outbox instead of here.
    fn holds(&self, lane: Lane) -> bool {
        self.lane_channel(lane)
            .is_some_and(|channel| channel.backlog() > 0)
    }

    /// QUIC takes whole writes, so only the frames not yet started are dropped, on every
    /// channel.
    async fn finish_frame(&mut self) -> Result<(), TransportError> {
        let mut dropped = self.control.keep_frame_in_flight();
        for room in self.rooms.values_mut() {
            if let RoomChannel::Stream(channel) = room {
                dropped += channel.keep_frame_in_flight();
            }
        }
        for channel in &mut self.closing {
            dropped += channel.keep_frame_in_flight();
        }
        self.backlog.fetch_sub(dropped, Ordering::Relaxed);
        Ok(())
    }

    async fn send_control(&mut self, _raw: Bytes) -> Result<(), TransportError> {
        // WebTransport has no transport-level replies for the session to relay.
        Ok(())
    }

    async fn close(&mut self, code: Code) -> Result<(), TransportError> {
        // Every wait is bounded so that the session is always closed with its code, within
        // the session's close budget: room streams get a moment to flush (none for a slow
        // consumer, whose backlog is the problem), then the control stream with the Close
        // frame, then the client gets a moment to close first.
        if code != Code::SlowConsumer {
            let _ = tokio::time::timeout(CLOSE_FLUSH_STEP, self.flush(true)).await;
        }
        let control = self.control.write_backlog(&self.backlog);
        if let Ok(Ok(())) = tokio::time::timeout(CLOSE_FLUSH_STEP, control).await {
            // quinn's finish: FIN without waiting for the peer's acknowledgement.
            let _ = self.control.stream.quic_stream_mut().finish();
            let _ = tokio::time::timeout(CLOSE_GRACE, self.connection.closed()).await;
        }
        close_connection(&self.connection, code).await;
        Ok(())
    }
}
