//! `soak`: minutes of churn against one broker, reported interval by interval, to show whether
//! its memory and latency stay flat and whether anything breaks (not in CI: `scripts/soak`).
//!
//! **Sessions.** `--sessions` slots each run one subscriber session after another: connect,
//! subscribe to 1..=`--rooms-per-session` of the `--rooms` rooms (`soak:r<i>`, chosen
//! uniformly), stay a random `--stay-min`..`--stay-max` seconds (a share `--unsubscribe` of
//! them leaves one of its rooms half-way), then leave: with a clean close (WebSocket close
//! handshake) or, for a share `--abrupt`, by dropping the socket (half of those with a FIN,
//! half with a reset). A share `--resume` of the sessions that ended comes back after
//! 0..`--away-max` seconds with the same rooms and `since` set to the last position seen in
//! each (docs/PROTOCOL.md §6.3); the others start afresh at once.
//!
//! **Publishers.** `--publishers` sessions publish `--rate` events per second in total on an
//! open-loop schedule (each on its own OS thread, as in `latency`), the room of each publish
//! drawn from a Zipf law of exponent `--zipf` (room 0 hottest), so hot rooms overrun their
//! history between two sessions of a subscriber while cold ones do not: both outcomes of a
//! recovery occur. Each payload carries the time it was written (and the time it was due);
//! a delivery's latency is counted from the write.
//!
//! **Checks**, each an error (the run then exits non-zero): a session that cannot connect or
//! subscribe in time; an `Error` frame; a `Close` frame or an end of the connection the soak
//! did not cause (counted apart as unexpected closes); per session and room, an event whose
//! `seq` is not above the last one seen (duplicate or out of order) or skips numbers (a gap:
//! on a single node `seq` grows by exactly 1); an event before `Subscribed` or after
//! `Unsubscribed`; a recovery with `recovered: true` whose position is not `since`; a
//! recovery refused (`recovered: false`) although the events missed (the room's current
//! `seq` − `since.seq`, same epoch) fit in `--history` events, the broker's
//! `--history-events`. Replayed events are counted, not timed (they are older than the
//! subscription). At the end, once every soak session is closed, the broker's own gauges
//! (`/metrics` on the same port) must count no subscription and only the publishers'
//! sessions, and none once they are closed too (a leak otherwise).
//!
//! **Failing loudly.** The run aborts with an error when the broker process is gone, a
//! publisher's connection breaks or stops moving, or for 30 s no event was delivered or no
//! session connected; every network step has a timeout, so nothing waits forever.
//!
//! **Output.** Every `--interval` seconds one line on stderr: elapsed time, sessions open,
//! connects/s, publishes/s, deliveries/s, latency p50/p99/p99.9/max over the interval (HDR
//! histogram), the broker's RSS and open descriptors (from /proc with `--broker-pid`), its CPU,
//! recoveries (recovered/not), and the running counts of errors and unexpected closes. At the
//! end a table of every interval and a summary; with `--json` one line holding the summary
//! and `intervals`, one object per interval.

use std::{
    io::{Read, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use roomcast_protocol::{ClientFrame, PayloadLimits, Position, ServerFrame};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
    task::JoinSet,
    time::{sleep, sleep_until, timeout},
};
use tokio_tungstenite::{
    MaybeTlsStream,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        protocol::frame::coding::{Control, Data, OpCode},
    },
};

use crate::{
    common::{
        CommonArgs, MaskKeys, PublishTemplate, Socket, Transport, cpu_seconds, into_tcp,
        min_payload, next_ws_frame, open_session, payload, payload_stamp, rss_bytes,
        wait_until_due,
    },
    measure::{CpuMark, Summary, due_ns, histogram, jitter_ns, now_ns, round1},
    timed::Keepalive,
};

/// Arguments of `roomcast-bench soak`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Fails (exit 1) when any error or unexpected close was counted, and aborts \
early when the broker is gone or stops serving. Assumes a single node (no gaps in seq) whose \
rooms keep --history events (the broker's --history-events, default 256)."
)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Seconds of churn.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Seconds between two progress lines (and rows of the final table).
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Subscriber slots, each running one session after another.
    #[arg(long, default_value_t = 500)]
    sessions: usize,
    /// Rooms (`soak:r0` ...).
    #[arg(long, default_value_t = 50)]
    rooms: usize,
    /// Each session subscribes to 1..=N rooms.
    #[arg(long, default_value_t = 3)]
    rooms_per_session: usize,
    /// Publishes per second, all publishers together (open loop).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Publisher sessions, each on its own thread with an equal share of --rate.
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Zipf exponent of the rooms' share of the publishes (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Payload size in bytes; at least 17 (two time stamps).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Shortest stay of a session, seconds.
    #[arg(long, default_value_t = 1.0)]
    stay_min: f64,
    /// Longest stay of a session, seconds.
    #[arg(long, default_value_t = 20.0)]
    stay_max: f64,
    /// Share of ended sessions that reconnect with `since` (the others start afresh).
    #[arg(long, default_value_t = 0.5)]
    resume: f64,
    /// Longest time away before such a reconnect, seconds.
    #[arg(long, default_value_t = 5.0)]
    away_max: f64,
    /// Share of disconnects that drop the socket (half FIN, half reset) instead of closing.
    #[arg(long, default_value_t = 0.5)]
    abrupt: f64,
    /// Share of sessions (with two rooms or more) that unsubscribe from one room mid-stay.
    #[arg(long, default_value_t = 0.2)]
    unsubscribe: f64,
    /// Events of history per room (the broker's --history-events): a recovery over fewer
    /// missed events must succeed.
    #[arg(long, default_value_t = 256)]
    history: u64,
    /// Seed of the run's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const EVENT: &str = "tick";
/// Connect, WebSocket handshake and Hello/Welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// From `Subscribe` (or `Unsubscribe`) to its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a session's socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// From our WebSocket close to the end of the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// For every slot to finish its session once the run is over.
const FINISH_TIMEOUT: Duration = Duration::from_secs(20);
/// Without a delivery or a connect this long (or `--stay-max` + `--away-max` + 10 s if
/// longer), abort.
const STALL: Duration = Duration::from_secs(30);
/// Without a publish written this long, abort.
const PUBLISH_STALL: Duration = Duration::from_secs(10);
/// Error messages kept (and printed as they happen).
const KEEP_ERRORS: usize = 20;

/// xorshift64*: the soak's random choices, reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(jitter_ns(seed, u64::MAX) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n ≥ 1).
    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.max(1) - 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform between `lo` and `hi` seconds.
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64((lo + (hi - lo).max(0.0) * self.unit()).max(0.0))
    }
}

/// Rooms drawn with probability ∝ 1 / (i + 1)^s.
struct RoomPicker {
    cumulative: Vec<f64>,
}

impl RoomPicker {
    fn new(rooms: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..rooms)
            .map(|i| {
                total += 1.0 / ((i + 1) as f64).powf(s);
                total
            })
            .collect();
        RoomPicker { cumulative }
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = rng.unit() * total;
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.cumulative.len() - 1)
    }

    /// Room `i`'s share of the publishes.
    fn share(&self, i: usize) -> f64 {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let below = if i == 0 { 0.0 } else { self.cumulative[i - 1] };
        (self.cumulative[i] - below) / total
    }
}

/// What went wrong, by kind; every kind counts as an error.
#[derive(Default)]
struct Errors {
    /// Connect, WebSocket handshake or Hello/Welcome failed or timed out.
    connect: AtomicU64,
    /// A `Subscribe` or `Unsubscribe` got no reply in time, or a write to a session failed.
    request: AtomicU64,
    /// `Close` frames, and connections that ended without one, that the soak did not cause.
    unexpected_close: AtomicU64,
    /// `Error` frames.
    error_frame: AtomicU64,
    /// Events whose seq was not above the last one seen in their room (duplicate or out of
    /// order).
    seq_repeat: AtomicU64,
    /// Events whose seq skipped numbers (events lost).
    seq_gap: AtomicU64,
    /// Recoveries refused although the gap was within the history, or `recovered: true` with a
    /// position other than `since`.
    recovery: AtomicU64,
    /// Frames that break the protocol (undecodable, unexpected, event before `Subscribed` or
    /// after `Unsubscribed`, changed epoch).
    protocol: AtomicU64,
    /// Our clean close did not end the connection in time.
    close_timeout: AtomicU64,
    /// A publisher's `Error` frame.
    publisher: AtomicU64,
    /// Slots still busy when the run was over, or broker gauges not back to zero.
    finish: AtomicU64,
    /// The first messages, with the time they happened.
    first: Mutex<Vec<String>>,
}

impl Errors {
    fn kinds(&self) -> [(&'static str, &AtomicU64); 11] {
        [
            ("connect", &self.connect),
            ("request", &self.request),
            ("unexpected_close", &self.unexpected_close),
            ("error_frame", &self.error_frame),
            ("seq_repeat", &self.seq_repeat),
            ("seq_gap", &self.seq_gap),
            ("recovery", &self.recovery),
            ("protocol", &self.protocol),
            ("close_timeout", &self.close_timeout),
            ("publisher", &self.publisher),
            ("finish", &self.finish),
        ]
    }

    /// Errors of every kind but unexpected closes.
    fn errors(&self) -> u64 {
        self.kinds()
            .iter()
            .filter(|(name, _)| *name != "unexpected_close")
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }

    fn closes(&self) -> u64 {
        self.unexpected_close.load(Ordering::Relaxed)
    }
}

/// Counters of the run (cumulative; the reporter takes differences).
#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    open: AtomicU64,
    clean_closes: AtomicU64,
    fin_drops: AtomicU64,
    reset_drops: AtomicU64,
    unsubscribes: AtomicU64,
    /// Events received, replays included.
    deliveries: AtomicU64,
    /// Events received that were published before their subscription (replays).
    replayed: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    /// Publishes written.
    published: AtomicU64,
    /// Largest publisher lateness (write − due) since the reporter last took it, ns.
    lag_max: AtomicU64,
}

/// Everything the tasks of a run share.
struct Soak {
    args: SoakArgs,
    url: String,
    rooms: Vec<String>,
    started: Instant,
    counters: Counters,
    errors: Errors,
    /// Latency (ns) of the live deliveries of the current interval.
    latency: Mutex<Histogram<u64>>,
    /// Set when the run is over: sessions closing now are not failures.
    stopping: AtomicBool,
    /// Why the run must stop at once (a publisher broke).
    fatal: Mutex<Option<String>>,
}

impl Soak {
    /// Counts an error of `kind` and keeps (and prints) its message if among the first.
    fn error(&self, kind: &AtomicU64, message: impl FnOnce() -> String) {
        kind.fetch_add(1, Ordering::Relaxed);
        let mut first = self.errors.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.len() < KEEP_ERRORS {
            let line = format!(
                "{:.1} s: {}",
                self.started.elapsed().as_secs_f64(),
                message()
            );
            eprintln!("[soak] error at {line}");
            first.push(line);
        }
    }

    fn fatal(&self, why: String) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        fatal.get_or_insert(why);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// One room of a session.
struct Sub {
    room: usize,
    /// Request id of the `Subscribe` (index + 1).
    id: u64,
    since: Option<Position>,
    /// When the `Subscribe` was written (ns): events stamped earlier are replays.
    sent_ns: u64,
    /// Last position seen (from `Subscribed`, then each `Event`).
    held: Option<Position>,
    state: SubState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// `Subscribe` sent, no `Subscribed` yet.
    Pending,
    Live,
    /// `Unsubscribe` with this id sent, no `Unsubscribed` yet.
    Leaving(u64),
    Left,
}

/// What a received message means for the session.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Go,
    /// The connection ended (expected or not, already counted).
    Ended,
}

/// How a session leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// WebSocket close handshake.
    Clean,
    /// Drop the socket: FIN without a close handshake.
    Fin,
    /// Drop the socket with SO_LINGER 0: a reset.
    Reset,
}

/// How a session ended.
enum Ended {
    /// We left; the positions to resume from (rooms with history still subscribed).
    Left(Vec<(usize, Position)>),
    /// It failed (already counted).
    Failed,
}

struct Session<'a> {
    soak: &'a Soak,
    subs: Vec<Sub>,
    /// Set once we closed: the end of the connection is expected.
    closing: bool,
}

impl Session<'_> {
    fn on_message(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Flow {
        let soak = self.soak;
        let errors = &soak.errors;
        match msg {
            Some(Ok(Message::Binary(bytes))) => {
                match ServerFrame::decode(&bytes, PayloadLimits::default()) {
                    Ok(frame) => self.on_frame(frame),
                    Err(e) => {
                        soak.error(&errors.protocol, || format!("undecodable frame: {e}"));
                        Flow::Go
                    }
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Flow::Go,
            Some(Ok(Message::Text(_))) => {
                soak.error(&errors.protocol, || "text message".into());
                Flow::Go
            }
            Some(Ok(Message::Close(frame))) => {
                if !self.closing && !soak.stopping() {
                    soak.error(&errors.unexpected_close, || {
                        format!("WebSocket close without a Close frame: {frame:?}")
                    });
                }
                Flow::Ended
            }
            Some(Err(e)) => {
                if !self.closing && !soak.stopping() {
                    soak.error(&errors.unexpected_close, || {
                        format!("connection failed without a Close frame: {e}")
                    });
                }
                Flow::Ended
            }
            None => {
                if !self.closing && !soak.stopping() {
                    soak.error(&errors.unexpected_close, || {
                        "connection ended without a Close frame".into()
                    });
                }
                Flow::Ended
            }
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) -> Flow {
        let soak = self.soak;
        let (errors, counters) = (&soak.errors, &soak.counters);
        match frame {
            ServerFrame::Subscribed {
                id,
                room,
                seq,
                epoch,
                recovered,
            } => {
                let Some(sub) = self
                    .subs
                    .iter_mut()
                    .find(|s| s.id == id && s.state == SubState::Pending)
                else {
                    soak.error(&errors.protocol, || {
                        format!("unexpected Subscribed id {id}")
                    });
                    return Flow::Go;
                };
                if room.as_str() != soak.rooms[sub.room] {
                    soak.error(&errors.protocol, || {
                        format!(
                            "Subscribed id {id} names {room}, not {}",
                            soak.rooms[sub.room]
                        )
                    });
                }
                let at = Position { epoch, seq };
                match (sub.since, recovered) {
                    (None, None) => {}
                    (Some(since), Some(true)) => {
                        counters.recovered.fetch_add(1, Ordering::Relaxed);
                        if at != since {
                            soak.error(&errors.recovery, || {
                                format!("{room}: recovered from {since:?} but Subscribed at {at:?}")
                            });
                        }
                    }
                    (Some(since), Some(false)) => {
                        counters.not_recovered.fetch_add(1, Ordering::Relaxed);
                        let missed = seq.checked_sub(since.seq);
                        if epoch == since.epoch && missed.is_some_and(|m| m <= soak.args.history) {
                            soak.error(&errors.recovery, || {
                                format!(
                                    "{room}: recovery refused from {since:?} to {at:?}: {} missed events fit the history of {}",
                                    missed.unwrap_or(0),
                                    soak.args.history
                                )
                            });
                        }
                    }
                    (since, recovered) => soak.error(&errors.protocol, || {
                        format!(
                            "{room}: Subscribed with recovered {recovered:?} for since {since:?}"
                        )
                    }),
                }
                sub.held = Some(at);
                sub.state = SubState::Live;
                Flow::Go
            }
            ServerFrame::Event(event) => {
                let now = now_ns();
                let Some(sub) = self
                    .subs
                    .iter_mut()
                    .find(|s| soak.rooms[s.room] == event.room.as_str())
                else {
                    soak.error(&errors.protocol, || {
                        format!("event of {}, a room not subscribed", event.room)
                    });
                    return Flow::Go;
                };
                counters.deliveries.fetch_add(1, Ordering::Relaxed);
                let held = match (sub.state, sub.held) {
                    (SubState::Live | SubState::Leaving(_), Some(held)) => held,
                    (state, _) => {
                        soak.error(&errors.protocol, || {
                            format!("{}: event seq {} while {state:?}", event.room, event.seq)
                        });
                        return Flow::Go;
                    }
                };
                let mut held_epoch = held.epoch;
                if let Some(epoch) = event.epoch
                    && epoch != held.epoch
                {
                    soak.error(&errors.protocol, || {
                        format!(
                            "{}: epoch changed from {} to {epoch} at seq {}",
                            event.room, held.epoch, event.seq
                        )
                    });
                    held_epoch = epoch;
                } else if event.seq <= held.seq {
                    soak.error(&errors.seq_repeat, || {
                        format!(
                            "{}: seq {} after {} (duplicate or out of order)",
                            event.room, event.seq, held.seq
                        )
                    });
                    return Flow::Go;
                } else if event.seq > held.seq + 1 {
                    soak.error(&errors.seq_gap, || {
                        format!(
                            "{}: seq {} after {}: {} events missing",
                            event.room,
                            event.seq,
                            held.seq,
                            event.seq - held.seq - 1
                        )
                    });
                }
                sub.held = Some(Position {
                    epoch: held_epoch,
                    seq: event.seq,
                });
                let stamp = payload_stamp(event.data.as_bytes(), 0).unwrap_or(now);
                if sub.since.is_some() && stamp < sub.sent_ns {
                    counters.replayed.fetch_add(1, Ordering::Relaxed);
                } else {
                    let mut h = soak.latency.lock().unwrap_or_else(|e| e.into_inner());
                    h.saturating_record(now.saturating_sub(stamp).max(1));
                }
                Flow::Go
            }
            ServerFrame::Unsubscribed { id, room } => {
                match self
                    .subs
                    .iter_mut()
                    .find(|s| s.state == SubState::Leaving(id))
                {
                    Some(sub) if soak.rooms[sub.room] == room.as_str() => {
                        sub.state = SubState::Left
                    }
                    _ => soak.error(&errors.protocol, || {
                        format!("unexpected Unsubscribed id {id} for {room}")
                    }),
                }
                Flow::Go
            }
            ServerFrame::Pong { .. } => Flow::Go,
            ServerFrame::Error {
                id, code, message, ..
            } => {
                soak.error(&errors.error_frame, || {
                    format!("Error {code:?} (id {id:?}): {message}")
                });
                Flow::Go
            }
            ServerFrame::Close { code, reason, .. } => {
                if !soak.stopping() {
                    soak.error(&errors.unexpected_close, || {
                        format!("Close {code:?}: {reason}")
                    });
                }
                Flow::Ended
            }
            other => {
                soak.error(&errors.protocol, || format!("unexpected frame {other:?}"));
                Flow::Go
            }
        }
    }

    /// Whether a `Subscribe` or `Unsubscribe` awaits its reply.
    fn awaiting(&self) -> bool {
        self.subs
            .iter()
            .any(|s| matches!(s.state, SubState::Pending | SubState::Leaving(_)))
    }

    /// Where to resume from: the rooms still held, with history.
    fn positions(&self) -> Vec<(usize, Position)> {
        self.subs
            .iter()
            .filter(|s| matches!(s.state, SubState::Live | SubState::Leaving(_)))
            .filter_map(|s| s.held.filter(|p| p.epoch != 0).map(|p| (s.room, p)))
            .collect()
    }
}

/// Writes `frame` on the session, within [`SEND_TIMEOUT`]; false (counted) when it failed.
async fn send(soak: &Soak, ws: &mut Socket, frame: &ClientFrame) -> bool {
    match timeout(SEND_TIMEOUT, ws.send(Message::Binary(frame.encode()))).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            if !soak.stopping() {
                soak.error(&soak.errors.unexpected_close, || {
                    format!("write failed: {e}")
                });
            }
            false
        }
        Err(_) => {
            soak.error(&soak.errors.request, || "write timed out".into());
            false
        }
    }
}

/// Decrements the open-session gauge when the session is gone.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One session: connect, subscribe to `rooms` (with `since` where given), stay, leave.
async fn run_session(
    soak: &Soak,
    rng: &mut Rng,
    rooms: Vec<(usize, Option<Position>)>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let errors = &soak.errors;
    let (mut ws, welcome) = match timeout(CONNECT_TIMEOUT, open_session(&soak.url, None)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            if !soak.stopping() {
                soak.error(&errors.connect, || format!("connect: {e:#}"));
            }
            return Ended::Failed;
        }
        Err(_) => {
            soak.error(&errors.connect, || "connect timed out".into());
            return Ended::Failed;
        }
    };
    soak.counters.connects.fetch_add(1, Ordering::Relaxed);
    soak.counters.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&soak.counters.open);
    let mut session = Session {
        soak,
        subs: Vec::with_capacity(rooms.len()),
        closing: false,
    };
    for (i, (room, since)) in rooms.into_iter().enumerate() {
        let sub = Sub {
            room,
            id: i as u64 + 1,
            since,
            sent_ns: now_ns(),
            held: None,
            state: SubState::Pending,
        };
        let frame = ClientFrame::Subscribe {
            id: sub.id,
            room: soak.rooms[room].clone(),
            since,
        };
        session.subs.push(sub);
        if !send(soak, &mut ws, &frame).await {
            return Ended::Failed;
        }
    }

    let start = tokio::time::Instant::now();
    let stay = rng.secs(soak.args.stay_min, soak.args.stay_max);
    let leave_at = start + stay;
    let mut unsubscribe =
        (session.subs.len() > 1 && rng.chance(soak.args.unsubscribe)).then(|| {
            (
                start + stay.mul_f64(rng.unit()),
                rng.below(session.subs.len()),
            )
        });
    let mut reply_by = start + REPLY_TIMEOUT;
    let mut pings = Keepalive::for_session(0, 1, &welcome).interval();
    let mut stopped = false;
    loop {
        let unsubscribe_at = unsubscribe.map_or(leave_at, |(at, _)| at);
        tokio::select! {
            _ = stop.changed() => {
                stopped = true;
                break;
            }
            _ = sleep_until(leave_at) => break,
            _ = sleep_until(unsubscribe_at), if unsubscribe.is_some() => {
                let Some((_, i)) = unsubscribe.take() else { continue };
                let sub = &mut session.subs[i];
                if sub.state != SubState::Live {
                    continue;
                }
                let id = 100 + sub.id;
                sub.state = SubState::Leaving(id);
                let frame = ClientFrame::Unsubscribe { id, room: soak.rooms[sub.room].clone() };
                soak.counters.unsubscribes.fetch_add(1, Ordering::Relaxed);
                reply_by = tokio::time::Instant::now() + REPLY_TIMEOUT;
                if !send(soak, &mut ws, &frame).await {
                    return Ended::Failed;
                }
            }
            _ = sleep_until(reply_by), if session.awaiting() => {
                soak.error(&errors.request, || {
                    let names: Vec<_> = session.subs.iter()
                        .filter(|s| s.state != SubState::Live && s.state != SubState::Left)
                        .map(|s| format!("{} {:?}", soak.rooms[s.room], s.state))
                        .collect();
                    format!("no reply within {} s: {}", REPLY_TIMEOUT.as_secs(), names.join(", "))
                });
                return Ended::Failed;
            }
            _ = pings.tick() => {
                if !send(soak, &mut ws, &ClientFrame::Ping { id: None }).await {
                    return Ended::Failed;
                }
            }
            msg = ws.next() => {
                if session.on_message(msg) == Flow::Ended {
                    return Ended::Failed;
                }
            }
        }
    }

    let leave = if stopped || soak.stopping() || !rng.chance(soak.args.abrupt) {
        Leave::Clean
    } else if rng.chance(0.5) {
        Leave::Fin
    } else {
        Leave::Reset
    };
    match leave {
        Leave::Clean => {
            session.closing = true;
            let closed = timeout(CLOSE_TIMEOUT, async {
                if ws.close(None).await.is_err() {
                    return;
                }
                while session.on_message(ws.next().await) == Flow::Go {}
            })
            .await;
            if closed.is_err() {
                soak.error(&errors.close_timeout, || {
                    format!("clean close not finished in {} s", CLOSE_TIMEOUT.as_secs())
                });
            }
            soak.counters.clean_closes.fetch_add(1, Ordering::Relaxed);
        }
        Leave::Fin => {
            drop(ws);
            soak.counters.fin_drops.fetch_add(1, Ordering::Relaxed);
        }
        Leave::Reset => {
            if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                let _ = tcp.set_zero_linger();
            }
            drop(ws);
            soak.counters.reset_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Positions as of the moment we left (events read while closing included): what a real
    // client would hold.
    Ended::Left(session.positions())
}

/// A slot: one session after another until the run is over.
async fn slot(soak: Arc<Soak>, index: usize, mut stop: watch::Receiver<bool>) {
    let args = &soak.args;
    let mut rng = Rng::new(args.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
    // Spread the first connects over two seconds.
    let mut pause = rng.secs(0.0, 2.0);
    let mut resume: Option<Vec<(usize, Position)>> = None;
    loop {
        tokio::select! {
            _ = sleep(pause) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let rooms = match resume.take() {
            Some(positions) => positions.into_iter().map(|(r, p)| (r, Some(p))).collect(),
            None => {
                let n = 1 + rng.below(args.rooms_per_session.min(args.rooms));
                let mut rooms: Vec<(usize, Option<Position>)> = Vec::with_capacity(n);
                while rooms.len() < n {
                    let r = rng.below(args.rooms);
                    if !rooms.iter().any(|&(x, _)| x == r) {
                        rooms.push((r, None));
                    }
                }
                rooms
            }
        };
        pause = match run_session(&soak, &mut rng, rooms, &mut stop).await {
            Ended::Left(positions) if !positions.is_empty() && rng.chance(args.resume) => {
                resume = Some(positions);
                rng.secs(0.0, args.away_max)
            }
            Ended::Left(_) => Duration::ZERO,
            Ended::Failed => Duration::from_secs(1),
        };
    }
}

/// A publisher's thread: `rate` publishes per second on an open-loop schedule, rooms by Zipf.
struct PublisherPlan {
    index: usize,
    rate: f64,
    ping_every: Duration,
    templates: Arc<Vec<PublishTemplate>>,
    picker: Arc<RoomPicker>,
}

fn publish_loop(mut tcp: std::net::TcpStream, plan: PublisherPlan, soak: Arc<Soak>) {
    let period = (1e9 / plan.rate) as u64;
    let start = now_ns() + 1_000_000 + jitter_ns(plan.index as u64, period);
    let ping_ns = plan.ping_every.as_nanos() as u64;
    let mut out = Vec::with_capacity(256);
    let mut keys = MaskKeys::new(plan.index as u64 + 1);
    let mut rng = Rng::new(soak.args.seed ^ (0xabcd_0000 + plan.index as u64));
    let mut last_write = now_ns();
    for k in 0.. {
        if soak.stopping() {
            return;
        }
        let due = start + due_ns(k, plan.rate);
        if let Err(e) = wait_until_due(&mut tcp, due, ping_ns, &mut last_write) {
            return soak.fatal(format!("publisher {}: {e}", plan.index));
        }
        let sent = now_ns();
        out.clear();
        let room = plan.picker.pick(&mut rng);
        plan.templates[room].put(&mut out, &[sent, due], keys.next_key());
        if let Err(e) = tcp.write_all(&out) {
            if !soak.stopping() {
                soak.fatal(format!("publisher {}: write failed: {e}", plan.index));
            }
            return;
        }
        last_write = sent;
        soak.counters.published.fetch_add(1, Ordering::Relaxed);
        soak.counters
            .lag_max
            .fetch_max(sent.saturating_sub(due), Ordering::Relaxed);
    }
}

/// A publisher's reader thread: the broker sends it only `Pong`s, unless something is wrong.
fn publisher_reader(mut tcp: std::net::TcpStream, index: usize, soak: Arc<Soak>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tcp.read(&mut chunk) {
            Ok(0) | Err(_) => {
                if !soak.stopping() {
                    soak.fatal(format!(
                        "publisher {index}: the broker closed its connection"
                    ));
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some((opcode, payload)) = next_ws_frame(&buf) {
            if opcode == OpCode::Data(Data::Binary) {
                match ServerFrame::decode(&buf[payload.clone()], PayloadLimits::default()) {
                    Ok(ServerFrame::Pong { .. }) => {}
                    Ok(ServerFrame::Close { code, reason, .. }) if !soak.stopping() => {
                        soak.fatal(format!("publisher {index}: Close {code:?}: {reason}"));
                    }
                    Ok(frame) if !soak.stopping() => soak.error(&soak.errors.publisher, || {
                        format!("publisher {index}: {frame:?}")
                    }),
                    Err(e) => soak.error(&soak.errors.publisher, || {
                        format!("publisher {index}: undecodable frame: {e}")
                    }),
                    Ok(_) => {}
                }
            } else if opcode == OpCode::Control(Control::Close) && !soak.stopping() {
                soak.fatal(format!("publisher {index}: WebSocket close"));
            }
            buf.drain(..payload.end);
        }
    }
}

/// The broker's own gauges, from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct Gauges {
    sessions: u64,
    subscriptions: u64,
    rooms: u64,
    history_bytes: u64,
}

impl Gauges {
    fn json(&self) -> Value {
        json!({
            "sessions": self.sessions, "subscriptions": self.subscriptions,
            "rooms": self.rooms, "history_bytes": self.history_bytes,
        })
    }
}

/// `host:port` of a `ws://` URL, for `/metrics` on the same port.
fn http_addr(url: &str) -> Option<String> {
    let request = url.into_client_request().ok()?;
    let uri = request.uri();
    Some(format!("{}:{}", uri.host()?, uri.port_u16().unwrap_or(80)))
}

/// Reads the broker's gauges (None when `/metrics` cannot be read within two seconds).
async fn scrape(addr: &str) -> Option<Gauges> {
    let body = timeout(Duration::from_secs(2), async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut body = String::new();
        tcp.read_to_string(&mut body).await.ok()?;
        Some(body)
    })
    .await
    .ok()??;
    if !body.starts_with("HTTP/1.") || !body.contains(" 200 ") {
        return None;
    }
    let mut g = Gauges::default();
    for line in body.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value as u64;
        if name.starts_with("roomcast_sessions{") || name == "roomcast_sessions" {
            g.sessions += value;
        } else if name == "roomcast_subscriptions" {
            g.subscriptions = value;
        } else if name == "roomcast_rooms" {
            g.rooms = value;
        } else if name == "roomcast_history_bytes" {
            g.history_bytes = value;
        }
    }
    Some(g)
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// One row of the report.
struct Row {
    /// End of the interval, seconds since the start.
    t: f64,
    secs: f64,
    open: u64,
    connects_per_s: f64,
    publishes_per_s: f64,
    deliveries_per_s: f64,
    replayed: u64,
    recovered: u64,
    not_recovered: u64,
    lat: Summary,
    lag_max_ms: f64,
    rss: Option<u64>,
    fds: Option<u64>,
    cpu_pct: Option<f64>,
    gauges: Option<Gauges>,
    /// Cumulative.
    errors: u64,
    /// Cumulative.
    closes: u64,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "t_s": round1(self.t), "secs": round1(self.secs), "open": self.open,
            "connects_per_s": round1(self.connects_per_s),
            "publishes_per_s": round1(self.publishes_per_s),
            "deliveries_per_s": self.deliveries_per_s.round(),
            "replayed": self.replayed, "recovered": self.recovered,
            "not_recovered": self.not_recovered, "lat_ms": self.lat.json(),
            "send_lag_max_ms": (self.lag_max_ms * 1e3).round() / 1e3,
            "broker_rss": self.rss, "broker_fds": self.fds,
            "broker_cpu_pct": self.cpu_pct.map(round1),
            "broker": self.gauges.map(|g| g.json()),
            "errors": self.errors, "unexpected_closes": self.closes,
        })
    }

    fn line(&self, duration: f64) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "{:>5.0}/{duration:.0} s  open {:>4}  conn/s {:>5.1}  pub/s {:>5.0}  deliv/s {:>6.0}  \
             lat p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms  rss {} MiB  fds {}  cpu {} %  \
             rec {}/{}  err {}  closes {}",
            self.t,
            self.open,
            self.connects_per_s,
            self.publishes_per_s,
            self.deliveries_per_s,
            self.lat.p50,
            self.lat.p99,
            self.lat.p999,
            self.lat.max,
            opt(self.rss.map(|r| format!("{:.1}", mib(r)))),
            opt(self.fds.map(|f| f.to_string())),
            opt(self.cpu_pct.map(|c| format!("{c:.0}"))),
            self.recovered,
            self.not_recovered,
            self.errors,
            self.closes,
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Cumulative values at the start of an interval.
struct Mark {
    at: Instant,
    connects: u64,
    published: u64,
    deliveries: u64,
    replayed: u64,
    recovered: u64,
    not_recovered: u64,
    cpu: Option<f64>,
}

impl Mark {
    fn take(soak: &Soak) -> Self {
        let c = &soak.counters;
        Mark {
            at: Instant::now(),
            connects: c.connects.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            deliveries: c.deliveries.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            recovered: c.recovered.load(Ordering::Relaxed),
            not_recovered: c.not_recovered.load(Ordering::Relaxed),
            cpu: soak.args.common.broker_pid.and_then(cpu_seconds),
        }
    }
}

/// Closes the interval that started at `from`: its row, and its latencies added to `total`.
async fn close_interval(
    soak: &Soak,
    from: &Mark,
    total: &mut Histogram<u64>,
    metrics: Option<&str>,
) -> Row {
    let to = Mark::take(soak);
    let secs = to.at.duration_since(from.at).as_secs_f64().max(1e-9);
    let h = {
        let mut current = soak.latency.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, histogram())
    };
    total.add(&h).expect("same bounds");
    let pid = soak.args.common.broker_pid;
    let gauges = match metrics {
        Some(addr) => scrape(addr).await,
        None => None,
    };
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    Row {
        t: soak.started.elapsed().as_secs_f64(),
        secs,
        open: soak.counters.open.load(Ordering::Relaxed),
        connects_per_s: per_s(from.connects, to.connects),
        publishes_per_s: per_s(from.published, to.published),
        deliveries_per_s: per_s(from.deliveries, to.deliveries),
        replayed: to.replayed - from.replayed,
        recovered: to.recovered - from.recovered,
        not_recovered: to.not_recovered - from.not_recovered,
        lat: Summary::of(&h),
        lag_max_ms: soak.counters.lag_max.swap(0, Ordering::Relaxed) as f64 / 1e6,
        rss: pid.and_then(rss_bytes),
        fds: pid.and_then(fd_count),
        cpu_pct: match (from.cpu, to.cpu) {
            (Some(a), Some(b)) => Some((b - a) / secs * 100.0),
            _ => None,
        },
        gauges,
        errors: soak.errors.errors(),
        closes: soak.errors.closes(),
    }
}

/// Least-squares slope of `(t, y)` in y per second.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (t, y)| {
        (num + (t - mt) * (y - my), den + (t - mt) * (t - mt))
    });
    (den > 0.0).then(|| num / den)
}

/// Polls the broker's gauges until `ok` holds or five seconds pass; the last reading.
async fn settle(addr: &str, ok: impl Fn(&Gauges) -> bool) -> Option<Gauges> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let g = scrape(addr).await;
        if g.as_ref().is_some_and(&ok) || Instant::now() >= deadline {
            return g;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let nodes = args.common.nodes(&[Transport::Ws])?;
    if nodes.all().len() > 1 || args.common.publisher_url.is_some() {
        bail!("soak runs against one broker (it checks single-node seq numbering)");
    }
    if !(args.duration > 0.0 && args.interval > 0.0) {
        bail!("--duration and --interval must be positive");
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) || args.publishers == 0 {
        bail!("--rate must be positive and --publishers at least 1");
    }
    if args.sessions == 0 || args.rooms == 0 || args.rooms_per_session == 0 {
        bail!("--sessions, --rooms and --rooms-per-session must be at least 1");
    }
    if args.stay_min < 0.0 || args.stay_max < args.stay_min || args.away_max < 0.0 {
        bail!("need 0 <= --stay-min <= --stay-max and --away-max >= 0");
    }
    if args.payload < min_payload(2) {
        bail!("--payload must be at least {} bytes", min_payload(2));
    }
    let url = nodes.subscriber(0).to_owned();
    let metrics_addr = http_addr(&url);
    let rooms: Vec<String> = (0..args.rooms).map(|i| format!("soak:r{i}")).collect();
    let data = payload(args.payload, 0x2a);
    let templates = Arc::new(
        rooms
            .iter()
            .map(|room| PublishTemplate::new(room, EVENT, &data))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let picker = Arc::new(RoomPicker::new(args.rooms, args.zipf));
    let pid = args.common.broker_pid;
    let soak = Arc::new(Soak {
        url,
        rooms,
        started: Instant::now(),
        counters: Counters::default(),
        errors: Errors::default(),
        latency: Mutex::new(histogram()),
        stopping: AtomicBool::new(false),
        fatal: Mutex::new(None),
        args,
    });
    let args = &soak.args;
    eprintln!(
        "[soak] {} s: {} session slots over {} rooms (1-{} each, stay {}-{} s, resume {:.0} %, \
         abrupt {:.0} %), {} publishers at {}/s in total (hottest room {:.0} %), broker pid {}",
        args.duration,
        args.sessions,
        args.rooms,
        args.rooms_per_session,
        args.stay_min,
        args.stay_max,
        args.resume * 100.0,
        args.abrupt * 100.0,
        args.publishers,
        args.rate,
        picker.share(0) * 100.0,
        pid.map_or("unknown".into(), |p| p.to_string()),
    );

    // Publishers first, so that the rooms have traffic when the subscribers arrive.
    let mut publisher_sockets = Vec::new();
    for index in 0..args.publishers {
        let (ws, welcome) = timeout(CONNECT_TIMEOUT, open_session(nodes.publisher(), None))
            .await
            .context("publisher connect timed out")?
            .with_context(|| format!("publisher {index}"))?;
        let tcp = into_tcp(ws)?.into_std()?;
        tcp.set_nonblocking(false)?;
        let reader = tcp.try_clone()?;
        publisher_sockets.push(tcp.try_clone()?);
        let plan = PublisherPlan {
            index,
            rate: args.rate / args.publishers as f64,
            ping_every: Keepalive::for_session(0, 1, &welcome).every,
            templates: templates.clone(),
            picker: picker.clone(),
        };
        let s = soak.clone();
        std::thread::Builder::new()
            .name(format!("publisher-{index}"))
            .spawn(move || publish_loop(tcp, plan, s))?;
        let s = soak.clone();
        std::thread::Builder::new()
            .name(format!("publisher-{index}-reader"))
            .spawn(move || publisher_reader(reader, index, s))?;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut slots = JoinSet::new();
    for index in 0..args.sessions {
        slots.spawn(slot(soak.clone(), index, stop_rx.clone()));
    }

    let end = soak.started + Duration::from_secs_f64(args.duration);
    let every = Duration::from_secs_f64(args.interval);
    let mut rows: Vec<Row> = Vec::new();
    let mut total = histogram();
    let mut mark = Mark::take(&soak);
    let cpu_start = CpuMark::take(pid);
    let mut next_report = soak.started + every;
    let mut tick = tokio::time::Instant::from_std(soak.started);
    let (mut last_delivery, mut last_publish, mut last_connect) =
        (Instant::now(), Instant::now(), Instant::now());
    let (mut deliveries, mut published, mut connects) = (0, 0, 0);
    // Sessions stay at most stay_max and come back within away_max: a healthy run connects
    // and delivers well within this.
    let stall = STALL.max(Duration::from_secs_f64(
        args.stay_max + args.away_max + 10.0,
    ));
    let abort = loop {
        tick += Duration::from_secs(1);
        sleep_until(tick.min(tokio::time::Instant::from_std(end))).await;
        let now = Instant::now();
        let c = &soak.counters;
        let d = c.deliveries.load(Ordering::Relaxed);
        if d != deliveries {
            (deliveries, last_delivery) = (d, now);
        }
        let p = c.published.load(Ordering::Relaxed);
        if p != published {
            (published, last_publish) = (p, now);
        }
        let n = c.connects.load(Ordering::Relaxed);
        if n != connects {
            (connects, last_connect) = (n, now);
        }
        let fatal = soak.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let abort = if let Some(why) = fatal {
            Some(why)
        } else if pid.is_some_and(|p| rss_bytes(p).is_none()) {
            Some(format!("the broker process {} is gone", pid.unwrap_or(0)))
        } else if now.duration_since(last_publish) >= PUBLISH_STALL {
            Some(format!(
                "no publish written for {} s: the broker stopped reading",
                PUBLISH_STALL.as_secs()
            ))
        } else if now.duration_since(last_delivery) >= stall {
            Some(format!(
                "no event delivered for {:.0} s ({} sessions open)",
                stall.as_secs_f64(),
                c.open.load(Ordering::Relaxed)
            ))
        } else if now.duration_since(last_connect) >= stall {
            Some(format!(
                "no session connected for {:.0} s",
                stall.as_secs_f64()
            ))
        } else {
            None
        };
        if abort.is_some() {
            break abort;
        }
        if now + Duration::from_millis(500) >= next_report || now >= end {
            let row = close_interval(&soak, &mark, &mut total, metrics_addr.as_deref()).await;
            eprintln!("[soak] {}", row.line(args.duration));
            rows.push(row);
            mark = Mark::take(&soak);
            next_report += every;
        }
        if now >= end {
            break None;
        }
    };

    let cpu_end = CpuMark::take(pid);
    // Wind down: every slot closes its session cleanly (not waited for when aborting: the
    // process exits with the sessions as they are).
    soak.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    if let Some(why) = abort {
        bail!(
            "soak aborted after {:.0} s: {why} ({} errors, {} unexpected closes so far)",
            soak.started.elapsed().as_secs_f64(),
            soak.errors.errors(),
            soak.errors.closes()
        );
    }
    let finished = timeout(FINISH_TIMEOUT, async {
        while slots.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        soak.error(&soak.errors.finish, || {
            format!(
                "{} sessions still open {} s after the end",
                slots.len(),
                FINISH_TIMEOUT.as_secs()
            )
        });
        slots.abort_all();
    }
    // Leak check: with only the publishers connected, the broker should count just them.
    let publishers = args.publishers as u64;
    let (during, after) = match &metrics_addr {
        Some(addr) => {
            let during = settle(addr, |g| g.sessions == publishers && g.subscriptions == 0).await;
            for tcp in &publisher_sockets {
                let _ = tcp.shutdown(std::net::Shutdown::Both);
            }
            let after = settle(addr, |g| g.sessions == 0 && g.subscriptions == 0).await;
            (during, after)
        }
        None => (None, None),
    };
    let leak = |when: &str, g: Option<Gauges>, sessions: u64| match g {
        Some(g) if g.sessions != sessions || g.subscriptions != 0 => {
            soak.error(&soak.errors.finish, || {
                format!(
                    "{when}: the broker counts {} sessions (expected {sessions}) and {} subscriptions (expected 0)",
                    g.sessions, g.subscriptions
                )
            });
        }
        _ => {}
    };
    leak("soak sessions closed", during, publishers);
    leak("publishers closed too", after, 0);

    let end = Final {
        during,
        after,
        rss_after: pid.and_then(rss_bytes),
        fds_after: pid.and_then(fd_count),
        cpu: cpu_end.percent_since(&cpu_start),
    };
    report(&soak, &nodes, &rows, &total, &end);
    let (errors, closes) = (soak.errors.errors(), soak.errors.closes());
    if errors + closes > 0 {
        bail!("soak failed: {errors} errors, {closes} unexpected closes");
    }
    Ok(())
}

/// What the broker looks like once the run is over.
#[derive(Clone, Copy)]
struct Final {
    /// Gauges with only the publishers connected.
    during: Option<Gauges>,
    /// Gauges once the publishers closed too.
    after: Option<Gauges>,
    rss_after: Option<u64>,
    fds_after: Option<u64>,
    /// Broker and generator CPU over the run, percent of one core.
    cpu: (Option<f64>, Option<f64>),
}

/// The final table (every interval, then totals) and the JSON line.
fn report(
    soak: &Soak,
    nodes: &crate::common::Nodes,
    rows: &[Row],
    total: &Histogram<u64>,
    end: &Final,
) {
    let args = &soak.args;
    let Final {
        during,
        after,
        rss_after,
        fds_after,
        cpu: (broker_cpu, own_cpu),
    } = *end;
    let c = &soak.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let elapsed = rows.last().map_or(0.0, |r| r.t);
    let lat = Summary::of(total);
    let rss: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.t, r.rss? as f64)))
        .collect();
    // Memory trend after the first minute (ramp-up and allocator warm-up excluded).
    let settled: Vec<(f64, f64)> = rss.iter().copied().filter(|(t, _)| *t > 60.0).collect();
    let rss_slope = slope(if settled.len() >= 2 { &settled } else { &rss });
    let rss_max = rss.iter().map(|&(_, r)| r as u64).max();
    let fmt_mib = |v: Option<u64>| v.map_or("-".into(), |b| format!("{:.1} MiB", mib(b)));

    let mut table = format!(
        "soak {}: {:.0} s, {} slots, {} rooms (1-{} per session), {}/s by {} publishers, \
         payload {} B, stay {}-{} s, resume {}, abrupt {}\n",
        args.common.transport.name(),
        args.duration,
        args.sessions,
        args.rooms,
        args.rooms_per_session,
        args.rate,
        args.publishers,
        args.payload,
        args.stay_min,
        args.stay_max,
        args.resume,
        args.abrupt,
    );
    table += "      t  open  conn/s  pub/s  deliv/s   p50 ms   p99 ms p99.9 ms   max ms  rss MiB   fds  cpu %  rec/not  err  closes\n";
    for r in rows {
        table += &format!(
            "  {:>5.0} {:>5} {:>7.1} {:>6.0} {:>8.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>5} {:>6} {:>8} {:>4} {:>7}\n",
            r.t,
            r.open,
            r.connects_per_s,
            r.publishes_per_s,
            r.deliveries_per_s,
            r.lat.p50,
            r.lat.p99,
            r.lat.p999,
            r.lat.max,
            r.rss.map_or("-".into(), |b| format!("{:.1}", mib(b))),
            r.fds.map_or("-".into(), |f| f.to_string()),
            r.cpu_pct.map_or("-".into(), |c| format!("{c:.0}")),
            format!("{}/{}", r.recovered, r.not_recovered),
            r.errors,
            r.closes,
        );
    }
    table += &format!(
        "  sessions           {} connects; left {} clean, {} FIN, {} reset; {} unsubscribes\n",
        load(&c.connects),
        load(&c.clean_closes),
        load(&c.fin_drops),
        load(&c.reset_drops),
        load(&c.unsubscribes)
    );
    table += &format!(
        "  recoveries         {} recovered, {} not (gap beyond the history), {} events replayed\n",
        load(&c.recovered),
        load(&c.not_recovered),
        load(&c.replayed)
    );
    table += &format!(
        "  traffic            {} published, {} delivered\n",
        load(&c.published),
        load(&c.deliveries)
    );
    table += &format!("  latency            {}\n", lat.line());
    table += &format!(
        "  broker RSS         first {}, last {}, max {}, after the end {}; trend {}{}\n",
        fmt_mib(rss.first().map(|&(_, r)| r as u64)),
        fmt_mib(rss.last().map(|&(_, r)| r as u64)),
        fmt_mib(rss_max),
        fmt_mib(rss_after),
        rss_slope.map_or("-".into(), |s| format!("{:+.1} KiB/min", s * 60.0 / 1024.0)),
        if settled.len() >= 2 {
            " after the first minute"
        } else {
            ""
        },
    );
    table += &format!(
        "  broker fds         first {}, last {}, after the end {}\n",
        rows.first()
            .and_then(|r| r.fds)
            .map_or("-".into(), |f| f.to_string()),
        rows.last()
            .and_then(|r| r.fds)
            .map_or("-".into(), |f| f.to_string()),
        fds_after.map_or("-".into(), |f| f.to_string()),
    );
    table += &format!(
        "  CPU                broker {}, generator {} (of one core, whole run)\n",
        broker_cpu.map_or("-".into(), |c| format!("{c:.0} %")),
        own_cpu.map_or("-".into(), |c| format!("{c:.0} %")),
    );
    let gauge_line = |g: Option<Gauges>| {
        g.map_or("-".into(), |g| {
            format!(
                "{} sessions, {} subscriptions, {} rooms, {} B history",
                g.sessions, g.subscriptions, g.rooms, g.history_bytes
            )
        })
    };
    table += &format!(
        "  broker gauges      publishers only: {}; none: {}\n",
        gauge_line(during),
        gauge_line(after)
    );
    let by_kind: Vec<String> = soak
        .errors
        .kinds()
        .iter()
        .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
        .map(|(k, n)| format!("{k} {}", n.load(Ordering::Relaxed)))
        .collect();
    table += &format!(
        "  errors             {} errors, {} unexpected closes{}\n",
        soak.errors.errors(),
        soak.errors.closes(),
        if by_kind.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_kind.join(", "))
        }
    );
    let first = soak
        .errors
        .first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for e in &first {
        table += &format!("    {e}\n");
    }

    let head = args.common.json_head("soak", nodes);
    let kinds: serde_json::Map<String, Value> = soak
        .errors
        .kinds()
        .iter()
        .map(|(k, n)| ((*k).to_owned(), json!(n.load(Ordering::Relaxed))))
        .collect();
    let figures = json!({
        "duration_s": round1(elapsed), "interval_s": args.interval, "sessions": args.sessions,
        "rooms": args.rooms, "rooms_per_session": args.rooms_per_session, "rate": args.rate,
        "publishers": args.publishers, "payload": args.payload, "stay_min_s": args.stay_min,
        "stay_max_s": args.stay_max, "resume": args.resume, "away_max_s": args.away_max,
        "abrupt": args.abrupt, "unsubscribe": args.unsubscribe, "history": args.history,
        "zipf": args.zipf, "seed": args.seed,
    });
    let results = json!({
        "connects": load(&c.connects), "clean_closes": load(&c.clean_closes),
        "fin_drops": load(&c.fin_drops), "reset_drops": load(&c.reset_drops),
        "unsubscribes": load(&c.unsubscribes), "published": load(&c.published),
        "delivered": load(&c.deliveries), "replayed": load(&c.replayed),
        "recovered": load(&c.recovered), "not_recovered": load(&c.not_recovered),
        "lat_ms": lat.json(),
        "broker_rss_first": rss.first().map(|&(_, r)| r as u64),
        "broker_rss_last": rss.last().map(|&(_, r)| r as u64),
        "broker_rss_max": rss_max, "broker_rss_after": rss_after,
        "broker_rss_slope_per_min": rss_slope.map(|s| (s * 60.0).round()),
        "broker_fds_after": fds_after,
        "broker_cpu_pct": broker_cpu.map(round1), "loadgen_cpu_pct": own_cpu.map(round1),
        "broker_publishers_only": during.map(|g| g.json()),
        "broker_after": after.map(|g| g.json()),
        "errors": soak.errors.errors(), "unexpected_closes": soak.errors.closes(),
        "error_kinds": kinds, "first_errors": first,
        "intervals": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    let mut figures = figures;
    if let (Value::Object(f), Value::Object(r)) = (&mut figures, results) {
        f.extend(r);
    }
    args.common.report(head, figures, &table);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_picks_follow_the_shares() {
        let picker = RoomPicker::new(10, 1.0);
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[picker.pick(&mut rng)] += 1;
        }
        for (i, &n) in counts.iter().enumerate() {
            let expected = picker.share(i) * 100_000.0;
            assert!(
                (n as f64 - expected).abs() < expected * 0.1 + 50.0,
                "{counts:?}"
            );
        }
        assert!(counts[0] > counts[9] * 5);
        let uniform = RoomPicker::new(4, 0.0);
        assert!((uniform.share(3) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn rng_ranges() {
        let mut rng = Rng::new(9);
        for _ in 0..10_000 {
            assert!(rng.below(7) < 7);
            let d = rng.secs(1.0, 20.0);
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(20));
        }
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn slope_of_a_line() {
        let points: Vec<(f64, f64)> = (0..10).map(|t| (t as f64, 3.0 * t as f64 + 7.0)).collect();
        assert!((slope(&points).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(slope(&points[..1]), None);
    }

    #[test]
    fn metrics_address_from_the_url() {
        assert_eq!(
            http_addr("ws://127.0.0.1:4433/ws").as_deref(),
            Some("127.0.0.1:4433")
        );
    }
}
