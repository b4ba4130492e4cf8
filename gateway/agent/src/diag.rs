//! `pcgctl diag`: walks the path from this gateway to the SaaS hop by hop, and checks every
//! provider endpoint enrolled on it, reporting each check as ok / warn / fail (with the action to
//! take) or skipped (with why).
//!
//! The same code runs inside the daemon (admin request `Diag`: it holds the store) and inside
//! pcgctl when the daemon is stopped (it opens the store itself). The checks, in order:
//!
//! - **store**: the store opens and takes a write (flushed); free space on its filesystem.
//! - **identity**: paired, not revoked, the certificate valid now (days left; a warning once
//!   renewal is overdue), issued by the stored SaaS CA (whose SHA-256 is the pin), the stored key
//!   is the certificate's.
//! - for each SaaS host (the API URL and every broker endpoint): **dns** (the proxy's host when a
//!   proxy applies), **tcp** (directly, or the proxy's answer to `CONNECT`), **tls** (the chain
//!   presented vs the pinned CA, so an intercepting proxy is named; ALPN h2 on broker ports), all
//!   through the pieces the tunnel dials with ([`crate::transport`]).
//! - **websocket**: the WebSocket transport, when it is configured or when the direct path is
//!   broken in a way it may get around.
//! - **clock**: the SaaS's `Date` header against this host's clock ([`CLOCK_WARN`],
//!   [`CLOCK_FAIL`]).
//! - **broker**: the broker accepts this gateway's certificate (`Broker.Check`, which leaves a
//!   live tunnel alone).
//! - **vcenter**, **openstack**, **bmc**: each enrolled endpoint is reachable, its TLS pin or CA
//!   matches (the presented thumbprint is named when not), and it accepts the credentials (a
//!   vCenter login, a Keystone token, a BMC session), each with a fresh login.
//!
//! A check whose prerequisite failed is `skipped`, never `fail`, so one fault is named once.
//! Every check is bounded by its own timeout and the whole run by a total bound; independent
//! checks run concurrently. Exit status of `pcgctl diag`: 0 all ok, 1 a warning, 2 a failure.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::TransportMode;
use crate::store::{now_ms, Identity, Store};
use crate::transport::{DialError, Dialer, Target, Transport};
use crate::Config;

/// Clock skew from the SaaS at or above which the clock check warns: a host whose time is
/// synchronised (NTP) is within milliseconds, so seconds mean it is not, and times in events,
/// logs and command records of both sides stop lining up.
pub const CLOCK_WARN: Duration = Duration::from_secs(5);
/// Clock skew at or above which the clock check fails: a clock already a minute off drifts
/// unsynchronised and will break what depends on time (certificate validity — gateway
/// certificates are backdated by only 10 minutes —, pairing-token expiry, renewal times).
pub const CLOCK_FAIL: Duration = Duration::from_secs(60);
/// Free space under the data directory below which the store check fails.
pub const DISK_FAIL_BYTES: u64 = 64 << 20;
/// Free space below which it warns (also below [`DISK_WARN_PERCENT`] of the filesystem).
pub const DISK_WARN_BYTES: u64 = 512 << 20;
pub const DISK_WARN_PERCENT: u64 = 5;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not run: a prerequisite failed (the detail says which), or the run's total bound passed.
    Skipped,
}

/// The hop (or provider endpoint kind) a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    Store,
    Identity,
    Dns,
    Tcp,
    Tls,
    Websocket,
    Clock,
    Broker,
    Vcenter,
    Openstack,
    Bmc,
}

impl Hop {
    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Store => "store",
            Hop::Identity => "identity",
            Hop::Dns => "dns",
            Hop::Tcp => "tcp",
            Hop::Tls => "tls",
            Hop::Websocket => "websocket",
            Hop::Clock => "clock",
            Hop::Broker => "broker",
            Hop::Vcenter => "vcenter",
            Hop::Openstack => "openstack",
            Hop::Bmc => "bmc",
        }
    }
}

/// One check of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub hop: Hop,
    /// What was checked: a directory, a host, `host:port`, a URL, an enrolled name.
    pub target: String,
    pub status: Status,
    /// What was found (for `skipped`: why the check did not run).
    pub detail: String,
    /// What to do, for `warn` and `fail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    pub elapsed_ms: u64,
}

/// Bounds of a run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Options {
    /// Bound of each check, milliseconds.
    pub check_timeout_ms: u64,
    /// Bound of the whole run, milliseconds.
    pub total_timeout_ms: u64,
}

impl Options {
    /// The bounds of the diagnosis a support bundle carries: shorter than an operator's run, so
    /// that a silent endpoint costs a bundle seconds, not a minute.
    pub fn for_bundle() -> Options {
        Options {
            check_timeout_ms: 5_000,
            total_timeout_ms: 20_000,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            check_timeout_ms: 10_000,
            total_timeout_ms: 60_000,
        }
    }
}

/// What `pcgctl diag` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    /// `daemon` (the running daemon ran the checks) or `pcgctl` (the daemon was stopped).
    pub ran_in: String,
    pub started_unix_ms: i64,
    pub elapsed_ms: u64,
    pub check_timeout_ms: u64,
    pub total_timeout_ms: u64,
    /// The worst outcome: `fail`, else `warn`, else `ok`.
    pub status: Status,
    /// 0 all ok, 1 a warning, 2 a failure.
    pub exit_code: u8,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(
        ran_in: &str,
        started_ms: i64,
        elapsed: Duration,
        opts: Options,
        checks: Vec<Check>,
    ) -> Self {
        let status = if checks.iter().any(|c| c.status == Status::Fail) {
            Status::Fail
        } else if checks.iter().any(|c| c.status == Status::Warn) {
            Status::Warn
        } else {
            Status::Ok
        };
        Report {
            version: crate::VERSION.to_string(),
            ran_in: ran_in.to_string(),
            started_unix_ms: started_ms,
            elapsed_ms: millis(elapsed),
            check_timeout_ms: opts.check_timeout_ms,
            total_timeout_ms: opts.total_timeout_ms,
            exit_code: match status {
                Status::Fail => 2,
                Status::Warn => 1,
                _ => 0,
            },
            status,
            checks,
        }
    }

    /// The human rendering: one line per check (status, hop, target, detail), the action on the
    /// line below for warnings and failures, and a summary.
    pub fn render(&self) -> String {
        let who = if self.ran_in == "daemon" {
            "by the running daemon"
        } else {
            "by pcgctl (the daemon is not running)"
        };
        let mut out = format!(
            "pcg gateway {} diagnostics, run {who} in {} (each check bounded by {}, the run by {})\n",
            self.version,
            secs(self.elapsed_ms),
            secs(self.check_timeout_ms),
            secs(self.total_timeout_ms),
        );
        for c in &self.checks {
            let label = match c.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skipped => "skip",
            };
            let slow = if c.elapsed_ms >= 1000 {
                format!(" ({})", secs(c.elapsed_ms))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "  {label:<5} {:<10} {} — {}{slow}\n",
                c.hop.as_str(),
                c.target,
                c.detail
            ));
            if let (Some(a), Status::Warn | Status::Fail) = (&c.action, c.status) {
                out.push_str(&format!("  {:<16} → {a}\n", ""));
            }
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        out.push_str(&format!(
            "result: {}, {}, {} ok, {} skipped — exit status {}\n",
            plural(count(Status::Fail), "failure", "failures"),
            plural(count(Status::Warn), "warning", "warnings"),
            count(Status::Ok),
            count(Status::Skipped),
            self.exit_code
        ));
        out
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `420 ms`, `1.4 s`, `12 s`.
fn secs(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 10_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} s", ms / 1000)
    }
}

/// Human size: `12.3 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The first 16 hex digits of a SHA-256, for people.
fn short(sha_hex: &str) -> String {
    format!("{}…", &sha_hex[..sha_hex.len().min(16)])
}

/// What a check found.
struct Finding {
    status: Status,
    detail: String,
    action: Option<String>,
}

fn ok(detail: impl Into<String>) -> Finding {
    Finding {
        status: Status::Ok,
        detail: detail.into(),
        action: None,
    }
}

fn warn(detail: impl Into<String>, action: impl Into<String>) -> Finding {
    Finding {
        status: Status::Warn,
        detail: detail.into(),
        action: Some(action.into()),
    }
}

fn fail(detail: impl Into<String>, action: impl Into<String>) -> Finding {
    Finding {
        status: Status::Fail,
        detail: detail.into(),
        action: Some(action.into()),
    }
}

fn skipped(hop: Hop, target: impl Into<String>, why: impl Into<String>) -> Check {
    Check {
        hop,
        target: target.into(),
        status: Status::Skipped,
        detail: why.into(),
        action: None,
        elapsed_ms: 0,
    }
}

/// A run's bounds and what it reads.
struct Ctx<'a> {
    cfg: &'a Config,
    check_timeout: Duration,
    total: Duration,
    deadline: Instant,
}

impl Ctx<'_> {
    /// Runs one check within its bound (its own timeout, cut short by the run's deadline).
    /// `body` yields the finding and what dependent checks need (`None` when they cannot run);
    /// a check that timed out yields `None`.
    async fn bounded<T>(
        &self,
        hop: Hop,
        target: &str,
        on_timeout: impl FnOnce(Duration) -> Finding,
        body: impl Future<Output = (Finding, Option<T>)>,
    ) -> (Check, Option<T>) {
        let start = Instant::now();
        let remaining = self.deadline.saturating_duration_since(start);
        if remaining.is_zero() {
            return (
                skipped(
                    hop,
                    target,
                    format!(
                        "not started: the run's total bound of {} was reached",
                        secs(millis(self.total))
                    ),
                ),
                None,
            );
        }
        let bound = self.check_timeout.min(remaining);
        let (finding, value) = match tokio::time::timeout(bound, body).await {
            Ok(r) => r,
            Err(_) => {
                let mut f = on_timeout(bound);
                if bound < self.check_timeout {
                    f.detail.push_str(&format!(
                        " (cut short by the run's total bound of {})",
                        secs(millis(self.total))
                    ));
                }
                (f, None)
            }
        };
        (
            Check {
                hop,
                target: target.to_string(),
                status: finding.status,
                detail: finding.detail,
                action: finding.action,
                elapsed_ms: millis(start.elapsed()),
            },
            value,
        )
    }

    /// The bound a dialer's own steps get: a little under the check's, so its precise error
    /// (which names the step) normally wins over the check's generic timeout.
    fn step_timeout(&self) -> Duration {
        (self.check_timeout * 9 / 10).max(Duration::from_millis(100))
    }
}

/// Runs every check. `store` is the gateway's store, or why it could not be opened.
pub async fn run(
    cfg: &Config,
    store: Result<&Store, String>,
    opts: Options,
    ran_in: &str,
) -> Report {
    let started_ms = now_ms();
    let start = Instant::now();
    let ctx = Ctx {
        cfg,
        check_timeout: Duration::from_millis(opts.check_timeout_ms.max(1)),
        total: Duration::from_millis(opts.total_timeout_ms.max(1)),
        deadline: start + Duration::from_millis(opts.total_timeout_ms.max(1)),
    };
    let mut checks = Vec::new();
    let data_dir = cfg.data_dir.display().to_string();
    let store = match store {
        Ok(s) => {
            let (c, _) = ctx
                .bounded(
                    Hop::Store,
                    &data_dir,
                    |b| {
                        fail(
                            format!("a write to the store did not finish within {}", secs(millis(b))),
                            "check the disk under the data directory (a hung or very slow filesystem)",
                        )
                    },
                    check_store(cfg, s),
                )
                .await;
            checks.push(c);
            Some(s)
        }
        Err(e) => {
            let space = disk_space(cfg);
            checks.push(Check {
                hop: Hop::Store,
                target: data_dir.clone(),
                status: Status::Fail,
                detail: format!("cannot open the store: {e}; {}", space_text(&space)),
                action: Some(match space {
                    Ok((free, _)) if free < DISK_FAIL_BYTES => free_space_action(cfg),
                    _ => format!(
                        "check the disk and permissions of {data_dir} (owner: the gateway's service user); if the daemon is starting, try again in a moment"
                    ),
                }),
                elapsed_ms: 0,
            });
            None
        }
    };
    let Some(store) = store else {
        for (hop, target) in [(Hop::Identity, "this gateway"), (Hop::Dns, "the SaaS")] {
            checks.push(skipped(
                hop,
                target,
                "needs the store, which cannot be opened (see store)",
            ));
        }
        return Report::new(ran_in, started_ms, start.elapsed(), opts, checks);
    };
    let (id_check, ident) = ctx
        .bounded(
            Hop::Identity,
            "this gateway",
            |b| {
                fail(
                    format!(
                        "reading the identity did not finish within {}",
                        secs(millis(b))
                    ),
                    "check the disk under the data directory",
                )
            },
            async { check_identity(store) },
        )
        .await;
    // A failed identity still names the SaaS and its CA: the path is walked all the same (the
    // broker check, which needs a usable certificate, is skipped).
    let ident = ident.or_else(|| read_for_path(store));
    let target = ident
        .as_ref()
        .map(|i| format!("gateway {}", i.identity.gateway_id))
        .unwrap_or_else(|| "this gateway".into());
    checks.push(Check { target, ..id_check });
    let (saas, providers) = tokio::join!(
        async {
            match &ident {
                Some(i) => saas_path(&ctx, store, i).await,
                None => vec![skipped(
                    Hop::Dns,
                    "the SaaS",
                    "not paired: nothing to reach yet (see identity)",
                )],
            }
        },
        providers(&ctx, store)
    );
    checks.extend(saas);
    checks.extend(providers);
    Report::new(ran_in, started_ms, start.elapsed(), opts, checks)
}

/// The daemon's run (admin request `Diag`).
pub async fn run_in_daemon(gw: &crate::Gateway, opts: Options) -> Report {
    run(&gw.cfg, Ok(&gw.store), opts, "daemon").await
}

// --- store -------------------------------------------------------------------------------------

/// Free and total bytes of the filesystem holding the data directory.
fn disk_space(cfg: &Config) -> Result<(u64, u64), String> {
    rustix::fs::statvfs(&cfg.data_dir)
        .map(|s| {
            (
                s.f_bavail.saturating_mul(s.f_frsize),
                s.f_blocks.saturating_mul(s.f_frsize),
            )
        })
        .map_err(|e| e.to_string())
}

fn space_text(space: &Result<(u64, u64), String>) -> String {
    match space {
        Ok((free, total)) => format!(
            "{} free of {} ({}%)",
            bytes(*free),
            bytes(*total),
            if *total == 0 { 0 } else { free * 100 / total }
        ),
        Err(e) => format!("free space unknown ({e})"),
    }
}

fn free_space_action(cfg: &Config) -> String {
    format!(
        "free space on the filesystem of {} (or move data_dir to a larger one): the store needs room for its journal and outbox, and nothing is acknowledged that cannot be written",
        cfg.data_dir.display()
    )
}

async fn check_store(cfg: &Config, store: &Store) -> (Finding, Option<()>) {
    let space = disk_space(cfg);
    let probe = store.probe().await;
    let dir = cfg.data_dir.display();
    let free_text = space_text(&space);
    let free_action = free_space_action(cfg);
    if let Err(e) = probe {
        let action = match &space {
            Ok((free, _)) if *free < DISK_FAIL_BYTES => free_action,
            _ => format!("check the disk and the permissions of {dir}"),
        };
        return (
            fail(
                format!("opened, but a write failed: {e}; {free_text}"),
                action,
            ),
            None,
        );
    }
    match space {
        Ok((free, _)) if free < DISK_FAIL_BYTES => (
            fail(
                format!(
                    "opened and written, but only {free_text} (at least {} are needed)",
                    bytes(DISK_FAIL_BYTES)
                ),
                free_action,
            ),
            None,
        ),
        Ok((free, total)) if free < DISK_WARN_BYTES || free * 100 < total * DISK_WARN_PERCENT => (
            warn(
                format!("opened and written; disk almost full: {free_text}"),
                free_action,
            ),
            Some(()),
        ),
        _ => (ok(format!("opened and written; {free_text}")), Some(())),
    }
}

// --- identity ----------------------------------------------------------------------------------

/// This gateway's identity as the SaaS path checks need it.
struct Ident {
    identity: Identity,
    /// SHA-256 of the stored SaaS CA: the pin.
    pin: [u8; 32],
    ca: CertificateDer<'static>,
    /// Certificate chain and key, when both are usable (the identity check passed or warned).
    client: Option<Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>>,
}

/// The stored identity with the CA readable (enough to walk the path), whatever else is wrong.
fn read_for_path(store: &Store) -> Option<Ident> {
    let identity = store.identity().ok().flatten()?;
    let ca = CertificateDer::from_pem_slice(identity.ca_pem.as_bytes()).ok()?;
    Some(Ident {
        pin: crate::transport::dial::sha256(ca.as_ref()),
        ca,
        identity,
        client: None,
    })
}

fn check_identity(store: &Store) -> (Finding, Option<Ident>) {
    let repair = "pair again with a new token from your SaaS tenant: pcgctl pair --force TOKEN";
    let identity = match store.identity() {
        Err(e) => return (fail(format!("cannot read the identity: {e}"), repair), None),
        Ok(None) => {
            return (
                fail(
                    "not paired",
                    "pair the gateway with a token from your SaaS tenant: pcgctl pair TOKEN",
                ),
                None,
            )
        }
        Ok(Some(i)) => i,
    };
    if let Some(why) = &identity.revoked {
        return (
            fail(format!("the SaaS refused this identity: {why}"), repair),
            None,
        );
    }
    let Ok(ca) = CertificateDer::from_pem_slice(identity.ca_pem.as_bytes()) else {
        return (fail("the stored SaaS CA is unreadable", repair), None);
    };
    let pin = crate::transport::dial::sha256(ca.as_ref());
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes()).collect() {
            Ok(c) => c,
            Err(e) => {
                return (
                    fail(format!("the stored certificate is unreadable: {e}"), repair),
                    None,
                )
            }
        };
    let Some(leaf) = chain.first().cloned() else {
        return (fail("the stored certificate is empty", repair), None);
    };
    let Ok((not_before, not_after)) = crate::pairing::cert_validity_ms(leaf.as_ref()) else {
        return (fail("the stored certificate is unreadable", repair), None);
    };
    let now = now_ms();
    let when = |ms: i64| crate::status::rfc3339(ms);
    let ca_text = format!("SaaS CA pinned, SHA-256 {}", short(&hex::encode(pin)));
    if now >= not_after {
        return (
            fail(
                format!(
                    "the certificate expired at {} ({} ago); an expired certificate cannot be renewed over the tunnel",
                    when(not_after),
                    span(now - not_after)
                ),
                repair,
            ),
            None,
        );
    }
    if now < not_before {
        return (
            fail(
                format!(
                    "the certificate is not valid before {} (in {}): this host's clock is behind",
                    when(not_before),
                    span(not_before - now)
                ),
                "set this host's clock right (enable time synchronisation, e.g. systemd-timesyncd or chrony)",
            ),
            None,
        );
    }
    // Issued by the stored CA, for client authentication.
    if let Err(e) = verify_client_cert(&ca, &chain) {
        return (
            fail(
                format!("the certificate was not issued by the stored SaaS CA ({ca_text}): {e}"),
                repair,
            ),
            None,
        );
    }
    let key = match store
        .unseal(&identity.key_sealed)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            let pem = String::from_utf8(pem).map_err(|_| "not UTF-8".to_string())?;
            let kp = rcgen::KeyPair::from_pem(&pem).map_err(|e| e.to_string())?;
            let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
            Ok((kp, der))
        }) {
        Ok(k) => k,
        Err(e) => {
            return (
                fail(
                    format!("the stored private key cannot be used: {e}"),
                    repair,
                ),
                None,
            )
        }
    };
    let matches = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.0.public_key_raw())
        .unwrap_or(false);
    if !matches {
        return (
            fail(
                "the stored private key is not the certificate's (was secret.key or the store replaced?)",
                repair,
            ),
            None,
        );
    }
    let ident = Ident {
        pin,
        ca,
        client: Some(Arc::new((chain, key.1))),
        identity,
    };
    let id = &ident.identity;
    let left = not_after - now;
    let start = if id.cert_received_ms > 0 {
        id.cert_received_ms
    } else {
        not_before
    };
    let lifetime = (not_after - start).max(1);
    let detail = format!(
        "gateway {} of tenant {}; certificate valid until {} ({} left); {ca_text}",
        id.gateway_id,
        id.tenant_id,
        when(not_after),
        span(left)
    );
    // Renewal is due at two thirds of the lifetime; with under a quarter left it is overdue.
    if left * 4 < lifetime {
        return (
            warn(
                format!("{detail}; renewal is overdue (it is due at two thirds of the lifetime)"),
                "the certificate is renewed over the tunnel: start the daemon and check the tunnel (see the broker check and pcgctl status); if it expires, pair again",
            ),
            Some(ident),
        );
    }
    (ok(detail), Some(ident))
}

/// Whether `chain` is a client certificate issued by `ca`, valid now.
fn verify_client_cert(
    ca: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("the CA is unusable: {e}"))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
    verifier
        .verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `3 days`, `5 h`, `12 min`, `40 s`.
fn span(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

// --- the path to the SaaS ----------------------------------------------------------------------

/// A SaaS host and port and what it serves.
struct Endpoint {
    /// The first endpoint is the REST API's (which also has the WebSocket way in).
    target: Target,
    /// Broker endpoint URLs served here.
    brokers: Vec<String>,
}

/// What the walk to one endpoint found.
#[derive(Default)]
struct PathState {
    tcp_ok: bool,
    tls_ok: bool,
    /// The direct TLS failure, when it was one of the path itself (interception, no HTTP/2,
    /// handshakes cut or stalled).
    path_failure: Option<DialError>,
}

async fn saas_path(ctx: &Ctx<'_>, store: &Store, id: &Ident) -> Vec<Check> {
    let mut checks = Vec::new();
    let api_target = match Target::from_url(&id.identity.api_url) {
        Ok(t) => t,
        Err(e) => {
            checks.push(Check {
                hop: Hop::Dns,
                target: id.identity.api_url.clone(),
                status: Status::Fail,
                detail: e.to_string(),
                action: Some("pair again with a token for the right SaaS URL".into()),
                elapsed_ms: 0,
            });
            return checks;
        }
    };
    let mut endpoints = vec![Endpoint {
        target: api_target.clone(),
        brokers: Vec::new(),
    }];
    for url in &id.identity.broker_endpoints {
        match Target::from_url(url) {
            Ok(t) => match endpoints.iter_mut().find(|e| e.target == t) {
                Some(e) => e.brokers.push(url.clone()),
                None => endpoints.push(Endpoint {
                    target: t,
                    brokers: vec![url.clone()],
                }),
            },
            Err(e) => checks.push(Check {
                hop: Hop::Broker,
                target: url.clone(),
                status: Status::Fail,
                detail: e.to_string(),
                action: Some("pair again: the broker endpoints come with the certificate".into()),
                elapsed_ms: 0,
            }),
        }
    }
    let dialer = match crate::transport::dialer(ctx.cfg, store, id.pin, Some(id.ca.clone()), None) {
        Ok(mut d) => {
            d.timeout = ctx.step_timeout();
            d
        }
        Err(e) => {
            checks.push(Check {
                hop: Hop::Tcp,
                target: api_target.authority(),
                status: Status::Fail,
                detail: format!("the proxy settings are not usable: {e}"),
                action: Some(
                    "fix the proxy (pcgctl proxy set, the proxy and proxy_ca keys, HTTPS_PROXY)"
                        .into(),
                ),
                elapsed_ms: 0,
            });
            return checks;
        }
    };
    let mode = ctx.cfg.transport;
    // Each endpoint's dns → tcp → tls, all endpoints at once.
    let walks = futures_util::future::join_all(
        endpoints
            .iter()
            .map(|ep| walk(ctx, &dialer, ep, mode == TransportMode::Websocket)),
    )
    .await;
    let mut states = Vec::new();
    for (c, s) in walks {
        checks.extend(c);
        states.push(s);
    }
    let api_state = &states[0];
    // The WebSocket transport: configured, or what auto falls back to when the direct path is
    // broken (and it could get around it: an interception it can pass needs proxy_ca).
    let needs_ws = match mode {
        TransportMode::Websocket => true,
        TransportMode::Direct => false,
        TransportMode::Auto => states.iter().any(|s| {
            s.path_failure.as_ref().is_some_and(|e| {
                !matches!(e, DialError::Intercepted { .. }) || ctx.cfg.proxy_ca.is_some()
            })
        }),
    };
    let ws_target = format!("wss://{}{}", api_target.authority(), pcg_proto::ws::PATH);
    let mut ws_ok = false;
    if needs_ws {
        if api_state.tcp_ok {
            let (c, v) = ctx
                .bounded(
                    Hop::Websocket,
                    &ws_target,
                    |b| fail(format!("the WebSocket transport did not connect within {}", secs(millis(b))), "a proxy may hold the upgrade or the inner handshake: check its logs"),
                    async {
                        match dialer.dial(&api_target, Transport::Websocket, &[b"h2"]).await {
                            Ok(d) => (
                                ok(format!(
                                    "TLS inside the WebSocket reaches the SaaS with the pinned CA{}; ALPN h2{}",
                                    crate::transport::through(&d.via),
                                    if mode == TransportMode::Auto {
                                        " — the tunnel uses this transport while the direct path is broken"
                                    } else {
                                        ""
                                    }
                                )),
                                Some(()),
                            ),
                            Err(e) => (dial_finding(&e), None),
                        }
                    },
                )
                .await;
            ws_ok = v.is_some();
            checks.push(c);
        } else {
            checks.push(skipped(
                Hop::Websocket,
                &ws_target,
                format!("needs TCP to {} (see tcp)", api_target.authority()),
            ));
        }
    }
    // The clock, from the Date header of the API's /healthz.
    let api_path = if api_state.tls_ok {
        Some(Transport::Direct)
    } else if ws_ok {
        Some(Transport::Websocket)
    } else {
        None
    };
    let api_auth = api_target.authority();
    match api_path {
        None => checks.push(skipped(
            Hop::Clock,
            &api_auth,
            format!("needs a working TLS path to {api_auth} (see tls)"),
        )),
        Some(t) => {
            let (c, _) = ctx
                .bounded(
                    Hop::Clock,
                    &api_auth,
                    |b| {
                        fail(
                            format!("GET /healthz was not answered within {}", secs(millis(b))),
                            "the SaaS may be overloaded; try again, and check its status",
                        )
                    },
                    check_clock(&dialer, &api_target, t),
                )
                .await;
            checks.push(c);
        }
    }
    // The broker accepts the certificate: one check per broker endpoint.
    let client_dialer = id.client.as_ref().map(|c| Dialer {
        client: Some(c.clone()),
        ..dialer.clone()
    });
    let mut broker_checks = Vec::new();
    for (ep, state) in endpoints.iter().zip(&states) {
        for url in &ep.brokers {
            let path = if state.tls_ok {
                Some((ep.target.clone(), Transport::Direct))
            } else if ws_ok {
                // The WebSocket way in is on the public (API) port, as the tunnel dials it.
                Some((api_target.clone(), Transport::Websocket))
            } else {
                None
            };
            broker_checks.push((url.clone(), ep.target.authority(), path));
        }
    }
    let brokers = futures_util::future::join_all(broker_checks.into_iter().map(|(url, auth, path)| {
        let client_dialer = client_dialer.clone();
        async move {
            let Some(d) = client_dialer else {
                return skipped(Hop::Broker, &url, "needs a valid identity (see identity)");
            };
            let Some((target, transport)) = path else {
                return skipped(
                    Hop::Broker,
                    &url,
                    format!("needs a working TLS path to {auth} (see tls)"),
                );
            };
            ctx.bounded(
                Hop::Broker,
                &url,
                |b| fail(format!("the broker did not answer within {}", secs(millis(b))), "the broker may be overloaded or stopping; try again, and check the SaaS's status"),
                check_broker(ctx, d, target, transport, &id.identity),
            )
            .await
            .0
        }
    }))
    .await;
    checks.extend(brokers);
    checks
}

/// dns → tcp → tls to one endpoint.
async fn walk(
    ctx: &Ctx<'_>,
    dialer: &Dialer,
    ep: &Endpoint,
    websocket_only: bool,
) -> (Vec<Check>, PathState) {
    let mut checks = Vec::new();
    let mut state = PathState::default();
    let t = &ep.target;
    let auth = t.authority();
    let proxy = dialer.proxies.for_host(&t.host).cloned();
    // dns
    let (c, addrs) = ctx
        .bounded(
            Hop::Dns,
            &t.host,
            |b| {
                fail(
                    format!("the resolver did not answer within {}", secs(millis(b))),
                    "check that the resolvers in /etc/resolv.conf answer from this host",
                )
            },
            async {
                if let Some(p) = &proxy {
                    let resolved = if p.host.parse::<IpAddr>().is_ok() {
                        Ok(format!("the proxy's host {} is an IP address", p.host))
                    } else {
                        match tokio::net::lookup_host((p.host.as_str(), p.port)).await {
                            Ok(a) => Ok(format!(
                                "the proxy's host {} → {}",
                                p.host,
                                a.map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
                            )),
                            Err(e) => Err(e.to_string()),
                        }
                    };
                    return match resolved {
                        Ok(r) => (
                            ok(format!("resolved by the proxy {} ({r})", p.display())),
                            Some(Vec::new()),
                        ),
                        Err(e) => (
                            fail(
                                format!("cannot resolve the proxy's host {}: {e}", p.host),
                                "check the proxy's address (pcgctl proxy show) and DNS (the resolvers in /etc/resolv.conf)",
                            ),
                            None,
                        ),
                    };
                }
                if t.host.parse::<IpAddr>().is_ok() {
                    return (ok("an IP address: nothing to resolve"), Some(vec![]));
                }
                match dialer.resolve(t).await {
                    Ok(a) if !a.is_empty() => (
                        ok(format!(
                            "→ {}",
                            a.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
                        )),
                        Some(a),
                    ),
                    Ok(_) => (
                        fail(
                            format!("{} resolves to no address", t.host),
                            "check the DNS records of the SaaS host, or the resolvers in /etc/resolv.conf",
                        ),
                        None,
                    ),
                    Err(e) => (dial_finding(&e), None),
                }
            },
        )
        .await;
    checks.push(c);
    let Some(addrs) = addrs else {
        checks.push(skipped(
            Hop::Tcp,
            &auth,
            format!("needs {} resolved (see dns)", dns_name(&proxy, t)),
        ));
        if !websocket_only {
            checks.push(skipped(Hop::Tls, &auth, "needs TCP (see tcp)"));
        }
        return (checks, state);
    };
    // tcp (the addresses resolved above, or through the proxy)
    let (c, tcp) = ctx
        .bounded(
            Hop::Tcp,
            &auth,
            |b| match &proxy {
                Some(p) => fail(
                    format!("the proxy {} did not answer CONNECT {auth} within {}", p.display(), secs(millis(b))),
                    "check that the proxy is up and reachable from this host",
                ),
                None => fail(
                    format!("no answer from {auth} within {}: the packets may be dropped on the way", secs(millis(b))),
                    "check that the firewall allows outbound TCP to it, or configure the HTTPS proxy (pcgctl proxy set)",
                ),
            },
            async {
                let addrs = if t.host.parse::<IpAddr>().is_ok() && proxy.is_none() {
                    match dialer.resolve(t).await {
                        Ok(a) => a,
                        Err(e) => return (dial_finding(&e), None),
                    }
                } else {
                    addrs
                };
                match &proxy {
                    Some(p) => match p.connect_answer(&t.host, t.port, dialer.timeout).await {
                        Ok((s, answer)) => (
                            ok(format!("through the proxy {}: CONNECT {auth} answered \"{answer}\"", p.display())),
                            Some((s, Some(p.display()))),
                        ),
                        Err(e) => (dial_finding(&e), None),
                    },
                    None => match dialer.connect(t, &addrs).await {
                        Ok((s, via)) => (
                            ok(format!(
                                "connected to {}",
                                s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| auth.clone())
                            )),
                            Some((s, via)),
                        ),
                        Err(e) => (dial_finding(&e), None),
                    },
                }
            },
        )
        .await;
    checks.push(c);
    let Some((tcp, via)) = tcp else {
        if !websocket_only {
            checks.push(skipped(Hop::Tls, &auth, "needs TCP (see tcp)"));
        }
        return (checks, state);
    };
    state.tcp_ok = true;
    if websocket_only {
        return (checks, state);
    }
    // tls: the server side of the TLS the tunnel runs (no client certificate here: the broker
    // check presents it), h2 offered on broker ports.
    let alpn: &[&[u8]] = if ep.brokers.is_empty() {
        &[b"http/1.1"]
    } else {
        &[b"h2"]
    };
    let (c, v) = ctx
        .bounded(
            Hop::Tls,
            &auth,
            |b| fail(
                format!("the TLS handshake did not finish within {}{}", secs(millis(b)), crate::transport::through(&via)),
                "a proxy that inspects TLS, or a middlebox, may be holding the handshake: exempt the SaaS host from inspection",
            ),
            async {
                let agreed = match dialer.tls(tcp, t, alpn, &via).await {
                    Ok((_, agreed)) => agreed,
                    Err(e) => return (dial_finding(&e), Some(Err(e))),
                };
                let shown = agreed
                    .as_deref()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .unwrap_or_else(|| "none".into());
                if !ep.brokers.is_empty() && agreed.as_deref() != Some(b"h2".as_slice()) {
                    let e = DialError::NoH2 {
                        server: auth.clone(),
                        alpn: shown,
                        via: via.clone(),
                    };
                    return (dial_finding(&e), Some(Err(e)));
                }
                (
                    ok(format!(
                        "the chain leads to the pinned SaaS CA (SHA-256 {}){}; ALPN {shown}",
                        short(&hex::encode(dialer.pin)),
                        crate::transport::through(&via)
                    )),
                    Some(Ok(())),
                )
            },
        )
        .await;
    let v_timed_out = v.is_none();
    match v {
        Some(Ok(())) => state.tls_ok = true,
        Some(Err(e)) if e.is_path_failure() => state.path_failure = Some(e),
        _ => {}
    }
    // A handshake that did not finish in time (no value) is a path failure too.
    if c.status == Status::Fail && state.path_failure.is_none() && !state.tls_ok && v_timed_out {
        state.path_failure = Some(DialError::HandshakeTimeout {
            server: auth.clone(),
            after: ctx.check_timeout,
            via: via.clone(),
        });
    }
    checks.push(c);
    (checks, state)
}

fn dns_name(proxy: &Option<crate::transport::Proxy>, t: &Target) -> String {
    match proxy {
        Some(p) => format!("the proxy's host {}", p.host),
        None => t.host.clone(),
    }
}

/// A dial error as a finding: what failed and what to do, separately.
fn dial_finding(e: &DialError) -> Finding {
    match e {
        DialError::Busy { .. } => warn(e.finding(), e.action()),
        _ => fail(e.finding(), e.action()),
    }
}

/// GET /healthz and compare its `Date` with this host's clock.
async fn check_clock(
    dialer: &Dialer,
    target: &Target,
    transport: Transport,
) -> (Finding, Option<()>) {
    use http_body_util::BodyExt as _;
    let t0 = now_ms();
    let dialed = match dialer.dial(target, transport, &[b"http/1.1"]).await {
        Ok(d) => d,
        Err(e) => return (dial_finding(&e), None),
    };
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(dialed.io))
                .await
                .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        let req = http::Request::get("/healthz")
            .header(http::header::HOST, target.authority())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let date = resp
            .headers()
            .get(http::header::DATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = resp.status();
        let _ = http_body_util::Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await;
        driver.abort();
        Ok::<_, String>((status, date))
    };
    let (status, date) = match exchange.await {
        Ok(r) => r,
        Err(e) => {
            return (
                fail(
                    format!("GET /healthz failed: {e}"),
                    "check that the SaaS URL is the SaaS's API (pcgctl status shows it)",
                ),
                None,
            )
        }
    };
    let t1 = now_ms();
    let Some(date) = date else {
        return (
            warn(
                format!("the SaaS answered GET /healthz ({status}) without a Date header: the clock cannot be compared"),
                "compare this host's clock with a trusted time source by hand",
            ),
            Some(()),
        );
    };
    let Ok(server) = httpdate::parse_http_date(&date) else {
        return (
            warn(
                format!("the SaaS's Date header {date:?} is not an HTTP date: the clock cannot be compared"),
                "compare this host's clock with a trusted time source by hand",
            ),
            Some(()),
        );
    };
    let server_ms = server
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let (skew, error) = skew_ms(t0, t1, server_ms);
    clock_finding(skew, error)
}

/// This host's clock minus the SaaS's, from a `Date` (whole seconds) read between `t0` and
/// `t1`, and the uncertainty of that estimate (half a second plus half the round trip).
fn skew_ms(t0: i64, t1: i64, date_ms: i64) -> (i64, i64) {
    let mid = t0 + (t1 - t0) / 2;
    (mid - (date_ms + 500), 500 + (t1 - t0) / 2)
}

fn clock_finding(skew: i64, error: i64) -> (Finding, Option<()>) {
    let abs = skew.unsigned_abs();
    let side = if skew >= 0 { "ahead of" } else { "behind" };
    let text = format!(
        "this host's clock is {:.1} s {side} the SaaS's (± {:.1} s; warn at {} s, fail at {} s)",
        abs as f64 / 1000.0,
        error as f64 / 1000.0,
        CLOCK_WARN.as_secs(),
        CLOCK_FAIL.as_secs()
    );
    let action = "enable time synchronisation on this host (systemd-timesyncd or chrony with a reachable NTP server) and check the time zone is not mistaken for UTC";
    if u128::from(abs) >= CLOCK_FAIL.as_millis() {
        (fail(text, action), None)
    } else if u128::from(abs) >= CLOCK_WARN.as_millis() {
        (warn(text, action), Some(()))
    } else {
        (ok(text), Some(()))
    }
}

/// `Broker.Check` with this gateway's certificate.
async fn check_broker(
    ctx: &Ctx<'_>,
    dialer: Dialer,
    target: Target,
    transport: Transport,
    id: &Identity,
) -> (Finding, Option<()>) {
    let repair = "pair again with a new token from your SaaS tenant: pcgctl pair --force TOKEN";
    let dialed = match dialer.dial(&target, transport, &[b"h2"]).await {
        Ok(d) => d,
        Err(e) => {
            let f = dial_finding(&e);
            return (
                fail(
                    format!("the TLS handshake with this gateway's certificate failed: {}", f.detail),
                    format!("the broker refused the certificate at TLS, or the path changed since the tls check; {repair}"),
                ),
                None,
            );
        }
    };
    let channel = match crate::tunnel::channel(&target, dialed, ctx.step_timeout()).await {
        Ok(c) => c,
        Err(e) => {
            return (
                fail(
                    format!("cannot open HTTP/2 to the broker: {e}"),
                    "check the SaaS's status",
                ),
                None,
            )
        }
    };
    let mut client = pcg_proto::v1::broker_client::BrokerClient::new(channel);
    let sent = now_ms();
    let answer = client
        .check(pcg_proto::v1::CheckRequest {
            clock_unix_ms: sent,
            gateway_version: crate::VERSION.to_string(),
        })
        .await;
    match answer {
        Ok(r) => {
            let r = r.into_inner();
            if r.gateway_id != id.gateway_id || r.tenant_id != id.tenant_id {
                return (
                    fail(
                        format!(
                            "the broker read gateway {} of tenant {} from the certificate, but this gateway is {} of tenant {}",
                            r.gateway_id, r.tenant_id, id.gateway_id, id.tenant_id
                        ),
                        repair,
                    ),
                    None,
                );
            }
            let received = now_ms();
            let skew = (sent + (received - sent) / 2) - r.clock_unix_ms;
            (
                ok(format!(
                    "the broker (version {}) accepts the certificate of gateway {} of tenant {}{}; tunnel {} at this broker; this host's clock is {} {} the broker's",
                    r.broker_version,
                    r.gateway_id,
                    r.tenant_id,
                    if transport == Transport::Websocket { " over the WebSocket transport" } else { "" },
                    if r.tunnel_connected { "open" } else { "not open" },
                    secs(skew.unsigned_abs()),
                    if skew >= 0 { "ahead of" } else { "behind" }
                )),
                Some(()),
            )
        }
        Err(s) => match s.code() {
            tonic::Code::PermissionDenied => (
                fail(format!("the broker refused this gateway: {}", s.message()), repair),
                None,
            ),
            tonic::Code::Unauthenticated => (
                fail(format!("the broker did not accept the certificate: {}", s.message()), repair),
                None,
            ),
            tonic::Code::Unimplemented => (
                warn(
                    "the broker does not offer Broker.Check (an older SaaS): whether it accepts the certificate cannot be checked without opening a tunnel",
                    "see the tunnel in pcgctl status",
                ),
                Some(()),
            ),
            code => (
                fail(
                    format!("the broker answered {code:?}: {}", s.message()),
                    "check the SaaS's status; try again in a moment",
                ),
                None,
            ),
        },
    }
}

// --- provider endpoints ------------------------------------------------------------------------

async fn providers(ctx: &Ctx<'_>, store: &Store) -> Vec<Check> {
    let mut jobs: Vec<std::pin::Pin<Box<dyn Future<Output = Check> + Send + '_>>> = Vec::new();
    for name in store.endpoint_names(crate::vsphere::ENROLLED.provider) {
        jobs.push(Box::pin(async move {
            let ep: Result<pcg_vsphere::VsphereEndpoint, _> =
                crate::vsphere::ENROLLED.get(store, &name);
            match ep {
                Err(e) => unreadable(Hop::Vcenter, &name, &e.message, "vsphere.enrol"),
                Ok(ep) => {
                    ctx.bounded(
                        Hop::Vcenter,
                        &name,
                        |b| {
                            fail(
                                format!(
                                    "vCenter {} did not answer within {}",
                                    ep.url,
                                    secs(millis(b))
                                ),
                                pcg_provider::Component::Vcenter.timeout_hint(),
                            )
                        },
                        check_vcenter(ctx, ep.clone()),
                    )
                    .await
                    .0
                }
            }
        }));
    }
    for name in store.endpoint_names(crate::openstack::ENROLLED.provider) {
        jobs.push(Box::pin(async move {
            let entry: Result<serde_json::Value, _> = crate::openstack::ENROLLED.get(store, &name);
            match entry {
                Err(e) => unreadable(Hop::Openstack, &name, &e.message, "openstack.enrol"),
                Ok(entry) => {
                    ctx.bounded(
                        Hop::Openstack,
                        &name,
                        |b| {
                            fail(
                                format!("Keystone did not answer within {}", secs(millis(b))),
                                pcg_provider::Component::OpenStack.timeout_hint(),
                            )
                        },
                        check_openstack(ctx, entry),
                    )
                    .await
                    .0
                }
            }
        }));
    }
    for name in store.bmc_names() {
        jobs.push(Box::pin(async move {
            let rec = store.bmc(&name).ok().flatten().and_then(|rec| {
                let endpoint: pcg_provider::BmcEndpoint =
                    serde_json::from_slice(&store.unseal(&rec.endpoint_sealed).ok()?).ok()?;
                let protocol: pcg_provider::command::Protocol =
                    serde_json::from_value(serde_json::Value::String(rec.protocol)).ok()?;
                Some((protocol, endpoint))
            });
            match rec {
                None => unreadable(
                    Hop::Bmc,
                    &name,
                    "its record cannot be read",
                    "baremetal.enrol",
                ),
                Some((protocol, endpoint)) => {
                    let address = endpoint.address.clone();
                    ctx.bounded(
                        Hop::Bmc,
                        &name,
                        |b| {
                            fail(
                                format!("BMC {address} did not answer within {}", secs(millis(b))),
                                pcg_provider::Component::Bmc.timeout_hint(),
                            )
                        },
                        check_bmc(ctx, &name, protocol, endpoint),
                    )
                    .await
                    .0
                }
            }
        }));
    }
    futures_util::future::join_all(jobs).await
}

fn unreadable(hop: Hop, name: &str, why: &str, enrol: &str) -> Check {
    Check {
        hop,
        target: name.to_string(),
        status: Status::Fail,
        detail: format!("the enrolled endpoint cannot be read: {why}"),
        action: Some(format!("enrol it again with {enrol}")),
        elapsed_ms: 0,
    }
}

/// A provider error as a finding: the message, and the component's own advice.
fn provider_finding(e: &pcg_provider::ProviderError, enrol: &str) -> Finding {
    use pcg_provider::ProviderError as P;
    match e {
        P::Auth {
            component,
            endpoint,
            user,
            detail,
        } => fail(
            format!("{component} {endpoint} rejected user {user:?}: {detail}"),
            format!(
                "{}; if the password was changed there, enrol the endpoint again with {enrol}",
                component.auth_hint()
            ),
        ),
        P::Unreachable {
            component,
            endpoint,
            reason,
        } => fail(
            format!("cannot reach {component} {endpoint}: {reason}"),
            component.unreachable_hint(),
        ),
        P::Timeout {
            component,
            endpoint,
            operation,
            after,
        } => fail(
            format!("{component} {endpoint} did not answer {operation} within {after:?}"),
            component.timeout_hint(),
        ),
        other => fail(
            other.to_string(),
            format!("check the endpoint, then enrol it again with {enrol}"),
        ),
    }
}

/// `host`, `port` and whether TLS is used, from an `http(s)://host[:port]/...` URL.
fn url_host_port(url: &str) -> Option<(String, u16, bool)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        (false, url.strip_prefix("http://")?)
    };
    let hostport = rest.split('/').next()?;
    let (h, p) = crate::transport::proxy::split_host_port(hostport, if tls { 443 } else { 80 })?;
    Some((h, p, tls))
}

/// TCP to `host:port` within the step bound.
async fn reach(ctx: &Ctx<'_>, host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    let t = Target {
        host: host.to_string(),
        port,
    };
    let step = ctx.step_timeout();
    let addrs = match tokio::time::timeout(step, tokio::net::lookup_host(t.authority())).await {
        Err(_) => {
            return Err(format!(
                "cannot resolve {host}: no answer within {}",
                secs(millis(step))
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot resolve {host}: {e}")),
        Ok(Ok(a)) => a.collect::<Vec<_>>(),
    };
    let mut last = format!("{host} resolves to no address");
    for a in addrs {
        match tokio::time::timeout(step, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("cannot connect to {a}: {e}"),
            Err(_) => {
                last = format!(
                    "no answer from {a} within {}: the packets may be dropped on the way",
                    secs(millis(step))
                )
            }
        }
    }
    Err(last)
}

async fn check_vcenter(
    ctx: &Ctx<'_>,
    mut ep: pcg_vsphere::VsphereEndpoint,
) -> (Finding, Option<()>) {
    let component = pcg_provider::Component::Vcenter;
    let Some((host, port, tls)) = url_host_port(&ep.url) else {
        return (
            fail(
                format!("the URL {:?} is not usable", ep.url),
                "enrol the vCenter again with vsphere.enrol and an https:// URL",
            ),
            None,
        );
    };
    let mut steps = Vec::new();
    let tcp = match reach(ctx, &host, port).await {
        Ok(s) => s,
        Err(e) => {
            return (
                fail(format!("{}: {e}", ep.url), component.unreachable_hint()),
                None,
            )
        }
    };
    steps.push(format!("{host}:{port} reachable"));
    if tls {
        let Some(trust) = ep.tls.clone() else {
            return (fail(format!("{} is HTTPS but no TLS trust is enrolled", ep.url), "enrol it again with vsphere.enrol and tls.pin_sha256 (its certificate's SHA-256) or tls.ca_pem"), None);
        };
        match tls_trust_check(ctx, tcp, &host, port, &trust).await {
            Ok(text) => steps.push(text),
            Err(f) => return (f, None),
        }
    }
    let bound = ctx.step_timeout();
    ep.timeout_ms = Some(
        ep.timeout_ms
            .map_or(millis(bound), |t| t.min(millis(bound))),
    );
    match pcg_vsphere::VsphereDriver::connect(&ep).await {
        Ok(d) => {
            let _ = d.client().logout().await;
            steps.push(format!("user {:?} logged in (and out)", ep.user));
            (ok(format!("{}: {}", ep.url, steps.join("; "))), Some(()))
        }
        Err(e) => (provider_finding(&e, "vsphere.enrol"), None),
    }
}

/// A TLS handshake with the enrolled trust (pin or CA). When it fails, what the server
/// presented is read by a second handshake that records the certificate and then aborts (it
/// never completes, so nothing is ever sent to an unverified server).
async fn tls_trust_check(
    ctx: &Ctx<'_>,
    tcp: tokio::net::TcpStream,
    host: &str,
    port: u16,
    trust: &pcg_provider::TlsTrust,
) -> Result<String, Finding> {
    let enrol = "if the certificate was replaced on purpose, enrol the endpoint again with the new pin_sha256 (or ca_pem); otherwise something intercepts TLS between this gateway and it";
    let config = pcg_provider::tls::client_config(trust)
        .map_err(|e| fail(format!("the enrolled TLS trust is unusable: {e}"), enrol))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| fail(format!("{host} is not a TLS server name: {e}"), enrol))?;
    let step = ctx.step_timeout();
    let done = tokio::time::timeout(
        step,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name.clone(), tcp),
    )
    .await;
    let reason = match done {
        Ok(Ok(_)) => {
            return Ok(match trust {
                pcg_provider::TlsTrust::PinSha256(p) => format!(
                    "certificate matches the pinned SHA-256 {}",
                    short(&p.replace(':', "").to_lowercase())
                ),
                pcg_provider::TlsTrust::CaPem(_) => {
                    "certificate verified against the enrolled CA".to_string()
                }
            })
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => {
            return Err(fail(
                format!(
                    "the TLS handshake with {host}:{port} did not finish within {}",
                    secs(millis(step))
                ),
                "check that the endpoint is up and that nothing on the path holds TLS",
            ))
        }
    };
    let presented = match reach(ctx, host, port).await {
        Ok(tcp) => presented_certificate(tcp, name, step).await,
        Err(_) => None,
    };
    let shown = presented
        .map(|(sha, subject, issuer)| format!("it presented a certificate with SHA-256 {sha} (subject \"{subject}\", issuer \"{issuer}\")"))
        .unwrap_or_else(|| "what it presented could not be read".into());
    let expected = match trust {
        pcg_provider::TlsTrust::PinSha256(p) => format!(
            "the pinned SHA-256 is {}",
            p.replace(':', "").to_lowercase()
        ),
        pcg_provider::TlsTrust::CaPem(_) => {
            format!("the enrolled CA does not vouch for it ({reason})")
        }
    };
    Err(fail(
        format!("TLS with {host}:{port} failed: {shown}, but {expected}"),
        enrol,
    ))
}

/// Records the server certificate of a handshake and refuses it, so the handshake never
/// completes.
#[derive(Debug)]
struct Capture {
    seen: std::sync::Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().expect("capture lock is never poisoned") = Some(end_entity.to_vec());
        Err(rustls::Error::General(
            "recorded for diagnostics; not trusted".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not trusted".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not trusted".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SHA-256, subject and issuer of the certificate a server presents.
async fn presented_certificate(
    tcp: tokio::net::TcpStream,
    name: rustls::pki_types::ServerName<'static>,
    bound: Duration,
) -> Option<(String, String, String)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let capture = Arc::new(Capture {
        seen: std::sync::Mutex::new(None),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let _ = tokio::time::timeout(
        bound,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await;
    let der = capture
        .seen
        .lock()
        .expect("capture lock is never poisoned")
        .take()?;
    let (subject, issuer) = x509_parser::parse_x509_certificate(&der)
        .map(|(_, c)| (c.subject().to_string(), c.issuer().to_string()))
        .unwrap_or_else(|_| ("?".into(), "?".into()));
    Some((pcg_provider::tls::cert_sha256(&der), subject, issuer))
}

async fn check_openstack(ctx: &Ctx<'_>, mut entry: serde_json::Value) -> (Finding, Option<()>) {
    let component = pcg_provider::Component::OpenStack;
    let bound = millis(ctx.step_timeout());
    let t = entry
        .get("timeout_ms")
        .and_then(serde_json::Value::as_u64)
        .map_or(bound, |t| t.min(bound));
    entry["timeout_ms"] = serde_json::Value::from(t);
    let cloud = match pcg_openstack::CloudEntry::inline(entry) {
        Ok(c) => c,
        Err(e) => return (provider_finding(&e, "openstack.enrol"), None),
    };
    let auth_url = cloud.auth_url().to_string();
    let Some((host, port, _)) = url_host_port(&auth_url) else {
        return (
            fail(
                format!("the auth URL {auth_url:?} is not usable"),
                "enrol the cloud again with openstack.enrol and Keystone's URL",
            ),
            None,
        );
    };
    if let Err(e) = reach(ctx, &host, port).await {
        return (
            fail(
                format!("Keystone {auth_url}: {e}"),
                component.unreachable_hint(),
            ),
            None,
        );
    }
    let user = cloud.user();
    match pcg_openstack::client::OpenStack::connect(cloud).await {
        Ok(_) => (
            ok(format!(
                "Keystone {auth_url} reachable; it issued a token for user {user:?}"
            )),
            Some(()),
        ),
        Err(e) => (provider_finding(&e, "openstack.enrol"), None),
    }
}

async fn check_bmc(
    ctx: &Ctx<'_>,
    name: &str,
    protocol: pcg_provider::command::Protocol,
    mut endpoint: pcg_provider::BmcEndpoint,
) -> (Finding, Option<()>) {
    let bound = millis(ctx.step_timeout());
    endpoint.timeout_ms = Some(endpoint.timeout_ms.map_or(bound, |t| t.min(bound)));
    let (address, user) = (endpoint.address.clone(), endpoint.user.clone());
    // A driver of its own (a fresh session, not the daemon's), closed after the check.
    let svc = crate::baremetal::service();
    let enrol = pcg_provider::command::EnrolCommand {
        name: name.to_string(),
        protocol,
        endpoint,
    };
    let driver = match svc.restore(&enrol).and_then(|()| svc.driver(name)) {
        Ok(d) => d,
        Err(e) => return (provider_finding(&e, "baremetal.enrol"), None),
    };
    let r = driver.enrol().await;
    let _ = driver.close().await;
    let proto = serde_json::to_value(protocol)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    match r {
        Ok(caps) => (
            ok(format!(
                "{proto} {address}: user {user:?} opened a session (and closed it); systems: {}",
                caps.systems.join(", ")
            )),
            Some(()),
        ),
        Err(e) => (provider_finding(&e, "baremetal.enrol"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        hop: Hop,
        target: &str,
        status: Status,
        detail: &str,
        action: Option<&str>,
        ms: u64,
    ) -> Check {
        Check {
            hop,
            target: target.into(),
            status,
            detail: detail.into(),
            action: action.map(str::to_string),
            elapsed_ms: ms,
        }
    }

    fn sample() -> Report {
        Report::new(
            "pcgctl",
            1_800_000_000_000,
            Duration::from_millis(10_400),
            Options::default(),
            vec![
                check(Hop::Store, "/var/lib/pcg", Status::Ok, "opened and written; 12.0 GiB free of 40.0 GiB (30%)", None, 3),
                check(Hop::Identity, "gateway gw_2", Status::Ok, "gateway gw_2 of tenant tn_1; certificate valid until 2027-02-13T08:00:00Z (29 days left); SaaS CA pinned, SHA-256 0123456789abcdef…", None, 1),
                check(Hop::Dns, "saas.example", Status::Ok, "→ 192.0.2.10", None, 2),
                check(Hop::Tcp, "saas.example:8443", Status::Fail, "no answer from saas.example:8443 within 10 s: the packets may be dropped on the way", Some("check that the firewall allows outbound TCP to it"), 10_000),
                check(Hop::Tls, "saas.example:8443", Status::Skipped, "needs TCP (see tcp)", None, 0),
                check(Hop::Clock, "saas.example:8443", Status::Skipped, "needs a working TLS path to saas.example:8443 (see tls)", None, 0),
                check(Hop::Broker, "https://saas.example:8443", Status::Skipped, "needs a working TLS path to saas.example:8443 (see tls)", None, 0),
                check(Hop::Bmc, "rack1", Status::Warn, "example warning", Some("do this"), 20),
            ],
        )
    }

    #[test]
    fn human_output_matches_golden() {
        let golden = "pcg gateway 0.1.0 diagnostics, run by pcgctl (the daemon is not running) in 10 s (each check bounded by 10 s, the run by 60 s)
  ok    store      /var/lib/pcg — opened and written; 12.0 GiB free of 40.0 GiB (30%)
  ok    identity   gateway gw_2 — gateway gw_2 of tenant tn_1; certificate valid until 2027-02-13T08:00:00Z (29 days left); SaaS CA pinned, SHA-256 0123456789abcdef…
  ok    dns        saas.example — → 192.0.2.10
  FAIL  tcp        saas.example:8443 — no answer from saas.example:8443 within 10 s: the packets may be dropped on the way (10 s)
                   → check that the firewall allows outbound TCP to it
  skip  tls        saas.example:8443 — needs TCP (see tcp)
  skip  clock      saas.example:8443 — needs a working TLS path to saas.example:8443 (see tls)
  skip  broker     https://saas.example:8443 — needs a working TLS path to saas.example:8443 (see tls)
  WARN  bmc        rack1 — example warning
                   → do this
result: 1 failure, 1 warning, 3 ok, 3 skipped — exit status 2
";
        let mut r = sample();
        r.version = "0.1.0".into();
        assert_eq!(r.render(), golden);
    }

    #[test]
    fn json_field_names_are_stable() {
        let v = serde_json::to_value(sample()).expect("serialises");
        for k in [
            "version",
            "ran_in",
            "started_unix_ms",
            "elapsed_ms",
            "check_timeout_ms",
            "total_timeout_ms",
            "status",
            "exit_code",
            "checks",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        let c = &v["checks"][3];
        assert_eq!(c["hop"], "tcp");
        assert_eq!(c["status"], "fail");
        for k in ["target", "detail", "action", "elapsed_ms"] {
            assert!(c.get(k).is_some(), "{k} missing: {c}");
        }
        assert!(v["checks"][0].get("action").is_none(), "no action on ok");
        assert_eq!(v["exit_code"], 2);
    }

    #[test]
    fn exit_codes_follow_the_worst_outcome() {
        let mk = |s: &[Status]| {
            Report::new(
                "pcgctl",
                0,
                Duration::ZERO,
                Options::default(),
                s.iter()
                    .map(|s| check(Hop::Dns, "x", *s, "d", None, 0))
                    .collect(),
            )
            .exit_code
        };
        assert_eq!(mk(&[Status::Ok, Status::Ok]), 0);
        assert_eq!(mk(&[Status::Ok, Status::Skipped]), 0);
        assert_eq!(mk(&[Status::Ok, Status::Warn, Status::Skipped]), 1);
        assert_eq!(mk(&[Status::Warn, Status::Fail]), 2);
    }

    #[test]
    fn clock_thresholds() {
        assert_eq!(clock_finding(1_200, 600).0.status, Status::Ok);
        assert_eq!(clock_finding(-4_999, 600).0.status, Status::Ok);
        assert_eq!(clock_finding(-5_000, 600).0.status, Status::Warn);
        assert_eq!(clock_finding(59_999, 600).0.status, Status::Warn);
        let (f, _) = clock_finding(120_400, 600);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("120.4 s ahead of"), "{}", f.detail);
        // The Date header has whole seconds: the estimate takes the middle of that second and
        // of the request.
        assert_eq!(skew_ms(10_000, 10_200, 10_000), (-400, 600));
        assert_eq!(skew_ms(130_000, 130_000, 10_000), (119_500, 500));
    }

    /// On tokio's paused clock, so a busy machine cannot stretch it.
    #[tokio::test(start_paused = true)]
    async fn a_run_is_bounded_and_names_what_it_skipped() {
        let ctx = Ctx {
            cfg: &Config::default(),
            check_timeout: Duration::from_millis(200),
            total: Duration::from_millis(300),
            deadline: Instant::now() + Duration::from_millis(300),
        };
        let start = Instant::now();
        let (c, v) = ctx
            .bounded(
                Hop::Tcp,
                "x:1",
                |b| fail(format!("nothing within {b:?}"), "a"),
                async { std::future::pending::<(Finding, Option<()>)>().await },
            )
            .await;
        assert!(v.is_none());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("200ms"), "{}", c.detail);
        // The second check only has what is left of the run's bound.
        let (c, _) = ctx
            .bounded(
                Hop::Tls,
                "x:1",
                |b| fail(format!("nothing within {b:?}"), "a"),
                async { std::future::pending::<(Finding, Option<()>)>().await },
            )
            .await;
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.contains("cut short by the run's total bound"),
            "{}",
            c.detail
        );
        let (c, _) = ctx
            .bounded(Hop::Clock, "x:1", |b| fail(format!("{b:?}"), "a"), async {
                (ok("fine"), Some(()))
            })
            .await;
        assert_eq!(c.status, Status::Skipped);
        assert!(c.detail.contains("total bound of 300 ms"), "{}", c.detail);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[test]
    fn provider_urls() {
        assert_eq!(
            url_host_port("https://vc.lab:8443/sdk"),
            Some(("vc.lab".into(), 8443, true))
        );
        assert_eq!(
            url_host_port("https://vc.lab"),
            Some(("vc.lab".into(), 443, true))
        );
        assert_eq!(
            url_host_port("http://[::1]:5000/v3"),
            Some(("::1".into(), 5000, false))
        );
        assert_eq!(url_host_port("ftp://x"), None);
    }
}
