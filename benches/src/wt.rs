//! WebTransport sessions for the generator: the broker's certificate hash from `/cert-hash`,
//! QUIC client endpoints, Hello/Welcome on the control stream and subscriptions whose events
//! arrive on a room stream or as datagrams. Scenarios own what they do with a session;
//! nothing here measures.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use crate::common::{Nodes, hello_frame};
use anyhow::{Context, bail};
use roomcast_protocol::{
    ClientFrame, PayloadLimits, ServerFrame,
    frame::Welcome,
    stream::{FrameSplitter, write_prefix},
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wtransport::{
    ClientConfig, Connection, Endpoint, RecvStream, SendStream, endpoint::endpoint_side::Client,
    tls::Sha256Digest,
};

/// Largest frame the generator accepts from the broker.
const MAX_FRAME: usize = 1 << 20;
/// Time allowed for each handshake step.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Writes `frame` with its length prefix.
pub(crate) async fn send_frame(stream: &mut SendStream, frame: &ClientFrame) -> anyhow::Result<()> {
    let body = frame.encode();
    let mut out = Vec::with_capacity(body.len() + 8);
    write_prefix(body.len(), &mut out);
    out.extend_from_slice(&body);
    stream
        .write_all(&out)
        .await
        .context("write on the control stream")?;
    Ok(())
}
/// The broker's TCP address from a `ws://host:port/...` URL.
pub(crate) async fn broker_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let request = url.into_client_request()?;
    let uri = request.uri();
    let host = uri.host().context("URL without host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("no address for {host}"))
}

/// Decodes 64 hex digits.
pub(crate) fn parse_hash(hex: &str) -> anyhow::Result<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        bail!("expected 64 hex digits, got {hex:?}");
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("bad hex in {hex:?}"))?;
    }
    Ok(out)
}

/// The body of an HTTP/1.1 response (status 200, not chunked).
pub(crate) fn http_body(response: &str) -> anyhow::Result<&str> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of HTTP headers")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("HTTP status {status:?}: {body}");
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked HTTP responses are not supported");
    }
    Ok(body)
}

/// The SHA-256 of the broker's QUIC certificate, from `GET /cert-hash` on its TCP port.
pub(crate) async fn fetch_cert_hash(addr: SocketAddr) -> anyhow::Result<[u8; 32]> {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let request = format!("GET /cert-hash HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let response = String::from_utf8(response).context("non-UTF-8 HTTP response")?;
    let json: Value = serde_json::from_str(http_body(&response)?).context("/cert-hash JSON")?;
    parse_hash(json["hex"].as_str().context("/cert-hash without \"hex\"")?)
}

/// Client endpoints per broker node.
const ENDPOINTS_PER_NODE: usize = 8;

/// Opens `n` WebTransport sessions subscribed to `room`, at most `concurrency` handshakes at
/// a time, spread round-robin over the nodes; returns them in index order or the first error.
pub(crate) async fn open_wt_subscribers(
    nodes: &Nodes,
    n: usize,
    concurrency: usize,
    room: &str,
) -> anyhow::Result<Vec<WtSubscriber>> {
    let dialers = Arc::new(WtDialers::new(nodes).await?);
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut joins = JoinSet::new();
    for i in 0..n {
        let (dialers, limit, room) = (dialers.clone(), limit.clone(), room.to_owned());
        joins.spawn(async move {
            let _permit = limit.acquire().await;
            let session = dialers
                .subscriber(i, &room)
                .await
                .with_context(|| format!("WebTransport session {i}"))?;
            anyhow::Ok((i, session))
        });
    }
    let mut sessions: Vec<Option<WtSubscriber>> = (0..n).map(|_| None).collect();
    while let Some(joined) = joins.join_next().await {
        let (i, session) = joined??;
        sessions[i] = Some(session);
    }
    Ok(sessions.into_iter().flatten().collect())
}

/// One [`WtDialer`] per node.
pub(crate) struct WtDialers(Vec<WtDialer>);

impl WtDialers {
    /// Dialers for every node of `nodes`.
    pub(crate) async fn new(nodes: &Nodes) -> anyhow::Result<WtDialers> {
        let mut dialers = Vec::new();
        for url in nodes.all() {
            dialers.push(WtDialer::new(url, ENDPOINTS_PER_NODE).await?);
        }
        Ok(WtDialers(dialers))
    }

    /// Opens session `i` on node `i mod nodes`, subscribed to `room`.
    pub(crate) async fn subscriber(&self, i: usize, room: &str) -> anyhow::Result<WtSubscriber> {
        let dialer = &self.0[i % self.0.len()];
        dialer.subscriber(i / self.0.len(), room).await
    }
}

/// Reads frames from one stream, one at a time.
pub(crate) struct FrameReader {
    pub(crate) recv: RecvStream,
    splitter: FrameSplitter,
}

impl FrameReader {
    pub(crate) fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            splitter: FrameSplitter::new(MAX_FRAME),
        }
    }

    /// The stream and the bytes read past the last frame returned, for a raw reader.
    pub(crate) fn into_parts(self) -> (RecvStream, FrameSplitter) {
        (self.recv, self.splitter)
    }

    /// The next frame, decoded; an error at the stream's end.
    pub(crate) async fn next(&mut self) -> anyhow::Result<ServerFrame> {
        loop {
            if let Some(frame) = self.splitter.next_frame()? {
                return Ok(ServerFrame::decode(&frame, PayloadLimits::default())?);
            }
            if self.recv.read_buf(self.splitter.buffer(4096)).await? == 0 {
                bail!("stream ended");
            }
        }
    }
}

/// Sends Hello on a fresh control stream and waits for Welcome.
pub(crate) async fn hello(
    connection: &Connection,
) -> anyhow::Result<(SendStream, FrameReader, Welcome)> {
    let (mut send, recv) = connection
        .open_bi()
        .await
        .context("open the control stream")?
        .await
        .context("open the control stream")?;
    send_frame(&mut send, &hello_frame()).await?;
    let mut control = FrameReader::new(recv);
    match tokio::time::timeout(STEP_TIMEOUT, control.next()).await {
        Ok(Ok(ServerFrame::Welcome(welcome))) => Ok((send, control, welcome)),
        Ok(Ok(other)) => bail!("expected Welcome, got {other:?}"),
        Ok(Err(e)) => Err(e.context("waiting for Welcome")),
        Err(_) => bail!("no Welcome within {STEP_TIMEOUT:?}"),
    }
}

/// Receive buffer asked for on the generator's UDP sockets (the kernel caps it at
/// `net.core.rmem_max`): each socket carries a few hundred sessions, and with the usual
/// ~208 KB default a burst of events to all of them overflows it; every lost packet then
/// stalls that subscriber (and a closed-loop publisher) for a loss-detection timeout.
const CLIENT_RECEIVE_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `bind` with a large receive buffer.
fn client_socket(bind: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, with more loss under bursts.
    let _ = socket.set_recv_buffer_size(CLIENT_RECEIVE_BUFFER);
    socket
        .bind(&bind.into())
        .context("bind the client socket")?;
    Ok(socket.into())
}

/// A QUIC client endpoint trusting the certificate with SHA-256 `hash`, bound to `bind`.
pub(crate) fn client_endpoint(
    bind: SocketAddr,
    hash: [u8; 32],
) -> anyhow::Result<Endpoint<Client>> {
    let config = ClientConfig::builder()
        .with_bind_socket(client_socket(bind)?)
        .with_server_certificate_hashes([Sha256Digest::new(hash)])
        .keep_alive_interval(None)
        .max_idle_timeout(Some(Duration::from_secs(120)))
        .context("idle timeout")?
        .build();
    Endpoint::client(config).context("QUIC client endpoint")
}

/// One subscribed WebTransport session: its events arrive on `room` (a room stream) or, in
/// volatile rooms, as datagrams on `connection`.
pub(crate) struct WtSubscriber {
    pub(crate) connection: Connection,
    pub(crate) control: SendStream,
    pub(crate) control_recv: FrameReader,
    pub(crate) room: FrameReader,
    /// The personal room's stream, when the session has a user (kept, not read).
    pub(crate) personal: Option<FrameReader>,
    pub(crate) welcome: Welcome,
}

/// Opens WebTransport sessions to one broker over a few client endpoints (one UDP socket and
/// one driver task each), round-robin.
pub(crate) struct WtDialer {
    url: String,
    endpoints: Vec<Endpoint<Client>>,
}

impl WtDialer {
    /// Finds the broker behind the WebSocket URL `ws_url` (WebTransport is on UDP at the same
    /// port), fetches its certificate hash and binds `endpoints` client endpoints.
    pub(crate) async fn new(ws_url: &str, endpoints: usize) -> anyhow::Result<WtDialer> {
        let addr = broker_addr(ws_url).await?;
        let hash = fetch_cert_hash(addr).await?;
        let bind = if addr.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let endpoints = (0..endpoints.max(1))
            .map(|_| client_endpoint(bind, hash))
            .collect::<anyhow::Result<_>>()?;
        Ok(WtDialer {
            url: format!("https://{addr}/wt"),
            endpoints,
        })
    }

    /// Opens session `i` and subscribes it to `room`; returns once `Subscribed` arrived on the
    /// room's stream.
    pub(crate) async fn subscriber(&self, i: usize, room: &str) -> anyhow::Result<WtSubscriber> {
        let endpoint = &self.endpoints[i % self.endpoints.len()];
        let connection = tokio::time::timeout(STEP_TIMEOUT, endpoint.connect(&self.url))
            .await
            .context("WebTransport connect timed out")?
            .with_context(|| format!("WebTransport session to {}", self.url))?;
        let (mut control, control_recv, welcome) = hello(&connection).await?;
        let subscribe = ClientFrame::Subscribe {
            since: None,
            id: 1,
            room: room.to_owned(),
        };
        send_frame(&mut control, &subscribe).await?;
        let mut personal = None;
        loop {
            let recv = tokio::time::timeout(STEP_TIMEOUT, connection.accept_uni())
                .await
                .context("no room stream in time")?
                .context("room stream")?;
            let mut room_stream = FrameReader::new(recv);
            match room_stream.next().await? {
                // With a token the broker joins the session to its personal room first; its
                // stream is kept open (a stopped stream would end the session).
                ServerFrame::Subscribed { id: 0, .. } => personal = Some(room_stream),
                ServerFrame::Subscribed { .. } => {
                    return Ok(WtSubscriber {
                        connection,
                        control,
                        control_recv,
                        room: room_stream,
                        personal,
                        welcome,
                    });
                }
                other => bail!("expected Subscribed on the room stream, got {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_http_parsing() {
        let hex = "00ff10".repeat(10) + "abcd";
        let hash = parse_hash(&hex).unwrap();
        assert_eq!(&hash[..3], &[0x00, 0xff, 0x10]);
        assert_eq!(hash[31], 0xcd);
        assert!(parse_hash("abc").is_err());
        assert!(parse_hash(&"zz".repeat(32)).is_err());
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"hex\":\"00\"}";
        assert_eq!(http_body(ok).unwrap(), "{\"hex\":\"00\"}");
        assert!(http_body("HTTP/1.1 404 Not Found\r\n\r\nWebTransport is off\n").is_err());
        assert!(http_body("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n").is_err());
    }
}
