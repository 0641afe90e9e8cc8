//! Connection options.
//!
//! Owns [`ConnectOptions`] and its defaults. It must not hold runtime state: the options are
//! read by [`crate::connect`] and [`crate::ClientBuilder::connect`], then by the connection
//! task for every reconnect.

use std::{path::PathBuf, time::Duration};

use roomcast_protocol::PayloadLimits;

use crate::{reconnect::ReconnectPolicy, token::TokenProvider};

/// How to open a session. Build with struct update syntax over [`Default`]:
///
/// ```
/// use roomcast_client::ConnectOptions;
/// use std::{path::PathBuf, time::Duration};
///
/// let options = ConnectOptions {
///     token: Some("secret".into()),
///     connect_timeout: Duration::from_secs(3),
///     ..ConnectOptions::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Authentication token sent in `Hello`. With a [`ConnectOptions::token_provider`] it is
    /// used for the first connection only (the provider is asked when it is `None`). Default
    /// `None`.
    pub token: Option<String>,
    /// Called for the token of every connection after the first (and of the first when
    /// [`ConnectOptions::token`] is `None`), and before the current token's `exp` (read from
    /// the JWT payload, unverified) to send the broker a fresh one with `Refresh`: at 80 % of
    /// the token's remaining lifetime or 30 s before `exp`, whichever is earlier, by the
    /// broker's clock (from `Welcome`). A refresh the broker refuses is reported
    /// ([`crate::ClientEvent::TokenRefreshFailed`]) and not retried: the broker closes the
    /// session with `token_expired` at `exp` and the reconnect asks the provider again; a
    /// failing provider is asked again after 5 s. See [`TokenProvider`]. Default `None`: the
    /// same token for every connection and no refresh.
    pub token_provider: Option<TokenProvider>,
    /// Reconnect automatically when the connection is lost or the broker closes it with
    /// `reconnect: true`, resubscribing every room (with recovery) and re-sending pending
    /// publishes that carry an idempotency key. See [`ReconnectPolicy`]. Default `None` for
    /// [`crate::connect`]: the session ends with the connection. [`crate::ClientBuilder`]
    /// turns it on by default.
    pub reconnect: Option<ReconnectPolicy>,
    /// Give every acknowledged [`crate::Client::publish`] and
    /// [`crate::Client::publish_payload`] a random idempotency key
    /// ([`crate::IdempotencyKey::random`]), so that with `reconnect` a publish pending when
    /// the connection drops is re-sent instead of failing with
    /// [`crate::Error::Disconnected`]. Default `false`.
    pub auto_idempotency_keys: bool,
    /// Upper bound on everything one connection attempt does: DNS, TCP or QUIC, TLS, the WebSocket
    /// upgrade or WebTransport session request, and the `Hello`/`Welcome` exchange.
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// Events buffered per subscription before newer ones are dropped and reported as
    /// [`crate::SubscriptionError::Lagged`]. Memory: up to this many [`crate::EventMessage`]s
    /// (about 100 bytes each plus the payload) per subscription. Default 1024; 0 is treated
    /// as 1.
    pub subscription_buffer: usize,
    /// Bounds applied when validating event payloads received from the broker. An event whose
    /// payload exceeds them is skipped with a warning. Default [`PayloadLimits::default`].
    pub payload_limits: PayloadLimits,
    /// WebTransport (`https://`) only: accept the broker's certificate if and only if the
    /// SHA-256 of its DER encoding is this value (the broker serves it at `GET /cert-hash`).
    /// As in browsers, the certificate must then be ECDSA P-256, currently valid and valid for
    /// at most 14 days; no CA is consulted. Takes precedence over `ca_file`. Default `None`.
    pub cert_hash: Option<[u8; 32]>,
    /// WebTransport (`https://`) only: trust the PEM certificates in this file as roots
    /// instead of the system's native roots (for a private CA or a self-signed broker
    /// certificate). The host name is still checked. Default `None`.
    pub ca_file: Option<PathBuf>,
    /// WebTransport (`https://`) only: skip certificate validation altogether. Anyone on the
    /// path can then impersonate the broker: for development only; a warning is logged on
    /// every connect. Overrides `cert_hash` and `ca_file`. Default `false`.
    pub insecure: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            token: None,
            token_provider: None,
            reconnect: None,
            auto_idempotency_keys: false,
            connect_timeout: Duration::from_secs(10),
            subscription_buffer: 1024,
            payload_limits: PayloadLimits::default(),
            cert_hash: None,
            ca_file: None,
            insecure: false,
        }
    }
}
