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

/// Every metric the broker exports.
pub struct Metrics {
    registry: Registry,
    /// Open sessions by transport.
    pub sessions: Family<TransportLabel, Gauge>,
    /// Sessions accepted since start, by transport.
    pub sessions_opened: Family<TransportLabel, Counter>,
    /// Active subscriptions (session × room).
    pub subscriptions: Gauge,
    /// Rooms with at least one local subscriber.
    pub rooms: Gauge,
    /// Events accepted from publishers.
    pub events_in: Counter,
    /// Event deliveries queued to subscribers.
    pub events_out: Counter,
    /// Sessions closed because their outbound queue overflowed.
    pub slow_consumers: Counter,
    /// Error frames and close codes sent, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// WebTransport datagrams received (frames from clients).
    pub datagrams_in: Counter,
    /// WebTransport datagrams sent (events of volatile rooms).
    pub datagrams_out: Counter,
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
            events_in: Counter::default(),
            events_out: Counter::default(),
            slow_consumers: Counter::default(),
            errors: Family::default(),
            datagrams_in: Counter::default(),
            datagrams_out: Counter::default(),
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
        registry.register("rooms", "Rooms with local subscribers", m.rooms.clone());
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
            "errors",
            "Error and close codes sent, by code",
            m.errors.clone(),
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
