//! Cluster mode against real nats-server processes on loopback: two nodes on one server (WS
//! and WT), two regions joined by a gateway, backend publishing (HTTP and raw NATS), a NATS
//! outage during traffic, and hostile room names.
//!
//! A node's `Subscribed` waits until its NATS subscription to the room is live
//! (`a_subscribed_client_gets_the_next_event_from_another_node` checks exactly that). The
//! older tests below still prove a route first by publishing `probe` events until every
//! subscriber has seen one, then a `sync` event that flushes the remaining probes (one
//! publisher's events stay in order); only then are exact sequences checked.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::{cluster::*, wt::*, *};
use roomcast_broker::{
    Config, Server,
    cluster::subject::{SubjectPrefix, subject_for},
    config::Secret,
};
use roomcast_protocol::{ClientFrame, Code, Payload, RoomName, ServerFrame, frame::Event};

const KEY: &str = "test-api-key";
const TOKEN: &str = "nats-s3cret";

fn node(nats: &NatsServer, id: &str) -> Config {
    let mut c = config();
    c.cluster.nats = vec![nats.url()];
    c.cluster.node_id = Some(id.into());
    c.cluster.nats_interest_linger = Duration::from_millis(100);
    c.api_key = Some(Secret(KEY.into()));
    c
}

/// The NATS connection name of a node.
fn conn_name(id: &str) -> String {
    format!("roomcast {id}")
}

async fn readyz(server: &Server) -> u16 {
    http_get(server, "/readyz").await.0
}

/// Waits (bounded) until `/readyz` answers `status`.
async fn until_readyz(server: &Server, status: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while readyz(server).await != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn number(n: u64) -> Bytes {
    Payload::encode(&n).unwrap().as_bytes().clone()
}

fn publish(id: u64, room: &str, event: &str, data: Bytes, ack: bool) -> ClientFrame {
    ClientFrame::Publish {
        key: None,
        id,
        room: room.into(),
        event: event.into(),
        data,
        ack,
    }
}

/// A subscriber on either transport.
enum Sub {
    Ws(Box<RawConn>),
    /// The session (kept open) and the room's stream, where the events come.
    Wt(Box<(RawWt, FrameStream)>),
}

impl Sub {
    async fn ws(server: &Server, room: &str) -> Sub {
        let mut conn = RawConn::open(server).await;
        conn.subscribe(1, room).await;
        Sub::Ws(Box::new(conn))
    }

    async fn wt(server: &Server, room: &str) -> Sub {
        let mut conn = RawWt::open(server).await;
        let stream = conn.subscribe(1, room).await;
        Sub::Wt(Box::new((conn, stream)))
    }

    /// The next Event, within `within` (`None` if nothing came).
    async fn try_event(&mut self, within: Duration) -> Option<Event> {
        let frame = match self {
            Sub::Ws(conn) => tokio::time::timeout(within, conn.frame()).await.ok()?,
            Sub::Wt(wt) => tokio::time::timeout(within, wt.1.frame()).await.ok()?,
        };
        match frame {
            ServerFrame::Event(e) => Some(e),
            other => panic!("expected an Event, got {other:?}"),
        }
    }

    async fn event(&mut self) -> Event {
        self.try_event(WAIT).await.expect("an event in time")
    }

    /// Asserts that nothing but `expected` (event names, in order) arrives, then `end`.
    async fn expect_events(&mut self, room: &str, expected: &[String]) {
        for want in expected {
            let e = self.event().await;
            assert_eq!(
                (e.room.as_str(), e.event.as_str()),
                (room, want.as_str()),
                "out of order, duplicated or foreign event"
            );
        }
    }
}

/// Publishes `probe` events until every subscriber has seen one, then `sync`, and reads every
/// subscriber up to its `sync`: afterwards, nothing of the probing is left in flight. Returns,
/// per subscriber, the names of the other events read on the way.
async fn route_collecting(
    publisher: &mut RawConn,
    subs: &mut [&mut Sub],
    room: &str,
) -> Vec<Vec<String>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = vec![false; subs.len()];
    let mut other = vec![Vec::new(); subs.len()];
    let mut keep = |i: usize, e: &Event| {
        let name = e.event.as_str();
        if name != "probe" && name != "sync" {
            other[i].push(name.to_owned());
        }
    };
    while seen.iter().any(|s| !s) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no route to every subscriber of {room}"
        );
        publisher
            .send(publish(0, room, "probe", number(0), false))
            .await;
        for (i, sub) in subs.iter_mut().enumerate() {
            if !seen[i] {
                if let Some(e) = sub.try_event(Duration::from_millis(50)).await {
                    assert_eq!(e.room.as_str(), room);
                    seen[i] = e.event.as_str() == "probe";
                    keep(i, &e);
                }
            }
        }
    }
    publisher
        .send(publish(0, room, "sync", number(0), false))
        .await;
    for (i, sub) in subs.iter_mut().enumerate() {
        loop {
            let e = sub.event().await;
            assert_eq!(e.room.as_str(), room);
            if e.event.as_str() == "sync" {
                break;
            }
            keep(i, &e);
        }
    }
    other
}

/// [`route_collecting`] where nothing but probes may arrive.
async fn route(publisher: &mut RawConn, subs: &mut [&mut Sub], room: &str) {
    for other in route_collecting(publisher, subs, room).await {
        assert!(
            other.is_empty(),
            "unexpected events while routing: {other:?}"
        );
    }
}

/// Reads the publisher's frames until the reply to request `id`: `Ok(seq)` for an Ack,
/// `Err(code)` for an Error. Replies to fire-and-forget probes (id 0) are skipped.
async fn reply(publisher: &mut RawConn, id: u64) -> Result<Option<u64>, Code> {
    loop {
        match publisher.frame().await {
            ServerFrame::Ack { id: got, seq } if got == id => return Ok(seq),
            ServerFrame::Error {
                id: Some(got),
                code,
                ..
            } if got == id => return Err(code),
            ServerFrame::Error { id: Some(0), .. } => {}
            other => panic!("expected the reply to {id}, got {other:?}"),
        }
    }
}

fn names(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|n| format!("e{n}")).collect()
}

#[tokio::test]
async fn two_nodes_on_one_nats_server_ws_and_wt() {
    let nats = NatsServer::start(&format!("authorization {{ token: \"{TOKEN}\" }}"));
    let with_token = |mut c: Config| {
        c.cluster.nats_token = Some(Secret(TOKEN.into()));
        c
    };
    let a = start(with_token(node(&nats, "node-a"))).await;
    let b = start(with_token(node(&nats, "node-b"))).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let room = "orders:1";
    let mut ws_b = Sub::ws(&b, room).await;
    let mut wt_b = Sub::wt(&b, room).await;
    let mut ws_a = Sub::ws(&a, room).await; // same node as the publisher
    let mut publisher = RawConn::open(&a).await;
    route(&mut publisher, &mut [&mut ws_b, &mut wt_b, &mut ws_a], room).await;

    for n in 1..=20u64 {
        publisher
            .send(publish(n, room, &format!("e{n}"), number(n), true))
            .await;
        // Cluster mode: the Ack comes once the room's stream stored the event, with its seq.
        assert!(matches!(reply(&mut publisher, n).await, Ok(Some(_))));
    }
    publisher
        .send(publish(99, room, "end", number(0), false))
        .await;
    let mut want = names(1..=20);
    want.push("end".into());
    for sub in [&mut ws_b, &mut wt_b, &mut ws_a] {
        sub.expect_events(room, &want).await;
    }
    // Exactly once: nothing after `end`.
    publisher
        .send(publish(100, room, "end2", number(0), false))
        .await;
    for sub in [&mut ws_b, &mut wt_b, &mut ws_a] {
        sub.expect_events(room, &["end2".into()]).await;
    }
    assert!(metric(&b, "roomcast_nats_received_total").await >= 22.0);
    assert_eq!(metric(&b, "roomcast_nats_connected").await, 1.0);
    assert_eq!(metric(&b, "roomcast_nats_subscriptions").await, 1.0);

    // A WebTransport publisher on B reaches a WebSocket subscriber on A.
    let mut wt_pub = RawWt::open(&b).await;
    wt_pub
        .send(publish(7, room, "from-wt", number(7), true))
        .await;
    assert!(matches!(
        wt_pub.control.frame().await,
        ServerFrame::Ack {
            id: 7,
            seq: Some(_)
        }
    ));
    ws_a.expect_events(room, &["from-wt".into()]).await;
    ws_b.expect_events(room, &["from-wt".into()]).await;
}

#[tokio::test]
async fn a_subscribed_client_gets_the_next_event_from_another_node() {
    let nats = NatsServer::start("");
    let a = start(node(&nats, "node-a")).await;
    // Node B's commands take 300 ms to reach NATS: a `Subscribed` sent before B's
    // subscription is live on the server would let A's next event slip past B.
    let slow_link = delaying_proxy(
        format!("127.0.0.1:{}", nats.port).parse().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    let mut config_b = node(&nats, "node-b");
    config_b.cluster.nats = vec![format!("nats://{slow_link}")];
    let b = start(config_b).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let mut publisher = RawConn::open(&a).await;
    // Fresh rooms each round: every Subscribed is the one that creates the node's NATS
    // subscription. No probing: the event published right after Subscribed must arrive.
    for round in 1..=4u64 {
        let room = format!("fresh:{round}");
        let mut sub = if round % 2 == 0 {
            Sub::wt(&b, &room).await
        } else {
            Sub::ws(&b, &room).await
        };
        publisher
            .send(publish(round, &room, "first", number(round), true))
            .await;
        assert!(matches!(reply(&mut publisher, round).await, Ok(Some(_))));
        let event = sub.event().await;
        assert_eq!(
            (event.room.as_str(), event.event.as_str()),
            (room.as_str(), "first")
        );
        assert_eq!(event.data.decode::<u64>().unwrap(), round);
    }
}

#[tokio::test]
async fn hostile_room_names_stay_in_their_own_room() {
    let nats = NatsServer::start("");
    let a = start(node(&nats, "node-a")).await;
    let b = start(node(&nats, "node-b")).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let rooms = [
        "a:x", "a:y", "a:x.y", "a:x.y.z", "a:*", "a:>", "a:x.*", "a:x.>", "a:x_2ey", "a:_2a",
        "a:%2e", "a:x:y", "a:x_y", "a-b:x",
    ];
    // A raw NATS observer sees every subject the brokers publish to.
    let observer = async_nats::connect(nats.url()).await.unwrap();
    let mut seen_subjects = observer.subscribe("roomcast.>").await.unwrap();
    observer.flush().await.unwrap();

    let mut publisher = RawConn::open(&a).await;
    let mut subs = Vec::new();
    for room in rooms {
        let mut sub = Sub::ws(&b, room).await;
        route(&mut publisher, &mut [&mut sub], room).await;
        subs.push(sub);
    }
    for room in rooms {
        publisher
            .send(publish(
                0,
                room,
                "who",
                Payload::encode(room).unwrap().as_bytes().clone(),
                false,
            ))
            .await;
    }
    for room in rooms {
        publisher
            .send(publish(0, room, "end", number(0), false))
            .await;
    }
    for (room, sub) in rooms.iter().zip(subs.iter_mut()) {
        let e = sub.event().await;
        assert_eq!((e.room.as_str(), e.event.as_str()), (*room, "who"));
        assert_eq!(e.data.decode::<String>().unwrap(), *room);
        // Anything that leaked in from another room would arrive before this room's `end`.
        sub.expect_events(room, &["end".into()]).await;
    }
    // Every subject was a three-token literal, one per room.
    let prefix = SubjectPrefix::default();
    let mut subjects = std::collections::BTreeSet::new();
    let mut ends = 0;
    while ends < rooms.len() {
        let message = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut seen_subjects))
            .await
            .expect("observer message")
            .unwrap();
        let subject = message.subject.to_string();
        if let Some(stored) = subject.strip_prefix("roomcast.SEQ.") {
            // The stream's numbered copy of a stored event: the same literal subject after SEQ.
            assert_eq!(stored.split('.').count(), 2, "{subject}");
            continue;
        }
        assert_eq!(subject.split('.').count(), 3, "{subject}");
        assert!(
            !subject.contains('*') && !subject.contains('>') && !subject.contains(' '),
            "{subject}"
        );
        let event = message
            .headers
            .as_ref()
            .unwrap()
            .get("Roomcast-Event")
            .unwrap();
        if event.as_str() == "who" {
            subjects.insert(subject.clone());
        }
        if event.as_str() == "end" {
            ends += 1;
        }
    }
    assert_eq!(
        subjects.len(),
        rooms.len(),
        "one subject per room: {subjects:?}"
    );
    for room in rooms {
        assert!(subjects.contains(&subject_for(&prefix, &RoomName::new(room).unwrap())));
    }
    // Names NATS could misread never get that far: spaces, unicode and control characters are
    // refused by name validation on both paths.
    for bad in ["a:x y", "a:\u{e9}", "a:x\ty", "a:\u{1F600}"] {
        let mut conn = RawConn::open(&b).await;
        conn.send(ClientFrame::Subscribe {
            since: None,
            id: 3,
            room: bad.into(),
        })
        .await;
        conn.expect_error(Some(3), Code::InvalidRoom).await;
        conn.send(publish(4, bad, "e", number(1), true)).await;
        conn.expect_error(Some(4), Code::InvalidRoom).await;
    }
}

#[tokio::test]
async fn two_regions_joined_by_a_gateway() {
    // JetStream needs routed clusters behind gateways; this test is about cross-region
    // fan-out and interest, so both regions run core NATS and the nodes keep no history.
    let mut region_a = NatsServer::start(
        "server_name: a1\njetstream: disabled\ngateway {\n  name: region-a\n  listen: 127.0.0.1:-1\n}",
    );
    let gateway_a = region_a.gateway_port.expect("gateway port");
    let region_b = NatsServer::start(&format!(
        "server_name: b1\njetstream: disabled\ngateway {{\n  name: region-b\n  listen: 127.0.0.1:-1\n  gateways: [{{ name: region-a, url: \"nats://127.0.0.1:{gateway_a}\" }}]\n}}"
    ));
    let core_only = |nats: &NatsServer, id: &str| Config {
        cluster: roomcast_broker::config::ClusterConfig {
            no_nats_history: true,
            ..node(nats, id).cluster
        },
        ..node(nats, id)
    };
    let a = start(core_only(&region_a, "edge-a")).await;
    let b = start(core_only(&region_b, "edge-b")).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let room = "chat:eu";
    let mut sub_b = Sub::ws(&b, room).await;
    let mut publisher = RawConn::open(&a).await;
    route(&mut publisher, &mut [&mut sub_b], room).await;
    for n in 1..=10u64 {
        publisher
            .send(publish(n, room, &format!("e{n}"), number(n), false))
            .await;
    }
    sub_b.expect_events(room, &names(1..=10)).await;

    // A room nobody in region B watches sends nothing to node B: NATS delivers to B's broker
    // connection only the barrier event of the watched room.
    let b_conn = conn_name("edge-b");
    let unwatched = "chat:nobody-in-b";
    let unwatched_subject = subject_for(
        &SubjectPrefix::default(),
        &RoomName::new(unwatched).unwrap(),
    );
    let before = region_b.connection(&b_conn).await.expect("B connected")["out_msgs"]
        .as_u64()
        .unwrap();
    for n in 1..=20u64 {
        publisher
            .send(publish(n, unwatched, "e", number(n), false))
            .await;
    }
    publisher
        .send(publish(0, room, "barrier", number(0), false))
        .await;
    sub_b.expect_events(room, &["barrier".into()]).await;
    let after = region_b.connection(&b_conn).await.expect("B connected")["out_msgs"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after - before,
        1,
        "node B received traffic of a room nobody there watches"
    );
    let subjects = region_b.subjects_of(&b_conn).await;
    assert!(!subjects.contains(&unwatched_subject), "{subjects:?}");
    let watched_subject = subject_for(&SubjectPrefix::default(), &RoomName::new(room).unwrap());
    assert!(subjects.contains(&watched_subject), "{subjects:?}");

    // The last subscriber leaves: after the linger, node B drops its interest.
    drop(sub_b);
    let deadline = tokio::time::Instant::now() + WAIT;
    while region_b
        .subjects_of(&b_conn)
        .await
        .contains(&watched_subject)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "interest never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&b, "roomcast_nats_subscriptions").await, 0.0);
    region_a.kill();
}

#[tokio::test]
async fn backend_publishes_over_http_and_raw_nats_reach_ws_and_wt() {
    let nats = NatsServer::start("");
    let a = start(node(&nats, "node-a")).await;
    let b = start(node(&nats, "node-b")).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let room = "news:front";
    let mut ws = Sub::ws(&b, room).await;
    let mut wt = Sub::wt(&b, room).await;
    let mut publisher = RawConn::open(&a).await;
    route(&mut publisher, &mut [&mut ws, &mut wt], room).await;

    let post = |body: Vec<u8>, content_type: &'static str, key: Option<&'static str>| {
        let addr: SocketAddr = a.local_addr();
        async move {
            let auth = key.map(|k| format!("Bearer {k}"));
            let mut headers = vec![("Content-Type", content_type)];
            if let Some(auth) = &auth {
                headers.push(("Authorization", auth.as_str()));
            }
            http(addr, "POST", "/api/publish", &headers, &body).await
        }
    };
    // JSON body: data is any JSON value, delivered as its CBOR encoding.
    let json =
        serde_json::json!({"room": room, "event": "json", "data": {"headline": "hi", "n": 1}});
    let (status, body) = post(json.to_string().into_bytes(), "application/json", Some(KEY)).await;
    // Stored in the namespace's stream before the answer, which carries its seq.
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(r#"{"ok":true,"seq":"#), "{body}");
    // CBOR body: a map with text keys; data is any CBOR item.
    let mut cbor = Vec::new();
    ciborium::into_writer(
        &ciborium::Value::Map(vec![
            ("room".into(), room.into()),
            ("event".into(), "cbor".into()),
            (
                "data".into(),
                ciborium::Value::Array(vec![1.into(), 2.into()]),
            ),
        ]),
        &mut cbor,
    )
    .unwrap();
    let (status, _) = post(cbor, "application/cbor", Some(KEY)).await;
    assert_eq!(status, 200);
    // Raw NATS: CBOR payload on the room subject with the documented headers.
    let raw = async_nats::connect(nats.url()).await.unwrap();
    let subject = subject_for(&SubjectPrefix::default(), &RoomName::new(room).unwrap());
    let mut headers = HeaderMap::new();
    headers.insert("Roomcast-Event", "raw");
    headers.insert("Roomcast-Origin", "billing-service");
    raw.publish_with_headers(subject.clone(), headers, number(42))
        .await
        .unwrap();
    // Refused at the receiving nodes (counted, never delivered): no event header, a room
    // header naming another room, a payload that is not one CBOR item.
    raw.publish(subject.clone(), number(1)).await.unwrap();
    let mut wrong_room = HeaderMap::new();
    wrong_room.insert("Roomcast-Event", "x");
    wrong_room.insert("Roomcast-Room", "news:other");
    raw.publish_with_headers(subject.clone(), wrong_room, number(1))
        .await
        .unwrap();
    let mut bad_payload = HeaderMap::new();
    bad_payload.insert("Roomcast-Event", "x");
    raw.publish_with_headers(
        subject.clone(),
        bad_payload,
        Bytes::from_static(&[0x82, 0x01]),
    )
    .await
    .unwrap();
    let mut last = HeaderMap::new();
    last.insert("Roomcast-Event", "raw-end");
    last.insert("Roomcast-Room", room);
    raw.publish_with_headers(subject.clone(), last, number(0))
        .await
        .unwrap();
    raw.flush().await.unwrap();

    for sub in [&mut ws, &mut wt] {
        let e = sub.event().await;
        assert_eq!(e.event.as_str(), "json");
        let data: serde_json::Value = e.data.decode().unwrap();
        assert_eq!(data, serde_json::json!({"headline": "hi", "n": 1}));
        let e = sub.event().await;
        assert_eq!(e.event.as_str(), "cbor");
        assert_eq!(e.data.decode::<Vec<u8>>().unwrap(), [1, 2]);
        let e = sub.event().await;
        assert_eq!(e.event.as_str(), "raw");
        assert_eq!(e.data.decode::<u64>().unwrap(), 42);
        sub.expect_events(room, &["raw-end".into()]).await;
    }
    assert_eq!(metric(&b, "roomcast_nats_invalid_total").await, 3.0);

    // Refusals.
    let ok = json.to_string().into_bytes();
    assert_eq!(post(ok.clone(), "application/json", None).await.0, 401);
    assert_eq!(
        post(ok.clone(), "application/json", Some("wrong")).await.0,
        401
    );
    assert_eq!(post(ok.clone(), "text/plain", Some(KEY)).await.0, 415);
    assert_eq!(
        post(b"{".to_vec(), "application/json", Some(KEY)).await.0,
        400
    );
    let bad_room = serde_json::json!({"room": "news:a b", "event": "e", "data": 1});
    let (status, body) = post(
        bad_room.to_string().into_bytes(),
        "application/json",
        Some(KEY),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body.contains("\"code\":4101") && body.contains("invalid_room"),
        "{body}"
    );
    let bad_event = serde_json::json!({"room": room, "event": "", "data": 1});
    let (status, body) = post(
        bad_event.to_string().into_bytes(),
        "application/json",
        Some(KEY),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("\"code\":4102"), "{body}");
    let huge = vec![b' '; 70 * 1024];
    assert_eq!(post(huge, "application/json", Some(KEY)).await.0, 413);
    // Nothing of the refused requests was delivered.
    publisher
        .send(publish(0, room, "final", number(0), false))
        .await;
    ws.expect_events(room, &["final".into()]).await;
}

#[tokio::test]
async fn single_node_http_publish_and_readiness() {
    let mut c = config();
    c.api_key = Some(Secret(KEY.into()));
    let server = start(c).await;
    assert_eq!(readyz(&server).await, 200);
    let mut sub = RawConn::open(&server).await;
    sub.subscribe(1, "news:1").await;
    let body = serde_json::json!({"room": "news:1", "event": "e", "data": [1, 2, 3]});
    let (status, answer) = api_publish(server.local_addr(), KEY, &body.to_string()).await;
    // A single node fans out at once and knows the seq.
    assert_eq!((status, answer.as_str()), (200, r#"{"ok":true,"seq":1}"#));
    match sub.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.data.decode::<Vec<u8>>().unwrap(), [1, 2, 3]),
        other => panic!("{other:?}"),
    }
    // Without --api-key the endpoint does not exist.
    let plain = start(config()).await;
    let (status, _) = http(
        plain.local_addr(),
        "POST",
        "/api/publish",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 404);
}

/// Waits (bounded) until `/readyz` answers `status` with `body`.
async fn until_readyz_says(server: &Server, status: u16, body: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = http_get(server, "/readyz").await;
        if (got.0, got.1.as_str()) == (status, body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status} {body:?} (last: {got:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A NATS server without JetStream: the node is not ready, says why (readiness, metric, the
/// refused publishes' message) instead of looking healthy, and is ready again once its server
/// has JetStream.
#[tokio::test]
async fn a_nats_server_without_jetstream_makes_the_node_unready_until_it_has_it() {
    const MISSING: &str = "ERROR roomcast_broker::cluster::nats: JetStream unavailable on the NATS server: publishes to rooms with history are refused (`unavailable`) and /readyz answers 503; enable `jetstream {}` on the NATS server, or run roomcast with --no-nats-history";
    const BACK: &str = "JetStream available again";
    captured_logs();
    let mut nats = NatsServer::start("jetstream: disabled");
    let a = start(node(&nats, "node-a")).await;
    until_readyz_says(&a, 503, "JetStream unavailable\n").await;
    let (_, metrics) = http_get(&a, "/metrics").await;
    assert!(
        metrics.contains("roomcast_nats_jetstream_available 0"),
        "{metrics}"
    );
    assert_eq!(metric(&a, "roomcast_nats_connected").await, 1.0);

    // Every publish to a room with history is refused, naming the cause.
    let room = "nojs:1";
    let mut publisher = RawConn::open(&a).await;
    for n in 1..=3 {
        publisher
            .send(publish(n, room, &format!("e{n}"), number(n), true))
            .await;
        match publisher.frame().await {
            ServerFrame::Error {
                id: Some(id),
                code: Code::Unavailable,
                message,
                ..
            } if id == n => assert!(
                message.contains("JetStream unavailable on the NATS server"),
                "{message}"
            ),
            other => panic!("expected Error unavailable, got {other:?}"),
        }
    }
    let body = serde_json::json!({"room": room, "event": "e", "data": 1}).to_string();
    let (status, answer) = api_publish(a.local_addr(), KEY, &body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.contains("JetStream unavailable on the NATS server"),
        "{answer}"
    );
    // Said once, not once per publish.
    let logs = captured_logs();
    assert_eq!(lines_with(&logs, MISSING), 1, "{logs}");
    assert_eq!(lines_with(&logs, room), 0, "{logs}");

    // JetStream is turned on without a reconnect: the node looks again every few seconds.
    nats.reload_with("");
    until_readyz_says(&a, 200, "ready\n").await;
    assert_eq!(metric(&a, "roomcast_nats_jetstream_available").await, 1.0);
    let mut sub = RawConn::open(&a).await;
    sub.subscribe(1, room).await;
    publisher
        .send(publish(9, room, "e9", number(9), true))
        .await;
    assert!(
        matches!(reply(&mut publisher, 9).await, Ok(Some(_))),
        "a stored event's Ack carries its seq"
    );
    match sub.frame().await {
        ServerFrame::Event(e) => assert_eq!(e.event.as_str(), "e9"),
        other => panic!("expected the event, got {other:?}"),
    }
    let (status, answer) = api_publish(a.local_addr(), KEY, &body).await;
    assert_eq!(status, 200, "{answer}");

    // The node reconnects to a server without JetStream, then to one with it: it checks on
    // every connect.
    nats.restart_with("jetstream: disabled");
    until_readyz_says(&a, 503, "JetStream unavailable\n").await;
    let (status, answer) = api_publish(a.local_addr(), KEY, &body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.contains("JetStream unavailable on the NATS server"),
        "{answer}"
    );
    nats.restart_with("");
    until_readyz_says(&a, 200, "ready\n").await;
    let (status, answer) = api_publish(a.local_addr(), KEY, &body).await;
    assert_eq!(status, 200, "{answer}");
    // One line per change.
    let logs = captured_logs();
    assert_eq!(
        (lines_with(&logs, MISSING), lines_with(&logs, BACK)),
        (2, 2),
        "{logs}"
    );
}

/// The broker's log lines (it runs in this process), captured from the first call on.
fn captured_logs() -> String {
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let logs = LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    });
    String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()
}

fn lines_with(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

/// The positive control of the test above: with JetStream the node is ready at once and
/// says so in its metric.
#[tokio::test]
async fn a_nats_server_with_jetstream_makes_the_node_ready() {
    let nats = NatsServer::start("");
    let a = start(node(&nats, "node-a")).await;
    until_readyz_says(&a, 200, "ready\n").await;
    assert_eq!(metric(&a, "roomcast_nats_jetstream_available").await, 1.0);
    let mut publisher = RawConn::open(&a).await;
    publisher
        .send(publish(1, "chat:1", "e1", number(1), true))
        .await;
    assert!(matches!(reply(&mut publisher, 1).await, Ok(Some(_))));
}

/// `--no-nats-history` needs no JetStream: the node is ready without it.
#[tokio::test]
async fn without_history_a_nats_server_without_jetstream_is_fine() {
    let nats = NatsServer::start("jetstream: disabled");
    let mut c = node(&nats, "node-a");
    c.cluster.no_nats_history = true;
    let a = start(c).await;
    until_readyz_says(&a, 200, "ready\n").await;
    let mut publisher = RawConn::open(&a).await;
    publisher
        .send(publish(1, "chat:1", "e1", number(1), true))
        .await;
    assert!(matches!(reply(&mut publisher, 1).await, Ok(None)));
}

#[tokio::test]
async fn nats_outage_during_traffic() {
    let mut nats = NatsServer::start("");
    let a = start(node(&nats, "node-a")).await;
    let b = start(node(&nats, "node-b")).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let room = "ticks:1";
    let mut sub = Sub::ws(&b, room).await;
    let mut publisher = RawConn::open(&a).await;
    route(&mut publisher, &mut [&mut sub], room).await;

    // Traffic before the outage: every event acknowledged and delivered in order.
    for n in 1..=19u64 {
        publisher
            .send(publish(n, room, &format!("e{n}"), number(n), true))
            .await;
        assert!(matches!(reply(&mut publisher, n).await, Ok(Some(_))));
    }
    sub.expect_events(room, &names(1..=19)).await;

    // NATS dies during traffic: publishes go on until three are refused with `unavailable`.
    nats.kill();
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut n = 19u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    while refused < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishes never became unavailable"
        );
        n += 1;
        publisher
            .send(publish(n, room, &format!("e{n}"), number(n), true))
            .await;
        match reply(&mut publisher, n).await {
            // Acknowledged: stored in the room's stream before the loss.
            Ok(Some(_)) => accepted.push(format!("e{n}")),
            Err(Code::Unavailable) => refused += 1,
            other => panic!("unexpected reply {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    until_readyz(&a, 503).await;
    until_readyz(&b, 503).await;
    assert_eq!(metric(&a, "roomcast_nats_connected").await, 0.0);
    assert!(metric(&a, "roomcast_errors_total{code=\"unavailable\"}").await >= 3.0);
    // Local sessions keep working: ping, subscribe to a new room.
    publisher.ping(500).await;
    let mut late = RawConn::open(&b).await;
    late.subscribe(1, "ticks:late").await;
    late.ping(2).await;
    let mut late = Sub::Ws(Box::new(late));
    // HTTP publishing refuses too.
    let (status, body) = api_publish(
        a.local_addr(),
        KEY,
        r#"{"room":"ticks:1","event":"e","data":1}"#,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"code\":4503"), "{body}");

    nats.restart();
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    // Subscriptions come back: the old room, and the one subscribed during the outage.
    route(&mut publisher, &mut [&mut late], "ticks:late").await;
    let mut got = route_collecting(&mut publisher, &mut [&mut sub], room).await;
    let got = got.remove(0);
    // Every acknowledged event was stored: the subscriber's node filled the gap in its feed
    // from the stream, so all of them arrive, in order, once; a refused event never does.
    assert_eq!(got, accepted, "acknowledged events lost or repeated");
    let positions: Vec<usize> = got
        .iter()
        .map(|name| {
            accepted
                .iter()
                .position(|a| a == name)
                .unwrap_or_else(|| panic!("{name} was refused or duplicated: {got:?}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    // After recovery every event arrives, in order, once.
    let first_after = n + 1;
    for m in first_after..first_after + 10 {
        publisher
            .send(publish(m, room, &format!("e{m}"), number(m), true))
            .await;
        assert!(matches!(reply(&mut publisher, m).await, Ok(Some(_))));
    }
    publisher
        .send(publish(0, room, "end", number(0), false))
        .await;
    let mut want = names(first_after..=first_after + 9);
    want.push("end".into());
    sub.expect_events(room, &want).await;
    assert!(metric(&b, "roomcast_nats_disconnects_total").await >= 1.0);
}

/// NATS over TLS with a private CA (`--nats-ca`) and user/password auth: the node connects,
/// events flow, and the NATS server reports the connection as TLS.
#[tokio::test]
async fn nats_over_tls_with_a_private_ca_and_a_password() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("roomcast-nats-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server-key.pem"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, server_cert.pem()).unwrap();
    std::fs::write(&key_pem, server_key.serialize_pem()).unwrap();
    let nats = NatsServer::start(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?} }}\nauthorization {{ user: roomcast, password: \"pa55-w0rd\" }}",
        cert_pem.display().to_string(),
        key_pem.display().to_string()
    ));
    let mut c = node(&nats, "edge-tls");
    c.cluster.nats_ca = Some(ca_pem.clone());
    c.cluster.nats_user = Some("roomcast".into());
    c.cluster.nats_password = Some(Secret("pa55-w0rd".into()));
    let server = start(c).await;
    until_readyz(&server, 200).await;
    let room = "orders:tls";
    let mut sub = Sub::ws(&server, room).await;
    let mut publisher = RawConn::open(&server).await;
    publisher
        .send(publish(1, room, "over-tls", number(1), true))
        .await;
    assert!(matches!(reply(&mut publisher, 1).await, Ok(Some(_))));
    sub.expect_events(room, &["over-tls".into()]).await;
    let (status, connz) = http_get_at(
        SocketAddr::from(([127, 0, 0, 1], nats.monitor_port)),
        "/connz",
    )
    .await;
    assert_eq!(status, 200);
    assert!(connz.contains(&conn_name("edge-tls")), "{connz}");
    assert!(
        connz.contains("\"tls_version\""),
        "the node's connection is not TLS: {connz}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /api/publish` of event `note` with `{"n": n}` to `room` on `server`; expects 200.
async fn api_note(server: &Server, room: &str, n: u64) {
    let body = serde_json::json!({"room": room, "event": "note", "data": {"n": n}});
    let (status, answer) = api_publish(server.local_addr(), KEY, &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
}

/// The room and `n` of a `note` event.
fn note(frame: ServerFrame) -> (String, u64) {
    match frame {
        ServerFrame::Event(e) => {
            let data: std::collections::BTreeMap<String, u64> = e.data.decode().unwrap();
            (e.room.as_str().to_owned(), data["n"])
        }
        other => panic!("expected an Event, got {other:?}"),
    }
}

#[tokio::test]
async fn personal_rooms_reach_every_session_of_the_user_on_every_node() {
    let nats = NatsServer::start("");
    let secured = |id: &str| {
        let mut c = node(&nats, id);
        c.config = Some(secured_config(""));
        c
    };
    let a = start(secured("node-a")).await;
    // Node B's commands take 300 ms to reach NATS: the personal room's Subscribed (id 0) must
    // still wait until B's subscription is live, like any other.
    let slow_link = delaying_proxy(
        format!("127.0.0.1:{}", nats.port).parse().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    let mut config_b = secured("node-b");
    config_b.cluster.nats = vec![format!("nats://{slow_link}")];
    let b = start(config_b).await;
    until_readyz(&a, 200).await;
    until_readyz(&b, 200).await;
    let alice = user_token("alice", &[]);
    let mut alice_a = RawConn::open_as(&a, &alice, "alice").await;
    let mut alice_b = RawConn::open_as(&b, &alice, "alice").await;
    let mut alice_wt = RawWt::connect(&b).await;
    alice_wt
        .send(ClientFrame::Hello {
            version: 1,
            token: Some(alice.clone()),
        })
        .await;
    assert!(matches!(
        alice_wt.control.frame().await,
        ServerFrame::Welcome(_)
    ));
    let mut alice_wt_room = alice_wt.accept_room(0, "user:alice").await;
    let mut bob_b = RawConn::open_as(&b, &user_token("bob", &[]), "bob").await;
    // The backend publishes on node A: alice's sessions on both nodes get it, at once.
    api_note(&a, "user:alice", 1).await;
    let expected = ("user:alice".to_owned(), 1);
    assert_eq!(note(alice_a.frame().await), expected);
    assert_eq!(note(alice_b.frame().await), expected);
    assert_eq!(note(alice_wt_room.frame().await), expected);
    // And on node B.
    api_note(&b, "user:alice", 2).await;
    let expected = ("user:alice".to_owned(), 2);
    assert_eq!(note(alice_a.frame().await), expected);
    assert_eq!(note(alice_b.frame().await), expected);
    assert_eq!(note(alice_wt_room.frame().await), expected);
    // Bob's first event is his own: none of alice's reached him.
    api_note(&a, "user:bob", 3).await;
    assert_eq!(note(bob_b.frame().await), ("user:bob".to_owned(), 3));
}
