//! A flooding neighbour for `latency --flooders N`: a session that publishes into the measured
//! room as fast as its socket takes it (no `ack`, small payloads under another event name),
//! gets `rate_limited` once its buckets are empty and `Close policy_violation` once its error
//! budget is spent, then reconnects at once and starts over — for as long as the run lasts.
//! What the broker's limits let through reaches the room's subscribers; what they refuse
//! costs the broker a check each. Connection refusals (per-address caps) are counted and
//! retried after a millisecond. With a token (`--flood-token`) every session of the flooder is
//! the same user, so the broker's per-user publish budget follows it across reconnects;
//! without, its client address's budget does (when the broker applies per-address caps to
//! loopback).

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Buf, BytesMut};
use roomcast_protocol::{Code, PayloadLimits, ServerFrame};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::tcp::OwnedReadHalf,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::common::{
    MaskKeys, PublishTemplate, hello_frame, into_tcp, next_ws_frame, open_session_with, payload,
};

/// The flood's event name: as long as the measured one, so the subscribers' event layout
/// tells the two apart by name.
pub(crate) const FLOOD_EVENT: &str = "junk";

/// Publishes per write system call.
const BATCH: usize = 64;

/// What the flooders did, all of them together.
#[derive(Debug, Default)]
pub(crate) struct FloodStats {
    /// Sessions opened (each ends with its close).
    pub(crate) sessions: AtomicU64,
    /// Session requests the broker refused (per-address or global caps).
    pub(crate) refused: AtomicU64,
    /// Publishes written into the socket. Most land in the socket buffers of sessions the
    /// broker has closed already and are never read: the broker reads a session's input only
    /// until its `Close` (plus a linger that ends when the flooder drops the connection).
    pub(crate) written: AtomicU64,
    /// `Error rate_limited` received.
    pub(crate) rate_limited: AtomicU64,
    /// Other `Error`s received.
    pub(crate) other_errors: AtomicU64,
    /// `Close policy_violation` received.
    pub(crate) policy_closes: AtomicU64,
    /// Sessions that ended otherwise (another close code, the connection dropped).
    pub(crate) other_ends: AtomicU64,
}

impl FloodStats {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> [u64; 7] {
        [
            &self.sessions,
            &self.refused,
            &self.written,
            &self.rate_limited,
            &self.other_errors,
            &self.policy_closes,
            &self.other_ends,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// The counters' growth from `before` to `now` (snapshots), per second over `secs`, as
    /// JSON.
    pub(crate) fn json(before: [u64; 7], now: [u64; 7], secs: f64) -> Value {
        let per_s = |i: usize| ((now[i] - before[i]) as f64 / secs).round();
        json!({
            "sessions_per_s": per_s(0), "refused_per_s": per_s(1), "written_per_s": per_s(2),
            "rate_limited_per_s": per_s(3), "other_errors_per_s": per_s(4),
            "policy_closes_per_s": per_s(5), "other_ends_per_s": per_s(6),
        })
    }

    /// One table line of the growth from `before` to `now`.
    pub(crate) fn line(before: [u64; 7], now: [u64; 7], secs: f64) -> String {
        let per_s = |i: usize| (now[i] - before[i]) as f64 / secs;
        format!(
            "{:.0} sessions/s ({:.0} refused/s), {:.0} publishes/s written, {:.0} rate_limited/s, \
             {:.0} policy_violation closes/s, {:.0} other errors/s, {:.0} other ends/s",
            per_s(0),
            per_s(1),
            per_s(2),
            per_s(3),
            per_s(5),
            per_s(4),
            per_s(6)
        )
    }
}

/// Floods `room` through sessions at `url` (from `source` when given; each sending `token` in
/// `Hello` when given, else the run's) until `stop` is set.
pub(crate) async fn flooder(
    url: String,
    source: Option<Ipv4Addr>,
    token: Option<String>,
    room: &'static str,
    stats: Arc<FloodStats>,
    stop: Arc<AtomicBool>,
) {
    let template = match PublishTemplate::new(room, FLOOD_EVENT, &payload(16, 0x55)) {
        Ok(template) => template,
        Err(e) => {
            eprintln!("[flood] {e}");
            return;
        }
    };
    let mut keys = MaskKeys::new(7);
    let mut batch = Vec::new();
    for _ in 0..BATCH {
        template.put(&mut batch, &[], keys.next_key());
    }
    let batch: Arc<[u8]> = batch.into();
    while !stop.load(Ordering::Relaxed) {
        let hello = match &token {
            Some(token) => roomcast_protocol::ClientFrame::Hello {
                version: roomcast_protocol::PROTOCOL_VERSION,
                token: Some(token.clone()),
            },
            None => hello_frame(),
        };
        let opened = open_session_with(&url, source, hello).await;
        let tcp = match opened.and_then(|(ws, _)| into_tcp(ws)) {
            Ok(tcp) => tcp,
            Err(_) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        let (read, mut write) = tcp.into_split();
        let writer = {
            let (batch, stats, stop) = (batch.clone(), stats.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if write.write_all(&batch).await.is_err() {
                        return;
                    }
                    stats.written.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
            })
        };
        read_until_closed(read, &stats, &stop).await;
        writer.abort();
    }
}

/// Reads the flooder's session until its `Close` (or the connection's end), counting errors.
async fn read_until_closed(mut read: OwnedReadHalf, stats: &FloodStats, stop: &AtomicBool) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let read_once = tokio::time::timeout(Duration::from_millis(200), read.read_buf(&mut buf));
        match read_once.await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => {
                stats.other_ends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Ok(_)) => {}
        }
        while let Some((opcode, payload)) = next_ws_frame(&buf) {
            if opcode == OpCode::Control(Control::Close) {
                stats.other_ends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if opcode == OpCode::Data(Data::Binary) {
                match ServerFrame::decode(&buf[payload.clone()], PayloadLimits::default()) {
                    Ok(ServerFrame::Error { code, .. }) => {
                        let counter = if code == Code::RateLimited {
                            &stats.rate_limited
                        } else {
                            &stats.other_errors
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ServerFrame::Close { code, .. }) => {
                        let counter = if code == Code::PolicyViolation {
                            &stats.policy_closes
                        } else {
                            &stats.other_ends
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    _ => {}
                }
            }
            buf.advance(payload.end);
        }
    }
}
