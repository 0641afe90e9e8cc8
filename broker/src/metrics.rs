//! Prometheus metrics: one registry per broker instance (so tests can run several brokers in
//! one process), rendered in the text exposition format at `GET /metrics`. Only counters and
//! gauges that are cheap to update on the hot path.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use roomcast_protocol::Code;

/// Label for metrics split by transport.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `ws` or `wt`.
    pub transport: &'static str,
}

/// Label for metrics split by error or close code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The code's snake_case name.
    pub code: &'static str,
}

/// Label for sessions ended, by transport and cause.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DisconnectLabel {
    /// `ws` or `wt`.
    pub transport: &'static str,
    /// `clean` (the client closed the transport properly), `reset` (the connection broke or
    /// was dropped without a close: TCP reset, EOF without a close handshake, QUIC connection
    /// lost), or the close code's name the broker ended it with (`timeout`, `slow_consumer`,
    /// `protocol_error`, `shutting_down`, …): a bounded set.
    pub cause: &'static str,
}

/// Every metric the broker exports.
pub struct Metrics {
    registry: Registry,
    /// Open sessions by transport.
    pub sessions: Family<TransportLabel, Gauge>,
    /// Sessions accepted since start, by transport.
    pub sessions_opened: Family<TransportLabel, Counter>,
    /// Active subscriptions (session × room).
    pub subscriptions: Gauge,
    /// Rooms in the hub: with a local subscriber, or kept for their history.
    pub rooms: Gauge,
    /// Bytes held by room histories.
    pub history_bytes: Gauge,
    /// Publishes dropped as repeats of an idempotency key.
    pub duplicates: Counter,
    /// Events accepted from publishers.
    pub events_in: Counter,
    /// Event deliveries queued to subscribers.
    pub events_out: Counter,
    /// Sessions closed because their outbound queue overflowed.
    pub slow_consumers: Counter,
    /// Events dropped from a slow subscriber's queue because a later event of the same
    /// conflation key replaced them.
    pub conflated: Counter,
    /// Error frames and close codes sent, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// Sessions ended, by transport and cause.
    pub disconnects: Family<DisconnectLabel, Counter>,
    /// WebTransport datagrams received (frames from clients).
    pub datagrams_in: Counter,
    /// WebTransport datagrams sent (events of volatile rooms).
    pub datagrams_out: Counter,
    /// Cluster mode: the metrics of the NATS bridge.
    pub nats: NatsMetrics,
}

/// Metrics of the NATS bridge (all zero on a single node). Clones share the same values.
#[derive(Clone, Default)]
pub struct NatsMetrics {
    /// 1 while connected to a NATS server, else 0.
    pub connected: Gauge,
    /// Times the NATS connection was lost.
    pub disconnects: Counter,
    /// Events handed to NATS.
    pub published: Counter,
    /// Events NATS refused after they were queued (the client was closed).
    pub publish_failures: Counter,
    /// Messages received from NATS on room subscriptions.
    pub received: Counter,
    /// Messages from NATS refused (missing or bad event header, bad payload, room mismatch).
    pub invalid: Counter,
    /// async-nats slow-consumer events: messages of a room subscription dropped because the
    /// node did not keep up.
    pub slow_consumers: Counter,
    /// Room subjects this node is subscribed to.
    pub subscriptions: Gauge,
    /// Events read from JetStream to fill a gap in a room's live feed (missed while the
    /// node's connection was down, or dropped as a slow consumer).
    pub gap_fills: Counter,
    /// Events read from JetStream to answer recoveries.
    pub replayed: Counter,
    /// JetStream requests that failed (stream creation, reads, publish acks).
    pub jetstream_errors: Counter,
    /// 1 while the NATS server offers JetStream to this node (checked on every connect and
    /// every few seconds while not), else 0; always 0 with `--no-nats-history`.
    pub jetstream_available: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under the `roomcast` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("roomcast");
        let m = Metrics {
            registry: Registry::default(),
            sessions: Family::default(),
            sessions_opened: Family::default(),
            subscriptions: Gauge::default(),
            rooms: Gauge::default(),
            history_bytes: Gauge::default(),
            duplicates: Counter::default(),
            events_in: Counter::default(),
            events_out: Counter::default(),
            slow_consumers: Counter::default(),
            conflated: Counter::default(),
            errors: Family::default(),
            disconnects: Family::default(),
            datagrams_in: Counter::default(),
            datagrams_out: Counter::default(),
            nats: NatsMetrics::default(),
        };
        registry.register("sessions", "Open sessions by transport", m.sessions.clone());
        registry.register(
            "sessions_opened",
            "Sessions accepted",
            m.sessions_opened.clone(),
        );
        registry.register(
            "subscriptions",
            "Active subscriptions",
            m.subscriptions.clone(),
        );
        registry.register(
            "rooms",
            "Rooms with local subscribers or kept for their history",
            m.rooms.clone(),
        );
        registry.register(
            "history_bytes",
            "Bytes held by room histories",
            m.history_bytes.clone(),
        );
        registry.register(
            "duplicate_publishes",
            "Publishes dropped as repeats of an idempotency key",
            m.duplicates.clone(),
        );
        registry.register(
            "events_in",
            "Events accepted from publishers",
            m.events_in.clone(),
        );
        registry.register(
            "events_out",
            "Event deliveries queued",
            m.events_out.clone(),
        );
        registry.register(
            "slow_consumer_closes",
            "Sessions closed as slow consumers",
            m.slow_consumers.clone(),
        );
        registry.register(
            "conflated_events",
            "Events replaced in a slow subscriber's queue by a later event of the same conflation key",
            m.conflated.clone(),
        );
        registry.register(
            "errors",
            "Error and close codes sent, by code",
            m.errors.clone(),
        );
        registry.register(
            "disconnects",
            "Sessions ended, by transport and cause (clean, reset, or the broker's close code)",
            m.disconnects.clone(),
        );
        registry.register(
            "datagrams_in",
            "WebTransport datagrams received",
            m.datagrams_in.clone(),
        );
        registry.register(
            "datagrams_out",
            "WebTransport datagrams sent",
            m.datagrams_out.clone(),
        );
        let nats = &m.nats;
        let sub = registry.sub_registry_with_prefix("nats");
        sub.register(
            "connected",
            "1 while connected to NATS",
            nats.connected.clone(),
        );
        sub.register(
            "disconnects",
            "NATS connection losses",
            nats.disconnects.clone(),
        );
        sub.register("published", "Events handed to NATS", nats.published.clone());
        sub.register(
            "publish_failures",
            "Queued events NATS refused",
            nats.publish_failures.clone(),
        );
        sub.register(
            "received",
            "Messages received from NATS",
            nats.received.clone(),
        );
        sub.register(
            "invalid",
            "Messages from NATS refused as invalid",
            nats.invalid.clone(),
        );
        sub.register(
            "slow_consumers",
            "async-nats slow-consumer events (messages dropped)",
            nats.slow_consumers.clone(),
        );
        sub.register(
            "subscriptions",
            "Room subjects subscribed",
            nats.subscriptions.clone(),
        );
        sub.register(
            "gap_fills",
            "Events read from JetStream to fill gaps in live feeds",
            nats.gap_fills.clone(),
        );
        sub.register(
            "replayed",
            "Events read from JetStream to answer recoveries",
            nats.replayed.clone(),
        );
        sub.register(
            "jetstream_errors",
            "JetStream requests that failed",
            nats.jetstream_errors.clone(),
        );
        sub.register(
            "jetstream_available",
            "1 while the NATS server offers JetStream (room history), else 0",
            nats.jetstream_available.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one error or close code sent.
    pub fn count_code(&self, code: Code) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labels() {
        let m = Metrics::new();
        m.sessions
            .get_or_create(&TransportLabel { transport: "ws" })
            .inc();
        m.events_in.inc_by(3);
        m.count_code(Code::InvalidRoom);
        let text = m.render();
        assert!(
            text.contains("roomcast_sessions{transport=\"ws\"} 1"),
            "{text}"
        );
        assert!(text.contains("roomcast_events_in_total 3"), "{text}");
        assert!(
            text.contains("roomcast_errors_total{code=\"invalid_room\"} 1"),
            "{text}"
        );
    }
}
