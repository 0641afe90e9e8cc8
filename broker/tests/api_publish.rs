//! `POST /api/publish` on a single node: a CBOR body's `data` reaches subscribers byte for
//! byte, JSON `data` is encoded by the mapping of docs/PROTOCOL.md §11.3 (its vector table is
//! read from the document and every row posted), and bad bodies get 400 with their reason.

mod common;

use common::{cluster::http, *};
use roomcast_broker::{Server, config::Secret};
use roomcast_protocol::ServerFrame;

const KEY: &str = "api-publish-test-key";

async fn broker() -> Server {
    let mut config = config();
    config.api_key = Some(Secret(KEY.into()));
    start(config).await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

async fn post(server: &Server, content_type: &str, body: &[u8]) -> (u16, String) {
    let auth = format!("Bearer {KEY}");
    http(
        server.local_addr(),
        "POST",
        "/api/publish",
        &[("Content-Type", content_type), ("Authorization", &auth)],
        body,
    )
    .await
}

/// The `data` bytes of the next event `conn` receives.
async fn next_data(conn: &mut RawConn) -> Vec<u8> {
    match conn.frame().await {
        ServerFrame::Event(e) => e.data.as_bytes().to_vec(),
        other => panic!("expected an Event, got {other:?}"),
    }
}

/// A CBOR text string.
fn text(s: &str) -> Vec<u8> {
    assert!(s.len() < 24);
    let mut out = vec![0x60 | s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// A CBOR map head of `n` entries followed by the given encoded keys and values.
fn map(n: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![0xa0 | n];
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// The JSON → CBOR vector rows of PROTOCOL.md §11.3.
fn json_vectors() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
        .unwrap();
    let section = doc.split("### 11.3").nth(1).expect("PROTOCOL.md has §11.3");
    let table = section
        .split("| JSON | CBOR (hex) |")
        .nth(1)
        .expect("§11.3 has the JSON → CBOR table");
    let rows: Vec<(String, String)> = table
        .lines()
        .skip(2)
        .map(str::trim)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let strip = |c: &str| c.trim_matches('`').to_owned();
            (strip(cells[1]), strip(cells[2]))
        })
        .collect();
    assert!(rows.len() >= 10, "the table has its rows: {rows:?}");
    rows
}

#[tokio::test]
async fn json_data_is_encoded_as_the_protocol_document_says() {
    let server = broker().await;
    let mut sub = RawConn::open(&server).await;
    sub.subscribe(1, "json:1").await;
    for (json, expected) in json_vectors() {
        let body = format!(r#"{{"room":"json:1","event":"v","data":{json}}}"#);
        let (status, answer) = post(&server, "application/json", body.as_bytes()).await;
        assert_eq!(status, 200, "{json}: {answer}");
        assert_eq!(hex(&next_data(&mut sub).await), expected, "JSON {json}");
    }
}

#[tokio::test]
async fn cbor_data_is_forwarded_byte_for_byte() {
    let server = broker().await;
    let mut sub = RawConn::open(&server).await;
    sub.subscribe(1, "cbor:1").await;
    // Non-preferred encodings a decode and re-encode would change: an indefinite array
    // holding a 32-bit-encoded 1, a 64-bit float 1.0, an indefinite text string, a tag.
    for data in [
        "9f1a00000001ff",
        "fb3ff0000000000000",
        "7f61616162ff",
        "c11a5f5e1000",
    ] {
        let body = map(
            3,
            &[
                &text("room"),
                &text("cbor:1"),
                &text("event"),
                &text("e"),
                &text("data"),
                &unhex(data),
            ],
        );
        let (status, answer) = post(&server, "application/cbor", &body).await;
        assert_eq!(status, 200, "{data}: {answer}");
        assert_eq!(hex(&next_data(&mut sub).await), data);
    }
    // An indefinite-length map with an unknown key before data works too.
    let mut body = vec![0xbf];
    for part in [
        text("trace"),
        unhex("a1616101"),
        text("data"),
        unhex("820102"),
        text("event"),
        text("e"),
        text("room"),
        text("cbor:1"),
    ] {
        body.extend_from_slice(&part);
    }
    body.push(0xff);
    let (status, answer) = post(&server, "application/cbor", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(hex(&next_data(&mut sub).await), "820102");
}

#[tokio::test]
async fn bad_cbor_bodies_are_refused_with_their_reason() {
    let server = broker().await;
    let room = [text("room"), text("bad:1")].concat();
    let event = [text("event"), text("e")].concat();
    let data = [text("data"), vec![0x01]].concat();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (vec![0x82, 0x01, 0x02], 400, "must be a CBOR map"),
        (map(2, &[&room, &event]), 400, "data is missing"),
        (
            map(4, &[&room, &event, &data, &data]),
            400,
            "data appears twice",
        ),
        (
            map(3, &[&room, &event, &[0x01, 0x01]]),
            400,
            "map keys must be",
        ),
        (
            map(3, &[&room, &event, &text("data"), &[0x82, 0x01]]),
            400,
            "invalid_payload",
        ),
        (
            [map(3, &[&room, &event, &data]), vec![0x00]].concat(),
            400,
            "not well-formed",
        ),
        (
            map(3, &[&text("room"), &[0x01], &event, &data]),
            400,
            "room must be",
        ),
        (
            vec![0xa3, 0x7a, 0xff, 0xff, 0xff, 0xff],
            400,
            "map keys must be",
        ),
        (vec![0xbf], 400, "not well-formed"),
    ];
    for (body, status, needle) in cases {
        let (got, answer) = post(&server, "application/cbor", &body).await;
        assert_eq!(got, status, "{}: {answer}", hex(&body));
        assert!(answer.contains(needle), "{}: {answer}", hex(&body));
    }
    // The broker goes on serving.
    let mut conn = RawConn::open(&server).await;
    conn.ping(1).await;
    let good = map(3, &[&room, &event, &data]);
    assert_eq!(post(&server, "application/cbor", &good).await.0, 200);
}
