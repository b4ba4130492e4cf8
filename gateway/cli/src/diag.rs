//! `pcgctl diag`: asks the running daemon to run the checks of [`pcg_gateway::diag`] (it holds
//! the store), or runs them here on the store when the daemon is stopped; prints the report
//! (human or `--json`) and exits 0 (all ok), 1 (a warning) or 2 (a failure, including a run that
//! could not be made).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use pcg_gateway::admin::{self, AdminError, AdminRequest};
use pcg_gateway::diag::Options;

#[derive(clap::Args)]
pub struct Args {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Bound of each check, seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
    check_timeout: Duration,
    /// Bound of the whole run, seconds.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = seconds)]
    total_timeout: Duration,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 3600.0) {
        return Err("give a number of seconds above 0 and at most 3600".into());
    }
    Ok(Duration::from_secs_f64(v))
}

pub async fn run(config: Option<PathBuf>, args: Args) -> ExitCode {
    match report(config, &args).await {
        Ok(r) => {
            let text = if args.json {
                serde_json::to_string_pretty(&r)
                    .map(|j| j + "\n")
                    .unwrap_or_default()
            } else {
                r.render()
            };
            if let Err(e) = crate::out(&text) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            ExitCode::from(r.exit_code)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn report(config: Option<PathBuf>, args: &Args) -> anyhow::Result<pcg_gateway::diag::Report> {
    let cfg = pcg_gateway::Config::load(config.as_deref())?;
    let socket = cfg.admin_socket_path();
    let options = Options {
        check_timeout_ms: u64::try_from(args.check_timeout.as_millis()).unwrap_or(u64::MAX),
        total_timeout_ms: u64::try_from(args.total_timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // The daemon bounds its run by the total; this bounds waiting for its answer.
    let wait = args.total_timeout + Duration::from_secs(5);
    let asked = tokio::time::timeout(
        wait,
        admin::request(&socket, &AdminRequest::Diag { options }),
    )
    .await;
    match asked {
        Err(_) => anyhow::bail!(
            "the gateway daemon did not answer the diagnostics request within {wait:?} (admin socket {})",
            socket.display()
        ),
        Ok(Ok(resp)) if resp.ok => resp
            .diag
            .ok_or_else(|| anyhow::anyhow!("the daemon sent no report (is it an older version? restart it)")),
        Ok(Ok(resp)) => anyhow::bail!(resp.error.unwrap_or_else(|| "diagnostics failed".into())),
        Ok(Err(AdminError::NotRunning { .. })) => {
            let store = pcg_gateway::store::Store::open_now(&cfg.data_dir);
            let store = store.as_ref().map_err(ToString::to_string);
            Ok(pcg_gateway::diag::run(&cfg, store, options, "pcgctl").await)
        }
        Ok(Err(e)) => Err(e.into()),
    }
}
