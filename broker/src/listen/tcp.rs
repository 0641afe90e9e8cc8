//! The TCP listener: binding with a deep accept queue, `TCP_NODELAY`, optional TLS (the
//! served configuration is read per connection, so a reload applies to new connections), and
//! hyper's HTTP/1 server with upgrades over the API router (so `/ws` sessions keep the plain
//! `TcpStream`). A connection accepted while draining serves one request and closes.
//!
//! Owns TCP connections up to the HTTP request; must not touch sessions or routes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{accept::Peer, api, node::Shared};

/// Time a client gets to send a complete HTTP request head (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Accepts TCP connections until the listeners close and serves each with hyper's HTTP/1
/// server (with upgrades, so `/ws` sessions keep the plain `TcpStream`).
pub(crate) async fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    let router = api::router(shared.clone());
    let close = shared.listeners_closed();
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
