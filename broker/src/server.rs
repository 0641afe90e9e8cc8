//! Listeners, tracked session tasks and graceful drain.
//!
//! [`serve`] takes an already-bound listener and a shutdown future (so tests bind port 0).
//! Each TCP connection is served by hyper's HTTP/1 server with upgrades over the axum router.
//! On shutdown it stops accepting, lets HTTP connections finish their request, tells every
//! session to send `Close { shutting_down }` (reconnect: true) and waits for all of them up to
//! the drain timeout.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{api, config::Config, hub::Hub, hub::SessionKey, metrics::Metrics};

/// Time a client gets to send a complete HTTP request head (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by the HTTP handlers and every session of one broker.
pub struct Shared {
    /// The configuration the broker started with.
    pub config: Config,
    /// The local room registry.
    pub hub: Hub,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Cancelled when the broker starts shutting down.
    pub shutdown: CancellationToken,
    /// Tracks every connection and session task, for the drain.
    pub tracker: TaskTracker,
    /// Distinguishes this process's session ids from another run's.
    pub boot_id: u64,
    next_session: AtomicU64,
}

impl Shared {
    /// Fresh state for a broker with `config`.
    pub fn new(config: Config) -> Self {
        let boot_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Shared {
            config,
            hub: Hub::new(),
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            boot_id,
            next_session: AtomicU64::new(1),
        }
    }

    /// A process-unique key for a new session.
    pub fn next_session_key(&self) -> SessionKey {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Metrics text, with the registry gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        self.metrics.rooms.set(self.hub.room_count() as i64);
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
    serve_shared(listener, Arc::new(Shared::new(config)), shutdown).await
}

async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = shared.shutdown.clone();
    tokio::spawn({
        let token = token.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = token.cancelled() => {}
            }
            token.cancel();
        }
    });
    accept_loop(listener, &shared).await;
    // No new connections; every session has been told to close. Wait for them (and for HTTP
    // requests in flight) up to the drain timeout.
    shared.tracker.close();
    let drain = shared.config.drain_timeout;
    if tokio::time::timeout(drain, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = shared.tracker.len(),
            "drain timeout: dropping remaining sessions"
        );
    }
    info!("stopped");
    Ok(())
}

/// Accepts TCP connections until shutdown and serves each with hyper's HTTP/1 server (with
/// upgrades, so `/ws` sessions keep the plain `TcpStream`).
async fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    let router = api::router(shared.clone());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.shutdown.cancelled() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
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
        let service = TowerToHyperService::new(router.clone());
        let cancelled = shared.shutdown.clone();
        shared.tracker.spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = cancelled.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "HTTP connection ended with an error");
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
    /// Binds `config.listen` (port 0 allowed) and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        let listener = bind_tcp(config.listen)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let task = tokio::spawn(serve_shared(
            listener,
            shared.clone(),
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

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.local_addr)
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
