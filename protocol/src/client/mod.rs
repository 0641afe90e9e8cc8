//! The client side of a connection, across reconnects, as a state machine without I/O.
//!
//! [`ClientSession`] takes the application's requests (subscribe, unsubscribe, publish, ping,
//! raw sends), the frames received, the start and end of each transport session
//! ([`ClientSession::connected`], [`ClientSession::disconnected`], [`ClientSession::finish`])
//! and the time (`now`, and [`ClientSession::handle_timeout`] at
//! [`ClientSession::poll_timeout`]). It answers with frames to send
//! ([`ClientSession::poll_transmit`]) and [`SessionEvent`]s ([`ClientSession::poll_event`]).
//!
//! It owns the request table (replies matched by id), each room's position (epoch and seq) and
//! the duplicate guard, resubscribing with `since` after a reconnect and the `Resumed`
//! markers, re-sending keyed publishes in order, what fails with `Disconnected` between
//! sessions, the token refresh schedule (by the broker's clock from `Welcome`), keepalive pings
//! and dead-connection detection. It must not touch sockets, clocks, tasks or the
//! application's buffers: subscriptions are named by the id of the `Subscribe` that made them,
//! and the caller keeps what belongs to each. [`handshake`] opens each transport session.

pub mod handshake;

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    code::Code,
    frame::{ClientFrame, DecodeError, Event, Position, ServerFrame, Welcome},
    name::RoomName,
    payload::PayloadLimits,
    session::BROKER_JOIN_ID,
};

/// Timer values from the broker are clamped to this range so a bad `Welcome` can neither make
/// the client flood pings nor overflow an `Instant`.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);
/// Bounds on the wait before retrying a resubscription the broker refused for now.
const MIN_RESUBSCRIBE_RETRY: Duration = Duration::from_millis(200);
const MAX_RESUBSCRIBE_RETRY: Duration = Duration::from_secs(60);
/// Refresh no sooner than this after connecting or refreshing, so a provider that keeps
/// returning short-lived tokens cannot make the client flood the broker with `Refresh`.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// Refresh at least this often (keeps deadlines far from overflow for far-future tokens).
pub const MAX_REFRESH_DELAY: Duration = Duration::from_secs(24 * 3600);
/// When the token provider fails, ask again after this long.
pub const PROVIDER_RETRY: Duration = Duration::from_secs(5);

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The broker's close code: from its `Close` frame, else from the transport's close code
    /// (WebSocket close code, WebTransport session error code) when that is a known code.
    /// `None` when the transport just dropped or the client gave up on a broken connection.
    pub code: Option<Code>,
    /// Human-readable detail.
    pub reason: String,
    /// Whether reconnecting (with backoff) makes sense: the broker's hint when it sent one,
    /// true for a dropped transport, false for a client-initiated close or a protocol error.
    pub reconnect: bool,
}

impl CloseInfo {
    /// A session the client closed itself.
    pub fn by_client() -> Self {
        CloseInfo {
            code: Some(Code::Normal),
            reason: "closed by the client".into(),
            reconnect: false,
        }
    }

    /// A transport that dropped without a known close code.
    pub fn lost(reason: impl Into<String>) -> Self {
        CloseInfo {
            code: None,
            reason: reason.into(),
            reconnect: true,
        }
    }

    /// A session the client ended because the broker broke the protocol.
    pub fn protocol(reason: impl fmt::Display) -> Self {
        CloseInfo {
            code: None,
            reason: format!("protocol error: {reason}"),
            reconnect: false,
        }
    }

    /// A transport closed without a `Close` frame: the code its close code maps to decides
    /// whether to reconnect; no code means a lost connection (reconnect).
    pub fn transport(code: Option<Code>, reason: String) -> Self {
        CloseInfo {
            code,
            reason,
            reconnect: code.is_none_or(Code::should_retry),
        }
    }
}

impl fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code}")?,
            None => f.write_str("no close code")?,
        }
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        if self.reconnect {
            f.write_str(" (reconnect)")?;
        }
        Ok(())
    }
}

/// How a room's event stream went on after it was re-established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The broker replayed every event after the position the client held: nothing is
    /// missing, nothing is repeated.
    Recovered,
    /// The broker could not replay from the held position (too old, history restarted, or
    /// the other node does not have it), or a cluster broker restarted the room's numbering
    /// (a new epoch): events in between are lost to this subscription; resync the room.
    Reset,
    /// The room keeps no history (epoch 0: volatile rooms, or history disabled), so it was
    /// subscribed again from the broker's current position; events in between are lost.
    Fresh,
}

impl Recovery {
    /// `recovered`, `reset` or `fresh`.
    pub fn as_str(self) -> &'static str {
        match self {
            Recovery::Recovered => "recovered",
            Recovery::Reset => "reset",
            Recovery::Fresh => "fresh",
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and how a subscription's stream was re-established (after a reconnect) or reset (an
/// epoch change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumption {
    /// What happened to the events in between.
    pub recovery: Recovery,
    /// The position the client held before: the last event received in the room, or the
    /// subscription's start if none was.
    pub previous: Position,
    /// The position the stream goes on from: every event after the marker has a larger `seq`
    /// in this `epoch`.
    pub position: Position,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The broker answered with `Error`.
    #[error("broker error {code}: {message}")]
    Server {
        /// The broker's code.
        code: Code,
        /// The broker's detail.
        message: String,
    },
    /// The client is done.
    #[error("session closed: {0}")]
    Closed(CloseInfo),
    /// The connection was lost with the request pending, or there was none.
    #[error("disconnected: {0}")]
    Disconnected(CloseInfo),
    /// The broker's reply does not fit the request.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The room already has a live subscription.
    #[error("already subscribed to {0} on this connection")]
    AlreadySubscribed(String),
}

impl RequestError {
    /// The broker's code behind the error, if any.
    pub fn code(&self) -> Option<Code> {
        match self {
            RequestError::Server { code, .. } => Some(*code),
            RequestError::Closed(info) | RequestError::Disconnected(info) => info.code,
            _ => None,
        }
    }
}

/// A successful reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `Subscribed`: the room and the position its events continue from.
    Subscribed {
        /// The room.
        room: RoomName,
        /// Its position.
        position: Position,
    },
    /// `Unsubscribed` (or nothing was left to leave).
    Unsubscribed,
    /// `Ack`, with the event's seq if the broker assigned one.
    Acked(Option<u64>),
    /// `Pong`.
    Pong,
}

/// How to close a transport that still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalClose {
    /// The client is done (or gave up on a silent broker): a normal close.
    Normal,
    /// The broker sent something undecodable.
    ProtocolError,
}

/// Why a transport session is over, and how to close its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// How it ended.
    pub info: CloseInfo,
    /// How to close the transport, or `None` when it is already broken.
    pub close: Option<LocalClose>,
    /// The broker's `Close` asked to wait this long before reconnecting.
    pub retry_after: Option<Duration>,
}

impl Ending {
    /// The transport broke: nothing to close.
    pub fn broken(info: CloseInfo) -> Self {
        Ending {
            info,
            close: None,
            retry_after: None,
        }
    }

    /// The session is over; close the transport `how`.
    pub fn close(info: CloseInfo, how: LocalClose) -> Self {
        Ending {
            info,
            close: Some(how),
            retry_after: None,
        }
    }
}

/// What the application must learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The request `id` is settled.
    Reply {
        /// Its id.
        id: u64,
        /// The answer or why it failed.
        result: Result<Answer, RequestError>,
    },
    /// An event for subscription `sub` (the id of its `Subscribe`).
    Deliver {
        /// The subscription.
        sub: u64,
        /// The event, after the duplicate guard.
        event: Event,
    },
    /// Subscription `sub`'s stream was re-established or reset here.
    Resumed {
        /// The subscription.
        sub: u64,
        /// Its room.
        room: RoomName,
        /// Where and how.
        resumption: Resumption,
    },
    /// Subscription `sub` is no longer served: end its stream with `close`, or just drop it
    /// (`None`: it was left, or never confirmed).
    Forget {
        /// The subscription.
        sub: u64,
        /// How its stream ends, if it is to be told.
        close: Option<CloseInfo>,
    },
    /// The broker (stopped) conflating `room`.
    Conflation {
        /// The room.
        room: RoomName,
        /// Whether conflation is now on.
        active: bool,
    },
    /// Time to refresh the token: ask the provider, then call
    /// [`ClientSession::refresh_token`] or [`ClientSession::token_unavailable`].
    FetchToken,
    /// The broker accepted `token` with `Refresh`.
    TokenRefreshed {
        /// The session's token now.
        token: String,
    },
    /// The broker refused the refreshed token, closed the session in answer, or the
    /// connection was lost before the answer.
    TokenRefreshFailed(RequestError),
    /// The transport session is over: close the transport as it says, then call
    /// [`ClientSession::disconnected`] (to reconnect) or [`ClientSession::finish`].
    Ended(Ending),
}

/// A frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The encoded frame.
    pub frame: Bytes,
    /// Send it as a datagram when the transport has them and it fits.
    pub unreliable: bool,
}

/// What the client session is configured with.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bounds applied to received payloads (events over them are skipped).
    pub payload_limits: PayloadLimits,
    /// Events held per room while its `Subscribe` is unconfirmed.
    pub early_events: usize,
    /// Whether tokens are refreshed (the application has a token provider).
    pub refresh_tokens: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoomPhase {
    /// `Subscribe` sent (or to be sent on the next connection); events are held back until
    /// `Subscribed` says where the stream starts.
    Subscribing,
    Active,
    /// `Unsubscribe` sent; events still arriving are discarded.
    Unsubscribing,
}

#[derive(Debug)]
struct Room {
    /// The id of the application's `Subscribe`: the subscription's name.
    sub: u64,
    phase: RoomPhase,
    /// The epoch from `Subscribed` (or an event that changed it) and the last event's seq.
    position: Position,
    /// Confirmed at least once: a reconnect subscribes again on its own.
    confirmed: bool,
    /// Events that arrived while `Subscribing` (a room stream may overtake `Subscribed`).
    early: Vec<Event>,
    /// A resubscription was refused for now: send it again at `resubscribe_at`.
    retry: bool,
}

#[derive(Debug)]
enum Pending {
    /// The application's `Subscribe` (`id` is the subscription), kept across reconnects.
    Subscribe {
        room: String,
    },
    /// The session's own `Subscribe` for a confirmed room after a reconnect.
    Resubscribe {
        room: String,
        sub: u64,
        since: Option<Position>,
    },
    /// `by_app`: the application waits for the reply (else the subscriber was dropped).
    Unsubscribe {
        room: String,
        sub: u64,
        by_app: bool,
    },
    /// `resend`: the frame of a keyed publish, sent again on the next connection.
    Publish {
        resend: Option<Bytes>,
    },
    Ping,
    Refresh {
        token: String,
        exp: Option<u64>,
    },
}

impl Pending {
    fn name(&self) -> &'static str {
        match self {
            Pending::Subscribe { .. } | Pending::Resubscribe { .. } => "Subscribe",
            Pending::Unsubscribe { .. } => "Unsubscribe",
            Pending::Publish { .. } => "Publish",
            Pending::Ping => "Ping",
            Pending::Refresh { .. } => "Refresh",
        }
    }
}

/// The timers of one open transport session.
#[derive(Debug)]
struct Link {
    welcome: Welcome,
    welcomed_at: Instant,
    ping_interval: Option<Duration>,
    dead_after: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    last_ping: Instant,
    refresh_at: Option<Instant>,
    resubscribe_at: Option<Instant>,
}

impl Link {
    fn new(welcome: Welcome, now: Instant) -> Self {
        let ping_interval = (welcome.ping_interval_ms > 0).then(|| {
            Duration::from_millis(welcome.ping_interval_ms).clamp(MIN_PING_INTERVAL, MAX_TIMER)
        });
        // Pinging keeps a healthy broker talking, so silence beyond its idle timeout (and at
        // least two ping intervals) means the connection is dead.
        let dead_after = match ping_interval {
            Some(interval) if welcome.idle_timeout_ms > 0 => Some(
                Duration::from_millis(welcome.idle_timeout_ms)
                    .min(MAX_TIMER)
                    .max(interval * 2),
            ),
            _ => None,
        };
        Link {
            welcome,
            welcomed_at: now,
            ping_interval,
            dead_after,
            last_sent: now,
            last_received: now,
            last_ping: now,
            refresh_at: None,
            resubscribe_at: None,
        }
    }

    /// The broker's wall clock at `now`, ms since the Unix epoch.
    fn broker_now_ms(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.welcomed_at).as_millis();
        let elapsed = u64::try_from(elapsed).unwrap_or(u64::MAX);
        self.welcome.server_time_ms.saturating_add(elapsed)
    }

    /// Ping when either direction has been quiet for an interval, at most once per interval.
    fn ping_due(&self, interval: Duration) -> Instant {
        self.last_sent.min(self.last_received).max(self.last_ping) + interval
    }
}

/// How long from `now_ms` (ms since the Unix epoch, by the broker's clock) to send `Refresh`
/// for a token expiring at `exp` (seconds): at 80 % of the remaining lifetime or 30 s before
/// `exp`, whichever is earlier, within [`MIN_REFRESH_DELAY`]..=[`MAX_REFRESH_DELAY`].
pub fn refresh_delay(exp: u64, now_ms: u64) -> Duration {
    let remaining = exp.saturating_mul(1000).saturating_sub(now_ms);
    let at_80 = remaining / 5 * 4;
    let before_30 = remaining.saturating_sub(30_000);
    Duration::from_millis(at_80.min(before_30)).clamp(MIN_REFRESH_DELAY, MAX_REFRESH_DELAY)
}

/// The client's state across transport sessions.
pub struct ClientSession {
    config: ClientConfig,
    /// Request ids for the session's own requests, from the same space as the caller's.
    next_id: Box<dyn FnMut() -> u64 + Send>,
    pending: HashMap<u64, Pending>,
    /// Keyed by the room name as the client sent it.
    rooms: HashMap<String, Room>,
    /// The open transport session; `None` between sessions.
    link: Option<Link>,
    /// Why the last transport session ended, while there is none.
    lost: CloseInfo,
    /// Once [`Self::finish`] ran: every request fails with this.
    finished: Option<CloseInfo>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SessionEvent>,
}

impl fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSession")
            .field("rooms", &self.rooms.len())
            .field("pending", &self.pending.len())
            .field("open", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// A session with no transport yet; `next_id` hands out request ids for its own
    /// requests (resubscribes, refreshes, automatic unsubscribes).
    pub fn new(config: ClientConfig, next_id: impl FnMut() -> u64 + Send + 'static) -> Self {
        ClientSession {
            config,
            next_id: Box::new(next_id),
            pending: HashMap::new(),
            rooms: HashMap::new(),
            link: None,
            lost: CloseInfo::lost("not connected yet"),
            finished: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// True while a transport session is open.
    pub fn is_open(&self) -> bool {
        self.link.is_some()
    }

    /// The next frame to send (the send time counts for keepalive).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let transmit = self.transmits.pop_front()?;
        if let Some(link) = self.link.as_mut() {
            link.last_sent = now;
        }
        Some(transmit)
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must run next: keepalive, dead connection, token refresh
    /// or a resubscription retry; `None` without a transport session.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = self.link.as_ref()?;
        let ping = link.ping_interval.map(|interval| link.ping_due(interval));
        let dead = link.dead_after.map(|after| link.last_received + after);
        [ping, dead, link.refresh_at, link.resubscribe_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// How long a send may stall before the connection counts as dead.
    pub fn send_timeout(&self) -> Option<Duration> {
        self.link.as_ref()?.dead_after
    }

    /// A transport session opened at `now` with `welcome`; `token` is the one sent in
    /// `Hello`, with its `exp` (seconds since the Unix epoch) if known. Subscribes again to
    /// every confirmed room (with `since` when it keeps history), then sends the subscribes
    /// and keyed publishes still waiting, in the order they were made, then handles the
    /// frames that overtook `Welcome`.
    pub fn connected(
        &mut self,
        welcome: Welcome,
        token_exp: Option<u64>,
        early: Vec<Bytes>,
        now: Instant,
    ) {
        let mut link = Link::new(welcome, now);
        link.refresh_at = self.refresh_deadline(&link, token_exp, now);
        self.link = Some(link);
        let mut confirmed: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, room)| room.confirmed)
            .map(|(name, _)| name.clone())
            .collect();
        confirmed.sort();
        for name in confirmed {
            self.resubscribe(name);
        }
        let mut waiting: Vec<(u64, Bytes)> = self
            .pending
            .iter()
            .filter_map(|(&id, pending)| match pending {
                Pending::Subscribe { room } => Some((id, subscribe_frame(id, room.clone(), None))),
                Pending::Publish {
                    resend: Some(frame),
                } => Some((id, frame.clone())),
                _ => None,
            })
            .collect();
        waiting.sort_by_key(|(id, _)| *id);
        for (_, frame) in waiting {
            self.send(frame, false);
        }
        for frame in early {
            if self.link.is_none() {
                break;
            }
            self.handle_frame(&frame, now);
        }
    }

    /// The transport session ended and the client will reconnect: requests that cannot
    /// survive fail with `Disconnected`; subscribes, keyed publishes and rooms wait for the
    /// next session.
    pub fn disconnected(&mut self, info: &CloseInfo) {
        self.link = None;
        self.lost = info.clone();
        let error = RequestError::Disconnected(info.clone());
        let mut pending: Vec<(u64, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (id, pending) in pending {
            match pending {
                Pending::Subscribe { .. }
                | Pending::Publish {
                    resend: Some(_), ..
                } => {
                    self.pending.insert(id, pending);
                }
                Pending::Resubscribe { .. } => {}
                // The next session is not subscribed to the room: that is what was asked.
                Pending::Unsubscribe { room, sub, by_app } => {
                    self.forget_room(&room, sub, None);
                    if by_app {
                        self.reply(id, Ok(Answer::Unsubscribed));
                    }
                }
                Pending::Publish { .. } | Pending::Ping => self.reply(id, Err(error.clone())),
                Pending::Refresh { .. } => {
                    self.emit(SessionEvent::TokenRefreshFailed(error.clone()));
                }
            }
        }
        let mut gone = Vec::new();
        self.rooms.retain(|_, room| {
            let keep = room.phase != RoomPhase::Unsubscribing;
            if !keep {
                gone.push(room.sub);
            }
            room.phase = RoomPhase::Subscribing;
            room.early.clear();
            room.retry = false;
            keep
        });
        for sub in gone {
            self.emit(SessionEvent::Forget { sub, close: None });
        }
    }

    /// The client is done: every request fails and every subscription ends with `info`;
    /// requests made from now on fail with `Closed`.
    pub fn finish(&mut self, info: &CloseInfo) {
        self.link = None;
        self.transmits.clear();
        self.finished = Some(info.clone());
        let error = RequestError::Closed(info.clone());
        let mut pending: Vec<(u64, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (id, pending) in pending {
            match pending {
                Pending::Subscribe { .. } | Pending::Publish { .. } | Pending::Ping => {
                    self.reply(id, Err(error.clone()))
                }
                Pending::Unsubscribe { by_app: true, .. } => self.reply(id, Err(error.clone())),
                Pending::Refresh { .. } => {
                    self.emit(SessionEvent::TokenRefreshFailed(error.clone()))
                }
                Pending::Unsubscribe { .. } | Pending::Resubscribe { .. } => {}
            }
        }
        let mut rooms: Vec<Room> = self.rooms.drain().map(|(_, room)| room).collect();
        rooms.sort_by_key(|room| room.sub);
        for room in rooms {
            self.emit(SessionEvent::Forget {
                sub: room.sub,
                close: Some(info.clone()),
            });
        }
    }

    /// Subscribes to `room` as subscription `id` (answered with [`Answer::Subscribed`]).
    /// Waits for the next session when there is none.
    pub fn subscribe(&mut self, id: u64, room: String) {
        if let Some(error) = self.refusal() {
            return self.reply(id, Err(error));
        }
        if self
            .rooms
            .get(&room)
            .is_some_and(|r| r.phase != RoomPhase::Unsubscribing)
        {
            return self.reply(id, Err(RequestError::AlreadySubscribed(room)));
        }
        let room_entry = Room {
            sub: id,
            phase: RoomPhase::Subscribing,
            position: Position { epoch: 0, seq: 0 },
            confirmed: false,
            early: Vec::new(),
            retry: false,
        };
        self.rooms.insert(room.clone(), room_entry);
        self.track(id, Pending::Subscribe { room: room.clone() });
        self.send(subscribe_frame(id, room, None), false);
    }

    /// The subscriber of `sub` asks to leave `room` (answered with [`Answer::Unsubscribed`]).
    pub fn unsubscribe(&mut self, id: u64, room: &str, sub: u64) {
        if let Some(error) = self.refusal() {
            return self.reply(id, Err(error));
        }
        let held = self
            .rooms
            .get(room)
            .is_some_and(|r| r.sub == sub && r.phase != RoomPhase::Unsubscribing);
        if !held || self.link.is_none() {
            // Already left, refused earlier, or the next session will not subscribe to it.
            if held {
                self.forget_room(room, sub, None);
            }
            return self.reply(id, Ok(Answer::Unsubscribed));
        }
        self.start_unsubscribe(id, room, sub, true);
    }

    /// The subscriber of `sub` is gone: leave `room` on the session's own account (between
    /// sessions, just forget it).
    pub fn leave(&mut self, room: &str, sub: u64) {
        let Some(entry) = self.rooms.get(room).filter(|r| r.sub == sub) else {
            return;
        };
        if entry.phase == RoomPhase::Unsubscribing {
            return;
        }
        if self.link.is_none() {
            return self.forget_room(room, sub, None);
        }
        let id = (self.next_id)();
        self.start_unsubscribe(id, room, sub, false);
    }

    /// Publishes the encoded `Publish` frame `frame` with request id `id` (answered with
    /// [`Answer::Acked`]). `keyed`: it carries an idempotency key, so it waits for the next
    /// session, or is sent again on it when this one ends first.
    pub fn publish(&mut self, id: u64, frame: Bytes, keyed: bool) {
        if let Some(error) = self.refusal().or_else(|| self.offline().filter(|_| !keyed)) {
            return self.reply(id, Err(error));
        }
        let resend = keyed.then(|| frame.clone());
        self.track(id, Pending::Publish { resend });
        self.send(frame, false);
    }

    /// Sends `Ping { id }` (answered with [`Answer::Pong`]).
    pub fn ping(&mut self, id: u64, now: Instant) {
        if let Some(error) = self.refusal().or_else(|| self.offline()) {
            return self.reply(id, Err(error));
        }
        if let Some(link) = self.link.as_mut() {
            link.last_ping = now;
        }
        self.track(id, Pending::Ping);
        self.send(ClientFrame::Ping { id: Some(id) }.encode(), false);
    }

    /// Sends `frame` as is, no reply expected; nothing between sessions.
    pub fn send_raw(&mut self, frame: Bytes, unreliable: bool) {
        self.send(frame, unreliable);
    }

    /// Forgets requests whose callers gave up (`abandoned(id)`), except subscriptions (their
    /// reply still settles the room). A forgotten keyed publish is not sent again.
    pub fn forget_requests(&mut self, mut abandoned: impl FnMut(u64) -> bool) {
        self.pending.retain(|&id, pending| {
            !matches!(pending, Pending::Publish { .. } | Pending::Ping) || !abandoned(id)
        });
    }

    /// Requests waiting for a reply.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// The provider's fresh `token` (with its `exp` if known) after [`SessionEvent::FetchToken`]:
    /// sends `Refresh`.
    pub fn refresh_token(&mut self, token: String, exp: Option<u64>) {
        if self.link.is_none() {
            return;
        }
        let id = (self.next_id)();
        let frame = ClientFrame::Refresh {
            id,
            token: token.clone(),
        }
        .encode();
        self.track(id, Pending::Refresh { token, exp });
        self.send(frame, false);
    }

    /// The provider failed after [`SessionEvent::FetchToken`]: ask again after
    /// [`PROVIDER_RETRY`].
    pub fn token_unavailable(&mut self, now: Instant) {
        if let Some(link) = self.link.as_mut() {
            link.refresh_at = Some(now + PROVIDER_RETRY);
        }
    }

    /// Call at or after [`Self::poll_timeout`]: the dead-connection check, the token
    /// refresh, resubscription retries and the keepalive ping (firing early just re-checks).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Some(after) = link.dead_after {
            if now >= link.last_received + after {
                let info = CloseInfo::lost(format!(
                    "nothing received from the broker for {} ms",
                    after.as_millis()
                ));
                return self.end(Ending::close(info, LocalClose::Normal));
            }
        }
        if link.refresh_at.is_some_and(|at| now >= at) {
            link.refresh_at = None;
            if self.config.refresh_tokens {
                self.events.push_back(SessionEvent::FetchToken);
            }
        }
        if link.resubscribe_at.is_some_and(|at| now >= at) {
            link.resubscribe_at = None;
            let mut again: Vec<String> = self
                .rooms
                .iter()
                .filter(|(_, room)| room.retry && room.phase == RoomPhase::Subscribing)
                .map(|(name, _)| name.clone())
                .collect();
            again.sort();
            for name in again {
                self.resubscribe(name);
            }
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Some(interval) = link.ping_interval {
            if now >= link.ping_due(interval) {
                link.last_ping = now;
                self.send(ClientFrame::Ping { id: None }.encode(), false);
            }
        }
    }

    /// Handles one frame received at `now`, whichever channel it came on.
    pub fn handle_frame(&mut self, bytes: &[u8], now: Instant) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        link.last_received = now;
        let frame = match ServerFrame::decode(bytes, self.config.payload_limits) {
            Ok(frame) => frame,
            // Unknown frame types are ignored; an event whose payload exceeds the limits is
            // skipped.
            Err(DecodeError::UnknownType { .. })
            | Err(DecodeError::InvalidValue { field: "data", .. }) => return,
            Err(e) => {
                return self.end(Ending::close(
                    CloseInfo::protocol(e),
                    LocalClose::ProtocolError,
                ));
            }
        };
        match frame {
            ServerFrame::Event(event) => self.on_event(event),
            ServerFrame::Conflation { room, active } => {
                self.emit(SessionEvent::Conflation { room, active })
            }
            ServerFrame::Subscribed {
                id,
                room,
                seq,
                epoch,
                recovered,
            } => self.on_subscribed(id, room, Position { epoch, seq }, recovered),
            ServerFrame::Unsubscribed { id, room } => match self.pending.remove(&id) {
                Some(Pending::Unsubscribe {
                    room: asked,
                    sub,
                    by_app,
                }) => {
                    self.forget_room(&asked, sub, None);
                    let _ = room;
                    if by_app {
                        self.reply(id, Ok(Answer::Unsubscribed));
                    }
                }
                other => self.mismatch(id, "Unsubscribed", other),
            },
            ServerFrame::Ack { id, seq } => match self.pending.remove(&id) {
                Some(Pending::Publish { .. }) => self.reply(id, Ok(Answer::Acked(seq))),
                Some(Pending::Refresh { token, exp }) => self.refreshed(token, exp, now),
                other => self.mismatch(id, "Ack", other),
            },
            ServerFrame::Pong { id: Some(id) } => match self.pending.remove(&id) {
                Some(Pending::Ping) => self.reply(id, Ok(Answer::Pong)),
                other => self.mismatch(id, "Pong", other),
            },
            ServerFrame::Pong { id: None } | ServerFrame::Welcome(_) => {}
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
                retry_after_ms,
            } if self.pending.contains_key(&id) => match self.pending.remove(&id) {
                Some(Pending::Resubscribe { room, sub, .. }) if code.should_retry() => {
                    self.retry_resubscribe(&room, sub, retry_after_ms, now)
                }
                Some(pending) => {
                    self.settle_error(id, pending, RequestError::Server { code, message })
                }
                None => {}
            },
            ServerFrame::Error { .. } => {}
            ServerFrame::Close {
                code,
                reason,
                reconnect,
                retry_after_ms,
            } => {
                let info = CloseInfo {
                    code: Some(code),
                    reason,
                    reconnect,
                };
                let refreshing: Vec<u64> = self
                    .pending
                    .iter()
                    .filter(|(_, p)| matches!(p, Pending::Refresh { .. }))
                    .map(|(&id, _)| id)
                    .collect();
                for id in refreshing {
                    // Most likely the answer to the Refresh (a token naming another user).
                    self.pending.remove(&id);
                    self.emit(SessionEvent::TokenRefreshFailed(RequestError::Closed(
                        info.clone(),
                    )));
                }
                let mut ending = Ending::close(info, LocalClose::Normal);
                ending.retry_after = retry_after_ms.map(Duration::from_millis);
                self.end(ending);
            }
        }
    }

    /// Ends the transport session from the session's side (`Close` received, protocol
    /// error, dead connection). Nothing more is sent on it.
    fn end(&mut self, ending: Ending) {
        self.link = None;
        self.transmits.clear();
        self.emit(SessionEvent::Ended(ending));
    }

    /// Why no request can be made any more: the client is done.
    fn refusal(&self) -> Option<RequestError> {
        self.finished.clone().map(RequestError::Closed)
    }

    /// Why a request that cannot wait for the next session fails now, if there is none.
    fn offline(&self) -> Option<RequestError> {
        self.link
            .is_none()
            .then(|| RequestError::Disconnected(self.lost.clone()))
    }

    fn emit(&mut self, event: SessionEvent) {
        self.events.push_back(event);
    }

    fn reply(&mut self, id: u64, result: Result<Answer, RequestError>) {
        self.emit(SessionEvent::Reply { id, result });
    }

    fn send(&mut self, frame: Bytes, unreliable: bool) {
        if self.link.is_some() {
            self.transmits.push_back(Transmit { frame, unreliable });
        }
    }

    fn track(&mut self, id: u64, pending: Pending) {
        // A reused id drops the older request (the caller's allocator never reuses one).
        self.pending.insert(id, pending);
    }

    fn refresh_deadline(&self, link: &Link, exp: Option<u64>, now: Instant) -> Option<Instant> {
        if !self.config.refresh_tokens {
            return None;
        }
        Some(now + refresh_delay(exp?, link.broker_now_ms(now)))
    }

    fn refreshed(&mut self, token: String, exp: Option<u64>, now: Instant) {
        let deadline = match self.link.as_ref() {
            Some(link) => self.refresh_deadline(link, exp, now),
            None => None,
        };
        if let Some(link) = self.link.as_mut() {
            link.refresh_at = deadline;
        }
        self.emit(SessionEvent::TokenRefreshed { token });
    }

    fn start_unsubscribe(&mut self, id: u64, room: &str, sub: u64, by_app: bool) {
        if let Some(entry) = self.rooms.get_mut(room) {
            entry.phase = RoomPhase::Unsubscribing;
            entry.early.clear();
        }
        let pending = Pending::Unsubscribe {
            room: room.to_owned(),
            sub,
            by_app,
        };
        self.track(id, pending);
        let frame = ClientFrame::Unsubscribe {
            id,
            room: room.to_owned(),
        };
        self.send(frame.encode(), false);
    }

    /// Registers the session's own `Subscribe` for the confirmed room `name`, with `since` =
    /// the held position when the room keeps history, and sends it.
    fn resubscribe(&mut self, name: String) {
        let Some(room) = self.rooms.get_mut(&name) else {
            return;
        };
        room.retry = false;
        let since = (room.position.epoch != 0).then_some(room.position);
        let sub = room.sub;
        let id = (self.next_id)();
        let frame = subscribe_frame(id, name.clone(), since);
        self.track(
            id,
            Pending::Resubscribe {
                room: name,
                sub,
                since,
            },
        );
        self.send(frame, false);
    }

    /// The broker refused a resubscription for now: try again after its `retry_after` (at
    /// least [`MIN_RESUBSCRIBE_RETRY`]), the latest of the waits asked for.
    fn retry_resubscribe(
        &mut self,
        room: &str,
        sub: u64,
        retry_after_ms: Option<u64>,
        now: Instant,
    ) {
        let Some(entry) = self.room_of(room, sub) else {
            return;
        };
        if entry.phase != RoomPhase::Subscribing {
            return;
        }
        entry.retry = true;
        let delay = retry_after_ms
            .map(Duration::from_millis)
            .unwrap_or(MIN_RESUBSCRIBE_RETRY)
            .clamp(MIN_RESUBSCRIBE_RETRY, MAX_RESUBSCRIBE_RETRY);
        if let Some(link) = self.link.as_mut() {
            let at = now + delay;
            link.resubscribe_at = Some(link.resubscribe_at.map_or(at, |due| due.max(at)));
        }
    }

    fn room_of(&mut self, room: &str, sub: u64) -> Option<&mut Room> {
        self.rooms.get_mut(room).filter(|r| r.sub == sub)
    }

    /// Drops the room entry if it still belongs to `sub`, and tells the application.
    fn forget_room(&mut self, room: &str, sub: u64, close: Option<CloseInfo>) {
        if self.rooms.get(room).is_some_and(|r| r.sub == sub) {
            self.rooms.remove(room);
        }
        self.emit(SessionEvent::Forget { sub, close });
    }

    fn on_event(&mut self, event: Event) {
        let capacity = self.config.early_events.max(1);
        let Some(room) = self.rooms.get_mut(event.room.as_str()) else {
            return;
        };
        match room.phase {
            RoomPhase::Subscribing => {
                if room.early.len() < capacity {
                    room.early.push(event);
                }
            }
            RoomPhase::Unsubscribing => {}
            RoomPhase::Active => {
                let name = event.room.as_str().to_owned();
                self.deliver(&name, event);
            }
        }
    }

    /// Hands one event of an active room on. An event naming another epoch resets the held
    /// position (with a `Resumed` marker first); one at or before the held position of the
    /// same epoch is a duplicate and dropped.
    fn deliver(&mut self, name: &str, event: Event) {
        let Some(room) = self.rooms.get_mut(name) else {
            return;
        };
        let sub = room.sub;
        match event.epoch {
            Some(epoch) if epoch != room.position.epoch => {
                let previous = room.position;
                room.position = Position {
                    epoch,
                    seq: event.seq,
                };
                let resumption = Resumption {
                    recovery: Recovery::Reset,
                    previous,
                    position: Position {
                        epoch,
                        seq: event.seq.saturating_sub(1),
                    },
                };
                let room = event.room.clone();
                self.emit(SessionEvent::Resumed {
                    sub,
                    room,
                    resumption,
                });
            }
            _ if event.seq <= room.position.seq => return,
            _ => room.position.seq = event.seq,
        }
        self.emit(SessionEvent::Deliver { sub, event });
    }

    /// Delivers the events held back while the room was subscribing.
    fn flush_early(&mut self, name: &str) {
        let Some(room) = self.rooms.get_mut(name) else {
            return;
        };
        for event in std::mem::take(&mut room.early) {
            self.deliver(name, event);
        }
    }

    fn on_subscribed(
        &mut self,
        id: u64,
        room: RoomName,
        position: Position,
        recovered: Option<bool>,
    ) {
        match self.pending.remove(&id) {
            Some(Pending::Subscribe { room: asked }) => {
                if asked != room.as_str() {
                    self.forget_room(&asked, id, None);
                    let error = RequestError::Protocol(format!(
                        "asked to subscribe to {asked:?}, broker confirmed {room}"
                    ));
                    return self.reply(id, Err(error));
                }
                if let Some(entry) = self.room_of(&asked, id) {
                    entry.phase = RoomPhase::Active;
                    entry.confirmed = true;
                    entry.position = position;
                }
                self.reply(id, Ok(Answer::Subscribed { room, position }));
                self.flush_early(&asked);
            }
            Some(Pending::Resubscribe {
                room: asked,
                sub,
                since,
            }) => {
                if asked != room.as_str() {
                    let close = CloseInfo::protocol(format!(
                        "asked to subscribe to {asked:?}, broker confirmed {room}"
                    ));
                    return self.forget_room(&asked, sub, Some(close));
                }
                // Gone or being left meanwhile: nothing to resume.
                let Some(entry) = self
                    .room_of(&asked, sub)
                    .filter(|entry| entry.phase == RoomPhase::Subscribing)
                else {
                    return;
                };
                let recovery = match (since, recovered) {
                    (None, _) => Recovery::Fresh,
                    (Some(_), Some(true)) => Recovery::Recovered,
                    (Some(_), _) => Recovery::Reset,
                };
                let previous = entry.position;
                entry.position = position;
                entry.phase = RoomPhase::Active;
                let resumption = Resumption {
                    recovery,
                    previous,
                    position,
                };
                self.emit(SessionEvent::Resumed {
                    sub,
                    room,
                    resumption,
                });
                self.flush_early(&asked);
            }
            // The broker joined the session to a room on its own (the personal room): its
            // events are delivered once the application subscribes to it.
            None if id == BROKER_JOIN_ID => {}
            other => self.mismatch(id, "Subscribed", other),
        }
    }

    /// Answers a request with an error and undoes its room bookkeeping.
    fn settle_error(&mut self, id: u64, pending: Pending, error: RequestError) {
        match pending {
            Pending::Subscribe { room } => {
                self.forget_room(&room, id, None);
                self.reply(id, Err(error));
            }
            // For Unsubscribe most likely `not_subscribed`: nothing more flows either way.
            Pending::Unsubscribe { room, sub, by_app } => {
                self.forget_room(&room, sub, None);
                if by_app {
                    self.reply(id, Err(error));
                }
            }
            // The room cannot be continued on this session (e.g. the new token does not allow
            // it): end the subscription with the broker's verdict.
            Pending::Resubscribe { room, sub, .. } => {
                let close = CloseInfo {
                    code: error.code(),
                    reason: format!("resubscribing failed: {error}"),
                    reconnect: false,
                };
                self.forget_room(&room, sub, Some(close));
            }
            Pending::Publish { .. } | Pending::Ping => self.reply(id, Err(error)),
            Pending::Refresh { .. } => self.emit(SessionEvent::TokenRefreshFailed(error)),
        }
    }

    /// A reply whose id names no request of its kind: fail the request (if any) with a
    /// protocol error.
    fn mismatch(&mut self, id: u64, reply: &str, pending: Option<Pending>) {
        if let Some(pending) = pending {
            let error =
                RequestError::Protocol(format!("{reply} received in reply to {}", pending.name()));
            self.settle_error(id, pending, error);
        }
    }
}

fn subscribe_frame(id: u64, room: String, since: Option<Position>) -> Bytes {
    ClientFrame::Subscribe { id, room, since }.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_at_80_percent_or_30_s_before_whichever_is_earlier() {
        let now = 1_700_000_000_000;
        let at = |lifetime_s: u64| refresh_delay(1_700_000_000 + lifetime_s, now);
        assert_eq!(at(3600), Duration::from_secs(2880));
        assert_eq!(at(120), Duration::from_secs(90));
        assert_eq!(at(150), Duration::from_secs(120));
        assert_eq!(at(10), MIN_REFRESH_DELAY);
        assert_eq!(refresh_delay(1_600_000_000, now), MIN_REFRESH_DELAY);
        assert_eq!(refresh_delay(u64::MAX, 0), MAX_REFRESH_DELAY);
        assert_eq!(at(10 * 24 * 3600), MAX_REFRESH_DELAY);
    }

    #[test]
    fn close_info_from_a_transport_reconnects_unless_the_code_says_otherwise() {
        assert!(CloseInfo::transport(Some(Code::ShuttingDown), "x".into()).reconnect);
        assert!(!CloseInfo::transport(Some(Code::Normal), "x".into()).reconnect);
        assert!(CloseInfo::transport(None, "x".into()).reconnect);
    }
}
