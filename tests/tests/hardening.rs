//! Hardening, through the real binaries: a SaaS stopped under load, a gateway re-paired while
//! running, lookups that must leave nothing behind, errors in the documented format, oversized
//! bodies, idempotent submits, bounded names, refused tunnels recorded as events, and pcgctl on
//! a closed pipe.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pcg_e2e::{wait_for, Gw, Saas, SaasOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// SIGTERM of pcg-saas with 10 connected gateways and commands in flight: it exits within
/// 10 s, the gateways reconnect to the restarted SaaS, and every accepted command runs exactly
/// once. Clients submit with an Idempotency-Key and retry through the outage with the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_tunnels_up_loses_and_repeats_nothing() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(
        &dir.path().join("saas"),
        SaasOptions {
            heartbeat_ms: Some(1000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    let mut gws = Vec::new();
    for i in 0..10 {
        let (_, token) = saas.token(&key, None).await.unwrap();
        let mut gw = Gw::new(&dir.path().join(format!("gw{i}"))).unwrap();
        gw.pair(&token).unwrap();
        gw.start().unwrap();
        gws.push(gw);
    }
    let mut ids = Vec::new();
    for gw in &gws {
        gw.wait_tunnel("connected", Duration::from_secs(60))
            .await
            .unwrap();
        ids.push(gw.gateway_id().unwrap());
    }
    let ids = Arc::new(ids);
    let (api, http) = (saas.api.clone(), saas.http.clone());
    let submitted = Arc::new(AtomicUsize::new(0));
    const TOTAL: usize = 400;
    // Eight clients submit TOTAL ledger commands round-robin over the gateways, each with its
    // own Idempotency-Key, retrying (same key) until they get an answer.
    let mut clients = Vec::new();
    for c in 0..8usize {
        let (api, http, key, ids, submitted) = (
            api.clone(),
            http.clone(),
            key.clone(),
            ids.clone(),
            submitted.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut got: Vec<(String, String, String)> = Vec::new(); // (idem key, command id, gw)
            let mut n = c;
            while n < TOTAL {
                let gw = &ids[n % ids.len()];
                let idem = format!("client{c}-cmd{n}");
                let deadline = Instant::now() + Duration::from_secs(120);
                let id = loop {
                    let r = http
                        .post(format!("{api}/v1/gateways/{gw}/commands"))
                        .bearer_auth(&key)
                        .header("Idempotency-Key", &idem)
                        .json(&json!({"kind": "gateway.ledger", "payload": {"n": n}}))
                        .send()
                        .await;
                    if let Ok(resp) = r {
                        if resp.status().as_u16() == 201 {
                            let v: Value = resp.json().await.unwrap();
                            break v["id"].as_str().unwrap().to_string();
                        }
                    }
                    assert!(Instant::now() < deadline, "{idem}: no answer in 120 s");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                submitted.fetch_add(1, Ordering::Relaxed);
                got.push((idem, id, gw.clone()));
                n += 8;
            }
            got
        }));
    }
    wait_for(
        "a quarter of the commands",
        Duration::from_secs(60),
        || async { (submitted.load(Ordering::Relaxed) >= TOTAL / 4).then_some(()) },
    )
    .await
    .unwrap();
    let (saas, stopped) = saas.restart(Duration::from_secs(10)).await.unwrap();
    let (took, status) = stopped.expect("pcg-saas exits within 10 s of SIGTERM");
    assert!(status.success(), "pcg-saas exit status {status:?}");
    eprintln!(
        "pcg-saas stopped {took:?} after SIGTERM with {} commands submitted",
        submitted.load(Ordering::Relaxed)
    );
    assert!(
        saas.log().is_empty() || !saas.log().contains("panicked"),
        "{}",
        saas.log()
    );
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    assert_eq!(all.len(), TOTAL);
    let distinct: HashSet<&String> = all.iter().map(|(_, id, _)| id).collect();
    assert_eq!(
        distinct.len(),
        TOTAL,
        "two idempotency keys got one command"
    );
    for (_, id, _) in &all {
        let v = saas
            .wait_command(&key, id, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(v["state"], "succeeded", "{v}");
    }
    // Exactly once, counted at the side effect.
    let mut lines: HashMap<String, usize> = HashMap::new();
    for gw in &gws {
        for id in gw.ledger_ids() {
            *lines.entry(id).or_default() += 1;
        }
    }
    for (_, id, _) in &all {
        assert_eq!(
            lines.get(id),
            Some(&1),
            "command {id} ran {:?} times",
            lines.get(id)
        );
    }
    assert_eq!(
        lines.len(),
        TOTAL,
        "the ledgers hold commands nobody accepted"
    );
    // Every gateway came back to the restarted SaaS.
    for gw in &gws {
        let st = gw
            .wait_tunnel("connected", Duration::from_secs(60))
            .await
            .unwrap();
        assert!(st["tunnel"]["connects"].as_u64().unwrap() >= 2, "{st}");
    }
}

/// `pcgctl pair --force` against a running, connected daemon: the tunnel follows the new
/// identity at once; the old identity executes nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairing_a_running_gateway_moves_its_tunnel_at_once() {
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, old_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let (ok, out, err) = gw.pcgctl(&["pair", "--force", &token]);
    assert!(ok, "{out}{err}");
    let new_id = gw.gateway_id().unwrap();
    assert_ne!(new_id, old_id);
    let gw_view = |id: String| {
        let (saas, key) = (&saas, &key);
        async move {
            saas.ok("GET", &format!("/v1/gateways/{id}"), key, None)
                .await
                .unwrap()
        }
    };
    wait_for(
        "the new identity connected and the old one gone",
        Duration::from_secs(30),
        || async {
            let (n, o) = (gw_view(new_id.clone()).await, gw_view(old_id.clone()).await);
            (n["connected"] == true && o["connected"] == false).then_some(())
        },
    )
    .await
    .unwrap();
    let st = gw.status().unwrap();
    assert_eq!(st["tunnel"]["gateway_id"], new_id.as_str(), "{st}");
    assert_eq!(st["tunnel"]["state"], "connected", "{st}");
    // Commands to the new identity run; one to the old identity stays queued.
    let stale = saas
        .submit(&key, &old_id, "gateway.ledger", json!({"to": "old"}))
        .await
        .unwrap();
    let fresh = saas
        .submit(&key, &new_id, "gateway.ledger", json!({"to": "new"}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &fresh, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let v = saas
        .ok(
            "GET",
            &format!("/v1/commands/{stale}?wait_seconds=2"),
            &key,
            None,
        )
        .await
        .unwrap();
    assert_eq!(v["state"], "queued", "{v}");
    let ledger = gw.ledger_ids();
    assert!(
        ledger.contains(&fresh) && !ledger.contains(&stale),
        "{ledger:?}"
    );
}

/// Looking up unknown, foreign, malformed and finished command ids (with and without a wait)
/// leaves nothing behind: RSS after 10,000 lookups stays within 5 MB of before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_lookups_leave_nothing_behind() {
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let done = saas
        .submit(&key, &gw_id, "gateway.echo", json!({}))
        .await
        .unwrap();
    saas.wait_command(&key, &done, Duration::from_secs(30))
        .await
        .unwrap();
    let (_, other_key) = saas.tenant("other").await.unwrap();
    let saas = Arc::new(saas);
    let lookups = |n: usize| {
        let (saas, key, other_key, done) =
            (saas.clone(), key.clone(), other_key.clone(), done.clone());
        async move {
            use futures_util::stream::{self, StreamExt};
            stream::iter(0..n)
                .map(|i| {
                    let (saas, key, other_key, done) =
                        (saas.clone(), key.clone(), other_key.clone(), done.clone());
                    async move {
                        let long: String = (0..8000).map(|_| 'a').collect::<String>()
                            + &format!("{i}{}", rand::random::<u64>());
                        let plausible = format!("cmd_{:024x}", rand::random::<u128>());
                        let (path, k, expect) = match i % 5 {
                            0 => (format!("/v1/commands/{long}?wait_seconds=1"), &key, 404),
                            1 => (
                                format!("/v1/commands/{plausible}?wait_seconds=1"),
                                &key,
                                404,
                            ),
                            2 => (format!("/v1/commands/{plausible}"), &key, 404),
                            3 => (format!("/v1/commands/{done}?wait_seconds=5"), &key, 200),
                            _ => (
                                format!("/v1/commands/{done}?wait_seconds=1"),
                                &other_key,
                                404,
                            ),
                        };
                        let (s, v) = saas.call("GET", &path, k, None).await.unwrap();
                        assert_eq!(s, expect, "{path}: {v}");
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<()>>()
                .await;
        }
    };
    lookups(2_000).await; // warm up the allocator and the connection pool
    let before = saas.proc.rss_kib();
    lookups(10_000).await;
    let after = saas.proc.rss_kib();
    eprintln!("pcg-saas RSS {before} KiB before, {after} KiB after 10,000 lookups");
    assert!(
        after <= before + 5 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

/// Every error answer of the real service is the documented JSON: malformed query values, a
/// non-UTF-8 id, a wrong method, unknown paths, and bodies over the limit (refused before
/// they are read when their length is declared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_the_documented_format() {
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("GET", "/v1/commands?limit=abc".into(), 400, "invalid_query"),
        (
            "GET",
            "/v1/commands/x?wait_seconds=soon".into(),
            400,
            "invalid_query",
        ),
        ("GET", "/v1/events?since=-3".into(), 400, "invalid_query"),
        ("GET", "/v1/commands/%FF%FE".into(), 400, "invalid_path"),
        ("PUT", "/v1/commands".into(), 405, "method_not_allowed"),
        ("DELETE", "/v1/gateways".into(), 405, "method_not_allowed"),
        ("GET", "/v2/nothing".into(), 404, "not_found"),
    ];
    for (m, path, status, code) in cases {
        let (s, h, v) = saas.call_with(m, &path, &key, &[], None).await.unwrap();
        assert_eq!(s, status, "{m} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{m} {path}: {v}");
        assert!(
            h.get("content-type")
                .and_then(|c| c.to_str().ok())
                .is_some_and(|c| c.starts_with("application/json")),
            "{m} {path}: {h:?}"
        );
    }
    // A streamed body (no declared length) over the limit: 413, not a 400 about JSON. Over
    // HTTP/2, where an answer before the end of the upload is clean.
    let ca = std::fs::read(saas.dir.join("data/ca.pem")).unwrap();
    let mut tls = pcg_e2e::client_tls(&ca);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let h2 = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let chunks = (0..48).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]));
    let resp = h2
        .post(format!("{}/v1/gateways/{gw_id}/commands", saas.api))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "body_too_large", "{v}");
    // A payload under the body limit but over max_payload_bytes: 413 with the limit named.
    let over = json!({"kind": "gateway.echo", "payload": {"x": "y".repeat(270_000)}});
    let (s, v) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{gw_id}/commands"),
            &key,
            Some(over),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    // A declared length over the limit is answered before any body byte is sent.
    let mut tls = raw_tls(&saas).await;
    tls.write_all(
        format!(
            "POST /v1/gateways/{gw_id}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_some(&mut tls, Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}

/// A TLS connection to the REST API trusting the SaaS CA.
async fn raw_tls(saas: &Saas) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let ca = std::fs::read(saas.dir.join("data/ca.pem")).unwrap();
    let mut cfg = pcg_e2e::client_tls(&ca);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(saas.api_listen)
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Reads until the peer closes, the bound passes, or a response head and some body arrived.
async fn read_some<S: tokio::io::AsyncRead + Unpin>(s: &mut S, bound: Duration) -> String {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf);
        if text.contains("\r\n\r\n") && text.contains('}') {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Idempotency-Key: the same key and body return the first command (executed once); the same
/// key with another body is refused with 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_make_retries_safe() {
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let path = format!("/v1/gateways/{gw_id}/commands");
    let body = json!({"kind": "gateway.ledger", "payload": {"vm": "web-1"}});
    let idem = [("Idempotency-Key", "3f1c2a9e-create-web-1")];
    let (s1, h1, v1) = saas
        .call_with("POST", &path, &key, &idem, Some(body.clone()))
        .await
        .unwrap();
    assert_eq!(s1, 201, "{v1}");
    assert!(h1.get("idempotent-replayed").is_none());
    let (s2, h2, v2) = saas
        .call_with("POST", &path, &key, &idem, Some(body.clone()))
        .await
        .unwrap();
    assert_eq!(s2, 201, "{v2}");
    assert_eq!(v2["id"], v1["id"]);
    assert_eq!(h2.get("idempotent-replayed").unwrap(), "true");
    let other = json!({"kind": "gateway.ledger", "payload": {"vm": "web-2"}});
    let (s3, _, v3) = saas
        .call_with("POST", &path, &key, &idem, Some(other))
        .await
        .unwrap();
    assert_eq!(
        (s3, v3["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{v3}"
    );
    // Another tenant's identical key is its own.
    let id = v1["id"].as_str().unwrap();
    saas.wait_command(&key, id, Duration::from_secs(30))
        .await
        .unwrap();
    let (s4, _, v4) = saas
        .call_with(
            "POST",
            &path,
            &key,
            &[("Idempotency-Key", "")],
            Some(body.clone()),
        )
        .await
        .unwrap();
    assert_eq!(
        (s4, v4["error"]["code"].as_str()),
        (400, Some("invalid_idempotency_key")),
        "{v4}"
    );
    assert_eq!(
        gw.ledger_ids().iter().filter(|l| *l == id).count(),
        1,
        "the retried create ran twice"
    );
    // Ten concurrent retries of a new key: one command.
    let idem2 = [("Idempotency-Key", "concurrent-1")];
    let answers = futures_util::future::join_all(
        (0..10).map(|_| saas.call_with("POST", &path, &key, &idem2, Some(body.clone()))),
    )
    .await;
    let ids: HashSet<String> = answers
        .into_iter()
        .map(|r| {
            let (s, _, v) = r.unwrap();
            assert!(s == 201 || s == 409, "{s} {v}");
            v["id"].as_str().unwrap_or_default().to_string()
        })
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

/// Names are bounded and free of control characters, and what a client sends is escaped in
/// logs and events so it cannot forge lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_strings_are_bounded_and_escaped() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("acme").await.unwrap();
    for (path, body) in [
        ("/v1/api-keys", json!({"name": "n".repeat(10_000)})),
        ("/v1/api-keys", json!({"name": "a\nb"})),
        ("/v1/pairing-tokens", json!({"name": "x".repeat(129)})),
        ("/v1/pairing-tokens", json!({"name": "tab\there"})),
    ] {
        let (s, v) = saas.call("POST", path, &key, Some(body)).await.unwrap();
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("invalid_name")),
            "{path} {v}"
        );
    }
    let (s, v) = saas
        .call(
            "POST",
            "/v1/tenants",
            &saas.operator_key,
            Some(json!({"name": "x".repeat(200)})),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    // A pairing request whose hostname would forge a log line is refused before anything
    // reaches the store or the log.
    let (tok_id, _) = saas.token(&key, None).await.unwrap();
    let (s, v) = saas
        .call(
            "POST",
            "/v1/pair",
            "",
            Some(json!({
                "token_id": tok_id, "secret": "wrong", "csr_pem": "x",
                "hostname": "evil\nINFO forged log line", "gateway_version": "1"
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{v}"
    );
    // A plausible hostname with a wrong secret is refused and recorded, quoted.
    let (s, _) = saas
        .call(
            "POST",
            "/v1/pair",
            "",
            Some(json!({
                "token_id": tok_id, "secret": "wrong", "csr_pem": "x",
                "hostname": "rack-7 \"b\"", "gateway_version": "1"
            })),
        )
        .await
        .unwrap();
    assert_eq!(s, 401);
    let evs = saas.ok("GET", "/v1/events", &key, None).await.unwrap();
    let refused: Vec<&str> = evs
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "pairing.refused")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(refused.len(), 1, "{evs}");
    assert!(refused[0].contains(r#"rack-7 \"b\""#), "{}", refused[0]);
    let log = saas.log();
    assert!(
        !log.lines().any(|l| l.starts_with("INFO forged")),
        "a client forged a log line:\n{log}"
    );
}

/// A gateway the SaaS does not know (a SaaS restored without its store, same CA) is refused,
/// and the refusal is an event the operator sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tunnels_are_events() {
    let dir = pcg_e2e::test_dir();
    let (saas, gw, _key, gw_id) = pcg_e2e::paired(
        dir.path(),
        SaasOptions {
            heartbeat_ms: Some(300),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A new SaaS with the same CA and addresses but an empty store.
    let (api, broker) = (saas.api_listen, saas.broker_listen);
    let old_data = saas.dir.join("data");
    let mut saas = saas;
    saas.proc.stop();
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(fresh.join("data")).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(old_data.join(f), fresh.join("data").join(f)).unwrap();
    }
    let fresh = Saas::start(
        &fresh,
        SaasOptions {
            heartbeat_ms: Some(300),
            api_listen: Some(api),
            broker_listen: (broker != api).then_some(broker),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    gw.wait_tunnel("revoked", Duration::from_secs(60))
        .await
        .unwrap();
    let evs = fresh
        .ok("GET", "/v1/events", &fresh.operator_key, None)
        .await
        .unwrap();
    let hit = evs
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "tunnel.refused" && e["gateway_id"] == gw_id.as_str());
    assert!(hit, "no tunnel.refused event for {gw_id}: {evs}");
}

/// Batch submit: many commands in one request and one durable write; each item answers on its
/// own; idempotency keys make the whole batch safe to resend; every command runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_submits_many_commands_each_exactly_once() {
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let mut items: Vec<Value> = (0..500)
        .map(|i| {
            json!({"gateway_id": gw_id, "kind": "gateway.ledger",
                   "payload": {"n": i}, "idempotency_key": format!("batch-{i}")})
        })
        .collect();
    items.push(json!({"gateway_id": gw_id, "kind": "Not A Kind"}));
    items.push(json!({"gateway_id": "gw_nope", "kind": "gateway.echo"}));
    let body = json!({ "commands": items });
    let first = saas
        .ok("POST", "/v1/commands/batch", &key, Some(body.clone()))
        .await
        .unwrap();
    let results = first["results"].as_array().unwrap();
    assert_eq!(results.len(), 502);
    assert_eq!(results[500]["status"], 400, "{}", results[500]);
    assert_eq!(results[500]["error"]["code"], "invalid_kind");
    assert_eq!(results[501]["status"], 404, "{}", results[501]);
    let ids: Vec<String> = results[..500]
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 201, "{r}");
            r["command"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Sent again (a client that lost the answer): the same commands, nothing new.
    let again = saas
        .ok("POST", "/v1/commands/batch", &key, Some(body))
        .await
        .unwrap();
    for (i, r) in again["results"].as_array().unwrap()[..500]
        .iter()
        .enumerate()
    {
        assert_eq!(r["replayed"], true, "{r}");
        assert_eq!(r["command"]["id"], ids[i].as_str());
    }
    for id in &ids {
        let v = saas
            .wait_command(&key, id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(v["state"], "succeeded", "{v}");
    }
    let ledger = gw.ledger_ids();
    assert_eq!(ledger.len(), 500);
    assert_eq!(ledger.iter().collect::<HashSet<_>>().len(), 500);
    // Over the limit of one batch: refused as a whole, nothing stored.
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"gateway_id": gw_id, "kind": "gateway.echo"}))
        .collect();
    let (s, v) = saas
        .call(
            "POST",
            "/v1/commands/batch",
            &key,
            Some(json!({ "commands": too_many })),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("batch_too_large")),
        "{v}"
    );
}

/// `pcgctl status | head -0`: a reader that has gone away is not an error for pcgctl (no
/// panic on the closed pipe), for the human and the JSON output alike.
#[test]
fn pcgctl_writing_to_a_closed_pipe_does_not_panic() {
    let dir = pcg_e2e::test_dir();
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    for args in [&["status"][..], &["status", "--json"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        // Closed before pcgctl starts: its first write meets a broken pipe, deterministically.
        drop(reader);
        let out = std::process::Command::new(pcg_e2e::bin("pcgctl"))
            .arg("--config")
            .arg(gw.config())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "pcgctl {args:?}: {err}");
        // Not paired: status's own exit code, not a crash (101).
        assert_eq!(out.status.code(), Some(2), "pcgctl {args:?}: {err}");
    }
}

/// A burst larger than both tunnel queues (the broker's 4,096 frames, the gateway's 1,024):
/// 20,000 commands in batches of 1,000, eight batches in flight, to one gateway. Every command
/// runs once, and the tunnel stays up throughout: acknowledgements and results wait for room
/// behind the burst instead of being dropped (the broker used to close the tunnel when a
/// result's acknowledgement found its queue full, and the gateway left a result that found its
/// queue full for the next heartbeat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_tunnel_queues_keeps_the_tunnel() {
    const N: usize = 20_000;
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, gw_id) = pcg_e2e::paired(
        dir.path(),
        // Heartbeats as in production, not the suite's 500 ms: the test is about the queues,
        // and a busy machine can starve a debug-built gateway of CPU for more than the 1.5 s
        // of silence a 500 ms interval tolerates.
        SaasOptions {
            heartbeat_ms: Some(5000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let connects = |s: &Value| s["tunnel"]["connects"].as_u64().unwrap_or(0);
    let before = connects(&gw.status().unwrap());
    let batches: Vec<Value> = (0..N)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|c| {
            let items: Vec<Value> = c
                .iter()
                .map(
                    |i| json!({"gateway_id": gw_id, "kind": "gateway.ledger", "payload": {"n": i}}),
                )
                .collect();
            json!({ "commands": items })
        })
        .collect();
    let saas = Arc::new(saas);
    let answers: Vec<_> = futures_util::stream::iter(batches)
        .map(|body| {
            let (saas, key) = (saas.clone(), key.clone());
            async move {
                saas.ok("POST", "/v1/commands/batch", &key, Some(body))
                    .await
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for a in answers {
        let v = a.unwrap();
        assert!(
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["status"] == 201),
            "a batch item was refused"
        );
    }
    wait_for(
        "every command of the burst done",
        Duration::from_secs(240),
        || async {
            let v = saas
                .ok("GET", &format!("/v1/gateways/{gw_id}"), &key, None)
                .await
                .ok()?;
            (v["pending_commands"] == 0).then_some(())
        },
    )
    .await
    .unwrap();
    let ledger = gw.ledger_ids();
    assert_eq!(ledger.len(), N, "each command ran once");
    assert_eq!(ledger.iter().collect::<HashSet<_>>().len(), N);
    let after = gw.status().unwrap();
    assert_eq!(
        connects(&after),
        before,
        "the tunnel was redialled during the burst: {after}\ngateway log:\n{}",
        gw.log()
    );
}
