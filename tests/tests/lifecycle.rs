//! Command lifecycle end to end, through the real binaries: progress on the command resource
//! while it runs, cancel (running, never delivered, asked while the gateway is away and across
//! a SaaS restart), deadlines (on the gateway and for a command that never reached it), and a
//! gateway stopped with SIGTERM while commands run (drained: none stays running, none re-runs).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pcg_e2e::{wait_for, SaasOptions};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

async fn get(saas: &pcg_e2e::Saas, key: &str, id: &str) -> Value {
    saas.ok("GET", &format!("/v1/commands/{id}"), key, None)
        .await
        .unwrap()
}

/// Waits until the command is in `state` (and `extra` holds of its view).
async fn wait_state(
    saas: &pcg_e2e::Saas,
    key: &str,
    id: &str,
    state: &str,
    extra: impl Fn(&Value) -> bool,
) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    let r = wait_for(&format!("command {id} {state}"), LONG, || {
        let v = get(saas, key, id);
        let (last, extra) = (&last, &extra);
        async move {
            let v = v.await;
            *last.lock().unwrap() = v.clone();
            (v["state"] == state && extra(&v)).then_some(v)
        }
    })
    .await;
    r.unwrap_or_else(|e| panic!("{e}; last view: {}", last.lock().unwrap()))
}

async fn submit_with(saas: &pcg_e2e::Saas, key: &str, gw: &str, body: Value) -> (u16, Value) {
    saas.call(
        "POST",
        &format!("/v1/gateways/{gw}/commands"),
        key,
        Some(body),
    )
    .await
    .unwrap()
}

async fn cancel(saas: &pcg_e2e::Saas, key: &str, id: &str, reason: Option<&str>) -> (u16, Value) {
    saas.call(
        "POST",
        &format!("/v1/commands/{id}/cancel"),
        key,
        reason.map(|r| json!({ "reason": r })),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_cancel_and_deadlines() {
    let dir = pcg_e2e::test_dir();
    let (saas, mut gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();

    // Progress reaches the command resource while the command runs.
    let long = saas
        .submit(&key, &gw_id, "gateway.sleep", json!({ "ms": 60000 }))
        .await
        .unwrap();
    let v = wait_state(&saas, &key, &long, "received", |v| {
        v["progress"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("slept "))
            && v["progress"]["percent"].is_u64()
    })
    .await;
    assert!(v["result"].is_null(), "{v}");
    assert!(v["progress"]["at"].as_str().is_some(), "{v}");

    // Cancelled while it runs: 202 with the cancel recorded, then `cancelled` once the gateway
    // confirms; its message says why and how far it got.
    let (status, v) = cancel(&saas, &key, &long, Some("operator changed plans")).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["cancel"]["reason"], "operator changed plans", "{v}");
    let v = saas.wait_command(&key, &long, LONG).await.unwrap();
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(v["result"]["error_class"], "cancelled", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains("operator changed plans") && msg.contains("stopped after"),
        "{msg}"
    );
    // Ended: a second cancel is a conflict; an unknown id is not found.
    let (status, v) = cancel(&saas, &key, &long, None).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "command_finished", "{v}");
    let (status, _) = cancel(&saas, &key, "cmd_000000000000", None).await;
    assert_eq!(status, 404);
    let (status, v) = saas
        .call(
            "POST",
            &format!("/v1/commands/{long}/cancel"),
            &key,
            Some(json!({ "why": "x" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{v}");

    // A deadline that passes while it runs: `timed_out`, on the gateway.
    let (status, v) = submit_with(
        &saas,
        &key,
        &gw_id,
        json!({"kind": "gateway.sleep", "payload": {"ms": 60000}, "deadline_seconds": 2}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert!(v["deadline"].as_str().is_some(), "{v}");
    let timed = v["id"].as_str().unwrap().to_owned();
    let v = saas.wait_command(&key, &timed, LONG).await.unwrap();
    assert_eq!(v["state"], "timed_out", "{v}");
    assert_eq!(v["result"]["error_class"], "timed_out", "{v}");
    assert!(v["result"]["error_message"]
        .as_str()
        .unwrap()
        .contains("deadline"));
    // A deadline it meets: it succeeds.
    let (_, v) = submit_with(
        &saas,
        &key,
        &gw_id,
        json!({"kind": "gateway.echo", "payload": {"a": 1}, "deadline_seconds": 30}),
    )
    .await;
    let v = saas
        .wait_command(&key, v["id"].as_str().unwrap(), LONG)
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    for bad in [json!(0), json!(604801), json!("soon")] {
        let (status, v) = submit_with(
            &saas,
            &key,
            &gw_id,
            json!({"kind": "gateway.echo", "deadline_seconds": bad}),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {v}");
    }

    // The gateway away: a command never handed to it is cancelled at once, without it; another
    // times out at the SaaS when its deadline passes.
    gw.proc.as_mut().unwrap().stop();
    wait_for("the gateway disconnected", LONG, || async {
        let v = saas
            .ok("GET", &format!("/v1/gateways/{gw_id}"), &key, None)
            .await
            .unwrap();
        (v["connected"] == false).then_some(())
    })
    .await
    .unwrap();
    let queued = saas
        .submit(&key, &gw_id, "gateway.ledger", json!({ "n": "queued" }))
        .await
        .unwrap();
    let (status, v) = cancel(&saas, &key, &queued, None).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(v["result"]["error_message"]
        .as_str()
        .unwrap()
        .contains("before it reached the gateway"));
    let (_, v) = submit_with(
        &saas,
        &key,
        &gw_id,
        json!({"kind": "gateway.ledger", "payload": {"n": "expires"}, "deadline_seconds": 1}),
    )
    .await;
    let expires = v["id"].as_str().unwrap().to_owned();
    let v = saas.wait_command(&key, &expires, LONG).await.unwrap();
    assert_eq!(v["state"], "timed_out", "{v}");

    // A command the SaaS cannot know was never delivered (it restarted since: deliveries are
    // not recorded): the cancel is recorded, survives another restart, and goes down in place
    // of the command when the gateway connects; the gateway records it as cancelled and never
    // runs it.
    let unsure = saas
        .submit(&key, &gw_id, "gateway.ledger", json!({ "n": "unsure" }))
        .await
        .unwrap();
    // Likewise one whose deadline passes before the gateway is back: the gateway, getting it
    // late, records it as timed out without running it.
    let (status, v) = submit_with(
        &saas,
        &key,
        &gw_id,
        json!({"kind": "gateway.ledger", "payload": {"n": "late"}, "deadline_seconds": 8}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let late = v["id"].as_str().unwrap().to_owned();
    let late_deadline = pcg_e2e::now_ms() + 8_000;
    let (saas, _) = saas.restart(Duration::from_secs(20)).await.unwrap();
    let (status, v) = cancel(&saas, &key, &unsure, Some("not needed")).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["state"], "queued", "{v}");
    assert_eq!(v["cancel"]["reason"], "not needed", "{v}");
    let (saas, _) = saas.restart(Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        get(&saas, &key, &unsure).await["cancel"]["reason"],
        "not needed"
    );
    let v = get(&saas, &key, &late).await;
    assert_eq!(v["state"], "queued", "restarted before its deadline: {v}");
    wait_for("the deadline to pass", LONG, || async {
        (pcg_e2e::now_ms() > late_deadline).then_some(())
    })
    .await
    .unwrap();
    gw.start().unwrap();
    let v = saas.wait_command(&key, &late, LONG).await.unwrap();
    assert_eq!(v["state"], "timed_out", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(msg.contains("it had not started"), "{msg}");
    let v = saas.wait_command(&key, &unsure, LONG).await.unwrap();
    assert_eq!(v["state"], "cancelled", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains("before it started") && msg.contains("not needed"),
        "{msg}"
    );
    // None of them ever ran; a later ledger command does, once.
    let after = saas
        .submit(&key, &gw_id, "gateway.ledger", json!({ "n": "after" }))
        .await
        .unwrap();
    let v = saas.wait_command(&key, &after, LONG).await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(gw.ledger_ids(), vec![after.clone()]);

    // Listing by the new states.
    for (state, id) in [("cancelled", &unsure), ("timed_out", &expires)] {
        let list = saas
            .ok("GET", &format!("/v1/commands?state={state}"), &key, None)
            .await
            .unwrap();
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"] == id.as_str()),
            "{state}: {list}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_commands() {
    let dir = pcg_e2e::test_dir();
    let saas = pcg_e2e::Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_tenant, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let mut gw = pcg_e2e::Gw::with_config(&dir.path().join("gw"), "drain_grace_ms = 3000").unwrap();
    gw.pair(&token).unwrap();
    gw.start().unwrap();
    gw.wait_tunnel("connected", LONG).await.unwrap();
    let gw_id = gw.gateway_id().unwrap();

    // One that ends within the grace, one that does not.
    let short = saas
        .submit(&key, &gw_id, "gateway.sleep", json!({ "ms": 1500 }))
        .await
        .unwrap();
    let long = saas
        .submit(&key, &gw_id, "gateway.sleep", json!({ "ms": 60000 }))
        .await
        .unwrap();
    for id in [&short, &long] {
        wait_state(&saas, &key, id, "received", |_| true).await;
    }
    let pid = gw.proc.as_ref().unwrap().pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    wait_for("the gateway to start draining", LONG, || {
        let log = gw.log();
        async move {
            log.contains("stopping: taking no new commands")
                .then_some(())
        }
    })
    .await
    .unwrap();
    // Delivered while it drains: not taken (the broker keeps it for the next tunnel).
    let during = saas
        .submit(&key, &gw_id, "gateway.ledger", json!({ "n": "during" }))
        .await
        .unwrap();
    let proc = gw.proc.as_mut().unwrap();
    let exited = wait_for("pcg-gateway to exit", LONG, || {
        let st = proc.child.try_wait().unwrap();
        async move { st }
    })
    .await
    .unwrap();
    assert!(exited.success(), "exit status {exited}");
    let log = gw.log();
    assert!(log.contains("drain grace over"), "{log}");

    // The short one finished; the long one is recorded as interrupted with the reason; the one
    // delivered during the drain did not run.
    assert!(gw.ledger_ids().is_empty());
    gw.start().unwrap();
    gw.wait_tunnel("connected", LONG).await.unwrap();
    let v = saas.wait_command(&key, &short, LONG).await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let v = saas.wait_command(&key, &long, LONG).await.unwrap();
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["result"]["error_class"], "interrupted", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(msg.contains("drain_grace_ms (3000 ms)"), "{msg}");
    let v = saas.wait_command(&key, &during, LONG).await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(gw.ledger_ids(), vec![during.clone()]);

    // Nothing resumed after the restart: no command was left running in the journal.
    let status = gw.status().unwrap();
    assert_eq!(status["running"], 0, "{status}");
    let log = gw.log();
    assert!(!log.contains("resuming commands interrupted"), "{log}");
    let list = saas
        .ok(
            "GET",
            &format!("/v1/commands?gateway_id={gw_id}"),
            &key,
            None,
        )
        .await
        .unwrap();
    for c in list.as_array().unwrap() {
        assert!(
            ["succeeded", "failed"].contains(&c["state"].as_str().unwrap()),
            "{c}"
        );
    }
}

/// A vSphere clone that takes a while (vcsim answers `CloneVM_Task` 4 s late, as a busy vCenter
/// would): its progress shows on the command resource before it ends; a cancel during the clone
/// asks vCenter to cancel the task (vcsim has no `CancelTask`, so it refuses) and leaves the
/// cloned VM neither reconfigured nor powered on, named in the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_clone_progress_and_cancel() {
    let Some(sim) = pcg_e2e::vcsim::Vcsim::start(&["-method-delay", "CloneVM_Task=4s"]) else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let endpoint = sim.endpoint();
    let spec = |name: &str| {
        json!({
            "name": name, "source": "pcg-template", "cpus": 2, "memory_mib": 2048,
            "placement": {"provider": "vsphere", "datacenter": "DC0", "cluster": "DC0_C0"},
        })
    };

    // Progress while the clone runs, then success.
    let done = saas
        .submit(
            &key,
            &gw_id,
            "vsphere.create",
            json!({ "endpoint": endpoint, "spec": spec("progress-vm") }),
        )
        .await
        .unwrap();
    let v = wait_state(&saas, &key, &done, "received", |v| {
        v["progress"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cloning"))
    })
    .await;
    assert!(v["result"].is_null(), "{v}");
    let percent = v["progress"]["percent"].as_u64().unwrap();
    assert!((1..100).contains(&percent), "{v}");
    let v = saas.wait_command(&key, &done, LONG).await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["power"], "on", "{v}");

    // Cancelled during the clone.
    let cancelled = saas
        .submit(
            &key,
            &gw_id,
            "vsphere.create",
            json!({ "endpoint": endpoint, "spec": spec("cancelled-vm") }),
        )
        .await
        .unwrap();
    wait_state(&saas, &key, &cancelled, "received", |v| {
        v["progress"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cloning"))
    })
    .await;
    let (status, v) = cancel(&saas, &key, &cancelled, Some("wrong template")).await;
    assert_eq!(status, 202, "{v}");
    let v = saas.wait_command(&key, &cancelled, LONG).await.unwrap();
    assert_eq!(v["state"], "cancelled", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(msg.contains("wrong template"), "{msg}");
    assert!(msg.contains("did not cancel clone task"), "{msg}");
    assert!(msg.contains("not reconfigured or powered on"), "{msg}");
    let listing = sim.reference(&["list"]);
    let row = listing
        .iter()
        .find(|r| r["command_id"] == cancelled.as_str())
        .unwrap_or_else(|| panic!("no VM marked {cancelled}: {listing:?}"));
    assert_eq!(row["power"], "poweredOff", "{row}");
    assert!(msg.contains(row["id"].as_str().unwrap()), "{msg} / {row}");
}
