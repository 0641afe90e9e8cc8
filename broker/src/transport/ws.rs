//! WebSocket adapter: the HTTP upgrade handshake (over hyper, on axum's router), reading with
//! tungstenite's protocol state machine fed straight from the socket, and writing pre-encoded
//! frames with one vectored write per batch (events come with their header written once per
//! publish, see [`crate::wire`]; other frames get theirs from [`crate::wire::ws_header`]). One binary message is one frame; text messages are a protocol violation;
//! WebSocket ping and close are answered through [`Incoming::Control`].

use axum::{
    body::Body,
    http::{Extensions, HeaderMap, HeaderValue, Response, StatusCode, header},
};
use std::io::{self, IoSlice};

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use roomcast_protocol::Code;
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::{
    self, Message,
    error::{CapacityError, ProtocolError},
    handshake::derive_accept_key,
    protocol::{
        CloseFrame, Role, WebSocketConfig, WebSocketContext,
        frame::{Frame, coding::CloseCode},
    },
};

use super::{FrameReader, FrameWriter, Incoming, TransportError};
use crate::wire::{Outgoing, ws_header, ws_header_len};

/// Buffer and size settings for WebSocket sessions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WsSettings {
    /// Read buffer per connection, bytes.
    pub read_buffer: usize,
    /// Largest accepted message, bytes.
    pub max_message: usize,
}

impl WsSettings {
    fn tungstenite(self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message))
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Why an upgrade request was refused; becomes the HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpgradeRefusal {
    /// HTTP status to answer with.
    pub status: StatusCode,
    /// Plain-text explanation.
    pub why: &'static str,
}

impl UpgradeRefusal {
    fn new(status: StatusCode, why: &'static str) -> Self {
        UpgradeRefusal { status, why }
    }

    /// The HTTP response (426 answers name the supported WebSocket version).
    pub(crate) fn into_response(self) -> Response<Body> {
        let mut response = Response::new(Body::from(self.why));
        *response.status_mut() = self.status;
        if self.status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// Checks an upgrade request (RFC 6455 §4.2.1). On success returns the `101 Switching
/// Protocols` response to send and the pending upgrade (taken out of `extensions`).
pub(crate) fn accept(
    headers: &HeaderMap,
    extensions: &mut Extensions,
) -> Result<(Response<Body>, OnUpgrade), UpgradeRefusal> {
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(UpgradeRefusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket upgrade required (Connection: upgrade, Upgrade: websocket)\n",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(UpgradeRefusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version must be 13\n",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(UpgradeRefusal::new(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key missing\n",
        ));
    };
    let Ok(accept_key) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return Err(UpgradeRefusal::new(
            StatusCode::BAD_REQUEST,
            "bad Sec-WebSocket-Key\n",
        ));
    };
    let Some(on_upgrade) = extensions.remove::<OnUpgrade>() else {
        return Err(UpgradeRefusal::new(
            StatusCode::BAD_REQUEST,
            "connection cannot be upgraded\n",
        ));
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    Ok((response, on_upgrade))
}

/// Completes the upgrade and splits the connection into the session's reader and writer:
/// plain TCP splits into owned halves without a lock; TLS goes through `tokio::io::split`.
pub(crate) async fn open(
    on_upgrade: OnUpgrade,
    settings: WsSettings,
) -> Result<(WsReader<BoxedRead>, WsWriter<BoxedWrite>), OpenError> {
    let upgraded = on_upgrade.await?;
    let config = Some(settings.tungstenite());
    let (read, write, early): (BoxedRead, BoxedWrite, Bytes) =
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let (read, write) = parts.io.into_inner().into_split();
                (Box::new(read), Box::new(write), parts.read_buf)
            }
            Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
                Ok(parts) => {
                    let (read, write) = tokio::io::split(parts.io.into_inner());
                    (Box::new(read), Box::new(write), parts.read_buf)
                }
                Err(_) => return Err(OpenError::UnknownStream),
            },
        };
    // Bytes the client sent right after its upgrade request (e.g. a pipelined Hello).
    let context = WebSocketContext::from_partially_read(early.to_vec(), Role::Server, config);
    Ok((
        WsReader {
            socket: read,
            context,
            control: Vec::new(),
            pending: None,
        },
        WsWriter::new(write),
    ))
}

/// The read half of a session's byte stream (TCP or TLS).
pub(crate) type BoxedRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a session's byte stream (TCP or TLS).
pub(crate) type BoxedWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Why an upgraded connection could not become a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The upgrade itself failed.
    #[error("upgrade failed: {0}")]
    Upgrade(#[from] hyper::Error),
    /// The connection is neither plain TCP nor TLS over TCP.
    #[error("upgraded connection is of an unknown type")]
    UnknownStream,
}

/// Receiving half of a WebSocket session: tungstenite's protocol state machine fed straight
/// from the socket (no second buffer).
pub(crate) struct WsReader<R> {
    socket: R,
    context: WebSocketContext,
    /// Frames tungstenite owes the peer (pong, close reply), already encoded.
    control: Vec<u8>,
    /// A message read in the same call that produced control bytes, returned next.
    pending: Option<tungstenite::Result<Message>>,
}

/// Sending half of a WebSocket session: writes pre-encoded frames with vectored writes.
///
/// Cancel-safe: the batch being written stays here with how far it got, so a write the
/// session abandons (its outbox overflowed while the socket was blocked) never leaves half a
/// frame behind: the next write, or [`FrameWriter::finish_frame`], starts where it stopped.
pub(crate) struct WsWriter<W> {
    socket: W,
    /// Frames of the batch being written.
    inflight: Vec<Outgoing>,
    /// WebSocket headers of the frames of `inflight` that carry none of their own, in order.
    headers: Vec<u8>,
    /// Index in `inflight` of the first frame not wholly written.
    next: usize,
    /// Bytes of that frame (its header included) already written.
    offset: usize,
    /// Where that frame's header starts in `headers` (when it has one there).
    header_at: usize,
}

/// The sync `Read + Write` view tungstenite wants, valid for one poll: reads take what the
/// socket has (registering the waker when it has nothing), writes (control replies) are
/// collected for the writer.
struct Pipe<'a, 'b, R> {
    socket: &'a mut R,
    cx: &'a mut Context<'b>,
    control: &'a mut Vec<u8>,
}

impl<R: AsyncRead + Unpin> io::Read for Pipe<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut read_buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.socket).poll_read(self.cx, &mut read_buf) {
            Poll::Ready(Ok(())) => Ok(read_buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<R> io::Write for Pipe<'_, '_, R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Control replies are tiny; cap what a misbehaving peer can make us hold.
        if self.control.len() + buf.len() > MAX_CONTROL_BYTES {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.control.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Most control-reply bytes held for the writer (a pong echoes at most 125 bytes).
const MAX_CONTROL_BYTES: usize = 4096;

fn map_error(e: tungstenite::Error) -> TransportError {
    match e {
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { .. }) => {
            TransportError::TooLarge
        }
        tungstenite::Error::Protocol(p) => TransportError::Protocol(p.to_string()),
        other => TransportError::Io(other.to_string()),
    }
}

fn would_block<T>(read: &tungstenite::Result<T>) -> bool {
    matches!(read, Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock)
}

impl<R: AsyncRead + Send + Unpin> FrameReader for WsReader<R> {
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Raw reads into a small scratch buffer: a client still flooding after its `Close`
    /// costs a copy per read, not a WebSocket decode per frame.
    async fn discard_input(&mut self, limit: usize) {
        let mut scratch = [0u8; 4096];
        let mut dropped = 0;
        while dropped < limit {
            match self.socket.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    }
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, TransportError>> {
        loop {
            if let Some(pending) = self.pending.take() {
                match Self::outcome(pending) {
                    Some(outcome) => return Poll::Ready(outcome),
                    None => continue,
                }
            }
            let mut pipe = Pipe {
                socket: &mut self.socket,
                cx,
                control: &mut self.control,
            };
            let read = self.context.read(&mut pipe);
            if let Ok(Message::Close(_)) = read {
                // Queue the close reply now; it leaves before `Closed` is reported.
                let _ = self.context.flush(&mut pipe);
            }
            // Replies tungstenite wrote while reading (pong, close reply) leave first; a
            // message or error read in the same call is returned by the next call.
            if !self.control.is_empty() {
                let control = Bytes::from(std::mem::take(&mut self.control));
                if !would_block(&read) {
                    self.pending = Some(read);
                }
                return Poll::Ready(Ok(Incoming::Control(control)));
            }
            if would_block(&read) {
                // The socket registered our waker when it had nothing to give.
                return Poll::Pending;
            }
            if let Some(outcome) = Self::outcome(read) {
                return Poll::Ready(outcome);
            }
        }
    }

    /// Maps one tungstenite read result; `None` means "read again" (after a control message).
    fn outcome(read: tungstenite::Result<Message>) -> Option<Result<Incoming, TransportError>> {
        match read {
            Ok(Message::Binary(bytes)) => Some(Ok(Incoming::Frame(bytes))),
            Ok(Message::Text(_)) => Some(Err(TransportError::Protocol(
                "text message: frames travel in binary messages".into(),
            ))),
            Ok(Message::Close(_)) => Some(Ok(Incoming::Closed)),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => None,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Some(Ok(Incoming::Closed))
            }
            // The TCP connection ended without a close handshake (a reset, a dropped client):
            // a broken connection, not a protocol error of the client's.
            Err(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                Some(Err(TransportError::Io(
                    "connection ended without a WebSocket close".into(),
                )))
            }
            Err(e) => Some(Err(map_error(e))),
        }
    }
}

/// Most frames per `writev` (two slices each, under the usual IOV_MAX of 1024).
const FRAMES_PER_WRITE: usize = 256;

/// Adds `part` to a write, less the first `*skip` bytes (already written), counting the bytes
/// added in `total`.
#[inline]
fn push_part<'a>(
    slices: &mut Vec<IoSlice<'a>>,
    part: &'a [u8],
    skip: &mut usize,
    total: &mut usize,
) {
    if *skip == 0 {
        *total += part.len();
        slices.push(IoSlice::new(part));
    } else if *skip >= part.len() {
        *skip -= part.len();
    } else {
        *total += part.len() - *skip;
        slices.push(IoSlice::new(&part[*skip..]));
        *skip = 0;
    }
}

/// Above this capacity, a written batch's buffers are released rather than kept for reuse
/// (idle sessions stay small after a burst).
const RETAINED_HEADERS: usize = 512;
const RETAINED_FRAMES: usize = 64;

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    fn new(socket: W) -> Self {
        WsWriter {
            socket,
            inflight: Vec::new(),
            headers: Vec::new(),
            next: 0,
            offset: 0,
            header_at: 0,
        }
    }

    /// Length of frame `frame`'s WebSocket header when it is kept in `headers` (0: the frame
    /// carries its own).
    fn separate_header_len(frame: &Outgoing) -> usize {
        match frame.frame.ws_message() {
            Some(_) => 0,
            None => ws_header_len(frame.frame.len()),
        }
    }

    /// Takes `batch` as the frames to write, formatting the headers of those without one.
    fn load(&mut self, batch: &mut Vec<Outgoing>) {
        debug_assert!(self.inflight.is_empty());
        std::mem::swap(batch, &mut self.inflight);
        self.headers.clear();
        for Outgoing { frame, .. } in &self.inflight {
            if frame.ws_message().is_none() {
                let (header, n) = ws_header(frame.len());
                self.headers.extend_from_slice(&header[..n]);
            }
        }
        (self.next, self.offset, self.header_at) = (0, 0, 0);
    }

    /// One vectored write from where the last one stopped (at most [`FRAMES_PER_WRITE`]
    /// frames); records the progress before returning. Cancel-safe.
    async fn write_some(&mut self) -> io::Result<()> {
        let WsWriter {
            socket,
            inflight,
            headers,
            next,
            offset,
            header_at,
        } = self;
        let mut slices: Vec<IoSlice<'_>> =
            Vec::with_capacity(FRAMES_PER_WRITE.min(inflight.len() - *next) * 2);
        // Bytes of the frame in flight already written: skipped from the first slices.
        let mut skip = *offset;
        let mut total = 0;
        let mut at = *header_at;
        let mut count = 0;
        for out in inflight[*next..].iter().take(FRAMES_PER_WRITE) {
            count += 1;
            match out.frame.ws_message() {
                Some(message) => push_part(&mut slices, message, &mut skip, &mut total),
                None => {
                    let len = ws_header_len(out.frame.len());
                    push_part(&mut slices, &headers[at..at + len], &mut skip, &mut total);
                    at += len;
                    push_part(&mut slices, out.frame.frame(), &mut skip, &mut total);
                }
            }
        }
        let written = socket.write_vectored(&slices).await?;
        drop(slices);
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if written == total {
            // The usual case: everything handed over went out.
            *next += count;
            *offset = 0;
            *header_at = at;
            return Ok(());
        }
        // A partial write: find where it stopped.
        let mut written = written;
        while written > 0 {
            let frame = &inflight[*next];
            let header_len = Self::separate_header_len(frame);
            let whole = header_len
                + frame
                    .frame
                    .ws_message()
                    .map_or(frame.frame.len(), <[u8]>::len);
            let left = whole - *offset;
            if written >= left {
                written -= left;
                *next += 1;
                *offset = 0;
                *header_at += header_len;
            } else {
                *offset += written;
                written = 0;
            }
        }
        Ok(())
    }

    /// Whether every loaded frame is written.
    fn written(&self) -> bool {
        self.next >= self.inflight.len()
    }

    /// Forgets the written batch, keeping small buffers for the next one.
    fn settle(&mut self) {
        self.inflight.clear();
        if self.inflight.capacity() > RETAINED_FRAMES {
            self.inflight = Vec::new();
        }
        self.headers.clear();
        if self.headers.capacity() > RETAINED_HEADERS {
            self.headers = Vec::new();
        }
        (self.next, self.offset, self.header_at) = (0, 0, 0);
    }

    /// Writes every loaded frame. Cancel-safe.
    async fn write_loaded(&mut self) -> Result<(), TransportError> {
        while !self.written() {
            self.write_some()
                .await
                .map_err(|e| TransportError::Io(e.to_string()))?;
        }
        self.settle();
        Ok(())
    }
}

impl<W: AsyncWrite + Send + Unpin> FrameWriter for WsWriter<W> {
    /// Writes what an abandoned earlier call left, then `batch`. One ordered channel: lanes
    /// do not matter. Events come with their header written in front (one slice each);
    /// other frames get theirs formatted here.
    async fn send_batch(&mut self, batch: &mut Vec<Outgoing>) -> Result<(), TransportError> {
        self.write_loaded().await?;
        if batch.is_empty() {
            return Ok(());
        }
        self.load(batch);
        self.write_loaded().await
    }

    async fn finish_frame(&mut self) -> Result<(), TransportError> {
        if self.offset > 0 {
            // Only the frame in flight: the client must never see half of one.
            self.inflight.truncate(self.next + 1);
            self.write_loaded().await?;
        }
        self.settle();
        Ok(())
    }

    async fn send_control(&mut self, raw: Bytes) -> Result<(), TransportError> {
        // Never in the middle of a frame.
        self.write_loaded().await?;
        self.socket
            .write_all(&raw)
            .await
            .map_err(|e| TransportError::Io(e.to_string()))
    }

    async fn close(&mut self, code: Code) -> Result<(), TransportError> {
        self.write_loaded().await?;
        let frame = Frame::close(Some(CloseFrame {
            code: CloseCode::from(code.ws_close_code()),
            reason: code.as_str().into(),
        }));
        let mut raw = Vec::with_capacity(frame.len());
        frame.format(&mut raw).map_err(map_error)?;
        let io_error = |e: io::Error| TransportError::Io(e.to_string());
        self.socket.write_all(&raw).await.map_err(io_error)?;
        self.socket.shutdown().await.map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// Splits `wire` into WebSocket frames (unmasked server frames): (opcode, payload).
    fn frames(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !wire.is_empty() {
            assert!(wire.len() >= 2, "a cut header: {wire:?}");
            let (opcode, short) = (wire[0] & 0x0f, usize::from(wire[1] & 0x7f));
            let (len, head) = match short {
                126 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
                127 => unreachable!("no test frame is that long"),
                n => (n, 2),
            };
            assert!(
                wire.len() >= head + len,
                "a cut frame: {} of {} bytes",
                wire.len(),
                head + len
            );
            out.push((opcode, wire[head..head + len].to_vec()));
            wire = &wire[head + len..];
        }
        out
    }

    fn batch(sizes: &[usize]) -> Vec<Outgoing> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Outgoing::control(Bytes::from(vec![i as u8; n])))
            .collect()
    }

    #[tokio::test]
    async fn an_abandoned_write_goes_on_where_it_stopped() {
        let (mut client, server) = tokio::io::duplex(100);
        let mut writer = WsWriter::new(server);
        let mut first = batch(&[300, 40, 500]);
        // Nobody reads: the write stops inside the first frame and is abandoned.
        let abandoned =
            tokio::time::timeout(Duration::from_millis(50), writer.send_batch(&mut first)).await;
        assert!(abandoned.is_err());
        assert!(writer.offset > 0, "stopped inside a frame");
        let reader = tokio::spawn(async move {
            let mut wire = Vec::new();
            client.read_to_end(&mut wire).await.unwrap();
            wire
        });
        // The next batch first finishes the abandoned one.
        writer.send_batch(&mut batch(&[7])).await.unwrap();
        writer.close(Code::Normal).await.unwrap();
        drop(writer);
        let got = frames(&reader.await.unwrap());
        let sizes: Vec<(u8, usize)> = got.iter().map(|(op, p)| (*op, p.len())).collect();
        assert_eq!(sizes[..4], [(2, 300), (2, 40), (2, 500), (2, 7)]);
        assert_eq!(got[4].0, 8, "then the close frame");
    }

    #[tokio::test]
    async fn finish_frame_completes_the_frame_in_flight_and_drops_the_rest() {
        let (mut client, server) = tokio::io::duplex(100);
        let mut writer = WsWriter::new(server);
        let mut queued = batch(&[300, 40, 500]);
        let abandoned =
            tokio::time::timeout(Duration::from_millis(50), writer.send_batch(&mut queued)).await;
        assert!(abandoned.is_err());
        let reader = tokio::spawn(async move {
            let mut wire = Vec::new();
            client.read_to_end(&mut wire).await.unwrap();
            wire
        });
        writer.finish_frame().await.unwrap();
        writer.close(Code::SlowConsumer).await.unwrap();
        drop(writer);
        let got = frames(&reader.await.unwrap());
        assert_eq!(
            got.len(),
            2,
            "the frame in flight, whole, then the close frame"
        );
        assert_eq!((got[0].0, got[0].1.len()), (2, 300));
        assert_eq!(got[1].0, 8);
        assert_eq!(got[1].1[..2], 4429u16.to_be_bytes());
    }

    #[tokio::test]
    async fn a_write_that_was_not_started_leaves_nothing_behind() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut writer = WsWriter::new(server);
        writer.send_batch(&mut batch(&[10, 20])).await.unwrap();
        writer.finish_frame().await.unwrap();
        writer.close(Code::SlowConsumer).await.unwrap();
        drop(writer);
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        let got = frames(&wire);
        let ops: Vec<u8> = got.iter().map(|(op, _)| *op).collect();
        assert_eq!(ops, [2, 2, 8]);
    }
}
