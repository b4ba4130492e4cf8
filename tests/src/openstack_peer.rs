//! The real OpenStack stack for end-to-end tests: started (or reused) through
//! `scripts/peers/openstack/start.sh`, which serialises concurrent starts with a lock file so
//! every test process shares one stack; the openstack CLI as the reference reader. Installed by
//! `scripts/peers/install-openstack.sh`; stopped at the end of `scripts/test.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// A running stack: the admin credentials (`OS_*`) and the state dir.
pub struct OpenstackStack {
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl OpenstackStack {
    /// Starts or reuses the stack, or returns None (loudly) when the packages are missing and
    /// `PCG_REQUIRE_PEERS` is unset.
    pub fn start() -> Option<OpenstackStack> {
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
        for line in std::fs::read_to_string(dir.join("openrc"))
            .expect("openrc")
            .lines()
        {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        let _lock = exclusive(&dir.join(".test.lock"));
        Some(OpenstackStack { env, dir, _lock })
    }

    pub fn auth_url(&self) -> &str {
        &self.env["OS_AUTH_URL"]
    }

    pub fn password(&self) -> &str {
        &self.env["OS_PASSWORD"]
    }

    /// The admin user as an inline clouds.yaml entry (the `cloud` of an `openstack.*` payload).
    pub fn cloud(&self) -> Value {
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
        })
    }

    /// Runs the openstack CLI as admin: (success, stdout).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("openstack")
            .args(args)
            .envs(&self.env)
            .env("OS_COMPUTE_API_VERSION", "2.37")
            .output()
            .expect("run openstack");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// The server's status per `openstack server show`, None when it does not exist.
    pub fn status(&self, id: &str) -> Option<String> {
        let (ok, out) = self.cli(&["server", "show", id, "-f", "value", "-c", "status"]);
        ok.then_some(out)
    }
}
