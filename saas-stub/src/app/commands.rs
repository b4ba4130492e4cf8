//! Commands: submit (idempotent with a client's key, optionally with a deadline), look up
//! (long-polling for the result), list, cancel.
//!
//! Secrets in a payload (values under `password`, `secret`, `token`, ... keys) are sealed to the
//! gateway's public key before anything is written, so neither the store nor the logs ever hold
//! them in clear; only the gateway can open them.

use std::time::Duration;

use pcg_proto::sealed::{seal_secrets, Recipient};
use serde_json::Value;

use super::{plausible_id, printable, App, AppError, AppResult, Caller, Kind};
use crate::commands::CancelOutcome;
use crate::store::{
    self, now_ms, CancelRequest, Command, CommandFilter, CommandResult, Gateway, IdempotencyRecord,
    Op, Outcome, Store,
};

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Longest deadline a command may be given, seconds (7 days).
pub const MAX_DEADLINE_SECS: u64 = 7 * 86_400;

/// Longest cancel reason, characters.
pub const MAX_CANCEL_REASON: usize = 512;

/// A command to submit, as a client sent it.
pub struct Submit<'a> {
    pub gateway_id: &'a str,
    pub kind: String,
    pub payload: Option<Value>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Seconds from now by which the command must have ended (`deadline_seconds`).
    pub deadline_seconds: Option<u64>,
}

/// What a submit did.
pub struct Submitted {
    pub command: Command,
    /// True when the idempotency key named an earlier submit, which is returned instead.
    pub replayed: bool,
}

/// `namespace.verb[.more]`: lower-case ASCII letters, digits and `_`, at most 128 characters.
pub fn valid_kind(kind: &str) -> bool {
    let parts: Vec<&str> = kind.split('.').collect();
    kind.len() <= 128
        && parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        && parts[0].as_bytes()[0].is_ascii_lowercase()
}

impl App {
    pub(super) fn tenant_gateway(&self, tenant: &str, id: &str) -> AppResult<Gateway> {
        let found = if plausible_id(id) {
            self.store.gateway(id)?
        } else {
            None
        };
        found.filter(|g| g.tenant_id == tenant).ok_or_else(|| {
            AppError::not_found(format!(
                "gateway {} not found in tenant {tenant}; list your gateways with GET /v1/gateways",
                printable(id)
            ))
        })
    }

    /// Checks, seals and stores a command (durably), then hands it to the gateway's tunnel.
    pub async fn submit_command(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        req: Submit<'_>,
    ) -> AppResult<Submitted> {
        let staged = self.stage(caller, req).await?;
        if !staged.replayed {
            self.store.flush().await?;
            self.queued(&staged.command);
        }
        Ok(staged)
    }

    /// Many commands at once: each is checked and stored as `submit_command` does, and one
    /// durable write covers them all. Each item answers on its own (a refused item does not
    /// refuse the others).
    pub async fn submit_batch(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        items: Vec<Submit<'_>>,
    ) -> AppResult<Vec<AppResult<Submitted>>> {
        caller.tenant()?;
        if items.len() > self.cfg.max_batch {
            return Err(AppError::new(
                Kind::TooLarge,
                "batch_too_large",
                format!(
                    "{} commands in one batch; the limit is {} (max_batch)",
                    items.len(),
                    self.cfg.max_batch
                ),
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        // A batch usually names one gateway: its record is read and decoded once, not once per
        // item, and stands for the whole request, as a single read at its start would.
        let mut last: Option<Gateway> = None;
        for req in items {
            let g = match last.take() {
                Some(g) if g.id == req.gateway_id => Ok(g),
                _ => self.submit_gateway(caller, req.gateway_id).await,
            };
            out.push(match g {
                Ok(g) => {
                    let r = self.stage_for(caller, &g, req).await;
                    last = Some(g);
                    r
                }
                Err(e) => Err(e),
            });
        }
        if out.iter().any(|r| r.as_ref().is_ok_and(|s| !s.replayed)) {
            self.store.flush().await?;
        }
        for s in out.iter().flatten() {
            if !s.replayed {
                self.queued(&s.command);
            }
        }
        Ok(out)
    }

    /// A stored, durable command: counted and handed to its gateway's tunnel.
    fn queued(self: &std::sync::Arc<Self>, cmd: &Command) {
        self.metrics.commands_submitted.inc();
        self.hand_out(cmd);
    }

    /// Hands a queued command to its gateway's tunnel, if it is up (else the tunnel takes it
    /// when it next connects).
    fn hand_out(self: &std::sync::Arc<Self>, cmd: &Command) {
        let (app, queued) = (self.clone(), cmd.clone());
        self.tasks
            .spawn(async move { crate::broker::deliver(&app, &queued).await });
    }

    /// Checks, seals and writes a command (not yet flushed); or finds the command its
    /// idempotency key already made (`replayed`, durable).
    async fn stage(&self, caller: &Caller, req: Submit<'_>) -> AppResult<Submitted> {
        let g = self.submit_gateway(caller, req.gateway_id).await?;
        self.stage_for(caller, &g, req).await
    }

    /// The caller's gateway a command is submitted to.
    async fn submit_gateway(&self, caller: &Caller, id: &str) -> AppResult<Gateway> {
        let tenant = caller.tenant()?;
        match self.tenant_gateway(tenant, id) {
            Err(e) if self.log.is_cluster() && e.kind == Kind::NotFound => {
                // It may have just been paired on another replica.
                self.catch_up().await?;
                self.tenant_gateway(tenant, id)
            }
            r => r,
        }
    }

    /// [`Self::stage`] for the gateway `g` (the caller's, as `submit_gateway` found it).
    async fn stage_for(
        &self,
        caller: &Caller,
        g: &Gateway,
        req: Submit<'_>,
    ) -> AppResult<Submitted> {
        let tenant = caller.tenant()?;
        if let Some(k) = &req.idempotency_key {
            if k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY
                || !k.bytes().all(|b| (0x21..=0x7e).contains(&b))
            {
                return Err(AppError::invalid(
                    "invalid_idempotency_key",
                    format!("the Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters without spaces (a UUID is a good choice)"),
                ));
            }
        }
        if g.revoked_ms.is_some() {
            return Err(AppError::new(
                Kind::Conflict,
                "gateway_revoked",
                format!(
                    "gateway {} is revoked and takes no commands; pair a gateway again with a new token",
                    g.id
                ),
            ));
        }
        if !valid_kind(&req.kind) {
            return Err(AppError::invalid(
                "invalid_kind",
                format!(
                    "command kind \"{}\" is malformed: it must look like `namespace.verb` (lower-case letters, digits, `_`, at most 128 characters), e.g. `gateway.diagnose`",
                    printable(&req.kind)
                ),
            ));
        }
        if let Some(d) = req.deadline_seconds {
            if d == 0 || d > MAX_DEADLINE_SECS {
                return Err(AppError::invalid(
                    "invalid_deadline",
                    format!("deadline_seconds must be 1 to {MAX_DEADLINE_SECS} (7 days); leave it out for no deadline"),
                ));
            }
        }
        let mut payload = req.payload.unwrap_or_else(|| serde_json::json!({}));
        if !payload.is_object() {
            return Err(AppError::invalid(
                "invalid_payload",
                "the command payload must be a JSON object",
            ));
        }
        let body = serde_json::to_vec(&payload).expect("JSON values serialise");
        if body.len() > self.cfg.max_payload_bytes {
            return Err(AppError::new(
                Kind::TooLarge,
                "payload_too_large",
                format!(
                    "the command payload is {} bytes; the limit is {} (max_payload_bytes)",
                    body.len(),
                    self.cfg.max_payload_bytes
                ),
            ));
        }
        if !g.command_kinds.is_empty() && !g.command_kinds.contains(&req.kind) {
            return Err(AppError::new(
                Kind::Unprocessable,
                "unsupported_kind",
                format!(
                    "gateway {} does not support command kind \"{}\"; it supports: {}",
                    g.id,
                    req.kind,
                    g.command_kinds.join(", ")
                ),
            ));
        }
        // The fingerprint of this request, for its idempotency key: over the clear request, so
        // that a retry matches, keyed so that it reveals nothing about the body.
        let fingerprint = req.idempotency_key.as_ref().map(|_| {
            let mut m = ring::hmac::Context::with_key(&self.idempotency_key);
            for part in [g.id.as_bytes(), req.kind.as_bytes(), &body] {
                m.update(&(part.len() as u64).to_be_bytes());
                m.update(part);
            }
            // Only when given, so fingerprints of requests without one stay as they were.
            if let Some(d) = req.deadline_seconds {
                m.update(b"deadline_seconds");
                m.update(&d.to_be_bytes());
            }
            hex::encode(m.sign().as_ref())
        });
        if let (Some(key), Some(fp)) = (&req.idempotency_key, &fingerprint) {
            if let Some(done) = self.replay(tenant, key, fp).await? {
                return Ok(done);
            }
        }
        if pcg_proto::sealed::contains_secrets(&payload) {
            let recipient = g
                .public_key
                .as_deref()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|k| Recipient::from_sec1(&k).ok())
                .ok_or_else(|| {
                    AppError::new(
                        Kind::Unavailable,
                        "gateway_key_unknown",
                        format!(
                            "the payload carries secrets, but the public key of gateway {} is not known yet to seal them to; connect the gateway once (it records its key) and send again",
                            g.id
                        ),
                    )
                })?;
            seal_secrets(&mut payload, &recipient);
        }
        let mut cmd = Command::queued(
            store::new_id("cmd", 12),
            tenant,
            &g.id,
            req.kind,
            payload,
            now_ms(),
        );
        cmd.deadline_ms = req.deadline_seconds.map(|d| {
            cmd.submitted_ms
                .saturating_add(i64::try_from(d).unwrap_or(i64::MAX).saturating_mul(1000))
        });
        if let (Some(key), Some(fp)) = (&req.idempotency_key, fingerprint) {
            let rec = IdempotencyRecord {
                command_id: cmd.id.clone(),
                fingerprint: fp.clone(),
                created_ms: cmd.submitted_ms,
            };
            // First writer of the key wins; a concurrent twin gets the winner's command. A claim
            // past the window, or one whose request never stored its command, is taken over.
            let claim = self
                .commit(Op::IdempotencyClaimed {
                    tenant_id: tenant.to_string(),
                    key: key.clone(),
                    record: rec,
                    window_ms: self.idempotency_window_ms(),
                })
                .await?;
            if !matches!(claim.outcome, Outcome::Claimed(true)) {
                return match self.replay(tenant, key, &fp).await? {
                    Some(done) => Ok(done),
                    None => Err(AppError::new(
                        Kind::Conflict,
                        "idempotency_conflict",
                        "another request with this Idempotency-Key is being processed; retry in a moment",
                    )),
                };
            }
        }
        let done = self
            .commit(Op::CommandSubmitted {
                command: cmd.clone(),
            })
            .await?;
        cmd.pending_key = Store::pending_key(&cmd.gateway_id, done.seq);
        self.commands.insert(&cmd);
        Ok(Submitted {
            command: cmd,
            replayed: false,
        })
    }

    /// The command an idempotency key already names, if the request matches it.
    async fn replay(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: &str,
    ) -> AppResult<Option<Submitted>> {
        let Some(rec) = self.store.idempotency_key(tenant, key)? else {
            return Ok(None);
        };
        if now_ms() - rec.created_ms > self.idempotency_window_ms() {
            return Ok(None);
        }
        if rec.fingerprint != fingerprint {
            return Err(AppError::new(
                Kind::Unprocessable,
                "idempotency_key_reused",
                format!(
                    "Idempotency-Key \"{}\" was used for a different request (command {}); use a new key for a new request",
                    printable(key),
                    rec.command_id
                ),
            ));
        }
        match self.commands.get(&self.store, &rec.command_id)? {
            Some(c) => {
                // Whatever the first request wrote is durable before it is repeated.
                self.store.flush().await?;
                Ok(Some(Submitted {
                    command: c,
                    replayed: true,
                }))
            }
            // The key was claimed but its command is not stored (yet, or the request failed):
            // a concurrent twin is still running, or the store failed mid-way.
            None => Ok(None),
        }
    }

    /// How long idempotency keys are remembered, ms.
    pub fn idempotency_window_ms(&self) -> i64 {
        i64::try_from(self.cfg.idempotency_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// One command of the caller's tenant; with `wait`, waits up to that long for its result
    /// (returning early when the service stops).
    pub async fn get_command(
        &self,
        caller: &Caller,
        id: &str,
        wait: Duration,
    ) -> AppResult<Command> {
        let tenant = caller.tenant()?.to_string();
        let not_found = || {
            AppError::not_found(format!(
                "command {} not found in tenant {tenant}",
                printable(id)
            ))
        };
        if !plausible_id(id) {
            return Err(not_found());
        }
        let read = || -> AppResult<Command> {
            self.commands
                .get(&self.store, id)?
                .filter(|c| c.tenant_id == tenant)
                .ok_or_else(not_found)
        };
        let c = match read() {
            Err(e) if self.log.is_cluster() && e.kind == Kind::NotFound => {
                // It may have just been submitted on another replica.
                self.catch_up().await?;
                read()?
            }
            r => r?,
        };
        if c.state.is_terminal() || wait.is_zero() {
            return Ok(c);
        }
        // Only a real, unfinished command of the caller is waited on.
        let deadline = tokio::time::Instant::now() + wait.min(Duration::from_secs(60));
        let waiter = self.waiters.wait_for(id);
        loop {
            let notified = waiter.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let c = read()?;
            if c.state.is_terminal()
                || tokio::time::Instant::now() >= deadline
                || self.shutdown.is_cancelled()
            {
                return Ok(c);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

    /// Cancels a command of the caller's tenant. One never handed to a tunnel ends `cancelled`
    /// at once; otherwise the cancel is recorded durably and sent to the gateway (now if its
    /// tunnel is up, else when it next connects), which ends the command `cancelled` (a command
    /// past the point of no return may still succeed). Asking again is harmless; a command
    /// that has ended is a conflict.
    pub async fn cancel_command(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        id: &str,
        reason: Option<String>,
    ) -> AppResult<Command> {
        let tenant = caller.tenant()?.to_string();
        let reason = match reason.as_deref().map(str::trim) {
            None | Some("") => "cancelled through the API".to_string(),
            Some(r) if r.chars().count() > MAX_CANCEL_REASON || r.chars().any(char::is_control) => {
                return Err(AppError::invalid(
                    "invalid_reason",
                    format!("the reason must be at most {MAX_CANCEL_REASON} characters without control characters"),
                ));
            }
            Some(r) => r.to_string(),
        };
        let not_found = || {
            AppError::not_found(format!(
                "command {} not found in tenant {tenant}",
                printable(id)
            ))
        };
        if !plausible_id(id) {
            return Err(not_found());
        }
        match self.cancel(id, &tenant, &reason).await? {
            CancelOutcome::Unknown => Err(not_found()),
            CancelOutcome::Finished(c) => Err(AppError::new(
                Kind::Conflict,
                "command_finished",
                format!(
                    "command {} already ended ({}); its result stands",
                    c.id,
                    c.state.as_str()
                ),
            )),
            CancelOutcome::CancelledNow(c) => {
                self.store.flush().await?;
                self.finished(&c);
                Ok(c)
            }
            CancelOutcome::Forwarded(c) => {
                self.store.flush().await?;
                crate::broker::send_cancel(self, &c).await;
                Ok(c)
            }
        }
    }

    /// Ends, as `timed_out`, the commands past their deadline that were never handed to a
    /// tunnel (see [`crate::commands::Commands::expire`]). Run every half second.
    pub async fn expire_deadlines(self: &std::sync::Arc<Self>) -> AppResult<()> {
        let now = now_ms();
        let mut ended = Vec::new();
        for id in self.commands.due(now) {
            let result = CommandResult {
                ok: false,
                output: serde_json::Value::Null,
                error_class: "timed_out".into(),
                error_message:
                    "timed out: its deadline passed before it was handed to its gateway (the gateway was not connected)"
                        .into(),
                started_ms: now,
                finished_ms: now,
            };
            if let Some(c) = self.end_undelivered(&id, result).await? {
                ended.push(c);
            }
        }
        if ended.is_empty() {
            return Ok(());
        }
        self.store.flush().await?;
        for c in &ended {
            self.finished(c);
        }
        Ok(())
    }

    /// Records the result `gateway_id` sent for command `id` (written, not flushed): `None`,
    /// not a command of this gateway; `Some(None)`, it had ended (a redelivered result);
    /// `Some(Some(c))`, ended now with it.
    pub async fn complete_command(
        &self,
        id: &str,
        gateway_id: &str,
        result: CommandResult,
    ) -> AppResult<Option<Option<Command>>> {
        let Some(waiting) = self.commands.to_complete(&self.store, id, gateway_id)? else {
            return Ok(None);
        };
        let Some(c) = waiting else {
            return Ok(Some(None));
        };
        let done = self
            .commit(Op::CommandEnded {
                id: c.id.clone(),
                result,
                completed_ms: now_ms(),
                deliveries: c.deliveries,
                received_ms: c.received_ms,
                only_if_undelivered: false,
                record: self.memory_is_the_record(&c),
            })
            .await?;
        Ok(Some(self.ended(id, done.command())?))
    }

    /// One node's memory holds everything its store has of a command (every change goes
    /// through both), so the end is written from it; a replica's may lag the log.
    fn memory_is_the_record(&self, c: &Command) -> Option<Box<Command>> {
        (!self.log.is_cluster()).then(|| Box::new(c.clone()))
    }

    /// Memory after a `CommandEnded` was applied: the command as ended, or (`None`: it had
    /// ended before) as the store has it.
    fn ended(&self, id: &str, done: Option<Command>) -> AppResult<Option<Command>> {
        match done {
            Some(c) => {
                self.commands.finish(&c);
                Ok(Some(c))
            }
            None => {
                if let Some(c) = self.store.command(id)?.filter(|c| c.state.is_terminal()) {
                    self.commands.finish(&c);
                }
                Ok(None)
            }
        }
    }

    /// Ends a command that was never handed to a tunnel (written, not flushed); `None` when it
    /// ended already or may have reached its gateway. One node decides it in memory, under the
    /// lock a delivery takes; a replica by the log's order (a `CommandHandedOut` from any
    /// replica before it, and it is not ended here).
    async fn end_undelivered(
        self: &std::sync::Arc<Self>,
        id: &str,
        result: CommandResult,
    ) -> AppResult<Option<Command>> {
        if self.log.is_cluster() {
            let done = self
                .commit(Op::CommandEnded {
                    id: id.to_string(),
                    result,
                    completed_ms: now_ms(),
                    deliveries: 0,
                    received_ms: None,
                    only_if_undelivered: true,
                    record: None,
                })
                .await?;
            return self.ended(id, done.command());
        }
        let Some(c) = self.commands.end_undelivered(id, result) else {
            return Ok(None);
        };
        let written = self
            .commit(Op::CommandEnded {
                id: c.id.clone(),
                result: c.result.clone().expect("an ended command has a result"),
                completed_ms: c.completed_ms.unwrap_or_else(now_ms),
                deliveries: c.deliveries,
                received_ms: c.received_ms,
                only_if_undelivered: false,
                record: self.memory_is_the_record(&c),
            })
            .await;
        if let Err(e) = written {
            // Not ended after all: memory must not show an end the store does not have, nor
            // keep the command from its gateway (a tunnel up now takes it now).
            if let Some(queued) = self.commands.reopen_undelivered(&self.store, id) {
                self.hand_out(&queued);
            }
            return Err(e);
        }
        Ok(Some(c))
    }

    /// A cancel for command `id` of `tenant_id` (see [`CancelOutcome`]).
    async fn cancel(
        self: &std::sync::Arc<Self>,
        id: &str,
        tenant_id: &str,
        reason: &str,
    ) -> AppResult<CancelOutcome> {
        let Some(c) = self
            .commands
            .get(&self.store, id)?
            .filter(|c| c.tenant_id == tenant_id)
        else {
            return Ok(CancelOutcome::Unknown);
        };
        if c.state.is_terminal() {
            return Ok(CancelOutcome::Finished(c));
        }
        let now = now_ms();
        let result = CommandResult {
            ok: false,
            output: serde_json::Value::Null,
            error_class: "cancelled".into(),
            error_message: format!("cancelled before it reached the gateway: {reason}"),
            started_ms: now,
            finished_ms: now,
        };
        if let Some(done) = self.end_undelivered(id, result).await? {
            return Ok(CancelOutcome::CancelledNow(done));
        }
        let asked = CancelRequest {
            reason: reason.to_string(),
            requested_ms: now,
        };
        match self.commands.ask_cancel(&self.store, id, asked)? {
            CancelOutcome::Forwarded(c) => {
                let cancel = c.cancel.clone().expect("a forwarded cancel is recorded");
                let done = self
                    .commit(Op::CommandCancelAsked {
                        id: c.id.clone(),
                        cancel,
                    })
                    .await?;
                Ok(match done.command() {
                    Some(_) => CancelOutcome::Forwarded(c),
                    // It ended meanwhile.
                    None => match self.store.command(id)? {
                        Some(c) => CancelOutcome::Finished(c),
                        None => CancelOutcome::Unknown,
                    },
                })
            }
            other => Ok(other),
        }
    }

    /// A command that ended here (not by a gateway's result): waiters woken, counted.
    fn finished(&self, c: &Command) {
        self.waiters.notify(&c.id);
        self.metrics
            .commands_finished
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: c.state.as_str().into(),
            })
            .inc();
    }

    /// The tenant's commands, newest first, through the tenant index: reading stops once
    /// `limit` match (live ones as memory has them).
    pub fn list_commands(&self, caller: &Caller, f: CommandFilter) -> AppResult<Vec<Command>> {
        let tenant = caller.tenant()?;
        if f.gateway_id.as_deref().is_some_and(|g| !plausible_id(g))
            || f.kind.as_deref().is_some_and(|k| !valid_kind(k))
        {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for id in self.store.tenant_command_ids(tenant) {
            let Some(c) = self.commands.get(&self.store, &id)? else {
                continue;
            };
            if f.gateway_id.as_ref().is_some_and(|g| *g != c.gateway_id)
                || f.state.is_some_and(|s| s != c.state)
                || f.kind.as_ref().is_some_and(|k| *k != c.kind)
            {
                continue;
            }
            out.push(c);
            if out.len() >= f.limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Commands;
    use crate::store::CommandState;
    use std::sync::Arc;

    fn cmd(id: &str, tenant: &str, gw: &str, at: i64) -> Command {
        Command::queued(
            id.into(),
            tenant,
            gw,
            "gateway.echo".into(),
            serde_json::json!({}),
            at,
        )
    }

    fn ok() -> CommandResult {
        CommandResult {
            ok: true,
            output: serde_json::json!(1),
            error_class: String::new(),
            error_message: String::new(),
            started_ms: 0,
            finished_ms: 0,
        }
    }

    async fn app() -> (tempfile::TempDir, Arc<App>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::Config {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let app = crate::app::open(cfg, "127.0.0.1:1".parse().expect("addr"), None)
            .await
            .expect("open");
        (dir, app)
    }

    /// What a submit does once checked: the operation, then memory.
    async fn insert(app: &App, mut c: Command) {
        let done = app
            .commit(Op::CommandSubmitted { command: c.clone() })
            .await
            .expect("insert");
        c.pending_key = Store::pending_key(&c.gateway_id, done.seq);
        app.commands.insert(&c);
    }

    #[tokio::test]
    async fn pending_survives_a_restart_and_retention_keeps_what_it_must() {
        let (_dir, app) = app().await;
        let t = app.store.create_tenant("t").expect("tenant").id;
        let day = 86_400_000;
        let now = now_ms();
        for (id, at) in [
            ("c_old_done", now - 10 * day),
            ("c_old_pending", now - 10 * day),
            ("c_new_done", now),
        ] {
            insert(&app, cmd(id, &t, "gw_1", at)).await;
        }
        for id in ["c_old_done", "c_new_done"] {
            app.complete_command(id, "gw_1", ok())
                .await
                .expect("complete")
                .expect("known")
                .expect("newly");
        }
        // A redelivered result is recognised; another gateway's is not its to give.
        assert!(matches!(
            app.complete_command("c_new_done", "gw_1", ok()).await,
            Ok(Some(None))
        ));
        assert!(matches!(
            app.complete_command("c_old_pending", "gw_2", ok()).await,
            Ok(None)
        ));
        assert_eq!(app.commands.pending_count("gw_1"), 1);
        // A restart rebuilds the pending table from the store.
        let table = Commands::load(&app.store, false).expect("reload");
        assert_eq!(
            table
                .pending("gw_1")
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>(),
            vec!["c_old_pending"]
        );
        // Retention deletes old finished commands only.
        let store = &app.store;
        let gone = store.prune_commands(now - 7 * day).expect("prune");
        assert_eq!(gone, vec!["c_old_done".to_string()]);
        assert!(store.command("c_old_done").expect("read").is_none());
        assert!(store.command("c_old_pending").expect("read").is_some());
        let ids: Vec<String> = store.tenant_command_ids(&t).collect();
        assert_eq!(
            ids,
            vec!["c_new_done".to_string(), "c_old_pending".to_string()]
        );
    }

    #[tokio::test]
    async fn cancel_and_deadline_end_only_what_never_reached_a_gateway() {
        let (_dir, app) = app().await;
        let t = app.store.create_tenant("t").expect("tenant").id;
        let now = now_ms();
        for id in ["c_queued", "c_handed", "c_late", "c_sent_late", "c_done"] {
            let mut c = cmd(id, &t, "gw_1", now);
            if id.contains("late") {
                c.deadline_ms = Some(now - 1);
            }
            insert(&app, c).await;
        }
        for id in ["c_handed", "c_sent_late"] {
            app.commands.delivered(id).expect("pending");
        }
        app.complete_command("c_done", "gw_1", ok())
            .await
            .expect("complete");

        // Never handed out: ended here. Handed out: left to the gateway, the cancel recorded.
        match app.cancel("c_queued", &t, "r1").await.expect("cancel") {
            CancelOutcome::CancelledNow(c) => {
                assert_eq!(c.state, CommandState::Cancelled);
                assert!(c.result.expect("result").error_message.contains("r1"));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            app.store
                .command("c_queued")
                .expect("read")
                .expect("kept")
                .state,
            CommandState::Cancelled
        );
        match app.cancel("c_handed", &t, "r2").await.expect("cancel") {
            CancelOutcome::Forwarded(c) => {
                assert_eq!(c.state, CommandState::Delivered);
                assert_eq!(c.cancel.expect("asked").reason, "r2");
            }
            o => panic!("{o:?}"),
        }
        // Asked again: the first reason stays.
        match app.cancel("c_handed", &t, "r3").await.expect("cancel") {
            CancelOutcome::Forwarded(c) => assert_eq!(c.cancel.expect("asked").reason, "r2"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            app.cancel("c_done", &t, "r").await.expect("cancel"),
            CancelOutcome::Finished(_)
        ));
        assert!(matches!(
            app.cancel("c_handed", "other-tenant", "r")
                .await
                .expect("cancel"),
            CancelOutcome::Unknown
        ));

        // Deadlines: only the one never handed out ends here.
        app.expire_deadlines().await.expect("expire");
        assert_eq!(
            app.commands.cached("c_late").expect("kept").state,
            CommandState::TimedOut
        );
        assert!(!app
            .commands
            .cached("c_sent_late")
            .expect("kept")
            .state
            .is_terminal());

        // The recorded cancel survives a restart; everything pending counts as handed out.
        let table = Commands::load(&app.store, false).expect("reload");
        let pending = table.pending("gw_1");
        let handed = pending
            .iter()
            .find(|c| c.id == "c_handed")
            .expect("pending");
        assert_eq!(handed.cancel.as_ref().expect("kept").reason, "r2");
        assert_eq!(
            pending.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            vec!["c_handed", "c_sent_late"]
        );
    }
}
