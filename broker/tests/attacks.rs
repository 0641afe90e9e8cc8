//! The attack matrix (issue 6): each hostile input against a broker configured with required
//! tokens, namespace policy and tight limits gets its exact code (HTTP status for refused
//! session requests), and an innocent subscriber in the room under attack keeps receiving.

mod common;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use bytes::Bytes;
use common::{wt::*, *};
use roomcast_broker::{
    Server,
    auth::{TokenSpec, mint_hs256},
};
use roomcast_protocol::{ClientFrame, Code, Payload, ServerFrame};
use tokio_tungstenite::{connect_async, tungstenite::client::IntoClientRequest};

const SECRET: &[u8] = b"attack-matrix-secret-0123456789abcdef";
const ROOM: &str = "watch:room";

/// Writes the secret and a configuration file into a fresh folder; returns the file.
fn config_file(extra_limits: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "roomcast-attacks-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret.key"), SECRET).unwrap();
    let file = dir.join("roomcast.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[auth]
required = true
pre_auth_hello_timeout_ms = 1000
audience = ["roomcast"]
origins = ["https://app.example"]
keys = [{{ kid = "k1", algorithm = "HS256", file = "secret.key" }}]

[limits]
publish_per_second = 1
publish_burst = 5
subscribe_per_second = 1
subscribe_burst = 5
error_budget = 20
error_window_secs = 3600
{extra_limits}

[namespaces.watch]
subscribe = "authenticated"
publish = "grant"

[namespaces.orders]
subscribe = "grant"
publish = "grant"
max_payload_bytes = 64
schemas = {{ status = 'payload = {{ state: "shipped" / "pending" }}' }}

[namespaces.feed]
subscribe = "authenticated"
publish = "backend"

[namespaces.gps]
publish = "grant"
volatile = true

[namespaces.slow]
publish = "grant"
publish_per_second = 1
publish_burst = 2
"#
        ),
    )
    .unwrap();
    file
}

async fn broker_with(
    extra_limits: &str,
    tweak: impl FnOnce(&mut roomcast_broker::Config),
) -> Server {
    let mut config = common::config();
    config.config = Some(config_file(extra_limits));
    config.max_frame_size = 4096;
    tweak(&mut config);
    start(config).await
}

async fn broker() -> Server {
    broker_with("", |_| {}).await
}

fn spec(sub: &str, grants: &[(&str, &str)]) -> TokenSpec {
    let mut rooms = BTreeMap::new();
    for (pattern, caps) in grants {
        rooms.insert(
            (*pattern).to_owned(),
            caps.split(',').map(str::to_owned).collect(),
        );
    }
    TokenSpec {
        sub: sub.into(),
        rooms,
        ttl: Duration::from_secs(3600),
        audience: Some("roomcast".into()),
        kid: Some("k1".into()),
        ..TokenSpec::default()
    }
}

fn token(spec: &TokenSpec) -> String {
    mint_hs256(SECRET, spec).unwrap()
}

/// Alice may subscribe everywhere in `watch`, `orders:1042` and publish in `orders:1042`.
fn alice() -> String {
    token(&spec("alice", &[("orders:1042", "sub,pub")]))
}

fn hello(token: Option<String>) -> ClientFrame {
    ClientFrame::Hello { version: 1, token }
}

fn publish(id: u64, room: &str, data: Bytes) -> ClientFrame {
    ClientFrame::Publish {
        key: None,
        id,
        room: room.into(),
        event: "e".into(),
        data,
        ack: true,
    }
}

fn small() -> Bytes {
    Payload::encode(&1u8).unwrap().as_bytes().clone()
}

/// WebSocket connect with a query token; completes Hello (no token) and the personal room's
/// `Subscribed` (id 0) that follows `Welcome`.
async fn ws_open(server: &Server, token: &str) -> RawConn {
    let url = format!("{}?token={token}", server.ws_url());
    let (ws, _) = connect_async(url).await.expect("ws connect");
    let mut conn = RawConn { ws };
    conn.send(hello(None)).await;
    match conn.frame().await {
        ServerFrame::Welcome(_) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    match conn.frame().await {
        ServerFrame::Subscribed { id: 0, room, .. } if room.namespace() == "user" => conn,
        other => panic!("expected the personal room's Subscribed, got {other:?}"),
    }
}

/// WebSocket connect without a request token, then Hello with `token`.
async fn ws_hello(server: &Server, token: Option<String>) -> RawConn {
    let mut conn = RawConn::connect(server).await;
    conn.send(hello(token)).await;
    conn
}

/// The HTTP status a WebSocket upgrade gets for `url_suffix` and extra headers.
async fn ws_refused(server: &Server, url_suffix: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = format!("{}{url_suffix}", server.ws_url())
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match connect_async(request).await {
        Ok(_) => panic!("upgrade accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// A subscriber in the attacked room, and a way to prove it still receives.
struct Bystander {
    subscriber: RawConn,
    /// A publisher kept open (for attacks that keep new sessions out); else a fresh one per
    /// check.
    publisher: Option<RawConn>,
    next: u64,
}

impl Bystander {
    async fn new(server: &Server) -> Bystander {
        let mut subscriber = ws_open(server, &token(&spec("bystander", &[]))).await;
        subscriber.subscribe(1, ROOM).await;
        Bystander {
            subscriber,
            publisher: None,
            next: 1000,
        }
    }

    /// With a publisher opened now and kept.
    async fn with_publisher(server: &Server) -> Bystander {
        let mut bystander = Bystander::new(server).await;
        let publisher = token(&spec("backend-ish", &[("watch:*", "pub")]));
        bystander.publisher = Some(ws_open(server, &publisher).await);
        bystander
    }

    /// A fresh publisher (its own buckets) publishes a marker; the subscriber gets it,
    /// skipping whatever an attacker managed to publish before it.
    async fn still_works(&mut self, server: &Server) {
        self.next += 1;
        let mut fresh = None;
        let publisher = match &mut self.publisher {
            Some(publisher) => publisher,
            None => {
                let publisher = token(&spec("backend-ish", &[("watch:*", "pub")]));
                fresh.insert(ws_open(server, &publisher).await)
            }
        };
        let marker = Payload::encode(&self.next).unwrap().as_bytes().clone();
        publisher.send(publish(self.next, ROOM, marker)).await;
        assert!(matches!(publisher.frame().await, ServerFrame::Ack { .. }));
        loop {
            match self.subscriber.frame().await {
                ServerFrame::Event(e) if e.data.decode::<u64>().ok() == Some(self.next) => break,
                ServerFrame::Event(_) => {}
                other => panic!("bystander expected events, got {other:?}"),
            }
        }
    }
}

// ----- authentication over WebSocket ---------------------------------------------------------

#[tokio::test]
async fn ws_token_attacks_at_hello() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5LCJhdWQiOiJyb29tY2FzdCJ9.";
    let wrong_alg = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &serde_json::json!({"sub": "a", "exp": 9_999_999_999u64, "aud": "roomcast"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let expired = TokenSpec {
        ttl: Duration::ZERO,
        ..spec("a", &[])
    };
    let early = TokenSpec {
        not_before: Some(Duration::from_secs(3600)),
        ..spec("a", &[])
    };
    let wrong_aud = TokenSpec {
        audience: Some("elsewhere".into()),
        ..spec("a", &[])
    };
    let unknown_kid = TokenSpec {
        kid: Some("k9".into()),
        ..spec("a", &[])
    };
    let cases: Vec<(&str, Option<String>, Code)> = vec![
        ("no token", None, Code::Unauthorized),
        (
            "bad signature",
            Some(mint_hs256(b"not-the-secret-not-the-secret-0000", &spec("a", &[])).unwrap()),
            Code::Unauthorized,
        ),
        ("alg none", Some(none.to_owned()), Code::Unauthorized),
        ("wrong algorithm", Some(wrong_alg), Code::Unauthorized),
        ("expired", Some(token(&expired)), Code::TokenExpired),
        ("not yet valid", Some(token(&early)), Code::Unauthorized),
        (
            "wrong audience",
            Some(token(&wrong_aud)),
            Code::Unauthorized,
        ),
        ("unknown kid", Some(token(&unknown_kid)), Code::Unauthorized),
        ("garbage", Some("x.y.z".into()), Code::Unauthorized),
    ];
    for (name, token, code) in cases {
        eprintln!("case: {name}");
        let mut attacker = ws_hello(&server, token).await;
        attacker.expect_close(code).await;
        bystander.still_works(&server).await;
    }
}

#[tokio::test]
async fn ws_token_attacks_at_upgrade() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let bad = mint_hs256(b"not-the-secret-not-the-secret-0000", &spec("a", &[])).unwrap();
    let expired = token(&TokenSpec {
        ttl: Duration::ZERO,
        ..spec("a", &[])
    });
    assert_eq!(
        ws_refused(&server, &format!("?token={bad}"), &[]).await,
        401
    );
    assert_eq!(
        ws_refused(&server, &format!("?token={expired}"), &[]).await,
        401
    );
    let bearer = format!("Bearer {bad}");
    assert_eq!(
        ws_refused(&server, "", &[("authorization", bearer.as_str())]).await,
        401
    );
    // Origin allow-list: a browser page elsewhere is refused, the listed origin admitted.
    let good = format!("?token={}", alice());
    assert_eq!(
        ws_refused(&server, &good, &[("origin", "https://evil.example")]).await,
        403
    );
    let mut request = format!("{}{good}", server.ws_url())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    assert!(connect_async(request).await.is_ok());
    // A token by header is as good as one in the query.
    let mut request = server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", alice()).parse().unwrap(),
    );
    let (ws, _) = connect_async(request).await.unwrap();
    let mut conn = RawConn { ws };
    conn.send(hello(None)).await;
    assert!(matches!(conn.frame().await, ServerFrame::Welcome(_)));
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn ws_hello_token_of_another_user_and_expiry_mid_session() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    // The request's token says alice, the Hello token bob.
    let url = format!("{}?token={}", server.ws_url(), alice());
    let (ws, _) = connect_async(url).await.unwrap();
    let mut conn = RawConn { ws };
    conn.send(hello(Some(token(&spec("bob", &[]))))).await;
    conn.expect_close(Code::Unauthorized).await;
    bystander.still_works(&server).await;
    // A token valid for about two more seconds: the session is closed when it runs out.
    let short = token(&TokenSpec {
        ttl: Duration::from_secs(2),
        ..spec("carol", &[])
    });
    let mut conn = ws_open(&server, &short).await;
    conn.subscribe(1, ROOM).await;
    loop {
        match conn.next().await {
            Seen::Frame(ServerFrame::Event(_)) => {}
            Seen::Frame(ServerFrame::Close { code, .. }) => {
                assert_eq!(code, Code::TokenExpired);
                break;
            }
            other => panic!("expected token_expired, got {other:?}"),
        }
    }
    bystander.still_works(&server).await;
}

// ----- permissions ---------------------------------------------------------------------------

#[tokio::test]
async fn ws_permission_attacks_are_forbidden() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let mut attacker = ws_open(&server, &alice()).await;
    let subscribe = |id, room: &str| ClientFrame::Subscribe {
        since: None,
        id,
        room: room.into(),
    };
    let cases: Vec<(&str, ClientFrame, Code)> = vec![
        (
            "grant for another room",
            subscribe(1, "orders:1043"),
            Code::Forbidden,
        ),
        (
            "grant prefix is exact",
            subscribe(2, "orders:10421"),
            Code::Forbidden,
        ),
        (
            "another user's room",
            subscribe(3, "user:bob"),
            Code::Forbidden,
        ),
        (
            "user room suffix",
            subscribe(4, "user:alice:x"),
            Code::Forbidden,
        ),
        (
            "unknown namespace",
            subscribe(5, "secret:1"),
            Code::Forbidden,
        ),
        (
            "injection: newline",
            subscribe(6, "orders:1042\n"),
            Code::InvalidRoom,
        ),
        (
            "injection: space",
            subscribe(7, "orders:1042 x"),
            Code::InvalidRoom,
        ),
        (
            "injection: NATS wildcard ns",
            subscribe(8, "orders.*:1"),
            Code::InvalidRoom,
        ),
        (
            "injection: uppercase ns",
            subscribe(9, "Orders:1042"),
            Code::InvalidRoom,
        ),
        (
            "injection: non-ASCII",
            subscribe(10, "orders:1042é"),
            Code::InvalidRoom,
        ),
        (
            "publish backend-only",
            publish(11, "feed:news", small()),
            Code::Forbidden,
        ),
        (
            "publish without pub grant",
            publish(12, ROOM, small()),
            Code::Forbidden,
        ),
        (
            "publish oversized payload",
            publish(
                13,
                "orders:1042",
                Payload::encode(&"x".repeat(100))
                    .unwrap()
                    .as_bytes()
                    .clone(),
            ),
            Code::PayloadTooLarge,
        ),
        (
            "schema mismatch",
            ClientFrame::Publish {
                key: None,
                id: 16,
                room: "orders:1042".into(),
                event: "status".into(),
                data: Payload::encode(&BTreeMap::from([("state", "stolen")]))
                    .unwrap()
                    .as_bytes()
                    .clone(),
                ack: true,
            },
            Code::SchemaMismatch,
        ),
        (
            "nesting bomb",
            publish(14, "orders:1042", Bytes::from(vec![0x81u8; 2000])),
            Code::InvalidPayload,
        ),
        (
            "huge declared length, tiny body",
            publish(
                15,
                "orders:1042",
                Bytes::from_static(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]),
            ),
            Code::InvalidPayload,
        ),
    ];
    for (name, frame, code) in cases {
        eprintln!("case: {name}");
        let id = match &frame {
            ClientFrame::Subscribe { id, .. } | ClientFrame::Publish { id, .. } => *id,
            _ => unreachable!(),
        };
        attacker.send(frame).await;
        attacker.expect_error(Some(id), code).await;
        bystander.still_works(&server).await;
        // The subscribe bucket refills at 1/s with a burst of 5: spread the cases out.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // What alice is allowed still works on the same session.
    attacker.subscribe(20, "orders:1042").await;
    attacker.subscribe(21, "user:alice").await;
}

#[tokio::test]
async fn ws_malformed_frames_close() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    // Oversized frame.
    let mut attacker = ws_open(&server, &alice()).await;
    attacker.send_bytes(Bytes::from(vec![0u8; 8192])).await;
    attacker.expect_close(Code::FrameTooLarge).await;
    bystander.still_works(&server).await;
    // Invalid UTF-8 in a text field: a Subscribe whose room is 0x63 'c' 0xff.
    let mut attacker = ws_open(&server, &alice()).await;
    attacker
        .send_bytes(Bytes::from_static(&[
            0xa3, 0x00, 0x02, 0x01, 0x01, 0x02, 0x62, 0x63, 0xff,
        ]))
        .await;
    attacker.expect_close(Code::ProtocolError).await;
    bystander.still_works(&server).await;
    // A huge declared frame-level byte string with a tiny body.
    let mut attacker = ws_open(&server, &alice()).await;
    attacker
        .send_bytes(Bytes::from_static(&[
            0xa2, 0x00, 0x04, 0x04, 0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]))
        .await;
    attacker.expect_close(Code::ProtocolError).await;
    bystander.still_works(&server).await;
}

// ----- floods --------------------------------------------------------------------------------

/// Reads a flooding WebSocket session until its `Close`, which must be `policy_violation`;
/// counts the replies `accepted` recognises and the `rate_limited` errors (each also handed
/// to `check_limited` with its message and retry-after) before it.
async fn replies_until_policy_close(
    attacker: &mut RawConn,
    accepted: impl Fn(&ServerFrame) -> bool,
    check_limited: impl Fn(&str, Option<u64>),
) -> (u32, u32) {
    let (mut ok, mut limited) = (0, 0);
    loop {
        match attacker.next().await {
            Seen::Frame(ServerFrame::Error {
                code,
                message,
                retry_after_ms,
                ..
            }) => {
                assert_eq!(code, Code::RateLimited);
                check_limited(&message, retry_after_ms);
                limited += 1;
            }
            Seen::Frame(ServerFrame::Close { code, .. }) => {
                assert_eq!(code, Code::PolicyViolation);
                return (ok, limited);
            }
            Seen::Frame(frame) if accepted(&frame) => ok += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn ws_publish_flood_is_rate_limited_then_closed() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let flooder = token(&spec("flood", &[("watch:*", "pub")]));
    let mut attacker = ws_open(&server, &flooder).await;
    for id in 1..=40u64 {
        attacker.send(publish(id, ROOM, small())).await;
    }
    let (acks, limited) = replies_until_policy_close(
        &mut attacker,
        |frame| matches!(frame, ServerFrame::Ack { .. }),
        |message, retry_after_ms| {
            assert!(message.contains("retry after"), "{message}");
            assert!(
                retry_after_ms.is_some_and(|ms| ms > 0),
                "{retry_after_ms:?}"
            );
        },
    )
    .await;
    // The burst of 5 passed, the error budget of 20 was spent, then the close.
    assert_eq!((acks, limited), (5, 20));
    bystander.still_works(&server).await;
}

/// Publishes `count` times into `room`, one at a time; returns the acks and the messages of
/// the `rate_limited` refusals (every other reply fails the test).
async fn publish_one_by_one(conn: &mut RawConn, room: &str, count: u64) -> (u64, Vec<String>) {
    let (mut acks, mut refusals) = (0, Vec::new());
    for id in 1..=count {
        conn.send(publish(id, room, small())).await;
        match conn.frame().await {
            ServerFrame::Ack { id: got, .. } if got == id => acks += 1,
            ServerFrame::Error {
                id: Some(got),
                code: Code::RateLimited,
                message,
                retry_after_ms: Some(ms),
            } if got == id && ms > 0 => refusals.push(message),
            other => panic!("expected Ack or rate_limited for {id}, got {other:?}"),
        }
    }
    (acks, refusals)
}

#[tokio::test]
async fn a_reconnecting_flooder_keeps_its_spent_per_user_budget() {
    // Per session: burst 5 (refill 1/s). Per user: burst 5 too, refill 1/s, over all sessions.
    let server = broker_with(
        "user_publish_per_second = 1\nuser_publish_burst = 5",
        |_| {},
    )
    .await;
    let mut bystander = Bystander::new(&server).await;
    let flooder = token(&spec("flood", &[("watch:*", "pub")]));
    let mut attacker = ws_open(&server, &flooder).await;
    for id in 1..=40u64 {
        attacker.send(publish(id, ROOM, small())).await;
    }
    let (acks, limited) = replies_until_policy_close(
        &mut attacker,
        |f| matches!(f, ServerFrame::Ack { .. }),
        |_, _| {},
    )
    .await;
    // The session's burst passed (spending the user's budget), then the close.
    assert_eq!((acks, limited), (5, 20));
    // Reconnecting gives fresh session buckets, which alone would let 5 through again; the
    // user's budget (refilling at 1/s) refuses well before, and says so.
    for _ in 0..2 {
        let mut again = ws_open(&server, &flooder).await;
        for id in 1..=40u64 {
            again.send(publish(id, ROOM, small())).await;
        }
        let by_budget = std::cell::Cell::new(0);
        let (acks, limited) = replies_until_policy_close(
            &mut again,
            |f| matches!(f, ServerFrame::Ack { .. }),
            |message, retry_after_ms| {
                assert!(retry_after_ms.is_some_and(|ms| ms > 0));
                if message.starts_with("per-user budget: rate limited; retry after") {
                    by_budget.set(by_budget.get() + 1);
                }
            },
        )
        .await;
        assert!(acks < 5, "a reconnect got {acks} publishes through");
        assert_eq!(limited, 20);
        // The publishes the session's buckets let through met the spent budget.
        assert!(acks + by_budget.get() >= 5, "{acks} + {}", by_budget.get());
    }
    // The budget is the user's on every transport: over WebTransport it is spent too.
    let mut wt = wt_open(&server, flooder.clone()).await;
    let mut refused = false;
    for id in 1..=5 {
        wt.send(publish(id, ROOM, small())).await;
        match wt.control.frame().await {
            ServerFrame::Ack { .. } => {}
            ServerFrame::Error {
                code: Code::RateLimited,
                message,
                ..
            } => {
                assert!(message.starts_with("per-user budget"), "{message}");
                refused = true;
            }
            other => panic!("expected Ack or rate_limited, got {other:?}"),
        }
    }
    assert!(refused, "the WebTransport session got its full burst");
    // Another user from the same address has a budget of its own: the full burst passes.
    let mut other = ws_open(&server, &token(&spec("other", &[("watch:*", "pub")]))).await;
    assert_eq!(
        publish_one_by_one(&mut other, ROOM, 5).await,
        (5, Vec::new())
    );
    bystander.still_works(&server).await;
}

/// A broker without auth whose sessions may publish anywhere: per session burst 5 (refill
/// 100/s), per user or address burst 5 (refill 1/s).
async fn anonymous_broker(exempt_loopback: bool) -> Server {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "roomcast-attacks-anon-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("roomcast.toml");
    std::fs::write(
        &file,
        format!(
            "[limits]\npublish_per_second = 100\npublish_burst = 5\nuser_publish_per_second = 1\n\
             user_publish_burst = 5\nper_ip_exempt_loopback = {exempt_loopback}\n\n\
             [default]\nsubscribe = \"anyone\"\npublish = \"anyone\"\n"
        ),
    )
    .unwrap();
    let mut config = common::config();
    config.config = Some(file);
    start(config).await
}

#[tokio::test]
async fn sessions_without_a_user_share_the_budget_of_their_address() {
    let server = anonymous_broker(false).await;
    let mut first = RawConn::open(&server).await;
    assert_eq!(
        publish_one_by_one(&mut first, "open:1", 5).await,
        (5, Vec::new())
    );
    // A second session from the same address, the first still open: fresh session buckets,
    // the address's budget spent.
    let mut second = RawConn::open(&server).await;
    let (acks, refusals) = publish_one_by_one(&mut second, "open:2", 5).await;
    assert!(acks < 5, "{acks}");
    assert!(
        refusals
            .iter()
            .all(|m| m.starts_with("per-address budget: rate limited")),
        "{refusals:?}"
    );
    first.ping(1).await;
    // Loopback addresses exempt from the per-address caps (the default) have no per-address
    // budget either: each session has its own buckets only.
    let server = anonymous_broker(true).await;
    for _ in 0..2 {
        let mut conn = RawConn::open(&server).await;
        assert_eq!(
            publish_one_by_one(&mut conn, "open:1", 5).await,
            (5, Vec::new())
        );
    }
}

#[tokio::test]
async fn ws_subscribe_flood_is_rate_limited_then_closed() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let mut attacker = ws_open(&server, &alice()).await;
    for id in 1..=40u64 {
        attacker
            .send(ClientFrame::Subscribe {
                since: None,
                id,
                room: format!("watch:{id}"),
            })
            .await;
    }
    let (ok, limited) = replies_until_policy_close(
        &mut attacker,
        |frame| matches!(frame, ServerFrame::Subscribed { .. }),
        |_, _| {},
    )
    .await;
    assert_eq!((ok, limited), (5, 20));
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn connection_flood_from_one_ip_is_refused_before_a_session_exists() {
    let server = broker_with(
        "per_ip_connects_per_second = 1\nper_ip_connect_burst = 30\nper_ip_sessions = 3\nper_ip_exempt_loopback = false",
        |_| {},
    )
    .await;
    let mut bystander = Bystander::with_publisher(&server).await;
    // The bystander holds two sessions; one more fits, the fourth concurrent one is refused.
    let _a = ws_open(&server, &alice()).await;
    let suffix = format!("?token={}", alice());
    assert_eq!(ws_refused(&server, &suffix, &[]).await, 503);
    let before = server.shared().security.connections.sessions();
    for _ in 0..40 {
        let status = ws_refused(&server, &suffix, &[]).await;
        assert_eq!(status, 503);
    }
    // Refused requests hold no session slot.
    assert_eq!(server.shared().security.connections.sessions(), before);
    assert_eq!(before, 3);
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn unauthenticated_sessions_get_the_shorter_pre_auth_hello_timeout() {
    // --hello-timeout stays at its 10 s default (the test waits at most WAIT = 10 s); the
    // pre-auth limit is 1 s.
    let server = broker_with("", |_| {}).await;
    let mut bystander = Bystander::new(&server).await;
    let mut attacker = RawConn::connect(&server).await;
    attacker.expect_close(Code::Timeout).await;
    let mut wt = RawWt::connect(&server).await;
    wt.expect_close(Code::Timeout).await;
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn slow_loris_hello_times_out() {
    let server = broker_with("", |c| c.hello_timeout = Duration::from_millis(300)).await;
    let mut attacker = RawConn::connect(&server).await;
    attacker.expect_close(Code::Timeout).await;
    // A WebTransport session that never says Hello either.
    let mut wt = RawWt::connect(&server).await;
    wt.expect_close(Code::Timeout).await;
}

// ----- WebTransport ---------------------------------------------------------------------------

async fn wt_hello(server: &Server, token: Option<String>) -> RawWt {
    let mut conn = RawWt::connect(server).await;
    conn.send(hello(token)).await;
    conn
}

/// A WebTransport session with `token` in `Hello`, past `Welcome` and with its personal
/// room's stream accepted (and kept).
async fn wt_open(server: &Server, token: String) -> RawWt {
    let mut conn = wt_hello(server, Some(token)).await;
    match conn.control.frame().await {
        ServerFrame::Welcome(_) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    let recv = tokio::time::timeout(WAIT, conn.connection.accept_uni())
        .await
        .expect("personal room stream in time")
        .expect("personal room stream");
    let mut personal = FrameStream::new(recv);
    match personal.frame().await {
        ServerFrame::Subscribed { id: 0, room, .. } if room.namespace() == "user" => {}
        other => panic!("expected the personal room's Subscribed, got {other:?}"),
    }
    conn.kept.push(personal);
    conn
}

async fn wt_error(conn: &mut RawWt, id: u64, code: Code) {
    match conn.control.frame().await {
        ServerFrame::Error {
            id: got, code: c, ..
        } => assert_eq!((got, c), (Some(id), code)),
        other => panic!("expected Error {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn wt_token_attacks() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let expired = TokenSpec {
        ttl: Duration::ZERO,
        ..spec("a", &[])
    };
    let cases: Vec<(&str, Option<String>, Code)> = vec![
        ("no token", None, Code::Unauthorized),
        (
            "bad signature",
            Some(mint_hs256(b"not-the-secret-not-the-secret-0000", &spec("a", &[])).unwrap()),
            Code::Unauthorized,
        ),
        ("expired", Some(token(&expired)), Code::TokenExpired),
        ("garbage", Some("x.y.z".into()), Code::Unauthorized),
    ];
    for (name, token, code) in cases {
        eprintln!("case: {name}");
        let mut attacker = wt_hello(&server, token).await;
        attacker.expect_close(code).await;
        bystander.still_works(&server).await;
    }
    // A bad token in the session request: refused before the session exists.
    let url = format!("{}?token=x.y.z", wt_url(&server));
    let refused = session_at(&url, cert_hash(&server), None).await;
    assert!(refused.is_err(), "the session request was refused");
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn wt_permission_and_flood_attacks() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let mut attacker = wt_open(&server, alice()).await;
    attacker
        .send(ClientFrame::Subscribe {
            since: None,
            id: 1,
            room: "user:bob".into(),
        })
        .await;
    wt_error(&mut attacker, 1, Code::Forbidden).await;
    bystander.still_works(&server).await;
    attacker.send(publish(2, "feed:news", small())).await;
    wt_error(&mut attacker, 2, Code::Forbidden).await;
    bystander.still_works(&server).await;
    let big = Payload::encode(&"x".repeat(100))
        .unwrap()
        .as_bytes()
        .clone();
    attacker.send(publish(3, "orders:1042", big)).await;
    wt_error(&mut attacker, 3, Code::PayloadTooLarge).await;
    bystander.still_works(&server).await;
    let stolen = Payload::encode(&BTreeMap::from([("state", "stolen")]))
        .unwrap()
        .as_bytes()
        .clone();
    attacker
        .send(ClientFrame::Publish {
            key: None,
            id: 4,
            room: "orders:1042".into(),
            event: "status".into(),
            data: stolen,
            ack: true,
        })
        .await;
    wt_error(&mut attacker, 4, Code::SchemaMismatch).await;
    bystander.still_works(&server).await;
    // Publish flood into the bystander's room.
    let flooder = token(&spec("flood", &[("watch:*", "pub")]));
    let mut attacker = wt_open(&server, flooder).await;
    for id in 1..=40u64 {
        attacker.send(publish(id, ROOM, small())).await;
    }
    let (acks, limited) = acks_and_limits_until_policy_close(&mut attacker).await;
    assert_eq!((acks, limited), (5, 20));
    expect_session_code(&attacker.connection, Code::PolicyViolation).await;
    bystander.still_works(&server).await;
}

// ----- token refresh -------------------------------------------------------------------------

#[tokio::test]
async fn refresh_extends_the_session_and_refuses_another_user() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let short = |sub: &str| {
        token(&TokenSpec {
            ttl: Duration::from_secs(2),
            ..spec(sub, &[])
        })
    };
    // A session whose two-second token is refreshed outlives the first token.
    let mut conn = ws_open(&server, &short("dave")).await;
    conn.send(ClientFrame::Refresh {
        id: 7,
        token: token(&spec("dave", &[])),
    })
    .await;
    assert_eq!(conn.frame().await, ServerFrame::Ack { id: 7, seq: None });
    tokio::time::sleep(Duration::from_millis(3000)).await;
    conn.ping(8).await;
    // Refresh with a token of another user: the session ends.
    conn.send(ClientFrame::Refresh {
        id: 9,
        token: token(&spec("mallory", &[])),
    })
    .await;
    conn.expect_close(Code::Unauthorized).await;
    bystander.still_works(&server).await;
    // Refresh with a forged token.
    let mut conn = ws_open(&server, &alice()).await;
    conn.send(ClientFrame::Refresh {
        id: 1,
        token: mint_hs256(b"not-the-secret-not-the-secret-0000", &spec("alice", &[])).unwrap(),
    })
    .await;
    conn.expect_close(Code::Unauthorized).await;
    bystander.still_works(&server).await;
    // Over WebTransport: another user's token.
    let mut wt = wt_open(&server, alice()).await;
    wt.send(ClientFrame::Refresh {
        id: 2,
        token: token(&spec("mallory", &[])),
    })
    .await;
    wt.expect_close(Code::Unauthorized).await;
    bystander.still_works(&server).await;
}

/// Reads a flooding WebTransport session's control stream until its `Close`, which must be
/// `policy_violation`; counts the `Ack`s and the `rate_limited` errors before it.
async fn acks_and_limits_until_policy_close(attacker: &mut RawWt) -> (u32, u32) {
    let (mut acks, mut limited) = (0, 0);
    loop {
        match attacker.control.frame().await {
            ServerFrame::Ack { .. } => acks += 1,
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, Code::RateLimited);
                limited += 1;
            }
            ServerFrame::Close { code, .. } => {
                assert_eq!(code, Code::PolicyViolation);
                return (acks, limited);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn wt_datagram_flood_is_rate_limited_by_its_own_bucket_then_closed() {
    // Datagrams get 2 at once (the publish bucket would allow 5): the datagram bucket limits.
    let server = broker_with("datagrams_per_second = 1\ndatagram_burst = 2", |_| {}).await;
    let mut bystander = Bystander::new(&server).await;
    let tracker = token(&spec("tracker", &[("gps:*", "pub")]));
    let mut attacker = wt_open(&server, tracker).await;
    for id in 1..=30u64 {
        let frame = ClientFrame::Publish {
            key: None,
            id,
            room: "gps:van-1".into(),
            event: "pos".into(),
            data: small(),
            ack: true,
        }
        .encode();
        attacker.connection.send_datagram(frame).unwrap();
    }
    let (acks, limited) = acks_and_limits_until_policy_close(&mut attacker).await;
    assert_eq!((acks, limited), (2, 20));
    expect_session_code(&attacker.connection, Code::PolicyViolation).await;
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn wt_malformed_input_and_subscribe_flood() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    // Nesting bomb and a huge declared length in `data`: request errors, the session goes on.
    let mut attacker = wt_open(&server, alice()).await;
    attacker
        .send(publish(1, "orders:1042", Bytes::from(vec![0x81u8; 2000])))
        .await;
    wt_error(&mut attacker, 1, Code::InvalidPayload).await;
    attacker
        .send(publish(
            2,
            "orders:1042",
            Bytes::from_static(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]),
        ))
        .await;
    wt_error(&mut attacker, 2, Code::InvalidPayload).await;
    attacker
        .send(ClientFrame::Subscribe {
            since: None,
            id: 3,
            room: "orders:1042\n".into(),
        })
        .await;
    wt_error(&mut attacker, 3, Code::InvalidRoom).await;
    bystander.still_works(&server).await;
    // Invalid UTF-8 in a text field closes with protocol_error.
    attacker
        .send_raw(Bytes::from_static(&[
            0xa3, 0x00, 0x02, 0x01, 0x01, 0x02, 0x62, 0x63, 0xff,
        ]))
        .await;
    attacker.expect_close(Code::ProtocolError).await;
    bystander.still_works(&server).await;
    // An oversized frame (the length prefix alone announces it).
    let mut attacker = wt_open(&server, alice()).await;
    attacker.send_raw(Bytes::from(vec![0u8; 8192])).await;
    attacker.expect_close(Code::FrameTooLarge).await;
    bystander.still_works(&server).await;
    // Subscribe flood.
    let mut attacker = wt_open(&server, alice()).await;
    for id in 1..=40u64 {
        attacker
            .send(ClientFrame::Subscribe {
                since: None,
                id,
                room: format!("watch:{id}"),
            })
            .await;
    }
    let (mut ok, mut limited) = (0, 0);
    // Subscribed frames arrive on room streams; the control stream carries the errors.
    loop {
        match attacker.control.frame().await {
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, Code::RateLimited);
                limited += 1;
            }
            ServerFrame::Close { code, .. } => {
                assert_eq!(code, Code::PolicyViolation);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(1), attacker.connection.accept_uni()).await
    {
        ok += 1;
    }
    assert_eq!(limited, 20);
    assert!(ok <= 5, "{ok} subscriptions passed a burst of 5");
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn the_config_file_sets_volatile_namespaces_and_session_caps() {
    let server = broker().await;
    let room = |name| roomcast_protocol::RoomName::new(name).unwrap();
    assert!(server.shared().hub.is_volatile(&room("gps:7")));
    assert!(!server.shared().hub.is_volatile(&room(ROOM)));
    // Sessions hold a slot for their lifetime and give it back when they end.
    let security = &server.shared().security;
    assert_eq!(security.connections.sessions(), 0);
    let mut conn = ws_open(&server, &alice()).await;
    assert_eq!(security.connections.sessions(), 1);
    conn.send(ClientFrame::Ping { id: Some(1) }).await;
    assert_eq!(conn.frame().await, ServerFrame::Pong { id: Some(1) });
    drop(conn);
    let deadline = tokio::time::Instant::now() + WAIT;
    while security.connections.sessions() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "slot not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn wt_connection_flood_is_refused_before_the_handshake() {
    let server = broker_with(
        "per_ip_connects_per_second = 1\nper_ip_connect_burst = 4\nper_ip_exempt_loopback = false",
        |_| {},
    )
    .await;
    // The bystander (WebSocket, two requests: subscriber and publisher) uses two of the burst.
    let mut bystander = Bystander::with_publisher(&server).await;
    let _a = wt_open(&server, alice()).await;
    let _b = wt_open(&server, alice()).await;
    let before = server.shared().security.connections.sessions();
    for _ in 0..10 {
        let refused = session_at(&wt_url(&server), cert_hash(&server), None).await;
        assert!(refused.is_err(), "the QUIC connection was refused");
    }
    assert_eq!(server.shared().security.connections.sessions(), before);
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn a_flood_of_invalid_requests_spends_the_error_budget() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let mut attacker = ws_open(&server, &alice()).await;
    for id in 1..=40u64 {
        attacker
            .send(ClientFrame::Subscribe {
                since: None,
                id,
                room: "no namespace".into(),
            })
            .await;
    }
    let mut errors = 0;
    loop {
        match attacker.next().await {
            Seen::Frame(ServerFrame::Error { code, .. }) => {
                assert_eq!(code, Code::InvalidRoom);
                errors += 1;
            }
            Seen::Frame(ServerFrame::Close { code, .. }) => {
                assert_eq!(code, Code::PolicyViolation);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(errors, 20);
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn a_namespace_with_its_own_low_rate_limits_only_its_own_publishes() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let grants = [("slow:*", "pub"), ("watch:*", "pub")];
    // Over WebSocket: two publishes into `slow` pass (its burst), the third is rate_limited
    // with the namespace named; `watch` (the session's [limits] buckets, burst 5) still accepts.
    let mut conn = ws_open(&server, &token(&spec("chatty", &grants))).await;
    for id in 1..=2 {
        conn.send(publish(id, "slow:1", small())).await;
        assert!(matches!(conn.frame().await, ServerFrame::Ack { .. }));
    }
    conn.send(publish(3, "slow:1", small())).await;
    match conn.frame().await {
        ServerFrame::Error {
            id: Some(3),
            code: Code::RateLimited,
            message,
            retry_after_ms: Some(ms),
        } => {
            assert!(
                message.starts_with("namespace slow: rate limited"),
                "{message}"
            );
            assert!(ms > 0);
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    for id in 4..=8 {
        conn.send(publish(id, ROOM, small())).await;
        assert!(
            matches!(conn.frame().await, ServerFrame::Ack { id: got, .. } if got == id),
            "watch accepts publish {id}"
        );
    }
    conn.send(publish(9, "slow:2", small())).await;
    conn.expect_error(Some(9), Code::RateLimited).await;
    bystander.still_works(&server).await;
    // Over WebTransport, on a fresh session (fresh buckets).
    let mut wt = wt_open(&server, token(&spec("chatty", &grants))).await;
    for id in 1..=2 {
        wt.send(publish(id, "slow:1", small())).await;
        assert!(matches!(wt.control.frame().await, ServerFrame::Ack { .. }));
    }
    wt.send(publish(3, "slow:1", small())).await;
    wt_error(&mut wt, 3, Code::RateLimited).await;
    wt.send(publish(4, ROOM, small())).await;
    assert!(matches!(
        wt.control.frame().await,
        ServerFrame::Ack { id: 4, .. }
    ));
    bystander.still_works(&server).await;
}

#[tokio::test]
async fn schema_mismatch_names_the_failing_field() {
    let server = broker().await;
    let mut bystander = Bystander::new(&server).await;
    let stolen = || ClientFrame::Publish {
        key: None,
        id: 1,
        room: "orders:1042".into(),
        event: "status".into(),
        data: Payload::encode(&BTreeMap::from([("state", "stolen")]))
            .unwrap()
            .as_bytes()
            .clone(),
        ack: true,
    };
    let expected = r#"event status in orders:1042 does not match its schema: data.state: expected "shipped" / "pending", got "stolen""#;
    let mut conn = ws_open(&server, &alice()).await;
    conn.send(stolen()).await;
    match conn.frame().await {
        ServerFrame::Error {
            id: Some(1),
            code: Code::SchemaMismatch,
            message,
            ..
        } => assert_eq!(message, expected),
        other => panic!("expected schema_mismatch, got {other:?}"),
    }
    let mut wt = wt_open(&server, alice()).await;
    wt.send(stolen()).await;
    match wt.control.frame().await {
        ServerFrame::Error {
            id: Some(1),
            code: Code::SchemaMismatch,
            message,
            ..
        } => assert_eq!(message, expected),
        other => panic!("expected schema_mismatch, got {other:?}"),
    }
    bystander.still_works(&server).await;
}
