//! `VsphereService` (the gateway's connected vCenters) against vcsim, beside a vCenter that does
//! not answer: one endpoint's login never stalls another's commands, commands for one endpoint
//! share one login (and one failure), and a timeout states the bound that fired.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Blackhole, Vcsim};
use pcg_provider::ErrorKind;
use pcg_vsphere::command::VsphereService;
use pcg_vsphere::VsphereDriver;
use serde_json::json;

/// Session keys vcsim lists, read by `observer`.
async fn server_sessions(observer: &VsphereDriver) -> Vec<String> {
    let sm = observer.client().service_content().session_manager.clone();
    let o = observer
        .client()
        .retrieve_one(&sm, &["sessionList"])
        .await
        .unwrap();
    o.get("sessionList")
        .map(|l| {
            l.children
                .iter()
                .filter_map(|s| s.child_text("key").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vcenter_that_does_not_answer_stalls_only_its_own_commands() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let dead = Blackhole::start().await;
    let svc = std::sync::Arc::new(VsphereService::new());

    // Two commands for the dead vCenter: their logins are under way (the first connection is
    // accepted, no answer comes) for up to 20 s.
    let dead_ep = dead.endpoint(20_000);
    let mut dialling = Vec::new();
    for _ in 0..2 {
        let (svc, ep) = (svc.clone(), dead_ep.clone());
        dialling.push(tokio::spawn(async move { svc.driver(&ep).await }));
    }
    dead.wait_accepted(1).await;

    // Meanwhile the healthy vCenter answers a whole command.
    let inv = svc
        .handle(
            "vsphere.inventory",
            "cmd-inv",
            json!({ "endpoint": sim.endpoint() }),
        )
        .await
        .unwrap();
    assert!(!inv["vms"].as_array().unwrap().is_empty(), "{inv}");
    assert!(
        dialling.iter().all(|t| !t.is_finished()),
        "the healthy vCenter's command waited for the dead vCenter's login"
    );

    // Both commands for the dead vCenter shared one login attempt, and its failure.
    for t in dialling {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("vCenter"), "{e}");
        assert!(!e.to_string().contains("BMC"), "{e}");
    }
    assert_eq!(dead.accepted(), 1, "one login attempt for both commands");
    // A failed login is not kept: the next command tries again.
    let (svc2, ep) = (svc.clone(), dead_ep.clone());
    let again = tokio::spawn(async move { svc2.driver(&ep).await });
    dead.wait_accepted(2).await;
    again.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_arriving_together_for_one_vcenter_share_one_login() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let observer = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let before = server_sessions(&observer).await;
    let svc = std::sync::Arc::new(VsphereService::new());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (svc, ep) = (svc.clone(), sim.endpoint());
        set.spawn(async move { svc.driver(&ep).await.unwrap() });
    }
    let mut keys = std::collections::BTreeSet::new();
    while let Some(d) = set.join_next().await {
        keys.insert(d.unwrap().client().session_key().await.unwrap());
    }
    assert_eq!(keys.len(), 1, "one session for all: {keys:?}");
    let after = server_sessions(&observer).await;
    assert_eq!(after.len(), before.len() + 1, "{before:?} -> {after:?}");
    assert_eq!(svc.sessions(), 1);

    // The same vCenter described otherwise (CA trust instead of a pin) is another session;
    // forgetting one drops only it.
    let mut ca = sim.endpoint_ca();
    ca.page_size = Some(100);
    svc.driver(&ca).await.unwrap();
    assert_eq!(svc.sessions(), 2);
    svc.forget(&ca);
    assert_eq!(svc.sessions(), 1);
}

#[tokio::test]
async fn a_vcenter_that_accepts_no_connection_reports_the_bound_that_fired() {
    let dead = Blackhole::start().await;
    // A request bound of 40 s: connecting is bounded by 15 s, and that is the bound reported.
    let t = Instant::now();
    let e = VsphereDriver::connect(&dead.endpoint(40_000))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let s = e.to_string();
    assert!(s.contains("within 15s"), "{s}");
    assert!(s.contains("no TCP/TLS connection"), "{s}");
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_secs(40),
        "the stated bound (15 s) is not the one applied: failed after {took:?}: {s}"
    );
    // A smaller request bound bounds connecting too, and is the one reported.
    let t = Instant::now();
    let e = VsphereDriver::connect(&dead.endpoint(2_000))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("within 2s"), "{e}");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
}
