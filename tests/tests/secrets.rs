//! Secrets at rest: every provider password a tenant sends reaches neither data directory nor
//! either log in clear — after enrolment, after each command, and after both services stop —
//! and both data directories are owner-only.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use pcg_e2e::peers::{IpmiSim, IPMI_PASSWORD};
use pcg_e2e::vcsim::Vcsim;
use pcg_e2e::{files_containing, SaasOptions};
use serde_json::json;

/// Paths under `dir` that are not owner-only (directories 0700, files 0600).
fn not_owner_only(dir: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut bad = Vec::new();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    if mode != 0o700 {
        bad.push((dir.to_path_buf(), mode));
    }
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            bad.extend(not_owner_only(&p));
        } else if ft.is_file() {
            let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            if m != 0o600 {
                bad.push((p, m));
            }
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_a_store_or_a_log_in_clear() {
    let Some(bmc) = IpmiSim::start() else { return };
    let vc_password = "e2e-vcenter-Pw-7Kq";
    let Some(vc) = Vcsim::start(&["-pass", vc_password]) else {
        return;
    };
    let dir = pcg_e2e::test_dir();
    let (mut saas, mut gw, key, gw_id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    let wrong_password = "e2e-wrong-Pw-3Zx";
    let echoed = "e2e-echoed-Pw-9Lm";
    let secrets = [IPMI_PASSWORD, vc_password, wrong_password, echoed];
    let check = |when: &str| {
        for s in secrets {
            let mut hits = files_containing(&saas.dir, s);
            hits.extend(files_containing(&gw.dir, s));
            assert!(hits.is_empty(), "{when}: {s:?} found in clear in {hits:?}");
        }
    };
    let run = |kind: &'static str, payload: serde_json::Value| {
        let (saas, key, gw_id) = (&saas, &key, &gw_id);
        async move {
            let id = saas.submit(key, gw_id, kind, payload).await.unwrap();
            saas.wait_command(key, &id, Duration::from_secs(90))
                .await
                .unwrap()
        }
    };
    let endpoint = bmc.endpoint(5000);
    let v = run(
        "baremetal.enrol",
        json!({"name": "node1", "protocol": "ipmi", "endpoint": endpoint}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    check("after enrolment");
    let v = run(
        "baremetal.power",
        json!({"bmc": "node1", "action": "on", "wait": true}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    check("after a power command");
    let mut wrong = endpoint.clone();
    wrong["password"] = json!(wrong_password);
    let v = run(
        "baremetal.enrol",
        json!({"name": "node2", "protocol": "ipmi", "endpoint": wrong}),
    )
    .await;
    assert_eq!(v["result"]["error_class"], "auth", "{v}");
    check("after a refused enrolment");
    let v = run(
        "vsphere.inventory",
        json!({"endpoint": {
            "url": vc.url, "user": "user", "password": vc_password,
            "tls": {"pin_sha256": vc.thumbprint}, "timeout_ms": 20000,
        }}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v}");
    check("after a vSphere command");
    // A handler that echoes its payload returns the secret redacted, never in clear.
    let v = run("gateway.echo", json!({"password": echoed, "note": "x"})).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(
        v["result"]["output"]["echo"]["password"], "<redacted>",
        "{v}"
    );
    assert_eq!(v["result"]["output"]["echo"]["note"], "x", "{v}");
    check("after an echo");
    // After both stop (everything flushed).
    gw.proc.as_mut().unwrap().stop();
    saas.proc.stop();
    check("after both services stopped");
    for d in [saas.dir.join("data"), gw.dir.join("data")] {
        let bad = not_owner_only(&d);
        assert!(bad.is_empty(), "not owner-only: {bad:?}");
    }
}
