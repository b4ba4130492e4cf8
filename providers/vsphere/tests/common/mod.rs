//! Starts and stops the real vSphere peer for the tests: pcg-vcsim (govmomi's vCenter simulator,
//! built by scripts/peers/install-vsphere.sh) on 127.0.0.1:0 with TLS from its own CA, killed by
//! PID on drop; and its reference client (`pcg-vcsim ref`) for cross-checks.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use pcg_provider::TlsTrust;
use pcg_vsphere::VsphereEndpoint;

pub const USER: &str = "user";
pub const PASSWORD: &str = "pass";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The pcg-vcsim binary, or None (with a loud skip message) when it is not installed and
/// `PCG_REQUIRE_PEERS` is unset. With `PCG_REQUIRE_PEERS` set, a missing peer fails the test.
pub fn binary() -> Option<PathBuf> {
    let bin = std::env::var_os("PCG_VCSIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("PCG_PEERS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join(".pcg-peers"))
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
    _dir: tempfile::TempDir,
}

impl Vcsim {
    /// Starts vcsim with extra launcher flags (e.g. `["-vm", "500"]`); None when skipped.
    pub fn start(args: &[&str]) -> Option<Self> {
        let bin = binary()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("vcsim.log")).expect("log file");
        let mut child = Command::new(&bin)
            .args(["-dir", &dir.path().display().to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
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
            _dir: dir,
        })
    }

    /// The endpoint, pinned by the certificate's SHA-256.
    pub fn endpoint(&self) -> VsphereEndpoint {
        let mut ep = VsphereEndpoint::new(&self.url, USER, PASSWORD);
        ep.tls = Some(TlsTrust::PinSha256(self.thumbprint.clone()));
        ep.timeout_ms = Some(20_000);
        ep
    }

    /// The endpoint, verified against the simulator's CA.
    pub fn endpoint_ca(&self) -> VsphereEndpoint {
        let mut ep = self.endpoint();
        ep.tls = Some(TlsTrust::CaPem(
            std::fs::read_to_string(&self.ca_path).expect("CA file"),
        ));
        ep
    }

    /// Runs the reference client (`list`, `inventory`) and returns its JSON lines.
    pub fn reference(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let out = Command::new(&self.bin)
            .arg("ref")
            .args([
                "-url",
                &self.url,
                "-ca",
                &self.ca_path.display().to_string(),
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
            .map(|l| serde_json::from_str(l).expect("reference JSON"))
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self._dir.path().join("vcsim.log")).unwrap_or_default();
            let head: Vec<&str> = log.lines().filter(|l| !l.is_empty()).take(40).collect();
            eprintln!("--- vcsim log (first lines) ---\n{}", head.join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vCenter that does not answer: a TCP listener on 127.0.0.1 that accepts connections and
/// never sends a byte (a TLS handshake to it never completes), counting what it accepted.
pub struct Blackhole {
    pub url: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", l.local_addr().expect("local addr"));
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

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// An endpoint for it (any pin: no certificate ever arrives) with the given request bound.
    pub fn endpoint(&self, timeout_ms: u64) -> VsphereEndpoint {
        let mut ep = VsphereEndpoint::new(&self.url, USER, PASSWORD);
        ep.tls = Some(TlsTrust::PinSha256("ab".repeat(32)));
        ep.timeout_ms = Some(timeout_ms);
        ep
    }

    /// Waits (up to a minute) until it accepted `n` connections.
    pub async fn wait_accepted(&self, n: usize) {
        let start = std::time::Instant::now();
        while self.accepted() < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the blackhole accepted {} connections, expected {n}",
                self.accepted()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
