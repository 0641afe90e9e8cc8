//! The publish side: the bounded queue's consumer that hands events to NATS in queue order
//! (core NATS, or JetStream for rooms with history), and the acker that answers stored
//! publishes as JetStream acknowledges them, in publish order.
//!
//! Owns the publisher and acker tasks and their throttled warnings. It does not subscribe,
//! read or deliver anything, and never touches the hub: a publish comes back to this node
//! through its room reader like anyone else's.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{Client, HeaderMap, jetstream::context::PublishAckFuture};
use bytes::Bytes;
use roomcast_protocol::{EventName, RoomName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    HEADER_EVENT, HEADER_KEY, HEADER_ORIGIN, HEADER_ROOM, JetStreamCheck, NO_JETSTREAM, STREAM_WAIT,
};
use crate::{
    cluster::{
        ReplyTo, Unavailable,
        stream::{StreamReadError, Streams},
        subject,
    },
    hub::{Delivery, RoomRules},
    metrics::NatsMetrics,
};

/// One event waiting to be handed to NATS.
pub(super) struct Outbound {
    pub(super) room: RoomName,
    pub(super) event: EventName,
    pub(super) data: Bytes,
    pub(super) key: Option<Box<str>>,
    /// Sequenced rooms: published through JetStream, answered once stored.
    pub(super) stored: Option<ReplyTo>,
}

/// Hands queued events to NATS in queue order (one task: per-publisher order is kept).
#[allow(clippy::too_many_arguments)] // the task's whole state, moved in
pub(super) async fn publisher(
    client: Client,
    mut queue: mpsc::Receiver<Outbound>,
    rules: Arc<RoomRules>,
    streams: Arc<Streams>,
    jetstream: Arc<JetStreamCheck>,
    prefix: subject::SubjectPrefix,
    node_id: String,
    metrics: NatsMetrics,
    shutdown: CancellationToken,
) {
    // JetStream acknowledgements are awaited by a second task, in publish order, so the
    // publisher never waits for one before sending the next event.
    let (acks, pending) = mpsc::channel(ACKS_IN_FLIGHT);
    tokio::spawn(acker(pending, jetstream.clone(), metrics.clone()));
    let mut no_stream = Throttle::default();
    let mut refused = Throttle::default();
    loop {
        let next = tokio::select! {
            biased;
            next = queue.recv() => next,
            () = shutdown.cancelled() => None,
        };
        let Some(out) = next else { break };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT, out.event.as_str());
        headers.insert(HEADER_ROOM, out.room.as_str());
        headers.insert(HEADER_ORIGIN, node_id.as_str());
        if let Some(key) = &out.key {
            headers.insert(HEADER_KEY, &**key);
        }
        let subject = subject::subject_for(&prefix, &out.room);
        let Some(ack) = out.stored else {
            let sent = tokio::select! {
                sent = client.publish_with_headers(subject, headers, out.data) => sent,
                () = shutdown.cancelled() => break,
            };
            match sent {
                Ok(()) => {
                    metrics.published.inc();
                }
                Err(e) => {
                    metrics.publish_failures.inc();
                    warn!(error = %e, room = %out.room, "NATS refused a publish");
                }
            }
            continue;
        };
        // A room with history: stored in its namespace's stream, acknowledged once stored.
        let rule = rules.rule(&out.room);
        if let Some(key) = &out.key {
            if !rule.dedup_window.is_zero() {
                headers.insert(async_nats::header::NATS_MESSAGE_ID, &**key);
            }
        }
        // Looked up once per namespace (then cached); bounded, as it holds up the queue.
        let stream = tokio::select! {
            stream = tokio::time::timeout(STREAM_WAIT, streams.get(&out.room, rule)) => {
                stream.unwrap_or_else(|_| Err(StreamReadError::TimedOut))
            }
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = stream {
            metrics.jetstream_errors.inc();
            jetstream.recheck.notify_one();
            if jetstream.state() == JetStreamCheck::MISSING {
                // Said once by the check; queued before it found out.
                ack.answer(Err(Unavailable(NO_JETSTREAM)));
            } else {
                if let Some(held_back) = no_stream.pass() {
                    warn!(error = %e, room = %out.room, held_back, "no JetStream stream: publish refused");
                }
                ack.answer(Err(Unavailable("the room's history stream is unavailable")));
            }
            continue;
        }
        let sent = tokio::select! {
            sent = streams.context().publish_with_headers(subject, headers, out.data) => sent,
            () = shutdown.cancelled() => break,
        };
        match sent {
            Ok(future) => {
                metrics.published.inc();
                if acks.send((future, ack, out.room)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                metrics.publish_failures.inc();
                if let Some(held_back) = refused.pass() {
                    warn!(error = %e, room = %out.room, held_back, "JetStream publish failed");
                }
                ack.answer(Err(Unavailable("JetStream refused the publish")));
            }
        }
    }
    // Give what was handed over a moment to reach the server.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
}

/// A failure that repeats once per publish (a stream electing its leader refuses every
/// publish for seconds) is logged at most once per this interval, with a count of the rest.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// Lets one warning of a kind through per [`WARN_EVERY`] and counts the ones held back.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// `Some(held back since the last one)` when this one should be logged.
    fn pass(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// JetStream publishes sent but not acknowledged yet, at most.
const ACKS_IN_FLIGHT: usize = 4096;

/// Answers stored publishes as their JetStream acknowledgements come back (in publish order).
async fn acker(
    mut pending: mpsc::Receiver<(PublishAckFuture, ReplyTo, RoomName)>,
    jetstream: Arc<JetStreamCheck>,
    metrics: NatsMetrics,
) {
    let mut unacknowledged = Throttle::default();
    while let Some((future, ack, room)) = pending.recv().await {
        match future.await {
            Ok(stored) => ack.answer(Ok(Delivery {
                seq: Some(stored.sequence),
                duplicate: stored.duplicate,
                ..Delivery::default()
            })),
            Err(e) => {
                // Not acknowledged: stored or not, the publisher is told it may not have been.
                metrics.jetstream_errors.inc();
                jetstream.recheck.notify_one();
                // `held_back`: more since the last line (a leader election refuses them all).
                if let Some(held_back) = unacknowledged.pass() {
                    warn!(error = %e, %room, held_back, "JetStream did not acknowledge a publish");
                }
                ack.answer(Err(Unavailable(
                    "JetStream did not acknowledge the publish",
                )));
            }
        }
    }
}
