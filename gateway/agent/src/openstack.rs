//! OpenStack commands (`openstack.create`, `.get`, `.power`, `.delete`, `.inventory`) in the
//! executor, on pcg-openstack. Payloads are described in `pcg_openstack::command`.
//!
//! One logged-in client per cloud is kept (keyed by the payload's `cloud`), so Keystone is asked
//! for a token once and osauth renews it; a client whose credentials are refused is dropped.
//!
//! Exactly once in effect: `openstack.create` marks the server with the command id in Nova
//! metadata as part of the create request and looks for that mark first, so a redelivered or
//! recovered create returns the server the first one made. Get, power on/off, delete and
//! inventory converge. A reset or cycle interrupted by a restart is not repeated: it fails with
//! `interrupted` and the server's current status.

use std::collections::HashMap;
use std::sync::Arc;

use pcg_openstack::command::{self, Command};
use pcg_openstack::{CloudEntry, OpenStack};
use pcg_provider::ErrorKind;
use serde_json::Value;

use crate::executor::{ExecContext, ExecError, Registry};

/// Logged-in clients by cloud.
#[derive(Default)]
struct Clients(tokio::sync::Mutex<HashMap<String, Arc<OpenStack>>>);

impl Clients {
    async fn get(&self, cmd: &Command) -> Result<(String, Arc<OpenStack>), ExecError> {
        let key = serde_json::to_string(cmd.cloud())
            .map_err(|e| ExecError::invalid_payload(e.to_string()))?;
        if let Some(c) = self.0.lock().await.get(&key) {
            return Ok((key, c.clone()));
        }
        let entry = CloudEntry::resolve(cmd.cloud()).map_err(ExecError::from)?;
        let client = Arc::new(OpenStack::connect(entry).await.map_err(ExecError::from)?);
        self.0.lock().await.insert(key.clone(), client.clone());
        Ok((key, client))
    }
}

async fn handle(
    clients: Arc<Clients>,
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
    let (key, os) = clients.get(&cmd).await?;
    if ctx.recovered && cmd.repeats_an_effect() {
        let status = match &cmd {
            Command::Power(p) => os.get(&p.server).await.ok().map(|s| s.status),
            _ => None,
        };
        return Err(ExecError::new(
            "interrupted",
            format!(
                "the gateway restarted while this {} was running; it may or may not have taken effect, so it is not repeated (server status now: {}); send it again if needed",
                ctx.kind,
                status.unwrap_or_else(|| "unknown".into())
            ),
        ));
    }
    let r = command::execute(&os, &ctx.command_id, &cmd).await;
    if let Err(e) = &r {
        if e.kind() == ErrorKind::Auth {
            clients.0.lock().await.remove(&key);
        }
    }
    r.map_err(ExecError::from)
}

/// Adds the OpenStack commands to `r`.
pub fn register(r: &mut Registry) {
    let clients = Arc::new(Clients::default());
    for kind in command::KINDS {
        let clients = clients.clone();
        r.register(kind, move |ctx: ExecContext, p: Value| {
            handle(clients.clone(), ctx, p)
        });
    }
}
