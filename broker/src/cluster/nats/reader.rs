//! Room readers: one task per subscribed room subject, handing the room's validated events to
//! the hub in arrival order (plain rooms) or in stream order (sequenced rooms: gaps filled
//! from the stream, recoveries answered between two events through [`Hub::sequenced`]).
//!
//! Owns what readers share ([`Inbound`]) and the readers themselves. It never subscribes or
//! unsubscribes (the reconciler in [`super::interest`] does) and never publishes.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use async_nats::{Message, Subscriber};
use futures_util::StreamExt;
use roomcast_protocol::{EventName, Payload, PayloadLimits, Position, RoomName};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    STREAM_WAIT,
    message::{check, check_parts, stream_numbers},
};
use crate::{
    cluster::{
        stream::{self as history, StreamReadError, Streams},
        subject,
    },
    hub::{Hub, RoomRule, RoomRules},
    metrics::NatsMetrics,
};

/// A room reader's doorbell (sequenced rooms): rung when the room's subscription is confirmed,
/// when the room comes back while lingering, and when a subscriber waits to recover.
#[derive(Default)]
pub(super) struct RoomHandle {
    pub(super) poke: Notify,
    /// The subscription is in force on the node's server.
    pub(super) confirmed: AtomicBool,
}

/// What incoming messages need to be checked and delivered.
pub(super) struct Inbound {
    pub(super) hub: Arc<Hub>,
    /// How each namespace's rooms behave (as the hub's).
    pub(super) rules: Arc<RoomRules>,
    pub(super) streams: Arc<Streams>,
    pub(super) prefix: subject::SubjectPrefix,
    /// Bytes of payload one recovery may replay (the session's outbound queue cap).
    pub(super) max_replay: usize,
    pub(super) limits: PayloadLimits,
    pub(super) max_payload: usize,
    pub(super) metrics: NatsMetrics,
    pub(super) events_out: prometheus_client::metrics::counter::Counter,
}

/// Delivers one room subject's messages to the hub, in arrival order, until stopped. Dropping
/// the subscriber unsubscribes.
pub(super) async fn read_room(
    room: RoomName,
    mut subscriber: Subscriber,
    inbound: Arc<Inbound>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = subscriber.next() => message,
        };
        let Some(message) = message else { break };
        inbound.metrics.received.inc();
        match check(&room, message, inbound.limits, inbound.max_payload) {
            Ok((event, data, key)) => {
                let delivery = inbound.hub.publish(&room, &event, &data, key.as_deref());
                inbound.events_out.inc_by(delivery.delivered as u64);
            }
            Err(why) => {
                inbound.metrics.invalid.inc();
                debug!(%room, why, "dropped an invalid NATS message");
            }
        }
    }
}

/// Delivers a sequenced room's events (republished by its stream, numbered) to the hub in
/// stream order, until stopped; fills gaps in its feed from the stream and answers the room's
/// recoveries between two events, so a recovering subscriber's replay meets the live events
/// with no gap and no duplicate. Dropping the subscriber unsubscribes.
pub(super) async fn read_sequenced_room(
    room: RoomName,
    rule: RoomRule,
    mut subscriber: Subscriber,
    inbound: Arc<Inbound>,
    handle: Arc<RoomHandle>,
    stop: CancellationToken,
) {
    let mut reader = SequencedReader {
        subject: subject::subject_for(&inbound.prefix, &room),
        room,
        rule,
        inbound,
        position: None,
        stream: None,
    };
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = handle.poke.notified() => {
                if handle.confirmed.load(Ordering::Acquire) {
                    reader.go_live_and_recover().await;
                }
            }
            message = subscriber.next() => {
                let Some(message) = message else { break };
                reader.deliver(message).await;
            }
        }
    }
}

/// A sequenced room's reader between two wake-ups (see [`read_sequenced_room`]).
struct SequencedReader {
    room: RoomName,
    rule: RoomRule,
    /// The room's subject (in its stream).
    subject: String,
    inbound: Arc<Inbound>,
    /// Where the room stands: known once the subscription is confirmed. Messages before that
    /// are covered by the position read then.
    position: Option<Position>,
    /// The namespace's stream, once found.
    stream: Option<Arc<history::NamespaceStream>>,
}

impl SequencedReader {
    /// The subscription is confirmed, or a subscriber waits to recover: makes the room live at
    /// its stream position (read once), then answers the waiting recoveries.
    async fn go_live_and_recover(&mut self) {
        let (room, inbound) = (&self.room, &self.inbound);
        if self.stream.is_none() {
            // Bounded: while NATS is unreachable the waiting `Subscribed` replies go out
            // without history (epoch 0) rather than hang.
            match tokio::time::timeout(STREAM_WAIT, inbound.streams.get(room, &self.rule)).await {
                Ok(Ok(s)) => self.stream = Some(s),
                Ok(Err(e)) => {
                    inbound.metrics.jetstream_errors.inc();
                    warn!(%room, error = %e, "no history stream: the room cannot be recovered");
                }
                Err(_) => {
                    inbound.metrics.jetstream_errors.inc();
                    warn!(%room, "no answer from JetStream: the room cannot be recovered for now");
                }
            }
        }
        let at = match self.position {
            Some(at) => at,
            None => {
                let read = match &self.stream {
                    Some(s) => tokio::time::timeout(STREAM_WAIT, s.position(&self.subject))
                        .await
                        .map_err(|_| StreamReadError::TimedOut)
                        .and_then(|r| r)
                        .map(|seq| Position {
                            epoch: s.epoch,
                            seq,
                        }),
                    None => Err(StreamReadError::NoStream),
                };
                let at = read.unwrap_or_else(|e| {
                    inbound.metrics.jetstream_errors.inc();
                    warn!(%room, error = %e, "reading the room's position");
                    Position { epoch: 0, seq: 0 }
                });
                self.position = Some(at);
                at
            }
        };
        let hub = inbound.hub.sequenced();
        hub.mark_live_at(room, at);
        let waiting = hub.take_recoveries(room);
        if waiting.is_empty() {
            return;
        }
        let Some(s) = &self.stream else {
            for (session, _) in waiting {
                hub.answer_recovery(room, session, None);
            }
            return;
        };
        // First catch up with what the stream holds beyond the feed, so a client that saw a
        // later event on another node finds this node at least as far.
        if let Some(at) = &mut self.position {
            fill(room, &self.subject, s, at, u64::MAX, inbound).await;
        }
        let Some(at) = self.position else { return };
        for (session, since) in waiting {
            let replay = recover(&self.subject, s, since, at, inbound).await;
            hub.answer_recovery(room, session, replay);
        }
    }

    /// Delivers one republished message in stream order: drops what was delivered already,
    /// fills a gap before it from the stream.
    async fn deliver(&mut self, message: Message) {
        let (room, inbound) = (&self.room, &self.inbound);
        inbound.metrics.received.inc();
        let Some(at) = &mut self.position else { return };
        let numbers = message.headers.as_ref().and_then(stream_numbers);
        let Some((seq, previous)) = numbers else {
            inbound.metrics.invalid.inc();
            debug!(%room, "dropped a republished message without its sequence");
            return;
        };
        if seq <= at.seq {
            return; // delivered already (read from the stream by a fill)
        }
        if previous > at.seq {
            // Events this node missed: read them from the stream first, in order.
            if let Some(s) = &self.stream {
                fill(room, &self.subject, s, at, previous, inbound).await;
            }
        }
        let headers = message.headers.unwrap_or_default();
        match check_parts(
            room,
            &headers,
            message.payload,
            inbound.limits,
            inbound.max_payload,
        ) {
            Ok((event, data, _)) => {
                let delivery = inbound.hub.sequenced().publish(
                    room,
                    &event,
                    &data,
                    Position {
                        epoch: at.epoch,
                        seq,
                    },
                );
                inbound.events_out.inc_by(delivery.delivered as u64);
            }
            Err(why) => {
                inbound.metrics.invalid.inc();
                debug!(%room, why, "dropped an invalid NATS message");
            }
        }
        at.seq = seq;
    }
}

/// Delivers the room's stored events after `at` up to `upto` (a gap in the feed, or a catch
/// up), advancing `at`.
async fn fill(
    room: &RoomName,
    subject: &str,
    stream: &history::NamespaceStream,
    at: &mut Position,
    upto: u64,
    inbound: &Inbound,
) {
    match stream.read(subject, at.seq, upto, usize::MAX).await {
        Ok(Some(stored)) => {
            for event in stored {
                inbound.metrics.gap_fills.inc();
                if let Ok((name, data, _)) = check_parts(
                    room,
                    &event.headers,
                    event.payload,
                    inbound.limits,
                    inbound.max_payload,
                ) {
                    let delivery = inbound.hub.sequenced().publish(
                        room,
                        &name,
                        &data,
                        Position {
                            epoch: at.epoch,
                            seq: event.seq,
                        },
                    );
                    inbound.events_out.inc_by(delivery.delivered as u64);
                }
                at.seq = event.seq;
            }
        }
        Ok(None) => {}
        Err(e) => {
            inbound.metrics.jetstream_errors.inc();
            warn!(%room, error = %e, "filling a gap from the stream failed: events may be missing");
        }
    }
}

/// The events a subscriber at `since` missed, when the stream still holds all of them.
async fn recover(
    subject: &str,
    stream: &history::NamespaceStream,
    since: Position,
    at: Position,
    inbound: &Inbound,
) -> Option<Vec<(u64, EventName, Payload)>> {
    if since.epoch != at.epoch || since.epoch == 0 || since.seq > at.seq {
        return None;
    }
    match stream.continuous_after(subject, since.seq).await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            inbound.metrics.jetstream_errors.inc();
            warn!(subject, error = %e, "recovery check failed");
            return None;
        }
    }
    let room = subject::room_of(&inbound.prefix, subject)?;
    let stored = match stream
        .read(subject, since.seq, at.seq, inbound.max_replay)
        .await
    {
        Ok(Some(stored)) => stored,
        Ok(None) => return None,
        Err(e) => {
            inbound.metrics.jetstream_errors.inc();
            warn!(subject, error = %e, "reading the history failed");
            return None;
        }
    };
    let mut events = Vec::with_capacity(stored.len());
    for event in stored {
        inbound.metrics.replayed.inc();
        // An invalid stored message was never delivered: skipping it leaves no gap.
        if let Ok((name, data, _)) = check_parts(
            &room,
            &event.headers,
            event.payload,
            inbound.limits,
            inbound.max_payload,
        ) {
            events.push((event.seq, name, data));
        }
    }
    Some(events)
}
