//! `hol`: head-of-line blocking across rooms on WebTransport, through a lossy link.
//!
//! One WebTransport subscriber connects through a user-space UDP [`relay`] that drops
//! datagrams at random (`--loss`, both directions) and delays the rest (`--delay-ms`, each
//! way), pins the broker's certificate by the hash at `GET /cert-hash`, and subscribes to two
//! rooms: `hol:a`, into which a WebSocket publisher sends a heavy stream (`--heavy-rate` ×
//! `--heavy-payload`), and `hol:b`, into which a second WebSocket publisher sends a light one
//! (`--light-rate` × `--light-payload`). The publishers connect straight to the broker (no
//! loss) and run on their own OS threads on open-loop schedules, writing two time stamps into
//! each payload (written, due) as `latency` does; the subscriber is in this process, so one
//! clock. It reads frames from the control stream and from every unidirectional stream the
//! broker opens, and times each event when the read that completed it returns.
//!
//! With the broker's default one stream per room, a lost packet carrying room A's bytes holds
//! back only room A; with `roomcast serve --wt-single-stream` every room shares the control
//! stream and every loss stalls both. The figure to compare is room B's latency. The JSON
//! line also says which stream each room actually arrived on (`a_channel`, `b_channel`), so a
//! run against the wrong broker mode shows.

mod relay;

use std::{
    io::Write,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use roomcast_protocol::{ClientFrame, PayloadLimits, ServerFrame, stream::FrameSplitter};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use wtransport::{Connection, Endpoint, RecvStream, VarInt};

use self::relay::{DirectionCounts, LinkConfig, Relay};
use crate::{
    common::{
        CommonArgs, MaskKeys, Nodes, PublishTemplate, into_tcp, min_payload, open_session, payload,
        payload_stamp, wait_until_due,
    },
    measure::{CpuMark, Phase, Summary, Ticker, due_ns, histogram, now_ns, round1},
    timed::Keepalive,
    wt::{broker_addr, client_endpoint, fetch_cert_hash, hello, send_frame},
};

/// Arguments of `roomcast-bench hol`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The subscriber always uses WebTransport (through the relay) and the \
publishers WebSocket (straight to the broker); --transport is ignored. Latencies (ms) count \
from the moment each publish was written (lat) and from when the schedule wanted it written \
(lat_sched); a_late_pct / b_late_pct give the percent of deliveries later than the link's \
one-way delay by more than 5, 20 and 50 ms. Relay counts cover the measured window unless \
named *_total. A run fails if the broker closes the session or no event arrives for 3 s."
)]
pub(crate) struct HolArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Publishes per second into room A (`hol:a`). Keep A below what the lossy link carries:
    /// at 2,000/s x 1 KB the connection falls behind at 1 % loss and the broker closes the
    /// subscriber with `slow_consumer`.
    #[arg(long, default_value_t = 100.0)]
    heavy_rate: f64,
    /// Payload size of room A's events, bytes.
    #[arg(long, default_value_t = 1000)]
    heavy_payload: usize,
    /// Publishes per second into room B (`hol:b`).
    #[arg(long, default_value_t = 100.0)]
    light_rate: f64,
    /// Payload size of room B's events, bytes (at least 17: two time stamps).
    #[arg(long, default_value_t = 100)]
    light_payload: usize,
    /// Schedule of room B's publishes: `poisson` (exponential gaps, seeded by --seed, so B's
    /// events sample the link at times unrelated to A's) or `periodic` (every 1/rate s).
    /// Room A's publishes are always periodic.
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    light_arrivals: Arrivals,
    /// Probability that the relay drops a datagram, each direction (0.02 = 2 %).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way delay the relay adds, each direction, ms.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Most datagrams the relay holds per direction; beyond it arrivals are dropped (counted
    /// as `queue_full`).
    #[arg(long, default_value_t = 8192)]
    relay_queue: usize,
    /// Seed of the relay's drop decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of traffic before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
}

const ROOM_A: &str = "hol:a";
const ROOM_B: &str = "hol:b";
const EVENT: &str = "tick";
/// Index of the latency counted from the write, and from the schedule.
const FROM_SEND: usize = 0;
const FROM_SCHEDULE: usize = 1;

/// How publishes are spread in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Arrivals {
    /// One every 1/rate seconds.
    Periodic,
    /// Exponentially distributed gaps with mean 1/rate seconds.
    Poisson,
}

impl Arrivals {
    fn name(self) -> &'static str {
        match self {
            Arrivals::Periodic => "periodic",
            Arrivals::Poisson => "poisson",
        }
    }
}

/// The due times of an open-loop schedule, in ns after its start: fixed in advance (by the
/// index, or by the seed), so a late publish never moves the ones after it.
struct Schedule {
    rate: f64,
    /// splitmix64 state for Poisson gaps; `None` for a periodic schedule.
    poisson: Option<u64>,
    k: u64,
    at_ns: f64,
}

impl Schedule {
    fn new(arrivals: Arrivals, rate: f64, seed: u64) -> Self {
        Schedule {
            rate,
            poisson: (arrivals == Arrivals::Poisson).then_some(seed),
            k: 0,
            at_ns: 0.0,
        }
    }

    /// When the next publish is due (the first at 0).
    fn next_due(&mut self) -> u64 {
        let Some(state) = &mut self.poisson else {
            self.k += 1;
            return due_ns(self.k - 1, self.rate);
        };
        let due = self.at_ns;
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Uniform in (0, 1]: the logarithm stays finite.
        let u = ((z >> 11) + 1) as f64 / (1u64 << 53) as f64;
        self.at_ns += -u.ln() / self.rate * 1e9;
        due as u64
    }
}

/// Which stream a room's frames arrived on, as bits.
const ON_CONTROL: u8 = 1;
const ON_ROOM_STREAM: u8 = 2;

/// What the subscriber saw of one room.
struct RoomSeen {
    /// Events received (all phases).
    received: AtomicU64,
    /// Jumps in seq.
    gaps: AtomicU64,
    /// Next seq expected.
    next_seq: Mutex<Option<u64>>,
    /// [`ON_CONTROL`] / [`ON_ROOM_STREAM`] bits of the frames seen.
    channels: AtomicU8,
    /// Whether `Subscribed` arrived.
    subscribed: AtomicBool,
    /// Latencies in ns while measuring: [`FROM_SEND`], [`FROM_SCHEDULE`].
    latency: Mutex<[Histogram<u64>; 2]>,
}

impl RoomSeen {
    fn new() -> Self {
        RoomSeen {
            received: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            next_seq: Mutex::new(None),
            channels: AtomicU8::new(0),
            subscribed: AtomicBool::new(false),
            latency: Mutex::new([histogram(), histogram()]),
        }
    }

    fn channel_name(&self) -> &'static str {
        match self.channels.load(Ordering::Relaxed) {
            0 => "none",
            ON_CONTROL => "control",
            ON_ROOM_STREAM => "room-stream",
            _ => "mixed",
        }
    }

    fn summaries(&self) -> (Summary, Summary) {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        (Summary::of(&h[FROM_SEND]), Summary::of(&h[FROM_SCHEDULE]))
    }

    /// Percent of the measured deliveries (from the write) that took more than `base` plus
    /// each of [`LATE_MS`]; null without samples.
    fn late_pct(&self, base: Duration) -> Value {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = &h[FROM_SEND];
        let mut out = serde_json::Map::new();
        for extra in LATE_MS {
            let limit = (base + Duration::from_millis(extra)).as_nanos() as u64;
            let late = h.len() - h.count_between(0, limit);
            let pct = (!h.is_empty()).then(|| (late as f64 * 1e4 / h.len() as f64).round() / 100.0);
            out.insert(extra.to_string(), json!(pct));
        }
        Value::Object(out)
    }
}

/// Lateness thresholds (ms beyond the link's one-way delay) of `a_late_pct` / `b_late_pct`.
const LATE_MS: [u64; 3] = [5, 20, 50];

/// A run fails when no event arrives for this long while both publishers run (the session is
/// gone, or the link carries nothing).
const STALL: Duration = Duration::from_secs(3);

/// What the subscriber's stream readers report into.
struct Seen {
    phase: Phase,
    rooms: [RoomSeen; 2],
    /// Unidirectional streams the broker opened.
    uni_streams: AtomicU64,
    /// When the last event arrived ([`now_ns`]).
    last_event_ns: AtomicU64,
    /// The broker's `Close` or `Error` frames, or a reader's failure.
    trouble: Mutex<Vec<String>>,
}

impl Seen {
    fn trouble(&self, what: String) {
        self.trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }

    /// Handles one frame that arrived, completed by a read at `now` (ns).
    fn on_frame(&self, frame: &[u8], channel: u8, now: u64) {
        let frame = match ServerFrame::decode(frame, PayloadLimits::default()) {
            Ok(frame) => frame,
            Err(e) => return self.trouble(format!("undecodable frame: {e}")),
        };
        let room_of = |name: &str| match name {
            ROOM_A => Some(&self.rooms[0]),
            ROOM_B => Some(&self.rooms[1]),
            _ => None,
        };
        match frame {
            ServerFrame::Event(event) => {
                let Some(room) = room_of(event.room.as_str()) else {
                    return;
                };
                room.received.fetch_add(1, Ordering::Relaxed);
                room.channels.fetch_or(channel, Ordering::Relaxed);
                self.last_event_ns.fetch_max(now, Ordering::Relaxed);
                {
                    let mut next = room.next_seq.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(expected) = *next {
                        let gap = event.seq.saturating_sub(expected);
                        room.gaps.fetch_add(gap, Ordering::Relaxed);
                    }
                    *next = Some(event.seq + 1);
                }
                if self.phase.measuring() {
                    let data = event.data.as_bytes();
                    let sent = payload_stamp(data, 0).unwrap_or(now);
                    let due = payload_stamp(data, 1).unwrap_or(sent);
                    let mut h = room.latency.lock().unwrap_or_else(|e| e.into_inner());
                    h[FROM_SEND].saturating_record(now.saturating_sub(sent).max(1));
                    h[FROM_SCHEDULE].saturating_record(now.saturating_sub(due).max(1));
                }
            }
            ServerFrame::Subscribed { room, .. } => {
                if let Some(room) = room_of(room.as_str()) {
                    room.channels.fetch_or(channel, Ordering::Relaxed);
                    room.subscribed.store(true, Ordering::Relaxed);
                }
            }
            ServerFrame::Close { code, reason, .. } => {
                self.trouble(format!("broker closed the session: {code:?} ({reason})"));
            }
            ServerFrame::Error { code, message, .. } => {
                self.trouble(format!("broker error: {code:?} ({message})"));
            }
            _ => {}
        }
    }
}

/// Reads length-prefixed frames off `stream` until it ends, handing each to `seen`.
async fn read_frames(
    mut stream: RecvStream,
    mut splitter: FrameSplitter,
    channel: u8,
    seen: Arc<Seen>,
) {
    loop {
        // Frames already buffered (the control stream's reader starts after the Welcome).
        let now = now_ns();
        loop {
            match splitter.next_frame() {
                Ok(Some(frame)) => seen.on_frame(&frame, channel, now),
                Ok(None) => break,
                Err(e) => return seen.trouble(format!("stream framing: {e}")),
            }
        }
        match stream.read_buf(splitter.buffer(16 * 1024)).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                if !seen.phase.done() {
                    seen.trouble(format!("stream read: {e}"));
                }
                return;
            }
        }
    }
}

/// Accepts the broker's room streams and reads each on its own task.
async fn accept_room_streams(connection: Connection, max_frame: usize, seen: Arc<Seen>) {
    while let Ok(stream) = connection.accept_uni().await {
        seen.uni_streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(read_frames(
            stream,
            FrameSplitter::new(max_frame),
            ON_ROOM_STREAM,
            seen.clone(),
        ));
    }
}

/// A publisher thread's side of the run.
struct Publisher {
    published: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Publisher {
    fn new() -> Arc<Self> {
        Arc::new(Publisher {
            published: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        })
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Publishes `template` on the open-loop `schedule`, stamps [written, due] in the payload,
/// until told to stop; pings when a gap between publishes reaches `ping_every`.
fn publish_on_schedule(
    mut tcp: std::net::TcpStream,
    template: PublishTemplate,
    mut schedule: Schedule,
    ping_every: Duration,
    seed: u64,
    state: Arc<Publisher>,
) {
    let start = now_ns() + 1_000_000;
    let ping_ns = ping_every.as_nanos() as u64;
    let mut out = Vec::with_capacity(2048);
    let mut keys = MaskKeys::new(seed);
    let mut last_write = now_ns();
    let fail = |e: std::io::Error| {
        *state.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    };
    loop {
        if state.stop.load(Ordering::Relaxed) {
            return;
        }
        let due = start + schedule.next_due();
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
    }
}

/// Opens a WebSocket publisher session and starts its thread.
async fn start_publisher(
    url: &str,
    room: &str,
    schedule: Schedule,
    size: usize,
    seed: u64,
) -> anyhow::Result<Arc<Publisher>> {
    let template = PublishTemplate::new(room, EVENT, &payload(size, 0x2a))?;
    let (ws, welcome) = open_session(url, None).await?;
    let tcp = into_tcp(ws)?.into_std()?;
    tcp.set_nonblocking(false)?;
    let ping_every = Keepalive::for_session(0, 1, &welcome).every;
    let state = Publisher::new();
    let thread_state = state.clone();
    std::thread::Builder::new()
        .name(format!("publish-{room}"))
        .spawn(move || {
            publish_on_schedule(tcp, template, schedule, ping_every, seed, thread_state)
        })?;
    Ok(state)
}

/// The WebTransport subscriber: session through the relay, Hello/Welcome, readers on the
/// control stream and on every room stream, subscriptions to both rooms, keepalive pings.
/// Returns the connection and its endpoint (which must outlive it).
async fn start_subscriber(
    relay: SocketAddr,
    hash: [u8; 32],
    seen: Arc<Seen>,
) -> anyhow::Result<(
    Endpoint<wtransport::endpoint::endpoint_side::Client>,
    Connection,
)> {
    let endpoint = client_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), hash)?;
    let url = format!("https://{relay}/wt");
    let connection = endpoint
        .connect(&url)
        .await
        .with_context(|| format!("WebTransport session to {url}"))?;
    let (mut send, control, welcome) = hello(&connection).await?;
    let (recv, splitter) = control.into_parts();
    let max_frame = usize::try_from(welcome.max_frame_size)
        .unwrap_or(usize::MAX)
        .clamp(1024, 16 << 20);
    tokio::spawn(read_frames(recv, splitter, ON_CONTROL, seen.clone()));
    tokio::spawn(accept_room_streams(
        connection.clone(),
        max_frame,
        seen.clone(),
    ));
    for (id, room) in [(1, ROOM_A), (2, ROOM_B)] {
        let subscribe = ClientFrame::Subscribe {
            since: None,
            id,
            room: room.to_owned(),
        };
        send_frame(&mut send, &subscribe).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen
        .rooms
        .iter()
        .all(|r| r.subscribed.load(Ordering::Relaxed))
    {
        if let Some(t) = seen
            .trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
        {
            bail!("subscribing: {t}");
        }
        if Instant::now() > deadline {
            bail!("no Subscribed for both rooms within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let keepalive = Keepalive::for_session(0, 1, &welcome);
    tokio::spawn(async move {
        let mut pings = keepalive.interval();
        loop {
            pings.tick().await;
            if send_frame(&mut send, &ClientFrame::Ping { id: None })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok((endpoint, connection))
}

/// `{"5": 1.2, ...}` as `1.2 / 0.3 / 0 %`.
fn late_line(late: &Value) -> String {
    let parts: Vec<String> = LATE_MS
        .iter()
        .map(|ms| match late[ms.to_string()].as_f64() {
            Some(pct) => format!("{pct}"),
            None => "-".to_owned(),
        })
        .collect();
    format!("{} %", parts.join(" / "))
}

/// UDP `InErrors` and `RcvbufErrors` of the whole machine (/proc/net/snmp): datagrams the
/// kernel dropped on receive, on any socket. Not this run's alone.
fn udp_kernel_drops() -> Option<(u64, u64)> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some((get("InErrors")?, get("RcvbufErrors")?))
}

fn validate(args: &HolArgs) -> anyhow::Result<()> {
    for (name, rate) in [
        ("--heavy-rate", args.heavy_rate),
        ("--light-rate", args.light_rate),
    ] {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("{name} must be positive");
        }
    }
    for (name, size) in [
        ("--heavy-payload", args.heavy_payload),
        ("--light-payload", args.light_payload),
    ] {
        if size < min_payload(2) {
            bail!("{name} must be at least {} bytes", min_payload(2));
        }
    }
    if !(0.0..=1.0).contains(&args.loss) {
        bail!("--loss must be between 0 and 1");
    }
    if !(args.delay_ms >= 0.0 && args.delay_ms.is_finite()) {
        bail!("--delay-ms must be 0 or more");
    }
    Ok(())
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: HolArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let nodes = Nodes::new(&args.common.url, &[])?;
    let url = nodes.publisher().to_owned();
    let broker = broker_addr(&url).await?;
    let hash = fetch_cert_hash(broker).await?;
    let delay = Duration::from_secs_f64(args.delay_ms / 1e3);
    let relay = Relay::start(
        broker,
        LinkConfig {
            loss: args.loss,
            delay,
            queue_cap: args.relay_queue,
            seed: args.seed,
        },
    )?;
    eprintln!(
        "[hol] relay {} -> udp {broker}: loss {} each way, delay {} ms each way",
        relay.addr, args.loss, args.delay_ms
    );
    let seen = Arc::new(Seen {
        phase: Phase::default(),
        rooms: [RoomSeen::new(), RoomSeen::new()],
        uni_streams: AtomicU64::new(0),
        last_event_ns: AtomicU64::new(now_ns()),
        trouble: Mutex::new(Vec::new()),
    });
    let (_endpoint, connection) = start_subscriber(relay.addr, hash, seen.clone()).await?;
    eprintln!(
        "[hol] subscribed over WebTransport: {ROOM_A} on {}, {ROOM_B} on {}",
        seen.rooms[0].channel_name(),
        seen.rooms[1].channel_name()
    );
    let heavy = Schedule::new(Arrivals::Periodic, args.heavy_rate, 0);
    let heavy = start_publisher(&url, ROOM_A, heavy, args.heavy_payload, 1).await?;
    let light = Schedule::new(args.light_arrivals, args.light_rate, args.seed);
    let light = start_publisher(&url, ROOM_B, light, args.light_payload, 2).await?;
    let publishers = [&heavy, &light];

    let check = || -> anyhow::Result<()> {
        if let Some(t) = seen
            .trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
        {
            bail!("subscriber: {t}");
        }
        for (p, room) in publishers.iter().zip([ROOM_A, ROOM_B]) {
            if let Some(e) = p.error() {
                bail!("publisher of {room} failed: {e}");
            }
        }
        if let Some(reason) = connection.quic_connection().close_reason() {
            bail!("WebTransport session closed: {reason}");
        }
        let quiet = now_ns().saturating_sub(seen.last_event_ns.load(Ordering::Relaxed));
        if quiet > STALL.as_nanos() as u64 {
            bail!(
                "no event for {:.1} s: the session is stalled or gone",
                quiet as f64 / 1e9
            );
        }
        Ok(())
    };
    let received = |i: usize| seen.rooms[i].received.load(Ordering::Relaxed);
    let progress = |tickers: &mut [Ticker; 2], label: &str| {
        let (a, b) = (tickers[0].rate(received(0)), tickers[1].rate(received(1)));
        let (up, down) = (relay.up.snapshot(), relay.down.snapshot());
        eprintln!(
            "[hol] {label}: A {a:.0}/s B {b:.0}/s; relay dropped up {}/{} down {}/{} (queue full {}), rtt {:.1} ms",
            up.dropped(),
            up.received,
            down.dropped(),
            down.received,
            up.queue_full + down.queue_full,
            connection.rtt().as_secs_f64() * 1e3,
        );
    };
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let mut tickers = [Ticker::new(received(0)), Ticker::new(received(1))];
    while Instant::now() < warmup_end {
        tickers[0].tick(warmup_end).await;
        progress(&mut tickers, "warm-up");
        check()?;
    }

    let start = CpuMark::take(args.common.broker_pid);
    let relay_0 = (relay.up.snapshot(), relay.down.snapshot());
    let kernel_0 = udp_kernel_drops();
    let quic_0 = connection.quic_connection().stats();
    let published_0 = publishers.map(|p| p.published.load(Ordering::Relaxed));
    let received_0 = [received(0), received(1)];
    let gaps_0 = seen
        .rooms
        .each_ref()
        .map(|r| r.gaps.load(Ordering::Relaxed));
    seen.phase.start_measuring();
    let measure_start = Instant::now();
    let end = measure_start + Duration::from_secs_f64(args.duration);
    while Instant::now() < end {
        tickers[0].tick(end).await;
        let t = measure_start.elapsed().as_secs_f64();
        progress(&mut tickers, &format!("{t:.0}/{} s", args.duration));
        check()?;
    }
    seen.phase.finish();
    for p in publishers {
        p.stop.store(true, Ordering::Relaxed);
    }
    let stop = CpuMark::take(args.common.broker_pid);
    let quic = connection.quic_connection().stats();
    let kernel = udp_kernel_drops();
    let up = relay.up.snapshot().since(&relay_0.0);
    let down = relay.down.snapshot().since(&relay_0.1);
    let (up_total, down_total) = (relay.up.snapshot(), relay.down.snapshot());

    let elapsed = stop.secs_since(&start);
    let (broker_cpu, own_cpu) = stop.percent_since(&start);
    let published =
        [0, 1].map(|i| publishers[i].published.load(Ordering::Relaxed) - published_0[i]);
    let delivered = [0, 1].map(|i| received(i) - received_0[i]);
    let gaps = [0, 1].map(|i| seen.rooms[i].gaps.load(Ordering::Relaxed) - gaps_0[i]);
    let (a_lat, a_sched) = seen.rooms[0].summaries();
    let (b_lat, b_sched) = seen.rooms[1].summaries();
    let kernel_drops = match (kernel_0, kernel) {
        (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
        _ => None,
    };
    let streams = match (seen.rooms[0].channel_name(), seen.rooms[1].channel_name()) {
        ("room-stream", "room-stream") => "per-room",
        ("control", "control") => "single",
        _ => "mixed",
    };

    let mut table = format!(
        "hol wt: A {}/s x {} B, B {}/s x {} B; loss {} delay {} ms each way; streams {streams}\n",
        args.heavy_rate,
        args.heavy_payload,
        args.light_rate,
        args.light_payload,
        args.loss,
        args.delay_ms
    );
    for (name, (lat, sched), i) in [("A", (a_lat, a_sched), 0), ("B", (b_lat, b_sched), 1)] {
        table += &format!(
            "  {name} published/delivered {}/{} (gaps {}), on {}\n",
            published[i],
            delivered[i],
            gaps[i],
            seen.rooms[i].channel_name()
        );
        table += &format!("  {name} latency          {}\n", lat.line());
        table += &format!(
            "  {name} late by > 5/20/50 ms  {}\n",
            late_line(&seen.rooms[i].late_pct(delay))
        );
        table += &format!("  {name} from schedule    {}\n", sched.line());
    }
    let relay_line = |d: &DirectionCounts| {
        format!(
            "received {} lost {} queue-full {} send-failed {} ({:.2} %)",
            d.received,
            d.lost,
            d.queue_full,
            d.send_failed,
            d.drop_rate() * 100.0
        )
    };
    table += &format!("  relay up (to broker)   {}\n", relay_line(&up));
    table += &format!("  relay down (to client) {}\n", relay_line(&down));
    table += &format!(
        "  QUIC (client view)     rtt {:.1} ms, lost {} of {} sent, {} datagrams received\n",
        quic.path.rtt.as_secs_f64() * 1e3,
        quic.path.lost_packets - quic_0.path.lost_packets,
        quic.path.sent_packets - quic_0.path.sent_packets,
        quic.udp_rx.datagrams - quic_0.udp_rx.datagrams,
    );
    if let Some((in_errors, rcvbuf)) = kernel_drops {
        table += &format!("  kernel UDP drops       InErrors {in_errors} RcvbufErrors {rcvbuf}\n");
    }
    if let Some(cpu) = broker_cpu {
        table += &format!("  broker CPU             {cpu:.0} %\n");
    }
    if let Some(cpu) = own_cpu {
        table += &format!("  loadgen CPU            {cpu:.0} %\n");
    }

    let mut head = args.common.json_head("hol", &nodes);
    head.insert("transport".into(), json!("wt"));
    let figures = json!({
        "heavy_rate": args.heavy_rate, "heavy_payload": args.heavy_payload,
        "light_rate": args.light_rate, "light_payload": args.light_payload,
        "light_arrivals": args.light_arrivals.name(),
        "loss": args.loss, "delay_ms": args.delay_ms, "seed": args.seed,
        "relay_queue": args.relay_queue, "warmup_s": args.warmup, "duration_s": elapsed,
        "streams": streams, "a_channel": seen.rooms[0].channel_name(),
        "b_channel": seen.rooms[1].channel_name(),
        "uni_streams": seen.uni_streams.load(Ordering::Relaxed),
        "a_published": published[0], "a_delivered": delivered[0], "a_gaps": gaps[0],
        "b_published": published[1], "b_delivered": delivered[1], "b_gaps": gaps[1],
        "a_delivered_per_s": round1(delivered[0] as f64 / elapsed),
        "b_delivered_per_s": round1(delivered[1] as f64 / elapsed),
        "a_lat_ms": a_lat.json(), "a_lat_sched_ms": a_sched.json(),
        "b_lat_ms": b_lat.json(), "b_lat_sched_ms": b_sched.json(),
        "a_late_pct": seen.rooms[0].late_pct(delay), "b_late_pct": seen.rooms[1].late_pct(delay),
        "relay_up": up.json(), "relay_down": down.json(),
        "relay_dropped": up.dropped() + down.dropped(),
        "relay_dropped_total": up_total.dropped() + down_total.dropped(),
        "quic_rtt_ms": (quic.path.rtt.as_secs_f64() * 1e5).round() / 100.0,
        "quic_client_lost_packets": quic.path.lost_packets - quic_0.path.lost_packets,
        "quic_client_sent_packets": quic.path.sent_packets - quic_0.path.sent_packets,
        "quic_rx_datagrams": quic.udp_rx.datagrams - quic_0.udp_rx.datagrams,
        "kernel_udp_in_errors": kernel_drops.map(|k| k.0),
        "kernel_udp_rcvbuf_errors": kernel_drops.map(|k| k.1),
        "broker_cpu_pct": broker_cpu.map(round1), "loadgen_cpu_pct": own_cpu.map(round1),
    });
    args.common.report(head, figures, &table);
    connection.close(VarInt::from_u32(0), b"done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_fixed_in_advance() {
        let mut periodic = Schedule::new(Arrivals::Periodic, 100.0, 9);
        let dues: Vec<u64> = (0..3).map(|_| periodic.next_due()).collect();
        assert_eq!(dues, [0, 10_000_000, 20_000_000]);
        let run = |seed| {
            let mut s = Schedule::new(Arrivals::Poisson, 100.0, seed);
            (0..20_000).map(|_| s.next_due()).collect::<Vec<_>>()
        };
        let (a, b) = (run(3), run(3));
        assert_eq!(a, b);
        assert_ne!(a, run(4));
        assert_eq!(a[0], 0);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // Mean gap 10 ms: 20,000 gaps land within 3 % of 200 s.
        let last = *a.last().unwrap() as f64 / 1e9;
        assert!((last - 200.0).abs() < 6.0, "{last}");
    }

    #[test]
    fn late_shares_count_beyond_the_delay() {
        let room = RoomSeen::new();
        {
            let mut h = room.latency.lock().unwrap();
            // 10 ms one-way delay: 6 on time, 2 late by 10 ms, 1 by 30 ms, 1 by 100 ms.
            for ms in [10, 10, 10, 11, 12, 14, 20, 20, 40, 110] {
                h[FROM_SEND].record(ms * 1_000_000).unwrap();
            }
        }
        let late = room.late_pct(Duration::from_millis(10));
        assert_eq!(late["5"], json!(40.0));
        assert_eq!(late["20"], json!(20.0));
        assert_eq!(late["50"], json!(10.0));
        assert_eq!(late_line(&late), "40 / 20 / 10 %");
        assert!(RoomSeen::new().late_pct(Duration::ZERO)["5"].is_null());
    }
}
