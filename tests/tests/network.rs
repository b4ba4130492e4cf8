//! The tunnel and pairing through real enterprise networks: squid as a plain CONNECT proxy, with
//! Basic auth, with a policy refusing the SaaS port, and as a TLS-inspecting (ssl_bump) proxy
//! that forces the WebSocket transport; NO_PROXY; one public port for everything.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use pcg_e2e::squid::{Kind, Squid};
use pcg_e2e::{Gw, Saas, SaasOptions};
use serde_json::json;

async fn saas(dir: &std::path::Path) -> (Saas, String) {
    let saas = Saas::start(&dir.join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    (saas, key)
}

fn fails(gw: &Gw, args: &[&str]) -> String {
    let (ok, out, err) = gw.pcgctl(args);
    assert!(!ok, "pcgctl {args:?} succeeded: {out}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_and_pairing_through_a_connect_proxy_on_one_port() {
    let Some(squid) = Squid::start(Kind::Connect) else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, key) = saas(dir.path()).await;
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!("proxy = {:?}", squid.url(None)),
    )
    .unwrap();
    let (ok, out, err) = gw.pcgctl(&["pair", &token]);
    assert!(ok, "{out}{err}");
    // One public port: the broker endpoint handed out at pairing is the API's URL.
    assert!(out.contains(&format!("broker: {}", saas.api)), "{out}");
    gw.start().unwrap();
    let st = gw
        .wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(st["tunnel"]["transport"], "direct", "{st}");
    assert_eq!(st["tunnel"]["proxy"], squid.url(None).as_str(), "{st}");
    let gw_id = gw.gateway_id().unwrap();
    let id = saas
        .submit(&key, &gw_id, "gateway.echo", json!({"via": "proxy"}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let port = saas.api_listen.port();
    let log = squid.access_log();
    let tunnels = log
        .lines()
        .filter(|l| l.contains("TCP_TUNNEL") && l.contains(&format!("127.0.0.1:{port}")))
        .count();
    assert!(tunnels >= 1, "squid saw no CONNECT to the SaaS:\n{log}");
    let (ok, shown, _) = gw.pcgctl(&["proxy", "show"]);
    assert!(ok && shown.contains(&squid.url(None)), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_wrong_missing_and_right() {
    let password = "Pr0xy-e2e-pw";
    let Some(squid) = Squid::start(Kind::Auth {
        user: "gw".into(),
        password: password.into(),
    }) else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, key) = saas(dir.path()).await;
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.env = vec![("HTTPS_PROXY".into(), squid.url(None))];
    let err = fails(&gw, &["pair", &token]);
    assert!(
        err.contains(&format!(
            "the proxy {} requires authentication (407",
            squid.url(None)
        )) && err.contains("give a user and password"),
        "{err}"
    );
    let (ok, _, e) = gw.pcgctl(&["proxy", "set", &squid.url(Some(("gw", "wrong")))]);
    assert!(ok, "{e}");
    let err = fails(&gw, &["pair", &token]);
    assert!(
        err.contains("requires authentication (407")
            && err.contains("refused the user and password"),
        "{err}"
    );
    let (ok, _, e) = gw.pcgctl(&["proxy", "set", &squid.url(Some(("gw", password)))]);
    assert!(ok, "{e}");
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    let st = gw
        .wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let shown = st["tunnel"]["proxy"].as_str().unwrap();
    assert_eq!(
        shown,
        "http://gw:***@127.0.0.1:".to_string() + &squid.port.to_string()
    );
    let (_, info, _) = gw.pcgctl(&["proxy", "show"]);
    assert!(
        info.contains("from pcgctl proxy set") && !info.contains(password),
        "{info}"
    );
    // The proxy password is sealed at rest and never logged.
    gw.proc.as_mut().unwrap().stop();
    let hits = pcg_e2e::files_containing(&gw.dir, password);
    assert!(hits.is_empty(), "proxy password in clear in {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_and_an_unreachable_proxy_are_named() {
    let dir = pcg_e2e::test_dir();
    let (saas, key) = saas(dir.path()).await;
    let port = saas.api_listen.port();
    let Some(squid) = Squid::start(Kind::Deny { port }) else {
        return;
    };
    let (_, token) = saas.token(&key, None).await.unwrap();
    let gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!("proxy = {:?}", squid.url(None)),
    )
    .unwrap();
    let err = fails(&gw, &["pair", &token]);
    assert!(
        err.contains(&format!(
            "the proxy {} refused CONNECT to 127.0.0.1:{port} (HTTP/1.1 403",
            squid.url(None)
        )) && err.contains("ask the proxy's administrator"),
        "{err}"
    );
    // A proxy nobody listens on; and NO_PROXY taking the SaaS host out of it.
    let mut gw = Gw::new(&dir.path().join("gw2")).unwrap();
    gw.env = vec![("HTTPS_PROXY".into(), "http://127.0.0.1:9".into())];
    let err = fails(&gw, &["pair", &token]);
    assert!(
        err.contains("cannot reach the proxy http://127.0.0.1:9"),
        "{err}"
    );
    gw.env
        .push(("NO_PROXY".into(), "localhost,127.0.0.1".into()));
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    let st = gw
        .wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(st["tunnel"]["proxy"].is_null(), "{st}");
}

/// Through a TLS-inspecting proxy: the direct attempt reports the interception with the
/// proxy CA's SHA-256, the WebSocket transport connects (pairing too), 1,000 commands run
/// exactly once, and the broker sees the gateway's own certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_inspecting_proxy_forces_the_websocket_transport() {
    let dir = pcg_e2e::test_dir();
    let (saas, key) = saas(dir.path()).await;
    let Some(squid) = Squid::start(Kind::Bump {
        origin_ca: saas.dir.join("data/ca.pem"),
        upgrades: true,
    }) else {
        return;
    };
    let proxy_ca = squid.ca_pem.clone().unwrap();
    let proxy_ca_sha = {
        use sha2::Digest as _;
        let pem = std::fs::read(&proxy_ca).unwrap();
        let der = pcg_e2e::pem_der(&pem);
        hex::encode(sha2::Sha256::digest(der))
    };
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!("proxy = {:?}\nproxy_ca = {:?}", squid.url(None), proxy_ca),
    )
    .unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    let st = gw
        .wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(st["tunnel"]["transport"], "websocket", "{st}");
    let why = st["tunnel"]["transport_reason"].as_str().unwrap();
    assert!(
        why.contains("TLS intercepted by a proxy") && why.contains(&proxy_ca_sha),
        "{why}"
    );
    let (_, human, _) = gw.pcgctl(&["status"]);
    assert!(human.contains("transport:    WebSocket"), "{human}");
    let gw_id = gw.gateway_id().unwrap();
    let view = saas
        .ok("GET", &format!("/v1/gateways/{gw_id}"), &key, None)
        .await
        .unwrap();
    assert_eq!(view["connected"], true, "{view}");
    assert_eq!(view["tunnel"]["transport"], "websocket", "{view}");
    assert_eq!(
        view["tunnel"]["certificate_sha256"], st["certificate_sha256"],
        "the broker saw another certificate than the gateway's: {view} vs {st}"
    );
    // 1,000 commands exactly once through the WebSocket.
    use futures_util::stream::{self, StreamExt};
    let saas = std::sync::Arc::new(saas);
    let ids: Vec<String> = stream::iter(0..1000)
        .map(|n| {
            let (saas, key, gw_id) = (saas.clone(), key.clone(), gw_id.clone());
            async move {
                let id = saas
                    .submit(&key, &gw_id, "gateway.ledger", json!({ "n": n }))
                    .await
                    .unwrap();
                let v = saas
                    .wait_command(&key, &id, Duration::from_secs(120))
                    .await
                    .unwrap();
                assert_eq!(v["state"], "succeeded", "{v}");
                id
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut count: HashMap<String, usize> = HashMap::new();
    for l in gw.ledger_ids() {
        *count.entry(l).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(count.get(id), Some(&1), "{id}");
    }
    assert_eq!(count.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inspecting_proxy_that_blocks_websockets_is_named() {
    let dir = pcg_e2e::test_dir();
    let (saas, key) = saas(dir.path()).await;
    let Some(squid) = Squid::start(Kind::Bump {
        origin_ca: saas.dir.join("data/ca.pem"),
        upgrades: false,
    }) else {
        return;
    };
    let (_, token) = saas.token(&key, None).await.unwrap();
    let gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!(
            "proxy = {:?}\nproxy_ca = {:?}",
            squid.url(None),
            squid.ca_pem.clone().unwrap()
        ),
    )
    .unwrap();
    let err = fails(&gw, &["pair", &token]);
    assert!(err.contains("TLS intercepted by a proxy"), "{err}");
    assert!(
        err.contains("WebSocket upgrade")
            && err.contains("http_upgrade_request_protocols")
            && err.contains(&squid.url(None)),
        "{err}"
    );
}

/// A silent drop (a firewall that stops forwarding without a reset) is noticed and the tunnel
/// redialled within three heartbeat intervals and a second. Made real with a network namespace
/// and an nftables rule dropping everything; where namespaces cannot be made (not root), a relay
/// that stops forwarding stands in, and the test says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_drop_is_redialled_within_three_heartbeats() {
    const INTERVAL_MS: i64 = 1000;
    let dir = pcg_e2e::test_dir();
    let ns = if std::env::var_os("PCG_TEST_NO_NETNS").is_some() {
        Err("PCG_TEST_NO_NETNS is set".to_string())
    } else {
        pcg_e2e::netns::NetNs::create()
    };
    let relay = match &ns {
        Ok(ns) => {
            eprintln!(
                "silent drop: network namespace {} ({} ↔ {})",
                ns.name, ns.inner, ns.outer
            );
            None
        }
        Err(why) => {
            assert!(
                std::env::var_os("PCG_TEST_NO_NETNS").is_some()
                    || !(std::env::var_os("PCG_REQUIRE_PEERS").is_some()
                        && rustix::process::geteuid().is_root()),
                "running as root with PCG_REQUIRE_PEERS, yet no network namespace: {why}"
            );
            eprintln!("!!!!!!!! silent drop: network namespaces cannot be made here ({why}); a relay that stops forwarding stands in !!!!!!!!");
            Some(pcg_e2e::relay::Relay::bind().await.unwrap())
        }
    };
    let mut opts = SaasOptions {
        heartbeat_ms: Some(INTERVAL_MS as u64),
        ..Default::default()
    };
    match (&ns, &relay) {
        (Ok(ns), _) => opts.api_listen = Some(std::net::SocketAddr::from((ns.outer, 0))),
        (Err(_), Some(r)) => {
            opts.extra_toml = format!(
                "public_api_url = \"https://{0}\"\npublic_broker_urls = [\"https://{0}\"]\n",
                r.addr
            )
        }
        _ => unreachable!(),
    }
    let saas = Saas::start(&dir.path().join("saas"), opts).await.unwrap();
    if let Some(r) = &relay {
        r.set_upstream(saas.api_listen);
    }
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start_in(ns.as_ref().ok().map(|n| n.name.as_str()))
        .unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let dropped_at = pcg_e2e::now_ms();
    match (&ns, &relay) {
        (Ok(ns), _) => ns.blackhole().unwrap(),
        (_, Some(r)) => r.stall_all(),
        _ => unreachable!(),
    }
    let st = pcg_e2e::wait_for(
        "the gateway to notice the silence",
        Duration::from_secs(60),
        || async {
            gw.status().filter(|s| {
                s["tunnel"]["state"] != "connected"
                    && s["tunnel"]["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("silent"))
            })
        },
    )
    .await
    .unwrap();
    let down = st["tunnel"]["down_since_ms"].as_i64().unwrap();
    // The gateway redials at most backoff_base_ms (50 ms in the tests) after noticing.
    let redial = down + 50 - dropped_at;
    eprintln!(
        "silent drop noticed after {} ms, redial by {redial} ms (bound {} ms)",
        down - dropped_at,
        3 * INTERVAL_MS + 1000
    );
    assert!(redial <= 3 * INTERVAL_MS + 1000, "{redial} ms: {st}");
    match (&ns, &relay) {
        (Ok(ns), _) => ns.restore().unwrap(),
        // Connections stalled by the relay (this test's own REST connection among them) are
        // closed; new ones are forwarded.
        (_, Some(r)) => r.cut_all(),
        _ => unreachable!(),
    }
    gw.wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();
    let id = saas
        .submit(&key, &gw_id, "gateway.echo", json!({}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
}

/// On the WebSocket fallback, the direct path is probed every `direct_retry_secs`; once the
/// inspection stops (here: the way out now leads to a plain CONNECT proxy), the tunnel moves
/// back to the direct transport by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_moves_back_to_direct_when_inspection_stops() {
    let dir = pcg_e2e::test_dir();
    let (saas, key) = saas(dir.path()).await;
    let Some(bump) = Squid::start(Kind::Bump {
        origin_ca: saas.dir.join("data/ca.pem"),
        upgrades: true,
    }) else {
        return;
    };
    let Some(plain) = Squid::start(Kind::Connect) else {
        return;
    };
    // The gateway's proxy is a relay; where it leads is switched under the gateway.
    let relay = pcg_e2e::relay::Relay::bind().await.unwrap();
    relay.set_upstream(format!("127.0.0.1:{}", bump.port).parse().unwrap());
    let proxy_ca = bump.ca_pem.clone().unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!(
            "proxy = \"http://{}\"\nproxy_ca = {:?}\ndirect_retry_secs = 2",
            relay.addr, proxy_ca
        ),
    )
    .unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    let st = gw
        .wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(st["tunnel"]["transport"], "websocket", "{st}");
    let gw_id = gw.gateway_id().unwrap();

    relay.set_upstream(format!("127.0.0.1:{}", plain.port).parse().unwrap());
    let st = pcg_e2e::wait_for(
        "the tunnel back on the direct transport",
        Duration::from_secs(90),
        || async {
            gw.status().filter(|s| {
                s["tunnel"]["state"] == "connected" && s["tunnel"]["transport"] == "direct"
            })
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; last status {:?}; gateway log:\n{}",
            gw.status(),
            gw.log()
        )
    });
    let view = saas
        .ok("GET", &format!("/v1/gateways/{gw_id}"), &key, None)
        .await
        .unwrap();
    assert_eq!(view["tunnel"]["transport"], "direct", "{view} / {st}");
    // And it still carries commands.
    let id = saas
        .submit(&key, &gw_id, "gateway.echo", json!({"back": "direct"}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let log = plain.access_log();
    assert!(
        log.lines().any(|l| l.contains("TCP_TUNNEL")),
        "the plain proxy carried no CONNECT:\n{log}"
    );
}
