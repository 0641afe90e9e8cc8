//! The broker's one typed configuration: every field with its default and unit, settable by
//! command-line flag or `ROOMCAST_*` environment variable. Nothing here opens sockets.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use roomcast_protocol::{PayloadLimits, SessionConfig};

use crate::transport::ws::WsSettings;

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
    /// `slow_consumer`. Memory is only used while frames wait.
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE_BYTES", default_value_t = 512 * 1024)]
    pub outbound_queue_bytes: usize,

    /// On shutdown, how long sessions get to receive their Close frame before being dropped.
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,

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
            ws_read_buffer: 512,
            volatile_namespaces: Vec::new(),
            wt_single_stream: false,
            no_webtransport: false,
            tls_cert: None,
            tls_key: None,
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

    /// WebSocket buffer settings.
    pub fn ws(&self) -> WsSettings {
        WsSettings {
            read_buffer: self.ws_read_buffer,
            max_message: self.max_frame_size,
        }
    }
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
}
