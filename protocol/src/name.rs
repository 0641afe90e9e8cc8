//! Validated room and event names.
//!
//! A [`RoomName`] or [`EventName`] can only be built through validation, so the hub, the
//! metrics and (later) the NATS subject mapping never see a bad name. The rules are the ones in
//! `docs/PROTOCOL.md` ("Names").

use std::{fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest room name in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest namespace (the part of a room name before the first `:`) in bytes.
pub const MAX_NAMESPACE_LEN: usize = 32;
/// Longest event name in bytes.
pub const MAX_EVENT_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name is longer than its maximum.
    #[error("name is longer than {0} bytes")]
    TooLong(usize),
    /// A room name has no `:` separating namespace and rest, or one side is empty.
    #[error("room name must be namespace:rest with both parts non-empty")]
    MissingNamespace,
    /// The namespace holds a character outside `a-z 0-9 _ -`.
    #[error("namespace may only hold a-z, 0-9, '_' and '-'")]
    BadNamespace,
    /// A character outside visible ASCII (0x21–0x7E).
    #[error("name may only hold visible ASCII characters (0x21-0x7E)")]
    BadCharacter,
}

fn is_visible_ascii(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// A room name: `namespace:rest`.
///
/// `namespace` is 1–32 bytes of `a-z 0-9 _ -`; `rest` is at least one byte of visible ASCII
/// (0x21–0x7E, so no spaces or control characters; `:` is allowed); the whole name is at most
/// 128 bytes. Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() {
            return Err(NameError::Empty);
        }
        if bytes.len() > MAX_ROOM_LEN {
            return Err(NameError::TooLong(MAX_ROOM_LEN));
        }
        let colon = bytes
            .iter()
            .position(|&b| b == b':')
            .ok_or(NameError::MissingNamespace)?;
        let (namespace, rest) = (&bytes[..colon], &bytes[colon + 1..]);
        if namespace.is_empty() || rest.is_empty() {
            return Err(NameError::MissingNamespace);
        }
        if namespace.len() > MAX_NAMESPACE_LEN {
            return Err(NameError::TooLong(MAX_NAMESPACE_LEN));
        }
        if !namespace
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(NameError::BadNamespace);
        }
        if !rest.iter().all(|&b| is_visible_ascii(b)) {
            return Err(NameError::BadCharacter);
        }
        Ok(RoomName(Arc::from(name)))
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the part before the first `:`.
    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map_or("", |(ns, _)| ns)
    }
}

/// An event name: 1–64 bytes of visible ASCII (0x21–0x7E).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventName(Arc<str>);

impl EventName {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_EVENT_LEN {
            return Err(NameError::TooLong(MAX_EVENT_LEN));
        }
        if !name.bytes().all(is_visible_ascii) {
            return Err(NameError::BadCharacter);
        }
        Ok(EventName(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! name_impls {
    ($ty:ident) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $ty::new(s)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                $ty::new(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}
name_impls!(RoomName);
name_impls!(EventName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documented_room_names() {
        for ok in [
            "orders:1042",
            "user:alice",
            "a:b",
            "gps:fleet:7/truck.12",
            "x-y_z9:~!@#$%^&*()",
        ] {
            let room = RoomName::new(ok).unwrap();
            assert_eq!(room.as_str(), ok);
        }
        assert_eq!(RoomName::new("gps:a:b").unwrap().namespace(), "gps");
        let longest = format!("n:{}", "x".repeat(MAX_ROOM_LEN - 2));
        assert!(RoomName::new(&longest).is_ok());
    }

    #[test]
    fn refuses_bad_room_names() {
        let too_long = format!("n:{}", "x".repeat(MAX_ROOM_LEN - 1));
        let long_ns = format!("{}:x", "n".repeat(MAX_NAMESPACE_LEN + 1));
        let cases = [
            ("", NameError::Empty),
            ("orders", NameError::MissingNamespace),
            (":1042", NameError::MissingNamespace),
            ("orders:", NameError::MissingNamespace),
            ("Orders:1", NameError::BadNamespace),
            ("or.ders:1", NameError::BadNamespace),
            ("orders:10 42", NameError::BadCharacter),
            ("orders:\u{e9}", NameError::BadCharacter),
            ("orders:a\nb", NameError::BadCharacter),
            (too_long.as_str(), NameError::TooLong(MAX_ROOM_LEN)),
            (long_ns.as_str(), NameError::TooLong(MAX_NAMESPACE_LEN)),
        ];
        for (bad, want) in cases {
            assert_eq!(RoomName::new(bad), Err(want), "{bad:?}");
        }
    }

    #[test]
    fn event_names() {
        assert!(EventName::new("status").is_ok());
        assert!(EventName::new("price.update:v2").is_ok());
        assert_eq!(EventName::new(""), Err(NameError::Empty));
        assert_eq!(EventName::new("a b"), Err(NameError::BadCharacter));
        assert_eq!(
            EventName::new(&"e".repeat(MAX_EVENT_LEN + 1)),
            Err(NameError::TooLong(MAX_EVENT_LEN))
        );
    }
}
