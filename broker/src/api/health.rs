//! The node's health and identity answers: `/healthz` (the process serves), `/readyz` (it
//! should get traffic), `/metrics` and `/cert-hash` (the QUIC certificate's SHA-256).
//!
//! Owns nothing; reads the node's state.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::node::Shared;

/// Liveness: 200 for as long as the process serves, draining included (restarting a
/// draining node would cut its drain short); readiness is `/readyz`.
pub(super) async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        "draining\n".into_response()
    } else {
        "ok\n".into_response()
    }
}

pub(super) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if let Some(why) = shared.bridge.not_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
    } else {
        "ready\n".into_response()
    }
}

pub(super) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.render_metrics(),
    )
        .into_response()
}

pub(super) async fn cert_hash(State(shared): State<Arc<Shared>>) -> Response {
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
