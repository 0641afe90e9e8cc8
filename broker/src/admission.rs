//! The one place a session request is judged before any session state exists, for WebSocket
//! upgrade requests and WebTransport session requests alike. It sees the path, the query, the
//! `Origin`, the `Authorization` header and the peer address, and decides with nothing
//! allocated yet: endpoint path, draining, origin allow-list, connection caps (global, per IP)
//! and the token when the request carries one (query `token` or `Authorization: Bearer`;
//! ignored when auth is off, see [`crate::auth::Verifier::check`]). A token sent only in
//! `Hello` is checked by the session's gate when `Hello` arrives.

use std::{net::IpAddr, sync::Arc, time::Duration};

use roomcast_protocol::Code;

use crate::{auth::Claims, limits::SessionPermit, node::Shared};

/// What is known about a session request before it is accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionRequest<'a> {
    /// `ws` or `wt`.
    pub transport: &'static str,
    /// Request path without the query.
    pub path: &'a str,
    /// Query string, if any (where a browser puts a token).
    pub query: Option<&'a str>,
    /// The `Origin` header, if any.
    pub origin: Option<&'a str>,
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// The client's address, when known.
    pub peer: Option<IpAddr>,
    /// The per-IP rate was checked already (WebTransport: before the QUIC handshake).
    pub rate_checked: bool,
}

impl<'a> SessionRequest<'a> {
    /// Splits `path_and_query` into path and query.
    pub(crate) fn new(
        transport: &'static str,
        path_and_query: &'a str,
        origin: Option<&'a str>,
    ) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        SessionRequest {
            transport,
            path,
            query,
            origin,
            authorization: None,
            peer: None,
            rate_checked: false,
        }
    }

    /// With the `Authorization` header.
    pub(crate) fn authorization(mut self, authorization: Option<&'a str>) -> Self {
        self.authorization = authorization;
        self
    }

    /// With the client's address.
    pub(crate) fn peer(mut self, peer: IpAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Marks the per-IP rate as checked already.
    pub(crate) fn rate_checked(mut self) -> Self {
        self.rate_checked = true;
        self
    }

    /// The token of the request: query parameter `token` first, then `Authorization: Bearer`.
    pub(crate) fn token(&self) -> Option<&'a str> {
        let from_query = self.query.and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))
                .filter(|t| !t.is_empty())
        });
        from_query.or_else(|| {
            self.authorization.and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .map(str::trim)
            })
        })
    }
}

/// Why a session request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AdmissionRefusal {
    /// No session endpoint at this path (HTTP 404).
    NotFound,
    /// The broker is draining; try another node (HTTP 503 / 429 on WebTransport).
    Draining,
    /// The `Origin` is not in the allow-list (HTTP 403).
    Origin,
    /// The request's token is missing (where required) or invalid (HTTP 401; 403 on
    /// WebTransport, which has no 401).
    Unauthorized {
        /// `unauthorized` or `token_expired`.
        code: Code,
        /// Why (never the token).
        message: String,
    },
    /// A connection cap is reached (HTTP 503 / 429 on WebTransport, with `Retry-After`).
    Busy {
        /// When to try again.
        retry_after: Duration,
    },
}

/// A session request that may become a session.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The claims of the request's token, if it had one.
    pub claims: Option<Arc<Claims>>,
    /// The session slot, held for the session's life.
    pub permit: Option<SessionPermit>,
}

/// The path each transport's sessions live at.
pub(crate) fn endpoint_path(transport: &str) -> &'static str {
    match transport {
        "wt" => "/wt",
        _ => "/ws",
    }
}

/// Admits or refuses a session request.
pub(crate) fn admit(
    shared: &Shared,
    request: &SessionRequest<'_>,
) -> Result<Admitted, AdmissionRefusal> {
    if request.path != endpoint_path(request.transport) {
        return Err(AdmissionRefusal::NotFound);
    }
    if shared.shutdown.is_cancelled() {
        return Err(AdmissionRefusal::Draining);
    }
    let security = &shared.security;
    if !security.verifier.origin_allowed(request.origin) {
        return Err(AdmissionRefusal::Origin);
    }
    // The cheap caps before the signature check: a flood of bad tokens is rate-limited too.
    let connections = &security.connections;
    let permit = if request.rate_checked {
        connections.take_slot(request.peer)
    } else {
        connections.admit(request.peer)
    }
    .map_err(|busy| AdmissionRefusal::Busy {
        retry_after: busy.retry_after(),
    })?;
    // Without keys (auth off) a token is ignored rather than refused.
    let claims = match request.token() {
        Some(token) => security.verifier.check(token, "request").map_err(|e| {
            AdmissionRefusal::Unauthorized {
                code: e.code,
                message: e.message,
            }
        })?,
        None => None,
    };
    Ok(Admitted {
        claims,
        permit: Some(permit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn paths_and_draining() {
        let shared = Shared::new(Config::default());
        let wt = SessionRequest::new("wt", "/wt?token=abc", Some("https://app.example"));
        assert_eq!(wt.query, Some("token=abc"));
        assert_eq!(wt.token(), Some("abc"));
        // The embedded default has no keys (auth off): a token in the request is ignored.
        assert!(admit(&shared, &wt).is_ok_and(|a| a.claims.is_none()));
        assert_eq!(
            admit(&shared, &SessionRequest::new("wt", "/ws", None)).unwrap_err(),
            AdmissionRefusal::NotFound
        );
        assert!(admit(&shared, &SessionRequest::new("ws", "/ws", None)).is_ok());
        shared.shutdown.cancel();
        assert_eq!(
            admit(&shared, &SessionRequest::new("ws", "/ws", None)).unwrap_err(),
            AdmissionRefusal::Draining
        );
    }

    #[test]
    fn token_sources() {
        let r = SessionRequest::new("ws", "/ws?a=1&token=t1&b=2", None)
            .authorization(Some("Bearer t2"));
        assert_eq!(r.token(), Some("t1"));
        let r = SessionRequest::new("ws", "/ws", None).authorization(Some("Bearer t2"));
        assert_eq!(r.token(), Some("t2"));
        let r = SessionRequest::new("ws", "/ws?token=", None).authorization(Some("Basic x"));
        assert_eq!(r.token(), None);
    }
}
