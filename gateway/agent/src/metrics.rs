//! Prometheus metrics of the gateway, served on `metrics_listen` (off by default): the tunnel's
//! state and transport, reconnects by reason, heartbeat round-trip time, commands by kind and
//! outcome with their duration, journal and outbox depth (read at scrape time), provider
//! errors by kind, and restarts of supervised background tasks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short category: `silent`, `goodbye`, `broken`, `refused`, `dial_<hop>`, ...
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub kind: String,
    /// `succeeded` or the failure class (`auth`, `timeout`, `interrupted`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The provider error kind (`unreachable`, `auth`, `not_found`, ...).
    pub kind: String,
}

/// Every metric of the gateway, registered once.
pub struct Metrics {
    pub registry: Registry,
    /// 1 for the tunnel's current state, 0 for the others.
    pub tunnel_state: Family<StateLabels, Gauge>,
    pub tunnel_websocket: Gauge,
    pub reconnects: Family<ReasonLabels, Counter>,
    pub heartbeat_rtt_seconds: Gauge<f64, AtomicU64>,
    pub commands: Family<CommandLabels, Counter>,
    pub command_seconds: Family<KindLabels, Histogram>,
    pub journal_entries: Gauge,
    pub outbox_depth: Gauge,
    pub provider_errors: Family<ErrorLabels, Counter>,
    /// Synchronous store flushes (group commits), read at scrape time.
    pub store_flushes: Counter,
    /// Supervised background tasks restarted after a panic.
    pub task_restarts: Counter,
}

fn duration_histogram() -> Histogram {
    // 1 ms to ~9 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pcg_gateway");
        let tunnel_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "tunnel_state",
            "1 for the tunnel's current state (unpaired, connecting, connected, backoff, revoked, stopped)",
            tunnel_state.clone(),
        );
        let tunnel_websocket = Gauge::default();
        registry.register(
            "tunnel_websocket",
            "1 when the tunnel uses the WebSocket transport",
            tunnel_websocket.clone(),
        );
        let reconnects = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tunnel_reconnects",
            "Tunnels lost or not established, by reason",
            reconnects.clone(),
        );
        let heartbeat_rtt_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "heartbeat_rtt_seconds",
            "Round-trip time of the last heartbeat echoed by the broker",
            heartbeat_rtt_seconds.clone(),
        );
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "commands",
            "Commands executed, by kind and outcome",
            commands.clone(),
        );
        let command_seconds = Family::<KindLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "command_seconds",
            "Command execution time, by kind",
            command_seconds.clone(),
        );
        let journal_entries = Gauge::default();
        registry.register(
            "journal_entries",
            "Command ids in the journal",
            journal_entries.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Results waiting for the broker's acknowledgement",
            outbox_depth.clone(),
        );
        let provider_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "provider_errors",
            "Commands that failed with a provider error, by error kind",
            provider_errors.clone(),
        );
        let store_flushes = Counter::default();
        registry.register(
            "store_flushes",
            "Synchronous store flushes (each a group commit of every write waiting)",
            store_flushes.clone(),
        );
        let task_restarts = Counter::default();
        registry.register(
            "task_restarts",
            "Background tasks (tunnel, journal pruning) restarted after they failed",
            task_restarts.clone(),
        );
        Metrics {
            registry,
            store_flushes,
            task_restarts,
            tunnel_state,
            tunnel_websocket,
            reconnects,
            heartbeat_rtt_seconds,
            commands,
            command_seconds,
            journal_entries,
            outbox_depth,
            provider_errors,
        }
    }
}

/// The error classes that come from a provider (see `pcg_provider::ErrorKind`).
const PROVIDER_KINDS: [&str; 11] = [
    "unreachable",
    "timeout",
    "auth",
    "not_found",
    "conflict",
    "quota",
    "invalid_spec",
    "unsupported",
    "no_session_slots",
    "provider_fault",
    "tls_trust",
];

impl Metrics {
    /// Records a finished command.
    pub fn command(&self, kind: &str, outcome: &str, seconds: f64) {
        self.commands
            .get_or_create(&CommandLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.command_seconds
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .observe(seconds);
        if PROVIDER_KINDS.contains(&outcome) {
            self.provider_errors
                .get_or_create(&ErrorLabels {
                    kind: outcome.to_string(),
                })
                .inc();
        }
    }

    pub fn reconnect(&self, reason: &str) {
        self.reconnects
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets the tunnel state gauges.
    pub fn state(&self, state: crate::status::TunnelState) {
        use crate::status::TunnelState::*;
        for s in [Unpaired, Connecting, Connected, Backoff, Revoked, Stopped] {
            let name = serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            self.tunnel_state
                .get_or_create(&StateLabels { state: name })
                .set(i64::from(s == state));
        }
    }
}
