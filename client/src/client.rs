//! The [`Client`] handle and [`connect`].
//!
//! Owns opening a session (transport by URL scheme, `Hello`/`Welcome` under the connect
//! timeout) and turning method calls into driver commands with reply channels. It must not
//! touch the socket after the handshake: the driver task owns it from then on.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use roomcast_protocol::{
    ClientFrame, PROTOCOL_VERSION, Payload, RoomName, ServerFrame, frame::Welcome,
};
use serde::Serialize;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::Instrument;

use crate::{
    driver::{Command, Driver, Phase},
    error::{CloseInfo, Error},
    options::ConnectOptions,
    subscription::{Buffer, Subscription},
    transport::{Endpoint, Incoming, Transport, ws::WsTransport, wt::WtTransport},
};

/// Commands waiting for the driver. Callers wait for room when it is full.
const COMMAND_QUEUE: usize = 256;

/// Opens a session: connects the transport the URL's scheme selects (`ws://` or `wss://` for
/// WebSocket, `https://` for WebTransport, e.g. `https://127.0.0.1:4433/wt`), sends `Hello`
/// with [`PROTOCOL_VERSION`] and the token, and waits for `Welcome`, all within
/// [`ConnectOptions::connect_timeout`]. The certificate options
/// ([`ConnectOptions::cert_hash`], [`ConnectOptions::ca_file`], [`ConnectOptions::insecure`])
/// apply to WebTransport only.
///
/// Fails with [`Error::InvalidUrl`] for a bad URL or an unsupported scheme, [`Error::Transport`]
/// when the connection cannot be made (including a certificate the options do not accept),
/// [`Error::Closed`] when the broker refuses the session, [`Error::Timeout`].
pub async fn connect(url: &str, options: ConnectOptions) -> Result<Client, Error> {
    let endpoint = Endpoint::parse(url)?;
    let timeout = options.connect_timeout;
    let open = async move {
        match endpoint {
            Endpoint::WebSocket { url, tls } => {
                let transport = WsTransport::connect(&url, tls).await?;
                start(transport, options).await
            }
            Endpoint::WebTransport { url } => {
                let transport = WtTransport::connect(&url, &options).await?;
                start(transport, options).await
            }
        }
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| Error::Timeout)?
}

/// Performs the handshake on an open transport and spawns the driver.
pub(crate) async fn start<T: Transport>(
    mut transport: T,
    options: ConnectOptions,
) -> Result<Client, Error> {
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: options.token.clone(),
    };
    transport
        .send(hello.encode())
        .await
        .map_err(Error::Transport)?;
    let welcome = loop {
        let bytes = match transport.recv().await.map_err(Error::Transport)? {
            Incoming::Frame(bytes) => bytes,
            Incoming::Closed { code, reason } => {
                return Err(Error::Closed(Incoming::close_info(code, reason)));
            }
        };
        match ServerFrame::decode(&bytes, options.payload_limits) {
            Ok(ServerFrame::Welcome(welcome)) => break welcome,
            Ok(ServerFrame::Close {
                code,
                reason,
                reconnect,
                ..
            }) => {
                return Err(Error::Closed(CloseInfo {
                    code: Some(code),
                    reason,
                    reconnect,
                }));
            }
            Ok(ServerFrame::Error { code, message, .. }) => {
                return Err(Error::Server { code, message });
            }
            Ok(other) => {
                return Err(Error::Protocol(format!("expected Welcome, got {other:?}")));
            }
            Err(roomcast_protocol::DecodeError::UnknownType { kind, .. }) => {
                tracing::debug!(kind, "ignoring unknown frame type before Welcome");
            }
            Err(e) => return Err(Error::Protocol(format!("before Welcome: {e}"))),
        }
    };
    if welcome.version == 0 || welcome.version > PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "broker chose protocol version {}, this client speaks 1..={PROTOCOL_VERSION}",
            welcome.version
        )));
    }
    transport.set_frame_limit(welcome.max_frame_size);
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (phase_tx, phase_rx) = watch::channel(Phase::Open);
    let next_id = Arc::new(AtomicU64::new(1));
    let span = tracing::info_span!("roomcast_client", session = %welcome.session_id);
    let client = Client {
        inner: Arc::new(Inner {
            commands: commands_tx,
            next_id: Arc::clone(&next_id),
            phase: phase_rx,
            welcome: welcome.clone(),
        }),
    };
    let driver = Driver::new(
        transport,
        &welcome,
        &options,
        commands_rx,
        phase_tx,
        next_id,
    );
    tokio::spawn(driver.run().instrument(span));
    Ok(client)
}

/// A handle to one broker session. Cloning is cheap; all clones share the connection, which
/// stays open until [`Client::close`] is called, the broker ends it, or every handle and
/// [`Subscription`] is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    /// Request ids, shared with the driver (which needs some for its own unsubscribes).
    next_id: Arc<AtomicU64>,
    phase: watch::Receiver<Phase>,
    welcome: Welcome,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.inner.welcome.session_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The session id the broker assigned in `Welcome`.
    pub fn session_id(&self) -> &str {
        &self.inner.welcome.session_id
    }

    /// The interval at which the client pings when otherwise idle (from `Welcome`; zero when
    /// the broker asked for no pings).
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.inner.welcome.ping_interval_ms)
    }

    /// The largest frame the broker accepts, bytes (from `Welcome`).
    pub fn max_frame_size(&self) -> u64 {
        self.inner.welcome.max_frame_size
    }

    /// Joins `room` and waits for `Subscribed` (or the broker's `Error`). The room name is
    /// checked by the broker, not locally. One live subscription per room and connection:
    /// a second one fails with [`Error::AlreadySubscribed`].
    ///
    /// With a token naming user U the broker has already joined the session to U's personal
    /// room `user:U`; `subscribe("user:U")` hands its events to the application (answered at
    /// once; events of the room before it are not kept).
    pub async fn subscribe(&self, room: &str) -> Result<Subscription, Error> {
        let id = self.next_id();
        let room = room.to_owned();
        let (reader, room, start_seq) = self
            .request(|reply| Command::Subscribe { id, room, reply })
            .await?;
        Ok(Subscription::new(reader, room, start_seq, self.clone()))
    }

    /// Publishes `data` (encoded as CBOR) to `room` as `event`, asks for an `Ack` and waits for
    /// it. Returns the event's sequence number when the broker assigned one.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
    ) -> Result<Option<u64>, Error> {
        let payload = Payload::encode(data).map_err(Error::Encode)?;
        self.publish_payload(room, event, payload, true).await
    }

    /// Publishes an already-encoded payload. With `ack`, waits for the broker's `Ack` (or
    /// `Error`); without, returns `Ok(None)` as soon as the frame is queued to the connection.
    pub async fn publish_payload(
        &self,
        room: &str,
        event: &str,
        data: Payload,
        ack: bool,
    ) -> Result<Option<u64>, Error> {
        let id = self.next_id();
        let frame = ClientFrame::Publish {
            key: None,
            id,
            room: room.to_owned(),
            event: event.to_owned(),
            data: data.as_bytes().clone(),
            ack,
        }
        .encode();
        if ack {
            self.request(|reply| Command::Publish { id, frame, reply })
                .await
        } else {
            self.send_command(Command::Send {
                frame,
                unreliable: false,
            })
            .await?;
            Ok(None)
        }
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
        let data = Payload::encode(data).map_err(Error::Encode)?;
        let frame = ClientFrame::Publish {
            key: None,
            id: self.next_id(),
            room: room.to_owned(),
            event: event.to_owned(),
            data: data.as_bytes().clone(),
            ack: false,
        }
        .encode();
        self.send_command(Command::Send {
            frame,
            unreliable: true,
        })
        .await
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
    /// has ended. Pending requests fail and subscriptions end with [`Error::Closed`].
    pub async fn close(&self) {
        // If the driver is already gone the session is over anyway.
        let _ = self.inner.commands.send(Command::Close).await;
        self.closed().await;
    }

    /// Resolves when the session has ended, with how it ended.
    pub async fn closed(&self) -> CloseInfo {
        let mut phase = self.inner.phase.clone();
        let ended = phase
            .wait_for(|phase| matches!(phase, Phase::Closed(_)))
            .await
            .ok()
            .and_then(|phase| phase.info().cloned());
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
            .phase
            .borrow()
            .info()
            .cloned()
            .unwrap_or_else(|| CloseInfo::lost("the connection task ended"))
    }

    async fn send_command(&self, command: Command) -> Result<(), Error> {
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
