//! Publish an event to browsers from any backend that speaks NATS, without going through a
//! broker's HTTP port: CBOR payload on the room's subject, event name in a header
//! (docs/PROTOCOL.md §11).
//!
//! ```text
//! cargo run -p roomcast-broker --example nats_publish -- nats://127.0.0.1:4222 orders:1042 status
//! ```
//!
//! Every broker node with a subscriber of `orders:1042` delivers `{"state": "shipped", "at": <unix
//! ms>}` to it.

use std::time::{SystemTime, UNIX_EPOCH};

use roomcast_broker::cluster::{
    nats::{HEADER_EVENT, HEADER_ORIGIN},
    subject::{SubjectPrefix, subject_for},
};
use roomcast_protocol::{EventName, Payload, RoomName};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let room = RoomName::new(&args.next().unwrap_or_else(|| "orders:1042".into()))?;
    let event = EventName::new(&args.next().unwrap_or_else(|| "status".into()))?;

    // The payload is one CBOR item; any CBOR encoder in any language will do.
    #[derive(serde::Serialize)]
    struct Status {
        state: &'static str,
        at: u64,
    }
    let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let data = Payload::encode(&Status {
        state: "shipped",
        at,
    })?;

    // Same prefix as the brokers' --nats-subject-prefix.
    let subject = subject_for(&SubjectPrefix::default(), &room);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HEADER_EVENT, event.as_str());
    headers.insert(HEADER_ORIGIN, "example-backend");

    let client = async_nats::connect(url).await?;
    client
        .publish_with_headers(subject.clone(), headers, data.as_bytes().clone())
        .await?;
    client.flush().await?;
    println!("published {event} to {room} on {subject}");
    Ok(())
}
