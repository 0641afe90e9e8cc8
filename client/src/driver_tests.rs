//! The connection task against an in-memory connector: with a scripted jitter source the
//! reconnect backoff is deterministic (every delay and URL of every attempt).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use roomcast_protocol::{PROTOCOL_VERSION, frame::Welcome};
use tokio::{
    sync::{broadcast, mpsc, watch},
    time::Instant,
};

use crate::{
    connection::{Connector, OpenError, Opened},
    driver::{Driver, Setup},
    error::Error,
    options::ConnectOptions,
    reconnect::{Jitter, ReconnectPolicy},
    state::{ClientEvent, Phase, Status},
    transport::{Incoming, LocalClose, Transport, TransportError},
};

/// A transport that drops what it is sent; the first one opened is lost at once, the
/// others stay quiet.
struct FakeLink {
    lost: bool,
}

impl Transport for FakeLink {
    async fn send(&mut self, _frame: Bytes) -> Result<(), TransportError> {
        Ok(())
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        if self.lost {
            self.lost = false;
            return Ok(Incoming::Closed {
                code: None,
                reason: "cable cut".into(),
            });
        }
        std::future::pending().await
    }

    async fn close(&mut self, _how: LocalClose) {}
}

/// Refuses the first `refusals` attempts, then opens a session.
#[derive(Clone)]
struct FakeConnector {
    attempts: Arc<AtomicUsize>,
    refusals: usize,
}

fn welcome(session_id: &str) -> Welcome {
    Welcome {
        version: PROTOCOL_VERSION,
        session_id: session_id.into(),
        server_time_ms: 1_700_000_000_000,
        max_frame_size: 65536,
        // No keepalive or idle timer.
        ping_interval_ms: 0,
        idle_timeout_ms: 0,
    }
}

fn opened(lost: bool, session_id: &str) -> Opened<FakeLink> {
    Opened {
        link: FakeLink { lost },
        welcome: welcome(session_id),
        welcomed_at: Instant::now(),
        token: None,
        early: Vec::new(),
    }
}

impl Connector for FakeConnector {
    type Link = FakeLink;

    async fn open(
        &self,
        _url: &str,
        _token: Option<String>,
        _options: &ConnectOptions,
    ) -> Result<Opened<FakeLink>, OpenError> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
        if attempt < self.refusals {
            return Err(Error::Transport("refused".into()).into());
        }
        Ok(opened(false, "s-2"))
    }
}

#[tokio::test]
async fn reconnect_backoff_with_a_scripted_jitter_is_deterministic() {
    // The jitter source answers the full ceiling every time.
    let jitter: Jitter = Box::new(|ceiling| ceiling);
    let options = ConnectOptions {
        reconnect: Some(ReconnectPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            max_attempts: None,
        }),
        ..ConnectOptions::default()
    };
    let urls: Vec<String> = vec!["fake://a".into(), "fake://b".into()];
    let (_commands, commands_rx) = mpsc::channel(8);
    let (status, _status_rx) = watch::channel(Status {
        phase: Phase::Open {
            url: urls[0].clone(),
        },
        welcome: welcome("s-1"),
    });
    let (events, mut events_rx) = broadcast::channel(64);
    let connector = FakeConnector {
        attempts: Arc::new(AtomicUsize::new(0)),
        refusals: 4,
    };
    let driver = Driver::new(Setup {
        connector: connector.clone(),
        opened: opened(true, "s-1"),
        urls,
        url_index: 0,
        options,
        commands: commands_rx,
        status,
        events,
        next_id: Arc::new(AtomicU64::new(1)),
        jitter,
    });
    let started = Instant::now();
    let task = tokio::spawn(driver.run());

    let mut waits = Vec::new();
    let mut failed = 0;
    loop {
        match events_rx.recv().await.expect("the driver runs") {
            ClientEvent::Reconnecting {
                attempt,
                delay,
                url,
            } => waits.push((attempt, delay.as_millis(), url)),
            ClientEvent::ConnectFailed { .. } => failed += 1,
            ClientEvent::Connected { session_id, url } if session_id == "s-2" => {
                assert_eq!(url, "fake://b");
                break;
            }
            _ => {}
        }
    }
    let url = |u: &str| u.to_owned();
    assert_eq!(
        waits,
        [
            (1, 1, url("fake://b")),
            (2, 2, url("fake://a")),
            (3, 4, url("fake://b")),
            (4, 5, url("fake://a")),
            (5, 5, url("fake://b")),
        ]
    );
    assert_eq!(failed, 4);
    assert_eq!(connector.attempts.load(Ordering::SeqCst), 5);
    assert!(
        started.elapsed() >= Duration::from_millis(17),
        "every delay was waited"
    );
    task.abort();
}
