//! `publishers`: IoT-style load. `--devices` publisher sessions each publish
//! `--rate-per-device` messages per second into a room of their own (`dev:<i>`), watched by
//! `--watchers` subscribers each. Reports delivered/s and publish→deliver latency. limit-ref
//! has no twin of this scenario (its server has a single room).
//!
//! Each device follows its own open-loop schedule: publish `k` is due at
//! `start + jitter(i) + k / rate`, the jitter spreading the devices over one period so they do
//! not fire together. Devices are tokio tasks whose timer has 1 ms resolution, so they write up
//! to ~1 ms after the due time: `lat_ms` counts from the write (what the broker is
//! responsible for), `lat_sched_ms` from the due time (coordinated omission included),
//! `send_lag_ms` is the difference on the publisher's side. See `timed` for how deliveries
//! are timed.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::{
    common::{
        CommonArgs, EventLayout, MaskKeys, PING, PublishTemplate, RawFrames, Transport,
        min_payload, open_many, payload, rss_bytes,
    },
    measure::{
        CpuMark, Summary, Ticker, due_ns, histogram, instant_at, jitter_ns, now_ns,
        push_resource_lines, round1,
    },
    timed::{Deliveries, FROM_SCHEDULE, FROM_SEND, Keepalive, timed_reader},
};

/// Arguments of `roomcast-bench publishers`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Latency figures (ms): lat_ms counts from the moment each publish was \
written; lat_sched_ms from the moment its device's schedule wanted it written (devices are \
tokio tasks with a 1 ms timer, so this adds up to ~1-2 ms of generator-side lateness, shown \
as send_lag_ms). limit-ref has no twin of this scenario."
)]
pub(crate) struct PublishersArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Publisher sessions ("devices"), each publishing into its own room `dev:<i>`.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Publishes per second of each device (open loop, start jittered over one period).
    #[arg(long, default_value_t = 1.0)]
    rate_per_device: f64,
    /// Subscriber sessions per device room.
    #[arg(long, default_value_t = 2)]
    watchers: usize,
    /// Payload size in bytes (the CBOR item inside `data`); at least 17 (two time stamps).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of traffic before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
}

const EVENT: &str = "reading";

fn room(device: usize) -> String {
    format!("dev:{device}")
}

/// What the device tasks share.
struct Devices {
    /// Publishes written so far.
    published: AtomicU64,
    /// Devices whose session failed.
    failed: AtomicU64,
    /// Set when the run is over.
    stop: AtomicBool,
    /// Write time − due time of the publishes written while measuring, ns.
    lag: Mutex<Histogram<u64>>,
}

/// One device's schedule.
struct Schedule {
    /// When publish 0 is due, ns on the process clock (jittered per device).
    start: u64,
    /// Publishes per second.
    rate: f64,
    /// Longest silence before a keepalive ping.
    ping_every: Duration,
    /// Seed of the mask keys.
    seed: u64,
}

/// One device: publishes on its schedule (see the module docs) until told to stop, pinging
/// when its period is longer than the keepalive interval.
async fn device(
    mut tcp: TcpStream,
    template: PublishTemplate,
    schedule: Schedule,
    deliveries: Arc<Deliveries>,
    devices: Arc<Devices>,
) {
    let Schedule {
        start,
        rate,
        ping_every,
        seed,
    } = schedule;
    let ping_ns = ping_every.as_nanos() as u64;
    let mut out = Vec::with_capacity(256);
    let mut keys = MaskKeys::new(seed);
    let mut last_write = now_ns();
    for k in 0.. {
        if devices.stop.load(Ordering::Relaxed) {
            return;
        }
        let due = start + due_ns(k, rate);
        loop {
            let now = now_ns();
            if now >= due {
                break;
            }
            if now - last_write >= ping_ns {
                if tcp.write_all(&PING).await.is_err() {
                    devices.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                last_write = now;
                continue;
            }
            let wake = due.min(last_write + ping_ns);
            tokio::time::sleep_until(instant_at(wake).into()).await;
        }
        let sent = now_ns();
        out.clear();
        template.put(&mut out, &[sent, due], keys.next_key());
        if tcp.write_all(&out).await.is_err() {
            if !deliveries.phase.done() {
                devices.failed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        last_write = sent;
        devices.published.fetch_add(1, Ordering::Relaxed);
        if deliveries.phase.measuring() {
            let mut lag = devices.lag.lock().unwrap_or_else(|e| e.into_inner());
            lag.saturating_record((sent - due).max(1));
        }
    }
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: PublishersArgs) -> anyhow::Result<()> {
    let nodes = args.common.nodes(&[Transport::Ws])?;
    if !(args.rate_per_device > 0.0 && args.rate_per_device.is_finite()) {
        bail!("--rate-per-device must be positive");
    }
    if args.payload < min_payload(2) {
        bail!("--payload must be at least {} bytes", min_payload(2));
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let data = payload(args.payload, 0x2a);
    let layouts = (0..args.devices)
        .map(|d| EventLayout::new(&room(d), EVENT, &data))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let n_watchers = args.devices * args.watchers;

    eprintln!(
        "[publishers] connecting {n_watchers} watchers and {} devices",
        args.devices
    );
    let started = Instant::now();
    // Watcher j watches device j / watchers; round-robin over the nodes by j, so the watchers
    // of one device land on different nodes.
    let watchers = args.watchers;
    let sessions = open_many(n_watchers, args.concurrency, |j| {
        (nodes.subscriber(j).to_owned(), Some(room(j / watchers)))
    })
    .await?;
    let deliveries = Arc::new(Deliveries::new());
    for (j, (tcp, welcome)) in sessions.into_iter().enumerate() {
        let keepalive = Keepalive::for_session(j, n_watchers, &welcome);
        let frames = RawFrames::new(tcp, 2048);
        let layout = layouts[j / watchers];
        tokio::spawn(timed_reader(
            j,
            frames,
            layout,
            keepalive,
            deliveries.clone(),
        ));
    }
    let publishers = open_many(args.devices, args.concurrency, |_| {
        (nodes.publisher().to_owned(), None)
    })
    .await?;
    let connect_s = started.elapsed().as_secs_f64();

    let devices = Arc::new(Devices {
        published: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        lag: Mutex::new(histogram()),
    });
    let period_ns = due_ns(1, args.rate_per_device);
    let start = now_ns() + 10_000_000;
    for (d, (tcp, welcome)) in publishers.into_iter().enumerate() {
        let template = PublishTemplate::new(&room(d), EVENT, &data)?;
        let ping_every = Keepalive::for_session(0, 1, &welcome).every;
        let schedule = Schedule {
            start: start + jitter_ns(d as u64, period_ns),
            rate: args.rate_per_device,
            ping_every,
            seed: d as u64 + 1,
        };
        tokio::spawn(device(
            tcp,
            template,
            schedule,
            deliveries.clone(),
            devices.clone(),
        ));
    }
    let target_publish = args.devices as f64 * args.rate_per_device;
    eprintln!(
        "[publishers] {} sessions in {connect_s:.2} s; publishing {target_publish:.0}/s",
        n_watchers + args.devices
    );

    let progress = |ticker: &mut Ticker, label: &str, delivered: u64| {
        let rate = ticker.rate(delivered);
        eprintln!(
            "[publishers] {label}: delivered {rate:.0}/s (expected {:.0}/s), published {}, gaps {}, closed {}, failed devices {}",
            target_publish * watchers as f64,
            devices.published.load(Ordering::Relaxed),
            deliveries.gaps.load(Ordering::Relaxed),
            deliveries.closed.load(Ordering::Relaxed),
            devices.failed.load(Ordering::Relaxed),
        );
        rate
    };
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let mut ticker = Ticker::new(deliveries.delivered.load(Ordering::Relaxed));
    while Instant::now() < warmup_end {
        ticker.tick(warmup_end).await;
        progress(
            &mut ticker,
            "warm-up",
            deliveries.delivered.load(Ordering::Relaxed),
        );
    }

    let mark = CpuMark::take(args.common.broker_pid);
    let published_0 = devices.published.load(Ordering::Relaxed);
    let gaps_0 = deliveries.gaps.load(Ordering::Relaxed);
    deliveries.phase.start_measuring();
    let measure_start = Instant::now();
    let end = measure_start + Duration::from_secs_f64(args.duration);
    let mut ticker = Ticker::new(0);
    let mut series = Vec::new();
    let mut rss_max = 0;
    while Instant::now() < end {
        ticker.tick(end).await;
        let label = format!(
            "{:.0}/{} s",
            measure_start.elapsed().as_secs_f64(),
            args.duration
        );
        series.push(progress(&mut ticker, &label, deliveries.latency.count()).round());
        rss_max = rss_max.max(args.common.broker_pid.and_then(rss_bytes).unwrap_or(0));
    }
    deliveries.phase.finish();
    devices.stop.store(true, Ordering::Relaxed);
    let stop = CpuMark::take(args.common.broker_pid);

    let elapsed = stop.secs_since(&mark);
    let (broker_cpu, own_cpu) = stop.percent_since(&mark);
    let hists = deliveries.latency.merged();
    let lat = Summary::of(&hists[FROM_SEND]);
    let lat_sched = Summary::of(&hists[FROM_SCHEDULE]);
    let lag = Summary::of(&devices.lag.lock().unwrap_or_else(|e| e.into_inner()));
    let publish_per_s = (devices.published.load(Ordering::Relaxed) - published_0) as f64 / elapsed;
    let delivered_per_s = lat.n as f64 / elapsed;
    let expected_per_s = publish_per_s * watchers as f64;
    let gaps = deliveries.gaps.load(Ordering::Relaxed) - gaps_0;
    let closed = deliveries.closed.load(Ordering::Relaxed);
    let failed = devices.failed.load(Ordering::Relaxed);
    let rss = args.common.broker_pid.and_then(rss_bytes);

    let mut table = format!(
        "publishers {}: devices={} rate/device={}/s watchers={} payload={}B nodes={}\n",
        args.common.transport.name(),
        args.devices,
        args.rate_per_device,
        args.watchers,
        args.payload,
        args.common.nodes.len().max(1)
    );
    table += &format!("  connect            {connect_s:.2} s\n");
    table += &format!("  publishes/s        {publish_per_s:.1} (target {target_publish:.1})\n");
    table += &format!("  delivered/s        {delivered_per_s:.0} (expected {expected_per_s:.0})\n");
    table += &format!("  latency            {}\n", lat.line());
    table += &format!("  from schedule      {}\n", lat_sched.line());
    table += &format!("  publisher late by  {}\n", lag.line());
    table += &format!("  gaps / closed      {gaps} / {closed}  (failed devices {failed})\n");
    push_resource_lines(&mut table, 19, broker_cpu, own_cpu, rss);
    let head = args.common.json_head("publishers", &nodes);
    let figures = json!({
        "devices": args.devices, "rate_per_device": args.rate_per_device,
        "watchers": args.watchers, "payload": args.payload, "warmup_s": args.warmup,
        "duration_s": elapsed, "connect_s": connect_s,
        "publish_per_s": round1(publish_per_s), "delivered_per_s": delivered_per_s.round(),
        "expected_per_s": expected_per_s.round(), "gaps": gaps, "closed_subs": closed,
        "failed_devices": failed, "lat_ms": lat.json(), "lat_sched_ms": lat_sched.json(),
        "send_lag_ms": lag.json(), "broker_cpu_pct": broker_cpu.map(round1),
        "broker_rss": rss, "broker_rss_max": args.common.broker_pid.map(|_| rss_max),
        "loadgen_cpu_pct": own_cpu.map(round1), "series": series,
    });
    args.common.report(head, figures, &table);
    Ok(())
}
