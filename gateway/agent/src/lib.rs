//! pcg-gateway: the on-premises daemon of pcg.
//!
//! - [`pairing`]: token → key pair + CSR → certificate, CA pinned from the token.
//! - [`tunnel`]: the outbound mTLS gRPC tunnel to the broker, heartbeats, backoff, transport
//!   fallback.
//! - [`transport`]: how the SaaS is reached: proxies, pinned TLS, the WebSocket transport.
//! - [`executor`]: exactly-once execution through the journal and outbox, and the handler
//!   registry provider drivers fill.
//! - [`store`]: sled: identity (private key sealed), journal, outbox.
//! - [`admin`]: the owner-only Unix socket pcgctl talks to.
//! - [`endpoints`]: vCenters and OpenStack clouds enrolled by name.
//! - [`metrics`]: Prometheus metrics on `metrics_listen` (off by default).
//! - [`bundle`]: support bundles, written locally or uploaded up the tunnel.
//! - [`watch`]: declared machines converged, watched, healed by policy; health reports.
//! - [`status`], [`config`].
//!
//! [`run`] starts everything and returns when `shutdown` resolves.

pub mod admin;
pub mod baremetal;
pub mod bundle;
pub mod config;
pub mod endpoints;
pub mod executor;
pub mod metrics;
pub mod openstack;
pub mod pairing;
pub mod status;
pub mod store;
pub mod transport;
pub mod tunnel;
pub mod vsphere;
pub mod watch;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pcg_proto::v1::GatewayFrame;
use tokio::sync::{mpsc, Semaphore};

pub use config::Config;
pub use pcg_durable::fs::owner_only_umask;
pub use pcg_proto::pairing::PairingToken;
use status::{Status, TunnelStatus};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The running gateway's shared state.
pub struct Gateway {
    pub cfg: Config,
    pub store: store::Store,
    pub registry: executor::Registry,
    /// Bounds concurrent executions.
    pub permits: Arc<Semaphore>,
    /// Bumped when pairing stored a new identity: the tunnel drops the old one at once.
    identity_gen: tokio::sync::watch::Sender<u64>,
    /// Serialises pairing requests.
    pub pairing: tokio::sync::Mutex<()>,
    /// Enrolled BMCs and their drivers.
    pub bare_metal: std::sync::Arc<pcg_provider::command::BareMetalService>,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// The watch loop's state (declared machines, observations, reports).
    pub watch: watch::Watch,
    /// Set when a result could not be queued on the tunnel; the outbox is sent again.
    pub(crate) outbox_dirty: std::sync::atomic::AtomicBool,
    started: Instant,
    tunnel: Mutex<TunnelStatus>,
    outbound: Mutex<Option<mpsc::Sender<GatewayFrame>>>,
    running: Mutex<HashSet<String>>,
    /// Support-bundle uploads under way: their chunk acknowledgements go here.
    bundle_acks: Mutex<std::collections::HashMap<String, mpsc::Sender<pcg_proto::v1::BundleAck>>>,
}

impl Gateway {
    pub fn new(cfg: Config, store: store::Store, registry: executor::Registry) -> Self {
        Gateway {
            permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            cfg,
            store,
            registry,
            identity_gen: tokio::sync::watch::Sender::new(0),
            pairing: tokio::sync::Mutex::new(()),
            bare_metal: baremetal::service(),
            outbox_dirty: std::sync::atomic::AtomicBool::new(false),
            metrics: metrics::Metrics::default(),
            watch: watch::Watch::default(),
            started: Instant::now(),
            tunnel: Mutex::new(TunnelStatus::default()),
            outbound: Mutex::new(None),
            running: Mutex::new(HashSet::new()),
            bundle_acks: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn status(&self) -> Status {
        let id = self.store.identity().ok().flatten();
        Status {
            version: VERSION.to_string(),
            paired: id.is_some(),
            tenant_id: id.as_ref().map(|i| i.tenant_id.clone()),
            gateway_id: id.as_ref().map(|i| i.gateway_id.clone()),
            api_url: id.as_ref().map(|i| i.api_url.clone()),
            tunnel: self
                .tunnel
                .lock()
                .expect("status lock is never poisoned")
                .clone(),
            certificate_not_after_ms: id.as_ref().map(|i| i.cert_not_after_ms),
            certificate_sha256: id.as_ref().and_then(|i| status::pem_sha256(&i.cert_pem)),
            journal_entries: self.store.journal_len(),
            running: self
                .running
                .lock()
                .expect("running lock is never poisoned")
                .len(),
            outbox_depth: self.store.outbox_depth(),
            uptime_s: self.started.elapsed().as_secs(),
            clock_unix_ms: store::now_ms(),
            command_kinds: self.registry.kinds(),
        }
    }

    /// Tells the tunnel that the stored identity changed (a new pairing).
    pub fn identity_changed(&self) {
        self.identity_gen.send_modify(|g| *g += 1);
    }

    pub(crate) fn watch_identity(&self) -> tokio::sync::watch::Receiver<u64> {
        self.identity_gen.subscribe()
    }

    pub(crate) fn set_tunnel(&self, f: impl FnOnce(&mut TunnelStatus)) {
        let mut t = self.tunnel.lock().expect("status lock is never poisoned");
        f(&mut t);
        self.metrics.state(t.state);
        self.metrics.tunnel_websocket.set(i64::from(
            t.transport == Some(transport::Transport::Websocket),
        ));
    }

    /// The metrics in the OpenMetrics text format (journal and outbox read now).
    pub fn render_metrics(&self) -> String {
        let flushes = self.store.flushes();
        let seen = self.metrics.store_flushes.get();
        self.metrics
            .store_flushes
            .inc_by(flushes.saturating_sub(seen));
        self.metrics
            .journal_entries
            .set(self.store.journal_len() as i64);
        self.metrics
            .outbox_depth
            .set(self.store.outbox_depth() as i64);
        pcg_obs::encode(&self.metrics.registry)
    }

    pub(crate) fn outbound(&self) -> Option<mpsc::Sender<GatewayFrame>> {
        self.outbound
            .lock()
            .expect("outbound lock is never poisoned")
            .clone()
    }

    pub(crate) fn set_outbound(&self, tx: mpsc::Sender<GatewayFrame>) {
        *self
            .outbound
            .lock()
            .expect("outbound lock is never poisoned") = Some(tx);
    }

    pub(crate) fn clear_outbound(&self) {
        *self
            .outbound
            .lock()
            .expect("outbound lock is never poisoned") = None;
    }

    /// Registers an upload; its acknowledgements arrive on the returned receiver.
    pub(crate) fn bundle_acks(&self, id: &str) -> mpsc::Receiver<pcg_proto::v1::BundleAck> {
        let (tx, rx) = mpsc::channel(4);
        self.bundle_acks
            .lock()
            .expect("bundle lock is never poisoned")
            .insert(id.to_string(), tx);
        rx
    }

    pub(crate) fn forget_bundle(&self, id: &str) {
        self.bundle_acks
            .lock()
            .expect("bundle lock is never poisoned")
            .remove(id);
    }

    /// Hands a bundle acknowledgement from the broker to its upload.
    pub(crate) fn bundle_ack(&self, ack: pcg_proto::v1::BundleAck) {
        let tx = self
            .bundle_acks
            .lock()
            .expect("bundle lock is never poisoned")
            .get(&ack.bundle_id)
            .cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(ack);
        }
    }

    pub(crate) fn is_running(&self, id: &str) -> bool {
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .contains(id)
    }

    /// Returns false when `id` is already executing.
    pub(crate) fn mark_running(&self, id: &str) -> bool {
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .insert(id.to_string())
    }

    pub(crate) fn unmark_running(&self, id: &str) {
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .remove(id);
    }
}

/// Runs the gateway: resumes interrupted executions, serves the admin socket, keeps the tunnel
/// up, and prunes the journal, until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    registry: executor::Registry,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let store = store::Store::open(&cfg.data_dir)?;
    let gw = Arc::new(Gateway::new(cfg, store, registry));
    baremetal::restore(&gw.bare_metal, &gw.store);
    let interrupted = gw.store.running()?;
    if !interrupted.is_empty() {
        tracing::warn!(
            count = interrupted.len(),
            "resuming commands interrupted by a restart"
        );
    }
    for e in interrupted {
        executor::spawn_execution(gw.clone(), e, true);
    }
    let socket = gw.cfg.admin_socket_path();
    let admin = tokio::spawn(admin::serve(gw.clone(), socket.clone()));
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = gw.cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (metrics_listen): {e}"))?;
        let (gw2, stop) = (gw.clone(), metrics_stop.clone());
        tokio::spawn(async move {
            pcg_obs::serve_metrics(l, Arc::new(move || gw2.render_metrics()), async move {
                stop.cancelled().await
            })
            .await;
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(watch::run(gw.clone(), stop_rx.clone()));
    let tunnel = tokio::spawn(tunnel::run(gw.clone(), stop_rx));
    let retention_ms =
        i64::try_from(gw.cfg.journal_retention_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let gw2 = gw.clone();
    let pruner = tokio::spawn(async move {
        let mut t = tokio::time::interval(std::time::Duration::from_secs(600));
        loop {
            t.tick().await;
            match gw2.store.prune(retention_ms) {
                Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot old journal entries"),
                Ok(_) => {}
                Err(e) => tracing::warn!("journal pruning failed: {e}"),
            }
        }
    });
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => {}
        r = admin => {
            let msg = match r {
                Ok(Ok(())) => "admin socket closed".to_string(),
                Ok(Err(e)) => format!("admin socket {}: {e}", socket.display()),
                Err(e) => e.to_string(),
            };
            anyhow::bail!(msg);
        }
    }
    let _ = stop_tx.send(true);
    let _ = tunnel.await;
    let _ = watcher.await;
    metrics_stop.cancel();
    pruner.abort();
    gw.store.flush().await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
