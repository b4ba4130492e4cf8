//! Fuzzes the JSON bodies of every REST route that takes one (tenants, API keys, pairing
//! tokens, pairing, command submit, batch submit, machine declarations and updates, cancel)
//! through the real router and application layer, against a gateway paired for real (so a
//! body gets past the gateway lookup into each route's own validation): whatever the bytes,
//! the answer is a success or an error in the documented JSON format, never a panic and never
//! a 5xx.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    operator: String,
    tenant_key: String,
    gateway: String,
    command: String,
    machine: String,
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
        let (tenant_key, gateway, command, machine) = rt.block_on(async {
            let v = call(&router, "POST", "/v1/tenants", &operator, br#"{"name":"fuzz"}"#).await;
            let key = v.1["admin_api_key"].as_str().expect("tenant key").to_string();
            let gateway = pair(&router, &key).await;
            // A command that stays queued (no tunnel) for the cancel route, and a declared
            // machine for the update route.
            let v = call(
                &router,
                "POST",
                &format!("/v1/gateways/{gateway}/commands"),
                &key,
                br#"{"kind":"gateway.echo","payload":{}}"#,
            )
            .await;
            let command = v.1["id"].as_str().expect("command id").to_string();
            let v = call(
                &router,
                "POST",
                &format!("/v1/gateways/{gateway}/machines"),
                &key,
                br#"{"name":"fuzz-node","bare_metal":{"bmc":"bmc1"},"power":"off","policy":"observe"}"#,
            )
            .await;
            let machine = v.1["id"]
                .as_str()
                .unwrap_or_else(|| panic!("declaring a machine failed: {} {}", v.0, v.1))
                .to_string();
            (key, gateway, command, machine)
        });
        World {
            rt,
            router,
            operator,
            tenant_key,
            gateway,
            command,
            machine,
            _dir: dir,
        }
    })
}

/// Pairs a gateway the way pcg-gateway does (a pairing token, then `POST /v1/pair` with a CSR);
/// returns its id.
async fn pair(router: &axum::Router, tenant_key: &str) -> String {
    let v = call(
        router,
        "POST",
        "/v1/pairing-tokens",
        tenant_key,
        br#"{"name":"fuzz"}"#,
    )
    .await;
    let token = v.1["token"].as_str().expect("pairing token");
    let token = pcg_proto::pairing::PairingToken::decode(token).expect("token decodes");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fuzz-gateway");
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let body = serde_json::json!({
        "token_id": token.token_id,
        "secret": token.secret,
        "csr_pem": csr,
        "hostname": "fuzz-gateway",
        "gateway_version": "0.0.0",
    });
    let v = call(router, "POST", "/v1/pair", "", body.to_string().as_bytes()).await;
    v.1["gateway_id"]
        .as_str()
        .unwrap_or_else(|| panic!("pairing failed: {} {}", v.0, v.1))
        .to_string()
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
    let machines = format!("/v1/gateways/{}/machines", w.gateway);
    let machine = format!("/v1/machines/{}", w.machine);
    let cancel = format!("/v1/commands/{}/cancel", w.command);
    let tenant = w.tenant_key.as_str();
    let (method, uri, key) = match route % 9 {
        0 => ("POST", "/v1/tenants", w.operator.as_str()),
        1 => ("POST", "/v1/api-keys", tenant),
        2 => ("POST", "/v1/pairing-tokens", tenant),
        3 => ("POST", "/v1/pair", ""),
        4 => ("POST", commands.as_str(), tenant),
        5 => ("POST", "/v1/commands/batch", tenant),
        6 => ("POST", machines.as_str(), tenant),
        7 => ("PUT", machine.as_str(), tenant),
        _ => ("POST", cancel.as_str(), tenant),
    };
    let (status, v, ct) = w.rt.block_on(call(&w.router, method, uri, key, body));
    assert!(!status.is_server_error(), "{uri}: {status} {v}");
    if !status.is_success() {
        assert!(
            ct.as_deref()
                .is_some_and(|c| c.starts_with("application/json")),
            "{uri}: {status} answered {ct:?}"
        );
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{uri}: {v}"
        );
    }
});
