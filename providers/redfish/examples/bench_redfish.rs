//! Benchmark (a program, not a test): pcg-redfish against the `sushy` Python library, side by
//! side in one run against one sushy-emulator behind TLS and basic auth:
//! (1) N power-state reads of one system; (2) a power cycle (ForceOff, wait off, On, wait on —
//! sushy offers no PowerCycle) of every fake system, R rounds. Both clients poll with the same
//! backoff (100 ms doubling to 1 s). Prints a Markdown table and writes it to the file given as
//! the first argument (default target/bench/bare-metal-redfish.md).
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
url, user, pw, ca, n, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
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
reads = []
s0 = systems[0]
for _ in range(n):
    t = time.perf_counter(); s0.refresh(force=True); _ = s0.power_state; reads.append(time.perf_counter() - t)
cycles = []
for _ in range(rounds):
    for s in systems:
        t = time.perf_counter()
        s.reset_system(sushy.ResetType.FORCE_OFF); wait(s, sushy.PowerState.OFF)
        s.reset_system(sushy.ResetType.ON); wait(s, sushy.PowerState.ON)
        cycles.append(time.perf_counter() - t)
print(json.dumps({"reads": reads, "cycles": cycles}))
"#;

fn stats(v: &mut [f64]) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let total: f64 = v.iter().sum();
    (total, v[v.len() / 2], v[0], v[v.len() - 1])
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

    // pcg.
    let mut pcg_reads = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        d.power_state(&caps.systems[0]).await.unwrap();
        pcg_reads.push(t.elapsed().as_secs_f64());
    }
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

    // The sushy library, same work.
    let url = format!("https://127.0.0.1:{}", peer.port);
    let py = Command::new(peer.bin.join("python"))
        .args(["-c", SUSHY_SCRIPT, &url, common::USER, common::PASSWORD])
        .arg(&ca)
        .args([n.to_string(), rounds.to_string()])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "sushy script: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let floats = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x.as_f64())
            .collect()
    };
    let (mut py_reads, mut py_cycles) = (floats("reads"), floats("cycles"));

    let (pt, pm, _, px) = stats(&mut pcg_reads);
    let (yt, ym, _, yx) = stats(&mut py_reads);
    let (ct, cm, cmin, cmax) = stats(&mut pcg_cycles);
    let (qt, qm, qmin, qmax) = stats(&mut py_cycles);
    let mut t = String::new();
    t.push_str(&format!(
        "Redfish: sushy-emulator {} fake systems, HTTPS (rcgen CA) + bcrypt basic auth, loopback.\n\n\
         | work | client | total s | median | min | max | sushy/pcg (median) |\n|---|---|---:|---:|---:|---:|---:|\n",
        caps.systems.len()
    ));
    t.push_str(&format!(
        "| {n} power-state reads | pcg-redfish | {pt:.2} | {:.1} ms | – | {:.1} ms | 1.0× |\n",
        pm * 1e3,
        px * 1e3
    ));
    t.push_str(&format!(
        "| {n} power-state reads | sushy (Python) | {yt:.2} | {:.1} ms | – | {:.1} ms | {:.2}× |\n",
        ym * 1e3,
        yx * 1e3,
        ym / pm
    ));
    let k = pcg_cycles.len();
    t.push_str(&format!(
        "| power cycle × {k} (every system, {rounds} rounds) | pcg-redfish | {ct:.1} | {cm:.1} s | {cmin:.1} s | {cmax:.1} s | 1.0× |\n"
    ));
    t.push_str(&format!(
        "| power cycle × {k} (every system, {rounds} rounds) | sushy (Python) | {qt:.1} | {qm:.1} s | {qmin:.1} s | {qmax:.1} s | {:.2}× |\n",
        qm / cm
    ));
    t.push_str("\nA cycle's time is dominated by the emulator applying each power change 1–11 s (random) after the request; the read row shows the clients' own cost.\n");
    print!("{t}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &t).unwrap();
    eprintln!("written to {out}");
}
