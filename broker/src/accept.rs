//! The one accept path of a session, for both transports: a session request is judged by
//! [`admission`] (nothing allocated yet), answered with the transport's refusal if refused,
//! the transport is opened (WebSocket: the upgrade; WebTransport: the CONNECT accept and the
//! control stream), and [`start`] runs the session on a task of its own. The task that
//! opened the transport ends there, so a session's task holds only the session (the upgrade's
//! or handshake's state is not kept for the session's life).
//!
//! Owns the mapping of an [`AdmissionRefusal`] to each transport's answer and the per-session
//! transport settings. Must not touch listeners (they call in here) or the session's protocol.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use roomcast_protocol::Code;
use tracing::debug;
use wtransport::endpoint::IncomingSession;

use crate::{
    admission::{self, AdmissionRefusal, Admitted, SessionRequest},
    node::Shared,
    session,
    transport::{
        FrameReader, FrameWriter,
        ws::{self, WsSettings},
        wt::{self, WtSettings},
    },
};

/// The TCP peer of an HTTP request, as an axum extension (set by the TCP listener).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// Runs an admitted session on a task of its own, tracked for the drain.
pub(crate) fn start<R, W>(
    shared: &Arc<Shared>,
    transport: &'static str,
    admitted: Admitted,
    reader: R,
    writer: W,
) where
    R: FrameReader + 'static,
    W: FrameWriter + 'static,
{
    let key = shared.next_session_key();
    shared.tracker.spawn(session::run(
        shared.clone(),
        key,
        transport,
        reader,
        writer,
        admitted,
    ));
}

/// `GET /ws`: admits the upgrade request, answers `101 Switching Protocols` and opens the
/// session once the upgrade is done.
pub(crate) async fn websocket(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let mut session_request = SessionRequest::new("ws", path_and_query, header(header::ORIGIN))
        .authorization(header(header::AUTHORIZATION));
    if let Some(Peer(peer)) = parts.extensions.get::<Peer>() {
        session_request = session_request.peer(peer.ip());
    }
    let admitted = match admission::admit(&shared, &session_request) {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse_websocket(&shared, refusal),
    };
    let (response, on_upgrade) = match ws::accept(&parts.headers, &mut parts.extensions) {
        Ok(accepted) => accepted,
        Err(refusal) => return refusal.into_response(),
    };
    let settings = ws_settings(&shared);
    let task_shared = shared.clone();
    shared.tracker.spawn(async move {
        match ws::open(on_upgrade, settings).await {
            Ok((reader, writer)) => start(&task_shared, "ws", admitted, reader, writer),
            Err(e) => debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    response
}

/// The HTTP answer to a refused WebSocket session request: the status, a `Retry-After` where
/// waiting helps, and the code's name in the body.
fn refuse_websocket(shared: &Shared, refusal: AdmissionRefusal) -> Response {
    match refusal {
        AdmissionRefusal::NotFound => StatusCode::NOT_FOUND.into_response(),
        // Another node can take the session now; this one is going away.
        AdmissionRefusal::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "shutting down\n",
        )
            .into_response(),
        AdmissionRefusal::Origin => (StatusCode::FORBIDDEN, "origin not allowed\n").into_response(),
        AdmissionRefusal::Unauthorized { code, message } => {
            shared.metrics.count_code(code);
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!("{}: {message}\n", code.as_str()),
            )
                .into_response()
        }
        AdmissionRefusal::Busy { retry_after } => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::RETRY_AFTER,
                retry_after.as_secs().max(1).to_string(),
            )],
            "too many sessions; retry later\n",
        )
            .into_response(),
    }
}

/// A WebTransport session request after its QUIC connection's caps were checked: completes
/// the handshake, admits the request (refusals answer 404, 429 or 403: WebTransport has no
/// 401 and no `Retry-After`), accepts it and opens the session once the client's control
/// stream arrives. Runs on the connection's tracked task.
pub(crate) async fn webtransport(shared: Arc<Shared>, incoming: IncomingSession) {
    let request = match incoming.await {
        Ok(request) => request,
        Err(e) => return debug!(error = %e, "QUIC handshake failed"),
    };
    let authorization = request
        .headers()
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.as_str());
    let judged = admission::admit(
        &shared,
        &SessionRequest::new("wt", request.path(), request.origin())
            .authorization(authorization)
            .peer(request.remote_address().ip())
            .rate_checked(),
    );
    let admitted = match judged {
        Ok(admitted) => admitted,
        Err(AdmissionRefusal::NotFound) => return request.not_found().await,
        Err(AdmissionRefusal::Draining | AdmissionRefusal::Busy { .. }) => {
            return request.too_many_requests().await;
        }
        Err(AdmissionRefusal::Origin) => return request.forbidden().await,
        Err(AdmissionRefusal::Unauthorized { code, message }) => {
            debug!(%code, %message, "WebTransport session refused");
            shared.metrics.count_code(code);
            return request.forbidden().await;
        }
    };
    let connection = match request.accept().await {
        Ok(connection) => connection,
        Err(e) => return debug!(error = %e, "WebTransport session refused"),
    };
    match wt::open(connection, wt_settings(&shared)).await {
        Ok((reader, writer)) => start(&shared, "wt", admitted, reader, writer),
        Err(connection) => {
            shared.metrics.count_code(Code::Timeout);
            wt::close_connection(&connection, Code::Timeout).await;
        }
    }
}

/// WebSocket buffer settings.
fn ws_settings(shared: &Shared) -> WsSettings {
    WsSettings {
        read_buffer: shared.config.ws_read_buffer,
        max_message: shared.config.max_frame_size,
    }
}

/// WebTransport session settings.
fn wt_settings(shared: &Shared) -> WtSettings {
    let config = &shared.config;
    WtSettings {
        max_frame: config.max_frame_size,
        hello_timeout: config.hello_timeout,
        single_stream: config.wt_single_stream,
        // Over half the outbox cap of unwritten bytes, frames of backlogged streams wait in
        // the outbox (conflated, dropped or counted against its cap there); the hard cap is
        // then only reached by one drain on top of that.
        hold_backlog: config.outbound_queue_bytes / 2,
        max_backlog: config.outbound_queue_bytes * 2,
        datagrams_in: shared.metrics.datagrams_in.clone(),
        datagrams_out: shared.metrics.datagrams_out.clone(),
    }
}
