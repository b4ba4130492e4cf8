//! HTTP proxies on the way out: which one applies to a host (`proxy` config key, else
//! `HTTPS_PROXY`/`https_proxy`, minus `NO_PROXY`/`no_proxy`), and the `CONNECT` handshake
//! through it with Basic `Proxy-Authorization`.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::DialError;

/// A proxy to tunnel through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl Proxy {
    /// Parses `http://[user[:password]@]host[:port]` (port 3128 when absent, as squid's).
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxy URL scheme {scheme}:// is not supported; use http://host:port (the tunnel's own TLS runs inside the CONNECT)"
                ))
            }
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => {
                let (u, p) = a.split_once(':').unwrap_or((a, ""));
                let dec = |s: &str| percent_decode(s).ok_or("bad %-escape in the proxy URL");
                (
                    Some(dec(u)?),
                    if p.is_empty() { None } else { Some(dec(p)?) },
                )
            }
        };
        let (host, port) = split_host_port(hostport, 3128)
            .ok_or_else(|| format!("proxy URL {:?} names no host:port", redact_url(url)))?;
        Ok(Proxy {
            host,
            port,
            user,
            password,
        })
    }

    /// The proxy as shown to people: never with its password.
    pub fn display(&self) -> String {
        let user = self
            .user
            .as_deref()
            .map(|u| {
                if self.password.is_some() {
                    format!("{u}:***@")
                } else {
                    format!("{u}@")
                }
            })
            .unwrap_or_default();
        format!("http://{user}{}:{}", bracket(&self.host), self.port)
    }

    /// Opens a TCP connection to the proxy and asks it for a tunnel to `host:port`.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DialError> {
        self.connect_answer(host, port, timeout)
            .await
            .map(|(tcp, _)| tcp)
    }

    /// Like [`connect`](Self::connect), also returning the status line the proxy answered the
    /// `CONNECT` with (for diagnostics).
    pub async fn connect_answer(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(TcpStream, String), DialError> {
        let addr = format!("{}:{}", bracket(&self.host), self.port);
        let mut tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| DialError::ProxyUnreachable {
                proxy: self.display(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| DialError::ProxyUnreachable {
                proxy: self.display(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let target = format!("{}:{port}", bracket(host));
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(user) = &self.user {
            let cred = format!("{user}:{}", self.password.as_deref().unwrap_or(""));
            req.push_str(&format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(cred)
            ));
        }
        req.push_str("\r\n");
        let exchange = async {
            tcp.write_all(req.as_bytes()).await?;
            // Read the answer's head byte by byte: nothing after it belongs to us.
            let mut head = Vec::with_capacity(256);
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() > 16 * 1024 {
                    return Err(std::io::Error::other("answer head over 16 KiB"));
                }
                if tcp.read(&mut byte).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                head.push(byte[0]);
            }
            Ok(head)
        };
        let head = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| DialError::ProxyUnreachable {
                proxy: self.display(),
                reason: format!("no answer to CONNECT within {timeout:?}"),
            })?
            .map_err(|e| DialError::ProxyUnreachable {
                proxy: self.display(),
                reason: format!("CONNECT {target}: {e}"),
            })?;
        let head = String::from_utf8_lossy(&head);
        let status_line = head.lines().next().unwrap_or_default().to_string();
        let code: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        match code {
            200..=299 => Ok((tcp, status_line)),
            407 => Err(DialError::ProxyAuth {
                proxy: self.display(),
                sent_credentials: self.user.is_some(),
                realm: header("proxy-authenticate"),
            }),
            _ => Err(DialError::ProxyRefused {
                proxy: self.display(),
                target,
                status: status_line,
                detail: header("x-squid-error"),
            }),
        }
    }
}

/// `NO_PROXY` entries: `*`, host names and domains (`example.com` and `.example.com` both match
/// the domain and its subdomains), IP addresses and CIDR blocks; ports are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy(Vec<String>);

impl NoProxy {
    pub fn parse(s: &str) -> NoProxy {
        NoProxy(
            s.split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        )
    }

    /// Whether `host` (a name or an IP address) bypasses the proxy.
    pub fn matches(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.0.iter().any(|e| {
            if e == "*" {
                return true;
            }
            let e = match split_host_port(e, 0) {
                Some((h, _)) if !e.contains('/') => h,
                _ => e.clone(),
            };
            if let (Some(ip), Some((net, len))) = (ip, e.split_once('/')) {
                return cidr_contains(net, len, ip);
            }
            if let (Some(ip), Ok(eip)) = (ip, e.parse::<IpAddr>()) {
                return ip == eip;
            }
            let d = e.trim_start_matches('.');
            host == d || host.ends_with(&format!(".{d}"))
        })
    }
}

fn cidr_contains(net: &str, len: &str, ip: IpAddr) -> bool {
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if len <= 128 => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// The proxy settings of the gateway.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    pub proxy: Option<Proxy>,
    pub no_proxy: NoProxy,
    /// Where the proxy came from, for status and errors: `config` or the variable's name.
    pub source: Option<String>,
}

impl ProxySettings {
    /// From the `proxy` config value (wins) or the environment (`HTTPS_PROXY`, `https_proxy`),
    /// with `NO_PROXY`/`no_proxy`. An empty value means no proxy.
    pub fn resolve(
        configured: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ProxySettings, String> {
        let (value, source) = match configured {
            Some(v) => (Some(v.to_string()), Some("proxy (config)".to_string())),
            None => ["HTTPS_PROXY", "https_proxy"]
                .iter()
                .find_map(|k| env(k).map(|v| (Some(v), Some(k.to_string()))))
                .unwrap_or((None, None)),
        };
        let proxy = match value.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(
                Proxy::parse(v)
                    .map_err(|e| format!("{}: {e}", source.as_deref().unwrap_or("proxy")))?,
            ),
        };
        let no_proxy = env("NO_PROXY")
            .or_else(|| env("no_proxy"))
            .map(|v| NoProxy::parse(&v))
            .unwrap_or_default();
        Ok(ProxySettings {
            source: proxy.as_ref().and(source),
            proxy,
            no_proxy,
        })
    }

    /// The proxy to use for `host`, if any.
    pub fn for_host(&self, host: &str) -> Option<&Proxy> {
        self.proxy.as_ref().filter(|_| !self.no_proxy.matches(host))
    }
}

/// `host:port` (IPv6 in brackets); `default_port` when there is none.
pub fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => default_port,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => Some((s.to_string(), default_port)), // a bare IPv6 address
        None if !s.is_empty() => Some((s.to_string(), default_port)),
        None => None,
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (auth, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = auth.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.corp:8080/").expect("parse");
        assert_eq!(
            (
                p.host.as_str(),
                p.port,
                p.user.as_deref(),
                p.password.as_deref()
            ),
            ("proxy.corp", 8080, Some("alice"), Some("s@cret"))
        );
        assert_eq!(p.display(), "http://alice:***@proxy.corp:8080");
        assert!(!format!("{p:?}").contains("cret"));
        assert_eq!(Proxy::parse("10.0.0.1").expect("bare").port, 3128);
        assert_eq!(Proxy::parse("http://[::1]:3128").expect("v6").host, "::1");
        assert!(Proxy::parse("https://p:1").is_err());
        assert!(Proxy::parse("socks5://p:1").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        let n = NoProxy::parse("localhost, .corp.example,10.0.0.0/8, 192.168.1.5,[::1], svc:8443");
        for h in [
            "localhost",
            "a.corp.example",
            "corp.example",
            "10.1.2.3",
            "192.168.1.5",
            "::1",
            "svc",
        ] {
            assert!(n.matches(h), "{h}");
        }
        for h in [
            "example",
            "corp.example.org",
            "11.0.0.1",
            "192.168.1.6",
            "xsvc",
        ] {
            assert!(!n.matches(h), "{h}");
        }
        assert!(NoProxy::parse("*").matches("anything"));
    }

    #[test]
    fn settings_prefer_the_config() {
        let env = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://envproxy:3128".to_string()),
            "NO_PROXY" => Some("saas.local".to_string()),
            _ => None,
        };
        let s = ProxySettings::resolve(Some("http://cfg:1"), env).expect("ok");
        assert_eq!(s.proxy.as_ref().map(|p| p.host.as_str()), Some("cfg"));
        assert!(s.for_host("saas.local").is_none());
        assert!(s.for_host("saas.example").is_some());
        let s = ProxySettings::resolve(None, env).expect("ok");
        assert_eq!(s.source.as_deref(), Some("HTTPS_PROXY"));
        let s = ProxySettings::resolve(Some(""), env).expect("ok");
        assert!(
            s.proxy.is_none(),
            "an empty config value turns the proxy off"
        );
        assert!(ProxySettings::resolve(Some("ftp://x"), env).is_err());
    }
}
