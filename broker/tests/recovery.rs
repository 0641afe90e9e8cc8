//! Recovery on one node, over real sessions on loopback: positions, replay after a reconnect
//! (WebSocket and WebTransport), the seam between replay and live events under concurrent
//! publishing, refusals, idempotency keys, and the graceful drain's Close hints.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{cluster::http, wt::RawWt, *};
use roomcast_broker::{Config, config::Secret};
use roomcast_protocol::{ClientFrame, Code, Payload, Position, ServerFrame};

fn publish(id: u64, room: &str, n: u64, key: Option<&str>) -> ClientFrame {
    ClientFrame::Publish {
        id,
        room: room.into(),
        event: "tick".into(),
        data: Payload::encode(&n).unwrap().as_bytes().clone(),
        ack: id != 0,
        key: key.map(str::to_owned),
    }
}

fn subscribe(id: u64, room: &str, since: Option<Position>) -> ClientFrame {
    ClientFrame::Subscribe {
        id,
        room: room.into(),
        since,
    }
}

/// Publishes `range` with acks from `conn`, waiting for each ack.
async fn publish_acked(conn: &mut RawConn, room: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        conn.send(publish(n, room, n, None)).await;
        match conn.frame().await {
            ServerFrame::Ack { id, .. } if id == n => {}
            other => panic!("expected Ack {n}, got {other:?}"),
        }
    }
}

/// Reads the Subscribed reply for `id`.
async fn subscribed(conn: &mut RawConn, id: u64) -> (Position, Option<bool>) {
    match conn.frame().await {
        ServerFrame::Subscribed {
            id: got,
            seq,
            epoch,
            recovered,
            ..
        } if got == id => (Position { epoch, seq }, recovered),
        other => panic!("expected Subscribed {id}, got {other:?}"),
    }
}

/// Reads `n` events and returns their seqs.
async fn event_seqs(conn: &mut RawConn, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        match conn.frame().await {
            ServerFrame::Event(e) => {
                assert_eq!(e.epoch, None, "one node never changes a live room's epoch");
                seqs.push(e.seq);
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }
    seqs
}

#[tokio::test]
async fn websocket_client_recovers_what_it_missed_then_continues_live() {
    let server = start(config()).await;
    let mut publisher = RawConn::open(&server).await;
    let mut sub = RawConn::open(&server).await;
    sub.send(subscribe(1, "orders:7", None)).await;
    let (start, recovered) = subscribed(&mut sub, 1).await;
    assert_ne!(start.epoch, 0, "reliable rooms keep history");
    assert_eq!((start.seq, recovered), (0, None));
    publish_acked(&mut publisher, "orders:7", 1..=3).await;
    assert_eq!(event_seqs(&mut sub, 3).await, [1, 2, 3]);
    drop(sub); // the connection dies

    publish_acked(&mut publisher, "orders:7", 4..=6).await;
    let mut back = RawConn::open(&server).await;
    let held = Position {
        epoch: start.epoch,
        seq: 3,
    };
    back.send(subscribe(2, "orders:7", Some(held))).await;
    assert_eq!(subscribed(&mut back, 2).await, (held, Some(true)));
    assert_eq!(event_seqs(&mut back, 3).await, [4, 5, 6]);
    publish_acked(&mut publisher, "orders:7", 7..=7).await;
    assert_eq!(event_seqs(&mut back, 1).await, [7]);
}

#[tokio::test]
async fn recovery_works_before_the_first_event() {
    let server = start(config()).await;
    let mut sub = RawConn::open(&server).await;
    sub.send(subscribe(1, "orders:8", None)).await;
    let (start, _) = subscribed(&mut sub, 1).await;
    drop(sub);
    let mut publisher = RawConn::open(&server).await;
    publish_acked(&mut publisher, "orders:8", 1..=2).await;
    let mut back = RawConn::open(&server).await;
    back.send(subscribe(1, "orders:8", Some(start))).await;
    assert_eq!(subscribed(&mut back, 1).await, (start, Some(true)));
    assert_eq!(event_seqs(&mut back, 2).await, [1, 2]);
}

#[tokio::test]
async fn webtransport_client_recovers_on_the_room_stream() {
    let server = start(config()).await;
    let mut publisher = RawConn::open(&server).await;
    let mut first = RawWt::open(&server).await;
    let mut stream = first.subscribe(1, "orders:9").await;
    publish_acked(&mut publisher, "orders:9", 1..=2).await;
    let mut epoch = None;
    for want in 1..=2 {
        match stream.frame().await {
            ServerFrame::Event(e) => assert_eq!(e.seq, want),
            other => panic!("expected event {want}, got {other:?}"),
        }
    }
    drop(stream);
    drop(first);
    // The first Subscribed's epoch is the room's: ask the room again over WebSocket to learn it
    // (a fresh subscriber sees the same epoch while the room lives).
    let mut probe = RawConn::open(&server).await;
    probe.send(subscribe(1, "orders:9", None)).await;
    let (now, _) = subscribed(&mut probe, 1).await;
    epoch.get_or_insert(now.epoch);
    assert_eq!(now.seq, 2);
    publish_acked(&mut publisher, "orders:9", 3..=4).await;

    let mut back = RawWt::open(&server).await;
    let since = Position {
        epoch: now.epoch,
        seq: 2,
    };
    back.send(subscribe(5, "orders:9", Some(since))).await;
    let recv = tokio::time::timeout(WAIT, back.connection.accept_uni())
        .await
        .expect("room stream in time")
        .expect("room stream");
    let mut stream = common::wt::FrameStream::new(recv);
    match stream.frame().await {
        ServerFrame::Subscribed {
            id: 5,
            seq: 2,
            recovered: Some(true),
            epoch: e,
            ..
        } => assert_eq!(e, now.epoch),
        other => panic!("expected a recovered Subscribed, got {other:?}"),
    }
    for want in 3..=4 {
        match stream.frame().await {
            ServerFrame::Event(e) => assert_eq!(e.seq, want),
            other => panic!("expected replayed event {want}, got {other:?}"),
        }
    }
}

/// A publisher never stops while the subscriber disconnects and recovers again and again: the
/// events it sees across all its connections are exactly 1..=N, once each, in order.
#[tokio::test]
async fn the_seam_between_replay_and_live_has_no_gap_and_no_duplicate() {
    const TOTAL: u64 = 3000;
    let server = start(Config {
        history_events: 10_000,
        history_bytes: 4 << 20,
        ..config()
    })
    .await;
    let mut sub = RawConn::open(&server).await;
    sub.send(subscribe(1, "orders:seam", None)).await;
    let (start, _) = subscribed(&mut sub, 1).await;
    let publisher = {
        let url = server.ws_url();
        tokio::spawn(async move {
            let mut conn = RawConn::open_url(&url).await;
            for n in 1..=TOTAL {
                // Fire and forget, with an ack now and then to stay within the rate limits.
                let id = if n % 100 == 0 { n } else { 0 };
                conn.send(publish(id, "orders:seam", n, None)).await;
                if id != 0 {
                    while !matches!(conn.frame().await, ServerFrame::Ack { .. }) {}
                }
            }
            conn
        })
    };
    let mut seen: Vec<u64> = Vec::new();
    let mut held = start;
    let mut reconnects = 0;
    while held.seq < TOTAL {
        // Read a few events, then drop the connection and recover from the last one seen.
        let batch = if reconnects < 20 { 37 } else { usize::MAX };
        let mut got = 0;
        while got < batch && held.seq < TOTAL {
            match sub.frame().await {
                ServerFrame::Event(e) => {
                    seen.push(e.seq);
                    held.seq = e.seq;
                    got += 1;
                }
                other => panic!("expected an event, got {other:?}"),
            }
        }
        if held.seq < TOTAL {
            reconnects += 1;
            sub = RawConn::open(&server).await;
            sub.send(subscribe(1, "orders:seam", Some(held))).await;
            let (from, recovered) = subscribed(&mut sub, 1).await;
            assert_eq!((from, recovered), (held, Some(true)));
        }
    }
    publisher.await.unwrap();
    assert_eq!(reconnects, 20);
    let want: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(seen.len(), want.len(), "no event lost or repeated");
    assert_eq!(seen, want);
}

#[tokio::test]
async fn positions_the_history_cannot_serve_are_refused_with_the_current_position() {
    let server = start(Config {
        history_events: 2,
        ..config()
    })
    .await;
    let mut publisher = RawConn::open(&server).await;
    let mut sub = RawConn::open(&server).await;
    sub.send(subscribe(1, "orders:10", None)).await;
    let (start, _) = subscribed(&mut sub, 1).await;
    publish_acked(&mut publisher, "orders:10", 1..=5).await;
    let mut current = Position {
        epoch: start.epoch,
        seq: 5,
    };
    for (since, why) in [
        (
            Position {
                epoch: start.epoch,
                seq: 1,
            },
            "expired",
        ),
        (
            Position {
                epoch: start.epoch + 1,
                seq: 4,
            },
            "another epoch",
        ),
        (
            Position {
                epoch: start.epoch,
                seq: 99,
            },
            "beyond the last event",
        ),
    ] {
        let mut c = RawConn::open(&server).await;
        c.send(subscribe(3, "orders:10", Some(since))).await;
        assert_eq!(subscribed(&mut c, 3).await, (current, Some(false)), "{why}");
        // Live events follow from the current position, nothing replayed.
        publisher.send(publish(0, "orders:10", 0, None)).await;
        let next = event_seqs(&mut c, 1).await[0];
        assert_eq!(next, current.seq + 1, "{why}");
        current.seq = next;
    }
}

#[tokio::test]
async fn a_subscribe_with_half_a_position_is_a_protocol_error() {
    let server = start(config()).await;
    let mut c = RawConn::open(&server).await;
    // {0: 2, 1: 1, 2: "a:b", 5: 3}: seq without epoch.
    c.send_bytes(Bytes::from_static(&[
        0xa4, 0x00, 0x02, 0x01, 0x01, 0x02, 0x63, b'a', b':', b'b', 0x05, 0x03,
    ]))
    .await;
    c.expect_close(Code::ProtocolError).await;
    // Other sessions are unaffected.
    let mut other = RawConn::open(&server).await;
    other.ping(1).await;
}

#[tokio::test]
async fn a_retried_publish_with_the_same_key_is_delivered_once() {
    let server = start(config()).await;
    let mut sub = RawConn::open(&server).await;
    sub.subscribe(1, "orders:11").await;
    let mut publisher = RawConn::open(&server).await;
    let mut acked = Vec::new();
    for (id, key) in [(1, "order-11-a"), (2, "order-11-a"), (3, "order-11-b")] {
        publisher
            .send(publish(id, "orders:11", id, Some(key)))
            .await;
        match publisher.frame().await {
            ServerFrame::Ack { id: got, seq } if got == id => acked.push(seq),
            other => panic!("expected Ack {id}, got {other:?}"),
        }
    }
    assert_eq!(
        acked,
        [Some(1), Some(1), Some(2)],
        "the retry is acked as the original"
    );
    assert_eq!(event_seqs(&mut sub, 2).await, [1, 2]);
    // Nothing else is queued for the subscriber.
    sub.ping(9).await;
    assert!(metric(&server, "roomcast_duplicate_publishes_total").await >= 1.0);
}

#[tokio::test]
async fn bad_idempotency_keys_are_refused_with_invalid_key() {
    let server = start(config()).await;
    let mut sub = RawConn::open(&server).await;
    sub.subscribe(1, "orders:12").await;
    let mut c = RawConn::open(&server).await;
    let long = "k".repeat(65);
    for (id, key) in [(1, ""), (2, long.as_str())] {
        c.send(publish(id, "orders:12", id, Some(key))).await;
        c.expect_error(Some(id), Code::InvalidKey).await;
    }
    // 64 bytes is fine; the session goes on and the subscriber saw only the good publish.
    let max = "k".repeat(64);
    c.send(publish(3, "orders:12", 3, Some(&max))).await;
    assert!(matches!(c.frame().await, ServerFrame::Ack { id: 3, .. }));
    assert_eq!(event_seqs(&mut sub, 1).await, [1]);
}

#[tokio::test]
async fn http_publishes_with_an_idempotency_key_header_are_delivered_once() {
    const KEY: &str = "test-api-key";
    let mut c = config();
    c.api_key = Some(Secret(KEY.into()));
    let server = start(c).await;
    let mut sub = RawConn::open(&server).await;
    sub.subscribe(1, "orders:13").await;
    let body = br#"{"room":"orders:13","event":"status","data":{"state":"paid"}}"#;
    let auth = format!("Bearer {KEY}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "pay-13"),
    ];
    let (status, first) = http(server.local_addr(), "POST", "/api/publish", &headers, body).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = http(server.local_addr(), "POST", "/api/publish", &headers, body).await;
    assert_eq!(status, 200, "{again}");
    assert!(!first.contains("duplicate"), "{first}");
    assert!(again.contains(r#""duplicate":true"#), "{again}");
    assert_eq!(event_seqs(&mut sub, 1).await, [1]);
    sub.ping(2).await;
}

/// Shutdown with a drain window: every session still gets `Close shutting_down` with
/// `reconnect` and a `retry_after` hint, and the broker finishes within window + timeout.
#[tokio::test]
async fn drain_closes_every_session_with_a_reconnect_hint() {
    let server = start(Config {
        drain_window: Duration::from_millis(800),
        ..config()
    })
    .await;
    let mut conns = Vec::new();
    for i in 0..6 {
        let mut c = RawConn::open(&server).await;
        c.subscribe(1, &format!("orders:d{i}")).await;
        conns.push(c);
    }
    let stopping = tokio::spawn(server.shutdown());
    for c in &mut conns {
        match c.frame().await {
            ServerFrame::Close {
                code: Code::ShuttingDown,
                reconnect: true,
                retry_after_ms: Some(wait),
                ..
            } => assert!(wait <= 500, "retry_after {wait}"),
            other => panic!("expected Close shutting_down with a hint, got {other:?}"),
        }
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the drain ends in time")
        .unwrap()
        .unwrap();
}
