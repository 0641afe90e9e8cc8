//! The scripted fake brokers the client's socket tests share: servers on 127.0.0.1 port 0
//! that play sessions from the broker's side, frame by frame. This module holds the WebSocket
//! fake (tokio-tungstenite); [`wt`] the WebTransport one. Logic without sockets is tested on
//! the protocol crate's two-peer pair (protocol/tests/pair.rs) instead.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

pub(crate) mod wt;

use std::{future::Future, time::Duration};

use futures_util::{SinkExt, StreamExt};
use roomcast_client::{
    Code, EventMessage, EventName, Payload, Position, RoomName, SubscriptionError,
};
use roomcast_protocol::{
    ClientFrame, PROTOCOL_VERSION, ServerFrame,
    frame::{Event, Welcome},
};
use tokio::{net::TcpListener, task::JoinHandle, time::timeout};
use tokio_tungstenite::{
    WebSocketStream, accept_async,
    tungstenite::{
        Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

/// Bound on every wait in these tests, so a bug fails the test instead of hanging it.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// The fake broker's clock in `Welcome` (ms since the Unix epoch).
pub(crate) const BROKER_TIME_MS: u64 = 1_700_000_000_000;

/// Awaits `future` within [`WAIT`], naming `what` when it does not finish.
pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The seq of the next item, which must be an event whose payload is its seq.
pub(crate) fn seq_of(item: Option<Result<EventMessage, SubscriptionError>>) -> u64 {
    let event = item.expect("stream ended").expect("expected an event");
    let decoded: u64 = event.decode().unwrap();
    assert_eq!(decoded, event.seq, "payload travels with its event");
    event.seq
}

pub(crate) fn at(epoch: u64, seq: u64) -> Position {
    Position { epoch, seq }
}

/// An event in `room` whose payload is its `seq`.
pub(crate) fn event(room: &str, seq: u64, epoch: Option<u64>) -> ServerFrame {
    ServerFrame::Event(Event {
        epoch,
        room: RoomName::new(room).unwrap(),
        event: EventName::new("tick").unwrap(),
        data: Payload::encode(&seq).unwrap(),
        seq,
    })
}

/// The `Welcome` the fakes send: session `session_id`, the broker's default timers.
pub(crate) fn welcome(session_id: &str) -> ServerFrame {
    ServerFrame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        session_id: session_id.into(),
        server_time_ms: BROKER_TIME_MS,
        max_frame_size: 65536,
        ping_interval_ms: 25_000,
        idle_timeout_ms: 60_000,
    })
}

/// Checks that `frame` is `Hello` of this protocol version; returns its token.
pub(crate) fn hello_token(frame: ClientFrame) -> Option<String> {
    match frame {
        ClientFrame::Hello { version, token } => {
            assert_eq!(version, PROTOCOL_VERSION);
            token
        }
        other => panic!("expected Hello, got {other:?}"),
    }
}

/// A WebSocket fake broker: a listener that plays one scripted session per accepted
/// connection.
pub(crate) struct Fake {
    listener: TcpListener,
    pub(crate) url: String,
}

impl Fake {
    pub(crate) async fn bind() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        Fake { listener, url }
    }

    /// The next session.
    pub(crate) async fn accept(&self) -> Peer {
        let (tcp, _) = within("a connection", self.listener.accept())
            .await
            .unwrap();
        Peer {
            ws: accept_async(tcp).await.unwrap(),
        }
    }
}

/// Starts a WebSocket fake broker that runs `script` on the first connection; returns its
/// URL.
pub(crate) async fn fake_broker<F, Fut>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fake = Fake::bind().await;
    let url = fake.url.clone();
    let task = tokio::spawn(async move { script(fake.accept().await).await });
    (url, task)
}

/// A URL nobody listens on (a port just freed): connecting is refused.
pub(crate) async fn refusing_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// The broker's end of one WebSocket session.
pub(crate) struct Peer {
    pub(crate) ws: WebSocketStream<tokio::net::TcpStream>,
}

impl Peer {
    /// The next client frame; WebSocket control messages are skipped.
    pub(crate) async fn recv(&mut self) -> ClientFrame {
        loop {
            let message = within("a client frame", self.ws.next())
                .await
                .expect("client hung up")
                .expect("websocket error");
            match message {
                Message::Binary(bytes) => {
                    return ClientFrame::decode(&bytes).expect("client sent a bad frame");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message from client: {other:?}"),
            }
        }
    }

    /// The next message of any kind, raw (None when the stream ended).
    pub(crate) async fn recv_message(&mut self) -> Option<Message> {
        within("a client message", self.ws.next())
            .await
            .map(|m| m.expect("websocket error"))
    }

    pub(crate) async fn send(&mut self, frame: ServerFrame) {
        self.ws
            .send(Message::Binary(frame.encode()))
            .await
            .expect("send to client");
    }

    /// Reads `Hello` (returning its token) and answers `Welcome` with `session_id`.
    pub(crate) async fn handshake(&mut self, session_id: &str) -> Option<String> {
        let token = hello_token(self.recv().await);
        self.send(welcome(session_id)).await;
        token
    }

    /// Expects `Subscribe` for `room`; returns its id and `since`.
    pub(crate) async fn expect_subscribe(&mut self, room: &str) -> (u64, Option<Position>) {
        match self.recv().await {
            ClientFrame::Subscribe {
                id,
                room: asked,
                since,
            } => {
                assert_eq!(asked, room);
                (id, since)
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
    }

    pub(crate) async fn subscribed(
        &mut self,
        id: u64,
        room: &str,
        at: Position,
        recovered: Option<bool>,
    ) {
        self.send(ServerFrame::Subscribed {
            id,
            room: RoomName::new(room).unwrap(),
            seq: at.seq,
            epoch: at.epoch,
            recovered,
        })
        .await;
    }

    /// Expects a first `Subscribe` (no `since`) for `room` and confirms it at `at`.
    pub(crate) async fn accept_subscribe(&mut self, room: &str, at: Position) {
        let (id, since) = self.expect_subscribe(room).await;
        assert_eq!(since, None, "a first subscribe carries no since");
        self.subscribed(id, room, at, None).await;
    }

    pub(crate) async fn event(&mut self, room: &str, seq: u64, epoch: Option<u64>) {
        self.send(event(room, seq, epoch)).await;
    }

    /// Expects `Ping { id }` and answers `Pong`.
    pub(crate) async fn answer_ping(&mut self) {
        match self.recv().await {
            ClientFrame::Ping { id: Some(id) } => {
                self.send(ServerFrame::Pong { id: Some(id) }).await
            }
            other => panic!("expected Ping with id, got {other:?}"),
        }
    }

    /// Expects an acknowledged `Publish`; returns its id, key and decoded payload.
    pub(crate) async fn expect_publish(&mut self) -> (u64, Option<String>, u64) {
        match self.recv().await {
            ClientFrame::Publish {
                id,
                key,
                data,
                ack: true,
                ..
            } => {
                let payload = Payload::new(data, Default::default()).unwrap();
                (id, key, payload.decode().unwrap())
            }
            other => panic!("expected an acknowledged Publish, got {other:?}"),
        }
    }

    /// Ends the session the way the broker does, with the code's own reconnect hint.
    pub(crate) async fn close(&mut self, code: Code, reason: &str) {
        self.close_with(code, reason, code.should_retry(), None)
            .await;
    }

    /// Sends `Close` and closes the WebSocket with the code, then lets the client answer the
    /// close.
    pub(crate) async fn close_with(
        &mut self,
        code: Code,
        reason: &str,
        reconnect: bool,
        retry_after_ms: Option<u64>,
    ) {
        self.send(ServerFrame::Close {
            code,
            reason: reason.into(),
            reconnect,
            retry_after_ms,
        })
        .await;
        let frame = CloseFrame {
            code: CloseCode::from(code.ws_close_code()),
            reason: reason.into(),
        };
        let _ = self.ws.close(Some(frame)).await;
        while let Ok(Some(Ok(_))) = timeout(WAIT, self.ws.next()).await {}
    }

    /// Waits until the client ends the session (its close, or the connection dropping).
    pub(crate) async fn until_client_leaves(mut self) {
        while let Ok(Some(Ok(message))) = timeout(WAIT, self.ws.next()).await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    }
}
