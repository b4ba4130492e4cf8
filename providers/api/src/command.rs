//! Command payloads (`baremetal.*`) as the gateway receives them, and one function that executes
//! a parsed command against a driver, so the gateway's executor needs only a few lines:
//!
//! ```ignore
//! if let Some(cmd) = BareMetalCommand::parse(kind, payload)? {
//!     let driver = registry.driver_for(&cmd)?;          // by cmd.bmc(), or new for Enrol
//!     let result = execute(driver.as_ref(), &cmd, &no_progress).await?;
//! }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::baremetal::{BareMetal, DEFAULT_POWER_WAIT};
use crate::error::{ProviderError, Result};
use crate::types::{
    BmcEndpoint, Capabilities, MachineSpec, Placement, PowerAction, PowerState, ProgressSink,
    ProvisionRequest,
};

pub const ENROL: &str = "baremetal.enrol";
pub const POWER: &str = "baremetal.power";
pub const PROVISION: &str = "baremetal.provision";
pub const DEPROVISION: &str = "baremetal.deprovision";
pub const GET: &str = "baremetal.get";

/// Every command kind this module parses.
pub const KINDS: [&str; 5] = [ENROL, POWER, PROVISION, DEPROVISION, GET];

/// Which driver speaks to a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Ipmi,
    Redfish,
}

/// `baremetal.enrol`: check credentials, discover, record capabilities under `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolCommand {
    pub name: String,
    pub protocol: Protocol,
    pub endpoint: BmcEndpoint,
}

/// `baremetal.power`: one power action; with `wait`, also wait for the target state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerCommand {
    pub bmc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub action: PowerAction,
    #[serde(default)]
    pub wait: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `baremetal.provision`: a machine spec whose placement is `bare_metal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionCommand {
    pub spec: MachineSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_timeout_ms: Option<u64>,
}

/// `baremetal.deprovision`: power off and clear overrides/media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeprovisionCommand {
    pub bmc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_timeout_ms: Option<u64>,
}

/// `baremetal.get`: observed state of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetCommand {
    pub bmc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// Result of `baremetal.enrol`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolResult {
    pub name: String,
    pub capabilities: Capabilities,
}

/// Result of `baremetal.power`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerResult {
    pub system: String,
    pub state: PowerState,
}

/// A parsed `baremetal.*` command.
#[derive(Debug, Clone, PartialEq)]
pub enum BareMetalCommand {
    Enrol(EnrolCommand),
    Power(PowerCommand),
    Provision(ProvisionCommand),
    Deprovision(DeprovisionCommand),
    Get(GetCommand),
}

impl BareMetalCommand {
    /// Parses `payload` (JSON) for command `kind`; `Ok(None)` when `kind` is not a bare-metal
    /// command.
    pub fn parse(kind: &str, payload: &[u8]) -> Result<Option<Self>> {
        fn de<T: serde::de::DeserializeOwned>(kind: &str, p: &[u8]) -> Result<T> {
            serde_json::from_slice(p).map_err(|e| ProviderError::invalid(kind, e.to_string()))
        }
        Ok(Some(match kind {
            ENROL => Self::Enrol(de(kind, payload)?),
            POWER => Self::Power(de(kind, payload)?),
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
            Self::Provision(c) => match &c.spec.placement {
                Placement::BareMetal { bmc, .. } => bmc,
            },
            Self::Deprovision(c) => &c.bmc,
            Self::Get(c) => &c.bmc,
        }
    }
}

/// Resolves the system id: the one named, else the BMC's default system (enrolling if needed).
async fn system_of(driver: &dyn BareMetal, named: Option<&String>) -> Result<String> {
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
            driver.power(&system, c.action).await?;
            if let (true, Some(target)) = (c.wait, c.action.target()) {
                let bound = c
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_POWER_WAIT);
                driver.wait_power(&system, target, bound).await?;
            }
            let state = driver.power_state(&system).await?;
            json(&PowerResult { system, state })
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
    }
}
