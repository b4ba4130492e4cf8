//! Pairing: turn a one-time token into a durable identity.
//!
//! The gateway generates its key pair here (the private key never leaves the appliance), sends a
//! CSR with the token to the SaaS, and stores the signed certificate, the CA and the broker
//! endpoints. The SaaS is reached over TLS verified against the CA whose SHA-256 the token pins:
//! the server must present that CA in its chain, and its certificate must chain to it. Nothing
//! is trusted blindly, and nothing is stored unless pairing succeeds.

use http_body_util::BodyExt as _;
use pcg_proto::pairing::{PairRequest, PairResponse, PairingToken, TokenError};
use sha2::{Digest, Sha256};

use crate::config::TransportMode;
use crate::store::{now_ms, Identity, Store, StoreError};
use crate::transport::{DialError, Dialer, Target, Transport};

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("this pairing token expired at {at} (UTC); ask your tenant admin for a new token")]
    Expired { at: String },
    #[error("already paired as gateway {gateway_id} of tenant {tenant_id}; use `pcgctl pair --force TOKEN` to replace this identity")]
    AlreadyPaired {
        tenant_id: String,
        gateway_id: String,
    },
    #[error("the SaaS at {url} presented a CA with SHA-256 {presented}, but the token pins {pinned}: the token was issued by another SaaS, or a TLS-intercepting proxy is in the way (add it to NO_PROXY or ask for its CA to be bypassed)")]
    CaMismatch {
        url: String,
        pinned: String,
        presented: String,
    },
    #[error("cannot reach the SaaS at {url}: {message}; check DNS, the firewall (outbound HTTPS) and the proxy (`pcgctl proxy`, the `proxy` key, HTTPS_PROXY/NO_PROXY)")]
    Unreachable { url: String, message: String },
    #[error("the gateway's proxy settings are not usable: {0}")]
    Proxy(String),
    #[error("the SaaS at {url} refused pairing ({code}): {message}")]
    Refused {
        url: String,
        code: String,
        message: String,
    },
    #[error("the SaaS at {url} answered pairing with something unexpected: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot create a key pair or CSR: {0}")]
    Crypto(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pcg-gateway".to_string())
}

/// POSTs the pairing request over one connection of `transport`; returns status and body.
async fn post_pair(
    dialer: &Dialer,
    target: &Target,
    transport: Transport,
    body: Vec<u8>,
) -> Result<(http::StatusCode, bytes::Bytes), DialError> {
    let dialed = dialer.dial(target, transport, &[b"http/1.1"]).await?;
    let server = target.authority();
    let http_err = |e: &dyn std::fmt::Display| DialError::Tls {
        server: server.clone(),
        reason: format!("HTTP exchange failed: {e}"),
    };
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(dialed.io))
                .await
                .map_err(|e| http_err(&e))?;
        let driver = tokio::spawn(conn);
        let req = http::Request::post("/v1/pair")
            .header(http::header::HOST, server.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| http_err(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http_err(&e))?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    };
    tokio::time::timeout(dialer.timeout * 3, exchange)
        .await
        .map_err(|_| DialError::Tls {
            server: target.authority(),
            reason: format!(
                "no answer to the pairing request within {:?}",
                dialer.timeout * 3
            ),
        })?
}

/// Pairs with the SaaS named in `token`, and stores the identity in `store` (flushed). The SaaS
/// is reached the way the tunnel reaches it: directly or through the proxy, falling back to the
/// WebSocket transport when a proxy intercepts TLS (`transport = "auto"`).
pub async fn pair(
    store: &Store,
    cfg: &crate::Config,
    token: &str,
    force: bool,
) -> Result<Identity, PairError> {
    let token = PairingToken::decode(token)?;
    if let Some(id) = store.identity()? {
        if !force && id.revoked.is_none() {
            return Err(PairError::AlreadyPaired {
                tenant_id: id.tenant_id,
                gateway_id: id.gateway_id,
            });
        }
    }
    let now_s = now_ms() / 1000;
    if token.expires_unix <= now_s {
        let at = time::OffsetDateTime::from_unix_timestamp(token.expires_unix)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| token.expires_unix.to_string());
        return Err(PairError::Expired { at });
    }
    let url = token.api_url.trim_end_matches('/').to_string();

    // Key pair and CSR, made here; only the CSR leaves.
    let (key, csr) = key_and_csr().map_err(PairError::Crypto)?;

    let pin: [u8; 32] = hex::decode(&token.ca_sha256)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(TokenError::Field("bad CA fingerprint"))?;
    let dialer = crate::transport::dialer(cfg, store, pin, None, None).map_err(PairError::Proxy)?;
    let target = Target::from_url(&url).map_err(|e| PairError::Unreachable {
        url: url.clone(),
        message: e.to_string(),
    })?;
    let req = PairRequest {
        token_id: token.token_id.clone(),
        secret: token.secret.clone(),
        csr_pem: csr,
        hostname: hostname(),
        gateway_version: crate::VERSION.to_string(),
    };
    let body = serde_json::to_vec(&req).expect("pairing requests serialise");
    let transports: &[Transport] = match cfg.transport {
        TransportMode::Auto => &[Transport::Direct, Transport::Websocket],
        TransportMode::Direct => &[Transport::Direct],
        TransportMode::Websocket => &[Transport::Websocket],
    };
    // Try each transport in turn; only a broken path (TLS intercepted, HTTP/2 refused,
    // handshakes cut) is worth the next one: anything else would fail the same way there.
    let mut failures: Vec<DialError> = Vec::new();
    let mut answer = None;
    for &t in transports {
        match post_pair(&dialer, &target, t, body.clone()).await {
            Ok(a) => {
                answer = Some(a);
                break;
            }
            Err(e) => {
                tracing::debug!("pairing over {t:?} failed: {e}");
                let go_on = e.is_path_failure();
                failures.push(e);
                if !go_on {
                    break;
                }
            }
        }
    }
    let Some((status, body)) = answer else {
        return Err(match failures.as_slice() {
            // Every way met a CA that is not the pinned one (and no proxy CA vouched for the
            // outer TLS): another SaaS, or TLS interception without `proxy_ca`.
            [DialError::Intercepted { sha256, .. }, rest @ ..]
                if rest.iter().all(|e| {
                    matches!(
                        e,
                        DialError::Intercepted { .. } | DialError::OuterUntrusted { .. }
                    )
                }) =>
            {
                PairError::CaMismatch {
                    url,
                    pinned: token.ca_sha256.clone(),
                    presented: sha256.clone(),
                }
            }
            all => PairError::Unreachable {
                url,
                message: all
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; and over the WebSocket transport: "),
            },
        });
    };
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(PairError::Refused {
            url,
            code: v["error"]["code"]
                .as_str()
                .unwrap_or(status.as_str())
                .to_string(),
            message: v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
        });
    }
    let pr: PairResponse = serde_json::from_slice(&body).map_err(|e| PairError::Protocol {
        url: url.clone(),
        message: e.to_string(),
    })?;
    // The CA handed back must be the pinned one.
    let ca_der = pem_cert_der(&pr.ca_pem).ok_or_else(|| PairError::Protocol {
        url: url.clone(),
        message: "the CA in the answer is not a PEM certificate".into(),
    })?;
    let ca_fp = hex::encode(Sha256::digest(&ca_der));
    if ca_fp != token.ca_sha256 {
        return Err(PairError::CaMismatch {
            url,
            pinned: token.ca_sha256,
            presented: ca_fp,
        });
    }
    let cert_der = pem_cert_der(&pr.certificate_pem).ok_or_else(|| PairError::Protocol {
        url: url.clone(),
        message: "the certificate in the answer is not PEM".into(),
    })?;
    let (_, not_after_ms) = cert_validity_ms(&cert_der).map_err(|message| PairError::Protocol {
        url: url.clone(),
        message,
    })?;
    let identity = Identity {
        tenant_id: pr.tenant_id,
        gateway_id: pr.gateway_id,
        api_url: url,
        broker_endpoints: pr.broker_endpoints,
        cert_pem: pr.certificate_pem,
        ca_pem: pr.ca_pem,
        key_sealed: store.seal(key.serialize_pem().as_bytes()),
        cert_not_after_ms: not_after_ms,
        cert_received_ms: now_ms(),
        paired_ms: now_ms(),
        token_id: token.token_id,
        revoked: None,
        previous_keys_sealed: Vec::new(),
    };
    store.set_identity(&identity)?;
    store.flush().await?;
    Ok(identity)
}

pub(crate) fn pem_cert_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

/// `(not_before, not_after)` of a DER certificate, Unix milliseconds.
pub(crate) fn cert_validity_ms(der: &[u8]) -> Result<(i64, i64), String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| {
            (
                c.validity().not_before.timestamp() * 1000,
                c.validity().not_after.timestamp() * 1000,
            )
        })
        .map_err(|e| format!("unreadable certificate: {e}"))
}

/// A fresh key pair and a CSR for it (PEM), named after this host.
pub(crate) fn key_and_csr() -> Result<(rcgen::KeyPair, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    Ok((key, csr))
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
