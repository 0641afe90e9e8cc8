//! Room history in a three-server NATS cluster with R3 streams (`--nats-history-replicas 3`):
//! the server leading the room's stream is SIGKILLed under acknowledged traffic. Two brokers,
//! one of them connected to the killed server (it fails over to another server of the
//! cluster); publishers retry `unavailable` with their idempotency key. Every acknowledged
//! event reaches the subscribers of both brokers exactly once, in one order, and a client
//! that left before the loss recovers the rest from the stream afterwards.

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{cluster::NatsServer, *};
use roomcast_broker::{Config, Server};
use roomcast_protocol::{ClientFrame, Code, Payload, Position, ServerFrame};

/// The room under test; its namespace's stream.
const ROOM: &str = "chat:r3";
const STREAM: &str = "roomcast_chat";
/// The room's last event, published once every publisher is done.
const FIN: &str = "fin";
/// Acknowledged events each publisher gets before the leader is killed, and after.
const BEFORE: u64 = 25;
const AFTER: u64 = 25;
/// Bound on the whole traffic phase (the election takes a few seconds).
const TRAFFIC_WAIT: Duration = Duration::from_secs(40);

/// A port free on 127.0.0.1 now, for cluster routes (peers must know them in advance).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Three routed servers `r3-0..2` of the NATS cluster `r3`, JetStream on each (own store).
async fn start_cluster() -> Vec<NatsServer> {
    let ports = free_ports(3);
    let routes = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let servers: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            NatsServer::start(&format!(
                "server_name: r3-{i}\ncluster {{\n  name: r3\n  listen: 127.0.0.1:{port}\n  routes: [{routes}]\n}}\n"
            ))
        })
        .collect();
    // JetStream is usable once every server knows the meta leader.
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    for server in &servers {
        loop {
            let jsz = server.monitor("/jsz").await;
            if jsz["meta_cluster"]["leader"]
                .as_str()
                .is_some_and(|l| !l.is_empty())
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no JetStream meta leader: {jsz}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    servers
}

/// The server name leading `STREAM`, asked through `server`.
async fn stream_leader(server: &NatsServer) -> Option<String> {
    let client = async_nats::connect(server.url()).await.ok()?;
    let reply = tokio::time::timeout(
        WAIT,
        client.request(format!("$JS.API.STREAM.INFO.{STREAM}"), "".into()),
    )
    .await
    .ok()?
    .ok()?;
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    info["cluster"]["leader"].as_str().map(str::to_owned)
}

fn node(nats: &NatsServer, id: &str) -> Config {
    let mut c = config();
    // One URL: the broker starts on that server; it learns the cluster's other servers from
    // it (INFO connect_urls) and fails over to them.
    c.cluster.nats = vec![nats.url()];
    c.cluster.node_id = Some(id.into());
    c.cluster.nats_history_replicas = 3;
    c
}

async fn until_ready(server: &Server) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(server, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "node never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn publish(id: u64, name: &str, key: &str) -> ClientFrame {
    ClientFrame::Publish {
        id,
        room: ROOM.into(),
        event: name.into(),
        data: Payload::encode(&name).unwrap().as_bytes().clone(),
        ack: true,
        key: Some(key.to_owned()),
    }
}

/// Publishes `name` (its idempotency key) until acknowledged, retrying `unavailable`; returns
/// the seq and how many attempts were refused.
async fn publish_until_acked(conn: &mut RawConn, next_id: &mut u64, name: &str) -> (u64, u32) {
    let deadline = tokio::time::Instant::now() + TRAFFIC_WAIT;
    let mut refused = 0;
    loop {
        *next_id += 1;
        let id = *next_id;
        conn.send(publish(id, name, name)).await;
        match conn.frame().await {
            ServerFrame::Ack { id: got, seq } if got == id => {
                return (seq.expect("a stored event's Ack carries its seq"), refused);
            }
            ServerFrame::Error {
                id: Some(got),
                code: Code::Unavailable,
                ..
            } if got == id => refused += 1,
            other => panic!("expected the reply to {id}, got {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The events (name, seq) a subscriber reads until `fin` (included), or until it has read
/// `limit` of them. It pings between reads, so the silence of a leader election (longer than
/// a single read may wait) is no failure; the bound is `TRAFFIC_WAIT`.
async fn read_events(conn: &mut RawConn, limit: usize) -> Vec<(String, u64)> {
    let deadline = tokio::time::Instant::now() + TRAFFIC_WAIT;
    let mut seen = Vec::new();
    let mut ping = 0;
    while seen.len() < limit {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fin in time: {seen:?}"
        );
        ping += 1;
        conn.send(ClientFrame::Ping { id: Some(ping) }).await;
        loop {
            match conn.frame().await {
                ServerFrame::Event(e) => {
                    assert_eq!(e.room.as_str(), ROOM);
                    let name = e.event.as_str().to_owned();
                    let fin = name == FIN;
                    seen.push((name, e.seq));
                    if fin || seen.len() == limit {
                        return seen;
                    }
                }
                ServerFrame::Pong { id: Some(id) } if id == ping => break,
                other => panic!("expected an Event, got {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// One publisher's traffic: `BEFORE` acknowledged events, then (once `killed`) `AFTER` more.
/// Returns every (name, seq) acknowledged, the attempts refused with `unavailable`, and when
/// the first event after the kill was acknowledged.
async fn traffic(
    url: String,
    tag: &'static str,
    acked: Arc<AtomicU64>,
    killed: Arc<AtomicBool>,
) -> (Vec<(String, u64)>, u32, tokio::time::Instant) {
    let mut conn = RawConn::open_url(&url).await;
    let mut next_id = 0;
    let mut out = Vec::new();
    let mut refused = 0;
    let mut after = 0;
    let mut resumed = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + TRAFFIC_WAIT;
    for n in 1.. {
        let name = format!("{tag}-{n}");
        let (seq, r) = publish_until_acked(&mut conn, &mut next_id, &name).await;
        out.push((name, seq));
        refused += r;
        acked.fetch_add(1, Ordering::Relaxed);
        if killed.load(Ordering::Acquire) {
            if after == 0 {
                resumed = tokio::time::Instant::now();
            }
            after += 1;
            if after == AFTER {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tag}: traffic did not resume after the leader loss"
        );
        // A steady rate: some events are in flight when the leader dies.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (out, refused, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_loses_and_duplicates_no_acknowledged_event() {
    let mut servers = start_cluster().await;

    // The first broker creates the R3 stream with its first stored event.
    let a = start(node(&servers[0], "edge-a")).await;
    until_ready(&a).await;
    let mut setup = RawConn::open(&a).await;
    publish_until_acked(&mut setup, &mut 0, "setup").await;
    let name = stream_leader(&servers[0])
        .await
        .expect("the stream's leader");
    let leader = (0..3)
        .find(|i| name == format!("r3-{i}"))
        .unwrap_or_else(|| panic!("unknown leader {name}"));
    // The second broker on the leader (or, when the first one is on it, on another server):
    // one broker loses its server with the leader, the other keeps its server.
    let b = start(node(
        &servers[if leader == 0 { 1 } else { leader }],
        "edge-b",
    ))
    .await;
    until_ready(&b).await;
    let (failing, steady) = if leader == 0 { (&a, &b) } else { (&b, &a) };

    // Subscribers on both brokers, and one on the failing broker that leaves before the loss
    // and recovers afterwards.
    let mut epoch = 0;
    let mut readers = Vec::new();
    for broker in [&a, &b] {
        let mut conn = RawConn::open(broker).await;
        let (at, _) = conn.subscribe_since(ROOM, None).await;
        assert_ne!(at.epoch, 0, "the room has a stream");
        epoch = at.epoch;
        readers.push(tokio::spawn(async move {
            read_events(&mut conn, usize::MAX).await
        }));
    }
    let mut leaver = RawConn::open(failing).await;
    leaver.subscribe_since(ROOM, None).await;

    let acked = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let publishers = [(failing, "f"), (steady, "s")].map(|(broker, tag)| {
        tokio::spawn(traffic(broker.ws_url(), tag, acked.clone(), killed.clone()))
    });

    // The leaver reads a few events and goes.
    let left_with = read_events(&mut leaver, 10).await;
    let &(_, last) = left_with.last().expect("events before leaving");
    drop(leaver);

    // Kill the stream's leader under traffic.
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.load(Ordering::Relaxed) < 2 * BEFORE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no traffic before the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    servers[leader].kill();
    let kill = tokio::time::Instant::now();
    killed.store(true, Ordering::Release);

    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let mut resumed = kill;
    for publisher in publishers {
        let (events, r, at) = publisher.await.expect("publisher");
        acknowledged.extend(events);
        refused += r;
        resumed = resumed.max(at);
    }
    // The last event: after every other acknowledged one in the stream.
    let mut closer = RawConn::open(steady).await;
    let (fin_seq, _) = publish_until_acked(&mut closer, &mut 0, FIN).await;
    acknowledged.push((FIN.to_owned(), fin_seq));

    // Exactly once, each with its acknowledged seq, in one order on both brokers.
    let expected: HashSet<(String, u64)> = acknowledged.iter().cloned().collect();
    assert_eq!(expected.len(), acknowledged.len(), "one seq per event");
    let mut feeds = Vec::new();
    for reader in readers {
        let feed = tokio::time::timeout(WAIT * 2, reader)
            .await
            .expect("every subscriber reached fin")
            .expect("reader");
        feeds.push(feed);
    }
    for feed in &feeds {
        let names: Vec<&str> = feed.iter().map(|(n, _)| n.as_str()).collect();
        let unique: HashSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "a duplicated event: {names:?}");
        assert!(
            feed.windows(2).all(|w| w[0].1 < w[1].1),
            "out of stream order: {feed:?}"
        );
        let got: HashSet<(String, u64)> = feed.iter().cloned().collect();
        let missing: Vec<_> = expected.difference(&got).collect();
        let extra: Vec<_> = got.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "lost {missing:?}, unexpected {extra:?}"
        );
    }
    assert_eq!(feeds[0], feeds[1], "both brokers deliver one order");

    // The failed-over broker is ready on another server, and recovers the leaver from the
    // stream: the rest of the feed, no gap, no duplicate.
    until_ready(failing).await;
    assert!(metric(failing, "roomcast_nats_disconnects_total").await >= 1.0);
    let mut back = RawConn::open(failing).await;
    let (_, recovered) = back
        .subscribe_since(ROOM, Some(Position { epoch, seq: last }))
        .await;
    assert_eq!(recovered, Some(true), "the R3 stream still holds the rest");
    let rest = read_events(&mut back, usize::MAX).await;
    assert_eq!(left_with[..], feeds[0][..left_with.len()]);
    assert_eq!(rest[..], feeds[0][left_with.len()..]);
    eprintln!(
        "r3: leader r3-{leader} killed; {} events acknowledged, {refused} attempts refused; both publishers acknowledged again after {:?}",
        acknowledged.len(),
        resumed - kill
    );
}
