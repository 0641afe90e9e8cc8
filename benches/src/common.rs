//! What every scenario shares: the command-line options common to all of them, opening
//! sessions (optionally from a chosen loopback source address), writing masked WebSocket
//! frames straight onto the socket, reading events straight off it, locating `seq` and the
//! payload inside an `Event` frame without decoding it, payloads of an exact size with
//! timestamps patched in, and reading the broker's CPU and memory from /proc.

use std::{
    io::Cursor,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, LazyLock},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use roomcast_protocol::{
    ClientFrame, EventName, PROTOCOL_VERSION, Payload, PayloadLimits, RoomName, ServerFrame,
    frame::{Welcome, encode_event},
    name::MAX_EVENT_LEN,
};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, client_async_with_config,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        protocol::{
            WebSocketConfig,
            frame::{
                FrameHeader,
                coding::{Control, Data, OpCode},
            },
        },
    },
};

/// The token every session of this run sends in `Hello` (set once from `--token`).
static SESSION_TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The `Hello` every session of this run sends.
pub(crate) fn hello_frame() -> ClientFrame {
    ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: SESSION_TOKEN.get().cloned().flatten(),
    }
}

/// A WebSocket session as tokio-tungstenite holds it.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How the generator talks to the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Transport {
    /// WebSocket over TCP (`ws://`).
    Ws,
    /// WebTransport over QUIC, events on room streams.
    Wt,
    /// WebTransport over QUIC, events as datagrams (a volatile room).
    WtDatagram,
}

impl Transport {
    /// The name used on the command line and in the JSON output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Wt => "wt",
            Transport::WtDatagram => "wt-datagram",
        }
    }
}

/// Options every scenario takes.
#[derive(clap::Args, Debug)]
pub(crate) struct CommonArgs {
    /// Broker WebSocket URL (plain `ws://` only).
    #[arg(long, default_value = "ws://127.0.0.1:4433/ws")]
    pub(crate) url: String,
    /// Comma-separated broker URLs of a cluster: subscribers are spread round-robin over
    /// them, publishers connect to the first. Replaces --url.
    #[arg(long, value_delimiter = ',')]
    pub(crate) nodes: Vec<String>,
    /// URL the publishers connect to instead of the first node (e.g. publish on node A with
    /// every subscriber on node B: `--nodes B --publisher-url A`).
    #[arg(long)]
    pub(crate) publisher_url: Option<String>,
    /// Transport of the subscribers: `ws`, `wt` (WebTransport room streams) or `wt-datagram`
    /// (WebTransport datagrams); which ones a scenario supports is in its help. Publishers
    /// always use WebSocket. WebTransport is reached at the same host and port as --url.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub(crate) transport: Transport,
    /// Token every session of the run sends in `Hello` (for brokers that require auth).
    #[arg(
        long,
        value_name = "T",
        env = "ROOMCAST_BENCH_TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
    /// Process id of the broker (the one at the first URL), to report its CPU and RSS from
    /// /proc.
    #[arg(long)]
    pub(crate) broker_pid: Option<u32>,
    /// Print one JSON line with every figure on stdout (the table then goes to stderr).
    #[arg(long)]
    pub(crate) json: bool,
    /// KEY=VALUE added to the JSON line as a string field; repeatable (for example
    /// `--tag label=nightly --tag commit=1fe086f`).
    #[arg(long = "tag", value_parser = parse_tag)]
    pub(crate) tags: Vec<(String, String)>,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

impl CommonArgs {
    /// The broker URLs to use; fails when the scenario does not support the transport.
    /// Also installs `--token` for every session the run opens.
    pub(crate) fn nodes(&self, supported: &[Transport]) -> anyhow::Result<Nodes> {
        let _ = SESSION_TOKEN.set(self.token.clone());
        if !supported.contains(&self.transport) {
            let names: Vec<_> = supported.iter().map(|t| t.name()).collect();
            bail!(
                "this scenario supports --transport {} only",
                names.join(", ")
            );
        }
        let mut nodes = Nodes::new(&self.url, &self.nodes)?;
        nodes.publisher = self.publisher_url.clone();
        Ok(nodes)
    }

    /// The fields every JSON line starts with: scenario, transport, nodes, time stamp, tags.
    pub(crate) fn json_head(&self, scenario: &str, nodes: &Nodes) -> Map<String, Value> {
        let mut head = Map::new();
        head.insert("scenario".into(), json!(scenario));
        head.insert("transport".into(), json!(self.transport.name()));
        head.insert("nodes".into(), json!(nodes.urls));
        if let Some(publisher) = &nodes.publisher {
            head.insert("publisher".into(), json!(publisher));
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        head.insert("ts".into(), json!(ts));
        for (k, v) in &self.tags {
            head.insert(k.clone(), json!(v));
        }
        head
    }

    /// Prints the result: the JSON line on stdout and the table on stderr with `--json`,
    /// otherwise the table on stdout.
    pub(crate) fn report(&self, head: Map<String, Value>, figures: Value, table: &str) {
        if self.json {
            let mut line = head;
            if let Value::Object(figures) = figures {
                line.extend(figures);
            }
            println!("{}", Value::Object(line));
            eprint!("{table}");
        } else {
            print!("{table}");
        }
    }
}

/// The broker URLs of a run: one, or the nodes of a cluster.
#[derive(Debug, Clone)]
pub(crate) struct Nodes {
    urls: Vec<String>,
    /// Where publishers connect, when not the first node.
    publisher: Option<String>,
}

impl Nodes {
    /// `nodes` when given, else `url` alone.
    pub(crate) fn new(url: &str, nodes: &[String]) -> anyhow::Result<Nodes> {
        let urls: Vec<String> = if nodes.is_empty() {
            vec![url.to_owned()]
        } else {
            nodes
                .iter()
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect()
        };
        if urls.is_empty() {
            bail!("--nodes names no URL");
        }
        Ok(Nodes {
            urls,
            publisher: None,
        })
    }

    /// The URL subscriber `i` connects to (round-robin over the nodes).
    pub(crate) fn subscriber(&self, i: usize) -> &str {
        &self.urls[i % self.urls.len()]
    }

    /// Every node's URL.
    pub(crate) fn all(&self) -> &[String] {
        &self.urls
    }

    /// The URL publishers connect to (`--publisher-url`, else the first node).
    pub(crate) fn publisher(&self) -> &str {
        self.publisher.as_deref().unwrap_or(&self.urls[0])
    }
}

/// Receives the next frame, which must decode.
async fn next_frame(ws: &mut Socket) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return Ok(ServerFrame::decode(&b, PayloadLimits::default())?);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => bail!("expected a frame, got {other:?}"),
        }
    }
}

/// Connects (TCP_NODELAY on, from `source` when given, port picked by the kernel) and
/// completes Hello/Welcome.
pub(crate) async fn open_session(
    url: &str,
    source: Option<Ipv4Addr>,
) -> anyhow::Result<(Socket, Welcome)> {
    open_session_with(url, source, hello_frame()).await
}

/// [`open_session`] sending `hello` (another token than the run's, say).
pub(crate) async fn open_session_with(
    url: &str,
    source: Option<Ipv4Addr>,
    hello: ClientFrame,
) -> anyhow::Result<(Socket, Welcome)> {
    let request = url.into_client_request()?;
    let uri = request.uri();
    if uri.scheme_str() != Some("ws") {
        bail!("only ws:// URLs are supported, got {url}");
    }
    let host = uri.host().context("URL without host")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await?
            .find(|a| source.is_none() || a.is_ipv4())
            .with_context(|| format!("no address for {host}"))?,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.set_reuseaddr(true)?;
        socket
            .bind(SocketAddr::from((ip, 0)))
            .with_context(|| format!("bind to {ip}"))?;
    }
    let tcp = socket.connect(addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    // A small read buffer: the socket is handed to the raw reader right after the handshake.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = client_async_with_config(request, MaybeTlsStream::Plain(tcp), Some(config))
        .await
        .context("WebSocket handshake")?;
    ws.send(Message::Binary(hello.encode())).await?;
    match next_frame(&mut ws).await? {
        ServerFrame::Welcome(welcome) => Ok((ws, welcome)),
        other => bail!("expected Welcome, got {other:?}"),
    }
}

/// Opens a session subscribed to `room`.
pub(crate) async fn open_subscriber(
    url: &str,
    room: &str,
    source: Option<Ipv4Addr>,
) -> anyhow::Result<(Socket, Welcome)> {
    let (mut ws, welcome) = open_session(url, source).await?;
    let subscribe = ClientFrame::Subscribe {
        since: None,
        id: 1,
        room: room.to_owned(),
    };
    ws.send(Message::Binary(subscribe.encode())).await?;
    loop {
        match next_frame(&mut ws).await? {
            // With a token the broker joins the session to its personal room first.
            ServerFrame::Subscribed { id: 0, .. } => {}
            ServerFrame::Subscribed { .. } => return Ok((ws, welcome)),
            other => bail!("expected Subscribed, got {other:?}"),
        }
    }
}

/// Opens `n` subscriber sessions, at most `concurrency` handshakes at a time: session `i`
/// connects to `nodes.subscriber(i)` and subscribes to `room(i)`. Returns the raw sockets and
/// Welcomes in index order; fails on the first error.
pub(crate) async fn open_subscribers(
    nodes: &Nodes,
    n: usize,
    concurrency: usize,
    room: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<(TcpStream, Welcome)>> {
    open_many(n, concurrency, |i| {
        (nodes.subscriber(i).to_owned(), Some(room(i)))
    })
    .await
}

/// Opens `n` sessions, at most `concurrency` handshakes at a time: session `i` connects to
/// the URL `target(i)` names and subscribes to its room when it names one. Returns the raw
/// sockets and Welcomes in index order; fails on the first error.
pub(crate) async fn open_many(
    n: usize,
    concurrency: usize,
    target: impl Fn(usize) -> (String, Option<String>),
) -> anyhow::Result<Vec<(TcpStream, Welcome)>> {
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut joins = JoinSet::new();
    for i in 0..n {
        let ((url, room), limit) = (target(i), limit.clone());
        joins.spawn(async move {
            let _permit = limit.acquire().await;
            let (ws, welcome) = match &room {
                Some(room) => open_subscriber(&url, room, None).await,
                None => open_session(&url, None).await,
            }
            .with_context(|| format!("session {i} ({url})"))?;
            anyhow::Ok((i, into_tcp(ws)?, welcome))
        });
    }
    let mut sessions: Vec<Option<(TcpStream, Welcome)>> = (0..n).map(|_| None).collect();
    while let Some(joined) = joins.join_next().await {
        let (i, tcp, welcome) = joined??;
        sessions[i] = Some((tcp, welcome));
    }
    Ok(sessions.into_iter().flatten().collect())
}

/// The TCP socket under a session, for raw reads and writes after the handshake.
pub(crate) fn into_tcp(ws: Socket) -> anyhow::Result<TcpStream> {
    match ws.into_inner() {
        MaybeTlsStream::Plain(tcp) => Ok(tcp),
        _ => bail!("TLS sessions are not supported"),
    }
}

/// A publish frame (no ack) for `room`/`event` with `data`.
pub(crate) fn publish_frame(room: &str, event: &str, data: Bytes) -> Bytes {
    ClientFrame::Publish {
        key: None,
        id: 0,
        room: room.to_owned(),
        event: event.to_owned(),
        data,
        ack: false,
    }
    .encode()
}

/// Appends the header of a masked binary WebSocket frame with a payload of `len` bytes.
fn put_ws_header(out: &mut Vec<u8>, len: usize, mask: [u8; 4]) {
    out.push(0x82); // FIN, binary
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
}

fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends a masked binary WebSocket frame holding `payload` (a client must mask).
pub(crate) fn put_ws_frame(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    put_ws_header(out, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// A `Ping` frame (no id), ready to write on a session's socket.
pub(crate) static PING: LazyLock<Vec<u8>> = LazyLock::new(ping_frame);

fn ping_frame() -> Vec<u8> {
    let mut out = Vec::new();
    put_ws_frame(
        &mut out,
        &ClientFrame::Ping { id: None }.encode(),
        [0x5a, 0xc3, 0x3c, 0xa5],
    );
    out
}

/// Blocks until `due` (nanoseconds on the generator's clock), writing a `Ping` whenever the
/// socket has been silent for `ping_ns`, so the broker's idle timer never fires between
/// publishes of a slow schedule.
pub(crate) fn wait_until_due(
    tcp: &mut std::net::TcpStream,
    due: u64,
    ping_ns: u64,
    last_write: &mut u64,
) -> std::io::Result<()> {
    use std::io::Write;
    loop {
        let now = crate::measure::now_ns();
        if now >= due {
            return Ok(());
        }
        if now - *last_write >= ping_ns {
            tcp.write_all(&PING)?;
            *last_write = now;
            continue;
        }
        let wake = due.min(*last_write + ping_ns);
        std::thread::sleep(std::time::Duration::from_nanos(wake - now));
    }
}

/// Mask keys for client frames: xorshift64*, cheap and good enough for a load generator.
pub(crate) struct MaskKeys(u64);

impl MaskKeys {
    /// A generator seeded with `seed` (any value).
    pub(crate) fn new(seed: u64) -> Self {
        MaskKeys(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next mask key.
    pub(crate) fn next_key(&mut self) -> [u8; 4] {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32).to_le_bytes()
    }
}

/// A `Publish` frame encoded once, whose payload content starts with room for time stamps
/// (little-endian u64s) patched in per publish: no encode and no allocation per publish.
#[derive(Debug, Clone)]
pub(crate) struct PublishTemplate {
    frame: Bytes,
    /// Offset of the payload content in `frame`.
    content_at: usize,
    content_len: usize,
}

impl PublishTemplate {
    /// The template for publishing `payload` (made by [`payload`]) as `event` to `room`.
    pub(crate) fn new(room: &str, event: &str, payload: &Bytes) -> anyhow::Result<Self> {
        let frame = publish_frame(room, event, payload.clone());
        // With ack false the encoder writes the data last.
        if !frame.ends_with(payload) {
            bail!("unexpected Publish layout");
        }
        let content_len = payload_content_len(payload);
        Ok(PublishTemplate {
            content_at: frame.len() - content_len,
            content_len,
            frame,
        })
    }

    /// How many u64 stamps the payload content has room for.
    pub(crate) fn stamp_slots(&self) -> usize {
        self.content_len / 8
    }

    /// Appends the frame as a masked WebSocket frame, with `stamps` written over the first
    /// content bytes of the payload.
    pub(crate) fn put(&self, out: &mut Vec<u8>, stamps: &[u64], mask: [u8; 4]) {
        assert!(stamps.len() <= self.stamp_slots(), "payload too small");
        put_ws_header(out, self.frame.len(), mask);
        let start = out.len();
        out.extend_from_slice(&self.frame);
        let at = start + self.content_at;
        for (i, stamp) in stamps.iter().enumerate() {
            out[at + 8 * i..at + 8 * i + 8].copy_from_slice(&stamp.to_le_bytes());
        }
        apply_mask(&mut out[start..], mask);
    }
}

/// A payload of exactly `size` bytes (at least 1): a CBOR byte string with its head, the body
/// filled with `fill`.
pub(crate) fn payload(size: usize, fill: u8) -> Bytes {
    let mut out = Vec::with_capacity(size.max(1));
    let body = match size {
        0 | 1 => return Bytes::from_static(&[0x40]),
        2..=24 => {
            out.push(0x40 | (size - 1) as u8);
            size - 1
        }
        25..=257 => {
            out.extend_from_slice(&[0x58, (size - 2) as u8]);
            size - 2
        }
        _ => {
            out.push(0x59);
            out.extend_from_slice(&((size - 3) as u16).to_be_bytes());
            size - 3
        }
    };
    out.resize(out.len() + body, fill);
    Bytes::from(out)
}

/// The smallest payload size (made by [`payload`]) with room for `stamps` time stamps.
pub(crate) fn min_payload(stamps: usize) -> usize {
    (1..)
        .find(|&s| payload_content_len(&payload(s, 0)) >= 8 * stamps)
        .unwrap_or(usize::MAX)
}

/// Where `seq` and the payload's content sit in the `Event` frames of one room, event name and
/// payload size: computed once from a sample encoding, so reading an event costs one bounds
/// check instead of a decode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventLayout {
    /// Offset of the payload's content (after the byte string head).
    content_at: usize,
    /// Offset of the seq value (after key 5).
    seq_at: usize,
    /// Offset of the event name's bytes (after its text head), and the name: events of the
    /// same room with another name (a flooding neighbour's, say) are not ours.
    event_at: usize,
    event: [u8; MAX_EVENT_LEN],
    event_len: usize,
    /// The frame type byte (after key 0), to tell events from other frames.
    kind: u8,
}

impl EventLayout {
    /// The layout for events of `room`/`event` carrying `payload` (made by [`payload`]).
    pub(crate) fn new(room: &str, event: &str, payload: &Bytes) -> anyhow::Result<Self> {
        let data = Payload::new(payload.clone(), PayloadLimits::default())?;
        let frame = encode_event(
            &RoomName::new(room)?,
            &EventName::new(event)?,
            &data,
            0,
            None,
        );
        // The encoder writes the data as a byte string holding the payload, then key 5, then seq.
        let seq_at = frame.len() - 1;
        let data_end = seq_at - 1;
        let data_at = data_end - payload.len();
        let head = payload.len() - payload_content_len(payload);
        if frame[data_end] != 0x05 || frame[data_at..data_end] != payload[..] {
            bail!("unexpected Event layout");
        }
        // The event name, as a text string of at most 23 bytes (one head byte), before the data.
        let name = event.as_bytes();
        if name.len() > 23 || frame.get(1) != Some(&0x00) {
            bail!("unexpected Event layout");
        }
        let mut encoded = vec![0x60 | name.len() as u8];
        encoded.extend_from_slice(name);
        let event_at = frame[..data_at]
            .windows(encoded.len())
            .rposition(|w| w == encoded)
            .context("unexpected Event layout")?
            + 1;
        let mut event_bytes = [0u8; MAX_EVENT_LEN];
        event_bytes[..name.len()].copy_from_slice(name);
        Ok(EventLayout {
            content_at: data_at + head,
            seq_at,
            event_at,
            event: event_bytes,
            event_len: name.len(),
            kind: frame[2],
        })
    }

    /// Whether `frame` is an `Event` (of any room, event name and size).
    pub(crate) fn is_event(&self, frame: &[u8]) -> bool {
        frame.get(1) == Some(&0x00) && frame.get(2) == Some(&self.kind)
    }

    /// The seq of an `Event` frame of this layout (this event name and payload size).
    pub(crate) fn seq(&self, frame: &[u8]) -> Option<u64> {
        let tail = frame.get(self.seq_at..)?;
        if frame.get(self.seq_at - 1) != Some(&0x05)
            || frame.get(self.event_at..self.event_at + self.event_len)
                != Some(&self.event[..self.event_len])
        {
            return None;
        }
        match ciborium_ll::Decoder::from(tail).pull() {
            Ok(ciborium_ll::Header::Positive(seq)) => Some(seq),
            _ => None,
        }
    }

    /// Stamp `index` of the payload: content bytes `8 * index..8 * index + 8` as a
    /// little-endian u64 (a time stamp put there by the publisher, see [`PublishTemplate`]).
    pub(crate) fn stamp(&self, frame: &[u8], index: usize) -> Option<u64> {
        let at = self.content_at + 8 * index;
        let bytes = frame.get(at..at + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

/// Stamp `index` of a payload made by [`payload`] as it arrives in an `Event`'s data (CBOR
/// byte string head included): content bytes `8 * index..8 * index + 8` as a little-endian
/// u64 (see [`PublishTemplate`]).
pub(crate) fn payload_stamp(data: &[u8], index: usize) -> Option<u64> {
    let head = match *data.first()? {
        b if b & 0x1f < 24 => 1,
        0x58 => 2,
        0x59 => 3,
        _ => return None,
    };
    let at = head + 8 * index;
    let bytes = data.get(at..at + 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn payload_content_len(payload: &Bytes) -> usize {
    match payload.first() {
        Some(&b) if b & 0x1f < 24 => (b & 0x1f) as usize,
        Some(0x58) => payload.len() - 2,
        Some(0x59) => payload.len() - 3,
        _ => 0,
    }
}

/// The first complete WebSocket frame (from the broker: unmasked) in `buf`: its opcode and the
/// range of its payload, which ends where the next frame starts. `None` while incomplete.
pub(crate) fn next_ws_frame(buf: &[u8]) -> Option<(OpCode, std::ops::Range<usize>)> {
    let mut cursor = Cursor::new(buf);
    let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
    let start = cursor.position() as usize;
    let end = start + usize::try_from(len).ok()?;
    (buf.len() >= end).then_some((header.opcode, start..end))
}

/// Reads binary frames straight off the TCP socket of a session whose handshake went through
/// tungstenite: many frames per read system call, headers parsed by tungstenite's
/// `FrameHeader`. Can also write pre-masked frames (pings) on the same socket.
pub(crate) struct RawFrames {
    tcp: TcpStream,
    buf: BytesMut,
    /// Bytes the buffer grows by when it runs low.
    chunk: usize,
    /// Read system calls so far.
    pub(crate) reads: u64,
}

impl RawFrames {
    /// Takes the socket over; the read buffer grows in steps of `chunk` bytes (16 KiB for
    /// busy subscribers, less for many quiet ones).
    pub(crate) fn new(tcp: TcpStream, chunk: usize) -> Self {
        RawFrames {
            tcp,
            buf: BytesMut::new(),
            chunk: chunk.max(256),
            reads: 0,
        }
    }

    /// Waits for the next read and hands every complete binary frame's payload to `on_frame`.
    /// Returns false once the connection has ended. Cancel-safe: dropped before its read
    /// completes, it has consumed nothing.
    pub(crate) async fn read(&mut self, mut on_frame: impl FnMut(&[u8])) -> bool {
        if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
            self.buf.reserve(self.chunk);
        }
        match self.tcp.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => self.reads += 1,
        }
        while let Some((opcode, payload)) = next_ws_frame(&self.buf) {
            if opcode == OpCode::Data(Data::Binary) {
                on_frame(&self.buf[payload.clone()]);
            } else if opcode == OpCode::Control(Control::Close) {
                return false;
            }
            self.buf.advance(payload.end);
        }
        true
    }

    /// Writes `frame`, already a masked WebSocket frame (for example [`ping_frame`]).
    pub(crate) async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(frame).await
    }
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// VmRSS of a process, in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_ws_frame_waits_for_a_whole_frame_and_finds_where_the_next_starts() {
        // Two unmasked binary frames of 3 and 200 bytes (the second with a 16-bit length).
        let mut buf = vec![0x82, 3, b'a', b'b', b'c', 0x82, 126, 0, 200];
        buf.extend(std::iter::repeat_n(7u8, 200));
        assert_eq!(
            next_ws_frame(&buf),
            Some((OpCode::Data(Data::Binary), 2..5))
        );
        assert_eq!(
            next_ws_frame(&buf[5..]),
            Some((OpCode::Data(Data::Binary), 4..204))
        );
        assert_eq!(next_ws_frame(&buf[5..150]), None, "incomplete payload");
        assert_eq!(next_ws_frame(&buf[..1]), None, "incomplete header");
        assert_eq!(
            next_ws_frame(&[0x88, 0]),
            Some((OpCode::Control(Control::Close), 2..2))
        );
    }

    #[test]
    fn layout_finds_seq_and_stamp() {
        for size in [10usize, 100, 300] {
            let mut data = payload(size, 0).to_vec();
            let layout_probe = payload(size, 0);
            let head = size - payload_content_len(&layout_probe);
            data[head..head + 8].copy_from_slice(&42u64.to_le_bytes());
            let data = Bytes::from(data);
            let layout = EventLayout::new("bench:x", "tick", &data).unwrap();
            let p = Payload::new(data.clone(), PayloadLimits::default()).unwrap();
            let (r, e) = (
                RoomName::new("bench:x").unwrap(),
                EventName::new("tick").unwrap(),
            );
            for seq in [1, 23, 24, 70_000, u64::MAX] {
                let frame = encode_event(&r, &e, &p, seq, None);
                assert!(layout.is_event(&frame));
                assert_eq!(layout.seq(&frame), Some(seq));
                assert_eq!(layout.stamp(&frame, 0), Some(42));
                // Another event name of the same length and payload size: not ours.
                let junk = EventName::new("junk").unwrap();
                let other = encode_event(&r, &junk, &p, seq, None);
                assert!(layout.is_event(&other));
                assert_eq!(layout.seq(&other), None);
            }
        }
        let layout = EventLayout::new("bench:x", "tick", &payload(100, 0)).unwrap();
        let pong = ServerFrame::Pong { id: Some(1) }.encode();
        assert!(!layout.is_event(&pong));
        assert_eq!(layout.seq(&pong), None);
    }

    #[test]
    fn payload_sizes_are_exact_and_valid() {
        for size in [1usize, 2, 24, 25, 100, 257, 258, 4000] {
            let p = payload(size, 7);
            assert_eq!(p.len(), size);
            Payload::new(p, PayloadLimits::default()).unwrap();
        }
    }

    #[test]
    fn publish_template_stamps_and_masks() {
        let data = payload(100, 0x2a);
        let template = PublishTemplate::new("bench:x", "tick", &data).unwrap();
        assert_eq!(template.stamp_slots(), 12);
        let mut out = Vec::new();
        let mut keys = MaskKeys::new(7);
        template.put(&mut out, &[11, 22], keys.next_key());
        template.put(&mut out, &[33], keys.next_key());
        let mut cursor = Cursor::new(&out[..]);
        let layout = EventLayout::new("bench:x", "tick", &data).unwrap();
        let (r, e) = (
            RoomName::new("bench:x").unwrap(),
            EventName::new("tick").unwrap(),
        );
        for expected in [[11, 22], [33, 0x2a2a_2a2a_2a2a_2a2a]] {
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final);
            assert_eq!(header.opcode, OpCode::Data(Data::Binary));
            let start = cursor.position() as usize;
            let mut body = out[start..start + len as usize].to_vec();
            apply_mask(&mut body, header.mask.unwrap());
            cursor.set_position(start as u64 + len);
            let ClientFrame::Publish { room, data, .. } = ClientFrame::decode(&body).unwrap()
            else {
                panic!("not a publish");
            };
            assert_eq!(room, "bench:x");
            // The broker forwards the payload unchanged: the Event carries the stamps.
            let p = Payload::new(data, PayloadLimits::default()).unwrap();
            let event = encode_event(&r, &e, &p, 5, None);
            assert_eq!(layout.stamp(&event, 0), Some(expected[0]));
            assert_eq!(layout.stamp(&event, 1), Some(expected[1]));
            assert_eq!(layout.seq(&event), Some(5));
        }
        assert_eq!(cursor.position() as usize, out.len());
    }

    #[test]
    fn ws_frame_lengths() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let body = vec![9u8; len];
            let mut out = Vec::new();
            put_ws_frame(&mut out, &body, [1, 2, 3, 4]);
            let mut cursor = Cursor::new(&out[..]);
            let (header, n) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(n as usize, len);
            let start = cursor.position() as usize;
            let mut got = out[start..].to_vec();
            apply_mask(&mut got, header.mask.unwrap());
            assert_eq!(got, body);
        }
        let ping = &*PING;
        let mut cursor = Cursor::new(&ping[..]);
        let (header, n) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        let mut body = ping[cursor.position() as usize..].to_vec();
        assert_eq!(body.len() as u64, n);
        apply_mask(&mut body, header.mask.unwrap());
        assert_eq!(
            ClientFrame::decode(&body).unwrap(),
            ClientFrame::Ping { id: None }
        );
    }

    #[test]
    fn payload_stamp_reads_what_the_template_wrote() {
        for size in [17usize, 100, 1000] {
            let data = payload(size, 0x2a);
            let template = PublishTemplate::new("bench:x", "tick", &data).unwrap();
            let mut out = Vec::new();
            template.put(&mut out, &[11, 22], [0; 4]);
            let mut cursor = Cursor::new(&out[..]);
            let (_, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            let start = cursor.position() as usize;
            let body = &out[start..start + len as usize];
            let ClientFrame::Publish { data, .. } = ClientFrame::decode(body).unwrap() else {
                panic!("not a publish");
            };
            assert_eq!(data.len(), size);
            assert_eq!(payload_stamp(&data, 0), Some(11));
            assert_eq!(payload_stamp(&data, 1), Some(22));
            assert_eq!(payload_stamp(&data, size / 8), None);
        }
        assert_eq!(payload_stamp(&[], 0), None);
    }

    #[test]
    fn min_payload_fits_stamps() {
        assert_eq!(min_payload(1), 9);
        assert_eq!(min_payload(2), 17);
        for stamps in 1..4 {
            let size = min_payload(stamps);
            let template = PublishTemplate::new("a:b", "e", &payload(size, 0)).unwrap();
            assert_eq!(template.stamp_slots(), stamps);
        }
    }

    #[test]
    fn nodes_round_robin() {
        let one = Nodes::new("ws://a/ws", &[]).unwrap();
        assert_eq!(one.subscriber(5), "ws://a/ws");
        let three = Nodes::new(
            "ws://ignored/ws",
            &["ws://a/ws".into(), " ws://b/ws".into(), "ws://c/ws".into()],
        )
        .unwrap();
        assert_eq!(three.publisher(), "ws://a/ws");
        let got: Vec<&str> = (0..4).map(|i| three.subscriber(i)).collect();
        assert_eq!(got, ["ws://a/ws", "ws://b/ws", "ws://c/ws", "ws://a/ws"]);
        assert!(Nodes::new("x", &[" ".into()]).is_err());
    }

    #[test]
    fn tags_parse() {
        assert_eq!(
            parse_tag("label=a=b").unwrap(),
            ("label".to_owned(), "a=b".to_owned())
        );
        assert!(parse_tag("=x").is_err());
        assert!(parse_tag("x").is_err());
    }
}
