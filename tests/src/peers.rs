//! Real provider peers for the end-to-end tests: ipmi_sim (Debian openipmi) started on
//! 127.0.0.1 and a free UDP port from the recipe in `scripts/peers/ipmi/`, with ipmitool as the
//! reference reader. Installed by `scripts/peers/install-ipmi.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const IPMI_USER: &str = "admin";
pub const IPMI_PASSWORD: &str = "e2e-ipmi-pw";

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A running ipmi_sim, killed on drop.
pub struct IpmiSim {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl IpmiSim {
    /// Starts ipmi_sim, or returns None (loudly) when it is not installed and
    /// `PCG_REQUIRE_PEERS` is unset.
    pub fn start() -> Option<IpmiSim> {
        let (Some(sim), Some(_)) = (which("ipmi_sim"), which("ipmitool")) else {
            assert!(
                std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
                "ipmi_sim/ipmitool missing and PCG_REQUIRE_PEERS is set: run scripts/peers/install-ipmi.sh"
            );
            eprintln!("!!!!!!!! SKIPPED: ipmi_sim/ipmitool missing — run scripts/peers/install-ipmi.sh !!!!!!!!");
            return None;
        };
        let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/peers/ipmi");
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let state = dir.path().join("chassis");
            std::fs::create_dir_all(&state).expect("state dir");
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map(|a| a.port())
                .expect("free UDP port");
            let conf = std::fs::read_to_string(recipes.join("lan.conf.in"))
                .expect("lan.conf.in")
                .replace("@PORT@", &port.to_string())
                .replace("@USER@", IPMI_USER)
                .replace("@PASS@", IPMI_PASSWORD)
                .replace(
                    "@CHASSIS@",
                    &format!(
                        "{} {}",
                        recipes.join("chassis-control.sh").display(),
                        state.display()
                    ),
                );
            std::fs::write(dir.path().join("lan.conf"), conf).expect("lan.conf");
            let child = Command::new(&sim)
                .arg("-n")
                .arg("-c")
                .arg(dir.path().join("lan.conf"))
                .arg("-f")
                .arg(recipes.join("bmc.emu"))
                .arg("-s")
                .arg(dir.path().join("state"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn ipmi_sim");
            let me = IpmiSim { child, port, dir };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if me.ipmitool(&["chassis", "power", "status"]).is_some() {
                    return Some(me);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("ipmi_sim did not answer ipmitool");
    }

    /// Runs `ipmitool -I lanplus -C 3` against this BMC; its stdout on success.
    pub fn ipmitool(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", IPMI_USER, "-P", IPMI_PASSWORD, "-N", "1", "-R", "2"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The endpoint of a `baremetal.enrol` for this BMC (its user and password), answers
    /// awaited up to `timeout_ms`.
    pub fn endpoint(&self, timeout_ms: u64) -> serde_json::Value {
        serde_json::json!({
            "address": format!("127.0.0.1:{}", self.port),
            "user": IPMI_USER,
            "password": IPMI_PASSWORD,
            "timeout_ms": timeout_ms,
        })
    }

    /// What the BMC was asked to do (the chassis-control program's log).
    pub fn actions(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chassis/actions.log")).unwrap_or_default()
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
