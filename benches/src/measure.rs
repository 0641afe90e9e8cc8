//! Measuring tools the scenarios share: one clock for publishers and subscribers (they live
//! in this one process), the warm-up/measure phase flag, HDR latency histograms sharded so
//! that thousands of subscriber tasks can record without contending, percentile summaries,
//! open-loop publish schedules, the once-per-second progress ticker, CPU marks and the
//! open-file limit.

use std::{
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::common::cpu_seconds;

static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the process's clock base (the first call). Publishers write it into
/// payloads and subscribers subtract it from their own reading: same process, same clock.
pub(crate) fn now_ns() -> u64 {
    BASE.elapsed().as_nanos() as u64
}

/// The instant `ns` nanoseconds after the clock base.
pub(crate) fn instant_at(ns: u64) -> Instant {
    *BASE + Duration::from_nanos(ns)
}

/// Where a run is: recording starts when the warm-up ends and stops when the run is done.
#[derive(Debug)]
pub(crate) struct Phase(AtomicU8);

impl Default for Phase {
    fn default() -> Self {
        Phase(AtomicU8::new(Self::WARMUP))
    }
}

impl Phase {
    const WARMUP: u8 = 0;
    const MEASURE: u8 = 1;
    const DONE: u8 = 2;

    /// Marks the end of the warm-up.
    pub(crate) fn start_measuring(&self) {
        self.0.store(Self::MEASURE, Ordering::Relaxed);
    }

    /// Marks the end of the measurement.
    pub(crate) fn finish(&self) {
        self.0.store(Self::DONE, Ordering::Relaxed);
    }

    /// Whether samples should be recorded now.
    pub(crate) fn measuring(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::MEASURE
    }

    /// Whether the measurement is over (sessions closing now are not failures).
    pub(crate) fn done(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::DONE
    }
}

/// A latency histogram in nanoseconds: 1 ns to 60 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Shard count of [`Shards`]: enough that two runtime threads rarely meet on one lock.
const SHARDS: usize = 32;

/// `K` histograms per shard, each shard behind its own lock. Recorders pick a shard by their
/// index and lock it once per batch of samples (one socket read), never per sample.
pub(crate) struct Shards<const K: usize> {
    shards: Vec<Mutex<[Histogram<u64>; K]>>,
}

impl<const K: usize> Shards<K> {
    /// Empty histograms (about 220 KiB each).
    pub(crate) fn new() -> Self {
        Shards {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(std::array::from_fn(|_| histogram())))
                .collect(),
        }
    }

    /// Records a batch: sample `s[k]` goes into histogram `k` (values of 0 count as 1 ns).
    pub(crate) fn record(&self, idx: usize, samples: &[[u64; K]]) {
        if samples.is_empty() {
            return;
        }
        let mut shard = self.shards[idx % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for sample in samples {
            for (h, &v) in shard.iter_mut().zip(sample) {
                h.saturating_record(v.max(1));
            }
        }
    }

    /// Samples recorded so far (of kind 0).
    pub(crate) fn count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner())[0].len())
            .sum()
    }

    /// All shards added up, one histogram per kind.
    pub(crate) fn merged(&self) -> [Histogram<u64>; K] {
        let mut out: [Histogram<u64>; K] = std::array::from_fn(|_| histogram());
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (o, h) in out.iter_mut().zip(shard.iter()) {
                o.add(h).expect("same bounds");
            }
        }
        out
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    /// Samples.
    pub(crate) n: u64,
    /// Median.
    pub(crate) p50: f64,
    /// 90th percentile.
    pub(crate) p90: f64,
    /// 99th percentile.
    pub(crate) p99: f64,
    /// 99.9th percentile.
    pub(crate) p999: f64,
    /// Largest sample.
    pub(crate) max: f64,
    /// Mean.
    pub(crate) mean: f64,
}

impl Summary {
    /// The summary of a histogram of nanoseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Summary {
        let ms = |ns: u64| ns as f64 / 1e6;
        if h.is_empty() {
            return Summary {
                n: 0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        Summary {
            n: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1e6,
        }
    }

    /// `{"n", "p50", "p90", "p99", "p999", "max", "mean"}` in ms (limit-ref's `lat_ms`
    /// shape); percentiles are null without samples.
    pub(crate) fn json(&self) -> Value {
        let r = |v: f64| {
            if self.n == 0 {
                Value::Null
            } else {
                json!((v * 1e4).round() / 1e4)
            }
        };
        json!({
            "n": self.n, "p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99),
            "p999": r(self.p999), "max": r(self.max), "mean": r(self.mean),
        })
    }

    /// One line for the table.
    pub(crate) fn line(&self) -> String {
        if self.n == 0 {
            return "no samples".to_owned();
        }
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.n
        )
    }
}

/// When publish `k` of an open-loop schedule at `rate` per second is due, in ns after the
/// schedule's start. Computed from `k`, never accumulated, so lateness never shifts it.
pub(crate) fn due_ns(k: u64, rate: f64) -> u64 {
    (k as f64 * 1e9 / rate).round() as u64
}

/// A start offset in `0..period_ns` for schedule `i`, spread evenly but not in index order
/// (splitmix64 of `i`), so that many publishers at the same rate do not fire together.
pub(crate) fn jitter_ns(i: u64, period_ns: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if period_ns == 0 { 0 } else { z % period_ns }
}

/// A stagger in `0..period` for session `i` of `n`, so that keepalive pings spread evenly.
pub(crate) fn stagger(i: usize, n: usize, period: Duration) -> Duration {
    let n = n.max(1);
    period.mul_f64((i % n) as f64 / n as f64)
}

/// Wakes once per second for the progress line and the per-second series.
pub(crate) struct Ticker {
    next: tokio::time::Instant,
    last_at: Instant,
    last: u64,
}

impl Ticker {
    /// A ticker whose first rate is measured from `value` now.
    pub(crate) fn new(value: u64) -> Self {
        Ticker {
            next: tokio::time::Instant::now(),
            last_at: Instant::now(),
            last: value,
        }
    }

    /// Sleeps one second after the previous tick, or until `limit` if that comes first.
    pub(crate) async fn tick(&mut self, limit: Instant) {
        self.next += Duration::from_secs(1);
        let limit = tokio::time::Instant::from_std(limit);
        if limit < self.next {
            self.next = limit;
        }
        tokio::time::sleep_until(self.next).await;
    }

    /// The rate per second of the counter `value` since the previous call.
    pub(crate) fn rate(&mut self, value: u64) -> f64 {
        let now = Instant::now();
        let secs = now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        let rate = value.saturating_sub(self.last) as f64 / secs;
        (self.last_at, self.last) = (now, value);
        rate
    }
}

/// CPU time of the broker and of this process at one instant.
pub(crate) struct CpuMark {
    at: Instant,
    broker: Option<f64>,
    own: Option<f64>,
}

impl CpuMark {
    /// Reads both now.
    pub(crate) fn take(broker_pid: Option<u32>) -> Self {
        CpuMark {
            at: Instant::now(),
            broker: broker_pid.and_then(cpu_seconds),
            own: cpu_seconds(std::process::id()),
        }
    }

    /// Seconds from `earlier` to this mark.
    pub(crate) fn secs_since(&self, earlier: &CpuMark) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64()
    }

    /// Broker and generator CPU from `earlier` to this mark, in percent of one core.
    pub(crate) fn percent_since(&self, earlier: &CpuMark) -> (Option<f64>, Option<f64>) {
        let secs = self.secs_since(earlier).max(1e-9);
        let pct = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs * 100.0);
        (pct(earlier.broker, self.broker), pct(earlier.own, self.own))
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit in force.
pub(crate) fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
    }
}

/// Rounds to one decimal for the JSON line.
pub(crate) fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Appends the broker CPU, generator CPU and broker RSS lines of a final table (each only when
/// known), labels padded to `width` columns.
pub(crate) fn push_resource_lines(
    table: &mut String,
    width: usize,
    broker_cpu: Option<f64>,
    own_cpu: Option<f64>,
    rss: Option<u64>,
) {
    if let Some(cpu) = broker_cpu {
        table.push_str(&format!("  {:<width$}{cpu:.0} %\n", "broker CPU"));
    }
    if let Some(cpu) = own_cpu {
        table.push_str(&format!("  {:<width$}{cpu:.0} %\n", "loadgen CPU"));
    }
    if let Some(rss) = rss {
        let mib = rss as f64 / (1 << 20) as f64;
        table.push_str(&format!("  {:<width$}{mib:.1} MiB\n", "broker RSS"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_samples() {
        let mut h = histogram();
        for ms in 1..=1000u64 {
            h.record(ms * 1_000_000).unwrap();
        }
        let s = Summary::of(&h);
        assert_eq!(s.n, 1000);
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 1e-9;
        assert!(close(s.p50, 500.0), "{s:?}");
        assert!(close(s.p90, 900.0), "{s:?}");
        assert!(close(s.p99, 990.0), "{s:?}");
        assert!(close(s.p999, 999.0), "{s:?}");
        assert!(close(s.max, 1000.0), "{s:?}");
        assert!(close(s.mean, 500.5), "{s:?}");
        let j = s.json();
        assert_eq!(j["n"], 1000);
        assert!(j["p99"].as_f64().is_some());
    }

    #[test]
    fn empty_summary_has_null_percentiles() {
        let s = Summary::of(&histogram());
        assert_eq!(s.n, 0);
        assert!(s.json()["p50"].is_null());
        assert_eq!(s.line(), "no samples");
    }

    #[test]
    fn shards_merge_every_sample() {
        let shards = Shards::<2>::new();
        for idx in 0..100 {
            shards.record(idx, &[[1_000, 2_000], [0, 3_000]]);
        }
        let [a, b] = shards.merged();
        assert_eq!(a.len(), 200);
        assert_eq!(shards.count(), 200);
        assert_eq!(b.len(), 200);
        assert_eq!(a.min(), 1, "a zero sample counts as 1 ns");
        assert_eq!(b.value_at_quantile(1.0), b.highest_equivalent(3_000));
    }

    #[test]
    fn schedule_is_fixed_by_index() {
        assert_eq!(due_ns(0, 100.0), 0);
        assert_eq!(due_ns(1, 100.0), 10_000_000);
        assert_eq!(due_ns(250, 1000.0), 250_000_000);
        // No drift: one hour at 3 per second lands exactly on the hour.
        assert_eq!(due_ns(3 * 3600, 3.0), 3_600_000_000_000);
        // Periods that are not whole nanoseconds round, without accumulating.
        assert_eq!(due_ns(1, 3.0), 333_333_333);
        assert_eq!(due_ns(2, 3.0), 666_666_667);
    }

    #[test]
    fn jitter_spreads_over_the_period() {
        let period = 1_000_000_000;
        let mut tenths = [0u32; 10];
        for i in 0..2000 {
            let j = jitter_ns(i, period);
            assert!(j < period);
            tenths[(j / (period / 10)) as usize] += 1;
        }
        for n in tenths {
            assert!((140..=260).contains(&n), "{tenths:?}");
        }
        assert_eq!(jitter_ns(5, 0), 0);
        assert_eq!(jitter_ns(5, period), jitter_ns(5, period));
    }

    #[test]
    fn stagger_stays_inside_the_period() {
        let p = Duration::from_secs(25);
        assert_eq!(stagger(0, 10, p), Duration::ZERO);
        assert!(stagger(9, 10, p) < p);
        assert!(stagger(12, 10, p) < p);
        assert_eq!(stagger(3, 0, p), Duration::ZERO);
    }
}
