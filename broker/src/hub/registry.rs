//! The registry: rooms by name, in 64 shards, each room behind its own lock; subscribe,
//! unsubscribe, sweep, the local publish, and the one call out ([`Interest`]) when a room gains
//! its first or loses its last subscriber.
//!
//! Owns the shard map, the counters (rooms, subscriptions, history bytes) and the order of
//! interest calls (made under the shard write lock, so ordered per room). What happens inside
//! one room is [`super::room`]'s; the cluster's feed of sequenced rooms is
//! [`super::sequenced`]'s. It does not know the cluster: only the [`Interest`] it is given.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    num::NonZeroU64,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;
use roomcast_protocol::{EventName, Payload, Position, RoomName, ServerFrame};

use super::{
    Delivery, SessionKey, Start,
    history::{DEDUP_KEYS_PER_ROOM, Dedup, History},
    room::{RoomState, Subscriber, lock_room, subscribed},
    rules::RoomRules,
};
use crate::{
    outbox::{Outbox, PushError},
    wire::Wire,
    wire::{Lane, Outgoing},
};

/// Told when a room gains its first and loses its last local subscriber: the hub's one call
/// out, implemented by whatever carries rooms beyond this node (the cluster bridge).
///
/// The hub calls these under the room's shard write lock, so for one room the calls alternate
/// `on`, `off`, `on`, … in the order the room was created and dropped. Implementations must not
/// block, must not call back into the hub, and must not allocate unboundedly.
pub trait Interest: Send + Sync {
    /// `room` got its first local subscriber.
    fn interest_on(&self, room: &RoomName);
    /// `room` lost its last local subscriber.
    fn interest_off(&self, room: &RoomName);
    /// Whether a new room waits for [`Hub::mark_live`] before its `Subscribed` replies go
    /// out (the listener confirms once events of the room can reach this node).
    fn confirms_live(&self) -> bool {
        false
    }
    /// A subscriber of a sequenced room waits to recover ([`super::Sequenced::take_recoveries`]): the
    /// room's reader should answer it.
    fn recovery_requested(&self, _room: &RoomName) {}
}

const SHARDS: usize = 64;

pub(super) type Shard = RwLock<HashMap<RoomName, Arc<Mutex<RoomState>>>>;

/// Sharded registry room → local subscribers.
pub struct Hub {
    pub(super) shards: Box<[Shard]>,
    pub(super) hasher: RandomState,
    pub(super) rooms: AtomicUsize,
    pub(super) subscriptions: AtomicUsize,
    pub(super) next_room_id: AtomicU64,
    /// How each namespace's rooms behave.
    pub(super) rules: RoomRules,
    /// Bytes held by all room histories.
    pub(super) history_bytes: Arc<AtomicUsize>,
    /// Told when a room gains its first and loses its last subscriber (cluster mode).
    pub(super) interest: Option<Arc<dyn Interest>>,
    /// Some namespace conflates (else no publish looks for a key).
    pub(super) conflation: bool,
    /// Events replaced in a subscriber's queue by a later one of the same conflation key.
    pub(super) conflated: Counter,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
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
    pub(super) fn conflation_key(&self, room: &RoomName, data: &Payload) -> Option<NonZeroU64> {
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
            let id = self.next_room_id.fetch_add(1, Ordering::Relaxed);
            Arc::new(Mutex::new(RoomState::new(
                id,
                room,
                self.rules.rule(room),
                true,
            )))
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

    /// Lets a room's events reach its sessions and sends the waiting `Subscribed` replies;
    /// a sequenced room first takes `position` from its stream.
    pub(super) fn mark_live_inner(&self, room: &RoomName, position: Option<Position>) {
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
        state.fan_out(
            frame,
            seq,
            conflation_key,
            &self.subscriptions,
            &self.conflated,
        )
    }

    pub(super) fn room(&self, room: &RoomName) -> Option<Arc<Mutex<RoomState>>> {
        let shard = self.shard(room).read().unwrap_or_else(|e| e.into_inner());
        shard.get(room).cloned()
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
