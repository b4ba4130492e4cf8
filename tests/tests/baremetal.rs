//! Bare metal end to end: REST command → tunnel → gateway → IPMI driver → ipmi_sim, with
//! ipmitool reading back what pcg set.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pcg_e2e::peers::{IpmiSim, IPMI_PASSWORD, IPMI_USER};
use pcg_e2e::SaasOptions;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipmi_power_through_the_tunnel() {
    let Some(bmc) = IpmiSim::start() else { return };
    let dir = pcg_e2e::test_dir();
    let (saas, mut gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let run = |kind: &'static str, payload: serde_json::Value| {
        let saas = &saas;
        let key = &key;
        let gw_id = &gw_id;
        async move {
            let id = saas.submit(key, gw_id, kind, payload).await.unwrap();
            saas.wait_command(key, &id, Duration::from_secs(60))
                .await
                .unwrap()
        }
    };
    let endpoint = bmc.endpoint(3000);

    // A wrong password is an auth error naming the BMC and the user, and enrols nothing.
    let mut wrong = endpoint.clone();
    wrong["password"] = json!("not-the-password");
    let v = run(
        "baremetal.enrol",
        json!({"name": "node1", "protocol": "ipmi", "endpoint": wrong}),
    )
    .await;
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["result"]["error_class"], "auth", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains(IPMI_USER) && msg.contains(&bmc.port.to_string()),
        "{msg}"
    );
    // The password never comes back from the API.
    assert_eq!(v["payload"]["endpoint"]["password"], "<redacted>");

    let v = run(
        "baremetal.enrol",
        json!({"name": "node1", "protocol": "ipmi", "endpoint": endpoint}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(!v.to_string().contains(IPMI_PASSWORD));

    // Power answers the state after the change without being asked to wait.
    for (action, expect) in [("on", "on"), ("off", "off"), ("on", "on")] {
        let v = run("baremetal.power", json!({"bmc": "node1", "action": action})).await;
        assert_eq!(v["state"], "succeeded", "{v}");
        assert_eq!(v["result"]["output"]["state"], expect, "{v}");
        let seen = bmc.ipmitool(&["chassis", "power", "status"]).unwrap();
        assert!(
            seen.contains(&format!("is {expect}")),
            "ipmitool says {seen:?}"
        );
    }
    let v = run("baremetal.get", json!({"bmc": "node1"})).await;
    assert_eq!(v["state"], "succeeded", "{v}");

    // An unknown BMC name says which ones are enrolled.
    let v = run("baremetal.power", json!({"bmc": "node9", "action": "on"})).await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");
    assert!(
        v["result"]["error_message"]
            .as_str()
            .unwrap()
            .contains("node1"),
        "{v}"
    );
    // A malformed payload is refused by the driver's parser, with nothing sent to the BMC.
    let before = bmc.actions();
    let v = run(
        "baremetal.power",
        json!({"bmc": "node1", "action": "explode"}),
    )
    .await;
    assert_eq!(v["result"]["error_class"], "invalid_spec", "{v}");
    assert_eq!(
        bmc.actions()
            .lines()
            .filter(|l| l.contains(" set "))
            .count(),
        before.lines().filter(|l| l.contains(" set ")).count()
    );
    // Enrolled BMCs survive a restart of the gateway (credentials restored from its store).
    gw.proc.as_mut().unwrap().stop();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let v = run(
        "baremetal.power",
        json!({"bmc": "node1", "action": "off", "wait": true}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .unwrap()
        .contains("is off"));

    // The boot override as a command of its own: read back by ipmitool, and the BMC was asked
    // for no power change.
    let power_writes = |log: &str| log.lines().filter(|l| l.contains(" set power")).count();
    let before = power_writes(&bmc.actions());
    let v = run(
        "baremetal.boot",
        json!({"bmc": "node1", "device": "disk", "persistence": "continuous", "mode": "uefi"}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["output"]["boot"]["device"], "disk", "{v}");
    assert_eq!(v["result"]["output"]["power"], "off", "{v}");
    assert!(bmc
        .ipmitool(&["chassis", "bootparam", "get", "5"])
        .unwrap()
        .contains("Force Boot from default Hard-Drive"));
    let v = run(
        "baremetal.power",
        json!({"bmc": "node1", "action": "status"}),
    )
    .await;
    assert_eq!(v["result"]["output"]["state"], "off", "{v}");
    assert_eq!(power_writes(&bmc.actions()), before, "{}", bmc.actions());
    // IPMI has no virtual media: the command says so.
    let v = run(
        "baremetal.insert_media",
        json!({"bmc": "node1", "image_url": "http://127.0.0.1:9/boot.iso"}),
    )
    .await;
    assert_eq!(v["result"]["error_class"], "unsupported", "{v}");
}

/// A power cycle found running after a restart of the gateway (journaled, no result: the
/// gateway died while it ran) is not repeated: it ends `interrupted`, saying what it was and the
/// power state the BMC reports now, and the BMC is asked for no power change. The gateway's
/// death mid-command is made by journaling the command as running while the gateway is stopped
/// (a kill cannot be timed between the journal and the BMC's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cycle_found_running_after_a_restart_is_not_repeated() {
    let Some(bmc) = IpmiSim::start() else { return };
    let dir = pcg_e2e::test_dir();
    let (saas, mut gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let wait = |id: String| {
        let (saas, key) = (&saas, &key);
        async move {
            saas.wait_command(key, &id, Duration::from_secs(60))
                .await
                .unwrap()
        }
    };
    let endpoint = bmc.endpoint(3000);
    for (kind, payload) in [
        (
            "baremetal.enrol",
            json!({"name": "node1", "protocol": "ipmi", "endpoint": endpoint}),
        ),
        ("baremetal.power", json!({"bmc": "node1", "action": "on"})),
    ] {
        let id = saas.submit(&key, &gw_id, kind, payload).await.unwrap();
        let v = wait(id).await;
        assert_eq!(v["state"], "succeeded", "{v}");
    }

    let power_writes = |log: &str| log.lines().filter(|l| l.contains(" set power")).count();
    let before = power_writes(&bmc.actions());
    let v = pcg_e2e::resumed_after_a_restart(
        &saas,
        &mut gw,
        &key,
        &gw_id,
        "baremetal.power",
        json!({"bmc": "node1", "action": "cycle"}),
    )
    .await
    .unwrap();
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["result"]["error_class"], "interrupted", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    for part in [
        "baremetal.power on BMC \"node1\"",
        "not repeated",
        "now: power state \"on\"",
        "send it again",
    ] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    assert_eq!(power_writes(&bmc.actions()), before, "{}", bmc.actions());
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .unwrap()
        .contains("is on"));
}
