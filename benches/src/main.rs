//! `roomcast-bench`: load generator for a running broker.
//!
//! Scenario so far: `fanout` — N subscribers in one room and one closed-loop publisher that
//! keeps at most `--window` publishes not yet received by every subscriber (the same loop as
//! `../shared/limit-ref`, so figures compare side by side). The other scenarios (latency,
//! connections, publishers, WebTransport) come with the performance issue.
//!
//! Subscribers are raw WebSocket connections that read only each event's `seq`, so the
//! generator stays cheaper than the broker.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use roomcast_protocol::{ClientFrame, PROTOCOL_VERSION, PayloadLimits, ServerFrame};
use tokio::sync::Notify;
use tokio_tungstenite::{connect_async_with_config, tungstenite::Message};

#[derive(Parser)]
#[command(about = "Load generator for a running roomcast broker")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers in one room, one closed-loop publisher.
    Fanout(FanoutArgs),
}

#[derive(clap::Args)]
struct FanoutArgs {
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

/// Counters read when the measurement window opens.
struct Mark {
    at: Instant,
    delivered: u64,
    reads: u64,
    done: u64,
    broker_cpu: Option<f64>,
    own_cpu: Option<f64>,
}

/// Slots tracking how many subscribers got each in-flight seq.
const RING: usize = 4096;

struct Progress {
    subs: u32,
    counts: Vec<AtomicU32>,
    /// Publishes received by every subscriber.
    done: AtomicU64,
    /// Deliveries counted by all subscribers.
    delivered: AtomicU64,
    /// Socket reads by all subscribers (frames per read shows the broker's write batching).
    reads: AtomicU64,
    done_notify: Notify,
}

/// The `seq` of an `Event` frame, read without decoding the rest (names and data are skipped).
fn event_seq(frame: &[u8]) -> Option<u64> {
    use ciborium_ll::{Decoder, Header};
    let mut d = Decoder::from(frame);
    let Ok(Header::Map(Some(n))) = d.pull() else {
        return None;
    };
    let mut scratch = [0u8; 512];
    let mut is_event = false;
    for _ in 0..n {
        let Ok(Header::Positive(key)) = d.pull() else {
            return None;
        };
        match d.pull().ok()? {
            Header::Positive(v) if key == 0 => is_event = v == 19,
            Header::Positive(v) if key == 5 => return is_event.then_some(v),
            Header::Text(len) => {
                let mut s = d.text(len);
                while let Some(mut seg) = s.pull().ok()? {
                    while seg.pull(&mut scratch).ok()?.is_some() {}
                }
            }
            Header::Bytes(len) => {
                let mut s = d.bytes(len);
                while let Some(mut seg) = s.pull().ok()? {
                    while seg.pull(&mut scratch).ok()?.is_some() {}
                }
            }
            _ => {}
        }
    }
    None
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_session(url: &str) -> anyhow::Result<Socket> {
    let (mut ws, _) = connect_async_with_config(url, None, true)
        .await
        .context("connect")?;
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: None,
    };
    ws.send(Message::Binary(hello.encode())).await?;
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => match ServerFrame::decode(&b, PayloadLimits::default())? {
            ServerFrame::Welcome(_) => Ok(ws),
            other => bail!("expected Welcome, got {other:?}"),
        },
        other => bail!("expected Welcome, got {other:?}"),
    }
}

async fn subscriber(url: String, room: String) -> anyhow::Result<Socket> {
    let mut ws = open_session(&url).await?;
    let subscribe = ClientFrame::Subscribe { id: 1, room };
    ws.send(Message::Binary(subscribe.encode())).await?;
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => match ServerFrame::decode(&b, PayloadLimits::default())? {
            ServerFrame::Subscribed { .. } => {}
            other => bail!("expected Subscribed, got {other:?}"),
        },
        other => bail!("expected Subscribed, got {other:?}"),
    }
    Ok(ws)
}

/// Reads events straight off the TCP socket (after the WebSocket handshake and the
/// Subscribed reply went through tungstenite): many frames per read, headers parsed with
/// tungstenite's `FrameHeader`, only `seq` looked at.
async fn read_events(ws: Socket, progress: Arc<Progress>) {
    use std::io::Cursor;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::protocol::frame::{
        FrameHeader,
        coding::{Data, OpCode},
    };
    let tokio_tungstenite::MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
        return;
    };
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    let mut local = 0u64;
    let mut reads = 0u64;
    loop {
        match tcp.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        reads += 1;
        if reads % 64 == 0 {
            progress.reads.fetch_add(64, Ordering::Relaxed);
        }
        loop {
            let mut cursor = Cursor::new(&buf[..]);
            let Ok(Some((header, len))) = FrameHeader::parse(&mut cursor) else {
                break;
            };
            let start = cursor.position() as usize;
            let end = start + len as usize;
            if buf.len() < end {
                break;
            }
            if header.opcode == OpCode::Data(Data::Binary) {
                if let Some(seq) = event_seq(&buf[start..end]) {
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
                }
            }
            bytes::Buf::advance(&mut buf, end);
        }
        if buf.capacity() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
    }
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A payload of exactly `size` bytes: a CBOR byte string with its head.
fn payload(size: usize) -> Bytes {
    let mut out = Vec::with_capacity(size);
    let body = match size {
        0 => return Bytes::from_static(&[0xf6]),
        1..=24 => {
            out.push(0x40 | (size - 1) as u8);
            size - 1
        }
        25..=257 => {
            out.extend_from_slice(&[0x58, (size - 2) as u8]);
            size - 2
        }
        _ => {
            out.push(0x59);
            out.extend_from_slice(&((size - 3) as u16).to_be_bytes());
            size - 3
        }
    };
    out.resize(out.len() + body, 0x2a);
    Bytes::from(out)
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    if args.window == 0 || args.window as usize >= RING {
        bail!("--window must be between 1 and {}", RING - 1);
    }
    let room = "bench:fanout".to_owned();
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
    let limit = Arc::new(tokio::sync::Semaphore::new(100));
    for _ in 0..args.subs {
        let (url, room, limit) = (args.url.clone(), room.clone(), limit.clone());
        joins.spawn(async move {
            let _permit = limit.acquire().await;
            subscriber(url, room).await
        });
    }
    let mut sockets = Vec::new();
    while let Some(joined) = joins.join_next().await {
        sockets.push(joined??);
    }
    let connect_s = started.elapsed().as_secs_f64();
    for ws in sockets {
        tokio::spawn(read_events(ws, progress.clone()));
    }

    let mut publisher = open_session(&args.url).await?;
    let data = payload(args.payload);
    let total = Duration::from_secs_f64(args.warmup + args.duration);
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = Instant::now() + total;
    let mut published = 0u64;
    let mut marks: Option<Mark> = None;
    let mut batch = Vec::new();
    while Instant::now() < end {
        let done = progress.done.load(Ordering::Acquire);
        let room_left = args.window.saturating_sub(published - done);
        if room_left == 0 {
            let _ =
                tokio::time::timeout(Duration::from_millis(100), progress.done_notify.notified())
                    .await;
            continue;
        }
        for _ in 0..room_left {
            batch.push(Message::Binary(
                ClientFrame::Publish {
                    id: 0,
                    room: room.clone(),
                    event: "tick".into(),
                    data: data.clone(),
                    ack: false,
                }
                .encode(),
            ));
        }
        published += room_left;
        for m in batch.drain(..) {
            publisher.feed(m).await?;
        }
        publisher.flush().await?;
        if marks.is_none() && Instant::now() >= warmup_end {
            marks = Some(Mark {
                at: Instant::now(),
                delivered: progress.delivered.load(Ordering::Relaxed),
                reads: progress.reads.load(Ordering::Relaxed),
                done: progress.done.load(Ordering::Relaxed),
                broker_cpu: args.broker_pid.and_then(cpu_seconds),
                own_cpu: cpu_seconds(std::process::id()),
            });
        }
    }
    let Some(Mark {
        at: t0,
        delivered: delivered0,
        reads: reads0,
        done: done0,
        broker_cpu: cpu0,
        own_cpu: self_cpu0,
    }) = marks
    else {
        bail!("no measurement window")
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let delivered_n = progress.delivered.load(Ordering::Relaxed) - delivered0;
    let reads_n = (progress.reads.load(Ordering::Relaxed) - reads0).max(1);
    let frames_per_read = delivered_n as f64 / reads_n as f64;
    let delivered = delivered_n as f64 / elapsed;
    let publishes = (progress.done.load(Ordering::Relaxed) - done0) as f64 / elapsed;
    let cpu = match (args.broker_pid.and_then(cpu_seconds), cpu0) {
        (Some(c1), Some(c0)) => Some((c1 - c0) / elapsed * 100.0),
        _ => None,
    };
    let rss = args.broker_pid.and_then(rss_bytes);
    let self_cpu = match (cpu_seconds(std::process::id()), self_cpu0) {
        (Some(c1), Some(c0)) => Some((c1 - c0) / elapsed * 100.0),
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "fanout", "transport": "ws", "subs": args.subs,
                "payload": args.payload, "window": args.window, "duration_s": elapsed,
                "connect_s": connect_s, "delivered_per_s": delivered.round(),
                "publish_per_s": publishes.round(), "broker_cpu_pct": cpu, "broker_rss": rss,
                "loadgen_cpu_pct": self_cpu, "frames_per_read": frames_per_read,
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
        if let Some(cpu) = cpu {
            println!("  broker CPU       {cpu:.0} %");
        }
        if let Some(cpu) = self_cpu {
            println!("  loadgen CPU      {cpu:.0} %");
        }
        if let Some(rss) = rss {
            println!(
                "  broker RSS       {:.1} MiB",
                rss as f64 / (1 << 20) as f64
            );
        }
    }
    std::process::exit(0);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Fanout(args) => fanout(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_protocol::{EventName, Payload, RoomName, frame::encode_event};

    #[test]
    fn reads_seq_of_event_frames_only() {
        let room = RoomName::new("bench:fanout").unwrap();
        let event = EventName::new("tick").unwrap();
        let data = Payload::new(payload(100), PayloadLimits::default()).unwrap();
        assert_eq!(data.len(), 100);
        for seq in [1, 23, 24, 70_000, u64::MAX] {
            assert_eq!(
                event_seq(&encode_event(&room, &event, &data, seq)),
                Some(seq)
            );
        }
        let ack = ServerFrame::Ack {
            id: 1,
            seq: Some(5),
        }
        .encode();
        assert_eq!(event_seq(&ack), None);
    }

    #[test]
    fn payload_sizes_are_exact_and_valid() {
        for size in [0usize, 1, 24, 25, 100, 257, 258, 4000] {
            let p = payload(size);
            assert_eq!(p.len(), size.max(1));
            Payload::new(p, PayloadLimits::default()).unwrap();
        }
    }
}
