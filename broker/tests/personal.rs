//! Personal rooms: every authenticated session of user U is in `user:U` from its `Welcome` on
//! (confirmed by `Subscribed` with request id 0), over WebSocket and WebTransport, without a
//! `Subscribe`; events published there (by the backend or a session with a `pub` grant) reach
//! every session of U and nobody else. Cluster mode: `cluster.rs`.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use common::{cluster::api_publish, wt::*, *};
use roomcast_broker::{Server, config::Secret};
use roomcast_protocol::{ClientFrame, Code, Payload, ServerFrame, frame::Event};
use tokio_tungstenite::connect_async;

const KEY: &str = "personal-api-key";

const POLICY: &str = r#"
[namespaces.watch]
subscribe = "authenticated"
publish = "grant"
"#;

async fn broker_with(tweak: impl FnOnce(&mut roomcast_broker::Config)) -> Server {
    let mut config = common::config();
    config.config = Some(secured_config(POLICY));
    config.api_key = Some(Secret(KEY.into()));
    tweak(&mut config);
    start(config).await
}

/// `POST /api/publish` of `{"n": n}` as event `note` to `room`; expects 200.
async fn backend_publish(server: &Server, room: &str, n: u64) {
    let body = serde_json::json!({"room": room, "event": "note", "data": {"n": n}});
    let (status, answer) = api_publish(server.local_addr(), KEY, &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
}

/// The `n` of a `note` event.
fn note(event: &Event) -> (String, u64) {
    let data: std::collections::BTreeMap<String, u64> = event.data.decode().unwrap();
    (event.room.as_str().to_owned(), data["n"])
}

async fn ws_event(conn: &mut RawConn) -> (String, u64) {
    match conn.frame().await {
        ServerFrame::Event(e) => note(&e),
        other => panic!("expected an Event, got {other:?}"),
    }
}

async fn wt_event(stream: &mut FrameStream) -> (String, u64) {
    match stream.frame().await {
        ServerFrame::Event(e) => note(&e),
        other => panic!("expected an Event, got {other:?}"),
    }
}

/// A WebTransport session of `token` (in `Hello`) and its personal room's stream.
async fn wt_as(server: &Server, token: String, sub: &str) -> (RawWt, FrameStream) {
    let mut conn = RawWt::connect(server).await;
    conn.send(ClientFrame::Hello {
        version: 1,
        token: Some(token),
    })
    .await;
    assert!(matches!(
        conn.control.frame().await,
        ServerFrame::Welcome(_)
    ));
    let personal = conn.accept_room(0, &format!("user:{sub}")).await;
    (conn, personal)
}

#[tokio::test]
async fn every_session_of_a_user_receives_its_personal_room_over_ws_and_wt() {
    let server = broker_with(|_| {}).await;
    let alice = user_token("alice", &[]);
    // Three devices of alice: token in the request, token in Hello, WebTransport.
    let mut phone = RawConn::open_as(&server, &alice, "alice").await;
    let mut laptop = RawConn::connect(&server).await;
    laptop
        .send(ClientFrame::Hello {
            version: 1,
            token: Some(alice.clone()),
        })
        .await;
    assert!(matches!(laptop.frame().await, ServerFrame::Welcome(_)));
    laptop.expect_personal_room("alice").await;
    let (_tablet, mut tablet_room) = wt_as(&server, alice.clone(), "alice").await;
    let mut bob = RawConn::open_as(&server, &user_token("bob", &[]), "bob").await;

    // The backend publishes to alice: every device gets it.
    backend_publish(&server, "user:alice", 1).await;
    let expected = ("user:alice".to_owned(), 1);
    assert_eq!(ws_event(&mut phone).await, expected);
    assert_eq!(ws_event(&mut laptop).await, expected);
    assert_eq!(wt_event(&mut tablet_room).await, expected);

    // A session whose token grants pub on user rooms (a notifier) publishes to alice.
    let mut notifier = RawConn::open_as(
        &server,
        &user_token("notifier", &[("user:*", "pub")]),
        "notifier",
    )
    .await;
    notifier
        .send(ClientFrame::Publish {
            key: None,
            id: 5,
            room: "user:alice".into(),
            event: "note".into(),
            data: Payload::encode(&std::collections::BTreeMap::from([("n", 2u64)]))
                .unwrap()
                .as_bytes()
                .clone(),
            ack: true,
        })
        .await;
    assert!(matches!(
        notifier.frame().await,
        ServerFrame::Ack { id: 5, .. }
    ));
    let expected = ("user:alice".to_owned(), 2);
    assert_eq!(ws_event(&mut phone).await, expected);
    assert_eq!(ws_event(&mut laptop).await, expected);
    assert_eq!(wt_event(&mut tablet_room).await, expected);

    // Alice herself has no pub grant on her room; bob may not listen in.
    phone
        .send(ClientFrame::Publish {
            key: None,
            id: 6,
            room: "user:alice".into(),
            event: "note".into(),
            data: Payload::encode(&1u8).unwrap().as_bytes().clone(),
            ack: true,
        })
        .await;
    phone.expect_error(Some(6), Code::Forbidden).await;
    bob.send(ClientFrame::Subscribe {
        since: None,
        id: 7,
        room: "user:alice".into(),
    })
    .await;
    bob.expect_error(Some(7), Code::Forbidden).await;
    // Bob's next event is his own: none of alice's reached him.
    backend_publish(&server, "user:bob", 3).await;
    assert_eq!(ws_event(&mut bob).await, ("user:bob".to_owned(), 3));
    // A Subscribe to the room a session already holds is answered as usual.
    assert_eq!(phone.subscribe(8, "user:alice").await, 2);
}

#[tokio::test]
async fn the_personal_room_counts_toward_max_subscriptions_and_may_be_left() {
    let server = broker_with(|c| c.max_subscriptions = 2).await;
    let mut alice = RawConn::open_as(&server, &user_token("alice", &[]), "alice").await;
    alice.subscribe(1, "watch:1").await;
    alice
        .send(ClientFrame::Subscribe {
            since: None,
            id: 2,
            room: "watch:2".into(),
        })
        .await;
    alice
        .expect_error(Some(2), Code::TooManySubscriptions)
        .await;
    alice
        .send(ClientFrame::Unsubscribe {
            id: 3,
            room: "user:alice".into(),
        })
        .await;
    match alice.frame().await {
        ServerFrame::Unsubscribed { id: 3, room } => assert_eq!(room.as_str(), "user:alice"),
        other => panic!("expected Unsubscribed, got {other:?}"),
    }
    alice.subscribe(4, "watch:2").await;
    // Nothing of user:alice follows: the next event is watch:1's.
    backend_publish(&server, "user:alice", 1).await;
    backend_publish(&server, "watch:1", 2).await;
    assert_eq!(ws_event(&mut alice).await, ("watch:1".to_owned(), 2));
    // With a cap of one room the personal room takes it.
    let server = broker_with(|c| c.max_subscriptions = 1).await;
    let mut alice = RawConn::open_as(&server, &user_token("alice", &[]), "alice").await;
    alice
        .send(ClientFrame::Subscribe {
            since: None,
            id: 1,
            room: "watch:1".into(),
        })
        .await;
    alice
        .expect_error(Some(1), Code::TooManySubscriptions)
        .await;
}

/// Captures the broker's log lines (the broker runs in this process) from the first call on.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

#[tokio::test]
async fn a_sub_that_cannot_name_a_room_gets_no_personal_room_and_a_log_line() {
    let logs = captured_logs();
    let server = broker_with(|_| {}).await;
    let url = format!("{}?token={}", server.ws_url(), user_token("Jane Doe", &[]));
    let (ws, _) = connect_async(url).await.unwrap();
    let mut jane = RawConn { ws };
    jane.send(ClientFrame::Hello {
        version: 1,
        token: None,
    })
    .await;
    assert!(matches!(jane.frame().await, ServerFrame::Welcome(_)));
    // No Subscribed in between: the Pong is the next frame.
    jane.ping(1).await;
    jane.subscribe(2, "watch:1").await;
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("no personal room") && l.contains("Jane Doe")),
        "{text}"
    );
}

#[tokio::test]
async fn a_broker_without_auth_keys_ignores_tokens_and_joins_no_personal_room() {
    let mut config = common::config();
    config.api_key = Some(Secret(KEY.into()));
    let server = start(config).await;
    // A token the open broker cannot verify (it has no keys): ignored everywhere.
    let token = user_token("alice", &[]);
    let url = format!("{}?token={token}", server.ws_url());
    let (ws, _) = connect_async(url)
        .await
        .expect("the upgrade is not refused");
    let mut conn = RawConn { ws };
    conn.send(ClientFrame::Hello {
        version: 1,
        token: Some("not-even-a-jwt".into()),
    })
    .await;
    assert!(matches!(conn.frame().await, ServerFrame::Welcome(_)));
    conn.send(ClientFrame::Refresh {
        id: 1,
        token: "x.y.z".into(),
    })
    .await;
    assert_eq!(conn.frame().await, ServerFrame::Ack { id: 1, seq: None });
    // No personal room: nothing but the Pong follows.
    conn.ping(2).await;
    // Over WebTransport too.
    let mut wt = RawWt::connect(&server).await;
    wt.send(ClientFrame::Hello {
        version: 1,
        token: Some(token),
    })
    .await;
    assert!(matches!(wt.control.frame().await, ServerFrame::Welcome(_)));
    let mut room = wt.subscribe(1, "open:1").await;
    backend_publish(&server, "open:1", 9).await;
    assert_eq!(wt_event(&mut room).await, ("open:1".to_owned(), 9));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), wt.connection.accept_uni())
            .await
            .is_err(),
        "no other room stream (no personal room)"
    );
}

#[tokio::test]
async fn user_rooms_stay_reserved_with_auth_off_and_the_error_says_why() {
    let mut config = common::config();
    config.api_key = Some(Secret(KEY.into()));
    let server = start(config).await;
    let mut conn = RawConn::open(&server).await;
    conn.send(ClientFrame::Subscribe {
        since: None,
        id: 1,
        room: "user:alice".into(),
    })
    .await;
    match conn.frame().await {
        ServerFrame::Error {
            id, code, message, ..
        } => {
            assert_eq!((id, code), (Some(1), Code::Forbidden));
            assert!(message.contains("reserved"), "{message}");
            assert!(message.contains("authentication off"), "{message}");
        }
        other => panic!("expected Error forbidden, got {other:?}"),
    }
    conn.send(ClientFrame::Publish {
        key: None,
        id: 2,
        room: "user:alice".into(),
        event: "note".into(),
        data: Payload::encode(&1u8).unwrap().as_bytes().clone(),
        ack: true,
    })
    .await;
    match conn.frame().await {
        ServerFrame::Error {
            id, code, message, ..
        } => {
            assert_eq!((id, code), (Some(2), Code::Forbidden));
            assert!(message.contains("/api/publish"), "{message}");
        }
        other => panic!("expected Error forbidden, got {other:?}"),
    }
    // The backend may still publish there (nobody receives it without users).
    backend_publish(&server, "user:alice", 1).await;
    conn.ping(3).await;
}
