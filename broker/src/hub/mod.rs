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
//! The hub sits below the cluster: it does not touch sockets, sessions' protocol state or the
//! cluster, and imports none of them. It only tells an optional [`Interest`] listener (the
//! cluster bridge implements it) when a room appears and disappears, under the shard write
//! lock, so those calls are ordered per room; the cluster's reader of sequenced rooms calls
//! back through [`Sequenced`] (and [`Hub::mark_live`], [`Hub::publish`]).
//!
//! Split by concern: `rules` (how each namespace's rooms behave), `registry` (the [`Hub`]:
//! rooms by name, subscribe, unsubscribe, sweep, the local publish, the [`Interest`] trait),
//! `room` (one room's state under its lock: the `Subscribed` answer, the fan-out), `sequenced`
//! (the surface only the cluster's room reader uses), `history` (a room's ring of recent
//! events and its idempotency keys), and the unit tests in `tests`.

mod history;
mod registry;
mod room;
mod rules;
mod sequenced;
#[cfg(test)]
mod tests;

use roomcast_protocol::Position;

pub use self::{
    history::HistoryLimits,
    registry::{Hub, Interest},
    rules::{RoomRule, RoomRules},
    sequenced::Sequenced,
};

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
