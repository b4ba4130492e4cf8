//! Declared machines: declare, list, look up, update (a new generation), delete; and the
//! gateways' health history.
//!
//! The SaaS is the source of truth for a machine's desired state. Every change is stored durably
//! with a new generation, then handed to the gateway's tunnel if it is up ([`crate::watch`]); a
//! gateway also gets its whole set each time it connects, and acknowledges the generations it
//! stored. A declaration names enrolled endpoints only (never credentials); its VM spec is
//! checked here against the drivers' own spec type, so a typo is refused at once.

use std::sync::Arc;

use pcg_proto::machines::{Declaration, Provider};
use pcg_provider::vm::{VmPlacement, VmSpec};

use super::{plausible_id, printable, App, AppError, AppResult, Caller, Kind};
use crate::store::machines::HealthRecord;
use crate::store::{self, now_ms, MachineRecord};

/// Checks a declaration: its envelope ([`Declaration::check`]) and its VM spec as the gateway's
/// drivers read it.
pub fn check(d: &Declaration) -> AppResult<()> {
    d.check()
        .map_err(|m| AppError::invalid("invalid_declaration", m))?;
    let (field, want) = match d.provider() {
        Provider::Vsphere => ("vsphere", "vsphere"),
        Provider::Openstack => ("openstack", "openstack"),
        Provider::BareMetal => return Ok(()),
    };
    let Some(t) = d.vm() else {
        return Ok(());
    };
    let spec: VmSpec = serde_json::from_value(t.vm.clone()).map_err(|e| {
        AppError::invalid(
            "invalid_declaration",
            format!("{field}.vm: {e} (a VM spec: name, source, cpus, memory_mib, networks, user_data, metadata, placement)"),
        )
    })?;
    spec.validate()
        .map_err(|e| AppError::invalid("invalid_declaration", format!("{field}.vm: {e}")))?;
    let placement_ok = matches!(
        (&spec.placement, d.provider()),
        (VmPlacement::Vsphere { .. }, Provider::Vsphere)
            | (VmPlacement::Openstack { .. }, Provider::Openstack)
    );
    if !placement_ok {
        return Err(AppError::invalid(
            "invalid_declaration",
            format!("{field}.vm.placement: give a placement with \"provider\": \"{want}\""),
        ));
    }
    Ok(())
}

/// The command kind a gateway must support to watch machines of `p` (it said so at connect).
fn needed_kind(p: Provider) -> &'static str {
    match p {
        Provider::Vsphere => "vsphere.create",
        Provider::Openstack => "openstack.create",
        Provider::BareMetal => "baremetal.power",
    }
}

/// What identifies the thing a declaration manages on its endpoint (two declarations of one VM
/// or node would fight over it).
fn identity(d: &Declaration) -> String {
    let vm_name = d
        .vm()
        .and_then(|t| {
            t.adopt_id
                .clone()
                .map(|i| format!("id:{i}"))
                .or_else(|| t.vm.get("name")?.as_str().map(|n| format!("name:{n}")))
        })
        .unwrap_or_default();
    let system = d
        .bare_metal
        .as_ref()
        .and_then(|b| b.system.clone())
        .unwrap_or_default();
    format!(
        "{}\0{}\0{vm_name}\0{system}",
        d.provider().as_str(),
        d.endpoint()
    )
}

impl App {
    fn tenant_machine(&self, tenant: &str, id: &str) -> AppResult<MachineRecord> {
        let found = if plausible_id(id) {
            self.store.machine(id)?
        } else {
            None
        };
        found.filter(|m| m.tenant_id == tenant).ok_or_else(|| {
            AppError::not_found(format!(
                "machine {} not found in tenant {tenant}; list a gateway's machines with GET /v1/gateways/{{id}}/machines",
                printable(id)
            ))
        })
    }

    /// Declares a machine on a gateway of the caller's tenant (generation 1).
    pub async fn declare_machine(
        self: &Arc<Self>,
        caller: &Caller,
        gateway_id: &str,
        d: Declaration,
    ) -> AppResult<MachineRecord> {
        let tenant = caller.tenant()?;
        self.single_node_only("declared machines")?;
        let g = self.tenant_gateway(tenant, gateway_id)?;
        if g.revoked_ms.is_some() {
            return Err(AppError::new(
                Kind::Conflict,
                "gateway_revoked",
                format!("gateway {} is revoked; pair a gateway again", g.id),
            ));
        }
        check(&d)?;
        let kind = needed_kind(d.provider());
        if !g.command_kinds.is_empty() && !g.command_kinds.iter().any(|k| k == kind) {
            return Err(AppError::new(
                Kind::Unprocessable,
                "unsupported_provider",
                format!(
                    "gateway {} has no {} driver (it does not execute {kind}); upgrade the gateway",
                    g.id,
                    d.provider().as_str()
                ),
            ));
        }
        let existing = self.store.machines_of(&g.id)?;
        if existing.len() >= self.cfg.max_machines_per_gateway {
            return Err(AppError::new(
                Kind::Conflict,
                "too_many_machines",
                format!(
                    "gateway {} has {} machines declared, the most this SaaS keeps per gateway (max_machines_per_gateway); delete some first",
                    g.id,
                    existing.len()
                ),
            ));
        }
        let me = identity(&d);
        if let Some(other) = existing.iter().find(|m| identity(&m.declaration) == me) {
            return Err(AppError::new(
                Kind::Conflict,
                "machine_declared",
                format!(
                    "machine {} already declares this {} on {} of gateway {}; update it (PUT /v1/machines/{}) instead",
                    other.id,
                    if d.vm().is_some() { "VM" } else { "node" },
                    printable(d.endpoint()),
                    g.id,
                    other.id
                ),
            ));
        }
        let now = now_ms();
        let m = MachineRecord {
            id: store::new_id("mach", 8),
            tenant_id: tenant.to_string(),
            gateway_id: g.id.clone(),
            declaration: d,
            generation: 1,
            applied_generation: 0,
            created_ms: now,
            updated_ms: now,
            deleting: false,
            observed: None,
            observed_received_ms: None,
            last_drift: None,
        };
        self.store.put_machine(&m)?;
        self.store.event_for_machine(
            tenant,
            &g.id,
            &m.id,
            "machine.declared",
            format!(
                "machine {} ({}) declared on gateway {}: {} {} on {}, power {}, policy {}",
                m.id,
                printable(&m.declaration.name),
                g.id,
                m.declaration.provider().as_str(),
                if m.declaration.vm().is_some() {
                    "VM"
                } else {
                    "node"
                },
                printable(m.declaration.endpoint()),
                m.declaration.power.as_str(),
                serde_json::to_value(m.declaration.policy)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ),
        )?;
        self.store.flush().await?;
        crate::watch::push(self, &m);
        Ok(m)
    }

    /// The machines declared on a gateway of the caller's tenant.
    pub fn list_machines(
        &self,
        caller: &Caller,
        gateway_id: &str,
    ) -> AppResult<Vec<MachineRecord>> {
        let g = self.tenant_gateway(caller.tenant()?, gateway_id)?;
        Ok(self.store.machines_of(&g.id)?)
    }

    pub fn get_machine(&self, caller: &Caller, id: &str) -> AppResult<MachineRecord> {
        self.tenant_machine(caller.tenant()?, id)
    }

    /// Replaces a declaration (a new generation). Its provider and endpoint stay: to move a
    /// machine, delete it and declare it again. An update also resumes healing of a machine
    /// whose heal budget ran out.
    pub async fn update_machine(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        d: Declaration,
    ) -> AppResult<MachineRecord> {
        let tenant = caller.tenant()?;
        self.single_node_only("declared machines")?;
        let cur = self.tenant_machine(tenant, id)?;
        if cur.deleting {
            return Err(AppError::new(
                Kind::Conflict,
                "machine_deleting",
                format!("machine {id} is being deleted; declare a new one"),
            ));
        }
        check(&d)?;
        let (old, new) = (&cur.declaration, &d);
        let moved = old.provider() != new.provider()
            || old.endpoint() != new.endpoint()
            || old.vm().map(|t| &t.adopt_id) != new.vm().map(|t| &t.adopt_id)
            || old.bare_metal.as_ref().map(|b| &b.system)
                != new.bare_metal.as_ref().map(|b| &b.system);
        if moved {
            return Err(AppError::new(
                Kind::Conflict,
                "immutable_target",
                format!(
                    "machine {id}: its provider, endpoint, adopted id and system cannot change; delete it and declare a new one"
                ),
            ));
        }
        let updated = self
            .store
            .update_machine(&cur.id, |m| {
                m.declaration = d.clone();
                m.generation += 1;
                m.updated_ms = now_ms();
            })?
            .ok_or_else(|| AppError::not_found(format!("machine {id} was just deleted")))?;
        self.store.event_for_machine(
            tenant,
            &updated.gateway_id,
            &updated.id,
            "machine.updated",
            format!(
                "machine {} updated to generation {}",
                updated.id, updated.generation
            ),
        )?;
        self.store.flush().await?;
        crate::watch::push(self, &updated);
        Ok(updated)
    }

    /// Deletes a declaration: the gateway deletes the VM (a bare-metal node is left as it is)
    /// and the record goes once the gateway reports it done.
    pub async fn delete_machine(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> AppResult<MachineRecord> {
        let tenant = caller.tenant()?;
        self.single_node_only("declared machines")?;
        let cur = self.tenant_machine(tenant, id)?;
        if cur.deleting {
            return Ok(cur);
        }
        let updated = self
            .store
            .update_machine(&cur.id, |m| {
                m.deleting = true;
                m.generation += 1;
                m.updated_ms = now_ms();
            })?
            .ok_or_else(|| AppError::not_found(format!("machine {id} was just deleted")))?;
        self.store.event_for_machine(
            tenant,
            &updated.gateway_id,
            &updated.id,
            "machine.delete_requested",
            format!(
                "machine {} deleted by the tenant; the gateway deletes {}",
                updated.id,
                if updated.declaration.vm().is_some() {
                    "its VM"
                } else {
                    "nothing (a bare-metal node is left as it is)"
                }
            ),
        )?;
        self.store.flush().await?;
        crate::watch::push(self, &updated);
        Ok(updated)
    }

    /// A gateway's health and inventory reports, newest first.
    pub fn health_history(
        &self,
        caller: &Caller,
        gateway_id: &str,
        limit: usize,
    ) -> AppResult<Vec<HealthRecord>> {
        let g = self.tenant_gateway(caller.tenant()?, gateway_id)?;
        Ok(self.store.health_history(&g.id, limit.clamp(1, 1000))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(v: serde_json::Value) -> Declaration {
        serde_json::from_value(v).expect("declaration")
    }

    #[test]
    fn vm_specs_are_checked_with_the_drivers_type() {
        let ok = d(json!({"name": "w", "vsphere": {"endpoint": "lab", "vm": {
            "name": "w1", "source": "tpl", "cpus": 1,
            "placement": {"provider": "vsphere", "datacenter": "DC0"}}}}));
        check(&ok).expect("valid");
        for (bad, needle) in [
            (
                json!({"name": "w", "vsphere": {"endpoint": "lab", "vm": {
                    "name": "w1", "source": "tpl", "cpu": 1, "placement": {"provider": "vsphere"}}}}),
                "cpu",
            ),
            (
                json!({"name": "w", "vsphere": {"endpoint": "lab", "vm": {
                    "name": "w1", "source": "tpl", "placement": {"provider": "openstack"}}}}),
                "placement",
            ),
            (
                json!({"name": "w", "openstack": {"endpoint": {"enrolled": "c"}, "vm": {
                    "name": "w1", "source": "", "placement": {"provider": "openstack"}}}}),
                "source",
            ),
        ] {
            let e = check(&d(bad.clone())).expect_err("refused");
            assert_eq!(e.code, "invalid_declaration");
            assert!(e.message.contains(needle), "{bad}: {}", e.message);
        }
        let a = d(json!({"name": "a", "bare_metal": {"bmc": "n1"}}));
        let b = d(json!({"name": "b", "bare_metal": {"bmc": "n1"}, "power": "off"}));
        assert_eq!(identity(&a), identity(&b));
    }
}
