//! The broker: the gRPC `Broker` service every paired gateway holds one tunnel to.
//!
//! A tunnel is authorised by the gateway's client certificate alone (mutual TLS against the
//! SaaS CA; the identity is the `pcg://tenant/T/gateway/G` URI in the certificate). On Hello the
//! broker answers Welcome, replays every command still pending for that gateway and sends its
//! declared machines ([`crate::watch`]); a command
//! stays pending until the gateway's result for it is stored and flushed, and only then is the
//! result acknowledged (`ResultAck`). A tunnel silent for three heartbeat intervals is closed.
//! A newer tunnel of the same gateway replaces the older one. When the service stops, every
//! tunnel gets a Goodbye that asks the gateway to redial a little later.
//!
//! `Check` authenticates a gateway the same way and answers who its certificate names and the
//! broker's clock, registering nothing: `pcgctl diag` asks it while the tunnel stays up.
//!
//! A command's progress (`CommandProgress`) is kept on the command in memory. A cancel asked for
//! a command that may be on its gateway goes down as `CancelCommand`, at once and, in place of
//! the command itself, in the replay of every later tunnel, until the gateway's result ends it.
//!
//! The service runs on [`crate::net`]'s listener: the TLS handshake there asks for a client
//! certificate, and the connection's [`ConnInfo`] travels with each request.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt as _};
use pcg_proto::v1::broker_frame::Kind as BKind;
use pcg_proto::v1::broker_server::{Broker, BrokerServer};
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{
    BrokerFrame, CheckRequest, CheckResponse, Command as PCommand, GatewayFrame, Goodbye,
    Heartbeat, RenewResponse, ResultAck, Welcome,
};
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status, Streaming};

use crate::app::{printable, App, AppError};
use crate::net::ConnInfo;
use crate::store::{now_ms, Command, CommandResult, GatewayPatch, Op};

/// A tunnel's outbound queue. Frames travel boxed: the queue allocates its first block of 32
/// slots when the tunnel opens, and boxed slots keep that block at a few hundred bytes instead
/// of 3 KiB per idle tunnel (BENCHMARKS.md, "Memory per idle tunnel").
#[derive(Clone)]
pub struct Tx(mpsc::Sender<Box<Result<BrokerFrame, Status>>>);

type Queued = Box<Result<BrokerFrame, Status>>;

impl Tx {
    pub async fn send(
        &self,
        f: Result<BrokerFrame, Status>,
    ) -> Result<(), mpsc::error::SendError<Queued>> {
        self.0.send(Box::new(f)).await
    }

    pub fn try_send(
        &self,
        f: Result<BrokerFrame, Status>,
    ) -> Result<(), mpsc::error::TrySendError<Queued>> {
        self.0.try_send(Box::new(f))
    }
}

/// How long a stopping broker asks gateways to wait before they redial.
pub const STOP_RETRY_AFTER_MS: u64 = 1_000;

/// One live tunnel.
#[derive(Clone)]
pub struct Tunnel {
    /// Distinguishes successive tunnels of the same gateway.
    pub conn_id: u64,
    pub tx: Tx,
    /// Tells the tunnel's session task to end (revocation, replacement, stop).
    pub close: Arc<Notify>,
    pub connected_ms: i64,
    /// How the tunnel arrived (`direct` or `websocket`), from where, and the SHA-256 of the
    /// client certificate that authenticated it.
    pub transport: &'static str,
    pub remote: std::net::SocketAddr,
    pub certificate_sha256: String,
    /// When a frame last arrived (Unix ms): kept in memory, written to the gateway's record
    /// when the tunnel closes, not on every heartbeat.
    pub last_seen_ms: Arc<std::sync::atomic::AtomicI64>,
}

/// Live tunnels by gateway id.
#[derive(Default)]
pub struct Tunnels(Mutex<HashMap<String, Tunnel>>);

impl Tunnels {
    pub fn get(&self, gateway_id: &str) -> Option<Tunnel> {
        self.0
            .lock()
            .expect("tunnels lock is never poisoned")
            .get(gateway_id)
            .cloned()
    }

    pub fn count(&self) -> usize {
        self.0.lock().expect("tunnels lock is never poisoned").len()
    }

    fn insert(&self, gateway_id: &str, t: Tunnel) -> Option<Tunnel> {
        self.0
            .lock()
            .expect("tunnels lock is never poisoned")
            .insert(gateway_id.to_string(), t)
    }

    fn remove_if(&self, gateway_id: &str, conn_id: u64) -> bool {
        let mut m = self.0.lock().expect("tunnels lock is never poisoned");
        if m.get(gateway_id).is_some_and(|t| t.conn_id == conn_id) {
            m.remove(gateway_id);
            true
        } else {
            false
        }
    }

    /// Closes the tunnel of `gateway_id`, if any, telling the gateway why.
    pub fn close(&self, gateway_id: &str, reason: &str, permanent: bool) {
        let t = self
            .0
            .lock()
            .expect("tunnels lock is never poisoned")
            .remove(gateway_id);
        if let Some(t) = t {
            let _ = t.tx.try_send(Ok(goodbye(reason, permanent, 0)));
            t.close.notify_one();
        }
    }

    /// Closes up to `n` tunnels, the most recently connected first, asking each gateway to
    /// redial after `retry_after_ms` (a gateway told so moves to the next of its brokers);
    /// returns how many.
    pub fn shed(&self, n: usize, reason: &str, retry_after_ms: u64) -> usize {
        let picked: Vec<Tunnel> = {
            let mut m = self.0.lock().expect("tunnels lock is never poisoned");
            let mut ids: Vec<(i64, String)> = m
                .iter()
                .map(|(id, t)| (t.connected_ms, id.clone()))
                .collect();
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.into_iter()
                .take(n)
                .filter_map(|(_, id)| m.remove(&id))
                .collect()
        };
        for t in &picked {
            let _ = t.tx.try_send(Ok(goodbye(reason, false, retry_after_ms)));
            t.close.notify_one();
        }
        picked.len()
    }

    /// Closes every tunnel, asking each gateway to redial after `retry_after_ms`.
    pub fn close_all(&self, reason: &str, retry_after_ms: u64) {
        let all: Vec<Tunnel> = self
            .0
            .lock()
            .expect("tunnels lock is never poisoned")
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in all {
            let _ = t.tx.try_send(Ok(goodbye(reason, false, retry_after_ms)));
            t.close.notify_one();
        }
    }
}

fn goodbye(reason: &str, permanent: bool, retry_after_ms: u64) -> BrokerFrame {
    BrokerFrame {
        kind: Some(BKind::Goodbye(Goodbye {
            reason: reason.to_string(),
            permanent,
            retry_after_ms,
        })),
    }
}

fn command_frame(c: &Command) -> BrokerFrame {
    BrokerFrame {
        kind: Some(BKind::Command(PCommand {
            id: c.id.clone(),
            kind: c.kind.clone(),
            payload: serde_json::to_vec(&c.payload).expect("JSON values serialise"),
            submitted_unix_ms: c.submitted_ms,
            delivery: c.deliveries,
            deadline_unix_ms: c.deadline_ms.unwrap_or(0),
        })),
    }
}

/// The frame asking a gateway to cancel `c`.
pub fn cancel_frame(c: &Command) -> BrokerFrame {
    BrokerFrame {
        kind: Some(BKind::Cancel(pcg_proto::v1::CancelCommand {
            command_id: c.id.clone(),
            reason: c
                .cancel
                .as_ref()
                .map(|r| r.reason.clone())
                .unwrap_or_default(),
        })),
    }
}

/// Why a tunnel's session ended (recorded in the `gateway.disconnected` event).
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("the gateway closed the tunnel")]
    ByGateway,
    #[error("tunnel error: {0}")]
    Stream(String),
    #[error("silent for {0} ms (three heartbeat intervals)")]
    Silent(u128),
    #[error("closed by the broker (revoked, replaced or not draining)")]
    ByBroker,
    #[error("the broker is stopping")]
    Stopping,
    #[error("cannot store result of command {command}: {message}")]
    Store { command: String, message: String },
    #[error("tunnel congested or ended while acknowledging a result")]
    Congested,
    #[error("Hello sent twice")]
    HelloTwice,
}

/// A support bundle being received on a tunnel.
struct Upload {
    total: u64,
    sha256: String,
    data: Vec<u8>,
}

/// Takes one chunk of a bundle; returns the acknowledgement to send.
async fn bundle_chunk(
    app: &App,
    tenant_id: &str,
    gateway_id: &str,
    uploads: &mut HashMap<String, Upload>,
    c: pcg_proto::v1::BundleChunk,
) -> pcg_proto::v1::BundleAck {
    use sha2::Digest as _;
    let refuse = |uploads: &mut HashMap<String, Upload>, id: &str, error: String| {
        uploads.remove(id);
        pcg_proto::v1::BundleAck {
            bundle_id: id.to_string(),
            received: 0,
            error,
        }
    };
    if !crate::app::plausible_id(&c.bundle_id) {
        return refuse(uploads, &c.bundle_id, "malformed bundle id".into());
    }
    if c.total_size > app.cfg.max_bundle_bytes {
        return refuse(
            uploads,
            &c.bundle_id,
            format!(
                "the bundle is {} bytes; this SaaS takes at most {} (max_bundle_bytes)",
                c.total_size, app.cfg.max_bundle_bytes
            ),
        );
    }
    let up = uploads
        .entry(c.bundle_id.clone())
        .or_insert_with(|| Upload {
            total: c.total_size,
            sha256: c.sha256.clone(),
            data: Vec::new(),
        });
    if c.offset != up.data.len() as u64 || c.total_size != up.total || c.sha256 != up.sha256 {
        let got = up.data.len();
        return refuse(
            uploads,
            &c.bundle_id,
            format!(
                "chunk at offset {} out of order (have {got} bytes); send the bundle again",
                c.offset
            ),
        );
    }
    if up.data.len() as u64 + c.data.len() as u64 > up.total {
        return refuse(
            uploads,
            &c.bundle_id,
            "more data than the announced size".into(),
        );
    }
    up.data.extend_from_slice(&c.data);
    let received = up.data.len() as u64;
    if received < up.total {
        return pcg_proto::v1::BundleAck {
            bundle_id: c.bundle_id,
            received,
            error: String::new(),
        };
    }
    let Some(up) = uploads.remove(&c.bundle_id) else {
        return refuse(uploads, &c.bundle_id, "lost track of the upload".into());
    };
    let digest = hex::encode(sha2::Sha256::digest(&up.data));
    if digest != up.sha256 {
        return refuse(
            uploads,
            &c.bundle_id,
            format!(
                "the bundle's SHA-256 is {digest}, not the announced {}; send it again",
                up.sha256
            ),
        );
    }
    let rec = crate::store::BundleRecord {
        id: c.bundle_id.clone(),
        tenant_id: tenant_id.to_string(),
        gateway_id: gateway_id.to_string(),
        size: up.total,
        sha256: digest,
        created_ms: now_ms(),
    };
    // A bundle is kept by the replica that received it (it is too large for the cluster's
    // log); its event goes to every replica.
    let stored = async {
        app.store
            .put_bundle(&rec, &up.data, app.cfg.bundles_per_gateway.max(1))?;
        app.event(
            Some(tenant_id),
            Some(gateway_id),
            "gateway.bundle_uploaded",
            format!(
                "gateway {gateway_id} uploaded support bundle {} ({} bytes)",
                rec.id, rec.size
            ),
        )
        .await?;
        Ok::<_, AppError>(app.store.flush().await?)
    };
    match stored.await {
        Ok(()) => pcg_proto::v1::BundleAck {
            bundle_id: c.bundle_id,
            received,
            error: String::new(),
        },
        Err(e) => refuse(
            uploads,
            &c.bundle_id,
            format!("the SaaS could not store the bundle: {e}"),
        ),
    }
}

/// How long a frame for a gateway (a command, a cancel, a result's acknowledgement) may wait
/// for room in its tunnel's queue before the tunnel is taken for stuck and closed.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// Offers `frame` to a tunnel's queue, waiting up to [`DELIVERY_WAIT`] for room. A tunnel that
/// takes nothing for that long is taken for stuck and closed through `close` (its session then
/// ends and unregisters it): the gateway redials and gets what is still pending in the replay,
/// and sends again the results it has not seen acknowledged. Returns whether it was queued.
async fn send_or_close(tx: &Tx, close: &Notify, gateway_id: &str, frame: BrokerFrame) -> bool {
    match tokio::time::timeout(DELIVERY_WAIT, tx.send(Ok(frame))).await {
        Ok(Ok(())) => true,
        // The tunnel ended: what it did not take goes out on the next one.
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::warn!(gateway = %gateway_id, "tunnel not draining; closing it so the gateway redials");
            close.notify_one();
            false
        }
    }
}

/// Hands a freshly stored command to its gateway's tunnel if one is up. If the tunnel cannot
/// take it within a few seconds the tunnel is closed, so that the gateway redials and gets the
/// command through the replay of pending commands; nothing is lost either way.
pub async fn deliver(app: &App, cmd: &Command) {
    let Some(t) = app.tunnels.get(&cmd.gateway_id) else {
        return;
    };
    // A replica records the first handing out in the cluster's log, so that no replica ends
    // the command as never delivered (a cancel, a deadline) once it may have reached its
    // gateway; the log's order decides between the two.
    // Without the cluster's quorum it is tried again (backing off to 2 s) for as long as the
    // tunnel is up and the command waits.
    let mut pause = Duration::from_millis(100);
    while app.log.is_cluster() && !app.commands.cached(&cmd.id).is_some_and(|c| c.handed_out) {
        match app
            .commit(Op::CommandHandedOut { id: cmd.id.clone() })
            .await
        {
            Ok(done) => {
                if done.command().is_none() {
                    return; // it ended first
                }
                break;
            }
            Err(e) => {
                tracing::warn!(command = %cmd.id, "cannot record the delivery in the cluster's log: {e}; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = app.shutdown.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                let still = app
                    .tunnels
                    .get(&cmd.gateway_id)
                    .is_some_and(|n| n.conn_id == t.conn_id);
                if !still
                    || app
                        .commands
                        .cached(&cmd.id)
                        .is_none_or(|c| c.state.is_terminal())
                {
                    return;
                }
            }
        }
    }
    // Counted in memory only (see `crate::commands`); a finished command is not sent again.
    let Some(updated) = app.commands.delivered(&cmd.id) else {
        return;
    };
    if send_or_close(&t.tx, &t.close, &cmd.gateway_id, command_frame(&updated)).await {
        app.metrics.commands_delivered.inc();
    }
}

/// Sends the cancel asked for `cmd` on its gateway's tunnel, if one is up. A tunnel that does not
/// take it within 5 s is closed (the gateway redials and gets the cancel in the replay).
pub async fn send_cancel(app: &App, cmd: &Command) {
    let Some(t) = app.tunnels.get(&cmd.gateway_id) else {
        return;
    };
    send_or_close(&t.tx, &t.close, &cmd.gateway_id, cancel_frame(cmd)).await;
}

/// Who opened a tunnel, from its client certificate, and how it arrived.
struct Peer {
    tenant_id: String,
    gateway_id: String,
    /// The certified public key (SEC1 point).
    key: Vec<u8>,
    certificate_sha256: String,
    transport: &'static str,
    remote: std::net::SocketAddr,
}

/// The identity in the client certificate of a request.
fn peer_identity<T>(req: &Request<T>) -> Result<Peer, Status> {
    let conn = req.extensions().get::<ConnInfo>();
    let certs = conn
        .and_then(|c| c.peer_certs.clone())
        .ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: the tunnel needs the certificate this gateway received at pairing; pair the gateway first",
            )
        })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| Status::unauthenticated("unreadable client certificate"))?;
    let key = x.public_key().subject_public_key.data.to_vec();
    let san = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| Status::unauthenticated("client certificate names no pcg identity"))?;
    for n in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(u) = n {
            if let Some((tenant_id, gateway_id)) = pcg_proto::pairing::parse_identity_uri(u) {
                use sha2::Digest as _;
                return Ok(Peer {
                    tenant_id,
                    gateway_id,
                    key,
                    certificate_sha256: hex::encode(sha2::Sha256::digest(leaf.as_ref())),
                    transport: conn.map_or("direct", |c| c.transport),
                    remote: conn
                        .map(|c| c.peer)
                        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                });
            }
        }
    }
    Err(Status::unauthenticated(
        "client certificate names no pcg identity",
    ))
}

pub struct BrokerService {
    app: Arc<App>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<BrokerFrame, Status>> + Send + 'static>>;

impl BrokerService {
    /// Records a refused tunnel as an event, at most once a minute per identity (a refused
    /// gateway may keep dialling; the events list must not fill with it).
    fn refused(&self, tenant_id: Option<&str>, gateway_id: &str, why: &str) {
        {
            let mut m = self
                .app
                .refused_events
                .lock()
                .expect("refused-events lock is never poisoned");
            let now = Instant::now();
            if m.get(gateway_id)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
            {
                return;
            }
            if m.len() > 10_000 {
                m.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
            }
            m.insert(gateway_id.to_string(), now);
        }
        tracing::warn!(gateway = %gateway_id, "tunnel refused: {why}");
        let (app, tenant_id, gateway_id, why) = (
            self.app.clone(),
            tenant_id.map(str::to_string),
            gateway_id.to_string(),
            why.to_string(),
        );
        self.app.tasks.spawn(async move {
            let _ = app
                .event(
                    tenant_id.as_deref(),
                    Some(&gateway_id),
                    "tunnel.refused",
                    why,
                )
                .await;
        });
    }

    /// A replica that does not know the peer's gateway (it may have just been paired on
    /// another replica) catches up with the cluster's log first.
    async fn catch_up_for(&self, peer: &Peer) {
        if self.app.log.is_cluster()
            && self
                .app
                .store
                .gateway(&peer.gateway_id)
                .ok()
                .flatten()
                .is_none()
        {
            if let Err(e) = self.app.catch_up().await {
                tracing::warn!(gateway = %printable(&peer.gateway_id), "cannot catch up with the cluster's log: {e}");
            }
        }
    }

    /// The gateway record of an authenticated peer: refused (`PermissionDenied`, recorded as a
    /// `tunnel.refused` event when `record` is set) when the SaaS does not know the gateway or
    /// revoked it.
    fn admit(&self, peer: &Peer, record: bool) -> Result<crate::store::Gateway, Status> {
        let (tenant_id, gateway_id) = (&peer.tenant_id, &peer.gateway_id);
        let gw = self
            .app
            .store
            .gateway(gateway_id)
            .map_err(|e| Status::unavailable(e.to_string()))?
            .filter(|g| &g.tenant_id == tenant_id);
        let Some(gw) = gw else {
            let known_tenant = self.app.store.tenant(tenant_id).ok().flatten().is_some();
            let why = format!(
                "gateway {} is not known to this SaaS; pair it again with a new token",
                printable(gateway_id)
            );
            if record {
                self.refused(known_tenant.then_some(tenant_id.as_str()), gateway_id, &why);
            }
            return Err(Status::permission_denied(why));
        };
        if gw.revoked_ms.is_some() {
            let why = format!(
                "gateway {gateway_id} was revoked by a tenant admin; pair it again with a new token"
            );
            if record {
                self.refused(Some(tenant_id), gateway_id, &why);
            }
            return Err(Status::permission_denied(why));
        }
        Ok(gw)
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    type OpenStream = FrameStream;

    async fn open(
        &self,
        req: Request<Streaming<GatewayFrame>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        if self.app.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "the broker is stopping; redial in a moment",
            ));
        }
        let peer = peer_identity(&req)?;
        let gateway_id = peer.gateway_id.clone();
        self.catch_up_for(&peer).await;
        let gw = self.admit(&peer, true)?;
        // Admission: a tunnel being set up (Hello, Welcome, replay) costs work; past the bound,
        // the gateway is told to come back a little later instead of queueing behind others.
        let Ok(setup) = self.app.tunnel_setups.clone().try_acquire_owned() else {
            let mut st =
                Status::unavailable("the broker is setting up many tunnels; come back in a moment");
            let wait = 500 + rand::random_range(0..2_000u64);
            if let Ok(v) = wait.to_string().parse() {
                st.metadata_mut().insert(pcg_proto::RETRY_AFTER_MS, v);
            }
            return Err(st);
        };
        let key_hex = hex::encode(&peer.key);
        if gw.public_key.as_deref() != Some(key_hex.as_str()) {
            let _ = self
                .app
                .commit(Op::GatewayChanged {
                    id: gateway_id.clone(),
                    patch: GatewayPatch {
                        public_key: Some(key_hex.clone()),
                        ..Default::default()
                    },
                })
                .await;
        }
        let (tx, rx) = mpsc::channel(4096);
        let inbound = req.into_inner();
        self.app
            .tasks
            .spawn(session(self.app.clone(), peer, inbound, Tx(tx), setup));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(|f| *f),
        )))
    }

    /// Authenticates the caller like `open` and says who it is, without touching its tunnel.
    /// A refusal is not recorded as an event: it is the gateway's own diagnosis asking.
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let peer = peer_identity(&req)?;
        self.catch_up_for(&peer).await;
        if let Err(s) = self.admit(&peer, false) {
            tracing::info!(gateway = %printable(&peer.gateway_id), "credential check refused: {}", s.message());
            return Err(s);
        }
        let skew = req.get_ref().clock_unix_ms - now_ms();
        tracing::debug!(gateway = %peer.gateway_id, transport = peer.transport, "credential check answered (clock skew {skew} ms)");
        Ok(Response::new(CheckResponse {
            tunnel_connected: self.app.tunnels.get(&peer.gateway_id).is_some(),
            tenant_id: peer.tenant_id,
            gateway_id: peer.gateway_id,
            clock_unix_ms: now_ms(),
            broker_version: crate::VERSION.to_string(),
        }))
    }
}

async fn session(
    app: Arc<App>,
    peer: Peer,
    mut inbound: Streaming<GatewayFrame>,
    tx: Tx,
    setup: tokio::sync::OwnedSemaphorePermit,
) {
    let (tenant_id, gateway_id) = (peer.tenant_id.clone(), peer.gateway_id.clone());
    let interval = Duration::from_millis(app.cfg.heartbeat_ms.max(100));
    // The first frame must be Hello.
    let hello = tokio::select! {
        r = tokio::time::timeout(interval * 3, inbound.message()) => r,
        _ = app.shutdown.cancelled() => return,
    };
    let hello = match hello {
        Ok(Ok(Some(GatewayFrame {
            kind: Some(GKind::Hello(h)),
        }))) => h,
        _ => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first frame of a tunnel must be Hello",
                )))
                .await;
            return;
        }
    };
    let conn_id: u64 = rand::random();
    let close = Arc::new(Notify::new());
    let now = now_ms();
    let last_seen = Arc::new(std::sync::atomic::AtomicI64::new(now));
    let old = app.tunnels.insert(
        &gateway_id,
        Tunnel {
            conn_id,
            tx: tx.clone(),
            close: close.clone(),
            connected_ms: now,
            transport: peer.transport,
            remote: peer.remote,
            certificate_sha256: peer.certificate_sha256.clone(),
            last_seen_ms: last_seen.clone(),
        },
    );
    app.metrics
        .tunnel_opens
        .get_or_create(&crate::metrics::TransportLabels {
            transport: peer.transport.to_string(),
        })
        .inc();
    app.metrics.tunnels.set(app.tunnels.count() as i64);
    if let Some(old) = old {
        let _ = old.tx.try_send(Ok(goodbye(
            "replaced by a newer tunnel of this gateway",
            false,
            0,
        )));
        old.close.notify_one();
    }
    let skew = hello.clock_unix_ms - now;
    let version: String = hello.gateway_version.chars().take(64).collect();
    let kinds: Vec<String> = hello
        .command_kinds
        .iter()
        .take(1024)
        .filter(|k| crate::app::commands::valid_kind(k))
        .cloned()
        .collect();
    // The session's rarely taken awaits are boxed: a task's future is as large as its largest
    // await, for the whole life of the tunnel, and most of that life is spent waiting for a
    // frame (BENCHMARKS.md, "Memory per idle tunnel").
    Box::pin(gateway_seen(
        &app,
        &tenant_id,
        &gateway_id,
        GatewayPatch {
            version: Some(version.clone()),
            command_kinds: Some(kinds.clone()),
            last_connected_ms: Some(now),
            last_seen_ms: Some(now),
            ..Default::default()
        },
        "gateway.connected",
        format!(
            "gateway {gateway_id} connected from {} over {} (version {}, clock skew {skew} ms)",
            peer.remote,
            peer.transport,
            printable(&version)
        ),
    ))
    .await;
    let welcome = BrokerFrame {
        kind: Some(BKind::Welcome(Welcome {
            tenant_id: tenant_id.clone(),
            gateway_id: gateway_id.clone(),
            heartbeat_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            clock_unix_ms: now_ms(),
            broker_version: crate::VERSION.to_string(),
        })),
    };
    if tx.send(Ok(welcome)).await.is_err() {
        app.tunnels.remove_if(&gateway_id, conn_id);
        return;
    }
    // Replay everything still pending, oldest first. A command with a cancel asked for gets
    // the cancel instead: the gateway stops it if it runs, keeps its result if it ended, and
    // records it as cancelled (never running it) if it never had it.
    for c in app.commands.pending(&gateway_id) {
        if c.cancel.is_some() {
            if !Box::pin(send_or_close(&tx, &close, &gateway_id, cancel_frame(&c))).await {
                // Not draining (or gone): the gateway redials and gets the replay again.
                break;
            }
        } else {
            Box::pin(deliver(&app, &c)).await;
        }
    }
    if !crate::watch::on_connect(&app, &gateway_id, &tx) {
        close.notify_one();
    }
    drop(setup);

    let mut last_frame = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut uploads: HashMap<String, Upload> = HashMap::new();
    let ctx = SessionCtx {
        app: app.clone(),
        close: close.clone(),
        results: std::sync::OnceLock::new(),
    };
    let reason = loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(frame)) => {
                    last_frame = Instant::now();
                    last_seen.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                    if let Some(GKind::BundleChunk(c)) = frame.kind {
                        let ack = Box::pin(bundle_chunk(&app, &tenant_id, &gateway_id, &mut uploads, c)).await;
                        if tx.try_send(Ok(BrokerFrame { kind: Some(BKind::BundleAck(ack)) })).is_err() {
                            break Closed::Congested;
                        }
                        continue;
                    }
                    if let Err(e) = Box::pin(handle_frame(&ctx, &tenant_id, &gateway_id, frame, &tx)).await {
                        break e;
                    }
                }
                Ok(None) => break Closed::ByGateway,
                Err(e) => break Closed::Stream(e.message().to_string()),
            },
            _ = ticker.tick() => {
                if last_frame.elapsed() > interval * 3 {
                    break Closed::Silent(last_frame.elapsed().as_millis());
                }
                seq += 1;
                let _ = tx.try_send(Ok(BrokerFrame { kind: Some(BKind::Heartbeat(Heartbeat {
                    seq, sent_unix_ms: now_ms(), echo_seq: 0, echo_sent_unix_ms: 0,
                }))}));
            }
            _ = close.notified() => break Closed::ByBroker,
            _ = app.shutdown.cancelled() => {
                let _ = tx.try_send(Ok(goodbye(
                    "the SaaS broker is stopping; redial in a moment",
                    false,
                    STOP_RETRY_AFTER_MS,
                )));
                break Closed::Stopping;
            }
        }
    };
    app.tunnels.remove_if(&gateway_id, conn_id);
    app.metrics.tunnel_closes.inc();
    app.metrics.tunnels.set(app.tunnels.count() as i64);
    Box::pin(gateway_seen(
        &app,
        &tenant_id,
        &gateway_id,
        GatewayPatch {
            last_seen_ms: Some(now_ms()),
            ..Default::default()
        },
        "gateway.disconnected",
        format!("gateway {gateway_id} tunnel closed: {reason}"),
    ))
    .await;
}

/// Records a tunnel's start or end: the gateway's record and an event. Failures are logged
/// only: a tunnel does not wait for bookkeeping (a lost quorum is the cluster's to report).
async fn gateway_seen(
    app: &App,
    tenant_id: &str,
    gateway_id: &str,
    patch: GatewayPatch,
    kind: &str,
    message: String,
) {
    let recorded = match app
        .commit(Op::GatewayChanged {
            id: gateway_id.to_string(),
            patch,
        })
        .await
    {
        Ok(_) => {
            app.event(Some(tenant_id), Some(gateway_id), kind, message)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        tracing::warn!(gateway = %gateway_id, "cannot record {kind}: {e}");
    }
}

/// What a frame's handling needs of its session beyond the frame.
struct SessionCtx {
    app: Arc<App>,
    /// Closes the session (a result that cannot be stored or acknowledged).
    close: Arc<Notify>,
    /// Results received, to the session's [`acknowledge`] task; the channel and the task are
    /// made with the tunnel's first result (an idle tunnel holds neither: together about 7 KiB).
    results: std::sync::OnceLock<mpsc::Sender<Received>>,
}

impl SessionCtx {
    /// The way to the session's acknowledging task, started with the first result.
    fn results(&self, gateway_id: &str, tx: &Tx) -> &mpsc::Sender<Received> {
        self.results.get_or_init(|| {
            let (results, received) = mpsc::channel(RESULTS_UNACKNOWLEDGED);
            self.app.tasks.spawn(acknowledge(
                self.app.clone(),
                gateway_id.to_string(),
                tx.clone(),
                self.close.clone(),
                received,
            ));
            results
        })
    }
}

/// Results a tunnel has received and not yet acknowledged, beyond which its reading waits.
const RESULTS_UNACKNOWLEDGED: usize = 4096;

/// A result received on a tunnel, for its acknowledgement.
struct Received {
    command_id: String,
    /// To record first (a replica's write goes through the cluster's log, which the tunnel's
    /// reading does not wait for); `None`: recorded already (one node writes it inline).
    to_record: Option<CommandResult>,
}

/// Acknowledges a tunnel's results once they are durable, without holding up its reading: it
/// takes every result received since its last round, records those still to record (a
/// replica's, concurrently), makes them durable with one flush (which joins the group commit of
/// every other write under way), wakes whoever waits for them and sends the acknowledgements.
/// A result the store cannot keep is not acknowledged, and the tunnel is closed: the gateway
/// sends it again. An acknowledgement waits for room behind the commands being delivered (a
/// burst fills the queue for a while), as a delivery does; a tunnel that takes nothing for
/// [`DELIVERY_WAIT`] is closed, and the gateway redials and sends its results again. Ends when
/// the session does, after the results it had received (their waiters are still woken).
async fn acknowledge(
    app: Arc<App>,
    gateway_id: String,
    tx: Tx,
    close: Arc<Notify>,
    mut received: mpsc::Receiver<Received>,
) {
    let mut round = Vec::new();
    let mut sending = true;
    while received.recv_many(&mut round, RESULTS_UNACKNOWLEDGED).await > 0 {
        let records = round.iter_mut().filter_map(|r| {
            let result = r.to_record.take()?;
            let (app, gateway_id) = (&app, &gateway_id);
            Some(async move {
                record_result(app, gateway_id, &r.command_id, result)
                    .await
                    .map_err(|e| (r.command_id.clone(), e))
            })
        });
        for done in futures_util::future::join_all(records).await {
            if let Err((command, e)) = done {
                tracing::error!(%command, "cannot record a result: {e}; closing the tunnel so the gateway sends it again");
                close.notify_one();
                return;
            }
        }
        if let Err(e) = app.store.flush().await {
            tracing::error!(gateway = %gateway_id, "cannot make {} results durable: {e}; closing the tunnel so the gateway sends them again", round.len());
            close.notify_one();
            return;
        }
        // Whoever waits for them first: an acknowledgement may wait for room in the tunnel.
        for r in &round {
            app.waiters.notify(&r.command_id);
        }
        for r in round.drain(..) {
            if sending {
                let ack = BrokerFrame {
                    kind: Some(BKind::ResultAck(ResultAck {
                        command_id: r.command_id,
                    })),
                };
                sending = send_or_close(&tx, &close, &gateway_id, ack).await;
            }
        }
    }
}

/// Records a gateway's result for a command, and counts it.
async fn record_result(
    app: &App,
    gateway_id: &str,
    command_id: &str,
    result: CommandResult,
) -> Result<(), AppError> {
    match app.complete_command(command_id, gateway_id, result).await? {
        Some(Some(c)) => {
            app.metrics
                .commands_finished
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: c.state.as_str().into(),
                })
                .inc();
            let ms = (now_ms() - c.submitted_ms).max(0);
            app.metrics.delivery_seconds.observe(ms as f64 / 1000.0);
        }
        Some(None) => {}
        None => {
            tracing::warn!(gateway = %gateway_id, command = %printable(command_id), "result for an unknown command; acknowledging so the gateway drops it");
        }
    }
    Ok(())
}

/// Handles one frame; an `Err` closes the tunnel with that reason.
async fn handle_frame(
    session: &SessionCtx,
    tenant_id: &str,
    gateway_id: &str,
    frame: GatewayFrame,
    tx: &Tx,
) -> Result<(), Closed> {
    let app = &*session.app;
    match frame.kind {
        Some(GKind::Heartbeat(h)) => {
            let _ = tx.try_send(Ok(BrokerFrame {
                kind: Some(BKind::Heartbeat(Heartbeat {
                    seq: 0,
                    sent_unix_ms: now_ms(),
                    echo_seq: h.seq,
                    echo_sent_unix_ms: h.sent_unix_ms,
                })),
            }));
        }
        Some(GKind::Received(r)) => app.commands.received(&r.command_id, gateway_id),
        Some(GKind::Progress(p)) => app.commands.progress(
            &p.command_id,
            gateway_id,
            crate::store::Progress {
                percent: p.percent.map(|v| u8::try_from(v.min(100)).unwrap_or(100)),
                message: p.message.chars().take(512).collect(),
                at_ms: p.at_unix_ms,
            },
        ),
        Some(GKind::Result(r)) => {
            let output = if r.output.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&r.output).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&r.output).into_owned())
                })
            };
            let result = CommandResult {
                ok: r.ok,
                output,
                error_class: r.error_class,
                error_message: r.error_message,
                started_ms: r.started_unix_ms,
                finished_ms: r.finished_unix_ms,
            };
            // One node records the result here (a write to memory and the store, no wait); a
            // replica's write goes through the cluster's log, which this tunnel's reading does
            // not wait for: its acknowledger records it.
            let to_record = if app.log.is_cluster() {
                Some(result)
            } else {
                if let Err(e) = record_result(app, gateway_id, &r.command_id, result).await {
                    return Err(Closed::Store {
                        command: r.command_id,
                        message: e.to_string(),
                    });
                }
                None
            };
            let received = Received {
                command_id: r.command_id,
                to_record,
            };
            // Waits only when the acknowledger is this far behind; it ends only after the
            // session's reading (or after it closed the tunnel, which ends the reading too).
            let _ = session.results(gateway_id, tx).send(received).await;
        }
        Some(GKind::Renew(r)) => {
            let answer = match app.ca.sign_gateway(
                &r.csr_pem,
                tenant_id,
                gateway_id,
                app.cfg.gateway_cert_lifetime_secs,
            ) {
                Ok(issued) => {
                    let not_after_ms = issued.not_after_ms();
                    let key_hex = hex::encode(&issued.public_key);
                    let recorded = async {
                        app.commit(Op::GatewayChanged {
                            id: gateway_id.to_string(),
                            patch: GatewayPatch {
                                cert_serial: Some(issued.serial_hex.clone()),
                                cert_not_after_ms: Some(not_after_ms),
                                public_key: Some(key_hex.clone()),
                                ..Default::default()
                            },
                        })
                        .await?;
                        app.event(
                            Some(tenant_id),
                            Some(gateway_id),
                            "gateway.certificate_renewed",
                            format!(
                                "gateway {gateway_id} renewed its certificate (serial {})",
                                issued.serial_hex
                            ),
                        )
                        .await?;
                        Ok::<_, AppError>(app.store.flush().await?)
                    };
                    match recorded.await {
                        Ok(()) => RenewResponse {
                            certificate_pem: issued.pem,
                            error: String::new(),
                        },
                        Err(e) => RenewResponse {
                            certificate_pem: String::new(),
                            error: format!("the SaaS could not record the renewal: {e}"),
                        },
                    }
                }
                Err(e) => RenewResponse {
                    certificate_pem: String::new(),
                    error: e.to_string(),
                },
            };
            let _ = tx.try_send(Ok(BrokerFrame {
                kind: Some(BKind::Renewed(answer)),
            }));
        }
        Some(GKind::MachinesApplied(a)) => crate::watch::applied(app, gateway_id, a),
        Some(GKind::WatchReport(r)) => {
            crate::watch::report(&session.app, tenant_id, gateway_id, r, tx, &session.close)
        }
        Some(GKind::Hello(_)) => return Err(Closed::HelloTwice),
        // Handled by the session, which keeps the uploads under way.
        Some(GKind::BundleChunk(_)) | None => {}
    }
    Ok(())
}

/// The broker's gRPC routes, to serve on [`crate::net`]'s listener.
pub fn router(app: Arc<App>) -> axum::Router {
    let svc = BrokerServer::new(BrokerService { app })
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    axum::Router::new().route_service("/pcg.tunnel.v1.Broker/{*method}", svc)
}
