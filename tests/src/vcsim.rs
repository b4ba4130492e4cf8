//! vcsim (govmomi's vCenter simulator) for the end-to-end tests: `pcg-vcsim` from
//! scripts/peers/install-vsphere.sh, on 127.0.0.1:0 with TLS from its own CA, killed by PID on
//! drop; its endpoint as a `vsphere.*` payload expects it, and its govmomi reference client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

pub const VCSIM_USER: &str = "user";
pub const VCSIM_PASSWORD: &str = "pass";

/// The pcg-vcsim binary, or None (with a loud skip message) when it is not installed and
/// `PCG_REQUIRE_PEERS` is unset; with it set, a missing peer panics.
pub fn vcsim_binary() -> Option<PathBuf> {
    let bin = std::env::var_os("PCG_VCSIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("PCG_PEERS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.pcg-peers"))
                .join("bin/pcg-vcsim")
        });
    if bin.is_file() {
        return Some(bin);
    }
    if std::env::var_os("PCG_REQUIRE_PEERS").is_some() {
        panic!(
            "pcg-vcsim not found at {} and PCG_REQUIRE_PEERS is set: run scripts/peers/install-vsphere.sh",
            bin.display()
        );
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: pcg-vcsim not found at {} — run scripts/peers/install-vsphere.sh (set PCG_REQUIRE_PEERS=1 to fail instead) !!!!!!!!\n",
        bin.display()
    );
    None
}

/// A running vcsim.
pub struct Vcsim {
    child: Child,
    bin: PathBuf,
    pub url: String,
    pub thumbprint: String,
    pub ca_path: PathBuf,
    /// The password it accepts (`-pass` among the launcher flags, else [`VCSIM_PASSWORD`]).
    pub password: String,
    _dir: tempfile::TempDir,
}

impl Vcsim {
    /// Starts vcsim with extra launcher flags; None when skipped.
    pub fn start(args: &[&str]) -> Option<Self> {
        let bin = vcsim_binary()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(&bin)
            .args(["-dir", &dir.path().display().to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pcg-vcsim");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut url, mut thumbprint, mut ca) = (None, None, None);
        while url.is_none() || thumbprint.is_none() || ca.is_none() {
            let line = match rx.recv_timeout(Duration::from_secs(50)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("pcg-vcsim did not report its URL: {e}");
                }
            };
            if let Some(v) = line.strip_prefix("PCG_VCSIM_URL=") {
                url = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("PCG_VCSIM_THUMBPRINT=") {
                thumbprint = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("PCG_VCSIM_CA=") {
                ca = Some(PathBuf::from(v));
            }
        }
        Some(Self {
            child,
            bin,
            url: url.unwrap_or_default(),
            thumbprint: thumbprint.unwrap_or_default(),
            ca_path: ca.unwrap_or_default(),
            password: args
                .iter()
                .position(|a| *a == "-pass")
                .and_then(|i| args.get(i + 1))
                .map_or(VCSIM_PASSWORD, |p| *p)
                .to_owned(),
            _dir: dir,
        })
    }

    /// The endpoint object of `vsphere.*` payloads, pinned by the certificate's SHA-256.
    pub fn endpoint(&self) -> Value {
        json!({
            "url": self.url,
            "user": VCSIM_USER,
            "password": self.password,
            "tls": {"pin_sha256": self.thumbprint},
            "timeout_ms": 20000,
        })
    }

    /// Runs the govmomi reference client (`list`, `inventory`, `bench N`); its JSON lines.
    pub fn reference(&self, args: &[&str]) -> Vec<Value> {
        let out = Command::new(&self.bin)
            .arg("ref")
            .args([
                "-url",
                &self.url,
                "-ca",
                &self.ca_path.display().to_string(),
                "-pass",
                &self.password,
            ])
            .args(args)
            .output()
            .expect("run pcg-vcsim ref");
        assert!(
            out.status.success(),
            "reference client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
