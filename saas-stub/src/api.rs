//! The REST API (axum over HTTPS): tenants, API keys, pairing tokens, gateways, commands,
//! events, and the pairing endpoint gateways call with their token.
//!
//! Every request but `/healthz`, `/v1/ca`, `/openapi.json` and `/v1/pair` carries
//! `Authorization: Bearer pcgk_...`. The operator key (written to `operator.key` in the data
//! directory at first start) administers tenants only; a tenant key sees its own tenant only.
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a message that says what to do.
//! The OpenAPI document is generated from these handlers (`pcg-saas openapi`) and committed as
//! `saas-stub/openapi.json`; a test fails when the two differ.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use utoipa::{OpenApi, ToSchema};

use crate::store::{
    self, now_ms, ApiKey, Command, CommandFilter, CommandState, Gateway, RedeemError, StoreError,
    TokenRecord,
};
use crate::App;

// --- errors ---------------------------------------------------------------------------------

/// An error answer: HTTP status, a stable code and a message for a person.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `token_used`.
    pub code: String,
    /// What failed and what to do.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code.to_string(),
                    message: self.message,
                },
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("store error: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "the request body is not valid JSON for this endpoint: {}",
                e.body_text()
            ),
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    b.map(|Json(v)| v).map_err(ApiError::from)
}

// --- authentication ---------------------------------------------------------------------------

/// The authenticated caller of a request.
pub struct Caller(pub ApiKey);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "missing `Authorization: Bearer <API key>` header",
                )
            })?;
        let presented = header.strip_prefix("Bearer ").unwrap_or("").trim();
        match app.store.authenticate(presented)? {
            Some(k) => Ok(Caller(k)),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is unknown, revoked or mistyped; check the key, or ask a tenant admin for a new one",
            )),
        }
    }
}

impl Caller {
    /// The caller's tenant; the operator key has none and is refused here.
    fn tenant(&self) -> ApiResult<&str> {
        self.0.tenant_id.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "operator_key",
                "the operator key administers tenants only; use an API key of the tenant (POST /v1/tenants returns its first admin key)",
            )
        })
    }
    fn operator(&self) -> ApiResult<()> {
        if self.0.tenant_id.is_none() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_operator",
                "only the operator key (operator.key in the SaaS data directory) can create tenants",
            ))
        }
    }
}

// --- views ----------------------------------------------------------------------------------

fn ts(ms: i64) -> String {
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
    pub last_seen_at: Option<String>,
    /// Commands stored for this gateway that have no result yet.
    pub pending_commands: usize,
}

fn gateway_view(app: &App, g: &Gateway) -> GatewayView {
    let tunnel = app.tunnels.get(&g.id);
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
        connected: tunnel.is_some(),
        connected_since: tunnel.map(|t| ts(t.connected_ms)),
        last_seen_at: g.last_seen_ms.map(ts),
        pending_commands: app.store.pending_count(&g.id),
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SubmitCommandRequest {
    /// `<namespace>.<verb>`, e.g. `gateway.diagnose`.
    pub kind: String,
    /// The command's arguments: a JSON object (default `{}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Option<serde_json::Value>,
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
                store::redact_secrets(&mut p);
                p
            },
            state: c.state,
            submitted_at: ts(c.submitted_ms),
            deliveries: c.deliveries,
            received_at: c.received_ms.map(ts),
            completed_at: c.completed_ms.map(ts),
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

// --- handlers -------------------------------------------------------------------------------

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz(State(app): State<Arc<App>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: crate::VERSION.into(),
        tunnels: app.tunnels.count(),
    })
}

#[utoipa::path(get, path = "/v1/ca", responses((status = 200, description = "The SaaS CA certificate, PEM", content_type = "application/x-pem-file", body = String)))]
async fn ca_pem(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/x-pem-file")],
        app.ca.cert_pem.clone(),
    )
}

#[utoipa::path(post, path = "/v1/pair", request_body = PairRequestDoc,
    responses((status = 200, body = PairResponseDoc),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody)))]
async fn pair(
    State(app): State<Arc<App>>,
    req: Result<Json<pcg_proto::pairing::PairRequest>, JsonRejection>,
) -> ApiResult<Json<pcg_proto::pairing::PairResponse>> {
    let req = body(req)?;
    let refuse = |e: RedeemError| -> ApiError {
        let (status, code) = match &e {
            RedeemError::Unknown => (StatusCode::UNAUTHORIZED, "token_unknown"),
            RedeemError::Used(_) => (StatusCode::CONFLICT, "token_used"),
            RedeemError::Revoked => (StatusCode::FORBIDDEN, "token_revoked"),
            RedeemError::Expired(_) => (StatusCode::GONE, "token_expired"),
            RedeemError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
        };
        if let Ok(Some(t)) = app.store.token(&req.token_id) {
            let _ = app.store.event(
                Some(&t.tenant_id),
                None,
                "pairing.refused",
                format!(
                    "pairing with token {} from host {:?} refused: {e}",
                    t.id, req.hostname
                ),
            );
        }
        ApiError::new(status, code, e.to_string())
    };
    let token = app
        .store
        .check_token(&req.token_id, &req.secret)
        .map_err(refuse)?;
    let gateway_id = store::new_id("gw", 8);
    let issued = app
        .ca
        .sign_gateway(
            &req.csr_pem,
            &token.tenant_id,
            &gateway_id,
            app.cfg.gateway_cert_lifetime_secs,
        )
        .map_err(|e| ApiError::bad_request("bad_csr", e.to_string()))?;
    let now = now_ms();
    let gw = Gateway {
        id: gateway_id.clone(),
        tenant_id: token.tenant_id.clone(),
        name: if token.name.is_empty() {
            req.hostname.clone()
        } else {
            token.name.clone()
        },
        hostname: req.hostname.clone(),
        paired_ms: now,
        token_id: token.id.clone(),
        cert_serial: issued.serial_hex,
        cert_not_after_ms: i64::try_from(issued.not_after.unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX),
        revoked_ms: None,
        version: Some(req.gateway_version.clone()),
        command_kinds: Vec::new(),
        last_connected_ms: None,
        last_seen_ms: None,
    };
    app.store
        .redeem_token(&req.token_id, &req.secret, &gw)
        .map_err(refuse)?;
    app.store.event(
        Some(&gw.tenant_id),
        Some(&gw.id),
        "gateway.paired",
        format!(
            "gateway {} paired from host {:?} with token {}",
            gw.id, gw.hostname, token.id
        ),
    )?;
    app.store.flush().await?;
    Ok(Json(pcg_proto::pairing::PairResponse {
        tenant_id: gw.tenant_id,
        gateway_id,
        certificate_pem: issued.pem,
        ca_pem: app.ca.cert_pem.clone(),
        broker_endpoints: app.broker_urls.clone(),
    }))
}

#[utoipa::path(post, path = "/v1/tenants", request_body = CreateTenantRequest,
    responses((status = 201, body = CreateTenantResponse), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
async fn create_tenant(
    State(app): State<Arc<App>>,
    caller: Caller,
    req: Result<Json<CreateTenantRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreateTenantResponse>)> {
    caller.operator()?;
    let req = body(req)?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request(
            "invalid_name",
            "tenant name must be 1 to 128 characters",
        ));
    }
    let t = app.store.create_tenant(name)?;
    let (_, key) = app.store.create_api_key(Some(&t.id), "admin")?;
    app.store.flush().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateTenantResponse {
            tenant: TenantView {
                id: t.id,
                name: t.name,
                created_at: ts(t.created_ms),
            },
            admin_api_key: key,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/tenants", responses((status = 200, body = Vec<TenantView>)),
    security(("api_key" = [])))]
async fn list_tenants(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<TenantView>>> {
    let all = app.store.tenants()?;
    Ok(Json(
        all.into_iter()
            .filter(|t| {
                caller.0.tenant_id.is_none() || caller.0.tenant_id.as_deref() == Some(&t.id)
            })
            .map(|t| TenantView {
                id: t.id,
                name: t.name,
                created_at: ts(t.created_ms),
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/v1/api-keys", request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreateApiKeyResponse)), security(("api_key" = [])))]
async fn create_api_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    req: Result<Json<CreateApiKeyRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreateApiKeyResponse>)> {
    let tenant = caller.tenant()?;
    let req = body(req)?;
    let (k, key) = app.store.create_api_key(Some(tenant), &req.name)?;
    app.store.flush().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateApiKeyResponse {
            api_key: (&k).into(),
            key,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/api-keys", responses((status = 200, body = Vec<ApiKeyView>)),
    security(("api_key" = [])))]
async fn list_api_keys(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<ApiKeyView>>> {
    let tenant = caller.tenant()?;
    Ok(Json(
        app.store
            .api_keys(Some(tenant))?
            .iter()
            .map(ApiKeyView::from)
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
async fn revoke_api_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let tenant = caller.tenant()?;
    match app.store.api_key(&id)? {
        Some(k) if k.tenant_id.as_deref() == Some(tenant) => {
            app.store.revoke_api_key(&id)?;
            app.store.flush().await?;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(ApiError::not_found(format!(
            "API key {id} not found in tenant {tenant}"
        ))),
    }
}

#[utoipa::path(post, path = "/v1/pairing-tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = CreateTokenResponse)), security(("api_key" = [])))]
async fn create_token(
    State(app): State<Arc<App>>,
    caller: Caller,
    req: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreateTokenResponse>)> {
    let tenant = caller.tenant()?;
    let req = body(req)?;
    let ttl = req.ttl_seconds.unwrap_or(app.cfg.token_ttl_secs);
    if ttl == 0 || ttl > 30 * 86_400 {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            "ttl_seconds must be between 1 and 2592000 (30 days)",
        ));
    }
    let (rec, secret) = app.store.create_token(tenant, &req.name, ttl)?;
    app.store.flush().await?;
    let token = pcg_proto::pairing::PairingToken {
        api_url: app.api_url.clone(),
        token_id: rec.id.clone(),
        secret,
        expires_unix: rec.expires_ms / 1000,
        ca_sha256: app.ca.fingerprint(),
    };
    Ok((
        StatusCode::CREATED,
        Json(CreateTokenResponse {
            token: token.encode(),
            pairing_token: (&rec).into(),
        }),
    ))
}

#[utoipa::path(get, path = "/v1/pairing-tokens", responses((status = 200, body = Vec<TokenView>)),
    security(("api_key" = [])))]
async fn list_tokens(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenView>>> {
    let tenant = caller.tenant()?;
    Ok(Json(
        app.store
            .tokens(tenant)?
            .iter()
            .map(TokenView::from)
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/pairing-tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
async fn revoke_token(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let tenant = caller.tenant()?;
    match app.store.token(&id)? {
        Some(t) if t.tenant_id == tenant => {
            app.store.revoke_token(&id)?;
            app.store.flush().await?;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(ApiError::not_found(format!(
            "pairing token {id} not found in tenant {tenant}; list tokens with GET /v1/pairing-tokens"
        ))),
    }
}

fn tenant_gateway(app: &App, tenant: &str, id: &str) -> ApiResult<Gateway> {
    app.store
        .gateway(id)?
        .filter(|g| g.tenant_id == tenant)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "gateway {id} not found in tenant {tenant}; list your gateways with GET /v1/gateways"
            ))
        })
}

#[utoipa::path(get, path = "/v1/gateways", responses((status = 200, body = Vec<GatewayView>)),
    security(("api_key" = [])))]
async fn list_gateways(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<GatewayView>>> {
    let tenant = caller.tenant()?;
    let gws = app.store.gateways(Some(tenant))?;
    Ok(Json(gws.iter().map(|g| gateway_view(&app, g)).collect()))
}

#[utoipa::path(get, path = "/v1/gateways/{id}", params(("id" = String, Path)),
    responses((status = 200, body = GatewayView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
async fn get_gateway(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<GatewayView>> {
    let g = tenant_gateway(&app, caller.tenant()?, &id)?;
    Ok(Json(gateway_view(&app, &g)))
}

#[utoipa::path(post, path = "/v1/gateways/{id}/revoke", params(("id" = String, Path)),
    responses((status = 200, body = GatewayView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
async fn revoke_gateway(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<GatewayView>> {
    let tenant = caller.tenant()?;
    let g = tenant_gateway(&app, tenant, &id)?;
    if g.revoked_ms.is_none() {
        app.store
            .update_gateway(&id, |g| g.revoked_ms = Some(now_ms()))?;
        // Pending commands can no longer be delivered: fail them so nobody waits forever.
        for c in app.store.pending_commands(&id)? {
            let now = now_ms();
            app.store.complete_command(
                &c.id,
                &id,
                store::CommandResult {
                    ok: false,
                    output: serde_json::Value::Null,
                    error_class: "gateway_revoked".into(),
                    error_message: format!("gateway {id} was revoked before it returned a result"),
                    started_ms: now,
                    finished_ms: now,
                },
            )?;
            app.notify_command(&c.id);
        }
        app.store.event(
            Some(tenant),
            Some(&id),
            "gateway.revoked",
            format!("gateway {id} revoked"),
        )?;
        app.store.flush().await?;
        app.tunnels
            .close(
                &id,
                "this gateway was revoked by a tenant admin; pair it again with a new token",
                true,
            )
            .await;
    }
    let g = tenant_gateway(&app, tenant, &id)?;
    Ok(Json(gateway_view(&app, &g)))
}

/// `namespace.verb[.more]`: lower-case ASCII letters, digits and `_`, at most 128 characters.
pub fn valid_kind(kind: &str) -> bool {
    let parts: Vec<&str> = kind.split('.').collect();
    kind.len() <= 128
        && parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        && parts[0].as_bytes()[0].is_ascii_lowercase()
}

#[utoipa::path(post, path = "/v1/gateways/{id}/commands", params(("id" = String, Path)),
    request_body = SubmitCommandRequest,
    responses((status = 201, body = CommandView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
async fn submit_command(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    req: Result<Json<SubmitCommandRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CommandView>)> {
    let tenant = caller.tenant()?;
    let g = tenant_gateway(&app, tenant, &id)?;
    let req = body(req)?;
    if g.revoked_ms.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "gateway_revoked",
            format!("gateway {id} is revoked and takes no commands; pair a gateway again with a new token"),
        ));
    }
    if !valid_kind(&req.kind) {
        return Err(ApiError::bad_request(
            "invalid_kind",
            format!(
                "command kind {:?} is malformed: it must look like `namespace.verb` (lower-case letters, digits, `_`), e.g. `gateway.diagnose`",
                req.kind
            ),
        ));
    }
    let payload = req.payload.unwrap_or_else(|| serde_json::json!({}));
    if !payload.is_object() {
        return Err(ApiError::bad_request(
            "invalid_payload",
            "the command payload must be a JSON object",
        ));
    }
    let size = serde_json::to_vec(&payload)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > app.cfg.max_payload_bytes {
        return Err(ApiError::bad_request(
            "payload_too_large",
            format!(
                "the command payload is {size} bytes; the limit is {}",
                app.cfg.max_payload_bytes
            ),
        ));
    }
    if !g.command_kinds.is_empty() && !g.command_kinds.contains(&req.kind) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_kind",
            format!(
                "gateway {id} does not support command kind {:?}; it supports: {}",
                req.kind,
                g.command_kinds.join(", ")
            ),
        ));
    }
    let mut cmd = Command {
        id: store::new_id("cmd", 12),
        tenant_id: tenant.to_string(),
        gateway_id: id,
        kind: req.kind,
        payload,
        state: CommandState::Queued,
        submitted_ms: now_ms(),
        deliveries: 0,
        received_ms: None,
        completed_ms: None,
        result: None,
        pending_key: Vec::new(),
    };
    app.store.insert_command(&mut cmd)?;
    app.store.flush().await?;
    let view = CommandView::from(&cmd);
    let app2 = app.clone();
    tokio::spawn(async move { crate::broker::deliver(&app2, &cmd).await });
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListCommandsQuery {
    pub gateway_id: Option<String>,
    /// queued, delivered, received, succeeded or failed.
    pub state: Option<String>,
    pub kind: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/commands", params(ListCommandsQuery),
    responses((status = 200, body = Vec<CommandView>), (status = 400, body = ErrorBody)),
    security(("api_key" = [])))]
async fn list_commands(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ListCommandsQuery>,
) -> ApiResult<Json<Vec<CommandView>>> {
    let tenant = caller.tenant()?;
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(CommandState::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_state",
                format!(
                    "unknown state {s:?}; use queued, delivered, received, succeeded or failed"
                ),
            )
        })?),
    };
    let f = CommandFilter {
        gateway_id: q.gateway_id,
        state,
        kind: q.kind,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    Ok(Json(
        app.store
            .commands(tenant, &f)?
            .iter()
            .map(CommandView::from)
            .collect(),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetCommandQuery {
    /// Wait up to this many seconds (at most 60) for the command to finish.
    pub wait_seconds: Option<u64>,
}

#[utoipa::path(get, path = "/v1/commands/{id}", params(("id" = String, Path), GetCommandQuery),
    responses((status = 200, body = CommandView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
async fn get_command(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<GetCommandQuery>,
) -> ApiResult<Json<CommandView>> {
    let tenant = caller.tenant()?.to_string();
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(q.wait_seconds.unwrap_or(0).min(60));
    loop {
        let waiter = app.waiter(&id);
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let c = app
            .store
            .command(&id)?
            .filter(|c| c.tenant_id == tenant)
            .ok_or_else(|| {
                ApiError::not_found(format!("command {id} not found in tenant {tenant}"))
            })?;
        if c.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(CommandView::from(&c)));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListEventsQuery {
    /// Only events with a larger sequence number.
    pub since: Option<u64>,
    pub gateway_id: Option<String>,
    /// Default 100, at most 1000.
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/events", params(ListEventsQuery),
    responses((status = 200, body = Vec<EventView>)), security(("api_key" = [])))]
async fn list_events(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ListEventsQuery>,
) -> ApiResult<Json<Vec<EventView>>> {
    let tenant = caller.0.tenant_id.as_deref();
    let evs = app.store.events(
        tenant,
        q.since,
        q.gateway_id.as_deref(),
        q.limit.unwrap_or(100).clamp(1, 1000),
    )?;
    Ok(Json(
        evs.into_iter()
            .map(|e| EventView {
                seq: e.seq,
                at: ts(e.at_ms),
                gateway_id: e.gateway_id,
                kind: e.kind,
                message: e.message,
            })
            .collect(),
    ))
}

async fn openapi_json() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the API is described at /openapi.json")
}

// --- OpenAPI --------------------------------------------------------------------------------

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "pcg-saas", description = "REST API of the pcg SaaS companion: tenants, API keys, pairing tokens, gateways, commands and events."),
    paths(healthz, ca_pem, pair, create_tenant, list_tenants, create_api_key, list_api_keys,
          revoke_api_key, create_token, list_tokens, revoke_token, list_gateways, get_gateway,
          revoke_gateway, submit_command, list_commands, get_command, list_events),
    modifiers(&SecurityAddon)
)]
struct ApiDoc;

/// The OpenAPI document of this API, pretty-printed JSON with a trailing newline.
pub fn openapi_document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = crate::VERSION.to_string();
    let mut s = doc
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

// --- router and server ----------------------------------------------------------------------

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/ca", get(ca_pem))
        .route("/v1/pair", post(pair))
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/api-keys", post(create_api_key).get(list_api_keys))
        .route("/v1/api-keys/{id}", delete(revoke_api_key))
        .route("/v1/pairing-tokens", post(create_token).get(list_tokens))
        .route("/v1/pairing-tokens/{id}", delete(revoke_token))
        .route("/v1/gateways", get(list_gateways))
        .route("/v1/gateways/{id}", get(get_gateway))
        .route("/v1/gateways/{id}/revoke", post(revoke_gateway))
        .route("/v1/gateways/{id}/commands", post(submit_command))
        .route("/v1/commands", get(list_commands))
        .route("/v1/commands/{id}", get(get_command))
        .route("/v1/events", get(list_events))
        .fallback(not_found)
        .with_state(app)
}

/// Serves the REST API over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let router = router(app);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = hyper_util::service::TowerToHyperService::new(router);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_kinds() {
        assert!(valid_kind("gateway.diagnose"));
        assert!(valid_kind("vsphere.vm.create"));
        assert!(!valid_kind("diagnose"));
        assert!(!valid_kind("Gateway.x"));
        assert!(!valid_kind("gateway..x"));
        assert!(!valid_kind("9a.b"));
        assert!(!valid_kind(&format!("a.{}", "b".repeat(130))));
    }

    #[test]
    fn committed_openapi_matches_the_code() {
        let committed = include_str!("../openapi.json");
        let generated = openapi_document();
        assert!(
            committed == generated,
            "saas-stub/openapi.json is stale: run `cargo run -p pcg-saas -- openapi > saas-stub/openapi.json`"
        );
    }

    #[test]
    fn pair_schema_matches_the_wire_type() {
        let req = pcg_proto::pairing::PairRequest {
            token_id: "t".into(),
            secret: "s".into(),
            csr_pem: "c".into(),
            hostname: "h".into(),
            gateway_version: "v".into(),
        };
        let wire: serde_json::Value = serde_json::to_value(&req).expect("serialise");
        let doc: serde_json::Value = serde_json::to_value(PairRequestDoc {
            token_id: "t".into(),
            secret: "s".into(),
            csr_pem: "c".into(),
            hostname: "h".into(),
            gateway_version: "v".into(),
        })
        .expect("serialise");
        assert_eq!(wire, doc);
    }

    #[test]
    fn every_documented_path_is_routed() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_document()).expect("valid JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::Config {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let app = crate::open(
            cfg,
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        )
        .expect("open");
        let r = router(app);
        for (path, ops) in paths {
            for method in ops.as_object().expect("ops").keys() {
                let uri = path.replace("{id}", "x");
                let req = http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from("{}"))
                    .expect("request");
                let resp = rt
                    .block_on(tower::ServiceExt::oneshot(r.clone(), req))
                    .expect("infallible");
                let s = resp.status();
                // Unrouted paths answer our JSON 404 and unrouted methods 405.
                assert!(
                    s != StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but not routed"
                );
                if s == StatusCode::NOT_FOUND {
                    let b = rt
                        .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                        .expect("body");
                    assert!(
                        !String::from_utf8_lossy(&b).contains("no such endpoint"),
                        "{method} {path} is documented but not routed"
                    );
                }
            }
        }
    }
}
