//! [`VsphereDriver`]: the `VmProvider` contract on vSphere Web Services — inventory, clone from a
//! template, power, destroy, task and guest-IP waits.
//!
//! Cancellation ([`VsphereDriver::create_with`]): a clone whose command is cancelled is
//! cancelled through its vCenter task (`CancelTask`, where vCenter allows it) and is not
//! reconfigured or powered on afterwards; the error says whether a VM was left behind.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use pcg_provider::vm::{Inventory, InventoryObject, VmInfo, VmPlacement, VmProvider, VmSpec};
use pcg_provider::{
    async_trait, no_progress, PowerAction, PowerState, ProgressSink, ProviderError, Result,
    TaskProgress, TaskState,
};

use tokio_util::sync::CancellationToken;

use crate::fault::{Fault, FaultKind};
use crate::soap::{Client, ObjectContent};
use crate::xml::{elem, MoRef, Node};
use crate::VsphereEndpoint;

/// The extraConfig key carrying the id of the pcg command that created a VM.
pub const COMMAND_KEY: &str = "guestinfo.pcg.command-id";

/// Bound on one vCenter task (clone, power, destroy).
pub const TASK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// VM properties read for [`VmInfo`].
const VM_PROPS: &[&str] = &[
    "name",
    "runtime.powerState",
    "config.template",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "guest.ipAddress",
    "config.extraConfig",
    "runtime.host",
    "resourcePool",
    "config.instanceUuid",
];

/// Placement object types read for the inventory (subtypes included: ClusterComputeResource
/// under ComputeResource, DistributedVirtualPortgroup and OpaqueNetwork under Network).
const PLACEMENT_TYPES: &[&str] = &[
    "Datacenter",
    "Folder",
    "ComputeResource",
    "HostSystem",
    "ResourcePool",
    "Datastore",
    "Network",
];

/// The driver for one vCenter endpoint. Cloning shares the session.
#[derive(Debug, Clone)]
pub struct VsphereDriver {
    client: Client,
    /// One lock per command id being created, so concurrent deliveries of one create in this
    /// process run one after the other (the second finds the first's VM). Across processes,
    /// vCenter's DuplicateName on the same name in the same folder is the second guard.
    creating: Arc<StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

fn power_of(s: Option<&str>) -> PowerState {
    match s {
        Some("poweredOn") => PowerState::On,
        Some("poweredOff") => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

/// `(key, value)` pairs of an `ArrayOfOptionValue`.
fn option_values(n: &Node) -> impl Iterator<Item = (&str, &str)> {
    n.children.iter().filter_map(|o| {
        Some((
            o.child_text("key")?,
            o.child("value").map(|v| v.text.as_str()).unwrap_or(""),
        ))
    })
}

/// A VM's observed state from its properties.
pub fn vm_info(o: &ObjectContent) -> VmInfo {
    let mut details = BTreeMap::new();
    let mut command_id = None;
    if let Some(ec) = o.get("config.extraConfig") {
        for (k, v) in option_values(ec) {
            if k == COMMAND_KEY {
                command_id = Some(v.to_owned());
            }
        }
    }
    if let Some(h) = o.moref("runtime.host") {
        details.insert("host".into(), h.value);
    }
    if let Some(p) = o.moref("resourcePool") {
        details.insert("resource_pool".into(), p.value);
    }
    if let Some(u) = o.text("config.instanceUuid") {
        details.insert("instance_uuid".into(), u.to_owned());
    }
    if let Some(s) = o.text("runtime.powerState") {
        details.insert("power_state".into(), s.to_owned());
    }
    VmInfo {
        id: o.obj.value.clone(),
        name: o.text("name").unwrap_or_default().to_owned(),
        power: power_of(o.text("runtime.powerState")),
        cpus: o
            .text("config.hardware.numCPU")
            .and_then(|s| s.parse().ok()),
        memory_mib: o
            .text("config.hardware.memoryMB")
            .and_then(|s| s.parse().ok()),
        ip: o
            .text("guest.ipAddress")
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        template: o.text("config.template") == Some("true"),
        command_id,
        details,
    }
}

fn vm_ref(id: &str) -> MoRef {
    MoRef::new("VirtualMachine", id)
}

/// Placement objects with a parent map, for resolving names.
struct Objects {
    list: Vec<InventoryObject>,
    by_id: HashMap<String, usize>,
}

impl Objects {
    fn new(list: Vec<InventoryObject>) -> Self {
        let by_id = list
            .iter()
            .enumerate()
            .map(|(i, o)| (o.id.clone(), i))
            .collect();
        Self { list, by_id }
    }

    fn get(&self, id: &str) -> Option<&InventoryObject> {
        self.by_id.get(id).map(|i| &self.list[*i])
    }

    fn under(&self, id: &str, ancestor: &str) -> bool {
        let mut cur = Some(id.to_owned());
        let mut hops = 0;
        while let Some(c) = cur {
            if c == ancestor {
                return true;
            }
            hops += 1;
            if hops > 64 {
                return false;
            }
            cur = self.get(&c).and_then(|o| o.parent.clone());
        }
        false
    }

    /// One object of `kinds` whose id or name is `want`, under `within` when given.
    fn find(
        &self,
        field: &str,
        kinds: &[&str],
        want: &str,
        within: Option<&str>,
    ) -> Result<&InventoryObject> {
        let hits: Vec<&InventoryObject> = self
            .list
            .iter()
            .filter(|o| kinds.contains(&o.kind.as_str()))
            .filter(|o| o.id == want || o.name == want)
            .filter(|o| within.is_none_or(|w| self.under(&o.id, w)))
            .collect();
        match hits.as_slice() {
            [one] => Ok(one),
            [] => Err(ProviderError::invalid(
                field,
                format!("no {} named {want:?}", kinds.join("/")),
            )),
            many => Err(ProviderError::invalid(
                field,
                format!(
                    "{want:?} is ambiguous ({}); give the datacenter or the id",
                    many.iter()
                        .map(|o| o.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    fn moref(&self, o: &InventoryObject) -> MoRef {
        MoRef::new(o.kind.clone(), o.id.clone())
    }
}

fn ethernet_types() -> &'static [&'static str] {
    &[
        "VirtualE1000",
        "VirtualE1000e",
        "VirtualVmxnet",
        "VirtualVmxnet2",
        "VirtualVmxnet3",
        "VirtualVmxnet3Vrdma",
        "VirtualPCNet32",
        "VirtualSriovEthernetCard",
    ]
}

fn string_option(key: &str, value: &str) -> String {
    format!(
        "<extraConfig xsi:type=\"OptionValue\">{}<value xsi:type=\"xsd:string\">{}</value></extraConfig>",
        elem("key", key),
        crate::xml::escape(value)
    )
}

impl VsphereDriver {
    /// Connects (service content + login). A wrong password fails here with `Auth`.
    pub async fn connect(ep: &VsphereEndpoint) -> Result<Self> {
        Ok(Self {
            client: Client::connect(ep).await?,
            creating: Arc::default(),
        })
    }

    /// The SOAP client (shares this driver's session).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn url(&self) -> String {
        self.client.endpoint().to_owned()
    }

    /// Every placement object (datacenters, folders, compute resources and clusters, hosts,
    /// resource pools, datastores, networks and portgroups).
    pub async fn placement_objects(&self) -> Result<Vec<InventoryObject>> {
        let root = self.client.service_content().root_folder.clone();
        let types: Vec<(&str, &[&str])> = PLACEMENT_TYPES
            .iter()
            .map(|t| (*t, &["name", "parent"][..]))
            .collect();
        let objs = self.client.retrieve_view(&root, &types).await?;
        Ok(objs
            .into_iter()
            .map(|o| InventoryObject {
                kind: o.obj.kind.clone(),
                id: o.obj.value.clone(),
                name: o.text("name").unwrap_or_default().to_owned(),
                parent: o.moref("parent").map(|p| p.value),
            })
            .collect())
    }

    /// Waits for a task, reporting its progress scaled into `[from, to]` percent. A task that
    /// failed comes back as `Ok(Err(fault))`.
    pub async fn wait_task(
        &self,
        task: &MoRef,
        what: &str,
        progress: ProgressSink<'_>,
        span: (u8, u8),
    ) -> Result<std::result::Result<Option<Node>, Fault>> {
        self.wait_task_cancellable(task, what, progress, span, &CancellationToken::new())
            .await
            .map(|(r, _)| r)
    }

    /// [`wait_task`](Self::wait_task) that asks vCenter to cancel the task (`CancelTask`) once
    /// `cancel` fires, then waits for the task to end as vCenter decides (a task past the point
    /// of no return succeeds anyway). Also returns what `CancelTask` answered, when it was asked:
    /// `Ok(())`, or the fault that refused it.
    pub async fn wait_task_cancellable(
        &self,
        task: &MoRef,
        what: &str,
        progress: ProgressSink<'_>,
        (from, to): (u8, u8),
        cancel: &CancellationToken,
    ) -> Result<(
        std::result::Result<Option<Node>, Fault>,
        Option<std::result::Result<(), Fault>>,
    )> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut last = None;
        let mut asked: Option<std::result::Result<(), Fault>> = None;
        loop {
            if cancel.is_cancelled() && asked.is_none() {
                asked = Some(self.cancel_task(task).await?);
            }
            let o = self.client.retrieve_one(task, &["info"]).await?;
            let info = o.get("info").cloned().unwrap_or_default();
            let state = info.child_text("state").unwrap_or("");
            let pct: Option<u8> = info
                .child_text("progress")
                .and_then(|p| p.parse::<u8>().ok());
            match state {
                "success" => return Ok((Ok(info.child("result").cloned()), asked)),
                "error" => {
                    let fault = info
                        .child("error")
                        .map(Fault::from_localized)
                        .unwrap_or(Fault {
                            type_name: "SystemError".into(),
                            message: format!("{what} failed without saying why"),
                        });
                    return Ok((Err(fault), asked));
                }
                _ => {
                    let scaled = from
                        + ((u16::from(to.saturating_sub(from)) * u16::from(pct.unwrap_or(0))) / 100)
                            as u8;
                    if last != Some(scaled) {
                        progress(&TaskProgress::running(
                            scaled,
                            format!("{what}: {state} {}%", pct.unwrap_or(0)),
                        ));
                        last = Some(scaled);
                    }
                }
            }
            if start.elapsed() > TASK_TIMEOUT {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::Vcenter,
                    endpoint: self.url(),
                    operation: format!("{what} ({task})"),
                    after: TASK_TIMEOUT,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled(), if asked.is_none() => {}
            }
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Asks vCenter to cancel a task: `Ok(Ok(()))` when it took the request, `Ok(Err(fault))`
    /// when it refused (a task that is not cancelable or already ended; a server without
    /// `CancelTask` answers `MethodNotFound`).
    pub async fn cancel_task(&self, task: &MoRef) -> Result<std::result::Result<(), Fault>> {
        let body = format!("<CancelTask>{}</CancelTask>", task.xml("_this"));
        let r = self
            .client
            .call_fault("CancelTask", &body)
            .await?
            .map(|_| ());
        match &r {
            Ok(()) => {
                tracing::info!(%task, endpoint = %self.url(), "asked vCenter to cancel the task")
            }
            Err(f) => {
                tracing::info!(%task, endpoint = %self.url(), fault = %f.type_name, "vCenter did not cancel the task: {}", f.message)
            }
        }
        Ok(r)
    }

    /// Runs a `*_Task` method and waits for it; faults are returned for the caller to handle.
    async fn run_task(
        &self,
        op: &str,
        body: &str,
        progress: ProgressSink<'_>,
        span: (u8, u8),
    ) -> Result<std::result::Result<Option<Node>, Fault>> {
        let task = match self.client.call_fault(op, body).await? {
            Ok(n) => n.and_then(|n| n.moref()),
            Err(f) => return Ok(Err(f)),
        };
        let task = task.ok_or_else(|| ProviderError::ProviderFault {
            endpoint: self.url(),
            message: format!("{op} returned no task"),
        })?;
        self.wait_task(&task, op, progress, span).await
    }

    async fn power_task(&self, id: &str, op: &str) -> Result<std::result::Result<(), Fault>> {
        let body = format!("<{op}>{}</{op}>", vm_ref(id).xml("_this"));
        Ok(self
            .run_task(op, &body, &no_progress, (0, 100))
            .await?
            .map(|_| ()))
    }

    fn not_found_is_none<T>(&self, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The template (or VM) to clone, by moref or name.
    async fn resolve_source(&self, source: &str) -> Result<MoRef> {
        let looks_like_moref = source
            .strip_prefix("vm-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if looks_like_moref {
            if let Some(o) =
                self.not_found_is_none(self.client.retrieve_one(&vm_ref(source), &["name"]).await)?
            {
                return Ok(o.obj);
            }
        }
        let root = self.client.service_content().root_folder.clone();
        let vms = self
            .client
            .retrieve_view(
                &root,
                &[("VirtualMachine", &["name", "config.template"][..])],
            )
            .await?;
        let hits: Vec<&ObjectContent> = vms
            .iter()
            .filter(|o| o.text("name") == Some(source))
            .collect();
        let templates: Vec<&ObjectContent> = hits
            .iter()
            .copied()
            .filter(|o| o.text("config.template") == Some("true"))
            .collect();
        match (templates.as_slice(), hits.as_slice()) {
            ([one], _) | ([], [one]) => Ok(one.obj.clone()),
            ([], []) => Err(ProviderError::invalid(
                "source",
                format!("{}: no template or VM named {source:?}", self.url()),
            )),
            _ => Err(ProviderError::invalid(
                "source",
                format!(
                    "{}: several templates named {source:?}; give its id",
                    self.url()
                ),
            )),
        }
    }

    /// Builds the CloneVM_Task request for `spec`.
    async fn clone_body(&self, command_id: &str, spec: &VmSpec, source: &MoRef) -> Result<String> {
        let VmPlacement::Vsphere {
            datacenter,
            cluster,
            resource_pool,
            host,
            folder,
            datastore,
        } = &spec.placement
        else {
            return Err(ProviderError::invalid(
                "placement",
                "a vSphere endpoint needs a vsphere placement",
            ));
        };
        let objects = Objects::new(self.placement_objects().await?);
        let src = self
            .client
            .retrieve_one(
                source,
                &["parent", "runtime.host", "config.hardware.device"],
            )
            .await?;
        let dc = match datacenter {
            Some(d) => Some(
                objects
                    .find("placement.datacenter", &["Datacenter"], d, None)?
                    .id
                    .clone(),
            ),
            None => None,
        };
        let within = dc.as_deref();

        // Folder: given, else the datacenter's VM folder, else the template's folder.
        let folder = match (folder, &dc) {
            (Some(f), _) => {
                objects.moref(objects.find("placement.folder", &["Folder"], f, within)?)
            }
            (None, Some(dc)) => self
                .client
                .retrieve_one(&MoRef::new("Datacenter", dc.clone()), &["vmFolder"])
                .await?
                .moref("vmFolder")
                .ok_or_else(|| {
                    ProviderError::invalid("placement.datacenter", "has no VM folder")
                })?,
            (None, None) => src.moref("parent").ok_or_else(|| {
                ProviderError::invalid("placement.folder", "the template has no folder; give one")
            })?,
        };

        // Host, when asked for.
        let host_ref = match host {
            Some(h) => {
                Some(objects.moref(objects.find("placement.host", &["HostSystem"], h, within)?))
            }
            None => None,
        };
        // Pool: given, else the cluster's (or the host's compute resource's) root pool, else
        // the template's host's.
        let pool = if let Some(p) = resource_pool {
            objects.moref(objects.find("placement.resource_pool", &["ResourcePool"], p, within)?)
        } else {
            let compute = if let Some(c) = cluster {
                objects.moref(objects.find(
                    "placement.cluster",
                    &["ClusterComputeResource", "ComputeResource"],
                    c,
                    within,
                )?)
            } else {
                let h = host_ref
                    .clone()
                    .or_else(|| src.moref("runtime.host"))
                    .ok_or_else(|| {
                        ProviderError::invalid("placement", "give a cluster, host or resource pool")
                    })?;
                let parent = objects
                    .get(&h.value)
                    .and_then(|o| o.parent.clone())
                    .ok_or_else(|| {
                        ProviderError::invalid("placement.host", "host has no compute resource")
                    })?;
                let kind = objects
                    .get(&parent)
                    .map(|o| o.kind.clone())
                    .unwrap_or_else(|| "ComputeResource".into());
                MoRef::new(kind, parent)
            };
            self.client
                .retrieve_one(&compute, &["resourcePool"])
                .await?
                .moref("resourcePool")
                .ok_or_else(|| {
                    ProviderError::invalid(
                        "placement.cluster",
                        format!("{compute} has no resource pool"),
                    )
                })?
        };
        let datastore = match datastore {
            Some(d) => Some(objects.moref(objects.find(
                "placement.datastore",
                &["Datastore"],
                d,
                within,
            )?)),
            None => None,
        };

        // NICs: the template's cards in order get the requested networks; extra networks get
        // new vmxnet3 cards.
        let mut device_change = String::new();
        let nics: Vec<&Node> = src
            .get("config.hardware.device")
            .map(|d| {
                d.children
                    .iter()
                    .filter(|c| {
                        c.xsi_type
                            .as_deref()
                            .is_some_and(|t| ethernet_types().contains(&t))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (i, net) in spec.networks.iter().enumerate() {
            let n = objects.find(
                &format!("networks[{i}]"),
                &["Network", "DistributedVirtualPortgroup", "OpaqueNetwork"],
                net,
                within,
            )?;
            let backing = if n.kind == "DistributedVirtualPortgroup" {
                let pg = self
                    .client
                    .retrieve_one(
                        &objects.moref(n),
                        &["config.distributedVirtualSwitch", "key"],
                    )
                    .await?;
                let dvs = pg.moref("config.distributedVirtualSwitch").ok_or_else(|| {
                    ProviderError::invalid(format!("networks[{i}]"), "portgroup has no switch")
                })?;
                let uuid = self
                    .client
                    .retrieve_one(&dvs, &["uuid"])
                    .await?
                    .text("uuid")
                    .unwrap_or_default()
                    .to_owned();
                format!(
                    "<backing xsi:type=\"VirtualEthernetCardDistributedVirtualPortBackingInfo\"><port>{}{}</port></backing>",
                    elem("switchUuid", &uuid),
                    elem("portgroupKey", pg.text("key").unwrap_or(&n.id)),
                )
            } else {
                format!(
                    "<backing xsi:type=\"VirtualEthernetCardNetworkBackingInfo\">{}{}</backing>",
                    elem("deviceName", &n.name),
                    objects.moref(n).xml("network"),
                )
            };
            match nics.get(i) {
                Some(card) => {
                    // The whole device as read, with the new backing (servers expect the full
                    // device in an edit).
                    let mut card = (*card).clone();
                    card.name = "device".into();
                    let backing = crate::xml::parse(&format!(
                        "<w xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">{backing}</w>"
                    ))
                    .ok()
                    .and_then(|w| w.children.into_iter().next())
                    .ok_or_else(|| ProviderError::invalid(format!("networks[{i}]"), "bad backing"))?;
                    match card.children.iter_mut().find(|c| c.name == "backing") {
                        Some(b) => *b = backing,
                        None => card.children.insert(1.min(card.children.len()), backing),
                    }
                    device_change.push_str(&format!(
                        "<deviceChange><operation>edit</operation>{}</deviceChange>",
                        card.to_xml()
                    ));
                }
                None => device_change.push_str(&format!(
                    "<deviceChange><operation>add</operation><device xsi:type=\"VirtualVmxnet3\"><key>{}</key>{backing}<addressType>generated</addressType></device></deviceChange>",
                    -1 - i as i64
                )),
            }
        }

        let b64 = base64::engine::general_purpose::STANDARD;
        let mut extra = string_option(COMMAND_KEY, command_id);
        if let Some(u) = &spec.user_data {
            extra.push_str(&string_option("guestinfo.userdata", &b64.encode(u)));
            extra.push_str(&string_option("guestinfo.userdata.encoding", "base64"));
        }
        if let Some(m) = &spec.metadata {
            extra.push_str(&string_option("guestinfo.metadata", &b64.encode(m)));
            extra.push_str(&string_option("guestinfo.metadata.encoding", "base64"));
        }
        let mut config = String::new();
        if let Some(c) = spec.cpus {
            config.push_str(&elem("numCPUs", &c.to_string()));
        }
        if let Some(m) = spec.memory_mib {
            config.push_str(&elem("memoryMB", &m.to_string()));
        }
        config.push_str(&device_change);
        config.push_str(&extra);

        let mut location = String::new();
        if let Some(d) = &datastore {
            location.push_str(&d.xml("datastore"));
        }
        location.push_str(&pool.xml("pool"));
        if let Some(h) = &host_ref {
            location.push_str(&h.xml("host"));
        }
        Ok(format!(
            "<CloneVM_Task>{}{}{}<spec><location>{location}</location><template>false</template><config>{config}</config><powerOn>false</powerOn></spec></CloneVM_Task>",
            source.xml("_this"),
            folder.xml("folder"),
            elem("name", &spec.name),
        ))
    }

    /// Applies CPU and memory where the clone did not (some servers ignore them in a clone
    /// spec).
    async fn ensure_size(
        &self,
        vm: &VmInfo,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
    ) -> Result<()> {
        let mut config = String::new();
        if let Some(c) = spec.cpus.filter(|c| vm.cpus != Some(*c)) {
            config.push_str(&elem("numCPUs", &c.to_string()));
        }
        if let Some(m) = spec.memory_mib.filter(|m| vm.memory_mib != Some(*m)) {
            config.push_str(&elem("memoryMB", &m.to_string()));
        }
        if config.is_empty() {
            return Ok(());
        }
        let body = format!(
            "<ReconfigVM_Task>{}<spec>{config}</spec></ReconfigVM_Task>",
            vm_ref(&vm.id).xml("_this")
        );
        self.run_task("ReconfigVM_Task", &body, progress, (75, 80))
            .await?
            .map_err(|f| self.client.fault_error("ReconfigVM_Task", f))
            .map(|_| ())
    }
}

#[async_trait]
impl VmProvider for VsphereDriver {
    fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    async fn create(
        &self,
        command_id: &str,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
    ) -> Result<VmInfo> {
        self.create_with(command_id, spec, progress, &CancellationToken::new())
            .await
    }

    async fn find_by_command(&self, command_id: &str) -> Result<Option<VmInfo>> {
        // Only extraConfig of every VM, then the full properties of the one that matches.
        let root = self.client.service_content().root_folder.clone();
        let objs = self
            .client
            .retrieve_view(&root, &[("VirtualMachine", &["config.extraConfig"][..])])
            .await?;
        let hit = objs.iter().find(|o| {
            o.get("config.extraConfig").is_some_and(|ec| {
                option_values(ec).any(|(k, v)| k == COMMAND_KEY && v == command_id)
            })
        });
        match hit {
            Some(o) => self.not_found_is_none(self.get(&o.obj.value).await),
            None => Ok(None),
        }
    }

    async fn get(&self, id: &str) -> Result<VmInfo> {
        let o = self.client.retrieve_one(&vm_ref(id), VM_PROPS).await?;
        Ok(vm_info(&o))
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        let root = self.client.service_content().root_folder.clone();
        let objs = self
            .client
            .retrieve_view(&root, &[("VirtualMachine", VM_PROPS)])
            .await?;
        Ok(objs.iter().map(vm_info).collect())
    }

    async fn inventory(&self) -> Result<Inventory> {
        Ok(Inventory {
            objects: self.placement_objects().await?,
            vms: self.list().await?,
        })
    }

    async fn power(&self, id: &str, action: PowerAction) -> Result<()> {
        let current = self.get(id).await?.power;
        let tolerate = |r: std::result::Result<(), Fault>, op: &str| match r {
            Ok(()) => Ok(()),
            // Already in the requested state (a race with another actor): the goal holds.
            Err(f) if f.kind() == FaultKind::InvalidPowerState => Ok(()),
            Err(f) => Err(self.client.fault_error(op, f)),
        };
        match action {
            PowerAction::On if current == PowerState::On => Ok(()),
            PowerAction::Off if current == PowerState::Off => Ok(()),
            PowerAction::On => tolerate(
                self.power_task(id, "PowerOnVM_Task").await?,
                "PowerOnVM_Task",
            ),
            PowerAction::Off => tolerate(
                self.power_task(id, "PowerOffVM_Task").await?,
                "PowerOffVM_Task",
            ),
            PowerAction::Reset => self
                .power_task(id, "ResetVM_Task")
                .await?
                .map_err(|f| self.client.fault_error("ResetVM_Task", f)),
            PowerAction::SoftShutdown => {
                let body = format!("<ShutdownGuest>{}</ShutdownGuest>", vm_ref(id).xml("_this"));
                self.client.call("ShutdownGuest", &body).await.map(|_| ())
            }
            PowerAction::Cycle => {
                if current != PowerState::Off {
                    tolerate(
                        self.power_task(id, "PowerOffVM_Task").await?,
                        "PowerOffVM_Task",
                    )?;
                }
                tolerate(
                    self.power_task(id, "PowerOnVM_Task").await?,
                    "PowerOnVM_Task",
                )
            }
        }
    }

    async fn delete(&self, id: &str, progress: ProgressSink<'_>) -> Result<bool> {
        let Some(vm) = self.not_found_is_none(self.get(id).await)? else {
            return Ok(false);
        };
        if vm.power != PowerState::Off && !vm.template {
            progress(&TaskProgress::running(10, format!("powering off {id}")));
            match self.power_task(id, "PowerOffVM_Task").await? {
                Ok(()) => {}
                Err(f) if f.kind() == FaultKind::InvalidPowerState => {}
                Err(f) if f.kind() == FaultKind::ManagedObjectNotFound => return Ok(false),
                Err(f) => return Err(self.client.fault_error("PowerOffVM_Task", f)),
            }
        }
        progress(&TaskProgress::running(40, format!("destroying {id}")));
        let body = format!("<Destroy_Task>{}</Destroy_Task>", vm_ref(id).xml("_this"));
        match self
            .run_task("Destroy_Task", &body, progress, (40, 100))
            .await?
        {
            Ok(_) => {
                progress(&TaskProgress {
                    state: TaskState::Completed,
                    percent: Some(100),
                    message: format!("{id} destroyed"),
                });
                Ok(true)
            }
            Err(f) if f.kind() == FaultKind::ManagedObjectNotFound => Ok(false),
            Err(f) => Err(self.client.fault_error("Destroy_Task", f)),
        }
    }

    async fn wait_ip(&self, id: &str, bound: Duration) -> Result<String> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let o = self
                .client
                .retrieve_one(&vm_ref(id), &["guest.ipAddress"])
                .await?;
            if let Some(ip) = o.text("guest.ipAddress").filter(|s| !s.is_empty()) {
                return Ok(ip.to_owned());
            }
            if start.elapsed() >= bound {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::Vcenter,
                    endpoint: self.url(),
                    operation: format!("waiting for the guest IP of {id} (are VMware Tools or open-vm-tools running?)"),
                    after: bound,
                });
            }
            tokio::time::sleep(delay.min(bound.saturating_sub(start.elapsed()))).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn close(&self) -> Result<()> {
        self.client.logout().await
    }
}

impl VsphereDriver {
    /// [`VmProvider::create`] that stops when `cancel` fires: before the clone nothing is
    /// sent; during it the clone task is cancelled in vCenter (where vCenter allows); after it
    /// the VM is neither reconfigured nor powered on. A cancelled create fails, and its error
    /// names the VM when one was left behind (marked with the command id, so a later
    /// `vsphere.delete` or a look-up by command id finds it).
    pub async fn create_with(
        &self,
        command_id: &str,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
        cancel: &CancellationToken,
    ) -> Result<VmInfo> {
        spec.validate()?;
        if command_id.trim().is_empty() {
            return Err(ProviderError::invalid("command_id", "must not be empty"));
        }
        let lock = {
            let mut m = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(command_id.to_owned()).or_default().clone()
        };
        let result = {
            let _held = lock.lock().await;
            self.create_locked(command_id, spec, progress, cancel).await
        };
        let mut m = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            m.remove(command_id);
        }
        result
    }

    /// The error of a create stopped by its cancellation: what was left in vCenter.
    fn cancelled(&self, left: String) -> ProviderError {
        ProviderError::ProviderFault {
            endpoint: self.url(),
            message: format!("create cancelled: {left}"),
        }
    }

    async fn create_locked(
        &self,
        command_id: &str,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
        cancel: &CancellationToken,
    ) -> Result<VmInfo> {
        if let Some(vm) = self.find_by_command(command_id).await? {
            progress(&TaskProgress::running(
                90,
                format!("{} already created by command {command_id}", vm.id),
            ));
            return self.finish_create(vm, spec, progress, cancel).await;
        }
        progress(&TaskProgress::running(
            5,
            format!("resolving {}", spec.source),
        ));
        let source = self.resolve_source(&spec.source).await?;
        let body = self.clone_body(command_id, spec, &source).await?;
        if cancel.is_cancelled() {
            return Err(self.cancelled("before the clone was started; nothing was created".into()));
        }
        progress(&TaskProgress::running(
            10,
            format!("cloning {source} to {}", spec.name),
        ));
        let (task, (outcome, asked)) = match self.client.call_fault("CloneVM_Task", &body).await? {
            Ok(n) => {
                let task =
                    n.and_then(|n| n.moref())
                        .ok_or_else(|| ProviderError::ProviderFault {
                            endpoint: self.url(),
                            message: "CloneVM_Task returned no task".into(),
                        })?;
                let waited = self
                    .wait_task_cancellable(&task, "CloneVM_Task", progress, (10, 70), cancel)
                    .await?;
                (Some(task), waited)
            }
            Err(f) => (None, (Err(f), None)),
        };
        let task = task.map(|t| t.to_string()).unwrap_or_default();
        let refused = |asked: &Option<std::result::Result<(), Fault>>| match asked {
            Some(Err(f)) => format!(
                "vCenter did not cancel clone task {task} ({}: {}), and ",
                f.type_name, f.message
            ),
            _ => String::new(),
        };
        let vm = match outcome {
            Err(f) if cancel.is_cancelled() && f.is("RequestCanceled") => {
                return Err(self.cancelled(format!(
                    "vCenter cancelled clone task {task}; no VM was created"
                )));
            }
            Ok(result) => {
                let id =
                    result
                        .and_then(|r| r.moref())
                        .ok_or_else(|| ProviderError::ProviderFault {
                            endpoint: self.url(),
                            message: "CloneVM_Task succeeded without naming the VM".into(),
                        })?;
                self.get(&id.value).await?
            }
            // A concurrent delivery of the same command may have won the name.
            Err(f) if f.kind() == FaultKind::DuplicateName => {
                match self.find_by_command(command_id).await? {
                    Some(vm) => vm,
                    None => return Err(self.client.fault_error("CloneVM_Task", f)),
                }
            }
            Err(f) => return Err(self.client.fault_error("CloneVM_Task", f)),
        };
        if cancel.is_cancelled() {
            return Err(self.cancelled(format!(
                "{}the clone had finished: VM {} ({:?}, power {:?}) exists, marked with command id {command_id}, and was not reconfigured or powered on; delete it with vsphere.delete if it is not wanted",
                refused(&asked),
                vm.id,
                vm.name,
                vm.power
            )));
        }
        self.finish_create(vm, spec, progress, cancel).await
    }

    async fn finish_create(
        &self,
        vm: VmInfo,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
        cancel: &CancellationToken,
    ) -> Result<VmInfo> {
        self.ensure_size(&vm, spec, progress).await?;
        if cancel.is_cancelled() {
            return Err(self.cancelled(format!(
                "VM {} ({:?}) exists, marked with its command id, and was not powered on; delete it with vsphere.delete if it is not wanted",
                vm.id, vm.name
            )));
        }
        if spec.power_on {
            progress(&TaskProgress::running(85, format!("powering on {}", vm.id)));
            self.power(&vm.id, PowerAction::On).await?;
        }
        let vm = self.get(&vm.id).await?;
        progress(&TaskProgress {
            state: TaskState::Completed,
            percent: Some(100),
            message: format!("{} ({}) ready", vm.name, vm.id),
        });
        Ok(vm)
    }
}
