//! Errors the client returns and the description of how a session ended.
//!
//! Owns [`Error`] and [`SubscriptionError`], and maps the protocol crate's request and
//! handshake errors to [`Error`]; [`CloseInfo`] is the protocol crate's. It maps nothing from
//! the network itself: the driver and the transports build these values.

use roomcast_protocol::{Code, CodecError};

use crate::{subscription::Resumption, token::ProviderError};

pub use roomcast_protocol::CloseInfo;
use roomcast_protocol::client::{RequestError, handshake::HandshakeError};

/// Why a client operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered the request with an `Error` frame; the session goes on.
    #[error("broker error {code}: {message}")]
    Server {
        /// The broker's code.
        code: Code,
        /// The broker's detail.
        message: String,
    },
    /// The session is over (or ended while the request was pending).
    #[error("session closed: {0}")]
    Closed(CloseInfo),
    /// The connection was lost while the request was pending, or the request was made while
    /// the client was reconnecting (only with [`crate::ConnectOptions::reconnect`]). The client
    /// goes on reconnecting. A publish that fails this way may or may not have reached the
    /// broker: publish with an idempotency key ([`crate::Client::publish_with_key`]) to have
    /// it re-sent safely instead.
    #[error("disconnected: {0}")]
    Disconnected(CloseInfo),
    /// The token provider ([`crate::ConnectOptions::token_provider`]) failed.
    #[error("token provider: {0}")]
    Token(String),
    /// The connection could not be opened (DNS, TCP or QUIC, TLS, the WebSocket upgrade or
    /// the WebTransport session request), or a WebTransport option could not be used (an
    /// unreadable CA file).
    #[error("transport error: {0}")]
    Transport(String),
    /// The broker sent something this client does not understand during the handshake, or a
    /// reply that does not fit its request.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The URL cannot be used: bad syntax or an unsupported scheme.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// [`crate::ConnectOptions::connect_timeout`] passed before the session was open.
    #[error("timed out")]
    Timeout,
    /// A payload could not be converted to or from CBOR as the requested type.
    #[error("payload encoding: {0}")]
    Encode(String),
    /// This connection already has a live subscription to the room (one subscription per
    /// room and connection; drop or unsubscribe the first one, or clone events yourself).
    #[error("already subscribed to {0} on this connection")]
    AlreadySubscribed(String),
}

impl Error {
    /// The broker's code behind this error: the request error code of [`Error::Server`] or the
    /// close code of [`Error::Closed`] and [`Error::Disconnected`].
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::Closed(info) | Error::Disconnected(info) => info.code,
            _ => None,
        }
    }
}

impl From<CodecError> for Error {
    fn from(e: CodecError) -> Self {
        Error::Encode(e.to_string())
    }
}

impl From<ProviderError> for Error {
    fn from(e: ProviderError) -> Self {
        Error::Token(e.0)
    }
}

/// Why a subscription yielded no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// The subscription's buffer was full and `missed` events were dropped at this point of
    /// the stream. Events after it follow normally: consume faster or raise
    /// [`crate::ConnectOptions::subscription_buffer`].
    #[error("subscription lagged: {missed} events dropped")]
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
    /// The room's event stream was not continued seamlessly (only with
    /// [`crate::ConnectOptions::reconnect`], or when a cluster broker restarts a room's
    /// numbering): after a reconnect the room was subscribed again without recovering the
    /// events in between ([`crate::Recovery::Reset`] or [`crate::Recovery::Fresh`]), or its
    /// epoch changed. Events after it follow normally; the app should resync the room's state.
    /// A recovered resubscription is not reported here (see [`crate::Subscription::next_item`]).
    #[error("subscription {}: events may be missing", .0.recovery)]
    Reset(Resumption),
    /// The session ended; the stream yields `None` after this.
    #[error("session closed: {0}")]
    Closed(CloseInfo),
}

impl From<RequestError> for Error {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Server { code, message } => Error::Server { code, message },
            RequestError::Closed(info) => Error::Closed(info),
            RequestError::Disconnected(info) => Error::Disconnected(info),
            RequestError::Protocol(message) => Error::Protocol(message),
            RequestError::AlreadySubscribed(room) => Error::AlreadySubscribed(room),
        }
    }
}

impl From<HandshakeError> for Error {
    fn from(error: HandshakeError) -> Self {
        match error {
            HandshakeError::Closed { info, .. } => Error::Closed(info),
            HandshakeError::Server { code, message } => Error::Server { code, message },
            HandshakeError::Protocol(message) => Error::Protocol(message),
        }
    }
}
