//! Rate limits and caps: per-session token buckets (publishes, publish bytes, subscribe
//! operations, datagrams, and the error budget that turns repeated violations into a close),
//! per-namespace publish buckets for namespaces whose policy sets its own publish rates
//! ([`PublishRates`], [`PublishScope`]), the per-user publish budgets that outlive sessions
//! ([`PublishBudgets`]: by the token's `sub`, by client address for sessions without a user),
//! per-IP connection rate and concurrency, and the global session cap.
//!
//! Buckets are governor's GCRA limiters; nothing here hand-rolls one. This module owns the
//! `[limits]` section of the configuration file and the counters; it decides nothing about
//! rooms or tokens (which namespace's rates apply is [`crate::policy`]'s answer) and never
//! touches sockets. Memory: a session's limiters are created on first use (a few dozen bytes
//! each; at most one pair per configured namespace); the per-IP maps hold an entry only per
//! address with a live session or a recent connection attempt, and the per-user budgets one
//! per user or address that published recently; both are pruned as they grow, and capped.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, MonotonicClock},
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};
use roomcast_protocol::{Code, session::Refusal};
use serde::{Deserialize, Serialize};

/// The `[limits]` section; every rate is per second, every burst the bucket's depth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Publishes per second one session may send (sustained). Default 10000.
    pub publish_per_second: u32,
    /// Publishes one session may send at once. Default 10000.
    pub publish_burst: u32,
    /// Payload bytes per second one session may publish. Default 64 MiB.
    pub publish_bytes_per_second: u32,
    /// Payload bytes one session may publish at once; at least the frame size limit, or large
    /// publishes could never pass. Default 64 MiB.
    pub publish_bytes_burst: u32,
    /// Subscribe and unsubscribe operations per second per session. Default 1000.
    pub subscribe_per_second: u32,
    /// Subscribe and unsubscribe operations one session may send at once. Default 2000.
    pub subscribe_burst: u32,
    /// Frames per second one session may send as QUIC datagrams (not flow-controlled by
    /// QUIC), counted on top of the publish limits. Default 10000.
    pub datagrams_per_second: u32,
    /// Datagrams one session may send at once. Default 10000.
    pub datagram_burst: u32,
    /// Request errors (`Error` frames of any code, `rate_limited` included) a session may
    /// receive per `error_window_secs` before it is closed with `policy_violation`. Default
    /// 100.
    pub error_budget: u32,
    /// The window of the error budget, seconds. Default 10.
    pub error_window_secs: u32,
    /// Sessions the broker holds at most; beyond, session requests are refused (HTTP 503 /
    /// WebTransport 429) before anything is allocated. Default 100000.
    pub max_sessions: u32,
    /// Concurrent sessions per client IP address. Default 1000.
    pub per_ip_sessions: u32,
    /// New session requests per second per client IP address. Default 200.
    pub per_ip_connects_per_second: u32,
    /// New session requests one IP address may make at once. Default 400.
    pub per_ip_connect_burst: u32,
    /// Loopback clients (127.0.0.0/8, ::1: local tools, tests, load generators) are not
    /// subject to the per-address caps (nor, without a user, to a per-address publish
    /// budget). Default true.
    pub per_ip_exempt_loopback: bool,
    /// Publishes per second one user (the token's `sub`; a client address for sessions
    /// without a user) may send over all its sessions on this node, reconnects included.
    /// Default: [`USER_BUDGET_SESSIONS`] times the largest per-session publish rate (of
    /// `[limits]` and of any namespace with its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_publish_per_second: Option<u32>,
    /// Publishes one user may send at once over all its sessions on this node. Default:
    /// [`USER_BUDGET_SESSIONS`] times the largest per-session publish burst.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_publish_burst: Option<u32>,
}

/// How many sessions at full publish rate the default per-user budget covers.
pub(crate) const USER_BUDGET_SESSIONS: u32 = 4;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            publish_per_second: 10_000,
            publish_burst: 10_000,
            publish_bytes_per_second: 64 << 20,
            publish_bytes_burst: 64 << 20,
            subscribe_per_second: 1000,
            subscribe_burst: 2000,
            datagrams_per_second: 10_000,
            datagram_burst: 10_000,
            error_budget: 100,
            error_window_secs: 10,
            max_sessions: 100_000,
            per_ip_sessions: 1000,
            per_ip_connects_per_second: 200,
            per_ip_connect_burst: 400,
            per_ip_exempt_loopback: true,
            user_publish_per_second: None,
            user_publish_burst: None,
        }
    }
}

/// A `[limits]` rate, burst or cap of 0 (its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limits.{0} must be at least 1")]
pub struct ZeroLimit(pub &'static str);

fn nonzero(name: &'static str, value: u32) -> Result<NonZeroU32, ZeroLimit> {
    NonZeroU32::new(value).ok_or(ZeroLimit(name))
}

impl LimitsConfig {
    pub(crate) fn check(&self) -> Result<(), ZeroLimit> {
        for (name, value) in [
            ("publish_per_second", self.publish_per_second),
            ("publish_burst", self.publish_burst),
            ("publish_bytes_per_second", self.publish_bytes_per_second),
            ("publish_bytes_burst", self.publish_bytes_burst),
            ("subscribe_per_second", self.subscribe_per_second),
            ("subscribe_burst", self.subscribe_burst),
            ("datagrams_per_second", self.datagrams_per_second),
            ("datagram_burst", self.datagram_burst),
            ("error_budget", self.error_budget),
            ("error_window_secs", self.error_window_secs),
            ("max_sessions", self.max_sessions),
            ("per_ip_sessions", self.per_ip_sessions),
            (
                "per_ip_connects_per_second",
                self.per_ip_connects_per_second,
            ),
            ("per_ip_connect_burst", self.per_ip_connect_burst),
        ] {
            nonzero(name, value)?;
        }
        for (name, value) in [
            ("user_publish_per_second", self.user_publish_per_second),
            ("user_publish_burst", self.user_publish_burst),
        ] {
            if let Some(value) = value {
                nonzero(name, value)?;
            }
        }
        Ok(())
    }

    /// The per-user publish budget, `(per second, burst)`: as configured, else
    /// [`USER_BUDGET_SESSIONS`] times `largest`, the largest per-session publish rates of any
    /// scope (see [`crate::policy::FileConfig::user_publish_quota`]).
    pub fn user_publish_quota(&self, largest: PublishRates) -> (u32, u32) {
        (
            self.user_publish_per_second
                .unwrap_or(largest.per_second.saturating_mul(USER_BUDGET_SESSIONS)),
            self.user_publish_burst
                .unwrap_or(largest.burst.saturating_mul(USER_BUDGET_SESSIONS)),
        )
    }

    /// The session-wide publish rates.
    pub fn publish_rates(&self) -> PublishRates {
        PublishRates {
            per_second: self.publish_per_second,
            burst: self.publish_burst,
            bytes_per_second: self.publish_bytes_per_second,
            bytes_burst: self.publish_bytes_burst,
        }
    }

    fn quota(rate: u32, burst: u32) -> Quota {
        // Checked non-zero at load; `max(1)` keeps a hand-built config from panicking.
        Quota::per_second(NonZeroU32::MIN.saturating_add(rate.saturating_sub(1)))
            .allow_burst(NonZeroU32::MIN.saturating_add(burst.saturating_sub(1)))
    }

    fn error_quota(&self) -> Quota {
        let budget = self.error_budget.max(1);
        let window = Duration::from_secs(u64::from(self.error_window_secs.max(1)));
        Quota::with_period(window / budget)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN.saturating_add(budget - 1))
    }
}

/// The four publish limits of one bucket pair: messages and payload bytes, each a rate per
/// second and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRates {
    /// Publishes per second (sustained).
    pub per_second: u32,
    /// Publishes at once.
    pub burst: u32,
    /// Payload bytes per second.
    pub bytes_per_second: u32,
    /// Payload bytes at once.
    pub bytes_burst: u32,
}

/// Which buckets a publish draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishScope<'a> {
    /// The session's `[limits]` buckets.
    Session,
    /// The buckets of a namespace whose policy sets its own publish rates (`None`: the
    /// `[default]` policy's, shared by every namespace it covers), instead of the session's.
    Namespace(Option<&'a str>, PublishRates),
}

type NoOp = NoOpMiddleware<std::time::Instant>;
type Direct = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOp>;

fn direct(quota: Quota) -> Direct {
    RateLimiter::direct_with_clock(quota, MonotonicClock)
}

/// A publish bucket pair: messages, and payload bytes (made on the first non-empty publish).
#[derive(Debug)]
struct PublishBuckets {
    rates: PublishRates,
    publish: Direct,
    bytes: Option<Direct>,
}

impl PublishBuckets {
    fn new(rates: PublishRates) -> Self {
        PublishBuckets {
            rates,
            publish: direct(LimitsConfig::quota(rates.per_second, rates.burst)),
            bytes: None,
        }
    }

    /// Takes one publish of `bytes` payload bytes (`scope` names the namespace in refusals).
    fn spend(&mut self, bytes: usize, scope: Option<&str>) -> Result<(), Refusal> {
        let clock = MonotonicClock;
        let rates = self.rates;
        let limited = |wait: Duration| {
            let refusal = retry_after(wait);
            match scope {
                Some(namespace) => Refusal {
                    message: format!("namespace {namespace}: {}", refusal.message),
                    ..refusal
                },
                None => refusal,
            }
        };
        if let Err(not_until) = self.publish.check() {
            return Err(limited(not_until.wait_time_from(clock.now())));
        }
        let Some(n) = u32::try_from(bytes).ok().and_then(NonZeroU32::new) else {
            return if bytes == 0 {
                Ok(())
            } else {
                Err(too_large(bytes, rates.bytes_burst))
            };
        };
        let limiter = self.bytes.get_or_insert_with(|| {
            direct(LimitsConfig::quota(
                rates.bytes_per_second,
                rates.bytes_burst,
            ))
        });
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(limited(not_until.wait_time_from(clock.now()))),
            Err(_) => Err(too_large(bytes, rates.bytes_burst)),
        }
    }
}

/// What a session may spend; one per session, each bucket made on first use.
#[derive(Debug)]
pub(crate) struct SessionLimits {
    config: Arc<LimitsConfig>,
    // Buckets are boxed and made on first use: an idle session carries pointers, not buckets.
    publish: Option<Box<PublishBuckets>>,
    /// Publish buckets of namespaces with their own rates, by namespace (`None`: the
    /// `[default]` policy's); at most one per configured namespace.
    namespaces: Vec<(Option<Box<str>>, PublishBuckets)>,
    subscribe: Option<Box<Direct>>,
    datagrams: Option<Box<Direct>>,
    errors: Option<Box<Direct>>,
}

/// Which bucket a request draws from (publishes: [`SessionLimits::spend_publish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spend {
    /// One subscribe or unsubscribe.
    Subscribe,
    /// One frame received as a datagram.
    Datagram,
}

fn retry_after(wait: Duration) -> Refusal {
    let ms = wait.as_millis().max(1);
    Refusal::new(
        Code::RateLimited,
        format!("rate limited; retry after {ms} ms"),
    )
    .retry_after(wait)
}

impl SessionLimits {
    /// Fresh buckets (all full) under `config`.
    pub(crate) fn new(config: Arc<LimitsConfig>) -> Self {
        SessionLimits {
            config,
            publish: None,
            namespaces: Vec::new(),
            subscribe: None,
            datagrams: None,
            errors: None,
        }
    }

    /// Takes one publish of `bytes` payload bytes from the buckets of `scope`, or refuses
    /// like [`Self::spend`].
    pub(crate) fn spend_publish(
        &mut self,
        scope: PublishScope<'_>,
        bytes: usize,
    ) -> Result<(), Refusal> {
        let refused = match scope {
            PublishScope::Session => {
                let config = &self.config;
                self.publish
                    .get_or_insert_with(|| Box::new(PublishBuckets::new(config.publish_rates())))
                    .spend(bytes, None)
            }
            PublishScope::Namespace(namespace, rates) => {
                let at = match self
                    .namespaces
                    .iter()
                    .position(|(key, _)| key.as_deref() == namespace)
                {
                    Some(at) => at,
                    None => {
                        self.namespaces
                            .push((namespace.map(Box::from), PublishBuckets::new(rates)));
                        self.namespaces.len() - 1
                    }
                };
                self.namespaces[at]
                    .1
                    .spend(bytes, Some(namespace.unwrap_or("(default)")))
            }
        };
        let Err(refusal) = refused else {
            return Ok(());
        };
        self.charge_error()?;
        Err(refusal)
    }

    /// Takes what `spend` costs, or refuses with `rate_limited` (and the time to wait); a
    /// session whose error budget is spent gets `policy_violation` instead.
    pub(crate) fn spend(&mut self, spend: Spend) -> Result<(), Refusal> {
        let refused = self.try_spend(spend);
        let Err(refusal) = refused else {
            return Ok(());
        };
        self.charge_error()?;
        Err(refusal)
    }

    /// Takes one publish from `publisher`'s budget in `budgets` (after the session's own
    /// buckets), or refuses like [`Self::spend`].
    pub(crate) fn spend_budget(
        &mut self,
        budgets: &PublishBudgets,
        publisher: &Publisher,
    ) -> Result<(), Refusal> {
        let Err(refusal) = budgets.spend(publisher) else {
            return Ok(());
        };
        self.charge_error()?;
        Err(refusal)
    }

    /// Charges one request error (any `Error` the session is about to get) to the error
    /// budget; refuses with `policy_violation` once the budget of the window is spent.
    pub(crate) fn charge_error(&mut self) -> Result<(), Refusal> {
        let config = &self.config;
        let errors = self
            .errors
            .get_or_insert_with(|| Box::new(direct(config.error_quota())));
        errors.check().map_err(|_| {
            Refusal::new(
                Code::PolicyViolation,
                format!(
                    "more than {} request errors in {} s",
                    config.error_budget, config.error_window_secs
                ),
            )
        })
    }

    fn try_spend(&mut self, spend: Spend) -> Result<(), Refusal> {
        let c = &self.config;
        let clock = MonotonicClock;
        match spend {
            Spend::Subscribe => {
                let limiter = self.subscribe.get_or_insert_with(|| {
                    Box::new(direct(LimitsConfig::quota(
                        c.subscribe_per_second,
                        c.subscribe_burst,
                    )))
                });
                limiter
                    .check()
                    .map_err(|n| retry_after(n.wait_time_from(clock.now())))
            }
            Spend::Datagram => {
                let limiter = self.datagrams.get_or_insert_with(|| {
                    Box::new(direct(LimitsConfig::quota(
                        c.datagrams_per_second,
                        c.datagram_burst,
                    )))
                });
                limiter
                    .check()
                    .map_err(|n| retry_after(n.wait_time_from(clock.now())))
            }
        }
    }
}

fn too_large(bytes: usize, burst: u32) -> Refusal {
    Refusal::new(
        Code::PayloadTooLarge,
        format!("data of {bytes} bytes exceeds the publish_bytes_burst of {burst}"),
    )
}

/// Whose publish budget a session spends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Publisher {
    /// The user its token names (`sub`).
    User(Box<str>),
    /// The client address of a session without a user.
    Address(IpAddr),
}

impl Publisher {
    fn budget(&self) -> &'static str {
        match self {
            Publisher::User(_) => "per-user budget",
            Publisher::Address(_) => "per-address budget",
        }
    }
}

/// Fewest publishers the budget table holds before it counts as full (at least twice
/// `max_sessions`).
const MIN_TRACKED_PUBLISHERS: usize = 65_536;

/// Budget checks between looks at the table (its size; a prune when due).
const BUDGET_CHECKS_PER_LOOK: u64 = 1024;

/// Publish budgets that outlive sessions: one bucket per [`Publisher`], shared by all its
/// sessions on this node and kept across reconnects, drawn from on every publish after the
/// session's own buckets. Buckets that refilled are pruned (at most once a second, every 100 ms
/// while the table is full); a full table (twice `max_sessions` publishers, at least
/// [`MIN_TRACKED_PUBLISHERS`], that published within their bucket's refill time) stops
/// checking budgets until pruning frees room: the per-session buckets still apply, and no
/// publisher is refused for another's sake.
pub struct PublishBudgets {
    limiter: RateLimiter<Publisher, DashMapStateStore<Publisher>, MonotonicClock, NoOp>,
    quota: (u32, u32),
    exempt_loopback: bool,
    max_tracked: usize,
    checks: AtomicU64,
    full: AtomicBool,
    pruned: Mutex<Instant>,
}

impl std::fmt::Debug for PublishBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishBudgets")
            .field("quota", &self.quota)
            .field("tracked", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl PublishBudgets {
    /// Budgets of `quota` (`(per second, burst)`, see [`LimitsConfig::user_publish_quota`])
    /// under `config`'s loopback exemption and session cap.
    pub fn new(config: &LimitsConfig, quota: (u32, u32)) -> Self {
        PublishBudgets {
            limiter: RateLimiter::dashmap_with_clock(
                LimitsConfig::quota(quota.0, quota.1),
                MonotonicClock,
            ),
            quota,
            exempt_loopback: config.per_ip_exempt_loopback,
            max_tracked: (config.max_sessions as usize)
                .saturating_mul(2)
                .max(MIN_TRACKED_PUBLISHERS),
            checks: AtomicU64::new(0),
            full: AtomicBool::new(false),
            pruned: Mutex::new(Instant::now()),
        }
    }

    /// `(per second, burst)` of each budget.
    pub fn quota(&self) -> (u32, u32) {
        self.quota
    }

    /// Whose budget a session of user `sub` (if any) from `peer` (if known) spends: the
    /// user's, else its address's (none for an exempt loopback address or an in-process
    /// session).
    pub fn publisher(&self, sub: Option<&str>, peer: Option<IpAddr>) -> Option<Publisher> {
        if let Some(sub) = sub {
            return Some(Publisher::User(sub.into()));
        }
        let ip = peer?.to_canonical();
        (!(self.exempt_loopback && ip.is_loopback())).then_some(Publisher::Address(ip))
    }

    /// Publishers in the table (for tests: it stays bounded).
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }

    /// Takes one publish from `publisher`'s budget, or refuses with `rate_limited` and the
    /// time to wait.
    pub fn spend(&self, publisher: &Publisher) -> Result<(), Refusal> {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % BUDGET_CHECKS_PER_LOOK == BUDGET_CHECKS_PER_LOOK - 1 {
            self.look();
        }
        if self.full.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.limiter.check_key(publisher).map_err(|not_until| {
            let refusal = retry_after(not_until.wait_time_from(MonotonicClock.now()));
            Refusal {
                message: format!("{}: {}", publisher.budget(), refusal.message),
                ..refusal
            }
        })
    }

    /// Prunes refilled buckets when due and notes whether the table is full.
    fn look(&self) {
        // One thread looks at a time; the others go on spending.
        let mut pruned = match self.pruned.try_lock() {
            Ok(pruned) => pruned,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let full = self.limiter.len() >= self.max_tracked;
        let due = if full {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        if pruned.elapsed() >= due {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            *pruned = Instant::now();
        }
        let full = self.limiter.len() >= self.max_tracked;
        if full != self.full.swap(full, Ordering::Relaxed) {
            if full {
                tracing::warn!(
                    publishers = self.max_tracked,
                    "per-user publish budgets: table full, budgets not checked until it drains"
                );
            } else {
                tracing::info!("per-user publish budgets: checked again");
            }
        }
    }
}

/// Most addresses the per-IP connection-rate table holds; beyond (after pruning), new
/// addresses are refused until entries age out.
const MAX_TRACKED_IPS: usize = 65_536;

/// Why a session request is refused by the connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The broker holds `max_sessions` sessions.
    Full,
    /// This address holds `per_ip_sessions` sessions.
    IpSessions,
    /// This address opens sessions faster than `per_ip_connects_per_second`.
    IpRate(Duration),
}

impl Busy {
    /// How long the client should wait before retrying (the `Retry-After` hint).
    pub fn retry_after(self) -> Duration {
        match self {
            Busy::IpRate(wait) => wait.max(Duration::from_secs(1)),
            Busy::Full | Busy::IpSessions => Duration::from_secs(5),
        }
    }
}

/// Connection caps shared by every session request.
pub struct ConnectionLimits {
    config: Arc<LimitsConfig>,
    sessions: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    rate: RateLimiter<IpAddr, DashMapStateStore<IpAddr>, MonotonicClock, NoOp>,
    checks: AtomicU64,
}

impl std::fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLimits")
            .field("sessions", &self.sessions.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ConnectionLimits {
    /// Caps under `config`.
    pub fn new(config: Arc<LimitsConfig>) -> Self {
        let quota = LimitsConfig::quota(
            config.per_ip_connects_per_second,
            config.per_ip_connect_burst,
        );
        ConnectionLimits {
            sessions: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            rate: RateLimiter::dashmap_with_clock(quota, MonotonicClock),
            checks: AtomicU64::new(0),
            config,
        }
    }

    /// Sessions now held.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Addresses in the connection-rate table (for tests: it stays bounded).
    pub fn tracked_addresses(&self) -> usize {
        self.rate.len()
    }

    /// Takes a session slot for a request from `ip` (none for in-process callers), or says
    /// why not: [`Self::check_rate`], then [`Self::take_slot`].
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<SessionPermit, Busy> {
        if let Some(ip) = ip {
            self.check_rate(ip)?;
        }
        self.take_slot(ip)
    }

    /// The address the per-address caps count, if any.
    fn counted(&self, ip: Option<IpAddr>) -> Option<IpAddr> {
        ip.filter(|ip| !(self.config.per_ip_exempt_loopback && ip.is_loopback()))
    }

    /// Whether the broker holds `max_sessions` sessions.
    pub fn is_full(&self) -> bool {
        self.sessions() >= self.config.max_sessions as usize
    }

    /// Counts a new session request from `ip` against its per-second rate. WebTransport
    /// calls this before the QUIC handshake, so a flood costs no handshake.
    pub fn check_rate(&self, ip: IpAddr) -> Result<(), Busy> {
        let Some(ip) = self.counted(Some(ip)) else {
            return Ok(());
        };
        // Prune idle entries every 1024 requests (an O(table) scan, amortised), so the
        // table stays small; when it is full anyway, new requests wait for the next prune.
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % 1024 == 1023 {
            self.rate.retain_recent();
            self.rate.shrink_to_fit();
        }
        if self.rate.len() >= MAX_TRACKED_IPS {
            return Err(Busy::IpRate(Duration::from_secs(1)));
        }
        self.rate
            .check_key(&ip)
            .map_err(|not_until| Busy::IpRate(not_until.wait_time_from(MonotonicClock.now())))
    }

    /// Takes a session slot (global and per-IP concurrency, no rate); given back when the
    /// permit drops.
    pub fn take_slot(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<SessionPermit, Busy> {
        let max = self.config.max_sessions as usize;
        if self
            .sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Busy::Full);
        }
        let mut permit = SessionPermit {
            limits: self.clone(),
            ip: None,
            peer: ip,
        };
        if let Some(ip) = self.counted(ip) {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= self.config.per_ip_sessions {
                return Err(Busy::IpSessions);
            }
            *count += 1;
            permit.ip = Some(ip);
        }
        Ok(permit)
    }
}

/// A held session slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct SessionPermit {
    limits: Arc<ConnectionLimits>,
    /// The address counted against the per-IP caps.
    ip: Option<IpAddr>,
    peer: Option<IpAddr>,
}

impl SessionPermit {
    /// The client's address, when known (whether or not the per-IP caps count it).
    pub fn peer(&self) -> Option<IpAddr> {
        self.peer
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.limits.sessions.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut per_ip = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut LimitsConfig)) -> Arc<LimitsConfig> {
        let mut c = LimitsConfig::default();
        f(&mut c);
        Arc::new(c)
    }

    #[test]
    fn publish_bucket_refuses_with_retry_after_then_budget_closes() {
        let mut limits = SessionLimits::new(config(|c| {
            c.publish_per_second = 1;
            c.publish_burst = 2;
            c.error_budget = 3;
            c.error_window_secs = 3600;
        }));
        assert_eq!(limits.spend_publish(PublishScope::Session, 10), Ok(()));
        assert_eq!(limits.spend_publish(PublishScope::Session, 10), Ok(()));
        for _ in 0..3 {
            let refusal = limits.spend_publish(PublishScope::Session, 10).unwrap_err();
            assert_eq!(refusal.code, Code::RateLimited);
            assert!(
                refusal.message.contains("retry after"),
                "{}",
                refusal.message
            );
            assert!(refusal.retry_after.is_some_and(|d| d > Duration::ZERO));
        }
        assert_eq!(
            limits
                .spend_publish(PublishScope::Session, 10)
                .unwrap_err()
                .code,
            Code::PolicyViolation
        );
    }

    #[test]
    fn bytes_and_subscribe_buckets() {
        let mut limits = SessionLimits::new(config(|c| {
            c.publish_bytes_per_second = 100;
            c.publish_bytes_burst = 100;
            c.subscribe_per_second = 1;
            c.subscribe_burst = 1;
        }));
        assert_eq!(limits.spend_publish(PublishScope::Session, 60), Ok(()));
        assert_eq!(
            limits
                .spend_publish(PublishScope::Session, 60)
                .unwrap_err()
                .code,
            Code::RateLimited
        );
        assert_eq!(
            limits
                .spend_publish(PublishScope::Session, 101)
                .unwrap_err()
                .code,
            Code::PayloadTooLarge
        );
        assert_eq!(limits.spend(Spend::Subscribe), Ok(()));
        assert_eq!(
            limits.spend(Spend::Subscribe).unwrap_err().code,
            Code::RateLimited
        );
    }

    #[test]
    fn namespaces_with_their_own_rates_have_their_own_buckets() {
        let mut limits = SessionLimits::new(config(|c| {
            c.publish_per_second = 1;
            c.publish_burst = 2;
            c.error_budget = 100;
        }));
        let slow = PublishRates {
            per_second: 1,
            burst: 1,
            bytes_per_second: 1000,
            bytes_burst: 1000,
        };
        let fast = PublishRates {
            per_second: 100,
            burst: 100,
            ..slow
        };
        let chat = PublishScope::Namespace(Some("chat"), slow);
        assert_eq!(limits.spend_publish(chat, 10), Ok(()));
        let refusal = limits.spend_publish(chat, 10).unwrap_err();
        assert_eq!(refusal.code, Code::RateLimited);
        assert!(
            refusal.message.starts_with("namespace chat: rate limited"),
            "{}",
            refusal.message
        );
        // Another namespace and the session's own buckets are untouched.
        for _ in 0..10 {
            assert_eq!(
                limits.spend_publish(PublishScope::Namespace(Some("gps"), fast), 10),
                Ok(())
            );
        }
        assert_eq!(limits.spend_publish(PublishScope::Session, 10), Ok(()));
        assert_eq!(limits.spend_publish(PublishScope::Session, 10), Ok(()));
        assert_eq!(
            limits
                .spend_publish(PublishScope::Session, 10)
                .unwrap_err()
                .code,
            Code::RateLimited
        );
        // The [default] policy's buckets are shared by every namespace it covers.
        let default = PublishScope::Namespace(None, slow);
        assert_eq!(limits.spend_publish(default, 1), Ok(()));
        assert_eq!(
            limits.spend_publish(default, 1).unwrap_err().code,
            Code::RateLimited
        );
        // A namespace's bytes burst caps its payloads.
        let tiny = PublishScope::Namespace(
            Some("tiny"),
            PublishRates {
                bytes_burst: 5,
                ..fast
            },
        );
        assert_eq!(
            limits.spend_publish(tiny, 6).unwrap_err().code,
            Code::PayloadTooLarge
        );
        assert_eq!(limits.namespaces.len(), 4);
    }

    #[test]
    fn the_per_user_budget_outlives_sessions_and_is_not_shared() {
        let strict = config(|c| c.per_ip_exempt_loopback = false);
        let config = config(|c| {
            c.publish_per_second = 1;
            c.publish_burst = 5;
            c.user_publish_per_second = Some(1);
            c.user_publish_burst = Some(8);
            c.per_ip_exempt_loopback = true;
        });
        let budgets =
            PublishBudgets::new(&config, config.user_publish_quota(config.publish_rates()));
        let alice = budgets.publisher(Some("alice"), None).unwrap();
        let bob = budgets.publisher(Some("bob"), None).unwrap();
        let publish = |limits: &mut SessionLimits, who: &Publisher| {
            limits
                .spend_publish(PublishScope::Session, 1)
                .and_then(|()| limits.spend_budget(&budgets, who))
        };
        // Alice's first session: its own burst of 5, all charged to her budget of 8.
        let mut first = SessionLimits::new(config.clone());
        for _ in 0..5 {
            assert_eq!(publish(&mut first, &alice), Ok(()));
        }
        assert!(publish(&mut first, &alice).is_err());
        // Her next session has full buckets, but only 3 left in her budget.
        let mut second = SessionLimits::new(config.clone());
        let passed = (0..5)
            .filter(|_| publish(&mut second, &alice).is_ok())
            .count();
        assert!(passed < 5, "{passed}");
        let refusal = budgets.spend(&alice).unwrap_err();
        assert_eq!(refusal.code, Code::RateLimited);
        assert!(
            refusal
                .message
                .starts_with("per-user budget: rate limited; retry after"),
            "{}",
            refusal.message
        );
        assert!(refusal.retry_after.is_some_and(|d| d > Duration::ZERO));
        // Bob's budget is his own.
        for _ in 0..8 {
            assert_eq!(budgets.spend(&bob), Ok(()));
        }
        // Without a user: the address's budget, none for an exempt loopback address.
        let remote: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            budgets.publisher(None, Some(remote)),
            Some(Publisher::Address(remote))
        );
        // An IPv4-mapped IPv6 address is the same client.
        assert_eq!(
            budgets.publisher(None, Some("::ffff:10.0.0.1".parse().unwrap())),
            Some(Publisher::Address(remote))
        );
        assert_eq!(
            budgets.publisher(None, Some("127.0.0.1".parse().unwrap())),
            None
        );
        assert_eq!(budgets.publisher(None, None), None);
        let local: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            PublishBudgets::new(&strict, (1, 1)).publisher(None, Some(local)),
            Some(Publisher::Address(local))
        );
    }

    #[test]
    fn the_default_budget_covers_several_sessions_of_the_largest_rates() {
        let c = config(|c| {
            c.publish_per_second = 50;
            c.publish_burst = 100;
        });
        let largest = PublishRates {
            per_second: 200,
            burst: 400,
            ..c.publish_rates()
        };
        assert_eq!(
            c.user_publish_quota(largest),
            (200 * USER_BUDGET_SESSIONS, 400 * USER_BUDGET_SESSIONS)
        );
        let set = config(|c| c.user_publish_burst = Some(7));
        assert_eq!(set.user_publish_quota(set.publish_rates()).1, 7);
        assert!(
            config(|c| c.user_publish_per_second = Some(0))
                .check()
                .is_err()
        );
    }

    #[test]
    fn the_budget_table_stays_bounded_under_many_users() {
        // One publish per second per user: buckets stay in the table for a second, so (unless
        // this loop takes longer) it fills up, and budgets go unchecked rather than refusing.
        let c = config(|c| c.max_sessions = 10);
        let budgets = PublishBudgets::new(&c, (1, 1));
        let over = MIN_TRACKED_PUBLISHERS + 5000;
        for n in 0..over {
            let who = Publisher::User(format!("user-{n}").into());
            assert_eq!(budgets.spend(&who), Ok(()));
            assert!(budgets.tracked() <= MIN_TRACKED_PUBLISHERS + BUDGET_CHECKS_PER_LOOK as usize);
        }
        assert!(budgets.full.load(Ordering::Relaxed));
    }

    #[test]
    fn connection_caps_and_permits() {
        let limits = Arc::new(ConnectionLimits::new(config(|c| {
            c.max_sessions = 3;
            c.per_ip_sessions = 2;
            c.per_ip_connects_per_second = 1;
            c.per_ip_connect_burst = 3;
        })));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limits.admit(Some(a)).unwrap();
        let _p2 = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.admit(Some(a)).unwrap_err(), Busy::IpSessions);
        assert!(matches!(limits.admit(Some(a)), Err(Busy::IpRate(_))));
        let _p3 = limits.admit(Some(b)).unwrap();
        assert_eq!(limits.admit(None).unwrap_err(), Busy::Full);
        drop(p1);
        assert_eq!(limits.sessions(), 2);
        let _p4 = limits.admit(None).unwrap();
        assert!(limits.tracked_addresses() <= 2);
    }

    #[test]
    fn loopback_clients_are_exempt_from_per_address_caps_unless_configured() {
        let tight = |exempt: bool| {
            Arc::new(ConnectionLimits::new(config(|c| {
                c.per_ip_sessions = 1;
                c.per_ip_connects_per_second = 1;
                c.per_ip_connect_burst = 1;
                c.per_ip_exempt_loopback = exempt;
            })))
        };
        let limits = tight(true);
        let mut held = Vec::new();
        for local in ["127.0.0.1", "127.0.0.9", "::1"] {
            for _ in 0..3 {
                held.push(limits.admit(Some(local.parse().unwrap())).unwrap());
            }
        }
        let remote: IpAddr = "10.0.0.1".parse().unwrap();
        held.push(limits.admit(Some(remote)).unwrap());
        assert!(
            limits.admit(Some(remote)).is_err(),
            "other addresses stay capped"
        );
        let limits = tight(false);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let _one = limits.admit(Some(local)).unwrap();
        assert!(limits.admit(Some(local)).is_err());
    }

    #[test]
    fn the_address_table_stays_bounded_under_many_addresses() {
        // One request per second per address: entries stay in the table for a second, so
        // (unless this loop takes longer) it fills up and new addresses are refused.
        let limits = Arc::new(ConnectionLimits::new(config(|c| {
            c.per_ip_connects_per_second = 1;
            c.per_ip_connect_burst = 1;
        })));
        for n in 0..(MAX_TRACKED_IPS as u32 + 5000) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            match limits.admit(Some(ip)) {
                Ok(permit) => drop(permit),
                Err(Busy::IpRate(_)) => {}
                Err(other) => panic!("{other:?}"),
            }
            assert!(limits.tracked_addresses() <= MAX_TRACKED_IPS);
        }
        assert_eq!(limits.sessions(), 0);
    }
}
