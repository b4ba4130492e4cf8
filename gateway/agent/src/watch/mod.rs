//! The watch loop: machines declared at the SaaS, converged and watched on premises.
//!
//! - **Declarations** arrive on the tunnel (`MachineSync`: the whole set on every tunnel, then
//!   each change). Each is stored durably ([`crate::store::machines`]) before its generation is
//!   acknowledged (`MachinesApplied`); the loop works from that copy while the tunnel is down.
//! - **Each cycle** (every `watch_interval_ms`, and soon after a declaration changes) reads each
//!   provider endpoint once ([`observe`]), finds every machine in that read, and judges it
//!   ([`judge`]): converge to a new declaration, record drift, alert, or heal within the budget.
//! - **Actions** (create, power, delete; [`act`]) are journaled and flushed before they start and
//!   again with their result: a restart resumes an action still running (each converges: a
//!   create finds the VM its mark names) and never starts one twice. A machine with an action
//!   under way is not judged until it ends.
//! - **Reports** ([`report`]) carry changed observations and the queued events up the tunnel,
//!   one unacknowledged report at a time; every `watch_report_ms` every observation, the
//!   gateway's health and the inventory summary. Events stay queued durably until the broker
//!   acknowledges them.

pub mod act;
pub mod judge;
pub mod observe;
pub mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcg_proto::machines::{EndpointHealth, MachineEvent, Observed, Provider};
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{AppliedGeneration, GatewayFrame, MachineSync, MachinesApplied};
use tokio::sync::Notify;

use crate::store::machines::{ActionEntry, ActionState, LocalMachine};
use crate::store::now_ms;
use crate::Gateway;
use judge::{NewEvent, Plan, Seen};

/// Machines judged and acted on at once in a cycle (actions run in their own tasks).
const MAX_ACTIONS: usize = 16;

/// What the loop keeps in memory.
#[derive(Default)]
struct Inner {
    /// The last observation of each machine.
    observed: HashMap<String, Observed>,
    /// Machines whose observation changed since it was last reported.
    unreported: HashSet<String>,
    /// Each endpoint as last read, by (provider, name).
    endpoints: BTreeMap<(String, String), EndpointHealth>,
    /// Machines with an action under way.
    busy: HashSet<String>,
    /// Machine ids of the whole declared set being received (a full `MachineSync`).
    full_seen: Option<HashSet<String>>,
    report: report::ReportState,
    cycles: u64,
    last_cycle_ms: u64,
    last_cycle_at_ms: Option<i64>,
    /// When every enrolled endpoint (not only those with machines) was last read.
    last_all_read: Option<Instant>,
}

/// The watch loop's shared state (one per gateway).
#[derive(Default)]
pub struct Watch {
    /// Wakes the loop for a cycle soon: a declaration changed, an action ended.
    wake: Notify,
    inner: Mutex<Inner>,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("watch lock is never poisoned")
    }

    /// Asks for a cycle soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The last observation of a machine (for status and tests).
    pub fn observed(&self, id: &str) -> Option<Observed> {
        self.lock().observed.get(id).cloned()
    }
}

fn new_event_id() -> String {
    format!("mev_{}", hex::encode(rand::random::<[u8; 12]>()))
}

/// Queues events (not flushed).
fn queue_events(gw: &Gateway, machine_id: &str, events: Vec<NewEvent>) {
    for e in events {
        let ev = MachineEvent {
            id: new_event_id(),
            machine_id: machine_id.to_string(),
            kind: e.kind.to_string(),
            alert: e.alert,
            message: e.message,
            details: e.details,
            at_ms: now_ms(),
        };
        if ev.alert {
            tracing::warn!(machine = %machine_id, kind = %ev.kind, "{}", ev.message);
        } else {
            tracing::info!(machine = %machine_id, kind = %ev.kind, "{}", ev.message);
        }
        if let Err(e) = gw.store.push_watch_event(&ev) {
            tracing::error!(machine = %machine_id, "cannot queue a machine event: {e}");
        }
    }
}

/// Declarations from the broker: stored, made durable, acknowledged; then a cycle.
pub fn on_sync(gw: &Arc<Gateway>, sync: MachineSync) {
    let mut applied = Vec::new();
    for d in sync.machines {
        let declaration = if d.deleted {
            None
        } else {
            match serde_json::from_slice(&d.declaration) {
                Ok(decl) => Some(decl),
                Err(e) => {
                    tracing::error!(machine = %d.machine_id, "unreadable declaration ignored: {e}");
                    continue;
                }
            }
        };
        match gw
            .store
            .put_declared(&d.machine_id, d.generation, declaration)
        {
            Ok(held) => applied.push(AppliedGeneration {
                machine_id: d.machine_id.clone(),
                generation: held,
            }),
            Err(e) => tracing::error!(machine = %d.machine_id, "cannot store a declaration: {e}"),
        }
        if sync.full {
            gw.watch
                .lock()
                .full_seen
                .get_or_insert_with(HashSet::new)
                .insert(d.machine_id);
        }
    }
    if sync.full && !sync.more {
        // The whole set arrived: a machine in none of its frames is no longer declared.
        let seen = gw.watch.lock().full_seen.take().unwrap_or_default();
        for m in gw.store.watch_machines().unwrap_or_default() {
            if !seen.contains(&m.id) {
                tracing::warn!(machine = %m.id, "no longer declared at the SaaS; no longer watched (the provider is left as it is)");
                if let Err(e) = gw.store.forget_machine(&m.id) {
                    tracing::error!(machine = %m.id, "cannot forget a machine: {e}");
                }
                let mut inner = gw.watch.lock();
                inner.observed.remove(&m.id);
                inner.unreported.remove(&m.id);
            }
        }
    }
    let gw = gw.clone();
    tokio::spawn(async move {
        if let Err(e) = gw.store.flush().await {
            tracing::error!("cannot make declarations durable: {e}");
            return;
        }
        if !applied.is_empty() {
            if let Some(tx) = gw.outbound() {
                let _ = tx.try_send(GatewayFrame {
                    kind: Some(GKind::MachinesApplied(MachinesApplied {
                        machines: applied,
                    })),
                });
            }
        }
        gw.watch.wake();
    });
}

/// A tunnel came up: everything is reported again on it.
pub fn tunnel_up(gw: &Gateway) {
    gw.watch.lock().report.reset(true);
    gw.watch.lock().full_seen = None;
    gw.watch.wake();
}

/// Resumes actions a restart interrupted (each converges), or closes those a newer declaration
/// made moot.
async fn recover(gw: &Arc<Gateway>) {
    let running = match gw.store.running_actions() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot read the watch loop's action journal: {e}");
            return;
        }
    };
    for a in running {
        let m = gw.store.watch_machine(&a.machine_id).ok().flatten();
        match m {
            Some(m) if m.generation == a.generation || m.deleted => {
                tracing::warn!(machine = %m.id, action = %a.id, "resuming {} after a restart", a.action.describe());
                gw.watch.lock().busy.insert(m.id.clone());
                tokio::spawn(run_action(gw.clone(), m, a, true));
            }
            _ => {
                let _ = gw.store.finish_action(
                    &a.id,
                    false,
                    "not resumed after a restart: the declaration changed meanwhile".into(),
                );
            }
        }
    }
    let _ = gw.store.flush().await;
}

/// Runs one journaled action and records its result.
async fn run_action(gw: Arc<Gateway>, m: LocalMachine, entry: ActionEntry, recovered: bool) {
    let outcome = act::execute(&gw, &m, &entry.action).await;
    let (ok, result) = match &outcome {
        Ok(Some(id)) => (true, format!("done: {id}")),
        Ok(None) => (true, "done".to_string()),
        Err(e) => (false, e.clone()),
    };
    if let Err(e) = gw.store.finish_action(&entry.id, ok, result.clone()) {
        tracing::error!(action = %entry.id, "cannot record an action's result: {e}");
    }
    let created = outcome.as_ref().ok().cloned().flatten();
    let interval = gw.cfg.watch_interval_ms.max(100);
    let kept = gw
        .store
        .update_watch_machine(&m.id, |x| {
            if let Some(id) = &created {
                x.provider_id = Some(id.clone());
                x.last_seen_ms = Some(now_ms());
            }
            if ok {
                x.last_error = None;
                x.failures = 0;
                x.retry_at_ms = None;
            } else {
                // The next converging attempt waits 2, 4, 8... cycles (at most ten minutes).
                x.last_error = Some(result.clone());
                x.failures = x.failures.saturating_add(1);
                let pause = interval
                    .saturating_mul(1 << x.failures.min(12))
                    .min(600_000);
                x.retry_at_ms = Some(now_ms() + i64::try_from(pause).unwrap_or(600_000));
            }
        })
        .ok()
        .flatten();
    let d = m.declaration.as_ref();
    let label = format!(
        "machine {} ({})",
        m.id,
        d.map(|d| d.name.as_str()).unwrap_or("")
    );
    let (previous_id, provider_id) = match &entry.action {
        crate::store::machines::Action::Create { previous_id, .. } => {
            (previous_id.clone(), created.clone())
        }
        crate::store::machines::Action::Power { provider_id, .. }
        | crate::store::machines::Action::Delete { provider_id } => {
            (None, Some(provider_id.clone()))
        }
    };
    let used = kept.as_ref().zip(d).map_or(0, |(k, d)| {
        k.heals_within(d.heal_budget.window_seconds, now_ms())
    });
    let details = serde_json::json!({
        "action": entry.action,
        "action_id": entry.id,
        "generation": entry.generation,
        "ok": ok,
        "result": result,
        "provider_id": provider_id,
        "previous_id": previous_id,
        "recovered": recovered,
        "heals_used": entry.heal.then_some(used),
        "max_heals": d.filter(|_| entry.heal).map(|d| d.heal_budget.max_heals),
    });
    let what = entry.action.describe();
    let ev = if entry.heal {
        NewEvent {
            kind: pcg_proto::machines::kinds::HEAL,
            alert: !ok,
            message: if ok {
                format!("{label} healed: {what}")
            } else {
                format!("{label}: heal failed ({what}): {result}")
            },
            details,
        }
    } else {
        NewEvent {
            kind: if ok {
                pcg_proto::machines::kinds::CONVERGED
            } else {
                pcg_proto::machines::kinds::ERROR
            },
            alert: !ok,
            message: if ok {
                format!("{label}: {what}")
            } else {
                format!("{label}: could not {what}: {result}")
            },
            details,
        }
    };
    queue_events(&gw, &m.id, vec![ev]);
    if let Err(e) = gw.store.flush().await {
        tracing::error!(machine = %m.id, "cannot make an action's result durable: {e}");
    }
    gw.watch.lock().busy.remove(&m.id);
    gw.watch.wake();
    report::send(&gw, false).await;
}

/// One cycle: read every endpoint with machines (every enrolled one when the inventory is due),
/// judge every machine, journal and start the actions, report.
async fn cycle(gw: &Arc<Gateway>) {
    let started = Instant::now();
    let machines = match gw.store.watch_machines() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("cannot read the declared machines: {e}");
            return;
        }
    };
    let report_every = Duration::from_millis(gw.cfg.watch_report_ms.max(1000));
    let read_all = gw
        .watch
        .lock()
        .last_all_read
        .is_none_or(|t| t.elapsed() >= report_every);
    // Endpoints to read, with the bare-metal systems declared on each BMC.
    let mut targets: BTreeMap<(Provider, String), Vec<Option<String>>> = BTreeMap::new();
    for m in &machines {
        let Some(d) = &m.declaration else { continue };
        let systems = targets
            .entry((d.provider(), d.endpoint().to_string()))
            .or_default();
        if let Some(b) = &d.bare_metal {
            systems.push(b.system.clone());
        }
    }
    if read_all {
        for n in gw.store.endpoint_names("vsphere") {
            targets.entry((Provider::Vsphere, n)).or_default();
        }
        for n in gw.store.endpoint_names("openstack") {
            targets.entry((Provider::Openstack, n)).or_default();
        }
        for n in gw.bare_metal.names() {
            targets.entry((Provider::BareMetal, n)).or_default();
        }
    }
    let reads = futures_util::future::join_all(targets.iter().map(|((p, n), systems)| {
        let gw = gw.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(120), observe::read(&gw, *p, n, systems))
                .await
            {
                Ok(r) => r,
                Err(_) => observe::Read {
                    provider: *p,
                    name: n.clone(),
                    outcome: Err(observe::ReadError::Unreachable(format!(
                        "{} {n} did not answer within 120 s",
                        p.as_str()
                    ))),
                    requests: None,
                    ms: 120_000,
                },
            }
        }
    }))
    .await;
    let by_key: HashMap<(Provider, String), &observe::Read> = reads
        .iter()
        .map(|r| ((r.provider, r.name.clone()), r))
        .collect();
    report::record_reads(gw, &reads, &machines);

    // Judge every machine not busy; journal the actions; one flush for the cycle.
    let now = now_ms();
    let mut to_start: Vec<(LocalMachine, ActionEntry)> = Vec::new();
    for m in machines {
        if gw.watch.lock().busy.contains(&m.id) {
            continue;
        }
        let seen = match &m.declaration {
            Some(d) => by_key
                .get(&(d.provider(), d.endpoint().to_string()))
                .map_or_else(
                    || Seen::Unreachable("not read".into()),
                    |r| observe::seen(gw, &m, r),
                ),
            None => Seen::Missing,
        };
        let mut judged = m.clone();
        let verdict = judge::judge(&mut judged, &seen, now);
        let plan = verdict
            .plan
            .clone()
            .filter(|_| to_start.len() < MAX_ACTIONS);
        if verdict.plan.is_some() && plan.is_none() {
            // Too many actions this cycle: this machine is judged again next cycle (its heal
            // not counted).
            continue;
        }
        if verdict.forget {
            if let Err(e) = gw.store.forget_machine(&m.id) {
                tracing::error!(machine = %m.id, "cannot forget a deleted machine: {e}");
            }
        } else if judged != m {
            let j = judged.clone();
            if let Err(e) = gw.store.update_watch_machine(&m.id, move |x| {
                let keep = (x.generation, x.declaration.clone(), x.deleted);
                *x = j.clone();
                (x.generation, x.declaration, x.deleted) = keep;
            }) {
                tracing::error!(machine = %m.id, "cannot record what the loop saw: {e}");
            }
        }
        queue_events(gw, &m.id, verdict.events);
        if let Some(Plan { action, heal }) = plan {
            let entry = ActionEntry {
                id: format!("act_{}", hex::encode(rand::random::<[u8; 12]>())),
                machine_id: m.id.clone(),
                generation: m.generation,
                action,
                heal,
                state: ActionState::Running,
                started_ms: now,
                finished_ms: None,
                ok: None,
                result: None,
            };
            match gw.store.begin_action(&entry) {
                Ok(()) => to_start.push((judged, entry)),
                Err(e) => tracing::error!(machine = %m.id, "cannot journal an action: {e}"),
            }
        }
        report::observed(gw, &m.id, verdict.observed);
    }
    if let Err(e) = gw.store.flush().await {
        // Nothing is started unless its journal entry is durable.
        tracing::error!("cannot make the watch cycle durable; no action started: {e}");
        return;
    }
    for (m, entry) in to_start {
        gw.watch.lock().busy.insert(m.id.clone());
        tokio::spawn(run_action(gw.clone(), m, entry, false));
    }
    {
        let mut inner = gw.watch.lock();
        inner.cycles += 1;
        inner.last_cycle_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        inner.last_cycle_at_ms = Some(now);
        if read_all {
            inner.last_all_read = Some(Instant::now());
        }
    }
    report::send(gw, false).await;
}

/// Runs the watch loop until `stop` is set.
pub async fn run(gw: Arc<Gateway>, mut stop: tokio::sync::watch::Receiver<bool>) {
    recover(&gw).await;
    let interval = Duration::from_millis(gw.cfg.watch_interval_ms.max(100));
    let mut next_cycle = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_cycle) => {
                cycle(&gw).await;
                next_cycle = tokio::time::Instant::now() + interval;
            }
            _ = gw.watch.wake.notified() => {
                // Soon, so that several changes arriving together make one cycle.
                next_cycle = next_cycle.min(tokio::time::Instant::now() + Duration::from_millis(50));
            }
            _ = tick.tick() => {
                report::send(&gw, false).await;
                if last_prune.elapsed() > Duration::from_secs(600) {
                    last_prune = Instant::now();
                    let keep = i64::try_from(gw.cfg.journal_retention_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
                    match gw.store.prune_actions(now_ms().saturating_sub(keep)) {
                        Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot old watch actions"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("pruning watch actions failed: {e}"),
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
}
