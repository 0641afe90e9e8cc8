//! The bounded outbound queue of one session.
//!
//! Each entry is an already-encoded frame plus its [`Lane`]: which ordered channel of the
//! transport it belongs to (WebTransport writes each room on its own stream; WebSocket has one
//! channel and ignores lanes). The hub pushes shared frames into it from any thread without
//! waiting; the session's writer drains what is queued in one go and writes it as one batch.
//! The queue is capped in bytes: a push that would exceed the cap marks the session as a slow
//! consumer, drops what is queued and wakes the session so it can close with `slow_consumer`.
//! Nothing here knows about sockets or frames' contents.
//!
//! What a subscriber that falls behind loses instead of its session, per room:
//!
//! - **Volatile rooms** (`Lane::Volatile`): a push over the cap evicts the oldest queued
//!   volatile events.
//! - **Conflating rooms** ([`Outbox::push_conflatable`], events with a conflation key): once
//!   the queue holds more than half its cap, the room's next event queues the room's
//!   `Conflation { active: true }` frame first, and from then on each event of the room
//!   replaces the queued event of the same key that came after that frame (the old one leaves
//!   a hole, the new one goes to the end, so `seq` keeps increasing). When the session takes
//!   the room's frames (a drain), the room's `Conflation { active: false }` follows them: it
//!   has caught up. The queue then holds at most one event per key of a conflating room, so
//!   only an unbounded number of keys can still overflow it. An `Unsubscribed` of the room ends
//!   its conflation without a frame.
//! - Everything else overflows as above.
//!
//! A writer that cannot take a room's frames right now (a WebTransport room stream out of
//! flow-control credit) may leave them here ([`Outbox::drain_into_except`]), where they are
//! conflated, dropped or counted against the cap like any queued frame.
//!
//! Holes (replaced or evicted events) cost one slot each until the queue is drained or they
//! outnumber the frames, when the queue is compacted: every operation is O(1) amortized, but
//! for evicting volatile events (a scan for the oldest) and partial drains (a pass over the
//! queue). A full drain hands the queue over by swapping two vectors, and the session is woken
//! through an atomic flag and waker rather than a lock: on the fan-out path a delivery costs
//! one push under the queue's lock and a share of one wake-up per batch.

use std::{
    collections::HashMap,
    num::NonZeroU64,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, MutexGuard};

use crate::wire::{Lane, Outgoing, Wire};

/// A conflating room's two `Conflation` frames (`active: true` and `false`), encoded once per
/// room by the hub and shared by its subscribers' queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflationFrames {
    /// `Conflation { active: true }`: the subscriber fell behind.
    pub on: Bytes,
    /// `Conflation { active: false }`: it caught up.
    pub off: Bytes,
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

/// The rooms being conflated, and where the replaceable event of each (room, key) is.
#[derive(Debug, Default)]
struct Conflating {
    /// Room id and its `Conflation { active: false }` frame, to send once it caught up.
    rooms: Vec<(u64, Bytes)>,
    /// (room, key) → index in [`Queue::frames`] of the queued event a later one replaces.
    latest: HashMap<(u64, NonZeroU64), usize>,
}

#[derive(Debug)]
struct Queue {
    /// Queued frames, in order. An entry whose frame is empty is a hole left by a replaced or
    /// evicted event (no frame is empty); holes never leave the queue. A `Vec`, so that a
    /// full drain hands the whole queue over by swapping it with the writer's empty batch.
    frames: Vec<Outgoing>,
    /// Holes in `frames`.
    holes: usize,
    /// Bytes of the queued frames (holes count nothing).
    bytes: usize,
    status: Status,
    /// Rooms being conflated (boxed: most sessions never conflate anything).
    conflating: Option<Box<Conflating>>,
    /// Lanes' rooms (`None`: the control lane) whose frames the last drain left queued.
    held: Vec<Option<u64>>,
}

/// Compact once holes outnumber the frames and there are more than this many.
const COMPACT_AFTER_HOLES: usize = 32;

/// What a push did.
enum Pushed {
    /// Queued; wake the session when true.
    Queued(bool),
    /// A volatile event that does not fit even alone: dropped.
    Dropped,
    /// Over the cap: the queue overflowed.
    Overflowed,
}

fn is_hole(item: &Outgoing) -> bool {
    item.frame.is_empty()
}

impl Queue {
    fn live(&self) -> usize {
        self.frames.len() - self.holes
    }

    fn is_conflating(&self, room: u64) -> bool {
        self.conflating
            .as_ref()
            .is_some_and(|c| c.rooms.iter().any(|(r, _)| *r == room))
    }

    /// Whether queuing a frame of `lane` should wake the session: nothing it could take was
    /// queued before.
    fn wakes_for(&self, lane: Lane) -> bool {
        self.live() == 0 || (!self.held.is_empty() && !self.held.contains(&lane.room()))
    }

    /// Queues `item` within `cap` bytes, evicting older volatile events for a volatile one.
    #[inline]
    fn push(&mut self, item: Outgoing, cap: usize, dropped: &AtomicU64) -> Pushed {
        let len = item.frame.len();
        if self.bytes + len > cap {
            if !matches!(item.lane, Lane::Volatile(_)) {
                self.overflow();
                return Pushed::Overflowed;
            }
            // Latest value wins: make room by dropping older volatile events; if that is not
            // enough, drop this one. The subscriber is not disconnected.
            while self.bytes + len > cap {
                let oldest = self
                    .frames
                    .iter()
                    .position(|e| matches!(e.lane, Lane::Volatile(_)) && !is_hole(e));
                dropped.fetch_add(1, Ordering::Relaxed);
                match oldest {
                    Some(at) => self.punch(at),
                    None => return Pushed::Dropped,
                }
            }
        }
        if let Lane::RoomClose(room) = item.lane {
            self.stop_conflating(room);
        }
        let wake = self.wakes_for(item.lane);
        self.bytes += len;
        self.frames.push(item);
        Pushed::Queued(wake)
    }

    /// Removes the frame at index `at`, leaving a hole; compacts when holes pile up.
    fn punch(&mut self, at: usize) {
        let Some(old) = self.frames.get_mut(at).filter(|e| !is_hole(e)) else {
            return;
        };
        let frame = std::mem::take(&mut old.frame);
        self.bytes -= frame.len();
        self.holes += 1;
        if self.holes > COMPACT_AFTER_HOLES && self.holes * 2 > self.frames.len() {
            self.compact();
        }
    }

    /// Drops the holes, keeping the replaceable events' indexes right.
    fn compact(&mut self) {
        if let Some(conflating) = self.conflating.as_mut() {
            // Old index → new index (holes are never replaceable events).
            let mut new_index = Vec::with_capacity(self.frames.len());
            let mut next = 0;
            for entry in &self.frames {
                new_index.push(next);
                next += usize::from(!is_hole(entry));
            }
            for at in conflating.latest.values_mut() {
                *at = new_index[*at];
            }
        }
        self.frames.retain(|e| !is_hole(e));
        self.holes = 0;
    }

    /// The room left (its `Unsubscribed` is being queued): its conflation ends silently.
    fn stop_conflating(&mut self, room: u64) {
        let Some(conflating) = self.conflating.as_mut() else {
            return;
        };
        let before = conflating.rooms.len();
        conflating.rooms.retain(|(r, _)| *r != room);
        if conflating.rooms.len() == before {
            return;
        }
        // Its queued events are no longer replaceable (a later subscription starts afresh).
        conflating.latest.retain(|(r, _), _| *r != room);
        if conflating.rooms.is_empty() {
            self.conflating = None;
        }
    }

    fn overflow(&mut self) {
        self.status = Status::Overflowed;
        self.frames = Vec::new();
        self.bytes = 0;
        self.holes = 0;
        self.conflating = None;
        self.held = Vec::new();
    }

    /// Gives back memory a burst left behind.
    fn shrink(&mut self) {
        if self.frames.capacity() > 64 && self.frames.len() < 16 {
            self.frames.shrink_to(16);
        }
    }
}

/// A byte-capped queue of encoded frames with wake-ups only when it gets something to take.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    cap_bytes: usize,
    /// Set when the queue got frames the session may take, or overflowed; cleared when the
    /// session sees it ([`Outbox::poll_ready`]).
    signal: AtomicBool,
    /// The session task waiting for `signal`. Registering it is a swap, not a lock: the
    /// session polls it on every turn of its loop.
    waiter: AtomicWaker,
    /// Volatile events dropped to make room.
    dropped: AtomicU64,
}

impl Outbox {
    /// An empty queue holding at most `cap_bytes` of frames.
    pub fn new(cap_bytes: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue {
                frames: Vec::new(),
                holes: 0,
                bytes: 0,
                status: Status::Open,
                conflating: None,
                held: Vec::new(),
            }),
            cap_bytes,
            signal: AtomicBool::new(false),
            waiter: AtomicWaker::new(),
            dropped: AtomicU64::new(0),
        }
    }

    #[inline]
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock()
    }

    fn open(q: &Queue) -> Result<(), PushError> {
        match q.status {
            Status::Open => Ok(()),
            Status::Overflowed => Err(PushError::Full),
            Status::Closed => Err(PushError::Closed),
        }
    }

    /// Wakes the session if a push concerns it, after the lock is released.
    #[inline]
    fn settle(&self, pushed: Pushed) -> Result<(), PushError> {
        match pushed {
            Pushed::Queued(true) => self.wake(),
            Pushed::Queued(false) | Pushed::Dropped => {}
            Pushed::Overflowed => {
                self.wake();
                return Err(PushError::Full);
            }
        }
        Ok(())
    }

    /// Queues a session-level frame. Never waits.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.push_to(Outgoing::control(frame))
    }

    /// Queues a frame on its lane. Never waits.
    #[inline]
    pub fn push_to(&self, item: Outgoing) -> Result<(), PushError> {
        let pushed = {
            let mut q = self.lock();
            Self::open(&q)?;
            q.push(item, self.cap_bytes, &self.dropped)
        };
        self.settle(pushed)
    }

    /// Queues an event frame shared with other sessions on its (room or volatile) lane: the
    /// fan-out's push, which takes the lock once and moves nothing but a reference count
    /// when the frame fits. Never waits.
    #[inline]
    pub fn push_shared(&self, frame: &Wire, lane: Lane) -> Result<(), PushError> {
        let item = Outgoing {
            frame: frame.clone(),
            lane,
        };
        let len = item.frame.len();
        let wake = {
            let mut q = self.lock();
            Self::open(&q)?;
            if q.bytes + len > self.cap_bytes || matches!(lane, Lane::RoomClose(_)) {
                let pushed = q.push(item, self.cap_bytes, &self.dropped);
                drop(q);
                return self.settle(pushed);
            }
            let wake = q.wakes_for(lane);
            q.bytes += len;
            q.frames.push(item);
            wake
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Queues an event of a conflating room (`item.lane` is `Lane::Room`; other lanes are
    /// queued as by [`Outbox::push_to`]) whose conflation key hashes to `key`. Below half the
    /// cap it is queued as usual; above it, or while the room is being conflated, it replaces
    /// the room's queued event of the same key (see the module docs), `frames` telling the
    /// subscriber. Returns whether it replaced one. Never waits.
    pub fn push_conflatable(
        &self,
        item: Outgoing,
        key: NonZeroU64,
        frames: &ConflationFrames,
    ) -> Result<bool, PushError> {
        let Lane::Room(room) = item.lane else {
            return self.push_to(item).map(|()| false);
        };
        let (pushed, replaced) = {
            let mut q = self.lock();
            Self::open(&q)?;
            let active = q.is_conflating(room);
            if !active && q.bytes + item.frame.len() <= self.cap_bytes / 2 {
                let pushed = q.push(item, self.cap_bytes, &self.dropped);
                drop(q);
                return self.settle(pushed).map(|()| false);
            }
            let mut wake = false;
            if !active {
                // Falling behind: say so, in the room's order, before the first event that
                // may replace another.
                let on = Outgoing {
                    frame: frames.on.clone().into(),
                    lane: Lane::Room(room),
                };
                match q.push(on, self.cap_bytes, &self.dropped) {
                    Pushed::Queued(w) => wake = w,
                    other => {
                        drop(q);
                        return self.settle(other).map(|()| false);
                    }
                }
                q.conflating
                    .get_or_insert_with(Box::default)
                    .rooms
                    .push((room, frames.off.clone()));
            }
            let older = q
                .conflating
                .as_mut()
                .and_then(|c| c.latest.remove(&(room, key)));
            if let Some(at) = older {
                q.punch(at);
            }
            // After the punch, which may have compacted the queue.
            let at = q.frames.len();
            let pushed = match q.push(item, self.cap_bytes, &self.dropped) {
                Pushed::Queued(w) => {
                    if let Some(c) = q.conflating.as_mut() {
                        c.latest.insert((room, key), at);
                    }
                    Pushed::Queued(w || wake)
                }
                other => other,
            };
            (pushed, older.is_some())
        };
        self.settle(pushed).map(|()| replaced)
    }

    /// Moves every queued frame into `batch` (appending; when `batch` is empty, by swapping
    /// the two, so `batch`'s capacity is reused by the queue), then the `Conflation { active:
    /// false }` of every room that was being conflated. Returns false if the queue
    /// overflowed (then nothing is moved).
    pub fn drain_into(&self, batch: &mut Vec<Outgoing>) -> bool {
        let mut q = self.lock();
        if q.status == Status::Overflowed {
            return false;
        }
        if q.holes > 0 {
            q.frames.retain(|e| !is_hole(e));
            q.holes = 0;
        }
        if batch.is_empty() {
            std::mem::swap(&mut q.frames, batch);
        } else {
            batch.append(&mut q.frames);
        }
        q.bytes = 0;
        q.held.clear();
        if let Some(conflating) = q.conflating.take() {
            for (room, off) in conflating.rooms {
                batch.push(Outgoing {
                    frame: off.into(),
                    lane: Lane::Room(room),
                });
            }
        }
        q.shrink();
        true
    }

    /// Like [`Outbox::drain_into`], but leaves queued, in order, the frames of every room
    /// (or of the control lane) for which `hold` says so, and every later frame of that room:
    /// the writer cannot take them now. A held room that was being conflated stays so. Until
    /// the next drain, only pushes to other lanes wake the session. Returns false if the
    /// queue overflowed.
    pub fn drain_into_except(
        &self,
        batch: &mut Vec<Outgoing>,
        mut hold: impl FnMut(Lane) -> bool,
    ) -> bool {
        let mut q = self.lock();
        if q.status == Status::Overflowed {
            return false;
        }
        let mut held: Vec<Option<u64>> = Vec::new();
        let mut bytes = 0;
        let conflating = q.conflating.is_some();
        // Old index → new index of the frames that stay (only needed to keep the
        // replaceable events' indexes right).
        let mut new_index: Vec<Option<usize>> = Vec::new();
        let mut kept = 0;
        // In place: holes go, taken frames go to the batch, held ones stay in order.
        q.frames.retain_mut(|entry| {
            let keep = !is_hole(entry) && {
                let room = entry.lane.room();
                held.contains(&room) || {
                    let keep = hold(entry.lane);
                    if keep {
                        held.push(room);
                    }
                    keep
                }
            };
            if conflating {
                new_index.push(keep.then_some(kept));
            }
            if keep {
                bytes += entry.frame.len();
                kept += 1;
            } else if !is_hole(entry) {
                batch.push(Outgoing {
                    frame: std::mem::take(&mut entry.frame),
                    lane: entry.lane,
                });
            }
            keep
        });
        if let Some(conflating) = q.conflating.as_mut() {
            conflating.rooms.retain(|(room, off)| {
                let id = Some(*room);
                if held.contains(&id) {
                    return true;
                }
                if hold(Lane::Room(*room)) {
                    held.push(id);
                    return true;
                }
                batch.push(Outgoing {
                    frame: off.clone().into(),
                    lane: Lane::Room(*room),
                });
                false
            });
            // Events taken are no longer replaceable; held ones moved.
            conflating
                .latest
                .retain(|_, at| match new_index.get(*at).copied().flatten() {
                    Some(new) => {
                        *at = new;
                        true
                    }
                    None => false,
                });
            if conflating.rooms.is_empty() {
                q.conflating = None;
            }
        }
        q.bytes = bytes;
        q.holes = 0;
        q.held = held;
        q.shrink();
        true
    }

    /// Whether the last drain left frames (or a conflating room) held.
    pub fn has_held(&self) -> bool {
        !self.lock().held.is_empty()
    }

    /// Ready when frames may be waiting or the queue overflowed (spurious wake-ups are
    /// possible); each readiness is reported once. One task at a time may wait.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registering before looking: a push after the look finds the waker in place.
        if self.signal.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waiter.register(cx.waker());
        if self.signal.swap(false, Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves as [`Outbox::poll_ready`] does.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Wakes the session as if frames had been queued.
    #[inline]
    pub fn wake(&self) {
        self.signal.store(true, Ordering::Release);
        self.waiter.wake();
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

    /// Frames currently queued (holes excluded).
    pub fn queued_frames(&self) -> usize {
        self.lock().live()
    }

    /// Bytes that may still be queued before the cap is reached.
    pub fn free_bytes(&self) -> usize {
        self.cap_bytes.saturating_sub(self.lock().bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

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
            frame: Bytes::from_static(b).into(),
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
        assert_eq!(
            frames,
            ["ctl", "p2", "p3", "p4"].map(|b| Wire::from(Bytes::from(b)))
        );
        // A volatile frame that cannot fit even alone is dropped, not queued.
        outbox.push(Bytes::from_static(b"123456789")).unwrap();
        outbox.push_to(volatile(b"xx")).unwrap();
        assert_eq!(outbox.dropped(), 2);
        assert!(!outbox.is_overflowed());
        // A reliable frame over the cap still overflows.
        assert_eq!(outbox.push(Bytes::from_static(b"yy")), Err(PushError::Full));
    }

    fn event(room: u64, body: &str) -> Outgoing {
        Outgoing {
            frame: Bytes::copy_from_slice(body.as_bytes()).into(),
            lane: Lane::Room(room),
        }
    }

    fn key(k: u64) -> NonZeroU64 {
        NonZeroU64::new(k).unwrap()
    }

    fn markers(room: u64) -> ConflationFrames {
        ConflationFrames {
            on: Bytes::from(format!("on{room}")),
            off: Bytes::from(format!("off{room}")),
        }
    }

    fn drained(outbox: &Outbox) -> Vec<String> {
        let mut batch = Vec::new();
        assert!(outbox.drain_into(&mut batch));
        batch
            .iter()
            .map(|o| String::from_utf8(o.frame.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn conflation_starts_over_half_the_cap_and_keeps_the_latest_per_key() {
        let outbox = Outbox::new(40);
        let m = markers(1);
        // Under half the cap (20 bytes): queued as usual, nothing replaced.
        for body in ["a1-01", "b1-02", "a1-03", "b1-04"] {
            assert!(
                !outbox
                    .push_conflatable(event(1, body), key(body.as_bytes()[0].into()), &m)
                    .unwrap()
            );
        }
        assert_eq!(outbox.queued_bytes(), 20);
        // Over it: the marker, then events that replace each other per key.
        let push = |body: &str| {
            outbox
                .push_conflatable(event(1, body), key(body.as_bytes()[0].into()), &m)
                .unwrap()
        };
        assert!(!push("a1-05"));
        assert!(!push("b1-06"));
        assert!(push("a1-07"));
        assert!(push("a1-08"));
        assert!(push("b1-09"));
        // A non-conflatable frame in between is kept, in order.
        outbox.push(Bytes::from_static(b"c")).unwrap();
        assert!(push("a1-10"));
        assert_eq!(outbox.queued_bytes(), 20 + 3 + 5 + 1 + 5);
        assert_eq!(
            drained(&outbox),
            [
                "a1-01", "b1-02", "a1-03", "b1-04", "on1", "b1-09", "c", "a1-10", "off1"
            ]
        );
        // Caught up: the next events queue as usual again.
        assert!(!push("a1-11"));
        assert!(!push("a1-12"));
        assert_eq!(drained(&outbox), ["a1-11", "a1-12"]);
    }

    #[test]
    fn conflation_bounds_the_queue_by_keys_and_overflows_only_on_new_keys() {
        let outbox = Outbox::new(1000);
        let m = markers(7);
        let mut replaced = 0;
        // 100 000 events of 10 bytes over 8 keys: 1 MB through a 1000-byte queue.
        for n in 0..100_000u64 {
            let body = format!("{:02}-{:07}", n % 8, n);
            if outbox
                .push_conflatable(event(7, &body), key(n % 8 + 1), &m)
                .unwrap()
            {
                replaced += 1;
            }
            assert!(outbox.queued_bytes() <= 1000);
        }
        assert!(replaced > 99_000, "{replaced}");
        // Holes are compacted: the queue's slots stay proportional to what it holds.
        assert!(
            outbox.lock().frames.len() <= 200,
            "{}",
            outbox.lock().frames.len()
        );
        let frames = drained(&outbox);
        let (head, tail) = frames.split_at(frames.iter().position(|f| f == "on7").unwrap());
        assert!(head.len() <= 50);
        // After the marker: the 8 latest events, one per key, in publish order, then off.
        let latest: Vec<String> = (100_000u64 - 8..100_000)
            .map(|n| format!("{:02}-{:07}", n % 8, n))
            .collect();
        assert_eq!(&tail[1..9], &latest[..]);
        assert_eq!(tail[9..], ["off7"]);
        // Too many keys: conflation cannot bound it, the queue overflows as before.
        let outbox = Outbox::new(100);
        let result = (1..=100u64)
            .map(|n| outbox.push_conflatable(event(1, "0123456789"), key(n), &m))
            .find(Result::is_err);
        assert_eq!(result, Some(Err(PushError::Full)));
        assert!(outbox.is_overflowed());
    }

    #[test]
    fn conflation_is_per_room_and_ends_silently_with_unsubscribed() {
        let outbox = Outbox::new(22);
        let (m1, m2) = (markers(1), markers(2));
        outbox.push(Bytes::from_static(b"0123456789")).unwrap();
        // Over half: room 1 conflates; room 2's events are a separate key space.
        outbox
            .push_conflatable(event(1, "x1"), key(1), &m1)
            .unwrap();
        outbox
            .push_conflatable(event(2, "y1"), key(1), &m2)
            .unwrap();
        assert!(
            outbox
                .push_conflatable(event(1, "x2"), key(1), &m1)
                .unwrap()
        );
        // Room 1 leaves: no off frame for it, and its queued event stays.
        outbox
            .push_to(Outgoing {
                frame: Bytes::from_static(b"U1").into(),
                lane: Lane::RoomClose(1),
            })
            .unwrap();
        assert_eq!(
            drained(&outbox),
            ["0123456789", "on1", "on2", "y1", "x2", "U1", "off2"]
        );
    }

    #[test]
    fn held_rooms_stay_queued_and_keep_conflating() {
        let woken = |outbox: &Outbox| {
            let notified = outbox.ready();
            tokio::pin!(notified);
            notified
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
                .is_ready()
        };
        let outbox = Outbox::new(40);
        let m = markers(1);
        outbox
            .push_conflatable(event(1, "a-01"), key(1), &m)
            .unwrap();
        outbox.push(Bytes::from_static(b"pong")).unwrap();
        outbox
            .push_conflatable(event(2, "z-01"), key(1), &markers(2))
            .unwrap();
        let mut batch = Vec::new();
        assert!(outbox.drain_into_except(&mut batch, |lane| lane.room() == Some(1)));
        let frames: Vec<_> = batch.iter().map(|o| o.frame.clone()).collect();
        assert_eq!(frames, ["pong", "z-01"].map(|b| Wire::from(Bytes::from(b))));
        assert!(outbox.has_held());
        assert_eq!(outbox.queued_bytes(), 4);
        assert!(woken(&outbox), "the first push woke the session");
        // Room 1 keeps queueing (over half the cap it conflates) without waking the session;
        // another lane wakes it.
        for n in 2..=20 {
            let body = format!("a-{n:02}");
            outbox
                .push_conflatable(event(1, &body), key(n % 2 + 1), &m)
                .unwrap();
        }
        assert!(outbox.queued_bytes() <= 40);
        assert!(!woken(&outbox), "pushes to a held room do not wake");
        outbox.push(Bytes::from_static(b"ack")).unwrap();
        assert!(woken(&outbox));
        // Still held: only the control frame goes; once released, the room's frames and then
        // its off frame.
        batch.clear();
        outbox.drain_into_except(&mut batch, |lane| lane.room() == Some(1));
        assert_eq!(batch.len(), 1);
        assert_eq!(
            drained(&outbox),
            [
                "a-01", "a-02", "a-03", "a-04", "a-05", "on1", "a-19", "a-20", "off1"
            ]
        );
        assert!(!outbox.has_held());
    }

    #[test]
    fn held_room_frames_stay_behind_the_first_held_one() {
        let outbox = Outbox::new(100);
        outbox
            .push_to(Outgoing {
                frame: Bytes::from_static(b"S").into(),
                lane: Lane::RoomOpen(3),
            })
            .unwrap();
        outbox.push_to(event(3, "e1")).unwrap();
        outbox
            .push_to(Outgoing {
                frame: Bytes::from_static(b"U").into(),
                lane: Lane::RoomClose(3),
            })
            .unwrap();
        outbox
            .push_to(Outgoing {
                frame: Bytes::from_static(b"S2").into(),
                lane: Lane::RoomOpen(3),
            })
            .unwrap();
        let mut batch = Vec::new();
        // The writer would take the room's opening but not its events: nothing of the room
        // after the first held frame overtakes it.
        outbox.drain_into_except(&mut batch, |lane| matches!(lane, Lane::Room(_)));
        assert_eq!(batch.len(), 1);
        assert_eq!(drained(&outbox), ["e1", "U", "S2"]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// An event of room 1..=3 (`key`: conflatable), of `len` bytes.
        Event {
            room: u64,
            key: Option<u64>,
            len: usize,
        },
        /// A volatile event of room 4.
        Volatile { len: usize },
        /// A control frame.
        Control,
        /// `Unsubscribed` of a room.
        Close { room: u64 },
        /// A drain holding the rooms in `mask` (bit per room; 0: a full drain).
        Drain { mask: u8 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (1..=3u64, proptest::option::weighted(0.8, 1..=4u64), 1..30usize)
                .prop_map(|(room, key, len)| Op::Event { room, key, len }),
            1 => (1..30usize).prop_map(|len| Op::Volatile { len }),
            1 => Just(Op::Control),
            1 => (1..=3u64).prop_map(|room| Op::Close { room }),
            1 => (0..16u8).prop_map(|mask| Op::Drain { mask }),
        ]
    }

    /// Frames are `E` + 8-byte id + padding, markers `N`/`F` + room.
    fn check_run(ops: &[Op]) {
        let outbox = Outbox::new(400);
        let frames: Vec<ConflationFrames> = (0..=4u8)
            .map(|r| ConflationFrames {
                on: Bytes::from(vec![b'N', r]),
                off: Bytes::from(vec![b'F', r]),
            })
            .collect();
        // id → (room, key) of every event pushed.
        let mut pushed: Vec<(u64, Option<u64>)> = Vec::new();
        let mut out: Vec<Outgoing> = Vec::new();
        let mut replaced = 0;
        let take = |outbox: &Outbox, mask: u8, out: &mut Vec<Outgoing>| {
            let before = outbox.queued_bytes();
            let mut batch = Vec::new();
            if mask == 0 {
                assert!(outbox.drain_into(&mut batch));
                // What was counted is what came out, but the off frames added at the end.
                let counted: usize = batch
                    .iter()
                    .filter(|o| o.frame[0] != b'F')
                    .map(|o| o.frame.len())
                    .sum();
                assert_eq!(counted, before);
                assert_eq!(outbox.queued_bytes(), 0);
            } else {
                assert!(outbox.drain_into_except(&mut batch, |lane| {
                    lane.room().is_some_and(|r| r < 4 && mask & (1 << r) != 0)
                }));
            }
            out.extend(batch);
        };
        for op in ops {
            let id = pushed.len() as u64;
            let event = |len: usize| {
                let mut body = vec![b'E'];
                body.extend_from_slice(&id.to_be_bytes());
                body.resize(9 + len, 0);
                Bytes::from(body)
            };
            let result = match op {
                Op::Event { room, key, len } => {
                    pushed.push((*room, *key));
                    let item = Outgoing {
                        frame: event(*len).into(),
                        lane: Lane::Room(*room),
                    };
                    match key {
                        Some(k) => outbox
                            .push_conflatable(
                                item,
                                NonZeroU64::new(*k).unwrap(),
                                &frames[*room as usize],
                            )
                            .map(|r| replaced += usize::from(r)),
                        None => outbox.push_to(item),
                    }
                }
                Op::Volatile { len } => {
                    pushed.push((4, None));
                    outbox.push_to(Outgoing {
                        frame: event(*len).into(),
                        lane: Lane::Volatile(4),
                    })
                }
                Op::Control => outbox.push(Bytes::from_static(b"C")),
                Op::Close { room } => outbox.push_to(Outgoing {
                    frame: Bytes::from(vec![b'U', *room as u8]).into(),
                    lane: Lane::RoomClose(*room),
                }),
                Op::Drain { mask } => {
                    take(&outbox, *mask, &mut out);
                    Ok(())
                }
            };
            if result.is_err() {
                // Overflowed: nothing more to check about what it held.
                assert!(outbox.is_overflowed());
                return;
            }
            assert!(outbox.queued_bytes() <= 400);
        }
        take(&outbox, 0, &mut out);
        // Per room: events in push order; markers alternate on, off; within one conflation
        // episode at most one event per key.
        let mut seen = vec![false; pushed.len()];
        let mut events = 0;
        for room in 1..=4u64 {
            let mut last = None;
            let mut conflating = false;
            let mut keys = Vec::new();
            for o in out.iter().filter(|o| o.lane.room() == Some(room)) {
                match o.frame[0] {
                    b'E' => {
                        let id = u64::from_be_bytes(o.frame[1..9].try_into().unwrap());
                        assert!(last < Some(id), "room {room}: order");
                        last = Some(id);
                        assert!(!seen[id as usize], "duplicate");
                        seen[id as usize] = true;
                        events += 1;
                        let (r, key) = pushed[id as usize];
                        assert_eq!(r, room);
                        if let (true, Some(k)) = (conflating, key) {
                            assert!(!keys.contains(&k), "room {room}: key {k} twice");
                            keys.push(k);
                        }
                    }
                    b'N' => {
                        assert!(!conflating, "room {room}: on twice");
                        conflating = true;
                    }
                    b'F' => {
                        assert!(conflating, "room {room}: off without on");
                        conflating = false;
                        keys.clear();
                    }
                    b'U' => {
                        conflating = false;
                        keys.clear();
                    }
                    other => panic!("{other}"),
                }
            }
            assert!(!conflating, "room {room}: a full drain ends conflation");
        }
        // Every event came out, was replaced or (volatile) dropped.
        assert_eq!(events + replaced + outbox.dropped() as usize, pushed.len());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        #[test]
        fn any_sequence_keeps_order_accounting_and_one_event_per_key(
            ops in proptest::collection::vec(op(), 0..200)
        ) {
            check_run(&ops);
        }
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
        // A second push to a queue that was not drained wakes nobody.
        outbox.push(Bytes::from_static(b"c")).unwrap();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(outbox.poll_ready(&mut cx), Poll::Pending);
        // The overflow does.
        let _ = outbox.push(Bytes::from_static(b"abc"));
        tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
            .await
            .expect("overflow wakes the session");
        assert!(outbox.is_overflowed());
    }
}
