//! WebSocket adapter: the HTTP upgrade handshake (over hyper, on axum's router) and the
//! mapping of tokio-tungstenite messages to frames. One binary message is one frame; text
//! messages are a protocol violation; WebSocket ping/pong are answered by tungstenite.

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header},
};
use bytes::Bytes;
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use roomcast_protocol::Code;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        error::CapacityError,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};

use super::{FrameReader, FrameWriter, TransportError};

/// The upgraded connection as tokio-tungstenite sees it.
pub type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Buffer and size settings for WebSocket sessions.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    /// Read buffer per connection, bytes.
    pub read_buffer: usize,
    /// Bytes gathered before a write reaches the socket (a flush writes earlier).
    pub write_buffer: usize,
    /// Largest accepted message, bytes.
    pub max_message: usize,
}

impl WsSettings {
    fn tungstenite(self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            .write_buffer_size(self.write_buffer)
            .max_write_buffer_size(usize::MAX)
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
pub struct Refusal {
    /// HTTP status to answer with.
    pub status: StatusCode,
    /// Plain-text explanation.
    pub why: &'static str,
}

impl Refusal {
    fn new(status: StatusCode, why: &'static str) -> Self {
        Refusal { status, why }
    }

    /// The HTTP response (426 answers name the supported WebSocket version).
    pub fn into_response(self) -> Response<Body> {
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
/// Protocols` response to send and the pending upgrade.
pub fn accept(mut request: Request<Body>) -> Result<(Response<Body>, OnUpgrade), Refusal> {
    let headers = request.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket upgrade required (Connection: upgrade, Upgrade: websocket)\n",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version must be 13\n",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key missing\n",
        ));
    };
    let Ok(accept_key) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad Sec-WebSocket-Key\n",
        ));
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return Err(Refusal::new(
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

/// Completes the upgrade and splits the socket into the session's reader and writer.
pub async fn open(
    on_upgrade: OnUpgrade,
    settings: WsSettings,
) -> Result<(WsReader, WsWriter), hyper::Error> {
    let upgraded = on_upgrade.await?;
    let socket = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(settings.tungstenite()),
    )
    .await;
    let (sink, stream) = socket.split();
    Ok((WsReader { stream }, WsWriter { sink }))
}

/// Receiving half of a WebSocket session.
pub struct WsReader {
    stream: SplitStream<Socket>,
}

/// Sending half of a WebSocket session.
pub struct WsWriter {
    sink: SplitSink<Socket, Message>,
}

fn map_error(e: tungstenite::Error) -> TransportError {
    match e {
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { .. }) => {
            TransportError::TooLarge
        }
        tungstenite::Error::Protocol(p) => TransportError::Protocol(p.to_string()),
        other => TransportError::Io(other.to_string()),
    }
}

impl FrameReader for WsReader {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            match self.stream.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Binary(bytes))) => return Ok(Some(bytes)),
                Some(Ok(Message::Text(_))) => {
                    return Err(TransportError::Protocol(
                        "text message: frames travel in binary messages".into(),
                    ));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Err(e)) => return Err(map_error(e)),
            }
        }
    }
}

impl FrameWriter for WsWriter {
    async fn send_batch(&mut self, batch: &mut Vec<Bytes>) -> Result<(), TransportError> {
        for frame in batch.drain(..) {
            self.sink
                .feed(Message::Binary(frame))
                .await
                .map_err(map_error)?;
        }
        self.sink.flush().await.map_err(map_error)
    }

    async fn close(&mut self, code: Code) -> Result<(), TransportError> {
        let frame = CloseFrame {
            code: CloseCode::from(code.ws_close_code()),
            reason: code.as_str().into(),
        };
        self.sink
            .send(Message::Close(Some(frame)))
            .await
            .map_err(map_error)?;
        self.sink.close().await.map_err(map_error)
    }
}
