//! Gateways: list, look up, revoke.

use super::{App, AppResult, Caller};
use crate::store::{self, now_ms, Gateway};

/// A gateway record with what only the running service knows about it.
pub struct GatewayState {
    pub gateway: Gateway,
    /// Its live tunnel, if it has one.
    pub tunnel: Option<crate::broker::Tunnel>,
    /// Commands stored for it without a result yet.
    pub pending: usize,
    /// Machines declared on it, and its latest health report.
    pub machines: usize,
    pub health: Option<crate::store::machines::HealthRecord>,
}

impl App {
    /// The support bundles a gateway of the caller's tenant uploaded, newest first.
    pub fn list_bundles(
        &self,
        caller: &Caller,
        gateway_id: &str,
    ) -> AppResult<Vec<crate::store::BundleRecord>> {
        let g = self.tenant_gateway(caller.tenant()?, gateway_id)?;
        Ok(self.store.bundles_of(&g.id)?)
    }

    /// One support bundle of the caller's tenant, with its bytes.
    pub fn get_bundle(
        &self,
        caller: &Caller,
        id: &str,
    ) -> AppResult<(crate::store::BundleRecord, Vec<u8>)> {
        let tenant = caller.tenant()?;
        let found = if super::plausible_id(id) {
            self.store.bundle(id)?
        } else {
            None
        };
        found
            .filter(|(b, _)| b.tenant_id == tenant)
            .ok_or_else(|| {
                super::AppError::not_found(format!(
                    "support bundle {} not found in tenant {tenant}; list a gateway's bundles with GET /v1/gateways/{{id}}/bundles",
                    super::printable(id)
                ))
            })
    }

    fn state(&self, g: Gateway) -> GatewayState {
        GatewayState {
            tunnel: self.tunnels.get(&g.id),
            pending: self.commands.pending_count(&g.id),
            machines: self.store.machine_count(&g.id),
            health: self
                .store
                .health_history(&g.id, 1)
                .ok()
                .and_then(|mut h| h.pop()),
            gateway: g,
        }
    }

    pub fn list_gateways(&self, caller: &Caller) -> AppResult<Vec<GatewayState>> {
        let tenant = caller.tenant()?;
        Ok(self
            .store
            .gateways(Some(tenant))?
            .into_iter()
            .map(|g| self.state(g))
            .collect())
    }

    pub fn get_gateway(&self, caller: &Caller, id: &str) -> AppResult<GatewayState> {
        let g = self.tenant_gateway(caller.tenant()?, id)?;
        Ok(self.state(g))
    }

    /// Revokes a gateway: its pending commands fail with `gateway_revoked`, its tunnel is
    /// closed with a permanent Goodbye, and its certificate is refused from then on.
    pub async fn revoke_gateway(&self, caller: &Caller, id: &str) -> AppResult<GatewayState> {
        let tenant = caller.tenant()?;
        let g = self.tenant_gateway(tenant, id)?;
        if g.revoked_ms.is_none() {
            self.commit(store::Op::GatewayChanged {
                id: g.id.clone(),
                patch: store::GatewayPatch {
                    revoked_ms: Some(now_ms()),
                    ..Default::default()
                },
            })
            .await?;
            // Pending commands can no longer be delivered: fail them so nobody waits forever.
            for c in self.commands.pending(&g.id) {
                let now = now_ms();
                self.complete_command(
                    &c.id,
                    &g.id,
                    store::CommandResult {
                        ok: false,
                        output: serde_json::Value::Null,
                        error_class: "gateway_revoked".into(),
                        error_message: format!(
                            "gateway {} was revoked before it returned a result",
                            g.id
                        ),
                        started_ms: now,
                        finished_ms: now,
                    },
                )
                .await?;
                self.waiters.notify(&c.id);
            }
            self.event(
                Some(tenant),
                Some(&g.id),
                "gateway.revoked",
                format!("gateway {} revoked", g.id),
            )
            .await?;
            self.store.flush().await?;
            self.tunnels.close(
                &g.id,
                "this gateway was revoked by a tenant admin; pair it again with a new token",
                true,
            );
        }
        let g = self.tenant_gateway(tenant, id)?;
        Ok(self.state(g))
    }
}
