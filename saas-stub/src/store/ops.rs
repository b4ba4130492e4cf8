//! The store's seam: every change to the shared state is an [`Op`], applied by one function,
//! [`Store::apply`], in the order of its sequence number.
//!
//! An operation carries everything its application needs, decided before it is applied: ids,
//! times, hashes of secrets, the records themselves. Applying it reads nothing but the store's
//! own state, so two stores that apply the same operations in the same order hold the same state
//! and answer the same [`Outcome`] — which is what lets replicas keep their own copy of a shared
//! log (a stream every replica applies in order; the one that wrote an operation reads its outcome
//! from its own application), and what a single node does today by applying an operation as it is
//! made ([`Store::commit`]), numbered from the feed.
//!
//! The checks that must hold across concurrent writers (a pairing token redeemed once, an
//! idempotency key claimed once, a command ended once) are made inside the application, against
//! the state as it is at that point of the order, not by the writer beforehand.
//!
//! Housekeeping that every store does to itself (retention) and what belongs to one gateway's
//! tunnel (declared machines, health reports, support bundles) is written directly, not through
//! operations.

use serde::{Deserialize, Serialize};

use super::{
    ct_eq, get, put, ApiKey, Command, CommandResult, Event, Gateway, IdempotencyRecord, Store,
    StoreError, Tenant, TokenRecord, TokenState,
};

/// A change to the shared state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A tenant, and its `tenant.created` event.
    TenantCreated {
        tenant: Tenant,
    },
    /// An API key (its secret's hash only).
    ApiKeyCreated {
        key: ApiKey,
    },
    ApiKeyRevoked {
        id: String,
    },
    /// A pairing token, and its `token.created` event.
    TokenCreated {
        token: TokenRecord,
    },
    /// A token revoked (if still active), and its `token.revoked` event.
    TokenRevoked {
        id: String,
        at_ms: i64,
    },
    /// A token consumed by a new gateway: applied only if the token is still active, matches
    /// `secret_hash` and had not expired at `at_ms`.
    TokenRedeemed {
        id: String,
        secret_hash: String,
        at_ms: i64,
        gateway: Gateway,
    },
    /// Fields of a gateway's record changed.
    GatewayChanged {
        id: String,
        patch: GatewayPatch,
    },
    /// An idempotency key claimed for a command, unless a live claim holds it.
    IdempotencyClaimed {
        tenant_id: String,
        key: String,
        record: IdempotencyRecord,
        window_ms: i64,
    },
    /// A new command, queued for its gateway in the order of the operation's number.
    CommandSubmitted {
        command: Command,
    },
    /// A cancel asked for a command that may have reached its gateway (kept with the command
    /// until it ends; the first one asked stands).
    CommandCancelAsked {
        id: String,
        cancel: super::CancelRequest,
    },
    /// A command handed to its gateway's tunnel for the first time (replicas record it, so that
    /// whether a command may have reached its gateway is decided in the log's order: see
    /// `only_if_undelivered`). Outcome: the command, or `None` when it had ended.
    CommandHandedOut {
        id: String,
    },
    /// A command ended with `result` (from its gateway, or here), unless it had ended already.
    CommandEnded {
        id: String,
        result: CommandResult,
        completed_ms: i64,
        /// Deliveries and the gateway's "received" as the replica that saw them counted them
        /// (they are not operations of their own).
        #[serde(default)]
        deliveries: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        received_ms: Option<i64>,
        /// Ends it only if no `CommandHandedOut` came first (a cancel or a deadline decided
        /// where the command's tunnel may be on another replica).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        only_if_undelivered: bool,
        /// The command's record as its writer holds it, when the writer's memory is the whole
        /// truth about it (one node): written as it is, once the pending index says the command
        /// has not ended, instead of reading the stored record back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record: Option<Box<Command>>,
    },
    /// An event (numbered by the operation).
    Event {
        event: Event,
    },
    /// A gateway's health report (numbered by the operation).
    HealthReported {
        tenant_id: String,
        gateway_id: String,
        received_ms: i64,
        health: pcg_proto::machines::Health,
    },
}

/// Fields of a gateway's record to set (`None`: left as it is).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GatewayPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_kinds: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connected_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after_ms: Option<i64>,
}

impl GatewayPatch {
    fn apply_to(&self, g: &mut Gateway) {
        if let Some(v) = self.revoked_ms {
            // The first revocation's time stands.
            g.revoked_ms.get_or_insert(v);
        }
        if let Some(v) = &self.public_key {
            g.public_key = Some(v.clone());
        }
        if let Some(v) = &self.version {
            g.version = Some(v.clone());
        }
        if let Some(v) = &self.command_kinds {
            g.command_kinds = v.clone();
        }
        if let Some(v) = self.last_connected_ms {
            g.last_connected_ms = Some(v);
        }
        if let Some(v) = self.last_seen_ms {
            g.last_seen_ms = Some(v);
        }
        if let Some(v) = &self.cert_serial {
            g.cert_serial = v.clone();
        }
        if let Some(v) = self.cert_not_after_ms {
            g.cert_not_after_ms = v;
        }
    }
}

/// Why a token was not redeemed (the state it was found in when the operation was applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedeemRefusal {
    Unknown,
    Used(Option<String>),
    Revoked,
    /// Expired this many seconds before the operation's time.
    Expired(i64),
}

/// An operation applied: its number and what it did.
#[derive(Debug, Clone)]
pub struct Committed {
    pub seq: u64,
    pub outcome: Outcome,
}

impl Committed {
    /// The command an operation on a command gave back, if any.
    pub fn command(self) -> Option<Command> {
        match self.outcome {
            Outcome::Command(c) => c.map(|c| *c),
            _ => None,
        }
    }
}

/// What applying an operation did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Applied (or nothing to do: a revoked key revoked again, an unknown id).
    Done,
    /// `TokenRedeemed`: consumed, or why not.
    Redeemed(Result<(), RedeemRefusal>),
    /// `IdempotencyClaimed`: whether the claim was recorded.
    Claimed(bool),
    /// `CommandEnded`: the command as ended, or `None` when it had ended already (or is
    /// unknown); `CommandCancelAsked`: the command with the cancel recorded, or `None` when
    /// it had ended.
    Command(Option<Box<Command>>),
    /// `GatewayChanged`: the record after the change (`None`: no such gateway).
    Gateway(Option<Box<Gateway>>),
}

impl Op {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::TenantCreated { .. } => "tenant_created",
            Op::ApiKeyCreated { .. } => "api_key_created",
            Op::ApiKeyRevoked { .. } => "api_key_revoked",
            Op::TokenCreated { .. } => "token_created",
            Op::TokenRevoked { .. } => "token_revoked",
            Op::TokenRedeemed { .. } => "token_redeemed",
            Op::GatewayChanged { .. } => "gateway_changed",
            Op::IdempotencyClaimed { .. } => "idempotency_claimed",
            Op::CommandSubmitted { .. } => "command_submitted",
            Op::CommandCancelAsked { .. } => "command_cancel_asked",
            Op::CommandHandedOut { .. } => "command_handed_out",
            Op::CommandEnded { .. } => "command_ended",
            Op::Event { .. } => "event",
            Op::HealthReported { .. } => "health_reported",
        }
    }
}

/// An event as the store writes it (numbered when applied).
pub fn event_of(
    tenant_id: Option<&str>,
    gateway_id: Option<&str>,
    kind: &str,
    message: String,
    at_ms: i64,
) -> Event {
    Event {
        seq: 0,
        at_ms,
        tenant_id: tenant_id.map(str::to_string),
        gateway_id: gateway_id.map(str::to_string),
        kind: kind.to_string(),
        message,
        machine_id: None,
        alert: false,
        details: None,
        source_id: None,
    }
}

impl Store {
    /// Applies an operation made here, numbered from the feed (one node: the store is the
    /// log). Written, not flushed.
    pub fn commit(&self, op: &Op) -> Result<Committed, StoreError> {
        let ticket = self.feed.ticket()?;
        let outcome = self.apply_once(ticket.seq, op, true)?;
        Ok(Committed {
            seq: ticket.seq,
            outcome,
        })
    }

    /// Applies operation number `seq` (numbers grow in the order operations are applied; a
    /// command's place in its gateway's queue and an event's number are this number). Written,
    /// not flushed. Applying an operation again (after a crash between its writes and the
    /// record of how far the log was applied) leaves the same state.
    pub fn apply(&self, seq: u64, op: &Op) -> Result<Outcome, StoreError> {
        self.apply_once(seq, op, false)
    }

    /// [`Store::apply`]; `fresh`: the operation was made here and is applied this once (one
    /// node's [`Store::commit`]), so what only a second application could find is not looked
    /// for (a new command's id, 12 random bytes, is not stored yet).
    fn apply_once(&self, seq: u64, op: &Op, fresh: bool) -> Result<Outcome, StoreError> {
        match op {
            Op::TenantCreated { tenant } => {
                put(&self.tenants, tenant.id.as_bytes(), tenant)?;
                self.tenant_event(
                    seq,
                    &tenant.id,
                    "tenant.created",
                    format!("tenant {} ({}) created", tenant.id, tenant.name),
                    tenant.created_ms,
                )?;
            }
            Op::ApiKeyCreated { key } => put(&self.api_keys, key.id.as_bytes(), key)?,
            Op::ApiKeyRevoked { id } => {
                if let Some(mut k) = get::<ApiKey>(&self.api_keys, "api_keys", id.as_bytes())? {
                    k.revoked = true;
                    put(&self.api_keys, id.as_bytes(), &k)?;
                    // Revocation takes effect on the very next request.
                    self.key_cache
                        .write()
                        .expect("key cache lock is never poisoned")
                        .insert(id.clone(), k);
                }
            }
            Op::TokenCreated { token } => {
                put(&self.tokens, token.id.as_bytes(), token)?;
                self.tenant_event(
                    seq,
                    &token.tenant_id,
                    "token.created",
                    format!("pairing token {} created", token.id),
                    token.created_ms,
                )?;
            }
            Op::TokenRevoked { id, at_ms } => {
                if let Some(mut t) = self.token(id)? {
                    if t.state == TokenState::Active {
                        t.state = TokenState::Revoked;
                        put(&self.tokens, id.as_bytes(), &t)?;
                        self.tenant_event(
                            seq,
                            &t.tenant_id,
                            "token.revoked",
                            format!("pairing token {id} revoked"),
                            *at_ms,
                        )?;
                    }
                }
            }
            Op::TokenRedeemed {
                id,
                secret_hash,
                at_ms,
                gateway,
            } => return self.apply_redeem(id, secret_hash, *at_ms, gateway),
            Op::GatewayChanged { id, patch } => {
                let mut out = None;
                self.gateways.fetch_and_update(id.as_bytes(), |old| {
                    let mut g: Gateway = serde_json::from_slice(old?).ok()?;
                    patch.apply_to(&mut g);
                    let bytes = serde_json::to_vec(&g).expect("records serialise");
                    out = Some(Box::new(g));
                    Some(bytes)
                })?;
                return Ok(Outcome::Gateway(out));
            }
            Op::IdempotencyClaimed {
                tenant_id,
                key,
                record,
                window_ms,
            } => {
                return self
                    .apply_claim(tenant_id, key, record, *window_ms)
                    .map(Outcome::Claimed)
            }
            Op::CommandSubmitted { command } => self.apply_submit(seq, command, fresh)?,
            Op::CommandCancelAsked { id, cancel } => {
                let Some(mut c) = self.command(id)? else {
                    return Ok(Outcome::Command(None));
                };
                if c.state.is_terminal() {
                    return Ok(Outcome::Command(None));
                }
                if c.cancel.is_none() {
                    c.cancel = Some(cancel.clone());
                    if !self.commands.put(&c)? {
                        return Ok(Outcome::Command(None)); // it ended meanwhile
                    }
                }
                return Ok(Outcome::Command(Some(Box::new(c))));
            }
            Op::CommandHandedOut { id } => {
                let Some(mut c) = self.command(id)? else {
                    return Ok(Outcome::Command(None));
                };
                if c.state.is_terminal() {
                    return Ok(Outcome::Command(None));
                }
                if c.state == super::CommandState::Queued {
                    c.state = super::CommandState::Delivered;
                    if !self.commands.put(&c)? {
                        return Ok(Outcome::Command(None)); // it ended meanwhile
                    }
                }
                return Ok(Outcome::Command(Some(Box::new(c))));
            }
            Op::CommandEnded {
                id,
                result,
                completed_ms,
                deliveries,
                received_ms,
                only_if_undelivered,
                record,
            } => {
                let mut c = match record {
                    // The pending index says whether it has ended (the record itself may
                    // already carry the end its writer decided).
                    Some(r) if !*only_if_undelivered && r.id == *id => {
                        if !self.commands.is_pending(id) {
                            return Ok(Outcome::Command(None));
                        }
                        (**r).clone()
                    }
                    _ => {
                        let Some(c) = self.command(id)? else {
                            return Ok(Outcome::Command(None));
                        };
                        if c.state.is_terminal()
                            || (*only_if_undelivered && c.state != super::CommandState::Queued)
                        {
                            return Ok(Outcome::Command(None));
                        }
                        c
                    }
                };
                c.state = super::CommandState::of_result(result);
                c.completed_ms = Some(*completed_ms);
                c.result = Some(result.clone());
                c.deliveries = c.deliveries.max(*deliveries);
                if c.received_ms.is_none() {
                    c.received_ms = *received_ms;
                }
                c.ended_seq = Some(seq);
                // Its `results` entry in the feed is the command log's (`ended_seq`).
                self.commands.put(&c)?;
                return Ok(Outcome::Command(Some(Box::new(c))));
            }
            Op::Event { event } => self.put_event_at(seq, event.clone())?,
            Op::HealthReported {
                tenant_id,
                gateway_id,
                received_ms,
                health,
            } => self.put_health_at(
                seq,
                tenant_id,
                &super::machines::HealthRecord {
                    gateway_id: gateway_id.clone(),
                    received_ms: *received_ms,
                    health: health.clone(),
                },
            )?,
        }
        Ok(Outcome::Done)
    }

    /// Writes a tenant's event (about no gateway) as number `seq`.
    fn tenant_event(
        &self,
        seq: u64,
        tenant_id: &str,
        kind: &str,
        message: String,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.put_event_at(seq, event_of(Some(tenant_id), None, kind, message, at_ms))
    }

    /// Stores a new command and queues it for its gateway: one record appended to the command
    /// log, whose memory indexes it by tenant (newest first, so lists stop after `limit`), in
    /// its gateway's queue (by `seq`) and in the tenant's feed.
    fn apply_submit(&self, seq: u64, command: &Command, fresh: bool) -> Result<(), StoreError> {
        if !fresh && self.commands.contains(&command.id) {
            return Ok(()); // applied before
        }
        let mut cmd = command.clone();
        cmd.pending_key = Self::pending_key(&cmd.gateway_id, seq);
        // Its `commands` entry in the feed is the command log's (`pending_key`).
        self.commands.put(&cmd).map(|_| ())
    }

    /// `gateway \0 seq`: a gateway's pending commands in the order they were submitted.
    pub fn pending_key(gateway_id: &str, seq: u64) -> Vec<u8> {
        let mut key = gateway_id.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    /// Consumes the token (a compare-and-swap on its record, so two gateways racing with one
    /// token cannot both win) and then records the new gateway.
    ///
    /// sled multi-tree transactions are not used: under concurrent `flush_async` they were seen
    /// to deadlock here. A crash between the two writes leaves a used token and no gateway; the
    /// pairing answer is only sent after both are flushed, so the appliance just needs a new
    /// token.
    fn apply_redeem(
        &self,
        id: &str,
        secret_hash: &str,
        at_ms: i64,
        gw: &Gateway,
    ) -> Result<Outcome, StoreError> {
        let refused = |r| Ok(Outcome::Redeemed(Err(r)));
        loop {
            let Some(raw) = self.tokens.get(id.as_bytes())? else {
                return refused(RedeemRefusal::Unknown);
            };
            let t: TokenRecord = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt {
                tree: "tokens",
                message: e.to_string(),
            })?;
            if !ct_eq(&t.secret_hash, secret_hash) {
                return refused(RedeemRefusal::Unknown);
            }
            match t.state {
                TokenState::Used if t.gateway_id.as_deref() == Some(gw.id.as_str()) => {
                    // This very operation, applied again.
                    return Ok(Outcome::Redeemed(Ok(())));
                }
                TokenState::Used => return refused(RedeemRefusal::Used(t.gateway_id)),
                TokenState::Revoked => return refused(RedeemRefusal::Revoked),
                TokenState::Active => {}
            }
            if at_ms >= t.expires_ms {
                return refused(RedeemRefusal::Expired((at_ms - t.expires_ms) / 1000));
            }
            let mut used = t;
            used.state = TokenState::Used;
            used.used_ms = Some(at_ms);
            used.gateway_id = Some(gw.id.clone());
            let swapped = self.tokens.compare_and_swap(
                id.as_bytes(),
                Some(raw),
                Some(serde_json::to_vec(&used).expect("records serialise")),
            )?;
            if swapped.is_ok() {
                break;
            }
            // Changed meanwhile: judge it again as it is now.
        }
        put(&self.gateways, gw.id.as_bytes(), gw)?;
        Ok(Outcome::Redeemed(Ok(())))
    }

    /// Records `rec` under the key unless a live claim holds it; returns whether it did. A
    /// claim older than `window_ms`, or older than a minute whose command was never stored
    /// (its request failed mid-way), is taken over.
    fn apply_claim(
        &self,
        tenant_id: &str,
        key: &str,
        rec: &IdempotencyRecord,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        let k = Self::idem_key(tenant_id, key);
        let new = serde_json::to_vec(rec).expect("records serialise");
        loop {
            let old = self.idempotency.get(&k)?;
            if let Some(raw) = &old {
                let cur: IdempotencyRecord =
                    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
                        tree: "idempotency",
                        message: e.to_string(),
                    })?;
                if cur == *rec {
                    return Ok(true); // this very claim, applied again
                }
                let age = rec.created_ms - cur.created_ms;
                let abandoned = age > 60_000 && self.command(&cur.command_id)?.is_none();
                if age <= window_ms && !abandoned {
                    return Ok(false);
                }
            }
            match self
                .idempotency
                .compare_and_swap(&k, old, Some(new.clone()))?
            {
                Ok(()) => return Ok(true),
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CommandState, TokenState};

    fn gateway(id: &str, tenant: &str) -> Gateway {
        Gateway {
            id: id.into(),
            tenant_id: tenant.into(),
            name: "g".into(),
            hostname: "h".into(),
            paired_ms: 1,
            token_id: "tok_1".into(),
            cert_serial: "01".into(),
            cert_not_after_ms: 10,
            revoked_ms: None,
            version: None,
            command_kinds: Vec::new(),
            last_connected_ms: None,
            last_seen_ms: None,
            public_key: None,
        }
    }

    /// Opens the store in `dir` once the previous one's flusher thread has let go of sled's
    /// lock (it ends shortly after the store is dropped), within 30 s.
    fn reopen(dir: &std::path::Path) -> Store {
        let started = std::time::Instant::now();
        loop {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(_) if started.elapsed() < std::time::Duration::from_secs(30) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("open: {e}"),
            }
        }
    }

    fn command(id: &str) -> Command {
        Command::queued(
            id.into(),
            "tn_1",
            "gw_1",
            "gateway.echo".into(),
            serde_json::json!({}),
            5,
        )
    }

    fn ended(id: &str, ok: bool) -> Op {
        Op::CommandEnded {
            id: id.into(),
            result: CommandResult {
                ok,
                output: serde_json::json!(ok),
                error_class: if ok {
                    String::new()
                } else {
                    "cancelled".into()
                },
                error_message: String::new(),
                started_ms: 6,
                finished_ms: 7,
            },
            completed_ms: 8,
            deliveries: 1,
            received_ms: Some(6),
            only_if_undelivered: false,
            record: None,
        }
    }

    /// Two stores given the same operations in the same order (the second after a JSON round
    /// trip, as a log carries them) answer the same outcomes and hold the same records; an
    /// operation applied again changes nothing.
    #[test]
    fn the_same_operations_in_the_same_order_give_the_same_state() {
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        let stores: Vec<Store> = dirs
            .iter()
            .map(|d| Store::open(d.path()).expect("open"))
            .collect();
        let token = TokenRecord {
            id: "tok_1".into(),
            tenant_id: "tn_1".into(),
            name: String::new(),
            secret_hash: super::super::hash("s3cret"),
            created_ms: 1,
            expires_ms: 1_000,
            state: TokenState::Active,
            used_ms: None,
            gateway_id: None,
        };
        let redeem = |gw: &str, at_ms| Op::TokenRedeemed {
            id: "tok_1".into(),
            secret_hash: super::super::hash("s3cret"),
            at_ms,
            gateway: gateway(gw, "tn_1"),
        };
        let claim = |cmd: &str, at: i64| Op::IdempotencyClaimed {
            tenant_id: "tn_1".into(),
            key: "k1".into(),
            record: IdempotencyRecord {
                command_id: cmd.into(),
                fingerprint: "f".into(),
                created_ms: at,
            },
            window_ms: 1_000,
        };
        let ops = vec![
            Op::TenantCreated {
                tenant: Tenant {
                    id: "tn_1".into(),
                    name: "t".into(),
                    created_ms: 1,
                },
            },
            Op::TokenCreated { token },
            // Two gateways race with one token: the first in the order wins.
            redeem("gw_1", 2),
            redeem("gw_2", 3),
            claim("c_1", 4),
            claim("c_2", 5),
            Op::CommandSubmitted {
                command: command("c_1"),
            },
            Op::CommandSubmitted {
                command: command("c_2"),
            },
            Op::CommandCancelAsked {
                id: "c_2".into(),
                cancel: crate::store::CancelRequest {
                    reason: "r".into(),
                    requested_ms: 6,
                },
            },
            // Two ends of one command: the first stands.
            ended("c_1", true),
            ended("c_1", false),
            Op::GatewayChanged {
                id: "gw_1".into(),
                patch: GatewayPatch {
                    revoked_ms: Some(9),
                    ..Default::default()
                },
            },
        ];
        let mut answers: Vec<Vec<String>> = Vec::new();
        for (n, store) in stores.iter().enumerate() {
            let mut out = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                let op: Op = if n == 1 {
                    serde_json::from_slice(&serde_json::to_vec(op).expect("json")).expect("parse")
                } else {
                    op.clone()
                };
                let seq = 100 + i as u64;
                let first = format!("{:?}", store.apply(seq, &op).expect("apply"));
                out.push(first);
            }
            answers.push(out);
        }
        assert_eq!(answers[0], answers[1]);
        let a = &answers[0];
        assert!(a[2].contains("Redeemed(Ok"), "{}", a[2]);
        assert!(a[3].contains("Used(Some(\"gw_1\"))"), "{}", a[3]);
        assert_eq!(a[4], "Claimed(true)");
        assert_eq!(a[5], "Claimed(false)");
        assert!(a[10].starts_with("Command(None)"), "{}", a[10]);
        for s in &stores {
            let c1 = s.command("c_1").expect("read").expect("c_1");
            assert_eq!(c1.state, CommandState::Succeeded);
            assert_eq!((c1.deliveries, c1.received_ms), (1, Some(6)));
            assert_eq!(
                s.command("c_2")
                    .expect("read")
                    .expect("c_2")
                    .cancel
                    .expect("asked")
                    .reason,
                "r"
            );
            assert_eq!(s.all_pending().expect("pending").len(), 1);
            assert!(s.gateway("gw_2").expect("read").is_none());
            assert_eq!(
                s.gateway("gw_1").expect("read").expect("gw_1").revoked_ms,
                Some(9)
            );
            assert_eq!(
                s.token("tok_1")
                    .expect("read")
                    .expect("tok")
                    .gateway_id
                    .as_deref(),
                Some("gw_1")
            );
            // The events the operations made carry the operations' numbers.
            let seqs: Vec<u64> = s
                .events(Some("tn_1"), None, None, 10)
                .expect("events")
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(seqs, vec![100, 101]);
        }
        // Applied again (a replica that crashed before recording how far it got): same state.
        let s = &stores[0];
        for (i, op) in ops.iter().enumerate() {
            s.apply(100 + i as u64, op).expect("again");
        }
        assert_eq!(s.all_pending().expect("pending").len(), 1);

        // An end carrying the writer's record (one node) is written from it while the pending
        // index holds the command, and is nothing once the command has ended.
        let mut c2 = s.command("c_2").expect("read").expect("c_2");
        assert_eq!(c2.pending_key, Store::pending_key("gw_1", 107));
        c2.deliveries = 3;
        let with_record = |c: &Command| match ended("c_2", true) {
            Op::CommandEnded {
                id,
                result,
                completed_ms,
                ..
            } => Op::CommandEnded {
                id,
                result,
                completed_ms,
                deliveries: 3,
                received_ms: None,
                only_if_undelivered: false,
                record: Some(Box::new(c.clone())),
            },
            other => other,
        };
        let first = s.apply(200, &with_record(&c2)).expect("end");
        assert!(
            matches!(first, Outcome::Command(Some(ref c)) if c.state == CommandState::Succeeded
                && c.deliveries == 3 && c.cancel.is_some()),
            "{first:?}"
        );
        assert!(matches!(
            s.apply(201, &with_record(&c2)).expect("again"),
            Outcome::Command(None)
        ));
        assert!(s.all_pending().expect("pending").is_empty());
        assert_eq!(
            s.token("tok_1")
                .expect("read")
                .expect("tok")
                .gateway_id
                .as_deref(),
            Some("gw_1")
        );
        assert_eq!(
            s.command("c_1").expect("read").expect("c_1").state,
            CommandState::Succeeded
        );
    }

    /// The feed's retention holds over a restart: the command log's memory has its commands'
    /// entries again after a reopen, but none at or below what retention removed is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn feed_entries_removed_by_retention_stay_out_after_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let read = |s: &Store| -> Vec<u64> {
            s.feed_read("tn_1", 0, u64::MAX, 100)
                .expect("read")
                .into_iter()
                .map(|e| e.seq)
                .collect()
        };
        {
            let s = Store::open(dir.path()).expect("open");
            for (seq, op) in [
                (
                    1,
                    Op::CommandSubmitted {
                        command: command("c_1"),
                    },
                ),
                (2, ended("c_1", true)),
            ] {
                s.apply(seq, &op).expect("apply");
            }
            assert_eq!(read(&s), [1, 2]);
            assert_eq!(s.prune_feed(i64::MAX).expect("prune"), 2);
            assert!(read(&s).is_empty());
            s.flush().await.expect("flush");
        }
        // The previous store's flusher thread lets go of sled's lock as it ends.
        let s = reopen(dir.path());
        assert!(
            s.command("c_1").expect("read").is_some(),
            "the command stays"
        );
        assert!(read(&s).is_empty(), "{:?}", read(&s));
    }

    /// A store written when commands lived in sled trees opens with them in the command log,
    /// the trees emptied, and a copy left unfinished by a stop is made again.
    #[test]
    fn commands_kept_in_sled_trees_move_to_the_command_log() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let db = sled::open(dir.path()).expect("sled");
            let commands = db.open_tree("commands").expect("tree");
            let pending = db.open_tree("pending").expect("tree");
            for (i, id) in ["c_old_1", "c_old_2"].into_iter().enumerate() {
                let mut c = command(id);
                c.pending_key = Store::pending_key("gw_1", i as u64 + 1);
                if i == 1 {
                    c.state = CommandState::Succeeded;
                } else {
                    pending
                        .insert(&c.pending_key, id.as_bytes())
                        .expect("pending");
                }
                commands
                    .insert(id, serde_json::to_vec(&c).expect("json"))
                    .expect("insert");
            }
            db.flush().expect("flush");
        }
        // A copy a stop interrupted is thrown away and made again.
        std::fs::create_dir(dir.path().join("cmdlog.new")).expect("dir");
        std::fs::write(dir.path().join("cmdlog.new/00000001.log"), b"partial").expect("write");
        for _ in 0..2 {
            // The previous store's flusher thread lets go of sled's lock as it ends.
            let s = reopen(dir.path());
            let pending: Vec<String> = s
                .all_pending()
                .expect("pending")
                .into_iter()
                .map(|c| c.id)
                .collect();
            assert_eq!(pending, ["c_old_1"]);
            assert_eq!(
                s.command("c_old_2").expect("read").expect("kept").state,
                CommandState::Succeeded
            );
            assert_eq!(s.tenant_command_ids("tn_1").count(), 2);
            assert!(s.db.open_tree("commands").expect("tree").is_empty());
            assert!(s.db.open_tree("pending").expect("tree").is_empty());
        }
        assert!(!dir.path().join("cmdlog.new").exists());
    }
}
