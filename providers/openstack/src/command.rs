//! The `openstack.*` commands the gateway executes: payloads, parsing and execution.
//!
//! Every payload names its cloud with `cloud` ([`CloudRef`]): a cloud name from clouds.yaml on the
//! gateway host (a string), a cloud enrolled with `openstack.enrol` (`{"enrolled": "NAME"}`), or
//! an inline clouds.yaml entry (any other object; its `password` /
//! `application_credential_secret` the SaaS redacts when it shows the command).
//!
//! [`OpenstackService`] keeps one logged-in client per cloud entry: a login to one cloud never
//! waits for another, and commands that arrive during a login share it.
//!
//! | kind | payload | output |
//! |---|---|---|
//! | `openstack.enrol` | `name`, `cloud` (an inline entry) | `{"name", "auth_url", "user", "project", "region"}` once Keystone issued a token |
//! | `openstack.create` | `cloud`, `server` ([`ServerSpec`]), `wait` (default true: until ACTIVE) | the server |
//! | `openstack.get` | `cloud`, `server` (id) | the server |
//! | `openstack.power` | `cloud`, `server`, `action` (on, off, soft_shutdown, reset, cycle) | the server |
//! | `openstack.delete` | `cloud`, `server` | `{"deleted": bool}` (false: it was already gone) |
//! | `openstack.inventory` | `cloud` | flavors, images, networks and servers |

use std::sync::Arc;

use pcg_provider::{PowerAction, ProviderError, Sessions};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{OpenStack, ServerSpec, DEFAULT_WAIT};
use crate::config::{CloudEntry, CloudRef};

/// Every command kind.
pub const KINDS: [&str; 6] = [
    "openstack.enrol",
    "openstack.create",
    "openstack.get",
    "openstack.power",
    "openstack.delete",
    "openstack.inventory",
];

fn yes() -> bool {
    true
}

/// `openstack.enrol`: check that Keystone issues a token for `cloud`, then keep it under `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Enrol {
    /// The name later commands give as `"cloud": {"enrolled": NAME}`: 1 to 128 letters, digits,
    /// `-`, `_` or `.`.
    #[cfg_attr(
        feature = "schema",
        schemars(regex(pattern = "^[A-Za-z0-9._-]{1,128}$"))
    )]
    pub name: String,
    /// An inline clouds.yaml entry (a cloud name or an enrolled reference is refused: the first
    /// is already on the gateway host, the second is already enrolled).
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::config::inline_cloud_schema")
    )]
    pub cloud: CloudRef,
}

/// `openstack.create`: a server marked with the command id (a redelivered create returns it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Create {
    pub cloud: CloudRef,
    pub server: ServerSpec,
    /// Wait until the server is ACTIVE.
    #[serde(default = "yes")]
    pub wait: bool,
}

/// `openstack.get`, `openstack.delete`: one server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Target {
    pub cloud: CloudRef,
    /// The server's id.
    pub server: String,
}

/// `openstack.power`: one power action on a server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Power {
    pub cloud: CloudRef,
    /// The server's id.
    pub server: String,
    pub action: PowerAction,
}

/// `openstack.inventory`: flavors, images, networks and servers of a cloud.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CloudOnly {
    pub cloud: CloudRef,
}

/// The JSON Schema of the payload of `kind`, from the types [`Command::parse`] decodes it into
/// (named types go to `gen`'s definitions); None for a kind that is not an `openstack.*`
/// command.
#[cfg(feature = "schema")]
pub fn payload_schema(kind: &str, gen: &mut schemars::SchemaGenerator) -> Option<schemars::Schema> {
    use schemars::JsonSchema;
    Some(match kind {
        "openstack.enrol" => Enrol::json_schema(gen),
        "openstack.create" => Create::json_schema(gen),
        "openstack.get" | "openstack.delete" => Target::json_schema(gen),
        "openstack.power" => Power::json_schema(gen),
        "openstack.inventory" => CloudOnly::json_schema(gen),
        _ => return None,
    })
}

/// A parsed `openstack.*` command.
#[derive(Debug, Clone)]
pub enum Command {
    Enrol(Enrol),
    Create(Create),
    Get(Target),
    Power(Power),
    Delete(Target),
    Inventory(CloudOnly),
}

impl Command {
    /// Parses `payload` of command `kind`; `Ok(None)` when `kind` is not an OpenStack command.
    pub fn parse(kind: &str, payload: Value) -> Result<Option<Command>, ProviderError> {
        fn de<T: serde::de::DeserializeOwned>(kind: &str, v: Value) -> Result<T, ProviderError> {
            serde_json::from_value(v).map_err(|e| ProviderError::invalid(kind, e.to_string()))
        }
        Ok(Some(match kind {
            "openstack.enrol" => {
                let e: Enrol = de(kind, payload)?;
                let ok = !e.name.is_empty()
                    && e.name.len() <= 128
                    && e.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    return Err(ProviderError::invalid(
                        "name",
                        format!(
                            "{:?}: use 1 to 128 letters, digits, '-', '_' or '.'",
                            e.name
                        ),
                    ));
                }
                if !matches!(e.cloud, CloudRef::Inline(_)) {
                    return Err(ProviderError::invalid(
                        "cloud",
                        "openstack.enrol takes an inline clouds.yaml entry (an object with `auth`); a clouds.yaml cloud name is already on the gateway host and needs no enrolment",
                    ));
                }
                Command::Enrol(e)
            }
            "openstack.create" => Command::Create(de(kind, payload)?),
            "openstack.get" => Command::Get(de(kind, payload)?),
            "openstack.power" => Command::Power(de(kind, payload)?),
            "openstack.delete" => Command::Delete(de(kind, payload)?),
            "openstack.inventory" => Command::Inventory(de(kind, payload)?),
            _ => return Ok(None),
        }))
    }

    /// The cloud the command addresses.
    pub fn cloud(&self) -> &CloudRef {
        match self {
            Command::Enrol(e) => &e.cloud,
            Command::Create(c) => &c.cloud,
            Command::Get(t) | Command::Delete(t) => &t.cloud,
            Command::Power(p) => &p.cloud,
            Command::Inventory(c) => &c.cloud,
        }
    }

    /// Whether running it a second time could repeat an effect (a reboot). Create is not: it
    /// finds the server its command id marked.
    pub fn repeats_an_effect(&self) -> bool {
        matches!(self, Command::Power(p) if matches!(p.action, PowerAction::Reset | PowerAction::Cycle))
    }
}

/// Runs `cmd` (delivered as `command_id`) against `os`.
pub async fn execute(
    os: &OpenStack,
    command_id: &str,
    cmd: &Command,
) -> Result<Value, ProviderError> {
    let server = |s: &crate::Server| serde_json::to_value(s).unwrap_or(Value::Null);
    Ok(match cmd {
        Command::Enrol(e) => {
            let entry = os.cloud().entry();
            let auth = |k: &str| entry.get("auth").and_then(|a| a.get(k)).cloned();
            json!({
                "name": e.name,
                "auth_url": os.cloud().auth_url(),
                "user": os.cloud().user(),
                "project": auth("project_name").or_else(|| auth("project_id")),
                "region": os.cloud().region(),
            })
        }
        Command::Create(c) => {
            let s = os.create(Some(command_id), &c.server).await?;
            let s = if c.wait && s.status != "ACTIVE" {
                os.wait_status(&s.id, "ACTIVE", DEFAULT_WAIT).await?
            } else {
                s
            };
            server(&s)
        }
        Command::Get(t) => server(&os.get(&t.server).await?),
        Command::Power(p) => server(&os.power(&p.server, p.action, DEFAULT_WAIT).await?),
        Command::Delete(t) => json!({"deleted": os.delete(&t.server, DEFAULT_WAIT).await?}),
        Command::Inventory(_) => {
            json!({
                "flavors": os.flavors().await?,
                "images": os.images().await?,
                "networks": os.networks().await?,
                "servers": os.list().await?,
            })
        }
    })
}

/// Logged-in clients by cloud entry (see [`CloudEntry::session_key`]), with single-flight logins.
#[derive(Default)]
pub struct OpenstackService {
    clients: Sessions<Arc<OpenStack>>,
}

impl OpenstackService {
    pub fn new() -> Self {
        Self::default()
    }

    /// The logged-in client for `cloud`, logging in (asking Keystone for a token) the first
    /// time. A login to one cloud never waits for another; commands for the same cloud that
    /// arrive during its login share that login.
    pub async fn client(&self, cloud: &CloudEntry) -> Result<Arc<OpenStack>, ProviderError> {
        let entry = cloud.clone();
        self.clients
            .get_or_connect(&cloud.session_key(), move || async move {
                OpenStack::connect(entry).await.map(Arc::new)
            })
            .await
    }

    /// Drops the client kept for `cloud` (its credentials were refused, or its enrolment was
    /// replaced); the next command logs in again.
    pub fn forget(&self, cloud: &CloudEntry) {
        self.clients.remove(&cloud.session_key());
    }

    /// How many clients are kept or logging in.
    pub fn sessions(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_parse_and_refuse_unknown_fields() {
        let c = Command::parse(
            "openstack.create",
            json!({"cloud": "pcg", "server": {"name": "a", "flavor": "f", "image": "i"}}),
        )
        .unwrap()
        .unwrap();
        assert!(matches!(c.cloud(), CloudRef::Named(n) if n == "pcg"));
        let e = Command::parse(
            "openstack.power",
            json!({"cloud": "pcg", "server": "x", "action": "explode"}),
        )
        .unwrap_err();
        assert_eq!(e.kind(), pcg_provider::ErrorKind::InvalidSpec);
        assert!(Command::parse("baremetal.power", json!({}))
            .unwrap()
            .is_none());
    }

    #[test]
    fn cloud_is_a_name_an_enrolled_reference_or_an_inline_entry() {
        let get =
            |cloud: Value| Command::parse("openstack.get", json!({"cloud": cloud, "server": "x"}));
        let c = get(json!({"enrolled": "lab"})).unwrap().unwrap();
        assert!(matches!(c.cloud(), CloudRef::Enrolled { enrolled } if enrolled == "lab"));
        let c = get(json!({"auth": {"auth_url": "http://k/v3"}}))
            .unwrap()
            .unwrap();
        assert!(matches!(c.cloud(), CloudRef::Inline(_)));
        // `enrolled` with anything else, or not a name: refused, never taken as an inline entry.
        for bad in [
            json!({"enrolled": "lab", "auth": {}}),
            json!({"enrolled": 3}),
            json!({"enrolled": ""}),
            json!(7),
            json!(""),
        ] {
            let e = get(bad.clone()).unwrap_err();
            assert!(e.to_string().contains("enrolled"), "{bad}: {e}");
        }
        // Enrolment takes an inline entry only.
        let enrol = |cloud: Value| {
            Command::parse("openstack.enrol", json!({"name": "lab", "cloud": cloud}))
        };
        assert!(enrol(json!({"auth": {"auth_url": "http://k/v3"}})).is_ok());
        assert!(enrol(json!("pcg")).is_err());
        assert!(enrol(json!({"enrolled": "other"})).is_err());
    }
}
