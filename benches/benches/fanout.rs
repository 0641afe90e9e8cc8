//! In-process hub fan-out to 1, 100 and 10,000 subscribers (no sockets): the cost of
//! assigning seq, encoding once and pushing one shared `Bytes` into every outbox. Then
//! conflation: finding an event's key, and fan-out in a conflating namespace, to subscribers
//! that keep up and to one that does not.

#![allow(missing_docs)]

use std::{hint::black_box, sync::Arc};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use roomcast_broker::{
    conflation::KeyPath,
    hub::{Hub, RoomRule, RoomRules},
    outbox::{ConflationFrames, Outbox},
    wire::{Lane, Outgoing},
};
use roomcast_protocol::{EventName, Payload, RoomName};

fn bench(c: &mut Criterion) {
    let room = RoomName::new("ticker:BTC").unwrap();
    let event = EventName::new("px").unwrap();
    let data = Payload::encode(&vec![7u8; 90]).unwrap();
    let mut g = c.benchmark_group("hub_fanout");
    for subscribers in [1usize, 100, 10_000] {
        let hub = Hub::new();
        let outboxes: Vec<Arc<Outbox>> = (0..subscribers)
            .map(|i| {
                let outbox = Arc::new(Outbox::new(usize::MAX / 2));
                hub.subscribe(&room, i as u64, &outbox, 0, None).unwrap();
                outbox
            })
            .collect();
        let mut drained = Vec::new();
        g.throughput(Throughput::Elements(subscribers as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    hub.publish(&room, &event, &data, None);
                    // Keep queues short, as a writer would.
                    for o in &outboxes {
                        o.drain_into(&mut drained);
                        drained.clear();
                    }
                })
            },
        );
    }
    g.finish();
}

fn conflation(c: &mut Criterion) {
    let mut g = c.benchmark_group("conflation");
    let path = KeyPath::parse("instrument").unwrap();
    // A price tick of about 100 bytes, the key after two other entries.
    let tick = |n: u64| {
        let instrument = ["EURUSD", "USDJPY", "GBPUSD"][n as usize % 3];
        Payload::encode(&serde_json::json!({
            "bid": 1.0841, "ask": 1.0843, "instrument": instrument,
            "ts": 1_700_000_000_000u64 + n, "venue": "XLON", "note": "indicative, not firm"
        }))
        .unwrap()
    };
    let data = tick(0);
    g.bench_function("locate_key_100b", |b| {
        b.iter(|| path.locate(black_box(data.as_bytes())).unwrap())
    });
    // The worst case: the key after 200 entries of nested data (about 6 KB walked).
    let mut entries: Vec<(String, serde_json::Value)> = (0..200)
        .map(|i| {
            (
                format!("a{i}"),
                serde_json::json!({"k": [1, 2, 3], "s": "text"}),
            )
        })
        .collect();
    entries.push(("instrument".into(), serde_json::json!("EURUSD")));
    let big = Payload::encode(&entries.into_iter().collect::<serde_json::Map<_, _>>()).unwrap();
    g.bench_function("locate_key_6kb", |b| {
        b.iter(|| path.locate(black_box(big.as_bytes())).unwrap())
    });
    let mut rules = RoomRules::default();
    rules.namespaces.insert(
        "px".into(),
        RoomRule {
            conflate: Some(Arc::new(path.clone())),
            ..RoomRule::RELIABLE
        },
    );
    let event = EventName::new("tick").unwrap();
    let ticks: Vec<Payload> = (0..3).map(tick).collect();
    for (name, room, slow) in [
        ("not_conflating", "fx:fx", false),
        ("keeping_up", "px:fx", false),
        ("one_never_reading", "px:fx", true),
    ] {
        let room = RoomName::new(room).unwrap();
        let hub = Hub::with_rules(rules.clone(), None);
        let outboxes: Vec<Arc<Outbox>> = (0..100)
            .map(|i| {
                let outbox = Arc::new(Outbox::new(64 * 1024));
                hub.subscribe(&room, i as u64, &outbox, 0, None).unwrap();
                outbox
            })
            .collect();
        let mut drained = Vec::new();
        let mut n = 0;
        g.throughput(Throughput::Elements(100));
        g.bench_function(BenchmarkId::new("hub_fanout_100", name), |b| {
            b.iter(|| {
                n += 1;
                hub.publish(&room, &event, &ticks[n % 3], None);
                for o in &outboxes[usize::from(slow)..] {
                    o.drain_into(&mut drained);
                    drained.clear();
                }
            })
        });
    }
    // One push into the queue of a subscriber that fell behind: each replaces an older one.
    let outbox = Outbox::new(64 * 1024);
    let markers = ConflationFrames {
        on: Bytes::from_static(b"on"),
        off: Bytes::from_static(b"off"),
    };
    let frame: roomcast_broker::wire::Wire = Bytes::from(vec![0u8; 150]).into();
    let keys: Vec<std::num::NonZeroU64> = (1..=3).filter_map(std::num::NonZeroU64::new).collect();
    let mut n = 0;
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_replacing", |b| {
        b.iter(|| {
            n += 1;
            let item = Outgoing {
                frame: frame.clone(),
                lane: Lane::Room(1),
            };
            outbox
                .push_conflatable(item, keys[n % 3], &markers)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench, conflation);
criterion_main!(benches);
