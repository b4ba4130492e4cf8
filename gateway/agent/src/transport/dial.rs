//! Dialling the SaaS: TCP (directly or through a `CONNECT` proxy), then TLS — directly, or inside
//! a WebSocket carried by an outer TLS that a proxy may inspect.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::proxy::{split_host_port, ProxySettings};
use super::tls::{client_config, Verifier};
use super::DialError;

/// Which way the TLS to the SaaS is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// TLS straight to the SaaS's port (possibly through a `CONNECT` proxy).
    Direct,
    /// TLS inside a WebSocket to `/v1/tunnel/ws`.
    Websocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Direct => "direct",
            Transport::Websocket => "websocket",
        }
    }
}

/// A host and port to reach, from an `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn from_url(url: &str) -> Result<Target, DialError> {
        let bad = |reason: &str| DialError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("it must start with https://"))?;
        let hostport = rest.split('/').next().unwrap_or_default();
        let (host, port) = split_host_port(hostport, 443).ok_or_else(|| bad("no host"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Target { host, port })
    }

    /// `host:port`, IPv6 in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn server_name(&self) -> Result<ServerName<'static>, DialError> {
        ServerName::try_from(self.host.clone()).map_err(|e| DialError::BadUrl {
            url: self.authority(),
            reason: e.to_string(),
        })
    }
}

/// Remembers the first bytes read from a stream, so that a handshake that failed because the
/// server wrote something else than TLS (its "busy, come back later" line) can say so.
pub struct FirstBytes<IO> {
    inner: IO,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl<IO> FirstBytes<IO> {
    fn new(inner: IO) -> (Self, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        (
            FirstBytes {
                inner,
                seen: seen.clone(),
            },
            seen,
        )
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstBytes<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let mut seen = self
            .seen
            .lock()
            .expect("first-bytes lock is never poisoned");
        if seen.len() < 64 {
            let new = &buf.filled()[before..];
            let take = new.len().min(64 - seen.len());
            seen.extend_from_slice(&new[..take]);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstBytes<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The wait a server's "busy" line asks for, if `seen` starts with one.
fn busy(seen: &std::sync::Mutex<Vec<u8>>) -> Option<u64> {
    let seen = seen.lock().expect("first-bytes lock is never poisoned");
    let rest = seen.strip_prefix(pcg_proto::BUSY_PREFIX.as_bytes())?;
    let digits: String = rest
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|b| char::from(*b))
        .collect();
    digits.parse().ok()
}

/// A byte stream to the SaaS, whichever way it came.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An established, verified TLS connection to the SaaS.
pub struct Dialed {
    pub io: Box<dyn Io>,
    pub transport: Transport,
    /// The proxy it went through, as shown to people.
    pub via: Option<String>,
    /// The ALPN protocol agreed (of the inner TLS).
    pub alpn: Option<Vec<u8>>,
}

/// Everything needed to reach the SaaS.
#[derive(Clone)]
pub struct Dialer {
    pub proxies: ProxySettings,
    /// A proxy's TLS-inspection CA, trusted for the outer TLS of the WebSocket transport only.
    pub proxy_ca: Vec<CertificateDer<'static>>,
    /// SHA-256 of the SaaS CA (DER).
    pub pin: [u8; 32],
    /// The SaaS CA itself, once known (after pairing).
    pub ca: Option<CertificateDer<'static>>,
    /// This gateway's certificate chain and key (none before pairing).
    pub client: Option<Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>>,
    /// Bound of each step (TCP, CONNECT, each handshake).
    pub timeout: Duration,
}

fn classify_tls(
    e: std::io::Error,
    server: &str,
    verifier: &Verifier,
    pin: &[u8; 32],
    via: &Option<String>,
    outer: bool,
) -> DialError {
    if let Some(p) = verifier.take_presented() {
        return if outer {
            DialError::OuterUntrusted {
                server: server.to_string(),
                sha256: p.sha256,
                issuer: p.issuer,
                reason: p.reason,
            }
        } else {
            DialError::Intercepted {
                server: server.to_string(),
                sha256: p.sha256,
                issuer: p.issuer,
                pinned: hex::encode(pin),
                via: via.clone(),
            }
        };
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => DialError::HandshakeCut {
            server: server.to_string(),
            reason: e.to_string(),
            via: via.clone(),
        },
        _ => DialError::Tls {
            server: server.to_string(),
            reason: e.to_string(),
        },
    }
}

impl Dialer {
    /// TCP to `target`, directly or through the proxy that applies to it.
    pub async fn tcp(&self, target: &Target) -> Result<(TcpStream, Option<String>), DialError> {
        if let Some(p) = self.proxies.for_host(&target.host) {
            let s = p.connect(&target.host, target.port, self.timeout).await?;
            return Ok((s, Some(p.display())));
        }
        let addrs = self.resolve(target).await?;
        self.connect(target, &addrs).await
    }

    /// The addresses of `target`'s host (the first step of a direct connection).
    pub async fn resolve(&self, target: &Target) -> Result<Vec<std::net::SocketAddr>, DialError> {
        match tokio::time::timeout(self.timeout, tokio::net::lookup_host(target.authority())).await
        {
            Err(_) => Err(DialError::Dns {
                host: target.host.clone(),
                reason: format!("no answer within {:?}", self.timeout),
            }),
            Ok(Err(e)) => Err(DialError::Dns {
                host: target.host.clone(),
                reason: e.to_string(),
            }),
            Ok(Ok(a)) => Ok(a.collect()),
        }
    }

    /// A direct TCP connection to the first of `addrs` (of `target`) that answers.
    pub async fn connect(
        &self,
        target: &Target,
        addrs: &[std::net::SocketAddr],
    ) -> Result<(TcpStream, Option<String>), DialError> {
        let mut last = String::from("no address");
        for &a in addrs {
            match tokio::time::timeout(self.timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, None));
                }
                Ok(Err(e)) => last = format!("{a}: {e}"),
                Err(_) => last = format!("{a}: no answer within {:?}", self.timeout),
            }
        }
        Err(DialError::Unreachable {
            addr: target.authority(),
            reason: last,
        })
    }

    /// The TLS the SaaS itself terminates, on `io`: pinned CA, client certificate when this
    /// dialer has one, `alpn` offered; returns the stream and the protocol agreed.
    pub async fn tls<IO: Io + 'static>(
        &self,
        io: IO,
        target: &Target,
        alpn: &[&[u8]],
        via: &Option<String>,
    ) -> Result<(Box<dyn Io>, Option<Vec<u8>>), DialError> {
        let verifier = Verifier::new(self.pin, self.ca.clone(), Vec::new());
        let client = self.client.as_ref().map(|c| (c.0.clone(), c.1.clone_key()));
        let cfg = client_config(verifier.clone(), client, alpn).map_err(|e| DialError::Tls {
            server: target.authority(),
            reason: e.to_string(),
        })?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let (io, seen) = FirstBytes::new(io);
        let tls = tokio::time::timeout(self.timeout, connector.connect(target.server_name()?, io))
            .await
            .map_err(|_| DialError::HandshakeTimeout {
                server: target.authority(),
                after: self.timeout,
                via: via.clone(),
            })?
            .map_err(|e| match busy(&seen) {
                Some(retry_after_ms) => DialError::Busy {
                    server: target.authority(),
                    retry_after_ms,
                },
                None => classify_tls(e, &target.authority(), &verifier, &self.pin, via, false),
            })?;
        let agreed = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        Ok((Box::new(tls), agreed))
    }

    /// Connects to `target` over `transport`, offering `alpn` on the TLS the SaaS terminates.
    /// When `alpn` is exactly `h2`, a server (or middlebox) that does not agree to it is a
    /// [`DialError::NoH2`].
    pub async fn dial(
        &self,
        target: &Target,
        transport: Transport,
        alpn: &[&[u8]],
    ) -> Result<Dialed, DialError> {
        let (tcp, via) = self.tcp(target).await?;
        let (io, agreed) = match transport {
            Transport::Direct => self.tls(tcp, target, alpn, &via).await?,
            Transport::Websocket => {
                let ws = self.websocket(tcp, target, &via).await?;
                self.tls(ws, target, alpn, &via).await?
            }
        };
        if alpn == [b"h2".as_slice()] && agreed.as_deref() != Some(b"h2".as_slice()) {
            return Err(DialError::NoH2 {
                server: target.authority(),
                alpn: agreed
                    .as_deref()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .unwrap_or_else(|| "none".into()),
                via,
            });
        }
        Ok(Dialed {
            io,
            transport,
            via,
            alpn: agreed,
        })
    }

    /// The outer TLS (SaaS CA or `proxy_ca`) and the WebSocket upgrade, as a byte stream.
    pub async fn websocket(
        &self,
        tcp: TcpStream,
        target: &Target,
        via: &Option<String>,
    ) -> Result<
        pcg_proto::ws::WsBytes<tokio_rustls::client::TlsStream<FirstBytes<TcpStream>>>,
        DialError,
    > {
        use pcg_proto::ws::tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        use pcg_proto::ws::tokio_tungstenite::tungstenite::Error as WsError;
        let verifier = Verifier::new(self.pin, self.ca.clone(), self.proxy_ca.clone());
        let cfg =
            client_config(verifier.clone(), None, &[b"http/1.1"]).map_err(|e| DialError::Tls {
                server: target.authority(),
                reason: e.to_string(),
            })?;
        let (tcp, seen) = FirstBytes::new(tcp);
        let outer = tokio::time::timeout(
            self.timeout,
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(target.server_name()?, tcp),
        )
        .await
        .map_err(|_| DialError::HandshakeTimeout {
            server: target.authority(),
            after: self.timeout,
            via: via.clone(),
        })?
        .map_err(|e| match busy(&seen) {
            Some(retry_after_ms) => DialError::Busy {
                server: target.authority(),
                retry_after_ms,
            },
            None => classify_tls(e, &target.authority(), &verifier, &self.pin, via, true),
        })?;
        let url = format!("wss://{}{}", target.authority(), pcg_proto::ws::PATH);
        let ws_err = |reason: String| DialError::WebSocket {
            url: url.clone(),
            reason,
        };
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ws_err(e.to_string()))?;
        req.headers_mut().insert(
            "sec-websocket-protocol",
            http::HeaderValue::from_static(pcg_proto::ws::SUBPROTOCOL),
        );
        let (ws, _) = tokio::time::timeout(
            self.timeout,
            pcg_proto::ws::tokio_tungstenite::client_async(req, outer),
        )
        .await
        .map_err(|_| {
            ws_err(format!(
                "no answer to the upgrade within {:?}",
                self.timeout
            ))
        })?
        .map_err(|e| match e {
            WsError::Http(resp) => DialError::WebSocketRefused {
                url: url.clone(),
                status: format!(
                    "HTTP {}{}",
                    resp.status(),
                    resp.body()
                        .as_deref()
                        .map(|b| format!(
                            ": {}",
                            String::from_utf8_lossy(b)
                                .chars()
                                .take(300)
                                .collect::<String>()
                        ))
                        .unwrap_or_default()
                ),
                via: via.clone(),
            },
            e => ws_err(e.to_string()),
        })?;
        Ok(pcg_proto::ws::WsBytes::new(ws))
    }
}

/// SHA-256 of a DER certificate, as the pin is stored.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}
