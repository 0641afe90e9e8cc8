//! Certificate files: one certificate for QUIC and for HTTPS/WSS on the TCP port, reloaded
//! when the files change.

mod common;

use std::{path::PathBuf, sync::Arc, time::Duration};

use common::{wt::*, *};
use futures_util::{SinkExt, StreamExt};
use roomcast_broker::certs::generate_dev_cert;
use roomcast_protocol::{ClientFrame, PayloadLimits, ServerFrame};
use tokio_tungstenite::{Connector, tungstenite::Message};

struct CertDir(PathBuf);

impl CertDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("roomcast-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        CertDir(dir)
    }
    fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }
    /// Writes a fresh development pair; returns its DER and hash.
    fn write_new(&self) -> (Vec<u8>, [u8; 32]) {
        let dev = generate_dev_cert().unwrap();
        // Write to temporary names, then rename: the broker never sees half a pair.
        let (tmp_cert, tmp_key) = (self.0.join("cert.tmp"), self.0.join("key.tmp"));
        std::fs::write(&tmp_cert, &dev.cert_pem).unwrap();
        std::fs::write(&tmp_key, &dev.key_pem).unwrap();
        std::fs::rename(tmp_key, self.key()).unwrap();
        std::fs::rename(tmp_cert, self.cert()).unwrap();
        let der = dev.identity.certificate_chain().as_slice()[0]
            .der()
            .to_vec();
        (der, dev.info.sha256)
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A WSS session that trusts exactly `der`.
async fn wss_hello(url: &str, der: &[u8]) -> Result<ServerFrame, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = Connector::Rustls(Arc::new(config));
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector))
            .await
            .map_err(|e| e.to_string())?;
    let hello = ClientFrame::Hello {
        version: 1,
        token: None,
    };
    ws.send(Message::Binary(hello.encode())).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => {
            Ok(ServerFrame::decode(&b, PayloadLimits::default()).unwrap())
        }
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test]
async fn one_certificate_file_serves_quic_and_wss_and_reloads_on_change() {
    let dir = CertDir::new("tls");
    let (der, hash) = dir.write_new();
    let mut cfg = config();
    cfg.tls_cert = Some(dir.cert());
    cfg.tls_key = Some(dir.key());
    let server = start(cfg).await;
    assert_eq!(cert_hash(&server), hash);
    assert!(server.ws_url().starts_with("wss://localhost:"));

    // WSS on the TCP port with the same certificate.
    let hello = wss_hello(&server.ws_url(), &der)
        .await
        .expect("wss session");
    assert!(matches!(hello, ServerFrame::Welcome(_)), "{hello:?}");
    // WebTransport on UDP with the same certificate.
    session(&server, hash)
        .await
        .expect("pinned WebTransport session");

    // Rotate the files: the broker picks the new pair up without a restart.
    let (new_der, new_hash) = dir.write_new();
    let mut rotated = false;
    for _ in 0..100 {
        if cert_hash(&server) == new_hash {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the broker reloaded the changed certificate files");
    session(&server, new_hash)
        .await
        .expect("new sessions get the new certificate");
    assert!(
        session(&server, hash).await.is_err(),
        "the old pin no longer matches"
    );
    wss_hello(&server.ws_url(), &new_der)
        .await
        .expect("wss with the new certificate");
    assert!(wss_hello(&server.ws_url(), &der).await.is_err());
}

#[tokio::test]
async fn broken_new_files_keep_the_old_certificate() {
    let dir = CertDir::new("tls-broken");
    let (_, hash) = dir.write_new();
    let mut cfg = config();
    cfg.tls_cert = Some(dir.cert());
    cfg.tls_key = Some(dir.key());
    let server = start(cfg).await;
    std::fs::write(dir.cert(), "not a certificate").unwrap();
    // Give the poller (every 2 s) two rounds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cert_hash(&server), hash);
    session(&server, hash).await.expect("still served");
}
