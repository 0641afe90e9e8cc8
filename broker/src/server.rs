//! Listeners, tracked session tasks and graceful drain.
//!
//! [`serve`] takes an already-bound listener and a shutdown future (so tests bind port 0).
//! Each TCP connection is served by hyper's HTTP/1 server with upgrades over the axum router.
//! On shutdown admission refuses new sessions while the listeners stay open for the drain
//! window (so probes see 503 rather than a refused connection); HTTP connections finish their
//! request, every session is told to send `Close { shutting_down }` (reconnect: true) at its
//! moment of the window, and the drain waits for all of them up to the drain timeout.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use roomcast_protocol::Code;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use wtransport::{
    Endpoint, Identity, ServerConfig, VarInt, config::QuicTransportConfig, endpoint::endpoint_side,
    quinn::AckFrequencyConfig,
};

use crate::{
    admission::{self, Refusal, SessionRequest},
    api,
    certs::{self, CertInfo},
    cluster::{Bridge, InProcess, nats::NatsBridge},
    config::Config,
    conflation::KeyPath,
    gate::Security,
    hub::{HistoryLimits, Hub, RoomRule, RoomRules, SessionKey},
    metrics::Metrics,
    policy::NamespacePolicy,
    session,
    transport::wt,
};

/// The TCP peer of an HTTP request, as an axum extension.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Time a client gets to send a complete HTTP request head (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by the HTTP handlers and every session of one broker.
pub struct Shared {
    /// The configuration the broker started with.
    pub config: Config,
    /// The local room registry.
    pub hub: Arc<Hub>,
    /// Where publishes go: the local hub (single node) or NATS (cluster mode).
    pub bridge: Arc<dyn Bridge>,
    /// The NATS bridge in cluster mode.
    pub nats: Option<Arc<NatsBridge>>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Cancelled when the broker starts shutting down.
    pub shutdown: CancellationToken,
    /// Set soon after `shutdown` is cancelled (by [`serve`]'s watcher): a load, where
    /// `is_cancelled` takes a lock. Busy sessions look at it on every turn of their loop.
    pub shutting_down: AtomicBool,
    /// Tracks every connection and session task, for the drain.
    pub tracker: TaskTracker,
    /// Distinguishes this process's session ids from another run's.
    pub boot_id: u64,
    /// The certificate QUIC serves (`None` while WebTransport is off).
    pub cert: RwLock<Option<CertInfo>>,
    /// TLS for the TCP port (HTTPS, WSS) when certificate files are configured.
    pub tcp_tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Token verifier, namespace policy and limits (`--config`, or the open default).
    pub security: Arc<Security>,
    next_session: AtomicU64,
}

/// The security configuration of `config`: its `--config` file, or the open default. Warns
/// loudly when a non-loopback address is served without required tokens.
pub fn load_security(config: &Config) -> anyhow::Result<Security> {
    let security = match &config.config {
        Some(path) => Security::load(path)?,
        None => Security::open(),
    };
    if let Some(warning) = exposure_warning(config, &security) {
        warn!(listen = %config.listen, "{warning}");
    }
    Ok(security)
}

/// The warning for a broker reachable beyond this machine without required tokens.
pub fn exposure_warning(config: &Config, security: &Security) -> Option<&'static str> {
    (!config.listen.ip().is_loopback() && !security.verifier.required).then_some(
        "SECURITY: serving a non-loopback address without required authentication: anyone \
         who reaches this port may open sessions. Set [auth] required = true in --config.",
    )
}

/// How the hub treats each namespace: `--volatile-namespaces`, the history and dedup flags,
/// and the `--config` file's namespace sections (which override the flags).
fn room_rules(config: &Config, security: &Security) -> RoomRules {
    // Cluster mode keeps history in JetStream (one stream per namespace) unless turned off;
    // a node's own memory never does (events reach a node only while it has subscribers).
    let clustered = !config.cluster.nats.is_empty();
    let sequenced = clustered && !config.cluster.no_nats_history;
    let merge = |base: &RoomRule, policy: Option<&NamespacePolicy>| -> RoomRule {
        let Some(p) = policy else {
            return base.clone();
        };
        if p.volatile {
            return RoomRule::VOLATILE;
        }
        let mut rule = base.clone();
        // Checked when the file was loaded; volatile rooms never conflate.
        rule.conflate = p
            .conflate
            .as_deref()
            .and_then(|path| KeyPath::parse(path).ok())
            .map(Arc::new);
        if rule.history.is_on() {
            rule.history.events = p.history_events.unwrap_or(rule.history.events);
            rule.history.bytes = p.history_bytes.unwrap_or(rule.history.bytes);
            if let Some(secs) = p.history_ttl_secs {
                rule.history.ttl = Duration::from_secs(secs);
            }
        }
        if let Some(secs) = p.dedup_window_secs {
            rule.dedup_window = Duration::from_secs(secs);
        }
        rule
    };
    let base = RoomRule {
        volatile: false,
        history: if clustered && !sequenced {
            HistoryLimits::OFF
        } else {
            HistoryLimits {
                events: config.history_events,
                bytes: config.history_bytes,
                ttl: config.history_ttl,
            }
        },
        dedup_window: config.dedup_window,
        sequenced,
        conflate: None,
    };
    let file = &security.file;
    let mut rules = RoomRules {
        default: merge(&base, file.default.as_ref()),
        namespaces: HashMap::new(),
        history_budget: config.history_memory,
    };
    for ns in &config.volatile_namespaces {
        rules.namespaces.insert(ns.clone(), RoomRule::VOLATILE);
    }
    for (ns, policy) in file.namespaces() {
        // Volatile by flag or by file: either makes it volatile.
        rules
            .namespaces
            .entry(ns.to_owned())
            .or_insert_with(|| merge(&base, Some(policy)));
    }
    rules
}

impl Shared {
    /// Fresh state for a broker with `config` and the open security default.
    pub fn new(config: Config) -> Self {
        Self::with_security(config, Security::open())
    }

    /// Fresh state for a broker with `config` and `security`.
    pub fn with_security(config: Config, security: Security) -> Self {
        let boot_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let metrics = Metrics::new();
        let nats = (!config.cluster.nats.is_empty())
            .then(|| Arc::new(NatsBridge::new(&config.cluster, &metrics, boot_id)));
        let bridge: Arc<dyn Bridge> = match &nats {
            Some(nats) => nats.clone(),
            None => Arc::new(InProcess),
        };
        Shared {
            hub: Arc::new(
                Hub::with_rules(room_rules(&config, &security), bridge.interest())
                    .count_conflated_in(metrics.conflated.clone()),
            ),
            security: Arc::new(security),
            bridge,
            nats,
            config,
            metrics,
            shutdown: CancellationToken::new(),
            shutting_down: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            boot_id,
            cert: RwLock::new(None),
            tcp_tls: RwLock::new(None),
            next_session: AtomicU64::new(1),
        }
    }

    /// A process-unique key for a new session.
    pub fn next_session_key(&self) -> SessionKey {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the node should receive traffic: not shutting down, and (cluster mode)
    /// connected to NATS, with JetStream when rooms keep history.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.bridge.not_ready().is_none()
    }

    /// Connects the cluster bridge (cluster mode only); its tasks end with the broker.
    async fn start_cluster(&self) -> anyhow::Result<()> {
        if let Some(nats) = &self.nats {
            let session = self.config.session();
            nats.start(
                self.hub.clone(),
                &self.metrics,
                session.payload,
                self.config.max_frame_size,
                self.config.outbound_queue_bytes,
                self.shutdown.clone(),
            )
            .await?;
        }
        Ok(())
    }

    /// Metrics text, with the registry gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        self.metrics.rooms.set(self.hub.room_count() as i64);
        self.metrics
            .history_bytes
            .set(self.hub.history_bytes() as i64);
        self.metrics
            .subscriptions
            .set(self.hub.subscription_count() as i64);
        self.metrics.render()
    }
}

/// Serves HTTP and WebSocket on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for warning in config.check()? {
        warn!("{warning}");
    }
    let security = load_security(&config)?;
    let shared = Arc::new(Shared::with_security(config, security));
    shared.start_cluster().await?;
    let endpoints = start_webtransport(&shared, listener.local_addr()?).await?;
    serve_shared(listener, shared, endpoints, shutdown).await
}

async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    endpoints: Vec<Arc<QuicEndpoint>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::spawn({
        let shared = shared.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = shared.shutdown.cancelled() => {}
            }
            shared.shutdown.cancel();
            shared.shutting_down.store(true, Ordering::Relaxed);
        }
    });
    tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut tick = tokio::time::interval(HISTORY_SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shared.shutdown.cancelled() => return,
                }
                shared.hub.sweep(std::time::Instant::now());
            }
        }
    });
    tokio::spawn(crate::memory::release_periodically(
        shared.shutdown.child_token(),
    ));
    let webtransport: Vec<_> = endpoints
        .iter()
        .map(|endpoint| tokio::spawn(wt_accept_loop(endpoint.clone(), shared.clone())))
        .collect();
    accept_loop(listener, &shared).await;
    for accept in webtransport {
        let _ = accept.await;
    }
    // No new connections; every session has been told to close. Wait for them (and for HTTP
    // requests in flight) up to the drain timeout.
    shared.tracker.close();
    let drain = shared.config.drain_window + shared.config.drain_timeout;
    if tokio::time::timeout(drain, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = shared.tracker.len(),
            "drain timeout: dropping remaining sessions"
        );
    }
    // Sessions closed their connections, but the close reaches clients only once the
    // endpoint's driver has sent it: close what is left and let the endpoints go idle.
    let code = Code::ShuttingDown;
    for endpoint in &endpoints {
        endpoint.close(
            VarInt::from_u32(u32::from(code.value())),
            code.as_str().as_bytes(),
        );
    }
    let idle = futures_util::future::join_all(endpoints.iter().map(|e| e.wait_idle()));
    let _ = tokio::time::timeout(ENDPOINT_IDLE_WAIT, idle).await;
    info!("stopped");
    Ok(())
}

/// Resolves when the listeners close: a drain window after shutdown began. Until then a
/// draining node still answers, so that a load balancer sees `/readyz` fail (503) and new
/// session requests are refused with a status (503 + `Retry-After` on WebSocket, 429 on
/// WebTransport) rather than with a refused connection.
async fn listeners_close(shared: &Shared) {
    shared.shutdown.cancelled().await;
    tokio::time::sleep(shared.config.drain_window).await;
}

/// Accepts TCP connections until the listeners close and serves each with hyper's HTTP/1
/// server (with upgrades, so `/ws` sessions keep the plain `TcpStream`).
async fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    let router = api::router(shared.clone());
    let close = listeners_close(shared);
    tokio::pin!(close);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut close => return,
        };
        let (tcp, peer) = match accepted {
            Ok((tcp, peer)) => (tcp, peer),
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small frames must leave at once: Nagle's algorithm would hold them for the peer's
        // delayed ACK (tens of milliseconds).
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY");
        }
        // The handlers learn the client's address from this extension (per-IP limits).
        let router = router.clone().layer(axum::Extension(Peer(peer)));
        let cancelled = shared.shutdown.clone();
        let tls = shared
            .tcp_tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // A connection accepted while draining serves one request (a readiness probe, a
        // refused upgrade) and closes.
        let draining = cancelled.is_cancelled();
        shared.tracker.spawn(async move {
            match tls {
                None => serve_http(TokioIo::new(tcp), router, cancelled, draining).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            serve_http(TokioIo::new(tls), router, cancelled, draining).await;
                        }
                        Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                        Err(_) => debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one HTTP/1 connection (with upgrades) until it ends or shutdown finishes it (after
/// the request in flight). `draining`: accepted after shutdown began, so it serves one
/// request without keep-alive.
async fn serve_http<I>(
    io: TokioIo<I>,
    router: axum::Router,
    cancelled: CancellationToken,
    draining: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(!draining)
        .serve_connection(io, TowerToHyperService::new(router))
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancelled.cancelled(), if !draining => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A bound WebTransport server endpoint.
type QuicEndpoint = Endpoint<endpoint_side::Server>;

/// How often expired history, idempotency keys and history-only rooms are dropped.
const HISTORY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// On shutdown, how long the QUIC endpoints get to send the connections' closes.
const ENDPOINT_IDLE_WAIT: Duration = Duration::from_secs(2);

/// UDP socket buffer asked for: a connect burst (hundreds of handshakes at once) overflows the
/// usual ~208 KB default and costs clients handshake retries. The kernel caps it at
/// `net.core.rmem_max`/`wmem_max`.
const UDP_SOCKET_BUFFER: usize = 4 << 20;

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

/// Ack-eliciting packets a client may receive before it must acknowledge (QUIC's default: 1).
const ACK_ELICITING_THRESHOLD: u32 = 9;

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

/// Loads or generates the certificate and binds WebTransport on UDP at the TCP port: on
/// 127.0.0.1 and [::1] when listening on IPv4 loopback (Chromium resolves `localhost` to ::1
/// for QUIC and does not fall back), else on the same address as TCP. Nothing when
/// WebTransport is off.
async fn start_webtransport(
    shared: &Arc<Shared>,
    tcp: SocketAddr,
) -> anyhow::Result<Vec<Arc<QuicEndpoint>>> {
    let config = &shared.config;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let tls = certs::load_tcp_tls(cert, key)?;
        *shared.tcp_tls.write().unwrap_or_else(|e| e.into_inner()) = Some(tls);
    }
    if config.no_webtransport {
        if config.tls_cert.is_some() {
            tokio::spawn(reload_certificates(shared.clone(), Vec::new(), Vec::new()));
        }
        return Ok(Vec::new());
    }
    let (identity, info) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => certs::load_identity(cert, key).await?,
        _ => certs::dev_identity()?,
    };
    info!(sha256 = %info.hex(), source = info.source, "QUIC certificate (hash also at /cert-hash)");
    *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
    let mut addrs = vec![tcp];
    if tcp.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
        addrs.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), tcp.port()));
    }
    let mut endpoints = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let endpoint = udp_socket(*addr)
            .map_err(anyhow::Error::from)
            .and_then(|socket| quic_config(Bind::Socket(socket), &identity, config))
            .and_then(|quic| Ok(Endpoint::server(quic)?));
        match endpoint {
            Ok(endpoint) => {
                info!(%addr, "listening: WebTransport https://{addr}/wt");
                endpoints.push(Arc::new(endpoint));
            }
            Err(e) if i > 0 => {
                warn!(%addr, error = %e, "WebTransport not available on this address")
            }
            Err(e) => return Err(e.context(format!("binding UDP {addr}"))),
        }
    }
    if info.source == "dev" {
        tokio::spawn(renew_dev_certificate(
            shared.clone(),
            addrs,
            endpoints.clone(),
        ));
    } else {
        tokio::spawn(reload_certificates(
            shared.clone(),
            addrs,
            endpoints.clone(),
        ));
    }
    Ok(endpoints)
}

/// Replaces the development certificate a day before it expires; open sessions keep theirs.
async fn renew_dev_certificate(
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    endpoints: Vec<Arc<QuicEndpoint>>,
) {
    let every = Duration::from_secs(u64::from(certs::DEV_CERT_DAYS - 1) * 86_400);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shared.shutdown.cancelled() => return,
        }
        let Ok((identity, info)) = certs::dev_identity() else {
            warn!("could not renew the development certificate");
            continue;
        };
        for (endpoint, addr) in endpoints.iter().zip(&addrs) {
            match quic_config(Bind::Reload(*addr), &identity, &shared.config) {
                Ok(config) => {
                    if let Err(e) = endpoint.reload_config(config, false) {
                        warn!(error = %e, "reloading the QUIC certificate");
                    }
                }
                Err(e) => warn!(error = %e, "building the QUIC configuration"),
            }
        }
        info!(sha256 = %info.hex(), "development certificate renewed");
        *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }
}

/// How often certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(2);

/// Re-reads `--tls-cert`/`--tls-key` when they change or on SIGHUP, for both QUIC and TCP;
/// open sessions keep their certificate. A broken new pair is logged and the old one kept.
async fn reload_certificates(
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    endpoints: Vec<Arc<QuicEndpoint>>,
) {
    let (Some(cert), Some(key)) = (
        shared.config.tls_cert.clone(),
        shared.config.tls_key.clone(),
    ) else {
        return;
    };
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = (modified(&cert), modified(&key));
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup_signal = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_signal = std::future::pending::<()>();
        let forced = tokio::select! {
            () = tokio::time::sleep(CERT_POLL) => false,
            () = hangup_signal => true,
            () = shared.shutdown.cancelled() => return,
        };
        let now = (modified(&cert), modified(&key));
        if !forced && now == seen {
            continue;
        }
        seen = now;
        let loaded = async {
            let tcp = certs::load_tcp_tls(&cert, &key)?;
            let (identity, info) = certs::load_identity(&cert, &key).await?;
            anyhow::Ok((tcp, identity, info))
        };
        match loaded.await {
            Ok((tcp, identity, info)) => {
                for (endpoint, addr) in endpoints.iter().zip(&addrs) {
                    let reloaded = quic_config(Bind::Reload(*addr), &identity, &shared.config)
                        .and_then(|config| Ok(endpoint.reload_config(config, false)?));
                    if let Err(e) = reloaded {
                        warn!(error = %e, "reloading the QUIC certificate");
                    }
                }
                *shared.tcp_tls.write().unwrap_or_else(|e| e.into_inner()) = Some(tcp);
                info!(sha256 = %info.hex(), "certificate reloaded");
                if !endpoints.is_empty() {
                    *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
                }
            }
            Err(e) => {
                warn!(error = %e, "certificate files changed but could not be loaded; keeping the old ones")
            }
        }
    }
}

/// Accepts WebTransport sessions on one endpoint until the listeners close (while draining,
/// session requests are refused with 429).
async fn wt_accept_loop(endpoint: Arc<QuicEndpoint>, shared: Arc<Shared>) {
    let close = listeners_close(&shared);
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
        let task_shared = shared.clone();
        shared.tracker.spawn(async move {
            let request = match incoming.await {
                Ok(request) => request,
                Err(e) => return debug!(error = %e, "QUIC handshake failed"),
            };
            let authorization = request
                .headers()
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
                .map(|(_, value)| value.as_str());
            let judged = admission::admit(
                &task_shared,
                &SessionRequest::new("wt", request.path(), request.origin())
                    .authorization(authorization)
                    .peer(request.remote_address().ip())
                    .rate_checked(),
            );
            let admitted = match judged {
                Ok(admitted) => admitted,
                Err(Refusal::NotFound) => return request.not_found().await,
                Err(Refusal::Draining | Refusal::Busy { .. }) => {
                    return request.too_many_requests().await;
                }
                Err(Refusal::Origin) => return request.forbidden().await,
                Err(Refusal::Unauthorized { code, message }) => {
                    debug!(%code, %message, "WebTransport session refused");
                    task_shared.metrics.count_code(code);
                    return request.forbidden().await;
                }
            };
            let connection = match request.accept().await {
                Ok(connection) => connection,
                Err(e) => return debug!(error = %e, "WebTransport session refused"),
            };
            let config = &task_shared.config;
            let settings = wt::WtSettings {
                max_frame: config.max_frame_size,
                hello_timeout: config.hello_timeout,
                single_stream: config.wt_single_stream,
                // Over half the outbox cap of unwritten bytes, frames of backlogged streams
                // wait in the outbox (conflated, dropped or counted against its cap there);
                // the hard cap is then only reached by one drain on top of that.
                hold_backlog: config.outbound_queue_bytes / 2,
                max_backlog: config.outbound_queue_bytes * 2,
                datagrams_in: task_shared.metrics.datagrams_in.clone(),
                datagrams_out: task_shared.metrics.datagrams_out.clone(),
            };
            match wt::open(connection, settings).await {
                Ok((reader, writer)) => {
                    let key = task_shared.next_session_key();
                    session::run(task_shared, key, "wt", reader, writer, admitted).await;
                }
                Err(connection) => {
                    task_shared
                        .metrics
                        .count_code(roomcast_protocol::Code::Timeout);
                    wt::close_connection(&connection, roomcast_protocol::Code::Timeout).await;
                }
            }
        });
    }
}

/// Listen backlog asked for (the kernel caps it at `net.core.somaxconn`). The usual 128
/// overflows under a reconnect storm and costs each refused client a one-second retry.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the TCP listener for HTTP and WebSocket with a deep accept queue.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A broker running on a background task: what tests and embedders hold.
pub struct Server {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Binds `config.listen` (port 0 allowed) and the WebTransport endpoints, then serves.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        for warning in config.check()? {
            warn!("{warning}");
        }
        let listener = bind_tcp(config.listen)?;
        let local_addr = listener.local_addr()?;
        let security = load_security(&config)?;
        let shared = Arc::new(Shared::with_security(config, security));
        shared.start_cluster().await?;
        let endpoints = start_webtransport(&shared, local_addr).await?;
        let task = tokio::spawn(serve_shared(
            listener,
            shared.clone(),
            endpoints,
            std::future::pending(),
        ));
        Ok(Server {
            local_addr,
            shared,
            task,
        })
    }

    /// The bound TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `ws://ADDR/ws`, or `wss://localhost:PORT/ws` when the TCP port speaks TLS.
    pub fn ws_url(&self) -> String {
        if self
            .shared
            .tcp_tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            format!("wss://localhost:{}/ws", self.local_addr.port())
        } else {
            format!("ws://{}/ws", self.local_addr)
        }
    }

    /// The broker's shared state (hub, metrics).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Starts the graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shared.shutdown.cancel();
        self.task.await?
    }
}
