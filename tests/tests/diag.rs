//! `pcgctl diag` against real faults, one test each, made real on this machine: wrong DNS for
//! the SaaS host (a network namespace with its own hosts file and resolver), the broker port
//! blocked (nftables drop in a namespace), a TLS-intercepting proxy (squid ssl_bump), wrong
//! proxy credentials (squid Basic auth), clock skew (the daemon under libfaketime), an expired
//! gateway certificate, a SaaS CA that no longer matches the pin (the SaaS restarted with a new
//! CA), a vCenter thumbprint mismatch (vcsim behind a relay that switches to another vcsim), a
//! wrong BMC password (changed on ipmi_sim with ipmitool) and a full disk under the data
//! directory (a tmpfs). Each asserts that diag names that hop as failed, with an action, and no
//! other hop as failed; most first run diag on the healthy setup as a control. Plus: every check
//! passing in the daemon and in pcgctl without disturbing the live tunnel, and the broker
//! refusing a gateway revoked at the SaaS.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use pcg_e2e::netns;
use pcg_e2e::peers::{IpmiSim, IPMI_PASSWORD, IPMI_USER};
use pcg_e2e::squid::{Kind, Squid};
use pcg_e2e::vcsim::Vcsim;
use pcg_e2e::{Gw, Saas, SaasOptions, Tmpfs};
use serde_json::{json, Value};

fn checks(r: &Value) -> &Vec<Value> {
    r["checks"].as_array().expect("checks")
}

fn pretty(r: &Value) -> String {
    serde_json::to_string_pretty(r).unwrap()
}

/// The check of `hop` whose target contains `target`.
fn find<'a>(r: &'a Value, hop: &str, target: &str) -> &'a Value {
    checks(r)
        .iter()
        .find(|c| c["hop"] == hop && c["target"].as_str().unwrap().contains(target))
        .unwrap_or_else(|| panic!("no {hop} check for {target}:\n{}", pretty(r)))
}

/// Every check passed (exit 0).
fn assert_all_ok(code: Option<i32>, r: &Value) {
    let bad: Vec<&Value> = checks(r).iter().filter(|c| c["status"] != "ok").collect();
    assert!(bad.is_empty(), "not all ok: {bad:#?}\n{}", pretty(r));
    assert_eq!(code, Some(0), "{}", pretty(r));
}

/// The checks of `hop` on `target` failed — each with an action and every one of `words` in its
/// detail — and no other check failed (exit 2). Returns the failed check.
fn assert_only_failure<'a>(
    code: Option<i32>,
    r: &'a Value,
    hop: &str,
    target: &str,
    words: &[&str],
) -> &'a Value {
    eprintln!("{}", pretty(r));
    let failed: Vec<&Value> = checks(r).iter().filter(|c| c["status"] == "fail").collect();
    assert!(!failed.is_empty(), "nothing failed:\n{}", pretty(r));
    for c in &failed {
        assert!(
            c["hop"] == hop && c["target"].as_str().unwrap().contains(target),
            "another hop failed too ({} {}), expected only {hop} {target}:\n{}",
            c["hop"],
            c["target"],
            pretty(r)
        );
        let action = c["action"].as_str().unwrap_or_default();
        assert!(action.len() > 10, "no action: {c}");
        for w in words {
            assert!(
                c["detail"].as_str().unwrap().contains(w),
                "{w:?} not in the detail: {c}"
            );
        }
    }
    assert_eq!(code, Some(2), "{}", pretty(r));
    failed[0]
}

fn assert_skipped(r: &Value, hops: &[&str]) {
    for h in hops {
        let c = checks(r)
            .iter()
            .find(|c| c["hop"] == *h)
            .unwrap_or_else(|| panic!("no {h} check:\n{}", pretty(r)));
        assert_eq!(c["status"], "skipped", "{h}:\n{}", pretty(r));
    }
}

async fn saas_and_token(dir: &Path, opts: SaasOptions) -> (Saas, String, String) {
    let saas = Saas::start(&dir.join("saas"), opts).await.unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    (saas, key, token)
}

fn none() -> Vec<String> {
    Vec::new()
}

async fn run_command(saas: &Saas, key: &str, gw_id: &str, kind: &str, payload: Value) -> Value {
    let id = saas.submit(key, gw_id, kind, payload).await.unwrap();
    let v = saas
        .wait_command(key, &id, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{kind}: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_in_the_daemon_and_in_pcgctl_and_the_tunnel_stays() {
    let Some(vcsim) = Vcsim::start(&[]) else {
        return;
    };
    let Some(bmc) = IpmiSim::start() else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    // Not paired yet: the identity fails and says how to pair; the SaaS path is skipped.
    let (code, r) = gw.diag(&none(), &[]);
    assert_only_failure(code, &r, "identity", "", &["not paired"]);
    assert!(find(&r, "identity", "")["action"]
        .as_str()
        .unwrap()
        .contains("pcgctl pair"));
    assert_skipped(&r, &["dns"]);

    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();
    run_command(
        &saas,
        &key,
        &gw_id,
        "vsphere.enrol",
        json!({"name": "lab", "endpoint": vcsim.endpoint()}),
    )
    .await;
    run_command(
        &saas,
        &key,
        &gw_id,
        "baremetal.enrol",
        json!({"name": "rack1", "protocol": "ipmi", "endpoint": {
            "address": format!("127.0.0.1:{}", bmc.port), "user": IPMI_USER, "password": IPMI_PASSWORD}}),
    )
    .await;

    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);
    assert_eq!(r["ran_in"], "daemon");
    for hop in [
        "store", "identity", "dns", "tcp", "tls", "clock", "broker", "vcenter", "bmc",
    ] {
        assert!(
            checks(&r).iter().any(|c| c["hop"] == hop),
            "no {hop} check:\n{}",
            pretty(&r)
        );
    }
    let broker = find(&r, "broker", "https://");
    assert!(
        broker["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("gateway {gw_id}"))
            && broker["detail"].as_str().unwrap().contains("tunnel open"),
        "{broker}"
    );
    assert!(
        find(&r, "vcenter", "lab")["detail"]
            .as_str()
            .unwrap()
            .contains(&vcsim.thumbprint[..16]),
        "{}",
        pretty(&r)
    );
    // The human rendering: one line per check and the summary; exit 0.
    let (code, human, _) = gw.pcgctl_via(&none(), &["diag"]);
    eprintln!("{human}");
    assert_eq!(code, Some(0), "{human}");
    assert!(human.contains("result: 0 failures, 0 warnings"), "{human}");
    assert!(human.contains("  ok    broker"), "{human}");
    // Broker.Check left the tunnel alone: still the first one, and commands still run.
    let st = gw.status().unwrap();
    assert_eq!(st["tunnel"]["state"], "connected", "{st}");
    assert_eq!(
        st["tunnel"]["connects"], 1,
        "diag replaced the tunnel: {st}"
    );
    run_command(
        &saas,
        &key,
        &gw_id,
        "gateway.echo",
        json!({"after": "diag"}),
    )
    .await;
    let events = saas
        .ok("GET", &format!("/v1/events?gateway_id={gw_id}"), &key, None)
        .await
        .unwrap();
    let connects = events
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["kind"] == "gateway.connected")
                .count()
        })
        .unwrap_or_default();
    assert_eq!(connects, 1, "{events}");

    // With the daemon stopped, pcgctl runs the same checks on the store itself.
    gw.proc.as_mut().unwrap().stop();
    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);
    assert_eq!(r["ran_in"], "pcgctl");
    assert!(find(&r, "broker", "https://")["detail"]
        .as_str()
        .unwrap()
        .contains("tunnel not open"));

    // Revoked at the SaaS: the broker refuses the certificate, and only that check fails (the
    // gateway itself has not heard of it). A refused check is not a refused tunnel event.
    saas.ok("POST", &format!("/v1/gateways/{gw_id}/revoke"), &key, None)
        .await
        .unwrap();
    let (code, r) = gw.diag(&none(), &[]);
    let c = assert_only_failure(
        code,
        &r,
        "broker",
        "https://",
        &["refused this gateway", "revoked"],
    );
    assert!(c["action"].as_str().unwrap().contains("pair again"), "{c}");
    let events = saas
        .ok("GET", &format!("/v1/events?gateway_id={gw_id}"), &key, None)
        .await
        .unwrap();
    assert!(!events.to_string().contains("tunnel.refused"), "{events}");
}

/// Fault 1: the SaaS host no longer resolves (the namespace's hosts file loses it and its
/// resolver does not answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_wrong_dns_for_the_saas_host() {
    let Some(ns) = netns::for_test("the wrong-DNS fault") else {
        return;
    };
    let host = "saas.pcg-diag.test";
    let port = std::net::TcpListener::bind((ns.outer, 0))
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let dir = pcg_e2e::test_dir();
    let opts = SaasOptions {
        api_listen: Some((ns.outer, port).into()),
        extra_toml: format!("public_api_url = \"https://{host}:{port}\"\n"),
        ..Default::default()
    };
    let mut saas = Saas::start(&dir.path().join("saas"), opts).await.unwrap();
    // The test itself talks to the SaaS by address.
    saas.api = format!("https://{}", saas.api_listen);
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    ns.set_etc(
        "hosts",
        &format!("127.0.0.1 localhost\n{} {host}\n", ns.outer),
    )
    .unwrap();
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    let (code, out, err) = gw.pcgctl_via(&ns.prefix(), &["pair", &token]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, r) = gw.diag(&ns.prefix(), &[]);
    assert_all_ok(code, &r);
    assert!(find(&r, "dns", host)["detail"]
        .as_str()
        .unwrap()
        .contains(&ns.outer.to_string()));

    ns.set_etc("hosts", "127.0.0.1 localhost\n").unwrap();
    ns.set_etc(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let (code, r) = gw.diag(&ns.prefix(), &["--check-timeout", "5"]);
    let c = assert_only_failure(
        code,
        &r,
        "dns",
        host,
        &["cannot resolve saas.pcg-diag.test"],
    );
    assert!(c["action"].as_str().unwrap().contains("resolv.conf"), "{c}");
    assert_skipped(&r, &["tcp", "tls", "clock", "broker"]);
    assert_eq!(find(&r, "identity", "")["status"], "ok");
}

/// Fault 2: a firewall drops packets to the broker's port (the SaaS runs the broker on a port
/// of its own); the API port still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_port_blocked() {
    let Some(ns) = netns::for_test("the blocked-broker-port fault") else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let opts = SaasOptions {
        api_listen: Some((ns.outer, 0).into()),
        broker_listen: Some((ns.outer, 0).into()),
        ..Default::default()
    };
    let (saas, _key, token) = saas_and_token(dir.path(), opts).await;
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    let (code, r) = gw.diag(&ns.prefix(), &[]);
    assert_all_ok(code, &r);

    let bport = saas.broker_listen.port();
    ns.block_tcp(ns.outer, bport).unwrap();
    let (code, r) = gw.diag(&ns.prefix(), &["--check-timeout", "3"]);
    let broker_auth = format!("{}:{bport}", ns.outer);
    // Bounded by the check's own timeout (its connect step gets nine tenths of it).
    assert_only_failure(code, &r, "tcp", &broker_auth, &["no answer within 2.7s"]);
    assert_eq!(find(&r, "broker", &broker_auth)["status"], "skipped");
    assert_eq!(find(&r, "tls", &broker_auth)["status"], "skipped");
    let api_auth = saas.api_listen.to_string();
    assert_eq!(find(&r, "tcp", &api_auth)["status"], "ok");
    assert_eq!(find(&r, "tls", &api_auth)["status"], "ok");
    assert_eq!(find(&r, "clock", &api_auth)["status"], "ok");
}

/// Fault 3: a TLS-inspecting proxy (squid ssl_bump) on the way; its CA is given as proxy_ca,
/// so the tunnel runs over the WebSocket transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_tls_intercepting_proxy() {
    let dir = pcg_e2e::test_dir();
    let (saas, _key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let Some(squid) = Squid::start(Kind::Bump {
        origin_ca: saas.dir.join("data/ca.pem"),
        upgrades: true,
    }) else {
        return;
    };
    let proxy_ca = squid.ca_pem.clone().unwrap();
    let proxy_ca_sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(pcg_e2e::pem_der(
            &std::fs::read(&proxy_ca).unwrap(),
        )))
    };
    let mut gw = Gw::with_config(
        &dir.path().join("gw"),
        &format!("proxy = {:?}\nproxy_ca = {:?}", squid.url(None), proxy_ca),
    )
    .unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    let (code, r) = gw.diag(&none(), &[]);
    assert_eq!(r["ran_in"], "daemon");
    let c = assert_only_failure(
        code,
        &r,
        "tls",
        &saas.api_listen.to_string(),
        &["TLS intercepted by a proxy", &proxy_ca_sha],
    );
    assert!(
        c["action"]
            .as_str()
            .unwrap()
            .contains("exempt the SaaS host"),
        "{c}"
    );
    for hop in ["dns", "tcp", "websocket", "clock", "broker"] {
        assert_eq!(find(&r, hop, "")["status"], "ok", "{hop}:\n{}", pretty(&r));
    }
    assert!(find(&r, "tcp", "")["detail"]
        .as_str()
        .unwrap()
        .contains("CONNECT"));
    // Configured for the WebSocket transport, the gateway does not use direct TLS: nothing
    // fails (pcgctl on the store, the daemon stopped).
    gw.proc.as_mut().unwrap().stop();
    gw.env
        .push(("PCG_GATEWAY_TRANSPORT".into(), "websocket".into()));
    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);
    assert_eq!(r["ran_in"], "pcgctl");
    assert!(
        !checks(&r).iter().any(|c| c["hop"] == "tls"),
        "{}",
        pretty(&r)
    );
    assert!(find(&r, "broker", "")["detail"]
        .as_str()
        .unwrap()
        .contains("over the WebSocket transport"));
}

/// Fault 4: the proxy's credentials are wrong (squid with Basic auth answers 407).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_wrong_proxy_credentials() {
    let password = "Pr0xy-diag-pw";
    let Some(squid) = Squid::start(Kind::Auth {
        user: "gw".into(),
        password: password.into(),
    }) else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (_saas, _key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    let (ok, _, e) = gw.pcgctl(&["proxy", "set", &squid.url(Some(("gw", password)))]);
    assert!(ok, "{e}");
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);

    let (ok, _, e) = gw.pcgctl(&["proxy", "set", &squid.url(Some(("gw", "wrong")))]);
    assert!(ok, "{e}");
    let (code, r) = gw.diag(&none(), &[]);
    let c = assert_only_failure(
        code,
        &r,
        "tcp",
        "",
        &["407", "refused the user and password"],
    );
    assert!(
        c["action"].as_str().unwrap().contains("pcgctl proxy set"),
        "{c}"
    );
    assert!(!pretty(&r).contains(password) && !pretty(&r).contains("wrong"));
    assert_skipped(&r, &["tls", "clock", "broker"]);
}

fn faketime() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/faketime");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
        "faketime missing and PCG_REQUIRE_PEERS is set: run scripts/peers/install-network.sh"
    );
    eprintln!("!!!!!!!! SKIPPED: faketime missing — run scripts/peers/install-network.sh !!!!!!!!");
    None
}

/// Fault 5: the gateway host's clock is two minutes ahead (the daemon runs under libfaketime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_clock_skew_over_the_threshold() {
    let Some(faketime) = faketime() else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (_saas, _key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    // Wall clock only: timers (the monotonic clock) stay true.
    gw.env = vec![("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into())];
    gw.start_via(&[faketime.display().to_string(), "-f".into(), "+120s".into()])
        .unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let (code, r) = gw.diag(&none(), &[]);
    assert_eq!(r["ran_in"], "daemon");
    let c = assert_only_failure(code, &r, "clock", "", &["ahead of the SaaS"]);
    let secs: f64 = c["detail"]
        .as_str()
        .unwrap()
        .split("clock is ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!((115.0..=125.0).contains(&secs), "{c}");
    assert!(c["action"]
        .as_str()
        .unwrap()
        .contains("time synchronisation"));
}

/// Fault 6: the gateway's certificate expired (the SaaS issues 3-second certificates here and
/// the daemon is not running to renew it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_expired_gateway_certificate() {
    let dir = pcg_e2e::test_dir();
    let opts = SaasOptions {
        extra_toml: "gateway_cert_lifetime_secs = 3\n".into(),
        ..Default::default()
    };
    let (_saas, _key, token) = saas_and_token(dir.path(), opts).await;
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    let not_after = gw.status().unwrap()["certificate_not_after_ms"]
        .as_i64()
        .unwrap();
    pcg_e2e::wait_for(
        "the certificate to expire",
        Duration::from_secs(30),
        || async { (pcg_e2e::now_ms() > not_after + 1000).then_some(()) },
    )
    .await
    .unwrap();
    let (code, r) = gw.diag(&none(), &[]);
    let c = assert_only_failure(code, &r, "identity", "", &["expired"]);
    assert!(
        c["action"]
            .as_str()
            .unwrap()
            .contains("pcgctl pair --force"),
        "{c}"
    );
    assert_eq!(
        find(&r, "broker", "")["status"],
        "skipped",
        "{}",
        pretty(&r)
    );
    for hop in ["dns", "tcp", "tls", "clock"] {
        assert_eq!(find(&r, hop, "")["status"], "ok", "{hop}:\n{}", pretty(&r));
    }
}

/// Fault 7: the SaaS now presents another CA than the one pinned at pairing (it was restarted
/// with a new CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_saas_ca_no_longer_matches_the_pin() {
    let dir = pcg_e2e::test_dir();
    let (mut saas, _key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);

    let listen = saas.api_listen;
    let sdir = saas.dir.clone();
    saas.proc.stop();
    drop(saas);
    std::fs::remove_file(sdir.join("data/ca.pem")).unwrap();
    std::fs::remove_file(sdir.join("data/ca.key")).unwrap();
    let saas = Saas::start(
        &sdir,
        SaasOptions {
            api_listen: Some(listen),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let new_ca = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(pcg_e2e::pem_der(
            &std::fs::read(saas.dir.join("data/ca.pem")).unwrap(),
        )))
    };
    let (code, r) = gw.diag(&none(), &[]);
    let c = assert_only_failure(
        code,
        &r,
        "tls",
        &listen.to_string(),
        &["not the SaaS CA pinned at pairing", &new_ca],
    );
    assert!(c["action"].as_str().unwrap().contains("pair again"), "{c}");
    assert_skipped(&r, &["clock", "broker"]);
    assert_eq!(find(&r, "identity", "")["status"], "ok");
}

/// Fault 8: the vCenter now presents another certificate than the one pinned at enrolment (a
/// relay that forwarded to one vcsim now forwards to another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_vcenter_thumbprint_mismatch() {
    let Some(first) = Vcsim::start(&[]) else {
        return;
    };
    let Some(second) = Vcsim::start(&[]) else {
        return;
    };
    let addr = |url: &str| -> std::net::SocketAddr {
        url.trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let relay = pcg_e2e::relay::Relay::bind().await.unwrap();
    relay.set_upstream(addr(&first.url));
    let dir = pcg_e2e::test_dir();
    let (saas, key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();
    let mut ep = first.endpoint();
    ep["url"] = json!(format!("https://{}/sdk", relay.addr));
    run_command(
        &saas,
        &key,
        &gw_id,
        "vsphere.enrol",
        json!({"name": "lab", "endpoint": ep}),
    )
    .await;
    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);

    relay.set_upstream(addr(&second.url));
    relay.cut_all();
    let (code, r) = gw.diag(&none(), &[]);
    let c = assert_only_failure(
        code,
        &r,
        "vcenter",
        "lab",
        &[&second.thumbprint, &first.thumbprint],
    );
    assert!(c["action"].as_str().unwrap().contains("pin_sha256"), "{c}");
}

/// Fault 9: the BMC's password was changed on the BMC (ipmitool on ipmi_sim) after enrolment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_wrong_bmc_password() {
    let Some(bmc) = IpmiSim::start() else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();
    run_command(
        &saas,
        &key,
        &gw_id,
        "baremetal.enrol",
        json!({"name": "rack1", "protocol": "ipmi", "endpoint": {
            "address": format!("127.0.0.1:{}", bmc.port), "user": IPMI_USER, "password": IPMI_PASSWORD}}),
    )
    .await;
    let (code, r) = gw.diag(&none(), &[]);
    assert_all_ok(code, &r);

    assert!(
        bmc.ipmitool(&["user", "set", "password", "2", "changed-on-the-bmc"])
            .is_some(),
        "ipmitool could not change the BMC password"
    );
    let (code, r) = gw.diag(&none(), &[]);
    let c = assert_only_failure(code, &r, "bmc", "rack1", &["rejected user"]);
    assert!(c["action"].as_str().unwrap().contains("password"), "{c}");
    assert!(!pretty(&r).contains(IPMI_PASSWORD));
}

/// Fault 10: the filesystem under the data directory is full (a 96 MiB tmpfs, filled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_full_disk_under_the_data_directory() {
    let dir = pcg_e2e::test_dir();
    let data = dir.path().join("gw/data");
    let Some(tmpfs) = Tmpfs::for_test(&data, "96m") else {
        return;
    };
    let (_saas, _key, token) = saas_and_token(dir.path(), SaasOptions::default()).await;
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    // Under 512 MiB free: a warning, nothing failed (exit 1).
    let (code, r) = gw.diag(&none(), &[]);
    assert_eq!(code, Some(1), "{}", pretty(&r));
    assert_eq!(find(&r, "store", "")["status"], "warn", "{}", pretty(&r));

    tmpfs.fill("filler");
    // The daemon holds the store: no room left is a failure; the path to the SaaS is fine.
    let (code, r) = gw.diag(&none(), &[]);
    assert_eq!(r["ran_in"], "daemon");
    let target = data.display().to_string();
    let c = assert_only_failure(code, &r, "store", &target, &["0 B free"]);
    assert!(c["action"].as_str().unwrap().contains("free space"), "{c}");
    for hop in ["identity", "dns", "tcp", "tls", "clock", "broker"] {
        assert_eq!(find(&r, hop, "")["status"], "ok", "{hop}:\n{}", pretty(&r));
    }
    // Stopped, the store cannot even be opened on the full disk: the store fails, and what
    // needs it is skipped.
    gw.proc.as_mut().unwrap().stop();
    let (code, r) = gw.diag(&none(), &[]);
    assert_eq!(r["ran_in"], "pcgctl");
    let c = assert_only_failure(code, &r, "store", &target, &["free"]);
    assert!(c["action"].as_str().unwrap().contains("free space"), "{c}");
    assert_skipped(&r, &["identity", "dns"]);
    drop(tmpfs);
}
