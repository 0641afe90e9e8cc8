//! Opening one connection: the transport the URL's scheme selects, then `Hello`/`Welcome`.
//!
//! Owns [`Connector`] (how the driver opens a session, so it is generic over the transport),
//! [`Link`] (either transport behind one type, so the connection task can move between URLs of
//! different schemes), [`ByScheme`] (the connector that picks the transport by URL) and
//! [`open`] (connect and handshake under the connect timeout; the handshake's rules are the
//! protocol crate's [`Handshake`]). It is used for the first connection and for every
//! reconnect; it must not keep anything between attempts: the connection task owns the
//! session after the handshake.

use std::{future::Future, time::Duration};

use bytes::Bytes;
use roomcast_protocol::{
    client::handshake::{Handshake, HandshakeError},
    frame::Welcome,
};
use tokio::time::Instant;

use crate::{
    error::{CloseInfo, Error},
    options::ConnectOptions,
    transport::{
        Endpoint, Incoming, LocalClose, Transport, TransportError, ws::WsTransport, wt::WtTransport,
    },
};

/// The transport of one connection (boxed: both are large and a link is made once per
/// connection).
pub(crate) enum Link {
    WebSocket(Box<WsTransport>),
    WebTransport(Box<WtTransport>),
}

impl Transport for Link {
    async fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        match self {
            Link::WebSocket(t) => t.send(frame).await,
            Link::WebTransport(t) => t.send(frame).await,
        }
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
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

    fn send_unreliable(&mut self, frame: Bytes) -> Result<Option<Bytes>, TransportError> {
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

/// How the driver opens sessions: connect to a URL and perform the handshake.
pub(crate) trait Connector: Send + 'static {
    /// The transport of the sessions it opens.
    type Link: Transport;

    /// Connects to `url` and performs the handshake with `token`.
    fn open(
        &self,
        url: &str,
        token: Option<String>,
        options: &ConnectOptions,
    ) -> impl Future<Output = Result<Opened<Self::Link>, OpenError>> + Send;
}

/// The connector of real sessions: the transport the URL's scheme selects.
#[derive(Clone, Copy)]
pub(crate) struct ByScheme;

impl Connector for ByScheme {
    type Link = Link;

    async fn open(
        &self,
        url: &str,
        token: Option<String>,
        options: &ConnectOptions,
    ) -> Result<Opened<Link>, OpenError> {
        open(url, token, options).await
    }
}

/// A reconnect attempt: the token (the provider's, else the configured one), then
/// [`Connector::open`].
pub(crate) async fn reopen<C: Connector>(
    connector: C,
    url: String,
    options: ConnectOptions,
) -> Result<Opened<C::Link>, OpenError> {
    let token = match &options.token_provider {
        Some(provider) => Some(provider.fetch().await.map_err(Error::from)?),
        None => options.token.clone(),
    };
    connector.open(&url, token, &options).await
}

/// A session the broker welcomed.
pub(crate) struct Opened<L> {
    pub(crate) link: L,
    pub(crate) welcome: Welcome,
    /// When `Welcome` arrived: with `welcome.server_time_ms`, the broker's clock.
    pub(crate) welcomed_at: Instant,
    /// The token sent in `Hello`.
    pub(crate) token: Option<String>,
    /// Frames that arrived before `Welcome` on other channels (a WebTransport room stream
    /// may overtake the control stream), handed to the session first, in arrival order.
    pub(crate) early: Vec<Bytes>,
}

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

impl OpenError {
    /// How the client ends (or goes on) after this failure: the broker's refusal, a lost
    /// connection when another attempt makes sense, else a final close.
    pub(crate) fn into_close_info(self) -> CloseInfo {
        let retryable = self.retryable();
        match self.error {
            Error::Closed(info) => info,
            other if retryable => CloseInfo::lost(other.to_string()),
            other => CloseInfo {
                code: None,
                reason: other.to_string(),
                reconnect: false,
            },
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
) -> Result<Opened<Link>, OpenError> {
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
async fn handshake<L: Transport>(
    mut link: L,
    token: Option<String>,
    options: &ConnectOptions,
) -> Result<Opened<L>, OpenError> {
    let (mut handshake, hello) = Handshake::start(token.clone(), options.payload_limits);
    link.send(hello).await.map_err(Error::from)?;
    let welcome = loop {
        let bytes = match link.recv().await.map_err(Error::from)? {
            Incoming::Frame(bytes) => bytes,
            Incoming::Closed { code, reason } => {
                return Err(Error::Closed(CloseInfo::transport(code, reason)).into());
            }
        };
        match handshake.handle_frame(bytes) {
            Ok(Some(welcome)) => break welcome,
            Ok(None) => {}
            Err(HandshakeError::Closed { info, retry_after }) => {
                return Err(OpenError {
                    error: Error::Closed(info),
                    retry_after,
                });
            }
            Err(e) => return Err(Error::from(e).into()),
        }
    };
    link.set_frame_limit(welcome.max_frame_size);
    Ok(Opened {
        link,
        welcome,
        welcomed_at: Instant::now(),
        token,
        early: handshake.into_early(),
    })
}
