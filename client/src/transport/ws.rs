//! The WebSocket transport (`ws://` and `wss://`).
//!
//! Owns the tokio-tungstenite stream and the TLS client configuration. One binary message is
//! one frame; WebSocket pings are answered by tungstenite itself. It also owns the mapping
//! between WebSocket close codes and the code table (1000 is `normal`, 4xxx are the codes'
//! own values). It must not look inside frames: the driver decodes them.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    Connector, MaybeTlsStream, WebSocketStream, connect_async_tls_with_config,
    tungstenite::{
        self, Message,
        client::IntoClientRequest,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
    },
};

use roomcast_protocol::Code;

use super::{Incoming, LocalClose, Transport, TransportError};
use crate::error::Error;

/// Largest message accepted from the broker. The broker's own frame cap is far lower; this
/// only stops a broken peer from making the client buffer without bound.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// WebSocket close codes the client sends.
const WS_NORMAL: u16 = 1000;
const WS_PROTOCOL_ERROR: u16 = 1002;

/// Maps a WebSocket close code to the code table: 1000 is `normal`, 4000–4999 are looked up,
/// anything else (or nothing) is no code of ours. An empty reason is replaced by one that
/// names the close code.
fn closed(code: Option<u16>, reason: String) -> Incoming {
    let known = code.and_then(|c| match c {
        WS_NORMAL => Some(Code::Normal),
        4000..=4999 => Code::from_value(c.into()),
        _ => None,
    });
    let reason = match (reason.is_empty(), code) {
        (true, Some(c)) => format!("transport closed with code {c}"),
        (true, None) => "transport closed".to_owned(),
        (false, _) => reason,
    };
    Incoming::Closed {
        code: known,
        reason,
    }
}

/// A WebSocket connection carrying one frame per binary message.
pub(crate) struct WsTransport {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsTransport {
    /// Opens the TCP (and, for `tls`, TLS) connection and performs the WebSocket upgrade.
    pub(crate) async fn connect(url: &str, tls: bool) -> Result<Self, Error> {
        let request = url
            .into_client_request()
            .map_err(|e| Error::InvalidUrl(format!("{url:?}: {e}")))?;
        let connector = if tls {
            Connector::Rustls(tls_config()?)
        } else {
            Connector::Plain
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE_SIZE))
            .max_frame_size(Some(MAX_MESSAGE_SIZE));
        // Nagle off: frames are small and latency matters more than packet count.
        let (stream, _response) =
            connect_async_tls_with_config(request, Some(config), true, Some(connector))
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Url(e) => Error::InvalidUrl(e.to_string()),
                    e => Error::Transport(e.to_string()),
                })?;
        Ok(WsTransport { stream })
    }
}

/// TLS settings for `wss://`: rustls with the ring provider and the webpki (Mozilla) roots.
/// The provider is chosen explicitly so no process-wide default has to be installed.
pub(crate) fn tls_config() -> Result<Arc<rustls::ClientConfig>, Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Transport(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Transport for WsTransport {
    async fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        Ok(self.stream.send(Message::Binary(frame)).await?)
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        loop {
            // `StreamExt::next` keeps all state in the stream, so dropping this future between
            // messages loses nothing.
            match self.stream.next().await {
                None => {
                    return Ok(closed(
                        None,
                        "connection ended without a close frame".into(),
                    ));
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => {
                    return Ok(closed(None, "connection closed".into()));
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(frame))) => return Ok(Incoming::Frame(frame)),
                Some(Ok(Message::Close(frame))) => {
                    return Ok(match frame {
                        Some(frame) => closed(Some(frame.code.into()), frame.reason.to_string()),
                        None => closed(None, "close frame without a code".into()),
                    });
                }
                Some(Ok(Message::Text(_))) => {
                    return Err(TransportError::TextMessage);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            }
        }
    }

    async fn close(&mut self, how: LocalClose) {
        let frame = match how {
            LocalClose::Normal => CloseFrame {
                code: CloseCode::from(WS_NORMAL),
                reason: "".into(),
            },
            LocalClose::ProtocolError => CloseFrame {
                code: CloseCode::from(WS_PROTOCOL_ERROR),
                reason: "protocol error".into(),
            },
        };
        // Fails harmlessly when the peer closed first: tungstenite has already queued the
        // reply and the loop below flushes it.
        let _ = self.stream.close(Some(frame)).await;
        while let Some(Ok(_)) = self.stream.next().await {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_config_builds_with_ring_and_webpki_roots() {
        let config = tls_config().expect("TLS config");
        assert!(config.crypto_provider().cipher_suites.len() > 1);
    }

    fn close_of(code: Option<u16>, reason: &str) -> (Option<Code>, String) {
        match closed(code, reason.into()) {
            Incoming::Closed { code, reason } => (code, reason),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[test]
    fn close_codes_map_to_the_code_table() {
        assert_eq!(
            close_of(Some(1000), ""),
            (Some(Code::Normal), "transport closed with code 1000".into())
        );
        assert_eq!(
            close_of(Some(4001), "shutting_down"),
            (Some(Code::ShuttingDown), "shutting_down".into())
        );
        assert_eq!(close_of(Some(4999), "x").0, None);
        assert_eq!(close_of(Some(1001), "away").0, None);
        assert_eq!(close_of(None, ""), (None, "transport closed".into()));
    }
}
