//! One room's state and its fan-out: the sequence counter and epoch, the subscribers and their
//! outboxes, the `Subscribed` answer (with a replay from the room's history), and the push of
//! one shared event frame into every subscriber's outbox.
//!
//! Everything here runs under the room's own lock, taken by the registry
//! ([`super::Hub`]). It does not look rooms up, does not know other rooms, and never waits on a
//! subscriber: a push is non-blocking, a full outbox makes a slow consumer.

use std::{
    hash::{BuildHasher, RandomState},
    num::NonZeroU64,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;
use roomcast_protocol::{Position, RoomName, ServerFrame};

use super::{
    Delivery, SessionKey, Start,
    history::{Dedup, History, Replay},
    rules::RoomRule,
};
use crate::{
    outbox::{ConflationFrames, Outbox, PushError},
    wire::{Framing, Wire},
    wire::{Lane, Outgoing},
};

/// A session in a room.
pub(super) struct Subscriber {
    pub(super) session: SessionKey,
    pub(super) outbox: Arc<Outbox>,
    /// The request id (and requested position) of a `Subscribed` not sent yet: the room is not
    /// live (see [`super::Hub::mark_live`]); such a subscriber receives no event until it is.
    pub(super) pending: Option<(u64, Option<Position>)>,
}

/// One room, behind its own lock.
pub(super) struct RoomState {
    /// Process-unique id of this room state (transports key per-room channels by it).
    pub(super) id: u64,
    /// Events may be dropped (oldest first) or sent as datagrams.
    pub(super) volatile: bool,
    /// `seq` and epoch come from the cluster ([`RoomRule::sequenced`]).
    pub(super) sequenced: bool,
    /// The room conflates: its `Conflation` frames.
    pub(super) conflation: Option<Box<ConflationFrames>>,
    /// Numbering of `seq`: random per room state, 0 when the room keeps no history.
    pub(super) epoch: u64,
    pub(super) seq: u64,
    /// The namespace keeps history: events are recorded in `history`.
    pub(super) keeps_history: bool,
    /// Recent events, made on the first publish (boxed: an idle room carries a pointer).
    pub(super) history: Option<Box<History>>,
    /// The namespace has a dedup window: keyed publishes are remembered in `dedup`.
    pub(super) dedups: bool,
    /// Recent idempotency keys, made on the first keyed publish (boxed: most rooms never see
    /// a key, and every idle room would carry the empty table).
    pub(super) dedup: Option<Box<Dedup>>,
    pub(super) subscribers: Vec<Subscriber>,
    /// The interest listener was told of this room (`interest_on` without `interest_off`).
    pub(super) interested: bool,
    /// Events reach this node: always in-process; in cluster mode once the bridge confirmed
    /// its subscription ([`super::Hub::mark_live`]). Until then `Subscribed` replies wait.
    pub(super) live: bool,
}

/// The `Subscribed` reply, on the room's opening lane.
pub(super) fn subscribed(room: &RoomName, id: u64, start: Start, room_id: u64) -> Outgoing {
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
    /// A new room's state: `id` (process-unique), following `rule`; `live` unless it waits
    /// for the cluster ([`super::Hub::mark_live`]).
    pub(super) fn new(id: u64, room: &RoomName, rule: &RoomRule, live: bool) -> RoomState {
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
            id,
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

    pub(super) fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    /// How the room's events are encoded: volatile ones for datagrams, others for WebSocket.
    pub(super) fn framing(&self) -> Framing {
        if self.volatile {
            Framing::Datagram
        } else {
            Framing::WebSocket
        }
    }

    /// Queues `Subscribed` (recovering from `since` when asked and possible) and any replay
    /// into `outbox`, under the room lock.
    pub(super) fn answer(
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

    /// Queues `frame` (the event `seq`, with conflation key `key` if any) to every answered
    /// subscriber of the locked room; counts dropped subscribers out of `subscriptions` and
    /// replaced events into `conflated`.
    #[inline]
    pub(super) fn fan_out(
        &mut self,
        frame: Wire,
        seq: u64,
        key: Option<NonZeroU64>,
        subscriptions: &AtomicUsize,
        conflated: &Counter,
    ) -> Delivery {
        let state = self;
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
            subscriptions.fetch_sub(removed, Ordering::Relaxed);
        }
        if replaced > 0 {
            conflated.inc_by(replaced);
        }
        delivery
    }
}

pub(super) fn lock_room(room: &Mutex<RoomState>) -> std::sync::MutexGuard<'_, RoomState> {
    room.lock().unwrap_or_else(|e| e.into_inner())
}
