//! Room rules: how the rooms of each namespace behave (volatile, history, dedup window,
//! sequenced by the cluster, conflation).
//!
//! Owns the rule types and the lookup by namespace; plain data, built once from the
//! configuration and shared as a copy by the hub and the cluster bridge. It does not hold room
//! state or touch outboxes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use roomcast_protocol::RoomName;

use super::HistoryLimits;
use crate::conflation::KeyPath;

/// How the rooms of one namespace behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRule {
    /// Events may be dropped (oldest first) or sent as datagrams; never any history.
    pub volatile: bool,
    /// Recent events kept for recovery.
    pub history: HistoryLimits,
    /// How long a publish's idempotency key is remembered (zero: keys are ignored).
    pub dedup_window: Duration,
    /// Cluster mode with JetStream: `seq` and epoch come from the room's stream, the history
    /// and the idempotency keys live there (`history` and `dedup_window` configure the stream),
    /// and recoveries are answered by the bridge ([`super::Sequenced::take_recoveries`]).
    pub sequenced: bool,
    /// Where each event's conflation key is in its `data`: a subscriber that falls behind
    /// gets only the latest event per key (reliable rooms only; `None`: never conflated).
    pub conflate: Option<Arc<KeyPath>>,
}

impl RoomRule {
    /// Reliable, with the default history (256 events, 128 KiB, 5 minutes) and a 2-minute
    /// dedup window.
    pub const RELIABLE: RoomRule = RoomRule {
        volatile: false,
        history: HistoryLimits {
            events: 256,
            bytes: 128 * 1024,
            ttl: Duration::from_secs(300),
        },
        dedup_window: Duration::from_secs(120),
        sequenced: false,
        conflate: None,
    };

    /// Volatile: no history, no dedup.
    pub const VOLATILE: RoomRule = RoomRule {
        volatile: true,
        history: HistoryLimits::OFF,
        dedup_window: Duration::ZERO,
        sequenced: false,
        conflate: None,
    };
}

/// The rule of every namespace: a default plus exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRules {
    /// The rule of namespaces not listed.
    pub default: RoomRule,
    /// Rules by namespace.
    pub namespaces: HashMap<String, RoomRule>,
    /// Bytes all histories together may hold (each room keeps at least its newest event).
    pub history_budget: usize,
}

impl Default for RoomRules {
    fn default() -> Self {
        RoomRules {
            default: RoomRule::RELIABLE,
            namespaces: HashMap::new(),
            history_budget: 256 << 20,
        }
    }
}

impl RoomRules {
    /// The default rules with `namespaces` volatile.
    pub fn with_volatile(namespaces: impl IntoIterator<Item = String>) -> Self {
        let mut rules = RoomRules::default();
        for ns in namespaces {
            rules.namespaces.insert(ns, RoomRule::VOLATILE);
        }
        rules
    }

    /// The rule of `room`'s namespace.
    pub fn rule(&self, room: &RoomName) -> &RoomRule {
        self.namespaces
            .get(room.namespace())
            .unwrap_or(&self.default)
    }

    /// Whether some namespace conflates.
    pub(super) fn any_conflation(&self) -> bool {
        self.default.conflate.is_some() || self.namespaces.values().any(|r| r.conflate.is_some())
    }
}
