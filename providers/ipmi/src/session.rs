//! An IPMI LAN session of our own on a tokio `UdpSocket`: RMCP+ with cipher suite 3 key exchange (RAKP)
//! (or IPMI v1.5 with MD5 where a BMC offers nothing else),
//! Set Session Privilege Level, requests with adaptive retransmission, re-establishment when a
//! session dies, sequence numbers that never wrap (a fresh session is made first), and Close
//! Session on every path (including drop).
//!
//! Every handshake runs on a UDP socket of its own (a fresh source port, as ipmitool gets one per
//! process): BMCs built on pyghmi route every datagram from a known address and port to the
//! session that port had, closed or not. Open Session is retransmitted on a timeout of its own,
//! learnt from Open Session answers only (BMCs take hundreds of milliseconds to open a session
//! while they answer in-session commands in a few), and a retransmission repeats the same request
//! (same tag, same console session id); should the BMC still open a second session for it, the
//! extra answer is aborted (RAKP 3 with an error status) as soon as it arrives.
//!
//! Chassis Control (power up, down, cycle, reset) is retransmitted on a timer of its own as well,
//! learnt from its own answers and never below 1.5 s: a BMC need not recognise a repeated request
//! (ipmi_sim acts on every copy), so a copy sent while a slow BMC is still acting on the first
//! could power-cycle a machine twice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcg_provider::{ProviderError, Result, Secret};
use tokio::net::UdpSocket;

use crate::packet::{self, payload, CipherSuite, Keys};

/// Privilege level ADMINISTRATOR.
pub const PRIV_ADMIN: u8 = 0x04;
/// Name-only lookup bit of the RAKP 1 role byte (as ipmitool sends it).
const NAME_ONLY_LOOKUP: u8 = 0x10;
/// Sends of one RAKP message before the handshake starts over: a BMC that activated the session
/// on a RAKP 3 whose RAKP 4 was lost does not answer the same RAKP 3 again.
const RAKP_ATTEMPTS: u32 = 3;
const RAKP1_OP: &str = "RMCP+ RAKP 1";
const RAKP3_OP: &str = "RMCP+ RAKP 3";
/// Start a fresh session before the outbound sequence number gets near wrapping.
const SEQ_LIMIT: u32 = 0xffff_0000;
/// A session idle this long is replaced before use rather than found dead by a timeout (BMCs
/// expire idle sessions, commonly after 60 s).
pub const IDLE_REOPEN: Duration = Duration::from_secs(30);
/// How long a live session gets to answer before it is presumed dead and replaced (within the
/// operation's bound): about seven attempts at the shortest retransmission timeout.
const LIVE_SESSION_WINDOW: Duration = Duration::from_secs(4);

/// A round-trip time estimator (as TCP's): smoothed RTT + 4 × its mean deviation, at least
/// `floor_gap` more than the RTT, within `[min, max]`; `initial` before the first sample.
#[derive(Debug, Clone, Copy)]
struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    initial: Duration,
    min: Duration,
    max: Duration,
    floor_gap: Duration,
}

impl RttEstimator {
    /// For in-session commands and RAKP messages: 500 ms first, then 150 ms – 2 s.
    const fn session() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            initial: Duration::from_millis(500),
            min: Duration::from_millis(150),
            max: Duration::from_secs(2),
            floor_gap: Duration::from_millis(100),
        }
    }

    /// For Open Session, which a BMC may take a second or more to answer (it allocates a slot
    /// and draws random numbers): 1.2 s first, then 1 – 3 s. Retransmitting it early opens a
    /// second session on most BMCs (ipmi_sim does for every copy).
    const fn open_session() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            initial: Duration::from_millis(1200),
            min: Duration::from_secs(1),
            max: Duration::from_secs(3),
            floor_gap: Duration::from_millis(500),
        }
    }

    /// For commands that act on the machine (Chassis Control): a BMC may take a second or more
    /// to answer them (ipmi_sim runs its chassis program first; a loaded BMC is slow), and BMCs
    /// are not required to recognise a repeated request, so every early copy risks a second
    /// power-up, power-down or cycle: 2 s first, then 1.5 – 4 s.
    const fn action() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            initial: Duration::from_secs(2),
            min: Duration::from_millis(1500),
            max: Duration::from_secs(4),
            floor_gap: Duration::from_millis(1000),
        }
    }

    fn rto(&self) -> Duration {
        match self.srtt {
            Some(s) => (s + (self.rttvar * 4).max(self.floor_gap)).clamp(self.min, self.max),
            None => self.initial,
        }
    }

    fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            Some(s) => {
                let dev = rtt.abs_diff(s);
                self.rttvar = (self.rttvar * 3 + dev) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
        }
    }
}

/// Which retransmission timer an exchange uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Session,
    OpenSession,
    Action,
}

impl Timer {
    /// The timer of an in-session command: Chassis Control acts on the machine.
    fn of_command(netfn: u8, cmd: u8) -> Timer {
        if (netfn, cmd) == (0x00, 0x02) {
            Timer::Action
        } else {
            Timer::Session
        }
    }
}

/// The Open Session request of the current socket, and the session chosen from its answers:
/// any other answer to it is a second session the BMC opened for a retransmission.
#[derive(Debug, Clone, Copy)]
struct Proposal {
    tag: u8,
    console_sid: u32,
    chosen_bmc_sid: Option<u32>,
    /// Copies sent, and when the last one went.
    sends: u32,
    last_send: Instant,
}

impl Proposal {
    /// The BMC session id of a successful Open Session answer to this request that is not the
    /// session in use; before one is in use, any such answer when `none_chosen_is_extra`.
    fn extra_session(&self, bytes: &[u8], none_chosen_is_extra: bool) -> Option<u32> {
        let p = packet::decode(bytes, None).ok()?;
        if p.ptype != payload::OPEN_SESSION_RESPONSE {
            return None;
        }
        let r = packet::parse_open_session_response(&p.payload).ok()?;
        let ours = r.tag == self.tag && r.console_sid == Some(self.console_sid);
        if !ours || r.status != 0 {
            return None;
        }
        match self.chosen_bmc_sid {
            Some(c) if c == r.bmc_sid => None,
            Some(_) => Some(r.bmc_sid),
            None => none_chosen_is_extra.then_some(r.bmc_sid),
        }
    }
}

/// RAKP 3 with an error status for a BMC session: the BMC drops a session in its handshake.
fn abort_packet(tag: u8, bmc_sid: u32) -> Vec<u8> {
    let abort = packet::rakp3(tag, 0x0f, bmc_sid, &[]);
    packet::encode(payload::RAKP3, 0, 0, &abort, None)
}

impl Active {
    /// Wraps an IPMI message for this session, with the next sequence number.
    fn wrap(&mut self, msg: &[u8]) -> Vec<u8> {
        // Zero is never a session sequence number.
        self.seq = self.seq.wrapping_add(1).max(1);
        self.sent += 1;
        match self.wire {
            Wire::Plus { keys, .. } => packet::encode(
                payload::IPMI,
                self.bmc_sid,
                self.seq,
                msg,
                Some((&keys, rand::random())),
            ),
            Wire::V15 { password } => {
                packet::encode_v15_md5(self.seq, self.bmc_sid, msg, &password)
            }
        }
    }

    /// The IPMI message of a datagram of this session (authentic), or None.
    fn unwrap(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        match self.wire {
            Wire::Plus { console_sid, keys } => {
                let p = packet::decode(bytes, Some(&keys)).ok()?;
                (p.ptype == payload::IPMI && p.session_id == console_sid).then_some(p.payload)
            }
            Wire::V15 { password } => {
                let p = packet::decode_v15(bytes, &password).ok()?;
                (p.auth_type == packet::AUTH_MD5 && p.session_id == self.bmc_sid).then_some(p.msg)
            }
        }
    }
}

/// Counters for diagnostics and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Sessions established.
    pub sessions_opened: u64,
    /// Close Session requests acknowledged by the BMC.
    pub sessions_closed: u64,
    /// Datagrams sent again after a timeout.
    pub retransmits: u64,
    /// Datagrams discarded (stale, duplicate, malformed or unauthentic).
    pub discarded: u64,
    /// Handshakes started over after a lost RAKP message.
    pub handshake_restarts: u64,
    /// Open Session requests sent (first sends and retransmissions).
    pub open_session_requests: u64,
    /// Extra sessions a BMC opened for a retransmitted Open Session, aborted on arrival.
    pub duplicate_opens_aborted: u64,
    /// Sessions presumed dead (no answer) and replaced within an operation.
    pub sessions_replaced: u64,
}

/// Which IPMI LAN protocol a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LanProtocol {
    /// Ask the BMC (Get Channel Authentication Capabilities): IPMI v2.0 RMCP+ where offered,
    /// IPMI v1.5 with MD5 only where the BMC offers nothing else.
    #[default]
    Auto,
    /// IPMI v2.0 RMCP+, cipher suite 3.
    Lanplus,
    /// IPMI v1.5 with MD5 authentication (no confidentiality).
    Lan15,
}

impl LanProtocol {
    pub fn label(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Lanplus => "lanplus",
            Self::Lan15 => "lan",
        }
    }
}

/// How the packets of an open session are wrapped.
#[derive(Clone, Copy)]
enum Wire {
    Plus { console_sid: u32, keys: Keys },
    V15 { password: [u8; 16] },
}

struct Active {
    wire: Wire,
    bmc_sid: u32,
    seq: u32,
    /// Datagrams sent in this session (a fresh session is opened long before this wraps).
    sent: u32,
    /// Last answer received in this session (BMCs expire idle sessions, typically after 60 s).
    last_answer: Instant,
}

/// One RMCP+ session with one BMC (opened on first use).
pub struct Session {
    endpoint: String,
    user: String,
    password: Secret,
    addr: SocketAddr,
    /// Replaced by a fresh one (a new source port) for every handshake.
    socket: Arc<UdpSocket>,
    /// The Open Session request made on `socket`, if any.
    proposal: Option<Proposal>,
    /// Bound on one operation (all attempts, including re-establishing the session).
    bound: Duration,
    /// A session idle this long is replaced before its next use.
    idle_limit: Duration,
    active: Option<Active>,
    /// The RMCP+ cipher suite this BMC speaks, once known (or as configured), and whether it
    /// was configured (no fallback).
    suite: Option<CipherSuite>,
    suite_forced: bool,
    /// The protocol asked for, and the one chosen with the BMC.
    protocol: LanProtocol,
    resolved: Option<LanProtocol>,
    rq_seq: u8,
    tag: u8,
    /// Retransmission timers: in-session (and RAKP) exchanges, Open Session, Chassis Control.
    rtt: RttEstimator,
    open_rtt: RttEstimator,
    action_rtt: RttEstimator,
    stats: Stats,
    /// Extra sessions aborted after their socket was retired (by a lingering task).
    reaped_late: Arc<AtomicU64>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("endpoint", &self.endpoint)
            .field("user", &self.user)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// The result of one IPMI command: completion code and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub completion: u8,
    pub data: Vec<u8>,
}

/// Text for an RMCP+ status code.
fn rmcp_status(code: u8) -> &'static str {
    match code {
        0x01 => "insufficient resources to create a session",
        0x02 => "invalid session id",
        0x03 => "invalid payload type",
        0x04 => "invalid authentication algorithm",
        0x05 => "invalid integrity algorithm",
        0x06 => "no matching authentication payload",
        0x07 => "no matching integrity payload",
        0x08 => "inactive session id",
        0x09 => "invalid role",
        0x0a => "unauthorized role or privilege level requested",
        0x0b => "insufficient resources to create a session at the requested role",
        0x0c => "invalid name length",
        0x0d => "unauthorized name",
        0x0e => "unauthorized GUID",
        0x0f => "invalid integrity check value",
        0x10 => "invalid confidentiality algorithm",
        0x11 => "no cipher suite match (pcg offers cipher suites 17 and 3)",
        0x12 => "illegal or unrecognized parameter",
        _ => "unknown status",
    }
}

/// What an Open Session exchange came to.
enum Opened {
    Session {
        console_sid: u32,
        bmc_sid: u32,
        suite: CipherSuite,
    },
    /// An error status from the BMC (no session was opened).
    Refused(u8),
    /// A session with algorithms pcg does not speak (aborted).
    Foreign((u8, u8, u8)),
}

enum Step<T> {
    Done(T),
    /// Not the answer to this request (stale or foreign): keep waiting.
    Skip,
}

impl Session {
    /// Binds a UDP socket connected to `addr`. No datagram is sent until the first request.
    pub async fn new(
        addr: SocketAddr,
        endpoint: &str,
        user: &str,
        password: Secret,
        bound: Duration,
        protocol: LanProtocol,
    ) -> Result<Self> {
        let socket = Self::bind(addr, endpoint).await?;
        Ok(Self {
            endpoint: endpoint.to_owned(),
            user: user.to_owned(),
            password,
            addr,
            socket,
            proposal: None,
            suite: None,
            suite_forced: false,
            bound,
            idle_limit: IDLE_REOPEN,
            active: None,
            protocol,
            resolved: None,
            rq_seq: 0,
            tag: 0,
            rtt: RttEstimator::session(),
            open_rtt: RttEstimator::open_session(),
            action_rtt: RttEstimator::action(),
            stats: Stats::default(),
            reaped_late: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Counters since this session object was made.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.duplicate_opens_aborted += self.reaped_late.load(Ordering::Relaxed);
        s
    }

    /// A UDP socket on a fresh ephemeral port, connected to `addr`.
    async fn bind(addr: SocketAddr, endpoint: &str) -> Result<Arc<UdpSocket>> {
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let unreachable = |e: std::io::Error| ProviderError::Unreachable {
            component: pcg_provider::Component::Bmc,
            endpoint: endpoint.to_owned(),
            reason: format!("UDP socket: {e}"),
        };
        let socket = UdpSocket::bind(local).await.map_err(unreachable)?;
        socket.connect(addr).await.map_err(unreachable)?;
        Ok(Arc::new(socket))
    }

    /// Moves to a fresh source port before a handshake, so that no BMC can take the new session
    /// for the one the old port had.
    async fn fresh_socket(&mut self) -> Result<()> {
        let fresh = Self::bind(self.addr, &self.endpoint).await?;
        self.retire_socket();
        self.socket = fresh;
        Ok(())
    }

    /// Before the socket is given up: when its Open Session request was sent more than once,
    /// answers to the other copies may still be on their way, each naming a session the BMC
    /// opened. A task keeps the socket a while and aborts every such session as it arrives.
    fn retire_socket(&mut self) {
        let Some(prop) = self.proposal.take() else {
            return;
        };
        if prop.sends <= 1 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let socket = self.socket.clone();
        let until = prop.last_send + self.open_rtt.max * 2;
        let reaped = self.reaped_late.clone();
        let endpoint = self.endpoint.clone();
        rt.spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Ok(Ok(n)) = tokio::time::timeout(left, socket.recv(&mut buf)).await else {
                    break;
                };
                if let Some(extra) = prop.extra_session(&buf[..n], true) {
                    tracing::debug!(%endpoint, bmc_sid = extra, "aborting a late second session");
                    let pkt = abort_packet(prop.tag.wrapping_add(1), extra);
                    for _ in 0..2 {
                        let _ = socket.try_send(&pkt);
                    }
                    reaped.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// Uses only `suite` (no fallback to another).
    pub fn force_cipher_suite(&mut self, suite: CipherSuite) {
        self.suite = Some(suite);
        self.suite_forced = true;
    }

    /// The cipher suite of the RMCP+ sessions, once one was opened (or as forced).
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        self.suite
    }

    /// Replaces a session idle for `limit` before its next use (default [`IDLE_REOPEN`]).
    pub fn set_idle_limit(&mut self, limit: Duration) {
        self.idle_limit = limit;
    }

    pub fn is_open(&self) -> bool {
        self.active.is_some()
    }

    fn timeout(&self, operation: &str) -> ProviderError {
        ProviderError::Timeout {
            component: pcg_provider::Component::Bmc,
            endpoint: self.endpoint.clone(),
            operation: operation.to_owned(),
            after: self.bound,
        }
    }

    fn auth(&self, detail: String) -> ProviderError {
        ProviderError::Auth {
            component: pcg_provider::Component::Bmc,
            endpoint: self.endpoint.clone(),
            user: self.user.clone(),
            detail,
        }
    }

    fn estimator(&mut self, timer: Timer) -> &mut RttEstimator {
        match timer {
            Timer::Session => &mut self.rtt,
            Timer::OpenSession => &mut self.open_rtt,
            Timer::Action => &mut self.action_rtt,
        }
    }

    /// Sends what `build` makes, retransmitting (a fresh build each time) on `timer` until
    /// `accept` takes an answer or `deadline` passes. Datagrams `accept` skips are offered to
    /// [`Session::reap_duplicate_open`].
    async fn exchange<T>(
        &mut self,
        operation: &str,
        deadline: Instant,
        attempts: u32,
        timer: Timer,
        mut build: impl FnMut(&mut Self) -> Vec<u8>,
        mut accept: impl FnMut(&mut Self, &[u8]) -> Result<Step<T>>,
    ) -> Result<T> {
        let mut rto = self.estimator(timer).rto();
        let cap = self.estimator(timer).max;
        let mut buf = vec![0u8; 2048];
        let mut first = true;
        let mut sent = 0u32;
        loop {
            let now = Instant::now();
            if now >= deadline || sent >= attempts {
                return Err(self.timeout(operation));
            }
            sent += 1;
            if !first {
                self.stats.retransmits += 1;
            }
            let pkt = build(self);
            tracing::trace!(endpoint = %self.endpoint, operation, attempt = sent, "send");
            let sent_at = Instant::now();
            let retransmitted = !first;
            first = false;
            if let Err(e) = self.socket.send(&pkt).await {
                return Err(self.io_error(e));
            }
            let attempt_end = (sent_at + rto).min(deadline);
            loop {
                let left = attempt_end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, self.socket.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) => return Err(self.io_error(e)),
                    Ok(Ok(n)) => match accept(self, &buf[..n])? {
                        Step::Done(v) => {
                            if !retransmitted {
                                let rtt = sent_at.elapsed();
                                self.estimator(timer).sample(rtt);
                            }
                            return Ok(v);
                        }
                        Step::Skip => {
                            if !self.reap_duplicate_open(&buf[..n]) {
                                self.stats.discarded += 1;
                            }
                        }
                    },
                }
            }
            rto = (rto * 3 / 2).min(cap);
        }
    }

    /// An Open Session answer to this socket's request that names a session other than the one
    /// in use is a second session the BMC opened for a retransmission: abort it at once (RAKP 3
    /// with an error status), so that it does not hold a slot until the BMC expires it.
    fn reap_duplicate_open(&mut self, bytes: &[u8]) -> bool {
        // Before one is chosen, the Open Session exchange itself takes the first answer.
        let Some(extra) = self.proposal.and_then(|p| p.extra_session(bytes, false)) else {
            return false;
        };
        tracing::debug!(endpoint = %self.endpoint, bmc_sid = extra, "aborting a second session opened for a retransmitted Open Session");
        self.abort_handshake(extra);
        self.stats.duplicate_opens_aborted += 1;
        true
    }

    fn io_error(&self, e: std::io::Error) -> ProviderError {
        ProviderError::Unreachable {
            component: pcg_provider::Component::Bmc,
            endpoint: self.endpoint.clone(),
            reason: format!("UDP: {e}"),
        }
    }

    fn next_tag(&mut self) -> u8 {
        self.tag = self.tag.wrapping_add(1);
        self.tag
    }

    /// Opens a session (Open Session, RAKP 1–4, Set Session Privilege Level ADMINISTRATOR),
    /// starting the handshake over when a RAKP exchange gets lost, until `deadline`.
    async fn establish(&mut self, deadline: Instant) -> Result<()> {
        let protocol = match self.resolved {
            Some(p) => p,
            None => {
                let p = self.pick_protocol(deadline).await?;
                tracing::debug!(endpoint = %self.endpoint, protocol = p.label(), "IPMI LAN protocol");
                self.resolved = Some(p);
                p
            }
        };
        if protocol == LanProtocol::Lan15 {
            return self.handshake_v15(deadline).await;
        }
        if self.suite.is_none() {
            let suite = self.pick_cipher_suite(deadline).await;
            tracing::debug!(endpoint = %self.endpoint, suite = suite.id(), "RMCP+ cipher suite");
            self.suite = Some(suite);
        }
        loop {
            match self.handshake(deadline).await {
                Err(ProviderError::Timeout { operation, .. })
                    if (operation == RAKP1_OP || operation == RAKP3_OP)
                        && Instant::now() < deadline =>
                {
                    tracing::debug!(endpoint = %self.endpoint, operation, "handshake lost; starting over");
                    self.stats.handshake_restarts += 1;
                }
                other => return other,
            }
        }
    }

    async fn handshake(&mut self, deadline: Instant) -> Result<()> {
        let user = self.user.as_bytes().to_vec();
        if user.len() > 16 {
            return Err(ProviderError::invalid(
                "user",
                "IPMI user names have at most 16 bytes",
            ));
        }
        let mut kuid = self.password.expose().as_bytes().to_vec();
        if kuid.len() > 20 {
            return Err(ProviderError::invalid(
                "password",
                "IPMI v2.0 passwords have at most 20 bytes",
            ));
        }
        kuid.resize(20, 0);
        // A fresh source port for every handshake.
        self.fresh_socket().await?;
        // Keep part of the bound to ask whether the BMC answers at all.
        let reserve = (self.bound / 4).min(Duration::from_secs(1));
        let open_deadline = deadline.checked_sub(reserve).unwrap_or(deadline);
        // The suite the BMC listed (or 3 where it lists none); should the BMC refuse its
        // algorithms (status 0x04 and the like: no session is made), the other one. A BMC that
        // answers with other algorithms than proposed (pyghmi answers suite 3's to anything)
        // has chosen those.
        let preferred = self.suite.unwrap_or(CipherSuite::Three);
        let mut opened = self.open_session(preferred, open_deadline).await;
        if let Ok(Opened::Refused(status)) = opened {
            if !self.suite_forced && matches!(status, 0x04 | 0x05 | 0x06 | 0x07 | 0x10 | 0x11) {
                let other = match preferred {
                    CipherSuite::Three => CipherSuite::Seventeen,
                    CipherSuite::Seventeen => CipherSuite::Three,
                };
                tracing::debug!(endpoint = %self.endpoint, status, suite = other.id(), "cipher suite refused; proposing the other");
                opened = self.open_session(other, open_deadline).await;
            }
        }
        let (console_sid, bmc_sid, suite) = match opened {
            Ok(Opened::Session {
                console_sid,
                bmc_sid,
                suite,
            }) => (console_sid, bmc_sid, suite),
            Ok(Opened::Refused(status)) => return Err(self.status_error("Open Session", status)),
            Ok(Opened::Foreign(algorithms)) => {
                return Err(ProviderError::Unsupported {
                    endpoint: self.endpoint.clone(),
                    what: format!(
                        "the RMCP+ algorithms it chose (authentication, integrity, confidentiality {algorithms:02x?}); pcg speaks cipher suites 17 and 3"
                    ),
                })
            }
            Err(ProviderError::Timeout { .. }) => {
                return Err(self.diagnose_silence(deadline).await)
            }
            Err(e) => return Err(e),
        };
        if self.suite_forced && Some(suite) != self.suite {
            self.abort_handshake(bmc_sid);
            return Err(ProviderError::Unsupported {
                endpoint: self.endpoint.clone(),
                what: format!(
                    "cipher suite {} (it chose suite {})",
                    self.suite.map_or(0, CipherSuite::id),
                    suite.id()
                ),
            });
        }
        self.suite = Some(suite);
        if let Some(p) = self.proposal.as_mut() {
            p.chosen_bmc_sid = Some(bmc_sid);
        }
        self.handshake_rakp(deadline, suite, console_sid, bmc_sid, &user, &kuid)
            .await
    }

    /// Open Session proposing `suite`: one request, repeated as it is (the same tag and console
    /// session id) on the Open Session timer until an answer or `deadline`.
    async fn open_session(&mut self, suite: CipherSuite, deadline: Instant) -> Result<Opened> {
        let tag = self.next_tag();
        let console_sid = rand::random::<u32>().max(1);
        self.proposal = Some(Proposal {
            tag,
            console_sid,
            chosen_bmc_sid: None,
            sends: 0,
            last_send: Instant::now(),
        });
        let open = packet::open_session_request(tag, console_sid, PRIV_ADMIN, suite);
        let open_pkt = packet::encode(payload::OPEN_SESSION_REQUEST, 0, 0, &open, None);
        self.exchange(
            "RMCP+ Open Session",
            deadline,
            u32::MAX,
            Timer::OpenSession,
            |s| {
                s.stats.open_session_requests += 1;
                if let Some(p) = s.proposal.as_mut() {
                    p.sends += 1;
                    p.last_send = Instant::now();
                }
                open_pkt.clone()
            },
            |s, bytes| {
                let Ok(p) = packet::decode(bytes, None) else {
                    return Ok(Step::Skip);
                };
                if p.ptype != payload::OPEN_SESSION_RESPONSE {
                    return Ok(Step::Skip);
                }
                let Ok(r) = packet::parse_open_session_response(&p.payload) else {
                    return Ok(Step::Skip);
                };
                if r.tag != tag || r.console_sid.is_some_and(|c| c != console_sid) {
                    return Ok(Step::Skip);
                }
                if r.status != 0 {
                    return Ok(Step::Done(Opened::Refused(r.status)));
                }
                let (auth, integ, conf) = r.algorithms.unwrap_or_default();
                Ok(Step::Done(
                    match CipherSuite::from_algorithms(auth, integ, conf) {
                        Some(chosen) => Opened::Session {
                            console_sid,
                            bmc_sid: r.bmc_sid,
                            suite: chosen,
                        },
                        None => {
                            // A session the BMC opened that pcg cannot use: drop it.
                            s.abort_handshake(r.bmc_sid);
                            Opened::Foreign((auth, integ, conf))
                        }
                    },
                ))
            },
        )
        .await
    }

    /// RAKP 1–4 for the session the BMC opened, then Set Session Privilege Level.
    async fn handshake_rakp(
        &mut self,
        deadline: Instant,
        suite: CipherSuite,
        console_sid: u32,
        bmc_sid: u32,
        user: &[u8],
        kuid: &[u8],
    ) -> Result<()> {
        // RAKP 1/2.
        let rm: [u8; 16] = rand::random();
        let role = PRIV_ADMIN | NAME_ONLY_LOOKUP;
        let tag = self.next_tag();
        let r1 = packet::rakp1(tag, bmc_sid, &rm, role, user);
        let r2 = self
            .exchange(
                RAKP1_OP,
                deadline,
                RAKP_ATTEMPTS,
                Timer::Session,
                |_| packet::encode(payload::RAKP1, 0, 0, &r1, None),
                |s, bytes| {
                    let Ok(p) = packet::decode(bytes, None) else {
                        return Ok(Step::Skip);
                    };
                    if p.ptype != payload::RAKP2 {
                        return Ok(Step::Skip);
                    }
                    let Ok(r) = packet::parse_rakp2(&p.payload) else {
                        return Ok(Step::Skip);
                    };
                    if r.tag != tag || r.console_sid.is_some_and(|c| c != console_sid) {
                        return Ok(Step::Skip);
                    }
                    if r.status != 0 {
                        return Err(s.status_error("RAKP 2", r.status));
                    }
                    Ok(Step::Done(r))
                },
            )
            .await;
        let r2 = match r2 {
            Ok(r2) => r2,
            Err(e) => {
                // The BMC may hold the session after RAKP 1: tell it to drop it.
                self.abort_handshake(bmc_sid);
                return Err(e);
            }
        };
        let ulen = [user.len() as u8];
        let expect = suite.hmac(
            kuid,
            &[
                &console_sid.to_le_bytes(),
                &bmc_sid.to_le_bytes(),
                &rm,
                &r2.rc,
                &r2.guid,
                &[role],
                &ulen,
                user,
            ],
        );
        if r2.auth_code.get(..expect.len()) != Some(&expect[..]) {
            // Tell the BMC to drop the half-open session, then report the password.
            self.abort_handshake(bmc_sid);
            return Err(
                self.auth("password rejected (RAKP 2 key exchange code does not match)".into())
            );
        }
        let sik = suite.hmac(kuid, &[&rm, &r2.rc, &[role], &ulen, user]);
        let keys = Keys::derive(suite, &sik);

        // RAKP 3/4.
        let tag = self.next_tag();
        let code = suite.hmac(
            kuid,
            &[&r2.rc, &console_sid.to_le_bytes(), &[role], &ulen, user],
        );
        let r3 = packet::rakp3(tag, 0, bmc_sid, &code);
        let mut icv = suite.hmac(&sik, &[&rm, &bmc_sid.to_le_bytes(), &r2.guid]);
        icv.truncate(suite.rakp4_icv_len());
        let rakp4 = self
            .exchange(
                RAKP3_OP,
                deadline,
                RAKP_ATTEMPTS,
                Timer::Session,
                |_| packet::encode(payload::RAKP3, 0, 0, &r3, None),
                |s, bytes| {
                    // ipmi_sim answers a repeated RAKP 3 (its first RAKP 4 lost) from inside the
                    // session it already activated: encrypted and authenticated with its keys.
                    let p = match packet::decode(bytes, None) {
                        Ok(p) => p,
                        Err(packet::PacketError::NoKeys) => {
                            match packet::decode(bytes, Some(&keys)) {
                                Ok(p) => p,
                                Err(_) => return Ok(Step::Skip),
                            }
                        }
                        Err(_) => return Ok(Step::Skip),
                    };
                    if p.ptype != payload::RAKP4 {
                        return Ok(Step::Skip);
                    }
                    let Ok(r) = packet::parse_rakp4(&p.payload) else {
                        return Ok(Step::Skip);
                    };
                    if r.tag != tag || r.console_sid.is_some_and(|c| c != console_sid) {
                        return Ok(Step::Skip);
                    }
                    if r.status != 0 {
                        return Err(s.status_error("RAKP 4", r.status));
                    }
                    if r.icv.get(..icv.len()) != Some(&icv[..]) {
                        return Err(s.auth("RAKP 4 integrity check value does not match".into()));
                    }
                    Ok(Step::Done(()))
                },
            )
            .await;
        if let Err(e) = rakp4 {
            if matches!(e, ProviderError::Timeout { .. }) {
                // The BMC may still wait for RAKP 3 (abort it), or may have activated the
                // session and lost only RAKP 4 (close it; a BMC that never activated it does not
                // answer, which costs this short wait).
                self.abort_handshake(bmc_sid);
                self.active = Some(Active {
                    wire: Wire::Plus { console_sid, keys },
                    bmc_sid,
                    seq: 0,
                    sent: 0,
                    last_answer: Instant::now(),
                });
                let left = deadline.saturating_duration_since(Instant::now());
                self.close_within(left.min(Duration::from_millis(1500)))
                    .await;
            }
            return Err(e);
        }
        self.active = Some(Active {
            wire: Wire::Plus { console_sid, keys },
            bmc_sid,
            seq: 0,
            sent: 0,
            last_answer: Instant::now(),
        });
        self.stats.sessions_opened += 1;
        tracing::debug!(endpoint = %self.endpoint, user = %self.user, "RMCP+ session open");

        self.raise_privilege(deadline).await
    }

    /// Set Session Privilege Level ADMINISTRATOR; the session is closed if it fails.
    async fn raise_privilege(&mut self, deadline: Instant) -> Result<()> {
        // Without this the session stays at USER privilege and Chassis Control is refused.
        let r = self
            .send_in_session(0x06, 0x3b, &[PRIV_ADMIN], deadline)
            .await;
        match r {
            Ok(r) if r.completion == 0 => Ok(()),
            Ok(r) => {
                self.close_now().await;
                Err(self.auth(format!(
                    "Set Session Privilege Level ADMINISTRATOR refused (completion code {:#04x}); the user needs the administrator privilege",
                    r.completion
                )))
            }
            Err(e) => {
                self.close_now().await;
                Err(e)
            }
        }
    }

    /// Open Session got no answer: ask whether the BMC answers at all (Get Channel
    /// Authentication Capabilities needs no session), and say which it was. Silence is never
    /// reported as full session slots: only the BMC's own word (RMCP+ status "insufficient
    /// resources", completion code 0x81 to Activate Session) is.
    async fn diagnose_silence(&mut self, deadline: Instant) -> ProviderError {
        let probe = self.channel_auth_caps(deadline, 0x8e).await.map(|_| ());
        match probe {
            Ok(()) => self.timeout(
                "RMCP+ Open Session (the BMC does answer Get Channel Authentication Capabilities, so it is up but opened no session: it may be overloaded or drop RMCP+ from this address)",
            ),
            Err(ProviderError::Timeout { .. }) => self.timeout("RMCP+ Open Session"),
            Err(e) => e,
        }
    }

    /// Sends RAKP 3 with an error status (twice, against loss) so that the BMC drops a session
    /// whose handshake pcg gives up; no answer is awaited.
    fn abort_handshake(&mut self, bmc_sid: u32) {
        let pkt = abort_packet(self.next_tag(), bmc_sid);
        for _ in 0..2 {
            let _ = self.socket.try_send(&pkt);
        }
    }

    /// Get Channel Authentication Capabilities (no session needed) for `channel` (0x8e: this
    /// channel, with the IPMI v2.0 extended data); returns completion code and data.
    async fn channel_auth_caps(&mut self, deadline: Instant, channel: u8) -> Result<Reply> {
        self.rq_seq = (self.rq_seq + 1) & 0x3f;
        let rq_seq = self.rq_seq;
        let msg = packet::ipmi_request(0x06, 0x38, rq_seq, &[channel, PRIV_ADMIN]);
        self.exchange(
            "Get Channel Authentication Capabilities",
            deadline,
            u32::MAX,
            Timer::Session,
            |_| packet::encode_presession_v15(&msg),
            |_, bytes| {
                let Ok(m) = packet::decode_presession_v15(bytes) else {
                    return Ok(Step::Skip);
                };
                match packet::ipmi_response(&m) {
                    Ok(r) if r.cmd == 0x38 && r.rq_seq == rq_seq => Ok(Step::Done(Reply {
                        completion: r.completion,
                        data: r.data,
                    })),
                    _ => Ok(Step::Skip),
                }
            },
        )
        .await
    }

    /// Chooses the protocol: the configured one, or (Auto) what the BMC says it supports.
    async fn pick_protocol(&mut self, deadline: Instant) -> Result<LanProtocol> {
        if self.protocol != LanProtocol::Auto {
            return Ok(self.protocol);
        }
        let mut caps = self.channel_auth_caps(deadline, 0x8e).await?;
        if caps.completion != 0 {
            // A v1.5-only BMC may refuse the extended-data request.
            caps = self.channel_auth_caps(deadline, 0x0e).await?;
        }
        let d = &caps.data;
        if caps.completion == 0 && d.len() >= 4 && d[1] & 0x80 != 0 && d[3] & 0x02 != 0 {
            Ok(LanProtocol::Lanplus)
        } else if caps.completion == 0 && d.len() >= 2 && d[1] & 0x04 != 0 {
            Ok(LanProtocol::Lan15)
        } else {
            Err(ProviderError::Unsupported {
                endpoint: self.endpoint.clone(),
                what: format!(
                    "every IPMI LAN authentication pcg speaks (RMCP+ cipher suite 3, IPMI v1.5 MD5); channel capabilities {:02x?}, completion code {:#04x}",
                    d, caps.completion
                ),
            })
        }
    }

    /// The cipher suite to propose: 17 when Get Channel Cipher Suites lists it, else 3 (also
    /// when the BMC does not answer that command within a second: not every BMC does).
    async fn pick_cipher_suite(&mut self, deadline: Instant) -> CipherSuite {
        let bound = (Instant::now() + Duration::from_secs(1)).min(deadline);
        let mut records = Vec::new();
        for index in 0..8u8 {
            self.rq_seq = (self.rq_seq + 1) & 0x3f;
            let rq_seq = self.rq_seq;
            // This channel, payload IPMI, list by cipher suite, page `index`.
            let msg = packet::ipmi_request(0x06, 0x54, rq_seq, &[0x0e, 0x00, 0x80 | index]);
            let page = self
                .exchange(
                    "Get Channel Cipher Suites",
                    bound,
                    u32::MAX,
                    Timer::Session,
                    |_| packet::encode_presession_v15(&msg),
                    |_, bytes| {
                        // Some BMCs (pyghmi) answer in the RMCP+ format, outside any session.
                        let m = match packet::decode_presession_v15(bytes) {
                            Ok(m) => m,
                            Err(_) => match packet::decode(bytes, None) {
                                Ok(p) if p.ptype == payload::IPMI && p.session_id == 0 => p.payload,
                                _ => return Ok(Step::Skip),
                            },
                        };
                        match packet::ipmi_response(&m) {
                            Ok(r) if r.cmd == 0x54 && r.rq_seq == rq_seq => Ok(Step::Done(r)),
                            _ => Ok(Step::Skip),
                        }
                    },
                )
                .await;
            match page {
                Ok(r) if r.completion == 0 && !r.data.is_empty() => {
                    records.extend_from_slice(&r.data[1..]);
                    if r.data.len() < 17 {
                        break;
                    }
                }
                _ => break,
            }
        }
        if packet::cipher_suite_ids(&records).contains(&17) {
            CipherSuite::Seventeen
        } else {
            CipherSuite::Three
        }
    }

    /// The protocol in use (after the first session was opened).
    pub fn protocol(&self) -> Option<LanProtocol> {
        self.resolved
    }

    /// IPMI v1.5 session: Get Session Challenge, Activate Session (MD5), privilege.
    async fn handshake_v15(&mut self, deadline: Instant) -> Result<()> {
        let pad16 = |field: &str, v: &[u8]| -> Result<[u8; 16]> {
            if v.len() > 16 {
                return Err(ProviderError::invalid(
                    field,
                    "IPMI v1.5 allows at most 16 bytes",
                ));
            }
            let mut out = [0u8; 16];
            out[..v.len()].copy_from_slice(v);
            Ok(out)
        };
        let user = pad16("user", self.user.as_bytes())?;
        let password = pad16("password", self.password.expose().as_bytes())?;
        self.fresh_socket().await?;

        self.rq_seq = (self.rq_seq + 1) & 0x3f;
        let rq = self.rq_seq;
        let mut data = vec![packet::AUTH_MD5];
        data.extend_from_slice(&user);
        let msg = packet::ipmi_request(0x06, 0x39, rq, &data);
        let (temp_sid, challenge) = self
            .exchange(
                "Get Session Challenge",
                deadline,
                u32::MAX,
                Timer::Session,
                |_| packet::encode_presession_v15(&msg),
                |s, bytes| {
                    let Ok(m) = packet::decode_presession_v15(bytes) else {
                        return Ok(Step::Skip);
                    };
                    let Ok(r) = packet::ipmi_response(&m) else {
                        return Ok(Step::Skip);
                    };
                    if r.cmd != 0x39 || r.rq_seq != rq {
                        return Ok(Step::Skip);
                    }
                    match r.completion {
                        0 if r.data.len() >= 20 => {
                            let sid =
                                u32::from_le_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
                            let mut ch = [0u8; 16];
                            ch.copy_from_slice(&r.data[4..20]);
                            Ok(Step::Done((sid, ch)))
                        }
                        0x81 => Err(s.auth("Get Session Challenge: unknown user name".into())),
                        0x82 => Err(s.auth("Get Session Challenge: null user disabled".into())),
                        cc => Err(ProviderError::ProviderFault {
                            endpoint: s.endpoint.clone(),
                            message: format!("Get Session Challenge: completion code {cc:#04x}"),
                        }),
                    }
                },
            )
            .await?;

        // The sequence number we want the BMC's first message to carry.
        let initial: u32 = rand::random::<u32>() % 0x4000_0000 + 1;
        self.rq_seq = (self.rq_seq + 1) & 0x3f;
        let rq = self.rq_seq;
        let mut data = vec![packet::AUTH_MD5, PRIV_ADMIN];
        data.extend_from_slice(&challenge);
        data.extend_from_slice(&initial.to_le_bytes());
        let msg = packet::ipmi_request(0x06, 0x3a, rq, &data);
        let activated = self
            .exchange(
                "Activate Session",
                deadline,
                u32::MAX,
                Timer::Session,
                |_| packet::encode_v15_md5(0, temp_sid, &msg, &password),
                |s, bytes| {
                    let Ok(p) = packet::decode_v15(bytes, &password) else {
                        return Ok(Step::Skip);
                    };
                    let Ok(r) = packet::ipmi_response(&p.msg) else {
                        return Ok(Step::Skip);
                    };
                    if r.cmd != 0x3a || r.rq_seq != rq {
                        return Ok(Step::Skip);
                    }
                    match r.completion {
                        // Session id, and the sequence number the BMC wants our first message to carry.
                        0 if r.data.len() >= 10 => Ok(Step::Done((
                            u32::from_le_bytes([r.data[1], r.data[2], r.data[3], r.data[4]]),
                            u32::from_le_bytes([r.data[5], r.data[6], r.data[7], r.data[8]]),
                        ))),
                        0x81 => Err(ProviderError::NoSessionSlots {
                            endpoint: s.endpoint.clone(),
                            user: s.user.clone(),
                            detail: "Activate Session: no session slot available (0x81)".into(),
                        }),
                        0x86 => Err(s.auth(
                            "Activate Session: ADMINISTRATOR privilege exceeds the user's limit"
                                .into(),
                        )),
                        cc => Err(s.auth(format!(
                            "Activate Session refused (completion code {cc:#04x})"
                        ))),
                    }
                },
            )
            .await;
        let (sid, first_seq) = match activated {
            Ok(v) => v,
            // The user exists (the challenge came back) but activation gets no authentic answer:
            // a BMC drops requests whose MD5 auth code does not match its password.
            Err(ProviderError::Timeout { .. }) => {
                return Err(self.auth(
                    "no authentic answer to Activate Session (IPMI v1.5 MD5) while the BMC answers otherwise: the password is most likely wrong".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        self.active = Some(Active {
            wire: Wire::V15 { password },
            bmc_sid: sid,
            seq: first_seq.wrapping_sub(1),
            sent: 0,
            last_answer: Instant::now(),
        });
        self.stats.sessions_opened += 1;
        tracing::debug!(endpoint = %self.endpoint, user = %self.user, "IPMI v1.5 session open");
        self.raise_privilege(deadline).await
    }

    fn status_error(&self, step: &str, status: u8) -> ProviderError {
        let detail = format!(
            "{step}: RMCP+ status {status:#04x} ({})",
            rmcp_status(status)
        );
        match status {
            0x01 | 0x0b => ProviderError::NoSessionSlots {
                endpoint: self.endpoint.clone(),
                user: self.user.clone(),
                detail,
            },
            0x09 | 0x0a | 0x0d | 0x0e | 0x0f => self.auth(detail),
            0x04 | 0x05 | 0x06 | 0x07 | 0x10 | 0x11 => ProviderError::Unsupported {
                endpoint: self.endpoint.clone(),
                what: format!("the RMCP+ cipher suite proposed ({detail})"),
            },
            _ => ProviderError::ProviderFault {
                endpoint: self.endpoint.clone(),
                message: detail,
            },
        }
    }

    /// Sends one command in the open session and waits for its response.
    async fn send_in_session(
        &mut self,
        netfn: u8,
        cmd: u8,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Reply> {
        self.rq_seq = (self.rq_seq + 1) & 0x3f;
        let rq_seq = self.rq_seq;
        let msg = packet::ipmi_request(netfn, cmd, rq_seq, data);
        let operation = format!("IPMI command netfn {netfn:#04x} cmd {cmd:#04x}");
        self.exchange(
            &operation,
            deadline,
            u32::MAX,
            Timer::of_command(netfn, cmd),
            |s| match s.active.as_mut() {
                Some(a) => a.wrap(&msg),
                None => Vec::new(),
            },
            |s, bytes| {
                let Some(m) = s.active.as_ref().and_then(|a| a.unwrap(bytes)) else {
                    return Ok(Step::Skip);
                };
                let Ok(r) = packet::ipmi_response(&m) else {
                    return Ok(Step::Skip);
                };
                if r.rq_seq != rq_seq || r.cmd != cmd || r.netfn != netfn | 1 {
                    return Ok(Step::Skip);
                }
                Ok(Step::Done(Reply {
                    completion: r.completion,
                    data: r.data,
                }))
            },
        )
        .await
    }

    /// Runs one IPMI command within the session's bound: opens the session if needed, and if the
    /// BMC stops answering in the session (e.g. it expired it), opens a fresh one and tries again
    /// while time is left.
    pub async fn command(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Reply> {
        let deadline = Instant::now() + self.bound;
        let mut reopened = false;
        loop {
            if self.active.as_ref().is_some_and(|a| a.sent >= SEQ_LIMIT) {
                self.close_now().await;
            }
            if self
                .active
                .as_ref()
                .is_some_and(|a| a.last_answer.elapsed() >= self.idle_limit)
            {
                // Probably expired by the BMC: close it if it is not, and open a fresh one.
                self.forget_with_close();
            }
            if self.active.is_none() {
                self.establish(deadline).await?;
            }
            // Give a live session most of the bound, keeping some to open a fresh one.
            let left = deadline.saturating_duration_since(Instant::now());
            let try_until = if reopened {
                deadline
            } else {
                Instant::now() + (left * 2 / 3).min(LIVE_SESSION_WINDOW)
            };
            match self.send_in_session(netfn, cmd, data, try_until).await {
                Ok(r) => {
                    if let Some(a) = self.active.as_mut() {
                        a.last_answer = Instant::now();
                    }
                    return Ok(r);
                }
                Err(ProviderError::Timeout { .. }) if !reopened && Instant::now() < deadline => {
                    tracing::debug!(endpoint = %self.endpoint, "no answer in session; opening a fresh one");
                    self.forget_with_close();
                    self.stats.sessions_replaced += 1;
                    reopened = true;
                }
                Err(ProviderError::Timeout { .. }) => {
                    self.forget_with_close();
                    return Err(
                        self.timeout(&format!("IPMI command netfn {netfn:#04x} cmd {cmd:#04x}"))
                    );
                }
                Err(e) => {
                    self.forget_with_close();
                    return Err(e);
                }
            }
        }
    }

    /// Sends Close Session and waits briefly for the answer; the session is forgotten either way.
    pub async fn close_now(&mut self) {
        // Short: a BMC that got the first Close Session but whose answer was lost does not
        // answer a repeated one (the session is gone).
        self.close_within(self.bound.min(Duration::from_millis(1500)))
            .await;
    }

    /// Close Session, waiting at most `bound` for the answer; the session is forgotten either
    /// way.
    async fn close_within(&mut self, bound: Duration) {
        let Some(bmc_sid) = self.active.as_ref().map(|a| a.bmc_sid) else {
            return;
        };
        let deadline = Instant::now() + bound;
        match self
            .send_in_session(0x06, 0x3c, &bmc_sid.to_le_bytes(), deadline)
            .await
        {
            Ok(r) if r.completion == 0 => self.stats.sessions_closed += 1,
            _ => {}
        }
        self.active = None;
    }

    /// Forgets the session after sending one Close Session datagram (no wait): for error paths
    /// and drop.
    fn forget_with_close(&mut self) {
        if let Some(mut a) = self.active.take() {
            self.rq_seq = (self.rq_seq + 1) & 0x3f;
            let msg = packet::ipmi_request(0x06, 0x3c, self.rq_seq, &a.bmc_sid.to_le_bytes());
            let pkt = a.wrap(&msg);
            let _ = self.socket.try_send(&pkt);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.forget_with_close();
        self.retire_socket();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_answer(tag: u8, status: u8, console_sid: u32, bmc_sid: u32) -> Vec<u8> {
        let mut m = vec![tag, status, PRIV_ADMIN, 0];
        m.extend_from_slice(&console_sid.to_le_bytes());
        m.extend_from_slice(&bmc_sid.to_le_bytes());
        m.extend_from_slice(&[0x00, 0, 0, 0x08, 0x01, 0, 0, 0]);
        m.extend_from_slice(&[0x01, 0, 0, 0x08, 0x01, 0, 0, 0]);
        m.extend_from_slice(&[0x02, 0, 0, 0x08, 0x01, 0, 0, 0]);
        packet::encode(payload::OPEN_SESSION_RESPONSE, 0, 0, &m, None)
    }

    #[test]
    fn a_second_session_for_a_retransmitted_open_session_is_recognised() {
        let mut p = Proposal {
            tag: 7,
            console_sid: 0x1234,
            chosen_bmc_sid: None,
            sends: 2,
            last_send: Instant::now(),
        };
        let first = open_answer(7, 0, 0x1234, 0x100);
        let second = open_answer(7, 0, 0x1234, 0x200);
        // Before a session is chosen, only a retired socket's reaper takes any answer as extra.
        assert_eq!(p.extra_session(&first, false), None);
        assert_eq!(p.extra_session(&first, true), Some(0x100));
        p.chosen_bmc_sid = Some(0x100);
        assert_eq!(p.extra_session(&first, true), None, "the session in use");
        assert_eq!(p.extra_session(&second, false), Some(0x200));
        // Not ours, or an error status (no session was opened): nothing to abort.
        assert_eq!(
            p.extra_session(&open_answer(8, 0, 0x1234, 0x300), true),
            None
        );
        assert_eq!(
            p.extra_session(&open_answer(7, 0, 0x9999, 0x300), true),
            None
        );
        assert_eq!(
            p.extra_session(&open_answer(7, 0x01, 0x1234, 0), true),
            None
        );
    }

    #[test]
    fn the_open_session_timer_is_learnt_apart_from_the_session_timer() {
        let mut session = RttEstimator::session();
        let mut open = RttEstimator::open_session();
        assert_eq!(open.rto(), Duration::from_millis(1200));
        // Fast in-session answers bring the session timer to its floor...
        for _ in 0..20 {
            session.sample(Duration::from_millis(2));
        }
        assert_eq!(session.rto(), Duration::from_millis(150));
        // ...while Open Session answers after 1 s keep the Open Session timer above 1 s.
        for _ in 0..20 {
            open.sample(Duration::from_millis(1000));
        }
        assert!(open.rto() > Duration::from_millis(1400), "{:?}", open.rto());
        assert!(open.rto() <= Duration::from_secs(3));
    }

    #[test]
    fn chassis_control_waits_longer_than_fast_reads_before_it_is_sent_again() {
        assert_eq!(Timer::of_command(0x00, 0x02), Timer::Action);
        assert_eq!(Timer::of_command(0x00, 0x01), Timer::Session);
        let mut action = RttEstimator::action();
        assert_eq!(action.rto(), Duration::from_secs(2));
        // A BMC that answers power writes in a few milliseconds still gets 1.5 s.
        for _ in 0..20 {
            action.sample(Duration::from_millis(3));
        }
        assert_eq!(action.rto(), Duration::from_millis(1500));
        // One that took 1.4 s (a loaded ipmi_sim) is given more before a second copy.
        action.sample(Duration::from_millis(1400));
        assert!(
            action.rto() > Duration::from_millis(1500),
            "{:?}",
            action.rto()
        );
        assert!(action.rto() <= Duration::from_secs(4));
    }
}
