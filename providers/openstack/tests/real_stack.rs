//! Conformance of pcg-openstack against a real Keystone + Nova (Debian packages, started by
//! scripts/peers/openstack/start.sh), every effect cross-checked with the openstack CLI.
//!
//! Each check is its own test (so none comes near the runner's timeout on a busy machine); they
//! use the shared stack one at a time (Nova on sqlite refuses concurrent writes now and then,
//! "database is locked"): `Stack::start` takes the stack's lock, and under nextest the tests of
//! this binary also form one test group of one thread (.config/nextest.toml), so a test's time
//! is not spent waiting for the lock.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use std::sync::Arc;

use common::{unique, Blackhole, Stack};
use pcg_openstack::command::OpenstackService;
use pcg_openstack::{CloudEntry, OpenStack, ServerSpec};
use pcg_provider::vm::{VmPlacement, VmProvider, VmSpec};
use pcg_provider::{ErrorKind, PowerAction, PowerState};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn auth_by_password_application_credential_and_clouds_yaml() {
    let Some(stack) = Stack::start() else { return };
    auth_by_password_application_credential_and_clouds_yaml_(&stack).await;
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_naming_auth_url_and_user() {
    let Some(stack) = Stack::start() else { return };
    wrong_password_is_an_auth_error_naming_auth_url_and_user_(&stack).await;
}

#[tokio::test]
async fn create_active_stop_start_delete_checked_with_the_cli() {
    let Some(stack) = Stack::start() else { return };
    create_active_stop_start_delete_checked_with_the_cli_(&stack).await;
}

#[tokio::test]
async fn missing_flavor_or_image_lists_what_exists() {
    let Some(stack) = Stack::start() else { return };
    missing_flavor_or_image_lists_what_exists_(&stack).await;
}

#[tokio::test]
async fn key_pair_and_error_state_with_nova_fault() {
    let Some(stack) = Stack::start() else { return };
    key_pair_and_error_state_with_nova_fault_(&stack).await;
}

#[tokio::test]
async fn the_same_create_twice_leaves_exactly_one_server() {
    let Some(stack) = Stack::start() else { return };
    the_same_create_twice_leaves_exactly_one_server_(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keystone_that_does_not_answer_stalls_only_its_own_commands() {
    let Some(stack) = Stack::start() else { return };
    let dead = Blackhole::start().await;
    let svc = Arc::new(OpenstackService::new());
    let mut dead_entry = stack.admin_entry();
    dead_entry["auth"]["auth_url"] = json!(format!("{}/v3", dead.url));
    dead_entry["timeout_ms"] = json!(20_000);
    let dead_cloud = CloudEntry::inline(dead_entry).unwrap();
    let mut dialling = Vec::new();
    for _ in 0..2 {
        let (svc, c) = (svc.clone(), dead_cloud.clone());
        dialling.push(tokio::spawn(async move { svc.client(&c).await }));
    }
    dead.wait_accepted(1).await;
    // Meanwhile the real cloud logs in and answers, and commands arriving together for it
    // share one login (one client).
    let mut live = Vec::new();
    for _ in 0..3 {
        let (svc, c) = (svc.clone(), stack.admin());
        live.push(tokio::spawn(async move { svc.client(&c).await }));
    }
    let mut clients = Vec::new();
    for t in live {
        clients.push(t.await.unwrap().unwrap());
    }
    assert!(clients.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    assert!(!clients[0].flavors().await.unwrap().is_empty());
    assert!(
        dialling.iter().all(|t| !t.is_finished()),
        "the real cloud's commands waited for the dead Keystone's login"
    );
    for t in dialling {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        let s = e.to_string();
        assert!(s.contains("within 20s") && s.contains("Keystone"), "{s}");
        assert!(!s.contains("BMC"), "{s}");
    }
    assert_eq!(dead.accepted(), 1, "one login attempt for both commands");
}

fn spec(name: &str) -> ServerSpec {
    ServerSpec {
        name: name.into(),
        flavor: "pcg.tiny".into(),
        image: "pcg-image".into(),
        ..ServerSpec::default()
    }
}

async fn auth_by_password_application_credential_and_clouds_yaml_(stack: &Stack) {
    // Password, inline entry.
    let os = OpenStack::connect(stack.admin()).await.unwrap();
    assert!(!os.flavors().await.unwrap().is_empty());

    // clouds.yaml written by the start script, by cloud name, and through OS_CLOUD.
    let file = stack.dir.join("clouds.yaml");
    let os = OpenStack::connect(CloudEntry::from_file(&file, "pcg").unwrap())
        .await
        .unwrap();
    assert!(os
        .images()
        .await
        .unwrap()
        .iter()
        .any(|i| i.name == "pcg-image"));
    let f = file.display().to_string();
    let e = CloudEntry::from_vars(|k| match k {
        "OS_CLOUD" => Some("pcg".into()),
        "OS_CLIENT_CONFIG_FILE" => Some(f.clone()),
        _ => None,
    })
    .unwrap();
    OpenStack::connect(e).await.unwrap().list().await.unwrap();
    // OS_* variables alone.
    let env = stack.env.clone();
    let e = CloudEntry::from_vars(|k| env.get(k).cloned()).unwrap();
    OpenStack::connect(e).await.unwrap();

    // An application credential made with the CLI.
    let name = unique("pcg-appcred");
    let out = stack.cli(&["application", "credential", "create", &name, "-f", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entry = json!({
        "auth_type": "v3applicationcredential",
        "auth": {
            "auth_url": stack.auth_url(),
            "application_credential_id": v["id"],
            "application_credential_secret": v["secret"],
        },
        "region_name": "RegionOne",
    });
    let os = OpenStack::connect(CloudEntry::inline(entry.clone()).unwrap())
        .await
        .unwrap();
    assert!(!os.flavors().await.unwrap().is_empty());
    // A wrong secret is an auth error naming the credential.
    let mut bad = entry;
    bad["auth"]["application_credential_secret"] = json!("wrong");
    let e = OpenStack::connect(CloudEntry::inline(bad).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(e.to_string().contains(v["id"].as_str().unwrap()), "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
    stack.cli(&["application", "credential", "delete", &name]);
}

async fn wrong_password_is_an_auth_error_naming_auth_url_and_user_(stack: &Stack) {
    let mut entry = stack.admin_entry();
    entry["auth"]["password"] = json!("not-the-password");
    let e = OpenStack::connect(CloudEntry::inline(entry).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    let s = e.to_string();
    assert!(
        s.contains(stack.auth_url()) && s.contains("\"admin\""),
        "{s}"
    );
    assert!(!s.contains("not-the-password"), "{s}");
    // The hint is Keystone's own (project and domain, application credential), never a BMC's.
    assert!(s.contains("Keystone") && s.contains("project"), "{s}");
    assert!(!s.contains("BMC"), "{s}");
    // Nothing listens: unreachable, naming the URL.
    let mut entry = stack.admin_entry();
    entry["auth"]["auth_url"] = json!("http://127.0.0.1:9/v3");
    let e = OpenStack::connect(CloudEntry::inline(entry).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
    assert!(e.to_string().contains("auth URL"), "{e}");
    assert!(!e.to_string().contains("BMC"), "{e}");
}

async fn create_active_stop_start_delete_checked_with_the_cli_(stack: &Stack) {
    let os = OpenStack::connect(stack.admin()).await.unwrap();
    let name = unique("pcg-life");
    let mut s = spec(&name);
    s.user_data = Some("#cloud-config\n".into());
    s.metadata.insert("owner".into(), "pcg-test".into());
    let created = os.create(Some(&unique("cmd")), &s).await.unwrap();
    let active = os.wait_status(&created.id, "ACTIVE", WAIT).await.unwrap();
    assert_eq!(active.power(), PowerState::On);
    assert_eq!(stack.cli_status(&created.id).as_deref(), Some("ACTIVE"));
    assert_eq!(
        active.metadata.get("owner").map(String::as_str),
        Some("pcg-test")
    );

    let off = os.power(&created.id, PowerAction::Off, WAIT).await.unwrap();
    assert_eq!(off.status, "SHUTOFF");
    assert_eq!(stack.cli_status(&created.id).as_deref(), Some("SHUTOFF"));
    // Off again: a no-op.
    os.power(&created.id, PowerAction::Off, WAIT).await.unwrap();
    let on = os.power(&created.id, PowerAction::On, WAIT).await.unwrap();
    assert_eq!(on.status, "ACTIVE");
    assert_eq!(stack.cli_status(&created.id).as_deref(), Some("ACTIVE"));
    let rebooted = os
        .power(&created.id, PowerAction::Reset, WAIT)
        .await
        .unwrap();
    assert_eq!(rebooted.status, "ACTIVE");

    assert!(os.list().await.unwrap().iter().any(|x| x.id == created.id));
    assert!(os.delete(&created.id, WAIT).await.unwrap());
    assert_eq!(stack.cli_status(&created.id), None);
    assert!(stack.cli_ids_named(&name).is_empty());
    // Deleting again: already gone.
    assert!(!os.delete(&created.id, WAIT).await.unwrap());
    let e = os.get(&created.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("OpenStack"), "{e}");
    assert!(!e.to_string().contains("BMC"), "{e}");
}

async fn missing_flavor_or_image_lists_what_exists_(stack: &Stack) {
    let os = OpenStack::connect(stack.admin()).await.unwrap();
    let name = unique("pcg-missing");
    let mut s = spec(&name);
    s.flavor = "m1.nonexistent".into();
    let e = os.create(Some("c-missing-flavor"), &s).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
    let m = e.to_string();
    assert!(
        m.contains("m1.nonexistent") && m.contains("pcg.tiny") && m.contains("pcg.small"),
        "{m}"
    );
    let mut s = spec(&name);
    s.image = "no-such-image".into();
    let e = os.create(Some("c-missing-image"), &s).await.unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("no-such-image") && m.contains("pcg-image"),
        "{m}"
    );
    let mut s = spec(&name);
    s.networks = vec!["no-such-net".into()];
    let e = os.create(Some("c-missing-net"), &s).await.unwrap_err();
    assert!(e.to_string().contains("no-such-net"), "{e}");
    assert!(stack.cli_ids_named(&name).is_empty(), "nothing was created");
}

async fn the_same_create_twice_leaves_exactly_one_server_(stack: &Stack) {
    let os = OpenStack::connect(stack.admin()).await.unwrap();
    let name = unique("pcg-once");
    let cmd = unique("cmd-once");
    // Through the provider contract: a create delivered twice (a retry after a crash).
    let vm = VmSpec {
        name: name.clone(),
        source: "pcg-image".into(),
        cpus: Some(1),
        memory_mib: Some(16),
        networks: vec![],
        user_data: None,
        metadata: None,
        power_on: true,
        placement: VmPlacement::Openstack {
            flavor: None,
            availability_zone: None,
        },
    };
    let first = VmProvider::create(&os, &cmd, &vm, &pcg_provider::no_progress)
        .await
        .unwrap();
    let again = VmProvider::create(&os, &cmd, &vm, &pcg_provider::no_progress)
        .await
        .unwrap();
    assert_eq!(first.id, again.id);
    assert_eq!(first.command_id.as_deref(), Some(cmd.as_str()));
    assert_eq!(stack.cli_ids_named(&name), vec![first.id.clone()]);
    let found = VmProvider::find_by_command(&os, &cmd)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, first.id);
    // Another command with the same name is another server.
    let other = os
        .create(Some(&unique("cmd-other")), &spec(&name))
        .await
        .unwrap();
    assert_ne!(other.id, first.id);
    assert_eq!(stack.cli_ids_named(&name).len(), 2);
    for id in [first.id, other.id] {
        os.delete(&id, WAIT).await.unwrap();
    }
    assert!(stack.cli_ids_named(&name).is_empty());
}

async fn key_pair_and_error_state_with_nova_fault_(stack: &Stack) {
    let os = OpenStack::connect(stack.admin()).await.unwrap();
    // A key pair made with the CLI, given by name.
    let key = unique("pcg-key");
    // (It prints the private key, which is dropped here.)
    stack.cli(&["keypair", "create", &key]);
    let name = unique("pcg-key-srv");
    let mut s = spec(&name);
    s.key_name = Some(key.clone());
    s.availability_zone = Some("nova".into());
    let created = os.create(Some(&unique("cmd-key")), &s).await.unwrap();
    os.wait_status(&created.id, "ACTIVE", WAIT).await.unwrap();
    let shown = stack.cli(&[
        "server",
        "show",
        &created.id,
        "-f",
        "value",
        "-c",
        "key_name",
    ]);
    assert_eq!(shown.trim(), key);
    os.delete(&created.id, WAIT).await.unwrap();
    stack.cli(&["keypair", "delete", &key]);

    // A flavor no host can hold: the server goes to ERROR and the wait reports Nova's fault.
    let flavor = unique("pcg-huge");
    stack.cli(&[
        "flavor",
        "create",
        "--ram",
        "100000000",
        "--vcpus",
        "1",
        "--disk",
        "0",
        &flavor,
    ]);
    let name = unique("pcg-err");
    let mut s = spec(&name);
    s.flavor = flavor.clone();
    let created = os.create(Some(&unique("cmd-err")), &s).await.unwrap();
    let e = os
        .wait_status(&created.id, "ACTIVE", WAIT)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ProviderFault, "{e}");
    let m = e.to_string();
    assert!(m.contains("ERROR") && m.contains("No valid host"), "{m}");
    assert_eq!(stack.cli_status(&created.id).as_deref(), Some("ERROR"));
    os.delete(&created.id, WAIT).await.unwrap();
    stack.cli(&["flavor", "delete", &flavor]);
}
