//! How the gateway reaches the SaaS, for the tunnel and for pairing alike.
//!
//! Two transports, each directly or through an HTTP `CONNECT` proxy ([`proxy`]):
//! - **direct**: TLS to the SaaS's public port, verified against the pinned SaaS CA, client
//!   certificate when paired, then HTTP/2 (the tunnel) or HTTP/1.1 (pairing);
//! - **websocket**: TLS to the same port that a proxy may inspect (trusting the SaaS CA and the
//!   configured `proxy_ca`), a WebSocket upgrade to `/v1/tunnel/ws`, and inside its byte stream
//!   the very same TLS as the direct transport — mutual and pinned end to end.
//!
//! [`Dialer::dial`] does either and says precisely what failed ([`DialError`]); a failure that
//! says the path itself is broken (TLS intercepted, HTTP/2 refused, a handshake cut or stalled by
//! a middlebox) is what makes the tunnel fall back to the WebSocket transport.

pub mod dial;
pub mod proxy;
pub mod tls;

pub use dial::{Dialed, Dialer, Target, Transport};
pub use proxy::{Proxy, ProxySettings};

use std::time::Duration;

/// The proxy settings in effect: `pcgctl proxy set` (stored sealed) > the `proxy` key >
/// HTTPS_PROXY/https_proxy; NO_PROXY/no_proxy from the environment.
pub fn proxy_settings(
    cfg: &crate::Config,
    store: &crate::store::Store,
) -> Result<ProxySettings, String> {
    let stored = store.proxy().map_err(|e| e.to_string())?;
    let (configured, source) = match (&stored, &cfg.proxy) {
        (Some(p), _) => (Some(p.as_str()), Some("pcgctl proxy set")),
        (None, Some(p)) => (Some(p.as_str()), None),
        (None, None) => (None, None),
    };
    let mut proxies = ProxySettings::resolve(configured, |k| std::env::var(k).ok())?;
    if let Some(s) = source {
        if proxies.proxy.is_some() {
            proxies.source = Some(s.to_string());
        }
    }
    Ok(proxies)
}

/// What `pcgctl proxy show` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProxyInfo {
    /// The proxy, password hidden.
    pub proxy: Option<String>,
    pub source: Option<String>,
    pub no_proxy: Option<String>,
    pub proxy_ca: Option<String>,
    pub transport: crate::config::TransportMode,
}

impl ProxyInfo {
    pub fn render(&self) -> String {
        let mut out = String::new();
        match (&self.proxy, &self.source) {
            (Some(p), Some(s)) => out.push_str(&format!("proxy:      {p} (from {s})\n")),
            (Some(p), None) => out.push_str(&format!("proxy:      {p}\n")),
            (None, _) => out.push_str("proxy:      none (direct connections)\n"),
        }
        if let Some(n) = &self.no_proxy {
            out.push_str(&format!("no proxy:   {n}\n"));
        }
        if let Some(c) = &self.proxy_ca {
            out.push_str(&format!(
                "proxy CA:   {c} (trusted for the WebSocket transport's outer TLS)\n"
            ));
        }
        let t = serde_json::to_value(self.transport)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!("transport:  {t}\n"));
        out
    }
}

/// The proxy settings in effect, as shown to people.
pub fn proxy_info(cfg: &crate::Config, store: &crate::store::Store) -> Result<ProxyInfo, String> {
    let s = proxy_settings(cfg, store)?;
    Ok(ProxyInfo {
        proxy: s.proxy.as_ref().map(Proxy::display),
        source: s.source.clone(),
        no_proxy: std::env::var("NO_PROXY")
            .or_else(|_| std::env::var("no_proxy"))
            .ok(),
        proxy_ca: cfg.proxy_ca.as_ref().map(|p| p.display().to_string()),
        transport: cfg.transport,
    })
}

/// The dialer the configuration and the store describe: the proxy (`pcgctl proxy set` > the
/// `proxy` key > HTTPS_PROXY), `proxy_ca`, the connect timeout, and the SaaS CA and client
/// certificate given.
pub fn dialer(
    cfg: &crate::Config,
    store: &crate::store::Store,
    pin: [u8; 32],
    ca: Option<rustls::pki_types::CertificateDer<'static>>,
    client: Option<
        std::sync::Arc<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
    >,
) -> Result<Dialer, String> {
    let proxies = proxy_settings(cfg, store)?;
    let proxy_ca = match &cfg.proxy_ca {
        None => Vec::new(),
        Some(path) => {
            use rustls::pki_types::pem::PemObject as _;
            let pem =
                std::fs::read(path).map_err(|e| format!("proxy_ca {}: {e}", path.display()))?;
            let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("proxy_ca {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("proxy_ca {} holds no certificate", path.display()));
            }
            certs
        }
    };
    Ok(Dialer {
        proxies,
        proxy_ca,
        pin,
        ca,
        client,
        timeout: Duration::from_millis(cfg.connect_timeout_ms.max(1)),
    })
}

/// Why the SaaS could not be reached: [`DialError::finding`] names the hop that failed and how,
/// [`DialError::action`] what to do; the error's message is both, and `pcgctl diag` shows them
/// apart.
#[derive(Debug, Clone)]
pub enum DialError {
    BadUrl {
        url: String,
        reason: String,
    },
    Dns {
        host: String,
        reason: String,
    },
    Unreachable {
        addr: String,
        reason: String,
    },
    ProxyUnreachable {
        proxy: String,
        reason: String,
    },
    ProxyAuth {
        proxy: String,
        sent_credentials: bool,
        realm: Option<String>,
    },
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
        detail: Option<String>,
    },
    Intercepted {
        server: String,
        sha256: String,
        issuer: String,
        pinned: String,
        via: Option<String>,
    },
    NoH2 {
        server: String,
        alpn: String,
        via: Option<String>,
    },
    HandshakeCut {
        server: String,
        reason: String,
        via: Option<String>,
    },
    HandshakeTimeout {
        server: String,
        after: Duration,
        via: Option<String>,
    },
    Tls {
        server: String,
        reason: String,
    },
    Busy {
        server: String,
        retry_after_ms: u64,
    },
    OuterUntrusted {
        server: String,
        sha256: String,
        issuer: String,
        reason: String,
    },
    WebSocketRefused {
        url: String,
        status: String,
        via: Option<String>,
    },
    WebSocket {
        url: String,
        reason: String,
    },
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.finding(), self.action())
    }
}

impl std::error::Error for DialError {}

/// " through the proxy P", or nothing.
pub(crate) fn through(via: &Option<String>) -> String {
    via.as_deref()
        .map(|p| format!(" through the proxy {p}"))
        .unwrap_or_default()
}

impl DialError {
    /// What failed, where.
    pub fn finding(&self) -> String {
        match self {
            DialError::BadUrl { url, reason } => {
                format!("the SaaS URL {url} is not usable: {reason}")
            }
            DialError::Dns { host, reason } => format!("cannot resolve {host}: {reason}"),
            DialError::Unreachable { addr, reason } => {
                format!("cannot connect to {addr}: {reason}")
            }
            DialError::ProxyUnreachable { proxy, reason } => {
                format!("cannot reach the proxy {proxy}: {reason}")
            }
            DialError::ProxyAuth {
                proxy,
                sent_credentials,
                realm,
            } => format!(
                "the proxy {proxy} requires authentication (407{}): {}",
                realm.as_deref().map(|r| format!(", {r}")).unwrap_or_default(),
                if *sent_credentials {
                    "it refused the user and password given"
                } else {
                    "no user and password were given"
                }
            ),
            DialError::ProxyRefused {
                proxy,
                target,
                status,
                detail,
            } => format!(
                "the proxy {proxy} refused CONNECT to {target} ({status}{})",
                detail.as_deref().map(|d| format!(", {d}")).unwrap_or_default()
            ),
            DialError::Intercepted {
                server,
                sha256,
                issuer,
                pinned,
                via,
            } => match via {
                Some(p) => format!(
                    "TLS intercepted by a proxy: {server} presented a certificate issued by \"{issuer}\" (CA SHA-256 {sha256}), not the SaaS CA pinned at pairing (SHA-256 {pinned}), through the proxy {p}"
                ),
                None => format!(
                    "{server} presented a certificate issued by \"{issuer}\" (CA SHA-256 {sha256}), not the SaaS CA pinned at pairing (SHA-256 {pinned}): TLS intercepted on the path, or the SaaS CA was replaced"
                ),
            },
            DialError::NoH2 { server, alpn, via } => format!(
                "{server} did not agree to HTTP/2 (ALPN: {alpn}){}",
                through(via)
            ),
            DialError::HandshakeCut {
                server,
                reason,
                via,
            } => format!(
                "the TLS handshake with {server} was cut ({reason}){}",
                through(via)
            ),
            DialError::HandshakeTimeout { server, after, via } => format!(
                "the TLS handshake with {server} did not finish within {after:?}{}",
                through(via)
            ),
            DialError::Tls { server, reason } => format!("TLS with {server} failed: {reason}"),
            DialError::Busy {
                server,
                retry_after_ms,
            } => format!(
                "{server} is up but busy (too many gateways connecting at once) and asked to come back in {retry_after_ms} ms"
            ),
            DialError::OuterUntrusted {
                server,
                sha256,
                issuer,
                reason,
            } => format!(
                "the outer TLS of the WebSocket transport to {server} is not trusted ({reason}): it presented a certificate issued by \"{issuer}\" (SHA-256 {sha256})"
            ),
            DialError::WebSocketRefused { url, status, via } => format!(
                "the WebSocket upgrade to {url} was refused ({status}){}",
                via.as_deref()
                    .map(|p| format!(" by or behind the proxy {p}"))
                    .unwrap_or_default()
            ),
            DialError::WebSocket { url, reason } => {
                format!("the WebSocket to {url} failed: {reason}")
            }
        }
    }

    /// What to do about it.
    pub fn action(&self) -> &'static str {
        match self {
            DialError::BadUrl { .. } => "pair again with a token for the right SaaS URL",
            DialError::Dns { .. } => "check DNS: the resolvers in /etc/resolv.conf and the SaaS host's records (or the hosts file), or use an IP address",
            DialError::Unreachable { .. } => "check that the firewall allows outbound TCP to it, or configure the HTTPS proxy (pcgctl proxy set, the proxy key or HTTPS_PROXY)",
            DialError::ProxyUnreachable { .. } => "check the proxy's address and port (pcgctl proxy show; set it with pcgctl proxy set, the proxy key or HTTPS_PROXY)",
            DialError::ProxyAuth { sent_credentials: true, .. } => "check the user and password in the proxy URL: pcgctl proxy set http://USER:PASSWORD@HOST:PORT (or - to read it from stdin)",
            DialError::ProxyAuth { sent_credentials: false, .. } => "give a user and password in the proxy URL: pcgctl proxy set http://USER:PASSWORD@HOST:PORT (or - to read it from stdin)",
            DialError::ProxyRefused { .. } => "ask the proxy's administrator to allow HTTPS to that host and port, or add the host to NO_PROXY if it is reachable without the proxy",
            DialError::Intercepted { via: Some(_), .. } => "ask the proxy's administrator to exempt the SaaS host from TLS inspection; meanwhile the tunnel falls back to the WebSocket transport when the proxy's CA is given as proxy_ca",
            DialError::Intercepted { via: None, .. } => "if the SaaS's CA was replaced, pair again with a new token (pcgctl pair --force TOKEN); otherwise something on the path intercepts TLS: exempt the SaaS host from inspection",
            DialError::NoH2 { .. } => "something in the path downgrades TLS connections (an inspecting proxy or load balancer): exempt the SaaS host, or use the WebSocket transport (transport = \"auto\" falls back to it)",
            DialError::HandshakeCut { .. } => "a middlebox may be resetting TLS to the SaaS: check the firewall or proxy policy for it",
            DialError::HandshakeTimeout { .. } => "a proxy that inspects TLS, or a middlebox, may be holding the handshake (waiting on a client certificate it cannot pass): exempt the SaaS host from inspection",
            DialError::Tls { .. } => "check the SaaS URL and that nothing on the path terminates TLS",
            DialError::Busy { .. } => "nothing to fix if it passes on the next try; if it stays busy, tell the SaaS operator",
            DialError::OuterUntrusted { .. } => "if that is your proxy's TLS-inspection CA, give it to the gateway as proxy_ca",
            DialError::WebSocketRefused { .. } => "let WebSocket upgrades through the proxy (squid: http_upgrade_request_protocols websocket allow all)",
            DialError::WebSocket { .. } => "check the proxy's logs for the upgrade",
        }
    }

    /// The hop that failed, as a short label (`dial_dns`, `dial_proxy`, `dial_tls`, ...).
    pub fn hop(&self) -> &'static str {
        match self {
            DialError::BadUrl { .. } => "dial_url",
            DialError::Dns { .. } => "dial_dns",
            DialError::Unreachable { .. } => "dial_tcp",
            DialError::ProxyUnreachable { .. }
            | DialError::ProxyAuth { .. }
            | DialError::ProxyRefused { .. } => "dial_proxy",
            DialError::Intercepted { .. } | DialError::OuterUntrusted { .. } => "dial_intercepted",
            DialError::NoH2 { .. } => "dial_no_h2",
            DialError::HandshakeCut { .. }
            | DialError::HandshakeTimeout { .. }
            | DialError::Tls { .. } => "dial_tls",
            DialError::WebSocketRefused { .. } | DialError::WebSocket { .. } => "dial_websocket",
            DialError::Busy { .. } => "busy",
        }
    }

    /// Whether the path to the SaaS itself is broken for the direct transport in a way the
    /// WebSocket transport may get around (TLS interception, HTTP/2 refused, handshakes cut or
    /// stalled by a middlebox).
    pub fn is_path_failure(&self) -> bool {
        matches!(
            self,
            DialError::Intercepted { .. }
                | DialError::NoH2 { .. }
                | DialError::HandshakeCut { .. }
                | DialError::HandshakeTimeout { .. }
        )
    }
}
