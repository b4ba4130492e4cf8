//! The cluster's own PKI and its NATS JetStream connection.
//!
//! Replicas of pcg-saas are to share their state through a NATS JetStream cluster. Traffic inside
//! the cluster — between NATS nodes (routes) and from replicas to NATS — uses mutual TLS with a
//! second, *internal* CA, kept apart from the CA that signs gateways' certificates: a gateway's
//! certificate is worthless inside the cluster, and a cluster certificate is worthless on the
//! broker.
//!
//! What this version has:
//! - `pcg-saas cluster init`: the internal CA, a certificate per NATS node (server and client
//!   authentication: a route is both) and per replica (client authentication only);
//! - `pcg-saas cluster check`: connects as a replica with the `[cluster]` section of its
//!   configuration, writes to a probe stream replicated on `stream_replicas` nodes, and reports
//!   the stream's leader and replicas — or says which part is missing (no node reachable, the
//!   certificate refused, no quorum).
//!
//! Serving from the cluster (the state in JetStream) is not in this version: `serve` refuses a
//! `[cluster]` section rather than run a replica that shares nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{random_serial, write_private, Ca};

/// The `[cluster]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers of the cluster, `tls://host:port` (or `host:port`); a replica connects to
    /// one and moves to another when it fails.
    pub nats_urls: Vec<String>,
    /// The internal CA's certificate (PEM): NATS nodes must present a certificate it signed.
    pub ca_file: PathBuf,
    /// This replica's certificate and key (PEM), signed by the internal CA.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Nodes each JetStream stream is replicated on (3: one node may fail).
    #[serde(default = "default_replicas")]
    pub stream_replicas: usize,
    /// Bound on one JetStream request (a write, a stream lookup), milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_replicas() -> usize {
    3
}

fn default_request_timeout_ms() -> u64 {
    5_000
}

/// Why the cluster cannot be used, each with what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read {what} {path}: {message}; `pcg-saas cluster init` creates the internal CA and the certificates")]
    Files {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("cluster configuration: {0}")]
    Config(String),
    #[error("no NATS node of {urls} accepted this replica: {message}; check that the nodes run and listen there, and that `cert_file` was signed by the internal CA whose certificate the nodes trust (`ca_file` of their `tls` block)")]
    Connect { urls: String, message: String },
    #[error("JetStream has no quorum: {message} (connected to {server}); a stream replicated on {replicas} nodes needs {majority} of them up and routed to each other; start the missing NATS nodes")]
    NoQuorum {
        server: String,
        replicas: usize,
        majority: usize,
        message: String,
    },
    #[error("JetStream refused the probe stream: {0}")]
    JetStream(String),
    #[error("the operation log (JetStream stream {stream}, connected to {server}): {message}")]
    OpLog {
        stream: &'static str,
        server: String,
        message: String,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// --- the internal PKI ------------------------------------------------------------------------

/// What `cluster init` wrote and kept.
#[derive(Debug, Default, Serialize)]
pub struct InitReport {
    pub created: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

fn write_pair(
    report: &mut InitReport,
    dir: &Path,
    stem: &str,
    make: impl FnOnce() -> Result<(String, String), ClusterError>,
) -> Result<(), ClusterError> {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    if cert.exists() && key.exists() {
        report.kept.push(cert);
        return Ok(());
    }
    let (cert_pem, key_pem) = make()?;
    write_created(report, &cert, &cert_pem, &key, &key_pem)
}

fn write_created(
    report: &mut InitReport,
    cert: &Path,
    cert_pem: &str,
    key: &Path,
    key_pem: &str,
) -> Result<(), ClusterError> {
    write_private(key, key_pem.as_bytes()).map_err(|source| ClusterError::Write {
        path: key.to_path_buf(),
        source,
    })?;
    std::fs::write(cert, cert_pem).map_err(|source| ClusterError::Write {
        path: cert.to_path_buf(),
        source,
    })?;
    report.created.push(cert.to_path_buf());
    Ok(())
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    hosts: &[String],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> Result<(String, String), ClusterError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "pcg cluster");
    for h in hosts {
        params.subject_alt_names.push(match h.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.as_str().try_into()?),
        });
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(825);
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Creates in `dir` whatever is missing of: the internal CA (`internal-ca.pem`, `.key`), the
/// gateways' CA every replica signs gateways with (`gateway-ca.pem`, `.key`), a
/// certificate per NATS node (`nats-<node>.pem`, `.key`: server and client authentication, for
/// `hosts` and the node's name) and per replica (`replica-<name>.pem`, `.key`: client
/// authentication only). Files already there are kept, so it can be run again to add a node.
pub fn init(
    dir: &Path,
    nodes: &[String],
    replicas: &[String],
    hosts: &[String],
) -> Result<InitReport, ClusterError> {
    pcg_durable::fs::private_dir(dir).map_err(|source| ClusterError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for n in nodes.iter().chain(replicas) {
        if n.is_empty()
            || n.len() > 64
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClusterError::Config(format!(
                "{n:?} is not a usable node or replica name (1-64 letters, digits, '-' or '_')"
            )));
        }
    }
    let mut report = InitReport::default();
    let ca_cert = dir.join("internal-ca.pem");
    let ca_key = dir.join("internal-ca.key");
    let issuer = if ca_cert.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| ClusterError::Files {
                what: "the internal CA",
                path: p.to_path_buf(),
                message: e.to_string(),
            })
        };
        let key = KeyPair::from_pem(&read(&ca_key)?).map_err(|e| ClusterError::Files {
            what: "the internal CA key",
            path: ca_key.clone(),
            message: e.to_string(),
        })?;
        report.kept.push(ca_cert.clone());
        Issuer::from_ca_cert_pem(&read(&ca_cert)?, key).map_err(|e| ClusterError::Files {
            what: "the internal CA",
            path: ca_cert.clone(),
            message: e.to_string(),
        })?
    } else {
        let (cert_pem, key_pem, params, key) = Ca::generate("pcg internal CA")?;
        write_created(&mut report, &ca_cert, &cert_pem, &ca_key, &key_pem)?;
        Issuer::new(params, key)
    };
    // The gateways' CA, shared by every replica (`ca_cert_file`, `ca_key_file`): apart from the
    // internal one, so neither kind of certificate opens the other's door.
    let gw_cert = dir.join("gateway-ca.pem");
    let gw_key = dir.join("gateway-ca.key");
    if gw_cert.exists() && gw_key.exists() {
        report.kept.push(gw_cert);
    } else {
        let (cert_pem, key_pem, _, _) = Ca::generate("pcg-saas CA")?;
        write_created(&mut report, &gw_cert, &cert_pem, &gw_key, &key_pem)?;
    }
    for n in nodes {
        let mut names = hosts.to_vec();
        names.push(n.clone());
        write_pair(&mut report, dir, &format!("nats-{n}"), || {
            leaf(
                &issuer,
                n,
                &names,
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        })?;
    }
    for r in replicas {
        write_pair(&mut report, dir, &format!("replica-{r}"), || {
            leaf(&issuer, r, &[], vec![ExtendedKeyUsagePurpose::ClientAuth])
        })?;
    }
    Ok(report)
}

// --- the NATS connection ---------------------------------------------------------------------

fn tls_config(cfg: &ClusterConfig) -> Result<rustls::ClientConfig, ClusterError> {
    let files = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| ClusterError::Files {
            what,
            path,
            message: e.to_string(),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cfg.ca_file)
        .map_err(files("the internal CA certificate", &cfg.ca_file))?
    {
        let c = c.map_err(files("the internal CA certificate", &cfg.ca_file))?;
        roots.add(c).map_err(|e| ClusterError::Files {
            what: "the internal CA certificate",
            path: cfg.ca_file.clone(),
            message: e.to_string(),
        })?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(files("this replica's certificate", &cfg.cert_file))?
        .collect::<Result<_, _>>()
        .map_err(files("this replica's certificate", &cfg.cert_file))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(files("this replica's key", &cfg.key_file))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
        })
        .map_err(|e| ClusterError::Config(format!("TLS: {e}")))
}

/// Connects to the cluster as a replica (mutual TLS with the internal CA).
pub async fn connect(cfg: &ClusterConfig, name: &str) -> Result<async_nats::Client, ClusterError> {
    if cfg.nats_urls.is_empty() {
        return Err(ClusterError::Config(
            "nats_urls is empty: name the cluster's NATS servers".into(),
        ));
    }
    let tls = tls_config(cfg)?;
    let urls: Vec<async_nats::ServerAddr> = cfg
        .nats_urls
        .iter()
        .map(|u| {
            u.parse()
                .map_err(|e| ClusterError::Config(format!("nats_urls: {u:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    async_nats::ConnectOptions::new()
        .name(name)
        .require_tls(true)
        .tls_client_config(tls)
        .connection_timeout(Duration::from_millis(cfg.request_timeout_ms))
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .connect(urls)
        .await
        .map_err(|e| ClusterError::Connect {
            urls: cfg.nats_urls.join(", "),
            message: e.to_string(),
        })
}

/// The NATS node `client` is connected to now, for messages: `name (host:port)`.
pub(crate) fn server_description(client: &async_nats::Client) -> String {
    let info = client.server_info();
    format!("{} ({}:{})", info.server_name, info.host, info.port)
}

impl ClusterError {
    /// [`ClusterError::NoQuorum`] for a stream replicated as `cfg` says, seen from `server`.
    pub(crate) fn no_quorum(cfg: &ClusterConfig, server: String, message: String) -> ClusterError {
        let replicas = cfg.stream_replicas.max(1);
        ClusterError::NoQuorum {
            server,
            replicas,
            majority: replicas / 2 + 1,
            message,
        }
    }
}

/// Whether a stream lookup or creation failed because the JetStream API has no leader: no
/// answer, or nobody to answer (as opposed to an answer refusing the stream).
pub(crate) fn leaderless(e: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::TimedOut | K::JetStreamUnavailable => true,
        K::JetStream(api) => api_leaderless(&api),
        _ => false,
    }
}

/// Whether a JetStream API error answer means "no leader (yet)": 503, the code JetStream
/// answers with while the cluster or the stream has no leader.
pub(crate) fn api_leaderless(api: &async_nats::jetstream::Error) -> bool {
    api.code() == 503
}

/// What `cluster check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The NATS node this replica is connected to.
    pub server: String,
    pub cluster: Option<String>,
    /// The probe stream's leader and replicas (`current`: caught up with the leader).
    pub leader: Option<String>,
    pub replicas: Vec<ReplicaState>,
    /// Time from connecting to the probe write acknowledged by the quorum.
    pub elapsed_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct ReplicaState {
    pub name: String,
    pub current: bool,
    pub offline: bool,
}

/// The stream `cluster check` writes to.
pub const PROBE_STREAM: &str = "PCG_PROBE";

/// Connects, writes one message to the probe stream (created on `stream_replicas` nodes, in
/// memory, keeping one message) and waits for the quorum's acknowledgement.
pub async fn check(cfg: &ClusterConfig) -> Result<CheckReport, ClusterError> {
    use async_nats::jetstream;
    let started = Instant::now();
    let client = connect(cfg, "pcg-saas cluster check").await?;
    let server = server_description(&client);
    let no_quorum = |message: String| ClusterError::no_quorum(cfg, server.clone(), message);
    let js = jetstream::new(client);
    let mut stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: PROBE_STREAM.into(),
            subjects: vec!["pcg.probe".into()],
            num_replicas: cfg.stream_replicas.max(1),
            storage: jetstream::stream::StorageType::Memory,
            max_messages: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            if leaderless(&e) {
                no_quorum(format!(
                    "the probe stream could not be looked up or created: {e}"
                ))
            } else {
                ClusterError::JetStream(e.to_string())
            }
        })?;
    let ack = js
        .publish(
            "pcg.probe",
            format!("probe at {}", crate::store::now_ms()).into(),
        )
        .await
        .map_err(|e| no_quorum(format!("the probe write was not accepted: {e}")))?;
    ack.await
        .map_err(|e| no_quorum(format!("the probe write was not acknowledged: {e}")))?;
    let si = stream
        .info()
        .await
        .map_err(|e| no_quorum(format!("the probe stream's state could not be read: {e}")))?;
    let (leader, replicas) = match &si.cluster {
        Some(c) => (
            c.leader.clone(),
            c.replicas
                .iter()
                .map(|r| ReplicaState {
                    name: r.name.clone(),
                    current: r.current,
                    offline: r.offline,
                })
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    Ok(CheckReport {
        server,
        cluster: si.cluster.as_ref().and_then(|c| c.name.clone()),
        leader,
        replicas,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}
