//! The executor: runs commands exactly once in effect, dispatching by command kind to a
//! [`Registry`] of handlers (the built-in `gateway.*` commands here; provider drivers add theirs).
//!
//! The order of events for one command id:
//! 1. journal the id as running and flush (a second delivery now finds it);
//! 2. tell the broker it was received, and execute;
//! 3. write the result to the journal and the outbox, send it, and flush;
//! 4. on the broker's acknowledgement, drop it from the outbox.
//!
//! Step 3 sends before its flush has finished: the broker stores the result durably before it
//! acknowledges it or shows it to anyone, so this side's flush is not on the command's path. A
//! crash before it is durable here leaves the entry running, as a crash just before the write
//! would: the restarted gateway resumes it as recovered (below), which finds its mark or ends
//! `interrupted`, and the broker keeps the result it stored first (a command ends once).
//!
//! A redelivered id gets the stored result (done) or joins the execution under way (running).
//! After a crash, entries still running are executed again with `recovered = true`: a handler
//! whose side effect is not naturally idempotent must look for the mark it left (a vSphere
//! extraConfig key, Nova metadata, the ledger line) before acting again; one whose effect leaves
//! no mark and cannot be told apart from its absence (a power cycle, a reset, a reboot) ends
//! `interrupted` instead, with the state found now ([`ExecContext::not_repeated`], the one rule
//! the vSphere, OpenStack and bare-metal handlers share).
//!
//! **Stopping an execution** ([`crate::executions`]): a cancel from the SaaS, the command's
//! deadline, or a stopping gateway fires the execution's token. A handler registered with
//! [`Registry::register_cancellable`] watches it and gets [`CANCEL_GRACE`] to wind down (a
//! vSphere clone asks vCenter to cancel its task); any other handler is abandoned at once (its
//! task is dropped). Either way the command ends `cancelled`, `timed_out` or `interrupted`
//! (unless the handler finished its work first), and that result is journaled like any other:
//! the id is never executed again. A cancel for an id not executed yet journals it as cancelled,
//! so a later delivery gets that result instead of running it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt as _;
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{Command, CommandReceived, CommandResult, GatewayFrame};
use serde_json::{json, Value};

use crate::executions::{Execution, Stop};
use crate::store::{now_ms, EntryState, JournalEntry, StoredResult};
use crate::Gateway;

/// How long a handler that watches its cancellation token has, once it fired, to end by itself
/// before it is abandoned.
pub const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A failed execution: a stable class and a message for a person.
#[derive(Debug, Clone)]
pub struct ExecError {
    pub class: String,
    pub message: String,
}

impl ExecError {
    pub fn new(class: &str, message: impl Into<String>) -> Self {
        ExecError {
            class: class.to_string(),
            message: message.into(),
        }
    }
    pub fn invalid_payload(message: impl Into<String>) -> Self {
        Self::new("invalid_payload", message)
    }
}

impl From<pcg_provider::ProviderError> for ExecError {
    /// A provider error keeps its kind (`auth`, `not_found`, `timeout`, ...) as the class and its
    /// message, which names the endpoint and what to do.
    fn from(e: pcg_provider::ProviderError) -> Self {
        let class = serde_json::to_value(e.kind())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "provider".into());
        ExecError::new(&class, e.to_string())
    }
}

/// What a handler is told about the command it executes.
#[derive(Clone)]
pub struct ExecContext {
    pub command_id: String,
    pub kind: String,
    /// True when this id was journaled before a restart and is being executed again.
    pub recovered: bool,
    pub gateway: Arc<Gateway>,
    /// Fires when the command is cancelled, its deadline passes or the gateway is stopping.
    /// Only handlers registered with [`Registry::register_cancellable`] get time to act on it.
    pub cancel: tokio_util::sync::CancellationToken,
    pub(crate) execution: Arc<Execution>,
}

impl ExecContext {
    /// Reports progress of this command to the SaaS (rate-limited; the latest report wins).
    pub fn progress(&self, p: &pcg_provider::TaskProgress) {
        crate::executions::report(&self.gateway, &self.command_id, &self.execution, p);
    }

    /// The rule for an effect that cannot be told apart from its absence afterwards (a power
    /// cycle, a reset, a reboot): found running after a restart, it is not repeated. On a
    /// recovered execution this ends the command `interrupted`, naming `what` it was doing and
    /// the state `now` reads (`None`: unknown), so that the operator decides whether to send it
    /// again; on a first execution it lets it run. The drivers say which commands it covers.
    pub async fn not_repeated(
        &self,
        what: &str,
        now: impl Future<Output = Option<String>>,
    ) -> Result<(), ExecError> {
        if !self.recovered {
            return Ok(());
        }
        let now = now.await.unwrap_or_else(|| "unknown".into());
        Err(ExecError::new(
            "interrupted",
            format!(
                "the gateway restarted while this {what} was running; it may or may not have taken effect, so it is not repeated (now: {now}); send it again if needed"
            ),
        ))
    }

    /// A progress sink for a driver (`pcg_provider::ProgressSink`) that reports to the SaaS.
    pub fn progress_sink(&self) -> impl Fn(&pcg_provider::TaskProgress) + Send + Sync + 'static {
        let ctx = self.clone();
        move |p: &pcg_provider::TaskProgress| ctx.progress(p)
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, ExecError>> + Send>>;

/// Executes one kind of command.
pub trait Handler: Send + Sync {
    fn execute(&self, ctx: ExecContext, payload: Value) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(ExecContext, Value) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Value, ExecError>> + Send + 'static,
{
    fn execute(&self, ctx: ExecContext, payload: Value) -> HandlerFuture {
        Box::pin(self(ctx, payload))
    }
}

/// Command kinds and their handlers.
#[derive(Default, Clone)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    /// Kinds whose handler watches `ExecContext::cancel` and winds down by itself.
    cancellable: std::collections::BTreeSet<String>,
}

impl Registry {
    /// Registers a handler that does not watch its cancellation token: a cancelled execution
    /// of it is abandoned at once (its task is dropped wherever it was).
    pub fn register(&mut self, kind: &str, h: impl Handler + 'static) {
        self.handlers.insert(kind.to_string(), Arc::new(h));
        self.cancellable.remove(kind);
    }

    /// Registers a handler that watches `ExecContext::cancel` and ends by itself once it fires
    /// (within [`CANCEL_GRACE`], after which it is abandoned too).
    pub fn register_cancellable(&mut self, kind: &str, h: impl Handler + 'static) {
        self.handlers.insert(kind.to_string(), Arc::new(h));
        self.cancellable.insert(kind.to_string());
    }

    /// Whether the handler of `kind` watches its cancellation token.
    pub fn is_cancellable(&self, kind: &str) -> bool {
        self.cancellable.contains(kind)
    }
    pub fn kinds(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// Every command this gateway can execute: the built-ins and the provider drivers.
    pub fn standard(ledger: Option<PathBuf>) -> Registry {
        let mut r = Self::builtin(ledger);
        crate::baremetal::register(&mut r);
        crate::openstack::register(&mut r);
        crate::vsphere::register(&mut r);
        r
    }

    /// The built-in commands, which need no provider.
    pub fn builtin(ledger: Option<PathBuf>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "gateway.diagnose",
            |ctx: ExecContext, _p: Value| async move { Ok(diagnose(&ctx.gateway)) },
        );
        r.register("gateway.echo", |_ctx: ExecContext, p: Value| async move {
            Ok(json!({ "echo": p }))
        });
        r.register_cancellable("gateway.sleep", |ctx: ExecContext, p: Value| async move {
            let ms = p.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                ExecError::invalid_payload("gateway.sleep needs {\"ms\": N} with N at most 60000")
            })?;
            if ms > 60_000 {
                return Err(ExecError::invalid_payload(
                    "gateway.sleep: ms is at most 60000",
                ));
            }
            // Reports how far it got about once a second; stops when cancelled.
            let start = tokio::time::Instant::now();
            let end = start + std::time::Duration::from_millis(ms);
            loop {
                let slept = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                let percent = u8::try_from(slept.saturating_mul(100) / ms.max(1)).unwrap_or(100);
                ctx.progress(&pcg_provider::TaskProgress::running(
                    percent.min(100),
                    format!("slept {slept} of {ms} ms"),
                ));
                let tick = (start + std::time::Duration::from_secs(slept / 1000 + 1)).min(end);
                tokio::select! {
                    _ = tokio::time::sleep_until(tick) => if tick >= end { break },
                    _ = ctx.cancel.cancelled() => {
                        return Err(ExecError::new(
                            "cancelled",
                            format!("stopped after {} of {ms} ms", start.elapsed().as_millis()),
                        ));
                    }
                }
            }
            Ok(json!({ "slept_ms": ms }))
        });
        if let Some(path) = ledger {
            let ledger = Arc::new(crate::ledger::Ledger::new(path));
            r.register("gateway.ledger", move |ctx: ExecContext, p: Value| {
                let ledger = ledger.clone();
                async move { ledger_append(ledger, &ctx, &p).await }
            });
        }
        r
    }
}

/// `gateway.ledger`: appends `<command id> <payload>` to the ledger file, durably (the sync
/// shared with the appends under way). On a recovered execution it first looks for its own
/// line, so a crash between the append and the journal write does not append twice.
async fn ledger_append(
    ledger: Arc<crate::ledger::Ledger>,
    ctx: &ExecContext,
    payload: &Value,
) -> Result<Value, ExecError> {
    let io = |e: std::io::Error| {
        ExecError::new(
            "ledger",
            format!("ledger file {}: {e}", ledger.path().display()),
        )
    };
    if ctx.recovered {
        // Reading the whole file blocks: off the runtime's workers (recovery only).
        let (l, id) = (ledger.clone(), ctx.command_id.clone());
        let found = tokio::task::spawn_blocking(move || l.find(&id))
            .await
            .map_err(|e| ExecError::new("internal", e.to_string()))?
            .map_err(io)?;
        if let Some(n) = found {
            return Ok(json!({ "line": n, "found_after_restart": true }));
        }
    }
    ledger
        .append(format!("{} {}", ctx.command_id, payload))
        .await
        .map_err(io)?;
    Ok(json!({ "appended": true }))
}

fn diagnose(gw: &Gateway) -> Value {
    let id = gw.store.identity().ok().flatten();
    let st = gw.status();
    json!({
        "gateway_id": id.as_ref().map(|i| i.gateway_id.clone()),
        "tenant_id": id.as_ref().map(|i| i.tenant_id.clone()),
        "version": crate::VERSION,
        "hostname": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        "uptime_s": st.uptime_s,
        "clock_unix_ms": now_ms(),
        "clock_utc": crate::status::rfc3339(now_ms()),
        "tunnel_rtt_ms": st.tunnel.rtt_ms,
        "journal_entries": st.journal_entries,
        "outbox_depth": st.outbox_depth,
        "certificate_not_after_utc": st.certificate_not_after_ms.map(crate::status::rfc3339),
        "command_kinds": gw.registry.kinds(),
    })
}

fn result_frame(id: &str, r: &StoredResult) -> GatewayFrame {
    GatewayFrame {
        kind: Some(GKind::Result(CommandResult {
            command_id: id.to_string(),
            ok: r.ok,
            output: serde_json::to_vec(&r.output).expect("JSON values serialise"),
            error_class: r.error_class.clone(),
            error_message: r.error_message.clone(),
            started_unix_ms: r.started_ms,
            finished_unix_ms: r.finished_ms,
        })),
    }
}

/// Sends a result on the current tunnel, if any, without ever waiting. A result stays in the
/// outbox until acknowledged; one that finds the tunnel's queue full is handed to the tunnel's
/// result pump ([`pump_overflow`]), which sends it as soon as there is room. Without a tunnel,
/// the next one sends the whole outbox when it comes up.
pub fn send_result(gw: &Gateway, id: &str, r: &StoredResult) {
    if let Some(tx) = gw.outbound() {
        if tx.try_send(result_frame(id, r)).is_err() {
            gw.overflow.push(id);
        }
    }
}

/// Ids of results that found the tunnel's queue full, waiting for room.
#[derive(Default)]
pub struct Overflow {
    ids: std::sync::Mutex<std::collections::HashSet<String>>,
    kick: tokio::sync::Notify,
}

impl Overflow {
    fn push(&self, id: &str) {
        self.ids
            .lock()
            .expect("overflow lock is never poisoned")
            .insert(id.to_string());
        self.kick.notify_one();
    }

    /// Forgets every id (a new tunnel sends the whole outbox anyway).
    pub(crate) fn clear(&self) {
        self.ids
            .lock()
            .expect("overflow lock is never poisoned")
            .clear();
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.ids.lock().expect("overflow lock is never poisoned"))
            .into_iter()
            .collect()
    }
}

/// The result pump of one tunnel: sends the results that found `tx` full, waiting for room
/// (never dropping one), until the tunnel ends. A result acknowledged meanwhile (no longer in
/// the outbox) is skipped. It runs beside the tunnel's read loop, never in it: a read loop
/// that waited for room to send could deadlock with a broker waiting for room to deliver.
pub async fn pump_overflow(gw: Arc<Gateway>, tx: tokio::sync::mpsc::Sender<GatewayFrame>) {
    loop {
        let ids = gw.overflow.take();
        if ids.is_empty() {
            gw.overflow.kick.notified().await;
            continue;
        }
        for id in ids {
            let r = match gw.store.outbox_result(&id) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(command = %id, "cannot read a result from the outbox: {e}");
                    continue;
                }
            };
            if tx.send(result_frame(&id, &r)).await.is_err() {
                // The tunnel ended: the next one sends the whole outbox.
                return;
            }
        }
    }
}

/// A delivered command whose journal entry could not be written or made durable: it was
/// neither acknowledged nor executed, and the tunnel closes on it (the broker delivers it again
/// on the next one).
#[derive(Debug, thiserror::Error)]
#[error("cannot journal command {id}: {source}")]
pub struct NotJournaled {
    pub id: String,
    #[source]
    pub source: crate::store::StoreError,
}

/// Handles a command delivered by the broker, without waiting for the disk: the journal entry is
/// written here, and a task waits for it to be durable (group commit with every other write
/// under way) before it tells the broker and executes. The tunnel's read loop goes on reading
/// meanwhile. When the entry cannot be made durable the command is neither acknowledged nor
/// executed, and `journal_failed` is told so that the tunnel is closed: the broker delivers the
/// command again later.
pub fn on_command(
    gw: &Arc<Gateway>,
    cmd: Command,
    journal_failed: &tokio::sync::mpsc::Sender<NotJournaled>,
) -> Result<(), NotJournaled> {
    let mut payload: Value = if cmd.payload.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&cmd.payload).unwrap_or(Value::Null)
    };
    // Secrets never reach the journal in clear.
    seal_clear_secrets(gw, &mut payload);
    let entry = JournalEntry {
        id: cmd.id.clone(),
        kind: cmd.kind.clone(),
        payload,
        state: EntryState::Running,
        received_ms: now_ms(),
        result: None,
        acked_ms: None,
        deadline_ms: (cmd.deadline_unix_ms > 0).then_some(cmd.deadline_unix_ms),
    };
    let found = gw.store.begin(&entry).map_err(|source| NotJournaled {
        id: entry.id.clone(),
        source,
    })?;
    match found {
        // Counted as running from now on, so a redelivery that arrives before the entry is
        // durable joins this execution instead of starting one.
        None => run_when_durable(gw, entry, false, journal_failed),
        Some(existing) => match existing.state {
            EntryState::Done => {
                if let Some(r) = &existing.result {
                    send_result(gw, &existing.id, r);
                }
            }
            EntryState::Running => {
                // Joins the execution under way; its result is sent when it ends. An entry
                // running with no execution (its flush failed earlier) runs as recovered, once
                // a flush has made it durable.
                if !gw.is_running(&existing.id) {
                    run_when_durable(gw, existing, true, journal_failed);
                }
            }
        },
    }
    Ok(())
}

/// Marks `entry` running, and in one tracked task waits for the journal to be durable, tells
/// the broker it was received and executes it. When the flush fails the entry is unmarked and
/// not executed, and `journal_failed` is told (the tunnel is closed; the broker delivers the
/// command again later).
fn run_when_durable(
    gw: &Arc<Gateway>,
    entry: JournalEntry,
    recovered: bool,
    journal_failed: &tokio::sync::mpsc::Sender<NotJournaled>,
) {
    if !gw.mark_running(&entry.id) {
        return;
    }
    let (gw, failed) = (gw.clone(), journal_failed.clone());
    gw.exec_tasks.clone().spawn(async move {
        if let Err(source) = gw.store.flush().await {
            gw.unmark_running(&entry.id);
            let _ = failed.try_send(NotJournaled {
                id: entry.id,
                source,
            });
            return;
        }
        if let Some(tx) = gw.outbound() {
            // Informational only: never wait for it.
            let _ = tx.try_send(GatewayFrame {
                kind: Some(GKind::Received(CommandReceived {
                    command_id: entry.id.clone(),
                })),
            });
        }
        execution(gw, entry, recovered).await;
    });
}

/// Seals, to this gateway's own key, any secret a payload carries in clear (the SaaS seals them
/// before it stores anything; this covers a SaaS that did not), before the journal write: the
/// journal is an append-only log, which keeps every record on disk until its segment is deleted,
/// so sealing later would not be enough.
/// Without a key to seal to, secrets are redacted (the command then fails instead of storing
/// them).
fn seal_clear_secrets(gw: &Gateway, payload: &mut Value) {
    if !pcg_proto::sealed::contains_secrets(payload) {
        return;
    }
    match gw.store.openers() {
        Ok(keys) if !keys.is_empty() => {
            pcg_proto::sealed::seal_secrets(payload, &keys[0].recipient());
        }
        other => {
            if let Err(e) = other {
                tracing::error!("cannot load this gateway's key to seal a payload's secrets: {e}");
            }
            pcg_proto::sealed::redact_secrets(payload);
        }
    }
}

/// The payload with its sealed secrets opened (in memory only; the journal keeps it sealed).
fn open_payload(gw: &Gateway, mut payload: Value) -> Result<Value, ExecError> {
    if !pcg_proto::sealed::contains_sealed(&payload) {
        return Ok(payload);
    }
    let keys = gw
        .store
        .openers()
        .map_err(|e| ExecError::new("sealed_secret", e.to_string()))?;
    pcg_proto::sealed::open_secrets(&mut payload, &keys)
        .map_err(|e| ExecError::new("sealed_secret", e.to_string()))?;
    Ok(payload)
}

/// Executes a journaled entry and records its result, unless it is already executing.
pub fn spawn_execution(gw: Arc<Gateway>, entry: JournalEntry, recovered: bool) {
    if !gw.mark_running(&entry.id) {
        return;
    }
    execute(gw, entry, recovered);
}

/// Executes an entry already marked running, and records its result, in a task of its own.
fn execute(gw: Arc<Gateway>, entry: JournalEntry, recovered: bool) {
    gw.exec_tasks.clone().spawn(execution(gw, entry, recovered));
}

/// Executes an entry already marked running, and records its result.
async fn execution(gw: Arc<Gateway>, entry: JournalEntry, recovered: bool) {
    // Registered by `mark_running`; a missing one (cannot happen) is made here.
    let exec = match gw.executions.get(&entry.id) {
        Some(e) => e,
        None => {
            gw.mark_running(&entry.id);
            match gw.executions.get(&entry.id) {
                Some(e) => e,
                None => return,
            }
        }
    };
    // The deadline stops the execution like a cancel, even while it waits for a permit.
    let deadline = entry.deadline_ms;
    let stopped = {
        let exec = exec.clone();
        async move {
            match deadline {
                Some(d) => tokio::select! {
                    _ = exec.cancel.cancelled() => {}
                    _ = tokio::time::sleep(until_unix_ms(d)) => {
                        exec.stop(Stop::TimedOut { deadline_ms: d });
                    }
                },
                None => exec.cancel.cancelled().await,
            }
        }
    };
    tokio::pin!(stopped);
    let permit = tokio::select! {
        biased;
        _ = &mut stopped => None,
        p = gw.permits.clone().acquire_owned() => p.ok(),
    };
    let started = now_ms();
    // Past its deadline (on arrival, or while it waited for a permit): checked here, as a
    // timer already due may not have fired yet.
    if let Some(d) = deadline.filter(|d| started >= *d) {
        exec.stop(Stop::TimedOut { deadline_ms: d });
    }
    let outcome = match permit {
        Some(_permit) if exec.stopped().is_none() => {
            run(&gw, &exec, &entry, recovered, &mut stopped).await
        }
        // Stopped before it started: never run.
        _ => Err(stop_error(&exec, None, "it had not started")),
    };
    let result = match outcome {
        Ok(mut output) => StoredResult {
            // A handler's output never carries a secret back (an echo of a password, a
            // driver that returns its endpoint): secret-named values are redacted.
            output: {
                pcg_proto::sealed::redact_secrets(&mut output);
                output
            },
            ok: true,
            error_class: String::new(),
            error_message: String::new(),
            started_ms: started,
            finished_ms: now_ms(),
        },
        Err(e) => StoredResult {
            ok: false,
            output: Value::Null,
            error_class: e.class,
            error_message: e.message,
            started_ms: started,
            finished_ms: now_ms(),
        },
    };
    record(&gw, &entry, &result).await;
}

/// How long until the Unix time `ms` (zero when it has passed).
fn until_unix_ms(ms: i64) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(ms - now_ms()).unwrap_or(0))
}

/// Runs the handler of an entry until it ends or `stopped` resolves (then as [`CANCEL_GRACE`]
/// and the handler's registration say).
async fn run(
    gw: &Arc<Gateway>,
    exec: &Arc<Execution>,
    entry: &JournalEntry,
    recovered: bool,
    stopped: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Value, ExecError> {
    if !entry.payload.is_object() {
        return Err(ExecError::invalid_payload(
            "the payload is not a JSON object",
        ));
    }
    let payload = open_payload(gw, entry.payload.clone())?;
    let h = gw.registry.get(&entry.kind).ok_or_else(|| {
        ExecError::new(
            "unknown_kind",
            format!(
                "this gateway cannot execute {:?}; it supports: {}",
                entry.kind,
                gw.registry.kinds().join(", ")
            ),
        )
    })?;
    let ctx = ExecContext {
        command_id: entry.id.clone(),
        kind: entry.kind.clone(),
        recovered,
        gateway: gw.clone(),
        cancel: exec.cancel.clone(),
        execution: exec.clone(),
    };
    // Polled in this task behind `catch_unwind`: a panicking handler fails its command instead
    // of the gateway, and an abandoned one is dropped wherever it was. (A task of its own did
    // the same for the cost of a spawn and a wake-up per command.)
    let handler = std::panic::AssertUnwindSafe(h.execute(ctx, payload)).catch_unwind();
    tokio::pin!(handler);
    let joined = |r: Result<Result<Value, ExecError>, Box<dyn std::any::Any + Send>>| match r {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(ExecError::new(
                "internal",
                format!("the handler of {} panicked: {what}", entry.kind),
            ))
        }
    };
    tokio::select! {
        r = &mut handler => {
            return match joined(r) {
                // It saw its token before `stopped` was polled: still a stopped execution.
                Err(e) if exec.stopped().is_some() => Err(stop_error(exec, Some(e), "")),
                r => r,
            };
        }
        _ = stopped => {}
    }
    if gw.registry.is_cancellable(&entry.kind) {
        if let Ok(r) = tokio::time::timeout(CANCEL_GRACE, &mut handler).await {
            return match joined(r) {
                // It finished its work before it noticed: that result stands.
                Ok(v) => Ok(v),
                Err(e) => Err(stop_error(exec, Some(e), "")),
            };
        }
        return Err(stop_error(
            exec,
            None,
            &format!(
                "{} did not wind down within {} s and was abandoned; what it had started may have taken effect",
                entry.kind,
                CANCEL_GRACE.as_secs()
            ),
        ));
    }
    Err(stop_error(
        exec,
        None,
        &format!(
            "{} cannot stop part-way, so it was abandoned where it was; what it had started may have taken effect",
            entry.kind
        ),
    ))
}

/// The error of a stopped execution: the class of its stop, what happened, and what the
/// handler said or what became of it.
fn stop_error(exec: &Execution, handler: Option<ExecError>, what: &str) -> ExecError {
    let stop = exec
        .stopped()
        .unwrap_or_else(|| Stop::Interrupted("stopped".into()));
    let mut message = stop.message();
    match handler {
        Some(e) if !e.message.is_empty() => {
            message.push_str("; ");
            message.push_str(&e.message);
        }
        _ => {}
    }
    if !what.is_empty() {
        message.push_str("; ");
        message.push_str(what);
    }
    ExecError::new(stop.class(), message)
}

/// Journals a result (done + outbox) and sends it, then makes it durable here, retrying until it
/// is. The send does not wait for this side's flush (see the module's order of events): the
/// entry is written first, so an acknowledgement that comes back before the flush finds it in
/// the outbox, and a redelivery finds it done.
async fn record(gw: &Arc<Gateway>, entry: &JournalEntry, result: &StoredResult) {
    let (id, kind) = (entry.id.as_str(), entry.kind.as_str());
    // The result must not be lost: retry the write, then the flush, until it is durable.
    let mut delay = std::time::Duration::from_millis(100);
    let mut retry = |what: &str, e: crate::store::StoreError| {
        tracing::error!(command = %id, "cannot {what} result, retrying: {e}");
        let wait = delay;
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
        tokio::time::sleep(wait)
    };
    while let Err(e) = gw.store.finish(entry, result) {
        retry("record", e).await;
    }
    gw.unmark_running(id);
    gw.metrics.command(
        kind,
        if result.ok {
            "succeeded"
        } else {
            result.error_class.as_str()
        },
        (result.finished_ms - result.started_ms).max(0) as f64 / 1000.0,
    );
    send_result(gw, id, result);
    while let Err(e) = gw.store.flush().await {
        retry("make durable the", e).await;
    }
}

/// A cancel from the SaaS. A running execution is stopped; a finished command keeps its result
/// (sent again); an id not executed yet is journaled as cancelled (done, in the outbox), so a
/// later delivery of it gets that result and it never runs.
pub fn on_cancel(gw: &Arc<Gateway>, id: &str, reason: &str) {
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(512)
        .collect();
    let reason = if reason.trim().is_empty() {
        "cancelled through the SaaS".to_string()
    } else {
        reason
    };
    if let Some(exec) = gw.executions.get(id) {
        exec.stop(Stop::Cancelled(reason));
        return;
    }
    let now = now_ms();
    let result = StoredResult {
        ok: false,
        output: Value::Null,
        error_class: "cancelled".into(),
        error_message: format!("cancelled before it started: {reason}"),
        started_ms: now,
        finished_ms: now,
    };
    let tombstone = JournalEntry {
        id: id.to_string(),
        kind: String::new(),
        payload: json!({}),
        state: EntryState::Done,
        received_ms: now,
        result: Some(result.clone()),
        acked_ms: None,
        deadline_ms: None,
    };
    match gw.store.begin(&tombstone) {
        Err(e) => tracing::error!(command = %id, "cannot journal a cancel: {e}"),
        Ok(None) => {
            let gw = gw.clone();
            let id = id.to_string();
            gw.exec_tasks.clone().spawn(async move {
                match gw.store.flush().await {
                    Ok(()) => send_result(&gw, &id, &result),
                    // Journaled but not durable yet: the outbox sends it once it is.
                    Err(e) => tracing::error!(command = %id, "cannot make a cancel durable: {e}"),
                }
            });
        }
        Ok(Some(e)) => match (e.state, &e.result) {
            (EntryState::Done, Some(r)) => send_result(gw, id, r),
            // Journaled and starting now (a delivery racing this cancel).
            _ => {
                if let Some(x) = gw.executions.get(id) {
                    x.stop(Stop::Cancelled(reason));
                }
            }
        },
    }
}
