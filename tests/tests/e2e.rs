//! End to end with real processes on 127.0.0.1: pcg-saas, pcg-gateway and pcgctl.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use pcg_e2e::{wait_for, Gw, Saas, SaasOptions};
use serde_json::json;

/// SaaS + one paired, connected gateway.
async fn paired(dir: &std::path::Path) -> (Saas, Gw, String, String) {
    let saas = Saas::start(&dir.join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_tenant, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::new(&dir.join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let id = gw.gateway_id().unwrap();
    (saas, gw, key, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_commands_round_trip() {
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, gw_id) = paired(dir.path()).await;
    let saas = Arc::new(saas);

    // The built-in diagnose command first: identity, version, clock.
    let id = saas
        .submit(&key, &gw_id, "gateway.diagnose", json!({}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["gateway_id"], gw_id.as_str());
    assert_eq!(v["result"]["output"]["version"], "0.1.0");
    let skew = v["result"]["output"]["clock_unix_ms"].as_i64().unwrap() - time_ms();
    assert!(skew.abs() < 60_000);

    // Submitted and answered in one request: the 201 carries the result.
    let v = saas
        .submit_waiting(
            &key,
            &gw_id,
            "gateway.echo",
            json!({"text": "one request"}),
            30,
        )
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["echo"]["text"], "one request", "{v}");
    // A wait that ends first answers the command as it stands; it finishes all the same.
    let v = saas
        .submit_waiting(&key, &gw_id, "gateway.sleep", json!({"ms": 3000}), 1)
        .await
        .unwrap();
    assert!(
        matches!(
            v["state"].as_str(),
            Some("queued" | "delivered" | "received")
        ),
        "{v}"
    );
    let v = saas
        .wait_command(&key, v["id"].as_str().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");

    let started = Instant::now();
    let results: Vec<(usize, serde_json::Value)> = stream::iter(0..1000usize)
        .map(|n| {
            let saas = saas.clone();
            let key = key.clone();
            let gw_id = gw_id.clone();
            async move {
                let id = saas
                    .submit(
                        &key,
                        &gw_id,
                        "gateway.echo",
                        json!({ "n": n, "text": format!("hello {n}") }),
                    )
                    .await
                    .unwrap();
                (
                    n,
                    saas.wait_command(&key, &id, Duration::from_secs(120))
                        .await
                        .unwrap(),
                )
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(results.len(), 1000);
    let mut seen = HashSet::new();
    for (n, v) in &results {
        assert_eq!(v["state"], "succeeded", "{v}");
        assert_eq!(v["result"]["output"]["echo"]["n"], *n as u64, "{v}");
        assert_eq!(v["result"]["output"]["echo"]["text"], format!("hello {n}"));
        assert!(seen.insert(v["id"].as_str().unwrap().to_string()));
    }
    eprintln!("1000 commands round trip in {:?}", started.elapsed());

    // The listing filters agree.
    let list = saas
        .ok(
            "GET",
            &format!(
                "/v1/commands?gateway_id={gw_id}&kind=gateway.echo&state=succeeded&limit=1000"
            ),
            &key,
            None,
        )
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1000);

    // Status, human and JSON, from the daemon.
    let st = gw.status().unwrap();
    assert_eq!(st["paired"], true);
    assert_eq!(st["gateway_id"], gw_id.as_str());
    assert_eq!(st["tunnel"]["state"], "connected");
    assert_eq!(st["tunnel"]["broker_endpoint"], saas.broker.as_str());
    assert!(st["certificate_not_after_ms"].as_i64().unwrap() > time_ms());
    let (ok, human, _) = gw.pcgctl(&["status"]);
    assert!(ok);
    assert!(human.contains("connected to https://127.0.0.1:"), "{human}");
    assert!(human.contains(&gw_id), "{human}");
    // The admin socket is the owner's only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(gw.dir.join("data/admin.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Every result is acknowledged eventually: the outbox drains.
    wait_for("outbox to drain", Duration::from_secs(10), || async {
        gw.status().filter(|s| s["outbox_depth"] == 0)
    })
    .await
    .unwrap();
}

fn time_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_misuse_is_refused_and_changes_nothing() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let other = Saas::start(&dir.path().join("other"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    let unpaired = |gw: &Gw| {
        let s = gw.status().unwrap();
        assert_eq!(s["paired"], false, "{s}");
    };
    let expect_fail = |gw: &Gw, args: &[&str], needle: &str| {
        let (ok, out, err) = gw.pcgctl(args);
        assert!(!ok, "pcgctl {args:?} succeeded: {out}");
        assert!(
            err.contains(needle),
            "pcgctl {args:?}: expected {needle:?} in: {err}"
        );
    };

    // Malformed.
    expect_fail(&gw, &["pair", "not-a-token"], "malformed pairing token");
    let (_, good) = saas.token(&key, None).await.unwrap();
    expect_fail(
        &gw,
        &["pair", &good[..good.len() - 7]],
        "malformed pairing token",
    );
    unpaired(&gw);

    // A token from another SaaS: it pins the other SaaS's CA, but points here.
    let mut t = pcg_gateway_token(&good);
    let (_, other_key) = other.tenant("x").await.unwrap();
    let (_, other_tok) = other.token(&other_key, None).await.unwrap();
    t.ca_sha256 = pcg_gateway_token(&other_tok).ca_sha256;
    expect_fail(&gw, &["pair", &t.encode()], "pins");
    expect_fail(&gw, &["pair", &t.encode()], "another SaaS");
    unpaired(&gw);

    // An unreachable SaaS.
    let mut t = pcg_gateway_token(&good);
    t.api_url = "https://127.0.0.1:9".into();
    expect_fail(
        &gw,
        &["pair", &t.encode()],
        "cannot reach the SaaS at https://127.0.0.1:9",
    );
    unpaired(&gw);

    // Expired.
    let (_, short) = saas.token(&key, Some(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expect_fail(&gw, &["pair", &short], "expired");
    unpaired(&gw);

    // Revoked.
    let (rid, revoked) = saas.token(&key, None).await.unwrap();
    saas.ok("DELETE", &format!("/v1/pairing-tokens/{rid}"), &key, None)
        .await
        .unwrap();
    expect_fail(&gw, &["pair", &revoked], "revoked");
    unpaired(&gw);

    // Nothing was paired by any of that.
    let gws = saas.ok("GET", "/v1/gateways", &key, None).await.unwrap();
    assert_eq!(gws.as_array().unwrap().len(), 0);

    // The good token works once; reusing it on a second appliance fails.
    gw.pair(&good).unwrap();
    let gw2 = Gw::new(&dir.path().join("gw2")).unwrap();
    expect_fail(&gw2, &["pair", &good], "already used");
    unpaired(&gw2);
    let gws = saas.ok("GET", "/v1/gateways", &key, None).await.unwrap();
    assert_eq!(gws.as_array().unwrap().len(), 1);
    let toks = saas
        .ok("GET", "/v1/pairing-tokens", &key, None)
        .await
        .unwrap();
    let states: Vec<&str> = toks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.iter().filter(|s| **s == "used").count(), 1, "{toks}");
    assert_eq!(
        states.iter().filter(|s| **s == "revoked").count(),
        1,
        "{toks}"
    );
    // Pairing an already paired gateway needs --force.
    let (_, another) = saas.token(&key, None).await.unwrap();
    expect_fail(&gw, &["pair", &another], "already paired");
    // The refused attempts are events the tenant can list.
    let ev = saas.ok("GET", "/v1/events", &key, None).await.unwrap();
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "pairing.refused"),
        "{ev}"
    );
}

fn pcg_gateway_token(s: &str) -> pcg_proto_token::PairingToken {
    pcg_proto_token::PairingToken::decode(s).unwrap()
}

mod pcg_proto_token {
    pub use pcg_gateway::PairingToken;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_misuse_gets_clear_errors() {
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw_id) = paired(dir.path()).await;
    type Case<'a> = (
        &'a str,
        String,
        &'a str,
        Option<serde_json::Value>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/v1/gateways".into(),
            "pcgk_key_0.bad",
            None,
            401,
            "invalid_api_key",
        ),
        (
            "GET",
            "/v1/gateways".into(),
            "",
            None,
            401,
            "invalid_api_key",
        ),
        (
            "POST",
            "/v1/gateways/gw_nope/commands".into(),
            &key,
            Some(json!({"kind": "gateway.echo"})),
            404,
            "not_found",
        ),
        (
            "POST",
            format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(json!({"kind": "echo"})),
            400,
            "invalid_kind",
        ),
        (
            "POST",
            format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(json!({"kind": "gateway.echo", "payload": [1]})),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(json!({"kind": "vsphere.vm.create"})),
            422,
            "unsupported_kind",
        ),
        (
            "POST",
            format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(json!({"payload": {}})),
            400,
            "invalid_body",
        ),
        (
            "GET",
            "/v1/commands/cmd_nope".into(),
            &key,
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/commands?state=sleeping".into(),
            &key,
            None,
            400,
            "invalid_state",
        ),
        (
            "POST",
            "/v1/tenants".into(),
            &key,
            Some(json!({"name": "x"})),
            403,
            "not_operator",
        ),
        (
            "GET",
            "/v1/gateways".into(),
            &saas.operator_key,
            None,
            403,
            "operator_key",
        ),
        (
            "POST",
            "/v1/pairing-tokens".into(),
            &key,
            Some(json!({"ttl_seconds": 0})),
            400,
            "invalid_ttl",
        ),
        ("GET", "/v1/nothing".into(), &key, None, 404, "not_found"),
    ];
    let before = saas
        .ok("GET", "/v1/commands?limit=1000", &key, None)
        .await
        .unwrap();
    for (m, path, k, body, status, code) in cases {
        let (s, v) = saas.call(m, &path, k, body).await.unwrap();
        assert_eq!(s, status, "{m} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{m} {path}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 20, "{v}");
    }
    // None of the refused submissions stored a command.
    let after = saas
        .ok("GET", "/v1/commands?limit=1000", &key, None)
        .await
        .unwrap();
    assert_eq!(before, after);
    // The unsupported-kind message names what the gateway supports.
    let (_, v) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(json!({"kind": "vsphere.vm.create"})),
        )
        .await
        .unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gateway.diagnose"));
    // A revoked API key stops working.
    let (k2_id, k2_key) = saas.api_key(&key, "ci").await.unwrap();
    saas.ok("GET", "/v1/gateways", &k2_key, None).await.unwrap();
    saas.revoke_api_key(&key, &k2_id).await.unwrap();
    let (s, _) = saas
        .call("GET", "/v1/gateways", &k2_key, None)
        .await
        .unwrap();
    assert_eq!(s, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_gateway_closes_its_tunnel_and_it_cannot_return() {
    let dir = pcg_e2e::test_dir();
    let (saas, mut gw, key, gw_id) = paired(dir.path()).await;
    // Keep a copy of the identity as it was before revocation (daemon stopped for the copy).
    gw.proc.as_mut().unwrap().stop();
    let copy = dir.path().join("copy");
    copy_dir(&gw.dir.join("data"), &copy.join("data"));
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    // A command queued for the gateway while it is revoked fails instead of waiting forever.
    let revoked_at = Instant::now();
    let v = saas
        .ok("POST", &format!("/v1/gateways/{gw_id}/revoke"), &key, None)
        .await
        .unwrap();
    assert!(v["revoked_at"].is_string());
    gw.wait_tunnel("revoked", Duration::from_secs(5))
        .await
        .unwrap();
    wait_for(
        "SaaS to see the tunnel closed",
        Duration::from_secs(5),
        || async {
            saas.ok("GET", &format!("/v1/gateways/{gw_id}"), &key, None)
                .await
                .ok()
                .filter(|g| g["connected"] == false)
        },
    )
    .await
    .unwrap();
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    // Commands are refused for a revoked gateway.
    let (s, v) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(json!({"kind": "gateway.echo"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (409, "gateway_revoked")
    );
    // The same certificate presented again (from the copy, which never heard of the
    // revocation) is refused by the broker.
    let mut again = Gw::new(&copy).unwrap();
    again.start().unwrap();
    let st = again
        .wait_tunnel("revoked", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        st["tunnel"]["last_error"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{st}"
    );
    let g = saas
        .ok("GET", &format!("/v1/gateways/{gw_id}"), &key, None)
        .await
        .unwrap();
    assert_eq!(g["connected"], false);
    let (_, human, _) = again.pcgctl(&["status"]);
    assert!(human.contains("pair again"), "{human}");
    // The refused tunnel is an event of the tenant.
    let evs = saas.ok("GET", "/v1/events", &key, None).await.unwrap();
    assert!(
        evs.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "tunnel.refused" && e["gateway_id"] == gw_id.as_str()),
        "no tunnel.refused event: {evs}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key_a) = saas.tenant("a").await.unwrap();
    let (_, key_b) = saas.tenant("b").await.unwrap();
    let mut gws = Vec::new();
    for (name, key) in [("a", &key_a), ("b", &key_b)] {
        let (_, tok) = saas.token(key, None).await.unwrap();
        let mut gw = Gw::new(&dir.path().join(name)).unwrap();
        gw.pair(&tok).unwrap();
        gw.start().unwrap();
        gw.wait_tunnel("connected", Duration::from_secs(20))
            .await
            .unwrap();
        gws.push(gw);
    }
    let id_a = gws[0].gateway_id().unwrap();
    let id_b = gws[1].gateway_id().unwrap();
    // Each key sees only its own gateways.
    let list_a = saas.ok("GET", "/v1/gateways", &key_a, None).await.unwrap();
    let ids: Vec<&str> = list_a
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id_a.as_str()]);
    let (s, _) = saas
        .call("GET", &format!("/v1/gateways/{id_b}"), &key_a, None)
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (s, _) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{id_b}/commands"),
            &key_a,
            Some(json!({"kind": "gateway.ledger"})),
        )
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (s, _) = saas
        .call("POST", &format!("/v1/gateways/{id_b}/revoke"), &key_a, None)
        .await
        .unwrap();
    assert_eq!(s, 404);
    // Commands reach only their own gateway.
    let mut cmds_a = Vec::new();
    let mut cmds_b = Vec::new();
    for i in 0..20 {
        cmds_a.push(
            saas.submit(&key_a, &id_a, "gateway.ledger", json!({"i": i}))
                .await
                .unwrap(),
        );
        cmds_b.push(
            saas.submit(&key_b, &id_b, "gateway.ledger", json!({"i": i}))
                .await
                .unwrap(),
        );
    }
    for c in &cmds_a {
        saas.wait_command(&key_a, c, Duration::from_secs(30))
            .await
            .unwrap();
        let (s, _) = saas
            .call("GET", &format!("/v1/commands/{c}"), &key_b, None)
            .await
            .unwrap();
        assert_eq!(s, 404, "tenant b reads tenant a's command");
    }
    for c in &cmds_b {
        saas.wait_command(&key_b, c, Duration::from_secs(30))
            .await
            .unwrap();
    }
    let mut la = gws[0].ledger_ids();
    let mut lb = gws[1].ledger_ids();
    la.sort();
    lb.sort();
    cmds_a.sort();
    cmds_b.sort();
    assert_eq!(la, cmds_a);
    assert_eq!(lb, cmds_b);
    let list_b = saas
        .ok("GET", "/v1/commands?limit=1000", &key_b, None)
        .await
        .unwrap();
    assert!(list_b
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["gateway_id"] == id_b.as_str()));
    let ev_b = saas
        .ok("GET", "/v1/events?limit=1000", &key_b, None)
        .await
        .unwrap();
    assert!(!ev_b.to_string().contains(&id_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_over_the_tunnel_before_they_expire() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(
        &dir.path().join("saas"),
        SaasOptions {
            heartbeat_ms: Some(300),
            extra_toml: "gateway_cert_lifetime_secs = 9\n".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    let st = gw
        .wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let first = st["certificate_not_after_ms"].as_i64().unwrap();
    let gw_id = st["gateway_id"].as_str().unwrap().to_string();
    // Renewed at two thirds of the 9 s lifetime, over the tunnel.
    let renewed = wait_for("a renewed certificate", Duration::from_secs(20), || async {
        gw.status()
            .and_then(|s| s["certificate_not_after_ms"].as_i64())
            .filter(|n| *n > first)
    })
    .await
    .unwrap();
    assert!(renewed > first);
    // Once the first certificate has expired, a fresh tunnel still authenticates.
    while time_ms() < first + 1500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.proc.as_mut().unwrap().kill();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let id = saas
        .submit(&key, &gw_id, "gateway.diagnose", json!({}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded");
    let ev = saas
        .ok("GET", "/v1/events?limit=1000", &key, None)
        .await
        .unwrap();
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "gateway.certificate_renewed"),
        "{ev}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_through_the_running_daemon_and_again_after_revocation() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    // The daemon starts unpaired and says what to do.
    gw.start().unwrap();
    gw.wait_tunnel("unpaired", Duration::from_secs(20))
        .await
        .unwrap();
    let (_, human, _) = gw.pcgctl(&["status"]);
    assert!(human.contains("pcgctl pair TOKEN"), "{human}");
    // Pairing goes through the admin socket; the tunnel comes up without a restart.
    let (_, token) = saas.token(&key, None).await.unwrap();
    gw.pair(&token).unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let first = gw.gateway_id().unwrap();
    // Revoked, then paired again with a new token (--force): a new identity connects.
    saas.ok("POST", &format!("/v1/gateways/{first}/revoke"), &key, None)
        .await
        .unwrap();
    gw.wait_tunnel("revoked", Duration::from_secs(5))
        .await
        .unwrap();
    let (_, token2) = saas.token(&key, None).await.unwrap();
    let (ok, _, err) = gw.pcgctl(&["pair", &token2]);
    assert!(
        ok,
        "pairing a revoked gateway again needs no --force: {err}"
    );
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let second = gw.gateway_id().unwrap();
    assert_ne!(first, second);
    let id = saas
        .submit(&key, &second, "gateway.diagnose", json!({}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(v["result"]["output"]["gateway_id"], second.as_str());
}

/// `pcgctl status` exits 0 connected, 2 unpaired, 3 paired but down (or the daemon stopped),
/// 4 revoked, so scripts can trust it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes_say_what_is_wrong() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    assert_eq!(gw.pcgctl_code(&["status"]).0, Some(2), "unpaired");
    let (_, token) = saas.token(&key, None).await.unwrap();
    gw.pair(&token).unwrap();
    assert_eq!(
        gw.pcgctl_code(&["status"]).0,
        Some(3),
        "paired, daemon stopped"
    );
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let (code, out, _) = gw.pcgctl_code(&["status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let id = gw.gateway_id().unwrap();
    saas.ok("POST", &format!("/v1/gateways/{id}/revoke"), &key, None)
        .await
        .unwrap();
    gw.wait_tunnel("revoked", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(gw.pcgctl_code(&["status"]).0, Some(4), "revoked");
    // Completions for the usual shells, and help with examples.
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, _) = gw.pcgctl_code(&["completions", shell]);
        assert_eq!(code, Some(0));
        assert!(
            out.contains("pcgctl") && out.contains("proxy"),
            "{shell}: {out}"
        );
    }
    let (code, help, _) = gw.pcgctl_code(&["status", "--help"]);
    assert_eq!(code, Some(0));
    assert!(
        help.contains("Examples:") && help.contains("Exit status"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_given_several_brokers_reach_one_that_answers() {
    let dir = pcg_e2e::test_dir();
    // Two broker URLs at pairing: a port nothing listens on, and the SaaS's own port.
    let free = || std::net::SocketAddr::from(([127, 0, 0, 1], pcg_e2e::free_port()));
    let (dead, api) = (free(), free());
    let live = format!("https://{api}");
    let saas = Saas::start(
        &dir.path().join("saas"),
        SaasOptions {
            api_listen: Some(api),
            extra_toml: format!("public_broker_urls = [\"https://{dead}\", \"{live}\"]\n"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let mut gws = Vec::new();
    for i in 0..3 {
        let (_, token) = saas.token(&key, None).await.unwrap();
        gws.push(Gw::paired_and_started(&dir.path().join(format!("gw{i}")), "", &token).unwrap());
    }
    // Whichever URL each picked first, each ends up on the one that answers.
    for gw in &gws {
        let st = gw
            .wait_tunnel("connected", Duration::from_secs(90))
            .await
            .unwrap();
        assert_eq!(st["tunnel"]["broker_endpoint"], live.as_str(), "{st}");
    }
    let id = gws[0].gateway_id().unwrap();
    let c = saas
        .submit(&key, &id, "gateway.echo", json!({"x": 1}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &c, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
}
