//! What the REST API reads and writes: request bodies and the views of stored records. Every
//! type here is in the OpenAPI document.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::gateways::GatewayState;
use crate::store::{
    now_ms, redact_secrets, ApiKey, Command, CommandState, Event, Tenant, TokenRecord,
};

/// RFC 3339 UTC for Unix milliseconds.
pub fn ts(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreateTenantRequest {
    pub name: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreateTenantResponse {
    pub tenant: TenantView,
    /// The tenant's first admin API key. Shown once; store it now.
    pub admin_api_key: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub tenant_id: Option<String>,
    pub name: String,
    pub created_at: String,
    pub revoked: bool,
}

impl From<&ApiKey> for ApiKeyView {
    fn from(k: &ApiKey) -> Self {
        ApiKeyView {
            id: k.id.clone(),
            tenant_id: k.tenant_id.clone(),
            name: k.name.clone(),
            created_at: ts(k.created_ms),
            revoked: k.revoked,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreateApiKeyRequest {
    pub name: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreateApiKeyResponse {
    pub api_key: ApiKeyView,
    /// The key itself. Shown once; store it now.
    pub key: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub expires_at: String,
    /// `active`, `used` or `revoked` (an active token past `expires_at` is expired).
    pub state: String,
    pub expired: bool,
    pub gateway_id: Option<String>,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> Self {
        TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            created_at: ts(t.created_ms),
            expires_at: ts(t.expires_ms),
            state: serde_json::to_value(t.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            expired: now_ms() >= t.expires_ms,
            gateway_id: t.gateway_id.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(default)]
pub struct CreateTokenRequest {
    /// A label, e.g. the site the appliance goes to.
    pub name: String,
    /// Lifetime in seconds (default from the config, 3600; at most 30 days).
    pub ttl_seconds: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreateTokenResponse {
    /// The token to give to `pcgctl pair` or the appliance's OVF property. Shown once.
    pub token: String,
    pub pairing_token: TokenView,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct GatewayView {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub hostname: String,
    pub paired_at: String,
    pub certificate_expires_at: String,
    pub revoked_at: Option<String>,
    pub version: Option<String>,
    /// Command kinds the gateway said it can execute when it last connected.
    pub command_kinds: Vec<String>,
    pub connected: bool,
    pub connected_since: Option<String>,
    /// The live tunnel: how it arrived and the certificate that authenticated it.
    pub tunnel: Option<TunnelView>,
    pub last_seen_at: Option<String>,
    /// Commands stored for this gateway that have no result yet.
    pub pending_commands: usize,
    /// Machines declared on it.
    pub machines: usize,
    /// Its latest health and inventory report (tunnel, store, watch loop, each enrolled
    /// endpoint's reachability, last error and inventory summary); history at
    /// `GET /v1/gateways/{id}/health`.
    #[schema(value_type = Option<Object>)]
    pub health: Option<serde_json::Value>,
    pub health_received_at: Option<String>,
}

impl From<&GatewayState> for GatewayView {
    fn from(s: &GatewayState) -> Self {
        let g = &s.gateway;
        GatewayView {
            id: g.id.clone(),
            tenant_id: g.tenant_id.clone(),
            name: g.name.clone(),
            hostname: g.hostname.clone(),
            paired_at: ts(g.paired_ms),
            certificate_expires_at: ts(g.cert_not_after_ms),
            revoked_at: g.revoked_ms.map(ts),
            version: g.version.clone(),
            command_kinds: g.command_kinds.clone(),
            connected: s.tunnel.is_some(),
            connected_since: s.tunnel.as_ref().map(|t| ts(t.connected_ms)),
            tunnel: s.tunnel.as_ref().map(|t| TunnelView {
                transport: t.transport.to_string(),
                remote_addr: t.remote.to_string(),
                certificate_sha256: t.certificate_sha256.clone(),
            }),
            last_seen_at: s
                .tunnel
                .as_ref()
                .map(|t| t.last_seen_ms.load(std::sync::atomic::Ordering::Relaxed))
                .or(g.last_seen_ms)
                .map(ts),
            pending_commands: s.pending,
            machines: s.machines,
            health: s
                .health
                .as_ref()
                .and_then(|h| serde_json::to_value(&h.health).ok()),
            health_received_at: s.health.as_ref().map(|h| ts(h.received_ms)),
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TunnelView {
    /// `direct` (HTTP/2 over TLS on the public port) or `websocket` (the same TLS inside a
    /// WebSocket, through a TLS-inspecting proxy).
    pub transport: String,
    /// The address the tunnel came from (a proxy's, when there is one).
    pub remote_addr: String,
    /// SHA-256 of the client certificate that authenticated the tunnel.
    pub certificate_sha256: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SubmitCommandRequest {
    /// `<namespace>.<verb>`, e.g. `gateway.diagnose`.
    pub kind: String,
    /// The command's arguments: a JSON object (default `{}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Option<serde_json::Value>,
    /// Seconds from now (1 to 604800) by which the command must have ended; past it the
    /// command ends `timed_out` (see the README's command states).
    #[serde(default)]
    pub deadline_seconds: Option<u64>,
}

/// Body of `POST /v1/commands/{id}/cancel` (optional).
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CancelCommandRequest {
    /// Why, for the record (at most 512 characters); default "cancelled through the API".
    pub reason: Option<String>,
}

/// How far a running command has got, as its gateway last reported it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ProgressView {
    /// 0-100, when the step has a measure.
    pub percent: Option<u8>,
    pub message: String,
    /// When the gateway reported it.
    pub at: String,
}

/// A cancel asked for.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CancelView {
    pub reason: String,
    pub requested_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ResultView {
    pub ok: bool,
    #[schema(value_type = Object)]
    pub output: serde_json::Value,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub started_at: String,
    pub finished_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    pub id: String,
    pub gateway_id: String,
    pub kind: String,
    /// The payload as submitted, with secrets (`password`, `secret`, `token`, ... keys) redacted.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub state: CommandState,
    pub submitted_at: String,
    /// How many times the command was handed to a tunnel.
    pub deliveries: u32,
    pub received_at: Option<String>,
    pub completed_at: Option<String>,
    /// When it must have ended, if it was given a deadline.
    pub deadline: Option<String>,
    /// The latest progress its gateway reported (kept in memory: absent after a SaaS restart
    /// until the next report).
    pub progress: Option<ProgressView>,
    /// A cancel asked for (the state becomes `cancelled` once the gateway confirms).
    pub cancel: Option<CancelView>,
    pub result: Option<ResultView>,
}

impl From<&Command> for CommandView {
    fn from(c: &Command) -> Self {
        CommandView {
            id: c.id.clone(),
            gateway_id: c.gateway_id.clone(),
            kind: c.kind.clone(),
            payload: {
                let mut p = c.payload.clone();
                redact_secrets(&mut p);
                p
            },
            state: c.state,
            submitted_at: ts(c.submitted_ms),
            deliveries: c.deliveries,
            received_at: c.received_ms.map(ts),
            completed_at: c.completed_ms.map(ts),
            deadline: c.deadline_ms.map(ts),
            progress: c.progress.as_ref().map(|p| ProgressView {
                percent: p.percent,
                message: p.message.clone(),
                at: ts(p.at_ms),
            }),
            cancel: c.cancel.as_ref().map(|r| CancelView {
                reason: r.reason.clone(),
                requested_at: ts(r.requested_ms),
            }),
            result: c.result.as_ref().map(|r| ResultView {
                ok: r.ok,
                output: r.output.clone(),
                error_class: (!r.error_class.is_empty()).then(|| r.error_class.clone()),
                error_message: (!r.error_message.is_empty()).then(|| r.error_message.clone()),
                started_at: ts(r.started_ms),
                finished_at: ts(r.finished_ms),
            }),
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// Increasing sequence number; pass the last one seen as `since` to page.
    pub seq: u64,
    pub at: String,
    pub gateway_id: Option<String>,
    pub kind: String,
    pub message: String,
    /// The declared machine it is about (`machine.*` events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Marked as an alert (`machine.alert`, `machine.heal_budget_exhausted`).
    pub alert: bool,
    /// Structured facts: a drift's `before`, `after` and `drift`; a heal's `action`, `result`,
    /// `provider_id` (and `previous_id` when it made a new VM).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub tunnels: usize,
}

/// Body of `POST /v1/pair` (the gateway sends it; see `pcg_proto::pairing::PairRequest`).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PairRequestDoc {
    pub token_id: String,
    pub secret: String,
    pub csr_pem: String,
    pub hostname: String,
    pub gateway_version: String,
}

/// Answer of `POST /v1/pair` (see `pcg_proto::pairing::PairResponse`).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PairResponseDoc {
    pub tenant_id: String,
    pub gateway_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    pub broker_endpoints: Vec<String>,
}

impl From<&Tenant> for TenantView {
    fn from(t: &Tenant) -> Self {
        TenantView {
            id: t.id.clone(),
            name: t.name.clone(),
            created_at: ts(t.created_ms),
        }
    }
}

impl From<Event> for EventView {
    fn from(e: Event) -> Self {
        EventView {
            seq: e.seq,
            at: ts(e.at_ms),
            gateway_id: e.gateway_id,
            kind: e.kind,
            message: e.message,
            machine_id: e.machine_id,
            alert: e.alert,
            details: e.details,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BundleView {
    pub id: String,
    pub gateway_id: String,
    pub size: u64,
    /// SHA-256 (hex) of the tar.gz.
    pub sha256: String,
    pub created_at: String,
}

impl From<&crate::store::BundleRecord> for BundleView {
    fn from(b: &crate::store::BundleRecord) -> Self {
        BundleView {
            id: b.id.clone(),
            gateway_id: b.gateway_id.clone(),
            size: b.size,
            sha256: b.sha256.clone(),
            created_at: ts(b.created_ms),
        }
    }
}

/// One command of a batch.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    pub gateway_id: String,
    pub kind: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Option<serde_json::Value>,
    /// As the `Idempotency-Key` header of a single submit.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// As in a single submit.
    #[serde(default)]
    pub deadline_seconds: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BatchRequest {
    pub commands: Vec<BatchItem>,
}

/// The outcome of one item, in the order given.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct BatchOutcome {
    /// 201 when stored (or replayed), else the status a single submit would have answered.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandView>,
    /// The idempotency key named a command made earlier.
    #[serde(default)]
    pub replayed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::api::error::ErrorDetail>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub results: Vec<BatchOutcome>,
}

/// A machine declaration: the body of `POST /v1/gateways/{id}/machines` and `PUT
/// /v1/machines/{id}` (see `pcg_proto::machines::Declaration`). Exactly one of `vsphere`,
/// `openstack`, `bare_metal`; unknown fields are refused.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DeclarationDoc {
    /// A label for people.
    pub name: String,
    /// A VM on a vCenter enrolled with `vsphere.enrol`: `{"endpoint": NAME, "vm": VmSpec,
    /// "adopt_id"?: MOREF}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsphere: Option<VmTargetDoc>,
    /// A server on a cloud enrolled with `openstack.enrol`: `{"endpoint": {"enrolled": NAME},
    /// "vm": VmSpec (placement provider openstack), "adopt_id"?: SERVER_ID}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openstack: Option<VmTargetDoc>,
    /// A node behind a BMC enrolled with `baremetal.enrol` (power only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bare_metal: Option<BareMetalTargetDoc>,
    /// `on` (default) or `off`: the power state to keep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<String>,
    /// `observe`, `alert` (default) or `heal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Default 3 heals per 3600 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heal_budget: Option<HealBudgetDoc>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct VmTargetDoc {
    /// vSphere: the enrolled vCenter's name; OpenStack: `{"enrolled": NAME}`.
    #[schema(value_type = Object)]
    pub endpoint: serde_json::Value,
    /// The VM spec as `vsphere.create` takes it (name, source, cpus, memory_mib, networks,
    /// user_data, metadata, placement), without `power_on`.
    #[schema(value_type = Object)]
    pub vm: serde_json::Value,
    /// Adopt this existing VM instead of creating one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopt_id: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BareMetalTargetDoc {
    pub bmc: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct HealBudgetDoc {
    pub max_heals: u32,
    pub window_seconds: u64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct LastDriftView {
    pub at: String,
    /// `before`, `after` and `drift` (each field's desired and observed value).
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// A declared machine: its declaration, and what its gateway applied and observed.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MachineView {
    pub id: String,
    pub gateway_id: String,
    pub name: String,
    /// `vsphere`, `openstack` or `bare_metal`.
    pub provider: String,
    /// The declaration as stored.
    #[schema(value_type = Object)]
    pub declaration: serde_json::Value,
    /// Bumped by every change of the declaration.
    pub generation: u64,
    /// The generation the gateway stored; it converges to it, even while its tunnel is down.
    pub applied_generation: u64,
    /// `pending` (not observed yet), `converging`, `in_sync`, `drifted`, `deleting`,
    /// `invalid`, `unreachable`.
    pub state: String,
    pub deleting: bool,
    /// What the gateway last observed: power, provider id (and earlier ids), drift, the use of
    /// the heal budget, errors.
    #[schema(value_type = Option<Object>)]
    pub observed: Option<serde_json::Value>,
    pub observed_at: Option<String>,
    /// When the provider last showed the machine.
    pub last_seen_at: Option<String>,
    pub last_drift: Option<LastDriftView>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&crate::store::MachineRecord> for MachineView {
    fn from(m: &crate::store::MachineRecord) -> Self {
        let state = if m.deleting {
            "deleting".to_string()
        } else {
            m.observed
                .as_ref()
                .and_then(|o| serde_json::to_value(o.state).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "pending".into())
        };
        MachineView {
            id: m.id.clone(),
            gateway_id: m.gateway_id.clone(),
            name: m.declaration.name.clone(),
            provider: m.declaration.provider().as_str().to_string(),
            declaration: serde_json::to_value(&m.declaration).unwrap_or_default(),
            generation: m.generation,
            applied_generation: m.applied_generation,
            state,
            deleting: m.deleting,
            observed: m
                .observed
                .as_ref()
                .and_then(|o| serde_json::to_value(o).ok()),
            observed_at: m.observed.as_ref().map(|o| ts(o.observed_ms)),
            last_seen_at: m.observed.as_ref().and_then(|o| o.last_seen_ms).map(ts),
            last_drift: m.last_drift.as_ref().map(|d| LastDriftView {
                at: ts(d.at_ms),
                details: d.details.clone(),
            }),
            created_at: ts(m.created_ms),
            updated_at: ts(m.updated_ms),
        }
    }
}

/// One health and inventory report of a gateway.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct HealthReportView {
    pub gateway_id: String,
    pub received_at: String,
    /// `pcg_proto::machines::Health`: tunnel, store, watch loop, endpoints.
    #[schema(value_type = Object)]
    pub health: serde_json::Value,
}

impl From<&crate::store::machines::HealthRecord> for HealthReportView {
    fn from(h: &crate::store::machines::HealthRecord) -> Self {
        HealthReportView {
            gateway_id: h.gateway_id.clone(),
            received_at: ts(h.received_ms),
            health: serde_json::to_value(&h.health).unwrap_or_default(),
        }
    }
}

/// A command as the `commands` topic of the feed shows its submission.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SubmittedView {
    pub id: String,
    pub gateway_id: String,
    pub kind: String,
    /// The payload as submitted, with secrets redacted.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub submitted_at: String,
    pub deadline: Option<String>,
}

impl From<&Command> for SubmittedView {
    fn from(c: &Command) -> Self {
        let mut payload = c.payload.clone();
        redact_secrets(&mut payload);
        SubmittedView {
            id: c.id.clone(),
            gateway_id: c.gateway_id.clone(),
            kind: c.kind.clone(),
            payload,
            submitted_at: ts(c.submitted_ms),
            deadline: c.deadline_ms.map(ts),
        }
    }
}

/// The data of a feed item (`GET /v1/feed`, `pcg.feed.v1.Feed/Subscribe`): `commands` a
/// [`SubmittedView`], `results` a [`CommandView`], `events` an [`EventView`], `health` a
/// [`HealthReportView`], `gap` `{"through": seq, "message": ...}`.
pub fn feed_data(item: &crate::app::feed::FeedItem) -> serde_json::Value {
    use crate::app::feed::Payload;
    let v = match &item.payload {
        Payload::Submitted(c) => serde_json::to_value(SubmittedView::from(c)),
        Payload::Ended(c) => serde_json::to_value(CommandView::from(c)),
        Payload::Event(e) => serde_json::to_value(EventView::from(e.clone())),
        Payload::Health(h) => serde_json::to_value(HealthReportView::from(h)),
        Payload::Gap => Ok(serde_json::json!({
            "through": item.seq,
            "message": format!(
                "items up to {} were deleted by retention (feed_retention_hours) before they were read; \
                 list what remains with GET /v1/commands and GET /v1/events",
                item.seq
            ),
        })),
    };
    v.expect("views serialise")
}
