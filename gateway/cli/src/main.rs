//! `pcgctl`: the operator CLI of a pcg gateway. It talks to the running daemon over its
//! owner-only admin socket; when the daemon is not running, `pair`, `status` and `diag` work
//! directly on the gateway's store.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

mod diag;

use clap::{Parser, Subcommand};
use pcg_gateway::admin::{self, AdminError, AdminRequest};
use pcg_gateway::status::{Status, TunnelState, TunnelStatus};

#[derive(Parser)]
#[command(
    name = "pcgctl",
    version,
    about = "Operate a pcg gateway: pair it, see its status, diagnose its connections"
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
    /// The HTTP proxy the gateway reaches the SaaS through.
    #[command(subcommand)]
    Proxy(ProxyCmd),
    /// Check every hop to the SaaS and every enrolled provider endpoint; exit 0 all ok, 1 a
    /// warning, 2 a failure.
    Diag(diag::Args),
}

#[derive(Subcommand)]
enum ProxyCmd {
    /// Use this proxy, `http://[USER:PASSWORD@]HOST:PORT` (`-` reads it from stdin, keeping a
    /// password out of the shell's history). Stored sealed; wins over the config and HTTPS_PROXY.
    Set { url: String },
    /// Forget the proxy set with `pcgctl proxy set` (the config or HTTPS_PROXY apply again).
    Clear,
    /// Show the proxy in effect and where it comes from (never its password).
    Show,
}

/// Writes to stdout; a reader that went away (`pcgctl status | head`) is not an error.
pub(crate) fn out(text: &str) -> std::io::Result<()> {
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
    let cli = match cli {
        Cli {
            config,
            cmd: Cmd::Diag(args),
        } => {
            let code = rt.block_on(diag::run(config, args));
            // A name lookup the run gave up on may still hold a thread: do not wait for it.
            rt.shutdown_background();
            return code;
        }
        cli => cli,
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
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
                    let id = pcg_gateway::pairing::pair(&store, &cfg, &token, force).await?;
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
        Cmd::Proxy(cmd) => proxy(&cfg, &socket, cmd).await,
        // Run by `main` itself, for its own exit status.
        Cmd::Diag(_) => anyhow::bail!("pcgctl diag runs apart from the other commands"),
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
        certificate_sha256: id
            .as_ref()
            .and_then(|i| pcg_gateway::status::pem_sha256(&i.cert_pem)),
        journal_entries: store.journal_len(),
        running: store.running()?.len(),
        outbox_depth: store.outbox_depth(),
        uptime_s: 0,
        clock_unix_ms: pcg_gateway::store::now_ms(),
        command_kinds: Vec::new(),
    })
}

async fn proxy(
    cfg: &pcg_gateway::Config,
    socket: &std::path::Path,
    cmd: ProxyCmd,
) -> anyhow::Result<()> {
    let url = match &cmd {
        ProxyCmd::Set { url } if url == "-" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            Some(Some(s.trim().to_string()))
        }
        ProxyCmd::Set { url } => Some(Some(url.clone())),
        ProxyCmd::Clear => Some(None),
        ProxyCmd::Show => None,
    };
    // Through the daemon when it runs (it holds the store), else on the store directly.
    let online = match &url {
        Some(url) => admin::request(socket, &AdminRequest::SetProxy { url: url.clone() }).await,
        None => admin::request(socket, &AdminRequest::ProxyInfo).await,
    };
    let info = match online {
        Ok(resp) if !resp.ok => {
            anyhow::bail!(resp
                .error
                .unwrap_or_else(|| "the proxy command failed".into()))
        }
        Ok(resp) => match resp.proxy {
            Some(p) => p,
            None => {
                let resp = admin::request(socket, &AdminRequest::ProxyInfo).await?;
                resp.proxy
                    .ok_or_else(|| anyhow::anyhow!("the daemon sent no proxy information"))?
            }
        },
        Err(AdminError::NotRunning { .. }) => {
            let store = pcg_gateway::store::Store::open_now(&cfg.data_dir)?;
            if let Some(url) = &url {
                pcg_gateway::admin::set_proxy(&store, url.as_deref())
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
            pcg_gateway::transport::proxy_info(cfg, &store).map_err(anyhow::Error::msg)?
        }
        Err(e) => return Err(e.into()),
    };
    out(&info.render())?;
    Ok(())
}
