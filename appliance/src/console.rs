//! The console: what the login screen (`/etc/issue.d/pcg.issue`) and the SSH banner
//! (`update-motd.d`) show, so that an operator at the vSphere console sees the gateway id, the
//! tunnel state, the IP addresses, the first-boot outcome and what to run next.

use std::process::{Command, Stdio};

use serde_json::Value;

/// The gateway's state as `pcgctl status --json` reports it, or why it could not be read. Its
/// exit status tells the state too (0 connected, 2 not paired, 3 down, 4 revoked): each of those
/// printed the report; 1 (or anything else) is pcgctl failing.
pub fn gateway_status(pcgctl: &std::path::Path, config: &std::path::Path) -> Result<Value, String> {
    let out = Command::new(pcgctl)
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", pcgctl.display()))?;
    if !matches!(out.status.code(), Some(0 | 2 | 3 | 4)) {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(if err.is_empty() {
            format!("pcgctl status exited with {}", out.status)
        } else {
            err
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("pcgctl status --json: {e}"))
}

/// The gateway service as systemd sees it: `active (running), 0 restarts`. `activating` means
/// it has not reported ready; a growing restart count, that it keeps failing.
pub fn service_state(unit: &str) -> Option<String> {
    let out = Command::new("systemctl")
        .args(["show", "--property=ActiveState,SubState,NRestarts", unit])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some(format!(
        "{} ({}), {} restarts",
        get("ActiveState")?,
        get("SubState")?,
        get("NRestarts").unwrap_or_else(|| "?".into())
    ))
}

/// Global addresses per interface (`ip -brief address`), loopback left out.
pub fn addresses() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-brief", "address", "show", "scope", "global"])
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            let _state = f.next()?;
            // Addresses only (`ip` may add words such as `metric 1024`).
            let addrs: Vec<&str> = f.filter(|w| w.contains('/')).collect();
            (!addrs.is_empty() && name != "lo").then(|| format!("{name} {}", addrs.join(" ")))
        })
        .collect()
}

/// The console text. `status` is `pcgctl status --json` (or why it failed); `diag` says
/// whether this pcgctl has a `diag` command to suggest.
pub fn render(
    hostname: &str,
    addrs: &[String],
    service: Option<&str>,
    status: &Result<Value, String>,
    diag: bool,
) -> String {
    let mut out = format!("pcg gateway appliance {hostname}\n");
    let mut line = |k: &str, v: &str| out.push_str(&format!("  {k:<12} {v}\n"));
    line(
        "addresses:",
        &if addrs.is_empty() {
            "none yet (no DHCP lease or static address)".to_string()
        } else {
            addrs.join(", ")
        },
    );
    if let Some(s) = service {
        line("service:", &format!("pcg-gateway {s}"));
    }
    match status {
        Err(e) => line("gateway:", &format!("status unavailable: {e}")),
        Ok(s) => {
            let gw = s["gateway_id"].as_str();
            line(
                "gateway:",
                &match gw {
                    Some(id) => format!("{id} (tenant {})", s["tenant_id"].as_str().unwrap_or("?")),
                    None => "not paired".to_string(),
                },
            );
            let t = &s["tunnel"];
            let state = t["state"].as_str().unwrap_or("unknown");
            let tunnel = match state {
                "connected" => format!(
                    "connected to {}",
                    t["broker_endpoint"].as_str().unwrap_or("the broker")
                ),
                "unpaired" => "down (not paired)".to_string(),
                "revoked" => "refused: this gateway was revoked; pair it again".to_string(),
                other => format!(
                    "{other}{}",
                    t["last_error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
            };
            line("tunnel:", &tunnel);
            if let Some(fb) = s.get("firstboot").filter(|v| !v.is_null()) {
                let msg = fb["message"].as_str().unwrap_or("");
                if fb["ok"].as_bool().unwrap_or(false) {
                    line("first boot:", &format!("ok: {msg}"));
                } else {
                    line("first boot:", &format!("ERROR: {msg}"));
                    if let Some(a) = fb["action"].as_str() {
                        line("to fix:", a);
                    }
                }
            }
        }
    }
    line(
        "next:",
        &format!(
            "log in (root, with the SSH key given at deployment) and run `pcgctl status`{}",
            if diag { " or `pcgctl diag`" } else { "" }
        ),
    );
    out
}

/// agetty expands backslash escapes in issue files: keep ours literal.
pub fn issue_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shows_gateway_tunnel_addresses_and_next_step() {
        let s = Ok(json!({
            "paired": true, "gateway_id": "gw_1", "tenant_id": "tn_1",
            "tunnel": {"state": "connected", "broker_endpoint": "https://saas:8444"},
            "firstboot": {"ok": true, "message": "paired: gateway gw_1 of tenant tn_1", "at_ms": 1}
        }));
        let out = render(
            "gw-7",
            &["ens192 192.0.2.10/24".into()],
            Some("active (running), 0 restarts"),
            &s,
            false,
        );
        assert_eq!(
            out,
            "pcg gateway appliance gw-7
  addresses:   ens192 192.0.2.10/24
  service:     pcg-gateway active (running), 0 restarts
  gateway:     gw_1 (tenant tn_1)
  tunnel:      connected to https://saas:8444
  first boot:  ok: paired: gateway gw_1 of tenant tn_1
  next:        log in (root, with the SSH key given at deployment) and run `pcgctl status`
"
        );
    }

    #[test]
    fn shows_the_first_boot_error_and_the_fix() {
        let s = Ok(json!({
            "paired": false, "gateway_id": null,
            "tunnel": {"state": "unpaired"},
            "firstboot": {"ok": false, "message": "property pcg.pairing_token: malformed pairing token", "action": "set a new token", "at_ms": 1}
        }));
        let out = render("pcg-gateway", &[], None, &s, true);
        assert!(out.contains("  gateway:     not paired\n"), "{out}");
        assert!(
            out.contains(
                "  first boot:  ERROR: property pcg.pairing_token: malformed pairing token\n"
            ),
            "{out}"
        );
        assert!(out.contains("  to fix:      set a new token\n"), "{out}");
        assert!(out.contains("`pcgctl diag`"), "{out}");
        let down = render(
            "h",
            &[],
            None,
            &Err("the gateway daemon is not running".into()),
            false,
        );
        assert!(
            down.contains("status unavailable: the gateway daemon is not running"),
            "{down}"
        );
    }

    /// pcgctl's own exit statuses for the gateway's state (2: not paired) still carry the
    /// report; a pcgctl that failed (1) is an error with its message.
    #[test]
    fn status_exit_codes_carry_the_report() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("pcg-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let fake = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            p
        };
        let unpaired = fake("unpaired", "echo '{\"paired\": false}'; exit 2");
        let failed = fake("failed", "echo 'error: cannot open the store' >&2; exit 1");
        let cfg = dir.join("gateway.toml");
        let v = gateway_status(&unpaired, &cfg).expect("exit 2 is a report");
        assert_eq!(v["paired"], false);
        let e = gateway_status(&failed, &cfg).expect_err("exit 1 is a failure");
        assert_eq!(e, "error: cannot open the store");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backslashes_stay_literal_for_agetty() {
        assert_eq!(issue_escape("a\\4b"), "a\\\\4b");
    }
}
