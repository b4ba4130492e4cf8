//! `pcg-gateway`: the gateway daemon. `pcg-gateway run` runs until SIGINT/SIGTERM;
//! `pcg-gateway schemas` prints the JSON Schemas of the command payloads.

pcg_obs::allocator!();

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
        /// Log level: error, warn, info, debug or trace (PCG_LOG, a filter, wins).
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
        /// Log format on stderr: text or json (one object per line).
        #[arg(long, value_name = "FORMAT", default_value = "text")]
        log_format: pcg_obs::LogFormat,
    },
    /// Print the JSON Schemas of the command payloads, one per kind, with an example each
    /// (committed as gateway/agent/command-schemas.json).
    Schemas,
}

fn main() -> anyhow::Result<()> {
    // Everything the daemon writes (store, keys, admin socket) is for its own user only.
    pcg_gateway::owner_only_umask();
    let (config, log_level, log_format) = match Cli::parse().cmd {
        Cmd::Run {
            config,
            log_level,
            log_format,
        } => (config, log_level, log_format),
        Cmd::Schemas => {
            print!(
                "{}",
                pcg_gateway::schemas::document().map_err(anyhow::Error::msg)?
            );
            return Ok(());
        }
    };
    pcg_obs::init_logging(log_level.as_deref(), log_format).map_err(anyhow::Error::msg)?;
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
