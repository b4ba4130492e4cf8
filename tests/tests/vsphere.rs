//! vSphere end to end: REST command → tunnel → gateway → pcg-vsphere → vcsim, with govmomi's
//! reference client reading back what pcg did.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pcg_e2e::vcsim::{Vcsim, VCSIM_USER};
use pcg_e2e::SaasOptions;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_commands_through_the_tunnel() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let run = |kind: &'static str, payload: Value| {
        let saas = &saas;
        let key = &key;
        let gw_id = &gw_id;
        async move {
            let id = saas.submit(key, gw_id, kind, payload).await.unwrap();
            let v = saas
                .wait_command(key, &id, Duration::from_secs(60))
                .await
                .unwrap();
            (id, v)
        }
    };
    let endpoint = sim.endpoint();

    // A wrong password: an auth error naming vCenter and the user; the password is redacted.
    let mut wrong = endpoint.clone();
    wrong["password"] = json!("not-the-password");
    let (_, v) = run("vsphere.inventory", json!({ "endpoint": wrong })).await;
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["result"]["error_class"], "auth", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(msg.contains(VCSIM_USER) && msg.contains(&sim.url), "{msg}");
    assert_eq!(v["payload"]["endpoint"]["password"], "<redacted>", "{v}");

    // Inventory: the same VMs as the reference client lists.
    let (_, v) = run("vsphere.inventory", json!({ "endpoint": endpoint })).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let out = &v["result"]["output"];
    assert!(out["objects"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["kind"] == "Datacenter"));
    let mut ours: Vec<String> = out["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    let mut theirs: Vec<String> = sim
        .reference(&["list"])
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);

    // Create: clone, power on, guest IP; the VM carries the command id.
    let spec = json!({
        "name": "e2e-vm", "source": "pcg-template", "cpus": 2, "memory_mib": 2048,
        "user_data": "#cloud-config\n",
        "placement": {"provider": "vsphere", "datacenter": "DC0", "cluster": "DC0_C0"},
    });
    let (cmd_id, v) = run(
        "vsphere.create",
        json!({ "endpoint": endpoint, "spec": spec, "wait_ip_ms": 20000 }),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let vm = &v["result"]["output"];
    assert_eq!(vm["power"], "on", "{vm}");
    assert_eq!(vm["cpus"], 2, "{vm}");
    assert_eq!(vm["memory_mib"], 2048, "{vm}");
    assert!(vm["ip"].as_str().is_some_and(|s| !s.is_empty()), "{vm}");
    assert_eq!(vm["command_id"], cmd_id.as_str(), "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    let listing = sim.reference(&["list"]);
    let row = listing.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(row["command_id"], cmd_id.as_str());
    assert_eq!(row["power"], "poweredOn");

    let (_, v) = run(
        "vsphere.power",
        json!({ "endpoint": endpoint, "id": id, "action": "off" }),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["power"], "off", "{v}");

    let (_, v) = run("vsphere.get", json!({ "endpoint": endpoint, "id": id })).await;
    assert_eq!(v["result"]["output"]["power"], "off", "{v}");

    let (_, v) = run("vsphere.delete", json!({ "endpoint": endpoint, "id": id })).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["deleted"], true, "{v}");
    assert!(sim
        .reference(&["list"])
        .iter()
        .all(|r| r["id"] != id.as_str()));

    let (_, v) = run("vsphere.get", json!({ "endpoint": endpoint, "id": id })).await;
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");
}
