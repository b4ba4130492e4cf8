//! The admin socket: a Unix socket, readable and writable by its owner only, on which pcgctl
//! asks the running daemon for its status or diagnostics, or hands it a pairing token. One JSON request per
//! line, one JSON answer per line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::status::Status;
use crate::Gateway;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    Pair {
        token: String,
        #[serde(default)]
        force: bool,
    },
    /// Sets (`Some`) or clears (`None`) the proxy kept sealed in the store.
    SetProxy {
        url: Option<String>,
    },
    /// The proxy in effect and where it comes from.
    ProxyInfo,
    /// A support bundle (tar.gz, base64 in `bundle`); with `upload`, also sent to the SaaS.
    Bundle {
        #[serde(default)]
        upload: bool,
    },
    /// Runs `pcgctl diag`'s checks in the daemon (which holds the store).
    Diag {
        #[serde(default)]
        options: crate::diag::Options,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired: Option<Paired>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::transport::ProxyInfo>,
    /// A support bundle, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// The id the SaaS keeps an uploaded bundle under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diag: Option<crate::diag::Report>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    pub tenant_id: String,
    pub gateway_id: String,
    pub broker_endpoints: Vec<String>,
    pub certificate_not_after_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the gateway daemon is not running (no admin socket at {path}); start it with `systemctl start pcg-gateway` or `pcg-gateway run`")]
    NotRunning { path: PathBuf },
    #[error("permission denied on the admin socket {path}; run pcgctl as the gateway's service user or root")]
    Permission { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway daemon answered something unexpected: {0}")]
    Protocol(String),
}

/// Sends one request to the daemon and returns its answer.
pub async fn request(path: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            AdminError::NotRunning {
                path: path.to_path_buf(),
            }
        }
        std::io::ErrorKind::PermissionDenied => AdminError::Permission {
            path: path.to_path_buf(),
        },
        _ => AdminError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await.map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| AdminError::Protocol(e.to_string()))
}

/// Binds the admin socket (owner-only) and serves it until the task is dropped.
pub async fn serve(gw: Arc<Gateway>, path: PathBuf) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        // A socket nobody answers on is left over from a previous run.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another pcg-gateway is serving {}", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let gw = gw.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r).take(1 << 16);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<AdminRequest>(&line) {
                Ok(req) => handle(&gw, req).await,
                Err(e) => AdminResponse {
                    ok: false,
                    error: Some(format!("malformed admin request: {e}")),
                    ..Default::default()
                },
            };
            let mut out = serde_json::to_string(&resp).expect("responses serialise");
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

use tokio::io::AsyncReadExt as _;

async fn handle(gw: &Arc<Gateway>, req: AdminRequest) -> AdminResponse {
    if gw.is_stopping() && !matches!(req, AdminRequest::Status | AdminRequest::ProxyInfo) {
        return AdminResponse {
            ok: false,
            error: Some(
                "the gateway is stopping and takes no new work; try again once it has restarted"
                    .into(),
            ),
            ..Default::default()
        };
    }
    match req {
        AdminRequest::Bundle { upload } => {
            use base64::Engine as _;
            let fail = |e: String| AdminResponse {
                ok: false,
                error: Some(e),
                ..Default::default()
            };
            let diag = crate::diag::run_in_daemon(gw, crate::diag::Options::for_bundle()).await;
            let contents = crate::bundle::gather(
                &gw.cfg,
                gw.cfg.source.as_deref(),
                &gw.store,
                &gw.status(),
                &diag,
                &pcg_obs::recent_logs(),
            );
            let prefix = format!(
                "pcg-bundle-{}",
                gw.status().gateway_id.unwrap_or_else(|| "unpaired".into())
            );
            let bytes = match crate::bundle::archive(&contents, &prefix) {
                Ok(b) => b,
                Err(e) => return fail(e.to_string()),
            };
            let bundle_id = if upload {
                match crate::bundle::upload(gw, &bytes).await {
                    Ok(id) => Some(id),
                    Err(e) => return fail(e.to_string()),
                }
            } else {
                None
            };
            AdminResponse {
                ok: true,
                bundle: Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
                bundle_id,
                ..Default::default()
            }
        }
        AdminRequest::ProxyInfo => match crate::transport::proxy_info(&gw.cfg, &gw.store) {
            Ok(p) => AdminResponse {
                ok: true,
                proxy: Some(p),
                ..Default::default()
            },
            Err(e) => AdminResponse {
                ok: false,
                error: Some(e),
                ..Default::default()
            },
        },
        AdminRequest::SetProxy { url } => match set_proxy(&gw.store, url.as_deref()).await {
            Ok(()) => AdminResponse {
                ok: true,
                ..Default::default()
            },
            Err(e) => AdminResponse {
                ok: false,
                error: Some(e),
                ..Default::default()
            },
        },
        AdminRequest::Diag { options } => AdminResponse {
            ok: true,
            diag: Some(crate::diag::run_in_daemon(gw, options).await),
            ..Default::default()
        },
        AdminRequest::Status => AdminResponse {
            ok: true,
            status: Some(gw.status()),
            ..Default::default()
        },
        AdminRequest::Pair { token, force } => {
            let _guard = gw.pairing.lock().await;
            match crate::pairing::pair(&gw.store, &gw.cfg, &token, force).await {
                Ok(id) => {
                    gw.identity_changed();
                    AdminResponse {
                        ok: true,
                        paired: Some(Paired {
                            tenant_id: id.tenant_id,
                            gateway_id: id.gateway_id,
                            broker_endpoints: id.broker_endpoints,
                            certificate_not_after_ms: id.cert_not_after_ms,
                        }),
                        ..Default::default()
                    }
                }
                Err(e) => AdminResponse {
                    ok: false,
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            }
        }
    }
}

/// Checks and stores the proxy URL (sealed; `None` clears it). The next dial uses it.
pub async fn set_proxy(store: &crate::store::Store, url: Option<&str>) -> Result<(), String> {
    if let Some(u) = url {
        crate::transport::Proxy::parse(u)?;
    }
    store.set_proxy(url).map_err(|e| e.to_string())?;
    store.flush().await.map_err(|e| e.to_string())
}
