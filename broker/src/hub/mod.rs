//! The local room registry and fan-out.
//!
//! Rooms are sharded by name; each room has its own lock holding its sequence counter and its
//! subscribers' outboxes. A publish assigns the room's next `seq`, encodes the `Event` frame
//! once and pushes the same `Bytes` into every subscriber's outbox with a non-blocking push:
//! a full outbox makes that subscriber a slow consumer and drops it from the room, a closed
//! one is dropped; fan-out never waits on a subscriber. Confirmations (`Subscribed`,
//! `Unsubscribed`) are queued under the room lock so they are ordered with the room's events.
//!
//! Rooms of namespaces with history ([`RoomRule::history`]) keep their recent `Event` frames
//! (the same `Bytes`) with their `seq` in one epoch, so a subscriber that gives the position it
//! last saw gets what it missed replayed under the room lock — before any later event, with no
//! gap and no duplicate at the seam. Such a room outlives its last subscriber until its history
//! expires ([`Hub::sweep`]). Idempotency keys of publishes are remembered per room for the
//! namespace's dedup window.
//!
//! Rooms of namespaces that conflate ([`RoomRule::conflate`]) have each event's conflation key
//! found and hashed once per publish, before the room lock is taken; the key goes with each
//! subscriber's push so that the outbox of a subscriber that fell behind keeps only the latest
//! event per key (see [`crate::outbox`]). The room's two `Conflation` frames are encoded once,
//! when the room is created.
//!
//! The hub does not touch sockets, sessions' protocol state or the cluster. It only tells an
//! optional [`Interest`] listener (the cluster bridge) when a room appears and disappears,
//! under the shard write lock, so those calls are ordered per room.

mod history;

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    num::NonZeroU64,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use roomcast_protocol::{EventName, Payload, Position, RoomName, ServerFrame};

pub use self::history::HistoryLimits;
use self::history::{DEDUP_KEYS_PER_ROOM, Dedup, History, Replay};
use crate::{
    cluster::Interest,
    conflation::KeyPath,
    outbox::{ConflationFrames, Outbox, PushError},
    wire::{Framing, Lane, Outgoing, Wire},
};

/// How the rooms of one namespace behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRule {
    /// Events may be dropped (oldest first) or sent as datagrams; never any history.
    pub volatile: bool,
    /// Recent events kept for recovery.
    pub history: HistoryLimits,
    /// How long a publish's idempotency key is remembered (zero: keys are ignored).
    pub dedup_window: Duration,
    /// Cluster mode with JetStream: `seq` and epoch come from the room's stream, the history
    /// and the idempotency keys live there (`history` and `dedup_window` configure the stream),
    /// and recoveries are answered by the bridge ([`Hub::take_recoveries`]).
    pub sequenced: bool,
    /// Where each event's conflation key is in its `data`: a subscriber that falls behind
    /// gets only the latest event per key (reliable rooms only; `None`: never conflated).
    pub conflate: Option<Arc<KeyPath>>,
}

impl RoomRule {
    /// Reliable, with the default history (256 events, 128 KiB, 5 minutes) and a 2-minute
    /// dedup window.
    pub const RELIABLE: RoomRule = RoomRule {
        volatile: false,
        history: HistoryLimits {
            events: 256,
            bytes: 128 * 1024,
            ttl: Duration::from_secs(300),
        },
        dedup_window: Duration::from_secs(120),
        sequenced: false,
        conflate: None,
    };

    /// Volatile: no history, no dedup.
    pub const VOLATILE: RoomRule = RoomRule {
        volatile: true,
        history: HistoryLimits::OFF,
        dedup_window: Duration::ZERO,
        sequenced: false,
        conflate: None,
    };
}

/// The rule of every namespace: a default plus exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRules {
    /// The rule of namespaces not listed.
    pub default: RoomRule,
    /// Rules by namespace.
    pub namespaces: HashMap<String, RoomRule>,
    /// Bytes all histories together may hold (each room keeps at least its newest event).
    pub history_budget: usize,
}

impl Default for RoomRules {
    fn default() -> Self {
        RoomRules {
            default: RoomRule::RELIABLE,
            namespaces: HashMap::new(),
            history_budget: 256 << 20,
        }
    }
}

impl RoomRules {
    /// The default rules with `namespaces` volatile.
    pub fn with_volatile(namespaces: impl IntoIterator<Item = String>) -> Self {
        let mut rules = RoomRules::default();
        for ns in namespaces {
            rules.namespaces.insert(ns, RoomRule::VOLATILE);
        }
        rules
    }

    /// The rule of `room`'s namespace.
    pub fn rule(&self, room: &RoomName) -> &RoomRule {
        self.namespaces
            .get(room.namespace())
            .unwrap_or(&self.default)
    }

    /// Whether some namespace conflates.
    fn any_conflation(&self) -> bool {
        self.default.conflate.is_some() || self.namespaces.values().any(|r| r.conflate.is_some())
    }
}

/// What a subscription started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The position the following events continue from.
    pub position: Position,
    /// Whether the requested position was recovered (`None`: none was requested, or the reply
    /// waits until the room is live).
    pub recovered: Option<bool>,
}

/// Identifies a session inside this process.
pub type SessionKey = u64;

const SHARDS: usize = 64;

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// Sequence number given to the event, if the room had local subscribers.
    pub seq: Option<u64>,
    /// Outboxes the event was queued into.
    pub delivered: usize,
    /// Subscribers dropped because their outbox overflowed.
    pub slow: usize,
    /// The idempotency key was seen within the dedup window: nothing was delivered, `seq` is
    /// the earlier event's.
    pub duplicate: bool,
}

struct Subscriber {
    session: SessionKey,
    outbox: Arc<Outbox>,
    /// The request id (and requested position) of a `Subscribed` not sent yet: the room is not
    /// live (see [`Hub::mark_live`]); such a subscriber receives no event until it is.
    pending: Option<(u64, Option<Position>)>,
}

struct RoomState {
    /// Process-unique id of this room state (transports key per-room channels by it).
    id: u64,
    /// Events may be dropped (oldest first) or sent as datagrams.
    volatile: bool,
    /// `seq` and epoch come from the cluster ([`RoomRule::sequenced`]).
    sequenced: bool,
    /// The room conflates: its `Conflation` frames.
    conflation: Option<Box<ConflationFrames>>,
    /// Numbering of `seq`: random per room state, 0 when the room keeps no history.
    epoch: u64,
    seq: u64,
    /// The namespace keeps history: events are recorded in `history`.
    keeps_history: bool,
    /// Recent events, made on the first publish (boxed: an idle room carries a pointer).
    history: Option<Box<History>>,
    /// The namespace has a dedup window: keyed publishes are remembered in `dedup`.
    dedups: bool,
    /// Recent idempotency keys, made on the first keyed publish (boxed: most rooms never see
    /// a key, and every idle room would carry the empty table).
    dedup: Option<Box<Dedup>>,
    subscribers: Vec<Subscriber>,
    /// The interest listener was told of this room (`interest_on` without `interest_off`).
    interested: bool,
    /// Events reach this node: always in-process; in cluster mode once the bridge confirmed
    /// its subscription ([`Hub::mark_live`]). Until then `Subscribed` replies wait.
    live: bool,
}

type Shard = RwLock<HashMap<RoomName, Arc<Mutex<RoomState>>>>;

/// Sharded registry room → local subscribers.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    rooms: AtomicUsize,
    subscriptions: AtomicUsize,
    next_room_id: AtomicU64,
    /// How each namespace's rooms behave.
    rules: RoomRules,
    /// Bytes held by all room histories.
    history_bytes: Arc<AtomicUsize>,
    /// Told when a room gains its first and loses its last subscriber (cluster mode).
    interest: Option<Arc<dyn Interest>>,
    /// Some namespace conflates (else no publish looks for a key).
    conflation: bool,
    /// Events replaced in a subscriber's queue by a later one of the same conflation key.
    conflated: Counter,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// The `Subscribed` reply, on the room's opening lane.
fn subscribed(room: &RoomName, id: u64, start: Start, room_id: u64) -> Outgoing {
    Outgoing {
        frame: ServerFrame::Subscribed {
            id,
            room: room.clone(),
            seq: start.position.seq,
            epoch: start.position.epoch,
            recovered: start.recovered,
        }
        .encode()
        .into(),
        lane: Lane::RoomOpen(room_id),
    }
}

/// A fresh epoch: random, non-zero, below 2^53 (exact in every client's number type).
fn new_epoch() -> u64 {
    loop {
        let epoch = RandomState::new().hash_one(Instant::now()) & ((1 << 53) - 1);
        if epoch != 0 {
            return epoch;
        }
    }
}

impl RoomState {
    fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    /// How the room's events are encoded: volatile ones for datagrams, others for WebSocket.
    fn framing(&self) -> Framing {
        if self.volatile {
            Framing::Datagram
        } else {
            Framing::WebSocket
        }
    }

    /// Queues `Subscribed` (recovering from `since` when asked and possible) and any replay
    /// into `outbox`, under the room lock.
    fn answer(
        &self,
        room: &RoomName,
        id: u64,
        since: Option<Position>,
        outbox: &Outbox,
    ) -> Result<Start, PushError> {
        let replay = match since {
            Some(p) if self.keeps_history && p.epoch == self.epoch => {
                let found = match self.history.as_deref() {
                    Some(history) => history.after(p.seq, self.seq),
                    // Nothing recorded yet: only the current position is complete.
                    None if p.seq == self.seq => Replay::Complete(Vec::new()),
                    None => Replay::Gap,
                };
                match found {
                    // The replay must fit the queue with room to spare, or the session would
                    // be closed as slow in the middle of it.
                    Replay::Complete(frames)
                        if frames.iter().map(|f| f.len()).sum::<usize>()
                            <= outbox.free_bytes().saturating_sub(4096) =>
                    {
                        Some((p, frames))
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((from, frames)) = replay else {
            let start = Start {
                position: self.position(),
                recovered: since.map(|_| false),
            };
            outbox.push_to(subscribed(room, id, start, self.id))?;
            return Ok(start);
        };
        let start = Start {
            position: from,
            recovered: Some(true),
        };
        outbox.push_to(subscribed(room, id, start, self.id))?;
        for frame in frames {
            outbox.push_to(Outgoing {
                frame: frame.clone(),
                lane: Lane::Room(self.id),
            })?;
        }
        Ok(start)
    }
}

fn lock_room(room: &Mutex<RoomState>) -> std::sync::MutexGuard<'_, RoomState> {
    room.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// An empty hub with the default rules (every namespace reliable, with history).
    pub fn new() -> Self {
        Hub::with_rules(RoomRules::default(), None)
    }

    /// An empty hub whose rooms in `namespaces` are volatile: their events may travel as
    /// datagrams and are dropped oldest-first instead of closing a slow subscriber.
    pub fn with_volatile_namespaces(namespaces: Vec<String>) -> Self {
        Hub::with_rules(RoomRules::with_volatile(namespaces), None)
    }

    /// An empty hub with `rules`, telling `interest` (if any) when a room gets its first
    /// subscriber and when it is dropped.
    pub fn with_rules(rules: RoomRules, interest: Option<Arc<dyn Interest>>) -> Self {
        Hub {
            conflation: rules.any_conflation(),
            conflated: Counter::default(),
            rules,
            history_bytes: Arc::new(AtomicUsize::new(0)),
            interest,
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            rooms: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            next_room_id: AtomicU64::new(1),
        }
    }

    /// Counts the events replaced by conflation in `counter` (a metric) from now on.
    pub fn count_conflated_in(mut self, counter: Counter) -> Self {
        self.conflated = counter;
        self
    }

    /// Events replaced so far in subscribers' queues by a later event of the same
    /// conflation key.
    pub fn conflated(&self) -> u64 {
        self.conflated.get()
    }

    /// The hashed conflation key of an event of `room` with `data`, if its namespace
    /// conflates and `data` holds the key. Keyed hashing (SipHash with this hub's random
    /// keys): publishers cannot aim collisions at each other's keys.
    fn conflation_key(&self, room: &RoomName, data: &Payload) -> Option<NonZeroU64> {
        if !self.conflation {
            return None;
        }
        let raw = self
            .rules
            .rule(room)
            .conflate
            .as_ref()?
            .locate(data.as_bytes())?;
        Some(NonZeroU64::new(self.hasher.hash_one(raw)).unwrap_or(NonZeroU64::MIN))
    }

    /// Whether events of `room` are volatile.
    pub fn is_volatile(&self, room: &RoomName) -> bool {
        self.rules.rule(room).volatile
    }

    fn new_room(&self, room: &RoomName, live: bool) -> RoomState {
        let rule = self.rules.rule(room);
        let local = !rule.volatile && !rule.sequenced;
        let keeps_history = local && rule.history.is_on();
        let dedups = local && !rule.dedup_window.is_zero();
        let conflation = (!rule.volatile && rule.conflate.is_some()).then(|| {
            let frame = |active| {
                ServerFrame::Conflation {
                    room: room.clone(),
                    active,
                }
                .encode()
            };
            ConflationFrames {
                on: frame(true),
                off: frame(false),
            }
        });
        RoomState {
            id: self.next_room_id.fetch_add(1, Ordering::Relaxed),
            volatile: rule.volatile,
            sequenced: rule.sequenced && !rule.volatile,
            conflation: conflation.map(Box::new),
            epoch: if keeps_history { new_epoch() } else { 0 },
            seq: 0,
            keeps_history,
            history: None,
            dedups,
            dedup: None,
            subscribers: Vec::new(),
            interested: false,
            live,
        }
    }

    fn shard(&self, room: &RoomName) -> &Shard {
        let index = self.hasher.hash_one(room) as usize % SHARDS;
        &self.shards[index]
    }

    /// Adds `session` to `room` (idempotent) and queues `Subscribed` into its outbox, ordered
    /// before any later event of the room. With `since`, and when the room's history holds
    /// every event after it (same epoch, nothing expired, and the replay fits the outbox), the
    /// reply says `recovered: true` and those events follow it at once; otherwise
    /// `recovered: false` and the current position.
    ///
    /// When the interest listener confirms subscriptions ([`Interest::confirms_live`], cluster
    /// mode) a new room is not live yet: the reply waits for [`Hub::mark_live`], so a client
    /// never holds a `Subscribed` for a room whose events cannot reach this node yet.
    pub fn subscribe(
        &self,
        room: &RoomName,
        session: SessionKey,
        outbox: &Arc<Outbox>,
        id: u64,
        since: Option<Position>,
    ) -> Result<Start, PushError> {
        let mut shard = self.shard(room).write().unwrap_or_else(|e| e.into_inner());
        let state = shard.entry(room.clone()).or_insert_with(|| {
            self.rooms.fetch_add(1, Ordering::Relaxed);
            Arc::new(Mutex::new(self.new_room(room, true)))
        });
        let mut state = lock_room(state);
        if !state.interested {
            // The room's first subscriber (maybe of a room kept only for its history).
            if let Some(interest) = &self.interest {
                interest.interest_on(room);
                state.interested = true;
                if interest.confirms_live() {
                    state.live = false;
                }
            }
        }
        let live = state.live;
        let mut start = Start {
            position: state.position(),
            recovered: None,
        };
        // A stream's history is read by the bridge: such a recovery waits for it.
        let by_bridge = state.sequenced && since.is_some();
        match state.subscribers.iter_mut().find(|s| s.session == session) {
            // Not answered yet: the newest request gets the reply.
            Some(existing) if existing.pending.is_some() => {
                existing.pending = Some((id, since));
            }
            Some(_) if !by_bridge => {
                if live {
                    start = state.answer(room, id, since, outbox)?;
                }
                return Ok(start);
            }
            Some(existing) => existing.pending = Some((id, since)),
            None => {
                self.subscriptions.fetch_add(1, Ordering::Relaxed);
                // Many rooms have one subscriber (a device's, a user's): the first slot alone
                // rather than four; later pushes grow as usual.
                if state.subscribers.capacity() == 0 {
                    state.subscribers.reserve_exact(1);
                }
                state.subscribers.push(Subscriber {
                    session,
                    outbox: outbox.clone(),
                    pending: (!live || by_bridge).then_some((id, since)),
                });
                if live && !by_bridge {
                    start = state.answer(room, id, since, outbox)?;
                }
            }
        }
        if by_bridge {
            if let Some(interest) = &self.interest {
                interest.recovery_requested(room);
            }
        }
        Ok(start)
    }

    /// The bridge's subscription for `room` is live: sends the waiting `Subscribed` replies
    /// (with the room's current seq) and lets events reach their sessions. No-op for a room
    /// that is gone or already live.
    pub fn mark_live(&self, room: &RoomName) {
        self.mark_live_inner(room, None);
    }

    /// [`Hub::mark_live`] for a sequenced room, whose stream says where it stands: the room
    /// takes `position` (its epoch, and the seq its next event follows) unless it is live
    /// already. Subscribers waiting to recover stay waiting ([`Hub::take_recoveries`]).
    pub fn mark_live_at(&self, room: &RoomName, position: Position) {
        self.mark_live_inner(room, Some(position));
    }

    fn mark_live_inner(&self, room: &RoomName, position: Option<Position>) {
        let state = {
            let shard = self.shard(room).read().unwrap_or_else(|e| e.into_inner());
            match shard.get(room) {
                Some(state) => state.clone(),
                None => return,
            }
        };
        let mut state = lock_room(&state);
        if state.live {
            return;
        }
        state.live = true;
        if let Some(position) = position {
            state.epoch = position.epoch;
            state.seq = state.seq.max(position.seq);
        }
        let sequenced = state.sequenced;
        let waiting: Vec<_> = state
            .subscribers
            .iter_mut()
            .filter(|s| !(sequenced && matches!(s.pending, Some((_, Some(_))))))
            .filter_map(|s| s.pending.take().map(|p| (s.outbox.clone(), p)))
            .collect();
        for (outbox, (id, since)) in waiting {
            // A full or closed outbox ends that session anyway; nothing else to do here.
            let _ = state.answer(room, id, since, &outbox);
        }
    }

    /// Removes `session` from `room`; when `reply_id` is given, queues `Unsubscribed` under the
    /// room lock so no event of the room follows it. Drops the room once it is empty.
    pub fn unsubscribe(
        &self,
        room: &RoomName,
        session: SessionKey,
        outbox: &Outbox,
        reply_id: Option<u64>,
    ) -> Result<(), PushError> {
        let mut shard = self.shard(room).write().unwrap_or_else(|e| e.into_inner());
        let mut empty = false;
        let mut result = Ok(());
        if let Some(state) = shard.get(room) {
            let mut state = lock_room(state);
            let before = state.subscribers.len();
            let mut unanswered = None;
            state.subscribers.retain(|s| {
                if s.session == session {
                    unanswered = s.pending;
                    false
                } else {
                    true
                }
            });
            self.subscriptions
                .fetch_sub(before - state.subscribers.len(), Ordering::Relaxed);
            if state.interested && state.subscribers.is_empty() {
                if let Some(interest) = &self.interest {
                    interest.interest_off(room);
                }
                state.interested = false;
            }
            // A room with history outlives its last subscriber until the history expires.
            empty = state.subscribers.is_empty() && !state.keeps_history;
            if let (Some((subscribe_id, _)), Some(_)) = (unanswered, reply_id) {
                // Left before the room went live: the Subscribe still gets its answer first.
                let start = Start {
                    position: state.position(),
                    recovered: None,
                };
                result = outbox.push_to(subscribed(room, subscribe_id, start, state.id));
            }
            if let (Some(id), Ok(())) = (reply_id, &result) {
                // Under the room lock: no event of the room can follow it.
                result = outbox.push_to(Outgoing {
                    frame: ServerFrame::Unsubscribed {
                        id,
                        room: room.clone(),
                    }
                    .encode()
                    .into(),
                    lane: Lane::RoomClose(state.id),
                });
            }
        } else if let Some(id) = reply_id {
            // The room is gone (its last subscriber was dropped as slow): nothing to order
            // against, the reply goes on the control lane.
            result = outbox.push(
                ServerFrame::Unsubscribed {
                    id,
                    room: room.clone(),
                }
                .encode(),
            );
        }
        if empty && shard.remove(room).is_some() {
            self.rooms.fetch_sub(1, Ordering::Relaxed);
        }
        result
    }

    /// Drops expired history and idempotency keys, and rooms left with neither a subscriber
    /// nor history. Call every second or so. Returns the rooms dropped.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|e| e.into_inner());
            shard.retain(|room, state| {
                let mut state = lock_room(state);
                let history_empty = state.history.as_mut().is_none_or(|h| h.expire(now));
                if let Some(dedup) = &mut state.dedup {
                    dedup.expire(now);
                }
                let keep = !state.subscribers.is_empty() || !history_empty;
                if !keep {
                    dropped += 1;
                    if state.interested {
                        if let Some(interest) = &self.interest {
                            interest.interest_off(room);
                        }
                    }
                }
                keep
            });
        }
        self.rooms.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// Bytes held by all room histories.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }

    /// Publishes an event to the room's local subscribers: one encode, one shared `Bytes`,
    /// recorded in the room's history when it keeps one. With an idempotency `key` seen in
    /// the room within its dedup window, nothing happens (`Delivery::duplicate`).
    pub fn publish(
        &self,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
    ) -> Delivery {
        let Some(state) = self.room(room) else {
            return Delivery::default();
        };
        let conflation_key = self.conflation_key(room, data);
        let mut state = lock_room(&state);
        let now = Instant::now();
        if let (Some(key), Some(dedup)) = (key, &mut state.dedup) {
            if let Some(seq) = dedup.get(key, now) {
                return Delivery {
                    seq: Some(seq),
                    duplicate: true,
                    ..Delivery::default()
                };
            }
        }
        state.seq += 1;
        let seq = state.seq;
        let frame = Wire::event(state.framing(), room, event, data, seq, None);
        if state.keeps_history {
            let history = state.history.get_or_insert_with(|| {
                Box::new(History::new(
                    self.rules.rule(room).history,
                    self.history_bytes.clone(),
                    self.rules.history_budget,
                ))
            });
            history.record(seq, frame.clone(), now);
        }
        if let Some(key) = key.filter(|_| state.dedups) {
            let window = self.rules.rule(room).dedup_window;
            state
                .dedup
                .get_or_insert_with(|| Box::new(Dedup::new(window, DEDUP_KEYS_PER_ROOM)))
                .insert(key, seq, now);
        }
        self.fan_out(&mut state, frame, seq, conflation_key)
    }

    /// Publishes an event of a sequenced room, numbered by its stream: `position` is the
    /// event's. An event at or before the room's current seq was delivered already and is
    /// dropped (`Delivery::duplicate`). Events of a room must be handed over by one task, in
    /// stream order.
    pub fn publish_sequenced(
        &self,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        position: Position,
    ) -> Delivery {
        let Some(state) = self.room(room) else {
            return Delivery::default();
        };
        let conflation_key = self.conflation_key(room, data);
        let mut state = lock_room(&state);
        if position.epoch == state.epoch && position.seq <= state.seq {
            return Delivery {
                seq: Some(position.seq),
                duplicate: true,
                ..Delivery::default()
            };
        }
        // A new epoch (the stream was recreated) is announced on the event itself.
        let epoch = (position.epoch != state.epoch).then_some(position.epoch);
        state.epoch = position.epoch;
        state.seq = position.seq;
        let frame = Wire::event(state.framing(), room, event, data, position.seq, epoch);
        self.fan_out(&mut state, frame, position.seq, conflation_key)
    }

    /// Queues `frame` (the event `seq`, with conflation key `key` if any) to every answered
    /// subscriber of the locked room.
    fn fan_out(
        &self,
        state: &mut RoomState,
        frame: Wire,
        seq: u64,
        key: Option<NonZeroU64>,
    ) -> Delivery {
        let lane = if state.volatile {
            Lane::Volatile(state.id)
        } else {
            Lane::Room(state.id)
        };
        let conflation = key.zip(state.conflation.as_deref());
        let mut replaced = 0;
        let before = state.subscribers.len();
        let mut delivery = Delivery {
            seq: Some(seq),
            ..Delivery::default()
        };
        // Subscribers that are slow or gone, by index (ascending); removed after the loop.
        let mut dropped: Vec<usize> = Vec::new();
        for (index, s) in state.subscribers.iter().enumerate() {
            if s.pending.is_some() {
                continue;
            }
            let pushed = match conflation {
                Some((key, frames)) => {
                    let item = Outgoing {
                        frame: frame.clone(),
                        lane,
                    };
                    s.outbox.push_conflatable(item, key, frames).map(|r| {
                        replaced += u64::from(r);
                    })
                }
                None => s.outbox.push_shared(&frame, lane),
            };
            match pushed {
                Ok(()) => delivery.delivered += 1,
                Err(PushError::Full) => {
                    delivery.slow += 1;
                    dropped.push(index);
                }
                Err(PushError::Closed) => dropped.push(index),
            }
        }
        if !dropped.is_empty() {
            let mut index = 0;
            state.subscribers.retain(|_| {
                let keep = dropped.binary_search(&index).is_err();
                index += 1;
                keep
            });
        }
        let removed = before - state.subscribers.len();
        if removed > 0 {
            self.subscriptions.fetch_sub(removed, Ordering::Relaxed);
        }
        if replaced > 0 {
            self.conflated.inc_by(replaced);
        }
        delivery
    }

    /// Sequenced rooms: the subscribers of a live `room` waiting to recover, with the position
    /// each asked for. The bridge answers each with [`Hub::answer_recovery`].
    pub fn take_recoveries(&self, room: &RoomName) -> Vec<(SessionKey, Position)> {
        let Some(state) = self.room(room) else {
            return Vec::new();
        };
        let state = lock_room(&state);
        if !state.live {
            return Vec::new();
        }
        state
            .subscribers
            .iter()
            .filter_map(|s| match s.pending {
                Some((_, Some(since))) => Some((s.session, since)),
                _ => None,
            })
            .collect()
    }

    /// Answers `session`'s waiting recovery in a sequenced room: `Some(events)` (every event
    /// after its `since` up to the room's current seq, in order, as read from the stream)
    /// recovers it when they fit its outbox; `None` answers `recovered: false` with the room's
    /// current position. Call from the task that delivers the room's events, so none falls
    /// between the replay and the live events.
    pub fn answer_recovery(
        &self,
        room: &RoomName,
        session: SessionKey,
        replay: Option<Vec<(u64, EventName, Payload)>>,
    ) {
        let Some(state) = self.room(room) else {
            return;
        };
        let mut state = lock_room(&state);
        let (room_id, current) = (state.id, state.position());
        let Some(subscriber) = state.subscribers.iter_mut().find(|s| s.session == session) else {
            return;
        };
        let Some((id, Some(since))) = subscriber.pending else {
            return;
        };
        subscriber.pending = None;
        let outbox = subscriber.outbox.clone();
        let frames: Option<Vec<Wire>> = replay.map(|events| {
            events
                .iter()
                .filter(|(seq, ..)| *seq > since.seq && *seq <= current.seq)
                .map(|(seq, event, data)| {
                    Wire::event(Framing::WebSocket, room, event, data, *seq, None)
                })
                .collect()
        });
        let fits = |frames: &Vec<Wire>| {
            frames.iter().map(|f| f.len()).sum::<usize>()
                <= outbox.free_bytes().saturating_sub(4096)
        };
        // A full or closed outbox ends that session anyway: nothing else to do on errors.
        match frames {
            Some(frames) if since.epoch == current.epoch && fits(&frames) => {
                let start = Start {
                    position: since,
                    recovered: Some(true),
                };
                let _ = outbox.push_to(subscribed(room, id, start, room_id));
                for frame in frames {
                    let _ = outbox.push_to(Outgoing {
                        frame,
                        lane: Lane::Room(room_id),
                    });
                }
            }
            _ => {
                let start = Start {
                    position: current,
                    recovered: Some(false),
                };
                let _ = outbox.push_to(subscribed(room, id, start, room_id));
            }
        }
    }

    fn room(&self, room: &RoomName) -> Option<Arc<Mutex<RoomState>>> {
        let shard = self.shard(room).read().unwrap_or_else(|e| e.into_inner());
        shard.get(room).cloned()
    }

    /// The rule of `room`'s namespace.
    pub fn rule(&self, room: &RoomName) -> &RoomRule {
        self.rules.rule(room)
    }

    /// Rooms in the registry: rooms with a local subscriber, plus rooms whose last subscriber
    /// was dropped as slow until its session has cleaned up.
    pub fn room_count(&self) -> usize {
        self.rooms.load(Ordering::Relaxed)
    }

    /// Session × room subscriptions in the registry.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_protocol::PayloadLimits;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn decode(frame: &[u8]) -> ServerFrame {
        ServerFrame::decode(frame, PayloadLimits::default()).unwrap()
    }

    /// Rules of cluster mode: reliable rooms without history of their own.
    fn no_history() -> RoomRules {
        RoomRules {
            default: RoomRule {
                history: HistoryLimits::OFF,
                ..RoomRule::RELIABLE
            },
            ..RoomRules::default()
        }
    }

    fn seqs(frames: &[ServerFrame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect()
    }

    fn publish_n(hub: &Hub, r: &RoomName, n: u64) {
        let event = EventName::new("e").unwrap();
        for i in 0..n {
            hub.publish(r, &event, &Payload::encode(&i).unwrap(), None);
        }
    }

    #[test]
    fn recovery_replays_what_was_missed_then_goes_live_without_gap_or_duplicate() {
        let hub = Hub::new();
        let r = room("orders:1");
        let a = Arc::new(Outbox::new(1 << 20));
        let start = hub.subscribe(&r, 1, &a, 1, None).unwrap();
        assert_ne!(start.position.epoch, 0, "a room with history has an epoch");
        assert_eq!((start.position.seq, start.recovered), (0, None));
        publish_n(&hub, &r, 3);
        let seen = drain(&a);
        assert_eq!(seqs(&seen), [1, 2, 3]);
        let held = Position {
            epoch: start.position.epoch,
            seq: 3,
        };
        // The client goes away; the room (its only subscriber gone) keeps its history.
        hub.unsubscribe(&r, 1, &a, None).unwrap();
        assert_eq!(hub.room_count(), 1);
        publish_n(&hub, &r, 4); // 4..=7 while away
        let b = Arc::new(Outbox::new(1 << 20));
        let start = hub.subscribe(&r, 2, &b, 9, Some(held)).unwrap();
        assert_eq!(start.recovered, Some(true));
        assert_eq!(start.position, held);
        publish_n(&hub, &r, 1); // 8, live
        let frames = drain(&b);
        assert!(matches!(
            frames[0],
            ServerFrame::Subscribed { id: 9, seq: 3, recovered: Some(true), epoch, .. }
                if epoch == held.epoch
        ));
        assert_eq!(seqs(&frames), [4, 5, 6, 7, 8]);
    }

    #[test]
    fn unrecoverable_positions_say_recovered_false_with_the_current_position() {
        let rules = RoomRules {
            default: RoomRule {
                history: HistoryLimits {
                    events: 2,
                    ..RoomRule::RELIABLE.history
                },
                ..RoomRule::RELIABLE
            },
            ..RoomRules::default()
        };
        let hub = Hub::with_rules(rules, None);
        let r = room("orders:1");
        let a = Arc::new(Outbox::new(1 << 20));
        let epoch = hub.subscribe(&r, 1, &a, 1, None).unwrap().position.epoch;
        publish_n(&hub, &r, 5); // history holds 4, 5
        let cases = [
            (Position { epoch, seq: 1 }, "too old"),
            (
                Position {
                    epoch: epoch ^ 1,
                    seq: 5,
                },
                "another epoch",
            ),
            (Position { epoch, seq: 9 }, "beyond the room's last event"),
            (Position { epoch: 0, seq: 0 }, "epoch 0"),
        ];
        for (i, (since, why)) in cases.into_iter().enumerate() {
            let o = Arc::new(Outbox::new(1 << 20));
            let start = hub
                .subscribe(&r, 10 + i as u64, &o, 1, Some(since))
                .unwrap();
            assert_eq!(start.recovered, Some(false), "{why}");
            assert_eq!(start.position, Position { epoch, seq: 5 }, "{why}");
            assert!(seqs(&drain(&o)).is_empty(), "{why}: nothing replayed");
        }
        // Holding exactly the oldest kept event's predecessor still recovers.
        let o = Arc::new(Outbox::new(1 << 20));
        let start = hub
            .subscribe(&r, 20, &o, 1, Some(Position { epoch, seq: 3 }))
            .unwrap();
        assert_eq!(start.recovered, Some(true));
        assert_eq!(seqs(&drain(&o)), [4, 5]);
        // A replay that would not fit the subscriber's queue is refused, not half-sent.
        let small = Arc::new(Outbox::new(4096 + 10));
        let start = hub
            .subscribe(&r, 21, &small, 1, Some(Position { epoch, seq: 3 }))
            .unwrap();
        assert_eq!(start.recovered, Some(false));
        assert!(!small.is_overflowed());
    }

    #[test]
    fn a_repeated_idempotency_key_is_delivered_once() {
        let hub = Hub::new();
        let r = room("orders:1");
        let a = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &a, 1, None).unwrap();
        let event = EventName::new("e").unwrap();
        let data = Payload::encode(&1).unwrap();
        let first = hub.publish(&r, &event, &data, Some("k1"));
        let again = hub.publish(&r, &event, &data, Some("k1"));
        let other = hub.publish(&r, &event, &data, Some("k2"));
        assert_eq!(
            (first.seq, first.duplicate, first.delivered),
            (Some(1), false, 1)
        );
        assert_eq!(
            (again.seq, again.duplicate, again.delivered),
            (Some(1), true, 0)
        );
        assert_eq!((other.seq, other.duplicate), (Some(2), false));
        assert_eq!(seqs(&drain(&a)), [1, 2]);
    }

    #[test]
    fn sweep_drops_history_only_rooms_once_their_history_expired() {
        let recorder = Arc::new(Recorder::default());
        let hub = Hub::with_rules(RoomRules::default(), Some(recorder.clone()));
        let r = room("orders:1");
        let a = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &a, 1, None).unwrap();
        publish_n(&hub, &r, 2);
        hub.unsubscribe(&r, 1, &a, None).unwrap();
        assert!(hub.history_bytes() > 0);
        let now = Instant::now();
        assert_eq!(hub.sweep(now), 0, "history still young");
        assert_eq!(hub.room_count(), 1);
        let later = now + RoomRule::RELIABLE.history.ttl + Duration::from_secs(1);
        assert_eq!(hub.sweep(later), 1);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.history_bytes(), 0, "the budget is given back");
        // Interest went off when the last subscriber left, once.
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("orders:1".to_string(), true),
                ("orders:1".to_string(), false)
            ]
        );
        // A publish to a room with no state records nothing (nobody can hold its epoch).
        publish_n(&hub, &r, 1);
        assert_eq!(hub.room_count(), 0);
    }

    fn drain(outbox: &Outbox) -> Vec<ServerFrame> {
        let mut batch = Vec::new();
        outbox.drain_into(&mut batch);
        batch.iter().map(|o| decode(&o.frame)).collect()
    }

    #[test]
    fn fan_out_shares_one_encoding_in_seq_order() {
        let hub = Hub::new();
        let r = room("orders:1");
        let outboxes: Vec<_> = (0..3).map(|_| Arc::new(Outbox::new(1 << 20))).collect();
        for (i, o) in outboxes.iter().enumerate() {
            assert_eq!(
                hub.subscribe(&r, i as u64, o, 1, None)
                    .map(|s| s.position.seq),
                Ok(0)
            );
        }
        let event = EventName::new("e").unwrap();
        for n in 0..5u32 {
            let d = hub.publish(&r, &event, &Payload::encode(&n).unwrap(), None);
            assert_eq!(d.seq, Some(u64::from(n) + 1));
            assert_eq!(d.delivered, 3);
        }
        let mut batches = Vec::new();
        for o in &outboxes {
            let mut b = Vec::new();
            o.drain_into(&mut b);
            batches.push(b);
        }
        // Every subscriber got Subscribed then events 1..=5, and the event frames are the very
        // same allocation.
        for b in &batches {
            assert_eq!(b.len(), 6);
            assert!(matches!(
                decode(&b[0].frame),
                ServerFrame::Subscribed { seq: 0, .. }
            ));
            assert!(matches!(b[0].lane, Lane::RoomOpen(_)));
            for (i, f) in b[1..].iter().enumerate() {
                assert!(matches!(f.lane, Lane::Room(_)));
                match decode(&f.frame) {
                    ServerFrame::Event(e) => assert_eq!(e.seq, i as u64 + 1),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(batches[0][1].frame.as_ptr(), batches[2][1].frame.as_ptr());
    }

    #[test]
    fn volatile_namespaces_put_events_on_the_volatile_lane() {
        let hub = Hub::with_volatile_namespaces(vec!["gps".into()]);
        let o = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&room("gps:truck-1"), 1, &o, 1, None).unwrap();
        hub.subscribe(&room("orders:1"), 1, &o, 2, None).unwrap();
        let event = EventName::new("e").unwrap();
        hub.publish(
            &room("gps:truck-1"),
            &event,
            &Payload::encode(&1).unwrap(),
            None,
        );
        hub.publish(
            &room("orders:1"),
            &event,
            &Payload::encode(&2).unwrap(),
            None,
        );
        let mut batch = Vec::new();
        o.drain_into(&mut batch);
        assert!(matches!(batch[2].lane, Lane::Volatile(_)));
        assert!(matches!(batch[3].lane, Lane::Room(_)));
    }

    #[test]
    fn unsubscribe_stops_delivery_and_drops_empty_rooms() {
        let hub = Hub::with_rules(no_history(), None);
        let r = room("a:b");
        let o = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &o, 1, None).unwrap();
        hub.subscribe(&r, 1, &o, 2, None).unwrap(); // idempotent
        assert_eq!(hub.room_count(), 1);
        let event = EventName::new("e").unwrap();
        assert_eq!(
            hub.publish(&r, &event, &Payload::encode(&1).unwrap(), None)
                .delivered,
            1
        );
        assert_eq!(hub.subscription_count(), 1);
        hub.unsubscribe(&r, 1, &o, Some(3)).unwrap();
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.subscription_count(), 0);
        let d = hub.publish(&r, &event, &Payload::encode(&2).unwrap(), None);
        assert_eq!(d, Delivery::default());
        let frames = drain(&o);
        assert_eq!(frames.len(), 4);
        assert!(matches!(frames[3], ServerFrame::Unsubscribed { id: 3, .. }));
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, bool)>>);

    impl Interest for Recorder {
        fn interest_on(&self, room: &RoomName) {
            self.0.lock().unwrap().push((room.to_string(), true));
        }
        fn interest_off(&self, room: &RoomName) {
            self.0.lock().unwrap().push((room.to_string(), false));
        }
    }

    /// An interest listener that confirms rooms (as the NATS bridge does).
    struct Confirming;

    impl Interest for Confirming {
        fn interest_on(&self, _room: &RoomName) {}
        fn interest_off(&self, _room: &RoomName) {}
        fn confirms_live(&self) -> bool {
            true
        }
    }

    #[test]
    fn subscribed_waits_until_the_room_is_live_and_no_event_comes_before_it() {
        let hub = Hub::with_rules(no_history(), Some(Arc::new(Confirming)));
        let r = room("orders:1");
        let (a, b) = (
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
        );
        assert_eq!(
            hub.subscribe(&r, 1, &a, 7, None).map(|s| s.position.seq),
            Ok(0)
        );
        // A second Subscribe while waiting: the newest request id gets the reply.
        assert_eq!(
            hub.subscribe(&r, 1, &a, 8, None).map(|s| s.position.seq),
            Ok(0)
        );
        assert_eq!(hub.subscription_count(), 1);
        assert!(
            drain(&a).is_empty(),
            "no Subscribed before the room is live"
        );
        // An event reaching the node before the confirmation (a lingering subscription) is
        // counted but reaches nobody waiting.
        let event = EventName::new("e").unwrap();
        let d = hub.publish(&r, &event, &Payload::encode(&1).unwrap(), None);
        assert_eq!((d.seq, d.delivered), (Some(1), 0));
        assert_eq!(hub.subscription_count(), 1, "waiting subscribers stay");
        hub.mark_live(&r);
        assert_eq!(
            drain(&a),
            vec![ServerFrame::Subscribed {
                epoch: 0,
                recovered: None,
                id: 8,
                room: r.clone(),
                seq: 1
            }]
        );
        hub.mark_live(&r);
        assert!(
            drain(&a).is_empty(),
            "marking a live room again sends nothing"
        );
        // Live now: a new subscriber is answered at once; events reach both.
        assert_eq!(
            hub.subscribe(&r, 2, &b, 1, None).map(|s| s.position.seq),
            Ok(1)
        );
        hub.publish(&r, &event, &Payload::encode(&2).unwrap(), None);
        for outbox in [&a, &b] {
            let frames = drain(outbox);
            let last = frames.last().unwrap();
            assert!(
                matches!(last, ServerFrame::Event(e) if e.seq == 2),
                "{frames:?}"
            );
        }
    }

    #[test]
    fn leaving_before_the_room_is_live_answers_subscribe_then_unsubscribe() {
        let hub = Hub::with_rules(no_history(), Some(Arc::new(Confirming)));
        let r = room("orders:1");
        let a = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &a, 3, None).unwrap();
        hub.unsubscribe(&r, 1, &a, Some(4)).unwrap();
        assert_eq!(
            drain(&a),
            vec![
                ServerFrame::Subscribed {
                    epoch: 0,
                    recovered: None,
                    id: 3,
                    room: r.clone(),
                    seq: 0
                },
                ServerFrame::Unsubscribed { id: 4, room: r },
            ]
        );
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn interest_follows_first_and_last_subscriber() {
        let recorder = Arc::new(Recorder::default());
        let hub = Hub::with_rules(no_history(), Some(recorder.clone()));
        let (a, b) = (room("a:1"), room("b:1"));
        let o1 = Arc::new(Outbox::new(1 << 20));
        let o2 = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&a, 1, &o1, 1, None).unwrap();
        hub.subscribe(&a, 2, &o2, 1, None).unwrap();
        hub.subscribe(&a, 1, &o1, 2, None).unwrap(); // again: no new interest
        hub.subscribe(&b, 1, &o1, 3, None).unwrap();
        hub.unsubscribe(&a, 1, &o1, None).unwrap();
        hub.unsubscribe(&a, 2, &o2, None).unwrap();
        hub.unsubscribe(&a, 2, &o2, None).unwrap(); // room already gone: nothing more
        hub.subscribe(&a, 2, &o2, 4, None).unwrap();
        let seen = recorder.0.lock().unwrap().clone();
        let want = [("a:1", true), ("b:1", true), ("a:1", false), ("a:1", true)];
        let want: Vec<_> = want.iter().map(|(r, on)| (r.to_string(), *on)).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn slow_subscriber_is_dropped_others_keep_receiving() {
        let hub = Hub::new();
        let r = room("a:b");
        let slow = Arc::new(Outbox::new(200));
        let fast = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &slow, 1, None).unwrap();
        hub.subscribe(&r, 2, &fast, 1, None).unwrap();
        let event = EventName::new("e").unwrap();
        let data = Payload::encode(&vec![7u8; 64]).unwrap();
        let mut slow_seen = 0;
        for _ in 0..10 {
            slow_seen += hub.publish(&r, &event, &data, None).slow;
        }
        assert_eq!(slow_seen, 1, "the slow subscriber is dropped once");
        assert_eq!(hub.subscription_count(), 1);
        assert!(slow.is_overflowed());
        assert_eq!(drain(&fast).len(), 11);
    }

    /// Rules where namespace `px` conflates by `data.id` (and `gps` is volatile).
    fn conflating() -> RoomRules {
        let mut rules = RoomRules::with_volatile(["gps".to_owned()]);
        rules.namespaces.insert(
            "px".into(),
            RoomRule {
                conflate: Some(Arc::new(KeyPath::parse("id").unwrap())),
                ..RoomRule::RELIABLE
            },
        );
        rules
    }

    fn tick(id: Option<&str>, n: u64) -> Payload {
        match id {
            Some(id) => Payload::encode(&serde_json::json!({ "id": id, "n": n })).unwrap(),
            None => Payload::encode(&serde_json::json!({ "n": n })).unwrap(),
        }
    }

    #[test]
    fn a_slow_subscriber_of_a_conflating_room_gets_the_latest_per_key_others_everything() {
        let counter = Counter::default();
        let hub = Hub::with_rules(conflating(), None).count_conflated_in(counter.clone());
        let r = room("px:fx");
        let slow = Arc::new(Outbox::new(2000));
        let fast = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &slow, 1, None).unwrap();
        hub.subscribe(&r, 2, &fast, 1, None).unwrap();
        let event = EventName::new("px").unwrap();
        let keys = ["EURUSD", "USDJPY", "GBPUSD"];
        for n in 1..=3000 {
            // A few events have no key: never replaced.
            let id = (n % 500 != 0).then(|| keys[n as usize % 3]);
            let delivery = hub.publish(&r, &event, &tick(id, n), None);
            assert_eq!((delivery.delivered, delivery.slow), (2, 0));
            assert!(slow.queued_bytes() <= 2000);
        }
        assert_eq!(seqs(&drain(&fast)).len(), 3000);
        let frames = drain(&slow);
        let on = frames
            .iter()
            .position(|f| {
                *f == ServerFrame::Conflation {
                    room: r.clone(),
                    active: true,
                }
            })
            .expect("told it is conflated");
        assert_eq!(
            frames.last(),
            Some(&ServerFrame::Conflation {
                room: r.clone(),
                active: false
            })
        );
        let before = seqs(&frames[..on]);
        assert_eq!(before, (1..=before.len() as u64).collect::<Vec<_>>());
        let after = seqs(&frames[on..]);
        assert!(after.is_sorted());
        // After the marker: the latest event of each key...
        for key in keys {
            let last = (1..=3000u64)
                .rev()
                .find(|n| n % 500 != 0 && keys[*n as usize % 3] == key)
                .unwrap();
            assert!(after.contains(&last), "{key}: {last} in {after:?}");
        }
        // ...and no superseded one of a key, while events without the key are never replaced.
        let keyed: Vec<_> = after.iter().filter(|n| *n % 500 != 0).collect();
        assert_eq!(keyed.len(), 3, "{after:?}");
        assert!(after.iter().filter(|n| *n % 500 == 0).count() > 0);
        assert_eq!(
            hub.conflated(),
            counter.get(),
            "the metric counts the replacements"
        );
        // Every event was queued, or replaced by a later one of its key.
        assert_eq!(counter.get() as usize + before.len() + after.len(), 3000);
    }

    #[test]
    fn only_reliable_rooms_of_conflating_namespaces_conflate() {
        let hub = Hub::with_rules(conflating(), None);
        let event = EventName::new("px").unwrap();
        for name in ["orders:1", "gps:1", "px:1"] {
            let r = room(name);
            let o = Arc::new(Outbox::new(400));
            hub.subscribe(&r, 1, &o, 1, None).unwrap();
            let mut slow = 0;
            for n in 1..=100 {
                slow += hub.publish(&r, &event, &tick(Some("k"), n), None).slow;
            }
            let frames = if o.is_overflowed() {
                Vec::new()
            } else {
                drain(&o)
            };
            match name {
                // Reliable without conflation: closed as slow.
                "orders:1" => assert_eq!(slow, 1),
                // Volatile: the oldest dropped, no Conflation frame.
                "gps:1" => {
                    assert_eq!(slow, 0);
                    assert!(o.dropped() > 0);
                    assert!(
                        !frames
                            .iter()
                            .any(|f| matches!(f, ServerFrame::Conflation { .. }))
                    );
                }
                _ => {
                    assert_eq!(slow, 0);
                    assert_eq!(seqs(&frames).last(), Some(&100));
                    assert!(
                        frames
                            .iter()
                            .any(|f| matches!(f, ServerFrame::Conflation { .. }))
                    );
                }
            }
        }
    }
}
