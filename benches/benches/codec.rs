//! Frame encode/decode and payload validation.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use roomcast_protocol::{
    ClientFrame, EventName, Payload, PayloadLimits, RoomName, ServerFrame, frame::encode_event,
    payload::validate,
};
use std::hint::black_box;

fn payload_100b() -> Payload {
    // A typical order update: a small map, padded to about 100 bytes.
    Payload::encode(&serde_json::json!({
        "id": 1042, "state": "shipped", "carrier": "ACME", "eta": 1_700_000_000u64,
        "note": "left the depot at 06:10, next stop in two hours"
    }))
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let room = RoomName::new("orders:1042").unwrap();
    let event = EventName::new("status").unwrap();
    let data = payload_100b();
    let publish = ClientFrame::Publish {
        id: 7,
        room: room.to_string(),
        event: event.to_string(),
        data: data.as_bytes().clone(),
        ack: true,
        key: None,
    }
    .encode();
    let event_frame = encode_event(&room, &event, &data, 123_456, None);

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_event", |b| {
        b.iter(|| encode_event(black_box(&room), &event, &data, black_box(123_456), None))
    });
    g.bench_function("decode_publish", |b| {
        b.iter(|| ClientFrame::decode(black_box(&publish)).unwrap())
    });
    g.bench_function("decode_event", |b| {
        b.iter(|| ServerFrame::decode(black_box(&event_frame), PayloadLimits::default()).unwrap())
    });
    g.bench_function("validate_payload_100b", |b| {
        b.iter(|| validate(black_box(data.as_bytes()), PayloadLimits::default()).unwrap())
    });
    let big =
        Payload::encode(&vec![serde_json::json!({"k": [1, 2, 3], "s": "text"}); 200]).unwrap();
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("validate_payload_big", |b| {
        b.iter(|| validate(black_box(big.as_bytes()), PayloadLimits::default()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
