//! Pairing: turn a one-time token into a durable identity.
//!
//! The gateway generates its key pair here (the private key never leaves the appliance), sends a
//! CSR with the token to the SaaS, and stores the signed certificate, the CA and the broker
//! endpoints. The SaaS is reached over TLS verified against the CA whose SHA-256 the token pins:
//! the server must present that CA in its chain, and its certificate must chain to it. Nothing
//! is trusted blindly, and nothing is stored unless pairing succeeds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcg_proto::pairing::{PairRequest, PairResponse, PairingToken, TokenError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::store::{now_ms, Identity, Store, StoreError};

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
    #[error("cannot reach the SaaS at {url}: {message}; check DNS, the firewall (outbound HTTPS) and HTTPS_PROXY/NO_PROXY")]
    Unreachable { url: String, message: String },
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

/// Verifies a server against the CA whose SHA-256 is pinned, found in the presented chain.
#[derive(Debug)]
struct PinnedCa {
    pin: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Fingerprint of what was presented instead, when the pin did not match.
    mismatch: Mutex<Option<String>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin.as_slice());
        let Some(ca) = ca else {
            let presented = intermediates.last().unwrap_or(end_entity).as_ref().to_vec();
            *self
                .mismatch
                .lock()
                .expect("mismatch lock is never poisoned") =
                Some(hex::encode(Sha256::digest(presented)));
            return Err(rustls::Error::General("CA pin mismatch".into()));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pcg-gateway".to_string())
}

/// Pairs with the SaaS named in `token`, and stores the identity in `store` (flushed).
pub async fn pair(
    store: &Store,
    token: &str,
    force: bool,
    connect_timeout: Duration,
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

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin: hex::decode(&token.ca_sha256).map_err(|_| TokenError::Field("bad CA fingerprint"))?,
        provider: provider.clone(),
        mismatch: Mutex::new(None),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PairError::Crypto(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(connect_timeout)
        .timeout(connect_timeout * 3)
        .build()
        .map_err(|e| PairError::Crypto(e.to_string()))?;
    let req = PairRequest {
        token_id: token.token_id.clone(),
        secret: token.secret.clone(),
        csr_pem: csr,
        hostname: hostname(),
        gateway_version: crate::VERSION.to_string(),
    };
    let resp = client
        .post(format!("{url}/v1/pair"))
        .json(&req)
        .send()
        .await
        .map_err(|e| {
            if let Some(presented) = verifier
                .mismatch
                .lock()
                .expect("mismatch lock is never poisoned")
                .take()
            {
                return PairError::CaMismatch {
                    url: url.clone(),
                    pinned: token.ca_sha256.clone(),
                    presented,
                };
            }
            PairError::Unreachable {
                url: url.clone(),
                message: error_chain(&e),
            }
        })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| PairError::Unreachable {
        url: url.clone(),
        message: error_chain(&e),
    })?;
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
    CertificateDer::from_pem_slice(pem.as_bytes())
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
