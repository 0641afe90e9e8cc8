//! `roomcast-cli`: subscribe to a room or publish to it from a shell.
//!
//! Owns argument parsing, the CBOR → JSON rendering of payloads and the exit codes. It talks to
//! the broker only through the `roomcast_client` library.

use std::{
    io::{self, Write},
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use roomcast_client::{
    Client, ConnectOptions, Error, EventMessage, Subscription, SubscriptionError, connect,
};
use serde::Serialize;

const DATA_HELP: &str = "\
OUTPUT
  Each event is one JSON line on stdout, flushed as it arrives:
    {\"room\":\"orders:1042\",\"event\":\"status\",\"data\":{\"state\":\"shipped\"},\"seq\":7}
  `data` is the event's CBOR payload rendered as JSON:
    - byte strings become lowercase hex strings (h'01ff' -> \"01ff\");
    - tags are dropped and their inner value is shown;
    - map keys that are not text become their JSON text (1 -> \"1\", [1,2] -> \"[1,2]\");
      byte-string keys become their hex string;
    - NaN, infinities and undefined become null;
    - integers beyond the 64-bit range become decimal strings;
    - a payload holding unassigned simple values (which the CBOR library cannot
      represent) is shown whole as the hex string of its bytes.
  Progress and errors go to stderr: `subscribed ROOM at seq N` once subscribed,
  `lagged: N events dropped` when the client could not keep up.

EXIT STATUS
  0 after --count events; 130 on Ctrl-C; 1 when the connection fails or the broker
  closes the session (the close code is printed); 2 for bad arguments.";

const PUB_HELP: &str = "\
EXIT STATUS
  0 once the broker acknowledged the event (`ack seq=N` or `ack` on stderr);
  1 when the broker refuses it (`error: <code name> (<value>): <message>`) or the
  connection fails; 2 when JSON is not valid JSON or another argument is bad.";

/// Subscribe to or publish to roomcast rooms.
#[derive(Debug, Parser)]
#[command(name = "roomcast-cli", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Subscribe to ROOM and print every event as one JSON line.
    #[command(after_help = DATA_HELP)]
    Sub {
        /// Broker URL, e.g. ws://127.0.0.1:4433/ws (wss:// for TLS).
        url: String,
        /// Room to subscribe to, e.g. orders:1042.
        room: String,
        /// Exit 0 after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Authentication token sent in Hello.
        #[arg(long, value_name = "T", env = "ROOMCAST_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Publish one event to ROOM and wait for the broker's ack.
    #[command(after_help = PUB_HELP)]
    Pub {
        /// Broker URL, e.g. ws://127.0.0.1:4433/ws (wss:// for TLS).
        url: String,
        /// Room to publish to, e.g. orders:1042.
        room: String,
        /// Event name, e.g. status.
        event: String,
        /// Payload as JSON; sent as the equivalent CBOR item, e.g. '{"state":"shipped"}'.
        json: String,
        /// Authentication token sent in Hello.
        #[arg(long, value_name = "T", env = "ROOMCAST_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().command {
        Command::Sub {
            url,
            room,
            count,
            token,
        } => sub(&url, &room, count, token).await,
        Command::Pub {
            url,
            room,
            event,
            json,
            token,
        } => publish(&url, &room, &event, &json, token).await,
    }
}

async fn open(url: &str, token: Option<String>) -> Result<Client, ExitCode> {
    let options = ConnectOptions {
        token,
        ..ConnectOptions::default()
    };
    connect(url, options).await.map_err(|e| report(&e))
}

/// Prints `error` to stderr in the documented shape and returns the failure exit code.
fn report(error: &Error) -> ExitCode {
    match error {
        Error::Server { code, message } => eprintln!("error: {code}: {message}"),
        Error::Closed(info) => eprintln!("error: session closed: {info}"),
        other => eprintln!("error: {other}"),
    }
    ExitCode::FAILURE
}

async fn sub(url: &str, room: &str, count: Option<u64>, token: Option<String>) -> ExitCode {
    let client = match open(url, token).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let mut subscription = match client.subscribe(room).await {
        Ok(subscription) => subscription,
        Err(e) => return report(&e),
    };
    eprintln!("subscribed {room} at seq {}", subscription.start_seq());
    let status = tokio::select! {
        status = print_events(&mut subscription, count) => status,
        _ = tokio::signal::ctrl_c() => ExitCode::from(130),
    };
    drop(subscription);
    client.close().await;
    status
}

async fn print_events(subscription: &mut Subscription, count: Option<u64>) -> ExitCode {
    let mut seen = 0u64;
    let stdout = io::stdout();
    loop {
        if count.is_some_and(|count| seen >= count) {
            return ExitCode::SUCCESS;
        }
        match subscription.next_event().await {
            Some(Ok(event)) => {
                let mut out = stdout.lock();
                let written = serde_json::to_writer(&mut out, &EventLine::from(&event))
                    .map_err(io::Error::from)
                    .and_then(|()| out.write_all(b"\n"))
                    .and_then(|()| out.flush());
                match written {
                    Ok(()) => seen += 1,
                    // A closed pipe (`| head`) means nobody wants more.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: writing to stdout: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Some(Err(SubscriptionError::Lagged { missed })) => {
                eprintln!("lagged: {missed} events dropped");
            }
            Some(Err(SubscriptionError::Closed(info))) => {
                eprintln!("closed: {info}");
                return ExitCode::FAILURE;
            }
            None => {
                eprintln!("closed: subscription ended");
                return ExitCode::FAILURE;
            }
        }
    }
}

async fn publish(
    url: &str,
    room: &str,
    event: &str,
    json: &str,
    token: Option<String>,
) -> ExitCode {
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(value) => value,
        Err(e) => {
            eprintln!("error: the JSON argument is not valid JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match open(url, token).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let status = match client.publish(room, event, &value).await {
        Ok(Some(seq)) => {
            eprintln!("ack seq={seq}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("ack");
            ExitCode::SUCCESS
        }
        Err(e) => report(&e),
    };
    client.close().await;
    status
}

/// One line of `sub` output.
#[derive(Serialize)]
struct EventLine<'a> {
    room: &'a str,
    event: &'a str,
    data: serde_json::Value,
    seq: u64,
}

impl<'a> From<&'a EventMessage> for EventLine<'a> {
    fn from(event: &'a EventMessage) -> Self {
        // Only unassigned simple values fail to decode into `ciborium::Value`; show the raw
        // bytes then rather than losing the event.
        let data = match event.decode::<ciborium::Value>() {
            Ok(value) => cbor_to_json(value),
            Err(_) => serde_json::Value::String(hex(event.data.as_bytes())),
        };
        EventLine {
            room: event.room.as_str(),
            event: event.event.as_str(),
            data,
            seq: event.seq,
        }
    }
}

/// Renders a CBOR value as JSON by the rules in `sub --help`.
fn cbor_to_json(value: ciborium::Value) -> serde_json::Value {
    use ciborium::Value as Cbor;
    use serde_json::Value as Json;
    match value {
        Cbor::Integer(n) => {
            let n = i128::from(n);
            if let Ok(n) = u64::try_from(n) {
                Json::from(n)
            } else if let Ok(n) = i64::try_from(n) {
                Json::from(n)
            } else {
                Json::String(n.to_string())
            }
        }
        Cbor::Float(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Cbor::Bytes(bytes) => Json::String(hex(&bytes)),
        Cbor::Text(text) => Json::String(text),
        Cbor::Bool(b) => Json::Bool(b),
        Cbor::Tag(_, inner) => cbor_to_json(*inner),
        Cbor::Array(items) => Json::Array(items.into_iter().map(cbor_to_json).collect()),
        Cbor::Map(entries) => Json::Object(
            entries
                .into_iter()
                .map(|(key, value)| (json_key(key), cbor_to_json(value)))
                .collect(),
        ),
        // Null, undefined, simple values and anything ciborium adds later.
        _ => Json::Null,
    }
}

/// A map key as a JSON object key: strings as they are, anything else as its JSON text.
fn json_key(key: ciborium::Value) -> String {
    match cbor_to_json(key) {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value as Cbor;
    use clap::CommandFactory;
    use serde_json::json;

    /// Decodes CBOR bytes the way `sub` does and renders them.
    fn render(cbor: &[u8]) -> serde_json::Value {
        let value: Cbor = ciborium::from_reader(cbor).expect("test CBOR");
        cbor_to_json(value)
    }

    #[test]
    fn scalars() {
        assert_eq!(render(&[0x00]), json!(0));
        assert_eq!(
            render(&[0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            json!(u64::MAX)
        );
        assert_eq!(render(&[0x39, 0x03, 0xe7]), json!(-1000));
        assert_eq!(render(&[0xf9, 0x3e, 0x00]), json!(1.5));
        assert_eq!(render(&[0xf5]), json!(true));
        assert_eq!(render(&[0xf6]), json!(null));
        assert_eq!(render(&[0xf7]), json!(null)); // undefined
        assert_eq!(render(&[0x64, 0x49, 0x45, 0x54, 0x46]), json!("IETF"));
    }

    #[test]
    fn integers_beyond_64_bits_become_strings() {
        // -2^64 (major type 1 with argument u64::MAX).
        let bytes = [0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(render(&bytes), json!("-18446744073709551616"));
        assert_eq!(
            render(&[0x3b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            json!(i64::MIN)
        );
    }

    #[test]
    fn non_finite_floats_become_null() {
        assert_eq!(render(&[0xf9, 0x7e, 0x00]), json!(null)); // NaN
        assert_eq!(render(&[0xf9, 0x7c, 0x00]), json!(null)); // +inf
        assert_eq!(render(&[0xfb, 0xff, 0xf0, 0, 0, 0, 0, 0, 0]), json!(null)); // -inf
    }

    #[test]
    fn byte_strings_become_hex() {
        assert_eq!(render(&[0x44, 0x01, 0x02, 0xab, 0xff]), json!("0102abff"));
        assert_eq!(render(&[0x40]), json!(""));
        // Indefinite-length byte string (_ h'01', h'ff').
        assert_eq!(render(&[0x5f, 0x41, 0x01, 0x41, 0xff, 0xff]), json!("01ff"));
    }

    #[test]
    fn tags_show_their_inner_value() {
        // 1(1363896240): epoch time.
        assert_eq!(
            render(&[0xc1, 0x1a, 0x51, 0x4b, 0x67, 0xb0]),
            json!(1_363_896_240)
        );
        // 2(h'010000000000000000'): a bignum, shown as its bytes.
        let bignum = [0xc2, 0x49, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(render(&bignum), json!("010000000000000000"));
        // Nested tags.
        assert_eq!(render(&[0xd8, 0x20, 0xc0, 0x61, 0x78]), json!("x"));
    }

    #[test]
    fn containers_and_map_keys() {
        // {"a": 1, "b": [2, 3]}
        let bytes = [0xa2, 0x61, 0x61, 0x01, 0x61, 0x62, 0x82, 0x02, 0x03];
        assert_eq!(render(&bytes), json!({"a": 1, "b": [2, 3]}));
        // {1: "x", -2: true, [1, 2]: null, h'ab': 0, true: 1, null: 2, 1.5: 3}
        let bytes = [
            0xa7, 0x01, 0x61, 0x78, 0x21, 0xf5, 0x82, 0x01, 0x02, 0xf6, 0x41, 0xab, 0x00, 0xf5,
            0x01, 0xf6, 0x02, 0xf9, 0x3e, 0x00, 0x03,
        ];
        assert_eq!(
            render(&bytes),
            json!({"1": "x", "-2": true, "[1,2]": null, "ab": 0, "true": 1, "null": 2, "1.5": 3})
        );
        // Indefinite containers: [_ 1, {_ "k": [_ ]}]
        let bytes = [0x9f, 0x01, 0xbf, 0x61, 0x6b, 0x9f, 0xff, 0xff, 0xff];
        assert_eq!(render(&bytes), json!([1, {"k": []}]));
    }

    #[test]
    fn json_survives_the_round_trip_through_cbor() {
        let value = json!({"state": "shipped", "n": -3, "x": 0.25, "tags": ["a", null, true]});
        let payload = roomcast_client::Payload::encode(&value).unwrap();
        let back: Cbor = payload.decode().unwrap();
        assert_eq!(cbor_to_json(back), value);
    }

    #[test]
    fn event_line_has_the_documented_shape() {
        let event = EventMessage {
            room: roomcast_client::RoomName::new("orders:1042").unwrap(),
            event: roomcast_client::EventName::new("status").unwrap(),
            data: roomcast_client::Payload::encode(&json!({"state": "shipped"})).unwrap(),
            seq: 7,
        };
        let line = serde_json::to_string(&EventLine::from(&event)).unwrap();
        assert_eq!(
            line,
            r#"{"room":"orders:1042","event":"status","data":{"state":"shipped"},"seq":7}"#
        );
    }

    #[test]
    fn unrepresentable_payload_is_shown_as_raw_hex() {
        // [simple(0), 1]: well-formed CBOR that ciborium::Value has no variant for.
        let raw = bytes::Bytes::from_static(&[0x82, 0xe0, 0x01]);
        let event = EventMessage {
            room: roomcast_client::RoomName::new("a:b").unwrap(),
            event: roomcast_client::EventName::new("e").unwrap(),
            data: roomcast_client::Payload::new(raw, Default::default()).unwrap(),
            seq: 1,
        };
        assert_eq!(EventLine::from(&event).data, json!("82e001"));
    }

    #[test]
    fn arguments_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "roomcast-cli",
            "sub",
            "ws://h:1/ws",
            "a:b",
            "--count",
            "3",
            "--token",
            "t",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Sub { count: Some(3), token: Some(ref t), .. } if t == "t"
        ));
        let cli =
            Cli::try_parse_from(["roomcast-cli", "pub", "ws://h:1/ws", "a:b", "e", "{}"]).unwrap();
        assert!(matches!(cli.command, Command::Pub { ref json, .. } if json == "{}"));
    }
}
