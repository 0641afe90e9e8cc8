//! `roomcast-cli`: subscribe to a room or publish to it from a shell.
//!
//! Owns argument parsing, the CBOR → JSON rendering of payloads and the exit codes. It talks to
//! the broker only through the `roomcast_client` library.

use std::{
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use roomcast_client::{
    Client, ClientEvent, ConnectOptions, Error, EventMessage, ReconnectPolicy, Recovery,
    Resumption, Subscription, SubscriptionItem, connect,
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

RECONNECT
  URL may list several brokers separated by commas; the first that accepts a session is
  used. When the connection is lost (or the broker closes it asking clients to reconnect),
  sub reconnects with backoff to the next URL in turn and subscribes again from the last
  event it printed, so every event is printed once, in order, when the broker can replay
  the gap. stderr tells what happened:
    disconnected: <why>
    reconnecting to URL in N ms (attempt K)
    connect to URL failed: <error>
    connected to URL (session S)
    resumed ROOM: recovered at seq N
    resumed ROOM: reset at epoch E seq N (events after seq M of epoch P may be missing)
    resumed ROOM: fresh at seq N (the room keeps no history; events in between are missing)
  --no-reconnect exits instead.

EXIT STATUS
  0 after --count events; 130 on Ctrl-C; 1 when the connection fails or the broker
  closes the session for good (the close code is printed); 2 for bad arguments.";

const PUB_HELP: &str = "\
EXIT STATUS
  0 once the broker acknowledged the event (`ack seq=N` or `ack` on stderr), or with
  --volatile once it was sent (`sent`); 1 when the broker refuses it (`error: <code name>
  (<value>): <message>`) or the connection fails; 2 when JSON is not valid JSON or another
  argument is bad.";

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
        /// Broker URL: ws://127.0.0.1:4433/ws (wss:// for TLS) or, for WebTransport,
        /// https://127.0.0.1:4433/wt; several separated by commas (see RECONNECT).
        url: String,
        /// Room to subscribe to, e.g. orders:1042.
        room: String,
        /// Exit 0 after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Exit when the connection ends instead of reconnecting.
        #[arg(long)]
        no_reconnect: bool,
        /// Authentication token sent in Hello.
        #[arg(long, value_name = "T", env = "ROOMCAST_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Publish one event to ROOM and wait for the broker's ack.
    #[command(after_help = PUB_HELP)]
    Pub {
        /// Broker URL: ws://127.0.0.1:4433/ws (wss:// for TLS) or, for WebTransport,
        /// https://127.0.0.1:4433/wt.
        url: String,
        /// Room to publish to, e.g. orders:1042.
        room: String,
        /// Event name, e.g. status.
        event: String,
        /// Payload as JSON; sent as the equivalent CBOR item, e.g. '{"state":"shipped"}'.
        json: String,
        /// Volatile publish (positions, prices): over WebTransport as a QUIC datagram when it
        /// fits (it may be lost), else on the connection; no ack is asked for, so a refusal
        /// is not reported.
        #[arg(long)]
        volatile: bool,
        /// Authentication token sent in Hello.
        #[arg(long, value_name = "T", env = "ROOMCAST_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// Which broker certificate to trust over WebTransport (https:// URLs).
#[derive(Debug, Args)]
struct TlsArgs {
    /// WebTransport: accept only the certificate whose SHA-256 (of its DER form) is HEX,
    /// 64 hex digits, colons allowed (the broker serves it at GET /cert-hash). The
    /// certificate must be ECDSA P-256 and valid for at most 14 days.
    #[arg(long, value_name = "HEX", value_parser = parse_cert_hash, conflicts_with = "ca")]
    cert_hash: Option<[u8; 32]>,
    /// WebTransport: trust the PEM certificates in FILE instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// WebTransport: do not validate the broker's certificate at all (development only).
    #[arg(long, conflicts_with_all = ["cert_hash", "ca"])]
    insecure: bool,
}

/// Why a `--cert-hash` value is not a SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum CertHashError {
    #[error("colon-separated form needs two hex digits between colons")]
    BadGroup,
    #[error("expected 64 hex digits (32 bytes), got {0}")]
    Length(usize),
    #[error("{0:?} is not a hex digit")]
    NotHex(char),
}

/// Parses a SHA-256 digest written as 64 hex digits, optionally separated by colons
/// (`ab:cd:...`, as `openssl x509 -fingerprint` prints it).
fn parse_cert_hash(text: &str) -> Result<[u8; 32], CertHashError> {
    let text = text.trim();
    let digits: String = if text.contains(':') {
        let groups: Vec<&str> = text.split(':').collect();
        if groups.iter().any(|group| group.len() != 2) {
            return Err(CertHashError::BadGroup);
        }
        groups.concat()
    } else {
        text.to_owned()
    };
    if digits.len() != 64 {
        return Err(CertHashError::Length(digits.len()));
    }
    let mut nibbles = [0u8; 64];
    for (nibble, c) in nibbles.iter_mut().zip(digits.chars()) {
        let value = c.to_digit(16).ok_or(CertHashError::NotHex(c))?;
        *nibble = value as u8;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(nibbles.chunks(2)) {
        *byte = (pair[0] << 4) | pair[1];
    }
    Ok(hash)
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
            no_reconnect,
            token,
            tls,
        } => {
            let mut options = options(&url, token, tls);
            if !no_reconnect {
                options.reconnect = Some(ReconnectPolicy::default());
            }
            sub(&url, &room, count, options).await
        }
        Command::Pub {
            url,
            room,
            event,
            json,
            volatile,
            token,
            tls,
        } => {
            let options = options(&url, token, tls);
            publish(&url, &room, &event, &json, volatile, options).await
        }
    }
}

/// The connect options for `url`, with a warning on stderr for `--insecure` and for
/// certificate flags a non-WebTransport URL ignores.
fn options(url: &str, token: Option<String>, tls: TlsArgs) -> ConnectOptions {
    let webtransport = split_urls(url).into_iter().any(|url| {
        url.get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    });
    let any_tls_flag = tls.cert_hash.is_some() || tls.ca.is_some() || tls.insecure;
    if any_tls_flag && !webtransport {
        eprintln!(
            "warning: --cert-hash, --ca and --insecure apply to https:// (WebTransport) URLs only; ignored"
        );
    } else if tls.insecure {
        eprintln!(
            "warning: --insecure: the broker's certificate is NOT checked; anyone on the path \
             can impersonate it. Development only."
        );
    }
    ConnectOptions {
        token,
        cert_hash: tls.cert_hash,
        ca_file: tls.ca,
        insecure: tls.insecure,
        ..ConnectOptions::default()
    }
}

async fn open(url: &str, options: ConnectOptions) -> Result<Client, ExitCode> {
    connect(url, options).await.map_err(|e| report(&e))
}

/// The URLs of a comma-separated list, trimmed, empty entries skipped.
fn split_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
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

async fn sub(urls: &str, room: &str, count: Option<u64>, options: ConnectOptions) -> ExitCode {
    let connected = Client::builder()
        .urls(split_urls(urls))
        .options(options)
        .connect()
        .await;
    let client = match connected {
        Ok(client) => client,
        Err(e) => return report(&e),
    };
    let mut events = client.events();
    let reporter = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                ClientEvent::Disconnected(info) => eprintln!("disconnected: {info}"),
                ClientEvent::Reconnecting {
                    attempt,
                    delay,
                    url,
                } => eprintln!(
                    "reconnecting to {url} in {} ms (attempt {attempt})",
                    delay.as_millis()
                ),
                ClientEvent::ConnectFailed { url, error } => {
                    eprintln!("connect to {url} failed: {error}")
                }
                ClientEvent::Connected { url, session_id } => {
                    eprintln!("connected to {url} (session {session_id})")
                }
                ClientEvent::TokenRefreshFailed(error) => {
                    eprintln!("token refresh failed: {error}")
                }
                _ => {}
            }
        }
    });
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
    reporter.abort();
    status
}

/// The stderr line for a resumed subscription.
fn resumed_line(room: &str, resumed: &Resumption) -> String {
    let Resumption {
        recovery,
        previous,
        position,
    } = resumed;
    match recovery {
        Recovery::Recovered => format!("resumed {room}: recovered at seq {}", position.seq),
        Recovery::Reset => format!(
            "resumed {room}: reset at epoch {} seq {} (events after seq {} of epoch {} may be \
             missing)",
            position.epoch, position.seq, previous.seq, previous.epoch
        ),
        Recovery::Fresh => format!(
            "resumed {room}: fresh at seq {} (the room keeps no history; events in between are \
             missing)",
            position.seq
        ),
    }
}

async fn print_events(subscription: &mut Subscription, count: Option<u64>) -> ExitCode {
    let mut seen = 0u64;
    let stdout = io::stdout();
    let room = subscription.room().as_str().to_owned();
    loop {
        if count.is_some_and(|count| seen >= count) {
            return ExitCode::SUCCESS;
        }
        match subscription.next_item().await {
            Some(SubscriptionItem::Event(event)) => {
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
            Some(SubscriptionItem::Lagged { missed }) => {
                eprintln!("lagged: {missed} events dropped");
            }
            Some(SubscriptionItem::Resumed(resumed)) => {
                eprintln!("{}", resumed_line(&room, &resumed));
            }
            Some(SubscriptionItem::Closed(info)) => {
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
    volatile: bool,
    options: ConnectOptions,
) -> ExitCode {
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(value) => value,
        Err(e) => {
            eprintln!("error: the JSON argument is not valid JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match open(url, options).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    if volatile {
        // A ping round trip after the datagram: by the time the Pong is back the datagram
        // has left, so closing cannot drop it.
        let sent = match client.publish_volatile(room, event, &value).await {
            Ok(()) => client.ping().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let status = match sent {
            Ok(()) => {
                eprintln!("sent");
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        };
        client.close().await;
        return status;
    }
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

    const HASH_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";

    fn hash_bytes() -> [u8; 32] {
        let half: [u8; 16] = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        let mut hash = [0u8; 32];
        hash[..16].copy_from_slice(&half);
        hash[16..].copy_from_slice(&half);
        hash
    }

    #[test]
    fn cert_hash_parses_plain_and_colon_separated_hex() {
        assert_eq!(parse_cert_hash(HASH_HEX), Ok(hash_bytes()));
        let colons = HASH_HEX
            .as_bytes()
            .chunks(2)
            .map(|pair| std::str::from_utf8(pair).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_cert_hash(&colons), Ok(hash_bytes()));
        assert_eq!(parse_cert_hash(&format!(" {HASH_HEX}\n")), Ok(hash_bytes()));
    }

    #[test]
    fn cert_hash_refuses_bad_input() {
        assert!(
            parse_cert_hash(&HASH_HEX[..62])
                .unwrap_err()
                .to_string()
                .contains("64 hex digits")
        );
        assert!(parse_cert_hash(&format!("{HASH_HEX}00")).is_err());
        assert!(
            parse_cert_hash(&HASH_HEX.replace('f', "g"))
                .unwrap_err()
                .to_string()
                .contains("not a hex digit")
        );
        assert!(parse_cert_hash("0:011").is_err());
        assert!(parse_cert_hash("").is_err());
        // Multi-byte characters must not panic the slicing; a sign is no digit.
        assert!(parse_cert_hash(&"é".repeat(32)).is_err());
        assert!(parse_cert_hash(&format!("+f{}", &HASH_HEX[2..])).is_err());
    }

    #[test]
    fn webtransport_flags_parse_and_exclude_each_other() {
        let cli = Cli::try_parse_from([
            "roomcast-cli",
            "sub",
            "https://127.0.0.1:4433/wt",
            "a:b",
            "--cert-hash",
            HASH_HEX,
        ])
        .unwrap();
        let Command::Sub { tls, .. } = cli.command else {
            panic!("expected sub");
        };
        assert_eq!(tls.cert_hash, Some(hash_bytes()));
        let options = options("https://127.0.0.1:4433/wt", None, tls);
        assert_eq!(options.cert_hash, Some(hash_bytes()));
        assert!(!options.insecure);

        let cli = Cli::try_parse_from([
            "roomcast-cli",
            "pub",
            "https://h:1/wt",
            "a:b",
            "e",
            "{}",
            "--ca",
            "/tmp/ca.pem",
        ])
        .unwrap();
        let Command::Pub { tls, .. } = cli.command else {
            panic!("expected pub");
        };
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("/tmp/ca.pem")));

        for conflicting in [
            &["--insecure", "--ca", "x.pem"][..],
            &["--insecure", "--cert-hash", HASH_HEX][..],
            &["--ca", "x.pem", "--cert-hash", HASH_HEX][..],
        ] {
            let mut args = vec!["roomcast-cli", "sub", "https://h:1/wt", "a:b"];
            args.extend_from_slice(conflicting);
            assert!(Cli::try_parse_from(&args).is_err(), "{conflicting:?}");
        }
        assert!(
            Cli::try_parse_from([
                "roomcast-cli",
                "sub",
                "https://h:1/wt",
                "a:b",
                "--cert-hash",
                "zz"
            ])
            .is_err()
        );
    }
}
