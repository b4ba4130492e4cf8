//! Tenants, API keys, pairing tokens and events.

use super::{check_name, plausible_id, App, AppError, AppResult, Caller, Kind};
use crate::store::{self, ApiKey, Event, Op, Tenant, TokenRecord};

/// Longest pairing token lifetime a tenant may ask for: 30 days.
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// A pairing token just made: its record and the token string (shown once).
pub struct NewToken {
    pub record: TokenRecord,
    pub token: String,
}

impl App {
    /// Creates a tenant and its first admin API key (operator only).
    pub async fn create_tenant(&self, caller: &Caller, name: &str) -> AppResult<(Tenant, String)> {
        caller.operator()?;
        let name = check_name("tenant name", name)?;
        let t = store::new_tenant(&name);
        self.commit(Op::TenantCreated { tenant: t.clone() }).await?;
        let (k, key) = store::new_api_key(Some(&t.id), "admin");
        self.commit(Op::ApiKeyCreated { key: k }).await?;
        self.store.flush().await?;
        Ok((t, key))
    }

    /// Every tenant (operator), or the caller's own.
    pub fn list_tenants(&self, caller: &Caller) -> AppResult<Vec<Tenant>> {
        Ok(self
            .store
            .tenants()?
            .into_iter()
            .filter(|t| {
                caller.0.tenant_id.is_none() || caller.0.tenant_id.as_deref() == Some(&t.id)
            })
            .collect())
    }

    pub async fn create_api_key(&self, caller: &Caller, name: &str) -> AppResult<(ApiKey, String)> {
        let tenant = caller.tenant()?;
        let name = check_name("API key name", name)?;
        let (k, key) = store::new_api_key(Some(tenant), &name);
        self.commit(Op::ApiKeyCreated { key: k.clone() }).await?;
        self.store.flush().await?;
        Ok((k, key))
    }

    pub fn list_api_keys(&self, caller: &Caller) -> AppResult<Vec<ApiKey>> {
        Ok(self.store.api_keys(Some(caller.tenant()?))?)
    }

    pub async fn revoke_api_key(&self, caller: &Caller, id: &str) -> AppResult<()> {
        let tenant = caller.tenant()?;
        let found = if plausible_id(id) {
            self.store.api_key(id)?
        } else {
            None
        };
        match found {
            Some(k) if k.tenant_id.as_deref() == Some(tenant) => {
                self.commit(Op::ApiKeyRevoked { id: id.to_string() })
                    .await?;
                self.store.flush().await?;
                Ok(())
            }
            _ => Err(AppError::not_found(format!(
                "API key {} not found in tenant {tenant}",
                super::printable(id)
            ))),
        }
    }

    /// Creates a pairing token of `ttl_secs` (default from the config).
    pub async fn create_token(
        &self,
        caller: &Caller,
        name: &str,
        ttl_secs: Option<u64>,
    ) -> AppResult<NewToken> {
        let tenant = caller.tenant()?;
        let name = if name.trim().is_empty() {
            String::new()
        } else {
            check_name("pairing token name", name)?
        };
        let ttl = ttl_secs.unwrap_or(self.cfg.token_ttl_secs);
        if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
            return Err(AppError::invalid(
                "invalid_ttl",
                format!("ttl_seconds must be between 1 and {MAX_TOKEN_TTL_SECS} (30 days)"),
            ));
        }
        let (record, secret) = store::new_token(tenant, &name, ttl);
        self.commit(Op::TokenCreated {
            token: record.clone(),
        })
        .await?;
        self.store.flush().await?;
        let token = pcg_proto::pairing::PairingToken {
            api_url: self.api_url.clone(),
            token_id: record.id.clone(),
            secret,
            expires_unix: record.expires_ms / 1000,
            ca_sha256: self.ca.fingerprint(),
        };
        Ok(NewToken {
            record,
            token: token.encode(),
        })
    }

    pub fn list_tokens(&self, caller: &Caller) -> AppResult<Vec<TokenRecord>> {
        Ok(self.store.tokens(caller.tenant()?)?)
    }

    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> AppResult<()> {
        let tenant = caller.tenant()?;
        let found = if plausible_id(id) {
            self.store.token(id)?
        } else {
            None
        };
        match found {
            Some(t) if t.tenant_id == tenant => {
                self.commit(Op::TokenRevoked {
                    id: id.to_string(),
                    at_ms: store::now_ms(),
                })
                .await?;
                self.store.flush().await?;
                Ok(())
            }
            _ => Err(AppError::not_found(format!(
                "pairing token {} not found in tenant {tenant}; list tokens with GET /v1/pairing-tokens",
                super::printable(id)
            ))),
        }
    }

    /// Events after `since` (the caller's tenant; the operator sees all).
    pub fn list_events(
        &self,
        caller: &Caller,
        since: Option<u64>,
        f: &crate::store::EventFilter,
        limit: usize,
    ) -> AppResult<Vec<Event>> {
        if f.gateway_id.as_deref().is_some_and(|g| !plausible_id(g))
            || f.machine_id.as_deref().is_some_and(|m| !plausible_id(m))
        {
            return Ok(Vec::new());
        }
        Ok(self.store.events_where(
            caller.0.tenant_id.as_deref(),
            since,
            f,
            limit.clamp(1, 1000),
        )?)
    }
}

impl From<crate::store::RedeemError> for AppError {
    fn from(e: crate::store::RedeemError) -> Self {
        use crate::store::RedeemError;
        let (kind, code) = match &e {
            RedeemError::Unknown => (Kind::Unauthenticated, "token_unknown"),
            RedeemError::Used(_) => (Kind::Conflict, "token_used"),
            RedeemError::Revoked => (Kind::Forbidden, "token_revoked"),
            RedeemError::Expired(_) => (Kind::Gone, "token_expired"),
            RedeemError::Store(_) => (Kind::Internal, "storage"),
        };
        AppError::new(kind, code, e.to_string())
    }
}
