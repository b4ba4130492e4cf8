//! pcg-bench: measures the tunnel path with real processes on 127.0.0.1 and prints a table
//! (also written as JSON to `--out`).
//!
//! 1. Commands through 1 gateway and through 100 gateways (real `pcg-gateway` daemons):
//!    commands per second and round-trip latency (REST submit → result, long-polled) p50/p99.
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

#[derive(Parser)]
struct Args {
    /// `tunnel` (default): 1 and N gateways and idle-tunnel memory; `transports`: direct vs
    /// CONNECT proxy vs WebSocket through a TLS-inspecting proxy, and reconnect after a silent
    /// drop; `diag`: `pcgctl diag` passing and with a silent endpoint.
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
    /// `diag`: runs of each passing case (the silent cases run 3 times).
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

struct Figures {
    label: String,
    commands: usize,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run_commands(
    saas: &Arc<Saas>,
    key: &str,
    gws: &[String],
    n: usize,
    conc: usize,
    label: &str,
) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let mut lat: Vec<f64> = stream::iter(0..n)
        .map(|i| {
            let saas = saas.clone();
            let key = key.to_string();
            let gw = gws[i % gws.len()].clone();
            async move {
                let t = Instant::now();
                let id = saas
                    .submit(&key, &gw, "gateway.echo", json!({ "i": i }))
                    .await?;
                let v = saas
                    .wait_command(&key, &id, Duration::from_secs(120))
                    .await?;
                anyhow::ensure!(v["result"]["output"]["echo"]["i"] == i, "wrong result {v}");
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
    })
}

async fn gateways(
    saas: &Saas,
    key: &str,
    root: &std::path::Path,
    count: usize,
) -> anyhow::Result<(Vec<Gw>, Vec<String>)> {
    let mut gws = Vec::new();
    let mut ids = Vec::new();
    for i in 0..count {
        let (_, tok) = saas.token(key, None).await?;
        let mut gw = Gw::new(&root.join(format!("gw{i}")))?;
        gw.pair(&tok)?;
        gw.start()?;
        gws.push(gw);
    }
    for gw in &gws {
        gw.wait_tunnel("connected", Duration::from_secs(60)).await?;
        ids.push(gw.gateway_id().context("gateway id")?);
    }
    Ok((gws, ids))
}

/// Pairs one identity directly over the REST API; returns a tonic TLS config for it.
async fn identity(
    saas: &Saas,
    key: &str,
    ca_pem: &str,
) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let (_, tok) = saas.token(key, None).await?;
    let t = pcg_gateway::PairingToken::decode(&tok)?;
    let kp = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&kp)?
        .pem()?;
    let r: pcg_proto::pairing::PairResponse = saas
        .http
        .post(format!("{}/v1/pair", saas.api))
        .json(&pcg_proto::pairing::PairRequest {
            token_id: t.token_id,
            secret: t.secret,
            csr_pem: csr,
            hostname: "bench".into(),
            gateway_version: "bench".into(),
        })
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            r.certificate_pem,
            kp.serialize_pem(),
        ))
        .domain_name("127.0.0.1"))
}

async fn idle_tunnel(
    url: String,
    tls: tonic::transport::ClientTlsConfig,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let ch = tonic::transport::Endpoint::from_shared(url)?
        .tls_config(tls)?
        .connect()
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
    inbound.message().await?.context("no Welcome")?;
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
        run_commands(&saas, &key, &ids, 200, args.concurrency, "warm-up").await?;
        let one = run_commands(&saas, &key, &ids, 500, 1, &format!("{label}, 1 in flight")).await?;
        let many = run_commands(
            &saas,
            &key,
            &ids,
            args.commands,
            args.concurrency,
            &format!("{label}, {} in flight", args.concurrency),
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
    let root = tempfile::Builder::new().prefix("pcg-bench-").tempdir()?;
    if args.scenario == "transports" {
        return transports(&args, root.path()).await;
    }
    if args.scenario == "diag" {
        return diag(&args, root.path()).await;
    }
    println!("pcg-bench: binaries from {}", pcg_e2e::bin_dir().display());
    let saas = Arc::new(
        Saas::start(
            &root.path().join("saas"),
            SaasOptions {
                heartbeat_ms: Some(5000),
                extra_toml: String::new(),
                ..Default::default()
            },
        )
        .await?,
    );
    let (_, key) = saas.tenant("bench").await?;

    // 1 gateway.
    let (mut one, one_ids) = gateways(&saas, &key, &root.path().join("one"), 1).await?;
    // Warm-up, not measured.
    run_commands(&saas, &key, &one_ids, 200, args.concurrency, "warm-up").await?;
    let f1 = run_commands(
        &saas,
        &key,
        &one_ids,
        args.commands,
        args.concurrency,
        "1 gateway",
    )
    .await?;
    for g in &mut one {
        if let Some(p) = g.proc.as_mut() {
            p.stop();
        }
    }

    // N gateways.
    let (mut many, many_ids) =
        gateways(&saas, &key, &root.path().join("many"), args.gateways).await?;
    let label = format!("{} gateways", args.gateways);
    let fn_ = run_commands(
        &saas,
        &key,
        &many_ids,
        args.commands,
        args.concurrency,
        &label,
    )
    .await?;
    for g in &mut many {
        if let Some(p) = g.proc.as_mut() {
            p.stop();
        }
    }
    drop(many);

    // Idle tunnels.
    let ca_pem = std::fs::read_to_string(saas.dir.join("data/ca.pem"))?;
    let mut tls = Vec::new();
    for _ in 0..args.idle {
        tls.push(identity(&saas, &key, &ca_pem).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = saas.proc.rss_kib();
    let broker_url = saas.broker.clone();
    let mut handles = Vec::new();
    for t in tls {
        handles.push(idle_tunnel(broker_url.clone(), t).await?);
    }
    let health = pcg_e2e::wait_for("tunnels registered", Duration::from_secs(60), || async {
        let (_, v) = saas.call("GET", "/healthz", "", None).await.ok()?;
        (v["tunnels"].as_u64()? as usize >= args.idle).then_some(v)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = saas.proc.rss_kib();
    let per_tunnel_kib = (rss_after as f64 - rss_before as f64) / args.idle as f64;
    for h in handles {
        h.abort();
    }

    println!();
    println!("| scenario | commands | wall s | commands/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for f in [&f1, &fn_] {
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
    println!(
        "broker RSS: {} KiB before, {} KiB with {} idle tunnels ({} reported by /healthz): {:.1} KiB per tunnel",
        rss_before, rss_after, args.idle, health["tunnels"], per_tunnel_kib
    );
    let scenarios: Vec<serde_json::Value> = [&f1, &fn_]
        .iter()
        .map(|f| {
            json!({
                "label": f.label, "commands": f.commands, "wall_s": f.secs,
                "commands_per_s": f.commands as f64 / f.secs, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms,
            })
        })
        .collect();
    let out = json!({
        "concurrency": args.concurrency,
        "scenarios": scenarios,
        "idle_tunnels": args.idle,
        "broker_rss_kib_before": rss_before,
        "broker_rss_kib_after": rss_after,
        "broker_kib_per_idle_tunnel": per_tunnel_kib,
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    println!("figures written to {}", args.out.display());
    Ok(())
}
