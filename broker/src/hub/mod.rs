//! The local room registry and fan-out.
//!
//! Rooms are sharded by name; each room has its own lock holding its sequence counter and its
//! subscribers' outboxes. A publish assigns the room's next `seq`, encodes the `Event` frame
//! once and pushes the same `Bytes` into every subscriber's outbox with a non-blocking push:
//! a full outbox makes that subscriber a slow consumer and drops it from the room, a closed
//! one is dropped; fan-out never waits on a subscriber. Confirmations (`Subscribed`,
//! `Unsubscribed`) are queued under the room lock so they are ordered with the room's events.
//!
//! The hub does not touch sockets, sessions' protocol state or the cluster. It only tells an
//! optional [`Interest`] listener (the cluster bridge) when a room appears and disappears,
//! under the shard write lock, so those calls are ordered per room.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use roomcast_protocol::{EventName, Payload, RoomName, ServerFrame, frame::encode_event};

use crate::{
    cluster::Interest,
    outbox::{Lane, Outbox, Outgoing, PushError},
};

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
}

struct Subscriber {
    session: SessionKey,
    outbox: Arc<Outbox>,
    /// The request id of a `Subscribed` not sent yet: the room is not live (see
    /// [`Hub::mark_live`]); such a subscriber receives no event until it is.
    pending: Option<u64>,
}

struct RoomState {
    /// Process-unique id of this room state (transports key per-room channels by it).
    id: u64,
    /// Events may be dropped (oldest first) or sent as datagrams.
    volatile: bool,
    seq: u64,
    subscribers: Vec<Subscriber>,
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
    /// Namespaces whose events are volatile (latest value wins, loss allowed).
    volatile_namespaces: Vec<String>,
    /// Told when a room gains its first and loses its last subscriber (cluster mode).
    interest: Option<Arc<dyn Interest>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// The `Subscribed` reply, on the room's opening lane.
fn subscribed(room: &RoomName, id: u64, seq: u64, room_id: u64) -> Outgoing {
    Outgoing {
        frame: ServerFrame::Subscribed {
            epoch: 0,
            recovered: None,
            id,
            room: room.clone(),
            seq,
        }
        .encode(),
        lane: Lane::RoomOpen(room_id),
    }
}

fn lock_room(room: &Mutex<RoomState>) -> std::sync::MutexGuard<'_, RoomState> {
    room.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// An empty hub with no volatile namespace.
    pub fn new() -> Self {
        Hub::with_volatile_namespaces(Vec::new())
    }

    /// An empty hub whose rooms in `namespaces` are volatile: their events may travel as
    /// datagrams and are dropped oldest-first instead of closing a slow subscriber.
    pub fn with_volatile_namespaces(namespaces: Vec<String>) -> Self {
        Hub::with_interest(namespaces, None)
    }

    /// Like [`Hub::with_volatile_namespaces`], telling `interest` (if any) when a room gets its
    /// first subscriber and when it is dropped.
    pub fn with_interest(namespaces: Vec<String>, interest: Option<Arc<dyn Interest>>) -> Self {
        Hub {
            volatile_namespaces: namespaces,
            interest,
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            rooms: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            next_room_id: AtomicU64::new(1),
        }
    }

    /// Whether events of `room` are volatile.
    pub fn is_volatile(&self, room: &RoomName) -> bool {
        self.volatile_namespaces
            .iter()
            .any(|ns| ns == room.namespace())
    }

    fn shard(&self, room: &RoomName) -> &Shard {
        let index = self.hasher.hash_one(room) as usize % SHARDS;
        &self.shards[index]
    }

    /// Adds `session` to `room` (idempotent) and queues `Subscribed { id, room, seq }` into its
    /// outbox, ordered before any later event of the room. Returns the room's seq.
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
    ) -> Result<u64, PushError> {
        let mut shard = self.shard(room).write().unwrap_or_else(|e| e.into_inner());
        let state = shard.entry(room.clone()).or_insert_with(|| {
            self.rooms.fetch_add(1, Ordering::Relaxed);
            let live = match &self.interest {
                Some(interest) => {
                    interest.interest_on(room);
                    !interest.confirms_live()
                }
                None => true,
            };
            Arc::new(Mutex::new(RoomState {
                id: self.next_room_id.fetch_add(1, Ordering::Relaxed),
                volatile: self.is_volatile(room),
                seq: 0,
                subscribers: Vec::new(),
                live,
            }))
        });
        let mut state = lock_room(state);
        let live = state.live;
        match state.subscribers.iter_mut().find(|s| s.session == session) {
            // Not live yet: the newest request id gets the reply.
            Some(existing) if existing.pending.is_some() => existing.pending = Some(id),
            Some(_) => {}
            None => {
                self.subscriptions.fetch_add(1, Ordering::Relaxed);
                state.subscribers.push(Subscriber {
                    session,
                    outbox: outbox.clone(),
                    pending: (!live).then_some(id),
                });
            }
        }
        let seq = state.seq;
        if live {
            outbox.push_to(subscribed(room, id, seq, state.id))?;
        }
        Ok(seq)
    }

    /// The bridge's subscription for `room` is live: sends the waiting `Subscribed` replies
    /// (with the room's current seq) and lets events reach their sessions. No-op for a room
    /// that is gone or already live.
    pub fn mark_live(&self, room: &RoomName) {
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
        let (seq, room_id) = (state.seq, state.id);
        for subscriber in &mut state.subscribers {
            if let Some(id) = subscriber.pending.take() {
                // A full or closed outbox ends that session anyway; nothing else to do here.
                let _ = subscriber
                    .outbox
                    .push_to(subscribed(room, id, seq, room_id));
            }
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
            empty = state.subscribers.is_empty();
            if let (Some(subscribe_id), Some(_)) = (unanswered, reply_id) {
                // Left before the room went live: the Subscribe still gets its answer first.
                result = outbox.push_to(subscribed(room, subscribe_id, state.seq, state.id));
            }
            if let (Some(id), Ok(())) = (reply_id, &result) {
                // Under the room lock: no event of the room can follow it.
                result = outbox.push_to(Outgoing {
                    frame: ServerFrame::Unsubscribed {
                        id,
                        room: room.clone(),
                    }
                    .encode(),
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
            if let Some(interest) = &self.interest {
                interest.interest_off(room);
            }
        }
        result
    }

    /// Publishes an event to the room's local subscribers: one encode, one shared `Bytes`.
    pub fn publish(&self, room: &RoomName, event: &EventName, data: &Payload) -> Delivery {
        let state = {
            let shard = self.shard(room).read().unwrap_or_else(|e| e.into_inner());
            match shard.get(room) {
                Some(state) => state.clone(),
                None => return Delivery::default(),
            }
        };
        let mut state = lock_room(&state);
        state.seq += 1;
        let (seq, id) = (state.seq, state.id);
        let lane = if state.volatile {
            Lane::Volatile(id)
        } else {
            Lane::Room(id)
        };
        let frame: Bytes = encode_event(room, event, data, seq, None);
        let before = state.subscribers.len();
        let mut delivery = Delivery {
            seq: Some(seq),
            ..Delivery::default()
        };
        state.subscribers.retain(|s| {
            if s.pending.is_some() {
                return true;
            }
            match s.outbox.push_to(Outgoing {
                frame: frame.clone(),
                lane,
            }) {
                Ok(()) => {
                    delivery.delivered += 1;
                    true
                }
                Err(PushError::Full) => {
                    delivery.slow += 1;
                    false
                }
                Err(PushError::Closed) => false,
            }
        });
        let removed = before - state.subscribers.len();
        if removed > 0 {
            self.subscriptions.fetch_sub(removed, Ordering::Relaxed);
        }
        delivery
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

    fn decode(frame: &Bytes) -> ServerFrame {
        ServerFrame::decode(frame, PayloadLimits::default()).unwrap()
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
            assert_eq!(hub.subscribe(&r, i as u64, o, 1), Ok(0));
        }
        let event = EventName::new("e").unwrap();
        for n in 0..5u32 {
            let d = hub.publish(&r, &event, &Payload::encode(&n).unwrap());
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
        hub.subscribe(&room("gps:truck-1"), 1, &o, 1).unwrap();
        hub.subscribe(&room("orders:1"), 1, &o, 2).unwrap();
        let event = EventName::new("e").unwrap();
        hub.publish(&room("gps:truck-1"), &event, &Payload::encode(&1).unwrap());
        hub.publish(&room("orders:1"), &event, &Payload::encode(&2).unwrap());
        let mut batch = Vec::new();
        o.drain_into(&mut batch);
        assert!(matches!(batch[2].lane, Lane::Volatile(_)));
        assert!(matches!(batch[3].lane, Lane::Room(_)));
    }

    #[test]
    fn unsubscribe_stops_delivery_and_drops_empty_rooms() {
        let hub = Hub::new();
        let r = room("a:b");
        let o = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &o, 1).unwrap();
        hub.subscribe(&r, 1, &o, 2).unwrap(); // idempotent
        assert_eq!(hub.room_count(), 1);
        let event = EventName::new("e").unwrap();
        assert_eq!(
            hub.publish(&r, &event, &Payload::encode(&1).unwrap())
                .delivered,
            1
        );
        assert_eq!(hub.subscription_count(), 1);
        hub.unsubscribe(&r, 1, &o, Some(3)).unwrap();
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.subscription_count(), 0);
        let d = hub.publish(&r, &event, &Payload::encode(&2).unwrap());
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
        let hub = Hub::with_interest(Vec::new(), Some(Arc::new(Confirming)));
        let r = room("orders:1");
        let (a, b) = (
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
        );
        assert_eq!(hub.subscribe(&r, 1, &a, 7), Ok(0));
        // A second Subscribe while waiting: the newest request id gets the reply.
        assert_eq!(hub.subscribe(&r, 1, &a, 8), Ok(0));
        assert_eq!(hub.subscription_count(), 1);
        assert!(
            drain(&a).is_empty(),
            "no Subscribed before the room is live"
        );
        // An event reaching the node before the confirmation (a lingering subscription) is
        // counted but reaches nobody waiting.
        let event = EventName::new("e").unwrap();
        let d = hub.publish(&r, &event, &Payload::encode(&1).unwrap());
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
        assert_eq!(hub.subscribe(&r, 2, &b, 1), Ok(1));
        hub.publish(&r, &event, &Payload::encode(&2).unwrap());
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
        let hub = Hub::with_interest(Vec::new(), Some(Arc::new(Confirming)));
        let r = room("orders:1");
        let a = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&r, 1, &a, 3).unwrap();
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
        let hub = Hub::with_interest(Vec::new(), Some(recorder.clone()));
        let (a, b) = (room("a:1"), room("b:1"));
        let o1 = Arc::new(Outbox::new(1 << 20));
        let o2 = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&a, 1, &o1, 1).unwrap();
        hub.subscribe(&a, 2, &o2, 1).unwrap();
        hub.subscribe(&a, 1, &o1, 2).unwrap(); // again: no new interest
        hub.subscribe(&b, 1, &o1, 3).unwrap();
        hub.unsubscribe(&a, 1, &o1, None).unwrap();
        hub.unsubscribe(&a, 2, &o2, None).unwrap();
        hub.unsubscribe(&a, 2, &o2, None).unwrap(); // room already gone: nothing more
        hub.subscribe(&a, 2, &o2, 4).unwrap();
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
        hub.subscribe(&r, 1, &slow, 1).unwrap();
        hub.subscribe(&r, 2, &fast, 1).unwrap();
        let event = EventName::new("e").unwrap();
        let data = Payload::encode(&vec![7u8; 64]).unwrap();
        let mut slow_seen = 0;
        for _ in 0..10 {
            slow_seen += hub.publish(&r, &event, &data).slow;
        }
        assert_eq!(slow_seen, 1, "the slow subscriber is dropped once");
        assert_eq!(hub.subscription_count(), 1);
        assert!(slow.is_overflowed());
        assert_eq!(drain(&fast).len(), 11);
    }
}
