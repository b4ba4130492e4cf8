//! TLS for the two listeners: the REST API (server authentication only; pairing happens there)
//! and the broker (mutual TLS: a gateway must present a certificate issued by the SaaS CA).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Server TLS config for the REST API, sending the chain `[leaf, CA]` so that a gateway holding
/// only the CA fingerprint (from its pairing token) can find and pin the CA.
pub fn api_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &[u8],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    chain.push(CertificateDer::from(ca_der.to_vec()));
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
