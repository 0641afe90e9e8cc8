//! The QUIC listener: UDP sockets with large buffers, QUIC transport settings for many small
//! sessions (stream limits, windows, idle timer, ACK frequency), the WebTransport endpoints
//! (on 127.0.0.1 and [::1] for an IPv4 loopback listener), putting a renewed or reloaded
//! certificate in service, and the accept loop with the connection caps checked before the
//! QUIC handshake.
//!
//! Owns the endpoints; must not judge or run sessions (that is [`crate::accept`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use roomcast_protocol::Code;
use tracing::{debug, info, warn};
use wtransport::{
    Endpoint, Identity, ServerConfig, VarInt, config::QuicTransportConfig, endpoint::endpoint_side,
    quinn::AckFrequencyConfig,
};

use crate::{
    accept,
    certs::{self, CertInfo},
    config::Config,
    node::Shared,
};

/// A bound WebTransport server endpoint.
type QuicEndpoint = Endpoint<endpoint_side::Server>;

/// On shutdown, how long the QUIC endpoints get to send the connections' closes.
const ENDPOINT_IDLE_WAIT: Duration = Duration::from_secs(2);

/// UDP socket buffer asked for: a connect burst (hundreds of handshakes at once) overflows the
/// usual ~208 KB default and costs clients handshake retries. The kernel caps it at
/// `net.core.rmem_max`/`wmem_max`.
const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Ack-eliciting packets a client may receive before it must acknowledge (QUIC's default: 1).
const ACK_ELICITING_THRESHOLD: u32 = 9;

/// The node's WebTransport endpoints (none while WebTransport is off), each with its address.
pub(crate) struct Quic {
    endpoints: Vec<(SocketAddr, Arc<QuicEndpoint>)>,
    /// Where the served certificate came from: `dev` or `file` (`None`: WebTransport off).
    source: Option<&'static str>,
}

impl Quic {
    /// Loads or generates the certificate and binds WebTransport on UDP at the TCP port: on
    /// 127.0.0.1 and [::1] when listening on IPv4 loopback (Chromium resolves `localhost` to
    /// ::1 for QUIC and does not fall back), else on the same address as TCP. No endpoint
    /// when WebTransport is off.
    pub(crate) async fn bind(shared: &Shared, tcp: SocketAddr) -> anyhow::Result<Quic> {
        let config = &shared.config;
        if config.no_webtransport {
            return Ok(Quic {
                endpoints: Vec::new(),
                source: None,
            });
        }
        let (identity, info) = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => certs::load_identity(cert, key).await?,
            _ => certs::dev_identity()?,
        };
        info!(sha256 = %info.hex(), source = info.source, "QUIC certificate (hash also at /cert-hash)");
        let source = info.source;
        *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
        let mut addrs = vec![tcp];
        if tcp.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            addrs.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), tcp.port()));
        }
        let mut endpoints = Vec::new();
        for (i, addr) in addrs.into_iter().enumerate() {
            let endpoint = udp_socket(addr)
                .map_err(anyhow::Error::from)
                .and_then(|socket| quic_config(Bind::Socket(socket), &identity, config))
                .and_then(|quic| Ok(Endpoint::server(quic)?));
            match endpoint {
                Ok(endpoint) => {
                    info!(%addr, "listening: WebTransport https://{addr}/wt");
                    endpoints.push((addr, Arc::new(endpoint)));
                }
                Err(e) if i > 0 => {
                    warn!(%addr, error = %e, "WebTransport not available on this address")
                }
                Err(e) => return Err(e.context(format!("binding UDP {addr}"))),
            }
        }
        Ok(Quic {
            endpoints,
            source: Some(source),
        })
    }

    /// Where the served certificate came from: `dev` or `file` (`None`: WebTransport off).
    pub(crate) fn source(&self) -> Option<&'static str> {
        self.source
    }

    /// Puts a new certificate in service: new connections get it, open ones keep theirs.
    pub(crate) fn install(&self, shared: &Shared, identity: &Identity, info: CertInfo) {
        if self.endpoints.is_empty() {
            return;
        }
        for (addr, endpoint) in &self.endpoints {
            let reloaded = quic_config(Bind::Reload(*addr), identity, &shared.config)
                .and_then(|config| Ok(endpoint.reload_config(config, false)?));
            if let Err(e) = reloaded {
                warn!(error = %e, "reloading the QUIC certificate");
            }
        }
        *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// Accepts WebTransport sessions on every endpoint until the listeners close.
    pub(crate) async fn accept(&self, shared: &Arc<Shared>) {
        let loops = self
            .endpoints
            .iter()
            .map(|(_, endpoint)| tokio::spawn(accept_loop(endpoint.clone(), shared.clone())));
        for accept in loops.collect::<Vec<_>>() {
            let _ = accept.await;
        }
    }

    /// Closes what is left of the connections (`shutting_down`) and lets the endpoints go
    /// idle: a session's close reaches its client only once the endpoint's driver sent it.
    pub(crate) async fn close(&self) {
        let code = Code::ShuttingDown;
        for (_, endpoint) in &self.endpoints {
            endpoint.close(
                VarInt::from_u32(u32::from(code.value())),
                code.as_str().as_bytes(),
            );
        }
        let idle =
            futures_util::future::join_all(self.endpoints.iter().map(|(_, e)| e.wait_idle()));
        let _ = tokio::time::timeout(ENDPOINT_IDLE_WAIT, idle).await;
    }
}

/// Accepts WebTransport sessions on one endpoint until the listeners close (while draining,
/// session requests are refused with 429).
async fn accept_loop(endpoint: Arc<QuicEndpoint>, shared: Arc<Shared>) {
    let close = shared.listeners_closed();
    tokio::pin!(close);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut close => return,
        };
        // The connection caps before the QUIC handshake: a flood costs no handshake.
        let connections = &shared.security.connections;
        if let Err(busy) = connections.check_rate(incoming.remote_address().ip()) {
            debug!(peer = %incoming.remote_address(), ?busy, "QUIC connection refused");
            incoming.refuse();
            continue;
        }
        if connections.is_full() {
            debug!("QUIC connection refused: max_sessions reached");
            incoming.refuse();
            continue;
        }
        shared
            .tracker
            .spawn(accept::webtransport(shared.clone(), incoming));
    }
}

/// Binds the UDP socket for one QUIC endpoint (IPv6 sockets are IPv6-only).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if let Err(e) = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER) {
        debug!(error = %e, "UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_SOCKET_BUFFER) {
        debug!(error = %e, "UDP send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// QUIC transport limits for many small sessions. Idle memory follows the stream limits (quinn
/// keeps state per stream the peer may open); the windows only cap memory under load.
fn quic_transport(config: &Config) -> anyhow::Result<QuicTransportConfig> {
    let frame = u32::try_from(config.max_frame_size).unwrap_or(u32::MAX);
    let mut transport = QuicTransportConfig::default();
    // Client-opened streams: the HTTP/3 CONNECT request and the control stream (bidi); HTTP/3's
    // control and QPACK streams (uni). A little slack lets a misbehaving client's extra stream
    // reach the session, which closes it with `protocol_error`.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(8u32.into());
    // A control-stream frame always fits; the connection window bounds what one client can
    // make the broker buffer.
    transport.stream_receive_window(frame.saturating_mul(2).max(64 * 1024).into());
    transport.receive_window(frame.saturating_mul(4).max(256 * 1024).into());
    // Unacknowledged outbound data per session: with the outbox cap, what a slow client costs.
    transport.send_window(config.outbound_queue_bytes as u64 * 2);
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    transport.datagram_send_buffer_size(256 * 1024);
    // QUIC's own idle timer stays above the protocol's, which closes silent sessions with a
    // code; clients ping at the protocol level.
    let idle = config.idle_timeout + Duration::from_secs(10);
    transport.max_idle_timeout(Some(idle.try_into()?));
    transport.keep_alive_interval(None);
    // Clients that speak QUIC's ACK frequency extension (quinn does; browsers do not yet)
    // acknowledge every tenth packet instead of every second one: fan-out sends many small
    // packets, and the ACKs coming back were a third of the broker's QUIC work (datagram
    // fan-out 3x faster; docs/BENCHMARKS.md). Loss is still detected within the peer's
    // max_ack_delay.
    let mut ack = AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    transport.ack_frequency_config(Some(ack));
    Ok(transport)
}

/// How a QUIC configuration binds: a fresh socket, or (for a reload) nothing new.
enum Bind {
    Socket(std::net::UdpSocket),
    Reload(SocketAddr),
}

/// The QUIC server configuration for one endpoint.
fn quic_config(bind: Bind, identity: &Identity, config: &Config) -> anyhow::Result<ServerConfig> {
    let builder = ServerConfig::builder();
    let builder = match bind {
        Bind::Socket(socket) => builder.with_bind_socket(socket),
        Bind::Reload(addr) => builder.with_bind_address(addr),
    };
    Ok(builder
        .with_custom_transport(identity.clone_identity(), quic_transport(config)?)
        .build())
}
