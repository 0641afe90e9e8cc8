//! `roomcast-cli sub` and `pub` against a real broker on 127.0.0.1 port 0.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use roomcast_broker::{Config, Server};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command as AsyncCommand,
};

const CLI: &str = env!("CARGO_BIN_EXE_roomcast-cli");
const WAIT: Duration = Duration::from_secs(20);

async fn broker() -> Server {
    Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    })
    .await
    .unwrap()
}

async fn run_pub(url: &str, args: &[&str]) -> std::process::Output {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(CLI)
            .arg("pub")
            .arg(&url)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sub_prints_published_events_as_json_lines() {
    let server = broker().await;
    let url = server.ws_url();
    let mut sub = AsyncCommand::new(CLI)
        .args(["sub", &url, "orders:1042", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until the subscription is live.
    let mut stderr = BufReader::new(sub.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, stderr.next_line())
        .await
        .expect("sub reports its subscription")
        .unwrap()
        .unwrap();
    assert_eq!(line, "subscribed orders:1042 at seq 0");

    let first = run_pub(&url, &["orders:1042", "status", r#"{"state":"shipped"}"#]).await;
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stderr).contains("ack seq=1"));
    let second = run_pub(&url, &["orders:1042", "status", r#"[1, 2.5, null, "x"]"#]).await;
    assert!(second.status.success(), "{second:?}");

    let output = tokio::time::timeout(WAIT, sub.wait_with_output())
        .await
        .expect("sub exits after --count events")
        .unwrap();
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"room": "orders:1042", "event": "status", "data": {"state": "shipped"}, "seq": 1}),
            serde_json::json!({"room": "orders:1042", "event": "status", "data": [1, 2.5, null, "x"], "seq": 2}),
        ]
    );
}

#[tokio::test]
async fn pub_reports_broker_errors_and_bad_json() {
    let server = broker().await;
    let url = server.ws_url();
    let bad_room = run_pub(&url, &["no-namespace", "status", "{}"]).await;
    assert_eq!(bad_room.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad_room.stderr);
    assert!(stderr.contains("invalid_room (4101)"), "{stderr}");

    let bad_event = run_pub(&url, &["a:b", "has space", "{}"]).await;
    assert_eq!(bad_event.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_event.stderr).contains("invalid_event (4102)"));

    let bad_json = run_pub(&url, &["a:b", "e", "{not json"]).await;
    assert_eq!(bad_json.status.code(), Some(2));

    // Nothing listens on a port that was just freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nobody = run_pub(&format!("ws://{free}/ws"), &["a:b", "e", "1"]).await;
    assert!(!nobody.status.success());
}
