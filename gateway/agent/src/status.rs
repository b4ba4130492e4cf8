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
    fn unpaired_says_what_to_do() {
        let mut s = sample();
        s.paired = false;
        s.tunnel.state = TunnelState::Unpaired;
        assert!(s.render().contains("pcgctl pair TOKEN"));
    }
}
