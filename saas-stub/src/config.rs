//! pcg-saas configuration: one optional TOML file plus `PCG_SAAS_*` environment overrides.
//!
//! With no file at all the service starts on embedded defaults: data in `./pcg-saas-data`, the
//! REST API and the broker on one port, 127.0.0.1:8443, HTTPS with a certificate issued by the CA
//! generated on first start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything pcg-saas can be told. Every key is documented in the README.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the sled store, the CA and the operator key.
    pub data_dir: PathBuf,
    /// Address the public port listens on: the REST API, the WebSocket way in, and (unless
    /// `broker_listen` is set) the broker.
    pub api_listen: SocketAddr,
    /// A separate listener for the broker (gRPC over mutual TLS). Unset (the default): the broker
    /// shares `api_listen`, so one port and one URL serve everything.
    pub broker_listen: Option<SocketAddr>,
    /// Base URL put in pairing tokens; defaults to `https://<api_listen>`.
    pub public_api_url: Option<String>,
    /// Broker endpoints handed to gateways at pairing; defaults to the API URL (one port) or
    /// `https://<broker_listen>`.
    pub public_broker_urls: Vec<String>,
    /// Extra DNS names and IP addresses for the server certificate (127.0.0.1 and localhost are
    /// always included).
    pub server_names: Vec<String>,
    /// Default lifetime of a pairing token, seconds.
    pub token_ttl_secs: u64,
    /// Lifetime of a gateway client certificate, seconds (default 30 days). Gateways renew
    /// over the tunnel at two thirds of it.
    pub gateway_cert_lifetime_secs: u64,
    /// Heartbeat interval announced to gateways, milliseconds. A tunnel silent for three
    /// intervals is closed.
    pub heartbeat_ms: u64,
    /// Largest accepted command payload, bytes.
    pub max_payload_bytes: usize,
    /// How long an `Idempotency-Key` names the command it first made, seconds.
    pub idempotency_window_secs: u64,
    /// Established connections across both listeners (also bounded by the descriptor limit).
    pub max_connections: usize,
    /// Connections from one IP address, per listener.
    pub max_connections_per_ip: usize,
    /// TLS handshakes waiting or under way, per listener, at least (more while they complete
    /// fast enough to finish within half the handshake timeout and the connection budget has
    /// room); past it a new connection either replaces the oldest (when it looks stalled) or is
    /// told to come back later.
    pub max_pending_handshakes: usize,
    /// TLS handshakes computed at once, per listener (the rest wait their turn).
    pub max_concurrent_handshakes: usize,
    /// Tunnels being set up at once (Hello, Welcome, replay); more are asked to come back.
    pub max_tunnel_setups: usize,
    /// Commands in one `POST /v1/commands/batch`.
    pub max_batch: usize,
    /// Largest body of `POST /v1/commands/batch`, bytes.
    pub max_batch_bytes: usize,
    /// Finished commands are deleted this many days after they were submitted.
    pub command_retention_days: u64,
    /// Events are deleted this many days after they happened.
    pub event_retention_days: u64,
    /// Time a client has to complete the TLS handshake, milliseconds.
    pub tls_handshake_timeout_ms: u64,
    /// Time an HTTP/1.1 client has to send a request's headers, milliseconds. On a kept-alive
    /// connection it counts from the end of the previous response (hyper's header read timeout),
    /// so it also bounds how long an HTTP/1.1 connection may sit idle between requests.
    pub header_timeout_ms: u64,
    /// A connection that moves no byte for this long is closed, seconds.
    pub idle_timeout_secs: u64,
    /// On SIGTERM/SIGINT: how long open requests and tunnels get to finish, milliseconds.
    pub shutdown_grace_ms: u64,
    /// A plain-HTTP listener for `GET /metrics` (for a Prometheus on an internal network);
    /// unset, metrics are served only on the public port, to the operator key.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest support bundle a gateway may upload, bytes.
    pub max_bundle_bytes: u64,
    /// Support bundles kept per gateway (the oldest are deleted).
    pub bundles_per_gateway: usize,
    /// Gateways' health and inventory reports are kept this many hours.
    pub health_retention_hours: u64,
    /// A feed subscriber can resume from a sequence number up to this many hours old (entries
    /// whose command, event or health report was deleted earlier by its own retention are
    /// skipped).
    pub feed_retention_hours: u64,
    /// Machines declared per gateway.
    pub max_machines_per_gateway: usize,
    /// The CA that signs gateways' certificates, from these files (both or neither) instead of
    /// `ca.pem`/`ca.key` created in `data_dir`: replicas share one (`pcg-saas cluster init`
    /// makes `gateway-ca.pem`/`.key`), and an operator may bring their own.
    pub ca_cert_file: Option<PathBuf>,
    pub ca_key_file: Option<PathBuf>,
    /// The NATS JetStream cluster replicas share (`pcg-saas cluster check` verifies it; `serve`
    /// does not run from it in this version).
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("pcg-saas-data"),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            broker_listen: None,
            public_api_url: None,
            public_broker_urls: Vec::new(),
            server_names: Vec::new(),
            token_ttl_secs: 3600,
            gateway_cert_lifetime_secs: 30 * 86_400,
            heartbeat_ms: 10_000,
            max_payload_bytes: 256 * 1024,
            idempotency_window_secs: 86_400,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_pending_handshakes: 256,
            max_concurrent_handshakes: 32,
            max_tunnel_setups: 256,
            max_batch: 1000,
            max_batch_bytes: 16 << 20,
            command_retention_days: 7,
            event_retention_days: 30,
            tls_handshake_timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            idle_timeout_secs: 300,
            shutdown_grace_ms: 5_000,
            metrics_listen: None,
            max_bundle_bytes: 64 << 20,
            bundles_per_gateway: 5,
            health_retention_hours: 72,
            feed_retention_hours: 72,
            max_machines_per_gateway: 10_000,
            ca_cert_file: None,
            ca_key_file: None,
            cluster: None,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment variable {var}={value:?}: {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
}

impl Config {
    /// Loads `path` if given (else defaults), then applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Applies `PCG_SAAS_DATA_DIR`, `PCG_SAAS_API_LISTEN`, `PCG_SAAS_BROKER_LISTEN`,
    /// `PCG_SAAS_PUBLIC_API_URL`, `PCG_SAAS_HEARTBEAT_MS`.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                message: e.to_string(),
                value: v,
            })
        }
        if let Some(v) = get("PCG_SAAS_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("PCG_SAAS_API_LISTEN") {
            self.api_listen = parse("PCG_SAAS_API_LISTEN", v)?;
        }
        if let Some(v) = get("PCG_SAAS_BROKER_LISTEN") {
            self.broker_listen = Some(parse("PCG_SAAS_BROKER_LISTEN", v)?);
        }
        if let Some(v) = get("PCG_SAAS_PUBLIC_API_URL") {
            self.public_api_url = Some(v);
        }
        if let Some(v) = get("PCG_SAAS_HEARTBEAT_MS") {
            self.heartbeat_ms = parse("PCG_SAAS_HEARTBEAT_MS", v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("saas.toml");
        std::fs::write(&p, "data_dir = \"x\"\nlisten = \"1\"\n").expect("write");
        let err = Config::load(Some(&p)).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("saas.toml") && msg.contains("listen"), "{msg}");
    }

    #[test]
    fn env_overrides_and_bad_values() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "PCG_SAAS_API_LISTEN").then(|| "127.0.0.1:1".to_string()))
            .expect("valid");
        assert_eq!(c.api_listen.port(), 1);
        let err = c
            .apply_env(|k| (k == "PCG_SAAS_HEARTBEAT_MS").then(|| "soon".to_string()))
            .expect_err("invalid");
        assert!(err.to_string().contains("PCG_SAAS_HEARTBEAT_MS"));
    }
}
