//! Tokens: the app's token provider, reading a JWT's expiry and when to refresh it.
//!
//! Owns [`TokenProvider`] (and [`ProviderError`], its failure), [`Fetch`] (a provider call in flight) and [`jwt_expiry`] (the `exp` claim of a JWT payload, read without
//! verifying anything: the broker is the judge of tokens). When to refresh is the protocol
//! crate's client session's decision. It must not talk to the broker: the connection task
//! sends `Refresh` and connects with the tokens this module provides.

use std::{fmt, future::Future, pin::Pin, sync::Arc, task::Poll};

use base64::Engine;

/// The future a [`TokenProvider`] returns.
pub(crate) type TokenFuture = Pin<Box<dyn Future<Output = Result<String, ProviderError>> + Send>>;

/// The token provider's failure: its error's text (the provider's error type is the app's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ProviderError(pub(crate) String);

/// An async callback that returns a fresh authentication token, for every reconnect and for
/// `Refresh` before the current token expires (see [`crate::ConnectOptions::token_provider`]).
///
/// ```
/// use roomcast_client::TokenProvider;
///
/// let provider = TokenProvider::new(|| async {
///     // Ask the app's auth service for a token here.
///     Ok::<_, std::io::Error>("eyJhbGciOi...".to_owned())
/// });
/// # let _ = provider;
/// ```
#[derive(Clone)]
pub struct TokenProvider(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl TokenProvider {
    /// Wraps `provider`. Its error is reported as [`crate::Error::Token`] with the error's
    /// text.
    pub fn new<F, Fut, E>(provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: fmt::Display,
    {
        TokenProvider(Arc::new(move || {
            let fetch = provider();
            Box::pin(async move { fetch.await.map_err(|e| ProviderError(e.to_string())) })
        }))
    }

    /// Asks the provider for a token.
    pub(crate) fn fetch(&self) -> TokenFuture {
        (self.0)()
    }
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenProvider(..)")
    }
}

/// The token provider call in flight for a `Refresh`, if any.
#[derive(Default)]
pub(crate) struct Fetch(Option<TokenFuture>);

impl Fetch {
    /// Asks `provider` (if any) for a token, dropping a call still in flight.
    pub(crate) fn start(&mut self, provider: Option<&TokenProvider>) {
        self.0 = provider.map(TokenProvider::fetch);
    }

    /// Drops the call in flight.
    pub(crate) fn cancel(&mut self) {
        self.0 = None;
    }

    pub(crate) fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// The provider's answer; never resolves when no call is in flight. Cancel-safe.
    pub(crate) async fn answer(&mut self) -> Result<String, ProviderError> {
        let answer = std::future::poll_fn(|cx| match &mut self.0 {
            Some(fetch) => fetch.as_mut().poll(cx),
            None => Poll::Pending,
        })
        .await;
        self.0 = None;
        answer
    }
}

/// The `exp` claim (seconds since the Unix epoch) of a JWT, read from its payload without
/// verifying anything; `None` when `token` is not a JWT or has no numeric `exp`.
pub(crate) fn jwt_expiry(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            engine.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            engine.encode(payload)
        )
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        assert_eq!(
            jwt_expiry(&jwt(r#"{"sub":"ann","exp":1700000100}"#)),
            Some(1_700_000_100)
        );
        assert_eq!(
            jwt_expiry(&jwt(r#"{"exp":1700000100.5}"#)),
            Some(1_700_000_100)
        );
        // Padded base64 is accepted too.
        let padded = base64::engine::general_purpose::URL_SAFE.encode(r#"{"exp":5}"#);
        assert_eq!(jwt_expiry(&format!("h.{padded}.s")), Some(5));
        assert_eq!(jwt_expiry(&jwt(r#"{"sub":"ann"}"#)), None);
        assert_eq!(jwt_expiry(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(jwt_expiry(&jwt(r#"{"exp":-3}"#)), None);
        assert_eq!(jwt_expiry("opaque-token"), None);
        assert_eq!(jwt_expiry("a.b"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
    }
}
