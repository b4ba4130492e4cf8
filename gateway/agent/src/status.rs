//! What `pcgctl status` shows: pairing, tunnel, certificate, journal and outbox.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    /// No identity yet: `pcgctl pair TOKEN`.
    Unpaired,
    Connecting,
    Connected,
    /// Waiting before the next dial.
    Backoff,
    /// The SaaS revoked this gateway; pair again.
    Revoked,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub state: TunnelState,
    /// The identity the tunnel speaks for (the stored one once it has followed a re-pairing).
    #[serde(default)]
    pub gateway_id: Option<String>,
    pub broker_endpoint: Option<String>,
    pub connected_since_ms: Option<i64>,
    pub last_heartbeat_ms: Option<i64>,
    pub rtt_ms: Option<u64>,
    /// Heartbeat interval the broker announced for the current tunnel.
    #[serde(default)]
    pub heartbeat_interval_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Tunnels established since start.
    pub connects: u64,
    pub next_attempt_ms: Option<i64>,
    /// The transport of the tunnel (or of the next dial).
    #[serde(default)]
    pub transport: Option<crate::transport::Transport>,
    /// Why the tunnel is on the WebSocket transport.
    #[serde(default)]
    pub transport_reason: Option<String>,
    /// The proxy the tunnel goes through (password never shown).
    #[serde(default)]
    pub proxy: Option<String>,
    /// When the tunnel last went down (Unix ms).
    #[serde(default)]
    pub down_since_ms: Option<i64>,
}

impl Default for TunnelStatus {
    fn default() -> Self {
        TunnelStatus {
            state: TunnelState::Unpaired,
            gateway_id: None,
            broker_endpoint: None,
            connected_since_ms: None,
            last_heartbeat_ms: None,
            rtt_ms: None,
            heartbeat_interval_ms: None,
            last_error: None,
            connects: 0,
            next_attempt_ms: None,
            transport: None,
            transport_reason: None,
            proxy: None,
            down_since_ms: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub paired: bool,
    pub tenant_id: Option<String>,
    pub gateway_id: Option<String>,
    pub api_url: Option<String>,
    pub tunnel: TunnelStatus,
    pub certificate_not_after_ms: Option<i64>,
    /// SHA-256 of this gateway's certificate: what the SaaS shows for its tunnel.
    #[serde(default)]
    pub certificate_sha256: Option<String>,
    pub journal_entries: usize,
    pub running: usize,
    pub outbox_depth: usize,
    pub uptime_s: u64,
    pub clock_unix_ms: i64,
    pub command_kinds: Vec<String>,
    /// What the appliance's first boot recorded (`<data_dir>/firstboot.json`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firstboot: Option<FirstBoot>,
}

/// The outcome of the appliance's first-boot configuration (`pcg-appliance firstboot`), which
/// writes it to `<data_dir>/firstboot.json` at every boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstBoot {
    /// False when a setting could not be applied or pairing failed.
    pub ok: bool,
    /// What happened, or what failed and why.
    pub message: String,
    /// What the operator should do about a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Where the settings came from (`ovf-env iso`, `vmware guestinfo`, `nocloud`, a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When it was recorded (Unix milliseconds).
    pub at_ms: i64,
    /// One line per configuration step (network, DNS, NTP, proxy, SSH key, pairing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
}

/// The name of the first-boot record in the gateway's data directory.
pub const FIRSTBOOT_FILE: &str = "firstboot.json";

/// Reads `<data_dir>/firstboot.json`; `None` when absent. A record that cannot be read is
/// reported as a failed first boot, so that the problem is visible rather than hidden.
pub fn read_firstboot(data_dir: &std::path::Path) -> Option<FirstBoot> {
    let path = data_dir.join(FIRSTBOOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(FirstBoot {
                ok: false,
                message: format!("cannot read {}: {e}", path.display()),
                action: None,
                source: None,
                at_ms: 0,
                steps: Vec::new(),
            })
        }
    };
    Some(
        serde_json::from_slice(&bytes).unwrap_or_else(|e| FirstBoot {
            ok: false,
            message: format!("{} is not a first-boot record: {e}", path.display()),
            action: None,
            source: None,
            at_ms: 0,
            steps: Vec::new(),
        }),
    )
}

/// SHA-256 (hex) of the first certificate of a PEM string.
pub fn pem_sha256(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject as _;
    use sha2::Digest as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| hex::encode(sha2::Sha256::digest(c.as_ref())))
}

/// RFC 3339 UTC for Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.replace_nanosecond(0)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn ago(now: i64, then: i64) -> String {
    let s = (now - then) / 1000;
    if s < 0 {
        format!("in {}", human_secs(-s))
    } else {
        format!("{} ago", human_secs(s))
    }
}

fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

impl Status {
    /// The human rendering used by `pcgctl status`.
    pub fn render(&self) -> String {
        let now = self.clock_unix_ms;
        let mut out = format!("pcg gateway {}\n", self.version);
        let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<13} {v}\n"));
        if !self.paired {
            line(
                "paired:",
                "no — run `pcgctl pair TOKEN` with a token from your SaaS tenant".into(),
            );
        } else {
            line(
                "paired:",
                format!(
                    "yes — tenant {}, gateway {}",
                    self.tenant_id.as_deref().unwrap_or("?"),
                    self.gateway_id.as_deref().unwrap_or("?")
                ),
            );
            line("SaaS:", self.api_url.clone().unwrap_or_default());
        }
        let t = &self.tunnel;
        let ep = t.broker_endpoint.clone().unwrap_or_else(|| "-".into());
        let state = match t.state {
            TunnelState::Unpaired => "down (not paired)".to_string(),
            TunnelState::Connecting => format!("connecting to {ep}"),
            TunnelState::Connected => format!(
                "connected to {ep}{}{}",
                t.connected_since_ms
                    .map(|s| format!(" since {} ({})", rfc3339(s), ago(now, s)))
                    .unwrap_or_default(),
                t.rtt_ms
                    .map(|r| format!(", rtt {r} ms"))
                    .unwrap_or_default()
            ),
            TunnelState::Backoff => format!(
                "down, redialling {ep}{}",
                t.next_attempt_ms
                    .map(|n| format!(" {}", ago(now, n)))
                    .unwrap_or_default()
            ),
            TunnelState::Revoked => {
                "refused: this gateway was revoked; pair again with a new token".to_string()
            }
            TunnelState::Stopped => "stopped".to_string(),
        };
        line("tunnel:", state);
        if let Some(tr) = t.transport {
            let via = t
                .proxy
                .as_deref()
                .map(|p| format!(" through the proxy {p}"))
                .unwrap_or_default();
            let why = t
                .transport_reason
                .as_deref()
                .map(|r| format!(" — because {r}"))
                .unwrap_or_default();
            let name = match tr {
                crate::transport::Transport::Direct => "direct (TLS and HTTP/2)",
                crate::transport::Transport::Websocket => "WebSocket (TLS inside wss://)",
            };
            line("transport:", format!("{name}{via}{why}"));
        }
        if let Some(e) = &t.last_error {
            line("last error:", e.clone());
        }
        line(
            "heartbeat:",
            t.last_heartbeat_ms
                .map(|h| format!("{} ({})", rfc3339(h), ago(now, h)))
                .unwrap_or_else(|| "none yet".into()),
        );
        line(
            "certificate:",
            self.certificate_not_after_ms
                .map(|c| {
                    let warn = if c - now < 7 * 86_400_000 {
                        " — renew soon"
                    } else {
                        ""
                    };
                    format!("expires {} ({}){warn}", rfc3339(c), ago(now, c))
                })
                .unwrap_or_else(|| "none".into()),
        );
        line(
            "journal:",
            format!("{} entries, {} running", self.journal_entries, self.running),
        );
        line(
            "outbox:",
            format!("{} results awaiting acknowledgement", self.outbox_depth),
        );
        line(
            "uptime:",
            human_secs(i64::try_from(self.uptime_s).unwrap_or(i64::MAX)),
        );
        if let Some(fb) = &self.firstboot {
            let when = if fb.at_ms > 0 {
                format!(" ({})", rfc3339(fb.at_ms))
            } else {
                String::new()
            };
            if fb.ok {
                line("first boot:", format!("ok{when}: {}", fb.message));
            } else {
                line("first boot:", format!("FAILED{when}: {}", fb.message));
                if let Some(a) = &fb.action {
                    line("what to do:", a.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            version: "0.1.0".into(),
            paired: true,
            tenant_id: Some("tn_1".into()),
            gateway_id: Some("gw_2".into()),
            api_url: Some("https://saas.example:8443".into()),
            tunnel: TunnelStatus {
                state: TunnelState::Connected,
                gateway_id: Some("gw_2".into()),
                broker_endpoint: Some("https://saas.example:8444".into()),
                connected_since_ms: Some(1_800_000_000_000 - 90_000),
                last_heartbeat_ms: Some(1_800_000_000_000 - 2_000),
                rtt_ms: Some(3),
                heartbeat_interval_ms: Some(10_000),
                last_error: None,
                connects: 1,
                next_attempt_ms: None,
                transport: Some(crate::transport::Transport::Direct),
                transport_reason: None,
                proxy: None,
                down_since_ms: None,
            },
            certificate_not_after_ms: Some(1_800_000_000_000 + 29 * 86_400_000),
            certificate_sha256: None,
            journal_entries: 12,
            running: 1,
            outbox_depth: 0,
            uptime_s: 95,
            clock_unix_ms: 1_800_000_000_000,
            command_kinds: vec!["gateway.diagnose".into()],
            firstboot: None,
        }
    }

    #[test]
    fn human_output_matches_golden() {
        let golden = "pcg gateway 0.1.0
  paired:       yes — tenant tn_1, gateway gw_2
  SaaS:         https://saas.example:8443
  tunnel:       connected to https://saas.example:8444 since 2027-01-15T07:58:30Z (90 s ago), rtt 3 ms
  transport:    direct (TLS and HTTP/2)
  heartbeat:    2027-01-15T07:59:58Z (2 s ago)
  certificate:  expires 2027-02-13T08:00:00Z (in 29 days)
  journal:      12 entries, 1 running
  outbox:       0 results awaiting acknowledgement
  uptime:       95 s
";
        assert_eq!(sample().render(), golden);
    }

    #[test]
    fn failed_first_boot_says_what_to_do() {
        let mut s = sample();
        s.paired = false;
        s.tunnel.state = TunnelState::Unpaired;
        s.firstboot = Some(FirstBoot {
            ok: false,
            message: "the pcg.pairing_token property is not a pairing token".into(),
            action: Some("set the property to a token from your tenant and power-cycle".into()),
            source: Some("ovf-env iso".into()),
            at_ms: 1_800_000_000_000,
            steps: vec![],
        });
        let out = s.render();
        assert!(
            out.contains("  first boot:   FAILED (2027-01-15T08:00:00Z): the pcg.pairing_token property is not a pairing token\n")
                && out.contains("  what to do:   set the property to a token from your tenant and power-cycle\n"),
            "{out}"
        );
        s.firstboot = Some(FirstBoot {
            ok: true,
            message: "paired as gw_2".into(),
            action: None,
            source: None,
            at_ms: 0,
            steps: vec![],
        });
        assert!(s.render().contains("  first boot:   ok: paired as gw_2\n"));
    }

    #[test]
    fn firstboot_record_is_read_or_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_firstboot(dir.path()), None);
        std::fs::write(dir.path().join(FIRSTBOOT_FILE), "{not json").expect("write");
        let fb = read_firstboot(dir.path()).expect("a record");
        assert!(!fb.ok && fb.message.contains("firstboot.json"), "{fb:?}");
        let rec = FirstBoot {
            ok: true,
            message: "paired".into(),
            action: None,
            source: Some("nocloud".into()),
            at_ms: 5,
            steps: vec!["network: dhcp".into()],
        };
        std::fs::write(
            dir.path().join(FIRSTBOOT_FILE),
            serde_json::to_vec(&rec).expect("json"),
        )
        .expect("write");
        assert_eq!(read_firstboot(dir.path()), Some(rec));
    }

    #[test]
    fn unpaired_says_what_to_do() {
        let mut s = sample();
        s.paired = false;
        s.tunnel.state = TunnelState::Unpaired;
        assert!(s.render().contains("pcgctl pair TOKEN"));
    }
}
