//! TLS trust for provider endpoints (vCenter, Redfish BMCs): a CA bundle (chain and host name
//! verified), or a pinned SHA-256 of the server certificate (such certificates are often
//! self-signed). There is no way to switch verification off.
//!
//! A certificate in the CA bundle that is the server's own certificate is trusted as it is
//! (host name still checked): BMCs make self-signed certificates marked CA:TRUE, which WebPKI
//! refuses as an end entity (`CaUsedAsEndEntity`) though `curl --cacert` accepts them. A
//! certificate that does not verify is reported with its SHA-256, so the operator can pin it.

use std::sync::Arc;

use crate::TlsTrust;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a pin written as hex, with or without colons (as vCenter shows thumbprints).
pub fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    let clean: String = pin
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&clean).map_err(|e| format!("pin_sha256 is not hex: {e}"))?;
    bytes.try_into().map_err(|_| {
        "pin_sha256 must be a SHA-256 (64 hex digits), not a SHA-1 thumbprint".to_owned()
    })
}

/// SHA-256 of a DER certificate, as lowercase hex (the form `PinSha256` takes).
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The rustls client configuration for `trust`.
pub fn client_config(trust: &TlsTrust) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    Ok(match trust {
        TlsTrust::CaPem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut given = Vec::new();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| format!("ca_pem: {e}"))?;
                roots
                    .add(cert.clone())
                    .map_err(|e| format!("ca_pem: {e}"))?;
                given.push(cert);
            }
            if roots.is_empty() {
                return Err("ca_pem holds no certificate".into());
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("ca_pem: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CaOrOwnCertificate {
                    webpki,
                    given,
                    provider: provider(),
                }))
                .with_no_client_auth()
        }
        TlsTrust::PinSha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: parse_pin(pin)?,
                provider: provider(),
            }))
            .with_no_client_auth(),
    })
}

/// A certificate the configured trust refused, with its SHA-256 (for `pin_sha256`).
#[derive(Debug)]
struct NotTrusted {
    reason: String,
    sha256: String,
}

impl std::fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (the server's certificate has SHA-256 {})",
            self.reason, self.sha256
        )
    }
}

impl std::error::Error for NotTrusted {}

fn not_trusted(reason: String, cert: &CertificateDer<'_>) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(NotTrusted {
            reason,
            sha256: cert_sha256(cert.as_ref()),
        }),
    )))
}

/// WebPKI verification against the given certificates; failing that, a server certificate that
/// is itself one of the given certificates is accepted when it names the host (an explicit
/// trust anchor for that endpoint, as `curl --cacert` treats it).
#[derive(Debug)]
struct CaOrOwnCertificate {
    webpki: Arc<WebPkiServerVerifier>,
    given: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CaOrOwnCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let err =
            match self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
        if !self.given.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return Err(not_trusted(
                format!("{err}; it is not signed by a certificate in ca_pem"),
                end_entity,
            ));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| not_trusted(format!("ca_pem certificate: {e}"), end_entity))?;
        cert.verify_is_valid_for_subject_name(server_name)
            .map_err(|e| {
                not_trusted(
                    format!("the certificate in ca_pem does not name {server_name:?} ({e:?})"),
                    end_entity,
                )
            })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// The trust failure in an error chain (a server certificate that the configured trust
/// refused), as text, or None when the error is about something else (connection, timeout).
pub fn trust_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            match r {
                // Ours (NotTrusted): its own words, with the certificate's SHA-256.
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                    return Some(o.0.to_string())
                }
                rustls::Error::InvalidCertificate(_) => return Some(r.to_string()),
                _ => {}
            }
        }
        // io::Error's source() skips the error it wraps: look inside.
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = trust_failure(inner) {
                    return Some(found);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// Accepts exactly the server certificate with this SHA-256; handshake signatures are still
/// verified, so the server must hold that certificate's private key.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Sha256::digest(end_entity.as_ref());
        if got.as_slice() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(not_trusted(
                format!("it is not the pinned SHA-256 {}", hex::encode(self.pin)),
                end_entity,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_sha1_is_refused() {
        let hexpin = "ab".repeat(32);
        assert_eq!(parse_pin(&hexpin), parse_pin(&vec!["AB"; 32].join(":")));
        assert!(parse_pin(&"ab".repeat(20)).is_err(), "SHA-1 refused");
        assert!(client_config(&TlsTrust::CaPem("nope".into())).is_err());
        assert!(client_config(&TlsTrust::PinSha256(hexpin)).is_ok());
    }
}
