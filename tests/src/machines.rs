//! Declared machines over the REST API, for the watch loop's tests and benchmark: declare,
//! read, wait for a state or an event.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::{wait_for, Saas};

/// The gateway config of the watch tests: a cycle a second, every observation and the health
/// reported every two seconds.
pub const FAST_WATCH: &str = "watch_interval_ms = 1000\nwatch_report_ms = 2000\n";

/// Runs a command and waits for it to succeed; its result output.
pub async fn command(
    saas: &Saas,
    key: &str,
    gw: &str,
    kind: &str,
    payload: Value,
) -> anyhow::Result<Value> {
    let id = saas.submit(key, gw, kind, payload).await?;
    let v = saas
        .wait_command(key, &id, Duration::from_secs(120))
        .await?;
    if v["state"] != "succeeded" {
        bail!("{kind} failed: {v}");
    }
    Ok(v["result"]["output"].clone())
}

/// Declares a machine; its id.
pub async fn declare(saas: &Saas, key: &str, gw: &str, body: Value) -> anyhow::Result<String> {
    let v = saas
        .ok(
            "POST",
            &format!("/v1/gateways/{gw}/machines"),
            key,
            Some(body),
        )
        .await?;
    v["id"]
        .as_str()
        .map(str::to_string)
        .context("the machine view has no id")
}

pub async fn machine(saas: &Saas, key: &str, id: &str) -> anyhow::Result<Value> {
    saas.ok("GET", &format!("/v1/machines/{id}"), key, None)
        .await
}

/// Waits until the machine's view satisfies `pred`; that view.
pub async fn wait_machine(
    saas: &Saas,
    key: &str,
    id: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let r = wait_for(what, timeout, || async {
        let v = machine(saas, key, id).await.ok()?;
        let ok = pred(&v);
        *last.lock().expect("lock") = v.clone();
        ok.then_some(v)
    })
    .await;
    r.map_err(|e| {
        anyhow::anyhow!(
            "{e}; machine {id} last seen as {}",
            last.lock().expect("lock")
        )
    })
}

/// The machine's events of `kind` (a kind, or a prefix ending in `.`), oldest first.
pub async fn events(
    saas: &Saas,
    key: &str,
    machine_id: &str,
    kind: &str,
) -> anyhow::Result<Vec<Value>> {
    let v = saas
        .ok(
            "GET",
            &format!("/v1/events?machine_id={machine_id}&kind={kind}&limit=1000"),
            key,
            None,
        )
        .await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Waits until the machine has at least `n` events of `kind`; them.
pub async fn wait_events(
    saas: &Saas,
    key: &str,
    machine_id: &str,
    kind: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Value>> {
    let r = wait_for(
        &format!("{n} {kind} event(s) of machine {machine_id}"),
        timeout,
        || async {
            let evs = events(saas, key, machine_id, kind).await.ok()?;
            (evs.len() >= n).then_some(evs)
        },
    )
    .await;
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            let all = events(saas, key, machine_id, "machine.")
                .await
                .unwrap_or_default();
            bail!("{e}; its events: {}", json!(all))
        }
    }
}

/// Waits until the gateway has reported `cycles` more watch cycles than `after` (from its health
/// reports); the cycle count reached.
pub async fn wait_cycles(
    saas: &Saas,
    key: &str,
    gw: &str,
    after: u64,
    cycles: u64,
    timeout: Duration,
) -> anyhow::Result<u64> {
    wait_for(&format!("{cycles} more watch cycles"), timeout, || async {
        let c = watch_cycles(saas, key, gw).await?;
        (c >= after + cycles).then_some(c)
    })
    .await
}

/// The watch cycles the gateway last reported.
pub async fn watch_cycles(saas: &Saas, key: &str, gw: &str) -> Option<u64> {
    let v = saas
        .ok("GET", &format!("/v1/gateways/{gw}"), key, None)
        .await
        .ok()?;
    v["health"]["watch"]["cycles"].as_u64()
}

/// A vSphere VM spec on vcsim's first cluster.
pub fn vcsim_vm(name: &str) -> Value {
    json!({
        "name": name, "source": "pcg-template", "cpus": 1, "memory_mib": 512,
        "placement": {"provider": "vsphere", "datacenter": "DC0", "cluster": "DC0_C0"},
    })
}

/// Declares one machine per VM of `vms` (rows of the reference client's `list`), adopting it
/// under the `observe` policy with the power it has: nothing to converge. Their ids.
pub async fn adopt_all(
    saas: &Saas,
    key: &str,
    gw: &str,
    endpoint: &str,
    vms: &[Value],
) -> anyhow::Result<Vec<String>> {
    use futures_util::stream::{self, StreamExt as _};
    let bodies: Vec<Value> = vms
        .iter()
        .map(|r| {
            json!({
                "name": r["name"], "policy": "observe",
                "power": if r["power"] == "poweredOn" { "on" } else { "off" },
                "vsphere": {"endpoint": endpoint, "adopt_id": r["id"],
                    "vm": {"name": r["name"], "source": "pcg-template",
                           "placement": {"provider": "vsphere"}}},
            })
        })
        .collect();
    let ids: Vec<anyhow::Result<String>> = stream::iter(bodies)
        .map(|b| async move { declare(saas, key, gw, b).await })
        .buffer_unordered(16)
        .collect()
        .await;
    ids.into_iter().collect()
}

/// Waits until `n` machines of the gateway are in sync; a line saying how long it took.
pub async fn wait_all_in_sync(
    saas: &Saas,
    key: &str,
    gw: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<String> {
    let start = std::time::Instant::now();
    wait_for(&format!("{n} machines in sync"), timeout, || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = saas
            .ok("GET", &format!("/v1/gateways/{gw}/machines"), key, None)
            .await
            .ok()?;
        let in_sync = v
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "in_sync")
            .count();
        (in_sync >= n).then_some(())
    })
    .await?;
    Ok(format!(
        "{n} machines in sync {:.1} s after the wait began",
        start.elapsed().as_secs_f64()
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `pcg-bench watch`: one vcsim holding `vms` VMs, every one declared (adopted, `observe`); the
/// watch loop's cycles beside three baselines in the same run: the same paged read by
/// pcg-vsphere alone, govmomi's listing (`pcg-vcsim ref bench`), and one `get` per VM (what a
/// loop reading each machine on its own would cost). Prints a Markdown table and writes it to
/// `out` (with `.md`).
pub async fn bench(
    vms: usize,
    cycles: usize,
    root: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use pcg_provider::vm::VmProvider as _;
    let per_pool = vms.div_ceil(2).to_string();
    let sim = crate::vcsim::Vcsim::start(&["-vm", &per_pool, "-cluster-host", "1"])
        .context("pcg-vcsim missing: run scripts/peers/install-vsphere.sh")?;
    let rows: Vec<Value> = sim
        .reference(&["list"])
        .into_iter()
        .filter(|r| r["template"] == false)
        .collect();
    let n = rows.len();
    let rounds = cycles.max(3);

    // Baselines: pcg-vsphere's paged read, govmomi's, one get per VM.
    let ep: pcg_vsphere::VsphereEndpoint = serde_json::from_value(sim.endpoint())?;
    let d = pcg_vsphere::VsphereDriver::connect(&ep).await?;
    let mut list_ms = Vec::new();
    let mut list_requests = 0;
    for _ in 0..rounds {
        let before = d.client().requests();
        let t = std::time::Instant::now();
        d.list().await?;
        list_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        list_requests = d.client().requests() - before;
    }
    let govmomi = sim.reference(&["bench", &rounds.to_string()]);
    let govmomi_ms = govmomi
        .first()
        .and_then(|v| v["median_ms"].as_f64())
        .unwrap_or(0.0);
    let before = d.client().requests();
    let t = std::time::Instant::now();
    for r in &rows {
        d.get(r["id"].as_str().unwrap_or_default()).await?;
    }
    let gets_ms = t.elapsed().as_secs_f64() * 1000.0;
    let gets_requests = d.client().requests() - before;
    drop(d);

    // The watch loop: a cycle every 2 s, every cycle's figures in a report each second.
    let (saas, _gw, key, gw) = crate::paired_with(
        root,
        crate::SaasOptions::default(),
        "watch_interval_ms = 2000\nwatch_report_ms = 1000\n",
    )
    .await?;
    command(
        &saas,
        &key,
        &gw,
        "vsphere.enrol",
        json!({"name": "big", "endpoint": sim.endpoint()}),
    )
    .await?;
    let t = std::time::Instant::now();
    adopt_all(&saas, &key, &gw, "big", &rows).await?;
    let declare_s = t.elapsed().as_secs_f64();
    wait_all_in_sync(&saas, &key, &gw, n, Duration::from_secs(600)).await?;
    let in_sync_s = t.elapsed().as_secs_f64();
    let start = watch_cycles(&saas, &key, &gw).await.unwrap_or(0);
    let seen: std::sync::Mutex<std::collections::BTreeMap<u64, (f64, f64, u64)>> =
        Default::default();
    wait_for(
        &format!("{cycles} watch cycles"),
        Duration::from_secs(600),
        || async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let h = saas
                .ok("GET", &format!("/v1/gateways/{gw}"), &key, None)
                .await
                .ok()?;
            let h = &h["health"];
            let c = h["watch"]["cycles"].as_u64()?;
            let e = h["endpoints"]
                .as_array()?
                .iter()
                .find(|e| e["name"] == "big" && e["machines"] == n)?
                .clone();
            let mut seen = seen.lock().expect("lock");
            if c > start + 1 {
                seen.insert(
                    c,
                    (
                        h["watch"]["last_cycle_ms"].as_f64()?,
                        e["read_ms"].as_f64()?,
                        e["read_requests"].as_u64()?,
                    ),
                );
            }
            (seen.len() >= cycles).then_some(())
        },
    )
    .await?;
    let seen = seen.into_inner().expect("lock");
    let cycle_ms = median(seen.values().map(|v| v.0).collect());
    let read_ms = median(seen.values().map(|v| v.1).collect());
    let requests = seen.values().map(|v| v.2).max().unwrap_or(0);
    let table = format!(
        "| measure ({n} VMs, each a declared machine) | time | SOAP requests |\n|---|---:|---:|\n\
| watch cycle: read + judge {n} machines + report (median of {} cycles) | {cycle_ms:.0} ms | {requests} (max) |\n\
| of which the vCenter read (median) | {read_ms:.0} ms | |\n\
| baseline: pcg-vsphere `list`, the same paged read (median of {rounds}) | {:.0} ms | {list_requests} |\n\
| baseline: govmomi view listing (median of {rounds}) | {govmomi_ms:.0} ms | (one page) |\n\
| baseline: one `get` per VM, {n} of them | {gets_ms:.0} ms | {gets_requests} |\n\
| declaring {n} machines over REST (16 at once) | {declare_s:.1} s | |\n\
| declared → every machine in sync at the SaaS | {in_sync_s:.1} s | |\n",
        seen.len(),
        median(list_ms),
    );
    println!("{table}");
    let out = out.with_extension("md");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &table)?;
    println!("figures written to {}", out.display());
    Ok(())
}
