//! WebTransport sessions against a real broker on loopback UDP: the same rooms as WebSocket,
//! per-room streams, the certificate story and bad input.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{wt::*, *};
use roomcast_protocol::{ClientFrame, Code, Payload, ServerFrame};

fn publish(room: &str, event: &str, data: Bytes, ack: bool) -> ClientFrame {
    ClientFrame::Publish {
        key: None,
        id: 9,
        room: room.into(),
        event: event.into(),
        data,
        ack,
    }
}

fn number(n: u64) -> Bytes {
    Payload::encode(&n).unwrap().as_bytes().clone()
}

#[tokio::test]
async fn webtransport_subscriber_gets_websocket_publisher_events_on_its_room_stream() {
    let server = start(config()).await;
    let mut wt = RawWt::open(&server).await;
    let mut orders = wt.subscribe(1, "orders:1").await;
    let mut quotes = wt.subscribe(2, "quotes:1").await;
    let mut ws = RawConn::open(&server).await;
    for n in 1..=3 {
        ws.send(publish("orders:1", "status", number(n), true))
            .await;
        assert!(matches!(ws.frame().await, ServerFrame::Ack { .. }));
        ws.send(publish("quotes:1", "px", number(10 + n), true))
            .await;
        assert!(matches!(ws.frame().await, ServerFrame::Ack { .. }));
    }
    // Each room's events arrive on that room's own stream, in order.
    for n in 1..=3u64 {
        match orders.frame().await {
            ServerFrame::Event(e) => {
                assert_eq!((e.room.as_str(), e.seq), ("orders:1", n));
                assert_eq!(e.data.decode::<u64>().unwrap(), n);
            }
            other => panic!("{other:?}"),
        }
        match quotes.frame().await {
            ServerFrame::Event(e) => assert_eq!((e.room.as_str(), e.seq), ("quotes:1", n)),
            other => panic!("{other:?}"),
        }
    }
    // Unsubscribe: the confirmation ends the room's stream.
    wt.send(ClientFrame::Unsubscribe {
        id: 3,
        room: "orders:1".into(),
    })
    .await;
    assert!(matches!(
        orders.frame().await,
        ServerFrame::Unsubscribed { id: 3, .. }
    ));
    assert!(
        orders.next().await.is_none(),
        "the room stream ends after Unsubscribed"
    );
    // Session-level replies stay on the control stream.
    wt.send(ClientFrame::Ping { id: Some(5) }).await;
    assert_eq!(wt.control.frame().await, ServerFrame::Pong { id: Some(5) });
    assert_eq!(
        metric(&server, "roomcast_sessions{transport=\"wt\"}").await,
        1.0
    );
}

#[tokio::test]
async fn websocket_subscriber_gets_webtransport_publisher_events() {
    let server = start(config()).await;
    let mut ws = RawConn::open(&server).await;
    ws.subscribe(1, "bids:7").await;
    let mut wt = RawWt::open(&server).await;
    for n in 1..=3 {
        wt.send(publish("bids:7", "bid", number(n), true)).await;
        match wt.control.frame().await {
            ServerFrame::Ack { id: 9, seq } => assert_eq!(seq, Some(n)),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    for n in 1..=3 {
        match ws.frame().await {
            ServerFrame::Event(e) => assert_eq!(e.data.decode::<u64>().unwrap(), n),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn cert_hash_endpoint_pins_the_served_certificate() {
    let server = start(config()).await;
    let (status, body) = http_get(&server, "/cert-hash").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hex = json["hex"].as_str().unwrap();
    let hash: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let hash: [u8; 32] = hash.try_into().unwrap();
    assert_eq!(hash, cert_hash(&server));
    // Pinning the advertised hash works; any other hash is refused by the client.
    session(&server, hash).await.expect("pinned session");
    let mut wrong = hash;
    wrong[0] ^= 0xff;
    assert!(session(&server, wrong).await.is_err());
    // Validity fits browsers' 14-day rule.
    let not_after = json["not_after"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(not_after <= now + 14 * 86_400 && not_after > now + 12 * 86_400);
}

/// A WebSocket bystander that must keep working while WebTransport sessions misbehave.
async fn bystander_still_works(server: &roomcast_broker::Server, sub: &mut RawConn, n: u64) {
    let mut publisher = RawConn::open(server).await;
    publisher
        .send(publish("watch:1", "tick", number(n), true))
        .await;
    assert!(matches!(publisher.frame().await, ServerFrame::Ack { .. }));
    match sub.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.data.decode::<u64>().unwrap(), n),
        other => panic!("bystander expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn session_requests_for_other_paths_are_refused() {
    let server = start(config()).await;
    let config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(cert_hash(&server))])
        .build();
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let url = format!("https://127.0.0.1:{}/elsewhere", server.local_addr().port());
    let refused = tokio::time::timeout(WAIT, endpoint.connect(url))
        .await
        .unwrap();
    assert!(refused.is_err(), "a session at /elsewhere was accepted");
    // The right path still works.
    RawWt::open(&server).await;
}

#[tokio::test]
async fn control_frame_over_max_size_closes_with_frame_too_large() {
    let mut cfg = config();
    cfg.max_frame_size = 1024;
    let server = start(cfg).await;
    let mut bystander = RawConn::open(&server).await;
    bystander.subscribe(1, "watch:1").await;
    let mut bad = RawWt::open(&server).await;
    // Only the length prefix: the broker refuses it before any body arrives.
    let mut prefix = Vec::new();
    roomcast_protocol::stream::write_prefix(1 << 20, &mut prefix);
    bad.send.write_all(&prefix).await.unwrap();
    bad.expect_close(Code::FrameTooLarge).await;
    bystander_still_works(&server, &mut bystander, 1).await;
}

#[tokio::test]
async fn frames_before_hello_and_garbage_close_the_session() {
    let server = start(config()).await;
    let mut bystander = RawConn::open(&server).await;
    bystander.subscribe(1, "watch:1").await;
    let mut bad = RawWt::connect(&server).await;
    bad.send(publish("watch:1", "e", number(1), false)).await;
    bad.expect_close(Code::HelloRequired).await;
    let mut bad = RawWt::open(&server).await;
    bad.send_raw(Bytes::from_static(&[0xff, 0x00])).await;
    bad.expect_close(Code::ProtocolError).await;
    bystander_still_works(&server, &mut bystander, 1).await;
}

#[tokio::test]
async fn extra_client_streams_are_a_protocol_error() {
    let server = start(config()).await;
    let mut bystander = RawConn::open(&server).await;
    bystander.subscribe(1, "watch:1").await;
    let mut bad = RawWt::open(&server).await;
    let (mut extra, _recv) = bad.connection.open_bi().await.unwrap().await.unwrap();
    extra.write_all(b"x").await.unwrap();
    bad.expect_close(Code::ProtocolError).await;
    let mut bad = RawWt::open(&server).await;
    let mut uni = bad.connection.open_uni().await.unwrap().await.unwrap();
    uni.write_all(b"x").await.unwrap();
    bad.expect_close(Code::ProtocolError).await;
    bystander_still_works(&server, &mut bystander, 1).await;
}

#[tokio::test]
async fn a_session_that_never_opens_its_control_stream_is_closed() {
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let connection = session(&server, cert_hash(&server)).await.unwrap();
    expect_session_code(&connection, Code::Timeout).await;
    assert_eq!(
        metric(&server, "roomcast_errors_total{code=\"timeout\"}").await,
        1.0
    );
}

#[tokio::test]
async fn graceful_shutdown_reaches_webtransport_sessions() {
    let server = start(config()).await;
    let mut wt = RawWt::open(&server).await;
    let _room = wt.subscribe(1, "drain:1").await;
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("drain finishes")
        .expect("clean shutdown");
    wt.expect_close(Code::ShuttingDown).await;
}

fn volatile_config() -> roomcast_broker::Config {
    let mut cfg = config();
    cfg.volatile_namespaces = vec!["gps".into()];
    cfg
}

#[tokio::test]
async fn volatile_rooms_use_datagrams_both_ways() {
    let server = start(volatile_config()).await;
    let mut tracker_view = RawWt::open(&server).await;
    let mut room_stream = tracker_view.subscribe(1, "gps:truck-1").await;
    // Broker -> client: an event of a volatile room arrives as a datagram (one whole frame).
    let mut ws = RawConn::open(&server).await;
    ws.subscribe(1, "gps:truck-1").await;
    ws.send(publish("gps:truck-1", "pos", number(41), true))
        .await;
    // The publisher is subscribed too: its own event is queued before its Ack.
    assert!(matches!(ws.frame().await, ServerFrame::Event(_)));
    assert!(matches!(ws.frame().await, ServerFrame::Ack { .. }));
    let datagram = tokio::time::timeout(WAIT, tracker_view.connection.receive_datagram())
        .await
        .expect("datagram in time")
        .unwrap();
    match ServerFrame::decode(
        &datagram.payload(),
        roomcast_protocol::PayloadLimits::default(),
    )
    .unwrap()
    {
        ServerFrame::Event(e) => {
            assert_eq!(e.room.as_str(), "gps:truck-1");
            assert_eq!(e.data.decode::<u64>().unwrap(), 41);
            assert_eq!(e.seq, 1);
        }
        other => panic!("expected an Event datagram, got {other:?}"),
    }
    // Client -> broker: a tracker publishes its position as a datagram.
    let position = publish("gps:truck-1", "pos", number(42), false).encode();
    tracker_view.connection.send_datagram(position).unwrap();
    match ws.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.data.decode::<u64>().unwrap(), 42),
        other => panic!("{other:?}"),
    }
    // A reliable room still uses its stream.
    let mut orders = tracker_view.subscribe(2, "orders:1").await;
    ws.send(publish("orders:1", "status", number(7), true))
        .await;
    assert!(matches!(orders.frame().await, ServerFrame::Event(_)));
    // The volatile room's stream carried only its Subscribed so far.
    tracker_view
        .send(ClientFrame::Unsubscribe {
            id: 3,
            room: "gps:truck-1".into(),
        })
        .await;
    assert!(matches!(
        room_stream.frame().await,
        ServerFrame::Unsubscribed { id: 3, .. }
    ));
}

#[tokio::test]
async fn a_bad_datagram_closes_the_session_and_nobody_else() {
    let server = start(volatile_config()).await;
    let mut bystander = RawConn::open(&server).await;
    bystander.subscribe(1, "watch:1").await;
    let mut bad = RawWt::open(&server).await;
    bad.connection
        .send_datagram(Bytes::from_static(&[0xff, 0xfe]))
        .unwrap();
    bad.expect_close(Code::ProtocolError).await;
    bystander_still_works(&server, &mut bystander, 1).await;
}

#[tokio::test]
async fn a_slow_websocket_subscriber_of_a_volatile_room_loses_old_events_not_its_session() {
    let mut cfg = volatile_config();
    cfg.outbound_queue_bytes = 64 * 1024;
    let server = start(cfg).await;
    let mut slow = RawConn::open_slow(&server).await;
    slow.subscribe(1, "gps:fleet").await;
    let mut publisher = RawConn::open(&server).await;
    let chunk = Payload::encode(&vec![0u8; 16 * 1024])
        .unwrap()
        .as_bytes()
        .clone();
    let total = 400u64;
    for _ in 0..total {
        publisher
            .send(publish("gps:fleet", "pos", chunk.clone(), true))
            .await;
        assert!(matches!(publisher.frame().await, ServerFrame::Ack { .. }));
    }
    assert_eq!(
        metric(&server, "roomcast_slow_consumer_closes_total").await,
        0.0
    );
    // The slow subscriber now reads: old positions are gone, the latest one is there.
    let mut seen = 0u64;
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
        "some old events were dropped ({seen} of {total} seen)"
    );
    slow.ping(1).await;
}

#[tokio::test]
async fn the_rust_client_receives_volatile_events_sent_as_datagrams() {
    let server = start(volatile_config()).await;
    let options = roomcast_client::ConnectOptions {
        cert_hash: Some(cert_hash(&server)),
        ..Default::default()
    };
    let client = roomcast_client::connect(&wt_url(&server), options)
        .await
        .expect("WebTransport client");
    let mut positions = client.subscribe("gps:van-9").await.unwrap();
    let publisher = roomcast_client::connect(&server.ws_url(), Default::default())
        .await
        .unwrap();
    publisher
        .publish("gps:van-9", "pos", &(52.5, 13.4))
        .await
        .unwrap();
    let event = tokio::time::timeout(WAIT, positions.next_event())
        .await
        .expect("the volatile event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(event.decode::<(f64, f64)>().unwrap(), (52.5, 13.4));
    assert_eq!(event.seq, 1);
    assert_eq!(
        metric(&server, "roomcast_datagrams_out_total").await,
        1.0,
        "the event travelled as a datagram"
    );
}

#[tokio::test]
async fn the_rust_client_publishes_volatile_events_as_datagrams_and_falls_back_on_websocket() {
    let server = start(volatile_config()).await;
    let mut watcher = RawConn::open(&server).await;
    watcher.subscribe(1, "gps:truck-1").await;
    let options = roomcast_client::ConnectOptions {
        cert_hash: Some(cert_hash(&server)),
        ..Default::default()
    };
    let tracker = roomcast_client::connect(&wt_url(&server), options)
        .await
        .expect("WebTransport client");
    for n in 1..=5u64 {
        tracker
            .publish_volatile("gps:truck-1", "pos", &n)
            .await
            .unwrap();
        match watcher.frame().await {
            ServerFrame::Event(e) => assert_eq!(e.data.decode::<u64>().unwrap(), n),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(metric(&server, "roomcast_datagrams_in_total").await, 5.0);
    // Over WebSocket the same call sends the frame on the connection.
    let ws_tracker = roomcast_client::connect(&server.ws_url(), Default::default())
        .await
        .unwrap();
    ws_tracker
        .publish_volatile("gps:truck-1", "pos", &6u64)
        .await
        .unwrap();
    match watcher.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.data.decode::<u64>().unwrap(), 6),
        other => panic!("{other:?}"),
    }
    assert_eq!(metric(&server, "roomcast_datagrams_in_total").await, 5.0);
}

/// A payload of about `size` bytes (a CBOR text string) tagged with `n`.
fn sized(n: u64, size: usize) -> Bytes {
    Payload::encode(&(n, "x".repeat(size)))
        .unwrap()
        .as_bytes()
        .clone()
}

/// Publishes `count` events of about `size` bytes to `room` and waits for each Ack.
async fn publish_many(publisher: &mut RawConn, room: &str, count: u64, size: usize) {
    for n in 1..=count {
        publisher
            .send(publish(room, "blob", sized(n, size), true))
            .await;
        assert!(matches!(publisher.frame().await, ServerFrame::Ack { .. }));
    }
}

#[tokio::test]
async fn a_room_stream_the_client_does_not_read_does_not_hold_up_other_rooms() {
    let server = start(config()).await;
    // The client grants 8 KiB per stream, so room A's stream blocks once 8 KiB are unread.
    let mut wt = RawWt::open_with(&server, Some(8 * 1024)).await;
    let mut room_a = wt.subscribe(1, "bulk:a").await;
    let mut room_b = wt.subscribe(2, "live:b").await;
    let mut publisher = RawConn::open(&server).await;
    // 64 KiB for A: far beyond its stream window, well under the session's backlog cap.
    publish_many(&mut publisher, "bulk:a", 64, 1024).await;
    // B's events flow while A's stream is stuck.
    for n in 1..=3 {
        publisher
            .send(publish("live:b", "px", number(n), true))
            .await;
        assert!(matches!(publisher.frame().await, ServerFrame::Ack { .. }));
        match room_b.frame().await {
            ServerFrame::Event(e) => assert_eq!((e.room.as_str(), e.seq), ("live:b", n)),
            other => panic!("{other:?}"),
        }
    }
    // Once the client reads A, all of A arrives, in order.
    for n in 1..=64u64 {
        match room_a.frame().await {
            ServerFrame::Event(e) => {
                assert_eq!((e.room.as_str(), e.seq), ("bulk:a", n));
                let (tag, _): (u64, String) = e.data.decode().unwrap();
                assert_eq!(tag, n);
            }
            other => panic!("{other:?}"),
        }
    }
    wt.send(ClientFrame::Ping { id: Some(1) }).await;
    assert_eq!(wt.control.frame().await, ServerFrame::Pong { id: Some(1) });
}

#[tokio::test]
async fn a_stuck_room_stream_beyond_the_queue_cap_closes_only_that_session_as_slow() {
    let mut cfg = config();
    cfg.outbound_queue_bytes = 32 * 1024;
    let server = start(cfg).await;
    let mut stuck = RawWt::open_with(&server, Some(8 * 1024)).await;
    let _room = stuck.subscribe(1, "bulk:a").await;
    let mut reader = RawWt::open(&server).await;
    let mut readers_room = reader.subscribe(1, "bulk:a").await;
    let mut publisher = RawConn::open(&server).await;
    // 96 KiB: the stuck session's unread bytes pass 8 KiB window + 32 KiB cap.
    publish_many(&mut publisher, "bulk:a", 96, 1024).await;
    stuck.expect_close(Code::SlowConsumer).await;
    // The session that reads gets everything.
    for n in 1..=96u64 {
        match readers_room.frame().await {
            ServerFrame::Event(e) => assert_eq!(e.seq, n),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn a_slow_control_stream_gets_whole_frames_then_its_close() {
    // Every room on the control stream, which the client stops reading: when the broker gives
    // up on it, what is left on the stream is whole frames, then `Close slow_consumer`.
    let mut cfg = config();
    cfg.outbound_queue_bytes = 32 * 1024;
    cfg.wt_single_stream = true;
    let server = start(cfg).await;
    let mut stuck = RawWt::open_with(&server, Some(8 * 1024)).await;
    stuck
        .send(ClientFrame::Subscribe {
            since: None,
            id: 1,
            room: "bulk:a".into(),
        })
        .await;
    assert!(matches!(
        stuck.control.frame().await,
        ServerFrame::Subscribed { id: 1, .. }
    ));
    let mut publisher = RawConn::open(&server).await;
    let mut published = 0;
    while published < 4096 && metric(&server, "roomcast_slow_consumer_closes_total").await < 1.0 {
        publish_many(&mut publisher, "bulk:a", 16, 1000).await;
        published += 16;
    }
    assert_eq!(
        metric(&server, "roomcast_slow_consumer_closes_total").await,
        1.0
    );
    let mut events = 0;
    loop {
        match stuck.control.next().await {
            Some(ServerFrame::Event(_)) => events += 1,
            Some(ServerFrame::Close { code, .. }) => {
                assert_eq!(code, Code::SlowConsumer);
                break;
            }
            other => panic!("expected events then Close slow_consumer, got {other:?}"),
        }
    }
    assert!(
        events < published,
        "the stuck session did not get everything"
    );
    expect_session_code(&stuck.connection, Code::SlowConsumer).await;
}
