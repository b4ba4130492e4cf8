//! OpenStack commands (`openstack.enrol`, `.create`, `.get`, `.power`, `.delete`, `.inventory`)
//! in the executor, on pcg-openstack. Payloads are described in `pcg_openstack::command`.
//!
//! A payload's `cloud` is a clouds.yaml cloud name on the gateway host (a string), an inline
//! clouds.yaml entry (an object), or `{"enrolled": NAME}`: a cloud enrolled with
//! `openstack.enrol`, which checks that Keystone issues a token and keeps the inline entry in the
//! gateway's store, secrets sealed ([`crate::endpoints`]). Re-enrolling a name replaces it and
//! drops the client kept for the old entry.
//!
//! One logged-in client per cloud entry is kept (`OpenstackService`), so Keystone is asked for a
//! token once and osauth renews it; logins to different clouds never wait for each other, and a
//! client whose credentials are refused is dropped.
//!
//! Exactly once in effect: `openstack.create` marks the server with the command id in Nova
//! metadata as part of the create request and looks for that mark first, so a redelivered or
//! recovered create returns the server the first one made. Enrol, get, power on/off, delete and
//! inventory converge. A reset or cycle interrupted by a restart is not repeated: it fails with
//! `interrupted` and the server's current status.

use std::sync::Arc;

use pcg_openstack::command::{self, Command, OpenstackService};
use pcg_openstack::{CloudEntry, CloudRef};
use pcg_provider::ErrorKind;
use serde_json::Value;

use crate::endpoints::Enrolled;
use crate::executor::{ExecContext, ExecError, Registry};

/// Enrolled clouds in the gateway's store.
pub const ENROLLED: Enrolled = Enrolled {
    provider: "openstack",
    what: "OpenStack cloud",
    enrol_kind: "openstack.enrol",
};

/// The entry of the cloud enrolled as `name`.
pub fn enrolled_entry(store: &crate::store::Store, name: &str) -> Result<CloudEntry, ExecError> {
    let value: Value = ENROLLED.get(store, name)?;
    let mut e = CloudEntry::inline(value).map_err(ExecError::from)?;
    e.source = format!("enrolled cloud {name:?}");
    Ok(e)
}

/// The cloud entry a command addresses.
fn entry(ctx: &ExecContext, cloud: &CloudRef) -> Result<CloudEntry, ExecError> {
    match cloud {
        CloudRef::Enrolled { enrolled } => enrolled_entry(&ctx.gateway.store, enrolled),
        other => CloudEntry::resolve(other).map_err(ExecError::from),
    }
}

/// The OpenStack clients of this process, shared by the commands and the watch loop
/// ([`crate::watch`]), so both use one login per cloud.
pub fn service() -> Arc<OpenstackService> {
    static SERVICE: std::sync::OnceLock<Arc<OpenstackService>> = std::sync::OnceLock::new();
    SERVICE
        .get_or_init(|| Arc::new(OpenstackService::new()))
        .clone()
}

async fn handle(
    service: Arc<OpenstackService>,
    ctx: ExecContext,
    payload: Value,
) -> Result<Value, ExecError> {
    let cmd = Command::parse(&ctx.kind, payload)
        .map_err(ExecError::from)?
        .ok_or_else(|| {
            ExecError::new(
                "unknown_kind",
                format!("{} is not an OpenStack command", ctx.kind),
            )
        })?;
    let cloud = entry(&ctx, cmd.cloud())?;
    let os = service.client(&cloud).await.map_err(ExecError::from)?;
    if cmd.repeats_an_effect() {
        ctx.not_repeated(&ctx.kind, async {
            match &cmd {
                Command::Power(p) => os
                    .get(&p.server)
                    .await
                    .ok()
                    .map(|s| format!("server {} is {}", p.server, s.status)),
                _ => None,
            }
        })
        .await?;
    }
    let r = command::execute(&os, &ctx.command_id, &cmd).await;
    if let Err(e) = &r {
        if e.kind() == ErrorKind::Auth {
            service.forget(&cloud);
        }
    }
    let out = r.map_err(ExecError::from)?;
    if let Command::Enrol(e) = &cmd {
        let old = ENROLLED
            .put(&ctx.gateway.store, &e.name, cloud.entry(), out.clone())
            .await?;
        if let Some(old) = old.filter(|old| old != cloud.entry()) {
            if let Ok(old) = CloudEntry::inline(old) {
                service.forget(&old);
            }
        }
        tracing::info!(name = %e.name, auth_url = %cloud.auth_url(), user = %cloud.user(), "OpenStack cloud enrolled");
    }
    Ok(out)
}

/// Adds the OpenStack commands to `r`.
pub fn register(r: &mut Registry) {
    let service = service();
    for kind in command::KINDS {
        let service = service.clone();
        r.register(kind, move |ctx: ExecContext, p: Value| {
            handle(service.clone(), ctx, p)
        });
    }
}
