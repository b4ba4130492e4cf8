//! Starts and stops the real IPMI peers for the tests: ipmi_sim (Debian openipmi) with the
//! project's lan.conf/bmc.emu/chassis-control recipe, and a BMC on pyghmi's BMC server (the base
//! of OpenStack's VirtualBMC) from `scripts/peers/ipmi/pyghmi-bmc.py`, each on 127.0.0.1 and a
//! free UDP port, with ipmitool as the reference reader; both are killed by PID on drop. Also a
//! UDP relay for fault injection (loss, delayed Open Session answers).

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

/// What the tests need of a lab BMC, whichever server runs it.
pub trait LabBmc {
    /// "ipmi_sim" or "pyghmi", for messages.
    fn name(&self) -> &'static str;
    fn port(&self) -> u16;
    /// What the BMC was asked to change (power, boot device), one line each: lines with " set ".
    fn actions(&self) -> String;
    /// Kills the BMC and starts it again on the same port (every session is gone).
    fn restart(&mut self);

    fn endpoint(&self) -> BmcEndpoint {
        let mut ep = BmcEndpoint::new(format!("127.0.0.1:{}", self.port()), USER, PASSWORD);
        ep.timeout_ms = Some(10_000);
        ep
    }

    /// Runs `ipmitool -I lanplus -C 3 ... ARGS` against this BMC.
    fn try_ipmitool(&self, args: &[&str]) -> Result<String, String> {
        ipmitool_at(self.port(), args)
    }

    fn ipmitool(&self, args: &[&str]) -> String {
        self.try_ipmitool(args)
            .unwrap_or_else(|e| panic!("ipmitool {args:?} against {} failed: {e}", self.name()))
    }

    /// How many power changes the BMC was asked for.
    fn power_changes(&self) -> usize {
        self.actions()
            .lines()
            .filter(|l| {
                l.contains(" set power") || l.contains(" set reset") || l.contains(" set shutdown")
            })
            .count()
    }
}

/// Runs `ipmitool -I lanplus -C 3 ... ARGS` against the BMC on 127.0.0.1:`port`.
pub fn ipmitool_at(port: u16, args: &[&str]) -> Result<String, String> {
    ipmitool_suite_at(port, 3, args)
}

/// Runs `ipmitool -I lanplus -C SUITE ... ARGS` against the BMC on 127.0.0.1:`port`.
pub fn ipmitool_suite_at(port: u16, suite: u8, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ipmitool")
        .args([
            "-I",
            "lanplus",
            "-C",
            &suite.to_string(),
            "-H",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
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

impl LabBmc for IpmiSim {
    fn name(&self) -> &'static str {
        "ipmi_sim"
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn actions(&self) -> String {
        IpmiSim::actions(self)
    }
    fn restart(&mut self) {
        IpmiSim::restart(self)
    }
}

/// The Python venv the peer scripts install into (`$PCG_PEERS_DIR/venv`).
pub fn venv_python() -> PathBuf {
    std::env::var_os("PCG_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".pcg-peers"))
        .join("venv/bin/python")
}

/// A BMC on pyghmi's BMC server (`scripts/peers/ipmi/pyghmi-bmc.py`), bound to 127.0.0.1.
pub struct PyghmiBmc {
    child: Child,
    pub port: u16,
    python: PathBuf,
    pub dir: tempfile::TempDir,
    /// Also offers cipher suite 17 (the peer script's extension of pyghmi's server).
    pub suite17: bool,
}

impl PyghmiBmc {
    /// Starts the BMC and waits until ipmitool gets an answer from it, or None (loudly) when
    /// pyghmi is not installed and `PCG_REQUIRE_PEERS` is unset.
    pub fn start() -> Option<PyghmiBmc> {
        Self::start_with(false)
    }

    /// Like [`PyghmiBmc::start`], offering cipher suite 17 besides 3 (`--cipher-suite-17`).
    pub fn start_with_suite_17() -> Option<PyghmiBmc> {
        Self::start_with(true)
    }

    fn start_with(suite17: bool) -> Option<PyghmiBmc> {
        peers()?;
        let python = venv_python();
        let has_pyghmi = python.is_file()
            && Command::new(&python)
                .args(["-c", "import pyghmi.ipmi.bmc"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !has_pyghmi {
            if std::env::var_os("PCG_REQUIRE_PEERS").is_some() {
                panic!(
                    "pyghmi not importable by {} and PCG_REQUIRE_PEERS is set: run scripts/peers/install-ipmi.sh",
                    python.display()
                );
            }
            eprintln!(
                "\n!!!!!!!! SKIPPED: pyghmi not installed at {} — run scripts/peers/install-ipmi.sh (set PCG_REQUIRE_PEERS=1 to fail instead) !!!!!!!!\n",
                python.display()
            );
            return None;
        }
        let mut dir = tempfile::tempdir().expect("tempdir");
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_udp_port();
            let mut me = PyghmiBmc {
                child: spawn_pyghmi(&python, dir.path(), port, suite17),
                port,
                python: python.clone(),
                dir,
                suite17,
            };
            match me.wait_ready() {
                Ok(()) => return Some(me),
                Err(e) => {
                    last = e;
                    let _ = me.child.kill();
                    let _ = me.child.wait();
                    dir = tempfile::tempdir().expect("tempdir");
                }
            }
        }
        panic!("the pyghmi BMC did not start: {last}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if ipmitool_at(
                self.port,
                &["-N", "1", "-R", "1", "chassis", "power", "status"],
            )
            .is_ok()
            {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("pyghmi BMC exited with {st}: {}", self.log()));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "pyghmi BMC did not answer within 30 s: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pyghmi.log")).unwrap_or_default()
    }
}

fn spawn_pyghmi(python: &Path, dir: &Path, port: u16, suite17: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pyghmi.log"))
        .expect("log");
    Command::new(python)
        .arg(repo_root().join("scripts/peers/ipmi/pyghmi-bmc.py"))
        .args(["127.0.0.1", &port.to_string(), USER, PASSWORD])
        .arg(dir.join("state"))
        .args(suite17.then_some("--cipher-suite-17"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("clone log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn the pyghmi BMC")
}

impl LabBmc for PyghmiBmc {
    fn name(&self) -> &'static str {
        "pyghmi"
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn actions(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/actions.log")).unwrap_or_default()
    }
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_pyghmi(&self.python, self.dir.path(), self.port, self.suite17);
        self.wait_ready()
            .unwrap_or_else(|e| panic!("pyghmi BMC did not come back: {e}"));
    }
}

impl Drop for PyghmiBmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Faults a [`LossyRelay`] injects.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Probability that a datagram (either way) is dropped.
    pub loss: f64,
    /// How long RMCP+ Open Session Responses (BMC to client) are held back: a BMC that is slow
    /// to open a session, as real ones are.
    pub open_session_delay: Duration,
    pub seed: u64,
}

/// A UDP relay on 127.0.0.1 in front of `upstream` (a fault injector, not a BMC). Like a NAT,
/// it gives each client address its own upstream socket, so the BMC sees a fresh source port
/// whenever the client uses one. It drops datagrams with probability `loss`, holds back Open
/// Session answers by `open_session_delay`, and counts what passed.
pub struct LossyRelay {
    pub addr: std::net::SocketAddr,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub passed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// RMCP+ Open Session Requests the client sent (handshakes it started).
    pub open_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Distinct client source addresses seen.
    pub clients: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The RMCP+ payload type of a datagram, if it is an RMCP+ (IPMI v2.0) packet.
pub fn rmcp_plus_payload_type(d: &[u8]) -> Option<u8> {
    (d.len() >= 16 && d[0] == 0x06 && d[3] & 0x1f == 0x07 && d[4] == 0x06).then(|| d[5] & 0x3f)
}

impl LossyRelay {
    pub async fn start(upstream: std::net::SocketAddr, loss: f64, seed: u64) -> LossyRelay {
        Self::start_with(
            upstream,
            Faults {
                loss,
                seed,
                ..Faults::default()
            },
        )
        .await
    }

    pub async fn start_with(upstream: std::net::SocketAddr, faults: Faults) -> LossyRelay {
        use rand::{Rng, SeedableRng};
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let addr = front.local_addr().expect("relay addr");
        let dropped = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let open_requests = Arc::new(AtomicU64::new(0));
        let clients = Arc::new(AtomicU64::new(0));
        let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(faults.seed)));
        let lose = {
            let rng = rng.clone();
            move || faults.loss > 0.0 && rng.lock().unwrap().random_bool(faults.loss)
        };
        let (d, p, o, c) = (
            dropped.clone(),
            passed.clone(),
            open_requests.clone(),
            clients.clone(),
        );
        let task = tokio::spawn(async move {
            let mut backs: HashMap<std::net::SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut tasks = Vec::new();
            let mut a = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = front.recv_from(&mut a).await else {
                    continue;
                };
                let back = match backs.get(&from) {
                    Some(b) => b.clone(),
                    None => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind back"));
                        b.connect(upstream).await.expect("connect upstream");
                        backs.insert(from, b.clone());
                        // BMC to client, for this client.
                        let (front, back, d, p, lose) =
                            (front.clone(), b.clone(), d.clone(), p.clone(), lose.clone());
                        tasks.push(AbortOnDrop(tokio::spawn(async move {
                            let mut buf = vec![0u8; 2048];
                            loop {
                                let Ok(n) = back.recv(&mut buf).await else {
                                    continue;
                                };
                                if lose() {
                                    d.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                p.fetch_add(1, Ordering::Relaxed);
                                let pkt = buf[..n].to_vec();
                                let delay = if rmcp_plus_payload_type(&pkt) == Some(0x11) {
                                    faults.open_session_delay
                                } else {
                                    Duration::ZERO
                                };
                                if delay.is_zero() {
                                    let _ = front.send_to(&pkt, from).await;
                                } else {
                                    let front = front.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(delay).await;
                                        let _ = front.send_to(&pkt, from).await;
                                    });
                                }
                            }
                        })));
                        b
                    }
                };
                if rmcp_plus_payload_type(&a[..n]) == Some(0x10) {
                    o.fetch_add(1, Ordering::Relaxed);
                }
                if lose() {
                    d.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                p.fetch_add(1, Ordering::Relaxed);
                let _ = back.send(&a[..n]).await;
            }
        });
        LossyRelay {
            addr,
            dropped,
            passed,
            open_requests,
            clients,
            task,
        }
    }
}

/// Aborts a task when dropped (the relay's per-client tasks end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
