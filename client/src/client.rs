//! The [`Client`] handle, [`connect`] and [`ClientBuilder`].
//!
//! Owns opening the first session (trying each URL once, in order) and turning method calls
//! into driver commands with reply channels. It must not touch the socket after the
//! handshake, nor reconnect: the driver task owns the connection from then on.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use roomcast_protocol::{ClientFrame, Payload, RoomName};
use serde::Serialize;
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};
use tracing::Instrument;

use crate::{
    command::Command,
    connection::{self, ByScheme, OpenError},
    driver::{Driver, Setup},
    error::{CloseInfo, Error},
    key::IdempotencyKey,
    options::ConnectOptions,
    reconnect::{ReconnectPolicy, random_jitter},
    state::{ClientEvent, ClientEvents, ConnectionState, EVENT_QUEUE, Phase, Status},
    subscription::{Buffer, Subscription},
    token::TokenProvider,
    transport::Endpoint,
};

/// Commands waiting for the driver. Callers wait for room when it is full.
const COMMAND_QUEUE: usize = 256;

/// Opens a session: connects the transport the URL's scheme selects (`ws://` or `wss://` for
/// WebSocket, `https://` for WebTransport, e.g. `https://127.0.0.1:4433/wt`), sends `Hello`
/// with [`roomcast_protocol::PROTOCOL_VERSION`] and the token, and waits for `Welcome`, all
/// within [`ConnectOptions::connect_timeout`]. The certificate options
/// ([`ConnectOptions::cert_hash`], [`ConnectOptions::ca_file`], [`ConnectOptions::insecure`])
/// apply to WebTransport only.
///
/// The session ends with the connection unless [`ConnectOptions::reconnect`] is set; for
/// several broker URLs use [`Client::builder`].
///
/// Fails with [`Error::InvalidUrl`] for a bad URL or an unsupported scheme, [`Error::Transport`]
/// when the connection cannot be made (including a certificate the options do not accept),
/// [`Error::Closed`] when the broker refuses the session, [`Error::Timeout`], [`Error::Token`]
/// when the token provider fails.
pub async fn connect(url: &str, options: ConnectOptions) -> Result<Client, Error> {
    ClientBuilder {
        urls: vec![url.to_owned()],
        options,
    }
    .connect()
    .await
}

/// Builds a [`Client`] for one or several broker URLs (nodes of one cluster, or the same
/// broker over WebTransport and WebSocket), with reconnect **on** by default.
///
/// ```no_run
/// # async fn demo() -> Result<(), roomcast_client::Error> {
/// use roomcast_client::{Client, TokenProvider};
///
/// let client = Client::builder()
///     .url("https://node-a.example:4433/wt")
///     .url("wss://node-a.example:4433/ws")
///     .url("wss://node-b.example:4433/ws")
///     .token_provider(TokenProvider::new(|| async {
///         Ok::<_, std::io::Error>("a fresh JWT".to_owned())
///     }))
///     .connect()
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
///
/// The first session is opened to the first URL that accepts one, trying each once in order
/// (an error from the last one is returned when none does). After a lost connection every
/// attempt moves on to the next URL, round robin (see [`ReconnectPolicy`]).
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    urls: Vec<String>,
    options: ConnectOptions,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            urls: Vec::new(),
            options: ConnectOptions {
                reconnect: Some(ReconnectPolicy::default()),
                ..ConnectOptions::default()
            },
        }
    }
}

impl ClientBuilder {
    /// A builder with no URL, default options and reconnect on.
    pub fn new() -> Self {
        ClientBuilder::default()
    }

    /// Adds a broker URL (tried in the order added).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// Adds several broker URLs (tried in the order given).
    pub fn urls<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.urls.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Replaces every option, reconnect included (the builder's default of reconnecting is
    /// kept only if `options.reconnect` says so).
    pub fn options(mut self, options: ConnectOptions) -> Self {
        self.options = options;
        self
    }

    /// Reconnects with `policy` ([`ConnectOptions::reconnect`]).
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.options.reconnect = Some(policy);
        self
    }

    /// Never reconnects: the client ends with its first session.
    pub fn no_reconnect(mut self) -> Self {
        self.options.reconnect = None;
        self
    }

    /// The token of the first session ([`ConnectOptions::token`]).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.options.token = Some(token.into());
        self
    }

    /// Where tokens come from for reconnects and refreshes
    /// ([`ConnectOptions::token_provider`]).
    pub fn token_provider(mut self, provider: TokenProvider) -> Self {
        self.options.token_provider = Some(provider);
        self
    }

    /// Gives plain publishes random idempotency keys
    /// ([`ConnectOptions::auto_idempotency_keys`]).
    pub fn auto_idempotency_keys(mut self, on: bool) -> Self {
        self.options.auto_idempotency_keys = on;
        self
    }

    /// Opens the first session (see [`ClientBuilder`]) and starts the connection task.
    ///
    /// Fails with [`Error::InvalidUrl`] when there is no URL or one cannot be used, else with
    /// the last URL's error when no URL accepts a session, or at once with a refusal whose
    /// `reconnect` is false (e.g. `unauthorized`).
    pub async fn connect(self) -> Result<Client, Error> {
        let ClientBuilder { urls, options } = self;
        if urls.is_empty() {
            return Err(Error::InvalidUrl("no broker URL given".into()));
        }
        for url in &urls {
            Endpoint::parse(url)?;
        }
        let mut failure = None;
        for (index, url) in urls.iter().enumerate() {
            let token = match (&options.token, &options.token_provider) {
                (Some(token), _) => Some(token.clone()),
                (None, Some(provider)) => Some(provider.fetch().await?),
                (None, None) => None,
            };
            match connection::open(url, token, &options).await {
                Ok(opened) => return Ok(start(opened, urls, index, options)),
                Err(OpenError { error, .. }) => {
                    tracing::debug!(url, %error, "connect failed");
                    if matches!(&error, Error::Closed(info) if !info.reconnect)
                        || matches!(error, Error::InvalidUrl(_))
                    {
                        return Err(error);
                    }
                    failure = Some(error);
                }
            }
        }
        Err(failure.unwrap_or_else(|| Error::InvalidUrl("no broker URL given".into())))
    }
}

/// Spawns the driver for a welcomed session and returns its handle.
fn start(
    opened: connection::Opened<connection::Link>,
    urls: Vec<String>,
    url_index: usize,
    options: ConnectOptions,
) -> Client {
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (status_tx, status_rx) = watch::channel(Status {
        phase: Phase::Open {
            url: urls[url_index].clone(),
        },
        welcome: opened.welcome.clone(),
    });
    let (events_tx, events_rx) = broadcast::channel(EVENT_QUEUE);
    let next_id = Arc::new(AtomicU64::new(1));
    let span = tracing::info_span!("roomcast_client");
    let client = Client {
        inner: Arc::new(Inner {
            commands: commands_tx,
            next_id: Arc::clone(&next_id),
            status: status_rx,
            events: events_rx,
            auto_keys: options.auto_idempotency_keys,
        }),
    };
    let driver = Driver::new(Setup {
        connector: ByScheme,
        opened,
        urls,
        url_index,
        options,
        commands: commands_rx,
        status: status_tx,
        events: events_tx,
        next_id,
        jitter: random_jitter(),
    });
    tokio::spawn(driver.run().instrument(span));
    client
}

/// A handle to the client's connection. Cloning is cheap; all clones share the connection,
/// which stays open (reconnecting when [`ConnectOptions::reconnect`] says so) until
/// [`Client::close`] is called, the broker ends it for good, or every handle and
/// [`Subscription`] is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    /// Request ids, shared with the driver (which needs some for its own requests).
    next_id: Arc<AtomicU64>,
    status: watch::Receiver<Status>,
    /// Never read: the template for [`Client::events`] receivers.
    events: broadcast::Receiver<ClientEvent>,
    auto_keys: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.session_id())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A [`ClientBuilder`]: several URLs, reconnect on by default.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// The session id the broker assigned in the current (or last) session's `Welcome`.
    pub fn session_id(&self) -> String {
        self.inner.status.borrow().welcome.session_id.clone()
    }

    /// The interval at which the client pings when otherwise idle (from the current
    /// session's `Welcome`; zero when the broker asked for no pings).
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.inner.status.borrow().welcome.ping_interval_ms)
    }

    /// The largest frame the broker accepts, bytes (from the current session's `Welcome`).
    pub fn max_frame_size(&self) -> u64 {
        self.inner.status.borrow().welcome.max_frame_size
    }

    /// Where the connection is now.
    pub fn state(&self) -> ConnectionState {
        self.inner.status.borrow().state()
    }

    /// Waits until the connection state differs from the last one this receiver saw
    /// ([`tokio::sync::watch`] semantics: intermediate states may be skipped; use
    /// [`Client::events`] to see every change).
    pub fn watch_state(&self) -> StateWatch {
        StateWatch(self.inner.status.clone())
    }

    /// A receiver of every [`ClientEvent`] from now on: reconnects, failed attempts, token
    /// refreshes, conflation, the end.
    pub fn events(&self) -> ClientEvents {
        ClientEvents::new(self.inner.events.resubscribe())
    }

    /// Joins `room` and waits for `Subscribed` (or the broker's `Error`). The room name is
    /// checked by the broker, not locally. One live subscription per room and connection:
    /// a second one fails with [`Error::AlreadySubscribed`]. While the client is reconnecting
    /// the request waits for the next session.
    ///
    /// With a token naming user U the broker has already joined the session to U's personal
    /// room `user:U`; `subscribe("user:U")` hands its events to the application (answered at
    /// once; events of the room before it are not kept).
    pub async fn subscribe(&self, room: &str) -> Result<Subscription, Error> {
        let id = self.next_id();
        let room = room.to_owned();
        let (reader, room, start) = self
            .request(|reply| Command::Subscribe { id, room, reply })
            .await?;
        Ok(Subscription::new(reader, room, start, self.clone()))
    }

    /// Publishes `data` (encoded as CBOR) to `room` as `event`, asks for an `Ack` and waits for
    /// it. Returns the event's sequence number when the broker assigned one.
    ///
    /// If the connection is lost before the `Ack` (or the client is reconnecting), fails with
    /// [`Error::Disconnected`] — unless [`ConnectOptions::auto_idempotency_keys`] gives it a
    /// key, which makes it behave like [`Client::publish_with_key`].
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
    ) -> Result<Option<u64>, Error> {
        let payload = Payload::encode(data)?;
        self.publish_payload(room, event, payload, true).await
    }

    /// Publishes `data` (encoded as CBOR) with an idempotency key and waits for the `Ack`.
    /// When the connection is lost before the `Ack` (or the client is reconnecting), the
    /// publish is sent again, with the same key, on the next session: the broker delivers it
    /// at most once within its dedup window. Without [`ConnectOptions::reconnect`] it fails
    /// with [`Error::Closed`] like any request.
    pub async fn publish_with_key<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
        key: impl Into<IdempotencyKey>,
    ) -> Result<Option<u64>, Error> {
        let payload = Payload::encode(data)?;
        self.publish_payload_with_key(room, event, payload, key.into())
            .await
    }

    /// [`Client::publish_with_key`] for an already-encoded payload.
    pub async fn publish_payload_with_key(
        &self,
        room: &str,
        event: &str,
        data: Payload,
        key: IdempotencyKey,
    ) -> Result<Option<u64>, Error> {
        self.publish_frame(room, event, data, Some(key)).await
    }

    /// Publishes an already-encoded payload. With `ack`, waits for the broker's `Ack` (or
    /// `Error`; see [`Client::publish`] for a lost connection); without, returns `Ok(None)` as
    /// soon as the frame is queued to the connection (or fails with [`Error::Disconnected`]
    /// while the client is reconnecting).
    pub async fn publish_payload(
        &self,
        room: &str,
        event: &str,
        data: Payload,
        ack: bool,
    ) -> Result<Option<u64>, Error> {
        if ack {
            let key = self.inner.auto_keys.then(IdempotencyKey::random);
            return self.publish_frame(room, event, data, key).await;
        }
        self.publish_unacknowledged(room, event, &data, false)
            .await?;
        Ok(None)
    }

    /// Hands an unacknowledged `Publish` to the connection (`unreliable`: as a datagram when
    /// it fits one); returns once it is queued.
    async fn publish_unacknowledged(
        &self,
        room: &str,
        event: &str,
        data: &Payload,
        unreliable: bool,
    ) -> Result<(), Error> {
        let frame = ClientFrame::Publish {
            key: None,
            id: self.next_id(),
            room: room.to_owned(),
            event: event.to_owned(),
            data: data.as_bytes().clone(),
            ack: false,
        }
        .encode();
        self.send_command(Command::Send { frame, unreliable }).await
    }

    /// Sends an acknowledged `Publish` and waits for the `Ack`.
    async fn publish_frame(
        &self,
        room: &str,
        event: &str,
        data: Payload,
        key: Option<IdempotencyKey>,
    ) -> Result<Option<u64>, Error> {
        let id = self.next_id();
        let keyed = key.is_some();
        let frame = ClientFrame::Publish {
            key: key.map(|key| key.as_str().to_owned()),
            id,
            room: room.to_owned(),
            event: event.to_owned(),
            data: data.as_bytes().clone(),
            ack: true,
        }
        .encode();
        self.request(|reply| Command::Publish {
            id,
            frame,
            keyed,
            reply,
        })
        .await
    }

    /// Publishes `data` (encoded as CBOR) to `room` as `event` for volatile rooms (positions,
    /// prices): over WebTransport as a QUIC datagram when the frame fits one, so it may be
    /// lost but never waits behind a retransmission; otherwise (WebSocket, a large frame) like
    /// [`Client::publish_payload`] without an `Ack`. Returns once the frame is handed over.
    /// The broker answers a rejected publish (bad room, bad payload) with an `Error` frame that
    /// this call does not wait for.
    pub async fn publish_volatile<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
    ) -> Result<(), Error> {
        let data = Payload::encode(data)?;
        self.publish_unacknowledged(room, event, &data, true).await
    }

    /// Sends `frame` as one binary message, unchecked, once the connection gets to it (for
    /// tests of the broker's handling of bad input). Returns when it is queued.
    pub async fn send_raw(&self, frame: Bytes) -> Result<(), Error> {
        self.send_command(Command::Send {
            frame,
            unreliable: false,
        })
        .await
    }

    /// Sends `Ping` and waits for the matching `Pong`; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let id = self.next_id();
        let started = Instant::now();
        self.request(|reply| Command::Ping { id, reply }).await?;
        Ok(started.elapsed())
    }

    /// Closes the session politely (WebSocket close 1000; over WebTransport, the frames already
    /// sent are delivered, then the session closes with code 0) and waits until the connection
    /// has ended. Pending requests fail and subscriptions end with [`Error::Closed`]. Stops
    /// reconnecting too.
    pub async fn close(&self) {
        // If the driver is already gone the session is over anyway.
        let _ = self.inner.commands.send(Command::Close).await;
        self.closed().await;
    }

    /// Resolves when the client is done for good (with reconnect: not when one session ends),
    /// with how it ended.
    pub async fn closed(&self) -> CloseInfo {
        let mut status = self.inner.status.clone();
        let ended = status
            .wait_for(|status| matches!(status.phase, Phase::Closed(_)))
            .await
            .ok()
            .and_then(|status| status.info().cloned());
        ended.unwrap_or_else(|| self.close_info())
    }

    pub(crate) async fn unsubscribe(
        &self,
        room: RoomName,
        buffer: Arc<Buffer>,
    ) -> Result<(), Error> {
        let id = self.next_id();
        self.request(|reply| Command::Unsubscribe {
            id,
            room,
            buffer,
            reply,
        })
        .await
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// How the session ended, or a stand-in when the driver vanished without saying.
    fn close_info(&self) -> CloseInfo {
        self.inner
            .status
            .borrow()
            .info()
            .cloned()
            .unwrap_or_else(|| CloseInfo::lost("the connection task ended"))
    }

    async fn send_command(&self, command: Command) -> Result<(), Error> {
        // A frame without a reply cannot wait for the next session.
        if matches!(command, Command::Send { .. }) {
            if let Phase::Reconnecting { .. } = self.inner.status.borrow().phase {
                return Err(Error::Disconnected(CloseInfo::lost("reconnecting")));
            }
        }
        self.inner
            .commands
            .send(command)
            .await
            .map_err(|_| Error::Closed(self.close_info()))
    }

    async fn request<R>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<R, Error>>) -> Command,
    ) -> Result<R, Error> {
        let (reply, answer) = oneshot::channel();
        self.send_command(command(reply)).await?;
        match answer.await {
            Ok(result) => result,
            // The driver dropped the request without answering: it has ended.
            Err(_) => Err(Error::Closed(self.close_info())),
        }
    }
}

/// Watches the connection state (from [`Client::watch_state`]).
#[derive(Debug, Clone)]
pub struct StateWatch(watch::Receiver<Status>);

impl StateWatch {
    /// The current state.
    pub fn current(&self) -> ConnectionState {
        self.0.borrow().state()
    }

    /// Waits for a state this watch has not seen yet and returns it; `None` once the client
    /// is closed and that was seen.
    pub async fn changed(&mut self) -> Option<ConnectionState> {
        self.0.changed().await.ok()?;
        Some(self.0.borrow_and_update().state())
    }

    /// Waits until `predicate` holds for the state (checking the current one first).
    pub async fn wait_for(
        &mut self,
        mut predicate: impl FnMut(&ConnectionState) -> bool,
    ) -> Option<ConnectionState> {
        let status = self
            .0
            .wait_for(|status| predicate(&status.state()))
            .await
            .ok()?;
        Some(status.state())
    }
}
