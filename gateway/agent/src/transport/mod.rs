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

/// Why the SaaS could not be reached; each names the hop that failed and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    #[error("the SaaS URL {url} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot resolve {host}: {reason}; check DNS (the resolver in /etc/resolv.conf) or use an IP address")]
    Dns { host: String, reason: String },
    #[error("cannot connect to {addr}: {reason}; check that the firewall allows outbound TCP to it, or configure the HTTPS proxy (`proxy` or HTTPS_PROXY)")]
    Unreachable { addr: String, reason: String },
    #[error("cannot reach the proxy {proxy}: {reason}; check the proxy's address and port (config `proxy`, `pcgctl proxy set`, or HTTPS_PROXY)")]
    ProxyUnreachable { proxy: String, reason: String },
    #[error("the proxy {proxy} requires authentication (407{}): {}", realm.as_deref().map(|r| format!(", {r}")).unwrap_or_default(), if *sent_credentials { "it refused the user and password given; check them in the proxy URL (`pcgctl proxy set http://USER:PASSWORD@HOST:PORT`)" } else { "give a user and password in the proxy URL (`pcgctl proxy set http://USER:PASSWORD@HOST:PORT`)" })]
    ProxyAuth {
        proxy: String,
        sent_credentials: bool,
        realm: Option<String>,
    },
    #[error("the proxy {proxy} refused CONNECT to {target} ({status}{}); ask the proxy's administrator to allow HTTPS to that host and port, or add the host to NO_PROXY if it is reachable without the proxy", detail.as_deref().map(|d| format!(", {d}")).unwrap_or_default())]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
        detail: Option<String>,
    },
    #[error("TLS intercepted by a proxy: {server} presented a certificate issued by \"{issuer}\" (CA SHA-256 {sha256}), not the SaaS CA this gateway trusts (SHA-256 {pinned}){}; the tunnel falls back to the WebSocket transport; to let it through directly, exempt the SaaS host from TLS inspection", via.as_deref().map(|p| format!(" — through the proxy {p}")).unwrap_or_default())]
    Intercepted {
        server: String,
        sha256: String,
        issuer: String,
        pinned: String,
        via: Option<String>,
    },
    #[error("{server} did not agree to HTTP/2 (ALPN: {alpn}){}; something in the path downgrades TLS connections", via.as_deref().map(|p| format!(" through the proxy {p}")).unwrap_or_default())]
    NoH2 {
        server: String,
        alpn: String,
        via: Option<String>,
    },
    #[error("the TLS handshake with {server} was cut ({reason}){}; a middlebox may be resetting it", via.as_deref().map(|p| format!(" through the proxy {p}")).unwrap_or_default())]
    HandshakeCut {
        server: String,
        reason: String,
        via: Option<String>,
    },
    #[error("the TLS handshake with {server} did not finish within {after:?}{}; a proxy that inspects TLS may be waiting on a client certificate it cannot pass", via.as_deref().map(|p| format!(" through the proxy {p}")).unwrap_or_default())]
    HandshakeTimeout {
        server: String,
        after: Duration,
        via: Option<String>,
    },
    #[error("TLS with {server} failed: {reason}")]
    Tls { server: String, reason: String },
    #[error("{server} is busy (too many gateways connecting at once) and asked to come back in {retry_after_ms} ms")]
    Busy { server: String, retry_after_ms: u64 },
    #[error("the outer TLS of the WebSocket transport to {server} is not trusted ({reason}): it presented a certificate issued by \"{issuer}\" (SHA-256 {sha256}); if that is your proxy's TLS-inspection CA, give it to the gateway as `proxy_ca`")]
    OuterUntrusted {
        server: String,
        sha256: String,
        issuer: String,
        reason: String,
    },
    #[error("the WebSocket upgrade to {url} was refused ({status}){}; an administrator must let WebSocket upgrades through the proxy (squid: `http_upgrade_request_protocols websocket allow all`)", via.as_deref().map(|p| format!(" — by or behind the proxy {p}")).unwrap_or_default())]
    WebSocketRefused {
        url: String,
        status: String,
        via: Option<String>,
    },
    #[error("the WebSocket to {url} failed: {reason}")]
    WebSocket { url: String, reason: String },
}

impl DialError {
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
