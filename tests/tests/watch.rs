//! The watch loop end to end: machines declared over REST, converged by the gateway, changed
//! behind pcg's back through the peers' own tools (govmomi's reference client, ipmitool), and
//! watched: drift recorded, alerted or healed by policy within the heal budget; the gateway's
//! health and inventory on its resource; one paged inventory read per cycle for 1,000 VMs.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use pcg_e2e::machines::{self, FAST_WATCH};
use pcg_e2e::peers::{IpmiSim, IPMI_PASSWORD, IPMI_USER};
use pcg_e2e::vcsim::Vcsim;
use pcg_e2e::SaasOptions;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

fn power_of(sim: &Vcsim, id: &str) -> String {
    sim.reference(&["list"])
        .into_iter()
        .find(|r| r["id"] == id)
        .map(|r| r["power"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| "absent".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcsim_vm_drift_is_alerted_or_healed_within_the_budget() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw) = pcg_e2e::paired_with(dir.path(), SaasOptions::default(), FAST_WATCH)
        .await
        .unwrap();
    machines::command(
        &saas,
        &key,
        &gw,
        "vsphere.enrol",
        json!({"name": "lab", "endpoint": sim.endpoint()}),
    )
    .await
    .unwrap();

    // Bad declarations are refused at once, saying which field.
    let (s, v) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{gw}/machines"),
            &key,
            Some(json!({"name": "x", "vsphere": {"endpoint": sim.endpoint(), "vm": machines::vcsim_vm("x")}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vsphere.endpoint"),
        "{v}"
    );
    let mut typo = machines::vcsim_vm("x");
    typo["cpu"] = json!(2);
    let (s, v) = saas
        .call(
            "POST",
            &format!("/v1/gateways/{gw}/machines"),
            &key,
            Some(json!({"name": "x", "vsphere": {"endpoint": "lab", "vm": typo}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("cpu"),
        "{v}"
    );

    // policy alert: created and powered on; powered off behind pcg's back, an alert, nothing
    // changed.
    let alert = machines::declare(
        &saas,
        &key,
        &gw,
        json!({"name": "alerting", "policy": "alert",
               "vsphere": {"endpoint": "lab", "vm": machines::vcsim_vm("watch-alert")}}),
    )
    .await
    .unwrap();
    let v = machines::wait_machine(&saas, &key, &alert, "in sync", T, |v| {
        v["state"] == "in_sync"
    })
    .await
    .unwrap();
    assert_eq!(v["applied_generation"], 1, "{v}");
    let vm_a = v["observed"]["provider_id"].as_str().unwrap().to_string();
    let row = sim
        .reference(&["list"])
        .into_iter()
        .find(|r| r["id"] == vm_a.as_str())
        .unwrap();
    assert_eq!(row["power"], "poweredOn");
    assert_eq!(row["command_id"], format!("{alert}.1"), "the create's mark");
    machines::wait_events(&saas, &key, &alert, "machine.converged", 1, T)
        .await
        .unwrap();

    let off_at = Instant::now();
    sim.reference(&["power", &vm_a, "off"]);
    let evs = machines::wait_events(&saas, &key, &alert, "machine.alert", 1, T)
        .await
        .unwrap();
    eprintln!(
        "alert seen over REST {} ms after the power-off (watch interval 1000 ms)",
        off_at.elapsed().as_millis()
    );
    assert_eq!(evs[0]["alert"], true, "{evs:?}");
    let drift = machines::events(&saas, &key, &alert, "machine.drift")
        .await
        .unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0]["details"]["before"]["power"], "on", "{drift:?}");
    assert_eq!(drift[0]["details"]["after"]["power"], "off", "{drift:?}");
    // Alerts can be listed on their own.
    let only = saas
        .ok(
            "GET",
            &format!("/v1/events?gateway_id={gw}&alert=true"),
            &key,
            None,
        )
        .await
        .unwrap();
    assert!(only.as_array().unwrap().iter().all(|e| e["alert"] == true));
    assert!(only
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["machine_id"] == alert.as_str()));
    // A few more cycles: still off, no action taken, one alert.
    let c = machines::watch_cycles(&saas, &key, &gw).await.unwrap_or(0);
    machines::wait_cycles(&saas, &key, &gw, c, 3, T)
        .await
        .unwrap();
    assert_eq!(power_of(&sim, &vm_a), "poweredOff");
    assert_eq!(
        machines::events(&saas, &key, &alert, "machine.alert")
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(machines::events(&saas, &key, &alert, "machine.heal")
        .await
        .unwrap()
        .is_empty());
    let v = machines::wait_machine(&saas, &key, &alert, "drifted", T, |v| {
        v["state"] == "drifted"
    })
    .await
    .unwrap();
    assert_eq!(v["last_drift"]["details"]["after"]["power"], "off", "{v}");

    // policy heal, budget 2: two drifts healed (each in the events), the third alerted only.
    let heal = machines::declare(
        &saas,
        &key,
        &gw,
        json!({"name": "healing", "policy": "heal",
               "heal_budget": {"max_heals": 2, "window_seconds": 3600},
               "vsphere": {"endpoint": "lab", "vm": machines::vcsim_vm("watch-heal")}}),
    )
    .await
    .unwrap();
    let v = machines::wait_machine(&saas, &key, &heal, "in sync", T, |v| {
        v["state"] == "in_sync"
    })
    .await
    .unwrap();
    let vm_h = v["observed"]["provider_id"].as_str().unwrap().to_string();
    for n in 1..=2 {
        sim.reference(&["power", &vm_h, "off"]);
        let evs = machines::wait_events(&saas, &key, &heal, "machine.heal", n, T)
            .await
            .unwrap();
        let h = &evs[n - 1];
        assert_eq!(h["details"]["ok"], true, "{h}");
        assert_eq!(h["details"]["action"]["do"], "power", "{h}");
        assert_eq!(h["details"]["action"]["to"], "on", "{h}");
        assert_eq!(h["details"]["heals_used"], n, "{h}");
        assert_eq!(power_of(&sim, &vm_h), "poweredOn", "heal {n}");
        machines::wait_events(&saas, &key, &heal, "machine.drift_resolved", n, T)
            .await
            .unwrap();
    }
    sim.reference(&["power", &vm_h, "off"]);
    let evs = machines::wait_events(&saas, &key, &heal, "machine.heal_budget_exhausted", 1, T)
        .await
        .unwrap();
    assert_eq!(evs[0]["alert"], true, "{evs:?}");
    let c = machines::watch_cycles(&saas, &key, &gw).await.unwrap_or(0);
    machines::wait_cycles(&saas, &key, &gw, c, 3, T)
        .await
        .unwrap();
    assert_eq!(
        power_of(&sim, &vm_h),
        "poweredOff",
        "the third is not healed"
    );
    assert_eq!(
        machines::events(&saas, &key, &heal, "machine.heal")
            .await
            .unwrap()
            .len(),
        2
    );
    let v = machines::wait_machine(&saas, &key, &heal, "suspended", T, |v| {
        v["observed"]["heals"]["suspended"] == true
    })
    .await
    .unwrap();
    assert_eq!(v["observed"]["heals"]["used"], 2, "{v}");

    // An update (a new generation) converges it again and resumes healing.
    let (s, v) = saas
        .call(
            "PUT",
            &format!("/v1/machines/{heal}"),
            &key,
            Some(json!({"name": "healing", "policy": "heal",
                "heal_budget": {"max_heals": 2, "window_seconds": 3600},
                "vsphere": {"endpoint": "lab", "vm": machines::vcsim_vm("watch-heal")}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    machines::wait_machine(&saas, &key, &heal, "in sync again", T, |v| {
        v["state"] == "in_sync" && v["applied_generation"] == 2 && v["observed"]["generation"] == 2
    })
    .await
    .unwrap();
    assert_eq!(power_of(&sim, &vm_h), "poweredOn");

    // The gateway's resource shows its health and the vCenter's inventory summary.
    let g = saas
        .ok("GET", &format!("/v1/gateways/{gw}"), &key, None)
        .await
        .unwrap();
    assert_eq!(g["machines"], 2, "{g}");
    let lab = g["health"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "lab")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(lab["reachable"], true, "{g}");
    assert_eq!(lab["machines"], 2, "{g}");
    let listed = sim.reference(&["list"]);
    assert_eq!(
        lab["vms"],
        listed.iter().filter(|r| r["template"] == false).count(),
        "{g}"
    );
    assert_eq!(g["health"]["store"]["durable_writes"], true, "{g}");
    assert_eq!(g["health"]["tunnel"]["state"], "connected", "{g}");
    let history = saas
        .ok(
            "GET",
            &format!("/v1/gateways/{gw}/health?limit=5"),
            &key,
            None,
        )
        .await
        .unwrap();
    assert!(history.as_array().unwrap().len() >= 2, "{history}");

    // Deleting a declaration deletes its VM, then the machine is gone.
    let (s, v) = saas
        .call("DELETE", &format!("/v1/machines/{alert}"), &key, None)
        .await
        .unwrap();
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["state"], "deleting", "{v}");
    pcg_e2e::wait_for("the machine gone", T, || async {
        let (s, _) = saas
            .call("GET", &format!("/v1/machines/{alert}"), &key, None)
            .await
            .ok()?;
        (s == 404).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(power_of(&sim, &vm_a), "absent");
    machines::wait_events(&saas, &key, &alert, "machine.deleted", 1, T)
        .await
        .unwrap();

    // The vCenter gone: the gateway's resource shows it unreachable with its last error, and
    // the machine unreachable, not missing (nothing is created again, nothing healed).
    drop(sim);
    let lab = pcg_e2e::wait_for("the vCenter reported unreachable", T, || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let g = saas
            .ok("GET", &format!("/v1/gateways/{gw}"), &key, None)
            .await
            .ok()?;
        let lab = g["health"]["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "lab")?
            .clone();
        (lab["reachable"] == false).then_some(lab)
    })
    .await
    .unwrap();
    assert!(
        lab["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{lab}"
    );
    assert!(lab["last_ok_ms"].is_i64(), "{lab}");
    let v = machines::wait_machine(&saas, &key, &heal, "unreachable", T, |v| {
        v["state"] == "unreachable"
    })
    .await
    .unwrap();
    assert!(v["observed"]["error"].as_str().is_some(), "{v}");
    let c = machines::watch_cycles(&saas, &key, &gw).await.unwrap_or(0);
    machines::wait_cycles(&saas, &key, &gw, c, 3, T)
        .await
        .unwrap();
    let acted: Vec<Value> = machines::events(&saas, &key, &heal, "machine.")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| {
            ["machine.heal", "machine.converged"].contains(&e["kind"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        acted.len(),
        4,
        "create, two heals, the update's power-on: {acted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_metal_node_powered_on_behind_pcg_is_powered_off_even_while_the_tunnel_is_down() {
    let Some(bmc) = IpmiSim::start() else { return };
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw) = pcg_e2e::paired_with(dir.path(), SaasOptions::default(), FAST_WATCH)
        .await
        .unwrap();
    machines::command(
        &saas,
        &key,
        &gw,
        "baremetal.enrol",
        json!({"name": "node1", "protocol": "ipmi", "endpoint": {
            "address": format!("127.0.0.1:{}", bmc.port),
            "user": IPMI_USER, "password": IPMI_PASSWORD, "timeout_ms": 3000}}),
    )
    .await
    .unwrap();
    bmc.ipmitool(&["chassis", "power", "on"]).unwrap();
    let status = || bmc.ipmitool(&["chassis", "power", "status"]).unwrap();
    // Declared off: converged (powered off, not a heal).
    let id = machines::declare(
        &saas,
        &key,
        &gw,
        json!({"name": "rack-7", "power": "off", "policy": "heal",
               "bare_metal": {"bmc": "node1"}}),
    )
    .await
    .unwrap();
    let v = machines::wait_machine(&saas, &key, &id, "in sync", T, |v| v["state"] == "in_sync")
        .await
        .unwrap();
    assert_eq!(v["observed"]["power"], "off", "{v}");
    assert!(status().contains("is off"), "{}", status());
    let conv = machines::events(&saas, &key, &id, "machine.converged")
        .await
        .unwrap();
    assert_eq!(conv.len(), 1, "{conv:?}");
    assert!(machines::events(&saas, &key, &id, "machine.heal")
        .await
        .unwrap()
        .is_empty());

    // Powered on by ipmitool: healed (powered off), and the heal is in the events.
    bmc.ipmitool(&["chassis", "power", "on"]).unwrap();
    let evs = machines::wait_events(&saas, &key, &id, "machine.heal", 1, T)
        .await
        .unwrap();
    assert_eq!(evs[0]["details"]["ok"], true, "{evs:?}");
    assert_eq!(evs[0]["details"]["action"]["to"], "off", "{evs:?}");
    assert!(status().contains("is off"), "{}", status());
    assert!(bmc.actions().contains("power"), "{}", bmc.actions());

    // The tunnel down (the SaaS stopped): the gateway still heals from its own copy of the
    // declaration, and the heal reaches the events once the SaaS is back.
    let mut saas = saas;
    saas.proc.stop();
    bmc.ipmitool(&["chassis", "power", "on"]).unwrap();
    assert!(status().contains("is on"), "{}", status());
    pcg_e2e::wait_for("healed while the SaaS is down", T, || async {
        status().contains("is off").then_some(())
    })
    .await
    .unwrap();
    let (saas, _) = saas.restart(Duration::from_secs(10)).await.unwrap();
    let evs = machines::wait_events(&saas, &key, &id, "machine.heal", 2, T)
        .await
        .unwrap();
    assert_eq!(evs[1]["details"]["ok"], true, "{evs:?}");
    assert_eq!(
        machines::events(&saas, &key, &id, "machine.drift")
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cycle_over_a_thousand_vms_is_one_paged_inventory_read() {
    // 500 VMs in each of the two resource pools (one cluster, one standalone host).
    let Some(sim) = Vcsim::start(&["-vm", "500", "-cluster-host", "1"]) else {
        return;
    };
    let vms: Vec<Value> = sim
        .reference(&["list"])
        .into_iter()
        .filter(|r| r["template"] == false)
        .collect();
    assert_eq!(vms.len(), 1000);
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw) = pcg_e2e::paired_with(dir.path(), SaasOptions::default(), FAST_WATCH)
        .await
        .unwrap();
    machines::command(
        &saas,
        &key,
        &gw,
        "vsphere.enrol",
        json!({"name": "big", "endpoint": sim.endpoint()}),
    )
    .await
    .unwrap();
    let ids = machines::adopt_all(&saas, &key, &gw, "big", &vms)
        .await
        .unwrap();
    assert_eq!(ids.len(), 1000);
    let figures = machines::wait_all_in_sync(&saas, &key, &gw, 1000, Duration::from_secs(240))
        .await
        .unwrap();
    eprintln!("{figures}");
    // Reports made once every machine was declared: one read of the vCenter per cycle, whatever
    // the number of machines. Health goes out every report interval; wait for two such reports.
    let history_url = format!("/v1/gateways/{gw}/health?limit=20");
    let full_reads = |history: &Value| -> Vec<Value> {
        history
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| {
                        h["health"]["endpoints"]
                            .as_array()?
                            .iter()
                            .find(|e| e["name"] == "big" && e["machines"] == 1000)
                            .cloned()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let reads = pcg_e2e::wait_for(
        "two health reports covering the 1,000 machines",
        Duration::from_secs(120),
        || async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let history = saas.ok("GET", &history_url, &key, None).await.ok()?;
            let reads = full_reads(&history);
            (reads.len() >= 2).then_some(reads)
        },
    )
    .await
    .unwrap();
    for r in &reads {
        let requests = r["read_requests"].as_u64().unwrap();
        // CreateContainerView, RetrievePropertiesEx, two continuations (pages of 500 of 1,001
        // objects), DestroyView; a session keep-alive may fall into a cycle.
        assert!(
            (4..=6).contains(&requests),
            "a cycle cost {requests} SOAP requests for 1,000 machines: {r}"
        );
        assert_eq!(r["vms"], 1000, "{r}");
    }
}
