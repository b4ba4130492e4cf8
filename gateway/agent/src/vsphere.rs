//! vSphere commands (`vsphere.enrol`, `.create`, `.delete`, `.power`, `.get`, `.inventory`) in
//! the executor, on pcg-vsphere. Payloads are described in `pcg_vsphere::command`.
//!
//! A payload's `endpoint` is either inline (URL, user, password, TLS trust; the SaaS redacts
//! `password` keys wherever it shows a payload) or the name of a vCenter enrolled with
//! `vsphere.enrol`, which logs in to check the endpoint and keeps it in the gateway's store,
//! password sealed ([`crate::endpoints`]); later commands give just the name. Re-enrolling a
//! name replaces it and drops the session kept for the old credentials. One connected driver
//! (one vCenter session) is kept per endpoint, user and password, so commands share a session;
//! a driver is kept only once its login succeeded, and a vCenter that does not answer delays
//! only the commands addressed to it.
//!
//! Exactly once in effect: `vsphere.create` marks the VM with the command id in extraConfig as
//! part of the clone and looks for that mark first, so a redelivered or recovered create returns
//! the VM the first one made. Enrol, get, power on/off, guest shutdown, delete and inventory
//! converge. A reset or cycle interrupted by a restart is not repeated: it fails with
//! `interrupted` and the VM's current power state.
//!
//! Progress of a create and a delete goes to the SaaS. A cancelled `vsphere.create` stops at the
//! next step: a clone under way is cancelled through its vCenter task where vCenter allows it
//! (`CancelTask`), and a VM already cloned is neither reconfigured nor powered on; the result
//! names any VM left behind. Other vSphere commands are abandoned where they are.

use std::sync::Arc;

use pcg_provider::vm::VmProvider;
use pcg_provider::PowerAction;
use pcg_vsphere::command::{EndpointRef, VsphereCommand, VsphereService, KINDS};
use pcg_vsphere::VsphereEndpoint;
use serde_json::Value;

use crate::endpoints::Enrolled;
use crate::executor::{ExecContext, ExecError, Registry};

/// Enrolled vCenters in the gateway's store.
pub const ENROLLED: Enrolled = Enrolled {
    provider: "vsphere",
    what: "vCenter",
    enrol_kind: "vsphere.enrol",
};

async fn handle(
    service: Arc<VsphereService>,
    ctx: ExecContext,
    payload: Value,
) -> Result<Value, ExecError> {
    let cmd = VsphereCommand::parse_value(&ctx.kind, payload)
        .map_err(ExecError::from)?
        .ok_or_else(|| {
            ExecError::new(
                "unknown_kind",
                format!("{} is not a vSphere command", ctx.kind),
            )
        })?;
    let ep: VsphereEndpoint = match cmd.endpoint() {
        EndpointRef::Inline(ep) => *ep,
        EndpointRef::Enrolled(name) => ENROLLED.get(&ctx.gateway.store, &name)?,
    };
    let driver = service.driver(&ep).await.map_err(ExecError::from)?;
    if let VsphereCommand::Enrol(c) = &cmd {
        let out = pcg_vsphere::command::execute(&driver, &ctx.command_id, &cmd)
            .await
            .map_err(ExecError::from)?;
        let old = ENROLLED
            .put(&ctx.gateway.store, &c.name, &c.endpoint, out.clone())
            .await?;
        if let Some(old) = old.filter(|old| *old != c.endpoint) {
            service.forget(&old);
        }
        tracing::info!(name = %c.name, url = %c.endpoint.url, user = %c.endpoint.user, "vCenter enrolled");
        return Ok(out);
    }
    if let VsphereCommand::Power(p) = &cmd {
        if matches!(p.action, PowerAction::Reset | PowerAction::Cycle) {
            ctx.not_repeated(&format!("{:?} of VM {}", p.action, p.id), async {
                driver.get(&p.id).await.ok().map(|vm| {
                    format!(
                        "power state {}",
                        serde_json::to_string(&vm.power).unwrap_or_default()
                    )
                })
            })
            .await?;
        }
    }
    let progress = ctx.progress_sink();
    pcg_vsphere::command::execute_with(&driver, &ctx.command_id, &cmd, &progress, &ctx.cancel)
        .await
        .map_err(ExecError::from)
}

/// The vCenter sessions of this process, shared by the commands and the watch loop
/// ([`crate::watch`]), so both use one session per endpoint.
pub fn service() -> Arc<VsphereService> {
    static SERVICE: std::sync::OnceLock<Arc<VsphereService>> = std::sync::OnceLock::new();
    SERVICE
        .get_or_init(|| Arc::new(VsphereService::new()))
        .clone()
}

/// Adds the vSphere commands to `r`.
pub fn register(r: &mut Registry) {
    let service = service();
    for kind in KINDS {
        let service = service.clone();
        let h = move |ctx: ExecContext, payload: Value| handle(service.clone(), ctx, payload);
        // A create watches its cancellation (it cancels the clone task in vCenter).
        if kind == pcg_vsphere::command::CREATE {
            r.register_cancellable(kind, h);
        } else {
            r.register(kind, h);
        }
    }
}
