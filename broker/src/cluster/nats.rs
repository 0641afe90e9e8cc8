//! The NATS bridge: rooms as NATS subjects (async-nats, core NATS).
//!
//! Owns the node's NATS connection, the interest table (which room subjects this node wants),
//! one reader task per subscribed room subject, and the bounded publish queue. It hands
//! validated events to [`Hub::publish`] and nothing else: it does not touch sessions,
//! transports or the hub's internals. The guarantees are written in the parent module.
//!
//! # Message format (docs/PROTOCOL.md §11)
//!
//! Subject: [`subject::subject_for`]. Payload: the event's `data`, exactly one CBOR data item
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

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{
    Client, ConnectOptions, Event, HeaderMap, Message, Subscriber,
    connection::State,
    jetstream::{self, context::PublishAckFuture},
};
use bytes::Bytes;
use futures_util::StreamExt;
use roomcast_protocol::{
    EventName, Payload, PayloadLimits, Position, RoomName, frame::MAX_IDEMPOTENCY_KEY_LEN,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    Bridge, ReplyTo, Unavailable,
    stream::{self as history, Streams},
    subject,
};
use crate::{
    config::ClusterConfig,
    hub::{Delivery, Hub, Interest, RoomRule, RoomRules},
    metrics::{Metrics, NatsMetrics},
};

/// Header carrying the event name (required).
pub const HEADER_EVENT: &str = "Roomcast-Event";
/// Header carrying the room name (optional; must match the subject's room).
pub const HEADER_ROOM: &str = "Roomcast-Room";
/// Header carrying the publishing node's id (informational).
pub const HEADER_ORIGIN: &str = "Roomcast-Origin";
/// Header carrying a publish's idempotency key.
pub const HEADER_KEY: &str = "Roomcast-Key";

/// Longest node id, in bytes.
const MAX_NODE_ID: usize = 64;
/// Longest wait for the server to confirm new room subscriptions before their `Subscribed`
/// replies go out anyway.
const LIVE_CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// What a refused publish to a room with history says while the NATS server has no JetStream.
const NO_JETSTREAM: &str = "JetStream unavailable on the NATS server";
/// How often JetStream is looked for again while it is missing.
const JETSTREAM_RECHECK: Duration = Duration::from_secs(3);
/// Longest wait for the JetStream account info.
const JETSTREAM_CHECK_WAIT: Duration = Duration::from_secs(5);

/// Whether the NATS server offers JetStream to this node, as last checked.
#[derive(Default)]
struct JetStreamCheck {
    /// [`Self::UNKNOWN`], [`Self::AVAILABLE`] or [`Self::MISSING`].
    state: AtomicU8,
    /// Rung on every (re)connect and after a failed JetStream request: check again.
    recheck: Notify,
}

impl JetStreamCheck {
    const UNKNOWN: u8 = 0;
    const AVAILABLE: u8 = 1;
    const MISSING: u8 = 2;

    fn state(&self) -> u8 {
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

/// One event waiting to be handed to NATS.
struct Outbound {
    room: RoomName,
    event: EventName,
    data: Bytes,
    key: Option<Box<str>>,
    /// Sequenced rooms: published through JetStream, answered once stored.
    stored: Option<ReplyTo>,
}

/// A room reader's doorbell (sequenced rooms): rung when the room's subscription is confirmed,
/// when the room comes back while lingering, and when a subscriber waits to recover.
#[derive(Default)]
struct RoomHandle {
    poke: Notify,
    /// The subscription is in force on the node's server.
    confirmed: AtomicBool,
}

/// What the node wants for one room.
struct Want {
    /// A local subscriber exists.
    on: bool,
    /// When the room last lost its last local subscriber.
    off_since: Instant,
    /// The room is in `Table::changed`.
    queued: bool,
    /// The room is in the reconciler's linger queue.
    lingering: bool,
}

#[derive(Default)]
struct TableState {
    rooms: HashMap<RoomName, Want>,
    /// Rooms whose `Want` changed since the reconciler last looked (no duplicates).
    changed: Vec<RoomName>,
    /// The readers of sequenced rooms.
    handles: HashMap<RoomName, Arc<RoomHandle>>,
}

/// The interest table the hub writes into.
#[derive(Default)]
struct Table {
    state: Mutex<TableState>,
    wake: Notify,
}

impl Table {
    fn set(&self, room: &RoomName, on: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let TableState { rooms, changed, .. } = &mut *state;
        let want = rooms.entry(room.clone()).or_insert(Want {
            on,
            off_since: Instant::now(),
            queued: false,
            lingering: false,
        });
        want.on = on;
        if !on {
            want.off_since = Instant::now();
        }
        if !want.queued {
            want.queued = true;
            changed.push(room.clone());
        }
        drop(state);
        self.wake.notify_one();
    }
}

impl Interest for Table {
    fn interest_on(&self, room: &RoomName) {
        self.set(room, true);
    }
    fn interest_off(&self, room: &RoomName) {
        self.set(room, false);
    }
    fn confirms_live(&self) -> bool {
        true
    }
    fn recovery_requested(&self, room: &RoomName) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // No reader yet: it answers waiting recoveries as soon as it starts.
        if let Some(handle) = state.handles.get(room) {
            handle.poke.notify_one();
        }
    }
}

/// What incoming messages need to be checked and delivered.
struct Inbound {
    hub: Arc<Hub>,
    /// How each namespace's rooms behave (as the hub's).
    rules: Arc<RoomRules>,
    streams: Arc<Streams>,
    prefix: subject::SubjectPrefix,
    /// Bytes of payload one recovery may replay (the session's outbound queue cap).
    max_replay: usize,
    limits: PayloadLimits,
    max_payload: usize,
    metrics: NatsMetrics,
    events_out: prometheus_client::metrics::counter::Counter,
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

/// Asks for the account's JetStream info: `Ok(None)` JetStream is there, `Ok(Some(why))` the
/// server (or the account) has none, `Err` no answer either way.
async fn ask_jetstream(js: &jetstream::Context) -> Result<Option<String>, String> {
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
        Ok(Ok(Response::Err { error })) => Err(error.to_string()),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
            Ok(Some("nothing answers the JetStream API".to_owned()))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Hands queued events to NATS in queue order (one task: per-publisher order is kept).
#[allow(clippy::too_many_arguments)] // the task's whole state, moved in
async fn publisher(
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
                stream.unwrap_or_else(|_| Err("JetStream did not answer in time".to_owned()))
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

/// Longest wait for JetStream before a room goes live without history.
const STREAM_WAIT: Duration = Duration::from_secs(2);

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

/// Keeps one subscription per room the table wants (plus linger), none for the others.
async fn reconcile(
    client: Client,
    table: Arc<Table>,
    inbound: Arc<Inbound>,
    prefix: subject::SubjectPrefix,
    linger: Duration,
    shutdown: CancellationToken,
) {
    // Rooms with a live subscription, with the token that stops their reader.
    let mut active: HashMap<RoomName, CancellationToken> = HashMap::new();
    // Rooms waiting for their linger to end, in deadline order (linger is one constant).
    let mut lingering: VecDeque<(Instant, RoomName)> = VecDeque::new();
    // A private subject this node sends itself a message on after new SUBs: the server
    // handles one connection's commands in order, so when the message is back the SUBs are
    // in force on the node's server (async-nats' flush only empties the write buffer).
    let mut confirm = Confirm::new(&client).await;
    loop {
        let now = Instant::now();
        let mut subscribe = Vec::new();
        // Rooms back while their subscription still lingers: live already.
        let mut live = Vec::new();
        {
            let mut state = table.state.lock().unwrap_or_else(|e| e.into_inner());
            for room in std::mem::take(&mut state.changed) {
                let Some(want) = state.rooms.get_mut(&room) else {
                    continue;
                };
                want.queued = false;
                if want.on {
                    if active.contains_key(&room) {
                        live.push(room);
                    } else {
                        subscribe.push(room);
                    }
                } else if active.contains_key(&room) {
                    if !want.lingering {
                        want.lingering = true;
                        lingering.push_back((want.off_since + linger, room));
                    }
                } else {
                    state.rooms.remove(&room);
                }
            }
            // Lingers that ended: unsubscribe unless the room came back meanwhile.
            while let Some((deadline, _)) = lingering.front() {
                if *deadline > now {
                    break;
                }
                let Some((_, room)) = lingering.pop_front() else {
                    break;
                };
                match state.rooms.get_mut(&room) {
                    Some(want) if want.on => want.lingering = false,
                    Some(want) if want.off_since + linger > now => {
                        // Left again later than this entry says: wait for the newer deadline.
                        lingering.push_back((want.off_since + linger, room));
                    }
                    _ => {
                        state.rooms.remove(&room);
                        state.handles.remove(&room);
                        if let Some(stop) = active.remove(&room) {
                            // The reader stops before any new subscription for the room exists.
                            stop.cancel();
                            debug!(%room, "NATS interest off");
                        }
                    }
                }
            }
        }
        for room in &live {
            mark_live(&table, &inbound, room);
        }
        for room in subscribe.iter().cloned() {
            let rule = inbound.rules.rule(&room).clone();
            let sequenced = rule.sequenced && !rule.volatile;
            let subject = if sequenced {
                history::sequenced_subject(&prefix, &room)
            } else {
                subject::subject_for(&prefix, &room)
            };
            let subscribed = tokio::select! {
                subscribed = client.subscribe(subject) => subscribed,
                () = shutdown.cancelled() => break,
            };
            match subscribed {
                Ok(subscriber) => {
                    debug!(%room, sequenced, "NATS interest on");
                    let stop = shutdown.child_token();
                    if sequenced {
                        let handle = Arc::new(RoomHandle::default());
                        table
                            .state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .handles
                            .insert(room.clone(), handle.clone());
                        tokio::spawn(read_sequenced_room(
                            room.clone(),
                            rule,
                            subscriber,
                            inbound.clone(),
                            handle,
                            stop.clone(),
                        ));
                    } else {
                        tokio::spawn(read_room(
                            room.clone(),
                            subscriber,
                            inbound.clone(),
                            stop.clone(),
                        ));
                    }
                    active.insert(room, stop);
                }
                Err(e) => warn!(error = %e, %room, "NATS subscribe failed"),
            }
        }
        if !subscribe.is_empty() {
            // Once a message sent after the SUBs is back, the node's server routes the rooms'
            // messages here: only then do the waiting `Subscribed` replies go out. While NATS
            // is unreachable the round trip cannot complete; the replies go out after the
            // bound (publishes are refused with `unavailable` meanwhile, and events from other
            // nodes may be missed until the connection is back).
            let confirmed = tokio::select! {
                confirmed = tokio::time::timeout(LIVE_CONFIRM_WAIT, confirm.round_trip(&client)) => confirmed,
                () = shutdown.cancelled() => break,
            };
            if !matches!(confirmed, Ok(true)) {
                warn!(
                    rooms = subscribe.len(),
                    "NATS subscriptions not confirmed in time"
                );
            }
            for room in &subscribe {
                mark_live(&table, &inbound, room);
            }
        }
        inbound.metrics.subscriptions.set(active.len() as i64);
        let next_deadline = lingering.front().map(|(d, _)| *d);
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = table.wake.notified() => {}
            () = sleep => {}
            () = shutdown.cancelled() => break,
        }
    }
    for stop in active.values() {
        stop.cancel();
    }
}

/// The room's subscription is in force: plain rooms go live at once; a sequenced room's reader
/// first reads where the room stands in its stream.
fn mark_live(table: &Table, inbound: &Inbound, room: &RoomName) {
    let handle = table
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .handles
        .get(room)
        .cloned();
    match handle {
        Some(handle) => {
            handle.confirmed.store(true, Ordering::Release);
            handle.poke.notify_one();
        }
        None => inbound.hub.mark_live(room),
    }
}

/// A round trip through the node's NATS server on a private subject (see [`reconcile`]).
struct Confirm {
    subject: async_nats::Subject,
    replies: Option<Subscriber>,
    round: u64,
}

impl Confirm {
    async fn new(client: &Client) -> Confirm {
        let subject = async_nats::Subject::from(client.new_inbox());
        let replies = match client.subscribe(subject.clone()).await {
            Ok(replies) => Some(replies),
            Err(e) => {
                warn!(error = %e, "NATS: no confirmation subject; Subscribed replies will not wait");
                None
            }
        };
        Confirm {
            subject,
            replies,
            round: 0,
        }
    }

    /// Sends the next round's message to itself and waits for it (skipping older rounds'
    /// late ones). `false` when it cannot.
    async fn round_trip(&mut self, client: &Client) -> bool {
        let Some(replies) = &mut self.replies else {
            return false;
        };
        self.round += 1;
        let token = Bytes::from(self.round.to_string());
        if client
            .publish(self.subject.clone(), token.clone())
            .await
            .is_err()
            || client.flush().await.is_err()
        {
            return false;
        }
        while let Some(message) = replies.next().await {
            if message.payload == token {
                return true;
            }
        }
        false
    }
}

/// Delivers one room subject's messages to the hub, in arrival order, until stopped. Dropping
/// the subscriber unsubscribes.
async fn read_room(
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
async fn read_sequenced_room(
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
                let numbers = message.headers.as_ref().and_then(|h| {
                    let seq = h.get(async_nats::header::NATS_SEQUENCE)?.as_str().parse::<u64>().ok()?;
                    let previous = h
                        .get(async_nats::header::NATS_LAST_SEQUENCE)
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    Some((seq, previous))
                });
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

/// Validates a message from NATS: event header, optional room header, payload.
fn check(
    room: &RoomName,
    message: Message,
    limits: PayloadLimits,
    max_payload: usize,
) -> Result<(EventName, Payload, Option<String>), &'static str> {
    let headers = message.headers.unwrap_or_default();
    check_parts(room, &headers, message.payload, limits, max_payload)
}

/// [`check`] on a message's parts (also for messages read from a stream).
fn check_parts(
    room: &RoomName,
    headers: &HeaderMap,
    payload: Bytes,
    limits: PayloadLimits,
    max_payload: usize,
) -> Result<(EventName, Payload, Option<String>), &'static str> {
    let key = match headers.get(HEADER_KEY) {
        Some(k) if k.as_str().is_empty() || k.as_str().len() > MAX_IDEMPOTENCY_KEY_LEN => {
            return Err("bad Roomcast-Key header");
        }
        Some(k) => Some(k.as_str().to_owned()),
        None => None,
    };
    let event = headers
        .get(HEADER_EVENT)
        .ok_or("no Roomcast-Event header")?;
    let event = EventName::new(event.as_str()).map_err(|_| "bad Roomcast-Event header")?;
    if let Some(named) = headers.get(HEADER_ROOM) {
        if named.as_str() != room.as_str() {
            return Err("Roomcast-Room names another room");
        }
    }
    if payload.len() > max_payload {
        return Err("payload larger than --max-frame-size");
    }
    let data = Payload::new(payload, limits).map_err(|_| "payload is not one CBOR item")?;
    Ok((event, data, key))
}
