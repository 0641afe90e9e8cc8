//! The room → NATS subject mapping, and its inverse.
//!
//! Owns one rule: how a [`RoomName`] becomes a NATS subject. It touches no connection and no
//! hub. The rule (normative text in docs/PROTOCOL.md §11):
//!
//! ```text
//! subject = <prefix> "." <namespace> "." <token(rest)>
//! ```
//!
//! - `prefix` is one or more `.`-separated tokens of `A-Z a-z 0-9 _ -` (default `roomcast`),
//!   checked once by [`SubjectPrefix::new`].
//! - `namespace` is the room's namespace, copied as is: room-name validation already restricts
//!   it to `a-z 0-9 _ -`, none of which means anything to NATS.
//! - `token(rest)` escapes every byte of the rest of the room name that is not
//!   `A-Z a-z 0-9 -` as `_` followed by two lowercase hex digits (so `_` itself becomes
//!   `_5f`, `.` becomes `_2e`, `*` `_2a`, `>` `_3e`, `:` `_3a`, a space `_20`).
//!
//! Every character of a subject built this way is `A-Z a-z 0-9 _ - .`, every token is
//! non-empty, so the subject is always a valid literal subject: no `.` of a room name can add a
//! token, no `*` or `>` can become a wildcard, no whitespace or control byte can end the
//! protocol line. The escape is a prefix-free code (each byte maps to exactly one of `c` or
//! `_hh`, and `_` never stands for itself), so `token` is injective and [`room_of`] inverts
//! [`subject_for`]; the property tests below check both on arbitrary input, including unicode.

use roomcast_protocol::RoomName;

pub use crate::config::{BadPrefix, DEFAULT_PREFIX, SubjectPrefix};

/// Bytes that stand for themselves in an encoded token.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends the escaped form of `raw` to `out`: `A-Z a-z 0-9 -` as is, every other byte as `_`
/// and two lowercase hex digits.
pub fn push_token(raw: &[u8], out: &mut String) {
    for &b in raw {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Inverse of [`push_token`]; `None` when `token` is not the output of `push_token`.
pub fn decode_token(token: &str) -> Option<Vec<u8>> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_plain(b) {
            out.push(b);
            i += 1;
        } else if b == b'_' {
            let hex = |c: u8| HEX.iter().position(|&h| h == c);
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
            i += 3;
        } else {
            return None;
        }
    }
    Some(out)
}

/// The NATS subject of `room` under `prefix`.
pub fn subject_for(prefix: &SubjectPrefix, room: &RoomName) -> String {
    let (namespace, rest) = room.as_str().split_once(':').unwrap_or(("", room.as_str()));
    let mut subject =
        String::with_capacity(prefix.as_str().len() + 2 + namespace.len() + rest.len() * 3);
    subject.push_str(prefix.as_str());
    subject.push('.');
    subject.push_str(namespace);
    subject.push('.');
    push_token(rest.as_bytes(), &mut subject);
    subject
}

/// The room whose subject under `prefix` is `subject`, if it is one.
pub fn room_of(prefix: &SubjectPrefix, subject: &str) -> Option<RoomName> {
    let tail = subject.strip_prefix(prefix.as_str())?.strip_prefix('.')?;
    let (namespace, token) = tail.split_once('.')?;
    let rest = String::from_utf8(decode_token(token)?).ok()?;
    let room = RoomName::new(&format!("{namespace}:{rest}")).ok()?;
    // Only the canonical spelling maps back (the namespace is copied, never escaped).
    (subject_for(prefix, &room) == subject).then_some(room)
}

/// True when `subject` is a valid literal NATS subject as this module builds them: non-empty
/// `.`-separated tokens of `A-Z a-z 0-9 _ -` (so no wildcard, whitespace or control byte).
pub fn is_literal_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| is_plain(b) || b == b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    #[test]
    fn documented_examples() {
        let p = SubjectPrefix::default();
        for (name, subject) in [
            ("orders:1042", "roomcast.orders.1042"),
            ("chat:lobby", "roomcast.chat.lobby"),
            (
                "gps:fleet:7/truck.12",
                "roomcast.gps.fleet_3a7_2ftruck_2e12",
            ),
            ("a:*", "roomcast.a._2a"),
            ("a:>", "roomcast.a._3e"),
            ("a:x.y", "roomcast.a.x_2ey"),
            ("a:x_2ey", "roomcast.a.x_5f2ey"),
            ("my_ns:Big-Room", "roomcast.my_ns.Big-Room"),
        ] {
            assert_eq!(subject_for(&p, &room(name)), subject, "{name}");
            assert_eq!(room_of(&p, subject), Some(room(name)));
        }
        let p = SubjectPrefix::new("eu.prod").unwrap();
        assert_eq!(subject_for(&p, &room("orders:1")), "eu.prod.orders.1");
    }

    #[test]
    fn prefixes() {
        for ok in ["roomcast", "a.b", "A_b-9.x"] {
            assert!(SubjectPrefix::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "é", "$SYS", "a\n",
        ] {
            assert!(SubjectPrefix::new(bad).is_err(), "{bad:?}");
        }
        assert!(SubjectPrefix::new(&"a".repeat(65)).is_err());
    }

    #[test]
    fn foreign_subjects_are_not_rooms() {
        let p = SubjectPrefix::default();
        for subject in [
            "roomcast",
            "roomcast.orders",
            "roomcast.orders.1.2",
            "roomcast.orders.a_zz",
            "roomcast.orders.a_2",
            "roomcast.orders.a.b",
            "other.orders.1",
            "roomcastx.orders.1",
            "roomcast.Orders.1",
            "roomcast.orders._61", // escaped form of "a": not canonical
            "roomcast.orders.*",
            "roomcast.orders._20", // a space: not a valid room name
        ] {
            assert_eq!(room_of(&p, subject), None, "{subject}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any string, unicode and whitespace included: the token is literal and decodes back.
        #[test]
        fn tokens_are_literal_and_invertible(raw in any::<String>()) {
            let mut token = String::new();
            push_token(raw.as_bytes(), &mut token);
            prop_assert!(token.bytes().all(|b| is_plain(b) || b == b'_'));
            prop_assert_eq!(decode_token(&token), Some(raw.into_bytes()));
        }

        /// Distinct inputs give distinct tokens (checked directly, not only through the
        /// inverse).
        #[test]
        fn tokens_are_injective(a in any::<String>(), b in any::<String>()) {
            let (mut ta, mut tb) = (String::new(), String::new());
            push_token(a.as_bytes(), &mut ta);
            push_token(b.as_bytes(), &mut tb);
            prop_assert_eq!(a == b, ta == tb);
        }

        /// Rooms built from hostile characters: the subject is a literal subject with exactly
        /// prefix + 2 tokens and maps back to the same room.
        #[test]
        fn room_subjects_are_literal_and_invertible(
            ns in "[a-z0-9_-]{1,8}",
            rest in "[!-~]{1,40}",
            prefix in "[a-zA-Z0-9_-]{1,8}(\\.[a-zA-Z0-9_-]{1,8}){0,2}",
        ) {
            let p = SubjectPrefix::new(&prefix).unwrap();
            let r = room(&format!("{ns}:{rest}"));
            let s = subject_for(&p, &r);
            prop_assert!(is_literal_subject(&s), "{}", s);
            prop_assert_eq!(s.split('.').count(), prefix.split('.').count() + 2);
            prop_assert_eq!(room_of(&p, &s), Some(r));
        }

        /// Two valid rooms share a subject only if they are the same room.
        #[test]
        fn room_subjects_are_injective(
            a in "[a-z_-]{1,3}:[.*> :_a-c2e]{1,6}",
            b in "[a-z_-]{1,3}:[.*> :_a-c2e]{1,6}",
        ) {
            let p = SubjectPrefix::default();
            if let (Ok(ra), Ok(rb)) = (RoomName::new(&a), RoomName::new(&b)) {
                prop_assert_eq!(ra == rb, subject_for(&p, &ra) == subject_for(&p, &rb));
            }
        }

        /// Arbitrary strings: whatever room validation accepts maps to a literal subject.
        #[test]
        fn any_accepted_name_maps_to_a_literal_subject(name in any::<String>()) {
            if let Ok(r) = RoomName::new(&name) {
                let s = subject_for(&SubjectPrefix::default(), &r);
                prop_assert!(is_literal_subject(&s));
            }
        }
    }
}
