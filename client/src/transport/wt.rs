//! The WebTransport transport (`https://host:port/wt`).
//!
//! Owns the QUIC endpoint and the WebTransport session, the choice of what certificate to
//! trust (native roots, a CA file, a pinned certificate hash, or nothing), the control stream
//! (the one bidirectional stream, opened by the client) and the readers of the broker's room
//! streams (unidirectional, one per subscribed room). Every stream carries frames each
//! preceded by its length as a QUIC varint; background tasks split them and merge them into
//! one bounded channel that [`Transport::recv`] drains, keeping each stream's order (there is
//! no order across streams). It also maps the session's close code to the code table.
//!
//! It must not look inside frames: the driver decodes them, and matches replies to requests
//! by id whichever stream they came on. Datagrams (whole frames, volatile rooms) are read by
//! one more task feeding the same channel, and sent by [`Transport::send_unreliable`].
//!
//! Bounds: the channel holds [`FRAME_QUEUE`] frames and a reader waits for room in it before
//! reading on; at most [`MAX_ROOM_STREAMS`] room streams are read at once (QUIC's stream limit
//! makes the broker wait for the rest); each room reader buffers at most one frame, whose size
//! is capped by the broker's `max_frame` (see [`Transport::set_frame_limit`]); QUIC buffers at
//! most [`RECEIVE_WINDOW`] unread bytes for the whole session.

use std::{
    io,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use roomcast_protocol::{
    Code,
    stream::{FrameSplitter, write_prefix},
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};
use tokio::{io::AsyncReadExt, sync::mpsc, task::JoinSet};
use wtransport::{
    ClientConfig, Connection, RecvStream, SendStream, VarInt,
    config::{IpBindConfig, QuicTransportConfig},
    endpoint::{Endpoint, endpoint_side},
    error::{ConnectingError, ConnectionError},
    quinn,
    tls::{
        Sha256Digest,
        client::{NoServerVerification, ServerHashVerification, build_default_tls_config},
    },
};

use super::{Incoming, LocalClose, Stream, Transport, TransportError};
use crate::{error::Error, options::ConnectOptions};

/// Room-stream frame limit before `Welcome`, and its floor afterwards.
const MIN_ROOM_FRAME: usize = 1 << 20;
/// Room-stream frame limit ceiling, whatever the broker announces (the WebSocket transport's
/// message cap).
const MAX_ROOM_FRAME: usize = 16 << 20;
/// Largest frame accepted on the control stream. Its reader starts before `Welcome` says how
/// large the broker's frames get, and the broker may send a room's events on it (when it could
/// not open the room a stream of its own), so it gets the ceiling: one stream, one frame.
const CONTROL_MAX_FRAME: usize = MAX_ROOM_FRAME;
/// What an `Event` may add to the broker's `max_frame` (room and event names, seq, keys).
const ENVELOPE_SLACK: usize = 1024;
/// Room streams read at once. Also the QUIC limit on concurrent incoming unidirectional
/// streams (plus the few HTTP/3 opens for itself), so the broker cannot open more.
const MAX_ROOM_STREAMS: usize = 4096;
/// Unidirectional streams HTTP/3 opens for itself (control, QPACK encoder and decoder), with
/// room to spare.
const H3_UNI_STREAMS: u32 = 8;
/// Frames waiting for the driver, from all streams together.
const FRAME_QUEUE: usize = 256;
/// Unread bytes QUIC buffers for the whole session (connection flow-control window).
const RECEIVE_WINDOW: u32 = 16 << 20;
/// How much to read when no frame length is known yet.
const READ_HINT: usize = 4096;
/// QUIC keep-alive: UDP NAT mappings often expire after 30 s, sooner than the protocol's
/// ping interval would refresh them.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// QUIC idle timeout (the effective value is the smaller of this and the broker's).
const IDLE_TIMEOUT_MS: u32 = 30_000;
/// After the control stream ends, how long to wait for the session's close code.
const CLOSE_CODE_WAIT: Duration = Duration::from_secs(2);
/// How long a normal close waits for the broker to acknowledge the last frames.
const FLUSH_WAIT: Duration = Duration::from_secs(1);
/// How long a close waits for the connection to drain (long enough to send the close).
const CLOSE_SENT_WAIT: Duration = Duration::from_millis(250);

/// A WebTransport session: frames go out on the control stream and come in on it and on
/// every room stream.
pub(crate) struct WtTransport {
    endpoint: Endpoint<endpoint_side::Client>,
    connection: Connection,
    control: SendStream,
    /// Scratch for the length prefix of the frame being sent.
    prefix: Vec<u8>,
    frames: mpsc::Receiver<Result<Incoming, TransportError>>,
    /// The room-stream frame limit, read by each new room-stream reader.
    room_frame_limit: Arc<AtomicUsize>,
    /// The control-stream reader and the room-stream acceptor (which owns the room readers):
    /// aborted when the transport is dropped.
    _tasks: JoinSet<()>,
}

impl WtTransport {
    /// Builds the TLS configuration `options` ask for, opens the QUIC connection and the
    /// WebTransport session at `url`, opens the control stream and starts the readers.
    pub(crate) async fn connect(url: &str, options: &ConnectOptions) -> Result<Self, Error> {
        let tls = tls_config(options).await?;
        let endpoint = client_endpoint(tls)?;
        let connection = endpoint.connect(url).await.map_err(|e| match e {
            ConnectingError::InvalidUrl(e) => Error::InvalidUrl(format!("{url:?}: {e}")),
            ConnectingError::SessionRejected => Error::Transport(format!(
                "the broker refused the WebTransport session at {url:?} (wrong path?)"
            )),
            e => Error::Transport(format!("WebTransport connect to {url:?}: {e}")),
        })?;
        let opening = connection
            .open_bi()
            .await
            .map_err(|e| Error::Transport(format!("opening the control stream: {e}")))?;
        let (control, control_recv) = opening
            .await
            .map_err(|e| Error::Transport(format!("opening the control stream: {e}")))?;

        let (sender, frames) = mpsc::channel(FRAME_QUEUE);
        let room_frame_limit = Arc::new(AtomicUsize::new(MIN_ROOM_FRAME));
        let mut tasks = JoinSet::new();
        tasks.spawn(read_control(
            control_recv,
            connection.clone(),
            sender.clone(),
        ));
        tasks.spawn(read_datagrams(connection.clone(), sender.clone()));
        tasks.spawn(accept_room_streams(
            connection.clone(),
            sender,
            Arc::clone(&room_frame_limit),
        ));
        Ok(WtTransport {
            endpoint,
            connection,
            control,
            prefix: Vec::with_capacity(8),
            frames,
            room_frame_limit,
            _tasks: tasks,
        })
    }
}

/// The room-stream frame limit for a broker whose `max_frame` is `broker_max_frame`.
fn room_frame_limit(broker_max_frame: u64) -> usize {
    usize::try_from(broker_max_frame)
        .unwrap_or(usize::MAX)
        .saturating_add(ENVELOPE_SLACK)
        .clamp(MIN_ROOM_FRAME, MAX_ROOM_FRAME)
}

impl Transport for WtTransport {
    async fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        self.prefix.clear();
        write_prefix(frame.len(), &mut self.prefix);
        // Two writes into QUIC's send buffer; they leave in the same packet.
        self.control.write_all(&self.prefix).await?;
        Ok(self.control.write_all(&frame).await?)
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        // `mpsc::Receiver::recv` is cancel-safe: a frame is either returned or left queued.
        match self.frames.recv().await {
            Some(incoming) => incoming,
            None => Ok(Incoming::Closed {
                code: None,
                reason: "the WebTransport session's readers ended".into(),
            }),
        }
    }

    async fn close(&mut self, how: LocalClose) {
        let (code, reason): (u16, &[u8]) = match how {
            LocalClose::Normal => {
                // QUIC discards unsent stream data on close: let the last frames (an
                // unacknowledged publish, say) reach the broker first.
                let _ = tokio::time::timeout(FLUSH_WAIT, self.control.finish()).await;
                (0, b"")
            }
            LocalClose::ProtocolError => (
                Code::ProtocolError.value(),
                Code::ProtocolError.as_str().as_bytes(),
            ),
        };
        self.connection.close(VarInt::from_u32(code.into()), reason);
        // The close goes out on the endpoint's next turn; waiting for the whole draining
        // period (three probe timeouts) would only delay the caller.
        let _ = tokio::time::timeout(CLOSE_SENT_WAIT, self.endpoint.wait_idle()).await;
    }

    fn send_unreliable(&mut self, frame: Bytes) -> Result<Option<Bytes>, TransportError> {
        let fits = self
            .connection
            .max_datagram_size()
            .is_some_and(|max| frame.len() <= max);
        if fits && self.connection.send_datagram(&frame).is_ok() {
            return Ok(None);
        }
        Ok(Some(frame))
    }

    fn set_frame_limit(&mut self, broker_max_frame: u64) {
        self.room_frame_limit
            .store(room_frame_limit(broker_max_frame), Ordering::Relaxed);
    }
}

impl Drop for WtTransport {
    fn drop(&mut self) {
        // The reader tasks hold connection handles too (they are aborted with `_tasks`), so
        // end the session explicitly; after `close` this does nothing.
        self.connection.close(VarInt::from_u32(0), b"");
    }
}

/// The TLS client configuration: no validation (`insecure`), a pinned certificate hash, the
/// roots of a CA file, or the system's native roots, in that order of precedence.
async fn tls_config(options: &ConnectOptions) -> Result<rustls::ClientConfig, Error> {
    if options.insecure {
        tracing::warn!(
            "INSECURE: WebTransport certificate validation is disabled; anyone on the path can \
             impersonate the broker. Use only for development."
        );
        let verifier = Arc::new(NoServerVerification::new());
        return Ok(build_default_tls_config(
            Arc::new(RootCertStore::empty()),
            Some(verifier),
        ));
    }
    if let Some(hash) = options.cert_hash {
        let verifier = Arc::new(ServerHashVerification::new([Sha256Digest::new(hash)]));
        return Ok(build_default_tls_config(
            Arc::new(RootCertStore::empty()),
            Some(verifier),
        ));
    }
    let roots = match &options.ca_file {
        Some(path) => load_roots(path).await?,
        None => tokio::task::spawn_blocking(native_roots)
            .await
            .map_err(|e| Error::Transport(format!("loading native roots: {e}")))?,
    };
    Ok(build_default_tls_config(Arc::new(roots), None))
}

/// Every certificate in the PEM file at `path`, as trust roots.
async fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let failed = |what: String| Error::Transport(format!("CA file {}: {what}", path.display()));
    let pem = tokio::fs::read(path)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| failed(e.to_string()))?;
        roots.add(cert).map_err(|e| failed(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(failed("no PEM certificate in it".into()));
    }
    Ok(roots)
}

/// The platform's trust roots (blocking file I/O). Falls back to the webpki (Mozilla) roots
/// the WebSocket transport uses when the platform has none.
fn native_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(%error, "skipping native root certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no native root certificates found; using the webpki (Mozilla) roots");
        roots
            .roots
            .extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// The QUIC settings of a session: room-stream and flow-control limits, keep-alive.
fn transport_config() -> QuicTransportConfig {
    let mut config = QuicTransportConfig::default();
    config
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(
            MAX_ROOM_STREAMS as u32 + H3_UNI_STREAMS,
        ))
        .receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    config
}

/// A client endpoint on an ephemeral UDP port: dual-stack when the host allows it, else IPv4.
fn client_endpoint(tls: rustls::ClientConfig) -> Result<Endpoint<endpoint_side::Client>, Error> {
    let config = |bind| {
        ClientConfig::builder()
            .with_bind_config(bind)
            .with_custom_tls_and_transport(tls.clone(), transport_config())
            .build()
    };
    Endpoint::client(config(IpBindConfig::InAddrAnyDual))
        .or_else(|dual| {
            tracing::debug!(error = %dual, "no dual-stack UDP socket; binding IPv4 only");
            Endpoint::client(config(IpBindConfig::InAddrAnyV4))
        })
        .map_err(|e| Error::Transport(format!("binding a UDP socket: {e}")))
}

/// How a stream stopped yielding frames.
enum StreamEnd {
    /// The peer finished the stream after a whole frame.
    Finished,
    /// The peer finished the stream inside a frame.
    Truncated(usize),
    /// A length prefix announced a frame over the limit.
    TooLarge(roomcast_protocol::stream::TooLarge),
    /// Reading failed (reset by the peer, or the session is gone).
    Failed(io::Error),
    /// Nobody receives frames any more: the transport was dropped.
    Unwanted,
}

/// Reads `stream` and passes each whole frame to `frames`, waiting for room in the channel
/// before reading on, until the stream ends.
async fn pump(
    stream: &mut RecvStream,
    splitter: &mut FrameSplitter,
    frames: &mpsc::Sender<Result<Incoming, TransportError>>,
) -> StreamEnd {
    loop {
        loop {
            match splitter.next_frame() {
                Ok(Some(frame)) => {
                    if frames.send(Ok(Incoming::Frame(frame))).await.is_err() {
                        return StreamEnd::Unwanted;
                    }
                }
                Ok(None) => break,
                Err(too_large) => return StreamEnd::TooLarge(too_large),
            }
        }
        match stream.read_buf(splitter.buffer(READ_HINT)).await {
            Ok(0) if splitter.pending() == 0 => return StreamEnd::Finished,
            Ok(0) => return StreamEnd::Truncated(splitter.pending()),
            Ok(_) => {}
            Err(e) => return StreamEnd::Failed(e),
        }
    }
}

/// Reads the control stream. When it ends, reports how the session ended: the close code the
/// session carries (after every frame the control stream delivered, so a `Close` frame is seen
/// first), or the stream's own failure.
async fn read_control(
    mut stream: RecvStream,
    connection: Connection,
    frames: mpsc::Sender<Result<Incoming, TransportError>>,
) {
    let mut splitter = FrameSplitter::new(CONTROL_MAX_FRAME);
    let end = pump(&mut stream, &mut splitter, &frames).await;
    let outcome = match end {
        StreamEnd::Unwanted => return,
        StreamEnd::TooLarge(source) => Err(TransportError::TooLarge {
            stream: Stream::Control,
            source,
        }),
        StreamEnd::Truncated(pending) => Err(TransportError::Truncated {
            stream: Stream::Control,
            pending,
        }),
        StreamEnd::Finished | StreamEnd::Failed(_) => {
            match tokio::time::timeout(CLOSE_CODE_WAIT, session_end(&connection)).await {
                Ok(error) => Ok(session_closed(error)),
                Err(_) => match end {
                    StreamEnd::Failed(source) => Err(TransportError::Read {
                        stream: Stream::Control,
                        source,
                    }),
                    _ => Ok(Incoming::Closed {
                        code: None,
                        reason: "the broker ended the control stream".into(),
                    }),
                },
            }
        }
    };
    let _ = frames.send(outcome).await;
}

/// Waits for the session to end and returns why. Asks `accept_bi` rather than
/// [`Connection::closed`]: when the peer closes the session with a WebTransport
/// `CLOSE_WEBTRANSPORT_SESSION` capsule, only the session calls return the capsule's code.
async fn session_end(connection: &Connection) -> ConnectionError {
    loop {
        match connection.accept_bi().await {
            Ok((mut send, recv)) => {
                // The protocol has no broker-opened bidirectional streams: refuse them.
                tracing::debug!("refusing a bidirectional stream opened by the broker");
                let _ = send.reset(VarInt::from_u32(0));
                recv.stop(VarInt::from_u32(0));
            }
            Err(error) => return error,
        }
    }
}

/// Maps how the session ended to [`Incoming::Closed`]: code 0 is `normal`, a code in the code
/// table is that code, anything else is no code of ours (a lost connection).
fn session_closed(error: ConnectionError) -> Incoming {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            let value = close.code().into_inner();
            let code = match value {
                0 => Some(Code::Normal),
                other => Code::from_value(other),
            };
            let reason = String::from_utf8_lossy(close.reason()).into_owned();
            Incoming::Closed {
                code,
                reason: if reason.is_empty() {
                    format!("session closed with code {value}")
                } else {
                    reason
                },
            }
        }
        other => Incoming::Closed {
            code: None,
            reason: format!("session ended: {other}"),
        },
    }
}

/// Receives the broker's datagrams: events of volatile rooms, one whole frame each. When the
/// frame queue is full the datagram is dropped (volatile events may be lost; `seq` shows the
/// gap) rather than holding the reader.
async fn read_datagrams(
    connection: Connection,
    frames: mpsc::Sender<Result<Incoming, TransportError>>,
) {
    while let Ok(datagram) = connection.receive_datagram().await {
        match frames.try_send(Ok(Incoming::Frame(datagram.payload()))) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Accepts the broker's room streams and reads each in its own task, at most
/// [`MAX_ROOM_STREAMS`] at once. Stops when the session ends (the control reader reports
/// how) and lets the running readers deliver what they hold.
async fn accept_room_streams(
    connection: Connection,
    frames: mpsc::Sender<Result<Incoming, TransportError>>,
    limit: Arc<AtomicUsize>,
) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            accepted = connection.accept_uni(), if readers.len() < MAX_ROOM_STREAMS => {
                match accepted {
                    Ok(stream) => {
                        let max_frame = limit.load(Ordering::Relaxed);
                        readers.spawn(read_room_stream(stream, frames.clone(), max_frame));
                    }
                    Err(_) => break,
                }
            }
            Some(joined) = readers.join_next(), if !readers.is_empty() => {
                if let Err(e) = joined {
                    tracing::warn!(error = %e, "room stream reader failed");
                }
            }
        }
    }
    drop(frames);
    while readers.join_next().await.is_some() {}
}

/// Reads one room stream to its end. A broken frame ends the session (the broker broke the
/// framing); a reset stream is logged: its room may miss events from then on.
async fn read_room_stream(
    mut stream: RecvStream,
    frames: mpsc::Sender<Result<Incoming, TransportError>>,
    max_frame: usize,
) {
    let mut splitter = FrameSplitter::new(max_frame);
    let failure = match pump(&mut stream, &mut splitter, &frames).await {
        StreamEnd::Finished | StreamEnd::Unwanted => return,
        StreamEnd::TooLarge(source) => TransportError::TooLarge {
            stream: Stream::Room,
            source,
        },
        StreamEnd::Truncated(pending) => TransportError::Truncated {
            stream: Stream::Room,
            pending,
        },
        // The session is gone; the control reader reports how.
        StreamEnd::Failed(e) if e.kind() == io::ErrorKind::NotConnected => return,
        StreamEnd::Failed(e) => {
            tracing::warn!(error = %e, "a room stream failed; its room may miss events");
            return;
        }
    };
    let _ = frames.send(Err(failure)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_frame_limit_follows_the_broker_within_bounds() {
        assert_eq!(room_frame_limit(64 * 1024), MIN_ROOM_FRAME);
        assert_eq!(room_frame_limit(4 << 20), (4 << 20) + ENVELOPE_SLACK);
        assert_eq!(room_frame_limit(u64::MAX), MAX_ROOM_FRAME);
    }

    fn closed(error: ConnectionError) -> (Option<Code>, String) {
        match session_closed(error) {
            Incoming::Closed { code, reason } => (code, reason),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[test]
    fn timeouts_are_no_code_of_ours() {
        let (code, reason) = closed(ConnectionError::TimedOut);
        assert_eq!(code, None);
        assert!(reason.contains("timed out"), "{reason}");
    }

    #[tokio::test]
    async fn tls_config_refuses_a_missing_or_empty_ca_file() {
        let dir = std::env::temp_dir().join(format!("roomcast-wt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for (path, expect) in [
            (dir.join("missing.pem"), "CA file"),
            (empty, "no PEM certificate"),
        ] {
            let options = ConnectOptions {
                ca_file: Some(path),
                ..ConnectOptions::default()
            };
            match tls_config(&options).await {
                Err(Error::Transport(message)) => {
                    assert!(message.contains(expect), "{message}")
                }
                Err(other) => panic!("expected a transport error, got {other:?}"),
                Ok(_) => panic!("expected a transport error, got a config"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
