//! The broker's [`Gate`] for one session, and [`Security`], what every gate shares: the token
//! verifier, the namespace policy, the limits and the per-user publish budgets.
//!
//! A gate holds its session's claims (from the session request or `Hello`), its rate buckets,
//! whose per-user budget it spends and its session slot. It judges each validated request the
//! protocol state machine shows it and names the session's personal room
//! ([`SessionGate::personal_room`]); it owns nothing else: no I/O, no hub, no queue.

use std::{
    path::Path,
    sync::Arc,
    time::{Instant, SystemTime},
};

use roomcast_protocol::{
    Code, RoomName,
    session::{Gate, Refusal, Request},
};
use tracing::info;

use crate::{
    auth::{Claims, Verifier},
    limits::{
        ConnectionLimits, LimitsConfig, PublishBudgets, Publisher, SessionLimits, SessionPermit,
        Spend,
    },
    policy::{FileConfig, personal_room},
};

/// Everything the security checks share: loaded once at start.
#[derive(Debug)]
pub struct Security {
    /// The parsed configuration file (or the embedded default).
    pub file: FileConfig,
    /// Token verification.
    pub verifier: Verifier,
    /// Per-session limits.
    pub limits: Arc<LimitsConfig>,
    /// Connection caps.
    pub connections: Arc<ConnectionLimits>,
    /// Per-user publish budgets (this node's).
    pub budgets: PublishBudgets,
}

impl Security {
    /// From a parsed configuration, loading its key files.
    pub fn new(file: FileConfig) -> anyhow::Result<Self> {
        let verifier = Verifier::new(&file.auth, &file.base_dir)?;
        let limits = Arc::new(file.limits.clone());
        Ok(Security {
            verifier,
            connections: Arc::new(ConnectionLimits::new(limits.clone())),
            budgets: PublishBudgets::new(&limits, file.user_publish_quota()),
            limits,
            file,
        })
    }

    /// Reads `path` (a TOML configuration file) and its key files.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::new(FileConfig::load(path)?)
    }

    /// The embedded default: no auth, every namespace open, default limits.
    pub fn open() -> Self {
        let file = FileConfig::default();
        let limits = Arc::new(file.limits.clone());
        Security {
            verifier: Verifier::none(),
            connections: Arc::new(ConnectionLimits::new(limits.clone())),
            budgets: PublishBudgets::new(&limits, file.user_publish_quota()),
            limits,
            file,
        }
    }
}

/// One session's gate.
#[derive(Debug)]
pub struct SessionGate {
    security: Arc<Security>,
    claims: Option<Arc<Claims>>,
    limits: SessionLimits,
    /// The client's address, when known.
    peer: Option<std::net::IpAddr>,
    /// Whose per-user budget the session's publishes spend (its user's, else its address's).
    publisher: Option<Publisher>,
    /// The frame being judged arrived as a datagram.
    datagram: bool,
    /// The claims (and with them the expiry) changed since the session last asked.
    expiry_changed: bool,
    _permit: Option<SessionPermit>,
}

impl SessionGate {
    /// A gate for a session admitted with `claims` (a token in the session request) holding
    /// `permit`.
    pub fn new(
        security: Arc<Security>,
        claims: Option<Arc<Claims>>,
        permit: Option<SessionPermit>,
    ) -> Self {
        let peer = permit.as_ref().and_then(SessionPermit::peer);
        let publisher = security
            .budgets
            .publisher(claims.as_ref().map(|c| c.sub.as_str()), peer);
        SessionGate {
            limits: SessionLimits::new(security.limits.clone()),
            security,
            claims,
            peer,
            publisher,
            datagram: false,
            expiry_changed: false,
            _permit: permit,
        }
    }

    /// When the session's token expires, if it has one.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.claims.as_ref().map(|c| c.expires_at())
    }

    /// The personal room `user:<sub>` of the session's user, which the session joins right
    /// after `Welcome`; `None` for a session without a user, and for a `sub` that cannot name
    /// a room (logged: the user then has no personal room).
    pub fn personal_room(&self) -> Option<RoomName> {
        let sub = &self.claims.as_ref()?.sub;
        match personal_room(sub) {
            Ok(room) => Some(room),
            Err(e) => {
                info!(
                    sub = ?sub,
                    error = %e,
                    "no personal room: the token's sub is not valid in a room name"
                );
                None
            }
        }
    }

    /// Whether the expiry changed (a token arrived with `Hello` or `Refresh`) since the last
    /// call.
    pub fn take_expiry_changed(&mut self) -> bool {
        std::mem::take(&mut self.expiry_changed)
    }

    /// Charges a request error the session is about to get (other than `rate_limited`, which
    /// the buckets charge themselves) to its error budget.
    pub fn charge_error(&mut self) -> Result<(), Refusal> {
        self.limits.charge_error()
    }

    /// Marks whether the next frame judged arrived as a datagram.
    pub fn set_datagram(&mut self, datagram: bool) {
        self.datagram = datagram;
    }

    fn expired(&self) -> Option<Refusal> {
        match self.expires_at() {
            Some(at) if SystemTime::now() >= at => Some(Refusal::new(
                Code::TokenExpired,
                "the session's token expired",
            )),
            _ => None,
        }
    }

    /// Verifies `token` and makes its claims the session's; a session that has a user keeps
    /// it (`what` names the frame in the refusal). With auth off the token is ignored.
    fn adopt(&mut self, token: &str, what: &str) -> Result<(), Refusal> {
        let Some(claims) = self
            .security
            .verifier
            .check(token, what)
            .map_err(|e| Refusal::new(e.code, e.message))?
        else {
            return Ok(());
        };
        if let Some(earlier) = &self.claims {
            if earlier.sub != claims.sub {
                return Err(Refusal::new(
                    Code::Unauthorized,
                    format!("the {what} token names another user than the session's"),
                ));
            }
        }
        if self.claims.is_none() {
            self.publisher = self
                .security
                .budgets
                .publisher(Some(&claims.sub), self.peer);
        }
        self.claims = Some(claims);
        self.expiry_changed = true;
        Ok(())
    }

    fn hello(&mut self, token: Option<&str>) -> Result<(), Refusal> {
        match token {
            Some(token) => self.adopt(token, "Hello"),
            None if self.claims.is_none() && self.security.verifier.required => Err(Refusal::new(
                Code::Unauthorized,
                "this broker requires a token",
            )),
            None => Ok(()),
        }
    }
}

impl Gate for SessionGate {
    fn check(&mut self, request: Request<'_>, _now: Instant) -> Result<(), Refusal> {
        if let Request::Hello { token } = request {
            self.hello(token)?;
            return match self.expired() {
                Some(refusal) => Err(refusal),
                None => Ok(()),
            };
        }
        if let Some(refusal) = self.expired() {
            return Err(refusal);
        }
        if self.datagram {
            self.limits.spend(Spend::Datagram)?;
        }
        let file = &self.security.file;
        let claims = self.claims.as_deref();
        match request {
            Request::Hello { .. } => Ok(()),
            Request::Subscribe { room, held } => {
                self.limits.spend(Spend::Subscribe)?;
                if held {
                    return Ok(());
                }
                file.may_subscribe(room, claims)
            }
            Request::Unsubscribe { .. } => self.limits.spend(Spend::Subscribe),
            Request::Refresh { token } => {
                // Signature checks cost CPU: refreshes draw from the subscribe bucket.
                self.limits.spend(Spend::Subscribe)?;
                self.adopt(token, "Refresh")
            }
            Request::Publish {
                room,
                event,
                data,
                subscribed,
            } => {
                // The bucket first: refused publishes cost as much as accepted ones, so a
                // session cannot spin on refusals.
                self.limits
                    .spend_publish(file.publish_scope(room), data.len())?;
                // Then the user's budget, which survives reconnects (what the session's
                // buckets refused is not charged to it).
                if let Some(publisher) = &self.publisher {
                    self.limits
                        .spend_budget(&self.security.budgets, publisher)?;
                }
                file.may_publish(room, claims, subscribed, data.len())?;
                file.check_schema(room, event.as_str(), data.as_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_protocol::{Payload, PayloadLimits, RoomName, name::EventName};

    #[test]
    fn datagrams_draw_from_their_own_bucket_too() {
        let mut file = FileConfig::default();
        file.limits.datagrams_per_second = 1;
        file.limits.datagram_burst = 1;
        let mut gate = SessionGate::new(Arc::new(Security::new(file).unwrap()), None, None);
        let room = RoomName::new("gps:7").unwrap();
        let event = EventName::new("pos").unwrap();
        let data =
            Payload::new(bytes::Bytes::from_static(&[0x01]), PayloadLimits::default()).unwrap();
        let publish = Request::Publish {
            room: &room,
            event: &event,
            data: &data,
            subscribed: false,
        };
        let now = Instant::now();
        gate.set_datagram(true);
        assert_eq!(gate.check(publish, now), Ok(()));
        assert_eq!(
            gate.check(publish, now).unwrap_err().code,
            Code::RateLimited
        );
        // The same publish on a stream is not a datagram.
        gate.set_datagram(false);
        assert_eq!(gate.check(publish, now), Ok(()));
    }

    #[test]
    fn hello_without_a_token_where_required_is_unauthorized() {
        let mut file = FileConfig::default();
        file.auth.required = true;
        let security = Security {
            verifier: Verifier::new(&file.auth, &file.base_dir).unwrap(),
            ..Security::open()
        };
        let mut gate = SessionGate::new(Arc::new(security), None, None);
        let refusal = gate
            .check(Request::Hello { token: None }, Instant::now())
            .unwrap_err();
        assert_eq!(refusal.code, Code::Unauthorized);
    }

    #[test]
    fn without_keys_tokens_are_ignored_not_refused() {
        let mut gate = SessionGate::new(Arc::new(Security::open()), None, None);
        let now = Instant::now();
        assert_eq!(
            gate.check(
                Request::Hello {
                    token: Some("x.y.z")
                },
                now
            ),
            Ok(())
        );
        assert_eq!(
            gate.check(Request::Refresh { token: "garbage" }, now),
            Ok(())
        );
        assert_eq!(gate.expires_at(), None);
        assert_eq!(gate.personal_room(), None);
    }

    #[test]
    fn the_personal_room_is_named_after_the_sub_when_it_can_be() {
        let security = Arc::new(Security::open());
        let gate = |sub: &str| {
            SessionGate::new(
                security.clone(),
                Some(Arc::new(Claims::for_test(sub, &[]))),
                None,
            )
        };
        assert_eq!(
            gate("alice").personal_room().map(|r| r.as_str().to_owned()),
            Some("user:alice".to_owned())
        );
        assert_eq!(
            gate("a:b@c.example")
                .personal_room()
                .map(|r| r.as_str().to_owned()),
            Some("user:a:b@c.example".to_owned())
        );
        assert_eq!(gate("Jane Doe").personal_room(), None);
        assert_eq!(gate("josé").personal_room(), None);
        assert_eq!(SessionGate::new(security, None, None).personal_room(), None);
    }

    #[test]
    fn a_public_address_without_required_tokens_is_warned_about() {
        use crate::{Config, node::exposure_warning};
        let open = Security::open();
        let mut config = Config::default();
        assert_eq!(exposure_warning(&config, &open), None);
        config.listen = "0.0.0.0:4433".parse().unwrap();
        assert!(exposure_warning(&config, &open).is_some_and(|w| w.starts_with("SECURITY")));
        let mut file = FileConfig::default();
        file.auth.required = true;
        let required = Security {
            verifier: Verifier::new(&file.auth, &file.base_dir).unwrap(),
            ..Security::open()
        };
        assert_eq!(exposure_warning(&config, &required), None);
    }
}
