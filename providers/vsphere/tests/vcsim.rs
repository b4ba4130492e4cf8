//! Conformance of pcg-vsphere against vcsim (govmomi's vCenter simulator), cross-checked with the
//! govmomi reference client: login and TLS trust, auth errors, typed faults, inventory, clone +
//! power on + guest IP, power off, destroy, re-login after a server-side session termination,
//! paging over more than 1,000 VMs, and create idempotency by command id.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use common::Vcsim;
use pcg_provider::vm::{VmPlacement, VmProvider, VmSpec};
use pcg_provider::{no_progress, ErrorKind, PowerAction, PowerState, TaskProgress, TlsTrust};
use pcg_vsphere::fault::FaultKind;
use pcg_vsphere::xml::MoRef;
use pcg_vsphere::VsphereDriver;

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        source: "pcg-template".into(),
        cpus: Some(2),
        memory_mib: Some(1024),
        networks: vec![],
        user_data: Some("#cloud-config\nhostname: x\n".into()),
        metadata: Some("instance-id: x\n".into()),
        power_on: true,
        placement: VmPlacement::Vsphere {
            datacenter: Some("DC0".into()),
            cluster: Some("DC0_C0".into()),
            resource_pool: None,
            host: None,
            folder: None,
            datastore: None,
        },
    }
}

#[tokio::test]
async fn login_with_pinned_or_ca_trust_and_wrong_pin_refused() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let sc = d.client().service_content();
    assert!(sc.full_name.contains("vCenter"), "{sc:?}");
    assert_eq!(sc.root_folder.kind, "Folder");
    assert!(d.client().session_key().await.is_some());
    d.close().await.unwrap();
    assert!(d.client().session_key().await.is_none());
    // Used again after close: logs in again.
    assert!(!d.list().await.unwrap().is_empty());

    VsphereDriver::connect(&sim.endpoint_ca()).await.unwrap();

    let mut wrong = sim.endpoint();
    wrong.tls = Some(TlsTrust::PinSha256("00".repeat(32)));
    let e = VsphereDriver::connect(&wrong).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(e.to_string().contains("pinned"), "{e}");
    // vCenter's hint: its certificate's thumbprint, not a BMC.
    assert!(e.to_string().contains("thumbprint"), "{e}");
    assert!(!e.to_string().contains("BMC"), "{e}");

    let mut none = sim.endpoint();
    none.tls = None;
    let e = VsphereDriver::connect(&none).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_naming_endpoint_and_user() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let mut ep = sim.endpoint();
    ep.password = "not-the-password".into();
    let e = VsphereDriver::connect(&ep).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    let s = e.to_string();
    assert!(s.contains(&sim.url) && s.contains("\"user\""), "{s}");
    assert!(s.contains("InvalidLogin"), "{s}");
    assert!(!s.contains("not-the-password"), "{s}");
    // The hint is vCenter's own: the user's role in vCenter, never a BMC.
    assert!(s.contains("vCenter") && s.contains("role"), "{s}");
    assert!(!s.contains("BMC"), "{s}");
}

#[tokio::test]
async fn faults_are_typed() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let e = d.get("vm-999999").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let s = e.to_string();
    assert!(s.contains("vCenter") && s.contains("vm-999999"), "{s}");
    assert!(!s.contains("BMC"), "{s}");

    // Powering off a VM that is off: InvalidPowerState from the task.
    let vm = d
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|v| !v.template)
        .unwrap();
    d.power(&vm.id, PowerAction::Off).await.unwrap();
    let body = format!(
        "<PowerOffVM_Task>{}</PowerOffVM_Task>",
        MoRef::new("VirtualMachine", vm.id.clone()).xml("_this")
    );
    let task = d
        .client()
        .call("PowerOffVM_Task", &body)
        .await
        .unwrap()
        .and_then(|n| n.moref())
        .unwrap();
    let fault = d
        .wait_task(&task, "power off", &no_progress, (0, 100))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(fault.kind(), FaultKind::InvalidPowerState, "{fault:?}");

    // A second folder of the same name: DuplicateName, mapped to Conflict.
    let root = d.client().service_content().root_folder.clone();
    let body = format!(
        "<CreateFolder>{}<name>pcg-dup</name></CreateFolder>",
        root.xml("_this")
    );
    d.client().call("CreateFolder", &body).await.unwrap();
    let fault = d
        .client()
        .call_fault("CreateFolder", &body)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(fault.kind(), FaultKind::DuplicateName, "{fault:?}");
    let e = d.client().call("CreateFolder", &body).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("DuplicateName"), "{e}");
}

#[tokio::test]
async fn inventory_matches_the_reference_client() {
    let Some(sim) = Vcsim::start(&["-dc", "2", "-cluster", "2", "-vm", "3"]) else {
        return;
    };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let inv = d.inventory().await.unwrap();

    let ours: BTreeSet<(String, String)> = inv
        .objects
        .iter()
        .map(|o| (o.kind.clone(), o.id.clone()))
        .chain(
            inv.vms
                .iter()
                .map(|v| ("VirtualMachine".to_string(), v.id.clone())),
        )
        .collect();
    let kinds: BTreeSet<&str> = [
        "Datacenter",
        "Folder",
        "ComputeResource",
        "ClusterComputeResource",
        "HostSystem",
        "ResourcePool",
        "Datastore",
        "Network",
        "DistributedVirtualPortgroup",
        "OpaqueNetwork",
        "VirtualMachine",
    ]
    .into();
    let theirs: BTreeSet<(String, String)> = sim
        .reference(&["inventory"])
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_owned(),
                v["id"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(k, _)| kinds.contains(k.as_str()))
        .collect();
    assert_eq!(ours, theirs);
    assert!(inv
        .objects
        .iter()
        .any(|o| o.kind == "ClusterComputeResource"));
    assert_eq!(
        inv.objects
            .iter()
            .filter(|o| o.kind == "Datacenter")
            .count(),
        2
    );

    let ours: BTreeSet<(String, String, String, bool)> = inv
        .vms
        .iter()
        .map(|v| {
            let power = v.details.get("power_state").cloned().unwrap_or_default();
            (v.id.clone(), v.name.clone(), power, v.template)
        })
        .collect();
    let theirs: BTreeSet<(String, String, String, bool)> = sim
        .reference(&["list"])
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_owned(),
                v["name"].as_str().unwrap().to_owned(),
                v["power"].as_str().unwrap().to_owned(),
                v["template"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(ours, theirs);
    assert!(ours.iter().any(|v| v.3), "the template is listed");
}

#[tokio::test]
async fn clone_power_on_guest_ip_power_off_destroy() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let pg = d
        .inventory()
        .await
        .unwrap()
        .objects
        .into_iter()
        .find(|o| o.kind == "DistributedVirtualPortgroup" && !o.name.contains("Uplink"))
        .unwrap();
    let mut s = spec("web-1");
    let std_net = d
        .placement_objects()
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.kind == "Network")
        .unwrap();
    // The template's NIC goes to the portgroup; a second NIC is added on the standard network.
    s.networks = vec![pg.name.clone(), std_net.name.clone()];
    let seen = Mutex::new(Vec::<TaskProgress>::new());
    let sink = |p: &TaskProgress| seen.lock().unwrap().push(p.clone());
    let vm = d.create("cmd-clone-1", &s, &sink).await.unwrap();
    assert_eq!(vm.name, "web-1");
    assert_eq!(vm.power, PowerState::On);
    assert_eq!(vm.cpus, Some(2));
    assert_eq!(vm.memory_mib, Some(1024));
    assert_eq!(vm.command_id.as_deref(), Some("cmd-clone-1"));
    assert!(!vm.template);
    let progress = seen.lock().unwrap().clone();
    assert!(progress.len() >= 3, "{progress:?}");
    assert_eq!(
        progress.last().map(|p| p.state),
        Some(pcg_provider::TaskState::Completed)
    );

    // cloud-init guestinfo and the NIC on the requested portgroup.
    let o = d
        .client()
        .retrieve_one(
            &MoRef::new("VirtualMachine", vm.id.clone()),
            &["config.extraConfig", "network"],
        )
        .await
        .unwrap();
    let ec = o.get("config.extraConfig").unwrap();
    let keys: Vec<&str> = ec
        .children
        .iter()
        .filter_map(|c| c.child_text("key"))
        .collect();
    for k in [
        "guestinfo.userdata",
        "guestinfo.userdata.encoding",
        "guestinfo.metadata",
        "guestinfo.metadata.encoding",
        pcg_vsphere::COMMAND_KEY,
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    let nets: Vec<String> = o
        .get("network")
        .unwrap()
        .children
        .iter()
        .map(|n| n.text.clone())
        .collect();
    assert!(nets.contains(&pg.id), "{nets:?} lacks {}", pg.id);
    assert!(nets.contains(&std_net.id), "{nets:?} lacks {}", std_net.id);

    let ip = d.wait_ip(&vm.id, Duration::from_secs(20)).await.unwrap();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip}");

    d.power(&vm.id, PowerAction::Off).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().power, PowerState::Off);
    d.power(&vm.id, PowerAction::Off).await.unwrap();
    d.power(&vm.id, PowerAction::On).await.unwrap();
    d.power(&vm.id, PowerAction::Reset).await.unwrap();
    d.power(&vm.id, PowerAction::SoftShutdown).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().power, PowerState::Off);
    d.power(&vm.id, PowerAction::Cycle).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().power, PowerState::On);

    assert!(d.delete(&vm.id, &no_progress).await.unwrap());
    assert!(!d.delete(&vm.id, &no_progress).await.unwrap());
    assert_eq!(d.get(&vm.id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(sim
        .reference(&["list"])
        .iter()
        .all(|v| v["id"].as_str() != Some(vm.id.as_str())));
}

#[tokio::test]
async fn relogin_after_the_session_is_terminated_server_side() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let a = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let b = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let key_a = a.client().session_key().await.unwrap();
    assert_ne!(Some(&key_a), b.client().session_key().await.as_ref());
    b.client()
        .terminate_sessions(std::slice::from_ref(&key_a))
        .await
        .unwrap();
    // A's next call meets NotAuthenticated, logs in again and succeeds. Property retrieval
    // reports it per object (missingSet), not as a SOAP fault: it must not read as empty.
    let first = b.list().await.unwrap().into_iter().next().unwrap();
    let got = a.get(&first.id).await.unwrap();
    assert_eq!(got.name, first.name);
    assert!(!a.list().await.unwrap().is_empty());
    let key_a2 = a.client().session_key().await.unwrap();
    assert_ne!(key_a, key_a2);
    // Concurrent callers after another termination share one new session.
    b.client()
        .terminate_sessions(std::slice::from_ref(&key_a2))
        .await
        .unwrap();
    let (x, y, z) = tokio::join!(a.list(), a.list(), a.client().current_time());
    x.unwrap();
    y.unwrap();
    z.unwrap();
    assert_ne!(a.client().session_key().await.unwrap(), key_a2);
}

#[tokio::test]
async fn paging_over_more_than_a_thousand_vms() {
    // 500 VMs in each of the standalone host's and the cluster's pools, plus the template.
    let Some(sim) = Vcsim::start(&["-vm", "500", "-cluster-host", "1"]) else {
        return;
    };
    let mut ep = sim.endpoint();
    ep.page_size = Some(100);
    let d = VsphereDriver::connect(&ep).await.unwrap();
    let vms = d.list().await.unwrap();
    assert!(
        d.client().continuations() >= 10,
        "paged: {} continuations",
        d.client().continuations()
    );
    let ids: BTreeSet<&str> = vms.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids.len(), vms.len(), "no VM listed twice");
    assert!(vms.len() > 1000, "{}", vms.len());
    let theirs: BTreeSet<String> = sim
        .reference(&["list"])
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        theirs.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
}

#[tokio::test]
async fn the_same_create_delivered_twice_leaves_one_vm() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let first = d
        .create("cmd-twice", &spec("twice"), &no_progress)
        .await
        .unwrap();
    let again = d
        .create("cmd-twice", &spec("twice"), &no_progress)
        .await
        .unwrap();
    assert_eq!(first.id, again.id);

    // Two deliveries racing (a redelivery while the first still runs).
    let s = spec("racing");
    let (x, y) = tokio::join!(
        d.create("cmd-race", &s, &no_progress),
        d.create("cmd-race", &s, &no_progress)
    );
    assert_eq!(x.unwrap().id, y.unwrap().id);

    let listing = sim.reference(&["list"]);
    for cmd in ["cmd-twice", "cmd-race"] {
        let n = listing
            .iter()
            .filter(|v| v["command_id"].as_str() == Some(cmd))
            .count();
        assert_eq!(n, 1, "{cmd}: {listing:?}");
    }
}

#[tokio::test]
async fn keepalive_holds_an_idle_session_and_an_expired_one_is_renewed() {
    let Some(sim) = Vcsim::start(&["-idle-timeout", "1s"]) else {
        return;
    };
    let mut ep = sim.endpoint();
    ep.keepalive_ms = Some(250);
    let kept = VsphereDriver::connect(&ep).await.unwrap();
    let lapsed = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let key_kept = kept.client().session_key().await.unwrap();
    let key_lapsed = lapsed.client().session_key().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Kept alive: the same session still works.
    assert!(!kept.list().await.unwrap().is_empty());
    assert_eq!(kept.client().session_key().await.unwrap(), key_kept);
    // Expired server-side while idle: renewed transparently on the next call.
    assert!(!lapsed.list().await.unwrap().is_empty());
    assert_ne!(lapsed.client().session_key().await.unwrap(), key_lapsed);
}

#[tokio::test]
async fn provider_conformance_suite() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    use pcg_provider::vm::conformance;
    conformance::unknown_is_not_found(&d, "vm-424242").await;
    let vm = conformance::create_idempotent(&d, "conformance-1", &spec("conf-1")).await;
    conformance::power_round_trip(&d, &vm.id, Duration::from_secs(10)).await;
    conformance::delete_idempotent(&d, &vm.id).await;
}

/// Session keys the server lists, read by `observer`.
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

#[tokio::test]
async fn one_session_per_driver_and_none_left_behind() {
    let Some(sim) = Vcsim::start(&[]) else { return };
    let observer = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let key = d.client().session_key().await.unwrap();
    let before = server_sessions(&observer).await.len();
    // Many concurrent operations through clones of the driver share its one session.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = d.clone();
        set.spawn(async move { c.list().await.map(|v| v.len()) });
    }
    while let Some(r) = set.join_next().await {
        assert!(r.unwrap().unwrap() > 0);
    }
    assert_eq!(server_sessions(&observer).await.len(), before);
    assert!(server_sessions(&observer).await.contains(&key));
    // Dropping the last handle logs the session out.
    drop(d);
    let start = std::time::Instant::now();
    while server_sessions(&observer).await.contains(&key) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "session {key} left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn placement_by_name_or_id_and_bad_placement_refused() {
    let Some(sim) = Vcsim::start(&["-dc", "2"]) else {
        return;
    };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let inv = d.inventory().await.unwrap();
    let find = |kind: &str, name: &str| {
        inv.objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let host = find("HostSystem", "DC0_H0");
    let ds = inv
        .objects
        .iter()
        .find(|o| o.kind == "Datastore")
        .unwrap()
        .clone();
    // A standalone host by name, a datastore by id, the datacenter's "vm" folder by name.
    let mut s = spec("placed-1");
    s.placement = VmPlacement::Vsphere {
        datacenter: Some("DC0".into()),
        cluster: None,
        resource_pool: None,
        host: Some(host.name.clone()),
        folder: Some("vm".into()),
        datastore: Some(ds.id.clone()),
    };
    let vm = d.create("placed-1", &s, &no_progress).await.unwrap();
    assert_eq!(vm.details.get("host"), Some(&host.id), "{vm:?}");
    let pool = vm.details.get("resource_pool").unwrap();
    let pool_parent = inv
        .objects
        .iter()
        .find(|o| &o.id == pool)
        .and_then(|o| o.parent.clone());
    assert_eq!(pool_parent, host.parent, "the host's own pool");

    // "Resources" names a pool in every compute resource: ambiguous without more.
    let mut s = spec("placed-2");
    s.placement = VmPlacement::Vsphere {
        datacenter: None,
        cluster: None,
        resource_pool: Some("Resources".into()),
        host: None,
        folder: None,
        datastore: None,
    };
    let e = d.create("placed-2", &s, &no_progress).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
    assert!(e.to_string().contains("ambiguous"), "{e}");

    // Unknown names, and a placement for another provider, are refused before anything changes.
    let mut s = spec("placed-3");
    s.placement = VmPlacement::Vsphere {
        datacenter: Some("DC0".into()),
        cluster: Some("no-such-cluster".into()),
        resource_pool: None,
        host: None,
        folder: None,
        datastore: None,
    };
    let e = d.create("placed-3", &s, &no_progress).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
    assert!(e.to_string().contains("no-such-cluster"), "{e}");
    let mut s = spec("placed-4");
    s.source = "no-such-template".into();
    let e = d.create("placed-4", &s, &no_progress).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
    let mut s = spec("placed-5");
    s.placement = VmPlacement::Openstack {
        flavor: None,
        availability_zone: None,
    };
    let e = d.create("placed-5", &s, &no_progress).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
    assert!(sim.reference(&["list"]).iter().all(|v| !v["name"]
        .as_str()
        .unwrap()
        .starts_with("placed-")
        || v["name"] == "placed-1"));
}
