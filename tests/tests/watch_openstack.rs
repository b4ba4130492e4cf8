//! The watch loop against the real Keystone + Nova: a declared server deleted with the
//! `openstack` CLI is created again under `heal` (the old id kept), and only recorded under
//! `observe`. Uses the shared OpenStack stack (one test at a time; see .config/nextest.toml).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pcg_e2e::machines::{self, FAST_WATCH};
use pcg_e2e::openstack_peer::OpenstackStack;
use pcg_e2e::SaasOptions;
use serde_json::json;

const T: Duration = Duration::from_secs(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nova_server_deleted_out_of_band_is_recreated_under_heal_and_recorded_under_observe() {
    let Some(stack) = OpenstackStack::start() else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw) = pcg_e2e::paired_with(dir.path(), SaasOptions::default(), FAST_WATCH)
        .await
        .unwrap();
    machines::command(
        &saas,
        &key,
        &gw,
        "openstack.enrol",
        json!({"name": "lab", "cloud": stack.cloud()}),
    )
    .await
    .unwrap();
    let tag = std::process::id();
    let server = |name: &str| {
        json!({"name": name, "source": "pcg-image",
               "placement": {"provider": "openstack", "flavor": "pcg.tiny"}})
    };
    // Credentials are never part of a declaration.
    let (s, v) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{gw}/machines"),
            &key,
            Some(json!({"name": "x", "openstack": {"endpoint": stack.cloud(), "vm": server("x")}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(!v.to_string().contains(stack.password()));

    // heal: deleted with the CLI, created again; the old id is recorded.
    let heal = machines::declare(
        &saas,
        &key,
        &gw,
        json!({"name": "healing", "policy": "heal",
               "openstack": {"endpoint": {"enrolled": "lab"}, "vm": server(&format!("watch-heal-{tag}"))}}),
    )
    .await
    .unwrap();
    let v = machines::wait_machine(&saas, &key, &heal, "in sync", T, |v| {
        v["state"] == "in_sync"
    })
    .await
    .unwrap();
    let first = v["observed"]["provider_id"].as_str().unwrap().to_string();
    assert_eq!(stack.status(&first).as_deref(), Some("ACTIVE"));
    let (ok, out) = stack.cli(&["server", "delete", "--wait", &first]);
    assert!(ok, "openstack server delete: {out}");
    let evs = machines::wait_events(&saas, &key, &heal, "machine.heal", 1, T)
        .await
        .unwrap();
    let h = &evs[0];
    assert_eq!(h["details"]["ok"], true, "{h}");
    assert_eq!(h["details"]["action"]["do"], "create", "{h}");
    assert_eq!(h["details"]["previous_id"], first.as_str(), "{h}");
    let second = h["details"]["provider_id"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(stack.status(&second).as_deref(), Some("ACTIVE"));
    let v = machines::wait_machine(&saas, &key, &heal, "in sync again", T, |v| {
        v["state"] == "in_sync" && v["observed"]["provider_id"] == second.as_str()
    })
    .await
    .unwrap();
    assert_eq!(v["observed"]["previous_ids"], json!([first]), "{v}");
    let drift = machines::events(&saas, &key, &heal, "machine.drift")
        .await
        .unwrap();
    assert_eq!(
        drift[0]["details"]["before"]["id"],
        first.as_str(),
        "{drift:?}"
    );
    assert_eq!(drift[0]["details"]["after"]["present"], false, "{drift:?}");

    // observe: deleted with the CLI, only an event; nothing created.
    let name = format!("watch-observe-{tag}");
    let obs = machines::declare(
        &saas,
        &key,
        &gw,
        json!({"name": "observed", "policy": "observe",
               "openstack": {"endpoint": {"enrolled": "lab"}, "vm": server(&name)}}),
    )
    .await
    .unwrap();
    let v = machines::wait_machine(&saas, &key, &obs, "in sync", T, |v| v["state"] == "in_sync")
        .await
        .unwrap();
    let id = v["observed"]["provider_id"].as_str().unwrap().to_string();
    let (ok, out) = stack.cli(&["server", "delete", "--wait", &id]);
    assert!(ok, "openstack server delete: {out}");
    machines::wait_events(&saas, &key, &obs, "machine.drift", 1, T)
        .await
        .unwrap();
    let c = machines::watch_cycles(&saas, &key, &gw).await.unwrap_or(0);
    machines::wait_cycles(&saas, &key, &gw, c, 3, T)
        .await
        .unwrap();
    let v = machines::machine(&saas, &key, &obs).await.unwrap();
    assert_eq!(v["state"], "drifted", "{v}");
    assert_eq!(v["observed"]["present"], false, "{v}");
    let all = machines::events(&saas, &key, &obs, "machine.")
        .await
        .unwrap();
    assert!(
        all.iter()
            .all(|e| e["kind"] != "machine.heal" && e["kind"] != "machine.alert"),
        "{all:?}"
    );
    let (_, listed) = stack.cli(&["server", "list", "--name", &name, "-f", "value", "-c", "ID"]);
    assert!(
        listed.trim().is_empty(),
        "recreated under observe: {listed}"
    );

    // Clean up through the declarations: the healed server is deleted by the gateway.
    for m in [&heal, &obs] {
        saas.ok("DELETE", &format!("/v1/machines/{m}"), &key, None)
            .await
            .unwrap();
    }
    for m in [&heal, &obs] {
        pcg_e2e::wait_for("the machine gone", T, || async {
            let (s, _) = saas
                .call("GET", &format!("/v1/machines/{m}"), &key, None)
                .await
                .ok()?;
            (s == 404).then_some(())
        })
        .await
        .unwrap();
    }
    assert_eq!(stack.status(&second), None);
}
