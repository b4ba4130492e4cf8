//! Command payloads (`baremetal.*`) as the gateway receives them, and one function that executes
//! a parsed command against a driver, so the gateway's executor needs only a few lines:
//!
//! ```ignore
//! let bare_metal = Arc::new(
//!     BareMetalService::new()
//!         .with_factory(Protocol::Ipmi, pcg_ipmi::IpmiDriver::factory)
//!         .with_factory(Protocol::Redfish, pcg_redfish::RedfishDriver::factory),
//! );
//! for kind in KINDS {
//!     let bm = bare_metal.clone();
//!     registry.register(kind, move |_ctx, payload| {
//!         let bm = bm.clone();
//!         async move { bm.handle(kind, payload).await }   // map ProviderError as the executor wants
//!     });
//! }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::baremetal::{BareMetal, DEFAULT_POWER_WAIT};
use crate::error::{ProviderError, Result};
use crate::types::{
    no_progress, BmcEndpoint, BootDevice, BootMode, BootOverride, BootPersistence, Capabilities,
    MachineSpec, MediaState, Placement, PowerAction, PowerState, ProgressSink, ProvisionRequest,
};

pub const ENROL: &str = "baremetal.enrol";
pub const POWER: &str = "baremetal.power";
pub const BOOT: &str = "baremetal.boot";
pub const INSERT_MEDIA: &str = "baremetal.insert_media";
pub const EJECT_MEDIA: &str = "baremetal.eject_media";
pub const PROVISION: &str = "baremetal.provision";
pub const DEPROVISION: &str = "baremetal.deprovision";
pub const GET: &str = "baremetal.get";

/// Every command kind this module parses.
pub const KINDS: [&str; 8] = [
    ENROL,
    POWER,
    BOOT,
    INSERT_MEDIA,
    EJECT_MEDIA,
    PROVISION,
    DEPROVISION,
    GET,
];

/// Which driver speaks to a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Protocol {
    Ipmi,
    Redfish,
}

/// `baremetal.enrol`: check credentials, discover, record capabilities under `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnrolCommand {
    /// The name later commands give as `bmc`.
    pub name: String,
    pub protocol: Protocol,
    pub endpoint: BmcEndpoint,
}

/// What `baremetal.power` is asked to do: a power action, or only to read the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PowerRequest {
    On,
    Off,
    SoftShutdown,
    Cycle,
    Reset,
    /// Read the power state; nothing is changed.
    Status,
}

impl PowerRequest {
    /// The power action, or None for `Status`.
    pub fn action(self) -> Option<PowerAction> {
        Some(match self {
            Self::On => PowerAction::On,
            Self::Off => PowerAction::Off,
            Self::SoftShutdown => PowerAction::SoftShutdown,
            Self::Cycle => PowerAction::Cycle,
            Self::Reset => PowerAction::Reset,
            Self::Status => return None,
        })
    }
}

fn yes() -> bool {
    true
}

/// `baremetal.power`: one power action (or `status`). By default it waits until the machine
/// reaches the action's state (BMCs apply a change seconds after accepting it), so the result
/// is the state after the change; `wait: false` returns as soon as the BMC accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PowerCommand {
    /// The name the BMC was enrolled under (`baremetal.enrol`).
    pub bmc: String,
    /// The system behind the BMC; absent: the first one found at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub action: PowerRequest,
    /// Wait until the machine reaches the action's state (`status` never waits).
    #[serde(default = "yes")]
    pub wait: bool,
    /// Bound on that wait, in milliseconds (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `baremetal.boot`: set the boot override (no power change) and read it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BootCommand {
    /// The name the BMC was enrolled under (`baremetal.enrol`).
    pub bmc: String,
    /// The system behind the BMC; absent: the first one found at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `none` clears the override.
    pub device: BootDevice,
    #[serde(default)]
    pub persistence: BootPersistence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BootMode>,
}

/// `baremetal.insert_media`: insert a virtual-media image (CD/DVD) fetched by the BMC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InsertMediaCommand {
    /// The name the BMC was enrolled under (`baremetal.enrol`).
    pub bmc: String,
    /// The system behind the BMC; absent: the first one found at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `http://` or `https://` URL the BMC downloads the image from.
    #[cfg_attr(feature = "schema", schemars(regex(pattern = "^https?://")))]
    pub image_url: String,
}

/// `baremetal.eject_media`: eject the virtual-media image (a no-op when none is inserted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EjectMediaCommand {
    /// The name the BMC was enrolled under (`baremetal.enrol`).
    pub bmc: String,
    /// The system behind the BMC; absent: the first one found at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// `baremetal.provision`: a machine spec whose placement is `bare_metal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProvisionCommand {
    pub spec: MachineSpec,
    /// Bound on waiting for the power change, in milliseconds (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_timeout_ms: Option<u64>,
}

/// `baremetal.deprovision`: power off and clear overrides/media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeprovisionCommand {
    /// The name the BMC was enrolled under (`baremetal.enrol`).
    pub bmc: String,
    /// The system behind the BMC; absent: the first one found at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Bound on waiting for the power change, in milliseconds (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_timeout_ms: Option<u64>,
}

/// `baremetal.get`: observed state of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GetCommand {
    /// The name the BMC was enrolled under (`baremetal.enrol`).
    pub bmc: String,
    /// The system behind the BMC; absent: the first one found at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// Result of `baremetal.enrol`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolResult {
    pub name: String,
    pub capabilities: Capabilities,
}

/// Result of `baremetal.power`: the state after the change (with `wait`), and the state read
/// before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerResult {
    pub system: String,
    pub state: PowerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PowerState>,
}

/// Result of `baremetal.boot`: the override as the BMC reads it back (a BMC may keep less than
/// it was given, e.g. only the device), and the power state, which the command does not touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootResult {
    pub system: String,
    pub boot: BootOverride,
    pub power: PowerState,
}

/// Result of `baremetal.insert_media` and `baremetal.eject_media`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaResult {
    pub system: String,
    pub media: MediaState,
    pub power: PowerState,
}

/// The JSON Schema of the payload of `kind`, from the types [`BareMetalCommand::parse_value`]
/// decodes it into (named types go to `gen`'s definitions); None for a kind that is not a
/// bare-metal command.
#[cfg(feature = "schema")]
pub fn payload_schema(kind: &str, gen: &mut schemars::SchemaGenerator) -> Option<schemars::Schema> {
    use schemars::JsonSchema;
    Some(match kind {
        ENROL => EnrolCommand::json_schema(gen),
        POWER => PowerCommand::json_schema(gen),
        BOOT => BootCommand::json_schema(gen),
        INSERT_MEDIA => InsertMediaCommand::json_schema(gen),
        EJECT_MEDIA => EjectMediaCommand::json_schema(gen),
        PROVISION => ProvisionCommand::json_schema(gen),
        DEPROVISION => DeprovisionCommand::json_schema(gen),
        GET => GetCommand::json_schema(gen),
        _ => return None,
    })
}

/// A parsed `baremetal.*` command.
#[derive(Debug, Clone, PartialEq)]
pub enum BareMetalCommand {
    Enrol(EnrolCommand),
    Power(PowerCommand),
    Boot(BootCommand),
    InsertMedia(InsertMediaCommand),
    EjectMedia(EjectMediaCommand),
    Provision(ProvisionCommand),
    Deprovision(DeprovisionCommand),
    Get(GetCommand),
}

impl BareMetalCommand {
    /// Parses `payload` (JSON) for command `kind`; `Ok(None)` when `kind` is not a bare-metal
    /// command.
    pub fn parse(kind: &str, payload: &[u8]) -> Result<Option<Self>> {
        if !KINDS.contains(&kind) {
            return Ok(None);
        }
        let v = serde_json::from_slice(payload)
            .map_err(|e| ProviderError::invalid(kind, e.to_string()))?;
        Self::parse_value(kind, v)
    }

    /// Like [`BareMetalCommand::parse`], from an already decoded JSON value.
    pub fn parse_value(kind: &str, payload: serde_json::Value) -> Result<Option<Self>> {
        fn de<T: serde::de::DeserializeOwned>(kind: &str, v: serde_json::Value) -> Result<T> {
            serde_json::from_value(v).map_err(|e| ProviderError::invalid(kind, e.to_string()))
        }
        Ok(Some(match kind {
            ENROL => Self::Enrol(de(kind, payload)?),
            POWER => Self::Power(de(kind, payload)?),
            BOOT => Self::Boot(de(kind, payload)?),
            INSERT_MEDIA => {
                let c: InsertMediaCommand = de(kind, payload)?;
                if !(c.image_url.starts_with("http://") || c.image_url.starts_with("https://")) {
                    return Err(ProviderError::invalid(
                        "image_url",
                        format!("{:?} is not an http(s) URL the BMC can fetch", c.image_url),
                    ));
                }
                Self::InsertMedia(c)
            }
            EJECT_MEDIA => Self::EjectMedia(de(kind, payload)?),
            PROVISION => {
                let c: ProvisionCommand = de(kind, payload)?;
                c.spec.validate()?;
                Self::Provision(c)
            }
            DEPROVISION => Self::Deprovision(de(kind, payload)?),
            GET => Self::Get(de(kind, payload)?),
            _ => return Ok(None),
        }))
    }

    /// The command kind string.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Enrol(_) => ENROL,
            Self::Power(_) => POWER,
            Self::Boot(_) => BOOT,
            Self::InsertMedia(_) => INSERT_MEDIA,
            Self::EjectMedia(_) => EJECT_MEDIA,
            Self::Provision(_) => PROVISION,
            Self::Deprovision(_) => DEPROVISION,
            Self::Get(_) => GET,
        }
    }

    /// The name of the BMC this command addresses.
    pub fn bmc(&self) -> &str {
        match self {
            Self::Enrol(c) => &c.name,
            Self::Power(c) => &c.bmc,
            Self::Boot(c) => &c.bmc,
            Self::InsertMedia(c) => &c.bmc,
            Self::EjectMedia(c) => &c.bmc,
            Self::Provision(c) => match &c.spec.placement {
                Placement::BareMetal { bmc, .. } => bmc,
            },
            Self::Deprovision(c) => &c.bmc,
            Self::Get(c) => &c.bmc,
        }
    }

    /// The system this command names, if any (else the BMC's default system).
    pub fn system(&self) -> Option<&String> {
        match self {
            Self::Enrol(_) => None,
            Self::Power(c) => c.system.as_ref(),
            Self::Boot(c) => c.system.as_ref(),
            Self::InsertMedia(c) => c.system.as_ref(),
            Self::EjectMedia(c) => c.system.as_ref(),
            Self::Provision(c) => match &c.spec.placement {
                Placement::BareMetal { system, .. } => system.as_ref(),
            },
            Self::Deprovision(c) => c.system.as_ref(),
            Self::Get(c) => c.system.as_ref(),
        }
    }

    /// Whether running this command a second time could repeat an effect: a power cycle or
    /// reset reboots again, and so does a provision (it power-cycles). Everything else
    /// converges to the same state when repeated (enrol, reads, power on/off/soft shutdown,
    /// boot override, media insert/eject, deprovision), so an interrupted one may be resumed.
    /// The gateway refuses to resume the former after a restart (`interrupted`).
    pub fn repeats_an_effect(&self) -> bool {
        match self {
            Self::Power(p) => matches!(p.action, PowerRequest::Cycle | PowerRequest::Reset),
            Self::Provision(_) => true,
            Self::Enrol(_)
            | Self::Boot(_)
            | Self::InsertMedia(_)
            | Self::EjectMedia(_)
            | Self::Deprovision(_)
            | Self::Get(_) => false,
        }
    }
}

/// Resolves the system id: the one named, else the BMC's default system (enrolling if needed).
pub async fn system_of(driver: &dyn BareMetal, named: Option<&String>) -> Result<String> {
    if let Some(s) = named {
        return Ok(s.clone());
    }
    let caps = match driver.capabilities() {
        Some(c) => c,
        None => driver.enrol().await?,
    };
    caps.default_system()
        .map(str::to_owned)
        .ok_or_else(|| ProviderError::NotFound {
            component: crate::Component::Bmc,
            endpoint: driver.endpoint().to_owned(),
            what: "any system".into(),
        })
}

/// Executes `cmd` against `driver` (for `Enrol`, a driver made from the command's endpoint) and
/// returns the JSON result payload.
pub async fn execute(
    driver: &dyn BareMetal,
    cmd: &BareMetalCommand,
    progress: ProgressSink<'_>,
) -> Result<serde_json::Value> {
    match cmd {
        BareMetalCommand::Enrol(c) => {
            let capabilities = driver.enrol().await?;
            json(&EnrolResult {
                name: c.name.clone(),
                capabilities,
            })
        }
        BareMetalCommand::Power(c) => {
            let system = system_of(driver, c.system.as_ref()).await?;
            let previous = driver.power_state(&system).await?;
            let Some(action) = c.action.action() else {
                return json(&PowerResult {
                    system,
                    state: previous,
                    previous: None,
                });
            };
            driver.power(&system, action).await?;
            if let (true, Some(target)) = (c.wait, action.target()) {
                let bound = c
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_POWER_WAIT);
                driver.wait_power(&system, target, bound).await?;
            }
            let state = driver.power_state(&system).await?;
            json(&PowerResult {
                system,
                state,
                previous: Some(previous),
            })
        }
        BareMetalCommand::Boot(c) => {
            let system = system_of(driver, c.system.as_ref()).await?;
            let want = BootOverride {
                device: c.device,
                persistence: c.persistence,
                mode: c.mode,
            };
            driver.set_boot_override(&system, &want).await?;
            json(&BootResult {
                boot: driver.boot_override(&system).await?,
                power: driver.power_state(&system).await?,
                system,
            })
        }
        BareMetalCommand::InsertMedia(c) => {
            let system = system_of(driver, c.system.as_ref()).await?;
            driver.insert_media(&system, &c.image_url).await?;
            media_result(driver, system).await
        }
        BareMetalCommand::EjectMedia(c) => {
            let system = system_of(driver, c.system.as_ref()).await?;
            driver.eject_media(&system).await?;
            media_result(driver, system).await
        }
        BareMetalCommand::Provision(c) => {
            let Placement::BareMetal {
                system,
                boot,
                boot_mode,
                ..
            } = &c.spec.placement;
            let system = system_of(driver, system.as_ref()).await?;
            let req = ProvisionRequest {
                boot: boot.clone(),
                boot_mode: *boot_mode,
                power_timeout_ms: c.power_timeout_ms,
            };
            json(&driver.provision(&system, &req, progress).await?)
        }
        BareMetalCommand::Deprovision(c) => {
            let system = system_of(driver, c.system.as_ref()).await?;
            let bound = c
                .power_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_POWER_WAIT);
            json(&driver.deprovision(&system, bound).await?)
        }
        BareMetalCommand::Get(c) => {
            let system = system_of(driver, c.system.as_ref()).await?;
            json(&driver.get(&system).await?)
        }
    }
}

async fn media_result(driver: &dyn BareMetal, system: String) -> Result<serde_json::Value> {
    let media = driver
        .media_state(&system)
        .await?
        .ok_or_else(|| ProviderError::Unsupported {
            endpoint: driver.endpoint().to_owned(),
            what: format!("virtual media for system {system}"),
        })?;
    json(&MediaResult {
        power: driver.power_state(&system).await?,
        media,
        system,
    })
}

/// Makes a driver for an endpoint of one protocol.
pub type Factory = fn(BmcEndpoint) -> Result<Box<dyn BareMetal>>;

/// The enrolled BMCs of a gateway, by name, and the drivers that speak to them: the one object
/// the gateway's executor needs for every `baremetal.*` command. Enrolment records are the
/// gateway's to persist (they hold credentials); [`BareMetalService::restore`] puts one back
/// after a restart without contacting the BMC.
#[derive(Default)]
pub struct BareMetalService {
    factories: HashMap<&'static str, Factory>,
    bmcs: Mutex<HashMap<String, Arc<dyn BareMetal>>>,
}

impl BareMetalService {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(p: Protocol) -> &'static str {
        match p {
            Protocol::Ipmi => "ipmi",
            Protocol::Redfish => "redfish",
        }
    }

    /// Registers the driver factory of a protocol.
    pub fn with_factory(mut self, protocol: Protocol, f: Factory) -> Self {
        self.factories.insert(Self::key(protocol), f);
        self
    }

    fn make(&self, c: &EnrolCommand) -> Result<Arc<dyn BareMetal>> {
        let f = self.factories.get(Self::key(c.protocol)).ok_or_else(|| {
            ProviderError::invalid(
                "protocol",
                format!("no driver for {:?} in this gateway", c.protocol),
            )
        })?;
        Ok(Arc::from(f(c.endpoint.clone())?))
    }

    /// Re-adds an enrolled BMC (e.g. from the gateway's store) without contacting it.
    pub fn restore(&self, c: &EnrolCommand) -> Result<()> {
        let d = self.make(c)?;
        self.lock().insert(c.name.clone(), d);
        Ok(())
    }

    /// The driver of an enrolled BMC.
    pub fn driver(&self, name: &str) -> Result<Arc<dyn BareMetal>> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound {
                component: crate::Component::Bmc,
                endpoint: "gateway".into(),
                what: format!("enrolled BMC {name:?} (send baremetal.enrol first)"),
            })
    }

    /// Names of the enrolled BMCs.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn BareMetal>>> {
        // The map stays consistent even if a holder panicked (inserts are single calls).
        self.bmcs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parses and executes one `baremetal.*` command; a kind that is not bare metal is
    /// `InvalidSpec`. Enrol replaces (and closes) a BMC enrolled under the same name only once
    /// the new enrolment succeeded.
    pub async fn handle(
        &self,
        kind: &str,
        payload: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.handle_with(kind, payload, &no_progress).await
    }

    /// [`handle`](Self::handle), reporting the progress of a provision to
    /// `progress`.
    pub async fn handle_with(
        &self,
        kind: &str,
        payload: serde_json::Value,
        progress: ProgressSink<'_>,
    ) -> Result<serde_json::Value> {
        let cmd = BareMetalCommand::parse_value(kind, payload)?.ok_or_else(|| {
            ProviderError::invalid("kind", format!("{kind:?} is not a bare-metal command"))
        })?;
        match &cmd {
            BareMetalCommand::Enrol(c) => {
                let d = self.make(c)?;
                let out = execute(d.as_ref(), &cmd, &no_progress).await?;
                let old = self.lock().insert(c.name.clone(), d);
                if let Some(old) = old {
                    let _ = old.close().await;
                }
                Ok(out)
            }
            _ => {
                let d = self.driver(cmd.bmc())?;
                execute(d.as_ref(), &cmd, progress).await
            }
        }
    }
}

/// Serialises a result payload.
fn json<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| ProviderError::invalid("result", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind() {
        let enrol = br#"{"name":"b1","protocol":"ipmi",
            "endpoint":{"address":"10.0.0.9:623","user":"admin","password":"pw"}}"#;
        let c = BareMetalCommand::parse(ENROL, enrol)
            .expect("parses")
            .expect("known");
        assert_eq!(c.bmc(), "b1");
        let power = br#"{"bmc":"b1","action":"cycle","wait":true}"#;
        let c = BareMetalCommand::parse(POWER, power)
            .expect("parses")
            .expect("known");
        assert_eq!(c.kind(), POWER);
        let prov = br#"{"spec":{"name":"m","placement":{"provider":"bare_metal","bmc":"b1","boot":"pxe"}}}"#;
        assert!(BareMetalCommand::parse(PROVISION, prov)
            .expect("parses")
            .is_some());
        assert!(BareMetalCommand::parse(DEPROVISION, br#"{"bmc":"b1"}"#)
            .expect("p")
            .is_some());
        assert!(
            BareMetalCommand::parse(GET, br#"{"bmc":"b1","system":"1"}"#)
                .expect("p")
                .is_some()
        );
        assert!(BareMetalCommand::parse("vm.create", b"{}")
            .expect("p")
            .is_none());
        let err = BareMetalCommand::parse(POWER, br#"{"bmc":"b1","action":"explode"}"#)
            .expect_err("bad action");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidSpec);
        // Power waits for the state after the change unless told not to.
        let Some(BareMetalCommand::Power(p)) =
            BareMetalCommand::parse(POWER, br#"{"bmc":"b1","action":"on"}"#).expect("p")
        else {
            panic!("power")
        };
        assert!(p.wait);
        let Some(BareMetalCommand::Boot(b)) = BareMetalCommand::parse(
            BOOT,
            br#"{"bmc":"b1","device":"pxe","persistence":"continuous","mode":"uefi"}"#,
        )
        .expect("p") else {
            panic!("boot")
        };
        assert_eq!(
            (b.device, b.persistence, b.mode),
            (
                BootDevice::Pxe,
                BootPersistence::Continuous,
                Some(BootMode::Uefi)
            )
        );
        let err = BareMetalCommand::parse(BOOT, br#"{"bmc":"b1","device":"floppy"}"#)
            .expect_err("unknown device");
        assert!(err.to_string().contains("floppy"), "{err}");
        let err = BareMetalCommand::parse(
            INSERT_MEDIA,
            br#"{"bmc":"b1","image_url":"file:///boot.iso"}"#,
        )
        .expect_err("file URL");
        assert!(err.to_string().contains("image_url"), "{err}");
        assert!(BareMetalCommand::parse(EJECT_MEDIA, br#"{"bmc":"b1"}"#)
            .expect("p")
            .is_some());
    }

    #[test]
    fn only_cycle_reset_and_provision_repeat_an_effect() {
        let repeats = |kind: &str, payload: &str| {
            BareMetalCommand::parse(kind, payload.as_bytes())
                .expect("parses")
                .expect("known")
                .repeats_an_effect()
        };
        for action in ["cycle", "reset"] {
            assert!(repeats(
                POWER,
                &format!(r#"{{"bmc":"b","action":"{action}"}}"#)
            ));
        }
        let prov =
            r#"{"spec":{"name":"m","placement":{"provider":"bare_metal","bmc":"b","boot":"pxe"}}}"#;
        assert!(repeats(PROVISION, prov));
        for action in ["on", "off", "soft_shutdown", "status"] {
            assert!(!repeats(
                POWER,
                &format!(r#"{{"bmc":"b","action":"{action}"}}"#)
            ));
        }
        assert!(!repeats(BOOT, r#"{"bmc":"b","device":"disk"}"#));
        assert!(!repeats(
            INSERT_MEDIA,
            r#"{"bmc":"b","image_url":"http://x/i.iso"}"#
        ));
        assert!(!repeats(EJECT_MEDIA, r#"{"bmc":"b"}"#));
        assert!(!repeats(DEPROVISION, r#"{"bmc":"b"}"#));
    }
}

#[cfg(test)]
mod service_tests {
    //! Dispatch only, with a fake driver; the drivers' proof is their conformance runs.
    use super::*;
    use crate::types::{BootOverride, MediaState};

    struct Fake(Mutex<PowerState>);

    #[async_trait::async_trait]
    impl BareMetal for Fake {
        fn endpoint(&self) -> &str {
            "fake://bmc"
        }
        async fn enrol(&self) -> Result<Capabilities> {
            Ok(Capabilities {
                protocol: "ipmi".into(),
                vendor: None,
                model: None,
                firmware: None,
                systems: vec!["s".into()],
                power_actions: PowerAction::ALL.to_vec(),
                boot_devices: vec![],
                virtual_media: false,
                power_settle_ms: 0,
                details: serde_json::Value::Null,
            })
        }
        fn capabilities(&self) -> Option<Capabilities> {
            None
        }
        async fn power_state(&self, _: &str) -> Result<PowerState> {
            Ok(*self.0.lock().unwrap_or_else(|p| p.into_inner()))
        }
        async fn power(&self, _: &str, a: PowerAction) -> Result<()> {
            if let Some(t) = a.target() {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
            }
            Ok(())
        }
        async fn set_boot_override(&self, _: &str, _: &BootOverride) -> Result<()> {
            Ok(())
        }
        async fn boot_override(&self, _: &str) -> Result<BootOverride> {
            Ok(BootOverride::NONE)
        }
        async fn insert_media(&self, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
        async fn eject_media(&self, _: &str) -> Result<()> {
            Ok(())
        }
        async fn media_state(&self, _: &str) -> Result<Option<MediaState>> {
            Ok(None)
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    fn fake(_: BmcEndpoint) -> Result<Box<dyn BareMetal>> {
        Ok(Box::new(Fake(Mutex::new(PowerState::Off))))
    }

    #[tokio::test]
    async fn enrol_then_power_by_name() {
        let svc = BareMetalService::new().with_factory(Protocol::Ipmi, fake);
        let e = svc
            .handle(POWER, serde_json::json!({"bmc": "b1", "action": "on"}))
            .await
            .expect_err("not enrolled");
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        let enrol = serde_json::json!({"name": "b1", "protocol": "ipmi",
            "endpoint": {"address": "10.0.0.9", "user": "u", "password": "p"}});
        svc.handle(ENROL, enrol).await.expect("enrol");
        let out = svc
            .handle(
                POWER,
                serde_json::json!({"bmc": "b1", "action": "on", "wait": true}),
            )
            .await
            .expect("power");
        assert_eq!(out["state"], "on");
        assert_eq!(out["system"], "s");
        let redfish = serde_json::json!({"name": "b2", "protocol": "redfish",
            "endpoint": {"address": "https://x", "user": "u", "password": "p"}});
        assert!(
            svc.handle(ENROL, redfish).await.is_err(),
            "no redfish factory registered"
        );
        assert_eq!(svc.names(), vec!["b1".to_owned()]);
    }
}
