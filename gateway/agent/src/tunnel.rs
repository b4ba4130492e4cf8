//! The tunnel client: dial the broker (through [`crate::transport`]: directly or through a
//! proxy, over TLS or TLS inside a WebSocket), open the gRPC stream with mutual TLS, say Hello,
//! receive commands, heartbeat both ways, and redial with fully random exponential backoff when
//! the tunnel drops or stays silent past its deadline (three heartbeat intervals).
//!
//! **Transport fallback** (`transport = "auto"`, the default): the direct transport is tried
//! first. When it fails twice in a row for a reason of the path itself (TLS intercepted by a
//! proxy, HTTP/2 refused, a handshake cut or stalled by a middlebox), the tunnel switches to the
//! WebSocket transport, and says why in `pcgctl status`. While on the WebSocket, the direct path
//! is probed every `direct_retry_secs`; when it works again the tunnel moves back to it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcg_proto::v1::broker_client::BrokerClient;
use pcg_proto::v1::broker_frame::Kind as BKind;
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{GatewayFrame, Heartbeat, Hello, RenewRequest, RenewResponse};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::config::TransportMode;
use crate::executor;
use crate::status::TunnelState;
use crate::store::now_ms;
use crate::transport::{DialError, Dialed, Dialer, Target, Transport};
use crate::Gateway;

/// Full-jitter backoff: a uniformly random delay in `[0, min(cap, base * 2^attempt)]`.
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .checked_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=ms))
}

/// How one tunnel ended.
enum End {
    /// Redial after backoff (and after at least the given pause, when the broker asked for one).
    Retry(Broken, Option<Duration>),
    /// Dialling failed before the tunnel was up.
    Dial(DialError),
    /// The identity was refused for good (revoked or unknown): wait for a new pairing.
    Refused(String),
    /// The gateway was paired again: dial at once with the new identity.
    IdentityChanged,
    /// On the WebSocket fallback, the direct path worked again: redial directly at once.
    DirectIsBack,
    Shutdown,
}

/// Why a tunnel ended, or could not be opened, before it is dialled again: the gateway's last
/// error, and the reconnect metric's category.
#[derive(Debug, thiserror::Error)]
enum Broken {
    /// The stored identity or the transport settings cannot make a dialer (the message says
    /// which and why).
    #[error("{0}")]
    Setup(String),
    #[error("cannot open HTTP/2 to the broker at {url}: {why}")]
    Http2 { url: String, why: String },
    #[error("tunnel closed before Hello")]
    ClosedBeforeHello,
    #[error("the broker at {url} did not answer within {timeout:?}")]
    NoAnswer { url: String, timeout: Duration },
    #[error("the broker at {url} refused the tunnel: {message}")]
    TurnedAway { url: String, message: String },
    #[error("tunnel refused: {0}")]
    NotWelcomed(String),
    #[error("the broker did not send Welcome")]
    NoWelcome,
    #[error(transparent)]
    Journal(#[from] executor::NotJournaled),
    #[error("the broker was silent for {ms} ms (three heartbeat intervals); the path to it may drop packets")]
    Silent { ms: u128 },
    #[error("the broker closed the tunnel: {0}")]
    Goodbye(String),
    #[error("the broker ended the tunnel")]
    Ended,
    #[error("tunnel broken: {0}")]
    Stream(String),
}

impl End {
    /// A short category for the reconnect metric.
    fn category(&self) -> &'static str {
        match self {
            End::Retry(Broken::Silent { .. }, _) => "silent",
            End::Retry(Broken::Goodbye(_), _) => "goodbye",
            End::Retry(..) => "broken",
            End::Dial(e) => e.hop(),
            End::Refused(_) => "refused",
            End::IdentityChanged => "identity_changed",
            End::DirectIsBack => "direct_is_back",
            End::Shutdown => "shutdown",
        }
    }
}

fn retry(why: Broken) -> End {
    End::Retry(why, None)
}

/// Which transport the next dial uses.
struct PathChoice {
    mode: TransportMode,
    current: Transport,
    /// Consecutive direct failures that blame the path.
    path_failures: u32,
    /// Why the tunnel is on the WebSocket transport.
    reason: Option<String>,
    retry_direct: Duration,
}

/// Direct failures of the path before falling back.
const FALLBACK_AFTER: u32 = 2;

impl PathChoice {
    fn new(mode: TransportMode, retry_direct: Duration) -> Self {
        PathChoice {
            mode,
            current: if mode == TransportMode::Websocket {
                Transport::Websocket
            } else {
                Transport::Direct
            },
            path_failures: 0,
            reason: (mode == TransportMode::Websocket)
                .then(|| "configured: transport = \"websocket\"".to_string()),
            retry_direct,
        }
    }

    /// Records a failed dial; returns true when it switched to the WebSocket transport.
    fn failed(&mut self, e: &DialError) -> bool {
        if self.mode != TransportMode::Auto || self.current != Transport::Direct {
            return false;
        }
        if !e.is_path_failure() {
            self.path_failures = 0;
            return false;
        }
        self.path_failures += 1;
        if self.path_failures >= FALLBACK_AFTER {
            self.current = Transport::Websocket;
            self.reason = Some(e.to_string());
            self.path_failures = 0;
            return true;
        }
        false
    }

    fn direct_again(&mut self) {
        self.current = Transport::Direct;
        self.reason = None;
        self.path_failures = 0;
    }

    /// Whether a session on this transport should probe the direct path now and then.
    fn probes(&self) -> bool {
        self.mode == TransportMode::Auto && self.current == Transport::Websocket
    }
}

/// Runs the tunnel until `shutdown` is set.
pub async fn run(gw: Arc<Gateway>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let base = Duration::from_millis(gw.cfg.backoff_base_ms.max(1));
    let cap = Duration::from_millis(gw.cfg.backoff_cap_ms.max(gw.cfg.backoff_base_ms));
    let mut attempt: u32 = 0;
    // The first endpoint is picked at random, so that gateways spread over the brokers they were
    // given; a failure moves to the next one.
    let mut endpoint_idx = usize::from(rand::random::<u16>());
    let mut identity_rx = gw.watch_identity();
    let mut path = PathChoice::new(
        gw.cfg.transport,
        Duration::from_secs(gw.cfg.direct_retry_secs.max(1)),
    );
    loop {
        if *shutdown.borrow() {
            break;
        }
        identity_rx.borrow_and_update();
        let identity = match gw.store.identity() {
            Ok(Some(i)) if i.revoked.is_none() => i,
            Ok(other) => {
                gw.set_tunnel(|t| {
                    t.state = if other.is_some() {
                        TunnelState::Revoked
                    } else {
                        TunnelState::Unpaired
                    }
                });
                tokio::select! {
                    _ = identity_rx.changed() => continue,
                    _ = shutdown.changed() => break,
                }
            }
            Err(e) => {
                gw.set_tunnel(|t| t.last_error = Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(cap) => continue,
                    _ = shutdown.changed() => break,
                }
            }
        };
        let url = identity.broker_endpoints[endpoint_idx % identity.broker_endpoints.len().max(1)]
            .clone();
        let transport = path.current;
        gw.set_tunnel(|t| {
            t.state = TunnelState::Connecting;
            t.gateway_id = Some(identity.gateway_id.clone());
            t.broker_endpoint = Some(url.clone());
            t.next_attempt_ms = None;
            t.transport = Some(transport);
            t.transport_reason = path.reason.clone();
        });
        let end = tokio::select! {
            e = session(&gw, &identity, &url, transport, &mut attempt, path.probes().then_some(path.retry_direct)) => e,
            _ = identity_rx.changed() => End::IdentityChanged,
            _ = shutdown.changed() => End::Shutdown,
        };
        gw.clear_outbound();
        let ended = now_ms();
        gw.set_tunnel(|t| {
            if t.state == TunnelState::Connected {
                t.down_since_ms = Some(ended);
            }
        });
        gw.metrics.reconnect(end.category());
        let (why, pause) = match end {
            End::Shutdown => break,
            End::IdentityChanged => {
                tracing::info!("the gateway was paired again; reconnecting with the new identity");
                attempt = 0;
                gw.set_tunnel(|t| {
                    t.connected_since_ms = None;
                    t.last_error = None;
                });
                continue;
            }
            End::DirectIsBack => {
                tracing::info!(
                    "the direct path to the broker works again; leaving the WebSocket transport"
                );
                path.direct_again();
                attempt = 0;
                continue;
            }
            End::Refused(why) => {
                tracing::error!("the broker refused this gateway: {why}");
                let mut id = identity.clone();
                id.revoked = Some(why.clone());
                let _ = gw.store.set_identity(&id);
                let _ = gw.store.flush().await;
                gw.set_tunnel(|t| {
                    t.state = TunnelState::Revoked;
                    t.last_error = Some(why.clone());
                    t.connected_since_ms = None;
                });
                continue;
            }
            End::Dial(DialError::Busy { retry_after_ms, .. }) => (
                format!("the broker is busy; it asked to come back in {retry_after_ms} ms"),
                Some(Duration::from_millis(retry_after_ms.min(120_000))),
            ),
            End::Dial(e) => {
                if path.failed(&e) {
                    tracing::warn!("falling back to the WebSocket transport: {e}");
                    gw.set_tunnel(|t| {
                        t.last_error = Some(e.to_string());
                        t.transport = Some(Transport::Websocket);
                        t.transport_reason = path.reason.clone();
                    });
                    continue;
                }
                (e.to_string(), None)
            }
            End::Retry(why, pause) => (why.to_string(), pause),
        };
        endpoint_idx += 1;
        let delay = backoff(base, cap, attempt).max(pause.unwrap_or_default());
        attempt = attempt.saturating_add(1);
        tracing::warn!(endpoint = %url, transport = transport.as_str(), "tunnel down: {why}; redialling in {} ms", delay.as_millis());
        gw.set_tunnel(|t| {
            t.state = TunnelState::Backoff;
            t.last_error = Some(why.clone());
            t.connected_since_ms = None;
            t.next_attempt_ms = Some(now_ms() + i64::try_from(delay.as_millis()).unwrap_or(0));
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = identity_rx.changed() => {},
            _ = shutdown.changed() => break,
        }
    }
    gw.set_tunnel(|t| t.state = TunnelState::Stopped);
}

/// The dialer of this identity: the SaaS CA it was paired with, its certificate and key.
fn dialer_for(gw: &Gateway, identity: &crate::store::Identity) -> Result<Dialer, Broken> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let key_pem = gw
        .store
        .unseal(&identity.key_sealed)
        .map_err(|e| Broken::Setup(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| Broken::Setup(format!("the stored private key is unreadable: {e}")))?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| Broken::Setup(format!("the stored certificate is unreadable: {e}")))?;
    let ca = CertificateDer::from_pem_slice(identity.ca_pem.as_bytes())
        .map_err(|e| Broken::Setup(format!("the stored SaaS CA is unreadable: {e}")))?;
    let pin = crate::transport::dial::sha256(ca.as_ref());
    crate::transport::dialer(
        &gw.cfg,
        &gw.store,
        pin,
        Some(ca),
        Some(Arc::new((chain, key))),
    )
    .map_err(Broken::Setup)
}

/// A tonic channel over one connection already dialled (tonic only runs HTTP/2 on it); also
/// used by [`crate::diag`]'s broker check.
pub(crate) async fn channel(
    target: &Target,
    dialed: Dialed,
    timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    let slot = Arc::new(Mutex::new(Some(dialed.io)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let io = slot
            .lock()
            .expect("connector lock is never poisoned")
            .take();
        async move {
            io.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the tunnel's connection is gone; redialling"))
        }
    });
    Endpoint::from_shared(format!("http://{}", target.authority()))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| crate::pairing::error_chain(&e))
}

/// Probes the direct path: a dial that reaches the broker over TLS with HTTP/2 agreed.
async fn probe_direct(dialer: Dialer, target: Target) -> Result<(), DialError> {
    dialer
        .dial(&target, Transport::Direct, &[b"h2"])
        .await
        .map(|_| ())
}

async fn session(
    gw: &Arc<Gateway>,
    identity: &crate::store::Identity,
    url: &str,
    transport: Transport,
    attempt: &mut u32,
    probe_every: Option<Duration>,
) -> End {
    let dialer = match dialer_for(gw, identity) {
        Ok(d) => d,
        Err(e) => return retry(e),
    };
    // The direct transport goes to the broker's endpoint; the WebSocket way in is on the
    // public (API) port.
    let target = match Target::from_url(match transport {
        Transport::Direct => url,
        Transport::Websocket => &identity.api_url,
    }) {
        Ok(t) => t,
        Err(e) => return End::Refused(e.to_string()),
    };
    let dialed = match dialer.dial(&target, transport, &[b"h2"]).await {
        Ok(d) => d,
        Err(e) => return End::Dial(e),
    };
    let via = dialed.via.clone();
    let timeout = Duration::from_millis(gw.cfg.connect_timeout_ms);
    let channel = match channel(&target, dialed, timeout).await {
        Ok(c) => c,
        Err(why) => {
            return retry(Broken::Http2 {
                url: url.to_string(),
                why,
            })
        }
    };
    let mut client = BrokerClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let (tx, rx) = mpsc::channel::<GatewayFrame>(1024);
    let hello = GatewayFrame {
        kind: Some(GKind::Hello(Hello {
            gateway_version: crate::VERSION.to_string(),
            command_kinds: gw.registry.kinds(),
            clock_unix_ms: now_ms(),
            journal_depth: gw.store.journal_len() as u64,
            outbox_depth: gw.store.outbox_depth() as u64,
        })),
    };
    if tx.send(hello).await.is_err() {
        return retry(Broken::ClosedBeforeHello);
    }
    let mut inbound = match tokio::time::timeout(
        timeout,
        client.open(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    {
        Err(_) => {
            return retry(Broken::NoAnswer {
                url: url.to_string(),
                timeout,
            })
        }
        Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => {
            return End::Refused(s.message().to_string())
        }
        Ok(Err(s)) => {
            let pause = s
                .metadata()
                .get(pcg_proto::RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|ms| Duration::from_millis(ms.min(120_000)));
            return End::Retry(
                Broken::TurnedAway {
                    url: url.to_string(),
                    message: s.message().to_string(),
                },
                pause,
            );
        }
        Ok(Ok(r)) => r.into_inner(),
    };
    // The broker answers Welcome first.
    let interval = match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(Ok(Some(pcg_proto::v1::BrokerFrame {
            kind: Some(BKind::Welcome(w)),
        }))) => Duration::from_millis(w.heartbeat_interval_ms.max(100)),
        Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => {
            return End::Refused(s.message().to_string())
        }
        Ok(Err(s)) => return retry(Broken::NotWelcomed(s.message().to_string())),
        _ => return retry(Broken::NoWelcome),
    };
    *attempt = 0;
    gw.set_outbound(tx.clone());
    let since = now_ms();
    gw.set_tunnel(|t| {
        t.state = TunnelState::Connected;
        t.connected_since_ms = Some(since);
        t.last_heartbeat_ms = Some(since);
        t.heartbeat_interval_ms = u64::try_from(interval.as_millis()).ok();
        t.last_error = None;
        t.connects += 1;
        t.transport = Some(transport);
        t.proxy = via.clone();
        t.down_since_ms = None;
    });
    tracing::info!(endpoint = %url, transport = transport.as_str(), proxy = ?via, "tunnel up");
    // Results the broker has not acknowledged yet go out again (those that do not fit in the
    // queue through this tunnel's result pump, which ends with the tunnel); so does the watch
    // loop's report.
    gw.overflow.clear();
    let _pump = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(executor::pump_overflow(
        gw.clone(),
        tx.clone(),
    )));
    resend_outbox(gw);
    crate::watch::tunnel_up(gw);

    let mut renewal: Option<(rcgen::KeyPair, Instant)> = None;
    let mut last_frame = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Silence is checked more often than heartbeats are sent, so a dead path is noticed soon
    // after its deadline (three intervals), not up to an interval later.
    let mut watchdog = tokio::time::interval((interval / 4).max(Duration::from_millis(25)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_probe = probe_every.map(|p| tokio::time::Instant::now() + p);
    let mut probe: Option<tokio::task::JoinHandle<Result<(), DialError>>> = None;
    let mut seq = 0u64;
    let (journal_failed, mut journal_errors) = mpsc::channel::<executor::NotJournaled>(1);
    loop {
        tokio::select! {
            Some(e) = journal_errors.recv() => {
                // Not journaled durably: drop the tunnel so the broker redelivers.
                return retry(e.into());
            }
            r = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                probe = None;
                match r {
                    Ok(Ok(())) => return End::DirectIsBack,
                    Ok(Err(e)) => tracing::info!("the direct path is still broken: {e}"),
                    Err(e) => tracing::warn!("direct-path probe failed: {e}"),
                }
                next_probe = probe_every.map(|p| tokio::time::Instant::now() + p);
            }
            _ = async { tokio::time::sleep_until(next_probe.expect("guarded")).await }, if next_probe.is_some() && probe.is_none() => {
                next_probe = None;
                let direct = Target::from_url(url);
                if let Ok(direct) = direct {
                    probe = Some(tokio::spawn(probe_direct(dialer.clone(), direct)));
                }
            }
            _ = watchdog.tick() => {
                if last_frame.elapsed() > interval * 3 {
                    return retry(Broken::Silent { ms: last_frame.elapsed().as_millis() });
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(frame)) => {
                    last_frame = Instant::now();
                    match frame.kind {
                        // A stopping gateway takes no new command: the broker keeps it
                        // pending and delivers it again on the next tunnel.
                        Some(BKind::Command(c)) if gw.is_stopping() => {
                            tracing::debug!(command = %c.id, "stopping: leaving a delivered command to the next tunnel");
                        }
                        Some(BKind::Cancel(c)) => executor::on_cancel(gw, &c.command_id, &c.reason),
                        Some(BKind::Command(c)) => {
                            if let Err(e) = executor::on_command(gw, c, &journal_failed) {
                                // Not journaled: drop the tunnel so the broker redelivers.
                                return retry(e.into());
                            }
                        }
                        Some(BKind::ResultAck(a)) => gw.store.ack(&a.command_id),
                        Some(BKind::Heartbeat(h)) => {
                            let now = now_ms();
                            gw.set_tunnel(|t| {
                                t.last_heartbeat_ms = Some(now);
                                if h.echo_seq != 0 {
                                    t.rtt_ms = u64::try_from(now - h.echo_sent_unix_ms).ok();
                                }
                            });
                            if h.echo_seq != 0 {
                                gw.metrics.heartbeat_rtt_seconds.set((now - h.echo_sent_unix_ms).max(0) as f64 / 1000.0);
                            }
                        }
                        Some(BKind::Goodbye(g)) => {
                            return if g.permanent {
                                End::Refused(g.reason)
                            } else {
                                End::Retry(
                                    Broken::Goodbye(g.reason),
                                    (g.retry_after_ms > 0).then(|| Duration::from_millis(g.retry_after_ms.min(600_000))),
                                )
                            };
                        }
                        Some(BKind::Renewed(r)) => {
                            if let Some((key, _)) = renewal.take() {
                                finish_renewal(gw, key, r).await;
                            }
                        }
                        Some(BKind::BundleAck(a)) => gw.bundle_ack(a),
                        Some(BKind::Machines(m)) => crate::watch::on_sync(gw, m),
                        Some(BKind::WatchReportAck(a)) => crate::watch::report::on_ack(gw, a),
                        Some(BKind::Welcome(_)) | None => {}
                    }
                }
                Ok(None) => return retry(Broken::Ended),
                Err(s) if s.code() == tonic::Code::PermissionDenied => return End::Refused(s.message().to_string()),
                Err(s) => return retry(Broken::Stream(s.message().to_string())),
            },
            _ = ticker.tick() => {
                // Renew at two thirds of the certificate's lifetime; ask again after a minute
                // without an answer.
                let due = gw.store.identity().ok().flatten().is_some_and(|i| now_ms() >= i.renew_at_ms());
                if due && renewal.as_ref().is_none_or(|(_, at)| at.elapsed() > Duration::from_secs(60)) {
                    match crate::pairing::key_and_csr() {
                        Ok((key, csr_pem)) => {
                            if tx.try_send(GatewayFrame { kind: Some(GKind::Renew(RenewRequest { csr_pem })) }).is_ok() {
                                renewal = Some((key, Instant::now()));
                            }
                        }
                        Err(e) => tracing::error!("cannot make a key for renewal: {e}"),
                    }
                }
                seq += 1;
                let _ = tx.try_send(GatewayFrame { kind: Some(GKind::Heartbeat(Heartbeat {
                    seq, sent_unix_ms: now_ms(), echo_seq: 0, echo_sent_unix_ms: 0,
                }))});
            }
        }
    }
}

/// Stores a renewed certificate with the key it was issued for.
async fn finish_renewal(gw: &Gateway, key: rcgen::KeyPair, r: RenewResponse) {
    let fail = |why: String| {
        tracing::error!("certificate renewal failed: {why}");
        gw.set_tunnel(|t| t.last_error = Some(format!("certificate renewal failed: {why}")));
    };
    if !r.error.is_empty() {
        return fail(r.error);
    }
    let Some(der) = crate::pairing::pem_cert_der(&r.certificate_pem) else {
        return fail("the broker sent no certificate".into());
    };
    // The certificate must be for the key generated for it.
    let matches = x509_parser::parse_x509_certificate(&der)
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        .unwrap_or(false);
    if !matches {
        return fail("the certificate is not for the key this gateway generated".into());
    }
    let (_, not_after) = match crate::pairing::cert_validity_ms(&der) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let Ok(Some(mut id)) = gw.store.identity() else {
        return fail("no identity to renew".into());
    };
    id.cert_pem = r.certificate_pem;
    id.retire_key();
    id.key_sealed = gw.store.seal(key.serialize_pem().as_bytes());
    id.cert_received_ms = now_ms();
    id.cert_not_after_ms = not_after;
    let stored = match gw.store.set_identity(&id) {
        Ok(()) => gw.store.flush().await,
        Err(e) => Err(e),
    };
    match stored {
        Ok(()) => tracing::info!(
            "certificate renewed; valid until {}",
            crate::status::rfc3339(not_after)
        ),
        Err(e) => fail(e.to_string()),
    }
}

/// Queues every unacknowledged result on the current tunnel (without waiting).
fn resend_outbox(gw: &Gateway) {
    match gw.store.outbox() {
        Ok(items) => {
            for (id, r) in items {
                executor::send_result(gw, &id, &r);
            }
        }
        Err(e) => tracing::error!("cannot read the outbox: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reconnect metric's reason comes from why the tunnel ended, never from words in a
    /// peer's message.
    #[test]
    fn reconnect_reasons_come_from_the_cause_not_the_message() {
        let cases = [
            (Broken::Silent { ms: 31_000 }, None, "silent"),
            (
                Broken::Goodbye("stopping".into()),
                Some(Duration::from_secs(1)),
                "goodbye",
            ),
            (
                Broken::Goodbye("the path went silent".into()),
                None,
                "goodbye",
            ),
            (
                Broken::Stream("the peer went silent".into()),
                None,
                "broken",
            ),
            (
                Broken::NotWelcomed("the broker closed it".into()),
                None,
                "broken",
            ),
            (Broken::Ended, None, "broken"),
        ];
        for (why, pause, reason) in cases {
            let text = why.to_string();
            assert_eq!(End::Retry(why, pause).category(), reason, "{text}");
        }
        assert_eq!(
            Broken::Silent { ms: 31_000 }.to_string(),
            "the broker was silent for 31000 ms (three heartbeat intervals); the path to it may drop packets"
        );
    }

    #[test]
    fn backoff_is_random_and_capped() {
        let base = Duration::from_millis(1000);
        let cap = Duration::from_millis(8000);
        for attempt in 0..40 {
            let ceiling = (1000u64 << attempt.min(20)).min(8000);
            for _ in 0..50 {
                let d = backoff(base, cap, attempt);
                assert!(d.as_millis() as u64 <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
        // Fully random: many distinct values at a high attempt.
        let mut seen: Vec<u128> = (0..100)
            .map(|_| backoff(base, cap, 10).as_millis())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 50);
    }
}
