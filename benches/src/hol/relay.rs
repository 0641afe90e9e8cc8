//! A lossy UDP link in user space (the kernel here has no netem): a relay on 127.0.0.1, port
//! picked by the kernel, that forwards datagrams between one client and a fixed upstream
//! address (the broker's UDP port), dropping each datagram in either direction with
//! probability `loss` and holding the others for a fixed one-way `delay`.
//!
//! Each direction has an OS thread blocked on its socket that drops or holds each datagram,
//! and, with a delay, an OS thread that sends the held datagrams when due, sleeping on a
//! condition variable whose timeout the kernel keeps to tens of µs (tokio's timer has 1 ms,
//! a socket read timeout whole scheduler ticks). Held datagrams wait in a [`DelayQueue`]: with
//! one fixed delay, due times are in arrival order, so a bounded FIFO is the timer queue; a
//! datagram arriving when it is full is dropped and counted apart from the random losses. Drop decisions come from a seeded
//! [`Dropper`], one per direction, so a run can be repeated with the same loss pattern (the
//! same positions in each direction's datagram sequence; the datagrams themselves differ).

use std::{
    collections::VecDeque,
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};

/// Longest a relay thread blocks before looking at its stop flag (also the read timeout of the
/// relay's sockets).
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// Bernoulli drop decisions from a seeded splitmix64 sequence: deterministic per seed.
#[derive(Debug, Clone)]
pub(crate) struct Dropper {
    state: u64,
    /// A draw below this drops (`loss` × 2^64).
    threshold: u64,
    /// Whether every draw drops (`loss` ≥ 1, which the threshold cannot express).
    all: bool,
}

impl Dropper {
    /// Drops with probability `loss` (clamped to 0…1); the sequence is fixed by `seed`.
    pub(crate) fn new(loss: f64, seed: u64) -> Self {
        let loss = if loss.is_nan() {
            0.0
        } else {
            loss.clamp(0.0, 1.0)
        };
        Dropper {
            state: seed,
            // 2^64 as f64; the cast saturates just below 1.0.
            threshold: (loss * 18_446_744_073_709_551_616.0) as u64,
            all: loss >= 1.0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Whether the next datagram is dropped.
    pub(crate) fn drop_next(&mut self) -> bool {
        let draw = self.next_u64();
        self.all || draw < self.threshold
    }
}

/// Datagrams held for a fixed delay, at most `cap` at once: a FIFO, since with one delay the
/// due times follow the arrival order.
#[derive(Debug)]
pub(crate) struct DelayQueue {
    held: VecDeque<(Instant, Vec<u8>)>,
    delay: Duration,
    cap: usize,
}

impl DelayQueue {
    /// An empty queue holding each datagram for `delay`, at most `cap` (at least 1) at once.
    pub(crate) fn new(delay: Duration, cap: usize) -> Self {
        let cap = cap.max(1);
        DelayQueue {
            held: VecDeque::with_capacity(cap.min(4096)),
            delay,
            cap,
        }
    }

    /// Holds `datagram`, received at `now`, until `now + delay`. Returns false (and drops it)
    /// when the queue is full.
    pub(crate) fn push(&mut self, now: Instant, datagram: Vec<u8>) -> bool {
        if self.held.len() >= self.cap {
            return false;
        }
        self.held.push_back((now + self.delay, datagram));
        true
    }

    /// When the oldest held datagram is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|(due, _)| *due)
    }

    /// The oldest held datagram if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_due()? <= now {
            self.held.pop_front().map(|(_, d)| d)
        } else {
            None
        }
    }

    /// Datagrams held now.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub(crate) struct DirectionStats {
    /// Datagrams read from the sending side.
    pub(crate) received: AtomicU64,
    /// Dropped by the random loss.
    pub(crate) lost: AtomicU64,
    /// Dropped because the delay queue was full.
    pub(crate) queue_full: AtomicU64,
    /// Written to the other side.
    pub(crate) forwarded: AtomicU64,
    /// Dropped because the write failed (or, downstream, no client was known yet).
    pub(crate) send_failed: AtomicU64,
    /// Most datagrams held at once.
    pub(crate) held_max: AtomicU64,
}

/// A snapshot of [`DirectionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DirectionCounts {
    /// See [`DirectionStats::received`].
    pub(crate) received: u64,
    /// See [`DirectionStats::lost`].
    pub(crate) lost: u64,
    /// See [`DirectionStats::queue_full`].
    pub(crate) queue_full: u64,
    /// See [`DirectionStats::forwarded`].
    pub(crate) forwarded: u64,
    /// See [`DirectionStats::send_failed`].
    pub(crate) send_failed: u64,
    /// See [`DirectionStats::held_max`].
    pub(crate) held_max: u64,
}

impl DirectionStats {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> DirectionCounts {
        DirectionCounts {
            received: self.received.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            send_failed: self.send_failed.load(Ordering::Relaxed),
            held_max: self.held_max.load(Ordering::Relaxed),
        }
    }
}

impl DirectionCounts {
    /// The counts from `earlier` to `self` (`held_max` is kept: it is not a counter).
    pub(crate) fn since(&self, earlier: &DirectionCounts) -> DirectionCounts {
        DirectionCounts {
            received: self.received - earlier.received,
            lost: self.lost - earlier.lost,
            queue_full: self.queue_full - earlier.queue_full,
            forwarded: self.forwarded - earlier.forwarded,
            send_failed: self.send_failed - earlier.send_failed,
            held_max: self.held_max,
        }
    }

    /// Every datagram that did not get through.
    pub(crate) fn dropped(&self) -> u64 {
        self.lost + self.queue_full + self.send_failed
    }

    /// Share of the received datagrams that were dropped (any cause).
    pub(crate) fn drop_rate(&self) -> f64 {
        if self.received == 0 {
            0.0
        } else {
            self.dropped() as f64 / self.received as f64
        }
    }

    /// The counts as a JSON object.
    pub(crate) fn json(&self) -> Value {
        json!({
            "received": self.received, "lost": self.lost, "queue_full": self.queue_full,
            "send_failed": self.send_failed, "forwarded": self.forwarded,
            "drop_rate": (self.drop_rate() * 1e5).round() / 1e5, "held_max": self.held_max,
        })
    }
}

/// How the link behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkConfig {
    /// Probability that a datagram is dropped, each direction.
    pub(crate) loss: f64,
    /// One-way delay added to every datagram that gets through.
    pub(crate) delay: Duration,
    /// Most datagrams held at once per direction.
    pub(crate) queue_cap: usize,
    /// Seed of the drop decisions (the two directions use different sequences).
    pub(crate) seed: u64,
}

/// A running relay; its threads stop when it is dropped.
pub(crate) struct Relay {
    /// Where the client sends to.
    pub(crate) addr: SocketAddr,
    /// Client → upstream.
    pub(crate) up: Arc<DirectionStats>,
    /// Upstream → client.
    pub(crate) down: Arc<DirectionStats>,
    stop: Arc<AtomicBool>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Relay {
    /// Binds 127.0.0.1:0 and relays to `upstream`, the first peer that writes to it being the
    /// client.
    pub(crate) fn start(upstream: SocketAddr, config: LinkConfig) -> anyhow::Result<Relay> {
        let front = UdpSocket::bind("127.0.0.1:0").context("bind the relay")?;
        let back = UdpSocket::bind(if upstream.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })
        .context("bind the relay's upstream socket")?;
        back.connect(upstream)
            .with_context(|| format!("connect to {upstream}"))?;
        for socket in [&front, &back] {
            socket.set_read_timeout(Some(IDLE_WAIT))?;
        }
        let addr = front.local_addr()?;
        let client: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down) = (
            Arc::new(DirectionStats::default()),
            Arc::new(DirectionStats::default()),
        );
        {
            let (from, to) = (front.try_clone()?, back.try_clone()?);
            let client = client.clone();
            spawn_direction(
                "relay-up",
                move |buf| {
                    let (n, peer) = from.recv_from(buf)?;
                    let first = *client.get_or_init(|| peer);
                    // Datagrams from anyone but the client are ignored.
                    Ok((peer == first).then_some(n))
                },
                move |datagram| to.send(datagram).is_ok(),
                Dropper::new(config.loss, config.seed),
                config,
                up.clone(),
                stop.clone(),
            )?;
        }
        {
            let (from, to) = (back, front);
            spawn_direction(
                "relay-down",
                move |buf| Ok(Some(from.recv(buf)?)),
                move |datagram| match client.get() {
                    Some(peer) => to.send_to(datagram, peer).is_ok(),
                    None => false,
                },
                Dropper::new(config.loss, config.seed ^ 0x5bd1_e995_d00d_f00d),
                config,
                down.clone(),
                stop.clone(),
            )?;
        }
        Ok(Relay {
            addr,
            up,
            down,
            stop,
        })
    }
}

/// Counts a datagram as forwarded or failed.
fn forwarded(stats: &DirectionStats, sent: bool) {
    let counter = if sent {
        &stats.forwarded
    } else {
        &stats.send_failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Starts one direction: a receiving thread that reads datagrams with `recv` (`None` = ignore
/// it; the socket must have a read timeout so the thread sees `stop`), drops or holds them,
/// and, with a delay, a sending thread that writes them with `send` when due. The sending
/// thread sleeps on a condition variable (a futex with a high-resolution timeout), not on a
/// socket read timeout, which the kernel rounds up to whole scheduler ticks (4 ms here).
fn spawn_direction(
    name: &str,
    mut recv: impl FnMut(&mut [u8]) -> std::io::Result<Option<usize>> + Send + 'static,
    mut send: impl FnMut(&[u8]) -> bool + Send + 'static,
    mut dropper: Dropper,
    config: LinkConfig,
    stats: Arc<DirectionStats>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let delayed = !config.delay.is_zero();
    let queue = Arc::new((
        Mutex::new(DelayQueue::new(config.delay, config.queue_cap)),
        Condvar::new(),
    ));
    let (recv_stats, recv_stop, recv_queue) = (stats.clone(), stop.clone(), queue.clone());
    let mut direct = None;
    if !delayed {
        direct = Some(send);
    } else {
        std::thread::Builder::new()
            .name(format!("{name}-send"))
            .spawn(move || {
                let (queue, wake) = &*queue;
                let mut due_now = Vec::new();
                let mut held = queue.lock().unwrap_or_else(|e| e.into_inner());
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    while let Some(datagram) = held.pop_due(now) {
                        due_now.push(datagram);
                    }
                    if !due_now.is_empty() {
                        drop(held);
                        for datagram in due_now.drain(..) {
                            forwarded(&stats, send(&datagram));
                        }
                        held = queue.lock().unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    let wait = held
                        .next_due()
                        .map_or(IDLE_WAIT, |due| due.saturating_duration_since(now))
                        .min(IDLE_WAIT);
                    held = wake
                        .wait_timeout(held, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })?;
    }
    std::thread::Builder::new()
        .name(format!("{name}-recv"))
        .spawn(move || {
            let (queue, wake) = &*recv_queue;
            let mut buf = vec![0u8; 65_536];
            while !recv_stop.load(Ordering::Relaxed) {
                let n = match recv(&mut buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        continue;
                    }
                    // ICMP errors (the peer is gone for a moment) surface here: keep going.
                    Err(_) => continue,
                };
                recv_stats.received.fetch_add(1, Ordering::Relaxed);
                if dropper.drop_next() {
                    recv_stats.lost.fetch_add(1, Ordering::Relaxed);
                } else if let Some(send) = direct.as_mut() {
                    forwarded(&recv_stats, send(&buf[..n]));
                } else {
                    let mut held = queue.lock().unwrap_or_else(|e| e.into_inner());
                    if held.push(Instant::now(), buf[..n].to_vec()) {
                        let len = held.len() as u64;
                        drop(held);
                        recv_stats.held_max.fetch_max(len, Ordering::Relaxed);
                        wake.notify_one();
                    } else {
                        recv_stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_fixed_by_the_seed() {
        let pattern = |loss, seed| {
            let mut d = Dropper::new(loss, seed);
            (0..1000).map(|_| d.drop_next()).collect::<Vec<_>>()
        };
        assert_eq!(pattern(0.03, 7), pattern(0.03, 7));
        assert_ne!(pattern(0.03, 7), pattern(0.03, 8));
        assert!(pattern(0.0, 7).iter().all(|d| !d));
        assert!(pattern(1.0, 7).iter().all(|d| *d));
        assert!(pattern(-1.0, 7).iter().all(|d| !d));
        assert!(pattern(f64::NAN, 7).iter().all(|d| !d));
        // A higher loss with the same seed drops a superset of the datagrams.
        let (low, high) = (pattern(0.01, 3), pattern(0.05, 3));
        assert!(low.iter().zip(&high).all(|(l, h)| !l || *h));
    }

    #[test]
    fn drop_rate_matches_the_loss() {
        for loss in [0.01, 0.03, 0.5] {
            let mut d = Dropper::new(loss, 42);
            let n = 200_000;
            let dropped = (0..n).filter(|_| d.drop_next()).count();
            let rate = dropped as f64 / n as f64;
            // Binomial: 5 standard deviations.
            let sd = (loss * (1.0 - loss) / n as f64).sqrt();
            assert!((rate - loss).abs() < 5.0 * sd, "loss {loss}: got {rate}");
        }
    }

    #[test]
    fn delay_queue_holds_for_the_delay_in_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = DelayQueue::new(ms(10), 8);
        assert_eq!(q.next_due(), None);
        assert!(q.push(t0, vec![1]));
        assert!(q.push(t0 + ms(3), vec![2]));
        assert_eq!(q.next_due(), Some(t0 + ms(10)));
        assert_eq!(q.pop_due(t0 + ms(9)), None);
        assert_eq!(q.pop_due(t0 + ms(10)), Some(vec![1]));
        assert_eq!(q.pop_due(t0 + ms(12)), None);
        assert_eq!(q.pop_due(t0 + ms(20)), Some(vec![2]));
        assert_eq!(q.pop_due(t0 + ms(20)), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn delay_queue_is_bounded() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new(Duration::from_millis(10), 3);
        for i in 0..3 {
            assert!(q.push(t0, vec![i]));
        }
        assert!(!q.push(t0, vec![3]), "a full queue refuses");
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(10)), Some(vec![0]));
        assert!(q.push(t0, vec![4]), "room again after a pop");
        assert!(!q.push(t0, vec![5]));
        // A cap of 0 still holds one.
        let mut q = DelayQueue::new(Duration::ZERO, 0);
        assert!(q.push(t0, vec![9]));
        assert!(!q.push(t0, vec![10]));
        assert_eq!(q.pop_due(t0), Some(vec![9]));
    }

    #[test]
    fn counts_since_and_rates() {
        let a = DirectionCounts {
            received: 100,
            lost: 2,
            queue_full: 1,
            forwarded: 97,
            send_failed: 0,
            held_max: 5,
        };
        let b = DirectionCounts {
            received: 1100,
            lost: 32,
            queue_full: 1,
            forwarded: 1066,
            send_failed: 1,
            held_max: 9,
        };
        let d = b.since(&a);
        assert_eq!(d.received, 1000);
        assert_eq!(d.dropped(), 31);
        assert!((d.drop_rate() - 0.031).abs() < 1e-12);
        assert_eq!(d.held_max, 9);
        assert_eq!(DirectionCounts::default().drop_rate(), 0.0);
    }

    #[test]
    fn delay_is_kept_between_sparse_datagrams() {
        // Datagrams 15 ms apart: nothing but the timer wakes the sending thread.
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let delay = Duration::from_millis(5);
        let config = LinkConfig {
            loss: 0.0,
            delay,
            queue_cap: 16,
            seed: 1,
        };
        let relay = Relay::start(server.local_addr().unwrap(), config).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut extra = Duration::ZERO;
        let mut buf = [0u8; 16];
        for _ in 0..10 {
            let sent = Instant::now();
            client.send_to(b"x", relay.addr).unwrap();
            server.recv_from(&mut buf).unwrap();
            let took = sent.elapsed();
            assert!(took >= delay, "{took:?}");
            extra += took - delay;
            std::thread::sleep(Duration::from_millis(10));
        }
        // A socket read timeout (rounded to scheduler ticks) would add about 2 ms on average.
        assert!(extra / 10 < Duration::from_micros(1500), "{:?}", extra / 10);
    }

    #[test]
    fn relays_both_ways_and_drops_everything_at_loss_one() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let config = LinkConfig {
            loss: 0.0,
            delay: Duration::from_millis(5),
            queue_cap: 16,
            seed: 1,
        };
        let relay = Relay::start(server.local_addr().unwrap(), config).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let sent = Instant::now();
        client.send_to(b"ping", relay.addr).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert!(sent.elapsed() >= Duration::from_millis(5));
        server.send_to(b"pong", from).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"pong"[..], relay.addr));
        // The relay counts a datagram after sending it: the receiver may see it first.
        let counted = |stats: &DirectionStats| {
            let deadline = Instant::now() + Duration::from_secs(2);
            while stats.snapshot().forwarded == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            stats.snapshot().forwarded
        };
        assert_eq!(counted(&relay.up), 1);
        assert_eq!(counted(&relay.down), 1);

        let config = LinkConfig {
            loss: 1.0,
            delay: Duration::ZERO,
            ..config
        };
        let relay = Relay::start(server.local_addr().unwrap(), config).unwrap();
        client.send_to(b"lost", relay.addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(server.recv_from(&mut buf).is_err());
        let up = relay.up.snapshot();
        assert_eq!((up.received, up.lost, up.forwarded), (1, 1, 0));
    }
}
