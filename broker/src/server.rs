//! Starting and stopping a node: [`serve`] and [`Server`] build the node's state, connect the
//! cluster bridge, put the certificates in service (with their renewal or reload), run the
//! listeners and the history sweep, and drain.
//!
//! [`serve`] takes an already-bound listener and a shutdown future (so tests bind port 0).
//! On shutdown admission refuses new sessions while the listeners stay open for the drain
//! window (so probes see 503 rather than a refused connection); HTTP connections finish their
//! request, every session is told to send `Close { shutting_down }` (reconnect: true) at its
//! moment of the window, and the drain waits for all of them up to the drain timeout.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

pub use crate::listen::tcp::bind_tcp;
use crate::{
    certs,
    config::Config,
    listen::{quic::Quic, tcp},
    node::{Shared, load_security},
};

/// How often expired history, idempotency keys and history-only rooms are dropped.
const HISTORY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Serves HTTP and WebSocket on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (shared, quic) = start_node(config, listener.local_addr()?).await?;
    serve_shared(listener, shared, quic, shutdown).await
}

/// Builds the node's state, connects the cluster bridge and binds WebTransport.
async fn start_node(config: Config, tcp: SocketAddr) -> anyhow::Result<(Arc<Shared>, Arc<Quic>)> {
    for warning in config.check()? {
        warn!("{warning}");
    }
    let security = load_security(&config)?;
    let shared = Arc::new(Shared::with_security(config, security));
    shared.start_cluster().await?;
    let quic = start_certificates(&shared, tcp).await?;
    Ok((shared, quic))
}

/// Loads the TCP port's TLS (when certificate files are configured), binds WebTransport and
/// starts the certificates' renewal (development certificate) or reload (files).
async fn start_certificates(shared: &Arc<Shared>, tcp: SocketAddr) -> anyhow::Result<Arc<Quic>> {
    let config = &shared.config;
    let files = config.tls_cert.clone().zip(config.tls_key.clone());
    if let Some((cert, key)) = &files {
        let tls = certs::load_tcp_tls(cert, key)?;
        *shared.tcp_tls.write().unwrap_or_else(|e| e.into_inner()) = Some(tls);
    }
    let quic = Arc::new(Quic::bind(shared, tcp).await?);
    let (task_shared, task_quic) = (shared.clone(), quic.clone());
    let shutdown = shared.shutdown.clone();
    match files {
        Some((cert, key)) => {
            tokio::spawn(certs::renew::reload_files(
                cert,
                key,
                shutdown,
                move |tcp, identity, info| {
                    task_quic.install(&task_shared, identity, info);
                    *task_shared
                        .tcp_tls
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = Some(tcp);
                },
            ));
        }
        None if quic.source() == Some("dev") => {
            tokio::spawn(certs::renew::renew_dev(shutdown, move |identity, info| {
                task_quic.install(&task_shared, identity, info)
            }));
        }
        None => {}
    }
    Ok(quic)
}

/// Runs the listeners and the history sweep until shutdown, then drains.
async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    quic: Arc<Quic>,
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
    tokio::join!(tcp::accept_loop(listener, &shared), quic.accept(&shared));
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
    quic.close().await;
    info!("stopped");
    Ok(())
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
        let listener = bind_tcp(config.listen)?;
        let local_addr = listener.local_addr()?;
        let (shared, quic) = start_node(config, local_addr).await?;
        let task = tokio::spawn(serve_shared(
            listener,
            shared.clone(),
            quic,
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
