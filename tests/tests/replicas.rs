//! Two pcg-saas replicas on a real three-node NATS JetStream cluster (Debian `nats-server` 2.9,
//! mutual TLS on routes and client connections), with real paired `pcg-gateway` daemons:
//! - what one replica stores the other serves (tenants, API keys, pairing tokens, gateways,
//!   commands and their results, the feed);
//! - commands submitted to both replicas alternately while one replica is SIGKILLed (its
//!   gateways move to the other; it is started again) and one NATS node is stopped and brought
//!   back: every accepted command is executed exactly once (counted in the gateways' ledgers)
//!   and has a result on both replicas;
//! - with two of three NATS nodes down, a submit is refused within a bound, naming the missing
//!   quorum; once they are back, submits are accepted and run again.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use pcg_e2e::feed::Sse;
use pcg_e2e::nats::{self, NatsCluster};
use pcg_e2e::{free_port, test_dir, wait_for, Gw, Saas, SaasOptions};

/// Gateways in the run, and commands submitted.
const GATEWAYS: usize = 20;
const COMMANDS: usize = 5_000;
use serde_json::json;

/// One replica's start: its own data directory and port; the cluster, the gateways' CA and
/// every replica's broker URL shared.
struct ReplicaSpec {
    dir: PathBuf,
    port: u16,
    extra: String,
}

impl ReplicaSpec {
    fn new(
        root: &Path,
        name: &str,
        port: u16,
        pki: &Path,
        urls: &[String],
        brokers: &[String],
    ) -> Self {
        ReplicaSpec {
            dir: root.join(name),
            port,
            extra: nats::replica_toml(pki, name, urls, brokers),
        }
    }

    async fn start(&self) -> Saas {
        Saas::start(
            &self.dir,
            SaasOptions {
                api_listen: Some(format!("127.0.0.1:{}", self.port).parse().unwrap()),
                extra_toml: self.extra.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }
}

/// Submits with an idempotency key to the preferred replica, and on a failed request (a killed
/// replica, a lost quorum) retries the same key on the other: one command either way.
async fn submit(
    replicas: &[Arc<tokio::sync::RwLock<Saas>>; 2],
    first: usize,
    key: &str,
    gw: &str,
    n: usize,
) -> String {
    let started = Instant::now();
    let mut at = first;
    loop {
        let r = {
            let saas = replicas[at].read().await;
            saas.call_with(
                "POST",
                &format!("/v1/gateways/{gw}/commands"),
                key,
                &[("Idempotency-Key", &format!("n-{n}"))],
                Some(json!({ "kind": "gateway.ledger", "payload": { "n": n } })),
            )
            .await
        };
        match r {
            Ok((s, _, v)) if (200..300).contains(&s) => {
                return v["id"].as_str().unwrap().to_string();
            }
            other => {
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "submit {n} not accepted within 120 s: {other:?}"
                );
                at = 1 - at;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_everything_and_lose_nothing_when_one_is_killed() {
    if !nats::available() {
        return;
    }
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>7.1} s  {what}", t0.elapsed().as_secs_f64());
    let dir = test_dir();
    let pki = dir.path().join("pki");
    nats::init_pki(&pki).unwrap();
    let mut cluster = NatsCluster::start(&dir.path().join("nats"), &pki)
        .await
        .unwrap();
    cluster.wait_ready(Duration::from_secs(90)).await.unwrap();
    let urls = cluster.urls();

    // The replicas' ports first: each is told both broker URLs.
    let ports = [free_port(), free_port()];
    let brokers: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let specs = [
        ReplicaSpec::new(dir.path(), "replica1", ports[0], &pki, &urls, &brokers),
        ReplicaSpec::new(dir.path(), "replica2", ports[1], &pki, &urls, &brokers),
    ];
    let a = specs[0].start().await;
    let b = specs[1].start().await;
    phase("NATS cluster and both replicas up");

    // What one replica stores, the other serves.
    let (tenant, key) = a.tenant("t").await.unwrap();
    let seen = wait_for(
        "the tenant on the other replica",
        Duration::from_secs(30),
        || {
            let (b, key) = (&b, key.clone());
            async move {
                let (s, v) = b.call("GET", "/v1/tenants", &key, None).await.ok()?;
                (s == 200).then_some(v)
            }
        },
    )
    .await
    .unwrap();
    assert!(seen.to_string().contains(&tenant), "{seen}");
    let (_, other_key) = b.tenant("other").await.unwrap();

    // Gateways paired with tokens of either replica, at either replica (the token names the
    // replica that made it); each dials a broker chosen at random.
    let mut gws = Vec::new();
    for i in 0..GATEWAYS {
        let maker = if i % 2 == 0 { &a } else { &b };
        let (_, token) = maker.token(&key, None).await.unwrap();
        gws.push(Gw::paired_and_started(&dir.path().join(format!("gw{i}")), "", &token).unwrap());
    }
    for gw in &gws {
        gw.wait_tunnel("connected", Duration::from_secs(60))
            .await
            .unwrap();
    }
    let ids: Vec<String> = gws.iter().map(|g| g.gateway_id().unwrap()).collect();
    let (ta, tb) = (nats::tunnels(&a).await, nats::tunnels(&b).await);
    assert_eq!(ta + tb, GATEWAYS as u64, "tunnels: {ta} + {tb}");
    eprintln!("tunnels at start: replica1 {ta}, replica2 {tb}");
    phase("gateways connected");

    // A command to each gateway through the replica that does not hold its tunnel, and back.
    for (i, gw) in ids.iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        let id = via
            .submit(&key, gw, "gateway.echo", json!({ "i": i }))
            .await
            .unwrap();
        let other = if i % 2 == 0 { &b } else { &a };
        let v = other
            .wait_command(&key, &id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(v["state"], "succeeded", "{v}");
    }
    // Another tenant sees none of it.
    let (s, v) = b
        .call("GET", "/v1/commands", &other_key, None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(v.as_array().map(Vec::len), Some(0), "{v}");

    // The run: commands to both replicas alternately; replica1 killed and started again, one
    // NATS node stopped and started again, meanwhile.
    let total = COMMANDS;
    // A subscriber to the results on replica2, which leaves half way and resumes on replica1
    // from the last number it saw; another tenant's subscriber, which must see nothing.
    let mut sub = Sse::open(&b, &key, "topics=results", None).await;
    let mut other_sub = Sse::open(&b, &other_key, "topics=commands,results,events", None).await;
    let reader = tokio::spawn(async move {
        let mut items = Vec::new();
        while items.len() < total / 2 {
            let it = sub
                .next(Duration::from_secs(120))
                .await
                .expect("results keep coming");
            assert_eq!(it.topic, "results", "{it:?}");
            items.push((
                it.seq,
                it.data["id"].as_str().unwrap_or_default().to_string(),
            ));
        }
        items
    });
    let replicas = [
        Arc::new(tokio::sync::RwLock::new(a)),
        Arc::new(tokio::sync::RwLock::new(b)),
    ];
    let submitted = Arc::new(AtomicUsize::new(0));
    let run = {
        let replicas = replicas.clone();
        let (key, ids, submitted) = (key.clone(), ids.clone(), submitted.clone());
        tokio::spawn(async move {
            stream::iter(0..total)
                .map(|n| {
                    let (replicas, key, ids, submitted) = (
                        replicas.clone(),
                        key.clone(),
                        ids.clone(),
                        submitted.clone(),
                    );
                    async move {
                        let gw = &ids[n % ids.len()];
                        let id = submit(&replicas, n % 2, &key, gw, n).await;
                        submitted.fetch_add(1, Ordering::Relaxed);
                        (n, id)
                    }
                })
                .buffer_unordered(12)
                .collect::<Vec<_>>()
                .await
        })
    };
    let at = |k: usize| {
        let submitted = submitted.clone();
        move || {
            let submitted = submitted.clone();
            async move { (submitted.load(Ordering::Relaxed) >= k).then_some(()) }
        }
    };
    wait_for(
        "a quarter submitted",
        Duration::from_secs(120),
        at(total / 4),
    )
    .await
    .unwrap();
    let killed_at = Instant::now();
    replicas[0].write().await.proc.kill();
    // Its gateways move to the other replica.
    let moved = wait_for("every tunnel on replica2", Duration::from_secs(120), || {
        let b = replicas[1].clone();
        async move { (nats::tunnels(&*b.read().await).await == GATEWAYS as u64).then_some(()) }
    })
    .await;
    let failover = killed_at.elapsed();
    moved.unwrap();
    eprintln!("failover: every tunnel on replica2 {failover:?} after replica1 was killed");
    wait_for("half submitted", Duration::from_secs(120), at(total / 2))
        .await
        .unwrap();
    cluster.kill(1);
    {
        // replica1 comes back on its own data directory while one NATS node is down.
        let back = specs[0].start().await;
        *replicas[0].write().await = back;
    }
    // A subscriber on the restarted replica, from now on: it sees what the replica applies after
    // its restart (the feed's numbers there are the log's, not its store's own counter).
    let mut live = Sse::open(&*replicas[0].read().await, &key, "topics=results", None).await;
    wait_for(
        "three quarters submitted",
        Duration::from_secs(120),
        at(3 * total / 4),
    )
    .await
    .unwrap();
    cluster.restart(1).unwrap();
    // The restarted replica gets its share back: the other asks some gateways to move.
    let back_at = Instant::now();
    let spread = wait_for(
        "tunnels on both replicas again",
        Duration::from_secs(120),
        || {
            let replicas = replicas.clone();
            async move {
                let ta = nats::tunnels(&*replicas[0].read().await).await;
                let tb = nats::tunnels(&*replicas[1].read().await).await;
                (ta + tb == GATEWAYS as u64 && ta.min(tb) >= GATEWAYS as u64 / 2 - 3)
                    .then_some((ta, tb))
            }
        },
    )
    .await
    .unwrap();
    eprintln!(
        "rebalanced: replica1 {}, replica2 {} tunnels, {:?} after replica1's restart",
        spread.0,
        spread.1,
        back_at.elapsed()
    );
    let accepted = run.await.unwrap();
    assert_eq!(accepted.len(), total);
    phase("every command accepted");
    let first = live
        .next(Duration::from_secs(120))
        .await
        .expect("the restarted replica's feed carries the results it applies after its restart");
    assert_eq!(first.topic, "results", "{first:?}");
    let mut seen = reader.await.unwrap();
    let last = seen.last().unwrap().0;
    {
        let a = replicas[0].read().await;
        let mut resumed = Sse::open(&a, &key, "topics=results", Some(last)).await;
        while seen.len() < total {
            let Some(it) = resumed.next(Duration::from_secs(120)).await else {
                // Say what is missing: commands that did not end, or results one feed lacks.
                let got: std::collections::HashSet<&str> =
                    seen.iter().map(|(_, id)| id.as_str()).collect();
                let mut missing = Vec::new();
                for (_, id) in accepted.iter().filter(|(_, id)| !got.contains(id.as_str())) {
                    if missing.len() == 5 {
                        break;
                    }
                    let path = format!("/v1/commands/{id}");
                    let on_a = a
                        .call("GET", &path, &key, None)
                        .await
                        .map(|(_, v)| v["state"].clone());
                    let on_b = replicas[1]
                        .read()
                        .await
                        .call("GET", &path, &key, None)
                        .await
                        .map(|(_, v)| v["state"].clone());
                    missing.push(format!("{id}: replica1 {on_a:?}, replica2 {on_b:?}"));
                }
                panic!(
                    "results keep coming after the resume: none for 120 s with {} of {total} seen, resumed after {last}; missing (up to 5): {missing:#?}",
                    seen.len()
                );
            };
            seen.push((
                it.seq,
                it.data["id"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "the feed's numbers grow across the resume on the other replica"
    );
    let mut once: HashMap<&str, usize> = HashMap::new();
    for (_, id) in &seen {
        *once.entry(id.as_str()).or_default() += 1;
    }
    for (n, id) in &accepted {
        assert_eq!(
            once.get(id.as_str()),
            Some(&1),
            "result of command {n} in the feed"
        );
    }
    assert!(
        other_sub.next(Duration::from_secs(1)).await.is_none(),
        "another tenant's subscriber sees nothing of this tenant"
    );

    phase("the feed checked");
    // Every accepted command has its result on both replicas.
    for (n, id) in &accepted {
        for r in &replicas {
            let v = r
                .read()
                .await
                .wait_command(&key, id, Duration::from_secs(120))
                .await
                .unwrap();
            assert_eq!(v["state"], "succeeded", "command {n}: {v}");
        }
    }
    phase("every result read on both replicas");
    // Executed exactly once each, counted at the side effect.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for gw in &gws {
        for l in gw.ledger_ids() {
            *counts.entry(l).or_default() += 1;
        }
    }
    for (n, id) in &accepted {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "command {n} ({id}) ran {:?} times",
            counts.get(id)
        );
    }
    assert_eq!(
        counts.len(),
        total,
        "the ledgers hold only the run's commands"
    );

    // Two of three NATS nodes down: a submit is refused, naming the quorum, within a bound; work
    // accepted before (commands for a gateway that was stopped) completes once they are back.
    let a = replicas[0].read().await;
    gws[0].proc.as_mut().unwrap().stop();
    let mut waiting = Vec::new();
    for n in 0..5 {
        waiting.push(
            a.submit(&key, &ids[0], "gateway.echo", json!({ "n": n }))
                .await
                .unwrap(),
        );
    }
    cluster.kill(1);
    cluster.kill(2);
    phase("two NATS nodes down");
    let started = Instant::now();
    let (s, v) = a
        .call(
            "POST",
            &format!("/v1/gateways/{}/commands", ids[0]),
            &key,
            Some(json!({ "kind": "gateway.ledger", "payload": { "n": "late" } })),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(s, 503, "{v}");
    assert!(v.to_string().contains("quorum"), "{v}");
    assert!(took < Duration::from_secs(30), "refused after {took:?}");
    gws[0].start().unwrap();
    cluster.restart(1).unwrap();
    cluster.restart(2).unwrap();
    phase("the nodes restarted");
    for id in &waiting {
        let v = a
            .wait_command(&key, id, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(v["state"], "succeeded", "{v}");
    }
    let id = wait_for("a submit accepted again", Duration::from_secs(120), || {
        let (a, key, gw) = (&a, key.clone(), ids[0].clone());
        async move { a.submit(&key, &gw, "gateway.echo", json!({})).await.ok() }
    })
    .await
    .unwrap();
    let v = a
        .wait_command(&key, &id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");

    // A password in a payload reaches neither the cluster's log (the NATS nodes' stores) nor a
    // replica's store or log in clear: it is sealed to the gateway before it is written.
    let needle = "replica-secret-0f3a9c";
    let id = a
        .submit(
            &key,
            &ids[1],
            "gateway.ledger",
            json!({ "n": "sealed", "password": needle }),
        )
        .await
        .unwrap();
    let other = replicas[1].read().await;
    let v = other
        .wait_command(&key, &id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    for sub in ["nats", "replica1", "replica2"] {
        let hits = pcg_e2e::files_containing(&dir.path().join(sub), needle);
        assert!(hits.is_empty(), "the password in clear in {hits:?}");
    }
    // The gateway opened it (its ledger, the side effect the command asks for, has it) and kept
    // it nowhere else: not in its journal, its store or its log.
    let gw1 = &gws[1];
    let hits = pcg_e2e::files_containing(&gw1.dir, needle);
    assert!(
        hits.contains(&gw1.ledger),
        "the gateway got the password: {hits:?}"
    );
    assert_eq!(
        hits,
        vec![gw1.ledger.clone()],
        "the password in clear in {hits:?}"
    );
    phase("done");
}

/// A replica whose store has applied more of the log than the cluster's stream holds (the NATS
/// data was lost, or the data directory belongs to another cluster) refuses to start, saying so,
/// instead of skipping operations; with an empty data directory it rebuilds its store from the
/// stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_ahead_of_the_stream_refuses_to_start() {
    if !nats::available() {
        return;
    }
    let dir = test_dir();
    let pki = dir.path().join("pki");
    nats::init_pki(&pki).unwrap();
    let port = free_port();
    let brokers = [format!("https://127.0.0.1:{port}")];
    let mut first = NatsCluster::start(&dir.path().join("nats-a"), &pki)
        .await
        .unwrap();
    first.wait_ready(Duration::from_secs(90)).await.unwrap();
    let spec = ReplicaSpec::new(dir.path(), "replica1", port, &pki, &first.urls(), &brokers);
    let saas = spec.start().await;
    for i in 0..5 {
        saas.tenant(&format!("t{i}")).await.unwrap();
    }
    drop(saas);
    drop(first);

    // Another cluster, empty: the same replica's data directory is ahead of its stream.
    let mut second = NatsCluster::start(&dir.path().join("nats-b"), &pki)
        .await
        .unwrap();
    second.wait_ready(Duration::from_secs(90)).await.unwrap();
    let ahead = ReplicaSpec::new(dir.path(), "replica1", port, &pki, &second.urls(), &brokers);
    let r = Saas::start(
        &ahead.dir,
        SaasOptions {
            api_listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
            extra_toml: ahead.extra.clone(),
            ..Default::default()
        },
    )
    .await;
    let err = r.err().expect("the replica refuses to start").to_string();
    assert!(
        err.contains("lost or reset") && err.contains("empty data_dir"),
        "{err}"
    );
    // An empty data directory on the same cluster: it starts, with that cluster's state.
    let fresh = ReplicaSpec::new(
        &dir.path().join("fresh"),
        "replica1",
        port,
        &pki,
        &second.urls(),
        &brokers,
    );
    let saas = fresh.start().await;
    let (s, v) = saas
        .call("GET", "/v1/tenants", &saas.operator_key, None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(v.as_array().map(Vec::len), Some(0), "{v}");
}
