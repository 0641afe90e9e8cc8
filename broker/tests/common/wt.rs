//! A raw WebTransport test client: the control stream and room streams driven frame by frame.

use bytes::Bytes;
use roomcast_broker::Server;
use roomcast_protocol::{
    ClientFrame, Code, PayloadLimits, ServerFrame,
    stream::{FrameSplitter, write_prefix},
};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

use wtransport::{
    ClientConfig, Connection, Endpoint, RecvStream, SendStream,
    error::ConnectionError,
    tls::{
        Sha256Digest,
        client::{ServerHashVerification, build_default_tls_config},
    },
};

use super::WAIT;

/// The broker's WebTransport URL (UDP at the TCP port).
pub fn wt_url(server: &Server) -> String {
    format!("https://127.0.0.1:{}/wt", server.local_addr().port())
}

/// The SHA-256 the broker advertises for its certificate.
pub fn cert_hash(server: &Server) -> [u8; 32] {
    server
        .shared()
        .cert
        .read()
        .unwrap()
        .as_ref()
        .expect("WebTransport is on")
        .sha256
}

/// Opens a WebTransport session pinned to `hash`.
pub async fn session(server: &Server, hash: [u8; 32]) -> Result<Connection, String> {
    session_with(server, hash, None).await
}

/// Opens a WebTransport session pinned to `hash`, granting the broker at most
/// `stream_window` unread bytes per stream when given.
pub async fn session_with(
    server: &Server,
    hash: [u8; 32],
    stream_window: Option<u32>,
) -> Result<Connection, String> {
    let url = wt_url(server);
    session_at(&url, hash, stream_window).await
}

/// Opens a WebTransport session to `url` pinned to `hash` (see [`session_with`]).
pub async fn session_at(
    url: &str,
    hash: [u8; 32],
    stream_window: Option<u32>,
) -> Result<Connection, String> {
    let builder = ClientConfig::builder().with_bind_default();
    let config = match stream_window {
        None => builder
            .with_server_certificate_hashes([Sha256Digest::new(hash)])
            .build(),
        Some(window) => {
            let mut transport = wtransport::config::QuicTransportConfig::default();
            transport.stream_receive_window(window.into());
            let verifier = ServerHashVerification::new([Sha256Digest::new(hash)]);
            let tls = build_default_tls_config(
                Arc::new(rustls::RootCertStore::empty()),
                Some(Arc::new(verifier)),
            );
            builder
                .with_custom_tls_and_transport(tls, transport)
                .build()
        }
    };
    let endpoint = Endpoint::client(config).map_err(|e| e.to_string())?;
    tokio::time::timeout(WAIT, endpoint.connect(url))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// Reads length-prefixed frames from one stream.
pub struct FrameStream {
    pub recv: RecvStream,
    splitter: FrameSplitter,
}

impl FrameStream {
    pub fn new(recv: RecvStream) -> Self {
        FrameStream {
            recv,
            splitter: FrameSplitter::new(1 << 20),
        }
    }

    /// The next frame, or `None` at the stream's end (FIN or reset).
    pub async fn next(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some(frame) = self.splitter.next_frame().unwrap() {
                return Some(ServerFrame::decode(&frame, PayloadLimits::default()).unwrap());
            }
            let read = tokio::time::timeout(WAIT, self.recv.read_buf(self.splitter.buffer(4096)))
                .await
                .expect("broker answered in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn frame(&mut self) -> ServerFrame {
        self.next()
            .await
            .expect("a frame, not the end of the stream")
    }
}

/// A session with its control stream.
pub struct RawWt {
    pub connection: Connection,
    pub send: SendStream,
    pub control: FrameStream,
    /// Room streams kept open but not read (e.g. the personal room's): a dropped receive
    /// stream would ask the broker to stop sending on it.
    pub kept: Vec<FrameStream>,
}

impl RawWt {
    /// Connects and opens the control stream, without Hello.
    pub async fn connect(server: &Server) -> RawWt {
        RawWt::connect_with(server, None).await
    }

    /// Connects with at most `stream_window` unread bytes per stream (when given) and opens
    /// the control stream, without Hello.
    pub async fn connect_with(server: &Server, stream_window: Option<u32>) -> RawWt {
        let connection = session_with(server, cert_hash(server), stream_window)
            .await
            .expect("session");
        let (send, recv) = connection.open_bi().await.unwrap().await.unwrap();
        RawWt {
            connection,
            send,
            control: FrameStream::new(recv),
            kept: Vec::new(),
        }
    }

    /// Connects and completes Hello/Welcome.
    pub async fn open(server: &Server) -> RawWt {
        RawWt::open_with(server, None).await
    }

    /// Like [`RawWt::open`] with at most `stream_window` unread bytes per stream.
    pub async fn open_with(server: &Server, stream_window: Option<u32>) -> RawWt {
        let mut conn = RawWt::connect_with(server, stream_window).await;
        conn.send(ClientFrame::Hello {
            version: 1,
            token: None,
        })
        .await;
        match conn.control.frame().await {
            ServerFrame::Welcome(_) => conn,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: ClientFrame) {
        self.send_raw(frame.encode()).await;
    }

    /// Sends `bytes` as one length-prefixed frame.
    pub async fn send_raw(&mut self, bytes: Bytes) {
        let mut wire = Vec::new();
        write_prefix(bytes.len(), &mut wire);
        wire.extend_from_slice(&bytes);
        self.send.write_all(&wire).await.unwrap();
    }

    /// Subscribes; returns the room's stream, whose first frame (Subscribed) was checked.
    pub async fn subscribe(&mut self, id: u64, room: &str) -> FrameStream {
        self.send(ClientFrame::Subscribe {
            since: None,
            id,
            room: room.into(),
        })
        .await;
        self.accept_room(id, room).await
    }

    /// Accepts the next room stream the broker opens, which must start with
    /// `Subscribed { id, room }`.
    pub async fn accept_room(&mut self, id: u64, room: &str) -> FrameStream {
        let recv = tokio::time::timeout(WAIT, self.connection.accept_uni())
            .await
            .expect("room stream in time")
            .expect("room stream");
        let mut stream = FrameStream::new(recv);
        match stream.frame().await {
            ServerFrame::Subscribed {
                id: got, room: r, ..
            } if got == id && r.as_str() == room => stream,
            other => {
                panic!("expected Subscribed {id} {room} first on the room stream, got {other:?}")
            }
        }
    }

    /// Expects `Close { code }` on the control stream, then the session closed with the code.
    pub async fn expect_close(&mut self, code: Code) {
        match self.control.frame().await {
            ServerFrame::Close { code: got, .. } => assert_eq!(got, code),
            other => panic!("expected Close {code}, got {other:?}"),
        }
        expect_session_code(&self.connection, code).await;
    }
}

/// Asserts the session ends with the WebTransport session error code of `code` (from the
/// broker's `CLOSE_WEBTRANSPORT_SESSION` capsule or its QUIC `CONNECTION_CLOSE`).
pub async fn expect_session_code(connection: &Connection, code: Code) {
    let error = tokio::time::timeout(WAIT, session_error(connection))
        .await
        .expect("session closed in time");
    let text = format!("{error} {error:?}");
    assert!(
        text.contains(&code.value().to_string()) || text.contains(code.as_str()),
        "session closed with {text}, expected {code}"
    );
}

/// Why the session ended, as the session's calls report it. Not [`Connection::closed`]: that
/// reports how QUIC ended, which after a `CLOSE_WEBTRANSPORT_SESSION` capsule is this client's
/// own close in answer.
pub async fn session_error(connection: &Connection) -> ConnectionError {
    loop {
        if let Err(error) = connection.receive_datagram().await {
            return error;
        }
    }
}

/// How the broker ended a session, as a wtransport client sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// A `CLOSE_WEBTRANSPORT_SESSION` capsule, after which the client closed QUIC itself.
    Capsule { code: u64, reason: String },
    /// Anything else, e.g. the broker's QUIC `CONNECTION_CLOSE` (the session's error, then
    /// how QUIC ended).
    Other(String, String),
}

/// Waits (up to [`WAIT`]) for the session to end and tells how.
pub async fn session_end(connection: &Connection) -> SessionEnd {
    let ended = async {
        let session = session_error(connection).await;
        (session, connection.closed().await)
    };
    match tokio::time::timeout(WAIT, ended)
        .await
        .expect("session ended in time")
    {
        (ConnectionError::ApplicationClosed(close), ConnectionError::LocallyClosed) => {
            SessionEnd::Capsule {
                code: close.code().into_inner(),
                reason: String::from_utf8_lossy(close.reason()).into_owned(),
            }
        }
        (session, quic) => SessionEnd::Other(format!("{session:?}"), format!("{quic:?}")),
    }
}

/// The [`SessionEnd`] of a capsule carrying `code`: its value and name.
pub fn capsule_of(code: Code) -> SessionEnd {
    SessionEnd::Capsule {
        code: code.value().into(),
        reason: code.as_str().into(),
    }
}
