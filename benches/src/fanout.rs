//! `fanout`: N subscribers in one room and one closed-loop publisher that keeps at most
//! `--window` publishes not yet received by every subscriber (the loop of limit-ref's
//! scenario A, so the two compare side by side).
//!
//! Each payload carries the time its batch was written (ns on this process's clock), so every
//! delivery is also timed, as limit-ref's A does: in a closed loop that latency is mostly the
//! time a publish waits behind the window, a figure of queueing rather than of the path alone.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use roomcast_protocol::{ClientFrame, stream::read_varint};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Notify,
};

use crate::{
    common::{
        CommonArgs, EventLayout, MaskKeys, PING, PublishTemplate, RawFrames, Transport, into_tcp,
        min_payload, open_session, open_subscribers, payload, rss_bytes,
    },
    measure::{CpuMark, Phase, Shards, Summary, Ticker, now_ns, push_resource_lines, round1},
    timed::Keepalive,
    wt::{WtSubscriber, open_wt_subscribers, send_frame},
};

/// Arguments of `roomcast-bench fanout`.
#[derive(clap::Args, Debug)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Subscriber sessions.
    #[arg(long, default_value_t = 1000)]
    subs: u32,
    /// Payload size in bytes (the CBOR item inside `data`); at least 9 (one time stamp).
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
    /// Subscriber handshakes in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
}

/// Slots tracking how many subscribers got each in-flight seq.
const RING: usize = 4096;
const ROOM: &str = "bench:fanout";
/// The room of `--transport wt-datagram`: in namespace `gps`, which the broker must run as
/// volatile (`--volatile-namespaces gps`) for its events to travel as datagrams.
const VOLATILE_ROOM: &str = "gps:bench-fanout";
/// With datagrams, a publish not received by every subscriber after this long counts as lost
/// (so the closed loop goes on).
const LOST_AFTER: Duration = Duration::from_millis(200);
const EVENT: &str = "tick";

struct Progress {
    subs: u32,
    counts: Vec<AtomicU32>,
    /// Publishes written.
    published: AtomicU64,
    /// Publishes received by every subscriber.
    done: AtomicU64,
    /// Deliveries counted by all subscribers (flushed every 64).
    delivered: AtomicU64,
    /// Socket reads by all subscribers (flushed every 64).
    reads: AtomicU64,
    /// Subscriber sessions that ended before the run was done.
    closed: AtomicU64,
    /// Publishes written off as lost (datagrams only).
    lost: AtomicU64,
    done_notify: Notify,
    phase: Phase,
    stop: AtomicBool,
    /// Publish→deliver latency of deliveries received while measuring, ns.
    latency: Shards<1>,
}

/// Counters read when the measurement window opens and when it closes.
struct Mark {
    cpu: CpuMark,
    delivered: u64,
    reads: u64,
    done: u64,
}

impl Mark {
    fn take(progress: &Progress, broker_pid: Option<u32>) -> Mark {
        Mark {
            cpu: CpuMark::take(broker_pid),
            delivered: progress.delivered.load(Ordering::Relaxed),
            reads: progress.reads.load(Ordering::Relaxed),
            done: progress.done.load(Ordering::Relaxed),
        }
    }
}

/// One subscriber's count of the events it receives, whatever carried them.
struct Tally {
    idx: usize,
    layout: EventLayout,
    progress: Arc<Progress>,
    /// Events seen by this subscriber.
    local: u64,
    /// Latencies not yet merged into the shared histogram, ns.
    pending: Vec<[u64; 1]>,
    /// Clock of the current read batch (0: not read yet) and whether it is measured.
    now: u64,
    measuring: bool,
}

impl Tally {
    fn new(idx: usize, layout: EventLayout, progress: Arc<Progress>) -> Self {
        Tally {
            idx,
            layout,
            progress,
            local: 0,
            pending: Vec::with_capacity(64),
            now: 0,
            measuring: false,
        }
    }

    /// Counts one frame of a read batch.
    fn frame(&mut self, frame: &[u8]) {
        let Some(seq) = self.layout.seq(frame) else {
            return;
        };
        let progress = &self.progress;
        self.local += 1;
        if self.local % 64 == 0 {
            progress.delivered.fetch_add(64, Ordering::Relaxed);
        }
        if self.now == 0 {
            self.now = now_ns();
            self.measuring = progress.phase.measuring();
        }
        if self.measuring {
            let sent = self.layout.stamp(frame, 0).unwrap_or(self.now);
            self.pending.push([self.now.saturating_sub(sent)]);
        }
        let slot = &progress.counts[seq as usize % RING];
        if slot.fetch_add(1, Ordering::AcqRel) + 1 == progress.subs {
            slot.store(0, Ordering::Release);
            progress.done.fetch_add(1, Ordering::AcqRel);
            progress.done_notify.notify_one();
        }
    }

    /// Ends a read batch: merges its latencies.
    fn end_batch(&mut self) {
        self.now = 0;
        if !self.pending.is_empty() {
            self.progress.latency.record(self.idx, &self.pending);
            self.pending.clear();
        }
    }

    /// The session ended.
    fn closed(&self) {
        if !self.progress.phase.done() {
            self.progress.closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a WebSocket subscriber's events (raw socket reads).
async fn count_events(mut frames: RawFrames, keepalive: Keepalive, mut tally: Tally) {
    let mut pings = keepalive.interval();
    loop {
        tokio::select! {
            open = frames.read(|frame| tally.frame(frame)) => {
                if !open {
                    return tally.closed();
                }
                if frames.reads % 64 == 0 {
                    tally.progress.reads.fetch_add(64, Ordering::Relaxed);
                }
            }
            _ = pings.tick() => {
                if frames.send(&PING).await.is_err() {
                    return;
                }
            }
        }
        tally.end_batch();
    }
}

/// Counts a WebTransport subscriber's events: from its room stream, or from datagrams.
async fn count_wt_events(
    session: WtSubscriber,
    datagrams: bool,
    keepalive: Keepalive,
    mut tally: Tally,
) {
    let WtSubscriber {
        connection,
        mut control,
        control_recv: _control_recv,
        room,
        personal: _personal,
        ..
    } = session;
    let (mut recv, mut splitter) = room.into_parts();
    let mut pings = keepalive.interval();
    let mut reads = 0u64;
    loop {
        tokio::select! {
            read = recv.read_buf(splitter.buffer(16 * 1024)), if !datagrams => {
                if !matches!(read, Ok(n) if n > 0) {
                    return tally.closed();
                }
                loop {
                    match splitter.next_frame() {
                        Ok(Some(frame)) => tally.frame(&frame),
                        Ok(None) => break,
                        Err(_) => return tally.closed(),
                    }
                }
            }
            // Straight from quinn, skipping wtransport's hand-over (a task and a channel per
            // datagram, which made the generator the bottleneck): the HTTP/3 datagram is the
            // session's quarter stream id, a QUIC varint, then the frame.
            datagram = connection.quic_connection().read_datagram(), if datagrams => {
                match datagram.ok().and_then(|d| read_varint(&d).map(|(_, n)| d.slice(n..))) {
                    Some(frame) => tally.frame(&frame),
                    None => return tally.closed(),
                }
            }
            _ = pings.tick() => {
                if send_frame(&mut control, &ClientFrame::Ping { id: None }).await.is_err() {
                    return;
                }
            }
        }
        reads += 1;
        if reads % 64 == 0 {
            tally.progress.reads.fetch_add(64, Ordering::Relaxed);
        }
        tally.end_batch();
    }
}

/// The closed loop: whenever fewer than `window` publishes are in flight, writes the missing
/// ones in one batch, each stamped with the batch's write time.
///
/// With `lossy` (datagrams), a publish that stays incomplete for [`LOST_AFTER`] while the
/// window is full is written off as lost, oldest first.
async fn publish_closed_loop(
    mut tcp: TcpStream,
    template: PublishTemplate,
    window: u64,
    lossy: bool,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(64 * 1024);
    let mut keys = MaskKeys::new(1);
    let mut published = 0u64;
    let mut last_done = (0u64, Instant::now());
    while !progress.stop.load(Ordering::Relaxed) {
        let done = progress.done.load(Ordering::Acquire);
        if done != last_done.0 {
            last_done = (done, Instant::now());
        }
        let room_left = window.saturating_sub(published - done);
        if room_left == 0 {
            if lossy && last_done.1.elapsed() >= LOST_AFTER {
                // Seqs start at 1: publish number `done + 1` is the oldest in flight.
                progress.counts[(done + 1) as usize % RING].store(0, Ordering::Release);
                progress.done.fetch_add(1, Ordering::AcqRel);
                progress.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let notified = progress.done_notify.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            continue;
        }
        out.clear();
        let sent = now_ns();
        for _ in 0..room_left {
            template.put(&mut out, &[sent], keys.next_key());
        }
        tcp.write_all(&out).await?;
        published += room_left;
        progress.published.store(published, Ordering::Relaxed);
    }
    Ok(())
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let nodes = args
        .common
        .nodes(&[Transport::Ws, Transport::Wt, Transport::WtDatagram])?;
    if args.window == 0 || args.window as usize >= RING {
        bail!("--window must be between 1 and {}", RING - 1);
    }
    if args.payload < min_payload(1) {
        bail!("--payload must be at least {} bytes", min_payload(1));
    }
    if args.subs == 0 {
        bail!("--subs must be at least 1");
    }
    let transport = args.common.transport;
    let room = if transport == Transport::WtDatagram {
        VOLATILE_ROOM
    } else {
        ROOM
    };
    let data = payload(args.payload, 0x2a);
    let layout = EventLayout::new(room, EVENT, &data)?;
    let template = PublishTemplate::new(room, EVENT, &data)?;
    let progress = Arc::new(Progress {
        subs: args.subs,
        counts: (0..RING).map(|_| AtomicU32::new(0)).collect(),
        published: AtomicU64::new(0),
        done: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        done_notify: Notify::new(),
        phase: Phase::default(),
        stop: AtomicBool::new(false),
        latency: Shards::new(),
    });
    eprintln!(
        "[fanout] connecting {} {} subscribers",
        args.subs,
        transport.name()
    );
    let started = Instant::now();
    let n = args.subs as usize;
    if transport == Transport::Ws {
        let sessions = open_subscribers(&nodes, n, args.concurrency, |_| room.to_owned()).await?;
        for (i, (tcp, welcome)) in sessions.into_iter().enumerate() {
            let keepalive = Keepalive::for_session(i, n, &welcome);
            let frames = RawFrames::new(tcp, 16 * 1024);
            let tally = Tally::new(i, layout, progress.clone());
            tokio::spawn(count_events(frames, keepalive, tally));
        }
    } else {
        let sessions = open_wt_subscribers(&nodes, n, args.concurrency, room).await?;
        for (i, session) in sessions.into_iter().enumerate() {
            let keepalive = Keepalive::for_session(i, n, &session.welcome);
            let tally = Tally::new(i, layout, progress.clone());
            let datagrams = transport == Transport::WtDatagram;
            tokio::spawn(count_wt_events(session, datagrams, keepalive, tally));
        }
    }
    let connect_s = started.elapsed().as_secs_f64();

    let (publisher, _) = open_session(nodes.publisher(), None).await?;
    let publisher = tokio::spawn(publish_closed_loop(
        into_tcp(publisher)?,
        template,
        args.window,
        transport == Transport::WtDatagram,
        progress.clone(),
    ));
    eprintln!(
        "[fanout] {n} subscribers in {connect_s:.2} s; window {}",
        args.window
    );

    let line = |ticker: &mut Ticker, label: &str| {
        let rate = ticker.rate(progress.delivered.load(Ordering::Relaxed));
        eprintln!(
            "[fanout] {label}: delivered {rate:.0}/s, publishes done {}, closed {}",
            progress.done.load(Ordering::Relaxed),
            progress.closed.load(Ordering::Relaxed),
        );
        rate
    };
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let mut ticker = Ticker::new(progress.delivered.load(Ordering::Relaxed));
    while Instant::now() < warmup_end && !publisher.is_finished() {
        ticker.tick(warmup_end).await;
        line(&mut ticker, "warm-up");
    }
    let start = Mark::take(&progress, args.common.broker_pid);
    progress.phase.start_measuring();
    let measure_start = Instant::now();
    let end = measure_start + Duration::from_secs_f64(args.duration);
    let mut ticker = Ticker::new(start.delivered);
    let mut series = Vec::new();
    while Instant::now() < end && !publisher.is_finished() {
        ticker.tick(end).await;
        let label = format!(
            "{:.0}/{} s",
            measure_start.elapsed().as_secs_f64(),
            args.duration
        );
        series.push(line(&mut ticker, &label).round());
    }
    progress.phase.finish();
    progress.stop.store(true, Ordering::Relaxed);
    let stop = Mark::take(&progress, args.common.broker_pid);
    if publisher.is_finished() {
        match publisher.await {
            Ok(Err(e)) => bail!("publisher failed: {e:#}"),
            Err(e) => bail!("publisher failed: {e}"),
            Ok(Ok(())) => {}
        }
    }

    let elapsed = stop.cpu.secs_since(&start.cpu);
    let delivered_n = stop.delivered - start.delivered;
    let frames_per_read = delivered_n as f64 / (stop.reads - start.reads).max(1) as f64;
    let delivered = delivered_n as f64 / elapsed;
    let publishes = (stop.done - start.done) as f64 / elapsed;
    let (broker_cpu, own_cpu) = stop.cpu.percent_since(&start.cpu);
    let rss = args.common.broker_pid.and_then(rss_bytes);
    let [lat] = progress.latency.merged();
    let lat = Summary::of(&lat);
    let closed = progress.closed.load(Ordering::Relaxed);
    let lost = progress.lost.load(Ordering::Relaxed);

    let mut table = format!(
        "fanout {}: subs={} payload={}B window={} nodes={}\n",
        args.common.transport.name(),
        args.subs,
        args.payload,
        args.window,
        args.common.nodes.len().max(1)
    );
    table += &format!("  connect          {connect_s:.2} s\n");
    table += &format!("  delivered/s      {delivered:.0}\n");
    table += &format!("  publishes/s      {publishes:.0}\n");
    table += &format!("  frames/read      {frames_per_read:.2}\n");
    table += &format!("  latency          {}\n", lat.line());
    table += &format!("  closed subs      {closed}\n");
    if transport == Transport::WtDatagram {
        table += &format!("  lost publishes   {lost} (not received by every subscriber)\n");
    }
    push_resource_lines(&mut table, 17, broker_cpu, own_cpu, rss);
    let head = args.common.json_head("fanout", &nodes);
    let figures = json!({
        "subs": args.subs, "payload": args.payload, "window": args.window,
        "warmup_s": args.warmup, "duration_s": elapsed, "connect_s": connect_s,
        "delivered_per_s": delivered.round(), "publish_per_s": publishes.round(),
        "frames_per_read": (frames_per_read * 100.0).round() / 100.0, "closed_subs": closed, "lost_publishes": lost,
        "lat_ms": lat.json(), "broker_cpu_pct": broker_cpu.map(round1), "broker_rss": rss,
        "loadgen_cpu_pct": own_cpu.map(round1), "series": series,
    });
    args.common.report(head, figures, &table);
    Ok(())
}
