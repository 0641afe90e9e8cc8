//! `fanout`: N subscribers in one room and one closed-loop publisher that keeps at most
//! `--window` publishes not yet received by every subscriber (the loop of limit-ref's
//! scenario A, so the two compare side by side).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use futures_util::SinkExt;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{
    EventLayout, RawFrames, cpu_seconds, open_session, open_subscriber, payload, publish_frame,
    rss_bytes,
};

/// Arguments of `roomcast-bench fanout`.
#[derive(clap::Args)]
pub(crate) struct FanoutArgs {
    /// Broker WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:4433/ws")]
    url: String,
    /// Subscriber sessions.
    #[arg(long, default_value_t = 1000)]
    subs: u32,
    /// Payload size in bytes (the CBOR item inside `data`).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Publishes allowed in flight (not yet received by every subscriber).
    #[arg(long, default_value_t = 16)]
    window: u64,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds of traffic before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Broker process id, to report its CPU and RSS from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

/// Slots tracking how many subscribers got each in-flight seq.
const RING: usize = 4096;
const ROOM: &str = "bench:fanout";
const EVENT: &str = "tick";

struct Progress {
    subs: u32,
    counts: Vec<AtomicU32>,
    /// Publishes received by every subscriber.
    done: AtomicU64,
    /// Deliveries counted by all subscribers (flushed every 64).
    delivered: AtomicU64,
    /// Socket reads by all subscribers (flushed every 64).
    reads: AtomicU64,
    done_notify: Notify,
}

/// Counters read when the measurement window opens.
struct Mark {
    at: Instant,
    delivered: u64,
    reads: u64,
    done: u64,
    broker_cpu: Option<f64>,
    own_cpu: Option<f64>,
}

impl Mark {
    fn take(progress: &Progress, broker_pid: Option<u32>) -> Mark {
        Mark {
            at: Instant::now(),
            delivered: progress.delivered.load(Ordering::Relaxed),
            reads: progress.reads.load(Ordering::Relaxed),
            done: progress.done.load(Ordering::Relaxed),
            broker_cpu: broker_pid.and_then(cpu_seconds),
            own_cpu: cpu_seconds(std::process::id()),
        }
    }
}

async fn count_events(mut frames: RawFrames, layout: EventLayout, progress: Arc<Progress>) {
    let mut local = 0u64;
    loop {
        let open = frames.read(|frame| {
            let Some(seq) = layout.seq(frame) else { return };
            local += 1;
            if local % 64 == 0 {
                progress.delivered.fetch_add(64, Ordering::Relaxed);
            }
            let slot = &progress.counts[seq as usize % RING];
            if slot.fetch_add(1, Ordering::AcqRel) + 1 == progress.subs {
                slot.store(0, Ordering::Release);
                progress.done.fetch_add(1, Ordering::AcqRel);
                progress.done_notify.notify_one();
            }
        });
        if !open.await {
            return;
        }
        if frames.reads % 64 == 0 {
            progress.reads.fetch_add(64, Ordering::Relaxed);
        }
    }
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    if args.window == 0 || args.window as usize >= RING {
        bail!("--window must be between 1 and {}", RING - 1);
    }
    let data = payload(args.payload, 0x2a);
    let layout = EventLayout::new(ROOM, EVENT, &data)?;
    let progress = Arc::new(Progress {
        subs: args.subs,
        counts: (0..RING).map(|_| AtomicU32::new(0)).collect(),
        done: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        done_notify: Notify::new(),
    });
    let started = Instant::now();
    let mut joins = tokio::task::JoinSet::new();
    let limit = Arc::new(Semaphore::new(100));
    for _ in 0..args.subs {
        let (url, limit) = (args.url.clone(), limit.clone());
        joins.spawn(async move {
            let _permit = limit.acquire().await;
            open_subscriber(&url, ROOM).await
        });
    }
    let mut sockets = Vec::new();
    while let Some(joined) = joins.join_next().await {
        sockets.push(joined??);
    }
    let connect_s = started.elapsed().as_secs_f64();
    for ws in sockets {
        let Some(frames) = RawFrames::new(ws) else {
            bail!("TLS sessions are not supported")
        };
        tokio::spawn(count_events(frames, layout, progress.clone()));
    }

    let mut publisher = open_session(&args.url).await?;
    let frame = publish_frame(ROOM, EVENT, data);
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = warmup_end + Duration::from_secs_f64(args.duration);
    let mut published = 0u64;
    let mut mark: Option<Mark> = None;
    while Instant::now() < end {
        let done = progress.done.load(Ordering::Acquire);
        let room_left = args.window.saturating_sub(published - done);
        if room_left == 0 {
            let notified = progress.done_notify.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            continue;
        }
        for _ in 0..room_left {
            publisher.feed(Message::Binary(frame.clone())).await?;
        }
        publisher.flush().await?;
        published += room_left;
        if mark.is_none() && Instant::now() >= warmup_end {
            mark = Some(Mark::take(&progress, args.broker_pid));
        }
    }
    let Some(start) = mark else {
        bail!("no measurement window")
    };
    let stop = Mark::take(&progress, args.broker_pid);
    let elapsed = stop.at.duration_since(start.at).as_secs_f64();
    let delivered_n = stop.delivered - start.delivered;
    let frames_per_read = delivered_n as f64 / (stop.reads - start.reads).max(1) as f64;
    let delivered = delivered_n as f64 / elapsed;
    let publishes = (stop.done - start.done) as f64 / elapsed;
    let percent = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(before), Some(after)) => Some((after - before) / elapsed * 100.0),
        _ => None,
    };
    let broker_cpu = percent(start.broker_cpu, stop.broker_cpu);
    let own_cpu = percent(start.own_cpu, stop.own_cpu);
    let rss = args.broker_pid.and_then(rss_bytes);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "fanout", "transport": "ws", "subs": args.subs,
                "payload": args.payload, "window": args.window, "duration_s": elapsed,
                "connect_s": connect_s, "delivered_per_s": delivered.round(),
                "publish_per_s": publishes.round(), "frames_per_read": frames_per_read,
                "broker_cpu_pct": broker_cpu, "broker_rss": rss, "loadgen_cpu_pct": own_cpu,
            })
        );
    } else {
        println!(
            "fanout ws: subs={} payload={}B window={}",
            args.subs, args.payload, args.window
        );
        println!("  connect          {connect_s:.2} s");
        println!("  delivered/s      {delivered:.0}");
        println!("  publishes/s      {publishes:.0}");
        println!("  frames/read      {frames_per_read:.2}");
        if let Some(cpu) = broker_cpu {
            println!("  broker CPU       {cpu:.0} %");
        }
        if let Some(cpu) = own_cpu {
            println!("  loadgen CPU      {cpu:.0} %");
        }
        if let Some(rss) = rss {
            println!(
                "  broker RSS       {:.1} MiB",
                rss as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
