//! The WebTransport fake broker: a wtransport server on 127.0.0.1 UDP port 0 with a fresh
//! self-signed ECDSA P-256 certificate (valid 13 days, so it can be pinned by hash), playing
//! one session from the broker's side. The client opens the control stream; the fake opens one
//! unidirectional stream per subscribed room, as the real broker does.

use std::future::Future;

use roomcast_client::{Code, ConnectOptions, RoomName};
use roomcast_protocol::{
    ClientFrame, ServerFrame,
    stream::{FrameSplitter, write_prefix},
};
use tokio::{io::AsyncReadExt, task::JoinHandle};
use wtransport::{Connection, Endpoint, Identity, RecvStream, SendStream, ServerConfig, VarInt};

use super::{event, hello_token, welcome, within};

/// A certificate the client can pin: ECDSA P-256, valid for less than 14 days.
pub(crate) fn identity() -> Identity {
    Identity::self_signed_builder()
        .subject_alt_names(["localhost", "127.0.0.1"])
        .from_now_utc()
        .validity_days(13)
        .build()
        .unwrap()
}

pub(crate) fn cert_hash(identity: &Identity) -> [u8; 32] {
    let digest = identity.certificate_chain().as_slice()[0].hash();
    let bytes: &[u8; 32] = digest.as_ref();
    *bytes
}

/// Writes `frame` with its length prefix.
pub(crate) async fn write_frame(stream: &mut SendStream, frame: &[u8]) {
    let mut wire = Vec::with_capacity(frame.len() + 8);
    write_prefix(frame.len(), &mut wire);
    wire.extend_from_slice(frame);
    stream.write_all(&wire).await.expect("write to the client");
}

/// The broker's end of one room stream.
pub(crate) struct RoomStream {
    pub(crate) send: SendStream,
}

impl RoomStream {
    pub(crate) async fn send(&mut self, frame: ServerFrame) {
        write_frame(&mut self.send, &frame.encode()).await;
    }

    pub(crate) async fn event(&mut self, room: &str, seq: u64) {
        self.send(event(room, seq, None)).await;
    }

    /// Ends the stream the way the broker does after `Unsubscribed`.
    pub(crate) async fn finish(mut self) {
        within(
            "the room stream's FIN to be acknowledged",
            self.send.finish(),
        )
        .await
        .expect("finish the room stream");
    }
}

/// The broker's end of one session.
pub(crate) struct Peer {
    pub(crate) connection: Connection,
    pub(crate) control_send: SendStream,
    pub(crate) control_recv: RecvStream,
    pub(crate) splitter: FrameSplitter,
}

impl Peer {
    /// The next client frame on the control stream.
    pub(crate) async fn recv(&mut self) -> ClientFrame {
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

    pub(crate) async fn send(&mut self, frame: ServerFrame) {
        write_frame(&mut self.control_send, &frame.encode()).await;
    }

    /// Reads `Hello` (returning its token) and answers `Welcome` on the control stream.
    pub(crate) async fn handshake(&mut self) -> Option<String> {
        let token = hello_token(self.recv().await);
        self.handshake_welcome().await;
        token
    }

    /// Sends `Welcome` on the control stream.
    pub(crate) async fn handshake_welcome(&mut self) {
        self.send(welcome("s-wt")).await;
    }

    pub(crate) async fn open_room_stream(&self) -> RoomStream {
        let opening = within("open_uni", self.connection.open_uni())
            .await
            .expect("open a room stream");
        let send = within("the room stream", opening)
            .await
            .expect("open a room stream");
        RoomStream { send }
    }

    /// Expects `Subscribe` for `room`, opens the room's stream and confirms on it at `seq`.
    pub(crate) async fn accept_subscribe(&mut self, room: &str, seq: u64) -> RoomStream {
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
    pub(crate) async fn expect_publish(&mut self, room: &str) -> u64 {
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
    pub(crate) async fn close(mut self, code: Code, reason: &str, reconnect: bool) {
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
    pub(crate) fn close_session(&self, code: Code) {
        self.connection.close(
            VarInt::from_u32(code.value().into()),
            code.as_str().as_bytes(),
        );
    }
}

/// A fake broker serving one session at its URL.
pub(crate) struct Fake {
    pub(crate) url: String,
    pub(crate) hash: [u8; 32],
    pub(crate) pem: String,
    pub(crate) task: JoinHandle<()>,
}

impl Fake {
    /// Pinning options for this broker.
    pub(crate) fn pinned(&self) -> ConnectOptions {
        ConnectOptions {
            cert_hash: Some(self.hash),
            ..ConnectOptions::default()
        }
    }

    /// Waits for the script to finish, surfacing its panics.
    pub(crate) async fn done(self) {
        within("the fake broker's script", self.task)
            .await
            .expect("fake broker script failed");
    }
}

/// Starts a fake broker on 127.0.0.1 port 0 that runs `script` on the first session.
pub(crate) fn fake_broker<F, Fut>(script: F) -> Fake
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
