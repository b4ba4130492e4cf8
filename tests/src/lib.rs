//! Harness for end-to-end tests and benchmarks: starts real `pcg-saas` and `pcg-gateway`
//! processes on 127.0.0.1 (ports chosen by the kernel), talks to them over REST and pcgctl,
//! and stops them by PID when dropped. Also a TCP relay that can cut connections on demand.
//!
//! The binaries are found next to the test executable's `deps/` directory (`target/debug`), so
//! build them first: `cargo build --bins` (the README's test command does).

#![allow(clippy::unwrap_used)]

pub mod feed;
pub mod machines;
pub mod nats;
pub mod netns;
pub mod openstack_peer;
pub mod peers;
pub mod relay;
pub mod squid;
pub mod vcsim;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// `target/debug` (or wherever the test binary's profile directory is).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PCG_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bins` first",
        p.display()
    );
    p
}

/// A TCP port on 127.0.0.1 free a moment ago (for a server that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// It leads its own process group (spawned through a wrapper): stopping it stops the group.
    pub group: bool,
}

/// Signals the process group led by `pid` (a child spawned with `process_group(0)`), so that
/// what a wrapper (`faketime`) started dies with it.
fn signal_group(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// SIGTERM, then wait (up to 10 s) for a clean exit.
    pub fn stop(&mut self) {
        self.terminate(Duration::from_secs(10));
    }

    /// SIGTERM, then wait up to `within` for the process to exit by itself: how long it took
    /// and its exit status, or None when it had to be killed.
    pub fn terminate(&mut self, within: Duration) -> Option<(Duration, std::process::ExitStatus)> {
        let start = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        // A wrapped child (`faketime pcg-gateway`) leads its own group: its child too.
        if self.group {
            signal_group(self.pid(), rustix::process::Signal::TERM);
        }
        while start.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some((start.elapsed(), st));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if std::mem::take(&mut self.group) {
            signal_group(self.pid(), rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// A running pcg-saas with its data directory.
pub struct Saas {
    pub proc: Proc,
    pub dir: PathBuf,
    pub api: String,
    /// Advertised broker URL (what gateways dial).
    pub broker: String,
    /// Where the broker actually listens.
    pub broker_listen: std::net::SocketAddr,
    pub operator_key: String,
    pub http: reqwest::Client,
    /// The CA certificate the SaaS signs with (its data directory's, or the one it was given).
    pub ca_file: PathBuf,
    /// Where the REST API actually listens.
    pub api_listen: std::net::SocketAddr,
    opts: SaasOptions,
}

#[derive(Default, Clone)]
pub struct SaasOptions {
    pub heartbeat_ms: Option<u64>,
    /// Extra TOML appended to the config file.
    pub extra_toml: String,
    /// Listen address of the public port (default 127.0.0.1:0, a port chosen by the kernel).
    pub api_listen: Option<std::net::SocketAddr>,
    /// A separate broker listener (default: none, the broker shares the public port).
    pub broker_listen: Option<std::net::SocketAddr>,
    /// Run pcg-saas under this descriptor limit (soft and hard), through prlimit.
    pub nofile: Option<u64>,
}

impl Saas {
    pub async fn start(dir: &Path, opts: SaasOptions) -> anyhow::Result<Saas> {
        std::fs::create_dir_all(dir)?;
        let cfg = dir.join("saas.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\napi_listen = \"{}\"\n{}heartbeat_ms = {}\n{}\n",
                dir.join("data"),
                opts.api_listen
                    .map_or("127.0.0.1:0".into(), |a| a.to_string()),
                opts.broker_listen
                    .map(|a| format!("broker_listen = \"{a}\"\n"))
                    .unwrap_or_default(),
                opts.heartbeat_ms.unwrap_or(500),
                opts.extra_toml
            ),
        )?;
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut command = match opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(bin("pcg-saas"));
                c
            }
            None => Command::new(bin("pcg-saas")),
        };
        let child = command
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "PCG_LOG",
                std::env::var("PCG_TEST_SAAS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file(dir, "saas"))
            .spawn()
            .context("spawn pcg-saas")?;
        let mut proc = Proc {
            child,
            name: "pcg-saas".into(),
            group: false,
        };
        // The ready file, or the process's end (a refusal to start) — whichever comes first.
        let deadline = Instant::now() + Duration::from_secs(60);
        let info: Value = loop {
            if let Some(v) = std::fs::read(&ready)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                break v;
            }
            let exited = proc.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                proc.kill();
                let log = std::fs::read_to_string(dir.join("saas.log")).unwrap_or_default();
                match exited {
                    Some(st) => {
                        bail!("pcg-saas exited ({st}) before it was ready; saas log:\n{log}")
                    }
                    None => bail!("pcg-saas wrote no ready file within 60 s; saas log:\n{log}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ca_file = info["ca_file"]
            .as_str()
            .map_or_else(|| dir.join("data/ca.pem"), PathBuf::from);
        let ca = std::fs::read(&ca_file)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(client_tls(&ca))
            .pool_max_idle_per_host(64)
            // The SaaS closes an HTTP/1.1 connection idle for its header timeout (10 s): a
            // connection reused at that instant is reset. Idle ones are dropped well before.
            .pool_idle_timeout(Duration::from_secs(4))
            .timeout(Duration::from_secs(90))
            .build()?;
        Ok(Saas {
            proc,
            dir: dir.to_path_buf(),
            api: info["api"].as_str().unwrap_or_default().to_string(),
            broker: info["broker"][0].as_str().unwrap_or_default().to_string(),
            broker_listen: info["broker_listen"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .context("ready file names no broker_listen")?,
            api_listen: info["api_listen"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .context("ready file names no api_listen")?,
            opts,
            operator_key: std::fs::read_to_string(dir.join("data/operator.key"))?
                .trim()
                .to_string(),
            http,
            ca_file,
        })
    }

    /// Stops this pcg-saas with SIGTERM (waiting up to `within` for it to exit by itself; see
    /// [`Proc::terminate`]) and starts it again on the same data directory and addresses.
    pub async fn restart(
        mut self,
        within: Duration,
    ) -> anyhow::Result<(Saas, Option<(Duration, std::process::ExitStatus)>)> {
        let stopped = self.proc.terminate(within);
        let mut opts = self.opts.clone();
        opts.api_listen = Some(self.api_listen);
        opts.broker_listen = (self.broker_listen != self.api_listen).then_some(self.broker_listen);
        let dir = self.dir.clone();
        drop(self);
        Ok((Saas::start(&dir, opts).await?, stopped))
    }

    /// A REST call with extra headers; returns (status, response headers, JSON body).
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.api))
            .bearer_auth(key);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let h = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, h, v))
    }

    /// A REST call; returns (status, JSON body).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.api))
            .bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, v))
    }

    /// Like [`call`](Self::call), but fails unless the status is 2xx.
    pub async fn ok(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (s, v) = self.call(method, path, key, body).await?;
        if !(200..300).contains(&s) {
            bail!("{method} {path} answered {s}: {v}");
        }
        Ok(v)
    }

    /// Creates a tenant; returns (tenant id, admin API key).
    pub async fn tenant(&self, name: &str) -> anyhow::Result<(String, String)> {
        let v = self
            .ok(
                "POST",
                "/v1/tenants",
                &self.operator_key,
                Some(json!({ "name": name })),
            )
            .await?;
        Ok((
            v["tenant"]["id"].as_str().unwrap_or_default().to_string(),
            v["admin_api_key"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Pairs a new identity directly over the REST API with a fresh key and CSR, as `pcgctl pair`
    /// does; returns (certificate PEM, private key PEM). For tests and the bench that need a real
    /// gateway certificate without a gateway process.
    pub async fn pair_identity(&self, key: &str) -> anyhow::Result<(String, String)> {
        let (_, tok) = self.token(key, None).await?;
        let t = pcg_gateway::PairingToken::decode(&tok)?;
        let kp = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&kp)?
            .pem()?;
        let r: pcg_proto::pairing::PairResponse = self
            .http
            .post(format!("{}/v1/pair", self.api))
            .json(&pcg_proto::pairing::PairRequest {
                token_id: t.token_id,
                secret: t.secret,
                csr_pem: csr,
                hostname: "test".into(),
                gateway_version: "test".into(),
            })
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok((r.certificate_pem, kp.serialize_pem()))
    }

    /// Creates an API key of the caller's tenant; returns (key id, key string).
    pub async fn api_key(&self, key: &str, name: &str) -> anyhow::Result<(String, String)> {
        let v = self
            .ok("POST", "/v1/api-keys", key, Some(json!({ "name": name })))
            .await?;
        Ok((
            v["api_key"]["id"].as_str().unwrap_or_default().to_string(),
            v["key"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Revokes API key `id` with `key`.
    pub async fn revoke_api_key(&self, key: &str, id: &str) -> anyhow::Result<()> {
        self.ok("DELETE", &format!("/v1/api-keys/{id}"), key, None)
            .await
            .map(|_| ())
    }

    /// Creates a pairing token; returns (token id, token string).
    pub async fn token(&self, key: &str, ttl: Option<u64>) -> anyhow::Result<(String, String)> {
        let v = self
            .ok(
                "POST",
                "/v1/pairing-tokens",
                key,
                Some(json!({ "name": "test", "ttl_seconds": ttl })),
            )
            .await?;
        Ok((
            v["pairing_token"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            v["token"].as_str().unwrap_or_default().to_string(),
        ))
    }

    pub async fn submit(
        &self,
        key: &str,
        gw: &str,
        kind: &str,
        payload: Value,
    ) -> anyhow::Result<String> {
        let v = self
            .ok(
                "POST",
                &format!("/v1/gateways/{gw}/commands"),
                key,
                Some(json!({ "kind": kind, "payload": payload })),
            )
            .await?;
        Ok(v["id"].as_str().unwrap_or_default().to_string())
    }

    /// Submits a command and waits for its result in the same request
    /// (`?wait_seconds=`); returns the command as the answer has it.
    pub async fn submit_waiting(
        &self,
        key: &str,
        gw: &str,
        kind: &str,
        payload: Value,
        wait_seconds: u64,
    ) -> anyhow::Result<Value> {
        self.ok(
            "POST",
            &format!("/v1/gateways/{gw}/commands?wait_seconds={wait_seconds}"),
            key,
            Some(json!({ "kind": kind, "payload": payload })),
        )
        .await
    }

    /// Waits (long-polling) until the command is terminal; returns its view.
    pub async fn wait_command(
        &self,
        key: &str,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .ok(
                    "GET",
                    &format!("/v1/commands/{id}?wait_seconds=20"),
                    key,
                    None,
                )
                .await?;
            let st = v["state"].as_str().unwrap_or_default();
            if matches!(st, "succeeded" | "failed" | "cancelled" | "timed_out") {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("command {id} still {st} after {timeout:?}");
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("saas.log")).unwrap_or_default()
    }
}

/// The DER of the first certificate of a PEM file's bytes.
pub fn pem_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .expect("a PEM certificate")
        .to_vec()
}

/// A rustls client config trusting only `ca_pem`.
pub fn client_tls(ca_pem: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.expect("CA PEM")).expect("CA cert");
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// A gateway's data directory, config, and (when running) its process.
pub struct Gw {
    pub dir: PathBuf,
    pub proc: Option<Proc>,
    pub ledger: PathBuf,
    /// Environment given to pcg-gateway and pcgctl (e.g. HTTPS_PROXY, NO_PROXY).
    pub env: Vec<(String, String)>,
}

/// Submits a command while `gw` is stopped and journals it there as running, as if the gateway
/// had died while executing it (fault injection: a kill cannot be timed between the journal and
/// a provider's answer); then starts the gateway, which executes it as recovered, and returns
/// the command as the SaaS has it once it ended.
pub async fn resumed_after_a_restart(
    saas: &Saas,
    gw: &mut Gw,
    key: &str,
    gw_id: &str,
    kind: &str,
    payload: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use pcg_gateway::store::{now_ms, EntryState, JournalEntry, Store};
    if let Some(p) = gw.proc.as_mut() {
        p.stop();
    }
    let id = saas.submit(key, gw_id, kind, payload.clone()).await?;
    {
        let store = Store::open(&gw.dir.join("data"))?;
        let entry = JournalEntry {
            id: id.clone(),
            kind: kind.into(),
            payload,
            state: EntryState::Running,
            received_ms: now_ms(),
            result: None,
            acked_ms: None,
            deadline_ms: None,
        };
        anyhow::ensure!(store.begin(&entry)?.is_none(), "{id} was journaled already");
        store.flush().await?;
    }
    gw.start()?;
    saas.wait_command(key, &id, Duration::from_secs(200)).await
}

impl Gw {
    pub fn new(dir: &Path) -> anyhow::Result<Gw> {
        Self::with_config(dir, "")
    }

    /// A gateway whose config file also holds `extra_toml`.
    pub fn with_config(dir: &Path, extra_toml: &str) -> anyhow::Result<Gw> {
        std::fs::create_dir_all(dir)?;
        let ledger = dir.join("ledger.txt");
        std::fs::write(
            dir.join("gateway.toml"),
            format!(
                "data_dir = {:?}\nbackoff_base_ms = 50\nbackoff_cap_ms = 1000\nconnect_timeout_ms = 3000\nledger_path = {:?}\n{extra_toml}\n",
                dir.join("data"),
                ledger
            ),
        )?;
        Ok(Gw {
            dir: dir.to_path_buf(),
            proc: None,
            ledger,
            env: Vec::new(),
        })
    }

    /// A gateway in `dir` (its config also holding `extra_toml`), paired with `token` and its
    /// daemon started (not waited for).
    pub fn paired_and_started(dir: &Path, extra_toml: &str, token: &str) -> anyhow::Result<Gw> {
        let mut gw = Gw::with_config(dir, extra_toml)?;
        gw.pair(token)?;
        gw.start()?;
        Ok(gw)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    /// Runs pcgctl with this gateway's config; returns (success, stdout, stderr).
    pub fn pcgctl(&self, args: &[&str]) -> (bool, String, String) {
        let (code, out, err) = self.pcgctl_via(&[], args);
        (code == Some(0), out, err)
    }

    /// Runs pcgctl with this gateway's config behind `prefix` (e.g. `ip netns exec NS`, or
    /// `faketime -f +120s`); returns (exit code, stdout, stderr).
    pub fn pcgctl_via(&self, prefix: &[String], args: &[&str]) -> (Option<i32>, String, String) {
        let mut command = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("pcgctl"));
                c
            }
            None => Command::new(bin("pcgctl")),
        };
        let out = command
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run pcgctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs pcgctl; returns (exit code, stdout, stderr).
    pub fn pcgctl_code(&self, args: &[&str]) -> (Option<i32>, String, String) {
        self.pcgctl_via(&[], args)
    }

    /// `pcgctl diag --json` with `args`, behind `prefix`: its exit code and report.
    pub fn diag(&self, prefix: &[String], args: &[&str]) -> (Option<i32>, Value) {
        let mut all = vec!["diag", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.pcgctl_via(prefix, &all);
        let report = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("pcgctl diag printed no JSON report ({e}), exit {code:?}:\n{out}\n{err}")
        });
        (code, report)
    }

    pub fn pair(&self, token: &str) -> anyhow::Result<()> {
        let (ok, out, err) = self.pcgctl(&["pair", token]);
        if !ok {
            bail!("pcgctl pair failed: {err}{out}");
        }
        Ok(())
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        self.start_in(None)
    }

    /// Starts pcg-gateway inside the network namespace `netns` (`ip netns exec`), or here.
    pub fn start_in(&mut self, netns: Option<&str>) -> anyhow::Result<()> {
        let prefix: Vec<String> = netns
            .map(|ns| vec!["ip".into(), "netns".into(), "exec".into(), ns.into()])
            .unwrap_or_default();
        self.start_via(&prefix)
    }

    /// Starts pcg-gateway behind `prefix` (e.g. `ip netns exec NS`, or `faketime -f +120s`).
    pub fn start_via(&mut self, prefix: &[String]) -> anyhow::Result<()> {
        let mut command = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("pcg-gateway"));
                // Its own process group: a wrapper that forks (faketime) is stopped with what
                // it started.
                std::os::unix::process::CommandExt::process_group(&mut c, 0);
                c
            }
            None => Command::new(bin("pcg-gateway")),
        };
        let child = command
            .args(["run", "--config"])
            .arg(self.config())
            .env("PCG_LOG", "info")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("gateway.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .context("spawn pcg-gateway")?;
        self.proc = Some(Proc {
            child,
            name: "pcg-gateway".into(),
            group: !prefix.is_empty(),
        });
        Ok(())
    }

    /// `pcgctl status --json`, parsed (its exit status says connected or not; the JSON is
    /// printed either way).
    pub fn status(&self) -> Option<Value> {
        let (_, out, _) = self.pcgctl(&["status", "--json"]);
        serde_json::from_str(&out).ok()
    }

    pub async fn wait_tunnel(&self, state: &str, timeout: Duration) -> anyhow::Result<Value> {
        let r = wait_for(&format!("tunnel state {state}"), timeout, || async {
            self.status().filter(|s| s["tunnel"]["state"] == state)
        })
        .await;
        r.map_err(|e| {
            anyhow::anyhow!(
                "{e}; last status: {:?}; gateway log:\n{}",
                self.pcgctl(&["status", "--json"]),
                self.log()
            )
        })
    }

    pub fn gateway_id(&self) -> Option<String> {
        self.status()
            .and_then(|s| s["gateway_id"].as_str().map(str::to_string))
    }

    /// Ledger lines as command ids.
    pub fn ledger_ids(&self) -> Vec<String> {
        std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').next().map(str::to_string))
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }
}

/// A pcg-saas started with `opts`, a tenant, and one gateway paired with a token of that tenant
/// and connected: `(saas, gateway, tenant API key, gateway id)`.
pub async fn paired(dir: &Path, opts: SaasOptions) -> anyhow::Result<(Saas, Gw, String, String)> {
    paired_with(dir, opts, "").await
}

/// As [`paired`], the gateway's config file also holding `gw_toml`.
pub async fn paired_with(
    dir: &Path,
    opts: SaasOptions,
    gw_toml: &str,
) -> anyhow::Result<(Saas, Gw, String, String)> {
    let saas = Saas::start(&dir.join("saas"), opts).await?;
    let (_tenant, key) = saas.tenant("acme").await?;
    let (_, token) = saas.token(&key, None).await?;
    let gw = Gw::paired_and_started(&dir.join("gw"), gw_toml, &token)?;
    gw.wait_tunnel("connected", Duration::from_secs(20)).await?;
    let id = gw.gateway_id().context("the gateway reports no id")?;
    Ok((saas, gw, key, id))
}

/// Files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if let Ok(bytes) = std::fs::read(&p) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(p);
            }
        }
    }
    hits
}

/// A temporary directory for one test; kept (and its path printed) when `PCG_KEEP_TEST_DIRS`
/// is set, so logs can be read after a failure.
pub fn test_dir() -> tempfile::TempDir {
    let mut d = tempfile::Builder::new()
        .prefix("pcg-e2e-")
        .tempdir()
        .expect("temporary directory");
    if std::env::var_os("PCG_KEEP_TEST_DIRS").is_some() {
        d.disable_cleanup(true);
        eprintln!("test directory kept: {}", d.path().display());
    }
    d
}

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "96m") at `at` (needs root).
    pub fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }

    /// A tmpfs for a test at `at`; `None` (the test skips, saying why) where none can be
    /// mounted, unless `PCG_REQUIRE_PEERS` is set, which fails instead.
    pub fn for_test(at: &Path, size: &str) -> Option<Tmpfs> {
        match Tmpfs::mount(at, size) {
            Ok(t) => Some(t),
            Err(why) => {
                assert!(
                    std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
                    "cannot mount a tmpfs ({why}) and PCG_REQUIRE_PEERS is set: run the tests as root"
                );
                eprintln!("!!!!!!!! SKIPPED: this test needs a tmpfs (root): {why} !!!!!!!!");
                None
            }
        }
    }

    /// Fills the filesystem with the file `name` under the mount point, to the last byte;
    /// returns its path (remove it to make room again).
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write as _;
        let path = self.0.join(name);
        let mut f = std::fs::File::create(&path).expect("create the filler file");
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[1u8]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
