//! Chaos: a TCP relay between gateway and broker cuts the connection at random moments during
//! 1,000 commands, and the gateway is killed with SIGKILL and restarted once mid-run. Every
//! command must be executed exactly once (counted in the gateway's ledger file, a side effect
//! written by `gateway.ledger`) and every result delivered.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use pcg_e2e::relay::Relay;
use pcg_e2e::{Gw, Saas, SaasOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_and_a_crash_lose_nothing_and_repeat_nothing() {
    let dir = pcg_e2e::test_dir();
    let relay = Relay::bind().await.unwrap();
    let saas = Saas::start(
        &dir.path().join("saas"),
        SaasOptions {
            heartbeat_ms: Some(300),
            extra_toml: format!("public_broker_urls = [\"https://{}\"]\n", relay.addr),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    relay.set_upstream(saas.broker_listen);
    let (_, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let gw_id = gw.gateway_id().unwrap();

    let saas = Arc::new(saas);
    let relay = Arc::new(relay);
    let done = Arc::new(AtomicBool::new(false));
    let cuts = Arc::new(AtomicUsize::new(0));
    // Cut every open connection at random moments, 20 to 250 ms apart.
    let cutter = {
        let relay = relay.clone();
        let done = done.clone();
        let cuts = cuts.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let ms = rand::random_range(20..250);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                relay.cut_all();
                cuts.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let submitted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let submit_all = {
        let saas = saas.clone();
        let key = key.clone();
        let gw_id = gw_id.clone();
        let submitted = submitted.clone();
        tokio::spawn(async move {
            stream::iter(0..1000usize)
                .map(|n| {
                    let saas = saas.clone();
                    let key = key.clone();
                    let gw_id = gw_id.clone();
                    let submitted = submitted.clone();
                    async move {
                        let id = saas
                            .submit(&key, &gw_id, "gateway.ledger", json!({ "n": n }))
                            .await
                            .unwrap();
                        submitted.fetch_add(1, Ordering::Relaxed);
                        (n, id)
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        })
    };
    // Mid-run: SIGKILL the gateway and start it again.
    pcg_e2e::wait_for(
        "half the commands submitted",
        Duration::from_secs(120),
        || async { (submitted.load(Ordering::Relaxed) >= 500).then_some(()) },
    )
    .await
    .unwrap();
    gw.proc.as_mut().unwrap().kill();
    let lines_at_kill = gw.ledger_ids().len();
    tokio::time::sleep(Duration::from_millis(rand::random_range(100..600))).await;
    gw.start().unwrap();

    let ids = submit_all.await.unwrap();
    assert_eq!(ids.len(), 1000);
    let mut outcomes = Vec::new();
    for (n, id) in &ids {
        let v = saas
            .wait_command(&key, id, Duration::from_secs(180))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\n--- gateway log ---\n{}\n--- saas log tail ---\n{}",
                    gw.log(),
                    tail(&saas.log())
                )
            });
        assert_eq!(v["state"], "succeeded", "command {n}: {v}");
        outcomes.push(v);
    }
    done.store(true, Ordering::Relaxed);
    cutter.await.unwrap();

    // Exactly once: every id appears exactly once in the ledger, and nothing else does.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in gw.ledger_ids() {
        *counts.entry(l).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "executed more than once: {twice:?}");
    for (n, id) in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "command {n} ({id}) executed {:?} times",
            counts.get(id)
        );
    }
    assert_eq!(counts.len(), 1000);
    let redelivered = outcomes
        .iter()
        .filter(|v| v["deliveries"].as_u64().unwrap() > 1)
        .count();
    eprintln!(
        "chaos: 1000 commands in {:?}; {} cuts, {} relay connections, {} commands delivered more than once, {} ledger lines at the kill",
        started.elapsed(),
        cuts.load(Ordering::Relaxed),
        relay.accepted.load(Ordering::Relaxed),
        redelivered,
        lines_at_kill,
    );
    assert!(
        cuts.load(Ordering::Relaxed) >= 3,
        "the relay must actually have cut connections"
    );
    assert!(
        relay.accepted.load(Ordering::Relaxed) >= 3,
        "the gateway must have redialled"
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
