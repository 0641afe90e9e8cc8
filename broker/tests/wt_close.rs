//! How the broker ends WebTransport sessions: its `Close` frame on the control stream, then
//! the `CLOSE_WEBTRANSPORT_SESSION` capsule carrying the code's value and name, so that the
//! client's session (a browser's `WebTransport.closed`) reports the broker's code rather than
//! a QUIC connection close.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{wt::*, *};
use roomcast_protocol::{Code, ServerFrame};

#[tokio::test]
async fn a_session_without_control_stream_ends_with_the_timeout_capsule() {
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let connection = session(&server, cert_hash(&server)).await.unwrap();
    assert_eq!(session_end(&connection).await, capsule_of(Code::Timeout));
}

#[tokio::test]
async fn a_protocol_error_sends_the_close_frame_then_the_capsule() {
    let server = start(config()).await;
    let mut bad = RawWt::open(&server).await;
    bad.send_raw(Bytes::from_static(&[0xff, 0x00])).await;
    // A client that reads the Close frame but does not close: the capsule follows.
    match bad.control.frame().await {
        ServerFrame::Close { code, .. } => assert_eq!(code, Code::ProtocolError),
        other => panic!("expected Close, got {other:?}"),
    }
    assert_eq!(
        session_end(&bad.connection).await,
        capsule_of(Code::ProtocolError)
    );
}

#[tokio::test]
async fn shutdown_ends_sessions_with_the_shutting_down_capsule() {
    let server = start(config()).await;
    let mut wt = RawWt::open(&server).await;
    let _room = wt.subscribe(1, "drain:1").await;
    let shutdown = tokio::spawn(server.shutdown());
    match wt.control.frame().await {
        ServerFrame::Close { code, .. } => assert_eq!(code, Code::ShuttingDown),
        other => panic!("expected Close, got {other:?}"),
    }
    assert_eq!(
        session_end(&wt.connection).await,
        capsule_of(Code::ShuttingDown)
    );
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("drain finishes")
        .unwrap()
        .expect("clean shutdown");
}
