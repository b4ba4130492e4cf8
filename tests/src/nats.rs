//! A real three-node NATS JetStream cluster on 127.0.0.1 (Debian `nats-server` 2.9), with mutual
//! TLS on client connections and routes, from the files `pcg-saas cluster init` makes. Each node
//! is a process stopped by its PID; a node can be stopped and started again on the same ports
//! and state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{free_port, log_file, Proc};

/// One node's ports and files.
pub struct Node {
    pub name: String,
    pub client_port: u16,
    pub route_port: u16,
    pub monitor_port: u16,
    pub conf: PathBuf,
    pub proc: Option<Proc>,
}

pub struct NatsCluster {
    pub dir: PathBuf,
    /// Where `pcg-saas cluster init` wrote the internal CA and the certificates.
    pub pki: PathBuf,
    pub nodes: Vec<Node>,
}

/// Whether `nats-server` is installed; when it is not, a test skips (or fails under
/// `PCG_REQUIRE_PEERS`).
pub fn available() -> bool {
    let ok = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
            "nats-server is not installed (scripts/peers/install-nats.sh installs it)"
        );
        eprintln!("SKIPPED: nats-server is not installed (scripts/peers/install-nats.sh)");
    }
    ok
}

/// Writes a node's configuration. `cert` names the certificate files (`<pki>/<cert>.pem` and
/// `.key`) it presents on both its client port and its routes.
pub fn node_conf(
    dir: &Path,
    pki: &Path,
    name: &str,
    cert: &str,
    ports: (u16, u16, u16),
    routes: &[u16],
) -> anyhow::Result<PathBuf> {
    let (client, route, monitor) = ports;
    let store = dir.join(name).join("js");
    std::fs::create_dir_all(&store)?;
    let routes: Vec<String> = routes
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect();
    let tls = format!(
        "tls {{\n    cert_file: \"{pem}\"\n    key_file: \"{key}\"\n    ca_file: \"{ca}\"\n    verify: true\n    timeout: 2\n  }}",
        pem = pki.join(format!("{cert}.pem")).display(),
        key = pki.join(format!("{cert}.key")).display(),
        ca = pki.join("internal-ca.pem").display(),
    );
    let conf = format!(
        "server_name: {name}\nhost: 127.0.0.1\nport: {client}\nhttp: \"127.0.0.1:{monitor}\"\n\
         {tls}\n\
         jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  max_file_store: 256MB\n}}\n\
         cluster {{\n  name: pcg-test\n  listen: \"127.0.0.1:{route}\"\n  routes: [ {routes} ]\n  {tls}\n}}\n",
        store = store.display(),
        routes = routes.join(", "),
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// Starts `nats-server -c conf`, its log in `dir/<name>.log`.
pub fn start_server(dir: &Path, name: &str, conf: &Path) -> anyhow::Result<Proc> {
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log_file(dir, name))
        .spawn()
        .context("spawn nats-server")?;
    Ok(Proc {
        child,
        name: name.to_string(),
        group: false,
    })
}

/// A node's monitoring endpoint as JSON.
pub async fn monitor(port: u16, path: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

impl NatsCluster {
    /// Three nodes with the certificates `nats-node1..3` from `pki`, each started and listening
    /// on all its ports. A port picked free can be taken by another process before nats-server
    /// binds it (tests run in parallel, and outgoing connections draw from the same range); a
    /// node that exits before it is ready makes all three start again on fresh ports, up to
    /// five times.
    pub async fn start(dir: &Path, pki: &Path) -> anyhow::Result<NatsCluster> {
        let mut last = String::new();
        for _ in 0..5 {
            // Each try from an empty directory: no JetStream state of a cluster that never formed.
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir)?;
            let ports: Vec<(u16, u16, u16)> = (0..3)
                .map(|_| (free_port(), free_port(), free_port()))
                .collect();
            let routes: Vec<u16> = ports.iter().map(|p| p.1).collect();
            let mut nodes = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                let name = format!("node{}", i + 1);
                let conf = node_conf(dir, pki, &name, &format!("nats-{name}"), *p, &routes)?;
                nodes.push(Node {
                    proc: Some(start_server(dir, &name, &conf)?),
                    name,
                    client_port: p.0,
                    route_port: p.1,
                    monitor_port: p.2,
                    conf,
                });
            }
            let mut cluster = NatsCluster {
                dir: dir.to_path_buf(),
                pki: pki.to_path_buf(),
                nodes,
            };
            match cluster.wait_listening(Duration::from_secs(60)).await {
                Ok(()) => return Ok(cluster),
                Err(e) => last = e.to_string(),
            }
        }
        bail!("the NATS cluster did not start in five tries; the last:\n{last}")
    }

    /// Waits until every node has logged that it is ready and listens for routes (the route
    /// listener is bound after "Server is ready").
    async fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let logs: Vec<PathBuf> = self
            .nodes
            .iter()
            .map(|n| self.dir.join(format!("{}.log", n.name)))
            .collect();
        self.wait_nodes("nats-server to listen", timeout, || {
            let ready = logs.iter().all(|log| {
                std::fs::read_to_string(log).is_ok_and(|l| {
                    l.contains("Server is ready") && l.contains("Listening for route connections")
                })
            });
            async move { ready }
        })
        .await
    }

    /// Polls `ready` until it holds; fails at once, with the nodes' logs, when a node started
    /// here has exited (a port taken before it bound it, say) instead of waiting out `timeout`
    /// for nodes that cannot come.
    async fn wait_nodes<Fut: std::future::Future<Output = bool>>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Fut,
    ) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(gone) = self.exited() {
                bail!(
                    "nats-server {gone} exited while waiting for {what}\n{}",
                    self.log_tails()
                );
            }
            if ready().await {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The name of a node started here whose process has exited.
    fn exited(&mut self) -> Option<String> {
        self.nodes.iter_mut().find_map(|n| {
            let p = n.proc.as_mut()?;
            matches!(p.child.try_wait(), Ok(Some(_))).then(|| n.name.clone())
        })
    }

    /// The last 15 lines of every node's log.
    fn log_tails(&self) -> String {
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.dir.join(format!("{}.log", n.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        logs.join("\n")
    }

    /// `tls://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("tls://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// The route ports of every node (for a node that tries to join).
    pub fn route_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.route_port).collect()
    }

    /// Waits until every running node has a route to every other running node and JetStream
    /// has a metadata leader; fails at once when a node started here has exited.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .map(|n| n.monitor_port)
            .collect();
        let want = ports.len().saturating_sub(1) as u64;
        self.wait_nodes("the NATS cluster to form", timeout, || {
            let ports = ports.clone();
            async move {
                for p in ports {
                    let routed = monitor(p, "routez")
                        .await
                        .and_then(|r| r["num_routes"].as_u64())
                        .is_some_and(|n| n >= want);
                    let led = routed
                        && monitor(p, "jsz").await.is_some_and(|js| {
                            js["meta_cluster"]["leader"]
                                .as_str()
                                .is_some_and(|l| !l.is_empty())
                        });
                    if !led {
                        return false;
                    }
                }
                true
            }
        })
        .await
    }

    /// Stops node `i` (SIGKILL), keeping its state for a restart.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Starts node `i` again on its ports and state.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &mut self.nodes[i];
        if n.proc.is_none() {
            n.proc = Some(start_server(&self.dir, &n.name, &n.conf)?);
        }
        Ok(())
    }
}

/// The configuration lines of a pcg-saas replica named `name` (certificate
/// `<pki>/replica-<name>.pem`) on the cluster at `nats_urls`, signing gateways with the shared
/// `gateway-ca` of `pki` and handing gateways every replica's broker URL (`brokers`). Goes last
/// in a configuration: it ends with the `[cluster]` section.
pub fn replica_toml(pki: &Path, name: &str, nats_urls: &[String], brokers: &[String]) -> String {
    format!(
        "public_broker_urls = {brokers:?}\nca_cert_file = {:?}\nca_key_file = {:?}\n[cluster]\nnats_urls = {nats_urls:?}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nrequest_timeout_ms = 3000\n",
        pki.join("gateway-ca.pem"),
        pki.join("gateway-ca.key"),
        pki.join("internal-ca.pem"),
        pki.join(format!("replica-{name}.pem")),
        pki.join(format!("replica-{name}.key")),
    )
}

/// `pcg-saas cluster init --dir pki`: the internal CA, the nodes `node1..3`, the replicas
/// `replica1` and `replica2`, the gateways' CA.
pub fn init_pki(pki: &Path) -> anyhow::Result<()> {
    let out = Command::new(crate::bin("pcg-saas"))
        .args(["cluster", "init", "--dir"])
        .arg(pki)
        .output()
        .context("run pcg-saas cluster init")?;
    if !out.status.success() {
        bail!("pcg-saas cluster init failed: {out:?}");
    }
    Ok(())
}

/// Tunnels a pcg-saas holds, from its `/healthz` (0 when it does not answer).
pub async fn tunnels(saas: &crate::Saas) -> u64 {
    match saas.http.get(format!("{}/healthz", saas.api)).send().await {
        Ok(r) => r
            .json::<Value>()
            .await
            .ok()
            .and_then(|v| v["tunnels"].as_u64())
            .unwrap_or(0),
        Err(_) => 0,
    }
}
