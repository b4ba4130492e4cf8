//! Pairing: a one-time token and a CSR become a gateway and its client certificate.

use pcg_proto::pairing::{PairRequest, PairResponse};

use super::{printable, App, AppError, AppResult};
use crate::store::{self, now_ms, Gateway};

/// Largest CSR accepted (a P-256 or RSA-4096 CSR is well under it).
const MAX_CSR_BYTES: usize = 16 * 1024;

impl App {
    /// Redeems the token of `req`, signs its CSR and records the new gateway.
    pub async fn pair(&self, req: PairRequest) -> AppResult<PairResponse> {
        if req.token_id.len() > 64
            || req.secret.len() > 128
            || req.csr_pem.len() > MAX_CSR_BYTES
            || req.hostname.len() > 253
            || req.gateway_version.len() > 64
        {
            return Err(AppError::invalid(
                "invalid_body",
                "a field of the pairing request is too long (token id 64, secret 128, CSR 16 KiB, hostname 253, version 64 bytes)",
            ));
        }
        let hostname = req.hostname.trim().to_string();
        if hostname.chars().any(char::is_control) {
            return Err(AppError::invalid(
                "invalid_body",
                "the hostname must not contain control characters",
            ));
        }
        let mut checked = self.store.check_token(&req.token_id, &req.secret);
        if matches!(checked, Err(store::RedeemError::Unknown)) && self.log.is_cluster() {
            // It may have just been made on another replica.
            self.catch_up().await?;
            checked = self.store.check_token(&req.token_id, &req.secret);
        }
        let token = match checked {
            Ok(t) => t,
            Err(e) => return Err(self.pairing_refused(&req.token_id, &hostname, e).await),
        };
        let gateway_id = store::new_id("gw", 8);
        let issued = self
            .ca
            .sign_gateway(
                &req.csr_pem,
                &token.tenant_id,
                &gateway_id,
                self.cfg.gateway_cert_lifetime_secs,
            )
            .map_err(|e| AppError::invalid("bad_csr", e.to_string()))?;
        let now = now_ms();
        let gw = Gateway {
            id: gateway_id.clone(),
            tenant_id: token.tenant_id.clone(),
            name: if token.name.is_empty() {
                hostname.clone()
            } else {
                token.name.clone()
            },
            hostname: hostname.clone(),
            paired_ms: now,
            token_id: token.id.clone(),
            cert_serial: issued.serial_hex.clone(),
            cert_not_after_ms: issued.not_after_ms(),
            revoked_ms: None,
            version: Some(req.gateway_version.clone()),
            command_kinds: Vec::new(),
            last_connected_ms: None,
            last_seen_ms: None,
            public_key: Some(hex::encode(&issued.public_key)),
        };
        let redeemed = self
            .commit(store::Op::TokenRedeemed {
                id: req.token_id.clone(),
                secret_hash: store::hash(&req.secret),
                at_ms: now_ms(),
                gateway: gw.clone(),
            })
            .await?;
        if let store::Outcome::Redeemed(Err(r)) = redeemed.outcome {
            return Err(self
                .pairing_refused(&req.token_id, &hostname, r.into())
                .await);
        }
        self.event(
            Some(&gw.tenant_id),
            Some(&gw.id),
            "gateway.paired",
            format!(
                "gateway {} paired from host \"{}\" with token {}",
                gw.id,
                printable(&gw.hostname),
                token.id
            ),
        )
        .await?;
        self.store.flush().await?;
        Ok(PairResponse {
            tenant_id: gw.tenant_id,
            gateway_id,
            certificate_pem: issued.pem,
            ca_pem: self.ca.cert_pem.clone(),
            broker_endpoints: self.broker_urls.clone(),
        })
    }

    /// Records a refused pairing as an event of the token's tenant; the error to answer.
    async fn pairing_refused(
        &self,
        token_id: &str,
        hostname: &str,
        e: store::RedeemError,
    ) -> AppError {
        if let Ok(Some(t)) = self.store.token(token_id) {
            let _ = self
                .event(
                    Some(&t.tenant_id),
                    None,
                    "pairing.refused",
                    format!(
                        "pairing with token {} from host \"{}\" refused: {e}",
                        t.id,
                        printable(hostname)
                    ),
                )
                .await;
        }
        e.into()
    }
}
