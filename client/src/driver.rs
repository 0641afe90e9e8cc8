//! The connection task: glue between the protocol crate's [`ClientSession`] and a transport.
//!
//! Owns the transport of the current session (generic over [`Connector`]), the reply channels
//! of pending requests, each subscription's [`Buffer`], the token provider call in flight, the
//! reconnect loop ([`Backoff`], URL rotation) and what the handles see ([`Status`],
//! [`ClientEvent`]). It moves bytes and time between the session and the transport and hands
//! the session's events to the handles; it never waits on a subscriber. It must not decide
//! anything about requests, rooms, recovery, token refresh or keepalive: that is
//! [`ClientSession`]'s.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use roomcast_protocol::client::{
    ClientConfig, ClientSession, Ending, LocalClose, SessionEvent, Transmit,
};
use tokio::{
    sync::{broadcast, mpsc, watch},
    time::Instant,
};

use crate::{
    command::Command,
    connection::{Connector, Opened, reopen},
    error::{CloseInfo, Error},
    handles::Handles,
    options::ConnectOptions,
    reconnect::{Backoff, Jitter, ReconnectPolicy},
    state::{ClientEvent, Phase, Status},
    token::{self, Fetch},
    transport::{Incoming, Transport, TransportError},
};

/// How long the closing handshake may take once a session is over.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Everything the driver is started with.
pub(crate) struct Setup<C: Connector> {
    pub(crate) connector: C,
    pub(crate) opened: Opened<C::Link>,
    pub(crate) urls: Vec<String>,
    /// Index in `urls` of the URL `opened` is connected to.
    pub(crate) url_index: usize,
    pub(crate) options: ConnectOptions,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) events: broadcast::Sender<ClientEvent>,
    pub(crate) next_id: Arc<AtomicU64>,
    /// The reconnect backoff's randomness.
    pub(crate) jitter: Jitter,
}

/// The connection task's state.
pub(crate) struct Driver<C: Connector + Clone> {
    connector: C,
    options: ConnectOptions,
    backoff: Backoff,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<ClientEvent>,
    session: ClientSession,
    /// The current session's transport; `None` between sessions.
    link: Option<C::Link>,
    handles: Handles,
    /// The token provider call in flight for a `Refresh`.
    fetch: Fetch,
    /// The session's end, once it said so.
    ended: Option<Ending>,
}

/// The time as the session takes it.
pub(crate) fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl<C: Connector + Clone> Driver<C> {
    pub(crate) fn new(setup: Setup<C>) -> Self {
        let url = setup.urls[setup.url_index].clone();
        let next_id = setup.next_id;
        let config = ClientConfig {
            payload_limits: setup.options.payload_limits,
            early_events: setup.options.subscription_buffer,
            refresh_tokens: setup.options.token_provider.is_some(),
        };
        let mut driver = Driver {
            connector: setup.connector,
            backoff: Backoff::new(setup.urls, setup.url_index, setup.jitter),
            options: setup.options,
            commands: setup.commands,
            status: setup.status,
            events: setup.events,
            session: ClientSession::new(config, move || next_id.fetch_add(1, Ordering::Relaxed)),
            link: None,
            handles: Handles::new(),
            fetch: Fetch::default(),
            ended: None,
        };
        driver.attach(setup.opened, url);
        driver
    }

    /// Serves sessions, reconnecting between them when the policy says so, until the client
    /// is done; then settles every request and subscription.
    pub(crate) async fn run(mut self) {
        let mut ending = self.serve().await;
        loop {
            let link = self.link.take();
            tracing::debug!(info = %ending.info, "session ended");
            let policy = self.options.reconnect.clone();
            let Some(policy) = policy.filter(|_| ending.info.reconnect) else {
                self.finish(&ending.info);
                close(link, ending.close).await;
                return self.end(ending.info);
            };
            // The broker may be slow to finish the close: do not make the reconnect wait.
            tokio::spawn(close(link, ending.close));
            self.fetch.cancel();
            self.emit(ClientEvent::Disconnected(ending.info.clone()));
            self.prune();
            self.session.disconnected(&ending.info);
            let abandoned = self.handles.abandoned();
            for (sub, room) in abandoned {
                self.session.leave(&room, sub);
            }
            self.dispatch();
            ending = match self
                .reconnect(&policy, ending.info, ending.retry_after)
                .await
            {
                Ok(()) => self.serve().await,
                Err(info) => {
                    self.finish(&info);
                    return self.end(info);
                }
            };
        }
    }

    /// Makes `opened` the current session.
    fn attach(&mut self, opened: Opened<C::Link>, url: String) {
        let exp = opened.token.as_deref().and_then(token::jwt_expiry);
        let (session_id, welcome) = (opened.welcome.session_id.clone(), opened.welcome.clone());
        (self.session).connected(welcome, exp, opened.early, opened.welcomed_at.into_std());
        self.link = Some(opened.link);
        self.status.send_replace(Status {
            phase: Phase::Open { url: url.clone() },
            welcome: opened.welcome,
        });
        self.backoff.welcomed();
        self.emit(ClientEvent::Connected { url, session_id });
    }

    fn emit(&self, event: ClientEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn set_phase(&self, phase: Phase) {
        self.status.send_modify(|status| status.phase = phase);
    }

    /// The client is done: tell the handles and the event receivers.
    fn end(&self, info: CloseInfo) {
        self.set_phase(Phase::Closed(info.clone()));
        self.emit(ClientEvent::Closed(info));
    }

    /// Serves the current session until it ends.
    async fn serve(&mut self) -> Ending {
        let timer = tokio::time::sleep(Duration::from_secs(24 * 3600));
        tokio::pin!(timer);
        loop {
            if let Some(ending) = self.flush().await {
                return ending;
            }
            // Deadlines only move later as traffic flows, so the timer is moved only when it
            // has fired or must fire sooner; firing early just re-checks.
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            if let Some(deadline) = deadline {
                if timer.is_elapsed() || deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            }
            let Some(link) = self.link.as_mut() else {
                return Ending::broken(CloseInfo::lost("no transport"));
            };
            tokio::select! {
                incoming = link.recv() => match incoming {
                    Ok(Incoming::Frame(bytes)) => self.session.handle_frame(&bytes, now()),
                    Ok(Incoming::Closed { code, reason }) => return Ending::close(
                        CloseInfo::transport(code, reason), LocalClose::Normal),
                    Err(e) => return Ending::broken(CloseInfo::lost(format!("transport error: {e}"))),
                },
                command = self.commands.recv() => match command {
                    Some(Command::Close) | None => {
                        return Ending::close(CloseInfo::by_client(), LocalClose::Normal);
                    }
                    Some(command) => self.on_command(command),
                },
                () = &mut timer, if deadline.is_some() => {
                    self.session.handle_timeout(now());
                    self.prune();
                }
                token = self.fetch.answer(), if self.fetch.is_running() => {
                    match token {
                        Ok(token) => {
                            let exp = token::jwt_expiry(&token);
                            self.session.refresh_token(token, exp);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "token provider failed; refreshing later");
                            self.emit(ClientEvent::TokenRefreshFailed(e.into()));
                            self.session.token_unavailable(now());
                        }
                    }
                }
            }
        }
    }

    /// Hands the session's events on and sends its frames, until it has none; returns the
    /// session's end if it ended.
    async fn flush(&mut self) -> Option<Ending> {
        loop {
            self.dispatch();
            if let Some(ending) = self.ended.take() {
                return Some(ending);
            }
            let transmit = self.session.poll_transmit(now())?;
            if let Some(ending) = self.write(transmit).await {
                return Some(ending);
            }
        }
    }

    /// Sends one frame. A send that stalls longer than the dead-connection limit (the broker
    /// stopped reading) ends the session like silence does.
    async fn write(&mut self, transmit: Transmit) -> Option<Ending> {
        let limit = self.session.send_timeout();
        let link = self.link.as_mut()?;
        let lost = |e| {
            Some(Ending::broken(CloseInfo::lost(format!(
                "transport error while sending: {e}"
            ))))
        };
        let frame = match transmit.unreliable {
            true => match link.send_unreliable(transmit.frame) {
                Ok(None) => return None,
                Ok(Some(frame)) => frame,
                Err(e) => return lost(e),
            },
            false => transmit.frame,
        };
        let sent = match limit {
            Some(limit) => tokio::time::timeout(limit, link.send(frame))
                .await
                .unwrap_or(Err(TransportError::Stalled(limit))),
            None => link.send(frame).await,
        };
        sent.err().and_then(lost)
    }

    /// Hands every event the session has to the handles; keeps what is the driver's.
    fn dispatch(&mut self) {
        while let Some(event) = self.session.poll_event() {
            let Some(event) = self.handles.hand_over(&mut self.session, event) else {
                continue;
            };
            match event {
                SessionEvent::Conflation { room, active } => {
                    self.emit(ClientEvent::Conflation { room, active })
                }
                SessionEvent::FetchToken => {
                    self.fetch.start(self.options.token_provider.as_ref());
                }
                SessionEvent::TokenRefreshed { token } => {
                    self.options.token = Some(token);
                    self.emit(ClientEvent::TokenRefreshed);
                }
                SessionEvent::TokenRefreshFailed(error) => {
                    tracing::warn!(%error, "token refresh failed");
                    self.emit(ClientEvent::TokenRefreshFailed(error.into()));
                }
                SessionEvent::Ended(ending) => self.ended = Some(ending),
                _ => {}
            }
        }
    }

    /// Waits and connects until a session opens (`Ok`) or the client is done (`Err`).
    async fn reconnect(
        &mut self,
        policy: &ReconnectPolicy,
        mut last: CloseInfo,
        mut retry_after: Option<Duration>,
    ) -> Result<(), CloseInfo> {
        loop {
            let failures = self.backoff.failures();
            if policy.max_attempts.is_some_and(|max| failures >= max) {
                let reason = format!("gave up after {failures} reconnect attempts: {last}");
                return Err(CloseInfo {
                    code: last.code,
                    reason,
                    reconnect: false,
                });
            }
            let (attempt, url) = self.backoff.next_attempt();
            let delay = self.backoff.delay(policy, attempt, retry_after.take());
            tracing::info!(
                attempt = attempt + 1,
                url,
                delay_ms = delay.as_millis() as u64,
                "reconnecting"
            );
            let (attempt, target) = (attempt + 1, url.clone());
            self.set_phase(Phase::Reconnecting {
                attempt,
                delay,
                url: target.clone(),
            });
            self.emit(ClientEvent::Reconnecting {
                attempt,
                delay,
                url: target.clone(),
            });
            self.between_sessions(tokio::time::sleep(delay)).await?;
            let attempt = reopen(self.connector.clone(), target, self.options.clone());
            let opened = self.between_sessions(attempt).await;
            match opened? {
                Ok(opened) => {
                    tracing::info!(url, session = %opened.welcome.session_id, "reconnected");
                    self.attach(opened, url);
                    return Ok(());
                }
                Err(failed) => {
                    tracing::info!(url, error = %failed.error, "reconnect attempt failed");
                    let error = failed.error.clone();
                    self.emit(ClientEvent::ConnectFailed { url, error });
                    let (retryable, retry) = (failed.retryable(), failed.retry_after);
                    last = failed.into_close_info();
                    if !retryable {
                        return Err(last);
                    }
                    retry_after = retry;
                }
            }
        }
    }

    /// Runs `work` while handing commands to the session, between sessions. `Err` when the
    /// client is to end (closed, or every handle dropped).
    async fn between_sessions<F: Future>(&mut self, work: F) -> Result<F::Output, CloseInfo> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Ok(output),
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return Err(CloseInfo::by_client()),
                    Some(command) => self.on_command(command),
                },
            }
            self.dispatch();
        }
    }

    /// Fails everything that waits on the client with `info` and refuses further commands.
    fn finish(&mut self, info: &CloseInfo) {
        self.set_phase(Phase::Closing(info.clone()));
        self.session.finish(info);
        self.dispatch();
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            command.fail(Error::Closed(info.clone()));
        }
    }

    fn on_command(&mut self, command: Command) {
        let buffer = self.options.subscription_buffer;
        self.handles.take(&mut self.session, buffer, command);
    }

    /// Forgets requests whose callers gave up (their futures were dropped).
    fn prune(&mut self) {
        self.handles.prune(&mut self.session);
    }
}

/// Closes `link` `how` (if it is not broken), within [`CLOSE_GRACE`].
async fn close<L: Transport>(link: Option<L>, how: Option<LocalClose>) {
    if let (Some(how), Some(mut link)) = (how, link) {
        let _ = tokio::time::timeout(CLOSE_GRACE, link.close(how)).await;
    }
}
