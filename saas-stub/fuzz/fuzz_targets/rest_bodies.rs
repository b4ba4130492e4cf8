//! Fuzzes the JSON bodies of every REST route that takes one (tenants, API keys, pairing
//! tokens, pairing, command submit) through the real router and application layer: whatever
//! the bytes, the answer is a success or an error in the documented JSON format, never a panic
//! and never a 5xx.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    operator: String,
    tenant_key: String,
    gateway: String,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = pcg_saas::Config {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let addr = "127.0.0.1:1".parse().expect("addr");
        let app: Arc<pcg_saas::App> = pcg_saas::open(cfg, addr, None).expect("open");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let operator = std::fs::read_to_string(dir.path().join("operator.key"))
            .expect("operator key")
            .trim()
            .to_string();
        let router = pcg_saas::api::router(app);
        let (tenant_key, gateway) = rt.block_on(async {
            let v = call(&router, "POST", "/v1/tenants", &operator, br#"{"name":"fuzz"}"#).await;
            let key = v.1["admin_api_key"].as_str().expect("tenant key").to_string();
            (key, "gw_0000000000000000".to_string())
        });
        World {
            rt,
            router,
            operator,
            tenant_key,
            gateway,
            _dir: dir,
        }
    })
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    key: &str,
    body: &[u8],
) -> (http::StatusCode, serde_json::Value, Option<String>) {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("request");
    let resp = tower::ServiceExt::oneshot(router.clone(), req)
        .await
        .expect("infallible");
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .expect("body");
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, v, ct)
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let commands = format!("/v1/gateways/{}/commands", w.gateway);
    let (uri, key) = match route % 5 {
        0 => ("/v1/tenants", w.operator.as_str()),
        1 => ("/v1/api-keys", w.tenant_key.as_str()),
        2 => ("/v1/pairing-tokens", w.tenant_key.as_str()),
        3 => ("/v1/pair", ""),
        _ => (commands.as_str(), w.tenant_key.as_str()),
    };
    let (status, v, ct) = w.rt.block_on(call(&w.router, "POST", uri, key, body));
    assert!(!status.is_server_error(), "{uri}: {status} {v}");
    if !status.is_success() {
        assert!(
            ct.as_deref().is_some_and(|c| c.starts_with("application/json")),
            "{uri}: {status} answered {ct:?}"
        );
        assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "{uri}: {v}");
    }
});
