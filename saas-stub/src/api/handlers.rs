//! The REST handlers: each parses its request, calls one operation of [`App`], and renders the
//! answer. The `#[utoipa::path]` attributes are the API's description.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::dto::*;
use super::error::{ApiResult, ErrorBody};
use super::{Body, PathId, Q};
use crate::app::commands::Submit;
use crate::app::{App, Caller};
use crate::store::{CommandFilter, CommandState};

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub async fn healthz(State(app): State<Arc<App>>) -> Json<Health> {
    Json(Health {
        status: if app.shutdown.is_cancelled() {
            "stopping".into()
        } else {
            "ok".into()
        },
        version: crate::VERSION.into(),
        tunnels: app.tunnel_count(),
    })
}

#[utoipa::path(get, path = "/v1/ca", responses((status = 200, description = "The SaaS CA certificate, PEM", content_type = "application/x-pem-file", body = String)))]
pub async fn ca_pem(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/x-pem-file")],
        app.ca.cert_pem.clone(),
    )
}

#[utoipa::path(post, path = "/v1/pair", request_body = PairRequestDoc,
    responses((status = 200, body = PairResponseDoc),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub async fn pair(
    State(app): State<Arc<App>>,
    Body(req): Body<pcg_proto::pairing::PairRequest>,
) -> ApiResult<Json<pcg_proto::pairing::PairResponse>> {
    Ok(Json(app.pair(req).await?))
}

#[utoipa::path(post, path = "/v1/tenants", request_body = CreateTenantRequest,
    responses((status = 201, body = CreateTenantResponse), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_tenant(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(req): Body<CreateTenantRequest>,
) -> ApiResult<(StatusCode, Json<CreateTenantResponse>)> {
    let (t, key) = app.create_tenant(&caller, &req.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateTenantResponse {
            tenant: (&t).into(),
            admin_api_key: key,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/tenants", responses((status = 200, body = Vec<TenantView>)),
    security(("api_key" = [])))]
pub async fn list_tenants(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<TenantView>>> {
    Ok(Json(
        app.list_tenants(&caller)?
            .iter()
            .map(TenantView::from)
            .collect(),
    ))
}

#[utoipa::path(post, path = "/v1/api-keys", request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreateApiKeyResponse), (status = 400, body = ErrorBody)), security(("api_key" = [])))]
pub async fn create_api_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(req): Body<CreateApiKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreateApiKeyResponse>)> {
    let (k, key) = app.create_api_key(&caller, &req.name).await?;
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
pub async fn list_api_keys(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<ApiKeyView>>> {
    Ok(Json(
        app.list_api_keys(&caller)?
            .iter()
            .map(ApiKeyView::from)
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn revoke_api_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<StatusCode> {
    app.revoke_api_key(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/pairing-tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = CreateTokenResponse), (status = 400, body = ErrorBody)), security(("api_key" = [])))]
pub async fn create_token(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(req): Body<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreateTokenResponse>)> {
    let t = app
        .create_token(&caller, &req.name, req.ttl_seconds)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateTokenResponse {
            token: t.token,
            pairing_token: (&t.record).into(),
        }),
    ))
}

#[utoipa::path(get, path = "/v1/pairing-tokens", responses((status = 200, body = Vec<TokenView>)),
    security(("api_key" = [])))]
pub async fn list_tokens(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenView>>> {
    Ok(Json(
        app.list_tokens(&caller)?
            .iter()
            .map(TokenView::from)
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/pairing-tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn revoke_token(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<StatusCode> {
    app.revoke_token(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/gateways", responses((status = 200, body = Vec<GatewayView>)),
    security(("api_key" = [])))]
pub async fn list_gateways(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<Vec<GatewayView>>> {
    Ok(Json(
        app.list_gateways(&caller)?
            .iter()
            .map(GatewayView::from)
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/gateways/{id}", params(("id" = String, Path)),
    responses((status = 200, body = GatewayView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_gateway(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<Json<GatewayView>> {
    Ok(Json((&app.get_gateway(&caller, &id)?).into()))
}

#[utoipa::path(post, path = "/v1/gateways/{id}/revoke", params(("id" = String, Path)),
    responses((status = 200, body = GatewayView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_gateway(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<Json<GatewayView>> {
    Ok(Json((&app.revoke_gateway(&caller, &id).await?).into()))
}

/// The idempotency header of `POST /v1/gateways/{id}/commands`.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Wait up to this many seconds (at most 60) for the command to finish before answering:
    /// the answer is then the finished command, or the command as it stands when the wait ends.
    pub wait_seconds: Option<u64>,
}

#[utoipa::path(post, path = "/v1/gateways/{id}/commands",
    params(("id" = String, Path), SubmitQuery,
           ("Idempotency-Key" = Option<String>, Header, description = "Makes the submit safe to retry: the same key with the same body returns the command the first request made (with `Idempotent-Replayed: true`); with a different body, 422. Keys are remembered per tenant for `idempotency_window_secs` (default 24 h).")),
    request_body = SubmitCommandRequest,
    responses((status = 201, description = "Created: the command (with `wait_seconds`, as it stands when it finished or the wait ended)", body = CommandView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn submit_command(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
    Q(q): Q<SubmitQuery>,
    headers: HeaderMap,
    Body(req): Body<SubmitCommandRequest>,
) -> ApiResult<impl IntoResponse> {
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    crate::app::AppError::invalid(
                        "invalid_idempotency_key",
                        "the Idempotency-Key must be printable ASCII",
                    )
                })?
                .to_string(),
        ),
    };
    let done = app
        .submit_command(
            &caller,
            Submit {
                gateway_id: &id,
                kind: req.kind,
                payload: req.payload,
                idempotency_key,
                deadline_seconds: req.deadline_seconds,
            },
        )
        .await?;
    let mut h = HeaderMap::new();
    if done.replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    // Submitted and durable: a failure of the wait is not the submit's, so the command as
    // stored is the answer then.
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(0).min(60));
    let command = if wait.is_zero() || done.command.state.is_terminal() {
        done.command
    } else {
        match app.get_command(&caller, &done.command.id, wait).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(command = %done.command.id, "the wait of a submit ended early: {e}");
                done.command
            }
        }
    };
    Ok((StatusCode::CREATED, h, Json(CommandView::from(&command))))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListCommandsQuery {
    pub gateway_id: Option<String>,
    /// queued, delivered, received, succeeded, failed, cancelled or timed_out.
    pub state: Option<String>,
    pub kind: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/commands", params(ListCommandsQuery),
    responses((status = 200, body = Vec<CommandView>), (status = 400, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_commands(
    State(app): State<Arc<App>>,
    caller: Caller,
    Q(q): Q<ListCommandsQuery>,
) -> ApiResult<Json<Vec<CommandView>>> {
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(CommandState::parse(s).ok_or_else(|| {
            crate::app::AppError::invalid(
                "invalid_state",
                format!(
                    "unknown state \"{}\"; use queued, delivered, received, succeeded, failed, cancelled or timed_out",
                    crate::app::printable(s)
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
        app.list_commands(&caller, f)?
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
    responses((status = 200, body = CommandView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_command(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
    Q(q): Q<GetCommandQuery>,
) -> ApiResult<Json<CommandView>> {
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(0).min(60));
    Ok(Json((&app.get_command(&caller, &id, wait).await?).into()))
}

#[utoipa::path(post, path = "/v1/commands/{id}/cancel", params(("id" = String, Path)),
    request_body(content = CancelCommandRequest, description = "Optional: why (the body may be empty)"),
    responses((status = 202, description = "Accepted: the command, `cancelled` already when it had never been handed to its gateway, else with `cancel` set until the gateway confirms", body = CommandView),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "The command has ended; its result stands", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn cancel_command(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<CommandView>)> {
    let req: CancelCommandRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelCommandRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            crate::app::AppError::invalid(
                "invalid_body",
                format!("the request body is not valid JSON for this endpoint: {e}; send {{\"reason\": \"...\"}} or nothing"),
            )
        })?
    };
    let c = app.cancel_command(&caller, &id, req.reason).await?;
    Ok((StatusCode::ACCEPTED, Json(CommandView::from(&c))))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListEventsQuery {
    /// Only events with a larger sequence number.
    pub since: Option<u64>,
    pub gateway_id: Option<String>,
    /// Only events about this declared machine.
    pub machine_id: Option<String>,
    /// Only this kind (`machine.heal`), or kinds under a prefix ending in `.` (`machine.`).
    pub kind: Option<String>,
    /// `true`: only alerts; `false`: only events that are not alerts.
    pub alert: Option<bool>,
    /// Default 100, at most 1000.
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/events", params(ListEventsQuery),
    responses((status = 200, body = Vec<EventView>), (status = 400, body = ErrorBody)), security(("api_key" = [])))]
pub async fn list_events(
    State(app): State<Arc<App>>,
    caller: Caller,
    Q(q): Q<ListEventsQuery>,
) -> ApiResult<Json<Vec<EventView>>> {
    let f = crate::store::EventFilter {
        gateway_id: q.gateway_id,
        machine_id: q.machine_id,
        kind: q.kind,
        alert: q.alert,
    };
    let evs = app.list_events(&caller, q.since, &f, q.limit.unwrap_or(100))?;
    Ok(Json(evs.into_iter().map(EventView::from).collect()))
}

#[utoipa::path(get, path = "/v1/gateways/{id}/bundles", params(("id" = String, Path)),
    responses((status = 200, body = Vec<BundleView>), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_bundles(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<Json<Vec<BundleView>>> {
    Ok(Json(
        app.list_bundles(&caller, &id)?
            .iter()
            .map(BundleView::from)
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/bundles/{id}", params(("id" = String, Path)),
    responses((status = 200, description = "The support bundle (tar.gz) as the gateway uploaded it", content_type = "application/gzip", body = Vec<u8>),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_bundle(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<impl IntoResponse> {
    let (b, data) = app.get_bundle(&caller, &id)?;
    Ok((
        [
            (http::header::CONTENT_TYPE, "application/gzip".to_string()),
            (
                http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.tar.gz\"", b.id),
            ),
            (http::HeaderName::from_static("x-content-sha256"), b.sha256),
        ],
        data,
    ))
}

/// The path of the batch submit.
pub const BATCH_PATH: &str = "/v1/commands/batch";

#[utoipa::path(post, path = "/v1/commands/batch", request_body = BatchRequest,
    responses((status = 200, description = "One outcome per command, in order; the batch is durable as a whole before this answer", body = BatchResponse),
              (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn submit_batch(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(req): Body<BatchRequest>,
) -> ApiResult<Json<BatchResponse>> {
    let items = req
        .commands
        .iter()
        .map(|c| Submit {
            gateway_id: &c.gateway_id,
            kind: c.kind.clone(),
            payload: c.payload.clone(),
            idempotency_key: c.idempotency_key.clone(),
            deadline_seconds: c.deadline_seconds,
        })
        .collect();
    let outcomes = app.submit_batch(&caller, items).await?;
    Ok(Json(BatchResponse {
        results: outcomes
            .into_iter()
            .map(|r| match r {
                Ok(s) => BatchOutcome {
                    status: 201,
                    command: Some(CommandView::from(&s.command)),
                    replayed: s.replayed,
                    error: None,
                },
                Err(e) => {
                    let e = crate::api::ApiError::from(e);
                    BatchOutcome {
                        status: e.status.as_u16(),
                        command: None,
                        replayed: false,
                        error: Some(crate::api::error::ErrorDetail {
                            code: e.code.to_string(),
                            message: e.message,
                        }),
                    }
                }
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/v1/gateways/{id}/machines", params(("id" = String, Path)),
    request_body = DeclarationDoc,
    responses((status = 201, body = MachineView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn declare_machine(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
    Body(d): Body<pcg_proto::machines::Declaration>,
) -> ApiResult<(StatusCode, Json<MachineView>)> {
    let m = app.declare_machine(&caller, &id, d).await?;
    Ok((StatusCode::CREATED, Json(MachineView::from(&m))))
}

#[utoipa::path(get, path = "/v1/gateways/{id}/machines", params(("id" = String, Path)),
    responses((status = 200, body = Vec<MachineView>), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_machines(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<Json<Vec<MachineView>>> {
    Ok(Json(
        app.list_machines(&caller, &id)?
            .iter()
            .map(MachineView::from)
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/machines/{id}", params(("id" = String, Path)),
    responses((status = 200, body = MachineView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_machine(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<Json<MachineView>> {
    Ok(Json((&app.get_machine(&caller, &id)?).into()))
}

#[utoipa::path(put, path = "/v1/machines/{id}", params(("id" = String, Path)),
    request_body = DeclarationDoc,
    responses((status = 200, description = "The declaration replaced, with the next generation; healing resumes if its budget ran out", body = MachineView),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn update_machine(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
    Body(d): Body<pcg_proto::machines::Declaration>,
) -> ApiResult<Json<MachineView>> {
    Ok(Json((&app.update_machine(&caller, &id, d).await?).into()))
}

#[utoipa::path(delete, path = "/v1/machines/{id}", params(("id" = String, Path)),
    responses((status = 202, description = "Being deleted: the gateway deletes the VM (a bare-metal node is left as it is), then the machine is gone", body = MachineView),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_machine(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult<(StatusCode, Json<MachineView>)> {
    let m = app.delete_machine(&caller, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(MachineView::from(&m))))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HealthQuery {
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/gateways/{id}/health", params(("id" = String, Path), HealthQuery),
    responses((status = 200, body = Vec<HealthReportView>), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn gateway_health(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathId(id): PathId,
    Q(q): Q<HealthQuery>,
) -> ApiResult<Json<Vec<HealthReportView>>> {
    Ok(Json(
        app.health_history(&caller, &id, q.limit.unwrap_or(100))?
            .iter()
            .map(HealthReportView::from)
            .collect(),
    ))
}
