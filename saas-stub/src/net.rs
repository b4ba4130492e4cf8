//! The TLS listener both services run on: it accepts TCP connections, bounds what an
//! unauthenticated client can hold, completes the TLS handshake, and serves HTTP/1.1 or HTTP/2
//! with hyper until the connection ends or the service stops.
//!
//! What a client cannot do to it:
//! - hold a connection without finishing the TLS handshake: each handshake is bounded in time,
//!   and when the pending handshakes fill their room (at least `max_pending_handshakes`, more
//!   while handshakes complete fast enough, see [`Pending`]) the oldest silent one is dropped
//!   to make room, so a flood of silent connections cannot lock a real client out;
//! - take more than `max_connections_per_ip` connections from one address (refused at once);
//! - push the process past its descriptor limit: established connections share one budget
//!   ([`ConnBudget`]) sized below `RLIMIT_NOFILE`; past it new connections are closed at once
//!   while the established ones are served;
//! - send headers forever (`header_read_timeout`) or sit idle forever (`idle_timeout`: no byte
//!   either way for that long closes the connection; tunnels heartbeat well within it). On
//!   HTTP/1.1 hyper starts the header timeout as soon as the previous response is written, so a
//!   kept-alive HTTP/1.1 connection idle for the header timeout is closed; a client that reuses
//!   it at that instant sees the connection reset, so clients should keep idle HTTP/1.1
//!   connections for less than the header timeout (the test harness keeps them 4 s).
//!
//! Every accepted socket gets `TCP_NODELAY`: request/response and tunnel frames are small, and
//! Nagle's algorithm would hold each one for a delayed ACK.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bounds of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TLS handshakes under way at once; past it the oldest is dropped.
    pub max_pending_handshakes: usize,
    /// Connections (pending or established) from one IP address.
    pub max_connections_per_ip: usize,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time an HTTP/1.1 client has to send a request's headers.
    pub header_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// TLS handshakes computed at once; the others wait their turn (counted as pending).
    pub max_concurrent_handshakes: usize,
}

/// What a refused connection is told before it is closed, in place of a TLS record: the
/// gateway reads it as "busy, retry after N ms" (not as a broken path), and waits that long.
pub fn busy_message(retry_after_ms: u64) -> Vec<u8> {
    format!("{}{retry_after_ms}\r\n", pcg_proto::BUSY_PREFIX).into_bytes()
}

/// A pending handshake older than this is taken to be stalled and gives way to a new one;
/// a younger one makes the new connection wait its turn elsewhere (told "busy").
const STALLED_HANDSHAKE: Duration = Duration::from_secs(2);

/// Established connections across every listener of the process, kept below the descriptor
/// limit so that accepting never fails for lack of descriptors while the store needs some.
#[derive(Clone)]
pub struct ConnBudget {
    sem: Arc<Semaphore>,
    total: usize,
}

impl ConnBudget {
    /// At most `configured` connections, and at most the soft descriptor limit minus a reserve
    /// for the store, logs and the pending handshakes of `listeners` listeners.
    pub fn new(configured: usize, listeners: usize, pending_per_listener: usize) -> ConnBudget {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(1024);
        let reserve = 64 + listeners * (pending_per_listener + 2);
        let total = configured.min(nofile.saturating_sub(reserve)).max(16);
        if total < configured {
            tracing::info!(
                nofile,
                configured,
                connections = total,
                "the descriptor limit bounds established connections; raise LimitNOFILE for more"
            );
        }
        ConnBudget {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// How many connections the budget allows.
    pub fn total(&self) -> usize {
        self.total
    }

    /// How many are in use.
    pub fn in_use(&self) -> usize {
        self.total - self.sem.available_permits()
    }
}

/// What a service knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client certificate chain, when the client presented one.
    pub peer_certs: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
    /// ALPN protocol the handshake settled on.
    pub alpn: Option<Vec<u8>>,
    /// How the connection arrived: `direct` (TLS on a listener) or `websocket` (TLS inside the
    /// WebSocket of `/v1/tunnel/ws`).
    pub transport: &'static str,
}

impl ConnInfo {
    fn of<IO>(
        peer: SocketAddr,
        tls: &tokio_rustls::server::TlsStream<IO>,
        transport: &'static str,
    ) -> Self {
        let (_, session) = tls.get_ref();
        ConnInfo {
            peer,
            peer_certs: session
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
            alpn: session.alpn_protocol().map(<[u8]>::to_vec),
            transport,
        }
    }
}

/// The service a connection is served with.
pub trait ConnService:
    tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<axum::body::Body>,
        Error = std::convert::Infallible,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ConnService for S where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<axum::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static
{
}

/// Connections per source address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot {
    map: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = self.0.lock().expect("per-ip lock is never poisoned");
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().expect("per-ip lock is never poisoned");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Handshakes under way, oldest first: those still waiting for their ClientHello (`silent`) and
/// those being computed (`hello`). When a new connection needs room, the oldest silent one is
/// cancelled (a client that means to talk sends its ClientHello with its first packets, and the
/// connection leaves `silent` on its first read, so a flood of silent or dribbling connections
/// cannot turn real clients away, even while the listener still accepts the flood's backlog),
/// else the oldest under way past [`STALLED_HANDSHAKE`]; otherwise the new connection is told
/// "busy".
///
/// How many may be under way grows with how fast handshakes complete: at least
/// `max_pending_handshakes`, and up to as many as complete in half the handshake timeout at the
/// rate measured over the last seconds (so each can still finish in time), never more than the
/// connection budget has room for (a handshake finished for a connection the budget then
/// refuses is wasted work). A connection told "busy" is given a slot to come back in, after the
/// queue ahead of it has drained at that rate, so the refused return spread rather than together
/// (see `Pending::retry_after_ms`).
#[derive(Default)]
struct Pending {
    next: u64,
    silent: BTreeMap<u64, (CancellationToken, Instant)>,
    hello: BTreeMap<u64, (CancellationToken, Instant)>,
    /// Handshakes completed since start.
    done: u64,
    /// Handshakes completed per second (smoothed), and the window it is being measured over.
    rate: f64,
    window: Option<(Instant, u64)>,
    /// The slot after the last one a refused connection was given (see `retry_after_ms`).
    next_slot: Option<Instant>,
}

/// How often the completion rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(250);

impl Pending {
    fn len(&self) -> usize {
        self.silent.len() + self.hello.len()
    }

    /// Handshakes that may be under way now: see the type's documentation.
    fn room(&mut self, floor: usize, spare: usize, timeout: Duration) -> usize {
        let now = Instant::now();
        match self.window {
            Some((at, n)) if now.duration_since(at) >= RATE_WINDOW => {
                let measured = (self.done - n) as f64 / now.duration_since(at).as_secs_f64();
                self.rate = if self.rate == 0.0 {
                    measured
                } else {
                    (self.rate + measured) / 2.0
                };
                self.window = Some((now, self.done));
            }
            Some(_) => {}
            None => self.window = Some((now, self.done)),
        }
        let in_time = (self.rate * timeout.as_secs_f64() / 2.0) as usize;
        in_time.min(spare).max(floor)
    }

    /// How long a refused connection should wait: each gets its own slot, the first once the
    /// queue ahead has drained and each next one a little after the last given, so the refused
    /// come back spread, not together. The estimate leans early: the rate is taken as at least
    /// 1,000 handshakes a second (at the start of a storm the first measurements run low, and a
    /// low rate would send thousands away for half a minute while the listener idles), slots go
    /// at twice that rate, and the queue is taken to drain in at most half the handshake
    /// timeout (its room is sized so). One that comes back too early costs the listener one line
    /// of text and gets a later slot. Within 0.25–30 s of `now`.
    fn retry_after_ms(&mut self, now: Instant, timeout: Duration) -> u64 {
        let rate = self.rate.max(1_000.0);
        let drain = Duration::from_secs_f64(self.len() as f64 / rate).min(timeout / 2);
        let drained = now + drain;
        let slot = self.next_slot.filter(|s| *s > drained).unwrap_or(drained);
        self.next_slot = Some(slot + Duration::from_secs_f64(0.5 / rate));
        u64::try_from(slot.duration_since(now).as_millis())
            .unwrap_or(u64::MAX)
            .clamp(250, 30_000)
    }

    /// Cancels the handshake that gives way to a new connection, if one may; false when none.
    fn evict(&mut self) -> bool {
        let victim = match self.silent.pop_first() {
            Some((_, v)) => Some(v),
            None => {
                let stalled = self
                    .hello
                    .first_key_value()
                    .filter(|(_, (_, at))| at.elapsed() >= STALLED_HANDSHAKE)
                    .map(|(k, _)| *k);
                stalled.and_then(|k| self.hello.remove(&k))
            }
        };
        match victim {
            Some((cancel, _)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }
}

/// Handshake `seq` is no longer under way; `completed` when it succeeded.
fn pending_remove(p: &Mutex<Pending>, seq: u64, completed: bool) {
    let mut p = p.lock().expect("pending lock is never poisoned");
    if p.silent.remove(&seq).is_none() {
        p.hello.remove(&seq);
    }
    if completed {
        p.done += 1;
    }
}

/// The ClientHello of handshake `seq` has arrived: it is no longer silent.
fn pending_hello(p: &Mutex<Pending>, seq: u64) {
    let mut p = p.lock().expect("pending lock is never poisoned");
    if let Some(v) = p.silent.remove(&seq) {
        p.hello.insert(seq, v);
    }
}

/// Counts what the listener refused, for logs and health.
#[derive(Default, Debug)]
pub struct ListenerStats {
    pub refused_per_ip: AtomicU64,
    pub refused_budget: AtomicU64,
    pub evicted_handshakes: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub refused_busy: AtomicU64,
}

/// Tells a refused connection to come back later, without waiting for it.
fn refuse(tcp: &TcpStream, retry_after_ms: u64) {
    let _ = tcp.try_write(&busy_message(retry_after_ms));
}

/// Serves TLS connections on `listener` with the service `make(conn_info)` builds per
/// connection, until `shutdown` is cancelled; connection tasks are spawned on `tracker`. On
/// shutdown, listening stops at once and every connection is asked to finish gracefully
/// (HTTP/2 GOAWAY, HTTP/1.1 close after the current response); the caller decides how long to
/// wait for them (`tracker.wait()`).
#[allow(clippy::too_many_arguments)]
pub async fn serve<M, S>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    budget: ConnBudget,
    stats: Arc<ListenerStats>,
    make: M,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    M: Fn(ConnInfo) -> S + Send + Sync + 'static,
    S: ConnService,
    S::Future: Send + 'static,
{
    let per_ip = Arc::new(PerIp::default());
    let pending = Arc::new(Mutex::new(Pending::default()));
    let handshakes = Arc::new(Semaphore::new(limits.max_concurrent_handshakes.max(1)));
    let make = Arc::new(make);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of descriptors or a transient error: the connection stays in the
                    // kernel's backlog; try again shortly.
                    tracing::warn!(listener = name, "accept failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(ip_slot) = per_ip.take(peer.ip(), limits.max_connections_per_ip) else {
            stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = name, %peer, "refused: too many connections from this address");
            refuse(&tcp, 5_000);
            continue;
        };
        if budget.sem.available_permits() == 0 {
            stats.refused_budget.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = name, %peer, "refused: connection budget exhausted");
            refuse(&tcp, 10_000);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        // Room for this handshake: when full, drop the oldest one under way if it looks
        // stalled; otherwise this connection is told to come back later.
        let cancel = CancellationToken::new();
        let seq = {
            let mut p = pending.lock().expect("pending lock is never poisoned");
            let mut busy = None;
            let room = p.room(
                limits.max_pending_handshakes.max(1),
                budget.sem.available_permits(),
                limits.handshake_timeout,
            );
            while p.len() >= room {
                if !p.evict() {
                    busy = Some(p.retry_after_ms(Instant::now(), limits.handshake_timeout));
                    break;
                }
                stats.evicted_handshakes.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(ms) = busy {
                drop(p);
                stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                refuse(&tcp, ms);
                continue;
            }
            let seq = p.next;
            p.next += 1;
            p.silent.insert(seq, (cancel.clone(), Instant::now()));
            seq
        };
        let conn = Conn {
            name,
            tcp,
            peer,
            tls: tls.clone(),
            limits: limits.clone(),
            stats: stats.clone(),
            pending: pending.clone(),
            seq,
            cancel,
            shutdown: shutdown.clone(),
            budget: budget.clone(),
            handshakes: handshakes.clone(),
            _ip: ip_slot,
        };
        let make = make.clone();
        tracker.spawn(conn.run(move |info| make(info)));
    }
}

struct Conn {
    name: &'static str,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    stats: Arc<ListenerStats>,
    pending: Arc<Mutex<Pending>>,
    seq: u64,
    /// Cancelled when this handshake is evicted to make room.
    cancel: CancellationToken,
    shutdown: CancellationToken,
    /// Established connections hold a permit of it; pending handshakes do not (they are
    /// bounded by `max_pending_handshakes` instead).
    budget: ConnBudget,
    /// Handshakes computed at once.
    handshakes: Arc<Semaphore>,
    _ip: IpSlot,
}

/// A connection's TLS stream, boxed: see [`Conn::run`].
type Established = Box<tokio_rustls::server::TlsStream<TcpStream>>;

impl Conn {
    /// The handshake, then HTTP until the connection ends. A task's future is as large as the
    /// largest state it can be in, for its whole life, and most connections are long-lived
    /// idle tunnels: so the handshake's state is boxed and freed when it ends, the stream it
    /// yields is boxed, and the serving state is boxed, instead of this future holding the
    /// handshake's states and the serving state side by side (BENCHMARKS.md, "Memory per idle
    /// tunnel").
    async fn run<S>(self, make: impl FnOnce(ConnInfo) -> S)
    where
        S: ConnService,
        S::Future: Send + 'static,
    {
        let (name, peer, shutdown) = (self.name, self.peer, self.shutdown.clone());
        let limits = self.limits.clone();
        let Some((tls, _permit, _ip)) = Box::pin(self.establish()).await else {
            return;
        };
        let info = ConnInfo::of(peer, &tls, "direct");
        let svc = make(info);
        Box::pin(serve_http(name, peer, tls, svc, &limits, &shutdown)).await;
    }

    /// The TLS handshake and a place in the connection budget; `None` (logged) when either
    /// fails or the listener stops.
    async fn establish(self) -> Option<(Established, OwnedSemaphorePermit, IpSlot)> {
        let Conn {
            name,
            tcp,
            peer,
            tls,
            limits,
            stats,
            pending,
            seq,
            cancel,
            shutdown,
            budget,
            handshakes,
            _ip,
        } = self;
        // Waiting for a ClientHello costs nothing; the turn (the CPU-heavy part) is taken once
        // one has arrived, so stalled clients cannot hold the turns.
        let accept = async {
            let start =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                    .await?;
            pending_hello(&pending, seq);
            let _turn = handshakes.acquire().await;
            start.into_stream(tls).await
        };
        let handshake = tokio::select! {
            r = tokio::time::timeout(limits.handshake_timeout, accept) => r,
            _ = cancel.cancelled() => {
                tracing::debug!(listener = name, %peer, "handshake dropped to make room for a newer one");
                return None;
            }
            _ = shutdown.cancelled() => {
                pending_remove(&pending, seq, false);
                return None;
            }
        };
        pending_remove(&pending, seq, matches!(handshake, Ok(Ok(_))));
        let tls = match handshake {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::debug!(listener = name, %peer, "TLS handshake failed: {e}");
                return None;
            }
            Err(_) => {
                stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener = name, %peer, "TLS handshake not completed in time");
                return None;
            }
        };
        let Ok(permit) = budget.sem.try_acquire_owned() else {
            stats.refused_budget.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = name, %peer, "refused: connection budget exhausted");
            return None;
        };
        Some((tls, permit, _ip))
    }
}

/// Serves HTTP/1.1 or HTTP/2 on an established TLS stream until it ends, the idle timeout
/// passes, or `shutdown` asks it to finish (gracefully).
async fn serve_http<IO, S>(
    name: &'static str,
    peer: SocketAddr,
    io: IO,
    svc: S,
    limits: &Limits,
    shutdown: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
    S::Future: Send + 'static,
{
    let activity = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let io = Activity {
        inner: io,
        last: activity.clone(),
        started,
    };
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = limits.idle_timeout;
    let mut check = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = name, %peer, "connection ended: {e}");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick() => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(last) > idle {
                    tracing::debug!(listener = name, %peer, "closing a connection idle for {idle:?}");
                    return;
                }
            }
        }
    }
}

/// Serves an inner connection: a byte stream that arrived another way (the WebSocket of
/// `/v1/tunnel/ws`), on which the client runs the same TLS handshake (client certificate
/// optional) and HTTP as on the public port, with the REST API and the broker.
pub async fn serve_inner<IO>(
    io: IO,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    transport: &'static str,
    app: Arc<crate::App>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = crate::limits(&app.cfg);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Boxed as in `Conn::run`: the handshake's state is freed when it ends, and the stream and
    // the serving state live apart from this future for the connection's life.
    let accept = Box::pin(tokio::time::timeout(
        limits.handshake_timeout,
        acceptor.accept(io),
    ));
    let tls = tokio::select! {
        r = accept => match r {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::debug!(%peer, transport, "inner TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, transport, "inner TLS handshake not completed in time");
                return;
            }
        },
        _ = app.shutdown.cancelled() => return,
    };
    let info = ConnInfo::of(peer, &tls, transport);
    let svc = crate::with_conn_info(crate::inner_router(app.clone()), info);
    Box::pin(serve_http(
        transport,
        peer,
        tls,
        svc,
        &limits,
        &app.shutdown,
    ))
    .await;
}

/// An I/O stream that records when a byte last moved, for the idle timeout.
struct Activity<T> {
    inner: T,
    last: Arc<AtomicU64>,
    started: Instant,
}

impl<T> Activity<T> {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(age: Duration) -> (CancellationToken, Instant) {
        let at = Instant::now()
            .checked_sub(age)
            .expect("the clock is past the age");
        (CancellationToken::new(), at)
    }

    #[test]
    fn the_room_for_handshakes_follows_their_completion_rate_within_the_budget() {
        let timeout = Duration::from_secs(10);
        let mut p = Pending::default();
        // Nothing measured yet: the configured floor.
        assert_eq!(p.room(256, 10_000, timeout), 256);
        // 2,000 handshakes completed in the first window of about a second.
        let started = Instant::now()
            .checked_sub(Duration::from_millis(1_000))
            .expect("the clock is past a second");
        p.window = Some((started, 0));
        p.done = 2_000;
        let room = p.room(256, 100_000, timeout);
        // The window is a second or a little more (this thread may have waited its turn).
        let rate = p.rate;
        assert!((1_000.0..=2_000.0).contains(&rate), "{rate}");
        assert!(
            (room as f64 - rate * 5.0).abs() <= 1.0,
            "what completes in half the timeout: {rate}/s × 5 s, got {room}"
        );
        // Never more than the connection budget has room for, never less than the floor.
        assert_eq!(p.room(256, 3_000, timeout), 3_000);
        assert_eq!(p.room(256, 10, timeout), 256);
        // Told busy: the first once the queue drained at that rate (4,000 at ~2,000/s: ~2 s),
        // each next one slot (1/(2 × rate)) later, so 4,000 refused are spread over ~1 s more.
        for n in 0..4_000u64 {
            p.hello.insert(n, entry(Duration::ZERO));
        }
        // All asked at one instant (a busy test thread must not make later answers shorter).
        let now = Instant::now();
        let waits: Vec<u64> = (0..4_000).map(|_| p.retry_after_ms(now, timeout)).collect();
        let drain_ms = 4_000.0 / rate * 1_000.0;
        assert!(
            (waits[0] as f64 - drain_ms).abs() <= 100.0,
            "{} vs {drain_ms}",
            waits[0]
        );
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "spread in order");
        let spread = (waits[3_999] - waits[0]) as f64;
        let expected = 4_000.0 * 0.5 / rate * 1_000.0;
        assert!(
            (spread - expected).abs() <= 100.0,
            "spread over {spread} ms, not {expected}"
        );
        // Never beyond 30 s, however many are refused.
        let last = (0..200_000).map(|_| p.retry_after_ms(now, timeout)).last();
        assert_eq!(last, Some(30_000));
        // Nothing measured yet, a long queue: sent away for at most half the handshake timeout.
        let mut fresh = Pending::default();
        for n in 0..20_000u64 {
            fresh.hello.insert(n, entry(Duration::ZERO));
        }
        let first = fresh.retry_after_ms(Instant::now(), timeout);
        assert!((4_900..=5_000).contains(&first), "{first}");
        // A slow machine (20 handshakes/s over the next window): the room falls back.
        p.hello.clear();
        let earlier = Instant::now()
            .checked_sub(Duration::from_secs(10))
            .expect("the clock is past ten seconds");
        p.window = Some((earlier, p.done));
        p.rate = 0.0;
        p.done += 200;
        assert_eq!(p.room(256, 100_000, timeout), 256);
    }

    #[test]
    fn a_full_queue_gives_way_to_silent_connections_first_then_stalled_ones() {
        let mut p = Pending::default();
        // Handshakes under way for a moment, and one connection silent for a second.
        p.hello.insert(1, entry(Duration::from_millis(100)));
        p.hello.insert(2, entry(Duration::from_millis(100)));
        p.silent.insert(3, entry(Duration::from_secs(1)));
        p.silent.insert(4, entry(Duration::from_millis(10)));
        let (oldest_silent, young_silent) = (p.silent[&3].0.clone(), p.silent[&4].0.clone());
        // The silent connections give way first, oldest first, however young.
        assert!(p.evict());
        assert!(oldest_silent.is_cancelled());
        assert!(p.evict());
        assert!(young_silent.is_cancelled());
        assert_eq!(p.len(), 2);
        // Only young handshakes under way: nobody gives way (the newcomer is told busy).
        assert!(!p.evict());
        assert_eq!(p.len(), 2);
        // A handshake under way for longer than the stall bound gives way.
        p.hello.insert(0, entry(Duration::from_secs(3)));
        let stalled = p.hello[&0].0.clone();
        assert!(p.evict());
        assert!(stalled.is_cancelled());
        // A ClientHello that arrives moves the connection out of the silent ones.
        p.silent.insert(5, entry(Duration::ZERO));
        let m = Mutex::new(p);
        pending_hello(&m, 5);
        let p = m.into_inner().expect("not poisoned");
        assert!(p.silent.is_empty() && p.hello.contains_key(&5));
    }
}
