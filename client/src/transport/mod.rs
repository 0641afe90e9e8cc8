//! The frame transport abstraction and the choice of transport by URL scheme.
//!
//! Owns [`Transport`] (send one frame, receive one frame, close) and [`Endpoint`] (which
//! transport a URL asks for). A transport moves whole frames as opaque bytes and knows nothing
//! of the protocol: it must not decode frames, keep requests or time anything. The driver is
//! generic over it, so WebTransport can slot in beside [`ws`] and tests can fake it.

use std::future::Future;

use bytes::Bytes;

use crate::error::Error;

pub(crate) mod ws;

/// What the peer sent.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// One frame (one binary WebSocket message).
    Frame(Bytes),
    /// The peer closed the transport; `code` is its transport-level close code, if any.
    Closed { code: Option<u16>, reason: String },
}

/// A bidirectional, message-oriented connection carrying one frame per message.
pub(crate) trait Transport: Send + 'static {
    /// Sends one frame and flushes it.
    fn send(&mut self, frame: Bytes) -> impl Future<Output = Result<(), String>> + Send;

    /// Waits for the next frame or the end of the connection. Must be cancel-safe: the driver
    /// drops this future whenever something else is ready first.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming, String>> + Send;

    /// Starts (or answers) the closing handshake with `code` and waits until the peer is done.
    /// The caller bounds the wait with a timeout. Errors are ignored: the connection is ending.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;
}

/// Which transport a URL selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `ws://` (plain) or `wss://` (`tls`) WebSocket.
    WebSocket { url: String, tls: bool },
}

impl Endpoint {
    /// Picks the transport from the URL scheme (case-insensitive).
    pub(crate) fn parse(url: &str) -> Result<Endpoint, Error> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::InvalidUrl(format!(
                "{url:?} has no scheme; expected ws://host:port/path or wss://..."
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
            "https" => Err(Error::InvalidUrl(
                "WebTransport (https://) is not supported yet".into(),
            )),
            other => Err(Error::InvalidUrl(format!(
                "unsupported scheme {other:?}; use ws:// or wss://"
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
    fn webtransport_is_refused_clearly() {
        assert_eq!(
            invalid("https://127.0.0.1:4433/wt"),
            "WebTransport (https://) is not supported yet"
        );
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
