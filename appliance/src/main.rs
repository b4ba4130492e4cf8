//! `pcg-appliance`: the gateway appliance's own program.
//!
//! - `pcg-appliance firstboot`: run by `pcg-firstboot.service` at every boot, before the gateway:
//!   reads the appliance properties (OVF environment on a CD-ROM or VMware guestinfo, NoCloud
//!   seed, OpenStack config drive, or `/etc/pcg/ovf-env.xml`), configures the host name,
//!   systemd-networkd, DNS, timesyncd, the SSH key and the gateway's proxy, pairs once, and records
//!   the outcome in `<data_dir>/firstboot.json` (shown by `pcgctl status` and on the console).
//!   A bad property never stops the boot: it is reported and the rest applies.
//! - `pcg-appliance console`: writes the login screen (`/etc/issue.d/pcg.issue`) with the
//!   gateway id, tunnel state, addresses and next step, and asks agetty to show it again.

mod console;
mod props;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pcg-appliance",
    version,
    about = "pcg gateway appliance: first boot and console"
)]
struct Cli {
    /// The gateway's config file.
    #[arg(long, default_value = "/etc/pcg/gateway.toml", global = true)]
    config: PathBuf,
    /// pcgctl to ask for the gateway's state and to pair with.
    #[arg(long, default_value = "/usr/bin/pcgctl", global = true)]
    pcgctl: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the appliance properties and pair once (run at every boot, as root).
    Firstboot,
    /// Write the console login screen and print it.
    Console {
        /// Where to write it (agetty reads /etc/issue.d/*.issue).
        #[arg(long, default_value = "/etc/issue.d/pcg.issue")]
        issue: PathBuf,
        /// Only print it (for update-motd.d).
        #[arg(long)]
        print: bool,
    },
}

fn now_ms() -> i64 {
    pcg_gateway::store::now_ms()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Firstboot => {
            let cfg = match pcg_gateway::Config::load(Some(&cli.config)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pcg-appliance firstboot: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let host = setup::Host {
                root: PathBuf::from("/"),
                live: true,
                gateway_config: cli.config.clone(),
                pcgctl: cli.pcgctl.clone(),
            };
            let fb = setup::firstboot(&host, now_ms());
            println!(
                "pcg first boot: settings from {}",
                fb.source.as_deref().unwrap_or("nowhere (defaults)")
            );
            for s in &fb.steps {
                println!("pcg first boot: {s}");
            }
            if let Err(e) = setup::record(&cfg.data_dir, &fb) {
                eprintln!(
                    "pcg first boot: cannot record the outcome in {}: {e}",
                    cfg.data_dir.display()
                );
            }
            if fb.ok {
                println!("pcg first boot: ok: {}", fb.message);
                ExitCode::SUCCESS
            } else {
                println!("pcg first boot: ERROR: {}", fb.message);
                if let Some(a) = &fb.action {
                    println!("pcg first boot: to fix: {a}");
                }
                ExitCode::FAILURE
            }
        }
        Cmd::Console { issue, print } => {
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string();
            let status = console::gateway_status(&cli.pcgctl, &cli.config);
            let diag = std::process::Command::new(&cli.pcgctl)
                .args(["diag", "--help"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let service = console::service_state("pcg-gateway.service");
            let text = console::render(
                &hostname,
                &console::addresses(),
                service.as_deref(),
                &status,
                diag,
            );
            print!("{text}");
            if print {
                return ExitCode::SUCCESS;
            }
            match setup::write_if_changed(
                &issue,
                &console::issue_escape(&format!("{text}\n")),
                0o644,
            ) {
                Ok(true) => {
                    // Running agettys print the login screen again.
                    let _ = std::process::Command::new("agetty")
                        .arg("--reload")
                        .status();
                    ExitCode::SUCCESS
                }
                Ok(false) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "pcg-appliance console: cannot write {}: {e}",
                        issue.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
