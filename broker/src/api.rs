//! The HTTP surface on the TCP port: `GET /ws` (WebSocket upgrade), `GET /healthz` (the
//! process is alive), `GET /readyz` (the node should get traffic: not draining and, in cluster
//! mode, connected to NATS, with JetStream when rooms keep history), `GET /metrics`, `GET /cert-hash` (the QUIC certificate's SHA-256,
//! for pinning) and `POST /api/publish` (backend publishing with an API key).
//!
//! Only routes: the session upgrade is [`crate::accept`], the health answers are in `health`,
//! the publish handler in `publish`.

use std::sync::Arc;

use axum::{
    Router,
    routing::{get, post},
};

use crate::{accept, node::Shared};

mod health;

/// Builds the router over the broker's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/ws", get(accept::websocket))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(
            "/api/publish",
            post(publish::publish).layer(axum::extract::DefaultBodyLimit::max(
                shared.config.max_frame_size,
            )),
        )
        .route("/metrics", get(health::metrics))
        .route("/cert-hash", get(health::cert_hash))
        .merge(crate::dev_ui::router(&shared))
        .with_state(shared)
}

/// `POST /api/publish`: an application backend publishes an event to a room, through the same
/// bridge as client publishes (so in cluster mode it reaches every node).
mod publish {
    use std::sync::Arc;

    use axum::{
        body::Bytes,
        extract::State,
        http::{HeaderMap, StatusCode, header},
        response::{IntoResponse, Response},
    };
    use ciborium_ll::{Decoder, Header};
    use roomcast_protocol::{
        Code, EventName, Payload, PayloadError, PayloadLimits, RoomName,
        frame::MAX_IDEMPOTENCY_KEY_LEN, payload,
    };
    use sha2::{Digest, Sha256};

    use crate::{
        cluster::{PublishReply, ReplyTo, Request, Unavailable, Unheard},
        hub::Delivery,
        node::Shared,
    };

    /// The HTTP request waiting for the outcome of its publish (stored in a history stream).
    struct Waiting(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Published>>>);

    type Published = Result<Delivery, Unavailable>;

    impl PublishReply for Waiting {
        fn answer(&self, _request: Request, outcome: Published) -> Result<(), Unheard> {
            let waiting = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
            waiting.ok_or(Unheard)?.send(outcome).map_err(|_| Unheard)
        }
    }

    /// Longest wait for a history stream to acknowledge a publish.
    const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// The JSON body: `data` is any JSON value, sent to subscribers as its CBOR encoding.
    #[derive(serde::Deserialize)]
    struct JsonBody {
        room: String,
        event: String,
        data: serde_json::Value,
        #[serde(default)]
        key: Option<String>,
    }

    /// The CBOR body: a map with text keys `room`, `event`, `data` (any CBOR item, kept as
    /// its bytes) and optionally `key`; other keys are skipped.
    struct CborBody {
        room: String,
        event: String,
        data: Bytes,
        key: Option<String>,
    }

    /// Why a CBOR body is not the map [`CborBody`] reads.
    #[derive(Debug, thiserror::Error)]
    enum CborBodyError {
        #[error("not well-formed CBOR at byte {0}")]
        Malformed(usize),
        #[error("the body must be a CBOR map")]
        NotAMap,
        #[error("map keys must be definite-length text strings of at most 64 bytes (byte {0})")]
        BadKey(usize),
        #[error("{0} must be a definite-length text string")]
        NotText(&'static str),
        #[error("key {0} appears twice")]
        Duplicate(&'static str),
        #[error("{0} is missing")]
        Missing(&'static str),
        #[error("data: {0}")]
        Data(#[from] PayloadError),
    }

    /// Longest map key read (the keys that mean something are short).
    const MAX_BODY_KEY: usize = 64;

    impl CborBody {
        /// Reads the map without decoding `data`: its bytes are handed on exactly as the
        /// backend encoded them, like a client's `Publish.data`. Memory: the body's own
        /// bytes (capped by the body limit) and the three short strings.
        fn parse(body: &Bytes, limits: PayloadLimits) -> Result<CborBody, CborBodyError> {
            let mut at = 0;
            let count = match next_header(body, &mut at)? {
                Header::Map(count) => count,
                _ => return Err(CborBodyError::NotAMap),
            };
            let (mut room, mut event, mut data, mut key) = (None, None, None, None);
            let mut entries = 0;
            while count != Some(entries) {
                let key_at = at;
                let name = match next_header(body, &mut at)? {
                    Header::Break if count.is_none() => break,
                    Header::Text(Some(len)) if len <= MAX_BODY_KEY => {
                        text_at(body, &mut at, len).ok_or(CborBodyError::BadKey(key_at))?
                    }
                    _ => return Err(CborBodyError::BadKey(key_at)),
                };
                entries += 1;
                let field: (&'static str, &mut Option<_>) = match name.as_str() {
                    "room" => ("room", &mut room),
                    "event" => ("event", &mut event),
                    "key" => ("key", &mut key),
                    "data" => {
                        let len = payload::item_len(&body[at..], limits)?;
                        if data.replace(body.slice(at..at + len)).is_some() {
                            return Err(CborBodyError::Duplicate("data"));
                        }
                        at += len;
                        continue;
                    }
                    _ => {
                        at += payload::item_len(&body[at..], limits)?;
                        continue;
                    }
                };
                let (what, slot) = field;
                let text = match next_header(body, &mut at)? {
                    Header::Text(Some(len)) => {
                        text_at(body, &mut at, len).ok_or(CborBodyError::NotText(what))?
                    }
                    _ => return Err(CborBodyError::NotText(what)),
                };
                if slot.replace(text).is_some() {
                    return Err(CborBodyError::Duplicate(what));
                }
            }
            if at != body.len() {
                return Err(CborBodyError::Malformed(at));
            }
            Ok(CborBody {
                room: room.ok_or(CborBodyError::Missing("room"))?,
                event: event.ok_or(CborBodyError::Missing("event"))?,
                data: data.ok_or(CborBodyError::Missing("data"))?,
                key,
            })
        }
    }

    /// The CBOR head at `*at`, moving `*at` past it.
    fn next_header(body: &[u8], at: &mut usize) -> Result<Header, CborBodyError> {
        let mut decoder = Decoder::from(&body[*at..]);
        let header = decoder.pull().map_err(|_| CborBodyError::Malformed(*at))?;
        *at += decoder.offset();
        Ok(header)
    }

    /// The UTF-8 text of `len` bytes at `*at`, moving `*at` past it.
    fn text_at(body: &[u8], at: &mut usize, len: usize) -> Option<String> {
        let end = at.checked_add(len).filter(|end| *end <= body.len())?;
        let text = std::str::from_utf8(&body[*at..end]).ok()?.to_owned();
        *at = end;
        Some(text)
    }

    fn answer(status: StatusCode, body: serde_json::Value) -> Response {
        (status, axum::Json(body)).into_response()
    }

    fn refuse(status: StatusCode, code: Code, message: &str) -> Response {
        answer(
            status,
            serde_json::json!({"code": code.value(), "error": code.as_str(), "message": message}),
        )
    }

    fn bad_request(message: &str) -> Response {
        answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad_request", "message": message}),
        )
    }

    /// Compares the presented key with the configured one without an early exit on the first
    /// differing byte (both sides are hashed to the same length first).
    fn key_matches(presented: &str, expected: &str) -> bool {
        let (a, b) = (Sha256::digest(presented), Sha256::digest(expected));
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }

    pub(super) async fn publish(
        State(shared): State<Arc<Shared>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let Some(expected) = &shared.config.api_key else {
            return (
                StatusCode::NOT_FOUND,
                "publishing over HTTP is off (no --api-key)\n",
            )
                .into_response();
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|key| key_matches(key, &expected.0)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong API key\n",
            )
                .into_response();
        }
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let (room, event, data, key) = match content_type.as_str() {
            "application/json" => match serde_json::from_slice::<JsonBody>(&body) {
                Ok(b) => (
                    b.room,
                    b.event,
                    Payload::encode(&b.data).map(|p| p.as_bytes().clone()),
                    b.key,
                ),
                Err(e) => return bad_request(&format!("JSON body: {e}")),
            },
            "application/cbor" => match CborBody::parse(&body, shared.config.session().payload) {
                Ok(b) => (b.room, b.event, Ok(b.data), b.key),
                Err(CborBodyError::Data(e)) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        Code::InvalidPayload,
                        &e.to_string(),
                    );
                }
                Err(e) => return bad_request(&format!("CBOR body: {e}")),
            },
            _ => {
                return (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Content-Type must be application/json or application/cbor\n",
                )
                    .into_response();
            }
        };
        // The `Idempotency-Key` header stands in for a body without `key`.
        let key = key.or_else(|| {
            headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        if key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return refuse(
                StatusCode::BAD_REQUEST,
                Code::InvalidKey,
                "idempotency key must be 1-64 bytes",
            );
        }
        let room = match RoomName::new(&room) {
            Ok(room) => room,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, Code::InvalidRoom, &e.to_string()),
        };
        let event = match EventName::new(&event) {
            Ok(event) => event,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, Code::InvalidEvent, &e.to_string()),
        };
        // One encode of `data`, then the same checks as a client's payload (depth cap).
        let limits = shared.config.session().payload;
        let refused = |e: &dyn std::fmt::Display| {
            refuse(
                StatusCode::BAD_REQUEST,
                Code::InvalidPayload,
                &e.to_string(),
            )
        };
        let data = match data.map(|p| Payload::new(p, limits)) {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => return refused(&e),
            Err(e) => return refused(&e),
        };
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let reply = ReplyTo::new(
            Arc::new(Waiting(std::sync::Mutex::new(Some(reply)))),
            Request { id: 0, ack: true },
        );
        let published = match shared
            .bridge
            .publish(&room, &event, &data, key.as_deref(), reply)
        {
            Ok(Some(delivery)) => Ok(delivery),
            // Stored in the room's history stream first: answer once it is.
            Ok(None) => match tokio::time::timeout(STORE_WAIT, outcome).await {
                Ok(Ok(outcome)) => outcome,
                _ => Err(Unavailable("the publish was not acknowledged in time")),
            },
            Err(e) => Err(e),
        };
        match published {
            Ok(delivery) => {
                shared.metrics.events_in.inc();
                shared.metrics.events_out.inc_by(delivery.delivered as u64);
                let mut body = serde_json::json!({"ok": true});
                if let Some(seq) = delivery.seq {
                    body["seq"] = seq.into();
                }
                if delivery.duplicate {
                    shared.metrics.duplicates.inc();
                    body["duplicate"] = true.into();
                }
                answer(StatusCode::OK, body)
            }
            Err(e) => {
                shared.metrics.count_code(Code::Unavailable);
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    &e.to_string(),
                )
            }
        }
    }
}
