//! Room history in JetStream (cluster mode): one stream per reliable namespace.
//!
//! Owns the streams' configuration, their epochs and every read from them (a room's current
//! position, the continuity check behind `recovered`, the events after a position). It does not
//! deliver anything: the NATS bridge's room readers hand what it reads to the hub.
//!
//! # Layout (docs/PROTOCOL.md §11)
//!
//! - Stream `<prefix with '.' as '_'>_<namespace>` captures `<prefix>.<namespace>.>`: every
//!   room subject of the namespace, whoever publishes to it (nodes, backends on raw NATS).
//! - Limits: `max_messages_per_subject` = the namespace's history in events, `max_age` = its
//!   history age; `duplicate_window` = its dedup window (at most the age), against which
//!   `Nats-Msg-Id` (the publish's idempotency key) is checked.
//! - The stream republishes each stored message to `<prefix>.SEQ.<namespace>.<token>` with
//!   `Nats-Sequence` (the stream sequence: the event's `seq`) and `Nats-Last-Sequence` (the
//!   previous sequence of the same subject). Nodes subscribe to these: every node sees a
//!   room's events in stream order with their numbers, and a gap in its feed is visible (the
//!   previous sequence is not the last one it saw) and filled from the stream.
//! - Epoch: the stream's creation time in milliseconds. A stream deleted and re-created has a
//!   new one.
//!
//! # Continuity
//!
//! A stream drops a subject's messages oldest first (by count per subject, by age, by the
//! stream's own limits), so if the message at a client's position still exists, every later
//! message of the room does too. A position that is not a message of the room (the room had
//! no event when the client subscribed: the position is then the stream's last sequence) is
//! continuous when nothing after it can have been dropped: the stream's first sequence is not
//! beyond it (no age or stream-limit removal after it) and the room holds fewer messages than
//! its per-subject limit (no count removal ever happened after it).

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    stream::{Config, DirectGetError, DirectGetErrorKind, InfoError, Republish, StorageType},
};
use bytes::Bytes;
use futures_util::StreamExt;
use roomcast_protocol::RoomName;
use tokio::sync::Mutex;

use super::subject::{self, SubjectPrefix};
use crate::hub::RoomRule;

/// The token after the prefix of republished (sequenced) subjects: upper case, so it is never
/// a namespace.
const SEQ_TOKEN: &str = "SEQ";

/// Why a stream read failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamReadError {
    /// A direct get failed (other than "no such message").
    #[error("direct get: {0}")]
    DirectGet(#[from] DirectGetError),
    /// The stream's info could not be read.
    #[error("stream info: {0}")]
    Info(#[from] InfoError),
    /// JetStream did not answer in time.
    #[error("timed out")]
    TimedOut,
    /// The namespace has no stream.
    #[error("no stream")]
    NoStream,
    /// The namespace's stream could not be made.
    #[error("JetStream stream for namespace {namespace}: {source}")]
    Create {
        /// The namespace.
        namespace: String,
        /// Why.
        source: async_nats::jetstream::context::CreateStreamError,
    },
}

/// One namespace's stream.
pub(super) struct NamespaceStream {
    stream: jetstream::stream::Stream,
    /// The stream's creation time in ms: the epoch of its rooms' positions.
    pub(super) epoch: u64,
    max_per_subject: u64,
}

/// An event read from a stream.
pub(super) struct Stored {
    pub(super) seq: u64,
    pub(super) headers: async_nats::HeaderMap,
    pub(super) payload: Bytes,
}

/// The streams of this node's namespaces, created or looked up on first use.
pub(super) struct Streams {
    js: jetstream::Context,
    prefix: SubjectPrefix,
    replicas: usize,
    by_namespace: Mutex<HashMap<String, Arc<NamespaceStream>>>,
}

/// The subject a room's stored events are republished on.
pub(super) fn sequenced_subject(prefix: &SubjectPrefix, room: &RoomName) -> String {
    let plain = subject::subject_for(prefix, room);
    let rest = &plain[prefix.as_str().len() + 1..];
    format!("{}.{SEQ_TOKEN}.{rest}", prefix.as_str())
}

/// The stream name of `namespace` under `prefix`.
pub(super) fn stream_name(prefix: &SubjectPrefix, namespace: &str) -> String {
    format!("{}_{namespace}", prefix.as_str().replace('.', "_"))
}

impl Streams {
    pub(super) fn new(client: async_nats::Client, prefix: SubjectPrefix, replicas: usize) -> Self {
        Streams {
            js: jetstream::new(client),
            prefix,
            replicas: replicas.max(1),
            by_namespace: Mutex::new(HashMap::new()),
        }
    }

    /// The stream of `room`'s namespace, created with `rule`'s limits when missing.
    pub(super) async fn get(
        &self,
        room: &RoomName,
        rule: &RoomRule,
    ) -> Result<Arc<NamespaceStream>, StreamReadError> {
        let namespace = room.namespace();
        let mut streams = self.by_namespace.lock().await;
        if let Some(stream) = streams.get(namespace) {
            return Ok(stream.clone());
        }
        let source = format!("{}.{namespace}.>", self.prefix.as_str());
        let ttl = rule.history.ttl;
        let config = Config {
            name: stream_name(&self.prefix, namespace),
            subjects: vec![source.clone()],
            max_messages_per_subject: i64::try_from(rule.history.events).unwrap_or(i64::MAX),
            max_age: ttl,
            // Zero would mean the server's default (2 min); keys are not sent then anyway.
            duplicate_window: rule.dedup_window.clamp(Duration::from_millis(100), ttl),
            allow_direct: true,
            storage: StorageType::File,
            num_replicas: self.replicas,
            republish: Some(Republish {
                source,
                destination: format!("{}.{SEQ_TOKEN}.{namespace}.>", self.prefix.as_str()),
                headers_only: false,
            }),
            ..Config::default()
        };
        let mut stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|source| StreamReadError::Create {
                namespace: namespace.to_owned(),
                source,
            })?;
        let info = stream.info().await?;
        let created_ms = info.created.unix_timestamp_nanos() / 1_000_000;
        let epoch = (u64::try_from(created_ms).unwrap_or(1) & ((1 << 53) - 1)).max(1);
        let max_per_subject = u64::try_from(info.config.max_messages_per_subject).unwrap_or(0);
        let stream = Arc::new(NamespaceStream {
            stream,
            epoch,
            max_per_subject,
        });
        streams.insert(namespace.to_owned(), stream.clone());
        Ok(stream)
    }

    /// The JetStream context, for publishing.
    pub(super) fn context(&self) -> &jetstream::Context {
        &self.js
    }
}

impl NamespaceStream {
    /// Where `room` stands: the sequence of its last stored event, or (no event) the stream's
    /// last sequence.
    pub(super) async fn position(&self, subject: &str) -> Result<u64, StreamReadError> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                Ok(self.stream.get_info().await?.state.last_sequence)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the stream still holds every event of `subject` after sequence `since` (see the
    /// module documentation).
    pub(super) async fn continuous_after(
        &self,
        subject: &str,
        since: u64,
    ) -> Result<bool, StreamReadError> {
        if since > 0 {
            match self.stream.direct_get(since).await {
                Ok(message) if message.subject.as_str() == subject => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut info = self.stream.info_with_subjects(subject).await?;
        let mut held = 0;
        while let Some(entry) = info.next().await {
            let (name, count) = entry?;
            if name == subject {
                held = count as u64;
            }
        }
        let first = self.stream.get_info().await?.state.first_sequence;
        Ok(first <= since.saturating_add(1) && held < self.max_per_subject)
    }

    /// The stored events of `subject` with sequence in `(after, upto]`, in order, up to
    /// `max_bytes` of payload (`None` beyond it).
    pub(super) async fn read(
        &self,
        subject: &str,
        after: u64,
        upto: u64,
        max_bytes: usize,
    ) -> Result<Option<Vec<Stored>>, StreamReadError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut next = after.saturating_add(1);
        while next <= upto {
            let message = match self
                .stream
                .direct_get_next_for_subject(subject, Some(next))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(e.into()),
            };
            if message.sequence > upto {
                break;
            }
            bytes += message.payload.len();
            if bytes > max_bytes {
                return Ok(None);
            }
            next = message.sequence.saturating_add(1);
            out.push(Stored {
                seq: message.sequence,
                headers: message.headers,
                payload: message.payload,
            });
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequenced_subjects_and_stream_names() {
        let prefix = SubjectPrefix::new("eu.rc").unwrap();
        let room = RoomName::new("orders:10.42").unwrap();
        assert_eq!(
            sequenced_subject(&prefix, &room),
            "eu.rc.SEQ.orders.10_2e42"
        );
        assert_eq!(stream_name(&prefix, "orders"), "eu_rc_orders");
        // Never one of the namespace's own subjects (namespaces are lower case).
        assert!(!sequenced_subject(&prefix, &room).starts_with("eu.rc.orders."));
    }
}
