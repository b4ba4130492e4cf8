//! The broker: the tonic `Broker` service every paired gateway holds one tunnel to.
//!
//! A tunnel is authorised by the gateway's client certificate alone (mutual TLS against the
//! SaaS CA; the identity is the `pcg://tenant/T/gateway/G` URI in the certificate). On Hello the
//! broker answers Welcome and replays every command still pending for that gateway; a command
//! stays pending until the gateway's result for it is stored and flushed, and only then is the
//! result acknowledged (`ResultAck`). A tunnel silent for three heartbeat intervals is closed.
//! A newer tunnel of the same gateway replaces the older one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use pcg_proto::v1::broker_frame::Kind as BKind;
use pcg_proto::v1::broker_server::{Broker, BrokerServer};
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{
    BrokerFrame, Command as PCommand, GatewayFrame, Goodbye, Heartbeat, RenewResponse, ResultAck,
    Welcome,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::store::{now_ms, Command, CommandResult, CommandState};
use crate::App;

type Tx = mpsc::Sender<Result<BrokerFrame, Status>>;

/// One live tunnel.
#[derive(Clone)]
pub struct Tunnel {
    /// Distinguishes successive tunnels of the same gateway.
    pub conn_id: u64,
    pub tx: Tx,
    /// Tells the tunnel's session task to end (revocation, replacement).
    pub close: Arc<Notify>,
    pub connected_ms: i64,
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
    pub async fn close(&self, gateway_id: &str, reason: &str, permanent: bool) {
        let t = self
            .0
            .lock()
            .expect("tunnels lock is never poisoned")
            .remove(gateway_id);
        if let Some(t) = t {
            let _ = t.tx.try_send(Ok(goodbye(reason, permanent)));
            t.close.notify_one();
        }
    }
}

fn goodbye(reason: &str, permanent: bool) -> BrokerFrame {
    BrokerFrame {
        kind: Some(BKind::Goodbye(Goodbye {
            reason: reason.to_string(),
            permanent,
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
        })),
    }
}

/// Hands a freshly stored command to its gateway's tunnel if one is up. If the tunnel cannot
/// take it within a few seconds the tunnel is closed, so that the gateway redials and gets the
/// command through the replay of pending commands; nothing is lost either way.
pub async fn deliver(app: &App, cmd: &Command) {
    let Some(t) = app.tunnels.get(&cmd.gateway_id) else {
        return;
    };
    let updated = app
        .store
        .update_command(&cmd.id, |c| {
            if !c.state.is_terminal() {
                c.deliveries += 1;
                if c.state == CommandState::Queued {
                    c.state = CommandState::Delivered;
                }
            }
        })
        .ok()
        .flatten();
    let frame = command_frame(updated.as_ref().unwrap_or(cmd));
    match tokio::time::timeout(Duration::from_secs(5), t.tx.send(Ok(frame))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {} // tunnel ended; replay on reconnect
        Err(_) => {
            tracing::warn!(gateway = %cmd.gateway_id, "tunnel not draining; closing it so the gateway redials");
            if app.tunnels.remove_if(&cmd.gateway_id, t.conn_id) {
                t.close.notify_one();
            }
        }
    }
}

/// Extracts `(tenant_id, gateway_id)` from the client certificate of the request.
fn peer_identity<T>(req: &Request<T>) -> Result<(String, String), Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate; pair the gateway first"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| Status::unauthenticated("unreadable client certificate"))?;
    let san = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| Status::unauthenticated("client certificate names no pcg identity"))?;
    for n in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(u) = n {
            if let Some(id) = pcg_proto::pairing::parse_identity_uri(u) {
                return Ok(id);
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

#[tonic::async_trait]
impl Broker for BrokerService {
    type OpenStream = FrameStream;

    async fn open(
        &self,
        req: Request<Streaming<GatewayFrame>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let (tenant_id, gateway_id) = peer_identity(&req)?;
        let gw = self
            .app
            .store
            .gateway(&gateway_id)
            .map_err(|e| Status::unavailable(e.to_string()))?
            .filter(|g| g.tenant_id == tenant_id)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "gateway {gateway_id} is not known to this SaaS; pair it again with a new token"
                ))
            })?;
        if gw.revoked_ms.is_some() {
            return Err(Status::permission_denied(format!(
                "gateway {gateway_id} was revoked by a tenant admin; pair it again with a new token"
            )));
        }
        let (tx, rx) = mpsc::channel(4096);
        let inbound = req.into_inner();
        tokio::spawn(session(
            self.app.clone(),
            tenant_id,
            gateway_id,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

async fn session(
    app: Arc<App>,
    tenant_id: String,
    gateway_id: String,
    mut inbound: Streaming<GatewayFrame>,
    tx: Tx,
) {
    let interval = Duration::from_millis(app.cfg.heartbeat_ms.max(100));
    // The first frame must be Hello.
    let hello = match tokio::time::timeout(interval * 3, inbound.message()).await {
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
    let old = app.tunnels.insert(
        &gateway_id,
        Tunnel {
            conn_id,
            tx: tx.clone(),
            close: close.clone(),
            connected_ms: now,
        },
    );
    if let Some(old) = old {
        let _ = old.tx.try_send(Ok(goodbye(
            "replaced by a newer tunnel of this gateway",
            false,
        )));
        old.close.notify_one();
    }
    let skew = hello.clock_unix_ms - now;
    let _ = app.store.update_gateway(&gateway_id, |g| {
        g.version = Some(hello.gateway_version.clone());
        g.command_kinds = hello.command_kinds.clone();
        g.last_connected_ms = Some(now);
        g.last_seen_ms = Some(now);
    });
    let _ = app.store.event(
        Some(&tenant_id),
        Some(&gateway_id),
        "gateway.connected",
        format!(
            "gateway {gateway_id} connected (version {}, clock skew {skew} ms)",
            hello.gateway_version
        ),
    );
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
    // Replay everything still pending, oldest first.
    match app.store.pending_commands(&gateway_id) {
        Ok(pending) => {
            for c in pending {
                deliver(&app, &c).await;
            }
        }
        Err(e) => tracing::error!(gateway = %gateway_id, "cannot read pending commands: {e}"),
    }

    let mut last_frame = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_seen_written = Instant::now();
    let reason = loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(frame)) => {
                    last_frame = Instant::now();
                    if let Err(e) = handle_frame(&app, &tenant_id, &gateway_id, frame, &tx).await {
                        break e;
                    }
                }
                Ok(None) => break "the gateway closed the tunnel".to_string(),
                Err(e) => break format!("tunnel error: {}", e.message()),
            },
            _ = ticker.tick() => {
                if last_frame.elapsed() > interval * 3 {
                    break format!("silent for {} ms", last_frame.elapsed().as_millis());
                }
                seq += 1;
                let _ = tx.try_send(Ok(BrokerFrame { kind: Some(BKind::Heartbeat(Heartbeat {
                    seq, sent_unix_ms: now_ms(), echo_seq: 0, echo_sent_unix_ms: 0,
                }))}));
                if last_seen_written.elapsed() >= interval {
                    last_seen_written = Instant::now();
                    let _ = app.store.update_gateway(&gateway_id, |g| g.last_seen_ms = Some(now_ms()));
                }
            }
            _ = close.notified() => break "closed by the broker".to_string(),
        }
    };
    app.tunnels.remove_if(&gateway_id, conn_id);
    let _ = app
        .store
        .update_gateway(&gateway_id, |g| g.last_seen_ms = Some(now_ms()));
    let _ = app.store.event(
        Some(&tenant_id),
        Some(&gateway_id),
        "gateway.disconnected",
        format!("gateway {gateway_id} tunnel closed: {reason}"),
    );
}

/// Handles one frame; an `Err` closes the tunnel with that reason.
async fn handle_frame(
    app: &App,
    tenant_id: &str,
    gateway_id: &str,
    frame: GatewayFrame,
    tx: &Tx,
) -> Result<(), String> {
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
        Some(GKind::Received(r)) => {
            let _ = app.store.update_command(&r.command_id, |c| {
                if c.gateway_id == gateway_id && !c.state.is_terminal() {
                    c.state = CommandState::Received;
                    c.received_ms.get_or_insert(now_ms());
                }
            });
        }
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
            match app
                .store
                .complete_command(&r.command_id, gateway_id, result)
            {
                Ok(Some(_)) => {
                    if let Err(e) = app.store.flush().await {
                        // Not acknowledged: the gateway keeps it and sends it again.
                        return Err(format!("cannot store result: {e}"));
                    }
                    app.notify_command(&r.command_id);
                }
                Ok(None) => {
                    tracing::warn!(gateway = %gateway_id, command = %r.command_id, "result for an unknown command; acknowledging so the gateway drops it");
                }
                Err(e) => return Err(format!("cannot store result: {e}")),
            }
            // Never wait on a congested tunnel: close it instead; the gateway redials and
            // sends the result again, which is acknowledged then.
            if tx
                .try_send(Ok(BrokerFrame {
                    kind: Some(BKind::ResultAck(ResultAck {
                        command_id: r.command_id,
                    })),
                }))
                .is_err()
            {
                return Err("tunnel congested or ended".into());
            }
        }
        Some(GKind::Renew(r)) => {
            let answer = match app.ca.sign_gateway(
                &r.csr_pem,
                tenant_id,
                gateway_id,
                app.cfg.gateway_cert_lifetime_secs,
            ) {
                Ok(issued) => {
                    let not_after_ms =
                        i64::try_from(issued.not_after.unix_timestamp_nanos() / 1_000_000)
                            .unwrap_or(i64::MAX);
                    let stored = app
                        .store
                        .update_gateway(gateway_id, |g| {
                            g.cert_serial = issued.serial_hex.clone();
                            g.cert_not_after_ms = not_after_ms;
                        })
                        .and_then(|_| {
                            app.store.event(
                                Some(tenant_id),
                                Some(gateway_id),
                                "gateway.certificate_renewed",
                                format!(
                                    "gateway {gateway_id} renewed its certificate (serial {})",
                                    issued.serial_hex
                                ),
                            )
                        });
                    let flushed = match stored {
                        Ok(()) => app.store.flush().await,
                        Err(e) => Err(e),
                    };
                    match flushed {
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
        Some(GKind::Hello(_)) => return Err("Hello sent twice".into()),
        None => {}
    }
    Ok(())
}

/// Runs the broker (gRPC with mutual TLS) on `listener` until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    cert_pem: String,
    key_pem: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(app.ca.cert_pem.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(BrokerServer::new(BrokerService { app }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
