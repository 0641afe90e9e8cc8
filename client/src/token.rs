//! Tokens: the app's token provider, reading a JWT's expiry and when to refresh it.
//!
//! Owns [`TokenProvider`], [`jwt_expiry`] (the `exp` claim of a JWT payload, read without
//! verifying anything: the broker is the judge of tokens) and [`refresh_delay`] (how long
//! before a token's `exp` the client sends `Refresh`). It must not talk to the broker: the
//! connection task sends `Refresh` and connects with the tokens this module provides.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use base64::Engine;

/// The future a [`TokenProvider`] returns.
pub(crate) type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Refresh no sooner than this after connecting or refreshing, so a provider that keeps
/// returning short-lived tokens cannot make the client flood the broker with `Refresh`.
pub(crate) const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// Refresh at least this often (keeps timer deadlines far from overflow for tokens that
/// expire in centuries).
pub(crate) const MAX_REFRESH_DELAY: Duration = Duration::from_secs(24 * 3600);
/// When a provider call fails, try again after this long (or sooner, before `exp`).
pub(crate) const PROVIDER_RETRY: Duration = Duration::from_secs(5);

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
            Box::pin(async move { fetch.await.map_err(|e| e.to_string()) })
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

/// How long from `now_ms` (milliseconds since the Unix epoch, by the broker's clock) to send
/// `Refresh` for a token expiring at `exp` (seconds): at 80 % of the remaining lifetime or
/// 30 s before `exp`, whichever is earlier, but not sooner than [`MIN_REFRESH_DELAY`] nor
/// later than [`MAX_REFRESH_DELAY`].
pub(crate) fn refresh_delay(exp: u64, now_ms: u64) -> Duration {
    let remaining = exp.saturating_mul(1000).saturating_sub(now_ms);
    let at_80 = remaining / 5 * 4;
    let before_30 = remaining.saturating_sub(30_000);
    Duration::from_millis(at_80.min(before_30)).clamp(MIN_REFRESH_DELAY, MAX_REFRESH_DELAY)
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

    #[test]
    fn refresh_at_80_percent_or_30_s_before_whichever_is_earlier() {
        let now = 1_700_000_000_000;
        let at = |lifetime_s: u64| refresh_delay(1_700_000_000 + lifetime_s, now);
        // An hour: 80 % (48 min) comes before 30 s before exp.
        assert_eq!(at(3600), Duration::from_secs(2880));
        // Two minutes: 30 s before (90 s) comes before 80 % (96 s).
        assert_eq!(at(120), Duration::from_secs(90));
        // 150 s is where both agree.
        assert_eq!(at(150), Duration::from_secs(120));
        // Short-lived and expired tokens: not sooner than the floor.
        assert_eq!(at(10), MIN_REFRESH_DELAY);
        assert_eq!(refresh_delay(1_600_000_000, now), MIN_REFRESH_DELAY);
        // Far-future tokens are refreshed daily.
        assert_eq!(refresh_delay(u64::MAX, 0), MAX_REFRESH_DELAY);
        assert_eq!(at(10 * 24 * 3600), MAX_REFRESH_DELAY);
    }
}
