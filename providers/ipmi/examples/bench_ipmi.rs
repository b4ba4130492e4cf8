//! Benchmark (a program, not a test): 1,000 power-status reads against ipmi_sim by pcg (one
//! session, reused), by ipmitool run once per call (as operators script it), and by one ipmitool
//! `shell` session fed the same 1,000 commands. Prints a Markdown table and writes it to the file
//! given as the first argument (default target/bench/bare-metal-ipmi.md).
//!
//! Run: `cargo run --release -p pcg-ipmi --example bench_ipmi [OUT] [N]`
//! (needs scripts/peers/install-ipmi.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::LabBmc;
use pcg_ipmi::{IpmiDriver, SYSTEM};
use pcg_provider::BareMetal;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p95(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 95 / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/bench/bare-metal-ipmi.md".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let Some(bmc) = common::IpmiSim::start() else {
        eprintln!("ipmi_sim/ipmitool missing: run scripts/peers/install-ipmi.sh");
        std::process::exit(2);
    };

    // pcg: one driver, one session.
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    d.power_state(SYSTEM).await.unwrap(); // session set-up, not timed per call
    let mut pcg = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        d.power_state(SYSTEM).await.unwrap();
        pcg.push(s.elapsed());
    }
    let pcg_total = t.elapsed();
    let stats = d.stats().await;
    d.close().await.unwrap();

    // ipmitool, one process per call.
    let mut per_call = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        let out = bmc.ipmitool(&["chassis", "power", "status"]);
        assert!(out.contains("Chassis Power"));
        per_call.push(s.elapsed());
    }
    let per_call_total = t.elapsed();

    // One ipmitool shell session fed n commands.
    let t = Instant::now();
    let mut child = Command::new("ipmitool")
        .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
        .arg(bmc.port.to_string())
        .args(["-U", common::USER, "-P", common::PASSWORD, "shell"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let mut script = String::new();
        for _ in 0..n {
            script.push_str("chassis power status\n");
        }
        script.push_str("exit\n");
        stdin.write_all(script.as_bytes()).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let shell_total = t.elapsed();
    let answered = String::from_utf8_lossy(&output.stdout)
        .matches("Chassis Power is")
        .count();
    assert_eq!(answered, n, "ipmitool shell answered {answered} of {n}");

    let (pm, p9) = (median(&mut pcg), p95(&mut pcg));
    let (im, i9) = (median(&mut per_call), p95(&mut per_call));
    let per = |total: Duration| total / n as u32;
    let mut table = String::new();
    table.push_str(&format!(
        "IPMI: {n} × Get Chassis Status (power status) against ipmi_sim on loopback, cipher suite 3.\n\n\
         | client | total s | per call ms (mean) | median ms | p95 ms | vs pcg (total) |\n\
         |---|---:|---:|---:|---:|---:|\n"
    ));
    table.push_str(&format!(
        "| pcg-ipmi, one session | {:.2} | {} | {} | {} | 1.0× |\n",
        pcg_total.as_secs_f64(),
        ms(per(pcg_total)),
        ms(pm),
        ms(p9)
    ));
    table.push_str(&format!(
        "| ipmitool, one process per call | {:.2} | {} | {} | {} | {:.1}× |\n",
        per_call_total.as_secs_f64(),
        ms(per(per_call_total)),
        ms(im),
        ms(i9),
        per_call_total.as_secs_f64() / pcg_total.as_secs_f64()
    ));
    table.push_str(&format!(
        "| ipmitool shell, one session | {:.2} | {} | – | – | {:.1}× |\n",
        shell_total.as_secs_f64(),
        ms(per(shell_total)),
        shell_total.as_secs_f64() / pcg_total.as_secs_f64()
    ));
    table.push_str(&format!(
        "\npcg sessions opened {}, retransmits {}; ipmitool per call opens and closes one session each time.\n",
        stats.sessions_opened, stats.retransmits
    ));
    print!("{table}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &table).unwrap();
    eprintln!("written to {out}");
}
