//! The pure checks of messages from NATS (docs/PROTOCOL.md §11): the `Roomcast-*` headers,
//! the room they name, the payload's size and well-formedness.
//!
//! Owns the header names and the decision "deliver or drop, and why". No I/O, no state, no
//! metrics: the readers count and log what it refuses.

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use roomcast_protocol::{
    EventName, Payload, PayloadLimits, RoomName, frame::MAX_IDEMPOTENCY_KEY_LEN,
};

/// Header carrying the event name (required).
pub const HEADER_EVENT: &str = "Roomcast-Event";
/// Header carrying the room name (optional; must match the subject's room).
pub const HEADER_ROOM: &str = "Roomcast-Room";
/// Header carrying the publishing node's id (informational).
pub const HEADER_ORIGIN: &str = "Roomcast-Origin";
/// Header carrying a publish's idempotency key.
pub const HEADER_KEY: &str = "Roomcast-Key";

/// Validates a message from NATS: event header, optional room header, payload.
pub(super) fn check(
    room: &RoomName,
    message: Message,
    limits: PayloadLimits,
    max_payload: usize,
) -> Result<(EventName, Payload, Option<String>), &'static str> {
    let headers = message.headers.unwrap_or_default();
    check_parts(room, &headers, message.payload, limits, max_payload)
}

/// [`check`] on a message's parts (also for messages read from a stream).
pub(super) fn check_parts(
    room: &RoomName,
    headers: &HeaderMap,
    payload: Bytes,
    limits: PayloadLimits,
    max_payload: usize,
) -> Result<(EventName, Payload, Option<String>), &'static str> {
    let key = match headers.get(HEADER_KEY) {
        Some(k) if k.as_str().is_empty() || k.as_str().len() > MAX_IDEMPOTENCY_KEY_LEN => {
            return Err("bad Roomcast-Key header");
        }
        Some(k) => Some(k.as_str().to_owned()),
        None => None,
    };
    let event = headers
        .get(HEADER_EVENT)
        .ok_or("no Roomcast-Event header")?;
    let event = EventName::new(event.as_str()).map_err(|_| "bad Roomcast-Event header")?;
    if let Some(named) = headers.get(HEADER_ROOM) {
        if named.as_str() != room.as_str() {
            return Err("Roomcast-Room names another room");
        }
    }
    if payload.len() > max_payload {
        return Err("payload larger than --max-frame-size");
    }
    let data = Payload::new(payload, limits).map_err(|_| "payload is not one CBOR item")?;
    Ok((event, data, key))
}

/// The numbers a stream puts on a message it republishes: its sequence (`Nats-Sequence`,
/// required) and the sequence of the room's event before it (`Nats-Last-Sequence`, 0 when
/// absent: the room's first). `None` without a readable sequence.
pub(super) fn stream_numbers(headers: &HeaderMap) -> Option<(u64, u64)> {
    let seq = headers
        .get(async_nats::header::NATS_SEQUENCE)?
        .as_str()
        .parse::<u64>()
        .ok()?;
    let previous = headers
        .get(async_nats::header::NATS_LAST_SEQUENCE)
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .unwrap_or(0);
    Some((seq, previous))
}

#[cfg(test)]
mod tests {
    use async_nats::Subject;
    use roomcast_protocol::frame::MAX_IDEMPOTENCY_KEY_LEN;

    use super::*;

    const MAX_PAYLOAD: usize = 64;

    fn room() -> RoomName {
        RoomName::new("orders:1").unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, *value);
        }
        headers
    }

    /// CBOR `{"n": 1}`.
    fn cbor() -> Bytes {
        Bytes::from_static(&[0xa1, 0x61, b'n', 0x01])
    }

    fn checked(
        headers: &HeaderMap,
        payload: Bytes,
    ) -> Result<(EventName, Payload, Option<String>), &'static str> {
        check_parts(
            &room(),
            headers,
            payload,
            PayloadLimits::default(),
            MAX_PAYLOAD,
        )
    }

    #[test]
    fn a_well_formed_message_gives_its_event_data_and_key_untouched() {
        let all = headers(&[
            (HEADER_EVENT, "moved"),
            (HEADER_ROOM, "orders:1"),
            (HEADER_ORIGIN, "node-a"),
            (HEADER_KEY, "k-1"),
        ]);
        let (event, data, key) = checked(&all, cbor()).unwrap();
        assert_eq!(event.as_str(), "moved");
        assert_eq!(data.as_bytes(), &cbor(), "the payload is never re-encoded");
        assert_eq!(key.as_deref(), Some("k-1"));
        // Only the event header is required.
        let (event, _, key) = checked(&headers(&[(HEADER_EVENT, "moved")]), cbor()).unwrap();
        assert_eq!((event.as_str(), key), ("moved", None));
    }

    #[test]
    fn the_event_header_is_required_and_must_be_an_event_name() {
        assert_eq!(
            checked(&HeaderMap::new(), cbor()).unwrap_err(),
            "no Roomcast-Event header"
        );
        let too_long = "e".repeat(65);
        for bad in ["", "two words", too_long.as_str()] {
            assert_eq!(
                checked(&headers(&[(HEADER_EVENT, bad)]), cbor()).unwrap_err(),
                "bad Roomcast-Event header",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_room_header_must_name_the_subjects_room() {
        let other = headers(&[(HEADER_EVENT, "e"), (HEADER_ROOM, "orders:2")]);
        assert_eq!(
            checked(&other, cbor()).unwrap_err(),
            "Roomcast-Room names another room"
        );
        let same = headers(&[(HEADER_EVENT, "e"), (HEADER_ROOM, "orders:1")]);
        assert!(checked(&same, cbor()).is_ok());
    }

    #[test]
    fn an_idempotency_key_is_one_to_sixty_four_bytes() {
        let longest = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN);
        let (_, _, key) = checked(
            &headers(&[(HEADER_EVENT, "e"), (HEADER_KEY, &longest)]),
            cbor(),
        )
        .unwrap();
        assert_eq!(key.as_deref(), Some(longest.as_str()));
        let too_long = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1);
        for bad in ["", too_long.as_str()] {
            assert_eq!(
                checked(&headers(&[(HEADER_EVENT, "e"), (HEADER_KEY, bad)]), cbor()).unwrap_err(),
                "bad Roomcast-Key header",
                "{} bytes",
                bad.len()
            );
        }
    }

    #[test]
    fn the_payload_must_be_one_cbor_item_within_the_caps() {
        let event = headers(&[(HEADER_EVENT, "e")]);
        // A byte string filling the cap exactly passes; one byte more does not.
        let mut at_cap = vec![0x58, (MAX_PAYLOAD - 2) as u8];
        at_cap.resize(MAX_PAYLOAD, 0);
        assert!(checked(&event, Bytes::from(at_cap.clone())).is_ok());
        at_cap[1] += 1;
        at_cap.push(0);
        assert_eq!(
            checked(&event, Bytes::from(at_cap)).unwrap_err(),
            "payload larger than --max-frame-size"
        );
        let nested = |depth: usize| {
            let mut bytes = vec![0x81; depth - 1];
            bytes.push(0x00);
            Bytes::from(bytes)
        };
        assert!(checked(&event, nested(PayloadLimits::default().max_depth)).is_ok());
        for bad in [
            Bytes::new(),                                   // nothing
            Bytes::from_static(&[0x01, 0x02]),              // two items
            Bytes::from_static(&[0x62, b'a']),              // truncated text
            Bytes::from_static(&[0xff]),                    // a lone break
            nested(PayloadLimits::default().max_depth + 1), // too deep
        ] {
            assert_eq!(
                checked(&event, bad.clone()).unwrap_err(),
                "payload is not one CBOR item",
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn a_republished_message_carries_its_sequence_and_the_one_before() {
        use async_nats::header::{NATS_LAST_SEQUENCE, NATS_SEQUENCE};
        let numbered = |pairs: &[(&str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                match *name {
                    "seq" => headers.insert(NATS_SEQUENCE, *value),
                    _ => headers.insert(NATS_LAST_SEQUENCE, *value),
                }
            }
            stream_numbers(&headers)
        };
        assert_eq!(numbered(&[("seq", "7"), ("last", "5")]), Some((7, 5)));
        assert_eq!(numbered(&[("seq", "1")]), Some((1, 0)), "the room's first");
        assert_eq!(numbered(&[("seq", "7"), ("last", "x")]), Some((7, 0)));
        assert_eq!(numbered(&[("last", "5")]), None);
        assert_eq!(numbered(&[("seq", "-1")]), None);
        assert_eq!(numbered(&[("seq", "18446744073709551616")]), None);
        assert_eq!(numbered(&[]), None);
    }

    #[test]
    fn a_message_without_headers_is_refused() {
        let message = Message {
            subject: Subject::from("rc.orders.1"),
            reply: None,
            payload: cbor(),
            headers: None,
            status: None,
            description: None,
            length: 4,
        };
        assert_eq!(
            check(&room(), message, PayloadLimits::default(), MAX_PAYLOAD).unwrap_err(),
            "no Roomcast-Event header"
        );
    }
}
