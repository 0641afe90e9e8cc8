//! End-to-end behaviour over real WebSocket sessions on loopback: delivery, ordering,
//! unsubscribe, acks, slow consumers, keepalive, metrics and graceful shutdown.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use roomcast_client::{ConnectOptions, Error, SubscriptionError, connect};
use roomcast_protocol::{ClientFrame, Code, Payload, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    id: u32,
    state: String,
}

async fn client(server: &roomcast_broker::Server) -> roomcast_client::Client {
    connect(&server.ws_url(), ConnectOptions::default())
        .await
        .expect("client connects")
}

#[tokio::test]
async fn every_subscriber_gets_every_event_in_order() {
    let server = start(config()).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let c = client(&server).await;
        let sub = c.subscribe("orders:1042").await.unwrap();
        assert_eq!(sub.start_seq(), 0);
        subs.push((c, sub));
    }
    let publisher = client(&server).await;
    for id in 1..=200u32 {
        let order = Order {
            id,
            state: format!("state-{id}"),
        };
        let seq = publisher
            .publish("orders:1042", "status", &order)
            .await
            .unwrap();
        assert_eq!(seq, Some(u64::from(id)));
    }
    for (_, sub) in &mut subs {
        for id in 1..=200u32 {
            let event = tokio::time::timeout(WAIT, sub.next_event())
                .await
                .expect("event in time")
                .expect("subscription open")
                .expect("no lag");
            assert_eq!(event.seq, u64::from(id));
            assert_eq!(event.room.as_str(), "orders:1042");
            assert_eq!(event.event.as_str(), "status");
            let order: Order = event.decode().unwrap();
            assert_eq!(order.id, id);
            assert_eq!(order.state, format!("state-{id}"));
        }
    }
    assert_eq!(metric(&server, "roomcast_events_in_total").await, 200.0);
    assert_eq!(metric(&server, "roomcast_events_out_total").await, 600.0);
}

#[tokio::test]
async fn concurrent_publishers_keep_per_publisher_order_and_one_room_order() {
    let server = start(config()).await;
    let mut a = RawConn::open(&server).await;
    let mut b = RawConn::open(&server).await;
    a.subscribe(1, "bids:9").await;
    b.subscribe(1, "bids:9").await;
    let mut tasks = Vec::new();
    for p in 0..4u64 {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url, ConnectOptions::default()).await.unwrap();
            for n in 0..50u64 {
                c.publish("bids:9", "bid", &(p, n)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut orders = Vec::new();
    for conn in [&mut a, &mut b] {
        let mut seen = Vec::new();
        let mut next_per_publisher = [0u64; 4];
        for seq in 1..=200u64 {
            match conn.frame().await {
                ServerFrame::Event(e) => {
                    assert_eq!(e.seq, seq, "gap-free seq");
                    let (p, n): (u64, u64) = e.data.decode().unwrap();
                    assert_eq!(n, next_per_publisher[p as usize], "publisher order");
                    next_per_publisher[p as usize] += 1;
                    seen.push((p, n));
                }
                other => panic!("{other:?}"),
            }
        }
        orders.push(seen);
    }
    assert_eq!(orders[0], orders[1], "both subscribers see one room order");
}

#[tokio::test]
async fn no_delivery_after_unsubscribed() {
    let server = start(config()).await;
    let mut watcher = RawConn::open(&server).await;
    watcher.subscribe(1, "room:a").await;
    watcher.subscribe(2, "room:b").await;
    let publisher = client(&server).await;
    publisher.publish("room:a", "before", &1).await.unwrap();
    watcher
        .send(ClientFrame::Unsubscribe {
            id: 3,
            room: "room:a".into(),
        })
        .await;
    // The event published before arrives first, then the confirmation.
    assert!(matches!(watcher.frame().await, ServerFrame::Event(e) if e.event.as_str() == "before"));
    assert!(matches!(
        watcher.frame().await,
        ServerFrame::Unsubscribed { id: 3, .. }
    ));
    publisher.publish("room:a", "after", &2).await.unwrap();
    publisher.publish("room:b", "marker", &3).await.unwrap();
    // Frames reach one session in queue order: had "after" been queued, it would come first.
    match watcher.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.event.as_str(), "marker"),
        other => panic!("expected the marker, got {other:?}"),
    }
    // The client library's unsubscribe waits for the confirmation too.
    let c = client(&server).await;
    let sub = c.subscribe("room:c").await.unwrap();
    sub.unsubscribe().await.unwrap();
    assert_eq!(metric(&server, "roomcast_subscriptions").await, 1.0);
}

#[tokio::test]
async fn publisher_receives_its_own_event_and_ack_errors_are_typed() {
    let server = start(config()).await;
    let c = client(&server).await;
    let mut sub = c.subscribe("echo:1").await.unwrap();
    assert_eq!(c.publish("echo:1", "hi", "there").await.unwrap(), Some(1));
    let event = tokio::time::timeout(WAIT, sub.next_event())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.decode::<String>().unwrap(), "there");
    // A room nobody watches: accepted, no seq.
    assert_eq!(c.publish("empty:1", "hi", &0).await.unwrap(), None);
    match c.publish("bad room", "hi", &0).await {
        Err(Error::Server { code, .. }) => assert_eq!(code, Code::InvalidRoom),
        other => panic!("expected invalid_room, got {other:?}"),
    }
    match c.subscribe("nope").await {
        Err(e) => assert_eq!(e.code(), Some(Code::InvalidRoom)),
        Ok(_) => panic!("subscribe to a bad room succeeded"),
    }
    // The session survived both errors.
    c.ping().await.unwrap();
}

#[tokio::test]
async fn resubscribing_does_not_duplicate_delivery() {
    let server = start(config()).await;
    let mut conn = RawConn::open(&server).await;
    conn.subscribe(1, "dup:1").await;
    conn.subscribe(2, "dup:1").await;
    let publisher = client(&server).await;
    publisher.publish("dup:1", "e", &1).await.unwrap();
    publisher.publish("dup:1", "e", &2).await.unwrap();
    for seq in 1..=2 {
        match conn.frame().await {
            ServerFrame::Event(e) => assert_eq!(e.seq, seq),
            other => panic!("{other:?}"),
        }
    }
    conn.ping(9).await;
}

#[tokio::test]
async fn never_reading_subscriber_is_closed_as_slow_while_others_keep_receiving() {
    let mut cfg = config();
    cfg.outbound_queue_bytes = 64 * 1024;
    let server = start(cfg).await;

    // The slow subscriber: a tiny receive buffer and it never reads after subscribing.
    let mut slow = RawConn::open_slow(&server).await;
    slow.subscribe(1, "feed:1").await;

    let fast = client(&server).await;
    let mut fast_sub = fast.subscribe("feed:1").await.unwrap();
    let publisher = client(&server).await;
    let chunk = Payload::encode(&Bytes::from(vec![0u8; 16 * 1024]).to_vec()).unwrap();
    let mut published = 0u64;
    // Publish until the broker reports the slow consumer (bounded: 64 MiB at most).
    for _ in 0..4096 {
        publisher
            .publish_payload("feed:1", "chunk", chunk.clone(), true)
            .await
            .unwrap();
        published += 1;
        // Keep the fast subscriber drained as we go.
        for _ in 0..1 {
            let e = tokio::time::timeout(WAIT, fast_sub.next_event())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(e.seq, published);
        }
        if published % 64 == 0
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
        metric(&server, "roomcast_errors_total{code=\"slow_consumer\"}").await,
        1.0
    );
    // Reading now, the slow subscriber gets whole frames only (the one in flight when the
    // broker gave up is finished, nothing after it), then `Close slow_consumer`, then the
    // WebSocket close 4429: a cut frame would surface here as an error (Eof).
    let mut frames = 0;
    loop {
        match slow.next().await {
            Seen::Frame(ServerFrame::Event(_)) => frames += 1,
            Seen::Frame(ServerFrame::Close {
                code, reconnect, ..
            }) => {
                assert_eq!(code, Code::SlowConsumer);
                assert!(reconnect);
                break;
            }
            other => panic!("expected events then Close slow_consumer, got {other:?}"),
        }
    }
    assert!(
        frames < published,
        "the slow subscriber did not get everything"
    );
    assert_eq!(
        slow.next().await,
        Seen::WsClose(Some(Code::SlowConsumer.ws_close_code()))
    );
    assert_eq!(Code::SlowConsumer.ws_close_code(), 4429);
    // Others keep receiving after the slow one is gone.
    for _ in 0..10 {
        publisher
            .publish("feed:1", "after", &published)
            .await
            .unwrap();
        published += 1;
        let e = tokio::time::timeout(WAIT, fast_sub.next_event())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.seq, published);
    }
    assert_eq!(metric(&server, "roomcast_subscriptions").await, 1.0);
}

#[tokio::test]
async fn hello_timeout_and_idle_timeout_close_silent_sessions() {
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(200);
    cfg.idle_timeout = Duration::from_millis(300);
    cfg.ping_interval = Duration::from_millis(100);
    let server = start(cfg).await;
    let mut silent = RawConn::connect(&server).await;
    silent.expect_close(Code::Timeout).await;
    let mut idle = RawConn::open(&server).await;
    idle.subscribe(1, "idle:1").await;
    idle.expect_close(Code::Timeout).await;
    // Its subscription was cleaned up.
    assert_eq!(metric(&server, "roomcast_subscriptions").await, 0.0);
    assert_eq!(
        metric(&server, "roomcast_errors_total{code=\"timeout\"}").await,
        2.0
    );
}

#[tokio::test]
async fn timers_that_contradict_each_other_are_refused_at_start() {
    let mut cfg = config();
    cfg.idle_timeout = Duration::from_secs(2);
    cfg.ping_interval = Duration::from_secs(10);
    let refused = roomcast_broker::Server::start(cfg)
        .await
        .err()
        .expect("refused");
    let text = refused.to_string();
    assert!(
        text.contains("--ping-interval (10s) must be shorter than --idle-timeout (2s)"),
        "{text}"
    );
}

#[tokio::test]
async fn client_pings_keep_a_session_alive() {
    let mut cfg = config();
    cfg.idle_timeout = Duration::from_millis(400);
    cfg.ping_interval = Duration::from_millis(150);
    let server = start(cfg).await;
    let mut conn = RawConn::open(&server).await;
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.ping(i).await;
    }
}

#[tokio::test]
async fn graceful_shutdown_sends_close_with_reconnect_and_drains() {
    let server = start(config()).await;
    let c = client(&server).await;
    let mut sub = c.subscribe("drain:1").await.unwrap();
    let mut raw = RawConn::open(&server).await;
    let url = server.ws_url();
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("drain finishes")
        .expect("clean shutdown");
    raw.expect_close(Code::ShuttingDown).await;
    let info = tokio::time::timeout(WAIT, c.closed()).await.unwrap();
    assert_eq!(info.code, Some(Code::ShuttingDown));
    assert!(info.reconnect);
    match tokio::time::timeout(WAIT, sub.next_event()).await.unwrap() {
        Some(Err(SubscriptionError::Closed(info))) => {
            assert_eq!(info.code, Some(Code::ShuttingDown))
        }
        None => {}
        other => panic!("expected the subscription to end, got {other:?}"),
    }
    // Nothing listens any more.
    assert!(connect(&url, ConnectOptions::default()).await.is_err());
}

#[tokio::test]
async fn healthz_metrics_and_handshake_refusal() {
    let server = start(config()).await;
    assert_eq!(http_get(&server, "/healthz").await, (200, "ok\n".into()));
    let _a = client(&server).await;
    let _b = client(&server).await;
    let (status, body) = http_get(&server, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("roomcast_sessions{transport=\"ws\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("roomcast_sessions_opened_total{transport=\"ws\"} 2"),
        "{body}"
    );
    // A plain GET on /ws is not an upgrade.
    let (status, _) = http_get(&server, "/ws").await;
    assert_eq!(status, 426);
    let (status, _) = http_get(&server, "/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn closed_sessions_leave_their_rooms() {
    let server = start(config()).await;
    let c = client(&server).await;
    let _s1 = c.subscribe("gone:1").await.unwrap();
    let _s2 = c.subscribe("gone:2").await.unwrap();
    assert_eq!(metric(&server, "roomcast_rooms").await, 2.0);
    c.close().await;
    // Closing is asynchronous on the broker side: poll the gauge (bounded).
    for _ in 0..100 {
        if metric(&server, "roomcast_rooms").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&server, "roomcast_rooms").await, 0.0);
    assert_eq!(metric(&server, "roomcast_subscriptions").await, 0.0);
    assert_eq!(
        metric(&server, "roomcast_sessions{transport=\"ws\"}").await,
        0.0
    );
}

#[tokio::test]
async fn websocket_ping_is_answered_and_the_session_goes_on() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = start(config()).await;
    let mut conn = RawConn::open(&server).await;
    conn.ws
        .send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, conn.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"are you there")));
    conn.ping(1).await;
}

#[tokio::test]
async fn hello_pipelined_with_the_upgrade_request_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::frame::{
        FrameHeader,
        coding::{Data, OpCode},
    };
    let server = start(config()).await;
    let mut tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let mut bytes = b"GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    // The Hello frame in the same write, masked with an all-zero key (payload unchanged).
    let hello = ClientFrame::Hello {
        version: 1,
        token: None,
    }
    .encode();
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Binary),
        mask: Some([0; 4]),
        ..FrameHeader::default()
    };
    header.format(hello.len() as u64, &mut bytes).unwrap();
    bytes.extend_from_slice(&hello);
    tcp.write_all(&bytes).await.unwrap();
    // Read the 101 response and then the Welcome frame.
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    let welcome_at = loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&chunk[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            if received.len() > end + 6 {
                break end + 4;
            }
        }
    };
    assert!(received.starts_with(b"HTTP/1.1 101"));
    let mut cursor = std::io::Cursor::new(&received[welcome_at..]);
    let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
    assert_eq!(header.opcode, OpCode::Data(Data::Binary));
    let start = welcome_at + cursor.position() as usize;
    while received.len() < start + len as usize {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        received.extend_from_slice(&chunk[..n]);
    }
    let frame = ServerFrame::decode(
        &received[start..start + len as usize],
        roomcast_protocol::PayloadLimits::default(),
    )
    .unwrap();
    assert!(matches!(frame, ServerFrame::Welcome(_)), "{frame:?}");
}

#[tokio::test]
async fn client_close_is_answered_with_a_close_frame() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};
    let server = start(config()).await;
    let mut conn = RawConn::open(&server).await;
    conn.ws
        .send(Message::Close(Some(CloseFrame {
            code: normal_close(),
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    // The broker echoes the close (RFC 6455 §5.5.1), then the stream ends.
    match tokio::time::timeout(WAIT, conn.ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, normal_close()),
        other => panic!("expected the close reply, got {other:?}"),
    }
}

#[tokio::test]
async fn a_draining_node_answers_503_and_refuses_new_sessions_until_its_window_ends() {
    let mut cfg = config();
    cfg.drain_window = Duration::from_millis(1500);
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut raw = RawConn::open(&server).await;
    let hash = common::wt::cert_hash(&server);
    let wt_url = common::wt::wt_url(&server);
    // SIGTERM's effect, without waiting for the drain to finish.
    server.shared().shutdown.cancel();
    let stopping = tokio::spawn(server.shutdown());
    // The listener still answers during the window: readiness fails, liveness holds.
    assert_eq!(
        http_get_at(addr, "/readyz").await,
        (503, "shutting down\n".into())
    );
    assert_eq!(
        http_get_at(addr, "/healthz").await,
        (200, "draining\n".into())
    );
    // A new WebSocket session gets 503 with Retry-After.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, stream.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1\r\n"), "{head}");
    // A new WebTransport session is refused (429).
    let refused = common::wt::session_at(&wt_url, hash, None).await;
    assert!(
        refused.is_err(),
        "a draining node admitted a WebTransport session"
    );
    // The open session is closed within the window, with a reconnect hint.
    match raw.frame().await {
        ServerFrame::Close {
            code,
            reconnect,
            retry_after_ms,
            ..
        } => {
            assert_eq!(code, Code::ShuttingDown);
            assert!(reconnect);
            assert!(retry_after_ms.is_some_and(|ms| ms <= 500));
        }
        other => panic!("expected Close shutting_down, got {other:?}"),
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("drain finishes")
        .unwrap()
        .unwrap();
    // After the window nothing listens.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn disconnects_are_counted_by_cause_and_a_reset_is_no_protocol_error() {
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let series =
        |cause: &str| format!("roomcast_disconnects_total{{transport=\"ws\",cause=\"{cause}\"}}");
    // A client that vanishes: its TCP connection is reset (SO_LINGER 0), no close handshake.
    let dropped = RawConn::open(&server).await;
    if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = dropped.ws.get_ref() {
        socket2::SockRef::from(tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    drop(dropped);
    // A clean close, a silent session (timeout) and a text message (a real protocol error).
    let mut clean = RawConn::open(&server).await;
    clean.ws.close(None).await.unwrap();
    let _ = clean.next().await;
    let mut silent = RawConn::connect(&server).await;
    silent.expect_close(Code::Timeout).await;
    let mut wrong = RawConn::open(&server).await;
    wrong
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    wrong.expect_close(Code::ProtocolError).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&server, &series("reset")).await < 1.0
        || metric(&server, &series("clean")).await < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "disconnects not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&server, &series("reset")).await, 1.0);
    assert_eq!(metric(&server, &series("clean")).await, 1.0);
    assert_eq!(metric(&server, &series("timeout")).await, 1.0);
    assert_eq!(metric(&server, &series("protocol_error")).await, 1.0);
    // Only the text message counts as a protocol error.
    assert_eq!(
        metric(&server, "roomcast_errors_total{code=\"protocol_error\"}").await,
        1.0
    );
}
