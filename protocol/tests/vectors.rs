//! Keeps `docs/PROTOCOL.md` and the code in step.
//!
//! Every ```` ```vector ```` block of the document is decoded with [`ClientFrame::decode`] or
//! [`ServerFrame::decode`] and compared with the value this file expects for the vector's name,
//! then re-encoded and compared byte for byte; invalid vectors must fail with the named
//! [`DecodeError`] variant. The document must hold exactly the vectors listed here. The key,
//! frame type, code, default, name and envelope-overhead tables of the document are checked
//! against the crate too; the frame type table's required and optional key columns (with the
//! value an absent optional key takes) are checked by decoding and encoding frames built from
//! them.
//!
//! To print the vector blocks after a deliberate change of the format:
//! `ROOMCAST_PRINT_VECTORS=1 cargo test -p roomcast-protocol --test vectors -- --nocapture print_vectors`.

use std::collections::BTreeSet;

use ciborium::Value;
use roomcast_protocol::{
    ClientFrame, Code, DecodeError, EventName, PROTOCOL_VERSION, Payload, PayloadLimits, Position,
    RoomName, ServerFrame, SessionConfig,
    frame::{Event, MAX_IDEMPOTENCY_KEY_LEN, Welcome, encode_event, key, kind},
};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");

fn read_doc() -> String {
    std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("cannot read {DOC}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The expected vectors.

/// What a vector of the document must decode to.
enum Want {
    /// A client frame in canonical form: the vector's bytes are its encoding.
    Client(ClientFrame),
    /// A broker frame in canonical form.
    Server(ServerFrame),
    /// Accepted non-canonical client input; re-encodes to the frame's canonical bytes.
    ClientLenient(Vec<u8>, ClientFrame),
    /// Accepted non-canonical broker input.
    ServerLenient(Vec<u8>, ServerFrame),
    /// Client input refused with this error (see [`render`]).
    ClientInvalid(Vec<u8>, &'static str),
    /// Broker input refused with this error.
    ServerInvalid(Vec<u8>, &'static str),
}

impl Want {
    fn dir(&self) -> &'static str {
        match self {
            Want::Client(_) | Want::ClientLenient(..) | Want::ClientInvalid(..) => "client",
            _ => "server",
        }
    }

    /// The exact bytes the vector's `hex` line must hold.
    fn input(&self) -> Vec<u8> {
        match self {
            Want::Client(f) => f.encode().to_vec(),
            Want::Server(f) => f.encode().to_vec(),
            Want::ClientLenient(b, _)
            | Want::ServerLenient(b, _)
            | Want::ClientInvalid(b, _)
            | Want::ServerInvalid(b, _) => b.clone(),
        }
    }

    /// The `encodes-to` line, when the input is not canonical.
    fn encodes_to(&self) -> Option<Vec<u8>> {
        match self {
            Want::ClientLenient(_, f) => Some(f.encode().to_vec()),
            Want::ServerLenient(_, f) => Some(f.encode().to_vec()),
            _ => None,
        }
    }

    fn error(&self) -> Option<&'static str> {
        match self {
            Want::ClientInvalid(_, e) | Want::ServerInvalid(_, e) => Some(e),
            _ => None,
        }
    }
}

fn u(n: u64) -> Value {
    Value::Integer(n.into())
}
fn t(s: &str) -> Value {
    Value::Text(s.into())
}
fn b(x: &[u8]) -> Value {
    Value::Bytes(x.to_vec())
}
fn m(entries: Vec<(Value, Value)>) -> Value {
    Value::Map(entries)
}
fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("encode test value");
    out
}
fn room(s: &str) -> RoomName {
    RoomName::new(s).expect("test room name")
}
fn event(s: &str) -> EventName {
    EventName::new(s).expect("test event name")
}
fn payload(v: serde_json::Value) -> Payload {
    Payload::encode(&v).expect("test payload")
}

/// `{"state": "shipped"}`
fn shipped() -> Payload {
    payload(serde_json::json!({"state": "shipped"}))
}
/// `[5252, 1340]`
fn position() -> Payload {
    payload(serde_json::json!([5252, 1340]))
}

/// Every vector the document must hold, by name.
fn vectors() -> Vec<(&'static str, Want)> {
    let publish_gps = ClientFrame::Publish {
        key: None,
        id: 0,
        room: "gps:7".into(),
        event: "pos".into(),
        data: position().as_bytes().clone(),
        ack: false,
    };
    vec![
        // Client frames, canonical.
        (
            "hello",
            Want::Client(ClientFrame::Hello {
                version: 1,
                token: None,
            }),
        ),
        (
            "hello-token",
            Want::Client(ClientFrame::Hello {
                version: 1,
                token: Some("secret-token".into()),
            }),
        ),
        (
            "hello-v2",
            Want::Client(ClientFrame::Hello {
                version: 2,
                token: None,
            }),
        ),
        (
            "subscribe",
            Want::Client(ClientFrame::Subscribe {
                since: None,
                id: 1,
                room: "orders:1042".into(),
            }),
        ),
        (
            "subscribe-since",
            Want::Client(ClientFrame::Subscribe {
                since: Some(Position { epoch: 7, seq: 42 }),
                id: 1,
                room: "orders:1042".into(),
            }),
        ),
        (
            "unsubscribe",
            Want::Client(ClientFrame::Unsubscribe {
                id: 2,
                room: "orders:1042".into(),
            }),
        ),
        (
            "publish-ack",
            Want::Client(ClientFrame::Publish {
                key: None,
                id: 3,
                room: "orders:1042".into(),
                event: "status".into(),
                data: shipped().as_bytes().clone(),
                ack: true,
            }),
        ),
        ("publish-no-ack", Want::Client(publish_gps.clone())),
        (
            "publish-key",
            Want::Client(ClientFrame::Publish {
                key: Some("f47ac10b-58cc-4372-a567-0e02b2c3d479".into()),
                id: 9,
                room: "orders:1042".into(),
                event: "status".into(),
                data: shipped().as_bytes().clone(),
                ack: true,
            }),
        ),
        ("ping", Want::Client(ClientFrame::Ping { id: None })),
        ("ping-id", Want::Client(ClientFrame::Ping { id: Some(42) })),
        (
            "refresh",
            Want::Client(ClientFrame::Refresh {
                id: 8,
                token: "a.b.c".into(),
            }),
        ),
        // Client frames, accepted but not canonical.
        (
            "publish-minimal",
            Want::ClientLenient(
                cbor(&m(vec![
                    (u(0), u(kind::PUBLISH)),
                    (u(2), t("gps:7")),
                    (u(3), t("pos")),
                    (u(4), b(position().as_bytes())),
                ])),
                publish_gps.clone(),
            ),
        ),
        (
            "publish-ack-false",
            Want::ClientLenient(
                cbor(&m(vec![
                    (u(0), u(kind::PUBLISH)),
                    (u(1), u(0)),
                    (u(2), t("gps:7")),
                    (u(3), t("pos")),
                    (u(4), b(position().as_bytes())),
                    (u(6), Value::Bool(false)),
                ])),
                publish_gps,
            ),
        ),
        (
            "ping-unordered",
            Want::ClientLenient(
                cbor(&m(vec![
                    (u(1), u(42)),
                    (u(0), u(kind::PING)),
                    (u(99), t("future")),
                ])),
                ClientFrame::Ping { id: Some(42) },
            ),
        ),
        // Broker frames, canonical.
        (
            "welcome",
            Want::Server(ServerFrame::Welcome(Welcome {
                version: 1,
                session_id: "s-8f3a".into(),
                server_time_ms: 1_700_000_000_000,
                max_frame_size: 65_536,
                ping_interval_ms: 25_000,
                idle_timeout_ms: 60_000,
            })),
        ),
        (
            "subscribed",
            Want::Server(ServerFrame::Subscribed {
                epoch: 7,
                recovered: None,
                id: 1,
                room: room("orders:1042"),
                seq: 41,
            }),
        ),
        (
            "subscribed-no-history",
            Want::Server(ServerFrame::Subscribed {
                epoch: 0,
                recovered: None,
                id: 2,
                room: room("gps:7"),
                seq: 311,
            }),
        ),
        (
            "subscribed-recovered",
            Want::Server(ServerFrame::Subscribed {
                epoch: 7,
                recovered: Some(true),
                id: 1,
                room: room("orders:1042"),
                seq: 42,
            }),
        ),
        (
            "subscribed-not-recovered",
            Want::Server(ServerFrame::Subscribed {
                epoch: 7,
                recovered: Some(false),
                id: 1,
                room: room("orders:1042"),
                seq: 1200,
            }),
        ),
        (
            "unsubscribed",
            Want::Server(ServerFrame::Unsubscribed {
                id: 2,
                room: room("orders:1042"),
            }),
        ),
        (
            "event",
            Want::Server(ServerFrame::Event(Event {
                epoch: None,
                room: room("orders:1042"),
                event: event("status"),
                data: shipped(),
                seq: 42,
            })),
        ),
        (
            "event-epoch",
            Want::Server(ServerFrame::Event(Event {
                epoch: Some(8),
                room: room("orders:1042"),
                event: event("status"),
                data: shipped(),
                seq: 1,
            })),
        ),
        (
            "ack",
            Want::Server(ServerFrame::Ack {
                id: 3,
                seq: Some(42),
            }),
        ),
        (
            "ack-no-seq",
            Want::Server(ServerFrame::Ack { id: 5, seq: None }),
        ),
        (
            "error",
            Want::Server(ServerFrame::Error {
                id: Some(6),
                code: Code::NotSubscribed,
                message: "not subscribed".into(),
                retry_after_ms: None,
            }),
        ),
        (
            "error-retry-after",
            Want::Server(ServerFrame::Error {
                id: Some(4),
                code: Code::RateLimited,
                message: "rate limited".into(),
                retry_after_ms: Some(250),
            }),
        ),
        (
            "error-no-id",
            Want::Server(ServerFrame::Error {
                id: None,
                code: Code::UnknownFrame,
                message: "unknown frame type 9".into(),
                retry_after_ms: None,
            }),
        ),
        ("pong", Want::Server(ServerFrame::Pong { id: None })),
        ("pong-id", Want::Server(ServerFrame::Pong { id: Some(42) })),
        (
            "close",
            Want::Server(ServerFrame::Close {
                retry_after_ms: None,
                code: Code::SlowConsumer,
                reason: "outbound queue over its byte cap".into(),
                reconnect: true,
            }),
        ),
        (
            "close-normal",
            Want::Server(ServerFrame::Close {
                retry_after_ms: None,
                code: Code::Normal,
                reason: "bye".into(),
                reconnect: false,
            }),
        ),
        (
            "close-retry-after",
            Want::Server(ServerFrame::Close {
                retry_after_ms: Some(1500),
                code: Code::ShuttingDown,
                reason: "draining".into(),
                reconnect: true,
            }),
        ),
        (
            "conflation-active",
            Want::Server(ServerFrame::Conflation {
                room: room("prices:eurusd"),
                active: true,
            }),
        ),
        (
            "conflation-inactive",
            Want::Server(ServerFrame::Conflation {
                room: room("prices:eurusd"),
                active: false,
            }),
        ),
        // Broker frames, accepted but not canonical.
        (
            "close-minimal",
            Want::ServerLenient(
                cbor(&m(vec![(u(0), u(kind::CLOSE)), (u(7), u(4000))])),
                ServerFrame::Close {
                    retry_after_ms: None,
                    code: Code::Normal,
                    reason: String::new(),
                    reconnect: false,
                },
            ),
        ),
        (
            "error-minimal",
            Want::ServerLenient(
                cbor(&m(vec![(u(0), u(kind::ERROR)), (u(7), u(4104))])),
                ServerFrame::Error {
                    id: None,
                    code: Code::UnknownFrame,
                    message: String::new(),
                    retry_after_ms: None,
                },
            ),
        ),
        // Invalid client input.
        (
            "bad-duplicate-key",
            Want::ClientInvalid(
                cbor(&m(vec![(u(0), u(kind::PING)), (u(0), u(kind::PING))])),
                "DuplicateKey key=0",
            ),
        ),
        (
            "bad-trailing-byte",
            Want::ClientInvalid(
                [
                    ClientFrame::Ping { id: None }.encode().to_vec(),
                    cbor(&u(0)),
                ]
                .concat(),
                "TrailingBytes",
            ),
        ),
        (
            "bad-text-key",
            Want::ClientInvalid(cbor(&m(vec![(t("type"), u(kind::PING))])), "Malformed"),
        ),
        (
            "bad-unknown-type",
            Want::ClientInvalid(
                cbor(&m(vec![(u(0), u(15)), (u(1), u(7))])),
                "UnknownType kind=15 id=7",
            ),
        ),
        (
            "bad-no-type",
            Want::ClientInvalid(
                cbor(&m(vec![(u(1), u(1))])),
                "MissingField frame=any field=type",
            ),
        ),
        (
            "bad-missing-room",
            Want::ClientInvalid(
                cbor(&m(vec![(u(0), u(kind::SUBSCRIBE)), (u(1), u(1))])),
                "MissingField frame=Subscribe field=room",
            ),
        ),
        (
            "bad-since-no-epoch",
            Want::ClientInvalid(
                cbor(&m(vec![
                    (u(0), u(kind::SUBSCRIBE)),
                    (u(1), u(1)),
                    (u(2), t("orders:1042")),
                    (u(5), u(42)),
                ])),
                "MissingField frame=Subscribe field=epoch",
            ),
        ),
        (
            "bad-id-type",
            Want::ClientInvalid(
                cbor(&m(vec![(u(0), u(kind::PING)), (u(1), t("42"))])),
                "Malformed",
            ),
        ),
        (
            "bad-data-not-bytes",
            Want::ClientInvalid(
                cbor(&m(vec![
                    (u(0), u(kind::PUBLISH)),
                    (u(1), u(3)),
                    (u(2), t("orders:1042")),
                    (u(3), t("status")),
                    (u(4), m(vec![(t("state"), t("shipped"))])),
                ])),
                "Malformed",
            ),
        ),
        (
            "bad-not-a-map",
            Want::ClientInvalid(cbor(&Value::Array(vec![u(5)])), "Malformed"),
        ),
        // Invalid broker input.
        (
            "bad-server-room",
            Want::ServerInvalid(
                cbor(&m(vec![
                    (u(0), u(kind::SUBSCRIBED)),
                    (u(1), u(1)),
                    (u(2), t("orders")),
                    (u(5), u(0)),
                    (u(18), u(7)),
                ])),
                "InvalidValue field=room",
            ),
        ),
        (
            "bad-server-no-epoch",
            Want::ServerInvalid(
                cbor(&m(vec![
                    (u(0), u(kind::SUBSCRIBED)),
                    (u(1), u(1)),
                    (u(2), t("orders:1042")),
                    (u(5), u(41)),
                ])),
                "MissingField frame=Subscribed field=epoch",
            ),
        ),
        (
            "bad-server-code",
            Want::ServerInvalid(
                cbor(&m(vec![
                    (u(0), u(kind::CLOSE)),
                    (u(7), u(4999)),
                    (u(8), t("")),
                    (u(9), Value::Bool(false)),
                ])),
                "InvalidValue field=code",
            ),
        ),
        (
            "bad-server-payload",
            Want::ServerInvalid(
                cbor(&m(vec![
                    (u(0), u(kind::EVENT)),
                    (u(2), t("orders:1042")),
                    (u(3), t("status")),
                    (u(4), b(&[0x82, 0x01])),
                    (u(5), u(1)),
                ])),
                "InvalidValue field=data",
            ),
        ),
        (
            "bad-server-client-type",
            Want::ServerInvalid(
                ClientFrame::Ping { id: None }.encode().to_vec(),
                "UnknownType kind=5 id=none",
            ),
        ),
    ]
}

/// The document's spelling of a decode error.
fn render(e: &DecodeError) -> String {
    match e {
        DecodeError::Malformed(_) => "Malformed".into(),
        DecodeError::DuplicateKey(k) => format!("DuplicateKey key={k}"),
        DecodeError::TrailingBytes => "TrailingBytes".into(),
        DecodeError::MissingField { frame, field } => {
            format!("MissingField frame={frame} field={field}")
        }
        DecodeError::UnknownType { kind, id } => match id {
            Some(id) => format!("UnknownType kind={kind} id={id}"),
            None => format!("UnknownType kind={kind} id=none"),
        },
        DecodeError::InvalidValue { field, .. } => format!("InvalidValue field={field}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Hex and CBOR diagnostic notation (RFC 8949 §8, with `<<...>>` for embedded CBOR).

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.split_whitespace().collect();
    if s.len() % 2 != 0 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("not hex: {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// Splits a CBOR sequence into its items' byte ranges and decoded values.
fn items(bytes: &[u8]) -> Result<Vec<(&[u8], Value)>, String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let before = rest;
        let value: Value = ciborium::from_reader(&mut rest).map_err(|e| e.to_string())?;
        out.push((&before[..before.len() - rest.len()], value));
    }
    Ok(out)
}

/// Diagnostic notation of a CBOR sequence (items separated by `, `).
fn diag(bytes: &[u8]) -> Result<String, String> {
    Ok(items(bytes)?
        .iter()
        .map(|(_, v)| diag_value(v, true))
        .collect::<Vec<_>>()
        .join(", "))
}

fn diag_value(v: &Value, frame: bool) -> String {
    match v {
        Value::Integer(i) => i128::from(*i).to_string(),
        Value::Bytes(x) => format!("h'{}'", hex(x)),
        Value::Text(s) => serde_json::to_string(s).expect("string to JSON"),
        Value::Bool(x) => x.to_string(),
        Value::Null => "null".into(),
        Value::Float(f) => format!("{f:?}"),
        Value::Tag(n, inner) => format!("{n}({})", diag_value(inner, false)),
        Value::Array(xs) => {
            let xs: Vec<_> = xs.iter().map(|x| diag_value(x, false)).collect();
            format!("[{}]", xs.join(", "))
        }
        Value::Map(entries) => {
            let entries: Vec<_> = entries
                .iter()
                .map(|(k, v)| {
                    // `data` (key 4) of a frame: show the embedded item when it is one.
                    let embedded = match (k, v) {
                        (Value::Integer(k), Value::Bytes(x)) if frame && i128::from(*k) == 4 => {
                            match items(x).as_deref() {
                                Ok([(_, inner)]) => {
                                    Some(format!("<<{}>>", diag_value(inner, false)))
                                }
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    let v = embedded.unwrap_or_else(|| diag_value(v, false));
                    format!("{}: {v}", diag_value(k, false))
                })
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        other => format!("{other:?}"),
    }
}

/// Hex with one group per map entry (map header first), for reading; whitespace is ignored.
fn grouped_hex(bytes: &[u8]) -> String {
    let Ok(parsed) = items(bytes) else {
        return hex(bytes);
    };
    let mut groups = Vec::new();
    for (raw, value) in parsed {
        let entries = match &value {
            Value::Map(entries) => entries,
            _ => {
                groups.push(hex(raw));
                continue;
            }
        };
        let encoded: Vec<Vec<u8>> = entries
            .iter()
            .map(|(k, v)| [cbor(k), cbor(v)].concat())
            .collect();
        let body: usize = encoded.iter().map(Vec::len).sum();
        if cbor(&value) != raw || body > raw.len() {
            groups.push(hex(raw));
            continue;
        }
        groups.push(hex(&raw[..raw.len() - body]));
        groups.extend(encoded.iter().map(|e| hex(e)));
    }
    groups.join(" ")
}

// ---------------------------------------------------------------------------------------------
// Reading the document.

/// One ```` ```vector ```` block.
#[derive(Debug, Default)]
struct DocVector {
    name: String,
    dir: String,
    hex: String,
    diag: String,
    encodes_to: Option<String>,
    error: Option<String>,
}

fn doc_vectors(doc: &str) -> Result<Vec<DocVector>, String> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```vector" {
            continue;
        }
        let mut v = DocVector::default();
        loop {
            let line = lines.next().ok_or("unterminated vector block")?.trim();
            if line == "```" {
                break;
            }
            let (k, val) = line
                .split_once(':')
                .ok_or_else(|| format!("bad vector line {line:?}"))?;
            let val = val.trim().to_string();
            match k.trim() {
                "name" => v.name = val,
                "dir" => v.dir = val,
                "hex" => v.hex = val,
                "diag" => v.diag = val,
                "encodes-to" => v.encodes_to = Some(val),
                "error" => v.error = Some(val),
                other => return Err(format!("unknown vector field {other:?} in {line:?}")),
            }
        }
        if v.name.is_empty() {
            return Err(format!("vector without name: {v:?}"));
        }
        out.push(v);
    }
    Ok(out)
}

/// Rows of the markdown table whose header line starts with `header`, cells trimmed and
/// stripped of backticks.
fn table(doc: &str, header: &str) -> Result<Vec<Vec<String>>, String> {
    let mut lines = doc
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(header));
    lines
        .next()
        .ok_or_else(|| format!("no table with header {header:?}"))?;
    lines.next(); // |---|---|
    Ok(lines
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            let l = l.trim().trim_start_matches('|').trim_end_matches('|');
            l.split('|').map(|c| c.trim().replace('`', "")).collect()
        })
        .collect())
}

/// The leading unsigned integer of a cell ("65536 bytes" -> 65536).
fn leading_u64(cell: &str) -> Result<u64, String> {
    let digits: String = cell.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().map_err(|_| format!("no number in {cell:?}"))
}

// ---------------------------------------------------------------------------------------------
// The checks. Each returns the problems it found; an empty list means the document is right.

fn check_vectors(doc: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let found = match doc_vectors(doc) {
        Ok(found) => found,
        Err(e) => return vec![e],
    };
    let wanted = vectors();
    let wanted_names: BTreeSet<&str> = wanted.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        wanted_names.len(),
        wanted.len(),
        "duplicate vector name in this test"
    );
    let mut seen = BTreeSet::new();
    for v in &found {
        if !seen.insert(v.name.as_str()) {
            problems.push(format!("{}: appears twice", v.name));
        }
        if !wanted_names.contains(v.name.as_str()) {
            problems.push(format!("{}: not a vector this test knows", v.name));
        }
    }
    for name in &wanted_names {
        if !seen.contains(name) {
            problems.push(format!("{name}: missing from the document"));
        }
    }
    for (name, want) in &wanted {
        let Some(v) = found.iter().find(|v| v.name == *name) else {
            continue;
        };
        if let Err(e) = check_vector(v, want) {
            problems.push(format!("{name}: {e}"));
        }
    }
    problems
}

fn check_vector(v: &DocVector, want: &Want) -> Result<(), String> {
    if v.dir != want.dir() {
        return Err(format!("dir is {:?}, expected {:?}", v.dir, want.dir()));
    }
    let bytes = unhex(&v.hex)?;
    let input = want.input();
    if bytes != input {
        return Err(format!("hex is {}, expected {}", hex(&bytes), hex(&input)));
    }
    let d = diag(&bytes)?;
    if v.diag != d {
        return Err(format!("diag is {:?}, expected {d:?}", v.diag));
    }
    match (&v.error, want.error()) {
        (Some(doc), Some(expected)) => {
            let result = match want {
                Want::ClientInvalid(..) => ClientFrame::decode(&bytes).map(|_| ()),
                _ => ServerFrame::decode(&bytes, PayloadLimits::default()).map(|_| ()),
            };
            let got = match result {
                Ok(()) => return Err("decoded, but should fail".into()),
                Err(e) => render(&e),
            };
            if got != expected || doc != expected {
                return Err(format!(
                    "error: document {doc:?}, expected {expected:?}, got {got:?}"
                ));
            }
            return Ok(());
        }
        (None, None) => {}
        (doc, expected) => return Err(format!("error line {doc:?}, expected {expected:?}")),
    }
    let reencoded = match want {
        Want::Client(f) | Want::ClientLenient(_, f) => {
            let got = ClientFrame::decode(&bytes).map_err(|e| format!("decode: {e}"))?;
            if &got != f {
                return Err(format!("decodes to {got:?}, expected {f:?}"));
            }
            got.encode()
        }
        Want::Server(f) | Want::ServerLenient(_, f) => {
            let got = ServerFrame::decode(&bytes, PayloadLimits::default())
                .map_err(|e| format!("decode: {e}"))?;
            if &got != f {
                return Err(format!("decodes to {got:?}, expected {f:?}"));
            }
            got.encode()
        }
        _ => unreachable!("invalid vectors returned above"),
    };
    let canonical = match (&v.encodes_to, want.encodes_to()) {
        (None, None) => bytes,
        (Some(doc), Some(expected)) => {
            let doc = unhex(doc)?;
            if doc != expected {
                return Err(format!(
                    "encodes-to is {}, expected {}",
                    hex(&doc),
                    hex(&expected)
                ));
            }
            doc
        }
        (doc, _) => return Err(format!("encodes-to line {doc:?} where none or one is due")),
    };
    if reencoded[..] != canonical[..] {
        return Err(format!(
            "re-encodes to {}, expected {}",
            hex(&reencoded),
            hex(&canonical)
        ));
    }
    Ok(())
}

/// The key table (§3.1): number, name, CBOR type.
const KEYS: &[(u64, &str, &str)] = &[
    (key::TYPE, "type", "uint"),
    (key::ID, "id", "uint"),
    (key::ROOM, "room", "text"),
    (key::EVENT, "event", "text"),
    (key::DATA, "data", "bytes"),
    (key::SEQ, "seq", "uint"),
    (key::ACK, "ack", "bool"),
    (key::CODE, "code", "uint"),
    (key::MESSAGE, "message", "text"),
    (key::RECONNECT, "reconnect", "bool"),
    (key::VERSION, "version", "uint"),
    (key::SESSION, "session", "text"),
    (key::TIME, "time", "uint"),
    (key::MAX_FRAME, "max_frame", "uint"),
    (key::PING_INTERVAL, "ping_interval", "uint"),
    (key::TOKEN, "token", "text"),
    (key::IDLE_TIMEOUT, "idle_timeout", "uint"),
    (key::RETRY_AFTER, "retry_after", "uint"),
    (key::EPOCH, "epoch", "uint"),
    (key::RECOVERED, "recovered", "bool"),
    (key::KEY, "key", "text"),
    (key::CONFLATED, "conflated", "bool"),
];

fn check_keys(doc: &str) -> Vec<String> {
    let expected = KEYS;
    let rows = match table(doc, "| key | name | type |") {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let got: Vec<(u64, &str, &str)> = rows
        .iter()
        .filter_map(|r| Some((r[0].parse().ok()?, r.get(1)?.as_str(), r.get(2)?.as_str())))
        .collect();
    if got != expected {
        return vec![format!("key table is {got:?}, expected {expected:?}")];
    }
    Vec::new()
}

fn check_kinds(doc: &str) -> Vec<String> {
    let expected: &[(u64, &str, &str)] = &[
        (kind::HELLO, "Hello", "client"),
        (kind::SUBSCRIBE, "Subscribe", "client"),
        (kind::UNSUBSCRIBE, "Unsubscribe", "client"),
        (kind::PUBLISH, "Publish", "client"),
        (kind::PING, "Ping", "client"),
        (kind::REFRESH, "Refresh", "client"),
        (kind::WELCOME, "Welcome", "broker"),
        (kind::SUBSCRIBED, "Subscribed", "broker"),
        (kind::UNSUBSCRIBED, "Unsubscribed", "broker"),
        (kind::EVENT, "Event", "broker"),
        (kind::ACK, "Ack", "broker"),
        (kind::ERROR, "Error", "broker"),
        (kind::PONG, "Pong", "broker"),
        (kind::CLOSE, "Close", "broker"),
        (kind::CONFLATION, "Conflation", "broker"),
    ];
    let rows = match table(doc, "| type | frame | sent by |") {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let got: Vec<(u64, &str, &str)> = rows
        .iter()
        .filter_map(|r| Some((r[0].parse().ok()?, r.get(1)?.as_str(), r.get(2)?.as_str())))
        .collect();
    if got != expected {
        return vec![format!(
            "frame type table is {got:?}, expected {expected:?}"
        )];
    }
    rows.iter().flat_map(|r| check_kind_keys(r)).collect()
}

/// A well-typed, valid value for a key, other than the default any optional key takes.
fn sample(key: u64) -> Value {
    let (_, name, kind) = KEYS.iter().find(|(k, ..)| *k == key).expect("known key");
    match (*name, *kind) {
        ("room", _) => t("a:b"),
        ("event", _) => t("e"),
        ("code", _) => u(Code::Normal.value().into()),
        (_, "uint") => u(1),
        (_, "text") => t("t"),
        (_, "bytes") => b(&[0x00]),
        (_, "bool") => Value::Bool(true),
        other => panic!("no sample for {other:?}"),
    }
}

/// Decodes a frame map in the direction of its type, as a comparable string.
fn decode_as(sender: &str, entries: &[(u64, Value)]) -> Result<String, String> {
    let bytes = cbor(&m(entries
        .iter()
        .map(|(k, v)| (u(*k), v.clone()))
        .collect()));
    if sender == "client" {
        ClientFrame::decode(&bytes).map(|f| format!("{f:?}"))
    } else {
        ServerFrame::decode(&bytes, PayloadLimits::default()).map(|f| format!("{f:?}"))
    }
    .map_err(|e| render(&e))
}

/// The keys the reference encoder writes for the frame a map decodes to.
fn encoded_keys(sender: &str, entries: &[(u64, Value)]) -> BTreeSet<u64> {
    let bytes = cbor(&m(entries
        .iter()
        .map(|(k, v)| (u(*k), v.clone()))
        .collect()));
    let encoded = if sender == "client" {
        ClientFrame::decode(&bytes).map(|f| f.encode())
    } else {
        ServerFrame::decode(&bytes, PayloadLimits::default()).map(|f| f.encode())
    };
    let Ok(encoded) = encoded else {
        return BTreeSet::new();
    };
    match ciborium::from_reader::<Value, _>(&encoded[..]) {
        Ok(Value::Map(entries)) => entries
            .iter()
            .filter_map(|(k, _)| k.as_integer().and_then(|k| u64::try_from(k).ok()))
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// Checks the required and optional key columns of one frame type row against the decoder
/// and the encoder: the required keys suffice and each one is needed; every optional key is
/// read, takes the stated value when absent and is the only other key the encoder writes.
fn check_kind_keys(row: &[String]) -> Vec<String> {
    let [number, name, sender, required, optional, ..] = row else {
        return vec![format!("short frame type row {row:?}")];
    };
    let Ok(number) = number.parse::<u64>() else {
        return vec![format!("bad frame type {number:?}")];
    };
    let sender = if sender == "client" {
        "client"
    } else {
        "server"
    };
    let key_of = |field: &str| KEYS.iter().find(|(_, n, _)| *n == field).map(|(k, ..)| *k);
    let list = |cell: &str| -> Vec<String> {
        if cell == "–" || cell == "-" {
            Vec::new()
        } else {
            cell.split(',').map(|x| x.trim().to_string()).collect()
        }
    };
    let mut problems = Vec::new();
    let mut required_keys = Vec::new();
    for field in list(required) {
        match key_of(&field) {
            Some(k) => required_keys.push((field, k)),
            None => problems.push(format!(
                "{name}: required key {field:?} is not in the key table"
            )),
        }
    }
    let mut optional_keys = Vec::new();
    for item in list(optional) {
        let Some((field, default)) = item.strip_suffix(')').and_then(|x| x.split_once(" (")) else {
            problems.push(format!(
                "{name}: optional key {item:?} is not \"name (default)\""
            ));
            continue;
        };
        let default = match default {
            "none" => None,
            "0" => Some(u(0)),
            "false" => Some(Value::Bool(false)),
            "\"\"" => Some(t("")),
            other => {
                problems.push(format!("{name}: default {other:?} of {field}"));
                continue;
            }
        };
        match key_of(field) {
            Some(k) => optional_keys.push((field.to_string(), k, default)),
            None => problems.push(format!(
                "{name}: optional key {field:?} is not in the key table"
            )),
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let base: Vec<(u64, Value)> = [(key::TYPE, u(number))]
        .into_iter()
        .chain(required_keys.iter().map(|(_, k)| (*k, sample(*k))))
        .collect();
    let minimal = match decode_as(sender, &base) {
        Ok(f) => f,
        Err(e) => {
            return vec![format!(
                "{name}: the required keys alone do not decode: {e}"
            )];
        }
    };
    for (field, k) in &required_keys {
        let without: Vec<_> = base.iter().filter(|(x, _)| x != k).cloned().collect();
        let expected = format!("MissingField frame={name} field={field}");
        if decode_as(sender, &without) != Err(expected.clone()) {
            problems.push(format!("{name}: without {field}: expected {expected}"));
        }
    }
    let full: Vec<(u64, Value)> = base
        .iter()
        .cloned()
        .chain(optional_keys.iter().map(|(_, k, _)| (*k, sample(*k))))
        .collect();
    let Ok(full_frame) = decode_as(sender, &full) else {
        return vec![format!(
            "{name}: the required and optional keys together do not decode"
        )];
    };
    let allowed: BTreeSet<u64> = full.iter().map(|(k, _)| *k).collect();
    let written = encoded_keys(sender, &full);
    if !written.is_subset(&allowed) || !base.iter().all(|(k, _)| written.contains(k)) {
        problems.push(format!(
            "{name}: the encoder writes keys {written:?}, the table allows {allowed:?}"
        ));
    }
    // Every other known key is ignored by this frame type (§3.2).
    for (k, field, _) in KEYS {
        if allowed.contains(k) {
            continue;
        }
        let with: Vec<_> = full.iter().cloned().chain([(*k, sample(*k))]).collect();
        if decode_as(sender, &with).as_ref() != Ok(&full_frame) {
            problems.push(format!(
                "{name}: reads {field}, which the table does not list"
            ));
        }
    }
    for (field, k, default) in &optional_keys {
        // Read: leaving the key out changes the frame (or, for a key that only comes with
        // another one, is refused as that one's absence).
        let without: Vec<_> = full.iter().filter(|(x, _)| x != k).cloned().collect();
        match decode_as(sender, &without) {
            Ok(f) if f != full_frame => {}
            Err(e)
                if optional_keys.len() > 1
                    && e == format!("MissingField frame={name} field={field}") => {}
            other => problems.push(format!("{name}: optional {field} is not read ({other:?})")),
        }
        // The stated default: writing it changes nothing. "none": absence is no value, so
        // even the zero value of the key's type makes another frame.
        match default {
            Some(default) => {
                let with: Vec<_> = base
                    .iter()
                    .cloned()
                    .chain([(*k, default.clone())])
                    .collect();
                if decode_as(sender, &with).as_ref() != Ok(&minimal) {
                    problems.push(format!("{name}: {field} absent is not {default:?}"));
                }
            }
            None => {
                let zero = match sample(*k) {
                    Value::Integer(_) => u(0),
                    Value::Text(_) => t(""),
                    Value::Bool(_) => Value::Bool(false),
                    _ => b(&[]),
                };
                let with: Vec<_> = base.iter().cloned().chain([(*k, zero.clone())]).collect();
                if decode_as(sender, &with).as_ref() == Ok(&minimal) {
                    problems.push(format!("{name}: {field} absent is {zero:?}, not none"));
                }
            }
        }
    }
    problems
}

fn check_codes(doc: &str) -> Vec<String> {
    let rows = match table(doc, "| code | name | sent in |") {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for r in &rows {
        let [value, name, frame, retry, ws, ..] = &r[..] else {
            problems.push(format!("short code row {r:?}"));
            continue;
        };
        let Some(code) = value.parse().ok().and_then(Code::from_value) else {
            problems.push(format!("code {value:?} is not in the code table"));
            continue;
        };
        listed.insert(code.value());
        let expected = [
            code.as_str().to_string(),
            if code.is_close() { "Close" } else { "Error" }.to_string(),
            if code.should_retry() { "yes" } else { "no" }.to_string(),
            if code.is_close() {
                code.ws_close_code().to_string()
            } else {
                "-".into()
            },
        ];
        if [name, frame, retry, ws] != [&expected[0], &expected[1], &expected[2], &expected[3]] {
            problems.push(format!("code row {r:?}, expected {expected:?}"));
        }
    }
    for code in Code::ALL {
        if !listed.contains(&code.value()) {
            problems.push(format!("code {} missing from the code table", code.value()));
        }
    }
    problems
}

fn check_defaults(doc: &str) -> Vec<String> {
    let c = SessionConfig::default();
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let expected: &[(&str, u64)] = &[
        ("version", PROTOCOL_VERSION),
        ("max_frame", c.max_frame_size as u64),
        ("ping_interval", ms(c.ping_interval)),
        ("idle_timeout", ms(c.idle_timeout)),
        ("hello_timeout", ms(c.hello_timeout)),
        ("max_subscriptions", c.max_subscriptions as u64),
        ("max_depth", c.payload.max_depth as u64),
        ("max_room", roomcast_protocol::name::MAX_ROOM_LEN as u64),
        (
            "max_namespace",
            roomcast_protocol::name::MAX_NAMESPACE_LEN as u64,
        ),
        ("max_event", roomcast_protocol::name::MAX_EVENT_LEN as u64),
        ("max_key", MAX_IDEMPOTENCY_KEY_LEN as u64),
    ];
    let rows = match table(doc, "| setting | value |") {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let got: Result<Vec<(&str, u64)>, String> = rows
        .iter()
        .map(|r| Ok((r[0].as_str(), leading_u64(r.get(1).ok_or("short row")?)?)))
        .collect();
    match got {
        Ok(got) if got == expected => Vec::new(),
        Ok(got) => vec![format!("limits table is {got:?}, expected {expected:?}")],
        Err(e) => vec![e],
    }
}

fn check_names(doc: &str) -> Vec<String> {
    let rows = match table(doc, "| name | as | result |") {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    if rows.len() < 10 {
        return vec![format!("only {} name examples", rows.len())];
    }
    let mut problems = Vec::new();
    for r in &rows {
        let [name, as_, result, ..] = &r[..] else {
            problems.push(format!("short name row {r:?}"));
            continue;
        };
        let name = if name == "(empty)" { "" } else { name.as_str() };
        let got = match as_.as_str() {
            "room" => RoomName::new(name).map(|_| ()),
            "event" => EventName::new(name).map(|_| ()),
            other => {
                problems.push(format!("name row kind {other:?}"));
                continue;
            }
        };
        let got = match got {
            Ok(()) => "valid".to_string(),
            Err(e) => format!("{e:?}"),
        };
        if &got != result {
            problems.push(format!(
                "{as_} name {name:?}: document says {result}, code says {got}"
            ));
        }
    }
    problems
}

/// Header sizes of CBOR: the head of an item whose argument is `n`.
fn head(n: u64) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// The formula written in the document: map header, five one-byte keys and the one-byte type
/// value (7 bytes), the heads of room, event and data, and the seq integer.
fn formula(room: usize, event: usize, data: usize, seq: u64) -> usize {
    7 + head(room as u64) + head(event as u64) + head(data as u64) + head(seq)
}

fn overhead(r: &RoomName, e: &EventName, p: &Payload, seq: u64) -> (usize, usize) {
    let frame = encode_event(r, e, p, seq, None);
    (
        frame.len(),
        frame.len() - r.as_str().len() - e.as_str().len() - p.len(),
    )
}

/// The 100-byte payload of the overhead table: a byte string of 98 bytes.
fn payload_100() -> Payload {
    let p = Payload::encode(&Value::Bytes(vec![0; 98])).expect("payload");
    assert_eq!(p.len(), 100);
    p
}

fn check_overhead(doc: &str) -> Vec<String> {
    let rows = match table(doc, "| seq | Event frame") {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    if rows.len() < 4 {
        return vec!["overhead table has fewer than 4 rows".into()];
    }
    let (r, e, p) = (room("orders:1042"), event("status"), payload_100());
    let mut problems = Vec::new();
    for row in &rows {
        let parsed: Result<Vec<u64>, String> = row.iter().take(3).map(|c| leading_u64(c)).collect();
        let (seq, frame, over) = match parsed.as_deref() {
            Ok(&[seq, frame, over]) => (seq, frame, over),
            _ => {
                problems.push(format!("bad overhead row {row:?}"));
                continue;
            }
        };
        let got = overhead(&r, &e, &p, seq);
        if (frame as usize, over as usize) != got {
            problems.push(format!(
                "seq {seq}: document says {frame}/{over}, code gives {got:?}"
            ));
        }
    }
    problems
}

fn check_document(doc: &str) -> Vec<String> {
    [
        check_vectors(doc),
        check_keys(doc),
        check_kinds(doc),
        check_codes(doc),
        check_defaults(doc),
        check_names(doc),
        check_overhead(doc),
    ]
    .concat()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn document_matches_code() {
    let problems = check_document(&read_doc());
    assert!(
        problems.is_empty(),
        "docs/PROTOCOL.md disagrees with the code:\n{}",
        problems.join("\n")
    );
}

/// The checker itself must catch drift: each edit of the document below must be reported.
#[test]
fn checker_detects_drift() {
    let doc = read_doc();
    let found = doc_vectors(&doc).expect("vectors");
    let first = found
        .iter()
        .find(|v| v.name == "subscribe")
        .expect("subscribe vector");
    let block = format!(
        "name: {}\ndir: {}\nhex: {}\n",
        first.name, first.dir, first.hex
    );
    assert!(
        doc.contains(&block),
        "vector block layout changed; update this test"
    );
    let edits: Vec<(&str, String)> = vec![
        ("drop a vector", doc.replacen(&block, "", 1)),
        (
            "rename a vector",
            doc.replacen("name: subscribe\n", "name: subscribe-x\n", 1),
        ),
        (
            "change a byte",
            doc.replacen(
                &format!("hex: {}", first.hex),
                &format!("hex: {}00", first.hex),
                1,
            ),
        ),
        (
            "change a diag",
            doc.replacen("diag: {0: 2, 1: 1,", "diag: {0: 2, 1: 2,", 1),
        ),
        (
            "change an error",
            doc.replacen("error: TrailingBytes", "error: Malformed", 1),
        ),
        (
            "change a code row",
            doc.replacen(
                "| 4429 | slow_consumer | Close | yes |",
                "| 4429 | slow_consumer | Close | no |",
                1,
            ),
        ),
        (
            "change a key row",
            doc.replacen("| 5 | seq | uint |", "| 5 | seq | text |", 1),
        ),
        (
            "change a required key",
            doc.replacen(
                "| Subscribed | broker | id, room, seq, epoch | recovered (none) |",
                "| Subscribed | broker | id, room, seq | epoch (none), recovered (none) |",
                1,
            ),
        ),
        (
            "change an optional key's default",
            doc.replacen("reconnect (false)", "reconnect (none)", 1),
        ),
        (
            "drop an optional key",
            doc.replacen("ack (false), key (none)", "ack (false)", 1),
        ),
        (
            "change a limit",
            doc.replacen("| idle_timeout | 60000", "| idle_timeout | 6000", 1),
        ),
        (
            "change a name verdict",
            doc.replacen(
                "| `Orders:1` | room | BadNamespace |",
                "| `Orders:1` | room | valid |",
                1,
            ),
        ),
        (
            "change an overhead",
            doc.replacen("| 1000 | 131 | 14 |", "| 1000 | 131 | 13 |", 1),
        ),
    ];
    for (what, edited) in edits {
        assert_ne!(edited, doc, "edit {what:?} did not apply; update this test");
        assert!(
            !check_document(&edited).is_empty(),
            "checker missed: {what}"
        );
    }
}

/// The vector list covers every frame type and every optional-field variant.
#[test]
fn vectors_cover_every_frame_variant() {
    let mut labels = BTreeSet::new();
    for (_, want) in vectors() {
        let label = match want {
            Want::Client(f) => match f {
                ClientFrame::Hello { token, .. } => format!("Hello token={}", token.is_some()),
                ClientFrame::Subscribe { since, .. } => {
                    format!("Subscribe since={}", since.is_some())
                }
                ClientFrame::Unsubscribe { .. } => "Unsubscribe".into(),
                ClientFrame::Publish { ack, key, .. } => {
                    format!("Publish ack={ack} key={}", key.is_some())
                }
                ClientFrame::Ping { id } => format!("Ping id={}", id.is_some()),
                ClientFrame::Refresh { .. } => "Refresh".into(),
            },
            Want::Server(f) => match f {
                ServerFrame::Welcome(_) => "Welcome".into(),
                ServerFrame::Subscribed {
                    epoch, recovered, ..
                } => format!("Subscribed epoch0={} recovered={recovered:?}", epoch == 0),
                ServerFrame::Unsubscribed { .. } => "Unsubscribed".into(),
                ServerFrame::Event(e) => format!("Event epoch={}", e.epoch.is_some()),
                ServerFrame::Ack { seq, .. } => format!("Ack seq={}", seq.is_some()),
                ServerFrame::Error { id, .. } => format!("Error id={}", id.is_some()),
                ServerFrame::Pong { id } => format!("Pong id={}", id.is_some()),
                ServerFrame::Close {
                    reconnect,
                    retry_after_ms,
                    ..
                } => format!(
                    "Close reconnect={reconnect} retry_after={}",
                    retry_after_ms.is_some()
                ),
                ServerFrame::Conflation { active, .. } => format!("Conflation active={active}"),
            },
            Want::ClientInvalid(_, e) => format!("invalid client {e}"),
            Want::ServerInvalid(_, e) => format!("invalid server {e}"),
            _ => continue,
        };
        labels.insert(label);
    }
    for needed in [
        "Hello token=false",
        "Hello token=true",
        "Subscribe since=false",
        "Subscribe since=true",
        "Unsubscribe",
        "Publish ack=false key=false",
        "Publish ack=true key=false",
        "Publish ack=true key=true",
        "Ping id=false",
        "Ping id=true",
        "Refresh",
        "Welcome",
        "Subscribed epoch0=false recovered=None",
        "Subscribed epoch0=true recovered=None",
        "Subscribed epoch0=false recovered=Some(true)",
        "Subscribed epoch0=false recovered=Some(false)",
        "Unsubscribed",
        "Event epoch=false",
        "Event epoch=true",
        "Ack seq=false",
        "Ack seq=true",
        "Error id=false",
        "Error id=true",
        "Pong id=false",
        "Pong id=true",
        "Close reconnect=false retry_after=false",
        "Close reconnect=true retry_after=false",
        "Close reconnect=true retry_after=true",
        "Conflation active=true",
        "Conflation active=false",
    ] {
        assert!(labels.contains(needed), "no vector for {needed}");
    }
    // Refused input: every DecodeError variant, and each "both or neither" / required-key rule
    // of the recovery fields.
    for variant in [
        "Malformed",
        "DuplicateKey",
        "TrailingBytes",
        "MissingField",
        "UnknownType",
        "InvalidValue",
    ] {
        assert!(
            labels
                .iter()
                .any(|l| l.starts_with("invalid ") && l.split(' ').nth(2) == Some(variant)),
            "no invalid vector for {variant}"
        );
    }
    for needed in [
        "invalid client MissingField frame=Subscribe field=epoch",
        "invalid server MissingField frame=Subscribed field=epoch",
    ] {
        assert!(labels.contains(needed), "no vector for {needed}");
    }
}

/// The overhead formula of the document holds over the boundaries of every head size.
#[test]
fn overhead_formula_holds() {
    let payloads: Vec<Payload> = [0usize, 22, 23, 98, 255, 256, 1000]
        .iter()
        .map(|&n| Payload::encode(&Value::Bytes(vec![7; n])).expect("payload"))
        .chain([Payload::encode(&0u8).expect("payload")])
        .collect();
    for room_len in [3usize, 23, 24, 128] {
        let r = room(&format!("n:{}", "r".repeat(room_len - 2)));
        for event_len in [1usize, 23, 24, 64] {
            let e = event(&"e".repeat(event_len));
            for p in &payloads {
                for seq in [
                    0,
                    23,
                    24,
                    255,
                    256,
                    65_535,
                    65_536,
                    u32::MAX as u64,
                    1 << 32,
                    u64::MAX,
                ] {
                    let (_, got) = overhead(&r, &e, p, seq);
                    assert_eq!(
                        got,
                        formula(room_len, event_len, p.len(), seq),
                        "{r} {e} {p:?} {seq}"
                    );
                }
            }
        }
    }
    // The ~16-byte budget: short names, a 100-byte payload, any seq below 2^32.
    let (r, e, p) = (room("orders:1042"), event("status"), payload_100());
    assert_eq!(overhead(&r, &e, &p, 65_535).1, 14);
    assert_eq!(overhead(&r, &e, &p, u32::MAX as u64).1, 16);
}

/// Renders every vector block in the document's format (and prints them when
/// `ROOMCAST_PRINT_VECTORS` is set, to regenerate the document after a deliberate change).
#[test]
fn print_vectors() {
    let print = std::env::var_os("ROOMCAST_PRINT_VECTORS").is_some();
    if !print {
        // Rendering must work for every vector, printed or not.
        for (_, want) in vectors() {
            let input = want.input();
            assert!(!grouped_hex(&input).is_empty());
            diag(&input).expect("every vector has a diagnostic form");
        }
        return;
    }
    for (name, want) in vectors() {
        let input = want.input();
        println!("```vector\nname: {name}\ndir: {}", want.dir());
        println!("hex: {}", grouped_hex(&input));
        println!("diag: {}", diag(&input).expect("diag"));
        if let Some(canonical) = want.encodes_to() {
            println!("encodes-to: {}", grouped_hex(&canonical));
        }
        if let Some(e) = want.error() {
            println!("error: {e}");
        }
        println!("```\n");
    }
    let (r, e, p) = (room("orders:1042"), event("status"), payload_100());
    for seq in [5, 200, 1000, 70_000, 1 << 32] {
        println!("overhead seq {seq}: {:?}", overhead(&r, &e, &p, seq));
    }
}
