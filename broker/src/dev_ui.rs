//! The development UI: with `roomcast serve --dev-ui DIR` the TCP port also serves the static
//! files of `DIR` at `/` (tower-http's `ServeDir`; `/` is `DIR/index.html`) and
//! `GET /dev-ui.js`, a small ES module the page imports to learn the WebTransport certificate
//! hash it must pin (`serverCertificateHashes`): the in-memory development certificate has a
//! new hash at every start, so the page cannot hold it. For trying the broker from a browser
//! (`examples/browser`), not for production: the files are served to anyone who can reach the
//! port. Without `--dev-ui` nothing here is routed.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use tower_http::services::ServeDir;

use crate::node::Shared;

/// The dev UI's routes (none without `--dev-ui`), to merge into the broker's router.
pub(crate) fn router(shared: &Shared) -> Router<Arc<Shared>> {
    match &shared.config.dev_ui {
        Some(dir) => Router::new()
            .route("/dev-ui.js", get(dev_ui_js))
            .fallback_service(ServeDir::new(dir)),
        None => Router::new(),
    }
}

/// `GET /dev-ui.js`: `export const certHash = "<64 hex digits>"` (or `null` while WebTransport
/// is off) and `notAfter`, the certificate's expiry in Unix seconds (or `null`).
async fn dev_ui_js(State(shared): State<Arc<Shared>>) -> Response {
    let cert = shared
        .cert
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (hash, not_after) = match &cert {
        Some(info) => (
            format!("\"{}\"", info.hex()),
            info.not_after_unix
                .map_or_else(|| "null".to_owned(), |t| t.to_string()),
        ),
        None => ("null".to_owned(), "null".to_owned()),
    };
    let body = format!(
        "// Written by `roomcast serve --dev-ui`: the certificate this broker serves over QUIC.\n\
         export const certHash = {hash};\n\
         export const notAfter = {not_after};\n"
    );
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use crate::{Config, Server};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A broker on 127.0.0.1 port 0, without WebTransport unless asked.
    async fn broker(dev_ui: Option<std::path::PathBuf>, webtransport: bool) -> Server {
        Server::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            no_webtransport: !webtransport,
            dev_ui,
            ..Config::default()
        })
        .await
        .unwrap()
    }

    /// `GET path` over HTTP/1.0: the status and the body.
    async fn get(server: &Server, path: &str) -> (u16, String) {
        let mut tcp = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn serves_the_folder_and_the_certificate_hash() {
        let dir = std::env::temp_dir().join(format!("roomcast-dev-ui-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), "<h1>demo</h1>").unwrap();
        let server = broker(Some(dir.clone()), true).await;
        assert_eq!(get(&server, "/").await, (200, "<h1>demo</h1>".into()));
        assert_eq!(get(&server, "/missing.js").await.0, 404);
        assert_eq!(get(&server, "/healthz").await, (200, "ok\n".into()));
        let (status, module) = get(&server, "/dev-ui.js").await;
        assert_eq!(status, 200);
        let hash = server
            .shared()
            .cert
            .read()
            .unwrap()
            .as_ref()
            .map(|c| c.hex())
            .unwrap();
        assert!(
            module.contains(&format!("export const certHash = \"{hash}\";")),
            "{module}"
        );
        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn hash_is_null_without_webtransport_and_nothing_without_the_flag() {
        let dir = std::env::temp_dir();
        let server = broker(Some(dir), false).await;
        let (status, module) = get(&server, "/dev-ui.js").await;
        assert_eq!(status, 200);
        assert!(module.contains("export const certHash = null;"), "{module}");
        server.shutdown().await.unwrap();

        let server = broker(None, false).await;
        assert_eq!(get(&server, "/dev-ui.js").await.0, 404);
        assert_eq!(get(&server, "/").await.0, 404);
        server.shutdown().await.unwrap();
    }
}
