//! What the handles ask the connection task to do.
//!
//! Owns [`Command`]: one request from a [`crate::Client`] or [`crate::Subscription`], with the
//! channel its answer goes back on. It must not decide anything: the driver hands each command
//! to the protocol crate's client session.

use std::sync::Arc;

use bytes::Bytes;
use roomcast_protocol::{Position, RoomName};
use tokio::sync::oneshot;

use crate::{
    error::Error,
    subscription::{Buffer, Reader},
};

/// What a [`crate::Client`] asks the driver to do.
pub(crate) enum Command {
    /// Send `Subscribe` and answer with the new buffer's reader, the room and its start
    /// position.
    Subscribe {
        id: u64,
        room: String,
        reply: oneshot::Sender<Result<(Reader, RoomName, Position), Error>>,
    },
    /// Send `Unsubscribe` for the subscription whose buffer is `buffer`.
    Unsubscribe {
        id: u64,
        room: RoomName,
        buffer: Arc<Buffer>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Send an encoded `Publish` with `ack` and answer with the `Ack`'s seq. `keyed`: it
    /// carries an idempotency key, so it may be sent again on the next connection.
    Publish {
        id: u64,
        frame: Bytes,
        keyed: bool,
        reply: oneshot::Sender<Result<Option<u64>, Error>>,
    },
    /// Send `Ping { id }` and answer when the `Pong` arrives.
    Ping {
        id: u64,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Send these bytes as one message; no reply expected. `unreliable`: as a datagram when
    /// the transport has them and the frame fits.
    Send { frame: Bytes, unreliable: bool },
    /// End the session politely.
    Close,
}

impl Command {
    pub(crate) fn fail(self, error: Error) {
        // A caller that gave up no longer listens; nothing to do then.
        match self {
            Command::Subscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Unsubscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Publish { reply, .. } => drop(reply.send(Err(error))),
            Command::Ping { reply, .. } => drop(reply.send(Err(error))),
            Command::Send { .. } | Command::Close => {}
        }
    }
}
