//! The I/O glue of one session: drives the protocol's [`ServerSession`] with a transport,
//! owns the session's [`Outbox`] and writes what it queues, carries out the state machine's
//! actions against the hub, joins an authenticated session to its personal room right after
//! `Welcome`, and leaves every room on every exit path.
//!
//! One task per session: it waits on the client's next frame, the outbox, the keepalive
//! deadline and shutdown. It never blocks fan-out: other sessions only ever push into its
//! outbox. Frames the writer cannot take now (a backlogged WebTransport stream) stay in the
//! outbox, where a conflating room is conflated ([`crate::outbox`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use roomcast_protocol::{
    Action, Code, EventName, Payload, RoomName, ServerFrame, ServerSession, session::close_frame,
};
use tracing::{Instrument, debug, debug_span};

use crate::{
    admission::Admitted,
    cluster::{PublishReply, ReplyTo, Request, Unavailable, Unheard},
    gate::SessionGate,
    hub::{Delivery, SessionKey},
    metrics::{DisconnectLabel, TransportLabel},
    node::Shared,
    outbox::Outbox,
    transport::{FrameReader, FrameWriter, Incoming, TransportError},
    wire::Outgoing,
};

/// Time allowed to flush the final frames and the Close frame of an ending session.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// After the Close frame, how long the session keeps reading (and dropping) the client's
/// input while waiting for it to close its side.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// After the Close frame, most bytes of the client's input read and dropped.
const CLOSE_LINGER_BYTES: usize = 256 * 1024;

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why the session loop ended.
enum End {
    /// Send a Close frame with this code, then close the transport.
    Close(Code, String),
    /// The peer went away; nothing more can be sent.
    Gone(Gone),
}

/// How the peer went away.
#[derive(Clone, Copy)]
enum Gone {
    /// It closed the transport properly (WebSocket close, FIN, a WebTransport close).
    Clean,
    /// The connection broke or was dropped without a close.
    Reset,
}

impl End {
    /// The `cause` label of the disconnect metric.
    fn cause(&self) -> &'static str {
        match self {
            End::Close(code, _) => code.as_str(),
            End::Gone(Gone::Clean) => "clean",
            End::Gone(Gone::Reset) => "reset",
        }
    }
}

/// Runs one session until it ends. `transport` names it in metrics and logs; `admitted` holds
/// what admission learnt (the request's token claims) and the session's slot.
///
/// Not an `async fn`: the session (transport halves included) is built here and captured
/// once by the returned future, so its parts are not stored twice in the task.
pub(crate) fn run<R: FrameReader, W: FrameWriter>(
    shared: Arc<Shared>,
    key: SessionKey,
    transport: &'static str,
    reader: R,
    writer: W,
    admitted: Admitted,
) -> impl Future<Output = ()> + Send {
    let span = debug_span!("session", id = key, transport);
    let mut config = shared.config.session();
    let verifier = &shared.security.verifier;
    if verifier.required && admitted.claims.is_none() {
        // Not authenticated yet: less time to prove it.
        config.hello_timeout = config.hello_timeout.min(verifier.pre_auth_hello_timeout);
    }
    let mut session = Session {
        core: Core {
            gate: SessionGate::new(shared.security.clone(), admitted.claims, admitted.permit),
            outbox: Arc::new(Outbox::new(shared.config.outbound_queue_bytes)),
            state: ServerSession::new(
                format!("{:x}-{key:x}", shared.boot_id),
                config,
                Instant::now(),
            ),
            shared,
            key,
            transport,
            retry_after_ms: None,
        },
        reader,
        writer,
    };
    async move { session.drive().await }.instrument(span)
}

/// One session: its protocol state and outbox (`core`) and its transport halves.
struct Session<R, W> {
    core: Core,
    reader: R,
    writer: W,
}

/// Everything of a session but its transport.
struct Core {
    shared: Arc<Shared>,
    key: SessionKey,
    transport: &'static str,
    outbox: Arc<Outbox>,
    state: ServerSession,
    gate: SessionGate,
    /// Draining: the `retry_after` hint the Close frame carries.
    retry_after_ms: Option<u64>,
}

impl Core {
    /// The next deadline: the state machine's (hello, idle) or the token's expiry.
    fn deadline(&self) -> Instant {
        let state = self.state.poll_timeout();
        match self.gate.expires_at() {
            Some(at) => {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                state.min(Instant::now() + left)
            }
            None => state,
        }
    }

    /// Handles one received frame (`datagram`: it came as a QUIC datagram); returns how the
    /// session ends if it does.
    fn frame(&mut self, bytes: &[u8], datagram: bool) -> Option<End> {
        let opening = !self.state.is_open();
        self.gate.set_datagram(datagram);
        let action =
            self.state
                .handle_frame_gated(bytes, Instant::now(), wall_clock_ms(), &mut self.gate);
        self.gate.set_datagram(false);
        let end = self.apply(action);
        if end.is_none() && opening && self.state.is_open() {
            // Welcome is queued: the session of a user joins its personal room.
            return self.join_personal_room();
        }
        end
    }

    /// Joins the session to its user's personal room (`user:<sub>`), if it has one; the hub
    /// confirms with `Subscribed` id 0 once the room is live (cluster mode: once this node's
    /// NATS subscription is), so every session of the user, on every node, receives it.
    fn join_personal_room(&mut self) -> Option<End> {
        let room = self.gate.personal_room()?;
        let Some(action) = self.state.join(room) else {
            debug!("no personal room: the session is at its subscription cap");
            return None;
        };
        self.apply(action)
    }

    /// Whether the session's token has expired.
    fn token_expired(&self) -> bool {
        self.gate
            .expires_at()
            .is_some_and(|at| SystemTime::now() >= at)
    }
}

impl<R: FrameReader, W: FrameWriter> Session<R, W> {
    async fn drive(&mut self) {
        let label = TransportLabel {
            transport: self.core.transport,
        };
        let metrics = &self.core.shared.metrics;
        metrics.sessions.get_or_create(&label).inc();
        metrics.sessions_opened.get_or_create(&label).inc();
        debug!("opened");
        let end = self.main_loop().await;
        self.core
            .shared
            .metrics
            .disconnects
            .get_or_create(&DisconnectLabel {
                transport: self.core.transport,
                cause: end.cause(),
            })
            .inc();
        self.core.state.mark_closed();
        self.core.outbox.close();
        self.core.leave_all_rooms();
        if let End::Close(code, reason) = end {
            // Boxed: the close path runs once, so it need not widen every session's task.
            Box::pin(self.close(code, reason)).await;
        }
        self.core
            .shared
            .metrics
            .sessions
            .get_or_create(&label)
            .dec();
        debug!("closed");
    }

    async fn close(&mut self, code: Code, reason: String) {
        debug!(%code, %reason, "closing");
        let metrics = &self.core.shared.metrics;
        metrics.count_code(code);
        if code == Code::SlowConsumer {
            metrics.slow_consumers.inc();
        }
        // Frames already queued (e.g. an Error explaining the close) go first. A slow
        // consumer gets no more of them: the frame a write left half done is finished (the
        // client never sees half a frame), then only the Close frame.
        let slow = code == Code::SlowConsumer;
        let mut batch = Vec::new();
        if !slow {
            self.core.outbox.drain_into(&mut batch);
        }
        let mut frame = close_frame(code, &reason);
        if let ServerFrame::Close { retry_after_ms, .. } = &mut frame {
            *retry_after_ms = self.core.retry_after_ms;
        }
        batch.push(Outgoing::control(frame.encode()));
        let writer = &mut self.writer;
        // All of it within one deadline: a client that reads nothing at all is dropped
        // after it without its Close.
        let flush = async {
            if slow {
                writer.finish_frame().await?;
            }
            match writer.send_batch(&mut batch).await {
                // Over the cap or not, the Close frame is queued; `close` writes what it can.
                Ok(()) | Err(TransportError::Backlogged) => writer.close(code).await,
                Err(e) => Err(e),
            }
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, flush).await;
        // Read and drop what the client still sends until it closes too, bounded in time and
        // bytes: a TCP socket closed with unread input is reset, and the reset can destroy
        // the Close frame before the client reads it (a flooding client would never learn
        // why). Raw bytes, not frames: a flooder's input costs a copy, not a decode.
        let linger = self.reader.discard_input(CLOSE_LINGER_BYTES);
        let _ = tokio::time::timeout(CLOSE_LINGER, linger).await;
    }

    async fn main_loop(&mut self) -> End {
        let Session {
            core,
            reader,
            writer,
        } = self;
        let outbox = core.outbox.clone();
        let shutdown = core.shared.shutdown.clone();
        // The wake-up futures live across loop turns: re-registering waiters every turn would
        // cost more than the work of a small batch.
        let cancelled = shutdown.cancelled();
        let deadline = tokio::time::sleep_until(core.deadline().into());
        tokio::pin!(cancelled, deadline);
        let mut batch: Vec<Outgoing> = Vec::new();
        // Shutting down with a drain window: this session's moment to close (boxed, so
        // sessions that never drain do not carry a timer).
        let mut drain: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let drain_window = core.shared.config.drain_window;
        // The shutdown was seen through `cancelled` (which then stays complete).
        let mut cancel_seen = false;
        loop {
            // Looked at here as well as waited for below: a session kept busy by its outbox
            // takes the outbox branch first every turn and would not see the shutdown there.
            if drain.is_none() && (cancel_seen || core.shared.shutting_down.load(Ordering::Relaxed))
            {
                if drain_window.is_zero() {
                    return shutting_down();
                }
                // A random moment in the window, and a short random wait before the client
                // reconnects: the node's sessions land on the others spread out.
                drain = Some(Box::pin(tokio::time::sleep(
                    drain_window.mul_f64(fastrand::f64()),
                )));
                let window_ms = u64::try_from(drain_window.as_millis()).unwrap_or(u64::MAX);
                core.retry_after_ms = Some(fastrand::u64(0..=window_ms.min(500)));
            }
            // Likewise the session's moment in the drain window.
            if drain.as_ref().is_some_and(|moment| moment.is_elapsed()) {
                return shutting_down();
            }
            // The write happens after this select! has ended, so the futures of the two
            // selects share storage in the task instead of adding up. The outbox comes first:
            // when it woke the task, nothing else is polled (each poll of a waiting future
            // costs a lock, paid per batch on the fan-out path).
            let write_now = tokio::select! {
                biased;
                () = std::future::poll_fn(|cx| outbox.poll_ready(cx)) => {
                    if !take_queued(&outbox, writer, &mut batch) {
                        return slow_consumer();
                    }
                    !batch.is_empty()
                }
                received = reader.recv() => match received {
                    Ok(Incoming::Frame(bytes)) => {
                        if let Some(end) = core.frame(&bytes, false) {
                            return end;
                        }
                        if core.gate.take_expiry_changed() {
                            // Hello or Refresh brought a token and with it an expiry.
                            deadline.as_mut().reset(core.deadline().into());
                        }
                        false
                    }
                    Ok(Incoming::Datagram(bytes)) => {
                        if let Some(end) = core.frame(&bytes, true) {
                            return end;
                        }
                        if core.gate.take_expiry_changed() {
                            deadline.as_mut().reset(core.deadline().into());
                        }
                        false
                    }
                    Ok(Incoming::Control(raw)) => {
                        // Rare (WebSocket ping, close): boxed to keep the task small.
                        let sent = Box::pin(tokio::time::timeout(
                            CLOSE_FLUSH_TIMEOUT,
                            writer.send_control(raw),
                        ));
                        if !matches!(sent.await, Ok(Ok(()))) {
                            return End::Gone(Gone::Reset);
                        }
                        false
                    }
                    Ok(Incoming::Closed) => return End::Gone(Gone::Clean),
                    Err(TransportError::TooLarge) => {
                        return End::Close(
                            Code::FrameTooLarge,
                            format!("message exceeds {} bytes", core.shared.config.max_frame_size),
                        );
                    }
                    Err(TransportError::Protocol(why)) => {
                        return End::Close(Code::ProtocolError, why);
                    }
                    Err(TransportError::Io(_) | TransportError::Backlogged) => {
                        return End::Gone(Gone::Reset);
                    }
                },
                () = &mut deadline => {
                    if core.token_expired() {
                        return End::Close(Code::TokenExpired, "the session's token expired".into());
                    }
                    let action = core.state.handle_timeout(Instant::now());
                    if let Some(end) = core.apply(action) {
                        return end;
                    }
                    deadline.as_mut().reset(core.deadline().into());
                    false
                }
                written = writer.write_backlog(), if writer.has_backlog() => {
                    if written.is_err() {
                        return End::Gone(Gone::Reset);
                    }
                    // A channel caught up: frames held in the outbox for it may go now.
                    if outbox.has_held() && !take_queued(&outbox, writer, &mut batch) {
                        return slow_consumer();
                    }
                    !batch.is_empty()
                }
                // Handled at the top of the loop.
                () = &mut cancelled, if !cancel_seen => {
                    cancel_seen = true;
                    false
                }
                () = async {
                    match drain.as_mut() {
                        Some(moment) => moment.as_mut().await,
                        None => std::future::pending().await,
                    }
                } => return shutting_down(),
            };
            if write_now {
                // Pushes during the write: the outbox overflowing ends a write that may never
                // finish (a slow consumer); other frames wait for the next turn.
                let mut woken = false;
                {
                    let sent = writer.send_batch(&mut batch);
                    tokio::pin!(sent);
                    loop {
                        tokio::select! {
                            biased;
                            result = &mut sent => match result {
                                Ok(()) => break,
                                Err(TransportError::Backlogged) => return slow_consumer(),
                                Err(_) => return End::Gone(Gone::Reset),
                            },
                            () = std::future::poll_fn(|cx| outbox.poll_ready(cx)) => {
                                if outbox.is_overflowed() {
                                    return slow_consumer();
                                }
                                woken = true;
                            }
                            // With a drain window the session is served until its moment comes.
                            () = &mut cancelled, if drain_window.is_zero() && !cancel_seen => {
                                return End::Close(Code::ShuttingDown, "broker shutting down".into());
                            }
                        }
                    }
                }
                batch.clear();
                if woken || outbox.has_held() {
                    // Frames came during the write, or writing may have emptied a held
                    // channel's backlog: look again.
                    outbox.wake();
                }
            }
        }
    }
}

impl Core {
    /// Carries out one action; returns how the session ends if it does.
    fn apply(&mut self, action: Action) -> Option<End> {
        let metrics = &self.shared.metrics;
        let pushed = match action {
            Action::None => Ok(()),
            Action::Send(frame) => {
                if let ServerFrame::Error { code, .. } = &frame {
                    // Every request error spends the error budget (rate_limited ones were
                    // charged by their bucket): a session that keeps failing is closed.
                    if *code != Code::RateLimited {
                        if let Err(refusal) = self.gate.charge_error() {
                            return Some(End::Close(refusal.code, refusal.message));
                        }
                    }
                    metrics.count_code(*code);
                }
                self.outbox.push(frame.encode())
            }
            Action::Subscribe { id, room, since } => self
                .shared
                .hub
                .subscribe(&room, self.key, &self.outbox, id, since)
                .map(|_| ()),
            Action::Unsubscribe { id, room } => {
                self.shared
                    .hub
                    .unsubscribe(&room, self.key, &self.outbox, Some(id))
            }
            Action::Publish {
                id,
                room,
                event,
                data,
                ack,
                key,
            } => return self.publish(Request { id, ack }, &room, &event, &data, key.as_deref()),
            Action::Close { code, reason } => return Some(End::Close(code, reason)),
        };
        match pushed {
            Ok(()) => None,
            // The outbox refused our own reply: this session is not reading.
            Err(_) => Some(slow_consumer()),
        }
    }

    /// Hands a validated publish to the bridge; the outcome known now is answered here, a
    /// later one by the bridge (both through the outbox's [`PublishReply`]).
    fn publish(
        &self,
        request: Request,
        room: &RoomName,
        event: &EventName,
        data: &Payload,
        key: Option<&str>,
    ) -> Option<End> {
        let metrics = &self.shared.metrics;
        let reply = ReplyTo::new(self.outbox.clone(), request);
        let outcome = match self.shared.bridge.publish(room, event, data, key, reply) {
            // Stored first (a history stream): the bridge answers once it is.
            Ok(None) => {
                metrics.events_in.inc();
                return None;
            }
            Ok(Some(delivery)) => {
                if delivery.duplicate {
                    metrics.duplicates.inc();
                }
                metrics.events_in.inc();
                metrics.events_out.inc_by(delivery.delivered as u64);
                Ok(delivery)
            }
            Err(unavailable) => {
                metrics.count_code(Code::Unavailable);
                Err(unavailable)
            }
        };
        match self.outbox.answer(request, outcome) {
            Ok(()) => None,
            // The outbox refused our own reply: this session is not reading.
            Err(Unheard) => Some(slow_consumer()),
        }
    }

    fn leave_all_rooms(&mut self) {
        for room in self.state.subscriptions() {
            let _ = self
                .shared
                .hub
                .unsubscribe(room, self.key, &self.outbox, None);
        }
    }
}

/// A session's publishes are answered into its outbox: `Ack { id, seq }` when it asked for
/// one, and `Error unavailable` whether it asked or not (never silent loss).
impl PublishReply for Outbox {
    fn answer(
        &self,
        request: Request,
        outcome: Result<Delivery, Unavailable>,
    ) -> Result<(), Unheard> {
        let frame = match outcome {
            Ok(_) if !request.ack => return Ok(()),
            Ok(delivery) => ServerFrame::Ack {
                id: request.id,
                seq: delivery.seq,
            },
            Err(unavailable) => ServerFrame::Error {
                id: Some(request.id),
                code: Code::Unavailable,
                message: unavailable.to_string(),
                retry_after_ms: None,
            },
        };
        self.push(frame.encode()).map_err(|_| Unheard)
    }
}

/// Moves the outbox's frames into `batch`, but those the writer cannot take now (they wait
/// in the outbox, where conflation and the cap apply to them). False if the outbox
/// overflowed.
fn take_queued<W: FrameWriter>(outbox: &Outbox, writer: &W, batch: &mut Vec<Outgoing>) -> bool {
    if writer.backpressured() {
        outbox.drain_into_except(batch, |lane| writer.holds(lane))
    } else {
        outbox.drain_into(batch)
    }
}

fn shutting_down() -> End {
    End::Close(Code::ShuttingDown, "broker shutting down".into())
}

fn slow_consumer() -> End {
    End::Close(
        Code::SlowConsumer,
        "outbound queue exceeded its byte cap".into(),
    )
}
