//! Room readers: one task per subscribed room subject, handing the room's validated events to
//! the hub in arrival order (plain rooms) or in stream order (sequenced rooms: gaps filled
//! from the stream, recoveries answered between two events through [`Hub::sequenced`]).
//!
//! Owns what readers share ([`Inbound`]) and the readers themselves. It never subscribes or
//! unsubscribes (the reconciler in [`super::interest`] does) and never publishes.

use std::sync::{Arc, atomic::Ordering};

use async_nats::Subscriber;
use futures_util::StreamExt;
use roomcast_protocol::{EventName, Payload, PayloadLimits, Position, RoomName};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    STREAM_WAIT,
    interest::RoomHandle,
    message::{check, check_parts, stream_numbers},
};
use crate::{
    cluster::{
        stream::{self as history, Streams},
        subject,
    },
    hub::{Hub, RoomRule, RoomRules},
    metrics::NatsMetrics,
};

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
    let subject = subject::subject_for(&inbound.prefix, &room);
    // Where the room stands: known once the subscription is confirmed. Messages before that
    // are covered by the position read then.
    let mut position: Option<Position> = None;
    let mut stream = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = handle.poke.notified() => {
                if !handle.confirmed.load(Ordering::Acquire) {
                    continue;
                }
                if stream.is_none() {
                    // Bounded: while NATS is unreachable the waiting `Subscribed` replies go
                    // out without history (epoch 0) rather than hang.
                    match tokio::time::timeout(STREAM_WAIT, inbound.streams.get(&room, &rule)).await {
                        Ok(Ok(s)) => stream = Some(s),
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
                let at = match position {
                    Some(at) => at,
                    None => {
                        let read = match &stream {
                            Some(s) => tokio::time::timeout(STREAM_WAIT, s.position(&subject))
                                .await
                                .map_err(|_| "timed out".to_owned())
                                .and_then(|r| r)
                                .map(|seq| Position { epoch: s.epoch, seq }),
                            None => Err("no stream".to_owned()),
                        };
                        let at = read.unwrap_or_else(|e| {
                            inbound.metrics.jetstream_errors.inc();
                            warn!(%room, error = %e, "reading the room's position");
                            Position { epoch: 0, seq: 0 }
                        });
                        position = Some(at);
                        at
                    }
                };
                inbound.hub.sequenced().mark_live_at(&room, at);
                let waiting = inbound.hub.sequenced().take_recoveries(&room);
                if waiting.is_empty() {
                    continue;
                }
                let Some(s) = &stream else {
                    for (session, _) in waiting {
                        inbound.hub.sequenced().answer_recovery(&room, session, None);
                    }
                    continue;
                };
                // First catch up with what the stream holds beyond the feed, so a client that
                // saw a later event on another node finds this node at least as far.
                if let Some(at) = &mut position {
                    fill(&room, &subject, s, at, u64::MAX, &inbound).await;
                }
                let Some(at) = position else { continue };
                for (session, since) in waiting {
                    let replay = recover(&subject, s, since, at, &inbound).await;
                    inbound.hub.sequenced().answer_recovery(&room, session, replay);
                }
            }
            message = subscriber.next() => {
                let Some(message) = message else { break };
                inbound.metrics.received.inc();
                let Some(at) = &mut position else { continue };
                let numbers = message.headers.as_ref().and_then(stream_numbers);
                let Some((seq, previous)) = numbers else {
                    inbound.metrics.invalid.inc();
                    debug!(%room, "dropped a republished message without its sequence");
                    continue;
                };
                if seq <= at.seq {
                    continue; // delivered already (read from the stream by a fill)
                }
                if previous > at.seq {
                    // Events this node missed: read them from the stream first, in order.
                    if let Some(s) = &stream {
                        fill(&room, &subject, s, at, previous, &inbound).await;
                    }
                }
                let headers = message.headers.unwrap_or_default();
                match check_parts(&room, &headers, message.payload, inbound.limits, inbound.max_payload) {
                    Ok((event, data, _)) => {
                        let delivery = inbound.hub.sequenced().publish(
                            &room,
                            &event,
                            &data,
                            Position { epoch: at.epoch, seq },
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
