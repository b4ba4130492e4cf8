//! The gateway's one way of trusting a server: the SaaS CA pinned by its SHA-256 (from the
//! pairing token, or the CA stored at pairing), optionally plus a proxy's CA for the outer TLS of
//! the WebSocket transport. When the presented chain does not lead to a trusted CA, what was
//! presented is remembered, so the error can name an intercepting proxy's CA.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// What a server presented that no trusted CA vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// SHA-256 (hex) of the top certificate of the presented chain (the issuing CA when the
    /// server sends it, else the leaf).
    pub sha256: String,
    /// Its issuer and subject, as a person reads them.
    pub issuer: String,
    pub subject: String,
    /// Why it was not trusted.
    pub reason: String,
}

/// Verifies a server against the pinned SaaS CA (found in the presented chain, or given) and,
/// when set, extra trusted roots.
#[derive(Debug)]
pub struct Verifier {
    pin: [u8; 32],
    /// The pinned CA itself, when known (after pairing).
    ca: Option<CertificateDer<'static>>,
    /// Other roots trusted too (a proxy's CA for the outer TLS of the WebSocket transport).
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    presented: Mutex<Option<Presented>>,
}

impl Verifier {
    pub fn new(
        pin: [u8; 32],
        ca: Option<CertificateDer<'static>>,
        extra: Vec<CertificateDer<'static>>,
    ) -> Arc<Verifier> {
        Arc::new(Verifier {
            pin,
            ca,
            extra,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            presented: Mutex::new(None),
        })
    }

    /// What was presented instead of a trusted chain, if the last handshake failed so.
    pub fn take_presented(&self) -> Option<Presented> {
        self.presented
            .lock()
            .expect("presented lock is never poisoned")
            .take()
    }

    fn verify_with(
        &self,
        roots: Vec<CertificateDer<'_>>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store
                .add(r.into_owned())
                .map_err(|e| rustls::Error::General(format!("trusted CA unusable: {e}")))?;
        }
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
}

fn describe(der: &[u8]) -> (String, String) {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| (c.issuer().to_string(), c.subject().to_string()))
        .unwrap_or_else(|_| ("?".into(), "?".into()))
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin)
            .cloned()
            .or_else(|| self.ca.clone());
        let mut roots: Vec<CertificateDer<'_>> = Vec::new();
        if let Some(ca) = pinned {
            if Sha256::digest(ca.as_ref()).as_slice() == self.pin {
                roots.push(ca);
            }
        }
        roots.extend(self.extra.iter().cloned());
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| Sha256::digest(c.as_ref()).as_slice() != self.pin)
            .cloned()
            .collect();
        let result = if roots.is_empty() {
            Err(rustls::Error::General("no trusted CA in the chain".into()))
        } else {
            self.verify_with(roots, end_entity, &others, server_name, ocsp, now)
        };
        if let Err(e) = &result {
            let top = intermediates.last().unwrap_or(end_entity).as_ref();
            let (issuer, subject) = describe(top);
            *self
                .presented
                .lock()
                .expect("presented lock is never poisoned") = Some(Presented {
                sha256: hex::encode(Sha256::digest(top)),
                issuer,
                subject,
                reason: e.to_string(),
            });
        }
        result
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

/// A rustls client configuration with this verifier, an optional client certificate and ALPN.
pub fn client_config(
    verifier: Arc<Verifier>,
    client: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .dangerous()
    .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
