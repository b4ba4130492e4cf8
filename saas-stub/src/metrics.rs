//! Prometheus metrics of pcg-saas (`GET /metrics`, OpenMetrics text): REST requests by route,
//! method and status with latency; live tunnels, tunnel opens and closes; commands submitted,
//! delivered and finished; delivery latency (submit → result stored); pending commands per
//! tenant (read from the store at scrape time); open feed subscriptions.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's pattern (`/v1/commands/{id}`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The final state: `succeeded`, `failed`, `cancelled`, `timed_out`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

/// Every metric of the service, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram>,
    pub tunnels: Gauge,
    pub tunnel_opens: Family<TransportLabels, Counter>,
    pub tunnel_closes: Counter,
    /// Tunnels a replica asked to move to another replica (rebalancing).
    pub tunnels_shed: Counter,
    pub commands_submitted: Counter,
    pub commands_delivered: Counter,
    pub commands_finished: Family<OutcomeLabels, Counter>,
    pub delivery_seconds: Histogram,
    pub pending: Family<TenantLabels, Gauge>,
    /// Synchronous store flushes (group commits), read at scrape time.
    pub store_flushes: Counter,
    /// Open feed subscriptions (SSE and gRPC), read at scrape time.
    pub feed_subscribers: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pcg_saas");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "REST API requests by route, method and status",
            requests.clone(),
        );
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "api_request_seconds",
            "REST API request duration by route",
            request_seconds.clone(),
        );
        let tunnels = Gauge::default();
        registry.register("tunnels", "Live gateway tunnels", tunnels.clone());
        let feed_subscribers = Gauge::default();
        registry.register(
            "feed_subscribers",
            "Open feed subscriptions (GET /v1/feed and the gRPC Feed stream)",
            feed_subscribers.clone(),
        );
        let tunnel_opens = Family::<TransportLabels, Counter>::default();
        registry.register(
            "tunnel_opens",
            "Tunnels opened, by transport (direct, websocket)",
            tunnel_opens.clone(),
        );
        let tunnel_closes = Counter::default();
        registry.register("tunnel_closes", "Tunnels closed", tunnel_closes.clone());
        let tunnels_shed = Counter::default();
        registry.register(
            "tunnels_shed",
            "Tunnels a replica asked to reconnect to another replica, holding more than its share",
            tunnels_shed.clone(),
        );
        let commands_submitted = Counter::default();
        registry.register(
            "commands_submitted",
            "Commands accepted (idempotent replays not counted)",
            commands_submitted.clone(),
        );
        let commands_delivered = Counter::default();
        registry.register(
            "commands_delivered",
            "Command deliveries handed to a tunnel (redeliveries counted)",
            commands_delivered.clone(),
        );
        let commands_finished = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "commands_finished",
            "Commands whose result was stored, by outcome",
            commands_finished.clone(),
        );
        let delivery_seconds = latency_histogram();
        registry.register(
            "command_result_seconds",
            "From submit to the result stored",
            delivery_seconds.clone(),
        );
        let pending = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "pending_commands",
            "Commands without a result yet, by tenant",
            pending.clone(),
        );
        let store_flushes = Counter::default();
        registry.register(
            "store_flushes",
            "Synchronous store flushes (each a group commit of every write waiting)",
            store_flushes.clone(),
        );
        Metrics {
            registry,
            store_flushes,
            requests,
            request_seconds,
            tunnels,
            feed_subscribers,
            tunnel_opens,
            tunnel_closes,
            tunnels_shed,
            commands_submitted,
            commands_delivered,
            commands_finished,
            delivery_seconds,
            pending,
        }
    }
}

impl Metrics {
    pub fn observe_request(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}
