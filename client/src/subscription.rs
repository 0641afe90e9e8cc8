//! Subscriptions and their bounded event buffers.
//!
//! Owns [`Subscription`], [`EventMessage`] and the per-subscription buffer ([`Buffer`]) that the
//! driver fills and the subscriber drains. Filling never waits: when the buffer is full the
//! event is dropped and counted, and the subscriber meets a `Lagged` marker exactly where the
//! gap is (or, if no event follows the gap, once it has drained the buffer). This module must
//! not talk to the socket; requests go through the [`Client`] handle.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use futures_util::Stream;
use roomcast_protocol::{EventName, Payload, RoomName};
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
    /// The room's sequence number for this event; increases by one per event in the room.
    pub seq: u64,
}

impl EventMessage {
    /// Decodes the CBOR payload into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.data.decode().map_err(Error::Encode)
    }
}

/// One item of a subscription buffer.
#[derive(Debug)]
enum Item {
    Event(EventMessage),
    Lagged(u64),
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

    /// Drops buffered events with `seq <= start`: they predate the subscription (an earlier
    /// subscription to the same room was still being torn down when they arrived).
    pub(crate) fn discard_up_to(&self, start: u64) {
        let mut state = self.lock();
        state
            .items
            .retain(|item| !matches!(item, Item::Event(e) if e.seq <= start));
        state.events = state
            .items
            .iter()
            .filter(|item| matches!(item, Item::Event(_)))
            .count();
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

    fn poll_next(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<EventMessage, SubscriptionError>>> {
        let mut state = self.lock();
        if let Some(item) = state.items.pop_front() {
            return Poll::Ready(Some(match item {
                Item::Event(event) => {
                    state.events -= 1;
                    Ok(event)
                }
                Item::Lagged(missed) => Err(SubscriptionError::Lagged { missed }),
            }));
        }
        if state.missed > 0 {
            let missed = std::mem::take(&mut state.missed);
            return Poll::Ready(Some(Err(SubscriptionError::Lagged { missed })));
        }
        if let Some(info) = &state.closed {
            if state.close_reported {
                return Poll::Ready(None);
            }
            let info = info.clone();
            state.close_reported = true;
            return Poll::Ready(Some(Err(SubscriptionError::Closed(info))));
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
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
/// the buffer was full, and `Err(Closed(info))` once when the session ends, then `None`.
/// Dropping it unsubscribes lazily (when the room's next event arrives); call
/// [`Subscription::unsubscribe`] to leave the room at once and wait for the broker.
#[derive(Debug)]
pub struct Subscription {
    reader: Reader,
    room: RoomName,
    start_seq: u64,
    client: Client,
}

impl Subscription {
    pub(crate) fn new(reader: Reader, room: RoomName, start_seq: u64, client: Client) -> Self {
        Subscription {
            reader,
            room,
            start_seq,
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
        self.start_seq
    }

    /// The next event, `Lagged` marker or end of stream (see [`Subscription`]).
    pub async fn next_event(&mut self) -> Option<Result<EventMessage, SubscriptionError>> {
        std::future::poll_fn(|cx| self.reader.0.poll_next(cx)).await
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

    #[test]
    fn discard_up_to_removes_stale_events_only() {
        let buffer = Buffer::new(4);
        for seq in [3, 4, 5] {
            buffer.push(event(seq));
        }
        buffer.discard_up_to(4);
        assert_eq!(poll(&buffer), Poll::Ready(Some(Ok(5))));
        assert_eq!(poll(&buffer), Poll::Pending);
        // The freed slots are usable again.
        for seq in 6..=9 {
            assert_eq!(buffer.push(event(seq)), Pushed::Queued);
        }
    }
}
