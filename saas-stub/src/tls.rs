//! TLS for the two listeners: the REST API (server authentication only; pairing happens there)
//! and the broker (mutual TLS: a gateway must present a certificate issued by the SaaS CA).
//! Both send the chain `[leaf, CA]`, so that a gateway holding only the CA fingerprint (from its
//! pairing token) can find and pin the CA, and can name the CA it was shown instead when a
//! proxy intercepts TLS.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_and_key(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &[u8],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let mut chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    chain.push(CertificateDer::from(ca_der.to_vec()));
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    Ok((chain, key))
}

/// Server TLS config for the REST API: no client certificate; ALPN h2 and http/1.1.
pub fn api_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &[u8],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = chain_and_key(cert_pem, key_pem, ca_der)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server TLS config of the public port when the broker shares it, and of inner connections
/// (inside the WebSocket way in): a client certificate is asked for and verified against the
/// SaaS CA when presented, but not required at this layer (the broker requires one, the REST
/// API does not use it); ALPN h2 and http/1.1.
pub fn public_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &[u8],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = chain_and_key(cert_pem, key_pem, ca_der)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server TLS config for a separate broker listener: a client certificate issued by the SaaS CA
/// is required; ALPN h2 (gRPC).
pub fn broker_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &[u8],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = chain_and_key(cert_pem, key_pem, ca_der)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
