//! The cluster bridge: how a published event reaches the subscribers of its room, on this node
//! and on every other node.
//!
//! Owns the [`Bridge`] trait and its two implementations: [`InProcess`] (the embedded
//! single-node default, built with its hub: a publish goes straight into the local [`Hub`])
//! and [`nats::NatsBridge`] (cluster mode, built with the room rules: rooms are NATS subjects,
//! see [`subject`]), and the [`PublishReply`] trait through which publishers hear the outcome.
//!
//! It sits above the hub and below the session and the HTTP API: it does not touch sessions,
//! outboxes, transports or the hub's internals. It is told when a room gains its first and
//! loses its last local subscriber (it implements the hub's [`crate::hub::Interest`]), it is
//! handed validated events to publish, and (NATS) it hands validated events from NATS to
//! [`Hub::publish`] and, for rooms numbered by their stream, to [`Hub::sequenced`].
//!
//! # Guarantees (cluster mode, what [`nats::NatsBridge`] promises)
//!
//! Every event — one published on this node too — goes to NATS first and is fanned out locally
//! only when it comes back on the node's one subscription to the room. Reliable rooms (the
//! default) keep their history in a JetStream stream per namespace (module `stream`): the stream
//! numbers and stores each event, then republishes it to the room's sequenced subject, which
//! is what nodes subscribe to. Volatile rooms (and every room with `--no-nats-history`) use
//! the room subject over core NATS.
//!
//! Reliable rooms (JetStream):
//!
//! - **One order per room everywhere**: `seq` is the stream sequence; every node delivers a
//!   room's events in stream order, so all subscribers on all nodes and regions see the same
//!   events in the same order with the same `seq` (increasing, with gaps).
//! - **Publisher order**: events one session (or one HTTP client waiting for each answer)
//!   publishes are stored in publish order (one FIFO queue into one NATS connection).
//! - **Exactly once per subscriber, no gap**: a node drops a republished copy at or below the
//!   last `seq` it delivered, and fills a gap in its feed (`Nats-Last-Sequence` above that
//!   `seq`: messages lost while disconnected, or to a slow consumer) from the stream before
//!   delivering more. A gap it cannot read (the stream dropped those events already) is logged
//!   and counted in `roomcast_nats_jetstream_errors_total`.
//! - **Acknowledged means stored**: `Ack` (and the HTTP answer) is sent once JetStream
//!   acknowledged the event; an event it refuses or does not acknowledge is answered
//!   `unavailable` — it may or may not have been stored (use idempotency keys to retry).
//! - **Recovery on any node**: `Subscribe` with `since` is answered from the stream by the
//!   room's reader between two live events (no gap, no duplicate at the seam), when the
//!   stream still holds everything after `since`.
//! - **Idempotency**: a key is the message's `Nats-Msg-Id`; JetStream drops a repeat within
//!   the stream's duplicate window and acknowledges it with the original's sequence.
//!
//! Volatile rooms and `--no-nats-history` (core NATS):
//!
//! - **At most once**: an event in flight when a connection drops, or dropped because the
//!   node's subscription buffer overflowed (an async-nats slow consumer, counted in
//!   `roomcast_nats_slow_consumers_total` and logged), is lost, never duplicated.
//! - **Publisher order** as above; **across nodes** only per publisher: events published
//!   concurrently on different nodes may interleave differently on different nodes, and `seq`
//!   is assigned by each node (not comparable across nodes). The `Ack` means "handed to NATS".
//!
//! Both:
//!
//! - **Never silent loss on publish**: when the node is not connected to NATS, or its bounded
//!   publish queue is full, [`Bridge::publish`] fails with [`Unavailable`] and the client gets
//!   `Error unavailable` (4503). So does a publish to a room with history while the NATS
//!   server offers no JetStream (checked on every connect, see [`nats`]); the node is not
//!   ready meanwhile.
//! - **Interest**: a node subscribes to a room only while the room has a local subscriber
//!   (plus a short linger against churn), so it receives no traffic for rooms nobody on it
//!   watches.
//! - **Subscribed means routed**: the `Subscribed` that creates a node's subscription to a room
//!   is held back ([`crate::hub::Interest::confirms_live`], [`Hub::mark_live`]) until the subscription is
//!   in force on the node's NATS server (bounded to 2 s while NATS is unreachable); interest
//!   propagation to other servers of a cluster or gateway stays asynchronous (with JetStream
//!   the position in `Subscribed` is read from the stream after that, so nothing stored after
//!   it is missed: a gap is filled from the stream).

pub mod nats;
mod stream;
pub mod subject;

use std::sync::Arc;

use roomcast_protocol::{EventName, Payload, RoomName};

use crate::hub::{Delivery, Hub};

/// What a publisher asked for with its publish: its request id, and whether it wants to hear
/// of success (a failure is always answered: never silent loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The publish's id (the `Publish` frame's; 0 for the HTTP API).
    pub id: u64,
    /// The publisher wants to hear of success (`Publish.ack`).
    pub ack: bool,
}

/// The publisher did not take its answer: its queue is full or it has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the publisher did not take the answer")]
pub struct Unheard;

/// Turns the outcome of a publish into the publisher's answer; implemented by each kind of
/// publisher (a session, into its outbox; the HTTP API, for the request waiting on it). The
/// caller uses it for an outcome [`Bridge::publish`] returns, the bridge for one it learns
/// later.
pub trait PublishReply: Send + Sync {
    /// Tells the publisher of `request` how it went. Never blocks.
    fn answer(
        &self,
        request: Request,
        outcome: Result<Delivery, Unavailable>,
    ) -> Result<(), Unheard>;
}

/// Where the outcome of one publish goes when the bridge learns it later (a JetStream
/// acknowledgement).
pub struct ReplyTo {
    to: Arc<dyn PublishReply>,
    request: Request,
}

impl ReplyTo {
    /// The answer to `request` goes to `to`.
    pub fn new(to: Arc<dyn PublishReply>, request: Request) -> Self {
        ReplyTo { to, request }
    }

    /// Tells the publisher how it went. A publisher that cannot take its answer is ending
    /// anyway.
    pub fn answer(self, outcome: Result<Delivery, Unavailable>) {
        let _ = self.to.answer(self.request, outcome);
    }
}

/// A publish could not be handed to the cluster (not connected, or the publish queue is full).
/// The event was not published anywhere; the same publish may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cluster is unavailable: {0}")]
pub struct Unavailable(pub &'static str);

/// Carries events between this node's hub and every node that has subscribers of the room.
/// The guarantees an implementation gives are written in the module documentation.
pub trait Bridge: Send + Sync {
    /// Publishes a validated event to the room on every node, this one included. Never blocks.
    /// `key` is the publish's idempotency key: a repeat within the room's dedup window is not
    /// delivered again.
    ///
    /// `Ok(Some(_))` is the outcome, known at once: the local [`Delivery`] when the event was
    /// fanned out here immediately (in-process), or an empty one when the fan-out happens when
    /// the event comes back from the cluster; the caller answers the publisher (with its
    /// [`PublishReply`]). `Ok(None)`: the outcome comes later (a room with history in
    /// JetStream is acknowledged once stored) and the bridge answers through `reply`. `Err`
    /// means the event went nowhere (the caller answers).
    fn publish(
        &self,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
        reply: ReplyTo,
    ) -> Result<Option<Delivery>, Unavailable>;

    /// Why the node should not get traffic right now (the `/readyz` body), `None` when it
    /// can publish.
    fn not_ready(&self) -> Option<&'static str>;
}

/// The embedded single-node bridge: a publish is the local fan-out, nothing leaves the process.
/// Guarantees: those of the hub (docs/ARCHITECTURE.md, "Delivery guarantees (single node)").
pub struct InProcess {
    hub: Arc<Hub>,
}

impl InProcess {
    /// The bridge that publishes into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        InProcess { hub }
    }
}

impl Bridge for InProcess {
    fn publish(
        &self,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
        _reply: ReplyTo,
    ) -> Result<Option<Delivery>, Unavailable> {
        Ok(Some(self.hub.publish(room, event, data, key)))
    }

    fn not_ready(&self) -> Option<&'static str> {
        None
    }
}
