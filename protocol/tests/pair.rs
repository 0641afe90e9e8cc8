//! `ClientSession` against `ServerSession` in simulated time: an in-memory link, a clock the
//! test advances, and a tiny hub (one session's rooms, sequence numbers, history with an epoch,
//! idempotency keys). Deterministic tests of reconnect and recovery, keyed resends, requests
//! failing between sessions, the duplicate guard, keepalive and token refresh, with no socket.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use roomcast_protocol::{
    ClientFrame, Payload, Position, RoomName, ServerFrame, ServerSession, SessionConfig,
    client::{
        Answer, ClientConfig, ClientSession, CloseInfo, Recovery, RequestError, Resumption,
        SessionEvent, handshake::Handshake,
    },
    frame::Event,
    session::{Action, close_frame},
};

/// The broker's wall clock at the start of every test, ms since the Unix epoch.
const WALL_MS: u64 = 1_700_000_000_000;

#[derive(Default)]
struct Room {
    epoch: u64,
    history: Vec<Event>,
}

/// Both peers, the hub and the clock.
struct Pair {
    start: Instant,
    now: Instant,
    ids: Arc<AtomicU64>,
    client: ClientSession,
    server: Option<ServerSession>,
    rooms: HashMap<String, Room>,
    subscribed: HashSet<String>,
    keys: HashSet<String>,
    events: Vec<SessionEvent>,
    sessions: u32,
}

impl Pair {
    fn new(refresh_tokens: bool) -> Self {
        let ids = Arc::new(AtomicU64::new(1));
        let next = Arc::clone(&ids);
        let config = ClientConfig {
            payload_limits: Default::default(),
            early_events: 16,
            refresh_tokens,
        };
        let now = Instant::now();
        Pair {
            start: now,
            now,
            ids,
            client: ClientSession::new(config, move || next.fetch_add(1, Ordering::Relaxed)),
            server: None,
            rooms: HashMap::new(),
            subscribed: HashSet::new(),
            keys: HashSet::new(),
            events: Vec::new(),
            sessions: 0,
        }
    }

    fn id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn wall_ms(&self) -> u64 {
        WALL_MS + (self.now - self.start).as_millis() as u64
    }

    /// Opens a transport session: `Hello`, `Welcome`, then whatever the client resumes.
    fn connect(&mut self, token: Option<&str>, exp: Option<u64>) {
        self.sessions += 1;
        let mut server = ServerSession::new(
            format!("s-{}", self.sessions),
            SessionConfig::default(),
            self.now,
        );
        let (mut handshake, hello) = Handshake::start(token.map(str::to_owned), Default::default());
        let Action::Send(welcome) = server.handle_frame(&hello, self.now, self.wall_ms()) else {
            panic!("no Welcome");
        };
        let welcome = handshake.handle_frame(welcome.encode()).unwrap().unwrap();
        self.server = Some(server);
        self.subscribed.clear();
        self.client
            .connected(welcome, exp, handshake.into_early(), self.now);
        self.pump();
    }

    /// The transport is lost: the client will reconnect.
    fn lose(&mut self) {
        self.server = None;
        self.client.disconnected(&CloseInfo::lost("cable cut"));
        self.drain();
    }

    /// Moves frames both ways until both peers are quiet.
    fn pump(&mut self) {
        while let Some(transmit) = self.client.poll_transmit(self.now) {
            let wall_ms = self.wall_ms();
            let Some(server) = self.server.as_mut() else {
                break;
            };
            let action = server.handle_frame(&transmit.frame, self.now, wall_ms);
            for frame in self.carry_out(action) {
                self.client.handle_frame(&frame.encode(), self.now);
            }
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(event) = self.client.poll_event() {
            self.events.push(event);
        }
    }

    /// The hub's answer to one action, as frames for the client.
    fn carry_out(&mut self, action: Action) -> Vec<ServerFrame> {
        match action {
            Action::None => vec![],
            Action::Send(frame) => vec![frame],
            Action::Close { code, reason } => vec![close_frame(code, &reason)],
            Action::Subscribe { id, room, since } => {
                let name = room.as_str().to_owned();
                self.subscribed.insert(name.clone());
                let log = self.rooms.entry(name).or_default();
                let last = log.history.last().map_or(0, |e| e.seq);
                match since {
                    Some(since) if since.epoch == log.epoch && since.seq <= last => {
                        let mut frames = vec![ServerFrame::Subscribed {
                            id,
                            room,
                            seq: since.seq,
                            epoch: log.epoch,
                            recovered: Some(true),
                        }];
                        frames.extend(
                            (log.history.iter().filter(|e| e.seq > since.seq))
                                .map(|e| ServerFrame::Event(e.clone())),
                        );
                        frames
                    }
                    _ => vec![ServerFrame::Subscribed {
                        id,
                        room,
                        seq: last,
                        epoch: log.epoch,
                        recovered: since.map(|_| false),
                    }],
                }
            }
            Action::Unsubscribe { id, room } => {
                self.subscribed.remove(room.as_str());
                vec![ServerFrame::Unsubscribed { id, room }]
            }
            Action::Publish {
                id,
                room,
                event,
                data,
                ack,
                key,
            } => {
                let fresh = key.is_none_or(|key| self.keys.insert(key));
                let mut frames = Vec::new();
                let mut seq = None;
                if fresh {
                    let delivered = self.append(room.as_str(), event.as_str(), data);
                    seq = Some(delivered.seq);
                    if self.subscribed.contains(room.as_str()) {
                        frames.push(ServerFrame::Event(delivered));
                    }
                }
                if ack {
                    frames.push(ServerFrame::Ack { id, seq });
                }
                frames
            }
        }
    }

    /// Appends an event to `room`'s history.
    fn append(&mut self, room: &str, event: &str, data: Payload) -> Event {
        let log = self.rooms.entry(room.to_owned()).or_default();
        if log.epoch == 0 {
            log.epoch = 7;
        }
        let event = Event {
            room: RoomName::new(room).unwrap(),
            event: event.parse().unwrap(),
            data,
            seq: log.history.last().map_or(0, |e| e.seq) + 1,
            epoch: Some(log.epoch),
        };
        log.history.push(event.clone());
        event
    }

    /// Another client publishes to `room` (delivered when this one is subscribed and online).
    fn publish_elsewhere(&mut self, room: &str, value: u64) {
        let event = self.append(room, "e", Payload::encode(&value).unwrap());
        if self.server.is_some() && self.subscribed.contains(room) {
            self.client
                .handle_frame(&ServerFrame::Event(event).encode(), self.now);
            self.drain();
        }
    }

    fn subscribe(&mut self, room: &str) -> u64 {
        let id = self.id();
        self.client.subscribe(id, room.to_owned());
        self.pump();
        id
    }

    fn publish(&mut self, room: &str, value: u64, key: Option<&str>) -> u64 {
        let id = self.id();
        let frame = ClientFrame::Publish {
            id,
            room: room.into(),
            event: "e".into(),
            data: Payload::encode(&value).unwrap().as_bytes().clone(),
            ack: true,
            key: key.map(str::to_owned),
        }
        .encode();
        self.client.publish(id, frame, key.is_some());
        self.pump();
        id
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Events seen since the last call, in order.
    fn take(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }
}

fn delivered(events: &[SessionEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Deliver { event, .. } => Some(event.seq),
            _ => None,
        })
        .collect()
}

fn reply(events: &[SessionEvent], id: u64) -> Option<&Result<Answer, RequestError>> {
    events.iter().find_map(|e| match e {
        SessionEvent::Reply { id: got, result } if *got == id => Some(result),
        _ => None,
    })
}

fn resumed(events: &[SessionEvent]) -> Vec<Resumption> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Resumed { resumption, .. } => Some(*resumption),
            _ => None,
        })
        .collect()
}

#[test]
fn a_reconnect_resubscribes_from_the_held_position_and_recovers() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    pair.publish_elsewhere("orders:1", 1);
    let sub = pair.subscribe("orders:1");
    let events = pair.take();
    assert!(matches!(
        reply(&events, sub),
        Some(Ok(Answer::Subscribed {
            position: Position { epoch: 7, seq: 1 },
            ..
        }))
    ));
    pair.publish_elsewhere("orders:1", 2);
    assert_eq!(delivered(&pair.take()), [2]);

    pair.lose();
    pair.publish_elsewhere("orders:1", 3);
    pair.publish_elsewhere("orders:1", 4);
    pair.connect(None, None);
    let events = pair.take();
    assert_eq!(
        resumed(&events),
        [Resumption {
            recovery: Recovery::Recovered,
            previous: Position { epoch: 7, seq: 2 },
            position: Position { epoch: 7, seq: 2 },
        }]
    );
    assert_eq!(delivered(&events), [3, 4]);

    // History restarted meanwhile: the resubscription cannot recover.
    pair.lose();
    pair.rooms.get_mut("orders:1").unwrap().epoch = 8;
    pair.connect(None, None);
    let events = pair.take();
    assert_eq!(resumed(&events)[0].recovery, Recovery::Reset);
    assert_eq!(resumed(&events)[0].previous, Position { epoch: 7, seq: 4 });
}

#[test]
fn duplicates_at_or_below_the_held_position_are_dropped_and_a_new_epoch_resets() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    pair.subscribe("orders:1");
    pair.publish_elsewhere("orders:1", 1);
    pair.publish_elsewhere("orders:1", 2);
    let replay = pair.rooms["orders:1"].history[0].clone();
    pair.client
        .handle_frame(&ServerFrame::Event(replay).encode(), pair.now);
    pair.drain();
    let events = pair.take();
    assert_eq!(delivered(&events), [1, 2], "the replayed seq 1 is dropped");

    let mut other = pair.rooms["orders:1"].history[1].clone();
    other.epoch = Some(9);
    other.seq = 1;
    pair.client
        .handle_frame(&ServerFrame::Event(other).encode(), pair.now);
    pair.drain();
    let events = pair.take();
    assert_eq!(resumed(&events)[0].recovery, Recovery::Reset);
    assert_eq!(delivered(&events), [1]);
}

#[test]
fn keyed_publishes_are_resent_in_order_and_the_rest_fails_disconnected() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    // Lost before the broker sees them: nothing reaches the hub.
    let server = pair.server.take();
    let keyed = pair.publish("orders:1", 7, Some("order-7"));
    let plain = pair.publish("orders:1", 1, None);
    pair.server = server;
    pair.lose();
    let events = pair.take();
    assert!(matches!(
        reply(&events, plain),
        Some(Err(RequestError::Disconnected(_)))
    ));
    assert_eq!(reply(&events, keyed), None, "a keyed publish waits");

    // Between sessions: plain publishes and pings fail at once, keyed ones wait.
    let plain = pair.publish("orders:1", 2, None);
    let ping = pair.id();
    pair.client.ping(ping, pair.now);
    let later = pair.publish("orders:1", 8, Some("order-8"));
    pair.drain();
    let events = pair.take();
    assert!(matches!(
        reply(&events, plain),
        Some(Err(RequestError::Disconnected(_)))
    ));
    assert!(matches!(
        reply(&events, ping),
        Some(Err(RequestError::Disconnected(_)))
    ));
    assert_eq!(reply(&events, later), None);

    pair.connect(None, None);
    let events = pair.take();
    assert_eq!(reply(&events, keyed), Some(&Ok(Answer::Acked(Some(1)))));
    assert_eq!(reply(&events, later), Some(&Ok(Answer::Acked(Some(2)))));
    let payloads: Vec<u64> = (pair.rooms["orders:1"].history.iter())
        .map(|e| e.data.decode().unwrap())
        .collect();
    assert_eq!(payloads, [7, 8], "resent in the order made, once each");
}

#[test]
fn keepalive_pings_after_silence_and_a_dead_connection_is_detected() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    let config = SessionConfig::default();
    assert_eq!(
        pair.client.poll_timeout(),
        Some(pair.now + config.ping_interval)
    );
    pair.advance(config.ping_interval);
    pair.client.handle_timeout(pair.now);
    let ping = pair
        .client
        .poll_transmit(pair.now)
        .expect("a keepalive ping");
    assert_eq!(
        ClientFrame::decode(&ping.frame),
        Ok(ClientFrame::Ping { id: None })
    );
    // The broker never answers: silence past its idle timeout ends the session.
    pair.advance(config.idle_timeout - config.ping_interval);
    pair.client.handle_timeout(pair.now);
    pair.drain();
    let events = pair.take();
    match events.last() {
        Some(SessionEvent::Ended(ending)) => {
            assert!(ending.info.reconnect);
            assert_eq!(ending.info.code, None);
        }
        other => panic!("expected Ended, got {other:?}"),
    }
    assert!(!pair.client.is_open());
}

#[test]
fn the_token_is_refreshed_at_80_percent_of_its_lifetime_by_the_brokers_clock() {
    let mut pair = Pair::new(true);
    let exp = WALL_MS / 1000 + 3600;
    pair.connect(Some("t1"), Some(exp));
    let config = SessionConfig::default();
    // Keep the session alive with pings until the refresh is due at 48 minutes.
    let due = pair.start + Duration::from_secs(2880);
    while pair.client.poll_timeout().unwrap() < due {
        pair.now = pair.client.poll_timeout().unwrap();
        pair.client.handle_timeout(pair.now);
        pair.pump();
        assert!(
            !pair.take().contains(&SessionEvent::FetchToken),
            "too early"
        );
        assert!(pair.now < due + config.ping_interval);
    }
    pair.now = due;
    pair.client.handle_timeout(pair.now);
    pair.drain();
    assert!(pair.take().contains(&SessionEvent::FetchToken));
    pair.client.refresh_token("t2".into(), Some(exp + 3600));
    pair.pump();
    assert!(
        pair.take()
            .contains(&SessionEvent::TokenRefreshed { token: "t2".into() })
    );
}
