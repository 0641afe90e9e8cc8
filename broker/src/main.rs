//! The `roomcast` binary: command-line parsing, logging, signals. Everything else is in the
//! library.

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use roomcast_broker::{Config, serve, server::bind_tcp};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// roomcast: an edge real-time broker (rooms over WebSocket, CBOR events).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (embedded single-node mode).
    Serve(Config),
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutdown signal received: draining");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("ROOMCAST_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(config) => {
            // Every session holds a file descriptor: use all the hard limit allows.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(limit) => info!(limit, "open-file limit"),
                Err(e) => warn!(error = %e, "could not raise the open-file limit"),
            }
            let listener = bind_tcp(config.listen)?;
            let addr = listener.local_addr()?;
            info!(%addr, "listening: WebSocket ws://{addr}/ws, health http://{addr}/healthz, metrics http://{addr}/metrics");
            serve(listener, config, shutdown_signal()).await
        }
    }
}
