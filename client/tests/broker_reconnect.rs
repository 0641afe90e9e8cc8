//! Reconnect against the real broker on 127.0.0.1 port 0: when one broker shuts down, the
//! client moves to the next URL (another broker process-local history, so nothing there can
//! be recovered) and goes on receiving the room's events.

use std::time::Duration;

use roomcast_broker::{Config, Server};
use roomcast_client::{
    Client, ClientEvent, Code, ConnectOptions, ReconnectPolicy, Recovery, SubscriptionItem, connect,
};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

async fn broker() -> Server {
    Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    })
    .await
    .unwrap()
}

async fn next_item(sub: &mut roomcast_client::Subscription) -> SubscriptionItem {
    timeout(WAIT, sub.next_item())
        .await
        .expect("an item in time")
        .expect("the subscription is open")
}

#[tokio::test]
async fn broker_shutdown_moves_the_client_to_the_next_url_and_resubscribes() {
    let first = broker().await;
    let second = broker().await;
    let (first_url, second_url) = (first.ws_url(), second.ws_url());
    let client = timeout(
        WAIT,
        Client::builder()
            .urls([first_url.clone(), second_url.clone()])
            .reconnect(ReconnectPolicy {
                base_delay: Duration::from_millis(20),
                ..ReconnectPolicy::default()
            })
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut events = client.events();
    let mut orders = client.subscribe("orders:1").await.unwrap();

    let publisher = connect(&first_url, ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(
        publisher.publish("orders:1", "status", &1u64).await,
        Ok(Some(1))
    );
    match next_item(&mut orders).await {
        SubscriptionItem::Event(event) => assert_eq!(event.decode::<u64>().unwrap(), 1),
        other => panic!("expected the first event, got {other:?}"),
    }

    // The first broker drains: shutting_down, a reconnect hint.
    let shutdown = tokio::spawn(first.shutdown());
    let resumed = match next_item(&mut orders).await {
        SubscriptionItem::Resumed(resumed) => resumed,
        other => panic!("expected the subscription to be resumed, got {other:?}"),
    };
    // Another broker's history does not hold the position: reset (a broker that keeps
    // history) or fresh (one that does not), never recovered.
    assert_ne!(resumed.recovery, Recovery::Recovered, "{resumed:?}");
    assert_eq!(resumed.previous.seq, 1);

    let mut saw = Vec::new();
    loop {
        let event = timeout(WAIT, events.next())
            .await
            .expect("client events in time")
            .expect("client events open");
        match event {
            ClientEvent::Connected { url, .. } => {
                assert_eq!(url, second_url);
                break;
            }
            other => saw.push(other),
        }
    }
    assert!(
        matches!(&saw[0], ClientEvent::Disconnected(info) if info.code == Some(Code::ShuttingDown)),
        "{saw:?}"
    );
    assert!(
        matches!(&saw[1], ClientEvent::Reconnecting { attempt: 1, url, .. } if *url == second_url),
        "{saw:?}"
    );

    // Events published on the second broker reach the resumed subscription.
    let publisher = connect(&second_url, ConnectOptions::default())
        .await
        .unwrap();
    publisher
        .publish("orders:1", "status", &2u64)
        .await
        .unwrap();
    match next_item(&mut orders).await {
        SubscriptionItem::Event(event) => assert_eq!(event.decode::<u64>().unwrap(), 2),
        other => panic!("expected the second broker's event, got {other:?}"),
    }
    timeout(WAIT, shutdown)
        .await
        .expect("the first broker drains in time")
        .unwrap()
        .unwrap();
    client.close().await;
}
