//! The broker's one typed configuration: every field with its default and unit, settable by
//! command-line flag or `ROOMCAST_*` environment variable, and the validated values it holds
//! (the NATS subject prefix). Nothing here opens sockets; it imports no other module of the
//! crate (the transports' settings are built from it where sessions are accepted).

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use roomcast_protocol::{PayloadLimits, SessionConfig};

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Broker configuration (`roomcast serve --help` prints the same text).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// TCP address for HTTP and WebSocket (`/ws`). Port 0 picks a free port; the bound
    /// address is logged.
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,

    /// Largest frame accepted from a client, in bytes.
    #[arg(long, env = "ROOMCAST_MAX_FRAME_SIZE", default_value_t = 64 * 1024)]
    pub max_frame_size: usize,

    /// Deepest nesting of arrays, maps and tags allowed in an event payload.
    #[arg(long, env = "ROOMCAST_MAX_PAYLOAD_DEPTH", default_value_t = 32)]
    pub max_payload_depth: usize,

    /// Most rooms one session may be subscribed to.
    #[arg(long, env = "ROOMCAST_MAX_SUBSCRIPTIONS", default_value_t = 1024)]
    pub max_subscriptions: usize,

    /// Interval at which clients should ping when otherwise silent (told in Welcome).
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", default_value = "25s", value_parser = duration)]
    pub ping_interval: Duration,

    /// Silence after which a session is closed with `timeout`.
    #[arg(long, env = "ROOMCAST_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// Time allowed between connect and Hello.
    #[arg(long, env = "ROOMCAST_HELLO_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub hello_timeout: Duration,

    /// Byte cap of each session's outbound queue; a session exceeding it is closed with
    /// `slow_consumer` (volatile rooms drop their oldest events instead; conflating rooms keep
    /// the latest per key from half of it on). Memory is only used while frames wait.
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE_BYTES", default_value_t = 512 * 1024)]
    pub outbound_queue_bytes: usize,

    /// On shutdown, how long sessions get to receive their Close frame before being dropped
    /// (counted after the drain window).
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// On shutdown, sessions are closed (with `shutting_down`, reconnect) at random moments
    /// spread over this window, each told to wait a further random 0–500 ms before
    /// reconnecting, so their reconnects do not hit the other nodes at once. They keep being
    /// served until their moment. `0s` closes every session at once.
    #[arg(long, env = "ROOMCAST_DRAIN_WINDOW", default_value = "5s", value_parser = duration)]
    pub drain_window: Duration,

    /// Default history of reliable rooms, in events (0: no history, no recovery). A namespace
    /// of the `--config` file may set its own (`history_events`).
    #[arg(long, env = "ROOMCAST_HISTORY_EVENTS", default_value_t = 256)]
    pub history_events: usize,

    /// Default history of reliable rooms, in bytes of encoded events per room (the newest
    /// event is always kept).
    #[arg(long, env = "ROOMCAST_HISTORY_BYTES", default_value_t = 128 * 1024)]
    pub history_bytes: usize,

    /// Default age limit of a room's history; a room without subscribers is kept this long
    /// after its newest event so a returning client can recover.
    #[arg(long, env = "ROOMCAST_HISTORY_TTL", default_value = "5m", value_parser = duration)]
    pub history_ttl: Duration,

    /// Bytes all room histories together may hold (embedded mode); beyond it rooms give up
    /// their oldest events first.
    #[arg(long, env = "ROOMCAST_HISTORY_MEMORY", default_value_t = 256 << 20)]
    pub history_memory: usize,

    /// How long a publish's idempotency key is remembered in its room (0s: keys are ignored).
    #[arg(long, env = "ROOMCAST_DEDUP_WINDOW", default_value = "2m", value_parser = duration)]
    pub dedup_window: Duration,

    /// Namespaces whose rooms are volatile (comma-separated, e.g. `ticker,gps`): their events
    /// travel as QUIC datagrams on WebTransport when they fit, may be lost, and are dropped
    /// oldest-first instead of closing a subscriber that falls behind.
    #[arg(long, env = "ROOMCAST_VOLATILE_NAMESPACES", value_delimiter = ',')]
    pub volatile_namespaces: Vec<String>,

    /// Carry every room's frames on the WebTransport control stream instead of one stream per
    /// room: reintroduces head-of-line blocking across rooms; for measurements only.
    #[arg(long, env = "ROOMCAST_WT_SINGLE_STREAM")]
    pub wt_single_stream: bool,

    /// Do not listen for WebTransport (QUIC on UDP at the same port as `--listen`).
    #[arg(long, env = "ROOMCAST_NO_WEBTRANSPORT")]
    pub no_webtransport: bool,

    /// Development only: serve the static files of this folder at `/` (e.g. `examples/browser`)
    /// and, at `/dev-ui.js`, the WebTransport certificate hash for the page to pin.
    #[arg(long, env = "ROOMCAST_DEV_UI", value_name = "DIR")]
    pub dev_ui: Option<PathBuf>,

    /// PEM certificate chain for QUIC. Without it (and `--tls-key`) the broker generates an
    /// in-memory development certificate valid 13 days and serves its hash at `/cert-hash`.
    #[arg(long, env = "ROOMCAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching `--tls-cert`.
    #[arg(long, env = "ROOMCAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// WebSocket read buffer per session, in bytes (grows to the size of a large frame while
    /// one is being read).
    #[arg(long, env = "ROOMCAST_WS_READ_BUFFER", default_value_t = 512)]
    pub ws_read_buffer: usize,

    /// API key for `POST /api/publish` (sent as `Authorization: Bearer <key>`). Without it the
    /// publish endpoint is off (404).
    #[arg(long, env = "ROOMCAST_API_KEY")]
    pub api_key: Option<Secret>,

    /// Security configuration file (TOML): auth keys, namespace policy, rate limits; see
    /// docs/SECURITY.md and `roomcast config check FILE`. Without it every namespace is open,
    /// no token is required and the default limits apply.
    #[arg(long, env = "ROOMCAST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Cluster mode over NATS (off unless `--nats` is given).
    #[command(flatten)]
    pub cluster: ClusterConfig,
}

/// A configuration value that must not appear in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Cluster mode: rooms map to NATS subjects and events travel between nodes through NATS.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Cluster (NATS)")]
pub struct ClusterConfig {
    /// NATS server URLs, comma-separated (e.g. `nats://10.0.0.1:4222,nats://10.0.0.2:4222`;
    /// `tls://` forces TLS). Turns cluster mode on; without it the broker is a single node.
    #[arg(long = "nats", env = "ROOMCAST_NATS", value_delimiter = ',')]
    pub nats: Vec<String>,

    /// This node's id, sent as the `Roomcast-Origin` header and as the NATS connection name.
    /// Default: `node-` and a random hex number chosen at start.
    #[arg(long, env = "ROOMCAST_NODE_ID")]
    pub node_id: Option<String>,

    /// First tokens of every room subject (`<prefix>.<namespace>.<encoded rest>`).
    #[arg(long, env = "ROOMCAST_NATS_SUBJECT_PREFIX", default_value = "roomcast")]
    pub nats_subject_prefix: SubjectPrefix,

    /// NATS authentication token.
    #[arg(long, env = "ROOMCAST_NATS_TOKEN")]
    pub nats_token: Option<Secret>,

    /// NATS user name (with `--nats-password`).
    #[arg(long, env = "ROOMCAST_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,

    /// NATS password (with `--nats-user`).
    #[arg(long, env = "ROOMCAST_NATS_PASSWORD", requires = "nats_user")]
    pub nats_password: Option<Secret>,

    /// NATS credentials file (JWT and NKey seed, as written by `nsc`).
    #[arg(long, env = "ROOMCAST_NATS_CREDENTIALS")]
    pub nats_credentials: Option<PathBuf>,

    /// PEM file of CA certificates to trust for the NATS server; implies TLS.
    #[arg(long, env = "ROOMCAST_NATS_CA")]
    pub nats_ca: Option<PathBuf>,

    /// PEM client certificate for NATS mutual TLS (with `--nats-tls-key`).
    #[arg(long, env = "ROOMCAST_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,

    /// PEM private key of `--nats-tls-cert`.
    #[arg(long, env = "ROOMCAST_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,

    /// Require TLS to NATS even without `--nats-ca` (system roots).
    #[arg(long, env = "ROOMCAST_NATS_REQUIRE_TLS")]
    pub nats_require_tls: bool,

    /// Do not keep room history in JetStream: reliable rooms go over core NATS, their
    /// `Subscribed` carries epoch 0 and nothing can be recovered. By default every reliable
    /// namespace has a stream `<prefix>_<namespace>` (created on first use; the NATS server
    /// must have JetStream enabled) sized by the history settings.
    #[arg(long, env = "ROOMCAST_NO_NATS_HISTORY")]
    pub no_nats_history: bool,

    /// Replicas of each history stream (JetStream clusters: 3 survives a NATS server loss;
    /// a single NATS server: 1). Applies when a stream is created.
    #[arg(long, env = "ROOMCAST_NATS_HISTORY_REPLICAS", default_value_t = 1)]
    pub nats_history_replicas: usize,

    /// How long a node keeps a room's subscription after the room's last local subscriber
    /// left, so a quick re-subscribe does not cost an UNSUB/SUB round.
    #[arg(long, env = "ROOMCAST_NATS_INTEREST_LINGER", default_value = "1s", value_parser = duration)]
    pub nats_interest_linger: Duration,

    /// Events waiting to be handed to NATS, in messages. A publish that finds it full gets
    /// `unavailable`. Memory: at most this many events (each at most `--max-frame-size`).
    #[arg(long, env = "ROOMCAST_NATS_PUBLISH_QUEUE", default_value_t = 8192)]
    pub nats_publish_queue: usize,

    /// Messages NATS may buffer per room subscription before the node is a NATS slow consumer
    /// (messages dropped, counted in `roomcast_nats_slow_consumers_total`).
    #[arg(
        long,
        env = "ROOMCAST_NATS_SUBSCRIPTION_CAPACITY",
        default_value_t = 4096
    )]
    pub nats_subscription_capacity: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            node_id: None,
            nats_subject_prefix: SubjectPrefix::default(),
            nats_token: None,
            nats_user: None,
            nats_password: None,
            nats_credentials: None,
            nats_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_require_tls: false,
            no_nats_history: false,
            nats_history_replicas: 1,
            nats_interest_linger: Duration::from_secs(1),
            nats_publish_queue: 8192,
            nats_subscription_capacity: 4096,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let session = SessionConfig::default();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            max_frame_size: session.max_frame_size,
            max_payload_depth: session.payload.max_depth,
            max_subscriptions: session.max_subscriptions,
            ping_interval: session.ping_interval,
            idle_timeout: session.idle_timeout,
            hello_timeout: session.hello_timeout,
            outbound_queue_bytes: 512 * 1024,
            drain_timeout: Duration::from_secs(5),
            drain_window: Duration::from_secs(5),
            history_events: 256,
            history_bytes: 128 * 1024,
            history_ttl: Duration::from_secs(300),
            history_memory: 256 << 20,
            dedup_window: Duration::from_secs(120),
            ws_read_buffer: 512,
            volatile_namespaces: Vec::new(),
            wt_single_stream: false,
            no_webtransport: false,
            dev_ui: None,
            tls_cert: None,
            tls_key: None,
            api_key: None,
            config: None,
            cluster: ClusterConfig::default(),
        }
    }
}

impl Config {
    /// The per-session protocol settings.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            max_frame_size: self.max_frame_size,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            hello_timeout: self.hello_timeout,
            max_subscriptions: self.max_subscriptions,
            payload: PayloadLimits {
                max_depth: self.max_payload_depth,
            },
        }
    }

    /// Refuses timer settings that cannot work together, and lists those that work badly
    /// (for the log and `config check`). Called before anything is bound.
    pub fn check(&self) -> Result<Vec<ConfigWarning>, ConfigError> {
        for (flag, value) in [
            ("ping-interval", self.ping_interval),
            ("idle-timeout", self.idle_timeout),
            ("hello-timeout", self.hello_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroTimer(flag));
            }
        }
        if self.ping_interval >= self.idle_timeout {
            return Err(ConfigError::PingNotBeforeIdle {
                ping: self.ping_interval,
                idle: self.idle_timeout,
            });
        }
        let mut warnings = Vec::new();
        if self.ping_interval > self.idle_timeout / 2 {
            warnings.push(ConfigWarning::LatePing {
                ping: self.ping_interval,
                idle: self.idle_timeout,
            });
        }
        if self.outbound_queue_bytes < self.max_frame_size {
            warnings.push(ConfigWarning::QueueBelowFrame {
                queue: self.outbound_queue_bytes,
                frame: self.max_frame_size,
            });
        }
        if self.history_events > 0 && self.dedup_window > self.history_ttl {
            warnings.push(ConfigWarning::DedupBeyondHistory {
                dedup: self.dedup_window,
                ttl: self.history_ttl,
            });
        }
        Ok(warnings)
    }
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// The default NATS subject prefix.
pub const DEFAULT_PREFIX: &str = "roomcast";

/// Why a subject prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "NATS subject prefix must be one or more '.'-separated non-empty tokens of A-Z a-z 0-9 _ - (at most 64 bytes), got {0:?}"
)]
pub struct BadPrefix(pub String);

/// A validated NATS subject prefix (`--nats-subject-prefix`; the subject rule is
/// `cluster::subject`'s): `.`-separated tokens of `A-Z a-z 0-9 _ -`, at most 64 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectPrefix(String);

impl SubjectPrefix {
    /// Validates `prefix`.
    pub fn new(prefix: &str) -> Result<Self, BadPrefix> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if ok {
            Ok(SubjectPrefix(prefix.to_owned()))
        } else {
            Err(BadPrefix(prefix.to_owned()))
        }
    }

    /// The prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SubjectPrefix {
    fn default() -> Self {
        SubjectPrefix(DEFAULT_PREFIX.to_owned())
    }
}

impl fmt::Debug for SubjectPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for SubjectPrefix {
    type Err = BadPrefix;
    fn from_str(s: &str) -> Result<Self, BadPrefix> {
        SubjectPrefix::new(s)
    }
}

/// Settings that cannot work together: the broker refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A timer of zero length.
    #[error("--{0} must be longer than 0s")]
    ZeroTimer(&'static str),
    /// Clients would ping only after the broker closed them for silence.
    #[error(
        "--ping-interval ({}) must be shorter than --idle-timeout ({}): clients ping after \
         ping-interval of silence and the broker closes sessions silent for idle-timeout, so \
         quiet sessions would be closed; keep ping-interval at most half of idle-timeout \
         (the defaults are 25s and 60s)",
        human(*ping),
        human(*idle)
    )]
    PingNotBeforeIdle {
        /// `--ping-interval`.
        ping: Duration,
        /// `--idle-timeout`.
        idle: Duration,
    },
}

/// Settings that work, but badly: logged at start and printed by `config check`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWarning {
    /// One late or lost ping closes a quiet session.
    #[error(
        "--ping-interval ({}) is more than half of --idle-timeout ({}): one delayed ping \
         closes a quiet session",
        human(*ping),
        human(*idle)
    )]
    LatePing {
        /// `--ping-interval`.
        ping: Duration,
        /// `--idle-timeout`.
        idle: Duration,
    },
    /// One event of the largest accepted size overflows a subscriber's queue.
    #[error(
        "--outbound-queue-bytes ({queue}) is below --max-frame-size ({frame}): an event of \
         the largest accepted size closes every subscriber as a slow consumer"
    )]
    QueueBelowFrame {
        /// `--outbound-queue-bytes`.
        queue: usize,
        /// `--max-frame-size`.
        frame: usize,
    },
    /// Keys outlive the history they deduplicate against.
    #[error(
        "--dedup-window ({}) is longer than --history-ttl ({}): in cluster mode the stream's \
         duplicate window is cut to the history's age",
        human(*dedup),
        human(*ttl)
    )]
    DedupBeyondHistory {
        /// `--dedup-window`.
        dedup: Duration,
        /// `--history-ttl`.
        ttl: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flag_defaults_match_default_impl() {
        let parsed = Cli::parse_from(["roomcast"]).config;
        let default = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
    }

    #[test]
    fn timers_that_cannot_work_together_are_refused() {
        let parse = |args: &[&str]| {
            let mut all = vec!["roomcast"];
            all.extend_from_slice(args);
            Cli::parse_from(all).config.check()
        };
        assert_eq!(parse(&[]), Ok(vec![]));
        let refused = parse(&["--idle-timeout", "2s", "--ping-interval", "10s"]).unwrap_err();
        assert!(matches!(refused, ConfigError::PingNotBeforeIdle { .. }));
        let text = refused.to_string();
        assert!(
            text.contains("--ping-interval (10s)") && text.contains("(2s)"),
            "{text}"
        );
        assert!(parse(&["--idle-timeout", "10s", "--ping-interval", "10s"]).is_err());
        assert_eq!(
            parse(&["--hello-timeout", "0s"]),
            Err(ConfigError::ZeroTimer("hello-timeout"))
        );
        let warned = parse(&["--idle-timeout", "10s", "--ping-interval", "8s"]).unwrap();
        assert!(matches!(warned[..], [ConfigWarning::LatePing { .. }]));
        let warned = parse(&["--outbound-queue-bytes", "1000"]).unwrap();
        assert!(matches!(
            warned[..],
            [ConfigWarning::QueueBelowFrame { .. }]
        ));
        let warned = parse(&["--dedup-window", "10m"]).unwrap();
        assert!(matches!(
            warned[..],
            [ConfigWarning::DedupBeyondHistory { .. }]
        ));
    }

    #[test]
    fn durations_and_port_zero_parse() {
        let parsed = Cli::parse_from([
            "roomcast",
            "--listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "1m 30s",
        ])
        .config;
        assert_eq!(parsed.listen.port(), 0);
        assert_eq!(parsed.idle_timeout, Duration::from_secs(90));
    }

    #[test]
    fn cluster_flags_parse_and_secrets_stay_out_of_debug() {
        let parsed = Cli::parse_from([
            "roomcast",
            "--nats",
            "nats://a:4222,nats://b:4222",
            "--node-id",
            "edge-fra-1",
            "--nats-subject-prefix",
            "eu.rc",
            "--nats-token",
            "hunter2",
            "--api-key",
            "k3y",
        ])
        .config;
        assert_eq!(parsed.cluster.nats, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(parsed.cluster.nats_subject_prefix.as_str(), "eu.rc");
        assert_eq!(parsed.api_key, Some(Secret("k3y".into())));
        let debug = format!("{parsed:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("k3y"),
            "{debug}"
        );
        assert!(
            Cli::try_parse_from(["roomcast", "--nats-subject-prefix", "a.*"]).is_err(),
            "wildcards are refused in the prefix"
        );
    }
}
