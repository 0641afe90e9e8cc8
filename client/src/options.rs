//! Connection options.
//!
//! Owns [`ConnectOptions`] and its defaults. It must not hold runtime state: the options are
//! read once by [`crate::connect`].

use std::time::Duration;

use roomcast_protocol::PayloadLimits;

/// How to open a session. Build with struct update syntax over [`Default`]:
///
/// ```
/// use roomcast_client::ConnectOptions;
/// use std::time::Duration;
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
    /// Upper bound on everything [`crate::connect`] does: DNS, TCP, TLS, the WebSocket upgrade
    /// and the `Hello`/`Welcome` exchange. Default 10 s.
    pub connect_timeout: Duration,
    /// Events buffered per subscription before newer ones are dropped and reported as
    /// [`crate::SubscriptionError::Lagged`]. Memory: up to this many [`crate::EventMessage`]s
    /// (about 100 bytes each plus the payload) per subscription. Default 1024; 0 is treated
    /// as 1.
    pub subscription_buffer: usize,
    /// Bounds applied when validating event payloads received from the broker. An event whose
    /// payload exceeds them is skipped with a warning. Default [`PayloadLimits::default`].
    pub payload_limits: PayloadLimits,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            token: None,
            connect_timeout: Duration::from_secs(10),
            subscription_buffer: 1024,
            payload_limits: PayloadLimits::default(),
        }
    }
}
