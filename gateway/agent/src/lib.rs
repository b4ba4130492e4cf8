//! pcg-gateway: the on-premises daemon of pcg.
//!
//! - [`pairing`]: token → key pair + CSR → certificate, CA pinned from the token.
//! - [`tunnel`]: the outbound mTLS gRPC tunnel to the broker, heartbeats, backoff, transport
//!   fallback.
//! - [`transport`]: how the SaaS is reached: proxies, pinned TLS, the WebSocket transport.
//! - [`executor`]: exactly-once execution through the journal and outbox, and the handler
//!   registry provider drivers fill.
//! - [`executions`]: executions under way: cancel, deadline and drain, progress reports.
//! - [`store`]: sled: identity (private key sealed), journal, outbox.
//! - [`admin`]: the owner-only Unix socket pcgctl talks to.
//! - [`endpoints`]: vCenters and OpenStack clouds enrolled by name.
//! - [`metrics`]: Prometheus metrics on `metrics_listen` (off by default).
//! - [`bundle`]: support bundles, written locally or uploaded up the tunnel.
//! - [`notify`]: systemd readiness and watchdog (sd_notify; a no-op outside systemd).
//! - [`diag`]: `pcgctl diag`, the hop-by-hop doctor (in the daemon or in pcgctl).
//! - [`schemas`]: the JSON Schemas of command payloads (`pcg-gateway schemas`).
//! - [`watch`]: declared machines converged, watched, healed by policy; health reports.
//! - [`status`], [`config`].
//!
//! [`run`] starts everything and returns when `shutdown` resolves, after draining: no new
//! commands are taken, running ones get `drain_grace_ms` to finish and are then stopped and
//! recorded as `interrupted`, so a clean stop leaves no command running. Background work
//! (tunnel, journal pruning) is supervised: a task that panics is logged and restarted.

pub mod admin;
pub mod baremetal;
pub mod bundle;
pub mod config;
pub mod diag;
pub mod endpoints;
pub mod executions;
pub mod executor;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod openstack;
pub mod pairing;
pub mod schemas;
pub mod status;
pub mod store;
pub mod transport;
pub mod tunnel;
pub mod vsphere;
pub mod watch;

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
    /// Results that found the tunnel's queue full: the tunnel's result pump sends them as soon
    /// as there is room (see [`executor::send_result`]).
    pub(crate) overflow: executor::Overflow,
    started: Instant,
    tunnel: Mutex<TunnelStatus>,
    /// When the tunnel status last changed (Unix ms): the tunnel loop's progress, which the
    /// systemd watchdog checks.
    tunnel_progress_ms: std::sync::atomic::AtomicI64,
    outbound: Mutex<Option<mpsc::Sender<GatewayFrame>>>,
    /// Executions under way (their cancellation and progress).
    pub(crate) executions: executions::Executions,
    /// Every execution task (and its progress forwarder): a stop waits for them.
    pub(crate) exec_tasks: tokio_util::task::TaskTracker,
    /// Supervised background tasks (tunnel, pruner, metrics listener, and what others add).
    pub tasks: tokio_util::task::TaskTracker,
    /// Fired when the gateway starts stopping: no new command is taken, background loops end.
    pub stopping: tokio_util::sync::CancellationToken,
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
            overflow: executor::Overflow::default(),
            metrics: metrics::Metrics::default(),
            watch: watch::Watch::default(),
            started: Instant::now(),
            tunnel: Mutex::new(TunnelStatus::default()),
            tunnel_progress_ms: std::sync::atomic::AtomicI64::new(store::now_ms()),
            outbound: Mutex::new(None),
            executions: executions::Executions::default(),
            exec_tasks: tokio_util::task::TaskTracker::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            stopping: tokio_util::sync::CancellationToken::new(),
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
            running: self.executions.len(),
            outbox_depth: self.store.outbox_depth(),
            uptime_s: self.started.elapsed().as_secs(),
            clock_unix_ms: store::now_ms(),
            command_kinds: self.registry.kinds(),
            firstboot: status::read_firstboot(&self.cfg.data_dir),
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
        self.tunnel_progress_ms
            .store(store::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// When the tunnel loop last updated its status (Unix ms).
    pub fn tunnel_progress_ms(&self) -> i64 {
        self.tunnel_progress_ms
            .load(std::sync::atomic::Ordering::Relaxed)
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
        self.executions.get(id).is_some()
    }

    /// Returns false when `id` is already executing.
    pub(crate) fn mark_running(&self, id: &str) -> bool {
        self.executions.begin(id).is_some()
    }

    pub(crate) fn unmark_running(&self, id: &str) {
        self.executions.end(id);
    }

    /// Whether the gateway is stopping (it takes no new command).
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Runs a background loop made by `make` on [`tasks`](Self::tasks), supervised: when it
    /// panics it is logged and started again (after a second), unless the gateway is stopping;
    /// when it returns it is done.
    pub fn supervise<F, Fut>(self: &Arc<Self>, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let gw = self.clone();
        self.tasks.spawn(async move {
            loop {
                match tokio::spawn(make()).await {
                    Ok(()) => return,
                    Err(e) if e.is_panic() => {
                        tracing::error!(
                            task = name,
                            "background task failed: {e}; restarting it in 1 s"
                        );
                        gw.metrics.task_restarts.inc();
                    }
                    Err(_) => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = gw.stopping.cancelled() => return,
                }
            }
        });
    }
}

/// Runs the gateway: resumes interrupted executions, serves the admin socket, keeps the tunnel
/// up, and prunes the journal, until `shutdown` resolves; then drains (see [`drain`]).
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
    if let Some(addr) = gw.cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (metrics_listen): {e}"))?;
        let gw2 = gw.clone();
        let stop = gw.stopping.clone();
        // Each request is served on a task of its own: the listener loop itself does not panic.
        gw.tasks.spawn(async move {
            pcg_obs::serve_metrics(l, Arc::new(move || gw2.render_metrics()), async move {
                stop.cancelled().await
            })
            .await;
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let (gw2, rx) = (gw.clone(), stop_rx.clone());
        gw.supervise("watch loop", move || watch::run(gw2.clone(), rx.clone()));
    }
    {
        let gw2 = gw.clone();
        gw.supervise("tunnel", move || tunnel::run(gw2.clone(), stop_rx.clone()));
    }
    let retention_ms =
        i64::try_from(gw.cfg.journal_retention_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    {
        let gw2 = gw.clone();
        gw.supervise("journal pruning", move || {
            let gw = gw2.clone();
            async move {
                let mut t = tokio::time::interval(std::time::Duration::from_secs(600));
                loop {
                    tokio::select! {
                        _ = t.tick() => {}
                        _ = gw.stopping.cancelled() => return,
                    }
                    // Off the runtime's threads: a busy gateway forgets many entries at once.
                    let pruning = gw.clone();
                    match tokio::task::spawn_blocking(move || pruning.store.prune(retention_ms))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {
                            tracing::info!(pruned = n, "forgot old journal entries")
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("journal pruning failed: {e}"),
                        Err(e) => tracing::warn!("journal pruning stopped: {e}"),
                    }
                }
            }
        });
    }
    notify::ready();
    // The tunnel and the journal pruning are supervised (restarted when they fail); the
    // watchdog checks the tunnel loop's progress and that the admin socket still runs.
    let watchdog = notify::watchdog_interval().map(|interval| {
        let admin_done = admin.abort_handle();
        tokio::spawn(notify::run(gw.clone(), interval, move || {
            if admin_done.is_finished() {
                return Err("the admin socket task has ended".to_string());
            }
            Ok(())
        }))
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
            gw.stopping.cancel();
            let _ = stop_tx.send(true);
            anyhow::bail!(msg);
        }
    }
    notify::stopping();
    drain(&gw).await;
    // Background work ends: the tunnel (after the drain's results went out on it), pruning,
    // metrics.
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = stop_tx.send(true);
    gw.tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(10), gw.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = gw.tasks.len(),
            "background tasks still running after 10 s; stopping anyway"
        );
    }
    gw.store.flush().await?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(())
}

/// Drains the gateway: it takes no new command (the tunnel leaves new deliveries to the broker,
/// which delivers them again later; the admin socket refuses work), running executions get
/// `drain_grace_ms` to finish, and those still running then are stopped as `interrupted` and
/// their results journaled, so none stays running. Results go up the tunnel while it is up
/// (the drain waits a little for their acknowledgements); the rest when it next connects.
pub async fn drain(gw: &Arc<Gateway>) {
    gw.stopping.cancel();
    let grace = std::time::Duration::from_millis(gw.cfg.drain_grace_ms);
    let running = gw.executions.len();
    if running > 0 {
        tracing::info!(
            running,
            "stopping: taking no new commands; waiting up to {} ms (drain_grace_ms) for the running ones",
            grace.as_millis()
        );
    }
    gw.exec_tasks.close();
    if tokio::time::timeout(grace, gw.exec_tasks.wait())
        .await
        .is_err()
    {
        let why = executions::Stop::Interrupted(format!(
            "the gateway was stopped (SIGTERM) and this command did not finish within drain_grace_ms ({} ms); it is not run again; send it again if needed",
            grace.as_millis()
        ));
        let n = gw.executions.stop_all(&why);
        tracing::warn!(
            stopped = n,
            "drain grace over: stopping the commands still running"
        );
        let bound = executor::CANCEL_GRACE + std::time::Duration::from_secs(5);
        if tokio::time::timeout(bound, gw.exec_tasks.wait())
            .await
            .is_err()
        {
            tracing::error!(
                left = gw.executions.len(),
                "commands still not recorded after {} s; they resume when the gateway starts again",
                bound.as_secs()
            );
        }
    }
    // Results still unacknowledged get a moment to be acknowledged on a live tunnel.
    if gw.outbound().is_some() && gw.store.outbox_depth() > 0 {
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while gw.store.outbox_depth() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use serde_json::json;

    use crate::store::{EntryState, JournalEntry};

    fn gateway(dir: &std::path::Path, grace_ms: u64) -> Arc<Gateway> {
        let cfg = Config {
            data_dir: dir.to_path_buf(),
            drain_grace_ms: grace_ms,
            ..Config::default()
        };
        let store = store::Store::open(dir).expect("store");
        let mut registry = executor::Registry::builtin(None);
        // Never looks at its token: abandoned when stopped.
        registry.register(
            "test.hang",
            |_ctx: executor::ExecContext, _p: serde_json::Value| async move {
                std::future::pending::<()>().await;
                Ok(json!({}))
            },
        );
        registry.register(
            "test.panic",
            |_ctx: executor::ExecContext, _p: serde_json::Value| async move {
                tokio::task::yield_now().await;
                panic!("the handler gave up");
            },
        );
        Arc::new(Gateway::new(cfg, store, registry))
    }

    /// A gateway whose frames to the broker come out of the receiver.
    fn connected(
        dir: &std::path::Path,
    ) -> (Arc<Gateway>, mpsc::Receiver<pcg_proto::v1::GatewayFrame>) {
        let gw = gateway(dir, 300);
        let (tx, rx) = mpsc::channel(8);
        gw.set_outbound(tx);
        (gw, rx)
    }

    /// The journaled result of `id`, once it has one.
    async fn result_of(gw: &Gateway, id: &str) -> store::StoredResult {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(r) = gw.store.entry(id).expect("read").and_then(|e| e.result) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{id} has a result in time"))
    }

    /// Journals `id` as running (its first delivery).
    fn begin(gw: &Gateway, id: &str, kind: &str, payload: serde_json::Value) -> JournalEntry {
        let entry = JournalEntry {
            id: id.into(),
            kind: kind.into(),
            payload,
            state: EntryState::Running,
            received_ms: store::now_ms(),
            result: None,
            acked_ms: None,
            deadline_ms: None,
        };
        assert!(gw.store.begin(&entry).expect("journal").is_none());
        entry
    }

    fn start(gw: &Arc<Gateway>, id: &str, kind: &str, payload: serde_json::Value) {
        let entry = begin(gw, id, kind, payload);
        executor::spawn_execution(gw.clone(), entry, false);
    }

    #[tokio::test]
    async fn a_drain_leaves_nothing_running_and_records_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = gateway(dir.path(), 300);
        start(&gw, "c_short", "gateway.sleep", json!({ "ms": 50 }));
        start(&gw, "c_long", "gateway.sleep", json!({ "ms": 60000 }));
        start(&gw, "c_hang", "test.hang", json!({}));
        assert_eq!(gw.executions.len(), 3);
        tokio::time::timeout(Duration::from_secs(30), drain(&gw))
            .await
            .expect("the drain ends");
        assert!(gw.executions.is_empty());
        assert!(gw.is_stopping());
        let result = |id: &str| {
            let e = gw.store.entry(id).expect("read").expect("journaled");
            assert_eq!(e.state, EntryState::Done, "{id}");
            e.result.expect("result")
        };
        assert!(result("c_short").ok);
        for id in ["c_long", "c_hang"] {
            let r = result(id);
            assert!(!r.ok, "{id}");
            assert_eq!(r.error_class, "interrupted", "{id}: {}", r.error_message);
            assert!(
                r.error_message.contains("drain_grace_ms (300 ms)"),
                "{id}: {}",
                r.error_message
            );
        }
        assert!(result("c_hang")
            .error_message
            .contains("cannot stop part-way"));
        // All three wait in the outbox for the next tunnel.
        assert_eq!(gw.store.outbox_depth(), 3);
    }

    #[tokio::test]
    async fn a_cancel_before_delivery_is_journaled_and_wins_over_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = gateway(dir.path(), 300);
        executor::on_cancel(&gw, "c_1", "not needed");
        let e = gw.store.entry("c_1").expect("read").expect("journaled");
        assert_eq!(e.state, EntryState::Done);
        let r = e.result.expect("result");
        assert_eq!(r.error_class, "cancelled");
        assert!(
            r.error_message.contains("not needed"),
            "{}",
            r.error_message
        );
        // Cancelling a running one stops it.
        start(&gw, "c_2", "gateway.sleep", json!({ "ms": 60000 }));
        executor::on_cancel(&gw, "c_2", "stop");
        let r = result_of(&gw, "c_2").await;
        assert_eq!(r.error_class, "cancelled");
        assert!(
            r.error_message.starts_with("cancelled: stop"),
            "{}",
            r.error_message
        );
    }

    #[tokio::test]
    async fn a_handler_that_panics_fails_its_command_and_the_gateway_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = gateway(dir.path(), 300);
        start(&gw, "c_panic", "test.panic", json!({}));
        let r = result_of(&gw, "c_panic").await;
        assert!(!r.ok);
        assert_eq!(r.error_class, "internal");
        assert!(
            r.error_message
                .contains("the handler of test.panic panicked: the handler gave up"),
            "{}",
            r.error_message
        );
        // Unmarked once the result is durable, just after the journal shows it.
        tokio::time::timeout(Duration::from_secs(30), async {
            while !gw.executions.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("nothing left running");
        start(&gw, "c_echo", "gateway.echo", json!({ "a": 1 }));
        let r = result_of(&gw, "c_echo").await;
        assert!(r.ok, "{}", r.error_message);
        assert_eq!(r.output, json!({ "echo": { "a": 1 } }));
    }

    /// A result goes to the broker before this side's flush of it has finished (the broker
    /// makes it durable before anything depends on it); an acknowledgement that comes back
    /// meanwhile finds it in the outbox; once the flush runs, both are durable.
    #[tokio::test]
    async fn a_result_is_sent_without_waiting_for_its_flush() {
        use pcg_proto::v1::gateway_frame::Kind;
        let dir = tempfile::tempdir().expect("tempdir");
        let (gw, mut rx) = connected(dir.path());
        let held = gw.store.held_flushes.write().await;
        let flushes = gw.store.flushes();
        start(&gw, "c_echo", "gateway.echo", json!({ "a": 1 }));
        let frame = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the result is sent while its flush waits")
            .expect("a frame");
        let Some(Kind::Result(r)) = frame.kind else {
            panic!("a result frame, got {frame:?}");
        };
        assert_eq!(r.command_id, "c_echo");
        assert!(r.ok, "{}", r.error_message);
        assert_eq!(gw.store.outbox_depth(), 1);
        assert_eq!(gw.store.flushes(), flushes, "nothing flushed yet");
        assert_eq!(gw.exec_tasks.len(), 1, "the execution waits for its flush");
        gw.store.ack("c_echo");
        assert_eq!(gw.store.outbox_depth(), 0);
        drop(held);
        gw.exec_tasks.close();
        tokio::time::timeout(Duration::from_secs(30), gw.exec_tasks.wait())
            .await
            .expect("the execution ends once its flush is done");
        assert!(gw.store.flushes() > flushes);
        drop(gw);
        let store = store::Store::open(dir.path()).expect("reopen");
        let e = store.entry("c_echo").expect("read").expect("journaled");
        assert_eq!(e.state, EntryState::Done);
        assert!(e.result.expect("result").ok);
        assert!(store.outbox().expect("outbox").is_empty(), "acknowledged");
    }

    /// A delivery of an id journaled as running with no execution (the flush of its first
    /// delivery failed) runs it only once a flush has made the entry durable: while flushes are
    /// held nothing is received or run, and once they go the command is received, run once and
    /// answered.
    #[tokio::test]
    async fn a_redelivered_entry_without_an_execution_runs_only_after_a_flush() {
        use pcg_proto::v1::gateway_frame::Kind;
        let dir = tempfile::tempdir().expect("tempdir");
        let (gw, mut rx) = connected(dir.path());
        begin(&gw, "c_again", "gateway.echo", json!({ "a": 1 }));
        let held = gw.store.held_flushes.write().await;
        let (failed, mut failures) = mpsc::channel(1);
        let cmd = pcg_proto::v1::Command {
            id: "c_again".into(),
            kind: "gateway.echo".into(),
            payload: br#"{"a":1}"#.to_vec(),
            ..Default::default()
        };
        executor::on_command(&gw, cmd, &failed).expect("handled");
        assert!(gw.is_running("c_again"), "joined by a delivery from now on");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err(),
            "nothing is received or run before the flush"
        );
        drop(held);
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            let frame = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("received and answered once the flush is done")
                .expect("a frame");
            match frame.kind {
                Some(Kind::Received(r)) => kinds.push(format!("received {}", r.command_id)),
                Some(Kind::Result(r)) => {
                    assert!(r.ok, "{}", r.error_message);
                    kinds.push(format!("result {}", r.command_id));
                }
                other => panic!("an unexpected frame {other:?}"),
            }
        }
        assert_eq!(kinds, ["received c_again", "result c_again"]);
        assert!(failures.try_recv().is_err(), "no journal failure");
    }

    #[tokio::test]
    async fn a_supervised_task_that_panics_is_restarted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = gateway(dir.path(), 300);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        gw.supervise("test", move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run fails");
                }
            }
        });
        gw.tasks.close();
        tokio::time::timeout(Duration::from_secs(30), gw.tasks.wait())
            .await
            .expect("the second run returns");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(gw.metrics.task_restarts.get(), 1);
    }
}
