//! The shared vocabulary of providers: credentials, power states and actions, boot overrides,
//! virtual media, capability profiles, task progress and machine specs.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ProviderError, Result};

/// A secret (a password): never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("writeOnly" = true), description = "A secret. The SaaS seals it to the gateway's key before anything is stored and shows it as `<redacted>`.")
)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; call only where it is sent to the endpoint.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// How to trust an HTTPS endpoint. Verification is never switched off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum TlsTrust {
    /// Verify the chain and host name against this CA (PEM, one or more certificates).
    CaPem(String),
    /// Accept exactly the server certificate whose DER encoding has this SHA-256 (hex, colons
    /// allowed), whatever its issuer or name: for BMCs with self-signed certificates.
    PinSha256(
        #[cfg_attr(
            feature = "schema",
            schemars(regex(pattern = r"^[\s:]*(?:[0-9A-Fa-f][\s:]*){64}$"))
        )]
        String,
    ),
}

/// Where a BMC is and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BmcEndpoint {
    /// `host[:port]` for IPMI; `https://host[:port]` for Redfish.
    pub address: String,
    pub user: String,
    pub password: Secret,
    /// TLS trust for HTTPS endpoints (required for `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsTrust>,
    /// Bound on one request including retries, in milliseconds (driver default if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl BmcEndpoint {
    pub fn new(
        address: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            address: address.into(),
            user: user.into(),
            password: Secret::new(password.into()),
            tls: None,
            timeout_ms: None,
        }
    }

    /// The request bound, or `default` when none is configured.
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(default)
    }
}

/// The power state of a machine as its BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    On,
    Off,
    PoweringOn,
    PoweringOff,
    Unknown,
}

/// A power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PowerAction {
    /// Power on; a no-op when already on.
    On,
    /// Hard power off; a no-op when already off.
    Off,
    /// Ask the OS to shut down (ACPI); the machine may stay on if the OS ignores it.
    SoftShutdown,
    /// Power off then on (from off: power on).
    Cycle,
    /// Hard reset (warm, power stays on).
    Reset,
}

impl PowerAction {
    pub const ALL: [PowerAction; 5] = [
        Self::On,
        Self::Off,
        Self::SoftShutdown,
        Self::Cycle,
        Self::Reset,
    ];

    /// The power state this action leads to, where it is determined.
    pub fn target(self) -> Option<PowerState> {
        match self {
            Self::On | Self::Cycle | Self::Reset => Some(PowerState::On),
            Self::Off => Some(PowerState::Off),
            Self::SoftShutdown => None,
        }
    }
}

/// A boot device for the override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum BootDevice {
    /// No override: the machine boots by its own order.
    None,
    Pxe,
    Disk,
    /// CD/DVD, including virtual media.
    Cd,
    /// Enter the BIOS/UEFI setup.
    BiosSetup,
}

/// How long a boot override lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum BootPersistence {
    /// Next boot only.
    #[default]
    Once,
    /// Every boot until changed.
    Continuous,
}

/// Firmware boot mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum BootMode {
    Legacy,
    Uefi,
}

/// A boot override: device, persistence and (optionally) firmware mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootOverride {
    pub device: BootDevice,
    #[serde(default)]
    pub persistence: BootPersistence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BootMode>,
}

impl BootOverride {
    /// No override.
    pub const NONE: BootOverride = BootOverride {
        device: BootDevice::None,
        persistence: BootPersistence::Once,
        mode: None,
    };

    pub fn once(device: BootDevice) -> Self {
        Self {
            device,
            persistence: BootPersistence::Once,
            mode: None,
        }
    }
}

/// The state of a virtual media slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaState {
    /// Whether an image is inserted.
    pub inserted: bool,
    /// The image URL, when inserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// What a BMC offers, recorded at enrolment and used to pick behaviour and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `ipmi` or `redfish`.
    pub protocol: String,
    /// Manufacturer/model/firmware as the BMC states them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// Ids of the systems (machines) behind this BMC; the first is the default.
    pub systems: Vec<String>,
    /// Power actions the BMC accepts.
    pub power_actions: Vec<PowerAction>,
    /// Boot devices the override accepts.
    pub boot_devices: Vec<BootDevice>,
    /// Whether virtual media insert/eject is offered.
    pub virtual_media: bool,
    /// How long after a power request the state may take to settle (e.g. 15 s on some BMCs).
    pub power_settle_ms: u64,
    /// Protocol-specific facts (where virtual media lives, how reset answers, session support...).
    #[serde(default)]
    pub details: serde_json::Value,
}

impl Capabilities {
    /// The default system id.
    pub fn default_system(&self) -> Option<&str> {
        self.systems.first().map(String::as_str)
    }
}

/// The state of a long-running operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// Progress of a long-running operation (a provider task, a provision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub state: TaskState,
    /// Percent complete, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// A short human-readable step description.
    pub message: String,
}

impl TaskProgress {
    pub fn running(percent: u8, message: impl Into<String>) -> Self {
        Self {
            state: TaskState::Running,
            percent: Some(percent),
            message: message.into(),
        }
    }
}

/// Receives progress reports of a long-running operation.
pub type ProgressSink<'a> = &'a (dyn Fn(&TaskProgress) + Send + Sync);

/// A progress sink that discards reports.
pub fn no_progress(_: &TaskProgress) {}

/// What to boot a bare-metal machine from when provisioning it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum BootSource {
    /// Network boot (PXE/iPXE, served by the site's DHCP/TFTP).
    Pxe,
    /// Boot a virtual-media ISO that the BMC fetches from this URL.
    VirtualMedia {
        /// `http://` or `https://` URL the BMC downloads the ISO from.
        #[cfg_attr(feature = "schema", schemars(regex(pattern = "^https?://")))]
        image_url: String,
    },
}

/// Provider-specific placement of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "provider", deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Placement {
    /// A physical server behind a BMC enrolled under `bmc`.
    BareMetal {
        /// The name the BMC was enrolled under.
        #[cfg_attr(feature = "schema", schemars(regex(pattern = r"\S")))]
        bmc: String,
        /// System id behind the BMC; the BMC's default system when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system: Option<String>,
        boot: BootSource,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_mode: Option<BootMode>,
    },
}

/// A machine to provision: common fields plus provider-specific placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineSpec {
    /// The machine's name (not blank).
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"\S")))]
    pub name: String,
    /// vCPUs wanted (informational for bare metal: the hardware is what it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Network names to attach (informational for bare metal).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Cloud-init/ignition user data handed to the installer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    pub placement: Placement,
}

impl MachineSpec {
    /// Checks the fields every provider needs.
    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(ProviderError::invalid("name", "must not be empty"));
        }
        match &self.placement {
            Placement::BareMetal { bmc, boot, .. } => {
                if bmc.trim().is_empty() {
                    return Err(ProviderError::invalid(
                        "placement.bmc",
                        "must name an enrolled BMC",
                    ));
                }
                if let BootSource::VirtualMedia { image_url } = boot {
                    if !(image_url.starts_with("http://") || image_url.starts_with("https://")) {
                        return Err(ProviderError::invalid(
                            "placement.boot.virtual_media.image_url",
                            format!("{image_url:?} is not an http(s) URL"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a bare-metal provision asks of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    pub boot: BootSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<BootMode>,
    /// Bound on waiting for the machine to reach power on after the cycle, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_timeout_ms: Option<u64>,
}

/// The observed state of a bare-metal machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    pub system: String,
    pub power: PowerState,
    pub boot: BootOverride,
    /// Virtual media state, where the BMC offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted() {
        let ep = BmcEndpoint::new("10.0.0.1", "admin", "hunter2");
        let s = format!("{ep:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("admin"));
    }

    #[test]
    fn spec_round_trip_and_validation() {
        let json = r#"{"name":"n1","placement":{"provider":"bare_metal","bmc":"rack1-bmc3",
            "boot":{"virtual_media":{"image_url":"http://10.0.0.2/install.iso"}}}}"#;
        let spec: MachineSpec = serde_json::from_str(json).expect("valid spec");
        spec.validate().expect("valid");
        // A misspelt placement key is refused, not silently ignored.
        let typo = r#"{"name":"n1","placement":{"provider":"bare_metal","bmc":"b","boot":"pxe",
            "boot_mod":"uefi"}}"#;
        let err = serde_json::from_str::<MachineSpec>(typo).expect_err("unknown key");
        assert!(err.to_string().contains("boot_mod"), "{err}");
        let bad = MachineSpec {
            placement: Placement::BareMetal {
                bmc: "b".into(),
                system: None,
                boot: BootSource::VirtualMedia {
                    image_url: "file:///x".into(),
                },
                boot_mode: None,
            },
            ..spec
        };
        let err = bad.validate().expect_err("file URL refused");
        assert!(err.to_string().contains("image_url"), "{err}");
    }
}
