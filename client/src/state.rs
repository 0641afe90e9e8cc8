//! What the app can watch of the connection: its state and a stream of events.
//!
//! Owns [`Status`] (what the handles read: the [`Phase`] and the current `Welcome`),
//! [`ConnectionState`] (the current state, behind a watch channel), [`ClientEvent`] (every
//! change and notable happening, behind a broadcast channel) and [`ClientEvents`] (the app's
//! receiver). The connection task is the only writer; this module must not decide anything
//! about connecting.

use std::time::Duration;

use roomcast_protocol::{RoomName, frame::Welcome};
use tokio::sync::broadcast;

use crate::error::{CloseInfo, Error};

/// Where the client is, as seen by the handles.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// A session is open to `url`, serving requests.
    Open { url: String },
    /// Between sessions.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        url: String,
    },
    /// Over: requests fail with this; the transport is still being closed.
    Closing(CloseInfo),
    /// The transport is closed too.
    Closed(CloseInfo),
}

/// What the handles read: the phase and the `Welcome` of the current (or last) session.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) phase: Phase,
    pub(crate) welcome: Welcome,
}

impl Status {
    pub(crate) fn info(&self) -> Option<&CloseInfo> {
        match &self.phase {
            Phase::Open { .. } | Phase::Reconnecting { .. } => None,
            Phase::Closing(info) | Phase::Closed(info) => Some(info),
        }
    }

    pub(crate) fn state(&self) -> ConnectionState {
        match &self.phase {
            Phase::Open { url } => ConnectionState::Connected {
                url: url.clone(),
                session_id: self.welcome.session_id.clone(),
            },
            Phase::Reconnecting {
                attempt,
                delay,
                url,
            } => ConnectionState::Reconnecting {
                attempt: *attempt,
                delay: *delay,
                url: url.clone(),
            },
            Phase::Closing(info) | Phase::Closed(info) => ConnectionState::Closed(info.clone()),
        }
    }
}

/// Events buffered per [`ClientEvents`] receiver before the oldest are dropped (reported as
/// [`ClientEvent::Lagged`]).
pub(crate) const EVENT_QUEUE: usize = 64;

/// Where the connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// A session is open.
    Connected {
        /// The URL it is open to.
        url: String,
        /// The session id the broker assigned.
        session_id: String,
    },
    /// The connection was lost; the client waits `delay` and then tries `url` (attempt
    /// `attempt`, from 1, since the last open session). Meanwhile subscribes and publishes
    /// with an idempotency key wait for the next session; other publishes, pings and raw
    /// sends fail with [`Error::Disconnected`].
    Reconnecting {
        /// Attempts since the last open session, this one included.
        attempt: u32,
        /// How long the client waits before this attempt.
        delay: Duration,
        /// The URL this attempt connects to.
        url: String,
    },
    /// The client is done for good: requests fail with [`Error::Closed`].
    Closed(CloseInfo),
}

/// Something that happened to the connection, in order (see [`crate::Client::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A session opened after a reconnect (the first session's is sent before
    /// [`crate::connect`] returns, so a receiver never sees it).
    Connected {
        /// The URL it is open to.
        url: String,
        /// The session id the broker assigned.
        session_id: String,
    },
    /// The session ended; the client will reconnect.
    Disconnected(CloseInfo),
    /// The client waits `delay`, then connects to `url`.
    Reconnecting {
        /// Attempts since the last open session, this one included (from 1).
        attempt: u32,
        /// How long the client waits first: random backoff, at least the broker's
        /// `retry_after`.
        delay: Duration,
        /// The URL it connects to next.
        url: String,
    },
    /// A reconnect attempt failed.
    ConnectFailed {
        /// The URL it tried.
        url: String,
        /// Why it failed.
        error: Error,
    },
    /// The broker accepted a refreshed token (`Refresh` answered by `Ack`).
    TokenRefreshed,
    /// Refreshing the token failed: the provider failed ([`Error::Token`]), the broker
    /// refused the token ([`Error::Server`]) or closed the session in answer
    /// ([`Error::Closed`]), or the connection was lost before the answer
    /// ([`Error::Disconnected`]).
    TokenRefreshFailed(Error),
    /// The broker started (`active: true`) or stopped conflating this session's events of
    /// `room`: while it does, only the latest event per conflation key is delivered.
    Conflation {
        /// The room.
        room: RoomName,
        /// Whether conflation is now on.
        active: bool,
    },
    /// The client is done for good.
    Closed(CloseInfo),
    /// This receiver fell behind and `missed` events were dropped.
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
}

/// The app's receiver of [`ClientEvent`]s, from [`crate::Client::events`]. Holds at most
/// 64 events; a receiver that falls further behind gets [`ClientEvent::Lagged`].
#[derive(Debug)]
pub struct ClientEvents(broadcast::Receiver<ClientEvent>);

impl ClientEvents {
    pub(crate) fn new(receiver: broadcast::Receiver<ClientEvent>) -> Self {
        ClientEvents(receiver)
    }

    /// The next event; `None` once the client is closed and every event was received.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        match self.0.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Some(ClientEvent::Lagged { missed })
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
