//! The client library with a token against a real broker that requires tokens: the broker
//! joins the session to its personal room `user:<sub>` after `Welcome` (`Subscribed` id 0,
//! which the client takes without complaint), and `subscribe("user:<sub>")` hands the
//! application its events.

use std::{collections::BTreeMap, time::Duration};

use roomcast_broker::{
    Config, Server,
    auth::{TokenSpec, mint_hs256},
};
use roomcast_client::{ConnectOptions, connect};
use tokio::time::timeout;

const SECRET: &[u8] = b"client-personal-secret-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(20);

fn token(sub: &str, grants: &[(&str, &[&str])]) -> String {
    let rooms: BTreeMap<String, Vec<String>> = grants
        .iter()
        .map(|(p, caps)| {
            (
                (*p).to_owned(),
                caps.iter().map(|c| (*c).to_owned()).collect(),
            )
        })
        .collect();
    mint_hs256(
        SECRET,
        &TokenSpec {
            sub: sub.into(),
            rooms,
            ttl: Duration::from_secs(600),
            ..TokenSpec::default()
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_client_with_a_token_receives_its_personal_room() {
    let dir = std::env::temp_dir().join(format!("roomcast-client-personal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret.key"), SECRET).unwrap();
    let file = dir.join("roomcast.toml");
    std::fs::write(
        &file,
        "[auth]\nrequired = true\nkeys = [{ algorithm = \"HS256\", file = \"secret.key\" }]\n",
    )
    .unwrap();
    let server = Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        config: Some(file),
        ..Config::default()
    })
    .await
    .unwrap();
    let connect_as = |token: String| {
        let url = server.ws_url();
        async move {
            let options = ConnectOptions {
                token: Some(token),
                ..ConnectOptions::default()
            };
            timeout(WAIT, connect(&url, options))
                .await
                .expect("connect in time")
                .expect("connect")
        }
    };
    let alice = connect_as(token("alice", &[])).await;
    let notifier = connect_as(token("notifier", &[("user:*", &["pub"])])).await;
    // The broker's own Subscribed (id 0) did not disturb the client: its requests work.
    let mut personal = alice.subscribe("user:alice").await.unwrap();
    assert_eq!(personal.room().as_str(), "user:alice");
    notifier
        .publish("user:alice", "note", &"hello")
        .await
        .unwrap();
    let event = timeout(WAIT, personal.next_event())
        .await
        .expect("event in time")
        .expect("subscription open")
        .unwrap();
    assert_eq!(event.decode::<String>().unwrap(), "hello");
    let _ = std::fs::remove_dir_all(&dir);
}
