//! The node: the state one broker process shares between its listeners, HTTP handlers and
//! sessions ([`Shared`]: configuration, hub, cluster bridge, metrics, security, the served
//! certificates, shutdown and the task tracker), and how it is built from the configuration
//! (room rules, security).
//!
//! Owns no listener and no session: it imports no listener, API, admission or session module,
//! so every one of those can import it.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use crate::{
    certs::CertInfo,
    cluster::{Bridge, InProcess, nats::NatsBridge},
    config::Config,
    conflation::KeyPath,
    gate::Security,
    hub::{HistoryLimits, Hub, RoomRule, RoomRules, SessionKey},
    metrics::Metrics,
    policy::NamespacePolicy,
};

/// State shared by the HTTP handlers and every session of one broker.
pub struct Shared {
    /// The configuration the broker started with.
    pub config: Config,
    /// The local room registry.
    pub hub: Arc<Hub>,
    /// Where publishes go: the local hub (single node) or NATS (cluster mode).
    pub bridge: Arc<dyn Bridge>,
    /// The NATS bridge in cluster mode.
    pub nats: Option<Arc<NatsBridge>>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Cancelled when the broker starts shutting down.
    pub shutdown: CancellationToken,
    /// Set soon after `shutdown` is cancelled (by [`crate::serve`]'s watcher): a load, where
    /// `is_cancelled` takes a lock. Busy sessions look at it on every turn of their loop.
    pub shutting_down: AtomicBool,
    /// Tracks every connection and session task, for the drain.
    pub tracker: TaskTracker,
    /// Distinguishes this process's session ids from another run's.
    pub boot_id: u64,
    /// The certificate QUIC serves (`None` while WebTransport is off).
    pub cert: RwLock<Option<CertInfo>>,
    /// TLS for the TCP port (HTTPS, WSS) when certificate files are configured.
    pub tcp_tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Token verifier, namespace policy and limits (`--config`, or the open default).
    pub security: Arc<Security>,
    next_session: AtomicU64,
}

/// The security configuration of `config`: its `--config` file, or the open default. Warns
/// loudly when a non-loopback address is served without required tokens.
pub fn load_security(config: &Config) -> anyhow::Result<Security> {
    let security = match &config.config {
        Some(path) => Security::load(path)?,
        None => Security::open(),
    };
    if let Some(warning) = exposure_warning(config, &security) {
        warn!(listen = %config.listen, "{warning}");
    }
    Ok(security)
}

/// The warning for a broker reachable beyond this machine without required tokens.
pub fn exposure_warning(config: &Config, security: &Security) -> Option<&'static str> {
    (!config.listen.ip().is_loopback() && !security.verifier.required).then_some(
        "SECURITY: serving a non-loopback address without required authentication: anyone \
         who reaches this port may open sessions. Set [auth] required = true in --config.",
    )
}

/// How the hub treats each namespace: `--volatile-namespaces`, the history and dedup flags,
/// and the `--config` file's namespace sections (which override the flags).
fn room_rules(config: &Config, security: &Security) -> RoomRules {
    // Cluster mode keeps history in JetStream (one stream per namespace) unless turned off;
    // a node's own memory never does (events reach a node only while it has subscribers).
    let clustered = !config.cluster.nats.is_empty();
    let sequenced = clustered && !config.cluster.no_nats_history;
    let merge = |base: &RoomRule, policy: Option<&NamespacePolicy>| -> RoomRule {
        let Some(p) = policy else {
            return base.clone();
        };
        if p.volatile {
            return RoomRule::VOLATILE;
        }
        let mut rule = base.clone();
        // Checked when the file was loaded; volatile rooms never conflate.
        rule.conflate = p
            .conflate
            .as_deref()
            .and_then(|path| KeyPath::parse(path).ok())
            .map(Arc::new);
        if rule.history.is_on() {
            rule.history.events = p.history_events.unwrap_or(rule.history.events);
            rule.history.bytes = p.history_bytes.unwrap_or(rule.history.bytes);
            if let Some(secs) = p.history_ttl_secs {
                rule.history.ttl = Duration::from_secs(secs);
            }
        }
        if let Some(secs) = p.dedup_window_secs {
            rule.dedup_window = Duration::from_secs(secs);
        }
        rule
    };
    let base = RoomRule {
        volatile: false,
        history: if clustered && !sequenced {
            HistoryLimits::OFF
        } else {
            HistoryLimits {
                events: config.history_events,
                bytes: config.history_bytes,
                ttl: config.history_ttl,
            }
        },
        dedup_window: config.dedup_window,
        sequenced,
        conflate: None,
    };
    let file = &security.file;
    let mut rules = RoomRules {
        default: merge(&base, file.default.as_ref()),
        namespaces: HashMap::new(),
        history_budget: config.history_memory,
    };
    for ns in &config.volatile_namespaces {
        rules.namespaces.insert(ns.clone(), RoomRule::VOLATILE);
    }
    for (ns, policy) in file.namespaces() {
        // Volatile by flag or by file: either makes it volatile.
        rules
            .namespaces
            .entry(ns.to_owned())
            .or_insert_with(|| merge(&base, Some(policy)));
    }
    rules
}

impl Shared {
    /// Fresh state for a broker with `config` and the open security default.
    pub fn new(config: Config) -> Self {
        Self::with_security(config, Security::open())
    }

    /// Fresh state for a broker with `config` and `security`.
    pub fn with_security(config: Config, security: Security) -> Self {
        let boot_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let metrics = Metrics::new();
        let rules = room_rules(&config, &security);
        // The NATS bridge first: the hub tells it of interest.
        let nats = (!config.cluster.nats.is_empty()).then(|| {
            Arc::new(NatsBridge::new(
                &config.cluster,
                rules.clone(),
                &metrics,
                boot_id,
            ))
        });
        let hub = Arc::new(
            Hub::with_rules(rules, nats.as_ref().map(|nats| nats.interest()))
                .count_conflated_in(metrics.conflated.clone()),
        );
        let bridge: Arc<dyn Bridge> = match &nats {
            Some(nats) => nats.clone(),
            None => Arc::new(InProcess::new(hub.clone())),
        };
        Shared {
            hub,
            security: Arc::new(security),
            bridge,
            nats,
            config,
            metrics,
            shutdown: CancellationToken::new(),
            shutting_down: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            boot_id,
            cert: RwLock::new(None),
            tcp_tls: RwLock::new(None),
            next_session: AtomicU64::new(1),
        }
    }

    /// A process-unique key for a new session.
    pub fn next_session_key(&self) -> SessionKey {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the node should receive traffic: not shutting down, and (cluster mode)
    /// connected to NATS, with JetStream when rooms keep history.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.bridge.not_ready().is_none()
    }

    /// Connects the cluster bridge (cluster mode only); its tasks end with the broker.
    pub(crate) async fn start_cluster(&self) -> anyhow::Result<()> {
        if let Some(nats) = &self.nats {
            let session = self.config.session();
            nats.start(
                self.hub.clone(),
                &self.metrics,
                session.payload,
                self.config.max_frame_size,
                self.config.outbound_queue_bytes,
                self.shutdown.clone(),
            )
            .await?;
        }
        Ok(())
    }

    /// Resolves when the listeners close: a drain window after shutdown began. Until then a
    /// draining node still answers, so that a load balancer sees `/readyz` fail (503) and new
    /// session requests are refused with a status (503 + `Retry-After` on WebSocket, 429 on
    /// WebTransport) rather than with a refused connection.
    pub(crate) async fn listeners_closed(&self) {
        self.shutdown.cancelled().await;
        tokio::time::sleep(self.config.drain_window).await;
    }

    /// Metrics text, with the registry gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        self.metrics.rooms.set(self.hub.room_count() as i64);
        self.metrics
            .history_bytes
            .set(self.hub.history_bytes() as i64);
        self.metrics
            .subscriptions
            .set(self.hub.subscription_count() as i64);
        self.metrics.render()
    }
}
