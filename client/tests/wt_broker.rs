//! The client library and `roomcast-cli` over WebTransport against the real broker on
//! 127.0.0.1 port 0 (TCP for `/cert-hash`, UDP at the same port for `/wt`), pinning the
//! broker's development certificate by the hash it serves.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use roomcast_broker::{Config, Server};
use roomcast_client::{Code, ConnectOptions, Error, SubscriptionError, connect};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Command as AsyncCommand,
    time::timeout,
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

fn wt_url(server: &Server) -> String {
    format!("https://127.0.0.1:{}/wt", server.local_addr().port())
}

/// The certificate hash as a user gets it: `GET /cert-hash` on the TCP port, field `hex`.
async fn cert_hash_hex(server: &Server) -> String {
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"GET /cert-hash HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: serde_json::Value = serde_json::from_str(body.trim()).expect("JSON body");
    json["hex"].as_str().expect("a hex field").to_owned()
}

fn parse_hex(hex: &str) -> [u8; 32] {
    assert_eq!(hex.len(), 64, "{hex}");
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    hash
}

#[tokio::test]
async fn library_round_trip_and_broker_shutdown_over_webtransport() {
    let server = broker().await;
    let options = ConnectOptions {
        cert_hash: Some(parse_hex(&cert_hash_hex(&server).await)),
        ..ConnectOptions::default()
    };
    let client = timeout(WAIT, connect(&wt_url(&server), options))
        .await
        .expect("connect in time")
        .expect("connect pinned to the served hash");
    let mut orders = client.subscribe("orders:1").await.unwrap();
    let mut quotes = client.subscribe("quotes:1").await.unwrap();
    for n in 1..=3u64 {
        assert_eq!(
            client.publish("orders:1", "status", &n).await.unwrap(),
            Some(n)
        );
        assert_eq!(
            client.publish("quotes:1", "px", &(10 + n)).await.unwrap(),
            Some(n)
        );
    }
    for n in 1..=3u64 {
        let event = timeout(WAIT, orders.next_event()).await.unwrap();
        let event = event.expect("open").expect("an event");
        assert_eq!((event.seq, event.decode::<u64>().unwrap()), (n, n));
        let event = timeout(WAIT, quotes.next_event()).await.unwrap();
        let event = event.expect("open").expect("an event");
        assert_eq!((event.seq, event.decode::<u64>().unwrap()), (n, 10 + n));
    }
    // Leaving one room ends its stream; the other goes on.
    timeout(WAIT, orders.unsubscribe()).await.unwrap().unwrap();
    client.publish("quotes:1", "px", &14u64).await.unwrap();
    let event = timeout(WAIT, quotes.next_event()).await.unwrap();
    assert_eq!(event.expect("open").expect("an event").seq, 4);
    assert!(timeout(WAIT, client.ping()).await.unwrap().is_ok());

    // Draining the broker ends the session with shutting_down, a reconnect hint.
    let shutdown = tokio::spawn(server.shutdown());
    let info = timeout(WAIT, client.closed())
        .await
        .expect("closed in time");
    assert_eq!(info.code, Some(Code::ShuttingDown), "{info}");
    assert!(info.reconnect);
    match timeout(WAIT, quotes.next_event()).await.unwrap() {
        Some(Err(SubscriptionError::Closed(ended))) => assert_eq!(ended, info),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(
        client.ping().await.map(|_| ()),
        Err(Error::Closed(info.clone()))
    );
    timeout(WAIT, shutdown)
        .await
        .expect("broker drains in time")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn cli_sub_and_pub_over_webtransport_with_a_pinned_hash() {
    let server = broker().await;
    let url = wt_url(&server);
    let hex = cert_hash_hex(&server).await;
    // The colon-separated form is accepted too.
    let colons = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let mut sub = AsyncCommand::new(CLI)
        .args([
            "sub",
            &url,
            "orders:7",
            "--count",
            "1",
            "--cert-hash",
            &colons,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(sub.stderr.take().unwrap()).lines();
    let line = timeout(WAIT, stderr.next_line())
        .await
        .expect("sub subscribes in time")
        .unwrap()
        .expect("a progress line");
    assert_eq!(line, "subscribed orders:7 at seq 0");

    let run_pub = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(CLI)
                .arg("pub")
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    let args = |extra: &[&str]| -> Vec<String> {
        [url.as_str(), "orders:7", "status", r#"{"state":"shipped"}"#]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let published = run_pub(args(&["--cert-hash", &hex])).await.unwrap();
    assert!(published.status.success(), "{published:?}");
    assert!(String::from_utf8_lossy(&published.stderr).contains("ack seq=1"));

    let output = timeout(WAIT, sub.wait_with_output())
        .await
        .expect("sub exits after --count events")
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8(output.stdout).unwrap().trim()).unwrap();
    assert_eq!(
        line,
        serde_json::json!({"room": "orders:7", "event": "status", "data": {"state": "shipped"}, "seq": 1})
    );

    // --insecure connects without a hash, and says so.
    let insecure = run_pub(args(&["--insecure"])).await.unwrap();
    assert!(insecure.status.success(), "{insecure:?}");
    let stderr = String::from_utf8_lossy(&insecure.stderr);
    assert!(stderr.contains("warning: --insecure"), "{stderr}");

    // A wrong hash is refused: exit 1 with a transport error.
    let mut wrong = hex.into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let refused = run_pub(args(&["--cert-hash", &wrong])).await.unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("error: transport error"), "{stderr}");
}

#[tokio::test]
async fn cli_pub_volatile_sends_a_datagram() {
    let server = Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        volatile_namespaces: vec!["gps".into()],
        ..Config::default()
    })
    .await
    .unwrap();
    let hex = cert_hash_hex(&server).await;
    let watcher = connect(&server.ws_url(), ConnectOptions::default())
        .await
        .unwrap();
    let mut positions = watcher.subscribe("gps:van-3").await.unwrap();
    let url = wt_url(&server);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(CLI)
            .args(["pub", &url, "gps:van-3", "pos", "[52.5,13.4]", "--volatile"])
            .args(["--cert-hash", &hex])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("sent"));
    let event = timeout(WAIT, positions.next_event())
        .await
        .expect("the position arrives")
        .unwrap()
        .unwrap();
    assert_eq!(event.decode::<(f64, f64)>().unwrap(), (52.5, 13.4));
    assert_eq!(server.shared().metrics.datagrams_in.get(), 1);
}
