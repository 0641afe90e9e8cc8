//! The frame transport abstraction and the choice of transport by URL scheme.
//!
//! Owns [`Transport`] (send one frame, receive one frame, close), [`Incoming`] (what the peer
//! sent, with transport close codes already mapped to the code table), [`TransportError`] (how
//! an open transport failed) and [`Endpoint`] (which transport a URL asks for). A transport moves whole frames as opaque bytes and knows nothing
//! of the protocol: it must not decode frames, keep requests or time anything. The driver is
//! generic over it, so [`ws`] and [`wt`] slot in side by side and tests can fake it.

use std::{fmt, future::Future, io, time::Duration};

use bytes::Bytes;
use roomcast_protocol::{Code, stream::TooLarge};

use crate::error::Error;

pub(crate) mod ws;
pub(crate) mod wt;

/// What the peer sent.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// One frame (one binary WebSocket message, or one length-prefixed frame from any of the
    /// WebTransport session's streams).
    Frame(Bytes),
    /// The peer closed the transport. `code` is the code its transport-level close code maps
    /// to (each transport knows its own mapping), `None` when it gave none of ours; `reason`
    /// is never empty.
    Closed { code: Option<Code>, reason: String },
}

pub(crate) use roomcast_protocol::client::LocalClose;

/// Why a transport failed while its session was open.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// The WebSocket connection failed.
    #[error(transparent)]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The broker sent a text WebSocket message.
    #[error("the broker sent a text message; frames are binary")]
    TextMessage,
    /// Writing to the WebTransport control stream failed.
    #[error("control stream: {0}")]
    ControlWrite(#[from] wtransport::error::StreamWriteError),
    /// Reading a WebTransport stream failed.
    #[error("{stream} stream: {source}")]
    Read { stream: Stream, source: io::Error },
    /// A WebTransport stream announced a frame over its limit.
    #[error("{stream} stream: {source}")]
    TooLarge { stream: Stream, source: TooLarge },
    /// A WebTransport stream ended inside a frame.
    #[error("a {stream} stream ended inside a frame ({pending} bytes of it received)")]
    Truncated { stream: Stream, pending: usize },
    /// A send waited longer than the dead-connection limit (the broker stopped reading).
    #[error("send stalled for {} ms", .0.as_millis())]
    Stalled(Duration),
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        Error::Transport(e.to_string())
    }
}

/// Which kind of WebTransport stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// The bidirectional control stream.
    Control,
    /// A unidirectional room stream.
    Room,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Control => "control",
            Stream::Room => "room",
        })
    }
}

/// A bidirectional, message-oriented connection carrying one frame per message.
pub(crate) trait Transport: Send + 'static {
    /// Sends one frame and flushes it.
    fn send(&mut self, frame: Bytes) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Waits for the next frame or the end of the connection. Must be cancel-safe: the driver
    /// drops this future whenever something else is ready first.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming, TransportError>> + Send;

    /// Starts (or answers) the closing handshake and waits until the peer is done. The caller
    /// bounds the wait with a timeout. Errors are ignored: the connection is ending.
    fn close(&mut self, how: LocalClose) -> impl Future<Output = ()> + Send;

    /// Sends one frame unreliably (a WebTransport datagram: it may be lost) when the transport
    /// can and the frame fits; otherwise hands the frame back for [`Transport::send`]. The
    /// default has no unreliable path.
    fn send_unreliable(&mut self, frame: Bytes) -> Result<Option<Bytes>, TransportError> {
        Ok(Some(frame))
    }

    /// Tells the transport the largest frame the broker accepts (from `Welcome`), so a
    /// transport that must cap its own buffering can size the cap to the broker's frames.
    /// The default ignores it.
    fn set_frame_limit(&mut self, _broker_max_frame: u64) {}
}

/// Which transport a URL selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `ws://` (plain) or `wss://` (`tls`) WebSocket.
    WebSocket { url: String, tls: bool },
    /// `https://` WebTransport (HTTP/3 over QUIC).
    WebTransport { url: String },
}

impl Endpoint {
    /// Picks the transport from the URL scheme (case-insensitive).
    pub(crate) fn parse(url: &str) -> Result<Endpoint, Error> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::InvalidUrl(format!(
                "{url:?} has no scheme; expected ws://host:port/path, wss://... or https://..."
            )));
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(Error::InvalidUrl(format!("{url:?} has no host")));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "ws" => Ok(Endpoint::WebSocket {
                url: url.to_owned(),
                tls: false,
            }),
            "wss" => Ok(Endpoint::WebSocket {
                url: url.to_owned(),
                tls: true,
            }),
            "https" => Ok(Endpoint::WebTransport {
                url: url.to_owned(),
            }),
            other => Err(Error::InvalidUrl(format!(
                "unsupported scheme {other:?}; use ws://, wss:// (WebSocket) or https:// \
                 (WebTransport)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(url: &str) -> String {
        match Endpoint::parse(url) {
            Err(Error::InvalidUrl(message)) => message,
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn websocket_schemes_are_selected() {
        assert_eq!(
            Endpoint::parse("ws://127.0.0.1:4433/ws").unwrap(),
            Endpoint::WebSocket {
                url: "ws://127.0.0.1:4433/ws".into(),
                tls: false
            }
        );
        assert_eq!(
            Endpoint::parse("WSS://edge.example:443/ws").unwrap(),
            Endpoint::WebSocket {
                url: "WSS://edge.example:443/ws".into(),
                tls: true
            }
        );
    }

    #[test]
    fn https_selects_webtransport() {
        assert_eq!(
            Endpoint::parse("https://127.0.0.1:4433/wt").unwrap(),
            Endpoint::WebTransport {
                url: "https://127.0.0.1:4433/wt".into()
            }
        );
        assert_eq!(
            Endpoint::parse("HTTPS://edge.example/wt").unwrap(),
            Endpoint::WebTransport {
                url: "HTTPS://edge.example/wt".into()
            }
        );
        assert!(invalid("https:///wt").contains("no host"));
    }

    #[test]
    fn other_urls_are_refused() {
        assert!(invalid("http://127.0.0.1/ws").contains("unsupported scheme \"http\""));
        assert!(invalid("tcp://127.0.0.1:1").contains("unsupported scheme"));
        assert!(invalid("127.0.0.1:4433").contains("no scheme"));
        assert!(invalid("ws://").contains("no host"));
        assert!(invalid("ws:///ws").contains("no host"));
    }
}
