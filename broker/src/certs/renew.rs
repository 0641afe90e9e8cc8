//! Keeping the served certificates current: the development certificate is replaced a day
//! before it expires; certificate files are re-read when they change or on SIGHUP. Each task
//! hands the new certificate to an `install` callback (the listeners put it in service; open
//! sessions keep theirs) and ends with the broker.
//!
//! Owns when and how certificates are renewed or re-read; must not touch sockets or the node.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wtransport::Identity;

use super::{CertInfo, DEV_CERT_DAYS, dev_identity, load_identity, load_tcp_tls};

/// How often certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(2);

/// Replaces the development certificate a day before it expires, until `shutdown`.
pub(crate) async fn renew_dev(
    shutdown: CancellationToken,
    mut install: impl FnMut(&Identity, CertInfo) + Send,
) {
    let every = Duration::from_secs(u64::from(DEV_CERT_DAYS - 1) * 86_400);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let Ok((identity, info)) = dev_identity() else {
            warn!("could not renew the development certificate");
            continue;
        };
        let hex = info.hex();
        install(&identity, info);
        info!(sha256 = %hex, "development certificate renewed");
    }
}

/// Re-reads `cert` and `key` when they change or on SIGHUP, until `shutdown`; `install` gets
/// the TCP configuration and the QUIC identity of the new pair. A broken new pair is logged
/// and the old one kept.
pub(crate) async fn reload_files(
    cert: PathBuf,
    key: PathBuf,
    shutdown: CancellationToken,
    mut install: impl FnMut(Arc<rustls::ServerConfig>, &Identity, CertInfo) + Send,
) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
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
            () = shutdown.cancelled() => return,
        };
        let now = (modified(&cert), modified(&key));
        if !forced && now == seen {
            continue;
        }
        seen = now;
        let loaded = async {
            let tcp = load_tcp_tls(&cert, &key)?;
            let (identity, info) = load_identity(&cert, &key).await?;
            anyhow::Ok((tcp, identity, info))
        };
        match loaded.await {
            Ok((tcp, identity, info)) => {
                let hex = info.hex();
                install(tcp, &identity, info);
                info!(sha256 = %hex, "certificate reloaded");
            }
            Err(e) => {
                warn!(error = %e, "certificate files changed but could not be loaded; keeping the old ones")
            }
        }
    }
}
