//! pcg-bench: measures the tunnel path with real processes on 127.0.0.1 and prints a table
//! (also written as JSON to `--out`).
//!
//! 1. Commands through 1 gateway and through 100 gateways (real `pcg-gateway` daemons):
//!    commands per second and round-trip latency (REST submit → result, long-polled) p50/p99.
//!    Beside the light load, its floor on this machine: the same four hops and four
//!    `fdatasync`s between three threads, with nothing of pcg in between.
//! 2. Broker memory per idle tunnel: pairs `--idle` identities, opens that many tunnels from
//!    this process (a minimal client: Hello, then a heartbeat every 5 s), and reads the RSS of
//!    the pcg-saas process before and after.
//!
//! `pcg-bench transports` instead compares the tunnel's transports side by side in one run: one
//! gateway each directly, through a squid CONNECT proxy, and through a TLS-inspecting squid
//! (the WebSocket transport), then the time to get a tunnel back after a silent drop (a relay
//! that stops forwarding without closing; heartbeat 1 s).
//!
//! `pcg-bench diag` times `pcgctl diag`: with every check passing (daemon running and stopped;
//! a vCenter and a BMC enrolled) beside `pcgctl status`, and with a silent endpoint — a vCenter,
//! then the SaaS, whose packets a network namespace's firewall drops (root) — with the default
//! bounds and with a total bound shorter than the check timeout.
//! `pcg-bench cluster` runs the same commands through one pcg-saas on sled and through two
//! replicas on a real three-node NATS JetStream cluster (submitted to each in turn), then kills
//! one replica and starts it again: the time until every tunnel is on the other replica, and
//! until the tunnels are spread again.
//! `pcg-bench watch` measures the watch loop over `--vms` VMs of one vcsim, each declared
//! (adopted): the gateway's cycle and the requests one cycle costs, beside the same read by
//! pcg-vsphere alone, govmomi's listing and one `get` per VM (see `pcg_e2e::machines::bench`).
//!
//! Build the binaries first (`cargo build --release --bins`), then run
//! `target/release/pcg-bench` so it starts the release daemons beside it.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::stream::{self, StreamExt};
use pcg_e2e::{Gw, Saas, SaasOptions};
use pcg_proto::v1::broker_client::BrokerClient;
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{GatewayFrame, Heartbeat, Hello};
use serde_json::json;
use sha2::Digest as _;

#[derive(Parser)]
struct Args {
    /// `tunnel` (default): 1 and N gateways and idle-tunnel memory; `transports`: direct vs
    /// CONNECT proxy vs WebSocket through a TLS-inspecting proxy, and reconnect after a silent
    /// drop; `diag`: `pcgctl diag` passing and with a silent endpoint; `cluster`: one pcg-saas
    /// on sled vs two replicas on a three-node NATS cluster, then a replica's failover.
    #[arg(default_value = "tunnel")]
    scenario: String,
    /// Commands per scenario.
    #[arg(long, default_value_t = 2000)]
    commands: usize,
    /// Commands in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Gateways in the second scenario.
    #[arg(long, default_value_t = 100)]
    gateways: usize,
    /// Idle tunnels for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/pcg-bench.json")]
    out: std::path::PathBuf,
    /// Commands of the batch scenario (0: skip it).
    #[arg(long, default_value_t = 20_000)]
    batch_commands: usize,
    /// Commands per batch request.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// In-process gateways connecting at once, then kept as idle tunnels (0: skip).
    #[arg(long, default_value_t = 0)]
    storm: usize,
    /// A few seconds in all (for CI): small counts, no storm; still checks exactly once.
    #[arg(long)]
    quick: bool,
    /// `diag`: runs of each passing case (the silent cases run 3 times).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The binaries (PCG_BIN_DIR) are an older build: give them no configuration key they do
    /// not know.
    #[arg(long)]
    baseline: bool,
    /// `watch`: VMs of the vcsim (each declared), and watch cycles measured.
    #[arg(long, default_value_t = 1000)]
    vms: usize,
    #[arg(long, default_value_t = 10)]
    cycles: usize,
    /// Keep the working directory (every service's data directory and log) and print its path.
    #[arg(long)]
    keep: bool,
    /// `tunnel`: lines added to pcg-saas's configuration (TOML), to compare settings.
    #[arg(long, default_value = "")]
    saas_toml: String,
    /// `tunnel`: a tenant feed subscriber (`GET /v1/feed?topics=results`) reads along during the
    /// command scenarios; the run fails unless it got every result once, in order (on with
    /// `--quick`).
    #[arg(long)]
    feed: bool,
}

#[derive(Default)]
struct Figures {
    label: String,
    commands: usize,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Synchronous flushes per command (SaaS, gateways), CPU ms per command (SaaS, gateways).
    saas_syncs: f64,
    gw_syncs: f64,
    saas_cpu_ms: f64,
    gw_cpu_ms: f64,
    /// Context switches per command (SaaS, gateways): every thread's, voluntary or not.
    saas_switches: f64,
    gw_switches: f64,
    /// Whether the daemons' costs above were measured (a row without daemons, the floor, has
    /// none: shown as "–", written as null).
    costs: bool,
}

impl Figures {
    /// The daemons' costs per command, in the table's order; `None` when not measured.
    fn costs(&self) -> Option<[f64; 6]> {
        self.costs.then_some([
            self.saas_syncs,
            self.gw_syncs,
            self.saas_cpu_ms,
            self.gw_cpu_ms,
            self.saas_switches,
            self.gw_switches,
        ])
    }
}

/// CPU time (user + system) of a process so far, ms.
fn cpu_ms(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    ticks as f64 * 1000.0 / clock_ticks() as f64
}

fn clock_ticks() -> u64 {
    static T: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Context switches of a process so far: the sum over its live threads (a thread that ended
/// takes its own with it).
fn switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

/// A counter's value in a metrics text (0 when absent, e.g. an older build).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the processes had done before a scenario: flushes and CPU.
struct Mark {
    saas_flushes: f64,
    gw_flushes: f64,
    saas_cpu: f64,
    gw_cpu: f64,
    saas_switches: f64,
    gw_switches: f64,
}

async fn mark(saas: &Saas, gws: &[Gw], metric_ports: &[u16]) -> Mark {
    let (_, m) = saas
        .call("GET", "/metrics", &saas.operator_key, None)
        .await
        .unwrap_or((0, serde_json::Value::Null));
    let mut gw_flushes = 0.0;
    for p in metric_ports {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{p}/metrics")).await {
            gw_flushes += metric(
                &r.text().await.unwrap_or_default(),
                "pcg_gateway_store_flushes_total",
            );
        }
    }
    let gw_pids: Vec<u32> = gws
        .iter()
        .filter_map(|g| g.proc.as_ref())
        .map(|p| p.pid())
        .collect();
    Mark {
        saas_flushes: metric(
            m.as_str().unwrap_or_default(),
            "pcg_saas_store_flushes_total",
        ),
        gw_flushes,
        saas_cpu: cpu_ms(saas.proc.pid()),
        gw_cpu: gw_pids.iter().map(|&p| cpu_ms(p)).sum(),
        saas_switches: switches(saas.proc.pid()),
        gw_switches: gw_pids.iter().map(|&p| switches(p)).sum(),
    }
}

fn with_costs(mut f: Figures, before: &Mark, after: &Mark) -> Figures {
    let n = f.commands.max(1) as f64;
    f.saas_syncs = (after.saas_flushes - before.saas_flushes) / n;
    f.gw_syncs = (after.gw_flushes - before.gw_flushes) / n;
    f.saas_cpu_ms = (after.saas_cpu - before.saas_cpu) / n;
    f.gw_cpu_ms = (after.gw_cpu - before.gw_cpu) / n;
    f.saas_switches = (after.saas_switches - before.saas_switches) / n;
    f.gw_switches = (after.gw_switches - before.gw_switches) / n;
    f.costs = true;
    f
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// How a scenario's client asks for a command and its result.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// A submit, then a long-polled `GET /v1/commands/{id}`.
    SubmitThenGet,
    /// A submit with `?wait_seconds=`, whose answer carries the result (a long-polled GET only
    /// if the wait ended first).
    OneRequest,
    /// The same over HTTP/2 (ALPN `h2`, as clients that offer it get): every request on one
    /// connection, where the others use HTTP/1.1, a connection per request in flight.
    OneRequestH2,
}

/// A REST client that offers only HTTP/2 (ALPN `h2`).
fn h2_client(saas: &Saas) -> anyhow::Result<reqwest::Client> {
    let mut tls = pcg_e2e::client_tls(&std::fs::read(&saas.ca_file)?);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(90))
        .build()?)
}

/// `POST /v1/gateways/{gw}/commands?wait_seconds=` with `http`; the answer (fails unless 2xx
/// and HTTP/2).
async fn submit_waiting_h2(
    http: &reqwest::Client,
    saas: &Saas,
    key: &str,
    gw: &str,
    payload: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let resp = http
        .post(format!(
            "{}/v1/gateways/{gw}/commands?wait_seconds=60",
            saas.api
        ))
        .bearer_auth(key)
        .json(&json!({ "kind": "gateway.ledger", "payload": payload }))
        .send()
        .await?;
    anyhow::ensure!(
        resp.version() == reqwest::Version::HTTP_2,
        "answered over {:?}, not HTTP/2",
        resp.version()
    );
    let status = resp.status();
    let v: serde_json::Value = resp.json().await?;
    anyhow::ensure!(status.is_success(), "submit answered {status}: {v}");
    Ok(v)
}

/// Runs `n` `gateway.ledger` commands, `conc` in flight, over `gws` round robin (and `saas` in
/// turn), checking each result; their figures.
async fn run_commands(
    saas: &[Arc<Saas>],
    key: &str,
    gws: &[String],
    (n, conc): (usize, usize),
    label: &str,
    pattern: Pattern,
) -> anyhow::Result<Figures> {
    let h2 = match pattern {
        Pattern::OneRequestH2 => Some(h2_client(&saas[0])?),
        _ => None,
    };
    let started = Instant::now();
    let mut lat: Vec<f64> = stream::iter(0..n)
        .map(|i| {
            // Several replicas: each takes its turn, and the result is read where it was sent.
            let saas = saas[i % saas.len()].clone();
            let key = key.to_string();
            let gw = gws[i % gws.len()].clone();
            let h2 = h2.clone();
            async move {
                let t = Instant::now();
                let payload = json!({ "i": i });
                let v = if pattern != Pattern::SubmitThenGet {
                    let v = match &h2 {
                        Some(http) => submit_waiting_h2(http, &saas, &key, &gw, payload).await?,
                        None => {
                            saas.submit_waiting(&key, &gw, "gateway.ledger", payload, 60)
                                .await?
                        }
                    };
                    match v["state"].as_str() {
                        Some("succeeded" | "failed" | "cancelled" | "timed_out") => v,
                        _ => {
                            let id = v["id"].as_str().unwrap_or_default();
                            saas.wait_command(&key, id, Duration::from_secs(120))
                                .await?
                        }
                    }
                } else {
                    let id = saas.submit(&key, &gw, "gateway.ledger", payload).await?;
                    saas.wait_command(&key, &id, Duration::from_secs(120))
                        .await?
                };
                anyhow::ensure!(
                    v["result"]["output"]["appended"] == true,
                    "wrong result {v}"
                );
                Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(conc)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Figures {
        label: label.to_string(),
        commands: n,
        secs,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        ..Default::default()
    })
}

/// Waits (up to 120 s) until the feed subscriber has `expected` results, then checks that each
/// came once and in order; returns a line on the feed's lag behind the commands.
async fn check_feed(
    seen: &std::sync::Mutex<Vec<(u64, String, Instant)>>,
    expected: usize,
    commands_done: Instant,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = seen.lock().expect("feed lock").len();
        if n >= expected {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the feed subscriber got {n} of {expected} results"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().expect("feed lock");
    anyhow::ensure!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "the feed's sequence numbers did not only grow"
    );
    let ids: std::collections::HashSet<&String> = seen.iter().map(|s| &s.1).collect();
    anyhow::ensure!(
        ids.len() == seen.len() && seen.len() == expected,
        "the feed carried {} results for {} commands ({} distinct)",
        seen.len(),
        expected,
        ids.len()
    );
    let last = seen.last().map_or(commands_done, |s| s.2);
    Ok(format!(
        "feed: a subscriber read all {expected} results, each once, in order; the last {:.1} ms after the last command's long-poll returned",
        last.saturating_duration_since(commands_done).as_secs_f64() * 1000.0
    ))
}

async fn gateways(
    saas: &Saas,
    key: &str,
    root: &std::path::Path,
    count: usize,
    baseline: bool,
) -> anyhow::Result<(Vec<Gw>, Vec<String>)> {
    let mut gws = Vec::new();
    let mut ids = Vec::new();
    for i in 0..count {
        let (_, tok) = saas.token(key, None).await?;
        // The first gateway serves metrics (for its flush count).
        let extra = if i == 0 && !baseline {
            format!("metrics_listen = \"127.0.0.1:{}\"", metrics_port(root))
        } else {
            String::new()
        };
        gws.push(Gw::paired_and_started(
            &root.join(format!("gw{i}")),
            &extra,
            &tok,
        )?);
    }
    for gw in &gws {
        gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
        ids.push(gw.gateway_id().context("gateway id")?);
    }
    Ok((gws, ids))
}

/// The metrics port of the first gateway under `root` (chosen once, stable per root).
fn metrics_port(root: &std::path::Path) -> u16 {
    let f = root.join("metrics-port");
    if let Some(p) = std::fs::read_to_string(&f)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return p;
    }
    let p = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0);
    let _ = std::fs::create_dir_all(root);
    let _ = std::fs::write(&f, p.to_string());
    p
}

/// Every submitted id is in the gateways' ledgers exactly once (nothing lost, nothing repeated).
fn exactly_once(gws: &[Gw], expected: usize) -> anyhow::Result<()> {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for g in gws {
        for id in g.ledger_ids() {
            *seen.entry(id).or_default() += 1;
        }
    }
    let repeated = seen.values().filter(|n| **n > 1).count();
    anyhow::ensure!(
        repeated == 0,
        "{repeated} commands were executed more than once"
    );
    anyhow::ensure!(
        seen.len() == expected,
        "{} commands executed, {expected} submitted: {} lost",
        seen.len(),
        expected.saturating_sub(seen.len())
    );
    Ok(())
}

/// Submits `n` commands in batches (`size` each, `conc` batches in flight) and waits until
/// every result is stored (the gateway's pending count back to zero).
async fn run_batches(
    saas: &Arc<Saas>,
    key: &str,
    gw: &str,
    n: usize,
    size: usize,
    conc: usize,
) -> anyhow::Result<Option<Figures>> {
    let started = Instant::now();
    let chunks: Vec<Vec<usize>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    let answers: Vec<anyhow::Result<(u16, f64)>> = stream::iter(chunks)
        .map(|chunk| {
            let (saas, key, gw) = (saas.clone(), key.to_string(), gw.to_string());
            async move {
                let t = Instant::now();
                let items: Vec<serde_json::Value> = chunk
                    .iter()
                    .map(|i| json!({"gateway_id": gw, "kind": "gateway.ledger", "payload": {"b": i}}))
                    .collect();
                let (s, v) = saas
                    .call("POST", "/v1/commands/batch", &key, Some(json!({ "commands": items })))
                    .await?;
                if s == 200 {
                    let ok = v["results"]
                        .as_array()
                        .map(|a| a.iter().all(|r| r["status"] == 201))
                        .unwrap_or(false);
                    anyhow::ensure!(ok, "a batch item was refused: {v}");
                }
                Ok((s, t.elapsed().as_secs_f64() * 1000.0))
            }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let mut lat = Vec::new();
    for a in answers {
        let (s, ms) = a?;
        if s == 404 || s == 405 {
            return Ok(None); // this build has no batch submit
        }
        anyhow::ensure!(s == 200, "batch submit answered {s}");
        lat.push(ms);
    }
    pcg_e2e::wait_for(
        "every batch result stored",
        Duration::from_secs(600),
        || async {
            let v = saas
                .ok("GET", &format!("/v1/gateways/{gw}"), key, None)
                .await
                .ok()?;
            (v["pending_commands"] == 0).then_some(())
        },
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Some(Figures {
        label: format!("batch submit, {size} per request, {conc} in flight (to result stored)"),
        commands: n,
        secs,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        ..Default::default()
    }))
}

/// Pairs one identity directly over the REST API; returns a dialer with it (the gateway's own:
/// pinned CA, client certificate, and the listener's "busy, retry after" answer understood).
async fn identity(
    saas: &Saas,
    key: &str,
    ca_pem: &str,
) -> anyhow::Result<pcg_gateway::transport::Dialer> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_pem, key_pem) = saas.pair_identity(key).await?;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    Ok(pcg_gateway::transport::Dialer {
        proxies: Default::default(),
        proxy_ca: Vec::new(),
        pin: sha2::Sha256::digest(ca.as_ref()).into(),
        ca: Some(ca),
        client: Some(Arc::new((chain, key))),
        timeout: Duration::from_secs(10),
    })
}

/// An in-process gateway: connects with the gateway's dialer, says Hello, heartbeats every 5 s,
/// and reconnects whenever its tunnel ends. After a failure it waits 0.5–3 s, or as long as a
/// "busy" answer asked, as the gateway's backoff does.
async fn storm_tunnel(
    url: String,
    dialer: Arc<pcg_gateway::transport::Dialer>,
    attempts: Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut wait = Duration::from_millis(500 + rand::random_range(0..2_500u64));
        match tokio::time::timeout(Duration::from_secs(10), idle_tunnel(&url, &dialer)).await {
            Ok(Ok(h)) => {
                let _ = h.await;
            }
            Ok(Err(Failure::Busy(ms))) => wait = wait.max(Duration::from_millis(ms)),
            Ok(Err(Failure::Other)) | Err(_) => {}
        }
        tokio::time::sleep(wait).await;
    }
}

/// Why a storm tunnel did not come up: told "busy" (wait that long), or anything else.
enum Failure {
    Busy(u64),
    Other,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(_: E) -> Self {
        Failure::Other
    }
}

async fn idle_tunnel(
    url: &str,
    dialer: &pcg_gateway::transport::Dialer,
) -> Result<tokio::task::JoinHandle<()>, Failure> {
    use pcg_gateway::transport::{DialError, Target, Transport};
    let target = Target::from_url(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dialed = match dialer.dial(&target, Transport::Direct, &[b"h2"]).await {
        Ok(d) => d,
        Err(DialError::Busy { retry_after_ms, .. }) => return Err(Failure::Busy(retry_after_ms)),
        Err(e) => return Err(anyhow::anyhow!("{e}").into()),
    };
    let slot = Arc::new(std::sync::Mutex::new(Some(dialed.io)));
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let io = slot.lock().expect("connector lock").take();
        async move {
            io.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::other("connection already used"))
        }
    });
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", target.authority()))?
        .connect_with_connector(connector)
        .await?;
    let mut client = BrokerClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(GatewayFrame {
        kind: Some(GKind::Hello(Hello {
            gateway_version: "bench".into(),
            command_kinds: vec!["gateway.echo".into()],
            clock_unix_ms: 0,
            journal_depth: 0,
            outbox_depth: 0,
        })),
    })
    .await?;
    let mut inbound = client
        .open(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    inbound
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
    Ok(tokio::spawn(async move {
        let mut seq = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    if tx.send(GatewayFrame { kind: Some(GKind::Heartbeat(Heartbeat { seq, ..Default::default() })) }).await.is_err() { break; }
                }
                m = inbound.message() => if !matches!(m, Ok(Some(_))) { break },
            }
        }
    }))
}

/// Direct vs CONNECT vs WebSocket, and reconnect after a silent drop.
async fn transports(args: &Args, root: &std::path::Path) -> anyhow::Result<()> {
    use pcg_e2e::squid::{Kind, Squid};
    let relay = pcg_e2e::relay::Relay::bind().await?;
    let saas = Arc::new(
        Saas::start(
            &root.join("saas"),
            SaasOptions {
                heartbeat_ms: Some(1000),
                ..Default::default()
            },
        )
        .await?,
    );
    let (_, key) = saas.tenant("bench").await?;
    let connect =
        Squid::start(Kind::Connect).context("squid is needed: scripts/peers/install-network.sh")?;
    let bump = Squid::start(Kind::Bump {
        origin_ca: saas.dir.join("data/ca.pem"),
        upgrades: true,
    })
    .context("squid is needed")?;
    let setups = [
        ("direct".to_string(), String::new()),
        (
            "CONNECT proxy (squid)".to_string(),
            format!("proxy = {:?}", connect.url(None)),
        ),
        (
            "WebSocket through TLS-inspecting squid".to_string(),
            format!(
                "proxy = {:?}\nproxy_ca = {:?}",
                bump.url(None),
                bump.ca_pem.clone().context("bump CA")?
            ),
        ),
    ];
    let mut rows = Vec::new();
    for (i, (label, extra)) in setups.iter().enumerate() {
        let (_, tok) = saas.token(&key, None).await?;
        let mut gw = Gw::with_config(&root.join(format!("t{i}")), extra)?;
        gw.pair(&tok)?;
        gw.start()?;
        let st = gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
        let id = gw.gateway_id().context("gateway id")?;
        let ids = vec![id];
        run_commands(
            std::slice::from_ref(&saas),
            &key,
            &ids,
            (200, args.concurrency),
            "warm-up",
            Pattern::SubmitThenGet,
        )
        .await?;
        let one = run_commands(
            std::slice::from_ref(&saas),
            &key,
            &ids,
            (500, 1),
            &format!("{label}, 1 in flight"),
            Pattern::SubmitThenGet,
        )
        .await?;
        let many = run_commands(
            std::slice::from_ref(&saas),
            &key,
            &ids,
            (args.commands, args.concurrency),
            &format!("{label}, {} in flight", args.concurrency),
            Pattern::SubmitThenGet,
        )
        .await?;
        println!("{label}: transport {}", st["tunnel"]["transport"]);
        rows.push(one);
        rows.push(many);
        if let Some(p) = gw.proc.as_mut() {
            p.stop();
        }
    }
    // Reconnect after a silent drop: a gateway whose tunnel goes through a relay that stops
    // forwarding without closing anything.
    let saas2 = Saas::start(
        &root.join("saas2"),
        SaasOptions {
            heartbeat_ms: Some(1000),
            extra_toml: format!(
                "public_api_url = \"https://{0}\"\npublic_broker_urls = [\"https://{0}\"]\n",
                relay.addr
            ),
            ..Default::default()
        },
    )
    .await?;
    relay.set_upstream(saas2.api_listen);
    let (_, key2) = saas2.tenant("bench").await?;
    let mut drops = Vec::new();
    let (_, tok) = saas2.token(&key2, None).await?;
    let mut gw = Gw::new(&root.join("drop"))?;
    gw.pair(&tok)?;
    gw.start()?;
    for _ in 0..5 {
        gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        relay.stall_all();
        pcg_e2e::wait_for("the drop noticed", Duration::from_secs(60), || async {
            gw.status().filter(|s| s["tunnel"]["state"] != "connected")
        })
        .await?;
        let noticed = t.elapsed();
        gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
        drops.push((
            noticed.as_secs_f64() * 1000.0,
            t.elapsed().as_secs_f64() * 1000.0,
        ));
        relay.cut_all();
    }
    println!();
    println!("| transport, load | commands | wall s | commands/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for f in &rows {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {:.2} |",
            f.label,
            f.commands,
            f.secs,
            f.commands as f64 / f.secs,
            f.p50_ms,
            f.p99_ms
        );
    }
    println!();
    println!("silent drop (heartbeat 1000 ms), 5 times: noticed after / tunnel back after (ms):");
    for (n, b) in &drops {
        println!("  {n:.0} / {b:.0}");
    }
    let out = json!({
        "concurrency": args.concurrency,
        "scenarios": rows.iter().map(|f| json!({
            "label": f.label, "commands": f.commands, "wall_s": f.secs,
            "commands_per_s": f.commands as f64 / f.secs, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms,
        })).collect::<Vec<_>>(),
        "silent_drop_ms": drops.iter().map(|(n, b)| json!({"noticed": n, "back": b})).collect::<Vec<_>>(),
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    println!("figures written to {}", args.out.display());
    Ok(())
}

/// One timed `pcgctl diag --json` (or any pcgctl command): wall milliseconds, the report.
fn timed(gw: &Gw, prefix: &[String], args: &[&str]) -> (f64, Option<i32>, serde_json::Value) {
    let t = Instant::now();
    let (code, out, _) = gw.pcgctl_via(prefix, args);
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    (
        wall,
        code,
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null),
    )
}

struct DiagRow {
    label: String,
    walls: Vec<f64>,
    reports: Vec<f64>,
    outcome: String,
}

impl DiagRow {
    fn new(label: &str) -> Self {
        DiagRow {
            label: label.into(),
            walls: Vec::new(),
            reports: Vec::new(),
            outcome: String::new(),
        }
    }

    fn add(&mut self, wall: f64, code: Option<i32>, r: &serde_json::Value) {
        self.walls.push(wall);
        if let Some(ms) = r["elapsed_ms"].as_f64() {
            self.reports.push(ms);
        }
        let failed: Vec<String> = r["checks"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|c| c["status"] == "fail")
                    .map(|c| format!("{} {}", c["hop"].as_str().unwrap_or(""), c["elapsed_ms"]))
                    .collect()
            })
            .unwrap_or_default();
        self.outcome = format!(
            "exit {}{}",
            code.map_or("-".into(), |c| c.to_string()),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; failed (check ms): {}", failed.join(", "))
            }
        );
    }

    fn median(v: &[f64]) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            0.0
        } else {
            pct(&s, 0.5)
        }
    }
}

/// Runs one command through the tunnel and checks it succeeded.
async fn run(
    saas: &Saas,
    key: &str,
    gw_id: &str,
    kind: &str,
    payload: serde_json::Value,
) -> anyhow::Result<()> {
    let id = saas.submit(key, gw_id, kind, payload).await?;
    let v = saas.wait_command(key, &id, Duration::from_secs(90)).await?;
    anyhow::ensure!(v["state"] == "succeeded", "{kind}: {v}");
    Ok(())
}

/// `pcgctl diag` with every check passing and with a silent endpoint.
async fn diag(args: &Args, root: &std::path::Path) -> anyhow::Result<()> {
    use pcg_e2e::peers::{IpmiSim, IPMI_PASSWORD, IPMI_USER};
    use pcg_e2e::vcsim::Vcsim;
    let vcsim = Vcsim::start(&[]).context("pcg-vcsim: scripts/peers/install-vsphere.sh")?;
    let bmc = IpmiSim::start().context("ipmi_sim: scripts/peers/install-ipmi.sh")?;
    let none: Vec<String> = Vec::new();
    let mut rows = Vec::new();

    // Every check passing: SaaS, a vCenter and a BMC on 127.0.0.1.
    let saas = Saas::start(&root.join("saas"), SaasOptions::default()).await?;
    let (_, key) = saas.tenant("bench").await?;
    let (_, token) = saas.token(&key, None).await?;
    let mut gw = Gw::new(&root.join("gw"))?;
    gw.pair(&token)?;
    gw.start()?;
    gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
    let gw_id = gw.gateway_id().context("gateway id")?;
    run(
        &saas,
        &key,
        &gw_id,
        "vsphere.enrol",
        json!({"name": "lab", "endpoint": vcsim.endpoint()}),
    )
    .await?;
    run(&saas, &key, &gw_id, "baremetal.enrol", json!({"name": "rack1", "protocol": "ipmi",
        "endpoint": {"address": format!("127.0.0.1:{}", bmc.port), "user": IPMI_USER, "password": IPMI_PASSWORD}})).await?;
    for _ in 0..2 {
        timed(&gw, &none, &["diag", "--json"]);
    }
    let mut status = DiagRow::new("baseline: pcgctl status --json (daemon running)");
    let mut daemon = DiagRow::new("pcgctl diag, all 9 checks ok, daemon running");
    for _ in 0..args.runs {
        let (w, c, r) = timed(&gw, &none, &["status", "--json"]);
        status.walls.push(w);
        status.outcome = format!("exit {}", c.unwrap_or(-1));
        drop(r);
        let (w, c, r) = timed(&gw, &none, &["diag", "--json"]);
        daemon.add(w, c, &r);
    }
    gw.proc.as_mut().context("daemon")?.stop();
    let mut offline = DiagRow::new("pcgctl diag, all 9 checks ok, daemon stopped");
    for _ in 0..args.runs {
        let (w, c, r) = timed(&gw, &none, &["diag", "--json"]);
        offline.add(w, c, &r);
    }
    rows.extend([status, daemon, offline]);

    // A silent endpoint: the daemon in a namespace whose firewall drops the packets.
    match pcg_e2e::netns::NetNs::create() {
        Err(why) => {
            println!("silent endpoints not measured: no network namespace ({why}); run as root")
        }
        Ok(ns) => {
            let saas = Saas::start(
                &root.join("saas-ns"),
                SaasOptions {
                    api_listen: Some((ns.outer, 0).into()),
                    ..Default::default()
                },
            )
            .await?;
            let relay = pcg_e2e::relay::Relay::bind_on((ns.outer, 0).into()).await?;
            let vc_addr: std::net::SocketAddr = vcsim
                .url
                .trim_start_matches("https://")
                .split('/')
                .next()
                .context("vcsim URL")?
                .parse()?;
            relay.set_upstream(vc_addr);
            let (_, key) = saas.tenant("bench").await?;
            let (_, token) = saas.token(&key, None).await?;
            let mut gw = Gw::new(&root.join("gw-ns"))?;
            gw.pair(&token)?;
            gw.start_in(Some(&ns.name))?;
            gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
            let gw_id = gw.gateway_id().context("gateway id")?;
            let mut ep = vcsim.endpoint();
            ep["url"] = json!(format!("https://{}/sdk", relay.addr));
            run(
                &saas,
                &key,
                &gw_id,
                "vsphere.enrol",
                json!({"name": "lab", "endpoint": ep}),
            )
            .await?;
            let (_, code, r) = timed(&gw, &none, &["diag", "--json"]);
            anyhow::ensure!(code == Some(0), "the namespace setup does not pass: {r}");
            let cases: [(&str, u16, &[&str]); 3] = [
                (
                    "silent vCenter (SYN dropped), default bounds 10 s / 60 s",
                    relay.addr.port(),
                    &[],
                ),
                (
                    "silent vCenter, --check-timeout 30 --total-timeout 5",
                    relay.addr.port(),
                    &["--check-timeout", "30", "--total-timeout", "5"],
                ),
                (
                    "silent SaaS (its port dropped), default bounds 10 s / 60 s",
                    saas.api_listen.port(),
                    &[],
                ),
            ];
            for (label, port, extra) in cases {
                ns.block_tcp(ns.outer, port).map_err(anyhow::Error::msg)?;
                let mut row = DiagRow::new(label);
                for _ in 0..3 {
                    let mut a = vec!["diag", "--json"];
                    a.extend_from_slice(extra);
                    let (w, c, r) = timed(&gw, &none, &a);
                    row.add(w, c, &r);
                }
                ns.unblock().map_err(anyhow::Error::msg)?;
                rows.push(row);
            }
            gw.proc.as_mut().context("daemon")?.stop();
        }
    }

    println!();
    println!("| case | runs | median wall ms | max wall ms | median run ms (report) | outcome (last run) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let max = r.walls.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {} | {:.0} | {:.0} | {} | {} |",
            r.label,
            r.walls.len(),
            DiagRow::median(&r.walls),
            max,
            if r.reports.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}", DiagRow::median(&r.reports))
            },
            r.outcome
        );
    }
    let out = json!({
        "cases": rows.iter().map(|r| json!({
            "label": r.label, "wall_ms": r.walls, "report_ms": r.reports, "outcome": r.outcome,
            "median_wall_ms": DiagRow::median(&r.walls),
        })).collect::<Vec<_>>(),
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    println!("figures written to {}", args.out.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("pcg-bench-").tempdir()?;
    let (_remove_on_exit, root) = if args.keep {
        let kept = dir.keep();
        println!("pcg-bench: working directory (kept): {}", kept.display());
        (None, kept)
    } else {
        let path = dir.path().to_path_buf();
        (Some(dir), path)
    };
    if args.scenario == "transports" {
        return transports(&args, &root).await;
    }
    if args.scenario == "diag" {
        return diag(&args, &root).await;
    }
    if args.scenario == "cluster" {
        return cluster(&args, &root).await;
    }
    if args.scenario == "watch" {
        return pcg_e2e::machines::bench(args.vms, args.cycles, &root, &args.out).await;
    }
    perf(args, &root).await
}

fn print_rows(rows: &[Figures]) {
    println!();
    println!("| scenario | commands | wall s | commands/s | p50 ms | p99 ms | SaaS syncs/cmd | gateway syncs/cmd | SaaS CPU ms/cmd | gateway CPU ms/cmd | SaaS switches/cmd | gateway switches/cmd |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in rows {
        let costs = match f.costs() {
            Some([ss, gs, sc, gc, sw, gw]) => {
                format!("{ss:.2} | {gs:.2} | {sc:.3} | {gc:.3} | {sw:.1} | {gw:.1}")
            }
            None => ["–"; 6].join(" | "),
        };
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {costs} |",
            f.label,
            f.commands,
            f.secs,
            f.commands as f64 / f.secs,
            f.p50_ms,
            f.p99_ms,
        );
    }
}

/// The floor of the light-load path on this machine, measured beside it: a client, a "broker"
/// and a "gateway" thread pass 64 bytes over loopback TCP (NODELAY, blocking reads). With
/// `sync`, the broker syncs a file before it forwards a request and again before it answers, and
/// the gateway syncs two files (its journal, the ledger) before it answers: the four
/// `fdatasync`s and four hops one light-load command needs, in `dir` (the daemons' disk), with
/// nothing of what pcg adds (TLS, HTTP, JSON, tasks, the hand-offs between threads). Without,
/// the four hops alone.
fn floor(dir: &std::path::Path, n: usize, sync: bool) -> anyhow::Result<Figures> {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    fn append(f: &mut std::fs::File, sync: bool) -> std::io::Result<()> {
        f.write_all(&[b'x'; 128])?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
    };
    std::fs::create_dir_all(dir)?;
    let (mut broker_log, mut journal, mut ledger) =
        (open("broker.log")?, open("journal")?, open("ledger")?);
    let front = TcpListener::bind("127.0.0.1:0")?;
    let back = TcpListener::bind("127.0.0.1:0")?;
    let (front_at, back_at) = (front.local_addr()?, back.local_addr()?);
    let mut times = std::thread::scope(|scope| -> anyhow::Result<Vec<f64>> {
        let gateway = scope.spawn(move || -> std::io::Result<()> {
            let mut s = TcpStream::connect(back_at)?;
            s.set_nodelay(true)?;
            let mut m = [0u8; 64];
            while s.read_exact(&mut m).is_ok() {
                append(&mut journal, sync)?;
                append(&mut ledger, sync)?;
                s.write_all(&m)?;
            }
            Ok(())
        });
        let broker = scope.spawn(move || -> std::io::Result<()> {
            let (mut g, _) = back.accept()?;
            let (mut c, _) = front.accept()?;
            g.set_nodelay(true)?;
            c.set_nodelay(true)?;
            let mut m = [0u8; 64];
            while c.read_exact(&mut m).is_ok() {
                append(&mut broker_log, sync)?;
                g.write_all(&m)?;
                g.read_exact(&mut m)?;
                append(&mut broker_log, sync)?;
                c.write_all(&m)?;
            }
            Ok(())
        });
        let mut c = TcpStream::connect(front_at)?;
        c.set_nodelay(true)?;
        let mut m = [7u8; 64];
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            c.write_all(&m)?;
            c.read_exact(&mut m)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        drop(c);
        broker.join().expect("the broker thread")?;
        gateway.join().expect("the gateway thread")?;
        Ok(times)
    })?;
    let secs = times.iter().sum::<f64>() / 1000.0;
    times.sort_by(f64::total_cmp);
    Ok(Figures {
        label: if sync {
            "floor: 4 loopback hops and 4 fdatasyncs, nothing else".into()
        } else {
            "floor: 4 loopback hops, no sync".into()
        },
        commands: n,
        secs,
        p50_ms: pct(&times, 0.50),
        p99_ms: pct(&times, 0.99),
        ..Default::default()
    })
}

/// Light load, 64 in flight, batches, N gateways, then (with `--storm`) N in-process gateways
/// connecting at once, kept idle (memory per tunnel), and all back after the SaaS restarts.
async fn perf(args: Args, root: &std::path::Path) -> anyhow::Result<()> {
    let (commands, gateways_n, batch_n, storm, idle) = if args.quick {
        (300, 3, 1000, 0, 20)
    } else {
        (
            args.commands,
            args.gateways,
            args.batch_commands,
            args.storm,
            args.idle,
        )
    };
    println!("pcg-bench: binaries from {}", pcg_e2e::bin_dir().display());
    let saas = Arc::new(
        Saas::start(
            &root.join("saas"),
            SaasOptions {
                heartbeat_ms: Some(5000),
                // Room for the storm's tunnels and its setups: every tunnel comes from
                // 127.0.0.1, and the storm's tunnels plus the bench's own REST connections
                // must fit under the connection cap (10,000 by default).
                extra_toml: if storm > 0 && !args.baseline {
                    format!(
                        "max_connections_per_ip = 100000\nmax_connections = {}\n{}\n",
                        storm + 1000,
                        args.saas_toml
                    )
                } else {
                    format!("{}\n", args.saas_toml)
                },
                ..Default::default()
            },
        )
        .await?,
    );
    let (_, key) = saas.tenant("bench").await?;
    let mut rows = Vec::new();
    let mut submitted = 0usize;
    // The feed subscriber: every result it reads, with when it read it.
    let feed = if (args.feed || args.quick) && !args.baseline {
        let mut sub = pcg_e2e::feed::Sse::open(&saas, &key, "topics=results", None).await;
        let seen = Arc::new(std::sync::Mutex::new(Vec::<(u64, String, Instant)>::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(it) = sub.next(Duration::from_secs(3600)).await {
                let id = it.data["id"].as_str().unwrap_or_default().to_string();
                seen2
                    .lock()
                    .expect("feed lock")
                    .push((it.seq, id, Instant::now()));
            }
        });
        Some((seen, task))
    } else {
        None
    };

    // One gateway: light load, 64 in flight, batches.
    let one_root = root.join("one");
    let (mut one, one_ids) = gateways(&saas, &key, &one_root, 1, args.baseline).await?;
    let port = [metrics_port(&one_root)];
    run_commands(
        std::slice::from_ref(&saas),
        &key,
        &one_ids,
        (200, args.concurrency),
        "warm-up",
        Pattern::SubmitThenGet,
    )
    .await?;
    submitted += 200;
    let light = commands.min(1000);
    let m0 = mark(&saas, &one, &port).await;
    let f = run_commands(
        std::slice::from_ref(&saas),
        &key,
        &one_ids,
        (light, 1),
        "1 gateway, 1 in flight",
        Pattern::SubmitThenGet,
    )
    .await?;
    let mut m1 = mark(&saas, &one, &port).await;
    rows.push(with_costs(f, &m0, &m1));
    submitted += light;
    // The same path's floor on this machine, beside it (no daemon involved).
    for sync in [true, false] {
        let floor_dir = root.join("floor");
        rows.push(tokio::task::spawn_blocking(move || floor(&floor_dir, light, sync)).await??);
    }
    m1 = mark(&saas, &one, &port).await;
    // Light load with the submit that waits for its result (one request per command; an older
    // build has none).
    if !args.baseline {
        let f = run_commands(
            std::slice::from_ref(&saas),
            &key,
            &one_ids,
            (light, 1),
            "1 gateway, 1 in flight, one request each",
            Pattern::OneRequest,
        )
        .await?;
        let m = mark(&saas, &one, &port).await;
        rows.push(with_costs(f, &m1, &m));
        m1 = m;
        submitted += light;
    }
    let f = run_commands(
        std::slice::from_ref(&saas),
        &key,
        &one_ids,
        (commands, args.concurrency),
        &format!("1 gateway, {} in flight", args.concurrency),
        Pattern::SubmitThenGet,
    )
    .await?;
    let mut m2 = mark(&saas, &one, &port).await;
    rows.push(with_costs(f, &m1, &m2));
    submitted += commands;
    // The same, each command submitted and answered in one request (`?wait_seconds=`; an
    // older build has no wait on submit).
    if !args.baseline {
        for (pattern, over) in [
            (Pattern::OneRequest, ""),
            (Pattern::OneRequestH2, ", HTTP/2"),
        ] {
            let label = format!(
                "1 gateway, {} in flight, one request each{over}",
                args.concurrency
            );
            let f = run_commands(
                std::slice::from_ref(&saas),
                &key,
                &one_ids,
                (commands, args.concurrency),
                &label,
                pattern,
            )
            .await?;
            let m = mark(&saas, &one, &port).await;
            rows.push(with_costs(f, &m2, &m));
            m2 = m;
            submitted += commands;
        }
    }
    if batch_n > 0 {
        match run_batches(&saas, &key, &one_ids[0], batch_n, args.batch_size, 8).await? {
            Some(f) => {
                let m3 = mark(&saas, &one, &port).await;
                rows.push(with_costs(f, &m2, &m3));
                submitted += batch_n;
            }
            None => println!("(this build has no batch submit)"),
        }
    }
    exactly_once(&one, submitted)?;
    for g in &mut one {
        if let Some(p) = g.proc.as_mut() {
            p.stop();
        }
    }

    // N gateways, 64 in flight, round robin.
    let many_root = root.join("many");
    let (mut many, many_ids) = gateways(&saas, &key, &many_root, gateways_n, args.baseline).await?;
    let port = [metrics_port(&many_root)];
    let m0 = mark(&saas, &many, &port).await;
    let f = run_commands(
        std::slice::from_ref(&saas),
        &key,
        &many_ids,
        (commands, args.concurrency),
        &format!("{gateways_n} gateways, {} in flight", args.concurrency),
        Pattern::SubmitThenGet,
    )
    .await?;
    let many_done = Instant::now();
    let m1 = mark(&saas, &many, &port).await;
    let mut f = with_costs(f, &m0, &m1);
    // Only the first gateway's flushes are counted: per command of its share.
    f.gw_syncs *= gateways_n as f64;
    rows.push(f);
    exactly_once(&many, commands)?;
    for g in &mut many {
        if let Some(p) = g.proc.as_mut() {
            p.stop();
        }
    }
    drop(many);
    let feed_line = match feed {
        Some((seen, task)) => {
            let line = check_feed(&seen, submitted + commands, many_done).await;
            task.abort();
            Some(line?)
        }
        None => None,
    };

    // Idle tunnels (memory per tunnel), or the storm: N connecting at once.
    let n = if storm > 0 { storm } else { idle };
    let ca_pem = std::fs::read_to_string(saas.dir.join("data/ca.pem"))?;
    let paired_at = Instant::now();
    let tls: Vec<_> = stream::iter(0..n)
        .map(|_| identity(&saas, &key, &ca_pem))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    println!(
        "paired {n} identities in {:.1} s",
        paired_at.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = saas.proc.rss_kib();
    let broker_url = saas.broker.clone();
    let storm_at = Instant::now();
    let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handles: Vec<_> = tls
        .into_iter()
        .map(|d| {
            tokio::spawn(storm_tunnel(
                broker_url.clone(),
                Arc::new(d),
                attempts.clone(),
            ))
        })
        .collect();
    let health = pcg_e2e::wait_for(
        "every tunnel registered",
        Duration::from_secs(600),
        || async {
            let (_, v) = saas.call("GET", "/healthz", "", None).await.ok()?;
            (v["tunnels"].as_u64()? as usize >= n).then_some(v)
        },
    )
    .await?;
    let all_in = storm_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = saas.proc.rss_kib();
    let per_tunnel_kib = (rss_after as f64 - rss_before as f64) / n as f64;
    let tries = attempts.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{n} tunnels connecting at once: all registered after {all_in:.1} s, {tries} attempts ({} retried)",
        tries.saturating_sub(n as u64)
    );
    // Reconnect storm: the SaaS restarts (Goodbye to every tunnel), they all come back.
    let saas = Arc::try_unwrap(saas).map_err(|_| anyhow::anyhow!("SaaS still shared"))?;
    let (saas, stopped) = saas.restart(Duration::from_secs(30)).await?;
    let restarted_at = Instant::now();
    let back = pcg_e2e::wait_for("every tunnel back", Duration::from_secs(600), || async {
        let (_, v) = saas.call("GET", "/healthz", "", None).await.ok()?;
        (v["tunnels"].as_u64()? as usize >= n).then_some(())
    })
    .await;
    let back_s = restarted_at.elapsed().as_secs_f64();
    let (_, after_restart) = saas
        .call("GET", "/metrics", &saas.operator_key, None)
        .await?;
    let opens = metric(
        after_restart.as_str().unwrap_or_default(),
        "pcg_saas_tunnel_opens_total",
    );
    for h in handles {
        h.abort();
    }

    print_rows(&rows);
    println!();
    if let Some(line) = &feed_line {
        println!("{line}");
    }
    println!(
        "broker RSS: {rss_before} KiB before, {rss_after} KiB with {n} idle tunnels ({} reported by /healthz): {per_tunnel_kib:.1} KiB per tunnel",
        health["tunnels"]
    );
    println!(
        "connect storm: {n} at once, all registered in {all_in:.1} s; SaaS stopped in {:?}; all back after the restart in {back_s:.1} s ({})",
        stopped.map(|(d, _)| d),
        if back.is_ok() { "ok" } else { "NOT all back" }
    );
    println!("tunnel opens after the restart: {opens}");
    let out = json!({
        "concurrency": args.concurrency,
        "scenarios": rows.iter().map(|f| {
            let c = f.costs();
            let cost = |i: usize| c.map(|c| c[i]);
            json!({
                "label": f.label, "commands": f.commands, "wall_s": f.secs,
                "commands_per_s": f.commands as f64 / f.secs, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms,
                "saas_syncs_per_command": cost(0), "gateway_syncs_per_command": cost(1),
                "saas_cpu_ms_per_command": cost(2), "gateway_cpu_ms_per_command": cost(3),
                "saas_switches_per_command": cost(4), "gateway_switches_per_command": cost(5),
            })
        }).collect::<Vec<_>>(),
        "tunnels": n,
        "tunnels_registered_s": all_in,
        "tunnel_attempts": tries,
        "broker_rss_kib_before": rss_before,
        "broker_rss_kib_after": rss_after,
        "broker_kib_per_idle_tunnel": per_tunnel_kib,
        "reconnect_after_restart_s": back_s,
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    println!("figures written to {}", args.out.display());
    back?;
    Ok(())
}

/// `pcg-bench cluster`: commands through one pcg-saas on sled, then through two replicas on a
/// three-node NATS cluster (submitted to each in turn), the same gateways' count and load; then
/// one replica killed (time until every tunnel is on the other) and started again (time until
/// the tunnels are spread again, and how).
async fn cluster(args: &Args, root: &std::path::Path) -> anyhow::Result<()> {
    use pcg_e2e::nats::{self, NatsCluster};
    let (commands, gateways_n, light) = if args.quick {
        (300, 4, 100)
    } else {
        (args.commands, args.gateways, args.commands.min(1000))
    };
    let conc = args.concurrency;
    println!("pcg-bench: binaries from {}", pcg_e2e::bin_dir().display());
    let mut rows = Vec::new();

    // One pcg-saas on its own store.
    {
        let saas = Arc::new(
            Saas::start(
                &root.join("sled"),
                SaasOptions {
                    heartbeat_ms: Some(5000),
                    ..Default::default()
                },
            )
            .await?,
        );
        let (_, key) = saas.tenant("bench").await?;
        let (mut gws, ids) =
            gateways(&saas, &key, &root.join("sled-gws"), gateways_n, false).await?;
        let one = std::slice::from_ref(&saas);
        run_commands(
            one,
            &key,
            &ids,
            (100, conc),
            "warm-up",
            Pattern::SubmitThenGet,
        )
        .await?;
        rows.push(
            run_commands(
                one,
                &key,
                &ids,
                (light, 1),
                "one pcg-saas on sled, 1 in flight",
                Pattern::SubmitThenGet,
            )
            .await?,
        );
        rows.push(
            run_commands(
                one,
                &key,
                &ids,
                (commands, conc),
                &format!("one pcg-saas on sled, {conc} in flight"),
                Pattern::SubmitThenGet,
            )
            .await?,
        );
        exactly_once(&gws, 100 + light + commands)?;
        for g in &mut gws {
            if let Some(p) = g.proc.as_mut() {
                p.stop();
            }
        }
    }

    // Two replicas on three NATS nodes.
    let pki = root.join("pki");
    nats::init_pki(&pki)?;
    let mut cluster = NatsCluster::start(&root.join("nats"), &pki).await?;
    cluster.wait_ready(Duration::from_secs(90)).await?;
    let urls = cluster.urls();
    let ports = [pcg_e2e::free_port(), pcg_e2e::free_port()];
    let brokers: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let start = |i: usize| {
        let name = format!("replica{}", i + 1);
        let (dir, extra) = (
            root.join(&name),
            nats::replica_toml(&pki, &name, &urls, &brokers),
        );
        let listen: std::net::SocketAddr = format!("127.0.0.1:{}", ports[i]).parse().expect("addr");
        async move {
            Saas::start(
                &dir,
                SaasOptions {
                    heartbeat_ms: Some(5000),
                    api_listen: Some(listen),
                    extra_toml: extra,
                    ..Default::default()
                },
            )
            .await
        }
    };
    let r1 = Arc::new(start(0).await?);
    let r2 = Arc::new(start(1).await?);
    let (_, key) = r1.tenant("bench").await?;
    let (gws, ids) = gateways(&r1, &key, &root.join("cluster-gws"), gateways_n, false).await?;
    let counts = |a: u64, b: u64| format!("replica1 {a}, replica2 {b}");
    let at_start = counts(nats::tunnels(&r1).await, nats::tunnels(&r2).await);
    let both = [r1.clone(), r2.clone()];
    run_commands(
        &both,
        &key,
        &ids,
        (100, conc),
        "warm-up",
        Pattern::SubmitThenGet,
    )
    .await?;
    rows.push(
        run_commands(
            &both,
            &key,
            &ids,
            (light, 1),
            "two replicas on 3 NATS nodes, 1 in flight",
            Pattern::SubmitThenGet,
        )
        .await?,
    );
    rows.push(
        run_commands(
            &both,
            &key,
            &ids,
            (commands, conc),
            &format!("two replicas on 3 NATS nodes, {conc} in flight"),
            Pattern::SubmitThenGet,
        )
        .await?,
    );
    exactly_once(&gws, 100 + light + commands)?;
    drop(both);

    print_rows(&rows);
    // Failover: replica1 killed; every tunnel on replica2. Then replica1 again.
    let before = counts(nats::tunnels(&r1).await, nats::tunnels(&r2).await);
    let mut r1 = Arc::try_unwrap(r1).map_err(|_| anyhow::anyhow!("replica1 still shared"))?;
    let killed = Instant::now();
    r1.proc.kill();
    drop(r1);
    let n = gateways_n as u64;
    pcg_e2e::wait_for("every tunnel on replica2", Duration::from_secs(120), || {
        let r2 = r2.clone();
        async move { (nats::tunnels(&r2).await == n).then_some(()) }
    })
    .await?;
    let failover = killed.elapsed();
    let r1 = start(0).await?;
    let restarted = Instant::now();
    let spread = pcg_e2e::wait_for("the tunnels spread again", Duration::from_secs(120), || {
        let (r1, r2) = (&r1, r2.clone());
        async move {
            let (a, b) = (nats::tunnels(r1).await, nats::tunnels(&r2).await);
            // As the replicas judge it: none above its share by more than the margin.
            let share = n.div_ceil(2);
            (a + b == n && a.max(b) <= share + (share / 10).max(2)).then_some((a, b))
        }
    })
    .await?;
    let rebalance = restarted.elapsed();
    println!();
    println!("tunnels per replica: at start {at_start}; before the kill {before}; after the kill all {n} on replica2 in {:.2} s; after replica1's restart {} in {:.1} s", failover.as_secs_f64(), counts(spread.0, spread.1), rebalance.as_secs_f64());
    let out = json!({
        "rows": rows.iter().map(|f| json!({
            "scenario": f.label, "commands": f.commands, "secs": f.secs,
            "per_sec": f.commands as f64 / f.secs, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms,
        })).collect::<Vec<_>>(),
        "gateways": gateways_n,
        "tunnels_at_start": at_start,
        "tunnels_before_kill": before,
        "failover_secs": failover.as_secs_f64(),
        "tunnels_after_restart": [spread.0, spread.1],
        "rebalance_secs": rebalance.as_secs_f64(),
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    println!("figures written to {}", args.out.display());
    drop(gws);
    Ok(())
}
