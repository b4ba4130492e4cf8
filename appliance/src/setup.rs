//! First boot: find the properties, write the system's configuration from them (hostname,
//! systemd-networkd, DNS, timesyncd, the SSH key, the gateway's proxy settings), pair once, and
//! record the outcome in `<data_dir>/firstboot.json` for `pcgctl status` and the console.
//!
//! It runs at every boot (so that properties edited in vCenter apply at the next power-on),
//! rewrites only files whose contents change, and pairs only while the gateway has no identity:
//! a reboot never pairs again and never fails because the one-time token was used.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pcg_gateway::status::FirstBoot;

use crate::props::{self, Network, Props, Settings};

/// Where and how first boot acts. Tests point `root` at a directory and leave `live` off, which
/// skips every command (mount, networkctl, systemctl, pcgctl).
pub struct Host {
    pub root: PathBuf,
    pub live: bool,
    /// The gateway's config file (as seen from inside `root`).
    pub gateway_config: PathBuf,
    pub pcgctl: PathBuf,
}

impl Host {
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
}

/// The marker that opens the part of a file first boot manages.
pub const MANAGED: &str =
    "# --- managed by pcg-appliance from the appliance properties; replaced at every boot ---";

/// Writes `contents` to `path` when it differs; returns whether it changed.
pub fn write_if_changed(path: &Path, contents: &str, mode: u32) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    if std::fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("pcg-tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// Removes `path`; returns whether it existed.
fn remove(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Replaces the managed block at the end of `existing` (or appends one).
pub fn with_managed_block(existing: &str, block: &str) -> String {
    let head = existing.split(MANAGED).next().unwrap_or("").trim_end();
    let mut out = head.to_string();
    if !out.is_empty() {
        out.push('\n');
    }
    if !block.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(MANAGED);
        out.push('\n');
        out.push_str(block);
        if !block.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The systemd-networkd unit for the appliance's NIC. `static_mac` pins static addressing to
/// one NIC (the first); DHCP applies to every Ethernet NIC.
pub fn network_unit(s: &Settings, static_mac: Option<&str>) -> String {
    let mut out = String::from(
        "# Written by pcg-appliance firstboot from the appliance properties; replaced at every boot.\n[Match]\n",
    );
    match (&s.network, static_mac) {
        (Network::Static { .. }, Some(mac)) => out.push_str(&format!("MACAddress={mac}\n")),
        _ => out.push_str("Name=en* eth*\n"),
    }
    out.push_str("\n[Network]\n");
    match &s.network {
        Network::Dhcp => out.push_str("DHCP=yes\n"),
        Network::Static {
            address,
            prefix,
            gateway,
        } => {
            out.push_str(&format!("Address={address}/{prefix}\n"));
            if let Some(g) = gateway {
                out.push_str(&format!("Gateway={g}\n"));
            }
            out.push_str("IPv6AcceptRA=no\n");
        }
    }
    for d in &s.dns {
        out.push_str(&format!("DNS={d}\n"));
    }
    out
}

/// timesyncd drop-in naming the NTP servers; `None` when none are given (DHCP's or Debian's).
pub fn timesyncd_conf(s: &Settings) -> Option<String> {
    (!s.ntp.is_empty()).then(|| {
        format!(
            "# Written by pcg-appliance firstboot from pcg.ntp_servers.\n[Time]\nNTP={}\n",
            s.ntp.join(" ")
        )
    })
}

/// The managed block of the gateway's config: its proxy settings, when given.
pub fn gateway_block(s: &Settings, proxy_ca_path: &str) -> String {
    let mut b = String::new();
    if let Some(u) = &s.proxy_url {
        b.push_str(&format!("proxy = {}\n", toml_str(u)));
    }
    if s.proxy_ca.is_some() {
        b.push_str(&format!("proxy_ca = {}\n", toml_str(proxy_ca_path)));
    }
    b
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `authorized_keys` with the managed key replaced, other lines kept.
pub fn authorized_keys(existing: &str, key: Option<&str>) -> String {
    with_managed_block(existing, key.unwrap_or(""))
}

/// The outcome of one step, for the record and the console.
struct Steps {
    lines: Vec<String>,
    errors: Vec<String>,
}

impl Steps {
    fn ok(&mut self, s: impl Into<String>) {
        self.lines.push(s.into());
    }
    fn fail(&mut self, s: impl Into<String>) {
        let s = s.into();
        self.lines.push(format!("FAILED {s}"));
        self.errors.push(s);
    }
}

/// Runs a command, returning its stdout, or a message with its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The first Ethernet NIC's MAC address (by interface index), from sysfs.
fn first_nic_mac(host: &Host) -> Option<String> {
    let mut nics: Vec<(u32, String)> = std::fs::read_dir(host.path("/sys/class/net"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("en") || name.starts_with("eth")) {
                return None;
            }
            let idx = std::fs::read_to_string(e.path().join("ifindex")).ok()?;
            let mac = std::fs::read_to_string(e.path().join("address")).ok()?;
            Some((idx.trim().parse().ok()?, mac.trim().to_string()))
        })
        .collect();
    nics.sort();
    nics.into_iter().next().map(|(_, mac)| mac)
}

/// Finds the properties: the OVF environment on a CD-ROM (ISO transport), VMware's guestinfo
/// transport, a NoCloud seed (`cidata`), an OpenStack config drive (`config-2`), or the file
/// `/etc/pcg/ovf-env.xml`, in that order. Returns the properties and where they came from.
pub fn find_properties(host: &Host, notes: &mut Vec<String>) -> Option<(Props, String)> {
    if host.live {
        // Block devices appear through udev; give it time to finish the cold-plug.
        let _ = run(Command::new("udevadm").args(["settle", "--timeout=30"]));
        let mut devices: Vec<PathBuf> = ["OVF\\x20ENV", "ovf-env", "OVF-ENV"]
            .iter()
            .map(|l| PathBuf::from(format!("/dev/disk/by-label/{l}")))
            .filter(|p| p.exists())
            .collect();
        if let Ok(rd) = std::fs::read_dir("/sys/class/block") {
            let mut srs: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sr"))
                .map(|n| PathBuf::from(format!("/dev/{n}")))
                .collect();
            srs.sort();
            devices.extend(srs);
        }
        for dev in devices {
            match read_from_device(&dev, &["ovf-env.xml", "OVF-ENV.XML", "ovf_env.xml"]) {
                Ok(Some((name, text))) => {
                    let what = format!("{name} on {}", dev.display());
                    match props::parse_ovf_env(&text, &what) {
                        Ok(p) => return Some((p, format!("OVF environment ({what})"))),
                        Err(e) => notes.push(e.to_string()),
                    }
                }
                Ok(None) => {}
                Err(e) => notes.push(e),
            }
        }
        if let Ok(text) = run(Command::new("vmware-rpctool").arg("info-get guestinfo.ovfEnv")) {
            if !text.trim().is_empty() {
                match props::parse_ovf_env(&text, "guestinfo.ovfEnv") {
                    Ok(p) => return Some((p, "OVF environment (VMware guestinfo)".into())),
                    Err(e) => notes.push(e.to_string()),
                }
            }
        }
        for (label, files) in [
            ("cidata", &["user-data"][..]),
            ("CIDATA", &["user-data"][..]),
            ("config-2", &["openstack/latest/user_data"][..]),
        ] {
            let dev = PathBuf::from(format!("/dev/disk/by-label/{label}"));
            if !dev.exists() {
                continue;
            }
            match read_from_device(&dev, files) {
                Ok(Some((name, text))) => {
                    let what = format!("{name} on {label}");
                    match props::parse_cloud_config(&text, &what) {
                        Ok(p) => return Some((p, format!("cloud-config ({what})"))),
                        Err(e) => notes.push(e.to_string()),
                    }
                }
                Ok(None) => {}
                Err(e) => notes.push(e),
            }
        }
    }
    let file = host.path("/etc/pcg/ovf-env.xml");
    if let Ok(text) = std::fs::read_to_string(&file) {
        match props::parse_ovf_env(&text, &file.display().to_string()) {
            Ok(p) => return Some((p, format!("file {}", "/etc/pcg/ovf-env.xml"))),
            Err(e) => notes.push(e.to_string()),
        }
    }
    None
}

/// Mounts `dev` read-only on a private directory, reads the first of `files` found, unmounts.
fn read_from_device(dev: &Path, files: &[&str]) -> Result<Option<(String, String)>, String> {
    let dir = PathBuf::from("/run/pcg-appliance/mnt");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if run(Command::new("mount").arg("-o").arg("ro").arg(dev).arg(&dir)).is_err() {
        // An empty CD-ROM drive or an unknown file system: nothing to read there.
        return Ok(None);
    }
    let mut found = None;
    for f in files {
        if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
            found = Some((f.to_string(), text));
            break;
        }
    }
    let _ = run(Command::new("umount").arg(&dir));
    Ok(found)
}

/// Applies the checked settings; returns the step lines and the errors.
fn apply(host: &Host, s: &Settings, steps: &mut Steps) {
    // Host name.
    let hostname = s.hostname.clone().unwrap_or_else(|| "pcg-gateway".into());
    let hosts = std::fs::read_to_string(host.path("/etc/hosts")).unwrap_or_default();
    let hosts = with_managed_block(&hosts, &format!("127.0.1.1\t{hostname}\n"));
    match write_if_changed(&host.path("/etc/hostname"), &format!("{hostname}\n"), 0o644)
        .and_then(|a| Ok(a | write_if_changed(&host.path("/etc/hosts"), &hosts, 0o644)?))
    {
        Ok(_) => {
            if host.live {
                let _ = std::fs::write("/proc/sys/kernel/hostname", &hostname);
            }
            steps.ok(format!("hostname: {hostname}"));
        }
        Err(e) => steps.fail(format!("hostname: cannot write /etc/hostname: {e}")),
    }

    // Network: one networkd unit; DNS servers with it.
    let mac = match s.network {
        Network::Static { .. } => first_nic_mac(host),
        Network::Dhcp => None,
    };
    let unit = network_unit(s, mac.as_deref());
    let what = match &s.network {
        Network::Dhcp => "DHCP".to_string(),
        Network::Static {
            address,
            prefix,
            gateway,
        } => format!(
            "static {address}/{prefix}{}",
            gateway.map(|g| format!(" via {g}")).unwrap_or_default()
        ),
    };
    let dns = if s.dns.is_empty() {
        String::new()
    } else {
        format!(
            ", DNS {}",
            s.dns
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    match write_if_changed(
        &host.path("/etc/systemd/network/10-pcg.network"),
        &unit,
        0o644,
    ) {
        Ok(changed) => {
            if changed && host.live {
                if let Err(e) = run(Command::new("networkctl").arg("reload")) {
                    steps.fail(format!("network: networkctl reload failed: {e}"));
                }
            }
            steps.ok(format!("network: {what}{dns}"));
        }
        Err(e) => steps.fail(format!("network: cannot write the networkd unit: {e}")),
    }

    // NTP.
    let ntp_path = host.path("/etc/systemd/timesyncd.conf.d/pcg.conf");
    let r = match timesyncd_conf(s) {
        Some(c) => write_if_changed(&ntp_path, &c, 0o644),
        None => remove(&ntp_path),
    };
    match r {
        Ok(changed) => {
            if changed && host.live {
                let _ = run(Command::new("systemctl").args(["try-restart", "systemd-timesyncd"]));
            }
            steps.ok(if s.ntp.is_empty() {
                "NTP: from DHCP, else Debian's pool".to_string()
            } else {
                format!("NTP: {}", s.ntp.join(" "))
            });
        }
        Err(e) => steps.fail(format!("NTP: cannot write {}: {e}", ntp_path.display())),
    }

    // SSH key for root.
    let ak = host.path("/root/.ssh/authorized_keys");
    let existing = std::fs::read_to_string(&ak).unwrap_or_default();
    match std::fs::create_dir_all(host.path("/root/.ssh"))
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(
                host.path("/root/.ssh"),
                std::fs::Permissions::from_mode(0o700),
            )
        })
        .and_then(|()| {
            write_if_changed(
                &ak,
                &authorized_keys(&existing, s.ssh_key.as_deref()),
                0o600,
            )
        }) {
        Ok(_) => steps.ok(if s.ssh_key.is_some() {
            "SSH: root may log in with the given key"
        } else {
            "SSH: no key given, no SSH login"
        }),
        Err(e) => steps.fail(format!("SSH: cannot write {}: {e}", ak.display())),
    }

    // Proxy: the gateway's config keys, only when this gateway accepts them.
    let ca_path = "/etc/pcg/proxy-ca.pem";
    let cfg_path = host.path(&host.gateway_config.to_string_lossy());
    let current = std::fs::read_to_string(&cfg_path).unwrap_or_default();
    let mut block = gateway_block(s, ca_path);
    if !block.is_empty() {
        let candidate = with_managed_block(&current, &block);
        if let Err(e) = toml::from_str::<pcg_gateway::Config>(&candidate) {
            steps.fail(format!(
                "proxy: this gateway version cannot use a proxy yet ({}); the proxy properties are not applied",
                e.message()
            ));
            block.clear();
        }
    }
    let r = match &s.proxy_ca {
        Some(pem) if !block.is_empty() => write_if_changed(&host.path(ca_path), pem, 0o644),
        _ => remove(&host.path(ca_path)),
    }
    .and_then(|_| write_if_changed(&cfg_path, &with_managed_block(&current, &block), 0o640));
    match r {
        Ok(_) if !block.is_empty() => steps.ok(format!(
            "proxy: {}{}",
            redact_userinfo(s.proxy_url.as_deref().unwrap_or("-")),
            if s.proxy_ca.is_some() {
                ", with its CA"
            } else {
                ""
            }
        )),
        Ok(_) => {
            if s.proxy_url.is_none() {
                steps.ok("proxy: none (direct)");
            }
        }
        Err(e) => steps.fail(format!("proxy: cannot write {}: {e}", cfg_path.display())),
    }
}

/// `http://user:secret@host:port` → `http://user:***@host:port`.
pub fn redact_userinfo(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = u[s + 3..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &u[..s + 3], &u[at..])
        }
        _ => u.to_string(),
    }
}

/// What `pcgctl status --json` says about pairing: `Some(gateway id)` when paired.
fn paired_as(host: &Host) -> Result<Option<String>, String> {
    let v = crate::console::gateway_status(&host.pcgctl, &host.gateway_config)?;
    Ok(v["paired"]
        .as_bool()
        .unwrap_or(false)
        .then(|| v["gateway_id"].as_str().unwrap_or("?").to_string()))
}

/// Pairs with `token` through `pcgctl pair -` (the token on stdin, never on a command line).
/// Retries while the SaaS is unreachable (the network may still be coming up).
fn pair(host: &Host, token: &str, proxy: Option<&str>) -> Result<String, String> {
    use std::io::Write as _;
    let _ =
        run(Command::new("/lib/systemd/systemd-networkd-wait-online")
            .args(["--any", "--timeout=90"]));
    let mut last = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(10));
        }
        let mut cmd = Command::new(&host.pcgctl);
        cmd.arg("--config")
            .arg(&host.gateway_config)
            .args(["pair", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = proxy {
            cmd.env("HTTPS_PROXY", p);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", host.pcgctl.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(token.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("pcgctl pair: {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        last = String::from_utf8_lossy(&out.stderr)
            .trim()
            .trim_start_matches("error: ")
            .to_string();
        if !last.contains("cannot reach the SaaS") {
            break;
        }
    }
    Err(last)
}

/// The action to suggest for a failure.
/// What kind of failure first boot met, for the suggested action.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trouble {
    None,
    /// The token is missing, malformed, expired or refused.
    Token,
    /// The SaaS could not be reached.
    Network,
}

fn action_for(errors: &[String], trouble: Trouble) -> Option<String> {
    if errors.is_empty() {
        return None;
    }
    Some(if trouble == Trouble::Network {
        "check the network properties (address, gateway, DNS, proxy) and that the SaaS is reachable over HTTPS from this network; then log in and run `pcgctl pair TOKEN`, or power-cycle".into()
    } else if trouble == Trouble::Token {
        "power off, set pcg.pairing_token to a new token from your tenant, power on; or log in and run `pcgctl pair TOKEN`".into()
    } else {
        "fix the named properties (vCenter: Edit Settings > vApp Options; KVM: the seed) and power-cycle, or log in and run `pcgctl status`".into()
    })
}

/// Runs first boot; returns the record it wrote (`ok` false on any failure).
pub fn firstboot(host: &Host, now_ms: i64) -> FirstBoot {
    let mut steps = Steps {
        lines: Vec::new(),
        errors: Vec::new(),
    };
    let mut notes = Vec::new();
    let found = find_properties(host, &mut notes);
    for n in &notes {
        steps.ok(format!("note: {n}"));
    }
    let (props, source) = match found {
        Some((p, src)) => (p, Some(src)),
        None => (Props::new(), None),
    };
    for k in props.keys() {
        if k.starts_with("pcg.") && !props::KEYS.contains(&k.as_str()) {
            steps.ok(format!("note: unknown property {k} ignored"));
        }
    }
    let checked = props::check(&props, now_ms / 1000);
    let mut trouble = Trouble::None;
    for p in &checked.problems {
        if p.key == props::TOKEN {
            trouble = Trouble::Token;
        }
        steps.fail(p.to_string());
    }
    apply(host, &checked.settings, &mut steps);

    let mut message = String::new();
    if host.live {
        match paired_as(host) {
            Ok(Some(gw)) => {
                message =
                    format!("already paired as gateway {gw}; the pairing token is not used again");
                steps.ok(format!("pairing: {message}"));
            }
            Ok(None) => match &checked.settings.token {
                Some(t) => match pair(host, t, checked.settings.proxy_url.as_deref()) {
                    Ok(out) => {
                        message = out.lines().next().unwrap_or("paired").to_string();
                        steps.ok(format!("pairing: {message}"));
                    }
                    Err(e) => {
                        trouble = if e.contains("cannot reach the SaaS") {
                            Trouble::Network
                        } else {
                            Trouble::Token
                        };
                        steps.fail(format!("pairing failed: {e}"));
                    }
                },
                None if trouble == Trouble::Token => {}
                None => {
                    trouble = Trouble::Token;
                    steps.fail("pairing: not paired and no pcg.pairing_token property was given");
                }
            },
            Err(e) => steps.fail(format!("pairing: cannot read the gateway's state: {e}")),
        }
    }
    let ok = steps.errors.is_empty();
    if !ok {
        message = steps.errors.join("; ");
    } else if message.is_empty() {
        message = "configured".into();
    }
    if source.is_none() {
        steps.ok("no appliance properties found (no OVF environment, guestinfo, NoCloud seed, config drive or /etc/pcg/ovf-env.xml): defaults applied");
    }
    FirstBoot {
        ok,
        action: action_for(&steps.errors, trouble),
        message,
        source,
        at_ms: now_ms,
        steps: steps.lines,
    }
}

/// Writes the record to `<data_dir>/firstboot.json`, owned like the directory (the gateway's
/// user), readable by it.
pub fn record(data_dir: &Path, fb: &FirstBoot) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join(pcg_gateway::status::FIRSTBOOT_FILE);
    let json = serde_json::to_string_pretty(fb).expect("the record serialises");
    write_if_changed(&path, &format!("{json}\n"), 0o640)?;
    let meta = std::fs::metadata(data_dir)?;
    std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &Path) -> Host {
        Host {
            root: dir.to_path_buf(),
            live: false,
            gateway_config: PathBuf::from("/etc/pcg/gateway.toml"),
            pcgctl: PathBuf::from("/usr/bin/pcgctl"),
        }
    }

    #[test]
    fn managed_block_is_replaced_not_appended() {
        let a = with_managed_block(
            "data_dir = \"/var/lib/pcg\"\n",
            "proxy = \"http://p:3128\"\n",
        );
        assert_eq!(
            a,
            format!("data_dir = \"/var/lib/pcg\"\n\n{MANAGED}\nproxy = \"http://p:3128\"\n")
        );
        let b = with_managed_block(&a, "proxy = \"http://q:3128\"\n");
        assert_eq!(b.matches(MANAGED).count(), 1);
        assert!(b.contains("q:3128") && !b.contains("p:3128"));
        assert_eq!(with_managed_block(&b, ""), "data_dir = \"/var/lib/pcg\"\n");
    }

    #[test]
    fn network_units() {
        let mut p = Props::new();
        p.insert(props::IP_MODE.into(), "static".into());
        p.insert(props::IP_ADDRESS.into(), "192.0.2.10".into());
        p.insert(props::IP_PREFIX.into(), "24".into());
        p.insert(props::IP_GATEWAY.into(), "192.0.2.1".into());
        p.insert(props::DNS.into(), "192.0.2.53".into());
        let s = props::check(&p, 0).settings;
        let u = network_unit(&s, Some("00:50:56:00:00:01"));
        assert!(u.contains("[Match]\nMACAddress=00:50:56:00:00:01\n"), "{u}");
        assert!(
            u.contains("Address=192.0.2.10/24\nGateway=192.0.2.1\n"),
            "{u}"
        );
        assert!(u.contains("DNS=192.0.2.53\n"), "{u}");
        let d = network_unit(&props::check(&Props::new(), 0).settings, None);
        assert!(
            d.contains("Name=en* eth*\n") && d.contains("DHCP=yes\n"),
            "{d}"
        );
    }

    #[test]
    fn applies_into_a_root_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = host(dir.path());
        std::fs::create_dir_all(h.path("/etc/pcg")).expect("mkdir");
        std::fs::write(
            h.path("/etc/pcg/gateway.toml"),
            "data_dir = \"/var/lib/pcg\"\n",
        )
        .expect("write");
        std::fs::write(
            h.path("/etc/pcg/ovf-env.xml"),
            r#"<Environment xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"><PropertySection>
                 <Property oe:key="pcg.hostname" oe:value="gw-7"/>
                 <Property oe:key="pcg.ntp_servers" oe:value="ntp1.example, 192.0.2.123"/>
                 <Property oe:key="pcg.pairing_token" oe:value="garbage"/>
               </PropertySection></Environment>"#,
        )
        .expect("write");
        let fb = firstboot(&h, 1_000);
        assert!(!fb.ok);
        assert!(fb.message.contains("pcg.pairing_token"), "{fb:?}");
        assert!(
            fb.action.as_deref().unwrap_or("").contains("pcgctl pair"),
            "{fb:?}"
        );
        assert_eq!(fb.source.as_deref(), Some("file /etc/pcg/ovf-env.xml"));
        assert_eq!(
            std::fs::read_to_string(h.path("/etc/hostname")).expect("hostname"),
            "gw-7\n"
        );
        assert!(
            std::fs::read_to_string(h.path("/etc/systemd/timesyncd.conf.d/pcg.conf"))
                .expect("timesyncd")
                .contains("NTP=ntp1.example 192.0.2.123\n")
        );
        assert!(
            std::fs::read_to_string(h.path("/etc/systemd/network/10-pcg.network"))
                .expect("network")
                .contains("DHCP=yes")
        );
        // No proxy given: the gateway config is left as it was.
        assert_eq!(
            std::fs::read_to_string(h.path("/etc/pcg/gateway.toml")).expect("config"),
            "data_dir = \"/var/lib/pcg\"\n"
        );
        // A second boot changes nothing on disk.
        let before = std::fs::read_to_string(h.path("/etc/hosts")).expect("hosts");
        let _ = firstboot(&h, 2_000);
        assert_eq!(
            std::fs::read_to_string(h.path("/etc/hosts")).expect("hosts"),
            before
        );
        let p = record(&h.path("/var/lib/pcg"), &fb).expect("record");
        assert_eq!(
            pcg_gateway::status::read_firstboot(&h.path("/var/lib/pcg")),
            Some(fb)
        );
        assert!(p.ends_with("firstboot.json"));
    }

    #[test]
    fn proxy_keys_are_written_only_when_the_gateway_accepts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = host(dir.path());
        std::fs::create_dir_all(h.path("/etc/pcg")).expect("mkdir");
        std::fs::write(
            h.path("/etc/pcg/gateway.toml"),
            "data_dir = \"/var/lib/pcg\"\n",
        )
        .expect("write");
        let mut p = Props::new();
        p.insert(
            props::PROXY_URL.into(),
            "http://ops:s3cret@proxy.example:3128".into(),
        );
        let s = props::check(&p, 0).settings;
        let mut steps = Steps {
            lines: vec![],
            errors: vec![],
        };
        apply(&h, &s, &mut steps);
        let cfg = std::fs::read_to_string(h.path("/etc/pcg/gateway.toml")).expect("config");
        let accepted =
            toml::from_str::<pcg_gateway::Config>("proxy = \"http://proxy.example:3128\"\n")
                .is_ok();
        if accepted {
            assert!(
                cfg.contains("proxy = \"http://ops:s3cret@proxy.example:3128\""),
                "{cfg}"
            );
            assert!(steps.errors.is_empty(), "{:?}", steps.errors);
        } else {
            // Refused clearly, and the config stays loadable.
            assert_eq!(cfg, "data_dir = \"/var/lib/pcg\"\n");
            assert!(
                steps.errors[0].contains("cannot use a proxy yet"),
                "{:?}",
                steps.errors
            );
        }
        // The password never reaches a step line.
        assert!(
            steps.lines.iter().all(|l| !l.contains("s3cret")),
            "{:?}",
            steps.lines
        );
    }

    #[test]
    fn ssh_key_block_keeps_other_keys() {
        let existing = "ssh-ed25519 AAAAold admin@laptop\n";
        let a = authorized_keys(existing, Some("ssh-ed25519 AAAAnew ops"));
        assert!(a.starts_with(existing) && a.contains("AAAAnew"));
        assert_eq!(authorized_keys(&a, None), existing);
    }

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_userinfo("http://ops:s3cret@proxy:3128"),
            "http://ops:***@proxy:3128"
        );
        assert_eq!(redact_userinfo("http://proxy:3128"), "http://proxy:3128");
    }
}
