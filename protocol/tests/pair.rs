//! `ClientSession` against `ServerSession` in simulated time: an in-memory link, a clock the
//! test advances, and a tiny hub (one session's rooms, sequence numbers, history with an epoch,
//! idempotency keys). Deterministic tests of reconnect and recovery, keyed resends, requests
//! failing between sessions, the duplicate guard, keepalive and token refresh, with no socket.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use roomcast_protocol::{
    ClientFrame, Code, Payload, Position, RoomName, ServerFrame, ServerSession, SessionConfig,
    client::{
        Answer, ClientConfig, ClientSession, CloseInfo, Recovery, RequestError, Resumption,
        SessionEvent, handshake::Handshake,
    },
    frame::Event,
    session::{Action, Gate, Refusal, Request, close_frame},
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
    /// Every `Subscribe` the hub carried out: the room and its `since`.
    subscribes: Vec<(String, Option<Position>)>,
    /// The broker's gate: refusals for the next requests, by what they ask.
    refusals: Refusals,
    /// Every frame the client sent to a broker, in order.
    sent: Vec<ClientFrame>,
}

/// Refusals the gate hands out, each once, keyed like `sub a:1`, `pub a:1`, `refresh TOKEN`.
#[derive(Default)]
struct Refusals(HashMap<String, VecDeque<Refusal>>);

impl Refusals {
    fn add(&mut self, what: &str, refusal: Refusal) {
        self.0
            .entry(what.to_owned())
            .or_default()
            .push_back(refusal);
    }
}

impl Gate for Refusals {
    fn check(&mut self, request: Request<'_>, _now: Instant) -> Result<(), Refusal> {
        let what = match request {
            Request::Subscribe { room, .. } => format!("sub {room}"),
            Request::Publish { room, .. } => format!("pub {room}"),
            Request::Refresh { token } => format!("refresh {token}"),
            _ => return Ok(()),
        };
        match self.0.get_mut(&what).and_then(VecDeque::pop_front) {
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }
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
            subscribes: Vec::new(),
            refusals: Refusals::default(),
            sent: Vec::new(),
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
            self.sent
                .push(ClientFrame::decode(&transmit.frame).expect("client sent a bad frame"));
            let action =
                server.handle_frame_gated(&transmit.frame, self.now, wall_ms, &mut self.refusals);
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
                self.subscribes.push((name.clone(), since));
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

    /// Hands the client a frame as if the broker sent it now.
    fn inject(&mut self, frame: ServerFrame) {
        self.client.handle_frame(&frame.encode(), self.now);
        self.drain();
    }

    /// The room's numbering restarts: epoch `epoch`, last event `seq` (the history before is
    /// gone).
    fn restart_room(&mut self, room: &str, epoch: u64, seq: u64) {
        let log = self.rooms.entry(room.to_owned()).or_default();
        log.epoch = epoch;
        log.history = vec![event(room, seq, Some(epoch))];
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Events seen since the last call, in order.
    fn take(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }
}

fn event(room: &str, seq: u64, epoch: Option<u64>) -> Event {
    Event {
        room: RoomName::new(room).unwrap(),
        event: "e".parse().unwrap(),
        data: Payload::encode(&seq).unwrap(),
        seq,
        epoch,
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
            assert!(
                ending.info.reason.contains("nothing received"),
                "{}",
                ending.info.reason
            );
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

fn at(epoch: u64, seq: u64) -> Position {
    Position { epoch, seq }
}

fn ended(events: &[SessionEvent]) -> Option<&CloseInfo> {
    events.iter().find_map(|e| match e {
        SessionEvent::Ended(ending) => Some(&ending.info),
        _ => None,
    })
}

#[test]
fn keepalive_pings_once_per_interval_while_the_broker_answers() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    let interval = SessionConfig::default().ping_interval;
    for n in 1..=3 {
        pair.now = pair.client.poll_timeout().expect("a timer");
        assert_eq!(pair.now, pair.start + interval * n);
        pair.client.handle_timeout(pair.now);
        pair.pump();
    }
    let pings = (pair.sent.iter())
        .filter(|f| **f == ClientFrame::Ping { id: None })
        .count();
    assert_eq!(pings, 3);
    assert!(pair.client.is_open(), "the broker's Pongs keep it alive");
    assert_eq!(ended(&pair.take()), None);
}

#[test]
fn errors_answer_their_request_and_the_session_goes_on() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    let bad = pair.subscribe("bad room");
    let events = pair.take();
    assert!(
        matches!(
            reply(&events, bad),
            Some(Err(RequestError::Server {
                code: Code::InvalidRoom,
                ..
            }))
        ),
        "{events:?}"
    );
    // An error naming no request changes nothing.
    pair.inject(ServerFrame::Error {
        id: None,
        code: Code::UnknownFrame,
        message: "?".into(),
        retry_after_ms: None,
    });
    pair.restart_room("a:b", 1, 9);
    let sub = pair.subscribe("a:b");
    let again = pair.subscribe("a:b");
    let events = pair.take();
    assert!(matches!(
        reply(&events, sub),
        Some(Ok(Answer::Subscribed {
            position: Position { epoch: 1, seq: 9 },
            ..
        }))
    ));
    // A second subscription to the same room is refused without asking the broker.
    assert_eq!(
        reply(&events, again),
        Some(&Err(RequestError::AlreadySubscribed("a:b".into())))
    );
    assert_eq!(pair.subscribes.len(), 1);

    pair.refusals
        .add("pub a:b", Refusal::new(Code::Forbidden, "read only"));
    let publish = pair.publish("a:b", 1, None);
    let ping = pair.id();
    pair.client.ping(ping, pair.now);
    pair.pump();
    let events = pair.take();
    assert_eq!(
        reply(&events, publish),
        Some(&Err(RequestError::Server {
            code: Code::Forbidden,
            message: "read only".into()
        }))
    );
    assert_eq!(reply(&events, ping), Some(&Ok(Answer::Pong)));
    pair.publish_elsewhere("a:b", 10);
    assert_eq!(delivered(&pair.take()), [10], "the subscription goes on");
    assert!(pair.client.is_open());
}

#[test]
fn a_broker_close_ends_the_transport_session_and_finish_fails_what_waits() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    let sub = pair.subscribe("orders:1");
    // Neither is answered before the close.
    let server = pair.server.take();
    let publish = pair.publish("orders:1", 1, None);
    let subscribe = pair.subscribe("orders:2");
    pair.server = server;
    pair.publish_elsewhere("orders:1", 4);
    pair.take();
    pair.inject(ServerFrame::Close {
        code: Code::ShuttingDown,
        reason: "draining".into(),
        reconnect: false,
        retry_after_ms: None,
    });
    let expected = CloseInfo {
        code: Some(Code::ShuttingDown),
        reason: "draining".into(),
        reconnect: false,
    };
    let events = pair.take();
    assert_eq!(ended(&events), Some(&expected));
    assert_eq!(
        reply(&events, publish),
        None,
        "settled by finish or a reconnect"
    );
    assert!(!pair.client.is_open());

    // The driver does not reconnect: everything waiting ends with the broker's verdict.
    pair.client.finish(&expected);
    pair.drain();
    let events = pair.take();
    let closed = Err(RequestError::Closed(expected.clone()));
    assert_eq!(reply(&events, publish), Some(&closed));
    assert_eq!(reply(&events, subscribe), Some(&closed));
    assert!(events.contains(&SessionEvent::Forget {
        sub,
        close: Some(expected.clone())
    }));
    // Requests after the end fail at once with the same information.
    let ping = pair.id();
    pair.client.ping(ping, pair.now);
    let again = pair.subscribe("orders:3");
    pair.drain();
    let events = pair.take();
    assert_eq!(reply(&events, ping), Some(&closed));
    assert_eq!(reply(&events, again), Some(&closed));
}

#[test]
fn events_that_overtake_subscribed_and_replays_are_delivered_once_in_order() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    let id = pair.id();
    pair.client.subscribe(id, "a:1".into());
    // The broker's answer is played by hand: a room stream may deliver events before
    // `Subscribed`, some of them older than the position it confirms.
    assert!(matches!(
        pair.client
            .poll_transmit(pair.now)
            .map(|t| ClientFrame::decode(&t.frame)),
        Some(Ok(ClientFrame::Subscribe { .. }))
    ));
    pair.inject(ServerFrame::Event(event("a:1", 10, None)));
    pair.inject(ServerFrame::Event(event("a:1", 11, None)));
    pair.inject(ServerFrame::Subscribed {
        id,
        room: RoomName::new("a:1").unwrap(),
        seq: 10,
        epoch: 3,
        recovered: None,
    });
    for seq in [11, 12, 11, 9, 13, 12, 13, 14] {
        pair.inject(ServerFrame::Event(event("a:1", seq, None)));
    }
    // The same epoch given explicitly is no reset: still a duplicate.
    pair.inject(ServerFrame::Event(event("a:1", 14, Some(3))));
    let events = pair.take();
    assert_eq!(delivered(&events), [11, 12, 13, 14]);
    assert_eq!(resumed(&events), []);
}

#[test]
fn a_new_epoch_resets_the_position_and_the_reconnect_resubscribes_from_it() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    pair.restart_room("orders:1", 3, 10);
    pair.subscribe("orders:1");
    pair.publish_elsewhere("orders:1", 11);
    // The room's numbering restarted (cluster: stream recreated).
    pair.inject(ServerFrame::Event(event("orders:1", 1, Some(4))));
    pair.inject(ServerFrame::Event(event("orders:1", 2, None)));
    let events = pair.take();
    assert_eq!(delivered(&events), [11, 1, 2]);
    assert_eq!(
        resumed(&events),
        [Resumption {
            recovery: Recovery::Reset,
            previous: at(3, 11),
            position: at(4, 0),
        }]
    );
    let marker = events
        .iter()
        .position(|e| matches!(e, SessionEvent::Resumed { .. }));
    let first = events
        .iter()
        .position(|e| matches!(e, SessionEvent::Deliver { event, .. } if event.seq == 1));
    assert!(
        marker < first,
        "the marker comes before the new epoch's first event"
    );

    // Meanwhile the broker moved on to another epoch: not recovered.
    pair.lose();
    pair.restart_room("orders:1", 5, 40);
    pair.connect(None, None);
    assert_eq!(
        pair.subscribes.last(),
        Some(&("orders:1".to_owned(), Some(at(4, 2)))),
        "the new epoch is held"
    );
    assert_eq!(
        resumed(&pair.take()),
        [Resumption {
            recovery: Recovery::Reset,
            previous: at(4, 2),
            position: at(5, 40),
        }]
    );
    pair.publish_elsewhere("orders:1", 41);
    assert_eq!(delivered(&pair.take()), [41]);
}

#[test]
fn refused_resubscriptions_are_retried_when_the_code_allows_and_end_otherwise() {
    let mut pair = Pair::new(false);
    pair.connect(None, None);
    pair.restart_room("a:1", 2, 5);
    pair.restart_room("a:2", 2, 5);
    pair.subscribe("a:1");
    let second = pair.subscribe("a:2");
    pair.lose();
    pair.take();
    let wait = Duration::from_millis(300);
    pair.refusals.add(
        "sub a:1",
        Refusal::new(Code::RateLimited, "slow down").retry_after(wait),
    );
    pair.refusals
        .add("sub a:2", Refusal::new(Code::Forbidden, "no longer"));
    pair.connect(None, None);
    let events = pair.take();
    let close = events.iter().find_map(|e| match e {
        SessionEvent::Forget { sub, close } if *sub == second => Some(close.clone()),
        _ => None,
    });
    match close {
        Some(Some(info)) => {
            assert_eq!(info.code, Some(Code::Forbidden));
            assert!(!info.reconnect);
        }
        other => panic!("expected a:2 to end, got {other:?}"),
    }
    assert_eq!(resumed(&events), []);

    // The rate-limited one is sent again after the broker's wait, from the same position.
    assert_eq!(pair.client.poll_timeout(), Some(pair.now + wait));
    pair.advance(wait);
    pair.client.handle_timeout(pair.now);
    pair.pump();
    assert_eq!(
        pair.subscribes.last(),
        Some(&("a:1".to_owned(), Some(at(2, 5))))
    );
    assert_eq!(
        resumed(&pair.take()),
        [Resumption {
            recovery: Recovery::Recovered,
            previous: at(2, 5),
            position: at(2, 5),
        }]
    );
    pair.publish_elsewhere("a:1", 6);
    assert_eq!(delivered(&pair.take()), [6]);
}

#[test]
fn a_refused_refresh_keeps_the_session_and_one_answered_by_close_ends_it() {
    let mut pair = Pair::new(true);
    // Ten seconds left: refreshed as soon as allowed.
    let exp = WALL_MS / 1000 + 10;
    pair.connect(Some("t1"), Some(exp));
    pair.now = pair.client.poll_timeout().unwrap();
    assert_eq!(
        pair.now,
        pair.start + roomcast_protocol::client::MIN_REFRESH_DELAY
    );
    pair.client.handle_timeout(pair.now);
    pair.drain();
    assert!(pair.take().contains(&SessionEvent::FetchToken));

    pair.refusals
        .add("refresh t2", Refusal::new(Code::Forbidden, "another user"));
    pair.client.refresh_token("t2".into(), Some(exp + 3600));
    let ping = pair.id();
    pair.client.ping(ping, pair.now);
    pair.pump();
    let events = pair.take();
    assert!(
        events.contains(&SessionEvent::TokenRefreshFailed(RequestError::Server {
            code: Code::Forbidden,
            message: "another user".into()
        }))
    );
    assert_eq!(
        reply(&events, ping),
        Some(&Ok(Answer::Pong)),
        "the session goes on"
    );

    // A refresh in flight when the connection drops fails with Disconnected.
    let server = pair.server.take();
    pair.client.refresh_token("t3".into(), None);
    pair.pump();
    pair.server = server;
    pair.lose();
    assert!(pair.take().iter().any(|e| matches!(
        e,
        SessionEvent::TokenRefreshFailed(RequestError::Disconnected(_))
    )));

    // A refresh the broker answers by closing the session.
    pair.connect(Some("t4"), None);
    pair.refusals
        .add("refresh t5", Refusal::new(Code::Unauthorized, "expired"));
    pair.client.refresh_token("t5".into(), None);
    pair.pump();
    let events = pair.take();
    let info = ended(&events).expect("the session ends").clone();
    assert_eq!(info.code, Some(Code::Unauthorized));
    assert!(!info.reconnect);
    assert!(
        events.contains(&SessionEvent::TokenRefreshFailed(RequestError::Closed(
            info
        )))
    );
}
