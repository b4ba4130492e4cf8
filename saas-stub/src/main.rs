//! `pcg-saas`: the SaaS companion binary. `pcg-saas serve` runs the REST API and the broker;
//! `pcg-saas openapi` prints the OpenAPI document of the REST API; `pcg-saas cluster init|check`
//! make the internal PKI of a NATS cluster and check it.

pcg_obs::allocator!();

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pcg-saas",
    version,
    about = "pcg SaaS companion: tenants, pairing, CA, REST API and tunnel broker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the REST API and the broker (foreground; stop with SIGINT or SIGTERM).
    Serve {
        /// TOML config file (optional; defaults apply without one).
        #[arg(long, short, env = "PCG_SAAS_CONFIG")]
        config: Option<PathBuf>,
        /// Log level: error, warn, info, debug or trace (PCG_LOG, a filter, wins).
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
        /// Log format on stderr: text or json (one object per line).
        #[arg(long, value_name = "FORMAT", default_value = "text")]
        log_format: pcg_obs::LogFormat,
        /// Write `{"api", "broker", "api_listen", "broker_listen", "operator_key_file", "ca_file",
        /// "pid"}` as JSON
        /// to this file once the listeners are bound (for scripts and tests; `broker_listen` is
        /// the public port when the broker shares it).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Print the OpenAPI document of the REST API.
    Openapi,
    /// The NATS JetStream cluster replicas share: its internal PKI, and a check of it.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create whatever is missing of the internal CA and the certificates of NATS nodes and
    /// replicas (files already there are kept; run it again to add a node or a replica).
    Init {
        /// Directory for the files (created owner-only).
        #[arg(long)]
        dir: PathBuf,
        /// NATS node names, comma-separated: `nats-<node>.pem`/`.key` (server and client
        /// authentication).
        #[arg(long, value_delimiter = ',', default_value = "node1,node2,node3")]
        nodes: Vec<String>,
        /// Replica names, comma-separated: `replica-<name>.pem`/`.key` (client authentication).
        #[arg(long, value_delimiter = ',', default_value = "replica1,replica2")]
        replicas: Vec<String>,
        /// DNS names and IP addresses the NATS nodes are reached at (every node certificate
        /// carries them, and its node name).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
    },
    /// Connect as this replica (the `[cluster]` section of the config), write to a replicated
    /// probe stream, and print the stream's leader and replicas as JSON; exits 1 saying what is
    /// missing (no node reachable, the certificate refused, no quorum).
    Check {
        /// TOML config file with a `[cluster]` section.
        #[arg(long, short, env = "PCG_SAAS_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // Everything this process writes (store, CA, keys) is for its own user only.
    pcg_durable::fs::owner_only_umask();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Openapi => {
            print!("{}", pcg_saas::api::openapi_document());
            Ok(())
        }
        Cmd::Cluster(ClusterCmd::Init {
            dir,
            nodes,
            replicas,
            hosts,
        }) => {
            let r = pcg_saas::cluster::init(&dir, &nodes, &replicas, &hosts)?;
            for p in &r.created {
                println!("created {}", p.display());
            }
            for p in &r.kept {
                println!("kept    {}", p.display());
            }
            Ok(())
        }
        Cmd::Cluster(ClusterCmd::Check { config }) => {
            let cfg = pcg_saas::Config::load(Some(&config))?;
            let cluster = cfg
                .cluster
                .with_context(|| format!("{} has no [cluster] section", config.display()))?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
            let report = rt.block_on(pcg_saas::cluster::check(&cluster))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Serve {
            config,
            ready_file,
            log_level,
            log_format,
        } => {
            pcg_obs::init_logging(log_level.as_deref(), log_format).map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
            rt.block_on(serve(config, ready_file))
        }
    }
}

async fn serve(config: Option<PathBuf>, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = pcg_saas::Config::load(config.as_deref())?;
    let api = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} (api_listen)", cfg.api_listen))?;
    let broker = match cfg.broker_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (broker_listen)"))?,
        ),
        None => None,
    };
    let api_addr = api.local_addr()?;
    let broker_addr = broker.as_ref().map(|b| b.local_addr()).transpose()?;
    let data_dir = cfg.data_dir.clone();
    let ca_file = cfg
        .ca_cert_file
        .clone()
        .unwrap_or_else(|| data_dir.join("ca.pem"));
    let app = pcg_saas::open(cfg, api_addr, broker_addr).await?;
    tracing::info!(api = %app.api_url, broker = ?app.broker_urls, data = %data_dir.display(), "pcg-saas listening");
    if let Some(p) = ready_file {
        let body = serde_json::json!({
            "api": app.api_url,
            "broker": app.broker_urls,
            "api_listen": api_addr.to_string(),
            "broker_listen": broker_addr.unwrap_or(api_addr).to_string(),
            "operator_key_file": data_dir.join("operator.key"),
            "ca_file": ca_file,
            "pid": std::process::id(),
        });
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, body.to_string())?;
        std::fs::rename(&tmp, &p)?;
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    };
    pcg_saas::serve(app, api, broker, shutdown).await
}
