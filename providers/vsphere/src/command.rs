//! `vsphere.*` command payloads as the gateway receives them, and [`VsphereService`], which keeps
//! one connected driver (one vCenter session) per endpoint and user and executes a command.
//!
//! A payload names its vCenter with `endpoint`: either inline (an object: URL, user, password,
//! TLS trust; the SaaS redacts the `password` key wherever it shows a payload) or, as a string,
//! the name it was enrolled under with `vsphere.enrol` (the gateway keeps the endpoint, sealed,
//! and resolves the name; see [`EndpointRef`]). Sessions are shared: commands naming the same
//! endpoint, user and password reuse one driver and so one session, and commands that arrive
//! while its login is under way wait for that one login.
//!
//! | kind | payload | result |
//! |---|---|---|
//! | `vsphere.enrol` | `name`, `endpoint` (inline) | `{"name", "url", "user", "vcenter", "api_version"}` after a login |
//! | `vsphere.create` | `endpoint`, `spec` ([`VmSpec`]), `wait_ip_ms`? | [`VmInfo`] (with `ip` when waited for) |
//! | `vsphere.delete` | `endpoint`, `id` | `{"id", "deleted": bool}` |
//! | `vsphere.power` | `endpoint`, `id`, `action` ([`PowerAction`]) | [`VmInfo`] |
//! | `vsphere.get` | `endpoint`, `id` | [`VmInfo`] |
//! | `vsphere.inventory` | `endpoint` | [`Inventory`] |

use std::time::Duration;

use pcg_provider::vm::{Inventory, VmInfo, VmProvider, VmSpec};
use pcg_provider::{no_progress, PowerAction, ProgressSink, ProviderError, Result, Sessions};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{VsphereDriver, VsphereEndpoint};

pub const ENROL: &str = "vsphere.enrol";
pub const CREATE: &str = "vsphere.create";
pub const DELETE: &str = "vsphere.delete";
pub const POWER: &str = "vsphere.power";
pub const GET: &str = "vsphere.get";
pub const INVENTORY: &str = "vsphere.inventory";

/// Every command kind this module handles.
pub const KINDS: [&str; 6] = [ENROL, CREATE, DELETE, POWER, GET, INVENTORY];

/// Which vCenter a command addresses: the `endpoint` of a payload.
///
/// A JSON string is the name of an endpoint enrolled with `vsphere.enrol`; a JSON object is an
/// inline [`VsphereEndpoint`]. Nothing else is accepted, so the two cannot be confused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EndpointRef {
    /// The name given to `vsphere.enrol`.
    Enrolled(String),
    /// The endpoint itself, credentials included.
    Inline(Box<VsphereEndpoint>),
}

impl<'de> Deserialize<'de> for EndpointRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match Value::deserialize(d)? {
            Value::String(name) if !name.trim().is_empty() => Ok(Self::Enrolled(name)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(|ep| Self::Inline(Box::new(ep)))
                .map_err(|e| D::Error::custom(format!("endpoint: {e}"))),
            _ => Err(D::Error::custom(
                "endpoint must be the name of an enrolled vCenter (a string, see vsphere.enrol) or an object {\"url\", \"user\", \"password\", \"tls\"}",
            )),
        }
    }
}

/// The schema of what [`EndpointRef`]'s `Deserialize` accepts: a name that is not blank, or an
/// inline endpoint.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for EndpointRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "VsphereEndpointRef".into()
    }

    fn json_schema(gen: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let inline = gen.subschema_for::<VsphereEndpoint>();
        schemars::json_schema!({
            "description": "The vCenter: the name it was enrolled under with `vsphere.enrol`, or the endpoint inline.",
            "oneOf": [
                {
                    "type": "string",
                    "pattern": "\\S",
                    "description": "The name of a vCenter enrolled with `vsphere.enrol`."
                },
                inline
            ]
        })
    }
}

impl From<VsphereEndpoint> for EndpointRef {
    fn from(ep: VsphereEndpoint) -> Self {
        Self::Inline(Box::new(ep))
    }
}

/// `vsphere.enrol`: log in to check the endpoint, then keep it under `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnrolCommand {
    /// The name later commands give as their `endpoint`: 1 to 128 letters, digits, `-`, `_`
    /// or `.`.
    #[cfg_attr(
        feature = "schema",
        schemars(regex(pattern = "^[A-Za-z0-9._-]{1,128}$"))
    )]
    pub name: String,
    /// The vCenter, inline (a name is refused: enrolment is what gives names).
    pub endpoint: VsphereEndpoint,
}

/// `vsphere.create`: clone `spec.source` into a new VM marked with the command id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateCommand {
    pub endpoint: EndpointRef,
    /// The VM; `placement.provider` must be `vsphere`.
    pub spec: VmSpec,
    /// Also wait (this many milliseconds at most) for the guest to report an IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ip_ms: Option<u64>,
}

/// `vsphere.delete`, `vsphere.get`: one VM by id (moref such as `vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VmCommand {
    pub endpoint: EndpointRef,
    /// The VM's managed object id, e.g. `vm-42`.
    pub id: String,
}

/// `vsphere.power`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PowerCommand {
    pub endpoint: EndpointRef,
    /// The VM's managed object id, e.g. `vm-42`.
    pub id: String,
    pub action: PowerAction,
}

/// `vsphere.inventory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InventoryCommand {
    pub endpoint: EndpointRef,
}

/// The JSON Schema of the payload of `kind`, from the types [`VsphereCommand::parse_value`]
/// decodes it into (named types go to `gen`'s definitions); None for a kind that is not a
/// `vsphere.*` command.
#[cfg(feature = "schema")]
pub fn payload_schema(kind: &str, gen: &mut schemars::SchemaGenerator) -> Option<schemars::Schema> {
    use schemars::JsonSchema;
    Some(match kind {
        ENROL => EnrolCommand::json_schema(gen),
        CREATE => CreateCommand::json_schema(gen),
        DELETE | GET => VmCommand::json_schema(gen),
        POWER => PowerCommand::json_schema(gen),
        INVENTORY => InventoryCommand::json_schema(gen),
        _ => return None,
    })
}

/// A parsed `vsphere.*` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsphereCommand {
    Enrol(Box<EnrolCommand>),
    Create(Box<CreateCommand>),
    Delete(VmCommand),
    Power(PowerCommand),
    Get(VmCommand),
    Inventory(InventoryCommand),
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::invalid(
            "name",
            format!("{name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"),
        ))
    }
}

impl VsphereCommand {
    /// Parses a payload of `kind`; `Ok(None)` for kinds that are not `vsphere.*` commands.
    pub fn parse_value(kind: &str, payload: Value) -> Result<Option<Self>> {
        fn p<T: serde::de::DeserializeOwned>(kind: &str, v: Value) -> Result<T> {
            serde_json::from_value(v).map_err(|e| ProviderError::invalid(kind, e.to_string()))
        }
        Ok(Some(match kind {
            ENROL => {
                let c: EnrolCommand = p(kind, payload)?;
                valid_name(&c.name)?;
                Self::Enrol(Box::new(c))
            }
            CREATE => {
                let c: Box<CreateCommand> = p(kind, payload)?;
                c.spec.validate()?;
                Self::Create(c)
            }
            DELETE => Self::Delete(p(kind, payload)?),
            POWER => Self::Power(p(kind, payload)?),
            GET => Self::Get(p(kind, payload)?),
            INVENTORY => Self::Inventory(p(kind, payload)?),
            _ => return Ok(None),
        }))
    }

    /// The vCenter the command addresses (for `vsphere.enrol`, the endpoint being enrolled).
    pub fn endpoint(&self) -> EndpointRef {
        match self {
            Self::Enrol(c) => EndpointRef::Inline(Box::new(c.endpoint.clone())),
            Self::Create(c) => c.endpoint.clone(),
            Self::Delete(c) | Self::Get(c) => c.endpoint.clone(),
            Self::Power(c) => c.endpoint.clone(),
            Self::Inventory(c) => c.endpoint.clone(),
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

    /// Drops the session kept for `ep` (e.g. its enrolment was replaced): commands still using
    /// it finish, then it is logged out.
    pub fn forget(&self, ep: &VsphereEndpoint) {
        self.drivers.remove(&key(ep));
    }

    /// How many sessions are kept or being opened.
    pub fn sessions(&self) -> usize {
        self.drivers.len()
    }

    /// Parses and executes one command with an inline endpoint (names of enrolled endpoints are
    /// the gateway's to resolve); `command_id` marks what `vsphere.create` makes.
    pub async fn handle(&self, kind: &str, command_id: &str, payload: Value) -> Result<Value> {
        let cmd = VsphereCommand::parse_value(kind, payload)?.ok_or_else(|| {
            ProviderError::invalid("kind", format!("{kind} is not a vsphere command"))
        })?;
        let ep = match cmd.endpoint() {
            EndpointRef::Inline(ep) => *ep,
            EndpointRef::Enrolled(name) => {
                return Err(ProviderError::invalid(
                    "endpoint",
                    format!(
                    "{name:?} names an enrolled vCenter; only the gateway resolves enrolled names"
                ),
                ))
            }
        };
        let driver = self.driver(&ep).await?;
        execute(&driver, command_id, &cmd).await
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Executes a parsed command against a driver.
pub async fn execute(
    vsphere: &VsphereDriver,
    command_id: &str,
    cmd: &VsphereCommand,
) -> Result<Value> {
    execute_with(
        vsphere,
        command_id,
        cmd,
        &no_progress,
        &CancellationToken::new(),
    )
    .await
}

/// [`execute`] reporting progress (of a create and a delete) to `progress`, and stopping a
/// create when `cancel` fires (see [`VsphereDriver::create_with`]): a clone under way is
/// cancelled through its vCenter task, and the wait for the guest IP ends.
pub async fn execute_with(
    vsphere: &VsphereDriver,
    command_id: &str,
    cmd: &VsphereCommand,
    progress: ProgressSink<'_>,
    cancel: &CancellationToken,
) -> Result<Value> {
    let driver: &dyn VmProvider = vsphere;
    match cmd {
        VsphereCommand::Enrol(c) => {
            let sc = vsphere.client().service_content();
            Ok(json!({
                "name": c.name,
                "url": vsphere.client().endpoint(),
                "user": c.endpoint.user,
                "vcenter": sc.full_name,
                "api_version": sc.api_version,
            }))
        }
        VsphereCommand::Create(c) => {
            let mut vm: VmInfo = vsphere
                .create_with(command_id, &c.spec, progress, cancel)
                .await?;
            if let Some(ms) = c.wait_ip_ms {
                progress(&pcg_provider::TaskProgress::running(
                    100,
                    format!("{} ({}) created; waiting for its guest IP", vm.name, vm.id),
                ));
                let ip = tokio::select! {
                    ip = driver.wait_ip(&vm.id, Duration::from_millis(ms)) => ip?,
                    _ = cancel.cancelled() => return Err(ProviderError::ProviderFault {
                        endpoint: vsphere.client().endpoint().to_owned(),
                        message: format!("create cancelled while waiting for the guest IP: VM {} ({:?}) exists, powered on and marked with command id {command_id}; delete it with vsphere.delete if it is not wanted", vm.id, vm.name),
                    }),
                };
                vm.ip = Some(ip);
            }
            Ok(to_value(&vm))
        }
        VsphereCommand::Delete(c) => {
            let deleted = driver.delete(&c.id, progress).await?;
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

    #[test]
    fn endpoint_is_a_name_or_an_inline_object_and_nothing_else() {
        let c = VsphereCommand::parse_value(GET, json!({"endpoint": "lab-vc", "id": "vm-1"}))
            .expect("parses")
            .expect("ours");
        assert_eq!(c.endpoint(), EndpointRef::Enrolled("lab-vc".into()));
        for bad in [json!(""), json!(7), json!(["a"]), json!(null)] {
            let e = VsphereCommand::parse_value(GET, json!({"endpoint": bad, "id": "vm-1"}))
                .expect_err("refused");
            assert!(e.to_string().contains("vsphere.enrol"), "{e}");
        }
        // An inline endpoint's own errors are reported as such.
        let e = VsphereCommand::parse_value(
            GET,
            json!({"endpoint": {"url": "https://vc", "user": "u"}, "id": "vm-1"}),
        )
        .expect_err("no password");
        assert!(e.to_string().contains("password"), "{e}");
        // Enrolment takes an inline endpoint and a plain name.
        let ep = json!({"url": "https://vc.example", "user": "u", "password": "p"});
        assert!(
            VsphereCommand::parse_value(ENROL, json!({"name": "lab-vc", "endpoint": ep})).is_ok()
        );
        assert!(
            VsphereCommand::parse_value(ENROL, json!({"name": "lab-vc", "endpoint": "other"}))
                .is_err()
        );
        assert!(
            VsphereCommand::parse_value(ENROL, json!({"name": "a b/c", "endpoint": ep})).is_err()
        );
    }
}
