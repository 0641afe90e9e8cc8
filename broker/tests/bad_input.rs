//! Every bad input gets its code, and another session in the same broker keeps working.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use roomcast_protocol::{ClientFrame, Code, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

/// A bystander subscribed to `watch:room`, plus a publisher: after each bad input we prove a
/// publish still reaches the bystander.
struct Bystander {
    subscriber: RawConn,
    publisher: RawConn,
    next: u64,
}

impl Bystander {
    async fn new(server: &roomcast_broker::Server) -> Bystander {
        let mut subscriber = RawConn::open(server).await;
        subscriber.subscribe(1, "watch:room").await;
        Bystander {
            subscriber,
            publisher: RawConn::open(server).await,
            next: 0,
        }
    }

    async fn still_works(&mut self) {
        self.next += 1;
        self.publisher
            .send(ClientFrame::Publish {
                key: None,
                id: self.next,
                room: "watch:room".into(),
                event: "tick".into(),
                data: roomcast_protocol::Payload::encode(&self.next)
                    .unwrap()
                    .as_bytes()
                    .clone(),
                ack: true,
            })
            .await;
        assert!(matches!(
            self.publisher.frame().await,
            ServerFrame::Ack { .. }
        ));
        match self.subscriber.frame().await {
            ServerFrame::Event(e) => {
                assert_eq!(e.seq, self.next);
                assert_eq!(e.data.decode::<u64>().unwrap(), self.next);
            }
            other => panic!("bystander expected an event, got {other:?}"),
        }
    }
}

fn publish(room: &str, event: &str, data: &[u8]) -> ClientFrame {
    ClientFrame::Publish {
        key: None,
        id: 77,
        room: room.into(),
        event: event.into(),
        data: Bytes::copy_from_slice(data),
        ack: true,
    }
}

#[tokio::test]
async fn invalid_cbor_closes_with_protocol_error() {
    let server = start(config()).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::open(&server).await;
    bad.send_bytes(Bytes::from_static(&[0xff, 0x00, 0x13]))
        .await;
    bad.expect_close(Code::ProtocolError).await;
    bystander.still_works().await;
    // A map with a text key is CBOR but not a frame.
    let mut bad = RawConn::open(&server).await;
    bad.send_bytes(Bytes::from_static(&[0xa1, 0x61, 0x74, 0x01]))
        .await;
    bad.expect_close(Code::ProtocolError).await;
    bystander.still_works().await;
}

#[tokio::test]
async fn text_message_closes_with_protocol_error() {
    let server = start(config()).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::open(&server).await;
    bad.ws.send(Message::text("{\"t\":4}")).await.unwrap();
    bad.expect_close(Code::ProtocolError).await;
    bystander.still_works().await;
}

#[tokio::test]
async fn unknown_frame_type_is_an_error_and_the_session_goes_on() {
    let server = start(config()).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::open(&server).await;
    // {0: 15, 1: 9}: type 15 is unassigned.
    bad.send_bytes(Bytes::from_static(&[0xa2, 0x00, 0x0f, 0x01, 0x09]))
        .await;
    bad.expect_error(Some(9), Code::UnknownFrame).await;
    bad.ping(1).await;
    bystander.still_works().await;
}

#[tokio::test]
async fn a_broker_frame_type_sent_by_a_client_is_an_unknown_frame() {
    let server = start(config()).await;
    let mut bad = RawConn::open(&server).await;
    // {0: 19, 1: 7}: an Event's type (broker frames are 16-31), from the client.
    bad.send_bytes(Bytes::from_static(&[0xa2, 0x00, 0x13, 0x01, 0x07]))
        .await;
    bad.expect_error(Some(7), Code::UnknownFrame).await;
    // {0: 16}: a Welcome's type, without an id: the Error carries none.
    bad.send_bytes(Bytes::from_static(&[0xa1, 0x00, 0x10]))
        .await;
    bad.expect_error(None, Code::UnknownFrame).await;
    bad.ping(1).await;
}

#[tokio::test]
async fn frame_over_max_size_closes_with_frame_too_large() {
    let mut cfg = config();
    cfg.max_frame_size = 1024;
    let server = start(cfg).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::open(&server).await;
    let big = roomcast_protocol::Payload::encode(&"x".repeat(2000)).unwrap();
    bad.send(publish("watch:room", "big", big.as_bytes())).await;
    bad.expect_close(Code::FrameTooLarge).await;
    bystander.still_works().await;
}

#[tokio::test]
async fn deeply_nested_data_is_refused_with_invalid_payload() {
    let server = start(config()).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::open(&server).await;
    let mut deep = vec![0x81u8; 500];
    deep.push(0x00);
    bad.send(publish("watch:room", "deep", &deep)).await;
    bad.expect_error(Some(77), Code::InvalidPayload).await;
    // Truncated and trailing-byte payloads too.
    bad.send(publish("watch:room", "cut", &[0x82, 0x01])).await;
    bad.expect_error(Some(77), Code::InvalidPayload).await;
    bad.send(publish("watch:room", "extra", &[0x01, 0x02]))
        .await;
    bad.expect_error(Some(77), Code::InvalidPayload).await;
    bad.ping(2).await;
    // Nothing of it reached the room.
    bystander.still_works().await;
}

#[tokio::test]
async fn bad_room_and_event_names_are_request_errors() {
    let server = start(config()).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::open(&server).await;
    for room in ["noseparator", "UPPER:x", "a:has space", ":x", "a:"] {
        bad.send(ClientFrame::Subscribe {
            since: None,
            id: 5,
            room: room.into(),
        })
        .await;
        bad.expect_error(Some(5), Code::InvalidRoom).await;
        bad.send(publish(room, "e", &[0x01])).await;
        bad.expect_error(Some(77), Code::InvalidRoom).await;
    }
    for event in ["", "has space", &"e".repeat(65)] {
        bad.send(publish("watch:room", event, &[0x01])).await;
        bad.expect_error(Some(77), Code::InvalidEvent).await;
    }
    bad.send(ClientFrame::Unsubscribe {
        id: 6,
        room: "watch:room".into(),
    })
    .await;
    bad.expect_error(Some(6), Code::NotSubscribed).await;
    bad.ping(3).await;
    bystander.still_works().await;
}

#[tokio::test]
async fn frames_before_hello_close_with_hello_required() {
    let server = start(config()).await;
    let mut bystander = Bystander::new(&server).await;
    let mut bad = RawConn::connect(&server).await;
    bad.send(publish("watch:room", "e", &[0x01])).await;
    bad.expect_close(Code::HelloRequired).await;
    bystander.still_works().await;
    // Hello twice.
    let mut bad = RawConn::open(&server).await;
    bad.send(ClientFrame::Hello {
        version: 1,
        token: None,
    })
    .await;
    bad.expect_close(Code::HelloRequired).await;
    bystander.still_works().await;
}

#[tokio::test]
async fn unsupported_version_closes() {
    let server = start(config()).await;
    let mut bad = RawConn::connect(&server).await;
    bad.send(ClientFrame::Hello {
        version: 0,
        token: None,
    })
    .await;
    bad.expect_close(Code::UnsupportedVersion).await;
}

#[tokio::test]
async fn too_many_subscriptions_is_refused() {
    let mut cfg = config();
    cfg.max_subscriptions = 2;
    let server = start(cfg).await;
    let mut conn = RawConn::open(&server).await;
    conn.subscribe(1, "a:1").await;
    conn.subscribe(2, "a:2").await;
    conn.send(ClientFrame::Subscribe {
        since: None,
        id: 3,
        room: "a:3".into(),
    })
    .await;
    conn.expect_error(Some(3), Code::TooManySubscriptions).await;
    conn.ping(4).await;
}

#[tokio::test]
async fn error_codes_are_counted_in_metrics() {
    let server = start(config()).await;
    let mut bad = RawConn::open(&server).await;
    bad.send(ClientFrame::Subscribe {
        since: None,
        id: 1,
        room: "bad".into(),
    })
    .await;
    bad.expect_error(Some(1), Code::InvalidRoom).await;
    assert_eq!(
        metric(&server, "roomcast_errors_total{code=\"invalid_room\"}").await,
        1.0
    );
}
