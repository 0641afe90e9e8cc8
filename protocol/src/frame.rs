//! Frames and their CBOR codec.
//!
//! A frame is one CBOR map with small unsigned-integer keys ([`key`]); key 0 holds the frame
//! type ([`kind`]). Encoding writes definite-length maps with the keys in ascending order and
//! shortest-form integers, so equal frames encode to equal bytes. Decoding accepts keys in any
//! order, ignores unknown keys (forward compatibility) and refuses duplicate keys.
//!
//! `data` travels as a CBOR byte string that holds the payload's own CBOR encoding (embedded
//! CBOR, as in RFC 8949 §3.4.5.1 without the tag). The codec moves those bytes and nothing
//! more; [`crate::payload`] owns checking them.
//!
//! Decoding of client frames keeps names as raw strings so the session can answer a bad name
//! with an `Error` carrying the request id; server frames carry validated types.

use bytes::Bytes;
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, IgnoredAny, MapAccess, Visitor},
    ser::SerializeMap,
};

use crate::{
    code::Code,
    name::{EventName, RoomName},
    payload::{Payload, PayloadLimits},
};

/// Map keys. One table for every frame type; see docs/PROTOCOL.md.
pub mod key {
    /// Frame type (uint, see [`super::kind`]).
    pub const TYPE: u64 = 0;
    /// Request id chosen by the client (uint).
    pub const ID: u64 = 1;
    /// Room name (text).
    pub const ROOM: u64 = 2;
    /// Event name (text).
    pub const EVENT: u64 = 3;
    /// Event payload: a byte string holding one encoded CBOR item.
    pub const DATA: u64 = 4;
    /// Per-room sequence number (uint).
    pub const SEQ: u64 = 5;
    /// Publish: does the client want an `Ack` (bool).
    pub const ACK: u64 = 6;
    /// Error or close code (uint).
    pub const CODE: u64 = 7;
    /// Human-readable message or close reason (text).
    pub const MESSAGE: u64 = 8;
    /// Close: should the client reconnect (bool).
    pub const RECONNECT: u64 = 9;
    /// Protocol version (uint).
    pub const VERSION: u64 = 10;
    /// Session id (text).
    pub const SESSION: u64 = 11;
    /// Broker wall-clock time, milliseconds since the Unix epoch (uint).
    pub const TIME: u64 = 12;
    /// Largest frame the broker accepts, in bytes (uint).
    pub const MAX_FRAME: u64 = 13;
    /// How often the client should send `Ping` when otherwise idle, in milliseconds (uint).
    pub const PING_INTERVAL: u64 = 14;
    /// Authentication token (text).
    pub const TOKEN: u64 = 15;
    /// Silence after which the broker closes the session, in milliseconds (uint).
    pub const IDLE_TIMEOUT: u64 = 16;
    /// `Error`: milliseconds after which the same request may succeed; `Close`: milliseconds
    /// to wait before reconnecting (uint).
    pub const RETRY_AFTER: u64 = 17;
    /// History epoch of a room: changes whenever the continuity of its `seq` is lost (uint).
    pub const EPOCH: u64 = 18;
    /// `Subscribed`: whether the position in `Subscribe` was recovered (bool).
    pub const RECOVERED: u64 = 19;
    /// `Publish`: idempotency key, 1–64 bytes of text.
    pub const KEY: u64 = 20;
    /// `Conflation`: whether the subscriber's events of the room are being conflated (bool).
    pub const CONFLATED: u64 = 21;
}

/// Frame type values (key 0). Client frames take 1–15, broker frames 16–31; the values in
/// use (1–6, 16–24) each encode in one byte, except 24 (`Conflation`), which takes two.
pub mod kind {
    /// Client: open the session.
    pub const HELLO: u64 = 1;
    /// Client: join a room.
    pub const SUBSCRIBE: u64 = 2;
    /// Client: leave a room.
    pub const UNSUBSCRIBE: u64 = 3;
    /// Client: publish an event to a room.
    pub const PUBLISH: u64 = 4;
    /// Client: keepalive / round-trip probe.
    pub const PING: u64 = 5;
    /// Client: replace the session's token with a fresh one.
    pub const REFRESH: u64 = 6;
    /// Broker: session accepted.
    pub const WELCOME: u64 = 16;
    /// Broker: subscription confirmed.
    pub const SUBSCRIBED: u64 = 17;
    /// Broker: unsubscription confirmed.
    pub const UNSUBSCRIBED: u64 = 18;
    /// Broker: an event in a subscribed room.
    pub const EVENT: u64 = 19;
    /// Broker: publish accepted.
    pub const ACK: u64 = 20;
    /// Broker: a request failed; the session goes on.
    pub const ERROR: u64 = 21;
    /// Broker: answer to `Ping`.
    pub const PONG: u64 = 22;
    /// Broker: the session ends.
    pub const CLOSE: u64 = 23;
    /// Broker: a room's events to this subscriber are (no longer) being conflated.
    pub const CONFLATION: u64 = 24;
}

/// Longest idempotency key a `Publish` may carry, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;

/// A place in a room's event stream: the event with `seq` in history `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Identifies one continuous numbering of the room's events.
    pub epoch: u64,
    /// Sequence number of the last event seen (0: none yet).
    pub seq: u64,
}

/// A frame sent by a client. Names are raw strings here: the session validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Opens the session; must be the first frame.
    Hello {
        /// Highest protocol version the client speaks.
        version: u64,
        /// Authentication token, if any.
        token: Option<String>,
    },
    /// Joins a room.
    Subscribe {
        /// Request id echoed in the reply.
        id: u64,
        /// Room name (unvalidated).
        room: String,
        /// Last position the client saw: replay what came after it (recovery).
        since: Option<Position>,
    },
    /// Leaves a room.
    Unsubscribe {
        /// Request id echoed in the reply.
        id: u64,
        /// Room name (unvalidated).
        room: String,
    },
    /// Publishes one event.
    Publish {
        /// Request id echoed in `Ack` or `Error` (0 when absent on the wire).
        id: u64,
        /// Room name (unvalidated).
        room: String,
        /// Event name (unvalidated).
        event: String,
        /// Payload bytes (unvalidated).
        data: Bytes,
        /// Whether the client wants an `Ack`.
        ack: bool,
        /// Idempotency key: a retry with the same key is not delivered twice (unvalidated).
        key: Option<String>,
    },
    /// Keepalive; answered by `Pong` with the same id.
    Ping {
        /// Optional id echoed in `Pong`.
        id: Option<u64>,
    },
    /// Replaces the session's token before it expires; answered by `Ack` with the same id.
    Refresh {
        /// Request id echoed in `Ack`.
        id: u64,
        /// The new token (same user).
        token: String,
    },
}

/// The broker's part of the first exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Agreed protocol version.
    pub version: u64,
    /// Session id assigned by the broker.
    pub session_id: String,
    /// Broker wall-clock time, ms since the Unix epoch.
    pub server_time_ms: u64,
    /// Largest frame the broker accepts, bytes.
    pub max_frame_size: u64,
    /// How often the client should ping when idle, ms.
    pub ping_interval_ms: u64,
    /// Silence after which the broker closes the session, ms.
    pub idle_timeout_ms: u64,
}

/// An event delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Room the event was published to.
    pub room: RoomName,
    /// Event name.
    pub event: EventName,
    /// Payload: one CBOR item.
    pub data: Payload,
    /// Per-room sequence number assigned by the broker.
    pub seq: u64,
    /// History epoch of `seq`, for rooms that keep history.
    pub epoch: Option<u64>,
}

/// A frame sent by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Session accepted.
    Welcome(Welcome),
    /// Subscription confirmed; `seq` is the position the events that follow continue from:
    /// the room's last sequence number at that moment, or the recovered `since.seq`.
    Subscribed {
        /// Id of the `Subscribe`.
        id: u64,
        /// The room.
        room: RoomName,
        /// Room position the following events continue from.
        seq: u64,
        /// The room's history epoch (0: the room keeps no history).
        epoch: u64,
        /// Present when the `Subscribe` carried `since`: whether every event after it follows.
        recovered: Option<bool>,
    },
    /// Unsubscription confirmed; no event of the room follows.
    Unsubscribed {
        /// Id of the `Unsubscribe`.
        id: u64,
        /// The room.
        room: RoomName,
    },
    /// An event.
    Event(Event),
    /// Publish accepted.
    Ack {
        /// Id of the `Publish`.
        id: u64,
        /// Sequence number given to the event, when the room had local subscribers.
        seq: Option<u64>,
    },
    /// A request failed; the session goes on.
    Error {
        /// Id of the failed request, when it had one.
        id: Option<u64>,
        /// What went wrong.
        code: Code,
        /// Human-readable detail.
        message: String,
        /// Milliseconds after which the same request may succeed (`rate_limited`).
        retry_after_ms: Option<u64>,
    },
    /// Answer to `Ping`.
    Pong {
        /// The ping's id.
        id: Option<u64>,
    },
    /// The session ends; the transport closes next.
    Close {
        /// Why.
        code: Code,
        /// Human-readable detail.
        reason: String,
        /// Should the client reconnect.
        reconnect: bool,
        /// Milliseconds to wait before reconnecting (spreads a drain's reconnects).
        retry_after_ms: Option<u64>,
    },
    /// The subscriber fell behind in a conflating room (`active: true`): until it catches up
    /// (`active: false`) it receives only the latest event per conflation key.
    Conflation {
        /// The room.
        room: RoomName,
        /// Whether conflation is now on.
        active: bool,
    },
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not CBOR, not a map with uint keys, or a value of the wrong type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A key appears twice.
    #[error("duplicate key {0}")]
    DuplicateKey(u64),
    /// Bytes follow the frame.
    #[error("trailing bytes after the frame")]
    TrailingBytes,
    /// A field the frame type requires is absent.
    #[error("{frame} frame lacks {field}")]
    MissingField {
        /// Frame type name.
        frame: &'static str,
        /// Field name.
        field: &'static str,
    },
    /// The frame type is not one this side understands.
    #[error("unknown frame type {kind}")]
    UnknownType {
        /// The type value.
        kind: u64,
        /// The frame's request id, if it had one (so an error reply can name it).
        id: Option<u64>,
    },
    /// A value is well-typed but not acceptable (bad name, unknown code, bad payload).
    #[error("invalid {field}: {reason}")]
    InvalidValue {
        /// Field name.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl ClientFrame {
    /// Encodes the frame as CBOR.
    pub fn encode(&self) -> Bytes {
        encode(self)
    }

    /// Decodes one client frame from exactly `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let f = Fields::decode(bytes)?;
        Ok(match f.kind {
            kind::HELLO => ClientFrame::Hello {
                version: f.version.ok_or(missing("Hello", "version"))?,
                token: f.token,
            },
            kind::SUBSCRIBE => ClientFrame::Subscribe {
                id: f.id.ok_or(missing("Subscribe", "id"))?,
                since: match (f.epoch, f.seq) {
                    (Some(epoch), Some(seq)) => Some(Position { epoch, seq }),
                    (None, None) => None,
                    (None, Some(_)) => return Err(missing("Subscribe", "epoch")),
                    (Some(_), None) => return Err(missing("Subscribe", "seq")),
                },
                room: f.room.ok_or(missing("Subscribe", "room"))?,
            },
            kind::UNSUBSCRIBE => ClientFrame::Unsubscribe {
                id: f.id.ok_or(missing("Unsubscribe", "id"))?,
                room: f.room.ok_or(missing("Unsubscribe", "room"))?,
            },
            kind::PUBLISH => ClientFrame::Publish {
                id: f.id.unwrap_or(0),
                room: f.room.ok_or(missing("Publish", "room"))?,
                event: f.event.ok_or(missing("Publish", "event"))?,
                data: f.data.ok_or(missing("Publish", "data"))?,
                ack: f.ack.unwrap_or(false),
                key: f.key,
            },
            kind::PING => ClientFrame::Ping { id: f.id },
            kind::REFRESH => ClientFrame::Refresh {
                id: f.id.ok_or(missing("Refresh", "id"))?,
                token: f.token.ok_or(missing("Refresh", "token"))?,
            },
            other => {
                return Err(DecodeError::UnknownType {
                    kind: other,
                    id: f.id,
                });
            }
        })
    }
}

impl ServerFrame {
    /// Encodes the frame as CBOR.
    pub fn encode(&self) -> Bytes {
        encode(self)
    }

    /// Decodes one broker frame from exactly `bytes`, validating names and payload.
    pub fn decode(bytes: &[u8], limits: PayloadLimits) -> Result<Self, DecodeError> {
        let f = Fields::decode(bytes)?;
        let room = |frame| -> Result<RoomName, DecodeError> {
            let raw = f.room.as_deref().ok_or(missing(frame, "room"))?;
            RoomName::new(raw).map_err(|e| invalid("room", e))
        };
        let code = |frame| -> Result<Code, DecodeError> {
            let raw = f.code.ok_or(missing(frame, "code"))?;
            Code::from_value(raw).ok_or_else(|| invalid("code", format!("unknown code {raw}")))
        };
        Ok(match f.kind {
            kind::WELCOME => ServerFrame::Welcome(Welcome {
                version: f.version.ok_or(missing("Welcome", "version"))?,
                session_id: f.session.clone().ok_or(missing("Welcome", "session"))?,
                server_time_ms: f.time.ok_or(missing("Welcome", "time"))?,
                max_frame_size: f.max_frame.ok_or(missing("Welcome", "max_frame"))?,
                ping_interval_ms: f.ping_interval.ok_or(missing("Welcome", "ping_interval"))?,
                idle_timeout_ms: f.idle_timeout.ok_or(missing("Welcome", "idle_timeout"))?,
            }),
            kind::SUBSCRIBED => ServerFrame::Subscribed {
                id: f.id.ok_or(missing("Subscribed", "id"))?,
                room: room("Subscribed")?,
                seq: f.seq.ok_or(missing("Subscribed", "seq"))?,
                epoch: f.epoch.ok_or(missing("Subscribed", "epoch"))?,
                recovered: f.recovered,
            },
            kind::UNSUBSCRIBED => ServerFrame::Unsubscribed {
                id: f.id.ok_or(missing("Unsubscribed", "id"))?,
                room: room("Unsubscribed")?,
            },
            kind::EVENT => {
                let event = f.event.as_deref().ok_or(missing("Event", "event"))?;
                let data = f.data.clone().ok_or(missing("Event", "data"))?;
                ServerFrame::Event(Event {
                    room: room("Event")?,
                    event: EventName::new(event).map_err(|e| invalid("event", e))?,
                    data: Payload::new(data, limits).map_err(|e| invalid("data", e))?,
                    seq: f.seq.ok_or(missing("Event", "seq"))?,
                    epoch: f.epoch,
                })
            }
            kind::ACK => ServerFrame::Ack {
                id: f.id.ok_or(missing("Ack", "id"))?,
                seq: f.seq,
            },
            kind::ERROR => ServerFrame::Error {
                id: f.id,
                code: code("Error")?,
                message: f.message.clone().unwrap_or_default(),
                retry_after_ms: f.retry_after,
            },
            kind::PONG => ServerFrame::Pong { id: f.id },
            kind::CLOSE => ServerFrame::Close {
                code: code("Close")?,
                reason: f.message.clone().unwrap_or_default(),
                reconnect: f.reconnect.unwrap_or(false),
                retry_after_ms: f.retry_after,
            },
            kind::CONFLATION => ServerFrame::Conflation {
                room: room("Conflation")?,
                active: f.conflated.ok_or(missing("Conflation", "conflated"))?,
            },
            other => {
                return Err(DecodeError::UnknownType {
                    kind: other,
                    id: f.id,
                });
            }
        })
    }
}

/// Encodes an `Event` frame straight from borrowed parts: the fan-out path calls this once per
/// publish and shares the result with every subscriber.
pub fn encode_event(
    room: &RoomName,
    event: &EventName,
    data: &Payload,
    seq: u64,
    epoch: Option<u64>,
) -> Bytes {
    let mut out = Vec::with_capacity(64 + data.len());
    write_event(&mut out, room, event, data, seq, epoch);
    Bytes::from(out)
}

/// Appends the encoding of an `Event` frame to `out`, for callers that put something in front
/// of it in the same buffer (the broker writes the WebSocket frame header there).
pub fn write_event(
    out: &mut Vec<u8>,
    room: &RoomName,
    event: &EventName,
    data: &Payload,
    seq: u64,
    epoch: Option<u64>,
) {
    encode_into(
        &EventRef {
            room,
            event,
            data,
            seq,
            epoch,
        },
        out,
    );
}

fn missing(frame: &'static str, field: &'static str) -> DecodeError {
    DecodeError::MissingField { frame, field }
}

fn invalid(field: &'static str, reason: impl ToString) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        reason: reason.to_string(),
    }
}

fn encode<T: Serialize>(frame: &T) -> Bytes {
    let mut out = Vec::with_capacity(64);
    encode_into(frame, &mut out);
    Bytes::from(out)
}

fn encode_into<T: Serialize>(frame: &T, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail and every frame type serializes without error.
    if let Err(e) = ciborium::into_writer(frame, out) {
        unreachable!("frame encoding into memory failed: {e}");
    }
}

/// A byte slice serialized as a CBOR byte string.
struct ByteString<'a>(&'a [u8]);

impl Serialize for ByteString<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Writes map entries, counting them first so the map has a definite length.
struct Entries<'a> {
    entries: Vec<(u64, Value<'a>)>,
}

enum Value<'a> {
    Uint(u64),
    Bool(bool),
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl<'a> Entries<'a> {
    fn new(kind: u64) -> Self {
        let mut entries = Vec::with_capacity(8);
        entries.push((key::TYPE, Value::Uint(kind)));
        Entries { entries }
    }
    fn uint(mut self, k: u64, v: u64) -> Self {
        self.entries.push((k, Value::Uint(v)));
        self
    }
    fn opt_uint(self, k: u64, v: Option<u64>) -> Self {
        match v {
            Some(v) => self.uint(k, v),
            None => self,
        }
    }
    fn text(mut self, k: u64, v: &'a str) -> Self {
        self.entries.push((k, Value::Text(v)));
        self
    }
    fn bool(mut self, k: u64, v: bool) -> Self {
        self.entries.push((k, Value::Bool(v)));
        self
    }
    fn bytes(mut self, k: u64, v: &'a [u8]) -> Self {
        self.entries.push((k, Value::Bytes(v)));
        self
    }
    fn write<S: Serializer>(self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            match v {
                Value::Uint(n) => map.serialize_entry(k, n)?,
                Value::Bool(b) => map.serialize_entry(k, b)?,
                Value::Text(t) => map.serialize_entry(k, t)?,
                Value::Bytes(b) => map.serialize_entry(k, &ByteString(b))?,
            }
        }
        map.end()
    }
}

impl Serialize for ClientFrame {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ClientFrame::Hello { version, token } => {
                let e = Entries::new(kind::HELLO).uint(key::VERSION, *version);
                match token {
                    Some(t) => e.text(key::TOKEN, t),
                    None => e,
                }
            }
            ClientFrame::Subscribe { id, room, since } => {
                let e = Entries::new(kind::SUBSCRIBE)
                    .uint(key::ID, *id)
                    .text(key::ROOM, room);
                match since {
                    Some(p) => e.uint(key::SEQ, p.seq).uint(key::EPOCH, p.epoch),
                    None => e,
                }
            }
            ClientFrame::Unsubscribe { id, room } => Entries::new(kind::UNSUBSCRIBE)
                .uint(key::ID, *id)
                .text(key::ROOM, room),
            ClientFrame::Publish {
                id,
                room,
                event,
                data,
                ack,
                key,
            } => {
                let e = Entries::new(kind::PUBLISH)
                    .uint(key::ID, *id)
                    .text(key::ROOM, room)
                    .text(key::EVENT, event)
                    .bytes(key::DATA, data);
                let e = if *ack { e.bool(key::ACK, true) } else { e };
                match key {
                    Some(k) => e.text(key::KEY, k),
                    None => e,
                }
            }
            ClientFrame::Ping { id } => Entries::new(kind::PING).opt_uint(key::ID, *id),
            ClientFrame::Refresh { id, token } => Entries::new(kind::REFRESH)
                .uint(key::ID, *id)
                .text(key::TOKEN, token),
        }
        .write(s)
    }
}

impl Serialize for ServerFrame {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ServerFrame::Welcome(w) => Entries::new(kind::WELCOME)
                .uint(key::VERSION, w.version)
                .text(key::SESSION, &w.session_id)
                .uint(key::TIME, w.server_time_ms)
                .uint(key::MAX_FRAME, w.max_frame_size)
                .uint(key::PING_INTERVAL, w.ping_interval_ms)
                .uint(key::IDLE_TIMEOUT, w.idle_timeout_ms),
            ServerFrame::Subscribed {
                id,
                room,
                seq,
                epoch,
                recovered,
            } => {
                let e = Entries::new(kind::SUBSCRIBED)
                    .uint(key::ID, *id)
                    .text(key::ROOM, room.as_str())
                    .uint(key::SEQ, *seq)
                    .uint(key::EPOCH, *epoch);
                match recovered {
                    Some(r) => e.bool(key::RECOVERED, *r),
                    None => e,
                }
            }
            ServerFrame::Unsubscribed { id, room } => Entries::new(kind::UNSUBSCRIBED)
                .uint(key::ID, *id)
                .text(key::ROOM, room.as_str()),
            ServerFrame::Event(e) => {
                return EventRef {
                    room: &e.room,
                    event: &e.event,
                    data: &e.data,
                    seq: e.seq,
                    epoch: e.epoch,
                }
                .serialize(s);
            }
            ServerFrame::Ack { id, seq } => Entries::new(kind::ACK)
                .uint(key::ID, *id)
                .opt_uint(key::SEQ, *seq),
            ServerFrame::Error {
                id,
                code,
                message,
                retry_after_ms,
            } => Entries::new(kind::ERROR)
                .opt_uint(key::ID, *id)
                .uint(key::CODE, code.value().into())
                .text(key::MESSAGE, message)
                .opt_uint(key::RETRY_AFTER, *retry_after_ms),
            ServerFrame::Pong { id } => Entries::new(kind::PONG).opt_uint(key::ID, *id),
            ServerFrame::Close {
                code,
                reason,
                reconnect,
                retry_after_ms,
            } => Entries::new(kind::CLOSE)
                .uint(key::CODE, code.value().into())
                .text(key::MESSAGE, reason)
                .bool(key::RECONNECT, *reconnect)
                .opt_uint(key::RETRY_AFTER, *retry_after_ms),
            ServerFrame::Conflation { room, active } => Entries::new(kind::CONFLATION)
                .text(key::ROOM, room.as_str())
                .bool(key::CONFLATED, *active),
        }
        .write(s)
    }
}

/// Borrowed view of an `Event` frame for encoding without cloning.
struct EventRef<'a> {
    room: &'a RoomName,
    event: &'a EventName,
    data: &'a Payload,
    seq: u64,
    epoch: Option<u64>,
}

impl Serialize for EventRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let len = if self.epoch.is_some() { 6 } else { 5 };
        let mut map = s.serialize_map(Some(len))?;
        map.serialize_entry(&key::TYPE, &kind::EVENT)?;
        map.serialize_entry(&key::ROOM, self.room.as_str())?;
        map.serialize_entry(&key::EVENT, self.event.as_str())?;
        map.serialize_entry(&key::DATA, &ByteString(self.data.as_bytes()))?;
        map.serialize_entry(&key::SEQ, &self.seq)?;
        if let Some(epoch) = &self.epoch {
            map.serialize_entry(&key::EPOCH, epoch)?;
        }
        map.end()
    }
}

/// Every field any frame may carry, as decoded from the map before the type is applied.
#[derive(Default)]
struct Fields {
    kind: u64,
    id: Option<u64>,
    room: Option<String>,
    event: Option<String>,
    data: Option<Bytes>,
    seq: Option<u64>,
    ack: Option<bool>,
    code: Option<u64>,
    message: Option<String>,
    reconnect: Option<bool>,
    version: Option<u64>,
    session: Option<String>,
    time: Option<u64>,
    max_frame: Option<u64>,
    ping_interval: Option<u64>,
    token: Option<String>,
    idle_timeout: Option<u64>,
    retry_after: Option<u64>,
    epoch: Option<u64>,
    recovered: Option<bool>,
    key: Option<String>,
    conflated: Option<bool>,
}

impl Fields {
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = bytes;
        // Strings up to this size are read through the scratch buffer, longer ones into their
        // own allocation. ciborium's default, 4 KiB, is zeroed on every call: most of the
        // cost of decoding a small frame.
        let mut scratch = [0u8; 256];
        let fields: FieldsOrDup = ciborium::de::from_reader_with_buffer(&mut reader, &mut scratch)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        match fields {
            FieldsOrDup::Fields(_) if !reader.is_empty() => Err(DecodeError::TrailingBytes),
            FieldsOrDup::Fields(f) => Ok(*f),
            FieldsOrDup::Duplicate(k) => Err(DecodeError::DuplicateKey(k)),
            FieldsOrDup::NoType => Err(DecodeError::MissingField {
                frame: "any",
                field: "type",
            }),
        }
    }
}

/// Decoding outcome that keeps structural problems apart from CBOR errors.
enum FieldsOrDup {
    Fields(Box<Fields>),
    Duplicate(u64),
    NoType,
}

/// Bytes from a CBOR byte string.
struct BytesValue(Bytes);

impl<'de> Deserialize<'de> for BytesValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BytesValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<BytesValue, E> {
                Ok(BytesValue(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<BytesValue, E> {
                Ok(BytesValue(Bytes::from(v)))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

impl<'de> Deserialize<'de> for FieldsOrDup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldsOrDup;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a frame map with unsigned integer keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FieldsOrDup, A::Error> {
                let mut f = Fields::default();
                let mut kind = None;
                // Keys 0..=63 are tracked for duplicates; larger (unknown) keys are skipped.
                let mut seen: u64 = 0;
                while let Some(k) = map.next_key::<u64>()? {
                    if k < 64 {
                        if seen & (1 << k) != 0 {
                            return Ok(FieldsOrDup::Duplicate(k));
                        }
                        seen |= 1 << k;
                    }
                    match k {
                        key::TYPE => kind = Some(map.next_value()?),
                        key::ID => f.id = Some(map.next_value()?),
                        key::ROOM => f.room = Some(map.next_value()?),
                        key::EVENT => f.event = Some(map.next_value()?),
                        key::DATA => f.data = Some(map.next_value::<BytesValue>()?.0),
                        key::SEQ => f.seq = Some(map.next_value()?),
                        key::ACK => f.ack = Some(map.next_value()?),
                        key::CODE => f.code = Some(map.next_value()?),
                        key::MESSAGE => f.message = Some(map.next_value()?),
                        key::RECONNECT => f.reconnect = Some(map.next_value()?),
                        key::VERSION => f.version = Some(map.next_value()?),
                        key::SESSION => f.session = Some(map.next_value()?),
                        key::TIME => f.time = Some(map.next_value()?),
                        key::MAX_FRAME => f.max_frame = Some(map.next_value()?),
                        key::PING_INTERVAL => f.ping_interval = Some(map.next_value()?),
                        key::TOKEN => f.token = Some(map.next_value()?),
                        key::IDLE_TIMEOUT => f.idle_timeout = Some(map.next_value()?),
                        key::RETRY_AFTER => f.retry_after = Some(map.next_value()?),
                        key::EPOCH => f.epoch = Some(map.next_value()?),
                        key::RECOVERED => f.recovered = Some(map.next_value()?),
                        key::KEY => f.key = Some(map.next_value()?),
                        key::CONFLATED => f.conflated = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                match kind {
                    Some(kind) => {
                        f.kind = kind;
                        Ok(FieldsOrDup::Fields(Box::new(f)))
                    }
                    None => Ok(FieldsOrDup::NoType),
                }
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ByteStringOwned(Vec<u8>);
    impl Serialize for ByteStringOwned {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    fn room(s: &str) -> RoomName {
        RoomName::new(s).unwrap()
    }

    #[test]
    fn client_frames_round_trip() {
        let frames = [
            ClientFrame::Hello {
                version: 1,
                token: None,
            },
            ClientFrame::Hello {
                version: 1,
                token: Some("t".into()),
            },
            ClientFrame::Subscribe {
                since: None,
                id: 1,
                room: "orders:1042".into(),
            },
            ClientFrame::Unsubscribe {
                id: 300,
                room: "orders:1042".into(),
            },
            ClientFrame::Publish {
                key: None,
                id: 2,
                room: "orders:1042".into(),
                event: "status".into(),
                data: Bytes::from_static(&[0xa1, 0x61, 0x61, 0x01]),
                ack: true,
            },
            ClientFrame::Publish {
                key: None,
                id: 0,
                room: "gps:7".into(),
                event: "pos".into(),
                data: Bytes::from_static(&[0x01]),
                ack: false,
            },
            ClientFrame::Ping { id: None },
            ClientFrame::Ping { id: Some(u64::MAX) },
            ClientFrame::Refresh {
                id: 9,
                token: "t.k.n".into(),
            },
        ];
        for frame in frames {
            let bytes = frame.encode();
            assert_eq!(ClientFrame::decode(&bytes), Ok(frame));
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::Welcome(Welcome {
                version: 1,
                session_id: "s1".into(),
                server_time_ms: 1_700_000_000_000,
                max_frame_size: 65536,
                ping_interval_ms: 25_000,
                idle_timeout_ms: 60_000,
            }),
            ServerFrame::Subscribed {
                epoch: 0,
                recovered: None,
                id: 1,
                room: room("a:b"),
                seq: 0,
            },
            ServerFrame::Unsubscribed {
                id: 1,
                room: room("a:b"),
            },
            ServerFrame::Event(Event {
                epoch: None,
                room: room("a:b"),
                event: EventName::new("e").unwrap(),
                data: Payload::new(Bytes::from_static(&[0x80]), PayloadLimits::default()).unwrap(),
                seq: 7,
            }),
            ServerFrame::Ack { id: 9, seq: None },
            ServerFrame::Ack {
                id: 9,
                seq: Some(3),
            },
            ServerFrame::Error {
                id: Some(4),
                code: Code::InvalidRoom,
                message: "x".into(),
                retry_after_ms: None,
            },
            ServerFrame::Error {
                id: None,
                code: Code::UnknownFrame,
                message: String::new(),
                retry_after_ms: None,
            },
            ServerFrame::Error {
                id: Some(2),
                code: Code::RateLimited,
                message: "slow down".into(),
                retry_after_ms: Some(250),
            },
            ServerFrame::Pong { id: Some(1) },
            ServerFrame::Close {
                retry_after_ms: None,
                code: Code::SlowConsumer,
                reason: "slow".into(),
                reconnect: true,
            },
        ];
        for frame in frames {
            let bytes = frame.encode();
            assert_eq!(
                ServerFrame::decode(&bytes, PayloadLimits::default()),
                Ok(frame)
            );
        }
    }

    #[test]
    fn event_helper_matches_enum_encoding() {
        let data = Payload::encode(&"hi").unwrap();
        let (r, e) = (room("a:b"), EventName::new("e").unwrap());
        let frame = ServerFrame::Event(Event {
            epoch: None,
            room: r.clone(),
            event: e.clone(),
            data: data.clone(),
            seq: 42,
        });
        assert_eq!(encode_event(&r, &e, &data, 42, None), frame.encode());
    }

    #[test]
    fn decode_errors() {
        // Not CBOR at all / truncated.
        assert!(matches!(
            ClientFrame::decode(&[0xff]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            ClientFrame::decode(&[0xa2, 0x00]),
            Err(DecodeError::Malformed(_))
        ));
        // A CBOR array, not a map.
        assert!(matches!(
            ClientFrame::decode(&[0x82, 0x01, 0x02]),
            Err(DecodeError::Malformed(_))
        ));
        // Text key.
        assert!(matches!(
            ClientFrame::decode(&[0xa1, 0x61, 0x74, 0x01]),
            Err(DecodeError::Malformed(_))
        ));
        // Room of the wrong type (uint).
        assert!(matches!(
            ClientFrame::decode(&[0xa3, 0x00, 0x02, 0x01, 0x01, 0x02, 0x05]),
            Err(DecodeError::Malformed(_))
        ));
        // Duplicate key.
        assert_eq!(
            ClientFrame::decode(&[0xa2, 0x00, 0x05, 0x00, 0x05]),
            Err(DecodeError::DuplicateKey(0))
        );
        // No type key.
        assert!(matches!(
            ClientFrame::decode(&[0xa1, 0x01, 0x01]),
            Err(DecodeError::MissingField { field: "type", .. })
        ));
        // Missing room.
        assert_eq!(
            ClientFrame::decode(&[0xa2, 0x00, 0x02, 0x01, 0x01]),
            Err(DecodeError::MissingField {
                frame: "Subscribe",
                field: "room"
            })
        );
        // Unknown type keeps the id.
        assert_eq!(
            ClientFrame::decode(&[0xa2, 0x00, 0x0f, 0x01, 0x07]),
            Err(DecodeError::UnknownType {
                kind: 15,
                id: Some(7)
            })
        );
        // Trailing bytes.
        let mut bytes = ClientFrame::Ping { id: None }.encode().to_vec();
        bytes.push(0x00);
        assert_eq!(ClientFrame::decode(&bytes), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        // {0: 5, 99: [1, {"x": 2}]} is a Ping.
        let bytes = [
            0xa2, 0x00, 0x05, 0x18, 0x63, 0x82, 0x01, 0xa1, 0x61, 0x78, 0x02,
        ];
        assert_eq!(
            ClientFrame::decode(&bytes),
            Ok(ClientFrame::Ping { id: None })
        );
    }

    #[test]
    fn event_envelope_stays_within_budget() {
        let (r, e) = (room("orders:1042"), EventName::new("status").unwrap());
        // A 100-byte payload: a byte string of 98 bytes.
        let payload = Payload::encode(&ByteStringOwned(vec![0u8; 98])).unwrap();
        assert_eq!(payload.len(), 100);
        let frame = encode_event(&r, &e, &payload, 70_000, None);
        let overhead = frame.len() - r.as_str().len() - e.as_str().len() - payload.len();
        assert!(overhead <= 16, "envelope overhead {overhead} bytes");
    }
}
