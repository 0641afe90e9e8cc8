//! The security configuration file (`roomcast serve --config FILE`, TOML) and the namespace
//! policy it holds: who may subscribe to and publish in the rooms of each namespace, which
//! namespaces are volatile, how large their payloads may be; and the personal room of each
//! user ([`personal_room`]).
//!
//! This module owns parsing, checking and printing that file and answering "may this session
//! subscribe / publish here?" and "whose publish buckets does a publish here draw from?". It
//! does not verify tokens ([`crate::auth`]) nor count rates ([`crate::limits`]), and it never
//! touches sessions, sockets or the hub.
//!
//! The file, every field optional:
//!
//! ```toml
//! [auth]                       # see crate::auth::AuthConfig
//! required = true
//! keys = [{ kid = "2026-11", algorithm = "HS256", file = "secret.key" }]
//!
//! [limits]                     # see crate::limits::LimitsConfig
//! publish_per_second = 50
//!
//! [default]                    # policy of namespaces not listed below; absent: refused
//! subscribe = "authenticated"
//! publish = "grant"
//!
//! [namespaces.orders]
//! subscribe = "grant"          # anyone | authenticated | grant
//! publish = "backend"          # anyone | subscribers | grant | backend
//! volatile = false
//! max_payload_bytes = 4096
//! publish_per_second = 20      # own publish buckets per session (publish_burst,
//!                              # publish_bytes_per_second, publish_bytes_burst likewise)
//!
//! [namespaces.prices]
//! conflate = "instrument"      # a slow subscriber gets the latest event per data.instrument
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use roomcast_protocol::{Code, NameError, RoomName, session::Refusal};
use serde::{Deserialize, Serialize};

use crate::{
    auth::{AuthConfig, Capability, Claims},
    limits::{LimitsConfig, PublishRates, PublishScope},
    schema::Schema,
};

/// The namespace of personal rooms: every session whose token's `sub` is `<sub>` is in
/// `user:<sub>` from its `Welcome` on ([`personal_room`]); nobody else may subscribe to it;
/// publishing there needs a grant with `pub` (backends use the HTTP API).
pub(crate) const USER_NAMESPACE: &str = "user";

/// The personal room of user `sub`: `user:<sub>`, or why `sub` cannot name a room (a space,
/// a character outside visible ASCII; a `sub` is at most 120 bytes, so never too long).
pub(crate) fn personal_room(sub: &str) -> Result<RoomName, NameError> {
    RoomName::new(&format!("{USER_NAMESPACE}:{sub}"))
}

/// Who may subscribe to a namespace's rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscribeRule {
    /// Every session, with or without a token.
    Anyone,
    /// Sessions with a valid token.
    Authenticated,
    /// Sessions whose token grants `sub` on the room (a pattern of `rooms`).
    Grant,
}

/// Who may publish into a namespace's rooms from a session (the HTTP API always may).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishRule {
    /// Every session.
    Anyone,
    /// Sessions subscribed to the room.
    Subscribers,
    /// Sessions whose token grants `pub` on the room.
    Grant,
    /// No session: only the backend (`POST /api/publish`).
    Backend,
}

/// The policy of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespacePolicy {
    /// Who may subscribe. Default `authenticated`.
    #[serde(default = "default_subscribe")]
    pub subscribe: SubscribeRule,
    /// Who may publish from a session. Default `backend`.
    #[serde(default = "default_publish")]
    pub publish: PublishRule,
    /// Events may be lost: datagrams on WebTransport, oldest dropped for a slow subscriber
    /// (adds to `--volatile-namespaces`). Default false.
    #[serde(default)]
    pub volatile: bool,
    /// Largest `data` of a publish, in bytes. Default: the frame size limit.
    #[serde(default)]
    pub max_payload_bytes: Option<usize>,
    /// Payload schemas by event name: each a CDDL document (RFC 8610) whose rule `payload`
    /// the event's `data` must match (`schema_mismatch` otherwise). Events without a schema
    /// are not checked. Parsed once when the file is loaded. Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schemas: BTreeMap<String, String>,
    /// History kept per room for recovery, in events (0: none). Default `--history-events`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_events: Option<usize>,
    /// History kept per room, in bytes of encoded events. Default `--history-bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_bytes: Option<usize>,
    /// Age limit of the history, in seconds. Default `--history-ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_ttl_secs: Option<u64>,
    /// How long publishes' idempotency keys are remembered, in seconds (0: ignored). Default
    /// `--dedup-window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window_secs: Option<u64>,
    /// Publishes per second a session may send into this namespace. Setting any of the four
    /// `publish_*` fields gives the namespace its own buckets per session, used instead of the
    /// `[limits]` ones for publishes into it; the fields not set take the `[limits]` value.
    /// Default: not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_per_second: Option<u32>,
    /// Publishes a session may send into this namespace at once. Default: not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_burst: Option<u32>,
    /// Payload bytes per second a session may publish into this namespace. Default: not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_bytes_per_second: Option<u32>,
    /// Payload bytes a session may publish into this namespace at once (larger publishes get
    /// `payload_too_large`). Default: not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_bytes_burst: Option<u32>,
    /// Conflation key path (e.g. `"instrument"`, `"device.id"`; see [`crate::conflation`]):
    /// a subscriber whose queue is over half full gets only the latest event per key instead
    /// of being closed as a slow consumer. Not with `volatile`. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflate: Option<String>,
}

fn default_subscribe() -> SubscribeRule {
    SubscribeRule::Authenticated
}

fn default_publish() -> PublishRule {
    PublishRule::Backend
}

impl NamespacePolicy {
    /// Anyone may subscribe and publish: the embedded default's policy.
    pub fn open() -> Self {
        NamespacePolicy {
            subscribe: SubscribeRule::Anyone,
            publish: PublishRule::Anyone,
            volatile: false,
            max_payload_bytes: None,
            schemas: BTreeMap::new(),
            history_events: None,
            history_bytes: None,
            history_ttl_secs: None,
            dedup_window_secs: None,
            publish_per_second: None,
            publish_burst: None,
            publish_bytes_per_second: None,
            publish_bytes_burst: None,
            conflate: None,
        }
    }

    /// The namespace's own publish rates, when it sets any (the rest from `defaults`).
    pub fn publish_rates(&self, defaults: &LimitsConfig) -> Option<PublishRates> {
        let own = [
            self.publish_per_second,
            self.publish_burst,
            self.publish_bytes_per_second,
            self.publish_bytes_burst,
        ];
        if own.iter().all(Option::is_none) {
            return None;
        }
        let d = defaults.publish_rates();
        Some(PublishRates {
            per_second: self.publish_per_second.unwrap_or(d.per_second),
            burst: self.publish_burst.unwrap_or(d.burst),
            bytes_per_second: self.publish_bytes_per_second.unwrap_or(d.bytes_per_second),
            bytes_burst: self.publish_bytes_burst.unwrap_or(d.bytes_burst),
        })
    }

    fn check(&self, name: &str) -> Result<(), ConfigError> {
        for (field, value) in [
            ("publish_per_second", self.publish_per_second),
            ("publish_burst", self.publish_burst),
            ("publish_bytes_per_second", self.publish_bytes_per_second),
            ("publish_bytes_burst", self.publish_bytes_burst),
        ] {
            if value == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "{name}.{field} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Token verification.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Rate limits and caps.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Policy of namespaces not listed in `namespaces`; absent, their rooms are refused.
    #[serde(default)]
    pub default: Option<NamespacePolicy>,
    /// Policy per namespace.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespacePolicy>,
    /// Folder the file's relative key paths are resolved against.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The parsed schemas, by namespace (`None`: the default policy's) and event.
    #[serde(skip)]
    schemas: BTreeMap<(Option<String>, String), Schema>,
}

/// The configuration without a file: no auth, every namespace open, default limits.
impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            default: Some(NamespacePolicy::open()),
            namespaces: BTreeMap::new(),
            base_dir: PathBuf::from("."),
            schemas: BTreeMap::new(),
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field unknown or of the wrong type.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        source: Box<toml::de::Error>,
    },
    /// The values do not fit together.
    #[error("{0}")]
    Invalid(String),
    /// A `[limits]` value is 0.
    #[error(transparent)]
    Limits(#[from] crate::limits::ZeroLimit),
    /// The `[auth]` settings do not fit together.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
}

impl FileConfig {
    /// Reads and checks `path` (key files are not read here: see [`crate::auth::Verifier`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        config.check()?;
        config.compile_schemas()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        for name in self.namespaces.keys() {
            // A namespace is valid when `name:x` is a valid room name.
            if RoomName::new(&format!("{name}:x")).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "namespaces.{name}: not a valid namespace (1-32 of a-z 0-9 _ -)"
                )));
            }
            if name == USER_NAMESPACE {
                return Err(ConfigError::Invalid(format!(
                    "namespaces.{USER_NAMESPACE}: reserved for personal rooms (user:<sub>)"
                )));
            }
        }
        for (name, policy) in &self.namespaces {
            policy.check(&format!("namespaces.{name}"))?;
        }
        if let Some(policy) = &self.default {
            policy.check("default")?;
        }
        let policies = self
            .namespaces
            .iter()
            .map(|(n, p)| (format!("namespaces.{n}"), p));
        for (name, policy) in policies.chain(self.default.iter().map(|p| ("default".into(), p))) {
            let Some(path) = &policy.conflate else {
                continue;
            };
            crate::conflation::KeyPath::parse(path)
                .map_err(|e| ConfigError::Invalid(format!("{name}.conflate: {e}")))?;
            if policy.volatile {
                return Err(ConfigError::Invalid(format!(
                    "{name}: conflate is for reliable rooms (volatile rooms drop the oldest)"
                )));
            }
        }
        self.limits.check()?;
        self.auth.check()?;
        Ok(())
    }

    fn compile_schemas(&mut self) -> Result<(), ConfigError> {
        let policies = self
            .namespaces
            .iter()
            .map(|(name, policy)| (Some(name.clone()), policy))
            .chain(self.default.iter().map(|policy| (None, policy)));
        let mut compiled = BTreeMap::new();
        for (namespace, policy) in policies {
            for (event, text) in &policy.schemas {
                let schema = Schema::parse(text).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "{}.schemas.{event}: {e}",
                        namespace
                            .as_deref()
                            .map_or("default".to_owned(), |n| format!("namespaces.{n}"))
                    ))
                })?;
                compiled.insert((namespace.clone(), event.clone()), schema);
            }
        }
        self.schemas = compiled;
        Ok(())
    }

    /// Checks `data` of event `event` in `room` against the schema the namespace has for it,
    /// if any.
    pub fn check_schema(&self, room: &RoomName, event: &str, data: &[u8]) -> Result<(), Refusal> {
        if self.schemas.is_empty() {
            return Ok(());
        }
        let namespace = room.namespace();
        let key = if self.namespaces.contains_key(namespace) {
            (Some(namespace.to_owned()), event.to_owned())
        } else {
            (None, event.to_owned())
        };
        match self.schemas.get(&key) {
            None => Ok(()),
            Some(schema) => schema.validate(data).map_err(|e| {
                Refusal::new(
                    Code::SchemaMismatch,
                    format!("event {event} in {room} does not match its schema: {e}"),
                )
            }),
        }
    }

    /// Every namespace the file names, with its policy.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &NamespacePolicy)> {
        self.namespaces.iter().map(|(name, p)| (name.as_str(), p))
    }

    /// Namespaces whose rooms are volatile.
    pub fn volatile_namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces
            .iter()
            .filter(|(_, p)| p.volatile)
            .map(|(name, _)| name.as_str())
    }

    /// The buckets a publish into `room` draws from: its namespace's own when its policy (or
    /// the `[default]` policy covering it) sets publish rates, else the session's.
    pub fn publish_scope(&self, room: &RoomName) -> PublishScope<'_> {
        let namespace = room.namespace();
        let (key, policy) = match self.namespaces.get_key_value(namespace) {
            Some((name, policy)) => (Some(name.as_str()), policy),
            None if namespace == USER_NAMESPACE => return PublishScope::Session,
            None => match &self.default {
                Some(policy) => (None, policy),
                None => return PublishScope::Session,
            },
        };
        match policy.publish_rates(&self.limits) {
            Some(rates) => PublishScope::Namespace(key, rates),
            None => PublishScope::Session,
        }
    }

    /// The policy of `namespace`, if the configuration has one for it.
    pub fn namespace(&self, namespace: &str) -> Option<&NamespacePolicy> {
        self.namespaces.get(namespace).or(self.default.as_ref())
    }

    /// May a session with `claims` subscribe to `room`?
    pub fn may_subscribe(&self, room: &RoomName, claims: Option<&Claims>) -> Result<(), Refusal> {
        let namespace = room.namespace();
        if namespace == USER_NAMESPACE {
            let owner = &room.as_str()[USER_NAMESPACE.len() + 1..];
            return match claims {
                Some(claims) if claims.sub == owner => Ok(()),
                Some(_) => Err(forbidden(format!(
                    "{room} is the personal room of another user"
                ))),
                None => Err(forbidden(format!(
                    "{room} is a personal room: the namespace user is reserved (even with \
                     authentication off) for sessions whose token names that user"
                ))),
            };
        }
        let Some(policy) = self.namespace(namespace) else {
            return Err(unknown_namespace(namespace));
        };
        let allowed = match policy.subscribe {
            SubscribeRule::Anyone => true,
            SubscribeRule::Authenticated => claims.is_some(),
            SubscribeRule::Grant => claims.is_some_and(|c| c.grants(room, Capability::Sub)),
        };
        if allowed {
            Ok(())
        } else {
            Err(forbidden(match (policy.subscribe, claims) {
                (_, None) => format!("subscribing to {room} needs a token"),
                _ => format!("the token does not grant sub on {room}"),
            }))
        }
    }

    /// May a session with `claims` publish `data_len` bytes into `room`?
    pub fn may_publish(
        &self,
        room: &RoomName,
        claims: Option<&Claims>,
        subscribed: bool,
        data_len: usize,
    ) -> Result<(), Refusal> {
        let namespace = room.namespace();
        let granted = claims.is_some_and(|c| c.grants(room, Capability::Pub));
        if namespace == USER_NAMESPACE {
            return if granted {
                Ok(())
            } else {
                Err(forbidden(format!(
                    "publishing to {room} needs a pub grant: the namespace user is reserved \
                     for personal rooms (backends publish to them with POST /api/publish)"
                )))
            };
        }
        let Some(policy) = self.namespace(namespace) else {
            return Err(unknown_namespace(namespace));
        };
        let allowed = match policy.publish {
            PublishRule::Anyone => true,
            PublishRule::Subscribers => subscribed,
            PublishRule::Grant => granted,
            PublishRule::Backend => false,
        };
        if !allowed {
            return Err(forbidden(match policy.publish {
                PublishRule::Backend => format!("only the backend publishes to {room}"),
                PublishRule::Subscribers => format!("publishing to {room} needs a subscription"),
                _ => format!("the token does not grant pub on {room}"),
            }));
        }
        match policy.max_payload_bytes {
            Some(max) if data_len > max => Err(Refusal::new(
                Code::PayloadTooLarge,
                format!("data of {data_len} bytes exceeds {max} for namespace {namespace}"),
            )),
            _ => Ok(()),
        }
    }

    /// The per-user publish budget `(per second, burst)` ([`LimitsConfig::user_publish_quota`]):
    /// by default a multiple of the largest per-session publish rates of `[limits]` and of
    /// every policy with its own.
    pub fn user_publish_quota(&self) -> (u32, u32) {
        let largest = self
            .namespaces
            .values()
            .chain(self.default.as_ref())
            .filter_map(|policy| policy.publish_rates(&self.limits))
            .fold(self.limits.publish_rates(), |a, b| PublishRates {
                per_second: a.per_second.max(b.per_second),
                burst: a.burst.max(b.burst),
                ..a
            });
        self.limits.user_publish_quota(largest)
    }

    /// The effective configuration as TOML, with every default filled in (what
    /// `roomcast config check` prints).
    pub fn effective(&self) -> String {
        // A namespace with its own publish rates shows all four, the inherited ones filled in.
        let mut filled = self.clone();
        let (per_second, burst) = self.user_publish_quota();
        filled.limits.user_publish_per_second = Some(per_second);
        filled.limits.user_publish_burst = Some(burst);
        let policies = filled
            .namespaces
            .values_mut()
            .chain(filled.default.as_mut());
        for policy in policies {
            if let Some(rates) = policy.publish_rates(&self.limits) {
                policy.publish_per_second = Some(rates.per_second);
                policy.publish_burst = Some(rates.burst);
                policy.publish_bytes_per_second = Some(rates.bytes_per_second);
                policy.publish_bytes_burst = Some(rates.bytes_burst);
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# effective configuration (every default filled in)\n{}",
            toml::to_string_pretty(&filled).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
        );
        let _ = writeln!(
            out,
            "# namespaces without publish_* fields publish from the [limits] buckets of the session"
        );
        if self.default.is_none() {
            let _ = writeln!(
                out,
                "# no [default]: rooms of namespaces not listed above are refused (forbidden)"
            );
        }
        let _ = writeln!(
            out,
            "# user:<sub> rooms: every session of user <sub> is in its room from Welcome on; \
             nobody else may subscribe; publish needs a pub grant"
        );
        out
    }
}

fn forbidden(message: String) -> Refusal {
    Refusal::new(Code::Forbidden, message)
}

fn unknown_namespace(namespace: &str) -> Refusal {
    forbidden(format!(
        "namespace {namespace} has no policy and there is no default"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn claims(sub: &str, grants: &[(&str, &[&str])]) -> Claims {
        Claims::for_test(sub, grants)
    }

    const FILE: &str = r#"
        [default]
        subscribe = "authenticated"
        publish = "subscribers"

        [namespaces.orders]
        subscribe = "grant"
        publish = "backend"
        max_payload_bytes = 8

        [namespaces.chat]
        subscribe = "anyone"
        publish = "grant"
        volatile = true
    "#;

    #[test]
    fn rules_per_namespace() {
        let config = FileConfig::parse(FILE).unwrap();
        let alice = claims("alice", &[("orders:1042", &["sub"]), ("chat:*", &["pub"])]);
        let code = |r: Result<(), Refusal>| r.err().map(|r| r.code);
        assert_eq!(
            code(config.may_subscribe(&room("orders:1042"), Some(&alice))),
            None
        );
        assert_eq!(
            code(config.may_subscribe(&room("orders:1043"), Some(&alice))),
            Some(Code::Forbidden)
        );
        assert_eq!(
            code(config.may_subscribe(&room("orders:1042"), None)),
            Some(Code::Forbidden)
        );
        assert_eq!(code(config.may_subscribe(&room("chat:a"), None)), None);
        assert_eq!(
            code(config.may_publish(&room("chat:a"), None, true, 1)),
            Some(Code::Forbidden)
        );
        assert_eq!(
            code(config.may_publish(&room("chat:a"), Some(&alice), false, 1)),
            None
        );
        assert_eq!(
            code(config.may_publish(&room("orders:1042"), Some(&alice), true, 1)),
            Some(Code::Forbidden)
        );
        // The default policy: authenticated subscribers, publish when subscribed.
        assert_eq!(
            code(config.may_subscribe(&room("misc:1"), None)),
            Some(Code::Forbidden)
        );
        assert_eq!(
            code(config.may_subscribe(&room("misc:1"), Some(&alice))),
            None
        );
        assert_eq!(
            code(config.may_publish(&room("misc:1"), Some(&alice), false, 1)),
            Some(Code::Forbidden)
        );
        assert_eq!(
            code(config.may_publish(&room("misc:1"), Some(&alice), true, 1)),
            None
        );
        assert_eq!(config.volatile_namespaces().collect::<Vec<_>>(), ["chat"]);
    }

    #[test]
    fn payload_cap_and_personal_rooms() {
        let config =
            FileConfig::parse("[namespaces.orders]\npublish = \"anyone\"\nmax_payload_bytes = 8\n")
                .unwrap();
        let code = |r: Result<(), Refusal>| r.err().map(|r| r.code);
        assert_eq!(
            code(config.may_publish(&room("orders:1"), None, false, 8)),
            None
        );
        assert_eq!(
            code(config.may_publish(&room("orders:1"), None, false, 9)),
            Some(Code::PayloadTooLarge)
        );
        // No [default]: unknown namespaces are refused.
        assert_eq!(
            code(config.may_subscribe(&room("misc:1"), None)),
            Some(Code::Forbidden)
        );
        let bob = claims("bob", &[]);
        assert_eq!(
            code(config.may_subscribe(&room("user:bob"), Some(&bob))),
            None
        );
        assert_eq!(
            code(config.may_subscribe(&room("user:alice"), Some(&bob))),
            Some(Code::Forbidden)
        );
        assert_eq!(
            code(config.may_subscribe(&room("user:bob"), None)),
            Some(Code::Forbidden)
        );
        assert_eq!(
            code(config.may_publish(&room("user:bob"), Some(&bob), true, 1)),
            Some(Code::Forbidden)
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, needle) in [
            (
                "[namespaces.orders]\nsubscribe = \"everyone\"\n",
                "unknown variant",
            ),
            (
                "[namespaces.orders]\nsubscrib = \"anyone\"\n",
                "unknown field",
            ),
            ("[namespaces.Orders]\n", "not a valid namespace"),
            ("[namespaces.user]\n", "reserved"),
            ("[limits]\npublish_per_second = 0\n", "publish_per_second"),
            ("[auth]\nrequired = true\n", "no keys"),
            (
                "[namespaces.px]\nconflate = \"a..b\"\n",
                "namespaces.px.conflate",
            ),
            ("[default]\nconflate = \"\"\n", "default.conflate"),
            (
                "[namespaces.px]\nconflate = \"id\"\nvolatile = true\n",
                "reliable rooms",
            ),
        ] {
            let err = FileConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn schemas_are_parsed_once_and_checked_per_event() {
        let config = FileConfig::parse(
            r#"
            [namespaces.orders]
            publish = "anyone"
            schemas = { status = 'payload = { state: "shipped" / "pending", ? eta: uint }' }

            [default]
            schemas = { pos = 'payload = [lat: float / int, lon: float / int]' }
            "#,
        )
        .unwrap();
        let cbor = |v: &ciborium::Value| {
            let mut out = Vec::new();
            ciborium::into_writer(v, &mut out).unwrap();
            out
        };
        use ciborium::Value as V;
        let status = |state: V| V::Map(vec![(V::Text("state".into()), state)]);
        let check = |room: &str, event: &str, value: &V| {
            config
                .check_schema(&room_name(room), event, &cbor(value))
                .err()
                .map(|r| (r.code, r.message))
        };
        assert_eq!(
            check("orders:1", "status", &status(V::Text("shipped".into()))),
            None
        );
        let (code, message) = check("orders:1", "status", &status(V::Integer(5.into()))).unwrap();
        assert_eq!(code, Code::SchemaMismatch);
        assert_eq!(
            message,
            r#"event status in orders:1 does not match its schema: data.state: expected "shipped" / "pending", got 5"#
        );
        // No schema for this event: not checked.
        assert_eq!(check("orders:1", "other", &V::Integer(1.into())), None);
        // The default policy's schemas apply to unlisted namespaces only.
        let pos = V::Array(vec![V::Integer(52.into()), V::Integer(13.into())]);
        assert_eq!(check("gps:7", "pos", &pos), None);
        assert_eq!(
            check("gps:7", "pos", &V::Text("x".into())).map(|e| e.0),
            Some(Code::SchemaMismatch)
        );
        assert_eq!(check("orders:1", "pos", &V::Text("x".into())), None);
        for (text, needle) in [
            (
                "[namespaces.a]\nschemas = { e = 'payload = {' }\n",
                "namespaces.a.schemas.e",
            ),
            (
                "[namespaces.a]\nschemas = { e = 'other = int' }\n",
                "no rule named `payload`",
            ),
        ] {
            let err = FileConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn namespaces_may_set_their_own_publish_rates() {
        let config = FileConfig::parse(
            r#"
            [limits]
            publish_per_second = 100
            publish_burst = 200
            publish_bytes_burst = 70000

            [namespaces.chat]
            publish_per_second = 2
            publish_burst = 3

            [namespaces.orders]

            [default]
            publish_bytes_per_second = 1000
            "#,
        )
        .unwrap();
        let chat = PublishRates {
            per_second: 2,
            burst: 3,
            bytes_per_second: 64 << 20,
            bytes_burst: 70000,
        };
        assert_eq!(
            config.publish_scope(&room("chat:1")),
            PublishScope::Namespace(Some("chat"), chat)
        );
        assert_eq!(
            config.publish_scope(&room("orders:1")),
            PublishScope::Session
        );
        assert_eq!(
            config.publish_scope(&room("misc:1")),
            PublishScope::Namespace(
                None,
                PublishRates {
                    per_second: 100,
                    burst: 200,
                    bytes_per_second: 1000,
                    bytes_burst: 70000,
                }
            )
        );
        assert_eq!(config.publish_scope(&room("user:a")), PublishScope::Session);
        // `config check` shows all four rates of a namespace that sets any, inherited ones
        // filled in, and none for the others.
        let printed = config.effective();
        let chat_table = printed
            .split("[namespaces.chat]")
            .nth(1)
            .and_then(|t| t.split("\n[").next())
            .unwrap();
        for line in [
            "publish_per_second = 2",
            "publish_burst = 3",
            "publish_bytes_per_second = 67108864",
            "publish_bytes_burst = 70000",
        ] {
            assert!(chat_table.contains(line), "{line} in {chat_table}");
        }
        let orders_table = printed
            .split("[namespaces.orders]")
            .nth(1)
            .and_then(|t| t.split("\n[").next())
            .unwrap();
        assert!(
            !orders_table.contains("publish_per_second"),
            "{orders_table}"
        );
        // The printout parses back to the same rates.
        let again = FileConfig::parse(printed.as_str()).unwrap();
        assert_eq!(
            again.publish_scope(&room("chat:1")),
            PublishScope::Namespace(Some("chat"), chat)
        );
        for (text, needle) in [
            (
                "[namespaces.chat]\npublish_burst = 0\n",
                "namespaces.chat.publish_burst must be at least 1",
            ),
            (
                "[default]\npublish_per_second = 0\n",
                "default.publish_per_second must be at least 1",
            ),
            ("[namespaces.chat]\npublish_rate = 1\n", "unknown field"),
        ] {
            let err = FileConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    fn room_name(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    #[test]
    fn embedded_default_is_open_and_effective_prints_defaults() {
        let config = FileConfig::default();
        assert!(config.may_subscribe(&room("any:1"), None).is_ok());
        assert!(config.may_publish(&room("any:1"), None, false, 1).is_ok());
        let printed = FileConfig::parse(&format!(
            "{FILE}\n[namespaces.px]\nconflate = \"device.id\"\n"
        ))
        .unwrap()
        .effective();
        assert!(printed.contains("conflate = \"device.id\""), "{printed}");
        assert!(printed.contains("publish_per_second"), "{printed}");
        assert!(printed.contains("[namespaces.orders]"), "{printed}");
    }
}
