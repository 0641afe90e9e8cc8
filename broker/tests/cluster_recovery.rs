//! Recovery and ordering in cluster mode, with room history in JetStream, against real
//! `nats-server` processes (JetStream on) and brokers on loopback: a client that leaves one
//! node recovers on another from the stream, every node sees a room's events in one order,
//! a node's death costs its clients nothing, idempotency keys hold across nodes, and positions
//! the stream no longer covers are refused.

mod common;

use std::time::Duration;

use common::{cluster::NatsServer, *};
use roomcast_broker::{Config, Server};
use roomcast_protocol::{ClientFrame, Code, Payload, Position, ServerFrame, frame::Event};

fn node(nats: &NatsServer, id: &str) -> Config {
    let mut c = config();
    c.cluster.nats = vec![nats.url()];
    c.cluster.node_id = Some(id.into());
    c.cluster.nats_interest_linger = Duration::from_millis(100);
    c
}

async fn until_ready(server: &Server) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(server, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "node never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn nodes(nats: &NatsServer, config: impl Fn(Config) -> Config) -> (Server, Server) {
    let a = start(config(node(nats, "edge-a"))).await;
    let b = start(config(node(nats, "edge-b"))).await;
    until_ready(&a).await;
    until_ready(&b).await;
    (a, b)
}

fn publish(id: u64, room: &str, name: &str, key: Option<&str>) -> ClientFrame {
    ClientFrame::Publish {
        id,
        room: room.into(),
        event: name.into(),
        data: Payload::encode(&name).unwrap().as_bytes().clone(),
        ack: true,
        key: key.map(str::to_owned),
    }
}

/// Publishes and waits for the Ack; returns the event's seq (the stream's sequence).
async fn publish_acked(conn: &mut RawConn, id: u64, room: &str, name: &str) -> u64 {
    conn.send(publish(id, room, name, None)).await;
    loop {
        match conn.frame().await {
            ServerFrame::Ack { id: got, seq } if got == id => {
                return seq.expect("a stored event's Ack carries its seq");
            }
            ServerFrame::Event(_) => {}
            other => panic!("expected Ack {id}, got {other:?}"),
        }
    }
}

/// A publisher session on `url` that publishes `e1..=e<total>` to `room`, each acknowledged
/// before the next (with `pause` between), and returns `(seq, name)` of each.
fn spawn_acked_publisher(
    url: String,
    room: &'static str,
    total: u64,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<(u64, String)>> {
    tokio::spawn(async move {
        let mut conn = RawConn::open_url(&url).await;
        let mut acked = Vec::new();
        for n in 1..=total {
            let seq = publish_acked(&mut conn, n, room, &format!("e{n}")).await;
            acked.push((seq, format!("e{n}")));
            tokio::time::sleep(pause).await;
        }
        acked
    })
}

async fn event(conn: &mut RawConn) -> Event {
    match conn.frame().await {
        ServerFrame::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn events(conn: &mut RawConn, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let e = event(conn).await;
        out.push((e.seq, e.event.as_str().to_owned()));
    }
    out
}

#[tokio::test]
async fn a_client_recovers_on_another_node_from_the_stream() {
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| c).await;
    let room = "orders:r1";
    let mut sub = RawConn::open(&b).await;
    let (start, recovered) = sub.subscribe_since(room, None).await;
    assert_ne!(start.epoch, 0, "a reliable room has its stream's epoch");
    assert_eq!(recovered, None);
    let mut publisher = RawConn::open(&a).await;
    let mut acked = Vec::new();
    for n in 1..=3 {
        acked.push((
            publish_acked(&mut publisher, n, room, &format!("e{n}")).await,
            format!("e{n}"),
        ));
    }
    // The seq every node shows is the one the publisher's Ack carried.
    assert_eq!(events(&mut sub, 3).await, acked);
    assert!(acked.windows(2).all(|w| w[0].0 < w[1].0));
    drop(sub);

    let mut missed = Vec::new();
    for n in 4..=6 {
        missed.push((
            publish_acked(&mut publisher, n, room, &format!("e{n}")).await,
            format!("e{n}"),
        ));
    }
    // The client comes back on the other node, with the position it held.
    let held = Position {
        epoch: start.epoch,
        seq: acked[2].0,
    };
    let mut back = RawConn::open(&a).await;
    assert_eq!(
        back.subscribe_since(room, Some(held)).await,
        (held, Some(true))
    );
    assert_eq!(events(&mut back, 3).await, missed);
    // And goes on live.
    let mut other = RawConn::open(&b).await;
    let seq = publish_acked(&mut other, 7, room, "e7").await;
    assert_eq!(events(&mut back, 1).await, [(seq, "e7".to_owned())]);
}

#[tokio::test]
async fn recovery_works_before_the_first_event_of_a_room() {
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| c).await;
    let room = "orders:empty";
    let mut sub = RawConn::open(&b).await;
    let (start, _) = sub.subscribe_since(room, None).await;
    drop(sub);
    let mut publisher = RawConn::open(&a).await;
    let s1 = publish_acked(&mut publisher, 1, room, "first").await;
    let s2 = publish_acked(&mut publisher, 2, room, "second").await;
    let mut back = RawConn::open(&a).await;
    assert_eq!(
        back.subscribe_since(room, Some(start)).await,
        (start, Some(true))
    );
    assert_eq!(
        events(&mut back, 2).await,
        [(s1, "first".to_owned()), (s2, "second".to_owned())]
    );
}

/// Two nodes publish into one room at the same time: both nodes' subscribers see the same
/// events in the same order with the same seq (one sequencer: the room's stream).
#[tokio::test]
async fn events_published_on_two_nodes_arrive_in_one_order_everywhere() {
    const EACH: u64 = 40;
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| c).await;
    let room = "orders:total";
    let mut sub_a = RawConn::open(&a).await;
    let mut sub_b = RawConn::open(&b).await;
    sub_a.subscribe_since(room, None).await;
    sub_b.subscribe_since(room, None).await;
    let spawn_publisher = |server: &Server, tag: &'static str| {
        let url = server.ws_url();
        tokio::spawn(async move {
            let mut conn = RawConn::open_url(&url).await;
            for n in 1..=EACH {
                conn.send(publish(n, room, &format!("{tag}{n}"), None))
                    .await;
            }
            for _ in 1..=EACH {
                assert!(matches!(
                    conn.frame().await,
                    ServerFrame::Ack { seq: Some(_), .. }
                ));
            }
        })
    };
    let pa = spawn_publisher(&a, "a");
    let pb = spawn_publisher(&b, "b");
    let seen_a = events(&mut sub_a, 2 * EACH as usize).await;
    let seen_b = events(&mut sub_b, 2 * EACH as usize).await;
    pa.await.unwrap();
    pb.await.unwrap();
    assert_eq!(seen_a, seen_b, "the two nodes disagree on the room's order");
    assert!(seen_a.windows(2).all(|w| w[0].0 < w[1].0));
    // Each publisher's own order is kept within the total order.
    for tag in ["a", "b"] {
        let mine: Vec<_> = seen_a
            .iter()
            .filter(|(_, n)| n.starts_with(tag))
            .map(|(_, n)| n.clone())
            .collect();
        let want: Vec<_> = (1..=EACH).map(|n| format!("{tag}{n}")).collect();
        assert_eq!(mine, want);
    }
}

/// A publisher on node A never stops; the subscriber's node B goes away mid-stream. The client
/// moves to A and, across both sessions, sees every acknowledged event exactly once, in order.
#[tokio::test]
async fn a_client_of_a_stopped_node_moves_to_another_and_misses_nothing() {
    const TOTAL: u64 = 120;
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| c).await;
    let room = "orders:moving";
    let mut sub = RawConn::open(&b).await;
    let (start, _) = sub.subscribe_since(room, None).await;
    let publisher = spawn_acked_publisher(a.ws_url(), room, TOTAL, Duration::from_millis(3));
    let mut seen = events(&mut sub, 30).await;
    // Node B stops: its sessions are closed with `shutting_down`, reconnect.
    let stopping = tokio::spawn(b.shutdown());
    loop {
        match sub.frame().await {
            ServerFrame::Event(e) => seen.push((e.seq, e.event.as_str().to_owned())),
            ServerFrame::Close {
                code: Code::ShuttingDown,
                reconnect: true,
                ..
            } => break,
            other => panic!("expected events then Close, got {other:?}"),
        }
    }
    stopping.await.unwrap().unwrap();
    let held = Position {
        epoch: start.epoch,
        seq: seen.last().unwrap().0,
    };
    let mut moved = RawConn::open(&a).await;
    assert_eq!(
        moved.subscribe_since(room, Some(held)).await,
        (held, Some(true))
    );
    let acked = publisher.await.unwrap();
    while seen.len() < acked.len() {
        let e = event(&mut moved).await;
        seen.push((e.seq, e.event.as_str().to_owned()));
    }
    assert_eq!(seen, acked, "lost, repeated or reordered across the move");
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_delivered_once_across_nodes() {
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| c).await;
    let room = "orders:keys";
    let mut sub = RawConn::open(&b).await;
    sub.subscribe_since(room, None).await;
    let mut on_a = RawConn::open(&a).await;
    let mut on_b = RawConn::open(&b).await;
    on_a.send(publish(1, room, "paid", Some("pay-1"))).await;
    let first = match on_a.frame().await {
        ServerFrame::Ack { id: 1, seq } => seq,
        other => panic!("{other:?}"),
    };
    // The retry comes through the other node (the client moved meanwhile).
    on_b.send(publish(2, room, "paid", Some("pay-1"))).await;
    let retry = loop {
        match on_b.frame().await {
            ServerFrame::Ack { id: 2, seq } => break seq,
            ServerFrame::Event(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(retry, first, "the retry is acknowledged as the original");
    let next = publish_acked(&mut on_a, 3, room, "shipped").await;
    assert_eq!(
        events(&mut sub, 2).await,
        [
            (first.unwrap(), "paid".to_owned()),
            (next, "shipped".to_owned())
        ]
    );
}

#[tokio::test]
async fn positions_the_stream_no_longer_covers_are_refused() {
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| Config {
        history_events: 2,
        ..c
    })
    .await;
    let room = "orders:short";
    let mut publisher = RawConn::open(&a).await;
    let mut seqs = Vec::new();
    for n in 1..=5 {
        seqs.push(publish_acked(&mut publisher, n, room, &format!("e{n}")).await);
    }
    let mut probe = RawConn::open(&b).await;
    let (now, _) = probe.subscribe_since(room, None).await;
    assert_eq!(now.seq, seqs[4]);
    for (since, why) in [
        (
            Position {
                epoch: now.epoch,
                seq: seqs[0],
            },
            "dropped by the per-room limit",
        ),
        (
            Position {
                epoch: now.epoch + 1,
                seq: seqs[3],
            },
            "another epoch",
        ),
        (
            Position {
                epoch: now.epoch,
                seq: seqs[4] + 100,
            },
            "beyond the room's last event",
        ),
    ] {
        let mut c = RawConn::open(&b).await;
        assert_eq!(
            c.subscribe_since(room, Some(since)).await,
            (now, Some(false)),
            "{why}"
        );
    }
    // The newest kept event still recovers.
    let mut c = RawConn::open(&a).await;
    let since = Position {
        epoch: now.epoch,
        seq: seqs[3],
    };
    assert_eq!(
        c.subscribe_since(room, Some(since)).await,
        (since, Some(true))
    );
    assert_eq!(events(&mut c, 1).await, [(seqs[4], "e5".to_owned())]);
}

/// A free loopback TCP port right now (for a NATS cluster port a server must name in its own
/// routes; the window between probing and use is the only race).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One region: a one-server NATS cluster (routed to itself, which JetStream in a supercluster
/// requires) with JetStream and a gateway.
fn region(name: &str, dir: &str, gateways: &str) -> NatsServer {
    let route = free_port();
    NatsServer::start(&format!(
        "server_name: {name}-1\n\
         jetstream {{ store_dir: {dir:?} }}\n\
         cluster {{ name: {name}, listen: 127.0.0.1:{route}, routes: [\"nats-route://127.0.0.1:{route}\"] }}\n\
         gateway {{\n  name: {name}\n  listen: 127.0.0.1:-1\n  {gateways}\n}}"
    ))
}

/// Two regions joined by gateways (a JetStream supercluster): a client that leaves region B
/// recovers in region A, from the room's one stream.
#[tokio::test]
async fn a_client_recovers_in_another_region() {
    let base = std::env::temp_dir().join(format!("roomcast-regions-{}", std::process::id()));
    let a_dir = base.join("a").display().to_string();
    let b_dir = base.join("b").display().to_string();
    let region_a = region("region-a", &a_dir, "");
    let gateway_a = region_a.gateway_port.expect("gateway port");
    let region_b = region(
        "region-b",
        &b_dir,
        &format!("gateways: [{{ name: region-a, url: \"nats://127.0.0.1:{gateway_a}\" }}]"),
    );
    let a = start(node(&region_a, "edge-a")).await;
    let b = start(node(&region_b, "edge-b")).await;
    until_ready(&a).await;
    until_ready(&b).await;
    let room = "bids:lot-7";
    // The supercluster elects its JetStream leader first: publish until one is stored.
    let mut publisher = RawConn::open(&a).await;
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    let mut id = 0;
    loop {
        id += 1;
        publisher.send(publish(id, room, "warmup", None)).await;
        match publisher.frame().await {
            ServerFrame::Ack { seq: Some(_), .. } => break,
            ServerFrame::Error {
                code: Code::Unavailable,
                ..
            } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "JetStream never ready"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let mut sub = RawConn::open(&b).await;
    let (start_at, _) = sub.subscribe_since(room, None).await;
    assert_ne!(start_at.epoch, 0);
    let mut seen = Vec::new();
    for n in 1..=3 {
        let seq = publish_acked(&mut publisher, 100 + n, room, &format!("e{n}")).await;
        seen.push((seq, format!("e{n}")));
    }
    assert_eq!(events(&mut sub, 3).await, seen);
    drop(sub);
    let mut missed = Vec::new();
    for n in 4..=6 {
        let seq = publish_acked(&mut publisher, 100 + n, room, &format!("e{n}")).await;
        missed.push((seq, format!("e{n}")));
    }
    let held = Position {
        epoch: start_at.epoch,
        seq: seen[2].0,
    };
    let mut moved = RawConn::open(&a).await;
    assert_eq!(
        moved.subscribe_since(room, Some(held)).await,
        (held, Some(true))
    );
    assert_eq!(events(&mut moved, 3).await, missed);
    let _ = std::fs::remove_dir_all(&base);
}

/// Draining node A (SIGTERM) spreads its sessions' closes over the drain window; each client
/// moves to node B and recovers there: all end up on B, none loses or repeats an event.
#[tokio::test]
async fn a_draining_node_s_clients_all_move_without_losing_events() {
    const CLIENTS: usize = 8;
    const TOTAL: u64 = 150;
    let nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| Config {
        drain_window: Duration::from_millis(1500),
        ..c
    })
    .await;
    let room = "orders:drain";
    let b_url = b.ws_url();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut conn = RawConn::open(&a).await;
        let (start, _) = conn.subscribe_since(room, None).await;
        let b_url = b_url.clone();
        clients.push(tokio::spawn(async move {
            let mut seen: Vec<(u64, String)> = Vec::new();
            let mut moved = false;
            while seen.len() < TOTAL as usize {
                match conn.frame().await {
                    ServerFrame::Event(e) => seen.push((e.seq, e.event.as_str().to_owned())),
                    ServerFrame::Close {
                        code: Code::ShuttingDown,
                        reconnect: true,
                        retry_after_ms: Some(wait),
                        ..
                    } if !moved => {
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        conn = RawConn::open_url(&b_url).await;
                        let held = Position {
                            epoch: start.epoch,
                            seq: seen.last().map_or(start.seq, |(s, _)| *s),
                        };
                        assert_eq!(
                            conn.subscribe_since(room, Some(held)).await,
                            (held, Some(true))
                        );
                        moved = true;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            (moved, seen)
        }));
    }
    let mut publisher = RawConn::open(&b).await;
    let mut acked = Vec::new();
    let mut draining = None;
    let mut a = Some(a);
    for n in 1..=TOTAL {
        acked.push((
            publish_acked(&mut publisher, n, room, &format!("e{n}")).await,
            format!("e{n}"),
        ));
        if n == 20 {
            if let Some(a) = a.take() {
                draining = Some(tokio::spawn(a.shutdown()));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for client in clients {
        let (moved, seen) = client.await.unwrap();
        assert!(moved, "every client was moved off the draining node");
        assert_eq!(seen, acked, "lost, repeated or reordered across the drain");
    }
    draining.unwrap().await.unwrap().unwrap();
}

/// nats-server dies and comes back (its JetStream store on disk) while a publisher keeps
/// publishing and a subscriber is away: every publish is either acknowledged — and then
/// recovered by the subscriber — or refused with `unavailable`; none is acknowledged and lost.
#[tokio::test]
async fn a_nats_restart_loses_no_acknowledged_event_for_a_recovering_client() {
    let mut nats = NatsServer::start("");
    let (a, b) = nodes(&nats, |c| c).await;
    let room = "orders:restart";
    let mut sub = RawConn::open(&b).await;
    let (start, _) = sub.subscribe_since(room, None).await;
    let mut publisher = RawConn::open(&a).await;
    let mut acked = Vec::new();
    for n in 1..=5 {
        acked.push((
            publish_acked(&mut publisher, n, room, &format!("e{n}")).await,
            format!("e{n}"),
        ));
    }
    let mut seen = events(&mut sub, 5).await;
    assert_eq!(seen, acked);
    drop(sub); // the client goes away

    // Publish through the outage: acknowledged, or refused with `unavailable`.
    let mut refused = 0;
    let mut n = 5;
    let publish_one = |n: u64| publish(n, room, &format!("e{n}"), None);
    nats.kill();
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while !(restarted && refused >= 3 && acked.len() >= 10) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outage scenario did not complete"
        );
        n += 1;
        publisher.send(publish_one(n)).await;
        match publisher.frame().await {
            ServerFrame::Ack { id, seq: Some(seq) } if id == n => {
                acked.push((seq, format!("e{n}")))
            }
            ServerFrame::Error {
                id: Some(id),
                code: Code::Unavailable,
                ..
            } if id == n => {
                refused += 1;
                if refused == 3 && !restarted {
                    nats.restart();
                    restarted = true;
                }
            }
            other => panic!("unexpected reply to {n}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client comes back (on the other node) with its position: it gets every acknowledged
    // event it missed, in order, once, and none of the refused ones.
    until_ready(&a).await;
    let held = Position {
        epoch: start.epoch,
        seq: seen.last().unwrap().0,
    };
    let mut back = RawConn::open(&a).await;
    assert_eq!(
        back.subscribe_since(room, Some(held)).await,
        (held, Some(true))
    );
    seen.extend(events(&mut back, acked.len() - 5).await);
    assert_eq!(seen, acked);
    back.ping(1).await;
}

/// Kills a broker process when a test ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Node B is a real `roomcast` process and is killed (SIGKILL: no Close, the socket just dies)
/// while the Rust client is subscribed there and a publisher keeps publishing on node A. The
/// client reconnects by itself to A (its second URL), recovers from the stream and delivers
/// every acknowledged event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_killed_node_reconnects_elsewhere_and_misses_nothing() {
    use roomcast_client::{Client, Recovery, SubscriptionItem};
    const TOTAL: u64 = 100;
    let nats = NatsServer::start("");
    let a = start(node(&nats, "edge-a")).await;
    until_ready(&a).await;
    let mut b = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-webtransport"])
        .args(["--nats", &nats.url(), "--node-id", "edge-b"])
        .env("ROOMCAST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("roomcast starts");
    let stderr = b.stderr.take().unwrap();
    let mut b = KillOnDrop(b);
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("listening: WebSocket ws://").nth(1) {
                let _ = found.send(rest.split('/').next().unwrap().to_owned());
            }
        }
    });
    let b_addr: std::net::SocketAddr = address.recv_timeout(WAIT).unwrap().parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get_at(b_addr, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "node B never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let room = "orders:killed";
    let client = Client::builder()
        .urls([format!("ws://{b_addr}/ws"), a.ws_url()])
        .connect()
        .await
        .expect("the client connects to node B");
    let mut sub = client.subscribe(room).await.unwrap();
    let publisher = spawn_acked_publisher(a.ws_url(), room, TOTAL, Duration::from_millis(5));
    let mut seen = Vec::new();
    let mut resumed = Vec::new();
    while seen.len() < TOTAL as usize {
        let item = tokio::time::timeout(WAIT, sub.next_item())
            .await
            .expect("the subscription goes on")
            .expect("the subscription is not closed");
        match item {
            SubscriptionItem::Event(e) => {
                seen.push((e.seq, e.event.as_str().to_owned()));
                if seen.len() == 20 {
                    b.0.kill().unwrap(); // SIGKILL
                    b.0.wait().unwrap();
                }
            }
            SubscriptionItem::Resumed(r) => resumed.push(r.recovery),
            other => panic!("unexpected {other:?}"),
        }
    }
    let acked = publisher.await.unwrap();
    assert_eq!(resumed, [Recovery::Recovered], "one reconnect, recovered");
    assert_eq!(seen, acked, "lost, repeated or reordered across the kill");
}
