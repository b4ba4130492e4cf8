//! TLS trust for provider endpoints (vCenter, Redfish BMCs): a CA bundle (chain and host name
//! verified), or a pinned SHA-256 of the server certificate (such certificates are often
//! self-signed). There is no way to switch verification off.

use std::sync::Arc;

use crate::TlsTrust;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
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
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| format!("ca_pem: {e}"))?;
                roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
            }
            if roots.is_empty() {
                return Err("ca_pem holds no certificate".into());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
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
            Err(rustls::Error::General(format!(
                "server certificate SHA-256 {} is not the pinned {}",
                hex::encode(got),
                hex::encode(self.pin)
            )))
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
