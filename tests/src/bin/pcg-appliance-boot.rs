//! `pcg-appliance-boot`: the appliance boot test (run by `appliance/boot-test.sh`).
//!
//! 1. The OVA, read by an independent consumer: `pcg-vcsim ova -import` parses it with govmomi's
//!    `ovf` package (tar order, manifest, descriptor, vApp properties) and deploys it into an
//!    in-process vCenter simulator (CreateImportSpec, ImportVApp, lease upload).
//! 2. pcg-saas on the host's 127.0.0.1, advertising `https://10.0.2.100:<port>`, which qemu's
//!    user network forwards to it (`restrict=on`: the guest reaches nothing else).
//! 3. Three boots of the qcow2 under `qemu-system-x86_64` (TCG) on one copy-on-write disk, each
//!    with an `ovf-env.xml` ISO labelled `OVF ENV`:
//!    - a malformed token: the console shows the first-boot error and the unpaired gateway
//!      running; one kernel boot (no loop); the SaaS saw no pairing; clean ACPI shutdown;
//!    - a good token (the operator fixed the property): the gateway pairs and shows up
//!      connected over the REST API, `gateway.diagnose` round-trips and reports the host name
//!      from the properties;
//!    - a power-cycle, now with a NoCloud seed (`cidata`) instead of the OVF ISO: the same
//!      gateway id reconnects, no second pairing, the seed's host name applies.
//!
//! Every process is stopped by PID; each wait is bounded. Figures (boot-to-connected times, qemu
//! peak RSS) go to `<work>/results.json`. `pcg-appliance-boot pipe HOST:PORT` is the byte pipe
//! qemu runs for each guest connection to 10.0.2.2.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};
use pcg_e2e::{Saas, SaasOptions};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "pcg-appliance-boot", about = "pcg appliance boot test")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the boot test.
    Run {
        /// The appliance disk (qcow2).
        #[arg(long)]
        qcow2: PathBuf,
        /// The OVA, checked with govmomi.
        #[arg(long)]
        ova: PathBuf,
        /// pcg-vcsim (built by scripts/peers/install-vsphere.sh).
        #[arg(long)]
        vcsim: PathBuf,
        /// Work directory (serial logs, disks, results.json); emptied first.
        #[arg(long)]
        work: PathBuf,
        /// Bound on each boot's wait, seconds.
        #[arg(long, default_value_t = 900)]
        boot_timeout: u64,
    },
    /// Copy stdin to HOST:PORT and its answers to stdout (qemu's guestfwd command). Its stderr
    /// is the guest's connection too, so problems go to the log file only.
    Pipe {
        target: String,
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

/// The address the guest reaches pcg-saas at. qemu forwards the SaaS's two ports there
/// (`guestfwd`) and, with `restrict=on`, nothing else: the guest cannot reach the host or any
/// other address. (slirp refuses `guestfwd` on its host alias 10.0.2.2, which `restrict=on`
/// closes.)
const SAAS_ADDR: &str = "10.0.2.100";

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Pipe { target, log } => {
            let r = pipe(&target);
            if let Some(log) = log {
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                {
                    let _ = writeln!(
                        f,
                        "{} pipe to {target}: {}",
                        pcg_gateway::store::now_ms(),
                        match &r {
                            Ok(n) => format!("closed after {n} bytes to the guest"),
                            Err(e) => format!("failed: {e:#}"),
                        }
                    );
                }
            }
            // Nothing on stderr: it is the guest's connection.
            std::process::exit(i32::from(r.is_err()))
        }
        Cmd::Run {
            qcow2,
            ova,
            vcsim,
            work,
            boot_timeout,
        } => tokio::runtime::Runtime::new()?.block_on(run(
            &qcow2,
            &ova,
            &vcsim,
            &work,
            Duration::from_secs(boot_timeout),
        )),
    }
}

fn pipe(target: &str) -> anyhow::Result<u64> {
    let sock = std::net::TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    let mut up = sock.try_clone()?;
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = sock;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    let mut total = 0u64;
    loop {
        match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
                total += n as u64;
            }
        }
    }
    drop(t);
    Ok(total)
}

/// Counts the checks that passed; the closing line reports them.
struct Checks {
    passed: usize,
}

impl Checks {
    fn ok(&mut self, what: &str) {
        self.passed += 1;
        println!("  ok   {what}");
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn xml_attr(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An ISO labelled `OVF ENV` holding `ovf-env.xml` with `props`, as vSphere's ISO transport.
fn env_iso(dir: &Path, name: &str, props: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let d = dir.join(format!("{name}-env"));
    std::fs::create_dir_all(&d)?;
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Environment\n     xmlns=\"http://schemas.dmtf.org/ovf/environment/1\"\n     xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"\n     xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\"\n     xmlns:ve=\"http://www.vmware.com/schema/ovfenv\"\n     oe:id=\"\"\n     ve:vCenterId=\"vm-boot-test\">\n   <PlatformSection>\n      <Kind>qemu (pcg boot test)</Kind>\n   </PlatformSection>\n   <PropertySection>\n",
    );
    for (k, v) in props {
        xml.push_str(&format!(
            "         <Property oe:key=\"{}\" oe:value=\"{}\"/>\n",
            xml_attr(k),
            xml_attr(v)
        ));
    }
    xml.push_str("   </PropertySection>\n</Environment>\n");
    std::fs::write(d.join("ovf-env.xml"), xml)?;
    let iso = dir.join(format!("{name}-env.iso"));
    sh(Command::new("genisoimage")
        .args(["-quiet", "-V", "OVF ENV", "-J", "-R", "-o"])
        .arg(&iso)
        .arg(d.join("ovf-env.xml")))?;
    Ok(iso)
}

/// A NoCloud seed (ISO labelled `cidata`) with `#cloud-config` user-data, as KVM users give it.
fn nocloud_iso(dir: &Path, user_data: &str) -> anyhow::Result<PathBuf> {
    let d = dir.join("nocloud");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("user-data"), user_data)?;
    std::fs::write(d.join("meta-data"), "instance-id: pcg-boot-test\n")?;
    let iso = dir.join("nocloud.iso");
    sh(Command::new("genisoimage")
        .args(["-quiet", "-V", "cidata", "-J", "-R", "-o"])
        .arg(&iso)
        .arg(d.join("user-data"))
        .arg(d.join("meta-data")))?;
    Ok(iso)
}

/// One qemu run of the appliance.
struct Vm {
    child: Child,
    serial: PathBuf,
    monitor: PathBuf,
    started: Instant,
    peak_rss_kib: u64,
}

impl Vm {
    fn start(
        work: &Path,
        name: &str,
        disk: &Path,
        iso: &Path,
        ports: &[u16],
    ) -> anyhow::Result<Vm> {
        let serial = work.join(format!("serial-{name}.log"));
        let monitor = work.join(format!("monitor-{name}.sock"));
        let _ = std::fs::remove_file(&monitor);
        let exe = std::env::current_exe()?;
        let mut nic = String::from("user,model=virtio-net-pci,restrict=on");
        for p in ports {
            nic.push_str(&format!(
                ",guestfwd=tcp:{SAAS_ADDR}:{p}-cmd:{} pipe 127.0.0.1:{p} --log {}",
                exe.display(),
                work.join("pipe.log").display()
            ));
        }
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "pc",
                "-accel",
                "tcg,tb-size=256",
                "-smp",
                "2",
                "-m",
                "1024",
            ])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", disk.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,media=cdrom,readonly=on",
                iso.display()
            ))
            .arg("-nic")
            .arg(nic)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(work.join(format!("qemu-{name}.log")))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .context("start qemu-system-x86_64")?;
        println!(
            "  qemu {name} started (pid {}), serial log {}",
            child.id(),
            serial.display()
        );
        Ok(Vm {
            child,
            serial,
            monitor,
            started: Instant::now(),
            peak_rss_kib: 0,
        })
    }

    fn log(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Fails when qemu has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "qemu exited ({st}) unexpectedly; serial log tail:\n{}",
                self.tail()
            );
        }
        self.peak_rss_kib = self.peak_rss_kib.max(
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmHWM:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0),
        );
        Ok(())
    }

    /// Polls every 2 s until `f` returns `Some`, qemu exits, or `timeout` passes.
    async fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            self.alive()?;
            if let Some(v) = f(&self.log()) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; serial log tail:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// ACPI power button, then waits for the guest to power off (qemu exits).
    async fn power_off(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut pressed: Option<Instant> = None;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                ensure!(st.success(), "qemu exited with {st} on power-off");
                return Ok(t.elapsed());
            }
            // A press the guest was not yet listening for is lost: press again every 30 s.
            if pressed.is_none_or(|p| p.elapsed() > Duration::from_secs(30))
                && monitor_command(&self.monitor, "system_powerdown")
            {
                pressed = Some(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest did not power off within {timeout:?}; serial log tail:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Sends one command to qemu's human monitor and waits (up to 5 s) for the prompt that follows
/// it: closing the connection before qemu has read the command can lose it.
fn monitor_command(path: &Path, cmd: &str) -> bool {
    let Ok(mut m) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    let _ = m.set_read_timeout(Some(Duration::from_millis(500)));
    if m.write_all(format!("{cmd}\n").as_bytes()).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match m.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                // The greeting's prompt, then the one after our command.
                if seen.matches("(qemu)").count() >= 2 {
                    return true;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    seen.contains(cmd)
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tenant's gateways.
async fn gateways(saas: &Saas, key: &str) -> anyhow::Result<Vec<Value>> {
    Ok(saas
        .ok("GET", "/v1/gateways", key, None)
        .await?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

async fn events(saas: &Saas, key: &str, kind: &str) -> anyhow::Result<usize> {
    let v = saas.ok("GET", "/v1/events?limit=1000", key, None).await?;
    Ok(v.as_array()
        .map(|a| a.iter().filter(|e| e["kind"] == kind).count())
        .unwrap_or(0))
}

/// Waits for the tenant's one gateway to be connected (or not); returns it.
async fn wait_connected(
    saas: &Saas,
    key: &str,
    mut vm: Option<&mut Vm>,
    connected: bool,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(vm) = vm.as_deref_mut() {
            vm.alive()?;
            // A boot that should pair: a first-boot error will not heal by waiting.
            if connected && vm.log().contains("pcg first boot: ERROR") {
                bail!("first boot failed; serial log tail:\n{}", vm.tail());
            }
        }
        let gws = gateways(saas, key).await?;
        if let Some(g) = gws
            .iter()
            .find(|g| g["connected"].as_bool() == Some(connected))
        {
            return Ok(g.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "no gateway {} after {timeout:?} (gateways: {gws:?}); serial log tail:\n{}",
                if connected {
                    "connected"
                } else {
                    "disconnected"
                },
                vm.as_deref().map(Vm::tail).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn diagnose(saas: &Saas, key: &str, gw: &str) -> anyhow::Result<Value> {
    let id = saas.submit(key, gw, "gateway.diagnose", json!({})).await?;
    let v = saas
        .wait_command(key, &id, Duration::from_secs(180))
        .await?;
    ensure!(
        v["state"] == "succeeded" && v["result"]["ok"] == true,
        "gateway.diagnose: {v}"
    );
    Ok(v["result"]["output"].clone())
}

/// The last login screen agetty printed (from its first line to the login prompt).
fn last_console(log: &str) -> Option<&str> {
    let start = log.rfind("pcg gateway appliance ")?;
    let rest = &log[start..];
    Some(&rest[..rest.find("login:").unwrap_or(rest.len())])
}

/// What the boot loader prints on the serial console at each boot.
const BOOT_BANNER: &str = "SYSLINUX 6.04";

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

async fn run(
    qcow2: &Path,
    ova: &Path,
    vcsim: &Path,
    work: &Path,
    boot_timeout: Duration,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let work = &work.canonicalize()?;
    let mut checks = Checks { passed: 0 };
    let mut results = json!({});

    println!("== the OVA through govmomi (ovf package, ImportVApp into the simulator)");
    let out = sh(Command::new(vcsim)
        .args(["ova", "-import", "-set", "pcg.hostname=imported"])
        .arg(ova))?;
    let rep: Value = serde_json::from_str(&out).context("pcg-vcsim ova output")?;
    std::fs::write(work.join("ova-report.json"), &out)?;
    let keys: Vec<&str> = rep["properties"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["key"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        keys == [
            "pcg.pairing_token",
            "pcg.hostname",
            "pcg.ip_mode",
            "pcg.ip_address",
            "pcg.ip_prefix",
            "pcg.ip_gateway",
            "pcg.dns_servers",
            "pcg.ntp_servers",
            "pcg.proxy_url",
            "pcg.proxy_ca",
            "pcg.ssh_public_key"
        ],
        "OVF properties: {keys:?}"
    );
    ensure!(
        rep["properties"][0]["password"] == true,
        "the token is not a password property"
    );
    checks.ok("govmomi parses the descriptor and lists the 11 vApp properties (token hidden)");
    ensure!(
        rep["files"][0] == "pcg-gateway.ovf"
            && rep["manifest_sha256_ok"]["pcg-gateway-disk1.vmdk"] == "ok"
            && rep["transport"] == "iso com.vmware.guestInfo"
            && rep["disk_format"]
                .as_str()
                .is_some_and(|f| f.ends_with("#streamOptimized")),
        "OVA layout: {rep}"
    );
    checks.ok("descriptor first, SHA-256 manifest matches, ISO + guestinfo transports, streamOptimized disk");
    let uploaded = rep["import"]["uploaded_bytes"]["pcg-gateway-disk1.vmdk"]
        .as_i64()
        .unwrap_or(0);
    ensure!(
        uploaded > 50 << 20
            && rep["import"]["extra_config"]["pcg.hostname"] == "imported"
            && rep["import"]["guest_id"] == "debian12_64Guest",
        "import: {}",
        rep["import"]
    );
    checks.ok(&format!(
        "ImportVApp + lease upload into vcsim: {} ({uploaded} bytes uploaded)",
        rep["import"]["vm"]
    ));

    println!("== pcg-saas on 127.0.0.1, advertised to the guest as {SAAS_ADDR}");
    let (api_port, broker_port) = (free_port()?, free_port()?);
    let saas = Saas::start(
        &work.join("saas"),
        SaasOptions {
            heartbeat_ms: Some(5000),
            api_listen: Some(format!("127.0.0.1:{api_port}").parse()?),
            broker_listen: Some(format!("127.0.0.1:{broker_port}").parse()?),
            extra_toml: format!(
                "public_api_url = \"https://{SAAS_ADDR}:{api_port}\"\npublic_broker_urls = [\"https://{SAAS_ADDR}:{broker_port}\"]\nserver_names = [\"{SAAS_ADDR}\"]\n"
            ),
            ..Default::default()
        },
    )
    .await?;
    // The ready file names the advertised URL; the host itself calls the loopback address.
    let mut saas = saas;
    saas.api = format!("https://127.0.0.1:{api_port}");
    let (_tenant, key) = saas.tenant("appliance").await?;
    let (_tok_id, token) = saas.token(&key, Some(7200)).await?;
    let ports = [api_port, broker_port];

    let disk = work.join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(qcow2.canonicalize()?)
        .arg(&disk))?;
    let common = [
        ("pcg.ip_mode", "dhcp"),
        ("pcg.ntp_servers", SAAS_ADDR),
        ("pcg.dns_servers", "10.0.2.3"),
    ];

    println!("== boot 1: a malformed pairing token");
    let mut props = common.to_vec();
    props.push(("pcg.pairing_token", "pcg1_this-is-not-a-token"));
    props.push(("pcg.hostname", "pcg-bad-token"));
    let iso = env_iso(work, "bad", &props)?;
    let mut vm = Vm::start(work, "1-bad-token", &disk, &iso, &ports)?;
    let console_error = "first boot:  ERROR: property pcg.pairing_token: malformed pairing token";
    let t = vm
        .wait("the first-boot error on the console", boot_timeout, |log| {
            log.contains(console_error).then_some(())
        })
        .await
        .map(|()| vm.started.elapsed())?;
    checks.ok(&format!(
        "the console shows the token error after {} s",
        t.as_secs()
    ));
    results["boot1_to_console_error_s"] = json!(t.as_secs());
    vm.wait(
        "the console to show the gateway running unpaired",
        boot_timeout,
        |log| {
            let c = last_console(log)?;
            [
                "service:     pcg-gateway active (running), 0 restarts",
                "gateway:     not paired",
                "tunnel:      down (not paired)",
                console_error,
                "to fix:      power off, set pcg.pairing_token",
            ]
            .iter()
            .all(|l| c.contains(l))
            .then_some(())
        },
    )
    .await?;
    checks.ok("the gateway service is active (it reported ready), unpaired, not restarting; the console says how to fix the token");
    let off = vm.power_off(Duration::from_secs(300)).await?;
    let log = vm.log();
    ensure!(
        count(&log, BOOT_BANNER) == 1 && count(&log, "pcg first boot: ERROR:") == 1,
        "expected one boot and one first-boot run; saw {} boots, {} first-boot errors",
        count(&log, BOOT_BANNER),
        count(&log, "pcg first boot: ERROR:")
    );
    ensure!(
        gateways(&saas, &key).await?.is_empty()
            && events(&saas, &key, "pairing.refused").await? == 0,
        "the malformed token reached the SaaS"
    );
    checks.ok(&format!(
        "no boot loop (one boot), nothing sent to the SaaS, clean ACPI power-off in {} s",
        off.as_secs()
    ));
    results["boot1_qemu_peak_rss_kib"] = json!(vm.peak_rss_kib);
    drop(vm);

    println!("== boot 2: the token fixed, same disk");
    let mut props = common.to_vec();
    props.push(("pcg.pairing_token", token.as_str()));
    props.push(("pcg.hostname", "pcg-boot-test"));
    let iso = env_iso(work, "good", &props)?;
    let mut vm = Vm::start(work, "2-paired", &disk, &iso, &ports)?;
    let gw = wait_connected(&saas, &key, Some(&mut vm), true, boot_timeout).await?;
    let t = vm.started.elapsed();
    let gw_id = gw["id"].as_str().unwrap_or_default().to_string();
    checks.ok(&format!(
        "gateway {gw_id} paired and connected over the REST API {} s after power-on",
        t.as_secs()
    ));
    results["boot2_power_on_to_connected_s"] = json!(t.as_secs());
    let d = diagnose(&saas, &key, &gw_id).await?;
    ensure!(
        d["gateway_id"] == gw_id.as_str() && d["hostname"] == "pcg-boot-test",
        "gateway.diagnose: {d}"
    );
    checks.ok("gateway.diagnose round-trips and reports the host name from the properties");
    vm.wait("the console to show the tunnel up", boot_timeout, |log| {
        let c = last_console(log)?;
        (c.contains(&format!("gateway:     {gw_id}"))
            && c.contains("service:     pcg-gateway active (running), 0 restarts")
            && c.contains(&format!(
                "tunnel:      connected to https://{SAAS_ADDR}:{broker_port}"
            ))
            && c.contains("first boot:  ok: paired")
            && log.contains("pcg first boot: ok:"))
        .then_some(())
    })
    .await?;
    checks.ok(
        "the console shows the service active, the gateway id, the tunnel up and first boot ok",
    );
    vm.power_off(Duration::from_secs(300)).await?;
    results["boot2_qemu_peak_rss_kib"] = json!(vm.peak_rss_kib);
    drop(vm);
    // The broker sees the tunnel go (closed by the shutdown, or silent for three heartbeats).
    wait_connected(&saas, &key, None, false, Duration::from_secs(120)).await?;

    println!("== boot 3: power-cycle, the settings now from a NoCloud seed (as on KVM)");
    let seed = nocloud_iso(
        work,
        &format!(
            "#cloud-config\nhostname: pcg-nocloud\npcg:\n  pairing_token: {token}\n  ip_mode: dhcp\n  ntp_servers: [{SAAS_ADDR}]\n"
        ),
    )?;
    let mut vm = Vm::start(work, "3-reboot", &disk, &seed, &ports)?;
    let gw3 = wait_connected(&saas, &key, Some(&mut vm), true, boot_timeout).await?;
    let t = vm.started.elapsed();
    let all = gateways(&saas, &key).await?;
    ensure!(
        gw3["id"] == gw_id.as_str() && all.len() == 1,
        "after the reboot: {all:?}"
    );
    ensure!(
        events(&saas, &key, "gateway.paired").await? == 1
            && events(&saas, &key, "pairing.refused").await? == 0,
        "a second pairing was attempted"
    );
    let log = vm.log();
    ensure!(
        log.contains(&format!("already paired as gateway {gw_id}")),
        "first boot did not recognise the identity; serial log tail:\n{}",
        vm.tail()
    );
    checks.ok(&format!(
        "after a power-cycle the same gateway reconnects in {} s, with no second pairing",
        t.as_secs()
    ));
    results["boot3_power_on_to_connected_s"] = json!(t.as_secs());
    let d = diagnose(&saas, &key, &gw_id).await?;
    ensure!(
        d["gateway_id"] == gw_id.as_str()
            && d["hostname"] == "pcg-nocloud"
            && log.contains("cloud-config (user-data on cidata)"),
        "gateway.diagnose: {d}; serial log tail:\n{}",
        vm.tail()
    );
    checks.ok("the NoCloud seed's settings applied (host name), gateway.diagnose round-trips");
    let off = vm.power_off(Duration::from_secs(300)).await?;
    results["boot3_qemu_peak_rss_kib"] = json!(vm.peak_rss_kib);
    results["boot3_power_off_s"] = json!(off.as_secs());
    checks.ok("a clean ACPI power-off");
    drop(vm);

    std::fs::write(
        work.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("results: {results}");
    println!("appliance boot test: {} passed, 0 failed", checks.passed);
    Ok(())
}
