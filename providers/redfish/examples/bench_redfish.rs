//! Benchmark (a program, not a test): pcg-redfish against the `sushy` Python library, side by
//! side in one run against one sushy-emulator behind TLS and basic auth:
//! (1) N power-state reads of one system, taken in 5 alternating blocks (pcg, sushy, pcg, …) so
//! that a change in machine load touches both clients alike, with each client's own CPU time per
//! read (the part a client controls; the rest is the emulator); (2) a power cycle (ForceOff, wait
//! off, On, wait on — sushy offers no PowerCycle) of every fake system, R rounds (0 skips it).
//! Both clients poll with the same backoff (100 ms doubling to 1 s). Prints a Markdown table and
//! writes it to the file given as the first argument (default target/bench/bare-metal-redfish.md).
//!
//! Run: `cargo run --release -p pcg-redfish --example bench_redfish [OUT] [N] [R]`
//! (needs scripts/peers/install-redfish.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use pcg_provider::{BareMetal, PowerAction, PowerState};
use pcg_redfish::RedfishDriver;

const SUSHY_SCRIPT: &str = r#"
import json, sys, time
import sushy
url, user, pw, ca, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
root = sushy.Sushy(url + "/redfish/v1", username=user, password=pw, verify=ca)
systems = [root.get_system(m) for m in root.get_system_collection().members_identities]
def wait(s, want):
    d = 0.1
    while True:
        s.refresh(force=True)
        if s.power_state == want:
            return
        time.sleep(d)
        d = min(d * 2, 1.0)
out = []
cpu = time.process_time()
if mode == "reads":
    s0 = systems[0]
    for _ in range(n):
        t = time.perf_counter(); s0.refresh(force=True); _ = s0.power_state; out.append(time.perf_counter() - t)
else:
    for _ in range(n):
        for s in systems:
            t = time.perf_counter()
            s.reset_system(sushy.ResetType.FORCE_OFF); wait(s, sushy.PowerState.OFF)
            s.reset_system(sushy.ResetType.ON); wait(s, sushy.PowerState.ON)
            out.append(time.perf_counter() - t)
print(json.dumps({"times": out, "cpu": time.process_time() - cpu}))
"#;

/// Alternating blocks of reads.
const BLOCKS: usize = 5;

fn stats(v: &mut [f64]) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let total: f64 = v.iter().sum();
    (total, v[v.len() / 2], v[0], v[v.len() - 1])
}

/// CPU time used so far by every thread of this process (Linux schedstat, nanoseconds).
fn process_cpu() -> Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// Runs the sushy script once: (per-item seconds, CPU seconds of the whole run).
fn sushy(peer: &common::Sushy, ca: &std::path::Path, mode: &str, n: usize) -> (Vec<f64>, f64) {
    let url = format!("https://127.0.0.1:{}", peer.port);
    let py = Command::new(peer.bin.join("python"))
        .args(["-c", SUSHY_SCRIPT, &url, common::USER, common::PASSWORD])
        .arg(ca)
        .args([mode.to_owned(), n.to_string()])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "sushy script: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let times = v["times"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    (times, v["cpu"].as_f64().unwrap_or(0.0))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/bench/bare-metal-redfish.md".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let Some(peer) = common::Sushy::start() else {
        eprintln!("sushy-emulator missing: run scripts/peers/install-redfish.sh");
        std::process::exit(2);
    };
    let ca = peer.dir.path().join("ca.pem");
    std::fs::write(&ca, &peer.pki.ca_pem).unwrap();
    let settle = Duration::from_secs(60);

    // Bring every system to On first, so both clients cycle from the same state.
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = d.enrol().await.unwrap();
    for s in &caps.systems {
        d.power(s, PowerAction::On).await.unwrap();
    }
    for s in &caps.systems {
        d.wait_power(s, PowerState::On, settle).await.unwrap();
    }

    // Reads, in alternating blocks.
    let per_block = n.div_ceil(BLOCKS);
    let (mut pcg_reads, mut py_reads) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut pcg_cpu, mut py_cpu) = (0.0, 0.0);
    for _ in 0..BLOCKS {
        let cpu = process_cpu();
        for _ in 0..per_block {
            let t = Instant::now();
            d.power_state(&caps.systems[0]).await.unwrap();
            pcg_reads.push(t.elapsed().as_secs_f64());
        }
        pcg_cpu += (process_cpu() - cpu).as_secs_f64();
        let (times, cpu) = sushy(&peer, &ca, "reads", per_block);
        py_reads.extend(times);
        py_cpu += cpu;
    }

    // Power cycles: pcg, then sushy (a cycle waits seconds on the emulator).
    let mut pcg_cycles = Vec::new();
    for _ in 0..rounds {
        for s in &caps.systems {
            let t = Instant::now();
            d.power(s, PowerAction::Cycle).await.unwrap();
            d.wait_power(s, PowerState::On, settle).await.unwrap();
            pcg_cycles.push(t.elapsed().as_secs_f64());
        }
    }
    d.close().await.unwrap();
    let mut py_cycles = if rounds > 0 {
        sushy(&peer, &ca, "cycles", rounds).0
    } else {
        Vec::new()
    };

    let reads = pcg_reads.len();
    let (pt, pm, _, px) = stats(&mut pcg_reads);
    let (yt, ym, _, yx) = stats(&mut py_reads);
    let mut t = String::new();
    t.push_str(&format!(
        "Redfish: sushy-emulator {} fake systems, HTTPS (rcgen CA) + bcrypt basic auth, loopback; \
         reads in {BLOCKS} alternating blocks.\n\n\
         | work | client | total s | median | max | client CPU per read | sushy/pcg (median) |\n|---|---|---:|---:|---:|---:|---:|\n",
        caps.systems.len()
    ));
    t.push_str(&format!(
        "| {reads} power-state reads | pcg-redfish | {pt:.2} | {:.1} ms | {:.1} ms | {:.2} ms | 1.0× |\n",
        pm * 1e3,
        px * 1e3,
        pcg_cpu * 1e3 / reads as f64
    ));
    t.push_str(&format!(
        "| {reads} power-state reads | sushy (Python) | {yt:.2} | {:.1} ms | {:.1} ms | {:.2} ms | {:.2}× |\n",
        ym * 1e3,
        yx * 1e3,
        py_cpu * 1e3 / reads as f64,
        ym / pm
    ));
    if rounds > 0 {
        let (ct, cm, cmin, cmax) = stats(&mut pcg_cycles);
        let (qt, qm, qmin, qmax) = stats(&mut py_cycles);
        let k = pcg_cycles.len();
        t.push_str(&format!(
            "| power cycle × {k} (every system, {rounds} rounds) | pcg-redfish | {ct:.1} | {cm:.1} s (min {cmin:.1} s) | {cmax:.1} s | – | 1.0× |\n"
        ));
        t.push_str(&format!(
            "| power cycle × {k} (every system, {rounds} rounds) | sushy (Python) | {qt:.1} | {qm:.1} s (min {qmin:.1} s) | {qmax:.1} s | – | {:.2}× |\n",
            qm / cm
        ));
        t.push_str("\nA cycle's time is dominated by the emulator applying each power change 1–11 s (random) after the request.\n");
    }
    t.push_str("\nA read's time is mostly the emulator's: a new TCP + TLS connection per request (it closes after each response), a bcrypt check, and its response body held back by Nagle until the client's delayed ACK; the CPU column is the client's own cost.\n");
    print!("{t}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &t).unwrap();
    eprintln!("written to {out}");
}
