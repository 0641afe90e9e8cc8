//! Publish idempotency keys.
//!
//! Owns [`IdempotencyKey`]: a text the broker uses to deliver a publish at most once within
//! its dedup window, whichever connection it arrives on. It must not validate the key beyond
//! what its type says: the broker judges it (1–64 bytes, else `invalid_key`).

use std::fmt;

use rand::RngExt;

/// The idempotency key of a publish (`Publish` key 20). Within the broker's dedup window
/// (default 120 s) a second publish to the same room with the same key is not delivered again
/// but answered with `Ack`, so a publish can be retried safely — which the client does itself
/// after a reconnect (see [`crate::Client::publish_with_key`]).
///
/// The broker accepts 1 to 64 bytes and answers other keys with
/// [`crate::Code::InvalidKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// A key of the app's choosing (e.g. an order id), unchecked.
    pub fn new(key: impl Into<String>) -> Self {
        IdempotencyKey(key.into())
    }

    /// A random key: 16 random bytes as 32 lowercase hex digits.
    pub fn random() -> Self {
        let bytes: [u8; 16] = rand::rng().random();
        let mut key = String::with_capacity(32);
        for byte in bytes {
            key.push_str(&format!("{byte:02x}"));
        }
        IdempotencyKey(key)
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for IdempotencyKey {
    fn from(key: String) -> Self {
        IdempotencyKey(key)
    }
}

impl From<&str> for IdempotencyKey {
    fn from(key: &str) -> Self {
        IdempotencyKey(key.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_keys_are_32_hex_digits_and_differ() {
        let a = IdempotencyKey::random();
        let b = IdempotencyKey::random();
        assert_eq!(a.as_str().len(), 32);
        assert!(
            a.as_str()
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        assert_eq!(IdempotencyKey::from("order-7").to_string(), "order-7");
    }
}
