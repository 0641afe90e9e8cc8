//! The NATS bridge: rooms as NATS subjects (async-nats, core NATS).
//!
//! Owns the node's NATS connection, the interest table (which room subjects this node wants),
//! one reader task per subscribed room subject, and the bounded publish queue. It hands
//! validated events to the hub ([`Hub::publish`], and [`Hub::sequenced`] for rooms numbered by
//! their stream) and nothing else: it does not touch sessions, transports or the hub's
//! internals. The guarantees are written in the parent module.
//!
//! # Message format (docs/PROTOCOL.md §11)
//!
//! Subject: [`super::subject::subject_for`]. Payload: the event's `data`, exactly one CBOR data item
//! (the bytes a client sends as `Publish.data`), never re-encoded. Headers:
//!
//! | header | required | value |
//! |---|---|---|
//! | `Roomcast-Event` | yes | the event name |
//! | `Roomcast-Room` | no | the room name; when present it must name the subject's room |
//! | `Roomcast-Origin` | no | the publishing node's id (`--node-id`), or any id of a backend |
//! | `Roomcast-Key` | no | the publish's idempotency key (1–64 bytes): every node drops a repeat within the room's dedup window |
//!
//! A message without a valid event name, with a room header naming another room, or whose
//! payload is not one well-formed CBOR item within the size and depth caps is dropped and
//! counted in `roomcast_nats_invalid_total`.
//!
//! # Interest
//!
//! The hub calls [`Interest::interest_on`]/[`Interest::interest_off`] (under its shard lock)
//! when a room gains its first or loses its last local subscriber. Those calls only update the
//! interest table (a mutex-protected map, one entry per room with local interest or lingering)
//! and wake the reconciler task, which subscribes and unsubscribes. A room that lost its last
//! subscriber keeps its subscription for the linger time; if it regains one meanwhile nothing
//! happens on the wire. A node never has two live reader tasks for one room: the old reader is
//! cancelled (and stops delivering) before a new subscription is made.
//!
//! # JetStream check
//!
//! Rooms with history need JetStream on the node's NATS server. Unless `--no-nats-history`,
//! the node asks for its JetStream account info on every (re)connect, after a failed
//! JetStream request, and every few seconds while JetStream is missing. Without it the node is
//! not ready (`/readyz`: `JetStream unavailable`), publishes to rooms with history are
//! refused with `unavailable` at once (no log line each), `roomcast_nats_jetstream_available`
//! is 0, and one ERROR line per change says what to do.
//!
//! # Modules
//!
//! This module owns the connection (options, events, readiness, the JetStream check) and the
//! [`Bridge`] implementation; `interest` the interest table and its reconciler (the decisions
//! of one pass are unit-tested without NATS), `reader` the room readers,
//! `publish` the publisher and acker tasks, `message` the pure checks of messages from NATS
//! (unit-tested).

mod interest;
mod message;
mod publish;
mod reader;

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use async_nats::{Client, ConnectOptions, Event, connection::State, jetstream};
use roomcast_protocol::{EventName, Payload, PayloadLimits, RoomName};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use self::message::{HEADER_EVENT, HEADER_KEY, HEADER_ORIGIN, HEADER_ROOM};
use self::{
    interest::{Table, reconcile},
    publish::{Outbound, publisher},
    reader::Inbound,
};
use super::{Bridge, ReplyTo, Unavailable, stream::Streams};
use crate::{
    config::ClusterConfig,
    hub::{Delivery, Hub, Interest, RoomRules},
    metrics::{Metrics, NatsMetrics},
};

/// Longest node id, in bytes.
const MAX_NODE_ID: usize = 64;

/// What a refused publish to a room with history says while the NATS server has no JetStream.
pub(super) const NO_JETSTREAM: &str = "JetStream unavailable on the NATS server";
/// How often JetStream is looked for again while it is missing.
const JETSTREAM_RECHECK: Duration = Duration::from_secs(3);
/// Longest wait for the JetStream account info.
const JETSTREAM_CHECK_WAIT: Duration = Duration::from_secs(5);

/// Whether the NATS server offers JetStream to this node, as last checked.
#[derive(Default)]
pub(super) struct JetStreamCheck {
    /// [`Self::UNKNOWN`], [`Self::AVAILABLE`] or [`Self::MISSING`].
    state: AtomicU8,
    /// Rung on every (re)connect and after a failed JetStream request: check again.
    pub(super) recheck: Notify,
}

impl JetStreamCheck {
    const UNKNOWN: u8 = 0;
    const AVAILABLE: u8 = 1;
    pub(super) const MISSING: u8 = 2;

    pub(super) fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Records the outcome of a check; logs a change once.
    fn record(&self, missing: Option<String>, metrics: &NatsMetrics) {
        let new = if missing.is_some() {
            Self::MISSING
        } else {
            Self::AVAILABLE
        };
        metrics
            .jetstream_available
            .set(i64::from(new == Self::AVAILABLE));
        let old = self.state.swap(new, Ordering::AcqRel);
        match missing {
            Some(cause) if old != Self::MISSING => error!(
                %cause,
                "JetStream unavailable on the NATS server: publishes to rooms with history are refused (`unavailable`) and /readyz answers 503; enable `jetstream {{}}` on the NATS server, or run roomcast with --no-nats-history"
            ),
            None if old == Self::MISSING => info!("JetStream available again: the node is ready"),
            None if old == Self::UNKNOWN => debug!("JetStream available"),
            _ => {}
        }
    }
}

/// Why the NATS bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--node-id` is not 1–64 bytes of visible ASCII.
    #[error("--node-id must be 1-64 visible ASCII characters")]
    BadNodeId,
    /// The credentials file could not be read.
    #[error("reading the NATS credentials file: {0}")]
    Credentials(std::io::Error),
    /// The NATS URLs or options were refused.
    #[error("connecting to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// Cluster mode over NATS. Build with [`NatsBridge::new`] (before the hub, which needs its
/// interest listener), then [`NatsBridge::start`] once the hub exists.
pub struct NatsBridge {
    config: ClusterConfig,
    /// How each namespace's rooms behave (the hub is built with the same).
    rules: Arc<RoomRules>,
    node_id: String,
    table: Arc<Table>,
    queue: mpsc::Sender<Outbound>,
    queue_rx: Mutex<Option<mpsc::Receiver<Outbound>>>,
    client: OnceLock<Client>,
    /// Set by the event callback; with the client's own state it decides readiness.
    connected: Arc<AtomicBool>,
    /// JetStream on the server (looked at only when rooms keep history).
    jetstream: Arc<JetStreamCheck>,
    metrics: NatsMetrics,
}

impl NatsBridge {
    /// A bridge for `config` (cluster mode must be on) whose rooms follow `rules` (the
    /// hub's); nothing connects yet.
    pub fn new(config: &ClusterConfig, rules: RoomRules, metrics: &Metrics, boot_id: u64) -> Self {
        let (queue, queue_rx) = mpsc::channel(config.nats_publish_queue.max(1));
        NatsBridge {
            node_id: config
                .node_id
                .clone()
                .unwrap_or_else(|| format!("node-{boot_id:x}")),
            config: config.clone(),
            rules: Arc::new(rules),
            table: Arc::default(),
            queue,
            queue_rx: Mutex::new(Some(queue_rx)),
            client: OnceLock::new(),
            connected: Arc::default(),
            jetstream: Arc::default(),
            metrics: metrics.nats.clone(),
        }
    }

    /// The interest listener the hub calls: the table of rooms this node wants.
    pub fn interest(&self) -> Arc<dyn Interest> {
        self.table.clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Connects (in the background: the broker starts even while NATS is down, and `/readyz`
    /// says not ready until the connection is up) and starts the publisher and reconciler
    /// tasks, which end when `shutdown` is cancelled.
    pub async fn start(
        &self,
        hub: Arc<Hub>,
        metrics: &Metrics,
        limits: PayloadLimits,
        max_payload: usize,
        max_replay: usize,
        shutdown: CancellationToken,
    ) -> Result<(), StartError> {
        let id = &self.node_id;
        if id.is_empty()
            || id.len() > MAX_NODE_ID
            || !id.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            return Err(StartError::BadNodeId);
        }
        let options = self.options().await?;
        let client = options.connect(self.config.nats.clone()).await?;
        info!(node_id = %self.node_id, servers = ?self.config.nats, prefix = self.config.nats_subject_prefix.as_str(), "cluster mode: NATS");
        let _ = self.client.set(client.clone());
        let queue = self
            .queue_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let streams = Arc::new(Streams::new(
            client.clone(),
            self.config.nats_subject_prefix.clone(),
            self.config.nats_history_replicas,
        ));
        if !self.config.no_nats_history {
            tokio::spawn(watch_jetstream(
                streams.context().clone(),
                self.connected.clone(),
                self.jetstream.clone(),
                self.metrics.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(queue) = queue {
            tokio::spawn(publisher(
                client.clone(),
                queue,
                self.rules.clone(),
                streams.clone(),
                self.jetstream.clone(),
                self.config.nats_subject_prefix.clone(),
                self.node_id.clone(),
                self.metrics.clone(),
                shutdown.clone(),
            ));
        }
        let inbound = Arc::new(Inbound {
            hub,
            rules: self.rules.clone(),
            streams,
            prefix: self.config.nats_subject_prefix.clone(),
            max_replay,
            limits,
            max_payload,
            metrics: self.metrics.clone(),
            events_out: metrics.events_out.clone(),
        });
        tokio::spawn(reconcile(
            client,
            self.table.clone(),
            inbound,
            self.config.nats_subject_prefix.clone(),
            self.config.nats_interest_linger,
            shutdown,
        ));
        Ok(())
    }

    async fn options(&self) -> Result<ConnectOptions, StartError> {
        let c = &self.config;
        let mut options = match &c.nats_credentials {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(StartError::Credentials)?,
            None => ConnectOptions::new(),
        };
        if let Some(token) = &c.nats_token {
            options = options.token(token.0.clone());
        }
        if let (Some(user), Some(password)) = (&c.nats_user, &c.nats_password) {
            options = options.user_and_password(user.clone(), password.0.clone());
        }
        if let Some(ca) = &c.nats_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&c.nats_tls_cert, &c.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if c.nats_require_tls {
            options = options.require_tls(true);
        }
        let connected = self.connected.clone();
        let jetstream = self.jetstream.clone();
        let metrics = self.metrics.clone();
        Ok(options
            .name(format!("roomcast {}", self.node_id))
            .retry_on_initial_connect()
            .subscription_capacity(c.nats_subscription_capacity.max(1))
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            // First retries at once, then backing off to at most 2 s: a restarted server is
            // found quickly, a dead one is not hammered.
            .reconnect_delay_callback(|attempts| {
                let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                Duration::from_millis(10u64.saturating_mul(2u64.saturating_pow(exp)))
                    .min(Duration::from_secs(2))
            })
            .event_callback(move |event| {
                let connected = connected.clone();
                let jetstream = jetstream.clone();
                let metrics = metrics.clone();
                async move { on_event(event, &connected, &jetstream, &metrics) }
            }))
    }

    fn client_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
            && self
                .client
                .get()
                .is_some_and(|c| c.connection_state() == State::Connected)
    }
}

fn on_event(
    event: Event,
    connected: &AtomicBool,
    jetstream: &JetStreamCheck,
    metrics: &NatsMetrics,
) {
    match event {
        Event::Connected => {
            connected.store(true, Ordering::Release);
            metrics.connected.set(1);
            info!("NATS connected");
            // Another server of a cluster may be configured differently.
            jetstream.recheck.notify_one();
        }
        Event::Disconnected => {
            connected.store(false, Ordering::Release);
            metrics.connected.set(0);
            metrics.disconnects.inc();
            warn!("NATS disconnected: publishes fail with `unavailable` until it reconnects");
        }
        Event::Closed => {
            connected.store(false, Ordering::Release);
            metrics.connected.set(0);
            info!("NATS connection closed");
        }
        Event::SlowConsumer(sid) => {
            metrics.slow_consumers.inc();
            warn!(
                sid,
                "NATS slow consumer: messages of a room subscription were dropped (raise --nats-subscription-capacity or add nodes)"
            );
        }
        Event::LameDuckMode => warn!("NATS server entered lame duck mode"),
        Event::Draining => debug!("NATS draining"),
        Event::ServerError(e) => warn!(error = %e, "NATS server error"),
        Event::ClientError(e) => warn!(error = %e, "NATS client error"),
    }
}

impl Bridge for NatsBridge {
    fn publish(
        &self,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
        reply: ReplyTo,
    ) -> Result<Option<Delivery>, Unavailable> {
        if !self.client_connected() {
            return Err(Unavailable("not connected to NATS"));
        }
        let rule = self.rules.rule(room);
        let stored = rule.sequenced && !rule.volatile;
        if stored && self.jetstream.state() == JetStreamCheck::MISSING {
            return Err(Unavailable(NO_JETSTREAM));
        }
        let outbound = Outbound {
            room: room.clone(),
            event: event.clone(),
            data: data.as_bytes().clone(),
            key: key.map(Box::from),
            stored: stored.then_some(reply),
        };
        match self.queue.try_send(outbound) {
            Ok(()) if stored => Ok(None),
            Ok(()) => Ok(Some(Delivery::default())),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(Unavailable("the NATS publish queue is full"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Unavailable("NATS bridge stopped")),
        }
    }

    fn not_ready(&self) -> Option<&'static str> {
        if !self.client_connected() {
            return Some("not connected to NATS");
        }
        if self.config.no_nats_history {
            return None;
        }
        match self.jetstream.state() {
            JetStreamCheck::AVAILABLE => None,
            JetStreamCheck::MISSING => Some("JetStream unavailable"),
            _ => Some("checking JetStream"),
        }
    }
}

/// Checks for JetStream on every (re)connect, when asked, and every
/// [`JETSTREAM_RECHECK`] while it is missing (see the module documentation).
async fn watch_jetstream(
    js: jetstream::Context,
    connected: Arc<AtomicBool>,
    check: Arc<JetStreamCheck>,
    metrics: NatsMetrics,
    shutdown: CancellationToken,
) {
    loop {
        // No answer either way (a JetStream cluster electing its leader, a timeout): the
        // state stays, the next check comes soon.
        let mut undecided = false;
        if connected.load(Ordering::Acquire) {
            let answer = tokio::select! {
                answer = ask_jetstream(&js) => answer,
                () = shutdown.cancelled() => break,
            };
            // An answer lost with the connection says nothing about JetStream: the
            // reconnect asks again.
            match answer {
                Ok(missing) if connected.load(Ordering::Acquire) => {
                    check.record(missing, &metrics);
                }
                Ok(_) => undecided = true,
                Err(e) => {
                    debug!(error = %e, "JetStream check: no answer");
                    undecided = true;
                }
            }
        }
        let again = undecided || check.state() != JetStreamCheck::AVAILABLE;
        tokio::select! {
            () = check.recheck.notified() => {}
            () = tokio::time::sleep(JETSTREAM_RECHECK), if again => {}
            () = shutdown.cancelled() => break,
        }
    }
}

/// Why a JetStream check gave no answer either way (the state stays as it was).
#[derive(Debug, thiserror::Error)]
enum Undecided {
    /// JetStream answered with another error.
    #[error("JetStream answered: {0}")]
    Answered(jetstream::Error),
    /// The request failed.
    #[error("request failed: {0}")]
    Request(#[from] jetstream::context::RequestError),
    /// No answer in time.
    #[error("timed out")]
    TimedOut,
}

/// Asks for the account's JetStream info: `Ok(None)` JetStream is there, `Ok(Some(why))` the
/// server (or the account) has none, `Err` no answer either way.
async fn ask_jetstream(js: &jetstream::Context) -> Result<Option<String>, Undecided> {
    use jetstream::{ErrorCode, context::RequestErrorKind, response::Response};
    // Not parsed further: async-nats' `Account` wants fields older servers do not send.
    let request = js.request::<_, _, Response<serde::de::IgnoredAny>>("INFO", b"");
    match tokio::time::timeout(JETSTREAM_CHECK_WAIT, request).await {
        Ok(Ok(Response::Ok(_))) => Ok(None),
        Ok(Ok(Response::Err { error }))
            if matches!(
                error.error_code(),
                ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            ) =>
        {
            Ok(Some(error.to_string()))
        }
        Ok(Ok(Response::Err { error })) => Err(Undecided::Answered(error)),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
            Ok(Some("nothing answers the JetStream API".to_owned()))
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Undecided::TimedOut),
    }
}

/// Longest wait for JetStream before a room goes live without history.
pub(super) const STREAM_WAIT: Duration = Duration::from_secs(2);
