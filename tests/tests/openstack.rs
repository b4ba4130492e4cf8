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
async fn openstack_cloud_enrolled_by_name_survives_a_restart_and_its_password_stays_sealed() {
    let Some(stack) = OpenstackStack::start() else {
        return;
    };
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
            saas.wait_command(key, &id, Duration::from_secs(200))
                .await
                .unwrap()
        }
    };
    let lab = json!({"enrolled": "lab"});

    // Before any enrolment: an unknown name says none is enrolled and how to enrol one.
    let v = run("openstack.inventory", json!({"cloud": lab})).await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains("none") && msg.contains("openstack.enrol"),
        "{msg}"
    );
    // Only an inline entry is enrolled (a clouds.yaml name is already on the gateway host).
    let v = run("openstack.enrol", json!({"name": "lab", "cloud": "pcg"})).await;
    assert_eq!(v["result"]["error_class"], "invalid_spec", "{v}");
    // A wrong password enrols nothing; the error is Keystone's, not a BMC's.
    let mut wrong = stack.cloud();
    wrong["auth"]["password"] = json!("not-the-password");
    let v = run("openstack.enrol", json!({"name": "lab", "cloud": wrong})).await;
    assert_eq!(v["result"]["error_class"], "auth", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(msg.contains("Keystone") && !msg.contains("BMC"), "{msg}");
    let v = run("openstack.inventory", json!({"cloud": lab})).await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");

    let v = run(
        "openstack.enrol",
        json!({"name": "lab", "cloud": stack.cloud()}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let out = &v["result"]["output"];
    assert_eq!(out["auth_url"], stack.auth_url(), "{v}");
    assert_eq!(out["user"], "admin", "{v}");
    assert_eq!(out["project"], "admin", "{v}");
    assert!(!v.to_string().contains(stack.password()), "{v}");

    let name = format!("pcg-e2e-enrolled-{}", std::process::id());
    let v = run(
        "openstack.create",
        json!({"cloud": lab, "server": {"name": name, "flavor": "pcg.tiny", "image": "pcg-image"}}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let id = v["result"]["output"]["id"].as_str().unwrap().to_string();
    assert_eq!(stack.status(&id).as_deref(), Some("ACTIVE"));

    // The gateway restarted still knows the name.
    gw.proc.as_mut().unwrap().stop();
    gw.start().unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(30))
        .await
        .unwrap();
    let v = run(
        "openstack.power",
        json!({"cloud": lab, "server": id, "action": "off"}),
    )
    .await;
    assert_eq!(v["result"]["output"]["status"], "SHUTOFF", "{v}");
    assert_eq!(stack.status(&id).as_deref(), Some("SHUTOFF"));
    let v = run("openstack.get", json!({"cloud": lab, "server": id})).await;
    assert_eq!(v["result"]["output"]["id"], id, "{v}");

    // A reboot found running after a restart (journaled, no result, while the gateway was
    // stopped) is not repeated: `interrupted`, with the server's status now.
    let v = pcg_e2e::resumed_after_a_restart(
        &saas,
        &mut gw,
        &key,
        &gw_id,
        "openstack.power",
        json!({"cloud": lab, "server": id, "action": "reset"}),
    )
    .await
    .unwrap();
    assert_eq!(v["result"]["error_class"], "interrupted", "{v}");
    let msg = v["result"]["error_message"].as_str().unwrap();
    assert!(
        msg.contains("openstack.power") && msg.contains(&format!("now: server {id} is SHUTOFF")),
        "{msg}"
    );

    // An unknown name lists the enrolled ones.
    let v = run(
        "openstack.get",
        json!({"cloud": {"enrolled": "lab2"}, "server": id}),
    )
    .await;
    assert_eq!(v["result"]["error_class"], "not_found", "{v}");
    assert!(
        v["result"]["error_message"]
            .as_str()
            .unwrap()
            .contains("enrolled: lab)"),
        "{v}"
    );

    // Re-enrolling the name replaces the entry; commands keep working through it.
    let mut again = stack.cloud();
    again["interface"] = json!("public");
    let v = run("openstack.enrol", json!({"name": "lab", "cloud": again})).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let v = run("openstack.delete", json!({"cloud": lab, "server": id})).await;
    assert_eq!(v["result"]["output"]["deleted"], true, "{v}");
    assert_eq!(stack.status(&id), None);

    // The password is nowhere in the gateway's directory (store, journal, log) in clear.
    gw.proc.as_mut().unwrap().stop();
    let hits = files_holding(&gw.dir, stack.password().as_bytes());
    assert!(hits.is_empty(), "the password is in {hits:?}");
    assert!(!gw.log().contains(stack.password()));
    // The search does see the store's bytes: the auth URL (no secret) is in the journal.
    assert!(
        !files_holding(&gw.dir.join("data"), stack.auth_url().as_bytes()).is_empty(),
        "the store's files were not searched"
    );
}

/// `pcgctl diag` checks an enrolled cloud with a fresh Keystone login: it passes, and once the
/// user's password is changed in Keystone it names that cloud as failed (and nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diag_checks_an_enrolled_cloud_with_a_fresh_keystone_token() {
    let Some(stack) = OpenstackStack::start() else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    // A user of this test's own, so changing its password disturbs no other test.
    let user = format!("pcg-diag-{}", std::process::id());
    let password = "Diag-1-password";
    let (ok, out) = stack.cli(&["user", "create", "--password", password, &user]);
    assert!(ok, "{out}");
    let (ok, out) = stack.cli(&[
        "role",
        "add",
        "--user",
        &user,
        "--project",
        "admin",
        "admin",
    ]);
    assert!(ok, "{out}");
    let mut cloud = stack.cloud();
    cloud["auth"]["username"] = json!(user);
    cloud["auth"]["password"] = json!(password);
    let id = saas
        .submit(
            &key,
            &gw_id,
            "openstack.enrol",
            json!({"name": "lab", "cloud": cloud}),
        )
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(200))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");

    let (code, r) = gw.diag(&[], &["--check-timeout", "60", "--total-timeout", "120"]);
    let os = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["hop"] == "openstack")
        .cloned()
        .unwrap();
    eprintln!("{r}");
    assert_eq!(os["status"], "ok", "{r}");
    assert!(
        os["detail"].as_str().unwrap().contains("issued a token"),
        "{os}"
    );
    assert_eq!(code, Some(0), "{r}");

    let (ok, out) = stack.cli(&["user", "set", "--password", "Diag-2-password", &user]);
    assert!(ok, "{out}");
    let (code, r) = gw.diag(&[], &["--check-timeout", "60", "--total-timeout", "120"]);
    let failed: Vec<&serde_json::Value> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["hop"], "openstack", "{r}");
    assert_eq!(failed[0]["target"], "lab", "{r}");
    assert!(
        failed[0]["detail"].as_str().unwrap().contains(&user)
            && failed[0]["action"]
                .as_str()
                .unwrap()
                .contains("openstack.enrol"),
        "{r}"
    );
    assert_eq!(code, Some(2), "{r}");
    assert!(!r.to_string().contains("Diag-1-password") && !r.to_string().contains("Diag-2"));
    let _ = stack.cli(&["user", "delete", &user]);
}
