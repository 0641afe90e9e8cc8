//! Slow consumers per namespace policy, over real sessions on loopback: a subscriber that never
//! reads gets only the latest event per key in a conflating namespace (told so by `Conflation`
//! frames, its session kept, the broker's memory bounded), is closed with `slow_consumer` in a
//! reliable one (and learns on reconnect whether history covers what it missed), and loses the
//! oldest events in a volatile one. On WebSocket and on WebTransport.

mod common;

use std::{path::PathBuf, sync::atomic::AtomicU32};

use common::{wt::RawWt, *};
use roomcast_broker::Server;
use roomcast_protocol::{ClientFrame, Code, Payload, Position, RoomName, ServerFrame};
use serde_json::json;

/// The tests here measure the process's memory: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const POLICY: &str = r#"
[default]
subscribe = "anyone"
publish = "anyone"

[namespaces.px]
subscribe = "anyone"
publish = "anyone"
conflate = "instrument"

[namespaces.feed]
subscribe = "anyone"
publish = "anyone"
history_events = 4096
history_bytes = 1048576

[namespaces.gps]
subscribe = "anyone"
publish = "anyone"
volatile = true
"#;

const INSTRUMENTS: [&str; 4] = ["EURUSD", "USDJPY", "GBPUSD", "AUDUSD"];

fn policy_file() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "roomcast-conflation-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("roomcast.toml");
    std::fs::write(&file, POLICY).unwrap();
    file
}

/// A broker with the policy above and an outbound queue of `cap` bytes per session.
async fn broker(cap: usize) -> Server {
    let mut config = config();
    config.config = Some(policy_file());
    config.outbound_queue_bytes = cap;
    start(config).await
}

/// The process's resident set size, in KiB (the broker runs in this process).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The `n`th price tick: its instrument cycles over [`INSTRUMENTS`]; `pad` bytes of filler.
fn tick(n: u64, pad: usize) -> Payload {
    Payload::encode(&json!({
        "instrument": INSTRUMENTS[n as usize % INSTRUMENTS.len()],
        "n": n,
        "pad": "x".repeat(pad),
    }))
    .unwrap()
}

fn publish(room: &str, data: Payload) -> ClientFrame {
    ClientFrame::Publish {
        id: 1,
        room: room.into(),
        event: "tick".into(),
        data: data.as_bytes().clone(),
        ack: true,
        key: None,
    }
}

async fn publish_acked(publisher: &mut RawConn, room: &str, data: Payload) {
    publisher.send(publish(room, data)).await;
    match publisher.frame().await {
        ServerFrame::Ack { .. } => {}
        other => panic!("expected Ack, got {other:?}"),
    }
}

/// Publishes ticks `1..=total` to `room`; returns the largest growth of the process's RSS
/// seen meanwhile, in KiB.
async fn publish_ticks(publisher: &mut RawConn, room: &str, total: u64, pad: usize) -> u64 {
    let base = rss_kib();
    let mut peak = base;
    for n in 1..=total {
        publish_acked(publisher, room, tick(n, pad)).await;
        if n % 128 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    peak.max(rss_kib()) - base
}

/// What a subscriber that fell behind in a conflating room receives once it reads, given
/// that ticks `1..=total` were published: every tick up to `Conflation { active: true }`,
/// then only the latest tick per instrument (seqs still increasing), then `Conflation {
/// active: false }`. Returns the events received.
fn check_conflated(frames: &[ServerFrame], room: &str, total: u64) -> usize {
    let marker = |active| ServerFrame::Conflation {
        room: RoomName::new(room).unwrap(),
        active,
    };
    let on = frames
        .iter()
        .position(|f| *f == marker(true))
        .expect("told it is conflated");
    assert_eq!(frames.last(), Some(&marker(false)), "told it caught up");
    let ticks = |frames: &[ServerFrame]| -> Vec<(u64, u64)> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Event(e) => {
                    let data: serde_json::Value = e.data.decode().unwrap();
                    Some((e.seq, data["n"].as_u64().unwrap()))
                }
                ServerFrame::Conflation { .. } => None,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    };
    let before = ticks(&frames[..on]);
    let after = ticks(&frames[on + 1..frames.len() - 1]);
    assert!(
        frames[on + 1..frames.len() - 1]
            .iter()
            .all(|f| matches!(f, ServerFrame::Event(_))),
        "one conflation episode"
    );
    // Nothing is lost before the subscriber is told.
    let expected: Vec<u64> = (1..=before.len() as u64).collect();
    assert_eq!(before.iter().map(|(_, n)| *n).collect::<Vec<_>>(), expected);
    // After it: the latest tick of each instrument, in publish order.
    let latest: Vec<u64> = (total + 1 - INSTRUMENTS.len() as u64..=total).collect();
    assert_eq!(after.iter().map(|(_, n)| *n).collect::<Vec<_>>(), latest);
    let seqs: Vec<u64> = before.iter().chain(&after).map(|(seq, _)| *seq).collect();
    assert!(seqs.is_sorted(), "seqs increase");
    assert!(
        before.iter().all(|(seq, n)| seq == n) && after.iter().all(|(seq, n)| seq == n),
        "each event is the tick published with that seq"
    );
    before.len() + after.len()
}

#[tokio::test]
async fn a_never_reading_websocket_subscriber_of_a_conflating_namespace_gets_the_latest_per_key() {
    let _serial = SERIAL.lock().await;
    const CAP: usize = 64 * 1024;
    let server = broker(CAP).await;
    let mut slow = RawConn::open_slow(&server).await;
    slow.subscribe(1, "px:fx").await;
    let mut publisher = RawConn::open(&server).await;
    // 24 MB through a 64 KiB queue (and the kernel's socket buffers, at most a few MiB).
    let total = 6000;
    let growth = publish_ticks(&mut publisher, "px:fx", total, 4000).await;
    assert_eq!(
        metric(&server, "roomcast_slow_consumer_closes_total").await,
        0.0
    );
    let conflated = metric(&server, "roomcast_conflated_events_total").await;
    assert!(conflated > 0.0);
    assert!(
        growth < 8 * 1024,
        "the broker's memory stays bounded: RSS grew {growth} KiB while 24 MB were published"
    );
    // The subscriber reads at last.
    let mut frames = Vec::new();
    let caught_up = ServerFrame::Conflation {
        room: RoomName::new("px:fx").unwrap(),
        active: false,
    };
    while frames.last() != Some(&caught_up) {
        frames.push(slow.frame().await);
    }
    let received = check_conflated(&frames, "px:fx", total);
    assert_eq!(received as f64 + conflated, total as f64);
    eprintln!(
        "WebSocket: {total} ticks of 4 KiB, {received} received, {conflated} replaced, RSS +{growth} KiB"
    );
    slow.ping(1).await;
    // Caught up: events flow one by one again.
    publish_acked(&mut publisher, "px:fx", tick(total + 1, 0)).await;
    match slow.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.seq, total + 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_never_reading_subscriber_of_a_reliable_namespace_is_closed_and_told_what_it_lost() {
    let _serial = SERIAL.lock().await;
    let server = broker(16 * 1024).await;
    let mut slow = RawConn::open_slow(&server).await;
    slow.send(ClientFrame::Subscribe {
        id: 1,
        room: "feed:1".into(),
        since: None,
    })
    .await;
    let epoch = match slow.frame().await {
        ServerFrame::Subscribed { epoch, seq: 0, .. } => epoch,
        other => panic!("{other:?}"),
    };
    let mut publisher = RawConn::open(&server).await;
    let mut published = 0;
    // Until the broker closes it (bounded: 16 MB).
    while published < 16 * 1024 {
        published += 1;
        publish_acked(&mut publisher, "feed:1", tick(published, 1000)).await;
        if published % 32 == 0
            && metric(&server, "roomcast_slow_consumer_closes_total").await >= 1.0
        {
            break;
        }
    }
    assert_eq!(
        metric(&server, "roomcast_slow_consumer_closes_total").await,
        1.0
    );
    assert_eq!(
        metric(&server, "roomcast_conflated_events_total").await,
        0.0
    );
    for _ in 0..10 {
        published += 1;
        publish_acked(&mut publisher, "feed:1", tick(published, 1000)).await;
    }
    // What reached it before the close, in order, then the end.
    let mut last = 0;
    loop {
        match slow.next().await {
            Seen::Frame(ServerFrame::Event(e)) => {
                assert_eq!(e.seq, last + 1);
                last = e.seq;
            }
            Seen::Frame(ServerFrame::Close { code, .. }) => {
                assert_eq!(code, Code::SlowConsumer);
                break;
            }
            Seen::Frame(other) => panic!("unexpected {other:?}"),
            Seen::WsClose(_) | Seen::Eof => break,
        }
    }
    assert!(last < published, "it missed events");
    // It comes back with its position. It missed about a queue's worth (what was queued when
    // it was closed) plus what followed, more than a fresh queue takes as one replay: the
    // broker says so (`recovered: false`, the current position) and the client resyncs. Had
    // it fit, the replay would carry exactly the missed events. Never a silent gap.
    let mut back = RawConn::open(&server).await;
    back.send(ClientFrame::Subscribe {
        id: 2,
        room: "feed:1".into(),
        since: Some(Position { epoch, seq: last }),
    })
    .await;
    let recovered = match back.frame().await {
        ServerFrame::Subscribed { recovered, seq, .. } => {
            if recovered == Some(false) {
                assert_eq!(seq, published, "the current position");
            }
            recovered
        }
        other => panic!("{other:?}"),
    };
    eprintln!(
        "missed {} events of about 1 KiB with a 16 KiB queue: recovered {recovered:?}",
        published - last
    );
    if recovered == Some(true) {
        for seq in last + 1..=published {
            match back.frame().await {
                ServerFrame::Event(e) => assert_eq!(e.seq, seq),
                other => panic!("{other:?}"),
            }
        }
    }
    // From then on it gets every event.
    published += 1;
    publish_acked(&mut publisher, "feed:1", tick(published, 0)).await;
    match back.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.seq, published),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_never_reading_subscriber_of_a_volatile_namespace_loses_the_oldest_events() {
    let _serial = SERIAL.lock().await;
    let server = broker(64 * 1024).await;
    let mut slow = RawConn::open_slow(&server).await;
    slow.subscribe(1, "gps:fleet").await;
    let mut publisher = RawConn::open(&server).await;
    let total = 1000;
    let growth = publish_ticks(&mut publisher, "gps:fleet", total, 16 * 1024).await;
    assert!(growth < 8 * 1024, "RSS grew {growth} KiB");
    assert_eq!(
        metric(&server, "roomcast_slow_consumer_closes_total").await,
        0.0
    );
    let mut seen = 0;
    loop {
        match slow.frame().await {
            ServerFrame::Event(e) => {
                seen += 1;
                if e.seq == total {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        seen < total,
        "old events were dropped ({seen} of {total} seen)"
    );
    eprintln!("volatile: {total} events of 16 KiB, {seen} received, RSS +{growth} KiB");
    slow.ping(1).await;
}

#[tokio::test]
async fn a_webtransport_room_stream_the_client_does_not_read_is_conflated_others_flow() {
    let _serial = SERIAL.lock().await;
    let server = broker(64 * 1024).await;
    // The client grants 8 KiB per stream: the room's stream is stuck once 8 KiB are unread.
    let mut wt = RawWt::open_with(&server, Some(8 * 1024)).await;
    let mut px = wt.subscribe(1, "px:fx").await;
    let mut live = wt.subscribe(2, "feed:live").await;
    let mut publisher = RawConn::open(&server).await;
    let total = 3000;
    let base = rss_kib();
    for n in 1..=total {
        publish_acked(&mut publisher, "px:fx", tick(n, 1000)).await;
        if n % 250 == 0 {
            // Another room, and the control stream, are not held up behind the stuck one.
            publish_acked(&mut publisher, "feed:live", tick(n, 0)).await;
            match live.frame().await {
                ServerFrame::Event(e) => assert_eq!(e.seq, n / 250),
                other => panic!("{other:?}"),
            }
            wt.send(ClientFrame::Ping { id: Some(n) }).await;
            assert_eq!(wt.control.frame().await, ServerFrame::Pong { id: Some(n) });
        }
    }
    let growth = rss_kib().saturating_sub(base);
    assert!(growth < 8 * 1024, "RSS grew {growth} KiB");
    assert_eq!(
        metric(&server, "roomcast_slow_consumer_closes_total").await,
        0.0
    );
    let conflated = metric(&server, "roomcast_conflated_events_total").await;
    assert!(conflated > 0.0);
    // The client reads the room at last: on its stream, in order.
    let mut frames = Vec::new();
    let caught_up = ServerFrame::Conflation {
        room: RoomName::new("px:fx").unwrap(),
        active: false,
    };
    while frames.last() != Some(&caught_up) {
        frames.push(px.frame().await);
    }
    let received = check_conflated(&frames, "px:fx", total);
    assert_eq!(received as f64 + conflated, total as f64);
    eprintln!(
        "WebTransport: {total} ticks of 1 KiB, {received} received, {conflated} replaced, RSS +{growth} KiB"
    );
    publish_acked(&mut publisher, "px:fx", tick(total + 1, 0)).await;
    match px.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.seq, total + 1),
        other => panic!("{other:?}"),
    }
}
