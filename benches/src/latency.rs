//! `latency`: publish→deliver latency at a fixed publish rate, every delivery timed (limit-ref's
//! scenario B). `--subs` subscribers in one room; one publisher on an open-loop schedule.
//!
//! The publisher runs on its own OS thread with a blocking socket and sleeps with
//! `std::thread::sleep` (tens of µs of slack, where tokio's timer has 1 ms): publish `k` is
//! due at `start + k / rate`, computed from `k`, so a late publish never moves the ones after
//! it (a publisher that fell behind sends the overdue publishes at once). Each payload carries
//! the time it was written and the time it was due. Coordinated omission: the headline
//! latency (`lat_ms`) counts from the write, as limit-ref does, so the two compare; the same
//! deliveries counted from the due time are `lat_sched_ms`, and the publisher's lateness
//! (write − due) is `send_lag_ms`. When the broker pushes back on the publisher, the second
//! and third grow while the first may not.
//!
//! `--flooders N` adds flooding neighbours in the same room ([`crate::flood`]): the latency
//! of the innocent subscribers with and without them is the cost of a flood that the
//! broker's limits have to absorb.

use std::{
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::{
    common::{
        CommonArgs, EventLayout, MaskKeys, PublishTemplate, RawFrames, Transport, into_tcp,
        min_payload, open_session, open_subscribers, payload, rss_bytes, wait_until_due,
    },
    flood::{FloodStats, flooder},
    measure::{CpuMark, Summary, Ticker, due_ns, histogram, now_ns, push_resource_lines, round1},
    timed::{Deliveries, FROM_SCHEDULE, FROM_SEND, Keepalive, timed_reader},
};

/// Arguments of `roomcast-bench latency`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Latency figures (ms): lat_ms counts from the moment each publish was \
written (as limit-ref does); lat_sched_ms counts the same deliveries from the moment the \
open-loop schedule wanted the publish written, so a publisher held back by the broker cannot \
hide the delay (coordinated omission); send_lag_ms is the publisher's lateness (write - due)."
)]
pub(crate) struct LatencyArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Subscriber sessions, all in one room.
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// Publishes per second, open loop (publish k is due at start + k / rate).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Payload size in bytes (the CBOR item inside `data`); at least 17 (two time stamps).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of traffic before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Subscriber handshakes in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Flooding neighbours: sessions that publish into the same room as fast as their
    /// sockets take it (another event name, 16 B payloads, no ack), get rate_limited and
    /// policy_violation from the broker's limits, and reconnect at once, all run long
    /// (module `flood`). The subscribers time only the measured publisher's events.
    #[arg(long, default_value_t = 0)]
    flooders: usize,
    /// Loopback source address of the flooders' connections (e.g. 127.0.0.2, so that
    /// per-address caps tell them from the measured sessions on 127.0.0.1).
    #[arg(long, value_name = "IP")]
    flood_source: Option<std::net::Ipv4Addr>,
    /// Token the flooders send in `Hello` (instead of `--token`): every flooding session is
    /// then the same user, whose per-user publish budget the broker keeps across reconnects.
    #[arg(long, env = "ROOMCAST_BENCH_FLOOD_TOKEN", hide_env_values = true)]
    flood_token: Option<String>,
}

const ROOM: &str = "bench:latency";
const EVENT: &str = "tick";

/// The publisher thread's side of the run.
struct Publisher {
    /// Publishes written so far.
    published: AtomicU64,
    /// Set when the run is over.
    stop: AtomicBool,
    /// Write time − due time of the publishes written while measuring, ns.
    lag: Mutex<Histogram<u64>>,
    /// Why the publisher stopped early.
    error: Mutex<Option<String>>,
}

/// Publishes on the open-loop schedule until told to stop (see the module docs).
fn publish_on_schedule(
    mut tcp: std::net::TcpStream,
    template: PublishTemplate,
    rate: f64,
    ping_every: Duration,
    deliveries: Arc<Deliveries>,
    state: Arc<Publisher>,
) {
    let start = now_ns() + 1_000_000;
    let ping_ns = ping_every.as_nanos() as u64;
    let mut out = Vec::with_capacity(256);
    let mut keys = MaskKeys::new(1);
    let mut last_write = now_ns();
    let fail = |e: std::io::Error| {
        *state.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    };
    for k in 0.. {
        if state.stop.load(Ordering::Relaxed) {
            return;
        }
        let due = start + due_ns(k, rate);
        if let Err(e) = wait_until_due(&mut tcp, due, ping_ns, &mut last_write) {
            return fail(e);
        }
        let sent = now_ns();
        out.clear();
        template.put(&mut out, &[sent, due], keys.next_key());
        if let Err(e) = tcp.write_all(&out) {
            return fail(e);
        }
        last_write = sent;
        state.published.fetch_add(1, Ordering::Relaxed);
        if deliveries.phase.measuring() {
            let mut lag = state.lag.lock().unwrap_or_else(|e| e.into_inner());
            lag.saturating_record((sent - due).max(1));
        }
    }
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: LatencyArgs) -> anyhow::Result<()> {
    let nodes = args.common.nodes(&[Transport::Ws])?;
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    if args.payload < min_payload(2) {
        bail!("--payload must be at least {} bytes", min_payload(2));
    }
    if args.subs == 0 {
        bail!("--subs must be at least 1");
    }
    let data = payload(args.payload, 0x2a);
    let layout = EventLayout::new(ROOM, EVENT, &data)?;
    let template = PublishTemplate::new(ROOM, EVENT, &data)?;

    eprintln!("[latency] connecting {} subscribers", args.subs);
    let started = Instant::now();
    let sessions =
        open_subscribers(&nodes, args.subs, args.concurrency, |_| ROOM.to_owned()).await?;
    let connect_s = started.elapsed().as_secs_f64();
    let deliveries = Arc::new(Deliveries::new());
    let n = sessions.len();
    for (i, (tcp, welcome)) in sessions.into_iter().enumerate() {
        let keepalive = Keepalive::for_session(i, n, &welcome);
        let frames = RawFrames::new(tcp, 16 * 1024);
        tokio::spawn(timed_reader(
            i,
            frames,
            layout,
            keepalive,
            deliveries.clone(),
        ));
    }

    let (ws, welcome) = open_session(nodes.publisher(), None).await?;
    let tcp = into_tcp(ws)?.into_std()?;
    tcp.set_nonblocking(false)?;
    let publisher = Arc::new(Publisher {
        published: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        lag: Mutex::new(histogram()),
        error: Mutex::new(None),
    });
    {
        let (deliveries, publisher) = (deliveries.clone(), publisher.clone());
        let ping_every = Keepalive::for_session(0, 1, &welcome).every;
        let rate = args.rate;
        std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                publish_on_schedule(tcp, template, rate, ping_every, deliveries, publisher)
            })?;
    }
    eprintln!(
        "[latency] {n} subscribers in {connect_s:.2} s; publishing {}/s",
        args.rate
    );
    let flood = Arc::new(FloodStats::default());
    let flood_stop = Arc::new(AtomicBool::new(false));
    for _ in 0..args.flooders {
        tokio::spawn(flooder(
            nodes.publisher().to_owned(),
            args.flood_source,
            args.flood_token.clone(),
            ROOM,
            flood.clone(),
            flood_stop.clone(),
        ));
    }
    if args.flooders > 0 {
        eprintln!("[latency] {} flooding neighbours started", args.flooders);
    }

    let progress = |ticker: &mut Ticker, label: &str, delivered: u64| {
        let closed = deliveries.closed.load(Ordering::Relaxed);
        let rate = ticker.rate(delivered);
        eprintln!(
            "[latency] {label}: delivered {rate:.0}/s (expected {:.0}/s), published {}, gaps {}, closed {closed}",
            args.rate * (n as u64 - closed) as f64,
            publisher.published.load(Ordering::Relaxed),
            deliveries.gaps.load(Ordering::Relaxed),
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

    let start = CpuMark::take(args.common.broker_pid);
    let published_0 = publisher.published.load(Ordering::Relaxed);
    let gaps_0 = deliveries.gaps.load(Ordering::Relaxed);
    let foreign_0 = deliveries.foreign.load(Ordering::Relaxed);
    let flood_0 = flood.snapshot();
    deliveries.phase.start_measuring();
    let measure_start = Instant::now();
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut ticker = Ticker::new(0);
    let mut series = Vec::new();
    let mut rss_max = 0;
    while Instant::now() < end {
        ticker.tick(end).await;
        let t = measure_start.elapsed().as_secs_f64();
        let label = format!("{t:.0}/{} s", args.duration);
        series.push(progress(&mut ticker, &label, deliveries.latency.count()).round());
        rss_max = rss_max.max(args.common.broker_pid.and_then(rss_bytes).unwrap_or(0));
        if let Some(e) = publisher
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            bail!("publisher failed: {e}");
        }
    }
    deliveries.phase.finish();
    publisher.stop.store(true, Ordering::Relaxed);
    let stop = CpuMark::take(args.common.broker_pid);
    let flood_1 = flood.snapshot();
    flood_stop.store(true, Ordering::Relaxed);
    let foreign = deliveries.foreign.load(Ordering::Relaxed) - foreign_0;

    let elapsed = stop.secs_since(&start);
    let (broker_cpu, own_cpu) = stop.percent_since(&start);
    let hists = deliveries.latency.merged();
    let lat = Summary::of(&hists[FROM_SEND]);
    let lat_sched = Summary::of(&hists[FROM_SCHEDULE]);
    let lag = Summary::of(&publisher.lag.lock().unwrap_or_else(|e| e.into_inner()));
    let published = publisher.published.load(Ordering::Relaxed) - published_0;
    let publish_per_s = published as f64 / elapsed;
    let delivered_per_s = lat.n as f64 / elapsed;
    let closed = deliveries.closed.load(Ordering::Relaxed);
    let expected_per_s = publish_per_s * (n as u64 - closed) as f64;
    let gaps = deliveries.gaps.load(Ordering::Relaxed) - gaps_0;
    let rss = args.common.broker_pid.and_then(rss_bytes);

    let mut table = format!(
        "latency {}: subs={n} rate={}/s payload={}B nodes={}\n",
        args.common.transport.name(),
        args.rate,
        args.payload,
        args.common.nodes.len().max(1)
    );
    table += &format!("  connect            {connect_s:.2} s\n");
    table += &format!("  publishes/s        {publish_per_s:.1}\n");
    table += &format!("  delivered/s        {delivered_per_s:.0} (expected {expected_per_s:.0})\n");
    table += &format!("  latency            {}\n", lat.line());
    table += &format!("  from schedule      {}\n", lat_sched.line());
    table += &format!("  publisher late by  {}\n", lag.line());
    table += &format!("  gaps / closed      {gaps} / {closed}\n");
    if args.flooders > 0 {
        table += &format!(
            "  flooders           {}: {}\n",
            args.flooders,
            FloodStats::line(flood_0, flood_1, elapsed)
        );
        table += &format!(
            "  flood delivered    {:.0} events/s per subscriber\n",
            foreign as f64 / elapsed / n as f64
        );
    }
    push_resource_lines(&mut table, 19, broker_cpu, own_cpu, rss);
    let head = args.common.json_head("latency", &nodes);
    let figures = json!({
        "subs": n, "rate": args.rate, "payload": args.payload, "warmup_s": args.warmup,
        "duration_s": elapsed, "connect_s": connect_s,
        "publish_per_s": round1(publish_per_s), "delivered_per_s": delivered_per_s.round(),
        "expected_per_s": expected_per_s.round(), "gaps": gaps, "closed_subs": closed,
        "lat_ms": lat.json(), "lat_sched_ms": lat_sched.json(), "send_lag_ms": lag.json(),
        "broker_cpu_pct": broker_cpu.map(round1), "broker_rss": rss,
        "broker_rss_max": args.common.broker_pid.map(|_| rss_max),
        "loadgen_cpu_pct": own_cpu.map(round1), "series": series,
        "flooders": args.flooders,
        "flood_user": args.flood_token.is_some(),
        "flood": (args.flooders > 0).then(|| FloodStats::json(flood_0, flood_1, elapsed)),
        "flood_delivered_per_s_per_sub": (foreign as f64 / elapsed / n as f64).round(),
    });
    args.common.report(head, figures, &table);
    Ok(())
}
