//! The client's connection logic against a scripted fake broker: a tokio-tungstenite server on
//! 127.0.0.1 port 0 that plays one session from the broker's side, frame by frame.

use std::{future::Future, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use roomcast_client::{
    Client, CloseInfo, Code, ConnectOptions, Error, EventName, Payload, RoomName,
    SubscriptionError, connect,
};
use roomcast_protocol::{
    ClientFrame, PROTOCOL_VERSION, ServerFrame,
    frame::{Event, Welcome},
};
use tokio::{net::TcpListener, task::JoinHandle, time::timeout};
use tokio_tungstenite::{
    WebSocketStream, accept_async,
    tungstenite::{
        Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

/// Bound on every wait in these tests, so a bug fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(5);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The broker's end of one session.
struct Peer {
    ws: WebSocketStream<tokio::net::TcpStream>,
}

impl Peer {
    /// The next client frame; WebSocket control messages are skipped.
    async fn recv(&mut self) -> ClientFrame {
        loop {
            let message = within("a client frame", self.ws.next())
                .await
                .expect("client hung up")
                .expect("websocket error");
            match message {
                Message::Binary(bytes) => {
                    return ClientFrame::decode(&bytes).expect("client sent a bad frame");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message from client: {other:?}"),
            }
        }
    }

    /// The next message of any kind, raw (None when the stream ended).
    async fn recv_message(&mut self) -> Option<Message> {
        within("a client message", self.ws.next())
            .await
            .map(|m| m.expect("websocket error"))
    }

    async fn send(&mut self, frame: ServerFrame) {
        self.ws
            .send(Message::Binary(frame.encode()))
            .await
            .expect("send to client");
    }

    /// Reads `Hello` (returning its token) and answers `Welcome`.
    async fn handshake_with(
        &mut self,
        ping_interval_ms: u64,
        idle_timeout_ms: u64,
    ) -> Option<String> {
        let token = match self.recv().await {
            ClientFrame::Hello { version, token } => {
                assert_eq!(version, PROTOCOL_VERSION);
                token
            }
            other => panic!("expected Hello, got {other:?}"),
        };
        self.send(ServerFrame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session_id: "s-test".into(),
            server_time_ms: 1_700_000_000_000,
            max_frame_size: 65536,
            ping_interval_ms,
            idle_timeout_ms,
        }))
        .await;
        token
    }

    async fn handshake(&mut self) -> Option<String> {
        self.handshake_with(25_000, 60_000).await
    }

    /// Expects `Subscribe` for `room` and confirms it at `seq`.
    async fn accept_subscribe(&mut self, room: &str, seq: u64) {
        match self.recv().await {
            ClientFrame::Subscribe {
                id, room: asked, ..
            } => {
                assert_eq!(asked, room);
                self.send(ServerFrame::Subscribed {
                    epoch: 0,
                    recovered: None,
                    id,
                    room: RoomName::new(room).unwrap(),
                    seq,
                })
                .await;
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
    }

    /// Expects `Ping { id }` and answers `Pong`.
    async fn answer_ping(&mut self) {
        match self.recv().await {
            ClientFrame::Ping { id: Some(id) } => {
                self.send(ServerFrame::Pong { id: Some(id) }).await
            }
            other => panic!("expected Ping with id, got {other:?}"),
        }
    }

    async fn event(&mut self, room: &str, seq: u64) {
        self.send(ServerFrame::Event(Event {
            epoch: None,
            room: RoomName::new(room).unwrap(),
            event: EventName::new("tick").unwrap(),
            data: Payload::encode(&seq).unwrap(),
            seq,
        }))
        .await;
    }

    /// Ends the session the way the broker does: `Close` frame, then a WebSocket close.
    async fn close(&mut self, code: Code, reason: &str) {
        self.send(ServerFrame::Close {
            retry_after_ms: None,
            code,
            reason: reason.into(),
            reconnect: code.should_retry(),
        })
        .await;
        let frame = CloseFrame {
            code: CloseCode::from(code.ws_close_code()),
            reason: reason.into(),
        };
        let _ = self.ws.close(Some(frame)).await;
        // Let the client answer the close.
        while let Ok(Some(Ok(_))) = timeout(WAIT, self.ws.next()).await {}
    }
}

/// Starts a fake broker that runs `script` on the first connection; returns its URL.
async fn fake_broker<F, Fut>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = accept_async(tcp).await.unwrap();
        script(Peer { ws }).await;
    });
    (url, task)
}

async fn client(url: &str) -> Client {
    within("connect", connect(url, ConnectOptions::default()))
        .await
        .expect("connect")
}

fn seq_of(item: Option<Result<roomcast_client::EventMessage, SubscriptionError>>) -> u64 {
    let event = item.expect("stream ended").expect("expected an event");
    let decoded: u64 = event.decode().unwrap();
    assert_eq!(decoded, event.seq, "payload travels with its event");
    event.seq
}

#[tokio::test]
async fn subscribe_resolves_with_start_seq_and_events_arrive_in_order() {
    let (url, broker) = fake_broker(|mut peer| async move {
        assert_eq!(peer.handshake().await.as_deref(), Some("secret"));
        peer.accept_subscribe("orders:1042", 41).await;
        for seq in 42..=46 {
            peer.event("orders:1042", seq).await;
        }
        // An event for a room nobody subscribed to is ignored.
        peer.event("other:1", 1).await;
        match peer.recv().await {
            ClientFrame::Publish {
                id,
                room,
                event,
                data,
                ack,
                ..
            } => {
                assert_eq!(
                    (room.as_str(), event.as_str(), ack),
                    ("orders:1042", "status", true)
                );
                assert_eq!(
                    Payload::new(data, Default::default())
                        .unwrap()
                        .decode::<String>()
                        .unwrap(),
                    "shipped"
                );
                peer.send(ServerFrame::Ack { id, seq: Some(47) }).await;
            }
            other => panic!("expected Publish, got {other:?}"),
        }
        peer.close(Code::Normal, "bye").await;
    })
    .await;

    let options = ConnectOptions {
        token: Some("secret".into()),
        ..ConnectOptions::default()
    };
    let client = within("connect", connect(&url, options)).await.unwrap();
    assert_eq!(client.session_id(), "s-test");
    let mut sub = within("subscribe", client.subscribe("orders:1042"))
        .await
        .unwrap();
    assert_eq!(sub.start_seq(), 41);
    assert_eq!(sub.room().as_str(), "orders:1042");
    let mut seqs = Vec::new();
    for _ in 42..=46 {
        seqs.push(seq_of(within("event", sub.next_event()).await));
    }
    assert_eq!(seqs, vec![42, 43, 44, 45, 46]);
    let acked = within(
        "publish",
        client.publish("orders:1042", "status", "shipped"),
    )
    .await;
    assert_eq!(acked, Ok(Some(47)));
    let info = within("close", client.closed()).await;
    assert_eq!(info.code, Some(Code::Normal));
    assert_eq!(info.reason, "bye");
    broker.await.unwrap();
}

#[tokio::test]
async fn full_buffer_drops_events_and_reports_lagged_where_the_gap_is() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.accept_subscribe("gps:7", 0).await;
        // Round 1: five events into a buffer of two; the Pong after them tells the client
        // they have all been routed.
        match peer.recv().await {
            ClientFrame::Ping { id } => {
                for seq in 1..=5 {
                    peer.event("gps:7", seq).await;
                }
                peer.send(ServerFrame::Pong { id }).await;
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        // Round 2: one more event after the client freed a slot.
        match peer.recv().await {
            ClientFrame::Ping { id } => {
                peer.event("gps:7", 6).await;
                peer.send(ServerFrame::Pong { id }).await;
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        // Round 3: overflow with nothing after it.
        match peer.recv().await {
            ClientFrame::Ping { id } => {
                for seq in 7..=10 {
                    peer.event("gps:7", seq).await;
                }
                peer.send(ServerFrame::Pong { id }).await;
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        peer.close(Code::Normal, "").await;
    })
    .await;

    let options = ConnectOptions {
        subscription_buffer: 2,
        ..ConnectOptions::default()
    };
    let client = within("connect", connect(&url, options)).await.unwrap();
    let mut sub = client.subscribe("gps:7").await.unwrap();

    within("ping", client.ping()).await.unwrap();
    assert_eq!(seq_of(sub.next_event().await), 1);
    within("ping", client.ping()).await.unwrap();
    assert_eq!(seq_of(sub.next_event().await), 2);
    assert_eq!(
        sub.next_event().await,
        Some(Err(SubscriptionError::Lagged { missed: 3 })),
        "the gap 3..=5 is reported between 2 and 6"
    );
    assert_eq!(seq_of(sub.next_event().await), 6);

    within("ping", client.ping()).await.unwrap();
    assert_eq!(seq_of(sub.next_event().await), 7);
    assert_eq!(seq_of(sub.next_event().await), 8);
    assert_eq!(
        within("lag", sub.next_event()).await,
        Some(Err(SubscriptionError::Lagged { missed: 2 })),
        "a trailing gap is reported once the buffer is drained"
    );
    match within("end", sub.next_event()).await {
        Some(Err(SubscriptionError::Closed(info))) => assert_eq!(info.code, Some(Code::Normal)),
        other => panic!("expected Closed, got {other:?}"),
    }
    broker.await.unwrap();
}

#[tokio::test]
async fn broker_close_fails_pending_requests_and_ends_subscriptions_with_its_code() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.accept_subscribe("orders:1", 3).await;
        peer.event("orders:1", 4).await;
        // Leave the publish unanswered and shut down.
        assert!(matches!(
            peer.recv().await,
            ClientFrame::Publish { ack: true, .. }
        ));
        peer.close(Code::ShuttingDown, "draining").await;
    })
    .await;

    let client = client(&url).await;
    let mut sub = client.subscribe("orders:1").await.unwrap();
    let publish = within("publish", client.publish("orders:1", "e", &1u8)).await;
    let expected = CloseInfo {
        code: Some(Code::ShuttingDown),
        reason: "draining".into(),
        reconnect: true,
    };
    match &publish {
        Err(Error::Closed(info)) => assert_eq!(info, &expected),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(publish.unwrap_err().code(), Some(Code::ShuttingDown));

    // The event that arrived before the close is still delivered, then the end.
    assert_eq!(seq_of(within("event", sub.next_event()).await), 4);
    assert_eq!(
        within("end", sub.next_event()).await,
        Some(Err(SubscriptionError::Closed(expected.clone())))
    );
    assert_eq!(sub.next_event().await, None);

    assert_eq!(within("closed", client.closed()).await, expected);
    // Requests after the end fail at once with the same information.
    assert_eq!(client.ping().await, Err(Error::Closed(expected.clone())));
    assert_eq!(
        client.subscribe("orders:2").await.unwrap_err(),
        Error::Closed(expected.clone())
    );
    broker.await.unwrap();
}

#[tokio::test]
async fn pending_subscribe_fails_when_the_broker_closes() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        assert!(matches!(peer.recv().await, ClientFrame::Subscribe { .. }));
        peer.close(Code::SlowConsumer, "too slow").await;
    })
    .await;
    let client = client(&url).await;
    let error = within("subscribe", client.subscribe("orders:1"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::SlowConsumer));
    broker.await.unwrap();
}

#[tokio::test]
async fn websocket_close_without_close_frame_maps_the_code() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let frame = CloseFrame {
            code: CloseCode::from(Code::Timeout.ws_close_code()),
            reason: "idle".into(),
        };
        peer.ws.close(Some(frame)).await.unwrap();
        while let Ok(Some(Ok(_))) = timeout(WAIT, peer.ws.next()).await {}
    })
    .await;
    let client = client(&url).await;
    let info = within("closed", client.closed()).await;
    assert_eq!(info.code, Some(Code::Timeout));
    assert_eq!(info.reason, "idle");
    assert!(info.reconnect);
    broker.await.unwrap();
}

#[tokio::test]
async fn dropped_transport_ends_the_session_without_a_code() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.accept_subscribe("a:b", 0).await;
        drop(peer);
    })
    .await;
    let client = client(&url).await;
    let mut sub = client.subscribe("a:b").await.unwrap();
    match within("end", sub.next_event()).await {
        Some(Err(SubscriptionError::Closed(info))) => {
            assert_eq!(info.code, None);
            assert!(info.reconnect);
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(within("closed", client.closed()).await.code, None);
    broker.await.unwrap();
}

#[tokio::test]
async fn broker_errors_are_returned_and_the_session_goes_on() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        match peer.recv().await {
            ClientFrame::Subscribe { id, room, .. } => {
                assert_eq!(room, "bad room");
                peer.send(ServerFrame::Error {
                    id: Some(id),
                    code: Code::InvalidRoom,
                    message: "no namespace".into(),
                    retry_after_ms: None,
                })
                .await;
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
        // An error naming no request is only logged.
        peer.send(ServerFrame::Error {
            id: None,
            code: Code::UnknownFrame,
            message: "?".into(),
            retry_after_ms: None,
        })
        .await;
        peer.accept_subscribe("a:b", 9).await;
        match peer.recv().await {
            ClientFrame::Publish { id, ack: true, .. } => {
                peer.send(ServerFrame::Error {
                    id: Some(id),
                    code: Code::InvalidPayload,
                    message: "not CBOR".into(),
                    retry_after_ms: None,
                })
                .await;
            }
            other => panic!("expected Publish, got {other:?}"),
        }
        peer.answer_ping().await;
        peer.close(Code::Normal, "").await;
    })
    .await;
    let client = client(&url).await;
    let error = client.subscribe("bad room").await.unwrap_err();
    assert_eq!(
        error,
        Error::Server {
            code: Code::InvalidRoom,
            message: "no namespace".into()
        }
    );
    assert_eq!(error.code(), Some(Code::InvalidRoom));
    let sub = client.subscribe("a:b").await.unwrap();
    assert_eq!(sub.start_seq(), 9);
    // A second subscription to the same room on the same connection is refused locally.
    assert_eq!(
        client.subscribe("a:b").await.unwrap_err(),
        Error::AlreadySubscribed("a:b".into())
    );
    let error = client.publish("a:b", "e", &0u8).await.unwrap_err();
    assert_eq!(error.code(), Some(Code::InvalidPayload));
    assert!(within("ping", client.ping()).await.is_ok());
    within("closed", client.closed()).await;
    broker.await.unwrap();
}

#[tokio::test]
async fn unsubscribe_waits_for_unsubscribed_and_dropping_unsubscribes_lazily() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.accept_subscribe("a:1", 0).await;
        match peer.recv().await {
            ClientFrame::Unsubscribe { id, room } => {
                assert_eq!(room, "a:1");
                peer.send(ServerFrame::Unsubscribed {
                    id,
                    room: RoomName::new("a:1").unwrap(),
                })
                .await;
            }
            other => panic!("expected Unsubscribe, got {other:?}"),
        }
        peer.accept_subscribe("a:2", 5).await;
        // The client dropped that subscription; the next event makes it leave the room.
        peer.answer_ping().await;
        peer.event("a:2", 6).await;
        match peer.recv().await {
            ClientFrame::Unsubscribe { id, room } => {
                assert_eq!(room, "a:2");
                peer.send(ServerFrame::Unsubscribed {
                    id,
                    room: RoomName::new("a:2").unwrap(),
                })
                .await;
            }
            other => panic!("expected automatic Unsubscribe, got {other:?}"),
        }
        // Subscribing again to the room works.
        peer.accept_subscribe("a:2", 6).await;
        peer.event("a:2", 7).await;
        peer.close(Code::Normal, "").await;
    })
    .await;
    let client = client(&url).await;
    let sub = client.subscribe("a:1").await.unwrap();
    within("unsubscribe", sub.unsubscribe()).await.unwrap();
    let dropped = client.subscribe("a:2").await.unwrap();
    drop(dropped);
    client.ping().await.unwrap();
    // Whether or not the automatic unsubscribe has gone out yet, a dropped subscription
    // does not block a new one (no AlreadySubscribed).
    let mut again = within("resubscribe", client.subscribe("a:2"))
        .await
        .unwrap();
    assert_eq!(again.start_seq(), 6);
    assert_eq!(seq_of(within("event", again.next_event()).await), 7);
    broker.await.unwrap();
}

#[tokio::test]
async fn keepalive_pings_at_the_welcome_interval() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake_with(50, 0).await;
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            match peer.recv().await {
                ClientFrame::Ping { id: None } => peer.send(ServerFrame::Pong { id: None }).await,
                other => panic!("expected keepalive Ping, got {other:?}"),
            }
        }
        // Three pings at a 50 ms interval take at least ~150 ms, and far less than seconds.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(140),
            "pinged too often: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "pinged too rarely: {elapsed:?}"
        );
        peer.close(Code::Normal, "").await;
    })
    .await;
    let client = client(&url).await;
    within("closed", client.closed()).await;
    broker.await.unwrap();
}

#[tokio::test]
async fn silent_broker_is_detected() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake_with(20, 100).await;
        // Read pings but never answer.
        while let Some(message) = peer.recv_message().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    let client = client(&url).await;
    let info = within("closed", client.closed()).await;
    assert_eq!(info.code, None);
    assert!(info.reason.contains("nothing received"), "{}", info.reason);
    broker.await.unwrap();
}

#[tokio::test]
async fn client_close_sends_websocket_close_1000() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        match peer.recv_message().await {
            Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1000),
            other => panic!("expected a close frame, got {other:?}"),
        }
    })
    .await;
    let client = client(&url).await;
    let other_handle = client.clone();
    within("close", client.close()).await;
    let info = within("closed", other_handle.closed()).await;
    assert_eq!(
        info,
        CloseInfo {
            code: Some(Code::Normal),
            reason: "closed by the client".into(),
            reconnect: false
        }
    );
    assert!(matches!(
        other_handle.send_raw(Bytes::from_static(b"x")).await,
        Err(Error::Closed(_))
    ));
    broker.await.unwrap();
}

#[tokio::test]
async fn send_raw_and_unacked_publish_reach_the_wire() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        match peer.recv_message().await {
            Some(Message::Binary(bytes)) => assert_eq!(&bytes[..], &[0xff, 0x00]),
            other => panic!("expected the raw bytes, got {other:?}"),
        }
        match peer.recv().await {
            ClientFrame::Publish { ack, room, .. } => {
                assert!(!ack);
                assert_eq!(room, "a:b");
            }
            other => panic!("expected Publish, got {other:?}"),
        }
        peer.close(Code::ProtocolError, "bad frame").await;
    })
    .await;
    let client = client(&url).await;
    client
        .send_raw(Bytes::from_static(&[0xff, 0x00]))
        .await
        .unwrap();
    let payload = Payload::encode(&"x").unwrap();
    assert_eq!(
        client.publish_payload("a:b", "e", payload, false).await,
        Ok(None)
    );
    let info = within("closed", client.closed()).await;
    assert_eq!(info.code, Some(Code::ProtocolError));
    assert!(!info.reconnect);
    broker.await.unwrap();
}

#[tokio::test]
async fn garbage_from_the_broker_closes_the_session_with_a_protocol_error() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        assert!(matches!(
            peer.recv().await,
            ClientFrame::Ping { id: Some(_) }
        ));
        peer.ws
            .send(Message::Binary(Bytes::from_static(&[0xa1, 0x61])))
            .await
            .unwrap();
        match peer.recv_message().await {
            Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1002),
            other => panic!("expected a close frame, got {other:?}"),
        }
    })
    .await;
    let client = client(&url).await;
    match within("ping", client.ping()).await {
        Err(Error::Closed(info)) => {
            assert_eq!(info.code, None);
            assert!(info.reason.starts_with("protocol error"), "{}", info.reason);
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    broker.await.unwrap();
}

#[tokio::test]
async fn handshake_refusal_and_timeout() {
    // The broker refuses the session with a Close frame.
    let (url, broker) = fake_broker(|mut peer| async move {
        assert!(matches!(peer.recv().await, ClientFrame::Hello { .. }));
        peer.close(Code::UnsupportedVersion, "too new").await;
    })
    .await;
    let error = within("connect", connect(&url, ConnectOptions::default()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::UnsupportedVersion));
    broker.await.unwrap();

    // The broker never answers Hello.
    let (url, broker) = fake_broker(|mut peer| async move {
        assert!(matches!(peer.recv().await, ClientFrame::Hello { .. }));
        let _ = timeout(WAIT, peer.ws.next()).await;
    })
    .await;
    let options = ConnectOptions {
        connect_timeout: Duration::from_millis(200),
        ..ConnectOptions::default()
    };
    let error = within("connect", connect(&url, options)).await.unwrap_err();
    assert_eq!(error, Error::Timeout);
    broker.abort();
}

#[tokio::test]
async fn url_schemes() {
    // https:// selects WebTransport (tests/wt_fake_broker.rs): with nobody on the just-freed
    // UDP port, connecting fails or times out instead of being refused as a URL.
    let free = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let options = ConnectOptions {
        connect_timeout: Duration::from_millis(300),
        ..ConnectOptions::default()
    };
    let error = within(
        "https connect",
        connect(&format!("https://{free}/wt"), options),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, Error::Timeout | Error::Transport(_)),
        "{error:?}"
    );
    assert!(matches!(
        connect("http://127.0.0.1:1/ws", ConnectOptions::default()).await,
        Err(Error::InvalidUrl(_))
    ));

    // wss:// really speaks TLS: against a plain WebSocket server the TLS handshake fails.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = accept_async(tcp).await;
    });
    let error = within(
        "wss connect",
        connect(&format!("wss://{addr}/ws"), ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::Transport(_)), "{error:?}");
    server.abort();

    // Nothing listening: a transport error, not a hang.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let error = within(
        "connect",
        connect(&format!("ws://{addr}/ws"), ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::Transport(_)), "{error:?}");
}

#[tokio::test]
async fn waiting_subscriber_is_woken_by_broker_close() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.accept_subscribe("a:b", 0).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        peer.close(Code::ShuttingDown, "bye").await;
    })
    .await;
    let client = client(&url).await;
    let mut sub = client.subscribe("a:b").await.unwrap();
    match within("end", sub.next_event()).await {
        Some(Err(SubscriptionError::Closed(info))) => {
            assert_eq!(info.code, Some(Code::ShuttingDown))
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    broker.await.unwrap();
}
