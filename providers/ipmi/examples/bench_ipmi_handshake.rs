//! Benchmark (a program, not a test): session set-ups through a relay that holds back RMCP+ Open
//! Session answers by 0, 400 ms and 1 s (a BMC slow to open sessions, as real ones are), pcg
//! vs ipmitool, each against its own fresh ipmi_sim. pcg: N enrolments, each a new driver
//! (Get Device ID + Get Chassis Status, then Close Session). ipmitool: N runs of `chassis power
//! status` (one process, one session each), as operators script it. Reported per enrolment:
//! Open Session requests sent (handshakes started, retransmissions included), wall time, and the
//! half-open sessions ipmi_sim holds afterwards (`ipmitool session info all`, user id 0, read
//! after waiting 8 s for late answers). Prints a Markdown table and writes it to the file given
//! as the first argument (default target/bench/bare-metal-ipmi-handshake.md).
//!
//! Run: `cargo run --release -p pcg-ipmi --example bench_ipmi_handshake [OUT] [N]`
//! (needs scripts/peers/install-ipmi.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Faults, IpmiSim, LabBmc, LossyRelay};
use pcg_ipmi::IpmiDriver;
use pcg_provider::BareMetal;

struct Row {
    client: &'static str,
    delay: Duration,
    opens_per: f64,
    ms_per: f64,
    slowest_ms: f64,
    half_open: usize,
}

async fn run(client: &'static str, delay: Duration, n: usize) -> Row {
    let bmc =
        IpmiSim::start().expect("ipmi_sim/ipmitool missing: run scripts/peers/install-ipmi.sh");
    let upstream = format!("127.0.0.1:{}", bmc.port).parse().unwrap();
    let relay = LossyRelay::start_with(
        upstream,
        Faults {
            open_session_delay: delay,
            ..Faults::default()
        },
    )
    .await;
    let mut ep = bmc.endpoint();
    ep.address = relay.addr.to_string();
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        match client {
            "pcg" => {
                let d = IpmiDriver::new(&ep).unwrap();
                d.enrol().await.unwrap();
                d.close().await.unwrap();
            }
            _ => {
                let out = tokio::process::Command::new("ipmitool")
                    .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
                    .arg(relay.addr.port().to_string())
                    .args(["-U", common::USER, "-P", common::PASSWORD])
                    .args(["chassis", "power", "status"])
                    .output()
                    .await
                    .unwrap();
                assert!(
                    String::from_utf8_lossy(&out.stdout).contains("Chassis Power"),
                    "ipmitool: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        slowest = slowest.max(t.elapsed());
    }
    let total = start.elapsed();
    // Late answers to retransmitted copies arrive within a few seconds; pcg aborts those.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let half_open = bmc.half_open_sessions();
    Row {
        client,
        delay,
        opens_per: relay.open_requests.load(Ordering::Relaxed) as f64 / n as f64,
        ms_per: total.as_secs_f64() * 1000.0 / n as f64,
        slowest_ms: slowest.as_secs_f64() * 1000.0,
        half_open,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/bench/bare-metal-ipmi-handshake.md".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut rows = Vec::new();
    for delay in [0u64, 400, 1000].map(Duration::from_millis) {
        for client in ["pcg", "ipmitool"] {
            let r = run(client, delay, n).await;
            eprintln!(
                "{client} at {delay:?}: {:.2} Open Session requests and {:.1} ms per session set-up, {} half-open left",
                r.opens_per, r.ms_per, r.half_open
            );
            rows.push(r);
        }
    }
    let mut table = format!(
        "IPMI session set-up through a relay holding back Open Session answers; {n} set-ups per \
         row, each row against a fresh ipmi_sim on loopback, cipher suite 3. pcg: one enrolment \
         (new driver, Get Device ID, Get Chassis Status, Close Session); ipmitool: one \
         `chassis power status` process.\n\n\
         | Open Session answer delay | client | Open Session requests per set-up | ms per set-up (mean) | slowest ms | half-open sessions left |\n\
         |---:|---|---:|---:|---:|---:|\n"
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} ms | {} | {:.2} | {:.1} | {:.1} | {} |\n",
            r.delay.as_millis(),
            r.client,
            r.opens_per,
            r.ms_per,
            r.slowest_ms,
            r.half_open
        ));
    }
    print!("{table}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &table).unwrap();
    eprintln!("written to {out}");
}
