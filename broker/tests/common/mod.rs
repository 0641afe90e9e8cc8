//! Test helpers: a broker on 127.0.0.1 port 0 and a raw WebSocket connection that speaks
//! frames directly (for bad input and exact frame-order checks).

#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod wt;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use roomcast_broker::{Config, Server};
use roomcast_protocol::{ClientFrame, Code, PayloadLimits, ServerFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

/// Generous bound for anything a test waits on, so a broken feature fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// A test config: loopback, port 0, sessions closed at once on shutdown (no drain window).
pub fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        drain_window: Duration::ZERO,
        ..Config::default()
    }
}

/// Starts a broker with `config`.
pub async fn start(config: Config) -> Server {
    Server::start(config).await.expect("broker starts")
}

/// The HS256 secret of [`secured_config`] (key id `t`).
pub const TEST_SECRET: &[u8] = b"roomcast-test-secret-0123456789abcdef";

/// Writes a configuration file requiring tokens signed with [`TEST_SECRET`] (key id `t`),
/// followed by `body` (namespaces, limits), and its secret into a fresh folder; returns the
/// file.
pub fn secured_config(body: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "roomcast-secured-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret.key"), TEST_SECRET).unwrap();
    let file = dir.join("roomcast.toml");
    let text = format!(
        "[auth]\nrequired = true\nkeys = [{{ kid = \"t\", algorithm = \"HS256\", file = \"secret.key\" }}]\n\n{body}\n"
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// A token of user `sub` for [`secured_config`], valid for an hour, with `(pattern, "sub,pub")`
/// room grants.
pub fn user_token(sub: &str, grants: &[(&str, &str)]) -> String {
    let rooms = grants
        .iter()
        .map(|(pattern, caps)| {
            (
                (*pattern).to_owned(),
                caps.split(',').map(str::to_owned).collect(),
            )
        })
        .collect();
    roomcast_broker::auth::mint_hs256(
        TEST_SECRET,
        &roomcast_broker::auth::TokenSpec {
            sub: sub.into(),
            rooms,
            ttl: Duration::from_secs(3600),
            kid: Some("t".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// What a raw connection observed.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// A frame from the broker.
    Frame(ServerFrame),
    /// The WebSocket close, with its close code.
    WsClose(Option<u16>),
    /// The connection ended without a close frame.
    Eof,
}

/// A WebSocket connection driven frame by frame.
pub struct RawConn {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawConn {
    pub async fn connect(server: &Server) -> RawConn {
        let (ws, _) = connect_async(server.ws_url()).await.expect("ws connect");
        RawConn { ws }
    }

    /// Connects with a tiny socket receive buffer (4 KiB) and completes Hello/Welcome: a
    /// session that can be made to fall behind by simply not reading it.
    pub async fn open_slow(server: &Server) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.local_addr()).await.unwrap();
        let stream = MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio_tungstenite::client_async(server.ws_url(), stream)
            .await
            .unwrap();
        RawConn::hello(RawConn { ws }).await
    }

    async fn hello(mut conn: RawConn) -> RawConn {
        conn.send(ClientFrame::Hello {
            version: 1,
            token: None,
        })
        .await;
        match conn.next().await {
            Seen::Frame(ServerFrame::Welcome(_)) => conn,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Connects with `token` in the request's query, completes Hello/Welcome and checks that
    /// the session joined its user's personal room (`Subscribed` id 0 for `user:<sub>`).
    pub async fn open_as(server: &Server, token: &str, sub: &str) -> RawConn {
        let url = format!("{}?token={token}", server.ws_url());
        let (ws, _) = connect_async(url).await.expect("ws connect");
        let mut conn = RawConn::hello(RawConn { ws }).await;
        conn.expect_personal_room(sub).await;
        conn
    }

    /// The next frame must be the `Subscribed` (id 0) of `user:<sub>`.
    pub async fn expect_personal_room(&mut self, sub: &str) {
        match self.frame().await {
            ServerFrame::Subscribed { id: 0, room, .. }
                if room.as_str() == format!("user:{sub}") => {}
            other => panic!("expected Subscribed 0 user:{sub}, got {other:?}"),
        }
    }

    /// Connects and completes Hello/Welcome.
    pub async fn open(server: &Server) -> RawConn {
        RawConn::hello(RawConn::connect(server).await).await
    }

    /// Connects to a broker's `ws://…/ws` URL and completes Hello/Welcome (for tasks that
    /// outlive a borrowed `Server`).
    pub async fn open_url(url: &str) -> RawConn {
        let (ws, _) = connect_async(url).await.expect("ws connect");
        RawConn::hello(RawConn { ws }).await
    }

    pub async fn send(&mut self, frame: ClientFrame) {
        self.send_bytes(frame.encode()).await;
    }

    pub async fn send_bytes(&mut self, bytes: Bytes) {
        self.ws.send(Message::Binary(bytes)).await.expect("send");
    }

    /// The next frame or close, waiting at most [`WAIT`].
    pub async fn next(&mut self) -> Seen {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("broker answered in time");
            return match msg {
                Some(Ok(Message::Binary(b))) => Seen::Frame(
                    ServerFrame::decode(&b, PayloadLimits::default()).expect("valid server frame"),
                ),
                Some(Ok(Message::Close(frame))) => Seen::WsClose(frame.map(|f| u16::from(f.code))),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                None | Some(Err(_)) => Seen::Eof,
            };
        }
    }

    /// The next frame, which must be a frame.
    pub async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Seen::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Subscribes and waits for Subscribed; returns its seq.
    pub async fn subscribe(&mut self, id: u64, room: &str) -> u64 {
        self.send(ClientFrame::Subscribe {
            since: None,
            id,
            room: room.into(),
        })
        .await;
        match self.frame().await {
            ServerFrame::Subscribed { id: got, seq, .. } if got == id => seq,
            other => panic!("expected Subscribed, got {other:?}"),
        }
    }

    /// Subscribes with `id` 1 (from `since` when given) and reads its `Subscribed`: the
    /// position and `recovered`.
    pub async fn subscribe_since(
        &mut self,
        room: &str,
        since: Option<roomcast_protocol::Position>,
    ) -> (roomcast_protocol::Position, Option<bool>) {
        self.send(ClientFrame::Subscribe {
            id: 1,
            room: room.into(),
            since,
        })
        .await;
        match self.frame().await {
            ServerFrame::Subscribed {
                id: 1,
                seq,
                epoch,
                recovered,
                ..
            } => (roomcast_protocol::Position { epoch, seq }, recovered),
            other => panic!("expected Subscribed, got {other:?}"),
        }
    }

    /// Asserts that the broker sends `Close { code }` then closes the WebSocket with the
    /// code's WebSocket close code.
    pub async fn expect_close(&mut self, code: Code) {
        match self.next().await {
            Seen::Frame(ServerFrame::Close {
                code: got,
                reconnect,
                ..
            }) => {
                assert_eq!(got, code);
                assert_eq!(reconnect, code.should_retry());
            }
            other => panic!("expected Close {code}, got {other:?}"),
        }
        assert_eq!(self.next().await, Seen::WsClose(Some(code.ws_close_code())));
    }

    /// Expects an Error frame with `code` and `id`.
    pub async fn expect_error(&mut self, id: Option<u64>, code: Code) {
        match self.frame().await {
            ServerFrame::Error {
                id: got, code: c, ..
            } => {
                assert_eq!((got, c), (id, code));
            }
            other => panic!("expected Error {code}, got {other:?}"),
        }
    }

    /// Round trip: proves the session still works.
    pub async fn ping(&mut self, id: u64) {
        self.send(ClientFrame::Ping { id: Some(id) }).await;
        assert_eq!(self.frame().await, ServerFrame::Pong { id: Some(id) });
    }
}

/// Plain HTTP/1.1 GET on the broker's port; returns (status, body).
pub async fn http_get(server: &Server, path: &str) -> (u16, String) {
    http_get_at(server.local_addr(), path).await
}

/// `GET path` on a broker at `addr`: status and body.
pub async fn http_get_at(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    http_response(stream).await
}

/// Reads a whole `Connection: close` HTTP/1.1 response: status and body.
pub async fn http_response(mut stream: TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one metric line (exact series text before the value), or 0.
pub async fn metric(server: &Server, series: &str) -> f64 {
    let (_, body) = http_get(server, "/metrics").await;
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// WebSocket close code of a normal close.
pub fn normal_close() -> CloseCode {
    CloseCode::Normal
}
