//! Opening one connection: the transport the URL's scheme selects, then `Hello`/`Welcome`.
//!
//! Owns [`Link`] (either transport behind one type, so the connection task can move between
//! URLs of different schemes) and [`open`] (connect and handshake under the connect timeout).
//! It is used for the first connection and for every reconnect; it must not keep anything
//! between attempts: the connection task owns the session after the handshake.

use std::time::Duration;

use bytes::Bytes;
use roomcast_protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame, frame::Welcome};
use tokio::time::Instant;

use crate::{
    error::{CloseInfo, Error},
    options::ConnectOptions,
    transport::{Endpoint, Incoming, LocalClose, Transport, ws::WsTransport, wt::WtTransport},
};

/// The transport of one connection (boxed: both are large and a link is made once per
/// connection).
pub(crate) enum Link {
    WebSocket(Box<WsTransport>),
    WebTransport(Box<WtTransport>),
}

impl Transport for Link {
    async fn send(&mut self, frame: Bytes) -> Result<(), String> {
        match self {
            Link::WebSocket(t) => t.send(frame).await,
            Link::WebTransport(t) => t.send(frame).await,
        }
    }

    async fn recv(&mut self) -> Result<Incoming, String> {
        match self {
            Link::WebSocket(t) => t.recv().await,
            Link::WebTransport(t) => t.recv().await,
        }
    }

    async fn close(&mut self, how: LocalClose) {
        match self {
            Link::WebSocket(t) => t.close(how).await,
            Link::WebTransport(t) => t.close(how).await,
        }
    }

    fn send_unreliable(&mut self, frame: Bytes) -> Result<Option<Bytes>, String> {
        match self {
            Link::WebSocket(t) => t.send_unreliable(frame),
            Link::WebTransport(t) => t.send_unreliable(frame),
        }
    }

    fn set_frame_limit(&mut self, broker_max_frame: u64) {
        match self {
            Link::WebSocket(t) => t.set_frame_limit(broker_max_frame),
            Link::WebTransport(t) => t.set_frame_limit(broker_max_frame),
        }
    }
}

/// A session the broker welcomed.
pub(crate) struct Opened {
    pub(crate) link: Link,
    pub(crate) welcome: Welcome,
    /// When `Welcome` arrived: with `welcome.server_time_ms`, the broker's clock.
    pub(crate) welcomed_at: Instant,
    /// The token sent in `Hello`.
    pub(crate) token: Option<String>,
    /// Frames that arrived before `Welcome` on other channels (a WebTransport room stream
    /// may overtake the control stream: the personal room's `Subscribed` and first events),
    /// handed to the session first, in arrival order.
    pub(crate) early: Vec<Bytes>,
}

/// Most frames held from other channels while waiting for `Welcome`; a broker sending more
/// is broken.
const MAX_EARLY_FRAMES: usize = 64;

/// Why a connection attempt failed, with the broker's `retry_after` when it refused with a
/// `Close` that carried one.
#[derive(Debug)]
pub(crate) struct OpenError {
    pub(crate) error: Error,
    pub(crate) retry_after: Option<Duration>,
}

impl OpenError {
    /// Whether another attempt makes sense: not after a refusal whose `reconnect` is false,
    /// nor for a URL that cannot be used.
    pub(crate) fn retryable(&self) -> bool {
        match &self.error {
            Error::Closed(info) => info.reconnect,
            Error::InvalidUrl(_) => false,
            _ => true,
        }
    }
}

impl From<Error> for OpenError {
    fn from(error: Error) -> Self {
        OpenError {
            error,
            retry_after: None,
        }
    }
}

/// Connects to `url` and performs the handshake with `token`, all within
/// [`ConnectOptions::connect_timeout`].
pub(crate) async fn open(
    url: &str,
    token: Option<String>,
    options: &ConnectOptions,
) -> Result<Opened, OpenError> {
    let endpoint = Endpoint::parse(url)?;
    let attempt = async move {
        let link = match endpoint {
            Endpoint::WebSocket { url, tls } => {
                Link::WebSocket(Box::new(WsTransport::connect(&url, tls).await?))
            }
            Endpoint::WebTransport { url } => {
                Link::WebTransport(Box::new(WtTransport::connect(&url, options).await?))
            }
        };
        handshake(link, token, options).await
    };
    tokio::time::timeout(options.connect_timeout, attempt)
        .await
        .map_err(|_| OpenError::from(Error::Timeout))?
}

/// Sends `Hello` and waits for `Welcome`.
async fn handshake(
    mut link: Link,
    token: Option<String>,
    options: &ConnectOptions,
) -> Result<Opened, OpenError> {
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: token.clone(),
    };
    link.send(hello.encode()).await.map_err(Error::Transport)?;
    let mut early = Vec::new();
    let welcome = loop {
        let bytes = match link.recv().await.map_err(Error::Transport)? {
            Incoming::Frame(bytes) => bytes,
            Incoming::Closed { code, reason } => {
                return Err(Error::Closed(Incoming::close_info(code, reason)).into());
            }
        };
        match ServerFrame::decode(&bytes, options.payload_limits) {
            Ok(ServerFrame::Welcome(welcome)) => break welcome,
            Ok(ServerFrame::Close {
                code,
                reason,
                reconnect,
                retry_after_ms,
            }) => {
                return Err(OpenError {
                    error: Error::Closed(CloseInfo {
                        code: Some(code),
                        reason,
                        reconnect,
                    }),
                    retry_after: retry_after_ms.map(Duration::from_millis),
                });
            }
            Ok(ServerFrame::Error { code, message, .. }) => {
                return Err(Error::Server { code, message }.into());
            }
            // Room frames may overtake `Welcome` on WebTransport (PROTOCOL.md §2b): kept for
            // the session.
            Ok(
                ServerFrame::Subscribed { .. }
                | ServerFrame::Event(_)
                | ServerFrame::Conflation { .. }
                | ServerFrame::Unsubscribed { .. },
            ) if early.len() < MAX_EARLY_FRAMES => early.push(bytes),
            Ok(other) => {
                return Err(Error::Protocol(format!("expected Welcome, got {other:?}")).into());
            }
            Err(roomcast_protocol::DecodeError::UnknownType { kind, .. }) => {
                tracing::debug!(kind, "ignoring unknown frame type before Welcome");
            }
            Err(e) => return Err(Error::Protocol(format!("before Welcome: {e}")).into()),
        }
    };
    if welcome.version == 0 || welcome.version > PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "broker chose protocol version {}, this client speaks 1..={PROTOCOL_VERSION}",
            welcome.version
        ))
        .into());
    }
    link.set_frame_limit(welcome.max_frame_size);
    Ok(Opened {
        link,
        welcome,
        welcomed_at: Instant::now(),
        token,
        early,
    })
}
