//! The REST API (axum): tenants, API keys, pairing tokens, gateways, commands, events, declared
//! machines, and the pairing endpoint gateways call with their token.
//!
//! Every request but `/healthz`, `/v1/ca`, `/openapi.json` and `/v1/pair` carries
//! `Authorization: Bearer pcgk_...`. The operator key (written to `operator.key` in the data
//! directory at first start) administers tenants only; a tenant key sees its own tenant only.
//! Every error is `{"error": {"code": "...", "message": "..."}}` with a message that says what
//! to do. The OpenAPI document is generated from the handlers (`pcg-saas openapi`) and committed
//! as `saas-stub/openapi.json`; a test fails when the two differ.
//!
//! - [`handlers`]: one thin function per route over [`App`];
//! - [`dto`]: request bodies and views;
//! - [`feed`]: a tenant's feed as Server-Sent Events and as a gRPC server stream;
//! - [`error`]: the error format and how every rejection maps to it;
//! - [`openapi`]: the document.

pub mod dto;
pub mod error;
pub mod feed;
pub mod handlers;
pub mod openapi;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

pub use error::{ApiError, ApiResult};
pub use openapi::openapi_document;

use crate::app::{App, Caller};

/// A JSON request body; rejections answer in the API's error format (413 over the limit).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

/// Query parameters; a malformed one answers 400 in the API's error format.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Q<T>(pub T);

/// The `{id}` of a route; a path that is not UTF-8 answers 400 in the API's error format.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state).await?;
        Ok(PathId(id))
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(app.authenticate_fresh(header).await?)
    }
}

/// Largest request body: a command payload at the limit, with room for the envelope.
pub fn body_limit(app: &App) -> usize {
    app.cfg.max_payload_bytes + 64 * 1024
}

/// Refuses a declared body over the limit before reading it, turns any error answer that is not
/// in the API's format (from routing or the HTTP layer) into it, and counts the request.
async fn guard(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = req.method().to_string();
    let limit = if req.uri().path() == handlers::BATCH_PATH {
        app.cfg.max_batch_bytes
    } else {
        body_limit(&app)
    };
    let resp = guarded(limit, req, next).await;
    app.metrics
        .observe_request(&route, &method, resp.status().as_u16(), started.elapsed());
    resp
}

async fn guarded(limit: usize, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let mut r = error::too_large().into_response();
        // The body is not read: the connection cannot carry another request.
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return r;
    }
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let message = match status {
            StatusCode::METHOD_NOT_ALLOWED => {
                "this method is not allowed on this path; the API is described at /openapi.json"
                    .to_string()
            }
            s => format!(
                "{} ({}); the API is described at /openapi.json",
                s.canonical_reason().unwrap_or("error"),
                s.as_u16()
            ),
        };
        let allow = resp.headers().get(http::header::ALLOW).cloned();
        let mut r = ApiError::new(status, error::code_for(status), message).into_response();
        if let Some(a) = allow {
            r.headers_mut().insert(http::header::ALLOW, a);
        }
        return r;
    }
    resp
}

async fn openapi_json() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
}

/// Prometheus metrics of the service, for the operator key.
async fn metrics(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Response> {
    let text = app.metrics_text(&caller)?;
    Ok((
        [(http::header::CONTENT_TYPE, pcg_obs::METRICS_CONTENT_TYPE)],
        text,
    )
        .into_response())
}

/// Readiness: 200 when the store takes a durable write and the service is not stopping; 503
/// with the reason otherwise. (`/healthz` is liveness: the process answers.)
async fn readyz(axum::extract::State(app): axum::extract::State<Arc<App>>) -> ApiResult<Response> {
    app.ready().await?;
    Ok((
        [(http::header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ready\"}",
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; the API is described at /openapi.json",
    )
}

/// The REST API's routes over `app`.
pub fn router(app: Arc<App>) -> Router {
    use handlers::*;
    let limit = body_limit(&app);
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
        .route("/v1/gateways/{id}/bundles", get(list_bundles))
        .route(
            "/v1/gateways/{id}/machines",
            post(declare_machine).get(list_machines),
        )
        .route("/v1/gateways/{id}/health", get(gateway_health))
        .route(
            "/v1/machines/{id}",
            get(get_machine).put(update_machine).delete(delete_machine),
        )
        .route("/v1/bundles/{id}", get(get_bundle))
        .route("/v1/commands", get(list_commands))
        .route(
            BATCH_PATH,
            post(submit_batch).layer(axum::extract::DefaultBodyLimit::max(
                app.cfg.max_batch_bytes,
            )),
        )
        .route("/v1/commands/{id}", get(get_command))
        .route("/v1/commands/{id}/cancel", post(cancel_command))
        .route("/v1/events", get(list_events))
        .route("/v1/feed", get(feed::feed_sse))
        .route_service(
            "/pcg.feed.v1.Feed/Subscribe",
            feed::FeedService::server(app.clone()),
        )
        .route(pcg_proto::ws::PATH, get(crate::tunnel_ws::upgrade))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::commands::valid_kind;

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
        let committed = include_str!("../../openapi.json");
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
        let doc: serde_json::Value = serde_json::to_value(dto::PairRequestDoc {
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
    fn declaration_schema_matches_the_wire_type() {
        let wire = serde_json::json!({
            "name": "web",
            "vsphere": {"endpoint": "lab", "vm": {"name": "w"}, "adopt_id": "vm-1"},
            "power": "off",
            "policy": "heal",
            "heal_budget": {"max_heals": 2, "window_seconds": 60},
        });
        let d: pcg_proto::machines::Declaration =
            serde_json::from_value(wire.clone()).expect("wire type");
        let doc: dto::DeclarationDoc = serde_json::from_value(wire.clone()).expect("doc type");
        assert_eq!(serde_json::to_value(&d).expect("serialise"), wire);
        assert_eq!(serde_json::to_value(&doc).expect("serialise"), wire);
        let bm = serde_json::json!({"name": "n", "bare_metal": {"bmc": "b", "system": "s"}});
        let doc: dto::DeclarationDoc = serde_json::from_value(bm.clone()).expect("doc type");
        let d: pcg_proto::machines::Declaration = serde_json::from_value(bm).expect("wire");
        let mut from_wire = serde_json::to_value(&d).expect("serialise");
        for k in ["power", "policy", "heal_budget"] {
            from_wire.as_object_mut().expect("object").remove(k);
        }
        assert_eq!(serde_json::to_value(&doc).expect("serialise"), from_wire);
    }

    fn test_app() -> (tempfile::TempDir, Arc<App>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::Config {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let app = rt
            .block_on(crate::app::open(
                cfg,
                "127.0.0.1:1".parse().expect("addr"),
                None,
            ))
            .expect("open");
        (dir, app)
    }

    fn call(
        rt: &tokio::runtime::Runtime,
        r: &Router,
        req: http::Request<axum::body::Body>,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let resp = rt
            .block_on(tower::ServiceExt::oneshot(r.clone(), req))
            .expect("infallible");
        let (parts, body) = resp.into_parts();
        let b = rt
            .block_on(axum::body::to_bytes(body, 1 << 20))
            .expect("body");
        let v = serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, v)
    }

    #[test]
    fn every_documented_path_is_routed() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_document()).expect("valid JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (_dir, app) = test_app();
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
                let (s, _, v) = call(&rt, &r, req);
                assert!(
                    s != StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but not routed"
                );
                assert!(
                    !v["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("no such endpoint"),
                    "{method} {path} is documented but not routed"
                );
            }
        }
    }

    #[test]
    fn every_error_is_in_the_documented_format() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (_dir, app) = test_app();
        let key = std::fs::read_to_string(app.cfg.data_dir.join("operator.key"))
            .expect("operator key")
            .trim()
            .to_string();
        let limit = body_limit(&app);
        let r = router(app);
        let get = |uri: &str, auth: Option<&str>| {
            let mut b = http::Request::builder().method("GET").uri(uri);
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(axum::body::Body::empty()).expect("request")
        };
        let bearer = format!("Bearer {key}");
        let lower = format!("bearer {key}");
        let cases: Vec<(http::Request<axum::body::Body>, StatusCode, &str)> = vec![
            (
                get("/v1/commands?limit=abc", Some(&bearer)),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                get("/v1/events?since=-3", Some(&bearer)),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                get("/v1/commands/x?wait_seconds=soon", Some(&bearer)),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            // A submit whose wait is malformed is refused before anything is submitted.
            (
                http::Request::builder()
                    .method("POST")
                    .uri("/v1/gateways/x/commands?wait_seconds=soon")
                    .header("authorization", &bearer)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(r#"{"kind": "gateway.echo"}"#))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                get("/v1/commands/%FF%FE", Some(&bearer)),
                StatusCode::BAD_REQUEST,
                "invalid_path",
            ),
            (
                http::Request::builder()
                    .method("PATCH")
                    .uri("/v1/tenants")
                    .body(axum::body::Body::empty())
                    .expect("request"),
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (get("/nowhere", None), StatusCode::NOT_FOUND, "not_found"),
            (
                http::Request::builder()
                    .method("POST")
                    .uri("/v1/tenants")
                    .header("authorization", &bearer)
                    .header("content-type", "application/json")
                    .header("content-length", (limit + 1).to_string())
                    .body(axum::body::Body::from(vec![b' '; limit + 1]))
                    .expect("request"),
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
            ),
            (
                http::Request::builder()
                    .method("POST")
                    .uri("/v1/tenants")
                    .header("authorization", &bearer)
                    .body(axum::body::Body::from("{}"))
                    .expect("request"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
            // The scheme is case-insensitive: this one is authenticated (the operator key
            // lists every tenant).
            (get("/v1/tenants", Some(&lower)), StatusCode::OK, ""),
        ];
        for (req, status, code) in cases {
            let what = format!("{} {}", req.method(), req.uri());
            let (s, _, v) = call(&rt, &r, req);
            assert_eq!(s, status, "{what}: {v}");
            if !code.is_empty() {
                assert_eq!(v["error"]["code"], code, "{what}: {v}");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "{what}: {v}"
                );
            }
        }
    }
}
