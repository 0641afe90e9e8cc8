//! A room's recent past: the ring of encoded `Event` frames that recovery replays, and the
//! idempotency keys that stop a retried publish from being delivered twice.
//!
//! Owns only memory accounting and expiry by count, bytes and age. It does not lock, encode or
//! deliver: the hub calls it under the room's lock, with the frames it already encoded for the
//! fan-out (history costs a reference count per event, not a copy).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::wire::Wire;

/// How much of a room's past is kept for recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Events kept at most (0: no history, the room's epoch is 0).
    pub events: usize,
    /// Bytes of encoded frames kept at most (the newest event is always kept).
    pub bytes: usize,
    /// Events older than this are dropped; a room with no subscriber lives this long after its
    /// newest event.
    pub ttl: Duration,
}

impl HistoryLimits {
    /// No history: volatile rooms, and rooms whose namespace turns it off.
    pub const OFF: HistoryLimits = HistoryLimits {
        events: 0,
        bytes: 0,
        ttl: Duration::ZERO,
    };

    /// Whether the room keeps any history.
    pub fn is_on(&self) -> bool {
        self.events > 0 && self.bytes > 0 && !self.ttl.is_zero()
    }
}

/// One recorded event.
struct Entry {
    seq: u64,
    at: Instant,
    frame: Wire,
}

/// The ring of a room's recent events, in seq order, with no gap.
pub(crate) struct History {
    limits: HistoryLimits,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Bytes held by every history of the hub, to enforce the global budget.
    total: Arc<AtomicUsize>,
    budget: usize,
}

/// What a recovery from a position finds.
pub(crate) enum Replay<'a> {
    /// Every event after the position is held: these frames, in order (maybe none).
    Complete(Vec<&'a Wire>),
    /// Some event after the position is gone.
    Gap,
}

impl History {
    pub(crate) fn new(limits: HistoryLimits, total: Arc<AtomicUsize>, budget: usize) -> Self {
        History {
            limits,
            entries: VecDeque::new(),
            bytes: 0,
            total,
            budget,
        }
    }

    /// Records the event `seq` (the room's newest). Oldest events go first when a limit (count,
    /// bytes, the hub-wide budget) would be exceeded; the newest event itself is always kept.
    pub(crate) fn record(&mut self, seq: u64, frame: Wire, now: Instant) {
        let len = frame.len();
        while let Some(oldest) = self.entries.front() {
            let over_count = self.entries.len() + 1 > self.limits.events;
            let over_bytes = self.bytes + len > self.limits.bytes;
            let over_budget = self.total.load(Ordering::Relaxed) + len > self.budget;
            let expired = now.duration_since(oldest.at) > self.limits.ttl;
            if !(over_count || over_bytes || over_budget || expired) {
                break;
            }
            self.pop_oldest();
        }
        self.bytes += len;
        self.total.fetch_add(len, Ordering::Relaxed);
        self.entries.push_back(Entry {
            seq,
            at: now,
            frame,
        });
    }

    fn pop_oldest(&mut self) {
        if let Some(old) = self.entries.pop_front() {
            self.bytes -= old.frame.len();
            self.total.fetch_sub(old.frame.len(), Ordering::Relaxed);
        }
    }

    /// Drops events older than the age limit. Returns whether the history is now empty.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        while self
            .entries
            .front()
            .is_some_and(|e| now.duration_since(e.at) > self.limits.ttl)
        {
            self.pop_oldest();
        }
        self.entries.is_empty()
    }

    /// The frames after `since` up to `last` (the room's newest seq), if none is missing.
    pub(crate) fn after(&self, since: u64, last: u64) -> Replay<'_> {
        if since > last {
            return Replay::Gap;
        }
        if since == last {
            return Replay::Complete(Vec::new());
        }
        match self.entries.front() {
            Some(oldest) if oldest.seq <= since + 1 => {}
            _ => return Replay::Gap,
        }
        let skip = (since + 1 - self.entries[0].seq) as usize;
        Replay::Complete(self.entries.iter().skip(skip).map(|e| &e.frame).collect())
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Idempotency keys seen in a room within the dedup window, with the seq their event got.
pub(crate) struct Dedup {
    window: Duration,
    cap: usize,
    seen: HashMap<Box<str>, u64>,
    order: VecDeque<(Instant, Box<str>)>,
}

/// Most keys one room remembers; beyond it the oldest are forgotten early.
pub(crate) const DEDUP_KEYS_PER_ROOM: usize = 4096;

impl Dedup {
    pub(crate) fn new(window: Duration, cap: usize) -> Self {
        Dedup {
            window,
            cap,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The seq of an earlier publish with `key` still inside the window.
    pub(crate) fn get(&mut self, key: &str, now: Instant) -> Option<u64> {
        self.expire(now);
        self.seen.get(key).copied()
    }

    /// Remembers that `key` was delivered as `seq`.
    pub(crate) fn insert(&mut self, key: &str, seq: u64, now: Instant) {
        if self.window.is_zero() || self.cap == 0 {
            return;
        }
        while self.order.len() >= self.cap {
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        let key: Box<str> = key.into();
        self.seen.insert(key.clone(), seq);
        self.order.push_back((now, key));
    }

    /// Forgets keys older than the window. Returns whether none is left.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) <= self.window {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if self.order.is_empty() && self.seen.capacity() > 16 {
            self.seen = HashMap::new();
        }
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn limits(events: usize, bytes: usize) -> HistoryLimits {
        HistoryLimits {
            events,
            bytes,
            ttl: Duration::from_secs(60),
        }
    }

    fn frames(r: &Replay<'_>) -> Option<Vec<u8>> {
        match r {
            Replay::Complete(f) => Some(f.iter().map(|b| b[0]).collect()),
            Replay::Gap => None,
        }
    }

    #[test]
    fn replays_only_without_a_gap_and_respects_count_bytes_and_budget() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut h = History::new(limits(3, 1000), total.clone(), 1 << 20);
        let now = Instant::now();
        for seq in 1..=5u8 {
            h.record(u64::from(seq), Bytes::from(vec![seq; 10]).into(), now);
        }
        // Holds 3, 4, 5.
        assert_eq!(frames(&h.after(5, 5)), Some(vec![]));
        assert_eq!(frames(&h.after(2, 5)), Some(vec![3, 4, 5]));
        assert_eq!(frames(&h.after(4, 5)), Some(vec![5]));
        assert_eq!(frames(&h.after(1, 5)), None, "event 2 is gone");
        assert_eq!(
            frames(&h.after(6, 5)),
            None,
            "a position beyond the room's last"
        );
        assert_eq!(total.load(Ordering::Relaxed), 30);

        // Bytes: 25 bytes hold two 10-byte events.
        let mut h = History::new(limits(100, 25), total.clone(), 1 << 20);
        for seq in 1..=4u8 {
            h.record(u64::from(seq), Bytes::from(vec![seq; 10]).into(), now);
        }
        assert_eq!(h.bytes(), 20);
        assert_eq!(frames(&h.after(2, 4)), Some(vec![3, 4]));

        // The hub-wide budget: the newest is kept even when alone over it.
        let tight = Arc::new(AtomicUsize::new(0));
        let mut h = History::new(limits(100, 1000), tight.clone(), 15);
        h.record(1, Bytes::from(vec![1; 10]).into(), now);
        h.record(2, Bytes::from(vec![2; 10]).into(), now);
        assert_eq!(frames(&h.after(1, 2)), Some(vec![2]));
        assert_eq!(tight.load(Ordering::Relaxed), 10);
        drop(h);
        assert_eq!(
            tight.load(Ordering::Relaxed),
            0,
            "dropping gives the budget back"
        );
    }

    #[test]
    fn expiry_by_age() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut h = History::new(limits(10, 1000), total, 1 << 20);
        let t0 = Instant::now();
        h.record(1, Bytes::from_static(b"a").into(), t0);
        h.record(
            2,
            Bytes::from_static(b"b").into(),
            t0 + Duration::from_secs(30),
        );
        assert!(!h.expire(t0 + Duration::from_secs(61)));
        assert_eq!(frames(&h.after(1, 2)), Some(vec![b'b']));
        assert_eq!(frames(&h.after(0, 2)), None);
        assert!(h.expire(t0 + Duration::from_secs(91)));
    }

    #[test]
    fn dedup_remembers_within_the_window_and_caps_its_keys() {
        let t0 = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10), 2);
        d.insert("a", 1, t0);
        assert_eq!(d.get("a", t0 + Duration::from_secs(10)), Some(1));
        assert_eq!(d.get("a", t0 + Duration::from_secs(11)), None);
        d.insert("b", 2, t0);
        d.insert("c", 3, t0);
        d.insert("d", 4, t0);
        assert_eq!(
            d.get("b", t0),
            None,
            "beyond the cap the oldest key is forgotten"
        );
        assert_eq!(d.get("d", t0), Some(4));
    }
}
