//! `pcg-gateway`: the gateway daemon. `pcg-gateway run` runs until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pcg-gateway", version, about = "pcg gateway daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        /// TOML config file (optional).
        #[arg(long, short, env = "PCG_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    // Everything the daemon writes (store, keys, admin socket) is for its own user only.
    pcg_gateway::owner_only_umask();
    let Cmd::Run { config } = Cli::parse().cmd;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PCG_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = pcg_gateway::Config::load(config.as_deref())?;
    let registry = pcg_gateway::executor::Registry::standard(cfg.ledger_path.clone());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(pcg_gateway::run(cfg, registry, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    }))
}
