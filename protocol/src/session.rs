//! The broker side of one session, as a state machine without I/O.
//!
//! The broker feeds it every received frame ([`ServerSession::handle_frame`]) and wakes it at
//! [`ServerSession::poll_timeout`] ([`ServerSession::handle_timeout`]); it answers with an
//! [`Action`] for the broker to carry out. It owns the handshake, version negotiation, frame
//! size and name and payload validation, the session's set of subscribed rooms and the
//! keepalive deadlines. It does not own delivery, queues or sockets.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    PROTOCOL_VERSION,
    code::Code,
    frame::{ClientFrame, DecodeError, MAX_IDEMPOTENCY_KEY_LEN, Position, ServerFrame, Welcome},
    name::{EventName, RoomName},
    payload::{Payload, PayloadLimits},
};

/// The request id of the `Subscribed` confirming a room the broker joined the session to on
/// its own ([`ServerSession::join`]): 0, which clients do not use for `Subscribe`.
pub const BROKER_JOIN_ID: u64 = 0;

/// A request the state machine has validated (names, payload) and is about to carry out,
/// shown to the broker's [`Gate`] first.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// `Hello`, with its token if any.
    Hello {
        /// The token of the `Hello` frame.
        token: Option<&'a str>,
    },
    /// `Subscribe` to a valid room.
    Subscribe {
        /// The room.
        room: &'a RoomName,
        /// Whether the session already holds the room.
        held: bool,
    },
    /// `Unsubscribe` from a held room.
    Unsubscribe {
        /// The room.
        room: &'a RoomName,
    },
    /// `Refresh`: the session's token is to be replaced.
    Refresh {
        /// The new token.
        token: &'a str,
    },
    /// `Publish` of a valid event.
    Publish {
        /// Target room.
        room: &'a RoomName,
        /// Event name.
        event: &'a EventName,
        /// The validated payload.
        data: &'a Payload,
        /// Whether the session holds the room.
        subscribed: bool,
    },
}

/// Why a [`Gate`] refused a request. A close code ends the session; a request-error code
/// answers with `Error` and the session goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code sent.
    pub code: Code,
    /// Human-readable detail.
    pub message: String,
    /// For a request error: when the same request may succeed (`Error.retry_after`).
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// With the time after which the same request may succeed.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }
}

/// The broker's judgement of each validated request: authentication, permissions, rate
/// limits. The state machine calls it before it changes any state for the request. The
/// open gate ([`Open`]) allows everything, `Refresh` included (it is then a no-op answered
/// with `Ack`).
pub trait Gate {
    /// Allows `request` received at `now`, or refuses it.
    fn check(&mut self, request: Request<'_>, now: Instant) -> Result<(), Refusal>;
}

/// The gate that allows everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Gate for Open {
    fn check(&mut self, _request: Request<'_>, _now: Instant) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Session limits and timers, chosen by the broker.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest frame accepted from the client, bytes. Default 64 KiB.
    pub max_frame_size: usize,
    /// Interval at which clients should ping when otherwise silent. Default 25 s.
    pub ping_interval: Duration,
    /// Silence after which the session is closed with `timeout`. Default 60 s.
    pub idle_timeout: Duration,
    /// Time allowed between connect and `Hello`. Default 10 s.
    pub hello_timeout: Duration,
    /// Largest number of rooms one session may be subscribed to. Default 1024.
    pub max_subscriptions: usize,
    /// Payload validation bounds.
    pub payload: PayloadLimits,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_frame_size: 64 * 1024,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            max_subscriptions: 1024,
            payload: PayloadLimits::default(),
        }
    }
}

/// What the broker must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Send this frame to the client.
    Send(ServerFrame),
    /// Add the session to `room`, then confirm with `Subscribed`; with `since`, replay the
    /// events after that position first when the room's history still holds them.
    Subscribe {
        /// Request id.
        id: u64,
        /// The room.
        room: RoomName,
        /// Position to recover from.
        since: Option<Position>,
    },
    /// Remove the session from `room`, then confirm with `Unsubscribed { id, room }`.
    Unsubscribe {
        /// Request id.
        id: u64,
        /// The room.
        room: RoomName,
    },
    /// Fan the event out to `room`; when `ack`, answer `Ack { id }`.
    Publish {
        /// Request id.
        id: u64,
        /// Target room.
        room: RoomName,
        /// Event name.
        event: EventName,
        /// Validated payload.
        data: Payload,
        /// Whether to send `Ack`.
        ack: bool,
        /// Idempotency key (1–64 bytes), if the client gave one.
        key: Option<String>,
    },
    /// Send `Close` with this code and reason, then close the transport. The session is over:
    /// leave every room in [`ServerSession::subscriptions`].
    Close {
        /// Why.
        code: Code,
        /// Human-readable detail.
        reason: String,
    },
}

impl Action {
    fn close(code: Code, reason: impl Into<String>) -> Action {
        Action::Close {
            code,
            reason: reason.into(),
        }
    }

    fn error(id: Option<u64>, code: Code, message: impl ToString) -> Action {
        Action::Send(ServerFrame::Error {
            id,
            code,
            message: message.to_string(),
            retry_after_ms: None,
        })
    }
}

/// Builds the `Close` frame for a close action's code: the code table decides `reconnect`.
pub fn close_frame(code: Code, reason: &str) -> ServerFrame {
    ServerFrame::Close {
        code,
        reason: reason.to_owned(),
        reconnect: code.should_retry(),
        retry_after_ms: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
    Closed,
}

/// Broker-side state of one session.
#[derive(Debug)]
pub struct ServerSession {
    config: SessionConfig,
    session_id: String,
    state: State,
    connected_at: Instant,
    last_received: Instant,
    subscriptions: HashSet<RoomName>,
    token: Option<String>,
}

impl ServerSession {
    /// A new session that has connected at `now` and awaits `Hello`.
    pub fn new(session_id: impl Into<String>, config: SessionConfig, now: Instant) -> Self {
        ServerSession {
            config,
            session_id: session_id.into(),
            state: State::AwaitingHello,
            connected_at: now,
            last_received: now,
            subscriptions: HashSet::new(),
            token: None,
        }
    }

    /// The session id given in `Welcome`.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The token the client sent in `Hello`, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Rooms the session is subscribed to.
    pub fn subscriptions(&self) -> impl Iterator<Item = &RoomName> {
        self.subscriptions.iter()
    }

    /// Subscribes the session to `room` on the broker's own initiative, not at the client's
    /// request (the personal room `user:<sub>` right after `Welcome`): no gate, no rate. The
    /// room counts against `max_subscriptions` like any other, and the client may leave it
    /// with `Unsubscribe`. Returns the `Subscribe` action (request id [`BROKER_JOIN_ID`]) for
    /// the broker to carry out, or `None` when the session is not open or is at its
    /// subscription cap.
    pub fn join(&mut self, room: RoomName) -> Option<Action> {
        if self.state != State::Open {
            return None;
        }
        if !self.subscriptions.contains(&room)
            && self.subscriptions.len() >= self.config.max_subscriptions
        {
            return None;
        }
        self.subscriptions.insert(room.clone());
        Some(Action::Subscribe {
            id: BROKER_JOIN_ID,
            room,
            since: None,
        })
    }

    /// True once `Welcome` has been sent and until the session closes.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// True once a `Close` action has been returned.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Marks the session closed from outside (transport gone, shutdown, slow consumer).
    pub fn mark_closed(&mut self) {
        self.state = State::Closed;
    }

    /// When [`Self::handle_timeout`] must be called next: the hello deadline before `Hello`,
    /// the idle deadline after it.
    pub fn poll_timeout(&self) -> Instant {
        match self.state {
            State::AwaitingHello => self.connected_at + self.config.hello_timeout,
            _ => self.last_received + self.config.idle_timeout,
        }
    }

    /// Call at or after [`Self::poll_timeout`]. Returns `Close { timeout }` when the deadline
    /// has really passed (frames may have arrived since it was computed), else `None`.
    pub fn handle_timeout(&mut self, now: Instant) -> Action {
        if self.state == State::Closed || now < self.poll_timeout() {
            return Action::None;
        }
        let reason = match self.state {
            State::AwaitingHello => "no Hello within the hello timeout",
            _ => "nothing received within the idle timeout",
        };
        self.finish(Action::close(Code::Timeout, reason))
    }

    /// Handles one frame received at `now` with every request allowed. `wall_clock_ms` (ms
    /// since the Unix epoch) is only used to stamp `Welcome`.
    pub fn handle_frame(&mut self, bytes: &[u8], now: Instant, wall_clock_ms: u64) -> Action {
        self.handle_frame_gated(bytes, now, wall_clock_ms, &mut Open)
    }

    /// Handles one frame received at `now`, asking `gate` before carrying out each validated
    /// request (`Hello`, `Subscribe`, `Unsubscribe`, `Publish`).
    pub fn handle_frame_gated(
        &mut self,
        bytes: &[u8],
        now: Instant,
        wall_clock_ms: u64,
        gate: &mut impl Gate,
    ) -> Action {
        if self.state == State::Closed {
            return Action::None;
        }
        self.last_received = now;
        if bytes.len() > self.config.max_frame_size {
            return self.finish(Action::close(
                Code::FrameTooLarge,
                format!(
                    "frame of {} bytes exceeds {}",
                    bytes.len(),
                    self.config.max_frame_size
                ),
            ));
        }
        let frame = match ClientFrame::decode(bytes) {
            Ok(frame) => frame,
            Err(DecodeError::UnknownType { kind, id }) if self.state == State::Open => {
                return Action::error(id, Code::UnknownFrame, format!("unknown frame type {kind}"));
            }
            Err(e) => return self.finish(Action::close(Code::ProtocolError, e.to_string())),
        };
        match (self.state, frame) {
            (State::AwaitingHello, ClientFrame::Hello { version, token }) => {
                if let Err(refusal) = gate.check(
                    Request::Hello {
                        token: token.as_deref(),
                    },
                    now,
                ) {
                    // Hello has no id to answer with an Error: every refusal ends the session.
                    let code = if refusal.code.is_close() {
                        refusal.code
                    } else {
                        Code::Unauthorized
                    };
                    return self.finish(Action::close(code, refusal.message));
                }
                self.hello(version, token, wall_clock_ms)
            }
            (State::AwaitingHello, _) => self.finish(Action::close(
                Code::HelloRequired,
                "the first frame must be Hello",
            )),
            (State::Open, ClientFrame::Hello { .. }) => {
                self.finish(Action::close(Code::HelloRequired, "Hello sent twice"))
            }
            (State::Open, frame) => self.request(frame, now, gate),
            (State::Closed, _) => Action::None,
        }
    }

    fn hello(&mut self, version: u64, token: Option<String>, wall_clock_ms: u64) -> Action {
        if version < 1 {
            return self.finish(Action::close(
                Code::UnsupportedVersion,
                format!("version {version} unsupported; this broker speaks 1..={PROTOCOL_VERSION}"),
            ));
        }
        self.state = State::Open;
        self.token = token;
        Action::Send(ServerFrame::Welcome(Welcome {
            version: version.min(PROTOCOL_VERSION),
            session_id: self.session_id.clone(),
            server_time_ms: wall_clock_ms,
            max_frame_size: self.config.max_frame_size as u64,
            ping_interval_ms: self.config.ping_interval.as_millis() as u64,
            idle_timeout_ms: self.config.idle_timeout.as_millis() as u64,
        }))
    }

    /// Turns a gate's refusal into the action: an `Error` for request id `id`, or the close.
    fn refused(&mut self, id: Option<u64>, refusal: Refusal) -> Action {
        if refusal.code.is_close() {
            self.finish(Action::close(refusal.code, refusal.message))
        } else {
            Action::Send(ServerFrame::Error {
                id,
                code: refusal.code,
                message: refusal.message,
                retry_after_ms: refusal
                    .retry_after
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)),
            })
        }
    }

    fn request(&mut self, frame: ClientFrame, now: Instant, gate: &mut impl Gate) -> Action {
        match frame {
            ClientFrame::Subscribe { id, room, since } => {
                let room = match RoomName::new(&room) {
                    Ok(room) => room,
                    Err(e) => return Action::error(Some(id), Code::InvalidRoom, e),
                };
                let held = self.subscriptions.contains(&room);
                if let Err(refusal) = gate.check(Request::Subscribe { room: &room, held }, now) {
                    return self.refused(Some(id), refusal);
                }
                if !held && self.subscriptions.len() >= self.config.max_subscriptions {
                    return Action::error(
                        Some(id),
                        Code::TooManySubscriptions,
                        format!("at most {} subscriptions", self.config.max_subscriptions),
                    );
                }
                self.subscriptions.insert(room.clone());
                Action::Subscribe { id, room, since }
            }
            ClientFrame::Unsubscribe { id, room } => {
                let room = match RoomName::new(&room) {
                    Ok(room) => room,
                    Err(e) => return Action::error(Some(id), Code::InvalidRoom, e),
                };
                if !self.subscriptions.contains(&room) {
                    return Action::error(Some(id), Code::NotSubscribed, "not subscribed");
                }
                if let Err(refusal) = gate.check(Request::Unsubscribe { room: &room }, now) {
                    return self.refused(Some(id), refusal);
                }
                self.subscriptions.remove(&room);
                Action::Unsubscribe { id, room }
            }
            ClientFrame::Publish {
                id,
                room,
                event,
                data,
                ack,
                key,
            } => {
                if key
                    .as_ref()
                    .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN)
                {
                    return Action::error(
                        Some(id),
                        Code::InvalidKey,
                        format!("idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes"),
                    );
                }
                self.publish(id, &room, &event, data, ack, key, now, gate)
            }
            ClientFrame::Ping { id } => Action::Send(ServerFrame::Pong { id }),
            ClientFrame::Refresh { id, token } => {
                match gate.check(Request::Refresh { token: &token }, now) {
                    Ok(()) => Action::Send(ServerFrame::Ack { id, seq: None }),
                    Err(refusal) => self.refused(Some(id), refusal),
                }
            }
            ClientFrame::Hello { .. } => {
                self.finish(Action::close(Code::HelloRequired, "Hello sent twice"))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        id: u64,
        room: &str,
        event: &str,
        data: Bytes,
        ack: bool,
        key: Option<String>,
        now: Instant,
        gate: &mut impl Gate,
    ) -> Action {
        let room = match RoomName::new(room) {
            Ok(room) => room,
            Err(e) => return Action::error(Some(id), Code::InvalidRoom, e),
        };
        let event = match EventName::new(event) {
            Ok(event) => event,
            Err(e) => return Action::error(Some(id), Code::InvalidEvent, e),
        };
        let data = match Payload::new(data, self.config.payload) {
            Ok(data) => data,
            Err(e) => return Action::error(Some(id), Code::InvalidPayload, e),
        };
        let request = Request::Publish {
            room: &room,
            event: &event,
            data: &data,
            subscribed: self.subscriptions.contains(&room),
        };
        if let Err(refusal) = gate.check(request, now) {
            return self.refused(Some(id), refusal);
        }
        Action::Publish {
            id,
            room,
            event,
            data,
            ack,
            key,
        }
    }

    fn finish(&mut self, action: Action) -> Action {
        self.state = State::Closed;
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (ServerSession, Instant) {
        let now = Instant::now();
        let mut s = ServerSession::new("s1", SessionConfig::default(), now);
        let hello = ClientFrame::Hello {
            version: 1,
            token: Some("tok".into()),
        };
        match s.handle_frame(&hello.encode(), now, 5) {
            Action::Send(ServerFrame::Welcome(w)) => {
                assert_eq!(w.version, 1);
                assert_eq!(w.session_id, "s1");
                assert_eq!(w.server_time_ms, 5);
                assert_eq!(w.max_frame_size, 64 * 1024);
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
        assert_eq!(s.token(), Some("tok"));
        (s, now)
    }

    fn close_code(action: Action) -> Code {
        match action {
            Action::Close { code, .. } => code,
            other => panic!("expected Close, got {other:?}"),
        }
    }

    fn error_code(action: Action) -> (Option<u64>, Code) {
        match action {
            Action::Send(ServerFrame::Error { id, code, .. }) => (id, code),
            other => panic!("expected Error, got {other:?}"),
        }
    }

    fn subscribe(id: u64, room: &str) -> Bytes {
        ClientFrame::Subscribe {
            since: None,
            id,
            room: room.into(),
        }
        .encode()
    }

    #[test]
    fn newer_client_version_is_negotiated_down() {
        let now = Instant::now();
        let mut s = ServerSession::new("s", SessionConfig::default(), now);
        let hello = ClientFrame::Hello {
            version: 7,
            token: None,
        };
        match s.handle_frame(&hello.encode(), now, 0) {
            Action::Send(ServerFrame::Welcome(w)) => assert_eq!(w.version, PROTOCOL_VERSION),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn version_zero_is_refused() {
        let now = Instant::now();
        let mut s = ServerSession::new("s", SessionConfig::default(), now);
        let hello = ClientFrame::Hello {
            version: 0,
            token: None,
        };
        assert_eq!(
            close_code(s.handle_frame(&hello.encode(), now, 0)),
            Code::UnsupportedVersion
        );
        assert!(s.is_closed());
    }

    #[test]
    fn frames_before_hello_close_with_hello_required() {
        let now = Instant::now();
        let mut s = ServerSession::new("s", SessionConfig::default(), now);
        assert_eq!(
            close_code(s.handle_frame(&subscribe(1, "a:b"), now, 0)),
            Code::HelloRequired
        );
        // Once closed, further input is ignored.
        assert_eq!(s.handle_frame(&subscribe(1, "a:b"), now, 0), Action::None);
    }

    #[test]
    fn unknown_frame_before_hello_is_a_protocol_error() {
        let now = Instant::now();
        let mut s = ServerSession::new("s", SessionConfig::default(), now);
        assert_eq!(
            close_code(s.handle_frame(&[0xa1, 0x00, 0x0f], now, 0)),
            Code::ProtocolError
        );
    }

    #[test]
    fn second_hello_closes() {
        let (mut s, now) = open();
        let hello = ClientFrame::Hello {
            version: 1,
            token: None,
        };
        assert_eq!(
            close_code(s.handle_frame(&hello.encode(), now, 0)),
            Code::HelloRequired
        );
    }

    #[test]
    fn subscribe_unsubscribe_and_set_tracking() {
        let (mut s, now) = open();
        assert_eq!(
            s.handle_frame(&subscribe(1, "orders:1"), now, 0),
            Action::Subscribe {
                since: None,
                id: 1,
                room: RoomName::new("orders:1").unwrap()
            }
        );
        assert_eq!(s.subscriptions().count(), 1);
        let unsub = ClientFrame::Unsubscribe {
            id: 2,
            room: "orders:1".into(),
        };
        assert!(matches!(
            s.handle_frame(&unsub.encode(), now, 0),
            Action::Unsubscribe { id: 2, .. }
        ));
        assert_eq!(
            error_code(s.handle_frame(&unsub.encode(), now, 0)),
            (Some(2), Code::NotSubscribed)
        );
        assert_eq!(s.subscriptions().count(), 0);
    }

    #[test]
    fn bad_names_and_payloads_are_request_errors() {
        let (mut s, now) = open();
        assert_eq!(
            error_code(s.handle_frame(&subscribe(3, "no namespace"), now, 0)),
            (Some(3), Code::InvalidRoom)
        );
        let publish = |event: &str, data: &'static [u8]| {
            ClientFrame::Publish {
                key: None,
                id: 4,
                room: "a:b".into(),
                event: event.into(),
                data: Bytes::from_static(data),
                ack: true,
            }
            .encode()
        };
        assert_eq!(
            error_code(s.handle_frame(&publish("bad event", &[0x01]), now, 0)),
            (Some(4), Code::InvalidEvent)
        );
        assert_eq!(
            error_code(s.handle_frame(&publish("e", &[0x82, 0x01]), now, 0)),
            (Some(4), Code::InvalidPayload)
        );
        let deep: &'static [u8] = Box::leak(vec![0x81u8; 100].into_boxed_slice());
        assert_eq!(
            error_code(s.handle_frame(&publish("e", deep), now, 0)),
            (Some(4), Code::InvalidPayload)
        );
        assert!(matches!(
            s.handle_frame(&publish("e", &[0x01]), now, 0),
            Action::Publish {
                id: 4,
                ack: true,
                ..
            }
        ));
        assert!(!s.is_closed());
    }

    #[test]
    fn unknown_frame_after_hello_is_an_error_not_a_close() {
        let (mut s, now) = open();
        assert_eq!(
            error_code(s.handle_frame(&[0xa2, 0x00, 0x0f, 0x01, 0x09], now, 0)),
            (Some(9), Code::UnknownFrame)
        );
        assert!(!s.is_closed());
    }

    #[test]
    fn malformed_and_oversized_frames_close() {
        let (mut s, now) = open();
        assert_eq!(
            close_code(s.handle_frame(&[0xff, 0x00], now, 0)),
            Code::ProtocolError
        );
        let (mut s, now) = open();
        let big = vec![0u8; 64 * 1024 + 1];
        assert_eq!(
            close_code(s.handle_frame(&big, now, 0)),
            Code::FrameTooLarge
        );
    }

    #[test]
    fn subscription_cap() {
        let now = Instant::now();
        let config = SessionConfig {
            max_subscriptions: 2,
            ..SessionConfig::default()
        };
        let mut s = ServerSession::new("s", config, now);
        let hello = ClientFrame::Hello {
            version: 1,
            token: None,
        };
        s.handle_frame(&hello.encode(), now, 0);
        assert!(matches!(
            s.handle_frame(&subscribe(1, "a:1"), now, 0),
            Action::Subscribe { .. }
        ));
        assert!(matches!(
            s.handle_frame(&subscribe(2, "a:2"), now, 0),
            Action::Subscribe { .. }
        ));
        // Re-subscribing to a held room is allowed at the cap.
        assert!(matches!(
            s.handle_frame(&subscribe(3, "a:2"), now, 0),
            Action::Subscribe { .. }
        ));
        assert_eq!(
            error_code(s.handle_frame(&subscribe(4, "a:3"), now, 0)),
            (Some(4), Code::TooManySubscriptions)
        );
    }

    #[test]
    fn the_broker_joins_rooms_that_count_against_the_cap() {
        let now = Instant::now();
        let config = SessionConfig {
            max_subscriptions: 2,
            ..SessionConfig::default()
        };
        let mut s = ServerSession::new("s", config, now);
        let personal = RoomName::new("user:alice").unwrap();
        // Not before Welcome.
        assert_eq!(s.join(personal.clone()), None);
        let hello = ClientFrame::Hello {
            version: 1,
            token: None,
        };
        s.handle_frame(&hello.encode(), now, 0);
        assert_eq!(
            s.join(personal.clone()),
            Some(Action::Subscribe {
                id: BROKER_JOIN_ID,
                room: personal.clone(),
                since: None
            })
        );
        assert!(matches!(
            s.handle_frame(&subscribe(1, "a:1"), now, 0),
            Action::Subscribe { .. }
        ));
        assert_eq!(
            error_code(s.handle_frame(&subscribe(2, "a:2"), now, 0)),
            (Some(2), Code::TooManySubscriptions)
        );
        // The client may leave the joined room like any other.
        let unsub = ClientFrame::Unsubscribe {
            id: 3,
            room: "user:alice".into(),
        };
        assert!(matches!(
            s.handle_frame(&unsub.encode(), now, 0),
            Action::Unsubscribe { id: 3, .. }
        ));
        assert!(matches!(
            s.handle_frame(&subscribe(4, "a:2"), now, 0),
            Action::Subscribe { .. }
        ));
        // At the cap, the broker does not join either.
        assert_eq!(s.join(personal), None);
    }

    /// Records what it was shown and refuses rooms of namespace `no`.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Gate for Recorder {
        fn check(&mut self, request: Request<'_>, _now: Instant) -> Result<(), Refusal> {
            let (seen, room) = match request {
                Request::Hello { token } => (format!("hello {token:?}"), None),
                Request::Subscribe { room, held } => (format!("sub {room} {held}"), Some(room)),
                Request::Unsubscribe { room } => (format!("unsub {room}"), Some(room)),
                Request::Refresh { token } => {
                    self.0.push(format!("refresh {token}"));
                    return if token == "bad" {
                        Err(Refusal::new(Code::Unauthorized, "bad token"))
                    } else {
                        Ok(())
                    };
                }
                Request::Publish {
                    room, subscribed, ..
                } => (format!("pub {room} {subscribed}"), Some(room)),
            };
            self.0.push(seen);
            match room {
                Some(room) if room.namespace() == "no" => {
                    Err(Refusal::new(Code::Forbidden, "not here"))
                }
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn the_gate_sees_validated_requests_before_state_changes() {
        let now = Instant::now();
        let mut gate = Recorder::default();
        let mut s = ServerSession::new("s", SessionConfig::default(), now);
        let hello = ClientFrame::Hello {
            version: 1,
            token: Some("t".into()),
        };
        assert!(matches!(
            s.handle_frame_gated(&hello.encode(), now, 0, &mut gate),
            Action::Send(ServerFrame::Welcome(_))
        ));
        assert_eq!(
            error_code(s.handle_frame_gated(&subscribe(1, "no:1"), now, 0, &mut gate)),
            (Some(1), Code::Forbidden)
        );
        // Refused: not in the subscription set.
        assert_eq!(s.subscriptions().count(), 0);
        // Invalid names never reach the gate.
        assert_eq!(
            error_code(s.handle_frame_gated(&subscribe(2, "bad room"), now, 0, &mut gate)),
            (Some(2), Code::InvalidRoom)
        );
        assert!(matches!(
            s.handle_frame_gated(&subscribe(3, "ok:1"), now, 0, &mut gate),
            Action::Subscribe { .. }
        ));
        let publish = ClientFrame::Publish {
            key: None,
            id: 4,
            room: "ok:1".into(),
            event: "e".into(),
            data: Bytes::from_static(&[0x01]),
            ack: false,
        };
        assert!(matches!(
            s.handle_frame_gated(&publish.encode(), now, 0, &mut gate),
            Action::Publish { .. }
        ));
        let refresh = |token: &str| {
            ClientFrame::Refresh {
                id: 5,
                token: token.into(),
            }
            .encode()
        };
        assert_eq!(
            s.handle_frame_gated(&refresh("t2"), now, 0, &mut gate),
            Action::Send(ServerFrame::Ack { id: 5, seq: None })
        );
        // A refusal with a close code ends the session.
        assert_eq!(
            close_code(s.handle_frame_gated(&refresh("bad"), now, 0, &mut gate)),
            Code::Unauthorized
        );
        assert!(s.is_closed());
        assert_eq!(
            gate.0,
            [
                "hello Some(\"t\")",
                "sub no:1 false",
                "sub ok:1 false",
                "pub ok:1 true",
                "refresh t2",
                "refresh bad"
            ]
        );
    }

    #[test]
    fn a_refused_hello_closes() {
        struct No;
        impl Gate for No {
            fn check(&mut self, _: Request<'_>, _: Instant) -> Result<(), Refusal> {
                Err(Refusal::new(Code::RateLimited, "no"))
            }
        }
        let now = Instant::now();
        let mut s = ServerSession::new("s", SessionConfig::default(), now);
        let hello = ClientFrame::Hello {
            version: 1,
            token: None,
        };
        // Hello has no id: even a request-error refusal closes (as unauthorized).
        assert_eq!(
            close_code(s.handle_frame_gated(&hello.encode(), now, 0, &mut No)),
            Code::Unauthorized
        );
    }

    #[test]
    fn ping_pong() {
        let (mut s, now) = open();
        assert_eq!(
            s.handle_frame(&ClientFrame::Ping { id: Some(5) }.encode(), now, 0),
            Action::Send(ServerFrame::Pong { id: Some(5) })
        );
    }

    #[test]
    fn hello_timeout_and_idle_timeout() {
        let now = Instant::now();
        let config = SessionConfig::default();
        let mut s = ServerSession::new("s", config.clone(), now);
        assert_eq!(s.poll_timeout(), now + config.hello_timeout);
        assert_eq!(s.handle_timeout(now + Duration::from_secs(1)), Action::None);
        assert_eq!(
            close_code(s.handle_timeout(now + config.hello_timeout)),
            Code::Timeout
        );

        let (mut s, now) = open();
        let later = now + Duration::from_secs(30);
        s.handle_frame(&ClientFrame::Ping { id: None }.encode(), later, 0);
        // The deadline moved with the ping.
        assert_eq!(s.handle_timeout(now + config.idle_timeout), Action::None);
        assert_eq!(s.poll_timeout(), later + config.idle_timeout);
        assert_eq!(
            close_code(s.handle_timeout(later + config.idle_timeout)),
            Code::Timeout
        );
    }
}
