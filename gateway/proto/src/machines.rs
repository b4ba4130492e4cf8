//! Declared machines and the watch loop: the JSON documents the tunnel's `MachineSync`,
//! `WatchReport` frames carry, shared by the SaaS (which keeps declarations and shows what was
//! observed) and the gateway (which converges, watches and heals).
//!
//! - [`Declaration`]: what a tenant declares (also the body of `POST /v1/gateways/{id}/machines`):
//!   one target — a VM on an enrolled vCenter or OpenStack cloud, or a bare-metal node behind an
//!   enrolled BMC — its desired power state, a drift [`Policy`] and a [`HealBudget`]. Targets name
//!   enrolled endpoints, never credentials.
//! - [`Observed`]: what the gateway last saw of a machine, with the drift it found.
//! - [`MachineEvent`]: drift, alerts, heals and their results (the audit trail).
//! - [`Health`]: the gateway's own health and a provider inventory summary.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest heal budget a declaration may ask for.
pub const MAX_HEALS: u32 = 1000;
/// Longest heal budget window, seconds (30 days).
pub const MAX_WINDOW_SECONDS: u64 = 30 * 86_400;

/// A declared machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// A label for people (1 to 128 characters); the VM's own name is in its spec.
    pub name: String,
    /// A VM on a vCenter enrolled with `vsphere.enrol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsphere: Option<VmTarget>,
    /// A server on an OpenStack cloud enrolled with `openstack.enrol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openstack: Option<VmTarget>,
    /// A node behind a BMC enrolled with `baremetal.enrol` (power only: it is never created or
    /// deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bare_metal: Option<BareMetalTarget>,
    /// The power state to keep (default `on`).
    #[serde(default)]
    pub power: DesiredPower,
    /// What a drift leads to (default `alert`).
    #[serde(default)]
    pub policy: Policy,
    /// How many heals the `heal` policy may do (default 3 per hour).
    #[serde(default)]
    pub heal_budget: HealBudget,
}

/// A VM: where it lives and what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmTarget {
    /// vSphere: the enrolled vCenter's name (a string). OpenStack: `{"enrolled": NAME}`.
    pub endpoint: EndpointName,
    /// The VM spec as `vsphere.create` takes it (`pcg_provider::vm::VmSpec`: name, source,
    /// cpus, memory_mib, networks, user_data, metadata, placement), without `power_on` (the
    /// declaration's `power` says it).
    pub vm: Value,
    /// Adopt this existing VM (vSphere moref, Nova server id) instead of creating one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_id: Option<String>,
}

/// How a declaration names an enrolled endpoint: a plain name (vCenters, BMCs) or
/// `{"enrolled": NAME}` (OpenStack clouds, as `openstack.*` commands name them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EndpointName {
    Name(String),
    Enrolled { enrolled: String },
}

impl EndpointName {
    pub fn name(&self) -> &str {
        match self {
            Self::Name(n) | Self::Enrolled { enrolled: n } => n,
        }
    }
}

/// A bare-metal node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BareMetalTarget {
    /// The enrolled BMC's name.
    pub bmc: String,
    /// The system behind the BMC (default: its first; an IPMI BMC has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredPower {
    #[default]
    On,
    Off,
}

impl DesiredPower {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

/// What the gateway does when a machine drifts from its declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Record the drift (`machine.drift`) only.
    Observe,
    /// Record it and raise an alert (`machine.alert`, marked `alert`).
    #[default]
    Alert,
    /// Converge the machine back (`machine.heal`), within the heal budget.
    Heal,
}

/// At most `max_heals` heals within any `window_seconds`; a drift past it is alerted
/// (`machine.heal_budget_exhausted`) and healing of that machine stops until its declaration is
/// updated (`PUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealBudget {
    pub max_heals: u32,
    pub window_seconds: u64,
}

impl Default for HealBudget {
    fn default() -> Self {
        HealBudget {
            max_heals: 3,
            window_seconds: 3600,
        }
    }
}

/// Which provider a declaration targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Vsphere,
    Openstack,
    BareMetal,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vsphere => "vsphere",
            Self::Openstack => "openstack",
            Self::BareMetal => "bare_metal",
        }
    }
}

/// Names of enrolled vCenters and clouds: letters, digits, `-`, `_`, `.` (as enrolment takes).
fn endpoint_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn text_ok(n: &str) -> bool {
    !n.trim().is_empty() && n.chars().count() <= 128 && !n.chars().any(char::is_control)
}

impl Declaration {
    /// The provider of its one target.
    pub fn provider(&self) -> Provider {
        match (&self.vsphere, &self.openstack) {
            (Some(_), _) => Provider::Vsphere,
            (None, Some(_)) => Provider::Openstack,
            _ => Provider::BareMetal,
        }
    }

    /// The VM target (vSphere or OpenStack), if it is a VM.
    pub fn vm(&self) -> Option<&VmTarget> {
        self.vsphere.as_ref().or(self.openstack.as_ref())
    }

    /// The enrolled endpoint it names (vCenter, cloud or BMC).
    pub fn endpoint(&self) -> &str {
        match (self.vm(), &self.bare_metal) {
            (Some(t), _) => t.endpoint.name(),
            (None, Some(b)) => &b.bmc,
            (None, None) => "",
        }
    }

    /// Checks everything but the VM spec's fields (the gateway's driver types check those):
    /// exactly one target, enrolled names in the form its provider takes, no credentials, a
    /// budget within bounds. The message names the field and says what to do.
    pub fn check(&self) -> Result<(), String> {
        if !text_ok(&self.name) {
            return Err(
                "name: give 1 to 128 characters without control characters (a label for people)"
                    .into(),
            );
        }
        let targets = [
            self.vsphere.is_some(),
            self.openstack.is_some(),
            self.bare_metal.is_some(),
        ]
        .iter()
        .filter(|t| **t)
        .count();
        if targets != 1 {
            return Err(format!(
                "give exactly one of `vsphere`, `openstack` or `bare_metal` (got {targets})"
            ));
        }
        if let Some(t) = &self.vsphere {
            match &t.endpoint {
                EndpointName::Name(n) if endpoint_name_ok(n) => {}
                EndpointName::Name(_) => {
                    return Err("vsphere.endpoint: the name of a vCenter enrolled with vsphere.enrol (letters, digits, '-', '_', '.')".into())
                }
                EndpointName::Enrolled { .. } => {
                    return Err("vsphere.endpoint: give the enrolled vCenter's name as a string, e.g. \"lab-vc\"".into())
                }
            }
        }
        if let Some(t) = &self.openstack {
            match &t.endpoint {
                EndpointName::Enrolled { enrolled } if endpoint_name_ok(enrolled) => {}
                _ => {
                    return Err("openstack.endpoint: give {\"enrolled\": NAME}, NAME a cloud enrolled with openstack.enrol (credentials are never part of a declaration)".into())
                }
            }
        }
        for (field, t) in [("vsphere", &self.vsphere), ("openstack", &self.openstack)] {
            let Some(t) = t else { continue };
            if !t.vm.is_object() {
                return Err(format!("{field}.vm: give the VM spec as an object (name, source, cpus, memory_mib, networks, placement, ...)"));
            }
            if t.vm.get("power_on").is_some() {
                return Err(format!(
                    "{field}.vm.power_on: leave it out; the declaration's `power` (on or off) says the power state to keep"
                ));
            }
            if crate::sealed::contains_secrets(&t.vm) {
                return Err(format!(
                    "{field}.vm: a declaration carries no secrets (a key named like a password was found); enrol the endpoint and refer to it by name"
                ));
            }
            if let Some(id) = &t.adopt_id {
                if !text_ok(id) {
                    return Err(format!(
                        "{field}.adopt_id: give the provider's id of the VM to adopt"
                    ));
                }
            }
        }
        if let Some(b) = &self.bare_metal {
            if !text_ok(&b.bmc) {
                return Err(
                    "bare_metal.bmc: the name of a BMC enrolled with baremetal.enrol".into(),
                );
            }
            if b.system.as_deref().is_some_and(|s| !text_ok(s)) {
                return Err("bare_metal.system: a system id as the BMC lists it".into());
            }
        }
        let b = self.heal_budget;
        if b.max_heals == 0 || b.max_heals > MAX_HEALS {
            return Err(format!(
                "heal_budget.max_heals: give 1 to {MAX_HEALS} (use policy `alert` for no heals)"
            ));
        }
        if b.window_seconds == 0 || b.window_seconds > MAX_WINDOW_SECONDS {
            return Err(format!(
                "heal_budget.window_seconds: give 1 to {MAX_WINDOW_SECONDS}"
            ));
        }
        Ok(())
    }
}

/// Where a machine stands, as the gateway reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Declared; the gateway has not observed it yet.
    #[default]
    Pending,
    /// Being created, powered or deleted to match its declaration.
    Converging,
    /// As declared.
    InSync,
    /// Not as declared (see `drift`); the policy decides what happens.
    Drifted,
    /// Its declaration was deleted; the VM is being deleted.
    Deleting,
    /// Deleted (the last report of a machine).
    Deleted,
    /// The declaration cannot be applied as it is (see `error`); update it.
    Invalid,
    /// Its endpoint could not be read (see `error`).
    Unreachable,
}

/// One way a machine differs from its declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// `present`, `power`, `cpus`, `memory_mib`.
    pub field: String,
    pub desired: Value,
    pub observed: Value,
}

/// The use of a machine's heal budget.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealUse {
    /// Heals within the current window.
    pub used: u32,
    pub max_heals: u32,
    pub window_seconds: u64,
    /// The budget ran out: the machine is no longer healed until its declaration is updated.
    pub suspended: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heal_ms: Option<i64>,
}

/// What the gateway last saw of a machine.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Observed {
    pub state: MachineState,
    /// The declaration generation this observation was judged against.
    pub generation: u64,
    /// The last generation the gateway converged the machine to.
    pub converged_generation: u64,
    /// The provider's id (vSphere moref, Nova server id; the system id for bare metal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// Ids of earlier VMs of this machine (deleted out of band and created again), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_ids: Vec<String>,
    /// Whether the provider has it (None: not known, e.g. the endpoint did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// `on`, `off`, `powering_on`, `powering_off`, `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// When this observation was made (Unix ms).
    pub observed_ms: i64,
    /// When the provider last showed the machine as present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
    /// How it differs from its declaration now (empty when in sync).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<Drift>,
    pub heals: HealUse,
    /// Why it is invalid or unreachable, or what the last converging action failed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Kinds of [`MachineEvent`].
pub mod kinds {
    /// The machine differs from its declaration (`details`: `before`, `after`, `drift`).
    pub const DRIFT: &str = "machine.drift";
    /// A drift under the `alert` policy, or one the heal budget no longer covers.
    pub const ALERT: &str = "machine.alert";
    /// A heal: what was done and its result (`details`: `action`, `result`, ids).
    pub const HEAL: &str = "machine.heal";
    /// A drift found the heal budget used up; healing stops until the declaration is updated.
    pub const HEAL_BUDGET_EXHAUSTED: &str = "machine.heal_budget_exhausted";
    /// The machine matches its declaration again (healed, or fixed by someone else).
    pub const DRIFT_RESOLVED: &str = "machine.drift_resolved";
    /// A converging action for a (new) declaration: create, adopt, power, delete, and its result.
    pub const CONVERGED: &str = "machine.converged";
    /// The machine and its VM are deleted; the gateway forgot it.
    pub const DELETED: &str = "machine.deleted";
    /// The declaration cannot be applied, or an action failed.
    pub const ERROR: &str = "machine.error";
}

/// Something the watch loop found or did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineEvent {
    /// Chosen by the gateway (`mev_` + hex): the SaaS records an id once.
    pub id: String,
    pub machine_id: String,
    /// One of [`kinds`].
    pub kind: String,
    /// Marked as an alert (the events list filters on it).
    #[serde(default)]
    pub alert: bool,
    pub message: String,
    /// Before/after, action and result, as the kind describes.
    #[serde(default)]
    pub details: Value,
    pub at_ms: i64,
}

/// One provider endpoint as the gateway last read it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EndpointHealth {
    /// `vsphere`, `openstack`, `bare_metal`.
    pub provider: String,
    /// The name it was enrolled under.
    pub name: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ok_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_ms: Option<i64>,
    /// Declared machines on it.
    pub machines: usize,
    /// Inventory summary: VMs (servers) and how many are powered on; templates (vSphere); for a
    /// BMC, the power state of its system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub powered_on: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<String>,
    /// Requests the last read of this endpoint cost (the driver's own count; vSphere and
    /// OpenStack), and how long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ms: Option<u64>,
}

/// The gateway's health and provider inventory summary, sent on the report interval.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Health {
    pub at_ms: i64,
    pub version: String,
    pub uptime_s: u64,
    /// Tunnel facts: state, transport, round-trip time, connects, last error.
    pub tunnel: Value,
    /// Store: whether it takes a durable write, journal and outbox depth.
    pub store: Value,
    /// Watch loop: machines, interval, cycles, the last cycle's duration.
    pub watch: Value,
    /// Every enrolled endpoint.
    pub endpoints: Vec<EndpointHealth>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl(v: Value) -> Result<Declaration, String> {
        let d: Declaration = serde_json::from_value(v).map_err(|e| e.to_string())?;
        d.check().map(|()| d)
    }

    #[test]
    fn declarations_are_checked_and_name_the_field() {
        let vm = json!({"name": "web-1", "source": "tpl", "placement": {"provider": "vsphere"}});
        let d = decl(json!({"name": "web", "vsphere": {"endpoint": "lab", "vm": vm}})).expect("ok");
        assert_eq!(d.provider(), Provider::Vsphere);
        assert_eq!(d.endpoint(), "lab");
        assert_eq!(d.power, DesiredPower::On);
        assert_eq!(d.policy, Policy::Alert);
        assert_eq!(d.heal_budget, HealBudget::default());
        let d = decl(
            json!({"name": "n", "bare_metal": {"bmc": "node1"}, "power": "off",
            "policy": "heal", "heal_budget": {"max_heals": 2, "window_seconds": 60}}),
        )
        .expect("ok");
        assert_eq!(d.provider(), Provider::BareMetal);
        for (bad, needle) in [
            (json!({"name": "x"}), "exactly one"),
            (
                json!({"name": "x", "bare_metal": {"bmc": "a"}, "vsphere": {"endpoint": "a", "vm": vm}}),
                "exactly one",
            ),
            (
                json!({"name": "x", "vsphere": {"endpoint": {"enrolled": "a"}, "vm": vm}}),
                "vsphere.endpoint",
            ),
            (
                json!({"name": "x", "openstack": {"endpoint": "lab", "vm": vm}}),
                "openstack.endpoint",
            ),
            (
                json!({"name": "x", "vsphere": {"endpoint": "lab", "vm": {"name": "a", "power_on": false}}}),
                "power_on",
            ),
            (
                json!({"name": "x", "vsphere": {"endpoint": "lab", "vm": {"name": "a", "metadata": {"password": "p"}}}}),
                "no secrets",
            ),
            (
                json!({"name": "x", "bare_metal": {"bmc": "a"}, "heal_budget": {"max_heals": 0, "window_seconds": 5}}),
                "max_heals",
            ),
            (
                json!({"name": "x", "bare_metal": {"bmc": "a"}, "colour": 1}),
                "colour",
            ),
            (json!({"name": "", "bare_metal": {"bmc": "a"}}), "name"),
        ] {
            let e = decl(bad.clone()).expect_err("refused");
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn observations_round_trip() {
        let o = Observed {
            state: MachineState::Drifted,
            generation: 2,
            provider_id: Some("vm-42".into()),
            drift: vec![Drift {
                field: "power".into(),
                desired: json!("on"),
                observed: json!("off"),
            }],
            ..Observed::default()
        };
        let back: Observed =
            serde_json::from_slice(&serde_json::to_vec(&o).expect("ser")).expect("de");
        assert_eq!(back, o);
        assert_eq!(
            serde_json::to_value(MachineState::InSync).expect("ser"),
            "in_sync"
        );
    }
}
