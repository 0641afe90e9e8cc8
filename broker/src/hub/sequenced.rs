//! The hub's surface for sequenced rooms (cluster mode with JetStream): rooms whose `seq` and
//! epoch come from their stream, fed by the cluster's one reader task per room.
//!
//! Owns the calls only that reader makes: taking the stream's position when the room goes live,
//! delivering events numbered by the stream (dropping what was delivered already), and
//! answering the room's waiting recoveries between two events. Nothing else calls it; it works
//! on the rooms of [`Hub`] through [`super::room`], and does not know NATS.

use roomcast_protocol::{EventName, Payload, Position, RoomName};

use super::{
    Delivery, Hub, SessionKey, Start,
    room::{lock_room, subscribed},
};
use crate::{
    wire::{Framing, Wire},
    wire::{Lane, Outgoing},
};

impl Hub {
    /// The surface for the reader of sequenced rooms (the cluster's).
    pub fn sequenced(&self) -> Sequenced<'_> {
        Sequenced { hub: self }
    }
}

/// The calls of a sequenced room's reader: see the module documentation.
pub struct Sequenced<'a> {
    hub: &'a Hub,
}

impl Sequenced<'_> {
    /// [`Hub::mark_live`] for a sequenced room, whose stream says where it stands: the room
    /// takes `position` (its epoch, and the seq its next event follows) unless it is live
    /// already. Subscribers waiting to recover stay waiting ([`Sequenced::take_recoveries`]).
    pub fn mark_live_at(&self, room: &RoomName, position: Position) {
        self.hub.mark_live_inner(room, Some(position));
    }

    /// Publishes an event of a sequenced room, numbered by its stream: `position` is the
    /// event's. An event at or before the room's current seq was delivered already and is
    /// dropped (`Delivery::duplicate`). Events of a room must be handed over by one task, in
    /// stream order.
    pub fn publish(
        &self,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        position: Position,
    ) -> Delivery {
        let Some(state) = self.hub.room(room) else {
            return Delivery::default();
        };
        let conflation_key = self.hub.conflation_key(room, data);
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
        state.fan_out(
            frame,
            position.seq,
            conflation_key,
            &self.hub.subscriptions,
            &self.hub.conflated,
        )
    }

    /// Sequenced rooms: the subscribers of a live `room` waiting to recover, with the position
    /// each asked for. The bridge answers each with [`Sequenced::answer_recovery`].
    pub fn take_recoveries(&self, room: &RoomName) -> Vec<(SessionKey, Position)> {
        let Some(state) = self.hub.room(room) else {
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
        let Some(state) = self.hub.room(room) else {
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
}
