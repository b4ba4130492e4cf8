//! Benchmark (a program, not a test): pcg-openstack against the `openstack` CLI
//! (python3-openstackclient), side by side in one run against the real test stack:
//! (1) create-and-wait of N servers, one after another (pcg: create + poll until ACTIVE;
//! CLI: `openstack server create --wait`); (2) listing L servers with details (pcg: paged
//! `servers/detail`; CLI: `openstack server list --long`), R rounds each, after L servers were
//! made with one multi-create request. Also reports how the stack was started and its RSS.
//! Prints a Markdown table and writes it to the file given as the first argument (default
//! target/bench/openstack.md). Every server it made is deleted at the end.
//!
//! Run: `cargo run -p pcg-openstack --example bench_openstack [OUT] [N] [L] [R]`
//! (needs scripts/peers/install-openstack.sh; starts the stack with its start.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Stack;
use pcg_openstack::{OpenStack, ServerSpec};

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/bench/openstack.md".into());
    let n: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(20);
    let l: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(500);
    let rounds: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(5);

    let t = Instant::now();
    let stack = Stack::start().expect("the OpenStack packages are installed");
    let start_wall = t.elapsed();
    let stack_env = std::fs::read_to_string(stack.dir.join("stack.env")).unwrap();
    let field = |k: &str| {
        stack_env
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("?")
            .to_string()
    };
    let os = OpenStack::connect(stack.admin()).await.unwrap();
    let tag = std::process::id();
    let wait = Duration::from_secs(300);

    // (1) create-and-wait, one after another (skipped when N is 0).
    let mut made = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        let spec = ServerSpec {
            name: format!("bench-pcg-{tag}-{i}"),
            flavor: "pcg.tiny".into(),
            image: "pcg-image".into(),
            ..ServerSpec::default()
        };
        let s = os
            .create(Some(&format!("bench-{tag}-{i}")), &spec)
            .await
            .unwrap();
        os.wait_status(&s.id, "ACTIVE", wait).await.unwrap();
        made.push(s.id);
    }
    let pcg_create = t.elapsed();
    let t = Instant::now();
    for i in 0..n {
        let id = stack.cli(&[
            "server",
            "create",
            "--flavor",
            "pcg.tiny",
            "--image",
            "pcg-image",
            "--nic",
            "none",
            "--wait",
            "-f",
            "value",
            "-c",
            "id",
            &format!("bench-cli-{tag}-{i}"),
        ]);
        made.push(id.trim().to_string());
    }
    let cli_create = t.elapsed();
    eprintln!("create: pcg {pcg_create:?}, cli {cli_create:?}");

    // (2) listing L servers: made with one multi-create request (not measured).
    let existing = os.list().await.unwrap().len();
    let more = l.saturating_sub(existing);
    if more > 0 {
        stack.cli(&[
            "server",
            "create",
            "--flavor",
            "pcg.tiny",
            "--image",
            "pcg-image",
            "--nic",
            "none",
            "--min",
            &more.to_string(),
            "--max",
            &more.to_string(),
            &format!("bench-many-{tag}"),
        ]);
    }
    // Listed as soon as all exist: on a busy 2-core machine nova-compute builds only a few
    // fake servers a minute, so many are still BUILD; the table says how many.
    let t = Instant::now();
    let states = loop {
        let all = os.list().await.unwrap();
        if all.len() >= l {
            let mut states = std::collections::BTreeMap::new();
            for s in &all {
                *states.entry(s.status.clone()).or_insert(0usize) += 1;
            }
            break states;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "only {} servers",
            all.len()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    eprintln!("{l} servers listed after {:?}: {states:?}", t.elapsed());
    let mut pcg_list = Vec::new();
    let mut cli_list = Vec::new();
    let mut counted = (0, 0);
    for _ in 0..rounds {
        let t = Instant::now();
        counted.0 = os.list().await.unwrap().len();
        pcg_list.push(t.elapsed());
        let t = Instant::now();
        counted.1 = stack
            .cli(&[
                "server", "list", "--long", "--limit", "-1", "-f", "value", "-c", "ID",
            ])
            .lines()
            .count();
        cli_list.push(t.elapsed());
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let per = |d: Duration| {
        if n == 0 {
            "-".to_string()
        } else {
            secs(d / n as u32)
        }
    };
    let table = format!(
        "| measurement | pcg-openstack | openstack CLI 6.0.0 |\n|---|---|---|\n\
         | create-and-wait of {n} servers, one after another (total) | {} | {} |\n\
         | per server | {} | {} |\n\
         | list {} servers with details (median of {rounds}; states {states:?}) | {} | {} |\n\n\
         Stack: started {} in {} s by start.sh ({} wall here), {} MiB RSS across its processes. \
         Machine: {}, {} cores.\n",
        secs(pcg_create),
        secs(cli_create),
        per(pcg_create),
        per(cli_create),
        counted.0.max(counted.1),
        secs(median(pcg_list)),
        secs(median(cli_list)),
        field("STARTED"),
        field("START_SECONDS"),
        secs(start_wall),
        field("RSS_KIB").parse::<u64>().unwrap_or(0) / 1024,
        cpu.split(':').nth(1).unwrap_or("?").trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    );
    println!("{table}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&out, &table).unwrap();
    eprintln!("written to {out}");
    // Clean up everything the benchmark made.
    let all = os.list().await.unwrap();
    let ids: Vec<String> = all
        .iter()
        .filter(|s| s.name.starts_with("bench-"))
        .map(|s| s.id.clone())
        .collect();
    let os = std::sync::Arc::new(os);
    for chunk in ids.chunks(10) {
        let mut set = tokio::task::JoinSet::new();
        for id in chunk {
            let (os, id) = (os.clone(), id.clone());
            // Not waiting for each to go: Nova finishes the deletes in the background.
            set.spawn(async move { os.delete(&id, Duration::ZERO).await });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Ok(_) | Err(pcg_provider::ProviderError::Timeout { .. }) => {}
                Err(e) => eprintln!("cleanup: {e}"),
            }
        }
    }
}
