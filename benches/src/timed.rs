//! Subscribers that time every delivery, shared by `latency` and `publishers`.
//!
//! Publishers write two time stamps (ns on this process's clock, see
//! [`measure::now_ns`](crate::measure::now_ns)) into the first 16 content bytes of each payload:
//! stamp 0 is when the publish was written to the socket, stamp 1 when the open-loop schedule
//! wanted it written. A subscriber reads the clock once per socket read and records, for every
//! event in that read, `now - sent` (the latency, as limit-ref measures it) and `now - due`
//! (the latency counted from the schedule, which keeps a publisher that fell behind from
//! hiding the delay: coordinated omission). Per event it touches only seq and the two stamps;
//! samples are batched per read into one lock of a histogram shard.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    common::{EventLayout, PING, RawFrames},
    measure::{Phase, Shards, now_ns, stagger},
};
use roomcast_protocol::frame::Welcome;

/// Index of the latency measured from the moment the publish was written.
pub(crate) const FROM_SEND: usize = 0;
/// Index of the latency measured from the moment the schedule wanted the publish written.
pub(crate) const FROM_SCHEDULE: usize = 1;

/// What all timed subscribers of a run report into.
pub(crate) struct Deliveries {
    /// Warm-up, measuring or done; set by the scenario.
    pub(crate) phase: Phase,
    /// Events received, flushed here every 64 per subscriber (or 250 ms when quiet): for
    /// progress lines only (the histograms count the measured deliveries exactly).
    pub(crate) delivered: AtomicU64,
    /// Events missed: jumps in a subscriber's seq not explained by other events of the room.
    pub(crate) gaps: AtomicU64,
    /// Events of the room with another event name or size (a flooding neighbour's), received
    /// by all subscribers together; they do not count as deliveries.
    pub(crate) foreign: AtomicU64,
    /// Subscriber sessions that ended before the run was done.
    pub(crate) closed: AtomicU64,
    /// Latencies in ns, [`FROM_SEND`] and [`FROM_SCHEDULE`], of deliveries received while
    /// measuring.
    pub(crate) latency: Shards<2>,
}

impl Deliveries {
    /// Nothing received yet, warming up.
    pub(crate) fn new() -> Self {
        Deliveries {
            phase: Phase::default(),
            delivered: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            latency: Shards::new(),
        }
    }
}

/// Keepalive of a quiet session: a `Ping` every `every`, the first after `first`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keepalive {
    /// Interval between pings (the broker's `ping_interval`).
    pub(crate) every: Duration,
    /// Delay of the first ping (staggered over the sessions).
    pub(crate) first: Duration,
}

impl Keepalive {
    /// The keepalive of session `i` of `n`: every `ping_interval` the broker asked for (at
    /// most half its idle timeout), the first ping staggered over the second half of that
    /// interval so that sessions opened together do not ping together.
    pub(crate) fn for_session(i: usize, n: usize, welcome: &Welcome) -> Self {
        let mut every = Duration::from_millis(welcome.ping_interval_ms);
        if welcome.idle_timeout_ms > 0 {
            let half_idle = Duration::from_millis(welcome.idle_timeout_ms / 2);
            if every.is_zero() || every > half_idle {
                every = half_idle;
            }
        }
        if every.is_zero() {
            every = Duration::from_secs(25);
        }
        Keepalive {
            every,
            first: every / 2 + stagger(i, n, every / 2),
        }
    }

    /// The ping timer: first tick after `first`, then every `every`; late ticks are delayed,
    /// not bunched.
    pub(crate) fn interval(&self) -> tokio::time::Interval {
        let mut pings =
            tokio::time::interval_at(tokio::time::Instant::now() + self.first, self.every);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pings
    }
}

/// Reads events of `layout` until the session ends, recording every delivery's latency into
/// `shared`. `idx` picks the histogram shard.
pub(crate) async fn timed_reader(
    idx: usize,
    mut frames: RawFrames,
    layout: EventLayout,
    keepalive: Keepalive,
    shared: Arc<Deliveries>,
) {
    let mut pings = keepalive.interval();
    let mut pending: Vec<[u64; 2]> = Vec::with_capacity(64);
    let mut unflushed = 0u64;
    let mut last_flush = 0u64;
    let mut next_seq: Option<u64> = None;
    // Other events of the room since our last one: they hold the seqs in between.
    let mut foreign_since = 0u64;
    let mut foreign_total = 0u64;
    loop {
        let mut now = 0u64;
        let mut measuring = false;
        let mut gaps = 0u64;
        tokio::select! {
            open = frames.read(|frame| {
                let Some(seq) = layout.seq(frame) else {
                    if layout.is_event(frame) {
                        foreign_since += 1;
                        foreign_total += 1;
                    }
                    return;
                };
                if let Some(expected) = next_seq {
                    gaps += seq.saturating_sub(expected).saturating_sub(foreign_since);
                }
                foreign_since = 0;
                next_seq = Some(seq + 1);
                unflushed += 1;
                if now == 0 {
                    // One clock reading per socket read: every event in it arrived together.
                    now = now_ns();
                    measuring = shared.phase.measuring();
                }
                if measuring {
                    let sent = layout.stamp(frame, 0).unwrap_or(now);
                    let due = layout.stamp(frame, 1).unwrap_or(sent);
                    pending.push([now.saturating_sub(sent), now.saturating_sub(due)]);
                }
            }) => {
                if !open {
                    if !shared.phase.done() {
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
            _ = pings.tick() => {
                if frames.send(&PING).await.is_err() {
                    if !shared.phase.done() {
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
        if !pending.is_empty() {
            shared.latency.record(idx, &pending);
            pending.clear();
        }
        if gaps > 0 {
            shared.gaps.fetch_add(gaps, Ordering::Relaxed);
        }
        if foreign_total > 0 {
            shared.foreign.fetch_add(foreign_total, Ordering::Relaxed);
            foreign_total = 0;
        }
        // Every 64 events, or every 250 ms for quiet subscribers (now is 0 without events).
        if unflushed >= 64 || (unflushed > 0 && now > last_flush + 250_000_000) {
            shared.delivered.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
            last_flush = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn welcome(ping_ms: u64, idle_ms: u64) -> Welcome {
        Welcome {
            version: 1,
            session_id: "s".into(),
            server_time_ms: 0,
            max_frame_size: 65536,
            ping_interval_ms: ping_ms,
            idle_timeout_ms: idle_ms,
        }
    }

    #[test]
    fn keepalive_pings_before_the_idle_timeout() {
        let k = Keepalive::for_session(0, 10, &welcome(25_000, 60_000));
        assert_eq!(k.every, Duration::from_secs(25));
        assert_eq!(k.first, Duration::from_millis(12_500));
        let k = Keepalive::for_session(9, 10, &welcome(25_000, 60_000));
        assert!(k.first < k.every);
        // A ping interval longer than half the idle timeout is shortened.
        let k = Keepalive::for_session(0, 1, &welcome(50_000, 20_000));
        assert_eq!(k.every, Duration::from_secs(10));
        let k = Keepalive::for_session(0, 1, &welcome(0, 0));
        assert_eq!(k.every, Duration::from_secs(25));
    }
}
