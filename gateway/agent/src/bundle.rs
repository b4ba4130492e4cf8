//! Support bundles: one tar.gz with what a support engineer needs to see what is wrong with a
//! gateway — its status, its configuration with every secret redacted, its recent logs, its
//! enrolled endpoints (names, never credentials), versions and system facts — and its upload up
//! the tunnel to the SaaS, where the tenant fetches it (`GET /v1/bundles/{id}`).
//!
//! Secrets never enter a bundle: secret-named configuration values and the proxy's password are
//! redacted, and before the archive is written every file is searched for every secret this
//! gateway holds (the passwords of its enrolled BMCs, vCenters and clouds, its proxy's password)
//! and any occurrence is replaced.

use std::path::Path;
use std::time::Duration;

use crate::status::Status;
use crate::store::Store;

/// What went wrong making or sending a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot write the bundle: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot upload the bundle: {0}")]
    Upload(String),
}

/// Files of a bundle, before they are archived.
pub struct Contents {
    pub files: Vec<(String, Vec<u8>)>,
}

fn run(cmd: &str, args: &[&str]) -> String {
    match std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) => format!(
            "$ {cmd} {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("$ {cmd} {}\n(not available: {e})\n", args.join(" ")),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({path}: {e})\n"))
}

/// The configuration file with secret-named values and the proxy's password redacted.
fn redacted_config(path: Option<&Path>) -> String {
    let Some(path) = path else {
        return "# no configuration file: defaults and environment overrides apply\n".into();
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return format!("# {}: {e}\n", path.display()),
    };
    let mut doc: toml::Value = match toml::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return format!(
                "# {} is not valid TOML ({e}); not included, to be sure no secret is\n",
                path.display()
            )
        }
    };
    fn walk(v: &mut toml::Value) {
        if let toml::Value::Table(t) = v {
            for (k, val) in t.iter_mut() {
                if pcg_proto::sealed::is_secret_key(k) {
                    *val = toml::Value::String("<redacted>".into());
                } else if k == "proxy" {
                    if let toml::Value::String(s) = val {
                        *s = crate::transport::proxy::redact_url(s);
                    }
                } else {
                    walk(val);
                }
            }
        }
    }
    walk(&mut doc);
    format!(
        "# {} (secrets redacted)\n{}",
        path.display(),
        toml::to_string_pretty(&doc).unwrap_or_default()
    )
}

/// Every secret this gateway holds, to be kept out of the bundle.
fn secrets(cfg: &crate::Config, store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, val) in m {
                    if pcg_proto::sealed::is_secret_key(k) {
                        if let Some(s) = val.as_str() {
                            out.push(s.to_string());
                        }
                    } else {
                        collect(val, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    for name in store.bmc_names() {
        if let Ok(Some(rec)) = store.bmc(&name) {
            if let Ok(plain) = store.unseal(&rec.endpoint_sealed) {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&plain) {
                    collect(&v, &mut out);
                }
            }
        }
    }
    for provider in ["vsphere", "openstack"] {
        for name in store.endpoint_names(provider) {
            if let Ok(Some(rec)) = store.endpoint(provider, &name) {
                if let Ok(plain) = store.unseal(&rec.endpoint_sealed) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&plain) {
                        collect(&v, &mut out);
                    }
                }
            }
        }
    }
    let proxies = [store.proxy().ok().flatten(), cfg.proxy.clone()];
    for url in proxies.into_iter().flatten() {
        if let Ok(p) = crate::transport::Proxy::parse(&url) {
            out.extend(p.password);
        }
    }
    out.retain(|s| s.len() >= 3);
    out.sort();
    out.dedup();
    out
}

/// Gathers the bundle's files. `logs` are the daemon's recent log lines (empty when it is not
/// running: the systemd journal is read instead, where there is one).
pub fn gather(
    cfg: &crate::Config,
    config_path: Option<&Path>,
    store: &Store,
    status: &Status,
    diag: &crate::diag::Report,
    logs: &[String],
) -> Contents {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, body: String| files.push((name.to_string(), body.into_bytes()));
    add(
        "README.txt",
        format!(
            "pcg gateway support bundle, made {} by pcg {}.\n\
             status.json / status.txt  what `pcgctl status` shows\n\
             diag.json / diag.txt      what `pcgctl diag` finds (run while the bundle was made)\n\
             config.toml              the configuration file, secrets redacted\n\
             proxy.txt                the proxy in effect (no password)\n\
             endpoints.txt            enrolled BMCs, vCenters and clouds (names only)\n\
             logs.txt                 recent log lines of the daemon (or the systemd journal)\n\
             versions.txt, system.txt versions, OS, network and disk facts\n",
            crate::status::rfc3339(crate::store::now_ms()),
            crate::VERSION
        ),
    );
    add(
        "status.json",
        serde_json::to_string_pretty(status).unwrap_or_default(),
    );
    add("status.txt", status.render());
    add(
        "diag.json",
        serde_json::to_string_pretty(diag).unwrap_or_default(),
    );
    add("diag.txt", diag.render());
    add("config.toml", redacted_config(config_path));
    add(
        "proxy.txt",
        crate::transport::proxy_info(cfg, store)
            .map(|p| p.render())
            .unwrap_or_else(|e| format!("(proxy settings: {e})\n")),
    );
    let mut eps = String::new();
    for name in store.bmc_names() {
        let proto = store
            .bmc(&name)
            .ok()
            .flatten()
            .map(|r| r.protocol)
            .unwrap_or_default();
        eps.push_str(&format!("bmc {name} ({proto})\n"));
    }
    for provider in ["vsphere", "openstack"] {
        for name in store.endpoint_names(provider) {
            eps.push_str(&format!("{provider} {name}\n"));
        }
    }
    if eps.is_empty() {
        eps.push_str("(none enrolled)\n");
    }
    add("endpoints.txt", eps);
    let logs = if logs.is_empty() {
        run(
            "journalctl",
            &[
                "-u",
                "pcg-gateway",
                "--since",
                "-24h",
                "--no-pager",
                "-n",
                "5000",
            ],
        )
    } else {
        logs.join("\n") + "\n"
    };
    add("logs.txt", logs);
    add(
        "versions.txt",
        format!(
            "pcg-gateway {}\n{}\n{}",
            crate::VERSION,
            read("/proc/version"),
            read("/etc/os-release")
        ),
    );
    let mut sys = String::new();
    sys.push_str(&format!(
        "hostname: {}\nuptime (s): {}\nclock: {}\n\n",
        read("/proc/sys/kernel/hostname").trim(),
        read("/proc/uptime")
            .split_whitespace()
            .next()
            .unwrap_or("?"),
        crate::status::rfc3339(crate::store::now_ms())
    ));
    sys.push_str(&run("ip", &["-brief", "address"]));
    sys.push_str(&run("ip", &["route"]));
    sys.push_str(&format!(
        "\n/etc/resolv.conf:\n{}\n",
        read("/etc/resolv.conf")
    ));
    sys.push_str(&run("df", &["-h", &cfg.data_dir.display().to_string()]));
    sys.push_str(&run("timedatectl", &["show"]));
    sys.push_str(&format!(
        "\n/proc/meminfo (head):\n{}",
        read("/proc/meminfo")
            .lines()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    ));
    add("system.txt", sys);
    // Last line of defence: no secret this gateway holds, anywhere in the bundle.
    let secrets = secrets(cfg, store);
    for (_, body) in &mut files {
        for s in &secrets {
            let text = String::from_utf8_lossy(body);
            if text.contains(s.as_str()) {
                *body = text.replace(s.as_str(), "<redacted>").into_bytes();
            }
        }
    }
    Contents { files }
}

/// The tar.gz of `contents`, under a directory named `prefix`.
pub fn archive(contents: &Contents, prefix: &str) -> Result<Vec<u8>, BundleError> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let now = u64::try_from(crate::store::now_ms() / 1000).unwrap_or(0);
    for (name, body) in &contents.files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(now);
        h.set_cksum();
        tar.append_data(&mut h, format!("{prefix}/{name}"), body.as_slice())?;
    }
    Ok(tar.into_inner()?.finish()?)
}

/// Sends a bundle up the tunnel in chunks, each acknowledged before the next; returns its id.
pub async fn upload(gw: &crate::Gateway, bytes: &[u8]) -> Result<String, BundleError> {
    use pcg_proto::v1::gateway_frame::Kind as GKind;
    use sha2::Digest as _;
    const CHUNK: usize = 256 * 1024;
    let id = format!("bnd_{}", hex::encode(rand::random::<[u8; 8]>()));
    let sha256 = hex::encode(sha2::Sha256::digest(bytes));
    let mut acks = gw.bundle_acks(&id);
    let result = async {
        let mut offset = 0usize;
        loop {
            let end = (offset + CHUNK).min(bytes.len());
            let tx = gw.outbound().ok_or_else(|| {
                BundleError::Upload(
                    "the tunnel is down; run `pcgctl status`, and try again once it is connected"
                        .into(),
                )
            })?;
            let frame = pcg_proto::v1::GatewayFrame {
                kind: Some(GKind::BundleChunk(pcg_proto::v1::BundleChunk {
                    bundle_id: id.clone(),
                    offset: offset as u64,
                    data: bytes[offset..end].to_vec(),
                    total_size: bytes.len() as u64,
                    sha256: sha256.clone(),
                })),
            };
            tokio::time::timeout(Duration::from_secs(30), tx.send(frame))
                .await
                .map_err(|_| BundleError::Upload("the tunnel does not take data".into()))?
                .map_err(|_| BundleError::Upload("the tunnel closed; try again".into()))?;
            let ack = tokio::time::timeout(Duration::from_secs(60), acks.recv())
                .await
                .map_err(|_| {
                    BundleError::Upload("the SaaS did not acknowledge a chunk within 60 s".into())
                })?
                .ok_or_else(|| BundleError::Upload("the tunnel closed; try again".into()))?;
            if !ack.error.is_empty() {
                return Err(BundleError::Upload(format!(
                    "the SaaS refused it: {}",
                    ack.error
                )));
            }
            if ack.received as usize != end {
                return Err(BundleError::Upload(format!(
                    "the SaaS acknowledged {} bytes, {end} were sent",
                    ack.received
                )));
            }
            offset = end;
            if offset == bytes.len() {
                return Ok(id.clone());
            }
        }
    }
    .await;
    gw.forget_bundle(&id);
    result
}
