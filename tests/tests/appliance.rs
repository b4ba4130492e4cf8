//! What the appliance relies on from the daemon and the CLI, checked on real processes:
//! sd_notify readiness, watchdog pings and stop notice under a systemd-like `NOTIFY_SOCKET`;
//! `pcgctl` run by root acting as the data directory's owner; the first-boot record in
//! `pcgctl status`. (The image itself is booted by `appliance/boot-test.sh`.)

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pcg_e2e::{bin, Gw, Proc, Saas, SaasOptions};

/// Reads notifications until `done` says so or `timeout` passes; returns every message.
fn collect(
    sock: &UnixDatagram,
    timeout: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut msgs = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !done(&msgs) {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    msgs
}

#[tokio::test]
async fn gateway_notifies_ready_pings_the_watchdog_and_says_stopping() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_t, key) = saas.tenant("acme").await.unwrap();
    let (_, token) = saas.token(&key, None).await.unwrap();
    let gw = Gw::new(&dir.path().join("gw")).unwrap();
    gw.pair(&token).unwrap();

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let child = Command::new(bin("pcg-gateway"))
        .args(["run", "--config"])
        .arg(gw.config())
        .env("NOTIFY_SOCKET", &sock_path)
        // 600 ms: a ping every 200 ms while alive.
        .env("WATCHDOG_USEC", "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc {
        child,
        name: "pcg-gateway".into(),
        group: false,
    };
    let msgs = collect(&sock, Duration::from_secs(60), |m| {
        m.iter().any(|s| s.contains("STATUS=tunnel connected"))
            && m.iter().filter(|s| s.contains("WATCHDOG=1")).count() >= 5
    });
    let ready = msgs.iter().position(|m| m.contains("READY=1"));
    let first_ping = msgs.iter().position(|m| m.contains("WATCHDOG=1"));
    assert!(
        ready.is_some() && first_ping.is_some() && ready < first_ping,
        "READY=1 before the first WATCHDOG=1: {msgs:?}"
    );
    assert!(
        msgs.iter().filter(|s| s.contains("WATCHDOG=1")).count() >= 5
            && msgs.iter().any(|s| s.contains("STATUS=tunnel connected")),
        "watchdog pings and the tunnel state: {msgs:?}"
    );
    proc.stop();
    let after = collect(&sock, Duration::from_secs(10), |m| {
        m.iter().any(|s| s.contains("STOPPING=1"))
    });
    assert!(
        after.iter().any(|s| s.contains("STOPPING=1")),
        "STOPPING=1 on SIGTERM: {after:?}"
    );
}

#[tokio::test]
async fn without_notify_socket_the_gateway_runs_as_before() {
    let dir = pcg_e2e::test_dir();
    let (_saas, gw, _key, id) = pcg_e2e::paired(dir.path(), SaasOptions::default())
        .await
        .unwrap();
    assert!(id.starts_with("gw_"), "{id}");
    assert!(
        gw.log().find("cannot notify systemd").is_none(),
        "{}",
        gw.log()
    );
}

/// Every file under `dir` and its owner.
fn owners(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((e.path().display().to_string(), md.uid()));
        if md.is_dir() {
            out.extend(owners(&e.path()));
        }
    }
    out
}

/// Runs pcgctl as this (root) process; returns (exit code, stdout, stderr).
fn pcgctl(config: &Path, args: &[&str], no_switch: bool) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin("pcgctl"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null());
    if no_switch {
        cmd.env("PCGCTL_AS_OWNER", "1");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data directory owned by `nobody` (65534), in a directory `nobody` can traverse.
fn nobody_gateway(root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nadmin_socket = {:?}\n",
            data,
            data.join("admin.sock")
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn pcgctl_run_by_root_acts_as_the_data_directory_owner() {
    if !euid_is_root() {
        eprintln!("skipped: needs root (pcgctl switches users only when run by root)");
        return;
    }
    let root = pcg_e2e::test_dir();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // pcgctl must be executable by the owner it switches to.
    let cfg = nobody_gateway(root.path(), "switched");
    let (code, out, err) = pcgctl(&cfg, &["status", "--json"], false);
    // Exit status 2: not paired (these gateways never are); it ran and read the store.
    assert_eq!(code, Some(2), "pcgctl status as root: {err}{out}");
    let files = owners(&cfg.parent().unwrap().join("data"));
    assert!(!files.is_empty(), "the store was not opened");
    assert!(
        files.iter().all(|(_, uid)| *uid == 65534),
        "root's pcgctl left files not owned by the data directory's owner: {files:?}"
    );

    // Control: the same command without the switch leaves root-owned files (what the switch
    // prevents), so the assertion above can fail.
    let cfg2 = nobody_gateway(root.path(), "unswitched");
    let (code, out, err) = pcgctl(&cfg2, &["status", "--json"], true);
    assert_eq!(code, Some(2), "{err}{out}");
    assert!(
        owners(&cfg2.parent().unwrap().join("data"))
            .iter()
            .any(|(_, uid)| *uid == 0),
        "expected root-owned files without the switch"
    );

    // The first-boot record is shown, with what to do.
    let data = cfg.parent().unwrap().join("data");
    let rec = data.join("firstboot.json");
    std::fs::write(
        &rec,
        r#"{"ok": false, "message": "property pcg.pairing_token: malformed pairing token", "action": "set a new token and power-cycle", "at_ms": 1800000000000}"#,
    )
    .unwrap();
    std::os::unix::fs::chown(&rec, Some(65534), Some(65534)).unwrap();
    let (code, out, err) = pcgctl(&cfg, &["status"], false);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        out.contains("first boot:   FAILED (2027-01-15T08:00:00Z): property pcg.pairing_token: malformed pairing token")
            && out.contains("what to do:   set a new token and power-cycle"),
        "{out}"
    );
    let (code, out, _) = pcgctl(&cfg, &["status", "--json"], false);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(code == Some(2) && v["firstboot"]["ok"] == false, "{out}");
}

fn euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
