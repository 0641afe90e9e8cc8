//! The one place a session request is judged before any session state exists, for WebSocket
//! upgrade requests and WebTransport session requests alike. It sees the path, the query, the
//! `Origin` and the headers, and decides with nothing allocated yet. Today it enforces the
//! endpoint path and refuses new sessions while the broker drains; authentication plugs in here.

use crate::server::Shared;

/// What is known about a session request before it is accepted.
#[derive(Debug, Clone, Copy)]
pub struct SessionRequest<'a> {
    /// `ws` or `wt`.
    pub transport: &'static str,
    /// Request path without the query.
    pub path: &'a str,
    /// Query string, if any (where a browser puts a token).
    pub query: Option<&'a str>,
    /// The `Origin` header, if any.
    pub origin: Option<&'a str>,
}

impl<'a> SessionRequest<'a> {
    /// Splits `path_and_query` into path and query.
    pub fn new(transport: &'static str, path_and_query: &'a str, origin: Option<&'a str>) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        SessionRequest {
            transport,
            path,
            query,
            origin,
        }
    }
}

/// Why a session request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No session endpoint at this path (HTTP 404).
    NotFound,
    /// The broker is draining; try another node (HTTP 503 / 429 on WebTransport).
    Draining,
}

/// The path each transport's sessions live at.
pub fn endpoint_path(transport: &str) -> &'static str {
    match transport {
        "wt" => "/wt",
        _ => "/ws",
    }
}

/// Admits or refuses a session request.
pub fn admit(shared: &Shared, request: &SessionRequest<'_>) -> Result<(), Refusal> {
    if request.path != endpoint_path(request.transport) {
        return Err(Refusal::NotFound);
    }
    if shared.shutdown.is_cancelled() {
        return Err(Refusal::Draining);
    }
    Ok(())
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
        assert_eq!(admit(&shared, &wt), Ok(()));
        assert_eq!(
            admit(&shared, &SessionRequest::new("wt", "/ws", None)),
            Err(Refusal::NotFound)
        );
        assert_eq!(
            admit(&shared, &SessionRequest::new("ws", "/ws", None)),
            Ok(())
        );
        shared.shutdown.cancel();
        assert_eq!(admit(&shared, &wt), Err(Refusal::Draining));
    }
}
