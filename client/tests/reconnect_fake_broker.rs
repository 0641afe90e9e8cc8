//! Reconnecting over real TCP against the shared scripted fake broker (tests/common), several
//! sessions in a row: backoff and `retry_after`, URL rotation, giving up, what the handles and
//! `ClientEvent`s show, keyed and auto-keyed publishes, the token provider on each reconnect,
//! the CLI. Recovery, epoch resets, refused resubscriptions and refresh refusals are tested on
//! the protocol crate's pair (protocol/tests/pair.rs).

mod common;

use std::time::Duration;

use base64::Engine;
use common::{BROKER_TIME_MS, Fake, at, refusing_url, within};
use roomcast_client::{
    Client, ClientEvent, ClientEvents, CloseInfo, Code, ConnectionState, Error, EventMessage,
    IdempotencyKey, Payload, ReconnectPolicy, Recovery, Resumption, SubscriptionError,
    SubscriptionItem, TokenProvider,
};
use roomcast_protocol::{ClientFrame, ServerFrame};
use tokio::{process::Command as AsyncCommand, sync::oneshot, time::Instant};

const CLI: &str = env!("CARGO_BIN_EXE_roomcast-cli");

/// A reconnect policy fast enough for tests (a delay of at most 20 ms).
fn fast() -> ReconnectPolicy {
    ReconnectPolicy {
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(20),
        max_attempts: None,
    }
}

/// Connects with [`fast`] reconnects. The tests run on tokio's current-thread runtime, so a
/// receiver from `Client::events()` taken right after this returns (before the test awaits
/// anything) sees every event after the first session opened.
async fn client(urls: &[&str]) -> Client {
    within(
        "connect",
        Client::builder()
            .urls(urls.iter().copied())
            .reconnect(fast())
            .connect(),
    )
    .await
    .expect("connect")
}

/// The next client event.
async fn next_event(events: &mut ClientEvents) -> ClientEvent {
    within("a client event", events.next())
        .await
        .expect("event stream open")
}

/// The next item, which must be an event; returns its seq (checked against the payload).
async fn next_seq(sub: &mut roomcast_client::Subscription) -> u64 {
    match within("an item", sub.next_item()).await {
        Some(SubscriptionItem::Event(event)) => seq(&event),
        other => panic!("expected an event, got {other:?}"),
    }
}

fn seq(event: &EventMessage) -> u64 {
    let decoded: u64 = event.decode().unwrap();
    assert_eq!(decoded, event.seq, "payload travels with its event");
    event.seq
}

#[tokio::test]
async fn a_dropped_connection_is_resumed_from_the_last_position_and_recovered_is_surfaced() {
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let broker = tokio::spawn(async move {
        let mut peer = fake.accept().await;
        peer.handshake("s-1").await;
        peer.accept_subscribe("orders:1", at(7, 10)).await;
        peer.event("orders:1", 11, None).await;
        peer.event("orders:1", 12, None).await;
        // The connection drops without a close: the client must reconnect.
        drop(peer);

        let mut peer = fake.accept().await;
        peer.handshake("s-2").await;
        let (id, since) = peer.expect_subscribe("orders:1").await;
        assert_eq!(since, Some(at(7, 12)), "since = the last event received");
        peer.subscribed(id, "orders:1", at(7, 12), Some(true)).await;
        // The seam repeats 12: the client drops it.
        peer.event("orders:1", 12, None).await;
        peer.event("orders:1", 13, None).await;
        peer.until_client_leaves().await;
    });

    let client = client(&[&url]).await;
    let mut events = client.events();
    let mut sub = within("subscribe", client.subscribe("orders:1"))
        .await
        .unwrap();
    assert_eq!(sub.start_position(), at(7, 10));
    assert_eq!(next_seq(&mut sub).await, 11);
    assert_eq!(next_seq(&mut sub).await, 12);
    assert_eq!(
        within("resumed", sub.next_item()).await,
        Some(SubscriptionItem::Resumed(Resumption {
            recovery: Recovery::Recovered,
            previous: at(7, 12),
            position: at(7, 12),
        }))
    );
    assert_eq!(next_seq(&mut sub).await, 13);

    match next_event(&mut events).await {
        ClientEvent::Disconnected(info) => {
            assert_eq!(info.code, None);
            assert!(info.reconnect);
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    match next_event(&mut events).await {
        ClientEvent::Reconnecting {
            attempt,
            delay,
            url: next,
        } => {
            assert_eq!((attempt, next.as_str()), (1, url.as_str()));
            assert!(delay <= Duration::from_millis(20), "{delay:?}");
        }
        other => panic!("expected Reconnecting, got {other:?}"),
    }
    assert_eq!(
        next_event(&mut events).await,
        ClientEvent::Connected {
            url: url.clone(),
            session_id: "s-2".into()
        }
    );
    assert_eq!(client.session_id(), "s-2");
    assert_eq!(
        client.state(),
        ConnectionState::Connected {
            url,
            session_id: "s-2".into()
        }
    );
    within("close", client.close()).await;
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::Closed(CloseInfo {
            code: Some(Code::Normal),
            ..
        })
    ));
    broker.await.unwrap();
}

#[tokio::test]
async fn close_retry_after_is_honoured_before_reconnecting() {
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let broker = tokio::spawn(async move {
        let mut peer = fake.accept().await;
        peer.handshake("s-1").await;
        let closed_at = Instant::now();
        peer.close_with(
            Code::ShuttingDown,
            Code::ShuttingDown.as_str(),
            true,
            Some(400),
        )
        .await;
        let mut peer = fake.accept().await;
        let waited = closed_at.elapsed();
        peer.handshake("s-2").await;
        peer.until_client_leaves().await;
        waited
    });

    let client = client(&[&url]).await;
    let mut events = client.events();
    match next_event(&mut events).await {
        ClientEvent::Disconnected(info) => assert_eq!(info.code, Some(Code::ShuttingDown)),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    match next_event(&mut events).await {
        // The policy alone would wait at most 20 ms.
        ClientEvent::Reconnecting { delay, .. } => {
            assert!(delay >= Duration::from_millis(400), "{delay:?}")
        }
        other => panic!("expected Reconnecting, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::Connected { .. }
    ));
    client.close().await;
    let waited = broker.await.unwrap();
    // A lower bound only: the Close left the broker before the client could see it.
    assert!(
        waited >= Duration::from_millis(400),
        "reconnected after {waited:?}"
    );
}

#[tokio::test]
async fn a_close_whose_reconnect_is_false_ends_the_client_for_good() {
    for (code, reconnect) in [
        // The frame's flag decides, whatever the code's usual hint.
        (Code::ShuttingDown, false),
        (Code::Unauthorized, Code::Unauthorized.should_retry()),
    ] {
        let fake = Fake::bind().await;
        let url = fake.url.clone();
        let broker = tokio::spawn(async move {
            let mut peer = fake.accept().await;
            peer.handshake("s-1").await;
            peer.accept_subscribe("a:1", at(0, 0)).await;
            peer.close_with(code, code.as_str(), reconnect, Some(10))
                .await;
        });
        let client = client(&[&url]).await;
        let mut events = client.events();
        let mut sub = client.subscribe("a:1").await.unwrap();
        let info = within("closed", client.closed()).await;
        assert_eq!(info.code, Some(code));
        assert!(!info.reconnect);
        // No Disconnected / Reconnecting: straight to the end.
        assert_eq!(
            next_event(&mut events).await,
            ClientEvent::Closed(info.clone())
        );
        assert_eq!(within("end of events", events.next()).await, None);
        assert_eq!(client.state(), ConnectionState::Closed(info.clone()));
        assert_eq!(
            within("subscription end", sub.next_event()).await,
            Some(Err(SubscriptionError::Closed(info.clone())))
        );
        assert_eq!(
            client.ping().await.map(|_| ()),
            Err(Error::Closed(info.clone()))
        );
        broker.await.unwrap();
    }
}

#[tokio::test]
async fn the_client_gives_up_after_max_attempts() {
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let broker = tokio::spawn(async move {
        let mut peer = fake.accept().await;
        peer.handshake("s-1").await;
        // Nobody listens any more: every attempt is refused.
        drop(fake);
        drop(peer);
    });
    let client = within(
        "connect",
        Client::builder()
            .url(&url)
            .reconnect(ReconnectPolicy {
                max_attempts: Some(2),
                ..fast()
            })
            .connect(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let info = within("closed", client.closed()).await;
    assert!(!info.reconnect);
    assert!(
        info.reason
            .starts_with("gave up after 2 reconnect attempts"),
        "{info}"
    );
    let mut failed = 0;
    while let Some(event) = within("events", events.next()).await {
        if matches!(event, ClientEvent::ConnectFailed { .. }) {
            failed += 1;
        }
    }
    assert_eq!(failed, 2);
    broker.await.unwrap();
}

#[tokio::test]
async fn attempts_rotate_to_the_next_url_when_one_refuses() {
    let refused = refusing_url().await;
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let broker = tokio::spawn(async move {
        let mut peer = fake.accept().await;
        peer.handshake("s-1").await;
        // A room without history (epoch 0).
        peer.accept_subscribe("gps:1", at(0, 3)).await;
        peer.event("gps:1", 4, None).await;
        drop(peer);
        let mut peer = fake.accept().await;
        peer.handshake("s-2").await;
        let (id, since) = peer.expect_subscribe("gps:1").await;
        assert_eq!(since, None, "no since for a room without history");
        peer.subscribed(id, "gps:1", at(0, 9), None).await;
        peer.event("gps:1", 10, None).await;
        peer.until_client_leaves().await;
    });

    // The first URL refuses, so the first session opens on the second.
    let client = client(&[&refused, &url]).await;
    assert_eq!(
        client.state(),
        ConnectionState::Connected {
            url: url.clone(),
            session_id: "s-1".into()
        }
    );
    let mut events = client.events();
    let mut sub = client.subscribe("gps:1").await.unwrap();
    assert_eq!(
        within("event", sub.next_event())
            .await
            .unwrap()
            .unwrap()
            .seq,
        4
    );
    // next_event reports the gap of a fresh resubscription.
    assert_eq!(
        within("reset", sub.next_event()).await,
        Some(Err(SubscriptionError::Reset(Resumption {
            recovery: Recovery::Fresh,
            previous: at(0, 4),
            position: at(0, 9),
        })))
    );
    assert_eq!(
        within("event", sub.next_event())
            .await
            .unwrap()
            .unwrap()
            .seq,
        10
    );

    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::Disconnected(_)
    ));
    // After the second URL, the first (refusing) one, then the second again.
    let mut tried = Vec::new();
    loop {
        match next_event(&mut events).await {
            ClientEvent::Reconnecting { attempt, url, .. } => tried.push((attempt, url)),
            ClientEvent::ConnectFailed { url: failed, error } => {
                assert_eq!(failed, refused);
                assert!(matches!(error, Error::Transport(_)), "{error:?}");
            }
            ClientEvent::Connected { url: connected, .. } => {
                assert_eq!(connected, url);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tried, vec![(1, refused.clone()), (2, url.clone())]);
    client.close().await;
    broker.await.unwrap();
}

#[tokio::test]
async fn keyed_publishes_are_resent_after_reconnect_and_unkeyed_ones_fail_disconnected() {
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let (second_tx, second_rx) = oneshot::channel::<()>();
    let broker = tokio::spawn(async move {
        let mut peer = fake.accept().await;
        peer.handshake("s-1").await;
        let mut seen = [peer.expect_publish().await, peer.expect_publish().await];
        seen.sort_by_key(|(_, key, _)| key.clone());
        let first_id = seen[1].0;
        assert_eq!(seen[0].1, None);
        assert_eq!(seen[1].1.as_deref(), Some("order-7"));
        // Neither is acknowledged: the connection drops.
        drop(peer);
        // The client stays between sessions until the test has made its requests there.
        second_rx.await.unwrap();
        let mut peer = fake.accept().await;
        peer.handshake("s-2").await;
        // Re-sent with the same key and payload, then the one made while reconnecting, in
        // the order they were made.
        let (id, key, payload) = peer.expect_publish().await;
        assert_eq!(
            (id, key.as_deref(), payload),
            (first_id, Some("order-7"), 7)
        );
        peer.send(ServerFrame::Ack { id, seq: Some(5) }).await;
        let (id, key, payload) = peer.expect_publish().await;
        assert_eq!((key.as_deref(), payload), (Some("order-8"), 8));
        peer.send(ServerFrame::Ack { id, seq: Some(6) }).await;
        peer.until_client_leaves().await;
    });

    let client = client(&[&url]).await;
    let keyed = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .publish_with_key("orders:1", "status", &7u64, "order-7")
                .await
        }
    });
    let unkeyed = within(
        "unkeyed publish",
        client.publish("orders:1", "status", &1u64),
    )
    .await;
    match unkeyed {
        Err(Error::Disconnected(info)) => {
            assert_eq!(info.code, None);
            assert!(info.reconnect);
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // Between sessions: requests without a key fail at once, keyed ones wait.
    let mut state = client.watch_state();
    within(
        "reconnecting",
        state.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })),
    )
    .await
    .unwrap();
    assert!(matches!(
        client.publish("orders:1", "status", &2u64).await,
        Err(Error::Disconnected(_))
    ));
    assert!(matches!(client.ping().await, Err(Error::Disconnected(_))));
    assert!(matches!(
        client
            .publish_payload("orders:1", "e", Payload::encode(&3u8).unwrap(), false)
            .await,
        Err(Error::Disconnected(_))
    ));
    let later = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .publish_with_key("orders:1", "status", &8u64, IdempotencyKey::new("order-8"))
                .await
        }
    });
    // Whether the driver takes it before or after the next session opens, it follows the
    // re-sent one.
    second_tx.send(()).unwrap();
    assert_eq!(within("keyed publish", keyed).await.unwrap(), Ok(Some(5)));
    assert_eq!(within("later publish", later).await.unwrap(), Ok(Some(6)));
    client.close().await;
    broker.await.unwrap();
}

#[tokio::test]
async fn auto_idempotency_keys_make_plain_publishes_survive_a_reconnect() {
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let broker = tokio::spawn(async move {
        let mut peer = fake.accept().await;
        peer.handshake("s-1").await;
        let (_, key, payload) = peer.expect_publish().await;
        let key = key.expect("an automatic key");
        assert_eq!(key.len(), 32);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(payload, 1);
        drop(peer);
        let mut peer = fake.accept().await;
        peer.handshake("s-2").await;
        let (id, again, _) = peer.expect_publish().await;
        assert_eq!(again.as_deref(), Some(key.as_str()), "the same key again");
        peer.send(ServerFrame::Ack { id, seq: Some(1) }).await;
        peer.until_client_leaves().await;
    });
    let client = within(
        "connect",
        Client::builder()
            .url(&url)
            .reconnect(fast())
            .auto_idempotency_keys(true)
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("publish", client.publish("a:1", "e", &1u64)).await,
        Ok(Some(1))
    );
    client.close().await;
    broker.await.unwrap();
}

/// A JWT (unsigned: the fake does not check) for user `sub` expiring at `exp`.
fn jwt(sub: &str, exp: u64) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        engine.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        engine.encode(format!(r#"{{"sub":"{sub}","exp":{exp}}}"#))
    )
}

#[tokio::test]
async fn tokens_are_refreshed_before_exp_and_every_reconnect_asks_the_provider() {
    let now_s = BROKER_TIME_MS / 1000;
    // Call n of the provider returns token n. Tokens 1, 3 and 5 expire 10 s after the
    // fake's Welcome (so they are refreshed at once); 2 lives an hour (no refresh in this
    // test).
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let token = move |n: u64| jwt(&format!("ann-{n}"), now_s + if n == 2 { 3600 } else { 10 });
    let provider = TokenProvider::new({
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let token = token(n);
            async move { Ok::<_, String>(token) }
        }
    });

    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let broker = tokio::spawn(async move {
        // Session 1: Refresh with the provider's next token, accepted.
        let mut peer = fake.accept().await;
        assert_eq!(peer.handshake("s-1").await, Some(token(1)));
        let welcomed = Instant::now();
        match peer.recv().await {
            ClientFrame::Refresh { id, token: fresh } => {
                assert_eq!(fresh, token(2));
                assert!(welcomed.elapsed() < Duration::from_secs(10), "before exp");
                peer.send(ServerFrame::Ack { id, seq: None }).await;
            }
            other => panic!("expected Refresh, got {other:?}"),
        }
        peer.answer_ping().await;
        drop(peer);
        // Session 2: the reconnect's Hello carries the provider's next token; its Refresh is
        // refused with an Error.
        let mut peer = fake.accept().await;
        assert_eq!(peer.handshake("s-2").await, Some(token(3)));
        match peer.recv().await {
            ClientFrame::Refresh { id, token: fresh } => {
                assert_eq!(fresh, token(4));
                peer.send(ServerFrame::Error {
                    id: Some(id),
                    code: Code::Forbidden,
                    message: "another user".into(),
                    retry_after_ms: None,
                })
                .await;
            }
            other => panic!("expected Refresh, got {other:?}"),
        }
        peer.answer_ping().await;
        drop(peer);
        // Session 3: its Refresh is answered by a Close that ends the client.
        let mut peer = fake.accept().await;
        assert_eq!(peer.handshake("s-3").await, Some(token(5)));
        match peer.recv().await {
            ClientFrame::Refresh { token: fresh, .. } => assert_eq!(fresh, token(6)),
            other => panic!("expected Refresh, got {other:?}"),
        }
        peer.close_with(Code::Unauthorized, Code::Unauthorized.as_str(), false, None)
            .await;
    });

    let client = within(
        "connect",
        Client::builder()
            .url(&url)
            .reconnect(fast())
            .token_provider(provider)
            .connect(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    assert_eq!(next_event(&mut events).await, ClientEvent::TokenRefreshed);
    within("ping", client.ping()).await.unwrap();

    let mut seen = Vec::new();
    let info = loop {
        match next_event(&mut events).await {
            ClientEvent::Closed(info) => break info,
            ClientEvent::Reconnecting { .. } => {}
            other => seen.push(other),
        }
        if seen.len() == 3 {
            // After the refused refresh the session goes on.
            within("ping", client.ping()).await.unwrap();
        }
    };
    assert_eq!(info.code, Some(Code::Unauthorized));
    assert!(matches!(&seen[0], ClientEvent::Disconnected(_)), "{seen:?}");
    assert!(
        matches!(&seen[1], ClientEvent::Connected { session_id, .. } if session_id == "s-2"),
        "{seen:?}"
    );
    assert_eq!(
        seen[2],
        ClientEvent::TokenRefreshFailed(Error::Server {
            code: Code::Forbidden,
            message: "another user".into()
        })
    );
    assert!(matches!(&seen[3], ClientEvent::Disconnected(_)), "{seen:?}");
    assert!(
        matches!(&seen[4], ClientEvent::Connected { session_id, .. } if session_id == "s-3"),
        "{seen:?}"
    );
    assert_eq!(
        seen[5],
        ClientEvent::TokenRefreshFailed(Error::Closed(info.clone()))
    );
    assert_eq!(seen.len(), 6, "{seen:?}");
    broker.await.unwrap();
}

#[tokio::test]
async fn cli_sub_reconnects_to_the_next_url_and_prints_every_event_once() {
    let first = Fake::bind().await;
    let second = Fake::bind().await;
    let urls = format!("{},{}", first.url, second.url);
    let second_url = second.url.clone();
    let brokers = tokio::spawn(async move {
        let mut peer = first.accept().await;
        peer.handshake("s-1").await;
        peer.accept_subscribe("orders:9", at(5, 0)).await;
        peer.event("orders:9", 1, None).await;
        peer.event("orders:9", 2, None).await;
        peer.close_with(Code::ShuttingDown, Code::ShuttingDown.as_str(), true, None)
            .await;

        let mut peer = second.accept().await;
        peer.handshake("s-2").await;
        let (id, since) = peer.expect_subscribe("orders:9").await;
        assert_eq!(since, Some(at(5, 2)));
        peer.subscribed(id, "orders:9", at(5, 2), Some(true)).await;
        for seq in [2, 3, 4] {
            peer.event("orders:9", seq, None).await;
        }
        peer.until_client_leaves().await;
    });
    let output = within(
        "roomcast-cli sub",
        AsyncCommand::new(CLI)
            .args(["sub", &urls, "orders:9", "--count", "4"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{output:?}");
    let seqs: Vec<u64> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["data"], line["seq"]);
            line["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "{stderr}");
    assert!(stderr.contains("disconnected: shutting_down"), "{stderr}");
    assert!(
        stderr.contains(&format!("reconnecting to {second_url} in ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("resumed orders:9: recovered at seq 2"),
        "{stderr}"
    );
    brokers.await.unwrap();
}
