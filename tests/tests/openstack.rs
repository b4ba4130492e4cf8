//! OpenStack end to end: REST command → tunnel → gateway → pcg-openstack → real Keystone + Nova,
//! with the openstack CLI reading back what pcg did.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pcg_e2e::openstack_peer::OpenstackStack;
use pcg_e2e::SaasOptions;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_server_lifecycle_through_the_tunnel() {
    let Some(stack) = OpenstackStack::start() else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, _gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let run = |kind: &'static str, payload: serde_json::Value| {
        let saas = &saas;
        let key = &key;
        let gw_id = &gw_id;
        async move {
            let id = saas.submit(key, gw_id, kind, payload).await.unwrap();
            saas.wait_command(key, &id, Duration::from_secs(200))
                .await
                .unwrap()
        }
    };
    let cloud = stack.cloud();
    let name = format!("pcg-e2e-{}", std::process::id());

    // A wrong password: an auth error naming Keystone and the user; the password never shows.
    let mut wrong = cloud.clone();
    wrong["auth"]["password"] = json!("not-the-password");
    let v = run("openstack.inventory", json!({"cloud": wrong})).await;
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["result"]["error_class"], "auth", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains(stack.auth_url()) && msg.contains("admin"),
        "{msg}"
    );
    assert_eq!(v["payload"]["cloud"]["auth"]["password"], "<redacted>");
    assert!(!v.to_string().contains("not-the-password"));

    // A missing flavor: invalid_spec naming the flavors that exist; nothing created.
    let v = run(
        "openstack.create",
        json!({"cloud": cloud, "server": {"name": name, "flavor": "m1.missing", "image": "pcg-image"}}),
    )
    .await;
    assert_eq!(v["result"]["error_class"], "invalid_spec", "{v}");
    assert!(
        v["result"]["error_message"]
            .as_str()
            .unwrap()
            .contains("pcg.tiny"),
        "{v}"
    );

    let v = run(
        "openstack.create",
        json!({"cloud": cloud, "server": {"name": name, "flavor": "pcg.tiny", "image": "pcg-image",
               "user_data": "#cloud-config\n", "metadata": {"team": "e2e"}}}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(!v.to_string().contains(stack.password()));
    let out = &v["result"]["output"];
    assert_eq!(out["status"], "ACTIVE", "{v}");
    let id = out["id"].as_str().unwrap().to_string();
    assert_eq!(out["metadata"]["pcg_command_id"], v["id"], "{v}");
    assert_eq!(stack.status(&id).as_deref(), Some("ACTIVE"));

    let v = run(
        "openstack.power",
        json!({"cloud": cloud, "server": id, "action": "off"}),
    )
    .await;
    assert_eq!(v["result"]["output"]["status"], "SHUTOFF", "{v}");
    assert_eq!(stack.status(&id).as_deref(), Some("SHUTOFF"));
    let v = run(
        "openstack.power",
        json!({"cloud": cloud, "server": id, "action": "on"}),
    )
    .await;
    assert_eq!(v["result"]["output"]["status"], "ACTIVE", "{v}");
    assert_eq!(stack.status(&id).as_deref(), Some("ACTIVE"));

    let v = run("openstack.get", json!({"cloud": cloud, "server": id})).await;
    assert_eq!(v["result"]["output"]["id"], id, "{v}");
    let v = run("openstack.inventory", json!({"cloud": cloud})).await;
    let inv = &v["result"]["output"];
    assert!(
        inv["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id),
        "{v}"
    );
    assert!(
        inv["flavors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "pcg.tiny"),
        "{v}"
    );

    let v = run("openstack.delete", json!({"cloud": cloud, "server": id})).await;
    assert_eq!(v["result"]["output"]["deleted"], true, "{v}");
    assert_eq!(stack.status(&id), None);
    let v = run("openstack.get", json!({"cloud": cloud, "server": id})).await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");
}
