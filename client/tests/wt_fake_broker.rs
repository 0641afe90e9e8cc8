//! The client's WebTransport transport against the shared scripted fake broker
//! (tests/common/wt.rs): certificate pinning and roots, the control stream and room streams,
//! session close codes, frame limits.

mod common;

use std::time::Duration;

use common::{
    seq_of, within,
    wt::{Fake, fake_broker},
};
use roomcast_client::{
    Client, CloseInfo, Code, ConnectOptions, Error, Payload, RoomName, SubscriptionError, connect,
};
use roomcast_protocol::{ClientFrame, ServerFrame, stream::write_prefix};
use wtransport::{VarInt, error::ConnectionError};

async fn client(fake: &Fake) -> Client {
    within("connect", connect(&fake.url, fake.pinned()))
        .await
        .expect("connect")
}

#[tokio::test]
async fn pinned_hash_connects_and_hello_welcome_use_the_control_stream() {
    let fake = fake_broker(|mut peer| async move {
        assert_eq!(peer.handshake().await.as_deref(), Some("secret"));
        // Keepalive pings work unchanged on the control stream.
        match peer.recv().await {
            ClientFrame::Ping { id: Some(id) } => {
                peer.send(ServerFrame::Pong { id: Some(id) }).await
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        // The client's close ends the session with code 0.
        let ended = within("the client's close", peer.connection.closed()).await;
        match ended {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.code(), VarInt::from_u32(0));
            }
            other => panic!("expected an application close, got {other:?}"),
        }
    });
    let options = ConnectOptions {
        token: Some("secret".into()),
        ..fake.pinned()
    };
    let client = within("connect", connect(&fake.url, options))
        .await
        .expect("connect with the pinned hash");
    assert_eq!(client.session_id(), "s-wt");
    assert_eq!(client.max_frame_size(), 65536);
    within("ping", client.ping()).await.expect("pong");
    within("close", client.close()).await;
    assert_eq!(client.closed().await, closed_by_client());
    fake.done().await;
}

fn closed_by_client() -> CloseInfo {
    CloseInfo {
        code: Some(Code::Normal),
        reason: "closed by the client".into(),
        reconnect: false,
    }
}

#[tokio::test]
async fn a_wrong_certificate_hash_is_refused() {
    let fake = fake_broker(|_peer| async move {
        panic!("no session may open with a wrong certificate hash");
    });
    let mut wrong = fake.hash;
    wrong[0] ^= 0xff;
    let options = ConnectOptions {
        cert_hash: Some(wrong),
        ..ConnectOptions::default()
    };
    match within("connect", connect(&fake.url, options)).await {
        Err(Error::Transport(message)) => {
            assert!(!message.is_empty());
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    // The fake's QUIC handshake failed, so its script never ran.
    let panic = within("the fake broker", fake.task)
        .await
        .expect_err("the fake must not get a session")
        .into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("QUIC handshake"), "{message}");
}

#[tokio::test]
async fn default_roots_refuse_a_self_signed_broker() {
    let fake = fake_broker(|_peer| async move {
        panic!("no session may open without trusting the certificate");
    });
    match within("connect", connect(&fake.url, ConnectOptions::default())).await {
        Err(Error::Transport(_)) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    fake.task.abort();
}

#[tokio::test]
async fn ca_file_and_insecure_also_connect() {
    for mode in ["ca_file", "insecure"] {
        let fake = fake_broker(|mut peer| async move {
            peer.handshake().await;
            peer.connection.closed().await;
        });
        let dir = std::env::temp_dir().join(format!("roomcast-wt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join(format!("{mode}.pem"));
        std::fs::write(&ca, &fake.pem).unwrap();
        let options = match mode {
            "ca_file" => ConnectOptions {
                ca_file: Some(ca.clone()),
                ..ConnectOptions::default()
            },
            _ => ConnectOptions {
                insecure: true,
                ..ConnectOptions::default()
            },
        };
        let client = within("connect", connect(&fake.url, options))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        client.close().await;
        fake.done().await;
        let _ = std::fs::remove_file(&ca);
    }
}

#[tokio::test]
async fn subscribe_resolves_on_the_room_stream_and_rooms_keep_their_order() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let mut a = peer.accept_subscribe("ticks:a", 10).await;
        let mut b = peer.accept_subscribe("ticks:b", 100).await;
        // Interleaved across the two streams; each stream in order.
        for i in 1..=20 {
            a.event("ticks:a", 10 + i).await;
            b.event("ticks:b", 100 + i).await;
        }
        // Leaving room a: Unsubscribed on its stream, then FIN.
        match peer.recv().await {
            ClientFrame::Unsubscribe { id, room } => {
                assert_eq!(room, "ticks:a");
                a.send(ServerFrame::Unsubscribed {
                    id,
                    room: RoomName::new("ticks:a").unwrap(),
                })
                .await;
                a.finish().await;
            }
            other => panic!("expected Unsubscribe, got {other:?}"),
        }
        // Room b goes on after room a's stream ended.
        b.event("ticks:b", 121).await;
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let mut a = within("subscribe a", client.subscribe("ticks:a"))
        .await
        .expect("Subscribed on a room stream resolves subscribe");
    assert_eq!(a.start_seq(), 10);
    let mut b = within("subscribe b", client.subscribe("ticks:b"))
        .await
        .expect("subscribe b");
    assert_eq!(b.start_seq(), 100);
    for i in 1..=20 {
        assert_eq!(seq_of(within("event a", a.next_event()).await), 10 + i);
    }
    for i in 1..=20 {
        assert_eq!(seq_of(within("event b", b.next_event()).await), 100 + i);
    }
    within("unsubscribe a", a.unsubscribe())
        .await
        .expect("Unsubscribed on the room stream");
    assert_eq!(seq_of(within("event b", b.next_event()).await), 121);
    client.close().await;
    fake.done().await;
}

#[tokio::test]
async fn an_ack_on_the_control_stream_resolves_publish() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let mut room = peer.accept_subscribe("orders:1", 4).await;
        let id = peer.expect_publish("orders:1").await;
        // The Ack overtakes the publisher's own echo: it goes out first, on another stream.
        peer.send(ServerFrame::Ack { id, seq: Some(5) }).await;
        room.event("orders:1", 5).await;
        // A publish without ack sent just before the client closes still arrives.
        match peer.recv().await {
            ClientFrame::Publish { ack: false, .. } => {}
            other => panic!("expected Publish without ack, got {other:?}"),
        }
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let mut orders = client.subscribe("orders:1").await.unwrap();
    let seq = within("publish", client.publish("orders:1", "status", &5u64))
        .await
        .expect("ack");
    assert_eq!(seq, Some(5));
    assert_eq!(seq_of(within("echo", orders.next_event()).await), 5);
    client
        .publish_payload("orders:1", "status", Payload::encode(&6u64).unwrap(), false)
        .await
        .unwrap();
    client.close().await;
    fake.done().await;
}

#[tokio::test]
async fn a_close_frame_on_the_control_stream_ends_pending_requests_with_its_code() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let _room = peer.accept_subscribe("orders:1", 0).await;
        peer.expect_publish("orders:1").await;
        peer.close(Code::SlowConsumer, "too slow", true).await;
    });
    let client = client(&fake).await;
    let mut orders = client.subscribe("orders:1").await.unwrap();
    let expected = CloseInfo {
        code: Some(Code::SlowConsumer),
        // The frame's reason, not the session close's ("slow_consumer"): the frame came first.
        reason: "too slow".into(),
        reconnect: true,
    };
    let published = within("publish", client.publish("orders:1", "e", &1u64)).await;
    assert_eq!(published, Err(Error::Closed(expected.clone())));
    assert_eq!(
        within("subscription end", orders.next_event()).await,
        Some(Err(SubscriptionError::Closed(expected.clone())))
    );
    assert_eq!(within("closed", client.closed()).await, expected);
    fake.done().await;
}

#[tokio::test]
async fn a_session_closed_with_4001_and_no_close_frame_is_shutting_down() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.expect_publish("orders:1").await;
        peer.close_session(Code::ShuttingDown);
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let expected = CloseInfo {
        code: Some(Code::ShuttingDown),
        reason: "shutting_down".into(),
        reconnect: true,
    };
    let published = within("publish", client.publish("orders:1", "e", &1u64)).await;
    assert_eq!(published, Err(Error::Closed(expected.clone())));
    assert_eq!(within("closed", client.closed()).await, expected);
    // Nothing more can be asked of a closed session.
    assert_eq!(
        client.subscribe("orders:1").await.map(|_| ()),
        Err(Error::Closed(expected))
    );
    fake.done().await;
}

#[tokio::test]
async fn an_oversized_frame_on_a_room_stream_ends_the_session() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let mut room = peer.accept_subscribe("big:1", 0).await;
        // Announce a frame far beyond the client's limit (Welcome said 64 KiB) and send a
        // little of it: the client must give up without buffering it.
        let mut prefix = Vec::new();
        write_prefix(64 << 20, &mut prefix);
        room.send.write_all(&prefix).await.unwrap();
        room.send.write_all(&[0u8; 1024]).await.unwrap();
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let mut big = client.subscribe("big:1").await.unwrap();
    match within("subscription end", big.next_event()).await {
        Some(Err(SubscriptionError::Closed(info))) => {
            assert_eq!(info.code, None);
            assert!(info.reason.contains("exceeds the limit"), "{}", info.reason);
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    // The transport was dropped broken: the session ends for the broker too.
    fake.done().await;
}

#[tokio::test]
async fn room_stream_frames_that_overtake_welcome_do_not_break_the_handshake() {
    // QUIC does not order streams: the broker's own join (Subscribed id 0 on a room stream)
    // can be read before Welcome on the control stream (PROTOCOL.md §2b).
    let fake = fake_broker(|mut peer| async move {
        match peer.recv().await {
            ClientFrame::Hello { .. } => {}
            other => panic!("expected Hello, got {other:?}"),
        }
        let mut personal = peer.open_room_stream().await;
        personal
            .send(ServerFrame::Subscribed {
                id: 0,
                room: RoomName::new("user:alice").unwrap(),
                seq: 0,
                epoch: 0,
                recovered: None,
            })
            .await;
        // Give the client time to read the room stream first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        peer.handshake_welcome().await;
        match peer.recv().await {
            ClientFrame::Ping { id: Some(id) } => {
                peer.send(ServerFrame::Pong { id: Some(id) }).await
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    assert_eq!(client.session_id(), "s-wt");
    within("ping", client.ping())
        .await
        .expect("the session works");
    client.close().await;
    fake.done().await;
}
