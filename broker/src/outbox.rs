//! The bounded outbound queue of one session.
//!
//! Each entry is an already-encoded frame plus its [`Lane`]: which ordered channel of the
//! transport it belongs to (WebTransport writes each room on its own stream; WebSocket has one
//! channel and ignores lanes). The hub pushes shared frames into it from any thread without
//! waiting; the
//! session's writer drains everything queued in one go and writes it as one batch. The queue is
//! capped in bytes: a push that would exceed the cap marks the session as a slow consumer,
//! drops what is queued and wakes the session so it can close with `slow_consumer`. Nothing
//! here knows about sockets or frames' contents.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::{Notify, futures::Notified};

/// The ordered channel a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Session-level frames: Welcome, Ack, Error, Pong, Close.
    Control,
    /// `Subscribed` of the room with this hub id: the room's channel opens.
    RoomOpen(u64),
    /// An `Event` of the room with this hub id.
    Room(u64),
    /// An `Event` of the volatile room with this hub id: may travel as a datagram, and is
    /// dropped (oldest first) rather than overflowing the queue.
    Volatile(u64),
    /// `Unsubscribed` of the room with this hub id: the room's channel ends after it.
    RoomClose(u64),
}

/// One queued frame and its lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The encoded frame (shared with other sessions for events).
    pub frame: Bytes,
    /// Where it goes.
    pub lane: Lane,
}

impl Outgoing {
    /// A session-level frame.
    pub fn control(frame: Bytes) -> Self {
        Outgoing {
            frame,
            lane: Lane::Control,
        }
    }
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The byte cap was exceeded just now or earlier: the session is a slow consumer.
    Full,
    /// The session has ended.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    Overflowed,
    Closed,
}

#[derive(Debug)]
struct Queue {
    frames: VecDeque<Outgoing>,
    bytes: usize,
    status: Status,
}

/// A byte-capped queue of encoded frames with wake-ups only on empty → non-empty.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    cap_bytes: usize,
    /// Woken when the queue becomes non-empty.
    ready: Notify,
    /// Woken once when the queue overflows.
    overflow: Notify,
    /// Volatile events dropped to make room.
    dropped: AtomicU64,
}

impl Outbox {
    /// An empty queue holding at most `cap_bytes` of frames.
    pub fn new(cap_bytes: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                bytes: 0,
                status: Status::Open,
            }),
            cap_bytes,
            ready: Notify::new(),
            overflow: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A poisoned lock only means another thread panicked mid-push; the queue is still
        // structurally valid.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a session-level frame. Never waits.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.push_to(Outgoing::control(frame))
    }

    /// Queues a frame on its lane. Never waits.
    pub fn push_to(&self, item: Outgoing) -> Result<(), PushError> {
        let was_empty;
        {
            let mut q = self.lock();
            match q.status {
                Status::Open => {}
                Status::Overflowed => return Err(PushError::Full),
                Status::Closed => return Err(PushError::Closed),
            }
            if q.bytes + item.frame.len() > self.cap_bytes {
                if matches!(item.lane, Lane::Volatile(_)) {
                    // Latest value wins: make room by dropping older volatile events; if that
                    // is not enough, drop this one. The subscriber is not disconnected.
                    while q.bytes + item.frame.len() > self.cap_bytes {
                        let Some(oldest) = q
                            .frames
                            .iter()
                            .position(|o| matches!(o.lane, Lane::Volatile(_)))
                        else {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        };
                        if let Some(old) = q.frames.remove(oldest) {
                            q.bytes -= old.frame.len();
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    q.status = Status::Overflowed;
                    q.frames = VecDeque::new();
                    q.bytes = 0;
                    drop(q);
                    self.overflow.notify_one();
                    return Err(PushError::Full);
                }
            }
            was_empty = q.frames.is_empty();
            q.bytes += item.frame.len();
            q.frames.push_back(item);
        }
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves every queued frame into `batch` (appending). Returns false if the queue
    /// overflowed (then nothing is moved).
    pub fn drain_into(&self, batch: &mut Vec<Outgoing>) -> bool {
        let mut q = self.lock();
        if q.status == Status::Overflowed {
            return false;
        }
        batch.extend(q.frames.drain(..));
        q.bytes = 0;
        if q.frames.capacity() > 64 {
            // Give back memory a burst left behind.
            q.frames.shrink_to(16);
        }
        true
    }

    /// Resolves when frames may be waiting (spurious wake-ups are possible). Keep the future
    /// across loop turns (and make a new one after it fires) rather than re-creating it each
    /// turn: registering a waiter is not free.
    pub fn ready(&self) -> Notified<'_> {
        self.ready.notified()
    }

    /// Resolves once the queue has overflowed.
    pub fn overflowed(&self) -> Notified<'_> {
        self.overflow.notified()
    }

    /// True if the queue has overflowed.
    pub fn is_overflowed(&self) -> bool {
        self.lock().status == Status::Overflowed
    }

    /// Ends the queue: later pushes fail with `Closed`. Frames still queued stay drainable.
    pub fn close(&self) {
        let mut q = self.lock();
        if q.status == Status::Open {
            q.status = Status::Closed;
        }
    }

    /// Volatile events dropped so far to stay under the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Bytes that may still be queued before the cap is reached.
    pub fn free_bytes(&self) -> usize {
        self.cap_bytes.saturating_sub(self.lock().bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_drain_and_overflow() {
        let outbox = Outbox::new(10);
        outbox.push(Bytes::from_static(b"12345")).unwrap();
        outbox.push(Bytes::from_static(b"12345")).unwrap();
        assert_eq!(outbox.queued_bytes(), 10);
        let mut batch = Vec::new();
        assert!(outbox.drain_into(&mut batch));
        assert_eq!(batch.len(), 2);
        assert_eq!(outbox.queued_bytes(), 0);
        outbox.push(Bytes::from_static(b"1234567890")).unwrap();
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Err(PushError::Full));
        assert!(outbox.is_overflowed());
        assert_eq!(outbox.queued_bytes(), 0, "overflow releases queued frames");
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Err(PushError::Full));
        batch.clear();
        assert!(!outbox.drain_into(&mut batch));
    }

    #[test]
    fn closed_refuses_pushes_but_keeps_frames() {
        let outbox = Outbox::new(100);
        outbox.push(Bytes::from_static(b"a")).unwrap();
        outbox.close();
        assert_eq!(
            outbox.push(Bytes::from_static(b"b")),
            Err(PushError::Closed)
        );
        let mut batch = Vec::new();
        assert!(outbox.drain_into(&mut batch));
        assert_eq!(batch, vec![Outgoing::control(Bytes::from_static(b"a"))]);
    }

    #[test]
    fn volatile_events_drop_oldest_instead_of_overflowing() {
        let outbox = Outbox::new(10);
        let volatile = |b: &'static [u8]| Outgoing {
            frame: Bytes::from_static(b),
            lane: Lane::Volatile(1),
        };
        outbox.push(Bytes::from_static(b"ctl")).unwrap();
        outbox.push_to(volatile(b"p1")).unwrap();
        outbox.push_to(volatile(b"p2")).unwrap();
        outbox.push_to(volatile(b"p3")).unwrap();
        // 3 + 2 + 2 + 2 = 9 bytes; p4 needs room: p1 goes.
        outbox.push_to(volatile(b"p4")).unwrap();
        assert!(!outbox.is_overflowed());
        assert_eq!(outbox.dropped(), 1);
        let mut batch = Vec::new();
        outbox.drain_into(&mut batch);
        let frames: Vec<_> = batch.iter().map(|o| o.frame.clone()).collect();
        assert_eq!(frames, ["ctl", "p2", "p3", "p4"].map(Bytes::from));
        // A volatile frame that cannot fit even alone is dropped, not queued.
        outbox.push(Bytes::from_static(b"123456789")).unwrap();
        outbox.push_to(volatile(b"xx")).unwrap();
        assert_eq!(outbox.dropped(), 2);
        assert!(!outbox.is_overflowed());
        // A reliable frame over the cap still overflows.
        assert_eq!(outbox.push(Bytes::from_static(b"yy")), Err(PushError::Full));
    }

    #[tokio::test]
    async fn wakes_on_first_push_and_on_overflow() {
        let outbox = std::sync::Arc::new(Outbox::new(4));
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.ready().await })
        };
        tokio::task::yield_now().await;
        outbox.push(Bytes::from_static(b"ab")).unwrap();
        waiter.await.unwrap();
        let _ = outbox.push(Bytes::from_static(b"abc"));
        tokio::time::timeout(std::time::Duration::from_secs(5), outbox.overflowed())
            .await
            .expect("overflow wakes the session");
    }
}
