//! Operating a gateway: the support bundle (no secret of any enrolled endpoint or of the proxy
//! in it, and an upload that round-trips byte for byte through the REST API) and the Prometheus
//! endpoints of both services (accepted by `promtool check metrics`, counters that move).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pcg_e2e::openstack_peer::OpenstackStack;
use pcg_e2e::peers::{IpmiSim, IPMI_PASSWORD, IPMI_USER};
use pcg_e2e::vcsim::Vcsim;
use pcg_e2e::{Gw, Saas, SaasOptions};
use serde_json::json;

fn unpack(tgz: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(tgz)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap()
        .success();
    assert!(ok, "the bundle is not a tar.gz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_support_bundle_holds_no_secret_and_uploads_byte_for_byte() {
    let Some(bmc) = IpmiSim::start() else { return };
    let vc_password = "e2e-bundle-vc-Pw-4Ds";
    let Some(vc) = Vcsim::start(&["-pass", vc_password]) else {
        return;
    };
    let Some(stack) = OpenstackStack::start() else {
        return;
    };
    let proxy_password = "e2e-bundle-proxy-Pw-8Hj";
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    // A proxy with a password in the config file, not used for the SaaS (NO_PROXY).
    let mut gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!("proxy = \"http://gw:{proxy_password}@proxy.example:3128\""),
    )
    .unwrap();
    gw.env = vec![("NO_PROXY".into(), "127.0.0.1,localhost".into())];
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();
    let run = |kind: &'static str, payload: serde_json::Value| {
        let (saas, key, gw_id) = (&saas, &key, &gw_id);
        async move {
            let id = saas.submit(key, gw_id, kind, payload).await.unwrap();
            let v = saas
                .wait_command(key, &id, Duration::from_secs(90))
                .await
                .unwrap();
            assert_eq!(v["state"], "succeeded", "{kind}: {v}");
        }
    };
    run(
        "baremetal.enrol",
        json!({"name": "node1", "protocol": "ipmi", "endpoint": {
            "address": format!("127.0.0.1:{}", bmc.port), "user": IPMI_USER,
            "password": IPMI_PASSWORD, "timeout_ms": 5000}}),
    )
    .await;
    run(
        "vsphere.enrol",
        json!({"name": "vc1", "endpoint": {
            "url": vc.url, "user": "user", "password": vc_password,
            "tls": {"pin_sha256": vc.thumbprint}, "timeout_ms": 20000}}),
    )
    .await;
    run(
        "openstack.enrol",
        json!({"name": "lab", "cloud": stack.cloud()}),
    )
    .await;
    // Something for the logs.
    run("vsphere.inventory", json!({"endpoint": "vc1"})).await;

    let out = dir.path().join("bundle.tar.gz");
    let (ok, printed, err) = gw.pcgctl(&["bundle", "--upload", "-o", &out.display().to_string()]);
    assert!(ok, "{printed}{err}");
    let unpacked = dir.path().join("unpacked");
    unpack(&out, &unpacked);
    let root = std::fs::read_dir(&unpacked)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for f in [
        "status.json",
        "diag.json",
        "diag.txt",
        "config.toml",
        "logs.txt",
        "endpoints.txt",
        "system.txt",
        "versions.txt",
    ] {
        assert!(root.join(f).is_file(), "{f} missing from the bundle");
    }
    let endpoints = std::fs::read_to_string(root.join("endpoints.txt")).unwrap();
    assert!(
        endpoints.contains("node1") && endpoints.contains("vc1") && endpoints.contains("lab"),
        "{endpoints}"
    );
    // The diagnosis ran when the bundle was made, over every enrolled endpoint too.
    let diag: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("diag.json")).unwrap()).unwrap();
    let hops: Vec<&str> = diag["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["hop"].as_str())
        .collect();
    for hop in ["store", "identity", "broker", "bmc", "vcenter", "openstack"] {
        assert!(
            hops.contains(&hop),
            "no {hop} check in the bundle's diag: {diag}"
        );
    }
    let logs = std::fs::read_to_string(root.join("logs.txt")).unwrap();
    assert!(
        logs.contains("tunnel up"),
        "the daemon's recent logs are missing:\n{logs}"
    );
    for secret in [IPMI_PASSWORD, vc_password, stack.password(), proxy_password] {
        let hits = pcg_e2e::files_containing(&unpacked, secret);
        assert!(hits.is_empty(), "{secret:?} is in the bundle: {hits:?}");
    }
    // The upload: fetched through the REST API, byte for byte.
    let id = printed
        .split_whitespace()
        .skip_while(|w| *w != "as")
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let list = saas
        .ok("GET", &format!("/v1/gateways/{gw_id}/bundles"), &key, None)
        .await
        .unwrap();
    assert_eq!(list[0]["id"], id.as_str(), "{list}");
    let fetched = saas
        .http
        .get(format!("{}/v1/bundles/{id}", saas.api))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(fetched.as_ref(), std::fs::read(&out).unwrap().as_slice());
    // Another tenant cannot fetch it.
    let (_, other) = saas.tenant("other").await.unwrap();
    let (s, _) = saas
        .call("GET", &format!("/v1/bundles/{id}"), &other, None)
        .await
        .unwrap();
    assert_eq!(s, 404);
}

fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
            "promtool missing and PCG_REQUIRE_PEERS is set: run scripts/peers/install-ops.sh"
        );
        eprintln!("!!!!!!!! promtool missing: metrics not checked by it !!!!!!!!");
        return;
    };
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A counter's value in an OpenMetrics text (the sum over label sets matching `with`).
fn counter(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(with) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_services_export_metrics_that_promtool_accepts_and_that_move() {
    let dir = pcg_e2e::test_dir();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
    )
    .unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();
    let scrape_gw = || async {
        reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    async fn scrape_saas(saas: &Saas) -> String {
        let (s, v) = saas
            .call("GET", "/metrics", &saas.operator_key, None)
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        v.as_str().unwrap().to_string()
    }
    let g0 = scrape_gw().await;
    let s0 = scrape_saas(&saas).await;
    promtool_check(&g0);
    promtool_check(&s0);
    // A tenant key does not get the SaaS's metrics.
    let (s, _) = saas.call("GET", "/metrics", &key, None).await.unwrap();
    assert_eq!(s, 403);
    for i in 0..5 {
        let id = saas
            .submit(&key, &gw_id, "gateway.echo", json!({ "i": i }))
            .await
            .unwrap();
        saas.wait_command(&key, &id, Duration::from_secs(30))
            .await
            .unwrap();
    }
    let id = saas
        .submit(&key, &gw_id, "gateway.sleep", json!({"ms": "x"}))
        .await
        .unwrap();
    saas.wait_command(&key, &id, Duration::from_secs(30))
        .await
        .unwrap();
    let s_mid = scrape_saas(&saas).await;
    assert!(
        counter(&s_mid, "pcg_saas_commands_submitted_total", "") >= 6.0,
        "{s_mid}"
    );
    assert!(
        counter(
            &s_mid,
            "pcg_saas_commands_finished_total",
            "outcome=\"succeeded\""
        ) >= 5.0,
        "{s_mid}"
    );
    assert!(
        counter(
            &s_mid,
            "pcg_saas_api_requests_total",
            "route=\"/v1/gateways/{id}/commands\""
        ) >= 6.0,
        "{s_mid}"
    );
    // A reconnect: the SaaS closes the tunnel (restart), the gateway comes back.
    let (saas, _) = saas.restart(Duration::from_secs(10)).await.unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    let g1 = scrape_gw().await;
    let s1 = scrape_saas(&saas).await;
    promtool_check(&g1);
    promtool_check(&s1);
    let echo = "kind=\"gateway.echo\",outcome=\"succeeded\"";
    assert_eq!(
        counter(&g1, "pcg_gateway_commands_total", echo)
            - counter(&g0, "pcg_gateway_commands_total", echo),
        5.0,
        "{g1}"
    );
    assert_eq!(
        counter(
            &g1,
            "pcg_gateway_commands_total",
            "outcome=\"invalid_payload\""
        ),
        1.0,
        "{g1}"
    );
    assert!(
        counter(
            &g1,
            "pcg_gateway_tunnel_reconnects_total",
            "reason=\"goodbye\""
        ) >= 1.0,
        "{g1}"
    );
    assert_eq!(
        counter(&g1, "pcg_gateway_tunnel_state", "state=\"connected\""),
        1.0,
        "{g1}"
    );
    // The restarted SaaS counts from zero: its tunnel came back and its requests are counted.
    assert!(
        counter(&s1, "pcg_saas_tunnel_opens_total", "transport=\"direct\"") >= 1.0,
        "{s1}"
    );
    // Each request is counted once answered: the next scrape sees the previous one.
    let s2 = scrape_saas(&saas).await;
    assert!(
        counter(&s2, "pcg_saas_api_requests_total", "route=\"/metrics\"") >= 1.0,
        "{s2}"
    );
}

/// Readiness is not liveness: with the SaaS's data directory on a full filesystem, `/readyz`
/// answers 503 with the reason while `/healthz` still answers 200; with room again, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_while_the_store_cannot_write() {
    let dir = pcg_e2e::test_dir();
    let data = dir.path().join("saas/data");
    let Some(tmpfs) = pcg_e2e::Tmpfs::for_test(&data, "256m") else {
        return;
    };
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    async fn get(saas: &Saas, path: &str) -> (u16, String) {
        let r = saas
            .http
            .get(format!("{}{path}", saas.api))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }
    let (s, body) = get(&saas, "/readyz").await;
    assert_eq!(s, 200, "{body}");

    let filler = tmpfs.fill("filler");
    let body = pcg_e2e::wait_for("/readyz to answer 503", Duration::from_secs(60), || async {
        let (s, body) = get(&saas, "/readyz").await;
        (s == 503).then_some(body)
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "store_unavailable", "{body}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("free space"),
        "{body}"
    );
    let (s, body) = get(&saas, "/healthz").await;
    assert_eq!(s, 200, "liveness must not follow readiness: {body}");

    // Room again. A store that met a failed write refuses writes until it is reopened (sled
    // keeps the error), so readiness is checked after a restart; nothing written before is lost.
    std::fs::remove_file(&filler).unwrap();
    let (saas, _) = saas.restart(Duration::from_secs(20)).await.unwrap();
    let (s, body) = get(&saas, "/readyz").await;
    assert_eq!(s, 200, "{body}");
    saas.ok("GET", "/v1/gateways", &key, None).await.unwrap();
    drop(saas);
    drop(tmpfs);
}
