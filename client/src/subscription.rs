//! Subscriptions and their bounded event buffers.
//!
//! Owns [`Subscription`], [`EventMessage`], the stream markers ([`SubscriptionItem`];
//! [`Resumption`] and [`Recovery`] come from the protocol crate's client session) and the per-subscription buffer ([`Buffer`]) that the driver
//! fills and the subscriber drains. Filling never waits: when the buffer is full the event is
//! dropped and counted, and the subscriber meets a `Lagged` marker exactly where the gap is
//! (or, if no event follows the gap, once it has drained the buffer). A subscription outlives
//! reconnects: the driver keeps its buffer and puts a `Resumed` marker where the stream was
//! re-established. This module must not talk to the socket; requests go through the
//! [`Client`] handle, and the room's position is tracked by the driver.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use futures_util::Stream;
use roomcast_protocol::{EventName, Payload, Position, RoomName};
use serde::de::DeserializeOwned;

use crate::{
    client::Client,
    error::{CloseInfo, Error, SubscriptionError},
};

/// One event received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMessage {
    /// The room it was published to.
    pub room: RoomName,
    /// The event name.
    pub event: EventName,
    /// The payload: one CBOR item, as published.
    pub data: Payload,
    /// The room's sequence number for this event: increases per event in the room (by one on
    /// a single node; with gaps in cluster mode, where it is the room stream's sequence).
    pub seq: u64,
}

impl EventMessage {
    /// Decodes the CBOR payload into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.data.decode().map_err(Error::from)
    }
}

pub use roomcast_protocol::client::{Recovery, Resumption};

/// Two markers with nothing in between read as one: the first's `previous`, the last
/// position, and the worse recovery.
fn merge(earlier: Resumption, later: Resumption) -> Resumption {
    let recovery = match (earlier.recovery, later.recovery) {
        (Recovery::Recovered, later) => later,
        (earlier, Recovery::Recovered) => earlier,
        (_, later) => later,
    };
    Resumption {
        recovery,
        previous: earlier.previous,
        position: later.position,
    }
}

/// One item of a subscription's stream, as [`Subscription::next_item`] yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionItem {
    /// An event.
    Event(EventMessage),
    /// `missed` events were dropped here because the subscription's buffer was full.
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
    /// The stream was re-established after a reconnect (recovered, reset or fresh), or the
    /// room's epoch changed (reset). Events after it continue from
    /// [`Resumption::position`].
    Resumed(Resumption),
    /// The session ended; `None` follows.
    Closed(CloseInfo),
}

/// One item of a subscription buffer.
#[derive(Debug)]
enum Item {
    Event(EventMessage),
    Lagged(u64),
    Resumed(Resumption),
}

/// What [`Buffer::push`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Buffered for the subscriber.
    Queued,
    /// The buffer was full: dropped and counted.
    Dropped,
    /// Nobody will read it: the [`Subscription`] is gone.
    Abandoned,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Item>,
    /// Events (not markers) in `items`; bounded by the capacity.
    events: usize,
    /// Events dropped since the last `Lagged` marker was queued or reported.
    missed: u64,
    /// Set once by the driver when the session ends.
    closed: Option<CloseInfo>,
    /// The `Closed` item has been handed out; only `None` follows.
    close_reported: bool,
    /// The subscriber is gone; pushes are refused.
    abandoned: bool,
    waker: Option<Waker>,
}

/// The bounded buffer between the driver (producer) and one subscriber (consumer).
///
/// A plain mutex guards it: both sides hold it only for a few instructions and never across an
/// `.await`.
#[derive(Debug)]
pub(crate) struct Buffer {
    capacity: usize,
    state: Mutex<State>,
}

impl Buffer {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Buffer {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if some did, the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Buffers `event` unless the buffer is full or abandoned. Never waits.
    pub(crate) fn push(&self, event: EventMessage) -> Pushed {
        let waker = {
            let mut state = self.lock();
            if state.abandoned {
                return Pushed::Abandoned;
            }
            if state.events >= self.capacity {
                state.missed += 1;
                return Pushed::Dropped;
            }
            if state.missed > 0 {
                let missed = std::mem::take(&mut state.missed);
                state.items.push_back(Item::Lagged(missed));
            }
            state.items.push_back(Item::Event(event));
            state.events += 1;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Pushed::Queued
    }

    /// Queues a `Resumed` marker (merged with one that is last in the buffer, so markers
    /// never outnumber events by more than one) unless the buffer is abandoned. Never waits.
    pub(crate) fn push_resumed(&self, resumption: Resumption) -> Pushed {
        let waker = {
            let mut state = self.lock();
            if state.abandoned {
                return Pushed::Abandoned;
            }
            if state.missed > 0 {
                let missed = std::mem::take(&mut state.missed);
                state.items.push_back(Item::Lagged(missed));
            }
            match state.items.back_mut() {
                Some(Item::Resumed(last)) => *last = merge(*last, resumption),
                _ => state.items.push_back(Item::Resumed(resumption)),
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Pushed::Queued
    }

    /// Ends the stream: after the buffered items the subscriber sees `Closed(info)`, then
    /// `None`. Only the first call counts.
    pub(crate) fn close(&self, info: &CloseInfo) {
        let waker = {
            let mut state = self.lock();
            if state.closed.is_none() {
                state.closed = Some(info.clone());
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// True once the subscriber is gone.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.lock().abandoned
    }

    fn abandon(&self) {
        let mut state = self.lock();
        state.abandoned = true;
        state.items.clear();
        state.events = 0;
        state.waker = None;
    }

    /// The next item of any kind.
    fn poll_item(&self, cx: &mut Context<'_>) -> Poll<Option<SubscriptionItem>> {
        let mut state = self.lock();
        if let Some(item) = state.items.pop_front() {
            return Poll::Ready(Some(match item {
                Item::Event(event) => {
                    state.events -= 1;
                    SubscriptionItem::Event(event)
                }
                Item::Lagged(missed) => SubscriptionItem::Lagged { missed },
                Item::Resumed(resumption) => SubscriptionItem::Resumed(resumption),
            }));
        }
        if state.missed > 0 {
            let missed = std::mem::take(&mut state.missed);
            return Poll::Ready(Some(SubscriptionItem::Lagged { missed }));
        }
        if let Some(info) = &state.closed {
            if state.close_reported {
                return Poll::Ready(None);
            }
            let info = info.clone();
            state.close_reported = true;
            return Poll::Ready(Some(SubscriptionItem::Closed(info)));
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next event or error: [`SubscriptionItem`]s mapped to `Result`s, recovered
    /// resumptions skipped (nothing is missing at them).
    fn poll_next(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<EventMessage, SubscriptionError>>> {
        loop {
            let item = match self.poll_item(cx) {
                Poll::Ready(Some(item)) => item,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            return Poll::Ready(Some(match item {
                SubscriptionItem::Event(event) => Ok(event),
                SubscriptionItem::Lagged { missed } => Err(SubscriptionError::Lagged { missed }),
                SubscriptionItem::Resumed(resumption) => match resumption.recovery {
                    Recovery::Recovered => continue,
                    Recovery::Reset | Recovery::Fresh => Err(SubscriptionError::Reset(resumption)),
                },
                SubscriptionItem::Closed(info) => Err(SubscriptionError::Closed(info)),
            }));
        }
    }
}

/// The subscriber's end of a [`Buffer`]: dropping it tells the driver nobody reads any more
/// (the driver then unsubscribes when the room's next event arrives).
#[derive(Debug)]
pub(crate) struct Reader(Arc<Buffer>);

impl Reader {
    pub(crate) fn new(buffer: Arc<Buffer>) -> Self {
        Reader(buffer)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// A live subscription to one room: a stream of its events in `seq` order.
///
/// Yields `Ok(event)` per event, `Err(Lagged { missed })` where events were dropped because
/// the buffer was full, `Err(Reset(..))` where the stream was re-established after a
/// reconnect without recovery (or the room's epoch changed), and `Err(Closed(info))` once
/// when the session ends, then `None`. [`Subscription::next_item`] yields the same stream as
/// [`SubscriptionItem`]s, recovered resumptions included.
///
/// With [`crate::ConnectOptions::reconnect`] a subscription survives reconnects: the client
/// subscribes again with the last position it received, and an event it already has (same
/// epoch, `seq` not above the held one) is never yielded twice.
///
/// Dropping it unsubscribes lazily (when the room's next event arrives); call
/// [`Subscription::unsubscribe`] to leave the room at once and wait for the broker.
#[derive(Debug)]
pub struct Subscription {
    reader: Reader,
    room: RoomName,
    start: Position,
    client: Client,
}

impl Subscription {
    pub(crate) fn new(reader: Reader, room: RoomName, start: Position, client: Client) -> Self {
        Subscription {
            reader,
            room,
            start,
            client,
        }
    }

    /// The room.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// The room's last sequence number when the subscription started (from `Subscribed`):
    /// every event yielded has a larger one.
    pub fn start_seq(&self) -> u64 {
        self.start.seq
    }

    /// The room's position when the subscription started (from `Subscribed`): its history
    /// epoch (0: the room keeps none, so it cannot be recovered after a reconnect) and last
    /// sequence number.
    pub fn start_position(&self) -> Position {
        self.start
    }

    /// The next event, `Lagged` or `Reset` marker, or end of stream (see [`Subscription`]).
    pub async fn next_event(&mut self) -> Option<Result<EventMessage, SubscriptionError>> {
        std::future::poll_fn(|cx| self.reader.0.poll_next(cx)).await
    }

    /// The next item of the stream, every marker included: events, `Lagged`, `Resumed`
    /// (recovered, reset or fresh) and `Closed`, then `None`.
    pub async fn next_item(&mut self) -> Option<SubscriptionItem> {
        std::future::poll_fn(|cx| self.reader.0.poll_item(cx)).await
    }

    /// Leaves the room and waits for the broker's `Unsubscribed`. Events still buffered are
    /// discarded.
    pub async fn unsubscribe(self) -> Result<(), Error> {
        self.client
            .unsubscribe(self.room.clone(), Arc::clone(&self.reader.0))
            .await
    }
}

impl Stream for Subscription {
    type Item = Result<EventMessage, SubscriptionError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.reader.0.poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn event(seq: u64) -> EventMessage {
        EventMessage {
            room: RoomName::new("t:1").unwrap(),
            event: EventName::new("e").unwrap(),
            data: Payload::encode(&seq).unwrap(),
            seq,
        }
    }

    fn poll(buffer: &Buffer) -> Poll<Option<Result<u64, SubscriptionError>>> {
        let mut cx = Context::from_waker(Waker::noop());
        buffer
            .poll_next(&mut cx)
            .map(|item| item.map(|r| r.map(|e| e.seq)))
    }

    #[test]
    fn lag_marker_sits_at_the_gap() {
        let buffer = Buffer::new(2);
        for seq in 1..=5 {
            let expected = if seq <= 2 {
                Pushed::Queued
            } else {
                Pushed::Dropped
            };
            assert_eq!(buffer.push(event(seq)), expected, "seq {seq}");
        }
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(1))));
        assert_eq!(buffer.push(event(6)), Pushed::Queued);
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(2))));
        assert_eq!(
            poll(&buffer),
            Poll::Ready(Some(Err(SubscriptionError::Lagged { missed: 3 })))
        );
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(6))));
        assert_eq!(poll(&buffer), Poll::Pending);
    }

    #[test]
    fn lag_is_reported_when_drained_if_nothing_follows() {
        let buffer = Buffer::new(1);
        buffer.push(event(1));
        buffer.push(event(2));
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(1))));
        assert_eq!(
            poll(&buffer),
            Poll::Ready(Some(Err(SubscriptionError::Lagged { missed: 1 })))
        );
        assert_eq!(poll(&buffer), Poll::Pending);
    }

    #[test]
    fn close_comes_after_buffered_items_then_none() {
        let buffer = Buffer::new(4);
        buffer.push(event(1));
        buffer.close(&CloseInfo::lost("gone"));
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(1))));
        assert_eq!(
            poll(&buffer),
            Poll::Ready(Some(Err(SubscriptionError::Closed(CloseInfo::lost(
                "gone"
            )))))
        );
        assert_eq!(poll(&buffer), Poll::Ready(None));
    }

    #[test]
    fn dropped_reader_abandons_the_buffer() {
        let buffer = Buffer::new(4);
        buffer.push(event(1));
        drop(Reader::new(Arc::clone(&buffer)));
        assert!(buffer.is_abandoned());
        assert_eq!(buffer.push(event(2)), Pushed::Abandoned);
    }

    fn resumed(recovery: Recovery, from: u64, to: u64) -> Resumption {
        Resumption {
            recovery,
            previous: Position {
                epoch: 7,
                seq: from,
            },
            position: Position { epoch: 7, seq: to },
        }
    }

    #[test]
    fn recovered_markers_are_skipped_by_next_event_and_others_reported() {
        let buffer = Buffer::new(4);
        buffer.push(event(1));
        buffer.push_resumed(resumed(Recovery::Recovered, 1, 1));
        buffer.push(event(2));
        buffer.push_resumed(resumed(Recovery::Reset, 2, 9));
        buffer.push(event(10));
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(1))));
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(2))));
        assert_eq!(
            poll(&buffer),
            Poll::Ready(Some(Err(SubscriptionError::Reset(resumed(
                Recovery::Reset,
                2,
                9
            )))))
        );
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(10))));
        assert_eq!(poll(&buffer), Poll::Pending);
    }

    #[test]
    fn consecutive_markers_merge_into_the_worse_one() {
        let buffer = Buffer::new(4);
        buffer.push_resumed(resumed(Recovery::Recovered, 1, 1));
        buffer.push_resumed(resumed(Recovery::Fresh, 1, 5));
        buffer.push_resumed(resumed(Recovery::Recovered, 5, 5));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            buffer.poll_item(&mut cx),
            Poll::Ready(Some(SubscriptionItem::Resumed(resumed(
                Recovery::Fresh,
                1,
                5
            ))))
        );
        assert_eq!(buffer.poll_item(&mut cx), Poll::Pending);
        // A recovered marker alone is visible to next_item only.
        buffer.push_resumed(resumed(Recovery::Recovered, 5, 5));
        buffer.close(&CloseInfo::lost("gone"));
        assert_eq!(
            poll(&buffer),
            Poll::Ready(Some(Err(SubscriptionError::Closed(CloseInfo::lost(
                "gone"
            )))))
        );
    }
}
