//! Connection options.
//!
//! Owns [`ConnectOptions`] and its defaults. It must not hold runtime state: the options are
//! read once by [`crate::connect`].

use std::{path::PathBuf, time::Duration};

use roomcast_protocol::PayloadLimits;

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
    /// Authentication token sent in `Hello`. Default `None`.
    pub token: Option<String>,
    /// Upper bound on everything [`crate::connect`] does: DNS, TCP or QUIC, TLS, the WebSocket
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
            connect_timeout: Duration::from_secs(10),
            subscription_buffer: 1024,
            payload_limits: PayloadLimits::default(),
            cert_hash: None,
            ca_file: None,
            insecure: false,
        }
    }
}
