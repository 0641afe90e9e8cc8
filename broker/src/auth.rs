//! Token verification: JSON Web Tokens checked against the configured keys, yielding the
//! session's [`Claims`] (user id, expiry, room grants).
//!
//! This module owns the `[auth]` section of the configuration file, loading key files (and
//! generating HMAC secrets for them: `roomcast keygen`), the algorithm allow-list, the claim
//! checks and minting test tokens. It decides nothing about
//! rooms (that is [`crate::policy`]) and never sees sockets: [`crate::admission`] hands it the
//! token of a session request, the session's gate the token of a `Hello`.
//!
//! Only HS256, HS384, HS512, RS256, ES256 and EdDSA are accepted, each key bound to one
//! algorithm, so a token is only ever checked with a key of the algorithm its header names (no
//! RSA public key used as an HMAC secret, no `none`). HMAC secrets shorter than their hash's
//! output are refused when the file is loaded (RFC 7518 §3.2).
//!
//! A broker without keys has auth off: [`Verifier::check`] ignores every token (logged at
//! debug), so clients that always send one work against a development broker too.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm as JwtAlgorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind,
};
use roomcast_protocol::{Code, RoomName};
use serde::{Deserialize, Serialize};

/// Longest token accepted, in bytes (a token is checked before any allocation sized by it).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Most room grants one token may carry (each request scans them).
pub const MAX_GRANTS: usize = 256;

/// A signature algorithm of the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// HMAC with SHA-256; the key file holds the shared secret (raw bytes, at least 32).
    HS256,
    /// HMAC with SHA-384; the key file holds the shared secret (raw bytes, at least 48).
    HS384,
    /// HMAC with SHA-512; the key file holds the shared secret (raw bytes, at least 64).
    HS512,
    /// RSASSA-PKCS1-v1_5 with SHA-256; the key file holds the PEM public key.
    RS256,
    /// ECDSA P-256 with SHA-256; the key file holds the PEM public key.
    ES256,
    /// Ed25519; the key file holds the PEM public key.
    EdDSA,
}

impl Algorithm {
    fn jwt(self) -> JwtAlgorithm {
        match self {
            Algorithm::HS256 => JwtAlgorithm::HS256,
            Algorithm::HS384 => JwtAlgorithm::HS384,
            Algorithm::HS512 => JwtAlgorithm::HS512,
            Algorithm::RS256 => JwtAlgorithm::RS256,
            Algorithm::ES256 => JwtAlgorithm::ES256,
            Algorithm::EdDSA => JwtAlgorithm::EdDSA,
        }
    }

    /// The shortest secret an HMAC algorithm accepts, in bytes: the size of its hash's output
    /// (RFC 7518 §3.2); `None` for the public-key algorithms.
    pub fn min_secret_len(self) -> Option<usize> {
        match self {
            Algorithm::HS256 => Some(32),
            Algorithm::HS384 => Some(48),
            Algorithm::HS512 => Some(64),
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => None,
        }
    }
}

/// Why a key file was refused at load.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read; for an HMAC secret that does not exist, `hint` says how to
    /// create it.
    #[error("auth key {}: {source}{hint}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
        /// Empty, or how to create the file.
        hint: String,
    },
    /// An HMAC secret shorter than its algorithm's minimum.
    #[error(
        "auth key {}: {len} bytes, but an {algorithm:?} secret needs at least {min} (RFC 7518 \
         §3.2); replace it with `{}`",
        path.display(),
        keygen_command(*algorithm, path, true)
    )]
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Its algorithm.
        algorithm: Algorithm,
        /// Its length in bytes.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A PEM public key the algorithm cannot use.
    #[error("auth key {}: {source}", path.display())]
    Pem {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        source: jsonwebtoken::errors::Error,
    },
}

/// The command that creates (`replace`: replaces) the HMAC secret `path` for `algorithm`.
fn keygen_command(algorithm: Algorithm, path: &Path, replace: bool) -> String {
    let algorithm = match algorithm {
        Algorithm::HS256 => String::new(),
        other => format!(" --algorithm {other:?}"),
    };
    let force = if replace { " --force" } else { "" };
    format!("roomcast keygen{algorithm}{force} --out {}", path.display())
}

/// Reads the key file `path` of `algorithm`: an HMAC secret at least as long as its hash's
/// output, or a PEM public key.
fn load_key(path: &Path, algorithm: Algorithm) -> Result<DecodingKey, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|source| {
        let hint = match algorithm.min_secret_len() {
            Some(_) if source.kind() == std::io::ErrorKind::NotFound => {
                format!(
                    "; create it with `{}`",
                    keygen_command(algorithm, path, false)
                )
            }
            _ => String::new(),
        };
        KeyFileError::Read {
            path: path.to_owned(),
            source,
            hint,
        }
    })?;
    let pem = |source| KeyFileError::Pem {
        path: path.to_owned(),
        source,
    };
    match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let min = algorithm.min_secret_len().unwrap_or(32);
            if bytes.len() < min {
                return Err(KeyFileError::TooShort {
                    path: path.to_owned(),
                    algorithm,
                    len: bytes.len(),
                    min,
                });
            }
            Ok(DecodingKey::from_secret(&bytes))
        }
        Algorithm::RS256 => DecodingKey::from_rsa_pem(&bytes).map_err(pem),
        Algorithm::ES256 => DecodingKey::from_ec_pem(&bytes).map_err(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(&bytes).map_err(pem),
    }
}

/// Why `roomcast keygen` wrote no secret.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// Only HMAC algorithms have secrets to generate.
    #[error("{0:?} keys are PEM public keys of your token issuer; keygen makes HMAC secrets")]
    NotHmac(Algorithm),
    /// The file exists and `force` was not given.
    #[error("{}: exists; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    /// The operating system's random source failed.
    #[error("no random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    /// Writing the file failed.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Writes a fresh secret for `algorithm` (as many random bytes from the operating system's
/// CSPRNG as the hash's output) to `path`, readable by its owner only (mode 0600). An existing
/// file is refused unless `force`, which replaces it atomically. Returns the secret's length.
pub fn generate_secret_file(
    path: &Path,
    algorithm: Algorithm,
    force: bool,
) -> Result<usize, KeygenError> {
    let len = algorithm
        .min_secret_len()
        .ok_or(KeygenError::NotHmac(algorithm))?;
    let mut secret = vec![0u8; len];
    getrandom::fill(&mut secret).map_err(KeygenError::Random)?;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| KeygenError::Write { path, source }
    };
    if !force {
        // `create_new`: an existing file is never touched, whatever happens between a check
        // and the write.
        let mut file = new_private_file(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeygenError::Exists(path.to_owned()),
            _ => write_err(path)(e),
        })?;
        if let Err(e) = file.write_all(&secret).and_then(|()| file.sync_all()) {
            let _ = std::fs::remove_file(path);
            return Err(write_err(path)(e));
        }
        return Ok(len);
    }
    // Replacing: a new file beside it, renamed over it, so readers see the old or the new
    // secret and the new one gets mode 0600 whatever the old one had.
    let name = path
        .file_name()
        .ok_or_else(|| write_err(path)(std::io::ErrorKind::InvalidInput.into()))?;
    let mut temporary = name.to_os_string();
    temporary.push(format!(".keygen-{}", std::process::id()));
    let temporary = path.with_file_name(temporary);
    let _ = std::fs::remove_file(&temporary);
    let written = new_private_file(&temporary)
        .and_then(|mut file| file.write_all(&secret).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(write_err(path)(e));
    }
    Ok(len)
}

/// Creates `path`, which must not exist, readable and writable by its owner only.
fn new_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// One verification key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id: a token whose header has `kid` is checked only with the key of that id (key
    /// rotation: list the old and the new key until the old tokens expired). Optional.
    #[serde(default)]
    pub kid: Option<String>,
    /// The algorithm this key verifies (the token's header must name it).
    pub algorithm: Algorithm,
    /// The key file, relative to the configuration file's folder: the secret for HS256, HS384
    /// and HS512 (its bytes as they are, at least 32, 48 and 64: `roomcast keygen` makes one),
    /// a PEM public key otherwise.
    pub file: PathBuf,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Refuse sessions without a valid token (in the request or in `Hello`). Default false:
    /// sessions without a token see only namespaces whose rules say `anyone`.
    #[serde(default)]
    pub required: bool,
    /// Verification keys. Default none: auth is off and tokens clients send are ignored
    /// (logged at debug), since there is nothing to verify them with.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Accepted `aud` values; when set, tokens must carry one of them. Default: not checked.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted `iss` values; when set, tokens must carry one of them. Default: not checked.
    #[serde(default)]
    pub issuer: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 30.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// With `required`: time a session admitted without a token in its request gets to send
    /// a `Hello` with one, in milliseconds (at most `--hello-timeout`). Pre-authentication
    /// sessions cost memory while proving nothing, so they get less time. Default 3000.
    #[serde(default = "default_pre_auth_hello_timeout")]
    pub pre_auth_hello_timeout_ms: u64,
    /// Browser origins allowed to open sessions (`Origin` of the WebSocket upgrade, `origin`
    /// of the WebTransport request), e.g. `https://app.example`. A request without an origin
    /// (not a browser) is not affected. Default empty: every origin.
    #[serde(default)]
    pub origins: Vec<String>,
}

fn default_leeway() -> u64 {
    30
}

fn default_pre_auth_hello_timeout() -> u64 {
    3000
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: false,
            keys: Vec::new(),
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway_secs: default_leeway(),
            pre_auth_hello_timeout_ms: default_pre_auth_hello_timeout(),
            origins: Vec::new(),
        }
    }
}

/// `[auth]` settings that cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    /// Tokens are required but none could be verified.
    #[error("auth.required = true but auth has no keys")]
    RequiredWithoutKeys,
}

impl AuthConfig {
    pub(crate) fn check(&self) -> Result<(), AuthConfigError> {
        if self.required && self.keys.is_empty() {
            return Err(AuthConfigError::RequiredWithoutKeys);
        }
        Ok(())
    }
}

/// A capability a grant gives on matching rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Subscribe (`"sub"`).
    Sub,
    /// Publish (`"pub"`).
    Pub,
}

/// A room pattern and what it grants: `orders:1042` matches that room, `bids:*` every room
/// starting with `bids:`, `*` every room.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    pattern: String,
    prefix: bool,
    sub: bool,
    publish: bool,
}

impl Grant {
    fn matches(&self, room: &str) -> bool {
        if self.prefix {
            room.starts_with(&self.pattern)
        } else {
            room == self.pattern
        }
    }
}

/// What a verified token says about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`).
    pub sub: String,
    /// Expiry (`exp`), seconds since the Unix epoch.
    pub exp: u64,
    grants: Vec<Grant>,
}

impl Claims {
    /// Whether a grant of the token gives `capability` on `room`.
    pub fn grants(&self, room: &RoomName, capability: Capability) -> bool {
        self.grants.iter().any(|g| {
            g.matches(room.as_str())
                && match capability {
                    Capability::Sub => g.sub,
                    Capability::Pub => g.publish,
                }
        })
    }

    /// When the token expires.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }

    /// Claims for unit tests: `sub` with `(pattern, ["sub", "pub"])` grants, valid for an hour.
    #[cfg(test)]
    pub(crate) fn for_test(sub: &str, grants: &[(&str, &[&str])]) -> Self {
        let rooms = grants
            .iter()
            .map(|(p, caps)| {
                (
                    (*p).to_owned(),
                    caps.iter().map(|c| (*c).to_owned()).collect(),
                )
            })
            .collect();
        Claims {
            sub: sub.to_owned(),
            exp: now_secs() + 3600,
            grants: parse_grants(&rooms).unwrap(),
        }
    }
}

fn parse_grants(rooms: &BTreeMap<String, Vec<String>>) -> Result<Vec<Grant>, AuthError> {
    if rooms.len() > MAX_GRANTS {
        return Err(AuthError::invalid(format!(
            "more than {MAX_GRANTS} room grants"
        )));
    }
    Ok(rooms
        .iter()
        .map(|(pattern, caps)| {
            let (pattern, prefix) = match pattern.strip_suffix('*') {
                Some(stem) => (stem.to_owned(), true),
                None => (pattern.clone(), false),
            };
            Grant {
                pattern,
                prefix,
                sub: caps.iter().any(|c| c == "sub"),
                publish: caps.iter().any(|c| c == "pub"),
            }
        })
        .collect())
}

/// The claims roomcast reads.
#[derive(Debug, Serialize, Deserialize)]
struct RawClaims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rooms: BTreeMap<String, Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    /// `unauthorized` or `token_expired`.
    pub code: Code,
    /// What was wrong (never the token itself).
    pub message: String,
}

impl AuthError {
    fn invalid(message: impl Into<String>) -> Self {
        AuthError {
            code: Code::Unauthorized,
            message: message.into(),
        }
    }
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    audience: Vec<String>,
    issuer: Vec<String>,
    leeway: u64,
    /// Whether sessions need a token.
    pub required: bool,
    /// Hello timeout of sessions admitted without a token while tokens are required.
    pub pre_auth_hello_timeout: Duration,
    origins: Vec<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

fn install_crypto() {
    // Only the RustCrypto backend is compiled in; installing it explicitly keeps verification
    // from depending on feature inference. An error means it is installed already.
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

impl Verifier {
    /// Loads the key files of `config` (relative paths against `base_dir`).
    pub fn new(config: &AuthConfig, base_dir: &std::path::Path) -> anyhow::Result<Self> {
        install_crypto();
        let mut keys = Vec::new();
        for key in &config.keys {
            let decoding = load_key(&base_dir.join(&key.file), key.algorithm)?;
            keys.push(Key {
                kid: key.kid.clone(),
                algorithm: key.algorithm,
                key: decoding,
            });
        }
        Ok(Verifier {
            keys,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            leeway: config.leeway_secs,
            required: config.required,
            pre_auth_hello_timeout: Duration::from_millis(config.pre_auth_hello_timeout_ms),
            origins: config.origins.clone(),
        })
    }

    /// A verifier without keys (auth off): tokens are ignored, none is required.
    pub fn none() -> Self {
        Verifier {
            keys: Vec::new(),
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway: default_leeway(),
            required: false,
            pre_auth_hello_timeout: Duration::from_millis(default_pre_auth_hello_timeout()),
            origins: Vec::new(),
        }
    }

    /// Whether a browser origin may open sessions.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(origin) => self.origins.is_empty() || self.origins.iter().any(|o| o == origin),
        }
    }

    /// Whether auth is on: at least one key is configured. Without keys there is nothing to
    /// verify a token with, and [`Self::check`] ignores tokens.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The claims of a token a client presented (in the session request, `Hello` or
    /// `Refresh`; `source` names it in the log): verified when auth is on, ignored (`None`,
    /// logged at debug) when the broker has no keys.
    pub fn check(&self, token: &str, source: &str) -> Result<Option<Arc<Claims>>, AuthError> {
        if self.enabled() {
            return self.verify(token).map(Some);
        }
        tracing::debug!(source, "auth is off (no keys): ignoring the token");
        Ok(None)
    }

    /// Verifies `token`: signature with a key of the header's algorithm (and `kid`), `exp`,
    /// `nbf`, `aud` and `iss` as configured, the grants' shape.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::invalid(format!(
                "token longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::invalid(format!("malformed token: {e}")))?;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.algorithm.jwt() == header.alg)
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::invalid(format!(
                "no key for algorithm {:?}{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|kid| format!(" and kid {kid}"))
                    .unwrap_or_default()
            )));
        }
        let mut last = AuthError::invalid("bad signature");
        for key in candidates {
            let mut validation = Validation::new(key.algorithm.jwt());
            validation.leeway = self.leeway;
            validation.validate_nbf = true;
            let mut required = vec!["exp", "sub"];
            if self.audience.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&self.audience);
                required.push("aud");
            }
            if !self.issuer.is_empty() {
                validation.set_issuer(&self.issuer);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<RawClaims>(token, &key.key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims.sub.is_empty() || claims.sub.len() > 120 {
                        return Err(AuthError::invalid("sub must be 1-120 bytes"));
                    }
                    return Ok(Arc::new(Claims {
                        grants: parse_grants(&claims.rooms)?,
                        sub: claims.sub,
                        exp: claims.exp,
                    }));
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError {
                            code: Code::TokenExpired,
                            message: "token expired".into(),
                        },
                        ErrorKind::ImmatureSignature => AuthError::invalid("token not yet valid"),
                        ErrorKind::InvalidAudience => AuthError::invalid("wrong audience"),
                        ErrorKind::InvalidIssuer => AuthError::invalid("wrong issuer"),
                        ErrorKind::InvalidSignature => AuthError::invalid("bad signature"),
                        ErrorKind::MissingRequiredClaim(claim) => {
                            AuthError::invalid(format!("claim {claim} missing"))
                        }
                        _ => AuthError::invalid(format!("invalid token: {e}")),
                    };
                    // Another key of the same algorithm may still verify the signature.
                    if last.message != "bad signature" {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What to put in a minted token.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// User id.
    pub sub: String,
    /// Room grants: pattern → capabilities (`sub`, `pub`).
    pub rooms: BTreeMap<String, Vec<String>>,
    /// Lifetime from now.
    pub ttl: Duration,
    /// `nbf` as an offset from now (tests of not-yet-valid tokens).
    pub not_before: Option<Duration>,
    /// `aud`.
    pub audience: Option<String>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `kid` of the header.
    pub kid: Option<String>,
}

/// Mints an HS256 token with `secret` (`roomcast token`, tests). A `ttl` of zero gives a token
/// that expired a minute ago.
pub fn mint_hs256(secret: &[u8], spec: &TokenSpec) -> anyhow::Result<String> {
    install_crypto();
    let now = now_secs();
    let exp = if spec.ttl.is_zero() {
        now.saturating_sub(60)
    } else {
        now + spec.ttl.as_secs().max(1)
    };
    let claims = RawClaims {
        sub: spec.sub.clone(),
        exp,
        nbf: spec.not_before.map(|d| now + d.as_secs()),
        aud: spec.audience.clone(),
        iss: spec.issuer.clone(),
        rooms: spec.rooms.clone(),
    };
    let mut header = Header::new(JwtAlgorithm::HS256);
    header.kid = spec.kid.clone();
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// A `--grant` that is not `PATTERN=sub[,pub]` (the text given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: expected PATTERN=sub[,pub]")]
pub struct BadGrant(pub String);

/// Parses `--grant 'orders:1042=sub'` / `'bids:*=sub,pub'`.
pub fn parse_grant(text: &str) -> Result<(String, Vec<String>), BadGrant> {
    let bad = || BadGrant(text.to_owned());
    let (pattern, caps) = text.split_once('=').ok_or_else(bad)?;
    let caps: Vec<String> = caps.split(',').map(|c| c.trim().to_owned()).collect();
    if pattern.is_empty() || caps.iter().any(|c| c != "sub" && c != "pub") {
        return Err(bad());
    }
    Ok((pattern.to_owned(), caps))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier(keys: &[(&str, &[u8])], audience: &[&str]) -> Verifier {
        let dir = std::env::temp_dir().join(format!(
            "roomcast-auth-{}-{}",
            std::process::id(),
            keys.len() * 10 + audience.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = AuthConfig {
            audience: audience.iter().map(|a| (*a).to_owned()).collect(),
            ..AuthConfig::default()
        };
        for (kid, secret) in keys {
            std::fs::write(dir.join(kid), secret).unwrap();
            config.keys.push(KeyConfig {
                kid: Some((*kid).to_owned()),
                algorithm: Algorithm::HS256,
                file: PathBuf::from(kid),
            });
        }
        Verifier::new(&config, &dir).unwrap()
    }

    fn spec(sub: &str) -> TokenSpec {
        TokenSpec {
            sub: sub.into(),
            ttl: Duration::from_secs(3600),
            ..TokenSpec::default()
        }
    }

    #[test]
    fn good_token_and_grants() {
        let v = verifier(&[("k1", SECRET)], &[]);
        let mut s = spec("alice");
        s.rooms
            .insert("bids:*".into(), vec!["sub".into(), "pub".into()]);
        s.rooms.insert("orders:1042".into(), vec!["sub".into()]);
        let claims = v.verify(&mint_hs256(SECRET, &s).unwrap()).unwrap();
        assert_eq!(claims.sub, "alice");
        let room = |n| RoomName::new(n).unwrap();
        assert!(claims.grants(&room("bids:7"), Capability::Pub));
        assert!(claims.grants(&room("orders:1042"), Capability::Sub));
        assert!(!claims.grants(&room("orders:1042"), Capability::Pub));
        assert!(!claims.grants(&room("orders:10421"), Capability::Sub));
    }

    #[test]
    fn refusals_name_the_reason() {
        let v = verifier(&[("k1", SECRET)], &["roomcast"]);
        let err = |token: &str| v.verify(token).unwrap_err();
        let mut s = spec("a");
        s.audience = Some("roomcast".into());
        assert!(v.verify(&mint_hs256(SECRET, &s).unwrap()).is_ok());
        let other = b"another-secret-another-secret-00";
        assert_eq!(
            err(&mint_hs256(other, &s).unwrap()).message,
            "bad signature"
        );
        let mut expired = s.clone();
        expired.ttl = Duration::ZERO;
        assert_eq!(
            err(&mint_hs256(SECRET, &expired).unwrap()).code,
            Code::TokenExpired
        );
        let mut early = s.clone();
        early.not_before = Some(Duration::from_secs(3600));
        assert_eq!(
            err(&mint_hs256(SECRET, &early).unwrap()).message,
            "token not yet valid"
        );
        let mut aud = s.clone();
        aud.audience = Some("other".into());
        assert_eq!(
            err(&mint_hs256(SECRET, &aud).unwrap()).message,
            "wrong audience"
        );
        let mut no_aud = s.clone();
        no_aud.audience = None;
        assert_eq!(
            err(&mint_hs256(SECRET, &no_aud).unwrap()).message,
            "claim aud missing"
        );
        let mut kid = s.clone();
        kid.kid = Some("k9".into());
        assert!(
            err(&mint_hs256(SECRET, &kid).unwrap())
                .message
                .contains("kid k9")
        );
        // alg none: header {"alg":"none"}, payload {"sub":"a","exp":9999999999}, no signature.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(err(none).code, Code::Unauthorized);
        assert_eq!(err("garbage").code, Code::Unauthorized);
        assert!(
            err(&"a".repeat(MAX_TOKEN_LEN + 1))
                .message
                .contains("longer")
        );
    }

    #[test]
    fn rotation_by_kid() {
        let old = b"old-secret-old-secret-old-secret";
        let v = verifier(&[("old", old), ("new", SECRET)], &[]);
        let mut s = spec("a");
        s.kid = Some("old".into());
        assert!(v.verify(&mint_hs256(old, &s).unwrap()).is_ok());
        s.kid = Some("new".into());
        assert!(v.verify(&mint_hs256(SECRET, &s).unwrap()).is_ok());
        // Signed with the old secret but naming the new key: refused.
        assert!(v.verify(&mint_hs256(old, &s).unwrap()).is_err());
        // No kid: every key of the algorithm is tried.
        s.kid = None;
        assert!(v.verify(&mint_hs256(old, &s).unwrap()).is_ok());
    }

    /// A fresh folder for key files.
    fn key_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("roomcast-keys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn load_one(dir: &Path, algorithm: Algorithm, file: &str) -> anyhow::Result<Verifier> {
        let config = AuthConfig {
            keys: vec![KeyConfig {
                kid: Some("k".into()),
                algorithm,
                file: PathBuf::from(file),
            }],
            ..AuthConfig::default()
        };
        Verifier::new(&config, dir)
    }

    #[test]
    fn hmac_secrets_shorter_than_the_hash_are_refused_at_load() {
        let dir = key_dir("short");
        for (algorithm, min) in [
            (Algorithm::HS256, 32),
            (Algorithm::HS384, 48),
            (Algorithm::HS512, 64),
        ] {
            assert_eq!(algorithm.min_secret_len(), Some(min));
            let file = format!("{algorithm:?}.key");
            std::fs::write(dir.join(&file), vec![7u8; min - 1]).unwrap();
            let message = load_one(&dir, algorithm, &file).unwrap_err().to_string();
            let path = dir.join(&file);
            for needle in [
                path.display().to_string(),
                format!("{} bytes", min - 1),
                format!("an {algorithm:?} secret needs at least {min}"),
                "roomcast keygen".to_owned(),
            ] {
                assert!(
                    message.contains(&needle),
                    "{needle} missing from: {message}"
                );
            }
            std::fs::write(dir.join(&file), vec![7u8; min]).unwrap();
            let v = load_one(&dir, algorithm, &file).unwrap();
            // And a token of that algorithm verifies with it.
            let key = EncodingKey::from_secret(&vec![7u8; min]);
            assert!(v.verify(&sign(algorithm.jwt(), "k", &key)).is_ok());
        }
        assert_eq!(Algorithm::ES256.min_secret_len(), None);
    }

    #[test]
    fn a_missing_secret_names_the_keygen_command_that_creates_it() {
        let dir = key_dir("missing");
        let message = load_one(&dir, Algorithm::HS256, "dev.key")
            .unwrap_err()
            .to_string();
        let expected = format!(
            "create it with `roomcast keygen --out {}`",
            dir.join("dev.key").display()
        );
        assert!(message.contains(&expected), "{message}");
        let message = load_one(&dir, Algorithm::HS512, "dev.key")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("roomcast keygen --algorithm HS512 --out"),
            "{message}"
        );
        // A public key is not something keygen makes.
        let message = load_one(&dir, Algorithm::ES256, "ec.pem")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("ec.pem") && !message.contains("keygen"),
            "{message}"
        );
    }

    #[test]
    fn generated_secrets_have_the_hash_length_owner_only_mode_and_are_not_overwritten() {
        let dir = key_dir("keygen");
        let path = dir.join("secret.key");
        assert_eq!(
            generate_secret_file(&path, Algorithm::HS256, false).unwrap(),
            32
        );
        let first = std::fs::read(&path).unwrap();
        assert_eq!(first.len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            generate_secret_file(&path, Algorithm::HS256, false),
            Err(KeygenError::Exists(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), first, "left untouched");
        assert_eq!(
            generate_secret_file(&path, Algorithm::HS512, true).unwrap(),
            64
        );
        let second = std::fs::read(&path).unwrap();
        assert_eq!(second.len(), 64);
        assert_ne!(&second[..32], &first[..], "fresh random bytes");
        assert!(load_one(&dir, Algorithm::HS512, "secret.key").is_ok());
        assert!(matches!(
            generate_secret_file(&dir.join("x.pem"), Algorithm::ES256, false),
            Err(KeygenError::NotHmac(Algorithm::ES256))
        ));
        // Only the secret is left in the folder (no temporary file).
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn grant_flags_parse() {
        assert_eq!(
            parse_grant("bids:*=sub,pub").unwrap(),
            (
                "bids:*".to_owned(),
                vec!["sub".to_owned(), "pub".to_owned()]
            )
        );
        assert!(parse_grant("orders:1").is_err());
        assert!(parse_grant("orders:1=admin").is_err());
    }

    /// Signs `claims` with `key` under `alg` and header `kid`.
    fn sign(alg: JwtAlgorithm, kid: &str, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        let claims = RawClaims {
            sub: "s".into(),
            exp: now_secs() + 600,
            nbf: None,
            aud: None,
            iss: None,
            rooms: BTreeMap::new(),
        };
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    #[test]
    fn asymmetric_keys_and_no_algorithm_confusion() {
        install_crypto();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let dir = std::env::temp_dir().join(format!("roomcast-auth-asym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ec.pem"), ec.public_key_pem()).unwrap();
        std::fs::write(dir.join("ed.pem"), ed.public_key_pem()).unwrap();
        std::fs::write(dir.join("hs.key"), SECRET).unwrap();
        let key = |kid: &str, algorithm, file: &str| KeyConfig {
            kid: Some(kid.into()),
            algorithm,
            file: PathBuf::from(file),
        };
        let config = AuthConfig {
            keys: vec![
                key("ec", Algorithm::ES256, "ec.pem"),
                key("ed", Algorithm::EdDSA, "ed.pem"),
                key("hs", Algorithm::HS256, "hs.key"),
            ],
            ..AuthConfig::default()
        };
        let v = Verifier::new(&config, &dir).unwrap();
        let ec_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
        let ed_key = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
        assert!(v.verify(&sign(JwtAlgorithm::ES256, "ec", &ec_key)).is_ok());
        assert!(v.verify(&sign(JwtAlgorithm::EdDSA, "ed", &ed_key)).is_ok());
        // The EC public key (public knowledge) used as an HMAC secret: refused.
        let confused = EncodingKey::from_secret(ec.public_key_pem().as_bytes());
        assert!(
            v.verify(&sign(JwtAlgorithm::HS256, "ec", &confused))
                .is_err()
        );
        assert!(
            v.verify(&sign(JwtAlgorithm::HS256, "hs", &confused))
                .is_err()
        );
        // A key id of another algorithm, and another HMAC than the key's.
        assert!(v.verify(&sign(JwtAlgorithm::ES256, "ed", &ec_key)).is_err());
        let hs512 = EncodingKey::from_secret(SECRET);
        assert!(v.verify(&sign(JwtAlgorithm::HS512, "hs", &hs512)).is_err());
        // Signed by another EC key.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
        assert_eq!(
            v.verify(&sign(JwtAlgorithm::ES256, "ec", &other))
                .unwrap_err()
                .message,
            "bad signature"
        );
    }
}
