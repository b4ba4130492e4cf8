//! The `VmProvider` trait: virtual machines on a cloud endpoint (vCenter, OpenStack), with the
//! spec, observed state, inventory and placement types its drivers share.
//!
//! # Contract
//!
//! A VM driver is bound to one endpoint (one vCenter, one OpenStack project) and keeps one
//! session there, shared by all operations and renewed transparently when it expires. Every
//! operation fails with one [`ProviderError`] naming the endpoint (and the user, for
//! credentials); passwords never appear in messages, logs or `Debug` output.
//!
//! - **create** is idempotent by command id: the driver marks the VM with `command_id` (a vSphere
//!   extraConfig key, Nova metadata) *as part of the create request*, and before creating it looks
//!   for a VM carrying that id. A create delivered twice (a retry after a crash, a redelivery)
//!   returns the VM the first one made and never makes a twin. Progress is reported through the
//!   sink; the call returns when the VM exists (and, with `power_on`, was powered on).
//! - **get** reads one VM by its provider id; `NotFound` when it does not exist.
//! - **find_by_command** returns the VM carrying a command id, if any.
//! - **list** returns every VM and template the user can see (paged by the driver as needed).
//! - **inventory** returns the placement objects (datacenters, clusters, hosts, datastores,
//!   networks, folders, resource pools, or their OpenStack counterparts) and every VM.
//! - **power**: `On` and `Off` are idempotent (already there is success without action);
//!   `SoftShutdown` asks the guest OS (needs guest tools/agent); `Reset` and `Cycle` act every time.
//!   Returns when the provider finished the request (its task, where it has tasks).
//! - **delete** powers the VM off when needed and destroys it; a VM already gone is success
//!   (`Ok(false)`), so a retried delete is harmless.
//! - **wait_ip** polls until the guest reports an IP address, or `Timeout` after `bound`.
//!
//! The checks every VM driver runs against its real peer are in `conformance` (feature
//! `conformance`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{ProviderError, Result};
use crate::types::{PowerAction, PowerState, ProgressSink};

/// Default bound on waiting for a guest IP address.
pub const DEFAULT_IP_WAIT: Duration = Duration::from_secs(120);

/// Where to place a VM, per provider. Names or provider ids (a vSphere moref such as
/// `domain-c7`) are both accepted where the driver can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "provider", deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum VmPlacement {
    /// vCenter placement. Absent fields default to the template's (datacenter, folder,
    /// datastore) or to the first compute resource of the datacenter (pool).
    Vsphere {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        datacenter: Option<String>,
        /// A cluster (its root resource pool is used unless `resource_pool` is given).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource_pool: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// The VM folder the clone goes into.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        folder: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        datastore: Option<String>,
    },
    /// OpenStack placement.
    Openstack {
        /// Flavor name or id (sizes come from the flavor; `cpus`/`memory_mib` pick one when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flavor: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        availability_zone: Option<String>,
    },
}

/// A VM to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VmSpec {
    /// The VM's name (not blank).
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"\S")))]
    pub name: String,
    /// What to create the VM from: a vSphere template (name or moref), an OpenStack image.
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"\S")))]
    pub source: String,
    /// vCPUs (at least 1); absent: the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub cpus: Option<u32>,
    /// Memory in MiB (at least 1); absent: the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub memory_mib: Option<u64>,
    /// Networks to attach (vSphere portgroup names, OpenStack network names or ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// cloud-init user-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// cloud-init meta-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// Power the VM on after creating it (default true).
    #[serde(default = "yes")]
    pub power_on: bool,
    pub placement: VmPlacement,
}

fn yes() -> bool {
    true
}

impl VmSpec {
    /// Checks the fields every provider needs.
    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(ProviderError::invalid("name", "must not be empty"));
        }
        if self.source.trim().is_empty() {
            return Err(ProviderError::invalid(
                "source",
                "must name a template or image",
            ));
        }
        if self.cpus == Some(0) {
            return Err(ProviderError::invalid("cpus", "must be at least 1"));
        }
        if self.memory_mib == Some(0) {
            return Err(ProviderError::invalid("memory_mib", "must be at least 1"));
        }
        Ok(())
    }
}

/// The observed state of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The provider's id (vSphere moref such as `vm-42`, Nova server UUID).
    pub id: String,
    pub name: String,
    pub power: PowerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The guest's primary IP address, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Whether this is a template (vSphere) rather than a VM.
    #[serde(default)]
    pub template: bool,
    /// The pcg command id that created this VM, when pcg created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Provider-specific facts (host, resource pool, instance UUID, flavor...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// One placement object of an inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryObject {
    /// The provider's type name (vSphere: `Datacenter`, `ClusterComputeResource`, `HostSystem`,
    /// `Datastore`, `Network`, `DistributedVirtualPortgroup`, `Folder`, `ResourcePool`).
    pub kind: String,
    pub id: String,
    pub name: String,
    /// The id of the parent object, where the provider has a tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// Everything a VM endpoint holds that pcg places or manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Inventory {
    pub objects: Vec<InventoryObject>,
    /// VMs and templates.
    pub vms: Vec<VmInfo>,
}

/// A driver bound to one VM endpoint. See the module documentation for the contract.
#[async_trait]
pub trait VmProvider: Send + Sync {
    /// The endpoint as configured (for messages).
    fn endpoint(&self) -> &str;

    /// Creates the VM, or returns the one an earlier delivery of `command_id` created.
    async fn create(
        &self,
        command_id: &str,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
    ) -> Result<VmInfo>;

    /// The VM carrying `command_id`, if any.
    async fn find_by_command(&self, command_id: &str) -> Result<Option<VmInfo>>;

    /// One VM by provider id.
    async fn get(&self, id: &str) -> Result<VmInfo>;

    /// Every VM and template.
    async fn list(&self) -> Result<Vec<VmInfo>>;

    /// Placement objects and VMs.
    async fn inventory(&self) -> Result<Inventory>;

    /// A power action; see the module documentation.
    async fn power(&self, id: &str, action: PowerAction) -> Result<()>;

    /// Destroys the VM (powering it off first). `Ok(false)` when it was already gone.
    async fn delete(&self, id: &str, progress: ProgressSink<'_>) -> Result<bool>;

    /// Waits until the guest reports an IP address.
    async fn wait_ip(&self, id: &str, bound: Duration) -> Result<String>;

    /// Ends the session on the endpoint (the driver logs in again when used).
    async fn close(&self) -> Result<()>;
}

/// The conformance suite for VM drivers (feature `conformance`): each check drives a
/// `&dyn VmProvider` through one part of the contract above against the driver's real peer and
/// panics with what was expected and what was seen.
#[cfg(feature = "conformance")]
pub mod conformance {
    use std::time::{Duration, Instant};

    use super::{VmInfo, VmProvider, VmSpec};
    use crate::error::{ErrorKind, ProviderError};
    use crate::types::{no_progress, PowerAction, PowerState};

    fn ok<T>(what: &str, r: Result<T, ProviderError>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!("conformance: {what} failed: {e} (kind {:?})", e.kind()),
        }
    }

    /// Polls `get` until the VM's power is `want` (providers may settle after answering).
    async fn wait_power(d: &dyn VmProvider, id: &str, want: PowerState, bound: Duration) {
        let start = Instant::now();
        loop {
            let vm = ok("get", d.get(id).await);
            if vm.power == want {
                return;
            }
            assert!(
                start.elapsed() < bound,
                "conformance: {id} still {:?} after {bound:?}, wanted {want:?}",
                vm.power
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Create (twice with one command id: one VM), then get, list and find_by_command agree.
    /// Returns the VM for the following checks.
    pub async fn create_idempotent(d: &dyn VmProvider, command_id: &str, spec: &VmSpec) -> VmInfo {
        let first = ok("create", d.create(command_id, spec, &no_progress).await);
        assert_eq!(first.name, spec.name, "conformance: created VM's name");
        assert_eq!(
            first.command_id.as_deref(),
            Some(command_id),
            "conformance: the VM must carry the command id"
        );
        let again = ok(
            "create (same command again)",
            d.create(command_id, spec, &no_progress).await,
        );
        assert_eq!(
            again.id, first.id,
            "conformance: a repeated create made a twin"
        );
        let listed: Vec<VmInfo> = ok("list", d.list().await)
            .into_iter()
            .filter(|v| v.command_id.as_deref() == Some(command_id))
            .collect();
        assert_eq!(
            listed.len(),
            1,
            "conformance: {} VMs carry command {command_id}: {listed:?}",
            listed.len()
        );
        let found = ok("find_by_command", d.find_by_command(command_id).await);
        assert_eq!(found.map(|v| v.id), Some(first.id.clone()));
        let got = ok("get", d.get(&first.id).await);
        assert_eq!(got.id, first.id);
        first
    }

    /// Off (twice), on (twice), off: each reaches its state within `settle`.
    pub async fn power_round_trip(d: &dyn VmProvider, id: &str, settle: Duration) {
        for (action, want) in [
            (PowerAction::Off, PowerState::Off),
            (PowerAction::Off, PowerState::Off),
            (PowerAction::On, PowerState::On),
            (PowerAction::On, PowerState::On),
            (PowerAction::Off, PowerState::Off),
        ] {
            ok(&format!("power {action:?}"), d.power(id, action).await);
            wait_power(d, id, want, settle).await;
        }
    }

    /// Delete, delete again (`Ok(false)`), then `get` is `NotFound` and `list` lacks the VM.
    pub async fn delete_idempotent(d: &dyn VmProvider, id: &str) {
        assert!(
            ok("delete", d.delete(id, &no_progress).await),
            "conformance: the first delete must report a deletion"
        );
        assert!(
            !ok("delete (again)", d.delete(id, &no_progress).await),
            "conformance: deleting a VM already gone must be Ok(false)"
        );
        match d.get(id).await {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            other => panic!("conformance: get after delete: expected NotFound, got {other:?}"),
        }
        assert!(
            ok("list", d.list().await).iter().all(|v| v.id != id),
            "conformance: a deleted VM is still listed"
        );
    }

    /// An unknown id is `NotFound` for get.
    pub async fn unknown_is_not_found(d: &dyn VmProvider, unknown_id: &str) {
        match d.get(unknown_id).await {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            other => panic!("conformance: get({unknown_id}): expected NotFound, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trip_and_validation() {
        let json = r##"{"name":"web-1","source":"ubuntu-tpl","cpus":2,"memory_mib":2048,
            "networks":["VM Network"],"user_data":"#cloud-config\n",
            "placement":{"provider":"vsphere","datacenter":"DC0","cluster":"DC0_C0"}}"##;
        let spec: VmSpec = serde_json::from_str(json).expect("valid spec");
        assert!(spec.power_on);
        spec.validate().expect("valid");
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&spec).expect("serialises"))
            .expect("round trip");
        assert_eq!(back, spec);
        let typo = r#"{"name":"w","source":"t","placement":{"provider":"vsphere","clutser":"c"}}"#;
        let err = serde_json::from_str::<VmSpec>(typo).expect_err("unknown key");
        assert!(err.to_string().contains("clutser"), "{err}");
        let bad = VmSpec {
            cpus: Some(0),
            ..spec
        };
        assert!(bad.validate().is_err());
    }
}
