//! `connections`: many idle sessions (limit-ref's scenario C). Opens `--conns` sessions, each
//! subscribed to a room of its own (`conn:<i>`), with bounded concurrency and spread over
//! several loopback source addresses; reports the connect rate and latency, errors, and the
//! broker's RSS per session after a settle time; then holds the sessions for `--hold` seconds,
//! pinging them at the broker's ping interval, and reports how many it lost.
//!
//! Why source addresses: a TCP connection is named by (source address, source port,
//! destination address, destination port), and the kernel hands out source ports from
//! 32768–60999 here, so one source address reaches one broker port at most ~28,000 times
//! (fewer with sockets in TIME_WAIT from earlier runs). 127.0.0.0/8 is all loopback, so
//! binding each socket to one of 127.0.0.1–127.0.0.9 before connecting multiplies that.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

use roomcast_protocol::ClientFrame;

use crate::{
    common::{
        CommonArgs, Nodes, PING, Transport, cpu_seconds, into_tcp, open_subscriber, rss_bytes,
    },
    measure::{Phase, Summary, Ticker, histogram, raise_nofile, round1},
    timed::Keepalive,
    wt::{WtDialers, WtSubscriber, send_frame},
};

/// Descriptors kept free for everything that is not a session socket.
const FD_RESERVE: u64 = 32;

/// Arguments of `roomcast-bench connections`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "One process cannot hold more than about 19,990 sessions on this machine: \
the hard RLIMIT_NOFILE is 20,000 per process (raised from the soft limit automatically, \
but not beyond), each session takes one descriptor here, and the broker, capped the same \
way, needs one per session as well. For more, run several generators against several \
broker processes."
)]
pub(crate) struct ConnectionsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Idle sessions to open, each subscribed to its own room `conn:<i>` (at most the
    /// open-file limit minus a few; see below).
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Source addresses the sessions are spread over, round-robin: a comma-separated list of
    /// addresses and ranges (`127.0.0.1-127.0.0.9`), or `none` to let the kernel choose.
    /// Loopback sources only reach a broker on loopback.
    #[arg(long, default_value = "127.0.0.1-127.0.0.9")]
    sources: String,
    /// Seconds between the last connect and reading the broker's RSS.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Seconds to hold the sessions after the settle time, pinging each at the broker's ping
    /// interval so that holds longer than its idle timeout survive.
    #[arg(long, alias = "duration", default_value_t = 10.0)]
    hold: f64,
}

/// Parses `--sources`: addresses and inclusive ranges `a-b`, comma-separated; `none` or an
/// empty string for none.
pub(crate) fn parse_sources(spec: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr = |s: &str| -> anyhow::Result<u32> {
            let ip: Ipv4Addr = s
                .trim()
                .parse()
                .with_context(|| format!("bad address {s:?}"))?;
            Ok(u32::from(ip))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (addr(a)?, addr(b)?),
            None => (addr(part)?, addr(part)?),
        };
        if last < first || last - first >= 256 {
            bail!("bad source range {part:?} (at most 256 addresses, first ≤ last)");
        }
        out.extend((first..=last).map(Ipv4Addr::from));
    }
    Ok(out)
}

/// The source address of session `i`: round-robin over `sources`, none when empty.
pub(crate) fn source_for(i: usize, sources: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    if sources.is_empty() {
        None
    } else {
        Some(sources[i % sources.len()])
    }
}

/// Kernel slab memory (sockets among other objects), bytes.
fn slab_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Slab:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The host's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in /proc/net/netstat): each costs a client a SYN retransmit,
/// one second at first.
fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// An open session about to be held.
enum HeldSession {
    Ws(TcpStream, Keepalive),
    Wt(Box<WtSubscriber>, Keepalive),
}

impl Held {
    fn ws(tcp: TcpStream, keepalive: Keepalive) -> HeldSession {
        HeldSession::Ws(tcp, keepalive)
    }

    fn wt(session: WtSubscriber, keepalive: Keepalive) -> HeldSession {
        HeldSession::Wt(Box::new(session), keepalive)
    }
}

/// What the connect and hold tasks share.
struct Held {
    /// Sessions open now.
    open: AtomicU64,
    /// Open sessions on the first node (whose RSS `--broker-pid` reports).
    open_first: AtomicU64,
    /// Failed connects.
    errors: AtomicU64,
    /// Sessions that ended while held.
    closed: AtomicU64,
    /// Time from starting the TCP connect to `Subscribed`, ns.
    connect: Mutex<Histogram<u64>>,
    phase: Phase,
}

impl Held {
    /// A held session ended.
    fn session_ended(&self, first_node: bool) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if first_node {
            self.open_first.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.phase.done() {
            self.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A session opened after `connect_ns`.
    fn session_opened(&self, first_node: bool, connect_ns: u64) {
        self.connect
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(connect_ns.max(1));
        self.open.fetch_add(1, Ordering::Relaxed);
        if first_node {
            self.open_first.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Holds one idle session: pings it, and notices when the broker ends it.
async fn hold(mut tcp: TcpStream, keepalive: Keepalive, first_node: bool, held: Arc<Held>) {
    let mut pings = keepalive.interval();
    let mut buf = [0u8; 256];
    loop {
        let alive = tokio::select! {
            read = tcp.read(&mut buf) => matches!(read, Ok(n) if n > 0),
            _ = pings.tick() => tcp.write_all(&PING).await.is_ok(),
        };
        if !alive {
            return held.session_ended(first_node);
        }
    }
}

/// Holds one idle WebTransport session like [`hold`]; its room stream stays open (dropping
/// it would ask the broker to stop the stream).
async fn hold_wt(session: WtSubscriber, keepalive: Keepalive, first_node: bool, held: Arc<Held>) {
    let WtSubscriber {
        mut control,
        mut control_recv,
        room: _room,
        personal: _personal,
        connection: _connection,
        ..
    } = session;
    let mut pings = keepalive.interval();
    loop {
        let alive = tokio::select! {
            frame = control_recv.next() => frame.is_ok(),
            _ = pings.tick() => send_frame(&mut control, &ClientFrame::Ping { id: None }).await.is_ok(),
        };
        if !alive {
            return held.session_ended(first_node);
        }
    }
}

/// Opens every session with bounded concurrency; each one, once open, is held by its own task.
async fn connect_all(
    args: Arc<ConnectionsArgs>,
    nodes: Nodes,
    sources: Vec<Ipv4Addr>,
    wt: Option<Arc<WtDialers>>,
    held: Arc<Held>,
) {
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut joins = tokio::task::JoinSet::new();
    let n = args.conns;
    for i in 0..n {
        let (limit, held) = (limit.clone(), held.clone());
        let url = nodes.subscriber(i).to_owned();
        let first_node = url == nodes.publisher();
        let source = source_for(i, &sources);
        let wt = wt.clone();
        joins.spawn(async move {
            let _permit = limit.acquire().await;
            let started = Instant::now();
            let room = format!("conn:{i}");
            let opened = async {
                if let Some(dialers) = wt {
                    let session = dialers.subscriber(i, &room).await?;
                    let keepalive = Keepalive::for_session(i, n, &session.welcome);
                    return anyhow::Ok(Held::wt(session, keepalive));
                }
                let (ws, welcome) = open_subscriber(&url, &room, source).await?;
                let keepalive = Keepalive::for_session(i, n, &welcome);
                anyhow::Ok(Held::ws(into_tcp(ws)?, keepalive))
            };
            match opened.await {
                Ok(session) => {
                    held.session_opened(first_node, started.elapsed().as_nanos() as u64);
                    match session {
                        HeldSession::Ws(tcp, keepalive) => {
                            tokio::spawn(hold(tcp, keepalive, first_node, held))
                        }
                        HeldSession::Wt(session, keepalive) => {
                            tokio::spawn(hold_wt(*session, keepalive, first_node, held))
                        }
                    };
                }
                Err(e) => {
                    if held.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("[connections] session {i} (from {source:?}): {e:#}");
                    }
                }
            }
        });
    }
    while joins.join_next().await.is_some() {}
}

/// Runs the scenario and prints its result.
pub(crate) async fn run(args: ConnectionsArgs) -> anyhow::Result<()> {
    let nodes = args.common.nodes(&[Transport::Ws, Transport::Wt])?;
    let sources = parse_sources(&args.sources)?;
    let nofile = raise_nofile();
    let wt = match args.common.transport {
        Transport::Ws => None,
        _ => Some(Arc::new(WtDialers::new(&nodes).await?)),
    };
    if wt.is_none() && args.conns as u64 + FD_RESERVE > nofile {
        bail!(
            "--conns {} needs {} open files but this process may open {nofile} (the hard \
             limit): one process cannot hold more; run several generators",
            args.conns,
            args.conns as u64 + FD_RESERVE
        );
    }
    let pid = args.common.broker_pid;
    let rss_before = pid.and_then(rss_bytes);
    let slab_before = slab_bytes();
    let cpu_before = pid.and_then(cpu_seconds);
    let overflows_before = listen_overflows();
    let held = Arc::new(Held {
        open: AtomicU64::new(0),
        open_first: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        connect: Mutex::new(histogram()),
        phase: Phase::default(),
    });
    let args = Arc::new(args);
    eprintln!(
        "[connections] opening {} sessions, {} at a time, from {} source address(es); open-file limit {nofile}",
        args.conns,
        args.concurrency,
        sources.len().max(1)
    );
    let started = Instant::now();
    let mut connector = tokio::spawn(connect_all(
        args.clone(),
        nodes.clone(),
        sources.clone(),
        wt,
        held.clone(),
    ));
    let mut ticker = Ticker::new(0);
    let far = Instant::now() + Duration::from_secs(3600);
    loop {
        tokio::select! {
            joined = &mut connector => { joined?; break; }
            _ = ticker.tick(far) => {
                let open = held.open.load(Ordering::Relaxed);
                eprintln!(
                    "[connections] connecting: open {open} ({:.0}/s), errors {}",
                    ticker.rate(open),
                    held.errors.load(Ordering::Relaxed)
                );
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let cpu_connect = match (cpu_before, pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let ok = held.open.load(Ordering::Relaxed);
    let errors = held.errors.load(Ordering::Relaxed);
    let rss_connected = pid.and_then(rss_bytes);
    let overflows = match (overflows_before, listen_overflows()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    eprintln!("[connections] {ok} open, {errors} errors in {connect_s:.2} s; settling");

    let status = |label: &str| {
        let rss = pid.and_then(rss_bytes).map_or(String::new(), |r| {
            format!(", broker RSS {:.1} MiB", r as f64 / (1 << 20) as f64)
        });
        eprintln!(
            "[connections] {label}: open {}, closed {}{rss}",
            held.open.load(Ordering::Relaxed),
            held.closed.load(Ordering::Relaxed)
        );
    };
    let settle_end = Instant::now() + Duration::from_secs_f64(args.settle);
    let mut ticker = Ticker::new(0);
    while Instant::now() < settle_end {
        ticker.tick(settle_end).await;
        status("settling");
    }
    let rss_after = pid.and_then(rss_bytes);
    let slab_after = slab_bytes();
    let on_pid_node = held.open_first.load(Ordering::Relaxed);
    let per = |a: Option<u64>, b: Option<u64>, n: u64| match (a, b) {
        (Some(a), Some(b)) if n > 0 => Some((b as f64 - a as f64) / n as f64),
        _ => None,
    };
    let rss_per_session = per(rss_before, rss_after, on_pid_node);
    let slab_per_session = per(slab_before, slab_after, ok);

    let hold_start = Instant::now();
    let hold_end = hold_start + Duration::from_secs_f64(args.hold);
    let mut ticker = Ticker::new(0);
    while Instant::now() < hold_end {
        ticker.tick(hold_end).await;
        status(&format!(
            "holding {:.0}/{} s",
            hold_start.elapsed().as_secs_f64(),
            args.hold
        ));
    }
    held.phase.finish();
    let closed = held.closed.load(Ordering::Relaxed);
    let open_at_end = held.open.load(Ordering::Relaxed);
    let connect = Summary::of(&held.connect.lock().unwrap_or_else(|e| e.into_inner()));
    let connect_per_s = ok as f64 / connect_s;

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut table = format!(
        "connections {}: conns={} concurrency={} sources={} nodes={}\n",
        args.common.transport.name(),
        args.conns,
        args.concurrency,
        sources.len().max(1),
        args.common.nodes.len().max(1)
    );
    table += &format!(
        "  opened             {ok} ({errors} errors) in {connect_s:.2} s = {connect_per_s:.0}/s\n"
    );
    table += &format!("  connect latency    {}\n", connect.line());
    if let Some(o) = overflows.filter(|&o| o > 0) {
        table += &format!("  listen overflows   {o} (host-wide; each a 1 s SYN retransmit)\n");
    }
    if let Some(cpu) = cpu_connect {
        table += &format!("  broker CPU         {cpu:.2} s while connecting\n");
    }
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        table += &format!(
            "  broker RSS         {:.1} -> {:.1} MiB after {} s settle\n",
            mib(b),
            mib(a),
            args.settle
        );
    }
    if let Some(p) = rss_per_session {
        table += &format!("  RSS per session    {:.0} B ({:.2} KiB)\n", p, p / 1024.0);
    }
    if let Some(p) = slab_per_session {
        table += &format!("  kernel slab        {p:.0} B per session (both socket ends)\n");
    }
    table += &format!(
        "  held {} s          closed {closed}, open at end {open_at_end}\n",
        args.hold
    );
    let head = args.common.json_head("connections", &nodes);
    let figures = json!({
        "conns": args.conns, "concurrency": args.concurrency, "sources": sources.len().max(1),
        "ok": ok, "errors": errors, "connect_s": connect_s,
        "connect_per_s": connect_per_s.round(), "connect_ms": connect.json(),
        "listen_overflows": overflows,
        "broker_cpu_connect_s": cpu_connect.map(|c| (c * 100.0).round() / 100.0),
        "rss_before": rss_before, "rss_connected": rss_connected, "rss_after": rss_after,
        "rss_per_session": rss_per_session.map(round1), "sessions_on_broker_pid": on_pid_node,
        "slab_per_session": slab_per_session.map(round1), "settle_s": args.settle,
        "hold_s": args.hold, "closed_during_hold": closed, "open_at_end": open_at_end,
        "nofile": nofile,
    });
    args.common.report(head, figures, &table);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_lists_and_ranges() {
        let s = parse_sources("127.0.0.1-127.0.0.9").unwrap();
        assert_eq!(s.len(), 9);
        assert_eq!(s[0], Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(s[8], Ipv4Addr::new(127, 0, 0, 9));
        let s = parse_sources("127.0.0.5, 127.0.1.254-127.0.2.1").unwrap();
        assert_eq!(
            s,
            [
                Ipv4Addr::new(127, 0, 0, 5),
                Ipv4Addr::new(127, 0, 1, 254),
                Ipv4Addr::new(127, 0, 1, 255),
                Ipv4Addr::new(127, 0, 2, 0),
                Ipv4Addr::new(127, 0, 2, 1),
            ]
        );
        assert!(parse_sources("none").unwrap().is_empty());
        assert!(parse_sources("").unwrap().is_empty());
        assert!(parse_sources("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_sources("127.0.0.1-127.0.9.1").is_err());
        assert!(parse_sources("localhost").is_err());
    }

    #[test]
    fn sessions_spread_round_robin_over_sources() {
        let sources = parse_sources("127.0.0.1-127.0.0.9").unwrap();
        let mut per = [0usize; 9];
        for i in 0..10_000 {
            let ip = source_for(i, &sources).unwrap();
            per[ip.octets()[3] as usize - 1] += 1;
        }
        assert!(per.iter().all(|&n| n == 1111 || n == 1112), "{per:?}");
        assert_eq!(source_for(3, &[]), None);
    }
}
