//! TLS identities for QUIC (WebTransport): the in-memory development certificate and
//! certificates loaded from PEM files, with the facts clients need to pin them.
//!
//! The development certificate is ECDSA P-256, valid 13 days from now: browsers accept at most
//! 14 days for `serverCertificateHashes`, and a day of margin covers clock skew.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use base64::Engine;
use wtransport::Identity;

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

/// Generates the development identity for `localhost`, 127.0.0.1 and ::1.
pub fn dev_identity() -> anyhow::Result<(Identity, CertInfo)> {
    let identity = Identity::self_signed_builder()
        .subject_alt_names(["localhost", "127.0.0.1", "::1"])
        .from_now_utc()
        .validity_days(DEV_CERT_DAYS)
        .build()
        .context("generating the development certificate")?;
    let not_after = SystemTime::now() + Duration::from_secs(u64::from(DEV_CERT_DAYS) * 86_400);
    let not_after_unix = not_after
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let info = CertInfo::of(&identity, Some(not_after_unix), "dev");
    Ok((identity, info))
}

/// Loads a certificate chain and private key from PEM files.
pub async fn load_identity(cert: &Path, key: &Path) -> anyhow::Result<(Identity, CertInfo)> {
    let identity = Identity::load_pemfiles(cert, key)
        .await
        .with_context(|| format!("loading {} and {}", cert.display(), key.display()))?;
    let info = CertInfo::of(&identity, None, "file");
    Ok((identity, info))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
