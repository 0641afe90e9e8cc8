//! The cluster bridge: how a published event reaches the subscribers of its room, on this node
//! and on every other node.
//!
//! Owns the [`Bridge`] trait and its two implementations: [`InProcess`] (the embedded
//! single-node default: a publish goes straight into the local [`Hub`]) and
//! [`nats::NatsBridge`] (cluster mode: rooms are NATS subjects, see [`subject`]). It does not
//! touch sessions, transports or the hub's internals: it is told when a room gains its first and
//! loses its last local subscriber, it is handed validated events to publish, and (NATS) it
//! hands validated events from NATS to [`Hub::publish`].
//!
//! # Guarantees (cluster mode, what [`nats::NatsBridge`] promises)
//!
//! Every event — one published on this node too — goes to NATS first and is fanned out locally
//! only when it comes back on the node's one subscription to the room's subject. So:
//!
//! - **Exactly once per subscriber**, while the node's NATS connection stays up and the node
//!   keeps up: a node holds at most one live subscription per room subject, and the hub queues
//!   each event it is handed once per local subscriber. Core NATS itself is at-most-once: an
//!   event in flight when a connection drops, or dropped because the node's subscription buffer
//!   overflowed (an async-nats slow consumer, counted in `roomcast_nats_slow_consumers_total`
//!   and logged), is lost, never duplicated.
//! - **Publisher order**: events one session (or one HTTP client waiting for each answer)
//!   publishes reach every subscriber on every node in publish order — the session's publishes
//!   pass one FIFO queue into one NATS connection, NATS keeps per-connection order through
//!   routes and gateways, and each room subject is read by one task per node.
//! - **One order per node**: all subscribers of a room on one node see the room's events in the
//!   same order (the hub's `seq` order, which is the order the node received them from NATS).
//! - **Across nodes** core NATS orders messages per publisher only: two nodes agree on the
//!   relative order of events from one publishing node, but events published concurrently on
//!   different nodes may interleave differently on different nodes. A total order per room
//!   needs a sequencer (JetStream), which arrives with history. `seq` is assigned by each node
//!   and is not comparable across nodes.
//! - **Never silent loss on publish**: when the node is not connected to NATS, or its bounded
//!   publish queue is full, [`Bridge::publish`] fails with [`Unavailable`] and the client gets
//!   `Error unavailable` (4503).
//! - **Interest**: a node subscribes to a room subject only while the room has a local
//!   subscriber (plus a short linger against churn), so it receives no traffic for rooms
//!   nobody on it watches.
//! - **Subscribed means routed**: the `Subscribed` that creates a node's subscription to a room
//!   is held back ([`Interest::confirms_live`], [`Hub::mark_live`]) until the subscription is
//!   in force on the node's NATS server (bounded to 2 s while NATS is unreachable); interest
//!   propagation to other servers of a cluster or gateway stays asynchronous.

pub mod nats;
mod stream;
pub mod subject;

use std::sync::Arc;

use roomcast_protocol::{Code, EventName, Payload, RoomName, ServerFrame};
use tokio::sync::oneshot;

use crate::{
    hub::{Delivery, Hub},
    outbox::Outbox,
};

/// Who hears the outcome of a publish the bridge finishes later (a JetStream acknowledgement).
pub enum AckTo {
    /// A session's `Publish`: `Ack { id, seq }` into its outbox when it asked for one, and
    /// `Error unavailable` whether it asked or not (never silent loss).
    Session {
        /// The publishing session's queue.
        outbox: Arc<Outbox>,
        /// The `Publish`'s id.
        id: u64,
        /// The `Publish` asked for an `Ack`.
        want_ack: bool,
    },
    /// Someone waiting for the outcome (the HTTP API).
    Reply(oneshot::Sender<Result<Delivery, Unavailable>>),
}

impl AckTo {
    /// Tells the publisher how it went.
    pub fn answer(self, outcome: Result<Delivery, Unavailable>) {
        match self {
            AckTo::Session {
                outbox,
                id,
                want_ack,
            } => {
                let frame = match outcome {
                    Ok(_) if !want_ack => return,
                    Ok(delivery) => ServerFrame::Ack {
                        id,
                        seq: delivery.seq,
                    },
                    Err(e) => ServerFrame::Error {
                        id: Some(id),
                        code: Code::Unavailable,
                        message: e.to_string(),
                        retry_after_ms: None,
                    },
                };
                // A session whose queue refuses its own answer is ending anyway.
                let _ = outbox.push(frame.encode());
            }
            AckTo::Reply(reply) => {
                let _ = reply.send(outcome);
            }
        }
    }
}

/// A publish could not be handed to the cluster (not connected, or the publish queue is full).
/// The event was not published anywhere; the same publish may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cluster is unavailable: {0}")]
pub struct Unavailable(pub &'static str);

/// Told when a room gains its first and loses its last local subscriber.
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
    /// A subscriber of a sequenced room waits to recover ([`Hub::take_recoveries`]): the
    /// room's reader should answer it.
    fn recovery_requested(&self, _room: &RoomName) {}
}

/// Carries events between this node's hub and every node that has subscribers of the room.
/// The guarantees an implementation gives are written in the module documentation.
pub trait Bridge: Interest {
    /// Publishes a validated event to the room on every node, this one included. Never blocks.
    /// `key` is the publish's idempotency key: a repeat within the room's dedup window is not
    /// delivered again.
    ///
    /// `Ok(Some(_))` is the outcome, known at once: the local [`Delivery`] when the event was
    /// fanned out here immediately (in-process), or an empty one when the fan-out happens when
    /// the event comes back from the cluster; the caller answers the publisher. `Ok(None)`: the
    /// outcome comes later (a room with history in JetStream is acknowledged once stored) and
    /// the bridge answers through `ack`. `Err` means the event went nowhere.
    fn publish(
        &self,
        hub: &Hub,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
        ack: AckTo,
    ) -> Result<Option<Delivery>, Unavailable>;

    /// Whether the bridge can publish right now (for `/readyz`).
    fn is_ready(&self) -> bool;

    /// The interest listener the hub should call, if the bridge needs one.
    fn interest(&self) -> Option<Arc<dyn Interest>>;
}

/// The embedded single-node bridge: a publish is the local fan-out, nothing leaves the process.
/// Guarantees: those of the hub (docs/ARCHITECTURE.md, "Delivery guarantees (single node)").
#[derive(Debug, Default)]
pub struct InProcess;

impl Interest for InProcess {
    fn interest_on(&self, _room: &RoomName) {}
    fn interest_off(&self, _room: &RoomName) {}
}

impl Bridge for InProcess {
    fn publish(
        &self,
        hub: &Hub,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
        _ack: AckTo,
    ) -> Result<Option<Delivery>, Unavailable> {
        Ok(Some(hub.publish(room, event, data, key)))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn interest(&self) -> Option<Arc<dyn Interest>> {
        None
    }
}
