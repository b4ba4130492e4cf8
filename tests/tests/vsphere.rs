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

/// A vCenter password no other byte of this test would contain by chance.
const ENROLLED_PASSWORD: &str = "vc-Enrol-7f3a9c21e5";

/// Session keys vcsim lists, read by `observer`.
async fn server_sessions(observer: &pcg_vsphere::VsphereDriver) -> Vec<String> {
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

/// Every file under `dir` that holds `needle` (as bytes).
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_endpoint_enrolled_by_name_survives_a_restart_and_its_password_stays_sealed() {
    let Some(sim) = Vcsim::start(&["-pass", ENROLLED_PASSWORD]) else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, mut gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
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

    // Before any enrolment: an unknown name says none is enrolled and how to enrol one.
    let (_, v) = run("vsphere.get", json!({"endpoint": "lab", "id": "vm-1"})).await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains("none") && msg.contains("vsphere.enrol"),
        "{msg}"
    );

    // A wrong password enrols nothing.
    let mut wrong = endpoint.clone();
    wrong["password"] = json!("not-the-password");
    let (_, v) = run("vsphere.enrol", json!({"name": "lab", "endpoint": wrong})).await;
    assert_eq!(v["result"]["error_class"], "auth", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(msg.contains("vCenter") && !msg.contains("BMC"), "{msg}");
    let (_, v) = run("vsphere.inventory", json!({"endpoint": "lab"})).await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");

    let (_, v) = run(
        "vsphere.enrol",
        json!({"name": "lab", "endpoint": endpoint}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let out = &v["result"]["output"];
    assert_eq!(out["name"], "lab", "{v}");
    assert_eq!(out["user"], VCSIM_USER, "{v}");
    assert!(out["vcenter"].as_str().unwrap().contains("vCenter"), "{v}");
    assert!(!v.to_string().contains(ENROLLED_PASSWORD), "{v}");

    // Create by name.
    let spec = json!({
        "name": "enrolled-vm", "source": "pcg-template", "cpus": 1, "memory_mib": 512,
        "placement": {"provider": "vsphere", "datacenter": "DC0", "cluster": "DC0_C0"},
    });
    let (cmd_id, v) = run("vsphere.create", json!({"endpoint": "lab", "spec": spec})).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let id = v["result"]["output"]["id"].as_str().unwrap().to_owned();
    let listing = sim.reference(&["list"]);
    let row = listing.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(row["command_id"], cmd_id.as_str());

    // The gateway restarted still knows the name. (vcsim, read by an observer of our own, lists
    // the sessions; the stopped gateway's stays until it idles out.)
    let ep: pcg_vsphere::VsphereEndpoint = serde_json::from_value(endpoint.clone()).unwrap();
    let observer = pcg_vsphere::VsphereDriver::connect(&ep).await.unwrap();
    let before_restart = server_sessions(&observer).await;
    gw.proc.as_mut().unwrap().stop();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let (_, v) = run(
        "vsphere.power",
        json!({"endpoint": "lab", "id": id, "action": "off"}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["power"], "off", "{v}");
    let row = sim
        .reference(&["list"])
        .into_iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert_eq!(row["power"], "poweredOff");
    let (_, v) = run("vsphere.get", json!({"endpoint": "lab", "id": id})).await;
    assert_eq!(v["result"]["output"]["power"], "off", "{v}");

    // Re-enrolling the name replaces it and logs out the session of the old endpoint.
    let before: Vec<String> = server_sessions(&observer)
        .await
        .into_iter()
        .filter(|k| !before_restart.contains(k))
        .collect();
    assert_eq!(before.len(), 1, "the gateway's one session: {before:?}");
    let mut by_ca = endpoint.clone();
    by_ca["tls"] = json!({"ca_pem": std::fs::read_to_string(&sim.ca_path).unwrap()});
    let (_, v) = run("vsphere.enrol", json!({"name": "lab", "endpoint": by_ca})).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    pcg_e2e::wait_for(
        "the old session logged out",
        Duration::from_secs(30),
        || async {
            let now = server_sessions(&observer).await;
            (!now.contains(&before[0])).then_some(())
        },
    )
    .await
    .unwrap();

    // A reset found running after a restart (journaled, no result, while the gateway was
    // stopped) is not repeated: `interrupted`, with the VM's power state now.
    let (_, v) = run(
        "vsphere.power",
        json!({"endpoint": "lab", "id": id, "action": "on"}),
    )
    .await;
    assert_eq!(v["result"]["output"]["power"], "on", "{v}");
    let v = pcg_e2e::resumed_after_a_restart(
        &saas,
        &mut gw,
        &key,
        &gw_id,
        "vsphere.power",
        json!({"endpoint": "lab", "id": id, "action": "reset"}),
    )
    .await
    .unwrap();
    assert_eq!(v["result"]["error_class"], "interrupted", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("Reset of VM {id}")) && msg.contains("now: power state \"on\""),
        "{msg}"
    );

    let (_, v) = run("vsphere.delete", json!({"endpoint": "lab", "id": id})).await;
    assert_eq!(v["result"]["output"]["deleted"], true, "{v}");
    assert!(sim
        .reference(&["list"])
        .iter()
        .all(|r| r["id"] != id.as_str()));

    // The password is nowhere in the gateway's directory (store, journal, log) in clear.
    gw.proc.as_mut().unwrap().stop();
    let hits = files_holding(&gw.dir, ENROLLED_PASSWORD.as_bytes());
    assert!(hits.is_empty(), "the password is in {hits:?}");
    assert!(!gw.log().contains(ENROLLED_PASSWORD));
    // The search does see the store's bytes: the vCenter URL (no secret) is in the journal.
    assert!(
        !files_holding(&gw.dir.join("data"), sim.url.as_bytes()).is_empty(),
        "the store's files were not searched"
    );
}
