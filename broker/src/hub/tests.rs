//! The hub's unit tests: registry, rules, fan-out, history and recovery, conflation, the
//! liveness surface the cluster uses.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use roomcast_protocol::{EventName, Payload, PayloadLimits, Position, RoomName, ServerFrame};

use super::*;
use crate::{conflation::KeyPath, outbox::Outbox, wire::Lane};

fn room(name: &str) -> RoomName {
    RoomName::new(name).unwrap()
}

fn decode(frame: &[u8]) -> ServerFrame {
    ServerFrame::decode(frame, PayloadLimits::default()).unwrap()
}

/// Rules of cluster mode: reliable rooms without history of their own.
fn no_history() -> RoomRules {
    RoomRules {
        default: RoomRule {
            history: HistoryLimits::OFF,
            ..RoomRule::RELIABLE
        },
        ..RoomRules::default()
    }
}

fn seqs(frames: &[ServerFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Event(e) => Some(e.seq),
            _ => None,
        })
        .collect()
}

fn publish_n(hub: &Hub, r: &RoomName, n: u64) {
    let event = EventName::new("e").unwrap();
    for i in 0..n {
        hub.publish(r, &event, &Payload::encode(&i).unwrap(), None);
    }
}

#[test]
fn recovery_replays_what_was_missed_then_goes_live_without_gap_or_duplicate() {
    let hub = Hub::new();
    let r = room("orders:1");
    let a = Arc::new(Outbox::new(1 << 20));
    let start = hub.subscribe(&r, 1, &a, 1, None).unwrap();
    assert_ne!(start.position.epoch, 0, "a room with history has an epoch");
    assert_eq!((start.position.seq, start.recovered), (0, None));
    publish_n(&hub, &r, 3);
    let seen = drain(&a);
    assert_eq!(seqs(&seen), [1, 2, 3]);
    let held = Position {
        epoch: start.position.epoch,
        seq: 3,
    };
    // The client goes away; the room (its only subscriber gone) keeps its history.
    hub.unsubscribe(&r, 1, &a, None).unwrap();
    assert_eq!(hub.room_count(), 1);
    publish_n(&hub, &r, 4); // 4..=7 while away
    let b = Arc::new(Outbox::new(1 << 20));
    let start = hub.subscribe(&r, 2, &b, 9, Some(held)).unwrap();
    assert_eq!(start.recovered, Some(true));
    assert_eq!(start.position, held);
    publish_n(&hub, &r, 1); // 8, live
    let frames = drain(&b);
    assert!(matches!(
        frames[0],
        ServerFrame::Subscribed { id: 9, seq: 3, recovered: Some(true), epoch, .. }
            if epoch == held.epoch
    ));
    assert_eq!(seqs(&frames), [4, 5, 6, 7, 8]);
}

#[test]
fn unrecoverable_positions_say_recovered_false_with_the_current_position() {
    let rules = RoomRules {
        default: RoomRule {
            history: HistoryLimits {
                events: 2,
                ..RoomRule::RELIABLE.history
            },
            ..RoomRule::RELIABLE
        },
        ..RoomRules::default()
    };
    let hub = Hub::with_rules(rules, None);
    let r = room("orders:1");
    let a = Arc::new(Outbox::new(1 << 20));
    let epoch = hub.subscribe(&r, 1, &a, 1, None).unwrap().position.epoch;
    publish_n(&hub, &r, 5); // history holds 4, 5
    let cases = [
        (Position { epoch, seq: 1 }, "too old"),
        (
            Position {
                epoch: epoch ^ 1,
                seq: 5,
            },
            "another epoch",
        ),
        (Position { epoch, seq: 9 }, "beyond the room's last event"),
        (Position { epoch: 0, seq: 0 }, "epoch 0"),
    ];
    for (i, (since, why)) in cases.into_iter().enumerate() {
        let o = Arc::new(Outbox::new(1 << 20));
        let start = hub
            .subscribe(&r, 10 + i as u64, &o, 1, Some(since))
            .unwrap();
        assert_eq!(start.recovered, Some(false), "{why}");
        assert_eq!(start.position, Position { epoch, seq: 5 }, "{why}");
        assert!(seqs(&drain(&o)).is_empty(), "{why}: nothing replayed");
    }
    // Holding exactly the oldest kept event's predecessor still recovers.
    let o = Arc::new(Outbox::new(1 << 20));
    let start = hub
        .subscribe(&r, 20, &o, 1, Some(Position { epoch, seq: 3 }))
        .unwrap();
    assert_eq!(start.recovered, Some(true));
    assert_eq!(seqs(&drain(&o)), [4, 5]);
    // A replay that would not fit the subscriber's queue is refused, not half-sent.
    let small = Arc::new(Outbox::new(4096 + 10));
    let start = hub
        .subscribe(&r, 21, &small, 1, Some(Position { epoch, seq: 3 }))
        .unwrap();
    assert_eq!(start.recovered, Some(false));
    assert!(!small.is_overflowed());
}

#[test]
fn a_repeated_idempotency_key_is_delivered_once() {
    let hub = Hub::new();
    let r = room("orders:1");
    let a = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&r, 1, &a, 1, None).unwrap();
    let event = EventName::new("e").unwrap();
    let data = Payload::encode(&1).unwrap();
    let first = hub.publish(&r, &event, &data, Some("k1"));
    let again = hub.publish(&r, &event, &data, Some("k1"));
    let other = hub.publish(&r, &event, &data, Some("k2"));
    assert_eq!(
        (first.seq, first.duplicate, first.delivered),
        (Some(1), false, 1)
    );
    assert_eq!(
        (again.seq, again.duplicate, again.delivered),
        (Some(1), true, 0)
    );
    assert_eq!((other.seq, other.duplicate), (Some(2), false));
    assert_eq!(seqs(&drain(&a)), [1, 2]);
}

#[test]
fn sweep_drops_history_only_rooms_once_their_history_expired() {
    let recorder = Arc::new(Recorder::default());
    let hub = Hub::with_rules(RoomRules::default(), Some(recorder.clone()));
    let r = room("orders:1");
    let a = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&r, 1, &a, 1, None).unwrap();
    publish_n(&hub, &r, 2);
    hub.unsubscribe(&r, 1, &a, None).unwrap();
    assert!(hub.history_bytes() > 0);
    let now = Instant::now();
    assert_eq!(hub.sweep(now), 0, "history still young");
    assert_eq!(hub.room_count(), 1);
    let later = now + RoomRule::RELIABLE.history.ttl + Duration::from_secs(1);
    assert_eq!(hub.sweep(later), 1);
    assert_eq!(hub.room_count(), 0);
    assert_eq!(hub.history_bytes(), 0, "the budget is given back");
    // Interest went off when the last subscriber left, once.
    let seen = recorder.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("orders:1".to_string(), true),
            ("orders:1".to_string(), false)
        ]
    );
    // A publish to a room with no state records nothing (nobody can hold its epoch).
    publish_n(&hub, &r, 1);
    assert_eq!(hub.room_count(), 0);
}

fn drain(outbox: &Outbox) -> Vec<ServerFrame> {
    let mut batch = Vec::new();
    outbox.drain_into(&mut batch);
    batch.iter().map(|o| decode(&o.frame)).collect()
}

#[test]
fn fan_out_shares_one_encoding_in_seq_order() {
    let hub = Hub::new();
    let r = room("orders:1");
    let outboxes: Vec<_> = (0..3).map(|_| Arc::new(Outbox::new(1 << 20))).collect();
    for (i, o) in outboxes.iter().enumerate() {
        assert_eq!(
            hub.subscribe(&r, i as u64, o, 1, None)
                .map(|s| s.position.seq),
            Ok(0)
        );
    }
    let event = EventName::new("e").unwrap();
    for n in 0..5u32 {
        let d = hub.publish(&r, &event, &Payload::encode(&n).unwrap(), None);
        assert_eq!(d.seq, Some(u64::from(n) + 1));
        assert_eq!(d.delivered, 3);
    }
    let mut batches = Vec::new();
    for o in &outboxes {
        let mut b = Vec::new();
        o.drain_into(&mut b);
        batches.push(b);
    }
    // Every subscriber got Subscribed then events 1..=5, and the event frames are the very
    // same allocation.
    for b in &batches {
        assert_eq!(b.len(), 6);
        assert!(matches!(
            decode(&b[0].frame),
            ServerFrame::Subscribed { seq: 0, .. }
        ));
        assert!(matches!(b[0].lane, Lane::RoomOpen(_)));
        for (i, f) in b[1..].iter().enumerate() {
            assert!(matches!(f.lane, Lane::Room(_)));
            match decode(&f.frame) {
                ServerFrame::Event(e) => assert_eq!(e.seq, i as u64 + 1),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(batches[0][1].frame.as_ptr(), batches[2][1].frame.as_ptr());
}

#[test]
fn volatile_namespaces_put_events_on_the_volatile_lane() {
    let hub = Hub::with_volatile_namespaces(vec!["gps".into()]);
    let o = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&room("gps:truck-1"), 1, &o, 1, None).unwrap();
    hub.subscribe(&room("orders:1"), 1, &o, 2, None).unwrap();
    let event = EventName::new("e").unwrap();
    hub.publish(
        &room("gps:truck-1"),
        &event,
        &Payload::encode(&1).unwrap(),
        None,
    );
    hub.publish(
        &room("orders:1"),
        &event,
        &Payload::encode(&2).unwrap(),
        None,
    );
    let mut batch = Vec::new();
    o.drain_into(&mut batch);
    assert!(matches!(batch[2].lane, Lane::Volatile(_)));
    assert!(matches!(batch[3].lane, Lane::Room(_)));
}

#[test]
fn unsubscribe_stops_delivery_and_drops_empty_rooms() {
    let hub = Hub::with_rules(no_history(), None);
    let r = room("a:b");
    let o = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&r, 1, &o, 1, None).unwrap();
    hub.subscribe(&r, 1, &o, 2, None).unwrap(); // idempotent
    assert_eq!(hub.room_count(), 1);
    let event = EventName::new("e").unwrap();
    assert_eq!(
        hub.publish(&r, &event, &Payload::encode(&1).unwrap(), None)
            .delivered,
        1
    );
    assert_eq!(hub.subscription_count(), 1);
    hub.unsubscribe(&r, 1, &o, Some(3)).unwrap();
    assert_eq!(hub.room_count(), 0);
    assert_eq!(hub.subscription_count(), 0);
    let d = hub.publish(&r, &event, &Payload::encode(&2).unwrap(), None);
    assert_eq!(d, Delivery::default());
    let frames = drain(&o);
    assert_eq!(frames.len(), 4);
    assert!(matches!(frames[3], ServerFrame::Unsubscribed { id: 3, .. }));
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, bool)>>);

impl Interest for Recorder {
    fn interest_on(&self, room: &RoomName) {
        self.0.lock().unwrap().push((room.to_string(), true));
    }
    fn interest_off(&self, room: &RoomName) {
        self.0.lock().unwrap().push((room.to_string(), false));
    }
}

/// An interest listener that confirms rooms (as the NATS bridge does).
struct Confirming;

impl Interest for Confirming {
    fn interest_on(&self, _room: &RoomName) {}
    fn interest_off(&self, _room: &RoomName) {}
    fn confirms_live(&self) -> bool {
        true
    }
}

#[test]
fn subscribed_waits_until_the_room_is_live_and_no_event_comes_before_it() {
    let hub = Hub::with_rules(no_history(), Some(Arc::new(Confirming)));
    let r = room("orders:1");
    let (a, b) = (
        Arc::new(Outbox::new(1 << 20)),
        Arc::new(Outbox::new(1 << 20)),
    );
    assert_eq!(
        hub.subscribe(&r, 1, &a, 7, None).map(|s| s.position.seq),
        Ok(0)
    );
    // A second Subscribe while waiting: the newest request id gets the reply.
    assert_eq!(
        hub.subscribe(&r, 1, &a, 8, None).map(|s| s.position.seq),
        Ok(0)
    );
    assert_eq!(hub.subscription_count(), 1);
    assert!(
        drain(&a).is_empty(),
        "no Subscribed before the room is live"
    );
    // An event reaching the node before the confirmation (a lingering subscription) is
    // counted but reaches nobody waiting.
    let event = EventName::new("e").unwrap();
    let d = hub.publish(&r, &event, &Payload::encode(&1).unwrap(), None);
    assert_eq!((d.seq, d.delivered), (Some(1), 0));
    assert_eq!(hub.subscription_count(), 1, "waiting subscribers stay");
    hub.mark_live(&r);
    assert_eq!(
        drain(&a),
        vec![ServerFrame::Subscribed {
            epoch: 0,
            recovered: None,
            id: 8,
            room: r.clone(),
            seq: 1
        }]
    );
    hub.mark_live(&r);
    assert!(
        drain(&a).is_empty(),
        "marking a live room again sends nothing"
    );
    // Live now: a new subscriber is answered at once; events reach both.
    assert_eq!(
        hub.subscribe(&r, 2, &b, 1, None).map(|s| s.position.seq),
        Ok(1)
    );
    hub.publish(&r, &event, &Payload::encode(&2).unwrap(), None);
    for outbox in [&a, &b] {
        let frames = drain(outbox);
        let last = frames.last().unwrap();
        assert!(
            matches!(last, ServerFrame::Event(e) if e.seq == 2),
            "{frames:?}"
        );
    }
}

#[test]
fn leaving_before_the_room_is_live_answers_subscribe_then_unsubscribe() {
    let hub = Hub::with_rules(no_history(), Some(Arc::new(Confirming)));
    let r = room("orders:1");
    let a = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&r, 1, &a, 3, None).unwrap();
    hub.unsubscribe(&r, 1, &a, Some(4)).unwrap();
    assert_eq!(
        drain(&a),
        vec![
            ServerFrame::Subscribed {
                epoch: 0,
                recovered: None,
                id: 3,
                room: r.clone(),
                seq: 0
            },
            ServerFrame::Unsubscribed { id: 4, room: r },
        ]
    );
    assert_eq!(hub.room_count(), 0);
}

#[test]
fn interest_follows_first_and_last_subscriber() {
    let recorder = Arc::new(Recorder::default());
    let hub = Hub::with_rules(no_history(), Some(recorder.clone()));
    let (a, b) = (room("a:1"), room("b:1"));
    let o1 = Arc::new(Outbox::new(1 << 20));
    let o2 = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&a, 1, &o1, 1, None).unwrap();
    hub.subscribe(&a, 2, &o2, 1, None).unwrap();
    hub.subscribe(&a, 1, &o1, 2, None).unwrap(); // again: no new interest
    hub.subscribe(&b, 1, &o1, 3, None).unwrap();
    hub.unsubscribe(&a, 1, &o1, None).unwrap();
    hub.unsubscribe(&a, 2, &o2, None).unwrap();
    hub.unsubscribe(&a, 2, &o2, None).unwrap(); // room already gone: nothing more
    hub.subscribe(&a, 2, &o2, 4, None).unwrap();
    let seen = recorder.0.lock().unwrap().clone();
    let want = [("a:1", true), ("b:1", true), ("a:1", false), ("a:1", true)];
    let want: Vec<_> = want.iter().map(|(r, on)| (r.to_string(), *on)).collect();
    assert_eq!(seen, want);
}

#[test]
fn slow_subscriber_is_dropped_others_keep_receiving() {
    let hub = Hub::new();
    let r = room("a:b");
    let slow = Arc::new(Outbox::new(200));
    let fast = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&r, 1, &slow, 1, None).unwrap();
    hub.subscribe(&r, 2, &fast, 1, None).unwrap();
    let event = EventName::new("e").unwrap();
    let data = Payload::encode(&vec![7u8; 64]).unwrap();
    let mut slow_seen = 0;
    for _ in 0..10 {
        slow_seen += hub.publish(&r, &event, &data, None).slow;
    }
    assert_eq!(slow_seen, 1, "the slow subscriber is dropped once");
    assert_eq!(hub.subscription_count(), 1);
    assert!(slow.is_overflowed());
    assert_eq!(drain(&fast).len(), 11);
}

/// Rules where namespace `px` conflates by `data.id` (and `gps` is volatile).
fn conflating() -> RoomRules {
    let mut rules = RoomRules::with_volatile(["gps".to_owned()]);
    rules.namespaces.insert(
        "px".into(),
        RoomRule {
            conflate: Some(Arc::new(KeyPath::parse("id").unwrap())),
            ..RoomRule::RELIABLE
        },
    );
    rules
}

fn tick(id: Option<&str>, n: u64) -> Payload {
    match id {
        Some(id) => Payload::encode(&serde_json::json!({ "id": id, "n": n })).unwrap(),
        None => Payload::encode(&serde_json::json!({ "n": n })).unwrap(),
    }
}

#[test]
fn a_slow_subscriber_of_a_conflating_room_gets_the_latest_per_key_others_everything() {
    let counter = Counter::default();
    let hub = Hub::with_rules(conflating(), None).count_conflated_in(counter.clone());
    let r = room("px:fx");
    let slow = Arc::new(Outbox::new(2000));
    let fast = Arc::new(Outbox::new(1 << 20));
    hub.subscribe(&r, 1, &slow, 1, None).unwrap();
    hub.subscribe(&r, 2, &fast, 1, None).unwrap();
    let event = EventName::new("px").unwrap();
    let keys = ["EURUSD", "USDJPY", "GBPUSD"];
    for n in 1..=3000 {
        // A few events have no key: never replaced.
        let id = (n % 500 != 0).then(|| keys[n as usize % 3]);
        let delivery = hub.publish(&r, &event, &tick(id, n), None);
        assert_eq!((delivery.delivered, delivery.slow), (2, 0));
        assert!(slow.queued_bytes() <= 2000);
    }
    assert_eq!(seqs(&drain(&fast)).len(), 3000);
    let frames = drain(&slow);
    let on = frames
        .iter()
        .position(|f| {
            *f == ServerFrame::Conflation {
                room: r.clone(),
                active: true,
            }
        })
        .expect("told it is conflated");
    assert_eq!(
        frames.last(),
        Some(&ServerFrame::Conflation {
            room: r.clone(),
            active: false
        })
    );
    let before = seqs(&frames[..on]);
    assert_eq!(before, (1..=before.len() as u64).collect::<Vec<_>>());
    let after = seqs(&frames[on..]);
    assert!(after.is_sorted());
    // After the marker: the latest event of each key...
    for key in keys {
        let last = (1..=3000u64)
            .rev()
            .find(|n| n % 500 != 0 && keys[*n as usize % 3] == key)
            .unwrap();
        assert!(after.contains(&last), "{key}: {last} in {after:?}");
    }
    // ...and no superseded one of a key, while events without the key are never replaced.
    let keyed: Vec<_> = after.iter().filter(|n| *n % 500 != 0).collect();
    assert_eq!(keyed.len(), 3, "{after:?}");
    assert!(after.iter().filter(|n| *n % 500 == 0).count() > 0);
    assert_eq!(
        hub.conflated(),
        counter.get(),
        "the metric counts the replacements"
    );
    // Every event was queued, or replaced by a later one of its key.
    assert_eq!(counter.get() as usize + before.len() + after.len(), 3000);
}

#[test]
fn only_reliable_rooms_of_conflating_namespaces_conflate() {
    let hub = Hub::with_rules(conflating(), None);
    let event = EventName::new("px").unwrap();
    for name in ["orders:1", "gps:1", "px:1"] {
        let r = room(name);
        let o = Arc::new(Outbox::new(400));
        hub.subscribe(&r, 1, &o, 1, None).unwrap();
        let mut slow = 0;
        for n in 1..=100 {
            slow += hub.publish(&r, &event, &tick(Some("k"), n), None).slow;
        }
        let frames = if o.is_overflowed() {
            Vec::new()
        } else {
            drain(&o)
        };
        match name {
            // Reliable without conflation: closed as slow.
            "orders:1" => assert_eq!(slow, 1),
            // Volatile: the oldest dropped, no Conflation frame.
            "gps:1" => {
                assert_eq!(slow, 0);
                assert!(o.dropped() > 0);
                assert!(
                    !frames
                        .iter()
                        .any(|f| matches!(f, ServerFrame::Conflation { .. }))
                );
            }
            _ => {
                assert_eq!(slow, 0);
                assert_eq!(seqs(&frames).last(), Some(&100));
                assert!(
                    frames
                        .iter()
                        .any(|f| matches!(f, ServerFrame::Conflation { .. }))
                );
            }
        }
    }
}

#[test]
fn a_sequenced_room_takes_its_stream_position_drops_repeats_and_answers_recoveries() {
    let rules = RoomRules {
        default: RoomRule {
            sequenced: true,
            ..RoomRule::RELIABLE
        },
        ..RoomRules::default()
    };
    let hub = Hub::with_rules(rules, Some(Arc::new(Confirming)));
    let r = room("orders:1");
    let (a, b, c) = (
        Arc::new(Outbox::new(1 << 20)),
        Arc::new(Outbox::new(1 << 20)),
        Arc::new(Outbox::new(1 << 20)),
    );
    let at = |seq| Position { epoch: 7, seq };
    hub.subscribe(&r, 1, &a, 1, None).unwrap();
    hub.subscribe(&r, 2, &b, 2, Some(at(3))).unwrap();
    let sequenced = hub.sequenced();
    assert!(sequenced.take_recoveries(&r).is_empty(), "not live yet");
    sequenced.mark_live_at(&r, at(5));
    let subscribed = |id, position: Position, recovered| ServerFrame::Subscribed {
        id,
        room: r.clone(),
        seq: position.seq,
        epoch: position.epoch,
        recovered,
    };
    assert_eq!(drain(&a), [subscribed(1, at(5), None)]);
    assert!(drain(&b).is_empty(), "a recovery waits for the reader");
    assert_eq!(sequenced.take_recoveries(&r), [(2, at(3))]);
    // The reader's replay (what the stream holds up to the room's position): events after
    // `since` only.
    let event = EventName::new("e").unwrap();
    let replay = (3..=5)
        .map(|seq| (seq, event.clone(), Payload::encode(&seq).unwrap()))
        .collect();
    sequenced.answer_recovery(&r, 2, Some(replay));
    let frames = drain(&b);
    assert_eq!(frames[0], subscribed(2, at(3), Some(true)));
    assert_eq!(seqs(&frames), [4, 5]);
    // Live events: one already delivered is dropped, a new one reaches everybody once.
    let data = Payload::encode(&0).unwrap();
    assert!(sequenced.publish(&r, &event, &data, at(5)).duplicate);
    assert_eq!(sequenced.publish(&r, &event, &data, at(6)).delivered, 2);
    assert!(sequenced.publish(&r, &event, &data, at(6)).duplicate);
    assert_eq!(seqs(&drain(&a)), [6]);
    assert_eq!(seqs(&drain(&b)), [6]);
    // A position of another epoch cannot be recovered: the current position instead.
    hub.subscribe(&r, 3, &c, 4, Some(Position { epoch: 1, seq: 0 }))
        .unwrap();
    assert_eq!(
        sequenced.take_recoveries(&r),
        [(3, Position { epoch: 1, seq: 0 })]
    );
    sequenced.answer_recovery(&r, 3, Some(Vec::new()));
    assert_eq!(drain(&c), [subscribed(4, at(6), Some(false))]);
    assert!(sequenced.take_recoveries(&r).is_empty());
}
