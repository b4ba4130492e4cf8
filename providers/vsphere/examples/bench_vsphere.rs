//! Benchmark (a program, not a test): pcg-vsphere against vcsim, side by side with govmomi (the
//! reference client, `pcg-vcsim ref`) in one run:
//! (1) 50 concurrent clones (CloneVM_Task + power on, each its own command id) through one shared
//!     session: wall time, peak RSS of this process and of vcsim;
//! (2) full VM inventory of a vcsim holding 1,001 VMs (name, power state, template flag,
//!     extraConfig and more), R rounds each, logged in once; both medians and their ratio.
//!     pcg pages by 500 objects (its default); govmomi's view retrieval asks for no page size.
//! Prints a Markdown table and writes it to the file given as the first argument (default
//! target/bench/vsphere.md).
//!
//! Run: `cargo run --release -p pcg-vsphere --example bench_vsphere [OUT] [R]`
//! (needs scripts/peers/install-vsphere.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use pcg_provider::no_progress;
use pcg_provider::vm::{VmPlacement, VmProvider, VmSpec};
use pcg_vsphere::VsphereDriver;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident set (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/bench/vsphere.md".into());
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(15);
    // (1) 50 concurrent clones through one session (first, so the peak RSS is theirs).
    let Some(sim) = common::Vcsim::start(&[]) else {
        eprintln!("pcg-vcsim missing: run scripts/peers/install-vsphere.sh");
        std::process::exit(2);
    };
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let n = 50;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let spec = VmSpec {
                name: format!("bench-{i}"),
                source: "pcg-template".into(),
                cpus: Some(2),
                memory_mib: Some(2048),
                networks: vec![],
                user_data: Some("#cloud-config\n".into()),
                metadata: None,
                power_on: true,
                placement: VmPlacement::Vsphere {
                    datacenter: Some("DC0".into()),
                    cluster: Some("DC0_C0".into()),
                    resource_pool: None,
                    host: None,
                    folder: None,
                    datastore: None,
                },
            };
            d.create(&format!("bench-cmd-{i}"), &spec, &no_progress)
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t.elapsed();
    let made = d
        .list()
        .await
        .unwrap()
        .iter()
        .filter(|v| v.command_id.is_some())
        .count();
    assert_eq!(made, n);
    let our_rss = peak_rss_mib("self");
    let sim_rss = peak_rss_mib(&sim.pid().to_string());

    drop(d);
    drop(sim);

    let sim = common::Vcsim::start(&["-vm", "500", "-cluster-host", "1"]).unwrap();

    // (2) Inventory, ours then govmomi's, same simulator.
    let d = VsphereDriver::connect(&sim.endpoint()).await.unwrap();
    let mut ours = Vec::new();
    let mut count = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        count = d.list().await.unwrap().len();
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let ours_ms = median(ours);
    let reference = sim.reference(&["bench", &rounds.to_string()]);
    let theirs_ms = reference[0]["median_ms"].as_f64().unwrap();
    let their_count = reference[0]["vms"].as_u64().unwrap();
    assert_eq!(count as u64, their_count, "both list the same VMs");
    let table = format!(
        "| measure | pcg-vsphere | govmomi (reference) |\n|---|---|---|\n\
| full VM inventory, {count} VMs, median of {rounds} | {ours_ms:.1} ms | {theirs_ms:.1} ms |\n\
| ratio (pcg / govmomi) | {:.2} | 1 |\n\
| {n} concurrent clones + power on, one session | {:.2} s wall | — |\n\
| peak RSS during the clones | {our_rss:.1} MiB (bench process) | vcsim {sim_rss:.1} MiB |\n",
        ours_ms / theirs_ms,
        wall.as_secs_f64(),
    );
    println!("{table}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &table).unwrap();
    eprintln!("written to {out}");
}
