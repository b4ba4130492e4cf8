//! `pcgctl`: the operator CLI of a pcg gateway. It talks to the running daemon over its
//! owner-only admin socket; when the daemon is not running, `pair` and `status` work directly on
//! the gateway's store.
//!
//! Run by root for a gateway whose data directory belongs to a service user (the appliance's
//! `pcg`), pcgctl re-executes itself as that user first, so that it reaches the owner-only
//! socket and never leaves root-owned files in the gateway's store.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pcg_gateway::admin::{self, AdminError, AdminRequest};
use pcg_gateway::status::{Status, TunnelState, TunnelStatus};

#[derive(Parser)]
#[command(
    name = "pcgctl",
    version,
    about = "Operate a pcg gateway: pair it, see its status"
)]
struct Cli {
    /// The gateway's TOML config file (for its data directory and admin socket).
    #[arg(long, short, global = true, env = "PCG_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pair this gateway with a SaaS tenant using a one-time token (`-` reads it from stdin).
    Pair {
        token: String,
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Show pairing, tunnel, certificate, journal and outbox.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Writes to stdout; a reader that went away (`pcgctl status | head`) is not an error.
fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

fn main() -> ExitCode {
    pcg_gateway::owner_only_umask();
    let cli = Cli::parse();
    match pcg_gateway::Config::load(cli.config.as_deref())
        .map_err(anyhow::Error::from)
        .and_then(|cfg| as_data_dir_owner(&cfg))
    {
        Ok(Some(code)) => return code,
        Ok(None) => {}
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Set in the environment of the re-executed pcgctl, so that it never re-executes again.
const REEXEC_ENV: &str = "PCGCTL_AS_OWNER";

/// When run by root for a data directory owned by another user, runs this same command as that
/// user (its uid and primary group, no supplementary groups) and returns its exit status.
fn as_data_dir_owner(cfg: &pcg_gateway::Config) -> anyhow::Result<Option<ExitCode>> {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::process::CommandExt as _;
    if !rustix::process::geteuid().is_root() || std::env::var_os(REEXEC_ENV).is_some() {
        return Ok(None);
    }
    let Ok(meta) = std::fs::metadata(&cfg.data_dir) else {
        return Ok(None);
    };
    if meta.uid() == 0 {
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(REEXEC_ENV, "1")
        .uid(meta.uid())
        .gid(meta.gid())
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run {} as the owner (uid {}) of {}: {e}",
                exe.display(),
                meta.uid(),
                cfg.data_dir.display()
            )
        })?;
    Ok(Some(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = pcg_gateway::Config::load(cli.config.as_deref())?;
    let socket = cfg.admin_socket_path();
    match cli.cmd {
        Cmd::Pair { token, force } => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s.trim().to_string()
            } else {
                token
            };
            let req = AdminRequest::Pair {
                token: token.clone(),
                force,
            };
            let paired = match admin::request(&socket, &req).await {
                Ok(resp) if resp.ok => resp
                    .paired
                    .ok_or_else(|| anyhow::anyhow!("the daemon did not say what it paired as"))?,
                Ok(resp) => anyhow::bail!(resp.error.unwrap_or_else(|| "pairing failed".into())),
                Err(AdminError::NotRunning { .. }) => {
                    // Pair offline; the daemon picks the identity up when it starts.
                    let store = pcg_gateway::store::Store::open_now(&cfg.data_dir)?;
                    let id = pcg_gateway::pairing::pair(
                        &store,
                        &token,
                        force,
                        std::time::Duration::from_millis(cfg.connect_timeout_ms),
                    )
                    .await?;
                    pcg_gateway::admin::Paired {
                        tenant_id: id.tenant_id,
                        gateway_id: id.gateway_id,
                        broker_endpoints: id.broker_endpoints,
                        certificate_not_after_ms: id.cert_not_after_ms,
                    }
                }
                Err(e) => return Err(e.into()),
            };
            out(&format!(
                "paired: gateway {} of tenant {}\nbroker: {}\ncertificate expires {}\n",
                paired.gateway_id,
                paired.tenant_id,
                paired.broker_endpoints.join(", "),
                pcg_gateway::status::rfc3339(paired.certificate_not_after_ms)
            ))?;
            Ok(())
        }
        Cmd::Status { json } => {
            let status = match admin::request(&socket, &AdminRequest::Status).await {
                Ok(resp) if resp.ok => resp
                    .status
                    .ok_or_else(|| anyhow::anyhow!("the daemon sent no status"))?,
                Ok(resp) => anyhow::bail!(resp.error.unwrap_or_else(|| "status failed".into())),
                Err(AdminError::NotRunning { path }) => offline_status(&cfg, &path)?,
                Err(e) => return Err(e.into()),
            };
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&status)?))?;
            } else {
                out(&status.render())?;
            }
            Ok(())
        }
    }
}

/// Status read from the store when the daemon is not running.
fn offline_status(cfg: &pcg_gateway::Config, socket: &std::path::Path) -> anyhow::Result<Status> {
    let store = pcg_gateway::store::Store::open_now(&cfg.data_dir)?;
    let id = store.identity()?;
    Ok(Status {
        version: pcg_gateway::VERSION.to_string(),
        paired: id.is_some(),
        tenant_id: id.as_ref().map(|i| i.tenant_id.clone()),
        gateway_id: id.as_ref().map(|i| i.gateway_id.clone()),
        api_url: id.as_ref().map(|i| i.api_url.clone()),
        tunnel: TunnelStatus {
            state: TunnelState::Stopped,
            last_error: Some(format!(
                "the gateway daemon is not running (no admin socket at {})",
                socket.display()
            )),
            ..TunnelStatus::default()
        },
        certificate_not_after_ms: id.as_ref().map(|i| i.cert_not_after_ms),
        journal_entries: store.journal_len(),
        running: store.running()?.len(),
        outbox_depth: store.outbox_depth(),
        uptime_s: 0,
        clock_unix_ms: pcg_gateway::store::now_ms(),
        command_kinds: Vec::new(),
        firstboot: pcg_gateway::status::read_firstboot(&cfg.data_dir),
    })
}
