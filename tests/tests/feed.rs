//! A tenant's feed against a real pcg-saas and a real paired pcg-gateway: `GET /v1/feed`
//! (Server-Sent Events) and `pcg.feed.v1.Feed/Subscribe` (gRPC) carry every command submitted
//! and every result once, in order, across a disconnect and a SaaS restart; another tenant sees
//! none of it.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pcg_e2e::feed::{Item, Sse};
use pcg_e2e::{paired_with, test_dir, Saas, SaasOptions};
use pcg_proto::feed::v1 as pb;
use serde_json::{json, Value};

/// Submits `n` echo commands to `gw` in batches of 100; returns their ids.
async fn submit(saas: &Saas, key: &str, gw: &str, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in 0..n.div_ceil(100) {
        let items: Vec<Value> = (0..100.min(n - chunk * 100))
            .map(|i| {
                json!({"gateway_id": gw, "kind": "gateway.echo",
                       "payload": {"tag": format!("{tag}-{chunk}-{i}")}})
            })
            .collect();
        let r = saas
            .ok(
                "POST",
                "/v1/commands/batch",
                key,
                Some(json!({ "commands": items })),
            )
            .await
            .expect("batch");
        for o in r["results"].as_array().expect("results") {
            assert_eq!(o["status"], 201, "{o}");
            ids.push(o["command"]["id"].as_str().expect("id").to_string());
        }
    }
    ids
}

/// What a subscriber saw: (topic, command id) → seq, checking nothing came twice and the
/// sequence only grew.
#[derive(Default)]
struct Seen {
    last: u64,
    items: HashMap<(String, String), u64>,
    events: Vec<Item>,
}

impl Seen {
    fn add(&mut self, it: Item) {
        assert!(
            it.seq > self.last,
            "seq {} after {}: out of order or repeated ({it:?})",
            it.seq,
            self.last
        );
        self.last = it.seq;
        match it.topic.as_str() {
            "commands" | "results" => {
                let id = it.data["id"].as_str().expect("id").to_string();
                if it.topic == "results" {
                    assert_eq!(it.data["state"], "succeeded", "{}", it.data);
                    assert_eq!(it.data["result"]["ok"], true, "{}", it.data);
                }
                let prev = self.items.insert((it.topic.clone(), id), it.seq);
                assert!(prev.is_none(), "delivered twice: {it:?}");
            }
            _ => self.events.push(it),
        }
    }

    fn has_all(&self, ids: &[String]) -> bool {
        ids.iter().all(|id| {
            self.items.contains_key(&("commands".into(), id.clone()))
                && self.items.contains_key(&("results".into(), id.clone()))
        })
    }

    fn check_order(&self, ids: &[String]) {
        for id in ids {
            let s = self.items[&("commands".into(), id.clone())];
            let r = self.items[&("results".into(), id.clone())];
            assert!(
                s < r,
                "{id}: its result ({r}) came before its submission ({s})"
            );
        }
    }
}

async fn read_until(sub: &mut Sse, seen: &mut Seen, done: impl Fn(&Seen) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(seen) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        if let Some(it) = sub.next(Duration::from_secs(30)).await {
            seen.add(it);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_carries_every_command_and_result_once_in_order_across_a_disconnect_and_a_restart()
{
    let dir = test_dir();
    // Health reports every second, so the health topic has something to carry.
    let (saas, gw, key, gw_id) = paired_with(
        dir.path(),
        SaasOptions::default(),
        "watch_report_ms = 1000\n",
    )
    .await
    .unwrap();
    let (_, other_key) = saas.tenant("other").await.unwrap();

    // Refusals: an unknown topic, a malformed Last-Event-ID, another tenant's gateway, the
    // operator key (it has no tenant), no key.
    let (s, v) = saas
        .call("GET", "/v1/feed?topics=commands,bogus", &key, None)
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("unknown_topic")),
        "{v}"
    );
    let (s, _, v) = saas
        .call_with("GET", "/v1/feed", &key, &[("Last-Event-ID", "soon")], None)
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, v) = saas
        .call(
            "GET",
            &format!("/v1/feed?gateway_id={gw_id}"),
            &other_key,
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 404, "{v}");
    let (s, _) = saas
        .call("GET", "/v1/feed", &saas.operator_key, None)
        .await
        .unwrap();
    assert_eq!(s, 403);
    let (s, _) = saas
        .call("GET", "/v1/feed", "pcgk_x.y", None)
        .await
        .unwrap();
    assert_eq!(s, 401);

    // From the start: the tenant's own history is there (its gateway paired and connected).
    let mut all = Sse::open(&saas, &key, "topics=events&since=0", None).await;
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "gateway.connected") {
        let it = all
            .next(Duration::from_secs(30))
            .await
            .expect("the tenant's history");
        assert_eq!(it.topic, "events", "{it:?}");
        kinds.push(it.data["kind"].as_str().unwrap_or_default().to_string());
    }
    drop(all);
    let mut health = Sse::open(
        &saas,
        &key,
        &format!("topics=health&gateway_id={gw_id}&since=0"),
        None,
    )
    .await;
    let it = health
        .next(Duration::from_secs(60))
        .await
        .expect("a health report");
    assert_eq!(it.topic, "health");
    assert_eq!(it.data["gateway_id"], gw_id.as_str(), "{}", it.data);
    assert!(it.data["health"].is_object(), "{}", it.data);
    drop(health);
    let mut other = Sse::open(&saas, &other_key, "since=0", None).await;

    // Live: commands and results only, then a disconnect halfway and a resume.
    let mut sub = Sse::open(&saas, &key, "topics=commands,results", None).await;
    // The subscription is counted (the other tenant's and this one).
    let (_, m) = saas
        .call("GET", "/metrics", &saas.operator_key, None)
        .await
        .unwrap();
    let text = m.as_str().unwrap_or_default();
    let open: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pcg_saas_feed_subscribers "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pcg_saas_feed_subscribers in:\n{text}"));
    assert!(open >= 2.0, "{open}");
    let first = submit(&saas, &key, &gw_id, 300, "a").await;
    let mut seen = Seen::default();
    read_until(
        &mut sub,
        &mut seen,
        |s| s.items.len() >= 300,
        "half of the first 300 commands' items",
    )
    .await;
    drop(sub);
    let second = submit(&saas, &key, &gw_id, 200, "b").await;
    let mut sub = Sse::open(
        &saas,
        &key,
        "topics=commands,results&since=1",
        Some(seen.last),
    )
    .await;
    let both: Vec<String> = first.iter().chain(&second).cloned().collect();
    read_until(
        &mut sub,
        &mut seen,
        |s| s.has_all(&both),
        "every command and result after resuming",
    )
    .await;
    seen.check_order(&both);
    assert!(seen.events.is_empty(), "events came though not asked for");
    assert_eq!(seen.items.len(), 1000);
    // Nothing more: no repetition trails behind.
    assert!(sub.next(Duration::from_secs(2)).await.is_none());
    drop(sub);

    // gRPC, from the start, results only: the same 500 results in the same order.
    let ca = std::fs::read_to_string(saas.dir.join("data/ca.pem")).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(saas.api.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                .domain_name("127.0.0.1"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::feed_client::FeedClient::new(channel);
    let bearer = |k: &str, r: pb::SubscribeRequest| {
        let mut req = tonic::Request::new(r);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
        req
    };
    let req = pb::SubscribeRequest {
        topics: vec!["results".into()],
        gateway_id: gw_id.clone(),
        since: Some(0),
    };
    let err = client
        .subscribe(tonic::Request::new(req.clone()))
        .await
        .expect_err("no key");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = client
        .subscribe(bearer(&other_key, req.clone()))
        .await
        .expect_err("another tenant's gateway");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let mut stream = client
        .subscribe(bearer(&key, req))
        .await
        .unwrap()
        .into_inner();
    let mut grpc_order = Vec::new();
    while grpc_order.len() < both.len() {
        let it = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a gRPC item in time")
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(it.topic, "results");
        let v: Value = serde_json::from_str(&it.json).unwrap();
        grpc_order.push((it.seq, v["id"].as_str().unwrap().to_string()));
    }
    let mut sse_order: Vec<(u64, String)> = seen
        .items
        .iter()
        .filter(|((t, _), _)| t == "results")
        .map(|((_, id), s)| (*s, id.clone()))
        .collect();
    sse_order.sort();
    assert_eq!(grpc_order, sse_order);
    drop(stream);

    // A subscription ends when its API key is revoked, idle or not.
    let (k2_id, k2) = saas.api_key(&key, "watcher").await.unwrap();
    let mut watcher = Sse::open(&saas, &k2, "topics=results", None).await;
    saas.revoke_api_key(&key, &k2_id).await.unwrap();
    let ended = watcher
        .next(Duration::from_secs(60))
        .await
        .expect("an error item before the stream ends");
    assert_eq!(ended.topic, "error", "{ended:?}");
    assert_eq!(ended.data["code"], "api_key_revoked", "{ended:?}");
    assert!(watcher.next(Duration::from_secs(10)).await.is_none());

    // The other tenant saw only its own events: none of ours.
    let ours: HashSet<&String> = both.iter().collect();
    let mut others = 0;
    while let Some(it) = other.next(Duration::from_secs(2)).await {
        assert_eq!(it.topic, "events", "{it:?}");
        assert_ne!(
            it.data["gateway_id"].as_str(),
            Some(gw_id.as_str()),
            "{it:?}"
        );
        assert!(!ours.contains(&it.data["id"].as_str().unwrap_or_default().to_string()));
        others += 1;
    }
    assert!(
        others >= 1,
        "the other tenant's own creation is in its feed"
    );
    drop(other);

    // A restart: the numbers go on, and a subscriber resumes where it was.
    let before = seen.last;
    let (saas, _) = saas.restart(Duration::from_secs(30)).await.unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    let third = submit(&saas, &key, &gw_id, 50, "c").await;
    let mut sub = Sse::open(&saas, &key, "topics=commands,results", Some(before)).await;
    read_until(
        &mut sub,
        &mut seen,
        |s| s.has_all(&third),
        "the commands after the restart",
    )
    .await;
    seen.check_order(&third);
    assert_eq!(
        seen.items.len(),
        1100,
        "nothing from before the restart came again"
    );

    // A payload's secrets never reach the feed: the submission shows them redacted.
    let mut secrets = Sse::open(&saas, &key, "topics=commands", None).await;
    let secret_id = saas
        .submit(
            &key,
            &gw_id,
            "gateway.echo",
            json!({"user": "u", "password": "feed-secret-4711"}),
        )
        .await
        .unwrap();
    let it = secrets
        .next(Duration::from_secs(60))
        .await
        .expect("the submission");
    assert_eq!(it.data["id"], secret_id.as_str(), "{it:?}");
    assert_eq!(it.data["payload"]["user"], "u", "{it:?}");
    assert_eq!(it.data["payload"]["password"], "<redacted>", "{it:?}");
    assert!(!it.data.to_string().contains("feed-secret-4711"));
    drop(secrets);
    saas.wait_command(&key, &secret_id, Duration::from_secs(60))
        .await
        .unwrap();

    drop(gw);
}
