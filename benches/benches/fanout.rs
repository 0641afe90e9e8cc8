//! In-process hub fan-out to 1, 100 and 10,000 subscribers (no sockets): the cost of
//! assigning seq, encoding once and pushing one shared `Bytes` into every outbox.

#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use roomcast_broker::{hub::Hub, outbox::Outbox};
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

criterion_group!(benches, bench);
criterion_main!(benches);
