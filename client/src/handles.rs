//! What the connection task keeps for the handles: reply channels and subscription buffers.
//!
//! Owns [`Handles`]: the reply channel of every pending request (by request id) and every
//! subscription's room and [`Buffer`] (by the id of its `Subscribe`), the hand-over of each
//! command to the protocol crate's [`ClientSession`] and of the session's replies, deliveries,
//! resumptions and forgotten subscriptions to them. It never waits on a subscriber (buffers
//! are filled with non-blocking pushes). It must not decide anything about requests or rooms:
//! the session does, and the driver owns the transport and the connection-wide events.

use std::{collections::HashMap, sync::Arc};

use roomcast_protocol::{
    Position, RoomName,
    client::{Answer, ClientSession, RequestError, SessionEvent},
};
use tokio::sync::oneshot;

use crate::{
    command::Command,
    error::Error,
    subscription::{Buffer, EventMessage, Pushed, Reader},
};

/// The reply table is swept for requests whose caller gave up once it reaches this size
/// (and again at twice the size left after each sweep).
const PRUNE_MIN: usize = 64;

/// Where a request's answer goes.
enum Reply {
    Subscribe(oneshot::Sender<Result<(Reader, RoomName, Position), Error>>),
    Unsubscribe(oneshot::Sender<Result<(), Error>>),
    Publish(oneshot::Sender<Result<Option<u64>, Error>>),
    Ping(oneshot::Sender<Result<(), Error>>),
}

impl Reply {
    /// Nobody waits and forgetting loses nothing (subscriptions still settle their room).
    fn is_abandoned(&self) -> bool {
        match self {
            Reply::Publish(reply) => reply.is_closed(),
            Reply::Ping(reply) => reply.is_closed(),
            Reply::Subscribe(_) | Reply::Unsubscribe(_) => false,
        }
    }
}

/// Reply channels and subscription buffers.
pub(crate) struct Handles {
    replies: HashMap<u64, Reply>,
    prune_at: usize,
    /// Subscriptions by the id of their `Subscribe`: the room and the buffer.
    subs: HashMap<u64, (String, Arc<Buffer>)>,
}

impl Handles {
    pub(crate) fn new() -> Self {
        Handles {
            replies: HashMap::new(),
            prune_at: PRUNE_MIN,
            subs: HashMap::new(),
        }
    }

    /// Hands one command to the session, keeping its reply channel and buffer.
    pub(crate) fn take(
        &mut self,
        session: &mut ClientSession,
        buffer_size: usize,
        command: Command,
    ) {
        let (replies, subs) = (&mut self.replies, &mut self.subs);
        match command {
            Command::Subscribe { id, room, reply } => {
                // The old subscription's reader is gone but the broker still sends: leave first,
                // so the broker sees Unsubscribe then Subscribe.
                let gone = subs
                    .iter()
                    .find(|(_, (name, buffer))| *name == room && buffer.is_abandoned());
                if let Some((&sub, _)) = gone {
                    session.leave(&room, sub);
                }
                subs.insert(id, (room.clone(), Buffer::new(buffer_size)));
                replies.insert(id, Reply::Subscribe(reply));
                session.subscribe(id, room);
            }
            Command::Unsubscribe {
                id,
                room,
                buffer,
                reply,
            } => {
                let sub = subs
                    .iter()
                    .find(|(_, (_, b))| Arc::ptr_eq(b, &buffer))
                    .map(|(&sub, _)| sub);
                let Some(sub) = sub else {
                    // Already left (or refused earlier): nothing flows to this subscription.
                    return drop(reply.send(Ok(())));
                };
                replies.insert(id, Reply::Unsubscribe(reply));
                session.unsubscribe(id, room.as_str(), sub);
            }
            Command::Publish {
                id,
                frame,
                keyed,
                reply,
            } => {
                replies.insert(id, Reply::Publish(reply));
                session.publish(id, frame, keyed);
            }
            Command::Ping { id, reply } => {
                replies.insert(id, Reply::Ping(reply));
                session.ping(id, crate::driver::now());
            }
            Command::Send { frame, unreliable } => session.send_raw(frame, unreliable),
            Command::Close => {}
        }
        if self.replies.len() >= self.prune_at {
            self.prune(session);
        }
    }

    /// Hands a session event to the handles it is for; returns the events that are the
    /// driver's (connection-wide).
    pub(crate) fn hand_over(
        &mut self,
        session: &mut ClientSession,
        event: SessionEvent,
    ) -> Option<SessionEvent> {
        match event {
            SessionEvent::Reply { id, result } => self.settle(session, id, result),
            SessionEvent::Deliver { sub, event } => {
                let (room, buffer) = self.subs.get(&sub)?;
                let message = EventMessage {
                    room: event.room,
                    event: event.event,
                    data: event.data,
                    seq: event.seq,
                };
                match buffer.push(message) {
                    Pushed::Abandoned => {
                        let room = room.clone();
                        session.leave(&room, sub);
                    }
                    Pushed::Dropped => tracing::debug!(room, "subscription buffer full"),
                    Pushed::Queued => {}
                }
            }
            SessionEvent::Resumed {
                sub,
                room,
                resumption,
            } => {
                tracing::info!(%room, recovery = %resumption.recovery, "room resumed");
                let abandoned = self.subs.get(&sub).is_some_and(|(_, buffer)| {
                    buffer.push_resumed(resumption) == Pushed::Abandoned
                });
                if abandoned {
                    session.leave(room.as_str(), sub);
                }
            }
            SessionEvent::Forget { sub, close } => {
                if let (Some((_, buffer)), Some(info)) = (self.subs.remove(&sub), close) {
                    buffer.close(&info);
                }
            }
            other => return Some(other),
        }
        None
    }

    /// The subscriptions whose subscriber is gone: `(sub, room)`.
    pub(crate) fn abandoned(&self) -> Vec<(u64, String)> {
        (self.subs.iter())
            .filter(|(_, (_, buffer))| buffer.is_abandoned())
            .map(|(&sub, (room, _))| (sub, room.clone()))
            .collect()
    }

    /// Forgets requests whose callers gave up (their futures were dropped).
    pub(crate) fn prune(&mut self, session: &mut ClientSession) {
        let replies = &self.replies;
        session.forget_requests(|id| replies.get(&id).is_none_or(Reply::is_abandoned));
        self.replies.retain(|_, reply| !reply.is_abandoned());
        self.prune_at = (self.replies.len() * 2).max(PRUNE_MIN);
    }

    /// Answers request `id`.
    fn settle(
        &mut self,
        session: &mut ClientSession,
        id: u64,
        result: Result<Answer, RequestError>,
    ) {
        let Some(reply) = self.replies.remove(&id) else {
            return;
        };
        let result = result.map_err(Error::from);
        match (reply, result) {
            (Reply::Subscribe(reply), Ok(Answer::Subscribed { room, position })) => {
                let Some((name, buffer)) = self.subs.get(&id) else {
                    return;
                };
                let name = name.clone();
                let reader = Reader::new(Arc::clone(buffer));
                if reply.send(Ok((reader, room, position))).is_err() {
                    // The caller gave up: the reader was dropped with the answer.
                    session.leave(&name, id);
                }
            }
            (Reply::Subscribe(reply), Err(error)) => {
                self.subs.remove(&id);
                drop(reply.send(Err(error)));
            }
            (Reply::Unsubscribe(reply), result) => drop(reply.send(result.map(|_| ()))),
            (Reply::Publish(reply), Ok(Answer::Acked(seq))) => drop(reply.send(Ok(seq))),
            (Reply::Publish(reply), Err(error)) => drop(reply.send(Err(error))),
            (Reply::Ping(reply), result) => drop(reply.send(result.map(|_| ()))),
            (_, Ok(answer)) => tracing::warn!(id, ?answer, "answer of another kind"),
        }
    }
}
