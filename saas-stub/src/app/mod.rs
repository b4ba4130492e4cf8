//! The application layer: every operation of pcg-saas (tenants, API keys, pairing tokens,
//! pairing, gateways, commands, events, declared machines) as methods of [`App`], with typed errors
//! ([`AppError`]). The REST handlers (`crate::api`) and the broker (`crate::broker`) are thin
//! layers over it: they parse, call one method, and render.

pub mod admin;
pub mod commands;
pub mod error;
pub mod feed;
pub mod gateways;
pub mod log;
pub mod machines;
mod pairing;
pub mod waiters;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::{AppError, AppResult, Kind};

use crate::store::{self, ApiKey};
use crate::{broker, ca, Config};

/// Free space under which `/readyz` says not ready (64 MiB): the store is about to fail writes.
pub const MIN_FREE_BYTES: u64 = 64 << 20;

/// State shared by the REST API and the broker.
pub struct App {
    pub cfg: Config,
    pub store: store::Store,
    /// Where changes go: the store (one node) or the cluster's log (a replica).
    pub log: log::Log,
    /// Commands without a result (and recently finished ones), in memory.
    pub commands: crate::commands::Commands,
    pub ca: ca::Ca,
    /// Live tunnels by gateway id.
    pub tunnels: broker::Tunnels,
    /// Long-polls waiting for a command to finish (`GET /v1/commands/{id}?wait_seconds=`).
    pub waiters: waiters::Waiters,
    /// URL put in pairing tokens.
    pub api_url: String,
    /// Broker endpoints handed to gateways.
    pub broker_urls: Vec<String>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Cancelled when the service stops: long-polls return, tunnels say Goodbye.
    pub shutdown: CancellationToken,
    /// Every task the service spawns, so that stopping waits for them (within a bound).
    pub tasks: TaskTracker,
    /// Tunnels being set up at once (Hello to the end of the replay); past it, `Open` answers
    /// "come back later".
    pub tunnel_setups: Arc<tokio::sync::Semaphore>,
    /// TLS of inner connections (inside the WebSocket way in): client certificate optional.
    /// Set when the service starts serving.
    pub inner_tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
    /// Keys the fingerprint of idempotent requests (kept apart from the store, so a stolen
    /// database cannot test guesses of a request body against it).
    idempotency_key: ring::hmac::Key,
    /// Orders declared-machine frames to tunnels: a change pushed while a full set is being read
    /// and sent waits for it (see [`crate::watch`]).
    pub(crate) machine_sync: std::sync::Mutex<()>,
    /// When a refused tunnel of an identity was last recorded as an event (rate limit).
    pub(crate) refused_events:
        std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// The authenticated caller of a request.
pub struct Caller(pub ApiKey);

impl Caller {
    /// The caller's tenant; the operator key has none and is refused here.
    pub fn tenant(&self) -> AppResult<&str> {
        self.0.tenant_id.as_deref().ok_or_else(|| {
            AppError::new(
                Kind::Forbidden,
                "operator_key",
                "the operator key administers tenants only; use an API key of the tenant (POST /v1/tenants returns its first admin key)",
            )
        })
    }

    fn operator(&self) -> AppResult<()> {
        if self.0.tenant_id.is_none() {
            Ok(())
        } else {
            Err(AppError::new(
                Kind::Forbidden,
                "not_operator",
                "only the operator key (operator.key in the SaaS data directory) can create tenants",
            ))
        }
    }
}

/// Opens the data directory (creating the CA, the store and the operator key on first start)
/// and returns the shared state. `api_addr`/`broker_addr` are the bound addresses (no
/// `broker_addr`: the broker shares the public port), used for the advertised URLs when the
/// config names none.
///
/// With a `[cluster]` section the service is a replica: it connects to the NATS cluster, applies
/// the cluster's log until it has caught up with it (bounded: an error says what is missing), and
/// only then returns.
pub async fn open(
    cfg: Config,
    api_addr: std::net::SocketAddr,
    broker_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Arc<App>> {
    use anyhow::Context as _;
    pcg_durable::fs::private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    if cfg.cluster.is_some() && cfg.ca_key_file.is_none() {
        anyhow::bail!(
            "a replica ([cluster]) needs the gateways' CA every replica shares: set ca_cert_file and ca_key_file (`pcg-saas cluster init` makes gateway-ca.pem and gateway-ca.key)"
        );
    }
    let ca = match (&cfg.ca_cert_file, &cfg.ca_key_file) {
        (None, None) => ca::Ca::load_or_create(&cfg.data_dir)?,
        (Some(cert), Some(key)) => ca::Ca::load(cert, key)?,
        _ => anyhow::bail!(
            "ca_cert_file and ca_key_file go together: name both (the gateways' CA every replica shares; `pcg-saas cluster init` makes gateway-ca.pem and gateway-ca.key), or neither to use the CA in the data directory"
        ),
    };
    let store = store::Store::open(&cfg.data_dir.join("db")).with_context(|| {
        format!(
            "cannot open the store in {} (is another pcg-saas using this data directory?)",
            cfg.data_dir.display()
        )
    })?;
    store.migrate()?;
    let commands = crate::commands::Commands::load(&store, cfg.cluster.is_some())?;
    let log = match &cfg.cluster {
        None => log::Log::Local,
        Some(c) => {
            let name = c
                .cert_file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "replica".into());
            log::Log::Cluster(Box::new(log::Replica::open(c, &name).await?))
        }
    };
    let idem = match (&cfg.cluster, &cfg.ca_key_file) {
        // Replicas fingerprint a request alike (a retry may reach another replica): the key is
        // derived from the CA key they share.
        (Some(_), Some(key_file)) => {
            let ca_key = std::fs::read(key_file)
                .with_context(|| format!("cannot read {}", key_file.display()))?;
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &ca_key);
            ring::hmac::sign(&k, b"pcg-saas idempotency fingerprints v1")
                .as_ref()
                .to_vec()
        }
        _ => {
            let idem_path = cfg.data_dir.join("idempotency.key");
            if !idem_path.exists() {
                ca::write_private(&idem_path, &rand::random::<[u8; 32]>())
                    .with_context(|| format!("cannot write {}", idem_path.display()))?;
            }
            std::fs::read(&idem_path)
                .with_context(|| format!("cannot read {}", idem_path.display()))?
        }
    };
    for (path, e) in pcg_durable::fs::tighten_permissions(&cfg.data_dir) {
        tracing::warn!(path = %path.display(), "cannot make owner-only: {e}");
    }
    let api_url = cfg
        .public_api_url
        .clone()
        .unwrap_or_else(|| format!("https://{api_addr}"));
    let broker_urls = match (cfg.public_broker_urls.is_empty(), broker_addr) {
        (false, _) => cfg.public_broker_urls.clone(),
        (true, Some(b)) => vec![format!("https://{b}")],
        (true, None) => vec![api_url.clone()],
    };
    let setups = cfg.max_tunnel_setups.max(1);
    let app = Arc::new(App {
        cfg,
        store,
        log,
        commands,
        ca,
        tunnels: broker::Tunnels::default(),
        waiters: waiters::Waiters::default(),
        api_url,
        broker_urls,
        metrics: crate::metrics::Metrics::default(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        tunnel_setups: Arc::new(tokio::sync::Semaphore::new(setups)),
        inner_tls: std::sync::OnceLock::new(),
        idempotency_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &idem),
        refused_events: std::sync::Mutex::new(std::collections::HashMap::new()),
        machine_sync: std::sync::Mutex::new(()),
    });
    if let Some(r) = app.log.replica() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        app.tasks.spawn(log::follow(app.clone(), tx));
        let bound = std::time::Duration::from_secs(120);
        let upto = match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => anyhow::bail!("the cluster's log could not be followed (see the log above)"),
            Err(_) => anyhow::bail!(
                "this replica did not catch up with the cluster's log within {bound:?}; check that the NATS cluster has a quorum (`pcg-saas cluster check`)"
            ),
        };
        tracing::info!(replica = %r.name, applied = upto, "caught up with the cluster's log");
        app.tasks.spawn(log::balance(app.clone()));
    }
    let op_path = app.cfg.data_dir.join("operator.key");
    if !op_path.exists() {
        let (k, key) = store::new_api_key(None, "operator");
        app.commit(store::Op::ApiKeyCreated { key: k })
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the operator key: {e}"))?;
        app.store.flush().await?;
        ca::write_private(&op_path, format!("{key}\n").as_bytes())
            .with_context(|| format!("cannot write {}", op_path.display()))?;
        tracing::info!(path = %op_path.display(), "first start: operator API key written (owner-only file)");
    }
    Ok(app)
}

impl App {
    /// Authenticates an `Authorization` header value (`Bearer pcgk_...`, scheme in any case).
    pub fn authenticate(&self, header: Option<&str>) -> AppResult<Caller> {
        let header = header.ok_or_else(|| {
            AppError::new(
                Kind::Unauthenticated,
                "unauthenticated",
                "missing `Authorization: Bearer <API key>` header",
            )
        })?;
        let header = header.trim();
        let (scheme, key) = header.split_once(' ').unwrap_or((header, ""));
        let presented = Some(key.trim())
            .filter(|_| scheme.eq_ignore_ascii_case("bearer"))
            .ok_or_else(|| {
                AppError::new(
                    Kind::Unauthenticated,
                    "unauthenticated",
                    "the Authorization header must be `Bearer <API key>`",
                )
            })?;
        match self.store.authenticate(presented)? {
            Some(k) => Ok(Caller(k)),
            None => Err(AppError::new(
                Kind::Unauthenticated,
                "invalid_api_key",
                "the API key is unknown, revoked or mistyped; check the key, or ask a tenant admin for a new one",
            )),
        }
    }

    /// The metrics in the OpenMetrics text format, pending commands per tenant read now.
    pub fn render_metrics(&self) -> String {
        self.metrics.tunnels.set(self.tunnels.count() as i64);
        self.metrics
            .feed_subscribers
            .set(i64::try_from(self.store.feed.subscribers()).unwrap_or(i64::MAX));
        let flushes = self.store.flushes();
        let seen = self.metrics.store_flushes.get();
        self.metrics
            .store_flushes
            .inc_by(flushes.saturating_sub(seen));
        match self.store.gateways(None) {
            Ok(gws) => {
                let tenant_of: std::collections::HashMap<String, String> =
                    gws.into_iter().map(|g| (g.id, g.tenant_id)).collect();
                let mut by_tenant: std::collections::BTreeMap<String, i64> = Default::default();
                for (g, n) in self.commands.pending_by_gateway() {
                    if let Some(t) = tenant_of.get(&g) {
                        *by_tenant.entry(t.clone()).or_default() += n as i64;
                    }
                }
                self.metrics.pending.clear();
                for (tenant, n) in by_tenant {
                    self.metrics
                        .pending
                        .get_or_create(&crate::metrics::TenantLabels { tenant })
                        .set(n);
                }
            }
            Err(e) => tracing::warn!("pending commands for metrics: {e}"),
        }
        pcg_obs::encode(&self.metrics.registry)
    }

    /// The metrics text, for the operator key only.
    pub fn metrics_text(&self, caller: &Caller) -> AppResult<String> {
        caller.operator().map_err(|_| {
            AppError::new(
                Kind::Forbidden,
                "not_operator",
                "metrics are for the operator key (operator.key in the SaaS data directory), or set metrics_listen",
            )
        })?;
        Ok(self.render_metrics())
    }

    /// Whether the service can take work: not stopping, and the store takes a durable write.
    /// Ready: not stopping, room left on the data directory's filesystem (at least
    /// [`MIN_FREE_BYTES`]), and the store takes a durable write.
    pub async fn ready(&self) -> AppResult<()> {
        if self.shutdown.is_cancelled() {
            return Err(AppError::new(
                Kind::Unavailable,
                "stopping",
                "the service is stopping",
            ));
        }
        // The store writes into space it has already allocated, so it takes a probe for a
        // while after its filesystem fills; readiness must say so before writes start failing.
        let dir = &self.cfg.data_dir;
        if let Ok(st) = rustix::fs::statvfs(dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if free < MIN_FREE_BYTES {
                return Err(AppError::new(
                    Kind::Unavailable,
                    "store_unavailable",
                    format!(
                        "only {free} bytes free on the filesystem of {} (at least {MIN_FREE_BYTES} needed): free space there",
                        dir.display()
                    ),
                ));
            }
        }
        self.store.probe_write().await.map_err(|e| {
            AppError::new(
                Kind::Unavailable,
                "store_unavailable",
                format!("the store does not take durable writes: {e}; once that is fixed, restart pcg-saas (after a failed write the store refuses writes until it is reopened)"),
            )
        })
    }

    /// Deletes what retention no longer keeps: finished commands older than
    /// `command_retention_days`, events older than `event_retention_days`, idempotency keys past
    /// their window. Run every ten minutes.
    pub fn prune(&self) {
        let day = 86_400_000i64;
        let now = store::now_ms();
        let days = |d: u64| {
            i64::try_from(d)
                .unwrap_or(i64::MAX / day)
                .saturating_mul(day)
        };
        match self
            .store
            .prune_commands(now - days(self.cfg.command_retention_days))
        {
            Ok(ids) if !ids.is_empty() => {
                self.commands.forget(&ids);
                tracing::info!(
                    pruned = ids.len(),
                    "deleted finished commands past retention"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning commands failed: {e}"),
        }
        match self
            .store
            .prune_events(now - days(self.cfg.event_retention_days))
        {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "deleted events past retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning events failed: {e}"),
        }
        match self.store.prune_health(
            now - i64::try_from(self.cfg.health_retention_hours.saturating_mul(3_600_000))
                .unwrap_or(i64::MAX / 2),
        ) {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "deleted health reports past retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning health reports failed: {e}"),
        }
        match self.store.prune_feed(
            now - i64::try_from(self.cfg.feed_retention_hours.saturating_mul(3_600_000))
                .unwrap_or(i64::MAX / 2),
        ) {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "deleted feed entries past retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning the feed failed: {e}"),
        }
        match self.store.prune_idempotency(self.idempotency_window_ms()) {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot expired idempotency keys"),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning idempotency keys failed: {e}"),
        }
    }

    /// Liveness facts for `/healthz`.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.count()
    }
}

/// Checks a name given by a client: 1 to 128 characters, no control characters.
pub fn check_name(what: &str, name: &str) -> AppResult<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 128 {
        return Err(AppError::invalid(
            "invalid_name",
            format!("{what} must be 1 to 128 characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(AppError::invalid(
            "invalid_name",
            format!("{what} must not contain control characters"),
        ));
    }
    Ok(name.to_string())
}

/// Whether `id` could be an id this service made (`prefix_hex`, at most 64 characters): other
/// strings are answered "not found" without a store lookup.
pub fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A string shown in logs and events with control characters escaped and its length bounded,
/// so a client cannot forge log lines.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_escapes_control_characters_and_bounds_length() {
        assert_eq!(super::printable("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(500);
        assert_eq!(super::printable(&long).chars().count(), 201);
        assert!(super::check_name("name", "ok name").is_ok());
        assert!(super::check_name("name", "bad\tname").is_err());
        assert!(super::check_name("name", &"y".repeat(129)).is_err());
        assert!(super::plausible_id("cmd_0a1b"));
        assert!(!super::plausible_id("../etc"));
    }
}
