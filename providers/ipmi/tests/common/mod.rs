//! Starts and stops the real IPMI peer for the tests: ipmi_sim (Debian openipmi) with the
//! project's lan.conf/bmc.emu/chassis-control recipe on 127.0.0.1 and a free UDP port, and
//! ipmitool as the reference reader. ipmi_sim is killed by PID on drop.

#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcg_provider::BmcEndpoint;

pub const USER: &str = "admin";
pub const PASSWORD: &str = "ipmi-pw-42";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// ipmi_sim and ipmitool, or None (with a loud skip message) when missing and
/// `PCG_REQUIRE_PEERS` is unset. With `PCG_REQUIRE_PEERS` set, a missing peer fails the test.
pub fn peers() -> Option<(PathBuf, PathBuf)> {
    match (which("ipmi_sim"), which("ipmitool")) {
        (Some(sim), Some(tool)) => Some((sim, tool)),
        _ => {
            if std::env::var_os("PCG_REQUIRE_PEERS").is_some() {
                panic!("ipmi_sim/ipmitool not on PATH and PCG_REQUIRE_PEERS is set: run scripts/peers/install-ipmi.sh");
            }
            eprintln!(
                "\n!!!!!!!! SKIPPED: ipmi_sim/ipmitool not on PATH — run scripts/peers/install-ipmi.sh (set PCG_REQUIRE_PEERS=1 to fail instead) !!!!!!!!\n"
            );
            None
        }
    }
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback UDP port")
}

/// A running ipmi_sim.
pub struct IpmiSim {
    child: Child,
    pub port: u16,
    sim: PathBuf,
    pub dir: tempfile::TempDir,
    ipmitool: PathBuf,
}

impl IpmiSim {
    /// Starts ipmi_sim and waits until ipmitool gets an answer from it (or None to skip).
    pub fn start() -> Option<IpmiSim> {
        let (sim, ipmitool) = peers()?;
        // A free port can be taken by another test between choosing and binding: try again.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(&sim, &ipmitool) {
                Ok(me) => return Some(me),
                Err(e) => last = e,
            }
        }
        panic!("ipmi_sim did not start: {last}");
    }

    fn try_start(sim: &Path, ipmitool: &Path) -> Result<IpmiSim, String> {
        let ipmitool = ipmitool.to_path_buf();
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("chassis");
        std::fs::create_dir_all(&state).expect("state dir");
        let recipes = repo_root().join("scripts/peers/ipmi");
        let chassis = format!(
            "{} {}",
            recipes.join("chassis-control.sh").display(),
            state.display()
        );
        let port = free_udp_port();
        let conf = std::fs::read_to_string(recipes.join("lan.conf.in"))
            .expect("read lan.conf.in")
            .replace("@PORT@", &port.to_string())
            .replace("@USER@", USER)
            .replace("@PASS@", PASSWORD)
            .replace("@CHASSIS@", &chassis);
        std::fs::write(dir.path().join("lan.conf"), conf).expect("write lan.conf");
        let child = spawn_sim(sim, dir.path());
        let mut me = IpmiSim {
            child,
            port,
            sim: sim.to_path_buf(),
            dir,
            ipmitool,
        };
        let start = Instant::now();
        loop {
            if me
                .try_ipmitool(&["-N", "1", "-R", "1", "chassis", "power", "status"])
                .is_ok()
            {
                break;
            }
            if let Ok(Some(st)) = me.child.try_wait() {
                return Err(format!("ipmi_sim exited with {st}: {}", me.log()));
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("ipmi_sim did not answer within 20 s: {}", me.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    /// Kills ipmi_sim and starts it again on the same port (a BMC reboot: every session is
    /// gone), waiting until ipmitool gets an answer.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_sim(&self.sim, self.dir.path());
        let start = Instant::now();
        while self
            .try_ipmitool(&["-N", "1", "-R", "1", "chassis", "power", "status"])
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "ipmi_sim did not come back: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipmi_sim.log")).unwrap_or_default()
    }

    /// The chassis-control program's log of what the BMC was asked to do.
    pub fn actions(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chassis/actions.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> BmcEndpoint {
        let mut ep = BmcEndpoint::new(format!("127.0.0.1:{}", self.port), USER, PASSWORD);
        ep.timeout_ms = Some(10_000);
        ep
    }

    /// Runs `ipmitool -I lanplus -C 3 ... ARGS` against this BMC.
    pub fn try_ipmitool(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.ipmitool)
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-P", PASSWORD])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Runs `ipmitool -I lan -A MD5 ... ARGS` (IPMI v1.5) against this BMC.
    pub fn ipmitool_v15(&self, args: &[&str]) -> String {
        let out = Command::new(&self.ipmitool)
            .args(["-I", "lan", "-A", "MD5", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-P", PASSWORD])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ipmitool");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ipmitool -I lan {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    pub fn ipmitool(&self, args: &[&str]) -> String {
        self.try_ipmitool(args)
            .unwrap_or_else(|e| panic!("ipmitool {args:?} failed: {e}"))
    }

    /// Active sessions as `ipmitool session info all` reports them (ipmitool's own included).
    pub fn active_sessions(&self) -> usize {
        let out = self.ipmitool(&["session", "info", "all"]);
        out.lines()
            .find_map(|l| {
                l.strip_prefix("active sessions")
                    .map(|r| r.trim_start_matches([' ', ':']).trim().to_owned())
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no session count in: {out}"))
    }
}

fn spawn_sim(sim: &Path, dir: &Path) -> Child {
    let recipes = repo_root().join("scripts/peers/ipmi");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ipmi_sim.log"))
        .expect("log");
    Command::new(sim)
        .arg("-n")
        .arg("-c")
        .arg(dir.join("lan.conf"))
        .arg("-f")
        .arg(recipes.join("bmc.emu"))
        .arg("-s")
        .arg(dir.join("sim-state"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("clone log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn ipmi_sim")
}

impl IpmiSim {
    /// Established sessions (a user logged in) as `ipmitool session info all` lists them,
    /// ipmitool's own included; half-open ones (Open Session answered, RAKP never completed:
    /// user id 0) are not counted.
    pub fn established_sessions(&self) -> usize {
        let out = self.ipmitool(&["session", "info", "all"]);
        out.lines()
            .filter_map(|l| l.strip_prefix("user id"))
            .filter(|r| r.trim_start_matches([' ', ':']).trim() != "0")
            .count()
    }

    /// Half-open sessions (user id 0) as `ipmitool session info all` lists them.
    pub fn half_open_sessions(&self) -> usize {
        let out = self.ipmitool(&["session", "info", "all"]);
        out.lines()
            .filter_map(|l| l.strip_prefix("user id"))
            .filter(|r| r.trim_start_matches([' ', ':']).trim() == "0")
            .count()
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP relay on 127.0.0.1 that forwards between one client and `upstream`, dropping each
/// datagram (either way) with probability `loss`; a fault injector, not a BMC.
pub struct LossyRelay {
    pub addr: std::net::SocketAddr,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub passed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyRelay {
    pub async fn start(upstream: std::net::SocketAddr, loss: f64, seed: u64) -> LossyRelay {
        use rand::{Rng, SeedableRng};
        use std::sync::atomic::Ordering;
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind relay back");
        back.connect(upstream).await.expect("connect upstream");
        let addr = front.local_addr().expect("relay addr");
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let passed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, p) = (dropped.clone(), passed.clone());
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut client = None;
            let mut a = vec![0u8; 2048];
            let mut b = vec![0u8; 2048];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        if rng.random_bool(loss) { d.fetch_add(1, Ordering::Relaxed); continue; }
                        p.fetch_add(1, Ordering::Relaxed);
                        let _ = back.send(&a[..n]).await;
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        let Some(to) = client else { continue };
                        if rng.random_bool(loss) { d.fetch_add(1, Ordering::Relaxed); continue; }
                        p.fetch_add(1, Ordering::Relaxed);
                        let _ = front.send_to(&b[..n], to).await;
                    }
                }
            }
        });
        LossyRelay {
            addr,
            dropped,
            passed,
            task,
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
