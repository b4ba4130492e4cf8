//! One read of each provider endpoint per watch cycle, whatever the number of machines on it:
//! a vCenter is read with one paged PropertyCollector retrieval of every VM (`list`: a
//! ContainerView, RetrievePropertiesEx and its continuations), an OpenStack cloud with Nova's
//! paged server list, a BMC with one power-state read per declared system. Each machine is then
//! found in that read ([`seen`]): by its VM's id, the id to adopt, or the mark of its create.
//! The driver's own request counters say what a read cost (in the health report).

use std::collections::HashMap;
use std::time::Instant;

use pcg_proto::machines::Provider;
use pcg_provider::vm::{VmInfo, VmProvider};
use pcg_provider::{Capabilities, PowerState};

use super::judge::Seen;
use crate::store::machines::LocalMachine;
use crate::Gateway;

/// Why an endpoint could not be read.
#[derive(Debug, Clone)]
pub enum ReadError {
    /// Not enrolled (or its record unreadable): the declaration cannot be applied as it is.
    Invalid(String),
    /// It did not answer, or refused the request.
    Unreachable(String),
}

/// What one endpoint showed.
#[derive(Debug, Clone)]
pub enum Inventory {
    /// Every VM (and template) of a vCenter or cloud.
    Vms(Vec<VmInfo>),
    /// The power state of each system read, by system id.
    Nodes(HashMap<String, Result<PowerState, String>>),
}

/// One endpoint's read.
#[derive(Debug, Clone)]
pub struct Read {
    pub provider: Provider,
    pub name: String,
    pub outcome: Result<Inventory, ReadError>,
    /// Requests the read cost (vSphere and OpenStack, from the driver's counter).
    pub requests: Option<u64>,
    pub ms: u64,
}

/// Reads one endpoint. `systems`: the bare-metal systems declared on a BMC (None: its default).
pub async fn read(
    gw: &Gateway,
    provider: Provider,
    name: &str,
    systems: &[Option<String>],
) -> Read {
    let start = Instant::now();
    let mut requests = None;
    let outcome = match provider {
        Provider::Vsphere => read_vsphere(gw, name, &mut requests).await,
        Provider::Openstack => read_openstack(gw, name, &mut requests).await,
        Provider::BareMetal => read_bmc(gw, name, systems).await,
    };
    Read {
        provider,
        name: name.to_string(),
        outcome,
        requests,
        ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

async fn read_vsphere(
    gw: &Gateway,
    name: &str,
    requests: &mut Option<u64>,
) -> Result<Inventory, ReadError> {
    let ep: pcg_vsphere::VsphereEndpoint = crate::vsphere::ENROLLED
        .get(&gw.store, name)
        .map_err(|e| ReadError::Invalid(e.message))?;
    let driver = crate::vsphere::service()
        .driver(&ep)
        .await
        .map_err(|e| ReadError::Unreachable(e.to_string()))?;
    let before = driver.client().requests();
    let r = VmProvider::list(&driver).await;
    *requests = Some(driver.client().requests().saturating_sub(before));
    r.map(Inventory::Vms)
        .map_err(|e| ReadError::Unreachable(e.to_string()))
}

async fn read_openstack(
    gw: &Gateway,
    name: &str,
    requests: &mut Option<u64>,
) -> Result<Inventory, ReadError> {
    let entry = crate::openstack::enrolled_entry(&gw.store, name)
        .map_err(|e| ReadError::Invalid(e.message))?;
    let service = crate::openstack::service();
    let os = service
        .client(&entry)
        .await
        .map_err(|e| ReadError::Unreachable(e.to_string()))?;
    let before = os.requests();
    let r = VmProvider::list(os.as_ref()).await;
    *requests = Some(os.requests().saturating_sub(before));
    if r.as_ref()
        .err()
        .is_some_and(|e| e.kind() == pcg_provider::ErrorKind::Auth)
    {
        service.forget(&entry);
    }
    let vms = r.map_err(|e| ReadError::Unreachable(e.to_string()))?;
    // Nova lists a deleted server until it is gone: it is no longer there.
    Ok(Inventory::Vms(
        vms.into_iter()
            .filter(|v| {
                !matches!(
                    v.details.get("status").map(String::as_str),
                    Some("DELETED" | "SOFT_DELETED")
                )
            })
            .collect(),
    ))
}

/// The system a declaration names, or the BMC's first (from the driver, or the capabilities
/// recorded at enrolment).
pub fn system_of(gw: &Gateway, bmc: &str, named: Option<&String>) -> Option<String> {
    if let Some(s) = named {
        return Some(s.clone());
    }
    if let Some(s) = gw
        .bare_metal
        .driver(bmc)
        .ok()
        .and_then(|d| d.capabilities())
        .and_then(|c| c.default_system().map(str::to_owned))
    {
        return Some(s);
    }
    let rec = gw.store.bmc(bmc).ok().flatten()?;
    let caps: Capabilities = serde_json::from_value(rec.capabilities).ok()?;
    caps.default_system().map(str::to_owned)
}

async fn read_bmc(
    gw: &Gateway,
    name: &str,
    systems: &[Option<String>],
) -> Result<Inventory, ReadError> {
    let driver = gw.bare_metal.driver(name).map_err(|_| {
        let names = gw.bare_metal.names();
        ReadError::Invalid(format!(
            "no BMC is enrolled as {name:?} on this gateway (enrolled: {}); send baremetal.enrol first",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        ))
    })?;
    let mut out = HashMap::new();
    let wanted: Vec<Option<String>> = if systems.is_empty() {
        vec![None]
    } else {
        systems.to_vec()
    };
    for s in wanted {
        let Some(system) = system_of(gw, name, s.as_ref()) else {
            return Err(ReadError::Invalid(format!(
                "BMC {name:?} lists no system; enrol it again"
            )));
        };
        if out.contains_key(&system) {
            continue;
        }
        let p = driver.power_state(&system).await.map_err(|e| e.to_string());
        out.insert(system, p);
    }
    if !out.is_empty() && out.values().all(Result::is_err) {
        let e = out
            .values()
            .find_map(|r| r.clone().err())
            .unwrap_or_default();
        return Err(ReadError::Unreachable(e));
    }
    Ok(Inventory::Nodes(out))
}

/// How a machine looks in its endpoint's read.
pub fn seen(gw: &Gateway, m: &LocalMachine, read: &Read) -> Seen {
    let inv = match &read.outcome {
        Ok(i) => i,
        Err(ReadError::Invalid(e)) => return Seen::Invalid(e.clone()),
        Err(ReadError::Unreachable(e)) => return Seen::Unreachable(e.clone()),
    };
    let Some(d) = &m.declaration else {
        return Seen::Missing;
    };
    match inv {
        Inventory::Vms(vms) => {
            let adopt = d.vm().and_then(|t| t.adopt_id.as_deref());
            let mark = m.mark();
            let hit = match (&m.provider_id, adopt) {
                (Some(id), _) => vms.iter().find(|v| &v.id == id),
                (None, Some(a)) => vms.iter().find(|v| v.id == a),
                (None, None) => vms
                    .iter()
                    .find(|v| v.command_id.as_deref() == Some(mark.as_str())),
            };
            match hit.filter(|v| !v.template) {
                Some(v) => Seen::Vm {
                    id: v.id.clone(),
                    power: v.power,
                    name: v.name.clone(),
                    cpus: v.cpus,
                    memory_mib: v.memory_mib,
                },
                None => Seen::Missing,
            }
        }
        Inventory::Nodes(nodes) => {
            let named = d.bare_metal.as_ref().and_then(|b| b.system.as_ref());
            let Some(system) = system_of(gw, d.endpoint(), named) else {
                return Seen::Invalid(format!("BMC {:?} lists no system", d.endpoint()));
            };
            match nodes.get(&system) {
                Some(Ok(power)) => Seen::Node {
                    system,
                    power: *power,
                },
                Some(Err(e)) => Seen::Unreachable(e.clone()),
                None => Seen::Unreachable(format!("system {system} was not read")),
            }
        }
    }
}
