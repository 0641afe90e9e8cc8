//! The HTTP surface on the TCP port: `GET /ws` (WebSocket upgrade), `GET /healthz`,
//! `GET /metrics` and `GET /cert-hash` (the QUIC certificate's SHA-256, for pinning). Handlers only route; sessions live in [`crate::session`].

use std::sync::Arc;

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tracing::debug;

use crate::{
    admission::{self, Refusal, SessionRequest},
    server::Shared,
    session,
    transport::ws,
};

/// Builds the router over the broker's shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/cert-hash", get(cert_hash))
        .with_state(shared)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.render_metrics(),
    )
        .into_response()
}

async fn cert_hash(State(shared): State<Arc<Shared>>) -> Response {
    let cert = shared
        .cert
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match cert {
        Some(info) => axum::Json(info.to_json()).into_response(),
        None => (StatusCode::NOT_FOUND, "WebTransport is off\n").into_response(),
    }
}

async fn websocket(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let origin = request
        .headers()
        .get(axum::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    match admission::admit(&shared, &SessionRequest::new("ws", path_and_query, origin)) {
        Ok(()) => {}
        Err(Refusal::NotFound) => return StatusCode::NOT_FOUND.into_response(),
        Err(Refusal::Draining) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
        }
    }
    let (response, on_upgrade) = match ws::accept(request) {
        Ok(accepted) => accepted,
        Err(refusal) => return refusal.into_response(),
    };
    let key = shared.next_session_key();
    let settings = shared.config.ws();
    let task_shared = shared.clone();
    shared.tracker.spawn(async move {
        match ws::open(on_upgrade, settings).await {
            Ok((reader, writer)) => session::run(task_shared, key, "ws", reader, writer).await,
            Err(e) => debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    response
}
