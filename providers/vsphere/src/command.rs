//! `vsphere.*` command payloads as the gateway receives them, and [`VsphereService`], which keeps
//! one connected driver (one vCenter session) per endpoint and user and executes a command.
//!
//! Every payload carries its `endpoint` (URL, user, password, TLS trust): the gateway stores no
//! vCenter credentials, and the SaaS redacts the `password` key wherever it shows a payload.
//! Sessions are still shared: commands naming the same endpoint, user and password reuse one
//! driver and so one session, and commands that arrive while its login is under way wait for
//! that one login. A vCenter that does not answer delays only the commands addressed to it.
//!
//! | kind | payload | result |
//! |---|---|---|
//! | `vsphere.create` | `endpoint`, `spec` ([`VmSpec`]), `wait_ip_ms`? | [`VmInfo`] (with `ip` when waited for) |
//! | `vsphere.delete` | `endpoint`, `id` | `{"id", "deleted": bool}` |
//! | `vsphere.power` | `endpoint`, `id`, `action` ([`PowerAction`]) | [`VmInfo`] |
//! | `vsphere.get` | `endpoint`, `id` | [`VmInfo`] |
//! | `vsphere.inventory` | `endpoint` | [`Inventory`] |

use std::time::Duration;

use pcg_provider::vm::{Inventory, VmInfo, VmProvider, VmSpec};
use pcg_provider::{no_progress, PowerAction, ProviderError, Result, Sessions};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{VsphereDriver, VsphereEndpoint};

pub const CREATE: &str = "vsphere.create";
pub const DELETE: &str = "vsphere.delete";
pub const POWER: &str = "vsphere.power";
pub const GET: &str = "vsphere.get";
pub const INVENTORY: &str = "vsphere.inventory";

/// Every command kind this module handles.
pub const KINDS: [&str; 5] = [CREATE, DELETE, POWER, GET, INVENTORY];

/// `vsphere.create`: clone `spec.source` into a new VM marked with the command id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    pub endpoint: VsphereEndpoint,
    pub spec: VmSpec,
    /// Also wait (this many milliseconds at most) for the guest to report an IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ip_ms: Option<u64>,
}

/// `vsphere.delete`, `vsphere.get`: one VM by id (moref such as `vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCommand {
    pub endpoint: VsphereEndpoint,
    pub id: String,
}

/// `vsphere.power`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerCommand {
    pub endpoint: VsphereEndpoint,
    pub id: String,
    pub action: PowerAction,
}

/// `vsphere.inventory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryCommand {
    pub endpoint: VsphereEndpoint,
}

/// A parsed `vsphere.*` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsphereCommand {
    Create(Box<CreateCommand>),
    Delete(VmCommand),
    Power(PowerCommand),
    Get(VmCommand),
    Inventory(InventoryCommand),
}

impl VsphereCommand {
    /// Parses a payload of `kind`; `Ok(None)` for kinds that are not `vsphere.*` commands.
    pub fn parse_value(kind: &str, payload: Value) -> Result<Option<Self>> {
        fn p<T: serde::de::DeserializeOwned>(kind: &str, v: Value) -> Result<T> {
            serde_json::from_value(v).map_err(|e| ProviderError::invalid(kind, e.to_string()))
        }
        Ok(Some(match kind {
            CREATE => Self::Create(p(kind, payload)?),
            DELETE => Self::Delete(p(kind, payload)?),
            POWER => Self::Power(p(kind, payload)?),
            GET => Self::Get(p(kind, payload)?),
            INVENTORY => Self::Inventory(p(kind, payload)?),
            _ => return Ok(None),
        }))
    }

    pub fn endpoint(&self) -> &VsphereEndpoint {
        match self {
            Self::Create(c) => &c.endpoint,
            Self::Delete(c) | Self::Get(c) => &c.endpoint,
            Self::Power(c) => &c.endpoint,
            Self::Inventory(c) => &c.endpoint,
        }
    }
}

/// Connected drivers by endpoint, user and password digest, so commands share sessions.
#[derive(Default)]
pub struct VsphereService {
    drivers: Sessions<VsphereDriver>,
}

/// The session key of an endpoint: URL, user and a digest of everything (password and TLS trust
/// included), so changed credentials get a new session.
fn key(ep: &VsphereEndpoint) -> String {
    let digest = Sha256::digest(serde_json::to_vec(ep).unwrap_or_else(|_| {
        format!("{}|{}|{}", ep.url, ep.user, ep.password.expose()).into_bytes()
    }));
    format!("{}|{}|{}", ep.url, ep.user, hex::encode(digest))
}

impl VsphereService {
    pub fn new() -> Self {
        Self::default()
    }

    /// The driver for `ep`, connecting (and so checking the credentials) the first time. A
    /// login to one vCenter never waits for another; commands for the same endpoint that arrive
    /// during its login share that login.
    pub async fn driver(&self, ep: &VsphereEndpoint) -> Result<VsphereDriver> {
        let ep2 = ep.clone();
        self.drivers
            .get_or_connect(&key(ep), move || async move {
                VsphereDriver::connect(&ep2).await
            })
            .await
    }

    /// Drops the session kept for `ep`: commands still using it finish, then it is logged out.
    pub fn forget(&self, ep: &VsphereEndpoint) {
        self.drivers.remove(&key(ep));
    }

    /// How many sessions are kept or being opened.
    pub fn sessions(&self) -> usize {
        self.drivers.len()
    }

    /// Parses and executes one command; `command_id` marks what `vsphere.create` makes.
    pub async fn handle(&self, kind: &str, command_id: &str, payload: Value) -> Result<Value> {
        let cmd = VsphereCommand::parse_value(kind, payload)?.ok_or_else(|| {
            ProviderError::invalid("kind", format!("{kind} is not a vsphere command"))
        })?;
        let driver = self.driver(cmd.endpoint()).await?;
        execute(&driver, command_id, &cmd).await
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Executes a parsed command against a driver.
pub async fn execute(
    driver: &dyn VmProvider,
    command_id: &str,
    cmd: &VsphereCommand,
) -> Result<Value> {
    match cmd {
        VsphereCommand::Create(c) => {
            let mut vm: VmInfo = driver.create(command_id, &c.spec, &no_progress).await?;
            if let Some(ms) = c.wait_ip_ms {
                vm.ip = Some(driver.wait_ip(&vm.id, Duration::from_millis(ms)).await?);
            }
            Ok(to_value(&vm))
        }
        VsphereCommand::Delete(c) => {
            let deleted = driver.delete(&c.id, &no_progress).await?;
            Ok(json!({ "id": c.id, "deleted": deleted }))
        }
        VsphereCommand::Power(c) => {
            driver.power(&c.id, c.action).await?;
            Ok(to_value(&driver.get(&c.id).await?))
        }
        VsphereCommand::Get(c) => Ok(to_value(&driver.get(&c.id).await?)),
        VsphereCommand::Inventory(_) => {
            let inv: Inventory = driver.inventory().await?;
            Ok(to_value(&inv))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_unknown_fields_are_refused() {
        let ep = json!({"url": "https://vc.example", "user": "u", "password": "p",
            "tls": {"pin_sha256": "ab"}});
        let c = VsphereCommand::parse_value(
            POWER,
            json!({"endpoint": ep, "id": "vm-1", "action": "off"}),
        )
        .expect("parses");
        assert!(matches!(c, Some(VsphereCommand::Power(_))));
        assert!(
            VsphereCommand::parse_value(GET, json!({"endpoint": ep, "id": "vm-1", "x": 1}))
                .is_err()
        );
        assert!(VsphereCommand::parse_value("baremetal.get", json!({}))
            .expect("not ours")
            .is_none());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("\"p\""), "{dbg}");
    }
}
