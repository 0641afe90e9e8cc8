//! The connection task: the only owner of the transport after the handshake.
//!
//! Owns the request table (reply channels by request id), the room table (room → subscription
//! buffer), keepalive and dead-broker timers, and the end of the session: failing every pending
//! request and ending every subscription with the same [`CloseInfo`]. It takes commands from a
//! bounded queue and never waits on a subscriber: events go to the room's buffer with a
//! non-blocking push. It must not validate names or payloads beyond what decoding a
//! [`ServerFrame`] does; the broker is the judge of requests.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use roomcast_protocol::{
    ClientFrame, DecodeError, PayloadLimits, RoomName, ServerFrame,
    frame::{Event, Welcome},
    session::BROKER_JOIN_ID,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    error::{CloseInfo, Error},
    options::ConnectOptions,
    subscription::{Buffer, EventMessage, Pushed, Reader},
    transport::{Incoming, LocalClose, Transport},
};

/// How long the closing handshake may take once the session is over.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Timer values from the broker are clamped to this range so a bad `Welcome` can neither make
/// the client flood pings nor overflow an `Instant`.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);
/// The request table is swept for requests whose caller gave up once it reaches this size
/// (and again at twice the size left after each sweep).
const PRUNE_MIN: usize = 64;

/// What a [`crate::Client`] asks the driver to do.
pub(crate) enum Command {
    /// Send `Subscribe` and answer with the new buffer's reader, the room and its start seq.
    Subscribe {
        id: u64,
        room: String,
        reply: oneshot::Sender<Result<(Reader, RoomName, u64), Error>>,
    },
    /// Send `Unsubscribe` for the subscription whose buffer is `buffer`.
    Unsubscribe {
        id: u64,
        room: RoomName,
        buffer: Arc<Buffer>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Send an encoded `Publish` with `ack` and answer with the `Ack`'s seq.
    Publish {
        id: u64,
        frame: Bytes,
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
    fn fail(self, info: &CloseInfo) {
        let error = Error::Closed(info.clone());
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

/// Where the session is, as seen by the handles.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Serving requests.
    Open,
    /// Over: requests fail with this; the transport is still being closed.
    Closing(CloseInfo),
    /// The transport is closed too.
    Closed(CloseInfo),
}

impl Phase {
    pub(crate) fn info(&self) -> Option<&CloseInfo> {
        match self {
            Phase::Open => None,
            Phase::Closing(info) | Phase::Closed(info) => Some(info),
        }
    }
}

/// A request waiting for the broker's reply.
enum Pending {
    Subscribe {
        room: String,
        buffer: Arc<Buffer>,
        reply: oneshot::Sender<Result<(Reader, RoomName, u64), Error>>,
    },
    /// `reply` is `None` when the driver unsubscribes on its own (the subscriber was dropped).
    Unsubscribe {
        room: String,
        buffer: Arc<Buffer>,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Publish(oneshot::Sender<Result<Option<u64>, Error>>),
    Ping(oneshot::Sender<Result<(), Error>>),
}

impl Pending {
    /// True when nobody waits for the reply and forgetting the request loses nothing.
    /// Subscriptions are kept: their reply still has to settle the room table.
    fn is_abandoned(&self) -> bool {
        match self {
            Pending::Publish(reply) => reply.is_closed(),
            Pending::Ping(reply) => reply.is_closed(),
            Pending::Subscribe { .. } | Pending::Unsubscribe { .. } => false,
        }
    }

    /// Answers the caller (if it still listens) with `error`.
    fn fail(self, error: Error) {
        match self {
            Pending::Subscribe { reply, .. } => drop(reply.send(Err(error))),
            Pending::Unsubscribe { room, reply, .. } => match reply {
                Some(reply) => drop(reply.send(Err(error))),
                None => tracing::debug!(room, %error, "automatic unsubscribe failed"),
            },
            Pending::Publish(reply) => drop(reply.send(Err(error))),
            Pending::Ping(reply) => drop(reply.send(Err(error))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Pending::Subscribe { .. } => "Subscribe",
            Pending::Unsubscribe { .. } => "Unsubscribe",
            Pending::Publish(_) => "Publish",
            Pending::Ping(_) => "Ping",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoomState {
    /// `Subscribe` sent; events are buffered already in case they overtake `Subscribed`.
    Subscribing,
    Active,
    /// `Unsubscribe` sent; events still arriving go to the buffer and are discarded with it.
    Unsubscribing,
}

struct Room {
    buffer: Arc<Buffer>,
    state: RoomState,
}

/// Why the serve loop stopped, and how to close the transport.
struct Ending {
    info: CloseInfo,
    /// How to close the transport, or `None` when it is already broken.
    close: Option<LocalClose>,
}

impl Ending {
    fn broken(info: CloseInfo) -> Self {
        Ending { info, close: None }
    }

    fn close(info: CloseInfo, how: LocalClose) -> Self {
        Ending {
            info,
            close: Some(how),
        }
    }
}

/// The connection task's state.
pub(crate) struct Driver<T> {
    transport: T,
    commands: mpsc::Receiver<Command>,
    phase: watch::Sender<Phase>,
    next_id: Arc<AtomicU64>,
    pending: HashMap<u64, Pending>,
    prune_at: usize,
    /// Keyed by the room name as the client sent it (names are exact strings, so this equals
    /// the broker's validated name).
    rooms: HashMap<String, Room>,
    limits: PayloadLimits,
    buffer_size: usize,
    ping_interval: Option<Duration>,
    dead_after: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    last_ping: Instant,
}

impl<T: Transport> Driver<T> {
    pub(crate) fn new(
        transport: T,
        welcome: &Welcome,
        options: &ConnectOptions,
        commands: mpsc::Receiver<Command>,
        phase: watch::Sender<Phase>,
        next_id: Arc<AtomicU64>,
    ) -> Self {
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
        Driver {
            transport,
            commands,
            phase,
            next_id,
            pending: HashMap::new(),
            prune_at: PRUNE_MIN,
            rooms: HashMap::new(),
            limits: options.payload_limits,
            buffer_size: options.subscription_buffer,
            ping_interval,
            dead_after,
            last_sent: now,
            last_received: now,
            last_ping: now,
        }
    }

    /// Serves the session until it ends, then settles every request and subscription and
    /// closes the transport.
    pub(crate) async fn run(mut self) {
        let ending = self.serve().await;
        tracing::debug!(info = %ending.info, "session ended");
        self.finish(&ending.info);
        if let Some(how) = ending.close {
            let _ = tokio::time::timeout(CLOSE_GRACE, self.transport.close(how)).await;
        }
        self.phase.send_replace(Phase::Closed(ending.info));
    }

    async fn serve(&mut self) -> Ending {
        let first = self.next_deadline();
        let timer = tokio::time::sleep_until(first.unwrap_or_else(|| Instant::now() + MAX_TIMER));
        tokio::pin!(timer);
        loop {
            // Deadlines only move later as traffic flows, so the timer is moved only when it
            // has fired or must fire sooner; firing early just re-checks (see `on_timer`).
            let deadline = self.next_deadline();
            if let Some(deadline) = deadline {
                if timer.is_elapsed() || deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            }
            let step = tokio::select! {
                incoming = self.transport.recv() => self.on_incoming(incoming).await,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    // Every handle and subscription is gone.
                    None => Some(Ending::close(CloseInfo::by_client(), LocalClose::Normal)),
                },
                () = &mut timer, if deadline.is_some() => self.on_timer().await,
            };
            if let Some(ending) = step {
                return ending;
            }
        }
    }

    /// Fails everything that waits on the session with `info` and refuses further commands.
    fn finish(&mut self, info: &CloseInfo) {
        self.phase.send_replace(Phase::Closing(info.clone()));
        for (_, pending) in self.pending.drain() {
            pending.fail(Error::Closed(info.clone()));
        }
        for (_, room) in self.rooms.drain() {
            room.buffer.close(info);
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            command.fail(info);
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// When the timer must fire next: the keepalive ping or the dead-broker deadline; `None`
    /// when the broker asked for no pings.
    fn next_deadline(&self) -> Option<Instant> {
        let ping = self.ping_interval.map(|interval| self.ping_due(interval));
        let dead = self.dead_after.map(|after| self.last_received + after);
        match (ping, dead) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ping when either direction has been quiet for an interval, but at most once per
    /// interval.
    fn ping_due(&self, interval: Duration) -> Instant {
        self.last_sent.min(self.last_received).max(self.last_ping) + interval
    }

    async fn on_timer(&mut self) -> Option<Ending> {
        let now = Instant::now();
        if let Some(after) = self.dead_after {
            if now >= self.last_received + after {
                let info = CloseInfo::lost(format!(
                    "nothing received from the broker for {} ms",
                    after.as_millis()
                ));
                return Some(Ending::close(info, LocalClose::Normal));
            }
        }
        self.prune();
        if let Some(interval) = self.ping_interval {
            if now >= self.ping_due(interval) {
                self.last_ping = now;
                return self.write(ClientFrame::Ping { id: None }.encode()).await;
            }
        }
        None
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

    /// Sends one frame. A send that stalls longer than the dead-broker limit (the broker
    /// stopped reading) ends the session like silence does.
    async fn write(&mut self, frame: Bytes) -> Option<Ending> {
        let sent = match self.dead_after {
            Some(limit) => tokio::time::timeout(limit, self.transport.send(frame))
                .await
                .unwrap_or_else(|_| Err(format!("send stalled for {} ms", limit.as_millis()))),
            None => self.transport.send(frame).await,
        };
        match sent {
            Ok(()) => {
                self.last_sent = Instant::now();
                None
            }
            Err(e) => Some(Ending::broken(CloseInfo::lost(format!(
                "transport error while sending: {e}"
            )))),
        }
    }

    async fn on_command(&mut self, command: Command) -> Option<Ending> {
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
                let buffer = Buffer::new(self.buffer_size);
                let frame = ClientFrame::Subscribe {
                    since: None,
                    id,
                    room: room.clone(),
                }
                .encode();
                self.rooms.insert(
                    room.clone(),
                    Room {
                        buffer: Arc::clone(&buffer),
                        state: RoomState::Subscribing,
                    },
                );
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
            Command::Publish { id, frame, reply } => {
                self.track(id, Pending::Publish(reply));
                self.write(frame).await
            }
            Command::Ping { id, reply } => {
                self.track(id, Pending::Ping(reply));
                self.last_ping = Instant::now();
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
            } => match self.transport.send_unreliable(frame) {
                Ok(None) => {
                    self.last_sent = Instant::now();
                    None
                }
                Ok(Some(frame)) => self.write(frame).await,
                Err(e) => Some(Ending::broken(CloseInfo::lost(format!(
                    "transport error while sending: {e}"
                )))),
            },
            Command::Close => Some(Ending::close(CloseInfo::by_client(), LocalClose::Normal)),
        }
    }

    /// Unsubscribes on the driver's own account (the subscriber is gone).
    async fn leave(&mut self, room: &str) -> Option<Ending> {
        let entry = self.rooms.get_mut(room)?;
        entry.state = RoomState::Unsubscribing;
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
                self.last_received = Instant::now();
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
        let frame = match ServerFrame::decode(bytes, self.limits) {
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
                None
            }
            ServerFrame::Subscribed { id, room, seq, .. } => {
                self.on_subscribed(id, room, seq).await
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
                    Some(Pending::Publish(reply)) => drop(reply.send(Ok(seq))),
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
                ..
            } if self.pending.contains_key(&id) => {
                let error = Error::Server { code, message };
                if let Some(pending) = self.pending.remove(&id) {
                    self.settle_error(pending, error);
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
                ..
            } => {
                let info = CloseInfo {
                    code: Some(code),
                    reason,
                    reconnect,
                };
                Some(Ending::close(info, LocalClose::Normal))
            }
            ServerFrame::Welcome(_) => {
                tracing::warn!("ignoring a second Welcome");
                None
            }
        }
    }

    async fn on_event(&mut self, event: Event) -> Option<Ending> {
        let Some(room) = self.rooms.get(event.room.as_str()) else {
            tracing::debug!(room = %event.room, seq = event.seq, "event for no subscription");
            return None;
        };
        let state = room.state;
        let message = EventMessage {
            room: event.room,
            event: event.event,
            data: event.data,
            seq: event.seq,
        };
        let room_name = message.room.clone();
        match room.buffer.push(message) {
            Pushed::Queued => None,
            Pushed::Dropped => {
                tracing::debug!(room = %room_name, "subscription buffer full; event dropped");
                None
            }
            Pushed::Abandoned if state == RoomState::Active => self.leave(room_name.as_str()).await,
            Pushed::Abandoned => None,
        }
    }

    async fn on_subscribed(&mut self, id: u64, room: RoomName, seq: u64) -> Option<Ending> {
        let (asked, buffer, reply) = match self.pending.remove(&id) {
            Some(Pending::Subscribe {
                room,
                buffer,
                reply,
            }) => (room, buffer, reply),
            // The broker joined the session to a room on its own (the user's personal room):
            // its events are delivered once the application subscribes to it.
            None if id == BROKER_JOIN_ID => {
                tracing::debug!(%room, "the broker joined this session to a room");
                return None;
            }
            other => {
                self.mismatch(id, "Subscribed", other);
                return None;
            }
        };
        if asked != room.as_str() {
            self.forget_room(&asked, &buffer);
            let error = Error::Protocol(format!(
                "asked to subscribe to {asked:?}, broker confirmed {room}"
            ));
            drop(reply.send(Err(error)));
            return None;
        }
        if let Some(entry) = self.rooms.get_mut(&asked) {
            if Arc::ptr_eq(&entry.buffer, &buffer) {
                entry.state = RoomState::Active;
            }
        }
        buffer.discard_up_to(seq);
        let reader = Reader::new(Arc::clone(&buffer));
        if reply.send(Ok((reader, room, seq))).is_err() {
            // The caller gave up: the returned reader was dropped with the error, so the
            // buffer is abandoned. Leave the room now rather than at its next event.
            return self.leave(&asked).await;
        }
        None
    }

    /// Answers a request with the broker's `Error` and undoes its room bookkeeping.
    fn settle_error(&mut self, pending: Pending, error: Error) {
        match &pending {
            // For Unsubscribe most likely `not_subscribed`: either way nothing more flows to
            // this buffer.
            Pending::Subscribe { room, buffer, .. } | Pending::Unsubscribe { room, buffer, .. } => {
                let (room, buffer) = (room.clone(), Arc::clone(buffer));
                self.forget_room(&room, &buffer);
            }
            Pending::Publish(_) | Pending::Ping(_) => {}
        }
        pending.fail(error);
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
