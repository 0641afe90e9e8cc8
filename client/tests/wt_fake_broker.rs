//! The client's WebTransport transport against a scripted fake broker: a wtransport server on
//! 127.0.0.1 UDP port 0 with a fresh self-signed ECDSA P-256 certificate (valid 13 days, so it
//! can be pinned by hash), playing one session from the broker's side. The client opens the
//! control stream; the fake opens one unidirectional stream per subscribed room, as the real
//! broker does.

use std::{future::Future, time::Duration};

use roomcast_client::{
    Client, CloseInfo, Code, ConnectOptions, Error, EventName, Payload, RoomName,
    SubscriptionError, connect,
};
use roomcast_protocol::{
    ClientFrame, PROTOCOL_VERSION, ServerFrame,
    frame::{Event, Welcome},
    stream::{FrameSplitter, write_prefix},
};
use tokio::{io::AsyncReadExt, task::JoinHandle, time::timeout};
use wtransport::{
    Connection, Endpoint, Identity, RecvStream, SendStream, ServerConfig, VarInt,
    error::ConnectionError,
};

/// Bound on every wait in these tests, so a bug fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A certificate the client can pin: ECDSA P-256, valid for less than 14 days.
fn identity() -> Identity {
    Identity::self_signed_builder()
        .subject_alt_names(["localhost", "127.0.0.1"])
        .from_now_utc()
        .validity_days(13)
        .build()
        .unwrap()
}

fn cert_hash(identity: &Identity) -> [u8; 32] {
    let digest = identity.certificate_chain().as_slice()[0].hash();
    let bytes: &[u8; 32] = digest.as_ref();
    *bytes
}

/// Writes `frame` with its length prefix.
async fn write_frame(stream: &mut SendStream, frame: &[u8]) {
    let mut wire = Vec::with_capacity(frame.len() + 8);
    write_prefix(frame.len(), &mut wire);
    wire.extend_from_slice(frame);
    stream.write_all(&wire).await.expect("write to the client");
}

/// The broker's end of one room stream.
struct RoomStream {
    send: SendStream,
}

impl RoomStream {
    async fn send(&mut self, frame: ServerFrame) {
        write_frame(&mut self.send, &frame.encode()).await;
    }

    async fn event(&mut self, room: &str, seq: u64) {
        self.send(event(room, seq)).await;
    }

    /// Ends the stream the way the broker does after `Unsubscribed`.
    async fn finish(mut self) {
        within(
            "the room stream's FIN to be acknowledged",
            self.send.finish(),
        )
        .await
        .expect("finish the room stream");
    }
}

fn event(room: &str, seq: u64) -> ServerFrame {
    ServerFrame::Event(Event {
        epoch: None,
        room: RoomName::new(room).unwrap(),
        event: EventName::new("tick").unwrap(),
        data: Payload::encode(&seq).unwrap(),
        seq,
    })
}

/// The broker's end of one session.
struct Peer {
    connection: Connection,
    control_send: SendStream,
    control_recv: RecvStream,
    splitter: FrameSplitter,
}

impl Peer {
    /// The next client frame on the control stream.
    async fn recv(&mut self) -> ClientFrame {
        let frame = within("a client frame", async {
            loop {
                if let Some(frame) = self.splitter.next_frame().expect("client frame too large") {
                    return frame;
                }
                let read = self
                    .control_recv
                    .read_buf(self.splitter.buffer(4096))
                    .await
                    .expect("read the control stream");
                assert!(read > 0, "the client ended the control stream");
            }
        })
        .await;
        ClientFrame::decode(&frame).expect("client sent a bad frame")
    }

    async fn send(&mut self, frame: ServerFrame) {
        write_frame(&mut self.control_send, &frame.encode()).await;
    }

    /// Reads `Hello` (returning its token) and answers `Welcome` on the control stream.
    async fn handshake(&mut self) -> Option<String> {
        let token = match self.recv().await {
            ClientFrame::Hello { version, token } => {
                assert_eq!(version, PROTOCOL_VERSION);
                token
            }
            other => panic!("expected Hello, got {other:?}"),
        };
        self.handshake_welcome().await;
        token
    }

    /// Sends `Welcome` on the control stream.
    async fn handshake_welcome(&mut self) {
        self.send(ServerFrame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session_id: "s-wt".into(),
            server_time_ms: 1_700_000_000_000,
            max_frame_size: 65536,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
        }))
        .await;
    }

    async fn open_room_stream(&self) -> RoomStream {
        let opening = within("open_uni", self.connection.open_uni())
            .await
            .expect("open a room stream");
        let send = within("the room stream", opening)
            .await
            .expect("open a room stream");
        RoomStream { send }
    }

    /// Expects `Subscribe` for `room`, opens the room's stream and confirms on it at `seq`.
    async fn accept_subscribe(&mut self, room: &str, seq: u64) -> RoomStream {
        match self.recv().await {
            ClientFrame::Subscribe {
                id, room: asked, ..
            } => {
                assert_eq!(asked, room);
                let mut stream = self.open_room_stream().await;
                stream
                    .send(ServerFrame::Subscribed {
                        epoch: 0,
                        recovered: None,
                        id,
                        room: RoomName::new(room).unwrap(),
                        seq,
                    })
                    .await;
                stream
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
    }

    /// Expects `Publish` with `ack` for `room`; returns its id.
    async fn expect_publish(&mut self, room: &str) -> u64 {
        match self.recv().await {
            ClientFrame::Publish {
                id,
                room: asked,
                ack: true,
                ..
            } => {
                assert_eq!(asked, room);
                id
            }
            other => panic!("expected Publish with ack, got {other:?}"),
        }
    }

    /// Ends the session the way the broker does: `Close` frame on the control stream, then
    /// the session closed with the code's value and name. The control stream is finished and
    /// acknowledged first, since closing a QUIC connection discards unsent stream data.
    async fn close(mut self, code: Code, reason: &str, reconnect: bool) {
        self.send(ServerFrame::Close {
            retry_after_ms: None,
            code,
            reason: reason.into(),
            reconnect,
        })
        .await;
        within(
            "the Close frame to be acknowledged",
            self.control_send.finish(),
        )
        .await
        .expect("finish the control stream");
        self.close_session(code);
        self.connection.closed().await;
    }

    /// Closes the session with `code` and its name, without a `Close` frame.
    fn close_session(&self, code: Code) {
        self.connection.close(
            VarInt::from_u32(code.value().into()),
            code.as_str().as_bytes(),
        );
    }
}

/// A fake broker serving one session at its URL.
struct Fake {
    url: String,
    hash: [u8; 32],
    pem: String,
    task: JoinHandle<()>,
}

impl Fake {
    /// Pinning options for this broker.
    fn pinned(&self) -> ConnectOptions {
        ConnectOptions {
            cert_hash: Some(self.hash),
            ..ConnectOptions::default()
        }
    }

    /// Waits for the script to finish, surfacing its panics.
    async fn done(self) {
        within("the fake broker's script", self.task)
            .await
            .expect("fake broker script failed");
    }
}

/// Starts a fake broker on 127.0.0.1 port 0 that runs `script` on the first session.
fn fake_broker<F, Fut>(script: F) -> Fake
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let identity = identity();
    let hash = cert_hash(&identity);
    let pem = identity.certificate_chain().as_slice()[0].to_pem();
    let config = ServerConfig::builder()
        .with_bind_address("127.0.0.1:0".parse().unwrap())
        .with_identity(identity)
        .build();
    let endpoint = Endpoint::server(config).expect("bind the fake broker");
    let url = format!("https://{}/wt", endpoint.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let request = endpoint
            .accept()
            .await
            .await
            .expect("QUIC handshake with the client");
        assert_eq!(request.path(), "/wt");
        let connection = request.accept().await.expect("accept the session");
        let (control_send, control_recv) = connection
            .accept_bi()
            .await
            .expect("the client's control stream");
        script(Peer {
            connection,
            control_send,
            control_recv,
            splitter: FrameSplitter::new(1 << 20),
        })
        .await;
        // Keep the endpoint until the script is done.
        drop(endpoint);
    });
    Fake {
        url,
        hash,
        pem,
        task,
    }
}

async fn client(fake: &Fake) -> Client {
    within("connect", connect(&fake.url, fake.pinned()))
        .await
        .expect("connect")
}

fn seq_of(item: Option<Result<roomcast_client::EventMessage, SubscriptionError>>) -> u64 {
    let event = item.expect("stream ended").expect("expected an event");
    let decoded: u64 = event.decode().unwrap();
    assert_eq!(decoded, event.seq, "payload travels with its event");
    event.seq
}

#[tokio::test]
async fn pinned_hash_connects_and_hello_welcome_use_the_control_stream() {
    let fake = fake_broker(|mut peer| async move {
        assert_eq!(peer.handshake().await.as_deref(), Some("secret"));
        // Keepalive pings work unchanged on the control stream.
        match peer.recv().await {
            ClientFrame::Ping { id: Some(id) } => {
                peer.send(ServerFrame::Pong { id: Some(id) }).await
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        // The client's close ends the session with code 0.
        let ended = within("the client's close", peer.connection.closed()).await;
        match ended {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.code(), VarInt::from_u32(0));
            }
            other => panic!("expected an application close, got {other:?}"),
        }
    });
    let options = ConnectOptions {
        token: Some("secret".into()),
        ..fake.pinned()
    };
    let client = within("connect", connect(&fake.url, options))
        .await
        .expect("connect with the pinned hash");
    assert_eq!(client.session_id(), "s-wt");
    assert_eq!(client.max_frame_size(), 65536);
    within("ping", client.ping()).await.expect("pong");
    within("close", client.close()).await;
    assert_eq!(client.closed().await, closed_by_client());
    fake.done().await;
}

fn closed_by_client() -> CloseInfo {
    CloseInfo {
        code: Some(Code::Normal),
        reason: "closed by the client".into(),
        reconnect: false,
    }
}

#[tokio::test]
async fn a_wrong_certificate_hash_is_refused() {
    let fake = fake_broker(|_peer| async move {
        panic!("no session may open with a wrong certificate hash");
    });
    let mut wrong = fake.hash;
    wrong[0] ^= 0xff;
    let options = ConnectOptions {
        cert_hash: Some(wrong),
        ..ConnectOptions::default()
    };
    match within("connect", connect(&fake.url, options)).await {
        Err(Error::Transport(message)) => {
            assert!(!message.is_empty());
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    // The fake's QUIC handshake failed, so its script never ran.
    let panic = within("the fake broker", fake.task)
        .await
        .expect_err("the fake must not get a session")
        .into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("QUIC handshake"), "{message}");
}

#[tokio::test]
async fn default_roots_refuse_a_self_signed_broker() {
    let fake = fake_broker(|_peer| async move {
        panic!("no session may open without trusting the certificate");
    });
    match within("connect", connect(&fake.url, ConnectOptions::default())).await {
        Err(Error::Transport(_)) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    fake.task.abort();
}

#[tokio::test]
async fn ca_file_and_insecure_also_connect() {
    for mode in ["ca_file", "insecure"] {
        let fake = fake_broker(|mut peer| async move {
            peer.handshake().await;
            peer.connection.closed().await;
        });
        let dir = std::env::temp_dir().join(format!("roomcast-wt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join(format!("{mode}.pem"));
        std::fs::write(&ca, &fake.pem).unwrap();
        let options = match mode {
            "ca_file" => ConnectOptions {
                ca_file: Some(ca.clone()),
                ..ConnectOptions::default()
            },
            _ => ConnectOptions {
                insecure: true,
                ..ConnectOptions::default()
            },
        };
        let client = within("connect", connect(&fake.url, options))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        client.close().await;
        fake.done().await;
        let _ = std::fs::remove_file(&ca);
    }
}

#[tokio::test]
async fn subscribe_resolves_on_the_room_stream_and_rooms_keep_their_order() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let mut a = peer.accept_subscribe("ticks:a", 10).await;
        let mut b = peer.accept_subscribe("ticks:b", 100).await;
        // Interleaved across the two streams; each stream in order.
        for i in 1..=20 {
            a.event("ticks:a", 10 + i).await;
            b.event("ticks:b", 100 + i).await;
        }
        // Leaving room a: Unsubscribed on its stream, then FIN.
        match peer.recv().await {
            ClientFrame::Unsubscribe { id, room } => {
                assert_eq!(room, "ticks:a");
                a.send(ServerFrame::Unsubscribed {
                    id,
                    room: RoomName::new("ticks:a").unwrap(),
                })
                .await;
                a.finish().await;
            }
            other => panic!("expected Unsubscribe, got {other:?}"),
        }
        // Room b goes on after room a's stream ended.
        b.event("ticks:b", 121).await;
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let mut a = within("subscribe a", client.subscribe("ticks:a"))
        .await
        .expect("Subscribed on a room stream resolves subscribe");
    assert_eq!(a.start_seq(), 10);
    let mut b = within("subscribe b", client.subscribe("ticks:b"))
        .await
        .expect("subscribe b");
    assert_eq!(b.start_seq(), 100);
    for i in 1..=20 {
        assert_eq!(seq_of(within("event a", a.next_event()).await), 10 + i);
    }
    for i in 1..=20 {
        assert_eq!(seq_of(within("event b", b.next_event()).await), 100 + i);
    }
    within("unsubscribe a", a.unsubscribe())
        .await
        .expect("Unsubscribed on the room stream");
    assert_eq!(seq_of(within("event b", b.next_event()).await), 121);
    client.close().await;
    fake.done().await;
}

#[tokio::test]
async fn an_ack_on_the_control_stream_resolves_publish() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let mut room = peer.accept_subscribe("orders:1", 4).await;
        let id = peer.expect_publish("orders:1").await;
        // The Ack overtakes the publisher's own echo: it goes out first, on another stream.
        peer.send(ServerFrame::Ack { id, seq: Some(5) }).await;
        room.event("orders:1", 5).await;
        // A publish without ack sent just before the client closes still arrives.
        match peer.recv().await {
            ClientFrame::Publish { ack: false, .. } => {}
            other => panic!("expected Publish without ack, got {other:?}"),
        }
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let mut orders = client.subscribe("orders:1").await.unwrap();
    let seq = within("publish", client.publish("orders:1", "status", &5u64))
        .await
        .expect("ack");
    assert_eq!(seq, Some(5));
    assert_eq!(seq_of(within("echo", orders.next_event()).await), 5);
    client
        .publish_payload("orders:1", "status", Payload::encode(&6u64).unwrap(), false)
        .await
        .unwrap();
    client.close().await;
    fake.done().await;
}

#[tokio::test]
async fn a_close_frame_on_the_control_stream_ends_pending_requests_with_its_code() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let _room = peer.accept_subscribe("orders:1", 0).await;
        peer.expect_publish("orders:1").await;
        peer.close(Code::SlowConsumer, "too slow", true).await;
    });
    let client = client(&fake).await;
    let mut orders = client.subscribe("orders:1").await.unwrap();
    let expected = CloseInfo {
        code: Some(Code::SlowConsumer),
        // The frame's reason, not the session close's ("slow_consumer"): the frame came first.
        reason: "too slow".into(),
        reconnect: true,
    };
    let published = within("publish", client.publish("orders:1", "e", &1u64)).await;
    assert_eq!(published, Err(Error::Closed(expected.clone())));
    assert_eq!(
        within("subscription end", orders.next_event()).await,
        Some(Err(SubscriptionError::Closed(expected.clone())))
    );
    assert_eq!(within("closed", client.closed()).await, expected);
    fake.done().await;
}

#[tokio::test]
async fn a_session_closed_with_4001_and_no_close_frame_is_shutting_down() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        peer.expect_publish("orders:1").await;
        peer.close_session(Code::ShuttingDown);
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let expected = CloseInfo {
        code: Some(Code::ShuttingDown),
        reason: "shutting_down".into(),
        reconnect: true,
    };
    let published = within("publish", client.publish("orders:1", "e", &1u64)).await;
    assert_eq!(published, Err(Error::Closed(expected.clone())));
    assert_eq!(within("closed", client.closed()).await, expected);
    // Nothing more can be asked of a closed session.
    assert_eq!(
        client.subscribe("orders:1").await.map(|_| ()),
        Err(Error::Closed(expected))
    );
    fake.done().await;
}

#[tokio::test]
async fn an_oversized_frame_on_a_room_stream_ends_the_session() {
    let fake = fake_broker(|mut peer| async move {
        peer.handshake().await;
        let mut room = peer.accept_subscribe("big:1", 0).await;
        // Announce a frame far beyond the client's limit (Welcome said 64 KiB) and send a
        // little of it: the client must give up without buffering it.
        let mut prefix = Vec::new();
        write_prefix(64 << 20, &mut prefix);
        room.send.write_all(&prefix).await.unwrap();
        room.send.write_all(&[0u8; 1024]).await.unwrap();
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    let mut big = client.subscribe("big:1").await.unwrap();
    match within("subscription end", big.next_event()).await {
        Some(Err(SubscriptionError::Closed(info))) => {
            assert_eq!(info.code, None);
            assert!(info.reason.contains("exceeds the limit"), "{}", info.reason);
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    // The transport was dropped broken: the session ends for the broker too.
    fake.done().await;
}

#[tokio::test]
async fn room_stream_frames_that_overtake_welcome_do_not_break_the_handshake() {
    // QUIC does not order streams: the broker's own join (Subscribed id 0 on a room stream)
    // can be read before Welcome on the control stream (PROTOCOL.md §2b).
    let fake = fake_broker(|mut peer| async move {
        match peer.recv().await {
            ClientFrame::Hello { .. } => {}
            other => panic!("expected Hello, got {other:?}"),
        }
        let mut personal = peer.open_room_stream().await;
        personal
            .send(ServerFrame::Subscribed {
                id: 0,
                room: RoomName::new("user:alice").unwrap(),
                seq: 0,
                epoch: 0,
                recovered: None,
            })
            .await;
        // Give the client time to read the room stream first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        peer.handshake_welcome().await;
        match peer.recv().await {
            ClientFrame::Ping { id: Some(id) } => {
                peer.send(ServerFrame::Pong { id: Some(id) }).await
            }
            other => panic!("expected Ping, got {other:?}"),
        }
        peer.connection.closed().await;
    });
    let client = client(&fake).await;
    assert_eq!(client.session_id(), "s-wt");
    within("ping", client.ping())
        .await
        .expect("the session works");
    client.close().await;
    fake.done().await;
}
