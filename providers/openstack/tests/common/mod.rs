//! The real OpenStack stack for the tests: started (or reused) through
//! `scripts/peers/openstack/start.sh`, which serialises concurrent starts with a lock file, so
//! every test process shares one stack. Skips loudly when the packages are missing, unless
//! `PCG_REQUIRE_PEERS` is set.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pcg_openstack::{CloudEntry, CloudRef};
use serde_json::{json, Value};

pub struct Stack {
    pub env: HashMap<String, String>,
    pub dir: PathBuf,
    /// Holds the stack's test lock while this value lives (see [`exclusive`]).
    _lock: std::process::Child,
}

/// Takes the stack's test lock: a `flock` child process that holds `lock` until its stdin
/// closes (when this process drops it or dies). Nova on sqlite refuses concurrent writes now and
/// then ("database is locked"), so test processes use the shared stack one at a time.
fn exclusive(lock: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut child = Command::new("flock")
        .arg(lock)
        .args(["-c", "echo locked; read _"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run flock");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("flock answers");
    assert_eq!(line.trim(), "locked", "flock did not take the lock");
    child
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Stack {
    pub fn start() -> Option<Stack> {
        let installed = Path::new("/usr/bin/keystone-manage").exists()
            && Path::new("/usr/lib/python3/dist-packages/nova").exists()
            && Path::new("/usr/bin/openstack").exists();
        if !installed {
            assert!(
                std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
                "the OpenStack packages are missing and PCG_REQUIRE_PEERS is set: run scripts/peers/install-openstack.sh"
            );
            eprintln!("!!!!!!!! SKIPPED: OpenStack packages missing — run scripts/peers/install-openstack.sh !!!!!!!!");
            return None;
        }
        let out = Command::new("bash")
            .arg(repo().join("scripts/peers/openstack/start.sh"))
            .output()
            .expect("run start.sh");
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{err}");
        assert!(out.status.success(), "start.sh failed: {err}");
        let dir = std::env::var("PCG_PEERS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join(".pcg-peers"))
            .join("openstack");
        let mut env = HashMap::new();
        for line in std::fs::read_to_string(dir.join("openrc")).unwrap().lines() {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        let _lock = exclusive(&dir.join(".test.lock"));
        Some(Stack { env, dir, _lock })
    }

    pub fn auth_url(&self) -> &str {
        &self.env["OS_AUTH_URL"]
    }

    /// The admin user as an inline clouds.yaml entry.
    pub fn admin_entry(&self) -> Value {
        json!({
            "auth": {
                "auth_url": self.env["OS_AUTH_URL"],
                "username": self.env["OS_USERNAME"],
                "password": self.env["OS_PASSWORD"],
                "project_name": self.env["OS_PROJECT_NAME"],
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            "region_name": "RegionOne",
            "interface": "public",
        })
    }

    pub fn admin(&self) -> CloudEntry {
        CloudEntry::resolve(&CloudRef::Inline(self.admin_entry())).unwrap()
    }

    /// Runs the openstack CLI as admin; stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("openstack")
            .args(args)
            .envs(&self.env)
            .env("OS_COMPUTE_API_VERSION", "2.37")
            .output()
            .expect("run openstack");
        assert!(
            out.status.success(),
            "openstack {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `openstack server show ID -f value -c status`, or None when it does not exist.
    pub fn cli_status(&self, id: &str) -> Option<String> {
        let out = Command::new("openstack")
            .args(["server", "show", id, "-f", "value", "-c", "status"])
            .envs(&self.env)
            .output()
            .expect("run openstack");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Ids of the servers named `name`, per the CLI.
    pub fn cli_ids_named(&self, name: &str) -> Vec<String> {
        self.cli(&[
            "server",
            "list",
            "--name",
            &format!("^{name}$"),
            "-f",
            "value",
            "-c",
            "ID",
        ])
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
    }
}

/// A name unique to this test process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_micros()
    )
}

/// A Keystone that does not answer: a TCP listener on 127.0.0.1 that accepts connections and
/// never sends a byte, counting what it accepted.
pub struct Blackhole {
    pub url: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        });
        Self {
            url,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (up to a minute) until it accepted `n` connections.
    pub async fn wait_accepted(&self, n: usize) {
        let start = std::time::Instant::now();
        while self.accepted() < n {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "the blackhole accepted {} connections, expected {n}",
                self.accepted()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
