//! The client over a real WebSocket against the shared scripted fake broker (tests/common):
//! requests and their answers through the handles, the subscription buffer's `Lagged` marker,
//! close codes from the wire, the handshake, URL schemes. Session logic without sockets
//! (errors, keepalive, dead connections, duplicates) is tested on the protocol crate's pair.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{WAIT, at, fake_broker, seq_of, within};
use futures_util::{SinkExt, StreamExt};
use roomcast_client::{
    Client, CloseInfo, Code, ConnectOptions, Error, Payload, RoomName, SubscriptionError, connect,
};
use roomcast_protocol::{ClientFrame, ServerFrame};
use tokio::{net::TcpListener, time::timeout};
use tokio_tungstenite::{
    accept_async,
    tungstenite::{
        Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

async fn client(url: &str) -> Client {
    within("connect", connect(url, ConnectOptions::default()))
        .await
        .expect("connect")
}

#[tokio::test]
async fn subscribe_resolves_with_start_seq_and_events_arrive_in_order() {
    let (url, broker) = fake_broker(|mut peer| async move {
        assert_eq!(peer.handshake("s-test").await.as_deref(), Some("secret"));
        peer.accept_subscribe("orders:1042", at(0, 41)).await;
        for seq in 42..=46 {
            peer.event("orders:1042", seq, None).await;
        }
        // An event for a room nobody subscribed to is ignored.
        peer.event("other:1", 1, None).await;
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
        peer.handshake("s-test").await;
        peer.accept_subscribe("gps:7", at(0, 0)).await;
        // Round 1: five events into a buffer of two; the Pong after them tells the client
        // they have all been routed.
        match peer.recv().await {
            ClientFrame::Ping { id } => {
                for seq in 1..=5 {
                    peer.event("gps:7", seq, None).await;
                }
                peer.send(ServerFrame::Pong { id }).await;
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        // Round 2: one more event after the client freed a slot.
        match peer.recv().await {
            ClientFrame::Ping { id } => {
                peer.event("gps:7", 6, None).await;
                peer.send(ServerFrame::Pong { id }).await;
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        // Round 3: overflow with nothing after it.
        match peer.recv().await {
            ClientFrame::Ping { id } => {
                for seq in 7..=10 {
                    peer.event("gps:7", seq, None).await;
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
        peer.handshake("s-test").await;
        peer.accept_subscribe("orders:1", at(0, 3)).await;
        peer.event("orders:1", 4, None).await;
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
async fn websocket_close_without_close_frame_maps_the_code() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake("s-test").await;
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
        peer.handshake("s-test").await;
        peer.accept_subscribe("a:b", at(0, 0)).await;
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
async fn unsubscribe_waits_for_unsubscribed_and_dropping_unsubscribes_lazily() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake("s-test").await;
        peer.accept_subscribe("a:1", at(0, 0)).await;
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
        peer.accept_subscribe("a:2", at(0, 5)).await;
        // The client dropped that subscription; the next event makes it leave the room.
        peer.answer_ping().await;
        peer.event("a:2", 6, None).await;
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
        peer.accept_subscribe("a:2", at(0, 6)).await;
        peer.event("a:2", 7, None).await;
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
async fn client_close_sends_websocket_close_1000() {
    let (url, broker) = fake_broker(|mut peer| async move {
        peer.handshake("s-test").await;
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
        peer.handshake("s-test").await;
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
        peer.handshake("s-test").await;
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
        peer.handshake("s-test").await;
        peer.accept_subscribe("a:b", at(0, 0)).await;
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
