//! Validated opaque event payloads.
//!
//! An event's `data` is one encoded CBOR item carried as raw bytes. The broker checks that the
//! bytes are exactly one well-formed item (RFC 8949 §5.3.1: valid heads, UTF-8 text, balanced
//! indefinite-length items, no trailing bytes) within a nesting-depth cap, then forwards the
//! same bytes: it never decodes them into a dynamic value or re-encodes them. Schema checks
//! belong to a later layer; this module only owns well-formedness.

use bytes::Bytes;
use ciborium_ll::{Decoder, Header};

/// Bounds applied while validating a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLimits {
    /// Deepest nesting of arrays, maps and tags allowed (the top-level item is depth 1).
    /// Default 32.
    pub max_depth: usize,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        PayloadLimits { max_depth: 32 }
    }
}

/// Why payload bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The bytes are not one well-formed CBOR item (truncated, bad head, bad UTF-8 ...).
    #[error("payload is not well-formed CBOR at byte {0}")]
    Malformed(usize),
    /// Bytes follow the single item.
    #[error("payload has trailing bytes after its item at byte {0}")]
    TrailingBytes(usize),
    /// Containers nest deeper than the cap.
    #[error("payload nests deeper than {0} levels")]
    TooDeep(usize),
}

/// Why a value could not be converted to or from a payload's CBOR ([`Payload::encode`],
/// [`Payload::decode`]).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be serialized as CBOR.
    #[error("cannot encode the value as CBOR: {0}")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// The payload does not deserialize as the requested type.
    #[error("cannot decode the payload as the requested type: {0}")]
    Decode(#[source] ciborium::de::Error<std::io::Error>),
}

/// One validated CBOR item as raw bytes. Cloning shares the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Bytes);

impl Payload {
    /// Validates `bytes` as exactly one well-formed CBOR item within `limits`.
    pub fn new(bytes: Bytes, limits: PayloadLimits) -> Result<Self, PayloadError> {
        validate(&bytes, limits)?;
        Ok(Payload(bytes))
    }

    /// Encodes `value` as CBOR (for clients and tests; the broker never does this on the
    /// fan-out path).
    pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Result<Self, CodecError> {
        let mut out = Vec::with_capacity(64);
        ciborium::into_writer(value, &mut out).map_err(CodecError::Encode)?;
        Ok(Payload(Bytes::from(out)))
    }

    /// Decodes the payload into `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, CodecError> {
        ciborium::from_reader(&self.0[..]).map_err(CodecError::Decode)
    }

    /// The raw CBOR bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a validated payload (a CBOR item is at least one byte).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

/// What the container on top of the validation stack still expects.
#[derive(Clone, Copy)]
enum Remaining {
    /// A definite-length array or map with this many items (keys and values) left.
    Definite(u64),
    /// An indefinite-length array (`is_map == false`) or map, with the items seen so far.
    Indefinite { is_map: bool, seen: u64 },
}

/// An open array or map and the nesting levels it added (itself plus the tags before it).
#[derive(Clone, Copy)]
struct Open {
    remaining: Remaining,
    levels: usize,
}

/// Reads one definite-length byte or text string of `len` bytes (text: valid UTF-8).
fn skip_string(
    decoder: &mut Decoder<&[u8]>,
    text: bool,
    len: usize,
    at: usize,
) -> Result<(), PayloadError> {
    let malformed = |_| PayloadError::Malformed(at);
    let mut scratch = [0u8; 256];
    if text {
        let mut segments = decoder.text(Some(len));
        while let Some(mut segment) = segments.pull().map_err(malformed)? {
            while segment.pull(&mut scratch).map_err(malformed)?.is_some() {}
        }
    } else {
        let mut segments = decoder.bytes(Some(len));
        while let Some(mut segment) = segments.pull().map_err(malformed)? {
            while segment.pull(&mut scratch).map_err(malformed)?.is_some() {}
        }
    }
    Ok(())
}

/// Reads a byte or text string; an indefinite-length one must consist of definite-length
/// chunks of the same major type (RFC 8949 §3.2.3), each text chunk valid UTF-8 on its own.
fn skip_any_string(
    decoder: &mut Decoder<&[u8]>,
    text: bool,
    len: Option<usize>,
    at: usize,
) -> Result<(), PayloadError> {
    if let Some(len) = len {
        return skip_string(decoder, text, len, at);
    }
    loop {
        let chunk_at = decoder.offset();
        match decoder
            .pull()
            .map_err(|_| PayloadError::Malformed(chunk_at))?
        {
            Header::Break => return Ok(()),
            Header::Bytes(Some(len)) if !text => skip_string(decoder, false, len, chunk_at)?,
            Header::Text(Some(len)) if text => skip_string(decoder, true, len, chunk_at)?,
            _ => return Err(PayloadError::Malformed(chunk_at)),
        }
    }
}

/// Checks that `bytes` hold exactly one well-formed CBOR item no deeper than the cap.
///
/// Depth: the top-level item is at depth 1; an item inside an array, a map or a tag is one
/// level deeper than its container. Works in constant memory besides a stack bounded by
/// `max_depth`, never allocates by a length read from the input, and never recurses.
pub fn validate(bytes: &[u8], limits: PayloadLimits) -> Result<(), PayloadError> {
    let end = item_len(bytes, limits)?;
    if end == bytes.len() {
        Ok(())
    } else {
        Err(PayloadError::TrailingBytes(end))
    }
}

/// The length of the one well-formed CBOR item that `bytes` start with (checked as
/// [`validate`] checks a whole payload; what follows it is not looked at). Lets a container
/// hand on an embedded item's bytes as they are.
pub fn item_len(bytes: &[u8], limits: PayloadLimits) -> Result<usize, PayloadError> {
    let mut decoder = Decoder::from(bytes);
    let mut stack: Vec<Open> = Vec::new();
    // Levels added by the open containers (and the tags in front of them).
    let mut level: usize = 0;
    // Tags read since the last item or container: they wrap the next item.
    let mut pending_tags: usize = 0;
    loop {
        let at = decoder.offset();
        let header = decoder.pull().map_err(|_| PayloadError::Malformed(at))?;
        // The depth of the item this header starts.
        let depth = level + pending_tags + 1;
        // Does this header complete an item (true) or open one that needs more headers?
        let completes = match header {
            Header::Positive(_) | Header::Negative(_) | Header::Float(_) => true,
            Header::Simple(value) => {
                // Two-byte simple values below 32 are not well-formed (RFC 8949 §3.3).
                if value < 32 && bytes.get(at) == Some(&0xf8) {
                    return Err(PayloadError::Malformed(at));
                }
                true
            }
            Header::Bytes(len) => {
                skip_any_string(&mut decoder, false, len, at)?;
                true
            }
            Header::Text(len) => {
                skip_any_string(&mut decoder, true, len, at)?;
                true
            }
            Header::Tag(_) => {
                if depth + 1 > limits.max_depth {
                    return Err(PayloadError::TooDeep(limits.max_depth));
                }
                pending_tags += 1;
                continue;
            }
            Header::Array(len) | Header::Map(len) => {
                let is_map = matches!(header, Header::Map(_));
                let remaining = match len {
                    Some(0) => None,
                    Some(n) => Some(Remaining::Definite(if is_map {
                        (n as u64).saturating_mul(2)
                    } else {
                        n as u64
                    })),
                    None => Some(Remaining::Indefinite { is_map, seen: 0 }),
                };
                match remaining {
                    // An empty container has no items one level deeper.
                    None => true,
                    Some(remaining) => {
                        if depth + 1 > limits.max_depth {
                            return Err(PayloadError::TooDeep(limits.max_depth));
                        }
                        let levels = pending_tags + 1;
                        stack.push(Open { remaining, levels });
                        level += levels;
                        pending_tags = 0;
                        false
                    }
                }
            }
            Header::Break => {
                match stack.last() {
                    Some(Open {
                        remaining: Remaining::Indefinite { is_map, seen },
                        levels,
                    }) if pending_tags == 0 && (!is_map || seen % 2 == 0) => {
                        level -= levels;
                        stack.pop();
                    }
                    _ => return Err(PayloadError::Malformed(at)),
                }
                true
            }
        };
        if !completes {
            continue;
        }
        pending_tags = 0;
        // One item finished: count it against its parents, closing those it fills.
        loop {
            let Some(top) = stack.last_mut() else {
                return Ok(decoder.offset());
            };
            match &mut top.remaining {
                Remaining::Definite(left) => {
                    *left -= 1;
                    if *left == 0 {
                        level -= top.levels;
                        stack.pop();
                        continue;
                    }
                    break;
                }
                Remaining::Indefinite { seen, .. } => {
                    *seen += 1;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(hex: &str) -> Result<(), PayloadError> {
        let bytes = decode_hex(hex);
        validate(&bytes, PayloadLimits::default())
    }

    fn decode_hex(hex: &str) -> Vec<u8> {
        let hex: String = hex.split_whitespace().collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn accepts_well_formed_items() {
        for ok in [
            "00",                         // 0
            "1bffffffffffffffff",         // max u64
            "3903e7",                     // -1000
            "f93c00",                     // 1.0 half
            "f4",                         // false
            "f6",                         // null
            "4401020304",                 // h'01020304'
            "6449455446",                 // "IETF"
            "a26161016162820203",         // {"a":1,"b":[2,3]}
            "9f018202039f0405ffff",       // [_ 1, [2,3], [_ 4,5]]
            "bf6346756ef563416d7421ff",   // {_ "Fun": true, "Amt": -2}
            "7f657374726561646d696e67ff", // (_ "strea", "ming")
            "c11a514b67b0",               // tag 1 (epoch time)
            "d8184401020304",             // tag 24 around bytes
            "80",                         // []
            "a0",                         // {}
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_malformed_items() {
        for bad in [
            "",                       // nothing
            "18",                     // truncated uint
            "62 61",                  // text shorter than declared
            "62 c3 28",               // invalid UTF-8
            "82 01",                  // array missing an item
            "a1 01",                  // map missing a value
            "bf 01 ff",               // indefinite map with odd items
            "ff",                     // lone break
            "1c",                     // reserved additional info
            "5f 61 61 ff",            // text chunk inside indefinite bytes
            "5f 5f 41 00 ff ff",      // indefinite chunk inside indefinite bytes
            "7f 61 c3 61 a9 ff",      // UTF-8 character split across text chunks
            "c1",                     // tag with no item
            "9f c1 ff",               // tag followed by break
            "f8 10",                  // two-byte simple value below 32
            "5b ffffffffffffffff 00", // huge declared length, one byte present
        ] {
            assert!(
                matches!(check(bad), Err(PayloadError::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(check("01 02"), Err(PayloadError::TrailingBytes(1)));
    }

    #[test]
    fn depth_cap_applies_to_arrays_maps_and_tags() {
        let limits = PayloadLimits { max_depth: 4 };
        let nested = |n: usize| {
            let mut v = vec![0x81u8; n];
            v.push(0x00);
            v
        };
        assert_eq!(validate(&nested(3), limits), Ok(()));
        assert_eq!(validate(&nested(4), limits), Err(PayloadError::TooDeep(4)));
        let tags = [0xc1u8, 0xc1, 0xc1, 0xc1, 0x00];
        assert_eq!(validate(&tags, limits), Err(PayloadError::TooDeep(4)));
        assert_eq!(validate(&[0xc1, 0xc1, 0xc1, 0x00], limits), Ok(()));
        // Tags in front of a container count for everything inside it.
        assert_eq!(
            validate(&[0xc1, 0xc1, 0x81, 0x81, 0x00], limits),
            Err(PayloadError::TooDeep(4))
        );
        assert_eq!(validate(&[0xc1, 0x81, 0x81, 0x00], limits), Ok(()));
        // An empty container at the deepest level is fine; a non-empty one is not.
        assert_eq!(validate(&[0x81, 0x81, 0x81, 0x80], limits), Ok(()));
        assert_eq!(
            validate(&[0x81, 0x81, 0x81, 0x81, 0x00], limits),
            Err(PayloadError::TooDeep(4))
        );
        // A deep attack: a million nested arrays is refused quickly, without recursion.
        let deep = vec![0x9fu8; 1_000_000];
        assert_eq!(
            validate(&deep, PayloadLimits::default()),
            Err(PayloadError::TooDeep(32))
        );
    }

    #[test]
    fn item_len_finds_the_end_of_the_first_item_only() {
        let limits = PayloadLimits::default();
        // [1, "a"] followed by other bytes, an indefinite array, a tagged map.
        for (hex, len) in [
            ("820161610102", 4),
            ("9f1a00000001ff00", 7),
            ("c1a1616101f6", 5),
            ("f6", 1),
        ] {
            let bytes = decode_hex(hex);
            assert_eq!(item_len(&bytes, limits), Ok(len), "{hex}");
        }
        // Truncated or malformed items are still refused.
        for hex in ["820161", "9f01", "ff"] {
            assert!(item_len(&decode_hex(hex), limits).is_err(), "{hex}");
        }
    }

    #[test]
    fn sibling_containers_do_not_add_depth() {
        // [[0],[0],[0],...] 100 siblings at depth 2.
        let mut v = vec![0x98, 100];
        for _ in 0..100 {
            v.extend_from_slice(&[0x81, 0x00]);
        }
        assert_eq!(validate(&v, PayloadLimits { max_depth: 3 }), Ok(()));
    }

    #[test]
    fn encode_decode_round_trip() {
        let payload = Payload::encode(&serde_json::json!({"state": "shipped"})).unwrap();
        let back: serde_json::Value = payload.decode().unwrap();
        assert_eq!(back["state"], "shipped");
        assert!(Payload::new(payload.as_bytes().clone(), PayloadLimits::default()).is_ok());
    }
}
