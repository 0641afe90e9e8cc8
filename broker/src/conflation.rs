//! Conflation keys: where, in an event's `data`, a namespace's conflation key lives, and
//! finding it in an already-validated payload.
//!
//! A namespace that declares `conflate = "<key path>"` (docs/OPERATIONS.md) lets the broker
//! keep only the latest event per key for a subscriber that falls behind (the outbox does the
//! replacing, [`crate::outbox::Outbox::push_conflatable`]). The key path is a dot-separated
//! list of text map keys: `"instrument"` names `data["instrument"]`, `"device.id"` names
//! `data["device"]["id"]`. The key is the CBOR item found there, whatever its type, compared
//! by its encoded bytes (so `5` and `"5"` are different keys, and so are two encodings of the
//! same number; publishers that use the preferred serialization never notice). An event whose
//! `data` is not a map with that path is never conflated.
//!
//! [`KeyPath::locate`] walks the CBOR bytes in place: no allocation, no recursion, time
//! linear in the bytes it passes (at most the payload, which was already validated and
//! size-capped before the hub sees it). It owns nothing else: hashing the key and replacing
//! events belong to the hub and the outbox.

/// Most segments a key path may have.
pub const MAX_SEGMENTS: usize = 8;

/// Longest segment (one map key), in bytes.
pub const MAX_SEGMENT_BYTES: usize = 128;

/// Deepest container nesting [`KeyPath::locate`] steps over (deeper items: no key). Payloads
/// are validated to 32 levels by default.
const MAX_SKIP_DEPTH: usize = 64;

/// Why a key path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPathError {
    /// No text at all.
    #[error("empty key path")]
    Empty,
    /// More than [`MAX_SEGMENTS`] segments.
    #[error("key path {path:?} has {segments} segments (at most {MAX_SEGMENTS})")]
    TooManySegments {
        /// The path.
        path: String,
        /// How many segments it has.
        segments: usize,
    },
    /// Two dots in a row, or a dot at an end.
    #[error("key path {0:?} has an empty segment")]
    EmptySegment(String),
    /// A segment over [`MAX_SEGMENT_BYTES`].
    #[error("key path {0:?} has a segment over {MAX_SEGMENT_BYTES} bytes")]
    LongSegment(String),
}

/// A parsed key path: the map keys to follow from the top of `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath {
    segments: Box<[Box<str>]>,
}

impl KeyPath {
    /// Parses `"a"` or `"a.b.c"`: 1 to 8 non-empty segments of at most 128 bytes each.
    pub fn parse(text: &str) -> Result<Self, KeyPathError> {
        if text.is_empty() {
            return Err(KeyPathError::Empty);
        }
        let segments: Vec<Box<str>> = text.split('.').map(Box::from).collect();
        if segments.len() > MAX_SEGMENTS {
            return Err(KeyPathError::TooManySegments {
                path: text.to_owned(),
                segments: segments.len(),
            });
        }
        for segment in &segments {
            if segment.is_empty() {
                return Err(KeyPathError::EmptySegment(text.to_owned()));
            }
            if segment.len() > MAX_SEGMENT_BYTES {
                return Err(KeyPathError::LongSegment(text.to_owned()));
            }
        }
        Ok(KeyPath {
            segments: segments.into_boxed_slice(),
        })
    }

    /// The encoded CBOR item at this path in `data` (one CBOR item), or `None` when `data` is
    /// not a map holding the path (a step that is not a map, a missing key, a malformed or
    /// too deeply nested item). Map keys match when they are definite-length text strings
    /// equal to the segment; with duplicate keys the first one wins. Tags are not looked
    /// through.
    pub fn locate<'a>(&self, data: &'a [u8]) -> Option<&'a [u8]> {
        let mut at = 0;
        for segment in self.segments.iter() {
            at = map_value(data, at, segment.as_bytes())?;
        }
        let end = skip_item(data, at)?;
        data.get(at..end)
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

/// A CBOR head: major type, additional information, argument (0 when indefinite) and where
/// the bytes after the head start.
#[derive(Clone, Copy)]
struct Head {
    major: u8,
    info: u8,
    arg: u64,
    next: usize,
}

const INDEFINITE: u8 = 31;
const BREAK: u8 = 0xff;

fn head(data: &[u8], at: usize) -> Option<Head> {
    let first = *data.get(at)?;
    let (major, info) = (first >> 5, first & 0x1f);
    let extra = match info {
        0..=23 | INDEFINITE => 0,
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let start = at + 1;
    let arg = if info < 24 {
        u64::from(info)
    } else {
        data.get(start..start + extra)?
            .iter()
            .fold(0u64, |n, b| (n << 8) | u64::from(*b))
    };
    Some(Head {
        major,
        info,
        arg,
        next: start + extra,
    })
}

/// Where the item starting at `at` ends. Iterative, with a fixed-size stack.
fn skip_item(data: &[u8], mut at: usize) -> Option<usize> {
    // Items left in each open container (u64::MAX: indefinite, ends with a break).
    let mut stack = [0u64; MAX_SKIP_DEPTH];
    let mut depth = 0;
    // Items left at the current level: the one item asked for.
    let mut left: u64 = 1;
    loop {
        let h = head(data, at)?;
        at = h.next;
        let opens = match (h.major, h.info) {
            (7, INDEFINITE) => {
                // A break closes the innermost indefinite container.
                if left != u64::MAX || depth == 0 {
                    return None;
                }
                depth -= 1;
                left = stack[depth];
                None
            }
            (2..=5, INDEFINITE) => Some(u64::MAX),
            (2 | 3, _) => {
                at = at.checked_add(usize::try_from(h.arg).ok()?)?;
                if at > data.len() {
                    return None;
                }
                None
            }
            (4, _) if h.arg > 0 => Some(h.arg),
            (5, _) if h.arg > 0 => Some(h.arg.checked_mul(2)?),
            // A tag: its item follows and takes its place.
            (6, _) => continue,
            _ => None,
        };
        if let Some(items) = opens {
            if depth == MAX_SKIP_DEPTH {
                return None;
            }
            stack[depth] = left;
            depth += 1;
            left = items;
            continue;
        }
        // One item complete: count it, closing the definite containers it fills.
        loop {
            if left == u64::MAX {
                break;
            }
            left -= 1;
            if left > 0 {
                break;
            }
            if depth == 0 {
                return Some(at);
            }
            depth -= 1;
            left = stack[depth];
        }
    }
}

/// Where the value of text key `key` starts in the map starting at `at`.
fn map_value(data: &[u8], at: usize, key: &[u8]) -> Option<usize> {
    let map = head(data, at)?;
    if map.major != 5 {
        return None;
    }
    let indefinite = map.info == INDEFINITE;
    let mut left = map.arg;
    let mut at = map.next;
    loop {
        if indefinite {
            if *data.get(at)? == BREAK {
                return None;
            }
        } else if left == 0 {
            return None;
        } else {
            left -= 1;
        }
        let k = head(data, at)?;
        let key_end = skip_item(data, at)?;
        let same = k.major == 3
            && k.info != INDEFINITE
            && k.arg == key.len() as u64
            && data.get(k.next..key_end) == Some(key);
        if same {
            return Some(key_end);
        }
        at = skip_item(data, key_end)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value as V;
    use roomcast_protocol::{PayloadLimits, payload::validate};

    fn cbor(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn text(s: &str) -> V {
        V::Text(s.into())
    }

    fn map(entries: Vec<(&str, V)>) -> V {
        V::Map(entries.into_iter().map(|(k, v)| (text(k), v)).collect())
    }

    fn hex(h: &str) -> Vec<u8> {
        let h: String = h.split_whitespace().collect();
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn paths_parse_and_print() {
        assert_eq!(
            KeyPath::parse("device.id").unwrap().to_string(),
            "device.id"
        );
        for bad in ["", ".", "a.", ".a", "a..b", "a.b.c.d.e.f.g.h.i"] {
            assert!(KeyPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(KeyPath::parse(&"x".repeat(129)).is_err());
        assert!(KeyPath::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn finds_the_item_at_the_path_whatever_its_type() {
        let data = cbor(&map(vec![
            ("px", V::Float(1.5)),
            (
                "skip",
                V::Array(vec![map(vec![("instrument", text("no"))])]),
            ),
            ("instrument", text("EURUSD")),
            ("device", map(vec![("id", V::Integer(7.into()))])),
        ]));
        let at = |p: &str| KeyPath::parse(p).unwrap().locate(&data);
        assert_eq!(at("instrument"), Some(&cbor(&text("EURUSD"))[..]));
        assert_eq!(at("device.id"), Some(&[0x07][..]));
        assert_eq!(
            at("device"),
            Some(&cbor(&map(vec![("id", V::Integer(7.into()))]))[..])
        );
        assert_eq!(at("missing"), None);
        assert_eq!(at("px.id"), None, "a step that is not a map");
        assert_eq!(at("device.id.x"), None);
        // Not a map at the top.
        assert_eq!(
            KeyPath::parse("a")
                .unwrap()
                .locate(&cbor(&V::Array(vec![]))),
            None
        );
    }

    #[test]
    fn indefinite_lengths_tags_and_non_text_keys() {
        // {_ 1: "x", "k": [_ 1, 2], "id": h'0102'} — an integer key is never a match.
        let data = hex("bf 01 61 78 61 6b 9f 01 02 ff 62 69 64 42 01 02 ff");
        assert_eq!(validate(&data, PayloadLimits::default()), Ok(()));
        let path = KeyPath::parse("id").unwrap();
        assert_eq!(path.locate(&data), Some(&hex("42 01 02")[..]));
        assert_eq!(
            KeyPath::parse("k").unwrap().locate(&data),
            Some(&hex("9f 01 02 ff")[..])
        );
        // An indefinite-length text key is not looked into; a tagged value is kept whole.
        let data = hex("a2 7f 62 69 64 ff 01 62 69 64 c1 02");
        assert_eq!(path.locate(&data), Some(&hex("c1 02")[..]));
        // A tagged map is not looked through.
        assert_eq!(path.locate(&hex("c1 a1 62 69 64 01")), None);
        // Duplicate keys: the first wins.
        assert_eq!(
            path.locate(&hex("a2 62 69 64 01 62 69 64 02")),
            Some(&[0x01][..])
        );
    }

    /// The reference: decode to a value, follow the path, encode what is there.
    fn reference(path: &[&str], data: &[u8]) -> Option<Vec<u8>> {
        let mut value: V = ciborium::from_reader(data).ok()?;
        for segment in path {
            let V::Map(entries) = value else {
                return None;
            };
            value = entries
                .into_iter()
                .find(|(k, _)| matches!(k, V::Text(t) if t == segment))?
                .1;
        }
        Some(cbor(&value))
    }

    fn value() -> impl proptest::strategy::Strategy<Value = V> {
        use proptest::prelude::*;
        let key = prop_oneof![Just("a"), Just("b"), Just("id")].prop_map(text);
        let leaf = prop_oneof![
            any::<i64>().prop_map(|n| V::Integer(n.into())),
            "[a-z]{0,3}".prop_map(V::Text),
            proptest::collection::vec(any::<u8>(), 0..4).prop_map(V::Bytes),
            any::<bool>().prop_map(V::Bool),
            Just(V::Null),
        ];
        leaf.prop_recursive(4, 32, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(V::Array),
                proptest::collection::vec((key.clone(), inner.clone()), 0..4).prop_map(V::Map),
                // Not tags 2 and 3: ciborium's reference decoding turns bignums into
                // integers, which the raw bytes located are not.
                (4..8u64, inner).prop_map(|(tag, v)| V::Tag(tag, Box::new(v))),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn locate_agrees_with_decoding(
            data in value(),
            path in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("a"),
                    proptest::strategy::Just("b"),
                    proptest::strategy::Just("id"),
                ],
                1..4,
            ),
        ) {
            let bytes = cbor(&data);
            let key_path = KeyPath::parse(&path.join(".")).unwrap();
            proptest::prop_assert_eq!(
                key_path.locate(&bytes).map(<[u8]>::to_vec),
                reference(&path, &bytes)
            );
        }
    }

    #[test]
    fn malformed_truncated_or_deep_input_gives_no_key() {
        let path = KeyPath::parse("id").unwrap();
        for bad in [
            "",
            "a1",
            "a1 62 69 64",
            "a1 62 69",
            "a1 62 69 64 5b ffffffffffffffff",
            "bf 62 69 65 01",
            "a1 62 69 65 1c",
        ] {
            assert_eq!(path.locate(&hex(bad)), None, "{bad}");
        }
        // A sibling nested deeper than the walker's stack: no key, no panic.
        let mut deep = hex("a2 61 61");
        deep.extend(std::iter::repeat_n(0x81, 100));
        deep.push(0x00);
        deep.extend(hex("62 69 64 05"));
        assert_eq!(path.locate(&deep), None);
        let mut ok = hex("a2 61 61");
        ok.extend(std::iter::repeat_n(0x81, 30));
        ok.push(0x00);
        ok.extend(hex("62 69 64 05"));
        assert_eq!(path.locate(&ok), Some(&[0x05][..]));
        // A huge declared count runs out of bytes instead of looping.
        assert_eq!(path.locate(&hex("bb ffffffffffffffff 61 61 01")), None);
    }
}
