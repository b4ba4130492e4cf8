//! The cluster's internal PKI against a real three-node NATS JetStream cluster (Debian
//! `nats-server` 2.9, mutual TLS on client connections and routes): `pcg-saas cluster init`
//! makes certificates the nodes and a replica are admitted with; a gateway's certificate and a
//! foreign CA's certificates are refused, as a replica and as a node; `pcg-saas cluster check`
//! passes with one node of three down and names the missing quorum with two down, within a bound,
//! and passes again once they are back.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pcg_e2e::nats::{self, NatsCluster};
use pcg_e2e::{bin, free_port, test_dir, wait_for, Gw, Saas, SaasOptions};
use serde_json::Value;

fn init(pki: &Path, extra: &[&str]) -> String {
    let out = Command::new(bin("pcg-saas"))
        .args(["cluster", "init", "--dir"])
        .arg(pki)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a replica configuration `<label>.toml` naming `cert` (`<cert_dir>/<cert>.pem`, `.key`);
/// returns its path.
fn replica_conf(
    label: &str,
    dir: &Path,
    urls: &[String],
    ca: &Path,
    cert_dir: &Path,
    cert: &str,
) -> std::path::PathBuf {
    let p = dir.join(format!("{label}.toml"));
    std::fs::write(
        &p,
        format!(
            "data_dir = {:?}\n[cluster]\nnats_urls = {:?}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nrequest_timeout_ms = 3000\n",
            dir.join("data"),
            urls,
            ca,
            cert_dir.join(format!("{cert}.pem")),
            cert_dir.join(format!("{cert}.key")),
        ),
    )
    .unwrap();
    p
}

/// `pcg-saas cluster check`: Ok(report) or Err(stderr), and how long it took.
fn check(conf: &Path) -> (Result<Value, String>, Duration) {
    let started = Instant::now();
    let out = Command::new(bin("pcg-saas"))
        .args(["cluster", "check", "--config"])
        .arg(conf)
        .output()
        .unwrap();
    let took = started.elapsed();
    if out.status.success() {
        (
            Ok(serde_json::from_slice(&out.stdout).expect("the report is JSON")),
            took,
        )
    } else {
        (Err(String::from_utf8_lossy(&out.stderr).into_owned()), took)
    }
}

/// A real gateway certificate: an identity paired over the REST API with its own CSR.
async fn gateway_cert(dir: &Path) -> (Saas, std::path::PathBuf) {
    let saas = Saas::start(&dir.join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let (_, key) = saas.tenant("t").await.unwrap();
    let (cert_pem, key_pem) = saas.pair_identity(&key).await.unwrap();
    let out = dir.join("gwcert");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("gateway.pem"), cert_pem).unwrap();
    std::fs::write(out.join("gateway.key"), key_pem).unwrap();
    (saas, out)
}

/// Starts a fourth node presenting `cert_dir/<cert>.pem` that tries to join the cluster; waits
/// until a member has refused its route, then checks it has no route and the members still
/// have each other.
async fn intruder_is_refused(cluster: &NatsCluster, cert_dir: &Path, cert: &str, name: &str) {
    let dir = cluster.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    // Its own files sit where the node configuration looks for them: `<pki>/<cert>.pem` and the
    // internal CA as the CA it trusts, so only its certificate is wrong.
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    for ext in ["pem", "key"] {
        std::fs::copy(
            cert_dir.join(format!("{cert}.{ext}")),
            pki.join(format!("{cert}.{ext}")),
        )
        .unwrap();
    }
    std::fs::copy(
        cluster.pki.join("internal-ca.pem"),
        pki.join("internal-ca.pem"),
    )
    .unwrap();
    let ports = (free_port(), free_port(), free_port());
    let conf = nats::node_conf(&dir, &pki, name, cert, ports, &cluster.route_ports()).unwrap();
    let _proc = nats::start_server(&dir, name, &conf).unwrap();
    let logs: Vec<std::path::PathBuf> = cluster
        .nodes
        .iter()
        .map(|n| cluster.dir.join(format!("{}.log", n.name)))
        .collect();
    wait_for(
        &format!("a member to refuse {name}'s route"),
        Duration::from_secs(60),
        || {
            let logs = logs.clone();
            async move {
                logs.iter()
                    .any(|l| {
                        std::fs::read_to_string(l)
                            .unwrap_or_default()
                            .matches("TLS route handshake error")
                            .count()
                            > 0
                    })
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    let own = nats::monitor(ports.2, "routez")
        .await
        .expect("intruder's routez");
    assert_eq!(own["num_routes"], 0, "{name} joined: {own}");
    for n in &cluster.nodes {
        let r = nats::monitor(n.monitor_port, "routez").await.unwrap();
        assert_eq!(r["num_routes"], 2, "{}: {r}", n.name);
    }
    // Clear the members' logs of this refusal, so the next intruder's is its own.
    for l in &logs {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_internal_ca_gets_in_and_a_missing_quorum_is_named() {
    if !nats::available() {
        return;
    }
    let dir = test_dir();
    let pki = dir.path().join("pki");
    let made = init(&pki, &[]);
    assert_eq!(made.matches("created").count(), 7, "{made}");
    // Run again: everything is kept.
    assert_eq!(init(&pki, &[]).matches("kept").count(), 7);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pki.join("internal-ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the CA key is owner-only");

    let mut cluster = NatsCluster::start(&dir.path().join("nats"), &pki)
        .await
        .unwrap();
    cluster.wait_ready(Duration::from_secs(90)).await.unwrap();
    let urls = cluster.urls();
    let ca = pki.join("internal-ca.pem");
    let replica = replica_conf("replica", dir.path(), &urls, &ca, &pki, "replica-replica1");

    // A replica with its certificate: the probe write is acknowledged by a replicated stream.
    let report = wait_for("cluster check to pass", Duration::from_secs(60), || {
        let replica = replica.clone();
        async move { check(&replica).0.ok() }
    })
    .await
    .unwrap();
    assert!(
        report["leader"]
            .as_str()
            .is_some_and(|l| l.starts_with("node")),
        "{report}"
    );
    assert_eq!(report["replicas"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["cluster"], "pcg-test", "{report}");

    // A gateway's certificate (signed by the gateways' CA) is no replica certificate.
    let (saas, gw) = gateway_cert(dir.path()).await;
    let as_replica = replica_conf("as-gateway", dir.path(), &urls, &ca, &gw, "gateway");
    let (r, took) = check(&as_replica);
    let err = r.expect_err("a gateway certificate is refused");
    assert!(
        err.contains("no NATS node") && err.contains("internal CA"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "refused after {took:?}");
    // Nor is a replica certificate of another cluster's internal CA.
    let foreign = dir.path().join("foreign");
    init(&foreign, &["--nodes", "node1", "--replicas", "replica1"]);
    let (r, _) = check(&replica_conf(
        "foreign",
        dir.path(),
        &urls,
        &ca,
        &foreign,
        "replica-replica1",
    ));
    assert!(r
        .expect_err("a foreign replica is refused")
        .contains("no NATS node"));

    // As a node: neither a gateway certificate nor a foreign CA's node certificate joins.
    intruder_is_refused(&cluster, &gw, "gateway", "intruder-gw").await;
    intruder_is_refused(&cluster, &foreign, "nats-node1", "intruder-foreign").await;
    drop(saas);

    // One node of three down: still a quorum.
    cluster.kill(2);
    let (r, _) = wait_for_check(&replica, true).await;
    r.expect("one node down keeps the quorum");

    // Two down: refused, naming the quorum, within a bound.
    cluster.kill(1);
    let (r, took) = wait_for_check(&replica, false).await;
    let err = r.expect_err("no quorum with one node of three");
    assert!(
        err.contains("no quorum") && err.contains("2 of them"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "answered after {took:?}");

    // Back: the check passes again.
    cluster.restart(1).unwrap();
    cluster.restart(2).unwrap();
    cluster.wait_ready(Duration::from_secs(90)).await.unwrap();
    let (r, _) = wait_for_check(&replica, true).await;
    r.expect("the quorum is back");
}

/// Runs the check until it passes (`pass`) or fails (not `pass`), within 90 s; returns the
/// last outcome and how long that run took.
async fn wait_for_check(conf: &Path, pass: bool) -> (Result<Value, String>, Duration) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (r, took) = check(conf);
        if r.is_ok() == pass || Instant::now() > deadline {
            return (r, took);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_given_one_gateway_ca_sign_with_it() {
    let dir = test_dir();
    let pki = dir.path().join("pki");
    init(&pki, &[]);
    let shared = format!(
        "ca_cert_file = {:?}\nca_key_file = {:?}\n",
        pki.join("gateway-ca.pem"),
        pki.join("gateway-ca.key")
    );
    let opts = SaasOptions {
        extra_toml: shared,
        ..Default::default()
    };
    let a = Saas::start(&dir.path().join("a"), opts.clone())
        .await
        .unwrap();
    let b = Saas::start(&dir.path().join("b"), opts).await.unwrap();
    let pem = std::fs::read_to_string(pki.join("gateway-ca.pem")).unwrap();
    for s in [&a, &b] {
        let r = s.http.get(format!("{}/v1/ca", s.api)).send().await.unwrap();
        assert_eq!(r.text().await.unwrap().trim(), pem.trim());
        // Neither made a CA of its own.
        assert!(!s.dir.join("data/ca.key").exists());
    }
    // A gateway pairs with either and works: here with the second one.
    let (_, key) = b.tenant("t").await.unwrap();
    let (_, token) = b.token(&key, None).await.unwrap();
    let gw = Gw::paired_and_started(&dir.path().join("gw"), "", &token).unwrap();
    gw.wait_tunnel("connected", Duration::from_secs(60))
        .await
        .unwrap();
    let id = gw.gateway_id().unwrap();
    let c = b
        .submit(&key, &id, "gateway.echo", serde_json::json!({"x": 1}))
        .await
        .unwrap();
    let v = b
        .wait_command(&key, &c, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");

    // Half a CA is refused at start, saying what to do.
    let half = dir.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(
        half.join("saas.toml"),
        format!(
            "data_dir = {:?}\nca_cert_file = {:?}\n",
            half.join("data"),
            pki.join("gateway-ca.pem")
        ),
    )
    .unwrap();
    let out = Command::new(bin("pcg-saas"))
        .args(["serve", "--config"])
        .arg(half.join("saas.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ca_cert_file and ca_key_file go together"),
        "{err}"
    );
}
