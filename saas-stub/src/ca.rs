//! The SaaS certificate authority: generated on first start, it signs the server certificates of
//! the REST API and the broker, and the client certificate of every paired gateway.
//!
//! A gateway's certificate is built from the pairing record, never from the CSR: only the CSR's
//! public key is used. Subject, CA status (never a CA), key usage (digital signature) and
//! extended key usage (client auth only) and validity are all set here.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read or write CA file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {path} is not valid: {message}; move it away to let pcg-saas create a new CA (every paired gateway must then pair again)")]
    Invalid { path: PathBuf, message: String },
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// CA certificate, PEM.
    pub cert_pem: String,
    /// CA certificate, DER.
    pub cert_der: Vec<u8>,
}

/// A certificate issued for a gateway.
pub struct IssuedCert {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
    /// The certified public key (SEC1 point): what secrets for this gateway are sealed to.
    pub public_key: Vec<u8>,
}

impl IssuedCert {
    /// `not_after` in Unix milliseconds.
    pub fn not_after_ms(&self) -> i64 {
        i64::try_from(self.not_after.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }
}

/// The public key (the `subjectPublicKey` bits: a SEC1 point for EC keys) of a DER certificate.
pub fn cert_public_key(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// A random positive 127-bit serial number.
pub(crate) fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// Loads the CA from `cert_path` and `key_path` (PEM), which must exist: the CA several
    /// replicas share (`pcg-saas cluster init` makes one).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key_pem = std::fs::read_to_string(key_path).map_err(io(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.to_path_buf(),
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path.to_path_buf(),
            message: e.to_string(),
        })?;
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| CaError::Invalid {
            path: cert_path.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        })?;
        Ok(Ca {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    /// Loads the CA from `dir/ca.pem` and `dir/ca.key`, creating both on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() {
            return Ca::load(&cert_path, &key_path);
        }
        let (cert_pem, key_pem, params, key) = Ca::generate("pcg-saas CA")?;
        write_private(&key_path, key_pem.as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, &cert_pem).map_err(io(&cert_path))?;
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| CaError::Invalid {
            path: cert_path.clone(),
            message: "no CERTIFICATE block".into(),
        })?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
        })
    }

    /// A new self-signed CA named `name`: (certificate PEM, key PEM, its parameters, its key).
    pub fn generate(name: &str) -> Result<(String, String, CertificateParams, KeyPair), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "pcg");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem(), params, key))
    }

    /// Lower-case hex SHA-256 of the CA certificate (DER): the pin carried in pairing tokens.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.cert_der))
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses); returns
    /// `(cert_pem, key_pem)`. The first name is also the subject's common name: some clients
    /// (TLS-inspecting proxies among them) match a host against the common name and DNS names
    /// only, not IP addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("pcg-saas", String::as_str),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a gateway's CSR. Only its public key is taken; everything else comes from the
    /// pairing record. The CSR's self-signature is checked by the parser.
    pub fn sign_gateway(
        &self,
        csr_pem: &str,
        tenant_id: &str,
        gateway_id: &str,
        lifetime_secs: u64,
    ) -> Result<IssuedCert, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, gateway_id);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, tenant_id);
        params.subject_alt_names = vec![SanType::URI(
            pcg_proto::pairing::identity_uri(tenant_id, gateway_id)
                .as_str()
                .try_into()?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(10);
        params.not_after =
            now + Duration::seconds(i64::try_from(lifetime_secs).unwrap_or(i64::MAX / 2));
        let serial: [u8; 16] = rand::random();
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let public_key = cert_public_key(cert.der())
            .ok_or_else(|| CaError::BadCsr("the CSR's public key cannot be read back".into()))?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial_hex: hex::encode(serial),
            not_after: params.not_after,
            public_key,
        })
    }
}

/// Extracts the DER of the first CERTIFICATE block of a PEM string.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_cert_ignores_what_the_csr_asks_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("ca");
        // A CSR that asks to be a CA, with a foreign subject.
        let key = KeyPair::generate().expect("key");
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        req.distinguished_name.push(DnType::CommonName, "root");
        let csr = req
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let issued = ca
            .sign_gateway(&csr, "t_1", "g_1", 30 * 86_400)
            .expect("signed");
        let der = pem_to_der(&issued.pem).expect("der");
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(!x.is_ca());
        assert!(x.subject().to_string().contains("CN=g_1"));
        let san = x
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec!["URI(pcg://tenant/t_1/gateway/g_1)".to_string()]);
    }

    #[test]
    fn ca_is_stable_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Ca::load_or_create(dir.path()).expect("ca").fingerprint();
        let b = Ca::load_or_create(dir.path()).expect("ca").fingerprint();
        assert_eq!(a, b);
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("ca");
        assert!(matches!(
            ca.sign_gateway("not a csr", "t", "g", 1),
            Err(CaError::BadCsr(_))
        ));
    }
}
