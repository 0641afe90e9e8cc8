//! TLS identities for QUIC (WebTransport): the in-memory development certificate and
//! certificates loaded from PEM files, with the facts clients need to pin them.
//!
//! The development certificate is ECDSA P-256, valid 13 days from now: browsers accept at most
//! 14 days for `serverCertificateHashes`, and a day of margin covers clock skew. [`renew`]
//! keeps them current (development certificate renewal, certificate file reload).
//!
//! Owns certificates, not sockets: the listeners put a new certificate in service.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use base64::Engine;
use wtransport::{
    Identity,
    tls::{Certificate, CertificateChain, PrivateKey},
};

pub(crate) mod renew;

/// Validity of the development certificate.
pub const DEV_CERT_DAYS: u32 = 13;

/// What a client needs to know about the served certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the leaf certificate's DER (what `serverCertificateHashes` pins).
    pub sha256: [u8; 32],
    /// End of validity, seconds since the Unix epoch (development certificates only).
    pub not_after_unix: Option<u64>,
    /// `dev` (generated in memory) or `file`.
    pub source: &'static str,
}

impl CertInfo {
    fn of(identity: &Identity, not_after_unix: Option<u64>, source: &'static str) -> Self {
        let leaf = &identity.certificate_chain().as_slice()[0];
        CertInfo {
            sha256: *leaf.hash().as_ref(),
            not_after_unix,
            source,
        }
    }

    /// Lowercase hex of the hash.
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Standard base64 of the hash.
    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.sha256)
    }

    /// The JSON served at `GET /cert-hash`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "algorithm": "sha-256",
            "hex": self.hex(),
            "base64": self.base64(),
            "not_after": self.not_after_unix,
            "source": self.source,
        })
    }
}

/// A freshly generated development certificate and key.
pub struct DevCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// The identity QUIC serves.
    pub identity: Identity,
    /// Hash and validity.
    pub info: CertInfo,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo (Chromium's
    /// `--ignore-certificate-errors-spki-list` takes its base64).
    pub spki_sha256: [u8; 32],
}

/// Generates a development certificate: ECDSA P-256, valid [`DEV_CERT_DAYS`] days from now,
/// for `localhost`, 127.0.0.1 and ::1.
pub fn generate_dev_cert() -> anyhow::Result<DevCert> {
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
    use sha2::{Digest, Sha256};

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    let now = time::OffsetDateTime::now_utc();
    // A minute of slack for clocks slightly behind ours.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::days(i64::from(DEV_CERT_DAYS));
    let cert = params.self_signed(&key)?;
    let identity = Identity::new(
        CertificateChain::single(Certificate::from_der(cert.der().to_vec())?),
        PrivateKey::from_der_pkcs8(key.serialize_der()),
    );
    let not_after_unix = params.not_after.unix_timestamp().max(0) as u64;
    let info = CertInfo::of(&identity, Some(not_after_unix), "dev");
    Ok(DevCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        identity,
        info,
        spki_sha256: Sha256::digest(key.subject_public_key_info()).into(),
    })
}

/// Generates the in-memory development identity.
pub fn dev_identity() -> anyhow::Result<(Identity, CertInfo)> {
    let dev = generate_dev_cert()?;
    Ok((dev.identity, dev.info))
}

/// Loads a certificate chain and private key from PEM files.
pub async fn load_identity(cert: &Path, key: &Path) -> anyhow::Result<(Identity, CertInfo)> {
    let identity = Identity::load_pemfiles(cert, key)
        .await
        .with_context(|| format!("loading {} and {}", cert.display(), key.display()))?;
    let info = CertInfo::of(&identity, None, "file");
    Ok((identity, info))
}

/// The rustls configuration for HTTPS and WSS on the TCP port, from PEM files.
pub fn load_tcp_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn dev_certificate_fits_browser_pinning_rules() {
        let (identity, info) = dev_identity().unwrap();
        let der = identity.certificate_chain().as_slice()[0].der().to_vec();
        assert_eq!(info.hex().len(), 64);
        assert_eq!(info.source, "dev");
        // The advertised hash is the DER's SHA-256 (what browsers compute).
        let again = CertInfo::of(&identity, None, "dev");
        assert_eq!(again.sha256, info.sha256);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let not_after = info.not_after_unix.unwrap();
        assert!(not_after > now + 12 * 86_400 && not_after <= now + 14 * 86_400);
        assert!(!der.is_empty());
        // Two generations give two certificates.
        assert_ne!(dev_identity().unwrap().1.sha256, info.sha256);
    }

    #[test]
    fn generated_pem_files_load_back_with_the_same_hash() {
        let dev = generate_dev_cert().unwrap();
        let dir = std::env::temp_dir().join(format!("roomcast-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &dev.cert_pem).unwrap();
        std::fs::write(&key, &dev.key_pem).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (_, loaded) = runtime.block_on(load_identity(&cert, &key)).unwrap();
        assert_eq!(loaded.sha256, dev.info.sha256);
        assert_ne!(dev.spki_sha256, dev.info.sha256);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
