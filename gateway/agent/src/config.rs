//! pcg-gateway configuration: one optional TOML file plus `PCG_GATEWAY_*` environment overrides.
//!
//! On the appliance the file is `/etc/pcg/gateway.toml`; without one the gateway keeps its state
//! in `./pcg-gateway-data` and its admin socket in that directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the sled store (identity, journal, outbox) and the secret key file.
    pub data_dir: PathBuf,
    /// Admin socket pcgctl talks to (created owner-only); default `<data_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Largest number of commands executing at once.
    pub max_concurrent: usize,
    /// Redial backoff: first ceiling (milliseconds); each attempt doubles it, up to the cap.
    pub backoff_base_ms: u64,
    /// Redial backoff cap (milliseconds).
    pub backoff_cap_ms: u64,
    /// Connect timeout for the tunnel and pairing (milliseconds).
    pub connect_timeout_ms: u64,
    /// How long executed command ids are remembered after their result is acknowledged, hours.
    /// A redelivery within this window gets the stored result; never a second execution.
    pub journal_retention_hours: u64,
    /// When set, enables the `gateway.ledger` command, which appends one line per execution to
    /// this file: a local side effect that can be counted, used to prove exactly-once execution.
    pub ledger_path: Option<PathBuf>,
    /// HTTP proxy for the tunnel and pairing, `http://[user:password@]host:port`; an empty
    /// string means none (even if HTTPS_PROXY is set). A proxy set with `pcgctl proxy set`
    /// (stored sealed) wins over this key; this key wins over HTTPS_PROXY/https_proxy.
    pub proxy: Option<String>,
    /// PEM file of a proxy's TLS-inspection CA: trusted for the outer TLS of the WebSocket
    /// transport only (the tunnel's own TLS always pins the SaaS CA).
    pub proxy_ca: Option<PathBuf>,
    /// `auto` (direct, falling back to WebSocket when the path breaks TLS or HTTP/2), `direct`,
    /// or `websocket`.
    pub transport: TransportMode,
    /// In WebSocket fallback, how often the direct path is tried again, seconds.
    pub direct_retry_secs: u64,
    /// Plain-HTTP `GET /metrics` (Prometheus) on this address; unset (the default): no metrics
    /// endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM/SIGINT, how long running commands get to finish before they are stopped and
    /// recorded as `interrupted` (milliseconds).
    pub drain_grace_ms: u64,
    /// How often the watch loop observes every declared machine, milliseconds (one inventory
    /// read per provider endpoint per cycle).
    pub watch_interval_ms: u64,
    /// How often the gateway reports every machine's observation, its health and the provider
    /// inventory summary, milliseconds (changes are reported after the cycle that saw them).
    pub watch_report_ms: u64,
    /// The file this configuration was read from (not a key).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Which transports the tunnel may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportMode {
    Auto,
    Direct,
    Websocket,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("pcg-gateway-data"),
            admin_socket: None,
            max_concurrent: 64,
            backoff_base_ms: 1000,
            backoff_cap_ms: 60_000,
            connect_timeout_ms: 10_000,
            journal_retention_hours: 24 * 7,
            ledger_path: None,
            proxy: None,
            proxy_ca: None,
            transport: TransportMode::Auto,
            direct_retry_secs: 600,
            metrics_listen: None,
            drain_grace_ms: 10_000,
            watch_interval_ms: 30_000,
            watch_report_ms: 60_000,
            source: None,
        }
    }
}

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
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let mut c: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message: e.to_string(),
                })?;
                c.source = Some(p.to_path_buf());
                c
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// `PCG_GATEWAY_DATA_DIR`, `PCG_GATEWAY_ADMIN_SOCKET`, `PCG_GATEWAY_BACKOFF_BASE_MS`,
    /// `PCG_GATEWAY_BACKOFF_CAP_MS`, `PCG_GATEWAY_LEDGER`, `PCG_GATEWAY_PROXY_CA`,
    /// `PCG_GATEWAY_TRANSPORT`, `PCG_GATEWAY_DRAIN_GRACE_MS`, `PCG_GATEWAY_WATCH_INTERVAL_MS`.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn num(var: &'static str, v: String) -> Result<u64, ConfigError> {
            v.parse()
                .map_err(|e: std::num::ParseIntError| ConfigError::Env {
                    var,
                    message: e.to_string(),
                    value: v,
                })
        }
        if let Some(v) = get("PCG_GATEWAY_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("PCG_GATEWAY_ADMIN_SOCKET") {
            self.admin_socket = Some(v.into());
        }
        if let Some(v) = get("PCG_GATEWAY_BACKOFF_BASE_MS") {
            self.backoff_base_ms = num("PCG_GATEWAY_BACKOFF_BASE_MS", v)?;
        }
        if let Some(v) = get("PCG_GATEWAY_BACKOFF_CAP_MS") {
            self.backoff_cap_ms = num("PCG_GATEWAY_BACKOFF_CAP_MS", v)?;
        }
        if let Some(v) = get("PCG_GATEWAY_WATCH_INTERVAL_MS") {
            self.watch_interval_ms = num("PCG_GATEWAY_WATCH_INTERVAL_MS", v)?;
        }
        if let Some(v) = get("PCG_GATEWAY_LEDGER") {
            self.ledger_path = Some(v.into());
        }
        if let Some(v) = get("PCG_GATEWAY_PROXY_CA") {
            self.proxy_ca = Some(v.into());
        }
        if let Some(v) = get("PCG_GATEWAY_DRAIN_GRACE_MS") {
            self.drain_grace_ms = num("PCG_GATEWAY_DRAIN_GRACE_MS", v)?;
        }
        if let Some(v) = get("PCG_GATEWAY_TRANSPORT") {
            self.transport =
                serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                    ConfigError::Env {
                        var: "PCG_GATEWAY_TRANSPORT",
                        message: "use auto, direct or websocket".into(),
                        value: v,
                    }
                })?;
        }
        Ok(())
    }

    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_file_names_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("gateway.toml");
        std::fs::write(&p, "max_concurrent = \"many\"\n").expect("write");
        let msg = Config::load(Some(&p)).expect_err("invalid").to_string();
        assert!(
            msg.contains("gateway.toml") && msg.contains("max_concurrent"),
            "{msg}"
        );
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "PCG_GATEWAY_BACKOFF_BASE_MS").then(|| "50".into()))
            .expect("valid");
        assert_eq!(c.backoff_base_ms, 50);
        assert!(c
            .apply_env(|k| (k == "PCG_GATEWAY_BACKOFF_CAP_MS").then(|| "x".into()))
            .is_err());
    }
}
