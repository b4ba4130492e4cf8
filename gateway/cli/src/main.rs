//! `pcgctl`: the operator CLI of a pcg gateway. It talks to the running daemon over its
//! owner-only admin socket; when the daemon is not running, `pair`, `status`, `bundle` and `diag`
//! work directly on the gateway's store.
//!
//! Run by root for a gateway whose data directory belongs to a service user (the appliance's
//! `pcg`), pcgctl re-executes itself as that user first, so that it reaches the owner-only
//! socket and never leaves root-owned files in the gateway's store.

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
    about = "Operate a pcg gateway: pair it, see its status, diagnose its connections, set its proxy",
    after_help = "Examples:
  pcgctl pair pcg1_eyJ1Ijoi...        pair with a token from your SaaS tenant
  pcgctl status                        is it connected? (exit status says so too)
  pcgctl diag                          which hop to the SaaS or to a provider fails, and what to do
  pcgctl --config /etc/pcg/gateway.toml status --json
  pcgctl completions bash > /etc/bash_completion.d/pcgctl"
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
    #[command(after_help = "Examples:
  pcgctl pair pcg1_eyJ1Ijoi...         the token your tenant admin created
  pcgctl pair - < token.txt            keeps the token out of the shell's history
  pcgctl pair --force pcg1_...         replace this gateway's identity (a new gateway)")]
    Pair {
        token: String,
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Show pairing, tunnel, certificate, journal and outbox.
    ///
    /// Exit status: 0 connected; 2 not paired; 3 paired but the tunnel is down (or the daemon is
    /// not running); 4 revoked (pair again); 1 pcgctl itself failed.
    #[command(after_help = "Examples:
  pcgctl status
  pcgctl status --json | jq .tunnel
  pcgctl status >/dev/null || echo \"not connected: $?\"")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The HTTP proxy the gateway reaches the SaaS through.
    #[command(
        subcommand,
        after_help = "Examples:
  pcgctl proxy set http://proxy.corp:3128
  echo 'http://gw:S3cret@proxy.corp:3128' | pcgctl proxy set -
  pcgctl proxy show
  pcgctl proxy clear"
    )]
    Proxy(ProxyCmd),
    /// Write a support bundle (tar.gz: status, configuration and logs with secrets redacted,
    /// enrolled endpoints, versions, system facts); with --upload, also send it to the SaaS.
    #[command(after_help = "Examples:
  pcgctl bundle                       writes pcg-bundle-<gateway>-<time>.tar.gz here
  pcgctl bundle -o /tmp/b.tar.gz
  pcgctl bundle --upload              your tenant admin fetches it: GET /v1/gateways/<id>/bundles")]
    Bundle {
        /// Where to write it (default: pcg-bundle-<gateway>-<time>.tar.gz in this directory).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Also upload it up the tunnel (the daemon must be running and connected).
        #[arg(long)]
        upload: bool,
    },
    /// Print a shell completion script for pcgctl (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:
  pcgctl completions bash > /etc/bash_completion.d/pcgctl
  pcgctl completions zsh > \"${fpath[1]}/_pcgctl\"")]
    Completions { shell: clap_complete::Shell },
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
    let owner = match cli.cmd {
        // Needs neither the configuration nor the data directory.
        Cmd::Completions { .. } => Ok(None),
        _ => pcg_gateway::Config::load(cli.config.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(|cfg| as_data_dir_owner(&cfg)),
    };
    match owner {
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
        Ok(code) => code,
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

/// Exit status of `pcgctl status` by state.
fn status_code(s: &Status) -> ExitCode {
    match (s.paired, s.tunnel.state) {
        (false, _) => ExitCode::from(2),
        (true, TunnelState::Connected) => ExitCode::SUCCESS,
        (true, TunnelState::Revoked) => ExitCode::from(4),
        (true, _) => ExitCode::from(3),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Cmd::Completions { shell } = cli.cmd {
        let mut buf = Vec::new();
        clap_complete::generate(
            shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "pcgctl",
            &mut buf,
        );
        out(&String::from_utf8_lossy(&buf))?;
        return Ok(ExitCode::SUCCESS);
    }
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
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Proxy(cmd) => proxy(&cfg, &socket, cmd).await.map(|()| ExitCode::SUCCESS),
        Cmd::Bundle { output, upload } => bundle(&cfg, &socket, output, upload).await,
        // Run by `main` itself: completions need no configuration, diag sets its own exit status.
        Cmd::Completions { .. } | Cmd::Diag(_) => {
            anyhow::bail!("pcgctl completions and diag run apart from the other commands")
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
            Ok(status_code(&status))
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
        firstboot: pcg_gateway::status::read_firstboot(&cfg.data_dir),
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

async fn bundle(
    cfg: &pcg_gateway::Config,
    socket: &std::path::Path,
    output: Option<PathBuf>,
    upload: bool,
) -> anyhow::Result<ExitCode> {
    use base64::Engine as _;
    let (bytes, uploaded) = match admin::request(socket, &AdminRequest::Bundle { upload }).await {
        Ok(resp) if resp.ok => {
            let b = resp
                .bundle
                .ok_or_else(|| anyhow::anyhow!("the daemon sent no bundle"))?;
            (
                base64::engine::general_purpose::STANDARD.decode(b)?,
                resp.bundle_id,
            )
        }
        Ok(resp) => anyhow::bail!(resp.error.unwrap_or_else(|| "the bundle failed".into())),
        Err(AdminError::NotRunning { path }) => {
            if upload {
                anyhow::bail!(
                    "cannot upload: the gateway daemon is not running (no admin socket at {}); start it, or write the bundle without --upload",
                    path.display()
                );
            }
            let status = offline_status(cfg, &path)?;
            let store = pcg_gateway::store::Store::open_now(&cfg.data_dir)?;
            let diag = pcg_gateway::diag::run(
                cfg,
                Ok(&store),
                pcg_gateway::diag::Options::for_bundle(),
                "pcgctl",
            )
            .await;
            let contents = pcg_gateway::bundle::gather(
                cfg,
                cfg.source.as_deref(),
                &store,
                &status,
                &diag,
                &[],
            );
            let prefix = format!(
                "pcg-bundle-{}",
                status.gateway_id.as_deref().unwrap_or("unpaired")
            );
            (pcg_gateway::bundle::archive(&contents, &prefix)?, None)
        }
        Err(e) => return Err(e.into()),
    };
    let path = output.unwrap_or_else(|| {
        let t = time::OffsetDateTime::now_utc();
        PathBuf::from(format!(
            "pcg-bundle-{:04}{:02}{:02}T{:02}{:02}{:02}Z.tar.gz",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ))
    });
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        f.write_all(&bytes)?;
    }
    use sha2::Digest as _;
    let mut msg = format!(
        "bundle: {} ({} bytes, SHA-256 {})\n",
        path.display(),
        bytes.len(),
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    if let Some(id) = uploaded {
        msg.push_str(&format!(
            "uploaded as {id}: your tenant admin fetches it with GET /v1/bundles/{id}\n"
        ));
    }
    out(&msg)?;
    Ok(ExitCode::SUCCESS)
}
