//! The connection task: the only owner of the transport after the handshake, across
//! reconnects.
//!
//! Owns the request table (reply channels by request id), the room table (room → subscription
//! buffer and the position held in the room), keepalive, dead-broker and token-refresh timers,
//! reconnecting (backoff, URL rotation, resubscribing with recovery, re-sending keyed
//! publishes) and the end of the client: failing every pending request and ending every
//! subscription with the same [`CloseInfo`]. It takes commands from a bounded queue and never
//! waits on a subscriber: events go to the room's buffer with a non-blocking push. It must not
//! validate names or payloads beyond what decoding a [`ServerFrame`] does; the broker is the
//! judge of requests.
//!
//! Between connections (while waiting out a backoff delay or connecting) it goes on taking
//! commands: subscribes and keyed publishes wait for the next session, other requests fail at
//! once with [`Error::Disconnected`].

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use roomcast_protocol::{
    ClientFrame, DecodeError, Position, RoomName, ServerFrame,
    frame::{Event, Welcome},
    session::BROKER_JOIN_ID,
};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    connection::{self, Link, OpenError, Opened},
    error::{CloseInfo, Error},
    options::ConnectOptions,
    reconnect::{Backoff, ReconnectPolicy},
    state::{ClientEvent, ConnectionState},
    subscription::{Buffer, EventMessage, Pushed, Reader, Recovery, Resumption},
    token::{self, TokenFuture},
    transport::{Incoming, LocalClose, Transport},
};

/// How long the closing handshake may take once a session is over.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Timer values from the broker are clamped to this range so a bad `Welcome` can neither make
/// the client flood pings nor overflow an `Instant`.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);
/// Bounds on the wait before retrying a resubscription the broker refused for now.
const MIN_RESUBSCRIBE_RETRY: Duration = Duration::from_millis(200);
const MAX_RESUBSCRIBE_RETRY: Duration = Duration::from_secs(60);
/// The request table is swept for requests whose caller gave up once it reaches this size
/// (and again at twice the size left after each sweep).
const PRUNE_MIN: usize = 64;

/// What a [`crate::Client`] asks the driver to do.
pub(crate) enum Command {
    /// Send `Subscribe` and answer with the new buffer's reader, the room and its start
    /// position.
    Subscribe {
        id: u64,
        room: String,
        reply: oneshot::Sender<Result<(Reader, RoomName, Position), Error>>,
    },
    /// Send `Unsubscribe` for the subscription whose buffer is `buffer`.
    Unsubscribe {
        id: u64,
        room: RoomName,
        buffer: Arc<Buffer>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Send an encoded `Publish` with `ack` and answer with the `Ack`'s seq. `keyed`: it
    /// carries an idempotency key, so it may be sent again on the next connection.
    Publish {
        id: u64,
        frame: Bytes,
        keyed: bool,
        reply: oneshot::Sender<Result<Option<u64>, Error>>,
    },
    /// Send `Ping { id }` and answer when the `Pong` arrives.
    Ping {
        id: u64,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Send these bytes as one message; no reply expected. `unreliable`: as a datagram when
    /// the transport has them and the frame fits.
    Send { frame: Bytes, unreliable: bool },
    /// End the session politely.
    Close,
}

impl Command {
    fn fail(self, error: Error) {
        // A caller that gave up no longer listens; nothing to do then.
        match self {
            Command::Subscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Unsubscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Publish { reply, .. } => drop(reply.send(Err(error))),
            Command::Ping { reply, .. } => drop(reply.send(Err(error))),
            Command::Send { .. } | Command::Close => {}
        }
    }
}

/// Where the client is, as seen by the handles.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// A session is open to `url`, serving requests.
    Open { url: String },
    /// Between sessions.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        url: String,
    },
    /// Over: requests fail with this; the transport is still being closed.
    Closing(CloseInfo),
    /// The transport is closed too.
    Closed(CloseInfo),
}

/// What the handles read: the phase and the `Welcome` of the current (or last) session.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) phase: Phase,
    pub(crate) welcome: Welcome,
}

impl Status {
    pub(crate) fn info(&self) -> Option<&CloseInfo> {
        match &self.phase {
            Phase::Open { .. } | Phase::Reconnecting { .. } => None,
            Phase::Closing(info) | Phase::Closed(info) => Some(info),
        }
    }

    pub(crate) fn state(&self) -> ConnectionState {
        match &self.phase {
            Phase::Open { url } => ConnectionState::Connected {
                url: url.clone(),
                session_id: self.welcome.session_id.clone(),
            },
            Phase::Reconnecting {
                attempt,
                delay,
                url,
            } => ConnectionState::Reconnecting {
                attempt: *attempt,
                delay: *delay,
                url: url.clone(),
            },
            Phase::Closing(info) | Phase::Closed(info) => ConnectionState::Closed(info.clone()),
        }
    }
}

/// A request waiting for the broker's reply.
enum Pending {
    /// The app's `Subscribe`, not confirmed yet: sent again on the next connection if this
    /// one ends first.
    Subscribe {
        room: String,
        buffer: Arc<Buffer>,
        reply: oneshot::Sender<Result<(Reader, RoomName, Position), Error>>,
    },
    /// The driver's `Subscribe` for a confirmed room after a reconnect, with the position it
    /// asked to recover from.
    Resubscribe {
        room: String,
        buffer: Arc<Buffer>,
        since: Option<Position>,
    },
    /// `reply` is `None` when the driver unsubscribes on its own (the subscriber was dropped).
    Unsubscribe {
        room: String,
        buffer: Arc<Buffer>,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// `resend`: the frame, for a publish with an idempotency key (sent again on the next
    /// connection if this one ends first).
    Publish {
        reply: oneshot::Sender<Result<Option<u64>, Error>>,
        resend: Option<Bytes>,
    },
    Ping(oneshot::Sender<Result<(), Error>>),
    /// The driver's `Refresh` with this token.
    Refresh {
        token: String,
    },
}

impl Pending {
    /// True when nobody waits for the reply and forgetting the request loses nothing.
    /// Subscriptions are kept: their reply still has to settle the room table.
    fn is_abandoned(&self) -> bool {
        match self {
            Pending::Publish { reply, .. } => reply.is_closed(),
            Pending::Ping(reply) => reply.is_closed(),
            Pending::Subscribe { .. }
            | Pending::Resubscribe { .. }
            | Pending::Unsubscribe { .. }
            | Pending::Refresh { .. } => false,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Pending::Subscribe { .. } | Pending::Resubscribe { .. } => "Subscribe",
            Pending::Unsubscribe { .. } => "Unsubscribe",
            Pending::Publish { .. } => "Publish",
            Pending::Ping(_) => "Ping",
            Pending::Refresh { .. } => "Refresh",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoomState {
    /// `Subscribe` sent (or to be sent on the next connection); events are held back until
    /// `Subscribed` says where the stream starts.
    Subscribing,
    Active,
    /// `Unsubscribe` sent; events still arriving are discarded.
    Unsubscribing,
}

struct Room {
    buffer: Arc<Buffer>,
    state: RoomState,
    /// The position held: the epoch from `Subscribed` (or an event that changed it) and the
    /// seq of the last event received.
    position: Position,
    /// Confirmed by `Subscribed` at least once: the subscriber holds a reader, and a
    /// reconnect subscribes again on its own.
    confirmed: bool,
    /// Events that arrived while `Subscribing` (on WebTransport a room stream may overtake
    /// the control stream's `Subscribed`), bounded by the buffer size.
    early: Vec<Event>,
    /// A resubscription was refused for now: send it again at the session's
    /// `resubscribe_at`.
    retry: bool,
}

impl Room {
    fn new(buffer: Arc<Buffer>) -> Self {
        Room {
            buffer,
            state: RoomState::Subscribing,
            position: Position { epoch: 0, seq: 0 },
            confirmed: false,
            early: Vec::new(),
            retry: false,
        }
    }

    /// Hands one event of an active room to the subscriber. An event naming another epoch
    /// resets the held position (with a `Resumed` marker first); an event at or before the
    /// held position of the same epoch is a duplicate and dropped (`None`).
    fn deliver(&mut self, event: Event) -> Option<Pushed> {
        match event.epoch {
            Some(epoch) if epoch != self.position.epoch => {
                let previous = self.position;
                self.position = Position {
                    epoch,
                    seq: event.seq,
                };
                tracing::info!(room = %event.room, epoch, seq = event.seq, "room epoch changed: reset");
                let marker = Resumption {
                    recovery: Recovery::Reset,
                    previous,
                    position: Position {
                        epoch,
                        seq: event.seq.saturating_sub(1),
                    },
                };
                if self.buffer.push_resumed(marker) == Pushed::Abandoned {
                    return Some(Pushed::Abandoned);
                }
            }
            _ if event.seq <= self.position.seq => {
                tracing::debug!(room = %event.room, seq = event.seq, held = self.position.seq, "duplicate event dropped");
                return None;
            }
            _ => self.position.seq = event.seq,
        }
        Some(self.buffer.push(EventMessage {
            room: event.room,
            event: event.event,
            data: event.data,
            seq: event.seq,
        }))
    }
}

/// Why a session's serve loop stopped, and how to close its transport.
struct Ending {
    info: CloseInfo,
    /// How to close the transport, or `None` when it is already broken.
    close: Option<LocalClose>,
    /// The broker's `Close` asked to wait this long before reconnecting.
    retry_after: Option<Duration>,
}

impl Ending {
    fn broken(info: CloseInfo) -> Self {
        Ending {
            info,
            close: None,
            retry_after: None,
        }
    }

    fn close(info: CloseInfo, how: LocalClose) -> Self {
        Ending {
            info,
            close: Some(how),
            retry_after: None,
        }
    }
}

/// One open session: its transport and timers.
struct Session {
    link: Link,
    welcome: Welcome,
    /// When `Welcome` arrived (the broker's clock is `welcome.server_time_ms` then).
    welcomed_at: Instant,
    ping_interval: Option<Duration>,
    dead_after: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    last_ping: Instant,
    /// When to ask the token provider for a fresh token.
    refresh_at: Option<Instant>,
    /// When to send the resubscriptions the broker refused for now.
    resubscribe_at: Option<Instant>,
    /// Frames received before `Welcome` (see [`Opened::early`]), served before the link's.
    early: std::vec::IntoIter<Bytes>,
}

impl Session {
    fn new(opened: Opened) -> Self {
        let welcome = opened.welcome;
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
        let now = Instant::now();
        Session {
            link: opened.link,
            welcome,
            welcomed_at: opened.welcomed_at,
            ping_interval,
            dead_after,
            last_sent: now,
            last_received: now,
            last_ping: now,
            refresh_at: None,
            resubscribe_at: None,
            early: opened.early.into_iter(),
        }
    }

    /// The broker's wall clock now, milliseconds since the Unix epoch.
    fn broker_now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.welcomed_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.welcome.server_time_ms.saturating_add(elapsed)
    }

    /// When the timer must fire next: the keepalive ping, the dead-broker deadline, the token
    /// refresh or a resubscription retry; `None` when none applies.
    fn next_deadline(&self) -> Option<Instant> {
        let ping = self.ping_interval.map(|interval| self.ping_due(interval));
        let dead = self.dead_after.map(|after| self.last_received + after);
        [ping, dead, self.refresh_at, self.resubscribe_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Ping when either direction has been quiet for an interval, but at most once per
    /// interval.
    fn ping_due(&self, interval: Duration) -> Instant {
        self.last_sent.min(self.last_received).max(self.last_ping) + interval
    }
}

/// Everything the driver is started with.
pub(crate) struct Setup {
    pub(crate) opened: Opened,
    pub(crate) urls: Vec<String>,
    /// Index in `urls` of the URL `opened` is connected to.
    pub(crate) url_index: usize,
    pub(crate) options: ConnectOptions,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) events: broadcast::Sender<ClientEvent>,
    pub(crate) next_id: Arc<AtomicU64>,
}

/// The connection task's state.
pub(crate) struct Driver {
    options: ConnectOptions,
    backoff: Backoff,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<ClientEvent>,
    next_id: Arc<AtomicU64>,
    pending: HashMap<u64, Pending>,
    prune_at: usize,
    /// Keyed by the room name as the client sent it (names are exact strings, so this equals
    /// the broker's validated name).
    rooms: HashMap<String, Room>,
    /// The open session; `None` between sessions.
    session: Option<Session>,
    /// Why the last session ended, while there is none: the error of requests made meanwhile.
    lost: CloseInfo,
    /// The token provider call in flight for a `Refresh`.
    fetch: Option<TokenFuture>,
}

impl Driver {
    pub(crate) fn new(setup: Setup) -> Self {
        let url = setup.urls[setup.url_index].clone();
        let mut driver = Driver {
            backoff: Backoff::new(setup.urls, setup.url_index),
            options: setup.options,
            commands: setup.commands,
            status: setup.status,
            events: setup.events,
            next_id: setup.next_id,
            pending: HashMap::new(),
            prune_at: PRUNE_MIN,
            rooms: HashMap::new(),
            session: None,
            lost: CloseInfo::lost("not connected yet"),
            fetch: None,
        };
        driver.attach(setup.opened, url);
        driver
    }

    /// Serves sessions, reconnecting between them when the policy says so, until the client
    /// is done; then settles every request and subscription.
    pub(crate) async fn run(mut self) {
        let mut ending = self.serve().await;
        loop {
            let session = self.session.take();
            tracing::debug!(info = %ending.info, "session ended");
            let policy = self
                .options
                .reconnect
                .clone()
                .filter(|_| ending.info.reconnect);
            let Some(policy) = policy else {
                self.finish(&ending.info);
                if let (Some(how), Some(mut session)) = (ending.close, session) {
                    let _ = tokio::time::timeout(CLOSE_GRACE, session.link.close(how)).await;
                }
                self.end(ending.info);
                return;
            };
            if let (Some(how), Some(mut session)) = (ending.close, session) {
                // The broker may be slow to finish the close: do not make the reconnect wait.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_GRACE, session.link.close(how)).await;
                });
            }
            self.disconnect(&ending.info);
            match self.reconnect(&policy, ending.retry_after).await {
                Ok(()) => {
                    ending = match self.resume().await {
                        Some(ending) => ending,
                        None => self.serve().await,
                    };
                }
                Err(info) => {
                    self.finish(&info);
                    self.end(info);
                    return;
                }
            }
        }
    }

    /// Makes `opened` the current session.
    fn attach(&mut self, opened: Opened, url: String) {
        let token = opened.token.clone();
        let mut session = Session::new(opened);
        session.refresh_at = self.refresh_deadline(&session, token.as_deref());
        let session_id = session.welcome.session_id.clone();
        self.status.send_replace(Status {
            phase: Phase::Open { url: url.clone() },
            welcome: session.welcome.clone(),
        });
        self.session = Some(session);
        self.backoff.welcomed();
        self.emit(ClientEvent::Connected { url, session_id });
    }

    /// When to fetch a fresh token for `token` (the session's current one): only with a
    /// token provider and a token whose `exp` can be read.
    fn refresh_deadline(&self, session: &Session, token: Option<&str>) -> Option<Instant> {
        self.options.token_provider.as_ref()?;
        let exp = token::jwt_expiry(token?)?;
        Some(Instant::now() + token::refresh_delay(exp, session.broker_now_ms()))
    }

    fn emit(&self, event: ClientEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn set_phase(&self, phase: Phase) {
        self.status.send_modify(|status| status.phase = phase);
    }

    /// The client is done: tell the handles and the event receivers.
    fn end(&self, info: CloseInfo) {
        self.set_phase(Phase::Closed(info.clone()));
        self.emit(ClientEvent::Closed(info));
    }

    /// Serves the current session until it ends.
    async fn serve(&mut self) -> Ending {
        let first = self.session.as_ref().and_then(Session::next_deadline);
        let timer = tokio::time::sleep_until(first.unwrap_or_else(|| Instant::now() + MAX_TIMER));
        tokio::pin!(timer);
        loop {
            // Deadlines only move later as traffic flows, so the timer is moved only when it
            // has fired or must fire sooner; firing early just re-checks (see `on_timer`).
            let deadline = self.session.as_ref().and_then(Session::next_deadline);
            if let Some(deadline) = deadline {
                if timer.is_elapsed() || deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            }
            let step = tokio::select! {
                incoming = recv(&mut self.session) => self.on_incoming(incoming).await,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    // Every handle and subscription is gone.
                    None => Some(Ending::close(CloseInfo::by_client(), LocalClose::Normal)),
                },
                () = &mut timer, if deadline.is_some() => self.on_timer().await,
                token = poll_fetch(&mut self.fetch), if self.fetch.is_some() => {
                    self.fetch = None;
                    self.on_token(token).await
                }
            };
            if let Some(ending) = step {
                return ending;
            }
        }
    }

    /// The session ended and the client reconnects: requests that cannot survive fail with
    /// [`Error::Disconnected`], the rest wait for the next session.
    fn disconnect(&mut self, info: &CloseInfo) {
        self.lost = info.clone();
        self.fetch = None;
        self.emit(ClientEvent::Disconnected(info.clone()));
        let error = Error::Disconnected(info.clone());
        for (id, pending) in std::mem::take(&mut self.pending) {
            match pending {
                Pending::Subscribe { .. } => {
                    self.pending.insert(id, pending);
                }
                Pending::Publish {
                    resend: Some(_), ..
                } if !pending.is_abandoned() => {
                    self.pending.insert(id, pending);
                }
                Pending::Resubscribe { .. } => {}
                // The next session is not subscribed to the room: that is what was asked.
                Pending::Unsubscribe {
                    room,
                    buffer,
                    reply,
                } => {
                    self.forget_room(&room, &buffer);
                    if let Some(reply) = reply {
                        drop(reply.send(Ok(())));
                    }
                }
                Pending::Publish { reply, .. } => drop(reply.send(Err(error.clone()))),
                Pending::Ping(reply) => drop(reply.send(Err(error.clone()))),
                Pending::Refresh { .. } => {
                    self.emit(ClientEvent::TokenRefreshFailed(error.clone()));
                }
            }
        }
        self.rooms.retain(|_, room| {
            let keep = room.state != RoomState::Unsubscribing
                && !(room.confirmed && room.buffer.is_abandoned());
            room.state = RoomState::Subscribing;
            room.early.clear();
            room.retry = false;
            keep
        });
    }

    /// Waits and connects until a session opens (`Ok`) or the client is done (`Err`).
    async fn reconnect(
        &mut self,
        policy: &ReconnectPolicy,
        mut retry_after: Option<Duration>,
    ) -> Result<(), CloseInfo> {
        let mut last = self.lost.clone();
        loop {
            let failures = self.backoff.failures();
            if policy.max_attempts.is_some_and(|max| failures >= max) {
                return Err(CloseInfo {
                    code: last.code,
                    reason: format!("gave up after {failures} reconnect attempts: {last}"),
                    reconnect: false,
                });
            }
            let (attempt, url) = self.backoff.next_attempt();
            let delay = policy.delay(attempt, retry_after.take());
            tracing::info!(
                attempt = attempt + 1,
                url,
                delay_ms = delay.as_millis() as u64,
                "reconnecting"
            );
            self.set_phase(Phase::Reconnecting {
                attempt: attempt + 1,
                delay,
                url: url.clone(),
            });
            self.emit(ClientEvent::Reconnecting {
                attempt: attempt + 1,
                delay,
                url: url.clone(),
            });
            self.between_sessions(tokio::time::sleep(delay)).await?;
            let options = self.options.clone();
            let target = url.clone();
            let attempt = async move {
                let token = match &options.token_provider {
                    Some(provider) => Some(
                        provider
                            .fetch()
                            .await
                            .map_err(|e| OpenError::from(Error::Token(e)))?,
                    ),
                    None => options.token.clone(),
                };
                connection::open(&target, token, &options).await
            };
            match self.between_sessions(attempt).await? {
                Ok(opened) => {
                    tracing::info!(url, session = %opened.welcome.session_id, "reconnected");
                    self.attach(opened, url);
                    return Ok(());
                }
                Err(failed) => {
                    tracing::info!(url, error = %failed.error, "reconnect attempt failed");
                    self.emit(ClientEvent::ConnectFailed {
                        url,
                        error: failed.error.clone(),
                    });
                    if !failed.retryable() {
                        return Err(match failed.error {
                            Error::Closed(info) => info,
                            other => CloseInfo {
                                code: None,
                                reason: other.to_string(),
                                reconnect: false,
                            },
                        });
                    }
                    retry_after = failed.retry_after;
                    last = match failed.error {
                        Error::Closed(info) => info,
                        other => CloseInfo::lost(other.to_string()),
                    };
                }
            }
        }
    }

    /// Runs `work` while taking commands, between sessions. `Err` when the client is to end
    /// (closed, or every handle dropped).
    async fn between_sessions<F: Future>(&mut self, work: F) -> Result<F::Output, CloseInfo> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Ok(output),
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return Err(CloseInfo::by_client()),
                    // Without a session nothing is written, so nothing can end here.
                    Some(command) => {
                        let _ = self.on_command(command).await;
                    }
                },
            }
        }
    }

    /// A new session is open: subscribe again to every confirmed room (with the held
    /// position when the room keeps history), then send the subscribes and keyed publishes
    /// still waiting, in the order they were made.
    async fn resume(&mut self) -> Option<Ending> {
        let mut frames = Vec::new();
        let mut confirmed: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, room)| room.confirmed)
            .map(|(name, _)| name.clone())
            .collect();
        confirmed.sort();
        for name in confirmed {
            frames.extend(self.resubscribe(name));
        }
        let mut waiting: Vec<(u64, Bytes)> = self
            .pending
            .iter()
            .filter_map(|(&id, pending)| match pending {
                Pending::Subscribe { room, .. } => Some((
                    id,
                    ClientFrame::Subscribe {
                        id,
                        room: room.clone(),
                        since: None,
                    }
                    .encode(),
                )),
                Pending::Publish {
                    resend: Some(frame),
                    ..
                } => Some((id, frame.clone())),
                _ => None,
            })
            .collect();
        waiting.sort_by_key(|(id, _)| *id);
        tracing::debug!(
            resubscribes = frames.len(),
            waiting = waiting.len(),
            "resuming"
        );
        frames.extend(waiting.into_iter().map(|(_, frame)| frame));
        for frame in frames {
            if let Some(ending) = self.write(frame).await {
                return Some(ending);
            }
        }
        None
    }

    /// Registers the driver's own `Subscribe` for the confirmed room `name`, with `since` =
    /// the held position when the room keeps history; returns the frame to send.
    fn resubscribe(&mut self, name: String) -> Option<Bytes> {
        let room = self.rooms.get_mut(&name)?;
        room.retry = false;
        let since = (room.position.epoch != 0).then_some(room.position);
        let buffer = Arc::clone(&room.buffer);
        let id = self.next_id();
        let frame = ClientFrame::Subscribe {
            id,
            room: name.clone(),
            since,
        }
        .encode();
        self.track(
            id,
            Pending::Resubscribe {
                room: name,
                buffer,
                since,
            },
        );
        Some(frame)
    }

    /// The broker refused a resubscription for now (`rate_limited`, `unavailable`): try again
    /// after its `retry_after` (at least [`MIN_RESUBSCRIBE_RETRY`]).
    fn retry_resubscribe(&mut self, room: &str, buffer: &Arc<Buffer>, retry_after_ms: Option<u64>) {
        let Some(entry) = self.registered(room, buffer) else {
            return;
        };
        if entry.state != RoomState::Subscribing {
            return;
        }
        entry.retry = true;
        let delay = retry_after_ms
            .map(Duration::from_millis)
            .unwrap_or(MIN_RESUBSCRIBE_RETRY)
            .clamp(MIN_RESUBSCRIBE_RETRY, MAX_RESUBSCRIBE_RETRY);
        tracing::info!(
            room,
            delay_ms = delay.as_millis() as u64,
            "resubscribe refused for now; retrying"
        );
        if let Some(session) = self.session.as_mut() {
            let at = Instant::now() + delay;
            // The latest of the waits asked for, so the retry does not run into the limit again.
            session.resubscribe_at = Some(session.resubscribe_at.map_or(at, |due| due.max(at)));
        }
    }

    /// Fails everything that waits on the client with `info` and refuses further commands.
    fn finish(&mut self, info: &CloseInfo) {
        self.set_phase(Phase::Closing(info.clone()));
        for (_, pending) in std::mem::take(&mut self.pending) {
            let error = Error::Closed(info.clone());
            match pending {
                Pending::Subscribe { reply, .. } => drop(reply.send(Err(error))),
                Pending::Unsubscribe { room, reply, .. } => match reply {
                    Some(reply) => drop(reply.send(Err(error))),
                    None => tracing::debug!(room, "automatic unsubscribe ended with the session"),
                },
                Pending::Publish { reply, .. } => drop(reply.send(Err(error))),
                Pending::Ping(reply) => drop(reply.send(Err(error))),
                Pending::Refresh { .. } => self.emit(ClientEvent::TokenRefreshFailed(error)),
                Pending::Resubscribe { .. } => {}
            }
        }
        for (_, room) in self.rooms.drain() {
            room.buffer.close(info);
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            command.fail(Error::Closed(info.clone()));
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn on_timer(&mut self) -> Option<Ending> {
        let now = Instant::now();
        let session = self.session.as_mut()?;
        if let Some(after) = session.dead_after {
            if now >= session.last_received + after {
                let info = CloseInfo::lost(format!(
                    "nothing received from the broker for {} ms",
                    after.as_millis()
                ));
                return Some(Ending::close(info, LocalClose::Normal));
            }
        }
        if session.refresh_at.is_some_and(|at| now >= at) {
            session.refresh_at = None;
            if let Some(provider) = &self.options.token_provider {
                tracing::debug!("fetching a fresh token");
                self.fetch = Some(provider.fetch());
            }
        }
        if session.resubscribe_at.is_some_and(|at| now >= at) {
            session.resubscribe_at = None;
            let mut again: Vec<String> = self
                .rooms
                .iter()
                .filter(|(_, room)| room.retry && room.state == RoomState::Subscribing)
                .map(|(name, _)| name.clone())
                .collect();
            again.sort();
            for name in again {
                if let Some(frame) = self.resubscribe(name) {
                    if let Some(ending) = self.write(frame).await {
                        return Some(ending);
                    }
                }
            }
        }
        self.prune();
        let session = self.session.as_mut()?;
        if let Some(interval) = session.ping_interval {
            if now >= session.ping_due(interval) {
                session.last_ping = now;
                return self.write(ClientFrame::Ping { id: None }.encode()).await;
            }
        }
        None
    }

    /// The token provider answered for a refresh: send `Refresh`, or report the failure and
    /// try again later.
    async fn on_token(&mut self, token: Result<String, String>) -> Option<Ending> {
        match token {
            Ok(token) => {
                let id = self.next_id();
                let frame = ClientFrame::Refresh {
                    id,
                    token: token.clone(),
                }
                .encode();
                self.track(id, Pending::Refresh { token });
                self.write(frame).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "token provider failed; refreshing later");
                self.emit(ClientEvent::TokenRefreshFailed(Error::Token(e)));
                if let Some(session) = self.session.as_mut() {
                    session.refresh_at = Some(Instant::now() + token::PROVIDER_RETRY);
                }
                None
            }
        }
    }

    /// Forgets requests whose callers gave up (their futures were dropped).
    fn prune(&mut self) {
        self.pending.retain(|_, pending| !pending.is_abandoned());
        self.prune_at = (self.pending.len() * 2).max(PRUNE_MIN);
    }

    fn track(&mut self, id: u64, pending: Pending) {
        if self.pending.len() >= self.prune_at {
            self.prune();
        }
        if let Some(old) = self.pending.insert(id, pending) {
            tracing::warn!(
                id,
                request = old.name(),
                "request id reused; dropping the older"
            );
        }
    }

    /// Sends one frame; between sessions, does nothing (the caller keeps what must be sent
    /// on the next session). A send that stalls longer than the dead-broker limit (the broker
    /// stopped reading) ends the session like silence does.
    async fn write(&mut self, frame: Bytes) -> Option<Ending> {
        let session = self.session.as_mut()?;
        let sent = match session.dead_after {
            Some(limit) => tokio::time::timeout(limit, session.link.send(frame))
                .await
                .unwrap_or_else(|_| Err(format!("send stalled for {} ms", limit.as_millis()))),
            None => session.link.send(frame).await,
        };
        match sent {
            Ok(()) => {
                session.last_sent = Instant::now();
                None
            }
            Err(e) => Some(Ending::broken(CloseInfo::lost(format!(
                "transport error while sending: {e}"
            )))),
        }
    }

    async fn on_command(&mut self, command: Command) -> Option<Ending> {
        let online = self.session.is_some();
        match command {
            Command::Subscribe { id, room, reply } => {
                if let Some(existing) = self.rooms.get(&room) {
                    let live = !existing.buffer.is_abandoned();
                    if live && existing.state != RoomState::Unsubscribing {
                        drop(reply.send(Err(Error::AlreadySubscribed(room))));
                        return None;
                    }
                    // The old subscription's reader is gone but the broker still sends: leave
                    // first, so the broker sees Unsubscribe then Subscribe.
                    if existing.state != RoomState::Unsubscribing {
                        if let Some(ending) = self.leave(&room).await {
                            return Some(ending);
                        }
                    }
                }
                let buffer = Buffer::new(self.options.subscription_buffer);
                let frame = ClientFrame::Subscribe {
                    since: None,
                    id,
                    room: room.clone(),
                }
                .encode();
                self.rooms
                    .insert(room.clone(), Room::new(Arc::clone(&buffer)));
                self.track(
                    id,
                    Pending::Subscribe {
                        room,
                        buffer,
                        reply,
                    },
                );
                self.write(frame).await
            }
            Command::Unsubscribe {
                id,
                room,
                buffer,
                reply,
            } => {
                let key = room.as_str();
                let registered = self.rooms.get_mut(key).filter(|r| {
                    Arc::ptr_eq(&r.buffer, &buffer) && r.state != RoomState::Unsubscribing
                });
                let Some(entry) = registered else {
                    // Already left (or refused earlier): nothing flows to this subscription.
                    drop(reply.send(Ok(())));
                    return None;
                };
                if !online {
                    // The next session will not subscribe to it: done.
                    self.forget_room(key, &buffer);
                    drop(reply.send(Ok(())));
                    return None;
                }
                entry.state = RoomState::Unsubscribing;
                let frame = ClientFrame::Unsubscribe {
                    id,
                    room: key.to_owned(),
                }
                .encode();
                self.track(
                    id,
                    Pending::Unsubscribe {
                        room: key.to_owned(),
                        buffer,
                        reply: Some(reply),
                    },
                );
                self.write(frame).await
            }
            Command::Publish {
                id,
                frame,
                keyed,
                reply,
            } => {
                if !online && !keyed {
                    drop(reply.send(Err(Error::Disconnected(self.lost.clone()))));
                    return None;
                }
                let resend = keyed.then(|| frame.clone());
                self.track(id, Pending::Publish { reply, resend });
                self.write(frame).await
            }
            Command::Ping { id, reply } => {
                let Some(session) = self.session.as_mut() else {
                    drop(reply.send(Err(Error::Disconnected(self.lost.clone()))));
                    return None;
                };
                session.last_ping = Instant::now();
                self.track(id, Pending::Ping(reply));
                self.write(ClientFrame::Ping { id: Some(id) }.encode())
                    .await
            }
            Command::Send {
                frame,
                unreliable: false,
            } => self.write(frame).await,
            Command::Send {
                frame,
                unreliable: true,
            } => {
                let session = self.session.as_mut()?;
                match session.link.send_unreliable(frame) {
                    Ok(None) => {
                        session.last_sent = Instant::now();
                        None
                    }
                    Ok(Some(frame)) => self.write(frame).await,
                    Err(e) => Some(Ending::broken(CloseInfo::lost(format!(
                        "transport error while sending: {e}"
                    )))),
                }
            }
            Command::Close => Some(Ending::close(CloseInfo::by_client(), LocalClose::Normal)),
        }
    }

    /// Unsubscribes on the driver's own account (the subscriber is gone). Between sessions
    /// the room is just forgotten.
    async fn leave(&mut self, room: &str) -> Option<Ending> {
        if self.session.is_none() {
            self.rooms.remove(room);
            return None;
        }
        let entry = self.rooms.get_mut(room)?;
        entry.state = RoomState::Unsubscribing;
        entry.early.clear();
        let buffer = Arc::clone(&entry.buffer);
        let id = self.next_id();
        tracing::debug!(room, "subscription dropped; unsubscribing");
        self.track(
            id,
            Pending::Unsubscribe {
                room: room.to_owned(),
                buffer,
                reply: None,
            },
        );
        let frame = ClientFrame::Unsubscribe {
            id,
            room: room.to_owned(),
        };
        self.write(frame.encode()).await
    }

    /// Removes the room entry if it still belongs to `buffer`.
    fn forget_room(&mut self, room: &str, buffer: &Arc<Buffer>) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| Arc::ptr_eq(&r.buffer, buffer))
        {
            self.rooms.remove(room);
        }
    }

    async fn on_incoming(&mut self, incoming: Result<Incoming, String>) -> Option<Ending> {
        match incoming {
            Ok(Incoming::Frame(bytes)) => {
                if let Some(session) = self.session.as_mut() {
                    session.last_received = Instant::now();
                }
                self.on_frame(&bytes).await
            }
            Ok(Incoming::Closed { code, reason }) => Some(Ending::close(
                Incoming::close_info(code, reason),
                LocalClose::Normal,
            )),
            Err(e) => Some(Ending::broken(CloseInfo::lost(format!(
                "transport error: {e}"
            )))),
        }
    }

    async fn on_frame(&mut self, bytes: &[u8]) -> Option<Ending> {
        let frame = match ServerFrame::decode(bytes, self.options.payload_limits) {
            Ok(frame) => frame,
            Err(DecodeError::UnknownType { kind, .. }) => {
                tracing::debug!(kind, "ignoring unknown frame type");
                return None;
            }
            Err(DecodeError::InvalidValue {
                field: "data",
                reason,
            }) => {
                tracing::warn!(%reason, "skipping an event whose payload exceeds the limits");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from the broker; closing");
                return Some(Ending::close(
                    CloseInfo::protocol(e),
                    LocalClose::ProtocolError,
                ));
            }
        };
        match frame {
            ServerFrame::Event(event) => self.on_event(event).await,
            ServerFrame::Conflation { room, active } => {
                tracing::debug!(%room, active, "conflation");
                self.emit(ClientEvent::Conflation { room, active });
                None
            }
            ServerFrame::Subscribed {
                id,
                room,
                seq,
                epoch,
                recovered,
            } => {
                self.on_subscribed(id, room, Position { epoch, seq }, recovered)
                    .await
            }
            ServerFrame::Unsubscribed { id, room } => {
                match self.pending.remove(&id) {
                    Some(Pending::Unsubscribe {
                        room: asked,
                        buffer,
                        reply,
                    }) => {
                        self.forget_room(&asked, &buffer);
                        if asked != room.as_str() {
                            tracing::warn!(id, %room, asked, "Unsubscribed names another room");
                        }
                        if let Some(reply) = reply {
                            drop(reply.send(Ok(())));
                        }
                    }
                    other => self.mismatch(id, "Unsubscribed", other),
                }
                None
            }
            ServerFrame::Ack { id, seq } => {
                match self.pending.remove(&id) {
                    Some(Pending::Publish { reply, .. }) => drop(reply.send(Ok(seq))),
                    Some(Pending::Refresh { token }) => self.refreshed(&token),
                    other => self.mismatch(id, "Ack", other),
                }
                None
            }
            ServerFrame::Pong { id: Some(id) } => {
                match self.pending.remove(&id) {
                    Some(Pending::Ping(reply)) => drop(reply.send(Ok(()))),
                    other => self.mismatch(id, "Pong", other),
                }
                None
            }
            ServerFrame::Pong { id: None } => None,
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
                retry_after_ms,
            } if self.pending.contains_key(&id) => {
                match self.pending.remove(&id) {
                    Some(Pending::Resubscribe { room, buffer, .. }) if code.should_retry() => {
                        self.retry_resubscribe(&room, &buffer, retry_after_ms);
                    }
                    Some(pending) => self.settle_error(pending, Error::Server { code, message }),
                    None => {}
                }
                None
            }
            ServerFrame::Error {
                id, code, message, ..
            } => {
                tracing::warn!(?id, %code, message, "broker error for no pending request");
                None
            }
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
                    // Most likely the answer to the Refresh (e.g. a token naming another user).
                    self.pending.remove(&id);
                    tracing::warn!(%info, "the broker closed the session during a token refresh");
                    self.emit(ClientEvent::TokenRefreshFailed(Error::Closed(info.clone())));
                }
                let mut ending = Ending::close(info, LocalClose::Normal);
                ending.retry_after = retry_after_ms.map(Duration::from_millis);
                Some(ending)
            }
            ServerFrame::Welcome(_) => {
                tracing::warn!("ignoring a second Welcome");
                None
            }
        }
    }

    /// The broker accepted `token`: it is the session's token now; schedule its refresh.
    fn refreshed(&mut self, token: &str) {
        tracing::debug!("token refreshed");
        self.options.token = Some(token.to_owned());
        let deadline = match self.session.as_ref() {
            Some(session) => self.refresh_deadline(session, Some(token)),
            None => None,
        };
        if let Some(session) = self.session.as_mut() {
            session.refresh_at = deadline;
        }
        self.emit(ClientEvent::TokenRefreshed);
    }

    async fn on_event(&mut self, event: Event) -> Option<Ending> {
        let capacity = self.options.subscription_buffer.max(1);
        let Some(room) = self.rooms.get_mut(event.room.as_str()) else {
            tracing::debug!(room = %event.room, seq = event.seq, "event for no subscription");
            return None;
        };
        match room.state {
            RoomState::Subscribing => {
                if room.early.len() < capacity {
                    room.early.push(event);
                } else {
                    tracing::warn!(room = %event.room, seq = event.seq, "too many events before Subscribed; dropped");
                }
                None
            }
            RoomState::Unsubscribing => None,
            RoomState::Active => {
                let name = event.room.clone();
                match room.deliver(event) {
                    Some(Pushed::Abandoned) => self.leave(name.as_str()).await,
                    Some(Pushed::Dropped) => {
                        tracing::debug!(room = %name, "subscription buffer full; event dropped");
                        None
                    }
                    Some(Pushed::Queued) | None => None,
                }
            }
        }
    }

    /// Delivers the events held back while the room was subscribing (those after its new
    /// position; the rest are duplicates or predate the subscription).
    async fn flush_early(&mut self, name: &str) -> Option<Ending> {
        let room = self.rooms.get_mut(name)?;
        let mut abandoned = false;
        for event in std::mem::take(&mut room.early) {
            if room.deliver(event) == Some(Pushed::Abandoned) {
                abandoned = true;
                break;
            }
        }
        if abandoned {
            return self.leave(name).await;
        }
        None
    }

    async fn on_subscribed(
        &mut self,
        id: u64,
        room: RoomName,
        position: Position,
        recovered: Option<bool>,
    ) -> Option<Ending> {
        match self.pending.remove(&id) {
            Some(Pending::Subscribe {
                room: asked,
                buffer,
                reply,
            }) => {
                if asked != room.as_str() {
                    self.forget_room(&asked, &buffer);
                    let error = Error::Protocol(format!(
                        "asked to subscribe to {asked:?}, broker confirmed {room}"
                    ));
                    drop(reply.send(Err(error)));
                    return None;
                }
                if let Some(entry) = self.registered(&asked, &buffer) {
                    entry.state = RoomState::Active;
                    entry.confirmed = true;
                    entry.position = position;
                }
                let reader = Reader::new(Arc::clone(&buffer));
                if let Some(ending) = self.flush_early(&asked).await {
                    return Some(ending);
                }
                if reply.send(Ok((reader, room, position))).is_err() {
                    // The caller gave up: the returned reader was dropped with the error, so
                    // the buffer is abandoned. Leave the room now rather than at its next
                    // event.
                    return self.leave(&asked).await;
                }
                None
            }
            Some(Pending::Resubscribe {
                room: asked,
                buffer,
                since,
            }) => {
                if asked != room.as_str() {
                    tracing::warn!(id, %room, asked, "Subscribed names another room");
                    self.forget_room(&asked, &buffer);
                    buffer.close(&CloseInfo::protocol(format!(
                        "asked to subscribe to {asked:?}, broker confirmed {room}"
                    )));
                    return None;
                }
                // Gone or being left meanwhile: nothing to resume.
                let entry = self
                    .registered(&asked, &buffer)
                    .filter(|entry| entry.state == RoomState::Subscribing)?;
                let recovery = match (since, recovered) {
                    (None, _) => Recovery::Fresh,
                    (Some(_), Some(true)) => Recovery::Recovered,
                    (Some(_), _) => Recovery::Reset,
                };
                let previous = entry.position;
                entry.position = position;
                entry.state = RoomState::Active;
                tracing::info!(room = asked, %recovery, epoch = position.epoch, seq = position.seq, "resubscribed");
                let resumption = Resumption {
                    recovery,
                    previous,
                    position,
                };
                if entry.buffer.push_resumed(resumption) == Pushed::Abandoned {
                    return self.leave(&asked).await;
                }
                self.flush_early(&asked).await
            }
            // The broker joined the session to a room on its own (the user's personal room):
            // its events are delivered once the application subscribes to it.
            None if id == BROKER_JOIN_ID => {
                tracing::debug!(%room, "the broker joined this session to a room");
                None
            }
            other => {
                self.mismatch(id, "Subscribed", other);
                None
            }
        }
    }

    /// The room's entry if it still belongs to `buffer`.
    fn registered(&mut self, room: &str, buffer: &Arc<Buffer>) -> Option<&mut Room> {
        self.rooms
            .get_mut(room)
            .filter(|r| Arc::ptr_eq(&r.buffer, buffer))
    }

    /// Answers a request with the broker's `Error` and undoes its room bookkeeping.
    fn settle_error(&mut self, pending: Pending, error: Error) {
        match pending {
            // For Unsubscribe most likely `not_subscribed`: either way nothing more flows to
            // this buffer.
            Pending::Subscribe {
                room,
                buffer,
                reply,
            } => {
                self.forget_room(&room, &buffer);
                drop(reply.send(Err(error)));
            }
            Pending::Unsubscribe {
                room,
                buffer,
                reply,
            } => {
                self.forget_room(&room, &buffer);
                match reply {
                    Some(reply) => drop(reply.send(Err(error))),
                    None => tracing::debug!(room, %error, "automatic unsubscribe failed"),
                }
            }
            // The room cannot be continued on this session (e.g. the new token does not
            // allow it): end the subscription with the broker's verdict.
            Pending::Resubscribe { room, buffer, .. } => {
                tracing::warn!(room, %error, "resubscribing failed; ending the subscription");
                self.forget_room(&room, &buffer);
                buffer.close(&CloseInfo {
                    code: error.code(),
                    reason: format!("resubscribing failed: {error}"),
                    reconnect: false,
                });
            }
            Pending::Publish { reply, .. } => drop(reply.send(Err(error))),
            Pending::Ping(reply) => drop(reply.send(Err(error))),
            Pending::Refresh { .. } => {
                tracing::warn!(%error, "the broker refused the refreshed token");
                self.emit(ClientEvent::TokenRefreshFailed(error));
            }
        }
    }

    /// A reply whose id names no request of its kind: answer the request (if any) with a
    /// protocol error, otherwise just log it.
    fn mismatch(&mut self, id: u64, reply: &str, pending: Option<Pending>) {
        match pending {
            None => tracing::warn!(id, reply, "reply for no pending request"),
            Some(pending) => {
                let error =
                    Error::Protocol(format!("{reply} received in reply to {}", pending.name()));
                tracing::warn!(id, %error, "mismatched reply");
                self.settle_error(pending, error);
            }
        }
    }
}

/// The next frame of the session, or never between sessions.
async fn recv(session: &mut Option<Session>) -> Result<Incoming, String> {
    match session {
        Some(session) => match session.early.next() {
            Some(frame) => Ok(Incoming::Frame(frame)),
            None => session.link.recv().await,
        },
        None => std::future::pending().await,
    }
}

/// The token provider's answer, or never when no call is in flight.
fn poll_fetch(
    fetch: &mut Option<TokenFuture>,
) -> impl Future<Output = Result<String, String>> + '_ {
    std::future::poll_fn(move |cx| match fetch {
        Some(fetch) => fetch.as_mut().poll(cx),
        None => Poll::Pending,
    })
}
