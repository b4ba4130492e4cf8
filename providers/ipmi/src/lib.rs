//! pcg-ipmi: the bare-metal driver for IPMI BMCs over LAN (v2.0 RMCP+ with cipher suite 17 or 3;
//! v1.5 MD5 only where a BMC offers nothing else).
//!
//! [`IpmiDriver`] implements [`pcg_provider::BareMetal`] on a session layer of our own
//! ([`session::Session`]: tokio UDP, retransmission, session reuse, Close Session on every path)
//! and the packet codec in [`packet`]. Chassis commands: Get Device ID, Get Chassis Status,
//! Chassis Control, Set/Get System Boot Options (parameter 5, boot flags). README.md says why this
//! is not built on ipmi-rs.

pub mod packet;
pub mod session;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pcg_provider::{
    async_trait, BareMetal, BmcEndpoint, BootDevice, BootMode, BootOverride, BootPersistence,
    Capabilities, MediaState, PowerAction, PowerState, ProviderError, Result,
};
use serde_json::json;
use tokio::sync::Mutex;

pub use packet::CipherSuite;
pub use session::{LanProtocol, Stats};
use session::{Reply, Session};

/// The one system behind an IPMI BMC.
pub const SYSTEM: &str = "chassis";
/// Default bound on one operation (all retransmissions and a session re-open included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default UDP port of RMCP.
pub const DEFAULT_PORT: u16 = 623;

const NETFN_CHASSIS: u8 = 0x00;
const NETFN_APP: u8 = 0x06;

/// An IPMI driver bound to one BMC, holding at most one session, reused by every operation.
pub struct IpmiDriver {
    endpoint: String,
    addr: SocketAddr,
    ep: BmcEndpoint,
    protocol: LanProtocol,
    idle_limit: Duration,
    cipher_suite: Option<CipherSuite>,
    session: Mutex<Option<Session>>,
    caps: std::sync::Mutex<Option<Capabilities>>,
}

impl std::fmt::Debug for IpmiDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpmiDriver")
            .field("endpoint", &self.endpoint)
            .field("user", &self.ep.user)
            .finish_non_exhaustive()
    }
}

/// Text for an IPMI completion code.
fn completion_text(cc: u8) -> &'static str {
    match cc {
        0xc0 => "node busy",
        0xc1 => "invalid command",
        0xc2 => "command invalid for given LUN",
        0xc3 => "timeout while processing command",
        0xc4 => "out of space",
        0xc5 => "reservation cancelled or invalid",
        0xc6 => "request data truncated",
        0xc7 => "request data length invalid",
        0xc8 => "request data field length limit exceeded",
        0xc9 => "parameter out of range",
        0xcc => "invalid data field in request",
        0xcd => "illegal command for sensor or record type",
        0xce => "response could not be provided",
        0xd4 => "insufficient privilege level",
        0xd5 => "command not supported in present state",
        0xff => "unspecified error",
        _ => "unknown completion code",
    }
}

fn device_selector(d: BootDevice) -> u8 {
    match d {
        BootDevice::None => 0x00,
        BootDevice::Pxe => 0x04,
        BootDevice::Disk => 0x08,
        BootDevice::Cd => 0x14,
        BootDevice::BiosSetup => 0x18,
    }
}

fn selector_device(b: u8) -> BootDevice {
    match (b >> 2) & 0x0f {
        0x1 => BootDevice::Pxe,
        0x2 | 0x3 => BootDevice::Disk,
        0x5 => BootDevice::Cd,
        0x6 => BootDevice::BiosSetup,
        _ => BootDevice::None,
    }
}

impl IpmiDriver {
    /// Creates a driver for `ep` (`host[:port]`, port 623 by default). Does no I/O.
    pub fn new(ep: &BmcEndpoint) -> Result<Self> {
        let raw = ep.address.trim();
        let with_port = if raw.parse::<SocketAddr>().is_ok()
            || raw
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok())
        {
            raw.to_owned()
        } else {
            format!("{raw}:{DEFAULT_PORT}")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| ProviderError::invalid("address", format!("{raw:?}: {e}")))?
            .next()
            .ok_or_else(|| {
                ProviderError::invalid("address", format!("{raw:?} resolves to nothing"))
            })?;
        Ok(Self {
            endpoint: format!("ipmi://{with_port}"),
            addr,
            ep: ep.clone(),
            protocol: LanProtocol::Auto,
            idle_limit: session::IDLE_REOPEN,
            cipher_suite: None,
            session: Mutex::new(None),
            caps: std::sync::Mutex::new(None),
        })
    }

    /// Uses `protocol` instead of asking the BMC (e.g. to force IPMI v1.5 on a BMC whose RMCP+
    /// is broken).
    pub fn with_protocol(mut self, protocol: LanProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Replaces a session that was idle for `limit` before its next use, instead of the
    /// default 30 s (for BMCs that expire idle sessions sooner).
    pub fn with_idle_limit(mut self, limit: Duration) -> Self {
        self.idle_limit = limit;
        self
    }

    /// Uses only RMCP+ cipher suite `suite`, instead of suite 17 with a fallback to 3 for BMCs
    /// that refuse it.
    pub fn with_cipher_suite(mut self, suite: CipherSuite) -> Self {
        self.cipher_suite = Some(suite);
        self
    }

    /// The RMCP+ cipher suite in use, once a session was opened.
    pub async fn cipher_suite(&self) -> Option<CipherSuite> {
        self.session
            .lock()
            .await
            .as_ref()
            .and_then(Session::cipher_suite)
    }

    /// The LAN protocol in use, once a session was opened.
    pub async fn protocol(&self) -> Option<LanProtocol> {
        self.session
            .lock()
            .await
            .as_ref()
            .and_then(Session::protocol)
    }

    /// A factory for the conformance suite and the gateway's registry.
    pub fn factory(ep: BmcEndpoint) -> Result<Box<dyn BareMetal>> {
        Ok(Box::new(Self::new(&ep)?))
    }

    /// Session counters (sessions opened/closed, retransmissions).
    pub async fn stats(&self) -> Stats {
        self.session
            .lock()
            .await
            .as_ref()
            .map(Session::stats)
            .unwrap_or_default()
    }

    /// Runs one IPMI command; a non-zero completion code is an error naming the command.
    pub async fn command(&self, netfn: u8, cmd: u8, data: &[u8], what: &str) -> Result<Vec<u8>> {
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            let bound = self.ep.timeout_or(DEFAULT_TIMEOUT);
            let mut s = Session::new(
                self.addr,
                &self.endpoint,
                &self.ep.user,
                self.ep.password.clone(),
                bound,
                self.protocol,
            )
            .await?;
            s.set_idle_limit(self.idle_limit);
            if let Some(suite) = self.cipher_suite {
                s.force_cipher_suite(suite);
            }
            *guard = Some(s);
        }
        let Some(session) = guard.as_mut() else {
            return Err(ProviderError::ProviderFault {
                endpoint: self.endpoint.clone(),
                message: "session slot vanished".into(),
            });
        };
        let Reply { completion, data } = session.command(netfn, cmd, data).await?;
        if completion == 0 {
            return Ok(data);
        }
        let detail = format!(
            "{what}: completion code {completion:#04x} ({})",
            completion_text(completion)
        );
        Err(match completion {
            0xd4 => ProviderError::Auth {
                component: pcg_provider::Component::Bmc,
                endpoint: self.endpoint.clone(),
                user: self.ep.user.clone(),
                detail,
            },
            // "Node busy" is not about sessions: only the BMC's own word on session slots
            // (RMCP+ status 0x01, Activate Session's 0x81) becomes NoSessionSlots.
            0xc1 => ProviderError::Unsupported {
                endpoint: self.endpoint.clone(),
                what: detail,
            },
            _ => ProviderError::ProviderFault {
                endpoint: self.endpoint.clone(),
                message: detail,
            },
        })
    }

    fn check_system(&self, system: &str) -> Result<()> {
        if system == SYSTEM {
            Ok(())
        } else {
            Err(ProviderError::NotFound {
                component: pcg_provider::Component::Bmc,
                endpoint: self.endpoint.clone(),
                what: format!("system {system:?} (an IPMI BMC has one system, {SYSTEM:?})"),
            })
        }
    }

    fn short(&self, what: &str, data: &[u8], need: usize) -> Result<()> {
        if data.len() < need {
            return Err(ProviderError::ProviderFault {
                endpoint: self.endpoint.clone(),
                message: format!(
                    "{what}: response has {} bytes, expected at least {need}",
                    data.len()
                ),
            });
        }
        Ok(())
    }

    async fn chassis_control(&self, code: u8, what: &str) -> Result<()> {
        tracing::debug!(endpoint = %self.endpoint, what, "chassis control");
        self.command(NETFN_CHASSIS, 0x02, &[code], what)
            .await
            .map(|_| ())
    }

    /// Get Device ID: (device id, firmware "maj.min", IPMI version, manufacturer id, product id).
    pub async fn device_id(&self) -> Result<serde_json::Value> {
        let d = self.command(NETFN_APP, 0x01, &[], "Get Device ID").await?;
        self.short("Get Device ID", &d, 11)?;
        Ok(json!({
            "device_id": d[0],
            "firmware": format!("{}.{:02x}", d[2] & 0x7f, d[3]),
            "ipmi_version": format!("{}.{}", d[4] & 0x0f, d[4] >> 4),
            "manufacturer_id": u32::from_le_bytes([d[6], d[7], d[8], 0]),
            "product_id": u16::from_le_bytes([d[9], d[10]]),
        }))
    }
}

#[async_trait]
impl BareMetal for IpmiDriver {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn enrol(&self) -> Result<Capabilities> {
        let dev = self.device_id().await?;
        self.power_state(SYSTEM).await?;
        let caps = Capabilities {
            protocol: "ipmi".into(),
            vendor: Some(format!("IANA {}", dev["manufacturer_id"])),
            model: Some(format!(
                "product {:#06x}",
                dev["product_id"].as_u64().unwrap_or(0)
            )),
            firmware: dev["firmware"].as_str().map(str::to_owned),
            systems: vec![SYSTEM.to_owned()],
            power_actions: PowerAction::ALL.to_vec(),
            boot_devices: vec![
                BootDevice::None,
                BootDevice::Pxe,
                BootDevice::Disk,
                BootDevice::Cd,
                BootDevice::BiosSetup,
            ],
            virtual_media: false,
            power_settle_ms: 15_000,
            details: json!({
                "transport": self.protocol().await.unwrap_or(LanProtocol::Auto).label(),
                "cipher_suite": match (self.protocol().await, self.cipher_suite().await) {
                    (Some(LanProtocol::Lanplus), Some(suite)) => json!(suite.id()),
                    _ => json!(null),
                },
                "device": dev,
                "timeout_ms": self.ep.timeout_or(DEFAULT_TIMEOUT).as_millis() as u64,
            }),
        };
        *self.caps.lock().unwrap_or_else(|p| p.into_inner()) = Some(caps.clone());
        Ok(caps)
    }

    fn capabilities(&self) -> Option<Capabilities> {
        self.caps.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn power_state(&self, system: &str) -> Result<PowerState> {
        self.check_system(system)?;
        let d = self
            .command(NETFN_CHASSIS, 0x01, &[], "Get Chassis Status")
            .await?;
        self.short("Get Chassis Status", &d, 1)?;
        Ok(if d[0] & 0x01 != 0 {
            PowerState::On
        } else {
            PowerState::Off
        })
    }

    async fn power(&self, system: &str, action: PowerAction) -> Result<()> {
        let now = self.power_state(system).await?;
        match (action, now) {
            (PowerAction::On, PowerState::On)
            | (PowerAction::Off | PowerAction::SoftShutdown, PowerState::Off) => Ok(()),
            (PowerAction::On | PowerAction::Cycle, _) if now == PowerState::Off => {
                self.chassis_control(0x01, "Chassis Control power up").await
            }
            (PowerAction::Off, _) => {
                self.chassis_control(0x00, "Chassis Control power down")
                    .await
            }
            (PowerAction::Cycle, _) => {
                self.chassis_control(0x02, "Chassis Control power cycle")
                    .await
            }
            (PowerAction::Reset, _) => {
                self.chassis_control(0x03, "Chassis Control hard reset")
                    .await
            }
            (PowerAction::SoftShutdown, _) => {
                self.chassis_control(0x05, "Chassis Control soft shutdown")
                    .await
            }
            (PowerAction::On, _) => self.chassis_control(0x01, "Chassis Control power up").await,
        }
    }

    async fn set_boot_override(&self, system: &str, boot: &BootOverride) -> Result<()> {
        self.check_system(system)?;
        let mut flags = 0x80; // valid
        if boot.persistence == BootPersistence::Continuous {
            flags |= 0x40;
        }
        if boot.mode == Some(BootMode::Uefi) {
            flags |= 0x20;
        }
        let data = [0x05, flags, device_selector(boot.device), 0, 0, 0];
        self.command(
            NETFN_CHASSIS,
            0x08,
            &data,
            "Set System Boot Options (boot flags)",
        )
        .await
        .map(|_| ())
    }

    async fn boot_override(&self, system: &str) -> Result<BootOverride> {
        self.check_system(system)?;
        let d = self
            .command(
                NETFN_CHASSIS,
                0x09,
                &[0x05, 0, 0],
                "Get System Boot Options (boot flags)",
            )
            .await?;
        self.short("Get System Boot Options", &d, 4)?;
        // d[0] version, d[1] parameter, d[2..] the five boot flag bytes. The device selector is
        // reported even when the BMC leaves the valid bit clear (ipmi_sim never sets it).
        let flags = d[2];
        Ok(BootOverride {
            device: selector_device(d[3]),
            persistence: if flags & 0x40 != 0 {
                BootPersistence::Continuous
            } else {
                BootPersistence::Once
            },
            mode: Some(if flags & 0x20 != 0 {
                BootMode::Uefi
            } else {
                BootMode::Legacy
            }),
        })
    }

    async fn insert_media(&self, _system: &str, _image_url: &str) -> Result<()> {
        Err(ProviderError::Unsupported {
            endpoint: self.endpoint.clone(),
            what: "virtual media (IPMI has none; use Redfish or PXE)".into(),
        })
    }

    async fn eject_media(&self, system: &str) -> Result<()> {
        self.insert_media(system, "").await
    }

    async fn media_state(&self, system: &str) -> Result<Option<MediaState>> {
        self.check_system(system)?;
        Ok(None)
    }

    async fn close(&self) -> Result<()> {
        if let Some(s) = self.session.lock().await.as_mut() {
            s.close_now().await;
        }
        Ok(())
    }
}
